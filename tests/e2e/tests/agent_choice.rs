//! The agent `up` bakes into every guest is the static one. After a plain workspace build
//! (`cargo build --workspace`) the `scaibunker-agent` next to `scaibunker` is dynamically
//! linked; before, `up` took it, rebuilt the shared initramfs with it, and from then on every
//! image without glibc (`tiny`) panicked at boot. Now `up` refuses it when it is named, and
//! passes over it for the static build when nothing is named.

use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::time::{Duration, Instant};

use scaibunker_api::exec::ExecRequest;
use scaibunker_e2e::{Up, UpOptions, agent_bin, binaries, require_images};

fn initramfs_stamp(dir: &std::path::Path) -> (u64, i64, i64) {
    let meta = std::fs::metadata(dir.join("initramfs.cpio.gz")).expect("initramfs");
    (meta.ino(), meta.mtime(), meta.mtime_nsec())
}

#[tokio::test]
async fn up_never_bakes_the_dynamic_workspace_agent_and_tiny_still_boots() {
    let images = require_images(&["tiny.ext4", "initramfs.cpio.gz"]).expect("guest images");
    let bins = binaries().expect("binaries");
    let dynamic = bins.scaibunker.with_file_name("scaibunker-agent");
    assert!(
        dynamic.is_file(),
        "the workspace build's agent {} is missing",
        dynamic.display()
    );
    let before = initramfs_stamp(&images);

    // Named explicitly: refused before anything is built, with the way out in the message.
    let data = tempfile::tempdir().expect("tempdir");
    let started = Instant::now();
    let out = Command::new(&bins.scaibunker)
        .args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.path())
        .env("SCAIBUNKER_AGENT_BIN", &dynamic)
        .env("SCAIBUNKER_IMAGES_DIR", &images)
        .output()
        .expect("run up");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "up accepted {}", dynamic.display());
    assert!(stderr.contains("dynamically linked"), "{stderr}");
    assert!(stderr.contains("scripts/build-agent.sh"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(
        initramfs_stamp(&images),
        before,
        "the initramfs was rebuilt"
    );

    // Not named: `up` passes over the dynamic sibling and takes the static build from the
    // cache (here a private cache holding the static agent the tests use).
    let cache = tempfile::tempdir().expect("tempdir");
    let slot = cache.path().join(format!(
        "target-agent/{}-unknown-linux-gnu/release",
        std::env::consts::ARCH
    ));
    std::fs::create_dir_all(&slot).expect("cache dir");
    std::fs::copy(
        agent_bin().expect("static agent"),
        slot.join("scaibunker-agent"),
    )
    .expect("copy the static agent");
    let mut up = Up::start(UpOptions {
        without_agent_bin: true,
        env: vec![(
            "SCAIBUNKER_CACHE".into(),
            cache.path().display().to_string(),
        )],
        ..UpOptions::default()
    })
    .expect("up starts without SCAIBUNKER_AGENT_BIN");
    assert_eq!(
        initramfs_stamp(&images),
        before,
        "the initramfs was rebuilt"
    );
    let bunker = up.tiny_bunker().await;
    let ran = up
        .client()
        .exec(
            bunker.id.as_str(),
            &ExecRequest {
                command: Some("echo booted".into()),
                ..Default::default()
            },
        )
        .await
        .expect("exec in tiny");
    assert_eq!(ran.stdout.as_deref(), Some("booted\n"), "{ran:?}");
    up.stop().expect("stop");
}
