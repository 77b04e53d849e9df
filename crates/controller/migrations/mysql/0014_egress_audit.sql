-- MariaDB twin of migrations/sqlite/0014_egress_audit.sql.
ALTER TABLE bunkers ADD COLUMN last_worker_id VARCHAR(64) NULL;
ALTER TABLE bunkers ADD COLUMN egress_purged_at BIGINT NULL;
CREATE INDEX bunkers_by_egress_purge ON bunkers(egress_purged_at, terminated_at);
