-- Who made a quota profile: `platform` (a platform admin; platform defaults and grants to a
-- tenant) or `tenant` (a tenant admin). A tenant-made profile only narrows: it is always
-- evaluated beside what the platform set. Profiles made before this are taken as the tenant's,
-- the safe side: a platform admin re-grants what should lift a default.
ALTER TABLE quota_profiles ADD COLUMN origin TEXT NOT NULL DEFAULT 'tenant';
UPDATE quota_profiles SET origin = 'platform' WHERE tenant_id IS NULL;
