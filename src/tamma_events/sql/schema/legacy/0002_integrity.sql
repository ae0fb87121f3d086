-- Immutability and the chain's anchor.
-- Runs with search_path set to the store's schema.

-- The value the first event's hash chains from: sha256('tamma-events genesis v1').
CREATE TABLE chain (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    genesis   bytea   NOT NULL
);
INSERT INTO chain (singleton, genesis)
VALUES (true, decode('118f238eaa92f2119fdbbbd4f1c90f0e99713837fc10ddaec86e44545822edc0', 'hex'));

-- Stored events are never updated or deleted: refuse it for every role that fires triggers.
-- (A superuser can bypass triggers; the hash chain shows what such a change did.)
CREATE FUNCTION refuse_event_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'tamma-events: % on %.% is refused: stored events are immutable',
        TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'Events leave the log only through the verified archiving path.';
END
$$;

CREATE TRIGGER events_immutable_rows
    BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION refuse_event_change();

CREATE TRIGGER events_immutable_truncate
    BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_event_change();

-- The head only moves forward, and is never removed.
CREATE FUNCTION guard_head() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'UPDATE' OR NEW.position < OLD.position THEN
        RAISE EXCEPTION 'tamma-events: the head of %.events only moves forward', TG_TABLE_SCHEMA
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER head_forward_only
    BEFORE UPDATE OR DELETE ON head
    FOR EACH ROW EXECUTE FUNCTION guard_head();

CREATE TRIGGER head_no_truncate
    BEFORE TRUNCATE ON head
    FOR EACH STATEMENT EXECUTE FUNCTION guard_head();

CREATE TRIGGER chain_immutable_rows
    BEFORE UPDATE OR DELETE ON chain
    FOR EACH ROW EXECUTE FUNCTION refuse_event_change();
