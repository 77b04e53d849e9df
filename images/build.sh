#!/usr/bin/env bash
# Builds the ScaiBunker guest artefacts: vmlinux, initramfs.cpio.gz, tiny.ext4, default.ext4.
#
#   images/build.sh [--out DIR] [--agent PATH] [--only kernel|initramfs|tiny|default]...
#
# Idempotent and cached: every step hashes its inputs (its own shell code as printed by
# `declare -f`, the kernel package version, the agent's and busybox's sha256, ...) into a
# stamp file under OUT/stamps/ and is skipped while the stamp matches and its artefacts exist.
# Artefacts are written under a temporary name and renamed into place, so an interrupted
# build never leaves a half-written file under a real name. See images/README.md.
set -euo pipefail

usage() {
  cat >&2 <<'EOF'
usage: images/build.sh [--out DIR] [--agent PATH] [--only kernel|initramfs|tiny|default]...

  --out DIR      output directory (default: $SCAIBUNKER_IMAGES_DIR or ~/.cache/scaibunker/images)
  --agent PATH   static guest agent binary put into the initramfs (default: $SCAIBUNKER_AGENT_BIN);
                 required only when the initramfs is built
  --only STEP    build only this step (repeatable); default: all of them.
                 initramfs also runs the kernel step (it needs the kernel's modules).
EOF
}

OUT="${SCAIBUNKER_IMAGES_DIR:-${HOME:-/root}/.cache/scaibunker/images}"
AGENT="${SCAIBUNKER_AGENT_BIN:-}"
ONLY=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || { usage; exit 2; }; OUT="$2"; shift 2 ;;
    --out=*) OUT="${1#--out=}"; shift ;;
    --agent) [ $# -ge 2 ] || { usage; exit 2; }; AGENT="$2"; shift 2 ;;
    --agent=*) AGENT="${1#--agent=}"; shift ;;
    --only) [ $# -ge 2 ] || { usage; exit 2; }; ONLY+=("$2"); shift 2 ;;
    --only=*) ONLY+=("${1#--only=}"); shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "[images] error: unknown argument: $1" >&2; usage; exit 2 ;;
  esac
done

# ---------------------------------------------------------------------------------------------
# Settings (part of the step hashes where they matter)

SUITE=bookworm
DEBOOTSTRAP_VARIANT=minbase
DEBOOTSTRAP_INCLUDE=bash,coreutils,procps,python3,iproute2,ca-certificates
DEFAULT_SIZE=1G
TINY_SIZE=64M
GUEST_HOSTNAME=bunker
KERNEL_META=linux-image-cloud-amd64
# Loaded by /init in this order; any that is built in or missing is skipped at build time.
MODULES=(virtio_ring virtio virtio_mmio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci
         virtio_blk virtio_console failover net_failover virtio_net
         vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport)
# Applets /init uses (symlinked to busybox in the initramfs).
INIT_APPLETS=(sh mount insmod mkdir cp chmod switch_root poweroff sleep ip)
# The time every file in the initramfs and the ext4 images carries, and the clock mkfs.ext4
# writes into its superblock (seconds since the epoch; 2024-01-01 unless SOURCE_DATE_EPOCH
# says otherwise): with it the same inputs give the same bytes on any host, any day.
BUILD_EPOCH="${SOURCE_DATE_EPOCH:-1704067200}"
case "$BUILD_EPOCH" in ''|*[!0-9]*) echo "[images] error: SOURCE_DATE_EPOCH must be a number of seconds" >&2; exit 2 ;; esac
# Modes of the files the build creates do not depend on the caller's umask.
umask 022

# ---------------------------------------------------------------------------------------------
# Helpers

log() { echo "[images] $*" >&2; }
die() { echo "[images] error: $*" >&2; exit 1; }

sha256_file() { sha256sum "$1" | cut -d' ' -f1; }
hash_of() { printf '%s\n' "$@" | sha256sum | cut -d' ' -f1; }
# A UUID made of the first 128 bits of the hash of its arguments.
uuid_of() { local h; h=$(hash_of "$@"); echo "${h:0:8}-${h:8:4}-${h:12:4}-${h:16:4}-${h:20:12}"; }

# The step is up to date when its stamp holds HASH and every listed file exists.
up_to_date() { # STEP HASH FILE...
  local step="$1" hash="$2" f
  shift 2
  [ -f "$STAMPS/$step" ] && [ "$(cat "$STAMPS/$step")" = "$hash" ] || return 1
  for f in "$@"; do [ -e "$f" ] || return 1; done
}
# Forget a step's stamp before rebuilding it, so a half-done rebuild is never taken as valid.
invalidate() { rm -f "$STAMPS/$1"; }
write_stamp() { # STEP HASH
  printf '%s\n' "$2" > "$STAMPS/.$1.tmp.$$"
  mv -f "$STAMPS/.$1.tmp.$$" "$STAMPS/$1"
}

# A temporary name next to DEST (same filesystem, so mv is an atomic rename).
tmp_for() { echo "$(dirname "$1")/.$(basename "$1").tmp.$$"; }
TMP_PATHS=()
cleanup() {
  local p
  for p in "${TMP_PATHS[@]+"${TMP_PATHS[@]}"}"; do
    [ -e "$p" ] || [ -L "$p" ] || continue
    safe_rm "$p" 2>/dev/null || true
  done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# rm -rf that first unmounts anything mounted below PATH (debootstrap mounts /proc and /sys in its
# target; an interrupted run can leave them there) and never crosses into another filesystem.
safe_rm() {
  local path="$1" m
  [ -e "$path" ] || [ -L "$path" ] || return 0
  path="$(realpath -m "$path")"
  case "$path" in /|/bin|/boot|/dev|/etc|/home|/lib|/proc|/root|/sys|/usr|/var) die "refusing to remove $path" ;; esac
  if [ -d "$path" ] && [ -r /proc/self/mounts ]; then
    awk '{print $2}' /proc/self/mounts | sed 's/\\040/ /g' | { grep -E "^${path//./\\.}(/|$)" || true; } \
      | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  fi
  rm -rf --one-file-system "$path"
}

require_root() { [ "$(id -u)" -eq 0 ] || die "$1 needs root"; }
require_cmd() { command -v "$1" >/dev/null 2>&1 || die "missing command '$1' (run scripts/install-deps.sh)"; }

is_static() { # ldd exits non-zero for static executables
  local out
  out=$(LC_ALL=C ldd "$1" 2>&1 || true)
  case "$out" in *"not a dynamic executable"*|*"statically linked"*) return 0 ;; *) return 1 ;; esac
}

# A static busybox from the host's busybox-static package.
BUSYBOX=""
find_busybox() {
  [ -n "$BUSYBOX" ] && return 0
  local b
  for b in /bin/busybox /usr/bin/busybox; do
    [ -x "$b" ] || continue
    if is_static "$b"; then BUSYBOX="$b"; return 0; fi
  done
  die "no static busybox found (install busybox-static: scripts/install-deps.sh)"
}

# mkfs.ext4 -d into a new sparse file of SIZE, giving the same bytes for the same TREE and
# HASH (the step's input hash) on any host: the filesystem UUID and directory hash seed come
# from HASH, mkfs's clock is BUILD_EPOCH (E2FSPROGS_FAKE_TIME: creation, write and check
# times), mke2fs adds each directory's entries in sorted order (LC_ALL=C makes that byte
# order), inode tables and journal are zeroed instead of left to the host's discard support,
# and afterwards every inode's times are set to BUILD_EPOCH (mke2fs copies each file's ctime,
# which no tool can set on the tree). The reproducibility test is images/test-reproducible.sh.
mkfs_ext4_reproducible() { # TREE DEST SIZE LABEL HASH
  local tree="$1" dest="$2" size="$3" label="$4" hash="$5"
  rm -f "$dest"
  truncate -s "$size" "$dest"
  # No blocks reserved for root: the guest user is who fills a bunker's disk.
  LC_ALL=C E2FSPROGS_FAKE_TIME="$BUILD_EPOCH" mkfs.ext4 -q -F -m 0 -L "$label" \
    -U "$(uuid_of uuid "$hash")" \
    -E "hash_seed=$(uuid_of hash_seed "$hash"),lazy_itable_init=0,lazy_journal_init=0,nodiscard" \
    -d "$tree" "$dest"
  set_inode_times "$dest"
}

# Sets atime, mtime, ctime (and crtime where inodes have room for it) of every used inode of
# the ext4 IMAGE to BUILD_EPOCH, with one debugfs run over the inodes the bitmaps mark used.
set_inode_times() { # IMAGE
  local image="$1" cmds
  cmds=$(tmp_for "$image.debugfs"); TMP_PATHS+=("$cmds" "$cmds.err")
  LC_ALL=C dumpe2fs "$image" 2>/dev/null | awk -v t="@$BUILD_EPOCH" '
    /^Inodes per group:/ { ipg = $4 + 0 }
    /^Inode size:/ { fields = ($3 + 0 > 128) ? "atime mtime ctime crtime" : "atime mtime ctime" }
    /^Group [0-9]+:/ { g = $2 + 0 }
    /^  Free inodes:/ {
      first = g * ipg + 1; last = (g + 1) * ipg
      delete free
      line = $0; sub(/^  Free inodes:[ \t]*/, "", line)
      n = split(line, ranges, /, */)
      for (i = 1; i <= n; i++) {
        if (ranges[i] == "") continue
        m = split(ranges[i], ends, "-"); lo = ends[1] + 0; hi = (m > 1 ? ends[2] : ends[1]) + 0
        for (j = lo; j <= hi; j++) free[j] = 1
      }
      k = split(fields, f, " ")
      for (ino = first; ino <= last; ino++) {
        if (ino in free) continue
        for (i = 1; i <= k; i++) printf "sif <%d> %s %s\n", ino, f[i], t
      }
    }' > "$cmds"
  [ -s "$cmds" ] || die "no used inodes found in $image (dumpe2fs failed?)"
  LC_ALL=C E2FSPROGS_FAKE_TIME="$BUILD_EPOCH" debugfs -w -f "$cmds" "$image" > /dev/null 2>"$cmds.err" \
    || { cat "$cmds.err" >&2; die "debugfs could not set the inode times of $image"; }
  if grep -v '^debugfs ' "$cmds.err" | grep -q .; then
    cat "$cmds.err" >&2; rm -f "$cmds.err"; die "debugfs could not set the inode times of $image"
  fi
  rm -f "$cmds" "$cmds.err"
}

# The e2fsprogs release, part of the image steps' hashes: another mke2fs may lay out the same
# tree differently.
e2fsprogs_version() { LC_ALL=C mke2fs -V 2>&1 | head -1; }

# ---------------------------------------------------------------------------------------------
# Step: kernel -> OUT/vmlinux, OUT/kernel.release (+ OUT/work/kernel/kroot with the modules)

KPKG=""
KPKG_VERSION=""
resolve_kernel_package() {
  # One apt-cache call (each costs ~0.7 s here): the metapackage's Depends names the versioned
  # package and, in Debian, pins its exact version.
  local dep
  dep=$(apt-cache show --no-all-versions "$KERNEL_META" 2>/dev/null | awk '/^Depends:/{print; exit}') || true
  if [ -z "$dep" ] && [ "$(id -u)" -eq 0 ]; then
    log "kernel: $KERNEL_META unknown to apt, running apt-get update"
    apt-get update -qq >&2 || true
    dep=$(apt-cache show --no-all-versions "$KERNEL_META" 2>/dev/null | awk '/^Depends:/{print; exit}') || true
  fi
  KPKG=$(printf '%s\n' "$dep" | grep -oE 'linux-image-[0-9][^ ,()]*' | head -1) || true
  [ -n "$KPKG" ] || return 1
  KPKG_VERSION=$(printf '%s\n' "$dep" | grep -oE "$KPKG \(= [^)]+\)" | sed 's/.*(= //; s/)$//') || true
  if [ -z "$KPKG_VERSION" ]; then
    KPKG_VERSION=$(apt-cache policy "$KPKG" 2>/dev/null | awk '/Candidate:/{print $2; exit}')
  fi
  [ -n "$KPKG_VERSION" ] && [ "$KPKG_VERSION" != "(none)" ]
}

# Extract the uncompressed ELF from a bzImage whose payload is LZ4 (legacy frame).
extract_vmlinux() { # VMLINUZ DEST RELEASE
  local vmlinuz="$1" dest="$2" release="$3" off
  for off in $(LC_ALL=C grep -obUaP '\x02\x21\x4c\x18' "$vmlinuz" | cut -d: -f1); do
    # lz4 exits non-zero on the data that follows the payload; the checks below decide.
    tail -c +$((off + 1)) "$vmlinuz" | lz4 -dc > "$dest" 2>/dev/null || true
    if elf_complete "$dest" && LC_ALL=C grep -qa "Linux version $release " "$dest"; then
      return 0
    fi
  done
  return 1
}

# True when FILE starts with an x86-64 ELF header and holds its whole section header table.
elf_complete() {
  local f="$1" size shoff shentsize shnum
  [ "$(head -c 5 "$f" | od -An -tx1 | tr -d ' \n')" = "7f454c4602" ] || return 1
  size=$(stat -c %s "$f")
  shoff=$(od -An -t u8 -j 40 -N 8 "$f" | tr -d ' ')
  shentsize=$(od -An -t u2 -j 58 -N 2 "$f" | tr -d ' ')
  shnum=$(od -An -t u2 -j 60 -N 2 "$f" | tr -d ' ')
  [ "$shoff" -gt 0 ] && [ $((shoff + shentsize * shnum)) -le "$size" ]
}

build_kernel() {
  local kwork="$WORK/kernel" hash release deb
  if ! resolve_kernel_package; then
    if [ -s "$OUT/vmlinux" ] && [ -s "$OUT/kernel.release" ] && [ -f "$STAMPS/kernel" ]; then
      log "kernel: cannot resolve $KERNEL_META with apt; keeping the cached kernel $(cat "$OUT/kernel.release")"
      KERNEL_HASH=$(cat "$STAMPS/kernel")
      return 0
    fi
    die "cannot resolve $KERNEL_META with apt-cache (run apt-get update)"
  fi
  hash=$(hash_of "$(declare -f build_kernel extract_vmlinux elf_complete)" "$KPKG" "$KPKG_VERSION")
  KERNEL_HASH="$hash"
  release="${KPKG#linux-image-}"
  if up_to_date kernel "$hash" "$OUT/vmlinux" "$OUT/kernel.release" "$kwork/kroot/lib/modules/$release"; then
    log "kernel: up to date ($release)"
    return 0
  fi
  invalidate kernel
  require_cmd apt-get; require_cmd dpkg; require_cmd lz4
  mkdir -p "$kwork"
  deb="$kwork/${KPKG}_${KPKG_VERSION//:/%3a}_amd64.deb"
  if [ ! -s "$deb" ] || [ "$(dpkg-deb -f "$deb" Version 2>/dev/null)" != "$KPKG_VERSION" ]; then
    log "kernel: downloading $KPKG $KPKG_VERSION"
    local dl="$kwork/download.tmp.$$"
    TMP_PATHS+=("$dl")
    rm -rf "$dl"; mkdir -p "$dl"
    (cd "$dl" && apt-get -q -o APT::Sandbox::User=root download "$KPKG=$KPKG_VERSION" >&2) \
      || die "apt-get download $KPKG=$KPKG_VERSION failed"
    find "$kwork" -maxdepth 1 -name 'linux-image-*.deb' -delete
    mv -f "$dl"/*.deb "$deb"
    rm -rf "$dl"
  else
    log "kernel: using cached $(basename "$deb")"
  fi
  log "kernel: unpacking"
  local kroot_tmp="$kwork/kroot.tmp.$$"
  TMP_PATHS+=("$kroot_tmp")
  rm -rf "$kroot_tmp"
  dpkg -x "$deb" "$kroot_tmp"
  [ -d "$kroot_tmp/lib/modules/$release" ] || die "kernel package has no lib/modules/$release"
  local vmlinuz
  vmlinuz=$(ls "$kroot_tmp"/boot/vmlinuz-* 2>/dev/null | head -1)
  [ -n "$vmlinuz" ] || die "kernel package has no /boot/vmlinuz-*"
  log "kernel: extracting the uncompressed vmlinux"
  local vtmp; vtmp=$(tmp_for "$OUT/vmlinux"); TMP_PATHS+=("$vtmp")
  extract_vmlinux "$vmlinuz" "$vtmp" "$release" || die "could not extract an ELF vmlinux from $vmlinuz"
  local rtmp; rtmp=$(tmp_for "$OUT/kernel.release"); TMP_PATHS+=("$rtmp")
  printf '%s\n' "$release" > "$rtmp"
  rm -rf "$kwork/kroot"
  mv "$kroot_tmp" "$kwork/kroot"
  mv -f "$vtmp" "$OUT/vmlinux"
  mv -f "$rtmp" "$OUT/kernel.release"
  write_stamp kernel "$hash"
  log "kernel: built $release $(took)"
}

# ---------------------------------------------------------------------------------------------
# Step: initramfs -> OUT/initramfs.cpio.gz

# The initramfs /init (busybox sh). Its contract is documented in images/README.md.
write_init() {
  cat <<'INIT'
#!/bin/sh
# ScaiBunker initramfs /init: load the virtio modules, mount the rootfs, stage the agent,
# switch_root into it. Quiet unless something fails. Generated by images/build.sh.
export PATH=/bin
fail() {
  echo "scaibunker-init: error: $*"
  poweroff -f
  sleep 5
  exit 1
}

mount -t proc proc /proc || fail "cannot mount /proc"
mount -t sysfs sysfs /sys || fail "cannot mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "cannot mount devtmpfs on /dev"

if [ -f /lib/modules/load.order ]; then
  while read -r m; do
    [ -n "$m" ] || continue
    insmod "/lib/modules/$m.ko" || echo "scaibunker-init: warning: insmod $m failed"
  done < /lib/modules/load.order
fi

# The guest's network: the same in every bunker (so a template restores into any of
# them); the worker decides what lies behind the tap (NETWORK.md 2.1). No IPv6.
ip link set lo up
echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6 2>/dev/null
echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6 2>/dev/null
if [ -d /sys/class/net/eth0 ]; then
  ip addr add 169.254.0.2/30 dev eth0 &&
    ip link set eth0 up &&
    ip route add default via 169.254.0.1 dev eth0 ||
    echo "scaibunker-init: warning: cannot configure eth0"
fi

root=/dev/vda
set -f
read -r cmdline < /proc/cmdline
for arg in $cmdline; do
  case "$arg" in scaibunker.root=*) root="${arg#scaibunker.root=}" ;; esac
done
set +f

# Wait up to 5 s (by the clock: under TCG every sleep fork costs tens of ms).
uptime_cs() { read -r up _ < /proc/uptime; echo $(( ${up%.*} * 100 + 1${up#*.} - 100 )); }
deadline=$(( $(uptime_cs) + 500 ))
while [ ! -b "$root" ]; do
  [ "$(uptime_cs)" -ge "$deadline" ] && fail "root device $root did not appear within 5 s"
  sleep 0.1
done
mkdir -p /newroot || fail "cannot create /newroot"
# noinit_itable: no background zeroing of inode tables the agent's online grow adds (a
# bunker's disk_mb over a small image); unused ones are never read, and zeroing them would
# cost the guest's IO and fill the overlay with zeros.
mount -t ext4 -o rw,noinit_itable "$root" /newroot || fail "cannot mount $root (ext4) on /newroot"

mkdir -p /newroot/run /newroot/dev /newroot/proc /newroot/sys || fail "cannot create mount points in the rootfs"
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /newroot/run || fail "cannot mount tmpfs on /newroot/run"
mkdir -p /newroot/run/scaibunker || fail "cannot create /newroot/run/scaibunker"
cp /scaibunker-agent /newroot/run/scaibunker/scaibunker-agent || fail "cannot copy the agent"
chmod 0755 /newroot/run/scaibunker/scaibunker-agent || fail "cannot chmod the agent"

mount --move /dev /newroot/dev || fail "cannot move /dev"
mount --move /proc /newroot/proc || fail "cannot move /proc"
mount --move /sys /newroot/sys || fail "cannot move /sys"

echo "scaibunker-init: switching root"
exec switch_root /newroot /run/scaibunker/scaibunker-agent init
INIT
}

# A newc cpio archive (with its own trailer) holding /dev, /dev/console and /dev/null, written
# byte by byte so no device node is needed on the host. The kernel unpacks concatenated archives.
cpio_devnodes() {
  local ino=900000
  newc_entry() { # NAME MODE(octal) RDEVMAJOR RDEVMINOR NLINK
    local name="$1" mode=$((8#$2)) maj="$3" min="$4" nlink="$5" namesize pad
    namesize=$(( ${#name} + 1 ))
    printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
      "$ino" "$mode" 0 0 "$nlink" 0 0 0 0 "$maj" "$min" "$namesize" 0
    printf '%s\0' "$name"
    pad=$(( (4 - (110 + namesize) % 4) % 4 ))
    [ "$pad" -eq 0 ] || head -c "$pad" /dev/zero
    ino=$((ino + 1))
  }
  newc_entry dev 040755 0 0 2
  newc_entry dev/console 020600 5 1 1
  newc_entry dev/null 020666 1 3 1
  ino=0
  newc_entry 'TRAILER!!!' 0 0 0 1
}

build_initramfs() {
  local kroot="$WORK/kernel/kroot" release moddir hash agent_sha bb_sha
  [ -n "$AGENT" ] || die "the initramfs needs the guest agent: pass --agent PATH or set SCAIBUNKER_AGENT_BIN (build it with: cargo build -p scaibunker-agent --release, static)"
  [ -f "$AGENT" ] || die "agent binary not found: $AGENT"
  release=$(cat "$OUT/kernel.release")
  moddir="$kroot/lib/modules/$release"
  [ -d "$moddir" ] || die "kernel modules missing at $moddir (run the kernel step)"
  find_busybox
  agent_sha=$(sha256_file "$AGENT")
  bb_sha=$(sha256_file "$BUSYBOX")
  hash=$(hash_of "$(declare -f build_initramfs write_init cpio_devnodes)" "${MODULES[*]}" \
    "${INIT_APPLETS[*]}" "kernel=$KERNEL_HASH" "agent=$agent_sha" "busybox=$bb_sha")
  if up_to_date initramfs "$hash" "$OUT/initramfs.cpio.gz"; then
    log "initramfs: up to date (agent sha256 ${agent_sha:0:12})"
    return 0
  fi
  invalidate initramfs
  require_cmd cpio; require_cmd gzip; require_cmd modinfo
  # A dynamically linked agent would panic every guest whose rootfs has no glibc at boot.
  is_static "$AGENT" || die "$AGENT is dynamically linked; the agent must be static to run in any rootfs (build it with: bash scripts/build-agent.sh)"
  log "initramfs: building (agent $AGENT, sha256 ${agent_sha:0:12})"
  local stage="$WORK/initramfs.stage.$$"
  TMP_PATHS+=("$stage")
  safe_rm "$stage"
  mkdir -p "$stage"/{bin,lib/modules,proc,sys,newroot}
  cp "$BUSYBOX" "$stage/bin/busybox"
  chmod 0755 "$stage/bin/busybox"
  local a
  for a in "${INIT_APPLETS[@]}"; do ln -s busybox "$stage/bin/$a"; done

  # Modules, decompressed, in load order; built-in or missing ones are skipped.
  local m alt f loaded=() dep deps
  : > "$stage/lib/modules/load.order"
  for m in "${MODULES[@]}"; do
    alt="${m//_/-}"
    if grep -qE "/(${m}|${alt})\.ko(\.[a-z]+)?$" "$moddir/modules.builtin" 2>/dev/null; then
      log "initramfs: module $m is built in, skipping"
      continue
    fi
    f=$(find "$moddir/kernel" \( -name "$m.ko" -o -name "$m.ko.*" -o -name "$alt.ko" -o -name "$alt.ko.*" \) | head -1)
    if [ -z "$f" ]; then
      log "initramfs: module $m not found in $release, skipping"
      continue
    fi
    case "$f" in
      *.ko) cp "$f" "$stage/lib/modules/$m.ko" ;;
      *.ko.xz) xz -dc "$f" > "$stage/lib/modules/$m.ko" ;;
      *.ko.zst) zstd -qdc "$f" > "$stage/lib/modules/$m.ko" ;;
      *.ko.gz) gzip -dc "$f" > "$stage/lib/modules/$m.ko" ;;
      *) die "unknown module compression: $f" ;;
    esac
    # Sanity check: every dependency is loaded earlier (or built in).
    deps=$(modinfo -F depends "$stage/lib/modules/$m.ko" 2>/dev/null | tr ',' ' ')
    for dep in $deps; do
      case " ${loaded[*]-} " in *" ${dep//-/_} "*) ;; *)
        log "initramfs: warning: module $m depends on $dep, which is not loaded before it" ;;
      esac
    done
    loaded+=("$m")
    echo "$m" >> "$stage/lib/modules/load.order"
  done

  cp "$AGENT" "$stage/scaibunker-agent"
  chmod 0755 "$stage/scaibunker-agent"
  write_init > "$stage/init"
  chmod 0755 "$stage/init"

  local dest="$OUT/initramfs.cpio.gz" tmp
  tmp=$(tmp_for "$dest"); TMP_PATHS+=("$tmp")
  find "$stage" -exec touch -h -d @0 {} +
  {
    cpio_devnodes
    (cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --reproducible --quiet)
  } | gzip -n -6 > "$tmp"
  safe_rm "$stage"
  mv -f "$tmp" "$dest"
  write_stamp initramfs "$hash"
  log "initramfs: built $(took) ($(du -h "$dest" | cut -f1); modules: ${loaded[*]-none})"
}

# ---------------------------------------------------------------------------------------------
# Step: tiny -> OUT/tiny.ext4 (busybox rootfs for fast tests)

build_tiny() {
  local hash bb_sha
  find_busybox
  bb_sha=$(sha256_file "$BUSYBOX")
  hash=$(hash_of "$(declare -f build_tiny mkfs_ext4_reproducible set_inode_times)" "$TINY_SIZE" \
    "$GUEST_HOSTNAME" "busybox=$bb_sha" "epoch=$BUILD_EPOCH" "$(e2fsprogs_version)")
  if up_to_date tiny "$hash" "$OUT/tiny.ext4"; then
    log "tiny: up to date"
    return 0
  fi
  invalidate tiny
  require_root "building tiny.ext4 (file ownership)"
  require_cmd mkfs.ext4
  log "tiny: building"
  local stage="$WORK/tiny.stage.$$" p
  TMP_PATHS+=("$stage")
  safe_rm "$stage"
  mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,etc,root,home/user,tmp,run,dev,proc,sys,var/tmp}
  cp "$BUSYBOX" "$stage/bin/busybox"
  chmod 0755 "$stage/bin/busybox"
  "$BUSYBOX" --list-full | while read -r p; do
    [ -n "$p" ] && [ "$p" != bin/busybox ] || continue
    mkdir -p "$stage/$(dirname "$p")"
    ln -sfn /bin/busybox "$stage/$p"
  done
  [ -L "$stage/bin/sh" ] || ln -sfn /bin/busybox "$stage/bin/sh"
  cat > "$stage/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
user:x:1000:1000:user:/home/user:/bin/sh
EOF
  cat > "$stage/etc/group" <<'EOF'
root:x:0:
user:x:1000:
EOF
  cat > "$stage/etc/shadow" <<'EOF'
root:*:19000:0:99999:7:::
user:*:19000:0:99999:7:::
EOF
  printf '%s\n' "$GUEST_HOSTNAME" > "$stage/etc/hostname"
  printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\tlocalhost\n' "$GUEST_HOSTNAME" > "$stage/etc/hosts"
  chmod 0644 "$stage/etc/passwd" "$stage/etc/group" "$stage/etc/hostname" "$stage/etc/hosts"
  chmod 0640 "$stage/etc/shadow"
  chmod 1777 "$stage/tmp" "$stage/var/tmp"
  chmod 0700 "$stage/root"
  chmod 0755 "$stage/home/user"
  chown -R 0:0 "$stage"
  chown 1000:1000 "$stage/home/user"

  local dest="$OUT/tiny.ext4" tmp
  tmp=$(tmp_for "$dest"); TMP_PATHS+=("$tmp")
  mkfs_ext4_reproducible "$stage" "$tmp" "$TINY_SIZE" tiny "$hash"
  safe_rm "$stage"
  mv -f "$tmp" "$dest"
  write_stamp tiny "$hash"
  log "tiny: built $(took)"
}

# ---------------------------------------------------------------------------------------------
# Step: default -> OUT/default.ext4 (Debian rootfs); the debootstrap tree is cached as
# OUT/work/default-debootstrap.tar so changing the post-processing does not re-run debootstrap.

# The first apt source (deb822 .sources or one-line .list) serving $SUITE with component main.
find_mirror() {
  if [ -n "${SCAIBUNKER_DEBIAN_MIRROR:-}" ]; then echo "$SCAIBUNKER_DEBIAN_MIRROR"; return 0; fi
  local f uri
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    case "$f" in
      *.sources)
        uri=$(awk -v suite="$SUITE" '
          function has(list, word,   n, a, i) { n = split(list, a, /[ \t]+/); for (i = 1; i <= n; i++) if (a[i] == word) return 1; return 0 }
          function flush() {
            if (has(types, "deb") && has(suites, suite) && has(comps, "main") && tolower(enabled) != "no") {
              n = split(uris, u, /[ \t]+/); for (i = 1; i <= n; i++) if (u[i] ~ /^(https?|file):/) { print u[i]; found = 1; exit }
            }
            types = uris = suites = comps = enabled = ""
          }
          /^[ \t]*#/ { next }
          /^[ \t]*$/ { flush(); next }
          {
            key = tolower($0); sub(/:.*/, "", key); gsub(/[ \t]/, "", key)
            val = $0; sub(/^[^:]*:[ \t]*/, "", val); sub(/[ \t]+$/, "", val)
            if (key == "types") types = val
            if (key == "uris") uris = val
            if (key == "suites") suites = val
            if (key == "components") comps = val
            if (key == "enabled") enabled = val
          }
          END { if (!found) flush() }' "$f")
        ;;
      *)
        uri=$(awk -v suite="$SUITE" '
          /^[ \t]*#/ { next }
          $1 == "deb" {
            line = $0; gsub(/\[[^]]*\]/, "", line); n = split(line, a, /[ \t]+/)
            j = 0; for (i = 1; i <= n; i++) if (a[i] != "") b[++j] = a[i]
            if (b[3] != suite) next
            for (i = 4; i <= j; i++) if (b[i] == "main" && b[2] ~ /^(https?|file):/) { print b[2]; exit }
          }' "$f")
        ;;
    esac
    if [ -n "$uri" ]; then echo "$uri"; return 0; fi
  done
  return 1
}

build_default_debootstrap() {
  local hash tar="$WORK/default-debootstrap.tar"
  hash=$(hash_of "$(declare -f build_default_debootstrap)" "$SUITE" "$DEBOOTSTRAP_VARIANT" "$DEBOOTSTRAP_INCLUDE")
  DEBOOTSTRAP_HASH="$hash"
  if up_to_date default-debootstrap "$hash" "$tar"; then
    log "default: debootstrap tree cached"
    return 0
  fi
  invalidate default-debootstrap
  require_root "debootstrap"
  require_cmd debootstrap
  local mirror
  mirror=$(find_mirror) || die "no apt source for '$SUITE main' in /etc/apt (set SCAIBUNKER_DEBIAN_MIRROR)"
  local tree="$WORK/default-debootstrap.tree.$$" logf="$WORK/debootstrap.log"
  TMP_PATHS+=("$tree")
  safe_rm "$tree"
  log "default: debootstrap $SUITE from $mirror (about 2 min; log: $logf)"
  if ! debootstrap --variant="$DEBOOTSTRAP_VARIANT" --include="$DEBOOTSTRAP_INCLUDE" \
      "$SUITE" "$tree" "$mirror" > "$logf" 2>&1; then
    tail -n 20 "$logf" >&2 || true
    die "debootstrap failed (see $logf)"
  fi
  log "default: archiving the debootstrap tree"
  local ttmp; ttmp=$(tmp_for "$tar"); TMP_PATHS+=("$ttmp")
  tar -C "$tree" --numeric-owner --xattrs --xattrs-include='*' --acls -cf "$ttmp" .
  safe_rm "$tree"
  mv -f "$ttmp" "$tar"
  write_stamp default-debootstrap "$hash"
}

# Removes or fixes what a debootstrap run leaves that depends on the day and the host rather
# than on the packages: apt caches and lists, logs, backup copies (`*-old`, `/etc/passwd-`),
# ldconfig's aux cache (inode numbers and times of the files it saw), machine ids, the shadow
# files' day of last password change, and the Python bytecode: it records its source file's
# mtime, which the image sets to BUILD_EPOCH, so it is compiled again in the tree (by the
# guest's own python3, in timestamp mode, after every file got BUILD_EPOCH) and the guest
# never finds it stale. Compiling the same source with the same interpreter gives the same
# bytes.
normalise_debootstrap_tree() { # ROOT
  local root="$1" f day=$((BUILD_EPOCH / 86400)) sources
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/*
  mkdir -p "$root/var/lib/apt/lists/partial" "$root/var/cache/apt/archives/partial"
  rm -rf "$root"/var/log/*.log "$root"/var/log/apt/*
  for f in wtmp btmp lastlog faillog; do
    if [ -f "$root/var/log/$f" ]; then : > "$root/var/log/$f"; fi
  done
  rm -f "$root"/var/cache/debconf/*-old "$root"/var/lib/dpkg/*-old \
    "$root"/etc/passwd- "$root"/etc/group- "$root"/etc/shadow- "$root"/etc/gshadow- \
    "$root"/etc/subuid- "$root"/etc/subgid- "$root/var/cache/ldconfig/aux-cache" \
    "$root/etc/machine-id" "$root/var/lib/dbus/machine-id"
  for f in shadow; do
    [ -f "$root/etc/$f" ] || continue
    awk -F: -v OFS=: -v d="$day" '$3 != "" { $3 = d } { print }' "$root/etc/$f" > "$root/etc/.$f.tmp"
    cat "$root/etc/.$f.tmp" > "$root/etc/$f"
    rm -f "$root/etc/.$f.tmp"
  done

  find "$root" -exec touch -h -d "@$BUILD_EPOCH" {} +
  sources=$(cd "$root" && find . -path '*/__pycache__/*.pyc' \
    | sed -E 's|^\.||; s|/__pycache__/([^/]+)\.cpython-[0-9]+(\.opt-[0-9])?\.pyc$|/\1.py|' \
    | LC_ALL=C sort -u)
  find "$root" -name __pycache__ -type d -prune -exec rm -rf {} +
  if [ -n "$sources" ]; then
    printf '%s\n' "$sources" | while read -r f; do [ -f "$root$f" ] && echo "$f"; done \
      | env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C PYTHONHASHSEED=0 \
          chroot "$root" python3 -m compileall -q -i - > /dev/null \
      || die "could not compile the Python bytecode in the default rootfs"
  fi
}

build_default() {
  build_default_debootstrap
  local hash tar="$WORK/default-debootstrap.tar"
  hash=$(hash_of "$(declare -f build_default normalise_debootstrap_tree mkfs_ext4_reproducible set_inode_times)" \
    "$DEFAULT_SIZE" "$GUEST_HOSTNAME" "debootstrap=$DEBOOTSTRAP_HASH" "epoch=$BUILD_EPOCH" "$(e2fsprogs_version)")
  if up_to_date default "$hash" "$OUT/default.ext4"; then
    log "default: up to date"
    return 0
  fi
  invalidate default
  require_root "building default.ext4"
  require_cmd mkfs.ext4
  log "default: post-processing the rootfs"
  local root="$WORK/default-rootfs.$$"
  TMP_PATHS+=("$root")
  safe_rm "$root"
  mkdir -p "$root"
  tar -C "$root" --numeric-owner --xattrs --xattrs-include='*' --acls -xpf "$tar"

  # user (uid/gid 1000), edited directly: nothing from the guest runs on the host.
  grep -q '^user:' "$root/etc/passwd" || echo 'user:x:1000:1000:user:/home/user:/bin/bash' >> "$root/etc/passwd"
  grep -q '^user:' "$root/etc/shadow" || echo 'user:*:19000:0:99999:7:::' >> "$root/etc/shadow"
  grep -q '^user:' "$root/etc/group" || echo 'user:x:1000:' >> "$root/etc/group"
  if [ -f "$root/etc/gshadow" ]; then grep -q '^user:' "$root/etc/gshadow" || echo 'user:!::' >> "$root/etc/gshadow"; fi
  mkdir -p "$root/home/user"
  [ -d "$root/etc/skel" ] && cp -a "$root/etc/skel/." "$root/home/user/"
  chown -R 1000:1000 "$root/home/user"
  chmod 0755 "$root/home/user"

  printf '%s\n' "$GUEST_HOSTNAME" > "$root/etc/hostname"
  printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\tlocalhost ip6-localhost ip6-loopback\n' "$GUEST_HOSTNAME" > "$root/etc/hosts"
  # debootstrap copies the host's resolver configuration; the guest's network is set up at run time.
  : > "$root/etc/resolv.conf"
  mkdir -p "$root/run" "$root/dev" "$root/proc" "$root/sys" "$root/tmp"
  chmod 1777 "$root/tmp"
  normalise_debootstrap_tree "$root"

  local dest="$OUT/default.ext4" tmp
  tmp=$(tmp_for "$dest"); TMP_PATHS+=("$tmp")
  log "default: mkfs.ext4 ($DEFAULT_SIZE)"
  mkfs_ext4_reproducible "$root" "$tmp" "$DEFAULT_SIZE" default "$hash"
  safe_rm "$root"
  mv -f "$tmp" "$dest"
  write_stamp default "$hash"
  log "default: built $(took)"
}

# ---------------------------------------------------------------------------------------------
# Main

want_kernel=0 want_initramfs=0 want_tiny=0 want_default=0
if [ ${#ONLY[@]} -eq 0 ]; then
  want_kernel=1 want_initramfs=1 want_tiny=1 want_default=1
else
  for s in "${ONLY[@]}"; do
    case "$s" in
      kernel) want_kernel=1 ;;
      initramfs) want_initramfs=1; want_kernel=1 ;;
      tiny) want_tiny=1 ;;
      default) want_default=1 ;;
      *) die "unknown step '$s' (expected kernel, initramfs, tiny or default)" ;;
    esac
  done
fi
if [ "$want_initramfs" -eq 1 ] && [ -z "$AGENT" ]; then
  die "the initramfs needs the guest agent: pass --agent PATH or set SCAIBUNKER_AGENT_BIN (or build only other steps, e.g. --only kernel --only tiny --only default)"
fi
if [ -n "$AGENT" ]; then
  [ -f "$AGENT" ] || die "agent binary not found: $AGENT"
  AGENT="$(realpath "$AGENT")"
fi

mkdir -p "$OUT"
OUT="$(realpath "$OUT")"
WORK="$OUT/work"
STAMPS="$OUT/stamps"
mkdir -p "$WORK" "$STAMPS"

# One build per OUT at a time (parallel test runs may share it).
exec 9> "$OUT/.lock"
if ! flock -n 9; then
  log "waiting for another build in $OUT"
  flock 9
fi

KERNEL_HASH="" DEBOOTSTRAP_HASH=""
STEP_START=0
run_step() { # NAME FUNCTION
  STEP_START=$SECONDS
  "$2"
}
took() { echo "in $((SECONDS - STEP_START)) s"; }
[ "$want_kernel" -eq 0 ] || run_step kernel build_kernel
[ "$want_initramfs" -eq 0 ] || run_step initramfs build_initramfs
[ "$want_tiny" -eq 0 ] || run_step tiny build_tiny
[ "$want_default" -eq 0 ] || run_step default build_default
log "artefacts in $OUT"
