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

-- Staff and their roles: the source of the access policy's Staff entities (guard/policy/sources.py).
CREATE TABLE IF NOT EXISTS public.staff (
    staff_id      text PRIMARY KEY,
    name          text,
    branch_code   varchar(8) NOT NULL,
    organisation  text NOT NULL,
    active        boolean NOT NULL DEFAULT true
);

CREATE TABLE IF NOT EXISTS public.staff_roles (
    staff_id  text NOT NULL REFERENCES public.staff (staff_id),
    role      text NOT NULL,
    PRIMARY KEY (staff_id, role)
);

ALTER TABLE public.staff       REPLICA IDENTITY FULL;
ALTER TABLE public.staff_roles REPLICA IDENTITY FULL;

-- Attribution contract (docs/policy.md): every transaction that writes sets its principal first,
--     SELECT set_config('guard.principal', 'Staff:t0101-01', true);   -- = SET LOCAL guard.principal = '...'
-- Inserts and updates carry it in updated_by, filled here from the setting whatever the statement says
-- (NULL when unset: the guard decides such a change `unattributed`); deletes emit it as a transactional
-- logical decoding message (guard_admin.emit_principal, branch_bootstrap.sql) joined on the transaction id.
CREATE OR REPLACE FUNCTION public.guard_stamp_principal() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog AS $fn$
BEGIN
    NEW.updated_by := nullif(current_setting('guard.principal', true), '');
    RETURN NEW;
END
$fn$;

CREATE OR REPLACE FUNCTION public.guard_attribute_delete() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog AS $fn$
BEGIN
    PERFORM guard_admin.emit_principal();
    RETURN NULL;
END
$fn$;

DO $do$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['customers', 'accounts', 'transactions', 'customer_auth', 'staff', 'staff_roles'] LOOP
        EXECUTE format('ALTER TABLE public.%I ADD COLUMN IF NOT EXISTS updated_by text', t);
        EXECUTE format('CREATE OR REPLACE TRIGGER guard_principal BEFORE INSERT OR UPDATE ON public.%I '
                       'FOR EACH ROW EXECUTE FUNCTION public.guard_stamp_principal()', t);
        EXECUTE format('CREATE OR REPLACE TRIGGER guard_principal_delete AFTER DELETE ON public.%I '
                       'FOR EACH STATEMENT EXECUTE FUNCTION public.guard_attribute_delete()', t);
    END LOOP;
END
$do$;
