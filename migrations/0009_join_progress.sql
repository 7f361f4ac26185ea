-- A join in progress on this master (see src/join.rs): the master it copies
-- from, where this master's sinks will go on (read before the first copy
-- began), and how far each table's copy came, stored with each batch, so
-- that a join that was stopped goes on from there when run again.
CREATE TABLE IF NOT EXISTS mmsync.join_progress (
    from_master text NOT NULL,
    -- [[topic, partition, next offset], ...]
    positions   jsonb NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS mmsync.join_tables (
    schema_name text NOT NULL,
    table_name  text NOT NULL,
    -- The copy reads the source table in ranges of blocks: the next one.
    next_block  bigint NOT NULL DEFAULT 0,
    rows_copied bigint NOT NULL DEFAULT 0,
    done        boolean NOT NULL DEFAULT false,
    PRIMARY KEY (schema_name, table_name)
);
