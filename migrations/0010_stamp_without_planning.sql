-- The stamping triggers' helpers, in forms PostgreSQL does not plan again
-- on every row. A SQL function that cannot be inlined (next_version's FROM
-- clause, record_tombstone's INSERT) is parsed and planned on each call from
-- plpgsql: that was most of the triggers' cost on a master's writes (an
-- upsert stamps twice). Same rules, same results.

-- next_version(previous) at the clock reading n: one expression, inlined
-- where it is called (no FROM, not STRICT, n passed as a variable).
CREATE OR REPLACE FUNCTION mmsync.next_version(previous bigint, n bigint) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT greatest(n, least(coalesce(previous, 0), n + mmsync.max_clock_skew_us() - 1) + 1)
$$;

-- The same statement as before, in plpgsql, whose plan is kept for the session.
CREATE OR REPLACE FUNCTION mmsync.record_tombstone(s text, t text, k jsonb, v bigint, o text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO mmsync.tombstones AS tb (schema_name, table_name, key, version, origin)
    VALUES (s, t, k, v, o)
    ON CONFLICT (schema_name, table_name, key) DO UPDATE
        SET version = EXCLUDED.version, origin = EXCLUDED.origin, deleted_at = now()
        WHERE (tb.version, tb.origin) < (EXCLUDED.version, EXCLUDED.origin);
END
$$;
