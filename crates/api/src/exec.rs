//! `POST /bunkers/{id}/exec`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ExecUser {
    #[default]
    User,
    Root,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Run by `/bin/sh -c`. Exactly one of `command` and `argv`.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(min_length = 1, pattern = r"^[^\x00]*$"))]
    pub command: Option<String>,
    /// The program and its arguments, run without a shell.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(min_items = 1))]
    pub argv: Option<Vec<String>>,
    /// Seconds, 1 to 2,592,000 (30 days); default 60, clamped to the bunker's remaining life.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 2592000))]
    pub timeout_s: Option<u64>,
    #[serde(default)]
    pub env: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub stdin: Option<String>,
    /// Standard base64 (with padding).
    #[serde(default)]
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = r"^([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$")
    )]
    pub stdin_b64: Option<String>,
    /// An absolute path in the guest, at most 4096 bytes.
    #[serde(default)]
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = r"^(/[^/\x00]{0,63})+/?$", max_length = 1024)
    )]
    pub cwd: Option<String>,
    #[serde(default)]
    pub user: Option<ExecUser>,
    #[serde(default)]
    pub stream: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExecResult {
    pub exec_id: String,
    /// `null` when the process was killed by a signal (including a timeout).
    pub exit_code: Option<i32>,
    /// UTF-8 output inline; `null` when the output is not UTF-8 (see `stdout_b64`).
    pub stdout: Option<String>,
    pub stderr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout_b64: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr_b64: Option<String>,
    pub duration_ms: u64,
    pub timed_out: bool,
    pub truncated: bool,
    pub full_output_ref: Option<String>,
}

/// One row of `GET /bunkers/{id}/exec-log`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExecLogEntry {
    pub exec_id: String,
    pub command: String,
    pub exit_code: Option<i32>,
    pub duration_ms: u64,
    pub timed_out: bool,
    pub output_preview: String,
    pub actor_id: String,
    pub created_at: String,
}
