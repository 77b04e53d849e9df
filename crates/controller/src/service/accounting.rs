//! Accounting: per-bunker usage ticks and the usage report.
//!
//! A tick covers one window of `usage_tick_interval`. For every bunker that ran in the window
//! (started before its end, not ended before its start) it records the time it ran inside the
//! window times what it held: CPU millicore-seconds, memory and disk MB-seconds, GPU-seconds.
//! A paused bunker still holds its resources and is counted. Rows are keyed by (bunker, window
//! start) and inserted with insert-ignore, so a window recorded twice counts once. Reports sum
//! the rows per tenant, user and period at read time.

use std::time::Duration;

use scaibunker_api::quotas as api;

use super::Services;
use super::auth::{self, Principal};
use super::bunkers::rfc3339;
use crate::store::StoreError;
use crate::store::quotas::{RanBunker, UsageQuery, UsageTick};

#[derive(Debug, thiserror::Error)]
pub enum AccountingError {
    #[error("field `{field}`: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("missing permission `{0}`")]
    PermissionDenied(&'static str),
    #[error("store failed")]
    Store(#[from] StoreError),
}

/// The usage of one bunker inside the window `[start, end)`, if it ran there.
pub fn usage_in_window(b: &RanBunker, start: i64, end: i64) -> Option<UsageTick> {
    let from = b.started_at.max(start);
    let to = b.terminated_at.unwrap_or(end).min(end);
    let ms = to - from;
    if ms <= 0 {
        return None;
    }
    let per_s = |amount: i64| amount * ms / 1000;
    Some(UsageTick {
        bunker_id: b.id.clone(),
        tick_start: start,
        tenant_id: b.tenant_id.clone(),
        user_id: b.owner_id.clone(),
        duration_ms: ms,
        cpu_millicore_s: per_s(b.cpu_millicores),
        memory_mb_s: per_s(b.memory_mb),
        disk_mb_s: per_s(b.disk_mb),
        gpu_s: per_s(b.gpu_count),
    })
}

/// Records the window before tick `tick` (ticks count `interval`s since the epoch). Returns
/// how many rows were new.
pub async fn tick(s: &Services, tick: i64, interval: Duration) -> Result<u64, StoreError> {
    let len = interval.as_millis() as i64;
    let (start, end) = ((tick - 1) * len, tick * len);
    let ran = s.store.admin_bunkers_ran_between(start, end).await?;
    let ticks: Vec<UsageTick> = ran
        .iter()
        .filter_map(|b| usage_in_window(b, start, end))
        .collect();
    if ticks.is_empty() {
        return Ok(0);
    }
    s.store.admin_insert_usage_ticks(&ticks).await
}

/// Filters of `GET /v1/accounting/usage`, as parsed by the handler.
#[derive(Debug, Clone, Default)]
pub struct UsageFilter {
    pub tenant_id: Option<String>,
    pub user_id: Option<String>,
    pub start_ms: Option<i64>,
    pub end_ms: Option<i64>,
    /// Comma-separated `tenant`, `user`, `hour`, `day`; default `tenant,user`.
    pub group_by: Option<String>,
}

fn invalid(field: &'static str, message: impl Into<String>) -> AccountingError {
    AccountingError::Invalid {
        field,
        message: message.into(),
    }
}

/// Usage the caller may see: any tenant's with `admin:platform`, its tenant's with
/// `admin:tenant`, else its own.
pub async fn usage(
    s: &Services,
    p: &Principal,
    f: UsageFilter,
) -> Result<Vec<api::AccountingUsage>, AccountingError> {
    if !p.can_read() && !p.has(auth::ADMIN_TENANT) {
        return Err(AccountingError::PermissionDenied(auth::CREATE));
    }
    let platform = p.has(auth::ADMIN_PLATFORM);
    let tenant_id = match f.tenant_id {
        Some(t) if t != p.tenant_id && !platform => {
            return Err(AccountingError::PermissionDenied(auth::ADMIN_PLATFORM));
        }
        Some(t) => Some(t),
        None if platform => None,
        None => Some(p.tenant_id.clone()),
    };
    let user_id = match f.user_id {
        Some(u) if u != p.user_id && !p.has(auth::ADMIN_TENANT) => {
            return Err(AccountingError::PermissionDenied(auth::ADMIN_TENANT));
        }
        Some(u) => Some(u),
        None if p.has(auth::ADMIN_TENANT) => None,
        None => Some(p.user_id.clone()),
    };
    let mut q = UsageQuery {
        tenant_id,
        user_id,
        start_ms: f.start_ms,
        end_ms: f.end_ms,
        ..UsageQuery::default()
    };
    for part in f.group_by.as_deref().unwrap_or("tenant,user").split(',') {
        match part.trim() {
            "tenant" => q.by_tenant = true,
            "user" => q.by_user = true,
            "hour" | "day" if q.period_ms.is_some() => {
                return Err(invalid("group_by", "at most one of `hour` and `day`"));
            }
            "hour" => q.period_ms = Some(3_600_000),
            "day" => q.period_ms = Some(86_400_000),
            "" => {}
            other => {
                return Err(invalid(
                    "group_by",
                    format!("`{other}` is not one of tenant, user, hour, day"),
                ));
            }
        }
    }
    Ok(s.store
        .usage(&q)
        .await?
        .into_iter()
        .map(|r| api::AccountingUsage {
            tenant_id: r.tenant_id,
            user_id: r.user_id,
            period_start: r.period_start.map(rfc3339),
            cpu_millicore_seconds: r.cpu_millicore_s,
            memory_mb_seconds: r.memory_mb_s,
            disk_mb_seconds: r.disk_mb_s,
            gpu_seconds: r.gpu_s,
            ticks: r.ticks,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ran(started_at: i64, terminated_at: Option<i64>) -> RanBunker {
        RanBunker {
            id: "bnk_x".into(),
            tenant_id: "tnt_x".into(),
            owner_id: "usr_x".into(),
            started_at,
            terminated_at,
            cpu_millicores: 1000,
            memory_mb: 512,
            disk_mb: 2048,
            gpu_count: 1,
        }
    }

    #[test]
    fn a_tick_counts_only_the_time_run_inside_its_window() {
        let cases = [
            (ran(0, None), Some(60_000)),
            (ran(30_000, None), Some(30_000)),
            (ran(0, Some(15_000)), Some(15_000)),
            (ran(70_000, None), None),
            (ran(0, Some(0)), None),
        ];
        for (b, want) in cases {
            let got = usage_in_window(&b, 0, 60_000);
            assert_eq!(got.as_ref().map(|t| t.duration_ms), want, "{b:?}");
            if let Some(t) = got {
                let secs = t.duration_ms / 1000;
                assert_eq!(
                    (t.cpu_millicore_s, t.memory_mb_s, t.disk_mb_s, t.gpu_s),
                    (1000 * secs, 512 * secs, 2048 * secs, secs)
                );
            }
        }
    }
}
