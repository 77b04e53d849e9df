//! `scaibunker cp SRC DST`: files and directories between this machine and a bunker.
//!
//! One side is `BUNKER:/abs/path` (a `bnk_…` id), the other a local path.
//! - Local file → bunker: written at the path (into it, under the file's name, when the path
//!   ends with `/`). Local directory → bunker: its contents are unpacked into the path
//!   (created if missing, merged into if it exists), all or nothing, as one tar stream.
//! - Bunker → local: a file is written at the local path (inside it when that is an existing
//!   directory), through a temporary file renamed into place; a directory's contents are
//!   unpacked into the local path (created if missing).
//!
//! Transfers stream: neither side's bytes are held in memory whole.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Args;
use futures_util::{StreamExt, TryStreamExt};
use scaibunker_sdk::Client;
use tokio::io::AsyncWriteExt;
use tokio_util::io::{StreamReader, SyncIoBridge};

#[derive(Args)]
pub struct CpArgs {
    /// `BUNKER:/path` or a local path.
    src: String,
    /// `BUNKER:/path` or a local path.
    dst: String,
}

/// A bunker-side path, if `spec` is one.
fn remote(spec: &str) -> Option<(&str, &str)> {
    let (bunker, path) = spec.split_once(':')?;
    (bunker.starts_with("bnk_") && !bunker.contains('/')).then_some((bunker, path))
}

pub async fn cp(args: CpArgs, json: bool) -> Result<()> {
    let client = crate::commands::client()?;
    let summary = match (remote(&args.src), remote(&args.dst)) {
        (None, Some((bunker, path))) => upload(&client, Path::new(&args.src), bunker, path).await?,
        (Some((bunker, path)), None) => {
            download(&client, bunker, path, Path::new(&args.dst)).await?
        }
        (Some(_), Some(_)) => {
            bail!("copy between two bunkers is not supported; go through a local path")
        }
        (None, None) => bail!("one side must be BUNKER:/path (a bnk_… id)"),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        eprintln!("copied {} bytes ({})", summary["bytes"], summary["kind"]);
    }
    Ok(())
}

async fn upload(
    client: &Client,
    local: &Path,
    bunker: &str,
    path: &str,
) -> Result<serde_json::Value> {
    let meta = tokio::fs::metadata(local)
        .await
        .with_context(|| format!("reading {}", local.display()))?;
    if meta.is_dir() {
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(8);
        let dir = local.to_path_buf();
        // tar is synchronous: build it on a blocking thread, one chunk at a time.
        let builder = tokio::task::spawn_blocking(move || -> Result<()> {
            let sink = ChannelWriter { tx: tx.clone() };
            let mut tar = tar::Builder::new(std::io::BufWriter::with_capacity(64 * 1024, sink));
            tar.follow_symlinks(false);
            let built = tar.append_dir_all(".", &dir).and_then(|()| tar.finish());
            if let Err(e) = built {
                let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
                return Err(e).context("archiving the directory");
            }
            tar.into_inner()?.flush()?;
            Ok(())
        });
        let body = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        let written = client
            .write_archive(bunker, path, reqwest::Body::wrap_stream(body))
            .await
            .context("uploading the directory failed")?;
        builder.await??;
        Ok(
            serde_json::json!({"kind": "directory", "path": written.path, "bytes": written.size_bytes}),
        )
    } else {
        let target = if path.ends_with('/') {
            let name = local
                .file_name()
                .context("the local path has no file name")?
                .to_string_lossy();
            format!("{path}{name}")
        } else {
            path.to_owned()
        };
        let file = tokio::fs::File::open(local).await?;
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
        let mode = {
            use std::os::unix::fs::PermissionsExt;
            meta.permissions().mode() & 0o7777
        };
        let written = client
            .write_file(bunker, &target, Some(mode), body)
            .await
            .context("uploading the file failed")?;
        Ok(serde_json::json!({"kind": "file", "path": written.path, "bytes": written.size_bytes}))
    }
}

/// `Write` into a channel, for a blocking producer feeding an async body.
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
}

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tx
            .blocking_send(Ok(Bytes::copy_from_slice(buf)))
            .map_err(|_| std::io::Error::other("the upload stopped"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn download(
    client: &Client,
    bunker: &str,
    path: &str,
    local: &Path,
) -> Result<serde_json::Value> {
    match client.read_file_stream(bunker, path).await {
        Ok(resp) => {
            let target = if local.is_dir() {
                let name = Path::new(path)
                    .file_name()
                    .context("the bunker path has no file name")?;
                local.join(name)
            } else {
                local.to_path_buf()
            };
            let bytes = save_file(resp, &target).await?;
            Ok(serde_json::json!({"kind": "file", "path": target, "bytes": bytes}))
        }
        Err(e) if e.code() == Some("IS_A_DIRECTORY") => {
            let resp = client
                .read_archive_stream(bunker, path)
                .await
                .context("downloading the directory failed")?;
            let stream = resp.bytes_stream().map_err(std::io::Error::other);
            let reader = SyncIoBridge::new(StreamReader::new(stream));
            let dest = local.to_path_buf();
            let bytes = tokio::task::spawn_blocking(move || -> Result<u64> {
                std::fs::create_dir_all(&dest)?;
                let mut counted = Counted {
                    inner: reader,
                    n: 0,
                };
                let mut archive = tar::Archive::new(&mut counted);
                archive.set_preserve_permissions(true);
                archive.set_overwrite(true);
                archive
                    .unpack(&dest)
                    .with_context(|| format!("unpacking into {}", dest.display()))?;
                Ok(counted.n)
            })
            .await??;
            Ok(serde_json::json!({"kind": "directory", "path": local, "bytes": bytes}))
        }
        Err(e) => Err(e).context("downloading failed"),
    }
}

struct Counted<R> {
    inner: R,
    n: u64,
}

impl<R: std::io::Read> std::io::Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n += n as u64;
        Ok(n)
    }
}

/// Streams a download into `target` through a temporary file renamed into place.
async fn save_file(resp: reqwest::Response, target: &Path) -> Result<u64> {
    let dir = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let tmp = dir.join(format!(
        ".{}.scaibunker-cp-{}",
        target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let result = async {
        let mut file = tokio::fs::File::create(&tmp).await?;
        let mut body = resp.bytes_stream();
        let mut n = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.context("the download broke")?;
            file.write_all(&chunk).await?;
            n += chunk.len() as u64;
        }
        file.sync_all().await?;
        tokio::fs::rename(&tmp, target).await?;
        anyhow::Ok(n)
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    result.with_context(|| format!("writing {}", target.display()))
}
