//! A planned stop of `scaibunker up` loses no state: SIGTERM has the worker's persistent
//! bunker saved as a `full` snapshot before its VM stops, and after `up` starts again on the
//! same data directory the next exec finds it as it was, a file on its disk and a background
//! counter still counting from where it stood.

use std::time::{Duration, Instant};

use scaibunker_api::bunkers::{CreateBunker, LifecycleMode};
use scaibunker_api::exec::ExecRequest;
use scaibunker_api::snapshots::SnapshotKind;
use scaibunker_e2e::{Up, UpOptions, qemu_processes_for, require_images};
use scaibunker_sdk::Client;

/// Heartbeats every second, so the restarted worker is placeable quickly.
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

async fn count(c: &Client, id: &str) -> u64 {
    stdout(c, id, "cat /tmp/count")
        .await
        .parse()
        .expect("a count")
}

#[tokio::test]
async fn a_persistent_bunker_comes_back_after_up_is_stopped_and_started() {
    require_images(&["tiny.ext4"]).expect("guest images");
    let mut up = Up::start(UpOptions::with_env(&FAST)).expect("scaibunker up gets ready");
    let client = up.client();
    let bunker = client
        .create_bunker(&CreateBunker {
            image: Some("tiny".into()),
            memory_mb: Some(256),
            lifecycle_mode: Some(LifecycleMode::Persistent),
            ..Default::default()
        })
        .await
        .expect("create a persistent bunker");
    assert_eq!(bunker.status, "running", "{bunker:?}");
    client
        .write_file(
            &bunker.id,
            "/home/user/note.txt",
            None,
            "kept across restarts\n",
        )
        .await
        .expect("write a file");
    stdout(
        &client,
        &bunker.id,
        "setsid sh -c 'i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; \
         mv /tmp/count.new /tmp/count; sleep 0.2; done' </dev/null >/dev/null 2>&1 &",
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = count(&client, &bunker.id).await;
    assert!(before > 0);

    // SIGTERM: `up` exits successfully once the bunker is saved and its VM gone.
    let vm_dir = up.data_dir().join("worker/bunkers").join(&bunker.id);
    let stopping = Instant::now();
    up.restart().expect("`up` stops and starts again");
    eprintln!("stop and start of `up` took {:?}", stopping.elapsed());
    let log = std::fs::read_to_string(up.data_dir().join("up.log")).expect("up.log");
    for line in log
        .lines()
        .filter(|l| l.contains("worker stopped in") || l.contains("reason=\"worker_stopping\""))
    {
        eprintln!("{line}");
    }
    let client = up.client();
    let b = client.bunker(&bunker.id).await.expect("get");
    assert_eq!(b.status, "paused", "saved, not failed: {b:?}");
    assert!(b.worker_id.is_none(), "on no worker until asked: {b:?}");
    let snaps = client.snapshots(Some(&bunker.id)).await.expect("snapshots");
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert_eq!(snaps[0].kind, SnapshotKind::Full, "{snaps:?}");
    let give_up = Instant::now() + Duration::from_secs(30);
    while !qemu_processes_for(&vm_dir).is_empty() {
        assert!(Instant::now() < give_up, "the old VM is still running");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The next exec restores it transparently: the file is there, the counter went on.
    let restoring = Instant::now();
    let note = stdout(&client, &bunker.id, "cat /home/user/note.txt").await;
    eprintln!(
        "first exec after the restart answered in {:?} (restore included)",
        restoring.elapsed()
    );
    assert_eq!(note, "kept across restarts");
    let after = count(&client, &bunker.id).await;
    assert!(after >= before, "{after} < {before}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let later = count(&client, &bunker.id).await;
    assert!(later > after, "the counter runs again: {later} <= {after}");
    let b = client.bunker(&bunker.id).await.expect("get");
    assert_eq!(b.status, "running", "{b:?}");
    assert!(b.worker_id.is_some(), "{b:?}");

    client.delete_bunker(&bunker.id).await.expect("delete");
}
