//! Workers and their image cache ledger.

use sqlx::{AssertSqlSafe, Row};

use super::{Backend, Store, StoreError, Tx, now_ms};

#[derive(Debug, Clone)]
pub struct WorkerRow {
    pub id: String,
    pub name: String,
    pub url: String,
    pub runtime: String,
    pub status: String,
    pub cpu_millicores: i64,
    pub memory_mb: i64,
    pub disk_mb: i64,
    pub gpu_count: i64,
    pub last_heartbeat_at: i64,
    pub free_cpu_millicores: i64,
    pub free_memory_mb: i64,
    pub free_disk_mb: i64,
    pub free_gpu_count: i64,
    pub active_bunkers: i64,
    pub registered_at: i64,
    /// The generation of the worker's current credential; 0 while none was issued.
    pub credential_generation: i64,
    /// After a rotation, until the worker uses the new credential: the previous one works.
    pub credential_previous_ok: bool,
    /// An admin reset the credential: the next registration may use the join token.
    pub credential_join_ok: bool,
}

/// Resources held by the live bunkers placed on one worker.
#[derive(Debug, Clone, Default)]
pub struct Committed {
    pub cpu_millicores: i64,
    pub memory_mb: i64,
    pub disk_mb: i64,
    pub gpu_count: i64,
}

pub struct Registration<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub url: &'a str,
    pub runtime: &'a str,
    pub cpu_millicores: i64,
    pub memory_mb: i64,
    pub disk_mb: i64,
    pub gpu_count: i64,
}

impl Store {
    /// Inserts a worker or, if one with this name exists, refreshes it and keeps its id.
    /// Returns the id in force.
    pub async fn upsert_worker(&self, r: &Registration<'_>) -> Result<String, StoreError> {
        let now = now_ms();
        let mut tx = self.begin().await?;
        let existing: Option<String> = sqlx::query_scalar("SELECT id FROM workers WHERE name = ?")
            .bind(r.name)
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(id) = existing {
            // A draining worker stays draining across a restart; anything else is online.
            sqlx::query(
                "UPDATE workers SET url = ?, runtime = ?, \
                 status = CASE WHEN status = 'draining' THEN 'draining' ELSE 'online' END, \
                 cpu_millicores = ?, memory_mb = ?, disk_mb = ?, gpu_count = ?, \
                 last_heartbeat_at = ? WHERE id = ?",
            )
            .bind(r.url)
            .bind(r.runtime)
            .bind(r.cpu_millicores)
            .bind(r.memory_mb)
            .bind(r.disk_mb)
            .bind(r.gpu_count)
            .bind(now)
            .bind(&id)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            return Ok(id);
        }
        let id = r.id.to_owned();
        sqlx::query(
            "INSERT INTO workers (id, name, url, runtime, status, cpu_millicores, memory_mb, disk_mb, \
             gpu_count, free_cpu_millicores, free_memory_mb, free_disk_mb, free_gpu_count, \
             active_bunkers, registered_at, last_heartbeat_at) \
             VALUES (?, ?, ?, ?, 'online', ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?)",
        )
        .bind(&id)
        .bind(r.name)
        .bind(r.url)
        .bind(r.runtime)
        .bind(r.cpu_millicores)
        .bind(r.memory_mb)
        .bind(r.disk_mb)
        .bind(r.gpu_count)
        .bind(r.cpu_millicores)
        .bind(r.memory_mb)
        .bind(r.disk_mb)
        .bind(r.gpu_count)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(id)
    }

    /// The worker registered under `name`, if any.
    pub async fn worker_by_name(&self, name: &str) -> Result<Option<WorkerRow>, StoreError> {
        let id: Option<String> = sqlx::query_scalar("SELECT id FROM workers WHERE name = ?")
            .bind(name)
            .fetch_optional(self.pool())
            .await?;
        match id {
            Some(id) => self.worker(&id).await,
            None => Ok(None),
        }
    }

    /// Records that the worker now holds its credential of `generation` (issued at
    /// registration): no previous one works, the join token no longer registers it.
    pub async fn set_worker_credential(&self, id: &str, generation: i64) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE workers SET credential_generation = ?, credential_previous_ok = 0, \
             credential_join_ok = 0 WHERE id = ?",
        )
        .bind(generation)
        .bind(id)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Rotates a worker's credential (the previous one works until the worker uses the new
    /// one) or resets it (it stops working now; the join token registers the name once more).
    /// Returns the new generation, or `None` for an unknown worker.
    pub async fn bump_worker_credential(
        &self,
        id: &str,
        reset: bool,
    ) -> Result<Option<i64>, StoreError> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(if reset {
            "UPDATE workers SET credential_generation = credential_generation + 1, \
             credential_previous_ok = 0, credential_join_ok = 1 WHERE id = ?"
        } else {
            "UPDATE workers SET credential_generation = credential_generation + 1, \
             credential_previous_ok = 1 WHERE id = ?"
        })
        .bind(id)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            return Ok(None);
        }
        let generation: i64 =
            sqlx::query_scalar("SELECT credential_generation FROM workers WHERE id = ?")
                .bind(id)
                .fetch_one(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok(Some(generation))
    }

    /// The worker used its current credential: the previous one stops working.
    pub async fn worker_credential_switched(
        &self,
        id: &str,
        generation: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE workers SET credential_previous_ok = 0 \
             WHERE id = ? AND credential_generation = ? AND credential_previous_ok = 1",
        )
        .bind(id)
        .bind(generation)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Records a heartbeat. Returns false if the worker is unknown.
    pub async fn record_heartbeat(
        &self,
        worker_id: &str,
        free: &Committed,
        active_bunkers: i64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE workers SET last_heartbeat_at = ?, free_cpu_millicores = ?, free_memory_mb = ?, \
             free_disk_mb = ?, free_gpu_count = ?, active_bunkers = ?, \
             status = CASE WHEN status = 'offline' THEN 'online' ELSE status END WHERE id = ?",
        )
        .bind(now_ms())
        .bind(free.cpu_millicores)
        .bind(free.memory_mb)
        .bind(free.disk_mb)
        .bind(free.gpu_count)
        .bind(active_bunkers)
        .bind(worker_id)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn worker(&self, id: &str) -> Result<Option<WorkerRow>, StoreError> {
        let row = sqlx::query(
            "SELECT id, name, url, runtime, status, cpu_millicores, memory_mb, disk_mb, gpu_count, \
             last_heartbeat_at, free_cpu_millicores, free_memory_mb, free_disk_mb, free_gpu_count, \
             active_bunkers, registered_at, credential_generation, credential_previous_ok, \
             credential_join_ok FROM workers WHERE id = ?",
        )
        .bind(id)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.map(|r| worker_from_row(&r)))
    }

    pub async fn workers(&self) -> Result<Vec<WorkerRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, name, url, runtime, status, cpu_millicores, memory_mb, disk_mb, gpu_count, \
             last_heartbeat_at, free_cpu_millicores, free_memory_mb, free_disk_mb, free_gpu_count, \
             active_bunkers, registered_at, credential_generation, credential_previous_ok, \
             credential_join_ok FROM workers ORDER BY id",
        )
        .fetch_all(self.pool())
        .await?;
        Ok(rows.iter().map(worker_from_row).collect())
    }

    /// Resources held by non-terminal bunkers, per worker id.
    pub async fn committed_by_worker(
        &self,
        tx: &mut Tx<'_>,
    ) -> Result<Vec<(String, Committed)>, StoreError> {
        let rows = sqlx::query(
            // MariaDB sums BIGINTs as DECIMAL, which the Any driver cannot decode: cast back.
            "SELECT worker_id, CAST(SUM(cpu_millicores) AS SIGNED) AS cpu, \
             CAST(SUM(memory_mb) AS SIGNED) AS mem, CAST(SUM(disk_mb) AS SIGNED) AS disk, \
             CAST(SUM(gpu_count) AS SIGNED) AS gpu FROM bunkers \
             WHERE worker_id IS NOT NULL AND status NOT IN ('terminated', 'failed') \
             GROUP BY worker_id",
        )
        .fetch_all(&mut **tx)
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get("worker_id"),
                    Committed {
                        cpu_millicores: r.get("cpu"),
                        memory_mb: r.get("mem"),
                        disk_mb: r.get("disk"),
                        gpu_count: r.get("gpu"),
                    },
                )
            })
            .collect())
    }

    /// Sets a worker draining (no new bunkers) or back online. Returns false if unknown.
    pub async fn set_worker_draining(&self, id: &str, draining: bool) -> Result<bool, StoreError> {
        let done = if draining {
            sqlx::query("UPDATE workers SET status = 'draining' WHERE id = ?")
        } else {
            // Resuming a silent worker leaves it offline until it heartbeats again.
            sqlx::query(
                "UPDATE workers SET status = CASE WHEN status = 'draining' THEN 'online' ELSE status END WHERE id = ?",
            )
        }
        .bind(id)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Marks a worker `stopping` (a planned stop: no new bunkers until it registers again,
    /// which sets it `online`); a draining one stays draining, so its restart keeps that.
    /// Heartbeats meanwhile leave the status alone. Returns false if unknown.
    pub async fn set_worker_stopping(&self, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE workers SET status = CASE WHEN status = 'draining' THEN 'draining' \
             ELSE 'stopping' END WHERE id = ?",
        )
        .bind(id)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Marks an online worker offline (a draining one stays draining).
    pub async fn set_worker_offline(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE workers SET status = 'offline' WHERE id = ? AND status = 'online'")
            .bind(id)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// The image hashes a worker's ledger holds.
    pub async fn worker_images(&self, worker_id: &str) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT sha256 FROM worker_images WHERE worker_id = ? AND state = 'ready' ORDER BY sha256",
        )
        .bind(worker_id)
        .fetch_all(self.pool())
        .await?)
    }

    /// Reconciles a worker's cache ledger against the list it reports holding: `ready` rows
    /// for hashes it no longer reports are evicted, reported hashes become `ready` rows
    /// (whatever they were: a `queued` pull that finished, a failed one that healed). Writes
    /// only the difference, so a heartbeat with an unchanged cache is one read. A worker the
    /// database does not know gets no rows. Returns (added, evicted).
    pub async fn reconcile_worker_images(
        &self,
        worker_id: &str,
        reported: &[String],
    ) -> Result<(usize, usize), StoreError> {
        let ledger: Vec<(String, String)> =
            sqlx::query_as("SELECT sha256, state FROM worker_images WHERE worker_id = ?")
                .bind(worker_id)
                .fetch_all(self.pool())
                .await?;
        // Only `ready` rows are the worker's word; `queued` and `failed` rows are the
        // controller's (asked to fetch, or the fetch failed) and stay until reported.
        let evict: Vec<&String> = ledger
            .iter()
            .filter(|(sha, state)| state == "ready" && !reported.contains(sha))
            .map(|(sha, _)| sha)
            .collect();
        let add: Vec<&String> = reported
            .iter()
            .filter(|sha| {
                !ledger
                    .iter()
                    .any(|(l, state)| l == *sha && state == "ready")
            })
            .collect();
        if evict.is_empty() && add.is_empty() {
            return Ok((0, 0));
        }
        let now = now_ms();
        let mut tx = self.begin().await?;
        for sha in &evict {
            sqlx::query("DELETE FROM worker_images WHERE worker_id = ? AND sha256 = ?")
                .bind(worker_id)
                .bind(*sha)
                .execute(&mut *tx)
                .await?;
        }
        for sha in &add {
            // Delete-then-insert is an upsert both backends speak; the insert selects from
            // `workers` so an unknown worker gets nothing.
            sqlx::query("DELETE FROM worker_images WHERE worker_id = ? AND sha256 = ?")
                .bind(worker_id)
                .bind(*sha)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT INTO worker_images (worker_id, sha256, state, updated_at) \
                 SELECT id, ?, 'ready', ? FROM workers WHERE id = ?",
            )
            .bind(*sha)
            .bind(now)
            .bind(worker_id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok((add.len(), evict.len()))
    }

    /// Ids of workers whose ledger holds `sha256` ready.
    pub async fn workers_with_image(
        &self,
        tx: &mut Tx<'_>,
        sha256: &str,
    ) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT worker_id FROM worker_images WHERE sha256 = ? AND state = 'ready'",
        )
        .bind(sha256)
        .fetch_all(&mut **tx)
        .await?)
    }

    /// (worker id, sha256) for every worker whose ledger holds one of `shas` ready.
    pub async fn workers_with_images(
        &self,
        tx: &mut Tx<'_>,
        shas: &[String],
    ) -> Result<Vec<(String, String)>, StoreError> {
        let mut held = Vec::new();
        for sha in shas {
            for worker_id in self.workers_with_image(tx, sha).await? {
                held.push((worker_id, sha.clone()));
            }
        }
        Ok(held)
    }

    /// The fleet, read for placement: the rows stay locked until `tx` ends, so placements
    /// are serialized across controllers and each one sees every bunker placed before it.
    /// On MariaDB that takes `FOR UPDATE`, read before anything else in the transaction (its
    /// snapshot is then taken after the previous placement committed); SQLite's
    /// `BEGIN IMMEDIATE` already holds the database's single write lock.
    pub async fn workers_for_placement(
        &self,
        tx: &mut Tx<'_>,
    ) -> Result<Vec<WorkerRow>, StoreError> {
        let lock = match self.backend {
            Backend::MariaDb => " FOR UPDATE",
            Backend::Sqlite => "",
        };
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT id, name, url, runtime, status, cpu_millicores, memory_mb, disk_mb, gpu_count, \
             last_heartbeat_at, free_cpu_millicores, free_memory_mb, free_disk_mb, free_gpu_count, \
             active_bunkers, registered_at, credential_generation, credential_previous_ok, \
             credential_join_ok FROM workers ORDER BY id{lock}"
        )))
        .fetch_all(&mut **tx)
        .await?;
        Ok(rows.iter().map(worker_from_row).collect())
    }
}

fn worker_from_row(r: &sqlx::any::AnyRow) -> WorkerRow {
    WorkerRow {
        id: r.get("id"),
        name: r.get("name"),
        url: r.get("url"),
        runtime: r.get("runtime"),
        status: r.get("status"),
        cpu_millicores: r.get("cpu_millicores"),
        memory_mb: r.get("memory_mb"),
        disk_mb: r.get("disk_mb"),
        gpu_count: r.get("gpu_count"),
        last_heartbeat_at: r.get("last_heartbeat_at"),
        free_cpu_millicores: r.get("free_cpu_millicores"),
        free_memory_mb: r.get("free_memory_mb"),
        free_disk_mb: r.get("free_disk_mb"),
        free_gpu_count: r.get("free_gpu_count"),
        active_bunkers: r.get("active_bunkers"),
        registered_at: r.get("registered_at"),
        credential_generation: r.get("credential_generation"),
        credential_previous_ok: r.get::<i64, _>("credential_previous_ok") != 0,
        credential_join_ok: r.get::<i64, _>("credential_join_ok") != 0,
    }
}

/// A host bridge on a worker.
#[derive(Debug, Clone)]
pub struct BridgeRow {
    pub id: String,
    pub name: String,
    pub worker_id: String,
    pub created_at: i64,
}

impl Store {
    /// Records a bridge; `false` when the worker already has one of that name.
    pub async fn insert_bridge(&self, b: &BridgeRow) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO bridges (id, name, worker_id, created_at) SELECT ?, ?, ?, ? \
             WHERE NOT EXISTS (SELECT 1 FROM bridges WHERE worker_id = ? AND name = ?)",
        )
        .bind(&b.id)
        .bind(&b.name)
        .bind(&b.worker_id)
        .bind(b.created_at)
        .bind(&b.worker_id)
        .bind(&b.name)
        .execute(self.pool())
        .await;
        match done {
            Ok(d) => Ok(d.rows_affected() == 1),
            Err(e) => {
                let e = StoreError::from(e);
                if super::identity::is_unique_violation(&e) {
                    Ok(false)
                } else {
                    Err(e)
                }
            }
        }
    }

    pub async fn bridges(&self) -> Result<Vec<BridgeRow>, StoreError> {
        let rows: Vec<(String, String, String, i64)> = sqlx::query_as(
            "SELECT id, name, worker_id, created_at FROM bridges ORDER BY worker_id, name",
        )
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, name, worker_id, created_at)| BridgeRow {
                id,
                name,
                worker_id,
                created_at,
            })
            .collect())
    }

    pub async fn delete_bridge(&self, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM bridges WHERE id = ?")
            .bind(id)
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Ids of workers that own a bridge of every name in `names` (all workers' ids when
    /// `names` is empty is the caller's business: this returns none then).
    pub async fn workers_with_bridges(
        &self,
        tx: &mut Tx<'_>,
        names: &[String],
    ) -> Result<Vec<String>, StoreError> {
        let mut names: Vec<&String> = names.iter().collect();
        names.sort();
        names.dedup();
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let marks = vec!["?"; names.len()].join(", ");
        let sql = format!(
            "SELECT worker_id FROM bridges WHERE name IN ({marks}) GROUP BY worker_id \
             HAVING COUNT(DISTINCT name) = ?"
        );
        let mut q = sqlx::query_scalar(AssertSqlSafe(sql));
        for n in &names {
            q = q.bind(*n);
        }
        Ok(q.bind(names.len() as i64).fetch_all(&mut **tx).await?)
    }
}
