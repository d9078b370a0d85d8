#!/usr/bin/env bash
# bench/ab.sh A B [ROUNDS]: saturation (wrk -t2 -c32 -d8s) of two callgate binaries, A then B,
# ROUNDS times (3), against one private nginx stub on loopback, each on a fresh state file:
# req/s, p50, p99, CPU seconds per 10 000 requests and peak RSS of the callgate process.
# CONNS=1 measures one connection instead (wrk -t1 -c1). Interleaving makes the comparison fair
# on a noisy machine. Needs wrk, nginx, curl, python3 (see load.sh).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
A=${1:?usage: bench/ab.sh BINARY_A BINARY_B [ROUNDS]}; B=${2:?usage: bench/ab.sh BINARY_A BINARY_B [ROUNDS]}; ROUNDS=${3:-3}
T=$(mktemp -d "${TMPDIR:-/tmp}/callgate-ab.XXXXXX")
. "$ROOT/bench/lib.sh"
trap bench_cleanup EXIT
pick_ports
start_stub
sleep 1
run() { # run NAME BIN
  local d=$T/cg-$1-$RANDOM
  callgate_dir $d
  start_callgate "$2" "$d"
  wait_healthy 100
  local t0=$(awk '{print $14+$15}' /proc/$P/stat)
  local out=$(load -t"$(wrk_threads)" -c"${CONNS:-32}" -d8s --latency)
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
