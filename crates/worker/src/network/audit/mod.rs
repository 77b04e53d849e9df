//! The egress audit of one bunker: conntrack DESTROY events and NFLOG denials read in the
//! bunker's network namespace, turned into NDJSON lines (`scaibunker_proto::egress`) and
//! written in batches through a [`BatchSink`] (NETWORK.md §2.5).
//!
//! Protocol:
//! 1. [`Audit::start`] enters the netns on a helper thread, sets `nf_conntrack_acct`,
//!    `_timestamp` and `_events` there, and opens three netlink sockets there ([`netns`]):
//!    DESTROY events, the [`DENY_LOG_GROUP`] NFLOG group, and one for requests. Call it after
//!    the bunker's nft table exists and before the guest runs: accounting applies to entries
//!    created afterwards.
//! 2. One reader task waits on both sockets. A DESTROY whose original source is the guest
//!    ([`GUEST_ADDR`]) and whose destination is not the resolver ([`RESOLVER_ADDR`]) becomes
//!    an `allowed` line: counters ORIG = out, REPLY = in; start/stop from the entry's
//!    timestamps (falling back to the time the event was read); `dns_name` from
//!    [`NameLookup`]. A packet logged to the deny group from the guest becomes a `denied`
//!    line (no bytes, start = end = now). Every packet on that group is a denial: the group is
//!    the bunker's own, used by no other rule.
//! 3. Losses are lines too: a socket reporting `ENOBUFS` (the kernel could not queue an
//!    event) yields a `gap` whose `lost` is the socket's kernel drop count since the last
//!    gap (at least 1). A congested socket says ENOBUFS once while the kernel may go on
//!    dropping, so the counts are read again once it is drained, at every tick and at finish.
//!    A batch dropped because the sink is too far behind, or given up after its retries,
//!    yields a `gap` of the events it held, in a later batch.
//! 4. Lines go to a [`batch::Batcher`], cut at [`BatchLimits`], and from there to one uploader
//!    task ([`batch::Uploads`]), keyed `scaibunker/audit/{bunker_id}/{ts_us}-{pid}.ndjson`.
//! 5. [`AuditHandle::finish`] (the guest has stopped): read what the sockets hold, then dump
//!    the conntrack table and record the guest's entries still in it (closed flows waiting
//!    out TIME_WAIT, flows cut by the stop) with the dump time as their end, skipping any
//!    DESTROY read afterwards for an entry already dumped (by conntrack id); cut the last
//!    batch, wait for the uploader, stop. Without the dump, those flows would vanish with
//!    the netns.
//!
//! What this relies on and what it cannot see:
//! - bytes are conntrack's: whole IP packets, headers included;
//! - a flow's end is when the kernel destroyed the entry (after TIME_WAIT and its clean-up
//!   pass, up to about a minute late), or the dump at finish;
//! - the bunker's rules must drop packets from `gst0` whose source is not the guest: a
//!   spoofed-source flow is not the guest's by address, so it is not recorded here;
//! - an nft `ct event set` on the guest's flows must include `destroy`;
//! - the resolver's upstream queries leave from the host netns and are not egress lines.
//!
//! Netlink parsing is a small bounds-checked TLV reader of our own ([`netlink`]); why not
//! `netlink-packet-netfilter` is said there.

mod batch;
mod conntrack;
pub(crate) mod netlink;
mod netns;
mod nflog;
mod storage;

use std::collections::HashSet;
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use rustix::net::RecvFlags;
use scaibunker_proto::egress::{EGRESS_LINE_VERSION, EgressFlow, EgressLine, Verdict};
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use self::batch::{Batcher, Uploads};
use self::conntrack::CtFlow;
use self::netlink::{NLMSG_DONE, NLMSG_ERROR, NLMSG_OVERRUN, messages};
use self::netns::{DropTable, Overruns};
pub use self::storage::StorageSink;

/// The NFLOG group the bunker's forward chain logs refused flows to (`log group 1`).
pub const DENY_LOG_GROUP: u16 = 1;
/// The `log prefix` of those rules.
pub const DENY_LOG_PREFIX: &str = "deny";
/// The guest's address, the same in every bunker.
pub const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 2);
/// The bunker's gateway and resolver (`gst0`); flows to it are DNS, not egress.
pub const RESOLVER_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 1);

/// Largest netlink datagram read: events are well under 1 KiB, a dump part under 16 KiB.
const RECV_BUFFER: usize = 64 * 1024;
/// Datagrams read from one socket before the reader looks at the other one and the clock.
const READS_PER_TURN: usize = 64;
/// Datagrams read from one socket at finish, at most.
const FINAL_READS: usize = 1 << 16;
/// How long the final dump may take.
const DUMP_TIMEOUT: Duration = Duration::from_secs(5);

/// Whose flows these are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditContext {
    pub bunker_id: String,
    pub tenant_id: String,
}

/// The resolver's memory of which name it answered with an address, and the SNI/Host
/// peek's of which name a flow asked for.
pub trait NameLookup: Send + Sync {
    fn name_of(&self, ip: Ipv4Addr) -> Option<String>;
    /// What the SNI/Host peek made of the guest's flow from `src_port` to `dst:dst_port`,
    /// taken: each flow has one line.
    fn take_peeked(&self, _src_port: u16, _dst: Ipv4Addr, _dst_port: u16) -> Option<PeekVerdict> {
        None
    }
}

/// Where a name-filtered bunker's resolver reports the names it refused (NXDOMAIN by
/// policy), each one a `denied` line with `proto: "dns"` and the name. Bounded: a name that
/// does not fit is counted in the next gap line, never blocks the resolver.
#[derive(Debug, Clone)]
pub struct DeniedNames {
    tx: mpsc::Sender<String>,
    dropped: Arc<AtomicU64>,
}

/// Refused names waiting for the audit's reader.
const DENIED_NAMES_QUEUE: usize = 256;

impl DeniedNames {
    pub fn report(&self, name: &str) {
        if self.tx.try_send(name.to_owned()).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A flow the SNI/Host peek looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeekVerdict {
    /// The name it asked for (TLS SNI or HTTP `Host`), if it named one.
    pub sni: Option<String>,
    /// Reset by the peek: the line says `denied`.
    pub refused: bool,
}

/// Where batches go (the storage proxy in production).
pub trait BatchSink: Send + Sync {
    fn put(&self, key: String, body: Bytes) -> BoxFuture<'_, Result<(), PutBatchError>>;
}

#[derive(Debug, thiserror::Error)]
pub enum PutBatchError {
    #[error("put through the storage proxy")]
    Storage(#[from] crate::snapshots::SnapshotError),
    /// From another sink (tests, or a future one).
    #[error("{0}")]
    Sink(String),
}

/// When batches are cut, and how hard a put is tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    pub flush_interval: Duration,
    pub max_lines: usize,
    pub max_bytes: usize,
    /// Cut batches waiting for the sink, at most; past it a batch is dropped for a gap line.
    pub max_pending_bytes: usize,
    /// Tries per batch, the first included.
    pub put_attempts: u32,
    /// Wait before the second try; doubled for each later one.
    pub put_backoff: Duration,
    pub put_timeout: Duration,
    /// The kernel receive buffer of each audit socket (events queued while the reader is
    /// busy); past it the kernel drops events, which become gap lines.
    pub recv_buffer_bytes: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        Self {
            flush_interval: Duration::from_secs(10),
            max_lines: 5_000,
            max_bytes: 4 << 20,
            // Two full batches: one being put, one waiting.
            max_pending_bytes: 8 << 20,
            put_attempts: 4,
            put_backoff: Duration::from_millis(500),
            put_timeout: Duration::from_secs(30),
            // About 2,000 DESTROY events of headroom.
            recv_buffer_bytes: 2 << 20,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("start the netns helper thread")]
    Thread(#[source] std::io::Error),
    #[error("the netns helper thread panicked")]
    ThreadPanicked,
    #[error("enter the bunker's network namespace")]
    EnterNetns(#[source] std::io::Error),
    #[error("set {name} in the bunker's network namespace")]
    Sysctl {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{step} the {socket} socket")]
    Socket {
        socket: &'static str,
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("bind nflog group {group} (taken by another listener in this netns?)")]
    NflogBind {
        group: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("register the {socket} socket with the runtime")]
    Register {
        socket: &'static str,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum FinishAuditError {
    #[error("the audit reader task failed")]
    Task(#[from] tokio::task::JoinError),
}

/// Counters of one audit (metric-ready, monotonic).
#[derive(Debug, Default)]
pub(crate) struct Stats {
    allowed: AtomicU64,
    denied: AtomicU64,
    lost: AtomicU64,
    batches_put: AtomicU64,
    lines_put: AtomicU64,
    batches_failed: AtomicU64,
    batches_dropped: AtomicU64,
    put_retries: AtomicU64,
    malformed: AtomicU64,
}

/// A reading of [`Stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuditCounters {
    /// `allowed` lines made.
    pub allowed: u64,
    /// `denied` lines made.
    pub denied: u64,
    /// Events reported lost in gap lines (kernel overruns, dropped and failed batches).
    pub lost: u64,
    pub batches_put: u64,
    pub lines_put: u64,
    /// Batches given up after every retry.
    pub batches_failed: u64,
    /// Batches dropped because the sink was too far behind.
    pub batches_dropped: u64,
    pub put_retries: u64,
    /// Datagrams that could not be walked to their end.
    pub malformed: u64,
}

impl Stats {
    pub fn counters(&self) -> AuditCounters {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        AuditCounters {
            allowed: r(&self.allowed),
            denied: r(&self.denied),
            lost: r(&self.lost),
            batches_put: r(&self.batches_put),
            lines_put: r(&self.lines_put),
            batches_failed: r(&self.batches_failed),
            batches_dropped: r(&self.batches_dropped),
            put_retries: r(&self.put_retries),
            malformed: r(&self.malformed),
        }
    }
}

/// The audit of one bunker.
pub struct Audit;

impl Audit {
    /// Opens the audit's sockets in `netns` and starts reading (step 1 of the module doc).
    /// Runs a few syscalls on a helper thread and waits for them (no network I/O); must be
    /// called within a tokio runtime.
    pub fn start(
        netns: &File,
        ctx: AuditContext,
        names: Arc<dyn NameLookup>,
        sink: Arc<dyn BatchSink>,
        limits: BatchLimits,
    ) -> Result<AuditHandle, AuditError> {
        let sockets = netns::open(netns, DENY_LOG_GROUP, limits.recv_buffer_bytes)?;
        let mut drops = sockets.drops;
        let event_overruns = Overruns::new(&sockets.events, &mut drops);
        let log_overruns = Overruns::new(&sockets.log, &mut drops);
        let query_overruns = Overruns::new(&sockets.query, &mut drops);
        let events = register(sockets.events, "conntrack events")?;
        let log = register(sockets.log, "nflog")?;
        let query = register(sockets.query, "conntrack query")?;

        let stats = Arc::new(Stats::default());
        let (uploads, uploader) = Uploads::start(sink, limits, Arc::clone(&stats));
        let recorder = Recorder {
            batcher: Batcher::new(limits, ctx.bunker_id.clone(), std::process::id()),
            flush_interval: limits.flush_interval,
            ctx,
            names,
            uploads,
            stats: Arc::clone(&stats),
            unreported: 0,
            dumped: None,
        };
        let reader = Reader {
            events,
            log,
            query,
            state: ReadState {
                recorder,
                drops,
                event_overruns,
                log_overruns,
                query_overruns,
                recount: false,
                buf: vec![0; RECV_BUFFER],
            },
        };
        let (stop, stopped) = oneshot::channel();
        let (tx, names_rx) = mpsc::channel(DENIED_NAMES_QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let denied_names = DeniedNames {
            tx,
            dropped: Arc::clone(&dropped),
        };
        let task = tokio::spawn(reader.run(stopped, uploader, names_rx, dropped));
        Ok(AuditHandle {
            stop: Some(stop),
            task: Some(task),
            stats,
            denied_names,
        })
    }
}

/// A running audit. Dropping it without [`finish`](Self::finish) stops reading at once
/// (batches already cut are still put).
pub struct AuditHandle {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    stats: Arc<Stats>,
    denied_names: DeniedNames,
}

impl AuditHandle {
    /// Where the bunker's resolver reports the names it refuses.
    pub fn denied_names(&self) -> DeniedNames {
        self.denied_names.clone()
    }

    pub fn counters(&self) -> AuditCounters {
        self.stats.counters()
    }

    /// The bunker stopped: records what is left (step 5), puts the last batches, stops.
    /// Bounded: the dump by a few seconds, the puts by their attempts, timeouts and backoff
    /// (about two minutes with the defaults and a sink that never answers).
    pub async fn finish(mut self) -> Result<AuditCounters, FinishAuditError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await?;
        }
        Ok(self.stats.counters())
    }
}

impl Drop for AuditHandle {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Which socket a datagram came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Events,
    Log,
    Query,
}

struct Reader {
    events: AsyncFd<OwnedFd>,
    log: AsyncFd<OwnedFd>,
    query: AsyncFd<OwnedFd>,
    state: ReadState,
}

struct ReadState {
    recorder: Recorder,
    drops: DropTable,
    event_overruns: Overruns,
    log_overruns: Overruns,
    query_overruns: Overruns,
    /// An overrun was reported since the drop counts were last read: a congested socket
    /// says ENOBUFS once, while the kernel may go on dropping until it is drained.
    recount: bool,
    buf: Vec<u8>,
}

impl Reader {
    async fn run(
        self,
        mut stopped: oneshot::Receiver<()>,
        uploader: JoinHandle<()>,
        mut names: mpsc::Receiver<String>,
        names_dropped: Arc<AtomicU64>,
    ) {
        let Reader {
            events,
            log,
            query,
            mut state,
        } = self;
        loop {
            let tick = state.recorder.next_tick();
            tokio::select! {
                _ = &mut stopped => break,
                ready = events.readable() => match ready {
                    Ok(mut guard) => state.read_ready(Source::Events, &mut guard),
                    Err(e) => {
                        tracing::error!(error = %e, "wait on the conntrack event socket");
                        break;
                    }
                },
                ready = log.readable() => match ready {
                    Ok(mut guard) => state.read_ready(Source::Log, &mut guard),
                    Err(e) => {
                        tracing::error!(error = %e, "wait on the nflog socket");
                        break;
                    }
                },
                Some(name) = names.recv() => state.recorder.denied_name(&name),
                _ = tokio::time::sleep_until(tick.into()) => {
                    state.count_drops();
                    state.recorder.unreported += names_dropped.swap(0, Ordering::Relaxed);
                    state.recorder.tick();
                }
            }
        }
        while let Ok(name) = names.try_recv() {
            state.recorder.denied_name(&name);
        }
        state.recorder.unreported += names_dropped.swap(0, Ordering::Relaxed);
        // The bunker stopped (or a socket broke): what is left, then the table.
        state.read_now(Source::Events, events.get_ref());
        state.read_now(Source::Log, log.get_ref());
        state.dump(&query).await;
        state.read_now(Source::Events, events.get_ref());
        state.read_now(Source::Log, log.get_ref());
        state.count_drops();
        state.recorder.finish();
        drop(state);
        if let Err(e) = uploader.await {
            tracing::error!(error = %e, "the egress audit uploader failed");
        }
    }
}

impl ReadState {
    /// Reads what a ready socket holds (a bounded number of datagrams per turn).
    fn read_ready(
        &mut self,
        source: Source,
        guard: &mut tokio::io::unix::AsyncFdReadyGuard<'_, OwnedFd>,
    ) {
        for _ in 0..READS_PER_TURN {
            let buf = &mut self.buf;
            match guard.try_io(|fd| recv(fd.get_ref(), buf)) {
                Ok(Ok(n)) => self.datagram(source, n),
                Ok(Err(e)) => {
                    if !self.recv_failed(source, &e) {
                        // Wait for the next readiness rather than spin on the error.
                        guard.clear_ready();
                        return;
                    }
                }
                Err(_would_block) => {
                    if self.recount {
                        self.count_drops();
                    }
                    return;
                }
            }
        }
    }

    /// Reports what the kernel dropped on any socket since the last count.
    fn count_drops(&mut self) {
        self.recount = false;
        for source in [Source::Events, Source::Log, Source::Query] {
            self.overrun(source, false);
        }
    }

    /// Reads what a socket holds now, without waiting (bounded, should the guest still be
    /// sending).
    fn read_now(&mut self, source: Source, fd: &OwnedFd) {
        for _ in 0..FINAL_READS {
            match recv(fd, &mut self.buf) {
                Ok(n) => self.datagram(source, n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    if !self.recv_failed(source, &e) {
                        return;
                    }
                }
            }
        }
    }

    /// Handles a failed read; true if reading may go on.
    fn recv_failed(&mut self, source: Source, e: &std::io::Error) -> bool {
        if e.raw_os_error() == Some(rustix::io::Errno::NOBUFS.raw_os_error()) {
            self.overrun(source, true);
            self.recount = true;
            return true;
        }
        if e.kind() == std::io::ErrorKind::Interrupted {
            return true;
        }
        tracing::warn!(?source, error = %e, "read an egress audit socket");
        false
    }

    fn overrun(&mut self, source: Source, reported: bool) {
        let lost = match source {
            Source::Events => self.event_overruns.take(&mut self.drops, reported),
            Source::Log => self.log_overruns.take(&mut self.drops, reported),
            Source::Query => self.query_overruns.take(&mut self.drops, reported),
        };
        if lost > 0 {
            self.recorder.gap(lost);
        }
    }

    fn datagram(&mut self, source: Source, n: usize) {
        let buf = std::mem::take(&mut self.buf);
        self.walk(source, buf.get(..n));
        self.buf = buf;
    }

    /// `None`: longer than the buffer (MSG_TRUNC), the rest is gone.
    fn walk(&mut self, source: Source, datagram: Option<&[u8]>) {
        let Some(datagram) = datagram else {
            self.recorder
                .stats
                .malformed
                .fetch_add(1, Ordering::Relaxed);
            return;
        };
        for message in messages(datagram) {
            let message = match message {
                Ok(m) => m,
                Err(e) => {
                    self.recorder
                        .stats
                        .malformed
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(?source, error = %e, "a malformed netlink datagram");
                    break;
                }
            };
            match (source, message.kind) {
                (_, NLMSG_OVERRUN) => self.overrun(source, true),
                (Source::Events | Source::Query, _) => {
                    if let Some(flow) = conntrack::parse(&message) {
                        self.recorder.flow(&flow);
                    }
                }
                (Source::Log, _) => {
                    if let Some(denied) = nflog::parse(&message) {
                        self.recorder.denied(&denied);
                    }
                }
            }
        }
    }

    /// Records the guest's entries still in the conntrack table (step 5).
    async fn dump(&mut self, query: &AsyncFd<OwnedFd>) {
        const SEQ: u32 = 1;
        self.recorder.dumped = Some(HashSet::new());
        if let Err(e) = rustix::net::send(
            query.get_ref(),
            &conntrack::dump_request(SEQ),
            rustix::net::SendFlags::empty(),
        ) {
            tracing::warn!(error = %e, "request the conntrack table: open flows go unrecorded");
            return;
        }
        let read = async {
            loop {
                let mut guard = query.readable().await?;
                loop {
                    let buf = &mut self.buf;
                    let n = match guard.try_io(|fd| recv(fd.get_ref(), buf)) {
                        Ok(r) => r?,
                        Err(_would_block) => break,
                    };
                    let mut done = false;
                    for message in messages(&self.buf[..n]).flatten() {
                        if message.kind == NLMSG_DONE && message.seq == SEQ {
                            done = true;
                        } else if message.kind == NLMSG_ERROR && message.seq == SEQ {
                            let code = message.error_code().unwrap_or(0);
                            if code != 0 {
                                return Err(std::io::Error::from_raw_os_error(-code));
                            }
                        }
                    }
                    self.datagram(Source::Query, n);
                    if done {
                        return Ok::<(), std::io::Error>(());
                    }
                }
            }
        };
        match tokio::time::timeout(DUMP_TIMEOUT, read).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "dump the conntrack table"),
            Err(_) => tracing::warn!("dump the conntrack table: timed out"),
        }
    }
}

/// Hands a socket to the runtime's reactor (read readiness only: sends are one-shot).
#[allow(unsafe_code)]
fn register(fd: OwnedFd, socket: &'static str) -> Result<AsyncFd<OwnedFd>, AuditError> {
    // SAFETY: the `AsyncFd` owns the `OwnedFd`, which keeps its descriptor open and the
    // same until both are dropped together; nothing else closes or replaces it.
    unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }.map_err(|e| {
        AuditError::Register {
            socket,
            source: e.into_parts().1,
        }
    })
}

fn recv(fd: &OwnedFd, buf: &mut [u8]) -> std::io::Result<usize> {
    let (_, len) = rustix::net::recv(fd, buf, RecvFlags::TRUNC)?;
    Ok(len)
}

/// Lines from events, and losses, into batches.
struct Recorder {
    ctx: AuditContext,
    names: Arc<dyn NameLookup>,
    batcher: Batcher,
    flush_interval: Duration,
    uploads: Uploads,
    stats: Arc<Stats>,
    /// Events lost and not yet in a gap line.
    unreported: u64,
    /// During the final dump: the ids of entries dumped, so their DESTROY is not a second line.
    dumped: Option<HashSet<u32>>,
}

impl Recorder {
    /// When the reader must look at the batch again: its deadline, or an interval from now
    /// (failed puts report their loss while no event arrives).
    fn next_tick(&self) -> Instant {
        let idle = Instant::now() + self.flush_interval;
        self.batcher.deadline().map_or(idle, |d| d.min(idle))
    }

    fn tick(&mut self) {
        self.report_losses();
        self.batcher.tick(Instant::now(), now_us());
        self.ship();
    }

    fn flow(&mut self, ct: &CtFlow) {
        if ct.src != GUEST_ADDR || ct.dst == RESOLVER_ADDR {
            return;
        }
        if let (Some(dumped), Some(id)) = (self.dumped.as_mut(), ct.id) {
            // A dumped entry's own DESTROY (read after the dump) is the same flow.
            if !dumped.insert(id) {
                return;
            }
        }
        let now = now_us();
        let start = ct.start_ns.map_or(now, |ns| ns / 1_000);
        let end = ct.stop_ns.map_or(now, |ns| ns / 1_000).max(start);
        let (out, back) = (ct.orig.unwrap_or_default(), ct.reply.unwrap_or_default());
        let peeked = match (ct.src_port, ct.dst_port) {
            (Some(sp), Some(dp)) => self.names.take_peeked(sp, ct.dst, dp),
            _ => None,
        };
        let refused = peeked.as_ref().is_some_and(|p| p.refused);
        let line = EgressFlow {
            v: EGRESS_LINE_VERSION,
            bunker_id: self.ctx.bunker_id.clone(),
            tenant_id: self.ctx.tenant_id.clone(),
            proto: proto_name(ct.proto),
            dst_ip: ct.dst.to_string(),
            dst_port: ct.dst_port,
            dns_name: self.names.name_of(ct.dst),
            sni: peeked.as_ref().and_then(|p| p.sni.clone()),
            ts_start_us: start,
            ts_end_us: end,
            bytes_out: out.bytes,
            bytes_in: back.bytes,
            pkts_out: out.packets,
            pkts_in: back.packets,
            verdict: if refused {
                Verdict::Denied
            } else {
                Verdict::Allowed
            },
        };
        if refused {
            self.stats.denied.fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats.allowed.fetch_add(1, Ordering::Relaxed);
        }
        self.push(EgressLine::Flow(line));
    }

    /// A name the resolver refused by policy.
    fn denied_name(&mut self, name: &str) {
        let now = now_us();
        let line = EgressFlow {
            v: EGRESS_LINE_VERSION,
            bunker_id: self.ctx.bunker_id.clone(),
            tenant_id: self.ctx.tenant_id.clone(),
            proto: "dns".to_owned(),
            dst_ip: RESOLVER_ADDR.to_string(),
            dst_port: Some(53),
            dns_name: Some(name.to_owned()),
            sni: None,
            ts_start_us: now,
            ts_end_us: now,
            bytes_out: 0,
            bytes_in: 0,
            pkts_out: 0,
            pkts_in: 0,
            verdict: Verdict::Denied,
        };
        self.stats.denied.fetch_add(1, Ordering::Relaxed);
        self.push(EgressLine::Flow(line));
    }

    fn denied(&mut self, d: &nflog::Denied) {
        if d.src != GUEST_ADDR {
            return;
        }
        let now = now_us();
        let line = EgressFlow {
            v: EGRESS_LINE_VERSION,
            bunker_id: self.ctx.bunker_id.clone(),
            tenant_id: self.ctx.tenant_id.clone(),
            proto: proto_name(d.proto),
            dst_ip: d.dst.to_string(),
            dst_port: d.dst_port,
            dns_name: self.names.name_of(d.dst),
            sni: None,
            ts_start_us: now,
            ts_end_us: now,
            bytes_out: 0,
            bytes_in: 0,
            pkts_out: 0,
            pkts_in: 0,
            verdict: Verdict::Denied,
        };
        self.stats.denied.fetch_add(1, Ordering::Relaxed);
        self.push(EgressLine::Flow(line));
    }

    fn gap(&mut self, lost: u64) {
        self.unreported += lost;
        self.report_losses();
        self.ship();
    }

    fn push(&mut self, line: EgressLine) {
        self.report_losses();
        self.batcher.push(&line, Instant::now(), now_us());
        self.ship();
    }

    /// Puts the losses known so far into one gap line.
    fn report_losses(&mut self) {
        let lost = self.unreported + self.uploads.take_lost();
        self.unreported = 0;
        if lost == 0 {
            return;
        }
        self.stats.lost.fetch_add(lost, Ordering::Relaxed);
        tracing::warn!(bunker_id = %self.ctx.bunker_id, lost, "egress audit events lost");
        let gap = EgressLine::Gap {
            lost,
            ts_us: now_us(),
        };
        self.batcher.push(&gap, Instant::now(), now_us());
    }

    /// Hands cut batches to the uploader; one it cannot take becomes a loss to report.
    fn ship(&mut self) {
        for batch in self.batcher.take_ready() {
            if let Err(batch) = self.uploads.send(batch) {
                self.stats.batches_dropped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(key = %batch.key, "the audit sink is behind: batch dropped");
                self.unreported += batch.events;
            }
        }
    }

    /// Cuts what is left; a loss found now can only be logged and counted.
    fn finish(&mut self) {
        self.report_losses();
        self.batcher.cut(now_us());
        self.ship();
        if self.unreported > 0 {
            self.stats
                .lost
                .fetch_add(self.unreported, Ordering::Relaxed);
            tracing::error!(
                bunker_id = %self.ctx.bunker_id,
                lost = self.unreported,
                "egress audit events lost at stop"
            );
        }
    }
}

fn proto_name(proto: u8) -> String {
    match proto {
        6 => "tcp".to_owned(),
        17 => "udp".to_owned(),
        1 => "icmp".to_owned(),
        n => n.to_string(),
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    struct Names;
    impl NameLookup for Names {
        fn name_of(&self, ip: Ipv4Addr) -> Option<String> {
            (ip == Ipv4Addr::new(198, 18, 0, 10)).then(|| "pypi.org".to_owned())
        }
    }

    #[derive(Default)]
    struct Memory(Mutex<Vec<(String, Bytes)>>);
    impl BatchSink for Memory {
        fn put(&self, key: String, body: Bytes) -> BoxFuture<'_, Result<(), PutBatchError>> {
            self.0
                .lock()
                .expect("lock (not poisoned)")
                .push((key, body));
            Box::pin(async { Ok(()) })
        }
    }

    fn recorder(sink: Arc<Memory>, limits: BatchLimits) -> (Recorder, JoinHandle<()>) {
        let stats = Arc::new(Stats::default());
        let (uploads, task) = Uploads::start(sink, limits, Arc::clone(&stats));
        let r = Recorder {
            ctx: AuditContext {
                bunker_id: "bnk_a".into(),
                tenant_id: "ten_a".into(),
            },
            names: Arc::new(Names),
            batcher: Batcher::new(limits, "bnk_a".into(), 9),
            flush_interval: limits.flush_interval,
            uploads,
            stats,
            unreported: 0,
            dumped: None,
        };
        (r, task)
    }

    fn lines(sink: &Memory) -> Vec<EgressLine> {
        sink.0
            .lock()
            .expect("utf-8 ndjson")
            .iter()
            .flat_map(|(_, b)| {
                std::str::from_utf8(b)
                    .expect("utf-8 ndjson")
                    .lines()
                    .map(|l| serde_json::from_str(l).expect("a valid egress line"))
                    .collect::<Vec<EgressLine>>()
            })
            .collect()
    }

    fn ct(id: u32, src: Ipv4Addr, dst: Ipv4Addr) -> CtFlow {
        CtFlow {
            id: Some(id),
            proto: 6,
            src,
            dst,
            src_port: Some(40000),
            dst_port: Some(80),
            orig: Some(conntrack::Counters {
                packets: 10,
                bytes: 1000,
            }),
            reply: Some(conntrack::Counters {
                packets: 8,
                bytes: 5000,
            }),
            start_ns: Some(3_000_000),
            stop_ns: Some(9_000_000),
        }
    }

    #[tokio::test]
    async fn only_the_guests_egress_becomes_lines_with_out_and_in_the_right_way_round() {
        let sink = Arc::new(Memory::default());
        let (mut r, task) = recorder(Arc::clone(&sink), BatchLimits::default());
        let server = Ipv4Addr::new(198, 18, 0, 10);
        r.flow(&ct(1, GUEST_ADDR, server));
        r.flow(&ct(2, GUEST_ADDR, RESOLVER_ADDR)); // DNS
        r.flow(&ct(3, Ipv4Addr::new(10, 203, 0, 1), server)); // the netns itself
        r.flow(&ct(4, server, GUEST_ADDR)); // inbound
        r.denied(&nflog::Denied {
            proto: 17,
            src: Ipv4Addr::new(169, 254, 0, 3), // a spoofed source is not the guest
            dst: server,
            dst_port: Some(53),
            prefix: None,
        });
        r.finish();
        drop(r);
        task.await.expect("the uploader ends cleanly");
        let got = lines(&sink);
        assert_eq!(got.len(), 1, "{got:?}");
        let EgressLine::Flow(f) = &got[0] else {
            panic!("{got:?}")
        };
        assert_eq!(
            (f.bytes_out, f.bytes_in, f.pkts_out, f.pkts_in),
            (1000, 5000, 10, 8)
        );
        assert_eq!((f.ts_start_us, f.ts_end_us), (3_000, 9_000));
        assert_eq!(f.dns_name.as_deref(), Some("pypi.org"));
        assert_eq!(f.verdict, Verdict::Allowed);
    }

    #[tokio::test]
    async fn a_dumped_entry_is_not_recorded_again_by_its_destroy_event() {
        let sink = Arc::new(Memory::default());
        let (mut r, task) = recorder(Arc::clone(&sink), BatchLimits::default());
        let server = Ipv4Addr::new(198, 18, 0, 10);
        r.dumped = Some(HashSet::new());
        r.flow(&ct(7, GUEST_ADDR, server));
        r.flow(&ct(7, GUEST_ADDR, server));
        r.flow(&ct(8, GUEST_ADDR, server));
        r.finish();
        drop(r);
        task.await.expect("the uploader ends cleanly");
        assert_eq!(lines(&sink).len(), 2);
    }

    #[tokio::test]
    async fn a_batch_dropped_for_a_slow_sink_comes_back_as_a_gap_line() {
        let sink = Arc::new(Memory::default());
        let limits = BatchLimits {
            max_lines: 2,
            max_pending_bytes: 0,
            ..BatchLimits::default()
        };
        let (mut r, task) = recorder(Arc::clone(&sink), limits);
        let server = Ipv4Addr::new(198, 18, 0, 10);
        r.flow(&ct(1, GUEST_ADDR, server));
        r.flow(&ct(2, GUEST_ADDR, server)); // cut, cannot be queued: 2 lost
        assert_eq!(r.unreported, 2);
        let (roomy, roomy_task) = Uploads::start(
            Arc::clone(&sink) as _,
            BatchLimits::default(),
            Arc::clone(&r.stats),
        );
        r.uploads = roomy;
        task.await.expect("the uploader ends cleanly");
        r.flow(&ct(3, GUEST_ADDR, server));
        r.finish();
        let counters = r.stats.counters();
        drop(r);
        roomy_task.await.expect("the uploader ends cleanly");
        let got = lines(&sink);
        assert!(matches!(got[0], EgressLine::Gap { lost: 2, .. }), "{got:?}");
        assert_eq!(got.len(), 2);
        assert_eq!((counters.lost, counters.batches_dropped), (2, 1));
    }
}
