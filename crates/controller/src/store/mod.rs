//! The SQL store: every durable row of the controller. SQLite today (embedded); MariaDB joins
//! behind the same functions with its own migration set.
//!
//! Invariants: every function that reads or writes tenant-owned rows takes the tenant id as its
//! first parameter and puts it in the `WHERE` clause; cross-tenant reads live in [`admin`].
//! Timestamps are Unix milliseconds.

pub mod admin;
pub mod audit;
pub mod availability;
pub mod builtin_images;
pub mod bunkers;
pub mod capabilities;
pub mod children;
pub mod egress;
pub mod exec_log;
pub mod identity;
pub mod images;
pub mod passivation;
pub mod quotas;
pub mod snapshots;
pub mod spills;
pub mod workers;

use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::any::AnyPoolOptions;
use sqlx::{AnyPool, Executor};

pub type Tx<'a> = sqlx::Transaction<'a, sqlx::Any>;

/// Which SQL server is behind the pool; the few statements that differ branch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    MariaDb,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error")]
    Db(#[from] sqlx::Error),
    #[error("migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("unsupported database url `{0}` (expected sqlite://… or mysql://…)")]
    UnsupportedUrl(String),
    #[error("stored row {id} has a malformed column `{column}`")]
    Corrupt { id: String, column: &'static str },
}

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

impl Store {
    /// Opens the database (`sqlite://PATH`, created if missing, or `mysql://…` for MariaDB)
    /// and applies pending migrations of that backend's set.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let (backend, url) = if let Some(path) = url.strip_prefix("sqlite://") {
            (
                Backend::Sqlite,
                format!(
                    "sqlite://{path}{}",
                    if path.contains('?') { "" } else { "?mode=rwc" }
                ),
            )
        } else if url.starts_with("mysql://") || url.starts_with("mariadb://") {
            (Backend::MariaDb, url.replacen("mariadb://", "mysql://", 1))
        } else {
            return Err(StoreError::UnsupportedUrl(url.to_owned()));
        };
        let pool = AnyPoolOptions::new()
            .max_connections(if backend == Backend::Sqlite { 8 } else { 16 })
            // No ping before every query (a round trip to MariaDB each time). A connection the
            // server dropped fails its query once and is discarded; idle connections are closed
            // well before MariaDB's `wait_timeout` (8 h by default) drops them from its side.
            .test_before_acquire(false)
            .idle_timeout(std::time::Duration::from_secs(300))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    let setup = match backend {
                        // WAL lets readers proceed while one writer commits; NORMAL sync is
                        // durable in WAL mode across process crashes, the failure we must survive.
                        Backend::Sqlite => {
                            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                             PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON;"
                        }
                        Backend::MariaDb => "SET time_zone = '+00:00'",
                    };
                    conn.execute(setup).await?;
                    Ok(())
                })
            })
            .connect(&url)
            .await?;
        match backend {
            Backend::Sqlite => sqlx::migrate!("./migrations/sqlite").run(&pool).await?,
            Backend::MariaDb => sqlx::migrate!("./migrations/mysql").run(&pool).await?,
        }
        Ok(Self { pool, backend })
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Begins a write transaction. On SQLite it takes the write lock up front (`BEGIN
    /// IMMEDIATE`): a deferred transaction that read before another connection committed
    /// cannot upgrade to a writer (`SQLITE_BUSY_SNAPSHOT`, which `busy_timeout` does not
    /// retry), whereas an immediate one waits for the lock like any other writer.
    pub async fn begin(&self) -> Result<Tx<'static>, StoreError> {
        Ok(match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::MariaDb => self.pool.begin().await?,
        })
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
