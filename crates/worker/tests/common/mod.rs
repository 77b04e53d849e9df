//! Shared harness of the worker tests: an in-process worker on a random port, a temporary
//! data directory, the guest artefacts, and an HTTP client for the worker API.
//!
//! VM tests take [`vm_slot`] so that one VM runs at a time in a test binary (the hosts
//! have two cores; other test binaries run after this one, not beside it).

#![allow(dead_code)] // Each test binary uses a different part of the harness.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use scaibunker_proto::worker::{CreateVm, VmInfo, VmStatus, WORKER_API_PREFIX, WorkerError};
use scaibunker_worker::{WorkerConfig, WorkerHandle, start};

pub const TOKEN: &str = "test-worker-token";

static VM_SLOT: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Serialises VM tests.
pub async fn vm_slot() -> tokio::sync::MutexGuard<'static, ()> {
    VM_SLOT.lock().await
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "scaibunker_worker=info".into()),
        )
        .try_init();
}

/// The images directory: `SCAIBUNKER_IMAGES_DIR`, else the build script's default.
pub fn images_dir() -> PathBuf {
    match std::env::var_os("SCAIBUNKER_IMAGES_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let home = std::env::var_os("HOME").expect("HOME is set");
            PathBuf::from(home).join(".cache/scaibunker/images")
        }
    }
}

/// Fails the test, with what to do, unless the guest artefacts exist.
pub fn require_artefacts(files: &[&str]) -> PathBuf {
    let dir = images_dir();
    let missing: Vec<&str> = files
        .iter()
        .copied()
        .filter(|f| !dir.join(f).is_file())
        .collect();
    assert!(
        missing.is_empty(),
        "guest artefacts {missing:?} are missing from {}: build them with \
         `RUSTFLAGS=\"-C target-feature=+crt-static\" CARGO_TARGET_DIR=$HOME/.cache/scaibunker/target-agent \
         cargo build --release -p scaibunker-agent --target x86_64-unknown-linux-gnu && images/build.sh \
         --agent $HOME/.cache/scaibunker/target-agent/x86_64-unknown-linux-gnu/release/scaibunker-agent` \
         (or point SCAIBUNKER_IMAGES_DIR at a directory that has them)",
        dir.display()
    );
    dir
}

/// A fresh images directory with the real guest kernel and initramfs linked in, for a test
/// that brings its own image.
pub fn images_with_guest(real: &Path) -> tempfile::TempDir {
    let images = tempfile::tempdir().expect("tempdir");
    for f in ["vmlinux", "initramfs.cpio.gz"] {
        std::os::unix::fs::symlink(real.join(f), images.path().join(f)).expect("symlink");
    }
    images
}

/// The SHA-256 of an image, as the worker computes it.
pub fn image_sha256(images: &Path, name: &str) -> String {
    scaibunker_worker::images::sha256_file(&images.join(format!("{name}.ext4")))
        .expect("hash the image")
}

/// A worker started in-process.
pub struct TestWorker {
    handle: Option<WorkerHandle>,
    pub base: String,
    pub http: reqwest::Client,
    /// Kept (not deleted) if the test fails, for its logs.
    data: Option<tempfile::TempDir>,
    pub data_dir: PathBuf,
}

impl TestWorker {
    pub async fn start(images_dir: &Path) -> Self {
        Self::start_with(images_dir, |_| {}).await
    }

    /// Starts a worker; templates are off (a background template build is one more VM
    /// beside the test's) unless `tweak` turns them on.
    pub async fn start_with(images_dir: &Path, tweak: impl FnOnce(&mut WorkerConfig)) -> Self {
        init_tracing();
        let data = tempfile::tempdir().expect("tempdir");
        let mut config =
            WorkerConfig::standalone(TOKEN.into(), data.path().to_owned(), images_dir.to_owned());
        config.templates = scaibunker_worker::config::TemplateMode::Off;
        // QEMU drops to a uid of its own (the default) unless the run asks for the escape
        // hatch, e.g. to compare timings: `SCAIBUNKER_QEMU_RUNAS=off cargo test …`.
        config.qemu_runas = std::env::var("SCAIBUNKER_QEMU_RUNAS").as_deref() != Ok("off");
        tweak(&mut config);
        let registers = config.controller_url.is_some();
        let handle = start(config).await.expect("worker starts");
        if registers {
            // Its API opens only to the credential the controller hands it.
            let credentials = std::sync::Arc::clone(handle.credentials());
            eventually(Duration::from_secs(30), "the worker's registration", || {
                let credentials = std::sync::Arc::clone(&credentials);
                async move { credentials.current().map(drop) }
            })
            .await
            .expect("registered");
        }
        let base = format!("http://{}{WORKER_API_PREFIX}", handle.local_addr());
        Self {
            handle: Some(handle),
            base,
            http: reqwest::Client::new(),
            data_dir: data.path().to_owned(),
            data: Some(data),
        }
    }

    pub fn handle(&self) -> &WorkerHandle {
        self.handle.as_ref().expect("running")
    }

    pub fn bunker_dir(&self, id: &str) -> PathBuf {
        self.data_dir.join("bunkers").join(id)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// What the worker's API accepts: its credential once a controller gave it one, else
    /// the token it was started with.
    pub fn token(&self) -> String {
        self.handle
            .as_ref()
            .and_then(|h| h.credentials().current())
            .unwrap_or_else(|| TOKEN.to_owned())
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.get(self.url(path)).bearer_auth(self.token())
    }

    /// Runs `cmd` with `/bin/sh -c` as root in bunker `id`; panics unless the worker answers.
    pub async fn exec_sh(&self, id: &str, cmd: &str) -> scaibunker_proto::worker::ExecResult {
        let req = shell(cmd);
        let resp = self
            .post(&format!("/bunkers/{id}/exec"))
            .json(&req)
            .send()
            .await
            .expect("exec request");
        let status = resp.status();
        let text = resp.text().await.expect("body");
        assert_eq!(status, 200, "exec failed: {text}");
        serde_json::from_str(&text).expect("ExecResult")
    }

    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.post(self.url(path)).bearer_auth(self.token())
    }

    pub fn put(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.put(self.url(path)).bearer_auth(self.token())
    }

    pub fn delete(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.delete(self.url(path)).bearer_auth(self.token())
    }

    /// `POST /bunkers`; the raw response.
    pub async fn create_raw(&self, id: &str, image: &str, memory_mb: u64) -> reqwest::Response {
        self.create_named(id, image, memory_mb, "testbox").await
    }

    /// `POST /bunkers` with a host name; the raw response.
    pub async fn create_named(
        &self,
        id: &str,
        image: &str,
        memory_mb: u64,
        hostname: &str,
    ) -> reqwest::Response {
        self.create_sized(id, image, memory_mb, 1024, hostname)
            .await
    }

    /// `POST /bunkers` with a disk size and a host name; the raw response.
    pub async fn create_sized(
        &self,
        id: &str,
        image: &str,
        memory_mb: u64,
        disk_mb: u64,
        hostname: &str,
    ) -> reqwest::Response {
        let req = CreateVm {
            bunker_id: id.into(),
            image_sha256: image.into(),
            cpu_millicores: 1000,
            memory_mb,
            disk_mb,
            hostname: hostname.into(),
            env_vars: [("BUNKER_VAR".to_owned(), "from-create".to_owned())].into(),
            image_pull: None,
            snapshot: None,
            tenant_id: String::new(),
            network: Default::default(),
        };
        self.post("/bunkers")
            .json(&req)
            .send()
            .await
            .expect("create request")
    }

    /// Boots a bunker and checks it is running; returns its info and the wall time.
    pub async fn create(&self, id: &str, image: &str, memory_mb: u64) -> (VmInfo, Duration) {
        self.create_with_hostname(id, image, memory_mb, "testbox")
            .await
    }

    /// [`Self::create`] with a host name.
    pub async fn create_with_hostname(
        &self,
        id: &str,
        image: &str,
        memory_mb: u64,
        hostname: &str,
    ) -> (VmInfo, Duration) {
        let started = Instant::now();
        let resp = self.create_named(id, image, memory_mb, hostname).await;
        let status = resp.status();
        let text = resp.text().await.expect("body");
        assert_eq!(status, 200, "create {id} failed: {text}");
        let info: VmInfo = serde_json::from_str(&text).expect("VmInfo");
        assert_eq!(info.status, VmStatus::Running);
        (info, started.elapsed())
    }

    pub async fn info(&self, id: &str) -> VmInfo {
        let resp = self
            .get(&format!("/bunkers/{id}"))
            .send()
            .await
            .expect("get");
        assert_eq!(resp.status(), 200);
        resp.json().await.expect("VmInfo")
    }

    /// Deletes a bunker and checks nothing of it is left.
    pub async fn delete_bunker(&self, id: &str) {
        let resp = self
            .delete(&format!("/bunkers/{id}"))
            .send()
            .await
            .expect("delete");
        assert_eq!(resp.status(), 204);
        self.assert_nothing_left(id);
    }

    /// No QEMU process names the data directory, and the bunker directory is gone.
    pub fn assert_nothing_left(&self, id: &str) {
        let procs = processes_mentioning(&self.data_dir);
        assert!(
            procs.is_empty(),
            "processes still mention {}: {procs:?}",
            self.data_dir.display()
        );
        let dir = self.bunker_dir(id);
        assert!(!dir.join("agent.sock").exists(), "agent.sock left");
        assert!(!dir.join("disk.qcow2").exists(), "disk.qcow2 left");
        assert!(!dir.exists(), "bunker directory {} left", dir.display());
    }

    pub async fn shutdown(mut self) {
        if let Some(handle) = self.handle.take() {
            handle.shutdown().await;
        }
    }
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(data) = self.data.take()
        {
            let kept = data.keep();
            eprintln!("test failed: worker data kept in {}", kept.display());
        }
    }
}

/// Pids (with command lines) of live processes whose command line contains `needle`.
pub fn processes_mentioning(needle: &Path) -> Vec<(u32, String)> {
    let needle = needle.as_os_str().as_encoded_bytes();
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
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        // Zombies have an empty command line and hold nothing.
        if cmdline.windows(needle.len()).any(|w| w == needle) {
            found.push((pid, String::from_utf8_lossy(&cmdline).replace('\0', " ")));
        }
    }
    found
}

/// The error body of a failed call.
pub async fn error_of(resp: reqwest::Response) -> (u16, WorkerError) {
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    let err = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not a WorkerError: {text}"));
    (status, err)
}

/// Polls `check` every 100 ms until it returns `Some`, or fails after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("{what} did not happen within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads the kernel release of the host.
pub fn host_kernel_release() -> Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("read osrelease")?
        .trim()
        .to_owned())
}

/// An exec request running `cmd` with `/bin/sh -c` as root (60 s, 1 MiB of output inline).
pub fn shell(cmd: &str) -> scaibunker_proto::worker::ExecRequest {
    use scaibunker_proto::worker::{ExecRequest, GuestUser, Program};
    ExecRequest {
        program: Program::Shell(cmd.into()),
        env: Default::default(),
        cwd: None,
        user: GuestUser::Root,
        stdin_b64: None,
        timeout_ms: 60_000,
        output_limit_bytes: 1 << 20,
    }
}
