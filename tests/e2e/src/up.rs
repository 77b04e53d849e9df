//! [`Up`]: one `scaibunker up` installation in a temporary data directory.
//!
//! Start, step by step:
//! 1. Find the binaries and the static agent (see [`crate::binaries`], [`crate::agent_bin`]).
//! 2. Spawn `scaibunker up --data-dir <temp> --listen 127.0.0.1:0` with
//!    `SCAIBUNKER_AGENT_BIN` passed through (unless [`UpOptions::without_agent_bin`]). Its stderr goes to `<temp>/up.log`; a thread
//!    copies its stdout there line by line and hands the lines over.
//! 3. Wait for `ready <url>` (at most [`READY_TIMEOUT`]: `up` may have to build images),
//!    check the admin key it printed against `<temp>/admin.key`.
//! 4. [`Up::stop`] or drop: SIGTERM, wait [`STOP_TIMEOUT`], then SIGKILL.
//! 5. [`Up::restart`]: 4, then 2 and 3 again on the same data directory (a restarted `up`
//!    prints where the admin key is, not the key).
//!
//! On failure (a start that does not get ready, or a drop while the thread panics) the
//! data directory is kept and `up.log` and `worker.log` are printed.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use rustix::process::{Pid, Signal, kill_process};
use scaibunker_sdk::Client;

/// How long `up` may take to print `ready`, image build included.
pub const READY_TIMEOUT: Duration = Duration::from_secs(300);
/// How long `up` may take to stop after SIGTERM: it gives its worker
/// `SCAIBUNKER_STOP_TIMEOUT_S` (120 s by default) to have its bunkers saved, 30 s more to
/// stop, then kills it.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(180);
/// `up`'s stdout and stderr, in the data directory.
const UP_LOG: &str = "up.log";
/// Lines of each log printed on failure.
const LOG_TAIL_LINES: usize = 300;

/// How to start an installation.
#[derive(Debug, Clone, Default)]
pub struct UpOptions {
    /// `SCAIBUNKER_IMAGES_DIR` for `up` and its worker; inherited when `None`.
    pub images_dir: Option<PathBuf>,
    /// Let the worker build and restore template snapshots. Off by default: a background
    /// template build is one more VM beside a scenario's own.
    pub templates: bool,
    /// More environment for `up` (and so its controller and worker).
    pub env: Vec<(String, String)>,
    /// Start `up` without `SCAIBUNKER_AGENT_BIN`, as after a plain workspace build: `up`
    /// then picks the agent itself.
    pub without_agent_bin: bool,
}

impl UpOptions {
    /// The defaults plus `env` for `up`.
    pub fn with_env(env: &[(&str, &str)]) -> Self {
        Self {
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Self::default()
        }
    }
}

/// Whether `up` starts on a new data directory or on one it ran on before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Boot {
    /// It prints the bootstrap admin key.
    First,
    /// It prints where the admin key is.
    Again,
}

/// A running `scaibunker up`.
pub struct Up {
    options: UpOptions,
    child: Child,
    exit: Option<ExitStatus>,
    url: String,
    key: String,
    images_dir: PathBuf,
    data_dir: PathBuf,
    worker_pid: Option<u32>,
    /// `None` once kept for inspection.
    data: Option<tempfile::TempDir>,
}

impl Up {
    /// Starts `up` and waits until it is ready.
    pub fn start(options: UpOptions) -> Result<Self> {
        let images_dir = match &options.images_dir {
            Some(dir) => dir.clone(),
            None => crate::images_dir()?,
        };
        let data = tempfile::Builder::new()
            .prefix("sb-e2e-")
            .tempdir()
            .context("creating the data directory")?;
        // `up` canonicalises its data directory; processes name it that way.
        let data_dir = data
            .path()
            .canonicalize()
            .context("canonicalising the data directory")?;
        let (child, lines) = spawn(&options, &data_dir)?;
        let mut up = Self {
            options,
            child,
            exit: None,
            url: String::new(),
            key: String::new(),
            images_dir,
            data_dir,
            worker_pid: None,
            data: Some(data),
        };
        up.ready(&lines, Boot::First)?;
        Ok(up)
    }

    /// Stops `up` (SIGTERM, as [`Up::stop`]; it must exit successfully) and starts it again on
    /// the same data directory, waiting until it is ready. The URL changes (a new port).
    pub fn restart(&mut self) -> Result<()> {
        let status = self.stop()?;
        if !status.success() {
            bail!("`scaibunker up` exited with {status} on SIGTERM");
        }
        let (child, lines) = spawn(&self.options, &self.data_dir)?;
        self.child = child;
        self.exit = None;
        self.ready(&lines, Boot::Again)
    }

    /// Waits for `ready`; on failure stops `up`, keeps the data and says where.
    fn ready(&mut self, lines: &mpsc::Receiver<String>, boot: Boot) -> Result<()> {
        match self.wait_ready(lines, boot) {
            Ok(()) => Ok(()),
            Err(e) => {
                let _ = self.stop();
                let kept = self.keep_data();
                Err(e.context(format!(
                    "`scaibunker up` did not get ready (data kept in {})\n{}",
                    kept.display(),
                    self.logs()
                )))
            }
        }
    }

    fn wait_ready(&mut self, lines: &mpsc::Receiver<String>, boot: Boot) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut printed_key = None;
        let url = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(url) = line.strip_prefix("ready ") {
                        break url.trim().to_owned();
                    }
                    if line.starts_with("admin key")
                        && let Some((_, key)) = line.rsplit_once(": ")
                    {
                        printed_key = Some(key.trim().to_owned());
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!("no `ready` line within {READY_TIMEOUT:?}")
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().context("waiting for up")?;
                    self.exit = Some(status);
                    bail!("`scaibunker up` exited ({status}) before printing `ready`");
                }
            }
        };
        let key_path = self.data_dir.join("admin.key");
        let key = std::fs::read_to_string(&key_path)
            .with_context(|| format!("reading {}", key_path.display()))?
            .trim()
            .to_owned();
        match printed_key {
            Some(printed) if printed == key => {}
            Some(printed)
                if boot == Boot::Again && printed == format!("in {}", key_path.display()) => {}
            Some(printed) => bail!(
                "up printed the admin key {printed:?} but {} holds {key:?}",
                key_path.display()
            ),
            None => bail!("up did not print the admin key line before `ready`"),
        }
        self.url = url;
        self.key = key;
        self.worker_pid = worker_pid_from_log(&self.data_dir.join(UP_LOG));
        Ok(())
    }

    /// The API base URL, e.g. `http://127.0.0.1:41234`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The bootstrap admin key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Deletes an object from the installation's store through the storage proxy, with a
    /// one-minute capability the admin mints for it (workers cannot delete).
    pub async fn delete_object(&self, key: &str) -> Result<()> {
        let http = reqwest::Client::new();
        let prefix = key.rsplit_once('/').map_or(key, |(dir, _)| dir);
        let cap: serde_json::Value = http
            .post(format!(
                "{}/v1/modules/scaibunker/storage/capabilities",
                self.url
            ))
            .bearer_auth(&self.key)
            .json(&serde_json::json!({
                "prefix": format!("{prefix}/"), "verbs": ["delete"], "ttl_s": 60
            }))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let token = cap["data"]["token"].as_str().context("capability token")?;
        let resp = http
            .delete(format!(
                "{}/v1/modules/scaibunker/storage/objects/{key}",
                self.url
            ))
            .bearer_auth(token)
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!("deleting {key} answered {}", resp.status());
        }
        Ok(())
    }

    /// An SDK client with the admin key.
    pub fn client(&self) -> Client {
        Client::new(self.url.clone(), Some(self.key.clone()))
    }

    /// An SDK client with the given key (or none).
    pub fn client_with_key(&self, key: Option<&str>) -> Client {
        Client::new(self.url.clone(), key.map(str::to_owned))
    }

    /// The canonical data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The guest artefacts directory this installation boots from.
    pub fn images_dir(&self) -> &Path {
        &self.images_dir
    }

    /// The worker's pid, from `up`'s `worker started (pid N)` line.
    /// Starts one more worker daemon (`scaibunker-worker`) against this controller, with its
    /// own data directory (`worker-NAME` under `up`'s) and `env` on top. The caller owns the
    /// child; it also exits (stopping its VMs) when the test process goes away.
    pub fn add_worker(&self, name: &str, env: &[(&str, &str)]) -> Result<Child> {
        let bins = crate::binaries()?;
        let token = std::fs::read_to_string(self.data_dir.join("worker.token"))
            .context("reading the installation's worker token")?;
        let dir = self.data_dir.join(format!("worker-{name}"));
        std::fs::create_dir_all(&dir)?;
        let log = File::create(dir.join("worker.log"))?;
        let mut command = Command::new(&bins.worker);
        command
            .env("SCAIBUNKER_CONTROLLER_URL", &self.url)
            .env("SCAIBUNKER_WORKER_TOKEN", token.trim())
            .env("SCAIBUNKER_WORKER_DATA_DIR", &dir)
            .env("SCAIBUNKER_IMAGES_DIR", &self.images_dir)
            .env("SCAIBUNKER_WORKER_NAME", name)
            .env("SCAIBUNKER_TEMPLATES", "off")
            // Bunker networks change the host (a table, forwarding): only the network tests,
            // in their own namespace, turn them on.
            .env("SCAIBUNKER_NETWORKS", "off")
            .env("SCAIBUNKER_EXIT_WITH_PARENT", "1")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        command.envs(env.iter().copied());
        command
            .spawn()
            .with_context(|| format!("starting {}", bins.worker.display()))
    }

    /// Every worker the controller knows (`GET /workers`, admin key).
    pub async fn workers(&self) -> Vec<scaibunker_api::workers::Worker> {
        let v: serde_json::Value = reqwest::Client::new()
            .get(format!("{}/v1/modules/scaibunker/workers", self.url))
            .bearer_auth(&self.key)
            .send()
            .await
            .expect("list workers")
            .json()
            .await
            .expect("json");
        serde_json::from_value(v["data"].clone()).expect("worker records")
    }

    /// The pid of `up` itself (the controller runs in it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn worker_pid(&self) -> Option<u32> {
        self.worker_pid
    }

    /// Entries of the worker's bunker directory (one per bunker with a VM or leftovers).
    pub fn bunker_dirs(&self) -> Vec<String> {
        match std::fs::read_dir(self.data_dir.join("worker/bunkers")) {
            Ok(entries) => entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// SIGTERM, and the exit status once `up` is gone; SIGKILL after [`STOP_TIMEOUT`].
    pub fn stop(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.exit {
            return Ok(status);
        }
        if let Some(status) = self.child.try_wait().context("polling up")? {
            self.exit = Some(status);
            return Ok(status);
        }
        let pid = i32::try_from(self.child.id())
            .ok()
            .and_then(Pid::from_raw)
            .context("up's pid is a valid pid")?;
        kill_process(pid, Signal::TERM).context("sending SIGTERM to up")?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().context("polling up")? {
                self.exit = Some(status);
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let status = self.child.wait().context("waiting for up")?;
        self.exit = Some(status);
        bail!("`scaibunker up` did not stop within {STOP_TIMEOUT:?} of SIGTERM; killed it")
    }

    /// Creates a running bunker of the `tiny` image (256 MiB), the usual start of a test.
    pub async fn tiny_bunker(&self) -> scaibunker_api::bunkers::Bunker {
        let bunker = self
            .client()
            .create_bunker(&scaibunker_api::bunkers::CreateBunker {
                image: Some("tiny".into()),
                memory_mb: Some(256),
                ..Default::default()
            })
            .await
            .expect("create a tiny bunker");
        assert_eq!(bunker.status, "running", "{:?}", bunker.failure_reason);
        bunker
    }

    /// Runs the `scaibunker` CLI against this installation with `stdin` piped in; returns
    /// its exit code, stdout and stderr.
    pub async fn cli(&self, args: &[&str], stdin: &[u8]) -> (i32, String, String) {
        use tokio::io::AsyncWriteExt as _;
        let bins = crate::binaries().expect("binaries");
        let mut child = tokio::process::Command::new(&bins.scaibunker)
            .args(args)
            .env("SCAIBUNKER_URL", self.url())
            .env("SCAIBUNKER_API_KEY", self.key())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run the scaibunker CLI");
        let mut input = child.stdin.take().expect("piped stdin");
        let stdin = stdin.to_vec();
        // Fed on the side: the CLI may write output before it reads all of its input.
        let feed = tokio::spawn(async move {
            let _ = input.write_all(&stdin).await;
        });
        let out = child.wait_with_output().await.expect("wait for the CLI");
        let _ = feed.await;
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Keeps the data directory (for its logs) instead of deleting it; returns its path.
    pub fn keep_data(&mut self) -> PathBuf {
        if let Some(data) = self.data.take() {
            let _ = data.keep();
        }
        self.data_dir.clone()
    }

    /// The tails of `up.log` and `worker.log`.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for name in [UP_LOG, "worker.log"] {
            let path = self.data_dir.join(name);
            out.push_str(&format!("---- {} ----\n", path.display()));
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    let lines: Vec<&str> = text.lines().collect();
                    let from = lines.len().saturating_sub(LOG_TAIL_LINES);
                    for line in &lines[from..] {
                        out.push_str(line);
                        out.push('\n');
                    }
                }
                Err(e) => out.push_str(&format!("(unreadable: {e})\n")),
            }
        }
        out
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let stopped = self.stop();
        if std::thread::panicking() {
            let kept = self.keep_data();
            eprintln!(
                "test failed: `scaibunker up` data kept in {} (stop: {stopped:?})\n{}",
                kept.display(),
                self.logs()
            );
        }
    }
}

/// Spawns `scaibunker up` on `data_dir` (step 2 of the module docs); its stdout lines.
fn spawn(options: &UpOptions, data_dir: &Path) -> Result<(Child, mpsc::Receiver<String>)> {
    let bins = crate::binaries()?;
    let agent = crate::agent_bin()?;
    let log_path = data_dir.join(UP_LOG);
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;

    let mut command = Command::new(&bins.scaibunker);
    command
        .arg("up")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--listen")
        .arg("127.0.0.1:0")
        // Plain logs for people reading them on failure.
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log.try_clone().context("duplicating the log file")?);
    if options.without_agent_bin {
        command.env_remove("SCAIBUNKER_AGENT_BIN");
    } else {
        command.env("SCAIBUNKER_AGENT_BIN", &agent);
    }
    if let Some(dir) = &options.images_dir {
        command.env("SCAIBUNKER_IMAGES_DIR", dir);
    }
    command.env(
        "SCAIBUNKER_TEMPLATES",
        if options.templates { "on" } else { "off" },
    );
    // Bunker networks change the host (a table, forwarding): only the network tests, in
    // their own namespace, turn them on (`SCAIBUNKER_NETWORKS=on` in `options.env`).
    command.env("SCAIBUNKER_NETWORKS", "off");
    command.envs(options.env.iter().map(|(k, v)| (k, v)));
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {}", bins.scaibunker.display()))?;
    let stdout = child.stdout.take().context("up's stdout is piped")?;
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || copy_lines(stdout, log, lines_tx));
    Ok((child, lines))
}

/// Copies `up`'s stdout into the log and hands each line to the waiting harness.
fn copy_lines(stdout: ChildStdout, mut log: File, lines: mpsc::Sender<String>) {
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        // The log is for people; losing a line of it must not stop the copy.
        let _ = writeln!(log, "{line}");
        // Nobody listens after `ready`; the copy goes on so `up` never blocks on a full pipe.
        let _ = lines.send(line);
    }
}

/// The pid in the last `[up] worker started (pid N), …`.
fn worker_pid_from_log(path: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(path).ok()?;
    // The last one: a restarted `up` appends to the same log.
    text.lines().rev().find_map(|l| {
        let rest = l.split_once("worker started (pid ")?.1;
        rest.split(')').next()?.parse().ok()
    })
}
