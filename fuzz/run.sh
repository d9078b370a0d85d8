#!/usr/bin/env bash
# fuzz/run.sh [SECONDS]: run every cargo-fuzz target for SECONDS (default 120) each, outside CI.
# Needs the nightly toolchain and cargo-fuzz (cargo install cargo-fuzz). A crash leaves its input
# in fuzz/artifacts/<target>/; keep it as a regression test (tests/fuzz_regressions.rs) once fixed.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${1:-120}
for target in strict_json relay_event policy_loader; do
    echo "== $target (${SECONDS_EACH} s)"
    mkdir -p "fuzz/corpus/$target"
    # The working corpus (ignored by git), seeded from the inputs kept in fuzz/seeds/.
    cargo +nightly fuzz run "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
        -max_total_time="$SECONDS_EACH" -max_len=4096 2>&1 | tail -4
done
