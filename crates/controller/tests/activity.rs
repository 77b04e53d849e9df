//! Live work counts as activity: a bunker whose idle timeout is far shorter than an exec or a
//! shell session is neither ended nor passivated while that exec runs or that shell is open,
//! and is once they are over. Two controllers share one database (and, on MariaDB, one
//! Redis): the one serving the request never runs a job, the other sweeps every 100 ms, so
//! the protection works across controllers. The worker is a stand-in answered in-process
//! whose exec and shell last `HOLD`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::extract::{Json as AxJson, Path, State};
use axum::http::StatusCode as AxStatus;
use axum::response::Response;
use axum::routing::{get, post};
use futures_util::StreamExt;
use reqwest::StatusCode;
use scaibunker_controller::config::ControllerConfig;
use scaibunker_controller::{ControllerHandle, start};
use scaibunker_proto::worker::{
    BootSource, Capacity, CreateVm, ExecStreamEvent, SnapshotFile, SnapshotManifest, SnapshotVm,
    VmInfo, VmStatus,
};
use serde_json::{Value, json};

#[macro_use]
mod common;

use common::{Db, TestDatabase};

const WORKER_TOKEN: &str = "swt_activity_worker_token";
const IMAGE_SHA: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
/// How long the stand-in worker's execs run and how long the test keeps a shell open: four
/// idle timeouts of the bunkers under test.
const HOLD: Duration = Duration::from_secs(4);

/// What the stand-in worker was asked to do.
#[derive(Default)]
struct Seen {
    deletes: Vec<String>,
    snapshots: Vec<String>,
}

type Shared = Arc<Mutex<Seen>>;

async fn create_vm(AxJson(req): AxJson<CreateVm>) -> AxJson<VmInfo> {
    AxJson(VmInfo {
        bunker_id: req.bunker_id,
        status: VmStatus::Running,
        guest_kernel: None,
        boot_ms: 1,
        boot_source: BootSource::Cold,
    })
}

async fn delete_vm(State(seen): State<Shared>, Path(id): Path<String>) -> AxStatus {
    seen.lock().expect("lock").deletes.push(id);
    AxStatus::NO_CONTENT
}

/// A command that prints nothing for `HOLD`, then exits 0.
async fn exec_stream(Path(_id): Path<String>) -> Response {
    let exit = ExecStreamEvent::Exit {
        exit_code: Some(0),
        signal: None,
        timed_out: false,
        guest_duration_ms: HOLD.as_millis() as u64,
        stdout_total_bytes: 0,
        stderr_total_bytes: 0,
    };
    let line = serde_json::to_string(&exit).expect("json") + "\n";
    let body = futures_util::stream::once(async move {
        tokio::time::sleep(HOLD).await;
        Ok::<_, std::convert::Infallible>(Bytes::from(line))
    });
    Response::new(Body::from_stream(body))
}

/// A shell that stays open until the controller closes it.
async fn shell(ws: WebSocketUpgrade) -> Response {
    ws.on_upgrade(|mut socket| async move {
        while let Some(Ok(msg)) = socket.recv().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    })
}

/// A passivation's capture (no bytes uploaded: this test never restores).
async fn snapshot_vm(
    State(seen): State<Shared>,
    Path(id): Path<String>,
    AxJson(req): AxJson<SnapshotVm>,
) -> AxJson<SnapshotManifest> {
    seen.lock().expect("lock").snapshots.push(id);
    AxJson(SnapshotManifest {
        kind: req.kind,
        image_sha256: IMAGE_SHA.into(),
        memory_mb: 512,
        cpu_millicores: 1000,
        vcpus: 1,
        cmdline_hostname: "bunker-x".into(),
        runtime: "qemu/tcg".into(),
        kernel_bytes: 1,
        initramfs_bytes: 1,
        files: vec![SnapshotFile {
            name: "disk.qcow2".into(),
            key: format!("{}/disk.qcow2", req.object_prefix),
            size_bytes: 1,
            sha256: "b".repeat(64),
        }],
    })
}

struct Api {
    /// Serves every request; its jobs never tick during a test.
    front: ControllerHandle,
    /// Runs the jobs every 100 ms; serves nothing the test asks.
    _sweeper: ControllerHandle,
    http: reqwest::Client,
    key: String,
    seen: Shared,
    worker: tokio::task::JoinHandle<()>,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
    _database: TestDatabase,
}

impl Drop for Api {
    fn drop(&mut self) {
        self.worker.abort();
    }
}

fn config(
    db: Db,
    database: &TestDatabase,
    dir: &std::path::Path,
    prefix: &str,
) -> ControllerConfig {
    let listen: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let mut c = ControllerConfig::embedded(dir.to_path_buf(), listen, WORKER_TOKEN.into());
    c.database_url = database.url.clone();
    if let Db::MariaDb = db {
        c.redis_url = Some(common::redis_url());
        c.redis_prefix = prefix.to_owned();
    }
    c
}

impl Api {
    async fn start(db: Db) -> Api {
        let database = db.create().await;
        let prefix = common::unique_redis_prefix();
        let (front_dir, sweeper_dir) = (
            tempfile::tempdir().expect("tempdir"),
            tempfile::tempdir().expect("tempdir"),
        );
        let mut front = config(db, &database, front_dir.path(), &prefix);
        front.job_interval = Duration::from_secs(3600);
        // Busy marks last 3 s, renewed every second: shorter than the work, so the test sees
        // them renewed, and the bunker idles soon after; long enough that a loaded host's late
        // renewal does not lapse a mark.
        front.activity_interval = Duration::from_secs(1);
        let front = start(front).await.expect("front controller starts");
        let mut sweeper = config(db, &database, sweeper_dir.path(), &prefix);
        sweeper.job_interval = Duration::from_millis(100);
        let sweeper = start(sweeper).await.expect("sweeping controller starts");
        let key = front.bootstrap_key.clone().expect("bootstrap key");

        let seen = Shared::default();
        let app = axum::Router::new()
            .route("/v1/worker/bunkers", post(create_vm))
            .route("/v1/worker/bunkers/{id}", axum::routing::delete(delete_vm))
            .route("/v1/worker/bunkers/{id}/exec/stream", post(exec_stream))
            .route("/v1/worker/bunkers/{id}/shell", get(shell))
            .route("/v1/worker/bunkers/{id}/snapshot", post(snapshot_vm))
            .with_state(Arc::clone(&seen));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let worker_url = format!("http://{}", listener.local_addr().expect("addr"));
        let worker = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("serve");
        });
        let api = Api {
            front,
            _sweeper: sweeper,
            http: reqwest::Client::new(),
            key,
            seen,
            worker,
            _dirs: (front_dir, sweeper_dir),
            _database: database,
        };
        let register = common::fake_registration(
            worker_url,
            IMAGE_SHA,
            Capacity {
                cpu_millicores: 8000,
                memory_mb: 8192,
                disk_mb: 100_000,
                gpu_count: 0,
            },
        );
        let (st, v) = api
            .call("POST", "/workers/register", WORKER_TOKEN, Some(register))
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        api
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v1/modules/scaibunker{path}", self.front.url())
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        key: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut rb = self
            .http
            .request(method.parse().expect("method"), self.url(path))
            .bearer_auth(key);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let resp = rb.send().await.expect("request");
        let status = resp.status();
        let text = resp.text().await.expect("body");
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, v)
    }

    /// A running bunker of `mode` idle for at most one second.
    async fn bunker(&self, mode: &str) -> String {
        let (st, v) = self
            .call(
                "POST",
                "/bunkers",
                &self.key,
                Some(json!({"image": "default", "lifecycle_mode": mode, "idle_timeout_s": 1})),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        assert_eq!(v["data"]["status"], "running", "{v}");
        v["data"]["id"].as_str().expect("id").to_owned()
    }

    async fn status(&self, id: &str) -> String {
        let (st, v) = self
            .call("GET", &format!("/bunkers/{id}"), &self.key, None)
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        v["data"]["status"].as_str().expect("status").to_owned()
    }

    /// Waits (up to 20 s) for the bunker to leave `running` once its activity is over.
    async fn ends_idle(&self, id: &str, want: &str) {
        for _ in 0..200 {
            if self.status(id).await == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{id} never became {want} once idle");
    }

    fn untouched(&self, id: &str) {
        let seen = self.seen.lock().expect("lock");
        assert!(!seen.deletes.contains(&id.to_owned()), "its VM was stopped");
        assert!(
            !seen.snapshots.contains(&id.to_owned()),
            "it was passivated"
        );
    }
}

async fn a_long_exec_keeps_an_idle_bunker_from_being_swept(db: Db) {
    let api = Api::start(db).await;
    let id = api.bunker("ephemeral").await;
    let (st, v) = api
        .call(
            "POST",
            &format!("/bunkers/{id}/exec"),
            &api.key,
            Some(json!({"command": "sleep 4"})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["data"]["exit_code"], 0, "{v}");
    assert_eq!(api.status(&id).await, "running", "not swept under its exec");
    api.untouched(&id);
    api.ends_idle(&id, "terminated").await;
}

async fn a_streamed_exec_keeps_a_persistent_bunker_from_being_passivated(db: Db) {
    let api = Api::start(db).await;
    let id = api.bunker("persistent").await;
    let resp = api
        .http
        .post(api.url(&format!("/bunkers/{id}/exec")))
        .bearer_auth(&api.key)
        .json(&json!({"command": "sleep 4", "stream": true}))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), StatusCode::OK);
    let events = resp.text().await.expect("events");
    assert!(events.contains("event: exit"), "{events}");
    assert_eq!(
        api.status(&id).await,
        "running",
        "not passivated under its exec"
    );
    api.untouched(&id);
    api.ends_idle(&id, "paused").await;
}

async fn an_open_shell_keeps_an_idle_bunker_from_being_swept(db: Db) {
    let api = Api::start(db).await;
    let id = api.bunker("session").await;
    let url = api
        .url(&format!("/bunkers/{id}/shell?token={}", api.key))
        .replacen("http://", "ws://", 1);
    let (mut socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("shell opens");
    tokio::time::sleep(HOLD).await;
    assert_eq!(
        api.status(&id).await,
        "running",
        "not swept under its shell"
    );
    api.untouched(&id);
    socket.close(None).await.expect("close");
    while socket.next().await.is_some() {}
    api.ends_idle(&id, "terminated").await;
}

/// A tenant with no storage left takes no snapshot of its own, but its idle persistent bunker is
/// still passivated: its state is kept (and counted) rather than the bunker left running.
async fn a_tenant_at_its_storage_cap_is_still_passivated(db: Db) {
    let api = Api::start(db).await;
    let (st, v) = api
        .call(
            "POST",
            "/quota-profiles",
            &api.key,
            Some(json!({"name": "no storage", "tenant_id": null, "max_storage_mb": 0})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let id = api.bunker("persistent").await;
    let (st, v) = api
        .call(
            "POST",
            &format!("/bunkers/{id}/snapshot"),
            &api.key,
            Some(json!({})),
        )
        .await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(v["error"]["code"], "STORAGE_QUOTA_EXCEEDED", "{v}");
    api.ends_idle(&id, "paused").await;
    assert!(
        api.seen.lock().expect("lock").snapshots.contains(&id),
        "passivated through a snapshot"
    );
}

both!(
    a_tenant_at_its_storage_cap_is_still_passivated,
    a_long_exec_keeps_an_idle_bunker_from_being_swept,
    a_streamed_exec_keeps_a_persistent_bunker_from_being_passivated,
    an_open_shell_keeps_an_idle_bunker_from_being_swept,
);
