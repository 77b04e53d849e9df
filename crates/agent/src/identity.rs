//! `SetIdentity`: a guest restored from a saved state (a template or a `full` snapshot) gets
//! its own host name, machine id and entropy. Without the reseed, every clone of one state
//! would draw the same numbers from the kernel's generator until its next scheduled reseed.

use std::fs;
use std::io;
use std::os::fd::AsFd;

use scaibunker_proto::agent::{AgentErrorCode, Reply};

use crate::init::{hosts_line, is_valid_hostname};

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: rustix::ioctl::Opcode = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: rustix::ioctl::Opcode = 0x5207;

fn error(code: AgentErrorCode, message: String) -> Reply {
    Reply::Error { code, message }
}

pub fn set(hostname: &str, machine_id: &str, seed_hex: &str) -> Reply {
    if !is_valid_hostname(hostname) {
        return error(
            AgentErrorCode::BadRequest,
            format!("invalid hostname {hostname:?}"),
        );
    }
    if machine_id.len() != 32
        || !machine_id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return error(
            AgentErrorCode::BadRequest,
            "machine_id must be 32 lowercase hex digits".into(),
        );
    }
    let Some(seed) = crate::files::decode_hex(seed_hex).filter(|s| (32..=512).contains(&s.len()))
    else {
        return error(
            AgentErrorCode::BadRequest,
            "seed_hex must be 32 to 512 bytes of hex".into(),
        );
    };
    let io_err = |what: &str, e: io::Error| error(AgentErrorCode::Io, format!("{what}: {e}"));
    if let Err(e) = credit_entropy(&seed) {
        return io_err("credit the seed to the entropy pool", e);
    }
    if let Err(e) = rustix::system::sethostname(hostname.as_bytes()) {
        return io_err("set the host name", e.into());
    }
    if let Err(e) = fs::write("/etc/hostname", format!("{hostname}\n")) {
        return io_err("write /etc/hostname", e);
    }
    match fs::read_to_string("/etc/hosts") {
        Ok(hosts) => {
            if let Some(line) = hosts_line(&hosts, hostname) {
                let sep = if hosts.is_empty() || hosts.ends_with('\n') {
                    ""
                } else {
                    "\n"
                };
                if let Err(e) = fs::write("/etc/hosts", format!("{hosts}{sep}{line}")) {
                    return io_err("write /etc/hosts", e);
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Err(e) = fs::write("/etc/hosts", format!("127.0.1.1\t{hostname}\n")) {
                return io_err("write /etc/hosts", e);
            }
        }
        Err(e) => return io_err("read /etc/hosts", e),
    }
    if let Err(e) = write_machine_id(machine_id) {
        return io_err("write /etc/machine-id", e);
    }
    Reply::Done
}

/// Replaces `/etc/machine-id` (temporary file + rename, mode 0444).
fn write_machine_id(id: &str) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = "/etc/.machine-id.scaibunker";
    fs::write(tmp, format!("{id}\n"))?;
    fs::set_permissions(tmp, fs::Permissions::from_mode(0o444))?;
    fs::rename(tmp, "/etc/machine-id")
}

/// `struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }`, credited with
/// every bit of `seed`, then a forced reseed of the generator.
fn credit_entropy(seed: &[u8]) -> io::Result<()> {
    let urandom = fs::OpenOptions::new().write(true).open("/dev/urandom")?;
    let mut info = Vec::with_capacity(8 + seed.len());
    info.extend_from_slice(&((seed.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(seed.len() as i32).to_ne_bytes());
    info.extend_from_slice(seed);
    ioctls::add_entropy(urandom.as_fd(), &mut info)?;
    ioctls::reseed(urandom.as_fd())?;
    Ok(())
}

#[allow(unsafe_code)]
mod ioctls {
    use std::ffi::c_void;
    use std::io;
    use std::os::fd::BorrowedFd;

    use rustix::ioctl::{Ioctl, IoctlOutput, NoArg, Opcode, ioctl};

    /// `RNDADDENTROPY` with a `rand_pool_info` laid out in `buf`.
    struct AddEntropy<'a>(&'a mut [u8]);

    // SAFETY: the opcode is RNDADDENTROPY, whose argument is a pointer to a `rand_pool_info`
    // the kernel only reads; `buf` holds one (two native-endian i32 headers, then
    // `buf_size` bytes) and outlives the call.
    unsafe impl Ioctl for AddEntropy<'_> {
        type Output = ();
        const IS_MUTATING: bool = false;
        fn opcode(&self) -> Opcode {
            super::RNDADDENTROPY
        }
        fn as_ptr(&mut self) -> *mut c_void {
            self.0.as_mut_ptr().cast()
        }
        unsafe fn output_from_ptr(_: IoctlOutput, _: *mut c_void) -> rustix::io::Result<()> {
            Ok(())
        }
    }

    pub fn add_entropy(fd: BorrowedFd<'_>, info: &mut [u8]) -> io::Result<()> {
        // SAFETY: see `AddEntropy`; `fd` is an open /dev/urandom.
        unsafe { ioctl(fd, AddEntropy(info)) }.map_err(io::Error::from)
    }

    pub fn reseed(fd: BorrowedFd<'_>) -> io::Result<()> {
        // SAFETY: RNDRESEEDCRNG takes no argument; `fd` is an open /dev/urandom.
        unsafe { ioctl(fd, NoArg::<{ super::RNDRESEEDCRNG }>::new()) }.map_err(io::Error::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_arguments_are_refused_before_anything_changes() {
        let seed = "ab".repeat(32);
        let id = "0123456789abcdef0123456789abcdef";
        for (host, mid, s) in [
            ("bad host!", id, seed.as_str()),
            ("ok", "XYZ", seed.as_str()),
            ("ok", id, "abc"),
            ("ok", id, "ab"),
        ] {
            assert!(
                matches!(
                    set(host, mid, s),
                    Reply::Error {
                        code: AgentErrorCode::BadRequest,
                        ..
                    }
                ),
                "{host} {mid} {s}"
            );
        }
        assert_eq!(crate::files::decode_hex("00ff10"), Some(vec![0, 255, 16]));
        assert_eq!(crate::files::decode_hex("0g"), None);
    }
}
