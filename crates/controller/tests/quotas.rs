//! Quota profiles, enforcement and accounting through the real HTTP API, on SQLite and MariaDB,
//! with live state in-process or in a real Redis (each test its own key prefix, deleted after).
//!
//! Bunkers here boot on a stub worker: a small axum server speaking the worker API's create and
//! delete routes (the seam between controller and worker), so bunkers reach `running` without
//! VMs. A create whose `env_vars` hold `FAIL_BOOT` is refused by the stub, as a failed boot.
//! The same stub, registered with room for a few bunkers, takes the storm that shows placement
//! never overcommits a worker.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use axum::Json;
use axum::extract::Path;
use axum::http::StatusCode as AxumStatus;
use axum::routing::{delete, post};
use common::{
    Db, TestDatabase, redis_url, unique_redis_prefix as unique_prefix, wipe_redis as wipe,
};
use reqwest::StatusCode;
use scaibunker_controller::config::ControllerConfig;
use scaibunker_controller::service::{accounting, quotas};
use scaibunker_controller::store::now_ms;
use scaibunker_controller::{ControllerHandle, start};
use scaibunker_proto::worker::{
    BunkerStatusReport, CachedImage, Capacity, CreateVm, Heartbeat, PROTOCOL_VERSION,
    RegisterRequest, VmInfo, VmStatus, WorkerError,
};
use serde_json::{Value, json};

const WORKER_TOKEN: &str = "swt_quota_test";

/// Where live state lives for a scenario.
#[derive(Clone, Copy, Debug)]
enum Live {
    InProcess,
    Redis,
}

struct Setup {
    db: Db,
    live: Live,
    job_interval: Duration,
    heartbeat_interval: Duration,
    usage_tick: Duration,
}

impl Setup {
    fn new(db: Db, live: Live) -> Self {
        Self {
            db,
            live,
            job_interval: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(10),
            usage_tick: Duration::from_secs(60),
        }
    }
}

struct Api {
    handle: ControllerHandle,
    http: reqwest::Client,
    prefix: Option<String>,
    _dir: tempfile::TempDir,
    _database: TestDatabase,
}

async fn start_controller(
    setup: &Setup,
    database_url: &str,
    prefix: Option<&str>,
    dir: &std::path::Path,
) -> ControllerHandle {
    let listen: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let mut c = ControllerConfig::embedded(dir.to_path_buf(), listen, WORKER_TOKEN.into());
    c.database_url = database_url.to_owned();
    c.job_interval = setup.job_interval;
    c.heartbeat_interval = setup.heartbeat_interval;
    c.usage_tick_interval = setup.usage_tick;
    if let Some(p) = prefix {
        c.redis_url = Some(redis_url());
        c.redis_prefix = p.to_owned();
    }
    start(c).await.expect("controller starts")
}

impl Api {
    async fn start(setup: Setup) -> Api {
        let dir = tempfile::tempdir().expect("tempdir");
        let database = setup.db.create().await;
        let prefix = matches!(setup.live, Live::Redis).then(unique_prefix);
        let handle = start_controller(&setup, &database.url, prefix.as_deref(), dir.path()).await;
        Api {
            handle,
            http: reqwest::Client::new(),
            prefix,
            _dir: dir,
            _database: database,
        }
    }

    async fn finish(self) {
        if let Some(p) = &self.prefix {
            wipe(p).await;
        }
        self.handle.shutdown().await;
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        key: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let url = if path.starts_with("/v1/") {
            format!("{}{path}", self.handle.url())
        } else {
            format!("{}/v1/modules/scaibunker{path}", self.handle.url())
        };
        common::request(&self.http, method, url, Some(key), body).await
    }

    /// A tenant with one user of `role`; returns (tenant id, user id, key).
    async fn tenant(&self, slug: &str, role: &str) -> (String, String, String) {
        common::tenant_with_key(&self.handle.services.store, slug, role).await
    }

    /// Another user of the admin's tenant and a key of theirs; returns (user id, key).
    async fn user(&self, admin_key: &str, tenant: &str, email: &str) -> (String, String) {
        let (st, v) = self
            .call(
                "POST",
                "/v1/users",
                admin_key,
                Some(json!({"email": email, "tenant_id": tenant, "role": "tenant_user"})),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        let id = v["data"]["id"].as_str().expect("user id").to_owned();
        let (st, v) = self
            .call(
                "POST",
                "/v1/api-keys",
                admin_key,
                Some(json!({"name": "k", "user_id": id})),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        (id, v["data"]["key"].as_str().expect("key").to_owned())
    }

    async fn group(&self, admin_key: &str, name: &str, parent: Option<&str>) -> String {
        let (st, v) = self
            .call(
                "POST",
                "/v1/groups",
                admin_key,
                Some(json!({"name": name, "parent_group_id": parent})),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        v["data"]["id"].as_str().expect("group id").to_owned()
    }

    async fn add_member(&self, admin_key: &str, group: &str, user: &str) {
        let (st, v) = self
            .call(
                "POST",
                &format!("/v1/groups/{group}/members"),
                admin_key,
                Some(json!({"user_id": user})),
            )
            .await;
        assert!(st.is_success(), "{v}");
    }

    async fn profile(&self, key: &str, body: Value) -> String {
        let (st, v) = self.call("POST", "/quota-profiles", key, Some(body)).await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        v["data"]["id"].as_str().expect("profile id").to_owned()
    }

    async fn assign(&self, key: &str, profile: &str, kind: &str, target: &str, mode: &str) {
        let (st, v) = self
            .call(
                "POST",
                &format!("/quota-profiles/{profile}/assignments"),
                key,
                Some(json!({"target_kind": kind, "target_id": target, "mode": mode})),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
    }

    async fn create(&self, key: &str, body: Value) -> (StatusCode, Value) {
        self.call("POST", "/bunkers", key, Some(body)).await
    }

    /// The current value of one usage row (`None`: no such row).
    async fn current(&self, key: &str, profile: &str, bucket: &str, resource: &str) -> Option<i64> {
        let (st, v) = self.call("GET", "/quota-profiles/usage", key, None).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        v["data"]
            .as_array()
            .expect("rows")
            .iter()
            .find(|r| {
                r["profile_id"] == profile && r["bucket"] == bucket && r["resource"] == resource
            })
            .map(|r| r["current"].as_i64().expect("current"))
    }

    /// Registers the stub worker (with image `default`); returns its id.
    async fn register(&self, url: &str) -> String {
        self.register_with(url, big()).await
    }

    /// Registers the stub worker (with image `default`) holding `capacity`; returns its id.
    async fn register_with(&self, url: &str, capacity: Capacity) -> String {
        let req = RegisterRequest {
            protocol_version: PROTOCOL_VERSION,
            name: "stub".into(),
            url: url.to_owned(),
            capacity,
            images: vec![CachedImage {
                name: "default".into(),
                sha256: "a".repeat(64),
                size_bytes: 1 << 30,
            }],
            runtime: "stub".into(),
        };
        let (st, v) = self
            .call(
                "POST",
                "/workers/register",
                WORKER_TOKEN,
                Some(serde_json::to_value(req).expect("json")),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        v["worker_id"].as_str().expect("worker id").to_owned()
    }

    /// A heartbeat reporting `running` as the worker's bunkers.
    async fn heartbeat(&self, worker_id: &str, running: &[&str]) {
        let hb = Heartbeat {
            worker_id: worker_id.to_owned(),
            capacity: big(),
            active_bunkers: running.len() as u64,
            bunkers: running
                .iter()
                .map(|id| BunkerStatusReport {
                    id: (*id).to_owned(),
                    status: VmStatus::Running,
                    reason: None,
                })
                .collect(),
            cached_images: None,
            image_failures: Vec::new(),
        };
        // The worker's own credential, as the controller derives it to call the worker.
        let row = self
            .handle
            .services
            .store
            .worker(worker_id)
            .await
            .expect("read")
            .expect("registered");
        let credential =
            scaibunker_controller::service::worker_credentials::target(&self.handle.services, &row)
                .credential;
        let (st, v) = self
            .call(
                "POST",
                "/heartbeat",
                &credential,
                Some(serde_json::to_value(hb).expect("json")),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
    }

    async fn status(&self, key: &str, id: &str) -> String {
        let (_, v) = self.call("GET", &format!("/bunkers/{id}"), key, None).await;
        v["data"]["status"].as_str().unwrap_or("?").to_owned()
    }

    async fn wait_status(&self, key: &str, id: &str, want: &str, within: Duration) {
        let started = std::time::Instant::now();
        while started.elapsed() < within {
            if self.status(key, id).await == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "{id} is {} after {within:?}, not {want}",
            self.status(key, id).await
        );
    }
}

fn big() -> Capacity {
    Capacity {
        cpu_millicores: 10_000_000,
        memory_mb: 100_000_000,
        disk_mb: 1_000_000_000,
        gpu_count: 0,
    }
}

/// The stub worker: boots every bunker at once (refusing those with `FAIL_BOOT` in their
/// environment), pauses, resumes and deletes any. Returns its URL.
async fn stub_worker() -> String {
    let app = axum::Router::new()
        .route(
            "/v1/worker/bunkers",
            post(|Json(req): Json<CreateVm>| async move {
                if req.env_vars.contains_key("FAIL_BOOT") {
                    return Err((
                        AxumStatus::INTERNAL_SERVER_ERROR,
                        Json(WorkerError {
                            code: "BOOT_FAILED".into(),
                            message: "the stub refuses this boot".into(),
                        }),
                    ));
                }
                Ok(Json(VmInfo {
                    bunker_id: req.bunker_id,
                    status: VmStatus::Running,
                    guest_kernel: None,
                    boot_ms: 1,
                    boot_source: Default::default(),
                }))
            }),
        )
        .route(
            "/v1/worker/bunkers/{id}",
            delete(|Path(_id): Path<String>| async { AxumStatus::NO_CONTENT }),
        )
        .route(
            "/v1/worker/bunkers/{id}/{verb}",
            post(|Path((id, verb)): Path<(String, String)>| async move {
                Json(VmInfo {
                    bunker_id: id,
                    status: if verb == "pause" {
                        VmStatus::Paused
                    } else {
                        VmStatus::Running
                    },
                    guest_kernel: None,
                    boot_ms: 0,
                    boot_source: Default::default(),
                })
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind stub");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}")
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("<no code>")
}

/// The `{field: message}` details of an error.
fn details(v: &Value) -> std::collections::BTreeMap<String, String> {
    v["error"]["details"]
        .as_array()
        .map(|d| {
            d.iter()
                .map(|x| {
                    (
                        x["field"].as_str().unwrap_or("").to_owned(),
                        x["message"].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Fires `n` concurrent creates, spread round-robin over the controllers at `bases`; returns
/// each answer's status and body.
async fn fire_creates(
    http: &reqwest::Client,
    bases: &[String],
    key: &str,
    n: usize,
) -> Vec<(StatusCode, Value)> {
    let mut tasks = Vec::new();
    for i in 0..n {
        let http = http.clone();
        let url = format!("{}/v1/modules/scaibunker/bunkers", bases[i % bases.len()]);
        let key = key.to_owned();
        tasks.push(tokio::spawn(async move {
            let resp = http
                .post(url)
                .bearer_auth(key)
                .json(&json!({"image": "default"}))
                .send()
                .await
                .expect("request");
            let st = resp.status();
            let v: Value = resp.json().await.expect("json");
            (st, v)
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("task"));
    }
    out
}

/// Fires `n` concurrent creates; returns the ids of those that were created and how many were
/// refused by quota. Any other outcome fails the test.
async fn storm(api: &Api, key: &str, n: usize) -> (Vec<String>, usize) {
    let (mut created, mut refused) = (Vec::new(), 0);
    for (st, v) in fire_creates(&api.http, &[api.handle.url()], key, n).await {
        match st {
            StatusCode::CREATED => {
                assert_eq!(v["data"]["status"], "running", "{v}");
                created.push(v["data"]["id"].as_str().expect("id").to_owned());
            }
            StatusCode::TOO_MANY_REQUESTS => {
                assert_eq!(code(&v), "BUNKER_QUOTA_EXCEEDED", "{v}");
                refused += 1;
            }
            other => panic!("unexpected {other}: {v}"),
        }
    }
    (created, refused)
}

async fn a_storm_of_creates_never_passes_the_concurrent_cap(db: Db, live: Live) {
    let api = Api::start(Setup::new(db, live)).await;
    api.register(&stub_worker().await).await;
    let (_, user, key) = api.tenant("storm", "tenant_admin").await;
    let qp = api
        .profile(&key, json!({"name": "ten", "max_concurrent_bunkers": 10}))
        .await;
    api.assign(&key, &qp, "user", &user, "individual").await;
    let bucket = format!("user:{user}");

    let (created, refused) = storm(&api, &key, 100).await;
    assert_eq!((created.len(), refused), (10, 90));
    assert_eq!(
        api.current(&key, &qp, &bucket, "concurrent_bunkers").await,
        Some(10)
    );
    assert_eq!(
        api.current(&key, &qp, &bucket, "memory_mb").await,
        Some(5120)
    );

    // The refusal names the profile, the bucket, the resource and the numbers.
    let (st, v) = api.create(&key, json!({"image": "default"})).await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS);
    let d = details(&v);
    assert_eq!(d["profile_id"], qp);
    assert_eq!(d["bucket"], bucket);
    assert_eq!(d["resource"], "concurrent_bunkers");
    assert_eq!(
        (
            d["current"].as_str(),
            d["cap"].as_str(),
            d["requested"].as_str()
        ),
        ("10", "10", "1")
    );

    if let Some(prefix) = &api.prefix {
        // Redis loses everything mid-run: the counters come back from the database.
        wipe(prefix).await;
        let (again, refused) = storm(&api, &key, 40).await;
        assert_eq!((again.len(), refused), (0, 40), "no overshoot after a wipe");
        assert_eq!(
            api.current(&key, &qp, &bucket, "concurrent_bunkers").await,
            Some(10)
        );
    }

    for id in &created {
        let (st, v) = api
            .call("DELETE", &format!("/bunkers/{id}"), &key, None)
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
    }
    assert_eq!(
        api.current(&key, &qp, &bucket, "concurrent_bunkers").await,
        Some(0)
    );
    assert_eq!(api.current(&key, &qp, &bucket, "memory_mb").await, Some(0));

    // Wiped again with nothing running, then another storm: exactly the cap again.
    if let Some(prefix) = &api.prefix {
        wipe(prefix).await;
    }
    let (created, refused) = storm(&api, &key, 30).await;
    assert_eq!((created.len(), refused), (10, 20));
    for id in &created {
        api.call("DELETE", &format!("/bunkers/{id}"), &key, None)
            .await;
    }
    assert_eq!(
        api.current(&key, &qp, &bucket, "concurrent_bunkers").await,
        Some(0)
    );
    // Reconciliation finds nothing to repair.
    assert_eq!(
        quotas::reconcile(&api.handle.services)
            .await
            .expect("reconcile"),
        0
    );
    api.finish().await;
}

async fn shared_and_per_user_groups_nest_and_the_strictest_cap_wins(db: Db, live: Live) {
    let api = Api::start(Setup::new(db, live)).await;
    api.register(&stub_worker().await).await;
    let (tenant, _, admin) = api.tenant("groups", "tenant_admin").await;
    let (u1, k1) = api.user(&admin, &tenant, "u1@example.com").await;
    let (u2, k2) = api.user(&admin, &tenant, "u2@example.com").await;
    let (u3, k3) = api.user(&admin, &tenant, "u3@example.com").await;
    let (u4, k4) = api.user(&admin, &tenant, "u4@example.com").await;
    // parent ⊃ child; u1 and u2 are in the child only. u1 is also in `five` and `two`.
    let parent = api.group(&admin, "parent", None).await;
    let child = api.group(&admin, "child", Some(&parent)).await;
    let five = api.group(&admin, "five", None).await;
    let two = api.group(&admin, "two", None).await;
    for (g, u) in [
        (&child, &u1),
        (&child, &u2),
        (&five, &u1),
        (&two, &u1),
        (&five, &u3),
        (&five, &u4),
    ] {
        api.add_member(&admin, g, u).await;
    }
    let shared3 = api
        .profile(
            &admin,
            json!({"name": "shared3", "max_concurrent_bunkers": 3}),
        )
        .await;
    let per5 = api
        .profile(
            &admin,
            json!({"name": "per5", "max_concurrent_bunkers": 5, "per_bunker_max_memory": 1024}),
        )
        .await;
    let per2 = api
        .profile(&admin, json!({"name": "per2", "max_concurrent_bunkers": 2}))
        .await;
    api.assign(&admin, &shared3, "group", &parent, "shared")
        .await;
    api.assign(&admin, &per5, "group", &five, "per_user").await;
    api.assign(&admin, &per2, "group", &two, "per_user").await;

    // One assignment per target.
    let (st, v) = api
        .call(
            "POST",
            &format!("/quota-profiles/{per5}/assignments"),
            &admin,
            Some(json!({"target_kind": "group", "target_id": parent, "mode": "per_user"})),
        )
        .await;
    assert_eq!((st, code(&v)), (StatusCode::CONFLICT, "CONFLICT"));
    // A user takes only `individual`.
    let (st, _) = api
        .call(
            "POST",
            &format!("/quota-profiles/{per5}/assignments"),
            &admin,
            Some(json!({"target_kind": "user", "target_id": u1, "mode": "shared"})),
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);

    // u1: in two per-user groups (5 and 2): the stricter, 2, wins.
    let mut u1_bunkers = Vec::new();
    for _ in 0..2 {
        let (st, v) = api.create(&k1, json!({"image": "default"})).await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        u1_bunkers.push(v["data"]["id"].as_str().expect("id").to_owned());
    }
    let (st, v) = api.create(&k1, json!({"image": "default"})).await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "{v}");
    let d = details(&v);
    assert_eq!(
        (d["profile_id"].as_str(), d["bucket"].as_str()),
        (per2.as_str(), format!("user:{u1}").as_str())
    );

    // u2 shares the parent's bucket of 3 through the nested child group: one more fits.
    let (st, v) = api.create(&k2, json!({"image": "default"})).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let (st, v) = api.create(&k2, json!({"image": "default"})).await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "{v}");
    let d = details(&v);
    assert_eq!(
        (d["profile_id"].as_str(), d["bucket"].as_str()),
        (shared3.as_str(), format!("group:{parent}").as_str())
    );
    assert_eq!(d["current"], "3");

    // u3 and u4 each get their own copy of `per5`.
    for k in [&k3, &k4] {
        for i in 0..5 {
            let (st, v) = api.create(k, json!({"image": "default"})).await;
            assert_eq!(st, StatusCode::CREATED, "copy {i}: {v}");
        }
        let (st, v) = api.create(k, json!({"image": "default"})).await;
        assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "{v}");
    }
    // Per-bunker maximum of `per5`.
    let (st, v) = api
        .create(&k3, json!({"image": "default", "memory_mb": 2048}))
        .await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "{v}");
    let d = details(&v);
    assert_eq!(
        (
            d["bucket"].as_str(),
            d["resource"].as_str(),
            d["cap"].as_str()
        ),
        ("per_bunker", "memory_mb", "1024")
    );

    // Usage as u1 sees it: three profiles, its own bucket twice and the parent's.
    assert_eq!(
        api.current(&k1, &per2, &format!("user:{u1}"), "concurrent_bunkers")
            .await,
        Some(2)
    );
    assert_eq!(
        api.current(&k1, &per5, &format!("user:{u1}"), "concurrent_bunkers")
            .await,
        Some(2)
    );
    assert_eq!(
        api.current(
            &k1,
            &shared3,
            &format!("group:{parent}"),
            "concurrent_bunkers"
        )
        .await,
        Some(3)
    );
    assert_eq!(
        api.current(&k3, &per5, &format!("user:{u3}"), "concurrent_bunkers")
            .await,
        Some(5)
    );
    // An admin reads another user's usage; a user may not.
    let (st, v) = api
        .call(
            "GET",
            &format!("/quota-profiles/usage?user_id={u1}"),
            &admin,
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    // Three profiles apply: six resources of their buckets and `storage_mb` of the tenant each.
    assert_eq!(v["data"].as_array().map(Vec::len), Some(21));
    let (st, _) = api
        .call(
            "GET",
            &format!("/quota-profiles/usage?user_id={u1}"),
            &k2,
            None,
        )
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN);

    // Freeing one of u1's bunkers frees the shared bucket for u2.
    api.call("DELETE", &format!("/bunkers/{}", u1_bunkers[0]), &k1, None)
        .await;
    let (st, v) = api.create(&k2, json!({"image": "default"})).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");

    // Removing the stricter assignment lifts u1's cap to 5 (the shared bucket is full now).
    let (_, v) = api
        .call(
            "GET",
            &format!("/quota-profiles/{per2}/assignments"),
            &admin,
            None,
        )
        .await;
    let aid = v["data"][0]["id"].as_str().expect("assignment").to_owned();
    let (st, _) = api
        .call(
            "DELETE",
            &format!("/quota-profiles/{per2}/assignments/{aid}"),
            &admin,
            None,
        )
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, v) = api.create(&k1, json!({"image": "default"})).await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(details(&v)["profile_id"], shared3);
    api.finish().await;
}

async fn every_way_a_bunker_ends_releases_its_quota_once(db: Db, live: Live) {
    let mut setup = Setup::new(db, live);
    setup.job_interval = Duration::from_millis(200);
    setup.heartbeat_interval = Duration::from_secs(1);
    let api = Api::start(setup).await;
    let wid = api.register(&stub_worker().await).await;
    let (_, user, key) = api.tenant("ends", "tenant_admin").await;
    let qp = api
        .profile(&key, json!({"name": "one", "max_concurrent_bunkers": 1}))
        .await;
    api.assign(&key, &qp, "user", &user, "individual").await;
    let bucket = format!("user:{user}");
    let current = || api.current(&key, &qp, &bucket, "concurrent_bunkers");
    // A job commits a bunker's end, then releases its quota: wait briefly for the release.
    let released = || async {
        for _ in 0..50 {
            if current().await == Some(0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        current().await
    };
    let create = |body: Value| async {
        api.heartbeat(&wid, &[]).await;
        let (st, v) = api.create(&key, body).await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        v["data"]["id"].as_str().expect("id").to_owned()
    };

    // Delete, twice: released once.
    let a = create(json!({"image": "default"})).await;
    let (st, _) = api.create(&key, json!({"image": "default"})).await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS);
    for _ in 0..2 {
        let (st, _) = api
            .call("DELETE", &format!("/bunkers/{a}"), &key, None)
            .await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(current().await, Some(0));
    }
    let b = create(json!({"image": "default"})).await;
    api.call("DELETE", &format!("/bunkers/{a}"), &key, None)
        .await;
    assert_eq!(
        current().await,
        Some(1),
        "a third delete of `a` leaves `b`'s charge"
    );

    // The worker no longer runs the VM (it restarted): failed, released.
    api.heartbeat(&wid, &[]).await;
    assert_eq!(api.status(&key, &b).await, "failed");
    assert_eq!(current().await, Some(0));

    // A failed boot releases.
    let c = create(json!({"image": "default", "env_vars": {"FAIL_BOOT": "1"}})).await;
    assert_eq!(api.status(&key, &c).await, "failed");
    assert_eq!(current().await, Some(0));

    // The sweeper ends a bunker past its lifetime.
    let d = create(json!({"image": "default", "max_lifetime_s": 1})).await;
    assert_eq!(current().await, Some(1));
    for _ in 0..10 {
        api.heartbeat(&wid, &[&d]).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    api.wait_status(&key, &d, "terminated", Duration::from_secs(10))
        .await;
    assert_eq!(released().await, Some(0));

    // Pause keeps the quota; then the monitor fails the bunkers of a worker that went silent.
    let e = create(json!({"image": "default"})).await;
    assert_eq!(current().await, Some(1));
    let (st, v) = api
        .call("POST", &format!("/bunkers/{e}/pause"), &key, None)
        .await;
    assert_eq!(
        (st, v["data"]["status"].as_str()),
        (StatusCode::OK, Some("paused")),
        "{v}"
    );
    assert_eq!(current().await, Some(1));
    api.wait_status(&key, &e, "failed", Duration::from_secs(20))
        .await;
    assert_eq!(released().await, Some(0));

    // Every end is seen again by reconciliation: nothing to release twice.
    assert_eq!(
        quotas::reconcile(&api.handle.services)
            .await
            .expect("reconcile"),
        0
    );
    assert_eq!(current().await, Some(0));
    let stashes = api
        .handle
        .services
        .live
        .quota_stashes()
        .await
        .expect("stashes");
    assert!(stashes.is_empty(), "{stashes:?}");
    api.finish().await;
}

async fn profiles_are_tenant_scoped_audited_and_permission_checked(db: Db, live: Live) {
    let api = Api::start(Setup::new(db, live)).await;
    let (tenant_a, user_a, admin_a) = api.tenant("ta", "tenant_admin").await;
    let (_, user_b, admin_b) = api.tenant("tb", "tenant_admin").await;
    let (_, _, user_key) = api.tenant("tc", "tenant_user").await;

    let qp = api
        .profile(
            &admin_a,
            json!({"name": "a", "description": "team a", "max_cpu_millicores": 4000}),
        )
        .await;
    let (st, v) = api
        .call("GET", &format!("/quota-profiles/{qp}"), &admin_a, None)
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["data"]["tenant_id"], tenant_a);
    assert_eq!(v["data"]["max_cpu_millicores"], 4000);
    assert_eq!(v["data"]["max_memory_mb"], Value::Null);

    // PATCH: absent stays, null removes, a value sets.
    let (st, v) = api
        .call(
            "PATCH",
            &format!("/quota-profiles/{qp}"),
            &admin_a,
            Some(json!({"max_cpu_millicores": null, "max_memory_mb": 2048})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["data"]["max_cpu_millicores"], Value::Null);
    assert_eq!(v["data"]["max_memory_mb"], 2048);
    assert_eq!(v["data"]["description"], "team a");

    // Another tenant's profile is not found, whatever the verb.
    for (method, path, body) in [
        ("GET", format!("/quota-profiles/{qp}"), None),
        (
            "PATCH",
            format!("/quota-profiles/{qp}"),
            Some(json!({"name": "x"})),
        ),
        ("DELETE", format!("/quota-profiles/{qp}"), None),
        ("GET", format!("/quota-profiles/{qp}/assignments"), None),
        (
            "POST",
            format!("/quota-profiles/{qp}/assignments"),
            Some(json!({"target_kind": "user", "target_id": user_b, "mode": "individual"})),
        ),
    ] {
        let (st, v) = api.call(method, &path, &admin_b, body).await;
        assert_eq!(
            (st, code(&v)),
            (StatusCode::NOT_FOUND, "QUOTA_PROFILE_NOT_FOUND"),
            "{method} {path}"
        );
    }
    let (_, v) = api.call("GET", "/quota-profiles", &admin_b, None).await;
    assert_eq!(v["data"].as_array().map(Vec::len), Some(0));
    // Assigning to another tenant's user: not found.
    let (st, v) = api
        .call(
            "POST",
            &format!("/quota-profiles/{qp}/assignments"),
            &admin_a,
            Some(json!({"target_kind": "user", "target_id": user_b, "mode": "individual"})),
        )
        .await;
    assert_eq!((st, code(&v)), (StatusCode::NOT_FOUND, "USER_NOT_FOUND"));
    // A tenant user cannot manage profiles; a tenant admin cannot make a platform default.
    let (st, v) = api
        .call(
            "POST",
            "/quota-profiles",
            &user_key,
            Some(json!({"name": "x"})),
        )
        .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::FORBIDDEN, "AUTHZ_PERMISSION_DENIED")
    );
    let (st, v) = api
        .call(
            "POST",
            "/quota-profiles",
            &admin_a,
            Some(json!({"name": "x", "tenant_id": null})),
        )
        .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::FORBIDDEN, "AUTHZ_PERMISSION_DENIED")
    );
    let (st, v) = api
        .call(
            "POST",
            "/quota-profiles",
            &admin_a,
            Some(json!({"name": "x", "tenant_id": "tnt_tb"})),
        )
        .await;
    assert_eq!((st, code(&v)), (StatusCode::NOT_FOUND, "TENANT_NOT_FOUND"));
    let (st, v) = api
        .call(
            "POST",
            "/quota-profiles",
            &admin_a,
            Some(json!({"name": "x", "max_gpu": 1})),
        )
        .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::UNPROCESSABLE_ENTITY, "VALIDATION_ERROR")
    );

    api.assign(&admin_a, &qp, "user", &user_a, "individual")
        .await;
    let (st, _) = api
        .call("DELETE", &format!("/quota-profiles/{qp}"), &admin_a, None)
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, _) = api
        .call("GET", &format!("/quota-profiles/{qp}"), &admin_a, None)
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);

    let actions: Vec<String> = sqlx::query_scalar(
        "SELECT action FROM audit_events WHERE tenant_id = ? AND action LIKE 'quota%' ORDER BY time, id",
    )
    .bind(&tenant_a)
    .fetch_all(api.handle.services.store.pool())
    .await
    .expect("audit");
    let mut sorted = actions.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        [
            "quota_assignment.create",
            "quota_profile.create",
            "quota_profile.delete",
            "quota_profile.update"
        ],
        "{actions:?}"
    );
    api.finish().await;
}

/// The ceiling escape of issue 12: a tenant admin assigns itself a profile of its own with
/// higher (or no) caps. Tenant profiles only narrow: they are evaluated together with what the
/// platform set (the default here), strictest wins. Only a profile a platform admin made lifts
/// the default, and the tenant admin can neither change nor unassign it.
async fn a_tenant_profile_narrows_but_never_lifts_the_platform_ceiling(db: Db, live: Live) {
    let api = Api::start(Setup::new(db, live)).await;
    api.register(&stub_worker().await).await;
    let root = api.handle.bootstrap_key.clone().expect("bootstrap key");
    let default = api
        .profile(
            &root,
            json!({"name": "default", "tenant_id": null, "max_concurrent_bunkers": 1}),
        )
        .await;
    let (tenant, user, key) = api.tenant("dflt", "tenant_admin").await;
    let (st, _) = api.create(&key, json!({"image": "default"})).await;
    assert_eq!(st, StatusCode::CREATED);
    let (st, v) = api.create(&key, json!({"image": "default"})).await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(details(&v)["profile_id"], default);
    // A platform default is not assigned.
    let (st, _) = api
        .call(
            "POST",
            &format!("/quota-profiles/{default}/assignments"),
            &root,
            Some(json!({"target_kind": "user", "target_id": user, "mode": "individual"})),
        )
        .await;
    // A well-formed request the profile's state refuses (the fuzzing pass's finding).
    assert_eq!(st, StatusCode::CONFLICT);
    // A tenant admin sees the default but cannot change it.
    let (st, _) = api
        .call("GET", &format!("/quota-profiles/{default}"), &key, None)
        .await;
    assert_eq!(st, StatusCode::OK);
    let (st, _) = api
        .call(
            "PATCH",
            &format!("/quota-profiles/{default}"),
            &key,
            Some(json!({"max_concurrent_bunkers": 9})),
        )
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    // The escape: a roomier profile of the tenant's own, assigned to itself, lifts nothing.
    let own = api
        .profile(&key, json!({"name": "own", "max_concurrent_bunkers": 3}))
        .await;
    api.assign(&key, &own, "user", &user, "individual").await;
    let (st, v) = api.create(&key, json!({"image": "default"})).await;
    assert_eq!(
        st,
        StatusCode::TOO_MANY_REQUESTS,
        "a tenant profile lifted the platform default: {v}"
    );
    assert_eq!(details(&v)["profile_id"], default, "{v}");
    // It still narrows: its per-bunker maximum is checked beside the default.
    let (st, v) = api
        .call(
            "PATCH",
            &format!("/quota-profiles/{own}"),
            &key,
            Some(json!({"per_bunker_max_memory": 256})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (st, v) = api
        .create(&key, json!({"image": "default", "memory_mb": 512}))
        .await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(
        (
            details(&v)["profile_id"].as_str(),
            details(&v)["bucket"].as_str()
        ),
        (own.as_str(), "per_bunker"),
        "{v}"
    );
    let (st, v) = api
        .call(
            "PATCH",
            &format!("/quota-profiles/{own}"),
            &key,
            Some(json!({"per_bunker_max_memory": null})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");

    // A platform admin grants the tenant more than the default, through a group.
    let grant = api
        .profile(
            &root,
            json!({"name": "grant", "tenant_id": tenant, "max_concurrent_bunkers": 3}),
        )
        .await;
    let everyone = api.group(&key, "everyone", None).await;
    api.add_member(&key, &everyone, &user).await;
    api.assign(&root, &grant, "group", &everyone, "per_user")
        .await;
    for _ in 0..2 {
        let (st, v) = api.create(&key, json!({"image": "default"})).await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
    }
    let (st, v) = api.create(&key, json!({"image": "default"})).await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert!([&grant, &own].contains(&&details(&v)["profile_id"]), "{v}");
    // The grant is the platform's: the tenant admin reads it, but cannot widen, reassign or
    // unassign it, nor delete it.
    let (st, _) = api
        .call("GET", &format!("/quota-profiles/{grant}"), &key, None)
        .await;
    assert_eq!(st, StatusCode::OK);
    let (st, v) = api
        .call(
            "PATCH",
            &format!("/quota-profiles/{grant}"),
            &key,
            Some(json!({"max_concurrent_bunkers": null})),
        )
        .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::FORBIDDEN, "AUTHZ_PERMISSION_DENIED")
    );
    let (st, v) = api
        .call(
            "GET",
            &format!("/quota-profiles/{grant}/assignments"),
            &key,
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let assignment = v["data"][0]["id"].as_str().expect("assignment").to_owned();
    let (st, _) = api
        .call(
            "DELETE",
            &format!("/quota-profiles/{grant}/assignments/{assignment}"),
            &key,
            None,
        )
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let (st, _) = api
        .call("DELETE", &format!("/quota-profiles/{grant}"), &key, None)
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let other = api.group(&key, "others", None).await;
    let (st, _) = api
        .call(
            "POST",
            &format!("/quota-profiles/{grant}/assignments"),
            &key,
            Some(json!({"target_kind": "group", "target_id": other, "mode": "per_user"})),
        )
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    api.finish().await;
}

/// A platform admin grants a whole tenant more than the default: a platform profile assigned
/// to the tenant, `per_user`, gives every user of it its own copy. Tenant admins can narrow a
/// tenant wide too, but never assign into another tenant.
async fn a_platform_grant_to_a_whole_tenant_lifts_the_default_for_each_user(db: Db, live: Live) {
    let api = Api::start(Setup::new(db, live)).await;
    api.register(&stub_worker().await).await;
    let root = api.handle.bootstrap_key.clone().expect("bootstrap key");
    api.profile(
        &root,
        json!({"name": "default", "tenant_id": null, "max_concurrent_bunkers": 1}),
    )
    .await;
    let (tenant, _, key) = api.tenant("wide", "tenant_admin").await;
    let (_, other_key) = api.user(&key, &tenant, "other@wide.test").await;
    let grant = api
        .profile(
            &root,
            json!({"name": "grant", "tenant_id": tenant, "max_concurrent_bunkers": 2}),
        )
        .await;
    let (st, v) = api
        .call(
            "POST",
            &format!("/quota-profiles/{grant}/assignments"),
            &root,
            Some(json!({"target_kind": "tenant", "target_id": tenant, "mode": "shared"})),
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let (st, v) = api
        .call(
            "POST",
            &format!("/quota-profiles/{grant}/assignments"),
            &root,
            Some(
                json!({"target_kind": "tenant", "target_id": "tnt_elsewhere", "mode": "per_user"}),
            ),
        )
        .await;
    assert_eq!((st, code(&v)), (StatusCode::NOT_FOUND, "TENANT_NOT_FOUND"));
    api.assign(&root, &grant, "tenant", &tenant, "per_user")
        .await;
    let (st, v) = api
        .call(
            "GET",
            &format!("/quota-profiles/{grant}/assignments"),
            &key,
            None,
        )
        .await;
    assert_eq!(v["data"][0]["target_kind"], "tenant", "{st} {v}");
    for k in [&key, &other_key] {
        for _ in 0..2 {
            let (st, v) = api.create(k, json!({"image": "default"})).await;
            assert_eq!(st, StatusCode::CREATED, "{v}");
        }
        let (st, v) = api.create(k, json!({"image": "default"})).await;
        assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "{v}");
        assert_eq!(details(&v)["profile_id"], grant, "{v}");
    }
    // A tenant admin's own profile can narrow every user of its tenant at once.
    let (other_tenant, _, other_admin) = api.tenant("nar", "tenant_admin").await;
    let own = api
        .profile(
            &other_admin,
            json!({"name": "own", "max_concurrent_bunkers": 5}),
        )
        .await;
    let (st, _) = api
        .call(
            "POST",
            &format!("/quota-profiles/{own}/assignments"),
            &other_admin,
            Some(json!({"target_kind": "tenant", "target_id": tenant, "mode": "per_user"})),
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    api.assign(&other_admin, &own, "tenant", &other_tenant, "per_user")
        .await;
    let (st, _) = api.create(&other_admin, json!({"image": "default"})).await;
    assert_eq!(st, StatusCode::CREATED);
    let (st, v) = api.create(&other_admin, json!({"image": "default"})).await;
    assert_eq!(
        st,
        StatusCode::TOO_MANY_REQUESTS,
        "the default still caps: {v}"
    );
    api.finish().await;
}

/// A worker with room for exactly `K` default bunkers takes a storm of `4K` creates: `K` are
/// placed, every other one is refused `503 WORKER_UNAVAILABLE`. On MariaDB the storm is split
/// over two controllers sharing the database, so the guard cannot be an in-process lock.
async fn a_storm_of_creates_never_overcommits_a_worker(db: Db, live: Live) {
    const K: u64 = 6;
    let api = Api::start(Setup::new(db, live)).await;
    let room = Capacity {
        cpu_millicores: K * 1000,
        memory_mb: K * 512,
        disk_mb: K * 1024,
        gpu_count: 0,
    };
    let wid = api.register_with(&stub_worker().await, room).await;
    let (_, _, key) = api.tenant("fleet", "tenant_admin").await;

    let second_dir = tempfile::tempdir().expect("dir");
    let second = match (db, &api.prefix) {
        (Db::MariaDb, Some(prefix)) => {
            let setup = Setup::new(db, live);
            let url = api.handle.services.config.database_url.clone();
            Some(start_controller(&setup, &url, Some(prefix), second_dir.path()).await)
        }
        _ => None,
    };
    let mut bases = vec![api.handle.url()];
    bases.extend(second.iter().map(|c| c.url()));

    let answers = fire_creates(&api.http, &bases, &key, 4 * K as usize).await;
    let mut placed = 0;
    for (st, v) in &answers {
        match *st {
            StatusCode::CREATED => {
                assert_eq!(v["data"]["worker_id"], wid.as_str(), "{v}");
                placed += 1;
            }
            StatusCode::SERVICE_UNAVAILABLE => assert_eq!(code(v), "WORKER_UNAVAILABLE", "{v}"),
            other => panic!("unexpected {other}: {v}"),
        }
    }
    assert_eq!(placed, K, "placed on a worker with room for {K}");

    let (_, v) = api.call("GET", "/bunkers?limit=100", &key, None).await;
    let live_ones = v["data"]
        .as_array()
        .expect("list")
        .iter()
        .filter(|b| b["status"] != "failed" && b["status"] != "terminated")
        .count();
    assert_eq!(live_ones as u64, K);
    if let Some(c) = second {
        c.shutdown().await;
    }
    api.finish().await;
}

/// Runs each scenario on SQLite and MariaDB, with Redis and in-process live state.
macro_rules! matrix {
    ($($name:ident),* $(,)?) => {
        mod sqlite_in_process {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Db::Sqlite, super::Live::InProcess).await })*
        }
        mod sqlite_redis {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Db::Sqlite, super::Live::Redis).await })*
        }
        mod mariadb_redis {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Db::MariaDb, super::Live::Redis).await })*
        }
    };
}

matrix!(
    a_storm_of_creates_never_passes_the_concurrent_cap,
    a_storm_of_creates_never_overcommits_a_worker,
    shared_and_per_user_groups_nest_and_the_strictest_cap_wins,
    every_way_a_bunker_ends_releases_its_quota_once,
    profiles_are_tenant_scoped_audited_and_permission_checked,
    a_tenant_profile_narrows_but_never_lifts_the_platform_ceiling,
    a_platform_grant_to_a_whole_tenant_lifts_the_default_for_each_user,
);

/// Two controllers on one MariaDB and one Redis tick usage together; Redis is wiped in the
/// middle, so some ticks run on both. Every window is recorded once, with the amounts one
/// controller would record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_controllers_record_each_usage_tick_once() {
    let db = Db::MariaDb.create().await;
    let prefix = unique_prefix();
    let mut setup = Setup::new(Db::MariaDb, Live::Redis);
    setup.job_interval = Duration::from_millis(200);
    setup.usage_tick = Duration::from_millis(250);
    let (d1, d2) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let c1 = start_controller(&setup, &db.url, Some(&prefix), d1.path()).await;
    let c2 = start_controller(&setup, &db.url, Some(&prefix), d2.path()).await;
    let api = Api {
        handle: c1,
        http: reqwest::Client::new(),
        prefix: Some(prefix.clone()),
        _dir: tempfile::tempdir().expect("dir"),
        _database: db,
    };
    let (tenant, user, key) = api.tenant("acct", "tenant_admin").await;
    // A bunker running since long before the first tick (seeded: no worker needed).
    let started = now_ms() - 60_000;
    sqlx::query(
        "INSERT INTO bunkers (id, tenant_id, owner_id, image_name, image_id, lifecycle_mode, status, \
         network_profile, network_allowlist, cpu_millicores, memory_mb, disk_mb, gpu_count, \
         idle_timeout_s, session_type, label_set, env_vars, interfaces, created_at, started_at) \
         VALUES ('bnk_acct', ?, ?, 'default', 'img_x', 'persistent', 'running', 'isolated', '[]', \
         2000, 1000, 4000, 1, 900, 'standalone', '{}', '{}', '[]', ?, ?)",
    )
    .bind(&tenant)
    .bind(&user)
    .bind(started)
    .bind(started)
    .execute(api.handle.services.store.pool())
    .await
    .expect("seed bunker");

    tokio::time::sleep(Duration::from_millis(1500)).await;
    wipe(&prefix).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // The same window recorded by both controllers directly: the second adds nothing.
    let tick = now_ms() / 250 + 100;
    let first = accounting::tick(&api.handle.services, tick, setup.usage_tick)
        .await
        .expect("tick");
    let second = accounting::tick(&c2.services, tick, setup.usage_tick)
        .await
        .expect("tick");
    assert_eq!((first, second), (1, 0));
    c2.shutdown().await;

    let rows: Vec<(i64, i64, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT tick_start, duration_ms, cpu_millicore_s, memory_mb_s, disk_mb_s, gpu_s \
         FROM usage_ticks WHERE bunker_id = 'bnk_acct' ORDER BY tick_start",
    )
    .fetch_all(api.handle.services.store.pool())
    .await
    .expect("ticks");
    assert!(rows.len() >= 8, "ticks recorded: {}", rows.len());
    for (start, ms, cpu, mem, disk, gpu) in &rows {
        // A full window of 250 ms: 2000 mc × 0.25 s, 1000 MB × 0.25 s, …
        assert_eq!(
            (*ms, *cpu, *mem, *disk, *gpu),
            (250, 500, 250, 1000, 0),
            "tick {start}"
        );
        assert_eq!(start % 250, 0);
    }
    assert!(
        !api.handle.job_ticks("usage").is_empty(),
        "controller one ran usage ticks"
    );

    // The report sums what the rows hold.
    let (st, v) = api
        .call(
            "GET",
            "/v1/accounting/usage?group_by=tenant,user",
            &key,
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let row = &v["data"][0];
    assert_eq!(row["tenant_id"], tenant.as_str());
    assert_eq!(row["user_id"], user.as_str());
    assert_eq!(row["ticks"], rows.len() as i64);
    assert_eq!(row["cpu_millicore_seconds"], 500 * rows.len() as i64);
    let (st, v) = api
        .call("GET", "/v1/accounting/usage?group_by=hour", &key, None)
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let total: i64 = v["data"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r["disk_mb_seconds"].as_i64().expect("n"))
        .sum();
    assert_eq!(total, 1000 * rows.len() as i64);
    // Another tenant is a platform admin's business; a bad grouping is a validation error.
    let (st, _) = api
        .call(
            "GET",
            "/v1/accounting/usage?tenant_id=tnt_other",
            &key,
            None,
        )
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let (st, _) = api
        .call("GET", "/v1/accounting/usage?group_by=week", &key, None)
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
    api.finish().await;
}
