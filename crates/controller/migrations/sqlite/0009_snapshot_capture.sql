-- The controller capturing a snapshot renews `renewed_at` (ms) while the worker works, so
-- the cleanup job tells a capture whose controller died (no renewal for three activity
-- intervals) from a slow one, and fails it within minutes instead of an hour.
ALTER TABLE snapshots ADD COLUMN renewed_at BIGINT;
