#!/usr/bin/env bash
# bench/budget.sh [WORK...]: how much work per request a proxy on callgate's stack may do and
# still keep a share of nginx's rate on this machine. One private nginx stub and one nginx
# proxy_pass (as bench/load.sh runs them), and examples/bare_proxy.rs (callgate's stack doing
# nothing) made to spend CPU on each request: WORK is REQ or REQ+SIDE microseconds, REQ on the
# request thread (as callgate's policy stages) and SIDE on a thread of its own that the request
# waits for (as callgate's admission waits for its store's writer thread). Default: 0 5 10 20 40.
# Each round measures nginx, the bare proxy at each WORK (in an order that turns from round to
# round) and nginx again (wrk -t2 -c32 -d${DUR:-8}s, the benchmark's request); ROUNDS (3) rounds.
# Prints req/s per round, the mean, the ratio to nginx's mean in the same rounds, and the bare
# proxy's CPU per request (the work asked for, plus what reading its clock, the cache it
# displaces and a side thread's hand-offs cost).
# Build first: cargo build --release --example bare_proxy (or set BARE_BIN).
# Needs wrk, nginx, curl, python3.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BARE_BIN=${BARE_BIN:-$ROOT/target/release/examples/bare_proxy}
[ -x "$BARE_BIN" ] || { echo "no $BARE_BIN: cargo build --release --example bare_proxy" >&2; exit 2; }
WORK=("$@"); [ ${#WORK[@]} -gt 0 ] || WORK=(0 5 10 20 40)
ROUNDS=${ROUNDS:-3}; DUR=${DUR:-8}
T=$(mktemp -d "${TMPDIR:-/tmp}/callgate-budget.XXXXXX")
. "$ROOT/bench/lib.sh"
trap bench_cleanup EXIT
pick_ports   # STUB, CG (the nginx proxy's port here) and ADMIN (the bare proxy's)
PROXY=$CG; BARE=$ADMIN
start_stub
mkdir -p "$T/proxy"
sed -e "s|@DIR@|$T/proxy|g" -e "s|@PORT@|$PROXY|g" -e "s|@STUB_PORT@|$STUB|g" -e "s|@WORKERS@|auto|g" \
    "$BENCH/nginx-proxy.conf.in" > "$T/proxy/nginx.conf"
nginx -p "$T/proxy/" -c "$T/proxy/nginx.conf" -e "$T/proxy/error.log" -g 'daemon off;' & PIDS+=($!)
answers() { # answers PORT: POST /v1/calls answers 200 within 10 s
  for _ in $(seq 200); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 -X POST -d '{}' "http://127.0.0.1:$1/v1/calls")" = 200 ] && return 0
    sleep 0.05
  done
  echo "nothing answers 200 on port $1" >&2; return 1
}
answers "$STUB"; answers "$PROXY"
# rate PORT: wrk at saturation; prints "req/s requests"
rate() {
  local out
  out=$(BENCH_KEY=$BENCH_KEY BENCH_PER_SECOND=0 wrk -t2 -c32 -d"${DUR}s" -s "$BENCH/calls.lua" "http://127.0.0.1:$1")
  if grep -q "Non-2xx\|Socket errors" <<<"$out"; then echo "wrk saw failures on port $1" >&2; fi
  awk '/^Requests\/sec/ {r=$2} /requests in/ {n=$1} END {printf "%.0f %d\n", r, n}' <<<"$out"
}
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
declare -A SUM CPU
NG=0
for round in $(seq "$ROUNDS"); do
  # nginx at the start and at the end of each round, and the amounts of work in an order that
  # turns each round, so that no amount is always measured furthest from nginx's figures.
  read -r r _ <<<"$(rate "$PROXY")"; NG=$((NG + r)); line="round $round: nginx $r"
  k=$(( (round - 1) % ${#WORK[@]} ))
  for w in "${WORK[@]:k}" "${WORK[@]:0:k}"; do
    "$BARE_BIN" "127.0.0.1:$BARE" "http://127.0.0.1:$STUB" "$w" > "$T/bare.log" 2>&1 & B=$!
    PIDS+=("$B")
    answers "$BARE"
    t0=$(ticks "$B"); read -r r n <<<"$(rate "$BARE")"; t1=$(ticks "$B")
    kill "$B"; wait "$B" 2>/dev/null || true
    [ "${n:-0}" -gt 0 ] || { echo "wrk completed no request through the bare proxy ($w); see $T/bare.log" >&2; exit 1; }
    SUM[$w]=$(( ${SUM[$w]:-0} + r ))
    CPU[$w]=$(awk -v a="${CPU[$w]:-0}" -v t="$((t1 - t0))" -v n="$n" -v hz="$(getconf CLK_TCK)" 'BEGIN {print a + t / hz / n * 1e6}')
    line="$line, bare+${w}us $r"
  done
  read -r r _ <<<"$(rate "$PROXY")"; NG=$((NG + r)); line="$line, nginx $r"
  echo "$line"
done
NG=$((NG / 2))  # two nginx runs a round: NG / ROUNDS is their mean
echo
echo "| work per request (us: request thread + side thread) | bare proxy req/s (mean of $ROUNDS) | ratio to nginx | bare proxy CPU per request (us) |"
echo "|---|---|---|---|"
echo "| nginx proxy_pass | $((NG / ROUNDS)) | 1.00 | |"
for w in "${WORK[@]}"; do
  awk -v w="$w" -v s="${SUM[$w]}" -v ng="$NG" -v c="${CPU[$w]}" -v n="$ROUNDS" \
    'BEGIN {printf "| %s | %.0f | %.2f | %.1f |\n", w, s / n, s / ng, c / n}'
done
