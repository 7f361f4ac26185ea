//! Do Kafka transactions or consumer groups serve mmsync? Measured on the
//! test bed's broker (Apache Kafka, one KRaft node), the way mmsync would use them:
//!
//! 1. producing rounds of changes (10,000 records of ~300 bytes, the source's
//!    `capture_max_changes`) with the idempotent producer mmsync uses, waiting
//!    for every acknowledgement, against a transactional producer that commits
//!    each round (what fencing a second source with a `transactional.id` would cost);
//! 2. how long a sink waits before its first record: with the explicit
//!    partition assignment mmsync uses, against joining a consumer group
//!    (`subscribe`), which would split partitions between two `mmsync run`s
//!    instead of fencing one of them.
//!
//! `cargo bench --bench kafka_modes` (MMSYNC_BENCH_ROUNDS rounds, default 20).
//! Prints a table and writes target/bench/kafka_modes.json.

use std::time::{Duration, Instant};

use mmsync::testbed::{KafkaCluster, KafkaOptions};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

const ROUND: usize = 10_000;

fn config(kafka: &KafkaCluster) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", kafka.address());
    c
}

async fn produce_round(producer: &FutureProducer, topic: &str, round: usize, payload: &str) {
    let mut pending = Vec::with_capacity(ROUND);
    for i in 0..ROUND {
        let key = format!("{{\"id\":\"{}\"}}", round * ROUND + i);
        loop {
            match producer.send_result(FutureRecord::to(topic).key(&key).payload(payload)) {
                Ok(f) => {
                    pending.push(f);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    }
    for f in pending {
        f.await.expect("not cancelled").expect("delivered");
    }
}

#[tokio::main]
async fn main() {
    let rounds: usize = std::env::var("MMSYNC_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let kafka = KafkaCluster::start(KafkaOptions::default()).await.expect("Kafka starts");
    let admin: AdminClient<DefaultClientContext> = config(&kafka).create().unwrap();
    let topics = ["idempotent", "transactional", "groups"];
    let new: Vec<NewTopic> = topics.iter().map(|t| NewTopic::new(t, 3, TopicReplication::Fixed(1))).collect();
    admin.create_topics(&new, &AdminOptions::new()).await.unwrap();
    let payload = "x".repeat(300);
    let base = |c: &mut ClientConfig| {
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("queue.buffering.max.messages", "200000");
    };

    // 1a. Idempotent, as mmsync produces.
    let mut c = config(&kafka);
    base(&mut c);
    let idempotent: FutureProducer = c.create().unwrap();
    produce_round(&idempotent, "idempotent", usize::MAX / ROUND / 2, &payload).await; // warm-up
    let started = Instant::now();
    for r in 0..rounds {
        produce_round(&idempotent, "idempotent", r, &payload).await;
    }
    let idem_rate = (rounds * ROUND) as f64 / started.elapsed().as_secs_f64();

    // 1b. Transactional: one transaction per round.
    let mut c = config(&kafka);
    base(&mut c);
    c.set("transactional.id", "mmsync-bench-source");
    let tx: FutureProducer = c.create().unwrap();
    tx.init_transactions(Duration::from_secs(30)).unwrap();
    let mut commit = Duration::ZERO;
    tx.begin_transaction().unwrap();
    produce_round(&tx, "transactional", usize::MAX / ROUND / 2, &payload).await; // warm-up
    tx.commit_transaction(Duration::from_secs(30)).unwrap();
    let started = Instant::now();
    for r in 0..rounds {
        tx.begin_transaction().unwrap();
        produce_round(&tx, "transactional", r, &payload).await;
        let t = Instant::now();
        tx.commit_transaction(Duration::from_secs(30)).unwrap();
        commit += t.elapsed();
    }
    let tx_rate = (rounds * ROUND) as f64 / started.elapsed().as_secs_f64();
    let commit_ms = commit.as_secs_f64() * 1000.0 / rounds as f64;

    // 2. Time to the first record: explicit assignment against a group join.
    let producer: FutureProducer = config(&kafka).create().unwrap();
    for p in 0..3 {
        producer
            .send(FutureRecord::to("groups").key("k").payload("v").partition(p), Duration::from_secs(10))
            .await
            .unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    let first_record = |consumer: &BaseConsumer| {
        let started = Instant::now();
        loop {
            if let Some(Ok(_)) = consumer.poll(Duration::from_millis(10)) {
                return started.elapsed();
            }
            assert!(started.elapsed() < Duration::from_secs(60), "no record within a minute");
        }
    };
    let mut assign_ms = Vec::new();
    let mut subscribe_ms = Vec::new();
    for i in 0..5 {
        let started = Instant::now();
        let assigned: BaseConsumer = config(&kafka).set("group.id", format!("assign-{i}")).create().unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..3 {
            tpl.add_partition_offset("groups", p, Offset::Beginning).unwrap();
        }
        assigned.assign(&tpl).unwrap();
        first_record(&assigned);
        assign_ms.push(started.elapsed().as_secs_f64() * 1000.0);

        let started = Instant::now();
        let member: BaseConsumer = config(&kafka)
            .set("group.id", format!("subscribe-{i}"))
            .set("auto.offset.reset", "earliest")
            .create()
            .unwrap();
        member.subscribe(&["groups"]).unwrap();
        first_record(&member);
        subscribe_ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (assign, subscribe) = (median(&mut assign_ms), median(&mut subscribe_ms));

    println!(
        "\nKafka modes for mmsync, {rounds} rounds of {ROUND} records (~300 B), Apache Kafka {}, this machine\n",
        mmsync::testbed::kafka::KAFKA_VERSION
    );
    println!("| what | figure |");
    println!("|---|---:|");
    println!("| idempotent producer, every ack awaited per round (mmsync) | {idem_rate:.0} records/s |");
    println!("| transactional producer, one commit per round | {tx_rate:.0} records/s ({:.2}×), commit {commit_ms:.1} ms/round |", tx_rate / idem_rate);
    println!("| first record after start, explicit assignment (mmsync), median of 5 | {assign:.0} ms |");
    println!("| first record after start, consumer-group subscribe, median of 5 | {subscribe:.0} ms |");
    std::fs::create_dir_all("target/bench").unwrap();
    let json = serde_json::json!({
        "rounds": rounds, "round_records": ROUND,
        "idempotent_records_per_s": idem_rate, "transactional_records_per_s": tx_rate, "commit_ms_per_round": commit_ms,
        "first_record_assign_ms": assign, "first_record_subscribe_ms": subscribe,
    });
    std::fs::write("target/bench/kafka_modes.json", serde_json::to_string_pretty(&json).unwrap()).unwrap();
}
