//! Streamed, resumable exec.
//!
//! 1. `start` checks the request like an inline exec, registers an [`ExecBuffer`] under a new
//!    exec id and spawns a pump task that reads the worker's NDJSON event stream.
//! 2. The pump appends each output chunk as an event with the next id (1, 2, …) and wakes
//!    subscribers; at the end it appends `exit` (or `error`), records the exec-log row and
//!    audit event, and marks the buffer done. It runs whether or not a client is attached, so
//!    the command keeps running while no one listens; it is the only reader of the worker.
//!    Until then it holds the bunker busy (`service::activity`).
//! 3. A client follows a buffer from any id it has seen ([`ExecBuffer::follow`]): the SSE
//!    response of the exec itself starts at 0; `GET …/exec/{exec_id}/events` with
//!    `Last-Event-ID` resumes after that id with no byte lost or repeated.
//!
//! Memory is bounded: a buffer keeps at most `MAX_BUFFER_BYTES` of events, and all buffers of
//! the controller (and of each tenant) together at most what `service::exec_budget` grants; older
//! events are dropped, and a resume from before the window gets an `error` event
//! (`RESUME_WINDOW_EXCEEDED`). Finished buffers are forgotten after `KEEP_FINISHED`, or sooner
//! when the budget needs their room. A streamed exec the budget has no room for is refused before
//! it starts. Buffers live in the controller that ran the exec: resuming needs the same
//! controller.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use scaibunker_api::exec::ExecRequest;
use scaibunker_core::ids::ExecId;
use tokio::sync::watch;

use super::activity::{self, ActivityGuard};
use super::auth::Principal;
use super::bunkers::{BunkerError, PreparedExec, prepare_exec, record_exec};
use super::exec_budget::{Budget, Limits, RESERVE_BYTES, Refused};
use super::{RequestContext, Services, random_bytes};
use crate::store::exec_log::ExecLogRow;
use crate::store::now_ms;
use crate::workers::{WorkerEvent, WorkerEvents};

/// Output kept per exec for resuming.
const MAX_BUFFER_BYTES: usize = 32 * 1024 * 1024;
/// How long a finished exec's events stay resumable.
const KEEP_FINISHED: Duration = Duration::from_secs(600);
/// Characters of stdout kept as the exec log's preview.
const PREVIEW_CHARS: usize = 512;
/// What an event costs beyond its data (the event, its string's and the queue's headers), so
/// that a stream of tiny events is charged what it really holds.
const EVENT_OVERHEAD: usize = 64;

/// The SSE event names of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Stdout,
    Stderr,
    Exit,
    Error,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
            Self::Exit => "exit",
            Self::Error => "error",
        }
    }
}

/// One event: its id, name and JSON payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: u64,
    pub kind: EventKind,
    pub data: String,
}

struct State {
    events: VecDeque<Event>,
    /// What the events take, their overhead included.
    bytes: usize,
    /// What the budget charges this buffer: its window.
    charged: usize,
    /// Id of the last event appended (0: none yet).
    last_id: u64,
    /// Highest id dropped from the front to bound memory.
    dropped_through: u64,
    done: bool,
    /// Evicted for the budget: every event is dropped, and followers are told so.
    evicted: bool,
}

/// The events of one streamed exec.
pub struct ExecBuffer {
    pub exec_id: String,
    pub tenant_id: String,
    pub bunker_id: String,
    state: Mutex<State>,
    /// Carries the last appended id; `done` is read from the state.
    wake: watch::Sender<u64>,
}

/// What a follower gets next.
pub enum Next {
    Events(Vec<Event>),
    /// The requested position fell out of the bounded window.
    Gone {
        oldest_available: u64,
    },
    Finished,
}

impl ExecBuffer {
    fn new(exec_id: String, tenant_id: String, bunker_id: String) -> Self {
        Self {
            exec_id,
            tenant_id,
            bunker_id,
            state: Mutex::new(State {
                events: VecDeque::new(),
                bytes: 0,
                charged: RESERVE_BYTES as usize,
                last_id: 0,
                dropped_through: 0,
                done: false,
                evicted: false,
            }),
            wake: watch::channel(0).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends an event, growing the window within `MAX_BUFFER_BYTES` and what `hub`'s budget
    /// grants, else dropping the oldest events.
    fn push(&self, hub: &ExecHub, kind: EventKind, data: String) {
        let mut evicted = Vec::new();
        let id = {
            let mut st = self.lock();
            st.last_id += 1;
            let id = st.last_id;
            let size = data.len() + EVENT_OVERHEAD;
            let wanted = (st.bytes + size).min(MAX_BUFFER_BYTES);
            if wanted > st.charged
                && hub.grow(&self.exec_id, (wanted - st.charged) as u64, &mut evicted)
            {
                st.charged = wanted;
            }
            st.bytes += size;
            st.events.push_back(Event { id, kind, data });
            while st.bytes > st.charged && st.events.len() > 1 {
                if let Some(old) = st.events.pop_front() {
                    st.bytes -= old.data.len() + EVENT_OVERHEAD;
                    st.dropped_through = old.id;
                }
            }
            // One event larger than the whole window (the worker's chunks are far smaller than
            // the reservation): kept, and charged, rather than lost.
            if st.bytes > st.charged {
                hub.force(&self.exec_id, (st.bytes - st.charged) as u64);
                st.charged = st.bytes;
            }
            id
        };
        self.wake.send_replace(id);
        // Outside this buffer's lock: the hub never locks one buffer while holding another.
        for b in evicted {
            b.evict();
        }
    }

    /// Frees what the budget took back: the events go now, not when the last follower or the
    /// pump lets go of the buffer.
    fn evict(&self) {
        let last = {
            let mut st = self.lock();
            st.evicted = true;
            st.events = VecDeque::new();
            st.bytes = 0;
            st.last_id
        };
        self.wake.send_replace(last);
    }

    fn finish(&self, hub: &ExecHub) {
        let last = {
            let mut st = self.lock();
            st.done = true;
            st.charged = st.bytes;
            hub.finish(&self.exec_id, st.bytes as u64);
            st.last_id
        };
        self.wake.send_replace(last);
    }

    /// Events after `after`, waiting for some if there are none yet.
    pub async fn next_after(&self, after: u64) -> Next {
        let mut rx = self.wake.subscribe();
        loop {
            {
                let st = self.lock();
                if st.evicted && after < st.last_id {
                    return Next::Gone {
                        oldest_available: st.last_id + 1,
                    };
                }
                if after < st.dropped_through {
                    return Next::Gone {
                        oldest_available: st.dropped_through + 1,
                    };
                }
                let events: Vec<Event> =
                    st.events.iter().filter(|e| e.id > after).cloned().collect();
                if !events.is_empty() {
                    return Next::Events(events);
                }
                if st.done {
                    return Next::Finished;
                }
            }
            if rx.changed().await.is_err() {
                return Next::Finished;
            }
        }
    }
}

/// Every streamed exec this controller runs or ran recently, and the budget of their buffers.
///
/// Lock order: a buffer's state, then the hub; the hub never locks a buffer.
pub struct ExecHub {
    state: Mutex<HubState>,
}

struct HubState {
    execs: HashMap<String, Arc<ExecBuffer>>,
    budget: Budget,
}

/// A streamed exec's charge, taken before anything starts; given back when dropped unless its
/// buffer was inserted.
pub struct Admission {
    hub: Arc<ExecHub>,
    exec_id: String,
    kept: bool,
}

impl Drop for Admission {
    fn drop(&mut self) {
        if !self.kept {
            self.hub.remove(&self.exec_id);
        }
    }
}

impl ExecHub {
    pub fn new(limits: Limits) -> Self {
        Self {
            state: Mutex::new(HubState {
                execs: HashMap::new(),
                budget: Budget::new(limits),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes charged to every buffer, and to those of `tenant_id`.
    pub fn usage(&self, tenant_id: &str) -> (u64, u64) {
        let st = self.lock();
        (st.budget.used(), st.budget.tenant_used(tenant_id))
    }

    /// Charges a new streamed exec its reservation, evicting finished buffers for room.
    pub fn admit(self: &Arc<Self>, exec_id: &str, tenant_id: &str) -> Result<Admission, Refused> {
        let (admitted, evicted) = {
            let mut st = self.lock();
            let mut evicted = Vec::new();
            let admitted = st.budget.admit(exec_id, tenant_id, &mut evicted);
            (admitted, st.forget(&evicted))
        };
        for b in evicted {
            b.evict();
        }
        admitted.map(|()| Admission {
            hub: self.clone(),
            exec_id: exec_id.to_owned(),
            kept: false,
        })
    }

    fn insert(&self, mut admission: Admission, b: Arc<ExecBuffer>) {
        admission.kept = true;
        self.lock().execs.insert(b.exec_id.clone(), b);
    }

    /// Grants `bytes` more to a running buffer; the buffers evicted for it are pushed to
    /// `evicted`, for the caller to free once it holds no buffer's lock.
    fn grow(&self, exec_id: &str, bytes: u64, evicted: &mut Vec<Arc<ExecBuffer>>) -> bool {
        let mut st = self.lock();
        let mut ids = Vec::new();
        let granted = st.budget.grow(exec_id, bytes, &mut ids);
        evicted.extend(st.forget(&ids));
        granted
    }

    fn force(&self, exec_id: &str, bytes: u64) {
        self.lock().budget.force(exec_id, bytes);
    }

    fn finish(&self, exec_id: &str, holds: u64) {
        self.lock().budget.finish(exec_id, holds);
    }

    fn remove(&self, exec_id: &str) {
        let mut st = self.lock();
        st.budget.remove(exec_id);
        st.execs.remove(exec_id);
    }

    fn get(&self, exec_id: &str) -> Option<Arc<ExecBuffer>> {
        self.lock().execs.get(exec_id).cloned()
    }
}

impl HubState {
    /// Takes evicted buffers out of the hub; the caller frees their events.
    fn forget(&mut self, evicted: &[String]) -> Vec<Arc<ExecBuffer>> {
        evicted
            .iter()
            .filter_map(|id| self.execs.remove(id))
            .collect()
    }
}

/// Starts a streamed exec and returns its buffer.
pub async fn start(
    s: &Services,
    p: &Principal,
    ctx: &RequestContext,
    bunker_id: &str,
    req: ExecRequest,
) -> Result<Arc<ExecBuffer>, BunkerError> {
    let prepared = prepare_exec(s, p, bunker_id, &req).await?;
    let exec_id = ExecId::from_random(random_bytes()).to_string();
    // Before the busy mark and the worker: a refusal leaves nothing behind.
    let admission = s
        .exec_hub
        .admit(&exec_id, &prepared.row.tenant_id)
        .map_err(|r| BunkerError::StreamBudgetExceeded {
            scope: r.scope.as_str(),
            limit_bytes: r.limit_bytes,
        })?;
    let busy = activity::hold(s, &prepared.row).await?;
    // Connect before answering, so a worker that refuses (not running, bad request) is an
    // ordinary error response rather than an error event.
    let upstream = s
        .workers
        .exec_stream(&prepared.worker_url, &prepared.row.id, &prepared.request)
        .await?;
    let buffer = Arc::new(ExecBuffer::new(
        exec_id.clone(),
        prepared.row.tenant_id.clone(),
        prepared.row.id.clone(),
    ));
    s.exec_hub.insert(admission, buffer.clone());
    tokio::spawn(pump(
        s.clone(),
        p.clone(),
        ctx.clone(),
        prepared,
        upstream,
        buffer.clone(),
        busy,
    ));
    Ok(buffer)
}

/// A streamed exec the caller may follow: same tenant (or a platform admin), same bunker.
pub fn find(
    s: &Services,
    p: &Principal,
    bunker_id: &str,
    exec_id: &str,
) -> Result<Arc<ExecBuffer>, BunkerError> {
    if !p.has(super::auth::EXECUTE) {
        return Err(BunkerError::PermissionDenied(super::auth::EXECUTE));
    }
    s.exec_hub
        .get(exec_id)
        .filter(|b| b.bunker_id == bunker_id && (b.tenant_id == p.tenant_id || p.is_admin()))
        .ok_or(BunkerError::ExecNotFound)
}

/// Turns output bytes into event JSON: `{"data": text}`, or `{"data_b64": …}` for bytes that are
/// not UTF-8. A UTF-8 sequence cut by a chunk boundary is carried into the next chunk.
struct TextDecoder {
    carry: Vec<u8>,
}

impl TextDecoder {
    fn new() -> Self {
        Self { carry: Vec::new() }
    }

    fn decode(&mut self, chunk: &[u8]) -> Option<String> {
        let mut bytes = std::mem::take(&mut self.carry);
        bytes.extend_from_slice(chunk);
        match std::str::from_utf8(&bytes) {
            Ok(text) => Some(serde_json::json!({ "data": text }).to_string()),
            Err(e) if e.error_len().is_none() => {
                // Incomplete sequence at the end: keep it for the next chunk.
                let valid = e.valid_up_to();
                self.carry = bytes[valid..].to_vec();
                if valid == 0 {
                    return None;
                }
                let text = std::str::from_utf8(&bytes[..valid]).expect("valid up to here");
                Some(serde_json::json!({ "data": text }).to_string())
            }
            Err(_) => Some(serde_json::json!({ "data_b64": B64.encode(&bytes) }).to_string()),
        }
    }

    fn flush(&mut self) -> Option<String> {
        (!self.carry.is_empty()).then(|| {
            serde_json::json!({ "data_b64": B64.encode(std::mem::take(&mut self.carry)) })
                .to_string()
        })
    }
}

async fn pump(
    s: Services,
    p: Principal,
    ctx: RequestContext,
    prepared: PreparedExec,
    upstream: reqwest::Response,
    buffer: Arc<ExecBuffer>,
    busy: ActivityGuard,
) {
    let started = std::time::Instant::now();
    let created_at = now_ms();
    let mut out = TextDecoder::new();
    let mut err = TextDecoder::new();
    let mut preview = String::new();
    let mut outcome: Option<(Option<i32>, bool)> = None;
    let mut events = WorkerEvents::new(upstream);
    let mut failure: Option<(String, String)> = None;
    while let Some(event) = events.next().await {
        match event {
            WorkerEvent::Stdout(bytes) => {
                if preview.len() < PREVIEW_CHARS {
                    preview.push_str(&String::from_utf8_lossy(&bytes));
                }
                if let Some(data) = out.decode(&bytes) {
                    buffer.push(&s.exec_hub, EventKind::Stdout, data);
                }
            }
            WorkerEvent::Stderr(bytes) => {
                if let Some(data) = err.decode(&bytes) {
                    buffer.push(&s.exec_hub, EventKind::Stderr, data);
                }
            }
            WorkerEvent::Exit {
                exit_code,
                timed_out,
            } => {
                if let Some(data) = out.flush() {
                    buffer.push(&s.exec_hub, EventKind::Stdout, data);
                }
                if let Some(data) = err.flush() {
                    buffer.push(&s.exec_hub, EventKind::Stderr, data);
                }
                let duration_ms = started.elapsed().as_millis() as u64;
                buffer.push(
                    &s.exec_hub,
                    EventKind::Exit,
                    serde_json::json!({
                        "exec_id": buffer.exec_id,
                        "exit_code": exit_code,
                        "duration_ms": duration_ms,
                        "timed_out": timed_out,
                    })
                    .to_string(),
                );
                outcome = Some((exit_code, timed_out));
            }
            WorkerEvent::Error { code, message } => failure = Some((code, message)),
        }
    }
    if outcome.is_none() {
        let (code, message) = failure.unwrap_or_else(|| {
            (
                "WORKER_ERROR".into(),
                "the worker ended the stream without an exit".into(),
            )
        });
        buffer.push(
            &s.exec_hub,
            EventKind::Error,
            serde_json::json!({ "code": code, "message": message }).to_string(),
        );
    }
    let (exit_code, timed_out) = outcome.unwrap_or((None, false));
    let entry = ExecLogRow {
        id: buffer.exec_id.clone(),
        tenant_id: prepared.row.tenant_id.clone(),
        bunker_id: prepared.row.id.clone(),
        actor_id: p.user_id.clone(),
        command: prepared.command_text.chars().take(4096).collect(),
        exit_code,
        duration_ms: started.elapsed().as_millis() as i64,
        timed_out,
        output_preview: preview.chars().take(PREVIEW_CHARS).collect(),
        created_at,
    };
    if let Err(e) = record_exec(&s, &p, &ctx, &prepared.row, entry).await {
        tracing::error!(exec_id = buffer.exec_id, error = ?e, "recording a streamed exec failed");
    }
    buffer.finish(&s.exec_hub);
    // The command is over: only its events stay, which keep nothing busy.
    drop(busy);
    // Only the id waits: an eviction meanwhile frees the events at once.
    let exec_id = buffer.exec_id.clone();
    drop(buffer);
    tokio::time::sleep(KEEP_FINISHED).await;
    s.exec_hub.remove(&exec_id);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_cut_by_a_chunk_boundary_is_carried() {
        let mut d = TextDecoder::new();
        let text = "héllo";
        let bytes = text.as_bytes();
        // Split inside the two-byte `é`.
        let first = d.decode(&bytes[..2]).expect("h");
        assert_eq!(first, r#"{"data":"h"}"#);
        let rest = d.decode(&bytes[2..]).expect("rest");
        assert_eq!(rest, r#"{"data":"éllo"}"#);
        assert!(d.flush().is_none());
        // Bytes that are not UTF-8 at all travel as base64.
        let bin = d.decode(&[0xff, 0xfe, 0x00]).expect("binary");
        assert_eq!(bin, r#"{"data_b64":"//4A"}"#);
    }

    /// A hub with `total_mb` for everyone and a buffer admitted into it.
    fn admitted(total_mb: u64, tenant: &str, exec_id: &str) -> (Arc<ExecHub>, Arc<ExecBuffer>) {
        let hub = Arc::new(ExecHub::new(Limits {
            total_bytes: total_mb << 20,
            tenant_bytes: total_mb << 20,
        }));
        let admission = hub.admit(exec_id, tenant).expect("room");
        let b = Arc::new(ExecBuffer::new(exec_id.into(), tenant.into(), "b".into()));
        hub.insert(admission, b.clone());
        (hub, b)
    }

    #[tokio::test]
    async fn followers_resume_after_any_id_and_see_the_end() {
        let (hub, b) = admitted(64, "t", "exe_x");
        b.push(&hub, EventKind::Stdout, "1".into());
        b.push(&hub, EventKind::Stdout, "2".into());
        let Next::Events(ev) = b.next_after(0).await else {
            panic!("events expected")
        };
        assert_eq!(ev.iter().map(|e| e.id).collect::<Vec<_>>(), [1, 2]);
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move { b.next_after(2).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        b.push(&hub, EventKind::Exit, "{}".into());
        b.finish(&hub);
        match waiter.await.expect("task") {
            Next::Events(ev) => assert_eq!(ev[0].id, 3),
            _ => panic!("the exit event wakes the follower"),
        }
        assert!(matches!(b.next_after(3).await, Next::Finished));
    }

    #[tokio::test]
    async fn a_resume_from_before_the_bounded_window_is_refused() {
        let (hub, b) = admitted(64, "t", "exe_x");
        let big = "x".repeat(MAX_BUFFER_BYTES / 2 + 1);
        b.push(&hub, EventKind::Stdout, big.clone());
        b.push(&hub, EventKind::Stdout, big.clone());
        b.push(&hub, EventKind::Stdout, big);
        assert!(matches!(
            b.next_after(0).await,
            Next::Gone {
                oldest_available: 3
            }
        ));
        assert!(matches!(b.next_after(2).await, Next::Events(_)));
        assert!(hub.usage("t").0 <= MAX_BUFFER_BYTES as u64);
    }

    #[tokio::test]
    async fn a_buffer_the_budget_cannot_grow_keeps_a_shorter_window() {
        // Room for the reservation and one more MiB: the buffer's window stops there.
        let (hub, b) = admitted(2, "t", "exe_x");
        let chunk = "x".repeat(64 * 1024);
        for _ in 0..64 {
            b.push(&hub, EventKind::Stdout, chunk.clone());
        }
        assert!(hub.usage("t").0 <= 2 << 20, "{:?}", hub.usage("t"));
        let Next::Gone { oldest_available } = b.next_after(0).await else {
            panic!("the oldest events were dropped")
        };
        assert!(oldest_available > 30, "{oldest_available}");
        // Finished, it holds what it keeps; removed, it holds nothing.
        b.finish(&hub);
        hub.remove("exe_x");
        assert_eq!(hub.usage("t"), (0, 0));
    }

    #[tokio::test]
    async fn an_evicted_buffer_frees_its_events_though_a_follower_holds_it() {
        let (hub, old) = admitted(2, "t", "exe_old");
        old.push(&hub, EventKind::Stdout, "x".repeat(1000));
        old.finish(&hub);
        // A follower (or the pump's timer) still holds `old`; two new execs need its room.
        let _a = hub.admit("exe_a", "t").expect("room");
        assert!(
            hub.get("exe_old").is_some(),
            "not evicted while there was room"
        );
        let _b = hub
            .admit("exe_b", "t")
            .expect("room after evicting the finished buffer");
        assert!(hub.get("exe_old").is_none());
        assert!(old.lock().events.is_empty(), "its events are freed now");
        assert!(matches!(
            old.next_after(0).await,
            Next::Gone {
                oldest_available: 2
            }
        ));
        assert_eq!(hub.usage("t").0, 2 * RESERVE_BYTES);
    }
}
