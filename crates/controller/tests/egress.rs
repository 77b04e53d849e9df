//! The egress audit on a real controller (both SQL backends): workers write NDJSON batches
//! through the storage proxy's HTTP route with their own credential, as a real worker does, and
//! `GET /bunkers/{id}/egress` reads them back. The attacks: a worker writing the audit of a
//! bunker on another worker (or of no bunker, or one long ended), reading or deleting audit
//! objects, writing other key shapes or oversized batches; other tenants and same-tenant users
//! who are neither owner nor tenant admin reading a bunker's audit. Also the proxy alone (no
//! database), which takes no audit, and the retention.

use std::net::SocketAddr;
use std::time::Duration;

use reqwest::StatusCode;
use scaibunker_controller::config::ControllerConfig;
use scaibunker_controller::service::egress;
use scaibunker_controller::store::bunkers::{BunkerRow, StatusChange, change_status, insert};
use scaibunker_controller::store::now_ms;
use scaibunker_controller::store::snapshots::SnapshotRow;
use scaibunker_controller::{ControllerHandle, start, start_storage_proxy};
use scaibunker_proto::egress::{EGRESS_LINE_VERSION, EgressFlow, EgressLine, Verdict, object_key};
use serde_json::{Value, json};

#[macro_use]
mod common;

use common::{Db, TestDatabase, tenant_with_key};

const WORKER_TOKEN: &str = "swt_egress_test";
const SECRET: &str = "egress-test-secret";
/// When the test's flows happen: 2026-11-28T10:00:00Z, in microseconds.
const T0: u64 = 1_795_860_000_000_000;
const SECOND: u64 = 1_000_000;

struct Api {
    handle: ControllerHandle,
    http: reqwest::Client,
    root: String,
    dir: tempfile::TempDir,
    _database: TestDatabase,
}

fn config(dir: &std::path::Path) -> ControllerConfig {
    let listen: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let mut c = ControllerConfig::embedded(dir.to_path_buf(), listen, WORKER_TOKEN.into());
    c.storage_secret = SECRET.into();
    c
}

/// The credential the controllers give worker `worker_id` (derived from the storage secret).
fn worker(worker_id: &str) -> String {
    scaibunker_proto::worker_auth::credential(SECRET.as_bytes(), worker_id, 1)
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("<no code>")
}

fn bunker_row(id: &str, tenant: &str, owner: &str, worker_id: Option<&str>) -> BunkerRow {
    let now = now_ms();
    BunkerRow {
        id: id.into(),
        tenant_id: tenant.into(),
        owner_id: owner.into(),
        name: None,
        image_name: "default".into(),
        image_id: "img_x".into(),
        snapshot_id: None,
        lifecycle_mode: "persistent".into(),
        status: "running".into(),
        network_profile: "unrestricted".into(),
        network_allowlist: "[]".into(),
        cpu_millicores: 1000,
        memory_mb: 512,
        disk_mb: 1024,
        gpu_count: 0,
        gpu_type: None,
        max_lifetime_s: None,
        idle_timeout_s: 900,
        session_type: "standalone".into(),
        session_ref: None,
        label_set: "{}".into(),
        env_vars: "{}".into(),
        interfaces: "[]".into(),
        bandwidth_mbit: None,
        worker_id: worker_id.map(Into::into),
        failure_reason: None,
        created_at: now,
        started_at: Some(now),
        last_activity_at: Some(now),
        terminated_at: None,
    }
}

/// A flow line of `bunker` in `tenant` to `dst_ip`, from `start` for `len` microseconds.
fn flow(bunker: &str, tenant: &str, dst_ip: &str, start: u64, len: u64) -> EgressLine {
    EgressLine::Flow(EgressFlow {
        v: EGRESS_LINE_VERSION,
        bunker_id: bunker.into(),
        tenant_id: tenant.into(),
        proto: "tcp".into(),
        dst_ip: dst_ip.into(),
        dst_port: Some(443),
        dns_name: Some("example.org".into()),
        sni: None,
        ts_start_us: start,
        ts_end_us: start + len,
        bytes_out: 1200,
        bytes_in: 34_000,
        pkts_out: 12,
        pkts_in: 30,
        verdict: Verdict::Allowed,
    })
}

fn ndjson(lines: &[&str]) -> Vec<u8> {
    let mut out = lines.join("\n").into_bytes();
    out.push(b'\n');
    out
}

fn line(l: &EgressLine) -> String {
    serde_json::to_string(l).expect("line serialises")
}

impl Api {
    async fn start(db: Db) -> Api {
        Self::start_with(db, |_| {}).await
    }

    async fn start_with(db: Db, tweak: impl FnOnce(&mut ControllerConfig)) -> Api {
        let dir = tempfile::tempdir().expect("tempdir");
        let database = db.create().await;
        let mut c = config(dir.path());
        c.database_url = database.url.clone();
        tweak(&mut c);
        let handle = start(c).await.expect("controller starts");
        let root = handle.bootstrap_key.clone().expect("bootstrap key");
        Api {
            handle,
            http: reqwest::Client::new(),
            root,
            dir,
            _database: database,
        }
    }

    async fn seed(&self, row: &BunkerRow) {
        let mut tx = self.handle.services.store.begin().await.expect("tx");
        insert(&mut tx, row).await.expect("insert bunker");
        tx.commit().await.expect("commit");
    }

    /// A user of `tenant` with `role`, made by the bootstrap super admin, and a key of theirs.
    async fn user_key(&self, tenant: &str, email: &str, role: &str) -> String {
        let (st, v) = self
            .call(
                "POST",
                "/v1/users",
                &self.root,
                Some(json!({"email": email, "tenant_id": tenant, "role": role})),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        let user = v["data"]["id"].as_str().expect("user id").to_owned();
        let (st, v) = self
            .call(
                "POST",
                "/v1/api-keys",
                &self.root,
                Some(json!({"name": "egress", "user_id": user})),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        v["data"]["key"].as_str().expect("key").to_owned()
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

    /// `method` on the object `key` through the controller's storage proxy.
    async fn object(
        &self,
        method: &str,
        key: &str,
        token: &str,
        body: Option<Vec<u8>>,
    ) -> (StatusCode, Value) {
        object_call(&self.http, &self.handle.url(), method, key, token, body).await
    }

    async fn egress(&self, bunker: &str, key: &str, query: &str) -> (StatusCode, Value) {
        self.call(
            "GET",
            &format!("/bunkers/{bunker}/egress{query}"),
            key,
            None,
        )
        .await
    }

    async fn stored(&self, key: &str) -> bool {
        match self.handle.services.objects().head(key).await {
            Ok(_) => true,
            Err(scaibunker_controller::objects::ObjectError::NotFound(_)) => false,
            Err(e) => panic!("head {key}: {e}"),
        }
    }
}

async fn object_call(
    http: &reqwest::Client,
    base: &str,
    method: &str,
    key: &str,
    token: &str,
    body: Option<Vec<u8>>,
) -> (StatusCode, Value) {
    let mut rb = http
        .request(
            method.parse().expect("method"),
            format!("{base}/v1/modules/scaibunker/storage/objects/{key}"),
        )
        .bearer_auth(token);
    if let Some(b) = body {
        rb = rb.body(b);
    }
    common::json_of(rb.send().await.expect("request")).await
}

/// The record and gap destinations of a page, in order (`gap:N` for a gap of N lost events).
fn seen(page: &Value) -> (Vec<String>, Vec<u64>) {
    let records = page["data"]["records"]
        .as_array()
        .expect("records")
        .iter()
        .map(|r| r["dst_ip"].as_str().expect("dst_ip").to_owned())
        .collect();
    let gaps = page["data"]["gaps"]
        .as_array()
        .expect("gaps")
        .iter()
        .map(|g| g["lost"].as_u64().expect("lost"))
        .collect();
    (records, gaps)
}

/// A worker writes two batches of its bunker through the proxy; the owner pages through them
/// with the cursor and a time window, a tenant admin reads them, the bunker ended or not;
/// another tenant gets 404 and a same-tenant user who is neither owner nor admin 403.
async fn the_owner_reads_back_what_the_worker_wrote(db: Db) {
    let api = Api::start(db).await;
    let store = &api.handle.services.store;
    let (tenant, owner, owner_key) = tenant_with_key(store, "eg", "tenant_user").await;
    let (_, _, foreign_admin) = tenant_with_key(store, "other", "tenant_admin").await;
    let bunker = "bnk_egress1";
    api.seed(&bunker_row(bunker, &tenant, &owner, Some("wrk_a")))
        .await;

    let forged = flow("bnk_someoneelse", &tenant, "10.9.9.9", T0, SECOND);
    let batch1 = ndjson(&[
        &line(&flow(bunker, &tenant, "192.0.2.1", T0, SECOND)),
        &line(&flow(bunker, &tenant, "192.0.2.2", T0 + 2 * SECOND, SECOND)),
        &line(&EgressLine::Gap {
            lost: 7,
            ts_us: T0 + 3 * SECOND,
        }),
        "{\"type\":\"flow\",\"this is\":\"not a line\"",
        &line(&flow(bunker, &tenant, "192.0.2.3", T0 + 4 * SECOND, SECOND)),
    ]);
    let batch2 = ndjson(&[
        &line(&flow(
            bunker,
            &tenant,
            "192.0.2.4",
            T0 + 11 * SECOND,
            SECOND,
        )),
        &line(&forged),
        &line(&flow(
            bunker,
            &tenant,
            "192.0.2.5",
            T0 + 13 * SECOND,
            5 * SECOND,
        )),
    ]);
    let key1 = object_key(bunker, T0 + 10 * SECOND, 4242);
    let key2 = object_key(bunker, T0 + 20 * SECOND, 4242);
    for (key, body) in [(&key1, batch1), (&key2, batch2)] {
        let (st, v) = api.object("PUT", key, &worker("wrk_a"), Some(body)).await;
        assert_eq!(st, StatusCode::CREATED, "{key}: {v}");
    }

    // Everything at once, in the order written; the malformed and the forged line skipped.
    let (st, all) = api.egress(bunker, &owner_key, "").await;
    assert_eq!(st, StatusCode::OK, "{all}");
    assert_eq!(
        seen(&all),
        (
            vec![
                "192.0.2.1".into(),
                "192.0.2.2".into(),
                "192.0.2.3".into(),
                "192.0.2.4".into(),
                "192.0.2.5".into()
            ],
            vec![7]
        )
    );
    assert_eq!(all["data"]["skipped_lines"], 2);
    assert_eq!(all["data"]["has_more"], false);
    assert_eq!(all["data"]["next_cursor"], Value::Null);
    assert_eq!(
        all["data"]["records"][0],
        json!({"proto": "tcp", "dst_ip": "192.0.2.1", "dst_port": 443,
               "dns_name": "example.org", "sni": null,
               "ts_start": "2026-11-28T10:00:00.000000Z", "ts_end": "2026-11-28T10:00:01.000000Z",
               "bytes_out": 1200, "bytes_in": 34000, "pkts_out": 12, "pkts_in": 30,
               "verdict": "allowed"})
    );
    assert_eq!(
        all["data"]["gaps"][0],
        json!({"ts": "2026-11-28T10:00:03.000000Z", "lost": 7})
    );

    // Pages of two (records and gaps together), each starting where the last one stopped.
    let mut pages = Vec::new();
    let mut query = "?limit=2".to_owned();
    loop {
        let (st, page) = api.egress(bunker, &owner_key, &query).await;
        assert_eq!(st, StatusCode::OK, "{page}");
        pages.push(seen(&page));
        match page["data"]["next_cursor"].as_str() {
            Some(c) => {
                assert_eq!(page["data"]["has_more"], true);
                query = format!("?limit=2&cursor={c}");
            }
            None => break,
        }
        assert!(pages.len() < 10, "the cursor does not advance");
    }
    assert_eq!(
        pages,
        vec![
            (vec!["192.0.2.1".into(), "192.0.2.2".into()], vec![]),
            (vec!["192.0.2.3".into()], vec![7]),
            (vec!["192.0.2.4".into(), "192.0.2.5".into()], vec![]),
        ]
    );

    // A window from 10:00:04.5 to 10:00:12: the flow ending in it, the one starting in it.
    let (st, window) = api
        .egress(
            bunker,
            &owner_key,
            "?start=2026-11-28T10:00:04.5Z&end=2026-11-28T11:00:12%2B01:00",
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{window}");
    assert_eq!(
        seen(&window),
        (vec!["192.0.2.3".into(), "192.0.2.4".into()], vec![])
    );
    // A window past every flow but the long last one (10:00:13 to 10:00:18).
    let (_, late) = api
        .egress(bunker, &owner_key, "?start=2026-11-28T10:00:17Z")
        .await;
    assert_eq!(seen(&late), (vec!["192.0.2.5".into()], vec![]));

    // The tenant's admin reads it; a colleague who does not own it may not.
    let admin = api
        .user_key(&tenant, "admin@eg.example", "tenant_admin")
        .await;
    let (st, v) = api.egress(bunker, &admin, "").await;
    assert_eq!((st, seen(&v).0.len()), (StatusCode::OK, 5), "{v}");
    let colleague = api
        .user_key(&tenant, "colleague@eg.example", "tenant_user")
        .await;
    let (st, v) = api.egress(bunker, &colleague, "").await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::FORBIDDEN, "AUTHZ_PERMISSION_DENIED"),
        "{v}"
    );
    // Another tenant's admin does not learn the bunker exists.
    let (st, v) = api.egress(bunker, &foreign_admin, "").await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::NOT_FOUND, "BUNKER_NOT_FOUND"),
        "{v}"
    );

    for bad in [
        "?limit=0",
        "?limit=1001",
        "?cursor=bm90IGEgY3Vyc29y",
        "?start=yesterday",
        "?bogus=1",
    ] {
        let (st, v) = api.egress(bunker, &owner_key, bad).await;
        assert_eq!(
            (st, code(&v)),
            (StatusCode::UNPROCESSABLE_ENTITY, "VALIDATION_ERROR"),
            "{bad}: {v}"
        );
    }

    // Ended: still there (the last batch lands when the VM stops).
    let mut tx = store.begin().await.expect("tx");
    let moved = change_status(
        &mut tx,
        &tenant,
        bunker,
        &StatusChange {
            from: &["running"],
            to: "terminated",
            failure_reason: None,
            started_at: None,
            terminated_at: Some(now_ms()),
        },
    )
    .await
    .expect("terminate");
    tx.commit().await.expect("commit");
    assert!(moved);
    let last = object_key(bunker, T0 + 30 * SECOND, 4242);
    let body = ndjson(&[&line(&flow(
        bunker,
        &tenant,
        "192.0.2.6",
        T0 + 21 * SECOND,
        1,
    ))]);
    let (st, v) = api.object("PUT", &last, &worker("wrk_a"), Some(body)).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let (st, v) = api.egress(bunker, &owner_key, "").await;
    assert_eq!((st, seen(&v).0.len()), (StatusCode::OK, 6), "{v}");
    api.handle.shutdown().await;
}

/// A hostile worker: it may write only its own bunkers' audit, only in the audit's key shape,
/// never read or delete it, and not past the batch cap. A passivated bunker's last worker
/// still delivers its final batch.
async fn a_worker_writes_only_its_own_bunkers_audit(db: Db) {
    let api = Api::start(db).await;
    let store = &api.handle.services.store;
    let (tenant, owner, _) = tenant_with_key(store, "hw", "tenant_user").await;
    api.seed(&bunker_row("bnk_ona", &tenant, &owner, Some("wrk_a")))
        .await;
    api.seed(&bunker_row("bnk_onb", &tenant, &owner, Some("wrk_b")))
        .await;
    let a = worker("wrk_a");
    let body = || {
        Some(ndjson(&[&line(&flow(
            "bnk_onb",
            &tenant,
            "192.0.2.9",
            T0,
            1,
        ))]))
    };

    // Another worker's bunker, and a bunker that does not exist.
    for bunker in ["bnk_onb", "bnk_nosuch"] {
        let key = object_key(bunker, T0, 1);
        let (st, v) = api.object("PUT", &key, &a, body()).await;
        assert_eq!(
            (st, code(&v)),
            (StatusCode::FORBIDDEN, "EGRESS_AUDIT_DENIED"),
            "{bunker}: {v}"
        );
        assert!(!api.stored(&key).await, "{key} was stored");
    }
    // Its own bunker's batch: written, but never read back, listed or deleted by a worker.
    let own = object_key("bnk_ona", T0, 1);
    let (st, v) = api.object("PUT", &own, &a, body()).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    for method in ["GET", "DELETE"] {
        let (st, v) = api.object(method, &own, &a, None).await;
        assert_eq!(
            (st, code(&v)),
            (StatusCode::FORBIDDEN, "WORKER_STORAGE_DENIED"),
            "{method}: {v}"
        );
    }
    let (st, _) = api.object("HEAD", &own, &a, None).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    assert!(api.stored(&own).await);
    // Other shapes under the audit prefix, including the tenants' audit-event batches.
    for key in [
        "scaibunker/audit/bnk_ona/notes.txt",
        "scaibunker/audit/bnk_ona/0000000000000001-01.ndjson",
        "scaibunker/audit/bnk_ona/sub/0000000000000001-1.ndjson",
        "scaibunker/audit/events/tnt_hw/0000000000000001-1.ndjson",
    ] {
        let (st, v) = api.object("PUT", key, &a, body()).await;
        assert_eq!(
            (st, code(&v)),
            (StatusCode::FORBIDDEN, "WORKER_STORAGE_DENIED"),
            "{key}: {v}"
        );
    }
    // A batch over 8 MiB, declared and streamed.
    let big = vec![b'\n'; 8 * 1024 * 1024 + 1];
    let key = object_key("bnk_ona", T0 + 1, 1);
    let (st, v) = api.object("PUT", &key, &a, Some(big.clone())).await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::PAYLOAD_TOO_LARGE, "OBJECT_TOO_LARGE")
    );
    let chunks = futures_util::stream::iter(
        big.chunks(1 << 20)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let resp = api
        .http
        .put(format!(
            "{}/v1/modules/scaibunker/storage/objects/{key}",
            api.handle.url()
        ))
        .bearer_auth(&a)
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .expect("streamed put");
    let (st, v) = common::json_of(resp).await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::PAYLOAD_TOO_LARGE, "OBJECT_TOO_LARGE")
    );
    assert!(!api.stored(&key).await);

    // Passivated (no worker now): the worker it ran on delivers the last batch, no other.
    let snapshot = SnapshotRow {
        id: "snp_egress".into(),
        tenant_id: tenant.clone(),
        owner_id: owner.clone(),
        bunker_id: "bnk_ona".into(),
        status: "ready".into(),
        kind: "full".into(),
        size_bytes: 1,
        image_name: "default".into(),
        image_id: "img_x".into(),
        cpu_millicores: 1000,
        memory_mb: 512,
        disk_mb: 1024,
        manifest: None,
        failure_reason: None,
        created_at: now_ms(),
        expires_at: None,
    };
    let mut tx = store.begin().await.expect("tx");
    scaibunker_controller::store::snapshots::insert(&mut tx, &snapshot)
        .await
        .expect("snapshot");
    let passivated = scaibunker_controller::store::passivation::passivate(
        &mut tx,
        &tenant,
        "bnk_ona",
        "snp_egress",
        None,
    )
    .await
    .expect("passivate");
    tx.commit().await.expect("commit");
    assert!(passivated);
    let last = object_key("bnk_ona", T0 + 2, 1);
    let (st, v) = api.object("PUT", &last, &worker("wrk_b"), body()).await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::FORBIDDEN, "EGRESS_AUDIT_DENIED"),
        "{v}"
    );
    let (st, v) = api.object("PUT", &last, &a, body()).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");

    // Ended over an hour ago: nothing more is taken, not even from its own worker.
    let mut tx = store.begin().await.expect("tx");
    change_status(
        &mut tx,
        &tenant,
        "bnk_onb",
        &StatusChange {
            from: &["running"],
            to: "terminated",
            failure_reason: None,
            started_at: None,
            terminated_at: Some(now_ms() - 3_600_001),
        },
    )
    .await
    .expect("terminate");
    tx.commit().await.expect("commit");
    let key = object_key("bnk_onb", T0 + 3, 1);
    let (st, v) = api.object("PUT", &key, &worker("wrk_b"), body()).await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::FORBIDDEN, "EGRESS_AUDIT_DENIED"),
        "{v}"
    );
    api.handle.shutdown().await;
}

/// The `spills` job deletes the audit of bunkers that ended more than the retention (30 days
/// by default) ago, terminated or failed, objects then mark, and nothing else; a later run finds
/// nothing more to do.
async fn the_retention_deletes_the_audit_of_bunkers_long_ended(db: Db) {
    let api = Api::start_with(db, |c| c.job_interval = Duration::from_millis(150)).await;
    let store = &api.handle.services.store;
    let (tenant, owner, owner_key) = tenant_with_key(store, "rt", "tenant_user").await;
    let day_ms = 86_400_000;
    let mut old = bunker_row("bnk_old", &tenant, &owner, Some("wrk_a"));
    (old.status, old.terminated_at) = ("terminated".into(), Some(now_ms() - 31 * day_ms));
    let mut failed = bunker_row("bnk_failed", &tenant, &owner, Some("wrk_a"));
    (failed.status, failed.terminated_at) = ("failed".into(), Some(now_ms() - 40 * day_ms));
    let mut recent = bunker_row("bnk_recent", &tenant, &owner, Some("wrk_a"));
    (recent.status, recent.terminated_at) = ("terminated".into(), Some(now_ms() - 29 * day_ms));
    let running = bunker_row("bnk_running", &tenant, &owner, Some("wrk_a"));
    let mut keys = Vec::new();
    // Objects first, so no job run sees a row without its objects.
    for row in [&old, &failed, &recent, &running] {
        for ts in [T0, T0 + 1] {
            let key = object_key(&row.id, ts, 9);
            let body = ndjson(&[&line(&flow(&row.id, &tenant, "192.0.2.1", T0, 1))]);
            api.handle
                .services
                .objects()
                .put_bytes(&key, body.into())
                .await
                .expect("put");
            keys.push((row.id.clone(), key));
        }
    }
    for row in [&old, &failed, &recent, &running] {
        api.seed(row).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let purged: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM bunkers WHERE egress_purged_at IS NOT NULL")
                .fetch_one(store.pool())
                .await
                .expect("count");
        if purged == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the job did not purge the two old bunkers ({purged} marked)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (bunker, key) in &keys {
        let kept = !["bnk_old", "bnk_failed"].contains(&bunker.as_str());
        assert_eq!(api.stored(key).await, kept, "{key}");
    }
    let again = egress::purge(&api.handle.services, Duration::from_secs(30 * 86_400))
        .await
        .expect("purge");
    assert_eq!(again, 0);
    let (st, v) = api.egress("bnk_old", &owner_key, "").await;
    assert_eq!((st, seen(&v).0.len()), (StatusCode::OK, 0), "{v}");
    let (st, v) = api.egress("bnk_recent", &owner_key, "").await;
    assert_eq!((st, seen(&v).0.len()), (StatusCode::OK, 2), "{v}");
    // A shorter retention reaches the recent one too.
    let deleted = egress::purge(&api.handle.services, Duration::from_secs(28 * 86_400))
        .await
        .expect("purge");
    assert_eq!(deleted, 2);
    api.handle.shutdown().await;
}

both!(
    the_owner_reads_back_what_the_worker_wrote,
    a_worker_writes_only_its_own_bunkers_audit,
    the_retention_deletes_the_audit_of_bunkers_long_ended,
);

/// `SCAIGRID_MODE=bunker_proxy` has no database to tell whose bunker it is: it refuses a
/// worker's audit batch (the worker writes it to a controller) and still serves snapshots.
#[tokio::test]
async fn the_proxy_alone_takes_no_egress_audit() {
    let api = Api::start(Db::Sqlite).await;
    let (tenant, owner, _) = tenant_with_key(&api.handle.services.store, "px", "tenant_user").await;
    api.seed(&bunker_row("bnk_px", &tenant, &owner, Some("wrk_a")))
        .await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let mut c = config(api.dir.path());
    c.database_url = format!("mysql://root@127.0.0.1:{dead}/nowhere");
    c.redis_url = Some(format!("redis://127.0.0.1:{dead}"));
    let proxy = start_storage_proxy(c).await.expect("the proxy starts");
    let key = object_key("bnk_px", T0, 1);
    let body = ndjson(&[&line(&flow("bnk_px", &tenant, "192.0.2.1", T0, 1))]);
    let (st, v) = object_call(
        &api.http,
        &proxy.url(),
        "PUT",
        &key,
        &worker("wrk_a"),
        Some(body),
    )
    .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::FORBIDDEN, "EGRESS_AUDIT_NEEDS_CONTROLLER"),
        "{v}"
    );
    assert!(!api.stored(&key).await);
    let (st, v) = object_call(
        &api.http,
        &proxy.url(),
        "PUT",
        "snapshots/tnt_px/snp_1/disk.qcow2",
        &worker("wrk_a"),
        Some(b"disk".to_vec()),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    proxy.shutdown().await;
    api.handle.shutdown().await;
}
