//! Pause and resume through the public API on a real microVM: a background process keeps its
//! state across the pause, nothing runs while paused, and a paused bunker refuses exec.

use scaibunker_api::exec::ExecRequest;
use scaibunker_e2e::{Up, UpOptions, require_images};

fn sh(cmd: &str) -> ExecRequest {
    ExecRequest {
        command: Some(cmd.into()),
        ..Default::default()
    }
}

#[tokio::test]
async fn pause_and_resume_keep_a_background_process_and_its_state() {
    require_images(&["tiny.ext4"]).expect("guest images");
    let up = Up::start(UpOptions::default()).expect("scaibunker up gets ready");
    let client = up.client();
    let bunker = up.tiny_bunker().await;

    // A counter in the background, in its own session (the tiny image's busybox has `setsid`
    // but no `nohup`), detached from the exec's output pipes; it replaces the file atomically
    // so a read never sees it half-written.
    let start = client
        .exec(
            &bunker.id,
            &sh("setsid sh -c 'i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.2; done' \
                 >/dev/null 2>&1 & echo $! > /tmp/counter.pid"),
        )
        .await
        .expect("start counter");
    assert_eq!(start.exit_code, Some(0), "{start:?}");
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let read = |c: &scaibunker_sdk::Client, id: String| {
        let c = c.clone();
        async move {
            let out = c
                .exec(&id, &sh("cat /tmp/count"))
                .await
                .expect("read counter");
            let text = out.stdout.clone().unwrap_or_default();
            text.trim()
                .parse::<u64>()
                .unwrap_or_else(|_| panic!("no counter value: {out:?}"))
        }
    };
    let before = read(&client, bunker.id.clone()).await;
    assert!(before > 0);

    let paused = client.pause_bunker(&bunker.id).await.expect("pause");
    assert_eq!(paused.status, "paused");
    let refused = client
        .exec(&bunker.id, &sh("true"))
        .await
        .expect_err("exec on a paused bunker");
    assert_eq!(refused.code(), Some("BUNKER_NOT_RUNNING"));
    let again = client
        .pause_bunker(&bunker.id)
        .await
        .expect_err("pausing twice");
    assert_eq!(again.code(), Some("BUNKER_INVALID_TRANSITION"));
    // Paused for three seconds: the guest's clock and the counter stand still meanwhile.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;

    let resumed = client.resume_bunker(&bunker.id).await.expect("resume");
    assert_eq!(resumed.status, "running");
    let right_after = read(&client, bunker.id.clone()).await;
    // At most a few ticks happened between the last read and the pause (0.2 s each); three
    // seconds of pause would have been ~15 ticks had the guest kept running.
    assert!(
        right_after >= before && right_after < before + 12,
        "counter went from {before} to {right_after} across a 3 s pause"
    );
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let later = read(&client, bunker.id.clone()).await;
    assert!(
        later > right_after,
        "the counter keeps counting after resume"
    );
    let alive = client
        .exec(&bunker.id, &sh("kill -0 $(cat /tmp/counter.pid)"))
        .await
        .expect("check");
    assert_eq!(alive.exit_code, Some(0), "the same process survived");

    client.delete_bunker(&bunker.id).await.expect("delete");
}
