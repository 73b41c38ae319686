-- Demo branch database (branch 0101) — the tables a bank branch system exposes to CDC.
-- Run as the owner role (branch_app) in database branch_0101. Idempotent (IF NOT EXISTS).
-- REPLICA IDENTITY FULL makes PostgreSQL log whole old rows, so Debezium's `before` is complete on
-- update and delete (the guard needs it to classify and to detect contact-detail changes). Tables
-- created later get the same setting from the guard_admin event trigger (branch_bootstrap.sql).

CREATE TABLE IF NOT EXISTS public.customers (
    customer_id  bigint PRIMARY KEY,
    name         text,
    id_number    varchar(18),
    mobile       varchar(20),
    email        text,
    address      text,
    gender       char(1),
    birth_date   date,
    occupation   text,
    risk_level   smallint,
    branch_code  varchar(8),
    created_at   timestamptz DEFAULT now()
);

CREATE TABLE IF NOT EXISTS public.accounts (
    account_no    varchar(32) PRIMARY KEY,
    customer_id   bigint REFERENCES public.customers (customer_id),
    card_no       varchar(19),
    account_type  varchar(16),
    balance       numeric(18, 2),
    currency      char(3),
    status        varchar(12),
    branch_code   varchar(8),
    opened_at     timestamptz
);

CREATE TABLE IF NOT EXISTS public.transactions (
    txn_id                bigserial PRIMARY KEY,
    account_no            varchar(32),
    customer_id           bigint,
    amount                numeric(18, 2),
    direction             char(1),
    counterparty_name     text,
    counterparty_account  varchar(32),
    channel               varchar(16),
    memo                  text,
    created_at            timestamptz DEFAULT now()
);

CREATE TABLE IF NOT EXISTS public.customer_auth (
    customer_id    bigint PRIMARY KEY,
    login_name     text,
    password_hash  text,
    query_pin      varchar(6),
    updated_at     timestamptz
);

ALTER TABLE public.customers     REPLICA IDENTITY FULL;
ALTER TABLE public.accounts      REPLICA IDENTITY FULL;
ALTER TABLE public.transactions  REPLICA IDENTITY FULL;
ALTER TABLE public.customer_auth REPLICA IDENTITY FULL;
