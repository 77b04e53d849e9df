//! Background jobs and rate limits across controllers: two controllers on one MariaDB and one
//! Redis run each job once per tick, keep doing so after Redis is wiped, and share rate
//! windows. A single embedded controller (SQLite, in-process live state) sweeps too.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Db, TestDatabase};
use reqwest::StatusCode;
use scaibunker_controller::config::ControllerConfig;
use scaibunker_controller::store::bunkers::{BunkerRow, insert};
use scaibunker_controller::store::now_ms;
use scaibunker_controller::{ControllerHandle, start};

fn redis_url() -> String {
    std::env::var("SCAIBUNKER_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

async fn wipe(prefix: &str) {
    let client = redis::Client::open(redis_url()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("Redis is not reachable at {} ({e})", redis_url()));
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut conn)
        .await
        .expect("KEYS");
    for k in keys {
        let _: () = redis::cmd("DEL")
            .arg(k)
            .query_async(&mut conn)
            .await
            .expect("DEL");
    }
}

async fn controller(
    db: &TestDatabase,
    dir: &std::path::Path,
    redis_prefix: Option<&str>,
    rate_limit: u32,
) -> ControllerHandle {
    let listen: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let mut c = ControllerConfig::embedded(dir.to_path_buf(), listen, "swt_jobs".into());
    c.database_url = db.url.clone();
    c.job_interval = Duration::from_millis(150);
    c.rate_limit_per_minute = rate_limit;
    if let Some(p) = redis_prefix {
        c.redis_url = Some(redis_url());
        c.redis_prefix = p.to_owned();
    }
    start(c).await.expect("controller starts")
}

/// A running bunker row whose lifetime ended long ago (no worker: nothing to stop).
fn expired_bunker(
    id: &str,
    tenant_id: &str,
    owner_id: &str,
    status: &str,
    age_ms: i64,
) -> BunkerRow {
    let long_ago = now_ms() - age_ms;
    BunkerRow {
        id: id.into(),
        tenant_id: tenant_id.into(),
        owner_id: owner_id.into(),
        name: None,
        image_name: "default".into(),
        image_id: "img_x".into(),
        snapshot_id: None,
        lifecycle_mode: "ephemeral".into(),
        status: status.into(),
        network_profile: "isolated".into(),
        network_allowlist: "[]".into(),
        cpu_millicores: 1000,
        memory_mb: 512,
        disk_mb: 1024,
        gpu_count: 0,
        gpu_type: None,
        max_lifetime_s: Some(60),
        idle_timeout_s: 30,
        session_type: "standalone".into(),
        session_ref: None,
        label_set: "{}".into(),
        env_vars: "{}".into(),
        interfaces: "[]".into(),
        bandwidth_mbit: None,
        worker_id: None,
        failure_reason: None,
        created_at: long_ago,
        started_at: Some(long_ago),
        last_activity_at: Some(long_ago),
        terminated_at: None,
    }
}

async fn seed(h: &ControllerHandle, row: &BunkerRow) {
    let mut tx = h.services.store.begin().await.expect("tx");
    insert(&mut tx, row).await.expect("insert");
    tx.commit().await.expect("commit");
}

async fn events(h: &ControllerHandle, id: &str, action: &str) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM audit_events WHERE resource_id = ? AND action = ?")
        .bind(id)
        .bind(action)
        .fetch_one(h.services.store.pool())
        .await
        .expect("count")
}

async fn status(h: &ControllerHandle, tenant: &str, id: &str) -> String {
    h.services
        .store
        .bunker(tenant, id)
        .await
        .expect("read")
        .expect("row")
        .status
}

async fn wait_for_status(h: &ControllerHandle, tenant: &str, id: &str, want: &str) {
    for _ in 0..100 {
        if status(h, tenant, id).await == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{id} never became {want}");
}

#[tokio::test]
async fn two_controllers_sweep_each_expired_bunker_once_even_after_redis_is_wiped() {
    let db = Db::MariaDb.create().await;
    let prefix = format!("sbtest:jobs:{}:", now_ms());
    let (d1, d2) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let a = controller(&db, d1.path(), Some(&prefix), 1000).await;
    let b = controller(&db, d2.path(), Some(&prefix), 1000).await;
    let tenant = a.services.store.tenants().await.expect("tenants")[0]
        .id
        .clone();

    seed(
        &a,
        &expired_bunker("bnk_expired1", &tenant, "usr_x", "running", 3_600_000),
    )
    .await;
    seed(
        &a,
        &expired_bunker("bnk_idle1", &tenant, "usr_x", "paused", 40_000),
    )
    .await;
    seed(
        &a,
        &expired_bunker("bnk_stuck1", &tenant, "usr_x", "provisioning", 700_000),
    )
    .await;
    wait_for_status(&a, &tenant, "bnk_expired1", "terminated").await;
    wait_for_status(&a, &tenant, "bnk_idle1", "terminated").await;
    wait_for_status(&a, &tenant, "bnk_stuck1", "failed").await;
    // Several more ticks on both controllers: still one event each.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(events(&a, "bnk_expired1", "bunker.expire").await, 1);
    assert_eq!(events(&a, "bnk_idle1", "bunker.expire").await, 1);
    assert_eq!(events(&a, "bnk_stuck1", "bunker.fail").await, 1);
    let reason: Option<String> =
        sqlx::query_scalar("SELECT details FROM audit_events WHERE resource_id = 'bnk_idle1'")
            .fetch_optional(a.services.store.pool())
            .await
            .expect("details");
    assert!(reason.is_some_and(|r| r.contains("idle_timeout_s")));

    // Redis loses everything; the jobs carry on, still once per bunker.
    // The tick in which the wipe lands may run twice (its lease is gone): jobs are idempotent
    // compare-and-set work, so that is harmless; every other tick must run once.
    let tick_ms = 150u128;
    let wipe_from = now_ms() as u128 / tick_ms;
    wipe(&prefix).await;
    let wipe_to = now_ms() as u128 / tick_ms;
    seed(
        &b,
        &expired_bunker("bnk_expired2", &tenant, "usr_x", "running", 3_600_000),
    )
    .await;
    wait_for_status(&b, &tenant, "bnk_expired2", "terminated").await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(events(&b, "bnk_expired2", "bunker.expire").await, 1);

    // Each tick of each job ran on exactly one controller, and ticks kept coming.
    for job in ["sweep", "monitor"] {
        let (ta, tb) = (a.job_ticks(job), b.job_ticks(job));
        let mut all: Vec<u128> = ta
            .iter()
            .chain(&tb)
            .copied()
            .filter(|t| !(wipe_from..=wipe_to).contains(t))
            .collect();
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "{job}: a tick ran twice ({ta:?} / {tb:?})");
        assert!(n >= 8, "{job}: only {n} ticks ran");
    }

    a.shutdown().await;
    b.shutdown().await;
    wipe(&prefix).await;
}

#[tokio::test]
async fn an_embedded_controller_sweeps_and_leaves_persistent_and_fresh_bunkers_alone() {
    let db = Db::Sqlite.create().await;
    let dir = tempfile::tempdir().expect("dir");
    let h = controller(&db, dir.path(), None, 1000).await;
    let tenant = h.services.store.tenants().await.expect("tenants")[0]
        .id
        .clone();
    let mut persistent = expired_bunker("bnk_persist", &tenant, "usr_x", "running", 40_000);
    persistent.lifecycle_mode = "persistent".into();
    persistent.max_lifetime_s = None;
    seed(&h, &persistent).await;
    seed(
        &h,
        &expired_bunker("bnk_fresh", &tenant, "usr_x", "running", 1_000),
    )
    .await;
    seed(
        &h,
        &expired_bunker("bnk_old", &tenant, "usr_x", "running", 3_600_000),
    )
    .await;
    wait_for_status(&h, &tenant, "bnk_old", "terminated").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(status(&h, &tenant, "bnk_persist").await, "running");
    assert_eq!(status(&h, &tenant, "bnk_fresh").await, "running");
    h.shutdown().await;
}

#[tokio::test]
async fn rate_limits_are_shared_by_controllers_and_answer_429_with_retry_after() {
    let db = Db::MariaDb.create().await;
    let prefix = format!("sbtest:rate:{}:", now_ms());
    let (d1, d2) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let a = controller(&db, d1.path(), Some(&prefix), 4).await;
    let key = a.bootstrap_key.clone().expect("key");
    let b = controller(&db, d2.path(), Some(&prefix), 4).await;
    let http = reqwest::Client::new();
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for i in 0..6 {
        let base = if i % 2 == 0 { a.url() } else { b.url() };
        let resp = http
            .get(format!("{base}/v1/modules/scaibunker/bunkers"))
            .bearer_auth(&key)
            .send()
            .await
            .expect("send");
        statuses.push(resp.status());
        if resp.status() == StatusCode::TOO_MANY_REQUESTS {
            retry_after = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            let v: serde_json::Value = resp.json().await.expect("json");
            assert_eq!(v["error"]["code"], "RATE_LIMITED");
        }
    }
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::TOO_MANY_REQUESTS
        ],
        "four requests a minute across both controllers"
    );
    assert!(
        retry_after.is_some_and(|s| (1..=60).contains(&s)),
        "{retry_after:?}"
    );
    a.shutdown().await;
    b.shutdown().await;
    wipe(&prefix).await;
}

#[tokio::test]
async fn bunkers_on_a_worker_that_stays_silent_are_failed_with_a_reason() {
    let db = Db::Sqlite.create().await;
    let dir = tempfile::tempdir().expect("dir");
    let listen: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let mut c = ControllerConfig::embedded(dir.path().to_path_buf(), listen, "swt_jobs".into());
    c.database_url = db.url.clone();
    c.job_interval = Duration::from_millis(100);
    c.heartbeat_interval = Duration::from_millis(100);
    let h = start(c).await.expect("controller");
    let resp = reqwest::Client::new()
        .post(format!(
            "{}/v1/modules/scaibunker/workers/register",
            h.url()
        ))
        .bearer_auth("swt_jobs")
        .json(&serde_json::json!({
            "protocol_version": scaibunker_proto::worker::PROTOCOL_VERSION,
            "name": "silent", "url": "http://127.0.0.1:9", "runtime": "qemu/tcg", "images": [],
            "capacity": {"cpu_millicores": 1000, "memory_mb": 1024, "disk_mb": 1024, "gpu_count": 0}
        }))
        .send()
        .await
        .expect("register");
    let v: serde_json::Value = resp.json().await.expect("json");
    let wid = v["worker_id"].as_str().expect("worker id").to_owned();
    let tenant = h.services.store.tenants().await.expect("tenants")[0]
        .id
        .clone();
    // Running and recently active: only the worker's silence can end it.
    let mut row = expired_bunker("bnk_orphan", &tenant, "usr_x", "running", 0);
    row.worker_id = Some(wid.clone());
    seed(&h, &row).await;
    wait_for_status(&h, &tenant, "bnk_orphan", "failed").await;
    let b = h
        .services
        .store
        .bunker(&tenant, "bnk_orphan")
        .await
        .expect("read")
        .expect("row");
    assert!(
        b.failure_reason
            .as_deref()
            .is_some_and(|r| r.contains("stopped sending heartbeats")),
        "{:?}",
        b.failure_reason
    );
    let w = h
        .services
        .store
        .worker(&wid)
        .await
        .expect("read")
        .expect("worker");
    assert_eq!(w.status, "offline");
    h.shutdown().await;
}

#[tokio::test]
async fn worker_liveness_survives_a_redis_wipe_and_silence_still_takes_a_worker_offline() {
    let db = Db::MariaDb.create().await;
    let prefix = format!("sbtest:hb:{}:", now_ms());
    let dir = tempfile::tempdir().expect("dir");
    let listen: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let mut c = ControllerConfig::embedded(dir.path().to_path_buf(), listen, "swt_jobs".into());
    c.database_url = db.url.clone();
    c.job_interval = Duration::from_millis(100);
    c.heartbeat_interval = Duration::from_millis(100);
    c.redis_url = Some(redis_url());
    c.redis_prefix = prefix.clone();
    let h = start(c).await.expect("controller");
    let key = h.bootstrap_key.clone().expect("key");
    let http = reqwest::Client::new();
    let resp = http
        .post(format!("{}/v1/modules/scaibunker/workers/register", h.url()))
        .bearer_auth("swt_jobs")
        .json(&serde_json::json!({
            "protocol_version": scaibunker_proto::worker::PROTOCOL_VERSION,
            "name": "beating", "url": "http://127.0.0.1:9", "runtime": "qemu/tcg",
            "images": [{"name": "default", "sha256": "b".repeat(64), "size_bytes": 1}],
            "capacity": {"cpu_millicores": 8000, "memory_mb": 8192, "disk_mb": 10240, "gpu_count": 0}
        }))
        .send()
        .await
        .expect("register");
    let registered = resp.json::<serde_json::Value>().await.expect("json");
    let wid = registered["worker_id"]
        .as_str()
        .expect("worker id")
        .to_owned();
    // Heartbeats carry the worker's own credential, not the join token.
    let credential = registered["credential"]
        .as_str()
        .expect("credential")
        .to_owned();
    let beat = || {
        let http = http.clone();
        let url = format!("{}/v1/modules/scaibunker/heartbeat", h.url());
        let wid = wid.clone();
        let credential = credential.clone();
        async move {
            let v: serde_json::Value = http
                .post(url)
                .bearer_auth(credential)
                .json(&serde_json::json!({
                    "worker_id": wid, "active_bunkers": 0, "bunkers": [],
                    "capacity": {"cpu_millicores": 8000, "memory_mb": 8192, "disk_mb": 10240, "gpu_count": 0}
                }))
                .send()
                .await
                .expect("heartbeat")
                .json()
                .await
                .expect("json");
            assert_eq!(v["known"], true);
        }
    };
    let status = |h: &ControllerHandle| {
        let http = http.clone();
        let url = format!("{}/v1/modules/scaibunker/workers/{wid}", h.url());
        let key = key.clone();
        async move {
            let v: serde_json::Value = http
                .get(url)
                .bearer_auth(key)
                .send()
                .await
                .expect("get")
                .json()
                .await
                .expect("json");
            v["data"]["status"].as_str().unwrap_or("?").to_owned()
        }
    };
    let create = || {
        let http = http.clone();
        let url = format!("{}/v1/modules/scaibunker/bunkers", h.url());
        let key = key.clone();
        async move {
            http.post(url)
                .bearer_auth(key)
                .json(&serde_json::json!({"image": "default", "wait": false}))
                .send()
                .await
                .expect("create")
                .status()
        }
    };
    // Beating for a while (well past the three-interval window): online, and placeable.
    for _ in 0..8 {
        beat().await;
        tokio::time::sleep(Duration::from_millis(80)).await;
    }
    assert_eq!(status(&h).await, "online");
    assert_eq!(create().await, StatusCode::CREATED);
    // Redis loses everything; the worker stays placeable and online while it keeps beating.
    wipe(&prefix).await;
    assert_eq!(
        create().await,
        StatusCode::CREATED,
        "placeable right after the wipe"
    );
    for _ in 0..8 {
        beat().await;
        tokio::time::sleep(Duration::from_millis(80)).await;
    }
    assert_eq!(status(&h).await, "online");
    // Silence: offline within a few intervals, and no longer placeable.
    let mut offline = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if status(&h).await == "offline" {
            offline = true;
            break;
        }
    }
    assert!(offline, "a silent worker never went offline");
    assert_eq!(create().await, StatusCode::SERVICE_UNAVAILABLE);
    h.shutdown().await;
    wipe(&prefix).await;
}

#[tokio::test]
async fn a_users_keys_share_the_users_rate_window() {
    let db = Db::Sqlite.create().await;
    let dir = tempfile::tempdir().expect("dir");
    // Each key: 4 a minute; the user: 8; the tenant: 40.
    let h = controller(&db, dir.path(), None, 4).await;
    let a = h.bootstrap_key.clone().expect("key");
    let http = reqwest::Client::new();
    let mint = |name: &'static str| {
        let http = http.clone();
        let url = format!("{}/v1/api-keys", h.url());
        let a = a.clone();
        async move {
            let v: serde_json::Value = http
                .post(url)
                .bearer_auth(a)
                .json(&serde_json::json!({ "name": name }))
                .send()
                .await
                .expect("mint")
                .json()
                .await
                .expect("json");
            v["data"]["key"].as_str().expect("key").to_owned()
        }
    };
    let get = |key: String| {
        let http = http.clone();
        let url = format!("{}/v1/modules/scaibunker/bunkers", h.url());
        async move {
            http.get(url)
                .bearer_auth(key)
                .send()
                .await
                .expect("get")
                .status()
        }
    };
    let b = mint("b").await;
    let c = mint("c").await;
    for _ in 0..2 {
        assert_eq!(get(a.clone()).await, StatusCode::OK);
    }
    for _ in 0..4 {
        assert_eq!(get(b.clone()).await, StatusCode::OK);
    }
    // Key c has used nothing of its own window, but the user's eight are spent.
    assert_eq!(get(c.clone()).await, StatusCode::TOO_MANY_REQUESTS);
    h.shutdown().await;
}

#[tokio::test]
async fn two_controllers_restarted_after_an_outage_fail_no_live_bunker() {
    // Heartbeats every 200 ms: a worker is gone after 1.2 s of silence. Both controllers go
    // away for 2 s, longer than that; the worker beats again as soon as one is back.
    let db = Db::MariaDb.create().await;
    let prefix = format!("sbtest:restart:{}:", now_ms());
    let dir = tempfile::tempdir().expect("dir");
    let config = || {
        let listen: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let mut c = ControllerConfig::embedded(dir.path().to_path_buf(), listen, "swt_jobs".into());
        c.database_url = db.url.clone();
        c.job_interval = Duration::from_millis(100);
        c.heartbeat_interval = Duration::from_millis(200);
        c.redis_url = Some(redis_url());
        c.redis_prefix = prefix.clone();
        // Controllers of one installation share the secret worker credentials verify with.
        c.storage_secret = "jobs-shared-storage-secret".into();
        c
    };
    let http = reqwest::Client::new();
    let a = start(config()).await.expect("controller a");
    let b = start(config()).await.expect("controller b");
    let resp = http
        .post(format!("{}/v1/modules/scaibunker/workers/register", a.url()))
        .bearer_auth("swt_jobs")
        .json(&serde_json::json!({
            "protocol_version": scaibunker_proto::worker::PROTOCOL_VERSION,
            "name": "steady", "url": "http://127.0.0.1:9", "runtime": "qemu/tcg", "images": [],
            "capacity": {"cpu_millicores": 8000, "memory_mb": 8192, "disk_mb": 10240, "gpu_count": 0}
        }))
        .send()
        .await
        .expect("register");
    let registered = resp.json::<serde_json::Value>().await.expect("json");
    let wid = registered["worker_id"]
        .as_str()
        .expect("worker id")
        .to_owned();
    // Heartbeats carry the worker's own credential, not the join token.
    let credential = registered["credential"]
        .as_str()
        .expect("credential")
        .to_owned();
    let beat = |url: String| {
        let http = http.clone();
        let wid = wid.clone();
        let credential = credential.clone();
        async move {
            let resp = http
                .post(format!("{url}/v1/modules/scaibunker/heartbeat"))
                .bearer_auth(credential)
                .json(&serde_json::json!({
                    "worker_id": wid, "active_bunkers": 1,
                    "bunkers": [{"id": "bnk_alive", "status": "running"}],
                    "capacity": {"cpu_millicores": 8000, "memory_mb": 8192, "disk_mb": 10240, "gpu_count": 0}
                }))
                .send()
                .await
                .expect("heartbeat");
            assert_eq!(resp.status(), StatusCode::OK);
        }
    };
    let tenant = a.services.store.tenants().await.expect("tenants")[0]
        .id
        .clone();
    let mut row = expired_bunker("bnk_alive", &tenant, "usr_x", "running", 0);
    row.worker_id = Some(wid.clone());
    row.max_lifetime_s = Some(3600);
    row.idle_timeout_s = 3600;
    seed(&a, &row).await;
    for i in 0..6 {
        let url = if i % 2 == 0 { a.url() } else { b.url() };
        beat(url).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }

    a.shutdown().await;
    b.shutdown().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let a = start(config()).await.expect("controller a again");
    let b = start(config()).await.expect("controller b again");
    // The worker notices within about an interval and beats again, alternating controllers.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..10 {
        let url = if i % 2 == 0 { a.url() } else { b.url() };
        beat(url).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(status(&a, &tenant, "bnk_alive").await, "running");
    let w = a
        .services
        .store
        .worker(&wid)
        .await
        .expect("read")
        .expect("worker");
    assert_eq!(w.status, "online");
    // Silence after the restart still ends it, counted from the restart.
    wait_for_status(&a, &tenant, "bnk_alive", "failed").await;
    a.shutdown().await;
    b.shutdown().await;
    wipe(&prefix).await;
}
