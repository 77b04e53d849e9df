//! `serve`: the agent's side of the worker ↔ agent protocol.
//!
//! 1. Open the channel: the virtio-serial port named [`PORT_NAME`] (found under
//!    `/sys/class/virtio-ports`), a given device path, or a unix socket (tests).
//! 2. Send `HELLO`.
//! 3. One reader thread (the caller's) reads frames: `REQUEST` registers the stream and
//!    starts a handler thread; `DATA`/`END`/`CANCEL` go to that stream's handler through
//!    its channel; frames for unknown streams are ignored.
//! 4. When the read ends (the host side disconnected, a malformed frame left the byte
//!    stream out of step, or the worker sent `RESET` because it lost its own place), the
//!    session is reset: the connection is closed so nothing more
//!    is written, every stream's input channel is dropped (exec handlers kill their
//!    process groups, uploads remove their temporary files), and the handlers get a few
//!    seconds to finish.
//! 5. Port: sleep 100 ms, reopen the port and go to 2. Unix socket: return.
//!
//! Frames of guest streams (protocol rule 10) go to the [`Backchannel`], which outlives the
//! sessions: its socket ([`crate::backchannel::API_SOCKET`] in a guest) is bound once,
//! and each session attaches its connection to it and detaches it at reset.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use scaibunker_proto::agent::{
    AgentErrorCode, Frame, FrameError, FrameKind, GuestUser, Hello, PORT_NAME, PROTOCOL_VERSION,
    Reply, Request, WindowSize, is_guest_stream,
};

use crate::backchannel::{self, Backchannel};
use crate::channel::{Conn, StreamInput, StreamTx, lock};
use crate::exec::{self, ExecRequest};
use crate::{AGENT_VERSION, archive, creds, disk, error_reply, files, identity, log};

/// Where `/sys` lists virtio-serial ports.
const VIRTIO_PORTS_DIR: &str = "/sys/class/virtio-ports";
/// How long `--port auto` waits for the port to appear.
const PORT_WAIT: Duration = Duration::from_secs(10);
/// Pause before reopening the port after the host disconnected.
const REOPEN_DELAY: Duration = Duration::from_millis(100);
/// How long a reset waits for the handlers of the old session to wind down.
const RESET_WAIT: Duration = Duration::from_secs(5);

/// Where the agent talks to the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// The virtio-serial port named [`PORT_NAME`].
    AutoPort,
    /// A character device given by path.
    Port(PathBuf),
    /// A unix socket to connect to; the agent exits when it closes.
    Unix(PathBuf),
}

/// Why `serve` stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("no virtio port named `{PORT_NAME}` appeared under {VIRTIO_PORTS_DIR} within {0:?}")]
    PortNotFound(Duration),
    #[error("open port `{path}`")]
    OpenPort {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("connect to `{path}`")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("set up the channel")]
    Channel(#[source] io::Error),
    #[error("send HELLO")]
    Hello(#[source] io::Error),
}

/// Serves `endpoint`, and the backchannel on `api_socket` when given; returns only for a
/// unix socket (when it closes) or on an error. A backchannel socket that cannot be bound
/// is logged: exec and files keep working without it.
pub fn serve(endpoint: &Endpoint, api_socket: Option<&Path>) -> Result<(), ServeError> {
    let bc = Backchannel::new();
    if let Some(socket) = api_socket {
        match backchannel::serve_socket(socket, Arc::clone(&bc)) {
            Ok(()) => log!("backchannel on {}", socket.display()),
            Err(e) => log!("bind the backchannel socket {}: {e}", socket.display()),
        }
    }
    match endpoint {
        Endpoint::Unix(path) => {
            let stream = UnixStream::connect(path).map_err(|source| ServeError::Connect {
                path: path.clone(),
                source,
            })?;
            run_session(OwnedFd::from(stream), &bc)
        }
        Endpoint::AutoPort => {
            let path = wait_for_port(PORT_WAIT)?;
            serve_port(&path, &bc)
        }
        Endpoint::Port(path) => serve_port(path, &bc),
    }
}

fn serve_port(path: &Path, bc: &Arc<Backchannel>) -> Result<(), ServeError> {
    log!("serving on {}", path.display());
    loop {
        run_session(open_port(path)?, bc)?;
        log!("host side of {} disconnected; reopening", path.display());
        thread::sleep(REOPEN_DELAY);
    }
}

/// Opens the port read-write. virtio-serial allows one open at a time, so a reopen can
/// briefly see `EBUSY` while the last descriptor of the previous session closes.
fn open_port(path: &Path) -> Result<OwnedFd, ServeError> {
    let give_up = Instant::now() + PORT_WAIT;
    loop {
        match OpenOptions::new().read(true).write(true).open(path) {
            Ok(file) => return Ok(OwnedFd::from(file)),
            Err(e)
                if e.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error())
                    && Instant::now() < give_up =>
            {
                thread::sleep(REOPEN_DELAY);
            }
            Err(source) => {
                return Err(ServeError::OpenPort {
                    path: path.to_owned(),
                    source,
                });
            }
        }
    }
}

/// Polls `/sys/class/virtio-ports/*/name` for [`PORT_NAME`]; returns `/dev/<port>`.
fn wait_for_port(wait: Duration) -> Result<PathBuf, ServeError> {
    let give_up = Instant::now() + wait;
    loop {
        if let Some(path) = find_port(Path::new(VIRTIO_PORTS_DIR), Path::new("/dev")) {
            return Ok(path);
        }
        if Instant::now() >= give_up {
            return Err(ServeError::PortNotFound(wait));
        }
        thread::sleep(Duration::from_millis(100));
    }
}

fn find_port(sys_dir: &Path, dev_dir: &Path) -> Option<PathBuf> {
    fs::read_dir(sys_dir).ok()?.flatten().find_map(|entry| {
        let name = fs::read_to_string(entry.path().join("name")).ok()?;
        (name.trim() == PORT_NAME).then(|| dev_dir.join(entry.file_name()))
    })
}

fn hello_frame() -> Frame {
    let uname = rustix::system::uname();
    Frame::json(
        0,
        FrameKind::Hello,
        &Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: AGENT_VERSION.to_owned(),
            kernel: uname.release().to_string_lossy().into_owned(),
        },
    )
}

/// The input channels of a session's open streams, by stream id.
/// Open streams: where their input goes, and their sender (for `CREDIT`).
type Registry = Arc<Mutex<HashMap<u32, (Sender<StreamInput>, Arc<StreamTx>)>>>;

/// Number of running handler threads of a session, to wait for them at reset.
#[derive(Debug, Default)]
struct Active {
    count: Mutex<usize>,
    idle: Condvar,
}

impl Active {
    fn wait_idle(&self, timeout: Duration) -> bool {
        let guard = lock(&self.count);
        let (guard, _) = self
            .idle
            .wait_timeout_while(guard, timeout, |n| *n > 0)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *guard == 0
    }
}

/// Serves one connection until it ends, then resets (steps 2–4).
fn run_session(fd: OwnedFd, bc: &Arc<Backchannel>) -> Result<(), ServeError> {
    let (conn, mut reader) = Conn::new(fd).map_err(ServeError::Channel)?;
    conn.write_frame(&hello_frame())
        .map_err(ServeError::Hello)?;
    bc.attach(Arc::clone(&conn));
    let session = Session {
        conn,
        streams: Registry::default(),
        active: Arc::new(Active::default()),
        bc: Arc::clone(bc),
    };
    loop {
        match Frame::read_from(&mut reader) {
            Ok(Some(frame)) if frame.stream_id == 0 && frame.kind == FrameKind::Reset => {
                log!("the worker asked for a reset; resetting the session");
                break;
            }
            Ok(Some(frame)) => session.dispatch(frame),
            Ok(None) => break,
            Err(FrameError::Io(e)) => {
                log!("read from the channel: {e}");
                break;
            }
            Err(e) => {
                log!("malformed frame ({e}); resetting the session");
                break;
            }
        }
    }
    session.reset();
    Ok(())
}

struct Session {
    conn: Arc<Conn>,
    streams: Registry,
    active: Arc<Active>,
    bc: Arc<Backchannel>,
}

impl Session {
    fn dispatch(&self, frame: Frame) {
        // The guest's id space: only backchannel answers live there (rule 10).
        if is_guest_stream(frame.stream_id) {
            return self.bc.deliver(frame);
        }
        let input = match frame.kind {
            FrameKind::Request => return self.open_stream(frame),
            FrameKind::Data => StreamInput::Data(frame.payload),
            FrameKind::End => StreamInput::End,
            FrameKind::Cancel => StreamInput::Cancel,
            FrameKind::Resize => match frame.decode_json::<WindowSize>() {
                Ok(size) => StreamInput::Resize(size),
                Err(e) => {
                    log!(
                        "ignoring a malformed RESIZE on stream {}: {e}",
                        frame.stream_id
                    );
                    return;
                }
            },
            FrameKind::Credit => {
                match frame.credit_frames() {
                    Some(n) => {
                        if let Some((_, tx)) = lock(&self.streams).get(&frame.stream_id) {
                            tx.grant(n);
                        }
                    }
                    None => log!("ignoring a malformed CREDIT on stream {}", frame.stream_id),
                }
                return;
            }
            FrameKind::Hello
            | FrameKind::Stdout
            | FrameKind::Stderr
            | FrameKind::Reply
            | FrameKind::Reset
            | FrameKind::ApiRequest
            | FrameKind::ApiResponse => {
                log!("ignoring a {:?} frame from the worker", frame.kind);
                return;
            }
        };
        if let Some((sender, _)) = lock(&self.streams).get(&frame.stream_id) {
            // The handler may have just finished; its input no longer matters.
            let _ = sender.send(input);
        }
    }

    fn open_stream(&self, frame: Frame) {
        let id = frame.stream_id;
        if id == 0 {
            log!("ignoring a REQUEST on stream 0");
            return;
        }
        let (input_tx, input_rx) = mpsc::channel();
        let tx = Arc::new(StreamTx::new(Arc::clone(&self.conn), id));
        {
            let mut streams = lock(&self.streams);
            if streams.contains_key(&id) {
                log!("ignoring a second REQUEST on open stream {id}");
                return;
            }
            streams.insert(id, (input_tx, Arc::clone(&tx)));
        }
        *lock(&self.active.count) += 1;
        let guard = StreamGuard {
            tx,
            streams: Arc::clone(&self.streams),
            active: Arc::clone(&self.active),
        };
        // Decoding happens on the handler thread so that the reader never writes: a
        // write may wait for the host, and the host may be waiting for us to read.
        let spawned = thread::Builder::new()
            .name(format!("stream-{id}"))
            .spawn(move || {
                let reply = match frame.decode_json::<Request>() {
                    Ok(request) => handle(request, &guard.tx, input_rx),
                    Err(e) => error_reply(AgentErrorCode::BadRequest, &e),
                };
                guard.tx.reply(&reply);
            });
        if let Err(e) = spawned {
            // The closure and its guard were dropped, which already replied.
            log!("start a handler for stream {id}: {e}");
        }
    }

    fn reset(self) {
        self.bc.detach();
        self.conn.close();
        lock(&self.streams).clear();
        if !self.active.wait_idle(RESET_WAIT) {
            log!("some handlers are still running {RESET_WAIT:?} after the reset");
        }
    }
}

/// Runs one request to its `REPLY`.
fn handle(request: Request, tx: &Arc<StreamTx>, input: mpsc::Receiver<StreamInput>) -> Reply {
    match request {
        Request::Exec {
            program,
            env,
            cwd,
            user,
            stdin,
            timeout_ms,
            pty,
        } => exec::run(
            ExecRequest {
                program,
                env,
                cwd,
                user,
                stdin,
                timeout_ms,
                pty,
            },
            tx,
            input,
        ),
        Request::WriteFile { path, mode, user } => {
            as_user(user, || files::write_file(&path, mode, user, &input))
        }
        Request::ReadFile { path, user } => as_user(user, || files::read_file(&path, tx, &input)),
        Request::ListDir {
            path,
            user,
            after_hex,
            limit,
        } => as_user(user, || {
            files::list_dir(&path, after_hex.as_deref(), limit, tx)
        }),
        Request::Remove {
            path,
            recursive,
            user,
        } => as_user(user, || files::remove(&path, recursive)),
        Request::WriteArchive { path, user } => {
            as_user(user, || archive::write_archive(&path, user, &input))
        }
        Request::ReadArchive { path, user } => {
            as_user(user, || archive::read_archive(&path, tx, &input))
        }
        Request::SetIdentity {
            hostname,
            machine_id,
            seed_hex,
        } => identity::set(&hostname, &machine_id, &seed_hex),
        Request::GrowRootFs { disk_bytes } => disk::grow_root(disk_bytes),
    }
}

/// Runs a file request as `user` ([`creds::act_as`]); a thread that cannot drop to the
/// guest user refuses the request rather than run it as root.
fn as_user(user: GuestUser, request: impl FnOnce() -> Reply) -> Reply {
    match creds::act_as(user) {
        Ok(()) => request(),
        Err(e) => error_reply(AgentErrorCode::PermissionDenied, &e),
    }
}

/// Owned by a stream's handler: unregisters the stream and makes sure it replied, even
/// if the handler panicked or never started.
struct StreamGuard {
    tx: Arc<StreamTx>,
    streams: Registry,
    active: Arc<Active>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        lock(&self.streams).remove(&self.tx.id());
        self.tx.reply(&Reply::Error {
            code: AgentErrorCode::Io,
            message: "the agent's handler for this stream failed".into(),
        });
        let mut count = lock(&self.active.count);
        *count = count.saturating_sub(1);
        self.active.idle.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_named_virtio_port() {
        let sys = tempfile::tempdir().expect("tempdir");
        for (port, name) in [
            ("vport0p0", "org.qemu.guest_agent.0"),
            ("vport0p1", PORT_NAME),
        ] {
            let dir = sys.path().join(port);
            fs::create_dir(&dir).expect("mkdir");
            fs::write(dir.join("name"), format!("{name}\n")).expect("write name");
        }
        assert_eq!(
            find_port(sys.path(), Path::new("/dev")),
            Some(PathBuf::from("/dev/vport0p1"))
        );
        assert_eq!(
            find_port(&sys.path().join("missing"), Path::new("/dev")),
            None
        );
    }

    #[test]
    fn hello_carries_the_protocol_version() {
        let hello: Hello = hello_frame().decode_json().expect("hello json");
        assert_eq!(hello.protocol_version, PROTOCOL_VERSION);
        assert_eq!(hello.agent_version, AGENT_VERSION);
        assert!(!hello.kernel.is_empty());
    }
}
