//! Object storage: the `ObjectStore` trait and its two backends, a local directory
//! (`file:///dir`, the embedded default) and S3 (`s3://bucket`, Garage in production).
//!
//! Bodies move as streams both ways: a put reads its body chunk by chunk (the S3 backend holds
//! at most one multipart part in memory) and a get hands back a stream. Every key is an
//! [`ObjectKey`], validated once, so no backend ever sees `..`, an absolute path or a NUL.
//!
//! Other services reach the store through [`Objects`] (`services.objects()`), which takes plain
//! `&str` keys and validates them.

mod local;
mod s3;

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use sha2::{Digest, Sha256};

pub use local::LocalDir;
pub use s3::{S3, S3Settings};

/// A stream of object bytes.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>>;

/// Longest key, in bytes (S3's own limit).
pub const MAX_KEY_BYTES: usize = 1024;
/// Longest `/`-separated segment of a key, in bytes (a file name on the local backend).
pub const MAX_SEGMENT_BYTES: usize = 200;

/// A validated object key: `/`-separated segments of `A-Z a-z 0-9 . _ - =`, none empty, none
/// starting with `.` (so no `.`, `..` or hidden names), at most [`MAX_KEY_BYTES`] in all and
/// [`MAX_SEGMENT_BYTES`] per segment. No leading or trailing `/`, no `//`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey(String);

/// Why a key (or a key prefix) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("the key is empty")]
    Empty,
    #[error("the key is longer than {MAX_KEY_BYTES} bytes")]
    TooLong,
    #[error("a segment of the key is longer than {MAX_SEGMENT_BYTES} bytes")]
    SegmentTooLong,
    #[error("the key has an empty segment (leading, trailing or doubled `/`)")]
    EmptySegment,
    #[error("a segment of the key starts with `.`")]
    DotSegment,
    #[error("the key has a character outside `A-Z a-z 0-9 . _ - = /`")]
    BadCharacter,
    #[error("a prefix must end with `/`")]
    TrailingSlashMissing,
}

impl ObjectKey {
    pub fn parse(key: &str) -> Result<Self, KeyError> {
        if key.is_empty() {
            return Err(KeyError::Empty);
        }
        if key.len() > MAX_KEY_BYTES {
            return Err(KeyError::TooLong);
        }
        for segment in key.split('/') {
            check_segment(segment)?;
        }
        Ok(Self(key.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this key lies under `prefix`, a validated [`KeyPrefix`].
    pub fn is_under(&self, prefix: &KeyPrefix) -> bool {
        self.0.starts_with(prefix.as_str())
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn check_segment(segment: &str) -> Result<(), KeyError> {
    if segment.is_empty() {
        return Err(KeyError::EmptySegment);
    }
    if segment.len() > MAX_SEGMENT_BYTES {
        return Err(KeyError::SegmentTooLong);
    }
    if segment.starts_with('.') {
        return Err(KeyError::DotSegment);
    }
    if !segment
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'='))
    {
        return Err(KeyError::BadCharacter);
    }
    Ok(())
}

/// A directory-like key prefix: valid key segments each followed by `/` (`images/`,
/// `tenants/tnt_1/exec/`). Ending in `/` is what makes prefix matching safe: `images/ab/` never
/// covers `images/abc/x`. The empty prefix covers every key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPrefix(String);

impl KeyPrefix {
    pub fn parse(prefix: &str) -> Result<Self, KeyError> {
        if prefix.is_empty() {
            return Ok(Self(String::new()));
        }
        // Without the trailing `/` a prefix would cover siblings sharing its start.
        let body = prefix
            .strip_suffix('/')
            .ok_or(KeyError::TrailingSlashMissing)?;
        ObjectKey::parse(body)?;
        Ok(Self(prefix.to_owned()))
    }

    pub fn all() -> Self {
        Self(String::new())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What a store knows of a stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub size_bytes: u64,
    /// Opaque version tag, unquoted: S3's ETag; on the local backend size and modification time.
    pub etag: String,
}

/// The result of a put: what was stored, with the SHA-256 of the bytes as they streamed in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutOutcome {
    pub size_bytes: u64,
    /// Lowercase hex.
    pub sha256: String,
    pub etag: String,
}

/// One object in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectEntry {
    pub key: String,
    pub size_bytes: u64,
}

/// An object being read: its metadata and its bytes.
pub struct ObjectRead {
    pub meta: ObjectMeta,
    pub body: ByteStream,
}

#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("invalid object key {key:?}")]
    InvalidKey {
        key: String,
        #[source]
        source: KeyError,
    },
    #[error("no object {0}")]
    NotFound(String),
    #[error("object {key} exceeds {max_bytes} bytes")]
    TooLarge { key: String, max_bytes: u64 },
    #[error("reading the body of {key}")]
    Body {
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error("local object store: {op} {path}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("s3: {op} {key}")]
    S3 {
        op: &'static str,
        key: String,
        #[source]
        source: s3::S3Error,
    },
}

/// A place objects live. Two implementations: [`LocalDir`] and [`S3`].
#[async_trait::async_trait]
pub trait ObjectStore: Send + Sync {
    /// Stores `body` under `key`, all or nothing: readers see the old object or the whole new
    /// one, never a part; a body longer than `max_bytes` stores nothing and is
    /// [`ObjectError::TooLarge`].
    async fn put(
        &self,
        key: &ObjectKey,
        body: ByteStream,
        max_bytes: u64,
    ) -> Result<PutOutcome, ObjectError>;
    /// The object's metadata and a stream of its bytes, or [`ObjectError::NotFound`].
    async fn get(&self, key: &ObjectKey) -> Result<ObjectRead, ObjectError>;
    /// The object's metadata, or [`ObjectError::NotFound`].
    async fn head(&self, key: &ObjectKey) -> Result<ObjectMeta, ObjectError>;
    /// Removes the object; removing a missing object succeeds (S3 semantics).
    async fn delete(&self, key: &ObjectKey) -> Result<(), ObjectError>;
    /// Every object whose key starts with `prefix`, sorted by key.
    async fn list(&self, prefix: &KeyPrefix) -> Result<Vec<ObjectEntry>, ObjectError>;
}

/// Where the controller keeps objects: a cheap-to-clone handle over the configured backend.
#[derive(Clone)]
pub struct Objects(Arc<dyn ObjectStore>);

impl std::fmt::Debug for Objects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Objects")
    }
}

/// Why the configured object store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("SCAIBUNKER_OBJECT_STORE {0:?} is neither file:///dir nor s3://bucket")]
    Scheme(String),
    #[error("SCAIBUNKER_OBJECT_STORE {0:?} must name an absolute directory (file:///dir)")]
    RelativeDir(String),
    #[error("creating the object directory {path}")]
    Dir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("s3 object store")]
    S3(#[from] s3::S3ConfigError),
}

fn invalid(key: &str, source: KeyError) -> ObjectError {
    ObjectError::InvalidKey {
        key: key.to_owned(),
        source,
    }
}

impl Objects {
    pub fn new(store: Arc<dyn ObjectStore>) -> Self {
        Self(store)
    }

    /// Opens `file:///dir` or `s3://bucket` (with `s3` settings).
    pub fn open(url: &str, s3: &S3Settings) -> Result<Self, OpenError> {
        if let Some(dir) = url.strip_prefix("file://") {
            if !dir.starts_with('/') {
                return Err(OpenError::RelativeDir(url.to_owned()));
            }
            let store = LocalDir::open(dir.into()).map_err(|source| OpenError::Dir {
                path: dir.to_owned(),
                source,
            })?;
            return Ok(Self::new(Arc::new(store)));
        }
        if let Some(bucket) = url.strip_prefix("s3://") {
            let bucket = bucket.trim_end_matches('/');
            return Ok(Self::new(Arc::new(S3::new(bucket, s3)?)));
        }
        Err(OpenError::Scheme(url.to_owned()))
    }

    /// Streams `body` into `key`, refusing more than `max_bytes`.
    pub async fn put_stream<S>(
        &self,
        key: &str,
        body: S,
        max_bytes: u64,
    ) -> Result<PutOutcome, ObjectError>
    where
        S: Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
    {
        let key = ObjectKey::parse(key).map_err(|e| invalid(key, e))?;
        self.0.put(&key, body.boxed(), max_bytes).await
    }

    /// Stores a small in-memory value.
    pub async fn put_bytes(&self, key: &str, bytes: Bytes) -> Result<PutOutcome, ObjectError> {
        let len = bytes.len() as u64;
        self.put_stream(key, futures_util::stream::iter([Ok(bytes)]), len)
            .await
    }

    /// The object's metadata and a stream of its bytes.
    pub async fn get_stream(&self, key: &str) -> Result<ObjectRead, ObjectError> {
        let key = ObjectKey::parse(key).map_err(|e| invalid(key, e))?;
        self.0.get(&key).await
    }

    pub async fn head(&self, key: &str) -> Result<ObjectMeta, ObjectError> {
        let key = ObjectKey::parse(key).map_err(|e| invalid(key, e))?;
        self.0.head(&key).await
    }

    pub async fn delete(&self, key: &str) -> Result<(), ObjectError> {
        let key = ObjectKey::parse(key).map_err(|e| invalid(key, e))?;
        self.0.delete(&key).await
    }

    /// Every object under `prefix` (`""` for all, else ending in `/`), sorted by key.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectEntry>, ObjectError> {
        let prefix = KeyPrefix::parse(prefix).map_err(|e| invalid(prefix, e))?;
        self.0.list(&prefix).await
    }

    /// The backend, for callers holding an already validated key.
    pub fn store(&self) -> &dyn ObjectStore {
        self.0.as_ref()
    }
}

/// Counts and hashes a body as it streams, enforcing the size cap.
pub(crate) struct Digesting {
    key: String,
    max_bytes: u64,
    size: u64,
    hash: Sha256,
}

impl Digesting {
    pub(crate) fn new(key: &ObjectKey, max_bytes: u64) -> Self {
        Self {
            key: key.as_str().to_owned(),
            max_bytes,
            size: 0,
            hash: Sha256::new(),
        }
    }

    /// Takes the next chunk of the body; an error ends the put.
    pub(crate) fn take(
        &mut self,
        chunk: Option<Result<Bytes, std::io::Error>>,
    ) -> Result<Option<Bytes>, ObjectError> {
        match chunk {
            None => Ok(None),
            Some(Err(source)) => Err(ObjectError::Body {
                key: self.key.clone(),
                source,
            }),
            Some(Ok(bytes)) => {
                self.size += bytes.len() as u64;
                if self.size > self.max_bytes {
                    return Err(ObjectError::TooLarge {
                        key: self.key.clone(),
                        max_bytes: self.max_bytes,
                    });
                }
                self.hash.update(&bytes);
                Ok(Some(bytes))
            }
        }
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    pub(crate) fn finish(self) -> (u64, String) {
        (self.size, hex::encode(self.hash.finalize()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_validated() {
        let ok = [
            "a",
            "images/0123abcd",
            "tenants/tnt_1/exec/exe_2/stdout",
            "snap-1.qcow2",
            "date=2026-11-28/x",
        ];
        for k in ok {
            assert!(ObjectKey::parse(k).is_ok(), "{k}");
        }
        let long_segment = "a".repeat(MAX_SEGMENT_BYTES + 1);
        let long_key = vec!["a".repeat(100); 11].join("/");
        let bad: [(&str, KeyError); 13] = [
            ("", KeyError::Empty),
            ("/abs", KeyError::EmptySegment),
            ("a/", KeyError::EmptySegment),
            ("a//b", KeyError::EmptySegment),
            ("..", KeyError::DotSegment),
            ("a/../b", KeyError::DotSegment),
            ("a/./b", KeyError::DotSegment),
            (".hidden", KeyError::DotSegment),
            ("a\0b", KeyError::BadCharacter),
            ("a b", KeyError::BadCharacter),
            ("a\\b", KeyError::BadCharacter),
            (&long_segment, KeyError::SegmentTooLong),
            (&long_key, KeyError::TooLong),
        ];
        for (k, e) in bad {
            assert_eq!(ObjectKey::parse(k), Err(e), "{k:?}");
        }
    }

    #[test]
    fn prefixes_end_in_a_slash_and_match_on_segment_boundaries() {
        assert_eq!(
            KeyPrefix::parse("images/ab"),
            Err(KeyError::TrailingSlashMissing)
        );
        assert_eq!(KeyPrefix::parse("../"), Err(KeyError::DotSegment));
        assert_eq!(KeyPrefix::parse("/"), Err(KeyError::Empty));
        let p = KeyPrefix::parse("images/ab/").expect("valid");
        let under = |k: &str| ObjectKey::parse(k).expect("valid").is_under(&p);
        assert!(under("images/ab/x"));
        assert!(under("images/ab/x/y"));
        assert!(!under("images/abc/x"));
        assert!(!under("images/ab"));
        assert!(!under("other/images/ab/x"));
        assert!(under_all("anything/at/all"));
    }

    fn under_all(k: &str) -> bool {
        ObjectKey::parse(k)
            .expect("valid")
            .is_under(&KeyPrefix::all())
    }
}
