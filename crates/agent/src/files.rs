//! File requests: write (atomic upload), read (download), list a directory, remove.
//!
//! Invariants:
//! - Every path goes through [`GuestPath::parse`] first; a bad one is `INVALID_PATH`.
//! - An upload never leaves a partial file under the target name:
//!   1. parent directories are created (mode 0755);
//!   2. `DATA` frames are written to `.<name>.sbtmp-<random>` in the target's directory;
//!   3. on `END` the temporary file gets `mode`, is fsynced and renamed over the target,
//!      then the directory is fsynced;
//!   4. on `CANCEL`, a closed channel or any error the temporary file is removed.
//! - Reads follow symlinks (like `cat`); listings and removals do not follow the entries
//!   they report or remove (like `ls -l` and `rm`); an upload whose target is a symlink
//!   replaces the symlink (the rename does not write through it).
//! - A request runs as the user it names ([`crate::creds`]): files are created by that user,
//!   and the guest user's uploads never carry setuid or setgid bits.
//! - A listing is paged by name (bytewise) and streamed as JSON lines in `DATA` frames, so
//!   no directory is too big for the channel; each page reads the names once and stats
//!   only its own entries.

use std::collections::hash_map::RandomState;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{SystemTime, UNIX_EPOCH};

use scaibunker_proto::agent::{
    AgentErrorCode, DirEntry, EntryType, FrameKind, GuestUser, MAX_FRAME_PAYLOAD, MAX_LIST_LIMIT,
    Reply,
};

use crate::channel::{StreamClosed, StreamInput, StreamTx};
use crate::paths::{GuestPath, PathError};
use crate::{creds, error_reply, io_error_code};

/// Why a file request failed.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("invalid path")]
    InvalidPath(#[from] PathError),
    #[error("`{0}` not found")]
    NotFound(String),
    #[error("`{0}` is a directory")]
    IsADirectory(String),
    #[error("`{0}` is not a directory")]
    NotADirectory(String),
    #[error("directory `{0}` is not empty")]
    DirectoryNotEmpty(String),
    #[error("`{0}` is not a regular file")]
    NotRegular(String),
    #[error("refusing to remove `/`")]
    RemoveRoot,
    #[error("the listing cursor is malformed")]
    BadCursor,
    #[error("transfer of `{0}` cancelled")]
    Cancelled(String),
    #[error("the agent channel closed during the transfer of `{0}`")]
    ChannelClosed(String),
    #[error("{step} `{path}`")]
    Io {
        step: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
}

impl FileError {
    fn io(step: &'static str, path: impl AsRef<Path>) -> impl FnOnce(io::Error) -> Self {
        let path = path.as_ref().display().to_string();
        move |source| Self::Io { step, path, source }
    }

    pub fn code(&self) -> AgentErrorCode {
        match self {
            Self::InvalidPath(_) | Self::RemoveRoot => AgentErrorCode::InvalidPath,
            Self::BadCursor => AgentErrorCode::BadRequest,
            Self::NotFound(_) => AgentErrorCode::FileNotFound,
            Self::IsADirectory(_) => AgentErrorCode::IsADirectory,
            Self::NotADirectory(_) => AgentErrorCode::NotADirectory,
            Self::DirectoryNotEmpty(_) => AgentErrorCode::DirectoryNotEmpty,
            Self::NotRegular(_) | Self::Cancelled(_) | Self::ChannelClosed(_) => AgentErrorCode::Io,
            Self::Io { source, .. } => io_error_code(source),
        }
    }

    fn into_reply(self) -> Reply {
        error_reply(self.code(), &self)
    }
}

/// Maps a `NotFound` from the first look at `path` to [`FileError::NotFound`].
fn look(step: &'static str, path: &GuestPath) -> impl FnOnce(io::Error) -> FileError {
    let path = path.to_string();
    move |source| {
        if source.kind() == io::ErrorKind::NotFound {
            FileError::NotFound(path)
        } else {
            FileError::Io { step, path, source }
        }
    }
}

/// `WriteFile`: receives the body from `input` and installs it atomically at `path`.
pub fn write_file(path: &str, mode: u32, user: GuestUser, input: &Receiver<StreamInput>) -> Reply {
    match try_write_file(path, creds::allowed_mode(user, mode), input) {
        Ok(size_bytes) => Reply::Written { size_bytes },
        Err(e) => e.into_reply(),
    }
}

fn try_write_file(raw: &str, mode: u32, input: &Receiver<StreamInput>) -> Result<u64, FileError> {
    let path = GuestPath::parse(raw)?;
    let (Some(name), Some(parent)) = (path.file_name(), path.parent()) else {
        return Err(FileError::IsADirectory(path.to_string()));
    };
    if fs::metadata(&path).is_ok_and(|m| m.is_dir()) {
        return Err(FileError::IsADirectory(path.to_string()));
    }
    if let Err(e) = fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&parent)
    {
        // std reports "already exists" when the parent is a file.
        if fs::metadata(&parent).is_ok_and(|m| !m.is_dir()) {
            return Err(FileError::NotADirectory(parent.to_string()));
        }
        return Err(FileError::io("create parent directories", &parent)(e));
    }
    let mut tmp = TempFile::create(parent.as_path(), name)?;
    let mut size_bytes = 0u64;
    loop {
        match input.recv() {
            Ok(StreamInput::Data(chunk)) => {
                tmp.file
                    .write_all(&chunk)
                    .map_err(FileError::io("write", &tmp.path))?;
                size_bytes += chunk.len() as u64;
            }
            Ok(StreamInput::End) => break,
            Ok(StreamInput::Cancel) => return Err(FileError::Cancelled(path.to_string())),
            // Only terminals have a size.
            Ok(StreamInput::Resize(_)) => {}
            Err(_) => return Err(FileError::ChannelClosed(path.to_string())),
        }
    }
    tmp.file
        .set_permissions(fs::Permissions::from_mode(mode & 0o7777))
        .map_err(FileError::io("set the mode of", &tmp.path))?;
    tmp.file
        .sync_all()
        .map_err(FileError::io("fsync", &tmp.path))?;
    fs::rename(&tmp.path, &path).map_err(FileError::io("rename onto", &path))?;
    tmp.installed = true;
    // The rename is durable only once the directory is; failing that is not worth
    // failing an upload whose data is already in place.
    if let Ok(dir) = File::open(&parent) {
        let _ = dir.sync_all();
    }
    Ok(size_bytes)
}

/// A temporary upload file, removed on drop unless it was renamed into place.
struct TempFile {
    path: PathBuf,
    file: File,
    installed: bool,
}

impl TempFile {
    /// Longest prefix of the target name kept in the temporary name, so that the
    /// temporary name stays within `NAME_MAX` (255).
    const MAX_NAME_PREFIX: usize = 200;

    fn create(dir: &Path, name: &str) -> Result<Self, FileError> {
        let mut cut = name.len().min(Self::MAX_NAME_PREFIX);
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        let mut attempt = 0;
        loop {
            let path = dir.join(format!(".{}.sbtmp-{:016x}", &name[..cut], random_u64()));
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(file) => {
                    return Ok(Self {
                        path,
                        file,
                        installed: false,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 8 => {
                    attempt += 1;
                }
                Err(e) => return Err(FileError::io("create temporary file", &path)(e)),
            }
        }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.installed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// A value that differs between calls and between processes: std's per-process random
/// hash keys over a counter and the clock. Temporary names need uniqueness, not secrecy,
/// and this never blocks on the early-boot entropy pool.
pub(crate) fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// `ReadFile`: sends the content of `path` as `DATA` frames.
pub fn read_file(path: &str, tx: &StreamTx, input: &Receiver<StreamInput>) -> Reply {
    match try_read_file(path, tx, input) {
        Ok(size_bytes) => Reply::Read { size_bytes },
        Err(e) => e.into_reply(),
    }
}

fn try_read_file(
    raw: &str,
    tx: &StreamTx,
    input: &Receiver<StreamInput>,
) -> Result<u64, FileError> {
    let path = GuestPath::parse(raw)?;
    let meta = fs::metadata(&path).map_err(look("stat", &path))?;
    if meta.is_dir() {
        return Err(FileError::IsADirectory(path.to_string()));
    }
    // Opening a FIFO would block this handler until a writer appears.
    let ft = meta.file_type();
    if std::os::unix::fs::FileTypeExt::is_fifo(&ft)
        || std::os::unix::fs::FileTypeExt::is_socket(&ft)
    {
        return Err(FileError::NotRegular(path.to_string()));
    }
    let mut file = File::open(&path).map_err(look("open", &path))?;
    let mut buf = vec![0u8; MAX_FRAME_PAYLOAD];
    let mut size_bytes = 0u64;
    loop {
        match input.try_recv() {
            Ok(StreamInput::Cancel) => return Err(FileError::Cancelled(path.to_string())),
            Ok(_) | Err(TryRecvError::Empty) => {}
            Err(TryRecvError::Disconnected) => {
                return Err(FileError::ChannelClosed(path.to_string()));
            }
        }
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(FileError::io("read", &path)(e)),
        };
        tx.send(FrameKind::Data, &buf[..n])
            .map_err(|_| FileError::ChannelClosed(path.to_string()))?;
        size_bytes += n as u64;
    }
    Ok(size_bytes)
}

/// `ListDir`: one page of the entries of `path`, sorted by name, as JSON lines in `DATA`
/// frames.
pub fn list_dir(path: &str, after_hex: Option<&str>, limit: u32, tx: &StreamTx) -> Reply {
    match try_list_dir(path, after_hex, limit, tx) {
        Ok((has_more, next_after_hex)) => Reply::Listing {
            has_more,
            next_after_hex,
        },
        Err(e) => e.into_reply(),
    }
}

fn try_list_dir(
    raw: &str,
    after_hex: Option<&str>,
    limit: u32,
    tx: &StreamTx,
) -> Result<(bool, Option<String>), FileError> {
    let path = GuestPath::parse(raw)?;
    let after = match after_hex {
        Some(h) => Some(decode_hex(h).ok_or(FileError::BadCursor)?),
        None => None,
    };
    let meta = fs::metadata(&path).map_err(look("stat", &path))?;
    if !meta.is_dir() {
        return Err(FileError::NotADirectory(path.to_string()));
    }
    let mut names = Vec::new();
    for entry in fs::read_dir(&path).map_err(FileError::io("read directory", &path))? {
        let entry = entry.map_err(FileError::io("read directory", &path))?;
        names.push(entry.file_name().into_vec());
    }
    names.sort_unstable();
    let start = after.map_or(0, |a| names.partition_point(|n| *n <= a));
    let limit = usize::try_from(limit.clamp(1, MAX_LIST_LIMIT)).unwrap_or(1);
    let end = names.len().min(start.saturating_add(limit));
    let mut lines = LineFrames::new(tx);
    for raw_name in &names[start..end] {
        // Names that are not UTF-8 cannot travel in JSON unchanged.
        let name = String::from_utf8_lossy(raw_name).into_owned();
        let full = path.join(&name);
        let m = match fs::symlink_metadata(path.as_path().join(OsStr::from_bytes(raw_name))) {
            Ok(m) => m,
            // Removed between readdir and lstat: it is no longer an entry.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(FileError::io("stat", &full)(e)),
        };
        let ft = m.file_type();
        let entry_type = if ft.is_symlink() {
            EntryType::Symlink
        } else if ft.is_dir() {
            EntryType::Dir
        } else if ft.is_file() {
            EntryType::File
        } else {
            EntryType::Other
        };
        lines
            .push(&DirEntry {
                name,
                path: full,
                entry_type,
                size_bytes: m.len(),
                mode: m.mode() & 0o7777,
                modified_unix_s: m.mtime(),
            })
            .map_err(|_| FileError::ChannelClosed(path.to_string()))?;
    }
    lines
        .flush()
        .map_err(|_| FileError::ChannelClosed(path.to_string()))?;
    let has_more = end < names.len();
    let next = has_more.then(|| encode_hex(&names[end - 1]));
    Ok((has_more, next))
}

/// JSON lines packed into as few `DATA` frames as fit; a line never spans two frames.
struct LineFrames<'a> {
    tx: &'a StreamTx,
    buf: Vec<u8>,
}

impl<'a> LineFrames<'a> {
    fn new(tx: &'a StreamTx) -> Self {
        Self {
            tx,
            buf: Vec::with_capacity(MAX_FRAME_PAYLOAD),
        }
    }

    fn push(&mut self, entry: &DirEntry) -> Result<(), StreamClosed> {
        let mut line = serde_json::to_vec(entry).expect("a directory entry always serialises");
        line.push(b'\n');
        // One entry is at most a 4 KiB path and a 255-byte name, escaped: far below a frame.
        if self.buf.len() + line.len() > MAX_FRAME_PAYLOAD {
            self.flush()?;
        }
        self.buf.extend_from_slice(&line);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamClosed> {
        if !self.buf.is_empty() {
            self.tx.send(FrameKind::Data, &self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }
}

fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// `Remove`: a file or symlink, an empty directory, or with `recursive` a whole tree.
pub fn remove(path: &str, recursive: bool) -> Reply {
    match try_remove(path, recursive) {
        Ok(()) => Reply::Removed,
        Err(e) => e.into_reply(),
    }
}

fn try_remove(raw: &str, recursive: bool) -> Result<(), FileError> {
    let path = GuestPath::parse(raw)?;
    if path.is_root() {
        return Err(FileError::RemoveRoot);
    }
    let meta = fs::symlink_metadata(&path).map_err(look("stat", &path))?;
    if !meta.is_dir() {
        return fs::remove_file(&path).map_err(FileError::io("remove", &path));
    }
    if recursive {
        return fs::remove_dir_all(&path).map_err(FileError::io("remove", &path));
    }
    fs::remove_dir(&path).map_err(|e| {
        if e.kind() == io::ErrorKind::DirectoryNotEmpty {
            FileError::DirectoryNotEmpty(path.to_string())
        } else {
            FileError::io("remove", &path)(e)
        }
    })
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    #[test]
    fn temp_names_differ() {
        assert_ne!(random_u64(), random_u64());
    }

    #[test]
    fn upload_without_end_leaves_nothing_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("f.txt");
        let (tx, rx) = mpsc::channel();
        tx.send(StreamInput::Data(b"partial".to_vec()))
            .expect("send");
        drop(tx);
        let reply = write_file(target.to_str().expect("utf-8"), 0o644, GuestUser::Root, &rx);
        assert!(matches!(
            reply,
            Reply::Error {
                code: AgentErrorCode::Io,
                ..
            }
        ));
        assert_eq!(fs::read_dir(dir.path()).expect("readdir").count(), 0);
    }

    #[test]
    fn upload_onto_a_directory_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_tx, rx) = mpsc::channel();
        let reply = write_file(
            dir.path().to_str().expect("utf-8"),
            0o644,
            GuestUser::Root,
            &rx,
        );
        assert!(matches!(
            reply,
            Reply::Error {
                code: AgentErrorCode::IsADirectory,
                ..
            }
        ));
    }

    #[test]
    fn refuses_to_remove_root() {
        assert!(matches!(
            remove("/tmp/..", true),
            Reply::Error {
                code: AgentErrorCode::InvalidPath,
                ..
            }
        ));
    }
}
