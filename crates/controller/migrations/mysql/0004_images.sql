-- MariaDB twin of migrations/sqlite/0004_images.sql.

ALTER TABLE images
    ADD COLUMN partner_id VARCHAR(64),
    ADD COLUMN source_kind VARCHAR(16),
    ADD COLUMN size_mib BIGINT,
    ADD COLUMN object_key VARCHAR(1024),
    ADD COLUMN error TEXT,
    ADD COLUMN updated_at BIGINT,
    ADD INDEX images_by_tenant (tenant_id);

ALTER TABLE worker_images ADD COLUMN error TEXT;

CREATE TABLE availability_groups (
    id VARCHAR(64) PRIMARY KEY,
    name VARCHAR(128) NOT NULL UNIQUE,
    description TEXT,
    created_at BIGINT NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE availability_group_workers (
    group_id VARCHAR(64) NOT NULL,
    worker_id VARCHAR(64) NOT NULL,
    PRIMARY KEY (group_id, worker_id),
    INDEX availability_group_workers_by_worker (worker_id),
    FOREIGN KEY (group_id) REFERENCES availability_groups(id),
    FOREIGN KEY (worker_id) REFERENCES workers(id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE availability_group_images (
    group_id VARCHAR(64) NOT NULL,
    image_id VARCHAR(64) NOT NULL,
    PRIMARY KEY (group_id, image_id),
    INDEX availability_group_images_by_image (image_id),
    FOREIGN KEY (group_id) REFERENCES availability_groups(id),
    FOREIGN KEY (image_id) REFERENCES images(id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE bridges (
    id VARCHAR(64) PRIMARY KEY,
    name VARCHAR(64) NOT NULL,
    worker_id VARCHAR(64) NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE KEY bridges_by_worker_name (worker_id, name),
    FOREIGN KEY (worker_id) REFERENCES workers(id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
