-- Tombstone retention (see [sync] tombstones_keep_seconds and
-- src/tombstones.rs). A sink stores, with each partition's offset, the
-- commit time (origin's clock, ms) of the last change it applied there:
-- what it has not applied yet of that partition was committed after it.
ALTER TABLE mmsync.applied_offsets ADD COLUMN IF NOT EXISTS last_commit_ms bigint;
-- Retention deletes tombstones below a version.
CREATE INDEX IF NOT EXISTS tombstones_version ON mmsync.tombstones (version);
