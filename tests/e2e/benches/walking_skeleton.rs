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

use std::fmt::Write as _;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use scaibunker_api::bunkers::CreateBunker;
use scaibunker_api::exec::ExecRequest;
use scaibunker_e2e::bench::{
    HELLO_TIMEOUT, Machine, load_average, median, min_max, ms, percentile, qemu_args,
};
use scaibunker_e2e::{Up, UpOptions, eventually, qemu_processes_for};
use scaibunker_proto::agent::{Frame, FrameKind, HEADER_LEN, Hello};
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
        .args(qemu_args(
            machine,
            &images.join("vmlinux"),
            &images.join("initramfs.cpio.gz"),
            d,
            memory_mb,
            "bunker-rawboot0",
        ))
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

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
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
    let accel = m.accel();
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
