//! Running commands: the `exec`, `exec/stream` and `shell` handlers, the exec request checks,
//! and the NDJSON body and `error` lines of a streamed exec.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use futures_util::Stream;
use scaibunker_proto::agent::AgentErrorCode;
use scaibunker_proto::worker::{ExecRequest, ExecResult, ExecStreamEvent, ShellQuery};

use crate::agent_client::{AgentError, ExecEvent, ExecOutcome, ExecSpec, ExecStream, ShellSpec};

use super::{ApiError, ApiState, Command, execute, json_body, query};

/// Exit code a shell gives a command it cannot run.
const SPAWN_FAILED_EXIT_CODE: i32 = 127;

pub(super) async fn exec(
    State(s): State<Arc<ApiState>>,
    Path(id): Path<String>,
    body: Result<Json<ExecRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    execute(&s, Command::Exec(id, json_body(body)?)).await
}

pub(super) async fn exec_stream(
    State(s): State<Arc<ApiState>>,
    Path(id): Path<String>,
    body: Result<Json<ExecRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    execute(&s, Command::ExecStream(id, json_body(body)?)).await
}

/// Largest terminal side accepted, in cells.
const MAX_TERMINAL_CELLS: u16 = 1000;

pub(super) async fn shell(
    State(s): State<Arc<ApiState>>,
    Path(id): Path<String>,
    q: Result<Query<ShellQuery>, QueryRejection>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let q = query(q)?;
    let sides = [q.cols, q.rows];
    if sides.iter().any(|&n| n == 0 || n > MAX_TERMINAL_CELLS) {
        return Err(ApiError::validation(format!(
            "cols and rows must be 1..={MAX_TERMINAL_CELLS}"
        )));
    }
    if q.timeout_ms == 0 || q.command.is_empty() || q.command.contains('\0') {
        return Err(ApiError::validation(
            "timeout_ms must be positive and command non-empty without NUL",
        ));
    }
    let (agent, env) = s.bunkers.agent(&id)?;
    let (input, output) = agent
        .shell(ShellSpec {
            program: scaibunker_proto::agent::Program::Shell(q.command),
            env,
            cwd: None,
            user: q.user,
            size: scaibunker_proto::agent::WindowSize {
                cols: q.cols,
                rows: q.rows,
            },
            timeout: Duration::from_millis(q.timeout_ms),
        })
        .await?;
    Ok(ws
        .max_message_size(crate::shell::MAX_MESSAGE_BYTES)
        .on_upgrade(move |socket| crate::shell::bridge(socket, input, output)))
}

pub(super) fn exec_spec(
    req: ExecRequest,
    bunker_env: BTreeMap<String, String>,
) -> Result<ExecSpec, ApiError> {
    if req.timeout_ms == 0 {
        return Err(ApiError::validation("timeout_ms must be positive"));
    }
    let stdin = req
        .stdin_b64
        .map(|b64| BASE64.decode(b64.as_bytes()).map(Bytes::from))
        .transpose()
        .map_err(|e| ApiError::validation(format!("stdin_b64 is not base64: {e}")))?;
    let mut env = bunker_env;
    env.extend(req.env);
    Ok(ExecSpec {
        program: req.program,
        env,
        cwd: req.cwd,
        user: req.user,
        stdin,
        timeout: Duration::from_millis(req.timeout_ms),
        output_limit_bytes: req.output_limit_bytes,
    })
}

pub(super) fn spawn_failed(message: String) -> ExecOutcome {
    let mut stderr = message.into_bytes();
    stderr.push(b'\n');
    ExecOutcome {
        exit_code: Some(SPAWN_FAILED_EXIT_CODE),
        signal: None,
        timed_out: false,
        duration_ms: 0,
        stdout_total_bytes: 0,
        stderr_total_bytes: stderr.len() as u64,
        stdout: Vec::new(),
        stderr,
    }
}

pub(super) fn exec_result(o: ExecOutcome) -> ExecResult {
    ExecResult {
        exit_code: o.exit_code,
        signal: o.signal,
        timed_out: o.timed_out,
        guest_duration_ms: o.duration_ms,
        stdout_b64: BASE64.encode(&o.stdout),
        stderr_b64: BASE64.encode(&o.stderr),
        stdout_total_bytes: o.stdout_total_bytes,
        stderr_total_bytes: o.stderr_total_bytes,
    }
}

/// The body of a streamed exec: one [`ExecStreamEvent`] per line, each output frame as it
/// arrives, then one `exit` or `error` line, then the end. The body pulls from the exec's
/// bounded buffer, so a slow reader holds the agent back instead of filling memory; the
/// body dropped (the client went away) drops the exec stream, which cancels the command.
pub(super) fn ndjson(
    events: ExecStream,
) -> impl Stream<Item = Result<Bytes, std::convert::Infallible>> {
    futures_util::stream::unfold(Some(events), |events| async move {
        let mut events = events?;
        let (lines, more) = match events.next().await? {
            Ok(ExecEvent::Stdout(bytes)) => (
                vec![ExecStreamEvent::Stdout {
                    data_b64: BASE64.encode(&bytes),
                }],
                true,
            ),
            Ok(ExecEvent::Stderr(bytes)) => (
                vec![ExecStreamEvent::Stderr {
                    data_b64: BASE64.encode(&bytes),
                }],
                true,
            ),
            Ok(ExecEvent::Exited(exit)) => (
                vec![ExecStreamEvent::Exit {
                    exit_code: exit.exit_code,
                    signal: exit.signal,
                    timed_out: exit.timed_out,
                    guest_duration_ms: exit.duration_ms,
                    stdout_total_bytes: exit.stdout_total_bytes,
                    stderr_total_bytes: exit.stderr_total_bytes,
                }],
                false,
            ),
            // As in the inline route: a command that cannot start exits 127, reason on stderr.
            Err(AgentError::Agent {
                code: AgentErrorCode::SpawnFailed,
                message,
            }) => (spawn_failed_events(message), false),
            Err(e) => (vec![stream_error(e)], false),
        };
        let mut chunk = Vec::new();
        for line in &lines {
            serde_json::to_writer(&mut chunk, line).expect("stream events always serialise");
            chunk.push(b'\n');
        }
        Some((Ok(Bytes::from(chunk)), more.then_some(events)))
    })
}

fn spawn_failed_events(message: String) -> Vec<ExecStreamEvent> {
    let o = spawn_failed(message);
    vec![
        ExecStreamEvent::Stderr {
            data_b64: BASE64.encode(&o.stderr),
        },
        ExecStreamEvent::Exit {
            exit_code: o.exit_code,
            signal: o.signal,
            timed_out: o.timed_out,
            guest_duration_ms: o.duration_ms,
            stdout_total_bytes: o.stdout_total_bytes,
            stderr_total_bytes: o.stderr_total_bytes,
        },
    ]
}

/// The `error` line that ends a stream whose exec failed after the response began.
pub(crate) fn stream_error(e: AgentError) -> ExecStreamEvent {
    let code = match &e {
        AgentError::Timeout(_) => "TIMEOUT",
        AgentError::WindowExceeded => "AGENT_PROTOCOL_ERROR",
        _ => {
            // The same codes as the inline route; 5xx details are logged there, not sent.
            let api = ApiError::from(e);
            return ExecStreamEvent::Error {
                code: api.code.to_owned(),
                message: api.message,
            };
        }
    };
    ExecStreamEvent::Error {
        code: code.to_owned(),
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spawn_failure_looks_like_a_shell() {
        let r = exec_result(spawn_failed("nosuchcmd: not found".into()));
        assert_eq!(r.exit_code, Some(127));
        assert_eq!(
            BASE64.decode(r.stderr_b64).expect("b64"),
            b"nosuchcmd: not found\n"
        );
    }

    #[test]
    fn stream_errors_keep_the_inline_codes_and_name_timeouts() {
        let code = |e| match stream_error(e) {
            ExecStreamEvent::Error { code, .. } => code,
            other => panic!("not an error: {other:?}"),
        };
        assert_eq!(
            code(AgentError::Unavailable("gone".into())),
            "AGENT_UNAVAILABLE"
        );
        assert_eq!(code(AgentError::Timeout(Duration::from_secs(1))), "TIMEOUT");
        assert_eq!(code(AgentError::WindowExceeded), "AGENT_PROTOCOL_ERROR");
        let events = spawn_failed_events("nosuchcmd: not found".into());
        match &events[..] {
            [
                ExecStreamEvent::Stderr { data_b64 },
                ExecStreamEvent::Exit {
                    exit_code: Some(127),
                    stderr_total_bytes: 21,
                    ..
                },
            ] => assert_eq!(
                BASE64.decode(data_b64).expect("b64"),
                b"nosuchcmd: not found\n"
            ),
            other => panic!("{other:?}"),
        }
    }
}
