//! Pulls against in-process fakes at the HTTP seam: one fake serves whichever of the
//! controller's routes (peers, storage objects) and a peer's route (images) a test fills.

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;

use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use scaibunker_proto::worker::{Peer, PeersResponse};
use sha2::{Digest as _, Sha256};

use super::fetch::is_object_key;
use super::*;

mod room;

const TOKEN: &str = "pull-test-token";

#[derive(Default)]
struct Fake {
    peers: Vec<Peer>,
    objects: HashMap<String, Vec<u8>>,
    images: HashMap<String, Vec<u8>>,
    /// Every authorised request's path, in order.
    hits: Mutex<Vec<String>>,
    delay: Duration,
    active: AtomicUsize,
    max_active: AtomicUsize,
}

fn authorised(headers: &HeaderMap) -> bool {
    headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {TOKEN}"))
}

impl Fake {
    async fn answer(
        &self,
        headers: &HeaderMap,
        path: String,
        bytes: Option<&Vec<u8>>,
    ) -> Result<Vec<u8>, StatusCode> {
        if !authorised(headers) {
            return Err(StatusCode::UNAUTHORIZED);
        }
        self.hits.lock().expect("lock").push(path);
        let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_active.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        self.active.fetch_sub(1, Ordering::SeqCst);
        bytes.cloned().ok_or(StatusCode::NOT_FOUND)
    }

    fn hits(&self) -> Vec<String> {
        self.hits.lock().expect("lock").clone()
    }
}

async fn peers(
    State(f): State<Arc<Fake>>,
    headers: HeaderMap,
    UrlPath(sha): UrlPath<String>,
) -> Result<axum::Json<PeersResponse>, StatusCode> {
    f.answer(&headers, format!("peers/{sha}"), Some(&Vec::new()))
        .await?;
    Ok(axum::Json(PeersResponse {
        peers: f.peers.clone(),
    }))
}

async fn object(
    State(f): State<Arc<Fake>>,
    headers: HeaderMap,
    UrlPath(key): UrlPath<String>,
) -> Result<Vec<u8>, StatusCode> {
    f.answer(&headers, format!("objects/{key}"), f.objects.get(&key))
        .await
}

async fn image(
    State(f): State<Arc<Fake>>,
    headers: HeaderMap,
    UrlPath(sha): UrlPath<String>,
) -> Result<Vec<u8>, StatusCode> {
    f.answer(&headers, format!("images/{sha}"), f.images.get(&sha))
        .await
}

/// Serves `fake` on a random port; its base URL.
async fn serve(fake: Arc<Fake>) -> String {
    let app = axum::Router::new()
        .route("/v1/modules/scaibunker/peers/{sha}", get(peers))
        .route("/v1/modules/scaibunker/storage/objects/{*key}", get(object))
        .route("/v1/worker/images/{sha}", get(image))
        .with_state(fake);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

/// Deterministic bytes of `len`, different for each `seed`.
fn bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn digest(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn pull_of(b: &[u8], key: Option<&str>) -> ImagePull {
    ImagePull {
        sha256: digest(b),
        size_bytes: b.len() as u64,
        object_key: key.map(str::to_owned),
    }
}

fn open(dir: &Path, controller: &str) -> Arc<Pulls> {
    Arc::new(open_unshared(dir, controller))
}

fn open_unshared(dir: &Path, controller: &str) -> Pulls {
    Pulls::open(
        dir,
        Some(ControllerAccess {
            url: controller.to_owned(),
            credentials: Arc::new(crate::credentials::Credentials::standalone(TOKEN)),
        }),
    )
    .expect("open")
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn peer(id: &str, url: &str) -> Peer {
    Peer {
        worker_id: id.to_owned(),
        url: url.to_owned(),
        // The fakes check one bearer whatever the source.
        token: TOKEN.to_owned(),
    }
}

#[tokio::test]
async fn prefers_a_peer_over_the_proxy() {
    let image = bytes(300_000, 1);
    let pull = pull_of(&image, Some("images/img_1.ext4"));
    let peer_fake = Arc::new(Fake {
        images: [(pull.sha256.clone(), image.clone())].into(),
        ..Fake::default()
    });
    let peer_url = serve(Arc::clone(&peer_fake)).await;
    let controller = Arc::new(Fake {
        peers: vec![peer("wrk_peer", &peer_url)],
        objects: [("images/img_1.ext4".to_owned(), image.clone())].into(),
        ..Fake::default()
    });
    let controller_url = serve(Arc::clone(&controller)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pulls = open(dir.path(), &controller_url);

    let got = pulls.pull(pull.clone()).await.expect("pulled");
    assert_eq!(got.sha256, pull.sha256);
    assert_eq!(fs::read(&got.path).expect("read"), image);
    assert!(
        fs::metadata(&got.path)
            .expect("meta")
            .permissions()
            .readonly()
    );
    assert_eq!(controller.hits(), [format!("peers/{}", pull.sha256)]);
    assert_eq!(peer_fake.hits(), [format!("images/{}", pull.sha256)]);
    let c = pulls.counters();
    assert_eq!((c.peer_bytes, c.proxy_bytes), (image.len() as u64, 0));
    assert_eq!((c.completed, c.failed), (1, 0));
    assert_eq!(pulls.held_sha256s(), std::slice::from_ref(&pull.sha256));
    assert!(pulls.take_failures().is_empty());
    assert_eq!(
        files_in(dir.path()),
        [
            format!("{}.ext4", pull.sha256),
            format!("{}.ext4.sha256", pull.sha256)
        ]
    );

    // Held now: asking again fetches nothing, and a restart finds it without hashing
    // (its digest cache is current) and keeps it.
    pulls.request(pull.clone());
    assert_eq!(pulls.pull(pull.clone()).await.expect("held"), got);
    assert_eq!(peer_fake.hits().len(), 1);
    let reopened = open(dir.path(), &controller_url);
    assert_eq!(reopened.lookup(&pull.sha256), Some(got));
}

#[tokio::test]
async fn falls_back_to_the_proxy_when_no_peer_serves_the_right_bytes() {
    let image = bytes(100_000, 2);
    let pull = pull_of(&image, Some("images/img_2.ext4"));
    // One peer does not hold it (404), one serves other bytes of the same length, one
    // serves too many bytes, one is not listening at all.
    let missing = serve(Arc::new(Fake::default())).await;
    let wrong = serve(Arc::new(Fake {
        images: [(pull.sha256.clone(), bytes(100_000, 3))].into(),
        ..Fake::default()
    }))
    .await;
    let long = serve(Arc::new(Fake {
        images: [(pull.sha256.clone(), bytes(100_001, 2))].into(),
        ..Fake::default()
    }))
    .await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", l.local_addr().expect("addr"))
    };
    let controller = Arc::new(Fake {
        peers: vec![
            peer("wrk_missing", &missing),
            peer("wrk_wrong", &wrong),
            peer("wrk_long", &long),
            peer("wrk_closed", &closed),
        ],
        objects: [("images/img_2.ext4".to_owned(), image.clone())].into(),
        ..Fake::default()
    });
    let controller_url = serve(Arc::clone(&controller)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pulls = open(dir.path(), &controller_url);

    let got = pulls.pull(pull.clone()).await.expect("pulled");
    assert_eq!(fs::read(&got.path).expect("read"), image);
    assert_eq!(
        controller.hits(),
        [
            format!("peers/{}", pull.sha256),
            "objects/images/img_2.ext4".to_owned()
        ]
    );
    let c = pulls.counters();
    assert_eq!((c.peer_bytes, c.proxy_bytes), (0, image.len() as u64));
    assert!(!files_in(dir.path()).iter().any(|f| f.ends_with(".part")));
}

#[tokio::test]
async fn refuses_wrong_bytes_leaves_nothing_and_reports_the_failure_once() {
    let image = bytes(50_000, 4);
    let pull = pull_of(&image, Some("images/bad.ext4"));
    let controller = Arc::new(Fake {
        // The proxy holds other bytes under the key.
        objects: [("images/bad.ext4".to_owned(), bytes(50_000, 5))].into(),
        ..Fake::default()
    });
    let controller_url = serve(Arc::clone(&controller)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pulls = open(dir.path(), &controller_url);

    let reason = pulls.pull(pull.clone()).await.expect_err("refused");
    assert!(reason.contains("hash to"), "{reason}");
    assert!(
        files_in(dir.path()).is_empty(),
        "{:?}",
        files_in(dir.path())
    );
    assert!(pulls.lookup(&pull.sha256).is_none());
    assert_eq!(pulls.counters().failed, 1);

    // A heartbeat asking again before the failure is reported starts nothing.
    pulls.request(pull.clone());
    assert!(!pulls.is_in_flight(&pull.sha256));
    let failures = pulls.take_failures();
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].sha256, pull.sha256);
    assert!(pulls.take_failures().is_empty(), "reported once");
    assert_eq!(controller.hits().len(), 2, "peers + one object fetch");

    // Once reported, a new request (the image was warmed again) tries again.
    pulls.request(pull.clone());
    assert!(pulls.is_in_flight(&pull.sha256));
}

#[tokio::test]
async fn refuses_short_bodies_bad_digests_and_missing_sources() {
    let image = bytes(10_000, 6);
    let controller = Arc::new(Fake {
        objects: [("images/short.ext4".to_owned(), image[..9_999].to_vec())].into(),
        ..Fake::default()
    });
    let controller_url = serve(Arc::clone(&controller)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pulls = open(dir.path(), &controller_url);

    let short = pull_of(&image, Some("images/short.ext4"));
    let reason = pulls.pull(short).await.expect_err("short");
    assert!(reason.contains("announced 9999 bytes"), "{reason}");
    let no_key = pull_of(&image, None);
    let reason = pulls.pull(no_key).await.expect_err("no source");
    assert!(reason.contains("no object key"), "{reason}");
    let bad_key = pull_of(&image, Some("../etc/passwd"));
    let reason = pulls.pull(bad_key).await.expect_err("bad key");
    assert!(reason.contains("invalid object key"), "{reason}");
    let mut upper = pull_of(&image, Some("images/short.ext4"));
    upper.sha256 = upper.sha256.to_uppercase();
    let reason = pulls.pull(upper).await.expect_err("bad digest");
    assert!(reason.contains("lowercase hex"), "{reason}");
    assert!(files_in(dir.path()).is_empty());

    // Standalone (no controller): nowhere to pull from.
    let alone = Arc::new(Pulls::open(dir.path(), None).expect("open"));
    let reason = alone
        .pull(pull_of(&image, Some("k")))
        .await
        .expect_err("alone");
    assert!(reason.contains("no controller"), "{reason}");
}

#[tokio::test]
async fn callers_share_one_pull_and_at_most_two_run_at_once() {
    let images: Vec<Vec<u8>> = (0..4).map(|i| bytes(20_000, 10 + i)).collect();
    let controller = Arc::new(Fake {
        objects: images
            .iter()
            .enumerate()
            .map(|(i, b)| (format!("images/{i}.ext4"), b.clone()))
            .collect(),
        delay: Duration::from_millis(300),
        ..Fake::default()
    });
    let controller_url = serve(Arc::clone(&controller)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pulls = open(dir.path(), &controller_url);
    let key = |i: usize| format!("images/{i}.ext4");
    let first = pull_of(&images[0], Some(&key(0)));

    // A heartbeat and two creates want the same image at once.
    pulls.request(first.clone());
    assert!(pulls.is_in_flight(&first.sha256));
    let (a, b) = tokio::join!(pulls.pull(first.clone()), pulls.pull(first.clone()));
    assert_eq!(a.expect("a"), b.expect("b"));
    let object_hits = |k: &str| controller.hits().iter().filter(|h| h.ends_with(k)).count();
    assert_eq!(object_hits(&key(0)), 1, "one transfer");

    // Three more images at once: the third waits for a turn.
    let all = (1..4).map(|i| {
        let pulls = Arc::clone(&pulls);
        let p = pull_of(&images[i], Some(&key(i)));
        async move { pulls.pull(p).await }
    });
    let _ = futures_util::future::join_all(all).await;
    for i in 1..4 {
        assert_eq!(object_hits(&key(i)), 1);
    }
    assert_eq!(
        controller.max_active.load(Ordering::SeqCst),
        MAX_CONCURRENT_PULLS
    );
    assert_eq!(pulls.held_sha256s().len(), 4);
}

#[tokio::test]
async fn open_keeps_matching_images_and_deletes_the_rest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = bytes(1000, 20);
    let good_sha = digest(&good);
    fs::write(dir.path().join(format!("{good_sha}.ext4")), &good).expect("w");
    let liar = "0".repeat(64);
    fs::write(
        dir.path().join(format!("{liar}.ext4")),
        b"not what the name says",
    )
    .expect("w");
    fs::write(
        dir.path().join(format!("{}.ext4.part", "1".repeat(64))),
        b"half",
    )
    .expect("w");
    fs::write(dir.path().join("notes.txt"), b"left alone").expect("w");

    let pulls = Pulls::open(dir.path(), None).expect("open");
    assert_eq!(pulls.held_sha256s(), std::slice::from_ref(&good_sha));
    assert_eq!(
        files_in(dir.path()),
        [
            format!("{good_sha}.ext4"),
            format!("{good_sha}.ext4.sha256"),
            "notes.txt".to_owned()
        ]
    );
}

#[tokio::test]
async fn shutdown_stops_a_pull_and_deletes_its_part_file() {
    let image = bytes(10_000, 30);
    let controller = Arc::new(Fake {
        objects: [("images/slow.ext4".to_owned(), image.clone())].into(),
        delay: Duration::from_secs(30),
        ..Fake::default()
    });
    let controller_url = serve(Arc::clone(&controller)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pulls = open(dir.path(), &controller_url);
    let waiter = {
        let pulls = Arc::clone(&pulls);
        let pull = pull_of(&image, Some("images/slow.ext4"));
        tokio::spawn(async move { pulls.pull(pull).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    pulls.shutdown();
    let reason = waiter.await.expect("join").expect_err("cancelled");
    assert!(reason.contains("shutting down"), "{reason}");
    assert!(files_in(dir.path()).is_empty());
}

#[test]
fn validates_digests_and_object_keys() {
    assert!(is_sha256_hex(&"ab".repeat(32)));
    for bad in [
        "",
        "AB".repeat(32).as_str(),
        &"a".repeat(63),
        &"g".repeat(64),
    ] {
        assert!(!is_sha256_hex(bad), "{bad}");
    }
    for ok in ["images/img_1/v=2.ext4", "a"] {
        assert!(is_object_key(ok), "{ok}");
    }
    for bad in ["", "a//b", "../x", "a/.hidden", "a b", "a?b", "/a"] {
        assert!(!is_object_key(bad), "{bad}");
    }
}
