//! The walking skeleton's costs, each beside its floor, measured in one run and written to
//! the "Walking skeleton" section of `docs/benchmarks.md`:
//!
//! 1. Bare host spawn of `/bin/true` (the host floor).
//! 2. Cold create → exec-ready through the API (`POST /bunkers` with `wait`, then a first
//!    exec of `true`), alternating with a raw boot: QEMU spawned here with the worker's
//!    command line over a copy-on-write overlay of the same image, timed from spawn to the
//!    agent's `HELLO` frame on the agent socket.
//! 3. Exec `/bin/true` round trips through the controller, against the cost of one spawn
//!    timed inside the guest (a 50-spawn shell loop minus an empty loop, over 50).
//!
//! One VM runs at a time (two-core hosts).
//!
//! Run: `cargo build --release --workspace && SCAIBUNKER_AGENT_BIN=$(scripts/build-agent.sh)
//! cargo bench -p scaibunker-e2e --bench walking_skeleton` (the bench uses the binaries of
//! its own profile).

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use scaibunker_api::bunkers::CreateBunker;
use scaibunker_api::exec::ExecRequest;
use scaibunker_e2e::{Up, UpOptions, eventually, qemu_processes_for};
use scaibunker_proto::agent::{Frame, FrameKind, HEADER_LEN, Hello, PORT_NAME};
use scaibunker_sdk::Client;
use tokio::io::AsyncReadExt as _;

const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/benchmarks.md");
const HEADING: &str = "## Walking skeleton";

const COLD_RUNS: usize = 5;
const EXEC_WARMUPS: usize = 3;
const EXEC_RUNS: usize = 30;
const HOST_RUNS: usize = 100;
/// Spawns in the in-guest loop, and how many times each loop runs.
const LOOP_SPAWNS: u32 = 50;
const LOOP_REPEATS: usize = 3;
/// Longest a raw boot may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest a deleted bunker's VM may take to go away.
const CLEANUP: Duration = Duration::from_secs(10);

fn main() -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    runtime.block_on(run())
}

async fn run() -> Result<()> {
    let machine = Machine::probe()?;
    eprintln!("[bench] {machine:?}");

    eprintln!("[bench] host floor: {HOST_RUNS} spawns of /bin/true");
    let host = host_spawns(HOST_RUNS)?;

    let mut up = Up::start(UpOptions::default())?;
    let client = up.client();
    let mut cold = Vec::new();
    for image in ["default", "tiny"] {
        if !up.images_dir().join(format!("{image}.ext4")).is_file() {
            eprintln!("[bench] no {image}.ext4; skipping it");
            continue;
        }
        cold.push(cold_boots(&up, &client, &machine, image).await?);
    }
    let exec = exec_round_trips(&up, &client).await?;
    let status = up.stop()?;
    ensure!(status.success(), "up exited with {status}");

    let section = render(&machine, &host, &cold, &exec);
    let old = match std::fs::read_to_string(DOC) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            "# Benchmarks\n\nFigures written by the benchmark binaries; each section belongs \
             to one of them and is replaced when it runs.\n"
                .to_owned()
        }
        Err(e) => return Err(e).context("reading docs/benchmarks.md"),
    };
    let new = scaibunker_e2e::doc::replace_section(&old, HEADING, &section);
    std::fs::write(DOC, new).context("writing docs/benchmarks.md")?;
    println!("{section}");
    eprintln!("[bench] written to {}", Path::new(DOC).display());
    Ok(())
}

/// Where and on what the figures were measured.
#[derive(Debug)]
struct Machine {
    nproc: usize,
    cpu_model: String,
    accel: Accel,
    /// kHz given to the guest's TSC under TCG, as the worker computes it.
    tsc_khz: Option<u64>,
    date: String,
    commit: String,
    /// Profile of the `scaibunker` binaries (`release`, `debug`).
    profile: String,
    /// `/proc/loadavg` (1, 5, 15 min) before the first measurement: other work on the
    /// host shows up in every figure.
    load_start: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Accel {
    Kvm,
    Tcg,
}

impl Machine {
    fn probe() -> Result<Self> {
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
        let accel = if hardware_virt
            && !Path::new("/sys/module/kvm_pvm").exists()
            && Path::new("/dev/kvm").exists()
        {
            Accel::Kvm
        } else {
            Accel::Tcg
        };
        let tsc_khz = field("cpu MHz")
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|mhz| mhz.is_finite() && *mhz > 0.0)
            .map(|mhz| (mhz * 1000.0).round() as u64);
        if accel == Accel::Tcg && tsc_khz.is_none() {
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
        let profile = scaibunker_e2e::bin_dir()?
            .file_name()
            .map_or_else(|| "?".to_owned(), |n| n.to_string_lossy().into_owned());
        Ok(Self {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model: field("model name").unwrap_or_else(|| "unknown CPU".to_owned()),
            accel,
            tsc_khz,
            date: output("date", &["-u", "+%Y-%m-%d %H:%M UTC"], root)?,
            commit,
            profile,
            load_start: load_average(),
        })
    }
}

/// The 1, 5 and 15 minute load averages.
fn load_average() -> String {
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

/// `/bin/true` spawned and waited for from here.
fn host_spawns(n: usize) -> Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let status = std::process::Command::new("/bin/true")
            .status()
            .context("spawning /bin/true")?;
        times.push(started.elapsed());
        ensure!(status.success(), "/bin/true failed: {status}");
    }
    Ok(times)
}

/// One image's cold boots, through the API and raw.
struct ColdBoots {
    image: String,
    memory_mb: u64,
    /// POST (wait) → running → first exec done.
    api_ready: Vec<Duration>,
    /// POST (wait) → running.
    api_create: Vec<Duration>,
    /// QEMU spawn → HELLO.
    raw_hello: Vec<Duration>,
    /// `qemu-img create` of the raw boot's overlay (not in `raw_hello`).
    raw_overlay: Vec<Duration>,
}

async fn cold_boots(up: &Up, client: &Client, machine: &Machine, image: &str) -> Result<ColdBoots> {
    let mut boots = ColdBoots {
        image: image.to_owned(),
        memory_mb: 0,
        api_ready: Vec::new(),
        api_create: Vec::new(),
        raw_hello: Vec::new(),
        raw_overlay: Vec::new(),
    };
    // Alternate the two so that drift on the host weighs on both alike.
    for run in 1..=COLD_RUNS {
        let started = Instant::now();
        let bunker = client
            .create_bunker(&CreateBunker {
                image: Some(image.to_owned()),
                wait: Some(true),
                ..Default::default()
            })
            .await
            .with_context(|| format!("creating a bunker from {image}"))?;
        ensure!(
            bunker.status == "running",
            "bunker from {image} is {}: {:?}",
            bunker.status,
            bunker.failure_reason
        );
        let created = started.elapsed();
        let out = client
            .exec(&bunker.id, &argv(&["true"]))
            .await
            .context("first exec")?;
        ensure!(out.exit_code == Some(0), "first exec: {out:?}");
        let ready = started.elapsed();
        client
            .delete_bunker(&bunker.id)
            .await
            .context("deleting the bunker")?;
        wait_no_vm(up).await?;
        boots.memory_mb = bunker.memory_mb;
        boots.api_create.push(created);
        boots.api_ready.push(ready);

        let raw = raw_boot(up.images_dir(), image, bunker.memory_mb, machine).await?;
        boots.raw_hello.push(raw.hello);
        boots.raw_overlay.push(raw.overlay);
        eprintln!(
            "[bench] {image} #{run}: api create {} ms, exec-ready {} ms; raw hello {} ms (guest {})",
            created.as_millis(),
            ready.as_millis(),
            raw.hello.as_millis(),
            raw.guest_kernel
        );
    }
    Ok(boots)
}

async fn wait_no_vm(up: &Up) -> Result<()> {
    eventually(CLEANUP, "the deleted bunker's VM to go", || {
        let left = qemu_processes_for(up.data_dir());
        if left.is_empty() && up.bunker_dirs().is_empty() {
            Ok(())
        } else {
            Err(format!("{left:?}"))
        }
    })
    .await
}

struct RawBoot {
    hello: Duration,
    overlay: Duration,
    guest_kernel: String,
}

/// Boots `image` with the worker's QEMU command line and waits for the agent's HELLO.
async fn raw_boot(
    images: &Path,
    image: &str,
    memory_mb: u64,
    machine: &Machine,
) -> Result<RawBoot> {
    let dir = tempfile::Builder::new()
        .prefix("sb-raw-")
        .tempdir()
        .context("creating the raw boot's directory")?;
    let d = dir.path();
    let base = images
        .join(format!("{image}.ext4"))
        .canonicalize()
        .context("locating the image")?;
    let overlay_started = Instant::now();
    let made = tokio::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&base)
        .arg(d.join("disk.qcow2"))
        .status()
        .await
        .context("running qemu-img")?;
    ensure!(made.success(), "qemu-img create failed: {made}");
    let overlay = overlay_started.elapsed();

    let socket = d.join("agent.sock");
    let listener = tokio::net::UnixListener::bind(&socket).context("binding the agent socket")?;
    let log = std::fs::File::create(d.join("qemu.log")).context("creating qemu.log")?;
    let started = Instant::now();
    let mut qemu = tokio::process::Command::new("qemu-system-x86_64")
        .args(qemu_args(machine, images, d, memory_mb))
        .current_dir(d)
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("duplicating qemu.log")?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("spawning qemu-system-x86_64")?;
    let hello = async {
        let (mut stream, _) = listener.accept().await.context("accepting QEMU")?;
        let mut header = [0u8; HEADER_LEN];
        stream
            .read_exact(&mut header)
            .await
            .context("reading the first frame header")?;
        let elapsed = started.elapsed();
        let (stream_id, kind, len) = Frame::parse_header(&header)?;
        ensure!(
            stream_id == 0 && kind == FrameKind::Hello,
            "the first frame is {kind:?} on stream {stream_id}, not HELLO on 0"
        );
        let mut payload = vec![0u8; len];
        stream
            .read_exact(&mut payload)
            .await
            .context("reading HELLO")?;
        let hello: Hello = serde_json::from_slice(&payload).context("decoding HELLO")?;
        Ok((elapsed, hello))
    };
    let outcome = tokio::select! {
        r = tokio::time::timeout(HELLO_TIMEOUT, hello) => {
            r.map_err(|_| anyhow::anyhow!("no HELLO within {HELLO_TIMEOUT:?}")).and_then(|r| r)
        }
        status = qemu.wait() => Err(anyhow::anyhow!("qemu exited before HELLO: {status:?}")),
    };
    let _ = qemu.start_kill();
    let _ = qemu.wait().await;
    match outcome {
        Ok((hello, agent)) => Ok(RawBoot {
            hello,
            overlay,
            guest_kernel: agent.kernel,
        }),
        Err(e) => {
            let console = std::fs::read_to_string(d.join("console.log")).unwrap_or_default();
            let qemu_log = std::fs::read_to_string(d.join("qemu.log")).unwrap_or_default();
            Err(e.context(format!(
                "raw boot of {image}; qemu.log:\n{qemu_log}\nconsole.log:\n{console}"
            )))
        }
    }
}

/// The worker's QEMU arguments (crates/worker/src/vmm/qemu/cmdline.rs) for one vCPU, with
/// this benchmark's directory in place of the bunker's.
fn qemu_args(machine: &Machine, images: &Path, dir: &Path, memory_mb: u64) -> Vec<OsString> {
    let p = |path: PathBuf| path.to_string_lossy().into_owned();
    let mut append = String::from("console=ttyS0 quiet panic=-1");
    let accel: &[&str] = match machine.accel {
        Accel::Tcg => {
            if let Some(khz) = machine.tsc_khz {
                let _ = write!(append, " tsc_early_khz={khz}");
            }
            append.push_str(" tsc=reliable");
            &["-accel", "tcg", "-M", "microvm", "-cpu", "max"]
        }
        Accel::Kvm => &["-accel", "kvm", "-M", "microvm", "-cpu", "host"],
    };
    append.push_str(" scaibunker.hostname=bunker-rawboot0");
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
        format!("file:{}", p(dir.join("console.log"))),
        "-qmp".to_owned(),
        format!("unix:{},server=on,wait=off", p(dir.join("qmp.sock"))),
        "-pidfile".to_owned(),
        p(dir.join("qemu.pid")),
        "-kernel".to_owned(),
        p(images.join("vmlinux")),
        "-initrd".to_owned(),
        p(images.join("initramfs.cpio.gz")),
        "-append".to_owned(),
        append,
        "-drive".to_owned(),
        format!(
            "id=d0,file={},format=qcow2,if=none",
            p(dir.join("disk.qcow2")).replace(',', ",,")
        ),
        "-device".to_owned(),
        "virtio-blk-device,drive=d0".to_owned(),
        "-chardev".to_owned(),
        format!(
            "socket,id=agent,path={}",
            p(dir.join("agent.sock")).replace(',', ",,")
        ),
        "-device".to_owned(),
        "virtio-serial-device".to_owned(),
        "-device".to_owned(),
        format!("virtserialport,chardev=agent,name={PORT_NAME}"),
    ]);
    args.into_iter().map(OsString::from).collect()
}

fn argv(args: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: Some(args.iter().map(|a| (*a).to_owned()).collect()),
        ..Default::default()
    }
}

struct ExecRoundTrips {
    /// Client-side wall time of each SDK exec.
    round_trip: Vec<Duration>,
    /// The `duration_ms` the platform reported for the same execs.
    reported: Vec<Duration>,
    /// `duration_ms` of the 50-spawn loop and of the empty loop, per repeat.
    spawn_loop: Vec<Duration>,
    empty_loop: Vec<Duration>,
}

impl ExecRoundTrips {
    /// One in-guest spawn: (median loop − median empty loop) / spawns.
    fn in_guest_spawn(&self) -> Duration {
        median(&self.spawn_loop).saturating_sub(median(&self.empty_loop)) / LOOP_SPAWNS
    }
}

async fn exec_round_trips(up: &Up, client: &Client) -> Result<ExecRoundTrips> {
    let bunker = client
        .create_bunker(&CreateBunker {
            image: Some("default".to_owned()),
            wait: Some(true),
            ..Default::default()
        })
        .await
        .context("creating the exec bunker")?;
    ensure!(bunker.status == "running", "exec bunker: {bunker:?}");
    let id = bunker.id;
    let exec = |args: Vec<String>| {
        let client = client.clone();
        let id = id.clone();
        async move {
            let started = Instant::now();
            let out = client
                .exec(
                    &id,
                    &ExecRequest {
                        argv: Some(args.clone()),
                        ..Default::default()
                    },
                )
                .await
                .with_context(|| format!("exec {args:?}"))?;
            let elapsed = started.elapsed();
            ensure!(out.exit_code == Some(0), "exec {args:?}: {out:?}");
            anyhow::Ok((elapsed, Duration::from_millis(out.duration_ms)))
        }
    };
    let true_argv = vec!["/bin/true".to_owned()];
    eprintln!("[bench] exec /bin/true: {EXEC_WARMUPS} warm-ups, {EXEC_RUNS} runs");
    for _ in 0..EXEC_WARMUPS {
        exec(true_argv.clone()).await?;
    }
    let mut round_trip = Vec::new();
    let mut reported = Vec::new();
    for _ in 0..EXEC_RUNS {
        let (wall, agent) = exec(true_argv.clone()).await?;
        round_trip.push(wall);
        reported.push(agent);
    }
    let shell = |body: &str| {
        vec![
            "sh".to_owned(),
            "-c".to_owned(),
            format!("i=0; while [ $i -lt {LOOP_SPAWNS} ]; do {body}i=$((i+1)); done"),
        ]
    };
    let mut spawn_loop = Vec::new();
    let mut empty_loop = Vec::new();
    for _ in 0..LOOP_REPEATS {
        spawn_loop.push(exec(shell("/bin/true; ")).await?.1);
        empty_loop.push(exec(shell("")).await?.1);
    }
    client
        .delete_bunker(&id)
        .await
        .context("deleting the exec bunker")?;
    wait_no_vm(up).await?;
    Ok(ExecRoundTrips {
        round_trip,
        reported,
        spawn_loop,
        empty_loop,
    })
}

/// Nearest-rank percentile (`p` in 0..=100) of unsorted samples.
fn percentile(samples: &[Duration], p: u32) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (sorted.len() * p as usize).div_ceil(100).max(1);
    sorted[rank - 1]
}

fn median(samples: &[Duration]) -> Duration {
    percentile(samples, 50)
}

fn min_max(samples: &[Duration]) -> (Duration, Duration) {
    let min = samples.iter().min().copied().unwrap_or_default();
    let max = samples.iter().max().copied().unwrap_or_default();
    (min, max)
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn ms(d: Duration) -> String {
    let v = d.as_secs_f64() * 1000.0;
    if v < 10.0 {
        format!("{v:.2} ms")
    } else {
        format!("{v:.0} ms")
    }
}

fn spread_s(samples: &[Duration]) -> String {
    let (min, max) = min_max(samples);
    format!(
        "{} ({:.2}–{:.2})",
        secs(median(samples)),
        min.as_secs_f64(),
        max.as_secs_f64()
    )
}

fn render(m: &Machine, host: &[Duration], cold: &[ColdBoots], exec: &ExecRoundTrips) -> String {
    let accel = match m.accel {
        Accel::Tcg => "tcg",
        Accel::Kvm => "kvm",
    };
    let mut s = String::new();
    let _ = writeln!(s, "{HEADING}\n");
    let _ = writeln!(
        s,
        "<!-- Written by tests/e2e/benches/walking_skeleton.rs; a run replaces this section. -->\n"
    );
    let _ = writeln!(
        s,
        "Measured {} at commit `{}` ({} binaries) on {}, nproc {}, accelerator `{accel}`: \
         QEMU microvm, 1 vCPU per guest, one guest at a time. Load average (1/5/15 min) {} \
         before, {} after: the host was {}.\n",
        m.date,
        m.commit,
        m.profile,
        m.cpu_model,
        m.nproc,
        m.load_start,
        load_average(),
        if m.load_start
            .split_whitespace()
            .next()
            .and_then(|l| l.parse::<f64>().ok())
            .is_some_and(|l| l < 0.5)
        {
            "otherwise idle"
        } else {
            "shared with other work, so expect noise"
        }
    );
    let _ = writeln!(
        s,
        "Reproduce: `cargo build --release --workspace && \
         SCAIBUNKER_AGENT_BIN=$(scripts/build-agent.sh) \
         cargo bench -p scaibunker-e2e --bench walking_skeleton`\n"
    );

    let _ = writeln!(s, "### Cold create → exec-ready\n");
    let _ = writeln!(
        s,
        "| image | through the API: create (`wait`) + first exec `true` | of which create | \
         floor: raw QEMU spawn → agent `HELLO` | API ÷ floor |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|");
    for c in cold {
        let ratio = median(&c.api_ready).as_secs_f64() / median(&c.raw_hello).as_secs_f64();
        let _ = writeln!(
            s,
            "| `{}` ({} MiB) | {} | {} | {} | {ratio:.2}× |",
            c.image,
            c.memory_mb,
            spread_s(&c.api_ready),
            spread_s(&c.api_create),
            spread_s(&c.raw_hello),
        );
    }
    let overlays: Vec<Duration> = cold.iter().flat_map(|c| c.raw_overlay.clone()).collect();
    let _ = writeln!(
        s,
        "\nMedian (min–max) of {COLD_RUNS} runs each, API and raw boots alternating. The raw \
         boot is the worker's QEMU command line (same kernel, initramfs, accelerator and TSC \
         arguments, a qcow2 overlay of the same image) with this benchmark listening on the \
         agent socket; making its overlay (`qemu-img create`, median {}) is outside the floor \
         but inside the API figure.\n",
        ms(median(&overlays))
    );

    let floor = exec.in_guest_spawn();
    let p50 = median(&exec.round_trip);
    let _ = writeln!(s, "### Exec `/bin/true` round trip\n");
    let _ = writeln!(s, "| figure | value |");
    let _ = writeln!(s, "|---|---|");
    let _ = writeln!(
        s,
        "| through the controller (SDK exec, argv `[\"/bin/true\"]`), p50 / p99, N = {EXEC_RUNS} \
         after {EXEC_WARMUPS} warm-ups | {} / {} |",
        ms(p50),
        ms(percentile(&exec.round_trip, 99))
    );
    let _ = writeln!(
        s,
        "| `duration_ms` of those execs (timed by the guest agent, spawn → exit), p50 | {} |",
        ms(median(&exec.reported))
    );
    let _ = writeln!(
        s,
        "| floor: one `/bin/true` spawn inside the guest, (loop of {LOOP_SPAWNS} − empty loop) ÷ \
         {LOOP_SPAWNS} | {} |",
        ms(floor)
    );
    let _ = writeln!(
        s,
        "| platform overhead (p50 − floor) | {} |",
        ms(p50.saturating_sub(floor))
    );
    let _ = writeln!(
        s,
        "\nThe loops ran as `sh -c` execs in the same bunker, {LOOP_REPEATS} times each \
         (medians of their `duration_ms`: {} with `/bin/true`, {} empty). With {EXEC_RUNS} \
         samples p99 is the slowest one.\n",
        ms(median(&exec.spawn_loop)),
        ms(median(&exec.empty_loop))
    );

    let _ = writeln!(s, "### Host floor\n");
    let _ = writeln!(s, "| figure | value |");
    let _ = writeln!(s, "|---|---|");
    let _ = writeln!(
        s,
        "| bare host spawn of `/bin/true` (`std::process::Command`), p50 / p99, N = {HOST_RUNS} \
         | {} / {} |",
        ms(median(host)),
        ms(percentile(host, 99))
    );
    s
}
