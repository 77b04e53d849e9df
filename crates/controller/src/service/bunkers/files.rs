//! Files in a bunker: path checks, uploads (single files and tar archives), downloads,
//! listings and removals, each through the bunker's worker and recorded as activity.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use scaibunker_api::exec::ExecUser;
use scaibunker_api::files::{FileEntry, FileType, FileWritten};
use scaibunker_proto::worker as wp;

use super::{BunkerError, record_activity, rfc3339, running};
use crate::service::auth::{self, Principal};
use crate::service::{RequestContext, Services};
use crate::store::bunkers::BunkerRow;
use crate::workers::UploadTo;

/// Checks a guest path: absolute, no NUL, at most 4096 bytes, no name over 255 bytes (the
/// guest kernel's `NAME_MAX`).
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
    if path.split('/').any(|name| name.len() > 255) {
        return Err(BunkerError::InvalidPath(
            "a name in the path is longer than 255 bytes".into(),
        ));
    }
    Ok(())
}

/// Who a file operation acts as in the guest: the guest user, or root for a caller that
/// holds `scaibunker:root` and asks for it (the same rule as exec).
fn guest_user(p: &Principal, user: Option<ExecUser>) -> Result<wp::GuestUser, BunkerError> {
    match user.unwrap_or_default() {
        ExecUser::User => Ok(wp::GuestUser::User),
        ExecUser::Root if p.has(auth::ROOT) => Ok(wp::GuestUser::Root),
        ExecUser::Root => Err(BunkerError::PermissionDenied(auth::ROOT)),
    }
}

/// Where an upload goes and what the client declared about it.
pub struct Upload<'a> {
    pub path: &'a str,
    pub mode: u32,
    pub user: Option<ExecUser>,
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
        user,
        content_length,
        archive,
    } = upload;
    if !p.has(auth::FILES) {
        return Err(BunkerError::PermissionDenied(auth::FILES));
    }
    let user = guest_user(p, user)?;
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
        .write_file(
            &worker_url,
            &row.id,
            UploadTo {
                path,
                mode,
                user,
                archive,
            },
            capped,
        )
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
        serde_json::json!({"path": path, "size_bytes": written.size_bytes, "user": user}),
    )
    .await?;
    Ok(FileWritten {
        path: path.to_owned(),
        size_bytes: written.size_bytes,
    })
}

/// The running bunker a file operation targets and who acts in it: checks the permissions
/// and the path first.
async fn file_target(
    s: &Services,
    p: &Principal,
    id: &str,
    path: &str,
    user: Option<ExecUser>,
) -> Result<(BunkerRow, crate::workers::WorkerTarget, wp::GuestUser), BunkerError> {
    if !p.has(auth::FILES) {
        return Err(BunkerError::PermissionDenied(auth::FILES));
    }
    let user = guest_user(p, user)?;
    validate_path(path)?;
    let (row, worker_url) = running(s, p, id).await?;
    Ok((row, worker_url, user))
}

/// Starts a download: the worker's response, whose body streams the file.
pub async fn read_file(
    s: &Services,
    p: &Principal,
    ctx: &RequestContext,
    id: &str,
    path: &str,
    user: Option<ExecUser>,
    archive: bool,
) -> Result<reqwest::Response, BunkerError> {
    let (row, worker_url, user) = file_target(s, p, id, path, user).await?;
    let resp = s
        .workers
        .read_file(&worker_url, &row.id, path, user, archive)
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
        serde_json::json!({"path": path, "user": user}),
    )
    .await?;
    Ok(resp)
}

/// Where a listing page starts and how long it is.
pub struct ListPage<'a> {
    pub limit: u32,
    pub cursor: Option<&'a str>,
}

/// One page of a directory, sorted by name: the entries and where the next page starts.
pub async fn list_files(
    s: &Services,
    p: &Principal,
    ctx: &RequestContext,
    id: &str,
    path: &str,
    user: Option<ExecUser>,
    page: ListPage<'_>,
) -> Result<(Vec<FileEntry>, Option<String>), BunkerError> {
    let (row, worker_url, user) = file_target(s, p, id, path, user).await?;
    let listing = s
        .workers
        .list_dir(&worker_url, &row.id, path, user, page.limit, page.cursor)
        .await?;
    record_activity(
        s,
        p,
        ctx,
        &row,
        "bunker.file.list",
        serde_json::json!({"path": path, "user": user}),
    )
    .await?;
    let entries = listing
        .entries
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
            modified_at: rfc3339(e.modified_unix_s.saturating_mul(1000)),
        })
        .collect();
    Ok((entries, listing.next_cursor))
}

pub async fn delete_file(
    s: &Services,
    p: &Principal,
    ctx: &RequestContext,
    id: &str,
    path: &str,
    recursive: bool,
    user: Option<ExecUser>,
) -> Result<(), BunkerError> {
    let (row, worker_url, user) = file_target(s, p, id, path, user).await?;
    s.workers
        .remove_file(&worker_url, &row.id, path, recursive, user)
        .await?;
    record_activity(
        s,
        p,
        ctx,
        &row,
        "bunker.file.delete",
        serde_json::json!({"path": path, "recursive": recursive, "user": user}),
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
