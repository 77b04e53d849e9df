//! A minimal QMP client: one connection per command.
//!
//! 1. Connect to the VM's QMP socket; QEMU greets with `{"QMP": ...}`.
//! 2. Send `qmp_capabilities` to leave negotiation mode; wait for its `return`.
//! 3. Send the command; wait for its `return` or `error`.
//!
//! Asynchronous `event` lines may arrive at any point and are skipped.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// A QMP exchange should take milliseconds; a stuck monitor must not hang the caller.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);

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
    tokio::time::timeout(QMP_TIMEOUT, execute_inner(path, command))
        .await
        .map_err(|_| QmpError::Timeout)?
}

async fn execute_inner(path: &Path, command: &str) -> Result<(), QmpError> {
    let stream = UnixStream::connect(path).await?;
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    loop {
        let greeting = next_message(&mut lines).await?;
        if greeting.get("QMP").is_some() {
            break;
        }
    }
    for execute in ["qmp_capabilities", command] {
        let mut line = serde_json::to_vec(&json!({ "execute": execute }))?;
        line.push(b'\n');
        write.write_all(&line).await?;
        loop {
            let msg = next_message(&mut lines).await?;
            if msg.get("return").is_some() {
                break;
            }
            if let Some(err) = msg.get("error") {
                return Err(QmpError::Refused(err.to_string()));
            }
        }
    }
    Ok(())
}

async fn next_message(
    lines: &mut tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
) -> Result<Value, QmpError> {
    loop {
        let line = lines.next_line().await?.ok_or(QmpError::Closed)?;
        if line.trim().is_empty() {
            continue;
        }
        return Ok(serde_json::from_str(&line)?);
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
}
