//! `mmsync init` and the source: every committed change becomes a Kafka record
//! with origin and version, nothing is lost, nothing loops.

use mmsync::testbed::{wait_for, BedKafka};

use crate::common::{metric_sum, mmsync, Synced, DEADLINE, KV};

const TYPES: &str = r#"
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE types (
    id int PRIMARY KEY,
    i2 smallint, i4 integer, i8 bigint, num numeric, num_s numeric(40, 15), r4 real, r8 double precision,
    t text, vc varchar(50), bin bytea, b boolean, d date, tm time, ts timestamp, tstz timestamptz,
    iv interval, u uuid, j json, jb jsonb, arr int[], tarr text[], m mood
);"#;

const TYPE_ROWS: &str = r#"
INSERT INTO types VALUES
 (1, -32768, 2147483647, -9223372036854775808, 123456789012345678901234567890.123456789012345,
  -98765432109876543210.123456789012345, 'NaN', 'Infinity', E'Ünïcödé 한국어 ✓ 𝄞 "q" \\ back\nline',
  'varchar', '\x00ff10', true, '2024-02-29', '23:59:59.999999', '2024-02-29 12:34:56.789012',
  '2024-02-29 12:34:56.789012+09', '-1 year 2 mons 3 days 04:05:06.789', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
  '{"b": 1,   "a": [1, 2]}', '{"b": 1, "a": [1, 2.50]}', '{1,NULL,3}', ARRAY['a b', 'c"d', NULL, ''], 'happy'),
 (2, 0, 0, 0, 'NaN', 0, '-Infinity', 1e-300, '', '', '\x', false, '0044-03-15 BC', '00:00', 'infinity',
  '-infinity', '0', '00000000-0000-0000-0000-000000000000', '[]', 'null', '{}', '{}', 'sad'),
 (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL);
-- Floats whose shortest exact text needs more digits than the type's default
-- output (6 and 15) gives: they round-trip only if every digit travels.
INSERT INTO types (id, r4, r8) VALUES (4, '1.0000001', '0.30000000000000004');
UPDATE types SET i4 = i4 - 1, r8 = 0.1 WHERE id = 1;
DELETE FROM types WHERE id = 2;
"#;

#[tokio::test]
async fn every_type_becomes_records_with_origin_and_version_and_round_trips() {
    let mut s = Synced::new(&["seoul", "busan"], BedKafka::Shared, TYPES, &["public.types"], "").await;
    let mut seoul = s.conn("seoul").await;
    sqlx::raw_sql(TYPE_ROWS).execute(&mut seoul).await.unwrap();
    s.start();

    // The records: 4 inserts, 1 update, 1 delete, in commit order per key.
    let mut records = s.records(&s.bed.topic("seoul", "public.types"), 6);
    records.sort_by_key(|r| (r.partition, r.offset));
    for r in &records {
        let v = &r.value;
        assert_eq!(r.headers["mmsync-origin"], "seoul", "{r:?}");
        assert_eq!(r.headers["mmsync-version"], v["version"].to_string(), "{r:?}");
        assert_eq!(v["origin"], "seoul");
        assert_eq!(v["source"]["master"], "seoul");
        assert_eq!((v["source"]["schema"].as_str(), v["source"]["table"].as_str()), (Some("public"), Some("types")));
        assert!(v["source"]["lsn"].as_str().unwrap().contains('/'), "{v}");
        assert!(
            v["source"]["txid"].as_u64().unwrap() > 0 && v["source"]["ts_ms"].as_i64().unwrap() > 1_700_000_000_000,
            "{v}"
        );
        assert!(v["after"].get("mmsync_origin").is_none(), "mmsync's columns travel as origin and version: {v}");
    }
    let ops = |key: &str| -> Vec<String> {
        records.iter().filter(|r| r.key == key).map(|r| r.value["op"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(ops(r#"{"id":"1"}"#), ["c", "u"]);
    assert_eq!(ops(r#"{"id":"2"}"#), ["c", "d"]);
    assert_eq!(ops(r#"{"id":"3"}"#), ["c"]);
    assert_eq!(ops(r#"{"id":"4"}"#), ["c"]);

    let insert1 = &records.iter().find(|r| r.key == r#"{"id":"1"}"# && r.value["op"] == "c").unwrap().value["after"];
    assert_eq!(insert1["num"], "123456789012345678901234567890.123456789012345");
    assert_eq!(insert1["num_s"], "-98765432109876543210.123456789012345");
    assert_eq!(insert1["i8"], "-9223372036854775808");
    assert_eq!((insert1["r4"].as_str(), insert1["r8"].as_str()), (Some("NaN"), Some("Infinity")));
    assert_eq!(insert1["t"], "Ünïcödé 한국어 ✓ 𝄞 \"q\" \\ back\nline");
    assert_eq!(insert1["bin"], "\\x00ff10");
    assert_eq!(insert1["tm"], "23:59:59.999999");
    assert_eq!(insert1["ts"], "2024-02-29 12:34:56.789012");
    assert_eq!(insert1["tstz"], "2024-02-29 03:34:56.789012+00");
    assert_eq!(insert1["j"], "{\"b\": 1,   \"a\": [1, 2]}");
    assert_eq!(insert1["tarr"], "{\"a b\",\"c\\\"d\",NULL,\"\"}");
    assert_eq!(insert1["m"], "happy");
    let update1 = records.iter().find(|r| r.value["op"] == "u").unwrap();
    assert_eq!(
        (update1.value["after"]["i4"].as_str(), update1.value["after"]["r8"].as_str()),
        (Some("2147483646"), Some("0.1"))
    );
    let insert1_version =
        records.iter().find(|r| r.key == r#"{"id":"1"}"# && r.value["op"] == "c").unwrap().value["version"].as_i64();
    assert!(update1.value["version"].as_i64() > insert1_version, "an update's version beats the one it replaced");
    let row3 = &records.iter().find(|r| r.key == r#"{"id":"3"}"#).unwrap().value["after"];
    assert!(row3.as_object().unwrap().iter().filter(|(k, _)| *k != "id").all(|(_, v)| v.is_null()), "{row3}");
    let row4 = &records.iter().find(|r| r.key == r#"{"id":"4"}"#).unwrap().value["after"];
    assert_eq!((row4["r4"].as_str(), row4["r8"].as_str()), (Some("1.0000001"), Some("0.30000000000000004")));
    let delete2 = records.iter().find(|r| r.value["op"] == "d").unwrap();
    assert_eq!(delete2.value["before"], serde_json::json!({"id": "2"}));
    assert!(delete2.value["after"].is_null());
    let tombstone: i64 = sqlx::query_scalar("SELECT version FROM mmsync.tombstones WHERE table_name = 'types'")
        .fetch_one(&mut seoul)
        .await
        .unwrap();
    assert_eq!(delete2.value["version"].as_i64(), Some(tombstone));

    // And every value arrives on busan exactly: compare each row's text form.
    s.converged("types").await;
    let exact = "SELECT whole_row::text FROM types whole_row ORDER BY id";
    let here: Vec<String> = sqlx::query_scalar(exact).fetch_all(&mut seoul).await.unwrap();
    let there: Vec<String> = sqlx::query_scalar(exact).fetch_all(&mut s.conn("busan").await).await.unwrap();
    assert_eq!(here, there);
    assert_eq!(here.len(), 3);
    s.stop().await;
}

/// Large values of several types, stored out of line and uncompressed, so
/// an update that leaves them alone reaches pgoutput as "unchanged".
const DOCS: &str = "
CREATE TABLE docs (id int PRIMARY KEY, title text, body text, tags text[], data jsonb, raw bytea, pad char(3000));
ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL, ALTER COLUMN tags SET STORAGE EXTERNAL,
    ALTER COLUMN data SET STORAGE EXTERNAL, ALTER COLUMN raw SET STORAGE EXTERNAL, ALTER COLUMN pad SET STORAGE EXTERNAL;
";
const BIG: &str = "(SELECT string_agg(md5(i::text), '') FROM generate_series(1, 10000) i)";
const LARGE: &[&str] = &["body", "tags", "data", "raw", "pad"];

fn big_row(id: i32) -> String {
    format!(
        "INSERT INTO docs VALUES ({id}, 'draft', {BIG},
            (SELECT array_agg(md5(i::text) || ' \"q\"') FROM generate_series(1, 300) i),
            (SELECT jsonb_object_agg(md5(i::text), i * 1.50) FROM generate_series(1, 300) i),
            (SELECT string_agg(md5(i::text), '')::bytea FROM generate_series(1, 200) i),
            'padded')"
    )
}

#[tokio::test]
async fn an_update_that_leaves_toasted_values_alone_reaches_kafka_with_them_as_pgoutput_writes_them() {
    let mut s = Synced::new(&["seoul", "busan"], BedKafka::Shared, DOCS, &["public.docs"], "").await;
    s.start();
    let mut seoul = s.conn("seoul").await;
    sqlx::raw_sql(&big_row(1)).execute(&mut seoul).await.unwrap();
    s.converged("docs").await;
    // Key 1: the update arrives after the insert was applied. Key 2: insert and
    // update in one transaction, likely in one sink batch.
    sqlx::raw_sql(&format!(
        "UPDATE docs SET title = 'final' WHERE id = 1;
         BEGIN; {}; COMMIT;
         UPDATE docs SET title = 'final' WHERE id = 2;",
        big_row(2)
    ))
    .execute(&mut seoul)
    .await
    .unwrap();
    let records = s.records(&s.bed.topic("seoul", "public.docs"), 4);
    let inserts: Vec<_> = records.iter().filter(|r| r.value["op"] == "c").collect();
    let updates: Vec<_> = records.iter().filter(|r| r.value["op"] == "u").collect();
    assert_eq!((inserts.len(), updates.len()), (2, 2));
    for (i, u) in inserts.iter().zip(&updates) {
        // Read back from the table, in the text pgoutput gives the insert
        // (a cast to text would trim char(n), say).
        assert!(u.value.get("unchanged").is_none(), "{:?}", u.value);
        for column in LARGE {
            assert_eq!(u.value["after"][column], i.value["after"][column], "{column}");
        }
        assert_eq!(u.value["after"]["title"], "final");
    }
    assert_eq!(s.metric("mmsync_unchanged_values_read_total", &[("kind", "found")]).await, 2.0);
    s.converged("docs").await;
    let check = "SELECT id, title, md5(body), length(body), md5(tags::text), md5(data::text), md5(raw), length(pad) FROM docs ORDER BY id";
    type Checked = (i32, String, String, i32, String, String, String, i32);
    let here: Vec<Checked> = sqlx::query_as(check).fetch_all(&mut seoul).await.unwrap();
    let there: Vec<Checked> = sqlx::query_as(check).fetch_all(&mut s.conn("busan").await).await.unwrap();
    assert_eq!(here, there);
    assert!(here.iter().all(|r| r.1 == "final" && r.3 == 320_000), "{here:?}");
    s.stop().await;
}

/// A table whose `body` (50,000 bytes pglz cannot shrink below TOAST's
/// threshold) is stored out of line.
const BLOBS: &str = "CREATE TABLE blobs (id int PRIMARY KEY, note text NOT NULL, body text NOT NULL)";

/// Waits until busan holds seoul's rows of `blobs` (bodies by their md5);
/// returns them.
async fn blobs_on_busan_as_on_seoul(s: &Synced) -> Vec<(i32, String, String, i32)> {
    let check = "SELECT id, note, md5(body), length(body) FROM blobs ORDER BY id";
    let here: Vec<(i32, String, String, i32)> =
        sqlx::query_as(check).fetch_all(&mut s.conn("seoul").await).await.unwrap();
    wait_for("busan to hold seoul's rows whole", DEADLINE, || async {
        let there: Vec<(i32, String, String, i32)> =
            sqlx::query_as(check).fetch_all(&mut s.conn("busan").await).await.ok()?;
        (there == here).then_some(())
    })
    .await;
    here
}

#[tokio::test]
async fn a_source_sends_large_values_in_rounds_within_its_byte_bound_read_back_values_included() {
    let mut s =
        Synced::new(&["seoul", "busan"], BedKafka::Shared, BLOBS, &["public.blobs"], "capture_max_bytes = 262144\n")
            .await;
    s.start();
    let mut seoul = s.conn("seoul").await;
    // 40 rows of 50 KB in one transaction, then one transaction that updates
    // `note` alone: its WAL leaves every body out, and the source reads all
    // 2 MB of them back.
    sqlx::raw_sql(
        "INSERT INTO blobs SELECT i, 'first', left((SELECT string_agg(md5(i::text || ':' || g::text), '')
                                                   FROM generate_series(1, 1563) g), 50000)
         FROM generate_series(1, 40) i",
    )
    .execute(&mut seoul)
    .await
    .unwrap();
    sqlx::raw_sql("UPDATE blobs SET note = 'second'").execute(&mut seoul).await.unwrap();
    s.wait_metric("mmsync_unchanged_values_read_total", &[("kind", "found")], 40.0).await;
    let here = blobs_on_busan_as_on_seoul(&s).await;
    assert!(here.iter().all(|r| r.1 == "second" && r.3 == 50_000), "{here:?}");

    // 4 MB went out in rounds of at most 256 KiB.
    let metrics = s.metrics().await;
    let seoul_label = [("master", "seoul")];
    let rounds = metric_sum(&metrics, "mmsync_source_round_bytes_count", &seoul_label);
    let bytes = metric_sum(&metrics, "mmsync_source_round_bytes_sum", &seoul_label);
    let within = metric_sum(&metrics, "mmsync_source_round_bytes_bucket", &[("master", "seoul"), ("le", "262144")]);
    assert!(bytes > 4_000_000.0, "{bytes} bytes in {rounds} rounds\n{metrics}");
    assert_eq!(within, rounds, "every round within capture_max_bytes\n{metrics}");
    s.stop().await;

    // Updated again while mmsync is stopped, then half of the rows deleted:
    // the source finds those rows gone when it reads back, and the other
    // half's values still arrive whole, within the bound.
    sqlx::raw_sql("UPDATE blobs SET note = 'third'; DELETE FROM blobs WHERE id <= 20")
        .execute(&mut seoul)
        .await
        .unwrap();
    s.start();
    assert_eq!(blobs_on_busan_as_on_seoul(&s).await.len(), 20);
    // As records: the updates of rows still there carry their whole body,
    // the others say their row is gone.
    let records = s.records(&s.bed.topic("seoul", "public.blobs"), 140);
    let third: Vec<_> = records.iter().filter(|r| r.value["after"]["note"] == "third").collect();
    assert_eq!(third.len(), 40);
    for r in third {
        let id: i32 = r.value["after"]["id"].as_str().unwrap().parse().unwrap();
        let body = r.value["after"]["body"].as_str().map_or(0, str::len);
        let superseded = r.value["superseded"] == true;
        assert_eq!((body, superseded), if id <= 20 { (0, true) } else { (50_000, false) }, "row {id}");
    }
    let metrics = s.metrics().await;
    let read =
        |kind| metric_sum(&metrics, "mmsync_unchanged_values_read_total", &[("master", "seoul"), ("kind", kind)]);
    assert_eq!((read("gone"), read("found")), (20.0, 20.0), "{metrics}");
    let rounds = metric_sum(&metrics, "mmsync_source_round_bytes_count", &seoul_label);
    let within = metric_sum(&metrics, "mmsync_source_round_bytes_bucket", &[("master", "seoul"), ("le", "262144")]);
    assert_eq!(within, rounds, "every round within capture_max_bytes\n{metrics}");
    s.stop().await;
}

const USERS: &str = "CREATE TABLE users (id bigserial PRIMARY KEY, name text NOT NULL)";

#[tokio::test]
async fn a_crash_between_produce_and_slot_advance_loses_nothing() {
    let mut s = Synced::new(&["seoul", "busan"], BedKafka::Shared, USERS, &["public.users"], "").await;
    let mut seoul = s.conn("seoul").await;
    let slot = "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'mmsync_seoul'";
    let before: String = sqlx::query_scalar(slot).fetch_one(&mut seoul).await.unwrap();
    sqlx::raw_sql("INSERT INTO users (name) SELECT 'u' || i FROM generate_series(1, 500) i")
        .execute(&mut seoul)
        .await
        .unwrap();

    // mmsync produces the round, Kafka acknowledges it, and mmsync dies before
    // moving the slot.
    s.start_with_env(&[("MMSYNC_FAILPOINTS", mmsync::failpoint::CRASH_AFTER_PRODUCE)]);
    let (status, log) = s.exited().await;
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9), "{log}");
    assert!(log.contains("failpoint crash-after-produce: killing mmsync"), "{log}");
    let after: String = sqlx::query_scalar(slot).fetch_one(&mut seoul).await.unwrap();
    assert_eq!(after, before, "the slot moved although mmsync died before advancing it");
    let topic = s.bed.topic("seoul", "public.users");
    let before_crash = end_offsets(&s, &topic);
    assert!((1..=500).contains(&before_crash), "{before_crash} records acknowledged before the crash");

    // On restart the transaction is read from the slot again and produced
    // again whole: the records acknowledged before the crash are on the topic
    // twice (duplicates, which the sinks' last-writer-wins absorbs), the rest
    // once, none missing.
    s.start();
    let rows = s.converged("users").await;
    assert_eq!(rows.len(), 500);
    s.wait_metric("mmsync_changes_captured_total", &[("master", "seoul"), ("table", "public.users")], 500.0).await;
    let records = s.records(&topic, before_crash as usize + 500);
    let mut per_key: std::collections::BTreeMap<&str, usize> = Default::default();
    for r in &records {
        *per_key.entry(r.key.as_str()).or_default() += 1;
    }
    assert_eq!(per_key.len(), 500, "distinct keys on {topic}");
    let twice = per_key.values().filter(|n| **n == 2).count() as i64;
    assert_eq!(twice, before_crash, "keys produced both before and after the crash: {per_key:?}");
    assert_eq!(end_offsets(&s, &topic), before_crash + 500);
    s.stop().await;
}

/// Records on a topic: the sum of its partitions' end offsets.
fn end_offsets(s: &Synced, topic: &str) -> i64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", s.bed.broker.address()).create().unwrap();
    let partitions = mmsync::kafka::partitions(&consumer, topic).unwrap().unwrap();
    (0..partitions).map(|p| consumer.fetch_watermarks(topic, p, std::time::Duration::from_secs(10)).unwrap().1).sum()
}

#[tokio::test]
async fn init_twice_changes_nothing_and_adds_only_a_new_table() {
    let s = Synced::new(
        &["seoul", "busan"],
        BedKafka::Shared,
        "CREATE TABLE users (id bigserial PRIMARY KEY, name text); CREATE TABLE extra (id uuid PRIMARY KEY, v text)",
        &["public.users"],
        "",
    )
    .await;
    let (code, out) = mmsync(&s.topology, &["init"]).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.trim(), "init: everything was already in place");

    let with_extra = s.bed.write_topology(&["public.users", "public.extra"], "");
    let (code, out) = mmsync(&with_extra, &["init"]).await;
    assert_eq!(code, 0, "{out}");
    for m in ["seoul", "busan"] {
        assert!(
            out.contains(&format!("master \"{m}\": added columns mmsync_origin, mmsync_version to public.extra")),
            "{out}"
        );
        assert!(out.contains(&format!("master \"{m}\": installed triggers on public.extra")), "{out}");
        assert!(out.contains(&format!("master \"{m}\": publication mmsync now includes public.extra")), "{out}");
        assert!(out.contains(&format!("kafka: created topic {}", s.bed.topic(m, "public.extra"))), "{out}");
    }
    assert!(!out.contains("public.users"), "init touched the table it had already set up:\n{out}");
    let (code, out) = mmsync(&with_extra, &["init"]).await;
    assert_eq!((code, out.trim()), (0, "init: everything was already in place"));
}

#[tokio::test]
async fn sequences_of_two_masters_never_collide() {
    let mut s = Synced::new(&["seoul", "busan"], BedKafka::Shared, USERS, &["public.users"], "").await;
    s.start();
    let insert = "INSERT INTO users (name) SELECT 'u' || i FROM generate_series(1, 10000) i";
    let (mut seoul, mut busan) = (s.conn("seoul").await, s.conn("busan").await);
    let (a, b) = tokio::join!(sqlx::raw_sql(insert).execute(&mut seoul), sqlx::raw_sql(insert).execute(&mut busan));
    a.unwrap();
    b.unwrap();
    let rows = s.converged("users").await;
    assert_eq!(rows.len(), 20_000);
    let parity: Vec<(String, i64, i64)> =
        sqlx::query_as("SELECT mmsync_origin::text, min(id % 2), max(id % 2) FROM users GROUP BY 1 ORDER BY 1")
            .fetch_all(&mut seoul)
            .await
            .unwrap();
    assert_eq!(parity, [("busan".to_string(), 0, 0), ("seoul".to_string(), 1, 1)]);
    s.stop().await;
}

#[tokio::test]
async fn a_delete_reaches_the_other_master_whatever_the_writers_session_settings() {
    let schema = "CREATE TABLE events (at timestamptz PRIMARY KEY, v text)";
    let mut s = Synced::new(&["seoul", "busan"], BedKafka::Shared, schema, &["public.events"], "").await;
    s.start();
    let mut seoul = s.conn("seoul").await;
    sqlx::raw_sql(
        "SET TimeZone = 'Asia/Seoul'; SET DateStyle = 'SQL, DMY';
         INSERT INTO events VALUES ('2024-02-29 12:34:56.789012+00', 'a'), ('2024-03-01 00:00:00+00', 'b')",
    )
    .execute(&mut seoul)
    .await
    .unwrap();
    assert_eq!(s.converged("events").await.len(), 2);
    // The tombstone's key is built from the timestamp's text: it must match the
    // key the other master knows, although this session prints dates otherwise.
    sqlx::raw_sql("DELETE FROM events WHERE v = 'a'").execute(&mut seoul).await.unwrap();
    let rows = s.converged("events").await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(rows[0].contains("\"v\": \"b\""), "{rows:?}");
    s.stop().await;
}

/// Causality beats clocks for deletes too. A tombstone can be ahead of this
/// master's clock: it came from a master whose clock runs fast, or it replaced
/// a row that did. A later insert of its key here must still get a newer
/// version, however the tombstone got here: written by a local delete,
/// applied as the sink applies tombstones, or raised by a newer one.
#[tokio::test]
async fn an_insert_beats_a_tombstone_from_a_clock_that_runs_ahead() {
    let s = Synced::new(&["seoul", "busan"], BedKafka::Shared, KV, &["public.kv"], "").await;
    let mut seoul = s.conn("seoul").await;
    let ahead: i64 = sqlx::query_scalar("SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::int8 + 3600000000")
        .fetch_one(&mut seoul)
        .await
        .unwrap();
    let tombstone = |id: i32, version: i64| {
        format!(
            "INSERT INTO mmsync.tombstones AS tb (schema_name, table_name, key, version, origin)
             VALUES ('public', 'kv', jsonb_build_object('id', '{id}'), {version}, 'busan')
             ON CONFLICT (schema_name, table_name, key) DO UPDATE SET version = EXCLUDED.version
             WHERE tb.version < EXCLUDED.version;"
        )
    };
    // As the sink writes: ordinary triggers do not fire.
    let replica = |sql: String| format!("BEGIN; SET LOCAL session_replication_role = replica; {sql} COMMIT;");
    let ways = [
        // key 1: a row replicated from busan, an hour ahead, then deleted here
        replica(format!(
            "INSERT INTO kv (id, val, n, mmsync_origin, mmsync_version) VALUES (1, 'fast', 1, 'busan', {ahead});"
        )) + "DELETE FROM kv WHERE id = 1;",
        // key 2: busan's delete, an hour ahead, applied here
        replica(tombstone(2, ahead)),
        // key 3: an old tombstone, then a newer one an hour ahead raises it
        replica(tombstone(3, 1) + &tombstone(3, ahead + 5)),
    ];
    // Each way is checked on its own: the bound on tombstone versions that
    // the trigger consults (mmsync.tombstone_high) is reset before each, so
    // what one way raised cannot cover for another that failed to.
    for (id, way) in (1..).zip(ways) {
        sqlx::raw_sql(&format!("SELECT setval('mmsync.tombstone_high', 0); {way}")).execute(&mut seoul).await.unwrap();
        sqlx::raw_sql(&format!("INSERT INTO kv VALUES ({id}, 'x', {id})")).execute(&mut seoul).await.unwrap();
    }
    let rows: Vec<(i32, i64, i64)> = sqlx::query_as(
        "SELECT kv.id, kv.mmsync_version, t.version FROM kv JOIN mmsync.tombstones t
         ON t.table_name = 'kv' AND t.key = jsonb_build_object('id', kv.id::text) ORDER BY kv.id",
    )
    .fetch_all(&mut seoul)
    .await
    .unwrap();
    assert_eq!(rows.len(), 3, "{rows:?}");
    for (id, version, tombstone) in rows {
        assert!(tombstone >= ahead, "key {id}: the tombstone is not ahead of the clock ({tombstone})");
        assert!(version > tombstone, "key {id}: the insert got {version}, older than its tombstone {tombstone}");
    }
}
