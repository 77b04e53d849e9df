//! `scaibunker-guest`: the command a program in the bunker runs to call the platform as
//! its bunker, over the backchannel socket ([`crate::backchannel::API_SOCKET`]). It is the
//! agent binary under another name (`/run/scaibunker/scaibunker-guest`, a symlink the
//! agent makes at start) or `scaibunker-agent guest …`.
//!
//! Each command is one HTTP/1.1 request; the response body goes to stdout, and the exit
//! status is 0 for a 2xx answer, 1 for any other, 2 for a usage error.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;

use crate::backchannel::API_SOCKET;

pub const USAGE: &str = "usage: scaibunker-guest [-H 'NAME: VALUE']... COMMAND
commands:
       self
       metadata set KEY VALUE
       event KIND [MESSAGE]
       children create [JSON]
       children list
       children delete ID
       request METHOD PATH [BODY]
       burst N COMMAND...   (N calls in a row; prints how many got each status)
  (socket: $SCAIBUNKER_API_SOCKET, default /run/scaibunker/api.sock)";

/// The request a command line stands for; `None` for a usage error.
pub fn request_for(args: &[&str]) -> Option<(String, String, Vec<u8>)> {
    let json = |v: serde_json::Value| serde_json::to_vec(&v).expect("json values serialise");
    Some(match args {
        ["self"] => ("GET".into(), "/v1/self".into(), Vec::new()),
        ["metadata", "set", key, value] => (
            "PUT".into(),
            format!("/v1/self/metadata/{key}"),
            value.as_bytes().to_vec(),
        ),
        ["event", kind] => (
            "POST".into(),
            "/v1/self/events".into(),
            json(serde_json::json!({ "kind": kind })),
        ),
        ["event", kind, message] => (
            "POST".into(),
            "/v1/self/events".into(),
            json(serde_json::json!({ "kind": kind, "message": message })),
        ),
        ["children", "create"] => ("POST".into(), "/v1/self/children".into(), b"{}".to_vec()),
        ["children", "create", body] => (
            "POST".into(),
            "/v1/self/children".into(),
            body.as_bytes().to_vec(),
        ),
        ["children", "list"] => ("GET".into(), "/v1/self/children".into(), Vec::new()),
        ["children", "delete", id] => (
            "DELETE".into(),
            format!("/v1/self/children/{id}"),
            Vec::new(),
        ),
        ["request", method, path] => ((*method).into(), (*path).into(), Vec::new()),
        ["request", method, path, body] => {
            ((*method).into(), (*path).into(), body.as_bytes().to_vec())
        }
        _ => return None,
    })
}

/// Runs one command line (the arguments after the program name).
pub fn run(args: &[&str]) -> ExitCode {
    let mut args = args;
    let mut headers = Vec::new();
    while let ["-H", header, rest @ ..] = args {
        headers.push((*header).to_owned());
        args = rest;
    }
    let socket = std::env::var("SCAIBUNKER_API_SOCKET").unwrap_or_else(|_| API_SOCKET.into());
    if let ["burst", n, rest @ ..] = args {
        let (Ok(n), Some((method, path, body))) = (n.parse::<u32>(), request_for(rest)) else {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        };
        let mut counts = std::collections::BTreeMap::<String, u32>::new();
        for _ in 0..n {
            let key = match call(Path::new(&socket), &method, &path, &headers, &body) {
                Ok((status, _)) => status.to_string(),
                Err(_) => "error".to_owned(),
            };
            *counts.entry(key).or_default() += 1;
        }
        let line: Vec<String> = counts.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("{}", line.join(" "));
        return ExitCode::SUCCESS;
    }
    let Some((method, path, body)) = request_for(args) else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    match call(Path::new(&socket), &method, &path, &headers, &body) {
        Ok((status, body)) => {
            let mut out = io::stdout().lock();
            let _ = out.write_all(&body);
            if !body.ends_with(b"\n") {
                let _ = out.write_all(b"\n");
            }
            if (200..300).contains(&status) {
                ExitCode::SUCCESS
            } else {
                eprintln!("scaibunker-guest: HTTP {status}");
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("scaibunker-guest: {socket}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One request over the socket, with extra `headers` (`NAME: VALUE` lines): `(status, body)`.
pub fn call(
    socket: &Path,
    method: &str,
    path: &str,
    headers: &[String],
    body: &[u8],
) -> io::Result<(u16, Vec<u8>)> {
    let mut stream = UnixStream::connect(socket)?;
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nhost: scaibunker\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for header in headers {
        request.push_str(header);
        request.push_str("\r\n");
    }
    if !body.is_empty() {
        let kind = if body.first() == Some(&b'{') {
            "application/json"
        } else {
            "text/plain"
        };
        request.push_str(&format!("content-type: {kind}\r\n"));
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body);
    stream.write_all(&bytes)?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let malformed = || io::Error::new(io::ErrorKind::InvalidData, "malformed HTTP response");
    let head_end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(malformed)?;
    let status_line = std::str::from_utf8(&answer[..head_end])
        .map_err(|_| malformed())?
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(malformed)?;
    Ok((status, answer[head_end + 4..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_map_to_requests() {
        let r = |a: &[&str]| request_for(a).map(|(m, p, _)| format!("{m} {p}"));
        assert_eq!(r(&["self"]).as_deref(), Some("GET /v1/self"));
        assert_eq!(
            r(&["metadata", "set", "stage", "2"]).as_deref(),
            Some("PUT /v1/self/metadata/stage")
        );
        assert_eq!(
            r(&["children", "delete", "bnk_x"]).as_deref(),
            Some("DELETE /v1/self/children/bnk_x")
        );
        assert_eq!(r(&["nonsense"]), None);
        let (_, _, body) = request_for(&["event", "progress", "half way"]).expect("event");
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["kind"], "progress");
        assert_eq!(v["message"], "half way");
    }
}
