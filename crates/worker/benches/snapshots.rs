//! Bunker snapshot save and restore against guest memory size, written to the "Bunker
//! snapshots" section of `docs/benchmarks.md`. Per memory size and round, one VM at a time:
//!
//! 1. Cold create of a `tiny` bunker (the baseline), then a `full` snapshot call (sync of the
//!    agent channel, save, restart from the state, rebase, hash, upload) and a `disk` one.
//! 2. Delete it; restore the `full` snapshot into a new bunker and time create → exec-ready
//!    (download and checks, restore, the identity exec, a first exec of `true`); delete.
//! 3. Restore the `disk` snapshot the same way (a cold boot of the saved disk); delete.
//!
//! Objects go to a stand-in of the storage proxy (the same routes over a local directory, in
//! this process), so the figures hold the HTTP streaming but not the controller.
//!
//! Run: `SCAIBUNKER_IMAGES_DIR=<guest artefacts> cargo bench -p scaibunker-worker --bench
//! snapshots` (needs `tiny.ext4`, `vmlinux`, `initramfs.cpio.gz` with an agent of this tree).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::put;
use futures_util::StreamExt;
use scaibunker_proto::worker::{
    BootSource, CreateVm, ExecRequest, ExecResult, GuestUser, Program, SnapshotKind,
    SnapshotManifest, SnapshotVm, VmInfo, WORKER_API_PREFIX,
};
use scaibunker_worker::config::TemplateMode;
use scaibunker_worker::images::ImageCache;
use scaibunker_worker::{WorkerConfig, start};
use tokio::io::AsyncWriteExt;

const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/benchmarks.md");
const HEADING: &str = "## Bunker snapshots";
const RUNS: usize = 3;
const TOKEN: &str = "bench-token";
/// Guest memory, and how much of it the guest fills with non-zero data (in a tmpfs) before
/// the snapshot: the state file carries only pages the guest touched.
const CASES: [(u64, u64); 6] = [
    (128, 0),
    (256, 0),
    (512, 0),
    (1024, 0),
    (1024, 256),
    (1024, 512),
];

fn main() -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?
        .block_on(run())
}

async fn put_object(
    State(dir): State<PathBuf>,
    UrlPath(key): UrlPath<String>,
    body: Body,
) -> StatusCode {
    let path = dir.join(&key);
    let Some(parent) = path.parent() else {
        return StatusCode::BAD_REQUEST;
    };
    if std::fs::create_dir_all(parent).is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    let Ok(mut file) = tokio::fs::File::create(&path).await else {
        return StatusCode::INTERNAL_SERVER_ERROR;
    };
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else {
            return StatusCode::BAD_REQUEST;
        };
        if file.write_all(&chunk).await.is_err() {
            return StatusCode::INTERNAL_SERVER_ERROR;
        }
    }
    if file.sync_all().await.is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    StatusCode::CREATED
}

async fn get_object(
    State(dir): State<PathBuf>,
    UrlPath(key): UrlPath<String>,
) -> Result<Body, StatusCode> {
    let file = tokio::fs::File::open(dir.join(&key))
        .await
        .map_err(|_| StatusCode::NOT_FOUND)?;
    Ok(Body::from_stream(tokio_util::io::ReaderStream::new(file)))
}

/// One memory size's figures, milliseconds per round.
#[derive(Default)]
struct Row {
    memory_mb: u64,
    filled_mb: u64,
    cold: Vec<f64>,
    full_save: Vec<f64>,
    disk_save: Vec<f64>,
    full_restore: Vec<f64>,
    disk_restore: Vec<f64>,
    state_mb: Vec<f64>,
    disk_mb: Vec<f64>,
}

struct Bench {
    http: reqwest::Client,
    base: String,
    sha: String,
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
    let load_start = loadavg();

    let objects = tempfile::tempdir()?;
    let app = axum::Router::new()
        .route(
            "/v1/modules/scaibunker/storage/objects/{*key}",
            put(put_object).get(get_object),
        )
        .with_state(objects.path().to_owned());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let proxy = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });

    let data = tempfile::tempdir()?;
    let mut config = WorkerConfig::standalone(TOKEN.into(), data.path().join("w"), images);
    config.templates = TemplateMode::Off;
    config.storage_url = Some(proxy);
    let worker = start(config).await?;
    let bench = Bench {
        http: reqwest::Client::new(),
        base: format!("http://{}{WORKER_API_PREFIX}", worker.local_addr()),
        sha: image.sha256.clone(),
    };

    let mut rows: Vec<Row> = CASES
        .iter()
        .map(|&(memory_mb, filled_mb)| Row {
            memory_mb,
            filled_mb,
            ..Row::default()
        })
        .collect();
    for round in 0..RUNS {
        for row in &mut rows {
            let m = row.memory_mb;
            let f = row.filled_mb;
            eprintln!(
                "[bench] round {}/{RUNS}, {m} MiB, {f} MiB filled",
                round + 1
            );
            let src = format!("src-{m}-{f}-{round}");
            let (info, cold) = bench.create_exec(&src, m, None).await?;
            ensure!(info.boot_source == BootSource::Cold);
            row.cold.push(cold);
            // Something for the snapshot to carry: a process and a written file.
            bench
                .exec(
                    &src,
                    "setsid sh -c 'while :; do sleep 1; done' </dev/null >/dev/null 2>&1 & \
                     echo data > /root/file",
                )
                .await?;
            if f > 0 {
                bench
                    .exec(
                        &src,
                        &format!(
                            "mkdir -p /mnt/fill && mount -t tmpfs -o size={}m tmpfs /mnt/fill && \
                             yes snapshot | head -c 1048576 > /mnt/fill/blk && set -- && i=0 && \
                             while [ $i -lt {f} ]; do set -- \"$@\" /mnt/fill/blk; i=$((i+1)); done && \
                             cat \"$@\" > /mnt/fill/data",
                            f + 2
                        ),
                    )
                    .await?;
            }
            let (full_id, disk_id) = (
                format!("snp_f{m}_{f}_{round}"),
                format!("snp_d{m}_{f}_{round}"),
            );
            let (full, ms_full) = bench.snapshot(&src, &full_id, SnapshotKind::Full).await?;
            row.full_save.push(ms_full);
            let (disk, ms_disk) = bench.snapshot(&src, &disk_id, SnapshotKind::Disk).await?;
            row.disk_save.push(ms_disk);
            let size = |m: &SnapshotManifest, name: &str| {
                m.files
                    .iter()
                    .find(|f| f.name == name)
                    .map_or(0.0, |f| f.size_bytes as f64 / 1e6)
            };
            row.state_mb.push(size(&full, "vm.state"));
            row.disk_mb.push(size(&disk, "disk.qcow2"));
            bench.delete(&src).await?;

            for (manifest, into) in [
                (&full, &mut row.full_restore),
                (&disk, &mut row.disk_restore),
            ] {
                let dst = format!("dst-{m}-{round}");
                let (info, ms) = bench.create_exec(&dst, m, Some(manifest.clone())).await?;
                ensure!(info.boot_source == BootSource::Snapshot);
                into.push(ms);
                bench.delete(&dst).await?;
            }
            for id in [&full_id, &disk_id] {
                std::fs::remove_dir_all(objects.path().join("snapshots/tnt_bench").join(id))?;
            }
        }
    }
    worker.shutdown().await;
    server.abort();

    let section = render(&rows, &load_start, &image.name);
    eprintln!("{section}");
    let old = std::fs::read_to_string(DOC).unwrap_or_default();
    std::fs::write(DOC, replace_section(&old, &section)).context("write benchmarks.md")?;
    Ok(())
}

impl Bench {
    /// Create (cold, or from a snapshot), then exec `true`: ms until the exec returned.
    async fn create_exec(
        &self,
        id: &str,
        memory_mb: u64,
        snapshot: Option<SnapshotManifest>,
    ) -> Result<(VmInfo, f64)> {
        let started = Instant::now();
        let resp = self
            .http
            .post(format!("{}/bunkers", self.base))
            .bearer_auth(TOKEN)
            .json(&CreateVm {
                bunker_id: id.into(),
                image_sha256: self.sha.clone(),
                cpu_millicores: 1000,
                memory_mb,
                disk_mb: 1024,
                hostname: format!("bench-{}", id.replace('_', "-")),
                env_vars: Default::default(),
                snapshot,
                image_pull: None,
                tenant_id: String::new(),
                network: Default::default(),
            })
            .send()
            .await?;
        ensure!(resp.status() == 200, "create: {}", resp.text().await?);
        let info: VmInfo = resp.json().await?;
        self.exec(id, "true").await?;
        Ok((info, ms(started.elapsed())))
    }

    async fn exec(&self, id: &str, cmd: &str) -> Result<()> {
        let resp = self
            .http
            .post(format!("{}/bunkers/{id}/exec", self.base))
            .bearer_auth(TOKEN)
            .json(&ExecRequest {
                program: Program::Shell(cmd.into()),
                env: Default::default(),
                cwd: None,
                user: GuestUser::Root,
                stdin_b64: None,
                timeout_ms: 300_000,
                output_limit_bytes: 1024,
            })
            .send()
            .await?;
        ensure!(resp.status() == 200, "exec: {}", resp.text().await?);
        let r: ExecResult = resp.json().await?;
        ensure!(r.exit_code == Some(0), "`{cmd}`: {r:?}");
        Ok(())
    }

    async fn snapshot(
        &self,
        id: &str,
        snapshot_id: &str,
        kind: SnapshotKind,
    ) -> Result<(SnapshotManifest, f64)> {
        let started = Instant::now();
        let resp = self
            .http
            .post(format!("{}/bunkers/{id}/snapshot", self.base))
            .bearer_auth(TOKEN)
            .json(&SnapshotVm {
                snapshot_id: snapshot_id.into(),
                kind,
                object_prefix: format!("snapshots/tnt_bench/{snapshot_id}"),
            })
            .send()
            .await?;
        ensure!(resp.status() == 200, "snapshot: {}", resp.text().await?);
        let manifest: SnapshotManifest = resp.json().await?;
        Ok((manifest, ms(started.elapsed())))
    }

    async fn delete(&self, id: &str) -> Result<()> {
        let resp = self
            .http
            .delete(format!("{}/bunkers/{id}", self.base))
            .bearer_auth(TOKEN)
            .send()
            .await?;
        ensure!(resp.status() == 204, "delete {id}: {}", resp.status());
        Ok(())
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn range(v: &[f64]) -> String {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{:.0} ({lo:.0}–{hi:.0})", median(v))
}

fn render(rows: &[Row], load_start: &str, image: &str) -> String {
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
        "<!-- Written by crates/worker/benches/snapshots.rs; a run replaces this section. -->\n"
    );
    let _ = writeln!(
        s,
        "Measured at commit `{commit}` ({profile} worker), QEMU under TCG, image `{image}`, \
         one vCPU, {RUNS} rounds over the memory sizes, one VM at a time. Load average \
         {load_start} before, {} after: the host was shared with other work, so expect noise. \
         Objects went to a stand-in of the storage proxy (its routes over a local directory, \
         in the bench process). Milliseconds, median (min–max).\n",
        loadavg()
    );
    let _ = writeln!(
        s,
        "| memory | cold create → exec-ready | `full` save | `full` restore → exec-ready | \
         state file MB | `disk` save | `disk` restore → exec-ready | disk overlay MB |\n\
         |---|---|---|---|---|---|---|---|"
    );
    for r in rows {
        let memory = if r.filled_mb > 0 {
            format!("{} MiB, {} MiB filled", r.memory_mb, r.filled_mb)
        } else {
            format!("{} MiB", r.memory_mb)
        };
        let _ = writeln!(
            s,
            "| {memory} | {} | {} | {} | {:.1} | {} | {} | {:.1} |",
            range(&r.cold),
            range(&r.full_save),
            range(&r.full_restore),
            median(&r.state_mb),
            range(&r.disk_save),
            range(&r.disk_restore),
            median(&r.disk_mb),
        );
    }
    let _ = writeln!(
        s,
        "\n- *`full` save*: the worker's snapshot call: close the agent channel and wait for \
         the agent to reopen its port, save the VM state, restart the bunker from it on a new \
         overlay (it runs again from here), copy and rebase the disk onto the image, hash and \
         upload both files.\n\
         - *`full` restore*: `POST /bunkers` with the manifest (download, size and SHA-256 \
         checks, `qemu-img rebase -u`, QEMU `-incoming`, `cont`, the agent's hello, the \
         identity exec) then a first exec of `true`.\n\
         - *`disk` save*: `sync` in the guest, pause, copy the overlay, resume, rebase, hash, \
         upload. *`disk` restore*: download, checks, then a cold boot of the saved disk.\n\
         - *filled*: before the snapshots the guest writes that much non-zero data into a \
         tmpfs (one `cat` of a 1 MiB block that many times), so that much more of its memory \
         is in use."
    );
    let idle: Vec<&Row> = rows.iter().filter(|r| r.filled_mb == 0).collect();
    if let (Some(small), Some(big)) = (idle.first(), idle.last()) {
        let _ = writeln!(
            s,
            "\nFrom {} to {} MiB of guest memory the state file goes from {:.1} to {:.1} MB \
             and the median `full` save from {:.0} to {:.0} ms, restore from {:.0} to {:.0} ms \
             (guests that touched little memory).",
            small.memory_mb,
            big.memory_mb,
            median(&small.state_mb),
            median(&big.state_mb),
            median(&small.full_save),
            median(&big.full_save),
            median(&small.full_restore),
            median(&big.full_restore),
        );
    }
    if let Some(full) = rows
        .iter()
        .filter(|r| r.filled_mb > 0)
        .max_by_key(|r| r.filled_mb)
    {
        let state = median(&full.state_mb);
        let _ = writeln!(
            s,
            "\nWhat moves a `full` snapshot is the memory in use: with {} MiB filled the state \
             file is {state:.0} MB, saved (end to end, upload included) at about {:.0} MB/s and \
             restored to exec-ready at about {:.0} MB/s.",
            full.filled_mb,
            state / (median(&full.full_save) / 1000.0),
            state / (median(&full.full_restore) / 1000.0),
        );
    }
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
