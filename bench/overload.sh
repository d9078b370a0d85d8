#!/usr/bin/env bash
# bench/overload.sh: callgate (on SQLite, forwarding to a private nginx stub) at the sustainable
# load (wrk -c32) and at ten times it (-c320), 10 s each, with server.max_requests_in_flight =
# $INFLIGHT (64): req/s, the 503s shed, p50/p99 and peak RSS; then the live slots in the store
# against the 200s wrk counted (wrk misses the answers cut off when a run ends, so the store may
# hold a few more: calls that were placed). Needs wrk, nginx, curl, python3.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd); BENCH=$ROOT/bench; CALLGATE_BIN=${CALLGATE_BIN:-$ROOT/target/release/callgate}
T=$(mktemp -d); trap 'kill $NG $P 2>/dev/null; rm -rf $T' EXIT
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
sed -i "s|^shutdown_grace_ms = 3000|shutdown_grace_ms = 3000\nmax_requests_in_flight = ${INFLIGHT:-64}|" $d/config.toml
env -u RUST_LOG "$CALLGATE_BIN" serve --config $d/config.toml > $d/log 2>&1 & P=$!
for i in $(seq 100); do curl -s -o /dev/null --max-time 1 http://127.0.0.1:$CG/healthz && break; sleep 0.05; done
total_ok=0
for c in 32 320; do
  out=$(BENCH_KEY=cg_bench_key_for_load_tests_only BENCH_PER_SECOND=0 wrk -t2 -c$c -d10s --timeout 10s --latency -s $BENCH/calls.lua http://127.0.0.1:$CG)
  rps=$(awk '/^Requests\/sec/ {printf "%.0f", $2}' <<<"$out"); reqs=$(awk '/requests in/ {print $1}' <<<"$out")
  non=$(awk '/Non-2xx/ {print $NF}' <<<"$out"); non=${non:-0}
  p50=$(awk '$1=="50%" {print $2}' <<<"$out"); p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  total_ok=$((total_ok + reqs - non))
  echo "c=$c rps=$rps requests=$reqs non2xx(503)=$non p50=$p50 p99=$p99 rss_hwm=$(awk '/VmHWM/ {print $2/1024 " MiB"}' /proc/$P/status)"
done
slots=$(curl -s -H "Authorization: Bearer tok" http://127.0.0.1:$ADMIN/admin/tenants/bench/usage | python3 -c 'import json,sys; print(json.load(sys.stdin)["slots"])')
echo "200s counted by wrk: $total_ok; live slots in the store: $slots"
grep -c gateway_overloaded $d/log || true
