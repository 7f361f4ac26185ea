//! Tombstone retention: when a tombstone may go.
//!
//! A tombstone (a row of `mmsync.tombstones`) is what keeps an older upsert
//! of a deleted key from bringing the row back. It may go once no such
//! upsert can reach its master any more. On master X, what may still come
//! from another master O is what O's source has not produced yet and what
//! X's sinks have not applied yet of O's topics. Both are bounded in O's
//! own clock:
//!
//! - O's heartbeat as X holds it (`mmsync.heartbeats.beat_at`): O's source
//!   produces in commit order, so it had produced every change O committed
//!   before that beat. What O has not produced was committed after it.
//! - A partition of O's topics that X has applied to its end holds nothing
//!   more. One X has not holds only changes committed after the last one X
//!   applied there (a partition is in commit order; the sink stores that
//!   commit time with the offset).
//!
//! The smallest of these, over every other master, is the *watermark*. A
//! change is stamped when its statement runs, before it commits, so its
//! version is at least its commit time minus how long its transaction was
//! open. `[sync] tombstones_keep_seconds` (seven days by default) covers
//! that and clock noise: a tombstone goes when its version is older than the
//! watermark minus that horizon. Pending dead letters hold the watermark at
//! their own version, so that retrying one later still meets the tombstone
//! that beats it.
//!
//! A master that is away (mmsync stopped, its database down, a link stuck)
//! holds the watermark where it stopped: tombstones are kept, never lost,
//! and it needs no rebuild when it comes back, however long it was away.
//! `mmsync status` and `mmsync_tombstone_retention_behind_seconds` name what
//! holds retention back; `mmsync remove` releases a master that will not
//! come back.

use std::sync::Arc;
use std::time::Duration;

use metrics::{counter, gauge};
use rdkafka::consumer::BaseConsumer;
use sqlx::PgConnection;
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::metrics as m;
use crate::topology::{Master, Topology};

/// What another master can still send to the one whose tombstones these are.
#[derive(Debug, Clone, PartialEq)]
pub struct Link {
    pub origin: String,
    /// The origin's latest heartbeat as this master holds it (ms, its clock).
    pub beat_ms: Option<i64>,
    pub partitions: Vec<Partition>,
}

/// One partition of the origin's topics, as this master's sinks stand in it.
#[derive(Debug, Clone, PartialEq)]
pub struct Partition {
    pub topic: String,
    pub partition: i32,
    /// The next offset this master applies (0 when it has applied none).
    pub applied: i64,
    /// Commit time (ms, the origin's clock) of the last change applied here.
    pub last_commit_ms: Option<i64>,
    /// The partition's end in Kafka.
    pub end: i64,
}

/// What holds the watermark where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// The master has not been heard from since (its heartbeat).
    Heartbeat { master: String },
    /// This master has not applied a partition of that master's to its end.
    Partition { master: String, topic: String, partition: i32, behind: i64 },
    /// A pending dead letter (retried later, it must meet its tombstone).
    DeadLetter,
    /// Nothing: this master is alone.
    Nothing,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Holder::Heartbeat { master } => write!(f, "the latest heartbeat of {master} here"),
            Holder::Partition { master, topic, partition, behind } => {
                write!(f, "{behind} records of {master} not applied here yet ({topic}[{partition}])")
            }
            Holder::DeadLetter => write!(f, "a pending dead letter here (`mmsync dead-letters list`)"),
            Holder::Nothing => write!(f, "nothing"),
        }
    }
}

/// Up to when (ms) every change another master can still send was committed,
/// and what holds it there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watermark {
    pub ms: i64,
    pub held_by: Holder,
}

impl Watermark {
    /// Tombstones with a version below this (µs) may go.
    pub fn prune_below_us(&self, keep: Duration) -> i64 {
        self.ms.saturating_sub(keep.as_millis() as i64).saturating_mul(1000)
    }
}

/// The watermark: the smallest bound over every link, and the oldest
/// pending dead letter's version (µs); `now_ms` when nothing bounds it.
pub fn watermark(now_ms: i64, links: &[Link], dead_letter_version_us: Option<i64>) -> Watermark {
    let mut w = Watermark { ms: now_ms, held_by: Holder::Nothing };
    let mut lower = |ms: i64, held_by: Holder| {
        if ms < w.ms || w.held_by == Holder::Nothing {
            w = Watermark { ms: ms.min(w.ms), held_by };
        }
    };
    for link in links {
        lower(link.beat_ms.unwrap_or(i64::MIN), Holder::Heartbeat { master: link.origin.clone() });
        // Behind its end, or past it (the topic was recreated or lost
        // records: the sink stops on that gap), a partition holds.
        for p in link.partitions.iter().filter(|p| p.applied != p.end) {
            let held_by = Holder::Partition {
                master: link.origin.clone(),
                topic: p.topic.clone(),
                partition: p.partition,
                behind: (p.end - p.applied).max(0),
            };
            lower(p.last_commit_ms.unwrap_or(i64::MIN), held_by);
        }
    }
    if let Some(version) = dead_letter_version_us {
        lower(version.div_euclid(1000), Holder::DeadLetter);
    }
    w
}

/// Reads what bounds `master`'s tombstones: its heartbeats and applied
/// offsets, its pending dead letters, and the ends of the other masters'
/// topics in Kafka.
pub async fn assess(
    conn: &mut PgConnection,
    topology: &Topology,
    master: &str,
    consumer: Arc<BaseConsumer>,
) -> Result<Watermark> {
    let db = |what: &str| Error::db(master, what.to_string());
    let (now_ms,): (i64,) = sqlx::query_as("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::int8")
        .fetch_one(&mut *conn)
        .await
        .map_err(db("reading the clock"))?;
    let beats: Vec<(String, i64)> =
        sqlx::query_as("SELECT master, (extract(epoch FROM beat_at) * 1000)::int8 FROM mmsync.heartbeats")
            .fetch_all(&mut *conn)
            .await
            .map_err(db("reading heartbeats"))?;
    let applied: Vec<(String, i32, i64, Option<i64>)> =
        sqlx::query_as("SELECT topic, partition, next_offset, last_commit_ms FROM mmsync.applied_offsets")
            .fetch_all(&mut *conn)
            .await
            .map_err(db("reading applied offsets"))?;
    let origin_of: std::collections::HashMap<String, String> = crate::kafka::all_topics(topology)
        .into_iter()
        .filter(|(origin, _, _)| origin != master)
        .map(|(origin, _, topic)| (topic, origin))
        .collect();
    let topics: Vec<String> = origin_of.keys().cloned().collect();
    // The envelope's version, found in the record's bytes as they are (they
    // may not be valid UTF-8; row values are JSON strings, so only the
    // envelope's own field is an unquoted number), of the dead letters a
    // retry can apply: from the other masters' topics (not a source's own
    // refusals, partition -1, nor topics of masters no longer in the
    // topology). A record without one cannot be applied by a retry either.
    let dead: Option<i64> = sqlx::query_scalar(
        r#"SELECT least(min(substring(encode(record_value, 'escape') FROM '"version"\s*:\s*(-?[0-9]{1,30})\s*[,}]')::numeric),
                        9223372036854775807)::int8
           FROM mmsync.dead_letters WHERE retried_at IS NULL AND partition >= 0 AND topic = ANY($1)"#,
    )
    .bind(&topics)
    .fetch_one(&mut *conn)
    .await
    .map_err(db("reading the versions of pending dead letters"))?;

    // The ends only now, after the heartbeats: every change a beat read
    // above vouches for is in Kafka by then, so a partition applied to
    // these ends holds none of them (read before, they could miss some).
    let ends = tokio::task::spawn_blocking(move || crate::kafka::ends(consumer.as_ref(), &topics))
        .await
        .map_err(|e| Error::Internal(format!("reading topic ends panicked: {e}")))??;

    let mut links: Vec<Link> = topology
        .masters
        .iter()
        .filter(|o| o.name != master)
        .map(|o| Link {
            origin: o.name.clone(),
            beat_ms: beats.iter().find(|(b, _)| *b == o.name).map(|(_, ms)| *ms),
            partitions: Vec::new(),
        })
        .collect();
    for (topic, partition, end) in ends {
        let origin = &origin_of[&topic];
        let stored = applied.iter().find(|(t, p, _, _)| *t == topic && *p == partition);
        let link = links.iter_mut().find(|l| l.origin == *origin).expect("every topic's origin is a master");
        link.partitions.push(Partition {
            topic,
            partition,
            applied: stored.map_or(0, |s| s.2),
            last_commit_ms: stored.and_then(|s| s.3),
            end,
        });
    }
    Ok(watermark(now_ms, &links, dead))
}

/// Deletes `master`'s tombstones below `below_us`, in bounded steps; returns
/// how many went. (The source ignores deletes: nothing of this is sent.)
pub async fn prune(conn: &mut PgConnection, master: &str, below_us: i64) -> Result<u64> {
    const STEP: u64 = 10_000;
    let mut pruned = 0;
    loop {
        let n = sqlx::query(
            "DELETE FROM mmsync.tombstones WHERE ctid = ANY (ARRAY(
                 SELECT ctid FROM mmsync.tombstones WHERE version < $1 LIMIT 10000))",
        )
        .bind(below_us)
        .execute(&mut *conn)
        .await
        .map_err(Error::db(master, "pruning mmsync.tombstones"))?
        .rows_affected();
        pruned += n;
        if n < STEP {
            return Ok(pruned);
        }
    }
}

/// Prunes `master`'s tombstones until `stopped`, every quarter of the
/// horizon (at most once a minute, at least every 200 ms). A round that
/// fails is counted and logged, and the next one tries again: retention
/// never stops the sync.
pub async fn run(topology: Arc<Topology>, master: Master, mut stopped: watch::Receiver<bool>) -> Result<()> {
    let keep = topology.sync.tombstones_keep;
    let every = (keep / 4).clamp(Duration::from_millis(200), Duration::from_secs(60));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let consumer: Arc<BaseConsumer> =
        Arc::new(crate::kafka::client_config(&topology.kafka).create().map_err(Error::kafka("creating a client"))?);
    let mut conn: Option<PgConnection> = None;
    loop {
        tokio::select! {
            biased;
            _ = stopped.wait_for(|s| *s) => return Ok(()),
            _ = tick.tick() => {}
        }
        let round = async {
            if conn.is_none() {
                conn = Some(crate::postgres::db::connect(&master).await?);
            }
            let c = conn.as_mut().expect("connected above");
            let w = assess(c, &topology, &master.name, consumer.clone()).await?;
            let pruned = prune(c, &master.name, w.prune_below_us(keep)).await?;
            Ok::<_, Error>((w, pruned))
        };
        match round.await {
            Ok((w, pruned)) => {
                counter!(m::TOMBSTONES_PRUNED, m::MASTER => master.name.clone()).increment(pruned);
                counter!(m::TOMBSTONE_RETENTION_RUNS, m::MASTER => master.name.clone()).increment(1);
                let behind = crate::metrics::now_ms().saturating_sub(w.ms).max(0) as f64 / 1000.0;
                gauge!(m::TOMBSTONE_RETENTION_BEHIND, m::MASTER => master.name.clone()).set(behind);
            }
            Err(e) => {
                tracing::warn!(master = %master.name, "tombstone retention: {e}; trying again in {every:?}");
                let kind = match e.class() {
                    crate::error::Class::Retry => "retry",
                    crate::error::Class::Fatal => "fatal",
                };
                counter!(m::ERRORS, m::STAGE => "tombstones", m::KIND => kind).increment(1);
                conn = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partition(applied: i64, last_commit_ms: Option<i64>, end: i64) -> Partition {
        Partition { topic: "t".into(), partition: 0, applied, last_commit_ms, end }
    }

    fn link(origin: &str, beat_ms: Option<i64>, partitions: Vec<Partition>) -> Link {
        Link { origin: origin.into(), beat_ms, partitions }
    }

    #[test]
    fn a_master_caught_up_everywhere_holds_retention_at_its_heartbeat() {
        let links = [link("busan", Some(900), vec![partition(10, Some(800), 10)]), link("jeju", Some(950), vec![])];
        let w = watermark(1000, &links, None);
        assert_eq!(w, Watermark { ms: 900, held_by: Holder::Heartbeat { master: "busan".into() } });
        assert_eq!(w.prune_below_us(Duration::from_millis(100)), 800_000);
    }

    #[test]
    fn a_partition_not_applied_to_its_end_holds_retention_at_its_last_applied_commit() {
        let links = [link("busan", Some(900), vec![partition(7, Some(500), 10), partition(3, Some(600), 3)])];
        let w = watermark(1000, &links, None);
        assert_eq!(w.ms, 500);
        assert_eq!(w.held_by, Holder::Partition { master: "busan".into(), topic: "t".into(), partition: 0, behind: 3 });
    }

    #[test]
    fn a_master_never_heard_from_or_a_partition_never_applied_prunes_nothing() {
        let never_beat = watermark(1000, &[link("busan", None, vec![])], None);
        assert_eq!(never_beat.prune_below_us(Duration::ZERO), i64::MIN.saturating_mul(1000));
        let never_applied = watermark(1000, &[link("busan", Some(900), vec![partition(0, None, 5)])], None);
        assert!(never_applied.prune_below_us(Duration::ZERO) < 0);
        // An empty partition holds nothing.
        assert_eq!(watermark(1000, &[link("busan", Some(900), vec![partition(0, None, 0)])], None).ms, 900);
    }

    #[test]
    fn a_partition_applied_past_its_end_holds_retention_too() {
        // The topic was recreated or lost records: the sink stops there.
        let w = watermark(1000, &[link("busan", Some(900), vec![partition(12, Some(700), 10)])], None);
        assert_eq!(w.ms, 700);
        assert!(matches!(w.held_by, Holder::Partition { behind: 0, .. }));
    }

    #[test]
    fn a_pending_dead_letter_holds_retention_at_its_version() {
        let w = watermark(1000, &[link("busan", Some(900), vec![])], Some(400_999));
        assert_eq!(w, Watermark { ms: 400, held_by: Holder::DeadLetter });
    }

    #[test]
    fn a_master_alone_holds_nothing_back() {
        assert_eq!(watermark(1000, &[], None), Watermark { ms: 1000, held_by: Holder::Nothing });
    }
}
