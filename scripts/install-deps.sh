#!/usr/bin/env bash
# Installs the system packages ScaiBunker needs on a Debian 12 host (idempotent).
# Run as root. Skips apt entirely when every package is already present.
set -euo pipefail
# bubblewrap: the sandbox image bakes run tar, mkfs.ext4 and e2fsck in (crates/controller/src/bake.rs).
# python3-venv: the cached virtual environment of the Python test tools (scripts/python-tools.sh).
PKGS=(qemu-system-x86 qemu-utils busybox-static e2fsprogs cpio kmod lz4 debootstrap nftables iproute2 curl bubblewrap python3-venv)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# qemu-img can be removed by qemu-system-x86's dependency resolution; check the binary too.
command -v qemu-img >/dev/null 2>&1 || missing+=(qemu-utils)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "installing system packages: ${missing[*]}" >&2
if [ "$(id -u)" -ne 0 ]; then
  echo "error: installing packages needs root (missing: ${missing[*]})" >&2
  exit 1
fi
apt-get update -qq
# Some images ship a newer qemu-utils (backports) that Breaks bookworm's qemu-system-common.
# Installing qemu-system-x86 first lets apt remove it; qemu-utils from bookworm follows.
others=()
for p in "${PKGS[@]}"; do [ "$p" = qemu-utils ] || others+=("$p"); done
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${others[@]}" >/dev/null
command -v qemu-img >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-utils >/dev/null
command -v qemu-img >/dev/null && command -v qemu-system-x86_64 >/dev/null
