-- Appends do only what an append must: lock the head, check, write, move the head, notify.
-- Runs with search_path set to the store's schema.
--
-- 1. The query summaries leave the append path. They are folded lazily: `summary_state.folded`
--    is the last position the summary tables count, and the `*_totals` views add the short
--    unfolded tail after it at read time, so every read stays exact. `fold_summaries()` folds
--    the tail outside the head lock; stores call it in the background as their appends grow
--    the tail, and compaction before it deletes.
--    The tag index merges its pending list at 64 kB: every condition check reads all of it.
-- 2. One statement trigger on an append instead of four: `advance_head` also refuses ids of
--    archived events (only once anything is archived) and sends the notification.
-- 3. The append function is rewritten whole: it runs as the owner, moves the head and notifies
--    itself (its INSERT skips the trigger), writes a group in one INSERT, and checks conditions
--    with `condition_violated`, the only part planned for its values. Conditions read the
--    archive only when they reach into it: `archived_events` only when `after` lies before the
--    end of the compacted prefix, which is nearly never.

-- 1. Summaries, folded lazily -------------------------------------------------------------

-- Dropping the trigger locks `events` until this migration commits, so the head read below
-- counts every event the trigger summarised and none that it did not.
DROP TRIGGER events_summarize ON events;
DROP FUNCTION summarize_events();
DROP FUNCTION summary_statement(text);

-- Every event up to `folded` is counted by the summary tables; later events are the tail.
CREATE TABLE summary_state (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    folded    bigint  NOT NULL CHECK (folded >= 0)
);
INSERT INTO summary_state (singleton, folded) SELECT true, position FROM head;

-- The tail: the events after the folded position, read through the primary key. A function of
-- its own, planned for the folded position it reads (a plan made without it would expect a
-- third of the log and scan all of it); being STABLE, it reads in its caller's snapshot, the
-- same as the summary tables beside it.
DO $$
BEGIN
    EXECUTE format(
        'CREATE FUNCTION unfolded_events()'
        ' RETURNS TABLE ("position" bigint, event_type text, "timestamp" timestamptz, tags jsonb)'
        ' LANGUAGE plpgsql STABLE ROWS 256'
        ' SET search_path = pg_catalog, %I, pg_temp SET plan_cache_mode = force_custom_plan'
        ' AS %L',
        current_schema(),
        $body$
DECLARE
    low bigint;
BEGIN
    SELECT s.folded INTO low FROM summary_state AS s;
    RETURN QUERY SELECT e.position, e.event_type, e."timestamp", e.tags FROM events AS e
                 WHERE e.position > low;
END
$body$);
END
$$;

-- The summaries as of now: the folded counts plus the tail's, added up. A filter on the keys
-- (event_type; key and digest; grain, bucket and event_type) reaches both halves, so a lookup
-- reads one summary row and adds up the tail.
CREATE VIEW type_totals AS
    SELECT event_type, sum(count)::bigint AS count, min(first_timestamp) AS first_timestamp,
           max(last_timestamp) AS last_timestamp
    FROM (
        SELECT event_type, count, first_timestamp, last_timestamp FROM type_summary
        UNION ALL
        SELECT t.event_type, count(*), min(t."timestamp"), max(t."timestamp")
        FROM unfolded_events() AS t
        GROUP BY t.event_type
    ) AS parts
    GROUP BY event_type;

CREATE VIEW tag_totals AS
    SELECT key, digest, value, sum(count)::bigint AS count
    FROM (
        SELECT key, digest, value, count FROM tag_summary
        UNION ALL
        SELECT v.key, sha256(convert_to(v.value, 'UTF8')), v.value, count(*)
        FROM unfolded_events() AS t, jsonb_each_text(t.tags) AS v
        GROUP BY v.key, v.value
    ) AS parts
    GROUP BY key, digest, value;

CREATE VIEW time_totals AS
    SELECT grain, bucket, event_type, sum(count)::bigint AS count,
           min(first_timestamp) AS first_timestamp, max(last_timestamp) AS last_timestamp,
           min(first_position) AS first_position, max(last_position) AS last_position
    FROM (
        SELECT grain, bucket, event_type, count, first_timestamp, last_timestamp,
               first_position, last_position
        FROM time_summary
        UNION ALL
        SELECT g.grain, date_trunc(g.grain, e."timestamp", 'UTC'), e.event_type, count(*),
               min(e."timestamp"), max(e."timestamp"), min(e.position), max(e.position)
        FROM unfolded_events() AS e, (VALUES ('minute'), ('hour'), ('day')) AS g (grain)
        GROUP BY 1, 2, 3
    ) AS parts
    GROUP BY grain, bucket, event_type;

-- Fold the tail into the summary tables when it holds at least `min_tail` events; returns the
-- folded position afterwards. Without `wait`, a fold already running elsewhere is left to
-- finish the job. On a standby, or in a transaction that is read-only or not READ COMMITTED
-- (whose snapshot could predate the head it reads), it folds nothing. It runs as the
-- role that ran this migration (an application role cannot write the summaries), with
-- pg_catalog first and pg_temp last, and plans its statements for the range it folds.
DO $$
BEGIN
    EXECUTE format(
        'CREATE FUNCTION fold_summaries(min_tail bigint DEFAULT 1, wait boolean DEFAULT false)'
        ' RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER'
        ' SET search_path = pg_catalog, %I, pg_temp SET plan_cache_mode = force_custom_plan'
        ' AS %L',
        current_schema(),
        $body$
DECLARE
    low bigint;
    high bigint;
BEGIN
    SELECT s.folded INTO low FROM summary_state AS s;
    IF pg_is_in_recovery() OR current_setting('transaction_read_only')::boolean
       OR current_setting('transaction_isolation') <> 'read committed'
       OR (SELECT h.position FROM head AS h) - low < greatest(min_tail, 1) THEN
        RETURN low;
    END IF;
    IF wait THEN
        SELECT s.folded INTO low FROM summary_state AS s FOR UPDATE;
    ELSE
        SELECT s.folded INTO low FROM summary_state AS s FOR UPDATE SKIP LOCKED;
        IF NOT FOUND THEN
            RETURN (SELECT s.folded FROM summary_state AS s);
        END IF;
    END IF;
    -- A statement of its own after the lock: its snapshot holds every event up to this head
    -- (commits happen in position order, under the head lock).
    SELECT h.position INTO high FROM head AS h;
    IF high <= low THEN
        RETURN low;
    END IF;
    -- A background fold (without `wait`) does not wait for its commit to reach the disk: a
    -- crash can only lose the whole fold, summaries and folded position together, and the
    -- next fold does it again. A fold that waits commits with its caller's settings.
    IF NOT wait THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    WITH tail AS (
        SELECT e.position, e.event_type, e."timestamp", e.tags FROM events AS e
        WHERE e.position > low AND e.position <= high
    ), by_type AS (
        INSERT INTO type_summary AS s (event_type, count, first_timestamp, last_timestamp)
        SELECT t.event_type, count(*), min(t."timestamp"), max(t."timestamp")
        FROM tail AS t GROUP BY t.event_type
        ON CONFLICT (event_type) DO UPDATE SET
            count = s.count + excluded.count,
            first_timestamp = least(s.first_timestamp, excluded.first_timestamp),
            last_timestamp = greatest(s.last_timestamp, excluded.last_timestamp)
        RETURNING 1
    ), by_tag AS (
        INSERT INTO tag_summary AS s (key, digest, value, count)
        SELECT v.key, sha256(convert_to(v.value, 'UTF8')), v.value, count(*)
        FROM tail AS t, jsonb_each_text(t.tags) AS v GROUP BY v.key, v.value
        ON CONFLICT (key, digest) DO UPDATE SET count = s.count + excluded.count
        RETURNING 1
    ), minutes AS (
        SELECT date_trunc('minute', t."timestamp", 'UTC') AS bucket, t.event_type,
               count(*) AS count, min(t."timestamp") AS first_timestamp,
               max(t."timestamp") AS last_timestamp, min(t.position) AS first_position,
               max(t.position) AS last_position
        FROM tail AS t GROUP BY 1, 2
    )
    INSERT INTO time_summary AS s (grain, bucket, event_type, count, first_timestamp,
                                   last_timestamp, first_position, last_position)
    SELECT 'minute', m.bucket, m.event_type, m.count, m.first_timestamp, m.last_timestamp,
           m.first_position, m.last_position
    FROM minutes AS m
    UNION ALL
    SELECT g.grain, date_trunc(g.grain, m.bucket, 'UTC'), m.event_type, sum(m.count),
           min(m.first_timestamp), max(m.last_timestamp), min(m.first_position),
           max(m.last_position)
    FROM minutes AS m, (VALUES ('hour'), ('day')) AS g (grain)
    GROUP BY 1, 2, 3
    ON CONFLICT (grain, bucket, event_type) DO UPDATE SET
        count = s.count + excluded.count,
        first_timestamp = least(s.first_timestamp, excluded.first_timestamp),
        last_timestamp = greatest(s.last_timestamp, excluded.last_timestamp),
        first_position = least(s.first_position, excluded.first_position),
        last_position = greatest(s.last_position, excluded.last_position);
    UPDATE summary_state SET folded = high;
    RETURN high;
END
$body$);
END
$$;

-- The folded part only moves forward, and only through fold_summaries() (or its owner).
CREATE FUNCTION guard_summary_state() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'UPDATE' OR NEW.folded < OLD.folded THEN
        RAISE EXCEPTION 'tamma-events: the summaries of %.events only fold forward',
            TG_TABLE_SCHEMA
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER summary_state_forward_only
    BEFORE UPDATE OR DELETE ON summary_state
    FOR EACH ROW EXECUTE FUNCTION guard_summary_state();
CREATE TRIGGER summary_state_no_truncate
    BEFORE TRUNCATE ON summary_state
    FOR EACH STATEMENT EXECUTE FUNCTION guard_summary_state();

-- The tag index's pending list: GIN defers new entries to a list that every search reads in
-- full until it is merged into the index (at 4 MB by default). A DCB check is a tag search, so
-- with the default every conditional append read up to 4 MB: 9 ms each after 40k events,
-- against 1 ms with the list merged at 64 kB (the least it can be). Batches still merge their entries in bulk, and loaded no slower in the same run.
ALTER INDEX events_tags SET (gin_pending_list_limit = 64);

-- 2. One trigger per append statement -------------------------------------------------------

DROP TRIGGER events_archived_ids ON events;
DROP FUNCTION refuse_archived_ids();
DROP TRIGGER head_notify ON head;
DROP FUNCTION notify_append();

-- Checks that the rows an INSERT or COPY wrote start right after the head and leave no gap,
-- refuses the id of an archived event (a duplicate, as before it was archived), moves the head
-- to the last row, hash included, and notifies subscribers with the new head.
DO $$
BEGIN
    EXECUTE format(
        'CREATE OR REPLACE FUNCTION advance_head() RETURNS trigger LANGUAGE plpgsql'
        ' SECURITY DEFINER SET search_path = pg_catalog, %I, pg_temp AS %L',
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
    IF EXISTS (SELECT 1 FROM archived_events)
       AND EXISTS (SELECT 1 FROM new_events AS n JOIN archived_events AS a USING (event_id)) THEN
        RAISE EXCEPTION 'duplicate key value violates unique constraint "events_event_id_key"'
            USING ERRCODE = 'unique_violation', CONSTRAINT = 'events_event_id_key',
                  TABLE = 'events', SCHEMA = TG_TABLE_SCHEMA,
                  DETAIL = 'The event id belongs to an archived event.';
    END IF;
    UPDATE head SET position = high,
                    hash = (SELECT n.hash FROM new_events AS n WHERE n.position = high);
    PERFORM pg_notify(append_channel(), high::text);
    RETURN NULL;
END
$body$);
END
$$;

-- The append function below moves the head itself, once per call, running as the owner with
-- `tamma_events.appending` set for its own INSERTs: only those skip the trigger. Any other
-- INSERT or COPY (an application role's, or the owner's own) still goes through it.
DO $$
BEGIN
    EXECUTE format(
        'CREATE OR REPLACE TRIGGER events_advance_head AFTER INSERT ON events'
        ' REFERENCING NEW TABLE AS new_events FOR EACH STATEMENT'
        ' WHEN (current_setting(''tamma_events.appending'', true) IS DISTINCT FROM ''on'''
        '       OR current_user <> %L)'
        ' EXECUTE FUNCTION advance_head()',
        current_user);
END
$$;

-- The head's guard runs only when it has something to refuse.
DROP TRIGGER head_forward_only ON head;
CREATE TRIGGER head_forward_only
    BEFORE UPDATE ON head
    FOR EACH ROW
    WHEN (NEW.position < OLD.position)
    EXECUTE FUNCTION guard_head();
CREATE TRIGGER head_never_deleted
    BEFORE DELETE ON head
    FOR EACH ROW EXECUTE FUNCTION guard_head();

-- 3. The append function, whole ------------------------------------------------------------

-- Whether an event after `after_position` matches any of a condition's query items
-- ([{"types": "{..}", "tags": {..}}, ..], the types as a text[] literal; no item: any event
-- matches), over the live log and, when the condition reaches into it, the archive. Only the
-- checks are statements: the items are walked with expressions PL/pgSQL evaluates itself.
--
-- The checks are static statements, one per kind of item, planned for their values
-- (plan_cache_mode, for this function only): a generic plan for "no event of type T with tag K"
-- walks every event of T, and with `after` = 0 the plan drops the position test altogether
-- (a bitmap of every position otherwise). An item with tags is checked through its tags (GIN,
-- or the primary key for a recent `after`), its types tested on the rows found (`IS TRUE` keeps
-- the planner off the type index). The archive is read only when `after` lies before the end
-- of the compacted prefix. Being STABLE, the function reads the live log, the manifest and the
-- archive in one snapshot, its caller's, taken after the head lock was granted: an event a
-- compaction moves is in exactly one of them.
DO $$
BEGIN
    EXECUTE format(
        'CREATE FUNCTION condition_violated(after_position bigint, items jsonb) RETURNS boolean'
        ' LANGUAGE plpgsql STABLE'
        ' SET search_path = pg_catalog, %I, pg_temp SET plan_cache_mode = force_custom_plan'
        ' AS %L',
        current_schema(),
        $body$
DECLARE
    item jsonb;
    item_types text[];
    item_tags jsonb;
    archived_end bigint;
    last_item integer := jsonb_array_length(items) - 1;
BEGIN
    IF last_item < 0 THEN
        IF EXISTS (SELECT 1 FROM events WHERE position > after_position) THEN
            RETURN true;
        END IF;
    END IF;
    FOR i IN 0 .. last_item LOOP
        item := items->i;
        item_types := (item->>'types')::text[];
        item_tags := item->'tags';
        IF cardinality(item_types) = 0 THEN
            IF EXISTS (SELECT 1 FROM events
                       WHERE (after_position = 0 OR position > after_position)
                         AND tags @> item_tags) THEN
                RETURN true;
            END IF;
        ELSIF cardinality(item_types) = 1 AND item_tags IS NULL THEN
            IF EXISTS (SELECT 1 FROM events
                       WHERE (after_position = 0 OR position > after_position)
                         AND event_type = item_types[1]) THEN
                RETURN true;
            END IF;
        ELSIF cardinality(item_types) = 1 THEN
            IF EXISTS (SELECT 1 FROM events
                       WHERE (after_position = 0 OR position > after_position)
                         AND (event_type = item_types[1]) IS TRUE AND tags @> item_tags) THEN
                RETURN true;
            END IF;
        ELSIF item_tags IS NULL THEN
            IF EXISTS (SELECT 1 FROM events
                       WHERE (after_position = 0 OR position > after_position)
                         AND event_type = ANY(item_types)) THEN
                RETURN true;
            END IF;
        ELSE
            IF EXISTS (SELECT 1 FROM events
                       WHERE (after_position = 0 OR position > after_position)
                         AND (event_type = ANY(item_types)) IS TRUE AND tags @> item_tags) THEN
                RETURN true;
            END IF;
        END IF;
    END LOOP;
    SELECT coalesce(max(a.last_position), 0) INTO archived_end
    FROM archives AS a WHERE a.compacted_at IS NOT NULL;
    IF after_position >= archived_end THEN
        RETURN false;
    END IF;
    IF last_item < 0 THEN
        RETURN EXISTS (SELECT 1 FROM archived_events WHERE position > after_position);
    END IF;
    FOR i IN 0 .. last_item LOOP
        item := items->i;
        item_types := (item->>'types')::text[];
        item_tags := item->'tags';
        IF cardinality(item_types) = 0 THEN
            IF EXISTS (SELECT 1 FROM archived_events
                       WHERE position > after_position AND tags @> item_tags) THEN
                RETURN true;
            END IF;
        ELSIF item_tags IS NULL THEN
            IF EXISTS (SELECT 1 FROM archived_events
                       WHERE position > after_position AND event_type = ANY(item_types)) THEN
                RETURN true;
            END IF;
        ELSIF EXISTS (SELECT 1 FROM archived_events
                      WHERE position > after_position
                        AND (event_type = ANY(item_types)) IS TRUE AND tags @> item_tags) THEN
            RETURN true;
        END IF;
    END LOOP;
    RETURN false;
END
$body$);
END
$$;

-- One round trip for small appends and groups: lock the head, check each request's condition,
-- write the accepted requests' events with the next positions and their hash chain, move the
-- head and notify. Called as a single statement in autocommit, so the commit rides in the same
-- round trip and the head lock is held only while the server runs it and commits. It runs as
-- the owner; its INSERTs skip advance_head (above), and it moves the head once at its end.
--
-- p_doc: {"requests": [[count, condition], ..], "offsets": [..], "events": [..]}. A request's
-- condition is NULL or {"after": n, "items": [..]} (see condition_violated); "events" holds
-- every request's events in order, each as [event_id, event_type, timestamp (ISO 8601), tags,
-- metadata, data]. The chain is computed here with the built-in sha256() over the very bytes
-- the codec encoded (p_rows: the encoded rows back to back; "offsets": where each starts, then
-- where the last ends; each row's position is still zero), so it is the same chain the native
-- codec computes for batches written by COPY.
--
-- Returns the head position the lock found, then each request's first position, or NULL when
-- its condition failed (nothing of it is written). Each check runs after the lock is granted,
-- against the stored events and the events of the requests accepted before it in this call;
-- then every accepted row is inserted in one statement. This function's own statements keep
-- their plans (only the checks against stored events are planned for their values).
DROP FUNCTION append_group(integer[], jsonb[], jsonb, bytea, integer[]);
DO $$
BEGIN
    EXECUTE format(
        'CREATE FUNCTION append_group(p_doc jsonb, p_rows bytea) RETURNS bigint[]'
        ' LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, %I, pg_temp'
        ' AS %L',
        current_schema(),
        $body$
DECLARE
    head_position bigint;
    chain bytea;
    firsts bigint[];
    request jsonb;
    condition jsonb;
    offsets jsonb := p_doc->'offsets';
    first_event integer := 0;
    events integer;
    row_start integer;
    -- The rows accepted so far, inserted together at the end.
    pending_events integer[] := '{}';
    pending_positions bigint[] := '{}';
    pending_hashes bytea[] := '{}';
BEGIN
    SELECT h.position, h.hash INTO head_position, chain FROM head AS h FOR UPDATE;
    firsts := ARRAY[head_position];
    FOR request IN SELECT jsonb_array_elements(p_doc->'requests') LOOP
        events := (request->>0)::integer;
        condition := request->1;
        -- A condition is violated by a stored event, or by an event of an earlier request of
        -- this call: the rows are inserted together at the end, so those are matched here.
        IF jsonb_typeof(condition) = 'object'
           AND (condition_violated((condition->>'after')::bigint, condition->'items')
                OR EXISTS (
                    SELECT 1
                    FROM generate_subscripts(pending_events, 1) AS i,
                         LATERAL (SELECT p_doc->'events'->pending_events[i] AS e) AS event
                    WHERE pending_positions[i] > (condition->>'after')::bigint
                      AND (jsonb_array_length(condition->'items') = 0
                           OR EXISTS (
                               SELECT 1 FROM jsonb_array_elements(condition->'items') AS item
                               WHERE (item->>'types' = '{}'
                                      OR (e->>1) = ANY((item->>'types')::text[]))
                                 AND (item->'tags' IS NULL OR (e->3) @> (item->'tags')))))) THEN
            firsts := firsts || NULL::bigint;
        ELSE
            firsts := firsts || (head_position + 1);
            FOR k IN first_event .. first_event + events - 1 LOOP
                head_position := head_position + 1;
                row_start := (offsets->>k)::integer;
                -- The row without its hash field (4 + 32 bytes), its position written in.
                chain := sha256(chain || overlay(
                    substring(p_rows FROM row_start + 1
                              FOR (offsets->>(k + 1))::integer - row_start - 36)
                    PLACING int8send(head_position) FROM 7 FOR 8));
                pending_events := pending_events || k;
                pending_positions := pending_positions || head_position;
                pending_hashes := pending_hashes || chain;
            END LOOP;
        END IF;
        first_event := first_event + events;
    END LOOP;
    IF cardinality(pending_events) > 0 THEN
        -- An archived event's id stays taken (advance_head checks it for other INSERTs).
        IF EXISTS (SELECT 1 FROM archived_events)
           AND EXISTS (SELECT 1 FROM archived_events AS a
                       WHERE a.event_id IN (
                           SELECT (p_doc->'events'->i->>0)::uuid
                           FROM unnest(pending_events) AS i)) THEN
            RAISE EXCEPTION 'duplicate key value violates unique constraint "events_event_id_key"'
                USING ERRCODE = 'unique_violation', CONSTRAINT = 'events_event_id_key',
                      TABLE = 'events',
                      SCHEMA = (SELECT n.nspname FROM pg_class AS c
                                JOIN pg_namespace AS n ON n.oid = c.relnamespace
                                WHERE c.oid = 'events'::regclass),
                      DETAIL = 'The event id belongs to an archived event.';
        END IF;
        -- This function moves the head itself, below: its INSERT skips advance_head.
        PERFORM set_config('tamma_events.appending', 'on', true);
        INSERT INTO events (position, event_id, event_type, "timestamp", tags, metadata, data,
                            hash)
        SELECT pending_positions[i], (e->>0)::uuid, e->>1, (e->>2)::timestamptz, e->3, e->4,
               e->5, pending_hashes[i]
        FROM generate_subscripts(pending_events, 1) AS i,
             LATERAL (SELECT p_doc->'events'->pending_events[i] AS e) AS event;
        PERFORM set_config('tamma_events.appending', '', true);
        UPDATE head SET position = head_position, hash = chain;
        PERFORM pg_notify(append_channel(), head_position::text);
    END IF;
    RETURN firsts;
END
$body$);
END
$$;

-- Roles that could read the events before this migration (an application role set up by
-- `grant_app_role`, say) can read the folded position and the summaries as of now.
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
        EXECUTE format('GRANT SELECT ON summary_state, type_totals, tag_totals, time_totals TO %s',
                       CASE WHEN grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(grantee)) END);
    END LOOP;
END
$$;
