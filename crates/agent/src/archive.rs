//! Archive requests: a whole directory in and out as one tar stream.
//!
//! `WriteArchive` (the body is a tar stream) is all or nothing up to its last step:
//! 1. The target directory is created if missing (parents too, mode 0755).
//! 2. Entries are unpacked into a staging directory `.sbtmp-archive-<random>` inside it.
//!    An entry whose path is absolute or climbs with `..`, or that would land outside the
//!    staging directory through a symlink unpacked before it, fails the whole upload with
//!    `INVALID_ARCHIVE`; so does a stream that is not tar.
//! 3. On `END`, the staged tree is moved into place: a name that does not exist yet is
//!    renamed in whole; an existing directory is merged into; an existing file or symlink is
//!    replaced by a rename (atomically, like a file upload). A directory in the archive where
//!    the target has a file (or the reverse) fails with `NOT_A_DIRECTORY`/`IS_A_DIRECTORY`
//!    before anything is moved.
//! 4. On any failure, `CANCEL` or a closed channel, the staging directory is removed (and
//!    the target directory too if step 1 created it): nothing changes.
//!
//! Modes and modification times come from the archive; owners do not (files belong to the
//! agent's user, root). Symlinks are stored and unpacked as symlinks, never followed.
//!
//! `ReadArchive` sends the directory's tree as `DATA` frames of a tar stream (paths relative
//! to it, names in byte order, symlinks as symlinks, devices, FIFOs and sockets skipped),
//! then `Read` with the number of bytes sent. It stays on the directory's filesystem (as
//! `tar --one-file-system`): a mount point below it (`/proc`, `/sys`, `/dev`, a tmpfs) is
//! sent as an empty directory. Before the first byte, every directory and file of the tree
//! is opened as the requesting user, so an unreadable one is an error reply
//! (`FILE_PERMISSION_DENIED` naming it), not a stream cut short.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Component, Path, PathBuf};
use std::sync::mpsc::{Receiver, TryRecvError};

use scaibunker_proto::agent::{AgentErrorCode, FrameKind, GuestUser, MAX_FRAME_PAYLOAD, Reply};

use crate::channel::{StreamInput, StreamTx};
use crate::files::random_u64;
use crate::paths::{GuestPath, PathError};
use crate::{error_reply, io_error_code};

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("invalid path")]
    InvalidPath(#[from] PathError),
    #[error("`{0}` not found")]
    NotFound(String),
    #[error("`{0}` is not a directory")]
    NotADirectory(String),
    #[error("`{0}` is a directory")]
    IsADirectory(String),
    #[error("invalid archive: {0}")]
    Invalid(String),
    #[error("transfer cancelled")]
    Cancelled,
    #[error("the agent channel closed during the transfer")]
    ChannelClosed,
    #[error("{step} `{path}`")]
    Io {
        step: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
}

impl ArchiveError {
    fn io(step: &'static str, path: impl AsRef<Path>) -> impl FnOnce(io::Error) -> Self {
        let path = path.as_ref().display().to_string();
        move |source| Self::Io { step, path, source }
    }

    fn code(&self) -> AgentErrorCode {
        match self {
            Self::InvalidPath(_) => AgentErrorCode::InvalidPath,
            Self::NotFound(_) => AgentErrorCode::FileNotFound,
            Self::NotADirectory(_) => AgentErrorCode::NotADirectory,
            Self::IsADirectory(_) => AgentErrorCode::IsADirectory,
            Self::Invalid(_) => AgentErrorCode::InvalidArchive,
            Self::Cancelled | Self::ChannelClosed => AgentErrorCode::Io,
            Self::Io { source, .. } => io_error_code(source),
        }
    }
}

/// `WriteArchive`: unpacks the tar stream from `input` into the directory `path`.
pub fn write_archive(path: &str, user: GuestUser, input: &Receiver<StreamInput>) -> Reply {
    match try_write_archive(path, user, input) {
        Ok(size_bytes) => Reply::Written { size_bytes },
        Err(e) => error_reply(e.code(), &e),
    }
}

/// The request body as a reader: `DATA` chunks until `END`.
struct Body<'a> {
    input: &'a Receiver<StreamInput>,
    chunk: Vec<u8>,
    at: usize,
    ended: bool,
    total: u64,
    /// Why the stream broke, for the error the reader's caller reports.
    broken: Option<ArchiveError>,
}

impl Read for Body<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.chunk.len() {
            if self.ended {
                return Ok(0);
            }
            match self.input.recv() {
                Ok(StreamInput::Data(chunk)) => {
                    self.total += chunk.len() as u64;
                    self.chunk = chunk;
                    self.at = 0;
                }
                Ok(StreamInput::End) => self.ended = true,
                Ok(StreamInput::Resize(_)) => {}
                Ok(StreamInput::Cancel) => {
                    self.broken = Some(ArchiveError::Cancelled);
                    return Err(io::Error::other("cancelled"));
                }
                Err(_) => {
                    self.broken = Some(ArchiveError::ChannelClosed);
                    return Err(io::Error::other("channel closed"));
                }
            }
        }
        let n = buf.len().min(self.chunk.len() - self.at);
        buf[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// What to undo if the upload does not complete.
struct Cleanup {
    staging: PathBuf,
    created_target: Option<PathBuf>,
    done: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.staging);
        if !self.done
            && let Some(target) = &self.created_target
        {
            let _ = fs::remove_dir(target);
        }
    }
}

fn try_write_archive(
    raw: &str,
    user: GuestUser,
    input: &Receiver<StreamInput>,
) -> Result<u64, ArchiveError> {
    let target = GuestPath::parse(raw)?;
    let created_target = match fs::metadata(&target) {
        Ok(m) if m.is_dir() => None,
        Ok(_) => return Err(ArchiveError::NotADirectory(target.to_string())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(&target)
                .map_err(ArchiveError::io("create directory", &target))?;
            Some(target.as_path().to_path_buf())
        }
        Err(e) => return Err(ArchiveError::io("stat", &target)(e)),
    };
    let staging = target
        .as_path()
        .join(format!(".sbtmp-archive-{:016x}", random_u64()));
    let mut cleanup = Cleanup {
        staging: staging.clone(),
        created_target,
        done: false,
    };
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(ArchiveError::io("create staging directory", &staging))?;

    let mut body = Body {
        input,
        chunk: Vec::new(),
        at: 0,
        ended: false,
        total: 0,
        broken: None,
    };
    let unpacked = unpack(&mut body, &staging, user);
    if let Some(broken) = body.broken.take() {
        return Err(broken);
    }
    unpacked?;
    // Whatever follows the archive's end marker (padding) is read and dropped, so that the
    // upload is complete only at `END`.
    let mut rest = [0u8; 8192];
    loop {
        match body.read(&mut rest) {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) => return Err(body.broken.take().unwrap_or(ArchiveError::ChannelClosed)),
        }
    }
    check_merge(&staging, target.as_path())?;
    merge(&staging, target.as_path())?;
    cleanup.done = true;
    Ok(body.total)
}

fn unpack(body: &mut Body<'_>, staging: &Path, user: GuestUser) -> Result<(), ArchiveError> {
    let mut archive = tar::Archive::new(body);
    archive.set_preserve_permissions(true);
    // Owners are never taken from the archive: members belong to whoever unpacks them.
    archive.set_preserve_ownerships(false);
    if user == GuestUser::User {
        archive.set_mask(0o6000);
    }
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    let entries = archive
        .entries()
        .map_err(|e| ArchiveError::Invalid(e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| ArchiveError::Invalid(e.to_string()))?;
        let path = entry
            .path()
            .map_err(|e| ArchiveError::Invalid(e.to_string()))?
            .into_owned();
        if path.components().any(|c| {
            matches!(
                c,
                Component::ParentDir | Component::RootDir | Component::Prefix(_)
            )
        }) {
            return Err(ArchiveError::Invalid(format!(
                "entry `{}` is absolute or climbs out with `..`",
                path.display()
            )));
        }
        match entry.unpack_in(staging) {
            Ok(true) => {}
            Ok(false) => {
                return Err(ArchiveError::Invalid(format!(
                    "entry `{}` would land outside the directory",
                    path.display()
                )));
            }
            Err(e) => {
                return Err(ArchiveError::Invalid(format!(
                    "entry `{}`: {e}",
                    path.display()
                )));
            }
        }
    }
    Ok(())
}

/// Fails before anything moves if a staged directory meets a non-directory in the target,
/// or a staged non-directory meets a directory.
fn check_merge(from: &Path, to: &Path) -> Result<(), ArchiveError> {
    for entry in fs::read_dir(from).map_err(ArchiveError::io("read directory", from))? {
        let entry = entry.map_err(ArchiveError::io("read directory", from))?;
        let dest = to.join(entry.file_name());
        let staged_dir = entry
            .file_type()
            .map_err(ArchiveError::io("stat", entry.path()))?
            .is_dir();
        match fs::symlink_metadata(&dest) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(ArchiveError::io("stat", &dest)(e)),
            Ok(m) if staged_dir && m.is_dir() => check_merge(&entry.path(), &dest)?,
            Ok(_) if staged_dir => {
                return Err(ArchiveError::NotADirectory(dest.display().to_string()));
            }
            Ok(m) if m.is_dir() => {
                return Err(ArchiveError::IsADirectory(dest.display().to_string()));
            }
            Ok(_) => {}
        }
    }
    Ok(())
}

/// Moves the staged tree into `to` (checked by [`check_merge`]).
fn merge(from: &Path, to: &Path) -> Result<(), ArchiveError> {
    for entry in fs::read_dir(from).map_err(ArchiveError::io("read directory", from))? {
        let entry = entry.map_err(ArchiveError::io("read directory", from))?;
        let dest = to.join(entry.file_name());
        let is_dir = entry
            .file_type()
            .map_err(ArchiveError::io("stat", entry.path()))?
            .is_dir();
        if is_dir && fs::symlink_metadata(&dest).is_ok_and(|m| m.is_dir()) {
            merge(&entry.path(), &dest)?;
        } else {
            fs::rename(entry.path(), &dest).map_err(ArchiveError::io("rename onto", &dest))?;
        }
    }
    Ok(())
}

/// `ReadArchive`: sends the tree under the directory `path` as a tar stream.
pub fn read_archive(path: &str, tx: &StreamTx, input: &Receiver<StreamInput>) -> Reply {
    match try_read_archive(path, tx, input) {
        Ok(size_bytes) => Reply::Read { size_bytes },
        Err(e) => error_reply(e.code(), &e),
    }
}

/// `Write` that sends full `DATA` frames and notices a `CANCEL` between them.
struct Frames<'a> {
    tx: &'a StreamTx,
    input: &'a Receiver<StreamInput>,
    buf: Vec<u8>,
    total: u64,
    broken: Option<ArchiveError>,
}

impl Frames<'_> {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        match self.input.try_recv() {
            Ok(StreamInput::Cancel) => self.broken = Some(ArchiveError::Cancelled),
            Err(TryRecvError::Disconnected) => self.broken = Some(ArchiveError::ChannelClosed),
            Ok(_) | Err(TryRecvError::Empty) => {}
        }
        if self.broken.is_none() && self.tx.send(FrameKind::Data, &self.buf).is_err() {
            self.broken = Some(ArchiveError::ChannelClosed);
        }
        if self.broken.is_some() {
            return Err(io::Error::other("transfer stopped"));
        }
        self.total += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }
}

impl Write for Frames<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(MAX_FRAME_PAYLOAD - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == MAX_FRAME_PAYLOAD {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

fn try_read_archive(
    raw: &str,
    tx: &StreamTx,
    input: &Receiver<StreamInput>,
) -> Result<u64, ArchiveError> {
    let path = GuestPath::parse(raw)?;
    match fs::metadata(&path) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(ArchiveError::NotADirectory(path.to_string())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ArchiveError::NotFound(path.to_string()));
        }
        Err(e) => return Err(ArchiveError::io("stat", &path)(e)),
    }
    let root: &Path = path.as_ref();
    let dev = fs::metadata(root)
        .map_err(ArchiveError::io("stat", root))?
        .dev();
    // Everything the stream will read, opened once before it starts.
    walk(root, Path::new("."), dev, &mut |abs, _, meta| {
        if meta.is_file() {
            fs::File::open(abs).map_err(ArchiveError::io("open", abs))?;
        }
        Ok(())
    })?;
    let frames = Frames {
        tx,
        input,
        buf: Vec::with_capacity(MAX_FRAME_PAYLOAD),
        total: 0,
        broken: None,
    };
    let mut builder = tar::Builder::new(frames);
    builder.follow_symlinks(false);
    let mut append = |abs: &Path, rel: &Path, meta: &fs::Metadata| -> io::Result<()> {
        let t = meta.file_type();
        if t.is_dir() {
            builder.append_dir(rel, abs)
        } else if t.is_file() || t.is_symlink() {
            builder.append_path_with_name(abs, rel)
        } else {
            Ok(())
        }
    };
    let built = append(
        root,
        Path::new("."),
        &fs::metadata(root).map_err(ArchiveError::io("stat", root))?,
    )
    .map_err(ArchiveError::io("archive", root))
    .and_then(|()| {
        walk(root, Path::new("."), dev, &mut |abs, rel, meta| {
            append(abs, rel, meta).map_err(ArchiveError::io("archive", abs))
        })
    });
    let built = match built {
        Ok(()) => builder.finish(),
        Err(ArchiveError::Io { source, .. }) => Err(source),
        Err(other) => return Err(other),
    };
    let mut frames = builder
        .into_inner()
        .map_err(ArchiveError::io("finish the archive of", &path))?;
    if let Some(broken) = frames.broken.take() {
        return Err(broken);
    }
    built.map_err(ArchiveError::io("archive", &path))?;
    frames
        .flush()
        .map_err(|_| frames.broken.take().unwrap_or(ArchiveError::ChannelClosed))?;
    Ok(frames.total)
}

/// Calls `f` with every entry below `dir` (absolute path, path relative to the archive root,
/// metadata not following symlinks), names in byte order, parents before children; does not
/// descend into directories on another filesystem than `dev`.
fn walk(
    dir: &Path,
    rel: &Path,
    dev: u64,
    f: &mut dyn FnMut(&Path, &Path, &fs::Metadata) -> Result<(), ArchiveError>,
) -> Result<(), ArchiveError> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(ArchiveError::io("read directory", dir))? {
        names.push(
            entry
                .map_err(ArchiveError::io("read directory", dir))?
                .file_name(),
        );
    }
    names.sort();
    for name in names {
        let abs = dir.join(&name);
        let rel = rel.join(&name);
        let meta = fs::symlink_metadata(&abs).map_err(ArchiveError::io("stat", &abs))?;
        f(&abs, &rel, &meta)?;
        if meta.is_dir() && meta.dev() == dev {
            walk(&abs, &rel, dev, f)?;
        }
    }
    Ok(())
}
