//! The image cache's limits: eviction order, what is never evicted, the cap, the free-disk
//! floor (through an injected free-space reading and the real `statvfs`), reservations of
//! pulls in flight. Real files in temporary directories, images served by the fakes.

use std::collections::BTreeSet;
use std::time::SystemTime;

use super::*;

const SIZE: usize = 20_000;

/// The users a test names: what the bunkers registry would report.
#[derive(Default)]
struct Users(Mutex<BTreeSet<String>>);

impl ImageUsers for Users {
    fn images_in_use(&self) -> BTreeSet<String> {
        self.0.lock().expect("lock").clone()
    }
}

impl Users {
    fn set(&self, digests: &[&str]) {
        *self.0.lock().expect("lock") = digests.iter().map(|d| (*d).to_owned()).collect();
    }
}

/// `n` images of [`SIZE`] bytes, served by a fake controller's storage proxy under
/// `images/{i}.ext4`; the pulls naming them; the controller's URL.
async fn serve_images(n: u8, seed: u8, delay: Duration) -> (Vec<ImagePull>, Arc<Fake>, String) {
    let images: Vec<Vec<u8>> = (0..n).map(|i| bytes(SIZE, seed + i)).collect();
    let controller = Arc::new(Fake {
        objects: images
            .iter()
            .enumerate()
            .map(|(i, b)| (format!("images/{i}.ext4"), b.clone()))
            .collect(),
        delay,
        ..Fake::default()
    });
    let url = serve(Arc::clone(&controller)).await;
    let pulls = images
        .iter()
        .enumerate()
        .map(|(i, b)| pull_of(b, Some(&format!("images/{i}.ext4"))))
        .collect();
    (pulls, controller, url)
}

fn limited(pulls: Pulls, limits: CacheLimits, users: &Arc<Users>) -> Arc<Pulls> {
    let pulls = Arc::new(pulls.with_limits(limits));
    let users: Weak<Users> = Arc::downgrade(users);
    pulls.set_users(users);
    pulls
}

fn cap(images: usize) -> CacheLimits {
    CacheLimits {
        cap_bytes: Some((images * SIZE) as u64),
        min_free_bytes: 0,
        grace: Duration::ZERO,
    }
}

fn held(pulls: &Pulls) -> BTreeSet<String> {
    pulls.held_sha256s().into_iter().collect()
}

fn set<'a>(digests: impl IntoIterator<Item = &'a ImagePull>) -> BTreeSet<String> {
    digests.into_iter().map(|p| p.sha256.clone()).collect()
}

fn has_image_files(dir: &Path, sha256: &str) -> (bool, bool) {
    (
        dir.join(format!("{sha256}.ext4")).exists(),
        dir.join(format!("{sha256}.ext4.sha256")).exists(),
    )
}

fn no_part_files(dir: &Path) -> bool {
    !files_in(dir).iter().any(|f| f.ends_with(".part"))
}

/// Writes a valid pulled image into `dir`, as a previous run left it, with this mtime.
fn leave_image(dir: &Path, b: &[u8], mtime: SystemTime) -> String {
    let sha = digest(b);
    let path = dir.join(format!("{sha}.ext4"));
    fs::write(&path, b).expect("write");
    fs::File::options()
        .write(true)
        .open(&path)
        .expect("open")
        .set_modified(mtime)
        .expect("set mtime");
    sha
}

fn mtime(path: &Path) -> SystemTime {
    fs::metadata(path).expect("meta").modified().expect("mtime")
}

#[tokio::test]
async fn evicts_least_recently_used_images_first() {
    let (p, controller, url) = serve_images(5, 40, Duration::ZERO).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let users = Arc::new(Users::default());
    let pulls = limited(open_unshared(dir.path(), &url), cap(3), &users);

    for pull in &p[..3] {
        pulls.pull(pull.clone()).await.expect("fits under the cap");
    }
    // A create looks the first image up: it becomes the most recently used.
    assert!(pulls.lookup(&p[0].sha256).is_some());
    pulls.pull(p[3].clone()).await.expect("room made");
    assert_eq!(held(&pulls), set([&p[0], &p[2], &p[3]]), "the second went");
    assert_eq!(
        has_image_files(dir.path(), &p[1].sha256),
        (false, false),
        "its file and digest sidecar are gone"
    );
    pulls.pull(p[4].clone()).await.expect("room made");
    assert_eq!(held(&pulls), set([&p[0], &p[3], &p[4]]), "then the third");
    assert_eq!(pulls.counters().evicted, 2);
    assert_eq!(pulls.held_bytes(), 3 * SIZE as u64);

    // Serving a peer is not a use: the first image is the least recently used now.
    assert!(pulls.peek(&p[0].sha256).is_some());
    pulls.pull(p[1].clone()).await.expect("room made");
    assert_eq!(held(&pulls), set([&p[1], &p[3], &p[4]]));
    assert!(pulls.lookup(&p[0].sha256).is_none());
    assert_eq!(
        files_in(dir.path()).len(),
        6,
        "three images and their sidecars"
    );
    assert!(pulls.take_failures().is_empty());
    assert_eq!(
        controller
            .hits()
            .iter()
            .filter(|h| h.starts_with("objects/"))
            .count(),
        6
    );
}

#[tokio::test]
async fn images_left_by_a_previous_run_are_evicted_oldest_mtime_first_and_keep_their_mtimes() {
    let (p, _controller, url) = serve_images(1, 50, Duration::ZERO).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let now = SystemTime::now();
    let ago = |s: u64| now - Duration::from_secs(s);
    // Written in an order unlike their mtimes' (and their digests' order is arbitrary).
    let newest = leave_image(dir.path(), &bytes(SIZE, 60), ago(100));
    let oldest = leave_image(dir.path(), &bytes(SIZE, 61), ago(1000));
    let middle = leave_image(dir.path(), &bytes(SIZE, 62), ago(500));
    let users = Arc::new(Users::default());
    let pulls = limited(open_unshared(dir.path(), &url), cap(3), &users);
    let path = |sha: &str| dir.path().join(format!("{sha}.ext4"));
    let before = (mtime(&path(&newest)), mtime(&path(&middle)));

    pulls.pull(p[0].clone()).await.expect("room made");
    let expected: BTreeSet<String> = [newest.clone(), middle.clone(), p[0].sha256.clone()].into();
    assert_eq!(held(&pulls), expected, "the oldest mtime went");
    assert!(!path(&oldest).exists());
    // Uses are kept in memory: the files' mtimes, which key the digest cache, are as they were.
    assert!(pulls.lookup(&newest).is_some());
    assert_eq!((mtime(&path(&newest)), mtime(&path(&middle))), before);
}

#[tokio::test]
async fn never_evicts_an_image_in_use_or_just_used_and_fails_with_the_reason() {
    let (p, controller, url) = serve_images(1, 70, Duration::ZERO).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let in_use = leave_image(dir.path(), &bytes(SIZE, 71), SystemTime::UNIX_EPOCH);
    let recent = leave_image(dir.path(), &bytes(SIZE, 72), SystemTime::UNIX_EPOCH);
    let users = Arc::new(Users::default());
    users.set(&[&in_use]);
    let limits = CacheLimits {
        grace: Duration::from_secs(3600),
        ..cap(2)
    };
    let pulls = limited(open_unshared(dir.path(), &url), limits, &users);
    // A create has just looked this one up.
    assert!(pulls.lookup(&recent).is_some());

    let reason = pulls.pull(p[0].clone()).await.expect_err("no room");
    for part in [
        "no room for the image (20000 bytes)",
        "the cache holds 40000 bytes of its 40000 bytes cap (20000 bytes short under it",
        "20000 bytes in use by bunkers or templates",
        "20000 bytes used in the last 3600 s",
        "0 bytes evictable",
    ] {
        assert!(reason.contains(part), "{part:?} not in {reason}");
    }
    assert_eq!(held(&pulls), [in_use.clone(), recent.clone()].into());
    assert!(no_part_files(dir.path()));
    assert!(
        controller.hits().is_empty(),
        "nothing was transferred: {:?}",
        controller.hits()
    );
    let failures = pulls.take_failures();
    assert_eq!(failures.len(), 1, "reported to the controller");
    assert_eq!(failures[0].reason, reason);
    assert_eq!(pulls.counters().evicted, 0);

    // Once its bunker is gone, the image in use may go; the one just used still stays.
    users.set(&[]);
    pulls.pull(p[0].clone()).await.expect("room made");
    assert_eq!(held(&pulls), [recent, p[0].sha256.clone()].into());
}

#[tokio::test]
async fn refuses_an_image_larger_than_the_whole_cap_without_evicting() {
    let (p, controller, url) = serve_images(1, 80, Duration::ZERO).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let small = leave_image(dir.path(), &bytes(100, 81), SystemTime::UNIX_EPOCH);
    let users = Arc::new(Users::default());
    let limits = CacheLimits {
        cap_bytes: Some(SIZE as u64 - 1),
        ..cap(1)
    };
    let pulls = limited(open_unshared(dir.path(), &url), limits, &users);

    let reason = pulls.pull(p[0].clone()).await.expect_err("too big");
    assert!(
        reason.contains(
            "the image is 20000 bytes, more than the whole image cache cap of 19999 bytes"
        ),
        "{reason}"
    );
    assert_eq!(held(&pulls), [small].into());
    assert!(no_part_files(dir.path()));
    assert!(controller.hits().is_empty());
}

#[tokio::test]
async fn keeps_the_free_disk_floor() {
    let (p, controller, url) = serve_images(5, 90, Duration::ZERO).await;
    let dir = tempfile::tempdir().expect("tempdir");
    // A disk of 75,000 free bytes before any image: what the images and part files take
    // comes off it.
    let free_space: FreeSpace = Arc::new(|dir: &Path| {
        let used: u64 = fs::read_dir(dir)?
            .filter_map(Result::ok)
            .filter(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.ends_with(".ext4") || name.ends_with(".part")
            })
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum();
        Ok(75_000u64.saturating_sub(used))
    });
    let users = Arc::new(Users::default());
    let limits = CacheLimits {
        cap_bytes: None,
        min_free_bytes: 10_000,
        grace: Duration::ZERO,
    };
    let pulls = limited(
        open_unshared(dir.path(), &url).with_free_space(free_space),
        limits,
        &users,
    );

    // 75,000, 55,000 then 35,000 free: each fits with 10,000 to spare.
    for pull in &p[..3] {
        pulls.pull(pull.clone()).await.expect("fits");
    }
    // 15,000 free: the least recently used image goes to keep the floor.
    pulls.pull(p[3].clone()).await.expect("room made");
    assert_eq!(held(&pulls), set([&p[1], &p[2], &p[3]]));

    // Every image in use: nothing can go.
    let in_use: Vec<&str> = p[1..4].iter().map(|p| &p.sha256[..]).collect();
    users.set(&in_use);
    let reason = pulls.pull(p[4].clone()).await.expect_err("no room");
    for part in [
        "the cache holds 60000 bytes (no cap)",
        "60000 bytes in use by bunkers or templates",
        "the disk has 15000 bytes free and keeps 10000 bytes free (15000 bytes short",
    ] {
        assert!(reason.contains(part), "{part:?} not in {reason}");
    }
    assert!(no_part_files(dir.path()));
    assert!(!controller.hits().iter().any(|h| h.contains(&p[4].sha256)));
    assert!(
        !controller.hits().iter().any(|h| h.ends_with("/4.ext4")),
        "{:?}",
        controller.hits()
    );
}

#[tokio::test]
async fn checks_the_real_free_space_with_statvfs() {
    let (p, controller, url) = serve_images(1, 100, Duration::ZERO).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let free = statvfs_free(dir.path()).expect("statvfs");
    assert!(free > 0, "the temp directory's filesystem has room");
    let users = Arc::new(Users::default());

    // A floor above what the disk has free: no pull fits.
    let beyond = CacheLimits {
        cap_bytes: None,
        min_free_bytes: free + (1 << 30),
        grace: Duration::ZERO,
    };
    let pulls = limited(open_unshared(dir.path(), &url), beyond, &users);
    let reason = pulls.pull(p[0].clone()).await.expect_err("over the floor");
    assert!(reason.contains("no room for the image"), "{reason}");
    assert!(
        reason.contains("short; SCAIBUNKER_MIN_FREE_DISK_MB"),
        "{reason}"
    );
    assert!(files_in(dir.path()).is_empty());
    assert!(controller.hits().is_empty());

    // No floor: the image needs only its own size, which the disk has.
    let pulls = limited(open_unshared(dir.path(), &url), cap(1), &users);
    pulls.pull(p[0].clone()).await.expect("fits");
}

#[tokio::test]
async fn pulls_in_flight_reserve_their_bytes_and_are_never_evicted() {
    // Slow transfers, so both pulls have made room before either lands.
    let (p, controller, url) = serve_images(2, 110, Duration::from_millis(500)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let users = Arc::new(Users::default());
    let limits = CacheLimits {
        cap_bytes: Some(SIZE as u64 * 3 / 2),
        ..cap(1)
    };
    let pulls = limited(open_unshared(dir.path(), &url), limits, &users);

    let (a, b) = tokio::join!(pulls.pull(p[0].clone()), pulls.pull(p[1].clone()));
    let (won, lost, reason) = match (a, b) {
        (Ok(_), Err(reason)) => (&p[0], &p[1], reason),
        (Err(reason), Ok(_)) => (&p[1], &p[0], reason),
        other => panic!("exactly one pull fits: {other:?}"),
    };
    assert!(
        reason.contains("pulls in flight reserve 20000 bytes"),
        "{reason}"
    );
    assert_eq!(held(&pulls), set([won]));
    assert!(no_part_files(dir.path()));
    assert!(
        !controller.hits().iter().any(|h| h.contains(&lost.sha256)),
        "the pull that did not fit transferred nothing"
    );
}
