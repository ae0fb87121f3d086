-- One round trip for small appends: lock the head, check each request's condition, write the
-- accepted requests' events with the next positions and their hash chain, move the head. Called
-- as a single statement in autocommit, so the commit rides in the same round trip, and the head
-- lock is held only while the server runs it and commits.
--
-- The chain is computed here with the built-in sha256() over the very bytes the codec encoded
-- (p_rows: each event's canonical row with a zero position), so it is the same chain the native
-- codec computes for batches written by COPY.
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
    p_ids uuid[],
    p_types text[],
    p_times timestamptz[],
    p_tags jsonb[],
    p_metadata jsonb[],
    p_data jsonb[],
    p_rows bytea[]
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
                chain := sha256(chain || overlay(p_rows[k] PLACING int8send(head_position) FROM 7 FOR 8));
                positions := positions || head_position;
                hashes := hashes || chain;
            END LOOP;
            INSERT INTO events (position, event_id, event_type, "timestamp", tags, metadata, data, hash)
            SELECT * FROM unnest(
                positions, p_ids[first_event:last_event], p_types[first_event:last_event],
                p_times[first_event:last_event], p_tags[first_event:last_event],
                p_metadata[first_event:last_event], p_data[first_event:last_event], hashes
            );
        END IF;
        first_event := last_event + 1;
    END LOOP;
    UPDATE head SET position = head_position, hash = chain;
    RETURN firsts;
END
$$;
