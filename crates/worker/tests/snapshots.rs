//! Bunker snapshots with real QEMU microVMs, through a local stand-in of the storage proxy:
//! a `full` snapshot restored into a new bunker keeps its processes running, a `disk`
//! snapshot keeps its files and boots cold, the snapshotted bunker itself keeps running,
//! and a snapshot whose bytes do not match its manifest is refused.
//!
//! Needs the guest artefacts of `images/build.sh`; one VM at a time ([`common::vm_slot`]).
//! Timings are printed (run with `--nocapture`), never asserted.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::put;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::{TOKEN, TestWorker, error_of, image_sha256, require_artefacts, vm_slot};
use futures_util::StreamExt;
use scaibunker_proto::worker::{
    BootSource, CreateVm, SnapshotKind, SnapshotManifest, SnapshotVm, VmInfo, VmStatus,
};
use tokio::io::AsyncWriteExt;

const TINY: [&str; 3] = ["vmlinux", "initramfs.cpio.gz", "tiny.ext4"];
const MEMORY_MB: u64 = 256;
/// The disk of the bunkers here (`TestWorker` creates with it too).
const DISK_MB: u64 = 1024;
/// Counts once a second into /root/counter, in its own session so no exec owns it; the file
/// is replaced whole (a read never sees it truncated).
const COUNTER: &str = "setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /root/counter.new; \
                       mv /root/counter.new /root/counter; sleep 1; done' </dev/null >/dev/null 2>&1 &";

/// The storage proxy's object routes over a directory: what the worker sees of a
/// controller, without one.
struct FakeProxy {
    addr: SocketAddr,
    dir: tempfile::TempDir,
    server: tokio::task::JoinHandle<()>,
}

async fn put_object(
    State(dir): State<PathBuf>,
    UrlPath(key): UrlPath<String>,
    headers: HeaderMap,
    body: Body,
) -> StatusCode {
    if !authorized(&headers) {
        return StatusCode::UNAUTHORIZED;
    }
    let path = dir.join(&key);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    let mut file = tokio::fs::File::create(&path).await.expect("create");
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        file.write_all(&chunk.expect("chunk")).await.expect("write");
    }
    file.flush().await.expect("flush");
    StatusCode::CREATED
}

async fn get_object(
    State(dir): State<PathBuf>,
    UrlPath(key): UrlPath<String>,
    headers: HeaderMap,
) -> Result<Body, StatusCode> {
    if !authorized(&headers) {
        return Err(StatusCode::UNAUTHORIZED);
    }
    let file = tokio::fs::File::open(dir.join(&key))
        .await
        .map_err(|_| StatusCode::NOT_FOUND)?;
    Ok(Body::from_stream(tokio_util::io::ReaderStream::new(file)))
}

fn authorized(headers: &HeaderMap) -> bool {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {TOKEN}"))
}

impl FakeProxy {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let app = axum::Router::new()
            .route(
                "/v1/modules/scaibunker/storage/objects/{*key}",
                put(put_object).get(get_object),
            )
            .with_state(dir.path().to_owned());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("serve");
        });
        Self { addr, dir, server }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn object(&self, key: &str) -> PathBuf {
        self.dir.path().join(key)
    }
}

impl Drop for FakeProxy {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn stdout_of(w: &TestWorker, id: &str, cmd: &str) -> String {
    let r = w.exec_sh(id, cmd).await;
    assert_eq!(r.exit_code, Some(0), "`{cmd}` failed: {r:?}");
    String::from_utf8(BASE64.decode(&r.stdout_b64).expect("b64"))
        .expect("utf8")
        .trim()
        .to_owned()
}

async fn counter(w: &TestWorker, id: &str) -> u64 {
    stdout_of(w, id, "cat /root/counter")
        .await
        .parse()
        .expect("a number")
}

async fn snapshot(
    w: &TestWorker,
    id: &str,
    snapshot_id: &str,
    kind: SnapshotKind,
) -> SnapshotManifest {
    let req = SnapshotVm {
        snapshot_id: snapshot_id.into(),
        kind,
        object_prefix: format!("snapshots/tnt_test/{snapshot_id}"),
    };
    let started = Instant::now();
    let resp = w
        .post(&format!("/bunkers/{id}/snapshot"))
        .json(&req)
        .send()
        .await
        .expect("snapshot request");
    let status = resp.status();
    let text = resp.text().await.expect("body");
    assert_eq!(status, 200, "snapshot failed: {text}");
    let manifest: SnapshotManifest = serde_json::from_str(&text).expect("manifest");
    println!(
        "{kind:?} snapshot of {id}: {:?}, {} bytes",
        started.elapsed(),
        manifest.size_bytes()
    );
    manifest
}

fn restore_request(id: &str, manifest: &SnapshotManifest, hostname: &str) -> CreateVm {
    CreateVm {
        bunker_id: id.into(),
        image_sha256: manifest.image_sha256.clone(),
        cpu_millicores: manifest.cpu_millicores,
        memory_mb: manifest.memory_mb,
        disk_mb: DISK_MB,
        hostname: hostname.into(),
        env_vars: Default::default(),
        snapshot: Some(manifest.clone()),
        image_pull: None,
        tenant_id: String::new(),
        network: Default::default(),
    }
}

async fn restore(w: &TestWorker, id: &str, manifest: &SnapshotManifest, hostname: &str) -> VmInfo {
    restore_with(w, restore_request(id, manifest, hostname)).await
}

async fn restore_with(w: &TestWorker, req: CreateVm) -> VmInfo {
    let (id, manifest) = (
        req.bunker_id.clone(),
        req.snapshot.clone().expect("a restore"),
    );
    let started = Instant::now();
    let resp = w
        .post("/bunkers")
        .json(&req)
        .send()
        .await
        .expect("create request");
    let status = resp.status();
    let text = resp.text().await.expect("body");
    assert_eq!(status, 200, "restore {id} failed: {text}");
    let info: VmInfo = serde_json::from_str(&text).expect("VmInfo");
    println!(
        "restore of a {:?} snapshot into {id}: {:?}",
        manifest.kind,
        started.elapsed()
    );
    assert_eq!(info.status, VmStatus::Running);
    assert_eq!(info.boot_source, BootSource::Snapshot);
    info
}

fn stored(proxy: &FakeProxy, manifest: &SnapshotManifest) {
    for f in &manifest.files {
        let len = std::fs::metadata(proxy.object(&f.key))
            .unwrap_or_else(|e| panic!("object {} is not stored: {e}", f.key))
            .len();
        assert_eq!(len, f.size_bytes, "{}", f.key);
    }
}

async fn start_worker(proxy: &FakeProxy, images: &Path) -> TestWorker {
    let url = proxy.url();
    TestWorker::start_with(images, move |c| c.storage_url = Some(url)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_snapshot_restores_running_processes_in_a_new_bunker() {
    let images = require_artefacts(&TINY);
    let tiny = image_sha256(&images, "tiny");
    let _vm = vm_slot().await;
    let proxy = FakeProxy::start().await;
    let w = start_worker(&proxy, &images).await;

    w.create_with_hostname("snap-src", &tiny, MEMORY_MB, "source-box")
        .await;
    stdout_of(&w, "snap-src", COUNTER).await;
    stdout_of(&w, "snap-src", "echo kept > /root/file && sync").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = counter(&w, "snap-src").await;
    assert!(before >= 1, "the counter runs: {before}");

    let full = snapshot(&w, "snap-src", "snp_full1", SnapshotKind::Full).await;
    assert_eq!(full.kind, SnapshotKind::Full);
    assert_eq!(full.memory_mb, MEMORY_MB);
    let names: Vec<&str> = full.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["disk.qcow2", "vm.state"]);
    stored(&proxy, &full);

    // The source keeps running, its counter too, in a new VM process.
    assert_eq!(w.info("snap-src").await.status, VmStatus::Running);
    let after = counter(&w, "snap-src").await;
    assert!(
        after >= before,
        "the source's counter went on: {before} → {after}"
    );
    // A second full snapshot stacks a second frozen layer: QEMU gets the three-layer chain
    // as descriptors and saves and restores over it.
    let second = snapshot(&w, "snap-src", "snp_full2", SnapshotKind::Full).await;
    assert_eq!(second.kind, SnapshotKind::Full);
    let again = counter(&w, "snap-src").await;
    assert!(
        again >= after,
        "the counter survives a second snapshot: {after} → {again}"
    );
    w.delete_bunker("snap-src").await;

    // Into a bigger disk than the snapshot's: the restored guest sees its disk grow (QMP
    // `block_resize` once running) and its filesystem fill it.
    restore_with(
        &w,
        CreateVm {
            disk_mb: DISK_MB + 512,
            ..restore_request("snap-dst", &full, "restored-box")
        },
    )
    .await;
    let df = stdout_of(&w, "snap-dst", "df -k / | tail -n 1").await;
    let total: u64 = df
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("df total");
    assert!((1_400_000..=1_572_864).contains(&total), "df: {df}");
    let resumed = counter(&w, "snap-dst").await;
    assert!(
        resumed >= before,
        "the restored counter starts where the snapshot was: {before} → {resumed}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = counter(&w, "snap-dst").await;
    assert!(
        later > resumed,
        "the restored counter keeps counting: {resumed} → {later}"
    );
    assert_eq!(stdout_of(&w, "snap-dst", "cat /root/file").await, "kept");
    assert_eq!(stdout_of(&w, "snap-dst", "hostname").await, "restored-box");
    assert!(
        !w.bunker_dir("snap-dst").join("snapshot/vm.state").exists(),
        "the state file is removed once loaded"
    );
    w.delete_bunker("snap-dst").await;
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_snapshot_keeps_files_and_boots_cold() {
    let images = require_artefacts(&TINY);
    let tiny = image_sha256(&images, "tiny");
    let _vm = vm_slot().await;
    let proxy = FakeProxy::start().await;
    let w = start_worker(&proxy, &images).await;

    w.create_with_hostname("disk-src", &tiny, MEMORY_MB, "source-box")
        .await;
    stdout_of(&w, "disk-src", COUNTER).await;
    // Not synced by the test: the snapshot must sync the guest itself.
    stdout_of(&w, "disk-src", "echo written > /root/file").await;
    let source_id = stdout_of(&w, "disk-src", "cat /etc/machine-id").await;
    assert_eq!(source_id.len(), 32, "{source_id}");
    let disk = snapshot(&w, "disk-src", "snp_disk1", SnapshotKind::Disk).await;
    let names: Vec<&str> = disk.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["disk.qcow2"]);
    stored(&proxy, &disk);
    // The source never stopped.
    assert_eq!(stdout_of(&w, "disk-src", "cat /root/file").await, "written");
    w.delete_bunker("disk-src").await;

    restore(&w, "disk-dst", &disk, "disk-box").await;
    assert_eq!(stdout_of(&w, "disk-dst", "cat /root/file").await, "written");
    assert_eq!(stdout_of(&w, "disk-dst", "hostname").await, "disk-box");
    // The saved disk carried the source's machine id; the restore has its own.
    let restored_id = stdout_of(&w, "disk-dst", "cat /etc/machine-id").await;
    assert_eq!(restored_id.len(), 32, "{restored_id}");
    assert_ne!(restored_id, source_id);
    // A cold boot: the counter's process is not there, only its last value on disk.
    let first = counter(&w, "disk-dst").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        counter(&w, "disk-dst").await,
        first,
        "no process counts after a cold boot"
    );
    w.delete_bunker("disk-dst").await;

    // Bytes that do not match the manifest are refused, and nothing is left.
    let mut tampered = disk.clone();
    tampered.files[0].sha256 = "00".repeat(32);
    let resp = w
        .post("/bunkers")
        .json(&restore_request("disk-bad", &tampered, "bad-box"))
        .send()
        .await
        .expect("create request");
    let (status, err) = error_of(resp).await;
    assert_eq!(
        (status, err.code.as_str()),
        (500, "BOOT_FAILED"),
        "{}",
        err.message
    );
    assert!(err.message.contains("sha256"), "{}", err.message);
    w.assert_nothing_left("disk-bad");
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_of_a_template_restored_bunker_needs_only_the_image() {
    let images = require_artefacts(&TINY);
    let tiny = image_sha256(&images, "tiny");
    let _vm = vm_slot().await;
    let proxy = FakeProxy::start().await;
    let url = proxy.url();
    let w = TestWorker::start_with(&images, move |c| {
        c.storage_url = Some(url);
        c.templates = scaibunker_worker::config::TemplateMode::On;
    })
    .await;

    // The first cold boot starts the template build; deleted at once, so the build's VM
    // runs alone.
    w.create_with_hostname("tpl-first", &tiny, MEMORY_MB, "first-box")
        .await;
    // (The build's processes mention the data directory: no `delete_bunker` check here.)
    let resp = w.delete("/bunkers/tpl-first").send().await.expect("delete");
    assert_eq!(resp.status(), 204);
    let give_up = Instant::now() + Duration::from_secs(240);
    loop {
        let ready = w.handle().templates().into_iter().any(|(_, s)| {
            matches!(
                s,
                scaibunker_worker::templates::TemplateStatus::Ready { .. }
            )
        });
        if ready {
            break;
        }
        assert!(Instant::now() < give_up, "no template within 240 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (info, _) = w
        .create_with_hostname("tpl-src", &tiny, MEMORY_MB, "templated-box")
        .await;
    assert_eq!(info.boot_source, BootSource::Template);
    stdout_of(&w, "tpl-src", COUNTER).await;
    stdout_of(&w, "tpl-src", "echo from-template > /root/file").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = counter(&w, "tpl-src").await;
    let full = snapshot(&w, "tpl-src", "snp_tpl1", SnapshotKind::Full).await;
    w.delete_bunker("tpl-src").await;
    w.shutdown().await;

    // Another worker, with no templates at all, restores it: the disk stands on the image.
    let other = start_worker(&proxy, &images).await;
    restore(&other, "tpl-dst", &full, "elsewhere-box").await;
    assert_eq!(
        stdout_of(&other, "tpl-dst", "cat /root/file").await,
        "from-template"
    );
    let resumed = counter(&other, "tpl-dst").await;
    assert!(resumed >= before, "{before} → {resumed}");
    assert_eq!(
        stdout_of(&other, "tpl-dst", "hostname").await,
        "elsewhere-box"
    );
    // The guest's whole filesystem is intact, template layer included.
    stdout_of(&other, "tpl-dst", "ls /bin/busybox /etc >/dev/null").await;
    other.delete_bunker("tpl-dst").await;
    other.shutdown().await;
}
