//! A 50 MB random file up into a bunker and back down, byte-identical, through the real
//! controller, worker and agent, streamed end to end; a failed upload leaves nothing behind.

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

    client.delete_bunker(&bunker.id).await.expect("delete");
}
