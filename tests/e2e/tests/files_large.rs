//! A 50 MB random file up into a bunker and back down, byte-identical, through the real
//! controller, worker and agent, streamed end to end; a download left unread holds back
//! nothing but itself (execs in the same bunker go on), and finishes intact when read.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use scaibunker_api::exec::ExecRequest;
use scaibunker_e2e::{Up, UpOptions, require_images};

#[tokio::test]
async fn fifty_megabytes_round_trip_identically() {
    require_images(&["tiny.ext4"]).expect("guest images");
    let up = Up::start(UpOptions::default()).expect("scaibunker up gets ready");
    let client = up.client();
    let bunker = up.tiny_bunker().await;

    let size = 50 * 1024 * 1024;
    let mut blob = vec![0u8; size];
    // xorshift: fast, deterministic, incompressible enough for a transfer test.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in blob.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let started = std::time::Instant::now();
    let written = client
        .write_file(&bunker.id, "/tmp/big/blob.bin", Some(0o600), blob.clone())
        .await
        .expect("upload");
    let up_s = started.elapsed().as_secs_f64();
    assert_eq!(written.size_bytes, size as u64);

    let started = std::time::Instant::now();
    let back = client
        .read_file(&bunker.id, "/tmp/big/blob.bin")
        .await
        .expect("download");
    let down_s = started.elapsed().as_secs_f64();
    assert_eq!(back.len(), size);
    assert!(back.as_ref() == blob.as_slice(), "downloaded bytes differ");
    eprintln!(
        "50 MiB: upload {:.1} MB/s, download {:.1} MB/s (TCG guest)",
        size as f64 / 1e6 / up_s,
        size as f64 / 1e6 / down_s
    );

    // The listing shows it with its mode; nothing else (no temporary file) is in the directory.
    let entries = client
        .list_files(&bunker.id, "/tmp/big")
        .await
        .expect("list");
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0].name, "blob.bin");
    assert_eq!(entries[0].mode, "0600");
    assert_eq!(entries[0].size_bytes, size as u64);

    // A download whose reader stops after the first chunk: the bunker's channel stays free.
    let mut stalled = client
        .read_file_stream(&bunker.id, "/tmp/big/blob.bin")
        .await
        .expect("start a download")
        .bytes_stream();
    let mut got = stalled
        .next()
        .await
        .expect("a first chunk")
        .expect("ok")
        .to_vec();
    tokio::time::sleep(Duration::from_secs(2)).await;
    for i in 0..3 {
        let started = Instant::now();
        let out = client
            .exec(
                &bunker.id,
                &ExecRequest {
                    command: Some(format!("echo {i}")),
                    ..Default::default()
                },
            )
            .await
            .expect("exec beside a stalled download");
        let took = started.elapsed();
        assert_eq!(out.stdout.as_deref(), Some(format!("{i}\n").as_str()));
        // Without per-stream flow control this waited for the stalled stream (30 s).
        assert!(took < Duration::from_secs(10), "exec {i} took {took:?}");
    }
    while let Some(chunk) = stalled.next().await {
        got.extend_from_slice(&chunk.expect("the rest of the download"));
    }
    assert!(got == blob, "the resumed download is intact");

    client.delete_bunker(&bunker.id).await.expect("delete");
}
