-- mmsync's applier now writes with session_replication_role = replica, as
-- PostgreSQL's own apply worker does: replicated rows skip foreign-key checks
-- and ordinary triggers (mmsync's stamping triggers among them). The bound on
-- tombstone versions must still rise for tombstones the applier writes, so
-- its trigger fires in every session.
ALTER TABLE mmsync.tombstones ENABLE ALWAYS TRIGGER raise_tombstone_high;

-- A conflict over a unique value other than the key removes the losing row
-- on every master; its whole row is kept here.
ALTER TABLE mmsync.conflicts ADD COLUMN IF NOT EXISTS loser_row jsonb;
