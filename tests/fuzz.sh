#!/usr/bin/env bash
# Runs every fuzz target of fuzz/ (cargo-fuzz, libFuzzer, AddressSanitizer) for FUZZ_SECONDS
# (default 20) from its committed seed corpus, prints the executions of each, and fails on any
# crash (libFuzzer leaves the input in fuzz/artifacts/<target>/; replay it with
# `cargo fuzz run <target> <file>`). New inputs found go to a scratch corpus, never into the repo.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${FUZZ_SECONDS:-20}"
# The sanitizer build has its own target directory, kept across runs like the main one.
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$HOME/.cache/facepay-fuzz-target}"

if ! command -v cargo-fuzz >/dev/null; then
  echo "installing cargo-fuzz (crates.io)" >&2
  cargo install cargo-fuzz --locked --version 0.13.2 >&2
fi
# cargo-fuzz passes nightly-only flags: the machine's nightly when it has one, else the stable
# toolchain told to accept them.
toolchain=()
if rustup toolchain list 2>/dev/null | grep -q '^nightly-'; then
  toolchain=(+nightly)
else
  export RUSTC_BOOTSTRAP=1
fi

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
# The fuzz workspace's lock must be the one committed.
cargo metadata --locked --format-version 1 --manifest-path fuzz/Cargo.toml >/dev/null
cargo "${toolchain[@]}" fuzz build --fuzz-dir fuzz >&2
targets=$(cargo "${toolchain[@]}" fuzz list --fuzz-dir fuzz)
if [ -z "$targets" ]; then
  echo "fuzz: no targets listed" >&2
  exit 1
fi
status=0
for target in $targets; do
  mkdir -p "$scratch/$target"
  log="$scratch/$target.log"
  if cargo "${toolchain[@]}" fuzz run --fuzz-dir fuzz "$target" "$scratch/$target" "fuzz/corpus/$target" \
    -- -max_total_time="$seconds" -print_final_stats=1 -rss_limit_mb=4096 >"$log" 2>&1; then
    result=ok
  else
    result=CRASHED
    status=1
    tail -n 40 "$log" >&2
  fi
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
  corpus=$(find "$scratch/$target" -type f | wc -l)
  echo "fuzz: $target: $result, $runs executions in ${seconds} s, $corpus new inputs"
done
exit $status
