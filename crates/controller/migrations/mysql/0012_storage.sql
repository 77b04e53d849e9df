-- MariaDB twin of migrations/sqlite/0011_storage.sql.
ALTER TABLE quota_profiles ADD COLUMN max_storage_mb BIGINT NULL;

CREATE TABLE exec_spills (
    object_key VARCHAR(255) PRIMARY KEY,
    tenant_id VARCHAR(64) NOT NULL,
    bunker_id VARCHAR(64) NOT NULL,
    exec_id VARCHAR(64) NOT NULL,
    size_bytes BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    INDEX exec_spills_by_bunker (tenant_id, bunker_id),
    INDEX exec_spills_by_age (created_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
