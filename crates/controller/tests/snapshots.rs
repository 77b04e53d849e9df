//! Snapshot routes on a real controller (both SQL backends) with a stand-in worker: the
//! worker API answered in-process, uploading its "snapshot" through the controller's real
//! storage proxy with the worker token, as a real worker does. Capturing and restoring real
//! VMs is covered by the worker and end-to-end suites.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Json as AxJson, Path, State};
use axum::http::StatusCode as AxStatus;
use axum::routing::post;
use reqwest::StatusCode;
use scaibunker_controller::config::ControllerConfig;
use scaibunker_controller::service::auth::hash_key;
use scaibunker_controller::store::bunkers::{StatusChange, change_status};
use scaibunker_controller::store::identity::{NewApiKey, NewTenant, NewUser};
use scaibunker_controller::store::now_ms;
use scaibunker_controller::store::snapshots::{SnapshotRow, insert};
use scaibunker_controller::{ControllerHandle, start};
use scaibunker_proto::worker::{
    BootSource, CachedImage, Capacity, CreateVm, PROTOCOL_VERSION, RegisterRequest, SnapshotFile,
    SnapshotKind, SnapshotManifest, SnapshotVm, VmInfo, VmStatus,
};
use serde_json::{Value, json};

#[macro_use]
mod common;

use common::{Db, TestDatabase};

const WORKER_TOKEN: &str = "swt_test_worker_token";
const IMAGE_SHA: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const DISK_BYTES: &[u8] = b"a qcow2 overlay, as far as this test is concerned";
const STATE_BYTES: &[u8] = b"memory and device state";

/// What the stand-in worker was asked to do.
#[derive(Default)]
struct Seen {
    creates: Vec<CreateVm>,
    snapshots: Vec<SnapshotVm>,
}

/// How the stand-in worker's next captures behave.
#[derive(Default)]
struct Behaviour {
    /// A capture takes this long (ms) before it answers.
    delay_ms: AtomicU64,
    /// A capture uploads its disk, then fails.
    fail: AtomicBool,
}

#[derive(Clone)]
struct FakeWorker {
    controller: String,
    http: reqwest::Client,
    seen: Arc<Mutex<Seen>>,
    /// The credential its registration got: what it uploads snapshots with.
    credential: Arc<Mutex<String>>,
    behaviour: Arc<Behaviour>,
}

async fn create_vm(State(w): State<FakeWorker>, AxJson(req): AxJson<CreateVm>) -> AxJson<VmInfo> {
    let source = if req.snapshot.is_some() {
        BootSource::Snapshot
    } else {
        BootSource::Cold
    };
    let id = req.bunker_id.clone();
    w.seen.lock().expect("lock").creates.push(req);
    AxJson(VmInfo {
        bunker_id: id,
        status: VmStatus::Running,
        guest_kernel: None,
        boot_ms: 1,
        boot_source: source,
    })
}

async fn delete_vm(Path(_id): Path<String>) -> AxStatus {
    AxStatus::NO_CONTENT
}

async fn snapshot_vm(
    State(w): State<FakeWorker>,
    Path(_id): Path<String>,
    AxJson(req): AxJson<SnapshotVm>,
) -> Result<AxJson<SnapshotManifest>, (AxStatus, AxJson<Value>)> {
    tokio::time::sleep(Duration::from_millis(
        w.behaviour.delay_ms.load(Ordering::SeqCst),
    ))
    .await;
    let failing = w.behaviour.fail.load(Ordering::SeqCst);
    let mut files = vec![("disk.qcow2", DISK_BYTES)];
    if req.kind == SnapshotKind::Full {
        files.push(("vm.state", STATE_BYTES));
    }
    let credential = w.credential.lock().expect("lock").clone();
    let mut out = Vec::new();
    if failing {
        files.truncate(1);
    }
    for (name, bytes) in files {
        let key = format!("{}/{name}", req.object_prefix);
        let resp = w
            .http
            .put(format!(
                "{}/v1/modules/scaibunker/storage/objects/{key}",
                w.controller
            ))
            .bearer_auth(credential.clone())
            .body(bytes.to_vec())
            .send()
            .await
            .expect("upload");
        assert!(
            resp.status().is_success(),
            "upload {key}: {}",
            resp.status()
        );
        out.push(SnapshotFile {
            name: name.into(),
            key,
            size_bytes: bytes.len() as u64,
            sha256: "b".repeat(64),
        });
    }
    w.seen.lock().expect("lock").snapshots.push(req.clone());
    if failing {
        // The disk is uploaded; the state save fails, as a real worker says it.
        return Err((
            AxStatus::INTERNAL_SERVER_ERROR,
            AxJson(json!({"code": "SNAPSHOT_FAILED", "message": "the state save failed"})),
        ));
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
        files: out,
    }))
}

struct Api {
    handle: ControllerHandle,
    http: reqwest::Client,
    key: String,
    seen: Arc<Mutex<Seen>>,
    behaviour: Arc<Behaviour>,
    worker: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
    _database: TestDatabase,
}

impl Drop for Api {
    fn drop(&mut self) {
        self.worker.abort();
    }
}

impl Api {
    /// A controller and a registered stand-in worker holding image `default`.
    async fn start(db: Db) -> Api {
        Self::start_with(db, |_| {}).await
    }

    /// The same, with `tune` applied to the controller's configuration.
    async fn start_with(db: Db, tune: impl FnOnce(&mut ControllerConfig)) -> Api {
        let dir = tempfile::tempdir().expect("tempdir");
        let listen: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let mut config =
            ControllerConfig::embedded(dir.path().to_path_buf(), listen, WORKER_TOKEN.into());
        tune(&mut config);
        let database = db.create().await;
        config.database_url = database.url.clone();
        let handle = start(config).await.expect("controller starts");
        let key = handle.bootstrap_key.clone().expect("bootstrap key");

        let seen = Arc::new(Mutex::new(Seen::default()));
        let credential = Arc::new(Mutex::new(String::new()));
        let behaviour = Arc::new(Behaviour::default());
        let fake = FakeWorker {
            controller: handle.url(),
            http: reqwest::Client::new(),
            seen: Arc::clone(&seen),
            credential: Arc::clone(&credential),
            behaviour: Arc::clone(&behaviour),
        };
        let app = axum::Router::new()
            .route("/v1/worker/bunkers", post(create_vm))
            .route("/v1/worker/bunkers/{id}", axum::routing::delete(delete_vm))
            .route("/v1/worker/bunkers/{id}/snapshot", post(snapshot_vm))
            .with_state(fake);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let worker_url = format!("http://{}", listener.local_addr().expect("addr"));
        let worker = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("serve");
        });
        let api = Api {
            handle,
            http: reqwest::Client::new(),
            key,
            seen,
            behaviour,
            worker,
            _dir: dir,
            _database: database,
        };
        let register = RegisterRequest {
            protocol_version: PROTOCOL_VERSION,
            name: "fake".into(),
            url: worker_url,
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
        let (st, v) = api
            .call(
                "POST",
                "/workers/register",
                Some(WORKER_TOKEN),
                Some(serde_json::to_value(register).expect("json")),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        *credential.lock().expect("lock") = v["credential"].as_str().expect("credential").into();
        api
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v1/modules/scaibunker{path}", self.handle.url())
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> reqwest::Response {
        let mut rb = self
            .http
            .request(method.parse().expect("method"), self.url(path));
        if let Some(k) = key {
            rb = rb.bearer_auth(k);
        }
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        rb.send().await.expect("request")
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        common::json_of(self.send(method, path, key, body).await).await
    }

    async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let key = self.key.clone();
        self.call(method, path, Some(&key), body).await
    }

    async fn running_bunker(&self) -> String {
        let (st, v) = self
            .admin("POST", "/bunkers", Some(json!({"image": "default"})))
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        assert_eq!(v["data"]["status"], "running", "{v}");
        v["data"]["id"].as_str().expect("id").to_owned()
    }

    async fn has_object(&self, key: &str) -> bool {
        self.handle.services.objects().head(key).await.is_ok()
    }

    /// A user of a new tenant with `role`; returns its API key.
    async fn tenant_key(&self, slug: &str, role: &str) -> String {
        let key = format!("sgk_{slug}_{}", "k".repeat(40));
        self.handle
            .services
            .store
            .insert_tenant_user_key(
                NewTenant {
                    id: &format!("tnt_{slug}"),
                    name: slug,
                    slug,
                },
                NewUser {
                    id: &format!("usr_{slug}"),
                    tenant_id: &format!("tnt_{slug}"),
                    email: &format!("{slug}@example.com"),
                    role,
                },
                NewApiKey {
                    id: &format!("key_{slug}"),
                    tenant_id: &format!("tnt_{slug}"),
                    user_id: &format!("usr_{slug}"),
                    name: "test",
                    key_sha256: &hash_key(&key),
                    permissions: None,
                },
            )
            .await
            .expect("tenant inserted");
        key
    }
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

async fn snapshots_are_taken_listed_restored_and_deleted(db: Db) {
    let api = Api::start(db).await;
    let id = api.running_bunker().await;

    let (st, v) = api
        .admin(
            "POST",
            &format!("/bunkers/{id}/snapshot"),
            Some(json!({"kind": "disk", "expires_in_s": 3600})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let snap = v["data"].clone();
    let snap_id = snap["id"].as_str().expect("id").to_owned();
    let tenant = snap["tenant_id"].as_str().expect("tenant").to_owned();
    assert!(snap_id.starts_with("snp_"), "{snap}");
    assert_eq!(snap["status"], "ready");
    assert_eq!(snap["kind"], "disk");
    assert_eq!(snap["bunker_id"], id.as_str());
    assert_eq!(snap["size_bytes"], DISK_BYTES.len());
    assert!(snap["expires_at"].is_string(), "{snap}");
    let disk_key = format!("snapshots/{tenant}/{snap_id}/disk.qcow2");
    assert!(api.has_object(&disk_key).await, "{disk_key} is stored");
    {
        let seen = api.seen.lock().expect("lock");
        assert_eq!(seen.snapshots.len(), 1);
        assert_eq!(seen.snapshots[0].kind, SnapshotKind::Disk);
        assert_eq!(
            seen.snapshots[0].object_prefix,
            format!("snapshots/{tenant}/{snap_id}")
        );
    }
    // running → snapshotting → running.
    let (_, v) = api.admin("GET", &format!("/bunkers/{id}"), None).await;
    assert_eq!(v["data"]["status"], "running");

    let (st, v) = api
        .admin("GET", &format!("/snapshots/{snap_id}"), None)
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["data"], snap);
    let (_, v) = api
        .admin("GET", &format!("/snapshots?bunker_id={id}"), None)
        .await;
    assert_eq!(v["data"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["has_more"], false);

    // A full one, by default; then a restore of it on the (only) worker.
    let (st, v) = api
        .admin("POST", &format!("/bunkers/{id}/snapshot"), Some(json!({})))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["data"]["kind"], "full");
    assert_eq!(v["data"]["expires_at"], Value::Null);
    assert_eq!(
        v["data"]["size_bytes"],
        DISK_BYTES.len() + STATE_BYTES.len()
    );
    let full_id = v["data"]["id"].as_str().expect("id").to_owned();
    let (_, v) = api.admin("GET", "/snapshots?limit=1", None).await;
    assert_eq!(v["data"][0]["id"], full_id.as_str(), "newest first");
    assert_eq!(v["has_more"], true);
    let cursor = v["next_cursor"].as_str().expect("cursor").to_owned();
    let (_, v) = api
        .admin("GET", &format!("/snapshots?limit=1&cursor={cursor}"), None)
        .await;
    assert_eq!(v["data"][0]["id"], snap_id.as_str());

    let (st, v) = api
        .admin("POST", "/bunkers", Some(json!({"snapshot_id": full_id})))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let restored = v["data"].clone();
    assert_eq!(restored["status"], "running");
    assert_eq!(restored["snapshot_id"], full_id.as_str());
    assert_eq!(restored["image"], "default");
    assert_ne!(restored["id"], id.as_str());
    {
        let seen = api.seen.lock().expect("lock");
        let create = seen.creates.last().expect("a create");
        let manifest = create.snapshot.as_ref().expect("the manifest is passed on");
        assert_eq!(manifest.kind, SnapshotKind::Full);
        assert_eq!(manifest.files.len(), 2);
        assert_eq!(create.image_sha256, IMAGE_SHA);
        assert_ne!(create.hostname, "bunker-x", "a fresh host name");
    }
    // A full snapshot resumes with its own memory; an `image` beside it must be its image.
    let (st, v) = api
        .admin(
            "POST",
            "/bunkers",
            Some(json!({"snapshot_id": full_id, "memory_mb": 1024})),
        )
        .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::UNPROCESSABLE_ENTITY, "VALIDATION_ERROR")
    );
    assert_eq!(v["error"]["details"][0]["field"], "memory_mb");
    let (st, v) = api
        .admin(
            "POST",
            "/bunkers",
            Some(json!({"snapshot_id": full_id, "image": "another"})),
        )
        .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::UNPROCESSABLE_ENTITY, "VALIDATION_ERROR")
    );
    assert_eq!(v["error"]["details"][0]["field"], "image");
    let (st, v) = api
        .admin(
            "POST",
            "/bunkers",
            Some(json!({"snapshot_id": full_id, "image": "default"})),
        )
        .await;
    assert_eq!(
        st,
        StatusCode::CREATED,
        "naming the snapshot's own image is fine: {v}"
    );
    // A disk snapshot may be restored bigger.
    let (st, v) = api
        .admin(
            "POST",
            "/bunkers",
            Some(json!({"snapshot_id": snap_id, "memory_mb": 1024})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["data"]["memory_mb"], 1024);
    let (st, v) = api
        .admin("POST", "/bunkers", Some(json!({"snapshot_id": "snp_nope"})))
        .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::NOT_FOUND, "SNAPSHOT_NOT_FOUND")
    );

    // A final snapshot on delete; its id comes back in a header.
    let resp = api
        .send(
            "DELETE",
            &format!("/bunkers/{id}?snapshot=true"),
            Some(&api.key),
            None,
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let last = resp
        .headers()
        .get("x-snapshot-id")
        .and_then(|v| v.to_str().ok())
        .expect("x-snapshot-id")
        .to_owned();
    let v: Value = resp.json().await.expect("json");
    assert_eq!(v["data"]["status"], "terminated");
    let (_, v) = api.admin("GET", &format!("/snapshots/{last}"), None).await;
    assert_eq!(
        (v["data"]["status"].clone(), v["data"]["kind"].clone()),
        (json!("ready"), json!("full"))
    );
    // Not running any more: no snapshot; a repeated delete answers as for any ended bunker.
    let (st, v) = api
        .admin("POST", &format!("/bunkers/{id}/snapshot"), Some(json!({})))
        .await;
    assert_eq!((st, code(&v)), (StatusCode::CONFLICT, "BUNKER_NOT_RUNNING"));
    let resp = api
        .send(
            "DELETE",
            &format!("/bunkers/{id}?snapshot=true"),
            Some(&api.key),
            None,
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().get("x-snapshot-id").is_none());
    let (st, v) = api
        .admin(
            "POST",
            &format!("/bunkers/{}/snapshot", restored["id"].as_str().expect("id")),
            Some(json!({"expires_in_s": 0})),
        )
        .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::UNPROCESSABLE_ENTITY, "VALIDATION_ERROR")
    );

    // Delete removes the objects, then the record.
    let (st, _) = api
        .admin("DELETE", &format!("/snapshots/{snap_id}"), None)
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    assert!(!api.has_object(&disk_key).await, "{disk_key} is deleted");
    let (st, v) = api
        .admin("GET", &format!("/snapshots/{snap_id}"), None)
        .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::NOT_FOUND, "SNAPSHOT_NOT_FOUND")
    );
    let (st, v) = api
        .admin("DELETE", &format!("/snapshots/{snap_id}"), None)
        .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::NOT_FOUND, "SNAPSHOT_NOT_FOUND")
    );
    // The audit log has the snapshot and its deletion.
    let (_, v) = api
        .admin("GET", "/audit?action=snapshot.delete", None)
        .await;
    assert_eq!(v["data"][0]["resource_id"], snap_id.as_str(), "{v}");
}

async fn snapshots_are_tenant_scoped_and_need_permissions(db: Db) {
    let api = Api::start(db).await;
    let id = api.running_bunker().await;
    let (_, v) = api
        .admin(
            "POST",
            &format!("/bunkers/{id}/snapshot"),
            Some(json!({"kind": "disk"})),
        )
        .await;
    let snap_id = v["data"]["id"].as_str().expect("id").to_owned();

    let other = api.tenant_key("other", "tenant_user").await;
    for (method, path, body, want) in [
        (
            "GET",
            format!("/snapshots/{snap_id}"),
            None,
            "SNAPSHOT_NOT_FOUND",
        ),
        (
            "DELETE",
            format!("/snapshots/{snap_id}"),
            None,
            "SNAPSHOT_NOT_FOUND",
        ),
        (
            "POST",
            "/bunkers".to_owned(),
            Some(json!({"snapshot_id": snap_id})),
            "SNAPSHOT_NOT_FOUND",
        ),
        (
            "POST",
            format!("/bunkers/{id}/snapshot"),
            Some(json!({})),
            "BUNKER_NOT_FOUND",
        ),
    ] {
        let (st, v) = api.call(method, &path, Some(&other), body).await;
        assert_eq!(
            (st, code(&v)),
            (StatusCode::NOT_FOUND, want),
            "{method} {path}"
        );
    }
    let (st, v) = api.call("GET", "/snapshots", Some(&other), None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["data"].as_array().map(Vec::len), Some(0));

    // A viewer reads but neither takes nor deletes snapshots.
    let viewer = api.tenant_key("viewer", "tenant_viewer").await;
    let (st, _) = api.call("GET", "/snapshots", Some(&viewer), None).await;
    assert_eq!(st, StatusCode::OK);
    for (method, path, body) in [
        (
            "POST",
            "/bunkers/bnk_x/snapshot".to_owned(),
            Some(json!({})),
        ),
        ("DELETE", "/snapshots/snp_x".to_owned(), None),
        ("DELETE", "/bunkers/bnk_x?snapshot=true".to_owned(), None),
    ] {
        let (st, v) = api.call(method, &path, Some(&viewer), body).await;
        assert_eq!(
            (st, code(&v)),
            (StatusCode::FORBIDDEN, "AUTHZ_PERMISSION_DENIED"),
            "{method} {path}"
        );
    }
    for (method, path) in [
        ("GET", "/snapshots".to_owned()),
        ("GET", format!("/snapshots/{snap_id}")),
        ("DELETE", format!("/snapshots/{snap_id}")),
    ] {
        let (st, v) = api.call(method, &path, None, None).await;
        assert_eq!(
            (st, code(&v)),
            (StatusCode::UNAUTHORIZED, "AUTH_TOKEN_MISSING"),
            "{method} {path}"
        );
    }
    // Unknown fields are refused.
    let (st, v) = api
        .admin(
            "POST",
            &format!("/bunkers/{id}/snapshot"),
            Some(json!({"ttl": 5})),
        )
        .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::UNPROCESSABLE_ENTITY, "VALIDATION_ERROR")
    );
    // Nothing changed for the owner.
    let (st, _) = api
        .admin("GET", &format!("/snapshots/{snap_id}"), None)
        .await;
    assert_eq!(st, StatusCode::OK);
}

async fn the_cleanup_job_deletes_expired_snapshots(db: Db) {
    let api = Api::start(db).await;
    let id = api.running_bunker().await;
    let (_, v) = api
        .admin(
            "POST",
            &format!("/bunkers/{id}/snapshot"),
            Some(json!({"kind": "full", "expires_in_s": 1})),
        )
        .await;
    let expiring = v["data"]["id"].as_str().expect("id").to_owned();
    let tenant = v["data"]["tenant_id"].as_str().expect("tenant").to_owned();
    let (_, v) = api
        .admin(
            "POST",
            &format!("/bunkers/{id}/snapshot"),
            Some(json!({"kind": "disk"})),
        )
        .await;
    let kept = v["data"]["id"].as_str().expect("id").to_owned();
    // A capture whose controller died an hour ago: the bunker stayed `snapshotting`.
    let store = &api.handle.services.store;
    let bunker = store
        .bunker(&tenant, &id)
        .await
        .expect("read")
        .expect("bunker");
    let abandoned = SnapshotRow {
        id: "snp_abandoned".into(),
        tenant_id: tenant.clone(),
        owner_id: bunker.owner_id.clone(),
        bunker_id: id.clone(),
        status: "pending".into(),
        kind: "full".into(),
        size_bytes: 0,
        image_name: bunker.image_name.clone(),
        image_id: bunker.image_id.clone(),
        cpu_millicores: bunker.cpu_millicores,
        memory_mb: bunker.memory_mb,
        disk_mb: bunker.disk_mb,
        manifest: None,
        failure_reason: None,
        created_at: now_ms() - 2 * 3600 * 1000,
        expires_at: None,
    };
    let mut tx = store.begin().await.expect("begin");
    let moved = change_status(
        &mut tx,
        &tenant,
        &id,
        &StatusChange {
            from: &["running"],
            to: "snapshotting",
            failure_reason: None,
            started_at: None,
            terminated_at: None,
        },
    )
    .await
    .expect("status");
    assert!(moved);
    insert(&mut tx, &abandoned).await.expect("insert");
    tx.commit().await.expect("commit");
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;

    scaibunker_controller::service::snapshots::cleanup(&api.handle.services)
        .await
        .expect("cleanup");
    let (st, _) = api
        .admin("GET", &format!("/snapshots/{expiring}"), None)
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    for name in ["disk.qcow2", "vm.state"] {
        let key = format!("snapshots/{tenant}/{expiring}/{name}");
        assert!(!api.has_object(&key).await, "{key} is deleted");
    }
    let (st, _) = api.admin("GET", &format!("/snapshots/{kept}"), None).await;
    assert_eq!(st, StatusCode::OK, "a snapshot without expiry stays");
    assert!(
        api.has_object(&format!("snapshots/{tenant}/{kept}/disk.qcow2"))
            .await
    );
    let (_, v) = api.admin("GET", "/snapshots/snp_abandoned", None).await;
    assert_eq!(v["data"]["status"], "failed", "{v}");
    let (_, v) = api.admin("GET", &format!("/bunkers/{id}"), None).await;
    assert_eq!(v["data"]["status"], "running", "back from snapshotting");
}

/// A capture's rows as a controller that died mid-capture `age_ms` ago leaves them: the
/// bunker `snapshotting`, the snapshot `pending`, nobody renewing it.
async fn abandon_a_capture(api: &Api, tenant: &str, id: &str, snap_id: &str, age_ms: i64) {
    let store = &api.handle.services.store;
    let bunker = store
        .bunker(tenant, id)
        .await
        .expect("read")
        .expect("bunker");
    let abandoned = SnapshotRow {
        id: snap_id.into(),
        tenant_id: tenant.into(),
        owner_id: bunker.owner_id.clone(),
        bunker_id: id.into(),
        status: "pending".into(),
        kind: "full".into(),
        size_bytes: 0,
        image_name: bunker.image_name.clone(),
        image_id: bunker.image_id.clone(),
        cpu_millicores: bunker.cpu_millicores,
        memory_mb: bunker.memory_mb,
        disk_mb: bunker.disk_mb,
        manifest: None,
        failure_reason: None,
        created_at: now_ms() - age_ms,
        expires_at: None,
    };
    let mut tx = store.begin().await.expect("begin");
    let moved = change_status(
        &mut tx,
        tenant,
        id,
        &StatusChange {
            from: &["running"],
            to: "snapshotting",
            failure_reason: None,
            started_at: None,
            terminated_at: None,
        },
    )
    .await
    .expect("status");
    assert!(moved);
    insert(&mut tx, &abandoned).await.expect("insert");
    tx.commit().await.expect("commit");
}

async fn a_passivation_snapshot_cannot_be_deleted(db: Db) {
    let api = Api::start(db).await;
    let (st, v) = api
        .admin(
            "POST",
            "/bunkers",
            Some(json!({"image": "default", "lifecycle_mode": "persistent", "idle_timeout_s": 1})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let id = v["data"]["id"].as_str().expect("id").to_owned();
    let tenant = v["data"]["tenant_id"].as_str().expect("tenant").to_owned();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    scaibunker_controller::service::passivation::sweep(&api.handle.services)
        .await
        .expect("passivation sweep");
    let (_, v) = api.admin("GET", &format!("/bunkers/{id}"), None).await;
    assert_eq!(v["data"]["status"], "paused", "passivated: {v}");
    let (_, v) = api
        .admin("GET", &format!("/snapshots?bunker_id={id}"), None)
        .await;
    let snap = v["data"][0]["id"]
        .as_str()
        .expect("its snapshot")
        .to_owned();

    // The bunker comes back from it: deleting it is refused, and nothing changes.
    let (st, v) = api
        .admin("DELETE", &format!("/snapshots/{snap}"), None)
        .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::CONFLICT, "SNAPSHOT_IN_USE"),
        "{v}"
    );
    let (st, v) = api.admin("GET", &format!("/snapshots/{snap}"), None).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["data"]["status"], "ready", "{v}");
    for name in ["disk.qcow2", "vm.state"] {
        let key = format!("snapshots/{tenant}/{snap}/{name}");
        assert!(api.has_object(&key).await, "{key} is kept");
    }
    // The cleanup job leaves it too.
    scaibunker_controller::service::snapshots::cleanup(&api.handle.services)
        .await
        .expect("cleanup");
    let (st, _) = api.admin("GET", &format!("/snapshots/{snap}"), None).await;
    assert_eq!(st, StatusCode::OK);

    // Restored, the bunker no longer needs it: it expires.
    let (st, v) = api
        .admin("POST", &format!("/bunkers/{id}/resume"), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["data"]["status"], "running", "{v}");
    tokio::time::sleep(Duration::from_millis(10)).await;
    scaibunker_controller::service::snapshots::cleanup(&api.handle.services)
        .await
        .expect("cleanup");
    let (st, _) = api.admin("GET", &format!("/snapshots/{snap}"), None).await;
    assert_eq!(st, StatusCode::NOT_FOUND, "expired once restored");
}

async fn a_passivated_bunker_whose_snapshot_was_deleted_fails_and_frees_its_quota(db: Db) {
    let api = Api::start(db).await;
    let (st, v) = api
        .admin(
            "POST",
            "/bunkers",
            Some(json!({"image": "default", "lifecycle_mode": "persistent", "idle_timeout_s": 1})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let id = v["data"]["id"].as_str().expect("id").to_owned();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let services = &api.handle.services;
    scaibunker_controller::service::passivation::sweep(services)
        .await
        .expect("passivation sweep");
    // Deleted under it, as the API allowed before `SNAPSHOT_IN_USE`.
    sqlx::query("DELETE FROM snapshots WHERE bunker_id = ?")
        .bind(&id)
        .execute(services.store.pool())
        .await
        .expect("delete the row");
    scaibunker_controller::service::passivation::sweep(services)
        .await
        .expect("passivation sweep");
    let (_, v) = api.admin("GET", &format!("/bunkers/{id}"), None).await;
    assert_eq!(v["data"]["status"], "failed", "not paused forever: {v}");
    let charges: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM quota_charges WHERE bunker_id = ?")
        .bind(&id)
        .fetch_one(services.store.pool())
        .await
        .expect("count");
    assert_eq!(charges, 0, "its quota is released");
}

async fn a_capture_left_by_a_dead_controller_is_failed_within_minutes(db: Db) {
    // Captures are renewed every 300 ms and count as abandoned after 900 ms without.
    let api = Api::start_with(db, |c| c.activity_interval = Duration::from_millis(300)).await;
    let id = api.running_bunker().await;
    let tenant = api
        .handle
        .services
        .store
        .admin_bunker(&id)
        .await
        .expect("read")
        .expect("bunker")
        .tenant_id;
    // Two minutes ago: the controller capturing it died.
    abandon_a_capture(&api, &tenant, &id, "snp_abandoned", 120 * 1000).await;
    scaibunker_controller::service::snapshots::cleanup(&api.handle.services)
        .await
        .expect("cleanup");
    let (_, v) = api.admin("GET", "/snapshots/snp_abandoned", None).await;
    assert_eq!(v["data"]["status"], "failed", "{v}");
    let (_, v) = api.admin("GET", &format!("/bunkers/{id}"), None).await;
    assert_eq!(
        v["data"]["status"], "running",
        "back from snapshotting: {v}"
    );

    // A capture that takes longer than that, on a live controller, is left alone.
    api.behaviour.delay_ms.store(2500, Ordering::SeqCst);
    let capture = {
        let url = api.url(&format!("/bunkers/{id}/snapshot"));
        let (http, key) = (api.http.clone(), api.key.clone());
        tokio::spawn(async move {
            let resp = http
                .post(url)
                .bearer_auth(key)
                .json(&json!({"kind": "disk"}))
                .send()
                .await
                .expect("request");
            let st = resp.status();
            (st, resp.json::<Value>().await.expect("json"))
        })
    };
    tokio::time::sleep(Duration::from_millis(1800)).await;
    scaibunker_controller::service::snapshots::cleanup(&api.handle.services)
        .await
        .expect("cleanup");
    let (st, v) = capture.await.expect("capture");
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["data"]["status"], "ready", "{v}");
}

async fn failed_snapshots_expire_with_their_objects(db: Db) {
    let api = Api::start(db).await;
    let id = api.running_bunker().await;
    api.behaviour.fail.store(true, Ordering::SeqCst);
    let (st, v) = api
        .admin(
            "POST",
            &format!("/bunkers/{id}/snapshot"),
            Some(json!({"kind": "full"})),
        )
        .await;
    assert!(st.is_server_error(), "{v}");
    let (_, v) = api
        .admin("GET", &format!("/snapshots?bunker_id={id}"), None)
        .await;
    let snap = v["data"][0]["id"]
        .as_str()
        .expect("the failed one")
        .to_owned();
    let tenant = v["data"][0]["tenant_id"]
        .as_str()
        .expect("tenant")
        .to_owned();
    assert_eq!(v["data"][0]["status"], "failed", "{v}");
    let disk = format!("snapshots/{tenant}/{snap}/disk.qcow2");
    assert!(api.has_object(&disk).await, "the partial upload is there");
    // An hour and a bit later.
    sqlx::query(
        "UPDATE snapshots SET created_at = created_at - 3700000, \
         expires_at = expires_at - 3700000 WHERE id = ?",
    )
    .bind(&snap)
    .execute(api.handle.services.store.pool())
    .await
    .expect("age the row");
    scaibunker_controller::service::snapshots::cleanup(&api.handle.services)
        .await
        .expect("cleanup");
    assert!(!api.has_object(&disk).await, "{disk} is deleted");
    let (st, _) = api.admin("GET", &format!("/snapshots/{snap}"), None).await;
    assert_eq!(st, StatusCode::NOT_FOUND, "the failed snapshot expired");
}

both!(
    a_passivation_snapshot_cannot_be_deleted,
    a_passivated_bunker_whose_snapshot_was_deleted_fails_and_frees_its_quota,
    a_capture_left_by_a_dead_controller_is_failed_within_minutes,
    failed_snapshots_expire_with_their_objects,
    snapshots_are_taken_listed_restored_and_deleted,
    snapshots_are_tenant_scoped_and_need_permissions,
    the_cleanup_job_deletes_expired_snapshots,
);
