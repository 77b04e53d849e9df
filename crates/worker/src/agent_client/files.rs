//! File and directory operations on the agent: uploads and archives in (`DATA` frames
//! with the request), downloads out, listings and removals.

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use scaibunker_proto::agent::{
    DirEntry, FrameKind, GuestUser, MAX_FRAME_PAYLOAD, MAX_LIST_LIMIT, Reply, Request,
};

use super::{AgentClient, AgentError, ByteStream, REPLY_TIMEOUT, WriteFileError, protocol};

/// One page of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirPage {
    pub entries: Vec<DirEntry>,
    /// Where the next page starts; `None` on the last page.
    pub next_after_hex: Option<String>,
}

impl AgentClient {
    /// Streams `body` into `path` (written atomically by the agent). If the body fails, the
    /// upload is cancelled so the agent removes its temporary file.
    pub async fn write_file<S, E>(
        &self,
        path: String,
        mode: u32,
        user: GuestUser,
        body: S,
    ) -> Result<u64, WriteFileError<E>>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
    {
        self.upload(&Request::WriteFile { path, mode, user }, body)
            .await
    }

    /// Streams a tar `body` into the directory `path`; the agent unpacks it all or nothing.
    /// Returns the number of archive bytes sent.
    pub async fn write_archive<S, E>(
        &self,
        path: String,
        user: GuestUser,
        body: S,
    ) -> Result<u64, WriteFileError<E>>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
    {
        self.upload(&Request::WriteArchive { path, user }, body)
            .await
    }

    /// Sends `request` and `body` as its `DATA` frames; cancels the stream if the body fails.
    async fn upload<S, E>(&self, request: &Request, body: S) -> Result<u64, WriteFileError<E>>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
    {
        let mut stream = self.open(request).await?;
        let sender = stream.sender();
        let mut body = std::pin::pin!(body);
        loop {
            tokio::select! {
                biased;
                // The agent may refuse before the body ends (bad path, full disk).
                frame = stream.recv() => {
                    let frame = frame?;
                    return Err(stream.early_reply(&frame).into());
                }
                chunk = body.next() => match chunk {
                    Some(Ok(bytes)) => {
                        for part in bytes.chunks(MAX_FRAME_PAYLOAD) {
                            sender.send(FrameKind::Data, part.to_vec()).await?;
                        }
                    }
                    Some(Err(e)) => {
                        stream.cancel_and_drain().await;
                        return Err(WriteFileError::Body(e));
                    }
                    None => break,
                },
            }
        }
        sender.send(FrameKind::End, Vec::new()).await?;
        let frame = stream.recv_within(REPLY_TIMEOUT).await?;
        match stream.expect_reply(&frame)? {
            Reply::Written { size_bytes } => Ok(size_bytes),
            other => Err(stream.unexpected(&format!("reply {other:?}")).into()),
        }
    }

    /// Opens `path` for reading. Errors the agent reports before the first byte (not found,
    /// a directory) come back here, so callers can answer before they start streaming.
    pub async fn read_file(&self, path: String, user: GuestUser) -> Result<ByteStream, AgentError> {
        self.download(&Request::ReadFile { path, user }).await
    }

    /// A tar stream of the directory `path`; errors before the first byte come back here.
    pub async fn read_archive(
        &self,
        path: String,
        user: GuestUser,
    ) -> Result<ByteStream, AgentError> {
        self.download(&Request::ReadArchive { path, user }).await
    }

    async fn download(&self, request: &Request) -> Result<ByteStream, AgentError> {
        let mut stream = self.open(request).await?;
        let first = stream.recv_within(REPLY_TIMEOUT).await?;
        let first = match first.kind {
            FrameKind::Data => Some(Bytes::from(first.payload)),
            FrameKind::Reply => match stream.reply(&first)? {
                Reply::Read { .. } => None,
                other => return Err(stream.unexpected(&format!("reply {other:?}"))),
            },
            other => return Err(stream.unexpected(&format!("{other:?} frame"))),
        };
        let Some(first) = first else {
            return Ok(Box::pin(futures_util::stream::empty()));
        };
        let rest = futures_util::stream::unfold(Some(stream), |state| async move {
            let mut stream = state?;
            let item = match stream.recv_within(REPLY_TIMEOUT).await {
                Ok(frame) if frame.kind == FrameKind::Data => Ok(Some(Bytes::from(frame.payload))),
                Ok(frame) if frame.kind == FrameKind::Reply => match stream.reply(&frame) {
                    Ok(Reply::Read { .. }) => Ok(None),
                    Ok(other) => Err(stream.unexpected(&format!("reply {other:?}"))),
                    Err(e) => Err(e),
                },
                Ok(frame) => Err(stream.unexpected(&format!("{:?} frame", frame.kind))),
                Err(e) => Err(e),
            };
            match item {
                Ok(Some(bytes)) => Some((Ok(bytes), Some(stream))),
                Ok(None) => None,
                // One error, then the end; dropping the stream cancels it if still open.
                Err(e) => Some((Err(e), None)),
            }
        });
        Ok(Box::pin(
            futures_util::stream::once(async move { Ok(first) }).chain(rest),
        ))
    }

    /// One page of the directory `path`: at most `limit` entries after the name whose hex is
    /// `after_hex`. The agent streams the entries as JSON lines; more entries or bytes than
    /// the page can hold are a protocol violation, so a hostile agent cannot make the
    /// worker buffer without bound.
    pub async fn list_dir(
        &self,
        path: String,
        user: GuestUser,
        after_hex: Option<String>,
        limit: u32,
    ) -> Result<DirPage, AgentError> {
        let limit = limit.clamp(1, MAX_LIST_LIMIT);
        let mut stream = self
            .open(&Request::ListDir {
                path,
                user,
                after_hex,
                limit,
            })
            .await?;
        let mut entries = Vec::new();
        let mut partial = Vec::new();
        loop {
            let frame = stream.recv_within(REPLY_TIMEOUT).await?;
            match frame.kind {
                FrameKind::Data => {
                    partial.extend_from_slice(&frame.payload);
                    while let Some(end) = partial.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = partial.drain(..=end).collect();
                        let entry: DirEntry = serde_json::from_slice(&line[..end])
                            .map_err(|e| stream.unexpected(&format!("malformed entry: {e}")))?;
                        entries.push(entry);
                        if entries.len() > limit as usize {
                            return Err(stream.unexpected("more entries than the page's limit"));
                        }
                    }
                    if partial.len() > MAX_FRAME_PAYLOAD {
                        return Err(stream.unexpected("an entry longer than a frame"));
                    }
                }
                FrameKind::Reply => {
                    return match stream.reply(&frame)? {
                        Reply::Listing {
                            has_more,
                            next_after_hex,
                        } if partial.is_empty() => Ok(DirPage {
                            entries,
                            next_after_hex: if has_more { next_after_hex } else { None },
                        }),
                        other => Err(stream.unexpected(&format!("reply {other:?}"))),
                    };
                }
                other => return Err(stream.unexpected(&format!("{other:?} frame"))),
            }
        }
    }

    pub async fn remove(
        &self,
        path: String,
        recursive: bool,
        user: GuestUser,
    ) -> Result<(), AgentError> {
        let request = Request::Remove {
            path,
            recursive,
            user,
        };
        match self.call(&request).await? {
            Reply::Removed => Ok(()),
            other => Err(protocol(0, &format!("remove answered {other:?}"))),
        }
    }
}
