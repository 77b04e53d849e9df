-- The egress audit (`scaibunker/audit/{bunker_id}/…`, written by workers through the storage
-- proxy). `last_worker_id` keeps the worker a passivation (or a failed restore) took the bunker
-- off, so that worker's last batch, cut when the VM stops, is still taken from it.
-- `egress_purged_at` (ms) marks a bunker whose audit objects the retention deleted: it is not
-- looked at again. The index serves that job's search for ended bunkers not yet purged.
ALTER TABLE bunkers ADD COLUMN last_worker_id TEXT;
ALTER TABLE bunkers ADD COLUMN egress_purged_at BIGINT;
CREATE INDEX bunkers_by_egress_purge ON bunkers(egress_purged_at, terminated_at);
