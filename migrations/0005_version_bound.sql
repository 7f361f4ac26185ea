-- A version stamp may run ahead of the clock by at most this much (µs).
-- `mmsync init` writes [sync] max_clock_skew_ms here; this is its default.
CREATE OR REPLACE FUNCTION mmsync.max_clock_skew_us() RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$ SELECT 3600000000::bigint $$;

-- A local write beats the version it replaces, unless that version is
-- beyond the clock plus the allowed skew (forged, or written by a session
-- that skipped the triggers): then it gets the bound itself. So no version
-- a write gets is ever refused by the sources' bound, and the arithmetic
-- never leaves bigint.
CREATE OR REPLACE FUNCTION mmsync.next_version(previous bigint) RETURNS bigint
LANGUAGE sql VOLATILE AS $$
    SELECT greatest(n, least(coalesce(previous, 0), n + mmsync.max_clock_skew_us() - 1) + 1)
    FROM mmsync.now_us() AS n
$$;

CREATE OR REPLACE FUNCTION mmsync.raise_tombstone_high() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.version >= coalesce(pg_sequence_last_value('mmsync.tombstone_high'), 0) THEN
        -- 0x6d6d73796e63 = 'mmsync': the one advisory lock mmsync takes.
        PERFORM pg_advisory_xact_lock(120316856200803);
        IF NEW.version >= coalesce(pg_sequence_last_value('mmsync.tombstone_high'), 0) THEN
            PERFORM setval('mmsync.tombstone_high', least(NEW.version, 9223372036853775807) + 1000000);
        END IF;
    END IF;
    RETURN NULL;
END
$$;
