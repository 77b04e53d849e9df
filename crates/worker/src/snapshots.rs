//! Bunker snapshots in object storage: the files a capture leaves in a staging directory,
//! their trip through the controller's storage proxy, and their way back for a restore.
//!
//! Layout: `{prefix}/disk.qcow2` (both kinds) and `{prefix}/vm.state` (`full` only), where
//! the controller chooses `prefix` (`snapshots/{tenant}/{snapshot_id}`).
//!
//! The disk is a qcow2 overlay over the bunker's image, not a flattened copy: images are
//! content-addressed and already cached on the workers that placement picks, so a
//! snapshot stores only what the bunker changed. Capture, after the supervisor has copied
//! the frozen overlay into the staging directory:
//! 1. `qemu-img rebase` (safe mode) onto the image file itself, which folds in any
//!    template layer between them, so the overlay depends on nothing but the image.
//! 2. Hash and upload each file (streamed; the worker token is the only credential).
//!
//! Restore: download each file into the bunker directory (streamed), check its size and
//! SHA-256 against the manifest the controller kept, and point the overlay's backing file
//! at this worker's copy of the image (`qemu-img rebase -u`: the bytes are the same).
//!
//! Invariant: the worker holds no object storage credentials; every byte goes through the
//! storage proxy with the worker token.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use futures_util::StreamExt;
use scaibunker_proto::worker::{SnapshotFile, SnapshotKind, SnapshotManifest};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::images::sha256_file;

/// The disk file of a snapshot.
pub const DISK_OBJECT: &str = "disk.qcow2";
/// The memory and device state of a `full` snapshot.
pub const STATE_OBJECT: &str = "vm.state";
/// Where the storage proxy's object routes live on the controller.
const OBJECTS_PATH: &str = "/v1/modules/scaibunker/storage/objects";
/// Generous: a state file of a few GiB through a loaded proxy.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(1800);

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("no storage proxy is configured (SCAIBUNKER_STORAGE_URL or SCAIBUNKER_CONTROLLER_URL)")]
    NoStorage,
    #[error("request to {url}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url} answered {status}: {body}")]
    Status {
        url: String,
        status: reqwest::StatusCode,
        body: String,
    },
    #[error("{step} {}", path.display())]
    Io {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("qemu-img {step} failed: {detail}")]
    QemuImg { step: &'static str, detail: String },
    #[error("object {key}: {detail}")]
    Corrupt { key: String, detail: String },
    #[error("the snapshot cannot be restored here: {0}")]
    Incompatible(String),
}

/// The storage proxy, as the worker reaches it.
#[derive(Debug, Clone)]
pub struct ObjectClient {
    http: reqwest::Client,
    base: String,
    credentials: std::sync::Arc<crate::credentials::Credentials>,
}

impl ObjectClient {
    /// `storage_url` is the proxy's base URL (a controller's, or a `bunker_proxy`'s).
    pub fn new(
        storage_url: &str,
        credentials: std::sync::Arc<crate::credentials::Credentials>,
    ) -> Result<Self, reqwest::Error> {
        Ok(Self {
            http: reqwest::Client::builder()
                .timeout(TRANSFER_TIMEOUT)
                .build()?,
            base: format!("{}{OBJECTS_PATH}", storage_url.trim_end_matches('/')),
            credentials,
        })
    }

    fn url(&self, key: &str) -> String {
        format!("{}/{key}", self.base)
    }

    /// Streams `path` to `key`.
    pub async fn put_file(&self, key: &str, path: &Path) -> Result<(), SnapshotError> {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|source| SnapshotError::Io {
                step: "open",
                path: path.to_owned(),
                source,
            })?;
        let len = file
            .metadata()
            .await
            .map_err(|source| SnapshotError::Io {
                step: "stat",
                path: path.to_owned(),
                source,
            })?
            .len();
        let url = self.url(key);
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(
            file,
            256 * 1024,
        ));
        let resp = self
            .http
            .put(&url)
            .bearer_auth(self.credentials.bearer())
            .header(reqwest::header::CONTENT_LENGTH, len)
            .body(body)
            .send()
            .await
            .map_err(|source| SnapshotError::Http {
                url: url.clone(),
                source,
            })?;
        check(url, resp).await.map(drop)
    }

    /// Puts `body` at `key` in one request (small objects held in memory, e.g. the egress
    /// audit's batches).
    pub async fn put_bytes(&self, key: &str, body: bytes::Bytes) -> Result<(), SnapshotError> {
        let url = self.url(key);
        let resp = self
            .http
            .put(&url)
            .bearer_auth(self.credentials.bearer())
            .body(body)
            .send()
            .await
            .map_err(|source| SnapshotError::Http {
                url: url.clone(),
                source,
            })?;
        check(url, resp).await.map(drop)
    }

    /// Streams `key` into `path`, checking its size and SHA-256 on the way.
    pub async fn get_file(&self, file: &SnapshotFile, path: &Path) -> Result<(), SnapshotError> {
        let url = self.url(&file.key);
        let resp = self
            .http
            .get(&url)
            .bearer_auth(self.credentials.bearer())
            .send()
            .await
            .map_err(|source| SnapshotError::Http {
                url: url.clone(),
                source,
            })?;
        let resp = check(url.clone(), resp).await?;
        let io = |step| {
            move |source| SnapshotError::Io {
                step,
                path: path.to_owned(),
                source,
            }
        };
        let mut out = tokio::fs::File::create(path).await.map_err(io("create"))?;
        let mut hasher = Sha256::new();
        let mut seen: u64 = 0;
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|source| SnapshotError::Http {
                url: url.clone(),
                source,
            })?;
            seen += chunk.len() as u64;
            if seen > file.size_bytes {
                return Err(corrupt(file, "is longer than the manifest says"));
            }
            hasher.update(&chunk);
            out.write_all(&chunk).await.map_err(io("write"))?;
        }
        out.flush().await.map_err(io("flush"))?;
        if seen != file.size_bytes {
            return Err(corrupt(
                file,
                &format!("has {seen} bytes, the manifest says {}", file.size_bytes),
            ));
        }
        let sha = hex::encode(hasher.finalize());
        if sha != file.sha256 {
            return Err(corrupt(
                file,
                &format!("has sha256 {sha}, the manifest says {}", file.sha256),
            ));
        }
        Ok(())
    }
}

fn corrupt(file: &SnapshotFile, detail: &str) -> SnapshotError {
    SnapshotError::Corrupt {
        key: file.key.clone(),
        detail: detail.to_owned(),
    }
}

async fn check(url: String, resp: reqwest::Response) -> Result<reqwest::Response, SnapshotError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let body = resp.text().await.unwrap_or_default();
    Err(SnapshotError::Status {
        url,
        status,
        body: body.chars().take(500).collect(),
    })
}

/// What a capture left in its staging directory, and the VM shape it came from.
#[derive(Debug, Clone)]
pub struct Captured {
    pub kind: SnapshotKind,
    /// `disk.qcow2`, and `vm.state` for `full`, in one directory.
    pub dir: PathBuf,
    pub image_path: PathBuf,
    pub image_sha256: String,
    pub memory_mb: u64,
    pub cpu_millicores: u64,
    pub vcpus: u32,
    pub cmdline_hostname: String,
    pub runtime: String,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

/// Steps 1–2 of a capture: rebase the disk onto the image, hash and upload every file.
pub async fn upload(
    objects: &ObjectClient,
    captured: &Captured,
    prefix: &str,
) -> Result<SnapshotManifest, SnapshotError> {
    let disk = captured.dir.join(DISK_OBJECT);
    rebase(&disk, &captured.image_path, RebaseMode::Safe).await?;
    let mut names = vec![DISK_OBJECT];
    if captured.kind == SnapshotKind::Full {
        names.push(STATE_OBJECT);
    }
    let mut files = Vec::new();
    for name in names {
        let path = captured.dir.join(name);
        let hash_path = path.clone();
        let sha256 = tokio::task::spawn_blocking(move || sha256_file(&hash_path))
            .await
            .map_err(|e| SnapshotError::Io {
                step: "hash",
                path: path.clone(),
                source: std::io::Error::other(e),
            })?
            .map_err(|source| SnapshotError::Io {
                step: "hash",
                path: path.clone(),
                source,
            })?;
        let size_bytes = file_len(&path)?;
        let key = format!("{prefix}/{name}");
        objects.put_file(&key, &path).await?;
        files.push(SnapshotFile {
            name: name.to_owned(),
            key,
            size_bytes,
            sha256,
        });
    }
    Ok(SnapshotManifest {
        kind: captured.kind,
        image_sha256: captured.image_sha256.clone(),
        memory_mb: captured.memory_mb,
        cpu_millicores: captured.cpu_millicores,
        vcpus: captured.vcpus,
        cmdline_hostname: captured.cmdline_hostname.clone(),
        runtime: captured.runtime.clone(),
        kernel_bytes: file_len(&captured.kernel)?,
        initramfs_bytes: file_len(&captured.initramfs)?,
        files,
    })
}

/// Downloads and checks every file of `manifest` into `dir`, and points the disk at
/// `image`. Returns the disk and, for `full`, the state file.
pub async fn download(
    objects: &ObjectClient,
    manifest: &SnapshotManifest,
    dir: &Path,
    image: &Path,
) -> Result<(PathBuf, Option<PathBuf>), SnapshotError> {
    let find = |name: &str| {
        manifest
            .files
            .iter()
            .find(|f| f.name == name)
            .ok_or_else(|| SnapshotError::Incompatible(format!("the manifest has no {name}")))
    };
    let disk = dir.join(DISK_OBJECT);
    objects.get_file(find(DISK_OBJECT)?, &disk).await?;
    rebase(&disk, image, RebaseMode::Unsafe).await?;
    let state = match manifest.kind {
        SnapshotKind::Disk => None,
        SnapshotKind::Full => {
            let state = dir.join(STATE_OBJECT);
            objects.get_file(find(STATE_OBJECT)?, &state).await?;
            Some(state)
        }
    };
    Ok((disk, state))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RebaseMode {
    /// Copies into the overlay whatever differs between its old backing chain and the new
    /// backing file.
    Safe,
    /// Only rewrites the backing file name: the new one holds the same bytes.
    Unsafe,
}

async fn rebase(overlay: &Path, image: &Path, mode: RebaseMode) -> Result<(), SnapshotError> {
    let mut cmd = Command::new("qemu-img");
    cmd.arg("rebase").arg("-q");
    if mode == RebaseMode::Unsafe {
        cmd.arg("-u");
    }
    // The overlay's old backing chain may be open read-only in running VMs (a template's
    // disk, the bunker's frozen layer); reading it beside them is safe.
    let output = cmd
        .args(["-f", "qcow2", "-F", "raw", "-b"])
        .arg(image)
        .arg(overlay)
        .env_clear()
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| SnapshotError::Io {
            step: "spawn qemu-img for",
            path: overlay.to_owned(),
            source,
        })?;
    if !output.status.success() {
        return Err(SnapshotError::QemuImg {
            step: "rebase",
            detail: format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        });
    }
    Ok(())
}

fn file_len(path: &Path) -> Result<u64, SnapshotError> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|source| SnapshotError::Io {
            step: "stat",
            path: path.to_owned(),
            source,
        })
}

/// Checks that this worker can restore `manifest` with the given guest files and runtime.
pub fn check_compatible(
    manifest: &SnapshotManifest,
    runtime: &str,
    kernel: &Path,
    initramfs: &Path,
) -> Result<(), SnapshotError> {
    if manifest.kind == SnapshotKind::Disk {
        return Ok(());
    }
    if manifest.runtime != runtime {
        return Err(SnapshotError::Incompatible(format!(
            "saved under {}, this worker runs {runtime}",
            manifest.runtime
        )));
    }
    for (what, path, want) in [
        ("kernel", kernel, manifest.kernel_bytes),
        ("initramfs", initramfs, manifest.initramfs_bytes),
    ] {
        let have = file_len(path)?;
        if have != want {
            return Err(SnapshotError::Incompatible(format!(
                "the saved VM booted a {want}-byte {what}, this worker has {have} bytes"
            )));
        }
    }
    Ok(())
}
