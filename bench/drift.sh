#!/usr/bin/env bash
# bench/drift.sh A B [ROUNDS] [SECONDS]: long runs at saturation (wrk -t2 -c32, SECONDS, 30) of
# two callgate binaries, A then B, ROUNDS times (1), against one private nginx stub on loopback,
# each on a fresh state file: the mean req/s, the first and last five full seconds and their
# ratio, and the last full second over the first (the per-second counts of calls.lua). A long
# run is where a cost that grows with the file shows; interleaving makes the comparison fair on
# a noisy machine. SEED_A / SEED_B: a state file copied in before that arm starts (instead of a
# fresh one), e.g. a file of millions of calls made by bench/bigfile.sh. Needs wrk, nginx, curl,
# python3 (see load.sh).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
A=${1:?usage: bench/drift.sh BINARY_A BINARY_B [ROUNDS] [SECONDS]}
B=${2:?usage: bench/drift.sh BINARY_A BINARY_B [ROUNDS] [SECONDS]}
ROUNDS=${3:-1}; SECS=${4:-30}
T=$(mktemp -d "${TMPDIR:-/tmp}/callgate-drift.XXXXXX")
. "$ROOT/bench/lib.sh"
trap bench_cleanup EXIT
pick_ports
start_stub
sleep 1
run() { # run NAME BIN [SEED]
  local d=$T/cg-$1-$RANDOM
  callgate_dir "$d"
  seed_state "$d" "${3:-}"
  start_callgate "$2" "$d"
  wait_healthy 1200
  local out
  out=$(BENCH_KEY=$BENCH_KEY BENCH_PER_SECOND=1 wrk -t2 -c32 -d"${SECS}s" -s "$BENCH/calls.lua" "http://127.0.0.1:$CG")
  local rps; rps=$(awk '/^Requests\/sec/ {printf "%.0f", $2}' <<<"$out")
  # Full seconds only: the first and last counts are partial.
  awk '$1 == "per-second" { print $3 }' <<<"$out" | sed '1d;$d' | python3 -c '
import sys
name, rps = sys.argv[1], sys.argv[2]
xs = [int(x) for x in sys.stdin.read().split()]
if len(xs) < 10:
    sys.exit(f"{name}: only {len(xs)} full seconds")
first, last = sum(xs[:5]), sum(xs[-5:])
print(f"{name} rps={rps} first5={first} last5={last} last5/first5={last / first:.3f} last/first={xs[-1] / xs[0]:.3f}")
' "$1" "$rps"
  kill "$P"; wait "$P" 2>/dev/null || true
}
for _ in $(seq "$ROUNDS"); do run A "$A" "${SEED_A:-}"; run B "$B" "${SEED_B:-}"; rm -rf "$T"/cg-*; done
