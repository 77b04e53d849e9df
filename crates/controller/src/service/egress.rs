//! The egress audit on the controller's side (NETWORK.md §2.5): who may write a bunker's
//! batches through the storage proxy, reading them back for `GET /bunkers/{id}/egress`, and
//! their retention.
//!
//! Writing: workers put NDJSON batches under `scaibunker/audit/{bunker_id}/` with their own
//! credential, one object per batch, keyed exactly as `scaibunker_proto::egress::object_key`
//! makes them ([`audit_bunker`] parses that shape and nothing else). A worker may only `PUT`
//! them, each at most [`MAX_OBJECT_BYTES`], and only for a bunker that runs on it or that a
//! passivation took off it ([`may_write`]), until [`WRITE_GRACE`] after the bunker ended. Only
//! a proxy with the database can tell, so a proxy alone (`SCAIGRID_MODE=bunker_proxy`)
//! refuses them (`EGRESS_AUDIT_NEEDS_CONTROLLER`): workers always reach a controller, and
//! write their audit there. The objects are the platform's and count against no quota.
//!
//! Reading: the bunker's objects in key order (which is the order the batches were cut), each
//! line parsed as an [`EgressLine`]. The worker is not trusted: a line that does not parse, is
//! longer than [`MAX_LINE_BYTES`], names another bunker or tenant, or carries impossible
//! times is skipped and counted, and no request reads more than [`READ_BUDGET_BYTES`] (no
//! object more than [`MAX_OBJECT_BYTES`]). The cursor is the position of the next line to
//! read (batch name and line number), so pages follow each other without repeats.
//!
//! Retention: the `spills` job deletes the audit objects of bunkers that ended more than
//! `SCAIBUNKER_EGRESS_RETENTION_DAYS` ago (objects first, then the bunker's mark), so a failed
//! delete is retried; writes stop long before ([`WRITE_GRACE`]), so none lands after.

use std::time::Duration;

use futures_util::StreamExt;
use scaibunker_api::egress::{EgressGap, EgressPage, EgressRecord, EgressVerdict};
use scaibunker_core::ids::BunkerId;
use scaibunker_proto::egress::{EgressLine, Verdict, bunker_prefix, object_key};

use super::Services;
use super::auth::{self, Principal};
use super::bunkers::{BunkerError, field, get};
use super::storage::StorageAuthError;
use crate::objects::ObjectError;
use crate::store::bunkers::BunkerRow;
use crate::store::egress::EgressWriters;
use crate::store::{StoreError, now_ms};

/// Where every bunker's audit batches lie (`bunker_prefix` without the bunker).
pub const AUDIT_ROOT: &str = "scaibunker/audit/";
/// Largest batch the proxy takes: twice what a worker cuts (4 MiB, NETWORK.md §2.5).
pub const MAX_OBJECT_BYTES: u64 = 8 * 1024 * 1024;
/// Longest line read back; a flow line is a few hundred bytes (names are at most 255).
pub const MAX_LINE_BYTES: usize = 16 * 1024;
/// Most bytes of audit objects one request reads; a page stops early (with a cursor) past it.
pub const READ_BUDGET_BYTES: u64 = 32 * 1024 * 1024;
/// How long after its bunker ended a worker may still write a batch: the last one is cut when
/// the VM stops, and a worker that cannot deliver it for an hour has lost it.
pub const WRITE_GRACE: Duration = Duration::from_secs(3600);
/// Bunkers whose audit one retention run deletes; the rest wait for the next tick.
const PURGE_BATCH: u32 = 200;

/// The bunker whose audit batch `key` is, if `key` is exactly
/// `scaibunker/audit/{bunker_id}/{ts_us:016}-{worker_pid}.ndjson`.
pub fn audit_bunker(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(AUDIT_ROOT)?;
    let (bunker_id, name) = rest.split_once('/')?;
    BunkerId::parse(bunker_id).ok()?;
    let (ts_us, pid) = parse_batch_name(name)?;
    // What the worker's formatter makes, and only that (no leading zeros in the pid, no `+`).
    (object_key(bunker_id, ts_us, pid) == key).then_some(bunker_id)
}

/// `(ts_us, worker_pid)` of a batch's file name `{ts_us:016}-{worker_pid}.ndjson`.
fn parse_batch_name(name: &str) -> Option<(u64, u32)> {
    let (ts, pid) = name.strip_suffix(".ndjson")?.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if ts.len() != 16 || !digits(ts) || !digits(pid) {
        return None;
    }
    Some((ts.parse().ok()?, pid.parse().ok()?))
}

/// Whether `worker_id` may write an audit batch of `bunker_id`, whose writers are `writers`
/// (`None`: no such bunker), at `now_ms`.
pub fn may_write(
    writers: Option<&EgressWriters>,
    bunker_id: &str,
    worker_id: &str,
    now_ms: i64,
) -> Result<(), StorageAuthError> {
    let denied = |why: &'static str| StorageAuthError::AuditDenied {
        bunker_id: bunker_id.to_owned(),
        why,
    };
    let w = writers.ok_or(denied("there is no such bunker"))?;
    let ran_here = [&w.worker_id, &w.last_worker_id]
        .into_iter()
        .any(|id| id.as_deref() == Some(worker_id));
    if !ran_here {
        return Err(denied("it does not run on this worker"));
    }
    let grace = WRITE_GRACE.as_millis() as i64;
    if w.purged
        || w.terminated_at
            .is_some_and(|t| now_ms.saturating_sub(t) > grace)
    {
        return Err(denied("it ended over an hour ago"));
    }
    Ok(())
}

/// Where a page starts: the line `line` (0-based) of the batch `name`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Position {
    name: String,
    line: u64,
}

/// `{ts_us:016}-{pid}.{line}`: the batch's name without `.ndjson`, then the line. Plain text,
/// so the document can state its pattern and every string matching it is a cursor.
fn encode_cursor(p: &Position) -> String {
    format!("{}.{}", p.name.trim_end_matches(".ndjson"), p.line)
}

fn decode_cursor(c: &str) -> Option<Position> {
    let (batch, line) = c.rsplit_once('.')?;
    let name = format!("{batch}.ndjson");
    parse_batch_name(&name)?;
    if line.is_empty() || !line.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(Position {
        name,
        line: line.parse().ok()?,
    })
}

/// A read of a bunker's audit: the time window (Unix microseconds, both ends included) and
/// the page.
#[derive(Debug, Clone, Default)]
pub struct EgressQuery {
    pub start_us: Option<i64>,
    pub end_us: Option<i64>,
    pub limit: u32,
    pub cursor: Option<String>,
}

/// An RFC 3339 UTC time with microseconds (`2026-11-28T10:33:54.123456Z`).
pub fn rfc3339_us(us: i64) -> Option<String> {
    let secs = jiff::Timestamp::from_second(us.div_euclid(1_000_000)).ok()?;
    Some(format!(
        "{}.{:06}Z",
        secs.strftime("%Y-%m-%dT%H:%M:%S"),
        us.rem_euclid(1_000_000)
    ))
}

/// Parses an RFC 3339 time (any offset) into Unix microseconds.
pub fn parse_rfc3339_us(t: &str) -> Option<i64> {
    let ts: jiff::Timestamp = t.parse().ok()?;
    Some(ts.as_microsecond())
}

/// What one line of a batch is to a read.
enum Line {
    Record(EgressRecord),
    Gap(EgressGap),
    /// A valid line outside the time window.
    Outside,
    Malformed,
}

fn classify(raw: &[u8], bunker: &BunkerRow, q: &EgressQuery) -> Line {
    let Ok(line) = serde_json::from_slice::<EgressLine>(raw) else {
        return Line::Malformed;
    };
    let start = q.start_us.unwrap_or(i64::MIN);
    let end = q.end_us.unwrap_or(i64::MAX);
    match line {
        EgressLine::Gap { lost, ts_us } => {
            let Some((ts, text)) = time(ts_us) else {
                return Line::Malformed;
            };
            if ts < start || ts > end {
                return Line::Outside;
            }
            Line::Gap(EgressGap { ts: text, lost })
        }
        EgressLine::Flow(f) => {
            // Lines naming another bunker or tenant are a worker's forgery, never shown here.
            if f.bunker_id != bunker.id || f.tenant_id != bunker.tenant_id {
                return Line::Malformed;
            }
            let (Some((from, ts_start)), Some((to, ts_end))) =
                (time(f.ts_start_us), time(f.ts_end_us))
            else {
                return Line::Malformed;
            };
            if to < from {
                return Line::Malformed;
            }
            if from > end || to < start {
                return Line::Outside;
            }
            Line::Record(EgressRecord {
                proto: f.proto,
                dst_ip: f.dst_ip,
                dst_port: f.dst_port,
                dns_name: f.dns_name,
                sni: f.sni,
                ts_start,
                ts_end,
                bytes_out: f.bytes_out,
                bytes_in: f.bytes_in,
                pkts_out: f.pkts_out,
                pkts_in: f.pkts_in,
                verdict: match f.verdict {
                    Verdict::Allowed => EgressVerdict::Allowed,
                    Verdict::Denied => EgressVerdict::Denied,
                },
            })
        }
    }
}

/// A line's time as microseconds and as text, if it is a time at all (year 9999 at most).
fn time(us: u64) -> Option<(i64, String)> {
    let us = i64::try_from(us).ok()?;
    Some((us, rfc3339_us(us)?))
}

/// Splits a byte stream into lines of at most [`MAX_LINE_BYTES`] (longer ones come out as
/// `None`), without holding more than one line.
#[derive(Default)]
struct LineSplitter {
    line: Vec<u8>,
    overlong: bool,
}

impl LineSplitter {
    /// Feeds `chunk`, handing each completed line to `out`; stops early when `out` says so.
    fn feed(&mut self, chunk: &[u8], out: &mut impl FnMut(Option<&[u8]>) -> bool) -> bool {
        for piece in chunk.split_inclusive(|b| *b == b'\n') {
            let (content, ends) = match piece.strip_suffix(b"\n") {
                Some(c) => (c, true),
                None => (piece, false),
            };
            if !self.overlong {
                if self.line.len() + content.len() > MAX_LINE_BYTES {
                    self.overlong = true;
                    self.line = Vec::new();
                } else {
                    self.line.extend_from_slice(content);
                }
            }
            if ends && !self.finish(out) {
                return false;
            }
        }
        true
    }

    /// Hands out the line in progress, if any (the last one of an object without a newline).
    fn finish(&mut self, out: &mut impl FnMut(Option<&[u8]>) -> bool) -> bool {
        let go_on = out((!self.overlong).then_some(self.line.as_slice()));
        self.line.clear();
        self.overlong = false;
        go_on
    }

    fn is_empty(&self) -> bool {
        self.line.is_empty() && !self.overlong
    }
}

/// `GET /bunkers/{id}/egress`: a page of the bunker's egress audit, for its owner, holders of
/// `scaibunker:admin:tenant` in its tenant and platform admins (see the module doc).
pub async fn read(
    s: &Services,
    p: &Principal,
    bunker_id: &str,
    q: &EgressQuery,
) -> Result<EgressPage, BunkerError> {
    let bunker = get(s, p, bunker_id).await?;
    let own_tenant = bunker.tenant_id == p.tenant_id;
    let allowed =
        p.is_admin() || (own_tenant && (bunker.owner_id == p.user_id || p.has(auth::ADMIN_TENANT)));
    if !allowed {
        return Err(BunkerError::PermissionDenied(auth::ADMIN_TENANT));
    }
    let from = match q.cursor.as_deref() {
        Some(c) => Some(decode_cursor(c).ok_or_else(|| {
            BunkerError::Validation(vec![field("cursor", "not a cursor this API issued")])
        })?),
        None => None,
    };
    let prefix = bunker_prefix(&bunker.id);
    let entries = s
        .objects()
        .list(&prefix)
        .await
        .map_err(BunkerError::Objects)?;
    let mut page = EgressPage {
        records: Vec::new(),
        gaps: Vec::new(),
        skipped_lines: 0,
        has_more: false,
        next_cursor: None,
    };
    let mut next: Option<Position> = None;
    let mut read_bytes = 0u64;
    'objects: for entry in entries {
        let Some(name) = entry.key.strip_prefix(&prefix) else {
            continue;
        };
        // Keys of other shapes under the prefix were not written by a worker.
        let Some((cut_us, _)) = parse_batch_name(name) else {
            continue;
        };
        let first_line = match &from {
            Some(f) if name < f.name.as_str() => continue,
            Some(f) if name == f.name => f.line,
            _ => 0,
        };
        // A batch is cut after its lines ended: one cut before `start` holds nothing later.
        if q.start_us
            .is_some_and(|st| (cut_us as i128) < i128::from(st))
        {
            continue;
        }
        let size = entry.size_bytes.min(MAX_OBJECT_BYTES);
        if read_bytes > 0 && read_bytes + size > READ_BUDGET_BYTES {
            next = Some(Position {
                name: name.to_owned(),
                line: first_line,
            });
            break;
        }
        read_bytes += size;
        let mut body = match s.objects().get_stream(&entry.key).await {
            Ok(read) => read.body,
            // Deleted since the listing (the retention): nothing to show.
            Err(ObjectError::NotFound(_)) => continue,
            Err(e) => return Err(BunkerError::Objects(e)),
        };
        let mut splitter = LineSplitter::default();
        let mut index = 0u64;
        let mut left = MAX_OBJECT_BYTES;
        let mut take = |raw: Option<&[u8]>| -> bool {
            let at = index;
            index += 1;
            if at < first_line {
                return true;
            }
            let line = match raw {
                Some(raw) => classify(raw, &bunker, q),
                None => Line::Malformed,
            };
            let item_count = page.records.len() + page.gaps.len();
            match line {
                Line::Malformed => page.skipped_lines += 1,
                Line::Outside => {}
                Line::Record(_) | Line::Gap(_) if item_count >= q.limit as usize => {
                    next = Some(Position {
                        name: name.to_owned(),
                        line: at,
                    });
                    return false;
                }
                Line::Record(r) => page.records.push(r),
                Line::Gap(g) => page.gaps.push(g),
            }
            true
        };
        while left > 0 {
            let Some(chunk) = body.next().await else {
                break;
            };
            let chunk = chunk.map_err(|source| {
                BunkerError::Objects(ObjectError::Body {
                    key: entry.key.clone(),
                    source,
                })
            })?;
            let chunk = &chunk[..chunk.len().min(left as usize)];
            left -= chunk.len() as u64;
            if !splitter.feed(chunk, &mut take) {
                break 'objects;
            }
        }
        if !splitter.is_empty() && !splitter.finish(&mut take) {
            break 'objects;
        }
    }
    if page.skipped_lines > 0 {
        tracing::warn!(
            bunker_id = bunker.id,
            skipped = page.skipped_lines,
            "egress audit lines that are not valid lines of this bunker were skipped"
        );
    }
    page.has_more = next.is_some();
    page.next_cursor = next.as_ref().map(encode_cursor);
    Ok(page)
}

/// The retention, run by the `spills` job: deletes the audit objects of bunkers that ended more
/// than `retention` ago (never less than [`WRITE_GRACE`]). Returns how many objects it deleted.
pub async fn purge(s: &Services, retention: Duration) -> Result<u64, StoreError> {
    let keep = retention.max(WRITE_GRACE).as_millis() as i64;
    let before = now_ms().saturating_sub(keep);
    let mut deleted = 0;
    'bunkers: for (tenant_id, bunker_id) in
        s.store.admin_egress_to_purge(before, PURGE_BATCH).await?
    {
        let listed = match s.objects().list(&bunker_prefix(&bunker_id)).await {
            Ok(listed) => listed,
            Err(e) => {
                tracing::warn!(bunker_id, error = %e, "listing an egress audit failed");
                continue;
            }
        };
        for entry in listed {
            if let Err(e) = s.objects().delete(&entry.key).await {
                // The bunker stays unmarked, so the next run tries again.
                tracing::warn!(key = entry.key, error = %e, "deleting an egress audit batch failed");
                continue 'bunkers;
            }
            deleted += 1;
        }
        s.store
            .mark_egress_purged(&tenant_id, &bunker_id, now_ms())
            .await?;
    }
    if deleted > 0 {
        tracing::info!(deleted, "egress audit batches past their retention deleted");
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_keys_of_the_workers_shape_are_audit_batches() {
        let key = object_key("bnk_a1", 1_795_862_034_123_456, 4242);
        assert_eq!(audit_bunker(&key), Some("bnk_a1"));
        assert_eq!(bunker_prefix("bnk_a1"), format!("{AUDIT_ROOT}bnk_a1/"));
        for other in [
            "scaibunker/audit/events/tnt_a/0000000000000001-1.ndjson",
            "scaibunker/audit/bnk_a1/0000000000000001-01.ndjson",
            "scaibunker/audit/bnk_a1/000000000000001-1.ndjson",
            "scaibunker/audit/bnk_a1/0000000000000001-1.json",
            "scaibunker/audit/bnk_a1/0000000000000001-.ndjson",
            "scaibunker/audit/bnk_a1/0000000000000001-99999999999.ndjson",
            "scaibunker/audit/bnk_a1/x/0000000000000001-1.ndjson",
            "scaibunker/audit/bnk_a1/",
            "snapshots/bnk_a1/0000000000000001-1.ndjson",
            "scaibunker/audit/wrk_a/0000000000000001-1.ndjson",
        ] {
            assert_eq!(audit_bunker(other), None, "{other}");
        }
    }

    fn writers(worker: Option<&str>, last: Option<&str>, ended: Option<i64>) -> EgressWriters {
        EgressWriters {
            worker_id: worker.map(Into::into),
            last_worker_id: last.map(Into::into),
            terminated_at: ended,
            purged: false,
        }
    }

    #[test]
    fn only_the_bunkers_own_worker_writes_until_an_hour_after_it_ended() {
        let now = 10_000_000;
        let ok = |w: &EgressWriters, worker| may_write(Some(w), "bnk_a", worker, now).is_ok();
        assert!(ok(&writers(Some("wrk_a"), None, None), "wrk_a"));
        assert!(!ok(&writers(Some("wrk_a"), None, None), "wrk_b"));
        // Passivated: no worker, the last one may still deliver its final batch.
        assert!(ok(&writers(None, Some("wrk_a"), None), "wrk_a"));
        assert!(!ok(&writers(None, Some("wrk_a"), None), "wrk_b"));
        assert!(!ok(&writers(None, None, None), "wrk_a"));
        let grace = WRITE_GRACE.as_millis() as i64;
        assert!(ok(
            &writers(Some("wrk_a"), None, Some(now - grace)),
            "wrk_a"
        ));
        assert!(!ok(
            &writers(Some("wrk_a"), None, Some(now - grace - 1)),
            "wrk_a"
        ));
        let mut purged = writers(Some("wrk_a"), None, None);
        purged.purged = true;
        assert!(!ok(&purged, "wrk_a"));
        assert!(may_write(None, "bnk_a", "wrk_a", now).is_err());
    }

    #[test]
    fn cursors_round_trip_and_junk_is_refused() {
        let p = Position {
            name: "0000000000000007-12.ndjson".into(),
            line: 3,
        };
        assert_eq!(decode_cursor(&encode_cursor(&p)), Some(p.clone()));
        assert_eq!(encode_cursor(&p), "0000000000000007-12.3");
        for junk in [
            "",
            "!!",
            "0",
            "x.1",
            "0000000000000007-12.x",
            "000000000000007-12.3",
        ] {
            assert_eq!(decode_cursor(junk), None, "{junk}");
        }
    }

    #[test]
    fn times_carry_microseconds() {
        assert_eq!(
            rfc3339_us(1_795_862_034_123_456).as_deref(),
            Some("2026-11-28T10:33:54.123456Z")
        );
        assert_eq!(
            rfc3339_us(0).as_deref(),
            Some("1970-01-01T00:00:00.000000Z")
        );
        assert_eq!(
            parse_rfc3339_us("2026-11-28T12:33:54.123456+02:00"),
            Some(1_795_862_034_123_456)
        );
        assert_eq!(rfc3339_us(i64::MAX), None);
    }

    #[test]
    fn lines_are_split_bounded_across_chunks() {
        let mut got: Vec<Option<Vec<u8>>> = Vec::new();
        let mut out = |l: Option<&[u8]>| {
            got.push(l.map(<[u8]>::to_vec));
            true
        };
        let mut s = LineSplitter::default();
        let long = vec![b'x'; MAX_LINE_BYTES + 1];
        assert!(s.feed(b"ab", &mut out));
        assert!(s.feed(b"c\nd", &mut out));
        assert!(s.feed(b"\n", &mut out));
        assert!(s.feed(&long, &mut out));
        assert!(s.feed(b"\ntail", &mut out));
        assert!(!s.is_empty());
        assert!(s.finish(&mut out));
        assert_eq!(
            got,
            vec![
                Some(b"abc".to_vec()),
                Some(b"d".to_vec()),
                None,
                Some(b"tail".to_vec())
            ]
        );
    }
}
