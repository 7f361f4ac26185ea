//! The test bed itself: real masters and a real broker, Kafka round trip with
//! headers, and a killed master that comes back with its data.

use std::time::Duration;

use mmsync::testbed::{wait_for, Bed, BedKafka, BED_DATABASE};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

#[tokio::test]
async fn bed_runs_masters_and_broker_that_survive_kills() {
    let mut bed = Bed::start(&["alpha", "beta"], BedKafka::Shared).await.expect("bed starts");

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
    // An unlogged table is emptied by crash recovery only: a clean shutdown
    // keeps its rows. That tells a real kill from a polite stop.
    sqlx::raw_sql(
        "CREATE TABLE kept (id int PRIMARY KEY); INSERT INTO kept VALUES (1), (2);
         CREATE UNLOGGED TABLE crash_only (id int); INSERT INTO crash_only VALUES (1); CHECKPOINT",
    )
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
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM crash_only").fetch_one(&mut conn).await.unwrap();
    assert_eq!(n, 0, "the master went through no crash recovery: it was stopped, not killed");
}

#[tokio::test]
async fn a_kafka_node_killed_with_sigkill_restarts_on_its_log_directories() {
    let bed = Bed::start(&["solo"], BedKafka::own()).await.expect("bed starts");
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bed.broker.address());
    let admin: AdminClient<DefaultClientContext> = config.create().unwrap();
    let topic = NewTopic::new("kept.topic", 2, TopicReplication::Fixed(1));
    admin.create_topics([&topic], &AdminOptions::new()).await.unwrap();
    drop(admin);
    let producer: FutureProducer = config.clone().set("acks", "all").create().unwrap();
    for i in 0..10 {
        let key = format!("k{i}");
        producer.send(FutureRecord::to("kept.topic").key(&key).payload("v"), Duration::from_secs(10)).await.unwrap();
    }
    drop(producer);
    let address = bed.broker.address();
    bed.broker.kill().await;
    let consumer: BaseConsumer = config.clone().set("socket.connection.setup.timeout.ms", "1000").create().unwrap();
    assert!(consumer.fetch_metadata(None, Duration::from_secs(2)).is_err(), "a killed broker answers");
    bed.broker.restart().await.expect("broker restarts");
    assert_eq!(bed.broker.address(), address, "same ports after a restart");
    let partitions = wait_for("the topic after restart", Duration::from_secs(30), || async {
        let md = consumer.fetch_metadata(Some("kept.topic"), Duration::from_secs(5)).ok()?;
        let t = md.topics().iter().find(|t| t.name() == "kept.topic")?;
        (t.error().is_none() && !t.partitions().is_empty()).then(|| t.partitions().len())
    })
    .await;
    assert_eq!(partitions, 2);
    // Every record written before the kill is still there.
    let kept: i64 = (0..2)
        .map(|p| consumer.fetch_watermarks("kept.topic", p, Duration::from_secs(10)).unwrap())
        .map(|(low, high)| high - low)
        .sum();
    assert_eq!(kept, 10);
}

#[tokio::test]
async fn a_mariadb_server_killed_with_sigkill_restarts_on_its_data_with_a_row_binlog() {
    use mmsync::testbed::mariadb::MariaDb;
    let mut db = MariaDb::start(7).await.expect("mariadb starts");
    let settings = db
        .sql("SELECT @@log_bin, @@binlog_format, @@binlog_row_image, @@binlog_row_metadata, @@server_id, @@gtid_domain_id")
        .await
        .unwrap();
    assert_eq!(settings.trim(), "1\tROW\tFULL\tFULL\t7\t7", "what a MariaDB master of mmsync needs");
    db.sql("CREATE DATABASE app; CREATE TABLE app.t (id int PRIMARY KEY, v text) ENGINE=InnoDB; INSERT INTO app.t VALUES (1, 'one')")
        .await
        .unwrap();
    db.kill().await;
    assert!(std::net::TcpStream::connect(("127.0.0.1", db.port())).is_err(), "the server is gone");
    db.restart().await.expect("mariadb restarts on its data");
    assert_eq!(db.sql("SELECT v FROM app.t WHERE id = 1").await.unwrap().trim(), "one", "crash recovery kept the row");
    let gtid = db.sql("SELECT @@gtid_binlog_pos").await.unwrap();
    assert!(gtid.trim().starts_with("7-7-"), "the insert is in the binlog under GTID domain 7: {gtid}");
}
