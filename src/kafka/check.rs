//! What `mmsync check` asks of a Kafka cluster, each lack reported with its fix:
//!
//! - the brokers answer, with the credentials and TLS of `[kafka.client]`;
//! - every broker is reachable at the address it advertises (clients talk to
//!   those after the first request, so a wrong `advertised.listeners` works for
//!   bootstrap and then fails everything else);
//! - mmsync's topics exist with the partitions the topology names, or mmsync
//!   may create them (asked with a validate-only CreateTopics, which the broker
//!   authorizes and checks without creating anything);
//! - a record of the largest row fits the topic's size limit
//!   (`max.message.bytes`, or the broker's `message.max.bytes` for topics not
//!   made yet) and mmsync's producer limit;
//! - `min.insync.replicas` fits the replication factor: above it every write
//!   is refused; equal to it (above 1) one broker down stops capture; at 1 with
//!   more replicas an acknowledged write may live on one broker only.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, ConfigResource, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::types::RDKafkaErrorCode;

use super::{all_topics, client_config, producer_max_record_bytes, Recording, REQUEST_TIMEOUT};
use crate::topology::Topology;

/// How long check waits for a TCP connection to an advertised listener.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The size of the largest record one topic must carry, as measured on a master.
#[derive(Debug, Clone)]
pub struct RecordSize {
    pub topic: String,
    /// What was measured, for the message: "the largest row of public.docs on seoul".
    pub what: String,
    pub bytes: u64,
}

/// What check found: lines for what is fine, warnings, and problems with their fixes.
#[derive(Debug, Default)]
pub struct Report {
    pub ok: Vec<String>,
    pub warnings: Vec<String>,
    pub problems: Vec<String>,
}

/// Checks the cluster of `[kafka]` against what the topology needs.
pub async fn check(topology: &Topology, records: &[RecordSize]) -> Report {
    let mut report = Report::default();
    let kafka = &topology.kafka;
    let brokers = &kafka.brokers;
    // 1. Metadata: the brokers answer, and say who they are.
    let k = kafka.clone();
    let md = match tokio::task::spawn_blocking(move || super::metadata(&k)).await.expect("metadata does not panic") {
        Ok(md) => md,
        Err(why) => {
            report.problems.push(why.message);
            return report;
        }
    };
    let admin: AdminClient<Recording> = match client_config(kafka).create_with_context(Recording::default()) {
        Ok(a) => a,
        Err(e) => {
            report.problems.push(format!("kafka {brokers}: an admin client: {e}"));
            return report;
        }
    };
    let advertised: Vec<(i32, String, u16)> =
        md.brokers().iter().map(|b| (b.id(), b.host().to_string(), b.port() as u16)).collect();

    // 2. Every advertised listener is reachable from here.
    let mut unreachable = 0;
    for (id, host, port) in &advertised {
        let connect = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect((host.as_str(), *port)));
        let failure = match connect.await {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("no answer within {CONNECT_TIMEOUT:?}")),
        };
        if let Some(failure) = failure {
            unreachable += 1;
            report.problems.push(format!(
                "kafka broker {id} advertises {host}:{port}, which mmsync cannot reach ({failure}); \
                 set advertised.listeners on that broker to an address its clients can reach \
                 ([kafka] brokers only bootstraps: every later request goes to the advertised address)"
            ));
        }
    }
    if unreachable > 0 {
        return report;
    }
    report.ok.push(format!(
        "kafka {brokers}: ok ({} broker(s): {})",
        advertised.len(),
        advertised.iter().map(|(id, h, p)| format!("{id} at {h}:{p}")).collect::<Vec<_>>().join(", ")
    ));

    // 3. Topics: existing ones as the topology says, missing ones creatable.
    let mut existing: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut missing = Vec::new();
    for (_, _, topic) in all_topics(topology) {
        match md.topics().iter().find(|t| t.name() == topic) {
            Some(t) if t.error().is_some() => {
                let code = RDKafkaErrorCode::from(t.error().expect("checked"));
                if code == RDKafkaErrorCode::TopicAuthorizationFailed {
                    report.problems.push(format!(
                        "kafka topic {topic}: mmsync's user may not describe it; grant DESCRIBE, READ and WRITE on \
                         topics with the prefix {:?} (kafka-acls --resource-pattern-type prefixed)",
                        format!("{}.", kafka.topic_prefix)
                    ));
                } else if code == RDKafkaErrorCode::UnknownTopicOrPartition {
                    missing.push(topic);
                } else {
                    report.problems.push(format!("kafka topic {topic}: the brokers report {code}"));
                }
            }
            Some(t) if !t.partitions().is_empty() => {
                let replicas = t.partitions().iter().map(|p| p.replicas().len()).min().unwrap_or(0);
                existing.insert(topic, (t.partitions().len(), replicas));
            }
            _ => missing.push(topic),
        }
    }
    for (topic, (partitions, _)) in &existing {
        if *partitions as i32 != kafka.partitions {
            report.problems.push(format!(
                "kafka topic {topic} has {partitions} partition(s), but [kafka] partitions is {}; set partitions = \
                 {partitions} to match (mmsync never changes a topic it finds)",
                kafka.partitions
            ));
        }
    }
    if !missing.is_empty() {
        let new: Vec<NewTopic> = missing
            .iter()
            .map(|t| NewTopic::new(t, kafka.partitions, TopicReplication::Fixed(kafka.replication_factor)))
            .collect();
        let opts = AdminOptions::new().validate_only(true).request_timeout(Some(REQUEST_TIMEOUT));
        match admin.create_topics(&new, &opts).await {
            Err(e) => report
                .problems
                .push(format!("kafka {brokers}: asking whether mmsync may create its topics failed: {e}")),
            Ok(results) => {
                let refused: Vec<(String, RDKafkaErrorCode)> = results.into_iter().filter_map(Result::err).collect();
                if let Some((_, code)) = refused.iter().find(|(_, c)| is_authorization(*c)) {
                    let names: Vec<&str> = refused.iter().map(|(t, _)| t.as_str()).collect();
                    report.problems.push(format!(
                        "kafka {brokers}: mmsync's user may not create its topics ({code}); grant it CREATE on the \
                         cluster or on topics with the prefix {:?}, or create them yourself with {} partition(s) and \
                         replication factor {}: {}",
                        format!("{}.", kafka.topic_prefix),
                        kafka.partitions,
                        kafka.replication_factor,
                        names.join(", ")
                    ));
                } else if let Some((_, code)) = refused.first() {
                    let why = if *code == RDKafkaErrorCode::InvalidReplicationFactor {
                        format!(
                            "replication_factor is {} but the cluster has {} broker(s); lower [kafka] replication_factor",
                            kafka.replication_factor,
                            advertised.len()
                        )
                    } else {
                        format!("the brokers refuse them ({code})")
                    };
                    report.problems.push(format!("kafka {brokers}: mmsync cannot create its topics: {why}"));
                } else {
                    report
                        .ok
                        .push(format!("kafka {brokers}: mmsync may create its {} missing topic(s)", missing.len()));
                }
            }
        }
    }

    // 4. Sizes and durability, from the brokers' and the topics' configuration.
    let Some(&(broker_id, _, _)) = advertised.first() else { return report };
    let mut specs = vec![ResourceSpecifier::Broker(broker_id)];
    specs.extend(existing.keys().map(|t| ResourceSpecifier::Topic(t)));
    let opts = AdminOptions::new().request_timeout(Some(REQUEST_TIMEOUT));
    let configs = match admin.describe_configs(&specs, &opts).await {
        Ok(c) => c,
        Err(e) => {
            report.warnings.push(format!(
                "kafka {brokers}: cannot read the brokers' configuration ({e}); message.max.bytes and \
                 min.insync.replicas were not checked"
            ));
            return report;
        }
    };
    let mut configs = configs.into_iter();
    let broker = match configs.next() {
        Some(Ok(c)) => c,
        Some(Err(code)) => {
            report.warnings.push(format!(
                "kafka {brokers}: cannot read broker {broker_id}'s configuration ({code}); grant mmsync's user \
                 DESCRIBE_CONFIGS on the cluster, or check message.max.bytes and min.insync.replicas by hand"
            ));
            return report;
        }
        None => return report,
    };
    let topic_configs: BTreeMap<&String, ConfigResource> =
        existing.keys().zip(configs).filter_map(|(t, c)| Some((t, c.ok()?))).collect();
    let number = |c: &ConfigResource, key: &str| c.get(key).and_then(|e| e.value.as_deref()?.parse::<u64>().ok());

    for (_, _, topic) in all_topics(topology) {
        let topic_config = topic_configs.get(&topic);
        let (limit, limit_name) = match topic_config.and_then(|c| number(c, "max.message.bytes")) {
            Some(n) => (n, "the topic's max.message.bytes"),
            None => match number(&broker, "message.max.bytes") {
                Some(n) => (n, "the brokers' message.max.bytes"),
                None => continue,
            },
        };
        for r in records.iter().filter(|r| r.topic == topic) {
            if r.bytes > limit {
                report.problems.push(format!(
                    "kafka topic {topic}: {} is a record of about {} bytes, but {limit_name} is {limit}: such rows \
                     would become dead letters; raise message.max.bytes on the brokers (and max.message.bytes on \
                     the topic, if it has its own) to at least {}",
                    r.what,
                    r.bytes,
                    r.bytes.next_power_of_two()
                ));
            } else if r.bytes > producer_max_record_bytes(kafka) {
                report.problems.push(format!(
                    "kafka topic {topic}: {} is a record of about {} bytes, more than mmsync's producer sends \
                     ({}); set \"message.max.bytes\" in [kafka.client] to at least {}",
                    r.what,
                    r.bytes,
                    producer_max_record_bytes(kafka),
                    r.bytes.next_power_of_two()
                ));
            }
        }
    }

    let broker_min_isr = number(&broker, "min.insync.replicas").unwrap_or(1);
    let mut durability = Vec::new();
    for (_, _, topic) in all_topics(topology) {
        let (replicas, min_isr, whose) = match existing.get(&topic) {
            Some((_, replicas)) => (
                *replicas as u64,
                topic_configs.get(&topic).and_then(|c| number(c, "min.insync.replicas")).unwrap_or(broker_min_isr),
                "the topic's",
            ),
            None => (kafka.replication_factor.max(1) as u64, broker_min_isr, "the brokers'"),
        };
        durability.push((topic, replicas, min_isr, whose));
    }
    for (topic, replicas, min_isr, whose) in &durability {
        if min_isr > replicas {
            report.problems.push(format!(
                "kafka topic {topic}: {whose} min.insync.replicas is {min_isr} but the topic has {replicas} \
                 replica(s): every write would be refused (NOT_ENOUGH_REPLICAS); raise [kafka] replication_factor \
                 (for topics mmsync creates) or lower min.insync.replicas"
            ));
        }
    }
    if let Some((topic, replicas, min_isr, _)) = durability.iter().find(|(_, r, m, _)| *m == *r && *r > 1) {
        report.warnings.push(format!(
            "kafka topic {topic} (and maybe others): {replicas} replica(s) and min.insync.replicas {min_isr}: \
             with one broker down mmsync cannot produce, and capture waits (nothing is lost); use one more replica \
             than min.insync.replicas to ride out a broker"
        ));
    }
    if let Some((topic, replicas, _, _)) = durability.iter().find(|(_, r, m, _)| *m == 1 && *r > 1) {
        report.warnings.push(format!(
            "kafka topic {topic} (and maybe others): {replicas} replicas but min.insync.replicas 1: a write Kafka \
             acknowledged may sit on one broker only; set min.insync.replicas = 2"
        ));
    }
    report
}

fn is_authorization(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
            | RDKafkaErrorCode::GroupAuthorizationFailed
    )
}
