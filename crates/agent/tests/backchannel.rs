//! The agent's backchannel as the worker and a guest program see it: a real
//! `scaibunker-agent serve --unix … --api-socket …`, this test standing in for the worker on
//! the channel, and HTTP clients (raw, and the `guest` helper) on the api socket.
#![allow(clippy::unwrap_used)]

use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use scaibunker_proto::agent::{
    ApiRequest, ApiResponse, Frame, FrameKind, GUEST_STREAM_BIT, GuestUser, MAX_API_IN_FLIGHT,
    Reply, Request, is_guest_stream,
};
use tempfile::TempDir;

const WAIT: Duration = Duration::from_secs(30);

struct Agent {
    child: Child,
    conn: UnixStream,
    api: PathBuf,
    _dir: TempDir,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    fn start() -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let api = dir.path().join("run/api.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        listener.set_nonblocking(true).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_scaibunker-agent"))
            .args(["serve", "--unix"])
            .arg(&sock)
            .arg("--api-socket")
            .arg(&api)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let give_up = Instant::now() + WAIT;
        let conn = loop {
            match listener.accept() {
                Ok((conn, _)) => break conn,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    assert!(child.try_wait().unwrap().is_none(), "the agent exited");
                    assert!(Instant::now() < give_up, "the agent never connected");
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        conn.set_nonblocking(false).unwrap();
        conn.set_read_timeout(Some(WAIT)).unwrap();
        let mut agent = Agent {
            child,
            conn,
            api,
            _dir: dir,
        };
        let hello = agent.read();
        assert_eq!(hello.kind, FrameKind::Hello);
        // The socket is bound before the session starts.
        assert!(agent.api.exists());
        agent
    }

    fn read(&mut self) -> Frame {
        Frame::read_from(&mut self.conn).unwrap().expect("a frame")
    }

    fn send(&mut self, frame: &Frame) {
        frame.write_to(&mut self.conn).unwrap();
    }

    /// Reads one whole guest call: its head and body.
    fn take_call(&mut self) -> (u32, ApiRequest, Vec<u8>) {
        let head = self.read();
        assert_eq!(head.kind, FrameKind::ApiRequest, "{head:?}");
        assert!(is_guest_stream(head.stream_id), "{:#x}", head.stream_id);
        let req: ApiRequest = head.decode_json().unwrap();
        let mut body = Vec::new();
        loop {
            let f = self.read();
            assert_eq!(f.stream_id, head.stream_id);
            match f.kind {
                FrameKind::Data => body.extend_from_slice(&f.payload),
                FrameKind::End => return (head.stream_id, req, body),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    fn answer(&mut self, id: u32, status: u16, body: &[u8]) {
        let head = ApiResponse {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body_bytes: body.len() as u64,
        };
        self.send(&Frame::json(id, FrameKind::ApiResponse, &head));
        for chunk in body.chunks(65536) {
            self.send(&Frame::new(id, FrameKind::Data, chunk.to_vec()));
        }
        self.send(&Frame::new(id, FrameKind::End, Vec::new()));
    }
}

/// A raw HTTP/1.1 exchange on the api socket: `(status line, whole response)`.
fn http(api: &Path, raw: &[u8]) -> (String, String) {
    let mut s = UnixStream::connect(api).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(raw).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    (text.lines().next().unwrap_or_default().to_owned(), text)
}

#[test]
fn a_guest_request_travels_as_an_api_stream_and_its_answer_comes_back() {
    let mut agent = Agent::start();
    let mode = std::fs::metadata(&agent.api).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o666, "any guest user may call");
    let api = agent.api.clone();
    let client = thread::spawn(move || {
        http(
            &api,
            b"POST /v1/self/events HTTP/1.1\r\nHost: x\r\nX-Bunker-Id: bnk_forged\r\n\
              Content-Type: application/json\r\nContent-Length: 15\r\n\r\n{\"kind\":\"step\"}",
        )
    });
    let (id, req, body) = agent.take_call();
    assert_eq!(req.method, "POST");
    assert_eq!(req.path, "/v1/self/events");
    assert_eq!(body, br#"{"kind":"step"}"#);
    // The agent passes what the caller said; dropping identity headers is the worker's job.
    assert!(
        req.headers
            .contains(&("x-bunker-id".into(), "bnk_forged".into()))
    );
    let big = vec![b'a'; 200_000];
    agent.answer(id, 201, &big);
    let (status, text) = client.join().unwrap();
    assert_eq!(status, "HTTP/1.1 201 Created");
    assert!(
        text.contains("content-length: 200000\r\n"),
        "{}",
        &text[..200]
    );
    assert!(text.ends_with(std::str::from_utf8(&big).unwrap()));
}

#[test]
fn the_guest_helper_calls_the_socket() {
    let mut agent = Agent::start();
    let helper = thread::spawn({
        let api = agent.api.clone();
        move || {
            Command::new(env!("CARGO_BIN_EXE_scaibunker-agent"))
                .args(["guest", "metadata", "set", "stage", "two"])
                .env("SCAIBUNKER_API_SOCKET", &api)
                .output()
                .unwrap()
        }
    });
    let (id, req, body) = agent.take_call();
    assert_eq!(
        (req.method.as_str(), req.path.as_str()),
        ("PUT", "/v1/self/metadata/stage")
    );
    assert_eq!(body, b"two");
    agent.answer(id, 200, br#"{"status":"ok"}"#);
    let out = helper.join().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        r#"{"status":"ok"}"#
    );

    let refused = thread::spawn({
        let api = agent.api.clone();
        move || {
            Command::new(env!("CARGO_BIN_EXE_scaibunker-agent"))
                .args(["guest", "self"])
                .env("SCAIBUNKER_API_SOCKET", &api)
                .output()
                .unwrap()
        }
    });
    let (id, _, _) = agent.take_call();
    agent.answer(id, 404, br#"{"status":"error"}"#);
    let out = refused.join().unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "a non-2xx answer fails the command"
    );
}

#[test]
fn past_the_in_flight_cap_the_agent_answers_429_itself() {
    let mut agent = Agent::start();
    let mut clients = Vec::new();
    let mut held = Vec::new();
    for _ in 0..MAX_API_IN_FLIGHT {
        let api = agent.api.clone();
        clients.push(thread::spawn(move || {
            http(&api, b"GET /v1/self HTTP/1.1\r\n\r\n")
        }));
        held.push(agent.take_call().0);
    }
    let (status, text) = http(&agent.api, b"GET /v1/self HTTP/1.1\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 429 Too Many Requests");
    assert!(text.contains("retry-after: 1\r\n"));
    for id in held {
        agent.answer(id, 200, b"{}");
    }
    for c in clients {
        assert_eq!(c.join().unwrap().0, "HTTP/1.1 200 OK");
    }
}

#[test]
fn worker_frames_in_the_guest_space_are_ignored_and_exec_still_works() {
    let mut agent = Agent::start();
    // A REQUEST in the guest's space opens nothing; a stray answer for a call nobody made
    // is dropped.
    let forged = Request::ReadFile {
        path: "/etc/hostname".into(),
        user: GuestUser::Root,
    };
    agent.send(&Frame::json(
        GUEST_STREAM_BIT | 7,
        FrameKind::Request,
        &forged,
    ));
    agent.send(&Frame::new(
        GUEST_STREAM_BIT | 8,
        FrameKind::Data,
        b"junk".to_vec(),
    ));
    agent.send(&Frame::new(
        GUEST_STREAM_BIT | 8,
        FrameKind::ApiResponse,
        b"not json".to_vec(),
    ));
    agent.send(&Frame::json(
        1,
        FrameKind::Request,
        &Request::Remove {
            path: "/nonexistent-backchannel-test".into(),
            recursive: false,
            user: GuestUser::Root,
        },
    ));
    let f = agent.read();
    assert_eq!(
        (f.stream_id, f.kind),
        (1, FrameKind::Reply),
        "only the worker-space stream answers"
    );
    assert!(matches!(
        f.decode_json::<Reply>().unwrap(),
        Reply::Error { .. }
    ));
    // Garbage on the socket is refused there and never reaches the channel.
    let (status, _) = http(
        &agent.api,
        b"BREW /pot HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
    assert_eq!(status, "HTTP/1.1 411 Length Required");
    let (status, _) = http(&agent.api, b"GET /../../etc HTTP/9\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 400 Bad Request");
    // A real call still goes through after all that.
    let api = agent.api.clone();
    let client = thread::spawn(move || http(&api, b"GET /v1/self HTTP/1.1\r\n\r\n"));
    let (id, req, _) = agent.take_call();
    assert_eq!(req.path, "/v1/self");
    agent.answer(id, 200, b"{}");
    assert_eq!(client.join().unwrap().0, "HTTP/1.1 200 OK");
}

#[test]
fn a_session_reset_fails_the_calls_in_flight() {
    let mut agent = Agent::start();
    let api = agent.api.clone();
    let client = thread::spawn(move || http(&api, b"GET /v1/self HTTP/1.1\r\n\r\n"));
    let _ = agent.take_call();
    // The worker asks for a reset: the agent drops the session and, over a unix socket,
    // exits; the waiting call must not hang (it gets a 502, or the connection closes with
    // the process).
    agent.send(&Frame::new(0, FrameKind::Reset, Vec::new()));
    let (status, _) = client.join().unwrap();
    assert!(
        status.is_empty() || status == "HTTP/1.1 502 Bad Gateway",
        "{status}"
    );
}
