//! Exec, streaming and file transfer through the controller, each against its floor in the
//! same run, written to the "Exec and files" section of `docs/benchmarks.md`:
//!
//! 1. Exec `/bin/true` round trips through the controller (SDK exec), against the raw
//!    channel (the same exec sent over the agent protocol to a guest booted here with the
//!    worker's command line, no worker or controller) and one spawn timed inside the guest.
//! 2. First byte of a streamed exec (`stream: true`, `echo hi`): request → first `stdout`
//!    SSE event, against the inline round trip of the same command and the raw channel's
//!    request → first `STDOUT` frame.
//! 3. 64 MiB up and down through `PUT`/`GET /bunkers/{id}/files`, against the raw channel
//!    (`WriteFile`/`ReadFile` over the agent protocol), a guest-side `cat` of the file to
//!    `/dev/null`, and `head -c 64M /dev/zero` streamed as exec output over the raw channel.
//! 4. The 190 MiB exec output that spills to object storage (tests/e2e/tests/exec_output.rs)
//!    through the controller, against the same command over the raw channel and inside the
//!    guest to `/dev/null`.
//!
//! Two VMs at a time (the API's bunker and the raw guest, same image and memory), used in
//! turn: one is idle while the other is measured.
//!
//! Run: `cargo build --release --workspace && SCAIBUNKER_AGENT_BIN=$(scripts/build-agent.sh)
//! cargo bench -p scaibunker-e2e --bench exec_files`

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use futures_util::StreamExt as _;
use rand::RngCore as _;
use scaibunker_api::bunkers::CreateBunker;
use scaibunker_api::exec::{ExecRequest, ExecUser};
use scaibunker_e2e::bench::{
    Machine, RawStart, RawVm, load_average, mb_per_s, median, ms, percentile,
};
use scaibunker_e2e::{Up, UpOptions};
use scaibunker_proto::agent::Program;
use scaibunker_sdk::{Client, ExecEvent};

const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/benchmarks.md");
const HEADING: &str = "## Exec and files";
const IMAGE: &str = "default";

const EXEC_WARMUPS: usize = 3;
const EXEC_RUNS: usize = 30;
const LOOP_SPAWNS: u32 = 50;
const LOOP_REPEATS: usize = 3;
const STREAM_RUNS: usize = 20;
const FILE_BYTES: usize = 64 * 1024 * 1024;
const FILE_ROUNDS: usize = 3;
const FILE_PATH: &str = "/home/user/bench.bin";
/// The spill case of tests/e2e/tests/exec_output.rs: a 1 MiB block of 65-byte lines, 190
/// times, and a tail.
const LINE: &str = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ01";
const BLOCK_BYTES: usize = 1024 * 1024;
const BLOCKS: usize = 190;
const TAIL: &str = "TAIL-MARKER\n";
const SPILL_ROUNDS: usize = 2;
/// Entries of the directory the listing figure lists, and its rounds.
const LIST_ENTRIES: usize = 5_000;
const LIST_ROUNDS: usize = 5;

fn main() -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the tokio runtime")?
        .block_on(run())
}

#[derive(Default)]
struct Figures {
    // 1. /bin/true
    api_true: Vec<Duration>,
    api_true_reported: Vec<Duration>,
    raw_true: Vec<Duration>,
    spawn_loop: Vec<Duration>,
    empty_loop: Vec<Duration>,
    // 2. echo hi
    stream_first: Vec<Duration>,
    stream_done: Vec<Duration>,
    inline_echo: Vec<Duration>,
    raw_first: Vec<Duration>,
    // 3. files
    upload: Vec<Duration>,
    download: Vec<Duration>,
    raw_write: Vec<Duration>,
    raw_read: Vec<Duration>,
    guest_cat_warm: Vec<Duration>,
    guest_cat_cold: Vec<Duration>,
    raw_zero: Vec<Duration>,
    guest_zero: Vec<Duration>,
    // 4. spill
    spill_api: Vec<Duration>,
    spill_raw: Vec<Duration>,
    spill_guest: Vec<Duration>,
    spill_bytes: u64,
    // 5. listing
    list_api: Vec<Duration>,
    list_raw: Vec<Duration>,
    list_guest: Vec<Duration>,
    memory_mb: u64,
}

async fn run() -> Result<()> {
    let machine = Machine::probe()?;
    eprintln!("[bench] {machine:?}");
    let mut up = Up::start(UpOptions::default())?;
    let client = up.client();
    let bunker = client
        .create_bunker(&CreateBunker {
            image: Some(IMAGE.to_owned()),
            wait: Some(true),
            ..Default::default()
        })
        .await
        .context("creating the bunker")?;
    ensure!(bunker.status == "running", "bunker: {bunker:?}");
    let id = bunker.id.clone();
    let mut f = Figures {
        memory_mb: bunker.memory_mb,
        ..Default::default()
    };
    let mut raw = RawVm::start(
        &machine,
        up.images_dir(),
        &RawStart::Boot {
            base: up.images_dir().join(format!("{IMAGE}.ext4")),
        },
        bunker.memory_mb,
    )
    .await?;
    eprintln!(
        "[bench] raw guest up in {} (kernel {})",
        ms(raw.times.total),
        raw.hello.kernel
    );

    let outcome = measure(&client, &id, &mut raw, &mut f).await;
    raw.stop().await;
    let _ = client.delete_bunker(&id).await;
    let status = up.stop()?;
    outcome?;
    ensure!(status.success(), "up exited with {status}");

    let section = render(&machine, &f);
    let old = std::fs::read_to_string(DOC).context("reading docs/benchmarks.md")?;
    let new = scaibunker_e2e::doc::replace_section(&old, HEADING, &section);
    std::fs::write(DOC, new).context("writing docs/benchmarks.md")?;
    println!("{section}");
    Ok(())
}

fn argv(args: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: Some(args.iter().map(|a| (*a).to_owned()).collect()),
        ..Default::default()
    }
}

fn shell(command: &str) -> ExecRequest {
    ExecRequest {
        command: Some(command.to_owned()),
        timeout_s: Some(600),
        ..Default::default()
    }
}

/// An SDK exec that must exit 0: (wall time, the agent's `duration_ms`, stdout).
async fn api_exec(client: &Client, id: &str, req: &ExecRequest) -> Result<(Duration, Duration)> {
    let started = Instant::now();
    let out = client
        .exec(id, req)
        .await
        .with_context(|| format!("exec {req:?}"))?;
    let wall = started.elapsed();
    ensure!(out.exit_code == Some(0), "exec {req:?}: {out:?}");
    Ok((wall, Duration::from_millis(out.duration_ms)))
}

async fn raw_exec(raw: &mut RawVm, program: Program) -> Result<scaibunker_e2e::bench::RawExec> {
    let out = raw.exec(program.clone()).await?;
    ensure!(out.exit_code == Some(0), "raw exec {program:?}: {out:?}");
    Ok(out)
}

async fn measure(client: &Client, id: &str, raw: &mut RawVm, f: &mut Figures) -> Result<()> {
    // 1. /bin/true, the API and the raw channel in turn.
    eprintln!("[bench] exec /bin/true: {EXEC_WARMUPS} warm-ups, {EXEC_RUNS} runs");
    let true_api = argv(&["/bin/true"]);
    let true_raw = Program::Argv(vec!["/bin/true".to_owned()]);
    for _ in 0..EXEC_WARMUPS {
        api_exec(client, id, &true_api).await?;
        raw_exec(raw, true_raw.clone()).await?;
    }
    for _ in 0..EXEC_RUNS {
        let (wall, agent) = api_exec(client, id, &true_api).await?;
        f.api_true.push(wall);
        f.api_true_reported.push(agent);
        f.raw_true
            .push(raw_exec(raw, true_raw.clone()).await?.elapsed);
    }
    let spawn_loop = |body: &str| {
        shell(&format!(
            "i=0; while [ $i -lt {LOOP_SPAWNS} ]; do {body}i=$((i+1)); done"
        ))
    };
    for _ in 0..LOOP_REPEATS {
        f.spawn_loop
            .push(api_exec(client, id, &spawn_loop("/bin/true; ")).await?.1);
        f.empty_loop
            .push(api_exec(client, id, &spawn_loop("")).await?.1);
    }

    // 2. First byte of a streamed `echo hi`.
    eprintln!("[bench] streamed echo hi: {STREAM_RUNS} runs");
    let echo = argv(&["echo", "hi"]);
    let echo_raw = Program::Argv(vec!["echo".to_owned(), "hi".to_owned()]);
    for i in 0..=STREAM_RUNS {
        let started = Instant::now();
        let mut stream = client
            .exec_stream(id, &echo)
            .await
            .context("streamed exec")?;
        let mut first = None;
        let mut exit = None;
        while let Some(event) = stream.next().await {
            match event.context("stream event")? {
                ExecEvent::Stdout(bytes) => {
                    ensure!(bytes == b"hi\n", "stdout {bytes:?}");
                    first.get_or_insert_with(|| started.elapsed());
                }
                ExecEvent::Exit { exit_code, .. } => exit = Some(exit_code),
                other => anyhow::bail!("unexpected event {other:?}"),
            }
        }
        let done = started.elapsed();
        ensure!(exit == Some(Some(0)), "streamed exit {exit:?}");
        let first = first.context("no stdout event")?;
        let (inline, _) = api_exec(client, id, &echo).await?;
        let r = raw_exec(raw, echo_raw.clone()).await?;
        ensure!(r.stdout == b"hi\n", "raw stdout {:?}", r.stdout);
        if i == 0 {
            continue; // warm-up
        }
        f.stream_first.push(first);
        f.stream_done.push(done);
        f.inline_echo.push(inline);
        f.raw_first.push(r.first_stdout.context("no raw stdout")?);
    }

    // 3. 64 MiB up and down.
    let mut data = vec![0u8; FILE_BYTES];
    rand::rng().fill_bytes(&mut data);
    let root = ExecRequest {
        user: Some(ExecUser::Root),
        ..shell("sync; echo 3 > /proc/sys/vm/drop_caches")
    };
    for round in 1..=FILE_ROUNDS {
        eprintln!("[bench] files round {round}/{FILE_ROUNDS}");
        let body = data.clone();
        let started = Instant::now();
        let written = client
            .write_file(id, FILE_PATH, None, body)
            .await
            .context("upload")?;
        f.upload.push(started.elapsed());
        ensure!(written.size_bytes == FILE_BYTES as u64, "{written:?}");

        f.raw_write.push(raw.write_file(FILE_PATH, &data).await?);

        let started = Instant::now();
        let resp = client
            .read_file_stream(id, FILE_PATH)
            .await
            .context("download")?;
        let mut body = resp.bytes_stream();
        let mut got = Vec::with_capacity(FILE_BYTES);
        while let Some(chunk) = body.next().await {
            got.extend_from_slice(&chunk.context("download chunk")?);
        }
        f.download.push(started.elapsed());
        ensure!(got == data, "the download differs from the upload");

        let (bytes, took) = raw.read_file(FILE_PATH).await?;
        ensure!(bytes == FILE_BYTES as u64, "raw read {bytes} bytes");
        f.raw_read.push(took);

        let cat = shell(&format!("cat {FILE_PATH} > /dev/null"));
        f.guest_cat_warm.push(api_exec(client, id, &cat).await?.1);
        api_exec(client, id, &root).await?;
        f.guest_cat_cold.push(api_exec(client, id, &cat).await?.1);

        let zero = format!("head -c {FILE_BYTES} /dev/zero");
        let r = raw_exec(raw, Program::Shell(zero.clone())).await?;
        ensure!(
            r.stdout_bytes == FILE_BYTES as u64,
            "{} bytes",
            r.stdout_bytes
        );
        f.raw_zero.push(r.elapsed);
        f.guest_zero.push(
            api_exec(client, id, &shell(&format!("{zero} > /dev/null")))
                .await?
                .1,
        );
    }
    api_exec(client, id, &shell(&format!("rm -f {FILE_PATH}"))).await?;
    raw_exec(raw, Program::Shell(format!("rm -f {FILE_PATH}"))).await?;

    // 4. 190 MiB of exec output, spilled.
    let producer = format!(
        "yes {LINE} | head -c {BLOCK_BYTES} > /tmp/block; i=0; \
         while [ $i -lt {BLOCKS} ]; do cat /tmp/block; i=$((i+1)); done; printf {TAIL:?}"
    );
    f.spill_bytes = (BLOCK_BYTES * BLOCKS + TAIL.len()) as u64;
    for round in 1..=SPILL_ROUNDS {
        eprintln!("[bench] 190 MiB spill round {round}/{SPILL_ROUNDS}");
        let started = Instant::now();
        let out = client
            .exec(id, &shell(&producer))
            .await
            .context("spill exec")?;
        f.spill_api.push(started.elapsed());
        ensure!(out.exit_code == Some(0) && out.truncated, "spill: {out:?}");
        ensure!(out.full_output_ref.is_some(), "no full_output_ref");

        let r = raw_exec(raw, Program::Shell(producer.clone())).await?;
        ensure!(
            r.stdout_bytes == f.spill_bytes,
            "raw: {} bytes",
            r.stdout_bytes
        );
        f.spill_raw.push(r.elapsed);

        f.spill_guest.push(
            api_exec(
                client,
                id,
                &shell(&format!("{{ {producer}; }} > /dev/null")),
            )
            .await?
            .1,
        );
        eprintln!(
            "[bench]   api {} raw {} guest {}",
            ms(f.spill_api[round - 1]),
            ms(f.spill_raw[round - 1]),
            ms(f.spill_guest[round - 1])
        );
    }

    // 5. A directory of 5,000 entries, listed whole through the API (pages of 500) against
    // `ls -f | wc -l` over the raw channel and inside the guest.
    let make = format!(
        "mkdir -p /tmp/many && cd /tmp/many && i=0; \
         while [ $i -lt {LIST_ENTRIES} ]; do : > entry-$i; i=$((i+1)); done"
    );
    api_exec(client, id, &shell(&make)).await?;
    raw_exec(raw, Program::Shell(make)).await?;
    let count = "ls -f /tmp/many | wc -l".to_owned();
    for round in 1..=LIST_ROUNDS {
        let started = Instant::now();
        let entries = client.list_files(id, "/tmp/many").await?;
        f.list_api.push(started.elapsed());
        ensure!(entries.len() == LIST_ENTRIES, "{} entries", entries.len());
        f.list_raw
            .push(raw_exec(raw, Program::Shell(count.clone())).await?.elapsed);
        f.list_guest
            .push(api_exec(client, id, &shell(&count)).await?.1);
        eprintln!(
            "[bench] list 5,000 round {round}: api {} raw {} guest {}",
            ms(f.list_api[round - 1]),
            ms(f.list_raw[round - 1]),
            ms(f.list_guest[round - 1])
        );
    }
    Ok(())
}

fn rate(bytes: u64, samples: &[Duration]) -> String {
    format!("{:.1} MB/s", mb_per_s(bytes, median(samples)))
}

fn spread(samples: &[Duration]) -> String {
    scaibunker_e2e::bench::spread_ms(samples)
}

fn render(m: &Machine, f: &Figures) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{HEADING}\n");
    let _ = writeln!(
        s,
        "<!-- Written by tests/e2e/benches/exec_files.rs; a run replaces this section. -->\n"
    );
    let _ = writeln!(
        s,
        "Measured {} at commit `{}` ({} binaries) on {}, nproc {}, accelerator `{}`: image \
         `{IMAGE}` ({} MiB, 1 vCPU), two guests up at a time (the API's bunker and a raw \
         guest), measured in turn. Load average (1/5/15 min) {} before, {} after: the host \
         was {}.\n",
        m.date,
        m.commit,
        m.profile,
        m.cpu_model,
        m.nproc,
        m.accel(),
        f.memory_mb,
        m.load_start,
        load_average(),
        m.load_words(),
    );
    let _ = writeln!(
        s,
        "Reproduce: `cargo build --release --workspace && \
         SCAIBUNKER_AGENT_BIN=$(scripts/build-agent.sh) \
         cargo bench -p scaibunker-e2e --bench exec_files`\n"
    );
    let _ = writeln!(
        s,
        "The *raw channel* floor is a guest booted by this benchmark with the worker's QEMU \
         command line (same kernel, initramfs, image, memory) and driven over the agent \
         protocol on its virtio-serial socket directly: QEMU's chardev, virtio-serial, the \
         guest kernel and the agent, without the worker, the controller, HTTP or the SDK.\n"
    );

    // 1.
    let floor = median(&f.spawn_loop).saturating_sub(median(&f.empty_loop)) / LOOP_SPAWNS;
    let p50 = median(&f.api_true);
    let raw50 = median(&f.raw_true);
    let over = p50.saturating_sub(floor);
    let _ = writeln!(s, "### Exec `/bin/true` round trip\n");
    let _ = writeln!(s, "| figure | p50 | p99 |\n|---|---|---|");
    let _ = writeln!(
        s,
        "| through the controller (SDK exec, argv `[\"/bin/true\"]`) | {} | {} |",
        ms(p50),
        ms(percentile(&f.api_true, 99))
    );
    let _ = writeln!(
        s,
        "| floor: raw channel (agent `REQUEST` exec → `REPLY`) | {} | {} |",
        ms(raw50),
        ms(percentile(&f.raw_true, 99))
    );
    let _ = writeln!(
        s,
        "| `duration_ms` of the SDK execs (the agent's spawn → exit) | {} | {} |",
        ms(median(&f.api_true_reported)),
        ms(percentile(&f.api_true_reported, 99))
    );
    let _ = writeln!(
        s,
        "| floor: one `/bin/true` spawn inside the guest, (loop of {LOOP_SPAWNS} − empty loop) \
         ÷ {LOOP_SPAWNS} | {} | |",
        ms(floor)
    );
    let _ = writeln!(
        s,
        "\nN = {EXEC_RUNS} each after {EXEC_WARMUPS} warm-ups, API and raw alternating; with \
         {EXEC_RUNS} samples p99 is the slowest. In-guest loops: {LOOP_REPEATS} runs each, \
         medians {} (spawns) and {} (empty). Through the controller − in-guest floor: {} \
         (goal within 5 ms: {}); through the controller − raw channel: {} ({:.2}×).\n",
        ms(median(&f.spawn_loop)),
        ms(median(&f.empty_loop)),
        ms(over),
        if over <= Duration::from_millis(5) {
            "met"
        } else {
            "missed"
        },
        ms(p50.saturating_sub(raw50)),
        p50.as_secs_f64() / raw50.as_secs_f64()
    );

    // 2.
    let _ = writeln!(s, "### First byte of a streamed exec\n");
    let _ = writeln!(s, "| figure (`echo hi`) | p50 | p99 |\n|---|---|---|");
    let row = |s: &mut String, what: &str, v: &[Duration]| {
        let _ = writeln!(
            s,
            "| {what} | {} | {} |",
            ms(median(v)),
            ms(percentile(v, 99))
        );
    };
    row(
        &mut s,
        "streamed (`stream: true`): request → first `stdout` SSE event",
        &f.stream_first,
    );
    row(
        &mut s,
        "streamed: request → end of the stream (`[DONE]`)",
        &f.stream_done,
    );
    row(&mut s, "inline exec round trip", &f.inline_echo);
    row(
        &mut s,
        "floor: raw channel, request → first `STDOUT` frame",
        &f.raw_first,
    );
    let _ = writeln!(
        s,
        "\nN = {STREAM_RUNS} each after one warm-up, the three alternating. First byte ÷ \
         inline round trip: {:.2}×; first byte ÷ raw channel: {:.2}×.\n",
        median(&f.stream_first).as_secs_f64() / median(&f.inline_echo).as_secs_f64(),
        median(&f.stream_first).as_secs_f64() / median(&f.raw_first).as_secs_f64()
    );

    // 3.
    let n = FILE_BYTES as u64;
    let _ = writeln!(s, "### File transfer, 64 MiB of random bytes\n");
    let _ = writeln!(
        s,
        "| path | median time (min–max) | MB/s at the median |\n|---|---|---|"
    );
    let mut row = |what: &str, v: &[Duration]| {
        let _ = writeln!(s, "| {what} | {} | {} |", spread(v), rate(n, v));
    };
    row("upload: SDK `PUT /bunkers/{id}/files`", &f.upload);
    row(
        "floor: raw channel `WriteFile` (to the agent's `REPLY`)",
        &f.raw_write,
    );
    row(
        "download: SDK `GET /bunkers/{id}/files`, body read to the end",
        &f.download,
    );
    row("floor: raw channel `ReadFile`", &f.raw_read);
    row(
        "floor: `cat` of the file to `/dev/null` in the guest, page cache warm",
        &f.guest_cat_warm,
    );
    row(
        "floor: the same after `drop_caches` (guest disk read)",
        &f.guest_cat_cold,
    );
    row(
        "exec output path: raw channel exec of `head -c 64M /dev/zero`, stdout counted",
        &f.raw_zero,
    );
    row(
        "floor: `head -c 64M /dev/zero > /dev/null` in the guest",
        &f.guest_zero,
    );
    let up_mb = mb_per_s(n, median(&f.upload));
    let down_mb = mb_per_s(n, median(&f.download));
    let _ = writeln!(
        s,
        "\n{FILE_ROUNDS} rounds, each: upload, raw write, download (compared byte for byte with \
         what was sent), raw read, the guest-side reads, the raw exec output. Upload ÷ raw \
         write: {:.2}× the time; download ÷ raw read: {:.2}×. Goal at least 100 MB/s end to \
         end: {} (upload {up_mb:.1} MB/s, download {down_mb:.1} MB/s).\n",
        median(&f.upload).as_secs_f64() / median(&f.raw_write).as_secs_f64(),
        median(&f.download).as_secs_f64() / median(&f.raw_read).as_secs_f64(),
        if up_mb >= 100.0 && down_mb >= 100.0 {
            "met"
        } else {
            "missed"
        },
    );
    let _ = writeln!(
        s,
        "Where the time goes: the raw channel alone moves {:.1} MB/s up and {:.1} MB/s down, \
         while the guest reads the file from its page cache at {:.1} MB/s and from its disk \
         at {:.1} MB/s; the worker, the controller and HTTP add {} to the upload and {} to \
         the download. Under TCG the guest's virtio-serial driver, its copies and the agent \
         share the one emulated vCPU: the host↔guest channel, not the platform above it, is \
         what misses the goal.\n",
        mb_per_s(n, median(&f.raw_write)),
        mb_per_s(n, median(&f.raw_read)),
        mb_per_s(n, median(&f.guest_cat_warm)),
        mb_per_s(n, median(&f.guest_cat_cold)),
        ms(median(&f.upload).saturating_sub(median(&f.raw_write))),
        ms(median(&f.download).saturating_sub(median(&f.raw_read))),
    );
    let _ = writeln!(
        s,
        "- The raw `WriteFile` includes the agent writing a temporary file on the guest's \
         ext4 (virtio-blk over a qcow2 overlay), its fsync and rename; `ReadFile` the guest \
         reading it back (page cache warm) and both sending 64 KiB `DATA` frames over \
         virtio-serial, with credit granted back every 16 frames as the worker does.\n\
         - Times and MB/s are wall clock on the host; the guest-side figures are the \
         agent's `duration_ms` (spawn → exit of the `sh -c`, so they include one shell and \
         one `cat`/`head` spawn).\n"
    );

    // 4.
    let b = f.spill_bytes;
    let _ = writeln!(s, "### Exec stdout throughput: 190 MiB spilled\n");
    let _ = writeln!(
        s,
        "| path | median time (min–max) | MB/s at the median |\n|---|---|---|"
    );
    let mut row = |what: &str, v: &[Duration]| {
        let _ = writeln!(s, "| {what} | {} | {} |", spread(v), rate(b, v));
    };
    row(
        "through the controller: inline SDK exec, 1 MiB kept inline, the rest spilled to \
         object storage as it streams",
        &f.spill_api,
    );
    row(
        "floor: raw channel exec, `STDOUT` frames counted",
        &f.spill_raw,
    );
    row(
        "floor: the same command to `/dev/null` inside the guest",
        &f.spill_guest,
    );
    let _ = writeln!(
        s,
        "\n{SPILL_ROUNDS} rounds; {b} bytes of stdout (tests/e2e/tests/exec_output.rs's \
         command: `cat` of a 1 MiB block 190 times and a tail). Through the controller ÷ raw \
         channel: {:.2}× the time; raw channel ÷ in-guest: {:.2}×.",
        median(&f.spill_api).as_secs_f64() / median(&f.spill_raw).as_secs_f64(),
        median(&f.spill_raw).as_secs_f64() / median(&f.spill_guest).as_secs_f64(),
    );

    // 5.
    let _ = writeln!(s, "\n### Listing a directory of {LIST_ENTRIES} entries\n");
    let _ = writeln!(s, "| path | median (min–max) |\n|---|---|");
    let _ = writeln!(
        s,
        "| through the controller: `list_files` (SDK), pages of 500, every entry's type, size, \
         mode and time | {} |",
        spread(&f.list_api)
    );
    let _ = writeln!(
        s,
        "| floor: `ls -f /tmp/many \\| wc -l` over the raw channel | {} |",
        spread(&f.list_raw)
    );
    let _ = writeln!(
        s,
        "| floor: the same inside the guest (the agent's `duration_ms`) | {} |",
        spread(&f.list_guest)
    );
    let _ = writeln!(
        s,
        "\n{LIST_ROUNDS} rounds. Before agent protocol 5 a listing of more than about 800 \
         entries answered `500` and broke the bunker's channel, so there is no earlier figure."
    );
    s
}
