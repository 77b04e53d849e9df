-- MariaDB twin of migrations/sqlite/0009_snapshot_capture.sql.
ALTER TABLE snapshots ADD COLUMN renewed_at BIGINT NULL;
