//! Every metric name and label key, described once, and the Prometheus exporter.
//! Label values come from small fixed sets (master, table, op, outcome), never row data.

use std::net::SocketAddr;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::PrometheusBuilder;

// Label keys.
pub const MASTER: &str = "master";
pub const SOURCE: &str = "source";
pub const TARGET: &str = "target";
pub const TABLE: &str = "table";
pub const OP: &str = "op";
pub const KIND: &str = "kind";
pub const STAGE: &str = "stage";

// Capture.
pub const CHANGES_CAPTURED: &str = "mmsync_changes_captured_total";
pub const RECORDS_PRODUCED: &str = "mmsync_records_produced_total";
pub const LOOP_SUPPRESSED: &str = "mmsync_loop_suppressed_total";
pub const TRUNCATES_IGNORED: &str = "mmsync_truncates_ignored_total";
pub const UNCHANGED_READ: &str = "mmsync_unchanged_values_read_total";
/// Values a source holds at once, per round it produces ([`crate::topology::SyncSettings::capture_max_bytes`]).
pub const SOURCE_ROUND_BYTES: &str = "mmsync_source_round_bytes";
pub const SLOT_CONFIRMED_LSN: &str = "mmsync_slot_confirmed_lsn_bytes";
pub const SLOT_RETAINED_WAL: &str = "mmsync_slot_retained_wal_bytes";
/// A MariaDB master's binlog on disk, all of it: mmsync has no slot there.
pub const BINLOG_KEPT: &str = "mmsync_binlog_kept_bytes";

// Apply.
pub const CHANGES_APPLIED: &str = "mmsync_changes_applied_total";
pub const CHANGES_SKIPPED: &str = "mmsync_changes_skipped_total";
pub const CONFLICTS: &str = "mmsync_conflicts_total";
pub const DEAD_LETTERS: &str = "mmsync_dead_letters_total";
pub const OFFSET_GAPS: &str = "mmsync_offset_gaps_total";
pub const DEAD_LETTERS_PENDING: &str = "mmsync_dead_letters_pending";
pub const AUDIT_PRUNED: &str = "mmsync_audit_rows_pruned_total";
pub const TOMBSTONES_PRUNED: &str = "mmsync_tombstones_pruned_total";
pub const TOMBSTONE_RETENTION_RUNS: &str = "mmsync_tombstone_retention_runs_total";
pub const TOMBSTONE_RETENTION_BEHIND: &str = "mmsync_tombstone_retention_behind_seconds";
pub const KAFKA_PENDING: &str = "mmsync_kafka_pending_records";
pub const REPLICATION_LAG: &str = "mmsync_replication_lag_seconds";
pub const REPLICATION_LAG_HISTOGRAM: &str = "mmsync_replication_lag_distribution_seconds";
pub const APPLY_BATCH_SIZE: &str = "mmsync_apply_batch_changes";
pub const APPLY_DURATION: &str = "mmsync_apply_duration_seconds";

// Health.
pub const MASTER_UP: &str = "mmsync_master_up";
pub const ERRORS: &str = "mmsync_errors_total";
pub const RETRY_DELAY: &str = "mmsync_retry_delay_seconds";

/// Installs the Prometheus exporter on `listen` and describes every metric.
/// Call once per process.
pub fn install(listen: SocketAddr) -> Result<(), String> {
    PrometheusBuilder::new()
        .with_http_listener(listen)
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
            &[
                0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0,
            ],
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(APPLY_BATCH_SIZE.into()),
                &[1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0],
            )
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(SOURCE_ROUND_BYTES.into()),
                &[65536.0, 262144.0, 1048576.0, 4194304.0, 8388608.0, 16777216.0, 33554432.0, 67108864.0, 268435456.0],
            )
        })
        .and_then(|b| b.install())
        .map_err(|e| format!("cannot serve metrics on {listen}: {e}; change [metrics] listen in topology.toml"))?;
    describe();
    Ok(())
}

fn describe() {
    describe_counter!(CHANGES_CAPTURED, "Row changes read from a master's slot that were written on that master.");
    describe_counter!(RECORDS_PRODUCED, "Records acknowledged by Kafka.");
    describe_counter!(
        LOOP_SUPPRESSED,
        "Changes not forwarded because they came from another master (source) or from the target itself (sink)."
    );
    describe_counter!(TRUNCATES_IGNORED, "TRUNCATE statements seen on a master; they are not replicated.");
    describe_counter!(
        UNCHANGED_READ,
        "Updates whose unchanged TOASTed values the source read back from its master before producing (kind found), or could not because a newer delete had removed the row there (kind gone)."
    );
    describe_histogram!(
        SOURCE_ROUND_BYTES,
        Unit::Bytes,
        "Bytes of values in one round a source produced before waiting for Kafka's acknowledgements, read-back TOASTed values included: what [sync] capture_max_bytes bounds on a PostgreSQL master (a MariaDB source sends a whole transaction in one round)."
    );
    describe_gauge!(SLOT_CONFIRMED_LSN, Unit::Bytes, "Position up to which the master's slot has been advanced.");
    describe_gauge!(
        BINLOG_KEPT,
        Unit::Bytes,
        "Binlog a MariaDB master keeps on disk (all its binlog files; mmsync has no slot to hold them, binlog_expire_logs_seconds decides)."
    );
    describe_gauge!(
        SLOT_RETAINED_WAL,
        Unit::Bytes,
        "WAL the master keeps for mmsync's slot (current WAL position minus the slot's restart position)."
    );
    describe_gauge!(
        KAFKA_PENDING,
        "Records in Kafka that a target has not applied yet (end offsets minus applied offsets)."
    );
    describe_counter!(CHANGES_APPLIED, "Changes applied to a target master.");
    describe_counter!(
        CHANGES_SKIPPED,
        "Changes not applied because the target already held them or a newer version of the same origin, or (an update whose unchanged values its source could not read back) a newer delete."
    );
    describe_counter!(
        CONFLICTS,
        "Changes that lost last-writer-wins to a write of another master (logged in mmsync.conflicts)."
    );
    describe_counter!(DEAD_LETTERS, "Records that could not be applied (kept in mmsync.dead_letters).");
    describe_gauge!(
        DEAD_LETTERS_PENDING,
        "Dead letters on a master not yet retried (measured by its source every minute)."
    );
    describe_counter!(
        AUDIT_PRUNED,
        "Rows of mmsync.conflicts and retried rows of mmsync.dead_letters deleted for their age (kind conflicts, dead_letters)."
    );
    describe_counter!(TOMBSTONES_PRUNED, "Tombstones deleted by retention (see [sync] tombstones_keep_seconds).");
    describe_counter!(TOMBSTONE_RETENTION_RUNS, "Rounds of tombstone retention on a master.");
    describe_gauge!(
        TOMBSTONE_RETENTION_BEHIND,
        Unit::Seconds,
        "How far back what other masters can still send to this master reaches (now minus the retention watermark): about a heartbeat normally; it grows while a master is away or a link is behind, and tombstones newer than that minus tombstones_keep_seconds are kept."
    );
    describe_counter!(
        OFFSET_GAPS,
        "Times a sink found its stored offset outside what its topic holds (records deleted by retention, or the topic recreated) and stopped that link."
    );
    describe_gauge!(REPLICATION_LAG, Unit::Seconds, "Commit on the source to commit on the target of the newest applied change; grows while a link is stalled (heartbeats make idle links tick).");
    describe_histogram!(REPLICATION_LAG_HISTOGRAM, Unit::Seconds, "Commit on the source to commit on the target.");
    describe_histogram!(APPLY_BATCH_SIZE, "Changes per applied batch.");
    describe_histogram!(APPLY_DURATION, Unit::Seconds, "Time to apply and commit one batch.");
    describe_gauge!(MASTER_UP, "1 while mmsync is connected to the master.");
    describe_counter!(ERRORS, "Errors by stage (capture, apply) and kind (retry, fatal).");
    describe_gauge!(
        RETRY_DELAY,
        Unit::Seconds,
        "The backoff before the latest retry of a source (stage capture) or sink (stage apply) of a master: it grows while retries fail and falls back after real progress."
    );
}

/// What the sinks have applied, shared with the monitor that turns it into
/// the lag and pending-records gauges, also while a target is unreachable.
#[derive(Debug, Default)]
pub struct Progress {
    inner: std::sync::Mutex<ProgressState>,
}

#[derive(Debug, Default)]
struct ProgressState {
    /// (source, target) -> newest source commit applied (ms) and its commit-to-apply latency (s).
    links: std::collections::HashMap<(String, String), (i64, f64)>,
    /// (topic, partition) -> (source, target, next offset to apply).
    offsets: std::collections::HashMap<(String, i32), (String, String, i64)>,
}

impl Progress {
    /// A sink applied changes from `source` up to commit time `commit_ms`, `latency_s` after it.
    pub fn applied(&self, source: &str, target: &str, commit_ms: i64, latency_s: f64) {
        let mut state = self.inner.lock().expect("progress lock");
        let entry = state.links.entry((source.to_string(), target.to_string())).or_insert((commit_ms, latency_s));
        if commit_ms >= entry.0 {
            *entry = (commit_ms, latency_s);
        }
    }

    /// A sink's position in a partition.
    pub fn offset(&self, topic: &str, partition: i32, source: &str, target: &str, next: i64) {
        let mut state = self.inner.lock().expect("progress lock");
        state.offsets.insert((topic.to_string(), partition), (source.to_string(), target.to_string(), next));
    }

    /// Sets the lag gauges. A source writes a heartbeat every `heartbeat`, so
    /// when nothing newer than `newest` has been applied, the change that
    /// should have followed is at least `now - newest - heartbeat` late: the
    /// gauge shows that, or the latency of the newest applied change if larger.
    pub fn publish_lag(&self, now_ms: i64, heartbeat: std::time::Duration) {
        let state = self.inner.lock().expect("progress lock");
        for ((source, target), (newest, latency)) in &state.links {
            let stalled = now_ms.saturating_sub(*newest).saturating_sub(heartbeat.as_millis() as i64) as f64 / 1000.0;
            metrics::gauge!(REPLICATION_LAG, SOURCE => source.clone(), TARGET => target.clone())
                .set(latency.max(stalled));
        }
    }

    /// Every known partition with its position.
    pub fn positions(&self) -> Vec<(String, i32, String, String, i64)> {
        let state = self.inner.lock().expect("progress lock");
        state.offsets.iter().map(|((t, p), (s, g, n))| (t.clone(), *p, s.clone(), g.clone(), *n)).collect()
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
