#!/usr/bin/env bash
# bench/slowloris.sh: do slow clients starve the others? callgate (on SQLite, forwarding to a
# private nginx stub) with server.max_connections = $MAXCONN (1000): wrk -c32 for 10 s alone,
# then again while $SLOW (1500) slow connections are held open against it, half of them idle
# and half trickling a request head one byte a second (slowloris). Prints wrk's req/s, p50/p99
# and errors for both runs, how many slow connections the gateway closed (under pressure, with
# a tenth of the cap left, connections idle or mid-head for 2 s are closed) and how many it
# refused at the cap, how a new client fares (one fresh connection every 100 ms: answered or
# refused, and how long it took), and the gateway's peak RSS. Needs wrk, nginx, curl, python3.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd); BENCH=$ROOT/bench; CALLGATE_BIN=${CALLGATE_BIN:-$ROOT/target/release/callgate}
MAXCONN=${MAXCONN:-1000}; SLOW=${SLOW:-1500}
ulimit -n 65536 2>/dev/null || true
T=$(mktemp -d); trap 'kill $NG $P $S 2>/dev/null; rm -rf $T' EXIT; S=
read -r STUB CG ADMIN <<<"$(python3 -c 'import socket
s=[socket.socket() for _ in range(3)]
[x.bind(("127.0.0.1",0)) for x in s]
print(" ".join(str(x.getsockname()[1]) for x in s))')"
mkdir -p $T/stub
sed -e "s|@DIR@|$T/stub|g" -e "s|@PORT@|$STUB|g" -e "s|@WORKERS@|auto|g" $BENCH/nginx-stub.conf.in > $T/stub/nginx.conf
nginx -p $T/stub/ -c $T/stub/nginx.conf -e $T/stub/error.log -g 'daemon off;' & NG=$!
python3 $BENCH/make_policies.py $ROOT/policies $T/policies 1 cg_bench_key_for_load_tests_only >/dev/null
d=$T/cg; mkdir -p $d/state; echo x > $d/upstream_api_key; echo x > $d/redaction_hash_key; echo tok > $d/admin_token
sed -e "s|@PORT@|$CG|g" -e "s|@STUB_PORT@|$STUB|g" -e "s|@ADMIN_PORT@|$ADMIN|g" -e "s|@POLICIES@|$T/policies|g" -e "s|@LEASE_GRACE@|3600|g" $BENCH/callgate.toml.in > $d/config.toml
sed -i "s|^shutdown_grace_ms = 3000|shutdown_grace_ms = 3000\nmax_connections = $MAXCONN|" $d/config.toml
env -u RUST_LOG "$CALLGATE_BIN" serve --config $d/config.toml > $d/log 2>&1 & P=$!
for i in $(seq 100); do curl -s -o /dev/null --max-time 1 http://127.0.0.1:$CG/healthz && break; sleep 0.05; done

measure() {  # measure LABEL
  local out; out=$(BENCH_KEY=cg_bench_key_for_load_tests_only BENCH_PER_SECOND=0 wrk -t2 -c32 -d10s --timeout 5s --latency -s $BENCH/calls.lua http://127.0.0.1:$CG)
  local rps p50 p99 errs
  rps=$(awk '/^Requests\/sec/ {printf "%.0f", $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out"); p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  errs=$(awk '/Socket errors/ {print $0}' <<<"$out"); errs=${errs:-"  Socket errors: none"}
  non=$(awk '/Non-2xx/ {print $NF}' <<<"$out"); non=${non:-0}
  echo "$1: rps=$rps p50=$p50 p99=$p99 non2xx=$non ${errs# }"
}

measure "wrk -c32 alone"

# The slow clients: open $SLOW connections, half idle, half sending a head one byte a second;
# each one that the gateway closes is counted, and reopened a second later.
cat > $T/slow.py <<'EOF'
import socket, sys, time, selectors
port, n, secs = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
head = b"POST /v1/calls HTTP/1.1\r\nhost: x\r\nauthorization: Bearer cg_bench_key_for_load_tests_only\r\n"
sel = selectors.DefaultSelector()
conns = {}
to_reopen = []
closed = refused = opened = 0
def open_one(i):
    global opened, refused
    s = socket.socket()
    s.setblocking(False)
    try:
        s.connect_ex(("127.0.0.1", port))
    except OSError:
        refused += 1
        return
    conns[s] = [i % 2 == 1, 0]   # trickling?, bytes sent
    sel.register(s, selectors.EVENT_READ)
    opened += 1
for i in range(n):
    open_one(i)
end = time.monotonic() + secs
next_tick = time.monotonic()
while time.monotonic() < end:
    for key, _ in sel.select(timeout=0.1):
        s = key.fileobj
        try:
            data = s.recv(4096)
        except OSError:
            data = b""
        # An answer (503 at the cap) or a close: this slow connection was turned away.
        if not data or data.startswith(b"HTTP/1.1 503"):
            sel.unregister(s); trickling = conns.pop(s)[0]; s.close()
            if data: refused += 1
            else: closed += 1
            to_reopen.append(1 if trickling else 0)
    if time.monotonic() >= next_tick:
        next_tick += 1
        for i in to_reopen:   # reopened once a second: an attacker, not a busy loop
            open_one(i)
        to_reopen.clear()
        for s, state in list(conns.items()):
            if state[0] and state[1] < len(head):
                try:
                    s.send(head[state[1]:state[1] + 1]); state[1] += 1
                except OSError:
                    pass
print(f"slow connections: {opened} opened, {closed} closed by the gateway, {refused} refused at the cap (503), {len(conns)} open at the end")
EOF
# A new client every 100 ms: a fresh connection, GET /healthz, its answer and how long it took.
cat > $T/probe.py <<'EOF'
import socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
times, codes = [], {}
for _ in range(n):
    t0 = time.monotonic()
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        data = s.recv(64)
        s.close()
        code = data[9:12].decode() if data.startswith(b"HTTP/1.1 ") else "closed"
    except OSError:
        code = "error"
    codes[code] = codes.get(code, 0) + 1
    if code == "200":
        times.append(time.monotonic() - t0)
    time.sleep(0.1)
times.sort()
pct = lambda p: f"{times[min(len(times) - 1, int(p * len(times)))] * 1000:.1f} ms" if times else "-"
print(f"new clients (one every 100 ms): {codes}; served in p50 {pct(0.5)}, p99 {pct(0.99)}, max {pct(1.0)}")
EOF
echo "without slow clients: $(python3 $T/probe.py $CG 50)"
python3 $T/slow.py $CG $SLOW 18 > $T/slow.out & S=$!
sleep 4   # let them pile up against the cap
python3 $T/probe.py $CG 100 > $T/probe.out & PR=$!
measure "wrk -c32 with $SLOW slow connections (cap $MAXCONN)"
wait $PR
echo "with $SLOW slow connections: $(cat $T/probe.out)"
wait $S; S=
cat $T/slow.out
echo "gateway peak RSS: $(awk '/VmHWM/ {printf "%.1f MiB", $2/1024}' /proc/$P/status)"
