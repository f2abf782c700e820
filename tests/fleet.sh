#!/usr/bin/env bash
# The fleet demo: installs what a new machine lacks, builds, and runs facepay-fleet (args pass on,
# e.g. --json).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/install-deps.sh
exec cargo run --locked --bin facepay-fleet -- "$@"
