//! The worker ↔ guest agent protocol: frames multiplexed over one byte stream
//! (virtio-serial on QEMU).
//!
//! Wire format of one frame, all integers big-endian:
//!
//! ```text
//! stream_id: u32 | kind: u8 | len: u32 | payload: len bytes (len <= MAX_FRAME_PAYLOAD)
//! ```
//!
//! Protocol:
//! 1. The agent opens its port and sends `HELLO` on stream 0 with a JSON [`Hello`].
//!    The worker checks `protocol_version` and sends nothing before it has seen `HELLO`.
//!    A second `HELLO` (the agent reopened its port, e.g. after a restore) resets every stream.
//! 2. The worker opens a stream by sending `REQUEST` with a fresh non-zero `stream_id`
//!    and a JSON [`Request`]. Only the worker opens streams.
//! 3. Request bodies (exec stdin, file upload) follow as `DATA` frames and end with one `END`.
//! 4. The agent answers with `STDOUT` / `STDERR` (exec output, as it is produced) or `DATA`
//!    (file download) frames, then exactly one terminal `REPLY` with a JSON [`Reply`].
//!    `REPLY` always ends the stream; an error before any data is a `REPLY` with [`Reply::Error`].
//! 5. The worker may send `CANCEL` on an open stream: the agent kills what the stream runs
//!    and still answers with its `REPLY`.
//! 6. Flow control, per stream: the agent sends at most [`STREAM_WINDOW_FRAMES`] `STDOUT`,
//!    `STDERR` and `DATA` frames on a stream beyond what the worker has granted back with
//!    `CREDIT` frames (payload: a big-endian `u32` count of frames). A stream starts with a
//!    full window; the worker grants frames back as its consumer takes them. A slow
//!    consumer therefore holds back only its own stream, never the channel. `REPLY` needs no
//!    credit.
//! 7. An exec with a terminal ([`Request::Exec`] `pty`) reads its input from `DATA` frames,
//!    sends the terminal's output as `STDOUT` frames, and takes `RESIZE` frames (a JSON
//!    [`WindowSize`]) from the worker at any time before its `REPLY`.
//! 8. No frame is ever bigger than [`MAX_FRAME_PAYLOAD`], in either direction: bodies of any
//!    size travel as several `DATA` frames (a directory listing as JSON lines), and a
//!    request that does not fit one frame is refused before it is sent ([`Frame::try_json`]).
//! 9. Resynchronisation: a reader that meets a header it cannot parse has lost its place
//!    in the byte stream. The agent then resets its session and says `HELLO` again; the
//!    worker sends `RESET` on stream 0, which makes the agent do the same, fails its open
//!    streams, and skips bytes until a valid `HELLO`. Either way the channel comes back
//!    while the VM runs; only the streams open at that moment are lost.
//! 10. The backchannel: the guest opens `api` streams of its own (a program in the guest
//!     calling the platform as its bunker). Their ids have [`GUEST_STREAM_BIT`] set, and
//!     the worker's never do, so the two id spaces cannot collide; each side ignores an
//!     opening frame in the other's space. The agent sends `API_REQUEST` (a JSON
//!     [`ApiRequest`], one frame), then exactly `body_bytes` of body as `DATA` frames, then
//!     `END`. The worker answers with one `API_RESPONSE` (a JSON [`ApiResponse`]), its
//!     `body_bytes` as `DATA` frames, then `END`, which closes the stream on both sides.
//!     Bounds: a body of at most [`MAX_API_BODY_BYTES`] each way, at most
//!     [`MAX_API_IN_FLIGHT`] api streams open per channel (the worker answers `429` past
//!     that without reading on), a head that passes [`ApiRequest::check`]; a request that
//!     breaks them is answered `400`/`413` and its later frames ignored. Neither
//!     direction takes `CREDIT`: a body is at most 16 frames, which each side buffers
//!     whole (the worker at most `MAX_API_IN_FLIGHT` of them).
//!     Fairness: api frames are ordinary frames of at most [`MAX_FRAME_PAYLOAD`] written
//!     one at a time, so an exec or terminal frame waits behind at most one of them, and
//!     the in-flight and size caps bound their share of the channel.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// Bumped on any incompatible change to frames or messages.
pub const PROTOCOL_VERSION: u32 = 7;

/// Largest payload of one frame; bigger bodies are split into several `DATA` frames.
pub const MAX_FRAME_PAYLOAD: usize = 64 * 1024;

/// Output frames the agent may send on one stream before the worker grants more (rule 6).
pub const STREAM_WINDOW_FRAMES: u32 = 32;

/// Most bytes the JSON of an exec's program, environment and working directory may take
/// together, so that its `REQUEST` always fits one frame with room for its other fields.
pub const MAX_EXEC_FIELDS_BYTES: usize = MAX_FRAME_PAYLOAD - 2048;

/// What an exec's program, environment and working directory take in its `REQUEST`, as
/// counted against [`MAX_EXEC_FIELDS_BYTES`]: `(program, env + cwd)` bytes of JSON.
pub fn exec_fields_len(
    program: &Program,
    env: &BTreeMap<String, String>,
    cwd: Option<&str>,
) -> (usize, usize) {
    (json_len(program), json_len(env) + cwd.map_or(0, json_len))
}

fn json_len<T: Serialize + ?Sized>(v: &T) -> usize {
    // Serialising these types cannot fail; an impossible failure counts as too large.
    serde_json::to_vec(v).map_or(usize::MAX / 4, |v| v.len())
}

/// Most entries one [`Request::ListDir`] page may ask for.
pub const MAX_LIST_LIMIT: u32 = 1000;

/// Set in the id of every stream the guest opens (rule 10); never in the worker's.
pub const GUEST_STREAM_BIT: u32 = 1 << 31;

/// Whether `stream_id` is in the guest's id space (rule 10).
pub fn is_guest_stream(stream_id: u32) -> bool {
    stream_id & GUEST_STREAM_BIT != 0
}

/// Most body bytes of one backchannel request or response (rule 10).
pub const MAX_API_BODY_BYTES: u64 = 1024 * 1024;

/// Most backchannel streams open at once on one channel (rule 10).
pub const MAX_API_IN_FLIGHT: usize = 4;

/// Most headers one backchannel request or response carries.
pub const MAX_API_HEADERS: usize = 16;

/// Longest backchannel request path, query included.
pub const MAX_API_PATH_BYTES: usize = 2048;

/// Longest header name or value of a backchannel request.
pub const MAX_API_HEADER_BYTES: usize = 1024;

/// Length of the fixed frame header.
pub const HEADER_LEN: usize = 9;

/// Name of the virtio-serial port the agent listens on (QEMU `virtserialport,name=`).
pub const PORT_NAME: &str = "scaibunker.agent";

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    Hello = 1,
    Request = 2,
    Data = 3,
    End = 4,
    Stdout = 5,
    Stderr = 6,
    Reply = 7,
    Cancel = 8,
    Resize = 9,
    Credit = 10,
    /// Worker → agent on stream 0: the worker lost its place in the byte stream; reset the
    /// session and say `HELLO` again (rule 9).
    Reset = 11,
    /// Agent → worker on a guest stream: a backchannel request head (rule 10).
    ApiRequest = 12,
    /// Worker → agent on a guest stream: the response head (rule 10).
    ApiResponse = 13,
}

impl FrameKind {
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Hello,
            2 => Self::Request,
            3 => Self::Data,
            4 => Self::End,
            5 => Self::Stdout,
            6 => Self::Stderr,
            7 => Self::Reply,
            8 => Self::Cancel,
            9 => Self::Resize,
            10 => Self::Credit,
            11 => Self::Reset,
            12 => Self::ApiRequest,
            13 => Self::ApiResponse,
            _ => return None,
        })
    }
}

/// One frame, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub stream_id: u32,
    pub kind: FrameKind,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn new(stream_id: u32, kind: FrameKind, payload: Vec<u8>) -> Self {
        Self {
            stream_id,
            kind,
            payload,
        }
    }

    /// A frame whose payload is `msg` as JSON.
    pub fn json<T: Serialize>(stream_id: u32, kind: FrameKind, msg: &T) -> Self {
        let payload = serde_json::to_vec(msg).expect("protocol messages always serialise");
        Self::new(stream_id, kind, payload)
    }

    /// A frame whose payload is `msg` as JSON, or [`FrameError::TooLarge`] when that does
    /// not fit one frame (rule 8).
    pub fn try_json<T: Serialize>(
        stream_id: u32,
        kind: FrameKind,
        msg: &T,
    ) -> Result<Self, FrameError> {
        let frame = Self::json(stream_id, kind, msg);
        if frame.payload.len() > MAX_FRAME_PAYLOAD {
            return Err(FrameError::TooLarge(frame.payload.len()));
        }
        Ok(frame)
    }

    /// The header for a payload of `len` bytes.
    pub fn header(stream_id: u32, kind: FrameKind, len: usize) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&stream_id.to_be_bytes());
        h[4] = kind as u8;
        h[5..9].copy_from_slice(&(len as u32).to_be_bytes());
        h
    }

    /// Header and payload as one buffer, ready for a single write.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.payload.len());
        out.extend_from_slice(&Self::header(self.stream_id, self.kind, self.payload.len()));
        out.extend_from_slice(&self.payload);
        out
    }

    /// Parses a header into `(stream_id, kind, len)`.
    pub fn parse_header(h: &[u8; HEADER_LEN]) -> Result<(u32, FrameKind, usize), FrameError> {
        let stream_id = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        let kind = FrameKind::from_u8(h[4]).ok_or(FrameError::UnknownKind(h[4]))?;
        let len = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) as usize;
        if len > MAX_FRAME_PAYLOAD {
            return Err(FrameError::TooLarge(len));
        }
        Ok((stream_id, kind, len))
    }

    /// Reads one frame from a blocking reader. `Ok(None)` on a clean end of stream.
    pub fn read_from<R: Read>(r: &mut R) -> Result<Option<Frame>, FrameError> {
        let mut h = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            match r.read(&mut h[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err(FrameError::Io(io::ErrorKind::UnexpectedEof.into())),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(FrameError::Io(e)),
            }
        }
        let (stream_id, kind, len) = Self::parse_header(&h)?;
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload).map_err(FrameError::Io)?;
        Ok(Some(Frame {
            stream_id,
            kind,
            payload,
        }))
    }

    /// Writes the frame with one `write_all` so concurrent writers behind a lock never interleave.
    pub fn write_to<W: Write>(&self, w: &mut W) -> io::Result<()> {
        w.write_all(&self.encode())
    }

    /// A `CREDIT` frame granting `frames` more output frames on `stream_id`.
    pub fn credit(stream_id: u32, frames: u32) -> Self {
        Self::new(stream_id, FrameKind::Credit, frames.to_be_bytes().to_vec())
    }

    /// The count a `CREDIT` frame grants; `None` for a malformed payload.
    pub fn credit_frames(&self) -> Option<u32> {
        let bytes: [u8; 4] = self.payload.as_slice().try_into().ok()?;
        Some(u32::from_be_bytes(bytes))
    }

    /// Decodes the payload as JSON.
    pub fn decode_json<'a, T: Deserialize<'a>>(&'a self) -> Result<T, FrameError> {
        serde_json::from_slice(&self.payload).map_err(FrameError::Json)
    }
}

/// Why a frame could not be read. `Display` and `Error` are written by hand so that this
/// contract crate depends on serde alone.
#[derive(Debug)]
pub enum FrameError {
    Io(io::Error),
    UnknownKind(u8),
    TooLarge(usize),
    Json(serde_json::Error),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(_) => write!(f, "i/o error on the agent channel"),
            Self::UnknownKind(k) => write!(f, "unknown frame kind {k}"),
            Self::TooLarge(n) => {
                write!(f, "frame payload of {n} bytes exceeds {MAX_FRAME_PAYLOAD}")
            }
            Self::Json(_) => write!(f, "malformed json payload"),
        }
    }
}

impl std::error::Error for FrameError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io(e) => Some(e),
            Self::Json(e) => Some(e),
            _ => None,
        }
    }
}

/// First message of the agent, on stream 0.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    pub protocol_version: u32,
    pub agent_version: String,
    /// Guest kernel release (`uname -r`), for diagnostics.
    pub kernel: String,
}

/// A backchannel request as the guest's program sent it (rule 10). The worker trusts none
/// of it: it checks the path and drops identity headers before forwarding.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ApiRequest {
    /// Upper-case HTTP method.
    pub method: String,
    /// Origin-form path with an optional query, e.g. `/v1/self`.
    pub path: String,
    /// `(name, value)`, names lower-case, in the order received.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    pub body_bytes: u64,
}

/// Why an [`ApiRequest`] head breaks the bounds of rule 10.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiHeadError {
    Method,
    Path,
    Headers,
    BodyTooLarge(u64),
}

impl std::fmt::Display for ApiHeadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Method => write!(f, "the method is not a plain upper-case token"),
            Self::Path => write!(
                f,
                "the path is not an origin-form path of at most {MAX_API_PATH_BYTES} bytes"
            ),
            Self::Headers => write!(
                f,
                "more than {MAX_API_HEADERS} headers, or one over {MAX_API_HEADER_BYTES} bytes"
            ),
            Self::BodyTooLarge(n) => {
                write!(f, "a body of {n} bytes is over {MAX_API_BODY_BYTES}")
            }
        }
    }
}

impl std::error::Error for ApiHeadError {}

impl ApiRequest {
    /// Checks the bounds of rule 10: a short upper-case method, a printable origin-form
    /// path, few short header lines of visible ASCII, a body within the limit.
    pub fn check(&self) -> Result<(), ApiHeadError> {
        if self.method.is_empty()
            || self.method.len() > 16
            || !self.method.bytes().all(|b| b.is_ascii_uppercase())
        {
            return Err(ApiHeadError::Method);
        }
        if !self.path.starts_with('/')
            || self.path.len() > MAX_API_PATH_BYTES
            || !self.path.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(ApiHeadError::Path);
        }
        let header_ok = |(name, value): &(String, String)| {
            !name.is_empty()
                && name.len() <= MAX_API_HEADER_BYTES
                && value.len() <= MAX_API_HEADER_BYTES
                && name
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && b != b':' && !b.is_ascii_uppercase())
                && value
                    .bytes()
                    .all(|b| b == b' ' || b == b'\t' || b.is_ascii_graphic())
        };
        if self.headers.len() > MAX_API_HEADERS || !self.headers.iter().all(header_ok) {
            return Err(ApiHeadError::Headers);
        }
        if self.body_bytes > MAX_API_BODY_BYTES {
            return Err(ApiHeadError::BodyTooLarge(self.body_bytes));
        }
        Ok(())
    }
}

/// The platform's answer to a backchannel request (rule 10).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ApiResponse {
    pub status: u16,
    /// `(name, value)`: only what the guest's client needs (`content-type`, `retry-after`).
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    pub body_bytes: u64,
}

/// What to run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Program {
    /// A string run by `/bin/sh -c`.
    Shell(String),
    /// An argv run without a shell; `argv[0]` is looked up in `PATH`.
    Argv(Vec<String>),
}

/// Who runs it inside the guest.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum GuestUser {
    /// The unprivileged `user` account (uid 1000), created by the agent at boot if missing.
    #[default]
    User,
    Root,
}

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WindowSize {
    pub cols: u16,
    pub rows: u16,
}

/// Whether a request body (`DATA`…`END`) follows the request.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Stdin {
    /// stdin is `/dev/null`; no body follows.
    #[default]
    Null,
    /// stdin is a pipe fed from the stream's `DATA` frames, closed at `END`.
    Stream,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Exec {
        program: Program,
        #[serde(default)]
        env: BTreeMap<String, String>,
        #[serde(default)]
        cwd: Option<String>,
        #[serde(default)]
        user: GuestUser,
        #[serde(default)]
        stdin: Stdin,
        /// The whole process group is killed after this long.
        timeout_ms: u64,
        /// Run on a new pseudo-terminal of this size (an interactive shell): the program
        /// leads a new session with the terminal as its controlling tty and stdin, stdout
        /// and stderr; input comes from `DATA` frames whatever `stdin` says, output is
        /// `STDOUT` only, and `RESIZE` frames change the size.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pty: Option<WindowSize>,
    },
    /// Body follows as `DATA`…`END`: written to a temporary file in the same directory,
    /// fsynced and renamed over `path`; parents created. As [`GuestUser::User`] the file is
    /// owned by that user and `mode` loses its setuid and setgid bits.
    WriteFile {
        path: String,
        mode: u32,
        #[serde(default)]
        user: GuestUser,
    },
    /// Answered with `DATA` frames, then `REPLY` [`Reply::Read`].
    ReadFile {
        path: String,
        #[serde(default)]
        user: GuestUser,
    },
    /// One page of the directory `path`, by name (bytewise): at most `limit` entries whose
    /// names sort after `after_hex` (the hex of the last name of the previous page). The
    /// entries come as `DATA` frames carrying JSON lines of [`DirEntry`], then
    /// [`Reply::Listing`].
    ListDir {
        path: String,
        #[serde(default)]
        user: GuestUser,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after_hex: Option<String>,
        limit: u32,
    },
    Remove {
        path: String,
        recursive: bool,
        #[serde(default)]
        user: GuestUser,
    },
    /// Body follows as `DATA`…`END`: a tar stream unpacked into the directory `path`
    /// (created if missing), all or nothing; answered with [`Reply::Written`] (bytes read).
    /// As [`GuestUser::User`] members are owned by that user, without setuid or setgid bits.
    WriteArchive {
        path: String,
        #[serde(default)]
        user: GuestUser,
    },
    /// Answered with `DATA` frames of a tar stream of the directory `path`, then
    /// [`Reply::Read`].
    ReadArchive {
        path: String,
        #[serde(default)]
        user: GuestUser,
    },
    /// Gives a guest restored from a saved state its own identity: the host name (kernel,
    /// `/etc/hostname`, a `127.0.1.1` line in `/etc/hosts` if none names it), `/etc/machine-id`,
    /// and `seed_hex` credited to the kernel's entropy pool, then the generator reseeded, so
    /// clones of one state never share random numbers. Answered with [`Reply::Done`].
    SetIdentity {
        hostname: String,
        /// 32 lowercase hex digits.
        machine_id: String,
        /// 32–512 bytes of host randomness, hex.
        seed_hex: String,
    },
    /// Grows the mounted root filesystem online to fill its disk, once the disk has
    /// reached `disk_bytes` (a restored guest learns of its grown disk asynchronously, from
    /// the device's config change). Nothing changes when the filesystem already fills the
    /// disk. Answered with [`Reply::Done`].
    GrowRootFs { disk_bytes: u64 },
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EntryType {
    File,
    Dir,
    Symlink,
    Other,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DirEntry {
    pub name: String,
    pub path: String,
    #[serde(rename = "type")]
    pub entry_type: EntryType,
    pub size_bytes: u64,
    pub mode: u32,
    /// Seconds since the Unix epoch.
    pub modified_unix_s: i64,
}

/// Stable error codes the agent reports; the worker maps them to the API's codes.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AgentErrorCode {
    FileNotFound,
    IsADirectory,
    NotADirectory,
    DirectoryNotEmpty,
    PermissionDenied,
    InvalidPath,
    SpawnFailed,
    BadRequest,
    /// An uploaded archive is not tar, or an entry escapes its directory.
    InvalidArchive,
    Io,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Reply {
    Exited {
        /// `None` when the process was killed by a signal.
        exit_code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
        duration_ms: u64,
    },
    Written {
        size_bytes: u64,
    },
    Read {
        size_bytes: u64,
    },
    /// The end of a [`Request::ListDir`] page; `next_after_hex` continues it.
    Listing {
        has_more: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next_after_hex: Option<String>,
    },
    Removed,
    /// A request without a result of its own succeeded.
    Done,
    Error {
        code: AgentErrorCode,
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trips_through_bytes() {
        let f = Frame::json(
            7,
            FrameKind::Request,
            &Request::ReadFile {
                path: "/etc/hostname".into(),
                user: GuestUser::Root,
            },
        );
        let bytes = f.encode();
        let back = Frame::read_from(&mut bytes.as_slice())
            .expect("valid frame")
            .expect("one frame");
        assert_eq!(back, f);
        assert_eq!(
            back.decode_json::<Request>().expect("json"),
            Request::ReadFile {
                path: "/etc/hostname".into(),
                user: GuestUser::Root,
            }
        );
    }

    #[test]
    fn clean_eof_is_none_and_torn_header_is_error() {
        assert!(matches!(Frame::read_from(&mut [].as_slice()), Ok(None)));
        assert!(Frame::read_from(&mut [0u8, 0, 0].as_slice()).is_err());
    }

    #[test]
    fn rejects_oversized_and_unknown_frames() {
        let h = Frame::header(1, FrameKind::Data, MAX_FRAME_PAYLOAD + 1);
        assert!(matches!(
            Frame::parse_header(&h),
            Err(FrameError::TooLarge(_))
        ));
        let mut h = Frame::header(1, FrameKind::Data, 0);
        h[4] = 99;
        assert!(matches!(
            Frame::parse_header(&h),
            Err(FrameError::UnknownKind(99))
        ));
    }

    #[test]
    fn a_request_that_does_not_fit_one_frame_is_refused() {
        let big = Request::Exec {
            program: Program::Shell("x".repeat(MAX_FRAME_PAYLOAD)),
            env: BTreeMap::new(),
            cwd: None,
            user: GuestUser::User,
            stdin: Stdin::Null,
            timeout_ms: 1000,
            pty: None,
        };
        assert!(matches!(
            Frame::try_json(1, FrameKind::Request, &big),
            Err(FrameError::TooLarge(n)) if n > MAX_FRAME_PAYLOAD
        ));
        let small = Request::ReadFile {
            path: "/etc/hostname".into(),
            user: GuestUser::User,
        };
        assert!(Frame::try_json(1, FrameKind::Request, &small).is_ok());
    }

    #[test]
    fn exec_fields_within_the_budget_always_fit_one_frame() {
        let program = Program::Shell("\u{1}".repeat(MAX_EXEC_FIELDS_BYTES / 6 - 10));
        let env = BTreeMap::new();
        let (p, rest) = exec_fields_len(&program, &env, Some("/w"));
        assert!(
            p + rest <= MAX_EXEC_FIELDS_BYTES,
            "escaped control bytes count six"
        );
        let request = Request::Exec {
            program,
            env,
            cwd: Some("/w".into()),
            user: GuestUser::Root,
            stdin: Stdin::Stream,
            timeout_ms: u64::MAX,
            pty: Some(WindowSize {
                cols: u16::MAX,
                rows: u16::MAX,
            }),
        };
        assert!(Frame::try_json(u32::MAX, FrameKind::Request, &request).is_ok());
    }

    #[test]
    fn file_requests_run_as_the_guest_user_unless_they_say_root() {
        let r: Request = serde_json::from_str(r#"{"op":"read_file","path":"/a"}"#).expect("json");
        assert_eq!(
            r,
            Request::ReadFile {
                path: "/a".into(),
                user: GuestUser::User
            }
        );
    }

    fn api_head() -> ApiRequest {
        ApiRequest {
            method: "GET".into(),
            path: "/v1/self".into(),
            headers: vec![("content-type".into(), "application/json".into())],
            body_bytes: 0,
        }
    }

    #[test]
    fn guest_and_worker_stream_ids_never_collide() {
        assert!(!is_guest_stream(1));
        assert!(
            !is_guest_stream(GUEST_STREAM_BIT - 1),
            "the worker's highest id"
        );
        assert!(is_guest_stream(GUEST_STREAM_BIT));
        assert!(is_guest_stream(u32::MAX));
        // The id survives the header: the bit is not lost or reinterpreted on the wire.
        let h = Frame::header(GUEST_STREAM_BIT | 5, FrameKind::ApiRequest, 3);
        let (id, kind, len) = Frame::parse_header(&h).expect("parses");
        assert_eq!(
            (id, kind, len),
            (GUEST_STREAM_BIT | 5, FrameKind::ApiRequest, 3)
        );
    }

    #[test]
    fn api_frames_round_trip_and_keep_their_kinds() {
        for kind in [FrameKind::ApiRequest, FrameKind::ApiResponse] {
            assert_eq!(FrameKind::from_u8(kind as u8), Some(kind));
        }
        let f = Frame::try_json(GUEST_STREAM_BIT | 1, FrameKind::ApiRequest, &api_head())
            .expect("a head fits one frame");
        let back = Frame::read_from(&mut f.encode().as_slice())
            .expect("valid")
            .expect("one frame");
        assert_eq!(back.decode_json::<ApiRequest>().expect("json"), api_head());
    }

    #[test]
    fn the_largest_legal_api_head_fits_one_frame() {
        let head = ApiRequest {
            method: "DELETE".into(),
            path: format!("/{}", "\\".repeat(MAX_API_PATH_BYTES - 1)),
            headers: (0..MAX_API_HEADERS)
                .map(|i| (format!("x-{i:0>1022}"), "\"".repeat(MAX_API_HEADER_BYTES)))
                .collect(),
            body_bytes: MAX_API_BODY_BYTES,
        };
        head.check().expect("within every bound");
        Frame::try_json(u32::MAX, FrameKind::ApiRequest, &head)
            .expect("the bounds keep a head within one frame");
    }

    #[test]
    fn rejects_api_heads_past_their_bounds() {
        let cases: Vec<(ApiRequest, ApiHeadError)> = vec![
            (
                ApiRequest {
                    method: "get".into(),
                    ..api_head()
                },
                ApiHeadError::Method,
            ),
            (
                ApiRequest {
                    method: "GET /x".into(),
                    ..api_head()
                },
                ApiHeadError::Method,
            ),
            (
                ApiRequest {
                    method: String::new(),
                    ..api_head()
                },
                ApiHeadError::Method,
            ),
            (
                ApiRequest {
                    path: "v1/self".into(),
                    ..api_head()
                },
                ApiHeadError::Path,
            ),
            (
                ApiRequest {
                    path: "http://evil/v1/self".into(),
                    ..api_head()
                },
                ApiHeadError::Path,
            ),
            (
                ApiRequest {
                    path: "/v1/self x".into(),
                    ..api_head()
                },
                ApiHeadError::Path,
            ),
            (
                ApiRequest {
                    path: "/v1/self\r\nx".into(),
                    ..api_head()
                },
                ApiHeadError::Path,
            ),
            (
                ApiRequest {
                    path: format!("/{}", "a".repeat(MAX_API_PATH_BYTES)),
                    ..api_head()
                },
                ApiHeadError::Path,
            ),
            (
                ApiRequest {
                    headers: vec![("X-Upper".into(), "v".into())],
                    ..api_head()
                },
                ApiHeadError::Headers,
            ),
            (
                ApiRequest {
                    headers: vec![("a".into(), "v\r\nx-bunker-id: b".into())],
                    ..api_head()
                },
                ApiHeadError::Headers,
            ),
            (
                ApiRequest {
                    headers: vec![("a:b".into(), "v".into())],
                    ..api_head()
                },
                ApiHeadError::Headers,
            ),
            (
                ApiRequest {
                    headers: vec![("a".into(), "v".into()); MAX_API_HEADERS + 1],
                    ..api_head()
                },
                ApiHeadError::Headers,
            ),
            (
                ApiRequest {
                    body_bytes: MAX_API_BODY_BYTES + 1,
                    ..api_head()
                },
                ApiHeadError::BodyTooLarge(MAX_API_BODY_BYTES + 1),
            ),
        ];
        for (head, want) in cases {
            assert_eq!(head.check(), Err(want), "{head:?}");
        }
    }

    #[test]
    fn garbage_api_heads_do_not_decode() {
        for payload in [&b""[..], b"{", b"[]", b"{\"method\":\"GET\"}", b"\xff\xfe"] {
            let f = Frame::new(
                GUEST_STREAM_BIT | 1,
                FrameKind::ApiRequest,
                payload.to_vec(),
            );
            assert!(f.decode_json::<ApiRequest>().is_err(), "{payload:?}");
        }
        let extra = br#"{"method":"GET","path":"/v1/self","body_bytes":0,"bunker_id":"bnk_x"}"#;
        let f = Frame::new(GUEST_STREAM_BIT | 1, FrameKind::ApiRequest, extra.to_vec());
        assert!(
            f.decode_json::<ApiRequest>().is_err(),
            "unknown fields are refused"
        );
    }

    #[test]
    fn request_json_shape_is_stable() {
        let r = Request::Exec {
            program: Program::Argv(vec!["true".into()]),
            env: BTreeMap::new(),
            cwd: None,
            user: GuestUser::Root,
            stdin: Stdin::Null,
            timeout_ms: 1000,
            pty: None,
        };
        let v = serde_json::to_value(&r).expect("serialises");
        assert_eq!(v["op"], "exec");
        assert_eq!(v["program"]["argv"][0], "true");
        assert_eq!(v["user"], "root");
        assert!(v.get("pty").is_none(), "no terminal, no field");
    }
}
