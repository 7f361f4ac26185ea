//! Kafka: client settings, topic names, topic creation, and producing one
//! round of changes with every delivery acknowledged before returning.
//! [`check`] holds what `mmsync check` asks of a cluster.

pub mod check;

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
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

/// The largest record mmsync's producer sends unless `[kafka.client]` sets
/// `message.max.bytes`: rows of many MiB are carried when the broker takes
/// them; beyond this (or the broker's own limit) they become dead letters.
pub const PRODUCER_MAX_RECORD_BYTES: u64 = 16 * 1024 * 1024;

/// The largest record the producer sends, `[kafka.client]` included.
pub fn producer_max_record_bytes(kafka: &Kafka) -> u64 {
    kafka.client.get("message.max.bytes").and_then(|v| v.parse().ok()).unwrap_or(PRODUCER_MAX_RECORD_BYTES)
}

/// An idempotent producer (acks=all), so retries never duplicate or reorder a partition.
pub fn producer(kafka: &Kafka, client_id: &str) -> Result<FutureProducer> {
    let mut c = ClientConfig::new();
    c.set("client.id", client_id)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "200000")
        .set("message.timeout.ms", "30000")
        .set("message.max.bytes", PRODUCER_MAX_RECORD_BYTES.to_string());
    with_topology_settings(&mut c, kafka);
    c.create().map_err(Error::kafka("creating the producer"))
}

/// A consumer for explicit partition assignment; offsets are never committed
/// to Kafka (they live in the target database). It reads at most
/// `read_ahead` bytes ahead ([`Topology::sink_read_ahead_bytes`]) and at most
/// `read_ahead_records` records.
pub fn consumer<C: FromClientConfig>(
    kafka: &Kafka,
    group: &str,
    read_ahead: usize,
    read_ahead_records: usize,
) -> Result<C> {
    let mut c = ClientConfig::new();
    c.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // Never jump: a stored offset outside what the topic holds (records
        // deleted by retention, a topic recreated) is a gap the sink must
        // report, not skip (see the sink's `offset_gap`).
        .set("auto.offset.reset", "error")
        .set("fetch.wait.max.ms", "20")
        .set("fetch.min.bytes", "1")
        // What bounds a sink's memory whatever the backlog, with the batch
        // bounds: librdkafka's defaults read 64 MiB and 100,000 records
        // ahead per consumer, and mmsync runs one per master, table and
        // worker (its queue holds each record with about 300 bytes of its
        // own, so small records are bounded by their count). A record
        // larger than these still comes, alone. fetch.max.bytes is left to
        // librdkafka, which sizes it from these and from message.max.bytes
        // (set above it, a consumer would refuse to start).
        .set("max.partition.fetch.bytes", read_ahead.min(8 << 20).to_string())
        // librdkafka takes at most 2,097,151 KiB here.
        .set("queued.max.messages.kbytes", (read_ahead / 1024).clamp(1, 2_097_151).to_string())
        .set("queued.min.messages", read_ahead_records.max(1).to_string())
        // Past either bound librdkafka waits this long before it fetches
        // again (1 s by default): with a read-ahead of a few batches, a
        // sink would starve for most of that second.
        .set("fetch.queue.backoff.ms", "10")
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
    // The controller has the topics now; the brokers list them a moment
    // later. Return when they do, so that a `run` right after `init` finds them.
    let deadline = std::time::Instant::now() + REQUEST_TIMEOUT * 3;
    let consumer: BaseConsumer = client_config(&topology.kafka).create().map_err(Error::kafka("creating a client"))?;
    for topic in &created {
        while partitions(&consumer, topic)?.is_none() {
            if std::time::Instant::now() > deadline {
                return Err(Error::kafka(format!("waiting for the brokers to list the new topic {topic}"))(
                    KafkaError::AdminOp(RDKafkaErrorCode::OperationTimedOut),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
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

/// The end offset of every partition of `topics`, as (topic, partition,
/// end); a topic that does not exist has none. Blocking: call it from
/// `spawn_blocking`.
pub fn ends(consumer: &impl Consumer, topics: &[String]) -> Result<Vec<(String, i32, i64)>> {
    let mut ends = Vec::new();
    for topic in topics {
        for p in 0..partitions(consumer, topic)?.unwrap_or(0) {
            // A partition between leaders (a topic just made, a broker
            // restarting) answers again in a moment: that is waited out,
            // within a bound, rather than failing a join or a remove.
            let deadline = std::time::Instant::now() + PASSING_FOR;
            let (_, high) = loop {
                match consumer.fetch_watermarks(topic, p, REQUEST_TIMEOUT) {
                    Err(rdkafka::error::KafkaError::MetadataFetch(code))
                        if is_passing(code) && std::time::Instant::now() < deadline =>
                    {
                        std::thread::sleep(std::time::Duration::from_millis(200));
                    }
                    other => break other.map_err(Error::kafka(format!("reading the end of {topic}[{p}]")))?,
                }
            };
            ends.push((topic.clone(), p, high));
        }
    }
    Ok(ends)
}

/// How long [`ends`] waits out a partition between leaders.
const PASSING_FOR: std::time::Duration = std::time::Duration::from_secs(30);

/// [`ends`] with a client of its own, off the async threads.
pub async fn topic_ends(kafka: &Kafka, topics: Vec<String>) -> Result<Vec<(String, i32, i64)>> {
    let kafka = kafka.clone();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = client_config(&kafka).create().map_err(Error::kafka("creating a client"))?;
        ends(&consumer, &topics)
    })
    .await
    .map_err(|e| Error::Internal(format!("reading topic ends panicked: {e}")))?
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

/// Errors a client reports while it recovers by itself: a broker connection
/// lost, a leader that moved, a request that timed out. A consumer that gets
/// one keeps going; librdkafka reconnects and fetches from the new leader.
pub fn is_passing(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::BrokerTransportFailure
            | C::AllBrokersDown
            | C::NetworkException
            | C::RequestTimedOut
            | C::OperationTimedOut
            | C::NotLeaderForPartition
            | C::LeaderNotAvailable
            | C::NotCoordinator
            | C::CoordinatorNotAvailable
            | C::FencedLeaderEpoch
            | C::UnknownLeaderEpoch
    )
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
        Ok(Ok(_)) => Ok(None),
        Ok(Err((KafkaError::MessageProduction(code), msg))) if is_too_large(code) => {
            use rdkafka::message::Message as _;
            Ok(Some(size_reason(msg.payload().map_or(0, <[u8]>::len) + msg.key().map_or(0, <[u8]>::len), code)))
        }
        Ok(Err((e, _))) => Err(Error::kafka("delivery")(e)),
        Err(_) => Err(Error::kafka("delivery")(KafkaError::Canceled)),
    }
}

/// A client context that keeps the errors librdkafka reported on its own (an
/// authentication failure, a broker it cannot resolve), so that a request
/// that merely timed out can say why. librdkafka's messages name the broker
/// and never hold a password.
#[derive(Default)]
pub struct Recording {
    seen: std::sync::Mutex<Vec<(RDKafkaErrorCode, String)>>,
}

impl Recording {
    /// The most telling error reported: a refused login or TLS handshake
    /// before anything else (later "all brokers are down" only follow from it).
    pub fn last_error(&self) -> Option<(RDKafkaErrorCode, String)> {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.iter().find(|(code, _)| *code == RDKafkaErrorCode::Authentication).or(seen.first()).cloned()
    }
}

impl Recording {
    fn record(&self, mut code: RDKafkaErrorCode, reason: &str) {
        if reason.contains("SASL authentication error") || reason.contains("Authentication failed") {
            code = RDKafkaErrorCode::Authentication;
        }
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() < 16 {
            seen.push((code, reason.to_string()));
        }
    }
}

impl ClientContext for Recording {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!("kafka: {reason}");
        self.record(error.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Unknown), reason);
    }

    /// librdkafka says why a connection failed (a refused login, a TLS
    /// handshake) in its log, from its own threads.
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        if matches!(level, L::Emerg | L::Alert | L::Critical | L::Error | L::Warning) {
            tracing::warn!("librdkafka {fac}: {log_message}");
            self.record(RDKafkaErrorCode::Unknown, log_message);
        }
    }
}

impl rdkafka::consumer::ConsumerContext for Recording {}

/// Why the brokers gave no metadata, said for the operator.
#[derive(Debug, Clone)]
pub struct Unanswered {
    /// The brokers refused the credentials of `[kafka.client]`: no retry helps.
    pub refused_credentials: bool,
    /// What happened and the fix; names the brokers, never a secret.
    pub message: String,
}

impl std::fmt::Display for Unanswered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// The cluster's metadata (every topic the user may see), or why there is
/// none: librdkafka's own reason when it gave one, such as a refused password.
pub fn metadata(kafka: &Kafka) -> std::result::Result<rdkafka::metadata::Metadata, Unanswered> {
    let unanswered = |message: String| Unanswered { refused_credentials: false, message };
    let consumer: BaseConsumer<Recording> =
        client_config(kafka).create_with_context(Recording::default()).map_err(|e| {
            unanswered(format!("kafka {}: [kafka.client] is not a valid client configuration: {e}", kafka.brokers))
        })?;
    match consumer.fetch_metadata(None, REQUEST_TIMEOUT) {
        Ok(md) => Ok(md),
        Err(e) => {
            // Errors librdkafka raised on its own wait in the client's queue
            // until it is polled; polling hands them to the context.
            let _ = consumer.poll(Duration::ZERO);
            let reported = consumer.context().last_error();
            Err(Unanswered {
                refused_credentials: matches!(reported, Some((RDKafkaErrorCode::Authentication, _))),
                message: explain(&kafka.brokers, reported, &e.to_string(), &kafka.client),
            })
        }
    }
}

/// Says why the brokers did not answer, with the fix.
pub(crate) fn explain(
    brokers: &str,
    reported: Option<(RDKafkaErrorCode, String)>,
    error: &str,
    client: &std::collections::BTreeMap<String, String>,
) -> String {
    match reported {
        Some((RDKafkaErrorCode::Authentication, reason)) => {
            let user = client.get("sasl.username").map(String::as_str).unwrap_or("(none)");
            format!(
                "kafka {brokers}: the brokers refused mmsync's credentials (user {user:?}): {reason}; check \
                 sasl.mechanism, sasl.username and sasl.password in [kafka.client] (passwords are best given as \
                 {{ env = \"VARIABLE\" }})"
            )
        }
        Some((_, reason)) if reason.contains("SSL") || reason.contains("certificate") => format!(
            "kafka {brokers}: TLS failed: {reason}; check security.protocol and ssl.ca.location in [kafka.client]"
        ),
        Some((_, reason)) => format!(
            "kafka {brokers}: the brokers do not answer ({error}; librdkafka: {reason}); check [kafka] brokers, \
             [kafka.client] and that the brokers are running"
        ),
        None => format!(
            "kafka {brokers}: the brokers do not answer ({error}); check [kafka] brokers and that the brokers are running"
        ),
    }
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

    #[test]
    fn a_sink_consumer_builds_with_records_larger_than_its_read_ahead() {
        // The README tells operators to raise message.max.bytes in
        // [kafka.client] for big rows; librdkafka refuses a consumer whose
        // fetch.max.bytes is below it, so mmsync must not pin that one.
        let kafka = |client: &[(&str, &str)]| Kafka {
            brokers: "127.0.0.1:9".into(),
            topic_prefix: "t".into(),
            partitions: 1,
            replication_factor: 1,
            client: client.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        for client in [&[][..], &[("message.max.bytes", "67108864")][..]] {
            // The smallest share, the default's share of two masters, and a
            // share above what librdkafka takes for a queue.
            for read_ahead in [crate::topology::MIN_SINK_READ_AHEAD, 2 << 20, 4 << 30] {
                let built = consumer::<rdkafka::consumer::BaseConsumer>(&kafka(client), "g", read_ahead, 2000);
                assert!(built.is_ok(), "{client:?} {read_ahead}: {:?}", built.err());
            }
        }
    }
}
