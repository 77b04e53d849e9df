//! The harness shared by the end-to-end tests (`tests/`) and the walking-skeleton benchmark
//! (`benches/`): where the binaries and guest artefacts are, a whole installation started
//! with `scaibunker up` ([`Up`]), and checks on what is left running.
//!
//! Everything here is real: the binaries cargo built, QEMU, the guest images. A missing
//! piece is an error that says how to provide it, never a silent pass.

pub mod bench;
pub mod doc;
mod procs;
mod up;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

pub use procs::{Process, leftover_processes, qemu_processes_for};
pub use up::{Up, UpOptions};

/// The directory holding `scaibunker` and `scaibunker-worker`: `SCAIBUNKER_BIN_DIR`, else
/// the profile directory of the running test or bench (`target/<profile>/deps/<exe>` →
/// `target/<profile>`), where `cargo build` puts a workspace's binaries.
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("SCAIBUNKER_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().context("locating the test executable")?;
    let parent = exe
        .parent()
        .with_context(|| format!("{} has no parent directory", exe.display()))?;
    let dir = if parent.file_name().is_some_and(|n| n == "deps") {
        parent.parent().unwrap_or(parent)
    } else {
        parent
    };
    Ok(dir.to_owned())
}

/// The two binaries `up` needs; the worker must sit next to `scaibunker`.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub scaibunker: PathBuf,
    pub worker: PathBuf,
}

/// Finds the binaries or says which build command makes them.
pub fn binaries() -> Result<Binaries> {
    let dir = bin_dir()?;
    let build = if dir.file_name().is_some_and(|n| n == "release") {
        "cargo build --release --workspace"
    } else {
        "cargo build --workspace"
    };
    let bins = Binaries {
        scaibunker: dir.join("scaibunker"),
        worker: dir.join("scaibunker-worker"),
    };
    let missing: Vec<String> = [&bins.scaibunker, &bins.worker]
        .into_iter()
        .filter(|p| !p.is_file())
        .map(|p| p.display().to_string())
        .collect();
    if !missing.is_empty() {
        bail!(
            "{} not built: run `{build}` first (with the same CARGO_TARGET_DIR), \
             or point SCAIBUNKER_BIN_DIR at the directory holding them",
            missing.join(" and ")
        );
    }
    Ok(bins)
}

/// The static guest agent named by `SCAIBUNKER_AGENT_BIN`, which `up` bakes into the
/// initramfs. Without it `up` would take the dynamically linked sibling, which cannot run
/// in the guest.
pub fn agent_bin() -> Result<PathBuf> {
    const HOW: &str = "build the static guest agent with `scripts/build-agent.sh` and \
                       `export SCAIBUNKER_AGENT_BIN=<the path it prints>`";
    let Some(path) = std::env::var_os("SCAIBUNKER_AGENT_BIN") else {
        bail!("SCAIBUNKER_AGENT_BIN is not set: {HOW}");
    };
    let path = PathBuf::from(path);
    if !path.is_file() {
        bail!(
            "SCAIBUNKER_AGENT_BIN={} does not exist: {HOW}",
            path.display()
        );
    }
    Ok(path)
}

/// The guest artefacts directory `up` uses by default: `SCAIBUNKER_IMAGES_DIR`, else
/// `~/.cache/scaibunker/images`.
pub fn images_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("SCAIBUNKER_IMAGES_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    Ok(PathBuf::from(home).join(".cache/scaibunker/images"))
}

/// The images directory, after checking that `files` are in it.
pub fn require_images(files: &[&str]) -> Result<PathBuf> {
    let dir = images_dir()?;
    let missing: Vec<&str> = files
        .iter()
        .copied()
        .filter(|f| !dir.join(f).is_file())
        .collect();
    if !missing.is_empty() {
        bail!(
            "guest artefacts {missing:?} are missing from {}: build them with \
             `images/build.sh --agent $(scripts/build-agent.sh)` \
             (or point SCAIBUNKER_IMAGES_DIR at a directory that has them)",
            dir.display()
        );
    }
    Ok(dir)
}

/// The host's kernel release (`uname -r`).
pub fn host_kernel_release() -> Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("reading /proc/sys/kernel/osrelease")?
        .trim()
        .to_owned())
}

/// Calls `check` every 100 ms until it returns `Some`, or fails after `limit` with the
/// last `Err` it gave as the reason.
/// Polls `check` every 250 ms until it gives a value; panics after `limit` (tests only).
pub async fn within<T, F: std::future::Future<Output = Option<T>>>(
    limit: Duration,
    what: &str,
    mut check: impl FnMut() -> F,
) -> T {
    let give_up = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < give_up,
            "{what} did not happen within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub async fn eventually<T>(
    limit: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<T, String>,
) -> Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        match check() {
            Ok(v) => return Ok(v),
            Err(last) if Instant::now() >= deadline => {
                bail!("{what} did not happen within {limit:?}: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
