//! The agent's end of the byte stream to the worker, shared by every stream.
//!
//! Invariants:
//! 1. All writes go through [`Conn::write_frame`], which holds one lock for one whole
//!    frame, so frames of concurrent streams never interleave.
//! 2. Once a connection is closed ([`Conn::close`]) nothing more is written on it, not
//!    even the rest of a frame that was being written: the descriptor is non-blocking and
//!    a writer waiting for room re-checks the closed flag at least every 100 ms. This
//!    matters for virtio-serial, where a write blocks while the host side is disconnected
//!    and would otherwise deliver a stale frame tail to the next host connection, and
//!    where the port can only be reopened once every descriptor of it is closed.
//! 3. A [`StreamTx`] sends exactly one `REPLY`; after it, the stream's other senders (exec
//!    output pumps) are refused under the same lock, so nothing follows the `REPLY`.
//! 4. A [`StreamTx`] sends an output frame only with credit (the protocol's window): a
//!    sender without credit waits (re-checking every 100 ms whether the stream or the
//!    connection ended), so a worker that stops reading one stream stalls that stream's
//!    producer only.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::Duration;

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::io::Errno;
use scaibunker_proto::agent::{Frame, FrameKind, Reply, STREAM_WINDOW_FRAMES, WindowSize};

/// How long a writer waits for room before re-checking whether the connection closed.
const WRITE_RECHECK: Duration = Duration::from_millis(100);

/// What the worker sends on an open stream after its `REQUEST`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamInput {
    Data(Vec<u8>),
    End,
    Cancel,
    Resize(WindowSize),
}

/// Locks `m`, ignoring poisoning: every value guarded here stays consistent when a
/// holder panics (a flag, a map, a descriptor).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The write half of one connection to the worker.
#[derive(Debug)]
pub struct Conn {
    fd: Mutex<Option<OwnedFd>>,
    closed: AtomicBool,
}

impl Conn {
    /// Takes a connected descriptor, makes it non-blocking and returns the shared write
    /// half and a blocking-style reader over a duplicate.
    pub fn new(fd: OwnedFd) -> io::Result<(Arc<Conn>, ConnReader)> {
        let flags = rustix::fs::fcntl_getfl(&fd)?;
        rustix::fs::fcntl_setfl(&fd, flags | rustix::fs::OFlags::NONBLOCK)?;
        let reader = ConnReader {
            fd: fd.try_clone()?,
        };
        let conn = Arc::new(Conn {
            fd: Mutex::new(Some(fd)),
            closed: AtomicBool::new(false),
        });
        Ok((conn, reader))
    }

    /// Writes one whole frame, or nothing once the connection is closed.
    pub fn write_frame(&self, frame: &Frame) -> io::Result<()> {
        let guard = lock(&self.fd);
        let Some(fd) = guard.as_ref() else {
            return Err(closed_error());
        };
        let mut w = PollWriter {
            fd: fd.as_fd(),
            closed: &self.closed,
        };
        let res = frame.write_to(&mut w);
        if res.is_err() {
            // A failed write leaves the peer with a torn frame; nothing after it can be
            // parsed, so the connection is over.
            self.closed.store(true, Ordering::SeqCst);
        }
        res
    }

    /// Marks the connection closed and closes its write descriptor once any in-flight
    /// write has given up.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        lock(&self.fd).take();
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}

fn closed_error() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "agent channel closed")
}

/// `Write` over a non-blocking descriptor that waits for room with `poll` and gives up
/// when the connection is closed.
struct PollWriter<'a> {
    fd: BorrowedFd<'a>,
    closed: &'a AtomicBool,
}

impl Write for PollWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            if self.closed.load(Ordering::SeqCst) {
                return Err(closed_error());
            }
            match rustix::io::write(self.fd, buf) {
                Ok(n) => return Ok(n),
                Err(Errno::INTR) => {}
                Err(Errno::AGAIN) => {
                    let mut fds = [PollFd::from_borrowed_fd(self.fd, PollFlags::OUT)];
                    let timeout = Timespec::try_from(WRITE_RECHECK).ok();
                    match poll(&mut fds, timeout.as_ref()) {
                        Ok(_) | Err(Errno::INTR) => {}
                        Err(e) => return Err(e.into()),
                    }
                    // A virtio port whose host side is away polls as HUP without OUT at
                    // once; sleep instead of spinning until the host comes back.
                    let revents = fds[0].revents();
                    if !revents.is_empty() && !revents.contains(PollFlags::OUT) {
                        thread::sleep(WRITE_RECHECK);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The read half of a connection: blocks in `poll` while the descriptor has nothing.
#[derive(Debug)]
pub struct ConnReader {
    fd: OwnedFd,
}

impl Read for ConnReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match rustix::io::read(&self.fd, &mut *buf) {
                Ok(n) => return Ok(n),
                Err(Errno::INTR) => {}
                Err(Errno::AGAIN) => {
                    let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
                    match poll(&mut fds, None) {
                        Ok(_) | Err(Errno::INTR) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Why a frame for a stream was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("stream {0} is finished or its channel is closed")]
pub struct StreamClosed(pub u32);

/// The sending side of one stream, shared by its handler and helper threads.
#[derive(Debug)]
pub struct StreamTx {
    conn: Arc<Conn>,
    id: u32,
    replied: Mutex<bool>,
    /// Output frames the worker still allows (rule 4).
    credit: Mutex<u32>,
    credit_granted: Condvar,
}

impl StreamTx {
    pub fn new(conn: Arc<Conn>, id: u32) -> Self {
        Self {
            conn,
            id,
            replied: Mutex::new(false),
            credit: Mutex::new(STREAM_WINDOW_FRAMES),
            credit_granted: Condvar::new(),
        }
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    /// Adds `frames` of credit (a `CREDIT` frame arrived).
    pub fn grant(&self, frames: u32) {
        let mut credit = lock(&self.credit);
        *credit = credit.saturating_add(frames);
        self.credit_granted.notify_all();
    }

    /// Takes one frame of credit, waiting for it while the stream and connection are open.
    fn take_credit(&self) -> Result<(), StreamClosed> {
        let mut credit = lock(&self.credit);
        while *credit == 0 {
            if !self.is_open() {
                return Err(StreamClosed(self.id));
            }
            credit = self
                .credit_granted
                .wait_timeout(credit, WRITE_RECHECK)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        *credit -= 1;
        Ok(())
    }

    /// Sends a `DATA`, `STDOUT` or `STDERR` frame once the stream has credit for it, unless
    /// the stream already replied or the connection is closed.
    pub fn send(&self, kind: FrameKind, payload: &[u8]) -> Result<(), StreamClosed> {
        self.take_credit()?;
        let replied = lock(&self.replied);
        if *replied || self.conn.is_closed() {
            return Err(StreamClosed(self.id));
        }
        self.conn
            .write_frame(&Frame::new(self.id, kind, payload.to_vec()))
            .map_err(|_| StreamClosed(self.id))
    }

    /// Sends the stream's terminal `REPLY`. Only the first call sends anything; it returns
    /// whether this call was that first one.
    pub fn reply(&self, reply: &Reply) -> bool {
        let mut replied = lock(&self.replied);
        if *replied {
            return false;
        }
        *replied = true;
        // A failed write closed the connection; the worker learns of it from the
        // reset, so there is nobody left to tell.
        let _ = self
            .conn
            .write_frame(&Frame::json(self.id, FrameKind::Reply, reply));
        true
    }

    /// Whether the stream can still send: no `REPLY` yet and the connection is open.
    pub fn is_open(&self) -> bool {
        !*lock(&self.replied) && !self.conn.is_closed()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use scaibunker_proto::agent::AgentErrorCode;

    use super::*;

    fn pair() -> (Arc<Conn>, UnixStream) {
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        let (conn, _reader) = Conn::new(OwnedFd::from(ours)).expect("conn");
        (conn, theirs)
    }

    #[test]
    fn stream_sends_nothing_after_its_reply() {
        let (conn, mut peer) = pair();
        let tx = StreamTx::new(conn.clone(), 3);
        tx.send(FrameKind::Stdout, b"hi")
            .expect("open stream sends");
        assert!(tx.reply(&Reply::Removed));
        assert!(!tx.reply(&Reply::Removed), "second reply is refused");
        assert_eq!(tx.send(FrameKind::Stdout, b"late"), Err(StreamClosed(3)));
        conn.close();
        let first = Frame::read_from(&mut peer).expect("frame").expect("some");
        assert_eq!(first.kind, FrameKind::Stdout);
        let second = Frame::read_from(&mut peer).expect("frame").expect("some");
        assert_eq!(second.kind, FrameKind::Reply);
        assert!(Frame::read_from(&mut peer).expect("clean eof").is_none());
    }

    #[test]
    fn a_stream_without_credit_waits_until_granted_or_closed() {
        let (conn, mut peer) = pair();
        let tx = Arc::new(StreamTx::new(conn.clone(), 5));
        for _ in 0..STREAM_WINDOW_FRAMES {
            tx.send(FrameKind::Data, b"x").expect("within the window");
        }
        let blocked = {
            let tx = Arc::clone(&tx);
            thread::spawn(move || tx.send(FrameKind::Data, b"late"))
        };
        thread::sleep(Duration::from_millis(300));
        assert!(!blocked.is_finished(), "no credit, no frame");
        tx.grant(1);
        blocked.join().expect("joins").expect("sent once granted");
        for _ in 0..=STREAM_WINDOW_FRAMES {
            let f = Frame::read_from(&mut peer).expect("frame").expect("some");
            assert_eq!(f.kind, FrameKind::Data);
        }
        let waiting = {
            let tx = Arc::clone(&tx);
            thread::spawn(move || tx.send(FrameKind::Data, b"never"))
        };
        conn.close();
        assert_eq!(waiting.join().expect("joins"), Err(StreamClosed(5)));
    }

    #[test]
    fn closed_connection_refuses_frames() {
        let (conn, _peer) = pair();
        conn.close();
        let tx = StreamTx::new(conn, 1);
        assert!(!tx.is_open());
        assert!(tx.send(FrameKind::Data, b"x").is_err());
        tx.reply(&Reply::Error {
            code: AgentErrorCode::Io,
            message: "gone".into(),
        });
    }
}
