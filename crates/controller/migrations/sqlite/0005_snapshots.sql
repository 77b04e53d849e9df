-- Bunker snapshots. The objects live under `snapshots/{tenant_id}/{id}/`; `manifest` is the
-- worker's description of them (sizes, sha256s, the saved VM's shape), JSON, once `ready`.
-- The source bunker's image and resources are copied here so a restore needs no other row.

CREATE TABLE snapshots (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    owner_id TEXT NOT NULL,
    bunker_id TEXT NOT NULL,
    status TEXT NOT NULL,
    kind TEXT NOT NULL,
    size_bytes BIGINT NOT NULL DEFAULT 0,
    image_name TEXT NOT NULL,
    image_id TEXT NOT NULL,
    cpu_millicores BIGINT NOT NULL,
    memory_mb BIGINT NOT NULL,
    disk_mb BIGINT NOT NULL,
    manifest TEXT,
    failure_reason TEXT,
    created_at BIGINT NOT NULL,
    expires_at BIGINT
);
CREATE INDEX snapshots_by_tenant ON snapshots(tenant_id, created_at, id);
CREATE INDEX snapshots_by_expiry ON snapshots(expires_at);
