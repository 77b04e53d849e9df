//! The backchannel through a real microVM: a program in an `isolated` guest calls
//! `/run/scaibunker/api.sock` (through `scaibunker-guest`), the worker forwards the call to a
//! stand-in controller with its own credential, and the answer comes back into the guest.
//! The stand-in records what reached it, so the test sees what the worker let through.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method};
use axum::routing::{any, get, post};
use common::{TestWorker, require_artefacts, vm_slot};
use scaibunker_proto::worker::{HeartbeatResponse, PeersResponse, RegisterResponse};

const CREDENTIAL: &str = "swc_1_fake_wrk_bc";

/// One call that reached the stand-in controller.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    headers: HeaderMap,
    body: Vec<u8>,
}

type Shared = Arc<Mutex<Vec<Seen>>>;

/// Answers every backchannel call with the bunker id its path names, as the controller's
/// `GET /self` would, plus the rest of the path, so the guest can print both.
async fn internal(
    State(seen): State<Shared>,
    method: Method,
    Path(rest): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> axum::Json<serde_json::Value> {
    let path = format!("/v1/modules/scaibunker/internal/bunkers/{rest}");
    seen.lock().unwrap().push(Seen {
        method: method.to_string(),
        path: path.clone(),
        headers,
        body: body.to_vec(),
    });
    let id = rest.split('/').next().unwrap_or_default().to_owned();
    axum::Json(serde_json::json!({"status": "ok", "data": {"id": id, "path": path}}))
}

async fn fake_controller(seen: &Shared) -> String {
    let app = axum::Router::new()
        .route(
            "/v1/modules/scaibunker/workers/register",
            post(|| async {
                axum::Json(RegisterResponse {
                    worker_id: "wrk_bc".into(),
                    heartbeat_interval_s: 10,
                    credential: CREDENTIAL.into(),
                })
            }),
        )
        .route(
            "/v1/modules/scaibunker/heartbeat",
            post(|| async {
                axum::Json(HeartbeatResponse {
                    known: true,
                    stop_bunkers: Vec::new(),
                    pull_images: Vec::new(),
                    credential: None,
                })
            }),
        )
        .route(
            "/v1/modules/scaibunker/peers/{sha256}",
            get(|| async { axum::Json(PeersResponse { peers: Vec::new() }) }),
        )
        .route(
            "/v1/modules/scaibunker/internal/bunkers/{*rest}",
            any(internal),
        )
        .with_state(Arc::clone(seen));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

fn text(b64: &str) -> String {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    String::from_utf8_lossy(&bytes).into_owned()
}

const GUEST: &str = "/run/scaibunker/scaibunker-guest";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_calls_the_platform_as_its_bunker_and_nothing_else() {
    let images = require_artefacts(&["vmlinux", "initramfs.cpio.gz", "tiny.ext4"]);
    let _slot = vm_slot().await;
    let seen = Shared::default();
    let url = fake_controller(&seen).await;
    let w = TestWorker::start_with(&images, |c| {
        c.controller_url = Some(url);
        c.heartbeat_interval = Duration::from_secs(10);
    })
    .await;
    let id = "bnk_backchannel1";
    // `isolated` (the default network spec): the guest has no network at all.
    w.create(id, "tiny", 256).await;

    let out = w.exec_sh(id, &format!("{GUEST} self")).await;
    let stdout = text(&out.stdout_b64);
    assert_eq!(out.exit_code, Some(0), "{out:?}");
    assert!(stdout.contains(&format!("\"id\":\"{id}\"")), "{stdout}");
    {
        let seen = seen.lock().unwrap();
        let call = seen.last().unwrap();
        assert_eq!(call.method, "GET");
        assert_eq!(
            call.path,
            format!("/v1/modules/scaibunker/internal/bunkers/{id}/self")
        );
        assert_eq!(
            call.headers.get("authorization").unwrap(),
            &format!("Bearer {CREDENTIAL}"),
            "the worker's own credential"
        );
    }

    // Forged identity: headers naming another bunker or carrying a token are dropped.
    let out = w
        .exec_sh(
            id,
            &format!(
                "{GUEST} -H 'X-Bunker-Id: bnk_other' -H 'Authorization: Bearer sgk_forged' \
                 -H 'X-Tenant-Id: tnt_other' -H 'X-Worker-Id: wrk_other' -H 'Cookie: a=b' \
                 event step 'half way'"
            ),
        )
        .await;
    assert_eq!(out.exit_code, Some(0), "{out:?}");
    {
        let seen = seen.lock().unwrap();
        let call = seen.last().unwrap();
        assert_eq!(call.method, "POST");
        assert_eq!(
            call.path,
            format!("/v1/modules/scaibunker/internal/bunkers/{id}/self/events")
        );
        for name in ["x-bunker-id", "x-tenant-id", "x-worker-id", "cookie"] {
            assert!(
                call.headers.get(name).is_none(),
                "{name} reached the controller"
            );
        }
        assert_eq!(
            call.headers.get("authorization").unwrap(),
            &format!("Bearer {CREDENTIAL}")
        );
        let body: serde_json::Value = serde_json::from_slice(&call.body).unwrap();
        assert_eq!(body["kind"], "step");
        assert_eq!(body["message"], "half way");
    }

    // Paths that would reach anything but the bunker's own routes never leave the worker.
    let before = seen.lock().unwrap().len();
    for path in [
        "/v1/self/../../bunkers/bnk_other",
        "/v1/self/%2e%2e/bnk_other",
        "/v1/bunkers/bnk_other",
        "/v1/selfie",
    ] {
        let out = w
            .exec_sh(id, &format!("{GUEST} request GET '{path}'"))
            .await;
        assert_eq!(out.exit_code, Some(1), "{path}: {out:?}");
        assert!(
            text(&out.stderr_b64).contains("HTTP 404"),
            "{path}: {out:?}"
        );
    }
    assert_eq!(
        seen.lock().unwrap().len(),
        before,
        "none reached the controller"
    );

    // Another bunker's id can only travel in the path below the caller's own.
    let out = w
        .exec_sh(id, &format!("{GUEST} children delete bnk_other"))
        .await;
    assert_eq!(out.exit_code, Some(0), "{out:?}");
    assert_eq!(
        seen.lock().unwrap().last().unwrap().path,
        format!("/v1/modules/scaibunker/internal/bunkers/{id}/self/children/bnk_other"),
    );

    // A burst: past 40 at once (20 a second after), 429 with Retry-After, and the
    // controller is not called for those.
    let before = seen.lock().unwrap().len();
    let out = w.exec_sh(id, &format!("{GUEST} burst 120 self")).await;
    let counts = text(&out.stdout_b64).trim().to_owned();
    eprintln!("a burst of 120 calls: {counts}");
    let count = |status: &str| -> usize {
        counts
            .split(' ')
            .find_map(|kv| kv.strip_prefix(&format!("{status}=")))
            .map_or(0, |n| n.parse().unwrap())
    };
    assert!(count("429") > 0, "no 429 in a burst of 120: {counts}");
    assert!(count("200") >= 40, "the burst allowance: {counts}");
    let reached = seen.lock().unwrap().len() - before;
    assert_eq!(
        reached,
        count("200"),
        "only allowed calls reached the controller: {counts}"
    );
    let out = w
        .exec_sh(
            id,
            &format!("sleep 3; {GUEST} self >/dev/null && echo again"),
        )
        .await;
    assert_eq!(text(&out.stdout_b64).trim(), "again", "{out:?}");

    w.delete_bunker(id).await;
    w.shutdown().await;
}
