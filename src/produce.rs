//! What every source does, whatever the kind of master: keep itself
//! connected ([`keep_running`]), and with each round of its master's
//! changes refuse versions ahead of the clock, produce the data, then the
//! heartbeats, and wait for Kafka to acknowledge every record ([`round`]).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use metrics::{counter, gauge, histogram};
use rdkafka::producer::FutureProducer;
use tokio::sync::watch;

use crate::change::{Change, Op};
use crate::error::{Class, Result};
use crate::metrics as m;
use crate::topology::{Master, TableName, Topology};

/// A connected source: PostgreSQL's slot, MariaDB's binlog.
pub trait Source: Sized + Send {
    /// Connects to the master's log where the source left off.
    fn connect(topology: &Topology, master: &Master) -> impl Future<Output = Result<Self>> + Send;
    /// Where it reads from, for the log: "slot mmsync_seoul", "the binlog from GTID 1-1-5".
    fn reading(&self) -> String;
    /// Streams until `shutdown` turns true or an error.
    fn run(
        &mut self,
        topology: &Topology,
        producer: &FutureProducer,
        shutdown: &mut watch::Receiver<bool>,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Whether its position moved since it connected: only real progress
    /// resets the backoff (a source that connects and fails at once, again
    /// and again, backs off).
    fn progressed(&self) -> bool;
}

/// Runs the source of `master` until `shutdown` turns true, reconnecting
/// with capped backoff after transient errors. Returns only on shutdown or
/// a fatal error.
pub async fn keep_running<S: Source>(
    topology: Arc<Topology>,
    master: Master,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let mut backoff = crate::error::Backoff::new();
    let mut was_up = None;
    loop {
        // A fresh producer per attempt: an idempotent producer that hit a fatal
        // error (a broker that lost its state, say) cannot be used again.
        let producer = crate::kafka::producer(&topology.kafka, &format!("mmsync-source-{}", master.name));
        let result = match (producer, S::connect(&topology, &master).await) {
            (Err(e), _) | (_, Err(e)) => Err(e),
            (Ok(producer), Ok(mut source)) => {
                gauge!(m::MASTER_UP, m::MASTER => master.name.clone()).set(1.0);
                if was_up != Some(true) {
                    tracing::info!(master = %master.name, "source connected, capturing from {}", source.reading());
                    was_up = Some(true);
                }
                let result = source.run(&topology, &producer, &mut shutdown).await;
                if source.progressed() {
                    backoff.reset();
                }
                result
            }
        };
        match result {
            Ok(()) => return Ok(()),
            Err(e) if e.class() == Class::Fatal => {
                counter!(m::ERRORS, m::STAGE => "capture", m::KIND => "fatal").increment(1);
                return Err(e);
            }
            Err(e) => {
                counter!(m::ERRORS, m::STAGE => "capture", m::KIND => "retry").increment(1);
                gauge!(m::MASTER_UP, m::MASTER => master.name.clone()).set(0.0);
                if was_up != Some(false) {
                    tracing::warn!(master = %master.name, "source paused, retrying with backoff: {e}");
                    was_up = Some(false);
                }
            }
        }
        let delay = backoff.next_delay();
        gauge!(m::RETRY_DELAY, m::STAGE => "capture", m::MASTER => master.name.clone()).set(delay.as_secs_f64());
        tokio::select! {
            _ = stopped(&mut shutdown) => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// A chore a source does every so often (a heartbeat, a measurement).
#[derive(Debug, Default)]
pub struct Every(Option<std::time::Instant>);

impl Every {
    /// Whether `period` has passed since it was last due (at once, the first time).
    pub fn due(&mut self, period: std::time::Duration) -> bool {
        let due = self.0.is_none_or(|t| t.elapsed() >= period);
        if due {
            self.0 = Some(std::time::Instant::now());
        }
        due
    }
}

/// Resolves once `shutdown` turns true (the guard `wait_for` returns is not
/// `Send`; dropped inside this function, it never crosses an await).
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// Produces a round of `master`'s changes and waits until Kafka
/// acknowledged every one. Returns the changes that must stay on the master
/// as dead letters, with the reason: versions ahead of the clock, and
/// records Kafka refused for their size.
pub async fn round(
    topology: &Topology,
    producer: &FutureProducer,
    master: &str,
    changes: Vec<Change>,
) -> Result<Vec<(Change, String)>> {
    let (changes, mut refused) = refuse_ahead(changes, topology.sync.max_clock_skew);
    // Heartbeats last, once everything before them is in Kafka: a beat
    // another master holds then vouches for every change this master
    // committed before it (tombstone retention counts on that; produced
    // together, a beat could land while an older change failed or was
    // still on its way).
    let (beats, data): (Vec<Change>, Vec<Change>) =
        changes.into_iter().partition(|c| c.table == TableName::heartbeats());
    if !data.is_empty() {
        histogram!(m::SOURCE_ROUND_BYTES, m::MASTER => master.to_string())
            .record(data.iter().map(Change::text_bytes).sum::<usize>() as f64);
    }
    refused.extend(produce(topology, producer, master, data).await?);
    refused.extend(produce(topology, producer, master, beats).await?);
    Ok(refused)
}

/// Splits off the changes whose version is beyond the clock plus the allowed
/// skew (written by a session that skipped the triggers, or by a master whose
/// clock runs far ahead): they would win every comparison for that long, so
/// they stay on this master as dead letters, with the reason.
pub fn refuse_ahead(changes: Vec<Change>, allowance: std::time::Duration) -> (Vec<Change>, Vec<(Change, String)>) {
    let now_us = crate::change::now_us();
    let mut refused = Vec::new();
    let kept = changes
        .into_iter()
        .filter_map(|c| match crate::change::version_problem(c.version, now_us, allowance) {
            None => Some(c),
            Some(problem) => {
                let reason = format!(
                    "{problem}: not sent to the other masters. The row was written by a session that skipped \
                     mmsync's triggers, or this master's clock runs ahead: fix the clock (NTP), then write the row \
                     again (its next version is bounded)"
                );
                refused.push((c, reason));
                None
            }
        })
        .collect();
    (kept, refused)
}

/// Produces changes and waits until Kafka acknowledged every one;
/// returns the changes Kafka refused for their size, with the reason.
async fn produce(
    topology: &Topology,
    producer: &FutureProducer,
    master: &str,
    changes: Vec<Change>,
) -> Result<Vec<(Change, String)>> {
    if changes.is_empty() {
        return Ok(Vec::new());
    }
    let refused = crate::kafka::produce_all(producer, &topology.kafka.topic_prefix, &changes).await?;
    // Counted per (table, op) once a chunk, not once a row.
    let mut captured: HashMap<(&TableName, Op), u64> = HashMap::new();
    for c in &changes {
        *captured.entry((&c.table, c.op)).or_default() += 1;
    }
    for ((table, op), n) in captured {
        counter!(m::CHANGES_CAPTURED, m::MASTER => master.to_string(), m::TABLE => table.to_string(), m::OP => op.name())
            .increment(n);
    }
    counter!(m::RECORDS_PRODUCED, m::MASTER => master.to_string()).increment((changes.len() - refused.len()) as u64);
    let mut changes: Vec<Option<Change>> = changes.into_iter().map(Some).collect();
    Ok(refused.into_iter().filter_map(|(i, reason)| Some((changes[i].take()?, reason))).collect())
}
