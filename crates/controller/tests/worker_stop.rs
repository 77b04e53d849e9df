//! A worker's planned stop on a real controller (both SQL backends) with a stand-in worker
//! that uploads its "snapshots" through the real storage proxy: `session` and `persistent`
//! bunkers are passivated (and come back on their next request once the worker is back),
//! `ephemeral` ones end, a failed save fails its bunker, and nobody else can stop a worker.
//! The real thing, through `scaibunker up` and a real VM, is in the end-to-end suite.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

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

const WORKER_TOKEN: &str = "swt_test_worker_token";
const IMAGE_SHA: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

#[derive(Clone, Default)]
struct FakeWorker {
    controller: String,
    http: reqwest::Client,
    credential: Arc<Mutex<String>>,
    /// Bunkers whose capture fails.
    failing: Arc<Mutex<HashSet<String>>>,
    /// What it was asked: `create <id> [snapshot]`, `snapshot <id>`, `resume <id>`, ...
    seen: Arc<Mutex<Vec<String>>>,
}

impl FakeWorker {
    fn saw(&self, what: String) {
        self.seen.lock().expect("lock").push(what);
    }
}

fn info(id: String, status: VmStatus, source: BootSource) -> AxJson<VmInfo> {
    AxJson(VmInfo {
        bunker_id: id,
        status,
        guest_kernel: None,
        boot_ms: 1,
        boot_source: source,
    })
}

async fn create_vm(State(w): State<FakeWorker>, AxJson(req): AxJson<CreateVm>) -> AxJson<VmInfo> {
    let source = if req.snapshot.is_some() {
        BootSource::Snapshot
    } else {
        BootSource::Cold
    };
    w.saw(format!("create {} {source:?}", req.bunker_id));
    info(req.bunker_id, VmStatus::Running, source)
}

async fn delete_vm(State(w): State<FakeWorker>, Path(id): Path<String>) -> AxStatus {
    w.saw(format!("delete {id}"));
    AxStatus::NO_CONTENT
}

async fn pause_vm(State(w): State<FakeWorker>, Path(id): Path<String>) -> AxJson<VmInfo> {
    w.saw(format!("pause {id}"));
    info(id, VmStatus::Paused, BootSource::Cold)
}

async fn resume_vm(State(w): State<FakeWorker>, Path(id): Path<String>) -> AxJson<VmInfo> {
    w.saw(format!("resume {id}"));
    info(id, VmStatus::Running, BootSource::Cold)
}

async fn snapshot_vm(
    State(w): State<FakeWorker>,
    Path(id): Path<String>,
    AxJson(req): AxJson<SnapshotVm>,
) -> Result<AxJson<SnapshotManifest>, (AxStatus, AxJson<Value>)> {
    w.saw(format!("snapshot {id} {:?}", req.kind));
    if w.failing.lock().expect("lock").contains(&id) {
        return Err((
            AxStatus::INTERNAL_SERVER_ERROR,
            AxJson(json!({"code": "SNAPSHOT_FAILED", "message": "the state save failed"})),
        ));
    }
    let credential = w.credential.lock().expect("lock").clone();
    let mut files = Vec::new();
    for name in ["disk.qcow2", "vm.state"] {
        let key = format!("{}/{name}", req.object_prefix);
        let resp = w
            .http
            .put(format!(
                "{}/v1/modules/scaibunker/storage/objects/{key}",
                w.controller
            ))
            .bearer_auth(&credential)
            .body(name.as_bytes().to_vec())
            .send()
            .await
            .expect("upload");
        assert!(
            resp.status().is_success(),
            "upload {key}: {}",
            resp.status()
        );
        files.push(SnapshotFile {
            name: name.into(),
            key,
            size_bytes: name.len() as u64,
            sha256: "b".repeat(64),
        });
    }
    Ok(AxJson(SnapshotManifest {
        kind: req.kind,
        image_sha256: IMAGE_SHA.into(),
        memory_mb: 512,
        cpu_millicores: 1000,
        vcpus: 1,
        cmdline_hostname: "bunker-x".into(),
        runtime: "qemu/tcg".into(),
        kernel_bytes: 1,
        initramfs_bytes: 1,
        files,
    }))
}

struct Api {
    handle: ControllerHandle,
    http: reqwest::Client,
    key: String,
    worker: FakeWorker,
    worker_url: String,
    server: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
    _database: TestDatabase,
}

impl Drop for Api {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Api {
    /// A controller and a registered stand-in worker holding image `default`.
    async fn start(db: Db) -> (Api, String) {
        let dir = tempfile::tempdir().expect("tempdir");
        let listen: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let mut config =
            ControllerConfig::embedded(dir.path().to_path_buf(), listen, WORKER_TOKEN.into());
        let database = db.create().await;
        config.database_url = database.url.clone();
        let handle = start(config).await.expect("controller starts");
        let key = handle.bootstrap_key.clone().expect("bootstrap key");
        let worker = FakeWorker {
            controller: handle.url(),
            ..FakeWorker::default()
        };
        let app = axum::Router::new()
            .route("/v1/worker/bunkers", post(create_vm))
            .route("/v1/worker/bunkers/{id}", axum::routing::delete(delete_vm))
            .route("/v1/worker/bunkers/{id}/pause", post(pause_vm))
            .route("/v1/worker/bunkers/{id}/resume", post(resume_vm))
            .route("/v1/worker/bunkers/{id}/snapshot", post(snapshot_vm))
            .with_state(worker.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let worker_url = format!("http://{}", listener.local_addr().expect("addr"));
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("serve");
        });
        let api = Api {
            handle,
            http: reqwest::Client::new(),
            key,
            worker,
            worker_url,
            server,
            _dir: dir,
            _database: database,
        };
        let (worker_id, credential) = api.register("fake", WORKER_TOKEN).await;
        *api.worker.credential.lock().expect("lock") = credential;
        // A profile on the admin (the only user), so its quota counts its bunkers.
        let user: String = sqlx::query_scalar("SELECT id FROM users")
            .fetch_one(api.handle.services.store.pool())
            .await
            .expect("the bootstrap admin");
        let (st, v) = api
            .admin(
                "POST",
                "/quota-profiles",
                Some(json!({"name": "cap", "max_concurrent_bunkers": 10})),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        let profile = v["data"]["id"].as_str().expect("profile id").to_owned();
        let (st, v) = api
            .admin(
                "POST",
                &format!("/quota-profiles/{profile}/assignments"),
                Some(json!({"target_kind": "user", "target_id": user, "mode": "individual"})),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        (api, worker_id)
    }

    /// Registers a worker `name` at the stand-in's URL; its id and credential.
    async fn register(&self, name: &str, bearer: &str) -> (String, String) {
        let register = RegisterRequest {
            protocol_version: PROTOCOL_VERSION,
            name: name.into(),
            url: self.worker_url.clone(),
            capacity: Capacity {
                cpu_millicores: 8000,
                memory_mb: 8192,
                disk_mb: 100_000,
                gpu_count: 0,
            },
            images: vec![CachedImage {
                name: "default".into(),
                sha256: IMAGE_SHA.into(),
                size_bytes: 1 << 30,
            }],
            runtime: "qemu/tcg".into(),
        };
        let (st, v) = self
            .call(
                "POST",
                "/workers/register",
                Some(bearer),
                Some(serde_json::to_value(register).expect("json")),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        let id = v["worker_id"].as_str().expect("worker id").to_owned();
        (id, v["credential"].as_str().expect("credential").to_owned())
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        common::request(
            &self.http,
            method,
            format!("{}/v1/modules/scaibunker{path}", self.handle.url()),
            key,
            body,
        )
        .await
    }

    async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let key = self.key.clone();
        self.call(method, path, Some(&key), body).await
    }

    async fn bunker(&self, mode: &str) -> String {
        let (st, v) = self
            .admin(
                "POST",
                "/bunkers",
                Some(json!({"image": "default", "lifecycle_mode": mode})),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        assert_eq!(v["data"]["status"], "running", "{v}");
        v["data"]["id"].as_str().expect("id").to_owned()
    }

    async fn get(&self, id: &str) -> Value {
        let (st, v) = self.admin("GET", &format!("/bunkers/{id}"), None).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        v["data"].clone()
    }

    /// The memory the admin's quota counts its bunkers holding, in MiB.
    async fn memory_held(&self) -> i64 {
        let (st, v) = self.admin("GET", "/quota-profiles/usage", None).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        v["data"]
            .as_array()
            .expect("rows")
            .iter()
            .find(|r| r["resource"] == "memory_mb")
            .and_then(|r| r["current"].as_i64())
            .unwrap_or_else(|| panic!("no memory_mb row: {v}"))
    }

    fn seen(&self) -> Vec<String> {
        self.worker.seen.lock().expect("lock").clone()
    }
}

fn sorted(v: &Value) -> Vec<String> {
    let mut ids: Vec<String> = v
        .as_array()
        .expect("a list")
        .iter()
        .map(|i| i.as_str().expect("an id").to_owned())
        .collect();
    ids.sort();
    ids
}

async fn a_stopping_worker_passivates_its_session_and_persistent_bunkers(db: Db) {
    let (api, worker_id) = Api::start(db).await;
    let persistent = api.bunker("persistent").await;
    let session = api.bunker("session").await;
    let (st, v) = api
        .admin("POST", &format!("/bunkers/{session}/pause"), None)
        .await;
    assert_eq!(
        (st, &v["data"]["status"]),
        (StatusCode::OK, &json!("paused")),
        "{v}"
    );
    let ephemeral = api.bunker("ephemeral").await;
    let unlucky = api.bunker("persistent").await;
    api.worker
        .failing
        .lock()
        .expect("lock")
        .insert(unlucky.clone());

    assert_eq!(api.memory_held().await, 4 * 512);

    let credential = api.worker.credential.lock().expect("lock").clone();
    let (st, v) = api
        .call(
            "POST",
            &format!("/workers/{worker_id}/stopping"),
            Some(&credential),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let mut saved = vec![persistent.clone(), session.clone()];
    saved.sort();
    assert_eq!(sorted(&v["passivated"]), saved, "{v}");
    assert_eq!(sorted(&v["terminated"]), vec![ephemeral.clone()], "{v}");
    assert_eq!(sorted(&v["failed"]), vec![unlucky.clone()], "{v}");

    // Saved: paused with no worker, holding their quota, their snapshot kept for them.
    let seen = api.seen();
    assert!(
        seen.contains(&format!("resume {session}")),
        "resumed to be captured: {seen:?}"
    );
    for id in [&persistent, &session] {
        let b = api.get(id).await;
        assert_eq!(b["status"], "paused", "{b}");
        assert_eq!(b["worker_id"], Value::Null, "{b}");
        assert!(seen.contains(&format!("snapshot {id} Full")), "{seen:?}");
        assert!(
            seen.contains(&format!("delete {id}")),
            "its VM stopped: {seen:?}"
        );
        let (_, v) = api
            .admin("GET", &format!("/snapshots?bunker_id={id}"), None)
            .await;
        let snap = v["data"][0]["id"]
            .as_str()
            .expect("its snapshot")
            .to_owned();
        let (st, v) = api
            .admin("DELETE", &format!("/snapshots/{snap}"), None)
            .await;
        assert_eq!(
            (st, v["error"]["code"].as_str()),
            (StatusCode::CONFLICT, Some("SNAPSHOT_IN_USE")),
            "{v}"
        );
    }
    // Ended, quota released; the failed save failed its bunker as a crash would.
    let b = api.get(&ephemeral).await;
    assert_eq!(b["status"], "terminated", "{b}");
    let b = api.get(&unlucky).await;
    assert_eq!(b["status"], "failed", "{b}");
    assert!(
        b["failure_reason"]
            .as_str()
            .is_some_and(|r| r.contains("its worker stopped")),
        "{b}"
    );
    for id in [&ephemeral, &unlucky] {
        assert!(
            seen.contains(&format!("delete {id}")),
            "its VM stopped: {seen:?}"
        );
    }
    assert_eq!(
        api.memory_held().await,
        2 * 512,
        "the passivated two hold their quota, the other two released theirs"
    );

    // Stopping, the worker takes nothing new, heartbeats or not.
    let (_, v) = api
        .admin("GET", &format!("/workers/{worker_id}"), None)
        .await;
    assert_eq!(v["data"]["status"], "stopping", "{v}");
    let (st, v) = api
        .admin("POST", "/bunkers", Some(json!({"image": "default"})))
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("WORKER_UNAVAILABLE")),
        "{v}"
    );

    // Back (registered again), the next request restores each from its snapshot.
    api.register("fake", &credential).await;
    let (_, v) = api
        .admin("GET", &format!("/workers/{worker_id}"), None)
        .await;
    assert_eq!(v["data"]["status"], "online", "{v}");
    for id in [&persistent, &session] {
        let (st, v) = api
            .admin("POST", &format!("/bunkers/{id}/resume"), None)
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        assert_eq!(v["data"]["status"], "running", "{v}");
        assert!(
            api.seen().contains(&format!("create {id} Snapshot")),
            "restored from its snapshot: {:?}",
            api.seen()
        );
    }
}

async fn only_the_worker_itself_can_say_it_is_stopping(db: Db) {
    let (api, worker_id) = Api::start(db).await;
    let persistent = api.bunker("persistent").await;
    let (_, other) = api.register("other", WORKER_TOKEN).await;
    for bearer in [other.as_str(), WORKER_TOKEN, api.key.as_str()] {
        let (st, v) = api
            .call(
                "POST",
                &format!("/workers/{worker_id}/stopping"),
                Some(bearer),
                None,
            )
            .await;
        assert!(
            st == StatusCode::FORBIDDEN || st == StatusCode::UNAUTHORIZED,
            "{st} {v}"
        );
    }
    // Nothing changed.
    let b = api.get(&persistent).await;
    assert_eq!(b["status"], "running", "{b}");
    let (_, v) = api
        .admin("GET", &format!("/workers/{worker_id}"), None)
        .await;
    assert_eq!(v["data"]["status"], "online", "{v}");
    assert!(
        !api.seen().iter().any(|s| s.starts_with("snapshot")),
        "{:?}",
        api.seen()
    );
}

both!(
    a_stopping_worker_passivates_its_session_and_persistent_bunkers,
    only_the_worker_itself_can_say_it_is_stopping,
);
