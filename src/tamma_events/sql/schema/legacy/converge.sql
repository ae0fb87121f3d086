-- Run once by the migrator after the legacy steps, when it brings a store created before the
-- baseline up to version 10 (it is not a migration and records no version). It makes what the
-- legacy steps left different from what 0010_baseline.sql creates the same;
-- tests/test_schema_catalog.py compares the two catalogs for a store at every earlier version.
-- Runs with search_path set to the store's schema.
--
-- The legacy steps end with the baseline's tables, indexes, functions, views and triggers,
-- text for text. The one difference is a grant: every legacy step that adds a table or view
-- grants SELECT on it to the roles that can read `events` (an application role set up by
-- `grant_app_role`, say), but 0002 created `chain` without doing so. A role set up at version
-- 1 could not read the chain's anchor (verify() starts from it); it can now, as one set up on
-- a baseline store can. Granting a privilege a role holds already changes nothing.
DO $$
DECLARE
    grantee oid;
BEGIN
    FOR grantee IN
        SELECT DISTINCT a.grantee
        FROM pg_class AS c, aclexplode(c.relacl) AS a
        WHERE c.oid = 'events'::regclass AND a.privilege_type = 'SELECT'
          AND a.grantee <> c.relowner
    LOOP
        EXECUTE format('GRANT SELECT ON chain TO %s',
                       CASE WHEN grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(grantee)) END);
    END LOOP;
END
$$;
