//! The walking skeleton, end to end: `scaibunker up` (controller, worker, QEMU), a bunker
//! from the `default` image driven through the SDK and the CLI, the API's error codes, and
//! a bunker whose VM cannot boot. After each scenario nothing of the installation may be
//! left running or on disk.
//!
//! Needs `cargo build --workspace`, `SCAIBUNKER_AGENT_BIN` (scripts/build-agent.sh) and the
//! guest artefacts; one `up` (so at most one VM) runs at a time.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::RngCore as _;
use scaibunker_api::bunkers::{Bunker, CreateBunker};
use scaibunker_api::codes;
use scaibunker_api::envelope::FieldDetail;
use scaibunker_api::exec::{ExecRequest, ExecResult};
use scaibunker_e2e::{
    Up, UpOptions, eventually, host_kernel_release, leftover_processes, qemu_processes_for,
    require_images,
};
use scaibunker_sdk::{Client, SdkError};

/// One installation at a time: the hosts have two cores, and each `up` may run a VM.
static ONE_UP_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long a deleted or failed bunker's VM and directory may take to disappear.
const CLEANUP: Duration = Duration::from_secs(10);

fn argv(args: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: Some(args.iter().map(|a| (*a).to_owned()).collect()),
        ..Default::default()
    }
}

async fn exec_ok(client: &Client, id: &str, args: &[&str]) -> ExecResult {
    let out = client
        .exec(id, &argv(args))
        .await
        .unwrap_or_else(|e| panic!("exec {args:?} failed: {e}"));
    assert_eq!(out.exit_code, Some(0), "exec {args:?}: {out:?}");
    out
}

/// Status, code and details of an API error; panics on success or a transport error.
fn api_error<T: std::fmt::Debug>(
    what: &str,
    result: Result<T, SdkError>,
) -> (u16, String, Vec<FieldDetail>) {
    match result {
        Err(SdkError::Api {
            status,
            code,
            details,
            ..
        }) => (status, code, details),
        other => panic!("{what}: expected an API error, got {other:?}"),
    }
}

async fn create(client: &Client, image: &str) -> Bunker {
    client
        .create_bunker(&CreateBunker {
            image: Some(image.to_owned()),
            wait: Some(true),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("create from `{image}` failed: {e}"))
}

/// Waits until no QEMU names the data directory and the worker holds no bunker directory.
async fn assert_no_vm_left(up: &Up, after: &str) {
    eventually(CLEANUP, &format!("cleanup after {after}"), || {
        let qemus = qemu_processes_for(up.data_dir());
        let dirs = up.bunker_dirs();
        if qemus.is_empty() && dirs.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "qemu processes {qemus:?}, bunker directories {dirs:?}"
            ))
        }
    })
    .await
    .expect("nothing left");
}

/// Stops `up` with SIGTERM and checks that it, its worker and every VM are gone.
async fn stop_and_assert_nothing_left(mut up: Up) {
    let status = up.stop().expect("up stops on SIGTERM");
    assert!(status.success(), "up exited with {status} on SIGTERM");
    let data_dir = up.data_dir().to_owned();
    let worker = up.worker_pid().expect("up reported its worker's pid");
    eventually(CLEANUP, "the installation to be gone", || {
        let left = leftover_processes(&data_dir);
        let worker_alive = is_alive(worker);
        if left.is_empty() && !worker_alive {
            Ok(())
        } else {
            Err(format!(
                "processes naming {}: {left:?}; worker {worker} alive: {worker_alive}",
                data_dir.display()
            ))
        }
    })
    .await
    .expect("nothing left after stopping up");
    assert!(up.bunker_dirs().is_empty(), "{:?}", up.bunker_dirs());
}

/// Whether `pid` is a live process (a zombie is not: it holds nothing).
fn is_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}

#[tokio::test]
async fn default_bunker_runs_commands_and_files_then_leaves_nothing_behind() {
    let _one = ONE_UP_AT_A_TIME.lock().await;
    let images = require_images(&[
        "vmlinux",
        "initramfs.cpio.gz",
        "default.ext4",
        "kernel.release",
    ])
    .expect("guest artefacts");
    let up = Up::start(UpOptions::default()).expect("scaibunker up gets ready");
    let client = up.client();

    // Create and wait.
    let bunker = create(&client, "default").await;
    assert_eq!(bunker.status, "running", "{bunker:?}");
    assert!(bunker.worker_id.is_some(), "no worker_id: {bunker:?}");
    let id = bunker.id.clone();

    // Exec through the SDK: python3 in the Debian image, and the guest's own kernel.
    let out = exec_ok(&client, &id, &["python3", "-c", "print(6*7)"]).await;
    assert_eq!(out.stdout.as_deref(), Some("42\n"), "{out:?}");
    let out = exec_ok(&client, &id, &["uname", "-r"]).await;
    let guest_kernel = out.stdout.as_deref().unwrap_or_default().trim().to_owned();
    let built_kernel = std::fs::read_to_string(images.join("kernel.release"))
        .expect("read kernel.release")
        .trim()
        .to_owned();
    assert_eq!(
        guest_kernel, built_kernel,
        "the guest runs the built kernel"
    );
    assert_ne!(
        guest_kernel,
        host_kernel_release().expect("host kernel"),
        "the command ran in a VM, not on the host"
    );

    // The CLI: exit codes pass through, listings see the bunker.
    let (code, stdout, stderr) = up
        .cli(&["exec", &id, "--", "sh", "-c", "echo hi; exit 7"], b"")
        .await;
    assert_eq!((code, stdout.as_str()), (7, "hi\n"), "stderr: {stderr}");
    let (code, stdout, stderr) = up.cli(&["bunker", "list", "--json"], b"").await;
    assert_eq!(code, 0, "bunker list failed: {stderr}");
    let listed: Vec<Bunker> = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("not a bunker list ({e}): {stdout}"));
    assert!(
        listed.iter().any(|b| b.id == id && b.status == "running"),
        "{id} not listed as running: {stdout}"
    );

    // Files: a round trip of random bytes, a missing file, a relative path.
    let mut blob = vec![0u8; 5 * 1024 + 17];
    rand::rng().fill_bytes(&mut blob);
    let written = client
        .write_file(&id, "/tmp/e2e/blob.bin", None, blob.clone())
        .await
        .expect("upload");
    assert_eq!(written.size_bytes, blob.len() as u64);
    let read = client
        .read_file(&id, "/tmp/e2e/blob.bin")
        .await
        .expect("download");
    assert!(
        read[..] == blob[..],
        "downloaded bytes differ from the upload"
    );
    let (status, code, _) = api_error(
        "read a missing file",
        client.read_file(&id, "/tmp/e2e/missing.bin").await,
    );
    assert_eq!((status, code.as_str()), (404, codes::FILE_NOT_FOUND));
    let (status, code, _) = api_error(
        "read a relative path",
        client.read_file(&id, "tmp/e2e/blob.bin").await,
    );
    assert_eq!((status, code.as_str()), (422, codes::INVALID_PATH));

    // Bad input.
    let (status, code, _) = api_error(
        "create from an unknown image",
        client
            .create_bunker(&CreateBunker {
                image: Some("no-such-image".into()),
                ..Default::default()
            })
            .await,
    );
    assert_eq!((status, code.as_str()), (404, codes::IMAGE_NOT_FOUND));
    assert_unknown_field_is_rejected(&up).await;
    let (status, code, _) = api_error(
        "list without a token",
        up.client_with_key(None).bunkers(None, None, None).await,
    );
    assert_eq!((status, code.as_str()), (401, codes::AUTH_TOKEN_MISSING));
    let (status, code, _) = api_error(
        "list with a bad token",
        up.client_with_key(Some("sgk_not-a-real-key"))
            .bunkers(None, None, None)
            .await,
    );
    assert_eq!((status, code.as_str()), (401, codes::AUTH_TOKEN_INVALID));
    let (status, code, _) = api_error(
        "get an unknown bunker",
        client.bunker("bnk_00000000000000000000000000").await,
    );
    assert_eq!((status, code.as_str()), (404, codes::BUNKER_NOT_FOUND));

    // Delete: terminated, no more execs, nothing left.
    let deleted = client.delete_bunker(&id).await.expect("delete");
    assert_eq!(deleted.status, "terminated", "{deleted:?}");
    let (status, code, _) = api_error(
        "exec in a deleted bunker",
        client.exec(&id, &argv(&["true"])).await,
    );
    assert_eq!((status, code.as_str()), (409, codes::BUNKER_NOT_RUNNING));
    assert_no_vm_left(&up, "delete").await;

    stop_and_assert_nothing_left(up).await;
}

/// An unknown JSON field is a 422 naming the field (the SDK's types cannot send one).
async fn assert_unknown_field_is_rejected(up: &Up) {
    let resp = reqwest::Client::new()
        .post(format!(
            "{}{}/bunkers",
            up.url(),
            scaibunker_api::MODULE_PREFIX
        ))
        .bearer_auth(up.key())
        .json(&serde_json::json!({"image": "default", "flavour": "large"}))
        .send()
        .await
        .expect("POST /bunkers");
    let status = resp.status().as_u16();
    let body: serde_json::Value = resp.json().await.expect("a JSON error envelope");
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], codes::VALIDATION_ERROR, "{body}");
    let details = body["error"]["details"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        details.iter().any(|d| d["field"] == "flavour"),
        "no detail names `flavour`: {body}"
    );
}

#[tokio::test]
async fn bunker_whose_vm_cannot_boot_fails_with_a_reason_and_leaves_nothing_behind() {
    let _one = ONE_UP_AT_A_TIME.lock().await;
    let real = require_images(&[
        "vmlinux",
        "initramfs.cpio.gz",
        "default.ext4",
        "kernel.release",
    ])
    .expect("guest artefacts");
    let images = tempfile::Builder::new()
        .prefix("sb-e2e-images-")
        .tempdir()
        .expect("images tempdir");
    images_with_broken(&real, images.path()).expect("prepare the images directory");

    let up = Up::start(UpOptions {
        images_dir: Some(images.path().to_owned()),
        ..UpOptions::default()
    })
    .expect("scaibunker up gets ready");
    let client = up.client();

    let bunker = create(&client, "broken").await;
    assert_eq!(bunker.status, "failed", "{bunker:?}");
    let reason = bunker.failure_reason.clone().unwrap_or_default();
    eprintln!("failure_reason of the broken bunker: {reason}");
    assert!(
        reason.contains("before the agent was ready"),
        "the reason does not say the boot failed: {reason:?}"
    );
    assert!(
        reason.contains("cannot mount"),
        "the reason does not carry the console's complaint: {reason:?}"
    );
    let again = client.bunker(&bunker.id).await.expect("get");
    assert_eq!(again.status, "failed");
    assert_eq!(again.failure_reason.as_deref(), Some(reason.as_str()));
    assert_no_vm_left(&up, "a failed boot").await;

    stop_and_assert_nothing_left(up).await;
}

/// Fills `dir` with links to the real artefacts plus `broken.ext4`, which is not a
/// filesystem: the initramfs cannot mount it and powers the VM off.
///
/// `up` runs `images/build.sh` on this directory. The script skips a step while its stamp
/// matches and its outputs exist, so the stamps are copied and the kernel modules and the
/// debootstrap tarball (checked under `work/`) are linked; were a step ever out of date,
/// its rebuild would replace the links here and leave the shared directory alone.
fn images_with_broken(real: &Path, dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::symlink;
    for name in [
        "vmlinux",
        "initramfs.cpio.gz",
        "kernel.release",
        "default.ext4",
        "tiny.ext4",
    ] {
        if real.join(name).exists() {
            symlink(real.join(name), dir.join(name))?;
        }
    }
    // The worker's digest caches (keyed by size and mtime, which the links share) spare
    // it hashing the 1 GiB image again.
    for name in ["default.ext4.sha256", "tiny.ext4.sha256"] {
        if real.join(name).exists() {
            std::fs::copy(real.join(name), dir.join(name))?;
        }
    }
    let stamps: PathBuf = dir.join("stamps");
    std::fs::create_dir(&stamps)?;
    if let Ok(entries) = std::fs::read_dir(real.join("stamps")) {
        for entry in entries.flatten() {
            std::fs::copy(entry.path(), stamps.join(entry.file_name()))?;
        }
    }
    std::fs::create_dir_all(dir.join("work/kernel"))?;
    for name in ["kernel/kroot", "default-debootstrap.tar"] {
        let target = real.join("work").join(name);
        if target.exists() {
            symlink(target, dir.join("work").join(name))?;
        }
    }
    let broken = std::fs::File::create(dir.join("broken.ext4"))?;
    broken.set_len(8 << 20)?;
    Ok(())
}
