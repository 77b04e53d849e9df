-- MariaDB twin of migrations/sqlite/0001_init.sql: the same tables and columns; ids and
-- indexed text as VARCHAR (InnoDB cannot index TEXT without a prefix), JSON as TEXT with a
-- binary collation so label matching is case-sensitive as on SQLite.

CREATE TABLE tenants (
    id VARCHAR(64) PRIMARY KEY,
    name VARCHAR(128) NOT NULL,
    slug VARCHAR(63) NOT NULL UNIQUE,
    partner_id VARCHAR(64),
    created_at BIGINT NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE users (
    id VARCHAR(64) PRIMARY KEY,
    tenant_id VARCHAR(64) NOT NULL,
    email VARCHAR(254) NOT NULL UNIQUE,
    role VARCHAR(32) NOT NULL,
    module_permissions TEXT,
    created_at BIGINT NOT NULL,
    FOREIGN KEY (tenant_id) REFERENCES tenants(id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE api_keys (
    id VARCHAR(64) PRIMARY KEY,
    tenant_id VARCHAR(64) NOT NULL,
    user_id VARCHAR(64) NOT NULL,
    name VARCHAR(128) NOT NULL,
    key_sha256 CHAR(64) NOT NULL UNIQUE,
    permissions TEXT,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT,
    FOREIGN KEY (tenant_id) REFERENCES tenants(id),
    FOREIGN KEY (user_id) REFERENCES users(id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE workers (
    id VARCHAR(64) PRIMARY KEY,
    name VARCHAR(128) NOT NULL UNIQUE,
    url VARCHAR(512) NOT NULL,
    runtime VARCHAR(64) NOT NULL,
    status VARCHAR(32) NOT NULL,
    cpu_millicores BIGINT NOT NULL,
    memory_mb BIGINT NOT NULL,
    disk_mb BIGINT NOT NULL,
    gpu_count BIGINT NOT NULL,
    free_cpu_millicores BIGINT NOT NULL,
    free_memory_mb BIGINT NOT NULL,
    free_disk_mb BIGINT NOT NULL,
    free_gpu_count BIGINT NOT NULL,
    active_bunkers BIGINT NOT NULL DEFAULT 0,
    registered_at BIGINT NOT NULL,
    last_heartbeat_at BIGINT NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE images (
    id VARCHAR(64) PRIMARY KEY,
    tenant_id VARCHAR(64),
    name VARCHAR(128) NOT NULL,
    scope VARCHAR(16) NOT NULL,
    status VARCHAR(16) NOT NULL,
    sha256 CHAR(64),
    size_bytes BIGINT,
    lazy_pull BIGINT NOT NULL DEFAULT 0,
    default_cpu_millicores BIGINT,
    default_memory_mb BIGINT,
    default_disk_mb BIGINT,
    created_at BIGINT NOT NULL,
    INDEX images_by_name (name)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE worker_images (
    worker_id VARCHAR(64) NOT NULL,
    sha256 CHAR(64) NOT NULL,
    state VARCHAR(16) NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (worker_id, sha256),
    FOREIGN KEY (worker_id) REFERENCES workers(id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE bunkers (
    id VARCHAR(64) PRIMARY KEY,
    tenant_id VARCHAR(64) NOT NULL,
    owner_id VARCHAR(64) NOT NULL,
    name VARCHAR(128),
    image_name VARCHAR(128) NOT NULL,
    image_id VARCHAR(64) NOT NULL,
    snapshot_id VARCHAR(64),
    lifecycle_mode VARCHAR(16) NOT NULL,
    status VARCHAR(16) NOT NULL,
    network_profile VARCHAR(16) NOT NULL,
    network_allowlist TEXT NOT NULL,
    cpu_millicores BIGINT NOT NULL,
    memory_mb BIGINT NOT NULL,
    disk_mb BIGINT NOT NULL,
    gpu_count BIGINT NOT NULL,
    gpu_type VARCHAR(64),
    max_lifetime_s BIGINT,
    idle_timeout_s BIGINT NOT NULL,
    session_type VARCHAR(16) NOT NULL,
    session_ref VARCHAR(256),
    label_set TEXT NOT NULL,
    env_vars MEDIUMTEXT NOT NULL,
    interfaces TEXT NOT NULL,
    bandwidth_mbit BIGINT,
    worker_id VARCHAR(64),
    failure_reason TEXT,
    created_at BIGINT NOT NULL,
    started_at BIGINT,
    last_activity_at BIGINT,
    terminated_at BIGINT,
    INDEX bunkers_by_tenant (tenant_id, created_at, id),
    INDEX bunkers_by_worker (worker_id, status),
    FOREIGN KEY (tenant_id) REFERENCES tenants(id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE exec_log (
    id VARCHAR(64) PRIMARY KEY,
    tenant_id VARCHAR(64) NOT NULL,
    bunker_id VARCHAR(64) NOT NULL,
    actor_id VARCHAR(64) NOT NULL,
    command TEXT NOT NULL,
    exit_code BIGINT,
    duration_ms BIGINT NOT NULL,
    timed_out BIGINT NOT NULL,
    output_preview TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    INDEX exec_log_by_bunker (tenant_id, bunker_id, created_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE audit_events (
    id VARCHAR(64) PRIMARY KEY,
    time BIGINT NOT NULL,
    tenant_id VARCHAR(64),
    actor_id VARCHAR(64),
    actor_type VARCHAR(16) NOT NULL,
    action VARCHAR(64) NOT NULL,
    resource_type VARCHAR(32) NOT NULL,
    resource_id VARCHAR(64),
    status VARCHAR(16) NOT NULL,
    ip VARCHAR(64),
    request_id VARCHAR(64),
    details TEXT NOT NULL,
    INDEX audit_by_tenant (tenant_id, time)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
