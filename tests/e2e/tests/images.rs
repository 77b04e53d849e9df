//! Images end to end, through `scaibunker up` and a second worker process: a busybox tarball
//! uploaded through the API is baked into ext4 and fans out through an availability group —
//! to the first worker from the storage proxy, to the second from its peer after the proxy's
//! copy is gone (so the proxy cannot have served it); a bunker boots from the baked image;
//! a pulled image deleted by hand leaves the controller's ledger at the next heartbeat.

use std::time::{Duration, Instant};

use scaibunker_api::bunkers::CreateBunker;
use scaibunker_api::exec::ExecRequest;
use scaibunker_api::images::{CreateAvailabilityGroup, Image};
use scaibunker_e2e::{Up, UpOptions, require_images, within};

/// Heartbeats and job ticks every second.
const FAST: [(&str, &str); 2] = [
    ("WORKER_HEARTBEAT_INTERVAL_S", "1"),
    ("SCAIBUNKER_JOB_INTERVAL_S", "1"),
];

/// A root filesystem tarball: static busybox, its applets as links, the accounts the agent
/// expects and a marker file.
fn busybox_rootfs(marker: &str) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let dir = |b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(mode);
        h.set_size(0);
        b.append_data(&mut h, path, std::io::empty()).expect("dir");
    };
    for (d, mode) in [
        ("bin", 0o755),
        ("sbin", 0o755),
        ("usr", 0o755),
        ("usr/bin", 0o755),
        ("etc", 0o755),
        ("root", 0o700),
        ("home", 0o755),
        ("home/user", 0o755),
        ("tmp", 0o1777),
        ("dev", 0o755),
        ("proc", 0o755),
        ("sys", 0o755),
        ("run", 0o755),
    ] {
        dir(&mut b, d, mode);
    }
    let busybox = std::fs::read("/bin/busybox").expect("static busybox (busybox-static)");
    let file = |b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, path, data).expect("file");
    };
    file(&mut b, "bin/busybox", 0o755, &busybox);
    file(
        &mut b,
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n",
    );
    file(&mut b, "etc/group", 0o644, b"root:x:0:\nuser:x:1000:\n");
    file(&mut b, "etc/baked", 0o644, marker.as_bytes());
    for applet in [
        "sh", "cat", "echo", "ls", "sleep", "id", "hostname", "true", "mkdir", "rm",
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        b.append_link(&mut h, format!("bin/{applet}"), "/bin/busybox")
            .expect("link");
    }
    b.into_inner().expect("tar")
}

/// A worker's pull counters from its `/metrics`: (bytes from peers, bytes from the proxy).
async fn pulled_bytes(worker_url: &str) -> (u64, u64) {
    let text = reqwest::get(format!("{worker_url}/metrics"))
        .await
        .expect("worker metrics")
        .text()
        .await
        .expect("text");
    let value = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (
        value("scaibunker_worker_image_pull_bytes_total{source=\"peer\"}"),
        value("scaibunker_worker_image_pull_bytes_total{source=\"proxy\"}"),
    )
}

fn state_on(image: &Image, worker_id: &str) -> Option<String> {
    image
        .workers
        .as_ref()?
        .iter()
        .find(|w| w.worker_id == worker_id)
        .map(|w| w.state.clone())
}

#[tokio::test]
async fn a_baked_image_fans_out_peer_to_peer_and_boots() {
    require_images(&["tiny.ext4"]).expect("guest images");
    let up = Up::start(UpOptions::with_env(&FAST)).expect("scaibunker up gets ready");
    let client = up.client();
    let mut worker_b = up.add_worker("b", &FAST[..1]).expect("start worker b");
    let fleet = within(Duration::from_secs(60), "two workers online", || async {
        let ws = up.workers().await;
        (ws.len() == 2 && ws.iter().all(|w| w.status == "online")).then_some(ws)
    })
    .await;
    let b = fleet.iter().find(|w| w.name == "b").expect("b").clone();
    let a = fleet.iter().find(|w| w.name != "b").expect("a").clone();

    // Upload and bake, through the CLI (the tarball streamed from a file).
    let started = Instant::now();
    let tarball = busybox_rootfs("baked by scaibunker\n");
    let tar_path = up.data_dir().join("busybox.tar");
    std::fs::write(&tar_path, &tarball).expect("write the tarball");
    let (code, stdout, stderr) = up
        .cli(
            &[
                "--json",
                "image",
                "create",
                "busybox-baked",
                "--tar",
                tar_path.to_str().expect("utf-8 path"),
                "--size-mib",
                "64",
                "--memory-mb",
                "256",
            ],
            b"",
        )
        .await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    let ready: Image = serde_json::from_str(&stdout).expect("image json");
    let image = ready.clone();
    eprintln!(
        "uploaded {} bytes and baked in {:?}",
        tarball.len(),
        started.elapsed()
    );
    assert_eq!(ready.status, "ready");
    assert_eq!(ready.size_bytes, Some(64 << 20));
    // The CLI refuses garbage with the API's code.
    std::fs::write(&tar_path, b"not a tarball").expect("write");
    let (code, _, stderr) = up
        .cli(
            &[
                "image",
                "create",
                "junk",
                "--tar",
                tar_path.to_str().expect("utf-8"),
            ],
            b"",
        )
        .await;
    assert_eq!(code, 1);
    assert!(stderr.contains("IMAGE_CONTENT_INVALID"), "{stderr}");
    let sha = ready.sha256.clone().expect("sha256");

    // Fan-out to a through the group: nobody else has it, so it comes from the proxy.
    let group = client
        .create_availability_group(&CreateAvailabilityGroup {
            name: "pool".into(),
            description: None,
        })
        .await
        .expect("group");
    client
        .add_to_availability_group(&group.id, "workers", &a.id)
        .await
        .expect("add a");
    let started = Instant::now();
    client
        .add_to_availability_group(&group.id, "images", &image.id)
        .await
        .expect("add image");
    within(Duration::from_secs(60), "a holds the image", || async {
        let img = client.image(&image.id).await.ok()?;
        (state_on(&img, &a.id).as_deref() == Some("ready")).then_some(())
    })
    .await;
    let via_proxy = started.elapsed();
    assert_eq!(
        pulled_bytes(&a.url).await,
        (0, 64 << 20),
        "a pulled from the proxy"
    );

    // The proxy's copy goes away (workers cannot delete: the admin's capability does it); b
    // joins the group and must get the bytes from a.
    up.delete_object(&format!("images/{}/rootfs.ext4", image.id))
        .await
        .expect("delete the proxy's copy");
    let started = Instant::now();
    client
        .add_to_availability_group(&group.id, "workers", &b.id)
        .await
        .expect("add b");
    within(Duration::from_secs(60), "b holds the image", || async {
        let img = client.image(&image.id).await.ok()?;
        (state_on(&img, &b.id).as_deref() == Some("ready")).then_some(())
    })
    .await;
    let via_peer = started.elapsed();
    assert_eq!(
        pulled_bytes(&b.url).await,
        (64 << 20, 0),
        "b pulled from its peer"
    );
    eprintln!(
        "64 MiB image: proxy → a ready in {via_proxy:?}, peer a → b ready in {via_peer:?} (1 s heartbeats)"
    );
    let pulled = up
        .data_dir()
        .join("worker-b/images")
        .join(format!("{sha}.ext4"));
    assert!(pulled.exists(), "{}", pulled.display());

    // A bunker boots from the baked image and sees its files.
    let bunker = client
        .create_bunker(&CreateBunker {
            image: Some("busybox-baked".into()),
            ..Default::default()
        })
        .await
        .expect("create from the baked image");
    assert_eq!(bunker.status, "running", "{bunker:?}");
    let out = client
        .exec(
            &bunker.id,
            &ExecRequest {
                command: Some("cat /etc/baked; id -u".into()),
                ..Default::default()
            },
        )
        .await
        .expect("exec");
    assert_eq!(
        out.stdout.as_deref(),
        Some("baked by scaibunker\n1000\n"),
        "{out:?}"
    );
    client.delete_bunker(&bunker.id).await.expect("delete");

    // Deleted by hand on b: the next heartbeats drop it from the ledger.
    std::fs::remove_file(&pulled).expect("remove the pulled image");
    within(
        Duration::from_secs(30),
        "b's ledger row evicted",
        || async {
            let img = client.image(&image.id).await.ok()?;
            state_on(&img, &b.id).is_none().then_some(())
        },
    )
    .await;
    let _ = worker_b.kill();
    let _ = worker_b.wait();
}
