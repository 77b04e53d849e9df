//! Bearer JWTs next to API keys: a real controller on a random port, tokens minted here with
//! `jsonwebtoken`, RSA key pairs generated here. Users and tenants are made through the platform
//! routes with the bootstrap key, so the JWT's `sub` and `tenant_id` name real rows.

use std::net::SocketAddr;
use std::sync::OnceLock;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header, get_current_timestamp};
use reqwest::StatusCode;
use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
use scaibunker_controller::config::ControllerConfig;
use scaibunker_controller::{ControllerHandle, start};
use serde_json::{Value, json};

#[macro_use]
mod common;

use common::{Db, TestDatabase};

const SECRET: &str = "a-test-secret-of-at-least-32-bytes-long";
/// What the client sees for every refused token, whatever the reason.
const INVALID_MESSAGE: &str = "the token is invalid or revoked";

struct Env {
    handle: ControllerHandle,
    http: reqwest::Client,
    /// A `tenant_user` of tenant Acme.
    user_id: String,
    acme: String,
    /// A second tenant; the user is not in it.
    globex: String,
    _dir: tempfile::TempDir,
    _database: TestDatabase,
}

impl Env {
    async fn start(db: Db, configure: impl FnOnce(&mut ControllerConfig)) -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let listen: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let mut config =
            ControllerConfig::embedded(dir.path().to_path_buf(), listen, "swt_test".into());
        let database = db.create().await;
        config.database_url = database.url.clone();
        configure(&mut config);
        let handle = start(config).await.expect("controller starts");
        let admin = handle.bootstrap_key.clone().expect("bootstrap key");
        let http = reqwest::Client::new();
        let platform = |path: &str| format!("{}/v1{path}", handle.url());
        let post = |path: String, body: Value| {
            let (http, admin) = (http.clone(), admin.clone());
            async move {
                let resp = http
                    .post(path)
                    .bearer_auth(admin)
                    .json(&body)
                    .send()
                    .await
                    .expect("send");
                let st = resp.status();
                let v: Value = resp.json().await.expect("json");
                assert_eq!(st, StatusCode::CREATED, "{v}");
                v["data"]["id"].as_str().expect("id").to_owned()
            }
        };
        let acme = post(
            platform("/tenants"),
            json!({"name": "Acme", "slug": "acme"}),
        )
        .await;
        let globex = post(
            platform("/tenants"),
            json!({"name": "Globex", "slug": "globex"}),
        )
        .await;
        let user_id = post(
            platform("/users"),
            json!({"email": "dev@acme.test", "tenant_id": acme, "role": "tenant_user"}),
        )
        .await;
        assert!(user_id.starts_with("usr_"));
        Env {
            handle,
            http,
            user_id,
            acme,
            globex,
            _dir: dir,
            _database: database,
        }
    }

    async fn call(&self, method: &str, path: &str, token: &str) -> (StatusCode, Value) {
        let mut rb = self
            .http
            .request(
                method.parse().expect("method"),
                format!("{}/v1/modules/scaibunker{path}", self.handle.url()),
            )
            .bearer_auth(token);
        if method == "POST" {
            rb = rb.json(&json!({"command": "true"}));
        }
        let resp = rb.send().await.expect("request");
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn list_bunkers(&self, token: &str) -> (StatusCode, Value) {
        self.call("GET", "/bunkers", token).await
    }

    /// Claims for the Acme user, expiring in `exp_in_s` seconds (negative: in the past).
    fn claims(&self, exp_in_s: i64) -> Value {
        json!({
            "sub": self.user_id,
            "tenant_id": self.acme,
            "exp": get_current_timestamp() as i64 + exp_in_s,
        })
    }
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("<no code>")
}

/// Asserts a `401 AUTH_TOKEN_INVALID` that says nothing about why.
#[track_caller]
fn assert_refused((st, v): (StatusCode, Value), case: &str) {
    assert_eq!(
        (st, code(&v)),
        (StatusCode::UNAUTHORIZED, "AUTH_TOKEN_INVALID"),
        "{case}: {v}"
    );
    assert_eq!(v["error"]["message"], INVALID_MESSAGE, "{case}");
}

fn hs256(secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("hs256 token")
}

fn rs256(private_pem: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        claims,
        &EncodingKey::from_rsa_pem(private_pem.as_bytes()).expect("rsa private key"),
    )
    .expect("rs256 token")
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).expect("json"))
}

/// An RSA key pair as (private PKCS#8 PEM, public SPKI PEM), made once per test binary.
fn rsa_pair(which: usize) -> &'static (String, String) {
    static PAIRS: OnceLock<[(String, String); 2]> = OnceLock::new();
    let pairs = PAIRS.get_or_init(|| {
        let make = || {
            let private = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048)
                .expect("generate an RSA key");
            let public = rsa::RsaPublicKey::from(&private);
            (
                private
                    .to_pkcs8_pem(LineEnding::LF)
                    .expect("private pem")
                    .to_string(),
                public
                    .to_public_key_pem(LineEnding::LF)
                    .expect("public pem"),
            )
        };
        [make(), make()]
    });
    &pairs[which]
}

async fn hs256_tokens_authenticate_a_user_of_their_tenant(db: Db) {
    let env = Env::start(db, |c| c.jwt_hs256_secret = Some(SECRET.into())).await;

    let token = hs256(SECRET, &env.claims(300));
    let (st, v) = env.list_bunkers(&token).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    // The token's user is the caller: exec on an unknown bunker reaches the lookup.
    let (st, v) = env.call("POST", "/bunkers/bnk_x/exec", &token).await;
    assert_eq!((st, code(&v)), (StatusCode::NOT_FOUND, "BUNKER_NOT_FOUND"));

    // Within the leeway an expired token still passes; well past it, it does not.
    let (st, v) = env.list_bunkers(&hs256(SECRET, &env.claims(-5))).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_refused(
        env.list_bunkers(&hs256(SECRET, &env.claims(-120))).await,
        "expired",
    );
    let mut no_exp = env.claims(0);
    no_exp.as_object_mut().expect("object").remove("exp");
    assert_refused(
        env.list_bunkers(&hs256(SECRET, &no_exp)).await,
        "without exp",
    );

    assert_refused(
        env.list_bunkers(&hs256(
            "another-secret-also-32-bytes-long!!",
            &env.claims(300),
        ))
        .await,
        "wrong secret",
    );

    let mut other_tenant = env.claims(300);
    other_tenant["tenant_id"] = json!(env.globex);
    assert_refused(
        env.list_bunkers(&hs256(SECRET, &other_tenant)).await,
        "tenant_id not the user's",
    );
    let mut unknown = env.claims(300);
    unknown["sub"] = json!("usr_nobody");
    assert_refused(
        env.list_bunkers(&hs256(SECRET, &unknown)).await,
        "unknown sub",
    );

    // An `aud` nobody configured is not ours (RFC 7519 §4.1.3).
    let mut audience = env.claims(300);
    audience["aud"] = json!("some-other-service");
    assert_refused(
        env.list_bunkers(&hs256(SECRET, &audience)).await,
        "unconfigured aud",
    );
}

async fn unsigned_and_tampered_tokens_are_refused(db: Db) {
    let env = Env::start(db, |c| c.jwt_hs256_secret = Some(SECRET.into())).await;
    let good = hs256(SECRET, &env.claims(300));
    let (header, rest) = good.split_once('.').expect("header");
    let (_payload, signature) = rest.split_once('.').expect("payload");

    let none = b64(&json!({"alg": "none", "typ": "JWT"}));
    let payload = b64(&env.claims(300));
    assert_refused(
        env.list_bunkers(&format!("{none}.{payload}.")).await,
        "alg none, empty signature",
    );
    assert_refused(
        env.list_bunkers(&format!("{none}.{payload}.{signature}"))
            .await,
        "alg none with a signature",
    );

    // Narrow permissions and keep the old signature: the payload no longer matches it.
    let mut tampered = env.claims(3600);
    tampered["permissions"] = json!(["scaibunker:create"]);
    let tampered = format!("{header}.{}.{signature}", b64(&tampered));
    assert_refused(env.list_bunkers(&tampered).await, "tampered payload");

    assert_refused(env.list_bunkers("a.b.c").await, "garbage in three parts");
    assert_refused(env.list_bunkers("not-a-jwt").await, "one part");
}

async fn a_permissions_claim_narrows_the_user_like_a_narrowed_key(db: Db) {
    let env = Env::start(db, |c| c.jwt_hs256_secret = Some(SECRET.into())).await;
    let mut claims = env.claims(300);
    claims["permissions"] = json!(["scaibunker:create", "scaigrid:chat"]);
    let token = hs256(SECRET, &claims);
    let (st, v) = env.list_bunkers(&token).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (st, v) = env.call("POST", "/bunkers/bnk_x/exec", &token).await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::FORBIDDEN, "AUTHZ_PERMISSION_DENIED"),
        "{v}"
    );

    // A claim cannot widen: `root` is not the tenant user's to narrow to.
    claims["permissions"] = json!(["scaibunker:execute", "scaibunker:root"]);
    let token = hs256(SECRET, &claims);
    let (st, v) = env.call("POST", "/bunkers/bnk_x/exec", &token).await;
    assert_eq!((st, code(&v)), (StatusCode::NOT_FOUND, "BUNKER_NOT_FOUND"));
    let (st, v) = env.list_bunkers(&token).await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::FORBIDDEN, "AUTHZ_PERMISSION_DENIED"),
        "without `create` there is no read: {v}"
    );
}

async fn rs256_tokens_verify_with_the_configured_public_key_only(db: Db) {
    let (private, public) = rsa_pair(0);
    let (other_private, _) = rsa_pair(1);
    let env = Env::start(db, |c| c.jwt_rs256_public_pem = Some(public.clone())).await;

    let (st, v) = env.list_bunkers(&rs256(private, &env.claims(300))).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_refused(
        env.list_bunkers(&rs256(other_private, &env.claims(300)))
            .await,
        "signed by another key",
    );

    // Only RS256 is configured: HS256 is refused, also when keyed with the public key's text
    // (the classic algorithm confusion).
    assert_refused(
        env.list_bunkers(&hs256(SECRET, &env.claims(300))).await,
        "hs256 while only rs256 is configured",
    );
    assert_refused(
        env.list_bunkers(&hs256(public, &env.claims(300))).await,
        "hs256 keyed with the rsa public key",
    );
    // Another algorithm of the same family is not accepted either.
    let rs512 = jsonwebtoken::encode(
        &Header::new(Algorithm::RS512),
        &env.claims(300),
        &EncodingKey::from_rsa_pem(private.as_bytes()).expect("rsa private key"),
    )
    .expect("rs512 token");
    assert_refused(env.list_bunkers(&rs512).await, "rs512");
}

async fn without_jwt_configuration_every_jwt_is_refused(db: Db) {
    let env = Env::start(db, |_| {}).await;
    assert_refused(
        env.list_bunkers(&hs256(SECRET, &env.claims(300))).await,
        "hs256 with nothing configured",
    );
    let (private, _) = rsa_pair(0);
    assert_refused(
        env.list_bunkers(&rs256(private, &env.claims(300))).await,
        "rs256 with nothing configured",
    );
}

async fn a_configured_issuer_and_audience_are_required(db: Db) {
    let env = Env::start(db, |c| {
        c.jwt_hs256_secret = Some(SECRET.into());
        c.jwt_issuer = Some("https://idp.example".into());
        c.jwt_audience = Some("scaibunker".into());
    })
    .await;
    let mut claims = env.claims(300);
    claims["iss"] = json!("https://idp.example");
    claims["aud"] = json!(["other", "scaibunker"]);
    let (st, v) = env.list_bunkers(&hs256(SECRET, &claims)).await;
    assert_eq!(st, StatusCode::OK, "{v}");

    let mut wrong_iss = claims.clone();
    wrong_iss["iss"] = json!("https://evil.example");
    assert_refused(
        env.list_bunkers(&hs256(SECRET, &wrong_iss)).await,
        "wrong iss",
    );
    let mut wrong_aud = claims.clone();
    wrong_aud["aud"] = json!("other");
    assert_refused(
        env.list_bunkers(&hs256(SECRET, &wrong_aud)).await,
        "wrong aud",
    );
    let mut no_aud = claims.clone();
    no_aud.as_object_mut().expect("object").remove("aud");
    assert_refused(
        env.list_bunkers(&hs256(SECRET, &no_aud)).await,
        "missing aud",
    );
}

both!(
    hs256_tokens_authenticate_a_user_of_their_tenant,
    unsigned_and_tampered_tokens_are_refused,
    a_permissions_claim_narrows_the_user_like_a_narrowed_key,
    rs256_tokens_verify_with_the_configured_public_key_only,
    without_jwt_configuration_every_jwt_is_refused,
    a_configured_issuer_and_audience_are_required,
);
