#!/usr/bin/env bash
# bench/load.sh: load benchmark of callgate against plain nginx, on loopback only.
#
# Four targets get the same request (bench/calls.lua: POST /v1/calls with a tenant key, the
# README's body with an e-mail in metadata):
#   stub      a private nginx answering POST /v1/calls with a queued call (nginx-stub.conf.in)
#   nginx     a second private nginx, plain proxy_pass to the stub (nginx-proxy.conf.in): the
#             reverse proxy a platform team would otherwise run
#   callgate  $CALLGATE_BIN forwarding to the stub (callgate.toml.in), one tenant "bench" with
#             acme's full policy but no [limits] and no [budget] (make_policies.py)
# and, at saturation only, the floor of callgate's own stack:
#   bare      $BARE_BIN (examples/bare_proxy.rs); skipped with a note when it is not built
#             (cargo build --release --example bare_proxy) or does not answer
#
# What it measures:
#   1. saturation: wrk -t2 -c32 -d$DURATION --latency, req/s, p50, p99, for each target
#   2. drift: a $LONG_DURATION s run with per-second counts (calls.lua, BENCH_PER_SECOND=1);
#      first and last full second and their ratio (target: last within 10% of first), for
#      nginx and callgate
#   3. one connection: wrk -t1 -c1 -d$LAT_DURATION --latency, p50/p99, callgate minus nginx
#   4. CPU seconds per 10 000 requests (utime+stime, /proc/PID/stat) during the saturation run:
#      callgate's own process, the proxy nginx's processes, the stub nginx's processes (and the bare
#      proxy's, in its own run)
#   5. peak RSS (VmHWM) of callgate
#   6. $TENANTS tenants: time of `callgate check`, time from `serve` to the first answer, RSS
#      after start, saturation with one of the tenants
#   7. $INFLIGHT calls in flight (the stub never sends events, so every admitted call stays
#      live): fill to that many 200s, then saturation, one-connection latency, peak RSS
#   8. callgate on Redis (state.backend = "redis"): a private redis-server (append-only file,
#      appendfsync everysec) in the temp dir; saturation and one connection, against callgate
#      on SQLite in the same run (target: at least 0.5x)
# Every callgate measurement starts a fresh callgate with an empty state file, so calls left in
# flight by one measurement do not weigh on the next (7 measures that weight on purpose).
#
# Run (from anywhere; nothing leaves 127.0.0.1, every wait and load run is bounded in time):
#   bash bench/load.sh                                   # full run, target/release/callgate
#   CALLGATE_BIN=/path/to/callgate bash bench/load.sh
#   QUICK=1 bash bench/load.sh                           # smoke run: 2 s runs, 200 tenants,
#                                                        # 5000 in flight
# Knobs (environment): CALLGATE_BIN, BARE_BIN, DURATION (10), LONG_DURATION (30), LAT_DURATION (5),
#   TENANTS (10000), INFLIGHT (100000), FILL_TIMEOUT (1200 s, cap on filling calls in flight),
#   NGINX_WORKERS (auto), LEASE_GRACE (3600 s), KEEP=1 (keep the temp dir), QUICK=1.
# Needs wrk, nginx and redis-server (Debian packages; installed with apt-get when missing and
# run as root),
# curl and python3. The system nginx is never touched: both nginx instances run in the
# foreground with their own prefix, config, pid and logs in the temp dir.
# Prints the raw wrk output as it goes and a Markdown summary at the end.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH="$ROOT/bench"

if [[ "${QUICK:-0}" == 1 ]]; then
    : "${DURATION:=2}" "${LONG_DURATION:=4}" "${LAT_DURATION:=2}" "${TENANTS:=200}" "${INFLIGHT:=5000}"
fi
DURATION=${DURATION:-10}
LONG_DURATION=${LONG_DURATION:-30}   # at least 3: the first and last seconds are partial
LAT_DURATION=${LAT_DURATION:-5}
TENANTS=${TENANTS:-10000}
INFLIGHT=${INFLIGHT:-100000}
FILL_TIMEOUT=${FILL_TIMEOUT:-1200}
FILL_CHUNK=10                        # seconds per wrk run while filling calls in flight
NGINX_WORKERS=${NGINX_WORKERS:-auto}
LEASE_GRACE=${LEASE_GRACE:-3600}
STARTUP_TIMEOUT=120                  # seconds for a callgate or nginx to answer
# ... and for callgate with $TENANTS tenants (and for `callgate check` on them).
TENANTS_TIMEOUT=${TENANTS_TIMEOUT:-$((TENANTS / 10 > 120 ? TENANTS / 10 : 120))}
# A callgate (or check) whose RSS passes this is stopped, so that the benchmark cannot run the
# machine out of memory; default: 60% of MemAvailable at start.
MEM_LIMIT_MIB=${MEM_LIMIT_MIB:-$(awk '/^MemAvailable/ { printf "%d", $2 * 0.6 / 1024 }' /proc/meminfo)}
KEEP=${KEEP:-0}
CALLGATE_BIN=${CALLGATE_BIN:-target/release/callgate}
[[ "$CALLGATE_BIN" == /* ]] || CALLGATE_BIN="$ROOT/$CALLGATE_BIN"
BARE_BIN=${BARE_BIN:-target/release/examples/bare_proxy}
[[ "$BARE_BIN" == /* ]] || BARE_BIN="$ROOT/$BARE_BIN"

BENCH_KEY="cg_bench_key_for_load_tests_only"
WRK_TIMEOUT=10s                      # wrk's default 2 s would count slow answers as errors
CLK_TCK=$(getconf CLK_TCK)

# ---------------------------------------------------------------------------------------------
# Helpers

say() { printf '\n== %s\n' "$*"; }
note() { printf '   %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
# calc EXPR [DECIMALS]: floating-point arithmetic through awk.
calc() { awk "BEGIN { printf \"%.${2:-2}f\", $1 }"; }

# Find free loopback ports, all at once so they differ.
free_ports() {
    python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

# utime+stime in clock ticks, summed over the given pids (threads included).
cpu_ticks() {
    local total=0 pid t
    for pid in "$@"; do
        t=$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | awk '{ print $12 + $13 }') || t=0
        total=$((total + ${t:-0}))
    done
    echo "$total"
}

# An nginx instance's pids: the master and its workers.
nginx_pids() { echo "$1 $(pgrep -P "$1" | tr '\n' ' ' || true)"; }

# A /proc/PID/status field (VmRSS, VmHWM) in MiB, summed over pids.
mem_mib() {
    local field=$1 kb=0 pid v
    shift
    for pid in "$@"; do
        v=$(awk -v f="$field:" '$1 == f { print $2 }' "/proc/$pid/status" 2>/dev/null || true)
        kb=$((kb + ${v:-0}))
    done
    calc "$kb / 1024" 1
}

# rss_mib PID: VmRSS in whole MiB (0 once the process is gone).
rss_mib() { awk '$1 == "VmRSS:" { printf "%d", $2 / 1024; f = 1 } END { if (!f) print 0 }' "/proc/$1/status" 2>/dev/null || echo 0; }

# guarded PID TIMEOUT_S: wait for a background process to end, stopping it when it runs past
# TIMEOUT_S or past MEM_LIMIT_MIB. Returns its exit status; GUARD_PEAK is its largest RSS seen.
guarded() {
    local pid=$1 deadline=$(($(date +%s) + $2)) rss rc=0
    GUARD_PEAK=0
    while kill -0 "$pid" 2>/dev/null; do
        rss=$(rss_mib "$pid")
        ((rss <= GUARD_PEAK)) || GUARD_PEAK=$rss
        if ((rss > MEM_LIMIT_MIB)) || (($(date +%s) >= deadline)); then
            note "WARNING: stopping pid $pid: RSS $rss MiB (limit $MEM_LIMIT_MIB), time limit $2 s"
            stop_pid "$pid"
            return 124
        fi
        sleep 0.1
    done
    wait "$pid" || rc=$?
    return "$rc"
}

# poll_until TIMEOUT_S COMMAND...: poll every 20 ms until COMMAND succeeds; returns 1 after
# TIMEOUT_S seconds, or at once when $POLL_PID (if set) has exited.
poll_until() {
    local deadline=$(($(date +%s) + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        [[ -z "${POLL_PID:-}" ]] || kill -0 "$POLL_PID" 2>/dev/null || return 1
        (($(date +%s) < deadline)) || return 1
        sleep 0.02
    done
}

# wait_until DESCRIPTION TIMEOUT_S COMMAND...: poll_until, or stop the run.
wait_until() {
    local what=$1 timeout=$2
    shift 2
    poll_until "$timeout" "$@" || die "$what: nothing after ${timeout}s"
}

# http_status METHOD URL [KEY]: the status code of one request with the bench body.
http_status() {
    local args=(-s -o /dev/null -w '%{http_code}' --max-time 5 -X "$1" "$2")
    if [[ "$1" == POST ]]; then
        args+=(-H "Content-Type: application/json" -d "$BODY")
    fi
    [[ -n "${3:-}" ]] && args+=(-H "Authorization: Bearer $3")
    curl "${args[@]}" || true
}
answers_200() { [[ "$(http_status POST "$1")" == 200 ]]; }
BODY='{"phone_number": "+14155551234", "agent_id": "agent_abc123", "metadata": {"customer_id": "cust_456", "campaign": "follow_up", "email": "ann@example.com"}}'

# Latency in wrk's units (612.00us, 1.23ms, 2.01s) to milliseconds.
to_ms() {
    awk -v v="$1" 'BEGIN {
        if (v ~ /us$/) printf "%.3f", v / 1000
        else if (v ~ /ms$/) printf "%.3f", v + 0
        else if (v ~ /m$/) printf "%.3f", v * 60000
        else if (v ~ /s$/) printf "%.3f", v * 1000
        else printf "nan" }'
}

# run_wrk NAME THREADS CONNS SECONDS URL KEY [per-second]: runs wrk, prints its output and sets
# W_RPS, W_REQS, W_NON2XX, W_ERRORS, W_P50, W_P99 (ms), W_FIRST, W_LAST (full seconds),
# W_FIRST5, W_LAST5 (mean of the first and last five full seconds; fewer in a short run).
run_wrk() {
    local name=$1 threads=$2 conns=$3 secs=$4 url=$5 key=$6 per_second=${7:-} out
    out="$TMP/wrk-$name.txt"
    BENCH_KEY="$key" BENCH_PER_SECOND=$([[ "$per_second" == per-second ]] && echo 1 || echo 0) \
        timeout $((secs + 60)) wrk -t"$threads" -c"$conns" -d"${secs}s" --timeout "$WRK_TIMEOUT" \
        --latency -s "$BENCH/calls.lua" "$url" >"$out" 2>&1 || {
        cat "$out"
        die "wrk $name failed"
    }
    grep -v '^per-second ' "$out" | sed 's/^/   | /'
    W_RPS=$(awk '/^Requests\/sec:/ { printf "%.0f", $2 }' "$out")
    W_REQS=$(awk '/requests in/ { print $1 }' "$out")
    W_NON2XX=$(awk '/Non-2xx or 3xx responses:/ { print $NF }' "$out")
    W_NON2XX=${W_NON2XX:-0}
    W_ERRORS=$(awk '/Socket errors:/ { gsub(",", ""); print $4 + $6 + $8 + $10 }' "$out")
    W_ERRORS=${W_ERRORS:-0}
    W_P50=$(to_ms "$(awk '$1 == "50%" { print $2 }' "$out")")
    W_P99=$(to_ms "$(awk '$1 == "99%" { print $2 }' "$out")")
    W_FIRST="" W_LAST="" W_FIRST5="" W_LAST5=""
    if [[ "$per_second" == per-second ]]; then
        # Drop the first and last buckets (partial seconds); keep the full ones in between.
        local full
        full=$(awk '$1 == "per-second" { print $3 }' "$out" | sed '1d;$d')
        [[ -n "$full" ]] || die "wrk $name: no full second in the per-second counts"
        W_FIRST=$(head -1 <<<"$full")
        W_LAST=$(tail -1 <<<"$full")
        # Five seconds at each end, fewer in a short run, so that the two never overlap.
        local k
        k=$(($(wc -l <<<"$full") / 2)); ((k <= 5)) || k=5; ((k >= 1)) || k=1
        W_FIRST5=$(head -"$k" <<<"$full" | awk '{ s += $1; n++ } END { printf "%.0f", s / n }')
        W_LAST5=$(tail -"$k" <<<"$full" | awk '{ s += $1; n++ } END { printf "%.0f", s / n }')
        note "per-second (full seconds): $(tr '\n' ' ' <<<"$full")"
    fi
    if ((W_NON2XX > 0 || W_ERRORS > 0)); then
        note "WARNING: $name: $W_NON2XX non-2xx responses, $W_ERRORS socket errors"
        ODD+=("$name: $W_NON2XX non-2xx responses, $W_ERRORS socket errors")
    fi
}

# Saturation run with CPU accounting: sat NAME URL KEY; sets the W_* and CPU_* (s per 10 000).
sat() {
    local name=$1 url=$2 key=$3 cg0 px0 st0 cg1 px1 st1
    local px_pids st_pids
    read -ra px_pids <<<"$(nginx_pids "$PROXY_PID")"
    read -ra st_pids <<<"$(nginx_pids "$STUB_PID")"
    cg0=$( [[ -n "${CG_PID:-}" ]] && cpu_ticks "$CG_PID" || echo 0)
    px0=$(cpu_ticks "${px_pids[@]}")
    st0=$(cpu_ticks "${st_pids[@]}")
    run_wrk "$name" 2 32 "$DURATION" "$url" "$key"
    cg1=$( [[ -n "${CG_PID:-}" ]] && cpu_ticks "$CG_PID" || echo 0)
    px1=$(cpu_ticks "${px_pids[@]}")
    st1=$(cpu_ticks "${st_pids[@]}")
    local per10k="/ $CLK_TCK / ($W_REQS > 0 ? $W_REQS : 1) * 10000"
    CPU_CG=$(calc "($cg1 - $cg0) $per10k" 3)
    CPU_PROXY=$(calc "($px1 - $px0) $per10k" 3)
    CPU_STUB=$(calc "($st1 - $st0) $per10k" 3)
    note "CPU s per 10 000 requests: callgate $CPU_CG, nginx proxy $CPU_PROXY, nginx stub $CPU_STUB"
}

# ---------------------------------------------------------------------------------------------
# Processes and cleanup

CG_PID="" STUB_PID="" PROXY_PID="" REDIS_PID="" BARE_PID="" TMP=""
ODD=()
# Extra environment for the next start_callgate (e.g. CALLGATE__STATE__BACKEND=redis).
CG_ENV=()

stop_pid() {  # stop_pid PID: TERM, up to 15 s, then KILL; reaps it.
    local pid=$1 i
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 150); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_pid "$CG_PID"
    stop_pid "$PROXY_PID"
    stop_pid "$STUB_PID"
    stop_pid "$REDIS_PID"
    stop_pid "$BARE_PID"
    if [[ -n "$TMP" && -d "$TMP" ]]; then
        if [[ "$KEEP" == 1 ]]; then
            echo "kept $TMP"
        else
            rm -rf "$TMP"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start_nginx NAME TEMPLATE PORT: a foreground nginx with everything in $TMP/nginx-NAME;
# the master's pid in NGINX_STARTED.
start_nginx() {
    local name=$1 template=$2 port=$3 dir="$TMP/nginx-$1"
    mkdir -p "$dir"
    sed -e "s|@DIR@|$dir|g" -e "s|@PORT@|$port|g" -e "s|@STUB_PORT@|$STUB_PORT|g" \
        -e "s|@WORKERS@|$NGINX_WORKERS|g" "$template" >"$dir/nginx.conf"
    nginx -t -q -p "$dir/" -c "$dir/nginx.conf" -e "$dir/error.log" -g 'daemon off;' ||
        die "nginx $name: bad config $dir/nginx.conf"
    nginx -p "$dir/" -c "$dir/nginx.conf" -e "$dir/error.log" -g 'daemon off;' \
        >"$dir/stdout.log" 2>&1 &
    NGINX_STARTED=$!
    wait_until "nginx $name on 127.0.0.1:$port" "$STARTUP_TIMEOUT" \
        answers_200 "http://127.0.0.1:$port/v1/calls"
}

# start_callgate NAME POLICIES READY_KEY [TIMEOUT_S]: a fresh callgate (empty state) in
# $TMP/cg-NAME; waits until an authenticated GET /v1/calls with READY_KEY answers 200. Sets
# CG_PID, CG_DIR and CG_STARTUP (seconds from exec to that first answer); on failure (exit,
# timeout, RSS past MEM_LIMIT_MIB) stops it, sets CG_FAIL and returns 1.
start_callgate() {
    local name=$1 policies=$2 key=$3 timeout=${4:-$STARTUP_TIMEOUT} t0 deadline rss
    CG_DIR="$TMP/cg-$name" CG_FAIL=""
    mkdir -p "$CG_DIR/state"
    printf 'bench-upstream-key\n' >"$CG_DIR/upstream_api_key"
    printf 'bench-redaction-hash-key\n' >"$CG_DIR/redaction_hash_key"
    printf '%s\n' "$ADMIN_TOKEN" >"$CG_DIR/admin_token"
    sed -e "s|@PORT@|$CG_PORT|g" -e "s|@STUB_PORT@|$STUB_PORT|g" -e "s|@ADMIN_PORT@|$ADMIN_PORT|g" \
        -e "s|@POLICIES@|$policies|g" -e "s|@LEASE_GRACE@|$LEASE_GRACE|g" \
        "$BENCH/callgate.toml.in" >"$CG_DIR/config.toml"
    t0=$(now)
    env -u RUST_LOG "${CG_ENV[@]}" "$CALLGATE_BIN" serve --config "$CG_DIR/config.toml" >"$CG_DIR/callgate.log" 2>&1 &
    CG_PID=$!
    deadline=$(($(date +%s) + timeout))
    until [[ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 \
        -H "Authorization: Bearer $key" "$CG_URL/v1/calls" || true)" == 200 ]]; do
        if ! kill -0 "$CG_PID" 2>/dev/null; then
            tail -20 "$CG_DIR/callgate.log" | sed 's/^/   | /'
            CG_FAIL="callgate $name exited during start-up"
        elif (($(date +%s) >= deadline)); then
            CG_FAIL="callgate $name: no answer after ${timeout}s"
        elif rss=$(rss_mib "$CG_PID") && ((rss > MEM_LIMIT_MIB)); then
            CG_FAIL="callgate $name: RSS $rss MiB passed MEM_LIMIT_MIB=$MEM_LIMIT_MIB during start-up"
        fi
        if [[ -n "$CG_FAIL" ]]; then
            stop_pid "$CG_PID"
            CG_PID=""
            note "WARNING: $CG_FAIL"
            ODD+=("$CG_FAIL")
            return 1
        fi
        sleep 0.02
    done
    CG_STARTUP=$(calc "$(now) - $t0" 3)
}

# stop_callgate: prints its peak RSS (sets CG_HWM, MiB) and what it logged, then stops it.
stop_callgate() {
    CG_HWM=$(mem_mib VmHWM "$CG_PID")
    note "callgate peak RSS (VmHWM): $CG_HWM MiB, now $(mem_mib VmRSS "$CG_PID") MiB"
    stop_pid "$CG_PID"
    CG_PID=""
    local lines
    lines=$(wc -l <"$CG_DIR/callgate.log")
    if ((lines > 0)); then
        note "callgate logged $lines line(s) (level warn and above); the first 5 distinct:"
        sed -E 's/"timestamp":"[^"]*",?//; s/"(request_id|trace_id|call_id)":"[^"]*"/"\1":…/g' \
            "$CG_DIR/callgate.log" | sort | uniq -c | sort -rn | head -5 | cut -c1-400 | sed 's/^/   | /' || true
        ODD+=("callgate $(basename "$CG_DIR"): $lines log line(s), see above")
    fi
}

# live_slots TENANT: the tenant's live slots from the admin API.
live_slots() {
    curl -s --max-time 10 -H "Authorization: Bearer $ADMIN_TOKEN" \
        "http://127.0.0.1:$ADMIN_PORT/admin/tenants/$1/usage" |
        python3 -c 'import json, sys; print(json.load(sys.stdin).get("slots", "?"))' 2>/dev/null || echo "?"
}

# ---------------------------------------------------------------------------------------------
# Install check and machine

missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v nginx >/dev/null || missing+=(nginx)
command -v redis-server >/dev/null || missing+=(redis-server)
if ((${#missing[@]})); then
    if [[ "$(id -u)" == 0 ]]; then
        echo "installing ${missing[*]} (Debian packages)"
        apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
    else
        die "missing ${missing[*]}: apt-get install ${missing[*]} (as root)"
    fi
fi
for tool in curl python3 timeout; do
    command -v "$tool" >/dev/null || die "missing $tool"
done
[[ -x "$CALLGATE_BIN" ]] || die "no callgate binary at $CALLGATE_BIN (set CALLGATE_BIN)"
((LONG_DURATION >= 3)) || die "LONG_DURATION must be at least 3 (first and last seconds are partial)"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/callgate-bench.XXXXXX")
read -r STUB_PORT PROXY_PORT CG_PORT ADMIN_PORT REDIS_PORT BARE_PORT <<<"$(free_ports 6)"
ADMIN_TOKEN="bench-admin-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
STUB_URL="http://127.0.0.1:$STUB_PORT"
PROXY_URL="http://127.0.0.1:$PROXY_PORT"
CG_URL="http://127.0.0.1:$CG_PORT"

M_CPU=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
M_NPROC=$(nproc)
M_MEM=$(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)
M_KERNEL=$(uname -sr)
M_NGINX=$(nginx -v 2>&1 | sed 's/^nginx version: //')
M_REDIS=$(redis-server --version | awk '{ print $3 }' | sed 's/^v=//')
M_WRK=$(wrk -v 2>&1 | head -1 | awk '{ print $1, $2 }' || true)
M_FS=$(df -PT "$TMP" | awk 'NR == 2 { print $2 " on " $1 }')
M_BIN="$CALLGATE_BIN ($(du -h "$CALLGATE_BIN" | cut -f1), sha256 $(sha256sum "$CALLGATE_BIN" | cut -c1-12), built $(date -r "$CALLGATE_BIN" '+%F %T'))"
M_REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "?")
M_BUSY=$(pgrep -x rustc >/dev/null || pgrep -x cargo >/dev/null && echo "yes: a compiler was running at the start" || echo "no")

RUN_START=$(date +%s)
say "callgate load benchmark, $(date '+%F %T %Z')"
note "machine: $M_CPU, $M_NPROC CPUs, $M_MEM, $M_KERNEL; state on $M_FS"
note "tools: nginx $M_NGINX (workers: $NGINX_WORKERS), $M_WRK"
note "binary: $M_BIN; repo HEAD at start: $M_REV (not necessarily what the binary was built from)"
note "knobs: DURATION=$DURATION LONG_DURATION=$LONG_DURATION LAT_DURATION=$LAT_DURATION TENANTS=$TENANTS INFLIGHT=$INFLIGHT QUICK=${QUICK:-0}"
note "ports: stub $STUB_PORT, nginx proxy $PROXY_PORT, callgate $CG_PORT (admin $ADMIN_PORT), bare proxy $BARE_PORT; temp dir $TMP"
note "compiler busy: $M_BUSY"

# ---------------------------------------------------------------------------------------------
# Set-up: the two nginx instances, the policies, one callgate; one request through each.

say "set-up"
start_nginx stub "$BENCH/nginx-stub.conf.in" "$STUB_PORT"
STUB_PID=$NGINX_STARTED
start_nginx proxy "$BENCH/nginx-proxy.conf.in" "$PROXY_PORT"
PROXY_PID=$NGINX_STARTED
note "stub and nginx proxy answer POST /v1/calls with 200"
curl -s --max-time 5 "$STUB_URL/v1/calls/call_abc" | sed 's/^/   GET stub \/v1\/calls\/call_abc: /'
echo

python3 "$BENCH/make_policies.py" "$ROOT/policies" "$TMP/policies" 1 "$BENCH_KEY"
sed -e "s|@PORT@|$CG_PORT|g" -e "s|@STUB_PORT@|$STUB_PORT|g" -e "s|@ADMIN_PORT@|$ADMIN_PORT|g" \
    -e "s|@POLICIES@|$TMP/policies|g" -e "s|@LEASE_GRACE@|$LEASE_GRACE|g" \
    "$BENCH/callgate.toml.in" >"$TMP/check.toml"
printf 'x\n' >"$TMP/upstream_api_key"
printf 'x\n' >"$TMP/redaction_hash_key"
printf 'x\n' >"$TMP/admin_token"
"$CALLGATE_BIN" check --config "$TMP/check.toml" 2>&1 | sed 's/^/   check: /'
"$CALLGATE_BIN" check --config "$TMP/check.toml" >/dev/null 2>&1 || die "callgate check failed"

start_callgate sat "$TMP/policies" "$BENCH_KEY" || die "$CG_FAIL"
note "callgate answered after ${CG_STARTUP}s"
first=$(curl -s --max-time 5 -w '\n%{http_code}' -X POST "$CG_URL/v1/calls" \
    -H "Authorization: Bearer $BENCH_KEY" -H "Content-Type: application/json" -d "$BODY")
note "one POST through callgate: $(tail -1 <<<"$first") $(head -1 <<<"$first")"
[[ "$(tail -1 <<<"$first")" == 200 ]] || die "callgate does not answer the bench request with 200"

# ---------------------------------------------------------------------------------------------
# 1 and 4: saturation, with CPU per 10 000 requests

say "1. saturation: wrk -t2 -c32 -d${DURATION}s --latency"
note "stub (direct)"
sat stub-sat "$STUB_URL" "$BENCH_KEY"
S_RPS=$W_RPS S_P50=$W_P50 S_P99=$W_P99 S_BAD="$W_NON2XX/$W_ERRORS" S_CPU=$CPU_STUB
sleep 1
note "nginx proxy_pass"
sat nginx-sat "$PROXY_URL" "$BENCH_KEY"
N_RPS=$W_RPS N_P50=$W_P50 N_P99=$W_P99 N_BAD="$W_NON2XX/$W_ERRORS" N_CPU=$CPU_PROXY
sleep 1
note "bare proxy, the floor of callgate's stack"
B_RPS="" B_P50="" B_P99="" B_BAD="" B_CPU="" B_RATIO="" B_SHARE=""
B_NOTE="not built (cargo build --release --example bare_proxy, or set BARE_BIN)"
bare_up() {  # within STARTUP_TIMEOUT, like the other targets; gives up at once if it exited
    POLL_PID=$BARE_PID poll_until "$STARTUP_TIMEOUT" answers_200 "http://127.0.0.1:$BARE_PORT/v1/calls"
}
if [[ -x "$BARE_BIN" ]]; then
    note "$BARE_BIN ($(du -h "$BARE_BIN" | cut -f1), built $(date -r "$BARE_BIN" '+%F %T'))"
    "$BARE_BIN" "127.0.0.1:$BARE_PORT" "$STUB_URL" >"$TMP/bare.log" 2>&1 &
    BARE_PID=$!
fi
if [[ -n "$BARE_PID" ]] && ! bare_up; then
    B_NOTE="did not answer POST /v1/calls with 200: $(tail -3 "$TMP/bare.log" | tr '\n' ' ')"
    ODD+=("bare proxy: $B_NOTE")
    stop_pid "$BARE_PID"
    BARE_PID=""
fi
if [[ -n "$BARE_PID" ]]; then
    b0=$(cpu_ticks "$BARE_PID")
    run_wrk bare-sat 2 32 "$DURATION" "http://127.0.0.1:$BARE_PORT" "$BENCH_KEY"
    B_CPU=$(calc "($(cpu_ticks "$BARE_PID") - $b0) / $CLK_TCK / ($W_REQS > 0 ? $W_REQS : 1) * 10000" 3)
    B_RPS=$W_RPS B_P50=$W_P50 B_P99=$W_P99 B_BAD="$W_NON2XX/$W_ERRORS"
    B_RATIO=$(calc "$B_RPS / $N_RPS" 2)
    note "CPU s per 10 000 requests: bare proxy $B_CPU"
    stop_pid "$BARE_PID"
    BARE_PID=""
    sleep 1
else
    note "skipped: $B_NOTE"
fi
note "callgate"
sat callgate-sat "$CG_URL" "$BENCH_KEY"
C_RPS=$W_RPS C_P50=$W_P50 C_P99=$W_P99 C_BAD="$W_NON2XX/$W_ERRORS" C_CPU=$CPU_CG
C_REQS=$W_REQS
stop_callgate
C_HWM_SAT=$CG_HWM

# ---------------------------------------------------------------------------------------------
# 8: callgate on Redis, in the same run as callgate on SQLite above

say "8. callgate on Redis (redis-server $M_REDIS, appendonly yes, appendfsync everysec)"
mkdir -p "$TMP/redis"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$TMP/redis" --appendonly yes \
    --appendfsync everysec --save "" >"$TMP/redis/redis.log" 2>&1 &
REDIS_PID=$!
wait_until "redis-server on 127.0.0.1:$REDIS_PORT" "$STARTUP_TIMEOUT" \
    bash -c "exec 3<>/dev/tcp/127.0.0.1/$REDIS_PORT"
CG_ENV=(CALLGATE__STATE__BACKEND=redis "CALLGATE__STATE__REDIS_URL=redis://127.0.0.1:$REDIS_PORT/")
start_callgate redis "$TMP/policies" "$BENCH_KEY" || die "$CG_FAIL"
r0=$(cpu_ticks "$REDIS_PID")
sat callgate-redis-sat "$CG_URL" "$BENCH_KEY"
R_RPS=$W_RPS R_P50=$W_P50 R_P99=$W_P99 R_BAD="$W_NON2XX/$W_ERRORS" R_CPU=$CPU_CG
R_CPU_REDIS=$(calc "($(cpu_ticks "$REDIS_PID") - $r0) / $CLK_TCK / ($W_REQS > 0 ? $W_REQS : 1) * 10000" 3)
R_SLOTS=$(live_slots bench)
sleep 1
run_wrk callgate-redis-lat 1 1 "$LAT_DURATION" "$CG_URL" "$BENCH_KEY"
R1_P50=$W_P50 R1_P99=$W_P99 R1_RPS=$W_RPS
stop_callgate
R_HWM=$CG_HWM
R_REDIS_RSS=$(mem_mib VmRSS "$REDIS_PID")
CG_ENV=()
stop_pid "$REDIS_PID"
REDIS_PID=""
R_RATIO=$(calc "$R_RPS / $C_RPS" 2)
note "callgate on Redis / on SQLite: $R_RATIO ($R_RPS vs $C_RPS req/s); redis-server CPU s per 10 000 requests $R_CPU_REDIS; live slots after the run $R_SLOTS"

# ---------------------------------------------------------------------------------------------
# 2: first and last second of a long run

say "2. drift: ${LONG_DURATION}s runs, wrk -t2 -c32, per-second counts"
note "nginx proxy_pass"
run_wrk nginx-long 2 32 "$LONG_DURATION" "$PROXY_URL" "$BENCH_KEY" per-second
NL_FIRST=$W_FIRST NL_LAST=$W_LAST NL_FIRST5=$W_FIRST5 NL_LAST5=$W_LAST5 NL_RPS=$W_RPS
sleep 1
note "callgate (fresh)"
start_callgate long "$TMP/policies" "$BENCH_KEY" || die "$CG_FAIL"
run_wrk callgate-long 2 32 "$LONG_DURATION" "$CG_URL" "$BENCH_KEY" per-second
CL_FIRST=$W_FIRST CL_LAST=$W_LAST CL_FIRST5=$W_FIRST5 CL_LAST5=$W_LAST5 CL_RPS=$W_RPS CL_REQS=$W_REQS
note "callgate live calls after the run: $(live_slots bench)"
stop_callgate
C_HWM_LONG=$CG_HWM
NL_RATIO=$(calc "$NL_LAST / $NL_FIRST" 3)
CL_RATIO=$(calc "$CL_LAST / $CL_FIRST" 3)
note "last/first full second: nginx $NL_RATIO, callgate $CL_RATIO"
# Single seconds swing by ±20% on a noisy VM; five-second means are the steadier witness.
NL_RATIO5=$(calc "$NL_LAST5 / $NL_FIRST5" 3)
CL_RATIO5=$(calc "$CL_LAST5 / $CL_FIRST5" 3)
note "last/first five full seconds: nginx $NL_RATIO5, callgate $CL_RATIO5"

# ---------------------------------------------------------------------------------------------
# 3: one connection

say "3. one connection: wrk -t1 -c1 -d${LAT_DURATION}s --latency"
note "stub (direct)"
run_wrk stub-lat 1 1 "$LAT_DURATION" "$STUB_URL" "$BENCH_KEY"
S1_P50=$W_P50 S1_P99=$W_P99 S1_RPS=$W_RPS
note "nginx proxy_pass"
run_wrk nginx-lat 1 1 "$LAT_DURATION" "$PROXY_URL" "$BENCH_KEY"
N1_P50=$W_P50 N1_P99=$W_P99 N1_RPS=$W_RPS
note "callgate (fresh)"
start_callgate lat "$TMP/policies" "$BENCH_KEY" || die "$CG_FAIL"
run_wrk callgate-lat 1 1 "$LAT_DURATION" "$CG_URL" "$BENCH_KEY"
C1_P50=$W_P50 C1_P99=$W_P99 C1_RPS=$W_RPS
stop_callgate
ADD_P50=$(calc "$C1_P50 - $N1_P50" 3)
ADD_P99=$(calc "$C1_P99 - $N1_P99" 3)
note "callgate adds p50 ${ADD_P50} ms, p99 ${ADD_P99} ms over nginx at one connection"

read -ra proxy_pids <<<"$(nginx_pids "$PROXY_PID")"
N_RSS=$(mem_mib VmRSS "${proxy_pids[@]}")

# ---------------------------------------------------------------------------------------------
# 6: many tenants

say "6. $TENANTS tenants"
t0=$(now)
python3 "$BENCH/make_policies.py" "$ROOT/policies" "$TMP/policies-many" "$TENANTS" "$BENCH_KEY"
note "wrote $TENANTS tenant files in $(calc "$(now) - $t0" 1)s"
sed -e "s|$TMP/policies|$TMP/policies-many|" "$TMP/check.toml" >"$TMP/check-many.toml"
t0=$(now)
env -u RUST_LOG "$CALLGATE_BIN" check --config "$TMP/check-many.toml" >"$TMP/check-many.out" 2>&1 &
check_rc=0
guarded $! "$TENANTS_TIMEOUT" || check_rc=$?
T_CHECK=$(calc "$(now) - $t0" 2)
T_CHECK_RSS=$GUARD_PEAK
note "callgate check: exit $check_rc in ${T_CHECK}s, peak RSS ~$T_CHECK_RSS MiB; $(grep -c '^warning' "$TMP/check-many.out" || true) warning line(s); $(grep -v '^warning' "$TMP/check-many.out" | cut -c1-160 | head -3 || true)"
((check_rc == 0)) || ODD+=("callgate check on $TENANTS tenants: exit $check_rc")
if ((TENANTS > 1)); then
    T_ID=$(printf 'bench-%05d' $((TENANTS - 1)))
    T_KEY=$(printf '%s-%05d' "$BENCH_KEY" $((TENANTS - 1)))
else
    T_ID=bench T_KEY=$BENCH_KEY
fi
T_STARTUP="n/a" T_RSS="n/a" T_RPS="n/a" T_P50="n/a" T_P99="n/a" T_BAD="n/a" T_CPU="n/a" T_HWM="n/a"
if start_callgate tenants "$TMP/policies-many" "$T_KEY" "$TENANTS_TIMEOUT"; then
    T_STARTUP=$CG_STARTUP
    sleep 1
    T_RSS=$(mem_mib VmRSS "$CG_PID")
    note "serve answered (tenant $T_ID) after ${T_STARTUP}s; RSS 1 s later: $T_RSS MiB"
    sat callgate-tenants-sat "$CG_URL" "$T_KEY"
    T_RPS=$W_RPS T_P50=$W_P50 T_P99=$W_P99 T_BAD="$W_NON2XX/$W_ERRORS" T_CPU=$CPU_CG
    stop_callgate
    T_HWM=$CG_HWM
fi
[[ "$KEEP" == 1 ]] || rm -rf "$TMP/policies-many"   # $TENANTS files; not needed any more

# ---------------------------------------------------------------------------------------------
# 7: many calls in flight

say "7. $INFLIGHT calls in flight (fill with wrk -t2 -c32 runs of up to ${FILL_CHUNK}s, at most ${FILL_TIMEOUT}s)"
start_callgate inflight "$TMP/policies" "$BENCH_KEY" || die "$CG_FAIL"
admitted=0 rate=0 i=0 F_FIRST_RPS="" F_LAST_RPS="" F_BAD=0
fill_start=$(date +%s)
while ((admitted < INFLIGHT)); do
    if (($(date +%s) - fill_start >= FILL_TIMEOUT)); then
        note "WARNING: stopped filling after ${FILL_TIMEOUT}s at $admitted calls"
        ODD+=("fill stopped at $admitted of $INFLIGHT calls after ${FILL_TIMEOUT}s")
        break
    fi
    chunk=2   # the first run only estimates the rate
    if ((rate > 0)); then
        chunk=$(((INFLIGHT - admitted + rate - 1) / rate + 1))
        ((chunk <= FILL_CHUNK)) || chunk=$FILL_CHUNK
    fi
    i=$((i + 1))
    run_wrk "fill-$i" 2 32 "$chunk" "$CG_URL" "$BENCH_KEY" >"$TMP/fill-$i.log"
    ok=$((W_REQS - W_NON2XX))
    F_BAD=$((F_BAD + W_NON2XX + W_ERRORS))
    note "fill $i: $admitted in flight before; ${chunk}s at $W_RPS req/s (p50 $W_P50 ms, p99 $W_P99 ms); $ok 200s, $W_NON2XX non-2xx, $W_ERRORS errors"
    admitted=$((admitted + ok))
    rate=$W_RPS
    [[ -n "$F_FIRST_RPS" ]] || F_FIRST_RPS=$W_RPS
    F_LAST_RPS=$W_RPS
    ((ok > 0)) || die "fill $i admitted nothing"
done
F_TIME=$(($(date +%s) - fill_start))
F_SLOTS=$(live_slots bench)
note "filled: $admitted 200s counted by wrk in ${F_TIME}s; live slots (admin API): $F_SLOTS; RSS $(mem_mib VmRSS "$CG_PID") MiB"
sleep 1
sat callgate-inflight-sat "$CG_URL" "$BENCH_KEY"
I_RPS=$W_RPS I_P50=$W_P50 I_P99=$W_P99 I_BAD="$W_NON2XX/$W_ERRORS" I_CPU=$CPU_CG
sleep 1
run_wrk callgate-inflight-lat 1 1 "$LAT_DURATION" "$CG_URL" "$BENCH_KEY"
I1_P50=$W_P50 I1_P99=$W_P99
I_SLOTS=$(live_slots bench)
note "live slots at the end: $I_SLOTS"
stop_callgate
I_HWM=$CG_HWM

RUN_TIME=$(($(date +%s) - RUN_START))

# ---------------------------------------------------------------------------------------------
# Summary

HEADLINE=$(calc "$C_RPS / $N_RPS" 2)
if [[ -n "$B_RATIO" ]]; then
    B_SHARE=$(calc "$C_RPS / $B_RPS" 2)
    FLOOR="The floor of callgate's stack (examples/bare_proxy.rs) at saturation: $B_RPS req/s
(**${B_RATIO}x nginx**; callgate ${B_SHARE}x it), p50 / p99 $B_P50 / $B_P99 ms, non-2xx / socket
errors $B_BAD, CPU s per 10 000 requests $B_CPU."
else
    FLOOR="The floor of callgate's stack (examples/bare_proxy.rs): $B_NOTE."
fi
cat <<EOF

== Summary (Markdown)

### Machine

| | |
|---|---|
| CPU | $M_CPU, $M_NPROC CPUs (wrk, nginx and callgate share them) |
| memory | $M_MEM |
| kernel | $M_KERNEL |
| state file system | $M_FS (synchronous = "full") |
| nginx | $M_NGINX, worker_processes $NGINX_WORKERS, stub and proxy in separate instances |
| wrk | $M_WRK |
| callgate | $M_BIN |
| compiler running at start | $M_BUSY |
| run | $(date '+%F'), ${RUN_TIME}s in all; DURATION=$DURATION LONG_DURATION=$LONG_DURATION LAT_DURATION=$LAT_DURATION TENANTS=$TENANTS INFLIGHT=$INFLIGHT |

**Headline: callgate / nginx proxy_pass at saturation = $HEADLINE** ($C_RPS vs $N_RPS req/s).

$FLOOR

### One tenant, acme's full policy, no limits

| | stub (direct) | nginx proxy_pass | callgate |
|---|---|---|---|
| saturation req/s (wrk -t2 -c32, ${DURATION}s) | $S_RPS | $N_RPS | $C_RPS |
| saturation p50 / p99 ms | $S_P50 / $S_P99 | $N_P50 / $N_P99 | $C_P50 / $C_P99 |
| non-2xx / socket errors | $S_BAD | $N_BAD | $C_BAD |
| ${LONG_DURATION}s run: mean req/s | | $NL_RPS | $CL_RPS |
| ${LONG_DURATION}s run: first / last full second, req/s | | $NL_FIRST / $NL_LAST | $CL_FIRST / $CL_LAST |
| last / first (target >= 0.90) | | $NL_RATIO | $CL_RATIO |
| ${LONG_DURATION}s run: first / last five full seconds, mean req/s | | $NL_FIRST5 / $NL_LAST5 | $CL_FIRST5 / $CL_LAST5 |
| last five / first five (target >= 0.90) | | $NL_RATIO5 | $CL_RATIO5 |
| one connection req/s (wrk -t1 -c1, ${LAT_DURATION}s) | $S1_RPS | $N1_RPS | $C1_RPS |
| one connection p50 / p99 ms | $S1_P50 / $S1_P99 | $N1_P50 / $N1_P99 | $C1_P50 / $C1_P99 |
| added latency vs nginx p50 / p99 ms | | | $ADD_P50 / $ADD_P99 |
| CPU s per 10 000 requests (own processes only) | $S_CPU | $N_CPU | $C_CPU |
| memory MiB | | $N_RSS (RSS, all processes) | $C_HWM_SAT after saturation ($C_REQS calls), $C_HWM_LONG after the long run ($CL_REQS calls) (VmHWM) |

### callgate on Redis (state.backend = "redis", redis-server $M_REDIS, appendfsync everysec), same run

| | callgate on SQLite (synchronous = "full") | callgate on Redis |
|---|---|---|
| saturation req/s (wrk -t2 -c32, ${DURATION}s) | $C_RPS | $R_RPS (**$R_RATIO x**, target >= 0.5) |
| saturation p50 / p99 ms | $C_P50 / $C_P99 | $R_P50 / $R_P99 |
| non-2xx / socket errors | $C_BAD | $R_BAD |
| one connection req/s, p50 / p99 ms | $C1_RPS, $C1_P50 / $C1_P99 | $R1_RPS, $R1_P50 / $R1_P99 |
| CPU s per 10 000 requests | $C_CPU | $R_CPU callgate + $R_CPU_REDIS redis-server |
| peak RSS (VmHWM) MiB | $C_HWM_SAT | $R_HWM callgate, $R_REDIS_RSS redis-server (RSS) |

### $TENANTS tenants

| | |
|---|---|
| callgate check | ${T_CHECK}s, exit $check_rc, peak RSS ~$T_CHECK_RSS MiB |
| serve: start to first answer | ${T_STARTUP}s |
| RSS after start | $T_RSS MiB (peak $T_HWM MiB after the saturation run) |
| saturation req/s, p50 / p99 ms (tenant $T_ID) | $T_RPS, $T_P50 / $T_P99 (one tenant: $C_RPS, $C_P50 / $C_P99) |
| non-2xx / socket errors | $T_BAD |
| CPU s per 10 000 requests | $T_CPU |

### $INFLIGHT calls in flight

| | |
|---|---|
| filled | $admitted 200s in ${F_TIME}s (live slots: $F_SLOTS); fill rate first / last run: $F_FIRST_RPS / $F_LAST_RPS req/s |
| saturation req/s, p50 / p99 ms | $I_RPS, $I_P50 / $I_P99 (fresh: $C_RPS, $C_P50 / $C_P99) |
| one connection p50 / p99 ms | $I1_P50 / $I1_P99 (fresh: $C1_P50 / $C1_P99) |
| non-2xx / socket errors (fill, saturation) | $F_BAD, $I_BAD |
| CPU s per 10 000 requests | $I_CPU |
| peak RSS (VmHWM) | $I_HWM MiB (live slots at the end: $I_SLOTS) |
EOF
if ((${#ODD[@]})); then
    printf '\n### Odd\n\n'
    printf -- '- %s\n' "${ODD[@]}"
fi
