//! Quota profiles, assignments, what each bunker was charged, and usage ticks.
//!
//! A profile's `tenant_id` is NULL for the platform default; tenant-facing functions take the
//! tenant id first and see their tenant's profiles beside the platform's. Cross-tenant reads
//! (the rebuild of live counters, the usage tick) are the `admin_` functions.

use std::collections::HashMap;

use sqlx::any::AnyRow;
use sqlx::{AssertSqlSafe, Row};

use super::audit::{self, AuditEvent};
use super::{Backend, Store, StoreError, Tx};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileRow {
    pub id: String,
    pub tenant_id: Option<String>,
    /// `platform` or `tenant`: who made it (see migration 0007).
    pub origin: String,
    pub name: String,
    pub description: Option<String>,
    pub max_concurrent_bunkers: Option<i64>,
    pub max_persistent_bunkers: Option<i64>,
    pub max_cpu_millicores: Option<i64>,
    pub max_memory_mb: Option<i64>,
    pub max_disk_mb: Option<i64>,
    pub max_gpu_count: Option<i64>,
    pub per_bunker_max_cpu: Option<i64>,
    pub per_bunker_max_memory: Option<i64>,
    pub per_bunker_max_disk: Option<i64>,
    pub per_bunker_max_gpu: Option<i64>,
    /// Caps the stored bytes of the tenant of whoever it applies to (migration 0012).
    pub max_storage_mb: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
}

const PROFILE_COLUMNS: &str = "p.id, p.tenant_id, p.origin, p.name, p.description, \
    p.max_concurrent_bunkers, p.max_persistent_bunkers, p.max_cpu_millicores, p.max_memory_mb, \
    p.max_disk_mb, p.max_gpu_count, p.per_bunker_max_cpu, p.per_bunker_max_memory, \
    p.per_bunker_max_disk, p.per_bunker_max_gpu, p.max_storage_mb, p.created_at, p.updated_at";

fn profile_from(r: &AnyRow) -> ProfileRow {
    ProfileRow {
        id: r.get("id"),
        tenant_id: r.get("tenant_id"),
        origin: r.get("origin"),
        name: r.get("name"),
        description: r.get("description"),
        max_concurrent_bunkers: r.get("max_concurrent_bunkers"),
        max_persistent_bunkers: r.get("max_persistent_bunkers"),
        max_cpu_millicores: r.get("max_cpu_millicores"),
        max_memory_mb: r.get("max_memory_mb"),
        max_disk_mb: r.get("max_disk_mb"),
        max_gpu_count: r.get("max_gpu_count"),
        per_bunker_max_cpu: r.get("per_bunker_max_cpu"),
        per_bunker_max_memory: r.get("per_bunker_max_memory"),
        per_bunker_max_disk: r.get("per_bunker_max_disk"),
        per_bunker_max_gpu: r.get("per_bunker_max_gpu"),
        max_storage_mb: r.get("max_storage_mb"),
        created_at: r.get("created_at"),
        updated_at: r.get("updated_at"),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssignmentRow {
    pub id: String,
    pub profile_id: String,
    pub tenant_id: String,
    pub target_kind: String,
    pub target_id: String,
    pub mode: String,
    pub created_at: i64,
}

fn assignment_from(r: &AnyRow) -> AssignmentRow {
    AssignmentRow {
        id: r.get("id"),
        profile_id: r.get("profile_id"),
        tenant_id: r.get("tenant_id"),
        target_kind: r.get("target_kind"),
        target_id: r.get("target_id"),
        mode: r.get("mode"),
        created_at: r.get("created_at"),
    }
}

/// `tenant_id` as the key the scoping clause compares: '' for the platform.
fn scope(tenant_id: Option<&str>) -> &str {
    tenant_id.unwrap_or("")
}

/// One per-bunker usage tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageTick {
    pub bunker_id: String,
    pub tick_start: i64,
    pub tenant_id: String,
    pub user_id: String,
    pub duration_ms: i64,
    pub cpu_millicore_s: i64,
    pub memory_mb_s: i64,
    pub disk_mb_s: i64,
    pub gpu_s: i64,
}

/// A bunker that ran during some window, with what it held.
#[derive(Debug, Clone)]
pub struct RanBunker {
    pub id: String,
    pub tenant_id: String,
    pub owner_id: String,
    pub started_at: i64,
    pub terminated_at: Option<i64>,
    pub cpu_millicores: i64,
    pub memory_mb: i64,
    pub disk_mb: i64,
    pub gpu_count: i64,
}

/// Filters and grouping of an accounting query.
#[derive(Debug, Clone, Default)]
pub struct UsageQuery {
    /// `None`: every tenant (platform admins only).
    pub tenant_id: Option<String>,
    pub user_id: Option<String>,
    pub start_ms: Option<i64>,
    pub end_ms: Option<i64>,
    pub by_tenant: bool,
    pub by_user: bool,
    /// Period length in ms (an hour or a day), when grouped by period.
    pub period_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    pub tenant_id: Option<String>,
    pub user_id: Option<String>,
    pub period_start: Option<i64>,
    pub cpu_millicore_s: i64,
    pub memory_mb_s: i64,
    pub disk_mb_s: i64,
    pub gpu_s: i64,
    pub ticks: i64,
}

/// Commits `tx`, auditing `event` in it when the statement changed a row; returns whether it did.
async fn commit_audited(
    mut tx: Tx<'_>,
    changed: bool,
    event: &AuditEvent,
) -> Result<bool, StoreError> {
    if changed {
        audit::insert(&mut tx, event).await?;
    }
    tx.commit().await?;
    Ok(changed)
}

/// Inserts a bunker's charges, in the transaction that inserts the bunker.
pub async fn insert_charges(
    tx: &mut Tx<'_>,
    bunker_id: &str,
    charges: &[(String, i64)],
) -> Result<(), StoreError> {
    for (counter, amount) in charges {
        sqlx::query("INSERT INTO quota_charges (bunker_id, counter, amount) VALUES (?, ?, ?)")
            .bind(bunker_id)
            .bind(counter)
            .bind(amount)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

impl Store {
    pub async fn insert_quota_profile(
        &self,
        p: &ProfileRow,
        event: &AuditEvent,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO quota_profiles (id, tenant_id, origin, name, description, \
             max_concurrent_bunkers, max_persistent_bunkers, max_cpu_millicores, max_memory_mb, \
             max_disk_mb, max_gpu_count, per_bunker_max_cpu, per_bunker_max_memory, \
             per_bunker_max_disk, per_bunker_max_gpu, max_storage_mb, created_at, updated_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&p.id)
        .bind(&p.tenant_id)
        .bind(&p.origin)
        .bind(&p.name)
        .bind(&p.description)
        .bind(p.max_concurrent_bunkers)
        .bind(p.max_persistent_bunkers)
        .bind(p.max_cpu_millicores)
        .bind(p.max_memory_mb)
        .bind(p.max_disk_mb)
        .bind(p.max_gpu_count)
        .bind(p.per_bunker_max_cpu)
        .bind(p.per_bunker_max_memory)
        .bind(p.per_bunker_max_disk)
        .bind(p.per_bunker_max_gpu)
        .bind(p.max_storage_mb)
        .bind(p.created_at)
        .bind(p.updated_at)
        .execute(&mut *tx)
        .await?;
        audit::insert(&mut tx, event).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Rewrites a profile owned by `tenant_id` (`None`: the platform). False if there is none.
    pub async fn update_quota_profile(
        &self,
        tenant_id: Option<&str>,
        p: &ProfileRow,
        event: &AuditEvent,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "UPDATE quota_profiles SET name = ?, description = ?, max_concurrent_bunkers = ?, \
             max_persistent_bunkers = ?, max_cpu_millicores = ?, max_memory_mb = ?, \
             max_disk_mb = ?, max_gpu_count = ?, per_bunker_max_cpu = ?, \
             per_bunker_max_memory = ?, per_bunker_max_disk = ?, per_bunker_max_gpu = ?, \
             max_storage_mb = ?, updated_at = ? WHERE COALESCE(tenant_id, '') = ? AND id = ?",
        )
        .bind(&p.name)
        .bind(&p.description)
        .bind(p.max_concurrent_bunkers)
        .bind(p.max_persistent_bunkers)
        .bind(p.max_cpu_millicores)
        .bind(p.max_memory_mb)
        .bind(p.max_disk_mb)
        .bind(p.max_gpu_count)
        .bind(p.per_bunker_max_cpu)
        .bind(p.per_bunker_max_memory)
        .bind(p.per_bunker_max_disk)
        .bind(p.per_bunker_max_gpu)
        .bind(p.max_storage_mb)
        .bind(p.updated_at)
        .bind(scope(tenant_id))
        .bind(&p.id)
        .execute(&mut *tx)
        .await?;
        commit_audited(tx, done.rows_affected() == 1, event).await
    }

    /// Deletes a profile owned by `tenant_id` (`None`: the platform) and its assignments.
    pub async fn delete_quota_profile(
        &self,
        tenant_id: Option<&str>,
        id: &str,
        event: &AuditEvent,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "DELETE FROM quota_assignments WHERE profile_id IN \
             (SELECT id FROM quota_profiles WHERE COALESCE(tenant_id, '') = ? AND id = ?)",
        )
        .bind(scope(tenant_id))
        .bind(id)
        .execute(&mut *tx)
        .await?;
        let done =
            sqlx::query("DELETE FROM quota_profiles WHERE COALESCE(tenant_id, '') = ? AND id = ?")
                .bind(scope(tenant_id))
                .bind(id)
                .execute(&mut *tx)
                .await?;
        commit_audited(tx, done.rows_affected() == 1, event).await
    }

    /// A profile the tenant sees: its own, or a platform one.
    pub async fn quota_profile(
        &self,
        tenant_id: &str,
        id: &str,
    ) -> Result<Option<ProfileRow>, StoreError> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {PROFILE_COLUMNS} FROM quota_profiles p \
             WHERE (p.tenant_id = ? OR p.tenant_id IS NULL) AND p.id = ?"
        )))
        .bind(tenant_id)
        .bind(id)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.as_ref().map(profile_from))
    }

    /// The tenant's profiles and the platform's, oldest first.
    pub async fn quota_profiles(&self, tenant_id: &str) -> Result<Vec<ProfileRow>, StoreError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {PROFILE_COLUMNS} FROM quota_profiles p \
             WHERE p.tenant_id = ? OR p.tenant_id IS NULL ORDER BY p.created_at, p.id"
        )))
        .bind(tenant_id)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.iter().map(profile_from).collect())
    }

    /// Any tenant's profile by id (platform admins).
    pub async fn admin_quota_profile(&self, id: &str) -> Result<Option<ProfileRow>, StoreError> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {PROFILE_COLUMNS} FROM quota_profiles p WHERE p.id = ?"
        )))
        .bind(id)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.as_ref().map(profile_from))
    }

    /// Every profile (platform admins), oldest first.
    pub async fn admin_quota_profiles(&self) -> Result<Vec<ProfileRow>, StoreError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {PROFILE_COLUMNS} FROM quota_profiles p ORDER BY p.created_at, p.id"
        )))
        .fetch_all(self.pool())
        .await?;
        Ok(rows.iter().map(profile_from).collect())
    }

    /// The platform default profiles (`tenant_id` NULL).
    pub async fn platform_quota_profiles(&self) -> Result<Vec<ProfileRow>, StoreError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {PROFILE_COLUMNS} FROM quota_profiles p WHERE p.tenant_id IS NULL \
             ORDER BY p.created_at, p.id"
        )))
        .fetch_all(self.pool())
        .await?;
        Ok(rows.iter().map(profile_from).collect())
    }

    pub async fn insert_quota_assignment(
        &self,
        a: &AssignmentRow,
        event: &AuditEvent,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO quota_assignments (id, profile_id, tenant_id, target_kind, target_id, \
             mode, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&a.id)
        .bind(&a.profile_id)
        .bind(&a.tenant_id)
        .bind(&a.target_kind)
        .bind(&a.target_id)
        .bind(&a.mode)
        .bind(a.created_at)
        .execute(&mut *tx)
        .await?;
        audit::insert(&mut tx, event).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn quota_assignments(
        &self,
        tenant_id: &str,
        profile_id: &str,
    ) -> Result<Vec<AssignmentRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, profile_id, tenant_id, target_kind, target_id, mode, created_at \
             FROM quota_assignments WHERE tenant_id = ? AND profile_id = ? ORDER BY created_at, id",
        )
        .bind(tenant_id)
        .bind(profile_id)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.iter().map(assignment_from).collect())
    }

    pub async fn delete_quota_assignment(
        &self,
        tenant_id: &str,
        profile_id: &str,
        id: &str,
        event: &AuditEvent,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "DELETE FROM quota_assignments WHERE tenant_id = ? AND profile_id = ? AND id = ?",
        )
        .bind(tenant_id)
        .bind(profile_id)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        commit_audited(tx, done.rows_affected() == 1, event).await
    }

    /// The groups `user_id` is a direct member of, and every group's parent in the tenant.
    pub async fn group_tree(
        &self,
        tenant_id: &str,
        user_id: &str,
    ) -> Result<(Vec<String>, HashMap<String, String>), StoreError> {
        let direct: Vec<String> = sqlx::query_scalar(
            "SELECT m.group_id FROM group_members m JOIN user_groups g ON g.id = m.group_id \
             WHERE g.tenant_id = ? AND m.user_id = ?",
        )
        .bind(tenant_id)
        .bind(user_id)
        .fetch_all(self.pool())
        .await?;
        let parents: Vec<(String, String)> = sqlx::query_as(
            "SELECT id, parent_group_id FROM user_groups \
             WHERE tenant_id = ? AND parent_group_id IS NOT NULL",
        )
        .bind(tenant_id)
        .fetch_all(self.pool())
        .await?;
        Ok((direct, parents.into_iter().collect()))
    }

    /// The assignments of the tenant on `user_id`, any of `group_ids` or the whole tenant, with
    /// their profiles.
    pub async fn quota_assignments_on(
        &self,
        tenant_id: &str,
        user_id: &str,
        group_ids: &[&str],
    ) -> Result<Vec<(AssignmentRow, ProfileRow)>, StoreError> {
        let mut sql = format!(
            "SELECT a.id AS a_id, a.profile_id, a.tenant_id AS a_tenant_id, a.target_kind, \
             a.target_id, a.mode, a.created_at AS a_created_at, {PROFILE_COLUMNS} \
             FROM quota_assignments a JOIN quota_profiles p ON p.id = a.profile_id \
             WHERE a.tenant_id = ? AND ((a.target_kind = 'tenant' AND a.target_id = a.tenant_id) \
             OR (a.target_kind = 'user' AND a.target_id = ?)"
        );
        if !group_ids.is_empty() {
            let placeholders = vec!["?"; group_ids.len()].join(", ");
            sql.push_str(&format!(
                " OR (a.target_kind = 'group' AND a.target_id IN ({placeholders}))"
            ));
        }
        sql.push_str(") ORDER BY a.created_at, a.id");
        let mut q = sqlx::query(AssertSqlSafe(sql))
            .bind(tenant_id)
            .bind(user_id);
        for g in group_ids {
            q = q.bind(*g);
        }
        let rows = q.fetch_all(self.pool()).await?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    AssignmentRow {
                        id: r.get("a_id"),
                        profile_id: r.get("profile_id"),
                        tenant_id: r.get("a_tenant_id"),
                        target_kind: r.get("target_kind"),
                        target_id: r.get("target_id"),
                        mode: r.get("mode"),
                        created_at: r.get("a_created_at"),
                    },
                    profile_from(r),
                )
            })
            .collect())
    }

    /// What every bunker that has not ended was charged, with its creation time.
    pub async fn admin_live_charges(&self) -> Result<Vec<(String, i64, String, i64)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT c.bunker_id, b.created_at, c.counter, c.amount FROM quota_charges c \
             JOIN bunkers b ON b.id = c.bunker_id \
             WHERE b.status NOT IN ('terminated', 'failed') ORDER BY c.bunker_id",
        )
        .fetch_all(self.pool())
        .await?)
    }

    /// Of `ids`, the status of each that exists.
    pub async fn admin_bunker_statuses(
        &self,
        ids: &[String],
    ) -> Result<HashMap<String, String>, StoreError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let placeholders = vec!["?"; ids.len()].join(", ");
        let sql = format!("SELECT id, status FROM bunkers WHERE id IN ({placeholders})");
        let mut q = sqlx::query_as::<_, (String, String)>(AssertSqlSafe(sql));
        for id in ids {
            q = q.bind(id);
        }
        Ok(q.fetch_all(self.pool()).await?.into_iter().collect())
    }

    /// Bunkers that had started before `end` and had not ended by `start`.
    pub async fn admin_bunkers_ran_between(
        &self,
        start: i64,
        end: i64,
    ) -> Result<Vec<RanBunker>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, tenant_id, owner_id, started_at, terminated_at, cpu_millicores, \
             memory_mb, disk_mb, gpu_count FROM bunkers WHERE started_at IS NOT NULL \
             AND started_at < ? AND (terminated_at IS NULL OR terminated_at > ?)",
        )
        .bind(end)
        .bind(start)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .iter()
            .map(|r| RanBunker {
                id: r.get("id"),
                tenant_id: r.get("tenant_id"),
                owner_id: r.get("owner_id"),
                started_at: r.get("started_at"),
                terminated_at: r.get("terminated_at"),
                cpu_millicores: r.get("cpu_millicores"),
                memory_mb: r.get("memory_mb"),
                disk_mb: r.get("disk_mb"),
                gpu_count: r.get("gpu_count"),
            })
            .collect())
    }

    /// Records ticks; a tick already recorded for its bunker is left as it is. Returns how many
    /// were new.
    pub async fn admin_insert_usage_ticks(&self, ticks: &[UsageTick]) -> Result<u64, StoreError> {
        let verb = match self.backend() {
            Backend::Sqlite => "INSERT OR IGNORE",
            Backend::MariaDb => "INSERT IGNORE",
        };
        let sql = format!(
            "{verb} INTO usage_ticks (bunker_id, tick_start, tenant_id, user_id, duration_ms, \
             cpu_millicore_s, memory_mb_s, disk_mb_s, gpu_s) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
        );
        let mut tx = self.begin().await?;
        let mut inserted = 0;
        for t in ticks {
            let done = sqlx::query(AssertSqlSafe(sql.clone()))
                .bind(&t.bunker_id)
                .bind(t.tick_start)
                .bind(&t.tenant_id)
                .bind(&t.user_id)
                .bind(t.duration_ms)
                .bind(t.cpu_millicore_s)
                .bind(t.memory_mb_s)
                .bind(t.disk_mb_s)
                .bind(t.gpu_s)
                .execute(&mut *tx)
                .await?;
            inserted += done.rows_affected();
        }
        tx.commit().await?;
        Ok(inserted)
    }

    /// Usage summed over ticks, grouped as asked. `q.tenant_id` `None` reads every tenant.
    pub async fn usage(&self, q: &UsageQuery) -> Result<Vec<UsageRow>, StoreError> {
        let mut select = Vec::new();
        let mut group = Vec::new();
        if q.by_tenant {
            select.push("tenant_id".to_owned());
            group.push("tenant_id".to_owned());
        } else {
            select.push("NULL AS tenant_id".to_owned());
        }
        if q.by_user {
            select.push("user_id".to_owned());
            group.push("user_id".to_owned());
        } else {
            select.push("NULL AS user_id".to_owned());
        }
        match q.period_ms {
            Some(p) => {
                // Integer arithmetic both backends agree on (MariaDB's `/` is decimal).
                let expr = format!("(tick_start - (tick_start % {p}))");
                select.push(format!("{expr} AS period_start"));
                group.push(expr);
            }
            None => select.push("NULL AS period_start".to_owned()),
        }
        let mut sql = format!(
            "SELECT {}, CAST(COALESCE(SUM(cpu_millicore_s), 0) AS SIGNED) AS cpu, \
             CAST(COALESCE(SUM(memory_mb_s), 0) AS SIGNED) AS mem, \
             CAST(COALESCE(SUM(disk_mb_s), 0) AS SIGNED) AS disk, \
             CAST(COALESCE(SUM(gpu_s), 0) AS SIGNED) AS gpu, COUNT(*) AS ticks \
             FROM usage_ticks WHERE 1 = 1",
            select.join(", ")
        );
        if self.backend() == Backend::Sqlite {
            sql = sql.replace("AS SIGNED", "AS INTEGER");
        }
        let mut binds: Vec<BindValue> = Vec::new();
        if let Some(t) = &q.tenant_id {
            sql.push_str(" AND tenant_id = ?");
            binds.push(BindValue::Text(t.clone()));
        }
        if let Some(u) = &q.user_id {
            sql.push_str(" AND user_id = ?");
            binds.push(BindValue::Text(u.clone()));
        }
        if let Some(s) = q.start_ms {
            sql.push_str(" AND tick_start >= ?");
            binds.push(BindValue::Int(s));
        }
        if let Some(e) = q.end_ms {
            sql.push_str(" AND tick_start < ?");
            binds.push(BindValue::Int(e));
        }
        if !group.is_empty() {
            sql.push_str(&format!(" GROUP BY {}", group.join(", ")));
            sql.push_str(&format!(" ORDER BY {}", group.join(", ")));
        }
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for b in binds {
            query = match b {
                BindValue::Text(t) => query.bind(t),
                BindValue::Int(i) => query.bind(i),
            };
        }
        let rows = query.fetch_all(self.pool()).await?;
        Ok(rows
            .iter()
            .filter(|r| r.get::<i64, _>("ticks") > 0)
            .map(|r| UsageRow {
                tenant_id: r.get("tenant_id"),
                user_id: r.get("user_id"),
                period_start: r.get("period_start"),
                cpu_millicore_s: r.get("cpu"),
                memory_mb_s: r.get("mem"),
                disk_mb_s: r.get("disk"),
                gpu_s: r.get("gpu"),
                ticks: r.get("ticks"),
            })
            .collect())
    }
}

enum BindValue {
    Text(String),
    Int(i64),
}
