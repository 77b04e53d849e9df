-- MariaDB twin of migrations/sqlite/0015_bunker_children.sql.
CREATE TABLE bunker_children (
  child_id VARCHAR(64) PRIMARY KEY,
  tenant_id VARCHAR(64) NOT NULL,
  parent_id VARCHAR(64) NOT NULL,
  depth INT NOT NULL,
  created_at BIGINT NOT NULL
);
CREATE INDEX bunker_children_by_parent ON bunker_children(tenant_id, parent_id, created_at);
