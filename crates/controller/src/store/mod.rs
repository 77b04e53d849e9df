//! The SQL store: every durable row of the controller. SQLite today (embedded); MariaDB joins
//! behind the same functions with its own migration set.
//!
//! Invariants: every function that reads or writes tenant-owned rows takes the tenant id as its
//! first parameter and puts it in the `WHERE` clause; cross-tenant reads live in [`admin`].
//! Timestamps are Unix milliseconds.

pub mod admin;
pub mod audit;
pub mod bunkers;
pub mod exec_log;
pub mod identity;
pub mod images;
pub mod workers;

use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

pub type Tx<'a> = sqlx::Transaction<'a, sqlx::Sqlite>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error")]
    Db(#[from] sqlx::Error),
    #[error("migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("unsupported database url `{0}` (expected sqlite://…)")]
    UnsupportedUrl(String),
    #[error("stored row {id} has a malformed column `{column}`")]
    Corrupt { id: String, column: &'static str },
}

#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
}

impl Store {
    /// Opens (creating if needed) the database and applies pending migrations.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        if !url.starts_with("sqlite:") {
            return Err(StoreError::UnsupportedUrl(url.to_owned()));
        }
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            // WAL lets readers proceed while one writer commits; NORMAL sync is durable in WAL
            // mode across process crashes, which is the failure we must survive.
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(std::time::Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        Ok(Self { pool })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    pub async fn begin(&self) -> Result<Tx<'static>, StoreError> {
        Ok(self.pool.begin().await?)
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
