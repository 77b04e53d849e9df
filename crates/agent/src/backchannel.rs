//! The backchannel's guest end: HTTP/1.1 on the unix socket [`API_SOCKET`], each request
//! carried to the worker as an `api` stream (protocol rule 10) and its answer written back.
//!
//! 1. [`serve_socket`] binds the socket (mode 0666: any guest user may call the platform
//!    as this bunker; the bunker is the identity, not the guest user) and serves each
//!    connection on a thread, at most [`MAX_CONNECTIONS`] at once.
//! 2. A connection carries one request (`Connection: close`): a head of at most
//!    [`MAX_HEAD_BYTES`] with at most `MAX_API_HEADERS` headers, a `Content-Length` body of
//!    at most `MAX_API_BODY_BYTES` (no chunked bodies), read within [`READ_TIMEOUT`].
//!    Anything else is answered here (`400`, `411`, `413`, `431`) and never reaches the
//!    channel.
//! 3. [`Backchannel::call`] takes one of `MAX_API_IN_FLIGHT` slots (`429` past them),
//!    opens a stream with an id in the guest's space, sends `API_REQUEST`, the body as
//!    `DATA` frames and `END`, then waits (up to [`CALL_TIMEOUT`]) for `API_RESPONSE`,
//!    `DATA` and `END`, which the session's reader delivers through [`Backchannel::deliver`].
//! 4. A session reset ([`Backchannel::detach`]) fails every call in flight with `502`; with
//!    no session (the worker is away) a call is `503` at once.
//!
//! The guest trusts nothing here for identity: the worker attaches the bunker's own, and
//! whatever headers the caller sends are only ever advisory.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use scaibunker_proto::agent::{
    ApiRequest, ApiResponse, Frame, FrameKind, GUEST_STREAM_BIT, MAX_API_BODY_BYTES,
    MAX_API_HEADERS, MAX_API_IN_FLIGHT, MAX_FRAME_PAYLOAD,
};

use crate::channel::{Conn, lock};
use crate::log;

/// Where guest programs reach the platform.
pub const API_SOCKET: &str = "/run/scaibunker/api.sock";
/// Most connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 16;
/// Largest request head (request line and headers).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// How long a client may take to send its whole request.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a call waits for the platform's answer.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// What the session's reader hands a waiting call.
#[derive(Debug)]
pub enum ApiInput {
    Head(ApiResponse),
    Data(Vec<u8>),
    End,
}

/// The guest end of the backchannel, shared by the socket's threads and every session.
#[derive(Debug, Default)]
pub struct Backchannel {
    conn: Mutex<Option<Arc<Conn>>>,
    pending: Mutex<HashMap<u32, Sender<ApiInput>>>,
    next_id: AtomicU32,
    in_flight: AtomicUsize,
}

/// A finished call, as written back to the HTTP client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpAnswer {
    /// An answer made here, in the platform's error envelope.
    pub fn error(status: u16, code: &str, message: &str) -> Self {
        let body = serde_json::json!({
            "status": "error",
            "error": {"code": code, "message": message, "details": []},
        });
        Self {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: serde_json::to_vec(&body).expect("json values serialise"),
        }
    }
}

impl Backchannel {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A session started: calls go over `conn` from now on.
    pub fn attach(&self, conn: Arc<Conn>) {
        *lock(&self.conn) = Some(conn);
    }

    /// The session ended: calls in flight fail (their senders are dropped), new ones wait
    /// for the next session.
    pub fn detach(&self) {
        lock(&self.conn).take();
        lock(&self.pending).clear();
    }

    /// A frame of a guest stream from the worker; frames of streams no call waits for are
    /// late arrivals and dropped.
    pub fn deliver(&self, frame: Frame) {
        let input = match frame.kind {
            FrameKind::ApiResponse => match frame.decode_json::<ApiResponse>() {
                Ok(head) => ApiInput::Head(head),
                Err(e) => {
                    log!(
                        "malformed API_RESPONSE on stream {:#x}: {e}",
                        frame.stream_id
                    );
                    lock(&self.pending).remove(&frame.stream_id);
                    return;
                }
            },
            FrameKind::Data => ApiInput::Data(frame.payload),
            FrameKind::End => ApiInput::End,
            other => {
                log!(
                    "ignoring a {other:?} frame on guest stream {:#x}",
                    frame.stream_id
                );
                return;
            }
        };
        let end = matches!(input, ApiInput::End);
        let mut pending = lock(&self.pending);
        if let Some(tx) = pending.get(&frame.stream_id) {
            // The call may have just given up; then nobody needs the frame.
            let _ = tx.send(input);
        }
        if end {
            pending.remove(&frame.stream_id);
        }
    }

    /// Carries one request to the platform and returns its answer (step 3).
    pub fn call(&self, request: &ApiRequest, body: &[u8]) -> HttpAnswer {
        let Some(_slot) = Slot::take(&self.in_flight) else {
            let mut answer = HttpAnswer::error(
                429,
                "RATE_LIMITED",
                "too many backchannel calls in flight from this bunker",
            );
            answer.headers.push(("retry-after".into(), "1".into()));
            return answer;
        };
        let Some(conn) = lock(&self.conn).clone() else {
            return HttpAnswer::error(
                503,
                "BACKCHANNEL_UNAVAILABLE",
                "the agent channel to the worker is not connected; retry shortly",
            );
        };
        let (tx, rx) = mpsc::channel();
        let id = {
            let mut pending = lock(&self.pending);
            let id = loop {
                let n = self.next_id.fetch_add(1, Ordering::Relaxed) & !GUEST_STREAM_BIT;
                let id = GUEST_STREAM_BIT | n;
                if n != 0 && !pending.contains_key(&id) {
                    break id;
                }
            };
            pending.insert(id, tx);
            id
        };
        let _unregister = Unregister { bc: self, id };
        if let Err(e) = send_request(&conn, id, request, body) {
            log!("send a backchannel request: {e}");
            return HttpAnswer::error(
                502,
                "BACKCHANNEL_FAILED",
                "the request could not be sent to the worker",
            );
        }
        collect(&rx)
    }
}

/// One of the in-flight slots, given back when dropped.
struct Slot<'a>(&'a AtomicUsize);

impl<'a> Slot<'a> {
    fn take(count: &'a AtomicUsize) -> Option<Self> {
        count
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < MAX_API_IN_FLIGHT).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(count))
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

struct Unregister<'a> {
    bc: &'a Backchannel,
    id: u32,
}

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        lock(&self.bc.pending).remove(&self.id);
    }
}

fn send_request(conn: &Conn, id: u32, request: &ApiRequest, body: &[u8]) -> io::Result<()> {
    let head = Frame::try_json(id, FrameKind::ApiRequest, request)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    conn.write_frame(&head)?;
    for chunk in body.chunks(MAX_FRAME_PAYLOAD) {
        // Between two frames of a body, other streams' writers get the lock first.
        thread::yield_now();
        conn.write_frame(&Frame::new(id, FrameKind::Data, chunk.to_vec()))?;
    }
    conn.write_frame(&Frame::new(id, FrameKind::End, Vec::new()))
}

/// Reads the answer of one stream: a head, at most its declared body, the end.
fn collect(rx: &Receiver<ApiInput>) -> HttpAnswer {
    let deadline = Instant::now() + CALL_TIMEOUT;
    let mut head: Option<ApiResponse> = None;
    let mut body = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(ApiInput::Head(h)) if head.is_none() && h.body_bytes <= MAX_API_BODY_BYTES => {
                head = Some(h);
            }
            Ok(ApiInput::Data(chunk))
                if head
                    .as_ref()
                    .is_some_and(|h| (body.len() + chunk.len()) as u64 <= h.body_bytes) =>
            {
                body.extend_from_slice(&chunk);
            }
            Ok(ApiInput::End) => match head {
                Some(h) if body.len() as u64 == h.body_bytes => {
                    return HttpAnswer {
                        status: h.status,
                        headers: h.headers,
                        body,
                    };
                }
                _ => break,
            },
            Ok(_) => break,
            Err(RecvTimeoutError::Timeout) => {
                return HttpAnswer::error(
                    504,
                    "BACKCHANNEL_TIMEOUT",
                    "no answer from the platform in time",
                );
            }
            Err(RecvTimeoutError::Disconnected) => {
                return HttpAnswer::error(
                    502,
                    "BACKCHANNEL_FAILED",
                    "the agent channel reset before the platform answered",
                );
            }
        }
    }
    HttpAnswer::error(
        502,
        "BACKCHANNEL_FAILED",
        "the worker's answer broke the backchannel protocol",
    )
}

/// Binds `path` (replacing a stale socket) and serves it for ever on its own threads.
pub fn serve_socket(path: &Path, bc: Arc<Backchannel>) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o666))?;
    let path: PathBuf = path.to_owned();
    thread::Builder::new()
        .name("api-socket".into())
        .spawn(move || accept_loop(&listener, &path, &bc))?;
    Ok(())
}

fn accept_loop(listener: &UnixListener, path: &Path, bc: &Arc<Backchannel>) {
    let open = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let mut stream = match conn {
            Ok(s) => s,
            Err(e) => {
                log!("accept on {}: {e}", path.display());
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let Some(slot) = OwnedSlot::take(&open, MAX_CONNECTIONS) else {
            let _ = write_answer(
                &mut stream,
                &HttpAnswer::error(503, "BACKCHANNEL_BUSY", "too many connections"),
            );
            continue;
        };
        let bc = Arc::clone(bc);
        let spawned = thread::Builder::new()
            .name("api-conn".into())
            .spawn(move || {
                let _slot = slot;
                serve_connection(stream, &bc);
            });
        if let Err(e) = spawned {
            log!("start an api connection thread: {e}");
        }
    }
}

/// A connection slot that can move to the connection's thread.
struct OwnedSlot(Arc<AtomicUsize>);

impl OwnedSlot {
    fn take(count: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        count
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(Arc::clone(count)))
    }
}

impl Drop for OwnedSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn serve_connection(mut stream: UnixStream, bc: &Backchannel) {
    let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
    let _ = stream.set_write_timeout(Some(READ_TIMEOUT));
    let answer = match read_request(&mut stream) {
        Ok((request, body)) => bc.call(&request, &body),
        Err(refused) => refused,
    };
    let _ = write_answer(&mut stream, &answer);
}

/// Reads one request within the bounds of step 2; `Err` is the answer that refuses it.
pub fn read_request<R: Read>(r: &mut R) -> Result<(ApiRequest, Vec<u8>), HttpAnswer> {
    let bad = |m: &str| HttpAnswer::error(400, "VALIDATION_ERROR", m);
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = find(&buf, b"\r\n\r\n") {
            break at;
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Err(HttpAnswer::error(
                431,
                "VALIDATION_ERROR",
                "request head too large",
            ));
        }
        match r.read(&mut chunk) {
            Ok(0) => return Err(bad("the request ended before its head")),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err(bad("the request was not sent in time")),
        }
    };
    if head_end > MAX_HEAD_BYTES {
        return Err(HttpAnswer::error(
            431,
            "VALIDATION_ERROR",
            "request head too large",
        ));
    }
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| bad("the head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(path), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("malformed request line"));
    };
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(bad("only HTTP/1.x"));
    }
    let mut headers = Vec::new();
    let mut content_length: Option<u64> = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(bad("malformed header line"));
        };
        let name = name.to_ascii_lowercase();
        let value = value.trim().to_owned();
        match name.as_str() {
            "content-length" => {
                let n = value
                    .parse::<u64>()
                    .map_err(|_| bad("malformed content-length"))?;
                if content_length.is_some_and(|c| c != n) {
                    return Err(bad("conflicting content-length headers"));
                }
                content_length = Some(n);
            }
            "transfer-encoding" => {
                return Err(HttpAnswer::error(
                    411,
                    "VALIDATION_ERROR",
                    "send the body with a content-length, not chunked",
                ));
            }
            // Hop-by-hop: they describe this connection, not the call.
            "host" | "connection" | "keep-alive" | "expect" | "user-agent" | "accept" => {}
            _ => headers.push((name, value)),
        }
    }
    if headers.len() > MAX_API_HEADERS {
        return Err(HttpAnswer::error(
            431,
            "VALIDATION_ERROR",
            "too many headers",
        ));
    }
    let body_len = content_length.unwrap_or(0);
    if body_len > MAX_API_BODY_BYTES {
        return Err(HttpAnswer::error(
            413,
            "VALIDATION_ERROR",
            "the body is over 1 MiB",
        ));
    }
    let request = ApiRequest {
        method: method.to_owned(),
        path: path.to_owned(),
        headers,
        body_bytes: body_len,
    };
    request.check().map_err(|e| bad(&e.to_string()))?;
    let mut body = buf[head_end + 4..].to_vec();
    if body.len() as u64 > body_len {
        return Err(bad("more body than its content-length"));
    }
    let mut rest = vec![0u8; (body_len as usize) - body.len()];
    r.read_exact(&mut rest)
        .map_err(|_| bad("the body ended before its content-length"))?;
    body.extend_from_slice(&rest);
    Ok((request, body))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

/// Writes `answer` as an HTTP/1.1 response that closes the connection.
pub fn write_answer<W: Write>(w: &mut W, answer: &HttpAnswer) -> io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-length: {}\r\nconnection: close\r\n",
        answer.status,
        reason(answer.status),
        answer.body.len()
    );
    for (name, value) in &answer.headers {
        // The worker's headers are few and plain; anything that could split a line is dropped.
        let plain = |s: &str| !s.contains(['\r', '\n']);
        if plain(name) && plain(value) && name != "content-length" && name != "connection" {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(&answer.body);
    w.write_all(&bytes)?;
    w.flush()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<(ApiRequest, Vec<u8>), HttpAnswer> {
        read_request(&mut &raw[..])
    }

    #[test]
    fn reads_a_request_with_a_body_and_drops_hop_by_hop_headers() {
        let (req, body) = parse(
            b"PUT /v1/self/metadata/k HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello",
        )
        .unwrap();
        assert_eq!(req.method, "PUT");
        assert_eq!(req.path, "/v1/self/metadata/k");
        assert_eq!(
            req.headers,
            vec![("content-type".into(), "text/plain".into())]
        );
        assert_eq!(req.body_bytes, 5);
        assert_eq!(body, b"hello");
    }

    #[test]
    fn refuses_requests_past_the_bounds() {
        let status = |raw: &[u8]| parse(raw).unwrap_err().status;
        assert_eq!(status(b"GET /v1/self HTTP/1.1\r\n"), 400, "torn head");
        assert_eq!(status(b"GET  /v1/self HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"GET /v1/self HTTP/2\r\n\r\n"), 400);
        assert_eq!(status(b"get /v1/self HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"GET http://x/v1/self HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(
            status(b"POST /v1/self/events HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            411
        );
        assert_eq!(
            status(b"POST /v1/self/events HTTP/1.1\r\nContent-Length: 1048577\r\n\r\n"),
            413
        );
        assert_eq!(
            status(b"POST /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"),
            400
        );
        assert_eq!(
            status(b"POST /x HTTP/1.1\r\nContent-Length: 4\r\n\r\nab"),
            400
        );
        assert_eq!(
            status(b"POST /x HTTP/1.1\r\nContent-Length: 1\r\n\r\nab"),
            400
        );
        let mut many = b"GET /x HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_API_HEADERS {
            many.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(status(&many), 431);
        let mut huge = b"GET /x HTTP/1.1\r\nx-a: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES + 10));
        assert_eq!(status(&huge), 431, "a head with no end is cut off");
    }

    #[test]
    fn a_call_without_a_session_is_unavailable_and_slots_are_bounded() {
        let bc = Backchannel::new();
        let req = ApiRequest {
            method: "GET".into(),
            path: "/v1/self".into(),
            headers: vec![],
            body_bytes: 0,
        };
        assert_eq!(bc.call(&req, b"").status, 503);
        let held: Vec<_> = (0..MAX_API_IN_FLIGHT)
            .map(|_| Slot::take(&bc.in_flight).unwrap())
            .collect();
        let refused = bc.call(&req, b"");
        assert_eq!(refused.status, 429);
        assert!(refused.headers.iter().any(|(n, _)| n == "retry-after"));
        drop(held);
        assert_eq!(bc.call(&req, b"").status, 503, "slots come back");
    }

    #[test]
    fn collects_an_answer_and_refuses_one_past_its_declared_body() {
        let (tx, rx) = mpsc::channel();
        tx.send(ApiInput::Head(ApiResponse {
            status: 200,
            headers: vec![],
            body_bytes: 3,
        }))
        .unwrap();
        tx.send(ApiInput::Data(b"abc".to_vec())).unwrap();
        tx.send(ApiInput::End).unwrap();
        assert_eq!(collect(&rx).body, b"abc");
        let (tx, rx) = mpsc::channel();
        tx.send(ApiInput::Head(ApiResponse {
            status: 200,
            headers: vec![],
            body_bytes: 1,
        }))
        .unwrap();
        tx.send(ApiInput::Data(b"abc".to_vec())).unwrap();
        assert_eq!(collect(&rx).status, 502);
        let (tx, rx) = mpsc::channel();
        tx.send(ApiInput::Data(b"x".to_vec())).unwrap();
        assert_eq!(collect(&rx).status, 502, "data before a head");
        drop(tx);
    }

    #[test]
    fn answers_never_split_header_lines() {
        let mut out = Vec::new();
        let answer = HttpAnswer {
            status: 200,
            headers: vec![
                ("x-ok".into(), "1".into()),
                ("x-bad".into(), "1\r\nset-cookie: a".into()),
            ],
            body: b"{}".to_vec(),
        };
        write_answer(&mut out, &answer).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n"));
        assert!(text.contains("x-ok: 1\r\n"));
        assert!(!text.contains("set-cookie"));
        assert!(text.ends_with("\r\n\r\n{}"));
    }
}
