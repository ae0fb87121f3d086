-- The head moves with the events, and only with them: least privilege for the application role.
--
-- Before, every append path locked the head row (SELECT ... FOR UPDATE, which needs UPDATE on
-- it) and moved it with an UPDATE of its own, so an application role held UPDATE on `head` and a
-- plain INSERT on `events` that nothing tied to the head: a row written at head + 1 without
-- moving the head jammed every later append on the primary key, and a row written into a
-- compacted prefix went unnoticed.
--
-- 1. `lock_head()` takes the head row's lock and returns it, as the migration's role: callers need
--    no privilege on `head`.
-- 2. A statement trigger on `events` checks that the rows an INSERT or COPY wrote start right
--    after the head and leave no gap, and moves the head to the last of them (its hash too), under
--    the same lock. Every write of events goes through it; the append paths no longer move the
--    head themselves.
-- 3. Roles other than the owner lose UPDATE on `head`.
-- Runs with search_path set to the store's schema.

DO $$
BEGIN
    -- Both run as the role that ran this migration, with pg_catalog first, then the schema, and
    -- pg_temp last (nothing else can stand in for the head or a built-in).
    EXECUTE format(
        'CREATE FUNCTION lock_head(OUT "position" bigint, OUT hash bytea) LANGUAGE sql'
        ' SECURITY DEFINER SET search_path = pg_catalog, %I, pg_temp AS %L',
        current_schema(),
        'SELECT h.position, h.hash FROM head AS h FOR UPDATE');
    EXECUTE format(
        'CREATE FUNCTION advance_head() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER'
        ' SET search_path = pg_catalog, %I, pg_temp AS %L',
        current_schema(),
        $body$
DECLARE
    low bigint;
    high bigint;
    written bigint;
    head_at bigint;
BEGIN
    SELECT min(n.position), max(n.position), count(*) INTO low, high, written FROM new_events AS n;
    IF written = 0 THEN
        RETURN NULL;
    END IF;
    SELECT h.position INTO head_at FROM head AS h FOR UPDATE;
    IF low <> head_at + 1 OR high - low + 1 <> written THEN
        RAISE EXCEPTION 'tamma-events: events are appended at the head: positions % to % (% rows) after head %',
            low, high, written, head_at
            USING ERRCODE = 'integrity_constraint_violation',
                  HINT = 'Append through tamma-events, which takes the head lock first.';
    END IF;
    UPDATE head SET position = high,
                    hash = (SELECT n.hash FROM new_events AS n WHERE n.position = high);
    RETURN NULL;
END
$body$);
END
$$;

CREATE TRIGGER events_advance_head
    AFTER INSERT ON events
    REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT EXECUTE FUNCTION advance_head();

-- append_group takes the lock through lock_head() and leaves moving the head to the trigger.
DO $$
DECLARE
    definition text := pg_get_functiondef('append_group'::regproc);
    lock_statement text := 'SELECT position, hash INTO head_position, chain FROM head FOR UPDATE;';
    move_statement text := 'UPDATE head SET position = head_position, hash = chain;';
BEGIN
    IF position(lock_statement IN definition) = 0 OR position(move_statement IN definition) = 0 THEN
        RAISE EXCEPTION 'tamma-events: append_group is not the function migration 8 left';
    END IF;
    definition := replace(definition, lock_statement,
        'SELECT l.position, l.hash INTO head_position, chain FROM lock_head() AS l;');
    definition := replace(definition, move_statement, '-- the head moved with each INSERT');
    EXECUTE definition;
END
$$;

-- Application roles (set up by `grant_app_role`) keep reading the head, and no longer update it.
DO $$
DECLARE
    grantee oid;
BEGIN
    FOR grantee IN
        SELECT DISTINCT a.grantee
        FROM pg_class AS c, aclexplode(c.relacl) AS a
        WHERE c.oid = 'head'::regclass AND a.privilege_type = 'UPDATE'
          AND a.grantee <> c.relowner
    LOOP
        EXECUTE format('REVOKE UPDATE ON head FROM %s',
                       CASE WHEN grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(grantee)) END);
    END LOOP;
END
$$;
