-- A bound on the version of every tombstone, cheap to read. A local insert
-- must get a version above its key's tombstone, but a tombstone can only
-- matter when its version has reached the clock: the stamping trigger looks
-- the tombstone up only when this bound has (pg_sequence_last_value reads it
-- without a query). Raised with a second of headroom, so a steady stream of
-- deletes raises it about once a second; a raise is serialized by a
-- transaction lock, so two concurrent raises never leave it below either.
CREATE SEQUENCE IF NOT EXISTS mmsync.tombstone_high MINVALUE 0 START 0;

-- The clock of version stamps, in microseconds; next_version is the one rule
-- that turns it into a stamp.
CREATE OR REPLACE FUNCTION mmsync.now_us() RETURNS bigint
LANGUAGE sql VOLATILE AS $$
    SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint
$$;

CREATE OR REPLACE FUNCTION mmsync.next_version(previous bigint) RETURNS bigint
LANGUAGE sql VOLATILE AS $$
    SELECT greatest(mmsync.now_us(), coalesce(previous, 0) + 1)
$$;

SELECT setval('mmsync.tombstone_high', max(version) + 1000000)
FROM mmsync.tombstones HAVING count(*) > 0;

CREATE OR REPLACE FUNCTION mmsync.raise_tombstone_high() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.version >= coalesce(pg_sequence_last_value('mmsync.tombstone_high'), 0) THEN
        -- 0x6d6d73796e63 = 'mmsync': the one advisory lock mmsync takes.
        PERFORM pg_advisory_xact_lock(120316856200803);
        IF NEW.version >= coalesce(pg_sequence_last_value('mmsync.tombstone_high'), 0) THEN
            PERFORM setval('mmsync.tombstone_high', NEW.version + 1000000);
        END IF;
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER raise_tombstone_high AFTER INSERT OR UPDATE OF version ON mmsync.tombstones
FOR EACH ROW EXECUTE FUNCTION mmsync.raise_tombstone_high();
