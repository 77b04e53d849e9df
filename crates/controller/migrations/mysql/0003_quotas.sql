-- MariaDB twin of migrations/sqlite/0003_quotas.sql.

CREATE TABLE quota_profiles (
    id VARCHAR(64) PRIMARY KEY,
    tenant_id VARCHAR(64),
    name VARCHAR(128) NOT NULL,
    description TEXT,
    max_concurrent_bunkers BIGINT,
    max_persistent_bunkers BIGINT,
    max_cpu_millicores BIGINT,
    max_memory_mb BIGINT,
    max_disk_mb BIGINT,
    max_gpu_count BIGINT,
    per_bunker_max_cpu BIGINT,
    per_bunker_max_memory BIGINT,
    per_bunker_max_disk BIGINT,
    per_bunker_max_gpu BIGINT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    INDEX quota_profiles_by_tenant (tenant_id),
    FOREIGN KEY (tenant_id) REFERENCES tenants(id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE quota_assignments (
    id VARCHAR(64) PRIMARY KEY,
    profile_id VARCHAR(64) NOT NULL,
    tenant_id VARCHAR(64) NOT NULL,
    target_kind VARCHAR(16) NOT NULL,
    target_id VARCHAR(64) NOT NULL,
    mode VARCHAR(16) NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE KEY quota_assignments_target (target_kind, target_id),
    INDEX quota_assignments_by_profile (profile_id),
    FOREIGN KEY (profile_id) REFERENCES quota_profiles(id),
    FOREIGN KEY (tenant_id) REFERENCES tenants(id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE quota_charges (
    bunker_id VARCHAR(64) NOT NULL,
    counter VARCHAR(255) NOT NULL,
    amount BIGINT NOT NULL,
    PRIMARY KEY (bunker_id, counter)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE usage_ticks (
    bunker_id VARCHAR(64) NOT NULL,
    tick_start BIGINT NOT NULL,
    tenant_id VARCHAR(64) NOT NULL,
    user_id VARCHAR(64) NOT NULL,
    duration_ms BIGINT NOT NULL,
    cpu_millicore_s BIGINT NOT NULL,
    memory_mb_s BIGINT NOT NULL,
    disk_mb_s BIGINT NOT NULL,
    gpu_s BIGINT NOT NULL,
    PRIMARY KEY (bunker_id, tick_start),
    INDEX usage_ticks_by_tenant (tenant_id, tick_start)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
