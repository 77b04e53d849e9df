//! A minimal QMP client.
//!
//! 1. Connect to the VM's QMP socket; QEMU greets with `{"QMP": ...}`.
//! 2. Send `qmp_capabilities` to leave negotiation mode; wait for its `return`.
//! 3. Send each command (with its arguments); wait for its `return` or `error`.
//!
//! Asynchronous `event` lines may arrive at any point and are skipped. [`execute`] runs one
//! command on a fresh connection; a [`Session`] keeps the connection for several (a save
//! polls `query-migrate` on one connection).
//!
//! [`Session::send_fd`] is `getfd`: the command travels with a file descriptor attached
//! (`SCM_RIGHTS`), which QEMU keeps under a name for this connection, so that a later
//! `migrate` or `migrate-incoming` with the URI `fd:<name>` uses it. That is how the VM
//! state reaches a sandboxed, unprivileged QEMU that may neither spawn `cat` nor open files.

use std::io::IoSlice;
use std::os::fd::{AsFd as _, BorrowedFd};
use std::path::Path;
use std::time::Duration;

use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Interest};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// A QMP exchange should take milliseconds; a stuck monitor must not hang the caller.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("qmp i/o")]
    Io(#[from] std::io::Error),
    #[error("qmp connection closed")]
    Closed,
    #[error("qmp sent malformed json")]
    Json(#[from] serde_json::Error),
    #[error("qemu refused the command: {0}")]
    Refused(String),
    #[error("no answer from qmp within {QMP_TIMEOUT:?}")]
    Timeout,
}

/// Runs `command` (without arguments) on the QMP socket at `path`.
pub async fn execute(path: &Path, command: &str) -> Result<(), QmpError> {
    let mut session = Session::connect(path).await?;
    session.execute(command, None).await.map(drop)
}

/// One negotiated QMP connection.
pub struct Session {
    lines: tokio::io::Lines<BufReader<OwnedReadHalf>>,
    write: OwnedWriteHalf,
}

impl Session {
    /// Connects, reads the greeting and negotiates capabilities.
    pub async fn connect(path: &Path) -> Result<Self, QmpError> {
        tokio::time::timeout(QMP_TIMEOUT, Self::connect_inner(path))
            .await
            .map_err(|_| QmpError::Timeout)?
    }

    async fn connect_inner(path: &Path) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path).await?;
        let (read, write) = stream.into_split();
        let mut session = Self {
            lines: BufReader::new(read).lines(),
            write,
        };
        loop {
            let greeting = session.next_message().await?;
            if greeting.get("QMP").is_some() {
                break;
            }
        }
        session.execute_inner("qmp_capabilities", None).await?;
        Ok(session)
    }

    /// Runs `command` with `arguments`; returns what QEMU returned.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        tokio::time::timeout(QMP_TIMEOUT, self.execute_inner(command, arguments))
            .await
            .map_err(|_| QmpError::Timeout)?
    }

    /// `getfd`: hands `fd` to QEMU, which keeps its own copy under `name` until a command
    /// that takes `fd:<name>` uses it.
    pub async fn send_fd(&mut self, name: &str, fd: BorrowedFd<'_>) -> Result<(), QmpError> {
        tokio::time::timeout(QMP_TIMEOUT, self.send_fd_inner(name, fd))
            .await
            .map_err(|_| QmpError::Timeout)?
    }

    async fn send_fd_inner(&mut self, name: &str, fd: BorrowedFd<'_>) -> Result<(), QmpError> {
        let line = request_line("getfd", Some(json!({ "fdname": name })))?;
        let socket: &UnixStream = self.write.as_ref();
        // The descriptor rides on the first byte; whatever the kernel did not take then
        // follows as plain bytes.
        let sent = loop {
            socket.writable().await?;
            let attempt = socket.try_io(Interest::WRITABLE, || {
                let mut space =
                    [std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
                let mut control = SendAncillaryBuffer::new(&mut space);
                let fds = [fd];
                if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
                    return Err(std::io::Error::other("no room for the descriptor"));
                }
                rustix::net::sendmsg(
                    socket.as_fd(),
                    &[IoSlice::new(&line)],
                    &mut control,
                    SendFlags::NOSIGNAL,
                )
                .map_err(std::io::Error::from)
            });
            match attempt {
                Ok(sent) => break sent,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(QmpError::Io(e)),
            }
        };
        if let Some(rest) = line.get(sent..)
            && !rest.is_empty()
        {
            self.write.write_all(rest).await?;
        }
        self.read_reply().await.map(drop)
    }

    async fn execute_inner(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let line = request_line(command, arguments)?;
        self.write.write_all(&line).await?;
        self.read_reply().await
    }

    /// The `return` (or `error`) answering the command just sent; events are skipped.
    async fn read_reply(&mut self) -> Result<Value, QmpError> {
        loop {
            let mut msg = self.next_message().await?;
            if let Some(ret) = msg.get_mut("return") {
                return Ok(ret.take());
            }
            if let Some(err) = msg.get("error") {
                return Err(QmpError::Refused(err.to_string()));
            }
        }
    }

    async fn next_message(&mut self) -> Result<Value, QmpError> {
        loop {
            let line = self.lines.next_line().await?.ok_or(QmpError::Closed)?;
            if line.trim().is_empty() {
                continue;
            }
            return Ok(serde_json::from_str(&line)?);
        }
    }
}

/// One QMP request, newline-terminated.
fn request_line(command: &str, arguments: Option<Value>) -> Result<Vec<u8>, QmpError> {
    let request = match arguments {
        Some(arguments) => json!({ "execute": command, "arguments": arguments }),
        None => json!({ "execute": command }),
    };
    let mut line = serde_json::to_vec(&request)?;
    line.push(b'\n');
    Ok(line)
}

#[cfg(test)]
mod tests {
    use tokio::net::UnixListener;

    use super::*;

    /// A fake QEMU monitor that greets, sends an event, and answers each command.
    async fn fake_monitor(listener: UnixListener, refuse: &'static str) -> Vec<String> {
        let (stream, _) = listener.accept().await.expect("accept");
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        write
            .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
            .await
            .expect("greet");
        let mut seen = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            let v: Value = serde_json::from_str(&line).expect("json");
            let cmd = v["execute"].as_str().expect("execute").to_owned();
            write
                .write_all(b"{\"event\": \"RESUME\", \"timestamp\": {}}\r\n")
                .await
                .expect("event");
            let answer = if cmd == refuse {
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}}\r\n"
            } else {
                "{\"return\": {}}\r\n"
            };
            write.write_all(answer.as_bytes()).await.expect("answer");
            seen.push(cmd);
        }
        seen
    }

    #[tokio::test]
    async fn negotiates_then_runs_the_command() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let monitor = tokio::spawn(fake_monitor(listener, ""));
        execute(&path, "stop").await.expect("stop");
        assert_eq!(monitor.await.expect("join"), ["qmp_capabilities", "stop"]);
    }

    #[tokio::test]
    async fn reports_a_refused_command() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let monitor = tokio::spawn(fake_monitor(listener, "cont"));
        let err = execute(&path, "cont").await.expect_err("refused");
        assert!(
            matches!(err, QmpError::Refused(ref m) if m.contains("nope")),
            "{err}"
        );
        monitor.await.expect("join");
    }

    #[tokio::test]
    async fn a_session_runs_commands_with_arguments_and_returns_their_value() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let monitor = tokio::spawn(fake_monitor(listener, ""));
        let mut session = Session::connect(&path).await.expect("connect");
        let ret = session
            .execute("migrate", Some(json!({ "uri": "unix:/x" })))
            .await
            .expect("migrate");
        assert_eq!(ret, json!({}));
        session.execute("query-migrate", None).await.expect("query");
        drop(session);
        assert_eq!(
            monitor.await.expect("join"),
            ["qmp_capabilities", "migrate", "query-migrate"]
        );
    }

    #[tokio::test]
    async fn getfd_hands_the_descriptor_to_the_monitor() {
        use std::io::{BufRead as _, Read as _, Write as _};
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let monitor = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().expect("accept");
            stream.write_all(b"{\"QMP\": {}}\r\n").expect("greet");
            // The client waits for each answer, so one read is one command.
            let mut caps = String::new();
            std::io::BufReader::new(&stream)
                .read_line(&mut caps)
                .expect("caps");
            stream.write_all(b"{\"return\": {}}\r\n").expect("answer");
            let mut buf = [0u8; 256];
            let mut space =
                [std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut control = rustix::net::RecvAncillaryBuffer::new(&mut space);
            let got = rustix::net::recvmsg(
                &stream,
                &mut [std::io::IoSliceMut::new(&mut buf)],
                &mut control,
                rustix::net::RecvFlags::empty(),
            )
            .expect("recvmsg");
            let mut fds = Vec::new();
            for msg in control.drain() {
                if let rustix::net::RecvAncillaryMessage::ScmRights(rights) = msg {
                    fds.extend(rights);
                }
            }
            stream.write_all(b"{\"return\": {}}\r\n").expect("answer");
            let line = String::from_utf8_lossy(&buf[..got.bytes]).into_owned();
            let mut file = std::fs::File::from(fds.pop().expect("a descriptor"));
            let mut text = String::new();
            file.read_to_string(&mut text)
                .expect("read the passed file");
            (line, text)
        });
        let passed = dir.path().join("state");
        std::fs::write(&passed, b"saved state").expect("write");
        let file = std::fs::File::open(&passed).expect("open");
        let mut session = Session::connect(&path).await.expect("connect");
        session
            .send_fd("incoming", file.as_fd())
            .await
            .expect("getfd");
        let (line, text) = tokio::task::spawn_blocking(move || monitor.join().expect("join"))
            .await
            .expect("join");
        let request: Value = serde_json::from_str(line.trim()).expect("json");
        assert_eq!(
            request,
            json!({ "execute": "getfd", "arguments": { "fdname": "incoming" } })
        );
        assert_eq!(text, "saved state");
    }
}
