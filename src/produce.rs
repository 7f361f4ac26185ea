//! What every source does with a round of its master's changes, whatever
//! the kind of master: refuse versions ahead of the clock, produce the data,
//! then the heartbeats, and wait for Kafka to acknowledge every record.

use std::collections::HashMap;

use metrics::counter;
use rdkafka::producer::FutureProducer;

use crate::change::{Change, Op};
use crate::error::Result;
use crate::metrics as m;
use crate::topology::{TableName, Topology};

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
