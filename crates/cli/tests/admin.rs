//! `scaibunker admin recover-key`, the real binary, on an embedded installation's data dir:
//! while its controller runs, the printed key is a working super-admin key.

use std::net::SocketAddr;
use std::process::Command;

use scaibunker_controller::config::ControllerConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_key_prints_a_working_super_admin_key_for_the_data_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    let listen: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let config = ControllerConfig::embedded(dir.path().to_path_buf(), listen, "swt_cli".into());
    let controller = scaibunker_controller::start(config)
        .await
        .expect("controller starts");

    let out = Command::new(env!("CARGO_BIN_EXE_scaibunker"))
        .args(["--json", "admin", "recover-key", "--data-dir"])
        .arg(dir.path())
        .env_remove("SCAIBUNKER_DATABASE_URL")
        .output()
        .expect("run scaibunker admin recover-key");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json on stdout");
    let key = v["key"].as_str().expect("key");
    assert_ne!(Some(key), controller.bootstrap_key.as_deref());

    let resp = reqwest::Client::new()
        .get(format!("{}/v1/tenants", controller.url()))
        .bearer_auth(key)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), reqwest::StatusCode::OK);

    // A data dir with no installation is an error, not a new empty database.
    let empty = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_scaibunker"))
        .args(["admin", "recover-key", "--data-dir"])
        .arg(empty.path())
        .env_remove("SCAIBUNKER_DATABASE_URL")
        .output()
        .expect("run scaibunker admin recover-key");
    assert!(!out.status.success());
    assert!(!empty.path().join("scaibunker.db").exists());
    controller.shutdown().await;
}
