//! `GET /bunkers/{id}/shell`: an interactive terminal over a WebSocket.
//!
//! Binary messages carry terminal bytes both ways. Text messages carry one JSON
//! [`ShellControl`]: `resize` from the client; `exit` or `error` from the server, which
//! then closes the socket.

use serde::{Deserialize, Serialize};

/// Command run when the query names none.
pub const DEFAULT_SHELL_COMMAND: &str = "/bin/sh";
/// Terminal size when the query gives none.
pub const DEFAULT_COLS: u16 = 80;
pub const DEFAULT_ROWS: u16 = 24;
/// Largest terminal side, in cells.
pub const MAX_TERMINAL_CELLS: u16 = 1000;

/// Query of the upgrade request.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
#[serde(deny_unknown_fields)]
pub struct ShellQuery {
    /// Terminal width, 1–1000 (default 80).
    #[cfg_attr(feature = "openapi", param(minimum = 1, maximum = 1000))]
    pub cols: Option<u16>,
    /// Terminal height, 1–1000 (default 24).
    #[cfg_attr(feature = "openapi", param(minimum = 1, maximum = 1000))]
    pub rows: Option<u16>,
    /// Run by `/bin/sh -c` (default `/bin/sh`); at most 4096 bytes, no NUL.
    #[cfg_attr(
        feature = "openapi",
        param(min_length = 1, max_length = 1024, pattern = r"^[^\x00]*$")
    )]
    pub command: Option<String>,
    /// `user` (default) or `root` (needs `scaibunker:root`).
    pub user: Option<crate::exec::ExecUser>,
    /// The API key or JWT, for clients that cannot set headers (browsers).
    pub token: Option<String>,
}

/// A control message (a WebSocket text message).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ShellControl {
    /// Client → server: the terminal's new size.
    Resize { cols: u16, rows: u16 },
    /// Server → client: the shell ended. `exit_code` is `null` when a signal killed it.
    Exit {
        exit_code: Option<i32>,
        #[serde(default)]
        signal: Option<i32>,
        #[serde(default)]
        timed_out: bool,
    },
    /// Server → client: the session failed; a stable code as in error envelopes.
    Error { code: String, message: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_messages_have_the_documented_shape() {
        let resize: ShellControl =
            serde_json::from_str(r#"{"type":"resize","cols":120,"rows":40}"#).expect("resize");
        assert_eq!(
            resize,
            ShellControl::Resize {
                cols: 120,
                rows: 40
            }
        );
        let exit: ShellControl =
            serde_json::from_str(r#"{"type":"exit","exit_code":3}"#).expect("minimal exit");
        assert_eq!(
            exit,
            ShellControl::Exit {
                exit_code: Some(3),
                signal: None,
                timed_out: false
            }
        );
        assert!(serde_json::from_str::<ShellControl>(r#"{"type":"resize","cols":1}"#).is_err());
    }
}
