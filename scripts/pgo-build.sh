#!/usr/bin/env bash
# scripts/pgo-build.sh: build callgate with profile-guided optimisation (PGO), for production.
#
#   bash scripts/pgo-build.sh        # the binary: target/pgo/callgate
#
# 1. builds an instrumented callgate (target/pgo/gen; `--target` the host, so that build scripts
#    and proc-macros are neither instrumented nor in the profile);
# 2. trains it: a private nginx stub as the upstream and callgate on loopback, both as
#    bench/load.sh starts them, then wrk with bench/pgo-mix.lua (admitted calls, refusals, reads)
#    at 32 connections for TRAIN_SECS (20) and at one connection for 5 s; callgate is stopped
#    with SIGTERM, and writes its profile as it exits;
# 3. merges the profile (llvm-profdata, from rustup's llvm-tools, installed if missing) and
#    builds callgate again with it (target/pgo/use), copied to target/pgo/callgate.
#
# The profile comes from this checkout's code, so the build is always in step with it. Code the
# mix never runs (the Redis backend, limits and budgets, TLS, the relay) the compiler takes for
# cold and optimises for size: it may be slower than in `cargo build --release`. The mix trains
# the SQLite backend's call path. Two release builds: about 15 to 20 minutes on a 2-core
# machine. Measured on one (docs/benchmarks.md, "A profile-guided build"): +12% to +14% requests
# per second at saturation and -13% to -16% CPU per request against `cargo build --release`.
# Needs nginx, wrk, curl and python3 (as bench/load.sh) and rustup (or LLVM_PROFDATA: an
# llvm-profdata of rustc's LLVM major version). It sets RUSTFLAGS, which replaces any rustflags
# of a cargo config; it refuses CARGO_ENCODED_RUSTFLAGS, which would replace its own.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$ROOT/target/pgo
TRAIN_SECS=${TRAIN_SECS:-20}
PATH=$PATH:/usr/sbin  # Debian's nginx, for users whose PATH lacks it
cd "$ROOT"

fail() { echo "pgo-build: $*" >&2; exit 1; }
for tool in nginx wrk curl python3; do
  command -v "$tool" >/dev/null || fail "$tool is needed (see bench/load.sh)"
done
[ -z "${CARGO_ENCODED_RUSTFLAGS:-}" ] || fail "unset CARGO_ENCODED_RUSTFLAGS: it would replace the PGO flags"
llvm_major() { sed -n 's/.*LLVM version:\{0,1\} \([0-9]*\).*/\1/p' | head -1; }
want=$(rustc -vV | llvm_major)
host=$(rustc -vV | sed -n 's/^host: //p')
PROFDATA=${LLVM_PROFDATA:-$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata}
if [ -z "${LLVM_PROFDATA:-}" ] && [ ! -x "$PROFDATA" ]; then
  command -v rustup >/dev/null || fail "no llvm-profdata at $PROFDATA and no rustup to install it; set LLVM_PROFDATA"
  echo "pgo-build: installing rustup's llvm-tools (for llvm-profdata)"
  rustup component add llvm-tools
fi
have=$("$PROFDATA" --version | llvm_major)
[ "$have" = "$want" ] || fail "$PROFDATA is LLVM $have, rustc uses LLVM $want; set LLVM_PROFDATA"

rm -rf "$OUT/profiles"
mkdir -p "$OUT/profiles"
echo "pgo-build: 1/3 the instrumented build (target/pgo/gen)"
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$OUT/profiles" CARGO_TARGET_DIR="$OUT/gen" \
  cargo build --release --locked --target "$host" --bin callgate

echo "pgo-build: 2/3 training"
T=$(mktemp -d "${TMPDIR:-/tmp}/callgate-pgo.XXXXXX")
(
  . "$ROOT/bench/lib.sh"
  trap bench_cleanup EXIT
  prepare
  sleep 1  # the stub's start
  start_callgate "$OUT/gen/$host/release/callgate" "$d" \
    env LLVM_PROFILE_FILE="$OUT/profiles/callgate-%p-%m.profraw"
  wait_healthy 400
  train() { # train SECONDS THREADS CONNECTIONS: a run of the mix, checked
    local out total bad mix
    out=$(BENCH_KEY=$BENCH_KEY wrk -t"$2" -c"$3" -d"$1s" -s "$ROOT/bench/pgo-mix.lua" "http://127.0.0.1:$CG")
    total=$(awk '/requests in/ {print $1}' <<<"$out")
    bad=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
    # The share the mix refuses, as bench/pgo-mix.lua states it: "mix: R of C refused".
    mix=$(awk '/^mix:/ {print $2, $4}' <<<"$out")
    [[ "$mix" =~ ^[0-9]+\ [0-9]+$ ]] || fail "bench/pgo-mix.lua did not state its mix"
    echo "   wrk -t$2 -c$3 -d$1s: $total requests, ${bad:-0} refused (the mix: ${mix/ / of })"
    # Exactly R of every C requests are refused in each wrk thread's cycle: a share off by more
    # than a cycle per thread (and 0.5%) means the mix no longer does what it says (one kind of
    # request answered otherwise moves it by 2%), and the profile would be of the wrong work.
    awk -v t="${total:-0}" -v b="${bad:-0}" -v n="$2" -v r="${mix% *}" -v c="${mix#* }" \
      'BEGIN {d = b - t * r / c; if (d < 0) d = -d; exit !(t > 0 && d <= r * n + t * 0.005)}' || {
      tail -20 "$d/log" >&2
      fail "the mix was refused at an unexpected rate (${bad:-0} of ${total:-0}, not ${mix/ / in })"
    }
  }
  train "$TRAIN_SECS" 2 32
  train 5 1 1
  kill -TERM "$P"
  wait "$P" || fail "the instrumented callgate did not stop cleanly (exit $?)"
)
compgen -G "$OUT/profiles/callgate-*.profraw" >/dev/null || fail "the instrumented callgate wrote no profile"
"$PROFDATA" merge -o "$OUT/callgate.profdata" "$OUT"/profiles/callgate-*.profraw

echo "pgo-build: 3/3 the optimised build (target/pgo/use)"
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$OUT/callgate.profdata" CARGO_TARGET_DIR="$OUT/use" \
  cargo build --release --locked --target "$host" --bin callgate
# Copied aside and renamed, so that a callgate running from target/pgo/callgate is not in the way.
cp "$OUT/use/$host/release/callgate" "$OUT/callgate.new"
mv "$OUT/callgate.new" "$OUT/callgate"
echo "pgo-build: done: $OUT/callgate"
