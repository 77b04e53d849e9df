use std::path::PathBuf;

use tokio::net::UnixStream;

use futures_util::StreamExt;
use scaibunker_proto::agent::{DirEntry, EntryType, MAX_FRAME_PAYLOAD, Stdin};

use super::*;

/// The guest side of a channel, scripted by each test.
struct FakeAgent {
    read: FrameReader<OwnedReadHalf>,
    write: OwnedWriteHalf,
}

impl FakeAgent {
    async fn recv(&mut self) -> Frame {
        self.read.next().await.expect("frame").expect("not closed")
    }

    async fn send(&mut self, frame: Frame) {
        self.write.write_all(&frame.encode()).await.expect("send");
    }

    async fn reply(&mut self, id: u32, reply: &Reply) {
        self.send(Frame::json(id, FrameKind::Reply, reply)).await;
    }

    async fn hello(&mut self, version: u32) {
        let hello = Hello {
            protocol_version: version,
            agent_version: "test".into(),
            kernel: "6.1.0-test".into(),
        };
        self.send(Frame::json(0, FrameKind::Hello, &hello)).await;
    }
}

struct Harness {
    _dir: tempfile::TempDir,
    path: PathBuf,
    listener: UnixListener,
}

fn harness() -> Harness {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    Harness {
        _dir: dir,
        path,
        listener,
    }
}

async fn connected() -> (AgentClient, FakeAgent, Harness) {
    let h = harness();
    let stream = UnixStream::connect(&h.path).await.expect("connect");
    let (read, write) = stream.into_split();
    let mut agent = FakeAgent {
        read: FrameReader::new(read),
        write,
    };
    agent.hello(PROTOCOL_VERSION).await;
    let client = AgentClient::connect(&h.listener).await.expect("hello");
    (client, agent, h)
}

fn exec_spec(cmd: &str, stdin: Option<&'static [u8]>, limit: u64) -> ExecSpec {
    ExecSpec {
        program: Program::Shell(cmd.into()),
        env: BTreeMap::new(),
        cwd: None,
        user: GuestUser::Root,
        stdin: stdin.map(Bytes::from_static),
        timeout: Duration::from_secs(5),
        output_limit_bytes: limit,
    }
}

#[tokio::test]
async fn refuses_an_agent_of_another_protocol_version() {
    let h = harness();
    let stream = UnixStream::connect(&h.path).await.expect("connect");
    let (read, write) = stream.into_split();
    let mut agent = FakeAgent {
        read: FrameReader::new(read),
        write,
    };
    agent.hello(PROTOCOL_VERSION + 1).await;
    let err = AgentClient::connect(&h.listener)
        .await
        .expect_err("mismatch");
    let text = err.to_string();
    assert!(text.contains(&(PROTOCOL_VERSION + 1).to_string()), "{text}");
    assert!(text.contains(&PROTOCOL_VERSION.to_string()), "{text}");
}

#[tokio::test]
async fn exec_feeds_stdin_and_keeps_output_up_to_the_limit() {
    let (client, mut agent, _h) = connected().await;
    let guest = tokio::spawn(async move {
        let req = agent.recv().await;
        assert_eq!(req.kind, FrameKind::Request);
        let id = req.stream_id;
        assert_ne!(id, 0);
        match req.decode_json::<Request>().expect("request") {
            Request::Exec {
                stdin, timeout_ms, ..
            } => {
                assert_eq!(stdin, Stdin::Stream);
                assert_eq!(timeout_ms, 5000);
            }
            other => panic!("unexpected {other:?}"),
        }
        let data = agent.recv().await;
        assert_eq!(
            (data.kind, &data.payload[..]),
            (FrameKind::Data, &b"input"[..])
        );
        assert_eq!(agent.recv().await.kind, FrameKind::End);
        agent
            .send(Frame::new(id, FrameKind::Stdout, b"hello ".to_vec()))
            .await;
        agent
            .send(Frame::new(id, FrameKind::Stderr, b"oops".to_vec()))
            .await;
        agent
            .send(Frame::new(id, FrameKind::Stdout, b"world".to_vec()))
            .await;
        let exited = Reply::Exited {
            exit_code: Some(3),
            signal: None,
            timed_out: false,
            duration_ms: 12,
        };
        agent.reply(id, &exited).await;
        agent
    });
    let outcome = client
        .exec(exec_spec("cat", Some(b"input"), 8))
        .await
        .expect("exec");
    assert_eq!(outcome.exit_code, Some(3));
    assert_eq!(outcome.duration_ms, 12);
    assert_eq!(outcome.stdout, b"hello wo");
    assert_eq!(outcome.stdout_total_bytes, 11);
    assert_eq!(outcome.stderr, b"oops");
    assert_eq!(outcome.stderr_total_bytes, 4);
    guest.await.expect("guest");
}

#[tokio::test]
async fn exec_stream_yields_each_frame_as_it_arrives_and_cancels_when_dropped() {
    let (client, mut agent, _h) = connected().await;
    // The output limit is for collecting; a stream passes every byte on.
    let mut events = client
        .exec_stream(exec_spec("x", None, 0))
        .await
        .expect("opens");
    let id = agent.recv().await.stream_id;
    for (kind, text) in [
        (FrameKind::Stdout, "ab"),
        (FrameKind::Stderr, "c"),
        (FrameKind::Stdout, "d"),
    ] {
        agent.send(Frame::new(id, kind, text.into())).await;
        let expected = match kind {
            FrameKind::Stdout => ExecEvent::Stdout(Bytes::from(text)),
            _ => ExecEvent::Stderr(Bytes::from(text)),
        };
        // Each frame is handed over before the agent has sent anything more.
        assert_eq!(
            events.next().await.expect("an event").expect("ok"),
            expected
        );
    }
    let exited = Reply::Exited {
        exit_code: Some(1),
        signal: None,
        timed_out: false,
        duration_ms: 7,
    };
    agent.reply(id, &exited).await;
    let exit = ExecExit {
        exit_code: Some(1),
        signal: None,
        timed_out: false,
        duration_ms: 7,
        stdout_total_bytes: 3,
        stderr_total_bytes: 1,
    };
    assert_eq!(
        events.next().await.expect("an event").expect("ok"),
        ExecEvent::Exited(exit)
    );
    assert!(events.next().await.is_none(), "nothing after the exit");

    // A stream dropped before its exit cancels the command.
    let events = client
        .exec_stream(exec_spec("sleep 100", None, 0))
        .await
        .expect("opens");
    let id = agent.recv().await.stream_id;
    drop(events);
    let cancel = agent.recv().await;
    assert_eq!((cancel.stream_id, cancel.kind), (id, FrameKind::Cancel));
}

#[tokio::test]
async fn concurrent_streams_are_routed_by_id() {
    let (client, mut agent, _h) = connected().await;
    let guest = tokio::spawn(async move {
        let a = agent.recv().await.stream_id;
        let b = agent.recv().await.stream_id;
        assert_ne!(a, b);
        // Answer in reverse order, interleaved.
        for (id, text) in [(b, "B"), (a, "A"), (b, "B")] {
            agent
                .send(Frame::new(id, FrameKind::Stdout, text.into()))
                .await;
        }
        for id in [b, a] {
            let exited = Reply::Exited {
                exit_code: Some(0),
                signal: None,
                timed_out: false,
                duration_ms: 1,
            };
            agent.reply(id, &exited).await;
        }
        agent
    });
    let (x, y) = tokio::join!(
        client.exec(exec_spec("x", None, 100)),
        client.exec(exec_spec("y", None, 100))
    );
    let mut outs = [x.expect("x").stdout, y.expect("y").stdout];
    outs.sort();
    assert_eq!(outs, [b"A".to_vec(), b"BB".to_vec()]);
    guest.await.expect("guest");
}

#[tokio::test]
async fn an_unread_stream_holds_back_only_itself_and_reading_grants_credit() {
    let (client, mut agent, _h) = connected().await;
    // Stream a: its consumer does not read. Stream b: read as it comes.
    let mut a = client
        .exec_stream(exec_spec("a", None, 0))
        .await
        .expect("open a");
    let a_id = agent.recv().await.stream_id;
    let mut b = client
        .exec_stream(exec_spec("b", None, 0))
        .await
        .expect("open b");
    let b_id = agent.recv().await.stream_id;
    for _ in 0..STREAM_WINDOW_FRAMES {
        agent
            .send(Frame::new(a_id, FrameKind::Stdout, b"a".to_vec()))
            .await;
    }
    // a's whole window is buffered; b still flows at once.
    for i in 0..3u8 {
        agent
            .send(Frame::new(b_id, FrameKind::Stdout, vec![i]))
            .await;
        let got = tokio::time::timeout(Duration::from_secs(2), b.next())
            .await
            .expect("b is not held back by a");
        assert_eq!(
            got.expect("event").expect("ok"),
            ExecEvent::Stdout(Bytes::from(vec![i]))
        );
    }
    // Reading a grants its frames back in batches.
    for _ in 0..CREDIT_BATCH {
        a.next().await.expect("event").expect("ok");
    }
    let credit = agent.recv().await;
    assert_eq!((credit.stream_id, credit.kind), (a_id, FrameKind::Credit));
    assert_eq!(credit.credit_frames(), Some(CREDIT_BATCH));
}

#[tokio::test]
async fn an_agent_that_ignores_the_window_loses_that_stream_only() {
    let (client, mut agent, _h) = connected().await;
    let mut a = client
        .exec_stream(exec_spec("a", None, 0))
        .await
        .expect("open a");
    let a_id = agent.recv().await.stream_id;
    let b = client.exec(exec_spec("b", None, 10));
    let guest = tokio::spawn(async move {
        let b_id = agent.recv().await.stream_id;
        for _ in 0..=STREAM_BUFFER_FRAMES {
            agent
                .send(Frame::new(a_id, FrameKind::Stdout, b"a".to_vec()))
                .await;
        }
        let cancel = agent.recv().await;
        assert_eq!((cancel.stream_id, cancel.kind), (a_id, FrameKind::Cancel));
        agent
            .send(Frame::new(b_id, FrameKind::Stdout, b"fine".to_vec()))
            .await;
        let exited = Reply::Exited {
            exit_code: Some(0),
            signal: None,
            timed_out: false,
            duration_ms: 1,
        };
        agent.reply(b_id, &exited).await;
        agent
    });
    assert_eq!(b.await.expect("b completes").stdout, b"fine");
    let mut last = None;
    while let Some(event) = a.next().await {
        last = Some(event);
    }
    assert!(
        matches!(last, Some(Err(AgentError::WindowExceeded))),
        "{last:?}"
    );
    guest.await.expect("guest");
}

#[tokio::test]
async fn spawn_failure_is_an_agent_error() {
    let (client, mut agent, _h) = connected().await;
    let guest = tokio::spawn(async move {
        let id = agent.recv().await.stream_id;
        let err = Reply::Error {
            code: AgentErrorCode::SpawnFailed,
            message: "no such file".into(),
        };
        agent.reply(id, &err).await;
        agent
    });
    let err = client
        .exec(exec_spec("nope", None, 10))
        .await
        .expect_err("fails");
    assert!(
        matches!(
            err,
            AgentError::Agent {
                code: AgentErrorCode::SpawnFailed,
                ..
            }
        ),
        "{err}"
    );
    guest.await.expect("guest");
}

#[derive(Debug, thiserror::Error)]
#[error("client went away")]
struct BodyGone;

#[tokio::test]
async fn upload_is_split_into_frames_and_cancelled_when_the_body_fails() {
    let (client, mut agent, _h) = connected().await;
    let guest = tokio::spawn(async move {
        // First upload: a body larger than one frame.
        let req = agent.recv().await;
        let id = req.stream_id;
        assert!(matches!(
            req.decode_json::<Request>().expect("json"),
            Request::WriteFile { mode: 0o600, .. }
        ));
        let mut got = 0;
        loop {
            let f = agent.recv().await;
            match f.kind {
                FrameKind::Data => {
                    assert!(f.payload.len() <= MAX_FRAME_PAYLOAD);
                    got += f.payload.len();
                }
                FrameKind::End => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        agent
            .reply(
                id,
                &Reply::Written {
                    size_bytes: got as u64,
                },
            )
            .await;
        // Second upload: the body breaks after one chunk.
        let id = agent.recv().await.stream_id;
        assert_eq!(agent.recv().await.kind, FrameKind::Data);
        let cancel = agent.recv().await;
        assert_eq!((cancel.stream_id, cancel.kind), (id, FrameKind::Cancel));
        let err = Reply::Error {
            code: AgentErrorCode::Io,
            message: "cancelled".into(),
        };
        agent.reply(id, &err).await;
        agent
    });
    let big = Bytes::from(vec![7u8; MAX_FRAME_PAYLOAD * 2 + 5]);
    let body = futures_util::stream::iter([Ok::<_, BodyGone>(big)]);
    let size = client
        .write_file("/f".into(), 0o600, GuestUser::Root, body)
        .await
        .expect("written");
    assert_eq!(size, (MAX_FRAME_PAYLOAD * 2 + 5) as u64);

    let body = futures_util::stream::iter([Ok(Bytes::from_static(b"x")), Err(BodyGone)]);
    let err = client
        .write_file("/g".into(), 0o644, GuestUser::Root, body)
        .await
        .expect_err("body failed");
    assert!(matches!(err, WriteFileError::Body(BodyGone)));
    guest.await.expect("guest");
}

#[tokio::test]
async fn read_file_reports_errors_before_streaming() {
    let (client, mut agent, _h) = connected().await;
    let guest = tokio::spawn(async move {
        let id = agent.recv().await.stream_id;
        let err = Reply::Error {
            code: AgentErrorCode::FileNotFound,
            message: "/missing".into(),
        };
        agent.reply(id, &err).await;
        let id = agent.recv().await.stream_id;
        agent
            .send(Frame::new(id, FrameKind::Data, b"ab".to_vec()))
            .await;
        agent
            .send(Frame::new(id, FrameKind::Data, b"cd".to_vec()))
            .await;
        agent.reply(id, &Reply::Read { size_bytes: 4 }).await;
        let id = agent.recv().await.stream_id;
        agent.reply(id, &Reply::Read { size_bytes: 0 }).await;
        agent
    });
    let err = client
        .read_file("/missing".into(), GuestUser::Root)
        .await
        .err()
        .expect("fails");
    assert!(matches!(
        err,
        AgentError::Agent {
            code: AgentErrorCode::FileNotFound,
            ..
        }
    ));
    let mut stream = client
        .read_file("/f".into(), GuestUser::Root)
        .await
        .expect("opens");
    let mut got = Vec::new();
    while let Some(chunk) = stream.next().await {
        got.extend_from_slice(&chunk.expect("chunk"));
    }
    assert_eq!(got, b"abcd");
    let mut empty = client
        .read_file("/empty".into(), GuestUser::Root)
        .await
        .expect("opens");
    assert!(empty.next().await.is_none());
    guest.await.expect("guest");
}

#[tokio::test]
async fn a_dead_channel_fails_pending_and_later_operations() {
    let (client, mut agent, _h) = connected().await;
    let guest = tokio::spawn(async move {
        let _request = agent.recv().await;
        // The VM dies: the socket closes with the stream still open.
        drop(agent);
    });
    let err = client
        .list_dir("/".into(), GuestUser::Root, None, 50)
        .await
        .expect_err("channel died");
    assert!(matches!(err, AgentError::Unavailable(_)), "{err}");
    guest.await.expect("guest");
    let err = client
        .remove("/x".into(), false, GuestUser::Root)
        .await
        .expect_err("still dead");
    assert!(matches!(err, AgentError::Unavailable(_)), "{err}");
    assert!(client.closed_reason().is_some());
}

#[tokio::test]
async fn an_abandoned_operation_is_cancelled() {
    let (client, mut agent, _h) = connected().await;
    let pending = {
        let client = client.clone();
        tokio::spawn(async move { client.exec(exec_spec("sleep 100", None, 10)).await })
    };
    let req = agent.recv().await;
    pending.abort();
    let cancel = agent.recv().await;
    assert_eq!(
        (cancel.stream_id, cancel.kind),
        (req.stream_id, FrameKind::Cancel)
    );
    // A late reply to the cancelled stream is ignored, and the channel still works.
    let exited = Reply::Exited {
        exit_code: None,
        signal: Some(9),
        timed_out: false,
        duration_ms: 5,
    };
    agent.reply(req.stream_id, &exited).await;
    let guest = tokio::spawn(async move {
        let id = agent.recv().await.stream_id;
        agent.reply(id, &Reply::Removed).await;
        agent
    });
    client
        .remove("/x".into(), true, GuestUser::Root)
        .await
        .expect("removed");
    guest.await.expect("guest");
}

#[tokio::test]
async fn a_request_over_the_frame_limit_is_refused_before_it_is_sent() {
    let (client, mut agent, _h) = connected().await;
    let mut spec = exec_spec(&"x".repeat(MAX_FRAME_PAYLOAD), None, 10);
    spec.timeout = Duration::from_secs(1);
    let err = client.exec(spec).await.expect_err("too large");
    assert!(matches!(err, AgentError::RequestTooLarge(n) if n > MAX_FRAME_PAYLOAD));
    // Nothing reached the agent, and the channel still works.
    let remove = tokio::spawn({
        let client = client.clone();
        async move { client.remove("/x".into(), false, GuestUser::User).await }
    });
    let frame = agent.recv().await;
    let request: Request = frame.decode_json().expect("request");
    assert_eq!(
        request,
        Request::Remove {
            path: "/x".into(),
            recursive: false,
            user: GuestUser::User
        }
    );
    agent.reply(frame.stream_id, &Reply::Removed).await;
    remove.await.expect("join").expect("removed");
}

#[tokio::test]
async fn a_frame_that_does_not_parse_resets_the_agent_and_the_channel_comes_back() {
    let (client, mut agent, _h) = connected().await;
    let read = tokio::spawn({
        let client = client.clone();
        async move { client.read_file("/f".into(), GuestUser::Root).await }
    });
    let opened = agent.recv().await;
    // A header over the limit, then the rest of a stale session.
    let mut garbage =
        Frame::header(opened.stream_id, FrameKind::Data, MAX_FRAME_PAYLOAD + 1).to_vec();
    garbage.extend_from_slice(&[0xAB; 300]);
    agent.write.write_all(&garbage).await.expect("garbage");
    // The worker asks for a reset; the stream open at that moment fails.
    let reset = agent.recv().await;
    assert_eq!((reset.stream_id, reset.kind), (0, FrameKind::Reset));
    assert!(matches!(
        read.await.expect("join"),
        Err(AgentError::Unavailable(_))
    ));
    // An operation started while the channel is out of step waits for the new hello.
    let listing = tokio::spawn({
        let client = client.clone();
        async move { client.list_dir("/d".into(), GuestUser::User, None, 2).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    agent
        .write
        .write_all(&[0xCD; 17])
        .await
        .expect("more stale bytes");
    agent.hello(PROTOCOL_VERSION).await;
    let frame = agent.recv().await;
    let Request::ListDir { limit, user, .. } = frame.decode_json().expect("request") else {
        panic!("expected a listing request");
    };
    assert_eq!((limit, user), (2, GuestUser::User));
    let entry = |name: &str| DirEntry {
        name: name.into(),
        path: format!("/d/{name}"),
        entry_type: EntryType::File,
        size_bytes: 1,
        mode: 0o644,
        modified_unix_s: 1,
    };
    let mut lines = Vec::new();
    for name in ["a", "b"] {
        lines.extend(serde_json::to_vec(&entry(name)).expect("json"));
        lines.push(b'\n');
    }
    // Lines may be split across frames anywhere.
    let (one, two) = lines.split_at(10);
    agent
        .send(Frame::new(frame.stream_id, FrameKind::Data, one.to_vec()))
        .await;
    agent
        .send(Frame::new(frame.stream_id, FrameKind::Data, two.to_vec()))
        .await;
    agent
        .reply(
            frame.stream_id,
            &Reply::Listing {
                has_more: true,
                next_after_hex: Some("62".into()),
            },
        )
        .await;
    let page = listing.await.expect("join").expect("listing");
    assert_eq!(page.entries, vec![entry("a"), entry("b")]);
    assert_eq!(page.next_after_hex.as_deref(), Some("62"));
}

#[tokio::test]
async fn a_listing_past_its_limit_is_a_protocol_violation() {
    let (client, mut agent, _h) = connected().await;
    let listing = tokio::spawn({
        let client = client.clone();
        async move { client.list_dir("/d".into(), GuestUser::Root, None, 1).await }
    });
    let frame = agent.recv().await;
    let line = |name: &str| {
        let mut l = serde_json::to_vec(&DirEntry {
            name: name.into(),
            path: format!("/d/{name}"),
            entry_type: EntryType::File,
            size_bytes: 0,
            mode: 0o644,
            modified_unix_s: 0,
        })
        .expect("json");
        l.push(b'\n');
        l
    };
    let mut two = line("a");
    two.extend(line("b"));
    agent
        .send(Frame::new(frame.stream_id, FrameKind::Data, two))
        .await;
    assert!(matches!(
        listing.await.expect("join"),
        Err(AgentError::Protocol { .. })
    ));
}

mod backchannel {
    use scaibunker_proto::agent::{
        ApiRequest, ApiResponse, GUEST_STREAM_BIT, MAX_API_BODY_BYTES, MAX_API_IN_FLIGHT,
    };

    use super::*;

    fn head(path: &str, body_bytes: u64) -> ApiRequest {
        ApiRequest {
            method: "POST".into(),
            path: path.into(),
            headers: vec![("x-bunker-id".into(), "bnk_forged".into())],
            body_bytes,
        }
    }

    /// The guest's side of one call: head, body in frames of `chunk`, end.
    async fn call(agent: &mut FakeAgent, id: u32, head: &ApiRequest, body: &[u8], chunk: usize) {
        agent
            .send(Frame::json(id, FrameKind::ApiRequest, head))
            .await;
        for part in body.chunks(chunk.max(1)) {
            agent
                .send(Frame::new(id, FrameKind::Data, part.to_vec()))
                .await;
        }
        agent.send(Frame::new(id, FrameKind::End, Vec::new())).await;
    }

    /// The worker's whole answer on `id`: its head and body.
    async fn answer(agent: &mut FakeAgent, id: u32) -> (ApiResponse, Vec<u8>) {
        let mut head = None;
        let mut body = Vec::new();
        loop {
            let f = tokio::time::timeout(Duration::from_secs(10), agent.recv())
                .await
                .expect("an answer in time");
            assert_eq!(f.stream_id, id, "only the call's stream answers");
            match f.kind {
                FrameKind::ApiResponse => {
                    head = Some(f.decode_json::<ApiResponse>().expect("head"))
                }
                FrameKind::Data => body.extend_from_slice(&f.payload),
                FrameKind::End => return (head.expect("a head before the end"), body),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_guest_call_is_assembled_handed_over_and_answered() {
        let (client, mut agent, _h) = connected().await;
        let mut calls = client.take_api_calls().expect("first taker");
        assert!(client.take_api_calls().is_none(), "only one taker");
        let id = GUEST_STREAM_BIT | 1;
        let body = vec![7u8; MAX_FRAME_PAYLOAD * 2 + 5];
        call(
            &mut agent,
            id,
            &head("/v1/self/events", body.len() as u64),
            &body,
            MAX_FRAME_PAYLOAD,
        )
        .await;
        let got = calls.recv().await.expect("a call");
        assert_eq!(got.request.path, "/v1/self/events");
        assert_eq!(got.body.as_ref(), body.as_slice());
        let reply = vec![b'x'; MAX_FRAME_PAYLOAD + 10];
        got.responder
            .respond(
                201,
                vec![("content-type".into(), "text/plain".into())],
                &reply,
            )
            .await;
        let (h, b) = answer(&mut agent, id).await;
        assert_eq!(h.status, 201);
        assert_eq!(h.body_bytes, reply.len() as u64);
        assert_eq!(b, reply);
    }

    #[tokio::test]
    async fn calls_past_the_in_flight_cap_are_refused_at_once() {
        let (client, mut agent, _h) = connected().await;
        let mut calls = client.take_api_calls().expect("taker");
        let mut held = Vec::new();
        for n in 1..=MAX_API_IN_FLIGHT as u32 {
            call(
                &mut agent,
                GUEST_STREAM_BIT | n,
                &head("/v1/self", 0),
                b"",
                1,
            )
            .await;
            held.push(calls.recv().await.expect("a call"));
        }
        let extra = GUEST_STREAM_BIT | 99;
        call(&mut agent, extra, &head("/v1/self", 0), b"", 1).await;
        let (h, _) = answer(&mut agent, extra).await;
        assert_eq!(h.status, 429);
        assert!(
            h.headers
                .iter()
                .any(|(n, v)| n == "retry-after" && v == "1")
        );
        // Answering one frees its slot.
        held.pop()
            .expect("one")
            .responder
            .respond(200, vec![], b"")
            .await;
        let (h, _) = answer(&mut agent, GUEST_STREAM_BIT | MAX_API_IN_FLIGHT as u32).await;
        assert_eq!(h.status, 200);
        let again = GUEST_STREAM_BIT | 100;
        call(&mut agent, again, &head("/v1/self", 0), b"", 1).await;
        assert!(calls.recv().await.is_some(), "a slot came back");
    }

    #[tokio::test]
    async fn bodies_past_their_bounds_and_garbage_heads_are_refused() {
        let (client, mut agent, _h) = connected().await;
        let _calls = client.take_api_calls().expect("taker");
        // More body than declared.
        let id = GUEST_STREAM_BIT | 1;
        call(&mut agent, id, &head("/v1/self", 2), b"abc", 3).await;
        assert_eq!(answer(&mut agent, id).await.0.status, 400);
        // Less body than declared.
        let id = GUEST_STREAM_BIT | 2;
        call(&mut agent, id, &head("/v1/self", 5), b"ab", 3).await;
        assert_eq!(answer(&mut agent, id).await.0.status, 400);
        // A declared body over the limit.
        let id = GUEST_STREAM_BIT | 3;
        agent
            .send(Frame::json(
                id,
                FrameKind::ApiRequest,
                &head("/v1/self", MAX_API_BODY_BYTES + 1),
            ))
            .await;
        assert_eq!(answer(&mut agent, id).await.0.status, 413);
        // A head that is not one.
        let id = GUEST_STREAM_BIT | 4;
        agent
            .send(Frame::new(
                id,
                FrameKind::ApiRequest,
                b"{\"nope\":1}".to_vec(),
            ))
            .await;
        assert_eq!(answer(&mut agent, id).await.0.status, 400);
        // The channel still works for the worker's own streams.
        let exec = tokio::spawn({
            let client = client.clone();
            async move { client.exec(exec_spec("true", None, 10)).await }
        });
        let req = agent.recv().await;
        assert_eq!(req.kind, FrameKind::Request);
        agent
            .reply(
                req.stream_id,
                &Reply::Exited {
                    exit_code: Some(0),
                    signal: None,
                    timed_out: false,
                    duration_ms: 1,
                },
            )
            .await;
        assert_eq!(exec.await.expect("joins").expect("exec").exit_code, Some(0));
    }

    #[tokio::test]
    async fn the_id_spaces_stay_apart() {
        let (client, mut agent, _h) = connected().await;
        let mut calls = client.take_api_calls().expect("taker");
        // An API_REQUEST in the worker's space is not a call: nothing is handed over.
        call(&mut agent, 5, &head("/v1/self", 0), b"", 1).await;
        // The worker's own streams never take an id with the guest's bit, even past 2^31.
        client
            .shared
            .next_id
            .store(GUEST_STREAM_BIT - 1, Ordering::Relaxed);
        for _ in 0..3 {
            let c = client.clone();
            let task = tokio::spawn(async move { c.grow_root_fs(1).await });
            let req = agent.recv().await;
            assert_eq!(req.kind, FrameKind::Request);
            assert!(
                !scaibunker_proto::agent::is_guest_stream(req.stream_id),
                "{:#x}",
                req.stream_id
            );
            agent.reply(req.stream_id, &Reply::Done).await;
            task.await.expect("joins").expect("done");
        }
        // A real call after all that still goes through alone.
        call(
            &mut agent,
            GUEST_STREAM_BIT | 5,
            &head("/v1/self", 0),
            b"",
            1,
        )
        .await;
        let got = calls.recv().await.expect("the guest's call");
        assert_eq!(got.request.path, "/v1/self");
        assert!(
            calls.try_recv().is_err(),
            "the worker-space one was never a call"
        );
    }

    #[tokio::test]
    async fn a_call_nobody_serves_is_unavailable() {
        let (client, mut agent, _h) = connected().await;
        drop(client.take_api_calls());
        let id = GUEST_STREAM_BIT | 1;
        call(&mut agent, id, &head("/v1/self", 0), b"", 1).await;
        assert_eq!(answer(&mut agent, id).await.0.status, 503);
    }
}
