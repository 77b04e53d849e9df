//! `GET /bunkers/{id}/shell`: an interactive terminal over a WebSocket, bridged to the same
//! route on the bunker's worker.
//!
//! 1. Authenticate (header or `?token=`), check the query, the permissions and the bunker,
//!    then that this is a WebSocket request, hold the bunker busy (`service::activity`; the
//!    guard lives as long as the session), and open the worker's socket, all before
//!    upgrading: every refusal is a normal error response.
//! 2. Record `bunker.shell`, upgrade, and relay: binary messages both ways untouched; a
//!    client text message must be a valid `resize`, which is passed on; the worker's `exit`
//!    or `error` is passed back. A client message that is neither ends the session with an
//!    `error` (`VALIDATION_ERROR`).
//! 3. Whichever side goes first, the other is closed (a client that leaves kills the shell
//!    in the guest), and `bunker.shell.end` is recorded with the exit code or the reason.

use std::time::Instant;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use scaibunker_api::codes;
use scaibunker_api::envelope::Error;
use scaibunker_api::shell::{MAX_TERMINAL_CELLS, ShellControl, ShellQuery};
use scaibunker_proto::worker as wp;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use super::error::ApiError;
use super::extract::{Ctx, SocketCaller};
use crate::service::RequestContext;
use crate::service::Services;
use crate::service::activity::ActivityGuard;
use crate::service::auth::Principal;
use crate::service::shell::{self as svc, PreparedShell, SessionEnd};
use crate::store::bunkers::BunkerRow;
use crate::workers::WorkerSocket;

/// Largest message taken from a client: terminal input arrives keystroke by keystroke or
/// pasted, never near this.
const MAX_CLIENT_MESSAGE_BYTES: usize = 1024 * 1024;

/// Opens an interactive shell in the bunker (WebSocket).
#[utoipa::path(
    get,
    path = "/bunkers/{id}/shell",
    operation_id = "open_shell",
    tag = "shell",
    params(("id" = String, Path, description = "Bunker id"), ShellQuery),
    responses(
        (status = 101, description = "Switching to the WebSocket: binary messages are terminal bytes both ways; text messages are JSON `{\"type\":\"resize\",\"cols\",\"rows\"}` from the client and `{\"type\":\"exit\",\"exit_code\"}` or `{\"type\":\"error\",\"code\",\"message\"}` from the server, which then closes"),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED` (`scaibunker:shell`, or `scaibunker:root` for `user=root`)", body = Error),
        (status = 404, description = "`BUNKER_NOT_FOUND`", body = Error),
        (status = 409, description = "`BUNKER_NOT_RUNNING`", body = Error),
        (status = 422, description = "`VALIDATION_ERROR` on a query parameter", body = Error),
        (status = 426, description = "`UPGRADE_REQUIRED`: not a WebSocket request", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
        (status = 502, description = "`WORKER_ERROR`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn open(
    State(s): State<Services>,
    SocketCaller(p): SocketCaller,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
    query: Result<Query<ShellQuery>, axum::extract::rejection::QueryRejection>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::query(&e))?;
    let shell = svc::prepare(&s, &p, &id, &q).await?;
    let ws = ws.map_err(|e| {
        ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            codes::UPGRADE_REQUIRED,
            format!("this route is a WebSocket: {e}"),
        )
    })?;
    let busy = svc::hold(&s, &shell).await?;
    let worker = s
        .workers
        .open_shell(&shell.worker_url, &shell.row.id, &shell.query)
        .await
        .map_err(crate::service::bunkers::BunkerError::from)?;
    svc::record_open(&s, &p, &ctx, &shell).await?;
    Ok(ws
        .max_message_size(MAX_CLIENT_MESSAGE_BYTES)
        .on_upgrade(move |client| session(s, p, ctx, shell, client, worker, busy)))
}

async fn session(
    s: Services,
    p: Principal,
    ctx: RequestContext,
    shell: PreparedShell,
    client: WebSocket,
    worker: WorkerSocket,
    busy: ActivityGuard,
) {
    let started = Instant::now();
    let (exit_code, reason) = relay(client, worker).await;
    let end = SessionEnd {
        exit_code,
        reason,
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    };
    record_end(&s, &p, &ctx, &shell.row, &shell.session_id, &end).await;
    drop(busy);
}

async fn record_end(
    s: &Services,
    p: &Principal,
    ctx: &RequestContext,
    row: &BunkerRow,
    session_id: &str,
    end: &SessionEnd,
) {
    if let Err(e) = svc::record_close(s, p, ctx, row, session_id, end).await {
        tracing::error!(error = %e, session_id, "recording the end of a shell session failed");
    }
}

/// Relays until either side ends; returns the exit code, or why there is none.
async fn relay(mut client: WebSocket, mut worker: WorkerSocket) -> (Option<i32>, Option<String>) {
    let mut exit_code = None;
    let reason = loop {
        tokio::select! {
            msg = client.recv() => match msg {
                Some(Ok(Message::Binary(bytes))) => {
                    if worker.send(WsMessage::Binary(bytes)).await.is_err() {
                        break Some("worker_closed".to_owned());
                    }
                }
                Some(Ok(Message::Text(text))) => match resize(text.as_str()) {
                    Ok(msg) => {
                        if worker.send(WsMessage::Text(msg.into())).await.is_err() {
                            break Some("worker_closed".to_owned());
                        }
                    }
                    Err(message) => {
                        let error = ShellControl::Error {
                            code: codes::VALIDATION_ERROR.into(),
                            message,
                        };
                        send_control(&mut client, &error).await;
                        break Some(codes::VALIDATION_ERROR.to_owned());
                    }
                },
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(_)) | Err(_)) | None => break Some("client_closed".to_owned()),
            },
            msg = worker.next() => match msg {
                Some(Ok(WsMessage::Binary(bytes))) => {
                    if client.send(Message::Binary(bytes)).await.is_err() {
                        break Some("client_closed".to_owned());
                    }
                }
                Some(Ok(WsMessage::Text(text))) => {
                    match serde_json::from_str::<wp::ShellControl>(text.as_str()) {
                        Ok(wp::ShellControl::Exit { exit_code: code, signal, timed_out }) => {
                            exit_code = code;
                            send_control(&mut client, &ShellControl::Exit { exit_code: code, signal, timed_out }).await;
                            break None;
                        }
                        Ok(wp::ShellControl::Error { code, message }) => {
                            send_control(&mut client, &ShellControl::Error { code: code.clone(), message }).await;
                            break Some(code);
                        }
                        Ok(wp::ShellControl::Resize { .. }) | Err(_) => {
                            tracing::warn!("a worker sent an unexpected shell control message");
                        }
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    let error = ShellControl::Error {
                        code: codes::WORKER_ERROR.into(),
                        message: "the bunker's worker closed the session".into(),
                    };
                    send_control(&mut client, &error).await;
                    break Some("worker_closed".to_owned());
                }
            },
        }
    };
    let _ = worker.close(None).await;
    let _ = client.send(Message::Close(None)).await;
    (exit_code, reason)
}

/// A client's text message as the worker's `resize`, or why it is refused.
fn resize(text: &str) -> Result<String, String> {
    match serde_json::from_str::<ShellControl>(text) {
        Ok(ShellControl::Resize { cols, rows })
            if (1..=MAX_TERMINAL_CELLS).contains(&cols)
                && (1..=MAX_TERMINAL_CELLS).contains(&rows) =>
        {
            Ok(serde_json::to_string(&wp::ShellControl::Resize { cols, rows })
                .expect("control messages always serialise"))
        }
        Ok(ShellControl::Resize { .. }) => Err(format!(
            "cols and rows must be 1..={MAX_TERMINAL_CELLS}"
        )),
        _ => Err(
            "text messages must be {\"type\":\"resize\",\"cols\":…,\"rows\":…}; terminal input goes in binary messages"
                .into(),
        ),
    }
}

async fn send_control(client: &mut WebSocket, msg: &ShellControl) {
    let text = serde_json::to_string(msg).expect("control messages always serialise");
    let _ = client.send(Message::Text(text.into())).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_resize_within_bounds_passes() {
        assert_eq!(
            resize(r#"{"type":"resize","cols":120,"rows":40}"#).as_deref(),
            Ok(r#"{"type":"resize","cols":120,"rows":40}"#)
        );
        assert!(resize(r#"{"type":"resize","cols":0,"rows":40}"#).is_err());
        assert!(resize(r#"{"type":"resize","cols":1001,"rows":40}"#).is_err());
        assert!(resize(r#"{"type":"exit","exit_code":0}"#).is_err());
        assert!(resize("ls\n").is_err());
    }
}
