//! Interactive shells: checks, the worker's query, and the audit of each session.
//!
//! A session is `bunker.shell` in the audit log when it opens (command, size, user, the
//! session id) and `bunker.shell.end` when it closes (exit code, duration); both bump the
//! bunker's `last_activity_at`, and while it is open the bunker is busy (`service::activity`):
//! never swept or passivated. The bytes typed and shown are not recorded.

use scaibunker_api::exec::ExecUser;
use scaibunker_api::shell::{
    DEFAULT_COLS, DEFAULT_ROWS, DEFAULT_SHELL_COMMAND, MAX_TERMINAL_CELLS, ShellQuery,
};
use scaibunker_core::ids::ShellId;
use scaibunker_proto::worker as wp;

use super::activity::{self, ActivityGuard};
use super::auth::{self, Principal};
use super::bunkers::{BunkerError, field, record_activity, remaining_lifetime_s, running};
use super::{RequestContext, Services, random_bytes};
use crate::store::bunkers::BunkerRow;
use crate::store::now_ms;

/// Longest a shell session lives when the bunker's own lifetime does not end it sooner.
pub const MAX_SESSION_S: u64 = 24 * 3600;
/// Longest command accepted.
const MAX_COMMAND_BYTES: usize = 4096;

/// A shell checked and ready to open on the bunker's worker.
pub struct PreparedShell {
    pub session_id: String,
    pub row: BunkerRow,
    pub worker_url: crate::workers::WorkerTarget,
    pub query: wp::ShellQuery,
}

/// Checks permissions, the query and that the bunker runs.
pub async fn prepare(
    s: &Services,
    p: &Principal,
    id: &str,
    q: &ShellQuery,
) -> Result<PreparedShell, BunkerError> {
    if !p.has(auth::SHELL) {
        return Err(BunkerError::PermissionDenied(auth::SHELL));
    }
    let user = q.user.unwrap_or_default();
    if user == ExecUser::Root && !p.has(auth::ROOT) {
        return Err(BunkerError::PermissionDenied(auth::ROOT));
    }
    let mut errors = Vec::new();
    let cols = q.cols.unwrap_or(DEFAULT_COLS);
    let rows = q.rows.unwrap_or(DEFAULT_ROWS);
    for (name, n) in [("cols", cols), ("rows", rows)] {
        if n == 0 || n > MAX_TERMINAL_CELLS {
            errors.push(field(name, format!("must be 1..={MAX_TERMINAL_CELLS}")));
        }
    }
    let command = q.command.as_deref().unwrap_or(DEFAULT_SHELL_COMMAND);
    if command.is_empty() || command.contains('\0') || command.len() > MAX_COMMAND_BYTES {
        errors.push(field(
            "command",
            format!("must be 1..={MAX_COMMAND_BYTES} bytes without NUL"),
        ));
    }
    if !errors.is_empty() {
        return Err(BunkerError::Validation(errors));
    }
    let (row, worker_url) = running(s, p, id).await?;
    let timeout_s = remaining_lifetime_s(&row, now_ms())
        .unwrap_or(MAX_SESSION_S)
        .clamp(1, MAX_SESSION_S);
    Ok(PreparedShell {
        session_id: ShellId::from_random(random_bytes()).to_string(),
        row,
        worker_url,
        query: wp::ShellQuery {
            cols,
            rows,
            command: command.to_owned(),
            user: match user {
                ExecUser::User => wp::GuestUser::User,
                ExecUser::Root => wp::GuestUser::Root,
            },
            timeout_ms: timeout_s * 1000,
        },
    })
}

/// Holds the bunker busy until the guard is dropped: taken before the session opens on the
/// worker, dropped once it has closed.
pub async fn hold(s: &Services, shell: &PreparedShell) -> Result<ActivityGuard, BunkerError> {
    Ok(activity::hold(s, &shell.row).await?)
}

/// Records a session that opened.
pub async fn record_open(
    s: &Services,
    p: &Principal,
    ctx: &RequestContext,
    shell: &PreparedShell,
) -> Result<(), BunkerError> {
    let details = serde_json::json!({
        "session_id": shell.session_id,
        "command": shell.query.command,
        "cols": shell.query.cols,
        "rows": shell.query.rows,
        "user": shell.query.user,
    });
    record_activity(s, p, ctx, &shell.row, "bunker.shell", details).await
}

/// How a session ended, as the audit log keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionEnd {
    pub exit_code: Option<i32>,
    /// Why there is no exit code: `client_closed`, `worker_closed` or an error code.
    pub reason: Option<String>,
    pub duration_ms: u64,
}

/// Records a session that closed.
pub async fn record_close(
    s: &Services,
    p: &Principal,
    ctx: &RequestContext,
    row: &BunkerRow,
    session_id: &str,
    end: &SessionEnd,
) -> Result<(), BunkerError> {
    let details = serde_json::json!({
        "session_id": session_id,
        "exit_code": end.exit_code,
        "reason": end.reason,
        "duration_ms": end.duration_ms,
    });
    record_activity(s, p, ctx, row, "bunker.shell.end", details).await
}
