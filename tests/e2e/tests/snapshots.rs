//! Snapshots through `scaibunker up` and a second worker process, with real microVMs (one at
//! a time): a `full` snapshot of a bunker running a background counter is restored into a
//! NEW bunker on the OTHER worker and the counter goes on from where it was; a `disk`
//! snapshot keeps a written file; deleting a snapshot deletes its objects.

use std::time::{Duration, Instant};

use scaibunker_api::bunkers::{Bunker, CreateBunker};
use scaibunker_api::exec::ExecRequest;
use scaibunker_api::snapshots::{CreateSnapshot, SnapshotKind};
use scaibunker_api::workers::Worker;
use scaibunker_e2e::{Up, UpOptions, require_images};
use scaibunker_sdk::Client;

/// Heartbeats every second, so the second worker is online quickly.
const FAST: [(&str, &str); 1] = [("WORKER_HEARTBEAT_INTERVAL_S", "1")];

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

async fn counter(c: &Client, id: &str) -> u64 {
    let text = stdout(c, id, "cat /tmp/count").await;
    text.parse()
        .unwrap_or_else(|_| panic!("no counter value: {text:?}"))
}

async fn admin(up: &Up, method: reqwest::Method, path: &str) -> serde_json::Value {
    let resp = reqwest::Client::new()
        .request(method, format!("{}/v1/modules/scaibunker{path}", up.url()))
        .bearer_auth(up.key())
        .send()
        .await
        .expect("request");
    assert!(resp.status().is_success(), "{path}: {}", resp.status());
    resp.json().await.expect("json")
}

async fn online_workers(up: &Up) -> Vec<Worker> {
    let all = up.workers().await;
    all.into_iter().filter(|w| w.status == "online").collect()
}

async fn restore(c: &Client, snapshot_id: &str) -> (Bunker, Duration) {
    let started = Instant::now();
    let bunker = c
        .create_bunker(&CreateBunker {
            snapshot_id: Some(snapshot_id.into()),
            ..Default::default()
        })
        .await
        .expect("restore");
    let took = started.elapsed();
    assert_eq!(bunker.status, "running", "{:?}", bunker.failure_reason);
    assert_eq!(bunker.snapshot_id.as_deref(), Some(snapshot_id));
    (bunker, took)
}

#[tokio::test]
async fn snapshots_restore_into_new_bunkers_on_another_worker() {
    require_images(&["tiny.ext4"]).expect("guest images");
    let up = Up::start(UpOptions::with_env(&FAST)).expect("scaibunker up gets ready");
    let client = up.client();
    let mut b = up.add_worker("b", &FAST).expect("start worker b");
    let give_up = Instant::now() + Duration::from_secs(60);
    while online_workers(&up).await.len() < 2 {
        assert!(Instant::now() < give_up, "worker b did not come online");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The source: a counter in its own session, ticking every 0.2 s, and a file.
    let source = up.tiny_bunker().await;
    let source_worker = source.worker_id.clone().expect("placed");
    stdout(
        &client,
        &source.id,
        "setsid sh -c 'i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.2; done' \
         >/dev/null 2>&1 </dev/null & echo kept > $HOME/kept",
    )
    .await;
    let source_host = stdout(&client, &source.id, "hostname").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = counter(&client, &source.id).await;
    assert!(before > 0);

    let started = Instant::now();
    let full = client
        .snapshot_bunker(
            &source.id,
            &CreateSnapshot {
                kind: Some(SnapshotKind::Full),
                expires_in_s: Some(3600),
            },
        )
        .await
        .expect("full snapshot");
    println!(
        "full snapshot: {:?}, {} bytes",
        started.elapsed(),
        full.size_bytes
    );
    assert_eq!(
        (full.status.as_str(), full.kind),
        ("ready", SnapshotKind::Full)
    );
    assert!(full.size_bytes > 0);
    // running → snapshotting → running, and it still counts.
    assert_eq!(
        client.bunker(&source.id).await.expect("get").status,
        "running"
    );
    let at_snapshot = counter(&client, &source.id).await;
    assert!(at_snapshot >= before);
    client
        .delete_bunker(&source.id)
        .await
        .expect("delete source");

    // The restore must land on the other worker: drain the source's.
    admin(
        &up,
        reqwest::Method::POST,
        &format!("/workers/{source_worker}/drain"),
    )
    .await;
    let (restored, took) = restore(&client, &full.id).await;
    println!("full restore (create to running): {took:?}");
    assert_ne!(restored.id, source.id);
    assert_ne!(
        restored.worker_id.as_deref(),
        Some(source_worker.as_str()),
        "restored on the other worker"
    );
    let resumed = counter(&client, &restored.id).await;
    assert!(
        resumed >= before,
        "the counter resumes from where the snapshot was: {before} → {resumed}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = counter(&client, &restored.id).await;
    assert!(later > resumed, "and keeps counting: {resumed} → {later}");
    assert_eq!(
        stdout(&client, &restored.id, "cat $HOME/kept").await,
        "kept"
    );
    let restored_host = stdout(&client, &restored.id, "hostname").await;
    assert_ne!(restored_host, source_host, "a fresh host name");

    // A disk snapshot of the restored bunker keeps a file written (not synced) just before.
    stdout(&client, &restored.id, "echo on-disk > $HOME/written").await;
    // Through the CLI this time.
    let (code, out, err) = up
        .cli(
            &[
                "--json",
                "bunker",
                "snapshot",
                &restored.id,
                "--kind",
                "disk",
            ],
            b"",
        )
        .await;
    assert_eq!(code, 0, "{out}{err}");
    let disk: scaibunker_api::snapshots::Snapshot =
        serde_json::from_str(&out).expect("a snapshot record");
    assert_eq!(disk.kind, SnapshotKind::Disk);
    let restored_worker = restored.worker_id.clone().expect("placed");
    client.delete_bunker(&restored.id).await.expect("delete");
    admin(
        &up,
        reqwest::Method::POST,
        &format!("/workers/{source_worker}/resume"),
    )
    .await;
    admin(
        &up,
        reqwest::Method::POST,
        &format!("/workers/{restored_worker}/drain"),
    )
    .await;
    let (cold, took) = restore(&client, &disk.id).await;
    println!("disk restore (create to running): {took:?}");
    assert_eq!(cold.worker_id.as_deref(), Some(source_worker.as_str()));
    assert_eq!(
        stdout(&client, &cold.id, "cat $HOME/written").await,
        "on-disk"
    );
    // A cold boot: the counter's last value is on disk, but nothing counts any more.
    let stopped = stdout(&client, &cold.id, "cat /tmp/count 2>/dev/null || echo none").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        stdout(&client, &cold.id, "cat /tmp/count 2>/dev/null || echo none").await,
        stopped
    );
    client.delete_bunker(&cold.id).await.expect("delete");

    // Listing and deleting; the objects go with the record.
    let listed = client.snapshots(None).await.expect("list");
    assert_eq!(listed.len(), 2);
    let objects = up.data_dir().join("objects/snapshots");
    let count_files = || {
        walk(&objects)
            .into_iter()
            .filter(|p| p.to_string_lossy().contains(&full.id))
            .count()
    };
    assert_eq!(
        count_files(),
        2,
        "disk.qcow2 and vm.state under {}",
        objects.display()
    );
    client
        .delete_snapshot(&full.id)
        .await
        .expect("delete snapshot");
    assert_eq!(count_files(), 0);
    let gone = client.snapshot(&full.id).await.expect_err("deleted");
    assert_eq!(gone.code(), Some("SNAPSHOT_NOT_FOUND"));
    client
        .delete_snapshot(&disk.id)
        .await
        .expect("delete snapshot");

    let _ = b.kill();
    let _ = b.wait();
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}
