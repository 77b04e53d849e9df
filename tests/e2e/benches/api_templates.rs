//! Create → exec-ready through the whole API (SDK → controller → worker → QEMU), with
//! template snapshots on and off, each against its floor in the same run, written to the
//! "Create through the API" section of `docs/benchmarks.md`:
//!
//! 1. Template create: `POST /bunkers` (`wait`) then a first exec of `true`, through an
//!    installation with templates on, after its template of the shape is built; against a
//!    raw restore of that same template directory here: overlay, QEMU with the worker's
//!    command line plus `-incoming`, `query-migrate` until `completed`, `cont`, until the
//!    agent's `HELLO` (what the worker's driver does, as crates/worker/benches/templates.rs
//!    measures it).
//! 2. Cold create, the same through an installation with templates off, against a raw
//!    boot: overlay and QEMU with the worker's command line, until `HELLO`.
//!
//! The four alternate so that host load weighs on them alike; one VM at a time.
//!
//! Run: `cargo build --release --workspace && SCAIBUNKER_AGENT_BIN=$(scripts/build-agent.sh)
//! cargo bench -p scaibunker-e2e --bench api_templates`

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use scaibunker_api::bunkers::CreateBunker;
use scaibunker_api::exec::ExecRequest;
use scaibunker_e2e::bench::{
    Machine, RawStart, RawVm, load_average, median, ms, spread_ms, wait_template,
};
use scaibunker_e2e::{Up, UpOptions, eventually, qemu_processes_for};
use scaibunker_proto::agent::Program;
use scaibunker_sdk::Client;

const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/benchmarks.md");
const HEADING: &str = "## Create through the API";
const IMAGE: &str = "tiny";
const MEMORY_MB: u64 = 256;
const RUNS: usize = 5;
const TEMPLATE_TIMEOUT: Duration = Duration::from_secs(300);
const CLEANUP: Duration = Duration::from_secs(20);

fn main() -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the tokio runtime")?
        .block_on(run())
}

#[derive(Default)]
struct Figures {
    first_cold: Duration,
    template_wait: Duration,
    template_meta: String,
    warm_ready: Vec<Duration>,
    warm_create: Vec<Duration>,
    restore_hello: Vec<Duration>,
    restore_exec: Vec<Duration>,
    restore_overlay: Vec<Duration>,
    cold_ready: Vec<Duration>,
    cold_create: Vec<Duration>,
    boot_hello: Vec<Duration>,
    boot_exec: Vec<Duration>,
    boot_overlay: Vec<Duration>,
    sources: Vec<String>,
}

async fn run() -> Result<()> {
    let machine = Machine::probe()?;
    eprintln!("[bench] {machine:?}");
    let mut warm = Up::start(UpOptions {
        templates: true,
        ..Default::default()
    })?;
    let mut cold = Up::start(UpOptions::default())?;
    let mut f = Figures::default();
    let outcome = measure(&machine, &warm, &cold, &mut f).await;
    let warm_status = warm.stop()?;
    let cold_status = cold.stop()?;
    outcome?;
    ensure!(
        warm_status.success() && cold_status.success(),
        "up exited with {warm_status} / {cold_status}"
    );
    let section = render(&machine, &f);
    let old = std::fs::read_to_string(DOC).context("reading docs/benchmarks.md")?;
    let new = scaibunker_e2e::doc::replace_section(&old, HEADING, &section);
    std::fs::write(DOC, new).context("writing docs/benchmarks.md")?;
    println!("{section}");
    Ok(())
}

/// Create (`wait`) then exec `true`: (create, exec-ready), and the bunker's id.
async fn create_exec(client: &Client) -> Result<(Duration, Duration, String)> {
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
    let created = started.elapsed();
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
    Ok((created, started.elapsed(), bunker.id))
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

/// The boot source the worker logged for the last bunker that came up.
fn last_source(up: &Up) -> String {
    let log = std::fs::read_to_string(up.data_dir().join("worker.log")).unwrap_or_default();
    log.lines()
        .rev()
        .find(|l| l.contains("bunker running"))
        .and_then(|l| l.split("source=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .unwrap_or("unknown")
        .to_owned()
}

async fn raw(
    machine: &Machine,
    images: &Path,
    from: &RawStart,
) -> Result<(Duration, Duration, Duration)> {
    let mut vm = RawVm::start(machine, images, from, MEMORY_MB).await?;
    let exec = vm.exec(Program::Argv(vec!["true".to_owned()])).await;
    let times = vm.times;
    vm.stop().await;
    let exec = exec?;
    ensure!(exec.exit_code == Some(0), "raw exec: {exec:?}");
    Ok((times.total, times.total + exec.elapsed, times.overlay))
}

async fn measure(machine: &Machine, warm: &Up, cold: &Up, f: &mut Figures) -> Result<()> {
    let warm_client = warm.client();
    let cold_client = cold.client();
    eprintln!("[bench] first create of {IMAGE}/{MEMORY_MB} MiB (cold; builds the template)");
    let (_, ready, id) = create_exec(&warm_client).await?;
    f.first_cold = ready;
    let source = last_source(warm);
    ensure!(source.contains("Cold"), "the first create was {source}");
    delete(warm, &warm_client, &id).await?;
    let waited = Instant::now();
    let template = wait_template(warm, TEMPLATE_TIMEOUT).await?;
    f.template_wait = waited.elapsed();
    f.template_meta = std::fs::read_to_string(template.join("template.json"))?;
    eprintln!("[bench] template {} ready", template.display());
    let images = warm.images_dir().to_owned();
    let restore = RawStart::Restore {
        template: template.clone(),
    };
    let boot = RawStart::Boot {
        base: images.join(format!("{IMAGE}.ext4")),
    };

    for run in 1..=RUNS {
        let (created, ready, id) = create_exec(&warm_client).await?;
        let source = last_source(warm);
        delete(warm, &warm_client, &id).await?;
        f.warm_create.push(created);
        f.warm_ready.push(ready);
        f.sources.push(source.clone());

        let (hello, exec, overlay) = raw(machine, &images, &restore).await?;
        f.restore_hello.push(hello);
        f.restore_exec.push(exec);
        f.restore_overlay.push(overlay);

        let (c_created, c_ready, id) = create_exec(&cold_client).await?;
        delete(cold, &cold_client, &id).await?;
        f.cold_create.push(c_created);
        f.cold_ready.push(c_ready);

        let (b_hello, b_exec, b_overlay) = raw(machine, &images, &boot).await?;
        f.boot_hello.push(b_hello);
        f.boot_exec.push(b_exec);
        f.boot_overlay.push(b_overlay);
        eprintln!(
            "[bench] #{run}: template {} ({source}), raw restore {}; cold {}, raw boot {}",
            ms(ready),
            ms(hello),
            ms(c_ready),
            ms(b_hello)
        );
    }
    Ok(())
}

fn render(m: &Machine, f: &Figures) -> String {
    let meta: serde_json::Value = serde_json::from_str(&f.template_meta).unwrap_or_default();
    let ratio = |a: &[Duration], b: &[Duration]| median(a).as_secs_f64() / median(b).as_secs_f64();
    let warm_ratio = ratio(&f.warm_ready, &f.restore_hello);
    let cold_ratio = ratio(&f.cold_ready, &f.boot_hello);
    let templated = f.sources.iter().filter(|s| s.contains("Template")).count();
    let mut s = String::new();
    let _ = writeln!(s, "{HEADING}\n");
    let _ = writeln!(
        s,
        "<!-- Written by tests/e2e/benches/api_templates.rs; a run replaces this section. -->\n"
    );
    let _ = writeln!(
        s,
        "Measured {} at commit `{}` ({} binaries) on {}, nproc {}, accelerator `{}`: image \
         `{IMAGE}`, {MEMORY_MB} MiB, 1 vCPU, {RUNS} rounds alternating the four, one VM at a \
         time (two installations up, one with templates on, one off). Load average (1/5/15 \
         min) {} before, {} after: the host was {}.\n",
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
        "Reproduce: `cargo build --release --workspace && \
         SCAIBUNKER_AGENT_BIN=$(scripts/build-agent.sh) \
         cargo bench -p scaibunker-e2e --bench api_templates`\n"
    );
    let _ = writeln!(
        s,
        "Template: the first create of the shape was cold ({}) and started the template \
         build, which ran beside it (a second VM); the template was ready {} after that \
         bunker was deleted (the worker's own figures: boot to hello {} ms, save {} ms, state \
         file {:.1} MB). The worker logged {templated} of the {RUNS} measured template \
         creates as restored from it (`source=Template` in its log).\n",
        ms(f.first_cold),
        ms(f.template_wait),
        meta["boot_ms"],
        meta["save_ms"],
        meta["state_bytes"].as_f64().unwrap_or(0.0) / 1e6,
    );
    let _ = writeln!(s, "| what | median (min–max) |\n|---|---|");
    let mut row = |what: &str, v: &[Duration]| {
        let _ = writeln!(s, "| {what} | {} |", spread_ms(v));
    };
    row(
        "template create → exec-ready through the API",
        &f.warm_ready,
    );
    row("  of which the create call (`wait`)", &f.warm_create);
    row("floor: raw restore → agent `HELLO`", &f.restore_hello);
    row(
        "  raw restore → first exec `true` answered",
        &f.restore_exec,
    );
    row("cold create → exec-ready through the API", &f.cold_ready);
    row("  of which the create call (`wait`)", &f.cold_create);
    row("floor: raw boot → agent `HELLO`", &f.boot_hello);
    row("  raw boot → first exec `true` answered", &f.boot_exec);
    let goal = |met: bool| if met { "met" } else { "missed" };
    let _ = writeln!(
        s,
        "\nTemplate create → exec-ready is {warm_ratio:.2}× the raw restore (goal ≤ 1.5× and \
         < 1 s: {}); cold create → exec-ready is {cold_ratio:.2}× the raw boot (goal ≤ 1.15×: \
         {}). Against the raw start plus its first exec the ratios are {:.2}× and {:.2}×.\n",
        goal(warm_ratio <= 1.5 && median(&f.warm_ready) < Duration::from_secs(1)),
        goal(cold_ratio <= 1.15),
        ratio(&f.warm_ready, &f.restore_exec),
        ratio(&f.cold_ready, &f.boot_exec),
    );
    let _ = writeln!(
        s,
        "- The API figures run from the SDK's `POST /bunkers` (`wait: true`) to the answer of \
         the first exec: controller (auth, quota, scheduling, the database), the worker's \
         create (overlay, QEMU, restore or boot, the agent's hello, and for a restore the \
         identity request: host name, machine id and a credited seed), then one exec through both.\n\
         - The raw floors are this benchmark alone driving QEMU with the worker's command \
         line: `qemu-img create` of the overlay (median {} for a restore, {} for a boot) \
         included, as the worker's driver does, until the agent's `HELLO` on the \
         virtio-serial socket; the second row adds one exec of `true` over the agent \
         protocol.",
        ms(median(&f.restore_overlay)),
        ms(median(&f.boot_overlay)),
    );
    s
}
