#!/usr/bin/env bash
# The test command: installs what a new machine lacks (Debian packages, below),
# then builds every target of the workspace in the dev profile and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

bash tests/install-deps.sh --with-packaging

# Build first so that the cross-process tests find the facepay-* binaries next to them.
cargo build --workspace --all-targets --locked
cargo test --workspace --locked
