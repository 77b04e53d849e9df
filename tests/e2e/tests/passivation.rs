//! Passivation through `scaibunker up` with a real microVM: a persistent bunker idle past its
//! `idle_timeout_s` is saved as a `full` snapshot and its VM stopped (the bunker `paused`,
//! on no worker, no QEMU left); its next exec brings it back transparently, with the
//! background process it was running still counting from where it was.

use std::time::{Duration, Instant};

use scaibunker_api::bunkers::{CreateBunker, LifecycleMode};
use scaibunker_api::exec::ExecRequest;
use scaibunker_e2e::{Up, UpOptions, qemu_processes_for, require_images};
use scaibunker_sdk::Client;

/// Job ticks every second, so the sweeper notices the idle bunker quickly.
const FAST: [(&str, &str); 2] = [
    ("WORKER_HEARTBEAT_INTERVAL_S", "1"),
    ("SCAIBUNKER_JOB_INTERVAL_S", "1"),
];

fn sh(cmd: &str) -> ExecRequest {
    ExecRequest {
        command: Some(cmd.into()),
        ..Default::default()
    }
}

async fn stdout(c: &Client, id: &str, cmd: &str) -> String {
    let out = c.exec(id, &sh(cmd)).await.expect("exec");
    assert_eq!(out.exit_code, Some(0), "`{cmd}`: {out:?}");
    out.stdout.unwrap_or_default().trim().to_owned()
}

#[tokio::test]
async fn an_idle_persistent_bunker_is_passivated_and_comes_back_on_exec() {
    require_images(&["tiny.ext4"]).expect("guest images");
    let up = Up::start(UpOptions::with_env(&FAST)).expect("scaibunker up gets ready");
    let client = up.client();
    let bunker = client
        .create_bunker(&CreateBunker {
            image: Some("tiny".into()),
            memory_mb: Some(256),
            lifecycle_mode: Some(LifecycleMode::Persistent),
            idle_timeout_s: Some(3),
            ..Default::default()
        })
        .await
        .expect("create a persistent bunker");
    assert_eq!(bunker.status, "running", "{bunker:?}");
    stdout(
        &client,
        &bunker.id,
        "setsid sh -c 'i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; \
         mv /tmp/count.new /tmp/count; sleep 0.2; done' </dev/null >/dev/null 2>&1 &",
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before: u64 = stdout(&client, &bunker.id, "cat /tmp/count")
        .await
        .parse()
        .expect("a count");
    assert!(before > 0);

    // Idle for 3 s: the sweeper passivates it.
    let give_up = Instant::now() + Duration::from_secs(90);
    let passivated = loop {
        let b = client.bunker(&bunker.id).await.expect("get");
        if b.status == "paused" && b.worker_id.is_none() {
            break b;
        }
        assert!(Instant::now() < give_up, "not passivated: {b:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    eprintln!("passivated: {passivated:?}");
    let give_up = Instant::now() + Duration::from_secs(30);
    let vm_dir = up.data_dir().join("worker/bunkers").join(&bunker.id);
    while !qemu_processes_for(&vm_dir).is_empty() {
        assert!(
            Instant::now() < give_up,
            "the passivated bunker's QEMU is still running"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The passivation snapshot is the tenant's, listed like any other.
    let v: serde_json::Value = reqwest::Client::new()
        .get(format!(
            "{}/v1/modules/scaibunker/snapshots?bunker_id={}",
            up.url(),
            bunker.id
        ))
        .bearer_auth(up.key())
        .send()
        .await
        .expect("list snapshots")
        .json()
        .await
        .expect("json");
    assert_eq!(v["data"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["data"][0]["kind"], "full", "{v}");

    // The next exec restores it; the counter went on from where it was saved.
    let started = Instant::now();
    let after: u64 = stdout(&client, &bunker.id, "cat /tmp/count")
        .await
        .parse()
        .expect("a count");
    eprintln!(
        "exec on the passivated bunker answered in {:?} (restore included)",
        started.elapsed()
    );
    assert!(after >= before, "{after} < {before}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let later: u64 = stdout(&client, &bunker.id, "cat /tmp/count")
        .await
        .parse()
        .expect("a count");
    assert!(later > after, "the counter runs again: {later} <= {after}");
    let b = client.bunker(&bunker.id).await.expect("get");
    assert_eq!(b.status, "running");
    assert!(b.worker_id.is_some());

    client.delete_bunker(&bunker.id).await.expect("delete");
}
