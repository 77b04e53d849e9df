//! Budgets on what a tenant can make the controller keep: the stream resume buffers (a total and a
//! per-tenant byte budget), stored bytes (`max_storage_mb`) and spilled exec outputs (deleted
//! with their bunker and after their retention). A real controller on both SQL backends, the real
//! local object store, and a stand-in worker answered in-process whose execs print what their
//! command says:
//! - `emit N`: N bytes of stdout, then exit 0;
//! - `emit N hold`: N bytes of stdout, then wait until the test releases the bunker's execs.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Json as AxJson, Path, State};
use axum::http::StatusCode as AxStatus;
use axum::response::Response;
use axum::routing::post;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use reqwest::StatusCode;
use scaibunker_controller::config::ControllerConfig;
use scaibunker_controller::{ControllerHandle, start};
use scaibunker_proto::worker::{
    BootSource, Capacity, CreateVm, ExecRequest, ExecStreamEvent, Program, VmInfo, VmStatus,
};
use serde_json::{Value, json};
use tokio::sync::watch;

#[macro_use]
mod common;

use common::{Db, TestDatabase};

const WORKER_TOKEN: &str = "swt_budgets_worker_token";
const IMAGE_SHA: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const MIB: u64 = 1024 * 1024;
/// The stream budgets of the controller under test.
const STREAM_TOTAL: u64 = 6 * MIB;
const STREAM_TENANT: u64 = 4 * MIB;
/// What a held exec prints: half a reservation, so an admitted stream never needs to grow.
const HELD_OUTPUT: u64 = 512 * 1024;
/// What the controller charges a new streamed exec up front.
const RESERVE: u64 = scaibunker_controller::service::exec_budget::RESERVE_BYTES;

#[derive(Clone)]
struct FakeWorker {
    /// Execs the worker was asked to start.
    execs: Arc<AtomicUsize>,
    /// Bunkers whose held execs may exit.
    release: watch::Sender<HashSet<String>>,
}

async fn create_vm(AxJson(req): AxJson<CreateVm>) -> AxJson<VmInfo> {
    AxJson(VmInfo {
        bunker_id: req.bunker_id,
        status: VmStatus::Running,
        guest_kernel: None,
        boot_ms: 1,
        boot_source: BootSource::Cold,
    })
}

async fn delete_vm() -> AxStatus {
    AxStatus::NO_CONTENT
}

fn line(event: &ExecStreamEvent) -> Result<Bytes, std::convert::Infallible> {
    Ok(Bytes::from(
        serde_json::to_string(event).expect("json") + "\n",
    ))
}

/// Runs `emit N [hold]` (see the module docs).
async fn exec_stream(
    State(w): State<FakeWorker>,
    Path(id): Path<String>,
    AxJson(req): AxJson<ExecRequest>,
) -> Response {
    w.execs.fetch_add(1, Ordering::SeqCst);
    let Program::Shell(command) = req.program else {
        panic!("the test sends shell commands");
    };
    let words: Vec<&str> = command.split_whitespace().collect();
    let n: usize = words[1].parse().expect("emit N");
    let hold = words.get(2) == Some(&"hold");
    let mut release = w.release.subscribe();
    let body = async_stream(n, hold, async move {
        let _ = release.wait_for(|r| r.contains(&id)).await;
    });
    Response::new(Body::from_stream(body))
}

/// `n` bytes of stdout in 64 KiB chunks, then (after `held`, when `hold`) the exit.
fn async_stream(
    n: usize,
    hold: bool,
    held: impl std::future::Future<Output = ()> + Send + 'static,
) -> impl futures_util::Stream<Item = Result<Bytes, std::convert::Infallible>> {
    let chunk = 64 * 1024;
    let out: Vec<_> = (0..n.div_ceil(chunk))
        .map(|i| {
            line(&ExecStreamEvent::Stdout {
                data_b64: B64.encode(vec![b'x'; chunk.min(n - i * chunk)]),
            })
        })
        .collect();
    let exit = line(&ExecStreamEvent::Exit {
        exit_code: Some(0),
        signal: None,
        timed_out: false,
        guest_duration_ms: 1,
        stdout_total_bytes: n as u64,
        stderr_total_bytes: 0,
    });
    let end = futures_util::stream::once(async move {
        if hold {
            held.await;
        }
        exit
    });
    futures_util::StreamExt::chain(futures_util::stream::iter(out), end)
}

struct Api {
    handle: ControllerHandle,
    http: reqwest::Client,
    /// The platform tenant's super admin.
    key: String,
    worker: FakeWorker,
    worker_task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
    _database: TestDatabase,
}

impl Drop for Api {
    fn drop(&mut self) {
        self.worker_task.abort();
    }
}

impl Api {
    async fn start(db: Db, tune: impl FnOnce(&mut ControllerConfig)) -> Api {
        let database = db.create().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let listen: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let mut config =
            ControllerConfig::embedded(dir.path().to_path_buf(), listen, WORKER_TOKEN.into());
        config.database_url = database.url.clone();
        if let Db::MariaDb = db {
            config.redis_url = Some(common::redis_url());
            config.redis_prefix = common::unique_redis_prefix();
        }
        config.job_interval = Duration::from_secs(3600);
        config.stream_buffer_bytes = STREAM_TOTAL;
        config.stream_buffer_tenant_bytes = STREAM_TENANT;
        tune(&mut config);
        let handle = start(config).await.expect("controller starts");
        let key = handle.bootstrap_key.clone().expect("bootstrap key");
        let worker = FakeWorker {
            execs: Arc::default(),
            release: watch::channel(HashSet::new()).0,
        };
        let app = axum::Router::new()
            .route("/v1/worker/bunkers", post(create_vm))
            .route("/v1/worker/bunkers/{id}", axum::routing::delete(delete_vm))
            .route("/v1/worker/bunkers/{id}/exec/stream", post(exec_stream))
            .with_state(worker.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let worker_url = format!("http://{}", listener.local_addr().expect("addr"));
        let worker_task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("serve");
        });
        let api = Api {
            handle,
            http: reqwest::Client::new(),
            key,
            worker,
            worker_task,
            _dir: dir,
            _database: database,
        };
        let register = common::fake_registration(
            worker_url,
            IMAGE_SHA,
            Capacity {
                cpu_millicores: 64_000,
                memory_mb: 65_536,
                disk_mb: 1_000_000,
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
        if path.starts_with("/v1/") {
            format!("{}{path}", self.handle.url())
        } else {
            format!("{}/v1/modules/scaibunker{path}", self.handle.url())
        }
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        key: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        common::request(&self.http, method, self.url(path), Some(key), body).await
    }

    /// A tenant with one tenant admin; returns (tenant id, key).
    async fn tenant(&self, slug: &str) -> (String, String) {
        let (tenant, _, key) =
            common::tenant_with_key(&self.handle.services.store, slug, "tenant_admin").await;
        (tenant, key)
    }

    /// A running bunker of the caller's tenant.
    async fn bunker(&self, key: &str) -> String {
        let (st, v) = self
            .call("POST", "/bunkers", key, Some(json!({"image": "default"})))
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        v["data"]["id"].as_str().expect("id").to_owned()
    }

    /// Starts a streamed exec and hangs up as soon as it is answered: the exec id when it
    /// started, else the refusal's status, `Retry-After` and body.
    async fn stream_and_hang_up(
        &self,
        key: &str,
        bunker: &str,
        command: &str,
    ) -> Result<String, (StatusCode, Option<String>, Value)> {
        let resp = self
            .http
            .post(self.url(&format!("/bunkers/{bunker}/exec")))
            .bearer_auth(key)
            .json(&json!({"command": command, "stream": true}))
            .send()
            .await
            .expect("request");
        if resp.status() == StatusCode::OK {
            let id = resp.headers()["x-exec-id"].to_str().expect("id").to_owned();
            drop(resp);
            return Ok(id);
        }
        let retry = resp
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().expect("ascii").to_owned());
        let (st, v) = common::json_of(resp).await;
        Err((st, retry, v))
    }

    /// Lets the held execs of `bunker` exit.
    fn release(&self, bunker: &str) {
        self.worker.release.send_modify(|r| {
            r.insert(bunker.to_owned());
        });
    }

    /// (controller total, tenant) bytes charged to stream buffers.
    fn stream_usage(&self, tenant: &str) -> (u64, u64) {
        self.handle.services.exec_hub.usage(tenant)
    }
}

/// Asserts a refusal is `429 STREAM_BUDGET_EXCEEDED` of `budget`, with `Retry-After`.
fn assert_refused(r: Result<String, (StatusCode, Option<String>, Value)>, budget: &str) {
    let Err((st, retry, v)) = r else {
        panic!("the {budget} budget is full, yet the streamed exec started");
    };
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(v["error"]["code"], "STREAM_BUDGET_EXCEEDED", "{v}");
    assert_eq!(v["error"]["details"][0]["field"], "budget", "{v}");
    assert_eq!(v["error"]["details"][0]["message"], budget, "{v}");
    assert!(retry.is_some(), "a refusal says when to retry");
}

async fn disconnected_streams_of_one_tenant_leave_room_for_the_others(db: Db) {
    let api = Api::start(db, |_| {}).await;
    let (tenant_a, key_a) = api.tenant("alpha").await;
    let (tenant_b, key_b) = api.tenant("bravo").await;
    let (bunker_a, bunker_b, bunker_p) = (
        api.bunker(&key_a).await,
        api.bunker(&key_b).await,
        api.bunker(&api.key).await,
    );
    let held = format!("emit {HELD_OUTPUT} hold");

    // Tenant A opens stream after stream and walks away from each: its own budget fills (four
    // reservations), the rest are refused before the worker hears of them.
    let mut started_a = Vec::new();
    let mut refused_a = 0;
    for _ in 0..12 {
        match api.stream_and_hang_up(&key_a, &bunker_a, &held).await {
            Ok(id) => started_a.push(id),
            refusal => {
                assert_refused(refusal, "tenant");
                refused_a += 1;
            }
        }
    }
    assert_eq!(started_a.len(), 4, "A's budget holds four reservations");
    assert_eq!(refused_a, 8);
    assert_eq!(
        api.worker.execs.load(Ordering::SeqCst),
        4,
        "refused execs never started"
    );
    assert_eq!(api.stream_usage(&tenant_a).1, STREAM_TENANT);

    // B is not pushed out by A.
    api.stream_and_hang_up(&key_b, &bunker_b, &held)
        .await
        .expect("B's streamed exec starts beside A's");
    // The platform tenant takes the last MiB of the total; then the total refuses it.
    api.stream_and_hang_up(&api.key, &bunker_p, &held)
        .await
        .expect("the last MiB of the total");
    assert_refused(
        api.stream_and_hang_up(&api.key, &bunker_p, &held).await,
        "controller",
    );
    assert_eq!(api.stream_usage(&tenant_b), (STREAM_TOTAL, RESERVE));

    // A's execs end: their buffers only hold what they printed and may be evicted. The platform
    // tenant's new streams are then admitted by evicting A's finished buffers, and nobody is
    // refused while a finished buffer is left to evict.
    api.release(&bunker_a);
    for _ in 0..200 {
        if api.stream_usage(&tenant_a).1 < STREAM_TENANT * 3 / 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let finished_a = api.stream_usage(&tenant_a).1;
    assert!(
        finished_a < STREAM_TENANT * 3 / 4,
        "A's finished buffers: {finished_a}"
    );
    for i in 0..3 {
        api.stream_and_hang_up(&api.key, &bunker_p, &held)
            .await
            .unwrap_or_else(|e| panic!("stream {i} of the platform tenant refused: {e:?}"));
        let (total, _) = api.stream_usage(&tenant_a);
        assert!(total <= STREAM_TOTAL, "the total holds: {total}");
    }
    let (_, left_a) = api.stream_usage(&tenant_a);
    assert!(
        left_a < finished_a - HELD_OUTPUT,
        "A's finished buffers were evicted: {left_a}"
    );
    let mut gone = 0;
    for exec in &started_a {
        let (st, v) = api
            .call(
                "GET",
                &format!("/bunkers/{bunker_a}/exec/{exec}/events"),
                &key_a,
                None,
            )
            .await;
        match st {
            StatusCode::NOT_FOUND => gone += 1,
            StatusCode::OK => {}
            other => panic!("{other}: {v}"),
        }
    }
    assert!(
        gone >= 2,
        "evicted execs are no longer resumable ({gone} of 4)"
    );
    // B's running exec kept its buffer throughout.
    assert_eq!(api.stream_usage(&tenant_b).1, RESERVE);
    // The platform tenant now holds its own cap: the next one is refused by its tenant budget.
    assert_refused(
        api.stream_and_hang_up(&api.key, &bunker_p, &held).await,
        "tenant",
    );
    for b in [&bunker_b, &bunker_p] {
        api.release(b);
    }
}

/// What lies under `prefix` in the controller's object store.
async fn objects_under(api: &Api, prefix: &str) -> Vec<String> {
    api.handle
        .services
        .objects()
        .list(prefix)
        .await
        .expect("list")
        .into_iter()
        .map(|o| o.key)
        .collect()
}

impl Api {
    /// The `storage_mb` row of `profile` in the caller's usage.
    async fn storage_usage(&self, key: &str, profile: &str) -> Value {
        let (st, v) = self.call("GET", "/quota-profiles/usage", key, None).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        v["data"]
            .as_array()
            .expect("rows")
            .iter()
            .find(|r| r["resource"] == "storage_mb" && r["profile_id"] == profile)
            .unwrap_or_else(|| panic!("no storage_mb row of {profile}: {v}"))
            .clone()
    }

    /// Runs `emit N` inline; returns the result.
    async fn exec_emit(&self, key: &str, bunker: &str, n: u64) -> Value {
        let (st, v) = self
            .call(
                "POST",
                &format!("/bunkers/{bunker}/exec"),
                key,
                Some(json!({"command": format!("emit {n}")})),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        assert_eq!(v["data"]["exit_code"], 0, "{v}");
        assert_eq!(v["data"]["truncated"], true, "{v}");
        v["data"].clone()
    }

    /// Waits (up to 20 s) until nothing is left under `prefix`.
    async fn until_gone(&self, prefix: &str) {
        for _ in 0..200 {
            if objects_under(self, prefix).await.is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "{prefix} still holds {:?}",
            objects_under(self, prefix).await
        );
    }
}

async fn stored_bytes_are_capped_and_spills_go_with_their_bunker_or_their_age(db: Db) {
    let api = Api::start(db, |c| {
        c.exec_inline_limit_bytes = 1024;
        c.job_interval = Duration::from_millis(200);
    })
    .await;
    let (tenant, key) = api.tenant("alpha").await;
    // The platform default caps every tenant at 3 MiB; the tenant's own, wider profile cannot
    // lift that: the strictest wins.
    let (st, v) = api
        .call(
            "POST",
            "/quota-profiles",
            &api.key,
            Some(json!({"name": "default", "tenant_id": null, "max_storage_mb": 3})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["data"]["max_storage_mb"], 3, "{v}");
    let platform = v["data"]["id"].as_str().expect("id").to_owned();
    let (st, v) = api
        .call(
            "POST",
            "/quota-profiles",
            &key,
            Some(json!({"name": "wide", "max_storage_mb": 100})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let wide = v["data"]["id"].as_str().expect("id").to_owned();
    let (st, v) = api
        .call(
            "POST",
            &format!("/quota-profiles/{wide}/assignments"),
            &key,
            Some(json!({"target_kind": "user", "target_id": "usr_alpha", "mode": "individual"})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let (first, second) = (api.bunker(&key).await, api.bunker(&key).await);
    let usage = api.storage_usage(&key, &platform).await;
    assert_eq!(
        (&usage["bucket"], &usage["current"], &usage["cap"]),
        (&json!(format!("tenant:{tenant}")), &json!(0), &json!(3)),
        "{usage}"
    );

    // Two spills fit: 1.5 MiB and 1 MiB, both stored and counted.
    let out = api.exec_emit(&key, &first, 3 * MIB / 2).await;
    assert!(out["full_output_ref"].is_string(), "{out}");
    api.exec_emit(&key, &second, MIB).await;
    assert_eq!(api.storage_usage(&key, &platform).await["current"], 3);
    let first_spills = format!("exec-output/{tenant}/{first}/");
    let second_spills = format!("exec-output/{tenant}/{second}/");
    assert_eq!(
        objects_under(&api, &first_spills).await.len(),
        2,
        "stdout and stderr"
    );

    // A third would pass the cap: the exec runs, its output is not kept.
    let before = objects_under(&api, &second_spills).await;
    let out = api.exec_emit(&key, &second, MIB).await;
    assert!(out["full_output_ref"].is_null(), "{out}");
    assert_eq!(out["stdout"].as_str().expect("inline").len(), 1024);
    assert_eq!(objects_under(&api, &second_spills).await, before);

    // An image that does not fit is refused before anything changes.
    let (st, v) = api
        .call(
            "POST",
            "/images",
            &key,
            Some(json!({"name": "big", "source": {"kind": "tar"}, "size_mib": 16, "scope": "tenant"})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let image = v["data"]["id"].as_str().expect("id").to_owned();
    let resp = api
        .http
        .put(api.url(&format!("/images/{image}/content")))
        .bearer_auth(&key)
        .body(vec![0u8; 4096])
        .send()
        .await
        .expect("put");
    let (st, v) = common::json_of(resp).await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(v["error"]["code"], "STORAGE_QUOTA_EXCEEDED", "{v}");
    let details: Vec<(String, String)> = v["error"]["details"]
        .as_array()
        .expect("details")
        .iter()
        .map(|d| {
            (
                d["field"].as_str().expect("field").to_owned(),
                d["message"].as_str().expect("message").to_owned(),
            )
        })
        .collect();
    for want in [
        ("profile_id", platform.as_str()),
        ("bucket", &format!("tenant:{tenant}")),
        ("resource", "storage_mb"),
        ("cap", "3"),
        ("requested", "16"),
    ] {
        assert!(
            details
                .iter()
                .any(|(f, m)| (f.as_str(), m.as_str()) == want),
            "{want:?} in {v}"
        );
    }
    let (_, v) = api
        .call("GET", &format!("/images/{image}"), &key, None)
        .await;
    assert_eq!(v["data"]["status"], "pending", "{v}");

    // A tenant at its cap takes no snapshot; the bunker stays as it was.
    let (st, v) = api
        .call(
            "PATCH",
            &format!("/quota-profiles/{platform}"),
            &api.key,
            Some(json!({"max_storage_mb": 2})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (st, v) = api
        .call(
            "POST",
            &format!("/bunkers/{second}/snapshot"),
            &key,
            Some(json!({})),
        )
        .await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(v["error"]["code"], "STORAGE_QUOTA_EXCEEDED", "{v}");
    let (_, v) = api
        .call("GET", &format!("/bunkers/{second}"), &key, None)
        .await;
    assert_eq!(v["data"]["status"], "running", "{v}");

    // Deleting a bunker deletes its spills (the job does, shortly after), and the usage drops.
    let (st, v) = api
        .call("DELETE", &format!("/bunkers/{first}"), &key, None)
        .await;
    assert!(st.is_success(), "{st}: {v}");
    api.until_gone(&first_spills).await;
    assert_eq!(api.storage_usage(&key, &platform).await["current"], 1);
    assert!(!objects_under(&api, &second_spills).await.is_empty());

    // Spills past their retention are deleted by the same job's pass.
    let deleted = scaibunker_controller::service::storage_quota::delete_spills(
        &api.handle.services,
        Duration::ZERO,
    )
    .await
    .expect("spills deleted");
    assert_eq!(deleted, 2, "stdout and stderr of the second bunker's exec");
    assert!(objects_under(&api, &second_spills).await.is_empty());
    assert_eq!(api.storage_usage(&key, &platform).await["current"], 0);
}

both!(
    disconnected_streams_of_one_tenant_leave_room_for_the_others,
    stored_bytes_are_capped_and_spills_go_with_their_bunker_or_their_age,
);
