//! A fleet of two worker processes behind one controller: bunkers spread over both; a worker
//! killed with SIGKILL goes offline within a few heartbeat intervals, its bunker fails with a
//! reason, new bunkers land on the survivor; restarted, the worker removes the VM it left
//! behind and comes back online.

use std::time::{Duration, Instant};

use scaibunker_api::bunkers::Bunker;
use scaibunker_api::exec::ExecRequest;
use scaibunker_e2e::{Up, UpOptions, qemu_processes_for, require_images, within};

/// Heartbeats and job ticks every second, so losses show within seconds.
const FAST: [(&str, &str); 2] = [
    ("WORKER_HEARTBEAT_INTERVAL_S", "1"),
    ("SCAIBUNKER_JOB_INTERVAL_S", "1"),
];

fn echo(text: &str) -> ExecRequest {
    ExecRequest {
        command: Some(format!("echo {text}")),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_killed_worker_goes_offline_its_bunker_fails_and_new_ones_land_elsewhere() {
    require_images(&["tiny.ext4"]).expect("guest images");
    let up = Up::start(UpOptions::with_env(&FAST)).expect("scaibunker up gets ready");
    let client = up.client();
    let mut b = up.add_worker("b", &FAST[..1]).expect("start worker b");
    let fleet = within(Duration::from_secs(60), "two workers online", || async {
        let ws = up.workers().await;
        (ws.len() == 2 && ws.iter().all(|w| w.status == "online")).then_some(ws)
    })
    .await;
    let b_id = fleet
        .iter()
        .find(|w| w.name == "b")
        .expect("worker b")
        .id
        .clone();

    // Two bunkers spread over the two workers (the one with more free memory gets each).
    let first = up.tiny_bunker().await;
    let second = up.tiny_bunker().await;
    assert_ne!(first.worker_id, second.worker_id, "placement spreads");
    let (on_b, on_a): (Bunker, Bunker) = if first.worker_id.as_deref() == Some(b_id.as_str()) {
        (first, second)
    } else {
        (second, first)
    };
    assert_eq!(
        client
            .exec(&on_b.id, &echo("b"))
            .await
            .expect("exec on b")
            .stdout
            .as_deref(),
        Some("b\n")
    );

    // SIGKILL: no goodbye. Offline within three intervals (plus a job tick), bunker failed.
    b.kill().expect("kill -9 worker b");
    let _ = b.wait();
    let killed = Instant::now();
    within(Duration::from_secs(15), "worker b offline", || async {
        up.workers()
            .await
            .iter()
            .any(|w| w.id == b_id && w.status == "offline")
            .then_some(())
    })
    .await;
    let offline_after = killed.elapsed();
    let failed = within(Duration::from_secs(30), "b's bunker failed", || async {
        let bunker = client.bunker(&on_b.id).await.ok()?;
        (bunker.status == "failed").then_some(bunker)
    })
    .await;
    eprintln!(
        "worker offline after {offline_after:?}, its bunker failed after {:?}",
        killed.elapsed()
    );
    assert!(
        failed
            .failure_reason
            .as_deref()
            .is_some_and(|r| r.contains("worker")),
        "{:?}",
        failed.failure_reason
    );

    // The survivor keeps serving, and takes the next bunker (one VM at a time on it).
    assert_eq!(
        client
            .exec(&on_a.id, &echo("a"))
            .await
            .expect("exec on a")
            .stdout
            .as_deref(),
        Some("a\n")
    );
    client.delete_bunker(&on_a.id).await.expect("delete");
    let third = up.tiny_bunker().await;
    assert_eq!(
        third.worker_id, on_a.worker_id,
        "lands on the surviving worker"
    );
    assert_eq!(
        client
            .exec(&third.id, &echo("c"))
            .await
            .expect("exec")
            .stdout
            .as_deref(),
        Some("c\n")
    );

    // The dead worker's VM outlived it; a restart of that worker removes it and rejoins.
    let b_dir = up.data_dir().join("worker-b");
    assert!(
        !qemu_processes_for(&b_dir).is_empty(),
        "the killed worker's VM is still there"
    );
    let mut b = up.add_worker("b", &FAST[..1]).expect("restart worker b");
    within(
        Duration::from_secs(30),
        "the leftover VM is gone",
        || async { qemu_processes_for(&b_dir).is_empty().then_some(()) },
    )
    .await;
    within(Duration::from_secs(30), "worker b online again", || async {
        up.workers()
            .await
            .iter()
            .any(|w| w.name == "b" && w.status == "online")
            .then_some(())
    })
    .await;
    assert_eq!(
        client.bunker(&on_b.id).await.expect("get").status,
        "failed",
        "stays failed"
    );

    client.delete_bunker(&third.id).await.expect("delete");
    b.kill().expect("stop worker b");
    let _ = b.wait();
}
