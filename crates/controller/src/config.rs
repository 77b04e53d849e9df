//! Controller configuration, from the environment (`SCAIBUNKER_*`) with embedded defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use crate::objects::S3Settings;

const MIB: u64 = 1024 * 1024;
const DAY_S: u64 = 24 * 3600;

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
    /// How often a controller renews the busy mark of each bunker it runs an exec or a shell
    /// in; the mark lasts three of these (`SCAIBUNKER_ACTIVITY_INTERVAL_S`).
    pub activity_interval: Duration,
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
    /// `file:///dir` or `s3://bucket` (`SCAIBUNKER_OBJECT_STORE`); embedded default
    /// `file://<data dir>/objects`.
    pub object_store: String,
    /// Endpoint and credentials of an `s3://` object store (`SCAIBUNKER_S3_*`).
    pub s3: S3Settings,
    /// Key of the HMAC that signs storage capability tokens (`SCAIBUNKER_STORAGE_SECRET`):
    /// every controller and storage proxy of an installation needs the same one. `embedded`
    /// makes a random one; the CLI persists it in the data dir.
    pub storage_secret: String,
    /// Largest object a storage proxy `PUT` may store (`SCAIBUNKER_MAX_OBJECT_BYTES`).
    pub max_object_bytes: u64,
    /// Bytes all stream resume buffers of this controller may hold together
    /// (`SCAIBUNKER_STREAM_BUFFER_MB`).
    pub stream_buffer_bytes: u64,
    /// Bytes the stream resume buffers of one tenant may hold together
    /// (`SCAIBUNKER_STREAM_BUFFER_TENANT_MB`).
    pub stream_buffer_tenant_bytes: u64,
    /// How long spilled exec outputs are kept (`SCAIBUNKER_SPILL_RETENTION_S`); a bunker's go
    /// with it sooner.
    pub spill_retention: Duration,
    /// How long the egress audit of a bunker that ended is kept
    /// (`SCAIBUNKER_EGRESS_RETENTION_DAYS`, at least one day).
    pub egress_retention: Duration,
}

/// What `scaibunker serve` runs, from `SCAIGRID_MODE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The whole controller (unset or `controller`).
    Controller,
    /// Only the storage proxy and `/health`: no database, no Redis (`bunker_proxy`).
    BunkerProxy,
}

impl Mode {
    pub fn from_env() -> Result<Self, String> {
        match std::env::var("SCAIGRID_MODE").ok().as_deref() {
            None | Some("") | Some("controller") => Ok(Self::Controller),
            Some("bunker_proxy") => Ok(Self::BunkerProxy),
            Some(other) => Err(format!(
                "SCAIGRID_MODE={other:?} is neither `controller` nor `bunker_proxy`"
            )),
        }
    }
}

impl ControllerConfig {
    /// Defaults for an embedded controller keeping its state under `data_dir`.
    pub fn embedded(data_dir: PathBuf, listen: SocketAddr, worker_token: String) -> Self {
        // A file:// URL needs an absolute path; a relative data dir is taken from here.
        let objects_dir = std::path::absolute(data_dir.join("objects"))
            .unwrap_or_else(|_| data_dir.join("objects"));
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
            activity_interval: Duration::from_secs(10),
            rate_limit_per_minute: 1200,
            jwt_hs256_secret: None,
            jwt_rs256_public_pem: None,
            jwt_issuer: None,
            jwt_audience: None,
            object_store: format!("file://{}", objects_dir.display()),
            s3: S3Settings::default(),
            storage_secret: hex::encode(crate::service::random_bytes())
                + &hex::encode(crate::service::random_bytes()),
            // Images and full snapshots are the largest objects; a multi-GiB rootfs fits.
            max_object_bytes: 32 * 1024 * 1024 * 1024,
            // A quarter of the total per tenant: one tenant's streams leave the rest to others.
            stream_buffer_bytes: 512 * MIB,
            stream_buffer_tenant_bytes: 128 * MIB,
            spill_retention: Duration::from_secs(7 * 24 * 3600),
            egress_retention: Duration::from_secs(30 * DAY_S),
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
        if let Some(s) = var("SCAIBUNKER_ACTIVITY_INTERVAL_S")
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|s| *s > 0)
        {
            self.activity_interval = Duration::from_secs(s);
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
        if let Some(v) = var("SCAIBUNKER_OBJECT_STORE") {
            self.object_store = v;
        }
        for (name, slot) in [
            ("SCAIBUNKER_S3_ENDPOINT", &mut self.s3.endpoint),
            ("SCAIBUNKER_S3_ACCESS_KEY", &mut self.s3.access_key),
            ("SCAIBUNKER_S3_SECRET_KEY", &mut self.s3.secret_key),
            ("SCAIBUNKER_S3_REGION", &mut self.s3.region),
        ] {
            if let Some(v) = var(name) {
                *slot = Some(v);
            }
        }
        if let Some(v) = var("SCAIBUNKER_STORAGE_SECRET") {
            self.storage_secret = v;
        }
        if let Some(n) = var("SCAIBUNKER_MAX_OBJECT_BYTES").and_then(|v| v.parse().ok()) {
            self.max_object_bytes = n;
        }
        // Below one reservation no streamed exec could ever start: such values are ignored.
        let mb = |k: &str| {
            var(k)
                .and_then(|v| v.parse::<u64>().ok())
                .filter(|n| *n >= 1)
                .map(|n| n.saturating_mul(MIB))
        };
        if let Some(n) = mb("SCAIBUNKER_STREAM_BUFFER_MB") {
            self.stream_buffer_bytes = n;
        }
        if let Some(n) = mb("SCAIBUNKER_STREAM_BUFFER_TENANT_MB") {
            self.stream_buffer_tenant_bytes = n;
        }
        if let Some(s) = var("SCAIBUNKER_SPILL_RETENTION_S")
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|s| *s > 0)
        {
            self.spill_retention = Duration::from_secs(s);
        }
        if let Some(days) = var("SCAIBUNKER_EGRESS_RETENTION_DAYS")
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|d| *d > 0)
        {
            self.egress_retention = Duration::from_secs(days.saturating_mul(DAY_S));
        }
        self
    }
}
