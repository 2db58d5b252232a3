#!/usr/bin/env bash
# Side-by-side benchmark: a real etcd 3.4 (/usr/bin/etcd) and MetaStore, started on free
# loopback ports with temporary data dirs, the same workloads against each, one table with
# ratios. Not part of the test suite. Both servers are stopped at the end.
#
#   tests/bench/compare.sh [--scale 0.2] [--duration 20] [--engine rocksdb|memory] [--only "put, 1|put, 64"] [--rounds 3] [--members 3] [--client-threads 1]
#
# PROFILE=debug uses debug builds (quick, meaningless numbers); the default is release.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/metastore-target}"
profile="${PROFILE:-release}"
flag=()
[ "$profile" = release ] && flag=(--release)
cargo build "${flag[@]}" -p metastore-runtime --bin metastore
cargo build "${flag[@]}" -p metastore-tests --bin metastore-bench-compare
export METASTORE_BIN="${METASTORE_BIN:-$CARGO_TARGET_DIR/$profile/metastore}"
exec timeout 1800 "$CARGO_TARGET_DIR/$profile/metastore-bench-compare" "$@"
