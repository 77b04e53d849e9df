//! A minimal QMP client.
//!
//! 1. Connect to the VM's QMP socket; QEMU greets with `{"QMP": ...}`.
//! 2. Send `qmp_capabilities` to leave negotiation mode; wait for its `return`.
//! 3. Send each command (with its arguments); wait for its `return` or `error`.
//!
//! Asynchronous `event` lines may arrive at any point and are skipped. [`execute`] runs one
//! command on a fresh connection; a [`Session`] keeps the connection for several (a save
//! polls `query-migrate` on one connection).

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
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

    async fn execute_inner(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let request = match arguments {
            Some(arguments) => json!({ "execute": command, "arguments": arguments }),
            None => json!({ "execute": command }),
        };
        let mut line = serde_json::to_vec(&request)?;
        line.push(b'\n');
        self.write.write_all(&line).await?;
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
}
