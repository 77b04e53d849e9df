//! `Exec` requests: run a program in its own process group and stream its output.
//!
//! Protocol of one exec, per stream:
//! 1. Resolve the user (uid, `HOME`, default cwd) and build a cleared environment:
//!    `PATH`, `HOME`, `USER`, `LOGNAME`, `LANG`, then the request's variables on top.
//! 2. Spawn with `process_group(0)` so the program leads a group that a timeout or a
//!    `CANCEL` can kill whole, grandchildren included. Failing to spawn is `SPAWN_FAILED`.
//! 3. Helper threads: a forwarder turns the stream's input into events, a stdin writer
//!    feeds `DATA` into the pipe (closed at `END`), two pumps send `STDOUT`/`STDERR`
//!    frames as output is produced, a waiter reports the exit of the main process.
//! 4. A timeout (from spawn) SIGKILLs the group and marks `timed_out`; `CANCEL` or the
//!    channel closing SIGKILLs it without. Nothing else is killed: background processes
//!    that outlive a normal exit keep running, as after a shell command.
//! 5. After the main process exits, output is read until both pipes reach EOF, but for
//!    at most [`OUTPUT_GRACE`]: a background grandchild may hold them open for ever.
//!    Output produced after that is not delivered and the pumps close their ends.
//! 6. `REPLY` `Exited` with the exit code or signal, `timed_out` and the duration.
//!
//! With a terminal (`pty`), step 2 opens a pseudo-terminal, and the program leads a new
//! session (so the same group kill applies) with the terminal's slave side as controlling
//! tty, stdin, stdout and stderr; `DATA` is written to the master side, the master's output
//! is sent as `STDOUT`, and `RESIZE` sets the window size (the kernel signals `SIGWINCH`).
//!
//! When the agent runs as root, `GuestUser::User` switches to uid/gid 1000; std drops
//! the supplementary groups when it switches uid as root. When the agent is not root
//! (tests, debugging) programs run as the agent's own user.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, PipeReader, Write};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, poll};
use rustix::io::Errno;
use rustix::process::{Pid, Signal, WaitOptions, kill_process_group};
use rustix::pty::OpenptFlags;
use rustix::termios::Winsize;
use scaibunker_proto::agent::{
    AgentErrorCode, FrameKind, GuestUser, MAX_FRAME_PAYLOAD, Program, Reply, Stdin, WindowSize,
};

use crate::account::{self, USER_NAME};
use crate::channel::{StreamInput, StreamTx};
use crate::paths::{GuestPath, PathError};
use crate::{error_reply, log};

/// `PATH` of every exec unless the request sets its own.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long output is still read after the main process exited (step 5).
pub const OUTPUT_GRACE: Duration = Duration::from_millis(200);

/// Stack of the small helper threads; they only copy buffers allocated on the heap.
const HELPER_STACK: usize = 128 * 1024;

/// `TERM` of programs run on a terminal unless the request sets its own.
pub const DEFAULT_TERM: &str = "xterm-256color";

/// An `Exec` request, as received.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    pub program: Program,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub user: GuestUser,
    pub stdin: Stdin,
    pub timeout_ms: u64,
    pub pty: Option<WindowSize>,
}

/// Why an exec could not run to its end.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("argv is empty")]
    EmptyArgv,
    #[error("environment variable name `{0}` is empty or contains `=` or NUL")]
    BadEnvName(String),
    #[error("environment variable `{0}` contains NUL")]
    BadEnvValue(String),
    #[error("invalid working directory")]
    BadCwd(#[source] PathError),
    #[error("working directory `{0}` does not exist")]
    CwdMissing(String),
    #[error("working directory `{0}` is not a directory")]
    CwdNotADirectory(String),
    #[error("spawn `{program}`")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("open a pseudo-terminal")]
    Pty(#[source] io::Error),
    #[error("start the helper threads of `{program}`")]
    Helpers {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("wait for `{program}`")]
    Wait {
        program: String,
        #[source]
        source: io::Error,
    },
}

impl ExecError {
    pub fn code(&self) -> AgentErrorCode {
        match self {
            Self::EmptyArgv | Self::BadEnvName(_) | Self::BadEnvValue(_) => {
                AgentErrorCode::BadRequest
            }
            Self::BadCwd(_) => AgentErrorCode::InvalidPath,
            Self::CwdMissing(_) | Self::CwdNotADirectory(_) | Self::Spawn { .. } => {
                AgentErrorCode::SpawnFailed
            }
            Self::Pty(_) | Self::Helpers { .. } | Self::Wait { .. } => AgentErrorCode::Io,
        }
    }
}

/// Runs `req` for the stream `tx`, reading its input from `input`; returns its `REPLY`.
pub fn run(req: ExecRequest, tx: &Arc<StreamTx>, input: Receiver<StreamInput>) -> Reply {
    match try_run(req, tx, input) {
        Ok(reply) => reply,
        Err(e) => error_reply(e.code(), &e),
    }
}

/// Who a program runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Identity {
    /// `(uid, gid)` to switch to; `None` runs as the agent's own user.
    switch_to: Option<(u32, u32)>,
    name: String,
    home: String,
}

fn identity(user: GuestUser) -> Identity {
    let agent_is_root = rustix::process::geteuid().is_root();
    match user {
        // Already root (or unable to become root): never switch.
        GuestUser::Root => Identity {
            switch_to: None,
            name: "root".into(),
            home: "/root".into(),
        },
        GuestUser::User => {
            let account = account::guest_user();
            Identity {
                switch_to: agent_is_root.then_some((account.uid, account.gid)),
                name: USER_NAME.into(),
                home: account.home,
            }
        }
    }
}

fn working_dir(cwd: Option<&str>, home: &str) -> Result<String, ExecError> {
    let Some(cwd) = cwd else {
        return Ok(if Path::new(home).is_dir() {
            home.to_owned()
        } else {
            "/".to_owned()
        });
    };
    let path = GuestPath::parse(cwd).map_err(ExecError::BadCwd)?;
    match fs::metadata(&path) {
        Ok(m) if m.is_dir() => Ok(path.to_string()),
        Ok(_) => Err(ExecError::CwdNotADirectory(path.to_string())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Err(ExecError::CwdMissing(path.to_string()))
        }
        // Let the spawn report anything else (e.g. permission) for the target user.
        Err(_) => Ok(path.to_string()),
    }
}

/// The program's side of its output, and how the handler reaches it.
struct Io {
    /// Where `DATA` goes: the stdin pipe or the terminal's master side.
    input: Option<File>,
    /// What the pumps read: stdout and stderr, or the master side alone.
    outputs: [Option<OwnedFd>; 2],
    /// The master side, for `RESIZE`.
    terminal: Option<OwnedFd>,
}

/// A new pseudo-terminal of `size`: `(master, slave)`. The slave is owned by `owner` when
/// the program switches user, as a login would leave it.
fn open_pty(size: WindowSize, owner: Option<(u32, u32)>) -> io::Result<(OwnedFd, OwnedFd)> {
    let master = rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY)?;
    rustix::pty::grantpt(&master)?;
    rustix::pty::unlockpt(&master)?;
    let name = rustix::pty::ptsname(&master, Vec::new())?;
    let slave = OwnedFd::from(
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(std::ffi::OsStr::from_bytes(name.as_bytes()))?,
    );
    set_size(&master, size)?;
    if let Some((uid, gid)) = owner {
        rustix::fs::fchown(
            &slave,
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
        )?;
    }
    Ok((master, slave))
}

fn set_size(master: &OwnedFd, size: WindowSize) -> io::Result<()> {
    rustix::termios::tcsetwinsize(
        master,
        Winsize {
            ws_row: size.rows,
            ws_col: size.cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        },
    )?;
    Ok(())
}

/// Makes the child a session leader whose controlling terminal is its stdin (the slave).
#[allow(unsafe_code)]
fn lead_a_terminal_session(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only makes two raw
    // system calls (setsid, ioctl); it allocates nothing and takes no lock, so it is
    // async-signal-safe. fd 0 is the slave: std has set up stdio before pre_exec hooks.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::setsid()?;
            rustix::process::ioctl_tiocsctty(BorrowedFd::borrow_raw(0))?;
            Ok(())
        });
    }
}

fn build_command(req: &ExecRequest) -> Result<(String, Command, Io), ExecError> {
    let (program, mut cmd) = match &req.program {
        Program::Shell(script) => {
            let mut cmd = Command::new("/bin/sh");
            cmd.arg("-c").arg(script);
            ("/bin/sh".to_owned(), cmd)
        }
        Program::Argv(argv) => {
            let (first, rest) = argv.split_first().ok_or(ExecError::EmptyArgv)?;
            let mut cmd = Command::new(first);
            cmd.args(rest);
            (first.clone(), cmd)
        }
    };
    for (k, v) in &req.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(ExecError::BadEnvName(k.clone()));
        }
        if v.contains('\0') {
            return Err(ExecError::BadEnvValue(k.clone()));
        }
    }
    let id = identity(req.user);
    let cwd = working_dir(req.cwd.as_deref(), &id.home)?;
    // std looks the program up in this PATH, not the agent's, because it is set here.
    cmd.env_clear()
        .env("PATH", DEFAULT_PATH)
        .env("HOME", &id.home)
        .env("USER", &id.name)
        .env("LOGNAME", &id.name)
        .env("LANG", "C.UTF-8");
    if req.pty.is_some() {
        cmd.env("TERM", DEFAULT_TERM);
    }
    cmd.envs(&req.env).current_dir(cwd);
    if let Some((uid, gid)) = id.switch_to {
        cmd.uid(uid).gid(gid);
    }
    let io = match req.pty {
        None => {
            cmd.process_group(0)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .stdin(match req.stdin {
                    Stdin::Null => Stdio::null(),
                    Stdin::Stream => Stdio::piped(),
                });
            // Filled from the child once it is spawned.
            Io {
                input: None,
                outputs: [None, None],
                terminal: None,
            }
        }
        Some(size) => {
            let (master, slave) = open_pty(size, id.switch_to).map_err(ExecError::Pty)?;
            let dup = |fd: &OwnedFd| fd.try_clone().map_err(ExecError::Pty);
            cmd.stdin(Stdio::from(dup(&slave)?))
                .stdout(Stdio::from(dup(&slave)?))
                .stderr(Stdio::from(slave));
            lead_a_terminal_session(&mut cmd);
            Io {
                input: Some(File::from(dup(&master)?)),
                outputs: [Some(dup(&master)?), None],
                terminal: Some(master),
            }
        }
    };
    Ok((program, cmd, io))
}

/// What the exec handler waits for.
enum Event {
    Input(StreamInput),
    /// The stream's input channel closed: the stream was reset.
    InputClosed,
    /// One of the output pumps stopped.
    OutputClosed,
    /// The main process was reaped.
    Exited(io::Result<ExitStatus>, Instant),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kill {
    Timeout,
    Cancel,
}

fn try_run(
    req: ExecRequest,
    tx: &Arc<StreamTx>,
    input: Receiver<StreamInput>,
) -> Result<Reply, ExecError> {
    let (program, mut cmd, mut io) = build_command(&req)?;
    let helpers = |source| ExecError::Helpers {
        program: program.clone(),
        source,
    };
    // Dropping `stop_w` tells the pumps to stop (step 5).
    let (stop_r, stop_w) = io::pipe().map_err(helpers)?;
    let mut child = cmd.spawn().map_err(|source| ExecError::Spawn {
        program: program.clone(),
        source,
    })?;
    // The command holds our copies of a terminal's slave side: closing them lets the
    // master report the end once the program and its children have closed theirs.
    drop(cmd);
    if io.terminal.is_none() {
        io.input = child
            .stdin
            .take()
            .map(|pipe| File::from(OwnedFd::from(pipe)));
        io.outputs = [
            child.stdout.take().map(OwnedFd::from),
            child.stderr.take().map(OwnedFd::from),
        ];
    }
    let terminal = io.terminal.take();
    let start = Instant::now();
    let pid = i32::try_from(child.id())
        .ok()
        .and_then(Pid::from_raw)
        .expect("the kernel hands out positive pids that fit an i32");
    let (ev_tx, ev_rx) = mpsc::channel();
    let mut stdin_tx = None;

    let started = start_helpers(io, pid, tx, input, &ev_tx, &stop_r, &mut stdin_tx);
    drop(child);
    drop(ev_tx);
    if let Err(source) = started {
        kill_group(pid);
        let _ = rustix::process::waitpid(Some(pid), WaitOptions::empty());
        return Err(helpers(source));
    }

    let deadline = start.checked_add(Duration::from_millis(req.timeout_ms));
    let mut killed: Option<Kill> = None;
    let mut open_outputs = 2;
    let (status, exited_at) = loop {
        let next = match (killed, deadline) {
            (None, Some(deadline)) => {
                ev_rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            }
            _ => ev_rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match next {
            Ok(Event::Input(StreamInput::Data(chunk))) => {
                if let Some(stdin) = &stdin_tx {
                    // The writer is gone when the program closed its stdin; drop the data.
                    let _ = stdin.send(chunk);
                }
            }
            Ok(Event::Input(StreamInput::End)) => stdin_tx = None,
            Ok(Event::Input(StreamInput::Resize(size))) => {
                if let Some(master) = &terminal
                    && let Err(e) = set_size(master, size)
                {
                    log!("resize the terminal of {program}: {e}");
                }
            }
            Ok(Event::Input(StreamInput::Cancel) | Event::InputClosed) => {
                if killed.is_none() {
                    kill_group(pid);
                    killed = Some(Kill::Cancel);
                }
            }
            Ok(Event::OutputClosed) => open_outputs -= 1,
            Ok(Event::Exited(status, at)) => break (status, at),
            Err(RecvTimeoutError::Timeout) => {
                kill_group(pid);
                killed = Some(Kill::Timeout);
            }
            Err(RecvTimeoutError::Disconnected) => {
                // Only a dead waiter thread gets here; it never dies without an event.
                kill_group(pid);
                return Err(ExecError::Wait {
                    program,
                    source: io::Error::other("the waiter thread stopped"),
                });
            }
        }
    };
    drop(stdin_tx);

    let grace_end = exited_at + OUTPUT_GRACE;
    while open_outputs > 0 {
        match ev_rx.recv_timeout(grace_end.saturating_duration_since(Instant::now())) {
            Ok(Event::OutputClosed) => open_outputs -= 1,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    drop(stop_w);

    let status = status.map_err(|source| ExecError::Wait { program, source })?;
    Ok(Reply::Exited {
        exit_code: status.code(),
        signal: status.signal(),
        timed_out: killed == Some(Kill::Timeout),
        duration_ms: u64::try_from(exited_at.duration_since(start).as_millis()).unwrap_or(u64::MAX),
    })
}

/// Starts the forwarder, stdin writer, output pumps and waiter (step 3).
fn start_helpers(
    io: Io,
    pid: Pid,
    tx: &Arc<StreamTx>,
    input: Receiver<StreamInput>,
    ev_tx: &Sender<Event>,
    stop: &PipeReader,
    stdin_tx: &mut Option<Sender<Vec<u8>>>,
) -> io::Result<()> {
    let events = ev_tx.clone();
    spawn_helper("exec-input", move || {
        for msg in input {
            if events.send(Event::Input(msg)).is_err() {
                return;
            }
        }
        let _ = events.send(Event::InputClosed);
    })?;

    if let Some(mut stdin) = io.input {
        let (chunks_tx, chunks_rx) = mpsc::channel::<Vec<u8>>();
        spawn_helper("exec-stdin", move || {
            for chunk in chunks_rx {
                if stdin.write_all(&chunk).is_err() {
                    return;
                }
            }
        })?;
        *stdin_tx = Some(chunks_tx);
    }

    for (fd, kind) in io
        .outputs
        .into_iter()
        .zip([FrameKind::Stdout, FrameKind::Stderr])
    {
        let events = ev_tx.clone();
        let tx = Arc::clone(tx);
        let stop = stop.try_clone()?;
        spawn_helper("exec-output", move || {
            if let Some(fd) = fd {
                pump(&fd, &stop, &tx, kind);
            }
            let _ = events.send(Event::OutputClosed);
        })?;
    }

    let events = ev_tx.clone();
    spawn_helper("exec-wait", move || {
        let status = wait_for(pid);
        let _ = events.send(Event::Exited(status, Instant::now()));
    })
}

fn spawn_helper(name: &str, f: impl FnOnce() + Send + 'static) -> io::Result<()> {
    thread::Builder::new()
        .name(name.to_owned())
        .stack_size(HELPER_STACK)
        .spawn(f)
        .map(drop)
}

/// Reaps `pid` by pid, so that the handler keeps no `Child` it must wait on itself.
fn wait_for(pid: Pid) -> io::Result<ExitStatus> {
    loop {
        match rustix::process::waitpid(Some(pid), WaitOptions::empty()) {
            Ok(Some((_, status))) => {
                let raw = if let Some(code) = status.exit_status() {
                    (code & 0xff) << 8
                } else if let Some(sig) = status.terminating_signal() {
                    sig & 0x7f
                } else {
                    // Stopped or continued: only reported with WUNTRACED/WCONTINUED.
                    continue;
                };
                return Ok(ExitStatus::from_raw(raw));
            }
            Ok(None) | Err(Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Copies `fd` into frames of `kind` until EOF, the stream closing, or `stop`.
fn pump(fd: &OwnedFd, stop: &PipeReader, tx: &StreamTx, kind: FrameKind) {
    let mut buf = vec![0u8; MAX_FRAME_PAYLOAD];
    loop {
        let mut fds = [
            PollFd::new(fd, PollFlags::IN),
            PollFd::new(stop, PollFlags::IN),
        ];
        match poll(&mut fds, None) {
            Ok(_) | Err(Errno::INTR) => {}
            Err(_) => return,
        }
        if !fds[1].revents().is_empty() {
            return;
        }
        if fds[0].revents().is_empty() {
            continue;
        }
        match rustix::io::read(fd, &mut buf[..]) {
            Ok(0) => return,
            Ok(n) => {
                let (n, eof) = fill(fd, &mut buf, n);
                if tx.send(kind, &buf[..n]).is_err() || eof {
                    return;
                }
            }
            Err(Errno::INTR | Errno::AGAIN) => {}
            Err(_) => return,
        }
    }
}

/// Adds to the `n` bytes in `buf` whatever `fd` has ready right now, without waiting, so a
/// program that writes in small pieces (a line at a time) still travels in full frames;
/// output that trickles goes out at once. Returns the new length and whether `fd` ended.
fn fill(fd: &OwnedFd, buf: &mut [u8], mut n: usize) -> (usize, bool) {
    while n < buf.len() {
        let mut fds = [PollFd::new(fd, PollFlags::IN)];
        match poll(&mut fds, Some(&rustix::event::Timespec::default())) {
            Ok(0) => break,
            Ok(_) => {}
            Err(Errno::INTR) => continue,
            Err(_) => break,
        }
        match rustix::io::read(fd, &mut buf[n..]) {
            Ok(0) => return (n, true),
            Ok(m) => n += m,
            Err(Errno::INTR | Errno::AGAIN) => {}
            Err(_) => return (n, true),
        }
    }
    (n, false)
}

/// SIGKILLs the process group led by `pid`. It may already be gone.
fn kill_group(pid: Pid) {
    match kill_process_group(pid, Signal::KILL) {
        Ok(()) | Err(Errno::SRCH) => {}
        Err(e) => log!("kill process group {}: {e}", pid.as_raw_nonzero()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_never_switches_user() {
        assert_eq!(identity(GuestUser::Root).switch_to, None);
        assert_eq!(identity(GuestUser::Root).home, "/root");
    }

    #[test]
    fn cwd_must_exist_and_be_absolute() {
        assert!(matches!(
            working_dir(Some("/no/such/dir"), "/"),
            Err(ExecError::CwdMissing(_))
        ));
        assert!(matches!(
            working_dir(Some("tmp"), "/"),
            Err(ExecError::BadCwd(_))
        ));
        assert_eq!(working_dir(None, "/no/such/home").expect("falls back"), "/");
        assert_eq!(working_dir(Some("/tmp/."), "/").expect("exists"), "/tmp");
    }
}
