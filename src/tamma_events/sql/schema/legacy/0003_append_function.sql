-- One round trip for small appends: lock the head, check each request's condition, write the
-- accepted requests' events with the next positions and their hash chain, move the head. Called
-- as a single statement in autocommit, so the commit rides in the same round trip, and the head
-- lock is held only while the server runs it and commits.
--
-- The chain is computed here with the built-in sha256() over the very bytes the codec encoded
-- (p_rows: the encoded rows back to back, p_offsets: where each starts, then where the last
-- ends; each row's position is still zero), so it is the same chain the native codec computes
-- for batches written by COPY. p_events holds the same events' column values, one JSON array
-- per event: [event_id, event_type, timestamp (ISO 8601), tags, metadata, data].
--
-- p_counts: events per request; p_conditions: per request, NULL or its condition as
-- {"after": n, "items": [{"types": [..], "tags": {..}}, ..]} (no items: any event matches).
-- Returns the head position the lock found, then each request's first position, or NULL when
-- its condition failed (nothing of it is written). Each check is a statement run after the lock
-- is granted and after the earlier requests' rows are inserted, so it sees them; the checks are
-- static statements, one per kind of query item, so PostgreSQL keeps their plans.
CREATE FUNCTION append_group(
    p_counts integer[],
    p_conditions jsonb[],
    p_events jsonb,
    p_rows bytea,
    p_offsets integer[]
) RETURNS bigint[]
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    head_position bigint;
    chain bytea;
    firsts bigint[];
    violated boolean;
    after_position bigint;
    item jsonb;
    item_types text[];
    item_tags jsonb;
    first_event integer := 1;
    last_event integer;
    positions bigint[];
    hashes bytea[];
    k integer;
BEGIN
    SELECT position, hash INTO head_position, chain FROM head FOR UPDATE;
    firsts := ARRAY[head_position];
    FOR r IN 1 .. coalesce(array_length(p_counts, 1), 0) LOOP
        last_event := first_event + p_counts[r] - 1;
        violated := false;
        IF p_conditions[r] IS NOT NULL THEN
            after_position := (p_conditions[r]->>'after')::bigint;
            IF jsonb_array_length(p_conditions[r]->'items') = 0 THEN
                violated := EXISTS (SELECT 1 FROM events WHERE position > after_position);
            END IF;
            FOR item IN SELECT jsonb_array_elements(p_conditions[r]->'items') LOOP
                item_types := ARRAY(SELECT jsonb_array_elements_text(item->'types'));
                item_tags := item->'tags';
                IF cardinality(item_types) = 0 THEN
                    violated := EXISTS (SELECT 1 FROM events
                        WHERE position > after_position AND tags @> item_tags);
                ELSIF cardinality(item_types) = 1 AND item_tags IS NULL THEN
                    violated := EXISTS (SELECT 1 FROM events
                        WHERE position > after_position AND event_type = item_types[1]);
                ELSIF cardinality(item_types) = 1 THEN
                    violated := EXISTS (SELECT 1 FROM events
                        WHERE position > after_position AND event_type = item_types[1]
                        AND tags @> item_tags);
                ELSIF item_tags IS NULL THEN
                    violated := EXISTS (SELECT 1 FROM events
                        WHERE position > after_position AND event_type = ANY(item_types));
                ELSE
                    violated := EXISTS (SELECT 1 FROM events
                        WHERE position > after_position AND event_type = ANY(item_types)
                        AND tags @> item_tags);
                END IF;
                EXIT WHEN violated;
            END LOOP;
        END IF;
        IF violated THEN
            firsts := firsts || NULL::bigint;
        ELSE
            firsts := firsts || (head_position + 1);
            positions := '{}';
            hashes := '{}';
            FOR k IN first_event .. last_event LOOP
                head_position := head_position + 1;
                -- The row without its hash field (4 + 32 bytes), its position written in.
                chain := sha256(chain || overlay(
                    substring(p_rows FROM p_offsets[k] + 1 FOR p_offsets[k + 1] - p_offsets[k] - 36)
                    PLACING int8send(head_position) FROM 7 FOR 8));
                positions := positions || head_position;
                hashes := hashes || chain;
            END LOOP;
            INSERT INTO events (position, event_id, event_type, "timestamp", tags, metadata, data, hash)
            SELECT positions[i], (e->>0)::uuid, e->>1, (e->>2)::timestamptz, e->3, e->4, e->5,
                   hashes[i]
            FROM generate_series(1, last_event - first_event + 1) AS i,
                 LATERAL (SELECT p_events->(first_event + i - 2) AS e) AS event;
        END IF;
        first_event := last_event + 1;
    END LOOP;
    UPDATE head SET position = head_position, hash = chain;
    RETURN firsts;
END
$$;
