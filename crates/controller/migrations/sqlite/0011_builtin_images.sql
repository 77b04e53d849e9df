-- Built-in images (platform rows with no `source_kind`: the images workers ship) are kept per
-- name and sha256, several shas of one name active at once. `reported_at`: when the controller
-- last knew an online worker to hold the sha (registration, or the images job reading the
-- workers' cache ledgers). `retired_at`: when the images job made the row inactive because no
-- online worker held it for a while; NULL otherwise, so a row an admin deactivated is never
-- brought back by the job.
ALTER TABLE images ADD COLUMN reported_at BIGINT;
ALTER TABLE images ADD COLUMN retired_at BIGINT;
