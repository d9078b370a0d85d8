#!/usr/bin/env bash
# Soak run (not in CI): mixed traffic from three tenants through callgate to the simulator with
# injected upstream faults and gateway restarts, then a check that the store's slots, holds and
# spend equal what the simulator says happened. See bench/soak.py for what is checked.
#
#   cargo build --release
#   bash bench/soak.sh                      # 10 minutes
#   MINUTES=2 bash bench/soak.sh            # a short run
#   bash bench/soak.sh --restart-every 30 --lost-event-rate 0.3   # other faults (see --help)
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 bench/soak.py --minutes "${MINUTES:-10}" "$@"
