#!/usr/bin/env bash
# Builds Garage (the S3 server the storage tests run against) once into the cache and prints
# the path of its binary. The build takes about 22 minutes on 2 cores; later runs reuse it.
set -euo pipefail
GARAGE_VERSION=2.5.0
CACHE="${SCAIBUNKER_CACHE:-$HOME/.cache/scaibunker}"
ROOT="$CACHE/garage-$GARAGE_VERSION"
BIN="$ROOT/bin/garage"
if [ ! -x "$BIN" ]; then
  echo "building garage $GARAGE_VERSION into $ROOT (once; about 22 min on 2 cores)" >&2
  # Its own target dir: the workspace's would be churned by an unrelated dependency tree.
  CARGO_TARGET_DIR="$CACHE/target-garage" nice -n 10 \
    cargo install garage --version "$GARAGE_VERSION" --locked --root "$ROOT" --quiet >&2
  rm -rf "$CACHE/target-garage"
fi
echo "$BIN"
