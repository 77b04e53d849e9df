-- MariaDB twin of migrations/sqlite/0010_worker_credentials.sql.
ALTER TABLE workers ADD COLUMN credential_generation BIGINT NOT NULL DEFAULT 0;
ALTER TABLE workers ADD COLUMN credential_previous_ok BIGINT NOT NULL DEFAULT 0;
ALTER TABLE workers ADD COLUMN credential_join_ok BIGINT NOT NULL DEFAULT 0;
