//! Kafka: client settings, topic names, topic creation, and producing one
//! round of changes with every delivery acknowledged before returning.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::{ClientConfig, FromClientConfig};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;

use crate::change::{Change, HEADER_ORIGIN, HEADER_VERSION};
use crate::error::{Error, Result};
use crate::topology::{Kafka, TableName, Topology};

/// How long an admin or metadata request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The topic of one master's changes to one table: `<prefix>.<master>.<schema>.<table>`.
/// Schema and table names are escaped so that any PostgreSQL name gives a legal,
/// distinct topic name: letters, digits and `_` stay, every other byte becomes `-` and two hex digits.
pub fn topic_name(prefix: &str, master: &str, table: &TableName) -> String {
    format!("{prefix}.{master}.{}.{}", escape(&table.schema), escape(&table.name))
}

fn escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' {
            out.push(b as char);
        } else {
            out.push_str(&format!("-{b:02x}"));
        }
    }
    out
}

/// Every topic of the topology: (master, table, topic).
pub fn all_topics(topology: &Topology) -> Vec<(String, TableName, String)> {
    let mut out = Vec::new();
    for m in &topology.masters {
        for t in topology.synced_tables() {
            let topic = topic_name(&topology.kafka.topic_prefix, &m.name, &t);
            out.push((m.name.clone(), t, topic));
        }
    }
    out
}

/// The common client configuration: brokers, then `[kafka.client]` as given.
pub fn client_config(kafka: &Kafka) -> ClientConfig {
    let mut c = ClientConfig::new();
    with_topology_settings(&mut c, kafka);
    c
}

/// Sets the brokers and `[kafka.client]` on top of mmsync's defaults, so the
/// operator's properties win.
fn with_topology_settings(c: &mut ClientConfig, kafka: &Kafka) {
    c.set("bootstrap.servers", &kafka.brokers);
    for (k, v) in &kafka.client {
        c.set(k, v);
    }
}

/// The most records one produced batch holds (librdkafka's `batch.num.messages`
/// on mmsync's producers, unless `[kafka.client]` sets it).
const BATCH_MAX_RECORDS: i64 = 2000;

/// How many records before its stored offset a sink starts reading again.
///
/// A sink's own batches end anywhere, often inside a batch the producer sent.
/// Kafka answers a fetch from the middle of a batch with the whole batch, but
/// tansu 0.6 (memory storage) answers it with the *next* batch, which would
/// skip the rest of the one the sink stopped in. Starting one producer batch
/// earlier always takes in the batch that holds the stored offset; the sink
/// drops what it had already applied.
pub fn resume_margin(kafka: &Kafka) -> i64 {
    kafka.client.get("batch.num.messages").and_then(|v| v.parse().ok()).unwrap_or(BATCH_MAX_RECORDS)
}

/// An idempotent producer (acks=all), so retries never duplicate or reorder a partition.
pub fn producer(kafka: &Kafka, client_id: &str) -> Result<FutureProducer> {
    let mut c = ClientConfig::new();
    c.set("client.id", client_id)
        .set("enable.idempotence", "true")
        .set("batch.num.messages", BATCH_MAX_RECORDS.to_string())
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "200000")
        .set("message.timeout.ms", "30000")
        // Rows of many MiB are carried when the broker takes them; beyond
        // this (or the broker's own limit) they become dead letters.
        .set("message.max.bytes", "16777216");
    with_topology_settings(&mut c, kafka);
    c.create().map_err(Error::kafka("creating the producer"))
}

/// A consumer for explicit partition assignment; offsets are never committed
/// to Kafka (they live in the target database).
pub fn consumer<C: FromClientConfig>(kafka: &Kafka, group: &str) -> Result<C> {
    let mut c = ClientConfig::new();
    c.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "20")
        .set("fetch.min.bytes", "1")
        // Ask for big fetches; a sink applies up to batch_max_changes at once.
        .set("max.partition.fetch.bytes", "16777216")
        .set("fetch.max.bytes", "67108864")
        .set("enable.partition.eof", "false")
        .set("allow.auto.create.topics", "false");
    with_topology_settings(&mut c, kafka);
    c.create().map_err(Error::kafka("creating the consumer"))
}

/// Creates every topic the topology needs; existing ones are left alone.
/// Returns the names of the topics it created.
pub async fn create_topics(topology: &Topology) -> Result<Vec<String>> {
    let admin: AdminClient<DefaultClientContext> =
        client_config(&topology.kafka).create().map_err(Error::kafka("creating the admin client"))?;
    let names: Vec<String> = all_topics(topology).into_iter().map(|(_, _, t)| t).collect();
    let new: Vec<NewTopic> = names
        .iter()
        .map(|n| {
            NewTopic::new(n, topology.kafka.partitions, TopicReplication::Fixed(topology.kafka.replication_factor))
        })
        .collect();
    let opts = AdminOptions::new().request_timeout(Some(REQUEST_TIMEOUT));
    let results = admin.create_topics(&new, &opts).await.map_err(Error::kafka("creating topics"))?;
    let mut created = Vec::new();
    for r in results {
        match r {
            Ok(topic) => created.push(topic),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(Error::kafka(format!("creating topic {topic}"))(KafkaError::AdminOp(code)));
            }
        }
    }
    Ok(created)
}

/// Partition count of a topic, or `None` if it does not exist.
pub fn partitions(consumer: &impl Consumer, topic: &str) -> Result<Option<i32>> {
    let md = consumer
        .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
        .map_err(Error::kafka(format!("reading metadata of {topic}")))?;
    Ok(md
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
        .map(|t| t.partitions().len() as i32))
}

/// Produces one round of changes and waits until Kafka has acknowledged every
/// one. Any failed delivery fails the round: the caller then must not advance
/// its slot, and will produce the round again (duplicates, never a gap).
/// The one exception is a record Kafka can never take (larger than its size
/// limit): it is returned, by index, with the reason, for the caller to keep
/// as a dead letter, and the round goes on.
pub async fn produce_all(producer: &FutureProducer, prefix: &str, changes: &[Change]) -> Result<Vec<(usize, String)>> {
    let mut pending: std::collections::VecDeque<(usize, DeliveryFuture)> = std::collections::VecDeque::new();
    let mut too_large = Vec::new();
    for (i, change) in changes.iter().enumerate() {
        let topic = topic_name(prefix, &change.origin, &change.table);
        let key = change.kafka_key();
        let value = change.kafka_value();
        let version = change.version.to_string();
        let headers = OwnedHeaders::new()
            .insert(Header { key: HEADER_ORIGIN, value: Some(change.origin.as_str()) })
            .insert(Header { key: HEADER_VERSION, value: Some(version.as_str()) });
        let mut record = FutureRecord::to(&topic).key(&key).payload(&value).headers(headers);
        loop {
            match producer.send_result(record) {
                Ok(fut) => {
                    pending.push_back((i, fut));
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    match pending.pop_front() {
                        Some((j, oldest)) => too_large.extend(await_delivery(oldest).await?.map(|r| (j, r))),
                        None => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
                Err((KafkaError::MessageProduction(code), _)) if is_too_large(code) => {
                    too_large.push((i, size_reason(value.len() + key.len(), code)));
                    break;
                }
                Err((e, _)) => return Err(Error::kafka(format!("producing to {topic}"))(e)),
            }
        }
    }
    while let Some((i, fut)) = pending.pop_front() {
        too_large.extend(await_delivery(fut).await?.map(|r| (i, r)));
    }
    Ok(too_large)
}

fn is_too_large(code: RDKafkaErrorCode) -> bool {
    matches!(code, RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize)
}

fn size_reason(bytes: usize, code: RDKafkaErrorCode) -> String {
    format!(
        "not produced: a record of {bytes} bytes is more than Kafka accepts ({code}); raise message.max.bytes \
         on the broker (and in [kafka.client]) and write the row again"
    )
}

/// `Ok(Some(reason))` when Kafka refused the record for its size.
async fn await_delivery(fut: DeliveryFuture) -> Result<Option<String>> {
    match fut.await {
        // librdkafka reports a "duplicate sequence" answer as delivered with
        // no offset. A correct broker says that only for a retry it already
        // stored; a broker that gave this new producer a used producer id says
        // it for records it then drops (seen with tansu 0.6, memory storage).
        // Unconfirmed means not done: the round is produced again by a new producer.
        Ok(Ok(delivery)) if delivery.offset < 0 => Err(Error::kafka(
            "delivery not confirmed (the broker answered \"duplicate sequence\" without an offset); producing the round again",
        )(KafkaError::MessageProduction(RDKafkaErrorCode::DuplicateSequenceNumber))),
        Ok(Ok(_)) => Ok(None),
        Ok(Err((KafkaError::MessageProduction(code), msg))) if is_too_large(code) => {
            use rdkafka::message::Message as _;
            Ok(Some(size_reason(msg.payload().map_or(0, <[u8]>::len) + msg.key().map_or(0, <[u8]>::len), code)))
        }
        Ok(Err((e, _))) => Err(Error::kafka("delivery")(e)),
        Err(_) => Err(Error::kafka("delivery")(KafkaError::Canceled)),
    }
}

/// Whether the brokers answer a metadata request.
pub fn ping(kafka: &Kafka) -> std::result::Result<(), String> {
    let consumer: BaseConsumer = client_config(kafka).create().map_err(|e| e.to_string())?;
    consumer.fetch_metadata(None, REQUEST_TIMEOUT).map(|_| ()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_are_escaped_and_distinct() {
        let t = |s: &str, n: &str| TableName { schema: s.into(), name: n.into() };
        assert_eq!(topic_name("mmsync", "seoul", &t("public", "users")), "mmsync.seoul.public.users");
        assert_eq!(topic_name("p", "m", &t("public", "Order Items")), "p.m.public.Order-20Items");
        assert_ne!(topic_name("p", "m", &t("a.b", "c")), topic_name("p", "m", &t("a", "b.c")));
        assert_ne!(topic_name("p", "m", &t("s", "a-20")), topic_name("p", "m", &t("s", "a ")));
    }
}
