//! The worker with real QEMU microVMs, driven through its HTTP API.
//!
//! Needs the guest artefacts of `images/build.sh`; fails with instructions without them.
//! One VM at a time ([`common::vm_slot`]). Timings are printed (run with `--nocapture`),
//! never asserted.

mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::{TestWorker, error_of, eventually, image_sha256, require_artefacts, shell, vm_slot};
use scaibunker_proto::worker::{
    DirListing, EntryType, ExecRequest, ExecResult, ExecStreamEvent, FileWritten, GuestUser,
    Program, VmInfo, VmStatus,
};

const TINY: [&str; 4] = [
    "vmlinux",
    "initramfs.cpio.gz",
    "kernel.release",
    "tiny.ext4",
];

async fn exec(w: &TestWorker, id: &str, req: &ExecRequest) -> ExecResult {
    let resp = w
        .post(&format!("/bunkers/{id}/exec"))
        .json(req)
        .send()
        .await
        .expect("exec request");
    let status = resp.status();
    let text = resp.text().await.expect("body");
    assert_eq!(status, 200, "exec failed: {text}");
    serde_json::from_str(&text).expect("ExecResult")
}

fn stdout(r: &ExecResult) -> String {
    String::from_utf8(BASE64.decode(&r.stdout_b64).expect("b64")).expect("utf8")
}

fn stderr(r: &ExecResult) -> String {
    String::from_utf8(BASE64.decode(&r.stderr_b64).expect("b64")).expect("utf8")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_boots_and_runs_commands() {
    let images = require_artefacts(&TINY);
    let _slot = vm_slot().await;
    let w = TestWorker::start(&images).await;
    let sha = image_sha256(&images, "tiny");
    let (info, wall) = w.create("b-tiny", &sha, 256).await;
    let release = std::fs::read_to_string(images.join("kernel.release")).expect("kernel.release");
    let release = release.trim();
    eprintln!(
        "TIMING tiny boot: worker boot_ms={} (qemu spawn → agent hello), create call {:?}",
        info.boot_ms, wall
    );
    assert_eq!(info.guest_kernel.as_deref(), Some(release));

    // The guest runs its own kernel, not the host's.
    let r = exec(&w, "b-tiny", &shell("uname -r")).await;
    assert_eq!(r.exit_code, Some(0), "stderr: {}", stderr(&r));
    assert_eq!(stdout(&r).trim(), release);
    assert_ne!(
        stdout(&r).trim(),
        common::host_kernel_release().expect("host")
    );

    // Exit code, both pipes, and the bunker's environment merged under the exec's.
    let mut req = shell("echo out:$BUNKER_VAR:$EXEC_VAR; echo err >&2; exit 3");
    req.env.insert("EXEC_VAR".into(), "e".into());
    let r = exec(&w, "b-tiny", &req).await;
    assert_eq!(r.exit_code, Some(3));
    assert_eq!(stdout(&r), "out:from-create:e\n");
    assert_eq!(stderr(&r), "err\n");
    assert!(!r.timed_out);

    // stdin, and the output limit keeps a prefix but counts everything.
    let mut req = shell("cat; head -c 5000 /dev/zero");
    req.stdin_b64 = Some(BASE64.encode(b"fed through stdin"));
    req.output_limit_bytes = 20;
    let r = exec(&w, "b-tiny", &req).await;
    assert_eq!(r.exit_code, Some(0));
    assert_eq!(stdout(&r), "fed through stdin\0\0\0");
    assert_eq!(r.stdout_total_bytes, 17 + 5000);

    // A program that cannot start looks like it does in a shell.
    let mut req = shell("");
    req.program = Program::Argv(vec!["/no/such/program".into()]);
    let r = exec(&w, "b-tiny", &req).await;
    assert_eq!(r.exit_code, Some(127));
    assert!(!stderr(&r).is_empty());

    // The unprivileged user is the default.
    let mut req = shell("id -u");
    req.user = GuestUser::User;
    let r = exec(&w, "b-tiny", &req).await;
    assert_eq!(stdout(&r).trim(), "1000");

    // The agent enforces the exec timeout; execs run concurrently over the one channel.
    let mut req = shell("echo started; sleep 30");
    req.timeout_ms = 1_000;
    let started = Instant::now();
    let (echo_a, echo_b) = (shell("echo a"), shell("echo b"));
    let (slow, a, b) = tokio::join!(
        exec(&w, "b-tiny", &req),
        exec(&w, "b-tiny", &echo_a),
        exec(&w, "b-tiny", &echo_b)
    );
    assert!(slow.timed_out, "{slow:?}");
    assert_eq!(stdout(&slow), "started\n");
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "the timeout was not enforced"
    );
    assert_eq!((stdout(&a).as_str(), stdout(&b).as_str()), ("a\n", "b\n"));

    // Round trip of `true` through the API against the agent's own measure.
    let mut walls = Vec::new();
    let mut guests = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let mut req = shell("");
        req.program = Program::Argv(vec!["true".into()]);
        let r = exec(&w, "b-tiny", &req).await;
        walls.push(started.elapsed().as_millis());
        guests.push(r.guest_duration_ms);
        assert_eq!(r.exit_code, Some(0));
    }
    eprintln!("TIMING exec true (tiny): api round trip ms {walls:?}, guest duration ms {guests:?}");

    // A second create of the same id is a conflict; the listing shows the bunker.
    let resp = w.create_raw("b-tiny", &sha, 256).await;
    let (status, err) = error_of(resp).await;
    assert_eq!((status, err.code.as_str()), (409, "BUNKER_EXISTS"));
    let list: Vec<VmInfo> = w
        .get("/bunkers")
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].bunker_id, "b-tiny");

    w.delete_bunker("b-tiny").await;
    let resp = w
        .delete("/bunkers/b-tiny")
        .send()
        .await
        .expect("delete again");
    let (status, err) = error_of(resp).await;
    assert_eq!((status, err.code.as_str()), (404, "BUNKER_NOT_FOUND"));
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_round_trip() {
    let images = require_artefacts(&TINY);
    let _slot = vm_slot().await;
    let w = TestWorker::start(&images).await;
    w.create("b-files", "tiny", 256).await;

    // Bigger than axum's default body limit and than one agent frame, and not a multiple of it.
    let body: Vec<u8> = (0..3 * 1024 * 1024 + 17)
        .map(|i: u32| (i * 7 % 251) as u8)
        .collect();
    let started = Instant::now();
    let resp = w
        .put("/bunkers/b-files/files?path=/tmp/dir/blob.bin&mode=600")
        .body(body.clone())
        .send()
        .await
        .expect("put");
    assert_eq!(resp.status(), 200);
    let written: FileWritten = resp.json().await.expect("FileWritten");
    assert_eq!(written.size_bytes, body.len() as u64);
    let put_time = started.elapsed();

    let started = Instant::now();
    let resp = w
        .get("/bunkers/b-files/files?path=/tmp/dir/blob.bin")
        .send()
        .await
        .expect("get");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/octet-stream")
    );
    let back = resp.bytes().await.expect("bytes");
    eprintln!(
        "TIMING 3 MiB file: put {put_time:?}, get {:?}",
        started.elapsed()
    );
    assert!(back == body, "downloaded bytes differ");

    let resp = w
        .get("/bunkers/b-files/files/list?path=/tmp/dir")
        .send()
        .await
        .expect("list");
    assert_eq!(resp.status(), 200);
    let listing: DirListing = resp.json().await.expect("entries");
    assert_eq!(listing.next_cursor, None);
    let blob = listing
        .entries
        .iter()
        .find(|e| e.name == "blob.bin")
        .expect("listed");
    assert_eq!(blob.entry_type, EntryType::File);
    assert_eq!(blob.size_bytes, body.len() as u64);
    assert_eq!(blob.mode & 0o777, 0o600);

    // Errors keep their meaning.
    let resp = w
        .get("/bunkers/b-files/files?path=/tmp/nope")
        .send()
        .await
        .expect("get");
    assert_eq!(error_of(resp).await.1.code, "FILE_NOT_FOUND");
    let resp = w
        .get("/bunkers/b-files/files?path=/tmp/dir")
        .send()
        .await
        .expect("get");
    assert_eq!(error_of(resp).await.1.code, "IS_A_DIRECTORY");
    let resp = w
        .get("/bunkers/b-files/files?path=relative")
        .send()
        .await
        .expect("get");
    let (status, err) = error_of(resp).await;
    assert_eq!((status, err.code.as_str()), (422, "INVALID_PATH"));
    let resp = w
        .delete("/bunkers/b-files/files?path=/tmp/dir")
        .send()
        .await
        .expect("rm");
    assert_eq!(error_of(resp).await.1.code, "DIRECTORY_NOT_EMPTY");

    // An empty file is a file too.
    let resp = w
        .put("/bunkers/b-files/files?path=/tmp/empty")
        .body(Vec::new())
        .send()
        .await
        .expect("put");
    assert_eq!(resp.status(), 200);
    let resp = w
        .get("/bunkers/b-files/files?path=/tmp/empty")
        .send()
        .await
        .expect("get");
    assert_eq!(resp.status(), 200);
    assert!(resp.bytes().await.expect("bytes").is_empty());

    let resp = w
        .delete("/bunkers/b-files/files?path=/tmp/dir/blob.bin")
        .send()
        .await
        .expect("rm");
    assert_eq!(resp.status(), 204);
    let resp = w
        .get("/bunkers/b-files/files?path=/tmp/dir/blob.bin")
        .send()
        .await
        .expect("get");
    assert_eq!(error_of(resp).await.1.code, "FILE_NOT_FOUND");
    let resp = w
        .delete("/bunkers/b-files/files?path=/tmp/dir&recursive=true")
        .send()
        .await
        .expect("rm -r");
    assert_eq!(resp.status(), 204);

    w.delete_bunker("b-files").await;
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_directory_and_an_oversized_exec_leave_the_channel_usable() {
    let images = require_artefacts(&TINY);
    let _slot = vm_slot().await;
    let w = TestWorker::start(&images).await;
    w.create("b-many", "tiny", 256).await;
    // 5,000 entries with long names: far more than one agent frame of listing.
    let made = w
        .exec_sh(
            "b-many",
            "mkdir -p /tmp/many && cd /tmp/many && \
             seq -w 1 5000 | sed 's/$/-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa/' \
             | xargs touch && ls | wc -l",
        )
        .await;
    assert_eq!(stdout(&made).trim(), "5000", "{}", stderr(&made));
    let started = Instant::now();
    let mut names = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = "/bunkers/b-many/files/list?path=/tmp/many&limit=1000".to_owned();
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let resp = w.get(&url).send().await.expect("list");
        assert_eq!(resp.status(), 200);
        let page: DirListing = resp.json().await.expect("a page");
        assert!(page.entries.len() <= 1000);
        names.extend(page.entries.into_iter().map(|e| e.name));
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    eprintln!("TIMING list 5,000 entries: {:?}", started.elapsed());
    assert_eq!(names.len(), 5000);
    assert!(names.windows(2).all(|p| p[0] < p[1]), "sorted, no repeats");

    // An exec too big for one agent frame is refused as bad input, and nothing breaks.
    let mut big = shell(&format!("echo {}", "x".repeat(1 << 20)));
    big.user = GuestUser::User;
    let resp = w
        .post("/bunkers/b-many/exec")
        .json(&big)
        .send()
        .await
        .expect("exec");
    let (status, err) = error_of(resp).await;
    assert_eq!((status, err.code.as_str()), (422, "VALIDATION_ERROR"));
    let after = w.exec_sh("b-many", "echo still-here").await;
    assert_eq!(stdout(&after), "still-here\n");
    let resp = w
        .get("/bunkers/b-many/files?path=/tmp/many/0001-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa")
        .send()
        .await
        .expect("read");
    assert_eq!(resp.status(), 200);
    w.delete_bunker("b-many").await;
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_over_the_cap_are_refused() {
    let images = require_artefacts(&TINY);
    let _slot = vm_slot().await;
    let w = TestWorker::start_with(&images, |c| c.max_file_bytes = 100_000).await;
    w.create("b-cap", "tiny", 256).await;

    // Declared too large: refused before anything reaches the guest.
    let resp = w
        .put("/bunkers/b-cap/files?path=/tmp/big")
        .body(vec![1u8; 100_001])
        .send()
        .await
        .expect("put");
    // The body is left unread, so the connection cannot be reused: the answer says so, and
    // the client's next request goes out on a new connection.
    assert_eq!(
        resp.headers().get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );
    let (status, err) = error_of(resp).await;
    assert_eq!((status, err.code.as_str()), (413, "FILE_TOO_LARGE"));

    // Streamed without a length: cut off mid-way, and the partial upload is cancelled.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..4).map(|_| Ok(vec![2u8; 40_000])).collect();
    let resp = w
        .put("/bunkers/b-cap/files?path=/tmp/big")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .expect("put");
    let (status, err) = error_of(resp).await;
    assert_eq!((status, err.code.as_str()), (413, "FILE_TOO_LARGE"));
    let resp = w
        .get("/bunkers/b-cap/files?path=/tmp/big")
        .send()
        .await
        .expect("get");
    assert_eq!(error_of(resp).await.1.code, "FILE_NOT_FOUND");
    let r = exec(&w, "b-cap", &shell("ls -a /tmp")).await;
    assert_eq!(
        stdout(&r).split_whitespace().collect::<Vec<_>>(),
        [".", ".."],
        "temp files left"
    );

    w.delete_bunker("b-cap").await;
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_then_resume_keeps_the_bunker_usable() {
    let images = require_artefacts(&TINY);
    let _slot = vm_slot().await;
    let w = TestWorker::start(&images).await;
    w.create("b-pause", "tiny", 256).await;

    let resp = w
        .post("/bunkers/b-pause/pause")
        .send()
        .await
        .expect("pause");
    assert_eq!(resp.status(), 200);
    let info: VmInfo = resp.json().await.expect("info");
    assert_eq!(info.status, VmStatus::Paused);

    let resp = w
        .post("/bunkers/b-pause/exec")
        .json(&shell("true"))
        .send()
        .await
        .expect("exec");
    let (status, err) = error_of(resp).await;
    assert_eq!((status, err.code.as_str()), (409, "BUNKER_NOT_RUNNING"));
    let resp = w
        .post("/bunkers/b-pause/pause")
        .send()
        .await
        .expect("pause twice");
    assert_eq!(error_of(resp).await.1.code, "BUNKER_NOT_RUNNING");

    let resp = w
        .post("/bunkers/b-pause/resume")
        .send()
        .await
        .expect("resume");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.json::<VmInfo>().await.expect("info").status,
        VmStatus::Running
    );
    let resp = w
        .post("/bunkers/b-pause/resume")
        .send()
        .await
        .expect("resume twice");
    assert_eq!(error_of(resp).await.1.code, "BUNKER_NOT_RUNNING");

    let r = exec(&w, "b-pause", &shell("echo alive")).await;
    assert_eq!(stdout(&r), "alive\n");

    // A paused bunker can be deleted too.
    let resp = w
        .post("/bunkers/b-pause/pause")
        .send()
        .await
        .expect("pause");
    assert_eq!(resp.status(), 200);
    w.delete_bunker("b-pause").await;
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_boot_failure_is_reported_with_the_console_and_leaves_nothing() {
    let real = require_artefacts(&TINY);
    let _slot = vm_slot().await;
    // Its own images directory: the real kernel and initramfs, and an image that is no ext4.
    let images = common::images_with_guest(&real);
    std::fs::write(
        images.path().join("broken.ext4"),
        vec![0x5a; 8 * 1024 * 1024],
    )
    .expect("write");
    let w = TestWorker::start(images.path()).await;

    let started = Instant::now();
    let resp = w.create_raw("b-broken", "broken", 256).await;
    let (status, err) = error_of(resp).await;
    eprintln!("TIMING failed boot answered in {:?}", started.elapsed());
    assert_eq!(
        (status, err.code.as_str()),
        (500, "BOOT_FAILED"),
        "{}",
        err.message
    );
    assert!(
        err.message.contains("exited"),
        "reason names the exit: {}",
        err.message
    );
    assert!(
        err.message.contains("console tail"),
        "reason has the console: {}",
        err.message
    );
    assert!(
        err.message.contains("scaibunker-init"),
        "the init's complaint: {}",
        err.message
    );
    w.assert_nothing_left("b-broken");
    let list: Vec<VmInfo> = w
        .get("/bunkers")
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert!(list.is_empty(), "a failed create is not listed: {list:?}");

    // Unknown images are not cached.
    let resp = w.create_raw("b-none", &"ab".repeat(32), 256).await;
    let (status, err) = error_of(resp).await;
    assert_eq!((status, err.code.as_str()), (404, "IMAGE_NOT_CACHED"));
    w.assert_nothing_left("b-none");
    w.shutdown().await;
}

/// What the worker keeps of a bunker's serial console on disk, at most.
const CONSOLE_CAP_BYTES: u64 = 2 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chatty_guest_leaves_at_most_the_console_cap_on_disk() {
    let images = require_artefacts(&TINY);
    let _slot = vm_slot().await;
    let w = TestWorker::start(&images).await;
    w.create("b-chatty", "tiny", 256).await;
    let dir = w.bunker_dir("b-chatty");

    // Half again the cap, in 64-byte lines, then a marker that must survive as the tail.
    let lines = (CONSOLE_CAP_BYTES * 3 / 2) / 64;
    let started = Instant::now();
    let mut req = shell(&format!(
        "yes 0123456789abcdef0123456789abcdef0123456789abcdef0123456789a | head -n {lines} > /dev/ttyS0; echo chatty-end > /dev/ttyS0"
    ));
    req.timeout_ms = 300_000;
    let r = exec(&w, "b-chatty", &req).await;
    assert_eq!(r.exit_code, Some(0), "stderr: {}", stderr(&r));
    eprintln!(
        "TIMING {} KiB through the serial console in {:?}",
        lines * 64 / 1024,
        started.elapsed()
    );

    let on_disk = || -> (u64, Vec<(String, u64)>) {
        let files: Vec<(String, u64)> = std::fs::read_dir(&dir)
            .expect("read dir")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("console"))
            .map(|e| {
                let len = e.metadata().expect("stat").len();
                (e.file_name().to_string_lossy().into_owned(), len)
            })
            .collect();
        (files.iter().map(|(_, len)| len).sum(), files)
    };
    // The worker copies the console as it comes: wait for the marker to land.
    eventually(Duration::from_secs(30), "the marker on disk", || async {
        let text = std::fs::read(dir.join("console.log")).unwrap_or_default();
        String::from_utf8_lossy(&text)
            .contains("chatty-end")
            .then_some(())
    })
    .await
    .expect("the console's tail is on disk");
    let (total, files) = on_disk();
    assert!(
        total <= CONSOLE_CAP_BYTES,
        "{total} bytes of console on disk, more than the cap: {files:?}"
    );
    assert!(
        total >= CONSOLE_CAP_BYTES / 2,
        "the recent console is kept: {files:?}"
    );
    w.delete_bunker("b-chatty").await;
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_vm_marks_the_bunker_failed_and_is_cleaned_up() {
    let images = require_artefacts(&TINY);
    let _slot = vm_slot().await;
    let w = TestWorker::start(&images).await;
    w.create("b-kill", "tiny", 256).await;
    let pid: i32 = std::fs::read_to_string(w.bunker_dir("b-kill").join("qemu.pid"))
        .expect("qemu.pid")
        .trim()
        .parse()
        .expect("pid");
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());

    let info = eventually(Duration::from_secs(30), "the bunker failing", || async {
        let info = w.info("b-kill").await;
        (info.status == VmStatus::Failed).then_some(info)
    })
    .await
    .expect("failed");
    assert_eq!(info.status, VmStatus::Failed);
    // The reason goes where the controller reads it: the heartbeat's bunker reports.
    let report = w
        .handle()
        .reports()
        .into_iter()
        .find(|r| r.id == "b-kill")
        .expect("reported");
    assert_eq!(report.status, VmStatus::Failed);
    let reason = report.reason.expect("a reason");
    assert!(
        reason.contains("exited unexpectedly") && reason.contains("SIGKILL"),
        "{reason}"
    );
    assert!(reason.contains("console tail"), "{reason}");
    let resp = w
        .post("/bunkers/b-kill/exec")
        .json(&shell("true"))
        .send()
        .await
        .expect("exec");
    assert_eq!(error_of(resp).await.1.code, "BUNKER_NOT_RUNNING");
    w.assert_nothing_left("b-kill");
    w.delete_bunker("b-kill").await;
    let resp = w.get("/bunkers/b-kill").send().await.expect("get");
    assert_eq!(error_of(resp).await.1.code, "BUNKER_NOT_FOUND");
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_every_vm() {
    let images = require_artefacts(&TINY);
    let _slot = vm_slot().await;
    let w = TestWorker::start(&images).await;
    w.create("b-shutdown", "tiny", 256).await;
    let data_dir = w.data_dir.clone();
    assert!(!common::processes_mentioning(&data_dir).is_empty());
    w.shutdown().await;
    assert!(common::processes_mentioning(&data_dir).is_empty());
    assert!(!data_dir.join("bunkers/b-shutdown").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_image_runs_python() {
    let images = require_artefacts(&["vmlinux", "initramfs.cpio.gz", "default.ext4"]);
    let _slot = vm_slot().await;
    let w = TestWorker::start(&images).await;
    let (info, wall) = w.create("b-default", "default", 512).await;
    eprintln!(
        "TIMING default boot: worker boot_ms={} (qemu spawn → agent hello), create call {wall:?}",
        info.boot_ms
    );
    let started = Instant::now();
    let r = exec(&w, "b-default", &shell("python3 -c 'print(6*7)'")).await;
    eprintln!(
        "TIMING python3 (default, cold): api {:?}, guest {} ms",
        started.elapsed(),
        r.guest_duration_ms
    );
    assert_eq!(r.exit_code, Some(0), "stderr: {}", stderr(&r));
    assert_eq!(stdout(&r), "42\n");

    let mut walls = Vec::new();
    let mut guests = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let mut req = shell("");
        req.program = Program::Argv(vec!["true".into()]);
        let r = exec(&w, "b-default", &req).await;
        walls.push(started.elapsed().as_millis());
        guests.push(r.guest_duration_ms);
    }
    eprintln!(
        "TIMING exec true (default): api round trip ms {walls:?}, guest duration ms {guests:?}"
    );
    w.delete_bunker("b-default").await;
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_booting_bunker_cancels_its_boot() {
    let images = require_artefacts(&TINY);
    let _slot = vm_slot().await;
    let w = TestWorker::start(&images).await;
    let create = {
        let (http, url) = (w.http.clone(), w.url("/bunkers"));
        tokio::spawn(async move {
            let req = scaibunker_proto::worker::CreateVm {
                bunker_id: "b-early".into(),
                image_sha256: "tiny".into(),
                cpu_millicores: 1000,
                memory_mb: 256,
                disk_mb: 64,
                hostname: "early".into(),
                env_vars: Default::default(),
                image_pull: None,
                snapshot: None,
                tenant_id: String::new(),
                network: Default::default(),
            };
            http.post(url)
                .bearer_auth(common::TOKEN)
                .json(&req)
                .send()
                .await
        })
    };
    eventually(Duration::from_secs(10), "qemu starting", || async {
        w.bunker_dir("b-early")
            .join("qemu.pid")
            .exists()
            .then_some(())
    })
    .await
    .expect("booting");
    assert_eq!(w.info("b-early").await.status, VmStatus::Booting);
    let resp = w.delete("/bunkers/b-early").send().await.expect("delete");
    assert_eq!(resp.status(), 204);
    w.assert_nothing_left("b-early");
    let resp = create.await.expect("join").expect("create answered");
    let (status, err) = error_of(resp).await;
    assert_eq!((status, err.code.as_str()), (500, "BOOT_FAILED"));
    assert!(
        err.message.contains("stopped during boot"),
        "{}",
        err.message
    );
    w.shutdown().await;
}

/// Reads an NDJSON exec stream as it arrives, handing each event and its arrival time to
/// `on_event`; checks the body ends with a whole line.
async fn read_stream(
    mut resp: reqwest::Response,
    mut on_event: impl FnMut(Instant, ExecStreamEvent),
) {
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/x-ndjson")
    );
    let mut buf = Vec::new();
    while let Some(chunk) = resp.chunk().await.expect("body chunk") {
        let at = Instant::now();
        buf.extend_from_slice(&chunk);
        while let Some(end) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            on_event(
                at,
                serde_json::from_slice(&line[..end]).expect("an ExecStreamEvent"),
            );
        }
    }
    assert!(buf.is_empty(), "the body ends mid-line");
}

/// The events of a whole stream, with their arrival times.
async fn stream_events(
    w: &TestWorker,
    id: &str,
    req: &ExecRequest,
) -> Vec<(Instant, ExecStreamEvent)> {
    let resp = w
        .post(&format!("/bunkers/{id}/exec/stream"))
        .json(req)
        .send()
        .await
        .expect("exec stream request");
    let mut events = Vec::new();
    read_stream(resp, |at, ev| events.push((at, ev))).await;
    events
}

/// Decoded stdout and stderr of stream events.
fn outputs(events: &[(Instant, ExecStreamEvent)]) -> (String, String) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    for (_, ev) in events {
        match ev {
            ExecStreamEvent::Stdout { data_b64 } => {
                out.extend(BASE64.decode(data_b64).expect("b64"))
            }
            ExecStreamEvent::Stderr { data_b64 } => {
                err.extend(BASE64.decode(data_b64).expect("b64"))
            }
            _ => {}
        }
    }
    (
        String::from_utf8(out).expect("utf8"),
        String::from_utf8(err).expect("utf8"),
    )
}

/// The one terminal event, which must be the last.
fn last_event(events: &[(Instant, ExecStreamEvent)]) -> (Instant, ExecStreamEvent) {
    let terminal = |ev: &ExecStreamEvent| {
        matches!(
            ev,
            ExecStreamEvent::Exit { .. } | ExecStreamEvent::Error { .. }
        )
    };
    let (last, rest) = events.split_last().expect("some events");
    assert!(
        terminal(&last.1),
        "the stream ends with exit or error: {events:?}"
    );
    assert!(
        !rest.iter().any(|(_, ev)| terminal(ev)),
        "events after the end: {events:?}"
    );
    last.clone()
}

fn peak_rss_kb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_stream_forwards_output_as_it_is_produced() {
    let images = require_artefacts(&TINY);
    let _slot = vm_slot().await;
    let w = TestWorker::start(&images).await;
    w.create("b-stream", "tiny", 256).await;

    // Output arrives while the command still runs, in order, then exactly one exit.
    let req = shell("echo one; sleep 1; echo two >&2; sleep 1; echo three; exit 4");
    let started = Instant::now();
    let events = stream_events(&w, "b-stream", &req).await;
    let (out, err) = outputs(&events);
    assert_eq!(
        (out.as_str(), err.as_str()),
        ("one\nthree\n", "two\n"),
        "{events:?}"
    );
    let (exit_at, exit) = last_event(&events);
    match exit {
        ExecStreamEvent::Exit {
            exit_code,
            timed_out,
            stdout_total_bytes,
            stderr_total_bytes,
            ..
        } => {
            assert_eq!(exit_code, Some(4));
            assert!(!timed_out);
            assert_eq!((stdout_total_bytes, stderr_total_bytes), (10, 4));
        }
        other => panic!("not an exit: {other:?}"),
    }
    let one_at = events
        .iter()
        .find(|(_, ev)| matches!(ev, ExecStreamEvent::Stdout { data_b64 } if BASE64.decode(data_b64).expect("b64").starts_with(b"one")))
        .map(|(at, _)| *at)
        .expect("`one` was streamed");
    eprintln!(
        "TIMING exec stream: `one` after {:?}, exit after {:?}",
        one_at - started,
        exit_at - started
    );
    // Two seconds of sleep separate them; a buffered answer would deliver both at once.
    assert!(
        exit_at - one_at >= Duration::from_millis(800),
        "`one` arrived {:?} before the exit: buffered, not streamed",
        exit_at - one_at
    );

    // stdin is fed as in the inline route; a spawn failure is exit 127 with the reason.
    let mut req = shell("cat");
    req.stdin_b64 = Some(BASE64.encode(b"fed through stdin"));
    let events = stream_events(&w, "b-stream", &req).await;
    assert_eq!(outputs(&events).0, "fed through stdin");
    assert!(matches!(
        last_event(&events).1,
        ExecStreamEvent::Exit {
            exit_code: Some(0),
            ..
        }
    ));
    let mut req = shell("");
    req.program = Program::Argv(vec!["/no/such/program".into()]);
    let events = stream_events(&w, "b-stream", &req).await;
    assert!(!outputs(&events).1.is_empty(), "{events:?}");
    assert!(
        matches!(
            last_event(&events).1,
            ExecStreamEvent::Exit {
                exit_code: Some(127),
                ..
            }
        ),
        "{events:?}"
    );

    // A large output streams whole, and the worker (in this process) does not hold it.
    const BIG: u64 = 20_000_000;
    let peak_before = peak_rss_kb();
    let started = Instant::now();
    let resp = w
        .post("/bunkers/b-stream/exec/stream")
        .json(&shell(&format!("head -c {BIG} /dev/zero")))
        .send()
        .await
        .expect("exec stream request");
    let (mut decoded, mut chunks, mut last) = (0u64, 0u32, None);
    read_stream(resp, |_, ev| match ev {
        ExecStreamEvent::Stdout { data_b64 } => {
            decoded += BASE64.decode(data_b64).expect("b64").len() as u64;
            chunks += 1;
        }
        other => last = Some(other),
    })
    .await;
    let peak_after = peak_rss_kb();
    eprintln!(
        "TIMING exec stream of {BIG} bytes: {:?} in {chunks} stdout events; test process \
         peak RSS {peak_before:?} kB -> {peak_after:?} kB",
        started.elapsed()
    );
    assert_eq!(decoded, BIG);
    match last {
        Some(ExecStreamEvent::Exit {
            exit_code,
            stdout_total_bytes,
            ..
        }) => {
            assert_eq!(exit_code, Some(0));
            assert_eq!(stdout_total_bytes, BIG);
        }
        other => panic!("the stream did not end with an exit: {other:?}"),
    }
    if let (Some(before), Some(after)) = (peak_before, peak_after) {
        assert!(
            after.saturating_sub(before) < 200 * 1024,
            "peak RSS grew by {} kB streaming {BIG} bytes",
            after - before
        );
    }

    // A reader that goes away cancels the command.
    let req = shell("echo $$ > /tmp/pid; echo started; sleep 300");
    let mut resp = w
        .post("/bunkers/b-stream/exec/stream")
        .json(&req)
        .send()
        .await
        .expect("exec stream request");
    assert_eq!(resp.status(), 200);
    let first = resp.chunk().await.expect("chunk").expect("a first event");
    let first: ExecStreamEvent =
        serde_json::from_slice(first.strip_suffix(b"\n").expect("a whole line")).expect("event");
    assert!(matches!(first, ExecStreamEvent::Stdout { .. }), "{first:?}");
    let alive = exec(&w, "b-stream", &shell("kill -0 $(cat /tmp/pid)")).await;
    assert_eq!(alive.exit_code, Some(0), "the command runs while streamed");
    let dropped = Instant::now();
    drop(resp);
    eventually(
        Duration::from_secs(15),
        "the command being killed",
        || async {
            let r = exec(&w, "b-stream", &shell("kill -0 $(cat /tmp/pid)")).await;
            (r.exit_code != Some(0)).then_some(())
        },
    )
    .await
    .expect("cancelled");
    eprintln!(
        "TIMING exec stream reader gone -> command killed within {:?}",
        dropped.elapsed()
    );

    w.delete_bunker("b-stream").await;
    w.shutdown().await;
}

/// A controller that only answers what a lazy pull needs: registration and heartbeats (so
/// the worker's link stays quiet), no peers, and `tiny.ext4` streamed from the storage proxy
/// under `images/tiny.ext4`.
async fn fake_proxy_controller(tiny: std::path::PathBuf) -> String {
    use axum::body::Body;
    use axum::routing::{get, post};
    use scaibunker_proto::worker::{HeartbeatResponse, PeersResponse, RegisterResponse};

    let app = axum::Router::new()
        .route(
            "/v1/modules/scaibunker/workers/register",
            post(|| async {
                axum::Json(RegisterResponse {
                    worker_id: "wrk_vm".into(),
                    heartbeat_interval_s: 10,
                    credential: "swc_1_fake_wrk_vm".into(),
                })
            }),
        )
        .route(
            "/v1/modules/scaibunker/heartbeat",
            post(|| async {
                axum::Json(HeartbeatResponse {
                    known: true,
                    stop_bunkers: Vec::new(),
                    pull_images: Vec::new(),
                    credential: None,
                })
            }),
        )
        .route(
            "/v1/modules/scaibunker/peers/{sha256}",
            get(|| async { axum::Json(PeersResponse { peers: Vec::new() }) }),
        )
        .route(
            "/v1/modules/scaibunker/storage/objects/images/tiny.ext4",
            get(move || async move {
                let file = tokio::fs::File::open(&tiny).await.expect("open tiny.ext4");
                let len = file.metadata().await.expect("stat").len();
                (
                    [(axum::http::header::CONTENT_LENGTH, len.to_string())],
                    Body::from_stream(tokio_util::io::ReaderStream::new(file)),
                )
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazily_pulled_image_boots() {
    let images = require_artefacts(&TINY);
    let _slot = vm_slot().await;
    // The worker's own images directory has the guest kernel and initramfs, no root image:
    // tiny comes through the storage proxy when the create asks for it.
    let guest = common::images_with_guest(&images);
    let sha = image_sha256(&images, "tiny");
    let size_bytes = std::fs::metadata(images.join("tiny.ext4"))
        .expect("stat tiny.ext4")
        .len();
    let controller_url = fake_proxy_controller(images.join("tiny.ext4")).await;
    let w = TestWorker::start_with(guest.path(), |c| {
        c.controller_url = Some(controller_url);
    })
    .await;

    let req = scaibunker_proto::worker::CreateVm {
        bunker_id: "b-lazy".into(),
        image_sha256: sha.clone(),
        cpu_millicores: 1000,
        memory_mb: 256,
        disk_mb: 1024,
        hostname: "lazybox".into(),
        env_vars: Default::default(),
        snapshot: None,
        image_pull: Some(scaibunker_proto::worker::ImagePull {
            sha256: sha.clone(),
            size_bytes,
            object_key: Some("images/tiny.ext4".into()),
        }),
        tenant_id: String::new(),
        network: Default::default(),
    };
    let started = Instant::now();
    let resp = w.post("/bunkers").json(&req).send().await.expect("create");
    let status = resp.status();
    let text = resp.text().await.expect("body");
    assert_eq!(status, 200, "create failed: {text}");
    let info: VmInfo = serde_json::from_str(&text).expect("VmInfo");
    assert_eq!(info.status, VmStatus::Running);
    eprintln!(
        "TIMING lazy pull ({size_bytes} bytes) + boot: create call {:?}, boot_ms={}",
        started.elapsed(),
        info.boot_ms
    );
    let counters = w.handle().pulls().counters();
    assert_eq!((counters.proxy_bytes, counters.peer_bytes), (size_bytes, 0));
    assert!(w.data_dir.join(format!("images/{sha}.ext4")).is_file());

    let r = exec(&w, "b-lazy", &shell("hostname; echo booted from a pull")).await;
    assert_eq!(r.exit_code, Some(0), "stderr: {}", stderr(&r));
    assert_eq!(stdout(&r), "lazybox\nbooted from a pull\n");
    w.delete_bunker("b-lazy").await;
    w.shutdown().await;
}

/// `df -k /`: (total, available) KiB of the guest's root filesystem.
async fn df_root(w: &TestWorker, id: &str) -> (u64, u64) {
    let r = w.exec_sh(id, "df -k / | tail -n 1").await;
    assert_eq!(r.exit_code, Some(0), "{r:?}");
    let out = stdout(&r);
    let cols: Vec<u64> = out
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .collect();
    assert!(cols.len() >= 3, "df said {out:?}");
    (cols[0], cols[2])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guest_disk_is_disk_mb_and_filling_it_stops_at_enospc_under_the_cap() {
    let images = require_artefacts(&[
        "vmlinux",
        "initramfs.cpio.gz",
        "kernel.release",
        "default.ext4",
    ]);
    let _slot = vm_slot().await;
    let w = TestWorker::start(&images).await;
    // Below the image (1 GiB): refused before anything boots.
    let resp = w
        .create_sized("b-small", "default", 512, 512, "small")
        .await;
    let status = resp.status();
    let text = resp.text().await.expect("body");
    assert_eq!(status, 422, "{text}");
    assert!(text.contains("disk_mb"), "{text}");

    let started = Instant::now();
    let resp = w
        .create_sized("b-disk", "default", 512, 2048, "disky")
        .await;
    assert_eq!(
        resp.status(),
        200,
        "{}",
        resp.text().await.unwrap_or_default()
    );
    eprintln!(
        "TIMING disk: create with a grown disk {:?}",
        started.elapsed()
    );
    let (total_kib, _) = df_root(&w, "b-disk").await;
    // ext4's own metadata takes a few per cent of the 2 GiB.
    assert!(
        (1_900_000..=2_097_152).contains(&total_kib),
        "the root filesystem is {total_kib} KiB"
    );

    // The guest user fills it: ENOSPC inside the guest, and the overlay on the worker
    // stays within the disk it emulates.
    let started = Instant::now();
    let fill = exec(
        &w,
        "b-disk",
        &ExecRequest {
            user: GuestUser::User,
            timeout_ms: 600_000,
            ..shell("dd if=/dev/zero of=/home/user/fill bs=1M 2>&1; sync; ls -l /home/user/fill")
        },
    )
    .await;
    eprintln!("TIMING disk: filled in {:?}", started.elapsed());
    let out = stdout(&fill);
    assert!(out.contains("No space left on device"), "{out}");
    let (_, avail_kib) = df_root(&w, "b-disk").await;
    assert!(avail_kib < 1024, "{avail_kib} KiB still free");
    let overlay = w.bunker_dir("b-disk").join("disk.qcow2");
    let allocated = std::fs::metadata(&overlay).expect("overlay").len();
    assert!(
        allocated <= (2048 + 64) << 20,
        "the overlay grew to {allocated} bytes"
    );
    w.delete_bunker("b-disk").await;
    w.shutdown().await;
}
