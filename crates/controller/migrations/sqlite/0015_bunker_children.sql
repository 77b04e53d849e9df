-- Child bunkers a bunker created through its backchannel (`POST /v1/self/children`).
-- `depth` is the child's: 1 for a child of a bunker nobody created this way, 2 for a
-- grandchild (the most allowed). The index serves a parent's listing and its count.
CREATE TABLE bunker_children (
  child_id TEXT PRIMARY KEY,
  tenant_id TEXT NOT NULL,
  parent_id TEXT NOT NULL,
  depth INTEGER NOT NULL,
  created_at BIGINT NOT NULL
);
CREATE INDEX bunker_children_by_parent ON bunker_children(tenant_id, parent_id, created_at);
