//! `SCAIGRID_MODE=bunker_proxy scaibunker serve`, the real binary: it starts with the database
//! and Redis unreachable and serves objects (a worker credential and a capability token, both
//! signed with the shared `SCAIBUNKER_STORAGE_SECRET`; not the join token), and nothing but the
//! storage routes and `/health`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use scaibunker_api::storage::StorageVerb;
use scaibunker_controller::objects::{Objects, S3Settings};
use scaibunker_controller::service::storage::{CapabilityClaims, Storage, now_s};

const WORKER_TOKEN: &str = "swt_cli_proxy_test";
const SECRET: &str = "cli-proxy-test-secret";

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

#[tokio::test]
async fn bunker_proxy_mode_serves_objects_with_the_database_unreachable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dead = closed_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_scaibunker"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("SCAIGRID_MODE", "bunker_proxy")
        .env("SCAIBUNKER_WORKER_TOKEN", WORKER_TOKEN)
        .env("SCAIBUNKER_STORAGE_SECRET", SECRET)
        .env(
            "SCAIBUNKER_DATABASE_URL",
            format!("mysql://root@127.0.0.1:{dead}/x"),
        )
        .env("SCAIBUNKER_REDIS_URL", format!("redis://127.0.0.1:{dead}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start scaibunker serve");
    let stdout = child.stdout.take().expect("stdout");
    let serve = Serve(child);
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read the first line");
    let url = line
        .trim()
        .strip_prefix("storage proxy listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();

    // A capability token minted elsewhere with the same secret.
    let objects = Objects::open(
        &format!("file://{}/unused", dir.path().display()),
        &S3Settings::default(),
    )
    .expect("store");
    let token = Storage::new(objects, SECRET.as_bytes(), 1).sign(&CapabilityClaims {
        prefix: "exec/".into(),
        verbs: vec![StorageVerb::Put, StorageVerb::Get],
        expires_at: now_s() + 60,
        id: None,
    });

    let http = reqwest::Client::new();
    let object = format!("{url}/v1/modules/scaibunker/storage/objects/exec/exe_1/stdout");
    let resp = http
        .put(&object)
        .bearer_auth(&token)
        .body("output")
        .send()
        .await
        .expect("put");
    assert_eq!(resp.status(), reqwest::StatusCode::CREATED);
    let resp = http
        .get(&object)
        .bearer_auth(&token)
        .send()
        .await
        .expect("get");
    assert_eq!(resp.status(), reqwest::StatusCode::OK);
    assert_eq!(resp.text().await.expect("body"), "output");
    // A worker's credential, verified with no database: it reads snapshots, not exec output;
    // the join token opens nothing.
    let credential = scaibunker_proto::worker_auth::credential(SECRET.as_bytes(), "wrk_p", 1);
    let snapshot = format!("{url}/v1/modules/scaibunker/storage/objects/snapshots/t/s/disk");
    let resp = http
        .put(&snapshot)
        .bearer_auth(&credential)
        .body("disk")
        .send()
        .await
        .expect("put");
    assert_eq!(resp.status(), reqwest::StatusCode::CREATED);
    for (bearer, want) in [
        (credential.as_str(), reqwest::StatusCode::FORBIDDEN),
        (WORKER_TOKEN, reqwest::StatusCode::UNAUTHORIZED),
    ] {
        let resp = http
            .get(&object)
            .bearer_auth(bearer)
            .send()
            .await
            .expect("get");
        assert_eq!(resp.status(), want);
    }
    // Stored under the data dir's default object store.
    assert!(dir.path().join("objects/exec/exe_1/stdout~").is_file());

    let health = http
        .get(format!("{url}/health"))
        .send()
        .await
        .expect("health");
    assert_eq!(health.status(), reqwest::StatusCode::OK);
    let bunkers = http
        .get(format!("{url}/v1/modules/scaibunker/bunkers"))
        .bearer_auth(WORKER_TOKEN)
        .send()
        .await
        .expect("bunkers");
    assert_eq!(bunkers.status(), reqwest::StatusCode::NOT_FOUND);
    drop(serve);
}
