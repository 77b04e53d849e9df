//! Streamed exec end to end: real `scaibunker up`, a real microVM, Server-Sent Events over
//! HTTP. A client that disconnects mid-stream resumes from its last event id and the
//! concatenated output equals the command's output exactly; the command keeps running while no
//! client is attached.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use scaibunker_e2e::{Up, UpOptions, require_images};
use scaibunker_sdk::ExecEvent;
use serde_json::Value;

/// One parsed SSE event.
#[derive(Debug, Clone)]
struct Sse {
    id: Option<u64>,
    event: String,
    data: String,
}

/// Reads SSE events from a response until `stop` says so or the stream ends.
async fn read_events(
    resp: reqwest::Response,
    mut stop: impl FnMut(&Sse) -> bool,
) -> (Vec<Sse>, Vec<Instant>) {
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    let (mut events, mut times) = (Vec::new(), Vec::new());
    while let Some(chunk) = body.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk.expect("body chunk")));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let mut ev = Sse {
                id: None,
                event: "message".into(),
                data: String::new(),
            };
            let mut any = false;
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    ev.id = v.trim().parse().ok();
                    any = true;
                } else if let Some(v) = line.strip_prefix("event:") {
                    ev.event = v.trim().to_owned();
                    any = true;
                } else if let Some(v) = line.strip_prefix("data:") {
                    ev.data.push_str(v.strip_prefix(' ').unwrap_or(v));
                    any = true;
                }
            }
            if !any {
                continue; // a keep-alive comment
            }
            let done = stop(&ev);
            events.push(ev);
            times.push(Instant::now());
            if done {
                return (events, times);
            }
        }
    }
    (events, times)
}

fn stdout_of(events: &[Sse]) -> String {
    events
        .iter()
        .filter(|e| e.event == "stdout")
        .map(|e| {
            let v: Value = serde_json::from_str(&e.data).expect("stdout json");
            v["data"].as_str().expect("text output").to_owned()
        })
        .collect()
}

#[tokio::test]
async fn a_stream_survives_a_disconnect_and_resumes_without_loss_or_repeat() {
    require_images(&["tiny.ext4"]).expect("guest images");
    let up = Up::start(UpOptions::default()).expect("scaibunker up gets ready");
    let client = up.client();
    let bunker = up.tiny_bunker().await;
    let http = reqwest::Client::new();
    let api = format!("{}/v1/modules/scaibunker/bunkers/{}", up.url(), bunker.id);

    // Five lines a second apart; the client leaves after the first and comes back later.
    let script = "for i in 1 2 3 4 5; do echo line$i; sleep 1; done; echo err >&2; exit 3";
    let resp = http
        .post(format!("{api}/exec"))
        .bearer_auth(up.key())
        .json(&serde_json::json!({"command": script, "stream": true}))
        .send()
        .await
        .expect("stream");
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .is_ok_and(|c| c.starts_with("text/event-stream"))
    );
    let exec_id = resp.headers()["x-exec-id"]
        .to_str()
        .expect("exec id header")
        .to_owned();
    let started = Instant::now();
    let (first, _) = read_events(resp, |e| e.event == "stdout").await;
    let first_at = started.elapsed();
    assert_eq!(stdout_of(&first), "line1\n");
    let last_id = first.last().and_then(|e| e.id).expect("events carry ids");
    // The first line came long before the command could have finished: streamed, not buffered.
    assert!(
        first_at < Duration::from_secs(4),
        "first event after {first_at:?}"
    );

    // Away for a while: the command keeps running with no client attached.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let resumed = http
        .get(format!("{api}/exec/{exec_id}/events"))
        .bearer_auth(up.key())
        .header("Last-Event-ID", last_id.to_string())
        .send()
        .await
        .expect("resume");
    assert_eq!(resumed.status(), 200);
    let (rest, _) = read_events(resumed, |e| e.data == "[DONE]").await;
    let ids: Vec<u64> = rest.iter().filter_map(|e| e.id).collect();
    assert!(
        ids.iter().all(|id| *id > last_id),
        "nothing repeated: {ids:?}"
    );
    assert!(
        ids.windows(2).all(|w| w[1] == w[0] + 1),
        "nothing skipped: {ids:?}"
    );
    let all: Vec<Sse> = first.iter().chain(rest.iter()).cloned().collect();
    assert_eq!(stdout_of(&all), "line1\nline2\nline3\nline4\nline5\n");
    let stderr: Vec<&Sse> = all.iter().filter(|e| e.event == "stderr").collect();
    assert_eq!(stderr.len(), 1);
    let exit = all.iter().find(|e| e.event == "exit").expect("exit event");
    let exit: Value = serde_json::from_str(&exit.data).expect("exit json");
    assert_eq!(exit["exit_code"], 3);
    assert_eq!(exit["timed_out"], false);
    assert_eq!(exit["exec_id"], exec_id.as_str());
    assert_eq!(all.last().map(|e| e.data.as_str()), Some("[DONE]"));

    // Replaying from the start gives the same events again; the exec log has the run.
    let replay = http
        .get(format!("{api}/exec/{exec_id}/events"))
        .bearer_auth(up.key())
        .send()
        .await
        .expect("replay");
    let (again, _) = read_events(replay, |e| e.data == "[DONE]").await;
    assert_eq!(stdout_of(&again), "line1\nline2\nline3\nline4\nline5\n");
    let log: Value = http
        .get(format!("{api}/exec-log"))
        .bearer_auth(up.key())
        .send()
        .await
        .expect("exec log")
        .json()
        .await
        .expect("json");
    let row = log["data"]
        .as_array()
        .expect("rows")
        .iter()
        .find(|r| r["exec_id"] == exec_id.as_str())
        .expect("the streamed exec is logged")
        .clone();
    assert_eq!(row["exit_code"], 3);
    assert!(
        row["output_preview"]
            .as_str()
            .is_some_and(|p| p.starts_with("line1"))
    );

    // The SDK's stream: events in order, text and bytes decoded, the exit code last.
    let mut stream = client
        .exec_stream(
            &bunker.id,
            &scaibunker_api::exec::ExecRequest {
                command: Some("printf 'a\\n'; printf 'b' >&2; printf '\\377'; exit 5".into()),
                ..Default::default()
            },
        )
        .await
        .expect("sdk stream");
    let (mut out, mut err, mut code) = (Vec::new(), Vec::new(), None);
    while let Some(ev) = stream.next().await {
        match ev.expect("event") {
            ExecEvent::Stdout(b) => out.extend(b),
            ExecEvent::Stderr(b) => err.extend(b),
            ExecEvent::Exit { exit_code, .. } => code = exit_code,
            ExecEvent::Error { code, message } => panic!("{code}: {message}"),
        }
    }
    assert_eq!(out, b"a\n\xff");
    assert_eq!(err, b"b");
    assert_eq!(code, Some(5));

    // Unknown exec ids and other bunkers' ids are not found.
    let missing = http
        .get(format!("{api}/exec/exe_nope/events"))
        .bearer_auth(up.key())
        .send()
        .await
        .expect("missing");
    assert_eq!(missing.status(), 404);

    // The SDK resumes by itself: a proxy cuts the first connection after the first line.
    let proxy = CuttingProxy::start(up.url(), b"line1").await;
    let via_proxy = scaibunker_sdk::Client::new(proxy.url(), Some(up.key().to_owned()));
    let mut stream = via_proxy
        .exec_stream(
            &bunker.id,
            &scaibunker_api::exec::ExecRequest {
                command: Some(script.into()),
                ..Default::default()
            },
        )
        .await
        .expect("start through the proxy");
    let (mut out, mut code) = (Vec::new(), None);
    while let Some(event) = stream.next().await {
        match event.expect("the SDK resumes instead of failing") {
            ExecEvent::Stdout(b) => out.extend(b),
            ExecEvent::Stderr(_) => {}
            ExecEvent::Exit { exit_code, .. } => code = exit_code,
            ExecEvent::Error { code, message } => panic!("{code}: {message}"),
        }
    }
    assert!(proxy.cuts() >= 1, "the proxy did cut a connection");
    assert_eq!(
        String::from_utf8_lossy(&out),
        "line1\nline2\nline3\nline4\nline5\n"
    );
    assert_eq!(code, Some(3));

    client.delete_bunker(&bunker.id).await.expect("delete");
}

/// A TCP proxy in front of the API that cuts its first connection right after the upstream
/// sent `needle`, and forwards every later connection untouched.
struct CuttingProxy {
    addr: std::net::SocketAddr,
    cuts: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl CuttingProxy {
    async fn start(upstream: &str, needle: &'static [u8]) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let upstream = upstream.trim_start_matches("http://").to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let cuts = std::sync::Arc::new(AtomicUsize::new(0));
        let cut_count = cuts.clone();
        tokio::spawn(async move {
            let mut first = true;
            while let Ok((client, _)) = listener.accept().await {
                let server = tokio::net::TcpStream::connect(&upstream)
                    .await
                    .expect("upstream");
                let cut = std::mem::replace(&mut first, false);
                let cut_count = cut_count.clone();
                tokio::spawn(async move {
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = tokio::spawn(async move { tokio::io::copy(&mut cr, &mut sw).await });
                    let mut seen = Vec::new();
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        seen.extend_from_slice(&buf[..n]);
                        if cut && seen.windows(needle.len()).any(|w| w == needle) {
                            cut_count.fetch_add(1, Ordering::SeqCst);
                            break;
                        }
                    }
                    up.abort();
                });
            }
        });
        Self { addr, cuts }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn cuts(&self) -> usize {
        self.cuts.load(std::sync::atomic::Ordering::SeqCst)
    }
}
