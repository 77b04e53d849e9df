//! Template snapshots with real QEMU microVMs: a shape's second bunker is restored from the
//! template its first cold boot built, restored bunkers are independent, and a broken or
//! stale template falls back to a cold boot.
//!
//! Needs the guest artefacts of `images/build.sh`; one VM test at a time
//! ([`common::vm_slot`]). Timings are printed (run with `--nocapture`), never asserted.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::{TestWorker, eventually, image_sha256, require_artefacts, vm_slot};
use scaibunker_proto::worker::{BootSource, VmInfo};
use scaibunker_worker::config::TemplateMode;
use scaibunker_worker::templates::TemplateStatus;

const TINY: [&str; 3] = ["vmlinux", "initramfs.cpio.gz", "tiny.ext4"];
/// A template build is a cold boot plus a save; generous for a loaded TCG host.
const BUILD_WAIT: Duration = Duration::from_secs(180);

async fn start(images: &Path) -> TestWorker {
    TestWorker::start_with(images, |c| c.templates = TemplateMode::On).await
}

async fn stdout_of(w: &TestWorker, id: &str, cmd: &str) -> String {
    let r = w.exec_sh(id, cmd).await;
    assert_eq!(r.exit_code, Some(0), "`{cmd}` failed: {r:?}");
    String::from_utf8(BASE64.decode(&r.stdout_b64).expect("b64")).expect("utf8")
}

async fn create(w: &TestWorker, id: &str, image: &str, hostname: &str) -> (VmInfo, Duration) {
    w.create_with_hostname(id, image, 256, hostname).await
}

/// Waits until the worker has a ready template of `image_sha256`; returns its directory.
async fn template_ready(w: &TestWorker, image_sha256: &str) -> PathBuf {
    eventually(BUILD_WAIT, "the template build", || async {
        w.handle()
            .templates()
            .into_iter()
            .find_map(|(_, status)| match status {
                TemplateStatus::Ready {
                    dir,
                    image_sha256: sha,
                } if sha == image_sha256 => Some(dir),
                _ => None,
            })
    })
    .await
    .expect("template ready")
}

fn fingerprint(path: &Path) -> (String, std::time::SystemTime) {
    let sha = scaibunker_worker::images::sha256_file(path).expect("hash");
    let mtime = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .expect("mtime");
    (sha, mtime)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shapes_second_bunker_is_restored_from_its_template_with_its_own_disk() {
    let images = require_artefacts(&TINY);
    let _slot = vm_slot().await;
    let w = start(&images).await;
    let sha = image_sha256(&images, "tiny");

    let (cold, cold_wall) = create(&w, "b-cold", &sha, "cold-box").await;
    assert_eq!(cold.boot_source, BootSource::Cold);
    let build_started = Instant::now();
    let template = template_ready(&w, &sha).await;
    eprintln!(
        "TIMING template: cold create {cold_wall:?}; template ready {:?} after it",
        build_started.elapsed()
    );
    w.delete_bunker("b-cold").await;
    let disk = template.join("disk.qcow2");
    let before = fingerprint(&disk);

    let (a, a_wall) = create(&w, "b-a", &sha, "box-a").await;
    assert_eq!(a.boot_source, BootSource::Template, "{a:?}");
    // Exec works at once, and the restored guest has its own host name.
    assert_eq!(stdout_of(&w, "b-a", "hostname").await.trim(), "box-a");
    // The template's disk is the 64 MiB image's; the restored guest's filesystem grew to
    // fill its bunker's 1 GiB disk.
    let df = stdout_of(&w, "b-a", "df -k / | tail -n 1").await;
    let total: u64 = df
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("df total");
    assert!((900_000..=1_048_576).contains(&total), "df: {df}");
    let (b, b_wall) = create(&w, "b-b", &sha, "box-b").await;
    assert_eq!(b.boot_source, BootSource::Template, "{b:?}");
    eprintln!(
        "TIMING template: create from template {a_wall:?} and {b_wall:?} (worker boot_ms {} and {})",
        a.boot_ms, b.boot_ms
    );
    assert_eq!(stdout_of(&w, "b-b", "hostname").await.trim(), "box-b");
    assert_eq!(
        stdout_of(&w, "b-b", "cat /etc/hostname; grep -c box-b /etc/hosts")
            .await
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["box-b", "1"]
    );
    // Each restore gets its own machine id and draws its own random numbers.
    let ident = "cat /etc/machine-id; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'";
    let a_id = stdout_of(&w, "b-a", ident).await;
    let b_id = stdout_of(&w, "b-b", ident).await;
    let (a_mid, a_rand) = a_id.split_once('\n').expect("two lines");
    let (b_mid, b_rand) = b_id.split_once('\n').expect("two lines");
    assert_eq!(a_mid.len(), 32, "{a_id}");
    assert_ne!(a_mid, b_mid, "machine ids");
    assert_eq!(a_rand.len(), 32, "{a_id}");
    assert_ne!(a_rand, b_rand, "random bytes");

    // Each restored bunker writes its own overlay, whose backing file is the template's disk.
    stdout_of(&w, "b-a", "echo only-a > /only-in-a && sync").await;
    assert_eq!(
        stdout_of(&w, "b-b", "cat /only-in-a 2>/dev/null || echo absent")
            .await
            .trim(),
        "absent"
    );
    stdout_of(&w, "b-b", "echo only-b > /only-in-b && sync").await;
    assert_eq!(
        stdout_of(
            &w,
            "b-a",
            "cat /only-in-a; cat /only-in-b 2>/dev/null || echo absent"
        )
        .await
        .split_whitespace()
        .collect::<Vec<_>>(),
        ["only-a", "absent"]
    );
    let info = std::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(w.bunker_dir("b-a").join("disk.qcow2"))
        .output()
        .expect("qemu-img info");
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("json");
    assert_eq!(
        info["full-backing-filename"].as_str().map(PathBuf::from),
        Some(disk.clone()),
        "{info}"
    );
    // Nothing wrote to the template's disk.
    assert_eq!(fingerprint(&disk), before);

    // The other bunker's VM still runs: check only this one's directory, then everything.
    let resp = w.delete("/bunkers/b-a").send().await.expect("delete");
    assert_eq!(resp.status(), 204);
    assert!(!w.bunker_dir("b-a").exists());
    w.delete_bunker("b-b").await;
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_or_missing_template_state_falls_back_to_a_cold_boot() {
    let images = require_artefacts(&TINY);
    let _slot = vm_slot().await;
    let w = start(&images).await;
    let sha = image_sha256(&images, "tiny");

    create(&w, "b-1", &sha, "box-1").await;
    let template = template_ready(&w, &sha).await;
    w.delete_bunker("b-1").await;

    // Same size, garbage inside: only QEMU can tell.
    let state = template.join("vm.state");
    let len = std::fs::metadata(&state).expect("state").len();
    std::fs::write(&state, vec![0x5a; usize::try_from(len).expect("fits")]).expect("corrupt");
    let (info, _) = create(&w, "b-2", &sha, "box-2").await;
    assert_eq!(info.boot_source, BootSource::Cold, "{info:?}");
    assert_eq!(stdout_of(&w, "b-2", "hostname").await.trim(), "box-2");
    assert!(!template.exists(), "the broken template was not discarded");

    // The cold boot rebuilt it; now take its state file away.
    let template = template_ready(&w, &sha).await;
    w.delete_bunker("b-2").await;
    std::fs::remove_file(template.join("vm.state")).expect("remove state");
    let (info, _) = create(&w, "b-3", &sha, "box-3").await;
    assert_eq!(info.boot_source, BootSource::Cold, "{info:?}");
    assert_eq!(stdout_of(&w, "b-3", "echo ok").await, "ok\n");
    assert!(!template.exists(), "the broken template was not discarded");

    // And the cold boot built it again.
    template_ready(&w, &sha).await;
    w.delete_bunker("b-3").await;
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_image_invalidates_its_templates() {
    let artefacts = require_artefacts(&TINY);
    let _slot = vm_slot().await;
    // A private images directory whose image the test can change.
    let images = common::images_with_guest(&artefacts);
    let image = images.path().join("tiny.ext4");
    std::fs::copy(artefacts.join("tiny.ext4"), &image).expect("copy image");
    let w = start(images.path()).await;
    let old_sha = image_sha256(images.path(), "tiny");

    create(&w, "b-old", &old_sha, "box-old").await;
    let old_template = template_ready(&w, &old_sha).await;
    w.delete_bunker("b-old").await;

    // A longer file is a different image; the ext4 inside still mounts.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .expect("open image");
    file.set_len(file.metadata().expect("meta").len() + (1 << 20))
        .expect("grow image");
    drop(file);
    let new_sha = image_sha256(images.path(), "tiny");
    assert_ne!(new_sha, old_sha);

    let (info, _) = create(&w, "b-new", &new_sha, "box-new").await;
    assert_eq!(info.boot_source, BootSource::Cold, "{info:?}");
    assert_eq!(stdout_of(&w, "b-new", "hostname").await.trim(), "box-new");
    assert!(
        !old_template.exists(),
        "the template of the old image is still there"
    );
    assert!(
        !w.handle().templates().iter().any(
            |(_, s)| matches!(s, TemplateStatus::Ready { image_sha256, .. } if *image_sha256 == old_sha)
        ),
        "the old image's template is still listed"
    );
    // The new image gets its own template.
    let new_template = template_ready(&w, &new_sha).await;
    assert_ne!(new_template, old_template);
    w.delete_bunker("b-new").await;
    w.shutdown().await;
}
