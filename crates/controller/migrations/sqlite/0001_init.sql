-- Portable types on purpose: ids as text, timestamps as BIGINT Unix milliseconds, JSON as text,
-- so the same queries serve SQLite and (with its own migration set) MariaDB.

CREATE TABLE tenants (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    slug TEXT NOT NULL UNIQUE,
    partner_id TEXT,
    created_at BIGINT NOT NULL
);

CREATE TABLE users (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    email TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL,
    module_permissions TEXT,
    created_at BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    user_id TEXT NOT NULL REFERENCES users(id),
    name TEXT NOT NULL,
    key_sha256 TEXT NOT NULL UNIQUE,
    permissions TEXT,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);

CREATE TABLE workers (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    url TEXT NOT NULL,
    runtime TEXT NOT NULL,
    status TEXT NOT NULL,
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
);

CREATE TABLE images (
    id TEXT PRIMARY KEY,
    tenant_id TEXT,
    name TEXT NOT NULL,
    scope TEXT NOT NULL,
    status TEXT NOT NULL,
    sha256 TEXT,
    size_bytes BIGINT,
    lazy_pull BIGINT NOT NULL DEFAULT 0,
    default_cpu_millicores BIGINT,
    default_memory_mb BIGINT,
    default_disk_mb BIGINT,
    created_at BIGINT NOT NULL
);
CREATE INDEX images_by_name ON images(name);

-- Which worker holds which image bytes (the cache ledger).
CREATE TABLE worker_images (
    worker_id TEXT NOT NULL REFERENCES workers(id),
    sha256 TEXT NOT NULL,
    state TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (worker_id, sha256)
);

CREATE TABLE bunkers (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    owner_id TEXT NOT NULL,
    name TEXT,
    image_name TEXT NOT NULL,
    image_id TEXT NOT NULL,
    snapshot_id TEXT,
    lifecycle_mode TEXT NOT NULL,
    status TEXT NOT NULL,
    network_profile TEXT NOT NULL,
    network_allowlist TEXT NOT NULL,
    cpu_millicores BIGINT NOT NULL,
    memory_mb BIGINT NOT NULL,
    disk_mb BIGINT NOT NULL,
    gpu_count BIGINT NOT NULL,
    gpu_type TEXT,
    max_lifetime_s BIGINT,
    idle_timeout_s BIGINT NOT NULL,
    session_type TEXT NOT NULL,
    session_ref TEXT,
    label_set TEXT NOT NULL,
    env_vars TEXT NOT NULL,
    interfaces TEXT NOT NULL,
    bandwidth_mbit BIGINT,
    worker_id TEXT,
    failure_reason TEXT,
    created_at BIGINT NOT NULL,
    started_at BIGINT,
    last_activity_at BIGINT,
    terminated_at BIGINT
);
CREATE INDEX bunkers_by_tenant ON bunkers(tenant_id, created_at, id);
CREATE INDEX bunkers_by_worker ON bunkers(worker_id, status);

CREATE TABLE exec_log (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    bunker_id TEXT NOT NULL,
    actor_id TEXT NOT NULL,
    command TEXT NOT NULL,
    exit_code BIGINT,
    duration_ms BIGINT NOT NULL,
    timed_out BIGINT NOT NULL,
    output_preview TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX exec_log_by_bunker ON exec_log(tenant_id, bunker_id, created_at);

CREATE TABLE audit_events (
    id TEXT PRIMARY KEY,
    time BIGINT NOT NULL,
    tenant_id TEXT,
    actor_id TEXT,
    actor_type TEXT NOT NULL,
    action TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    resource_id TEXT,
    status TEXT NOT NULL,
    ip TEXT,
    request_id TEXT,
    details TEXT NOT NULL
);
CREATE INDEX audit_by_tenant ON audit_events(tenant_id, time);
