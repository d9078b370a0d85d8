#!/usr/bin/env bash
# bench/threads.sh [BINARY]: where one callgate process spends its time under load, per thread and
# per stage. Starts a private nginx stub and callgate as bench/ab.sh does (loopback only, fresh
# state file), runs wrk for $DUR s at $CONNS connections, and prints:
#   - wrk's req/s, p50, p99;
#   - CPU per request of each of callgate's threads (user and system, /proc/PID/task/*/stat);
#   - write and read calls and bytes per request of each thread (/proc/PID/task/*/io: the store
#     thread's are the pages it writes and the pages it reads back);
#   - from callgate's own histograms (scraped from /metrics at the end): the share of requests,
#     upstream requests, store waits and log syncs within each bucket, and the group commit's size.
# Knobs: CONNS (32), DUR (8), FILL (seconds at saturation first, to leave calls in flight),
#   PERF=1 (perf record -g of callgate for 4 s, the file's path printed), KEEP=1 (keep the temp dir).
# Needs wrk, nginx, curl, python3 (and perf for PERF=1).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd); BENCH=$ROOT/bench
BIN=${1:-$ROOT/target/release/callgate}; CONNS=${CONNS:-32}; DUR=${DUR:-8}; FILL=${FILL:-0}
T=$(mktemp -d "${TMPDIR:-/tmp}/callgate-threads.XXXXXX")
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $T"; else rm -rf "$T"; fi; }
trap cleanup EXIT
read -r STUB CG ADMIN <<<"$(python3 -c 'import socket
s=[socket.socket() for _ in range(3)]
[x.bind(("127.0.0.1",0)) for x in s]
print(" ".join(str(x.getsockname()[1]) for x in s))')"
mkdir -p "$T/stub" "$T/cg/state"
sed -e "s|@DIR@|$T/stub|g" -e "s|@PORT@|$STUB|g" -e "s|@WORKERS@|auto|g" "$BENCH/nginx-stub.conf.in" > "$T/stub/nginx.conf"
nginx -p "$T/stub/" -c "$T/stub/nginx.conf" -e "$T/stub/error.log" -g 'daemon off;' & PIDS+=($!)
python3 "$BENCH/make_policies.py" "$ROOT/policies" "$T/policies" 1 cg_bench_key_for_load_tests_only >/dev/null
d=$T/cg
echo x > "$d/upstream_api_key"; echo x > "$d/redaction_hash_key"; echo tok > "$d/admin_token"
sed -e "s|@PORT@|$CG|g" -e "s|@STUB_PORT@|$STUB|g" -e "s|@ADMIN_PORT@|$ADMIN|g" -e "s|@POLICIES@|$T/policies|g" \
    -e "s|@LEASE_GRACE@|3600|g" "$BENCH/callgate.toml.in" > "$d/config.toml"
env -u RUST_LOG "$BIN" serve --config "$d/config.toml" > "$d/log" 2>&1 & P=$!; PIDS+=($P)
for _ in $(seq 200); do curl -s -o /dev/null --max-time 1 "http://127.0.0.1:$CG/healthz" && break; sleep 0.05; done
load() { BENCH_KEY=cg_bench_key_for_load_tests_only BENCH_PER_SECOND=0 wrk "$@" -s "$BENCH/calls.lua" "http://127.0.0.1:$CG"; }
if [ "$FILL" != 0 ]; then load -t2 -c32 -d"${FILL}s" | grep -E "requests in"; sleep 1; fi
snap() { for t in /proc/$P/task/*; do echo "$(basename "$t"):$(tr ' ' _ < "$t/comm") $(awk '{print $14, $15}' "$t/stat") $(awk '/^wchar:/ {w=$2} /^syscw:/ {c=$2} /^rchar:/ {rb=$2} /^syscr:/ {rc=$2} END {print w+0, c+0, rb+0, rc+0}' "$t/io")"; done | sort; }
snap > "$T/t0"
if [ "${PERF:-0}" = 1 ]; then (sleep 2; perf record -F 999 -g -p "$P" -o "$T/perf.data" -- sleep 4 2>/dev/null) & PIDS+=($!); fi
out=$(load -t$(( CONNS < 2 ? 1 : 2 )) -c"$CONNS" -d"${DUR}s" --latency)
snap > "$T/t1"
curl -s "http://127.0.0.1:$ADMIN/metrics" > "$T/metrics.txt"
echo "$out" | grep -E "Requests/sec|^ +50%|^ +99%|Non-2xx|Socket errors"
reqs=$(awk '/requests in/ {print $1}' <<<"$out")
echo "CPU per request, by thread (thread id:name):"
join "$T/t0" "$T/t1" | awk -v r="$reqs" '{u=$8-$2; s=$9-$3; if (u+s>0) printf "  %-24s user %7.1f us  system %7.1f us\n", $1, u*10000/r, s*10000/r; tu+=u; ts+=s}
  END {printf "  %-24s user %7.1f us  system %7.1f us\n", "all", tu*10000/r, ts*10000/r}'
echo "Writes and reads per request, by thread (calls; bytes, and in 4 KiB pages: the store's thread writes"
echo "its log and the file, and reads pages its cache does not hold; the others' are sockets):"
join "$T/t0" "$T/t1" | awk -v r="$reqs" '{wc=$11-$5; wb=$10-$4; rc=$13-$7; rb=$12-$6; if (wc+rc>0) printf "  %-24s write %6.2f calls %8.0f bytes %5.2f pages  read %6.2f calls %8.0f bytes %5.2f pages\n", $1, wc/r, wb/r, wb/r/4096, rc/r, rb/r, rb/r/4096}'
python3 - "$T/metrics.txt" <<'PY'
import collections, re, sys
buckets = collections.defaultdict(list)
for line in open(sys.argv[1]):
    m = re.match(r'(callgate_[a-z_]+)_bucket\{(?:.*,)?le="([^"]+)"\} (\S+)', line)
    if m:
        buckets[m[1]].append((float("inf") if m[2] == "+Inf" else float(m[2]), float(m[3])))
print("callgate's histograms, share within each bucket (cumulative):")
for name in ("request_duration_seconds", "upstream_duration_seconds", "store_wait_seconds",
             "store_sync_seconds", "store_batch_operations"):
    b = sorted(buckets.get("callgate_" + name, []))
    if not b or b[-1][1] == 0:
        print(f"  {name}: none"); continue
    n = b[-1][1]
    print(f"  {name} (n={n:.0f}): " + ", ".join(f"<={le:g} {100 * c / n:.2f}%" for le, c in b if le != float("inf")))
PY
if [ "${PERF:-0}" = 1 ]; then wait "${PIDS[-1]}" 2>/dev/null || true; KEEP=1; echo "perf data: $T/perf.data"; fi
