//! Capped logs of one VM: the guest's serial console (`console.log`) and QEMU's own output
//! (`qemu.log`), both of which the guest can make as long as it likes.
//!
//! QEMU writes each to a pipe the worker owns (its stdout and stderr); a thread per pipe
//! copies what arrives into a ring of two files, `<name>` (newest) and `<name>.1`:
//! 1. append to `<name>` until it holds [`FILE_CAP`] bytes;
//! 2. rename `<name>` over `<name>.1` and start an empty `<name>`;
//! 3. at the end of the stream (QEMU gone), stop.
//!
//! So at most `2 × FILE_CAP` bytes of a log are on disk, and they are the most recent ones.
//! Readers ([`tail_lines`], [`position`], [`since`]) see the two files as one stream.

use std::fs::File;
use std::io::{Read, Seek as _, SeekFrom, Write as _};
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

/// The guest's serial console.
pub const CONSOLE_LOG: &str = "console.log";
/// QEMU's own stderr (option errors, warnings, and device complaints a guest can provoke).
pub const QEMU_LOG: &str = "qemu.log";
/// Bytes per file of a ring: a log keeps at most twice this on disk.
pub const FILE_CAP: u64 = 1 << 20;
/// How much of the end of a log [`tail_lines`] reads.
const TAIL_WINDOW: u64 = 64 * 1024;

/// Where a ring's files are.
#[derive(Debug, Clone)]
pub struct Ring {
    pub current: PathBuf,
    pub previous: PathBuf,
    pub cap: u64,
}

impl Ring {
    pub fn new(dir: &Path, name: &str, cap: u64) -> Self {
        Self {
            current: dir.join(name),
            previous: dir.join(format!("{name}.1")),
            cap: cap.max(1),
        }
    }

    /// Copies `from` into the ring until its end (steps 1–3). Blocking; returns the bytes
    /// copied.
    pub fn keep(&self, mut from: impl Read) -> std::io::Result<u64> {
        let mut file = create_private(&self.current)?;
        let mut len = 0u64;
        let mut total = 0u64;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) => return Ok(total),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let mut chunk = &buf[..n];
            while !chunk.is_empty() {
                if len >= self.cap {
                    std::fs::rename(&self.current, &self.previous)?;
                    file = create_private(&self.current)?;
                    len = 0;
                }
                let room = usize::try_from(self.cap - len).unwrap_or(usize::MAX);
                let (now, later) = chunk.split_at(room.min(chunk.len()));
                file.write_all(now)?;
                len += now.len() as u64;
                chunk = later;
            }
            total += n as u64;
        }
    }
}

fn create_private(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// A point in a log, to read what came after it ([`since`]) across a rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    /// The inode of the file that was newest; 0 if there was none.
    ino: u64,
    len: u64,
}

/// The end of the log `name` in `dir`, now.
pub fn position(dir: &Path, name: &str) -> Position {
    std::fs::metadata(dir.join(name)).map_or(Position::default(), |m| Position {
        ino: m.ino(),
        len: m.len(),
    })
}

/// What the log `name` got after `from` (all it holds if that has rotated away).
pub fn since(dir: &Path, name: &str, from: Position) -> String {
    let ring = Ring::new(dir, name, FILE_CAP);
    let mut out = Vec::new();
    let current = File::open(&ring.current).ok();
    let current_ino = current
        .as_ref()
        .and_then(|f| f.metadata().ok())
        .map(|m| m.ino());
    if from.ino != 0 && current_ino == Some(from.ino) {
        read_from(current, from.len, &mut out);
    } else {
        let previous = File::open(&ring.previous).ok();
        let previous_ino = previous
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map(|m| m.ino());
        let start = if from.ino != 0 && previous_ino == Some(from.ino) {
            from.len
        } else {
            0
        };
        read_from(previous, start, &mut out);
        read_from(current, 0, &mut out);
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn read_from(file: Option<File>, offset: u64, out: &mut Vec<u8>) {
    if let Some(mut file) = file
        && file.seek(SeekFrom::Start(offset)).is_ok()
    {
        let _ = file.read_to_end(out);
    }
}

/// The last `n` lines of the log `name` in `dir` (from at most its last 64 KiB, across
/// both files); empty if there is none.
pub fn tail_lines(dir: &Path, name: &str, n: usize) -> String {
    let ring = Ring::new(dir, name, FILE_CAP);
    let mut newest = Vec::new();
    read_tail(&ring.current, TAIL_WINDOW, &mut newest);
    let mut buf = Vec::new();
    let short = TAIL_WINDOW.saturating_sub(newest.len() as u64);
    if short > 0 {
        read_tail(&ring.previous, short, &mut buf);
    }
    buf.extend_from_slice(&newest);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn read_tail(path: &Path, window: u64, out: &mut Vec<u8>) {
    let Ok(mut file) = File::open(path) else {
        return;
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if file
        .seek(SeekFrom::Start(len.saturating_sub(window)))
        .is_ok()
    {
        let _ = file.read_to_end(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_disk(dir: &Path) -> u64 {
        std::fs::read_dir(dir)
            .expect("read dir")
            .flatten()
            .map(|e| e.metadata().expect("stat").len())
            .sum()
    }

    #[test]
    fn a_flood_leaves_at_most_two_files_of_the_newest_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ring = Ring::new(dir.path(), CONSOLE_LOG, 4096);
        let text: String = (0..5000).map(|i| format!("line {i}\n")).collect();
        let copied = ring.keep(text.as_bytes()).expect("keep");
        assert_eq!(copied, text.len() as u64);
        assert!(on_disk(dir.path()) <= 2 * 4096, "{}", on_disk(dir.path()));
        let current = std::fs::read_to_string(&ring.current).expect("current");
        let previous = std::fs::read_to_string(&ring.previous).expect("previous");
        assert!(current.len() as u64 <= 4096 && previous.len() as u64 == 4096);
        // Together they are the end of the stream, in order.
        assert!(text.ends_with(&format!("{previous}{current}")));
        assert_eq!(
            tail_lines(dir.path(), CONSOLE_LOG, 2),
            "line 4998\nline 4999"
        );
    }

    #[test]
    fn tail_reads_across_a_fresh_rotation_and_nothing_is_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(tail_lines(dir.path(), CONSOLE_LOG, 3), "");
        std::fs::write(dir.path().join("console.log.1"), "a\nb\nc\n").expect("w");
        std::fs::write(dir.path().join("console.log"), "d\n").expect("w");
        assert_eq!(tail_lines(dir.path(), CONSOLE_LOG, 3), "b\nc\nd");
    }

    #[test]
    fn since_follows_the_log_across_rotations() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ring = Ring::new(dir.path(), CONSOLE_LOG, 10);
        // No log yet: everything counts.
        let start = position(dir.path(), CONSOLE_LOG);
        ring.keep(&b"0123456"[..]).expect("keep");
        assert_eq!(since(dir.path(), CONSOLE_LOG, start), "0123456");
        let mid = position(dir.path(), CONSOLE_LOG);
        // Three more bytes fill the file, which then rotates (as `keep` does it).
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&ring.current)
            .expect("open");
        f.write_all(b"789").expect("w");
        std::fs::rename(&ring.current, &ring.previous).expect("rotate");
        std::fs::write(&ring.current, b"abc").expect("w");
        assert_eq!(since(dir.path(), CONSOLE_LOG, mid), "789abc");
    }
}
