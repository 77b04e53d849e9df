//! Pieces shared by the benchmarks in `benches/`: where they run ([`Machine`]), sample
//! statistics, and the floors they measure against: a guest booted (or restored from a
//! template) by QEMU with the worker's command line and driven over the agent protocol
//! directly ([`RawVm`]), with no worker, controller or HTTP in between.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use scaibunker_proto::agent::{
    Frame, FrameKind, GuestUser, HEADER_LEN, Hello, MAX_FRAME_PAYLOAD, PORT_NAME, Program, Reply,
    Request, Stdin,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixStream;

use crate::{Up, qemu_processes_for};

/// Longest a raw boot or restore may take to say hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(120);
/// Output frames granted back to the agent at a time (the worker's batch).
const CREDIT_BATCH: u32 = 16;

/// Where and on what the figures were measured.
#[derive(Debug, Clone)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    /// `true` for KVM, `false` for TCG (the worker's rule).
    pub kvm: bool,
    /// kHz given to the guest's TSC under TCG, as the worker computes it.
    pub tsc_khz: Option<u64>,
    pub date: String,
    pub commit: String,
    /// Profile of the `scaibunker` binaries (`release`, `debug`).
    pub profile: String,
    /// `/proc/loadavg` (1, 5, 15 min) before the first measurement.
    pub load_start: String,
}

impl Machine {
    pub fn probe() -> Result<Self> {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").context("reading /proc/cpuinfo")?;
        let field = |name: &str| {
            cpuinfo
                .lines()
                .filter(|l| l.starts_with(name))
                .find_map(|l| l.split_once(':').map(|(_, v)| v.trim().to_owned()))
        };
        // The worker's rule (crates/worker/src/vmm/mod.rs): KVM only with vmx/svm, a
        // /dev/kvm and no PVM module.
        let hardware_virt = cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .flat_map(|l| l.split(|c: char| c.is_whitespace() || c == ':'))
            .any(|w| w == "vmx" || w == "svm");
        let kvm = hardware_virt
            && !Path::new("/sys/module/kvm_pvm").exists()
            && Path::new("/dev/kvm").exists();
        let tsc_khz = field("cpu MHz")
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|mhz| mhz.is_finite() && *mhz > 0.0)
            .map(|mhz| (mhz * 1000.0).round() as u64);
        if !kvm && tsc_khz.is_none() {
            bail!("/proc/cpuinfo has no `cpu MHz`; TCG guests need it for their TSC");
        }
        let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
        let mut commit = output("git", &["rev-parse", "--short", "HEAD"], root)?;
        let dirty = output(
            "git",
            &[
                "status",
                "--porcelain",
                "--",
                "crates",
                "images",
                "Cargo.toml",
                "Cargo.lock",
            ],
            root,
        )?;
        if !dirty.is_empty() {
            commit.push_str(" with uncommitted changes to the product");
        }
        let profile = crate::bin_dir()?
            .file_name()
            .map_or_else(|| "?".to_owned(), |n| n.to_string_lossy().into_owned());
        Ok(Self {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model: field("model name").unwrap_or_else(|| "unknown CPU".to_owned()),
            kvm,
            tsc_khz,
            date: output("date", &["-u", "+%Y-%m-%d %H:%M UTC"], root)?,
            commit,
            profile,
            load_start: load_average(),
        })
    }

    pub fn accel(&self) -> &'static str {
        if self.kvm { "kvm" } else { "tcg" }
    }

    /// "otherwise idle" or "shared with other work, …", from the 1-minute load at start.
    pub fn load_words(&self) -> &'static str {
        if self
            .load_start
            .split_whitespace()
            .next()
            .and_then(|l| l.parse::<f64>().ok())
            .is_some_and(|l| l < 0.5)
        {
            "otherwise idle"
        } else {
            "shared with other work, so expect noise"
        }
    }
}

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// A command's trimmed stdout.
fn output(program: &str, args: &[&str], dir: &Path) -> Result<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .with_context(|| format!("running {program}"))?;
    ensure!(out.status.success(), "{program} {args:?}: {}", out.status);
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Nearest-rank percentile (`p` in 0..=100) of unsorted samples.
pub fn percentile(samples: &[Duration], p: u32) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (sorted.len() * p as usize).div_ceil(100).max(1);
    sorted[rank - 1]
}

pub fn median(samples: &[Duration]) -> Duration {
    percentile(samples, 50)
}

pub fn min_max(samples: &[Duration]) -> (Duration, Duration) {
    let min = samples.iter().min().copied().unwrap_or_default();
    let max = samples.iter().max().copied().unwrap_or_default();
    (min, max)
}

/// `12 ms`, `3.40 ms`.
pub fn ms(d: Duration) -> String {
    let v = d.as_secs_f64() * 1000.0;
    if v < 10.0 {
        format!("{v:.2} ms")
    } else {
        format!("{v:.0} ms")
    }
}

/// Median (min–max) in milliseconds: `812 ms (640–1203)`.
pub fn spread_ms(samples: &[Duration]) -> String {
    let (min, max) = min_max(samples);
    format!(
        "{} ({:.0}–{:.0})",
        ms(median(samples)),
        min.as_secs_f64() * 1000.0,
        max.as_secs_f64() * 1000.0
    )
}

/// Decimal megabytes per second of `bytes` moved in `d`.
pub fn mb_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64().max(1e-9)
}

/// The ready template directory of `up`'s worker (one with `template.json` and no build
/// going on, with no VM left running), waiting up to `timeout` for it.
pub async fn wait_template(up: &Up, timeout: Duration) -> Result<PathBuf> {
    let dir = up.data_dir().join("worker/templates");
    let deadline = Instant::now() + timeout;
    loop {
        let mut ready = None;
        let mut building = false;
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let path = e.path();
                if path.to_string_lossy().ends_with(".building") {
                    building = true;
                } else if path.join("template.json").is_file() {
                    ready = Some(path);
                }
            }
        }
        if let (Some(path), false) = (ready, building)
            && qemu_processes_for(up.data_dir()).is_empty()
        {
            return Ok(path);
        }
        if Instant::now() >= deadline {
            bail!(
                "no template in {} within {timeout:?}\n{}",
                dir.display(),
                up.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What a raw VM starts from.
#[derive(Debug, Clone)]
pub enum RawStart {
    /// Boot `base` (a raw image) with the worker's command line.
    Boot { base: PathBuf },
    /// Restore a template directory of the worker (`disk.qcow2`, `vm.state`,
    /// `template.json`) as the worker's driver does: overlay, `-incoming`, `query-migrate`
    /// until `completed`, `cont`.
    Restore { template: PathBuf },
}

/// Times of a raw start.
#[derive(Debug, Clone, Copy)]
pub struct RawStartTimes {
    /// `qemu-img create` of the overlay.
    pub overlay: Duration,
    /// Overlay made → the agent's `HELLO` (QEMU spawn, state load, `cont` included).
    pub hello: Duration,
    /// Overlay start → `HELLO`: what the worker's driver does for a create.
    pub total: Duration,
}

/// A guest started by QEMU with the worker's command line, driven over the agent protocol
/// from here: the floor of everything the worker and the controller add.
pub struct RawVm {
    qemu: tokio::process::Child,
    stream: UnixStream,
    next_stream: u32,
    pub hello: Hello,
    pub times: RawStartTimes,
    /// Kept until the VM is gone.
    _dir: tempfile::TempDir,
}

/// What a raw exec did.
#[derive(Debug, Clone)]
pub struct RawExec {
    /// Request written → first `STDOUT` frame read.
    pub first_stdout: Option<Duration>,
    /// Request written → `REPLY` read.
    pub elapsed: Duration,
    pub stdout_bytes: u64,
    pub stdout: Vec<u8>,
    pub exit_code: Option<i32>,
    /// The agent's own spawn → exit time.
    pub duration_ms: u64,
}

impl RawVm {
    /// Starts a guest of `memory_mb` with one vCPU and waits for the agent's `HELLO`.
    pub async fn start(
        machine: &Machine,
        images: &Path,
        from: &RawStart,
        memory_mb: u64,
    ) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("sb-raw-")
            .tempdir()
            .context("creating the raw VM's directory")?;
        let d = dir.path().to_owned();
        let (base, format, incoming, kernel, initramfs, hostname) = match from {
            RawStart::Boot { base } => (
                base.canonicalize().context("locating the image")?,
                "raw",
                None,
                images.join("vmlinux"),
                images.join("initramfs.cpio.gz"),
                "bunker-rawboot0".to_owned(),
            ),
            RawStart::Restore { template } => {
                let meta: serde_json::Value = serde_json::from_slice(
                    &std::fs::read(template.join("template.json"))
                        .context("reading template.json")?,
                )
                .context("decoding template.json")?;
                let path = |v: &serde_json::Value| {
                    v.as_str()
                        .map(PathBuf::from)
                        .context("template.json lacks a path")
                };
                (
                    template.join("disk.qcow2"),
                    "qcow2",
                    Some(template.join("vm.state")),
                    path(&meta["shape"]["kernel"]["path"])?,
                    path(&meta["shape"]["initramfs"]["path"])?,
                    meta["hostname"]
                        .as_str()
                        .unwrap_or("scaibunker-template")
                        .to_owned(),
                )
            }
        };
        let started = Instant::now();
        let made = tokio::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", format, "-b"])
            .arg(&base)
            .arg(d.join("disk.qcow2"))
            .status()
            .await
            .context("running qemu-img")?;
        ensure!(made.success(), "qemu-img create failed: {made}");
        let overlay = started.elapsed();

        let socket = d.join("agent.sock");
        let listener =
            tokio::net::UnixListener::bind(&socket).context("binding the agent socket")?;
        let log = std::fs::File::create(d.join("qemu.log")).context("creating qemu.log")?;
        let spawned = Instant::now();
        let mut args = qemu_args(machine, &kernel, &initramfs, &d, memory_mb, &hostname);
        if let Some(state) = &incoming {
            args.push("-incoming".into());
            args.push(format!("exec:cat '{}'", state.display()).into());
        }
        let mut qemu = tokio::process::Command::new("qemu-system-x86_64")
            .args(args)
            .current_dir(&d)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("duplicating qemu.log")?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("spawning qemu-system-x86_64")?;
        let qmp = d.join("qmp.sock");
        let ready = async {
            if incoming.is_some() {
                restore_via_qmp(&qmp).await?;
            }
            let (mut stream, _) = listener.accept().await.context("accepting QEMU")?;
            let frame = read_frame(&mut stream).await?;
            ensure!(
                frame.stream_id == 0 && frame.kind == FrameKind::Hello,
                "the first frame is {:?} on stream {}, not HELLO on 0",
                frame.kind,
                frame.stream_id
            );
            let hello: Hello = frame.decode_json().context("decoding HELLO")?;
            Ok((stream, hello))
        };
        let outcome = tokio::select! {
            r = tokio::time::timeout(HELLO_TIMEOUT, ready) => {
                r.map_err(|_| anyhow!("no HELLO within {HELLO_TIMEOUT:?}")).and_then(|r| r)
            }
            status = qemu.wait() => Err(anyhow!("qemu exited before HELLO: {status:?}")),
        };
        match outcome {
            Ok((stream, hello)) => Ok(Self {
                qemu,
                stream,
                next_stream: 1,
                hello,
                times: RawStartTimes {
                    overlay,
                    hello: spawned.elapsed(),
                    total: started.elapsed(),
                },
                _dir: dir,
            }),
            Err(e) => {
                let _ = qemu.start_kill();
                let _ = qemu.wait().await;
                let console = std::fs::read_to_string(d.join("console.log")).unwrap_or_default();
                let qemu_log = std::fs::read_to_string(d.join("qemu.log")).unwrap_or_default();
                Err(e.context(format!(
                    "raw start ({from:?}); qemu.log:\n{qemu_log}\nconsole.log:\n{console}"
                )))
            }
        }
    }

    /// QEMU's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.qemu.id()
    }

    /// Kills QEMU and removes the VM's directory.
    pub async fn stop(mut self) {
        let _ = self.qemu.start_kill();
        let _ = self.qemu.wait().await;
    }

    async fn open(&mut self, request: &Request) -> Result<u32> {
        let id = self.next_stream;
        self.next_stream += 1;
        let frame = Frame::json(id, FrameKind::Request, request);
        self.stream
            .write_all(&frame.encode())
            .await
            .context("writing a REQUEST")?;
        Ok(id)
    }

    /// Reads frames of stream `id` until its `REPLY`, granting credit back as output
    /// frames arrive; `on_output` sees each `STDOUT`/`DATA` payload.
    async fn finish(&mut self, id: u32, mut on_output: impl FnMut(&[u8])) -> Result<Reply> {
        let mut unacked = 0u32;
        loop {
            let frame = read_frame(&mut self.stream).await?;
            ensure!(
                frame.stream_id == id,
                "a frame for stream {} while waiting on {id}",
                frame.stream_id
            );
            match frame.kind {
                FrameKind::Stdout | FrameKind::Stderr | FrameKind::Data => {
                    if frame.kind != FrameKind::Stderr {
                        on_output(&frame.payload);
                    }
                    unacked += 1;
                    if unacked >= CREDIT_BATCH {
                        self.stream
                            .write_all(&Frame::credit(id, unacked).encode())
                            .await
                            .context("writing CREDIT")?;
                        unacked = 0;
                    }
                }
                FrameKind::Reply => return frame.decode_json().context("decoding REPLY"),
                other => bail!("unexpected {other:?} frame on stream {id}"),
            }
        }
    }

    /// Runs `command` with `sh -c` as root, its stdout counted (and kept up to 1 MiB).
    pub async fn exec(&mut self, program: Program) -> Result<RawExec> {
        let started = Instant::now();
        let id = self
            .open(&Request::Exec {
                program,
                env: Default::default(),
                cwd: None,
                user: Default::default(),
                stdin: Stdin::Null,
                timeout_ms: 600_000,
                pty: None,
            })
            .await?;
        let mut first_stdout = None;
        let mut stdout_bytes = 0u64;
        let mut stdout = Vec::new();
        let reply = self
            .finish(id, |bytes| {
                first_stdout.get_or_insert_with(|| started.elapsed());
                stdout_bytes += bytes.len() as u64;
                if stdout.len() < 1 << 20 {
                    stdout.extend_from_slice(bytes);
                }
            })
            .await?;
        let elapsed = started.elapsed();
        match reply {
            Reply::Exited {
                exit_code,
                duration_ms,
                ..
            } => Ok(RawExec {
                first_stdout,
                elapsed,
                stdout_bytes,
                stdout,
                exit_code,
                duration_ms,
            }),
            other => bail!("exec answered {other:?}"),
        }
    }

    /// Writes `content` to `path` through the agent (`WriteFile`: temporary file, fsync,
    /// rename); the time from the request to the agent's `REPLY`.
    pub async fn write_file(&mut self, path: &str, content: &[u8]) -> Result<Duration> {
        let started = Instant::now();
        let id = self
            .open(&Request::WriteFile {
                path: path.to_owned(),
                mode: 0o644,
                user: GuestUser::Root,
            })
            .await?;
        for chunk in content.chunks(MAX_FRAME_PAYLOAD) {
            let mut frame = Vec::with_capacity(HEADER_LEN + chunk.len());
            frame.extend_from_slice(&Frame::header(id, FrameKind::Data, chunk.len()));
            frame.extend_from_slice(chunk);
            self.stream
                .write_all(&frame)
                .await
                .context("writing DATA")?;
        }
        self.stream
            .write_all(&Frame::new(id, FrameKind::End, Vec::new()).encode())
            .await
            .context("writing END")?;
        match self.finish(id, |_| {}).await? {
            Reply::Written { size_bytes } if size_bytes == content.len() as u64 => {
                Ok(started.elapsed())
            }
            other => bail!("write_file answered {other:?}"),
        }
    }

    /// Reads `path` through the agent (`ReadFile`); bytes read and the time to the `REPLY`.
    pub async fn read_file(&mut self, path: &str) -> Result<(u64, Duration)> {
        let started = Instant::now();
        let id = self
            .open(&Request::ReadFile {
                path: path.to_owned(),
                user: GuestUser::Root,
            })
            .await?;
        let mut bytes = 0u64;
        match self.finish(id, |b| bytes += b.len() as u64).await? {
            Reply::Read { size_bytes } if size_bytes == bytes => Ok((bytes, started.elapsed())),
            other => bail!("read_file answered {other:?} after {bytes} bytes"),
        }
    }
}

async fn read_frame(stream: &mut UnixStream) -> Result<Frame> {
    let mut header = [0u8; HEADER_LEN];
    stream
        .read_exact(&mut header)
        .await
        .context("reading a frame header")?;
    let (stream_id, kind, len) = Frame::parse_header(&header)?;
    let mut payload = vec![0u8; len];
    stream
        .read_exact(&mut payload)
        .await
        .context("reading a frame payload")?;
    Ok(Frame::new(stream_id, kind, payload))
}

/// QMP: wait for the socket, negotiate, poll `query-migrate` every 5 ms until `completed`
/// (as the worker's driver does), then `cont`.
async fn restore_via_qmp(socket: &Path) -> Result<()> {
    use tokio::io::AsyncBufReadExt as _;
    let stream = loop {
        match UnixStream::connect(socket).await {
            Ok(s) => break s,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => return Err(e).context("connecting to QMP"),
        }
    };
    let (read, mut write) = stream.into_split();
    let mut lines = tokio::io::BufReader::new(read).lines();
    qmp_answer(&mut lines).await?;
    qmp_command(&mut write, &mut lines, "qmp_capabilities").await?;
    loop {
        let info = qmp_command(&mut write, &mut lines, "query-migrate").await?;
        match info["return"]["status"].as_str() {
            Some("completed") => break,
            Some(s @ ("failed" | "cancelled")) => bail!("incoming migration {s}: {info}"),
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
    qmp_command(&mut write, &mut lines, "cont").await?;
    Ok(())
}

type QmpLines = tokio::io::Lines<tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>>;

/// The next greeting or answer from QMP (events are skipped).
async fn qmp_answer(lines: &mut QmpLines) -> Result<serde_json::Value> {
    loop {
        let line = lines
            .next_line()
            .await
            .context("reading QMP")?
            .context("QMP closed")?;
        let v: serde_json::Value = serde_json::from_str(&line).context("decoding QMP")?;
        if let Some(e) = v.get("error") {
            bail!("QMP error: {e}");
        }
        if v.get("return").is_some() || v.get("QMP").is_some() {
            return Ok(v);
        }
    }
}

async fn qmp_command(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    lines: &mut QmpLines,
    command: &str,
) -> Result<serde_json::Value> {
    write
        .write_all(format!("{{\"execute\":\"{command}\"}}\n").as_bytes())
        .await
        .context("writing to QMP")?;
    qmp_answer(lines).await
}

/// The worker's QEMU arguments (crates/worker/src/vmm/qemu/cmdline.rs) for one vCPU, with
/// `dir` in place of the bunker's directory.
pub fn qemu_args(
    machine: &Machine,
    kernel: &Path,
    initramfs: &Path,
    dir: &Path,
    memory_mb: u64,
    hostname: &str,
) -> Vec<OsString> {
    let p = |path: &Path| path.to_string_lossy().into_owned();
    let mut append = String::from("console=ttyS0 quiet panic=-1");
    let accel: &[&str] = if machine.kvm {
        &["-accel", "kvm", "-M", "microvm", "-cpu", "host"]
    } else {
        if let Some(khz) = machine.tsc_khz {
            append.push_str(&format!(" tsc_early_khz={khz}"));
        }
        append.push_str(" tsc=reliable");
        &["-accel", "tcg", "-M", "microvm", "-cpu", "max"]
    };
    append.push_str(&format!(" scaibunker.hostname={hostname}"));
    let mut args: Vec<String> = accel.iter().map(|s| (*s).to_owned()).collect();
    args.extend([
        "-m".to_owned(),
        memory_mb.to_string(),
        "-smp".to_owned(),
        "1".to_owned(),
        "-nographic".to_owned(),
        "-no-reboot".to_owned(),
        "-nodefaults".to_owned(),
        "-serial".to_owned(),
        format!("file:{}", p(&dir.join("console.log"))),
        "-qmp".to_owned(),
        format!("unix:{},server=on,wait=off", p(&dir.join("qmp.sock"))),
        "-pidfile".to_owned(),
        p(&dir.join("qemu.pid")),
        "-kernel".to_owned(),
        p(kernel),
        "-initrd".to_owned(),
        p(initramfs),
        "-append".to_owned(),
        append,
        "-drive".to_owned(),
        format!(
            "id=d0,file={},format=qcow2,if=none",
            p(&dir.join("disk.qcow2")).replace(',', ",,")
        ),
        "-device".to_owned(),
        "virtio-blk-device,drive=d0".to_owned(),
        "-chardev".to_owned(),
        format!(
            "socket,id=agent,path={}",
            p(&dir.join("agent.sock")).replace(',', ",,")
        ),
        "-device".to_owned(),
        "virtio-serial-device".to_owned(),
        "-device".to_owned(),
        format!("virtserialport,chardev=agent,name={PORT_NAME}"),
    ]);
    args.into_iter().map(OsString::from).collect()
}

/// Runs `run` inside a fresh network and mount namespace: the bench re-executes itself under
/// `unshare --net --mount --fork` (root needed) and the inner run, flagged by
/// `SCAIBUNKER_IN_NET_SANDBOX`, does the work on a two-thread runtime. Nothing it sends can
/// leave the machine.
pub fn in_net_sandbox<F, Fut>(run: F) -> Result<()>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    const FLAG: &str = "SCAIBUNKER_IN_NET_SANDBOX";
    if std::env::var_os(FLAG).is_none() {
        let status = std::process::Command::new("unshare")
            .args(["--net", "--mount", "--fork", "--"])
            .arg(std::env::current_exe()?)
            .env(FLAG, "1")
            .status()
            .context("run unshare (root needed)")?;
        anyhow::ensure!(status.success(), "the sandboxed bench failed: {status}");
        return Ok(());
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run())
}
