//! The OpenAPI document: the committed copy `docs/openapi.json` must equal the one generated
//! from the code, and a started controller must serve that same document at `/openapi.json`.
//! After an API change, refresh the copy with
//! `SCAIBUNKER_UPDATE_OPENAPI=1 cargo test -p scaibunker-controller --test openapi`.

use std::net::SocketAddr;
use std::path::PathBuf;

use scaibunker_controller::config::ControllerConfig;
use scaibunker_controller::http::openapi;
use scaibunker_controller::start;
use serde_json::Value;

fn committed_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json")
}

fn generated() -> Value {
    serde_json::to_value(openapi()).expect("the document serialises")
}

/// The committed form: utoipa's own pretty JSON (properties in declaration order).
fn pretty() -> String {
    let mut s = openapi().to_pretty_json().expect("the document serialises");
    s.push('\n');
    s
}

#[test]
fn committed_copy_matches_the_code() {
    let path = committed_path();
    let fresh = pretty();
    if std::env::var_os("SCAIBUNKER_UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &fresh).expect("write docs/openapi.json");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "docs/openapi.json is stale: run \
         `SCAIBUNKER_UPDATE_OPENAPI=1 cargo test -p scaibunker-controller --test openapi`"
    );
}

#[test]
fn document_is_openapi_3_1_with_the_known_operations() {
    let doc = generated();
    let version = doc["openapi"].as_str().expect("openapi field");
    assert!(version.starts_with("3.1"), "openapi is {version}");
    assert_eq!(doc["info"]["title"], "ScaiBunker API");
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));

    let m = "/v1/modules/scaibunker";
    for (path, method) in [
        (format!("{m}/bunkers"), "post"),
        (format!("{m}/bunkers"), "get"),
        (format!("{m}/bunkers/{{id}}"), "get"),
        (format!("{m}/bunkers/{{id}}"), "delete"),
        (format!("{m}/bunkers/{{id}}/exec"), "post"),
        (format!("{m}/bunkers/{{id}}/files"), "put"),
        (format!("{m}/bunkers/{{id}}/files"), "get"),
        (format!("{m}/workers/register"), "post"),
        (format!("{m}/heartbeat"), "post"),
        (format!("{m}/storage/objects/{{key}}"), "put"),
        (format!("{m}/storage/objects/{{key}}"), "get"),
        (format!("{m}/storage/objects/{{key}}"), "head"),
        (format!("{m}/storage/objects/{{key}}"), "delete"),
        (format!("{m}/storage/capabilities"), "post"),
        ("/v1/api-keys".to_owned(), "post"),
        ("/v1/audit-log".to_owned(), "get"),
    ] {
        let op = &doc["paths"][&path][method];
        assert!(op.is_object(), "{method} {path} is not documented");
        let responses = op["responses"].as_object().expect("responses");
        assert!(
            responses.keys().any(|s| s.starts_with('2')),
            "{method} {path} documents no success response"
        );
    }

    // Errors are the error envelope; bodies and records are the api crate's types.
    let create = &doc["paths"][format!("{m}/bunkers")]["post"];
    assert_eq!(
        create["responses"]["503"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/Error"
    );
    assert_eq!(
        create["requestBody"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/CreateBunker"
    );
    assert_eq!(create["security"][0]["bearer"], serde_json::json!([]));
    let upload = &doc["paths"][format!("{m}/bunkers/{{id}}/files")]["put"];
    assert!(upload["requestBody"]["content"]["application/octet-stream"].is_object());
    let register = &doc["paths"][format!("{m}/workers/register")]["post"];
    assert_eq!(register["tags"][0], "internal");
    assert_eq!(
        register["security"][0]["worker_token"],
        serde_json::json!([])
    );

    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["bearer"]["scheme"], "bearer");
    assert_eq!(schemes["worker_token"]["scheme"], "bearer");

    // Operation ids are unique (generators name methods after them).
    let mut ids = Vec::new();
    for item in doc["paths"].as_object().expect("paths").values() {
        for op in item.as_object().expect("path item").values() {
            if let Some(id) = op["operationId"].as_str() {
                ids.push(id.to_owned());
            }
        }
    }
    let count = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), count, "duplicate operation ids");
}

#[tokio::test]
async fn controller_serves_the_generated_document_without_auth() {
    let dir = tempfile::tempdir().expect("tempdir");
    let listen: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let config =
        ControllerConfig::embedded(dir.path().to_path_buf(), listen, "swt_openapi_test".into());
    let handle = start(config).await.expect("controller starts");
    let resp = reqwest::get(format!("{}/openapi.json", handle.url()))
        .await
        .expect("GET /openapi.json");
    assert_eq!(resp.status(), reqwest::StatusCode::OK);
    let content_type = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert_eq!(content_type, "application/json");
    let served: Value = resp.json().await.expect("JSON body");
    assert_eq!(served, generated());
}
