#!/usr/bin/env bash
# Installs the Debian packages a new machine lacks for building and testing facepay.
set -euo pipefail

# Debian packages the build and the tests need: Mosquitto (the cross-process tests start their own
# broker), PostgreSQL (the ledger's tests and the fleet start servers of their own), and cmake, a C++ compiler and OpenBLAS for the FAISS build of the cloud's identity index.
missing=()
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
# NATS: the fleet's clustered broker (MQTT on JetStream); the fleet test starts its own nodes.
command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] || missing+=(nats-server)
command -v cmake >/dev/null || missing+=(cmake)
# Prometheus and promtool (Debian's prometheus package): the alerting rules' checks and unit
# tests, and the live operators' test's own Prometheus.
command -v promtool >/dev/null || missing+=(prometheus)
# node_exporter: the machine's metrics (disks) beside facepay's in the live operators' test.
command -v prometheus-node-exporter >/dev/null || missing+=(prometheus-node-exporter)
# PostgreSQL: the cloud's fleet database; tests start servers of their own (initdb, pg_ctl).
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || missing+=(postgresql)
command -v g++ >/dev/null || missing+=(g++)
[ -e /usr/include/x86_64-linux-gnu/openblas-pthread/cblas.h ] || [ -e /usr/include/openblas/cblas.h ] \
  || dpkg -s libopenblas-dev >/dev/null 2>&1 || missing+=(libopenblas-dev)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} (Debian packages)" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  # Everything apt prints goes to stderr: `facepay-fleet --json` keeps stdout for its JSON.
  $sudo apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >&2
fi

# cargo-deb: the Debian packages of the tiers (README "Packages and services",
# tests/tests/packages.rs); built from crates.io once per machine, for the tests only
# (`--with-packaging`: the demo does not need it). Pinned: the package test packs the dev
# profile's binaries, which this version still allows (with a warning).
if [ "${1:-}" = "--with-packaging" ] && ! cargo deb --version >/dev/null 2>&1; then
  echo "installing cargo-deb (cargo install)" >&2
  cargo install cargo-deb --version 3.8.0 --locked --quiet >&2
fi
