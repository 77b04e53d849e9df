//! What makes a file fit to be the guest agent: an ELF executable for this machine's
//! architecture with no program interpreter (statically linked, so it runs in any root
//! filesystem, busybox or Alpine as well as Debian), speaking this build's agent protocol.
//!
//! The agent carries its protocol version in its bytes as a [`marker`] (a fixed-length ASCII
//! string), so the check reads the file and never runs it. `scaibunker up` checks the agent it
//! is about to bake into the initramfs; the worker checks the agent inside the initramfs it is
//! about to boot.

use crate::agent::PROTOCOL_VERSION;

/// How to get a good agent, for error messages.
pub const BUILD_HINT: &str = "build the static agent with `bash scripts/build-agent.sh` (it prints \
     its path) and pass that path in SCAIBUNKER_AGENT_BIN; a plain `cargo build` of the \
     workspace makes a dynamically linked agent that only glibc images can run";

const MARKER_PREFIX: &[u8; 26] = b"scaibunker-agent-protocol=";
/// Length of a [`marker`]: the prefix and six decimal digits.
pub const MARKER_LEN: usize = MARKER_PREFIX.len() + 6;

/// The marker the agent binary embeds: `scaibunker-agent-protocol=` and the version as six
/// zero-padded decimal digits.
pub const fn marker(version: u32) -> [u8; MARKER_LEN] {
    let mut out = [0u8; MARKER_LEN];
    let mut i = 0;
    while i < MARKER_PREFIX.len() {
        out[i] = MARKER_PREFIX[i];
        i += 1;
    }
    let mut v = version;
    let mut j = MARKER_LEN;
    while j > MARKER_PREFIX.len() {
        j -= 1;
        out[j] = b'0' + (v % 10) as u8;
        v /= 10;
    }
    out
}

/// Why a file cannot be the guest agent.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AgentBinaryError {
    #[error("it is not a 64-bit little-endian ELF executable")]
    NotElf,
    #[error("it is built for ELF machine {found}, this host needs {expected}")]
    WrongArch { found: u16, expected: u16 },
    #[error("it is dynamically linked (program interpreter {interpreter})")]
    Dynamic { interpreter: String },
    #[error("it carries no agent protocol marker (not a scaibunker-agent, or an old one)")]
    NoMarker,
    #[error("it speaks agent protocol {found}, this build speaks {expected}")]
    WrongProtocol { found: u32, expected: u32 },
}

/// The ELF machine number of this build's architecture.
const fn host_machine() -> u16 {
    if cfg!(target_arch = "x86_64") {
        62
    } else if cfg!(target_arch = "aarch64") {
        183
    } else {
        0
    }
}

/// Checks `bytes` (the whole file) is an agent this build can use, returning its protocol
/// version.
pub fn check(bytes: &[u8]) -> Result<u32, AgentBinaryError> {
    check_elf(bytes)?;
    let found = protocol_of(bytes).ok_or(AgentBinaryError::NoMarker)?;
    if found != PROTOCOL_VERSION {
        return Err(AgentBinaryError::WrongProtocol {
            found,
            expected: PROTOCOL_VERSION,
        });
    }
    Ok(found)
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<usize> {
    usize::try_from(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?)).ok()
}

/// An ELF64 LSB executable for this machine with no `PT_INTERP` program header.
fn check_elf(b: &[u8]) -> Result<(), AgentBinaryError> {
    const PT_INTERP: u32 = 3;
    const ET_EXEC: u16 = 2;
    const ET_DYN: u16 = 3;
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 || b[5] != 1 {
        return Err(AgentBinaryError::NotElf);
    }
    let kind = u16_at(b, 16).ok_or(AgentBinaryError::NotElf)?;
    if kind != ET_EXEC && kind != ET_DYN {
        return Err(AgentBinaryError::NotElf);
    }
    let machine = u16_at(b, 18).ok_or(AgentBinaryError::NotElf)?;
    if machine != host_machine() {
        return Err(AgentBinaryError::WrongArch {
            found: machine,
            expected: host_machine(),
        });
    }
    let phoff = u64_at(b, 32).ok_or(AgentBinaryError::NotElf)?;
    let phentsize = usize::from(u16_at(b, 54).ok_or(AgentBinaryError::NotElf)?);
    let phnum = usize::from(u16_at(b, 56).ok_or(AgentBinaryError::NotElf)?);
    if phentsize < 56 {
        return Err(AgentBinaryError::NotElf);
    }
    for i in 0..phnum {
        let ph = phoff
            .checked_add(i * phentsize)
            .ok_or(AgentBinaryError::NotElf)?;
        let p_type = u32_at(b, ph).ok_or(AgentBinaryError::NotElf)?;
        if p_type == PT_INTERP {
            let off = u64_at(b, ph + 8).ok_or(AgentBinaryError::NotElf)?;
            let len = u64_at(b, ph + 32).ok_or(AgentBinaryError::NotElf)?;
            let raw = off
                .checked_add(len)
                .and_then(|end| b.get(off..end))
                .unwrap_or_default();
            let interpreter = String::from_utf8_lossy(raw)
                .trim_end_matches('\0')
                .to_owned();
            return Err(AgentBinaryError::Dynamic { interpreter });
        }
    }
    Ok(())
}

/// The protocol version in the first well-formed marker in `bytes`.
fn protocol_of(bytes: &[u8]) -> Option<u32> {
    let mut rest = bytes;
    while let Some(at) = rest
        .windows(MARKER_PREFIX.len())
        .position(|w| w == MARKER_PREFIX)
    {
        let digits = rest.get(at + MARKER_PREFIX.len()..at + MARKER_LEN);
        if let Some(d) = digits.filter(|d| d.iter().all(u8::is_ascii_digit)) {
            return std::str::from_utf8(d).ok()?.parse().ok();
        }
        rest = &rest[at + 1..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 header for this host with the given program headers `(type, offset,
    /// size)`, followed by `tail`.
    fn elf(phdrs: &[(u32, u64, u64)], tail: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[16..18].copy_from_slice(&3u16.to_le_bytes());
        b[18..20].copy_from_slice(&host_machine().to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&(phdrs.len() as u16).to_le_bytes());
        for (t, off, size) in phdrs {
            let mut ph = [0u8; 56];
            ph[..4].copy_from_slice(&t.to_le_bytes());
            ph[8..16].copy_from_slice(&off.to_le_bytes());
            ph[32..40].copy_from_slice(&size.to_le_bytes());
            b.extend_from_slice(&ph);
        }
        b.extend_from_slice(tail);
        b
    }

    #[test]
    fn a_static_elf_with_this_protocol_passes() {
        let mut tail = b"junk scaibunker-agent-protocol=xx ".to_vec();
        tail.extend_from_slice(&marker(PROTOCOL_VERSION));
        assert_eq!(check(&elf(&[(1, 0, 0)], &tail)), Ok(PROTOCOL_VERSION));
        assert_eq!(&marker(5)[..], b"scaibunker-agent-protocol=000005");
    }

    #[test]
    fn wrong_agents_are_named_for_what_is_wrong() {
        let good = marker(PROTOCOL_VERSION);
        // The interpreter string sits right after the two program headers (64 + 2 × 56).
        let interp = b"/lib64/ld-linux-x86-64.so.2\0";
        let mut tail = interp.to_vec();
        tail.extend_from_slice(&good);
        assert_eq!(
            check(&elf(&[(1, 0, 0), (3, 176, interp.len() as u64)], &tail)),
            Err(AgentBinaryError::Dynamic {
                interpreter: "/lib64/ld-linux-x86-64.so.2".into()
            })
        );
        assert_eq!(
            check(&elf(&[], b"no marker")),
            Err(AgentBinaryError::NoMarker)
        );
        assert_eq!(
            check(&elf(&[], &marker(PROTOCOL_VERSION + 1))),
            Err(AgentBinaryError::WrongProtocol {
                found: PROTOCOL_VERSION + 1,
                expected: PROTOCOL_VERSION
            })
        );
        assert_eq!(
            check(b"#!/bin/sh\necho hi\n"),
            Err(AgentBinaryError::NotElf)
        );
        let mut arm = elf(&[], &good);
        arm[18..20].copy_from_slice(&(host_machine() ^ 1).to_le_bytes());
        assert!(matches!(
            check(&arm),
            Err(AgentBinaryError::WrongArch { .. })
        ));
        // A truncated header table is not an ELF we trust.
        let mut cut = elf(&[(1, 0, 0)], b"");
        cut[56..58].copy_from_slice(&9u16.to_le_bytes());
        assert_eq!(check(&cut), Err(AgentBinaryError::NotElf));
    }
}
