//! The guest is hostile to the worker: a bunker's QEMU, once the guest runs, holds none of
//! the worker's secrets, runs as an unprivileged uid of its own under a seccomp filter, and
//! cannot open another bunker's files.
//!
//! This binary has a single test on purpose: it puts a canary worker token into the process
//! environment (where a worker configured from the environment keeps it) before any other
//! thread exists, which the other test binaries could not do safely.
//! Needs the guest artefacts of `images/build.sh` and root (QEMU drops from root to its uid).

mod common;

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::os::unix::process::CommandExt as _;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::{TestWorker, require_artefacts};

const TINY: [&str; 3] = ["vmlinux", "initramfs.cpio.gz", "tiny.ext4"];
const CANARY: &str = "canary-worker-token-5b7d1e";

#[test]
#[allow(unsafe_code)]
fn a_bunkers_qemu_holds_no_worker_secret_and_cannot_open_other_bunkers_files() {
    // SAFETY: this binary's only test sets the variable before it starts the runtime; no
    // other thread exists yet that could read the environment concurrently.
    unsafe { std::env::set_var("SCAIBUNKER_WORKER_TOKEN", CANARY) };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(check_isolation());
}

/// The `Name:` line of `/proc/PID/status`, split into its fields.
fn status_field(status: &str, name: &str) -> Vec<String> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// Whether a process running as `uid:uid` (no supplementary groups) can open `path` for
/// reading.
fn opens_as(uid: u32, path: &Path) -> bool {
    std::process::Command::new("/bin/sh")
        .args(["-c", "exec 3<\"$0\"", &path.to_string_lossy()])
        .uid(uid)
        .gid(uid)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("run the helper")
        .success()
}

async fn check_isolation() {
    let images = require_artefacts(&TINY);
    assert!(
        rustix::process::geteuid().is_root(),
        "this test needs root: QEMU drops from root to an unprivileged uid"
    );
    // The default, whatever SCAIBUNKER_QEMU_RUNAS the run has: QEMU drops to a uid of its own.
    let w = TestWorker::start_with(&images, |c| c.qemu_runas = true).await;
    w.create("b-iso", "tiny", 256).await;
    let dir = w.bunker_dir("b-iso");
    let pid: u32 = std::fs::read_to_string(dir.join("qemu.pid"))
        .expect("qemu.pid")
        .trim()
        .parse()
        .expect("pid");
    let mut problems = Vec::new();

    // 1. No secret of the worker in QEMU's environment.
    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
    let environ = String::from_utf8_lossy(&environ);
    if environ.contains(CANARY) {
        problems.push("QEMU's environment holds the worker token".to_owned());
    }
    if environ.contains("SCAIBUNKER_") {
        problems.push(format!(
            "QEMU's environment holds worker settings: {environ:?}"
        ));
    }

    // 2. An unprivileged uid, no capabilities, a seccomp filter.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let uids: Vec<u32> = status_field(&status, "Uid")
        .iter()
        .map(|u| u.parse().expect("uid"))
        .collect();
    let gids = status_field(&status, "Gid");
    eprintln!("qemu {pid}: Uid {uids:?} Gid {gids:?}");
    let uid = uids.first().copied().unwrap_or(0);
    if uids.len() != 4 || uids.contains(&0) || uids.iter().any(|u| *u != uid) {
        problems.push(format!("QEMU runs with uids {uids:?}"));
    }
    if gids.iter().any(|g| g == "0") {
        problems.push(format!("QEMU runs with gids {gids:?}"));
    }
    if status_field(&status, "Seccomp") != ["2"] {
        problems.push(format!(
            "QEMU has no seccomp filter (Seccomp: {:?})",
            status_field(&status, "Seccomp")
        ));
    }
    if status_field(&status, "CapEff") != ["0000000000000000"] {
        problems.push(format!(
            "QEMU holds capabilities {:?}",
            status_field(&status, "CapEff")
        ));
    }

    // 3. The bunker's files are root's, mode 0700 and 0600: QEMU got its disks as
    // descriptors, so no uid but root, its own included, can open anything here.
    let dir_meta = std::fs::metadata(&dir).expect("stat dir");
    if dir_meta.uid() != 0 || dir_meta.permissions().mode() & 0o077 != 0 {
        problems.push(format!(
            "the bunker directory is uid {} mode {:o}",
            dir_meta.uid(),
            dir_meta.permissions().mode() & 0o777
        ));
    }
    let overlay = dir.join("disk.qcow2");
    let disk_meta = std::fs::metadata(&overlay).expect("stat overlay");
    if disk_meta.uid() != 0 || disk_meta.permissions().mode() & 0o077 != 0 {
        problems.push(format!(
            "the overlay is uid {} mode {:o}",
            disk_meta.uid(),
            disk_meta.permissions().mode() & 0o777
        ));
    }
    for other in [uid, uid + 1, 65534] {
        if uid != 0 && opens_as(other, &overlay) {
            problems.push(format!("uid {other} can open the bunker's overlay"));
        }
        if uid != 0 && opens_as(other, &dir.join("qemu.pid")) {
            problems.push(format!("uid {other} can open the bunker's files"));
        }
    }
    // QEMU holds the overlay and the image as descriptors it inherited.
    let held: Vec<std::path::PathBuf> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("list qemu's fds")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .collect();
    for wanted in [overlay.clone(), images.join("tiny.ext4")] {
        let wanted = std::fs::canonicalize(&wanted).expect("canonical path");
        if !held.contains(&wanted) {
            problems.push(format!("QEMU does not hold {}", wanted.display()));
        }
    }

    // 4. Nor does the guest see the token.
    let r = w.exec_sh("b-iso", "env; cat /proc/1/environ").await;
    let out = String::from_utf8(BASE64.decode(&r.stdout_b64).expect("b64")).expect("utf8");
    if out.contains(CANARY) {
        problems.push("the guest sees the worker token".to_owned());
    }

    w.delete_bunker("b-iso").await;
    w.shutdown().await;
    assert!(
        problems.is_empty(),
        "isolation broken:\n{}",
        problems.join("\n")
    );
}
