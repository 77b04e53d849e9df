-- MariaDB twin of migrations/sqlite/0007_quota_origin.sql.
ALTER TABLE quota_profiles ADD COLUMN origin VARCHAR(16) NOT NULL DEFAULT 'tenant';
UPDATE quota_profiles SET origin = 'platform' WHERE tenant_id IS NULL;
