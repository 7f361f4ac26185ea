-- Retention of mmsync's audit tables (see [sync] conflicts_keep_days,
-- dead_letters_keep_days and dead_letters_max_per_topic): each source prunes
-- its own master by age, and a sink counts a topic's pending dead letters
-- before it adds more.
CREATE INDEX IF NOT EXISTS conflicts_logged_at ON mmsync.conflicts (logged_at);
CREATE INDEX IF NOT EXISTS dead_letters_retried_at ON mmsync.dead_letters (retried_at) WHERE retried_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS dead_letters_pending ON mmsync.dead_letters (topic) WHERE retried_at IS NULL;
