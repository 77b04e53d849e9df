//! Bunker networks against their floors, in the bench's own network namespace with the fake
//! internet of the network tests (crates/worker/tests/network/sandbox.rs), written to the
//! "Bunker networks" section of `docs/benchmarks.md`:
//!
//! 1. Create → exec-ready (`POST /bunkers` with `wait`, then `true`) from the template, for
//!    `isolated` and `unrestricted` bunkers alternately; and the network setup the worker
//!    logs for each `unrestricted` create (`setup_ms`, on the create path: no pool).
//! 2. Guest TCP throughput: 8 MiB from the guest (`dd | nc`) to the fake internet's byte
//!    sink, first to last byte as the sink counts them, through the bunker's network; then
//!    in the same bunker with its floor: the bunker's table replaced by one masquerade rule
//!    (the host's table stays: the same tap, veth and routing, no filtering, no deny set).
//! 3. Audit overhead: the same upload through a second installation with
//!    `SCAIBUNKER_EGRESS_AUDIT=off`.
//!
//! One VM at a time. Run: `cargo build --release --workspace &&
//! SCAIBUNKER_AGENT_BIN=$(scripts/build-agent.sh) cargo bench -p scaibunker-e2e --bench network`

#![allow(clippy::unwrap_used)]

#[path = "../../../crates/worker/tests/network/sandbox.rs"]
mod network_sandbox;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use network_sandbox::{FakeInternet, replace_rules_with_masquerade};
use scaibunker_api::bunkers::{CreateBunker, NetworkProfile};
use scaibunker_api::exec::ExecRequest;
use scaibunker_e2e::bench::{Machine, load_average, median, ms, spread_ms, wait_template};
use scaibunker_e2e::{Up, UpOptions, eventually, qemu_processes_for};
use scaibunker_sdk::Client;

const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/benchmarks.md");
const HEADING: &str = "## Bunker networks";
const RUNS: usize = 5;
const UPLOAD_BYTES: u64 = 8 * 1024 * 1024;

fn main() -> Result<()> {
    scaibunker_e2e::bench::in_net_sandbox(run)
}

#[derive(Default)]
struct Figures {
    isolated_ready: Vec<Duration>,
    unrestricted_ready: Vec<Duration>,
    setup_ms: Vec<Duration>,
    through: Vec<f64>,
    floor: Vec<f64>,
    no_audit: Vec<f64>,
}

async fn run() -> Result<()> {
    let machine = Machine::probe()?;
    let net = FakeInternet::build();
    let dirs = [tempfile::tempdir()?, tempfile::tempdir()?];
    let start = |dir: &tempfile::TempDir, audit: &str| {
        let ns = dir.path().display().to_string();
        Up::start(UpOptions {
            templates: true,
            ..UpOptions::with_env(&[
                ("SCAIBUNKER_NETWORKS", "on"),
                ("SCAIBUNKER_DNS_UPSTREAM", "198.18.1.53"),
                ("SCAIBUNKER_NETNS_DIR", &ns),
                ("SCAIBUNKER_EGRESS_AUDIT", audit),
                // Two installations in one namespace: their uplinks must not overlap.
                (
                    "SCAIBUNKER_NET_POOL",
                    if audit == "on" {
                        "10.203.0.0/24"
                    } else {
                        "10.203.1.0/24"
                    },
                ),
            ])
        })
    };
    let mut on = start(&dirs[0], "on")?;
    let mut off = start(&dirs[1], "off")?;
    let mut f = Figures::default();
    let outcome = measure(&on, &off, &net, &dirs[0], &mut f).await;
    let _ = on.stop();
    let _ = off.stop();
    outcome?;
    ensure!(
        net.escaped_packets() == 0,
        "a packet left the fake internet: {}",
        net.escaped_to()
    );
    let section = render(&machine, &f);
    let old = std::fs::read_to_string(DOC).context("reading docs/benchmarks.md")?;
    std::fs::write(
        DOC,
        scaibunker_e2e::doc::replace_section(&old, HEADING, &section),
    )?;
    println!("{section}");
    Ok(())
}

fn tiny(profile: NetworkProfile) -> CreateBunker {
    CreateBunker {
        image: Some("tiny".into()),
        memory_mb: Some(256),
        network_profile: Some(profile),
        wait: Some(true),
        ..Default::default()
    }
}

async fn create_ready(c: &Client, profile: NetworkProfile) -> Result<(Duration, String)> {
    let started = Instant::now();
    let b = c.create_bunker(&tiny(profile)).await?;
    ensure!(b.status == "running", "{b:?}");
    let out = c
        .exec(
            &b.id,
            &ExecRequest {
                argv: Some(vec!["true".into()]),
                ..Default::default()
            },
        )
        .await?;
    ensure!(out.exit_code == Some(0), "{out:?}");
    Ok((started.elapsed(), b.id))
}

async fn delete(up: &Up, c: &Client, id: &str) -> Result<()> {
    c.delete_bunker(id).await?;
    eventually(Duration::from_secs(30), "the VM to go", || {
        if qemu_processes_for(up.data_dir()).is_empty() {
            Ok(())
        } else {
            Err("running".into())
        }
    })
    .await
}

/// Mbit/s of [`UPLOAD_BYTES`] from the guest of `id` to the sink.
async fn upload(c: &Client, net: &FakeInternet, id: &str) -> Result<f64> {
    let before = net.sink.bytes_in();
    let count = UPLOAD_BYTES / 65536;
    let cmd = format!(
        "setsid sh -c 'dd if=/dev/zero bs=65536 count={count} 2>/dev/null | nc 198.18.0.30 9000' >/dev/null 2>&1 &"
    );
    let out = c
        .exec(
            id,
            &ExecRequest {
                command: Some(cmd),
                ..Default::default()
            },
        )
        .await?;
    ensure!(out.exit_code == Some(0), "{out:?}");
    let first = poll(Duration::from_secs(30), || net.sink.bytes_in() > before).await?;
    poll(Duration::from_secs(120), || {
        net.sink.bytes_in() >= before + UPLOAD_BYTES
    })
    .await?;
    let took = first.elapsed();
    Ok(UPLOAD_BYTES as f64 * 8.0 / took.as_secs_f64() / 1e6)
}

async fn poll(limit: Duration, done: impl Fn() -> bool) -> Result<Instant> {
    let until = Instant::now() + limit;
    loop {
        if done() {
            return Ok(Instant::now());
        }
        ensure!(Instant::now() < until, "not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn measure(
    on: &Up,
    off: &Up,
    net: &FakeInternet,
    on_ns: &tempfile::TempDir,
    f: &mut Figures,
) -> Result<()> {
    for up in [on, off] {
        let c = up.client();
        let (_, id) = create_ready(&c, NetworkProfile::Isolated).await?;
        delete(up, &c, &id).await?;
        wait_template(up, Duration::from_secs(300)).await?;
    }
    let c = on.client();
    let c_off = off.client();
    for _ in 0..RUNS {
        let (t, id) = create_ready(&c, NetworkProfile::Isolated).await?;
        f.isolated_ready.push(t);
        delete(on, &c, &id).await?;

        let (t, id) = create_ready(&c, NetworkProfile::Unrestricted).await?;
        f.unrestricted_ready.push(t);
        f.through.push(upload(&c, net, &id).await?);
        replace_rules_with_masquerade(&on_ns.path().join(&id));
        f.floor.push(upload(&c, net, &id).await?);
        delete(on, &c, &id).await?;

        let (_, id) = create_ready(&c_off, NetworkProfile::Unrestricted).await?;
        f.no_audit.push(upload(&c_off, net, &id).await?);
        delete(off, &c_off, &id).await?;
    }
    // The table of the host was rewritten by nobody: the worker's own is intact.
    let log = std::fs::read_to_string(on.data_dir().join("worker.log"))?;
    for line in log.lines().filter(|l| l.contains("bunker network ready")) {
        if let Some(v) = line
            .split("setup_ms=")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
        {
            f.setup_ms.push(Duration::from_millis(v.parse()?));
        }
    }
    Ok(())
}

fn spread(v: &[f64]) -> String {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    format!("{:.1} ({:.1}–{:.1})", s[s.len() / 2], s[0], s[s.len() - 1])
}

fn render(m: &Machine, f: &Figures) -> String {
    let med = |v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        s[s.len() / 2]
    };
    let mut s = String::new();
    let _ = writeln!(s, "{HEADING}\n");
    let _ = writeln!(
        s,
        "<!-- Written by tests/e2e/benches/network.rs; a run replaces this section. -->\n"
    );
    let _ = writeln!(
        s,
        "Measured {} at commit `{}` ({} binaries) on {}, nproc {}, accelerator `{}`: image `tiny`, \
         256 MiB, 1 vCPU, {RUNS} rounds, one VM at a time, inside the bench's own network \
         namespace with the fake internet (no packet left it). Load average (1/5/15 min) {} \
         before, {} after: the host was {}.\n",
        m.date,
        m.commit,
        m.profile,
        m.cpu_model,
        m.nproc,
        m.accel(),
        m.load_start,
        load_average(),
        m.load_words(),
    );
    let _ = writeln!(
        s,
        "Reproduce: `cargo build --release --workspace && SCAIBUNKER_AGENT_BIN=$(scripts/build-agent.sh) \
         cargo bench -p scaibunker-e2e --bench network`\n"
    );
    let _ = writeln!(s, "| what | median (min–max) |\n|---|---|");
    let _ = writeln!(
        s,
        "| create → exec-ready, `isolated`, from the template | {} |",
        spread_ms(&f.isolated_ready)
    );
    let _ = writeln!(
        s,
        "| create → exec-ready, `unrestricted`, from the template | {} |",
        spread_ms(&f.unrestricted_ready)
    );
    let _ = writeln!(
        s,
        "| network setup on the create path (worker's `setup_ms`, no pool) | {} |",
        spread_ms(&f.setup_ms)
    );
    let _ = writeln!(
        s,
        "| guest → sink TCP, through the bunker's network (audit on), Mbit/s | {} |",
        spread(&f.through)
    );
    let _ = writeln!(
        s,
        "| the same bunker, floor: its table replaced by one masquerade, Mbit/s | {} |",
        spread(&f.floor)
    );
    let _ = writeln!(
        s,
        "| guest → sink TCP, audit off, Mbit/s | {} |",
        spread(&f.no_audit)
    );
    let _ = writeln!(
        s,
        "\n`unrestricted` costs {} ms over `isolated` at the median create → exec-ready ({} vs {}); \
         the network's setup is {} of it (the rest, not broken down here, includes \
         writing the guest's `/etc/resolv.conf` through the agent). Throughput through the rules is {:.0} % of the floor's, \
         and with the audit off {:.0} % of it with the audit on. Under TCG the guest's own \
         packet path is the ceiling, so these ratios, not the absolute rates, are what carries to KVM hosts.\n",
        median(&f.unrestricted_ready).as_millis() as i64
            - median(&f.isolated_ready).as_millis() as i64,
        ms(median(&f.unrestricted_ready)),
        ms(median(&f.isolated_ready)),
        ms(median(&f.setup_ms)),
        med(&f.through) / med(&f.floor) * 100.0,
        med(&f.no_audit) / med(&f.through) * 100.0,
    );
    s
}
