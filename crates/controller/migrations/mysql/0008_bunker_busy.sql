-- MariaDB twin of migrations/sqlite/0008_bunker_busy.sql.
ALTER TABLE bunkers ADD COLUMN busy_until BIGINT NULL;
