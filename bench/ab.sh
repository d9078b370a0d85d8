#!/usr/bin/env bash
# bench/ab.sh A B [ROUNDS]: saturation (wrk -t2 -c32 -d8s) of two callgate binaries, A then B,
# ROUNDS times (3), against one private nginx stub on loopback, each on a fresh state file:
# req/s, p50, p99, CPU seconds per 10 000 requests and peak RSS of the callgate process.
# CONNS=1 measures one connection instead (wrk -t1 -c1). Interleaving makes the comparison fair
# on a noisy machine. Needs wrk, nginx, curl, python3 (see load.sh).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd); BENCH=$ROOT/bench
A=${1:?usage: bench/ab.sh BINARY_A BINARY_B [ROUNDS]}; B=${2:?usage: bench/ab.sh BINARY_A BINARY_B [ROUNDS]}; ROUNDS=${3:-3}
T=$(mktemp -d "${TMPDIR:-/tmp}/callgate-ab.XXXXXX"); trap 'rm -rf "$T"' EXIT
read -r STUB CG ADMIN <<<"$(python3 -c 'import socket
s=[socket.socket() for _ in range(3)]
[x.bind(("127.0.0.1",0)) for x in s]
print(" ".join(str(x.getsockname()[1]) for x in s))')"
mkdir -p $T/stub
sed -e "s|@DIR@|$T/stub|g" -e "s|@PORT@|$STUB|g" -e "s|@WORKERS@|auto|g" $BENCH/nginx-stub.conf.in > $T/stub/nginx.conf
nginx -p $T/stub/ -c $T/stub/nginx.conf -e $T/stub/error.log -g 'daemon off;' & NG=$!
python3 $BENCH/make_policies.py $ROOT/policies $T/policies 1 cg_bench_key_for_load_tests_only >/dev/null
sleep 1
run() { # run NAME BIN
  local d=$T/cg-$1-$RANDOM; mkdir -p $d/state
  echo x > $d/upstream_api_key; echo x > $d/redaction_hash_key; echo tok > $d/admin_token
  sed -e "s|@PORT@|$CG|g" -e "s|@STUB_PORT@|$STUB|g" -e "s|@ADMIN_PORT@|$ADMIN|g" -e "s|@POLICIES@|$T/policies|g" -e "s|@LEASE_GRACE@|3600|g" $BENCH/callgate.toml.in > $d/config.toml
  env -u RUST_LOG $2 serve --config $d/config.toml > $d/log 2>&1 & local P=$!
  for i in $(seq 100); do curl -s -o /dev/null --max-time 1 http://127.0.0.1:$CG/healthz && break; sleep 0.05; done
  local t0=$(awk '{print $14+$15}' /proc/$P/stat)
  local conns=${CONNS:-32}; local threads=$(( conns < 2 ? 1 : 2 ))
  local out=$(BENCH_KEY=cg_bench_key_for_load_tests_only BENCH_PER_SECOND=0 wrk -t$threads -c$conns -d8s --latency -s $BENCH/calls.lua http://127.0.0.1:$CG)
  local t1=$(awk '{print $14+$15}' /proc/$P/stat)
  local rps=$(awk '/^Requests\/sec/ {printf "%.0f", $2}' <<<"$out"); local reqs=$(awk '/requests in/ {print $1}' <<<"$out")
  local p50=$(awk '$1=="50%" {print $2}' <<<"$out"); local p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  local bad=$(awk '/Non-2xx/ {print $NF}' <<<"$out"); local errs=$(awk '/Socket errors/' <<<"$out")
  if [ -n "$bad$errs" ]; then echo "$1: wrk saw failures (non-2xx: ${bad:-0}; $errs); see $d/log" >&2; tail -5 $d/log >&2; fi
  local hwm=$(awk '/VmHWM/ {printf "%.1f", $2/1024}' /proc/$P/status)
  echo "$1 rps=$rps p50=$p50 p99=$p99 cpu_s_per_10k=$(awk "BEGIN{printf \"%.3f\", ($t1-$t0)/100/$reqs*10000}") peak_rss_mib=$hwm"
  kill $P; wait $P 2>/dev/null || true
}
for _ in $(seq "$ROUNDS"); do run A "$A"; run B "$B"; done
kill $NG
