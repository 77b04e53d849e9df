//! Interactive shells over the WebSocket route on a real microVM: three at once beside a
//! running exec, each with its own terminal (size, resize, input, exit code), each audited;
//! and the refusals a client sees before and after the upgrade.

use std::time::Duration;

use scaibunker_api::exec::ExecRequest;
use scaibunker_e2e::{Up, UpOptions, require_images};
use scaibunker_sdk::{ExecEvent, SdkError, ShellEvent, ShellOptions, ShellReader};

/// Longest wait for a shell's output under TCG on a loaded host.
const OUTPUT_WAIT: Duration = Duration::from_secs(60);

/// Reads output into `seen` until it contains `needle`.
async fn read_until(reader: &mut ShellReader, seen: &mut String, needle: &str) {
    let wait = async {
        while !seen.contains(needle) {
            match reader.next().await {
                Some(Ok(ShellEvent::Output(bytes))) => {
                    seen.push_str(&String::from_utf8_lossy(&bytes));
                }
                other => panic!("{other:?} before `{needle}`; output so far: {seen:?}"),
            }
        }
    };
    tokio::time::timeout(OUTPUT_WAIT, wait)
        .await
        .unwrap_or_else(|_| panic!("no `{needle}` within {OUTPUT_WAIT:?}; output: {seen:?}"));
}

/// Reads until the exit; returns its code.
async fn exit_code(reader: &mut ShellReader) -> Option<i32> {
    loop {
        match reader.next().await {
            Some(Ok(ShellEvent::Output(_))) => {}
            Some(Ok(ShellEvent::Exit { exit_code, .. })) => return exit_code,
            other => panic!("expected output or the exit, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn three_shells_and_an_exec_share_one_bunker() {
    require_images(&["tiny.ext4"]).expect("guest images");
    let up = Up::start(UpOptions::default()).expect("scaibunker up gets ready");
    let client = up.client();
    let bunker = up.tiny_bunker().await;

    let mut ticks = client
        .exec_stream(
            &bunker.id,
            &ExecRequest {
                command: Some("for i in 1 2 3 4 5 6; do echo tick$i; sleep 1; done".into()),
                ..Default::default()
            },
        )
        .await
        .expect("start the exec");

    let sessions = (1..=3).map(|n: i32| {
        let client = client.clone();
        let id = bunker.id.clone();
        async move {
            let opts = ShellOptions {
                cols: Some(80),
                rows: Some(24),
                ..Default::default()
            };
            let (mut keys, mut screen) = client.shell(&id, &opts).await.expect("open a shell");
            let mut seen = String::new();
            keys.send(format!("echo shell{n}-$((6*7)); stty size; tty\n").as_bytes())
                .await
                .expect("type");
            read_until(&mut screen, &mut seen, &format!("shell{n}-42")).await;
            read_until(&mut screen, &mut seen, "24 80").await;
            read_until(&mut screen, &mut seen, "/dev/pts/").await;
            keys.resize(100 + n as u16, 30).await.expect("resize");
            keys.send(b"stty size\n").await.expect("type");
            read_until(&mut screen, &mut seen, &format!("30 {}", 100 + n)).await;
            keys.send(format!("exit {n}\n").as_bytes())
                .await
                .expect("type");
            assert_eq!(exit_code(&mut screen).await, Some(n), "output: {seen:?}");
        }
    });
    futures_util::future::join_all(sessions).await;

    let mut out = String::new();
    let exit = loop {
        match ticks
            .next()
            .await
            .expect("the exec stream ends with its exit")
        {
            Ok(ExecEvent::Stdout(bytes)) => out.push_str(&String::from_utf8_lossy(&bytes)),
            Ok(ExecEvent::Exit { exit_code, .. }) => break exit_code,
            Ok(other) => panic!("unexpected exec event {other:?}"),
            Err(e) => panic!("exec stream failed: {e}"),
        }
    };
    assert_eq!(exit, Some(0));
    assert_eq!(
        out,
        (1..=6).map(|i| format!("tick{i}\n")).collect::<String>()
    );

    // Each session is in the audit log, opened and closed with its exit code.
    let audit: serde_json::Value = reqwest::Client::new()
        .get(format!(
            "{}/v1/modules/scaibunker/audit?resource_id={}",
            up.url(),
            bunker.id
        ))
        .bearer_auth(up.key())
        .send()
        .await
        .expect("audit")
        .json()
        .await
        .expect("audit json");
    let events = audit["data"].as_array().expect("audit rows");
    let opened = events
        .iter()
        .filter(|e| e["action"] == "bunker.shell")
        .count();
    let mut codes: Vec<i64> = events
        .iter()
        .filter(|e| e["action"] == "bunker.shell.end")
        .filter_map(|e| e["details"]["exit_code"].as_i64())
        .collect();
    codes.sort_unstable();
    assert_eq!(opened, 3, "{events:#?}");
    assert_eq!(codes, vec![1, 2, 3], "{events:#?}");

    // A 1 MiB script through exec is refused before it reaches the guest, and a shell open
    // in the same bunker meanwhile keeps working (before, an exec over one agent frame reset
    // every stream on the bunker's channel).
    let (mut keys, mut screen) = client
        .shell(&bunker.id, &ShellOptions::default())
        .await
        .expect("open a shell");
    let mut seen = String::new();
    keys.send(b"echo before-$((6*7))\n").await.expect("type");
    read_until(&mut screen, &mut seen, "before-42").await;
    let script = format!("cat <<'EOF'\n{}\nEOF\n", "x".repeat(1 << 20));
    let refused = client
        .exec(
            &bunker.id,
            &ExecRequest {
                command: Some(script),
                ..Default::default()
            },
        )
        .await
        .expect_err("a 1 MiB script does not fit");
    assert_eq!(refused.code(), Some("VALIDATION_ERROR"), "{refused}");
    keys.send(b"echo after-$((6*7)); exit 7\n")
        .await
        .expect("type");
    read_until(&mut screen, &mut seen, "after-42").await;
    assert_eq!(exit_code(&mut screen).await, Some(7), "output: {seen:?}");

    // The CLI without a terminal: piped keys in, the shell's output out, its exit code.
    let (code, stdout, stderr) = up
        .cli(&["shell", &bunker.id], b"echo cli-$((6*7))\nexit 5\n")
        .await;
    assert_eq!(code, 5, "stdout: {stdout:?} stderr: {stderr:?}");
    assert!(stdout.contains("cli-42"), "{stdout:?}");

    client.delete_bunker(&bunker.id).await.expect("delete");
}

#[tokio::test]
async fn shell_refusals_carry_codes_and_a_bad_message_ends_the_session() {
    require_images(&["tiny.ext4"]).expect("guest images");
    let up = Up::start(UpOptions::default()).expect("scaibunker up gets ready");
    let client = up.client();
    let missing = client
        .shell("bnk_00000000000000000000000000", &ShellOptions::default())
        .await
        .err()
        .expect("no such bunker");
    assert_eq!(missing.code(), Some("BUNKER_NOT_FOUND"), "{missing}");

    let bunker = up.tiny_bunker().await;
    let too_wide = ShellOptions {
        cols: Some(5000),
        ..Default::default()
    };
    let refused = client
        .shell(&bunker.id, &too_wide)
        .await
        .err()
        .expect("refused");
    assert_eq!(refused.code(), Some("VALIDATION_ERROR"), "{refused}");

    // Text messages are control messages; anything but a resize ends the session.
    let (mut keys, mut screen) = client
        .shell(&bunker.id, &ShellOptions::default())
        .await
        .expect("open");
    keys.send(b"sleep 300\n").await.expect("type");
    keys.resize(0, 10).await.expect("send a bad resize");
    let end = loop {
        match screen.next().await {
            Some(Ok(ShellEvent::Output(_))) => {}
            other => break other,
        }
    };
    match end {
        Some(Err(SdkError::ShellFailed { code, .. })) => assert_eq!(code, "VALIDATION_ERROR"),
        other => panic!("expected a VALIDATION_ERROR end, got {other:?}"),
    }
    // The shell and its `sleep` went with the session: nothing of it is left in the guest.
    let give_up = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = client
            .exec(
                &bunker.id,
                &ExecRequest {
                    command: Some("ps -o args | grep -c '^sleep 300' || true".into()),
                    ..Default::default()
                },
            )
            .await
            .expect("ps");
        if out.stdout.as_deref().map(str::trim) == Some("0") {
            break;
        }
        assert!(
            std::time::Instant::now() < give_up,
            "the shell's sleep was not killed: {out:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // A paused bunker refuses a shell like an exec.
    client.pause_bunker(&bunker.id).await.expect("pause");
    let paused = client
        .shell(&bunker.id, &ShellOptions::default())
        .await
        .err()
        .expect("paused");
    assert_eq!(paused.code(), Some("BUNKER_NOT_RUNNING"), "{paused}");
    client.delete_bunker(&bunker.id).await.expect("delete");
}
