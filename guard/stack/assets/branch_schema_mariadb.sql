-- Demo branch database (branch 0202) on MariaDB: the tables of branch_schema.sql (PostgreSQL, branch 0101)
-- with MariaDB's types. Kept: exact decimals (DECIMAL(18,2)), dates (DATE), instants (TIMESTAMP(6) in
-- UTC), a DATETIME(6) wall-clock time and a binary column (VARBINARY), so every kind of value Debezium's
-- MariaDB connector emits passes the guard. Idempotent (IF NOT EXISTS). Binlog row images are FULL
-- (mariadb.cnf), the counterpart of PostgreSQL's REPLICA IDENTITY FULL: `before` is complete.

CREATE TABLE IF NOT EXISTS customers (
    customer_id  BIGINT PRIMARY KEY,
    name         TEXT,
    id_number    VARCHAR(18),
    mobile       VARCHAR(20),
    email        TEXT,
    address      TEXT,
    gender       CHAR(1),
    birth_date   DATE,
    occupation   TEXT,
    risk_level   SMALLINT,
    branch_code  VARCHAR(8),
    created_at   TIMESTAMP(6) NULL DEFAULT CURRENT_TIMESTAMP(6)
) ENGINE=InnoDB;

CREATE TABLE IF NOT EXISTS accounts (
    account_no    VARCHAR(32) PRIMARY KEY,
    customer_id   BIGINT,
    card_no       VARCHAR(19),
    account_type  VARCHAR(16),
    balance       DECIMAL(18, 2),
    currency      CHAR(3),
    status        VARCHAR(12),
    branch_code   VARCHAR(8),
    opened_at     TIMESTAMP(6) NULL DEFAULT NULL,
    CONSTRAINT accounts_customer FOREIGN KEY (customer_id) REFERENCES customers (customer_id)
) ENGINE=InnoDB;

CREATE TABLE IF NOT EXISTS transactions (
    txn_id                BIGINT AUTO_INCREMENT PRIMARY KEY,
    account_no            VARCHAR(32),
    customer_id           BIGINT,
    amount                DECIMAL(18, 2),
    direction             CHAR(1),
    counterparty_name     TEXT,
    counterparty_account  VARCHAR(32),
    channel               VARCHAR(16),
    memo                  TEXT,
    created_at            TIMESTAMP(6) NULL DEFAULT CURRENT_TIMESTAMP(6)
) ENGINE=InnoDB;

CREATE TABLE IF NOT EXISTS customer_auth (
    customer_id    BIGINT PRIMARY KEY,
    login_name     TEXT,
    password_hash  TEXT,
    query_pin      VARCHAR(6),
    -- the teller terminal's binary device fingerprint (VARBINARY: bytes, base64 in the raw topic)
    device_fp      VARBINARY(32),
    updated_at     DATETIME(6)
) ENGINE=InnoDB;

-- Attribution contract (docs/policy.md, "The same contract on MariaDB"): every transaction that writes names
-- its principal first, in the session variable @guard_principal, and clears it when the transaction ends
-- (MariaDB has no transaction-local settings: a pooled connection that skips the reset carries the name into
-- the next transaction), e.g. SET @guard_principal = 'Staff:t0202-01', START TRANSACTION, the writes, COMMIT,
-- then SET @guard_principal = NULL. Inserts and updates carry it in updated_by; the triggers that set it (and
-- the delete triggers that attribute deletes) are installed by root as a guard account, not by this one
-- (guard/stack/provision.py, mariadb_attribution_sql): creating a trigger with the binlog on takes SUPER.
ALTER TABLE customers ADD COLUMN IF NOT EXISTS updated_by VARCHAR(255) NULL;
ALTER TABLE accounts ADD COLUMN IF NOT EXISTS updated_by VARCHAR(255) NULL;
ALTER TABLE transactions ADD COLUMN IF NOT EXISTS updated_by VARCHAR(255) NULL;
ALTER TABLE customer_auth ADD COLUMN IF NOT EXISTS updated_by VARCHAR(255) NULL;
