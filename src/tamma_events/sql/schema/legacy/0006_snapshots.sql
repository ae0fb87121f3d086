-- Snapshots take the log's positions as versions: a snapshot at version P holds a state folded
-- from the events up to position P. Runs with search_path set to the store's schema.
ALTER TABLE event_snapshots ALTER COLUMN version TYPE bigint;
ALTER TABLE event_snapshots ADD CONSTRAINT event_snapshots_version_check CHECK (version >= 0);
