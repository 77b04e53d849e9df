//! Who may mint, use and revoke which API keys, through the real HTTP API, on SQLite with
//! in-process live state and on MariaDB with a real Redis (each test its own key prefix).
//!
//! Each scenario is an attack from issue 12: a tenant admin minting a key for a user that
//! outranks it (in the platform tenant and in an ordinary one), a key whose role string says
//! more than its permissions, and revoking the last super-admin key (the lock-out), with the
//! recovery that undoes one.

mod common;

use std::net::SocketAddr;

use common::{Db, TestDatabase, redis_url, unique_redis_prefix, wipe_redis};
use reqwest::StatusCode;
use scaibunker_controller::config::ControllerConfig;
use scaibunker_controller::service::auth::{self, hash_key};
use scaibunker_controller::{ControllerHandle, start};
use serde_json::{Value, json};

const WORKER_TOKEN: &str = "swt_authz_test";

/// Where live state lives for a scenario.
#[derive(Clone, Copy, Debug)]
enum Live {
    InProcess,
    Redis,
}

struct Api {
    handle: ControllerHandle,
    http: reqwest::Client,
    /// The bootstrap super admin's key.
    root: String,
    prefix: Option<String>,
    _dir: tempfile::TempDir,
    _database: TestDatabase,
}

impl Api {
    async fn start(db: Db, live: Live) -> Api {
        let dir = tempfile::tempdir().expect("tempdir");
        let database = db.create().await;
        let prefix = matches!(live, Live::Redis).then(unique_redis_prefix);
        let listen: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let mut c =
            ControllerConfig::embedded(dir.path().to_path_buf(), listen, WORKER_TOKEN.into());
        c.database_url = database.url.clone();
        if let Some(p) = &prefix {
            c.redis_url = Some(redis_url());
            c.redis_prefix = p.clone();
        }
        let handle = start(c).await.expect("controller starts");
        let root = handle.bootstrap_key.clone().expect("bootstrap key");
        Api {
            handle,
            http: reqwest::Client::new(),
            root,
            prefix,
            _dir: dir,
            _database: database,
        }
    }

    async fn finish(self) {
        if let Some(p) = &self.prefix {
            wipe_redis(p).await;
        }
        self.handle.shutdown().await;
    }

    /// `path` under `/v1/` as is, anything else under the module prefix.
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

    /// The platform tenant's id and the bootstrap super admin's user id.
    async fn root_ids(&self) -> (String, String) {
        let (st, v) = self.call("GET", "/v1/api-keys", &self.root, None).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        let k = &v["data"][0];
        (
            k["tenant_id"].as_str().expect("tenant").to_owned(),
            k["user_id"].as_str().expect("user").to_owned(),
        )
    }

    async fn tenant(&self, slug: &str) -> String {
        let (st, v) = self
            .call(
                "POST",
                "/v1/tenants",
                &self.root,
                Some(json!({"name": slug, "slug": slug})),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        v["data"]["id"].as_str().expect("tenant id").to_owned()
    }

    /// A user made by `by`; returns its id.
    async fn user(&self, by: &str, tenant: &str, email: &str, role: &str, extra: Value) -> String {
        let (st, v) = self
            .call(
                "POST",
                "/v1/users",
                by,
                Some(json!({"email": email, "tenant_id": tenant, "role": role,
                            "module_permissions": extra})),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        v["data"]["id"].as_str().expect("user id").to_owned()
    }

    /// Mints a key for `user` as `by`; returns the whole answer.
    async fn mint(&self, by: &str, user: &str) -> (StatusCode, Value) {
        self.call(
            "POST",
            "/v1/api-keys",
            by,
            Some(json!({"name": "minted", "user_id": user})),
        )
        .await
    }

    async fn key_for(&self, by: &str, user: &str) -> String {
        let (st, v) = self.mint(by, user).await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        v["data"]["key"].as_str().expect("key").to_owned()
    }

    /// Live (not revoked) keys of `user`, read from the database.
    async fn live_keys_of(&self, user: &str) -> i64 {
        sqlx::query_scalar("SELECT COUNT(*) FROM api_keys WHERE user_id = ? AND revoked_at IS NULL")
            .bind(user)
            .fetch_one(self.handle.services.store.pool())
            .await
            .expect("count keys")
    }

    /// Audit events of `action` in the whole platform, newest first.
    async fn events(&self, action: &str) -> Vec<Value> {
        let (st, v) = self
            .call(
                "GET",
                &format!("/v1/audit-log?action={action}&limit=500"),
                &self.root,
                None,
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        v["data"].as_array().expect("events").clone()
    }
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("<no code>")
}

/// A tenant admin of the platform tenant asks for a key of the bootstrap super admin. Before
/// the fix the key was minted and carried `super_admin`: every tenant's bunkers and workers.
async fn a_platform_tenant_admin_cannot_mint_a_super_admin_key(db: Db, live: Live) {
    let api = Api::start(db, live).await;
    let (platform, root_user) = api.root_ids().await;
    let ops = api
        .user(
            &api.root,
            &platform,
            "ops@localhost",
            "tenant_admin",
            json!([]),
        )
        .await;
    let ops_key = api.key_for(&api.root, &ops).await;
    // The tenant admin may work in its tenant, but not as the super admin.
    let before = api.live_keys_of(&root_user).await;
    let (st, v) = api.mint(&ops_key, &root_user).await;
    if st == StatusCode::CREATED {
        let stolen = v["data"]["key"].as_str().unwrap_or_default();
        let (wst, _) = api.call("GET", "/workers", stolen, None).await;
        panic!("minted a super-admin key (its GET /workers: {wst}): {v}");
    }
    assert_eq!(
        (st, code(&v)),
        (StatusCode::FORBIDDEN, "AUTHZ_PERMISSION_DENIED"),
        "{v}"
    );
    assert_eq!(api.live_keys_of(&root_user).await, before, "nothing minted");
    // Nor a narrowed one: the refusal is about whose key it is, not what it holds.
    let (st, v) = api
        .call(
            "POST",
            "/v1/api-keys",
            &ops_key,
            Some(json!({"name": "x", "user_id": root_user, "permissions": ["scaibunker:create"]})),
        )
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{v}");
    // The tenant admin's own powers stay: keys for itself, for users it does not outrank.
    let dev = api
        .user(
            &ops_key,
            &platform,
            "dev@localhost",
            "tenant_user",
            json!([]),
        )
        .await;
    api.key_for(&ops_key, &dev).await;
    api.key_for(&ops_key, &ops).await;
    // And a key that names a super admin but holds only a tenant admin's permissions (what
    // the old code minted) has no platform powers: they come from permissions, per request.
    let legacy = format!("sgk_legacy_{}", "l".repeat(40));
    let perms: Vec<String> = auth::role_permissions("tenant_admin").into_iter().collect();
    let perms = serde_json::to_string(&perms).expect("json");
    let mut tx = api.handle.services.store.begin().await.expect("tx");
    sqlx::query(
        "INSERT INTO api_keys (id, tenant_id, user_id, name, key_sha256, permissions, created_at) \
         VALUES ('key_legacy', ?, ?, 'legacy', ?, ?, 0)",
    )
    .bind(&platform)
    .bind(&root_user)
    .bind(hash_key(&legacy))
    .bind(&perms)
    .execute(&mut *tx)
    .await
    .expect("insert legacy key");
    tx.commit().await.expect("commit");
    let (st, v) = api.call("GET", "/workers", &legacy, None).await;
    assert_eq!(
        st,
        StatusCode::FORBIDDEN,
        "GET /workers with the legacy key: {v}"
    );
    let (st, v) = api.call("GET", "/v1/tenants", &legacy, None).await;
    assert_eq!(
        st,
        StatusCode::FORBIDDEN,
        "GET /v1/tenants with the legacy key: {v}"
    );
    api.finish().await;
}

/// In an ordinary tenant: its admin cannot mint for a user of a higher role (a super admin
/// the platform placed there), a user holding `admin:tenant` cannot mint for its tenant admin,
/// and a key minted for another user is audited with the minter as actor, naming the user.
async fn an_ordinary_tenant_admin_cannot_mint_up_and_minting_is_audited_as_the_minter(
    db: Db,
    live: Live,
) {
    let api = Api::start(db, live).await;
    let acme = api.tenant("acme").await;
    let boss = api
        .user(
            &api.root,
            &acme,
            "boss@acme.test",
            "tenant_admin",
            json!([]),
        )
        .await;
    let boss_key = api.key_for(&api.root, &boss).await;
    let resident = api
        .user(&api.root, &acme, "root@acme.test", "super_admin", json!([]))
        .await;
    let (st, v) = api.mint(&boss_key, &resident).await;
    if st == StatusCode::CREATED {
        let stolen = v["data"]["key"].as_str().unwrap_or_default();
        let (wst, _) = api.call("GET", "/workers", stolen, None).await;
        panic!("a tenant admin minted a super-admin key (its GET /workers: {wst}): {v}");
    }
    assert_eq!(
        (st, code(&v)),
        (StatusCode::FORBIDDEN, "AUTHZ_PERMISSION_DENIED"),
        "{v}"
    );
    assert_eq!(api.live_keys_of(&resident).await, 0, "nothing minted");

    // A user the admin let manage the tenant still cannot take its admin's identity.
    let deputy = api
        .user(
            &boss_key,
            &acme,
            "deputy@acme.test",
            "tenant_user",
            json!(["scaibunker:admin:tenant"]),
        )
        .await;
    let deputy_key = api.key_for(&boss_key, &deputy).await;
    let (st, v) = api.mint(&deputy_key, &boss).await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::FORBIDDEN, "AUTHZ_PERMISSION_DENIED"),
        "a tenant user minted its tenant admin's key: {v}"
    );

    // The admin mints for a developer; the audit names the admin as actor and the developer.
    let dev = api
        .user(&boss_key, &acme, "dev@acme.test", "tenant_user", json!([]))
        .await;
    let (st, v) = api.mint(&boss_key, &dev).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let key_id = v["data"]["id"].as_str().expect("key id").to_owned();
    let events = api.events("api_key.create").await;
    let event = events
        .iter()
        .find(|e| e["resource_id"] == key_id.as_str())
        .expect("an api_key.create event for the key");
    assert_eq!(event["actor_id"], boss.as_str(), "{event}");
    assert_eq!(event["tenant_id"], acme.as_str(), "{event}");
    assert_eq!(event["details"]["user_id"], dev.as_str(), "{event}");
    // A platform admin minting into a tenant is named too.
    let (_, v) = api.mint(&api.root, &dev).await;
    let key_id = v["data"]["id"].as_str().expect("key id").to_owned();
    let (_, root_user) = api.root_ids().await;
    let events = api.events("api_key.create").await;
    let event = events
        .iter()
        .find(|e| e["resource_id"] == key_id.as_str())
        .expect("an api_key.create event for the key");
    assert_eq!(event["actor_id"], root_user.as_str(), "{event}");
    assert_eq!(event["details"]["user_id"], dev.as_str(), "{event}");
    api.finish().await;
}

async fn revoke(api: &Api, by: &str, key_id: &str) -> (StatusCode, Value) {
    api.call("DELETE", &format!("/v1/api-keys/{key_id}"), by, None)
        .await
}

/// The fuzzer's lock-out: revoking the only super-admin key is refused with `409`, and nothing
/// changes; with a second key the first goes, and then the second is the last.
async fn the_last_super_admin_key_cannot_be_revoked(db: Db, live: Live) {
    let api = Api::start(db, live).await;
    let (_, root_user) = api.root_ids().await;
    let (_, v) = api.call("GET", "/v1/api-keys", &api.root, None).await;
    let bootstrap_id = v["data"][0]["id"].as_str().expect("key id").to_owned();
    let revokes_before = api.events("api_key.revoke").await.len();

    let (st, v) = revoke(&api, &api.root, &bootstrap_id).await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::CONFLICT, "LAST_SUPER_ADMIN_KEY"),
        "{v}"
    );
    let (st, v) = api.call("GET", "/workers", &api.root, None).await;
    assert_eq!(st, StatusCode::OK, "the key still works: {v}");
    assert_eq!(api.events("api_key.revoke").await.len(), revokes_before);

    // A narrowed key of the super admin is no way back in: it does not count.
    let (st, v) = api
        .call(
            "POST",
            "/v1/api-keys",
            &api.root,
            Some(json!({"name": "ro", "permissions": ["scaibunker:create"]})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let narrow = v["data"]["key"].as_str().expect("key").to_owned();
    let (st, v) = revoke(&api, &api.root, &bootstrap_id).await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::CONFLICT, "LAST_SUPER_ADMIN_KEY"),
        "{v}"
    );

    // A second full key: the first may go, and then the second is the last.
    let (st, v) = api
        .call(
            "POST",
            "/v1/api-keys",
            &api.root,
            Some(json!({"name": "second"})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let second = v["data"]["key"].as_str().expect("key").to_owned();
    let second_id = v["data"]["id"].as_str().expect("id").to_owned();
    let (st, v) = revoke(&api, &second, &bootstrap_id).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{v}");
    let (st, v) = revoke(&api, &second, &second_id).await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::CONFLICT, "LAST_SUPER_ADMIN_KEY"),
        "{v}"
    );
    assert_eq!(
        api.live_keys_of(&root_user).await,
        2,
        "the second and the narrowed one"
    );
    let (st, _) = api.call("GET", "/workers", &second, None).await;
    assert_eq!(st, StatusCode::OK);

    // Two revocations racing for the last two full keys: one passes, one is refused, and
    // exactly one full key is left, whichever won. The narrowed key sends both (one's own
    // keys need no admin permission), so neither request loses its credential to the other.
    let (mut survivor, mut survivor_id) = (second, second_id);
    for round in 0..5 {
        let (_, v) = api
            .call(
                "POST",
                "/v1/api-keys",
                &survivor,
                Some(json!({"name": "next"})),
            )
            .await;
        let fresh = v["data"]["key"].as_str().expect("key").to_owned();
        let fresh_id = v["data"]["id"].as_str().expect("id").to_owned();
        let (a, b) = tokio::join!(
            revoke(&api, &narrow, &fresh_id),
            revoke(&api, &narrow, &survivor_id)
        );
        let mut got = [a.0, b.0];
        got.sort();
        assert_eq!(
            got,
            [StatusCode::NO_CONTENT, StatusCode::CONFLICT],
            "round {round}: {a:?} {b:?}"
        );
        if b.0 == StatusCode::NO_CONTENT {
            (survivor, survivor_id) = (fresh, fresh_id);
        }
        let full_left: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM api_keys WHERE user_id = ? AND revoked_at IS NULL \
             AND permissions IS NULL",
        )
        .bind(&root_user)
        .fetch_one(api.handle.services.store.pool())
        .await
        .expect("count");
        assert_eq!(full_left, 1, "round {round}");
        let (st, _) = api.call("GET", "/workers", &survivor, None).await;
        assert_eq!(st, StatusCode::OK, "round {round}");
    }
    api.finish().await;
}

/// `scaibunker admin recover-key` calls [`auth::recover_key`]: a new key for the oldest super
/// admin that holds every platform power, audited.
async fn a_recovered_key_is_a_working_audited_super_admin_key(db: Db, live: Live) {
    let api = Api::start(db, live).await;
    let (platform, root_user) = api.root_ids().await;
    let recovered = auth::recover_key(&api.handle.services.store)
        .await
        .expect("recovery mints a key");
    assert!(recovered.key.starts_with("sgk_") && recovered.key.len() >= 36);
    assert_eq!(recovered.user_id, root_user);
    for path in ["/workers", "/v1/tenants"] {
        let (st, v) = api.call("GET", path, &recovered.key, None).await;
        assert_eq!(st, StatusCode::OK, "{path}: {v}");
    }
    let events = api.events("api_key.recover").await;
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(e["actor_type"], "system", "{e}");
    assert_eq!(e["tenant_id"], platform.as_str(), "{e}");
    assert_eq!(e["resource_id"], recovered.key_id.as_str(), "{e}");
    assert_eq!(e["details"]["user_id"], root_user.as_str(), "{e}");
    assert!(
        !e.to_string().contains(&recovered.key),
        "the secret is never audited"
    );
    api.finish().await;
}

/// A leaked key in a customer tenant can be listed and killed by the platform operator;
/// a tenant admin still sees only its own tenant.
async fn a_super_admin_lists_and_revokes_another_tenants_keys(db: Db, live: Live) {
    let api = Api::start(db, live).await;
    let acme = api.tenant("acme").await;
    let boss = api
        .user(
            &api.root,
            &acme,
            "boss@acme.test",
            "tenant_admin",
            json!([]),
        )
        .await;
    let (_, v) = api.mint(&api.root, &boss).await;
    let boss_key = v["data"]["key"].as_str().expect("key").to_owned();
    let boss_key_id = v["data"]["id"].as_str().expect("id").to_owned();

    let (st, v) = api
        .call(
            "GET",
            &format!("/v1/api-keys?tenant_id={acme}"),
            &api.root,
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .expect("keys")
        .iter()
        .filter_map(|k| k["id"].as_str())
        .collect();
    assert_eq!(ids, [boss_key_id.as_str()]);
    let (st, v) = api
        .call("GET", "/v1/api-keys?tenant_id=tnt_nope", &api.root, None)
        .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::NOT_FOUND, "TENANT_NOT_FOUND"),
        "{v}"
    );
    let (platform, _) = api.root_ids().await;
    let (st, v) = api
        .call(
            "GET",
            &format!("/v1/api-keys?tenant_id={platform}"),
            &boss_key,
            None,
        )
        .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::NOT_FOUND, "TENANT_NOT_FOUND"),
        "{v}"
    );

    let (st, v) = revoke(&api, &api.root, &boss_key_id).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{v}");
    let (st, _) = api.call("GET", "/v1/api-keys", &boss_key, None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let events = api.events("api_key.revoke").await;
    let e = events
        .iter()
        .find(|e| e["resource_id"] == boss_key_id.as_str())
        .expect("revocation audited");
    assert_eq!(e["tenant_id"], acme.as_str(), "{e}");
    api.finish().await;
}

/// `transit` without a spoof guard needs `scaibunker:l2_transparency` on top of
/// `scaibunker:network:transit`: a user holding only the latter is refused before anything is
/// placed; with the guard on, the same user passes the permission checks.
async fn a_transit_nic_without_a_spoof_guard_needs_l2_transparency(db: Db, live: Live) {
    let api = Api::start(db, live).await;
    let acme = api.tenant("acme").await;
    let dev = api
        .user(
            &api.root,
            &acme,
            "lab@acme.test",
            "tenant_user",
            json!(["scaibunker:network:transit"]),
        )
        .await;
    let key = api.key_for(&api.root, &dev).await;
    let create = |spoof_guard: bool| {
        json!({"image": "default", "network_profile": "transit",
               "interfaces": [{"if_name": "eth1", "bridge_name": "br-lab", "spoof_guard": spoof_guard}]})
    };
    let (st, v) = api
        .call(
            "POST",
            "/v1/modules/scaibunker/bunkers",
            &key,
            Some(create(false)),
        )
        .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::FORBIDDEN, "NETWORK_PROFILE_DENIED"),
        "{v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("scaibunker:l2_transparency"),
        "{v}"
    );
    // A physical device's MAC (globally administered) is impersonation: L2 power too.
    let vendor = json!({"image": "default", "network_profile": "transit",
        "interfaces": [{"if_name": "eth1", "bridge_name": "br-lab", "mac": "00:11:22:33:44:55"}]});
    let (st, v) = api
        .call("POST", "/v1/modules/scaibunker/bunkers", &key, Some(vendor))
        .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::FORBIDDEN, "NETWORK_PROFILE_DENIED"),
        "{v}"
    );
    let (st, v) = api
        .call(
            "POST",
            "/v1/modules/scaibunker/bunkers",
            &key,
            Some(create(true)),
        )
        .await;
    // (This harness has no image: the create gets that far.)
    assert_eq!(
        (st, code(&v)),
        (StatusCode::NOT_FOUND, "IMAGE_NOT_FOUND"),
        "with the guard on, the permission suffices: {v}"
    );
    api.finish().await;
}

/// Runs each scenario on SQLite (in-process live state) and on MariaDB with Redis.
macro_rules! matrix {
    ($($name:ident),* $(,)?) => {
        mod sqlite_in_process {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Db::Sqlite, super::Live::InProcess).await })*
        }
        mod mariadb_redis {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Db::MariaDb, super::Live::Redis).await })*
        }
    };
}

matrix!(
    a_platform_tenant_admin_cannot_mint_a_super_admin_key,
    an_ordinary_tenant_admin_cannot_mint_up_and_minting_is_audited_as_the_minter,
    the_last_super_admin_key_cannot_be_revoked,
    a_recovered_key_is_a_working_audited_super_admin_key,
    a_super_admin_lists_and_revokes_another_tenants_keys,
    a_transit_nic_without_a_spoof_guard_needs_l2_transparency,
);
