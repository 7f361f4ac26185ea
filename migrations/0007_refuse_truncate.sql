-- TRUNCATE of a synced table is not replicated (pgoutput would send it, but
-- rows other masters wrote meanwhile must survive it, which a plain
-- TRUNCATE cannot say). Rather than let the masters differ in silence, a
-- statement trigger refuses it. The applier's session (replica role) skips
-- it, and so may an operator who truncates on every master on purpose.
CREATE OR REPLACE FUNCTION mmsync.refuse_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'TRUNCATE of %.% is not replicated by mmsync: the masters would differ', TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING ERRCODE = 'feature_not_supported',
              HINT = 'DELETE the rows instead (every master applies deletes); to empty the table on every master on purpose, TRUNCATE it on each one in a session with SET session_replication_role = replica';
END
$$;
