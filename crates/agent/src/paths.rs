//! Validation and lexical normalisation of guest paths received from the worker.
//!
//! Invariant: a [`GuestPath`] is absolute, contains no NUL byte, is at most
//! [`MAX_PATH_BYTES`] long, and is normalised lexically — no `.` components, no empty
//! components, `..` pops the previous component and never climbs above `/`.
//! Normalisation never touches the filesystem, so symlinks are resolved later by the
//! kernel, exactly as for any other process in the guest.

use std::fmt;
use std::path::Path;

/// Longest path accepted, in bytes (Linux `PATH_MAX`).
pub const MAX_PATH_BYTES: usize = 4096;

/// Why a path from a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path `{0}` is not absolute")]
    NotAbsolute(String),
    #[error("path contains a NUL byte")]
    ContainsNul,
    #[error("path is {0} bytes long, more than {MAX_PATH_BYTES}")]
    TooLong(usize),
}

/// An absolute, normalised path inside the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestPath(String);

impl GuestPath {
    /// Validates `raw` and normalises it lexically.
    pub fn parse(raw: &str) -> Result<Self, PathError> {
        if raw.len() > MAX_PATH_BYTES {
            return Err(PathError::TooLong(raw.len()));
        }
        if raw.contains('\0') {
            return Err(PathError::ContainsNul);
        }
        if !raw.starts_with('/') {
            return Err(PathError::NotAbsolute(raw.to_owned()));
        }
        let mut parts: Vec<&str> = Vec::new();
        for part in raw.split('/') {
            match part {
                "" | "." => {}
                ".." => {
                    parts.pop();
                }
                name => parts.push(name),
            }
        }
        Ok(Self(format!("/{}", parts.join("/"))))
    }

    /// Whether this is `/` itself.
    pub fn is_root(&self) -> bool {
        self.0 == "/"
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn as_path(&self) -> &Path {
        Path::new(&self.0)
    }

    /// The last component; `None` for `/`.
    pub fn file_name(&self) -> Option<&str> {
        if self.is_root() {
            return None;
        }
        self.0.rsplit('/').next()
    }

    /// The parent directory; `None` for `/`.
    pub fn parent(&self) -> Option<GuestPath> {
        if self.is_root() {
            return None;
        }
        let cut = self.0.rfind('/').unwrap_or(0);
        Some(if cut == 0 {
            Self("/".to_owned())
        } else {
            Self(self.0[..cut].to_owned())
        })
    }

    /// This path with one more component; `name` must be a single component.
    pub fn join(&self, name: &str) -> String {
        if self.is_root() {
            format!("/{name}")
        } else {
            format!("{}/{name}", self.0)
        }
    }
}

impl fmt::Display for GuestPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<Path> for GuestPath {
    fn as_ref(&self) -> &Path {
        self.as_path()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_lexically() {
        let cases = [
            ("/", "/"),
            ("//", "/"),
            ("/a/b/c", "/a/b/c"),
            ("/a//b/", "/a/b"),
            ("/a/./b/.", "/a/b"),
            ("/a/b/../c", "/a/c"),
            ("/..", "/"),
            ("/../../etc/passwd", "/etc/passwd"),
            ("/a/../..", "/"),
            ("/a/b/../../..", "/"),
            ("/home/user/.bashrc", "/home/user/.bashrc"),
            ("/a/...", "/a/..."),
        ];
        for (raw, want) in cases {
            let got = GuestPath::parse(raw).expect("valid path");
            assert_eq!(got.as_str(), want, "normalising {raw:?}");
        }
    }

    #[test]
    fn rejects_relative_empty_nul_and_overlong_paths() {
        assert_eq!(
            GuestPath::parse("etc/passwd"),
            Err(PathError::NotAbsolute("etc/passwd".into()))
        );
        assert_eq!(
            GuestPath::parse(""),
            Err(PathError::NotAbsolute(String::new()))
        );
        assert_eq!(
            GuestPath::parse("./a"),
            Err(PathError::NotAbsolute("./a".into()))
        );
        assert_eq!(GuestPath::parse("/a\0b"), Err(PathError::ContainsNul));
        let long = format!("/{}", "a".repeat(MAX_PATH_BYTES));
        assert_eq!(
            GuestPath::parse(&long),
            Err(PathError::TooLong(MAX_PATH_BYTES + 1))
        );
        let limit = format!("/{}", "a".repeat(MAX_PATH_BYTES - 1));
        assert!(GuestPath::parse(&limit).is_ok());
    }

    #[test]
    fn splits_parent_name_and_joins() {
        let p = GuestPath::parse("/a/b/c.txt").expect("valid");
        assert_eq!(p.file_name(), Some("c.txt"));
        assert_eq!(p.parent().expect("has parent").as_str(), "/a/b");
        let top = GuestPath::parse("/c.txt").expect("valid");
        assert_eq!(top.parent().expect("has parent").as_str(), "/");
        let root = GuestPath::parse("/").expect("valid");
        assert!(root.is_root());
        assert_eq!(root.file_name(), None);
        assert_eq!(root.parent(), None);
        assert_eq!(root.join("etc"), "/etc");
        assert_eq!(p.parent().expect("has parent").join("d"), "/a/b/d");
    }
}
