//! Files in a bunker: path checks, uploads (single files and tar archives), downloads,
//! listings and removals, each through the bunker's worker and recorded as activity.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use scaibunker_api::files::{FileEntry, FileType, FileWritten};
use scaibunker_proto::worker as wp;

use super::{BunkerError, record_activity, rfc3339, running};
use crate::service::auth::{self, Principal};
use crate::service::{RequestContext, Services};
use crate::store::bunkers::BunkerRow;

/// Checks a guest path: absolute, no NUL, at most 4096 bytes.
pub fn validate_path(path: &str) -> Result<(), BunkerError> {
    if !path.starts_with('/') {
        return Err(BunkerError::InvalidPath(format!(
            "`{path}` is not absolute"
        )));
    }
    if path.contains('\0') {
        return Err(BunkerError::InvalidPath("path contains a NUL byte".into()));
    }
    if path.len() > 4096 {
        return Err(BunkerError::InvalidPath(
            "path is longer than 4096 bytes".into(),
        ));
    }
    Ok(())
}

/// Where an upload goes and what the client declared about it.
pub struct Upload<'a> {
    pub path: &'a str,
    pub mode: u32,
    pub content_length: Option<u64>,
    /// The body is a tar stream unpacked into the directory `path`.
    pub archive: bool,
}

/// Streams an upload into the bunker; the agent writes it atomically.
pub async fn write_file<S>(
    s: &Services,
    p: &Principal,
    ctx: &RequestContext,
    id: &str,
    upload: Upload<'_>,
    body: S,
) -> Result<FileWritten, BunkerError>
where
    S: Stream<Item = Result<Bytes, std::io::Error>> + Send + Sync + 'static,
{
    let Upload {
        path,
        mode,
        content_length,
        archive,
    } = upload;
    if !p.has(auth::FILES) {
        return Err(BunkerError::PermissionDenied(auth::FILES));
    }
    validate_path(path)?;
    let limit = s.config.max_file_bytes;
    if content_length.is_some_and(|n| n > limit) {
        return Err(BunkerError::FileTooLarge { limit });
    }
    let (row, worker_url) = running(s, p, id).await?;
    // Count bytes as they pass; past the limit the stream errors, the worker cancels the
    // upload and the agent removes its temporary file.
    let over = Arc::new(AtomicBool::new(false));
    let over_flag = over.clone();
    let mut seen = 0u64;
    let capped = body.map(move |chunk| {
        let chunk = chunk?;
        seen += chunk.len() as u64;
        if seen > limit {
            over_flag.store(true, Ordering::SeqCst);
            return Err(std::io::Error::other("upload exceeds the file size limit"));
        }
        Ok(chunk)
    });
    let result = s
        .workers
        .write_file(&worker_url, &row.id, path, mode, archive, capped)
        .await;
    if over.load(Ordering::SeqCst) {
        return Err(BunkerError::FileTooLarge { limit });
    }
    let written = result?;
    record_activity(
        s,
        p,
        ctx,
        &row,
        if archive {
            "bunker.file.archive.write"
        } else {
            "bunker.file.write"
        },
        serde_json::json!({"path": path, "size_bytes": written.size_bytes}),
    )
    .await?;
    Ok(FileWritten {
        path: path.to_owned(),
        size_bytes: written.size_bytes,
    })
}

/// The running bunker a file operation targets: checks the permission and the path first.
async fn file_target(
    s: &Services,
    p: &Principal,
    id: &str,
    path: &str,
) -> Result<(BunkerRow, String), BunkerError> {
    if !p.has(auth::FILES) {
        return Err(BunkerError::PermissionDenied(auth::FILES));
    }
    validate_path(path)?;
    running(s, p, id).await
}

/// Starts a download: the worker's response, whose body streams the file.
pub async fn read_file(
    s: &Services,
    p: &Principal,
    ctx: &RequestContext,
    id: &str,
    path: &str,
    archive: bool,
) -> Result<reqwest::Response, BunkerError> {
    let (row, worker_url) = file_target(s, p, id, path).await?;
    let resp = s
        .workers
        .read_file(&worker_url, &row.id, path, archive)
        .await?;
    record_activity(
        s,
        p,
        ctx,
        &row,
        if archive {
            "bunker.file.archive.read"
        } else {
            "bunker.file.read"
        },
        serde_json::json!({"path": path}),
    )
    .await?;
    Ok(resp)
}

pub async fn list_files(
    s: &Services,
    p: &Principal,
    ctx: &RequestContext,
    id: &str,
    path: &str,
) -> Result<Vec<FileEntry>, BunkerError> {
    let (row, worker_url) = file_target(s, p, id, path).await?;
    let entries = s.workers.list_dir(&worker_url, &row.id, path).await?;
    record_activity(
        s,
        p,
        ctx,
        &row,
        "bunker.file.list",
        serde_json::json!({"path": path}),
    )
    .await?;
    Ok(entries
        .into_iter()
        .map(|e| FileEntry {
            name: e.name,
            path: e.path,
            file_type: match e.entry_type {
                wp::EntryType::File => FileType::File,
                wp::EntryType::Dir => FileType::Dir,
                wp::EntryType::Symlink => FileType::Symlink,
                wp::EntryType::Other => FileType::Other,
            },
            size_bytes: e.size_bytes,
            mode: format!("{:04o}", e.mode),
            modified_at: rfc3339(e.modified_unix_s * 1000),
        })
        .collect())
}

pub async fn delete_file(
    s: &Services,
    p: &Principal,
    ctx: &RequestContext,
    id: &str,
    path: &str,
    recursive: bool,
) -> Result<(), BunkerError> {
    let (row, worker_url) = file_target(s, p, id, path).await?;
    s.workers
        .remove_file(&worker_url, &row.id, path, recursive)
        .await?;
    record_activity(
        s,
        p,
        ctx,
        &row,
        "bunker.file.delete",
        serde_json::json!({"path": path, "recursive": recursive}),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_be_absolute_without_nul() {
        assert!(validate_path("/tmp/x").is_ok());
        for bad in ["tmp/x", "", "/a\0b"] {
            assert!(validate_path(bad).is_err(), "{bad:?}");
        }
        assert!(validate_path(&format!("/{}", "a".repeat(5000))).is_err());
    }
}
