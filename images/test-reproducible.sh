#!/usr/bin/env bash
# Builds the initramfs, tiny.ext4 and default.ext4 twice, into two fresh output directories,
# and fails unless each artefact has the same sha256 both times.
#
#   images/test-reproducible.sh [--from DIR] [--agent PATH]
#
# The second directory is on /dev/shm (tmpfs) when it is writable, so the staging trees of the
# two builds sit on different filesystems: directory order, inode numbers and timestamps of
# the host's trees cannot leak into the bytes unnoticed.
#
# What each build starts from: the kernel step and the debootstrap tree cached in DIR
# (default $SCAIBUNKER_IMAGES_DIR, else ~/.cache/scaibunker/images) when it holds them, so the
# test costs two mkfs runs per image, not two kernel downloads and two debootstraps (about
# 2 minutes each). What is under test is therefore what build.sh makes of the same inputs;
# debootstrap itself fetches whatever the mirror serves that day (images/README.md). Without a
# cache the builds make their own. Needs root (as build.sh does for the ext4 images).
# KEEP=1 leaves both output directories in place for a look at what differs.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
FROM="${SCAIBUNKER_IMAGES_DIR:-${HOME:-/root}/.cache/scaibunker/images}"
AGENT="${SCAIBUNKER_AGENT_BIN:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --from) FROM="$2"; shift 2 ;;
    --agent) AGENT="$2"; shift 2 ;;
    *) echo "usage: images/test-reproducible.sh [--from DIR] [--agent PATH]" >&2; exit 2 ;;
  esac
done
# Any static executable makes an initramfs; the agent is the real one when given.
[ -n "$AGENT" ] || AGENT=/bin/busybox

log() { echo "[reproducible] $*" >&2; }

first="$(mktemp -d "${TMPDIR:-/tmp}/scaibunker-repro-1.XXXXXX")"
if [ -d /dev/shm ] && [ -w /dev/shm ]; then
  second="$(mktemp -d /dev/shm/scaibunker-repro-2.XXXXXX)"
else
  second="$(mktemp -d "${TMPDIR:-/tmp}/scaibunker-repro-2.XXXXXX")"
fi
[ -n "${KEEP:-}" ] || trap 'rm -rf "$first" "$second"' EXIT

# Copies PATH (relative to FROM) into OUT when FROM has it; hard links where it can.
seed() { # OUT PATH
  local out="$1" path="$2"
  [ -e "$FROM/$path" ] || return 0
  mkdir -p "$(dirname "$out/$path")"
  cp -al "$FROM/$path" "$out/$path" 2>/dev/null && return 0
  # Another filesystem: no hard links; drop what the attempt made, then copy.
  rm -rf "${out:?}/$path"
  cp -a "$FROM/$path" "$out/$path"
}

for out in "$first" "$second"; do
  for path in vmlinux kernel.release stamps/kernel work/kernel/kroot \
      work/default-debootstrap.tar stamps/default-debootstrap; do
    seed "$out" "$path"
  done
  log "building into $out"
  bash "$here/build.sh" --out "$out" --agent "$AGENT" --only initramfs --only tiny --only default
done

failed=0
for artefact in initramfs.cpio.gz tiny.ext4 default.ext4; do
  a=$(sha256sum "$first/$artefact" | cut -d' ' -f1)
  b=$(sha256sum "$second/$artefact" | cut -d' ' -f1)
  if [ "$a" = "$b" ]; then
    log "$artefact: same bytes both times (sha256 $a)"
  else
    log "FAIL $artefact differs: first build sha256 $a, second build sha256 $b" \
      "($(cmp "$first/$artefact" "$second/$artefact" 2>&1 | head -1 | sed 's/^.*differ: //'))"
    failed=1
  fi
done
exit "$failed"
