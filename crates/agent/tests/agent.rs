//! The agent over a unix socket, as the worker sees it: a real `scaibunker-agent serve
//! --unix` process, a listener standing in for QEMU's host side, and a small synchronous
//! client of the frame protocol.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use scaibunker_proto::agent::{
    AgentErrorCode, DirEntry, EntryType, Frame, FrameKind, GuestUser, Hello, MAX_FRAME_PAYLOAD,
    PROTOCOL_VERSION, Program, Reply, Request, Stdin, WindowSize,
};
use tempfile::TempDir;

/// Longest wait for any one frame; far above what any test needs.
const FRAME_TIMEOUT: Duration = Duration::from_secs(60);

/// A running agent connected to this test.
struct Agent {
    child: Child,
    conn: UnixStream,
    next_id: u32,
    /// Frames of streams other than the one being collected, in arrival order.
    pending: HashMap<u32, Vec<Frame>>,
    _dir: TempDir,
}

/// Everything a stream sent back.
#[derive(Debug, Default)]
struct Outcome {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    data: Vec<u8>,
    data_frames: usize,
    max_frame: usize,
    reply: Option<Reply>,
}

impl Outcome {
    fn reply(&self) -> &Reply {
        self.reply.as_ref().expect("collect stops at the reply")
    }

    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    fn error_code(&self) -> AgentErrorCode {
        match self.reply() {
            Reply::Error { code, .. } => *code,
            other => panic!("expected an error reply, got {other:?}"),
        }
    }

    /// `(exit_code, signal, timed_out)` of an `Exited` reply.
    fn exited(&self) -> (Option<i32>, Option<i32>, bool) {
        match self.reply() {
            Reply::Exited {
                exit_code,
                signal,
                timed_out,
                ..
            } => (*exit_code, *signal, *timed_out),
            other => panic!("expected Exited, got {other:?} (stderr: {})", self.stderr()),
        }
    }
}

/// A listing page: JSON lines in the `DATA` frames, then the `Listing` reply.
struct Page {
    out: Outcome,
}

impl Page {
    fn entries(&self) -> Vec<DirEntry> {
        self.out
            .data
            .split(|b| *b == b'\n')
            .filter(|line| !line.is_empty())
            .map(|line| serde_json::from_slice(line).expect("a JSON line per entry"))
            .collect()
    }

    fn next(&self) -> (bool, Option<String>) {
        match self.out.reply() {
            Reply::Listing {
                has_more,
                next_after_hex,
            } => (*has_more, next_after_hex.clone()),
            other => panic!("expected a listing, got {other:?}"),
        }
    }

    fn error_code(&self) -> AgentErrorCode {
        self.out.error_code()
    }
}

impl Agent {
    fn start() -> Agent {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&sock).expect("bind the host side socket");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let mut child = Command::new(env!("CARGO_BIN_EXE_scaibunker-agent"))
            .arg("serve")
            .arg("--unix")
            .arg(&sock)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn scaibunker-agent");
        let give_up = Instant::now() + FRAME_TIMEOUT;
        let conn = loop {
            match listener.accept() {
                Ok((conn, _)) => break conn,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if let Ok(Some(status)) = child.try_wait() {
                        panic!("the agent exited with {status} before connecting");
                    }
                    assert!(Instant::now() < give_up, "the agent never connected");
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        conn.set_nonblocking(false).expect("blocking connection");
        conn.set_read_timeout(Some(FRAME_TIMEOUT))
            .expect("read timeout");
        let mut agent = Agent {
            child,
            conn,
            next_id: 1,
            pending: HashMap::new(),
            _dir: dir,
        };
        let hello = agent.read_frame();
        assert_eq!((hello.stream_id, hello.kind), (0, FrameKind::Hello));
        let hello: Hello = hello.decode_json().expect("HELLO is JSON");
        assert_eq!(hello.protocol_version, PROTOCOL_VERSION);
        assert_eq!(hello.agent_version, env!("CARGO_PKG_VERSION"));
        agent
    }

    fn read_frame(&mut self) -> Frame {
        match Frame::read_from(&mut self.conn) {
            Ok(Some(frame)) => frame,
            Ok(None) => panic!("the agent closed the connection"),
            Err(e) => panic!("read a frame from the agent: {e} ({e:?})"),
        }
    }

    fn send(&mut self, id: u32, kind: FrameKind, payload: &[u8]) {
        Frame::new(id, kind, payload.to_vec())
            .write_to(&mut self.conn)
            .expect("write a frame to the agent");
    }

    /// Opens a stream with `req`; returns its id.
    fn open(&mut self, req: &Request) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        Frame::json(id, FrameKind::Request, req)
            .write_to(&mut self.conn)
            .expect("write REQUEST");
        id
    }

    /// Reads frames until the next one for `id`, setting aside the others.
    fn next_frame_of(&mut self, id: u32) -> Frame {
        if let Some(queue) = self.pending.get_mut(&id)
            && !queue.is_empty()
        {
            return queue.remove(0);
        }
        loop {
            let frame = self.read_frame();
            if frame.stream_id == id {
                return frame;
            }
            self.pending.entry(frame.stream_id).or_default().push(frame);
        }
    }

    /// Collects the frames of stream `id` up to and including its `REPLY`.
    /// Reads stream `id` to its `REPLY`, granting back a frame of credit for every output
    /// frame as the worker does (without it, output split into more frames than the window,
    /// as when the program writes in small pieces that the agent reads as they come, stalls).
    fn collect(&mut self, id: u32) -> Outcome {
        let mut out = Outcome::default();
        loop {
            let frame = self.next_frame_of(id);
            if matches!(
                frame.kind,
                FrameKind::Stdout | FrameKind::Stderr | FrameKind::Data
            ) {
                Frame::credit(id, 1)
                    .write_to(&mut self.conn)
                    .expect("write CREDIT");
            }
            match frame.kind {
                FrameKind::Stdout => out.stdout.extend_from_slice(&frame.payload),
                FrameKind::Stderr => out.stderr.extend_from_slice(&frame.payload),
                FrameKind::Data => {
                    out.data_frames += 1;
                    out.max_frame = out.max_frame.max(frame.payload.len());
                    out.data.extend_from_slice(&frame.payload);
                }
                FrameKind::Reply => {
                    out.reply = Some(frame.decode_json().expect("REPLY is JSON"));
                    return out;
                }
                other => panic!("unexpected {other:?} frame on stream {id}"),
            }
        }
    }

    fn call(&mut self, req: &Request) -> Outcome {
        let id = self.open(req);
        self.collect(id)
    }

    fn exec(&mut self, exec: Exec) -> Outcome {
        self.call(&exec.request())
    }

    /// Uploads `body` to `path` in frames of at most `chunk` bytes.
    fn write_file(&mut self, path: &str, mode: u32, body: &[u8], chunk: usize) -> Outcome {
        let id = self.open(&Request::WriteFile {
            path: path.into(),
            mode,
            user: GuestUser::Root,
        });
        for part in body.chunks(chunk) {
            self.send(id, FrameKind::Data, part);
        }
        self.send(id, FrameKind::End, &[]);
        self.collect(id)
    }

    /// Reads `STDOUT` frames of stream `id` into `seen` until it contains `needle`.
    fn read_until(&mut self, id: u32, seen: &mut String, needle: &str) {
        while !seen.contains(needle) {
            let frame = self.next_frame_of(id);
            match frame.kind {
                FrameKind::Stdout => seen.push_str(&String::from_utf8_lossy(&frame.payload)),
                other => panic!("{other:?} before `{needle}` appeared; output so far: {seen:?}"),
            }
        }
    }

    /// Uploads `tar` into the directory `path`.
    fn write_archive(&mut self, path: &str, tar: &[u8]) -> Outcome {
        let id = self.open(&Request::WriteArchive {
            path: path.into(),
            user: GuestUser::Root,
        });
        for part in tar.chunks(MAX_FRAME_PAYLOAD) {
            self.send(id, FrameKind::Data, part);
        }
        self.send(id, FrameKind::End, &[]);
        self.collect(id)
    }

    fn write_file_as(&mut self, path: &str, mode: u32, body: &[u8], user: GuestUser) -> Outcome {
        let id = self.open(&Request::WriteFile {
            path: path.into(),
            mode,
            user,
        });
        self.send(id, FrameKind::Data, body);
        self.send(id, FrameKind::End, &[]);
        self.collect(id)
    }

    fn write_archive_as(&mut self, path: &str, tar: &[u8], user: GuestUser) -> Outcome {
        let id = self.open(&Request::WriteArchive {
            path: path.into(),
            user,
        });
        for part in tar.chunks(MAX_FRAME_PAYLOAD) {
            self.send(id, FrameKind::Data, part);
        }
        self.send(id, FrameKind::End, &[]);
        self.collect(id)
    }

    fn read_file_as(&mut self, path: &str, user: GuestUser) -> Outcome {
        self.call(&Request::ReadFile {
            path: path.into(),
            user,
        })
    }

    /// One page of a listing.
    fn list(&mut self, path: &str, user: GuestUser, after_hex: Option<&str>, limit: u32) -> Page {
        Page {
            out: self.call(&Request::ListDir {
                path: path.into(),
                user,
                after_hex: after_hex.map(str::to_owned),
                limit,
            }),
        }
    }

    fn read_file(&mut self, path: &str) -> Outcome {
        self.call(&Request::ReadFile {
            path: path.into(),
            user: GuestUser::Root,
        })
    }

    /// Closes our end and waits for the agent to exit.
    fn disconnect(mut self) -> ExitStatus {
        self.conn
            .shutdown(std::net::Shutdown::Both)
            .expect("shutdown");
        let give_up = Instant::now() + FRAME_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < give_up, "the agent did not exit after EOF");
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An exec request with test defaults: root, no stdin, a 60 s timeout.
struct Exec {
    program: Program,
    env: BTreeMap<String, String>,
    cwd: Option<String>,
    user: GuestUser,
    stdin: Stdin,
    timeout_ms: u64,
    pty: Option<WindowSize>,
}

impl Exec {
    fn shell(script: &str) -> Self {
        Self::new(Program::Shell(script.into()))
    }

    fn argv(argv: &[&str]) -> Self {
        Self::new(Program::Argv(argv.iter().map(|s| s.to_string()).collect()))
    }

    fn new(program: Program) -> Self {
        Self {
            program,
            env: BTreeMap::new(),
            cwd: None,
            user: GuestUser::Root,
            stdin: Stdin::Null,
            timeout_ms: 60_000,
            pty: None,
        }
    }

    fn request(self) -> Request {
        Request::Exec {
            program: self.program,
            env: self.env,
            cwd: self.cwd,
            user: self.user,
            stdin: self.stdin,
            timeout_ms: self.timeout_ms,
            pty: self.pty,
        }
    }
}

/// Deterministic bytes that do not compress or repeat (xorshift64).
fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Whether `pid` is gone or a zombie, waiting up to 10 s for it to become so.
fn process_ends(pid: u32) -> bool {
    let give_up = Instant::now() + Duration::from_secs(10);
    loop {
        let state = fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                let after_comm = stat.rsplit_once(')')?.1;
                after_comm.split_whitespace().next().map(str::to_owned)
            });
        match state.as_deref() {
            None | Some("Z") | Some("X") => return true,
            Some(_) if Instant::now() >= give_up => return false,
            Some(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn path_str(p: &Path) -> String {
    p.to_str().expect("test paths are UTF-8").to_owned()
}

#[test]
fn runs_a_shell_command_and_returns_stdout_stderr_and_exit_code() {
    let mut agent = Agent::start();
    let out = agent.exec(Exec::shell("echo out; echo err >&2; exit 3"));
    assert_eq!(out.stdout(), "out\n");
    assert_eq!(out.stderr(), "err\n");
    assert_eq!(out.exited(), (Some(3), None, false));
}

#[test]
fn a_terminal_session_has_a_tty_of_its_size_takes_input_and_resizes() {
    let mut agent = Agent::start();
    let mut exec = Exec::shell(
        "test -t 0 && test -t 1 && echo on-a-tty; echo term=$TERM; stty size; \
         read line; echo got:$line; stty size; exit 4",
    );
    exec.pty = Some(WindowSize { cols: 80, rows: 24 });
    let id = agent.open(&exec.request());
    let mut seen = String::new();
    agent.read_until(id, &mut seen, "24 80");
    assert!(seen.contains("on-a-tty"), "{seen:?}");
    assert!(seen.contains("term=xterm-256color"), "{seen:?}");

    agent.send(id, FrameKind::Resize, br#"{"cols":100,"rows":30}"#);
    agent.send(id, FrameKind::Data, b"hello\n");
    let mut rest = String::new();
    agent.read_until(id, &mut rest, "30 100");
    // The terminal echoes the input and ends lines with CR LF.
    assert!(rest.contains("got:hello\r\n"), "{rest:?}");
    let out = agent.collect(id);
    assert_eq!(out.exited(), (Some(4), None, false));
}

#[test]
fn cancelling_a_terminal_session_kills_its_whole_session() {
    let mut agent = Agent::start();
    let mut exec = Exec::shell("sleep 300 & echo bg:$!; wait");
    exec.pty = Some(WindowSize { cols: 80, rows: 24 });
    let id = agent.open(&exec.request());
    let mut seen = String::new();
    agent.read_until(id, &mut seen, "\n");
    let bg: u32 = seen
        .trim()
        .strip_prefix("bg:")
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("a pid in {seen:?}"));
    agent.send(id, FrameKind::Cancel, &[]);
    let out = agent.collect(id);
    assert_eq!(out.exited().1, Some(9), "killed by SIGKILL");
    assert!(
        process_ends(bg),
        "the background sleep {bg} was killed with its session"
    );
}

#[test]
fn runs_argv_without_a_shell() {
    let mut agent = Agent::start();
    let out = agent.exec(Exec::argv(&["printf", "%s|%s", "a b", "$HOME"]));
    assert_eq!(out.stdout(), "a b|$HOME");
    assert_eq!(out.exited(), (Some(0), None, false));
}

#[test]
fn passes_env_and_cwd_over_a_cleared_environment() {
    let mut agent = Agent::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut exec = Exec::shell(
        r#"printf '%s|%s|%s|%s|%s|%s' "$FOO" "$PWD" "$LANG" "$PATH" "$HOME" "${CARGO:-unset}""#,
    );
    exec.env.insert("FOO".into(), "bar baz".into());
    exec.env.insert("LANG".into(), "en_US.UTF-8".into());
    exec.cwd = Some(path_str(dir.path()));
    let out = agent.exec(exec);
    let want = format!(
        "bar baz|{}|en_US.UTF-8|/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin|/root|unset",
        dir.path().display()
    );
    assert_eq!(out.stdout(), want);
    assert_eq!(out.exited(), (Some(0), None, false));
}

#[test]
fn feeds_stdin_from_data_frames() {
    let mut agent = Agent::start();
    let mut exec = Exec::argv(&["cat"]);
    exec.stdin = Stdin::Stream;
    let id = agent.open(&exec.request());
    agent.send(id, FrameKind::Data, b"hello ");
    agent.send(id, FrameKind::Data, b"world");
    agent.send(id, FrameKind::End, &[]);
    let out = agent.collect(id);
    assert_eq!(out.stdout(), "hello world");
    assert_eq!(out.exited(), (Some(0), None, false));
}

#[test]
fn splits_large_output_into_frames() {
    let mut agent = Agent::start();
    let out = agent.exec(Exec::argv(&["head", "-c", "300000", "/dev/zero"]));
    assert_eq!(out.stdout.len(), 300_000);
    assert_eq!(out.exited(), (Some(0), None, false));
}

#[test]
fn reports_spawn_failure_for_a_missing_program() {
    let mut agent = Agent::start();
    let out = agent.exec(Exec::argv(&["nosuchcmd-scaibunker"]));
    assert_eq!(out.error_code(), AgentErrorCode::SpawnFailed);
    let Reply::Error { message, .. } = out.reply() else {
        unreachable!()
    };
    assert_eq!(
        message,
        "spawn `nosuchcmd-scaibunker`: No such file or directory"
    );
}

#[test]
fn reports_spawn_failure_for_a_missing_cwd() {
    let mut agent = Agent::start();
    let mut exec = Exec::argv(&["true"]);
    exec.cwd = Some("/nonexistent/scaibunker".into());
    let out = agent.exec(exec);
    assert_eq!(out.error_code(), AgentErrorCode::SpawnFailed);
    let Reply::Error { message, .. } = out.reply() else {
        unreachable!()
    };
    assert!(message.contains("/nonexistent/scaibunker"), "{message}");
}

#[test]
fn rejects_empty_argv_and_malformed_requests_as_bad_request() {
    let mut agent = Agent::start();
    assert_eq!(
        agent.exec(Exec::argv(&[])).error_code(),
        AgentErrorCode::BadRequest
    );
    let id = 77;
    agent.send(id, FrameKind::Request, br#"{"op":"reboot"}"#);
    assert_eq!(agent.collect(id).error_code(), AgentErrorCode::BadRequest);
}

#[test]
fn runs_as_uid_1000_without_root_groups_for_guest_user_when_the_agent_is_root() {
    let mut agent = Agent::start();
    let mut exec = Exec::shell("id -u; id -G");
    exec.user = GuestUser::User;
    let out = agent.exec(exec);
    assert_eq!(out.exited(), (Some(0), None, false));
    let me = Command::new("sh")
        .args(["-c", "id -u; id -G"])
        .output()
        .expect("run id");
    let mine = String::from_utf8_lossy(&me.stdout).into_owned();
    if mine.starts_with("0\n") {
        // Switched to uid and gid 1000 with no supplementary group left over from root.
        assert_eq!(out.stdout(), "1000\n1000\n");
    } else {
        assert_eq!(
            out.stdout(),
            mine,
            "a non-root agent runs programs as itself"
        );
    }
}

#[test]
fn timeout_kills_grandchildren() {
    let mut agent = Agent::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let pid_file = dir.path().join("grandchild.pid");
    let mut exec = Exec::shell(&format!(
        "sleep 300 & echo $! > '{}'; sleep 300",
        pid_file.display()
    ));
    exec.timeout_ms = 1000;
    let out = agent.exec(exec);
    assert_eq!(out.exited(), (None, Some(9), true));
    let pid: u32 = fs::read_to_string(&pid_file)
        .expect("the shell wrote the grandchild's pid")
        .trim()
        .parse()
        .expect("a pid");
    assert!(process_ends(pid), "grandchild {pid} survived the timeout");
}

#[test]
fn cancel_kills_the_process() {
    let mut agent = Agent::start();
    let id = agent.open(&Exec::shell("echo started; exec sleep 300").request());
    let first = agent.next_frame_of(id);
    assert_eq!(
        (first.kind, first.payload.as_slice()),
        (FrameKind::Stdout, &b"started\n"[..])
    );
    agent.send(id, FrameKind::Cancel, &[]);
    let out = agent.collect(id);
    assert_eq!(out.exited(), (None, Some(9), false));
}

#[test]
fn replies_when_a_background_process_keeps_the_output_open() {
    let mut agent = Agent::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let pid_file = dir.path().join("bg.pid");
    let out = agent.exec(Exec::shell(&format!(
        "sleep 300 & echo $! > '{}'; echo done",
        pid_file.display()
    )));
    assert_eq!(out.stdout(), "done\n");
    assert_eq!(out.exited(), (Some(0), None, false));
    // A normal exit leaves background processes alone, like a shell does.
    let pid: i32 = fs::read_to_string(&pid_file)
        .expect("pid file")
        .trim()
        .parse()
        .expect("a pid");
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
}

#[test]
fn concurrent_execs_interleave_on_one_channel() {
    let mut agent = Agent::start();
    // The slow one waits for its stdin, which only comes after the fast one finished.
    let mut slow = Exec::shell("echo waiting; cat; echo slow-done");
    slow.stdin = Stdin::Stream;
    let slow_id = agent.open(&slow.request());
    let first = agent.next_frame_of(slow_id);
    assert_eq!(first.payload, b"waiting\n");
    let fast = agent.exec(Exec::shell("echo fast"));
    assert_eq!(fast.stdout(), "fast\n");
    assert_eq!(fast.exited(), (Some(0), None, false));
    agent.send(slow_id, FrameKind::Data, b"input\n");
    agent.send(slow_id, FrameKind::End, &[]);
    let slow = agent.collect(slow_id);
    assert_eq!(slow.stdout(), "input\nslow-done\n");
    assert_eq!(slow.exited(), (Some(0), None, false));
}

#[test]
fn writes_a_file_atomically_and_reads_it_back() {
    let mut agent = Agent::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("new/parents/hello.txt");
    let path = path_str(&target);

    let out = agent.write_file(&path, 0o640, b"hello\n", MAX_FRAME_PAYLOAD);
    assert_eq!(out.reply(), &Reply::Written { size_bytes: 6 });
    assert_eq!(fs::read(&target).expect("written"), b"hello\n");
    let mode = fs::metadata(&target).expect("stat").permissions().mode();
    assert_eq!(mode & 0o7777, 0o640);
    let parent_mode = fs::metadata(target.parent().expect("parent"))
        .expect("stat parent")
        .permissions()
        .mode();
    assert_eq!(parent_mode & 0o777, 0o755);

    // Over 1 MiB of incompressible bytes over many frames, replacing the first file.
    let body = pseudo_random(1024 * 1024 + 300_001, 0x5ca1_b0b5);
    let out = agent.write_file(&path, 0o600, &body, MAX_FRAME_PAYLOAD);
    assert_eq!(
        out.reply(),
        &Reply::Written {
            size_bytes: body.len() as u64
        }
    );
    let mode = fs::metadata(&target).expect("stat").permissions().mode();
    assert_eq!(mode & 0o7777, 0o600);
    assert_eq!(
        names_in(target.parent().expect("parent")),
        vec!["hello.txt"]
    );

    let back = agent.read_file(&path);
    assert_eq!(
        back.reply(),
        &Reply::Read {
            size_bytes: body.len() as u64
        }
    );
    assert!(back.data_frames > 1);
    assert!(back.max_frame <= MAX_FRAME_PAYLOAD);
    assert!(back.data == body, "read back differs from what was written");
}

#[test]
fn cancelled_write_leaves_no_file_and_no_temp_file() {
    let mut agent = Agent::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = path_str(&dir.path().join("partial.bin"));
    let id = agent.open(&Request::WriteFile {
        path: path.clone(),
        mode: 0o644,
        user: GuestUser::Root,
    });
    agent.send(id, FrameKind::Data, &pseudo_random(60_000, 1));
    agent.send(id, FrameKind::Cancel, &[]);
    let out = agent.collect(id);
    assert_eq!(out.error_code(), AgentErrorCode::Io);
    assert!(
        names_in(dir.path()).is_empty(),
        "{:?}",
        names_in(dir.path())
    );
}

#[test]
fn write_interrupted_by_disconnect_leaves_no_file_and_no_temp_file() {
    let mut agent = Agent::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = path_str(&dir.path().join("partial.bin"));
    let id = agent.open(&Request::WriteFile {
        path,
        mode: 0o644,
        user: GuestUser::Root,
    });
    agent.send(id, FrameKind::Data, b"some of the body");
    let status = agent.disconnect();
    assert!(status.success(), "agent exited with {status}");
    assert!(
        names_in(dir.path()).is_empty(),
        "{:?}",
        names_in(dir.path())
    );
}

#[test]
fn writing_onto_a_directory_is_is_a_directory() {
    let mut agent = Agent::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = agent.call(&Request::WriteFile {
        path: path_str(dir.path()),
        mode: 0o644,
        user: GuestUser::Root,
    });
    assert_eq!(out.error_code(), AgentErrorCode::IsADirectory);
}

#[test]
fn writing_below_a_file_is_not_a_directory() {
    let mut agent = Agent::start();
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(dir.path().join("file"), b"x").expect("write");
    for target in ["file/new.txt", "file/sub/new.txt"] {
        let out = agent.write_file(&path_str(&dir.path().join(target)), 0o644, b"y", 1);
        assert_eq!(out.error_code(), AgentErrorCode::NotADirectory, "{target}");
    }
    assert_eq!(names_in(dir.path()), vec!["file"]);
}

#[test]
fn reading_a_missing_file_is_file_not_found() {
    let mut agent = Agent::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = agent.read_file(&path_str(&dir.path().join("missing")));
    assert_eq!(out.error_code(), AgentErrorCode::FileNotFound);
    assert!(out.data.is_empty());
}

#[test]
fn reading_a_directory_is_is_a_directory() {
    let mut agent = Agent::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = agent.read_file(&path_str(dir.path()));
    assert_eq!(out.error_code(), AgentErrorCode::IsADirectory);
}

#[test]
fn lists_a_directory_sorted_by_name_without_following_symlinks() {
    let mut agent = Agent::start();
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(dir.path().join("b.txt"), b"12345").expect("write");
    fs::set_permissions(dir.path().join("b.txt"), fs::Permissions::from_mode(0o600))
        .expect("chmod");
    fs::create_dir(dir.path().join("a")).expect("mkdir");
    symlink("b.txt", dir.path().join("c")).expect("symlink");
    let root = path_str(dir.path());
    let page = agent.list(&format!("{root}/a/.."), GuestUser::Root, None, 50);
    let entries = page.entries();
    let summary: Vec<(&str, EntryType)> = entries
        .iter()
        .map(|e| (e.name.as_str(), e.entry_type))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("a", EntryType::Dir),
            ("b.txt", EntryType::File),
            ("c", EntryType::Symlink)
        ]
    );
    assert_eq!(page.next(), (false, None));
    let b = &entries[1];
    assert_eq!(b.path, format!("{root}/b.txt"));
    assert_eq!((b.size_bytes, b.mode), (5, 0o600));
    assert!(b.modified_unix_s > 1_600_000_000);

    let missing = agent.list(&format!("{root}/missing"), GuestUser::Root, None, 50);
    assert_eq!(missing.error_code(), AgentErrorCode::FileNotFound);
    let file = agent.list(&format!("{root}/b.txt"), GuestUser::Root, None, 50);
    assert_eq!(file.error_code(), AgentErrorCode::NotADirectory);
    let bad_cursor = agent.list(&root, GuestUser::Root, Some("zz"), 50);
    assert_eq!(bad_cursor.error_code(), AgentErrorCode::BadRequest);
}

#[test]
fn a_directory_of_5000_entries_lists_completely_in_pages_that_fit_frames() {
    let mut agent = Agent::start();
    let dir = tempfile::tempdir().expect("tempdir");
    // Long names make each page many frames' worth of JSON.
    let mut expected: Vec<String> = (0..5000)
        .map(|i| format!("{i:05}-{}", "n".repeat(180)))
        .collect();
    for name in &expected {
        fs::write(dir.path().join(name), b"").expect("create");
    }
    expected.sort();
    let root = path_str(dir.path());
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = agent.list(&root, GuestUser::Root, cursor.as_deref(), 1000);
        pages += 1;
        assert!(page.out.max_frame <= MAX_FRAME_PAYLOAD);
        assert!(
            page.out.data_frames > 1,
            "a page of long names spans frames"
        );
        seen.extend(page.entries().into_iter().map(|e| e.name));
        match page.next() {
            (true, Some(next)) => cursor = Some(next),
            (false, None) => break,
            other => panic!("inconsistent page end {other:?}"),
        }
    }
    assert_eq!(pages, 5);
    assert_eq!(seen, expected, "every entry once, in order");
    // The channel still serves other requests afterwards.
    let out = agent.exec(Exec::shell("echo still-here"));
    assert_eq!(out.stdout(), "still-here\n");
}

/// A directory the guest user may write into, as `/tmp` is in a guest.
fn open_dir() -> TempDir {
    assert!(
        rustix_is_root(),
        "this test switches to the guest user: run the agent tests as root"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o1777)).expect("chmod 1777");
    dir
}

fn rustix_is_root() -> bool {
    fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

fn owner_and_mode(path: &Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let m = fs::symlink_metadata(path).expect("stat");
    (m.uid(), m.mode() & 0o7777)
}

#[test]
fn the_guest_user_cannot_upload_setuid_files_and_owns_what_it_writes() {
    let mut agent = Agent::start();
    let dir = open_dir();
    let target = dir.path().join("s");
    let out = agent.write_file_as(&path_str(&target), 0o4755, b"#!/bin/sh\n", GuestUser::User);
    assert!(
        matches!(out.reply(), Reply::Written { .. }),
        "{:?}",
        out.reply()
    );
    assert_eq!(owner_and_mode(&target), (1000, 0o755));
    // root may, when it asks.
    let out = agent.write_file_as(&path_str(&target), 0o4755, b"x", GuestUser::Root);
    assert!(
        matches!(out.reply(), Reply::Written { .. }),
        "{:?}",
        out.reply()
    );
    assert_eq!(owner_and_mode(&target), (0, 0o4755));
}

#[test]
fn the_guest_user_cannot_touch_root_only_files() {
    let mut agent = Agent::start();
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(rustix_is_root(), "run the agent tests as root");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let passwd = dir.path().join("passwd");
    fs::write(&passwd, b"root:x:0:0::/root:/bin/sh\n").expect("write");
    let secret = dir.path().join("shadow");
    fs::write(&secret, b"root:secret-hash\n").expect("write");
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).expect("chmod");

    let out = agent.write_file_as(&path_str(&passwd), 0o644, b"evil::0:0", GuestUser::User);
    assert_eq!(out.error_code(), AgentErrorCode::PermissionDenied);
    assert_eq!(
        fs::read(&passwd).expect("read"),
        b"root:x:0:0::/root:/bin/sh\n"
    );
    let out = agent.read_file_as(&path_str(&secret), GuestUser::User);
    assert_eq!(out.error_code(), AgentErrorCode::PermissionDenied);
    assert!(out.data.is_empty());
    let out = agent.call(&Request::Remove {
        path: path_str(&passwd),
        recursive: false,
        user: GuestUser::User,
    });
    assert_eq!(out.error_code(), AgentErrorCode::PermissionDenied);
    assert!(passwd.exists());
    let private = dir.path().join("private");
    fs::create_dir(&private).expect("mkdir");
    fs::set_permissions(&private, fs::Permissions::from_mode(0o700)).expect("chmod");
    let out = agent.list(&path_str(&private), GuestUser::User, None, 50);
    assert_eq!(out.error_code(), AgentErrorCode::PermissionDenied);
    // Root still can.
    let out = agent.read_file_as(&path_str(&secret), GuestUser::Root);
    assert_eq!(out.data, b"root:secret-hash\n");
}

#[test]
fn a_symlink_planted_by_a_guest_process_does_not_lead_the_caller_to_root_files() {
    let mut agent = Agent::start();
    let secret_dir = tempfile::tempdir().expect("tempdir");
    let secret = secret_dir.path().join("shadow");
    fs::write(&secret, b"root:secret-hash\n").expect("write");
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).expect("chmod");
    let tmp = open_dir();
    let link = tmp.path().join("innocent.txt");
    symlink(&secret, &link).expect("plant the symlink");
    // Planted by a process of the guest user: the link is its own.
    std::os::unix::fs::lchown(&link, Some(1000), Some(1000)).expect("chown the link");

    let out = agent.read_file_as(&path_str(&link), GuestUser::User);
    assert_eq!(out.error_code(), AgentErrorCode::PermissionDenied);
    assert!(out.data.is_empty(), "nothing of the secret is sent");
    let out = agent.write_file_as(&path_str(&link), 0o644, b"overwritten", GuestUser::User);
    // The upload replaces the link itself; it never writes through it.
    assert!(
        matches!(out.reply(), Reply::Written { .. }),
        "{:?}",
        out.reply()
    );
    assert_eq!(fs::read(&secret).expect("read"), b"root:secret-hash\n");
    assert_eq!(owner_and_mode(&secret), (0, 0o600));
    assert_eq!(fs::read(&link).expect("read"), b"overwritten");
}

#[test]
fn archive_members_of_the_guest_user_lose_setuid_and_belong_to_it() {
    let mut agent = Agent::start();
    let dir = open_dir();
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(3);
    header.set_mode(0o6755);
    header.set_uid(0);
    header.set_gid(0);
    header.set_cksum();
    builder
        .append_data(&mut header, "bin/su", &b"abc"[..])
        .expect("append");
    let tar = builder.into_inner().expect("tar");
    let dst = dir.path().join("unpacked");
    let out = agent.write_archive_as(&path_str(&dst), &tar, GuestUser::User);
    assert!(
        matches!(out.reply(), Reply::Written { .. }),
        "{:?}",
        out.reply()
    );
    assert_eq!(owner_and_mode(&dst.join("bin/su")), (1000, 0o755));
}

#[test]
fn removes_files_and_directories() {
    let mut agent = Agent::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let root = path_str(dir.path());
    fs::write(dir.path().join("f"), b"x").expect("write");
    fs::create_dir_all(dir.path().join("d/sub")).expect("mkdir");
    fs::write(dir.path().join("d/sub/g"), b"y").expect("write");
    fs::create_dir(dir.path().join("empty")).expect("mkdir");
    let remove = |agent: &mut Agent, name: &str, recursive: bool| {
        agent.call(&Request::Remove {
            path: format!("{root}/{name}"),
            recursive,
            user: GuestUser::Root,
        })
    };

    assert_eq!(remove(&mut agent, "f", false).reply(), &Reply::Removed);
    assert!(!dir.path().join("f").exists());
    assert_eq!(
        remove(&mut agent, "f", false).error_code(),
        AgentErrorCode::FileNotFound
    );
    assert_eq!(remove(&mut agent, "empty", false).reply(), &Reply::Removed);
    assert_eq!(
        remove(&mut agent, "d", false).error_code(),
        AgentErrorCode::DirectoryNotEmpty
    );
    assert!(dir.path().join("d/sub/g").exists());
    assert_eq!(remove(&mut agent, "d", true).reply(), &Reply::Removed);
    assert!(names_in(dir.path()).is_empty());

    let root_dir = agent.call(&Request::Remove {
        path: "/".into(),
        recursive: true,
        user: GuestUser::Root,
    });
    assert_eq!(root_dir.error_code(), AgentErrorCode::InvalidPath);
}

#[test]
fn relative_path_is_invalid_path() {
    let mut agent = Agent::start();
    let requests = [
        Request::ReadFile {
            path: "etc/passwd".into(),
            user: GuestUser::Root,
        },
        Request::WriteFile {
            path: "x.txt".into(),
            mode: 0o644,
            user: GuestUser::Root,
        },
        Request::ListDir {
            path: "".into(),
            user: GuestUser::Root,
            after_hex: None,
            limit: 50,
        },
        Request::Remove {
            path: "./a".into(),
            recursive: false,
            user: GuestUser::Root,
        },
    ];
    for req in requests {
        let out = agent.call(&req);
        assert_eq!(out.error_code(), AgentErrorCode::InvalidPath, "{req:?}");
    }
}

#[test]
fn exits_cleanly_when_the_host_side_closes() {
    let agent = Agent::start();
    let status = agent.disconnect();
    assert!(status.success(), "agent exited with {status}");
}

/// A tree with nested directories, an empty one, an executable, a symlink.
fn make_tree(root: &Path) {
    fs::create_dir_all(root.join("src/deep/er")).expect("dirs");
    fs::create_dir_all(root.join("empty")).expect("empty dir");
    fs::write(root.join("README"), b"hello\n").expect("file");
    fs::write(root.join("src/deep/er/data.bin"), pseudo_random(200_000, 7)).expect("file");
    fs::write(root.join("run.sh"), b"#!/bin/sh\necho hi\n").expect("script");
    fs::set_permissions(root.join("run.sh"), fs::Permissions::from_mode(0o755)).expect("chmod");
    symlink("src/deep", root.join("shortcut")).expect("symlink");
}

/// `(relative path, kind, mode, content or link target)` of every entry under `root`.
fn snapshot(root: &Path) -> Vec<(String, char, u32, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, char, u32, Vec<u8>)>) {
        for entry in fs::read_dir(dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            let rel = path
                .strip_prefix(root)
                .expect("under root")
                .display()
                .to_string();
            let meta = fs::symlink_metadata(&path).expect("lstat");
            let mode = meta.permissions().mode() & 0o7777;
            if meta.file_type().is_symlink() {
                let target = fs::read_link(&path).expect("readlink");
                out.push((rel, 'l', 0, target.display().to_string().into_bytes()));
            } else if meta.is_dir() {
                out.push((rel, 'd', mode, Vec::new()));
                walk(root, &path, out);
            } else {
                out.push((rel, 'f', mode, fs::read(&path).expect("read")));
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

#[test]
fn a_directory_tree_round_trips_through_archives() {
    let mut agent = Agent::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src-tree");
    make_tree(&src);

    let out = agent.call(&Request::ReadArchive {
        path: path_str(&src),
        user: GuestUser::Root,
    });
    assert!(
        matches!(out.reply(), Reply::Read { size_bytes } if *size_bytes == out.data.len() as u64)
    );
    let local = dir.path().join("unpacked-locally");
    tar::Archive::new(out.data.as_slice())
        .unpack(&local)
        .expect("the agent's archive unpacks");
    assert_eq!(snapshot(&local), snapshot(&src));

    // Into a directory that does not exist yet (its parents neither).
    let dst = dir.path().join("a/b/restored");
    let up = agent.write_archive(&path_str(&dst), &out.data);
    assert!(
        matches!(up.reply(), Reply::Written { size_bytes } if *size_bytes == out.data.len() as u64),
        "{:?}",
        up.reply()
    );
    assert_eq!(snapshot(&dst), snapshot(&src));
}

/// Archiving `/` in a guest went through `/proc` and `/sys` and broke off mid-stream (found by
/// the API fuzzing pass); a file the user cannot read did the same after the first bytes.
#[test]
fn an_archive_stays_on_its_filesystem_and_refuses_unreadable_files_before_streaming() {
    let mut agent = Agent::start();
    assert!(rustix_is_root(), "run the agent tests as root");
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    fs::create_dir_all(src.join("mnt")).expect("dirs");
    fs::write(src.join("a.txt"), b"a").expect("file");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "tmpfs"])
        .arg(src.join("mnt"))
        .status()
        .expect("run mount");
    assert!(mounted.success(), "mounting a tmpfs for the test");
    fs::write(src.join("mnt/elsewhere.txt"), b"on another filesystem").expect("file");
    let out = agent.call(&Request::ReadArchive {
        path: path_str(&src),
        user: GuestUser::Root,
    });
    let unmounted = std::process::Command::new("umount")
        .arg(src.join("mnt"))
        .status()
        .expect("run umount");
    assert!(unmounted.success());
    assert!(
        matches!(out.reply(), Reply::Read { .. }),
        "{:?}",
        out.reply()
    );
    let mut names: Vec<String> = tar::Archive::new(out.data.as_slice())
        .entries()
        .expect("tar")
        .map(|e| {
            e.expect("entry")
                .path()
                .expect("path")
                .display()
                .to_string()
        })
        .collect();
    names.sort();
    assert_eq!(
        names,
        [".", "a.txt", "mnt"],
        "the mount point is sent empty"
    );

    // A root-only file below: refused as the guest user before any byte is sent.
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    fs::set_permissions(&src, fs::Permissions::from_mode(0o755)).expect("chmod");
    let secret = src.join("secret");
    fs::write(&secret, b"root only").expect("file");
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).expect("chmod");
    let out = agent.call(&Request::ReadArchive {
        path: path_str(&src),
        user: GuestUser::User,
    });
    assert_eq!(out.error_code(), AgentErrorCode::PermissionDenied);
    assert!(
        out.data.is_empty(),
        "{} bytes were sent first",
        out.data.len()
    );
}

#[test]
fn an_archive_merges_into_an_existing_directory() {
    let mut agent = Agent::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let dst = dir.path().join("dst");
    fs::create_dir_all(dst.join("src")).expect("dirs");
    fs::write(dst.join("keep.txt"), b"kept").expect("file");
    fs::write(dst.join("README"), b"old").expect("file");
    let src = dir.path().join("src-tree");
    make_tree(&src);
    let tar = agent
        .call(&Request::ReadArchive {
            path: path_str(&src),
            user: GuestUser::Root,
        })
        .data;

    let up = agent.write_archive(&path_str(&dst), &tar);
    assert!(
        matches!(up.reply(), Reply::Written { .. }),
        "{:?}",
        up.reply()
    );
    assert_eq!(fs::read(dst.join("keep.txt")).expect("kept"), b"kept");
    assert_eq!(fs::read(dst.join("README")).expect("replaced"), b"hello\n");
    assert!(dst.join("src/deep/er/data.bin").is_file());
    assert!(
        !names_in(&dst).iter().any(|n| n.starts_with(".sbtmp")),
        "{:?}",
        names_in(&dst)
    );
}

/// A tar holding one file at `name`, written raw so that `..` and `/` survive.
fn raw_tar_entry(name: &str, body: &[u8]) -> Vec<u8> {
    let mut header = tar::Header::new_old();
    header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    header.set_size(body.len() as u64);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    let mut out = header.as_bytes().to_vec();
    out.extend_from_slice(body);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out.extend_from_slice(&[0u8; 1024]);
    out
}

#[test]
fn archives_that_escape_or_are_not_tar_change_nothing() {
    let mut agent = Agent::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let dst = dir.path().join("target");

    for (what, tar) in [
        ("a `..` entry", raw_tar_entry("../escaped", b"x")),
        ("an absolute entry", raw_tar_entry("/tmp/escaped-abs", b"x")),
        (
            "not tar at all",
            b"this is not a tar stream at all, just text".repeat(40),
        ),
    ] {
        let out = agent.write_archive(&path_str(&dst), &tar);
        assert_eq!(out.error_code(), AgentErrorCode::InvalidArchive, "{what}");
        assert!(!dst.exists(), "{what}: the target it created is gone again");
        assert!(!dir.path().join("escaped").exists(), "{what}");
    }

    // A symlink to outside, then a file through it.
    let outside = dir.path().join("outside");
    fs::create_dir(&outside).expect("outside dir");
    let mut builder = tar::Builder::new(Vec::new());
    let mut link = tar::Header::new_gnu();
    link.set_entry_type(tar::EntryType::Symlink);
    link.set_size(0);
    builder
        .append_link(&mut link, "link", &outside)
        .expect("symlink entry");
    let mut file = tar::Header::new_gnu();
    file.set_size(4);
    file.set_mode(0o644);
    builder
        .append_data(&mut file, "link/evil", &b"evil"[..])
        .expect("file entry");
    let tar = builder.into_inner().expect("tar");
    fs::create_dir(&dst).expect("existing target");
    let out = agent.write_archive(&path_str(&dst), &tar);
    assert_eq!(out.error_code(), AgentErrorCode::InvalidArchive);
    assert!(
        names_in(&outside).is_empty(),
        "nothing written through the symlink"
    );
    assert!(
        names_in(&dst).is_empty(),
        "nothing staged is left: {:?}",
        names_in(&dst)
    );
}
