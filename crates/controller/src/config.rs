//! Controller configuration, from the environment (`SCAIBUNKER_*`) with embedded defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct ControllerConfig {
    pub listen: SocketAddr,
    /// `sqlite://…` (MariaDB arrives with the platform-core work).
    pub database_url: String,
    /// Where the bootstrap key file is written (`admin.key`); `None` writes none.
    pub data_dir: Option<PathBuf>,
    /// Shared secret of the controller ↔ worker tier.
    pub worker_token: String,
    /// Used once, on first start, instead of a generated key.
    pub bootstrap_key: Option<String>,
    pub heartbeat_interval: Duration,
    /// Each of stdout and stderr is returned inline up to this many bytes.
    pub exec_inline_limit_bytes: u64,
    /// Uploads larger than this are refused with `413 FILE_TOO_LARGE`.
    pub max_file_bytes: u64,
    /// Largest JSON request body.
    pub max_json_bytes: usize,
    /// `redis://…` shared by every controller; `None` keeps live state in-process.
    pub redis_url: Option<String>,
    /// Prefix of every Redis key this installation writes.
    pub redis_prefix: String,
    /// How often background jobs tick.
    pub job_interval: Duration,
    /// The length of one accounting usage tick.
    pub usage_tick_interval: Duration,
    /// Requests per minute one API key may make (its tenant: ten times that).
    pub rate_limit_per_minute: u32,
    /// Shared secret for HS256 bearer JWTs; `None` refuses HS256 tokens.
    pub jwt_hs256_secret: Option<String>,
    /// PEM public key (SPKI or PKCS#1) for RS256 bearer JWTs; `None` refuses RS256 tokens.
    pub jwt_rs256_public_pem: Option<String>,
    /// When set, a JWT must carry this `iss`.
    pub jwt_issuer: Option<String>,
    /// When set, a JWT's `aud` must name this audience.
    pub jwt_audience: Option<String>,
}

impl ControllerConfig {
    /// Defaults for an embedded controller keeping its state under `data_dir`.
    pub fn embedded(data_dir: PathBuf, listen: SocketAddr, worker_token: String) -> Self {
        Self {
            listen,
            database_url: format!("sqlite://{}/scaibunker.db", data_dir.display()),
            data_dir: Some(data_dir),
            worker_token,
            bootstrap_key: None,
            heartbeat_interval: Duration::from_secs(10),
            exec_inline_limit_bytes: 1024 * 1024,
            max_file_bytes: 1024 * 1024 * 1024,
            max_json_bytes: 4 * 1024 * 1024,
            redis_url: None,
            redis_prefix: "scaibunker:".into(),
            job_interval: Duration::from_secs(30),
            usage_tick_interval: Duration::from_secs(60),
            rate_limit_per_minute: 1200,
            jwt_hs256_secret: None,
            jwt_rs256_public_pem: None,
            jwt_issuer: None,
            jwt_audience: None,
        }
    }

    /// Applies `SCAIBUNKER_*` environment overrides.
    pub fn with_env(mut self) -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        if let Some(v) = var("SCAIBUNKER_DATABASE_URL") {
            self.database_url = v;
        }
        if let Some(v) = var("SCAIBUNKER_WORKER_TOKEN") {
            self.worker_token = v;
        }
        if let Some(v) = var("SCAIBUNKER_BOOTSTRAP_KEY") {
            self.bootstrap_key = Some(v);
        }
        if let Some(s) = var("WORKER_HEARTBEAT_INTERVAL_S").and_then(|v| v.parse().ok()) {
            self.heartbeat_interval = Duration::from_secs(s);
        }
        if let Some(n) = var("SCAIBUNKER_EXEC_INLINE_LIMIT_BYTES").and_then(|v| v.parse().ok()) {
            self.exec_inline_limit_bytes = n;
        }
        if let Some(n) = var("SCAIBUNKER_MAX_FILE_BYTES").and_then(|v| v.parse().ok()) {
            self.max_file_bytes = n;
        }
        if let Some(v) = var("SCAIBUNKER_REDIS_URL") {
            self.redis_url = Some(v);
        }
        if let Some(v) = var("SCAIBUNKER_REDIS_PREFIX") {
            self.redis_prefix = v;
        }
        if let Some(s) = var("SCAIBUNKER_JOB_INTERVAL_S").and_then(|v| v.parse().ok()) {
            self.job_interval = Duration::from_secs(s);
        }
        if let Some(s) = var("SCAIBUNKER_USAGE_TICK_S")
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|s| *s > 0)
        {
            self.usage_tick_interval = Duration::from_secs(s);
        }
        if let Some(n) = var("SCAIBUNKER_RATE_LIMIT_PER_MIN").and_then(|v| v.parse().ok()) {
            self.rate_limit_per_minute = n;
        }
        if let Some(v) = var("SCAIBUNKER_JWT_HS256_SECRET") {
            self.jwt_hs256_secret = Some(v);
        }
        if let Some(v) = var("SCAIBUNKER_JWT_RS256_PUBLIC_KEY_PEM") {
            self.jwt_rs256_public_pem = Some(v);
        } else if let Some(path) = var("SCAIBUNKER_JWT_RS256_PUBLIC_KEY_FILE") {
            match std::fs::read_to_string(&path) {
                Ok(pem) => self.jwt_rs256_public_pem = Some(pem),
                // Configuration loading cannot fail here; an unreadable key leaves RS256 off, so
                // RS256 tokens are refused (closed, not open), and says so once at start.
                Err(error) => tracing::error!(
                    %path, %error,
                    "cannot read SCAIBUNKER_JWT_RS256_PUBLIC_KEY_FILE; RS256 tokens will be refused"
                ),
            }
        }
        if let Some(v) = var("SCAIBUNKER_JWT_ISSUER") {
            self.jwt_issuer = Some(v);
        }
        if let Some(v) = var("SCAIBUNKER_JWT_AUDIENCE") {
            self.jwt_audience = Some(v);
        }
        self
    }
}
