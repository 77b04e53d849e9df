//! The storage proxy over HTTP: `/v1/modules/scaibunker/storage/objects/{key…}` with the worker
//! token and with capability tokens from `POST /storage/capabilities`, bodies streamed both
//! ways, and `SCAIGRID_MODE=bunker_proxy` serving objects with no database reachable.

use std::net::SocketAddr;

use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::StatusCode;
use scaibunker_api::storage::StorageVerb;
use scaibunker_controller::config::ControllerConfig;
use scaibunker_controller::service::storage::CapabilityClaims;
use scaibunker_controller::{ControllerHandle, start, start_storage_proxy};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

#[macro_use]
mod common;

use common::{Db, TestDatabase};

const WORKER_TOKEN: &str = "swt_storage_test_worker_token";
const SECRET: &str = "storage-test-secret";
const MIB: usize = 1024 * 1024;

struct Proxy {
    handle: ControllerHandle,
    http: reqwest::Client,
    admin_key: String,
    dir: tempfile::TempDir,
    _database: TestDatabase,
}

fn config(dir: &std::path::Path) -> ControllerConfig {
    let listen: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let mut c = ControllerConfig::embedded(dir.to_path_buf(), listen, WORKER_TOKEN.into());
    c.storage_secret = SECRET.into();
    c
}

/// A capability for every key and verb under the test secret: what these tests use to drive
/// the object routes (a worker's credential only reaches images and snapshots).
fn all_access() -> String {
    let dir = std::env::temp_dir().join("scaibunker-storage-test-signer");
    let objects = scaibunker_controller::objects::Objects::open(
        &format!("file://{}", dir.display()),
        &scaibunker_controller::objects::S3Settings::default(),
    )
    .expect("local store");
    let signer =
        scaibunker_controller::service::storage::Storage::new(objects, SECRET.as_bytes(), 0);
    signer.sign(&CapabilityClaims {
        prefix: String::new(),
        verbs: vec![
            StorageVerb::Get,
            StorageVerb::Head,
            StorageVerb::Put,
            StorageVerb::Delete,
        ],
        expires_at: u64::MAX / 2,
        id: None,
    })
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("<no code>")
}

impl Proxy {
    async fn start(db: Db, max_object_bytes: u64) -> Proxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let database = db.create().await;
        let mut c = config(dir.path());
        c.database_url = database.url.clone();
        c.max_object_bytes = max_object_bytes;
        let handle = start(c).await.expect("controller starts");
        let admin_key = handle.bootstrap_key.clone().expect("bootstrap key");
        Proxy {
            handle,
            http: reqwest::Client::new(),
            admin_key,
            dir,
            _database: database,
        }
    }

    fn object_url(&self, key: &str) -> String {
        object_url(&self.handle.url(), key)
    }

    /// A key of the bootstrap admin narrowed to `permissions`.
    async fn narrowed_key(&self, permissions: &[&str]) -> String {
        let resp = self
            .http
            .post(format!("{}/v1/api-keys", self.handle.url()))
            .bearer_auth(&self.admin_key)
            .json(&json!({"name": "narrow", "permissions": permissions}))
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), StatusCode::CREATED);
        let v: Value = resp.json().await.expect("json");
        v["data"]["key"].as_str().expect("key").to_owned()
    }

    async fn mint(&self, key: &str, body: Value) -> (StatusCode, Value) {
        let resp = self
            .http
            .post(format!(
                "{}/v1/modules/scaibunker/storage/capabilities",
                self.handle.url()
            ))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .expect("send");
        (resp.status(), resp.json().await.expect("json"))
    }
}

fn object_url(base: &str, key: &str) -> String {
    format!("{base}/v1/modules/scaibunker/storage/objects/{key}")
}

async fn send(
    http: &reqwest::Client,
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<&'static [u8]>,
) -> (StatusCode, reqwest::header::HeaderMap, Bytes) {
    let mut rb = http.request(method.parse().expect("method"), url);
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    if let Some(b) = body {
        rb = rb.body(b);
    }
    let resp = rb.send().await.expect("request");
    let status = resp.status();
    let headers = resp.headers().clone();
    (status, headers, resp.bytes().await.expect("body"))
}

fn json_of(b: &Bytes) -> Value {
    serde_json::from_slice(b).unwrap_or(Value::Null)
}

async fn a_full_capability_puts_gets_heads_and_deletes_objects(db: Db) {
    let p = Proxy::start(db, 1024).await;
    let url = p.object_url("images/abc/rootfs.ext4");
    let (st, _, b) = send(
        &p.http,
        "PUT",
        &url,
        Some(all_access().as_str()),
        Some(b"rootfs bytes"),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{b:?}");
    let v = json_of(&b);
    assert_eq!(v["data"]["key"], "images/abc/rootfs.ext4");
    assert_eq!(v["data"]["size_bytes"], 12);
    assert_eq!(
        v["data"]["sha256"],
        hex::encode(Sha256::digest(b"rootfs bytes"))
    );
    let etag = format!("\"{}\"", v["data"]["etag"].as_str().expect("etag"));

    let (st, h, b) = send(&p.http, "GET", &url, Some(all_access().as_str()), None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(&b[..], b"rootfs bytes");
    assert_eq!(h["content-length"], "12");
    assert_eq!(h["etag"].to_str().expect("etag"), etag);
    assert!(h.contains_key("x-request-id"));

    let (st, h, b) = send(&p.http, "HEAD", &url, Some(all_access().as_str()), None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(h["content-length"], "12");
    assert_eq!(h["etag"].to_str().expect("etag"), etag);
    assert!(b.is_empty());

    // The object is where other services find it.
    let read = p
        .handle
        .services
        .objects()
        .head("images/abc/rootfs.ext4")
        .await
        .expect("head through the service api");
    assert_eq!(read.size_bytes, 12);

    let (st, _, _) = send(&p.http, "DELETE", &url, Some(all_access().as_str()), None).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, _, b) = send(&p.http, "GET", &url, Some(all_access().as_str()), None).await;
    assert_eq!(
        (st, code(&json_of(&b))),
        (StatusCode::NOT_FOUND, "OBJECT_NOT_FOUND")
    );
    let (st, _, _) = send(&p.http, "HEAD", &url, Some(all_access().as_str()), None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);

    // Credentials.
    let (st, _, b) = send(&p.http, "GET", &url, None, None).await;
    assert_eq!(
        (st, code(&json_of(&b))),
        (StatusCode::UNAUTHORIZED, "AUTH_TOKEN_MISSING")
    );
    // The shared join token is no storage credential (before, it opened every key).
    let (st, _, b) = send(&p.http, "GET", &url, Some(WORKER_TOKEN), None).await;
    assert_eq!(
        (st, code(&json_of(&b))),
        (StatusCode::UNAUTHORIZED, "AUTH_TOKEN_INVALID")
    );
    let (st, _, b) = send(&p.http, "GET", &url, Some("swt_wrong"), None).await;
    assert_eq!(
        (st, code(&json_of(&b))),
        (StatusCode::UNAUTHORIZED, "AUTH_TOKEN_INVALID")
    );
    // An API key is not a storage credential, not even the super admin's.
    let (st, _, b) = send(&p.http, "GET", &url, Some(&p.admin_key), None).await;
    assert_eq!(
        (st, code(&json_of(&b))),
        (StatusCode::UNAUTHORIZED, "AUTH_TOKEN_INVALID")
    );

    // Keys are validated (after the credential).
    for bad in [".hidden/x", "a/.tmp-1", "a%20b", "a%00b", "a/%5C/b", "a//b"] {
        let (st, _, b) = send(
            &p.http,
            "PUT",
            &p.object_url(bad),
            Some(all_access().as_str()),
            Some(b"x"),
        )
        .await;
        assert_eq!(
            (st, code(&json_of(&b))),
            (StatusCode::UNPROCESSABLE_ENTITY, "OBJECT_KEY_INVALID"),
            "{bad}"
        );
    }
    let long = "k".repeat(1025);
    let (st, _, b) = send(
        &p.http,
        "GET",
        &p.object_url(&long),
        Some(all_access().as_str()),
        None,
    )
    .await;
    assert_eq!(
        (st, code(&json_of(&b))),
        (StatusCode::UNPROCESSABLE_ENTITY, "OBJECT_KEY_INVALID")
    );

    // Size cap (1024 bytes here): by Content-Length up front, and counted for a chunked body.
    let (st, _, b) = send(
        &p.http,
        "PUT",
        &p.object_url("big/x"),
        Some(all_access().as_str()),
        Some(&[7u8; 1025]),
    )
    .await;
    assert_eq!(
        (st, code(&json_of(&b))),
        (StatusCode::PAYLOAD_TOO_LARGE, "OBJECT_TOO_LARGE")
    );
    let chunks = futures_util::stream::iter(
        (0..3).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![1u8; 400]))),
    );
    let resp = p
        .http
        .put(p.object_url("big/x"))
        .bearer_auth(all_access())
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let (st, _, _) = send(
        &p.http,
        "HEAD",
        &p.object_url("big/x"),
        Some(all_access().as_str()),
        None,
    )
    .await;
    assert_eq!(
        st,
        StatusCode::NOT_FOUND,
        "nothing of a refused upload is stored"
    );
}

/// A GET sent byte for byte as written (no path normalisation); the whole raw response.
async fn raw_get(addr: SocketAddr, path: &str, token: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    conn.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    conn.read_to_end(&mut out).await.expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

/// A body of `len` bytes produced chunk by chunk, and its SHA-256.
fn streamed(len: usize) -> (reqwest::Body, String) {
    let chunk = 256 * 1024;
    let make = move |i: usize| -> Vec<u8> {
        let n = chunk.min(len - i * chunk);
        (0..n).map(|j| ((i * chunk + j) % 251) as u8).collect()
    };
    let mut hash = Sha256::new();
    for i in 0..len.div_ceil(chunk) {
        hash.update(make(i));
    }
    let stream = futures_util::stream::iter(0..len.div_ceil(chunk))
        .map(move |i| Ok::<_, std::io::Error>(Bytes::from(make(i))));
    (
        reqwest::Body::wrap_stream(stream),
        hex::encode(hash.finalize()),
    )
}

async fn a_multi_mib_object_streams_through_the_proxy(db: Db) {
    let p = Proxy::start(db, 1 << 30).await;
    round_trip_large_object(&p.http, &p.handle.url()).await;
}

/// The same through a storage proxy whose store is S3 on a real Garage.
#[tokio::test]
async fn a_multi_mib_object_streams_through_a_proxy_on_s3() {
    let garage = common::garage::Garage::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = config(dir.path());
    c.object_store = garage.url();
    c.s3 = garage.settings();
    let proxy = start_storage_proxy(c).await.expect("proxy starts");
    round_trip_large_object(&reqwest::Client::new(), &proxy.url()).await;
    let (st, _, b) = send(
        &reqwest::Client::new(),
        "GET",
        &object_url(&proxy.url(), "missing/key"),
        Some(all_access().as_str()),
        None,
    )
    .await;
    assert_eq!(
        (st, code(&json_of(&b))),
        (StatusCode::NOT_FOUND, "OBJECT_NOT_FOUND")
    );
    proxy.shutdown().await;
}

/// Streams 24 MiB up and back down through `base`'s storage proxy, comparing SHA-256s.
async fn round_trip_large_object(http: &reqwest::Client, base: &str) {
    let len = 24 * MIB + 7;
    let (body, sha) = streamed(len);
    let url = object_url(base, "snapshots/snp_1/memory.bin");
    let resp = http
        .put(&url)
        .bearer_auth(all_access())
        .body(body)
        .send()
        .await
        .expect("put");
    assert_eq!(resp.status(), StatusCode::CREATED);
    let v: Value = resp.json().await.expect("json");
    assert_eq!(v["data"]["size_bytes"], len as u64);
    assert_eq!(v["data"]["sha256"], sha);

    let resp = http
        .get(&url)
        .bearer_auth(all_access())
        .send()
        .await
        .expect("get");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.content_length(), Some(len as u64));
    let mut hash = Sha256::new();
    let mut n = 0;
    let mut chunks = 0;
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("chunk");
        n += chunk.len();
        chunks += 1;
        hash.update(&chunk);
    }
    assert_eq!(n, len);
    assert_eq!(hex::encode(hash.finalize()), sha);
    // Streamed, not one buffered blob: the body arrived in many pieces.
    assert!(chunks > 10, "{chunks} chunks");
}

async fn capability_tokens_are_scoped_to_prefix_verbs_and_time(db: Db) {
    let p = Proxy::start(db, 1 << 20).await;
    let (st, v) = p
        .mint(
            &p.admin_key,
            json!({"prefix": "images/img_1/", "verbs": ["put", "get"], "ttl_s": 600}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let token = v["data"]["token"].as_str().expect("token").to_owned();
    assert!(token.starts_with("sbc1."));
    assert_eq!(v["data"]["prefix"], "images/img_1/");
    assert_eq!(v["data"]["verbs"], json!(["get", "put"]));
    assert!(
        v["data"]["expires_at"]
            .as_str()
            .expect("expires_at")
            .ends_with('Z')
    );

    let inside = p.object_url("images/img_1/rootfs.tar");
    let (st, _, b) = send(&p.http, "PUT", &inside, Some(&token), Some(b"tar")).await;
    assert_eq!(st, StatusCode::CREATED, "{b:?}");
    let (st, _, b) = send(&p.http, "GET", &inside, Some(&token), None).await;
    assert_eq!((st, &b[..]), (StatusCode::OK, &b"tar"[..]));
    // `get` covers `HEAD`.
    let (st, _, _) = send(&p.http, "HEAD", &inside, Some(&token), None).await;
    assert_eq!(st, StatusCode::OK);

    // A verb it does not carry.
    let (st, _, b) = send(&p.http, "DELETE", &inside, Some(&token), None).await;
    assert_eq!(
        (st, code(&json_of(&b))),
        (StatusCode::FORBIDDEN, "CAPABILITY_VERB_DENIED")
    );
    // Outside its prefix, including a sibling sharing the prefix's start.
    for outside in [
        "images/img_10/rootfs.tar",
        "images/img_1",
        "images/other",
        "x/images/img_1/y",
    ] {
        let (st, _, b) = send(&p.http, "GET", &p.object_url(outside), Some(&token), None).await;
        assert_eq!(
            (st, code(&json_of(&b))),
            (StatusCode::FORBIDDEN, "CAPABILITY_OUT_OF_SCOPE"),
            "{outside}"
        );
    }
    // Dot segments cannot climb out: they are invalid keys before any prefix check. (Sent raw:
    // an HTTP client would resolve them before sending.)
    let raw = raw_get(
        p.handle.addr,
        "/v1/modules/scaibunker/storage/objects/images/img_1/../img_2/x",
        &token,
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 422"), "{raw}");
    assert!(raw.contains("OBJECT_KEY_INVALID"), "{raw}");

    // Tampered: a changed signature, or a payload from another token under the old signature.
    let (signed, tag) = token.rsplit_once('.').expect("dot");
    let mut bad_tag = tag.to_owned();
    let last = if bad_tag.ends_with('A') { 'B' } else { 'A' };
    bad_tag.pop();
    bad_tag.push(last);
    let (_, v) = p
        .mint(
            &p.admin_key,
            json!({"prefix": "images/", "verbs": ["delete"], "ttl_s": 600}),
        )
        .await;
    let wider = v["data"]["token"].as_str().expect("token");
    let (wider_signed, _) = wider.rsplit_once('.').expect("dot");
    for forged in [
        format!("{signed}.{bad_tag}"),
        format!("{wider_signed}.{tag}"),
        "sbc1.garbage".to_owned(),
    ] {
        let (st, _, b) = send(&p.http, "GET", &inside, Some(&forged), None).await;
        assert_eq!(
            (st, code(&json_of(&b))),
            (StatusCode::UNAUTHORIZED, "CAPABILITY_INVALID"),
            "{forged}"
        );
    }

    // Past its expiry (signed by this controller's own key, so only the time is wrong).
    let expired = p.handle.services.storage.sign(&CapabilityClaims {
        prefix: "images/img_1/".into(),
        verbs: vec![StorageVerb::Get],
        expires_at: scaibunker_controller::service::storage::now_s() - 1,
        id: None,
    });
    let (st, _, b) = send(&p.http, "GET", &inside, Some(&expired), None).await;
    assert_eq!(
        (st, code(&json_of(&b))),
        (StatusCode::UNAUTHORIZED, "CAPABILITY_EXPIRED")
    );

    // Minting: the permission, the tenant scope without admin:platform, and the fields.
    let shell_only = p.narrowed_key(&["scaibunker:shell"]).await;
    let (st, v) = p
        .mint(
            &shell_only,
            json!({"prefix": "images/", "verbs": ["get"], "ttl_s": 60}),
        )
        .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::FORBIDDEN, "AUTHZ_PERMISSION_DENIED")
    );
    let manager = p.narrowed_key(&["scaibunker:images:manage"]).await;
    let (st, v) = p
        .mint(
            &manager,
            json!({"prefix": "images/", "verbs": ["get"], "ttl_s": 60}),
        )
        .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::UNPROCESSABLE_ENTITY, "VALIDATION_ERROR")
    );
    assert_eq!(v["error"]["details"][0]["field"], "prefix");
    let (_, me) = {
        let resp = p
            .http
            .get(format!("{}/v1/api-keys", p.handle.url()))
            .bearer_auth(&p.admin_key)
            .send()
            .await
            .expect("send");
        (resp.status(), resp.json::<Value>().await.expect("json"))
    };
    let tenant = me["data"][0]["tenant_id"]
        .as_str()
        .expect("tenant_id")
        .to_owned();
    let own = format!("tenants/{tenant}/images/");
    let (st, v) = p
        .mint(
            &manager,
            json!({"prefix": own, "verbs": ["get"], "ttl_s": 60}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    for (body, field) in [
        (
            json!({"prefix": "images/img_1", "verbs": ["get"], "ttl_s": 60}),
            "prefix",
        ),
        (
            json!({"prefix": "../", "verbs": ["get"], "ttl_s": 60}),
            "prefix",
        ),
        (
            json!({"prefix": "images/", "verbs": [], "ttl_s": 60}),
            "verbs",
        ),
        (
            json!({"prefix": "images/", "verbs": ["get"], "ttl_s": 0}),
            "ttl_s",
        ),
        (
            json!({"prefix": "images/", "verbs": ["get"], "ttl_s": 86401}),
            "ttl_s",
        ),
        (
            json!({"prefix": "images/", "verbs": ["chmod"], "ttl_s": 60}),
            "verbs[0]",
        ),
        (
            json!({"prefix": "images/", "verbs": ["get"], "ttl_s": 60, "x": 1}),
            "x",
        ),
    ] {
        let (st, v) = p.mint(&p.admin_key, body.clone()).await;
        assert_eq!(
            (st, code(&v)),
            (StatusCode::UNPROCESSABLE_ENTITY, "VALIDATION_ERROR"),
            "{body}"
        );
        assert_eq!(v["error"]["details"][0]["field"], field, "{body}");
    }

    // Minting is audited (scope only, never the token).
    let resp = p
        .http
        .get(format!(
            "{}/v1/audit-log?action=storage.capability.create",
            p.handle.url()
        ))
        .bearer_auth(&p.admin_key)
        .send()
        .await
        .expect("send");
    let v: Value = resp.json().await.expect("json");
    let events = v["data"].as_array().expect("events");
    assert_eq!(events.len(), 3, "{v}");
    assert!(!v.to_string().contains(&token));
}

/// `SCAIGRID_MODE=bunker_proxy`: starts with the database and Redis unreachable and serves
/// objects to a capability token minted by a controller sharing its secret and store.
#[tokio::test]
async fn bunker_proxy_mode_serves_objects_with_no_database() {
    let p = Proxy::start(Db::Sqlite, 1 << 20).await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let mut c = config(p.dir.path());
    c.database_url = format!("mysql://root@127.0.0.1:{dead}/nowhere");
    c.redis_url = Some(format!("redis://127.0.0.1:{dead}"));
    let proxy = start_storage_proxy(c)
        .await
        .expect("the proxy starts without a database");

    let health = reqwest::get(format!("{}/health", proxy.url()))
        .await
        .expect("health");
    assert_eq!(health.status(), StatusCode::OK);

    let (st, v) = p
        .mint(
            &p.admin_key,
            json!({"prefix": "exec/", "verbs": ["put", "get"], "ttl_s": 60}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let token = v["data"]["token"].as_str().expect("token").to_owned();
    let url = object_url(&proxy.url(), "exec/exe_1/stdout");
    let (st, _, b) = send(&p.http, "PUT", &url, Some(&token), Some(b"output")).await;
    assert_eq!(st, StatusCode::CREATED, "{b:?}");
    let (st, _, b) = send(&p.http, "GET", &url, Some(&token), None).await;
    assert_eq!((st, &b[..]), (StatusCode::OK, &b"output"[..]));
    // The worker token works on the proxy too, and the controller sees the same store.
    let (st, _, b) = send(
        &p.http,
        "GET",
        &p.object_url("exec/exe_1/stdout"),
        Some(all_access().as_str()),
        None,
    )
    .await;
    assert_eq!((st, &b[..]), (StatusCode::OK, &b"output"[..]));

    // Only the storage routes: minting and the rest of the API need the controller.
    for (method, path) in [
        ("POST", "/v1/modules/scaibunker/storage/capabilities"),
        ("GET", "/v1/modules/scaibunker/bunkers"),
        ("GET", "/metrics"),
    ] {
        let (st, _, b) = send(
            &p.http,
            method,
            &format!("{}{path}", proxy.url()),
            Some(&p.admin_key),
            None,
        )
        .await;
        assert_eq!(
            (st, code(&json_of(&b))),
            (StatusCode::NOT_FOUND, "NOT_FOUND"),
            "{method} {path}"
        );
    }
    proxy.shutdown().await;
}

impl Proxy {
    async fn call(
        &self,
        method: &str,
        path: &str,
        key: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let url = format!("{}{path}", self.handle.url());
        common::request(&self.http, method, url, Some(key), body).await
    }
}

async fn capabilities_are_revoked_alone_or_with_the_key_that_minted_them(db: Db) {
    let p = Proxy::start(db, 1 << 20).await;
    let revoke = |id: String, key: String| {
        let p = &p;
        async move {
            p.call(
                "DELETE",
                &format!("/v1/modules/scaibunker/storage/capabilities/{id}"),
                &key,
                None,
            )
            .await
        }
    };
    let url = p.object_url("images/img_1/rootfs.tar");
    let mint = |key: String| {
        let p = &p;
        async move {
            let (st, v) = p
                .mint(
                    &key,
                    json!({"prefix": "images/", "verbs": ["put", "get"], "ttl_s": 600}),
                )
                .await;
            assert_eq!(st, StatusCode::CREATED, "{v}");
            let id = v["data"]["id"].as_str().expect("id").to_owned();
            assert!(id.starts_with("cap_"), "{id}");
            (id, v["data"]["token"].as_str().expect("token").to_owned())
        }
    };

    // One capability revoked: its token is refused from then on, a second revoke finds none.
    let (id, token) = mint(p.admin_key.clone()).await;
    let (st, _, b) = send(&p.http, "PUT", &url, Some(&token), Some(b"tar")).await;
    assert_eq!(st, StatusCode::CREATED, "{b:?}");
    let (st, v) = revoke(id.clone(), p.admin_key.clone()).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{v}");
    for method in ["GET", "PUT"] {
        let (st, _, b) = send(&p.http, method, &url, Some(&token), Some(b"x")).await;
        assert_eq!(
            (st, code(&json_of(&b))),
            (StatusCode::UNAUTHORIZED, "CAPABILITY_REVOKED"),
            "{method}"
        );
    }
    let (st, v) = revoke(id, p.admin_key.clone()).await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::NOT_FOUND, "CAPABILITY_NOT_FOUND")
    );

    // A capability never outlives the key that minted it.
    let narrow = p
        .narrowed_key(&["scaibunker:images:manage", "scaibunker:admin:platform"])
        .await;
    let (_, token) = mint(narrow.clone()).await;
    let (st, _, _) = send(&p.http, "GET", &url, Some(&token), None).await;
    assert_eq!(st, StatusCode::OK);
    let (st, keys) = p.call("GET", "/v1/api-keys", &p.admin_key, None).await;
    assert_eq!(st, StatusCode::OK, "{keys}");
    let narrow_id = keys["data"]
        .as_array()
        .expect("keys")
        .iter()
        .find(|k| k["name"] == "narrow")
        .and_then(|k| k["id"].as_str())
        .expect("the narrow key is listed")
        .to_owned();
    let (st, v) = p
        .call(
            "DELETE",
            &format!("/v1/api-keys/{narrow_id}"),
            &p.admin_key,
            None,
        )
        .await;
    assert!(st.is_success(), "{st} {v}");
    let (st, _, b) = send(&p.http, "GET", &url, Some(&token), None).await;
    assert_eq!(
        (st, code(&json_of(&b))),
        (StatusCode::UNAUTHORIZED, "CAPABILITY_REVOKED")
    );

    // Another tenant's admin cannot revoke this tenant's capability, and nothing changes.
    let (id, token) = mint(p.admin_key.clone()).await;
    let (st, t) = p
        .call(
            "POST",
            "/v1/tenants",
            &p.admin_key,
            Some(json!({"name": "Other", "slug": "other"})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{t}");
    let tenant = t["data"]["id"].as_str().expect("tenant").to_owned();
    let (st, u) = p
        .call(
            "POST",
            "/v1/users",
            &p.admin_key,
            Some(json!({"email": "admin@other.example", "tenant_id": tenant, "role": "tenant_admin"})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{u}");
    let (st, k) = p
        .call(
            "POST",
            "/v1/api-keys",
            &p.admin_key,
            Some(json!({"name": "other", "user_id": u["data"]["id"]})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{k}");
    let other = k["data"]["key"].as_str().expect("key").to_owned();
    let (st, v) = revoke(id, other).await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::NOT_FOUND, "CAPABILITY_NOT_FOUND")
    );
    let (st, _, _) = send(&p.http, "GET", &url, Some(&token), None).await;
    assert_eq!(st, StatusCode::OK, "the capability still works");
}

both!(
    a_full_capability_puts_gets_heads_and_deletes_objects,
    a_multi_mib_object_streams_through_the_proxy,
    capability_tokens_are_scoped_to_prefix_verbs_and_time,
    capabilities_are_revoked_alone_or_with_the_key_that_minted_them,
);
