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
            let bytes =
                tokio::task::spawn_blocking(move || unpack_untrusted(reader, &dest)).await??;
            Ok(serde_json::json!({"kind": "directory", "path": local, "bytes": bytes}))
        }
        Err(e) => Err(e).context("downloading failed"),
    }
}

/// Unpacks a tar stream that came out of a bunker into `dest`, treating it as hostile: the
/// guest controls every byte of it. Only directories, regular files, symlinks and hard links
/// are made (device nodes and FIFOs are skipped), setuid/setgid/sticky bits are masked off,
/// host-side ownership is never taken from the archive, and entries leaving `dest` (through
/// `..`, an absolute path or a symlink planted earlier in the stream) are refused by `tar`'s
/// `unpack_in`. Directories are kept writable while their contents land and get their own
/// mode at the end, as `tar::Archive::unpack` does. Returns the bytes read.
fn unpack_untrusted(reader: impl std::io::Read, dest: &Path) -> Result<u64> {
    use std::os::unix::fs::PermissionsExt;
    use tar::EntryType;
    const MASK: u32 = 0o7000;
    std::fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    let mut counted = Counted {
        inner: reader,
        n: 0,
    };
    let mut archive = tar::Archive::new(&mut counted);
    let mut dirs: Vec<(PathBuf, u32)> = Vec::new();
    let mut skipped = 0u64;
    for entry in archive.entries().context("reading the archive")? {
        let mut entry = entry.context("reading the archive")?;
        let kind = entry.header().entry_type();
        if !matches!(
            kind,
            EntryType::Directory
                | EntryType::Regular
                | EntryType::Continuous
                | EntryType::Symlink
                | EntryType::Link
                | EntryType::GNUSparse
        ) {
            skipped += 1;
            continue;
        }
        let mode = entry.header().mode().unwrap_or(0o644) & 0o7777 & !MASK;
        let rel = entry.path().context("an entry's path")?.into_owned();
        entry.set_preserve_permissions(true);
        entry.set_mask(MASK);
        entry.set_unpack_xattrs(false);
        let unpacked = entry
            .unpack_in(dest)
            .with_context(|| format!("unpacking {} into {}", rel.display(), dest.display()))?;
        if !unpacked {
            bail!(
                "the archive entry {} leaves {}",
                rel.display(),
                dest.display()
            );
        }
        if kind == EntryType::Directory {
            let path = dest.join(&rel);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode | 0o700))?;
            dirs.push((path, mode));
        }
    }
    // Deepest first, so a read-only parent does not stop its child's chmod.
    for (path, mode) in dirs.iter().rev() {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(*mode))
            .with_context(|| format!("setting the mode of {}", path.display()))?;
    }
    if skipped > 0 {
        eprintln!("skipped {skipped} device, FIFO or other special entries");
    }
    Ok(counted.n)
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn header(path: &str, kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_path(path).expect("path");
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_cksum();
        h
    }

    fn archive(entries: &[(tar::Header, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (h, data) in entries {
            b.append(h, *data).expect("append");
        }
        b.into_inner().expect("finish")
    }

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p)
            .expect("lstat")
            .permissions()
            .mode()
            & 0o7777
    }

    #[test]
    fn a_hostile_archive_from_a_bunker_lands_without_setuid_devices_or_escapes() {
        use tar::EntryType::*;
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("out");
        let mut fifo = header("pipe", Fifo, 0o644, 0);
        fifo.set_cksum();
        let mut dev = header("null", Char, 0o666, 0);
        dev.set_device_major(1).expect("major");
        dev.set_device_minor(3).expect("minor");
        dev.set_cksum();
        let bytes = archive(&[
            (header("ro/", Directory, 0o555, 0), b""),
            (header("ro/inside", Regular, 0o644, 2), b"ok"),
            (header("suid", Regular, 0o4755, 2), b"#!"),
            (header("sgid-dir/", Directory, 0o2775, 0), b""),
            (fifo, b""),
            (dev, b""),
        ]);
        let n = unpack_untrusted(&bytes[..], &dest).expect("unpacks");
        // Everything up to the end-of-archive blocks was read.
        assert!(
            n + 1024 >= bytes.len() as u64 && n <= bytes.len() as u64,
            "{n}"
        );
        assert_eq!(mode(&dest.join("suid")), 0o755);
        assert_eq!(mode(&dest.join("sgid-dir")), 0o775);
        assert_eq!(mode(&dest.join("ro")), 0o555);
        assert_eq!(std::fs::read(dest.join("ro/inside")).expect("read"), b"ok");
        assert!(!dest.join("pipe").exists() && !dest.join("null").exists());

        // A symlink out of the tree, then a file through it: refused, nothing written outside.
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).expect("outside");
        let mut link = header("escape", Symlink, 0o777, 0);
        link.set_link_name(&outside).expect("link name");
        link.set_cksum();
        let bytes = archive(&[
            (link, b""),
            (header("escape/owned", Regular, 0o644, 1), b"x"),
        ]);
        let dest2 = dir.path().join("out2");
        assert!(unpack_untrusted(&bytes[..], &dest2).is_err());
        assert!(!outside.join("owned").exists());
        let _ = std::fs::set_permissions(dest.join("ro"), std::fs::Permissions::from_mode(0o755));
    }
}
