//! What is still running for an installation, read from `/proc`.
//!
//! Every QEMU the worker starts names its bunker directory (under the data directory) on
//! its command line, and every process `up` starts inherits the data directory in its
//! environment (`SCAIBUNKER_WORKER_DATA_DIR`); `up` itself has it on its command line.
//! Zombies have an empty command line and environment, and hold nothing, so they are
//! not counted.

use std::path::Path;

/// A live process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    pub pid: u32,
    /// NUL separators shown as spaces.
    pub cmdline: String,
}

/// QEMU processes whose command line names `data_dir`.
pub fn qemu_processes_for(data_dir: &Path) -> Vec<Process> {
    scan(|cmdline, _| contains(cmdline, b"qemu-system") && contains(cmdline, path_bytes(data_dir)))
}

/// Any process (QEMU, the worker, `up`) whose command line or environment names `data_dir`.
pub fn leftover_processes(data_dir: &Path) -> Vec<Process> {
    let needle = path_bytes(data_dir);
    scan(|cmdline, environ| contains(cmdline, needle) || contains(environ, needle))
}

fn path_bytes(p: &Path) -> &[u8] {
    p.as_os_str().as_encoded_bytes()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Processes other than this one for which `matches(cmdline, environ)` holds.
fn scan(matches: impl Fn(&[u8], &[u8]) -> bool) -> Vec<Process> {
    let me = std::process::id();
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        // A process may exit between listing and reading: then it is not left over.
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        if matches(&cmdline, &environ) {
            found.push(Process {
                pid,
                cmdline: String::from_utf8_lossy(&cmdline).replace('\0', " "),
            });
        }
    }
    found
}
