//! An exec that writes 200 MB (190 MiB): the controller keeps 1 MiB inline and spills the whole output
//! to object storage as it streams, with its memory bounded; `full_output_ref` holds every
//! byte, the tail included.

use futures_util::StreamExt;
use scaibunker_api::exec::ExecRequest;
use scaibunker_e2e::{Up, UpOptions, require_images};
use sha2::{Digest, Sha256};

/// 64 characters and a newline, as busybox `yes` prints the line.
const LINE: &str = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ01";
/// The body: a 1 MiB block of lines (the last one cut), 190 times.
const BLOCK_BYTES: usize = 1024 * 1024;
const BLOCKS: usize = 190;
const BODY_BYTES: usize = BLOCK_BYTES * BLOCKS;
const TAIL: &str = "TAIL-MARKER\n";

/// Peak resident memory of a process, in KiB (`VmHWM`).
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

#[tokio::test]
async fn two_hundred_megabytes_of_output_spill_whole_with_bounded_memory() {
    require_images(&["tiny.ext4"]).expect("guest images");
    let up = Up::start(UpOptions::default()).expect("scaibunker up gets ready");
    let client = up.client();
    let bunker = up.tiny_bunker().await;

    let started = std::time::Instant::now();
    let out = client
        .exec(
            &bunker.id,
            &ExecRequest {
                // Written in large pieces (`cat` of a file): a line-at-a-time writer would
                // measure the emulated guest's system calls, not the platform.
                command: Some(format!(
                    "yes {LINE} | head -c {BLOCK_BYTES} > /tmp/block; i=0; \
                     while [ $i -lt {BLOCKS} ]; do cat /tmp/block; i=$((i+1)); done; \
                     printf {TAIL:?}; echo small-err >&2"
                )),
                timeout_s: Some(600),
                ..Default::default()
            },
        )
        .await
        .expect("exec");
    let took = started.elapsed();
    assert_eq!(out.exit_code, Some(0), "{:?}", out.stderr);
    assert!(out.truncated);
    let inline = out.stdout.as_deref().expect("text");
    assert_eq!(inline.len(), 1024 * 1024, "1 MiB inline");
    assert!(inline.starts_with(&format!("{LINE}\n{LINE}\n")));
    assert_eq!(out.stderr.as_deref(), Some("small-err\n"));
    let reference = out.full_output_ref.clone().expect("full_output_ref");
    assert!(reference.ends_with(&out.exec_id), "{reference}");

    // The whole stdout, streamed back: every byte, hashed as it comes.
    let mut expected = Sha256::new();
    let block: Vec<u8> = format!("{LINE}\n")
        .bytes()
        .cycle()
        .take(BLOCK_BYTES)
        .collect();
    for _ in 0..BLOCKS {
        expected.update(&block);
    }
    expected.update(TAIL.as_bytes());
    let resp = client
        .exec_output_stream(&bunker.id, &out.exec_id, "stdout")
        .await
        .expect("stored stdout");
    let mut body = resp.bytes_stream();
    let mut got = Sha256::new();
    let mut size = 0usize;
    let mut last = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.expect("chunk");
        size += chunk.len();
        got.update(&chunk);
        last = chunk.to_vec();
    }
    assert_eq!(size, BODY_BYTES + TAIL.len());
    assert!(last.ends_with(TAIL.as_bytes()), "the tail is there");
    assert_eq!(
        got.finalize(),
        expected.finalize(),
        "stored stdout is byte-exact"
    );
    // The other pipe is stored too, so the reference names both.
    let err = client
        .exec_output_stream(&bunker.id, &out.exec_id, "stderr")
        .await
        .expect("stored stderr")
        .bytes()
        .await
        .expect("bytes");
    assert_eq!(err.as_ref(), b"small-err\n");

    // The controller streamed it: its peak memory stayed far below the output's size.
    let peak_mib = peak_rss_kib(up.pid()) / 1024;
    eprintln!(
        "{:.0} MB of output in {took:?} ({:.1} MB/s); controller (up) peak RSS {peak_mib} MiB",
        BODY_BYTES as f64 / 1e6,
        BODY_BYTES as f64 / 1e6 / took.as_secs_f64()
    );
    assert!(peak_mib < 150, "controller peak RSS {peak_mib} MiB");

    // Unknown execs and pipes are clear refusals.
    let none = client
        .exec_output_stream(&bunker.id, "exe_00000000000000000000000000", "stdout")
        .await
        .expect_err("no such output");
    assert_eq!(none.code(), Some("OUTPUT_NOT_FOUND"), "{none}");
    let bad = client
        .exec_output_stream(&bunker.id, &out.exec_id, "both")
        .await
        .expect_err("bad stream");
    assert_eq!(bad.code(), Some("VALIDATION_ERROR"), "{bad}");
    client.delete_bunker(&bunker.id).await.expect("delete");
}
