//! The test bed itself: real masters and a real broker, Kafka round trip with
//! headers, and a killed master that comes back with its data.

use std::time::Duration;

use mmsync::testbed::{wait_for, Bed, BrokerStorage, BED_DATABASE};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

#[tokio::test]
async fn bed_runs_masters_and_broker_that_survive_kills() {
    let mut bed = Bed::start(&["alpha", "beta"], BrokerStorage::Memory).await.expect("bed starts");

    // Both masters answer and have logical WAL.
    for (_, cluster) in &bed.masters {
        let mut conn = cluster.connect(BED_DATABASE).await.unwrap();
        let level: String = sqlx::query_scalar("SHOW wal_level").fetch_one(&mut conn).await.unwrap();
        assert_eq!(level, "logical");
    }

    // A topic is created, written with a header and read back.
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bed.broker.address());
    let admin: AdminClient<DefaultClientContext> = config.create().unwrap();
    let topic = NewTopic::new("bed.check", 1, TopicReplication::Fixed(1));
    let created = admin.create_topics([&topic], &AdminOptions::new()).await.unwrap();
    assert!(created[0].is_ok(), "{created:?}");
    let producer: FutureProducer = config.clone().set("enable.idempotence", "true").create().unwrap();
    producer
        .send(
            FutureRecord::to("bed.check")
                .key("k1")
                .payload("hello")
                .headers(OwnedHeaders::new().insert(Header { key: "mmsync-origin", value: Some("alpha") })),
            Duration::from_secs(10),
        )
        .await
        .expect("delivered");
    let consumer: BaseConsumer = config.clone().set("group.id", "bed").create().unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("bed.check", 0, Offset::Beginning).unwrap();
    consumer.assign(&tpl).unwrap();
    let (payload, origin) = wait_for("the record to come back", Duration::from_secs(30), || async {
        let msg = consumer.poll(Duration::from_millis(100))?.ok()?;
        let origin = msg.headers()?.iter().find(|h| h.key == "mmsync-origin")?.value?.to_vec();
        Some((msg.payload()?.to_vec(), origin))
    })
    .await;
    assert_eq!(payload, b"hello");
    assert_eq!(origin, b"alpha");

    // A master killed with SIGKILL comes back on the same port with its data.
    let alpha = bed.master_mut("alpha");
    let mut conn = alpha.connect(BED_DATABASE).await.unwrap();
    sqlx::raw_sql("CREATE TABLE kept (id int PRIMARY KEY); INSERT INTO kept VALUES (1), (2)")
        .execute(&mut conn)
        .await
        .unwrap();
    drop(conn);
    let port = alpha.port();
    alpha.kill().await;
    assert!(alpha.connect(BED_DATABASE).await.is_err(), "a killed master refuses connections");
    alpha.restart().await.expect("restarts after SIGKILL");
    assert_eq!(alpha.port(), port);
    let mut conn = alpha.connect(BED_DATABASE).await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM kept").fetch_one(&mut conn).await.unwrap();
    assert_eq!(n, 2);
}

#[tokio::test]
async fn sqlite_broker_keeps_topics_across_a_kill() {
    let mut bed = Bed::start(&["solo"], BrokerStorage::Sqlite).await.expect("bed starts");
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bed.broker.address());
    let admin: AdminClient<DefaultClientContext> = config.create().unwrap();
    let topic = NewTopic::new("kept.topic", 2, TopicReplication::Fixed(1));
    admin.create_topics([&topic], &AdminOptions::new()).await.unwrap();
    drop(admin);
    bed.broker.restart().await.expect("broker restarts");
    let consumer: BaseConsumer = config.create().unwrap();
    let partitions = wait_for("the topic after restart", Duration::from_secs(30), || async {
        let md = consumer.fetch_metadata(Some("kept.topic"), Duration::from_secs(5)).ok()?;
        let t = md.topics().iter().find(|t| t.name() == "kept.topic")?;
        (t.error().is_none() && !t.partitions().is_empty()).then(|| t.partitions().len())
    })
    .await;
    assert_eq!(partitions, 2);
    // The bed indexes tansu's record headers (see Broker::index_headers), after a restart too.
    let indexes = std::process::Command::new("sqlite3")
        .arg(bed.broker.sqlite_file().unwrap())
        .arg(".indexes header")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&indexes.stdout).contains("mmsync_bed_header_record"), "{indexes:?}");
}
