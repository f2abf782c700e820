#!/usr/bin/env bash
# The test command: installs what a new machine lacks (Mosquitto, for the cross-process tests),
# then builds every target of the workspace in the dev profile and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ]; then
  echo "installing mosquitto (Debian package) for the cross-process tests" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq mosquitto
fi

# Build first so that the cross-process tests find the facepay-* binaries next to them.
cargo build --workspace --all-targets --locked
cargo test --workspace --locked
