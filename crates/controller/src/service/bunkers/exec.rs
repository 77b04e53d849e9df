//! Running a command in a bunker without streaming: checking the request, sending it to the
//! worker, spilling long output to object storage and recording the exec.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};

/// Standard base64 as RFC 4648 decoders read it: bits past the last whole byte are ignored
/// (`AB==` is one byte), as the OpenAPI document's pattern allows.
const B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true),
);
use scaibunker_api::exec::{ExecRequest, ExecResult, ExecUser};
use scaibunker_core::ids::ExecId;
use scaibunker_proto::agent;
use scaibunker_proto::worker as wp;

use super::{
    BunkerError, audit_event, field, remaining_lifetime_s, running, validate_map, validate_path,
    worker_code_status,
};
use crate::service::activity;
use crate::service::auth::{self, Principal};
use crate::service::exec_output::{Pipe, SpillRoom};
use crate::service::{RequestContext, Services, random_bytes};
use crate::store::audit;
use crate::store::bunkers::{self as bstore, BunkerRow};
use crate::store::exec_log::{self, ExecLogRow};
use crate::store::spills::SpillRow;
use crate::store::{StoreError, now_ms};
use crate::workers::{WorkerCallError, WorkerEvent, WorkerEvents};

const DEFAULT_EXEC_TIMEOUT_S: u64 = 60;
/// Longest `timeout_s` an exec may ask for: the longest a bunker may live.
pub const MAX_EXEC_TIMEOUT_S: u64 = 30 * 24 * 3600;
const MAX_STDIN_BYTES: usize = 1024 * 1024;
const OUTPUT_PREVIEW_CHARS: usize = 512;

/// An exec request checked and ready to send to the bunker's worker.
pub struct PreparedExec {
    pub row: BunkerRow,
    pub worker_url: crate::workers::WorkerTarget,
    pub request: wp::ExecRequest,
    /// The command as the exec log records it.
    pub command_text: String,
}

/// Checks permissions and every field, and that the bunker runs; builds the worker request.
pub async fn prepare_exec(
    s: &Services,
    p: &Principal,
    id: &str,
    req: &ExecRequest,
) -> Result<PreparedExec, BunkerError> {
    if !p.has(auth::EXECUTE) {
        return Err(BunkerError::PermissionDenied(auth::EXECUTE));
    }
    let user = req.user.unwrap_or_default();
    if user == ExecUser::Root && !p.has(auth::ROOT) {
        return Err(BunkerError::PermissionDenied(auth::ROOT));
    }
    let mut errors = Vec::new();
    let program = match (&req.command, &req.argv) {
        (Some(c), None) if !c.is_empty() && !c.contains('\0') => {
            Some(wp::Program::Shell(c.clone()))
        }
        (None, Some(a)) if !a.is_empty() && a.iter().all(|x| !x.contains('\0')) => {
            Some(wp::Program::Argv(a.clone()))
        }
        (Some(_), Some(_)) => {
            errors.push(field(
                "command",
                "give either `command` or `argv`, not both",
            ));
            None
        }
        (None, None) => {
            errors.push(field("command", "one of `command` and `argv` is required"));
            None
        }
        _ => {
            errors.push(field("command", "must be non-empty and without NUL bytes"));
            None
        }
    };
    if let Some(t) = req.timeout_s
        && !(1..=MAX_EXEC_TIMEOUT_S).contains(&t)
    {
        errors.push(field(
            "timeout_s",
            format!("must be 1 to {MAX_EXEC_TIMEOUT_S} (30 days)"),
        ));
    }
    let stdin = match (&req.stdin, &req.stdin_b64) {
        (Some(_), Some(_)) => {
            errors.push(field(
                "stdin",
                "give either `stdin` or `stdin_b64`, not both",
            ));
            None
        }
        (Some(t), None) => Some(t.as_bytes().to_vec()),
        (None, Some(b)) => match B64.decode(b) {
            Ok(v) => Some(v),
            Err(_) => {
                errors.push(field("stdin_b64", "not valid base64"));
                None
            }
        },
        (None, None) => None,
    };
    if stdin.as_ref().is_some_and(|v| v.len() > MAX_STDIN_BYTES) {
        errors.push(field("stdin", format!("at most {MAX_STDIN_BYTES} bytes")));
    }
    if let Some(cwd) = &req.cwd
        && validate_path(cwd).is_err()
    {
        errors.push(field("cwd", "must be an absolute path without NUL bytes"));
    }
    let env = req.env.clone().unwrap_or_default();
    validate_map(&mut errors, "env", &env, 128, 32 * 1024, true);
    let Some(program) = program.filter(|_| errors.is_empty()) else {
        return Err(BunkerError::Validation(errors));
    };

    let (row, worker_url) = running(s, p, id).await?;
    check_request_size(&program, &env, req.cwd.as_deref(), &row.env_vars)?;
    let now = now_ms();
    let mut timeout_s = req.timeout_s.unwrap_or(DEFAULT_EXEC_TIMEOUT_S);
    if let Some(left) = remaining_lifetime_s(&row, now) {
        timeout_s = timeout_s.min(left);
    }
    let limit = s.config.exec_inline_limit_bytes;
    let command_text = match &program {
        wp::Program::Shell(c) => c.clone(),
        wp::Program::Argv(a) => a.join(" "),
    };
    let wreq = wp::ExecRequest {
        program,
        env,
        cwd: req.cwd.clone(),
        user: match user {
            ExecUser::User => wp::GuestUser::User,
            ExecUser::Root => wp::GuestUser::Root,
        },
        stdin_b64: stdin.map(|v| B64.encode(v)),
        timeout_ms: timeout_s * 1000,
        output_limit_bytes: limit,
    };
    Ok(PreparedExec {
        row,
        worker_url,
        request: wreq,
        command_text,
    })
}

/// Refuses an exec whose program, environment (the bunker's and the request's) and working
/// directory would not fit one agent frame, naming the field that does not fit, before
/// anything reaches a worker.
fn check_request_size(
    program: &wp::Program,
    env: &BTreeMap<String, String>,
    cwd: Option<&str>,
    bunker_env_json: &str,
) -> Result<(), BunkerError> {
    let mut merged: BTreeMap<String, String> =
        serde_json::from_str(bunker_env_json).unwrap_or_default();
    merged.extend(env.iter().map(|(k, v)| (k.clone(), v.clone())));
    let (program_len, rest_len) = agent::exec_fields_len(program, &merged, cwd);
    let budget = agent::MAX_EXEC_FIELDS_BYTES;
    if program_len + rest_len <= budget {
        return Ok(());
    }
    let name = match (program, program_len > budget.saturating_sub(rest_len)) {
        (wp::Program::Shell(_), true) => "command",
        (wp::Program::Argv(_), true) => "argv",
        (_, false) => "env",
    };
    Err(BunkerError::Validation(vec![field(
        name,
        format!(
            "the command, its environment (with the bunker's) and cwd take {} bytes encoded, \
             over the {budget} an exec can carry; send a long script as a file or through stdin",
            program_len + rest_len
        ),
    )]))
}

/// Records a finished exec: its exec-log row, its audit event and the bunker's activity.
pub async fn record_exec(
    s: &Services,
    p: &Principal,
    ctx: &RequestContext,
    row: &BunkerRow,
    entry: ExecLogRow,
) -> Result<(), BunkerError> {
    let mut tx = s.store.begin().await?;
    let details = serde_json::json!({
        "exec_id": entry.id,
        "exit_code": entry.exit_code,
        "timed_out": entry.timed_out,
    });
    exec_log::insert(&mut tx, &entry).await?;
    audit::insert(
        &mut tx,
        &audit_event(p, ctx, "bunker.exec", &row.id, "success", details),
    )
    .await?;
    bstore::touch_activity(&mut tx, &row.tenant_id, &row.id, now_ms()).await?;
    tx.commit().await.map_err(StoreError::from)?;
    Ok(())
}

/// Runs a command and answers with its whole result (`stream: false`).
pub async fn exec(
    s: &Services,
    p: &Principal,
    ctx: &RequestContext,
    id: &str,
    req: ExecRequest,
) -> Result<ExecResult, BunkerError> {
    let PreparedExec {
        row,
        worker_url,
        request: wreq,
        command_text,
    } = prepare_exec(s, p, id, &req).await?;
    // Busy until it is recorded: the sweeper leaves the bunker alone meanwhile.
    let _busy = activity::hold(s, &row).await?;
    let now = now_ms();
    let started = std::time::Instant::now();
    let exec_id = ExecId::from_random(random_bytes()).to_string();
    let full_ref = crate::service::exec_output::output_ref(&row.tenant_id, &row.id, &exec_id);
    let limit = s.config.exec_inline_limit_bytes;
    let room = SpillRoom::new(s, &row.tenant_id, &p.user_id);
    let mut out_pipe = Pipe::new(format!("{full_ref}/stdout"), limit);
    let mut err_pipe = Pipe::new(format!("{full_ref}/stderr"), limit);
    // The streaming route even inline: output past the limit is spilled as it arrives
    // instead of being cut off at the worker.
    let upstream = s.workers.exec_stream(&worker_url, &row.id, &wreq).await?;
    let mut events = WorkerEvents::new(upstream);
    let mut exit = None;
    let mut failure = None;
    while let Some(event) = events.next().await {
        match event {
            WorkerEvent::Stdout(bytes) => out_pipe.push(&room, bytes).await,
            WorkerEvent::Stderr(bytes) => err_pipe.push(&room, bytes).await,
            WorkerEvent::Exit {
                exit_code,
                timed_out,
            } => exit = Some((exit_code, timed_out)),
            WorkerEvent::Error { code, message } => failure = Some((code, message)),
        }
    }
    // The other pipe is stored too only when this one's spill still stands.
    let spilled = out_pipe.spilling() || err_pipe.spilling();
    let out = out_pipe.finish(&room, spilled).await;
    let err = err_pipe.finish(&room, spilled).await;
    // Recorded even when the other pipe failed: what is stored is counted and deleted.
    for (key, size_bytes) in [&out.stored, &err.stored].into_iter().flatten() {
        s.store
            .insert_spill(&SpillRow {
                object_key: key.clone(),
                tenant_id: row.tenant_id.clone(),
                bunker_id: row.id.clone(),
                exec_id: exec_id.clone(),
                size_bytes: *size_bytes as i64,
                created_at: now_ms(),
            })
            .await?;
    }
    let Some((exit_code, timed_out)) = exit else {
        let (code, message) = failure.unwrap_or_else(|| ("WORKER_ERROR".into(), "no exit".into()));
        let (status, _) = worker_code_status(&code);
        return Err(if status < 500 {
            BunkerError::Worker(WorkerCallError::Worker {
                status,
                body: wp::WorkerError { code, message },
            })
        } else {
            BunkerError::ExecFailed { code, message }
        });
    };
    let duration_ms = started.elapsed().as_millis() as u64;
    let truncated = out.total > out.kept.len() as u64 || err.total > err.kept.len() as u64;
    let full_output_ref =
        (truncated && out.stored.is_some() && err.stored.is_some()).then_some(full_ref);
    let (stdout_text, stdout_b64) = text_or_b64(out.kept);
    let (stderr_text, stderr_b64) = text_or_b64(err.kept);
    let preview: String = stdout_text
        .as_deref()
        .unwrap_or("<binary>")
        .chars()
        .take(OUTPUT_PREVIEW_CHARS)
        .collect();

    record_exec(
        s,
        p,
        ctx,
        &row,
        ExecLogRow {
            id: exec_id.clone(),
            tenant_id: row.tenant_id.clone(),
            bunker_id: row.id.clone(),
            actor_id: p.user_id.clone(),
            command: command_text.chars().take(4096).collect(),
            exit_code,
            duration_ms: duration_ms as i64,
            timed_out,
            output_preview: preview,
            created_at: now,
        },
    )
    .await?;

    Ok(ExecResult {
        exec_id,
        exit_code,
        stdout: stdout_text,
        stderr: stderr_text,
        stdout_b64,
        stderr_b64,
        duration_ms,
        timed_out,
        truncated,
        full_output_ref,
    })
}

fn text_or_b64(bytes: Vec<u8>) -> (Option<String>, Option<String>) {
    match String::from_utf8(bytes) {
        Ok(t) => (Some(t), None),
        Err(e) => (None, Some(B64.encode(e.into_bytes()))),
    }
}
