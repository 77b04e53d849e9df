//! Network namespaces of bunkers, each kept alive by a handle file: `<dir>/<bunker_id>`,
//! an nsfs bind mount (as `ip netns` does under `/run/netns`).
//!
//! 1. [`create`]: a fresh thread unshares its network namespace and bind-mounts
//!    `/proc/thread-self/ns/net` onto the handle file; the thread then ends, and the mount
//!    alone keeps the namespace.
//! 2. [`run_in`]: a closure runs on a fresh thread that entered the namespace (`setns`);
//!    sockets it makes stay in that namespace whoever uses them afterwards, which is how
//!    the resolver and the audit listen inside a bunker's network.
//! 3. [`delete`]: unmount (detached) and unlink the handle; the kernel frees the namespace
//!    with its links, rules, conntrack entries and qdiscs once nothing else holds it (the
//!    VM's tap descriptor, a socket).

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("{step} for {}", path.display())]
    Io {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the namespace thread for {} panicked", path.display())]
    Thread { path: PathBuf },
}

fn io(step: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> NetnsError {
    let path = path.to_owned();
    move |source| NetnsError::Io { step, path, source }
}

fn errno(e: nix::errno::Errno) -> std::io::Error {
    std::io::Error::from(e)
}

/// Makes a new network namespace held by the handle file `path` (which must not exist)
/// and returns the handle opened.
pub fn create(path: &Path) -> Result<File, NetnsError> {
    File::options()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io("create the namespace handle", path))?;
    let target = path.to_owned();
    let made = std::thread::spawn(move || -> std::io::Result<()> {
        nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(errno)?;
        nix::mount::mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(errno)
    })
    .join()
    .map_err(|_| NetnsError::Thread {
        path: path.to_owned(),
    })?;
    if let Err(e) = made {
        let _ = std::fs::remove_file(path);
        return Err(io("unshare and bind the namespace", path)(e));
    }
    open(path)
}

/// Opens an existing handle.
pub fn open(path: &Path) -> Result<File, NetnsError> {
    File::open(path).map_err(io("open the namespace handle", path))
}

/// Runs `f` on a thread inside the namespace `handle` (at `path`, for errors).
pub fn run_in<T, F>(handle: &File, path: &Path, f: F) -> Result<T, NetnsError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let fd = handle
        .try_clone()
        .map_err(io("duplicate the namespace handle", path))?;
    std::thread::spawn(move || -> std::io::Result<T> {
        nix::sched::setns(&fd, CloneFlags::CLONE_NEWNET).map_err(errno)?;
        drop(fd);
        Ok(f())
    })
    .join()
    .map_err(|_| NetnsError::Thread {
        path: path.to_owned(),
    })?
    .map_err(io("enter the namespace", path))
}

/// Writes a sysctl of the namespace `handle` (`key` like `net/ipv4/ip_forward`).
pub fn sysctl(
    handle: &File,
    path: &Path,
    key: &'static str,
    value: &'static str,
) -> Result<(), NetnsError> {
    let file = format!("/proc/sys/{key}");
    run_in(handle, path, move || std::fs::write(file, value))?
        .map_err(io("write a sysctl in the namespace", path))
}

/// Unmounts and removes the handle at `path`; a missing one is fine.
pub fn delete(path: &Path) -> Result<(), NetnsError> {
    match nix::mount::umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(io("unmount the namespace handle", path)(errno(e))),
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("remove the namespace handle", path)(e)),
    }
}

/// The handles in `dir` (bunker ids), for the start-up sweep.
pub fn list(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}
