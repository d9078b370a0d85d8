# bench/lib.sh: sourced by the per-process benchmark tools (ab.sh, threads.sh, callgrind.sh,
# walpages.sh). One private nginx stub and one callgate on loopback, each callgate on a fresh
# state file, with the configuration of bench/load.sh (callgate.toml.in, one tenant with acme's
# full policy but no limits, from make_policies.py).
# The caller sets ROOT (the repo) and T (a temp dir), and traps EXIT with bench_cleanup: it stops
# every process in PIDS and removes T (unless KEEP=1).

BENCH=$ROOT/bench
BENCH_KEY=cg_bench_key_for_load_tests_only
PIDS=()

bench_cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $T"; else rm -rf "$T"; fi
}

# Three free loopback ports, into STUB, CG and ADMIN.
pick_ports() {
  read -r STUB CG ADMIN <<<"$(python3 -c 'import socket
s=[socket.socket() for _ in range(3)]
[x.bind(("127.0.0.1",0)) for x in s]
print(" ".join(str(x.getsockname()[1]) for x in s))')"
}

# Start the nginx stub on $STUB (its PID in STUB_PID and PIDS) and write the tenant's policies
# to $T/policies.
start_stub() {
  mkdir -p "$T/stub"
  sed -e "s|@DIR@|$T/stub|g" -e "s|@PORT@|$STUB|g" -e "s|@WORKERS@|auto|g" "$BENCH/nginx-stub.conf.in" > "$T/stub/nginx.conf"
  nginx -p "$T/stub/" -c "$T/stub/nginx.conf" -e "$T/stub/error.log" -g 'daemon off;' & STUB_PID=$!
  PIDS+=("$STUB_PID")
  python3 "$BENCH/make_policies.py" "$ROOT/policies" "$T/policies" 1 "$BENCH_KEY" >/dev/null
}

# callgate_dir DIR: a callgate directory (config.toml, secrets, an empty state/) on $CG and $ADMIN.
callgate_dir() {
  local d=$1
  mkdir -p "$d/state"
  echo x > "$d/upstream_api_key"; echo x > "$d/redaction_hash_key"; echo tok > "$d/admin_token"
  sed -e "s|@PORT@|$CG|g" -e "s|@STUB_PORT@|$STUB|g" -e "s|@ADMIN_PORT@|$ADMIN|g" -e "s|@POLICIES@|$T/policies|g" \
      -e "s|@LEASE_GRACE@|3600|g" "$BENCH/callgate.toml.in" > "$d/config.toml"
}

# seed_state DIR FILE: start DIR's callgate on a copy of the state file FILE (none: a fresh one),
# flushed to disk first so that the copy's writeback does not share the measured run.
seed_state() {
  if [ -n "${2:-}" ]; then cp "$2" "$1/state/callgate.db"; sync; fi
}

# Wait (at most TRIES x 0.05 s, default 200) until callgate on $CG answers /healthz.
wait_healthy() {
  for _ in $(seq "${1:-200}"); do
    curl -s -o /dev/null --max-time 1 "http://127.0.0.1:$CG/healthz" && return 0
    sleep 0.05
  done
  echo "callgate did not answer on port $CG" >&2
  return 1
}

# wrk ARGS... against callgate with the benchmark's request (bench/calls.lua).
load() { BENCH_KEY=$BENCH_KEY BENCH_PER_SECOND=0 wrk "$@" -s "$BENCH/calls.lua" "http://127.0.0.1:$CG"; }

# The usual start: ports, the stub, and a callgate directory in d=$T/cg.
prepare() {
  pick_ports
  start_stub
  d=$T/cg
  callgate_dir "$d"
}

# start_callgate BIN DIR [WRAPPER...]: callgate on DIR's config (its PID in P and PIDS), output in
# DIR/log; WRAPPER (e.g. valgrind and its options) runs it.
start_callgate() {
  local bin=$1 dir=$2; shift 2
  env -u RUST_LOG "$@" "$bin" serve --config "$dir/config.toml" > "$dir/log" 2>&1 & P=$!
  PIDS+=("$P")
}

# wrk's threads for $CONNS connections: one for one, else two.
wrk_threads() { echo $(( ${CONNS:-32} < 2 ? 1 : 2 )); }
