//! The local-directory backend (`file:///dir`): one file per object, for one machine.
//!
//! Layout: key `a/b/c` is the file `DIR/a/b/c~`. The `~` suffix, outside the key alphabet,
//! keeps an object file from ever sharing a name with a directory, so `a` and `a/b` can both
//! exist as they can on S3.
//!
//! A put, step by step:
//! 1. Create the parent directories, then a temporary file `.tmp-<random>` beside the target
//!    (key segments never start with `.`, so it cannot collide with a key or be listed).
//! 2. Stream the body into it, hashing and counting; past the cap, or on a body error, delete
//!    it and fail.
//! 3. `fsync` the file, `rename` it over the target (atomic: readers see the old object or the
//!    whole new one; of concurrent writers the last rename wins), then `fsync` the directory.
//!
//! A reader that opened the old file keeps reading the old bytes after a rename or delete.

use std::path::{Path, PathBuf};

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use super::{
    ByteStream, Digesting, KeyPrefix, ObjectEntry, ObjectError, ObjectKey, ObjectMeta, ObjectRead,
    ObjectStore, PutOutcome,
};

const OBJECT_SUFFIX: char = '~';
const TEMP_PREFIX: &str = ".tmp-";

pub struct LocalDir {
    root: PathBuf,
}

impl LocalDir {
    /// Opens (creating) the directory objects are kept in.
    pub fn open(root: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&root)?;
        Ok(Self { root })
    }

    fn path_of(&self, key: &ObjectKey) -> PathBuf {
        let mut p = self.root.join(key.as_str());
        let mut name = p.file_name().unwrap_or_default().to_os_string();
        name.push(OBJECT_SUFFIX.to_string());
        p.set_file_name(name);
        p
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ObjectError {
    let path = path.display().to_string();
    move |source| ObjectError::Io { op, path, source }
}

fn meta_of(m: &std::fs::Metadata) -> ObjectMeta {
    let mtime = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    ObjectMeta {
        size_bytes: m.len(),
        etag: format!("{:x}-{:x}", m.len(), mtime),
    }
}

/// Creates a fresh temporary file in `dir`, creating `dir` first. A concurrent delete may remove
/// an emptied parent between the two steps, so a vanished directory is made again.
async fn create_temp(dir: &Path) -> Result<(tokio::fs::File, PathBuf), ObjectError> {
    let mut attempts = 0;
    loop {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(io_err("creating directory", dir))?;
        let name = format!(
            "{TEMP_PREFIX}{}",
            scaibunker_core::ids::encode_random(crate::service::random_bytes())
        );
        let path = dir.join(name);
        match tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .await
        {
            Ok(f) => return Ok((f, path)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && attempts < 5 => attempts += 1,
            Err(e) => return Err(io_err("creating", &path)(e)),
        }
    }
}

async fn write_body(
    file: &mut tokio::fs::File,
    mut body: ByteStream,
    digest: &mut Digesting,
    path: &Path,
) -> Result<(), ObjectError> {
    while let Some(chunk) = digest.take(body.next().await)? {
        file.write_all(&chunk)
            .await
            .map_err(io_err("writing", path))?;
    }
    file.sync_all().await.map_err(io_err("syncing", path))?;
    Ok(())
}

#[async_trait::async_trait]
impl ObjectStore for LocalDir {
    async fn put(
        &self,
        key: &ObjectKey,
        body: ByteStream,
        max_bytes: u64,
    ) -> Result<PutOutcome, ObjectError> {
        let target = self.path_of(key);
        let dir = target
            .parent()
            .expect("an object path lies inside the root")
            .to_path_buf();
        let (mut file, temp) = create_temp(&dir).await?;
        let mut digest = Digesting::new(key, max_bytes);
        let written = write_body(&mut file, body, &mut digest, &temp).await;
        drop(file);
        if let Err(e) = written {
            let _ = tokio::fs::remove_file(&temp).await;
            return Err(e);
        }
        if let Err(e) = tokio::fs::rename(&temp, &target).await {
            let _ = tokio::fs::remove_file(&temp).await;
            return Err(io_err("renaming into place", &target)(e));
        }
        // The rename is durable once the directory entry is.
        if let Ok(d) = tokio::fs::File::open(&dir).await {
            let _ = d.sync_all().await;
        }
        let meta = tokio::fs::metadata(&target)
            .await
            .map_err(io_err("reading metadata", &target))?;
        let (size_bytes, sha256) = digest.finish();
        Ok(PutOutcome {
            size_bytes,
            sha256,
            etag: meta_of(&meta).etag,
        })
    }

    async fn get(&self, key: &ObjectKey) -> Result<ObjectRead, ObjectError> {
        let path = self.path_of(key);
        let file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ObjectError::NotFound(key.to_string()));
            }
            Err(e) => return Err(io_err("opening", &path)(e)),
        };
        let meta = file
            .metadata()
            .await
            .map_err(io_err("reading metadata", &path))?;
        let body = tokio_util::io::ReaderStream::with_capacity(file, 64 * 1024);
        Ok(ObjectRead {
            meta: meta_of(&meta),
            body: Box::pin(body),
        })
    }

    async fn head(&self, key: &ObjectKey) -> Result<ObjectMeta, ObjectError> {
        let path = self.path_of(key);
        match tokio::fs::metadata(&path).await {
            Ok(m) => Ok(meta_of(&m)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(ObjectError::NotFound(key.to_string()))
            }
            Err(e) => Err(io_err("reading metadata", &path)(e)),
        }
    }

    async fn delete(&self, key: &ObjectKey) -> Result<(), ObjectError> {
        let path = self.path_of(key);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("removing", &path)(e)),
        }
        // Prune directories the delete emptied, up to the root; a directory still in use (or
        // refilled meanwhile) is not empty and stays.
        let mut dir = path.parent().map(Path::to_path_buf);
        while let Some(d) = dir {
            if d == self.root || tokio::fs::remove_dir(&d).await.is_err() {
                break;
            }
            dir = d.parent().map(Path::to_path_buf);
        }
        Ok(())
    }

    async fn list(&self, prefix: &KeyPrefix) -> Result<Vec<ObjectEntry>, ObjectError> {
        let root = self.root.clone();
        let start = root.join(prefix.as_str());
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            walk(&root, &start, &mut out)?;
            out.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(out)
        })
        .await
        .map_err(|e| ObjectError::Io {
            op: "listing",
            path: String::new(),
            source: std::io::Error::other(e),
        })?
    }
}

/// Collects the objects below `dir` (which may not exist) as keys relative to `root`.
fn walk(root: &Path, dir: &Path, out: &mut Vec<ObjectEntry>) -> Result<(), ObjectError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("listing", dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err("listing", dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') {
            continue;
        }
        let file_type = entry.file_type().map_err(io_err("listing", dir))?;
        let path = entry.path();
        if file_type.is_dir() {
            walk(root, &path, out)?;
        } else if file_type.is_file() && name.ends_with(OBJECT_SUFFIX) {
            let Ok(rel) = path.strip_prefix(root) else {
                continue;
            };
            let Some(rel) = rel.to_str() else { continue };
            let size_bytes = entry.metadata().map(|m| m.len()).unwrap_or(0);
            out.push(ObjectEntry {
                key: rel.trim_end_matches(OBJECT_SUFFIX).to_owned(),
                size_bytes,
            });
        }
    }
    Ok(())
}
