//! The agent inside the initramfs every guest boots: read out of the gzip-compressed `newc`
//! cpio archive and checked ([`scaibunker_proto::agent_binary`]) before the worker starts, so
//! a dynamically linked agent (which would panic every image without glibc at boot) or one
//! speaking another protocol is refused with a message saying how to build the right one.

use std::io::Read;
use std::path::{Path, PathBuf};

use scaibunker_proto::agent_binary::{self, AgentBinaryError, BUILD_HINT};

/// Where `images/build.sh` puts the agent inside the initramfs.
const AGENT_ENTRY: &str = "scaibunker-agent";
/// Initramfs contents read at most (decompressed): more is not an initramfs we made.
const MAX_UNPACKED_BYTES: u64 = 512 << 20;

#[derive(Debug, thiserror::Error)]
pub enum InitramfsAgentError {
    #[error("read the initramfs {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the initramfs {} is not a newc cpio archive ({reason})", path.display())]
    Format { path: PathBuf, reason: &'static str },
    #[error("the initramfs {} holds no /{AGENT_ENTRY}; rebuild it with images/build.sh --agent PATH", path.display())]
    NoAgent { path: PathBuf },
    #[error("the agent in the initramfs {} cannot run in every guest: {source}; {BUILD_HINT}, then rebuild the initramfs with images/build.sh --agent PATH", path.display())]
    Unfit {
        path: PathBuf,
        #[source]
        source: AgentBinaryError,
    },
}

/// Checks the agent inside the initramfs at `path`; returns its protocol version.
pub fn check_agent(path: &Path) -> Result<u32, InitramfsAgentError> {
    let file = std::fs::File::open(path).map_err(|source| InitramfsAgentError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut unpacked = Vec::new();
    flate2::read::MultiGzDecoder::new(std::io::BufReader::new(file))
        .take(MAX_UNPACKED_BYTES)
        .read_to_end(&mut unpacked)
        .map_err(|source| InitramfsAgentError::Read {
            path: path.to_owned(),
            source,
        })?;
    let agent = find_entry(&unpacked, AGENT_ENTRY)
        .map_err(|reason| InitramfsAgentError::Format {
            path: path.to_owned(),
            reason,
        })?
        .ok_or_else(|| InitramfsAgentError::NoAgent {
            path: path.to_owned(),
        })?;
    agent_binary::check(agent).map_err(|source| InitramfsAgentError::Unfit {
        path: path.to_owned(),
        source,
    })
}

/// The data of the regular file `name` (with or without a leading `./`) in a sequence of
/// `newc` cpio archives, each possibly followed by zero padding.
fn find_entry<'a>(mut b: &'a [u8], name: &str) -> Result<Option<&'a [u8]>, &'static str> {
    const HEADER: usize = 110;
    let pad4 = |n: usize| (n + 3) & !3;
    loop {
        // Padding between concatenated archives (and after the last trailer).
        let zeros = b.iter().take_while(|&&c| c == 0).count();
        b = &b[zeros..];
        if b.is_empty() {
            return Ok(None);
        }
        if b.len() < HEADER || !(b.starts_with(b"070701") || b.starts_with(b"070702")) {
            return Err("bad header magic");
        }
        let field = |i: usize| -> Result<usize, &'static str> {
            let hex = std::str::from_utf8(&b[6 + 8 * i..14 + 8 * i]).map_err(|_| "bad field")?;
            usize::from_str_radix(hex, 16).map_err(|_| "bad field")
        };
        let mode = field(1)?;
        let size = field(6)?;
        let name_len = field(11)?;
        let name_end = HEADER.checked_add(name_len).ok_or("bad name size")?;
        let entry_name = b
            .get(HEADER..name_end.saturating_sub(1))
            .ok_or("truncated name")?;
        let data_start = pad4(name_end);
        let data_end = data_start.checked_add(size).ok_or("bad file size")?;
        let data = b.get(data_start..data_end).ok_or("truncated data")?;
        if entry_name == b"TRAILER!!!" {
            b = b.get(pad4(data_end)..).unwrap_or_default();
            continue;
        }
        let entry_name = entry_name.strip_prefix(b"./").unwrap_or(entry_name);
        const S_IFMT: usize = 0o170000;
        const S_IFREG: usize = 0o100000;
        if entry_name == name.as_bytes() && mode & S_IFMT == S_IFREG {
            return Ok(Some(data));
        }
        b = b.get(pad4(data_end)..).ok_or("truncated archive")?;
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn entry(out: &mut Vec<u8>, name: &str, mode: u32, data: &[u8]) {
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            1,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
        out.extend_from_slice(data);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    }

    fn gz(parts: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(parts).expect("gzip");
        e.finish().expect("gzip")
    }

    #[test]
    fn the_agent_is_found_after_a_first_archive_and_checked() {
        // Two archives as images/build.sh writes them: device nodes, then the tree.
        let mut cpio = Vec::new();
        entry(&mut cpio, "dev/console", 0o020600, b"");
        entry(&mut cpio, "TRAILER!!!", 0, b"");
        cpio.resize(512, 0);
        entry(&mut cpio, "./bin", 0o040755, b"");
        entry(&mut cpio, "./scaibunker-agent", 0o100755, b"#!/bin/sh\n");
        entry(&mut cpio, "TRAILER!!!", 0, b"");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("initramfs.cpio.gz");
        std::fs::write(&path, gz(&cpio)).expect("write");
        assert_eq!(
            find_entry(&cpio, "scaibunker-agent"),
            Ok(Some(&b"#!/bin/sh\n"[..]))
        );
        // A shell script is no agent: refused, and the message says how to build one.
        let err = check_agent(&path).expect_err("not an ELF");
        assert!(matches!(
            err,
            InitramfsAgentError::Unfit {
                source: AgentBinaryError::NotElf,
                ..
            }
        ));
        assert!(err.to_string().contains("scripts/build-agent.sh"), "{err}");

        let mut no_agent = Vec::new();
        entry(&mut no_agent, "./init", 0o100755, b"x");
        std::fs::write(&path, gz(&no_agent)).expect("write");
        assert!(matches!(
            check_agent(&path),
            Err(InitramfsAgentError::NoAgent { .. })
        ));
        std::fs::write(&path, gz(b"not a cpio archive at all, no")).expect("write");
        assert!(matches!(
            check_agent(&path),
            Err(InitramfsAgentError::Format { .. })
        ));
    }
}
