#!/usr/bin/env bash
# Builds the static guest agent and prints its path. glibc static linking is the only static
# option here (no musl target can be installed); `--target` keeps crt-static away from proc-macros.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${SCAIBUNKER_CACHE:-$HOME/.cache/scaibunker}"
TARGET=x86_64-unknown-linux-gnu
CARGO_TARGET_DIR="$CACHE/target-agent" RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --quiet --release -p scaibunker-agent --target "$TARGET" >&2
echo "$CACHE/target-agent/$TARGET/release/scaibunker-agent"
