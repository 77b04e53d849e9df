//! The live-state contract, run against both implementations: in-process and a real Redis
//! (`SCAIBUNKER_TEST_REDIS_URL`, default `redis://127.0.0.1:6379`; each test uses its own key
//! prefix and deletes its keys).

use std::sync::Arc;
use std::time::Duration;

use scaibunker_controller::live::{
    InProcess, LiveState, QuotaCharge, RateDecision, RedisLive, Reservation, Stash,
};

fn redis_url() -> String {
    std::env::var("SCAIBUNKER_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

fn unique_prefix() -> String {
    format!(
        "sbtest:{}:",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    )
}

/// Deletes every key under `prefix`.
pub async fn wipe(prefix: &str) {
    let client = redis::Client::open(redis_url()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis reachable");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut conn)
        .await
        .expect("KEYS");
    for k in keys {
        let _: () = redis::cmd("DEL")
            .arg(k)
            .query_async(&mut conn)
            .await
            .expect("DEL");
    }
}

async fn backends() -> Vec<(&'static str, Arc<dyn LiveState>, Option<String>)> {
    let prefix = unique_prefix();
    let redis = RedisLive::connect(&redis_url(), &prefix)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "Redis is not reachable at {} ({e}); start it or set SCAIBUNKER_TEST_REDIS_URL",
                redis_url()
            )
        });
    vec![
        ("in-process", Arc::new(InProcess::default()), None),
        ("redis", Arc::new(redis), Some(prefix)),
    ]
}

#[tokio::test]
async fn a_lease_has_one_holder_until_it_expires() {
    for (name, live, prefix) in backends().await {
        let ttl = Duration::from_millis(300);
        assert!(
            live.try_lease("job:x", "a", ttl).await.expect("lease"),
            "{name}"
        );
        assert!(
            !live.try_lease("job:x", "b", ttl).await.expect("lease"),
            "{name}"
        );
        // The holder may renew; a different lease name is independent.
        assert!(
            live.try_lease("job:x", "a", ttl).await.expect("lease"),
            "{name}"
        );
        assert!(
            live.try_lease("job:y", "b", ttl).await.expect("lease"),
            "{name}"
        );
        tokio::time::sleep(Duration::from_millis(450)).await;
        assert!(
            live.try_lease("job:x", "b", ttl).await.expect("lease"),
            "{name}: expired"
        );
        if let Some(p) = prefix {
            wipe(&p).await;
        }
    }
}

#[tokio::test]
async fn concurrent_lease_attempts_have_exactly_one_winner() {
    for (name, live, prefix) in backends().await {
        let mut tasks = Vec::new();
        for i in 0..20 {
            let live = live.clone();
            tasks.push(tokio::spawn(async move {
                live.try_lease("job:race", &format!("holder-{i}"), Duration::from_secs(5))
                    .await
                    .expect("lease")
            }));
        }
        let mut winners = 0;
        for t in tasks {
            winners += usize::from(t.await.expect("task"));
        }
        assert_eq!(winners, 1, "{name}");
        if let Some(p) = prefix {
            wipe(&p).await;
        }
    }
}

fn one(key: &str, limit: u32) -> Vec<(String, u32)> {
    vec![(key.to_owned(), limit)]
}

#[tokio::test]
async fn a_hit_on_several_windows_counts_in_all_or_none() {
    for (name, live, prefix) in backends().await {
        let window = Duration::from_secs(60);
        let limits = |user: u32| {
            vec![
                ("key:a".to_owned(), 10),
                ("user:u".to_owned(), user),
                ("tenant:t".to_owned(), 10),
            ]
        };
        for _ in 0..2 {
            let hit = live.rate_hit(&limits(2), window).await.expect("hit");
            assert_eq!(hit, RateDecision::Allowed, "{name}");
        }
        // The user's window is full: refused, with a wait within the window …
        match live.rate_hit(&limits(2), window).await.expect("hit") {
            RateDecision::Limited { retry_after } => {
                assert!(retry_after <= window, "{name}: {retry_after:?}")
            }
            RateDecision::Allowed => panic!("{name}: a third hit on a user limited to 2"),
        }
        // … and counted nowhere: the key's and the tenant's windows hold 2 hits, not 3.
        let hit = live.rate_hit(&one("key:a", 3), window).await.expect("hit");
        assert_eq!(
            hit,
            RateDecision::Allowed,
            "{name}: the refused hit was counted"
        );
        let hit = live.rate_hit(&one("key:a", 3), window).await.expect("hit");
        assert!(matches!(hit, RateDecision::Limited { .. }), "{name}");
        let hit = live
            .rate_hit(&one("tenant:t", 3), window)
            .await
            .expect("hit");
        assert_eq!(
            hit,
            RateDecision::Allowed,
            "{name}: the refused hit was counted"
        );
        // A window with no room at all.
        let hit = live
            .rate_hit(&one("key:zero", 0), window)
            .await
            .expect("hit");
        assert!(matches!(hit, RateDecision::Limited { .. }), "{name}");
        if let Some(p) = prefix {
            wipe(&p).await;
        }
    }
}

#[tokio::test]
async fn a_rate_window_admits_its_limit_then_says_when_to_retry() {
    for (name, live, prefix) in backends().await {
        let window = Duration::from_millis(600);
        for i in 0..3 {
            assert_eq!(
                live.rate_hit(&one("key:k", 3), window).await.expect("hit"),
                RateDecision::Allowed,
                "{name} hit {i}"
            );
        }
        match live.rate_hit(&one("key:k", 3), window).await.expect("hit") {
            RateDecision::Limited { retry_after } => {
                assert!(
                    retry_after > Duration::ZERO && retry_after <= window,
                    "{name}: {retry_after:?}"
                )
            }
            RateDecision::Allowed => panic!("{name}: a fourth hit in the window was admitted"),
        }
        // Another key has its own window.
        assert_eq!(
            live.rate_hit(&one("key:other", 3), window)
                .await
                .expect("hit"),
            RateDecision::Allowed
        );
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(
            live.rate_hit(&one("key:k", 3), window).await.expect("hit"),
            RateDecision::Allowed,
            "{name}: the window slid"
        );
        if let Some(p) = prefix {
            wipe(&p).await;
        }
    }
}

#[tokio::test]
async fn heartbeats_are_kept_for_their_ttl_and_read_in_bulk() {
    for (name, live, prefix) in backends().await {
        let ttl = Duration::from_millis(300);
        live.put_heartbeat("wrk_a", 1_000, ttl).await.expect("put");
        live.put_heartbeat("wrk_b", 2_000, ttl).await.expect("put");
        live.put_heartbeat("wrk_a", 3_000, ttl).await.expect("put");
        let ids = vec!["wrk_a".to_owned(), "wrk_b".to_owned(), "wrk_c".to_owned()];
        let got = live.heartbeats(&ids).await.expect("read");
        assert_eq!(got.get("wrk_a"), Some(&3_000), "{name}: the newest wins");
        assert_eq!(got.get("wrk_b"), Some(&2_000), "{name}");
        assert!(!got.contains_key("wrk_c"), "{name}");
        assert!(live.heartbeats(&[]).await.expect("read").is_empty());
        tokio::time::sleep(Duration::from_millis(450)).await;
        assert!(
            live.heartbeats(&ids).await.expect("read").is_empty(),
            "{name}: expired"
        );
        if let Some(p) = prefix {
            wipe(&p).await;
        }
    }
}

fn charge(counter: &str, amount: i64, cap: Option<i64>) -> QuotaCharge {
    QuotaCharge {
        counter: counter.into(),
        amount,
        cap,
    }
}

#[tokio::test]
async fn quota_counters_reserve_atomically_and_release_exactly_once() {
    for (name, live, prefix) in backends().await {
        let cpu = "quota:bucket:user:usr_a:cpu_millicores";
        let n = "quota:bucket:user:usr_a:concurrent_bunkers";
        let group = "quota:bucket:group:grp_g:concurrent_bunkers";
        let counters = vec![cpu.to_owned(), n.to_owned(), group.to_owned()];
        // Missing counters are reported, never silently taken as zero.
        assert_eq!(
            live.quota_counters(&counters).await.expect("read"),
            None,
            "{name}"
        );
        let charges = [
            charge(cpu, 1000, None),
            charge(n, 1, Some(2)),
            charge(group, 1, Some(3)),
        ];
        assert_eq!(
            live.quota_reserve("bnk_a", &charges, 1)
                .await
                .expect("reserve"),
            Reservation::CountersMissing,
            "{name}"
        );
        // A rebuild from the database sets counters and stashes; only the first one applies.
        let rebuilt = [Stash {
            bunker_id: "bnk_old".into(),
            at_ms: 5,
            charges: vec![(n.to_owned(), 1), (group.to_owned(), 1)],
        }];
        assert!(
            live.quota_rebuild(&rebuilt).await.expect("rebuild"),
            "{name}"
        );
        assert!(
            !live.quota_rebuild(&[]).await.expect("rebuild"),
            "{name}: once"
        );
        assert_eq!(
            live.quota_counters(&counters).await.expect("read"),
            Some(vec![0, 1, 1]),
            "{name}"
        );
        assert_eq!(
            live.quota_reserve("bnk_a", &charges, 10)
                .await
                .expect("reserve"),
            Reservation::Reserved,
            "{name}"
        );
        assert_eq!(
            live.quota_reserve("bnk_a", &charges, 10)
                .await
                .expect("reserve"),
            Reservation::AlreadyReserved,
            "{name}: a bunker is charged once"
        );
        // The user's cap of two is full; nothing is incremented, not even the group's.
        assert_eq!(
            live.quota_reserve("bnk_b", &charges, 11)
                .await
                .expect("reserve"),
            Reservation::Exceeded {
                index: 1,
                current: 2
            },
            "{name}"
        );
        assert_eq!(
            live.quota_counters(&counters).await.expect("read"),
            Some(vec![1000, 2, 2]),
            "{name}"
        );
        let mut stashes = live.quota_stashes().await.expect("stashes");
        stashes.sort();
        assert_eq!(
            stashes,
            vec![("bnk_a".to_owned(), 10), ("bnk_old".to_owned(), 5)],
            "{name}"
        );
        assert!(
            live.quota_release("bnk_old").await.expect("release"),
            "{name}"
        );
        assert!(
            !live.quota_release("bnk_old").await.expect("release"),
            "{name}: once"
        );
        assert_eq!(
            live.quota_counters(&counters).await.expect("read"),
            Some(vec![1000, 1, 1]),
            "{name}"
        );
        // Recount repairs nothing when counters match the stashes.
        assert_eq!(live.quota_recount().await.expect("recount"), 0, "{name}");
        // Concurrent releases of one bunker: one applies.
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let live = live.clone();
            tasks.push(tokio::spawn(async move {
                live.quota_release("bnk_a").await.expect("release")
            }));
        }
        let mut applied = 0;
        for t in tasks {
            applied += usize::from(t.await.expect("task"));
        }
        assert_eq!(applied, 1, "{name}");
        assert_eq!(
            live.quota_counters(&counters).await.expect("read"),
            Some(vec![0, 0, 0]),
            "{name}"
        );
        assert!(live.quota_stashes().await.expect("stashes").is_empty());
        if let Some(p) = prefix {
            wipe(&p).await;
        }
    }
}

#[tokio::test]
async fn concurrent_quota_reservations_never_pass_a_cap() {
    for (name, live, prefix) in backends().await {
        assert!(live.quota_rebuild(&[]).await.expect("rebuild"));
        let mut tasks = Vec::new();
        for i in 0..50 {
            let live = live.clone();
            tasks.push(tokio::spawn(async move {
                let c = [charge(
                    "quota:bucket:group:grp_x:memory_mb",
                    512,
                    Some(512 * 7),
                )];
                live.quota_reserve(&format!("bnk_{i}"), &c, 1)
                    .await
                    .expect("reserve")
            }));
        }
        let mut reserved = 0;
        for t in tasks {
            reserved += usize::from(t.await.expect("task") == Reservation::Reserved);
        }
        assert_eq!(reserved, 7, "{name}");
        let c = vec!["quota:bucket:group:grp_x:memory_mb".to_owned()];
        assert_eq!(
            live.quota_counters(&c).await.expect("read"),
            Some(vec![512 * 7])
        );
        if let Some(p) = prefix {
            wipe(&p).await;
        }
    }
}
