//! Bad input: records that are not mmsync's, schema drift, a check
//! constraint stricter on one master, oversized rows and awkward
//! identifiers. Each is dead-lettered or refused with its reason while good
//! changes keep flowing; a unique value two masters took is settled instead.

use std::time::Duration;

use mmsync::testbed::{wait_for, BedKafka};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

use crate::common::{mmsync, Synced, DEADLINE};

const SCHEMA: &str = r#"
CREATE TABLE "Order Items" (id int PRIMARY KEY, "select" text, "Qty" int CHECK ("Qty" >= 0), email text UNIQUE);
CREATE TABLE plain (id int PRIMARY KEY, v text);
"#;

/// Dead letters of a master not yet re-applied: (topic, partition, reason).
async fn dead_letters(s: &Synced, master: &str) -> Vec<(String, i32, String)> {
    let mut conn = s.conn(master).await;
    sqlx::query_as("SELECT topic, partition, reason FROM mmsync.dead_letters WHERE retried_at IS NULL ORDER BY id")
        .fetch_all(&mut conn)
        .await
        .unwrap()
}

async fn count(s: &Synced, master: &str, sql: &str) -> i64 {
    let mut conn = s.conn(master).await;
    sqlx::query_scalar(sql).fetch_one(&mut conn).await.unwrap()
}

/// A record of seoul's `plain` topic as mmsync writes it, with `fields`
/// (`"format":2,` say) before the usual ones.
fn plain_record(fields: &str, op: &str, id: &str, v: &str, version: i64) -> String {
    format!(
        r#"{{{fields}"op":"{op}","before":null,"after":{{"id":"{id}","v":"{v}"}},"source":{{"master":"seoul","schema":"public","table":"plain","lsn":"0/1","txid":1,"ts_ms":1}},"origin":"seoul","version":{version}}}"#
    )
}

/// Sends (key, value) records to seoul's `plain` topic, in order, all to
/// `partition` if given (by key otherwise); returns their offsets.
async fn send_plain(s: &Synced, partition: Option<i32>, records: &[(String, String)]) -> Vec<i64> {
    let producer: FutureProducer =
        ClientConfig::new().set("bootstrap.servers", s.bed.broker.address()).create().unwrap();
    let topic = s.bed.topic("seoul", "public.plain");
    let mut offsets = Vec::new();
    for (key, value) in records {
        let mut record = FutureRecord::to(&topic).key(key).payload(value);
        if let Some(p) = partition {
            record = record.partition(p);
        }
        offsets.push(producer.send(record, Duration::from_secs(10)).await.unwrap().offset);
    }
    offsets
}

fn key(id: &str) -> String {
    format!("{{\"id\":\"{id}\"}}")
}

#[tokio::test]
async fn bad_records_and_drift_become_dead_letters_while_good_changes_flow() {
    let tables = [r#"public."Order Items""#, "public.plain"];
    let mut s = Synced::new(&["seoul", "busan"], BedKafka::Shared, SCHEMA, &tables, "").await;
    let mut seoul = s.conn("seoul").await;
    let mut busan = s.conn("busan").await;
    // Before the masters see each other, each takes the same email under
    // another key: not a dead letter, a conflict settled alike on both (the
    // newer write, seoul's key 8, keeps the address; busan's key 3 goes).
    sqlx::raw_sql(r#"INSERT INTO "Order Items" VALUES (3, 'busan', 10, 'z@x')"#).execute(&mut busan).await.unwrap();
    sqlx::raw_sql(r#"INSERT INTO "Order Items" VALUES (8, 'seoul', 10, 'z@x')"#).execute(&mut seoul).await.unwrap();
    s.start();

    // Identifiers with capitals, spaces, quotes and reserved words.
    sqlx::raw_sql(
        r#"INSERT INTO "Order Items" VALUES (1, 'it''s "quoted"', 3, 'a@x'), (2, 'select * from', 4, 'b@x')"#,
    )
    .execute(&mut seoul)
    .await
    .unwrap();
    wait_for("the quoted rows on busan", DEADLINE, || async {
        let n = count(
            &s,
            "busan",
            r#"SELECT count(*) FROM "Order Items" WHERE "select" IN ('it''s "quoted"', 'select * from')"#,
        )
        .await;
        (n == 2).then_some(())
    })
    .await;

    // Records that are not mmsync's, on a topic busan applies.
    let good = plain_record("", "c", "9", "x", 1);
    // A well-formed change that claims another master wrote it.
    let forged = plain_record("", "c", "10", "x", 1).replace("\"origin\":\"seoul\"", "\"origin\":\"mallory\"");
    send_plain(
        &s,
        None,
        &[
            (key("7"), "not json at all".into()),
            (key("7"), r#"{"hello":"world"}"#.into()),
            (key("8"), good),
            (key("10"), forged),
        ],
    )
    .await;

    // A unique index, and a check that is stricter on busan only.
    sqlx::raw_sql(
        r#"ALTER TABLE "Order Items" DROP CONSTRAINT "Order Items_Qty_check", ADD CHECK ("Qty" >= 10) NOT VALID"#,
    )
    .execute(&mut busan)
    .await
    .unwrap();
    sqlx::raw_sql(r#"INSERT INTO "Order Items" VALUES (4, 'small', 5, 'c@x'), (5, 'fine', 50, 'd@x')"#)
        .execute(&mut seoul)
        .await
        .unwrap();

    // Drift: a column that only seoul has.
    sqlx::raw_sql("ALTER TABLE plain ADD COLUMN extra text; INSERT INTO plain (id, v, extra) VALUES (1, 'drift', 'only on seoul')")
        .execute(&mut seoul)
        .await
        .unwrap();

    // A row larger than mmsync will send (16 MiB), then a normal one.
    sqlx::raw_sql(
        r#"INSERT INTO "Order Items" VALUES (6, repeat('x', 20 * 1024 * 1024), 10, 'e@x');
           INSERT INTO "Order Items" VALUES (7, 'after the big one', 10, 'f@x')"#,
    )
    .execute(&mut seoul)
    .await
    .unwrap();

    // Good changes keep flowing past all of it.
    wait_for("row 7 on busan", DEADLINE, || async {
        (count(&s, "busan", r#"SELECT count(*) FROM "Order Items" WHERE id IN (5, 7)"#).await == 2).then_some(())
    })
    .await;
    let busan_dead = wait_for("busan's dead letters", DEADLINE, || async {
        let d = dead_letters(&s, "busan").await;
        (d.len() >= 6).then_some(d)
    })
    .await;
    let reasons: Vec<&str> = busan_dead.iter().map(|(_, _, r)| r.as_str()).collect();
    let has = |needle: &str| reasons.iter().any(|r| r.contains(needle));
    assert!(has("not mmsync's JSON envelope"), "{reasons:#?}");
    assert!(has("key column \"id\" differs from \"after\""), "{reasons:#?}");
    assert!(has("check constraint"), "{reasons:#?}");
    assert!(has("the record says origin \"mallory\""), "{reasons:#?}");
    assert!(!has("duplicate key value violates unique constraint"), "{reasons:#?}");
    assert!(has("the columns of public.plain differ between masters"), "{reasons:#?}");
    let seoul_dead = wait_for("seoul's dead letters", DEADLINE, || async {
        let d = dead_letters(&s, "seoul").await;
        (!d.is_empty()).then_some(d)
    })
    .await;
    assert!(seoul_dead.iter().any(|(_, p, r)| *p == -1 && r.contains("more than Kafka accepts")), "{seoul_dead:#?}");
    assert!(!seoul_dead.iter().any(|(_, _, r)| r.contains("duplicate key")), "{seoul_dead:#?}");
    s.wait_metric("mmsync_dead_letters_total", &[], 7.0).await;
    assert_eq!(count(&s, "busan", "SELECT count(*) FROM plain WHERE id = 10").await, 0, "a forged change was applied");
    // The shared address: seoul's newer row keeps it on both; busan's is
    // gone from both and logged with its whole row.
    for m in ["seoul", "busan"] {
        assert_eq!(
            count(&s, m, r#"SELECT count(*) FROM "Order Items" WHERE email = 'z@x' AND id = 8"#).await,
            1,
            "{m}"
        );
        assert_eq!(count(&s, m, r#"SELECT count(*) FROM "Order Items" WHERE id = 3"#).await, 0, "{m}");
    }
    // Logged where the clash was seen, which depends on arrival order: on
    // one master or both, never on neither.
    let lost = "SELECT count(*) FROM mmsync.conflicts WHERE kind = 'unique_value_lost' AND loser_row->>'id' = '3'";
    let logged = count(&s, "seoul", lost).await + count(&s, "busan", lost).await;
    assert!(logged >= 1, "busan's row 3 was not logged as the loser on either master");

    // Fix the drift, re-apply: the drifted row arrives; records that are not
    // mmsync's still cannot, and say so.
    sqlx::raw_sql("ALTER TABLE plain ADD COLUMN extra text").execute(&mut busan).await.unwrap();
    let (code, out) = mmsync(&s.topology, &["dead-letters", "--master", "busan", "retry"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("dead letter(s) applied"), "{out}");
    assert!(out.contains("not mmsync's record, so it cannot be applied"), "{out}");
    let plain = s.rows("busan", "plain").await;
    let seoul_plain = s.rows("seoul", "plain").await;
    assert_eq!(
        count(&s, "busan", "SELECT count(*) FROM plain WHERE extra = 'only on seoul'").await,
        1,
        "{out}\n{plain:?}\n{seoul_plain:?}\n{:?}",
        dead_letters(&s, "busan").await
    );
    let (code, out) = mmsync(&s.topology, &["dead-letters", "list"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("master \"seoul\": #") && out.contains("[-1]@-1: not produced"), "{out}");

    // And mmsync never stopped: it exits cleanly.
    s.stop().await;
}

#[tokio::test]
async fn check_and_init_refuse_tables_they_cannot_sync() {
    let s =
        Synced::new(&["seoul", "busan"], BedKafka::Shared, "CREATE TABLE ok (id int PRIMARY KEY)", &["public.ok"], "")
            .await;
    s.bed
        .sql_everywhere("CREATE TABLE odd (id int PRIMARY KEY, r regclass); CREATE TABLE nokey (v text)")
        .await
        .unwrap();
    let topology = s.bed.write_topology(&["public.ok", "public.odd", "public.nokey"], "");
    let (code, out) = mmsync(&topology, &["check"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("column \"r\" of table public.odd has type regclass, which mmsync cannot carry"), "{out}");
    assert!(out.contains("table public.nokey has no primary key; add one"), "{out}");
    let (code, out) = mmsync(&topology, &["init"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("init failed: master \"seoul\": column \"r\" of table public.odd has type regclass"), "{out}");
}

/// A key column whose name holds the trigger function's quote tag used to end
/// the function's dollar quoting (and with check_function_bodies off, what
/// followed ran as SQL): init and sync must treat it as a name like any other.
#[tokio::test]
async fn a_key_named_with_the_trigger_quote_tag_syncs_like_any_other() {
    let schema = r#"CREATE TABLE "odd$mmsync$" ("k$mmsync$; SELECT 1; --" int PRIMARY KEY, v text)"#;
    let mut s = Synced::new(&["seoul", "busan"], BedKafka::Shared, schema, &[r#"public."odd$mmsync$""#], "").await;
    s.start();
    let mut seoul = s.conn("seoul").await;
    sqlx::raw_sql(r#"INSERT INTO "odd$mmsync$" VALUES (1, 'x')"#).execute(&mut seoul).await.unwrap();
    let rows = s.converged(r#""odd$mmsync$""#).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    s.stop().await;
}

#[tokio::test]
async fn a_record_of_a_newer_format_waits_in_kafka_while_its_link_says_to_upgrade() {
    let tables = [r#"public."Order Items""#, "public.plain"];
    let mut s = Synced::new(&["seoul", "busan"], BedKafka::Shared, SCHEMA, &tables, "").await;
    s.start();
    // One partition, in this order: a record of our format with a field
    // added later (read), one of the next format (waits), one behind it.
    let topic = s.bed.topic("seoul", "public.plain");
    let offsets = send_plain(
        &s,
        Some(0),
        &[
            (key("1"), plain_record(r#""format":1,"added_later":{"x":[1]},"#, "c", "1", "x", 1)),
            (key("2"), plain_record(r#""format":2,"#, "c", "2", "x", 1)),
            (key("3"), plain_record(r#""format":1,"#, "c", "3", "x", 1)),
        ],
    )
    .await;
    wait_for("row 1 on busan", DEADLINE, || async {
        (count(&s, "busan", "SELECT count(*) FROM plain WHERE id = 1").await == 1).then_some(())
    })
    .await;
    // The link retries with a growing backoff (a link that connects and
    // fails at once does not reset it), and says why.
    s.wait_metric("mmsync_errors_total", &[("stage", "apply"), ("kind", "retry")], 3.0).await;
    s.wait_metric("mmsync_retry_delay_seconds", &[("stage", "apply"), ("master", "busan")], 0.8).await;
    let log = s.log();
    assert!(
        log.contains(&format!("record {topic}[0]@{} has envelope format 2, newer than this mmsync reads", offsets[1]))
            && log.contains("upgrade mmsync"),
        "{log}"
    );
    // The rest keeps syncing.
    let mut seoul = s.conn("seoul").await;
    sqlx::raw_sql(r#"INSERT INTO "Order Items" VALUES (1, 'still flowing', 10, 'a@x')"#)
        .execute(&mut seoul)
        .await
        .unwrap();
    wait_for("another table's row on busan", DEADLINE, || async {
        (count(&s, "busan", r#"SELECT count(*) FROM "Order Items""#).await == 1).then_some(())
    })
    .await;
    // Nothing of it was applied, dead-lettered or skipped: busan resumes at it.
    assert_eq!(count(&s, "busan", "SELECT count(*) FROM plain WHERE id IN (2, 3)").await, 0);
    assert_eq!(dead_letters(&s, "busan").await, vec![]);
    let next: i64 = {
        let mut busan = s.conn("busan").await;
        sqlx::query_scalar("SELECT next_offset FROM mmsync.applied_offsets WHERE topic = $1 AND partition = 0")
            .bind(&topic)
            .fetch_one(&mut busan)
            .await
            .unwrap()
    };
    assert_eq!(next, offsets[1]);
    s.stop().await;
}

#[tokio::test]
async fn a_version_near_the_top_of_bigint_neither_wins_nor_freezes_the_row() {
    let tables = [r#"public."Order Items""#, "public.plain"];
    let mut s = Synced::new(&["seoul", "busan"], BedKafka::Shared, SCHEMA, &tables, "").await;
    s.start();
    let mut seoul = s.conn("seoul").await;
    let value = |master: &'static str| {
        let s = &s;
        async move {
            let mut conn = s.conn(master).await;
            sqlx::query_scalar::<_, String>("SELECT v FROM plain WHERE id = 1").fetch_optional(&mut conn).await.unwrap()
        }
    };
    sqlx::raw_sql("INSERT INTO plain VALUES (1, 'first')").execute(&mut seoul).await.unwrap();
    wait_for("row 1 on busan", DEADLINE, || async { (value("busan").await.as_deref() == Some("first")).then_some(()) })
        .await;

    // A forged record with the largest version: a dead letter on busan.
    send_plain(&s, None, &[(key("1"), plain_record("", "u", "1", "forged", i64::MAX))]).await;
    let dead = wait_for("the forged record dead-lettered on busan", DEADLINE, || async {
        let d = dead_letters(&s, "busan").await;
        (!d.is_empty()).then_some(d)
    })
    .await;
    assert!(dead[0].2.contains("ahead of this host's clock, beyond [sync] max_clock_skew_ms = 3600000"), "{dead:?}");

    // The same version written on seoul by a session that skips the triggers:
    // seoul's source keeps it to itself.
    sqlx::raw_sql(&format!(
        "BEGIN; SET LOCAL session_replication_role = replica;
         UPDATE plain SET v = 'by hand', mmsync_version = {} WHERE id = 1; COMMIT;",
        i64::MAX
    ))
    .execute(&mut seoul)
    .await
    .unwrap();
    let kept = wait_for("seoul's source refusing it", DEADLINE, || async {
        let d = dead_letters(&s, "seoul").await;
        (!d.is_empty()).then_some(d)
    })
    .await;
    assert_eq!(kept[0].1, -1, "{kept:?}");
    assert!(kept[0].2.contains("not sent to the other masters"), "{kept:?}");

    // The application can still write the row: its next version is bounded,
    // reaches busan, and wins there over the first one.
    sqlx::raw_sql("UPDATE plain SET v = 'after' WHERE id = 1").execute(&mut seoul).await.unwrap();
    wait_for("the update on busan", DEADLINE, || async {
        (value("busan").await.as_deref() == Some("after")).then_some(())
    })
    .await;
    let bounded: bool = sqlx::query_scalar(
        "SELECT mmsync_version <= mmsync.now_us() + mmsync.max_clock_skew_us()
            AND mmsync.next_version(9223372036854775807) <= mmsync.now_us() + mmsync.max_clock_skew_us()
         FROM plain WHERE id = 1",
    )
    .fetch_one(&mut seoul)
    .await
    .unwrap();
    assert!(bounded);
    sqlx::raw_sql("DELETE FROM plain WHERE id = 1").execute(&mut seoul).await.unwrap();
    wait_for("the delete on busan", DEADLINE, || async { value("busan").await.is_none().then_some(()) }).await;
    assert_eq!(value("busan").await, None);
    assert_eq!(dead_letters(&s, "busan").await.len(), 1);
    s.stop().await;
}

#[tokio::test]
async fn two_keys_that_differ_as_text_but_not_to_the_target_do_not_block_their_partition() {
    let tables = [r#"public."Order Items""#, "public.plain"];
    let mut s = Synced::new(&["seoul", "busan"], BedKafka::Shared, SCHEMA, &tables, "").await;
    s.start();
    // Back to back on one partition, so one batch holds both twins; then a
    // good record behind them.
    let records: Vec<(String, String)> = [("1", "older", 10), ("01", "newer", 20), ("5", "behind", 10)]
        .into_iter()
        .map(|(id, v, version)| (key(id), plain_record("", "c", id, v, version)))
        .collect();
    send_plain(&s, Some(0), &records).await;
    wait_for("the record behind the twins on busan", DEADLINE, || async {
        (count(&s, "busan", "SELECT count(*) FROM plain WHERE id = 5").await == 1).then_some(())
    })
    .await;
    let mut busan = s.conn("busan").await;
    let row: (String, i64) =
        sqlx::query_as("SELECT v, mmsync_version FROM plain WHERE id = 1").fetch_one(&mut busan).await.unwrap();
    assert_eq!(row, ("newer".to_string(), 20));
    assert_eq!(dead_letters(&s, "busan").await, vec![]);
    s.stop().await;
}

#[tokio::test]
async fn tables_with_replica_identity_full_or_using_index_are_keyed_by_their_primary_key() {
    let schema = "
        CREATE TABLE full_ri (id int PRIMARY KEY, note text);
        ALTER TABLE full_ri REPLICA IDENTITY FULL;
        CREATE TABLE index_ri (id int PRIMARY KEY, code text NOT NULL, v text);
        CREATE UNIQUE INDEX index_ri_code ON index_ri (code);
        ALTER TABLE index_ri REPLICA IDENTITY USING INDEX index_ri_code;";
    let mut s =
        Synced::new(&["seoul", "busan"], BedKafka::Shared, schema, &["public.full_ri", "public.index_ri"], "").await;
    s.start();
    let mut seoul = s.conn("seoul").await;
    sqlx::raw_sql(
        "INSERT INTO full_ri VALUES (1, NULL), (2, 'two');
         UPDATE full_ri SET note = 'one' WHERE id = 1;
         UPDATE full_ri SET note = NULL WHERE id = 2;
         INSERT INTO full_ri VALUES (3, NULL);
         DELETE FROM full_ri WHERE id = 3;
         INSERT INTO index_ri VALUES (1, 'a', NULL), (2, 'b', 'x');
         UPDATE index_ri SET code = 'c', v = 'moved' WHERE id = 1;
         DELETE FROM index_ri WHERE id = 2;",
    )
    .execute(&mut seoul)
    .await
    .unwrap();
    let full = s.converged("full_ri").await;
    let index = s.converged("index_ri").await;
    assert_eq!(full.len(), 2, "{full:?}");
    assert_eq!(index.len(), 1, "{index:?}");
    assert!(index[0].contains(r#""code": "c""#) && index[0].contains(r#""v": "moved""#), "{index:?}");
    for (table, records) in [("public.full_ri", 6), ("public.index_ri", 4)] {
        for r in s.records(&s.bed.topic("seoul", table), records) {
            assert!(r.key.starts_with(r#"{"id":"#) && !r.key.contains(','), "{table}: key {}", r.key);
        }
    }
    assert_eq!(dead_letters(&s, "busan").await, vec![]);
    let (code, out) = mmsync(&s.topology, &["verify"]).await;
    assert_eq!(code, 0, "{out}");
    s.stop().await;
}

#[tokio::test]
async fn backslashes_in_names_work_where_standard_conforming_strings_is_off() {
    // The database default is off, so the application's sessions (and the
    // trigger functions they run) read a backslash in a plain literal as an
    // escape.
    let schema = r#"
        ALTER DATABASE app SET standard_conforming_strings = off;
        CREATE TABLE "back\slash" ("key\" int PRIMARY KEY, v text);"#;
    let mut s = Synced::new(&["seoul", "busan"], BedKafka::Shared, schema, &[r#"public."back\slash""#], "").await;
    s.start();
    let mut seoul = s.conn("seoul").await;
    let scs: String = sqlx::query_scalar("SHOW standard_conforming_strings").fetch_one(&mut seoul).await.unwrap();
    assert_eq!(scs, "off");
    sqlx::raw_sql(
        r#"INSERT INTO "back\slash" VALUES (1, 'one'), (2, 'two');
           DELETE FROM "back\slash" WHERE "key\" = 2;"#,
    )
    .execute(&mut seoul)
    .await
    .unwrap();
    let rows = s.converged(r#""back\slash""#).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    let tombstone: String = sqlx::query_scalar("SELECT key::text FROM mmsync.tombstones WHERE table_name = $1")
        .bind(r"back\slash")
        .fetch_one(&mut s.conn("busan").await)
        .await
        .unwrap();
    assert_eq!(tombstone, r#"{"key\\": "2"}"#);
    s.stop().await;
}

#[tokio::test]
async fn a_sink_whose_next_records_were_deleted_stops_that_link_and_says_how_to_resume() {
    let tables = [r#"public."Order Items""#, "public.plain"];
    let mut s = Synced::new(&["seoul", "busan"], BedKafka::Shared, SCHEMA, &tables, "").await;
    s.start();
    let mut seoul = s.conn("seoul").await;
    sqlx::raw_sql("INSERT INTO plain SELECT i, 'applied' FROM generate_series(1, 3) i")
        .execute(&mut seoul)
        .await
        .unwrap();
    s.converged("plain").await;
    // Busan is down while seoul's changes reach Kafka; then retention (here
    // DeleteRecords) takes them before busan applied them.
    s.bed.master_mut("busan").kill().await;
    sqlx::raw_sql("INSERT INTO plain SELECT i, 'deleted' FROM generate_series(4, 6) i")
        .execute(&mut seoul)
        .await
        .unwrap();
    let topic = s.bed.topic("seoul", "public.plain");
    use rdkafka::consumer::Consumer as _;
    let consumer: rdkafka::consumer::BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", s.bed.broker.address()).create().unwrap();
    let partitions = mmsync::kafka::partitions(&consumer, &topic).unwrap().unwrap();
    let produced = || {
        (0..partitions).map(|p| consumer.fetch_watermarks(&topic, p, Duration::from_secs(10)).unwrap().1).sum::<i64>()
    };
    wait_for("seoul's rows 4..6 in Kafka", DEADLINE, || async { (produced() >= 6).then_some(()) }).await;
    s.stop().await;
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", s.bed.broker.address()).create().unwrap();
    let mut up_to_end = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        up_to_end.add_partition_offset(&topic, p, rdkafka::Offset::End).unwrap();
    }
    admin.delete_records(&up_to_end, &rdkafka::admin::AdminOptions::new()).await.unwrap();
    s.bed.master_mut("busan").restart().await.unwrap();
    s.start();

    // That link stops and says why and how to resume; the others go on.
    s.wait_metric("mmsync_offset_gaps_total", &[("target", "busan")], 1.0).await;
    sqlx::raw_sql(r#"INSERT INTO "Order Items" VALUES (1, 'still flowing', 10, 'a@x')"#)
        .execute(&mut seoul)
        .await
        .unwrap();
    wait_for("another table's row on busan", DEADLINE, || async {
        (count(&s, "busan", r#"SELECT count(*) FROM "Order Items""#).await == 1).then_some(())
    })
    .await;
    let log = s.log();
    assert!(log.contains("changes may be missing here"), "{log}");
    assert!(log.contains("were deleted before this master applied them (retention)"), "{log}");
    assert_eq!(count(&s, "busan", "SELECT count(*) FROM plain").await, 3);

    // Done as the errors say (each of the table's sinks names its own
    // partitions), the link goes on with new changes.
    sqlx::raw_sql("INSERT INTO plain VALUES (7, 'after')").execute(&mut seoul).await.unwrap();
    let mut busan = s.conn("busan").await;
    let mut done = std::collections::HashSet::new();
    let row_7 = tokio::time::timeout(DEADLINE, async {
        loop {
            for fix in s.log().lines().filter_map(|l| l.split_once("on this master: ")).map(|(_, f)| f) {
                let sql = fix.split("; until then").next().unwrap().to_string();
                if done.insert(sql.clone()) {
                    sqlx::raw_sql(&sql).execute(&mut busan).await.unwrap();
                }
            }
            if count(&s, "busan", "SELECT count(*) FROM plain WHERE id = 7").await == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(row_7.is_ok(), "row 7 never reached busan; fixes applied: {done:?}\n{}", s.log());
    s.stop().await;
}

#[tokio::test]
async fn dead_letters_of_one_topic_stop_at_their_bound_and_old_audit_rows_are_pruned() {
    let tables = [r#"public."Order Items""#, "public.plain"];
    let mut s =
        Synced::new(&["seoul", "busan"], BedKafka::Shared, SCHEMA, &tables, "dead_letters_max_per_topic = 3\n").await;
    // Audit rows from long ago, and a pending dead letter as old: the first
    // two go, the pending one stays until someone deals with it.
    let mut busan = s.conn("busan").await;
    sqlx::raw_sql(
        "INSERT INTO mmsync.conflicts (logged_at, schema_name, table_name, key, kind, incoming_op, incoming_version, incoming_origin, winner_version, winner_origin)
             VALUES (now() - interval '40 days', 'public', 'plain', '{\"id\": \"1\"}', 'upsert_older_than_row', 'u', 1, 'seoul', 2, 'busan'),
                    (now(), 'public', 'plain', '{\"id\": \"2\"}', 'upsert_older_than_row', 'u', 1, 'seoul', 2, 'busan');
         INSERT INTO mmsync.dead_letters (logged_at, topic, partition, kafka_offset, reason, retried_at)
             VALUES (now() - interval '40 days', 'old', 0, 1, 'retried long ago', now() - interval '31 days'),
                    (now() - interval '40 days', 'old', 0, 2, 'still pending', NULL);",
    )
    .execute(&mut busan)
    .await
    .unwrap();
    s.start();
    s.wait_metric("mmsync_audit_rows_pruned_total", &[("master", "busan"), ("kind", "dead_letters")], 1.0).await;
    assert_eq!(s.metric("mmsync_audit_rows_pruned_total", &[("master", "busan"), ("kind", "conflicts")]).await, 1.0);
    let left: Vec<String> = sqlx::query_scalar(
        "SELECT kind FROM mmsync.conflicts UNION ALL SELECT reason FROM mmsync.dead_letters ORDER BY 1",
    )
    .fetch_all(&mut busan)
    .await
    .unwrap();
    assert_eq!(left, ["still pending", "upsert_older_than_row"]);
    assert_eq!(s.metric("mmsync_dead_letters_pending", &[("master", "busan")]).await, 1.0);

    // Five bad records on one partition, then a good one: no more than the
    // bound are added, then the link stops, the rest waiting in Kafka.
    let mut records: Vec<(String, String)> = (0..5).map(|_| (key("7"), "garbage".to_string())).collect();
    records.push((key("9"), plain_record("", "c", "9", "x", 1)));
    send_plain(&s, Some(0), &records).await;
    wait_for("the link stopping at the bound", DEADLINE, || async {
        s.log().contains("would pass [sync] dead_letters_max_per_topic = 3").then_some(())
    })
    .await;
    assert!(s.log().contains("mmsync dead-letters list"), "{}", s.log());
    let added = count(&s, "busan", "SELECT count(*) FROM mmsync.dead_letters WHERE topic <> 'old'").await;
    assert!(added <= 3, "{added} dead letters added past the bound");
    assert_eq!(count(&s, "busan", "SELECT count(*) FROM plain").await, 0);

    // With a higher bound the link goes on: the five are kept, the good one applied.
    s.stop().await;
    s.bed.write_topology(&tables, "dead_letters_max_per_topic = 10\n");
    s.start();
    wait_for("the good record behind them on busan", DEADLINE, || async {
        (count(&s, "busan", "SELECT count(*) FROM plain WHERE id = 9").await == 1).then_some(())
    })
    .await;
    assert_eq!(count(&s, "busan", "SELECT count(*) FROM mmsync.dead_letters WHERE topic <> 'old'").await, 5);
    s.stop().await;
}

#[tokio::test]
async fn a_truncate_of_a_synced_table_is_refused_with_the_way_to_do_it() {
    let tables = [r#"public."Order Items""#, "public.plain"];
    let s = Synced::new(&["seoul", "busan"], BedKafka::Shared, SCHEMA, &tables, "").await;
    let mut seoul = s.conn("seoul").await;
    sqlx::raw_sql("INSERT INTO plain VALUES (1, 'kept')").execute(&mut seoul).await.unwrap();
    let err = sqlx::raw_sql("TRUNCATE plain").execute(&mut seoul).await.expect_err("TRUNCATE is refused");
    let sqlx::Error::Database(db) = &err else { panic!("{err}") };
    assert_eq!(db.code().as_deref(), Some("0A000"));
    assert!(db.message().contains("TRUNCATE of public.plain is not replicated by mmsync"), "{err}");
    assert_eq!(count(&s, "seoul", "SELECT count(*) FROM plain").await, 1);
    // On purpose, in a session that says so, as on every master by hand.
    sqlx::raw_sql("BEGIN; SET LOCAL session_replication_role = replica; TRUNCATE plain; COMMIT;")
        .execute(&mut seoul)
        .await
        .unwrap();
    assert_eq!(count(&s, "seoul", "SELECT count(*) FROM plain").await, 0);
}
