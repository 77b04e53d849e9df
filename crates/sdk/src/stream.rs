//! Streamed exec: Server-Sent Events parsed into [`ExecEvent`]s, with automatic resume.
//!
//! If the connection breaks before the stream's end (`data: [DONE]`), [`ExecStream::next`]
//! reconnects to `GET /bunkers/{id}/exec/{exec_id}/events` with `Last-Event-ID` set to the
//! last event it delivered, so callers see every event exactly once.

use std::pin::Pin;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};

use crate::{Client, SdkError};

/// How many times a broken stream is resumed before giving up.
const MAX_RESUMES: u32 = 5;

/// One event of a streamed exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit {
        exit_code: Option<i32>,
        timed_out: bool,
        duration_ms: u64,
    },
    /// The exec failed on the platform side (`code` as in the API's error codes).
    Error {
        code: String,
        message: String,
    },
}

type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// A streamed exec being read.
pub struct ExecStream {
    client: Client,
    bunker_id: String,
    exec_id: String,
    body: ByteStream,
    buf: String,
    last_event_id: u64,
    resumes: u32,
    done: bool,
}

impl ExecStream {
    pub(crate) fn new(
        client: Client,
        bunker_id: String,
        exec_id: String,
        resp: reqwest::Response,
    ) -> Self {
        Self {
            client,
            bunker_id,
            exec_id,
            body: Box::pin(resp.bytes_stream()),
            buf: String::new(),
            last_event_id: 0,
            resumes: 0,
            done: false,
        }
    }

    pub fn exec_id(&self) -> &str {
        &self.exec_id
    }

    /// The next event, or `None` after the last one.
    pub async fn next(&mut self) -> Option<Result<ExecEvent, SdkError>> {
        loop {
            if self.done {
                return None;
            }
            if let Some(block) = self.take_block() {
                match self.parse(&block) {
                    Some(ev) => return Some(ev),
                    None => continue,
                }
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buf.push_str(&String::from_utf8_lossy(&chunk)),
                Some(Err(_)) | None => {
                    if let Err(e) = self.resume().await {
                        self.done = true;
                        return Some(Err(e));
                    }
                }
            }
        }
    }

    /// One complete SSE block (up to a blank line), if buffered.
    fn take_block(&mut self) -> Option<String> {
        let end = self.buf.find("\n\n")?;
        let block: String = self.buf.drain(..end + 2).collect();
        Some(block)
    }

    /// Parses one block; `None` for comments and the `[DONE]` end marker.
    fn parse(&mut self, block: &str) -> Option<Result<ExecEvent, SdkError>> {
        let (mut id, mut event, mut data) = (None, String::from("message"), String::new());
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("id:") {
                id = v.trim().parse::<u64>().ok();
            } else if let Some(v) = line.strip_prefix("event:") {
                event = v.trim().to_owned();
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push_str(v.strip_prefix(' ').unwrap_or(v));
            }
        }
        if data == "[DONE]" {
            self.done = true;
            return None;
        }
        if data.is_empty() {
            return None;
        }
        if let Some(id) = id {
            self.last_event_id = id;
        }
        let v: serde_json::Value = serde_json::from_str(&data).unwrap_or_default();
        let bytes = || match (v["data"].as_str(), v["data_b64"].as_str()) {
            (Some(t), _) => t.as_bytes().to_vec(),
            (None, Some(b)) => B64.decode(b).unwrap_or_default(),
            _ => Vec::new(),
        };
        Some(Ok(match event.as_str() {
            "stdout" => ExecEvent::Stdout(bytes()),
            "stderr" => ExecEvent::Stderr(bytes()),
            "exit" => ExecEvent::Exit {
                exit_code: v["exit_code"].as_i64().map(|c| c as i32),
                timed_out: v["timed_out"].as_bool().unwrap_or(false),
                duration_ms: v["duration_ms"].as_u64().unwrap_or(0),
            },
            _ => ExecEvent::Error {
                code: v["code"].as_str().unwrap_or("UNKNOWN").to_owned(),
                message: v["message"].as_str().unwrap_or_default().to_owned(),
            },
        }))
    }

    /// Reconnects after the last delivered event.
    async fn resume(&mut self) -> Result<(), SdkError> {
        if self.resumes >= MAX_RESUMES {
            return Err(SdkError::StreamBroken {
                exec_id: self.exec_id.clone(),
            });
        }
        self.resumes += 1;
        self.buf.clear();
        let resp = self
            .client
            .exec_events(&self.bunker_id, &self.exec_id, self.last_event_id)
            .await?;
        self.body = Box::pin(resp.bytes_stream());
        Ok(())
    }
}
