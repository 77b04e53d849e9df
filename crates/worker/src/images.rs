//! The local image cache: the guest kernel, the initramfs and the ext4 root images in one
//! directory.
//!
//! - `vmlinux` and `initramfs.cpio.gz` boot every image; `<name>.ext4` is the image `<name>`.
//! - Each image is known by the SHA-256 of its bytes. Hashing a 1 GiB image takes seconds,
//!   so the digest is kept beside it in `<name>.ext4.sha256` as `<hex> <size> <mtime_ns>`
//!   and reused while size and mtime are unchanged.
//! - Images are read-only to the worker: bunkers boot from copy-on-write overlays.
//! - Images pulled from peers or the storage proxy live apart, in `<data>/images/`
//!   ([`crate::pulls`]), known by digest only.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use scaibunker_proto::worker::CachedImage;
use sha2::{Digest, Sha256};

/// File name of the guest kernel inside the images directory.
pub const KERNEL_FILE: &str = "vmlinux";
/// File name of the initramfs inside the images directory.
pub const INITRAMFS_FILE: &str = "initramfs.cpio.gz";
const IMAGE_SUFFIX: &str = ".ext4";
const DIGEST_SUFFIX: &str = ".sha256";

/// One root filesystem image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub name: String,
    /// Lowercase hex.
    pub sha256: String,
    pub size_bytes: u64,
    /// Absolute path of the `.ext4` file.
    pub path: PathBuf,
}

/// The kernel and initramfs every image boots with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestBoot {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

/// The scanned contents of the images directory.
#[derive(Debug, Clone, Default)]
pub struct ImageCache {
    dir: PathBuf,
    boot: Option<GuestBoot>,
    /// By name.
    images: BTreeMap<String, Image>,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageScanError {
    #[error("read images directory {}", dir.display())]
    ReadDir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("hash image {}", path.display())]
    Hash {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl ImageCache {
    /// Scans `dir`, hashing every image whose digest file is missing or stale. Blocking.
    /// A missing directory is an empty cache, so a worker can start before images exist.
    pub fn scan(dir: &Path) -> Result<Self, ImageScanError> {
        let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_owned());
        let mut cache = Self {
            dir: dir.clone(),
            boot: None,
            images: BTreeMap::new(),
        };
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::warn!(dir = %dir.display(), "images directory does not exist");
                return Ok(cache);
            }
            Err(source) => return Err(ImageScanError::ReadDir { dir, source }),
        };
        for entry in entries {
            let entry = entry.map_err(|source| ImageScanError::ReadDir {
                dir: dir.clone(),
                source,
            })?;
            let file_name = entry.file_name();
            let Some(name) = file_name
                .to_str()
                .and_then(|n| n.strip_suffix(IMAGE_SUFFIX))
            else {
                continue;
            };
            if name.is_empty() {
                continue;
            }
            let path = entry.path();
            let image = hash_image(name, &path)?;
            tracing::debug!(name, sha256 = %image.sha256, "image cached");
            cache.images.insert(name.to_owned(), image);
        }
        let kernel = dir.join(KERNEL_FILE);
        let initramfs = dir.join(INITRAMFS_FILE);
        if kernel.is_file() && initramfs.is_file() {
            cache.boot = Some(GuestBoot { kernel, initramfs });
        } else {
            tracing::warn!(
                dir = %dir.display(),
                "no {KERNEL_FILE} and {INITRAMFS_FILE} in the images directory: no image can boot"
            );
        }
        Ok(cache)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The guest kernel and initramfs, if both are present.
    pub fn boot(&self) -> Option<&GuestBoot> {
        self.boot.as_ref()
    }

    /// Finds an image by SHA-256 (hex, any case) or, failing that, by name.
    pub fn lookup(&self, key: &str) -> Option<&Image> {
        self.images
            .values()
            .find(|i| i.sha256.eq_ignore_ascii_case(key))
            .or_else(|| self.images.get(key))
    }

    /// Finds an image by its SHA-256 alone (lowercase hex); a name never matches.
    pub fn by_sha256(&self, sha256: &str) -> Option<&Image> {
        self.images.values().find(|i| i.sha256 == sha256)
    }

    /// Every image, by name.
    pub fn images(&self) -> impl Iterator<Item = &Image> {
        self.images.values()
    }

    /// The images as the controller protocol lists them; empty while nothing can boot.
    pub fn cached_images(&self) -> Vec<CachedImage> {
        if self.boot.is_none() {
            return Vec::new();
        }
        self.images
            .values()
            .map(|i| CachedImage {
                name: i.name.clone(),
                sha256: i.sha256.clone(),
                size_bytes: i.size_bytes,
            })
            .collect()
    }
}

/// The digest of `path`, from its `.sha256` file when that still matches size and mtime.
pub(crate) fn hash_image(name: &str, path: &Path) -> Result<Image, ImageScanError> {
    let hash_err = |source| ImageScanError::Hash {
        path: path.to_owned(),
        source,
    };
    // Follows symlinks: an image may be a link into another cache.
    let meta = fs::metadata(path).map_err(hash_err)?;
    let size = meta.len();
    let mtime_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let digest_path = digest_path(path);
    let sha256 = match read_digest_file(&digest_path, size, mtime_ns) {
        Some(hex) => hex,
        None => {
            let hex = sha256_file(path).map_err(hash_err)?;
            let line = format!("{hex} {size} {mtime_ns}\n");
            // The digest file is only a cache: an unwritable directory costs a rehash next time.
            if let Err(e) = fs::write(&digest_path, line) {
                tracing::warn!(path = %digest_path.display(), error = %e, "cannot cache image digest");
            }
            hex
        }
    };
    Ok(Image {
        name: name.to_owned(),
        sha256,
        size_bytes: size,
        path: path.to_owned(),
    })
}

/// Writes the digest cache of the image at `path`, whose SHA-256 is known to be `sha256`,
/// so the next scan need not hash it. Blocking; best effort like the scan's own.
pub(crate) fn record_digest(path: &Path, sha256: &str) {
    let Ok(meta) = fs::metadata(path) else {
        return;
    };
    let mtime_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let digest_path = digest_path(path);
    let line = format!("{sha256} {} {mtime_ns}\n", meta.len());
    if let Err(e) = fs::write(&digest_path, line) {
        tracing::warn!(path = %digest_path.display(), error = %e, "cannot cache image digest");
    }
}

/// `<image>.sha256` beside `<image>`.
pub(crate) fn digest_path(path: &Path) -> PathBuf {
    let mut digest_path = path.as_os_str().to_owned();
    digest_path.push(DIGEST_SUFFIX);
    PathBuf::from(digest_path)
}

fn read_digest_file(path: &Path, size: u64, mtime_ns: u128) -> Option<String> {
    let text = fs::read_to_string(path).ok()?;
    parse_digest_line(&text, size, mtime_ns)
}

/// `<hex> <size> <mtime_ns>` → the hex, if size and mtime match.
fn parse_digest_line(text: &str, size: u64, mtime_ns: u128) -> Option<String> {
    let mut parts = text.split_whitespace();
    let hex = parts.next()?;
    let cached_size: u64 = parts.next()?.parse().ok()?;
    let cached_mtime: u128 = parts.next()?.parse().ok()?;
    let well_formed = hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit());
    (well_formed && cached_size == size && cached_mtime == mtime_ns)
        .then(|| hex.to_ascii_lowercase())
}

/// Streams the file through SHA-256.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_images_and_reuses_cached_digests() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("tiny.ext4"), b"abc").expect("write");
        fs::write(dir.path().join("notes.txt"), b"x").expect("write");
        let cache = ImageCache::scan(dir.path()).expect("scan");
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let image = cache.lookup(abc).expect("by sha256");
        assert_eq!(image.name, "tiny");
        assert_eq!(image.size_bytes, 3);
        assert_eq!(cache.lookup("tiny").map(|i| &i.sha256[..]), Some(abc));
        assert_eq!(
            cache.lookup(&abc.to_uppercase()).map(|i| &i.name[..]),
            Some("tiny")
        );
        assert!(cache.lookup("notes").is_none());
        // No kernel: nothing can boot, so nothing is advertised.
        assert!(cache.boot().is_none());
        assert!(cache.cached_images().is_empty());

        // A stale-looking but matching digest file is trusted: prove it by planting a fake.
        let fake = "0".repeat(64);
        let meta = fs::metadata(dir.path().join("tiny.ext4")).expect("meta");
        let mtime = meta
            .modified()
            .expect("mtime")
            .duration_since(UNIX_EPOCH)
            .expect("after epoch")
            .as_nanos();
        fs::write(
            dir.path().join("tiny.ext4.sha256"),
            format!("{fake} 3 {mtime}\n"),
        )
        .expect("w");
        fs::write(dir.path().join(KERNEL_FILE), b"k").expect("write");
        fs::write(dir.path().join(INITRAMFS_FILE), b"i").expect("write");
        let cache = ImageCache::scan(dir.path()).expect("scan");
        assert_eq!(cache.lookup("tiny").map(|i| &i.sha256[..]), Some(&fake[..]));
        assert_eq!(cache.cached_images().len(), 1);
        assert!(cache.boot().is_some());
    }

    #[test]
    fn digest_line_must_match_size_and_mtime() {
        let hex = "a".repeat(64);
        let line = format!("{hex} 10 99\n");
        assert_eq!(parse_digest_line(&line, 10, 99), Some(hex.clone()));
        assert_eq!(parse_digest_line(&line, 11, 99), None);
        assert_eq!(parse_digest_line(&line, 10, 98), None);
        assert_eq!(parse_digest_line("zz 10 99", 10, 99), None);
        assert_eq!(parse_digest_line("", 10, 99), None);
    }

    #[test]
    fn missing_directory_is_an_empty_cache() {
        let cache = ImageCache::scan(Path::new("/nonexistent/scaibunker-images")).expect("scan");
        assert_eq!(cache.images().count(), 0);
    }
}
