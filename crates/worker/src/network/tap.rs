//! Opening a bunker's tap: `/dev/net/tun` with `TUNSETIFF` (`IFF_TAP | IFF_NO_PI`), called
//! from a thread inside the bunker's namespace so the device is made there. The descriptor
//! goes to QEMU (`-netdev tap,fd=N`), which then needs no privilege and no namespace.
//!
//! No `IFF_VNET_HDR`: without it QEMU offers the guest no offloads, exactly as with the
//! hub port of an `isolated` bunker, so one template snapshot restores under either
//! backend (virtio-net refuses a saved state whose negotiated features the new backend
//! lacks). The device is not persistent: it goes when the last descriptor closes.
#![allow(unsafe_code)] // one ioctl with a struct the kernel reads; see the SAFETY note

use std::fs::File;
use std::os::fd::{AsRawFd as _, OwnedFd};

const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFNAMSIZ: usize = 16;

/// `struct ifreq` as `TUNSETIFF` reads it: the name, then the flags in the union.
#[repr(C)]
pub struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

nix::ioctl_write_ptr_bad!(
    tunsetiff,
    nix::request_code_write!(b'T', 202, std::mem::size_of::<std::ffi::c_int>()),
    IfReq
);

/// Makes the tap `name` in the calling thread's network namespace.
pub fn open(name: &str) -> std::io::Result<OwnedFd> {
    if name.is_empty() || name.len() >= IFNAMSIZ {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "a tap name is 1 to 15 bytes",
        ));
    }
    let file = File::options()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `file` is an open /dev/net/tun descriptor and `req` a properly laid out,
    // NUL-terminated `struct ifreq` that outlives the call; the kernel only reads it
    // (and may write the chosen name back into it).
    unsafe { tunsetiff(file.as_raw_fd(), &req) }.map_err(std::io::Error::from)?;
    Ok(OwnedFd::from(file))
}
