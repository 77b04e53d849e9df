-- MariaDB twin of migrations/sqlite/0005_snapshots.sql.

CREATE TABLE snapshots (
    id VARCHAR(64) PRIMARY KEY,
    tenant_id VARCHAR(64) NOT NULL,
    owner_id VARCHAR(64) NOT NULL,
    bunker_id VARCHAR(64) NOT NULL,
    status VARCHAR(16) NOT NULL,
    kind VARCHAR(16) NOT NULL,
    size_bytes BIGINT NOT NULL DEFAULT 0,
    image_name VARCHAR(128) NOT NULL,
    image_id VARCHAR(64) NOT NULL,
    cpu_millicores BIGINT NOT NULL,
    memory_mb BIGINT NOT NULL,
    disk_mb BIGINT NOT NULL,
    manifest MEDIUMTEXT,
    failure_reason TEXT,
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    INDEX snapshots_by_tenant (tenant_id, created_at, id),
    INDEX snapshots_by_expiry (expires_at),
    FOREIGN KEY (tenant_id) REFERENCES tenants(id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
