-- Superuser part of the branch database setup, run in {db} after the roles and database exist.
-- Idempotent. Placeholders in braces are filled with psycopg.sql (identifiers are quoted).

-- Full before-images for every table created from now on, whoever creates it: an event trigger at
-- ddl_command_end sets REPLICA IDENTITY FULL. SECURITY DEFINER (owned by the superuser) so it works
-- for tables created by any role; search_path pinned so it cannot be hijacked.
CREATE SCHEMA IF NOT EXISTS guard_admin;
REVOKE ALL ON SCHEMA guard_admin FROM PUBLIC;

CREATE OR REPLACE FUNCTION guard_admin.replica_identity_full() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $fn$
DECLARE
    obj record;
BEGIN
    FOR obj IN
        SELECT objid FROM pg_event_trigger_ddl_commands()
        WHERE object_type = 'table'
          AND command_tag IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO')
    LOOP
        -- temporary tables are never replicated; skip them
        IF (SELECT relpersistence FROM pg_class WHERE oid = obj.objid) = 'p' THEN
            EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', obj.objid::regclass);
        END IF;
    END LOOP;
END
$fn$;

DO $do$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'guard_replica_identity_full') THEN
        CREATE EVENT TRIGGER guard_replica_identity_full ON ddl_command_end
            WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO')
            EXECUTE FUNCTION guard_admin.replica_identity_full();
    END IF;
END
$do$;

-- Debezium's role reads (snapshot) the published tables: the publication below is FOR ALL TABLES and the
-- branch's tables live in public (guard_admin holds none), so SELECT on public's tables is exactly that,
-- including tables created later by the application owner or by a superuser. Besides REPLICATION and
-- LOGIN (guard.stack.provision) it has nothing else: no CREATE anywhere, no other schema.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT CONNECT ON DATABASE {db} TO {cdc};
GRANT USAGE ON SCHEMA public TO {cdc};
GRANT SELECT ON ALL TABLES IN SCHEMA public TO {cdc};
ALTER DEFAULT PRIVILEGES FOR ROLE {app} IN SCHEMA public GRANT SELECT ON TABLES TO {cdc};
ALTER DEFAULT PRIVILEGES FOR ROLE {superuser} IN SCHEMA public GRANT SELECT ON TABLES TO {cdc};

-- One publication for all tables, created here by the superuser (FOR ALL TABLES needs it), so tables
-- created later are published without anyone touching the publication. The connector runs with
-- publication.autocreate.mode=disabled and never alters it.
DO $do$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = {publication_literal}) THEN
        CREATE PUBLICATION {publication} FOR ALL TABLES;
    END IF;
END
$do$;
