//! Baking an uploaded image into the ext4 filesystem bunkers boot.
//!
//! - `tar`: the archive is checked in-process first (every member a relative path without
//!   `..`, hard links likewise, regular-file bytes within `size_mib`), then unpacked by GNU tar
//!   and turned into ext4 by `mkfs.ext4 -d`. Both tools run sandboxed: in new network, IPC,
//!   UTS and PID namespaces (no network, no view of host processes), with a file-size limit of
//!   `size_mib` and a CPU-time limit, killed after [`TOOL_TIMEOUT`]. GNU tar sets symbolic
//!   links only after every member is written, so a member cannot write through a link the
//!   archive planted. Owners, modes and links are kept (`--numeric-owner`).
//! - `ext4`: the bytes must carry the ext4 superblock magic, fit `size_mib`, and pass a
//!   read-only `e2fsck -fn`, sandboxed the same way.
//!
//! [`BakeError::Invalid`] is the uploader's fault (bad or oversized content); every other
//! error is the platform's.

use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

/// Longest any one tool may run.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(600);
/// Most members a tarball may have.
const MAX_MEMBERS: u64 = 2_000_000;
const MIB: u64 = 1 << 20;

/// What the uploaded bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Tar,
    Ext4,
}

#[derive(Debug, thiserror::Error)]
pub enum BakeError {
    /// The content is not what its kind says, or does not fit.
    #[error("{0}")]
    Invalid(String),
    #[error("running {tool}")]
    Spawn {
        tool: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} did not finish within {TOOL_TIMEOUT:?}")]
    Timeout { tool: &'static str },
    #[error("{tool} failed: {stderr}")]
    Tool { tool: &'static str, stderr: String },
    #[error("reading the upload")]
    Io(#[from] std::io::Error),
}

/// Turns `source` (a tarball or an ext4 file) into the ext4 file bunkers boot, inside `work`
/// (an empty private directory the caller removes). Returns the ext4's path.
pub async fn bake(
    kind: SourceKind,
    source: &Path,
    work: &Path,
    size_mib: u64,
) -> Result<PathBuf, BakeError> {
    match kind {
        SourceKind::Ext4 => {
            check_ext4(source, size_mib).await?;
            Ok(source.to_owned())
        }
        SourceKind::Tar => {
            let src = source.to_owned();
            tokio::task::spawn_blocking(move || check_tar(&src, size_mib))
                .await
                .map_err(|e| BakeError::Io(std::io::Error::other(e)))??;
            let root = work.join("root");
            std::fs::create_dir(&root)?;
            let limit = size_mib * MIB;
            let mut tar = sandboxed(limit);
            tar.arg("tar")
                .args(["-x", "--numeric-owner", "--delay-directory-restore", "-f"])
                .arg(source)
                .arg("-C")
                .arg(&root);
            run("tar", tar).await?;
            let out = work.join("rootfs.ext4");
            let mut mkfs = sandboxed(limit);
            mkfs.arg("mkfs.ext4")
                .args(["-q", "-F", "-L", "rootfs", "-E", "root_owner=0:0", "-d"])
                .arg(&root)
                .arg(&out)
                .arg(format!("{size_mib}M"));
            run("mkfs.ext4", mkfs).await.map_err(|e| match e {
                BakeError::Tool { stderr, .. } if stderr.contains("allocate") => {
                    BakeError::Invalid(format!(
                        "the tarball's files do not fit in an ext4 filesystem of {size_mib} MiB"
                    ))
                }
                other => other,
            })?;
            Ok(out)
        }
    }
}

/// A command that runs its arguments under a file-size and CPU limit, in new network, IPC,
/// UTS and PID namespaces.
fn sandboxed(max_file_bytes: u64) -> Command {
    let mut cmd = Command::new("prlimit");
    cmd.arg(format!("--fsize={max_file_bytes}"))
        .arg(format!("--cpu={}", TOOL_TIMEOUT.as_secs()))
        .args([
            "--", "unshare", "--net", "--ipc", "--uts", "--pid", "--fork",
        ])
        .args(["--kill-child", "--"])
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

async fn run(tool: &'static str, mut cmd: Command) -> Result<(), BakeError> {
    let child = cmd
        .spawn()
        .map_err(|source| BakeError::Spawn { tool, source })?;
    let out = tokio::time::timeout(TOOL_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| BakeError::Timeout { tool })?
        .map_err(|source| BakeError::Spawn { tool, source })?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: String = stderr
        .chars()
        .rev()
        .take(2000)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    Err(BakeError::Tool {
        tool,
        stderr: tail.trim().to_owned(),
    })
}

/// Whether a member name stays inside the root: relative, no `..`.
fn inside(path: &Path) -> bool {
    path.components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

/// Checks a tarball before anything is unpacked. Blocking.
fn check_tar(path: &Path, size_mib: u64) -> Result<(), BakeError> {
    let file = std::fs::File::open(path)?;
    let mut archive = tar::Archive::new(std::io::BufReader::new(file));
    let invalid = |e: std::io::Error| BakeError::Invalid(format!("not a valid tarball: {e}"));
    let (mut members, mut bytes) = (0u64, 0u64);
    for entry in archive.entries().map_err(invalid)? {
        let mut entry = entry.map_err(invalid)?;
        let name = entry.path().map_err(invalid)?.into_owned();
        if !inside(&name) {
            return Err(BakeError::Invalid(format!(
                "member {} is absolute or has `..`",
                name.display()
            )));
        }
        if entry.header().entry_type().is_hard_link() {
            let target = entry.link_name().map_err(invalid)?.unwrap_or_default();
            if !inside(&target) {
                return Err(BakeError::Invalid(format!(
                    "hard link {} points outside the archive",
                    name.display()
                )));
            }
        }
        members += 1;
        if members > MAX_MEMBERS {
            return Err(BakeError::Invalid(format!(
                "more than {MAX_MEMBERS} members"
            )));
        }
        bytes = bytes.saturating_add(entry.size());
        if bytes > size_mib * MIB {
            return Err(BakeError::Invalid(format!(
                "the tarball's files do not fit in {size_mib} MiB"
            )));
        }
        // Reading to the end verifies the member is complete.
        std::io::copy(&mut entry, &mut std::io::sink()).map_err(invalid)?;
    }
    if members == 0 {
        return Err(BakeError::Invalid("the tarball is empty".into()));
    }
    Ok(())
}

/// Checks an uploaded ext4 filesystem.
async fn check_ext4(path: &Path, size_mib: u64) -> Result<(), BakeError> {
    let len = std::fs::metadata(path)?.len();
    if len > size_mib * MIB {
        return Err(BakeError::Invalid(format!(
            "the filesystem is {len} bytes, more than size_mib ({size_mib} MiB)"
        )));
    }
    let mut superblock = [0u8; 1082];
    let mut file = std::fs::File::open(path)?;
    if file.read_exact(&mut superblock).is_err() || superblock[1080..1082] != [0x53, 0xEF] {
        return Err(BakeError::Invalid("not an ext4 filesystem".into()));
    }
    let mut fsck = sandboxed(MIB);
    fsck.arg("e2fsck").args(["-f", "-n"]).arg(path);
    run("e2fsck", fsck).await.map_err(|e| match e {
        BakeError::Tool { stderr, .. } => {
            BakeError::Invalid(format!("the filesystem has errors: {stderr}"))
        }
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tarball(dir: &Path, members: &[(&str, &[u8])]) -> PathBuf {
        let path = dir.join("src.tar");
        let mut b = tar::Builder::new(std::fs::File::create(&path).expect("create"));
        for (name, data) in members {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o755);
            h.set_entry_type(tar::EntryType::Regular);
            // `append_data` refuses `..`; write the raw name to build hostile archives.
            let raw = &mut h.as_old_mut().name;
            raw[..name.len()].copy_from_slice(name.as_bytes());
            h.set_cksum();
            b.append(&h, *data).expect("append");
        }
        b.finish().expect("finish");
        path
    }

    #[test]
    fn member_names_must_stay_inside() {
        assert!(inside(Path::new("bin/sh")));
        assert!(inside(Path::new("./etc/passwd")));
        assert!(!inside(Path::new("/etc/passwd")));
        assert!(!inside(Path::new("a/../../x")));
    }

    #[test]
    fn hostile_or_oversized_tarballs_are_refused_before_unpacking() {
        let dir = tempfile::tempdir().expect("tmp");
        let ok = tarball(dir.path(), &[("bin/hello", b"#!/bin/sh\necho hi\n")]);
        check_tar(&ok, 1).expect("fine");
        let up = tarball(dir.path(), &[("../escape", b"x")]);
        assert!(matches!(check_tar(&up, 1), Err(BakeError::Invalid(m)) if m.contains("..")));
        let abs = tarball(dir.path(), &[("/etc/evil", b"x")]);
        assert!(matches!(check_tar(&abs, 1), Err(BakeError::Invalid(_))));
        let big = tarball(dir.path(), &[("big", &vec![0u8; 2 * MIB as usize])]);
        assert!(matches!(check_tar(&big, 1), Err(BakeError::Invalid(m)) if m.contains("fit")));
        let junk = dir.path().join("junk");
        std::fs::write(&junk, vec![7u8; 4096]).expect("write");
        assert!(matches!(check_tar(&junk, 1), Err(BakeError::Invalid(_))));
    }

    #[tokio::test]
    async fn a_tarball_bakes_into_a_clean_ext4_that_keeps_modes() {
        let dir = tempfile::tempdir().expect("tmp");
        let src = tarball(dir.path(), &[("bin/hello", b"#!/bin/sh\necho hi\n")]);
        let work = dir.path().join("work");
        std::fs::create_dir(&work).expect("mkdir");
        let out = bake(SourceKind::Tar, &src, &work, 16).await.expect("bake");
        assert_eq!(std::fs::metadata(&out).expect("stat").len(), 16 * MIB);
        // The result passes the same check an uploaded ext4 gets.
        check_ext4(&out, 16).await.expect("clean ext4");
        let listing = std::process::Command::new("debugfs")
            .args(["-R", "stat /bin/hello"])
            .arg(&out)
            .output()
            .expect("debugfs");
        let text = String::from_utf8_lossy(&listing.stdout);
        assert!(text.contains("Mode:  0755"), "{text}");
        // Too small a filesystem for the files: the uploader's fault, said plainly.
        let big = tarball(dir.path(), &[("big", &vec![1u8; 15 * MIB as usize])]);
        let work2 = dir.path().join("work2");
        std::fs::create_dir(&work2).expect("mkdir");
        let err = bake(SourceKind::Tar, &big, &work2, 16)
            .await
            .expect_err("too big");
        assert!(
            matches!(err, BakeError::Invalid(ref m) if m.contains("fit")),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn only_clean_ext4_within_the_size_is_accepted() {
        let dir = tempfile::tempdir().expect("tmp");
        let junk = dir.path().join("junk.ext4");
        std::fs::write(&junk, vec![0u8; 2 * MIB as usize]).expect("write");
        assert!(
            matches!(check_ext4(&junk, 16).await, Err(BakeError::Invalid(m)) if m.contains("not an ext4"))
        );
        let fs = dir.path().join("fs.ext4");
        let made = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&fs)
            .arg("8M")
            .status()
            .expect("mkfs");
        assert!(made.success());
        check_ext4(&fs, 8).await.expect("clean");
        assert!(
            matches!(check_ext4(&fs, 4).await, Err(BakeError::Invalid(m)) if m.contains("size_mib"))
        );
        // Corrupt the superblock's block count: e2fsck must object.
        let mut bytes = std::fs::read(&fs).expect("read");
        bytes[1024 + 4..1024 + 8].copy_from_slice(&[0xff, 0xff, 0xff, 0x00]);
        std::fs::write(&fs, &bytes).expect("write");
        assert!(matches!(
            check_ext4(&fs, 8).await,
            Err(BakeError::Invalid(_))
        ));
    }
}
