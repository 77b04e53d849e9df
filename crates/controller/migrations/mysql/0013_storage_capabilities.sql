-- Minted storage capability tokens, so that they can be revoked: one by one, or all those a
-- revoked API key minted. Tokens carry their id; the controllers' storage proxy checks it.
CREATE TABLE storage_capabilities (
    id VARCHAR(64) PRIMARY KEY,
    tenant_id VARCHAR(64) NOT NULL,
    key_id VARCHAR(128) NOT NULL,
    prefix TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE INDEX storage_capabilities_by_tenant ON storage_capabilities(tenant_id, created_at);
