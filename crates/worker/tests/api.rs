//! The worker API without VMs: authentication, health, validation, start-up clean-up and
//! the controller link against a fake controller.

mod common;

use std::os::unix::process::ExitStatusExt as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use std::collections::HashMap;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use common::{TOKEN, TestWorker, error_of, eventually};
use scaibunker_proto::worker::{
    CreateVm, Heartbeat, HeartbeatResponse, ImagePull, PROTOCOL_VERSION, Peer, PeersResponse,
    RegisterRequest, RegisterResponse,
};
use sha2::{Digest as _, Sha256};

#[tokio::test]
async fn rejects_requests_without_the_worker_token() {
    let images = tempfile::tempdir().expect("tempdir");
    let w = TestWorker::start(images.path()).await;
    let no_auth = w.http.get(w.url("/bunkers")).send().await.expect("get");
    let (status, err) = error_of(no_auth).await;
    assert_eq!((status, err.code.as_str()), (401, "AUTH_TOKEN_INVALID"));
    let wrong = w
        .http
        .post(w.url("/bunkers/x/exec"))
        .bearer_auth("not-the-token")
        .send()
        .await
        .expect("post");
    assert_eq!(error_of(wrong).await.0, 401);
    let ok = w.get("/bunkers").send().await.expect("get");
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.text().await.expect("body"), "[]");

    // Health needs no token.
    let addr = w.base.trim_end_matches("/v1/worker").to_owned();
    for url in [format!("{addr}/health"), w.url("/health")] {
        let resp = w.http.get(&url).send().await.expect("health");
        assert_eq!(resp.status(), 200, "{url}");
        assert_eq!(
            resp.json::<serde_json::Value>().await.expect("json")["status"],
            "ok"
        );
    }
    w.shutdown().await;
}

#[tokio::test]
async fn validates_requests_and_unknown_bunkers() {
    let images = tempfile::tempdir().expect("tempdir");
    let w = TestWorker::start(images.path()).await;
    for id in ["../etc", "a b", "-x"] {
        let resp = w.create_raw(id, "tiny", 256).await;
        let (status, err) = error_of(resp).await;
        assert_eq!(
            (status, err.code.as_str()),
            (422, "VALIDATION_ERROR"),
            "{id}"
        );
    }
    let resp = w.create_raw("ok", "tiny", 1).await;
    assert_eq!(error_of(resp).await.1.code, "VALIDATION_ERROR");
    let resp = w.create_raw("ok", "tiny", 256).await;
    let (status, err) = error_of(resp).await;
    assert_eq!((status, err.code.as_str()), (404, "IMAGE_NOT_CACHED"));
    let resp = w
        .post("/bunkers")
        .header("content-type", "application/json")
        .body("{\"bunker_id\": 3}")
        .send()
        .await
        .expect("post");
    assert_eq!(error_of(resp).await.1.code, "VALIDATION_ERROR");
    for (method, path) in [
        ("GET", "/bunkers/nope"),
        ("DELETE", "/bunkers/nope"),
        ("POST", "/bunkers/nope/pause"),
        ("POST", "/bunkers/nope/resume"),
        ("GET", "/bunkers/nope/files?path=/x"),
        ("GET", "/bunkers/nope/files/list?path=/x"),
        ("DELETE", "/bunkers/nope/files?path=/x"),
    ] {
        let resp = w
            .http
            .request(method.parse().expect("method"), w.url(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("send");
        let (status, err) = error_of(resp).await;
        assert_eq!(
            (status, err.code.as_str()),
            (404, "BUNKER_NOT_FOUND"),
            "{method} {path}"
        );
    }
    let resp = w.get("/bunkers/nope/files").send().await.expect("get");
    assert_eq!(error_of(resp).await.1.code, "INVALID_PATH");

    // Both exec routes answer errors found before the command starts as plain errors.
    let exec = serde_json::json!({"program": {"shell": "true"}, "timeout_ms": 1000, "output_limit_bytes": 10});
    for path in ["/bunkers/nope/exec", "/bunkers/nope/exec/stream"] {
        let resp = w.post(path).json(&exec).send().await.expect("post");
        let (status, err) = error_of(resp).await;
        assert_eq!(
            (status, err.code.as_str()),
            (404, "BUNKER_NOT_FOUND"),
            "{path}"
        );
        let resp = w
            .post(path)
            .json(&serde_json::json!({"program": {"shell": "true"}}))
            .send()
            .await
            .expect("post");
        let (status, err) = error_of(resp).await;
        assert_eq!(
            (status, err.code.as_str()),
            (422, "VALIDATION_ERROR"),
            "{path}"
        );
        let resp = w
            .http
            .post(w.url(path))
            .json(&exec)
            .send()
            .await
            .expect("post");
        let (status, err) = error_of(resp).await;
        assert_eq!(
            (status, err.code.as_str()),
            (401, "AUTH_TOKEN_INVALID"),
            "{path}"
        );
    }
    let resp = w
        .put("/bunkers/nope/files?path=/x&mode=9")
        .send()
        .await
        .expect("put");
    assert_eq!(error_of(resp).await.1.code, "VALIDATION_ERROR");
    w.shutdown().await;
}

#[tokio::test]
async fn start_kills_leftover_vms_and_removes_their_directories() {
    // A stand-in for a QEMU left by a crashed worker: a program named like qemu whose
    // command line names the bunker directory.
    let data = tempfile::tempdir().expect("tempdir");
    let dir = data.path().join("bunkers/leftover");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let fake_qemu = data.path().join("qemu-system-fake");
    std::fs::copy("/usr/bin/tail", &fake_qemu).expect("copy tail");
    std::fs::write(dir.join("console.log"), b"").expect("console.log");
    let mut child = std::process::Command::new(&fake_qemu)
        .arg("-f")
        .arg(dir.join("console.log"))
        .spawn()
        .expect("spawn");
    std::fs::write(dir.join("qemu.pid"), child.id().to_string()).expect("pid file");
    // An unrelated process whose pid sits in a stale pid file must survive.
    let bystander = std::process::Command::new("/bin/sleep")
        .arg("1000")
        .spawn()
        .expect("spawn");
    let stale = data.path().join("bunkers/stale");
    std::fs::create_dir_all(&stale).expect("mkdir");
    std::fs::write(stale.join("qemu.pid"), bystander.id().to_string()).expect("pid file");
    let mut bystander = bystander;

    let images = tempfile::tempdir().expect("tempdir");
    let worker = scaibunker_worker::start(scaibunker_worker::WorkerConfig::standalone(
        TOKEN.into(),
        data.path().to_owned(),
        images.path().to_owned(),
    ))
    .await
    .expect("start");
    let status = child.wait().expect("wait");
    assert_eq!(
        status.signal(),
        Some(9),
        "the leftover was killed: {status}"
    );
    assert!(!dir.exists());
    assert!(!stale.exists());
    assert!(
        bystander.try_wait().expect("try_wait").is_none(),
        "bystander killed"
    );
    bystander.kill().expect("kill bystander");
    let _ = bystander.wait();
    worker.shutdown().await;
}

#[derive(Default)]
struct FakeController {
    registrations: Vec<(RegisterRequest, Option<String>)>,
    heartbeats: Vec<Heartbeat>,
    /// Registration attempts to refuse before accepting.
    refuse: usize,
    /// Heartbeats to answer `known: false`.
    forget: usize,
    /// Asked of every heartbeat until the worker reports the image cached or failed.
    pull_images: Vec<ImagePull>,
    /// The storage proxy's objects, by key.
    objects: HashMap<String, Vec<u8>>,
    /// Keys of the objects fetched.
    object_gets: Vec<String>,
    /// Answer of `GET /peers/{sha256}`, whatever the digest.
    peers: Vec<Peer>,
}

type Shared = Arc<Mutex<FakeController>>;

fn bearer(headers: &HeaderMap) -> Option<String> {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

async fn register(
    State(c): State<Shared>,
    headers: HeaderMap,
    Json(req): Json<RegisterRequest>,
) -> Result<Json<RegisterResponse>, StatusCode> {
    let mut c = c.lock().expect("lock");
    if c.refuse > 0 {
        c.refuse -= 1;
        return Err(StatusCode::SERVICE_UNAVAILABLE);
    }
    c.registrations.push((req, bearer(&headers)));
    let worker_id = format!("w-{}", c.registrations.len());
    Ok(Json(RegisterResponse {
        // The fake does not sign it; the worker only keeps and presents it.
        credential: format!("swc_1_fake_{worker_id}"),
        worker_id,
        heartbeat_interval_s: 1,
    }))
}

async fn heartbeat(
    State(c): State<Shared>,
    Json(beat): Json<Heartbeat>,
) -> Json<HeartbeatResponse> {
    let mut c = c.lock().expect("lock");
    // Like the controller: stop asking for what the worker reports cached or failed.
    let cached = beat.cached_images.clone().unwrap_or_default();
    let failed: Vec<String> = beat
        .image_failures
        .iter()
        .map(|f| f.sha256.clone())
        .collect();
    c.pull_images
        .retain(|p| !cached.contains(&p.sha256) && !failed.contains(&p.sha256));
    let pull_images = c.pull_images.clone();
    c.heartbeats.push(beat);
    let known = if c.forget > 0 {
        c.forget -= 1;
        false
    } else {
        true
    };
    Json(HeartbeatResponse {
        known,
        stop_bunkers: Vec::new(),
        pull_images,
        credential: None,
    })
}

/// Whether a request carries a credential the fake gave at registration (never the join
/// token: that only registers).
fn presents_a_credential(headers: &HeaderMap) -> bool {
    bearer(headers).is_some_and(|b| b.starts_with("Bearer swc_1_fake_w-"))
}

async fn peers(
    State(c): State<Shared>,
    headers: HeaderMap,
    Path(_sha256): Path<String>,
) -> Result<Json<PeersResponse>, StatusCode> {
    if !presents_a_credential(&headers) {
        return Err(StatusCode::UNAUTHORIZED);
    }
    let peers = c.lock().expect("lock").peers.clone();
    Ok(Json(PeersResponse { peers }))
}

async fn object(
    State(c): State<Shared>,
    headers: HeaderMap,
    Path(key): Path<String>,
) -> Result<Vec<u8>, StatusCode> {
    if !presents_a_credential(&headers) {
        return Err(StatusCode::UNAUTHORIZED);
    }
    let mut c = c.lock().expect("lock");
    c.object_gets.push(key.clone());
    c.objects.get(&key).cloned().ok_or(StatusCode::NOT_FOUND)
}

/// Serves `state` as a controller on a random port; its URL.
async fn fake_controller(state: &Shared) -> (String, tokio::task::JoinHandle<std::io::Result<()>>) {
    let app = axum::Router::new()
        .route("/v1/modules/scaibunker/workers/register", post(register))
        .route("/v1/modules/scaibunker/heartbeat", post(heartbeat))
        .route("/v1/modules/scaibunker/peers/{sha256}", get(peers))
        .route("/v1/modules/scaibunker/storage/objects/{*key}", get(object))
        .with_state(Arc::clone(state));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    (
        url,
        tokio::spawn(async move { axum::serve(listener, app).await }),
    )
}

#[tokio::test]
async fn registers_with_retries_heartbeats_and_reregisters_when_forgotten() {
    let state: Shared = Arc::new(Mutex::new(FakeController {
        refuse: 2,
        forget: 1,
        ..Default::default()
    }));
    let (controller_url, server) = fake_controller(&state).await;

    let images = tempfile::tempdir().expect("tempdir");
    let w = TestWorker::start_with(images.path(), |c| {
        c.controller_url = Some(controller_url);
        c.heartbeat_interval = Duration::from_millis(200);
        c.name = "test-worker".into();
    })
    .await;
    eventually(
        Duration::from_secs(30),
        "a second registration and heartbeats",
        || {
            let state = Arc::clone(&state);
            async move {
                let c = state.lock().expect("lock");
                (c.registrations.len() >= 2 && c.heartbeats.len() >= 2).then_some(())
            }
        },
    )
    .await
    .expect("registered twice");

    {
        let c = state.lock().expect("lock");
        let (req, auth) = &c.registrations[0];
        assert_eq!(auth.as_deref(), Some(format!("Bearer {TOKEN}").as_str()));
        // Registering again, the worker presents the credential the first answer gave it.
        assert_eq!(
            c.registrations[1].1.as_deref(),
            Some("Bearer swc_1_fake_w-1")
        );
        assert_eq!(req.protocol_version, PROTOCOL_VERSION);
        assert_eq!(req.name, "test-worker");
        assert_eq!(req.url, w.base.trim_end_matches("/v1/worker"));
        assert!(req.runtime.starts_with("qemu/"), "{}", req.runtime);
        assert!(req.capacity.cpu_millicores >= 1000);
        assert!(req.capacity.memory_mb > 0);
        assert!(req.capacity.disk_mb > 0);
        // The first heartbeat was for w-1, which the controller forgot; later ones are for w-2.
        assert_eq!(c.heartbeats[0].worker_id, "w-1");
        let last = c.heartbeats.last().expect("heartbeats");
        assert_eq!(last.worker_id, "w-2");
        assert_eq!(last.active_bunkers, 0);
        assert_eq!(last.capacity.cpu_millicores, req.capacity.cpu_millicores);
        assert_eq!(last.cached_images, Some(Vec::new()));
    }
    w.shutdown().await;
    server.abort();
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[tokio::test]
async fn serves_cached_images_to_peers() {
    let images = tempfile::tempdir().expect("tempdir");
    let tiny = b"a tiny prebuilt image".repeat(1000);
    std::fs::write(images.path().join("tiny.ext4"), &tiny).expect("write");
    let w = TestWorker::start(images.path()).await;
    let sha = sha256_hex(&tiny);
    let path = format!("/images/{sha}");

    let resp = w.http.get(w.url(&path)).send().await.expect("get");
    let (status, err) = error_of(resp).await;
    assert_eq!((status, err.code.as_str()), (401, "AUTH_TOKEN_INVALID"));

    let resp = w.get(&path).send().await.expect("get");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.content_length(), Some(tiny.len() as u64));
    assert_eq!(resp.bytes().await.expect("body").as_ref(), &tiny[..]);

    let resp = w
        .get(&format!("/images/{}", "0".repeat(64)))
        .send()
        .await
        .expect("get");
    let (status, err) = error_of(resp).await;
    assert_eq!((status, err.code.as_str()), (404, "IMAGE_NOT_CACHED"));
    // Only a digest names an image here: not a name, not upper case, not a path.
    for bad in ["tiny", &sha.to_uppercase(), "..%2Ftiny.ext4"] {
        let resp = w.get(&format!("/images/{bad}")).send().await.expect("get");
        let (status, err) = error_of(resp).await;
        assert_eq!(
            (status, err.code.as_str()),
            (422, "VALIDATION_ERROR"),
            "{bad}"
        );
    }
    w.shutdown().await;
}

#[tokio::test]
async fn pulls_what_heartbeats_ask_and_reports_failures_once() {
    let good = b"a pulled image".repeat(5000);
    let good_sha = sha256_hex(&good);
    let missing_sha = sha256_hex(b"nobody has this");
    let state: Shared = Arc::new(Mutex::new(FakeController {
        pull_images: vec![
            ImagePull {
                sha256: good_sha.clone(),
                size_bytes: good.len() as u64,
                object_key: Some("images/good.ext4".into()),
            },
            ImagePull {
                sha256: missing_sha.clone(),
                size_bytes: 15,
                object_key: Some("images/missing.ext4".into()),
            },
        ],
        objects: [("images/good.ext4".to_owned(), good.clone())].into(),
        ..Default::default()
    }));
    let (controller_url, server) = fake_controller(&state).await;
    // A stand-in kernel and the real initramfs (the worker checks the agent in it):
    // heartbeats list images only when something could boot them. No VM is started here.
    let built = common::require_artefacts(&["initramfs.cpio.gz"]);
    let images = tempfile::tempdir().expect("tempdir");
    std::fs::write(images.path().join("vmlinux"), b"stand-in").expect("write");
    std::fs::copy(
        built.join("initramfs.cpio.gz"),
        images.path().join("initramfs.cpio.gz"),
    )
    .expect("copy the initramfs");
    let tiny = b"prebuilt";
    std::fs::write(images.path().join("tiny.ext4"), tiny).expect("write");
    let w = TestWorker::start_with(images.path(), |c| {
        c.controller_url = Some(controller_url);
        c.heartbeat_interval = Duration::from_millis(200);
    })
    .await;

    eventually(
        Duration::from_secs(30),
        "the pull and the failure reported",
        || {
            let state = Arc::clone(&state);
            let good_sha = good_sha.clone();
            async move {
                let c = state.lock().expect("lock");
                let cached = c.heartbeats.iter().any(|b| {
                    b.cached_images
                        .as_ref()
                        .is_some_and(|i| i.contains(&good_sha))
                });
                let failed = c.heartbeats.iter().any(|b| !b.image_failures.is_empty());
                (cached && failed && c.heartbeats.len() >= 2).then_some(())
            }
        },
    )
    .await
    .expect("pulled and reported");
    // A few more heartbeats: nothing is fetched or reported again.
    tokio::time::sleep(Duration::from_millis(600)).await;
    {
        let c = state.lock().expect("lock");
        let failures: Vec<_> = c
            .heartbeats
            .iter()
            .flat_map(|b| &b.image_failures)
            .collect();
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert_eq!(failures[0].sha256, missing_sha);
        assert!(failures[0].reason.contains("404"), "{}", failures[0].reason);
        // Two pulls run at a time, so in either order.
        let mut gets = c.object_gets.clone();
        gets.sort();
        assert_eq!(
            gets,
            ["images/good.ext4", "images/missing.ext4"],
            "each fetched once"
        );
        // Registration names only prebuilt images; heartbeats list pulled ones by digest.
        let registered: Vec<&str> = c.registrations[0]
            .0
            .images
            .iter()
            .map(|i| i.name.as_str())
            .collect();
        assert_eq!(registered, ["tiny"]);
        let last = c.heartbeats.last().expect("heartbeats");
        let mut expected = vec![good_sha.clone(), sha256_hex(tiny)];
        expected.sort();
        assert_eq!(last.cached_images, Some(expected));
    }
    let pulled = w.data_dir.join(format!("images/{good_sha}.ext4"));
    assert_eq!(std::fs::read(&pulled).expect("pulled file"), good);
    assert_eq!(w.handle().pulls().counters().proxy_bytes, good.len() as u64);

    // Peers can fetch the pulled image from this worker.
    let resp = w
        .get(&format!("/images/{good_sha}"))
        .send()
        .await
        .expect("get");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.expect("body").as_ref(), &good[..]);
    let addr = w.base.trim_end_matches("/v1/worker").to_owned();
    let metrics = w
        .http
        .get(format!("{addr}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains(&format!(
            "scaibunker_worker_image_pull_bytes_total{{source=\"proxy\"}} {}",
            good.len()
        )),
        "{metrics}"
    );
    w.shutdown().await;
    server.abort();
}

#[tokio::test]
async fn a_create_pulls_a_missing_image_before_booting() {
    let lazy = b"a lazily pulled image".repeat(100);
    let lazy_sha = sha256_hex(&lazy);
    let state: Shared = Arc::new(Mutex::new(FakeController {
        objects: [("images/lazy.ext4".to_owned(), lazy.clone())].into(),
        ..Default::default()
    }));
    let (controller_url, server) = fake_controller(&state).await;
    // No guest kernel: the boot fails right after the pull, so no VM ever starts.
    let images = tempfile::tempdir().expect("tempdir");
    let w = TestWorker::start_with(images.path(), |c| {
        c.controller_url = Some(controller_url);
    })
    .await;
    let create = |id: &str, key: &str| CreateVm {
        bunker_id: id.into(),
        image_sha256: lazy_sha.clone(),
        cpu_millicores: 1000,
        memory_mb: 256,
        disk_mb: 1024,
        hostname: "lazy".into(),
        env_vars: Default::default(),
        snapshot: None,
        image_pull: Some(ImagePull {
            sha256: lazy_sha.clone(),
            size_bytes: lazy.len() as u64,
            object_key: Some(key.into()),
        }),
        tenant_id: String::new(),
        network: Default::default(),
    };

    let resp = w
        .post("/bunkers")
        .json(&create("b1", "images/gone.ext4"))
        .send()
        .await
        .expect("create");
    let (status, err) = error_of(resp).await;
    assert_eq!(
        (status, err.code.as_str()),
        (502, "IMAGE_PULL_FAILED"),
        "{}",
        err.message
    );

    let resp = w
        .post("/bunkers")
        .json(&create("b2", "images/lazy.ext4"))
        .send()
        .await
        .expect("create");
    let (status, err) = error_of(resp).await;
    assert_eq!((status, err.code.as_str()), (500, "BOOT_FAILED"));
    assert!(err.message.contains("no guest kernel"), "{}", err.message);
    let pulled = w.data_dir.join(format!("images/{lazy_sha}.ext4"));
    assert_eq!(
        std::fs::read(&pulled).expect("pulled before the boot"),
        lazy
    );

    // Held now: another create does not fetch it again.
    let resp = w
        .post("/bunkers")
        .json(&create("b3", "images/lazy.ext4"))
        .send()
        .await
        .expect("create");
    assert_eq!(error_of(resp).await.1.code, "BOOT_FAILED");
    assert_eq!(
        state.lock().expect("lock").object_gets,
        ["images/gone.ext4", "images/lazy.ext4"]
    );
    w.shutdown().await;
    server.abort();
}

#[tokio::test]
async fn a_worker_pulls_from_a_peer_worker_rather_than_the_proxy() {
    // Worker A holds a prebuilt image; worker B is asked to warm it, and the controller
    // names A as a peer. The proxy has the bytes too, but must not be asked.
    let image = b"an image both could serve".repeat(20_000);
    let sha = sha256_hex(&image);
    let a_images = tempfile::tempdir().expect("tempdir");
    std::fs::write(a_images.path().join("shared.ext4"), &image).expect("write");
    let a = TestWorker::start(a_images.path()).await;
    let a_url = a.base.trim_end_matches("/v1/worker").to_owned();

    let state: Shared = Arc::new(Mutex::new(FakeController {
        pull_images: vec![ImagePull {
            sha256: sha.clone(),
            size_bytes: image.len() as u64,
            object_key: Some("images/shared.ext4".into()),
        }],
        objects: [("images/shared.ext4".to_owned(), image.clone())].into(),
        peers: vec![Peer {
            worker_id: "wrk_a".into(),
            url: a_url,
            // The peer runs standalone here: its token opens its image route.
            token: common::TOKEN.into(),
        }],
        ..Default::default()
    }));
    let (controller_url, server) = fake_controller(&state).await;
    let b_images = tempfile::tempdir().expect("tempdir");
    let b = TestWorker::start_with(b_images.path(), |c| {
        c.controller_url = Some(controller_url);
        c.heartbeat_interval = Duration::from_millis(200);
    })
    .await;

    let pulls = Arc::clone(b.handle().pulls());
    let held = eventually(Duration::from_secs(30), "the pull from the peer", || {
        let pulls = Arc::clone(&pulls);
        let sha = sha.clone();
        async move { pulls.lookup(&sha) }
    })
    .await
    .expect("pulled");
    assert_eq!(std::fs::read(&held.path).expect("read"), image);
    let counters = pulls.counters();
    assert_eq!(
        (counters.peer_bytes, counters.proxy_bytes),
        (image.len() as u64, 0)
    );
    assert!(state.lock().expect("lock").object_gets.is_empty());
    b.shutdown().await;
    a.shutdown().await;
    server.abort();
}
