//! Batches of NDJSON lines and their trip to the [`BatchSink`].
//!
//! - [`Batcher`] (pure, no I/O) appends lines and cuts a batch when the next line would pass
//!   `max_bytes`, when it holds `max_lines`, when its oldest line is `flush_interval` old, or
//!   on demand. Each batch knows how many events it stands for (a flow line is one, a gap line
//!   the events it reports), so losing the batch can be reported as a gap of that size.
//! - [`Uploads`] hands cut batches to one uploader task, which puts them in order, retrying
//!   with doubling backoff and a timeout per attempt. The reader never waits for it: a batch
//!   that would take the bytes waiting for the sink past `max_pending_bytes` is dropped on
//!   the spot, and a batch the sink kept refusing is given up; both become a gap line in a
//!   later batch (the reader asks [`Uploads::take_lost`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use bytes::Bytes;
use scaibunker_proto::egress::{EgressLine, object_key};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{BatchLimits, BatchSink, Stats};

/// A cut batch, ready to put.
#[derive(Debug, Clone)]
pub struct Batch {
    pub key: String,
    pub body: Bytes,
    pub lines: usize,
    /// Flow lines plus the events the batch's gap lines report.
    pub events: u64,
}

/// The batch being filled.
pub struct Batcher {
    limits: BatchLimits,
    bunker_id: String,
    worker_pid: u32,
    body: Vec<u8>,
    lines: usize,
    events: u64,
    opened: Option<Instant>,
    /// The last key's time, so two cuts in one microsecond still get two keys.
    last_key_us: u64,
    ready: Vec<Batch>,
}

impl Batcher {
    pub fn new(limits: BatchLimits, bunker_id: String, worker_pid: u32) -> Self {
        Self {
            limits,
            bunker_id,
            worker_pid,
            body: Vec::new(),
            lines: 0,
            events: 0,
            opened: None,
            last_key_us: 0,
            ready: Vec::new(),
        }
    }

    /// Appends `line`, cutting before it if it would not fit and after it if the batch is full.
    pub fn push(&mut self, line: &EgressLine, now: Instant, now_us: u64) {
        let mut text = serde_json::to_vec(line).expect("an egress line always serializes");
        text.push(b'\n');
        if self.lines > 0 && self.body.len() + text.len() > self.limits.max_bytes {
            self.cut(now_us);
        }
        self.body.extend_from_slice(&text);
        self.lines += 1;
        self.events += match line {
            EgressLine::Flow(_) => 1,
            EgressLine::Gap { lost, .. } => *lost,
        };
        self.opened.get_or_insert(now);
        if self.lines >= self.limits.max_lines {
            self.cut(now_us);
        }
    }

    /// When the open batch must be cut (its first line plus the flush interval).
    pub fn deadline(&self) -> Option<Instant> {
        self.opened.map(|t| t + self.limits.flush_interval)
    }

    /// Cuts the open batch if it is due.
    pub fn tick(&mut self, now: Instant, now_us: u64) {
        if self.deadline().is_some_and(|d| d <= now) {
            self.cut(now_us);
        }
    }

    /// Cuts the open batch (nothing if it is empty).
    pub fn cut(&mut self, now_us: u64) {
        if self.lines == 0 {
            return;
        }
        let ts = now_us.max(self.last_key_us + 1);
        self.last_key_us = ts;
        self.ready.push(Batch {
            key: object_key(&self.bunker_id, ts, self.worker_pid),
            body: Bytes::from(std::mem::take(&mut self.body)),
            lines: std::mem::take(&mut self.lines),
            events: std::mem::take(&mut self.events),
        });
        self.opened = None;
    }

    /// The batches cut so far, oldest first.
    pub fn take_ready(&mut self) -> Vec<Batch> {
        std::mem::take(&mut self.ready)
    }
}

/// The queue to the uploader task.
pub struct Uploads {
    tx: mpsc::UnboundedSender<Batch>,
    pending_bytes: Arc<AtomicUsize>,
    max_pending_bytes: usize,
    lost: Arc<AtomicU64>,
}

impl Uploads {
    /// Starts the uploader; it ends once this is dropped and the queue is empty.
    pub fn start(
        sink: Arc<dyn BatchSink>,
        limits: BatchLimits,
        stats: Arc<Stats>,
    ) -> (Self, JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let pending_bytes = Arc::new(AtomicUsize::new(0));
        let lost = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(upload(
            rx,
            sink,
            limits,
            stats,
            Arc::clone(&pending_bytes),
            Arc::clone(&lost),
        ));
        (
            Self {
                tx,
                pending_bytes,
                max_pending_bytes: limits.max_pending_bytes,
                lost,
            },
            task,
        )
    }

    /// Queues `batch`, or gives it back when the sink is too far behind.
    pub fn send(&self, batch: Batch) -> Result<(), Batch> {
        let len = batch.body.len();
        let admitted =
            self.pending_bytes
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |pending| {
                    (pending + len <= self.max_pending_bytes).then_some(pending + len)
                });
        if admitted.is_err() {
            return Err(batch);
        }
        self.tx.send(batch).map_err(|e| {
            self.pending_bytes.fetch_sub(len, Ordering::AcqRel);
            e.0
        })
    }

    /// Events in batches the sink refused for good since the last call.
    pub fn take_lost(&self) -> u64 {
        self.lost.swap(0, Ordering::AcqRel)
    }
}

async fn upload(
    mut rx: mpsc::UnboundedReceiver<Batch>,
    sink: Arc<dyn BatchSink>,
    limits: BatchLimits,
    stats: Arc<Stats>,
    pending_bytes: Arc<AtomicUsize>,
    lost: Arc<AtomicU64>,
) {
    while let Some(batch) = rx.recv().await {
        let stored = put_with_retries(sink.as_ref(), &batch, &limits, &stats).await;
        pending_bytes.fetch_sub(batch.body.len(), Ordering::AcqRel);
        if stored {
            stats.batches_put.fetch_add(1, Ordering::Relaxed);
            stats
                .lines_put
                .fetch_add(batch.lines as u64, Ordering::Relaxed);
        } else {
            stats.batches_failed.fetch_add(1, Ordering::Relaxed);
            lost.fetch_add(batch.events, Ordering::AcqRel);
            tracing::error!(
                key = %batch.key,
                lines = batch.lines,
                attempts = limits.put_attempts,
                "egress audit batch given up"
            );
        }
    }
}

async fn put_with_retries(
    sink: &dyn BatchSink,
    batch: &Batch,
    limits: &BatchLimits,
    stats: &Stats,
) -> bool {
    let attempts = limits.put_attempts.max(1);
    let mut backoff = limits.put_backoff;
    for attempt in 1..=attempts {
        match tokio::time::timeout(
            limits.put_timeout,
            sink.put(batch.key.clone(), batch.body.clone()),
        )
        .await
        {
            Ok(Ok(())) => return true,
            Ok(Err(e)) => {
                tracing::warn!(key = %batch.key, attempt, error = %e, "put an egress audit batch")
            }
            Err(_) => tracing::warn!(
                key = %batch.key,
                attempt,
                timeout_ms = limits.put_timeout.as_millis() as u64,
                "put an egress audit batch: timed out"
            ),
        }
        if attempt < attempts {
            stats.put_retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(backoff).await;
            backoff = backoff.saturating_mul(2);
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use futures_util::future::BoxFuture;
    use scaibunker_proto::egress::{EgressFlow, Verdict};

    use super::*;
    use crate::network::audit::PutBatchError;

    fn limits() -> BatchLimits {
        BatchLimits {
            put_backoff: Duration::from_millis(1),
            put_timeout: Duration::from_secs(5),
            ..BatchLimits::default()
        }
    }

    fn flow(port: u16) -> EgressLine {
        EgressLine::Flow(EgressFlow {
            v: 1,
            bunker_id: "bnk_a".into(),
            tenant_id: "ten_a".into(),
            proto: "tcp".into(),
            dst_ip: "198.18.0.10".into(),
            dst_port: Some(port),
            dns_name: None,
            sni: None,
            ts_start_us: 1,
            ts_end_us: 2,
            bytes_out: 3,
            bytes_in: 4,
            pkts_out: 5,
            pkts_in: 6,
            verdict: Verdict::Allowed,
        })
    }

    fn lines_of(batch: &Batch) -> Vec<EgressLine> {
        std::str::from_utf8(&batch.body)
            .expect("utf-8 ndjson")
            .lines()
            .map(|l| serde_json::from_str(l).expect("a valid egress line"))
            .collect()
    }

    #[test]
    fn cuts_at_the_line_limit_and_keys_sort_by_cut_time() {
        let mut b = Batcher::new(
            BatchLimits {
                max_lines: 2,
                ..limits()
            },
            "bnk_a".into(),
            42,
        );
        let now = Instant::now();
        for port in 1..=5 {
            b.push(&flow(port), now, 1_000);
        }
        let cut = b.take_ready();
        assert_eq!(cut.iter().map(|c| c.lines).collect::<Vec<_>>(), [2, 2]);
        assert_eq!(
            cut[0].key,
            "scaibunker/audit/bnk_a/0000000000001000-42.ndjson"
        );
        assert!(
            cut[0].key < cut[1].key,
            "same microsecond, distinct ordered keys"
        );
        assert_eq!(lines_of(&cut[1]), [flow(3), flow(4)]);
        b.cut(2_000);
        assert_eq!(lines_of(&b.take_ready()[0]), [flow(5)]);
        b.cut(3_000);
        assert!(b.take_ready().is_empty(), "an empty batch is never cut");
    }

    #[test]
    fn a_batch_never_passes_the_byte_limit() {
        let one = serde_json::to_vec(&flow(1)).expect("serialize").len() + 1;
        let mut b = Batcher::new(
            BatchLimits {
                max_bytes: one * 3 + one / 2,
                ..limits()
            },
            "bnk_a".into(),
            1,
        );
        let now = Instant::now();
        for port in 1..=7 {
            b.push(&flow(port), now, 10);
        }
        b.cut(20);
        let cut = b.take_ready();
        assert_eq!(cut.iter().map(|c| c.lines).collect::<Vec<_>>(), [3, 3, 1]);
        assert!(cut.iter().all(|c| c.body.len() <= one * 3 + one / 2));
    }

    #[test]
    fn is_due_one_interval_after_its_first_line() {
        let mut b = Batcher::new(limits(), "bnk_a".into(), 1);
        let t0 = Instant::now();
        assert_eq!(b.deadline(), None);
        b.push(&flow(1), t0, 1);
        b.push(&flow(2), t0 + Duration::from_secs(5), 2);
        assert_eq!(b.deadline(), Some(t0 + Duration::from_secs(10)));
        b.tick(t0 + Duration::from_secs(9), 3);
        assert!(b.take_ready().is_empty());
        b.tick(t0 + Duration::from_secs(10), 4);
        assert_eq!(b.take_ready()[0].lines, 2);
        assert_eq!(b.deadline(), None);
    }

    #[test]
    fn a_batch_counts_the_events_its_gap_lines_report() {
        let mut b = Batcher::new(limits(), "bnk_a".into(), 1);
        b.push(&flow(1), Instant::now(), 1);
        b.push(&EgressLine::Gap { lost: 7, ts_us: 1 }, Instant::now(), 1);
        b.cut(2);
        assert_eq!(b.take_ready()[0].events, 8);
    }

    /// A sink that fails its first `failures` puts, or blocks until released.
    struct FlakySink {
        failures: Mutex<u32>,
        gate: Option<tokio::sync::Semaphore>,
        stored: Mutex<Vec<String>>,
    }

    impl BatchSink for FlakySink {
        fn put(&self, key: String, _body: Bytes) -> BoxFuture<'_, Result<(), PutBatchError>> {
            Box::pin(async move {
                if let Some(gate) = &self.gate {
                    gate.acquire()
                        .await
                        .expect("the gate is never closed")
                        .forget();
                }
                let mut failures = self.failures.lock().expect("lock (not poisoned)");
                if *failures > 0 {
                    *failures -= 1;
                    return Err(PutBatchError::Sink("refused".into()));
                }
                self.stored.lock().expect("lock (not poisoned)").push(key);
                Ok(())
            })
        }
    }

    fn batch(key: &str, bytes: usize, events: u64) -> Batch {
        Batch {
            key: key.into(),
            body: Bytes::from(vec![b'x'; bytes]),
            lines: events as usize,
            events,
        }
    }

    #[tokio::test]
    async fn retries_then_gives_up_and_reports_the_loss() {
        let sink = Arc::new(FlakySink {
            failures: Mutex::new(5),
            gate: None,
            stored: Mutex::default(),
        });
        let stats = Arc::new(Stats::default());
        let limits = BatchLimits {
            put_attempts: 3,
            ..limits()
        };
        let (uploads, task) = Uploads::start(sink.clone(), limits, Arc::clone(&stats));
        uploads.send(batch("a", 10, 4)).expect("queue the batch"); // fails 3 times: given up
        uploads.send(batch("b", 10, 1)).expect("queue the batch"); // fails twice, then stored
        let lost = Arc::clone(&uploads.lost);
        drop(uploads);
        task.await.expect("the uploader ends cleanly");
        assert_eq!(*sink.stored.lock().expect("lock (not poisoned)"), ["b"]);
        assert_eq!(lost.load(Ordering::Acquire), 4);
        let c = stats.counters();
        assert_eq!((c.batches_put, c.batches_failed, c.put_retries), (1, 1, 4));
    }

    #[tokio::test]
    async fn a_stalled_sink_bounds_the_pending_bytes_and_never_blocks_the_sender() {
        let sink = Arc::new(FlakySink {
            failures: Mutex::new(0),
            gate: Some(tokio::sync::Semaphore::new(0)),
            stored: Mutex::default(),
        });
        let limits = BatchLimits {
            max_pending_bytes: 100,
            ..limits()
        };
        let (uploads, task) = Uploads::start(sink.clone(), limits, Arc::new(Stats::default()));
        uploads.send(batch("a", 60, 1)).expect("queue the batch");
        uploads.send(batch("b", 40, 1)).expect("queue the batch");
        let refused = uploads
            .send(batch("c", 1, 9))
            .expect_err("past max_pending_bytes");
        assert_eq!(
            refused.events, 9,
            "the caller gets the batch back to count as a gap"
        );
        sink.gate
            .as_ref()
            .expect("this sink has a gate")
            .add_permits(2);
        // Once the sink has taken both, room is back.
        for _ in 0..1000 {
            if uploads.pending_bytes.load(Ordering::Acquire) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        sink.gate
            .as_ref()
            .expect("this sink has a gate")
            .add_permits(1);
        uploads.send(batch("d", 100, 1)).expect("queue the batch");
        drop(uploads);
        task.await.expect("the uploader ends cleanly");
        assert_eq!(
            *sink.stored.lock().expect("lock (not poisoned)"),
            ["a", "b", "d"]
        );
    }
}
