//! `GrowRootFs`: the root filesystem fills the bunker's disk. The worker gives a VM a disk
//! of the bunker's `disk_mb` over an image that may be smaller (the rest reads as zeros);
//! the mounted ext4 is grown online to the disk's size (`EXT4_IOC_RESIZE_FS`, no tools in
//! the guest needed). A restored guest learns that its disk grew only when its kernel
//! handles the device's config change, so the disk's size is awaited first.

use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt as _;
use std::time::{Duration, Instant};

use scaibunker_proto::agent::{AgentErrorCode, Reply};

/// `EXT4_IOC_RESIZE_FS`: `_IOW('f', 16, __u64)`, the new block count.
const EXT4_IOC_RESIZE_FS: rustix::ioctl::Opcode = 0x4008_6610;
/// How long the disk may take to show its new size after a restore.
const SIZE_WAIT: Duration = Duration::from_secs(5);

fn io_error(what: &str, e: impl std::fmt::Display) -> Reply {
    Reply::Error {
        code: AgentErrorCode::Io,
        message: format!("{what}: {e}"),
    }
}

/// Bytes of the block device the root filesystem lives on, from sysfs.
fn root_disk_bytes() -> io::Result<u64> {
    let dev = std::fs::metadata("/")?.dev();
    let (major, minor) = (rustix::fs::major(dev), rustix::fs::minor(dev));
    let sectors = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/size"))?;
    sectors
        .trim()
        .parse::<u64>()
        .map(|s| s.saturating_mul(512))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

pub fn grow_root(disk_bytes: u64) -> Reply {
    let deadline = Instant::now() + SIZE_WAIT;
    let device = loop {
        match root_disk_bytes() {
            Ok(n) if n >= disk_bytes => break n,
            Ok(n) if Instant::now() >= deadline => {
                return io_error(
                    "the root disk did not grow",
                    format!("{n} bytes after {SIZE_WAIT:?}, expected {disk_bytes}"),
                );
            }
            Ok(_) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return io_error("read the root disk's size", e),
        }
    };
    let root = match std::fs::File::open("/") {
        Ok(f) => f,
        Err(e) => return io_error("open /", e),
    };
    let stat = match rustix::fs::fstatvfs(root.as_fd()) {
        Ok(s) => s,
        Err(e) => return io_error("statvfs /", e),
    };
    let block = stat.f_frsize.max(1);
    // ext4 grows only; the same count is a no-op.
    match ioctls::resize(root.as_fd(), device / block) {
        Ok(()) => Reply::Done,
        Err(e) => io_error("grow the root filesystem", e),
    }
}

#[allow(unsafe_code)]
mod ioctls {
    use std::io;
    use std::os::fd::BorrowedFd;

    use rustix::ioctl::{Setter, ioctl};

    pub fn resize(fd: BorrowedFd<'_>, blocks: u64) -> io::Result<()> {
        // SAFETY: EXT4_IOC_RESIZE_FS takes a pointer to a u64 block count, which the kernel
        // only reads; `Setter` passes one that outlives the call. `fd` is an open directory
        // on the filesystem to grow.
        unsafe {
            ioctl(
                fd,
                Setter::<{ super::EXT4_IOC_RESIZE_FS }, u64>::new(blocks),
            )
        }
        .map_err(io::Error::from)
    }
}
