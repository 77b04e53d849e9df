-- Quota profiles, their assignments, what each bunker was charged, and usage ticks.

-- A NULL tenant_id is the platform default; a NULL cap is no cap.
CREATE TABLE quota_profiles (
    id TEXT PRIMARY KEY,
    tenant_id TEXT REFERENCES tenants(id),
    name TEXT NOT NULL,
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
    updated_at BIGINT NOT NULL
);
CREATE INDEX quota_profiles_by_tenant ON quota_profiles(tenant_id);

-- One assignment per target (a user or a group): the unique key enforces it.
CREATE TABLE quota_assignments (
    id TEXT PRIMARY KEY,
    profile_id TEXT NOT NULL REFERENCES quota_profiles(id),
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    target_kind TEXT NOT NULL,
    target_id TEXT NOT NULL,
    mode TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (target_kind, target_id)
);
CREATE INDEX quota_assignments_by_profile ON quota_assignments(profile_id);

-- What create charged each bunker (the durable twin of the live stash `quota:bunker:{id}`):
-- the live counters are rebuilt from the rows of bunkers that have not ended.
CREATE TABLE quota_charges (
    bunker_id TEXT NOT NULL,
    counter TEXT NOT NULL,
    amount BIGINT NOT NULL,
    PRIMARY KEY (bunker_id, counter)
);

-- One row per bunker and tick; the key makes a repeated tick (two controllers) a no-op.
CREATE TABLE usage_ticks (
    bunker_id TEXT NOT NULL,
    tick_start BIGINT NOT NULL,
    tenant_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    duration_ms BIGINT NOT NULL,
    cpu_millicore_s BIGINT NOT NULL,
    memory_mb_s BIGINT NOT NULL,
    disk_mb_s BIGINT NOT NULL,
    gpu_s BIGINT NOT NULL,
    PRIMARY KEY (bunker_id, tick_start)
);
CREATE INDEX usage_ticks_by_tenant ON usage_ticks(tenant_id, tick_start);
