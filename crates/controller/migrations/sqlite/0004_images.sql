-- Uploaded images (baking), availability groups and the per-worker warm state.

ALTER TABLE images ADD COLUMN partner_id TEXT;
ALTER TABLE images ADD COLUMN source_kind TEXT;
ALTER TABLE images ADD COLUMN size_mib BIGINT;
-- The baked ext4 in object storage (NULL for images only workers ship).
ALTER TABLE images ADD COLUMN object_key TEXT;
ALTER TABLE images ADD COLUMN error TEXT;
ALTER TABLE images ADD COLUMN updated_at BIGINT;
CREATE INDEX images_by_tenant ON images(tenant_id);

-- Why a worker's pull failed (worker_images.state = 'failed').
ALTER TABLE worker_images ADD COLUMN error TEXT;

CREATE TABLE availability_groups (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    description TEXT,
    created_at BIGINT NOT NULL
);

CREATE TABLE availability_group_workers (
    group_id TEXT NOT NULL REFERENCES availability_groups(id),
    worker_id TEXT NOT NULL REFERENCES workers(id),
    PRIMARY KEY (group_id, worker_id)
);

CREATE TABLE availability_group_images (
    group_id TEXT NOT NULL REFERENCES availability_groups(id),
    image_id TEXT NOT NULL REFERENCES images(id),
    PRIMARY KEY (group_id, image_id)
);

-- Host bridges a worker offers for `transit` interfaces (placement requires every named one).
CREATE TABLE bridges (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    worker_id TEXT NOT NULL REFERENCES workers(id),
    created_at BIGINT NOT NULL,
    UNIQUE (worker_id, name)
);
