//! Lifecycle costs through a real `scaibunker up` with templates on (image `tiny`, 256 MiB,
//! one vCPU), each beside its floor in the same run, written to the "Lifecycle: idle
//! memory and sustained creates" section of `docs/benchmarks.md`:
//!
//! 1. Host memory per idle bunker beyond guest RAM. With no bunker, then one, then two
//!    idle bunkers (each created from the template and given one exec of `true`), each
//!    QEMU's `/proc/<pid>/smaps` is split into the guest RAM (the anonymous mapping of the
//!    guest's size) and everything else (RSS, PSS, private), and the worker's RSS is
//!    compared with its RSS with no bunker. Floor: a raw QEMU restored from the same
//!    template with the worker's command line, given the same exec, read the same way.
//! 2. Sustained creates: two lanes, each looping create (`wait`) → exec `true` → delete,
//!    counting the cycles whose exec answered within the window. Floor: two lanes looping
//!    a raw restore → `HELLO` → exec `true` → kill. The two alternate in rounds so that
//!    host load weighs on them alike; a raw restore one VM at a time is the per-create
//!    floor.
//!
//! Never more than two VMs at once (two-core hosts).
//!
//! Run: `cargo build --release --workspace && SCAIBUNKER_AGENT_BIN=$(scripts/build-agent.sh)
//! cargo bench -p scaibunker-e2e --bench lifecycle`

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use scaibunker_api::bunkers::CreateBunker;
use scaibunker_api::exec::ExecRequest;
use scaibunker_e2e::bench::{
    Machine, RawStart, RawVm, load_average, median, ms, percentile, spread_ms, wait_template,
};
use scaibunker_e2e::{Up, UpOptions, eventually, leftover_processes, qemu_processes_for};
use scaibunker_proto::agent::Program;
use scaibunker_sdk::Client;

const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/benchmarks.md");
const HEADING: &str = "## Lifecycle: idle memory and sustained creates";
const IMAGE: &str = "tiny";
const MEMORY_MB: u64 = 256;
/// Idle time after a bunker's first exec before its memory is read.
const SETTLE: Duration = Duration::from_secs(3);
/// Concurrent create loops: two VMs at most.
const LANES: usize = 2;
/// Sustained rounds, each `ROUND` of the platform then `ROUND` of the raw floor.
const ROUNDS: u32 = 2;
const ROUND: Duration = Duration::from_secs(30);
/// Raw restores one VM at a time.
const RAW_RUNS: usize = 5;
/// Failed cycles tolerated (and reported) before the run is abandoned.
const MAX_FAILURES: usize = 3;
const TEMPLATE_TIMEOUT: Duration = Duration::from_secs(300);
const CLEANUP: Duration = Duration::from_secs(20);
const KIB_PER_MIB: f64 = 1024.0;

fn main() -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the tokio runtime")?
        .block_on(run())
}

async fn run() -> Result<()> {
    let machine = Machine::probe()?;
    eprintln!("[bench] {machine:?}");
    let mut up = Up::start(UpOptions {
        templates: true,
        ..Default::default()
    })?;
    let outcome = measure(&machine, &up).await;
    let status = up.stop()?;
    let f = outcome?;
    ensure!(status.success(), "up exited with {status}");
    let section = render(&machine, &f);
    let old = std::fs::read_to_string(DOC).context("reading docs/benchmarks.md")?;
    let new = scaibunker_e2e::doc::replace_section(&old, HEADING, &section);
    std::fs::write(DOC, new).context("writing docs/benchmarks.md")?;
    println!("{section}");
    Ok(())
}

struct Figures {
    first_cold: Duration,
    template_wait: Duration,
    template_meta: serde_json::Value,
    memory: IdleMemory,
    raw_hello: Vec<Duration>,
    platform: Sustained,
    raw: Sustained,
    /// Of the creates during the sustained rounds, how many the worker logged as
    /// restored from the template, out of how many it logged.
    templated: (usize, usize),
    load_after_memory: String,
}

async fn measure(machine: &Machine, up: &Up) -> Result<Figures> {
    let client = up.client();
    eprintln!("[bench] first create of {IMAGE}/{MEMORY_MB} MiB (cold; builds the template)");
    let first = create_exec(&client).await?;
    delete(up, &client, &first.id).await?;
    let waited = Instant::now();
    let template = wait_template(up, TEMPLATE_TIMEOUT).await?;
    let template_wait = waited.elapsed();
    let template_meta = serde_json::from_slice(
        &std::fs::read(template.join("template.json")).context("reading template.json")?,
    )
    .context("decoding template.json")?;
    eprintln!("[bench] template {} ready", template.display());
    let images = up.images_dir().to_owned();
    let restore = RawStart::Restore {
        template: template.clone(),
    };

    let mut memory = idle_memory(up, &client).await?;
    let (raw_memory, raw_qemus, raw_hello) = raw_floor(machine, &images, &restore).await?;
    memory.raw = raw_memory;
    memory.host_qemus[2] = raw_qemus;
    let load_after_memory = load_average();

    let mut platform = Sustained::default();
    let mut raw = Sustained::default();
    let log = up.data_dir().join("worker.log");
    let log_from = std::fs::metadata(&log).map_or(0, |m| m.len());
    for round in 1..=ROUNDS {
        let p = sustain(|started| platform_lane(up, &client, started)).await?;
        eprintln!("[bench] round {round}: platform {}", p.summary());
        platform.absorb(p);
        let r = sustain(|started| raw_lane(machine, &images, &restore, started)).await?;
        eprintln!("[bench] round {round}: raw {}", r.summary());
        raw.absorb(r);
    }
    no_vm(up).await?;
    let templated = sources_since(&log, log_from)?;
    Ok(Figures {
        first_cold: first.ready,
        template_wait,
        template_meta,
        memory,
        raw_hello,
        platform,
        raw,
        templated,
        load_after_memory,
    })
}

/// A bunker that answered its first exec.
struct Created {
    id: String,
    /// The create call (`wait`).
    create: Duration,
    /// Create → first exec answered.
    ready: Duration,
}

/// Create (`wait`) then exec `true`. A bunker whose exec fails is deleted before the error
/// is returned, so no VM is left behind.
async fn create_exec(client: &Client) -> Result<Created> {
    let started = Instant::now();
    let bunker = client
        .create_bunker(&CreateBunker {
            image: Some(IMAGE.to_owned()),
            memory_mb: Some(MEMORY_MB),
            wait: Some(true),
            ..Default::default()
        })
        .await
        .context("create")?;
    let create = started.elapsed();
    let exec = async {
        ensure!(bunker.status == "running", "bunker: {bunker:?}");
        let out = client
            .exec(
                &bunker.id,
                &ExecRequest {
                    argv: Some(vec!["true".to_owned()]),
                    ..Default::default()
                },
            )
            .await
            .context("first exec")?;
        ensure!(out.exit_code == Some(0), "first exec: {out:?}");
        Ok(())
    };
    if let Err(e) = exec.await {
        let _ = client.delete_bunker(&bunker.id).await;
        return Err(e);
    }
    Ok(Created {
        id: bunker.id,
        create,
        ready: started.elapsed(),
    })
}

async fn delete(up: &Up, client: &Client, id: &str) -> Result<()> {
    client.delete_bunker(id).await.context("delete")?;
    no_vm(up).await
}

async fn no_vm(up: &Up) -> Result<()> {
    eventually(CLEANUP, "the installation's VMs to go", || {
        let left = qemu_processes_for(up.data_dir());
        if left.is_empty() && up.bunker_dirs().is_empty() {
            Ok(())
        } else {
            Err(format!("{left:?}"))
        }
    })
    .await
}

/// The pid of the QEMU running bunker `id`.
fn bunker_qemu(up: &Up, id: &str) -> Result<u32> {
    let found: Vec<u32> = qemu_processes_for(up.data_dir())
        .into_iter()
        .filter(|p| p.cmdline.contains(id))
        .map(|p| p.pid)
        .collect();
    match found[..] {
        [pid] => Ok(pid),
        _ => bail!("bunker {id} has QEMU processes {found:?}, not one"),
    }
}

/// Processes other than QEMU whose command line or environment names bunker `id`.
fn other_processes(up: &Up, id: &str) -> usize {
    leftover_processes(up.data_dir())
        .iter()
        .filter(|p| p.cmdline.contains(id) && !p.cmdline.contains("qemu-system"))
        .count()
}

// ---- memory ----

/// One QEMU's memory, from `/proc/<pid>/smaps`, in KiB.
#[derive(Debug, Clone, Copy, Default)]
struct QemuMemory {
    /// The guest RAM mapping's size and resident part.
    guest_size: u64,
    guest_rss: u64,
    /// Every mapping but the guest RAM.
    other_rss: u64,
    other_pss: u64,
    /// Private clean + dirty: what this QEMU alone holds.
    other_private: u64,
    /// Of `other_rss`, anonymous executable mappings: TCG's translated code.
    code_rss: u64,
    /// Of `other_rss`, mappings of files: QEMU's binary and libraries, the guest kernel.
    file_rss: u64,
    swap: u64,
}

/// One mapping of a process, from its smaps entry (sizes in KiB).
#[derive(Debug, Default)]
struct Mapping {
    perms: String,
    path: String,
    size: u64,
    rss: u64,
    pss: u64,
    private: u64,
    swap: u64,
}

fn smaps(pid: u32) -> Result<Vec<Mapping>> {
    let path = format!("/proc/{pid}/smaps");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let mut maps: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if let Some(key) = first.strip_suffix(':') {
            let Some(m) = maps.last_mut() else { continue };
            let kib = fields
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            match key {
                "Size" => m.size = kib,
                "Rss" => m.rss = kib,
                "Pss" => m.pss = kib,
                "Private_Clean" | "Private_Dirty" => m.private += kib,
                "Swap" => m.swap = kib,
                _ => {}
            }
        } else {
            // A header: address perms offset dev inode [path].
            let perms = fields.next().unwrap_or_default().to_owned();
            let path = fields.skip(3).collect::<Vec<_>>().join(" ");
            maps.push(Mapping {
                perms,
                path,
                ..Default::default()
            });
        }
    }
    ensure!(!maps.is_empty(), "{path} lists no mapping");
    Ok(maps)
}

/// Splits a QEMU's memory into its guest RAM (the anonymous mapping nearest
/// `memory_mb`, within 16 MiB of it) and the rest.
fn qemu_memory(pid: u32, memory_mb: u64) -> Result<QemuMemory> {
    let maps = smaps(pid)?;
    let want = memory_mb * 1024;
    let guest = maps
        .iter()
        .enumerate()
        .filter(|(_, m)| m.path.is_empty())
        .min_by_key(|(_, m)| m.size.abs_diff(want))
        .map(|(i, _)| i)
        .filter(|&i| maps[i].size.abs_diff(want) <= 16 * 1024)
        .with_context(|| {
            format!("QEMU {pid} has no anonymous mapping of about {memory_mb} MiB: {maps:?}")
        })?;
    let mut m = QemuMemory {
        guest_size: maps[guest].size,
        guest_rss: maps[guest].rss,
        ..Default::default()
    };
    for (i, map) in maps.iter().enumerate() {
        m.swap += map.swap;
        if i == guest {
            continue;
        }
        m.other_rss += map.rss;
        m.other_pss += map.pss;
        m.other_private += map.private;
        if map.path.is_empty() && map.perms.contains('x') {
            m.code_rss += map.rss;
        }
        if map.path.starts_with('/') {
            m.file_rss += map.rss;
        }
    }
    Ok(m)
}

/// `VmRSS` of a process, in KiB.
fn rss(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("{path} has no VmRSS"))
}

/// RSS (KiB) of the worker and of `up` (the controller runs in it).
fn daemons(up: &Up, worker: u32) -> Result<(u64, u64)> {
    Ok((rss(worker)?, rss(up.pid())?))
}

#[derive(Debug, Default)]
struct IdleMemory {
    /// (worker, up) RSS in KiB with 0, 1 and 2 idle bunkers, then 0 again.
    daemons: [(u64, u64); 4],
    alone: QemuMemory,
    pair: [QemuMemory; 2],
    raw: QemuMemory,
    /// Processes other than QEMU naming a bunker, summed over the two.
    other_processes: usize,
    /// QEMU processes on the whole host at the readings of `alone`, `pair` and `raw`
    /// (others' too: they share QEMU's file pages, so they lower PSS and private).
    host_qemus: [usize; 3],
}

/// QEMU processes running on the host, whoever started them.
fn host_qemus() -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm"))
                .is_ok_and(|c| c.trim().starts_with("qemu-system"))
        })
        .count()
}

async fn idle_memory(up: &Up, client: &Client) -> Result<IdleMemory> {
    let worker = up.worker_pid().context("up did not log its worker's pid")?;
    let mut m = IdleMemory::default();
    tokio::time::sleep(SETTLE).await;
    m.daemons[0] = daemons(up, worker)?;
    let a = create_exec(client).await?;
    let measured = async {
        tokio::time::sleep(SETTLE).await;
        let a_pid = bunker_qemu(up, &a.id)?;
        m.alone = qemu_memory(a_pid, MEMORY_MB)?;
        m.host_qemus[0] = host_qemus();
        m.daemons[1] = daemons(up, worker)?;
        let b = create_exec(client).await?;
        let measured = async {
            tokio::time::sleep(SETTLE).await;
            m.pair = [
                qemu_memory(a_pid, MEMORY_MB)?,
                qemu_memory(bunker_qemu(up, &b.id)?, MEMORY_MB)?,
            ];
            m.host_qemus[1] = host_qemus();
            m.daemons[2] = daemons(up, worker)?;
            m.other_processes = other_processes(up, &a.id) + other_processes(up, &b.id);
            anyhow::Ok(())
        }
        .await;
        client.delete_bunker(&b.id).await.context("delete")?;
        measured
    }
    .await;
    delete(up, client, &a.id).await?;
    measured?;
    tokio::time::sleep(SETTLE).await;
    m.daemons[3] = daemons(up, worker)?;
    eprintln!("[bench] idle memory: {m:?}");
    Ok(m)
}

/// A raw restore's memory after the same exec and idle time as a bunker's, then raw
/// restores → `HELLO` one VM at a time.
async fn raw_floor(
    machine: &Machine,
    images: &Path,
    restore: &RawStart,
) -> Result<(QemuMemory, usize, Vec<Duration>)> {
    let mut hello = Vec::new();
    let mut vm = RawVm::start(machine, images, restore, MEMORY_MB).await?;
    hello.push(vm.times.total);
    let measured = async {
        let exec = vm.exec(Program::Argv(vec!["true".to_owned()])).await?;
        ensure!(exec.exit_code == Some(0), "raw exec: {exec:?}");
        tokio::time::sleep(SETTLE).await;
        let memory = qemu_memory(vm.pid().context("raw QEMU has exited")?, MEMORY_MB)?;
        Ok((memory, host_qemus()))
    }
    .await;
    vm.stop().await;
    let (memory, qemus) = measured?;
    for _ in 1..RAW_RUNS {
        let vm = RawVm::start(machine, images, restore, MEMORY_MB).await?;
        hello.push(vm.times.total);
        vm.stop().await;
    }
    eprintln!(
        "[bench] raw: {memory:?}, restore → HELLO {}",
        spread_ms(&hello)
    );
    Ok((memory, qemus, hello))
}

// ---- sustained creates ----

/// One completed cycle of a lane.
struct Cycle {
    /// Platform: the create call; raw: restore → `HELLO`.
    start: Duration,
    /// Create (or restore) → first exec answered.
    ready: Duration,
    /// Whether the exec answered within the round.
    in_window: bool,
}

#[derive(Default)]
struct Lane {
    cycles: Vec<Cycle>,
    failures: Vec<String>,
}

#[derive(Default)]
struct Sustained {
    window: Duration,
    cycles: Vec<Cycle>,
    failures: Vec<String>,
}

impl Sustained {
    fn counted(&self) -> usize {
        self.cycles.iter().filter(|c| c.in_window).count()
    }

    fn per_second(&self) -> f64 {
        self.counted() as f64 / self.window.as_secs_f64().max(1e-9)
    }

    fn ready(&self) -> Vec<Duration> {
        self.cycles.iter().map(|c| c.ready).collect()
    }

    fn start(&self) -> Vec<Duration> {
        self.cycles.iter().map(|c| c.start).collect()
    }

    fn absorb(&mut self, other: Sustained) {
        self.window += other.window;
        self.cycles.extend(other.cycles);
        self.failures.extend(other.failures);
    }

    fn summary(&self) -> String {
        let ready = self.ready();
        format!(
            "{} cycles in {:?} ({:.2}/s), ready p50 {} p99 {}, {} failed",
            self.counted(),
            self.window,
            self.per_second(),
            ms(median(&ready)),
            ms(percentile(&ready, 99)),
            self.failures.len()
        )
    }
}

/// Runs `LANES` copies of `lane` for one round.
async fn sustain<F, Fut>(lane: F) -> Result<Sustained>
where
    F: Fn(Instant) -> Fut,
    Fut: Future<Output = Result<Lane>>,
{
    let started = Instant::now();
    let lanes = futures_util::future::try_join_all((0..LANES).map(|_| lane(started))).await?;
    let mut s = Sustained {
        window: ROUND,
        ..Default::default()
    };
    for l in lanes {
        s.cycles.extend(l.cycles);
        s.failures.extend(l.failures);
    }
    Ok(s)
}

/// Create → exec `true` → delete until the round ends; a delete returns once the VM is
/// stopped, so a lane never holds two.
async fn platform_lane(up: &Up, client: &Client, started: Instant) -> Result<Lane> {
    let mut lane = Lane::default();
    while started.elapsed() < ROUND {
        match create_exec(client).await {
            Ok(c) => {
                lane.cycles.push(Cycle {
                    start: c.create,
                    ready: c.ready,
                    in_window: started.elapsed() <= ROUND,
                });
                client.delete_bunker(&c.id).await.context("delete")?;
                ensure!(
                    qemu_processes_for(up.data_dir())
                        .iter()
                        .all(|p| !p.cmdline.contains(&c.id)),
                    "bunker {}'s QEMU outlived its delete",
                    c.id
                );
            }
            Err(e) => {
                eprintln!("[bench] cycle failed: {e:#}");
                lane.failures.push(format!("{e:#}"));
                ensure!(
                    lane.failures.len() <= MAX_FAILURES,
                    "more than {MAX_FAILURES} failed cycles in a lane; last: {e:#}\n{}",
                    up.logs()
                );
            }
        }
    }
    Ok(lane)
}

/// Raw restore → `HELLO` → exec `true` → kill until the round ends.
async fn raw_lane(
    machine: &Machine,
    images: &Path,
    restore: &RawStart,
    started: Instant,
) -> Result<Lane> {
    let mut lane = Lane::default();
    while started.elapsed() < ROUND {
        let mut vm = RawVm::start(machine, images, restore, MEMORY_MB).await?;
        let exec = vm.exec(Program::Argv(vec!["true".to_owned()])).await;
        let in_window = started.elapsed() <= ROUND;
        let times = vm.times;
        vm.stop().await;
        let exec = exec?;
        ensure!(exec.exit_code == Some(0), "raw exec: {exec:?}");
        lane.cycles.push(Cycle {
            start: times.total,
            ready: times.total + exec.elapsed,
            in_window,
        });
    }
    Ok(lane)
}

/// Of the bunkers the worker logged as running after byte `from` of its log, how many
/// were restored from a template, out of how many.
fn sources_since(log: &Path, from: u64) -> Result<(usize, usize)> {
    let text = std::fs::read(log).with_context(|| format!("reading {}", log.display()))?;
    let text = String::from_utf8_lossy(text.get(from as usize..).unwrap_or_default());
    let running: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("bunker running"))
        .collect();
    let templated = running
        .iter()
        .filter(|l| l.contains("source=Template"))
        .count();
    Ok((templated, running.len()))
}

// ---- report ----

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / KIB_PER_MIB)
}

/// Growth per bunker in MiB of `with` (KiB, `n` bunkers) over `without`.
fn growth(with: u64, without: u64, n: u64) -> f64 {
    (with as f64 - without as f64) / n as f64 / KIB_PER_MIB
}

fn render(m: &Machine, f: &Figures) -> String {
    let mem = &f.memory;
    let mut s = String::new();
    let _ = writeln!(s, "{HEADING}\n");
    let _ = writeln!(
        s,
        "<!-- Written by tests/e2e/benches/lifecycle.rs; a run replaces this section. -->\n"
    );
    let _ = writeln!(
        s,
        "Measured {} at commit `{}` ({} binaries) on {}, nproc {}, accelerator `{}`: one \
         `scaibunker up` with templates on, image `{IMAGE}`, {MEMORY_MB} MiB, 1 vCPU, never \
         more than two VMs at once. Load average (1/5/15 min) {} before, {} after the memory \
         part, {} at the end: the host was {}.\n",
        m.date,
        m.commit,
        m.profile,
        m.cpu_model,
        m.nproc,
        m.accel(),
        m.load_start,
        f.load_after_memory,
        load_average(),
        m.load_words(),
    );
    let _ = writeln!(
        s,
        "Reproduce: `cargo build --release --workspace && \
         SCAIBUNKER_AGENT_BIN=$(scripts/build-agent.sh) \
         cargo bench -p scaibunker-e2e --bench lifecycle`\n"
    );

    // Idle memory.
    let _ = writeln!(
        s,
        "Idle memory, MiB (`/proc/<pid>/smaps` of each QEMU {} s after its first exec):\n",
        SETTLE.as_secs()
    );
    let _ = writeln!(
        s,
        "| QEMU | guest RAM mapping: size / resident | RSS outside guest RAM | PSS outside \
         | private outside | of which TCG code (RSS) | of which files (RSS) \
         |\n|---|---|---|---|---|---|---|"
    );
    let mut qemu_row = |what: &str, q: &QemuMemory| {
        let _ = writeln!(
            s,
            "| {what} | {} / {} | {} | {} | {} | {} | {} |",
            mib(q.guest_size),
            mib(q.guest_rss),
            mib(q.other_rss),
            mib(q.other_pss),
            mib(q.other_private),
            mib(q.code_rss),
            mib(q.file_rss),
        );
    };
    qemu_row("bunker, the only one", &mem.alone);
    qemu_row("bunker 1 of 2 idle", &mem.pair[0]);
    qemu_row("bunker 2 of 2 idle", &mem.pair[1]);
    qemu_row(
        "floor: raw QEMU, same command line, restored from the same template",
        &mem.raw,
    );
    let d = &mem.daemons;
    let _ = writeln!(
        s,
        "\n| daemon RSS, MiB | 0 bunkers | 1 idle | 2 idle | 0 again | growth per bunker \
         (2 idle − 0) |\n|---|---|---|---|---|---|"
    );
    let _ = writeln!(
        s,
        "| worker | {} | {} | {} | {} | {:.1} |",
        mib(d[0].0),
        mib(d[1].0),
        mib(d[2].0),
        mib(d[3].0),
        growth(d[2].0, d[0].0, 2),
    );
    let _ = writeln!(
        s,
        "| `up` (controller, same host here) | {} | {} | {} | {} | {:.1} |",
        mib(d[0].1),
        mib(d[1].1),
        mib(d[2].1),
        mib(d[3].1),
        growth(d[2].1, d[0].1, 2),
    );
    let pair_pss = (mem.pair[0].other_pss + mem.pair[1].other_pss) as f64 / 2.0 / KIB_PER_MIB;
    let pair_private =
        (mem.pair[0].other_private + mem.pair[1].other_private) as f64 / 2.0 / KIB_PER_MIB;
    let worker_growth = growth(d[2].0, d[0].0, 2);
    let per_bunker = pair_pss + worker_growth;
    let over_raw = (mem.alone.other_rss as f64 - mem.raw.other_rss as f64) / KIB_PER_MIB;
    let _ = writeln!(
        s,
        "\nHost memory per idle bunker beyond guest RAM, with two idle: QEMU's PSS outside \
         guest RAM ({pair_pss:.1} MiB, mean of the two) plus the worker's growth per bunker \
         ({worker_growth:.1} MiB) = **{per_bunker:.1} MiB** (goal ≤ 30 MiB: {}); counting \
         only QEMU's private memory instead of its PSS, {:.1} MiB. A bunker's QEMU holds \
         {over_raw:+.1} MiB RSS outside guest RAM against the bare QEMU of the same command \
         line. Other processes per bunker besides QEMU: {}. QEMU processes on the whole host \
         at the readings (others' included; they share QEMU's file pages, so they lower PSS \
         and private): {}, {} and {} for the bunker alone, the two and the raw QEMU.\n",
        if per_bunker <= 30.0 { "met" } else { "missed" },
        pair_private + worker_growth,
        mem.other_processes,
        mem.host_qemus[0],
        mem.host_qemus[1],
        mem.host_qemus[2],
    );

    // Sustained creates.
    let p = &f.platform;
    let r = &f.raw;
    let (templated, logged) = f.templated;
    let _ = writeln!(
        s,
        "Sustained creates, {LANES} lanes, {ROUNDS} rounds of {} s each alternating the \
         platform and its floor ({} s of each):\n",
        ROUND.as_secs(),
        p.window.as_secs(),
    );
    let _ = writeln!(s, "| what | figure |\n|---|---|");
    let pct = |v: &[Duration]| {
        format!(
            "p50 {}, p99 {} ({} cycles)",
            ms(median(v)),
            ms(percentile(v, 99)),
            v.len()
        )
    };
    let _ = writeln!(
        s,
        "| creates per second: create (`wait`) → exec `true` → delete | **{:.2}/s** ({} \
         exec-ready within the window; {} failed) |",
        p.per_second(),
        p.counted(),
        p.failures.len(),
    );
    let _ = writeln!(
        s,
        "| create → exec-ready during the run | {} |",
        pct(&p.ready())
    );
    let _ = writeln!(
        s,
        "|   of which the create call (`wait`) | {} |",
        pct(&p.start())
    );
    let _ = writeln!(
        s,
        "| floor: raw restores per second: restore → `HELLO` → exec `true` → kill | {:.2}/s \
         ({} within the window) |",
        r.per_second(),
        r.counted(),
    );
    let _ = writeln!(
        s,
        "| floor: raw restore → exec answered during its run | {} |",
        pct(&r.ready())
    );
    let _ = writeln!(s, "|   of which restore → `HELLO` | {} |", pct(&r.start()));
    let _ = writeln!(
        s,
        "| floor: raw restore → `HELLO`, one VM at a time | {} ({RAW_RUNS} runs) |",
        spread_ms(&f.raw_hello)
    );
    let _ = writeln!(
        s,
        "\nThe platform sustained {:.0}% of the raw floor's rate; its median create → \
         exec-ready under this load is {:.2}× the raw restore → exec answered under the same \
         load, and {:.2}× a raw restore → `HELLO` one VM at a time. The worker logged \
         {templated} of the {logged} bunkers it started during the rounds as restored from \
         the template (`source=Template`).\n",
        100.0 * p.per_second() / r.per_second().max(1e-9),
        median(&p.ready()).as_secs_f64() / median(&r.ready()).as_secs_f64().max(1e-9),
        median(&p.ready()).as_secs_f64() / median(&f.raw_hello).as_secs_f64().max(1e-9),
    );

    let meta = &f.template_meta;
    let _ = writeln!(
        s,
        "Method. The first create of the shape was cold ({}) and started the template build; \
         the template was ready {} after that bunker was deleted (worker's figures: boot to \
         hello {} ms, save {} ms, state file {:.1} MB), and everything after restores it. \
         Guest RAM is the anonymous mapping of the guest's size in QEMU's smaps; its resident \
         part is what the restore wrote (zero pages are not) plus what the guest touched. \
         Everything else QEMU maps counts as overhead: RSS counts shared pages in full, PSS \
         divides them among the processes mapping them, private counts only pages no other \
         process maps (the marginal cost of one more bunker). \"TCG code\" is QEMU's \
         anonymous executable mapping, the translation cache of the TCG accelerator; \
         \"files\" are mapped files: QEMU's binary and libraries and the guest kernel image. \
         Page cache not mapped by QEMU (the template's state file and disk) is not counted; \
         swap used by the QEMUs measured: {} KiB. Worker growth is its `VmRSS` with \
         two idle bunkers minus with none, over two, after a warm-up create, so allocator \
         reuse makes it noisy. A lane loops create (`wait: true`) → exec `true` → delete \
         (which returns once the VM is stopped, checked each cycle), so at most two VMs run; \
         creates per second counts the cycles whose exec answered within the window, and \
         latencies cover all completed cycles. The raw floor drives QEMU with the worker's \
         command line from this process (overlay, `-incoming`, `query-migrate`, `cont`, the \
         agent's `HELLO`, one exec over the agent protocol, kill), with no controller, \
         worker or HTTP and no identity exec.",
        ms(f.first_cold),
        ms(f.template_wait),
        meta["boot_ms"],
        meta["save_ms"],
        meta["state_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        mem.alone.swap + mem.pair[0].swap + mem.pair[1].swap + mem.raw.swap,
    );
    s
}
