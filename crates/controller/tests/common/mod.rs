//! Test databases on both SQL backends, shared by the controller's integration tests.
#![allow(dead_code)]

pub mod garage;

/// Runs each named `async fn(Db)` scenario as two tests, one per SQL backend
/// (`sqlite::name`, `mariadb::name`). Test files take it with `#[macro_use] mod common;`.
#[allow(unused_macros)]
macro_rules! both {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Db::Sqlite).await
            })*
        }
        mod mariadb {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Db::MariaDb).await
            })*
        }
    };
}

/// The SQL backend a test runs on. Every scenario runs on both (see `both!`).
#[derive(Clone, Copy)]
pub enum Db {
    Sqlite,
    MariaDb,
}

/// A database made for one test, dropped after it.
pub struct TestDatabase {
    pub url: String,
    drop_name: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

pub fn mariadb_server() -> String {
    std::env::var("SCAIBUNKER_TEST_MARIADB_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".to_owned())
}

impl Db {
    pub async fn create(self) -> TestDatabase {
        match self {
            Db::Sqlite => {
                let dir = tempfile::tempdir().expect("tempdir");
                TestDatabase {
                    url: format!("sqlite://{}/test.db", dir.path().display()),
                    drop_name: None,
                    _dir: Some(dir),
                }
            }
            Db::MariaDb => {
                let server = mariadb_server();
                let name = format!("sbtest_{:016x}", rand_u64());
                let mut conn = <sqlx::MySqlConnection as sqlx::Connection>::connect(&server)
                    .await
                    .unwrap_or_else(|e| {
                        panic!("MariaDB is not reachable at {server} ({e}); start it with `start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd` or set SCAIBUNKER_TEST_MARIADB_URL")
                    });
                sqlx::Executor::execute(
                    &mut conn,
                    sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")),
                )
                .await
                .expect("create test database");
                TestDatabase {
                    url: format!("{server}/{name}"),
                    drop_name: Some(name),
                    _dir: None,
                }
            }
        }
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let Some(name) = self.drop_name.take() else {
            return;
        };
        let server = mariadb_server();
        // Drop runs inside the test's runtime; a separate thread and runtime may block.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                if let Ok(mut conn) =
                    <sqlx::MySqlConnection as sqlx::Connection>::connect(&server).await
                {
                    let _ = sqlx::Executor::execute(
                        &mut conn,
                        sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name}")),
                    )
                    .await;
                }
            });
        })
        .join();
    }
}

/// The Redis of the live-state tests (`SCAIBUNKER_TEST_REDIS_URL`).
pub fn redis_url() -> String {
    std::env::var("SCAIBUNKER_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A Redis key prefix no other test uses.
pub fn unique_redis_prefix() -> String {
    format!("sbtest:{:016x}:", rand_u64())
}

/// Deletes every key under `prefix`: a Redis wipe as far as one installation can tell.
pub async fn wipe_redis(prefix: &str) {
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

/// Sends `method url` (with `key` as the bearer and `body` as JSON, if given) and returns the
/// status and the body as JSON: `null` when empty, a JSON string when it is not JSON.
pub async fn request(
    http: &reqwest::Client,
    method: &str,
    url: String,
    key: Option<&str>,
    body: Option<serde_json::Value>,
) -> (reqwest::StatusCode, serde_json::Value) {
    let mut rb = http.request(method.parse().expect("method"), url);
    if let Some(k) = key {
        rb = rb.bearer_auth(k);
    }
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    json_of(rb.send().await.expect("request")).await
}

/// A response's status and body as [`request`] reads them.
pub async fn json_of(resp: reqwest::Response) -> (reqwest::StatusCode, serde_json::Value) {
    let status = resp.status();
    let text = resp.text().await.expect("body");
    let v = if text.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
    };
    (status, v)
}

/// Inserts a tenant with one user of `role` and a key of theirs, as the bootstrap does; returns
/// (tenant id `tnt_{slug}`, user id `usr_{slug}`, key).
pub async fn tenant_with_key(
    store: &scaibunker_controller::store::Store,
    slug: &str,
    role: &str,
) -> (String, String, String) {
    use scaibunker_controller::store::identity::{NewApiKey, NewTenant, NewUser};
    let key = format!("sgk_{slug}_{}", "k".repeat(40));
    let (tenant, user) = (format!("tnt_{slug}"), format!("usr_{slug}"));
    store
        .insert_tenant_user_key(
            NewTenant {
                id: &tenant,
                name: slug,
                slug,
            },
            NewUser {
                id: &user,
                tenant_id: &tenant,
                email: &format!("{slug}@example.com"),
                role,
            },
            NewApiKey {
                id: &format!("key_{slug}"),
                tenant_id: &tenant,
                user_id: &user,
                name: "test",
                key_sha256: &scaibunker_controller::service::auth::hash_key(&key),
                permissions: None,
            },
        )
        .await
        .expect("tenant inserted");
    (tenant, user, key)
}

/// The registration of a stand-in worker named `fake` at `url` holding the image `default`
/// (`image_sha`) and `capacity`.
pub fn fake_registration(
    url: String,
    image_sha: &str,
    capacity: scaibunker_proto::worker::Capacity,
) -> serde_json::Value {
    use scaibunker_proto::worker::{CachedImage, PROTOCOL_VERSION, RegisterRequest};
    serde_json::to_value(RegisterRequest {
        protocol_version: PROTOCOL_VERSION,
        name: "fake".into(),
        url,
        capacity,
        images: vec![CachedImage {
            name: "default".into(),
            sha256: image_sha.into(),
            size_bytes: 1 << 30,
        }],
        runtime: "qemu/tcg".into(),
    })
    .expect("json")
}
