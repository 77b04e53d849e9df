-- Stored bytes per tenant: a quota profile may cap them (`max_storage_mb`, NULL = no cap), and
-- spilled exec outputs are recorded so they are counted and deleted with their bunker or after
-- their retention (`SCAIBUNKER_SPILL_RETENTION_S`).
ALTER TABLE quota_profiles ADD COLUMN max_storage_mb BIGINT;

CREATE TABLE exec_spills (
    object_key TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    bunker_id TEXT NOT NULL,
    exec_id TEXT NOT NULL,
    size_bytes BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX exec_spills_by_bunker ON exec_spills(tenant_id, bunker_id);
CREATE INDEX exec_spills_by_age ON exec_spills(created_at);
