//! Clean-up at worker start of what a previous run left in `<data>/bunkers/`.
//!
//! A worker that crashed or was killed leaves bunker directories and, possibly, QEMU
//! processes behind. For each directory:
//! 1. read `qemu.pid`; if that process is alive and its command line names this directory
//!    (so a recycled pid is never killed), SIGKILL it and wait for it to go;
//! 2. remove the directory.

use std::path::Path;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process};

use crate::vmm::qemu::cmdline::PID_FILE;

/// How long to wait for a killed process to disappear.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Kills leftover VMs and removes every directory under `bunkers_dir`. Returns how many
/// directories were removed. Blocking.
pub fn clean_leftovers(bunkers_dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(bunkers_dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let dir = entry.path();
        if !dir.is_dir() {
            continue;
        }
        kill_leftover_vm(&dir);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {
                tracing::warn!(dir = %dir.display(), "removed a leftover bunker directory");
                removed += 1;
            }
            Err(e) => {
                tracing::error!(dir = %dir.display(), error = %e, "remove leftover bunker directory");
            }
        }
    }
    removed
}

/// Kills the QEMU a previous run left running from `dir`, if any, and waits for it to go.
/// Blocking.
pub fn kill_leftover_vm(dir: &Path) {
    if let Some(pid) = leftover_vm(dir) {
        tracing::warn!(dir = %dir.display(), pid, "killing a leftover qemu process");
        kill_and_wait(pid);
    }
}

/// The pid in `dir/qemu.pid`, if it is a live QEMU running from `dir`.
fn leftover_vm(dir: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(dir.join(PID_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    is_vm_of(&cmdline, dir).then_some(pid)
}

/// Whether a NUL-separated command line is a QEMU that mentions `dir`.
fn is_vm_of(cmdline: &[u8], dir: &Path) -> bool {
    let dir = dir.as_os_str().as_encoded_bytes();
    let program = cmdline.split(|b| *b == 0).next().unwrap_or_default();
    let is_qemu = program.windows(4).any(|w| w == b"qemu");
    is_qemu && !dir.is_empty() && cmdline.windows(dir.len()).any(|w| w == dir)
}

fn kill_and_wait(pid: i32) {
    let Some(target) = Pid::from_raw(pid) else {
        return;
    };
    if let Err(e) = kill_process(target, Signal::KILL) {
        tracing::warn!(pid, error = %e, "kill leftover qemu");
        return;
    }
    let deadline = Instant::now() + KILL_WAIT;
    while is_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A process that exists and is not a zombie (a zombie holds no resources but its pid).
fn is_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself hold ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_only_a_qemu_naming_the_directory() {
        let dir = Path::new("/data/bunkers/b1");
        let qemu = b"/usr/bin/qemu-system-x86_64\0-pidfile\0/data/bunkers/b1/qemu.pid\0";
        assert!(is_vm_of(qemu, dir));
        assert!(!is_vm_of(qemu, Path::new("/data/bunkers/b2")));
        let other = b"/usr/bin/sleep\0/data/bunkers/b1\0";
        assert!(!is_vm_of(other, dir));
    }

    #[test]
    fn removes_directories_and_ignores_stale_pids() {
        let data = tempfile::tempdir().expect("tempdir");
        let b1 = data.path().join("b1");
        std::fs::create_dir_all(b1.join("sub")).expect("mkdir");
        // Our own pid is alive but is not a qemu naming b1: it must survive.
        std::fs::write(b1.join(PID_FILE), std::process::id().to_string()).expect("write");
        std::fs::write(data.path().join("stray-file"), b"x").expect("write");
        assert_eq!(clean_leftovers(data.path()), 1);
        assert!(!b1.exists());
        assert!(data.path().join("stray-file").exists());
        assert!(is_alive(
            i32::try_from(std::process::id()).expect("pid fits")
        ));
    }
}
