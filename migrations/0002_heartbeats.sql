-- One row per master, rewritten by that master's source every
-- heartbeat_interval_ms and synced like any table: lag is measured end to end
-- even when applications are idle, and idle slots keep advancing.
CREATE TABLE IF NOT EXISTS mmsync.heartbeats (
    master  text PRIMARY KEY,
    beat_at timestamptz NOT NULL
);
