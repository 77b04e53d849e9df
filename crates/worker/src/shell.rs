//! A shell session's WebSocket, bridged to its terminal in the guest.
//!
//! 1. Binary messages from the controller are keystrokes, written to the terminal as they
//!    come; a text message is a [`ShellControl::Resize`]; anything else ends the session
//!    with an `error`.
//! 2. The terminal's output goes back as binary messages, in order, as it is produced.
//! 3. The session ends with one text message, `exit` (the shell's status) or `error`, then a
//!    close. A controller that goes away drops the terminal's stream, which kills the
//!    shell's whole session in the guest.

use axum::extract::ws::{Message, WebSocket};
use scaibunker_proto::agent::{AgentErrorCode, WindowSize};
use scaibunker_proto::worker::{ExecStreamEvent, ShellControl};

use crate::agent_client::{AgentError, ExecEvent, ExecStream, ShellInput};

/// Largest WebSocket message accepted from the controller.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// Exit status reported for a shell that could not start, as a shell would.
const SPAWN_FAILED_EXIT_CODE: i32 = 127;

/// Runs the session until the shell exits or either side goes away.
pub async fn bridge(mut socket: WebSocket, input: ShellInput, mut output: ExecStream) {
    let last = loop {
        tokio::select! {
            msg = socket.recv() => match msg {
                Some(Ok(Message::Binary(bytes))) => {
                    // A failed write means the channel is gone; the output side reports it.
                    let _ = input.write(&bytes).await;
                }
                Some(Ok(Message::Text(text))) => {
                    match serde_json::from_str::<ShellControl>(text.as_str()) {
                        Ok(ShellControl::Resize { cols, rows }) => {
                            let _ = input.resize(WindowSize { cols, rows }).await;
                        }
                        _ => break ShellControl::Error {
                            code: "VALIDATION_ERROR".into(),
                            message: "text messages must be {\"type\":\"resize\",\"cols\":…,\"rows\":…}".into(),
                        },
                    }
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                // The controller left: dropping `output` cancels the session in the guest.
                Some(Ok(Message::Close(_)) | Err(_)) | None => return,
            },
            event = output.next() => match event {
                Some(Ok(ExecEvent::Stdout(bytes) | ExecEvent::Stderr(bytes))) => {
                    if socket.send(Message::Binary(bytes)).await.is_err() {
                        return;
                    }
                }
                Some(Ok(ExecEvent::Exited(exit))) => break ShellControl::Exit {
                    exit_code: exit.exit_code,
                    signal: exit.signal,
                    timed_out: exit.timed_out,
                },
                Some(Err(AgentError::Agent { code: AgentErrorCode::SpawnFailed, message })) => {
                    let line = format!("{message}\r\n");
                    let _ = socket.send(Message::Binary(line.into_bytes().into())).await;
                    break ShellControl::Exit {
                        exit_code: Some(SPAWN_FAILED_EXIT_CODE),
                        signal: None,
                        timed_out: false,
                    };
                }
                Some(Err(e)) => break error_control(e),
                None => break ShellControl::Error {
                    code: "AGENT_UNAVAILABLE".into(),
                    message: "the terminal's stream ended without an exit".into(),
                },
            },
        }
    };
    let text = serde_json::to_string(&last).expect("control messages always serialise");
    if socket.send(Message::Text(text.into())).await.is_ok() {
        let _ = socket.send(Message::Close(None)).await;
    }
}

/// The `error` message for a session that failed after it started: the exec stream's codes.
fn error_control(e: AgentError) -> ShellControl {
    match crate::api::stream_error(e) {
        ExecStreamEvent::Error { code, message } => ShellControl::Error { code, message },
        other => ShellControl::Error {
            code: "INTERNAL".into(),
            message: format!("unexpected stream event {other:?}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_keep_the_exec_stream_codes() {
        let ShellControl::Error { code, .. } =
            error_control(AgentError::Unavailable("gone".into()))
        else {
            panic!("an error message");
        };
        assert_eq!(code, "AGENT_UNAVAILABLE");
    }
}
