//! The controller's HTTP API on a random port with a fresh SQLite database per test.
//! Workers here are registered through the real worker routes; where a test needs a worker
//! that is down, it registers one whose URL nothing listens on (a real failure mode).
//! Booting real VMs is covered by the worker and end-to-end suites.

use std::net::SocketAddr;

use reqwest::StatusCode;
use scaibunker_controller::config::ControllerConfig;
use scaibunker_controller::service::auth::hash_key;
use scaibunker_controller::store::identity::{NewApiKey, NewTenant, NewUser};
use scaibunker_controller::{ControllerHandle, start};
use scaibunker_proto::worker::{
    CachedImage, Capacity, Heartbeat, PROTOCOL_VERSION, RegisterRequest,
};
use serde_json::{Value, json};

#[macro_use]
mod common;

use common::{Db, TestDatabase};

const WORKER_TOKEN: &str = "swt_test_worker_token";

struct Api {
    handle: ControllerHandle,
    http: reqwest::Client,
    key: String,
    /// Worker credentials the controller handed out, by worker name and by worker id.
    credentials: std::sync::Mutex<std::collections::HashMap<String, String>>,
    _dir: tempfile::TempDir,
    _database: TestDatabase,
}

impl Api {
    async fn start(db: Db) -> Api {
        let dir = tempfile::tempdir().expect("tempdir");
        let listen: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let mut config =
            ControllerConfig::embedded(dir.path().to_path_buf(), listen, WORKER_TOKEN.into());
        let database = db.create().await;
        config.database_url = database.url.clone();
        let handle = start(config).await.expect("controller starts");
        let key = handle
            .bootstrap_key
            .clone()
            .expect("first start bootstraps a key");
        let on_disk = std::fs::read_to_string(dir.path().join("admin.key")).expect("admin.key");
        assert_eq!(on_disk.trim(), key);
        Api {
            handle,
            http: reqwest::Client::new(),
            key,
            credentials: Default::default(),
            _dir: dir,
            _database: database,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v1/modules/scaibunker{path}", self.handle.url())
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        common::request(&self.http, method, self.url(path), key, body).await
    }

    async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let key = self.key.clone();
        self.call(method, path, Some(&key), body).await
    }

    /// A worker's call: a registration with the credential its name was given (else the join
    /// token), anything else with the credential of the `worker_id` it names.
    async fn worker_call(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let lookup = if path == "/workers/register" {
            body["name"].as_str()
        } else {
            body["worker_id"].as_str()
        };
        let bearer = lookup
            .and_then(|k| self.credentials.lock().expect("lock").get(k).cloned())
            .unwrap_or_else(|| WORKER_TOKEN.to_owned());
        let (st, v) = self
            .call("POST", path, Some(&bearer), Some(body.clone()))
            .await;
        if path == "/workers/register"
            && st == StatusCode::OK
            && let (Some(id), Some(c), Some(name)) = (
                v["worker_id"].as_str(),
                v["credential"].as_str(),
                body["name"].as_str(),
            )
        {
            let mut creds = self.credentials.lock().expect("lock");
            creds.insert(id.to_owned(), c.to_owned());
            creds.insert(name.to_owned(), c.to_owned());
        }
        (st, v)
    }

    /// A worker credential for the storage proxy (which verifies it with no lookup).
    fn storage_worker(&self) -> String {
        let secret = self.handle.services.config.storage_secret.as_bytes();
        scaibunker_proto::worker_auth::credential(secret, "wrk_storage_reader", 1)
    }

    /// The credential the controller handed worker `id` (or name).
    fn credential(&self, id: &str) -> String {
        self.credentials
            .lock()
            .expect("lock")
            .get(id)
            .cloned()
            .expect("a registered worker")
    }

    /// Registers a worker whose API nothing listens on, holding image `default`.
    async fn register_dead_worker(
        &self,
        name: &str,
        memory_mb: u64,
        images: Vec<CachedImage>,
    ) -> String {
        let url = format!("http://127.0.0.1:{}", closed_port());
        let req = RegisterRequest {
            protocol_version: PROTOCOL_VERSION,
            name: name.into(),
            url,
            capacity: Capacity {
                cpu_millicores: 8000,
                memory_mb,
                disk_mb: 100_000,
                gpu_count: 0,
            },
            images,
            runtime: "qemu/tcg".into(),
        };
        let (st, v) = self
            .worker_call(
                "/workers/register",
                serde_json::to_value(req).expect("json"),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        v["worker_id"].as_str().expect("worker id").to_owned()
    }

    /// A second tenant with a user of `role`; returns its API key.
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

fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn default_image() -> Vec<CachedImage> {
    vec![CachedImage {
        name: "default".into(),
        sha256: "a".repeat(64),
        size_bytes: 1 << 30,
    }]
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("<no code>")
}

async fn health_answers_without_auth_and_every_response_has_a_request_id(db: Db) {
    let api = Api::start(db).await;
    let resp = reqwest::get(format!("{}/health", api.handle.url()))
        .await
        .expect("health");
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().contains_key("x-request-id"));
    let (st, v) = api.call("GET", "/nope", None, None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_eq!(code(&v), "NOT_FOUND");
    assert!(
        v["meta"]["request_id"]
            .as_str()
            .is_some_and(|r| r.starts_with("req_"))
    );
}

async fn rejects_missing_and_invalid_tokens(db: Db) {
    let api = Api::start(db).await;
    let (st, v) = api.call("GET", "/bunkers", None, None).await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::UNAUTHORIZED, "AUTH_TOKEN_MISSING")
    );
    let bad = format!("sgk_{}", "x".repeat(40));
    let (st, v) = api.call("GET", "/bunkers", Some(&bad), None).await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::UNAUTHORIZED, "AUTH_TOKEN_INVALID")
    );
    let (st, v) = api.call("GET", "/bunkers", Some("garbage"), None).await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::UNAUTHORIZED, "AUTH_TOKEN_INVALID")
    );
    // The worker token is not an API key, and API keys are not the worker token.
    let (st, _) = api.call("GET", "/bunkers", Some(WORKER_TOKEN), None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, v) = api
        .call(
            "POST",
            "/heartbeat",
            Some(&api.key.clone()),
            Some(json!({})),
        )
        .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::UNAUTHORIZED, "AUTH_TOKEN_INVALID")
    );
}

async fn validation_errors_name_each_field(db: Db) {
    let api = Api::start(db).await;
    api.register_dead_worker("w1", 8000, default_image()).await;
    let table: Vec<(Value, StatusCode, &str, &str)> = vec![
        (
            json!({"image": "default", "bogus": 1}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "VALIDATION_ERROR",
            "bogus",
        ),
        (
            json!({"image": 5}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "VALIDATION_ERROR",
            "image",
        ),
        (
            json!({}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "VALIDATION_ERROR",
            "image",
        ),
        (
            json!({"image": "default", "lifecycle_mode": "forever"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "VALIDATION_ERROR",
            "lifecycle_mode",
        ),
        (
            json!({"image": "default", "cpu_millicores": 10}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "VALIDATION_ERROR",
            "cpu_millicores",
        ),
        (
            json!({"image": "default", "memory_mb": 10_000_000}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "VALIDATION_ERROR",
            "memory_mb",
        ),
        (
            // The guest's disk holds the image (1 GiB here): it can grow, never shrink.
            json!({"image": "default", "disk_mb": 512}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "VALIDATION_ERROR",
            "disk_mb",
        ),
        (
            json!({"image": "default", "bandwidth_mbit": 0}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "VALIDATION_ERROR",
            "bandwidth_mbit",
        ),
        (
            json!({"image": "default", "idle_timeout_s": 0}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "VALIDATION_ERROR",
            "idle_timeout_s",
        ),
        (
            json!({"image": "default", "env_vars": {"1BAD": "x"}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "VALIDATION_ERROR",
            "env_vars",
        ),
        (
            json!({"image": "default", "network_allowlist": ["pypi.org"]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "VALIDATION_ERROR",
            "network_allowlist",
        ),
        (
            json!({"image": "default", "network_profile": "allowlisted", "network_allowlist": ["https://x.com"]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "VALIDATION_ERROR",
            "network_allowlist",
        ),
        (
            json!({"image": "default", "network_profile": "allowlisted"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "VALIDATION_ERROR",
            "network_allowlist",
        ),
        (
            json!({"image": "default", "network_profile": "allowlisted", "network_allowlist": ["a.test", "*.*.b.test"]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "VALIDATION_ERROR",
            "network_allowlist",
        ),
        (
            json!({"image": "default", "network_profile": "transit", "interfaces": [{"if_name": "eth2", "bridge_name": "br0"}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "VALIDATION_ERROR",
            "interfaces",
        ),
        (
            json!({"image": "default", "network_profile": "transit", "interfaces": [{"if_name": "eth1", "bridge_name": "br0", "mac": "01:00:5e:00:00:01"}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "VALIDATION_ERROR",
            "interfaces",
        ),
        (
            json!({"image": "default", "network_profile": "transit", "interfaces": [{"if_name": "eth1", "bridge_name": "br-nowhere"}]}),
            StatusCode::NOT_FOUND,
            "BRIDGE_NOT_FOUND",
            "",
        ),
        (
            json!({"image": "default", "interfaces": [{"if_name": "eth1", "bridge_name": "br0"}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "INTERFACES_NOT_ALLOWED",
            "",
        ),
        (
            json!({"image": "default", "network_profile": "transit"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "TRANSIT_MISSING_INTERFACES",
            "",
        ),
        (
            json!({"image": "nope"}),
            StatusCode::NOT_FOUND,
            "IMAGE_NOT_FOUND",
            "",
        ),
        (
            json!({"image": "default", "snapshot_id": "snp_x"}),
            StatusCode::NOT_FOUND,
            "SNAPSHOT_NOT_FOUND",
            "",
        ),
    ];
    for (body, want_status, want_code, want_field) in table {
        let (st, v) = api.admin("POST", "/bunkers", Some(body.clone())).await;
        assert_eq!((st, code(&v)), (want_status, want_code), "{body}: {v}");
        if !want_field.is_empty() {
            let fields: Vec<&str> = v["error"]["details"]
                .as_array()
                .expect("details")
                .iter()
                .filter_map(|d| d["field"].as_str())
                .collect();
            assert!(fields.contains(&want_field), "{body}: {v}");
        }
    }
    // Malformed JSON is a validation error too.
    let resp = api
        .http
        .post(api.url("/bunkers"))
        .bearer_auth(&api.key)
        .body("{not json")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
}

async fn placement_errors_distinguish_no_capacity_from_no_image(db: Db) {
    let api = Api::start(db).await;
    // A worker with the image but only 256 MB free: a 512 MB bunker does not fit.
    api.register_dead_worker("small", 256, default_image())
        .await;
    let (st, v) = api
        .admin("POST", "/bunkers", Some(json!({"image": "default"})))
        .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::SERVICE_UNAVAILABLE, "WORKER_UNAVAILABLE"),
        "{v}"
    );
    // The same worker re-registers without the image: the image row remains, no one holds it.
    api.register_dead_worker("small", 256, vec![]).await;
    let (st, v) = api
        .admin(
            "POST",
            "/bunkers",
            Some(json!({"image": "default", "memory_mb": 128})),
        )
        .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::SERVICE_UNAVAILABLE, "NO_SUITABLE_WORKER"),
        "{v}"
    );
    let (st, v) = api.admin("GET", "/bunkers", None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        v["data"].as_array().map(Vec::len),
        Some(0),
        "a refused create records nothing"
    );
}

async fn a_boot_on_an_unreachable_worker_fails_the_bunker_with_a_reason(db: Db) {
    let api = Api::start(db).await;
    let mut images = default_image();
    images.push(CachedImage {
        name: "big".into(),
        sha256: "b".repeat(64),
        size_bytes: (3 << 30) - 4096,
    });
    api.register_dead_worker("dead", 8000, images).await;
    // Without a disk_mb, a bunker of an image bigger than the default disk gets the image's
    // size (rounded up to a MiB), not a disk it would not fit in.
    let (st, v) = api
        .admin("POST", "/bunkers", Some(json!({"image": "big"})))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["data"]["disk_mb"], 3072, "{v}");
    let (st, v) = api
        .admin(
            "POST",
            "/bunkers",
            Some(json!({"image": "default", "env_vars": {"SECRET": "s3cr3t"}, "label_set": {"team": "a"}})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let b = &v["data"];
    assert_eq!(b["status"], "failed");
    assert!(
        b["failure_reason"]
            .as_str()
            .is_some_and(|r| r.contains("unreachable")),
        "{b}"
    );
    assert!(b.get("env_vars").is_none(), "env_vars are never echoed");
    assert!(!v.to_string().contains("s3cr3t"));
    assert_eq!(b["label_set"]["team"], "a");
    assert_eq!(b["lifecycle_mode"], "ephemeral");
    assert_eq!(b["max_lifetime_s"], 3600);
    assert_eq!(b["idle_timeout_s"], 300);
    let id = b["id"].as_str().expect("id").to_owned();

    let (st, v) = api
        .admin(
            "POST",
            &format!("/bunkers/{id}/exec"),
            Some(json!({"command": "true"})),
        )
        .await;
    assert_eq!((st, code(&v)), (StatusCode::CONFLICT, "BUNKER_NOT_RUNNING"));
    let (st, v) = api
        .admin("PUT", &format!("/bunkers/{id}/files?path=/tmp/x"), None)
        .await;
    assert_eq!((st, code(&v)), (StatusCode::CONFLICT, "BUNKER_NOT_RUNNING"));
    // Deleting a bunker that already ended returns it unchanged.
    let (st, v) = api.admin("DELETE", &format!("/bunkers/{id}"), None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["data"]["status"], "failed");

    let audit: Vec<(String, String)> = sqlx::query_as(
        "SELECT action, status FROM audit_events WHERE resource_id = ? ORDER BY time",
    )
    .bind(&id)
    .fetch_all(api.handle.services.store.pool())
    .await
    .expect("audit rows");
    let actions: Vec<&str> = audit.iter().map(|(a, _)| a.as_str()).collect();
    assert_eq!(actions, ["bunker.create", "bunker.fail"]);
}

async fn exec_and_file_requests_are_validated_before_touching_the_bunker(db: Db) {
    let api = Api::start(db).await;
    api.register_dead_worker("dead", 8000, default_image())
        .await;
    let (_, v) = api
        .admin("POST", "/bunkers", Some(json!({"image": "default"})))
        .await;
    let id = v["data"]["id"].as_str().expect("id").to_owned();
    let table = [
        (json!({}), "command"),
        (json!({"command": "x", "argv": ["x"]}), "command"),
        (json!({"argv": []}), "command"),
        (json!({"command": "x", "timeout_s": 0}), "timeout_s"),
        // Seconds to milliseconds overflowed a u64 (a panic, or a wrapped tiny timeout).
        (json!({"command": "x", "timeout_s": u64::MAX}), "timeout_s"),
        (json!({"command": "x", "timeout_s": 2_592_001}), "timeout_s"),
        (
            json!({"command": "x", "stdin": "a", "stdin_b64": "YQ=="}),
            "stdin",
        ),
        (json!({"command": "x", "stdin_b64": "%%%"}), "stdin_b64"),
        (json!({"command": "x", "cwd": "relative"}), "cwd"),
        (json!({"command": "x", "nope": 1}), "nope"),
    ];
    for (body, field) in table {
        let (st, v) = api
            .admin("POST", &format!("/bunkers/{id}/exec"), Some(body.clone()))
            .await;
        assert_eq!(
            (st, code(&v)),
            (StatusCode::UNPROCESSABLE_ENTITY, "VALIDATION_ERROR"),
            "{body}"
        );
        assert!(v.to_string().contains(field), "{body}: {v}");
    }
    for path in ["relative", "", "a/../b"] {
        let (st, v) = api
            .admin("GET", &format!("/bunkers/{id}/files?path={path}"), None)
            .await;
        assert_eq!(
            (st, code(&v)),
            (StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PATH"),
            "{path:?}"
        );
    }
    let (st, v) = api
        .admin(
            "PUT",
            &format!("/bunkers/{id}/files?path=/x&mode=999"),
            None,
        )
        .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::UNPROCESSABLE_ENTITY, "VALIDATION_ERROR")
    );
}

async fn other_tenants_bunkers_are_not_found_and_permissions_are_enforced(db: Db) {
    let api = Api::start(db).await;
    api.register_dead_worker("dead", 8000, default_image())
        .await;
    let (_, v) = api
        .admin("POST", "/bunkers", Some(json!({"image": "default"})))
        .await;
    let id = v["data"]["id"].as_str().expect("id").to_owned();

    let other = api.tenant_key("other", "tenant_user").await;
    for (method, path, body) in [
        ("GET", format!("/bunkers/{id}"), None),
        ("DELETE", format!("/bunkers/{id}"), None),
        (
            "POST",
            format!("/bunkers/{id}/exec"),
            Some(json!({"command": "true"})),
        ),
        (
            "GET",
            format!("/bunkers/{id}/files?path=/etc/hostname"),
            None,
        ),
        ("GET", format!("/bunkers/{id}/files/list?path=/"), None),
        ("DELETE", format!("/bunkers/{id}/files?path=/tmp"), None),
        ("POST", format!("/bunkers/{id}/pause"), None),
        ("POST", format!("/bunkers/{id}/resume"), None),
        ("GET", format!("/bunkers/{id}/exec-log"), None),
        ("PUT", format!("/bunkers/{id}/files?path=/tmp/x"), None),
        ("GET", format!("/bunkers/{id}/shell"), None),
    ] {
        let (st, v) = api.call(method, &path, Some(&other), body).await;
        assert_eq!(
            (st, code(&v)),
            (StatusCode::NOT_FOUND, "BUNKER_NOT_FOUND"),
            "{method} {path}"
        );
    }
    let (_, v) = api.call("GET", "/bunkers", Some(&other), None).await;
    assert_eq!(v["data"].as_array().map(Vec::len), Some(0));
    // Nothing changed for the owner.
    let (_, v) = api.admin("GET", &format!("/bunkers/{id}"), None).await;
    assert_eq!(v["data"]["status"], "failed");

    // A tenant user lacks the session/persistent, network and root keys.
    let (st, v) = api
        .call(
            "POST",
            "/bunkers",
            Some(&other),
            Some(json!({"image": "default", "lifecycle_mode": "session"})),
        )
        .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::FORBIDDEN, "LIFECYCLE_MODE_DENIED")
    );
    let (st, v) = api
        .call(
            "POST",
            "/bunkers",
            Some(&other),
            Some(json!({"image": "default", "network_profile": "registry"})),
        )
        .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::FORBIDDEN, "NETWORK_PROFILE_DENIED")
    );
    let (st, v) = api
        .call(
            "POST",
            "/bunkers/bnk_x/exec",
            Some(&other),
            Some(json!({"command": "id", "user": "root"})),
        )
        .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::FORBIDDEN, "AUTHZ_PERMISSION_DENIED")
    );
    // A viewer reads but cannot create, exec or touch files.
    let viewer = api.tenant_key("viewer", "tenant_viewer").await;
    let (st, _) = api.call("GET", "/bunkers", Some(&viewer), None).await;
    assert_eq!(st, StatusCode::OK);
    for (method, path, body) in [
        (
            "POST",
            "/bunkers".to_owned(),
            Some(json!({"image": "default"})),
        ),
        (
            "POST",
            "/bunkers/bnk_x/exec".to_owned(),
            Some(json!({"command": "true"})),
        ),
        ("GET", "/bunkers/bnk_x/files?path=/x".to_owned(), None),
        ("DELETE", "/bunkers/bnk_x".to_owned(), None),
    ] {
        let (st, v) = api.call(method, &path, Some(&viewer), body).await;
        assert_eq!(
            (st, code(&v)),
            (StatusCode::FORBIDDEN, "AUTHZ_PERMISSION_DENIED"),
            "{method} {path}"
        );
    }
}

async fn listing_pages_with_cursors_and_filters(db: Db) {
    let api = Api::start(db).await;
    api.register_dead_worker("dead", 64_000, default_image())
        .await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let (_, v) = api
            .admin(
                "POST",
                "/bunkers",
                Some(json!({"image": "default", "label_set": {"n": i.to_string()}})),
            )
            .await;
        ids.push(v["data"]["id"].as_str().expect("id").to_owned());
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/bunkers?limit=2&cursor={c}"),
            None => "/bunkers?limit=2".to_owned(),
        };
        let (st, v) = api.admin("GET", &path, None).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        for b in v["data"].as_array().expect("data") {
            seen.push(b["id"].as_str().expect("id").to_owned());
        }
        assert_eq!(v["has_more"].as_bool(), Some(v["next_cursor"].is_string()));
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    ids.reverse();
    assert_eq!(seen, ids, "newest first, every bunker exactly once");

    let (_, v) = api.admin("GET", "/bunkers?label=n=3", None).await;
    assert_eq!(v["data"].as_array().map(Vec::len), Some(1));
    let (_, v) = api.admin("GET", "/bunkers?status=running", None).await;
    assert_eq!(v["data"].as_array().map(Vec::len), Some(0));
    let (st, v) = api.admin("GET", "/bunkers?limit=0", None).await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::UNPROCESSABLE_ENTITY, "VALIDATION_ERROR")
    );
    let (st, v) = api.admin("GET", "/bunkers?cursor=garbage", None).await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::UNPROCESSABLE_ENTITY, "VALIDATION_ERROR")
    );
    let (st, v) = api.admin("GET", "/bunkers/not-an-id", None).await;
    assert_eq!((st, code(&v)), (StatusCode::NOT_FOUND, "BUNKER_NOT_FOUND"));
}

async fn heartbeats_tell_workers_to_stop_vms_of_ended_bunkers(db: Db) {
    let api = Api::start(db).await;
    let wid = api
        .register_dead_worker("dead", 8000, default_image())
        .await;
    let (_, v) = api
        .admin("POST", "/bunkers", Some(json!({"image": "default"})))
        .await;
    let failed_id = v["data"]["id"].as_str().expect("id").to_owned();
    let hb = Heartbeat {
        worker_id: wid.clone(),
        capacity: Capacity::default(),
        active_bunkers: 2,
        bunkers: vec![
            scaibunker_proto::worker::BunkerStatusReport {
                id: failed_id.clone(),
                status: scaibunker_proto::worker::VmStatus::Running,
                reason: None,
            },
            scaibunker_proto::worker::BunkerStatusReport {
                id: "bnk_unknown".into(),
                status: scaibunker_proto::worker::VmStatus::Running,
                reason: None,
            },
        ],
        cached_images: Some(vec![]),
        image_failures: Vec::new(),
    };
    let (st, v) = api
        .worker_call("/heartbeat", serde_json::to_value(&hb).expect("json"))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["known"], true);
    let mut stop: Vec<&str> = v["stop_bunkers"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    stop.sort();
    assert_eq!(stop, vec![failed_id.as_str(), "bnk_unknown"]);
    // The reported cache list is authoritative: the worker no longer holds `default`.
    let (st, v) = api
        .admin("POST", "/bunkers", Some(json!({"image": "default"})))
        .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::SERVICE_UNAVAILABLE, "NO_SUITABLE_WORKER")
    );
    // A heartbeat for a worker nobody registered has no credential: the join token is no
    // credential, so it is refused (the worker then registers again).
    let mut hb2 = hb;
    hb2.worker_id = "wrk_gone".into();
    let (st, v) = api
        .worker_call("/heartbeat", serde_json::to_value(&hb2).expect("json"))
        .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::UNAUTHORIZED, "AUTH_TOKEN_INVALID")
    );
    // A worker speaking another protocol version is refused.
    let (st, v) = api
        .worker_call(
            "/workers/register",
            json!({"protocol_version": 99, "name": "x", "url": "http://127.0.0.1:1", "capacity": {"cpu_millicores": 1, "memory_mb": 1, "disk_mb": 1, "gpu_count": 0}, "images": [], "runtime": "qemu/tcg"}),
        )
        .await;
    assert_eq!((st, code(&v)), (StatusCode::CONFLICT, "PROTOCOL_MISMATCH"));
}

async fn a_second_start_on_the_same_data_dir_keeps_the_key_and_prints_none(db: Db) {
    let dir = tempfile::tempdir().expect("tempdir");
    let listen: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let database = db.create().await;
    let config = || {
        let mut c = ControllerConfig::embedded(dir.path().into(), listen, WORKER_TOKEN.into());
        c.database_url = database.url.clone();
        c
    };
    let first = start(config()).await.expect("start");
    let key = first.bootstrap_key.clone().expect("key");
    first.shutdown().await;
    let second = start(config()).await.expect("restart");
    assert!(second.bootstrap_key.is_none());
    let resp = reqwest::Client::new()
        .get(format!("{}/v1/modules/scaibunker/bunkers", second.url()))
        .bearer_auth(&key)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::OK);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("admin.key"))
        .expect("key file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

async fn pause_and_resume_follow_the_state_machine(db: Db) {
    let api = Api::start(db).await;
    api.register_dead_worker("dead", 8000, default_image())
        .await;
    let (_, v) = api
        .admin("POST", "/bunkers", Some(json!({"image": "default"})))
        .await;
    let id = v["data"]["id"].as_str().expect("id").to_owned();
    for verb in ["pause", "resume"] {
        let (st, v) = api
            .admin("POST", &format!("/bunkers/{id}/{verb}"), None)
            .await;
        assert_eq!(
            (st, code(&v)),
            (StatusCode::CONFLICT, "BUNKER_INVALID_TRANSITION"),
            "{verb} on a failed bunker"
        );
    }
    let (st, v) = api.admin("POST", "/bunkers/bnk_nope/pause", None).await;
    assert_eq!((st, code(&v)), (StatusCode::NOT_FOUND, "BUNKER_NOT_FOUND"));
}

async fn audit_and_exec_logs_are_tenant_scoped_and_filterable(db: Db) {
    let api = Api::start(db).await;
    api.register_dead_worker("dead", 8000, default_image())
        .await;
    let (_, v) = api
        .admin("POST", "/bunkers", Some(json!({"image": "default"})))
        .await;
    let id = v["data"]["id"].as_str().expect("id").to_owned();

    let (st, v) = api
        .admin("GET", &format!("/audit?resource_id={id}"), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let events = v["data"].as_array().expect("data");
    let mut actions: Vec<&str> = events.iter().filter_map(|e| e["action"].as_str()).collect();
    let times: Vec<&str> = events.iter().filter_map(|e| e["time"].as_str()).collect();
    assert!(
        times.windows(2).all(|w| w[0] >= w[1]),
        "newest first: {times:?}"
    );
    actions.sort();
    assert_eq!(actions, ["bunker.create", "bunker.fail"]);
    let (_, v) = api
        .admin("GET", "/audit?action=bunker.create&limit=1", None)
        .await;
    assert_eq!(v["data"][0]["actor_type"], "user");
    assert!(
        v["data"][0]["request_id"]
            .as_str()
            .is_some_and(|r| r.starts_with("req_"))
    );
    // The platform route serves the same events.
    let resp = api
        .http
        .get(format!(
            "{}/v1/audit-log?resource_id={id}",
            api.handle.url()
        ))
        .bearer_auth(&api.key)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value = resp.json().await.expect("json");
    assert_eq!(v["data"].as_array().map(Vec::len), Some(2));
    // A time window in the future holds nothing; a malformed time is a validation error.
    let (_, v) = api
        .admin("GET", "/audit?start=2999-01-01T00:00:00Z", None)
        .await;
    assert_eq!(v["data"].as_array().map(Vec::len), Some(0));
    let (st, v) = api.admin("GET", "/audit?start=yesterday", None).await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::UNPROCESSABLE_ENTITY, "VALIDATION_ERROR")
    );

    // Another tenant's admin sees none of it; a plain user may not read the audit log.
    let other_admin = api.tenant_key("otheradmin", "tenant_admin").await;
    let (st, v) = api.call("GET", "/audit", Some(&other_admin), None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["data"].as_array().map(Vec::len), Some(0));
    let user = api.tenant_key("plainuser", "tenant_user").await;
    let (st, v) = api.call("GET", "/audit", Some(&user), None).await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::FORBIDDEN, "AUTHZ_PERMISSION_DENIED")
    );

    let (st, v) = api
        .admin("GET", &format!("/bunkers/{id}/exec-log"), None)
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["data"].as_array().map(Vec::len), Some(0));
    let (st, v) = api
        .call("GET", &format!("/bunkers/{id}/exec-log"), Some(&user), None)
        .await;
    assert_eq!((st, code(&v)), (StatusCode::NOT_FOUND, "BUNKER_NOT_FOUND"));
}

async fn platform_routes_create_tenants_users_groups_and_revocable_keys(db: Db) {
    let api = Api::start(db).await;
    let platform = |path: &str| format!("{}/v1{path}", api.handle.url());
    let call = |method: &'static str, path: String, key: String, body: Option<Value>| {
        let http = api.http.clone();
        async move {
            let mut rb = http
                .request(method.parse().expect("method"), path)
                .bearer_auth(key);
            if let Some(b) = body {
                rb = rb.json(&b);
            }
            let resp = rb.send().await.expect("send");
            let st = resp.status();
            let v: Value = resp.json().await.unwrap_or(Value::Null);
            (st, v)
        }
    };
    let admin = api.key.clone();

    let (st, v) = call(
        "POST",
        platform("/tenants"),
        admin.clone(),
        Some(json!({"name": "Acme", "slug": "acme"})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let acme = v["data"]["id"].as_str().expect("tenant id").to_owned();
    assert!(acme.starts_with("tnt_"));
    let (st, v) = call(
        "POST",
        platform("/tenants"),
        admin.clone(),
        Some(json!({"name": "Again", "slug": "acme"})),
    )
    .await;
    assert_eq!((st, code(&v)), (StatusCode::CONFLICT, "CONFLICT"));
    let (st, v) = call(
        "POST",
        platform("/tenants"),
        admin.clone(),
        Some(json!({"name": "Bad", "slug": "Not OK"})),
    )
    .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::UNPROCESSABLE_ENTITY, "VALIDATION_ERROR")
    );
    let (_, v) = call("GET", platform("/tenants"), admin.clone(), None).await;
    assert_eq!(v["data"].as_array().map(Vec::len), Some(2));

    // The super admin makes Acme's first admin and mints its key.
    let (st, v) = call(
        "POST",
        platform("/users"),
        admin.clone(),
        Some(json!({"email": "boss@acme.test", "tenant_id": acme, "role": "tenant_admin"})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let boss = v["data"]["id"].as_str().expect("user id").to_owned();
    let (st, v) = call(
        "POST",
        platform("/api-keys"),
        admin.clone(),
        Some(json!({"name": "boss", "user_id": boss})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let boss_key = v["data"]["key"].as_str().expect("key").to_owned();
    assert!(boss_key.starts_with("sgk_") && boss_key.len() >= 36);

    // The tenant admin works inside Acme only.
    let (st, v) = call(
        "POST",
        platform("/users"),
        boss_key.clone(),
        Some(json!({"email": "dev@acme.test", "tenant_id": acme, "role": "tenant_user"})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let dev = v["data"]["id"].as_str().expect("user id").to_owned();
    let (st, v) = call(
        "POST",
        platform("/users"),
        boss_key.clone(),
        Some(json!({"email": "dev@acme.test", "tenant_id": acme, "role": "tenant_user"})),
    )
    .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::CONFLICT, "CONFLICT"),
        "duplicate e-mail"
    );
    let platform_tenant = api.handle.services.store.tenants().await.expect("tenants")[0]
        .id
        .clone();
    let (st, v) = call(
        "POST",
        platform("/users"),
        boss_key.clone(),
        Some(json!({"email": "x@y.z", "tenant_id": platform_tenant, "role": "tenant_user"})),
    )
    .await;
    assert_eq!((st, code(&v)), (StatusCode::NOT_FOUND, "TENANT_NOT_FOUND"));
    let (st, v) = call(
        "POST",
        platform("/users"),
        boss_key.clone(),
        Some(json!({"email": "x@acme.test", "tenant_id": acme, "role": "super_admin"})),
    )
    .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::FORBIDDEN, "AUTHZ_PERMISSION_DENIED")
    );
    let (st, v) = call(
        "POST",
        platform("/tenants"),
        boss_key.clone(),
        Some(json!({"name": "Mine", "slug": "mine"})),
    )
    .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::FORBIDDEN, "AUTHZ_PERMISSION_DENIED")
    );

    let (st, v) = call(
        "POST",
        platform("/groups"),
        boss_key.clone(),
        Some(json!({"name": "devs"})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let group = v["data"]["id"].as_str().expect("group id").to_owned();
    let (st, v) = call(
        "POST",
        platform(&format!("/groups/{group}/members")),
        boss_key.clone(),
        Some(json!({"user_id": dev})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["data"]["members"], json!([dev]));
    let (st, v) = call(
        "POST",
        platform(&format!("/groups/{group}/members")),
        boss_key.clone(),
        Some(json!({"user_id": boss.clone() + "x"})),
    )
    .await;
    assert_eq!((st, code(&v)), (StatusCode::NOT_FOUND, "USER_NOT_FOUND"));
    // The platform admin's group is not Acme's.
    let (st, v) = call(
        "POST",
        platform(&format!("/groups/{group}/members")),
        admin.clone(),
        Some(json!({"user_id": dev})),
    )
    .await;
    assert_eq!((st, code(&v)), (StatusCode::NOT_FOUND, "GROUP_NOT_FOUND"));

    // A key for the developer, narrowed to reading: it lists bunkers but cannot exec, and
    // cannot mint itself a broader key.
    let (st, v) = call(
        "POST",
        platform("/api-keys"),
        boss_key.clone(),
        Some(json!({"name": "ro", "user_id": dev, "permissions": ["scaibunker:create"]})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let dev_key = v["data"]["key"].as_str().expect("key").to_owned();
    let dev_key_id = v["data"]["id"].as_str().expect("id").to_owned();
    let (st, _) = api.call("GET", "/bunkers", Some(&dev_key), None).await;
    assert_eq!(st, StatusCode::OK);
    let (st, v) = api
        .call(
            "POST",
            "/bunkers/bnk_x/exec",
            Some(&dev_key),
            Some(json!({"command": "id"})),
        )
        .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::FORBIDDEN, "AUTHZ_PERMISSION_DENIED")
    );
    let (st, v) = call(
        "POST",
        platform("/api-keys"),
        dev_key.clone(),
        Some(json!({"name": "wider", "permissions": ["scaibunker:create", "scaibunker:execute"]})),
    )
    .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::FORBIDDEN, "AUTHZ_PERMISSION_DENIED")
    );
    let (st, v) = call(
        "POST",
        platform("/api-keys"),
        dev_key.clone(),
        Some(json!({"name": "same"})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED);
    assert_eq!(
        v["data"]["permissions"],
        json!(["scaibunker:create"]),
        "stays as narrow as its parent"
    );

    // Listing shows keys without secrets; revocation is effective on the next request.
    let (_, v) = call("GET", platform("/api-keys"), boss_key.clone(), None).await;
    let listed = v["data"].as_array().expect("keys");
    assert!(listed.iter().any(|k| k["id"] == dev_key_id.as_str()));
    assert!(!v.to_string().contains(&dev_key));
    let (_, v) = call("GET", platform("/api-keys"), dev_key.clone(), None).await;
    assert!(
        v["data"]
            .as_array()
            .expect("keys")
            .iter()
            .all(|k| k["user_id"] == dev.as_str())
    );
    let (st, _) = call(
        "DELETE",
        platform(&format!("/api-keys/{dev_key_id}")),
        boss_key.clone(),
        None,
    )
    .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, v) = api.call("GET", "/bunkers", Some(&dev_key), None).await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::UNAUTHORIZED, "AUTH_TOKEN_INVALID")
    );
    // Every platform change left an audit event in Acme's log (its creation included).
    let (_, v) = call(
        "GET",
        platform("/audit-log?limit=500"),
        boss_key.clone(),
        None,
    )
    .await;
    let mut actions: Vec<&str> = v["data"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    actions.sort();
    actions.dedup();
    let want = [
        "api_key.create",
        "api_key.revoke",
        "group.create",
        "group.member.add",
        "tenant.create",
        "user.create",
    ];
    assert_eq!(actions, want);
    // To a tenant admin another tenant's key id is not found (a super admin reaches it).
    let (_, v) = call("GET", platform("/api-keys"), admin.clone(), None).await;
    let root_key_id = v["data"][0]["id"].as_str().expect("key id").to_owned();
    let (st, v) = call(
        "DELETE",
        platform(&format!("/api-keys/{root_key_id}")),
        boss_key.clone(),
        None,
    )
    .await;
    assert_eq!((st, code(&v)), (StatusCode::NOT_FOUND, "API_KEY_NOT_FOUND"));
}

async fn metrics_count_requests_by_route_and_bunkers_by_status(db: Db) {
    let api = Api::start(db).await;
    api.register_dead_worker("dead", 8000, default_image())
        .await;
    let (_, v) = api
        .admin("POST", "/bunkers", Some(json!({"image": "default"})))
        .await;
    let id = v["data"]["id"].as_str().expect("id").to_owned();
    for _ in 0..3 {
        api.admin("GET", &format!("/bunkers/{id}"), None).await;
    }
    api.call("GET", "/bunkers", None, None).await;
    let text = reqwest::get(format!("{}/metrics", api.handle.url()))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    let route = "route=\"/v1/modules/scaibunker/bunkers/{id}\",method=\"GET\",status=\"200\"";
    assert!(
        text.contains(&format!("scaibunker_http_requests_total{{{route}}} 3")),
        "{text}"
    );
    assert!(text.contains(&format!(
        "scaibunker_http_request_duration_seconds_count{{{route}}} 3"
    )));
    assert!(text.contains(
        "scaibunker_http_requests_total{route=\"/v1/modules/scaibunker/bunkers\",method=\"GET\",status=\"401\"} 1"
    ));
    assert!(
        text.contains("scaibunker_bunkers{status=\"failed\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("scaibunker_workers{status=\"online\"} 1"),
        "{text}"
    );
}

async fn admins_list_drain_and_resume_workers(db: Db) {
    let api = Api::start(db).await;
    let wid = api.register_dead_worker("w1", 8000, default_image()).await;
    let (st, v) = api.admin("GET", "/workers", None).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["data"][0]["id"], wid.as_str());
    assert_eq!(v["data"][0]["status"], "online");
    assert_eq!(v["data"][0]["cached_images"], json!(["a".repeat(64)]));
    assert_eq!(v["data"][0]["capacity"]["memory_mb"], 8000);

    let (st, v) = api
        .admin("POST", &format!("/workers/{wid}/drain"), None)
        .await;
    assert_eq!(
        (st, v["data"]["status"].as_str()),
        (StatusCode::OK, Some("draining"))
    );
    // With every worker draining no worker is available: wait or add one (before, this said
    // NO_SUITABLE_WORKER, whose remedy, warming the image, does not help).
    let (st, v) = api
        .admin("POST", "/bunkers", Some(json!({"image": "default"})))
        .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::SERVICE_UNAVAILABLE, "WORKER_UNAVAILABLE")
    );
    // A draining worker that re-registers (restarts) stays draining.
    api.register_dead_worker("w1", 8000, default_image()).await;
    let (_, v) = api.admin("GET", &format!("/workers/{wid}"), None).await;
    assert_eq!(v["data"]["status"], "draining");
    let (st, v) = api
        .admin("POST", &format!("/workers/{wid}/resume"), None)
        .await;
    assert_eq!(
        (st, v["data"]["status"].as_str()),
        (StatusCode::OK, Some("online"))
    );
    let (st, _) = api
        .admin("POST", "/bunkers", Some(json!({"image": "default"})))
        .await;
    assert_eq!(st, StatusCode::CREATED, "placed again after resume");

    let (st, v) = api.admin("GET", "/workers/wrk_nope", None).await;
    assert_eq!((st, code(&v)), (StatusCode::NOT_FOUND, "WORKER_NOT_FOUND"));
    let tenant_admin = api.tenant_key("tadmin", "tenant_admin").await;
    for (method, path) in [
        ("GET", "/workers".to_owned()),
        ("GET", format!("/workers/{wid}")),
        ("POST", format!("/workers/{wid}/drain")),
    ] {
        let (st, v) = api.call(method, &path, Some(&tenant_admin), None).await;
        assert_eq!(
            (st, code(&v)),
            (StatusCode::FORBIDDEN, "AUTHZ_PERMISSION_DENIED"),
            "{path}"
        );
    }
}

async fn every_route_refuses_a_key_without_its_permission(db: Db) {
    let api = Api::start(db).await;
    let wid = api
        .register_dead_worker("dead", 8000, default_image())
        .await;
    let (_, v) = api
        .admin("POST", "/bunkers", Some(json!({"image": "default"})))
        .await;
    let id = v["data"]["id"].as_str().expect("id").to_owned();
    // The super admin's own key, narrowed to a permission no route below needs.
    let resp = api
        .http
        .post(format!("{}/v1/api-keys", api.handle.url()))
        .bearer_auth(&api.key)
        .json(&json!({"name": "narrow", "permissions": ["scaibunker:shell"]}))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::CREATED);
    let v: Value = resp.json().await.expect("json");
    let narrow = v["data"]["key"].as_str().expect("key").to_owned();
    let module: Vec<(&str, String, Option<Value>)> = vec![
        ("POST", "/bunkers".into(), Some(json!({"image": "default"}))),
        ("GET", "/bunkers".into(), None),
        ("GET", format!("/bunkers/{id}"), None),
        ("DELETE", format!("/bunkers/{id}"), None),
        ("POST", format!("/bunkers/{id}/pause"), None),
        ("POST", format!("/bunkers/{id}/resume"), None),
        (
            "POST",
            format!("/bunkers/{id}/exec"),
            Some(json!({"command": "true"})),
        ),
        ("GET", format!("/bunkers/{id}/exec-log"), None),
        ("PUT", format!("/bunkers/{id}/files?path=/tmp/x"), None),
        ("GET", format!("/bunkers/{id}/files?path=/tmp/x"), None),
        ("GET", format!("/bunkers/{id}/files/list?path=/tmp"), None),
        ("DELETE", format!("/bunkers/{id}/files?path=/tmp/x"), None),
        ("GET", "/audit".into(), None),
        ("GET", "/workers".into(), None),
        ("GET", format!("/workers/{wid}"), None),
        ("POST", format!("/workers/{wid}/drain"), None),
        ("POST", format!("/workers/{wid}/resume"), None),
        ("POST", "/quota-profiles".into(), Some(json!({"name": "q"}))),
        ("GET", "/quota-profiles".into(), None),
        ("GET", "/quota-profiles/usage".into(), None),
        ("GET", "/quota-profiles/qp_x".into(), None),
        (
            "PATCH",
            "/quota-profiles/qp_x".into(),
            Some(json!({"name": "q"})),
        ),
        ("DELETE", "/quota-profiles/qp_x".into(), None),
        (
            "POST",
            "/quota-profiles/qp_x/assignments".into(),
            Some(json!({"target_kind": "user", "target_id": "usr_x", "mode": "individual"})),
        ),
        ("GET", "/quota-profiles/qp_x/assignments".into(), None),
        (
            "DELETE",
            "/quota-profiles/qp_x/assignments/qpa_x".into(),
            None,
        ),
    ];
    for (method, path, body) in module {
        let (st, v) = api.call(method, &path, Some(&narrow), body).await;
        assert_eq!(
            (st, code(&v)),
            (StatusCode::FORBIDDEN, "AUTHZ_PERMISSION_DENIED"),
            "{method} {path}"
        );
    }
    let platform: Vec<(&str, &str, Option<Value>)> = vec![
        (
            "POST",
            "/v1/tenants",
            Some(json!({"name": "x", "slug": "x"})),
        ),
        ("GET", "/v1/tenants", None),
        (
            "POST",
            "/v1/users",
            Some(json!({"email": "a@b.c", "tenant_id": "tnt_x", "role": "tenant_user"})),
        ),
        ("POST", "/v1/groups", Some(json!({"name": "g"}))),
        (
            "POST",
            "/v1/groups/grp_x/members",
            Some(json!({"user_id": "usr_x"})),
        ),
        ("GET", "/v1/audit-log", None),
        ("GET", "/v1/accounting/usage", None),
    ];
    for (method, path, body) in platform {
        let mut rb = api
            .http
            .request(
                method.parse().expect("method"),
                format!("{}{path}", api.handle.url()),
            )
            .bearer_auth(&narrow);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let resp = rb.send().await.expect("send");
        let st = resp.status();
        let v: Value = resp.json().await.expect("json");
        assert_eq!(
            (st, code(&v)),
            (StatusCode::FORBIDDEN, "AUTHZ_PERMISSION_DENIED"),
            "{method} {path}"
        );
    }
    // Nothing changed: the bunker is still there, the worker still online.
    let (_, v) = api.admin("GET", &format!("/bunkers/{id}"), None).await;
    assert_eq!(v["data"]["status"], "failed");
    let (_, v) = api.admin("GET", &format!("/workers/{wid}"), None).await;
    assert_eq!(v["data"]["status"], "online");
}

/// Every heartbeat that carries `cached_images` reconciles the worker's image ledger: an image
/// it lost is evicted (and no longer placed there), one it gained is added, and a heartbeat
/// without the list leaves the ledger alone. The heartbeats come back to back, inside the
/// window in which capacity is not rewritten durably.
async fn heartbeats_heal_the_worker_image_ledger(db: Db) {
    let api = Api::start(db).await;
    let wid = api.register_dead_worker("w1", 8000, default_image()).await;
    let (a, b) = ("a".repeat(64), "b".repeat(64));
    let beat = |cached: Option<Vec<String>>| {
        serde_json::to_value(Heartbeat {
            worker_id: wid.clone(),
            capacity: Capacity::default(),
            active_bunkers: 0,
            bunkers: vec![],
            cached_images: cached,
            image_failures: Vec::new(),
        })
        .expect("json")
    };
    let ledger = || async {
        let (st, v) = api.admin("GET", &format!("/workers/{wid}"), None).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        v["data"]["cached_images"].clone()
    };

    // The worker lost `default` (deleted by hand): evicted, and nothing else holds it.
    let (st, v) = api.worker_call("/heartbeat", beat(Some(vec![]))).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(ledger().await, json!([]));
    let (st, v) = api
        .admin("POST", "/bunkers", Some(json!({"image": "default"})))
        .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::SERVICE_UNAVAILABLE, "NO_SUITABLE_WORKER"),
        "{v}"
    );

    // It fetched `default` again and something else: both added, `default` placeable again.
    let (st, v) = api
        .worker_call("/heartbeat", beat(Some(vec![b.clone(), a.clone()])))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(ledger().await, json!([a, b]));
    let (st, v) = api
        .admin("POST", "/bunkers", Some(json!({"image": "default"})))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");

    // No list: no change. A shorter list: only the missing hash goes.
    let (st, _) = api.worker_call("/heartbeat", beat(None)).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(ledger().await, json!([a, b]));
    let (st, _) = api
        .worker_call("/heartbeat", beat(Some(vec![a.clone()])))
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(ledger().await, json!([a]));

    // A heartbeat from a worker the controller does not know has no credential: refused,
    // and it records nothing.
    let mut stranger = beat(Some(vec![b.clone()]));
    stranger["worker_id"] = json!("wrk_stranger");
    let (st, v) = api.worker_call("/heartbeat", stranger).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{v}");
    assert_eq!(ledger().await, json!([a]));
}

/// The shell route authenticates by header or `?token=`, checks its permission and the
/// bunker, and only then asks for the WebSocket upgrade (the real sessions are end to end).
async fn the_shell_route_takes_a_query_token_and_checks_before_upgrading(db: Db) {
    let api = Api::start(db).await;
    api.register_dead_worker("dead", 8000, default_image())
        .await;
    let (_, v) = api
        .admin("POST", "/bunkers", Some(json!({"image": "default"})))
        .await;
    let id = v["data"]["id"].as_str().expect("id").to_owned();
    let shell = format!("/bunkers/{id}/shell");
    let key = api.key.clone();

    let (st, v) = api.call("GET", &shell, None, None).await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::UNAUTHORIZED, "AUTH_TOKEN_MISSING")
    );
    let (st, v) = api
        .call("GET", &format!("{shell}?token=sgk_not_a_key"), None, None)
        .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::UNAUTHORIZED, "AUTH_TOKEN_INVALID")
    );
    // The query token is the caller: the (failed) bunker is found and refused as not running.
    let (st, v) = api
        .call("GET", &format!("{shell}?token={key}"), None, None)
        .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::CONFLICT, "BUNKER_NOT_RUNNING"),
        "{v}"
    );
    let (st, v) = api
        .call("GET", &format!("{shell}?cols=0&token={key}"), None, None)
        .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::UNPROCESSABLE_ENTITY, "VALIDATION_ERROR")
    );
    assert_eq!(v["error"]["details"][0]["field"], "cols", "{v}");
    let (st, v) = api
        .call("GET", &format!("{shell}?colour=red"), Some(&key), None)
        .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::UNPROCESSABLE_ENTITY, "VALIDATION_ERROR")
    );

    // A key without `scaibunker:shell` (a viewer) is refused before the bunker is looked at;
    // root needs `scaibunker:root`.
    let viewer = api.tenant_key("viewer", "tenant_viewer").await;
    let (st, v) = api.call("GET", &shell, Some(&viewer), None).await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::FORBIDDEN, "AUTHZ_PERMISSION_DENIED")
    );
    let user = api.tenant_key("user", "tenant_user").await;
    let (st, v) = api
        .call("GET", &format!("{shell}?user=root"), Some(&user), None)
        .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::FORBIDDEN, "AUTHZ_PERMISSION_DENIED")
    );
}

/// A tarball of a tiny root filesystem: `bin/hello` (0755) and `etc/motd`.
fn rootfs_tar(extra: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8], mode: u32| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_entry_type(tar::EntryType::Regular);
        let raw = &mut h.as_old_mut().name;
        raw[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        b.append(&h, data).expect("append");
    };
    add("bin/hello", b"#!/bin/sh\necho hello\n", 0o755);
    add("etc/motd", b"baked\n", 0o644);
    for (name, data) in extra {
        add(name, data, 0o644);
    }
    b.into_inner().expect("tar")
}

impl Api {
    async fn put_content(&self, key: &str, id: &str, bytes: Vec<u8>) -> (StatusCode, Value) {
        let resp = self
            .http
            .put(self.url(&format!("/images/{id}/content")))
            .bearer_auth(key)
            .body(bytes)
            .send()
            .await
            .expect("put");
        let status = resp.status();
        (status, resp.json().await.expect("json"))
    }

    async fn heartbeat_images(
        &self,
        worker_id: &str,
        cached: Vec<String>,
        failures: Vec<scaibunker_proto::worker::ImageFailure>,
    ) -> scaibunker_proto::worker::HeartbeatResponse {
        let hb = Heartbeat {
            worker_id: worker_id.into(),
            capacity: Capacity::default(),
            active_bunkers: 0,
            bunkers: vec![],
            cached_images: Some(cached),
            image_failures: failures,
        };
        let (st, v) = self
            .worker_call("/heartbeat", serde_json::to_value(hb).expect("json"))
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        serde_json::from_value(v).expect("heartbeat response")
    }

    async fn peers(&self, worker_id: &str, sha: &str) -> Vec<String> {
        let (st, v) = self
            .call(
                "GET",
                &format!("/peers/{sha}?worker_id={worker_id}"),
                Some(&self.credential(worker_id)),
                None,
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        v["peers"]
            .as_array()
            .expect("peers")
            .iter()
            .map(|p| p["worker_id"].as_str().expect("id").to_owned())
            .collect()
    }
}

/// A tarball uploaded to a new image is baked into ext4 (stored through the storage proxy,
/// its hash recorded) and fanned out through an availability group: its workers are asked to
/// pull it in heartbeat answers until they report it, failures are recorded and retried by a
/// warm, a worker added later is asked too, and peers are the group's workers that hold it.
async fn images_bake_and_fan_out_through_availability_groups(db: Db) {
    let api = Api::start(db).await;
    let (st, v) = api
        .admin(
            "POST",
            "/images",
            Some(json!({"name": "hello", "source": {"kind": "tar"}, "size_mib": 16, "default_memory_mb": 256})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["data"]["status"], "pending");
    let id = v["data"]["id"].as_str().expect("id").to_owned();

    let (st, v) = api
        .put_content(&api.key.clone(), &id, rootfs_tar(&[]))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let img = &v["data"];
    assert_eq!(img["status"], "ready", "{v}");
    let sha = img["sha256"].as_str().expect("sha").to_owned();
    assert_eq!(img["size_bytes"], 16 << 20);
    // The baked bytes are in object storage under the image, and hash to the recorded sha.
    let resp = api
        .http
        .get(api.url(&format!("/storage/objects/images/{id}/rootfs.ext4")))
        .bearer_auth(api.storage_worker())
        .send()
        .await
        .expect("get");
    assert_eq!(resp.status(), StatusCode::OK);
    let bytes = resp.bytes().await.expect("bytes");
    use sha2::Digest as _;
    assert_eq!(hex::encode(sha2::Sha256::digest(&bytes)), sha);
    assert_eq!(&bytes[1080..1082], &[0x53, 0xEF], "ext4 magic");
    // The source is gone once baked; a second upload is refused.
    assert!(
        api.handle
            .services
            .objects()
            .head(&format!("images/{id}/source"))
            .await
            .is_err()
    );
    let (st, v) = api
        .put_content(&api.key.clone(), &id, rootfs_tar(&[]))
        .await;
    assert_eq!((st, code(&v)), (StatusCode::CONFLICT, "IMAGE_NOT_PENDING"));

    // A group with one worker; adding the image queues it there.
    let w1 = api.register_dead_worker("w1", 8000, vec![]).await;
    let w2 = api.register_dead_worker("w2", 8000, vec![]).await;
    let (st, v) = api
        .admin("POST", "/availability-groups", Some(json!({"name": "eu"})))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let g = v["data"]["id"].as_str().expect("id").to_owned();
    let (st, v) = api
        .admin("POST", "/availability-groups", Some(json!({"name": "eu"})))
        .await;
    assert_eq!((st, code(&v)), (StatusCode::CONFLICT, "NAME_TAKEN"));
    let (st, _) = api
        .admin(
            "POST",
            &format!("/availability-groups/{g}/workers/{w1}"),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let (st, v) = api
        .admin(
            "POST",
            &format!("/availability-groups/{g}/images/{id}"),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["data"]["worker_ids"], json!([w1]));
    assert_eq!(v["data"]["image_ids"], json!([id]));
    let (_, v) = api.admin("GET", &format!("/images/{id}"), None).await;
    assert_eq!(
        v["data"]["warm"],
        json!({"queued": 1, "ready": 0, "failed": 0, "skipped": 0})
    );

    // The queued pull rides every heartbeat answer until the worker reports the image.
    let answer = api.heartbeat_images(&w1, vec![], vec![]).await;
    assert_eq!(answer.pull_images.len(), 1);
    assert_eq!(answer.pull_images[0].sha256, sha);
    assert_eq!(answer.pull_images[0].size_bytes, 16 << 20);
    let key = format!("images/{id}/rootfs.ext4");
    assert_eq!(
        answer.pull_images[0].object_key.as_deref(),
        Some(key.as_str())
    );
    let answer = api.heartbeat_images(&w1, vec![], vec![]).await;
    assert_eq!(answer.pull_images.len(), 1, "still owed");
    let answer = api.heartbeat_images(&w1, vec![sha.clone()], vec![]).await;
    assert!(answer.pull_images.is_empty());
    let (_, v) = api.admin("GET", &format!("/images/{id}"), None).await;
    assert_eq!(v["data"]["warm"]["ready"], 1);
    assert_eq!(v["data"]["workers"][0]["worker_id"], json!(w1));
    assert_eq!(v["data"]["workers"][0]["state"], "ready");

    // A worker added later is asked for every image of the group; its peer is w1.
    let (st, _) = api
        .admin(
            "POST",
            &format!("/availability-groups/{g}/workers/{w2}"),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(api.peers(&w2, &sha).await, vec![w1.clone()]);
    assert!(
        api.peers(&w1, &sha).await.is_empty(),
        "w2 holds nothing yet"
    );
    let answer = api.heartbeat_images(&w2, vec![], vec![]).await;
    assert_eq!(answer.pull_images.len(), 1);

    // Its pull fails: recorded with the reason, no longer asked; a warm asks again.
    let failure = scaibunker_proto::worker::ImageFailure {
        sha256: sha.clone(),
        reason: "disk full".into(),
    };
    let answer = api.heartbeat_images(&w2, vec![], vec![failure]).await;
    assert!(answer.pull_images.is_empty());
    let (_, v) = api.admin("GET", &format!("/images/{id}"), None).await;
    assert_eq!(
        v["data"]["warm"],
        json!({"queued": 0, "ready": 1, "failed": 1, "skipped": 0})
    );
    let w2_state = v["data"]["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .find(|w| w["worker_id"] == json!(w2))
        .expect("w2")
        .clone();
    assert_eq!(
        (w2_state["state"].as_str(), w2_state["error"].as_str()),
        (Some("failed"), Some("disk full"))
    );
    let (st, v) = api.admin("POST", &format!("/images/{id}/warm"), None).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["data"]["warm"]["queued"], 1);
    let answer = api.heartbeat_images(&w2, vec![sha.clone()], vec![]).await;
    assert!(answer.pull_images.is_empty());
    assert_eq!(api.peers(&w1, &sha).await, vec![w2.clone()]);

    // A worker outside the group has no peers; a stranger's digest has none either.
    let w3 = api.register_dead_worker("w3", 8000, vec![]).await;
    assert!(api.peers(&w3, &sha).await.is_empty());
    assert!(api.peers(&w2, &"c".repeat(64)).await.is_empty());
    let (st, v) = api
        .call(
            "GET",
            &format!("/peers/nothex?worker_id={w1}"),
            Some(&api.credential(&w1)),
            None,
        )
        .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::UNPROCESSABLE_ENTITY, "VALIDATION_ERROR")
    );

    // The baked image is bootable by name: placement picks a worker holding it.
    let (st, v) = api
        .admin(
            "POST",
            "/bunkers",
            Some(json!({"image": "hello", "wait": false})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert!(
        [w1.clone(), w2.clone()].contains(
            &v["data"]["worker_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        ),
        "{v}"
    );
    assert_eq!(v["data"]["memory_mb"], 256, "the image's default memory");

    // Removing members and deleting the group leaves the caches alone.
    let (st, v) = api
        .admin(
            "DELETE",
            &format!("/availability-groups/{g}/workers/{w2}"),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["data"]["worker_ids"], json!([w1]));
    let (st, _) = api
        .admin("DELETE", &format!("/availability-groups/{g}"), None)
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, v) = api
        .admin("GET", &format!("/availability-groups/{g}"), None)
        .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::NOT_FOUND, "AVAILABILITY_GROUP_NOT_FOUND")
    );
    let (_, v) = api.admin("GET", &format!("/images/{id}"), None).await;
    assert_eq!(v["data"]["warm"]["ready"], 2);

    // Deactivated: no new bunkers from it.
    let (st, v) = api
        .admin("POST", &format!("/images/{id}/deactivate"), None)
        .await;
    assert_eq!(
        (st, v["data"]["status"].as_str()),
        (StatusCode::OK, Some("inactive"))
    );
    let (st, v) = api
        .admin("POST", "/bunkers", Some(json!({"image": "hello"})))
        .await;
    assert_eq!((st, code(&v)), (StatusCode::NOT_FOUND, "IMAGE_NOT_FOUND"));
}

/// Bad image content is refused with a clear code and leaves nothing behind: not a tarball,
/// a member escaping the root, files that do not fit, an ext4 over its size, a non-ext4;
/// the image can take a good upload afterwards.
async fn bad_image_content_is_refused_and_nothing_is_kept(db: Db) {
    let api = Api::start(db).await;
    let key = api.key.clone();
    let create = |name: &'static str, kind: &'static str, size: u64| {
        let api = &api;
        async move {
            let (st, v) = api
                .admin(
                    "POST",
                    "/images",
                    Some(json!({"name": name, "source": {"kind": kind}, "size_mib": size})),
                )
                .await;
            assert_eq!(st, StatusCode::CREATED, "{v}");
            v["data"]["id"].as_str().expect("id").to_owned()
        }
    };
    let id = create("t", "tar", 16).await;
    let (st, v) = api.put_content(&key, &id, vec![7u8; 8192]).await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::UNPROCESSABLE_ENTITY, "IMAGE_CONTENT_INVALID"),
        "{v}"
    );
    let (_, v) = api.admin("GET", &format!("/images/{id}"), None).await;
    assert_eq!(v["data"]["status"], "failed");
    assert!(
        v["data"]["error"]
            .as_str()
            .expect("error")
            .contains("tarball"),
        "{v}"
    );
    let (st, v) = api
        .put_content(&key, &id, rootfs_tar(&[("../../etc/evil", b"x")]))
        .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::UNPROCESSABLE_ENTITY, "IMAGE_CONTENT_INVALID")
    );
    assert!(
        v["error"]["message"].as_str().expect("msg").contains(".."),
        "{v}"
    );
    let big = vec![1u8; 17 << 20];
    let (st, v) = api
        .put_content(&key, &id, rootfs_tar(&[("big", &big)]))
        .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::UNPROCESSABLE_ENTITY, "IMAGE_CONTENT_INVALID")
    );
    // Nothing of the refused uploads is stored.
    let listing = api
        .handle
        .services
        .objects()
        .list(&format!("images/{id}/"))
        .await
        .expect("list");
    assert!(listing.is_empty(), "{listing:?}");
    // A good upload after all that: ready.
    let (st, v) = api.put_content(&key, &id, rootfs_tar(&[])).await;
    assert_eq!(
        (st, v["data"]["status"].as_str()),
        (StatusCode::OK, Some("ready")),
        "{v}"
    );

    let ext = create("e", "ext4", 16).await;
    let (st, v) = api.put_content(&key, &ext, vec![0u8; 17 << 20]).await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::PAYLOAD_TOO_LARGE, "IMAGE_TOO_LARGE"),
        "{v}"
    );
    let (st, v) = api.put_content(&key, &ext, vec![0u8; 1 << 20]).await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::UNPROCESSABLE_ENTITY, "IMAGE_CONTENT_INVALID"),
        "{v}"
    );

    // Refused at creation: oci, bad names, taken names, bad sizes and scopes.
    let bad = [
        (
            json!({"name": "o", "source": {"kind": "oci"}}),
            "IMAGE_SOURCE_UNSUPPORTED",
        ),
        (
            json!({"name": "Bad Name", "source": {"kind": "tar"}}),
            "VALIDATION_ERROR",
        ),
        (
            json!({"name": "x", "source": {"kind": "zip"}}),
            "VALIDATION_ERROR",
        ),
        (
            json!({"name": "x", "source": {"kind": "tar"}, "size_mib": 1}),
            "VALIDATION_ERROR",
        ),
        (
            json!({"name": "x", "source": {"kind": "tar"}, "scope": "galaxy"}),
            "VALIDATION_ERROR",
        ),
        (
            // A request the schema allows, refused for the caller's tenant's state.
            json!({"name": "x", "source": {"kind": "tar"}, "scope": "partner"}),
            "TENANT_HAS_NO_PARTNER",
        ),
        (
            // Shaped like an id: `image` at create takes an id or a name.
            json!({"name": "img_0123456789abcdef", "source": {"kind": "tar"}}),
            "VALIDATION_ERROR",
        ),
    ];
    for (body, want) in bad {
        let (st, v) = api.admin("POST", "/images", Some(body.clone())).await;
        assert_eq!(code(&v), want, "{body} → {st} {v}");
    }
    let (st, v) = api
        .admin(
            "POST",
            "/images",
            Some(json!({"name": "t", "source": {"kind": "tar"}})),
        )
        .await;
    assert_eq!((st, code(&v)), (StatusCode::CONFLICT, "NAME_TAKEN"));
}

/// Tenants see their own, their partner's and the platform's images only; managing needs
/// `scaibunker:images:manage` on one's own image, platform scope and availability groups
/// need the platform admin.
async fn images_are_tenant_scoped_and_permissioned(db: Db) {
    let api = Api::start(db).await;
    let (st, v) = api
        .admin(
            "POST",
            "/images",
            Some(json!({"name": "base", "source": {"kind": "tar"}, "scope": "platform", "size_mib": 16})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let platform_img = v["data"]["id"].as_str().expect("id").to_owned();
    assert_eq!(v["data"]["tenant_id"], Value::Null);

    let acme = api.tenant_key("acme", "tenant_admin").await;
    let globex = api.tenant_key("globex", "tenant_admin").await;
    let acme_user = api.tenant_key("acmeuser", "tenant_user").await;
    let (st, v) = api
        .call(
            "POST",
            "/images",
            Some(&acme),
            Some(json!({"name": "mine", "source": {"kind": "tar"}, "size_mib": 16})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let acme_img = v["data"]["id"].as_str().expect("id").to_owned();

    // Visibility.
    let names = |v: &Value| -> Vec<String> {
        v["data"]
            .as_array()
            .expect("list")
            .iter()
            .map(|i| i["name"].as_str().expect("name").to_owned())
            .collect()
    };
    let (_, v) = api.call("GET", "/images", Some(&globex), None).await;
    assert!(
        names(&v).contains(&"base".to_owned()) && !names(&v).contains(&"mine".to_owned()),
        "{v}"
    );
    let (st, v) = api
        .call("GET", &format!("/images/{acme_img}"), Some(&globex), None)
        .await;
    assert_eq!((st, code(&v)), (StatusCode::NOT_FOUND, "IMAGE_NOT_FOUND"));
    // Per-worker cache states are the fleet's: a platform admin sees them, a tenant sees the
    // `warm` counts only (no worker ids, no pull errors).
    let (_, v) = api
        .admin("GET", &format!("/images/{platform_img}"), None)
        .await;
    assert!(v["data"]["workers"].is_array(), "{v}");
    let (st, v) = api
        .call(
            "GET",
            &format!("/images/{platform_img}"),
            Some(&globex),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(v["data"]["warm"].is_object(), "{v}");
    assert!(v["data"].get("workers").is_none_or(Value::is_null), "{v}");
    let (st, v) = api
        .call(
            "PUT",
            &format!("/images/{acme_img}/content"),
            Some(&globex),
            None,
        )
        .await;
    assert_eq!((st, code(&v)), (StatusCode::NOT_FOUND, "IMAGE_NOT_FOUND"));
    // Same names in different tenants do not clash.
    let (st, _) = api
        .call(
            "POST",
            "/images",
            Some(&globex),
            Some(json!({"name": "mine", "source": {"kind": "tar"}, "size_mib": 16})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED);

    // Permissions.
    let denied = [
        (
            "POST",
            "/images".to_owned(),
            Some(json!({"name": "u", "source": {"kind": "tar"}})),
            &acme_user,
        ),
        (
            "POST",
            "/images".to_owned(),
            Some(json!({"name": "p", "source": {"kind": "tar"}, "scope": "platform"})),
            &acme,
        ),
        (
            "PUT",
            format!("/images/{platform_img}/content"),
            None,
            &acme,
        ),
        (
            "POST",
            format!("/images/{platform_img}/deactivate"),
            None,
            &acme,
        ),
        (
            "POST",
            format!("/images/{acme_img}/deactivate"),
            None,
            &acme_user,
        ),
        (
            "POST",
            "/availability-groups".to_owned(),
            Some(json!({"name": "g"})),
            &acme,
        ),
        ("GET", "/availability-groups".to_owned(), None, &acme),
    ];
    for (method, path, body, key) in denied {
        let (st, v) = api.call(method, &path, Some(key.as_str()), body).await;
        assert_eq!(
            (st, code(&v)),
            (StatusCode::FORBIDDEN, "AUTHZ_PERMISSION_DENIED"),
            "{method} {path}"
        );
    }
    // The peers route is for workers only.
    let (st, _) = api
        .call(
            "GET",
            &format!("/peers/{}?worker_id=x", "a".repeat(64)),
            Some(&acme),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    // The audit trail has the creations.
    let (_, v) = api
        .call("GET", "/audit?action=image.create", Some(&acme), None)
        .await;
    assert_eq!(v["data"].as_array().expect("events").len(), 1, "{v}");
}

/// Bridges are admin records, unique per worker and name, that placement matches against a
/// `transit` bunker's interfaces (the rule itself is table-tested in `core::placement`).
/// A `transit` bunker naming a bridge nobody records is refused.
async fn bridges_are_admin_records_and_transit_needs_a_recorded_bridge(db: Db) {
    let api = Api::start(db).await;
    let w1 = api.register_dead_worker("w1", 16000, default_image()).await;
    let w2 = api.register_dead_worker("w2", 8000, default_image()).await;
    let bridge = |name: &str, worker: &str| json!({"name": name, "worker_id": worker});
    for (name, worker) in [("br-lan", &w1), ("br-lan", &w2), ("br-dmz", &w2)] {
        let (st, v) = api
            .admin("POST", "/bridges", Some(bridge(name, worker)))
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        assert_eq!(v["data"]["worker_id"], json!(worker));
    }
    let (st, v) = api
        .admin("POST", "/bridges", Some(bridge("br-lan", &w1)))
        .await;
    assert_eq!((st, code(&v)), (StatusCode::CONFLICT, "NAME_TAKEN"));
    let (st, v) = api
        .admin("POST", "/bridges", Some(bridge("bad name!", &w1)))
        .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::UNPROCESSABLE_ENTITY, "VALIDATION_ERROR")
    );
    let (st, v) = api
        .admin("POST", "/bridges", Some(bridge("br0", "wrk_nope")))
        .await;
    assert_eq!((st, code(&v)), (StatusCode::NOT_FOUND, "WORKER_NOT_FOUND"));

    let (_, v) = api.admin("GET", "/bridges", None).await;
    let listed: Vec<(String, String)> = v["data"]
        .as_array()
        .expect("bridges")
        .iter()
        .map(|b| {
            (
                b["worker_id"].as_str().unwrap_or_default().to_owned(),
                b["name"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let mut want = vec![
        (w1.clone(), "br-lan".to_owned()),
        (w2.clone(), "br-dmz".to_owned()),
        (w2.clone(), "br-lan".to_owned()),
    ];
    want.sort();
    assert_eq!(listed, want);
    let dmz = v["data"]
        .as_array()
        .expect("bridges")
        .iter()
        .find(|b| b["name"] == "br-dmz")
        .and_then(|b| b["id"].as_str())
        .expect("br-dmz")
        .to_owned();
    let (st, _) = api.admin("DELETE", &format!("/bridges/{dmz}"), None).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, v) = api.admin("DELETE", &format!("/bridges/{dmz}"), None).await;
    assert_eq!((st, code(&v)), (StatusCode::NOT_FOUND, "BRIDGE_NOT_FOUND"));

    // A deleted bridge, or one never recorded, is not there to attach to.
    for gone in ["br-dmz", "br-never"] {
        let transit = json!({
            "image": "default",
            "network_profile": "transit",
            "interfaces": [{"if_name": "eth1", "bridge_name": gone}]
        });
        let (st, v) = api.admin("POST", "/bunkers", Some(transit)).await;
        assert_eq!(
            (st, code(&v)),
            (StatusCode::NOT_FOUND, "BRIDGE_NOT_FOUND"),
            "{gone}: {v}"
        );
    }

    // Bridges are admin records.
    let tenant = api.tenant_key("bridgeless", "tenant_admin").await;
    for (method, path, body) in [
        ("GET", "/bridges".to_owned(), None),
        ("POST", "/bridges".to_owned(), Some(bridge("br9", &w1))),
        ("DELETE", "/bridges/brg_x".to_owned(), None),
    ] {
        let (st, v) = api.call(method, &path, Some(&tenant), body).await;
        assert_eq!(
            (st, code(&v)),
            (StatusCode::FORBIDDEN, "AUTHZ_PERMISSION_DENIED"),
            "{method} {path}"
        );
    }
}

/// An image whose controller died mid-bake (left `baking`, its source stored) is baked by the
/// `images` job once it has been untouched for 15 minutes; a bake still in its window is left.
async fn the_images_job_rebakes_interrupted_bakes(db: Db) {
    let api = Api::start(db).await;
    let mut ids = Vec::new();
    for name in ["interrupted", "recent"] {
        let (st, v) = api
            .admin(
                "POST",
                "/images",
                Some(json!({"name": name, "source": {"kind": "tar"}, "size_mib": 16})),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        let id = v["data"]["id"].as_str().expect("id").to_owned();
        // What the upload stored before its controller died.
        api.handle
            .services
            .objects()
            .put_bytes(&format!("images/{id}/source"), rootfs_tar(&[]).into())
            .await
            .expect("put source");
        ids.push(id);
    }
    let pool = api.handle.services.store.pool();
    let now = scaibunker_controller::store::now_ms();
    for (id, age_ms) in [(&ids[0], 16 * 60 * 1000), (&ids[1], 60 * 1000)] {
        sqlx::query("UPDATE images SET status = 'baking', updated_at = ? WHERE id = ?")
            .bind(now - age_ms)
            .bind(id)
            .execute(pool)
            .await
            .expect("update");
    }

    let services = &api.handle.services;
    let recovered = scaibunker_controller::service::images::recover_stale_bakes(services)
        .await
        .expect("job");
    assert_eq!(recovered, 1);
    // The job only starts the bake (it used to bake inline, holding every other job of the
    // loop for as long as a bake takes): the image is still baking when the job returns.
    let (st, v) = api.admin("GET", &format!("/images/{}", ids[0]), None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        v["data"]["status"], "baking",
        "the job returned before the bake: {v}"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let v = loop {
        let (_, v) = api.admin("GET", &format!("/images/{}", ids[0]), None).await;
        if v["data"]["status"] != "baking" || std::time::Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(v["data"]["status"], "ready", "{v}");
    assert_eq!(v["data"]["sha256"].as_str().map(str::len), Some(64), "{v}");
    let (_, v) = api.admin("GET", &format!("/images/{}", ids[1]), None).await;
    assert_eq!(
        v["data"]["status"], "baking",
        "a bake in its window is left alone"
    );
    // Nothing is stale any more.
    let recovered = scaibunker_controller::service::images::recover_stale_bakes(services)
        .await
        .expect("job");
    assert_eq!(recovered, 0);
}

async fn each_worker_has_its_own_credential_bound_to_its_id(db: Db) {
    let api = Api::start(db).await;
    let w1 = api.register_dead_worker("w1", 8000, default_image()).await;
    let w2 = api.register_dead_worker("w2", 8000, default_image()).await;
    let (c1, c2) = (api.credential(&w1), api.credential(&w2));
    assert!(c1.starts_with("swc_") && c1 != c2 && c1 != WORKER_TOKEN);
    let beat = |id: &str| {
        json!({"worker_id": id, "active_bunkers": 0, "bunkers": [],
               "capacity": {"cpu_millicores": 1000, "memory_mb": 1024, "disk_mb": 1024, "gpu_count": 0}})
    };
    let post = |path: &str, bearer: &str, body: Value| {
        let (path, bearer) = (path.to_owned(), bearer.to_owned());
        let api = &api;
        async move { api.call("POST", &path, Some(&bearer), Some(body)).await }
    };

    // A worker presenting another worker's id with its own credential is refused, for
    // heartbeats and peer lookups; the shared join token opens neither.
    let (st, v) = post("/heartbeat", &c1, beat(&w2)).await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::FORBIDDEN, "WORKER_MISMATCH"),
        "{v}"
    );
    let (st, v) = post("/heartbeat", WORKER_TOKEN, beat(&w1)).await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::UNAUTHORIZED, "AUTH_TOKEN_INVALID")
    );
    let peers = format!("/peers/{}?worker_id={w2}", "a".repeat(64));
    let (st, v) = api.call("GET", &peers, Some(&c1), None).await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::FORBIDDEN, "WORKER_MISMATCH"),
        "{v}"
    );
    let (st, v) = post("/heartbeat", &c1, beat(&w1)).await;
    assert_eq!(st, StatusCode::OK, "{v}");

    // Registering: the join token no longer registers a name that holds a credential, nor
    // does another worker's credential; its own does, and keeps its id.
    let register = |name: &str| {
        json!({"protocol_version": PROTOCOL_VERSION, "name": name, "url": "http://127.0.0.1:9",
               "capacity": {"cpu_millicores": 1000, "memory_mb": 1024, "disk_mb": 1024, "gpu_count": 0},
               "images": [], "runtime": "qemu/tcg"})
    };
    let (st, v) = post("/workers/register", WORKER_TOKEN, register("w1")).await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::CONFLICT, "WORKER_CREDENTIAL_REQUIRED"),
        "{v}"
    );
    let (st, v) = post("/workers/register", &c2, register("w1")).await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::FORBIDDEN, "WORKER_MISMATCH"),
        "{v}"
    );
    let (st, v) = post("/workers/register", &c1, register("w3")).await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::FORBIDDEN, "WORKER_MISMATCH"),
        "{v}"
    );
    let (st, v) = post("/workers/register", &c1, register("w1")).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(
        (v["worker_id"].as_str(), v["credential"].as_str()),
        (Some(w1.as_str()), Some(c1.as_str()))
    );

    // Rotation without a restart: the old credential works until the worker has used the
    // new one, which a heartbeat answer hands over; then only the new one works.
    let tenant_admin = api.tenant_key("rot", "tenant_admin").await;
    let rotate = format!("/workers/{w1}/credential/rotate");
    let (st, _) = api.call("POST", &rotate, Some(&tenant_admin), None).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let (st, v) = api.admin("POST", &rotate, None).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{v}");
    let (st, v) = post("/heartbeat", &c1, beat(&w1)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let c1b = v["credential"]
        .as_str()
        .expect("the rotated credential")
        .to_owned();
    assert_ne!(c1b, c1);
    let (st, v) = post("/heartbeat", &c1b, beat(&w1)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(v.get("credential").is_none(), "{v}");
    let (st, _) = post("/heartbeat", &c1, beat(&w1)).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "the rotated-away credential");

    // Reset (a worker that lost its data directory): the credential stops at once and the
    // join token registers the name again, with the same id and a new credential.
    let (st, _) = api
        .admin("POST", &format!("/workers/{w1}/credential/reset"), None)
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, _) = post("/heartbeat", &c1b, beat(&w1)).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, v) = post("/workers/register", WORKER_TOKEN, register("w1")).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let c1c = v["credential"].as_str().expect("credential").to_owned();
    assert_eq!(v["worker_id"].as_str(), Some(w1.as_str()));
    assert!(c1c != c1 && c1c != c1b);
    let (st, _) = post("/heartbeat", &c1c, beat(&w1)).await;
    assert_eq!(st, StatusCode::OK);

    // The storage proxy: a worker reads baked images and reads and writes snapshots, nothing
    // else; the join token is nothing there.
    let object = |key: &str| format!("/storage/objects/{key}");
    let (st, _) = api
        .call("GET", &object("images/img_x/rootfs.ext4"), Some(&c2), None)
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND, "allowed, and absent");
    for (method, key) in [
        ("DELETE", "snapshots/tnt_x/snp_x/disk.qcow2"),
        ("GET", "exec-output/tnt_x/bnk_x/exe_x/stdout"),
        ("GET", "images/img_x/source"),
    ] {
        let (st, v) = api.call(method, &object(key), Some(&c2), None).await;
        assert_eq!(
            (st, code(&v)),
            (StatusCode::FORBIDDEN, "WORKER_STORAGE_DENIED"),
            "{method} {key}: {v}"
        );
    }
    let (st, _) = api
        .call(
            "GET",
            &object("images/img_x/rootfs.ext4"),
            Some(WORKER_TOKEN),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
}

/// A partner's image of a platform image's name does not shadow it for the partner's tenants
/// (before, `image: "default"` booted the partner's).
async fn a_partner_image_never_shadows_a_platform_image(db: Db) {
    let api = Api::start(db).await;
    api.register_dead_worker("w1", 8000, default_image()).await;
    let pool = api.handle.services.store.pool();
    let platform: String =
        sqlx::query_scalar("SELECT id FROM images WHERE name = 'default' AND tenant_id IS NULL")
            .fetch_one(pool)
            .await
            .expect("the platform default");
    let sibling = api.tenant_key("sibling", "tenant_user").await;
    let _maker = api.tenant_key("maker", "tenant_admin").await;
    for sql in [
        "UPDATE tenants SET partner_id = 'prt_p' WHERE id IN ('tnt_sibling', 'tnt_maker')",
        "INSERT INTO images (id, tenant_id, name, scope, status, sha256, size_bytes, lazy_pull, \
         partner_id, created_at) VALUES ('img_partnerdefault', 'tnt_maker', 'default', \
         'partner', 'ready', 'cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc', \
         1024, 1, 'prt_p', 9999999999999)",
    ] {
        sqlx::query(sql).execute(pool).await.expect(sql);
    }
    let (st, v) = api
        .call(
            "POST",
            "/bunkers",
            Some(&sibling),
            Some(json!({"image": "default"})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(
        v["data"]["image_id"].as_str(),
        Some(platform.as_str()),
        "{v}"
    );
    // By id it is still reachable.
    let (st, v) = api
        .call(
            "POST",
            "/bunkers",
            Some(&sibling),
            Some(json!({"image": "img_partnerdefault"})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["data"]["image_id"], "img_partnerdefault", "{v}");
}

both!(
    a_partner_image_never_shadows_a_platform_image,
    each_worker_has_its_own_credential_bound_to_its_id,
    the_images_job_rebakes_interrupted_bakes,
    bridges_are_admin_records_and_transit_needs_a_recorded_bridge,
    images_bake_and_fan_out_through_availability_groups,
    bad_image_content_is_refused_and_nothing_is_kept,
    images_are_tenant_scoped_and_permissioned,
    heartbeats_heal_the_worker_image_ledger,
    the_shell_route_takes_a_query_token_and_checks_before_upgrading,
    every_route_refuses_a_key_without_its_permission,
    admins_list_drain_and_resume_workers,
    metrics_count_requests_by_route_and_bunkers_by_status,
    health_answers_without_auth_and_every_response_has_a_request_id,
    rejects_missing_and_invalid_tokens,
    validation_errors_name_each_field,
    placement_errors_distinguish_no_capacity_from_no_image,
    a_boot_on_an_unreachable_worker_fails_the_bunker_with_a_reason,
    exec_and_file_requests_are_validated_before_touching_the_bunker,
    other_tenants_bunkers_are_not_found_and_permissions_are_enforced,
    listing_pages_with_cursors_and_filters,
    heartbeats_tell_workers_to_stop_vms_of_ended_bunkers,
    a_second_start_on_the_same_data_dir_keeps_the_key_and_prints_none,
    pause_and_resume_follow_the_state_machine,
    audit_and_exec_logs_are_tenant_scoped_and_filterable,
    platform_routes_create_tenants_users_groups_and_revocable_keys,
);
