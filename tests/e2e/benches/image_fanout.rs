//! Image fan-out: how fast a baked image reaches a worker through the storage proxy and from
//! a peer worker, written to the "Image fan-out" section of `docs/benchmarks.md`.
//!
//! One `scaibunker up` (controller + worker `a`, local-directory object store) and a second
//! worker process `b`. Each round: a tarball holding a file of random bytes is uploaded and
//! baked into a `SIZE_MIB` ext4; a new availability group with `a` and the image makes `a`
//! pull it through the proxy; the proxy's copy is then deleted and `b` joins the group, so it
//! can only pull from `a`. The pull times are the workers' own (`image pulled … elapsed_ms`
//! in their logs: request to verified file in place). The floor, in the same run, is reading
//! the same bytes from the page cache and hashing them (SHA-256), which every pull also does.
//!
//! Run: `cargo build --release --workspace && SCAIBUNKER_AGENT_BIN=$(scripts/build-agent.sh)
//! cargo bench -p scaibunker-e2e --bench image_fanout`

use std::fmt::Write as _;
use std::io::Read as _;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use rand::RngCore as _;
use scaibunker_api::images::{CreateAvailabilityGroup, CreateImage, ImageSource};
use scaibunker_e2e::bench::{Machine, load_average, mb_per_s, median};
use scaibunker_e2e::{Up, UpOptions};
use sha2::Digest as _;

const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/benchmarks.md");
const HEADING: &str = "## Image fan-out";
const SIZE_MIB: u64 = 256;
const PAYLOAD_MIB: usize = 192;
const ROUNDS: usize = 3;
const FAST: [(&str, &str); 2] = [
    ("WORKER_HEARTBEAT_INTERVAL_S", "1"),
    ("SCAIBUNKER_JOB_INTERVAL_S", "1"),
];

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
    bake: Vec<Duration>,
    proxy: Vec<Duration>,
    peer: Vec<Duration>,
    floor: Vec<Duration>,
    bytes: u64,
}

async fn run() -> Result<()> {
    let machine = Machine::probe()?;
    eprintln!("[bench] {machine:?}");
    let mut up = Up::start(UpOptions {
        env: FAST
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..UpOptions::default()
    })?;
    let mut b = up.add_worker("b", &FAST[..1])?;
    let mut f = Figures::default();
    let outcome = measure(&up, &mut f).await;
    let _ = b.kill();
    let _ = b.wait();
    let status = up.stop()?;
    outcome?;
    ensure!(status.success(), "up exited with {status}");
    let section = render(&machine, &f);
    let old = std::fs::read_to_string(DOC).context("reading docs/benchmarks.md")?;
    let new = scaibunker_e2e::doc::replace_section(&old, HEADING, &section);
    std::fs::write(DOC, new).context("writing docs/benchmarks.md")?;
    println!("{section}");
    Ok(())
}

/// Polls `check` every 100 ms for up to two minutes.
async fn within<T, F: std::future::Future<Output = Result<Option<T>>>>(
    what: &str,
    mut check: impl FnMut() -> F,
) -> Result<T> {
    let give_up = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if Instant::now() > give_up {
            bail!("{what} did not happen within two minutes");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn tarball() -> Vec<u8> {
    let mut payload = vec![0u8; PAYLOAD_MIB << 20];
    rand::rng().fill_bytes(&mut payload);
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(payload.len() as u64);
    b.append_data(&mut h, "payload.bin", &payload[..])
        .expect("append");
    b.into_inner().expect("tar")
}

/// The `elapsed_ms` of the log line recording the pull of `sha` in `log`.
fn pull_ms(log: &str, sha: &str) -> Option<Duration> {
    let line = log
        .lines()
        .find(|l| l.contains("image pulled") && l.contains(sha))?;
    let ms = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("elapsed_ms="))?
        .parse()
        .ok()?;
    Some(Duration::from_millis(ms))
}

async fn measure(up: &Up, f: &mut Figures) -> Result<()> {
    let client = up.client();
    let http = reqwest::Client::new();
    let workers = within("two workers online", || async {
        let v: serde_json::Value = http
            .get(format!("{}/v1/modules/scaibunker/workers", up.url()))
            .bearer_auth(up.key())
            .send()
            .await?
            .json()
            .await?;
        let ws = v["data"].as_array().cloned().unwrap_or_default();
        Ok((ws.len() == 2 && ws.iter().all(|w| w["status"] == "online")).then_some(ws))
    })
    .await?;
    let id_of = |name_is_b: bool| {
        workers
            .iter()
            .find(|w| (w["name"] == "b") == name_is_b)
            .and_then(|w| w["id"].as_str())
            .map(str::to_owned)
            .context("worker id")
    };
    let (a, b) = (id_of(false)?, id_of(true)?);
    for round in 0..ROUNDS {
        let image = client
            .create_image(&CreateImage {
                name: format!("fanout-{round}"),
                source: ImageSource { kind: "tar".into() },
                size_mib: Some(SIZE_MIB),
                scope: Some("platform".into()),
                lazy_pull: None,
                default_cpu_millicores: None,
                default_memory_mb: None,
                default_disk_mb: None,
            })
            .await?;
        let started = Instant::now();
        let ready = client.upload_image_content(&image.id, tarball()).await?;
        f.bake.push(started.elapsed());
        let sha = ready.sha256.clone().context("sha256")?;
        f.bytes = ready.size_bytes.context("size")?;
        let group = client
            .create_availability_group(&CreateAvailabilityGroup {
                name: format!("fanout-{round}"),
                description: None,
            })
            .await?;
        client
            .add_to_availability_group(&group.id, "workers", &a)
            .await?;
        client
            .add_to_availability_group(&group.id, "images", &image.id)
            .await?;
        f.proxy.push(
            within("a pulled through the proxy", || async {
                Ok(pull_ms(&up.logs(), &sha))
            })
            .await?,
        );
        // The proxy's copy goes; b can only get the bytes from a.
        up.delete_object(&format!("images/{}/rootfs.ext4", image.id))
            .await?;
        within("a's pull recorded", || async {
            let img = client.image(&image.id).await?;
            Ok(img.warm.ready.eq(&1).then_some(()))
        })
        .await?;
        client
            .add_to_availability_group(&group.id, "workers", &b)
            .await?;
        let b_log = up.data_dir().join("worker-b/worker.log");
        f.peer.push(
            within("b pulled from its peer", || async {
                let log = std::fs::read_to_string(&b_log).unwrap_or_default();
                Ok(pull_ms(&log, &sha))
            })
            .await?,
        );
        let log = std::fs::read_to_string(&b_log).unwrap_or_default();
        let line = log
            .lines()
            .find(|l| l.contains("image pulled") && l.contains(&sha))
            .unwrap_or_default();
        ensure!(
            line.contains("source=peer") || line.contains("source=\"peer\""),
            "b's pull of {sha} did not come from a peer: {line}"
        );
        // Floor: read the pulled file (now in the page cache) and hash it.
        let path = up
            .data_dir()
            .join("worker-b/images")
            .join(format!("{sha}.ext4"));
        let started = Instant::now();
        let mut file = std::fs::File::open(&path)?;
        let mut hash = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
        }
        f.floor.push(started.elapsed());
        ensure!(
            hex_of(&hash.finalize()) == sha,
            "b's copy hashes to the image's sha"
        );
        eprintln!(
            "[bench] round {round}: bake {:?}, proxy {:?}, peer {:?}, floor {:?}",
            f.bake[round], f.proxy[round], f.peer[round], f.floor[round]
        );
    }
    Ok(())
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn render(m: &Machine, f: &Figures) -> String {
    let rate = |d: &[Duration]| mb_per_s(f.bytes, median(d));
    let mut s = String::new();
    let _ = writeln!(s, "{HEADING}\n");
    let _ = writeln!(
        s,
        "<!-- Written by tests/e2e/benches/image_fanout.rs; a run replaces this section. -->\n"
    );
    let _ = writeln!(
        s,
        "Measured {} at commit `{}` ({} binaries) on {}, nproc {}: one `scaibunker up` \
         (controller, worker `a`, local-directory object store) and a second worker process \
         `b` on the same host, loopback HTTP. {ROUNDS} rounds, each a fresh {SIZE_MIB} MiB \
         ext4 baked from a tarball of {PAYLOAD_MIB} MiB of random bytes. Load average \
         (1/5/15 min) {} before, {} after: the host was {}.\n",
        m.date,
        m.commit,
        m.profile,
        m.cpu_model,
        m.nproc,
        m.load_start,
        load_average(),
        m.load_words(),
    );
    let _ = writeln!(
        s,
        "Reproduce: `cargo build --release --workspace && \
         SCAIBUNKER_AGENT_BIN=$(scripts/build-agent.sh) \
         cargo bench -p scaibunker-e2e --bench image_fanout`\n"
    );
    let _ = writeln!(s, "| path | median | MB/s | runs (ms) |");
    let _ = writeln!(s, "|---|---|---|---|");
    let runs = |d: &[Duration]| {
        d.iter()
            .map(|x| x.as_millis().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    for (name, d) in [
        ("pull through the storage proxy (`a`)", &f.proxy),
        (
            "pull from peer `a` (`b`; the proxy's copy deleted)",
            &f.peer,
        ),
        (
            "floor: read + SHA-256 of the same file, page cache",
            &f.floor,
        ),
        ("upload + bake (tar → ext4) through the API", &f.bake),
    ] {
        let _ = writeln!(
            s,
            "| {name} | {} ms | {:.0} | {} |",
            median(d).as_millis(),
            rate(d),
            runs(d)
        );
    }
    let _ = writeln!(
        s,
        "\nA pull is the worker's own figure (`image pulled … elapsed_ms`): from asking the \
         controller for peers to the verified file renamed into place (streamed to disk, \
         hashed, fsynced). MB/s is the ext4's {} bytes over that time (for the bake row, over \
         upload + bake). Peer and proxy share this host's disk and CPU, so the figures compare \
         the two paths, not network links.",
        f.bytes
    );
    s
}
