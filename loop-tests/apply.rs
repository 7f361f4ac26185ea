//! The sink and `mmsync run`: changes reach every other master, nothing
//! echoes back, conflicts resolve to one winner everywhere.

use std::time::Duration;

use mmsync::testbed::{wait_for, BedKafka};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

use crate::common::{kv_state, lww_model, random_writes, seed, Synced, DEADLINE, KV};

const USERS: &str = "CREATE TABLE users (id bigserial PRIMARY KEY, name text NOT NULL, score int)";

#[tokio::test]
async fn a_row_written_on_one_master_appears_on_the_other() {
    let mut s = Synced::new(&["seoul", "busan"], BedKafka::Shared, USERS, &["public.users"], "").await;
    s.start();
    let mut seoul = s.conn("seoul").await;
    sqlx::raw_sql("INSERT INTO users (name, score) VALUES ('kim', 1), ('lee', 2)").execute(&mut seoul).await.unwrap();
    let mut busan = s.conn("busan").await;
    sqlx::raw_sql(
        "INSERT INTO users (name, score) VALUES ('park', 3); UPDATE users SET score = 10 WHERE name = 'park'",
    )
    .execute(&mut busan)
    .await
    .unwrap();
    let rows = s.converged("users").await;
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert!(
        rows.iter().any(|r| r.contains("\"name\": \"park\"")
            && r.contains("\"score\": 10")
            && r.contains("\"mmsync_origin\": \"busan\"")),
        "{rows:?}"
    );
    sqlx::raw_sql("DELETE FROM users WHERE name = 'kim'").execute(&mut busan).await.unwrap();
    let rows = s.converged("users").await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    s.stop().await;
}

/// End offsets of every topic.
fn end_offsets(s: &Synced) -> Vec<(String, i32, i64)> {
    let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", s.bed.broker.address()).create().unwrap();
    let mut out = Vec::new();
    for (_, _, topic) in mmsync::kafka::all_topics(&s.topology()) {
        let partitions = mmsync::kafka::partitions(&consumer, &topic).unwrap().unwrap();
        for p in 0..partitions {
            let (_, high) = consumer.fetch_watermarks(&topic, p, Duration::from_secs(10)).unwrap();
            out.push((topic.clone(), p, high));
        }
    }
    out
}

#[tokio::test]
async fn no_echo_once_writes_stop() {
    // Heartbeats are changes too; here they would blur "nothing moves", so
    // they beat once at start and not again during the test.
    let mut s =
        Synced::new(&["seoul", "busan"], BedKafka::Shared, USERS, &["public.users"], "heartbeat_interval_ms = 3600000")
            .await;
    s.start();
    let mut seoul = s.conn("seoul").await;
    // 1,000 changes: 600 inserts, 300 updates, 100 deletes.
    sqlx::raw_sql(
        "INSERT INTO users (name, score) SELECT 'u' || i, i FROM generate_series(1, 600) i;
         UPDATE users SET score = score + 1 WHERE id IN (SELECT id FROM users ORDER BY id LIMIT 300);
         DELETE FROM users WHERE id IN (SELECT id FROM users ORDER BY id DESC LIMIT 100);",
    )
    .execute(&mut seoul)
    .await
    .unwrap();
    let rows = s.converged("users").await;
    assert_eq!(rows.len(), 500);
    // Every change is accounted for at busan: applied, or skipped because a
    // later change of the same row in the same batch superseded it.
    let handled = |text: &str| {
        ["mmsync_changes_applied_total", "mmsync_changes_skipped_total"]
            .map(|m| crate::common::metric_sum(text, m, &[("target", "busan"), ("table", "public.users")]))
            .iter()
            .sum::<f64>()
    };
    wait_for("busan to account for 1000 changes", DEADLINE, || async {
        (handled(&s.metrics().await) >= 1000.0).then_some(())
    })
    .await;

    // Each of the 500 rows busan holds was written there by the applier, and
    // busan's source dropped that change instead of sending it back.
    s.wait_metric("mmsync_loop_suppressed_total", &[("master", "busan")], 500.0).await;
    // ... and busan's source has read everything the applier wrote.
    let mut busan = s.conn("busan").await;
    let written: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text").fetch_one(&mut busan).await.unwrap();
    wait_for("busan's slot to pass the applied changes", DEADLINE, || async {
        let mut busan = s.conn("busan").await;
        sqlx::query_scalar::<_, bool>(
            "SELECT confirmed_flush_lsn >= $1::pg_lsn FROM pg_replication_slots WHERE slot_name = 'mmsync_busan'",
        )
        .bind(&written)
        .fetch_one(&mut busan)
        .await
        .ok()?
        .then_some(())
    })
    .await;

    // Quiet now: nothing may move for well over ten batch intervals (50 ms each).
    let counters = |text: &str| {
        let sum = |m, l: &[(&str, &str)]| crate::common::metric_sum(text, m, l);
        [
            sum("mmsync_changes_captured_total", &[("table", "public.users")]),
            sum("mmsync_records_produced_total", &[]),
            handled(text),
        ]
    };
    // (The suppression counter is not in this list: a heartbeat applied at
    // start-up may still be read, and dropped, by its target's source. Being
    // dropped is the point; what must not move is what is sent.)
    let before = (counters(&s.metrics().await), end_offsets(&s));
    let records =
        |prefix: &str| -> i64 { before.1.iter().filter(|(t, _, _)| t.starts_with(prefix)).map(|(_, _, h)| h).sum() };
    assert_eq!(
        records(&format!("{}.busan.public.", s.bed.topic_prefix)),
        0,
        "busan produced records of seoul's changes: {:?}",
        before.1
    );
    assert_eq!(records(&s.bed.topic("seoul", "public.users")), 1000, "{:?}", before.1);
    assert_eq!([before.0[0], before.0[2]], [1000.0, 1000.0], "captured, applied or skipped");
    let quiet_until = std::time::Instant::now() + Duration::from_millis(1500);
    while std::time::Instant::now() < quiet_until {
        let now = (counters(&s.metrics().await), end_offsets(&s));
        assert_eq!(now, before, "something moved after writes stopped");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.stop().await;
}

/// Concurrent random writes on the same keys at every master; when quiet,
/// every master equals the last-writer-wins model of all acknowledged writes.
async fn converge_under_conflict(masters: &[&str], ops: usize) -> Synced {
    let mut s = Synced::new(masters, BedKafka::Shared, KV, &["public.kv"], "").await;
    s.start();
    let seed = seed("converge_under_conflict");
    let mut writers = Vec::new();
    for (i, m) in masters.iter().enumerate() {
        let mut conn = s.conn(m).await;
        let master = m.to_string();
        writers.push(tokio::spawn(async move { random_writes(&mut conn, &master, seed + i as u64, ops, 200).await }));
    }
    let mut writes = Vec::new();
    for w in writers {
        writes.extend(w.await.unwrap());
    }
    let expected = lww_model(&writes);
    s.converged("kv").await;
    for m in masters {
        let actual = kv_state(&s, m).await;
        assert!(
            actual == expected,
            "seed {seed}: {m} differs from the LWW model\nactual:   {actual:?}\nexpected: {expected:?}"
        );
    }
    for m in masters {
        let mut conn = s.conn(m).await;
        let dead: Vec<String> =
            sqlx::query_scalar("SELECT reason FROM mmsync.dead_letters").fetch_all(&mut conn).await.unwrap();
        assert!(dead.is_empty(), "seed {seed}: dead letters on {m}: {dead:?}");
    }
    // The run proves something only if masters really fought over keys: a
    // conflict is a change that lost to another master's newer write.
    let counted = s.metric("mmsync_conflicts_total", &[]).await;
    let mut logged = 0;
    for m in masters {
        let mut conn = s.conn(m).await;
        logged += sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM mmsync.conflicts WHERE winner_origin <> incoming_origin",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
    }
    assert!(
        counted >= 20.0 && logged >= 20,
        "seed {seed}: concurrent writes on 200 keys must conflict ({counted} counted, {logged} logged); the run proves nothing"
    );
    s
}

#[tokio::test]
async fn two_masters_converge_under_conflict_to_the_lww_model() {
    let mut s = converge_under_conflict(&["seoul", "busan"], 1500).await;
    s.stop().await;
}

#[tokio::test]
async fn three_masters_converge_under_conflict_to_the_lww_model() {
    let mut s = converge_under_conflict(&["seoul", "busan", "jeju"], 800).await;
    s.stop().await;
}

#[tokio::test]
async fn five_masters_converge_under_conflict_to_the_lww_model() {
    let mut s = converge_under_conflict(&["seoul", "busan", "jeju", "incheon", "daegu"], 400).await;
    s.stop().await;
}

#[tokio::test]
async fn replaying_every_record_changes_no_row() {
    let mut s = converge_under_conflict(&["seoul", "busan"], 600).await;
    s.stop().await;
    let before: Vec<Vec<String>> = vec![kv_state(&s, "seoul").await, kv_state(&s, "busan").await];
    // Equal values are not enough: a row written again with what it held
    // was changed too. Its physical version (xmin) shows that.
    async fn xmins(s: &Synced, m: &str) -> Vec<String> {
        let mut conn = s.conn(m).await;
        sqlx::query_scalar("SELECT id || ':' || xmin::text FROM kv ORDER BY id").fetch_all(&mut conn).await.unwrap()
    }
    let physical_before = vec![xmins(&s, "seoul").await, xmins(&s, "busan").await];
    let mut applied = Vec::new();
    let mut records = Vec::new();
    for (m, other) in [("seoul", "busan"), ("busan", "seoul")] {
        let mut conn = s.conn(m).await;
        let next: i64 = sqlx::query_scalar("SELECT coalesce(sum(next_offset), 0)::int8 FROM mmsync.applied_offsets")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert!(next > 0);
        let kv: i64 = sqlx::query_scalar(
            "SELECT coalesce(sum(next_offset), 0)::int8 FROM mmsync.applied_offsets WHERE topic = $1",
        )
        .bind(s.bed.topic(other, "public.kv"))
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert!(kv > 0);
        records.push((m, kv));
        sqlx::raw_sql("DELETE FROM mmsync.applied_offsets").execute(&mut conn).await.unwrap();
        applied.push((m, next));
    }
    s.start();
    for (m, next) in applied {
        wait_for(&format!("{m} to re-apply every record"), DEADLINE, || async {
            let mut conn = s.conn(m).await;
            let now: i64 = sqlx::query_scalar("SELECT coalesce(sum(next_offset), 0)::int8 FROM mmsync.applied_offsets")
                .fetch_one(&mut conn)
                .await
                .ok()?;
            (now >= next).then_some(())
        })
        .await;
    }
    let after: Vec<Vec<String>> = vec![kv_state(&s, "seoul").await, kv_state(&s, "busan").await];
    assert_eq!(after, before, "replay changed rows");
    // Every replayed record was taken for what it is, one the master already
    // holds (skipped) or one that lost (a conflict), and none was applied:
    // a record that ties the row it finds must not be written again.
    for (m, kv) in records {
        let labels = [("target", m), ("table", "public.kv")];
        let sum = |text: &str, name: &str| crate::common::metric_sum(text, name, &labels);
        let text = wait_for(&format!("{m} to account for {kv} replayed records"), DEADLINE, || async {
            let text = s.metrics().await;
            let handled = ["mmsync_changes_applied_total", "mmsync_changes_skipped_total", "mmsync_conflicts_total"]
                .map(|name| sum(&text, name))
                .iter()
                .sum::<f64>();
            (handled >= kv as f64).then_some(text)
        })
        .await;
        assert_eq!(sum(&text, "mmsync_changes_applied_total"), 0.0, "{m} applied replayed records again");
    }
    assert_eq!(vec![xmins(&s, "seoul").await, xmins(&s, "busan").await], physical_before, "replay rewrote rows");
    s.stop().await;
}

#[tokio::test]
async fn delete_versus_update_ends_by_the_versions_everywhere() {
    let mut s = Synced::new(&["seoul", "busan"], BedKafka::Shared, KV, &["public.kv"], "").await;
    s.start();
    let mut seoul = s.conn("seoul").await;
    let mut busan = s.conn("busan").await;
    sqlx::raw_sql("INSERT INTO kv VALUES (1, 'one', 1), (2, 'two', 2)").execute(&mut seoul).await.unwrap();
    assert_eq!(s.converged("kv").await.len(), 2);
    s.stop().await;

    // While the masters cannot see each other: key 1 is deleted on seoul and
    // then updated on busan (the update is newer); key 2 is updated on busan
    // and then deleted on seoul (the delete is newer).
    sqlx::raw_sql("DELETE FROM kv WHERE id = 1").execute(&mut seoul).await.unwrap();
    sqlx::raw_sql("UPDATE kv SET val = 'one-busan' WHERE id = 1; UPDATE kv SET val = 'two-busan' WHERE id = 2")
        .execute(&mut busan)
        .await
        .unwrap();
    sqlx::raw_sql("DELETE FROM kv WHERE id = 2").execute(&mut seoul).await.unwrap();
    let tomb = |id: i32| {
        sqlx::query_scalar::<_, i64>(
            "SELECT version FROM mmsync.tombstones WHERE table_name = 'kv' AND key = jsonb_build_object('id', $1::text)",
        )
        .bind(id)
    };
    let t1 = tomb(1).fetch_one(&mut seoul).await.unwrap();
    let t2 = tomb(2).fetch_one(&mut seoul).await.unwrap();
    let v: Vec<(i32, i64)> =
        sqlx::query_as("SELECT id, mmsync_version FROM kv ORDER BY id").fetch_all(&mut busan).await.unwrap();
    assert!(v[0].1 > t1 && t2 > v[1].1, "the clock order of this test: {v:?} vs tombstones {t1}, {t2}");

    s.start();
    let rows = s.converged("kv").await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(rows[0].contains("\"val\": \"one-busan\""), "{rows:?}");
    // The deleted key's tombstone keeps an older update from bringing it back.
    assert_eq!(tomb(2).fetch_one(&mut busan).await.unwrap(), t2);
    s.stop().await;
}

#[tokio::test]
async fn a_blocked_table_does_not_hold_the_others_back() {
    let schema = "CREATE TABLE slow (id int PRIMARY KEY, v text); CREATE TABLE fast (id int PRIMARY KEY, v text)";
    let mut s = Synced::new(&["seoul", "busan"], BedKafka::Shared, schema, &["public.slow", "public.fast"], "").await;
    s.start();
    let mut seoul = s.conn("seoul").await;
    sqlx::raw_sql("INSERT INTO slow VALUES (1, 'a')").execute(&mut seoul).await.unwrap();
    assert_eq!(s.converged("slow").await.len(), 1);

    // A transaction on busan holds row 1 of `slow`: applying seoul's update of it must wait.
    let mut holder = s.conn("busan").await;
    let mut tx = sqlx::Connection::begin(&mut holder).await.unwrap();
    sqlx::raw_sql("SELECT * FROM slow WHERE id = 1 FOR UPDATE").execute(&mut *tx).await.unwrap();
    sqlx::raw_sql("UPDATE slow SET v = 'b' WHERE id = 1; INSERT INTO fast VALUES (1, 'x'), (2, 'y')")
        .execute(&mut seoul)
        .await
        .unwrap();

    // `fast` arrives while `slow` is still blocked...
    assert_eq!(s.converged("fast").await.len(), 2);
    let mut busan = s.conn("busan").await;
    let v: String = sqlx::query_scalar("SELECT v FROM slow WHERE id = 1").fetch_one(&mut busan).await.unwrap();
    assert_eq!(v, "a", "the blocked update cannot have been applied yet");
    // ... and `slow` follows once the lock goes.
    tx.rollback().await.unwrap();
    let rows = s.converged("slow").await;
    assert!(rows[0].contains("\"v\": \"b\""), "{rows:?}");
    s.stop().await;
}

/// A sink stores its offsets after each of its own batches, which end
/// wherever they end: usually inside a batch the producer sent, which the
/// broker stores and serves whole. On restart it must go on from exactly
/// there, neither skipping the rest of that batch nor applying its start
/// twice. The test reads the broker's log to be sure the stop did land
/// inside a producer batch.
#[tokio::test]
async fn a_sink_that_stopped_inside_a_producer_batch_resumes_without_a_gap() {
    // Small sink batches: almost every stop lands inside a producer batch.
    let mut s = Synced::new(&["seoul", "busan"], BedKafka::Shared, KV, &["public.kv"], "batch_max_changes = 7\n").await;
    const ROWS: i64 = 5000;
    let mut seoul = s.conn("seoul").await;
    // One transaction, one round of the source: a few big producer batches.
    sqlx::query("INSERT INTO kv SELECT i, 'v' || i, i FROM generate_series(1, $1::int) i")
        .bind(ROWS as i32)
        .execute(&mut seoul)
        .await
        .unwrap();
    let written: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text").fetch_one(&mut seoul).await.unwrap();
    s.start();
    // Seoul's slot must be past the insert before the crash: otherwise the
    // restarted source produces it all again, and those duplicates would
    // hide a sink that skipped records.
    wait_for("seoul's slot to confirm the insert", DEADLINE, || async {
        let mut seoul = s.conn("seoul").await;
        sqlx::query_scalar::<_, bool>(
            "SELECT confirmed_flush_lsn >= $1::pg_lsn FROM pg_replication_slots WHERE slot_name = 'mmsync_seoul'",
        )
        .bind(&written)
        .fetch_one(&mut seoul)
        .await
        .ok()?
        .then_some(())
    })
    .await;
    let count = |s: &Synced| {
        let busan = s.bed.master("busan").url(mmsync::testbed::BED_DATABASE);
        async move {
            let mut c = <sqlx::PgConnection as sqlx::Connection>::connect(&busan).await.ok()?;
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM kv").fetch_one(&mut c).await.ok()
        }
    };
    wait_for("busan to hold some of the rows", DEADLINE, || async { count(&s).await.filter(|n| *n >= 50) }).await;
    // Hold the sink where it is, then crash mmsync there.
    let mut busan = s.conn("busan").await;
    sqlx::raw_sql("BEGIN; LOCK TABLE kv IN EXCLUSIVE MODE").execute(&mut busan).await.unwrap();
    s.kill().await;
    sqlx::raw_sql("ROLLBACK").execute(&mut busan).await.unwrap();
    let stopped_at = count(&s).await.unwrap();
    assert!(stopped_at < ROWS, "the sink finished before it could be stopped; the test proves nothing");
    // Where busan stopped, per partition, and whether that is inside a batch
    // the producer sent (not at its first record, not past its last).
    let topic = s.bed.topic("seoul", "public.kv");
    let stored: Vec<(i32, i64)> =
        sqlx::query_as("SELECT partition, next_offset FROM mmsync.applied_offsets WHERE topic = $1")
            .bind(&topic)
            .fetch_all(&mut busan)
            .await
            .unwrap();
    let mut inside = Vec::new();
    for (partition, next) in &stored {
        let batches = s.bed.broker.batches(0, &topic, *partition).await.unwrap();
        assert!(!batches.is_empty(), "no batches read for {topic}-{partition}");
        if batches.iter().any(|(base, last)| base < next && next <= last) {
            inside.push((*partition, *next));
        }
    }
    assert!(!inside.is_empty(), "no stop landed inside a producer batch ({stored:?}); the test proves nothing");
    s.start();
    let rows = s.converged("kv").await;
    assert_eq!(rows.len() as i64, ROWS, "stopped at {stopped_at} rows");
    s.stop().await;
}

/// Two runs of one topology would apply everything twice and rewind each
/// other's offsets: the second stops at once and names the first, which goes
/// on; once the first has crashed, a new run takes over.
#[tokio::test]
async fn a_second_mmsync_run_stops_and_names_the_first_which_goes_on() {
    let mut s = Synced::new(&["seoul", "busan"], BedKafka::Shared, KV, &["public.kv"], "").await;
    s.start();
    let mut seoul = s.conn("seoul").await;
    sqlx::raw_sql("INSERT INTO kv VALUES (1, 'first', 1)").execute(&mut seoul).await.unwrap();
    s.converged("kv").await;

    // Same masters and topics, its own metrics port.
    let second = s.bed.write_topology_as("second.toml", &["public.kv"], "", &s.bed.broker.address(), "");
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_mmsync"));
    let log = s.bed.dir.path().join("second.log");
    let run = mmsync::testbed::MmsyncProcess::spawn(bin, &second, &["run"], &[], log.clone()).unwrap();
    let status = tokio::time::timeout(DEADLINE, run.wait()).await.expect("the second run stops by itself");
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(text.contains("another mmsync run, adopt or join holds this master"), "{text}");
    assert!(text.contains("mmsync:seoul:run") || text.contains("mmsync:busan:run"), "{text}");
    assert!(text.contains("run one `mmsync run` per topology"), "{text}");

    // The first goes on.
    sqlx::raw_sql("INSERT INTO kv VALUES (2, 'still', 2)").execute(&mut seoul).await.unwrap();
    assert_eq!(s.converged("kv").await.len(), 2);

    // A crashed run leaves no lock behind.
    s.kill().await;
    let log = s.bed.dir.path().join("third.log");
    let run = mmsync::testbed::MmsyncProcess::spawn(bin, &second, &["run"], &[], log).unwrap();
    sqlx::raw_sql("INSERT INTO kv VALUES (3, 'after', 3)").execute(&mut seoul).await.unwrap();
    assert_eq!(s.converged("kv").await.len(), 3, "{}", run.log());
    assert!(run.terminate().await.success());
}

/// What a sink holds is bounded by bytes as well as by changes: rows of
/// about 3 KB with `batch_max_bytes = 5000` go at most two to a batch (the
/// record that crosses the bound ends it), where the changes bound alone
/// would take them all at once once they wait in Kafka.
#[tokio::test]
async fn a_sink_batch_ends_at_its_byte_bound_and_big_rows_still_arrive_whole() {
    let mut s =
        Synced::new(&["seoul", "busan"], BedKafka::Shared, KV, &["public.kv"], "batch_max_bytes = 5000\n").await;
    const ROWS: i64 = 200;
    // busan's sink waits behind a lock until every row is in Kafka.
    let mut hold = s.conn("busan").await;
    sqlx::raw_sql("BEGIN; LOCK TABLE kv IN EXCLUSIVE MODE").execute(&mut hold).await.unwrap();
    sqlx::query("INSERT INTO kv SELECT i, repeat(md5(i::text), 94), i FROM generate_series(1, $1::int) i")
        .bind(ROWS as i32)
        .execute(&mut s.conn("seoul").await)
        .await
        .unwrap();
    s.start();
    let pending = [("source", "seoul"), ("target", "busan")];
    s.wait_metric("mmsync_kafka_pending_records", &pending, ROWS as f64).await;
    sqlx::raw_sql("ROLLBACK").execute(&mut hold).await.unwrap();
    let rows = s.converged("kv").await;
    assert_eq!(rows.len() as i64, ROWS);
    const BATCH: &str = "mmsync_apply_batch_changes_bucket";
    let metrics = s.metrics().await;
    let sum = |le: &str| crate::common::metric_sum(&metrics, BATCH, &[("target", "busan"), ("le", le)]);
    let (small, all) = (sum("10"), sum("+Inf"));
    assert!(all >= (ROWS / 2) as f64, "{ROWS} rows of 3 KB in only {all} batches: the byte bound did not hold");
    assert_eq!(small, all, "every batch has at most 10 changes");
    s.stop().await;
}
