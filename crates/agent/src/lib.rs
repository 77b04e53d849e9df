//! The ScaiBunker guest agent: PID 1 duties inside a bunker's microVM and the server end
//! of the worker ↔ agent protocol (`scaibunker_proto::agent`).
//!
//! - [`init`]: what PID 1 must do (mounts, hostname, the `user` account, reaping) and the
//!   supervision of the `serve` child.
//! - [`serve`]: finds and opens the channel, sends `HELLO`, reads frames and dispatches
//!   each stream to a handler thread.
//! - [`channel`]: the shared, lock-protected writer and per-stream senders that make sure
//!   frames never interleave and every stream ends with exactly one `REPLY`.
//! - [`exec`], [`files`]: the request handlers; [`paths`] validates the paths they get;
//!   [`identity`] and [`disk`] prepare a guest after a boot or a restore (its own identity, its
//!   root filesystem grown to its disk).
//! - [`backchannel`]: HTTP on the guest's `api.sock`, carried to the worker as `api`
//!   streams; [`guest`] is the `scaibunker-guest` command that calls it.
//!
//! Std threads only: the agent is small, static and has a handful of streams at a time.

pub mod account;
pub mod archive;
pub mod backchannel;
pub mod channel;
pub mod creds;
pub mod disk;
pub mod exec;
pub mod files;
pub mod guest;
pub mod identity;
pub mod init;
pub mod paths;
pub mod serve;

use std::error::Error;
use std::fmt::Write as _;
use std::io;

use scaibunker_proto::agent::{AgentErrorCode, Reply};

/// The agent's version, reported in `HELLO`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Writes one diagnostic line to stderr (the guest console when running as PID 1).
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {
        eprintln!("scaibunker-agent[{}]: {}", std::process::id(), format_args!($($arg)*))
    };
}

/// The protocol code for an I/O failure, by its kind.
pub(crate) fn io_error_code(e: &io::Error) -> AgentErrorCode {
    match e.kind() {
        io::ErrorKind::NotFound => AgentErrorCode::FileNotFound,
        io::ErrorKind::PermissionDenied => AgentErrorCode::PermissionDenied,
        io::ErrorKind::NotADirectory => AgentErrorCode::NotADirectory,
        io::ErrorKind::IsADirectory => AgentErrorCode::IsADirectory,
        io::ErrorKind::DirectoryNotEmpty => AgentErrorCode::DirectoryNotEmpty,
        _ => AgentErrorCode::Io,
    }
}

/// `err` and its sources joined with `": "`, without std's `" (os error N)"` suffixes,
/// which mean nothing to the worker.
pub fn error_chain(err: &dyn Error) -> String {
    let mut out = String::new();
    let mut next: Option<&dyn Error> = Some(err);
    while let Some(e) = next {
        if !out.is_empty() {
            out.push_str(": ");
        }
        let text = e.to_string();
        let text = match text.rfind(" (os error ") {
            Some(cut) if text.ends_with(')') => &text[..cut],
            _ => text.as_str(),
        };
        let _ = write!(out, "{text}");
        next = e.source();
    }
    out
}

/// A `REPLY` carrying `err` with `code`.
pub(crate) fn error_reply(code: AgentErrorCode, err: &dyn Error) -> Reply {
    Reply::Error {
        code,
        message: error_chain(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("spawn `nosuchcmd`")]
    struct SpawnFailed(#[source] io::Error);

    #[test]
    fn error_chain_joins_sources_without_os_error_suffix() {
        let e = SpawnFailed(io::Error::from_raw_os_error(2));
        assert_eq!(
            error_chain(&e),
            "spawn `nosuchcmd`: No such file or directory"
        );
    }

    #[test]
    fn maps_io_kinds_to_codes() {
        let code = |raw| io_error_code(&io::Error::from_raw_os_error(raw));
        assert_eq!(code(2), AgentErrorCode::FileNotFound);
        assert_eq!(code(13), AgentErrorCode::PermissionDenied);
        assert_eq!(code(20), AgentErrorCode::NotADirectory);
        assert_eq!(code(21), AgentErrorCode::IsADirectory);
        assert_eq!(code(39), AgentErrorCode::DirectoryNotEmpty);
        assert_eq!(code(5), AgentErrorCode::Io);
    }
}
