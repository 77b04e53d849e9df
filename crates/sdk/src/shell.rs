//! Interactive shells: `GET /bunkers/{id}/shell` as a pair of halves, so that a terminal can
//! type and read at the same time.

use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use scaibunker_api::envelope::Error as ErrorEnvelope;
use scaibunker_api::exec::ExecUser;
use scaibunker_api::shell::ShellControl;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::SdkError;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How to open a shell; every field has the API's default.
#[derive(Debug, Clone, Default)]
pub struct ShellOptions {
    pub cols: Option<u16>,
    pub rows: Option<u16>,
    /// Run by `/bin/sh -c` (default `/bin/sh`).
    pub command: Option<String>,
    pub user: Option<ExecUser>,
}

/// What the terminal sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShellEvent {
    /// Terminal output, as produced.
    Output(Bytes),
    /// The shell ended; the last event.
    Exit {
        exit_code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
    },
}

/// The keyboard of a shell.
pub struct ShellWriter {
    sink: SplitSink<Socket, Message>,
}

/// The screen of a shell.
pub struct ShellReader {
    stream: SplitStream<Socket>,
    done: bool,
}

pub(crate) async fn open(
    url: String,
    token: Option<&str>,
) -> Result<(ShellWriter, ShellReader), SdkError> {
    let mut request = tungstenite::client::IntoClientRequest::into_client_request(url.as_str())
        .map_err(|e| ws_error(&url, e))?;
    if let Some(token) = token {
        let value = format!("Bearer {token}").parse().map_err(|_| {
            ws_error(
                &url,
                tungstenite::Error::Url(tungstenite::error::UrlError::EmptyHostName),
            )
        })?;
        request
            .headers_mut()
            .insert(tungstenite::http::header::AUTHORIZATION, value);
    }
    let socket = match tokio_tungstenite::connect_async(request).await {
        Ok((socket, _)) => socket,
        Err(tungstenite::Error::Http(resp)) => {
            let status = resp.status().as_u16();
            let envelope = resp
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice::<ErrorEnvelope>(b).ok());
            return Err(match envelope {
                Some(e) => SdkError::Api {
                    status,
                    code: e.error.code,
                    message: e.error.message,
                    details: e.error.details,
                    request_id: e.meta.request_id,
                },
                None => SdkError::Shell {
                    message: format!("the API answered {status} to the WebSocket upgrade"),
                },
            });
        }
        Err(e) => return Err(ws_error(&url, e)),
    };
    let (sink, stream) = socket.split();
    Ok((
        ShellWriter { sink },
        ShellReader {
            stream,
            done: false,
        },
    ))
}

fn ws_error(url: &str, e: tungstenite::Error) -> SdkError {
    SdkError::Shell {
        message: format!("WebSocket to {url}: {e}"),
    }
}

impl ShellWriter {
    /// Types `bytes` into the terminal.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), SdkError> {
        self.send_message(Message::Binary(Bytes::copy_from_slice(bytes)))
            .await
    }

    /// Changes the terminal's size.
    pub async fn resize(&mut self, cols: u16, rows: u16) -> Result<(), SdkError> {
        let text = serde_json::to_string(&ShellControl::Resize { cols, rows })
            .expect("control messages always serialise");
        self.send_message(Message::Text(text.into())).await
    }

    /// Closes the session; the shell is killed if it still runs.
    pub async fn close(mut self) -> Result<(), SdkError> {
        self.send_message(Message::Close(None)).await
    }

    async fn send_message(&mut self, msg: Message) -> Result<(), SdkError> {
        self.sink.send(msg).await.map_err(|e| SdkError::Shell {
            message: format!("sending to the shell: {e}"),
        })
    }
}

impl ShellReader {
    /// The next output or the exit; `None` once the session is over. A session that fails
    /// ends with an [`SdkError::Api`]-like error carrying the server's code.
    pub async fn next(&mut self) -> Option<Result<ShellEvent, SdkError>> {
        if self.done {
            return None;
        }
        loop {
            let msg = match self.stream.next().await {
                Some(Ok(msg)) => msg,
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(SdkError::Shell {
                        message: format!("the shell's WebSocket failed: {e}"),
                    }));
                }
                None => {
                    self.done = true;
                    return Some(Err(SdkError::Shell {
                        message: "the shell closed without an exit".into(),
                    }));
                }
            };
            match msg {
                Message::Binary(bytes) => return Some(Ok(ShellEvent::Output(bytes))),
                Message::Text(text) => {
                    self.done = true;
                    return Some(match serde_json::from_str::<ShellControl>(text.as_str()) {
                        Ok(ShellControl::Exit {
                            exit_code,
                            signal,
                            timed_out,
                        }) => Ok(ShellEvent::Exit {
                            exit_code,
                            signal,
                            timed_out,
                        }),
                        Ok(ShellControl::Error { code, message }) => {
                            Err(SdkError::ShellFailed { code, message })
                        }
                        Ok(other) => Err(SdkError::Shell {
                            message: format!("unexpected control message {other:?}"),
                        }),
                        Err(e) => Err(SdkError::Shell {
                            message: format!("malformed control message: {e}"),
                        }),
                    });
                }
                Message::Close(_) => {
                    self.done = true;
                    return Some(Err(SdkError::Shell {
                        message: "the shell closed without an exit".into(),
                    }));
                }
                _ => {}
            }
        }
    }
}
