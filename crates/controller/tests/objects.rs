//! The `ObjectStore` contract, run against both backends: a local directory and S3 on a real
//! Garage (`SCAIBUNKER_TEST_GARAGE_BIN`, see `common/garage.rs`; the S3 half fails without it).

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use scaibunker_controller::objects::{ObjectError, Objects, S3Settings};
use sha2::{Digest, Sha256};

mod common;

use common::garage::Garage;

const MIB: usize = 1024 * 1024;
/// `SCAIBUNKER_MAX_OBJECT_BYTES`'s default.
const DEFAULT_CAP: u64 = 32 << 30;

/// A deterministic body of `len` bytes in 64 KiB chunks, and its SHA-256.
fn body(
    len: usize,
    seed: u8,
) -> (
    impl futures_util::Stream<Item = std::io::Result<Bytes>>,
    String,
) {
    let chunk = 64 * 1024;
    let mut hash = Sha256::new();
    let chunks: Vec<Bytes> = (0..len.div_ceil(chunk))
        .map(|i| {
            let n = chunk.min(len - i * chunk);
            let b: Vec<u8> = (0..n)
                .map(|j| ((i * chunk + j) as u8).wrapping_mul(31).wrapping_add(seed))
                .collect();
            hash.update(&b);
            Bytes::from(b)
        })
        .collect();
    (
        futures_util::stream::iter(chunks.into_iter().map(Ok)),
        hex::encode(hash.finalize()),
    )
}

async fn read_all(objects: &Objects, key: &str) -> Vec<u8> {
    let read = objects.get_stream(key).await.expect("get");
    let mut out = Vec::new();
    let mut body = read.body;
    while let Some(chunk) = body.next().await {
        out.extend_from_slice(&chunk.expect("chunk"));
    }
    out
}

async fn put_get_head_delete_list(o: &Objects) {
    let put = o
        .put_bytes("t/a/hello.txt", Bytes::from_static(b"hello"))
        .await
        .expect("put");
    assert_eq!(put.size_bytes, 5);
    assert_eq!(put.sha256, hex::encode(Sha256::digest(b"hello")));
    assert_eq!(read_all(o, "t/a/hello.txt").await, b"hello");
    let head = o.head("t/a/hello.txt").await.expect("head");
    assert_eq!(head.size_bytes, 5);
    assert!(!head.etag.is_empty());
    let read = o.get_stream("t/a/hello.txt").await.expect("get");
    assert_eq!(read.meta, head);

    // Overwrite replaces the whole object.
    o.put_bytes("t/a/hello.txt", Bytes::from_static(b"bye"))
        .await
        .expect("overwrite");
    assert_eq!(read_all(o, "t/a/hello.txt").await, b"bye");

    // A key and a key below it coexist, as on S3; an empty object is an object.
    o.put_bytes("t/a", Bytes::from_static(b"parent"))
        .await
        .expect("put t/a");
    o.put_bytes("t/ab/x", Bytes::new())
        .await
        .expect("put empty");
    assert_eq!(o.head("t/ab/x").await.expect("head").size_bytes, 0);
    assert_eq!(read_all(o, "t/a").await, b"parent");

    // Listing is by prefix, on segment boundaries, sorted.
    let keys = |l: Vec<scaibunker_controller::objects::ObjectEntry>| {
        l.into_iter()
            .map(|e| (e.key, e.size_bytes))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        keys(o.list("t/a/").await.expect("list")),
        vec![("t/a/hello.txt".to_owned(), 3)]
    );
    assert_eq!(
        keys(o.list("t/").await.expect("list")),
        vec![
            ("t/a".to_owned(), 6),
            ("t/a/hello.txt".to_owned(), 3),
            ("t/ab/x".to_owned(), 0),
        ]
    );
    assert!(o.list("nothing/").await.expect("list").is_empty());
    assert!(matches!(
        o.list("t/a").await,
        Err(ObjectError::InvalidKey { .. })
    ));

    o.delete("t/a/hello.txt").await.expect("delete");
    assert!(matches!(
        o.head("t/a/hello.txt").await,
        Err(ObjectError::NotFound(_))
    ));
    // Deleting what is not there succeeds.
    o.delete("t/a/hello.txt").await.expect("delete again");
    assert_eq!(read_all(o, "t/a").await, b"parent");
    o.delete("t/a").await.expect("delete");
    o.delete("t/ab/x").await.expect("delete");
    assert!(o.list("t/").await.expect("list").is_empty());
}

async fn missing_keys_are_not_found(o: &Objects) {
    assert!(matches!(
        o.get_stream("never/written").await,
        Err(ObjectError::NotFound(_))
    ));
    assert!(matches!(
        o.head("never/written").await,
        Err(ObjectError::NotFound(_))
    ));
}

async fn invalid_keys_are_refused(o: &Objects) {
    for key in ["", "/abs", "a/../b", "..", "a//b", "a\0b", ".tmp-x", "a b"] {
        assert!(
            matches!(
                o.put_bytes(key, Bytes::from_static(b"x")).await,
                Err(ObjectError::InvalidKey { .. })
            ),
            "{key:?}"
        );
        assert!(
            matches!(o.get_stream(key).await, Err(ObjectError::InvalidKey { .. })),
            "{key:?}"
        );
    }
}

async fn over_the_cap_or_a_broken_body_stores_nothing(o: &Objects) {
    let (stream, _) = body(100, 1);
    assert!(matches!(
        o.put_stream("cap/x", stream, 99).await,
        Err(ObjectError::TooLarge { max_bytes: 99, .. })
    ));
    assert!(matches!(
        o.head("cap/x").await,
        Err(ObjectError::NotFound(_))
    ));

    // Past a multipart part on S3: the upload is aborted, the old object stays.
    o.put_bytes("cap/y", Bytes::from_static(b"old"))
        .await
        .expect("put");
    let (stream, _) = body(9 * MIB, 2);
    assert!(matches!(
        o.put_stream("cap/y", stream, (9 * MIB - 1) as u64).await,
        Err(ObjectError::TooLarge { .. })
    ));
    // Breaks off after one full 8 MiB part went up (S3: the multipart upload is aborted).
    let (good, _) = body(9 * MIB, 3);
    let broken = good
        .take(140)
        .chain(futures_util::stream::iter([Err(std::io::Error::other(
            "client went away",
        ))]));
    assert!(matches!(
        o.put_stream("cap/y", broken, DEFAULT_CAP).await,
        Err(ObjectError::Body { .. })
    ));
    assert_eq!(read_all(o, "cap/y").await, b"old");
    o.delete("cap/y").await.expect("delete");
}

async fn a_large_object_streams_in_parts_and_back(o: &Objects) {
    let len = 20 * MIB + 12345;
    let (stream, sha) = body(len, 7);
    // With the default cap S3 puts go in 8 MiB parts: this is three.
    let put = o
        .put_stream("big/object.bin", stream, DEFAULT_CAP)
        .await
        .expect("put");
    assert_eq!(put.size_bytes, len as u64);
    assert_eq!(put.sha256, sha);
    assert_eq!(
        o.head("big/object.bin").await.expect("head").size_bytes,
        len as u64
    );
    let read = o.get_stream("big/object.bin").await.expect("get");
    assert_eq!(read.meta.size_bytes, len as u64);
    let mut hash = Sha256::new();
    let mut n = 0;
    read.body
        .try_for_each(|chunk| {
            n += chunk.len();
            hash.update(&chunk);
            futures_util::future::ready(Ok(()))
        })
        .await
        .expect("read");
    assert_eq!(n, len);
    assert_eq!(hex::encode(hash.finalize()), sha);
    o.delete("big/object.bin").await.expect("delete");
}

async fn concurrent_writers_leave_one_whole_object(o: &Objects) {
    let bodies: Vec<Vec<u8>> = (0..6u8).map(|i| vec![i; 100_000 + i as usize]).collect();
    let puts = bodies.iter().map(|b| {
        let o = o.clone();
        let b = Bytes::from(b.clone());
        async move { o.put_bytes("race/key", b).await }
    });
    for r in futures_util::future::join_all(puts).await {
        r.expect("every racing put succeeds");
    }
    let got = read_all(o, "race/key").await;
    assert!(
        bodies.contains(&got),
        "the object is one writer's whole body"
    );
    o.delete("race/key").await.expect("delete");
}

async fn contract(o: &Objects) {
    put_get_head_delete_list(o).await;
    missing_keys_are_not_found(o).await;
    invalid_keys_are_refused(o).await;
    over_the_cap_or_a_broken_body_stores_nothing(o).await;
    a_large_object_streams_in_parts_and_back(o).await;
    concurrent_writers_leave_one_whole_object(o).await;
}

fn local() -> (tempfile::TempDir, Objects) {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("file://{}/objects", dir.path().display());
    let objects = Objects::open(&url, &S3Settings::default()).expect("local store");
    (dir, objects)
}

#[tokio::test]
async fn local_directory_keeps_the_contract() {
    let (dir, o) = local();
    contract(&o).await;
    // Failed and finished puts leave no temporary files behind.
    let mut stack = vec![dir.path().join("objects")];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read dir") {
            let entry = entry.expect("entry");
            let name = entry.file_name().to_string_lossy().into_owned();
            assert!(
                !name.starts_with(".tmp-"),
                "left behind: {name} in {}",
                d.display()
            );
            if entry.file_type().expect("type").is_dir() {
                stack.push(entry.path());
            }
        }
    }
}

#[tokio::test]
async fn s3_on_garage_keeps_the_contract() {
    let garage = Garage::start().await;
    let o = garage.objects();
    contract(&o).await;
    // A body past one part went up as a multipart upload (S3's ETag says how many parts),
    // one smaller as a single PutObject.
    let (stream, _) = body(20 * MIB, 9);
    let put = o
        .put_stream("parts/x", stream, DEFAULT_CAP)
        .await
        .expect("put");
    assert!(put.etag.ends_with("-3"), "etag {}", put.etag);
    let (stream, _) = body(MIB, 9);
    let put = o
        .put_stream("parts/y", stream, DEFAULT_CAP)
        .await
        .expect("put");
    assert!(!put.etag.contains('-'), "etag {}", put.etag);
}

#[tokio::test]
async fn opening_refuses_unknown_schemes_and_incomplete_s3_settings() {
    let s3 = S3Settings::default();
    assert!(Objects::open("ftp://x", &s3).is_err());
    assert!(Objects::open("file://relative/dir", &s3).is_err());
    assert!(Objects::open("s3://bucket", &s3).is_err());
    let https = S3Settings {
        endpoint: Some("https://s3.example.com".into()),
        access_key: Some("k".into()),
        secret_key: Some("s".into()),
        region: None,
    };
    assert!(Objects::open("s3://bucket", &https).is_err());
    let http = S3Settings {
        endpoint: Some("http://127.0.0.1:3900".into()),
        ..https
    };
    assert!(Objects::open("s3://bucket", &http).is_ok());
    assert!(Objects::open("s3://", &http).is_err());
}
