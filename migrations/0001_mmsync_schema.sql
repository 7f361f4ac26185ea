-- mmsync's own schema. Created by `mmsync init` on every master; the per-table
-- columns and triggers are installed from topology.toml, not from here.

-- Deleted rows, so that an older upsert never brings a deleted row back.
-- The source publishes this table: a local delete reaches Kafka as the
-- tombstone row it writes here, with its version and origin.
CREATE TABLE IF NOT EXISTS mmsync.tombstones (
    schema_name text NOT NULL,
    table_name  text NOT NULL,
    -- primary key columns -> their text value, e.g. {"id": "42"}
    key         jsonb NOT NULL,
    version     bigint NOT NULL,
    origin      text COLLATE "C" NOT NULL,
    deleted_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (schema_name, table_name, key)
);

-- Kafka offsets a sink has applied to this master, written in the same
-- transaction as the rows they produced.
CREATE TABLE IF NOT EXISTS mmsync.applied_offsets (
    topic       text NOT NULL,
    partition   integer NOT NULL,
    next_offset bigint NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition)
);

-- Changes that lost a last-writer-wins comparison, kept for audit.
CREATE TABLE IF NOT EXISTS mmsync.conflicts (
    id               bigserial PRIMARY KEY,
    logged_at        timestamptz NOT NULL DEFAULT now(),
    schema_name      text NOT NULL,
    table_name       text NOT NULL,
    key              jsonb NOT NULL,
    kind             text NOT NULL,
    incoming_op      text NOT NULL,
    incoming_version bigint NOT NULL,
    incoming_origin  text NOT NULL,
    winner_version   bigint NOT NULL,
    winner_origin    text NOT NULL
);

-- Records a sink could not apply, with the reason and the whole record.
CREATE TABLE IF NOT EXISTS mmsync.dead_letters (
    id           bigserial PRIMARY KEY,
    logged_at    timestamptz NOT NULL DEFAULT now(),
    topic        text NOT NULL,
    partition    integer NOT NULL,
    kafka_offset bigint NOT NULL,
    reason       text NOT NULL,
    record_key   bytea,
    record_value bytea,
    retried_at   timestamptz
);

-- A version stamp that beats both the clock and the version it replaces.
CREATE OR REPLACE FUNCTION mmsync.next_version(previous bigint) RETURNS bigint
LANGUAGE sql VOLATILE AS $$
    SELECT greatest((extract(epoch FROM clock_timestamp()) * 1000000)::bigint, coalesce(previous, 0) + 1)
$$;

-- Records or raises the tombstone of a key deleted on this master.
CREATE OR REPLACE FUNCTION mmsync.record_tombstone(s text, t text, k jsonb, v bigint, o text) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO mmsync.tombstones AS tb (schema_name, table_name, key, version, origin)
    VALUES (s, t, k, v, o)
    ON CONFLICT (schema_name, table_name, key) DO UPDATE
        SET version = EXCLUDED.version, origin = EXCLUDED.origin, deleted_at = now()
        WHERE (tb.version, tb.origin) < (EXCLUDED.version, EXCLUDED.origin)
$$;
