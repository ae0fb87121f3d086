-- DCB conditions are checked with a plan made for their values, at every append.
--
-- append_group checks each condition with a static statement, whose plan PL/pgSQL caches: after
-- five calls PostgreSQL may keep a generic plan, made without knowing the type or the tags. For
-- "no event of type T with tag K" that plan walks the (event_type, position) index through every
-- event of type T and filters the tags, so each check grows with the log; a plan made for the
-- values looks the tag up in the GIN index. Planning the few statements of the function costs
-- far less than that walk. Runs with search_path set to the store's schema.
ALTER FUNCTION append_group(integer[], jsonb[], jsonb, bytea, integer[])
    SET plan_cache_mode = force_custom_plan;
