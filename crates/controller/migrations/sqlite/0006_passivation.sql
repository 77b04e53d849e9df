-- Persistent bunkers passivated by a `full` snapshot while idle: the bunker is `paused` with
-- no worker, and comes back from `snapshot_id` on its next exec, file or shell request.
CREATE TABLE passivations (
    bunker_id TEXT PRIMARY KEY REFERENCES bunkers(id),
    tenant_id TEXT NOT NULL,
    snapshot_id TEXT NOT NULL,
    passivated_at BIGINT NOT NULL
);
