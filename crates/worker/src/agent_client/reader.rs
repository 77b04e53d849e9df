//! The reading half of the agent channel: frames out of the byte stream, and the way back
//! into step when the stream stops parsing.
//!
//! Resynchronisation (protocol rule 9): after a header that does not parse (an unknown
//! kind, a length over the frame limit) the reader cannot know where the next frame
//! starts. The worker asks the agent to reset (`RESET`), and [`FrameReader::resync`] skips
//! bytes until a well-formed `HELLO` of our protocol version: the agent's first frame of
//! its new session. Whatever stood before it belonged to the old session.

use scaibunker_proto::agent::{
    Frame, FrameError, FrameKind, HEADER_LEN, Hello, MAX_FRAME_PAYLOAD, PROTOCOL_VERSION,
};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The first five header bytes of every `HELLO`: stream 0, kind `HELLO`.
const HELLO_PREFIX: [u8; 5] = [0, 0, 0, 0, FrameKind::Hello as u8];

/// Frames from a byte stream, with the bytes read ahead kept for the next frame.
pub struct FrameReader<R> {
    read: R,
    buf: Vec<u8>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(read: R) -> Self {
        Self {
            read,
            buf: Vec::with_capacity(HEADER_LEN + MAX_FRAME_PAYLOAD),
        }
    }

    /// Reads until at least `n` bytes are buffered; `false` at the end of the stream.
    async fn fill(&mut self, n: usize) -> std::io::Result<bool> {
        while self.buf.len() < n {
            if self.read.read_buf(&mut self.buf).await? == 0 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The next frame; `Ok(None)` when the peer closed the stream between frames. A header
    /// that does not parse is an error and leaves the reader where it was, for
    /// [`Self::resync`].
    pub async fn next(&mut self) -> Result<Option<Frame>, FrameError> {
        if !self.fill(HEADER_LEN).await.map_err(FrameError::Io)? {
            if self.buf.is_empty() {
                return Ok(None);
            }
            return Err(FrameError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        let header: [u8; HEADER_LEN] = self.buf[..HEADER_LEN]
            .try_into()
            .expect("the buffer holds a whole header");
        let (stream_id, kind, len) = Frame::parse_header(&header)?;
        if !self.fill(HEADER_LEN + len).await.map_err(FrameError::Io)? {
            return Err(FrameError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        let payload = self.buf[HEADER_LEN..HEADER_LEN + len].to_vec();
        self.buf.drain(..HEADER_LEN + len);
        Ok(Some(Frame::new(stream_id, kind, payload)))
    }

    /// Skips bytes up to and including the next well-formed `HELLO` of our protocol
    /// version and returns it; `Ok(None)` if the stream ends first. Every candidate that
    /// turns out not to be one (a length over the limit, a payload that is not a hello)
    /// costs one byte, so the scan always moves on.
    pub async fn resync(&mut self) -> std::io::Result<Option<Hello>> {
        loop {
            match find(&self.buf, &HELLO_PREFIX) {
                Some(at) => {
                    self.buf.drain(..at);
                }
                None => {
                    // A prefix may straddle what is buffered and what is still to come.
                    let keep = self.buf.len().min(HELLO_PREFIX.len() - 1);
                    self.buf.drain(..self.buf.len() - keep);
                    if self.read.read_buf(&mut self.buf).await? == 0 {
                        return Ok(None);
                    }
                    continue;
                }
            }
            if !self.fill(HEADER_LEN).await? {
                return Ok(None);
            }
            let len =
                u32::from_be_bytes([self.buf[5], self.buf[6], self.buf[7], self.buf[8]]) as usize;
            if len <= MAX_FRAME_PAYLOAD {
                if !self.fill(HEADER_LEN + len).await? {
                    return Ok(None);
                }
                let payload = &self.buf[HEADER_LEN..HEADER_LEN + len];
                if let Ok(hello) = serde_json::from_slice::<Hello>(payload)
                    && hello.protocol_version == PROTOCOL_VERSION
                {
                    self.buf.drain(..HEADER_LEN + len);
                    return Ok(Some(hello));
                }
            }
            self.buf.drain(..1);
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: "test".into(),
            kernel: "6.1".into(),
        }
    }

    #[tokio::test]
    async fn reads_frames_split_anyhow_across_reads() {
        let a = Frame::new(3, FrameKind::Stdout, b"hello".to_vec());
        let b = Frame::new(4, FrameKind::Data, vec![7; 70_000.min(MAX_FRAME_PAYLOAD)]);
        let mut bytes = a.encode();
        bytes.extend(b.encode());
        let (mut tx, rx) = tokio::io::duplex(7);
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            tx.write_all(&bytes).await.expect("write");
        });
        let mut reader = FrameReader::new(rx);
        assert_eq!(reader.next().await.expect("a").expect("frame"), a);
        assert_eq!(reader.next().await.expect("b").expect("frame"), b);
        assert!(reader.next().await.expect("end").is_none());
    }

    #[tokio::test]
    async fn finds_the_next_hello_after_garbage_and_reads_on_from_there() {
        let mut bytes = Frame::header(9, FrameKind::Data, MAX_FRAME_PAYLOAD + 1).to_vec();
        bytes.extend_from_slice(b"\0\0\0\0\x01garbage that looks like a hello prefix");
        // A hello of another protocol version is not the way back in.
        let mut old = hello();
        old.protocol_version -= 1;
        bytes.extend(Frame::json(0, FrameKind::Hello, &old).encode());
        bytes.extend(Frame::json(0, FrameKind::Hello, &hello()).encode());
        let after = Frame::new(5, FrameKind::Reply, b"{}".to_vec());
        bytes.extend(after.encode());
        let mut reader = FrameReader::new(bytes.as_slice());
        assert!(matches!(reader.next().await, Err(FrameError::TooLarge(_))));
        assert_eq!(reader.resync().await.expect("resync"), Some(hello()));
        assert_eq!(reader.next().await.expect("next").expect("frame"), after);
    }

    #[tokio::test]
    async fn a_stream_that_ends_without_a_hello_ends_the_resync() {
        let mut reader = FrameReader::new(&b"\0\0\0\0\x01\0\0\0\x05{"[..]);
        assert_eq!(reader.resync().await.expect("resync"), None);
    }
}
