//! The backchannel's controller side (`/internal/bunkers/{id}/self…`) on the real router,
//! on both SQL backends: only the worker running a bunker speaks for it, only while it runs;
//! its record, metadata and events; children narrowed, counted, nested at most twice, and
//! reachable only from their own parent; every call audited with actor type `bunker`.
//! The workers are stand-ins answered in-process.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{Json as AxJson, Path};
use axum::http::StatusCode as AxStatus;
use axum::routing::post;
use reqwest::StatusCode;
use scaibunker_controller::config::ControllerConfig;
use scaibunker_controller::{ControllerHandle, start};
use scaibunker_proto::worker::{BootSource, Capacity, CreateVm, VmInfo, VmStatus};
use serde_json::{Value, json};

#[macro_use]
mod common;

use common::{Db, TestDatabase};

const WORKER_TOKEN: &str = "swt_backchannel_worker_token";
const IMAGE_SHA: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

async fn create_vm(AxJson(req): AxJson<CreateVm>) -> AxJson<VmInfo> {
    AxJson(VmInfo {
        bunker_id: req.bunker_id,
        status: VmStatus::Running,
        guest_kernel: None,
        boot_ms: 1,
        boot_source: BootSource::Cold,
    })
}

async fn delete_vm(Path(_id): Path<String>) -> AxStatus {
    AxStatus::NO_CONTENT
}

struct Api {
    handle: ControllerHandle,
    http: reqwest::Client,
    key: String,
    /// The credential of the worker that runs every bunker.
    runs: String,
    /// The credential of a worker that runs none of them.
    other: String,
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
    async fn start(db: Db) -> Api {
        let database = db.create().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let listen: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let mut c =
            ControllerConfig::embedded(dir.path().to_path_buf(), listen, WORKER_TOKEN.into());
        c.database_url = database.url.clone();
        if let Db::MariaDb = db {
            c.redis_url = Some(common::redis_url());
            c.redis_prefix = common::unique_redis_prefix();
        }
        let handle = start(c).await.expect("controller starts");
        let key = handle.bootstrap_key.clone().expect("bootstrap key");
        let app = axum::Router::new()
            .route("/v1/worker/bunkers", post(create_vm))
            .route("/v1/worker/bunkers/{id}", axum::routing::delete(delete_vm));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let worker_url = format!("http://{}", listener.local_addr().expect("addr"));
        let worker = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("serve");
        });
        let mut api = Api {
            handle,
            http: reqwest::Client::new(),
            key,
            runs: String::new(),
            other: String::new(),
            worker,
            _dir: dir,
            _database: database,
        };
        let capacity = Capacity {
            cpu_millicores: 64_000,
            memory_mb: 65_536,
            disk_mb: 1_000_000,
            gpu_count: 0,
        };
        let register = common::fake_registration(worker_url.clone(), IMAGE_SHA, capacity);
        let (st, v) = api
            .call("POST", "/workers/register", WORKER_TOKEN, Some(register))
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        api.runs = v["credential"].as_str().expect("credential").to_owned();
        // A second worker, holding no image: no bunker is ever placed on it.
        let mut register = common::fake_registration(worker_url, IMAGE_SHA, capacity);
        register["name"] = json!("elsewhere");
        register["images"] = json!([]);
        let (st, v) = api
            .call("POST", "/workers/register", WORKER_TOKEN, Some(register))
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        api.other = v["credential"].as_str().expect("credential").to_owned();
        api
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v1/modules/scaibunker{path}", self.handle.url())
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
        common::json_of(rb.send().await.expect("request")).await
    }

    /// A backchannel call of bunker `id` by the worker holding `credential`.
    async fn bc(
        &self,
        credential: &str,
        method: &str,
        id: &str,
        rest: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        self.call(
            method,
            &format!("/internal/bunkers/{id}/self{rest}"),
            credential,
            body,
        )
        .await
    }

    async fn bunker(&self, body: Value) -> String {
        let (st, v) = self.call("POST", "/bunkers", &self.key, Some(body)).await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        v["data"]["id"].as_str().expect("id").to_owned()
    }

    async fn running(&self, id: &str) -> Value {
        for _ in 0..100 {
            let (st, v) = self
                .call("GET", &format!("/bunkers/{id}"), &self.key, None)
                .await;
            assert_eq!(st, StatusCode::OK, "{v}");
            if v["data"]["status"] == "running" {
                return v["data"].clone();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{id} never ran");
    }

    async fn audit(&self, action: &str) -> Vec<Value> {
        let resp = self
            .http
            .get(format!(
                "{}/v1/audit-log?action={action}&limit=500",
                self.handle.url()
            ))
            .bearer_auth(&self.key)
            .send()
            .await
            .expect("audit");
        let (st, v) = common::json_of(resp).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        v["data"].as_array().cloned().unwrap_or_default()
    }
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or_default()
}

async fn only_the_bunkers_own_worker_speaks_for_it_while_it_runs(db: Db) {
    let api = Api::start(db).await;
    let a = api
        .bunker(json!({"image": "default", "env_vars": {"SECRET": "hunter2"}, "label_set": {"team": "x"}}))
        .await;
    let b = api.bunker(json!({"image": "default"})).await;

    let (st, v) = api.bc(&api.runs, "GET", &a, "", None).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["data"]["id"], a);
    assert!(!v.to_string().contains("hunter2"), "no env values: {v}");

    // Another worker, a user's key, no credential, an unknown or malformed id.
    let (st, v) = api.bc(&api.other, "GET", &a, "", None).await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::NOT_FOUND, "BUNKER_NOT_FOUND"),
        "{v}"
    );
    let (st, _) = api.bc(&api.key, "GET", &a, "", None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "an API key is not a worker");
    let (st, _) = api.bc(WORKER_TOKEN, "GET", &a, "", None).await;
    assert_eq!(
        st,
        StatusCode::UNAUTHORIZED,
        "the join token is not a worker's credential"
    );
    let (st, _) = api.bc("", "GET", &a, "", None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, _) = api
        .bc(&api.runs, "GET", "bnk_doesnotexist0000", "", None)
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, _) = api.bc(&api.runs, "GET", "not-an-id", "", None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);

    // An ended bunker speaks no more.
    let (st, _) = api
        .call("DELETE", &format!("/bunkers/{b}"), &api.key, None)
        .await;
    assert_eq!(st, StatusCode::OK);
    let (st, v) = api.bc(&api.runs, "GET", &b, "", None).await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::CONFLICT, "BUNKER_NOT_RUNNING"),
        "{v}"
    );

    // Every call is audited as the bunker.
    let reads = api.audit("bunker.self.read").await;
    assert!(
        reads
            .iter()
            .any(|e| e["actor_type"] == "bunker" && e["actor_id"] == a && e["resource_id"] == a),
        "{reads:?}"
    );
}

async fn metadata_and_events_are_the_bunkers_own(db: Db) {
    let api = Api::start(db).await;
    let a = api
        .bunker(json!({"image": "default", "label_set": {"team": "x"}}))
        .await;
    let resp = api
        .http
        .put(api.url(&format!("/internal/bunkers/{a}/self/metadata/stage")))
        .bearer_auth(&api.runs)
        .body("two")
        .send()
        .await
        .expect("put");
    let (st, v) = common::json_of(resp).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (_, v) = api
        .call("GET", &format!("/bunkers/{a}"), &api.key, None)
        .await;
    assert_eq!(
        v["data"]["label_set"],
        json!({"team": "x", "stage": "two"}),
        "{v}"
    );
    let resp = api
        .http
        .put(api.url(&format!("/internal/bunkers/{a}/self/metadata/stage")))
        .bearer_auth(&api.runs)
        .body("x".repeat(257))
        .send()
        .await
        .expect("put");
    assert_eq!(
        resp.status(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "values are bounded"
    );
    let resp = api
        .http
        .put(api.url(&format!("/internal/bunkers/{a}/self/metadata/stage")))
        .bearer_auth(&api.other)
        .body("three")
        .send()
        .await
        .expect("put");
    assert_eq!(
        resp.status(),
        StatusCode::NOT_FOUND,
        "another worker writes nothing"
    );

    let (st, v) = api
        .bc(
            &api.runs,
            "POST",
            &a,
            "/events",
            Some(json!({"kind": "progress", "message": "half", "data": {"pct": 50}})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let events = api.audit("bunker.event").await;
    let e = events
        .iter()
        .find(|e| e["id"] == v["data"]["id"])
        .expect("the event is in the audit");
    assert_eq!(e["actor_type"], "bunker");
    assert_eq!(e["actor_id"], a);
    assert_eq!(e["details"]["kind"], "progress");
    assert_eq!(e["details"]["data"]["pct"], 50);
    for bad in [
        json!({"kind": "Has Spaces"}),
        json!({"kind": ""}),
        json!({"kind": "a", "extra": 1}),
        json!({"message": "no kind"}),
    ] {
        let (st, v) = api.bc(&api.runs, "POST", &a, "/events", Some(bad)).await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    }
    let big = json!({"kind": "big", "message": "m".repeat(20_000)});
    let (st, _) = api.bc(&api.runs, "POST", &a, "/events", Some(big)).await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "events are bounded");
}

async fn children_are_narrowed_counted_nested_at_most_twice_and_the_parents_only(db: Db) {
    let api = Api::start(db).await;
    let parent = api.bunker(json!({"image": "default"})).await;
    let stranger = api.bunker(json!({"image": "default"})).await;

    // Wider than the parent's `isolated`: refused.
    for profile in [
        json!({"network_profile": "unrestricted"}),
        json!({"network_profile": "registry"}),
        json!({"network_profile": "transit"}),
    ] {
        let (st, v) = api
            .bc(&api.runs, "POST", &parent, "/children", Some(profile))
            .await;
        assert_eq!(
            (st, code(&v)),
            (StatusCode::FORBIDDEN, "NETWORK_PROFILE_DENIED"),
            "{v}"
        );
    }
    let (st, v) = api
        .bc(
            &api.runs,
            "POST",
            &parent,
            "/children",
            Some(json!({"snapshot_id": "snp_x"})),
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");

    let (st, v) = api
        .bc(&api.runs, "POST", &parent, "/children", Some(json!({})))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let child = v["data"]["id"].as_str().expect("id").to_owned();
    let record = api.running(&child).await;
    let (_, p) = api
        .call("GET", &format!("/bunkers/{parent}"), &api.key, None)
        .await;
    assert_eq!(record["tenant_id"], p["data"]["tenant_id"]);
    assert_eq!(
        record["owner_id"], p["data"]["owner_id"],
        "charged to the creator"
    );
    assert_eq!(record["lifecycle_mode"], "ephemeral");
    assert_eq!(record["network_profile"], "isolated");
    assert_eq!(
        record["image_id"], p["data"]["image_id"],
        "the parent's image by default"
    );

    let (st, v) = api.bc(&api.runs, "GET", &parent, "/children", None).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|c| c["id"].as_str())
        .collect();
    assert_eq!(ids, vec![child.as_str()]);
    let (_, v) = api.bc(&api.runs, "GET", &stranger, "/children", None).await;
    assert_eq!(v["data"], json!([]), "a stranger has no children");

    // Nobody but the parent reaches the child: the stranger, another bunker as a child id.
    let (st, _) = api
        .bc(
            &api.runs,
            "DELETE",
            &stranger,
            &format!("/children/{child}"),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, _) = api
        .bc(
            &api.runs,
            "DELETE",
            &parent,
            &format!("/children/{stranger}"),
            None,
        )
        .await;
    assert_eq!(
        st,
        StatusCode::NOT_FOUND,
        "another bunker's id is not a child"
    );
    let (st, _) = api
        .bc(
            &api.runs,
            "DELETE",
            &parent,
            &format!("/children/{parent}"),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);

    // Depth: a grandchild yes, a great-grandchild no.
    let (st, v) = api
        .bc(&api.runs, "POST", &child, "/children", Some(json!({})))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let grandchild = v["data"]["id"].as_str().expect("id").to_owned();
    api.running(&grandchild).await;
    let (st, v) = api
        .bc(&api.runs, "POST", &grandchild, "/children", Some(json!({})))
        .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::FORBIDDEN, "AUTHZ_PERMISSION_DENIED"),
        "{v}"
    );

    // Count: at most five not ended at once.
    for _ in 0..4 {
        let (st, v) = api
            .bc(&api.runs, "POST", &parent, "/children", Some(json!({})))
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
    }
    let (st, v) = api
        .bc(&api.runs, "POST", &parent, "/children", Some(json!({})))
        .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::FORBIDDEN, "AUTHZ_PERMISSION_DENIED"),
        "{v}"
    );

    let (st, v) = api
        .bc(
            &api.runs,
            "DELETE",
            &parent,
            &format!("/children/{child}"),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["data"]["status"], "terminated");
    let (st, v) = api
        .bc(&api.runs, "POST", &parent, "/children", Some(json!({})))
        .await;
    assert_eq!(st, StatusCode::CREATED, "a slot came back: {v}");

    let created = api.audit("bunker.child.create").await;
    assert!(
        created.iter().all(|e| e["actor_type"] == "bunker"),
        "{created:?}"
    );
    assert!(
        created
            .iter()
            .any(|e| e["actor_id"] == parent && e["resource_id"] == child)
    );
    let deleted = api.audit("bunker.child.delete").await;
    assert!(
        deleted
            .iter()
            .any(|e| e["actor_id"] == parent && e["resource_id"] == child)
    );
}

async fn a_wider_parent_may_have_narrower_children(db: Db) {
    let api = Api::start(db).await;
    let parent = api
        .bunker(json!({"image": "default", "network_profile": "unrestricted"}))
        .await;
    for profile in ["isolated", "unrestricted"] {
        let (st, v) = api
            .bc(
                &api.runs,
                "POST",
                &parent,
                "/children",
                Some(json!({"network_profile": profile})),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{profile}: {v}");
        assert_eq!(v["data"]["network_profile"], profile);
    }
    let (st, v) = api
        .bc(
            &api.runs,
            "POST",
            &parent,
            "/children",
            Some(json!({"network_profile": "transit"})),
        )
        .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::FORBIDDEN, "NETWORK_PROFILE_DENIED"),
        "transit never: {v}"
    );

    // An allowlisted child of an unrestricted parent; its own children stay within its list.
    let (st, v) = api
        .bc(
            &api.runs,
            "POST",
            &parent,
            "/children",
            Some(json!({"network_profile": "allowlisted", "network_allowlist": ["api.example.com", "*.cdn.example.com"]})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let allowlisted = v["data"]["id"].as_str().expect("id").to_owned();
    api.running(&allowlisted).await;
    for wider in [
        json!({"network_profile": "allowlisted", "network_allowlist": ["evil.example.com"]}),
        json!({"network_profile": "allowlisted", "network_allowlist": ["api.example.com", "evil.example.com"]}),
        json!({"network_profile": "unrestricted"}),
    ] {
        let (st, v) = api
            .bc(
                &api.runs,
                "POST",
                &allowlisted,
                "/children",
                Some(wider.clone()),
            )
            .await;
        assert_eq!(
            (st, code(&v)),
            (StatusCode::FORBIDDEN, "NETWORK_PROFILE_DENIED"),
            "{wider}: {v}"
        );
    }
    for narrower in [
        json!({"network_profile": "allowlisted", "network_allowlist": ["*.cdn.example.com"]}),
        json!({"network_profile": "registry"}),
        json!({}),
    ] {
        let (st, v) = api
            .bc(
                &api.runs,
                "POST",
                &allowlisted,
                "/children",
                Some(narrower.clone()),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{narrower}: {v}");
    }
}

async fn a_bunker_past_its_window_is_limited_without_touching_others(db: Db) {
    let api = Api::start(db).await;
    let a = api.bunker(json!({"image": "default"})).await;
    let b = api.bunker(json!({"image": "default"})).await;
    let per_bunker = scaibunker_controller::service::backchannel::BUNKER_PER_MIN;
    for n in 0..per_bunker {
        let (st, v) = api.bc(&api.runs, "GET", &a, "", None).await;
        assert_eq!(st, StatusCode::OK, "call {n}: {v}");
    }
    let resp = api
        .http
        .get(api.url(&format!("/internal/bunkers/{a}/self")))
        .bearer_auth(&api.runs)
        .send()
        .await
        .expect("get");
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Retry-After in seconds");
    assert!((1..=60).contains(&retry), "{retry}");
    let (st, v) = api.bc(&api.runs, "GET", &b, "", None).await;
    assert_eq!(
        st,
        StatusCode::OK,
        "another bunker of the tenant still speaks: {v}"
    );
}

async fn racing_child_creates_never_pass_the_count(db: Db) {
    let api = std::sync::Arc::new(Api::start(db).await);
    let parent = api.bunker(json!({"image": "default"})).await;
    let racers: Vec<_> = (0..8)
        .map(|_| {
            let api = std::sync::Arc::clone(&api);
            let parent = parent.clone();
            tokio::spawn(async move {
                api.bc(&api.runs, "POST", &parent, "/children", Some(json!({})))
                    .await
            })
        })
        .collect();
    let mut created = 0;
    for r in racers {
        let (st, v) = r.await.expect("joins");
        match st {
            StatusCode::CREATED => created += 1,
            StatusCode::FORBIDDEN => assert_eq!(code(&v), "AUTHZ_PERMISSION_DENIED", "{v}"),
            other => panic!("{other}: {v}"),
        }
    }
    assert_eq!(created, 5, "exactly the limit, however the creates race");
    let (_, v) = api.bc(&api.runs, "GET", &parent, "/children", None).await;
    assert_eq!(v["data"].as_array().map(Vec::len), Some(5), "{v}");
}

both!(
    only_the_bunkers_own_worker_speaks_for_it_while_it_runs,
    racing_child_creates_never_pass_the_count,
    a_bunker_past_its_window_is_limited_without_touching_others,
    metadata_and_events_are_the_bunkers_own,
    children_are_narrowed_counted_nested_at_most_twice_and_the_parents_only,
    a_wider_parent_may_have_narrower_children,
);
