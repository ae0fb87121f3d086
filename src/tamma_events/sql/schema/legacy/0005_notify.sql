-- Wake-ups for subscribers: every append transaction notifies one channel with the new head.
-- Runs with search_path set to the store's schema.
--
-- Every write path moves the head in the append's transaction, so a row trigger on the head
-- sends exactly one notification per committed append (or group of appends). PostgreSQL
-- delivers notifications at commit, in commit order, and drops them with a rollback. The payload
-- is the new head position; subscribers still read the events themselves, so a notification
-- that is lost (a listener reconnecting, say) only delays a read until the next one or the
-- subscriber's fallback poll.
--
-- The channel is the schema's name with ".appended" (a name too long for PostgreSQL's 63-byte
-- channels falls back to a digest of it). It is written into both functions as a literal when
-- this migration runs: `append_channel()` tells listeners which channel to LISTEN on.

DO $$
DECLARE
    channel text := CASE
        WHEN octet_length(current_schema()) <= 54 THEN current_schema() || '.appended'
        ELSE 'tamma_events.' || md5(current_schema())
    END;
BEGIN
    EXECUTE format(
        'CREATE FUNCTION append_channel() RETURNS text LANGUAGE sql IMMUTABLE RETURN %L',
        channel);
    EXECUTE format(
        'CREATE FUNCTION notify_append() RETURNS trigger LANGUAGE plpgsql'
        ' SET search_path = pg_catalog, pg_temp AS %L',
        format('BEGIN PERFORM pg_notify(%L, NEW.position::text); RETURN NULL; END', channel));
END
$$;

CREATE TRIGGER head_notify
    AFTER UPDATE ON head
    FOR EACH ROW
    WHEN (NEW.position > OLD.position)
    EXECUTE FUNCTION notify_append();
