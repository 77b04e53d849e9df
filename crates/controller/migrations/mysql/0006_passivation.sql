-- MariaDB twin of migrations/sqlite/0006_passivation.sql.
CREATE TABLE passivations (
    bunker_id VARCHAR(64) PRIMARY KEY,
    tenant_id VARCHAR(64) NOT NULL,
    snapshot_id VARCHAR(64) NOT NULL,
    passivated_at BIGINT NOT NULL,
    FOREIGN KEY (bunker_id) REFERENCES bunkers(id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
