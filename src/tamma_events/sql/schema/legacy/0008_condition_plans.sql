-- DCB conditions are checked with plans that do not grow with the log.
--
-- 1. append_group checks each condition with a static statement, whose plan PL/pgSQL caches:
--    after five calls PostgreSQL may keep a generic plan, made without knowing the type or the
--    tags. For "no event of type T with tag K" that plan walks the (event_type, position) index
--    through every event of type T and filters the tags, so each check grows with the log; a
--    plan made for the values looks the tag up in the GIN index. Planning the few statements of
--    the function costs far less than that walk.
-- 2. Even a plan made for the values walks every event of T when the statistics do not know yet
--    how many there are (a new store, a type appended in bulk since the last ANALYZE). A
--    condition item with tags is therefore checked through its tags (the GIN index, or the
--    primary key for a recent `after`), its types tested on the rows found: the tags of a DCB
--    condition name its consistency boundary, the few events of one entity.
-- Runs with search_path set to the store's schema.
DO $$
DECLARE
    definition text := pg_get_functiondef('append_group'::regproc);
    one_type text := E'AND event_type = item_types[1]\n                        AND tags @> item_tags);';
    any_type text := E'AND event_type = ANY(item_types)\n                        AND tags @> item_tags);';
BEGIN
    IF position(one_type IN definition) = 0 OR position(any_type IN definition) = 0 THEN
        RAISE EXCEPTION 'tamma-events: append_group is not the function migration 7 left';
    END IF;
    definition := replace(definition, one_type,
        E'AND (event_type = item_types[1]) IS TRUE\n                        AND tags @> item_tags);');
    definition := replace(definition, any_type,
        E'AND (event_type = ANY(item_types)) IS TRUE\n                        AND tags @> item_tags);');
    EXECUTE definition;
END
$$;

ALTER FUNCTION append_group(integer[], jsonb[], jsonb, bytea, integer[])
    SET plan_cache_mode = force_custom_plan;
