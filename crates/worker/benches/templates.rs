//! Template snapshots against their floors, measured in one run and written to the
//! "Template snapshots" section of `docs/benchmarks.md`:
//!
//! 1. Create → exec-ready from a template (`POST /bunkers`, then a first exec of `true`,
//!    through the worker's API), against a raw restore of the same template: the driver's
//!    overlay + `qemu-system-x86_64 … -incoming` + `cont`, timed until the agent's `HELLO`.
//! 2. Cold create → exec-ready (a worker with templates off), against a raw boot: the
//!    driver's overlay + QEMU with the worker's command line, timed until the agent's `HELLO`.
//!
//! Runs alternate between the four so that host load hits them alike; one VM at a time.
//!
//! Run: `SCAIBUNKER_IMAGES_DIR=<guest artefacts> cargo bench -p scaibunker-worker --bench
//! templates` (needs `tiny.ext4`, `vmlinux`, `initramfs.cpio.gz` with an agent of this tree).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use scaibunker_proto::worker::{
    BootSource, CreateVm, ExecRequest, ExecResult, GuestUser, Program, VmInfo, WORKER_API_PREFIX,
};
use scaibunker_worker::agent_client::AgentClient;
use scaibunker_worker::config::{AccelChoice, TemplateMode};
use scaibunker_worker::images::ImageCache;
use scaibunker_worker::templates::{META_FILE, Template, TemplateMeta, TemplateStatus};
use scaibunker_worker::vmm::qemu::QemuVmm;
use scaibunker_worker::vmm::{BootSpec, DiskLayer, HostVirt, Vmm};
use scaibunker_worker::{WorkerConfig, WorkerHandle, start};

const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/benchmarks.md");
const HEADING: &str = "## Template snapshots";
const RUNS: usize = 5;
const TOKEN: &str = "bench-token";
const MEMORY_MB: u64 = 256;
const HELLO_TIMEOUT: Duration = Duration::from_secs(120);

fn main() -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?
        .block_on(run())
}

struct Series {
    name: &'static str,
    ms: Vec<f64>,
}

async fn run() -> Result<()> {
    let images = std::env::var_os("SCAIBUNKER_IMAGES_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/scaibunker/images"))
        })
        .context("no SCAIBUNKER_IMAGES_DIR and no HOME")?;
    let cache = ImageCache::scan(&images)?;
    let image = cache.lookup("tiny").cloned().context("no tiny.ext4")?;
    let guest = cache
        .boot()
        .cloned()
        .context("no vmlinux and initramfs.cpio.gz")?;
    let load_start = loadavg();
    let data = tempfile::tempdir()?;
    let cores = u32::try_from(std::thread::available_parallelism()?.get()).unwrap_or(1);
    let vmm = Arc::new(QemuVmm::new(AccelChoice::Auto, &HostVirt::probe(), cores)?);

    let with = |mode: TemplateMode, name: &str| {
        let mut c = WorkerConfig::standalone(TOKEN.into(), data.path().join(name), images.clone());
        c.templates = mode;
        c
    };
    let warm = start(with(TemplateMode::On, "warm")).await?;
    let cold = start(with(TemplateMode::Off, "cold")).await?;
    let http = reqwest::Client::new();

    eprintln!("[bench] building the template of tiny/{MEMORY_MB} MiB");
    let first = create_exec(&http, &warm, "first", &image.sha256).await?;
    ensure!(first.0.boot_source == BootSource::Cold);
    let template_dir = wait_template(&warm).await?;
    delete(&http, &warm, "first").await?;
    let meta: TemplateMeta = serde_json::from_slice(&std::fs::read(template_dir.join(META_FILE))?)?;
    let template = Template {
        key: template_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        dir: template_dir.clone(),
        meta,
    };

    let mut series = [
        Series {
            name: "template create",
            ms: vec![],
        },
        Series {
            name: "  of which create call",
            ms: vec![],
        },
        Series {
            name: "raw restore (floor)",
            ms: vec![],
        },
        Series {
            name: "cold create",
            ms: vec![],
        },
        Series {
            name: "raw boot (floor)",
            ms: vec![],
        },
    ];
    for i in 0..RUNS {
        eprintln!("[bench] round {}/{RUNS}", i + 1);
        let (info, create_ms, total_ms) =
            create_exec(&http, &warm, &format!("t{i}"), &image.sha256).await?;
        ensure!(
            info.boot_source == BootSource::Template,
            "not restored: {info:?}"
        );
        delete(&http, &warm, &format!("t{i}")).await?;
        series[0].ms.push(total_ms);
        series[1].ms.push(create_ms);

        let dir = data.path().join(format!("raw-restore-{i}"));
        series[2].ms.push(
            raw(vmm.as_ref(), &dir, |socket| {
                Ok((
                    template.restore_spec(&dir, socket, image.size_bytes),
                    Some(template.state()),
                ))
            })
            .await?,
        );

        let (info, _, total_ms) =
            create_exec(&http, &cold, &format!("c{i}"), &image.sha256).await?;
        ensure!(info.boot_source == BootSource::Cold);
        delete(&http, &cold, &format!("c{i}")).await?;
        series[3].ms.push(total_ms);

        let dir = data.path().join(format!("raw-boot-{i}"));
        series[4].ms.push(
            raw(vmm.as_ref(), &dir, |socket| {
                Ok((
                    BootSpec {
                        dir: dir.clone(),
                        kernel: guest.kernel.clone(),
                        initramfs: guest.initramfs.clone(),
                        base: vec![DiskLayer::raw(&image.path)],
                        disk_bytes: image.size_bytes,
                        agent_socket: socket.to_owned(),
                        cpu_millicores: 1000,
                        memory_mb: MEMORY_MB,
                        hostname: "bench".into(),
                        nic: scaibunker_worker::network::Nic::Unplugged,
                        extra_nics: Vec::new(),
                    },
                    None,
                ))
            })
            .await?,
        );
    }
    warm.shutdown().await;
    cold.shutdown().await;

    let section = render(&series, &template, &load_start, vmm.runtime());
    eprintln!("{section}");
    let old = std::fs::read_to_string(DOC).unwrap_or_default();
    std::fs::write(DOC, replace_section(&old, &section)).context("write benchmarks.md")?;
    Ok(())
}

/// Create, then exec `true`: (info, ms of the create call, ms until the exec returned).
async fn create_exec(
    http: &reqwest::Client,
    w: &WorkerHandle,
    id: &str,
    sha: &str,
) -> Result<(VmInfo, f64, f64)> {
    let base = format!("http://{}{WORKER_API_PREFIX}", w.local_addr());
    let started = Instant::now();
    let resp = http
        .post(format!("{base}/bunkers"))
        .bearer_auth(TOKEN)
        .json(&CreateVm {
            bunker_id: id.into(),
            image_sha256: sha.into(),
            cpu_millicores: 1000,
            memory_mb: MEMORY_MB,
            disk_mb: 1024,
            hostname: format!("bench-{id}"),
            env_vars: Default::default(),
            image_pull: None,
            snapshot: None,
            tenant_id: String::new(),
            network: Default::default(),
        })
        .send()
        .await?;
    ensure!(resp.status() == 200, "create: {}", resp.text().await?);
    let info: VmInfo = resp.json().await?;
    let created = ms(started.elapsed());
    let resp = http
        .post(format!("{base}/bunkers/{id}/exec"))
        .bearer_auth(TOKEN)
        .json(&ExecRequest {
            program: Program::Argv(vec!["true".into()]),
            env: Default::default(),
            cwd: None,
            user: GuestUser::Root,
            stdin_b64: None,
            timeout_ms: 60_000,
            output_limit_bytes: 1024,
        })
        .send()
        .await?;
    ensure!(resp.status() == 200, "exec: {}", resp.text().await?);
    let r: ExecResult = resp.json().await?;
    ensure!(r.exit_code == Some(0));
    Ok((info, created, ms(started.elapsed())))
}

async fn delete(http: &reqwest::Client, w: &WorkerHandle, id: &str) -> Result<()> {
    let url = format!("http://{}{WORKER_API_PREFIX}/bunkers/{id}", w.local_addr());
    let resp = http.delete(url).bearer_auth(TOKEN).send().await?;
    ensure!(resp.status() == 204, "delete {id}: {}", resp.status());
    Ok(())
}

async fn wait_template(w: &WorkerHandle) -> Result<PathBuf> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        for (_, status) in w.templates() {
            match status {
                TemplateStatus::Ready { dir, .. } => return Ok(dir),
                TemplateStatus::Failed => bail!("the template build failed"),
                TemplateStatus::Building => {}
            }
        }
        ensure!(Instant::now() < deadline, "no template within 300 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Boots (or restores) through the driver alone, timed until the agent's hello.
async fn raw(
    vmm: &dyn Vmm,
    dir: &Path,
    spec: impl FnOnce(&Path) -> Result<(BootSpec, Option<PathBuf>)>,
) -> Result<f64> {
    std::fs::create_dir_all(dir)?;
    let socket = dir.join("agent.sock");
    let listener = tokio::net::UnixListener::bind(&socket)?;
    let (spec, state) = spec(&socket)?;
    let started = Instant::now();
    let vm = match &state {
        Some(state) => vmm.restore(&spec, state).await?,
        None => vmm.boot(&spec).await?,
    };
    let agent = tokio::time::timeout(HELLO_TIMEOUT, AgentClient::connect(&listener))
        .await
        .context("no hello")??;
    let took = ms(started.elapsed());
    drop(agent);
    vm.stop().await;
    std::fs::remove_dir_all(dir)?;
    Ok(took)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn stats(ms: &[f64]) -> (f64, f64, f64) {
    let mut v = ms.to_vec();
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn render(series: &[Series], template: &Template, load_start: &str, runtime: String) -> String {
    let mut s = String::new();
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let _ = writeln!(s, "{HEADING}\n");
    let _ = writeln!(
        s,
        "<!-- Written by crates/worker/benches/templates.rs; a run replaces this section. -->\n"
    );
    let _ = writeln!(
        s,
        "Measured at commit `{commit}` ({profile} worker), runtime `{runtime}`, image `tiny`, \
         {MEMORY_MB} MiB, {RUNS} rounds alternating the four, one VM at a time. Load average \
         {load_start} before, {} after: the host was shared with other work, so expect noise.\n",
        loadavg()
    );
    let _ = writeln!(
        s,
        "Template: boot to hello {} ms, save {} ms, state file {:.1} MB.\n",
        template.meta.boot_ms,
        template.meta.save_ms,
        template.meta.state_bytes as f64 / 1e6
    );
    let _ = writeln!(s, "| what | median ms | min | max |\n|---|---|---|---|");
    for x in series {
        let (med, min, max) = stats(&x.ms);
        let _ = writeln!(s, "| {} | {med:.0} | {min:.0} | {max:.0} |", x.name);
    }
    let ratio = |a: usize, b: usize| stats(&series[a].ms).0 / stats(&series[b].ms).0;
    let _ = writeln!(
        s,
        "\nTemplate create → exec-ready is {:.2}× its floor (goal ≤ 1.5× and < 1 s); cold create \
         → exec-ready is {:.2}× a raw boot (goal ≤ 1.15×).\n",
        ratio(0, 2),
        ratio(3, 4)
    );
    let _ = writeln!(
        s,
        "- *template create*: `POST /bunkers` (restore over a fresh overlay, the agent's hello, \
         the identity exec: host name and seed) then a first exec of `true`, through the \
         worker's HTTP API.\n\
         - *raw restore*: the driver alone: `qemu-img` overlay on the template's disk, QEMU with \
         `-incoming`, `query-migrate` polling, `cont`, until the agent's `HELLO`.\n\
         - *cold create*: the same through a worker with templates off.\n\
         - *raw boot*: the driver alone: overlay and QEMU with the worker's command line, until \
         the agent's `HELLO`."
    );
    s
}

/// `doc` with this bench's section replaced (a section runs to the next `## ` heading).
fn replace_section(doc: &str, section: &str) -> String {
    let lines: Vec<&str> = doc.lines().collect();
    let Some(start) = lines.iter().position(|l| l.trim_end() == HEADING) else {
        return format!("{}\n\n{}\n", doc.trim_end(), section.trim_end());
    };
    let end = lines[start + 1..]
        .iter()
        .position(|l| l.starts_with("## "))
        .map_or(lines.len(), |i| start + 1 + i);
    let mut out: Vec<String> = lines[..start].iter().map(|l| (*l).to_owned()).collect();
    out.push(section.trim_end().to_owned());
    if end < lines.len() {
        out.push(String::new());
        out.extend(lines[end..].iter().map(|l| (*l).to_owned()));
    }
    out.join("\n") + "\n"
}
