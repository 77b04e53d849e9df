-- MariaDB twin of migrations/sqlite/0011_builtin_images.sql.
ALTER TABLE images ADD COLUMN reported_at BIGINT;
ALTER TABLE images ADD COLUMN retired_at BIGINT;
