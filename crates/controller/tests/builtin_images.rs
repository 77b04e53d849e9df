//! Built-in images keyed by sha on a real controller (both SQL backends) with two stand-in
//! workers: each ships `default`, built from other inputs, so with another sha. Both shas stay
//! active, creates by name land on either worker (each booting its own sha), a snapshot taken
//! on one sha restores only where that sha is, and a sha no online worker holds any more is
//! retired while other workers are online (and comes back once one holds it again).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Json as AxJson, Path, State};
use axum::http::StatusCode as AxStatus;
use axum::routing::post;
use reqwest::StatusCode;
use scaibunker_controller::config::ControllerConfig;
use scaibunker_controller::{ControllerHandle, start};
use scaibunker_proto::worker::{
    BootSource, CachedImage, Capacity, CreateVm, PROTOCOL_VERSION, RegisterRequest, SnapshotFile,
    SnapshotManifest, SnapshotVm, VmInfo, VmStatus,
};
use serde_json::{Value, json};

#[macro_use]
mod common;

use common::{Db, TestDatabase};

const WORKER_TOKEN: &str = "swt_builtin_images";
const SHA_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const SHA_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
const CAPACITY: Capacity = Capacity {
    cpu_millicores: 64_000,
    memory_mb: 65_536,
    disk_mb: 1_000_000,
    gpu_count: 0,
};

/// One stand-in worker: answers creates, deletes and disk snapshots, and remembers the image
/// sha each of its bunkers was created with.
#[derive(Clone)]
struct FakeWorker {
    controller: String,
    http: reqwest::Client,
    credential: Arc<Mutex<String>>,
    /// Bunker id → the image sha its create asked for.
    creates: Arc<Mutex<HashMap<String, String>>>,
}

async fn create_vm(State(w): State<FakeWorker>, AxJson(req): AxJson<CreateVm>) -> AxJson<VmInfo> {
    w.creates
        .lock()
        .expect("lock")
        .insert(req.bunker_id.clone(), req.image_sha256.clone());
    AxJson(VmInfo {
        bunker_id: req.bunker_id,
        status: VmStatus::Running,
        guest_kernel: None,
        boot_ms: 1,
        boot_source: if req.snapshot.is_some() {
            BootSource::Snapshot
        } else {
            BootSource::Cold
        },
    })
}

async fn delete_vm(State(w): State<FakeWorker>, Path(id): Path<String>) -> AxStatus {
    w.creates.lock().expect("lock").remove(&id);
    AxStatus::NO_CONTENT
}

async fn snapshot_vm(
    State(w): State<FakeWorker>,
    Path(id): Path<String>,
    AxJson(req): AxJson<SnapshotVm>,
) -> AxJson<SnapshotManifest> {
    let image_sha = w.creates.lock().expect("lock")[&id].clone();
    let key = format!("{}/disk.qcow2", req.object_prefix);
    let credential = w.credential.lock().expect("lock").clone();
    let resp = w
        .http
        .put(format!(
            "{}/v1/modules/scaibunker/storage/objects/{key}",
            w.controller
        ))
        .bearer_auth(credential)
        .body(b"overlay".to_vec())
        .send()
        .await
        .expect("upload");
    assert!(resp.status().is_success(), "upload: {}", resp.status());
    AxJson(SnapshotManifest {
        kind: req.kind,
        image_sha256: image_sha,
        memory_mb: 512,
        cpu_millicores: 1000,
        vcpus: 1,
        cmdline_hostname: "bunker-x".into(),
        runtime: "qemu/tcg".into(),
        kernel_bytes: 1,
        initramfs_bytes: 1,
        files: vec![SnapshotFile {
            name: "disk.qcow2".into(),
            key,
            size_bytes: 7,
            sha256: "c".repeat(64),
        }],
    })
}

struct Worker {
    id: String,
    fake: FakeWorker,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Worker {
    fn credential(&self) -> String {
        self.fake.credential.lock().expect("lock").clone()
    }

    fn created(&self, bunker_id: &str) -> Option<String> {
        self.fake
            .creates
            .lock()
            .expect("lock")
            .get(bunker_id)
            .cloned()
    }
}

struct Api {
    handle: ControllerHandle,
    http: reqwest::Client,
    key: String,
    _dir: tempfile::TempDir,
    _database: TestDatabase,
}

impl Api {
    async fn start(db: Db, tune: impl FnOnce(&mut ControllerConfig)) -> Api {
        let dir = tempfile::tempdir().expect("tempdir");
        let listen: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let mut config =
            ControllerConfig::embedded(dir.path().to_path_buf(), listen, WORKER_TOKEN.into());
        tune(&mut config);
        let database = db.create().await;
        config.database_url = database.url.clone();
        let handle = start(config).await.expect("controller starts");
        let key = handle.bootstrap_key.clone().expect("bootstrap key");
        Api {
            handle,
            http: reqwest::Client::new(),
            key,
            _dir: dir,
            _database: database,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v1/modules/scaibunker{path}", self.handle.url())
    }

    async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        common::request(&self.http, method, self.url(path), Some(&self.key), body).await
    }

    /// Starts a stand-in worker named `name` and registers it holding `default` as `sha`.
    async fn worker(&self, name: &str, sha: &str) -> Worker {
        self.register(name, sha, WORKER_TOKEN).await
    }

    /// `w` restarted: a new stand-in registering under the same name with its credential.
    async fn restart(&self, w: Worker, name: &str, sha: &str) -> Worker {
        let credential = w.credential();
        drop(w);
        self.register(name, sha, &credential).await
    }

    async fn register(&self, name: &str, sha: &str, bearer: &str) -> Worker {
        let fake = FakeWorker {
            controller: self.handle.url(),
            http: reqwest::Client::new(),
            credential: Arc::new(Mutex::new(String::new())),
            creates: Arc::new(Mutex::new(HashMap::new())),
        };
        let app = axum::Router::new()
            .route("/v1/worker/bunkers", post(create_vm))
            .route("/v1/worker/bunkers/{id}", axum::routing::delete(delete_vm))
            .route("/v1/worker/bunkers/{id}/snapshot", post(snapshot_vm))
            .with_state(fake.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("serve");
        });
        let register = RegisterRequest {
            protocol_version: PROTOCOL_VERSION,
            name: name.into(),
            url,
            capacity: CAPACITY,
            images: vec![CachedImage {
                name: "default".into(),
                sha256: sha.into(),
                size_bytes: 1 << 30,
            }],
            runtime: "qemu/tcg".into(),
        };
        let (st, v) = common::request(
            &self.http,
            "POST",
            self.url("/workers/register"),
            Some(bearer),
            Some(serde_json::to_value(register).expect("json")),
        )
        .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        *fake.credential.lock().expect("lock") =
            v["credential"].as_str().expect("credential").into();
        Worker {
            id: v["worker_id"].as_str().expect("worker id").into(),
            fake,
            server,
        }
    }

    /// A heartbeat from `w` reporting `cached` as its cache.
    async fn heartbeat(&self, w: &Worker, cached: &[&str]) {
        let (st, v) = common::request(
            &self.http,
            "POST",
            self.url("/heartbeat"),
            Some(&w.credential()),
            Some(json!({
                "worker_id": w.id, "capacity": CAPACITY, "active_bunkers": 0, "bunkers": [],
                "cached_images": cached,
            })),
        )
        .await;
        assert_eq!(st, StatusCode::OK, "{v}");
    }

    /// `GET /images` as a platform admin sees it.
    async fn images(&self) -> Vec<Value> {
        let (st, v) = self.admin("GET", "/images", None).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        v["data"].as_array().expect("list").clone()
    }

    /// The `default` images as `GET /images` lists them: sha → status.
    async fn default_shas(&self) -> HashMap<String, String> {
        self.images()
            .await
            .iter()
            .filter(|i| i["name"] == "default")
            .map(|i| {
                (
                    i["sha256"].as_str().expect("sha").to_owned(),
                    i["status"].as_str().expect("status").to_owned(),
                )
            })
            .collect()
    }

    /// The id of the image record of `sha`.
    async fn image_id_of(&self, sha: &str) -> String {
        let images = self.images().await;
        images
            .iter()
            .find(|i| i["sha256"] == sha)
            .map(|i| i["id"].as_str().expect("id").to_owned())
            .unwrap_or_else(|| panic!("sha {sha} not listed: {images:?}"))
    }

    /// Heartbeats from `a` and `b` (reporting `a_cached` and `b_cached`) every 100 ms until
    /// `GET /images` shows the `default` shas as `want`; fails after 20 s.
    async fn beat_until(
        &self,
        (a, a_cached): (&Worker, &[&str]),
        (b, b_cached): (&Worker, &[&str]),
        want: &[(&str, &str)],
    ) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            self.heartbeat(a, a_cached).await;
            self.heartbeat(b, b_cached).await;
            let now = self.default_shas().await;
            if now == shas(want) {
                return;
            }
            assert!(Instant::now() < deadline, "want {want:?}, have {now:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Creates a bunker from `body`; returns its id and image id.
    async fn create(&self, body: Value) -> (String, String) {
        let (st, v) = self.admin("POST", "/bunkers", Some(body)).await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        assert_eq!(v["data"]["status"], "running", "{v}");
        (
            v["data"]["id"].as_str().expect("id").to_owned(),
            v["data"]["image_id"].as_str().expect("image id").to_owned(),
        )
    }
}

fn shas(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(sha, status)| (sha.to_string(), status.to_string()))
        .collect()
}

async fn two_shas_of_one_name_are_both_active_and_used(db: Db) {
    let api = Api::start(db, |_| {}).await;
    let a = api.worker("worker-a", SHA_A).await;
    let b = api.worker("worker-b", SHA_B).await;
    // Registering worker-b's sha deactivates nothing; worker-a registering again neither.
    assert_eq!(
        api.default_shas().await,
        shas(&[(SHA_A, "ready"), (SHA_B, "ready")])
    );
    let a = api.restart(a, "worker-a", SHA_A).await;
    assert_eq!(
        api.default_shas().await,
        shas(&[(SHA_A, "ready"), (SHA_B, "ready")])
    );

    // Creates by name spread over both workers (most free memory first), each booting the
    // sha it holds, and each bunker records the image row of that sha.
    let mut on_a = Vec::new();
    let mut on_b = Vec::new();
    for _ in 0..4 {
        let (id, image_id) = api.create(json!({"image": "default"})).await;
        let (st, img) = api.admin("GET", &format!("/images/{image_id}"), None).await;
        assert_eq!(st, StatusCode::OK, "{img}");
        match (a.created(&id), b.created(&id)) {
            (Some(sha), None) => {
                assert_eq!(sha, SHA_A, "worker-a boots its own sha");
                assert_eq!(img["data"]["sha256"], SHA_A, "{img}");
                on_a.push(id);
            }
            (None, Some(sha)) => {
                assert_eq!(sha, SHA_B, "worker-b boots its own sha");
                assert_eq!(img["data"]["sha256"], SHA_B, "{img}");
                on_b.push(id);
            }
            other => panic!("bunker {id} created on {other:?}"),
        }
    }
    assert_eq!(
        (on_a.len(), on_b.len()),
        (2, 2),
        "creates of `default` use both workers"
    );

    // A snapshot taken on sha A restores on worker-a only, even with worker-b far emptier.
    let (st, v) = api
        .admin(
            "POST",
            &format!("/bunkers/{}/snapshot", on_a[0]),
            Some(json!({"kind": "disk"})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let snap_id = v["data"]["id"].as_str().expect("id").to_owned();
    for id in &on_b {
        let (st, v) = api.admin("DELETE", &format!("/bunkers/{id}"), None).await;
        assert!(st.is_success(), "{v}");
    }
    for _ in 0..2 {
        let (id, _) = api.create(json!({"snapshot_id": snap_id})).await;
        assert_eq!(
            a.created(&id).as_deref(),
            Some(SHA_A),
            "restored on worker-a"
        );
        assert_eq!(b.created(&id), None);
    }
    // Named by id, an image is that one sha: worker-b's row boots on worker-b only.
    let id_b = api.image_id_of(SHA_B).await;
    let (id, _) = api.create(json!({"image": id_b})).await;
    assert_eq!(b.created(&id).as_deref(), Some(SHA_B));
}

async fn a_sha_no_online_worker_holds_is_retired_and_comes_back(db: Db) {
    let api = Api::start(db, |c| {
        c.job_interval = Duration::from_millis(100);
        c.heartbeat_interval = Duration::from_millis(200);
    })
    .await;
    let a = api.worker("worker-a", SHA_A).await;
    let b = api.worker("worker-b", SHA_B).await;
    // With the whole fleet silent (ten intervals, past the six that retire a sha) nothing is
    // retired: silence says nothing about which images exist.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        api.default_shas().await,
        shas(&[(SHA_A, "ready"), (SHA_B, "ready")])
    );
    // worker-a drops its `default` (its operator rebuilt or removed it); worker-b keeps its.
    api.beat_until(
        (&a, &[]),
        (&b, &[SHA_B]),
        &[(SHA_A, "inactive"), (SHA_B, "ready")],
    )
    .await;
    // While retired, creates by name use sha B only.
    let (id, _) = api.create(json!({"image": "default"})).await;
    assert_eq!(b.created(&id).as_deref(), Some(SHA_B));

    // worker-a holds sha A again (say, pulled it back): it is ready again.
    api.beat_until(
        (&a, &[SHA_A]),
        (&b, &[SHA_B]),
        &[(SHA_A, "ready"), (SHA_B, "ready")],
    )
    .await;

    // A sha an admin deactivated stays inactive while workers hold it.
    let id_b = api.image_id_of(SHA_B).await;
    let (st, v) = api
        .admin("POST", &format!("/images/{id_b}/deactivate"), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    for _ in 0..10 {
        api.heartbeat(&a, &[SHA_A]).await;
        api.heartbeat(&b, &[SHA_B]).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        api.default_shas().await,
        shas(&[(SHA_A, "ready"), (SHA_B, "inactive")])
    );
}

both!(
    two_shas_of_one_name_are_both_active_and_used,
    a_sha_no_online_worker_holds_is_retired_and_comes_back,
);
