//! Masters that join and leave a running mesh: `mmsync join` copies another
//! master's rows under one snapshot and starts the new master's sinks where
//! that snapshot stands in Kafka, while the applications keep writing;
//! `mmsync remove` takes a master out once what it wrote has reached the others.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use mmsync::testbed::{wait_for, BedKafka, BED_DATABASE};
use sqlx::{Connection, PgConnection};

use crate::common::{kv_state, lww_model, mmsync, write_once_from, Rng, Synced, Written, DEADLINE, KV};

/// Writes keys `first..first + 300` on one master until told to stop;
/// returns what it acknowledged.
fn writer(
    url: String,
    master: &'static str,
    seed: u64,
    first: i32,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Written>> {
    tokio::spawn(async move {
        let mut conn = PgConnection::connect(&url).await.unwrap();
        let mut rng = Rng::new(seed);
        let mut written = Vec::new();
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            written.extend(write_once_from(&mut conn, master, i, &mut rng, first, 300).await.expect("no faults here"));
        }
        written
    })
}

#[tokio::test]
async fn a_master_joins_a_running_mesh_from_another_with_no_gap_while_applications_write() {
    let mut s = Synced::new(&["seoul", "busan"], BedKafka::Shared, KV, &["public.kv"], "").await;
    s.start();
    let seed = crate::common::seed("join");
    // Before: writes, deletes and key changes of keys 0..300 on both masters.
    let before = Arc::new(AtomicBool::new(false));
    let mut writers = vec![
        writer(s.bed.master("seoul").url(BED_DATABASE), "seoul", seed, 0, before.clone()),
        writer(s.bed.master("busan").url(BED_DATABASE), "busan", seed + 1, 0, before.clone()),
    ];
    crate::common::wait_rows(&s, "seoul", "kv", 100).await;
    crate::common::wait_rows(&s, "seoul", "kv WHERE mmsync_origin = 'busan'", 30).await;
    // Then seoul falls behind busan: its table is locked, so its sink cannot
    // apply busan's changes, which pile up in Kafka; mmsync dies there. The
    // copy from seoul will not hold them: jeju must get them from Kafka (they
    // are the last writes of their keys, so nothing hides a gap).
    let mut lock = s.conn("seoul").await;
    sqlx::raw_sql("BEGIN; LOCK TABLE kv IN SHARE MODE").execute(&mut lock).await.unwrap();
    s.wait_metric("mmsync_kafka_pending_records", &[("target", "seoul")], 50.0).await;
    s.kill().await;
    before.store(true, Ordering::Relaxed);
    sqlx::raw_sql("COMMIT").execute(&mut lock).await.unwrap();
    let mut written = Vec::new();
    for w in writers.drain(..) {
        written.extend(w.await.unwrap());
    }

    // During and after the join: keys 1000..1300, on every master.
    let stop = Arc::new(AtomicBool::new(false));
    writers.push(writer(s.bed.master("seoul").url(BED_DATABASE), "seoul", seed + 2, 1000, stop.clone()));
    writers.push(writer(s.bed.master("busan").url(BED_DATABASE), "busan", seed + 3, 1000, stop.clone()));
    // jeju comes up empty; the topology gains it, and init prepares it (and
    // the others' sequences for three masters).
    s.bed.add_master("jeju").await.unwrap();
    sqlx::raw_sql(KV).execute(&mut s.conn("jeju").await).await.unwrap();
    s.topology = s.bed.write_topology(&["public.kv"], "");
    let (code, out) = mmsync(&s.topology, &["init"]).await;
    assert_eq!(code, 0, "{out}");
    let (code, out) = mmsync(&s.topology, &["join", "--master", "jeju", "--from", "seoul", "--batch", "50"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("jeju joined"), "{out}");
    s.start();
    writers.push(writer(s.bed.master("jeju").url(BED_DATABASE), "jeju", seed + 4, 1000, stop.clone()));
    crate::common::wait_rows(&s, "jeju", "kv WHERE id >= 1000", 100).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        written.extend(w.await.unwrap());
    }
    let expected = lww_model(&written);
    s.converged("kv").await;
    for m in ["seoul", "busan", "jeju"] {
        assert_eq!(kv_state(&s, m).await, expected, "seed {seed}: {m} differs from the LWW model");
    }
    let (code, out) = mmsync(&s.topology, &["verify"]).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(crate::common::dead_letter_reasons(&s, "jeju").await, Vec::<String>::new());
    s.stop().await;
}

const NOTES: &str = "CREATE TABLE notes (id bigserial PRIMARY KEY, author text NOT NULL, body text NOT NULL)";

/// Inserts notes with ids from the master's own sequence until told to
/// stop; returns each acknowledged row as `id|author|body`.
fn note_writer(url: String, master: &'static str, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let mut conn = PgConnection::connect(&url).await.unwrap();
        let mut written = Vec::new();
        for i in 0.. {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let id: i64 = sqlx::query_scalar("INSERT INTO notes (author, body) VALUES ($1, $2) RETURNING id")
                .bind(master)
                .bind(i.to_string())
                .fetch_one(&mut conn)
                .await
                .unwrap_or_else(|e| panic!("insert {i} on {master}: {e}"));
            written.push(format!("{id}|{master}|{i}"));
        }
        written
    })
}

#[tokio::test]
async fn ids_minted_on_every_master_while_a_third_joins_never_collide() {
    let mut s = Synced::new(&["seoul", "busan"], BedKafka::Shared, NOTES, &["public.notes"], "").await;
    s.start();
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = vec![
        note_writer(s.bed.master("seoul").url(BED_DATABASE), "seoul", stop.clone()),
        note_writer(s.bed.master("busan").url(BED_DATABASE), "busan", stop.clone()),
    ];
    crate::common::wait_rows(&s, "seoul", "notes WHERE author = 'busan'", 50).await;
    // mmsync stops, as a join needs: ids minted from here on reach no
    // other master until it runs again, so no master's rows say how far
    // the others' sequences went.
    s.kill().await;
    crate::common::wait_rows(&s, "busan", "notes WHERE author = 'busan'", 500).await;
    s.bed.add_master("jeju").await.unwrap();
    sqlx::raw_sql(NOTES).execute(&mut s.conn("jeju").await).await.unwrap();
    s.topology = s.bed.write_topology(&["public.notes"], "");
    let (code, out) = mmsync(&s.topology, &["init"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("increment 3"), "{out}");
    let (code, out) = mmsync(&s.topology, &["join", "--master", "jeju", "--from", "seoul"]).await;
    assert_eq!(code, 0, "{out}");
    s.start();
    writers.push(note_writer(s.bed.master("jeju").url(BED_DATABASE), "jeju", stop.clone()));
    crate::common::wait_rows(&s, "seoul", "notes WHERE author = 'jeju'", 50).await;
    stop.store(true, Ordering::Relaxed);
    let mut expected = Vec::new();
    for w in writers {
        expected.extend(w.await.unwrap());
    }
    expected.sort();
    s.converged("notes").await;
    for m in ["seoul", "busan", "jeju"] {
        let mut rows: Vec<String> = sqlx::query_scalar("SELECT concat_ws('|', id, author, body) FROM notes")
            .fetch_all(&mut s.conn(m).await)
            .await
            .unwrap();
        rows.sort();
        assert_eq!(rows.len(), expected.len(), "{m} holds every acknowledged note, each under its own id");
        assert_eq!(rows, expected, "{m}");
        let conflicts: i64 =
            sqlx::query_scalar("SELECT count(*) FROM mmsync.conflicts").fetch_one(&mut s.conn(m).await).await.unwrap();
        assert_eq!(conflicts, 0, "no two masters minted the same id ({m})");
    }
    s.stop().await;
}

/// The keys below 1000 (the applications' inserts use the others).
async fn keys(s: &Synced, master: &str) -> Vec<i32> {
    sqlx::query_scalar("SELECT id FROM kv WHERE id < 1000 ORDER BY id")
        .fetch_all(&mut s.conn(master).await)
        .await
        .unwrap()
}

/// Inserts keys `first`, `first + 2`, ... until told to stop; returns them.
fn inserter(url: String, first: i32, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Vec<i32>> {
    tokio::spawn(async move {
        let mut conn = PgConnection::connect(&url).await.unwrap();
        let mut ids = Vec::new();
        let mut id = first;
        while !stop.load(Ordering::Relaxed) {
            sqlx::query("INSERT INTO kv VALUES ($1, 'app', 1)").bind(id).execute(&mut conn).await.unwrap();
            ids.push(id);
            id += 2;
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        ids
    })
}

#[tokio::test]
async fn a_master_may_not_leave_while_a_record_of_its_rows_waits_in_kafka_and_its_heartbeats_do_not_count() {
    let s = Synced::new(&["seoul", "busan"], BedKafka::Shared, KV, &["public.kv"], "").await;
    // Records of busan that seoul has not applied (mmsync is not running):
    // one of its rows, two of its heartbeats.
    let producer: rdkafka::producer::FutureProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", s.bed.broker.address()).create().unwrap();
    for (table, n) in [("public.kv", 1), ("mmsync.heartbeats", 2)] {
        let topic = s.bed.topic("busan", table);
        for _ in 0..n {
            let record = rdkafka::producer::FutureRecord::to(&topic).key("{}").payload("{}");
            producer.send(record, std::time::Duration::from_secs(10)).await.unwrap();
        }
    }
    let beats = s.bed.topic("busan", "mmsync.heartbeats");
    let ends = mmsync::kafka::topic_ends(&s.topology().kafka, vec![beats]).await.unwrap();
    assert_eq!(ends.iter().map(|(_, _, end)| end).sum::<i64>(), 2, "the heartbeats are in busan's topic");
    let (code, out) = mmsync(&s.topology, &["remove", "--master", "busan"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("1 record(s) of busan in Kafka are not applied here yet"), "{out}");
}

#[tokio::test]
async fn a_master_leaves_only_once_what_it_wrote_reached_the_others_and_nothing_of_it_stays() {
    let mut s =
        Synced::new(&["seoul", "busan", "jeju"], BedKafka::Shared, KV, &["public.kv"], "tombstones_keep_seconds = 1")
            .await;
    s.start();
    let urls: std::collections::HashMap<&str, String> =
        ["seoul", "busan", "jeju"].into_iter().map(|m| (m, s.bed.master(m).url(BED_DATABASE))).collect();
    let sql = |m: &'static str, q: &'static str| {
        let url = urls[m].clone();
        async move { sqlx::raw_sql(q).execute(&mut PgConnection::connect(&url).await.unwrap()).await.unwrap() }
    };
    sql("seoul", "INSERT INTO kv VALUES (1, 's', 1), (2, 's', 1)").await;
    sql("busan", "INSERT INTO kv VALUES (3, 'b', 1)").await;
    sql("jeju", "INSERT INTO kv VALUES (5, 'j', 1), (6, 'j', 1); DELETE FROM kv WHERE id = 6").await;
    s.converged("kv").await;
    // seoul's and busan's applications write throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let apps =
        [inserter(urls["seoul"].clone(), 1000, stop.clone()), inserter(urls["busan"].clone(), 1001, stop.clone())];
    s.stop().await;

    // A write on jeju that mmsync has not sent: jeju may not leave yet.
    sql("jeju", "INSERT INTO kv VALUES (7, 'late', 1)").await;
    let (code, out) = mmsync(&s.topology, &["remove", "--master", "jeju"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("its slot holds 1 change(s) of its own that mmsync has not sent yet"), "{out}");
    s.start();
    wait_for("jeju's last write to reach the others", DEADLINE, || async {
        (keys(&s, "seoul").await.contains(&7) && keys(&s, "busan").await.contains(&7)).then_some(())
    })
    .await;
    s.stop().await;
    // A heartbeat of jeju's that landed in Kafka after the others' sinks
    // stopped, as a stop can always leave one: it carries no row, so it does
    // not hold the removal back.
    let producer: rdkafka::producer::FutureProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", s.bed.broker.address()).create().unwrap();
    let beats = s.bed.topic("jeju", "mmsync.heartbeats");
    producer
        .send(rdkafka::producer::FutureRecord::to(&beats).key("{}").payload("{}"), std::time::Duration::from_secs(10))
        .await
        .unwrap();

    let (code, out) = mmsync(&s.topology, &["remove", "--master", "jeju", "--delete-topics"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("dropped replication slot mmsync_jeju"), "{out}");
    assert!(out.contains("kafka: deleted topic"), "{out}");
    let slots: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_replication_slots")
        .fetch_one(&mut s.conn("jeju").await)
        .await
        .unwrap();
    assert_eq!(slots, 0, "jeju's slot no longer holds its WAL");
    let topology = s.topology();
    let jeju_topics: Vec<String> =
        mmsync::kafka::all_topics(&topology).into_iter().filter(|(m, _, _)| m == "jeju").map(|(_, _, t)| t).collect();
    for m in ["seoul", "busan"] {
        let mut conn = s.conn(m).await;
        let offsets: i64 = sqlx::query_scalar("SELECT count(*) FROM mmsync.applied_offsets WHERE topic = ANY($1)")
            .bind(&jeju_topics)
            .fetch_one(&mut conn)
            .await
            .unwrap();
        let beats: i64 = sqlx::query_scalar("SELECT count(*) FROM mmsync.heartbeats WHERE master = 'jeju'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!((offsets, beats), (0, 0), "{m} keeps nothing of jeju");
    }
    let consumer: rdkafka::consumer::BaseConsumer = mmsync::kafka::client_config(&topology.kafka).create().unwrap();
    wait_for("jeju's topics to be gone", DEADLINE, || async {
        jeju_topics.iter().all(|t| mmsync::kafka::partitions(&consumer, t).unwrap().is_none()).then_some(())
    })
    .await;

    // The topology without jeju: status knows nothing of it, and the two
    // others sync on; their tombstones no longer wait for jeju.
    let text = std::fs::read_to_string(&s.topology).unwrap();
    let start = text.find("[[masters]]\nname = \"jeju\"").unwrap();
    let end = start + text[start..].find("\n\n").unwrap() + 2;
    std::fs::write(&s.topology, format!("{}{}", &text[..start], &text[end..])).unwrap();
    let (code, out) = mmsync(&s.topology, &["init"]).await;
    assert_eq!(code, 0, "{out}");
    let (code, out) = mmsync(&s.topology, &["status"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("jeju"), "{out}");
    s.start();
    sql("seoul", "DELETE FROM kv WHERE id = 1; INSERT INTO kv VALUES (8, 's', 1)").await;
    wait_for("seoul's writes to reach busan", DEADLINE, || async {
        (keys(&s, "busan").await == vec![2, 3, 5, 7, 8]).then_some(())
    })
    .await;
    assert_eq!(keys(&s, "seoul").await, vec![2, 3, 5, 7, 8]);
    stop.store(true, Ordering::Relaxed);
    let mut written = Vec::new();
    for app in apps {
        written.extend(app.await.unwrap());
    }
    written.sort();
    assert!(written.len() > 100, "{}", written.len());
    for m in ["seoul", "busan"] {
        wait_for("every application insert on both masters", DEADLINE, || async {
            let ids: Vec<i32> = sqlx::query_scalar("SELECT id FROM kv WHERE id >= 1000 ORDER BY id")
                .fetch_all(&mut s.conn(m).await)
                .await
                .unwrap();
            (ids == written).then_some(())
        })
        .await;
    }
    wait_for("seoul's tombstones to go", DEADLINE, || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM mmsync.tombstones")
            .fetch_one(&mut s.conn("seoul").await)
            .await
            .unwrap();
        (n == 0).then_some(())
    })
    .await;
    let (code, out) = mmsync(&s.topology, &["verify"]).await;
    assert_eq!(code, 0, "{out}");
    s.stop().await;
}

/// Runs a PostgreSQL client program (pg_dump, pg_restore) of the bed's version.
fn pg_tool(tool: &str, args: &[&str]) {
    let bin = mmsync::testbed::pg_bin_dir().unwrap().join(tool);
    let out = std::process::Command::new(&bin).args(args).output().unwrap();
    assert!(out.status.success(), "{tool} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

async fn val(s: &Synced, master: &str, id: i32) -> Option<String> {
    sqlx::query_scalar("SELECT val FROM kv WHERE id = $1")
        .bind(id)
        .fetch_optional(&mut s.conn(master).await)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_master_restored_from_an_old_backup_is_rebuilt_keeping_only_what_is_newer_than_the_others() {
    let mut s = Synced::new(&["seoul", "busan"], BedKafka::Shared, KV, &["public.kv"], "").await;
    s.start();
    let mut seoul = s.conn("seoul").await;
    sqlx::raw_sql("INSERT INTO kv SELECT i, 'old', i FROM generate_series(1, 40) i").execute(&mut seoul).await.unwrap();
    s.converged("kv").await;
    // busan's backup, then the mesh moves on: updates, deletes, inserts.
    let dump = s.bed.dir.path().join("busan.dump");
    let busan_port = s.bed.master("busan").port().to_string();
    let dump_path = dump.to_str().unwrap();
    pg_tool("pg_dump", &["-h", "127.0.0.1", "-p", &busan_port, "-U", "postgres", "-Fc", "-f", dump_path, BED_DATABASE]);
    sqlx::raw_sql(
        "UPDATE kv SET val = 'new' WHERE id <= 10; DELETE FROM kv WHERE id > 10 AND id <= 20;
         INSERT INTO kv SELECT i, 'new', i FROM generate_series(41, 50) i",
    )
    .execute(&mut seoul)
    .await
    .unwrap();
    s.converged("kv").await;
    s.stop().await;

    // busan is lost and restored from the backup.
    let mut admin = s.bed.master("busan").connect("postgres").await.unwrap();
    for sql in [
        "SELECT pg_drop_replication_slot('mmsync_busan')".to_string(),
        format!("DROP DATABASE {BED_DATABASE} WITH (FORCE)"),
        format!("CREATE DATABASE {BED_DATABASE}"),
    ] {
        sqlx::raw_sql(&sql).execute(&mut admin).await.unwrap();
    }
    pg_tool("pg_restore", &["-h", "127.0.0.1", "-p", &busan_port, "-U", "postgres", "-d", BED_DATABASE, dump_path]);
    assert_eq!(val(&s, "busan", 15).await.as_deref(), Some("old"), "the backup predates the deletes");
    let (code, out) = mmsync(&s.topology, &["init"]).await;
    assert_eq!(code, 0, "{out}");
    // Applications write on the restored busan before it is rebuilt: newer
    // than anything seoul holds of those keys.
    sqlx::raw_sql(
        "UPDATE kv SET val = 'busan' WHERE id = 5 OR id = 30; INSERT INTO kv VALUES (60, 'busan', 60);
         DELETE FROM kv WHERE id = 35",
    )
    .execute(&mut s.conn("busan").await)
    .await
    .unwrap();

    let (code, out) = mmsync(&s.topology, &["join", "--master", "busan", "--from", "seoul"]).await;
    assert_eq!(code, 0, "{out}");
    s.start();
    let rows = s.converged("kv").await;
    assert_eq!(rows.len(), 40, "1..10, 21..34, 36..50 and 60: {rows:?}");
    for m in ["seoul", "busan"] {
        assert_eq!(val(&s, m, 1).await.as_deref(), Some("new"), "{m}: the backup's older row lost");
        assert_eq!(val(&s, m, 15).await, None, "{m}: the backup's row deleted since stays deleted");
        assert_eq!(val(&s, m, 5).await.as_deref(), Some("busan"), "{m}: busan's newer write stays");
        assert_eq!(val(&s, m, 30).await.as_deref(), Some("busan"), "{m}");
        assert_eq!(val(&s, m, 45).await.as_deref(), Some("new"), "{m}");
        assert_eq!(val(&s, m, 60).await.as_deref(), Some("busan"), "{m}");
        assert_eq!(val(&s, m, 35).await, None, "{m}: busan's newer delete stays, the copy does not bring it back");
    }
    let (code, out) = mmsync(&s.topology, &["verify"]).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(crate::common::dead_letter_reasons(&s, "busan").await, Vec::<String>::new());
    s.stop().await;
}

#[tokio::test]
async fn rows_the_joining_master_refuses_are_kept_as_dead_letters_and_the_rest_is_copied() {
    let s = Synced::new(&["seoul", "busan"], BedKafka::Shared, KV, &["public.kv"], "").await;
    sqlx::raw_sql("INSERT INTO kv SELECT i, 'v', i FROM generate_series(1, 500) i")
        .execute(&mut s.conn("seoul").await)
        .await
        .unwrap();
    // busan's table refuses one of seoul's rows.
    sqlx::raw_sql("ALTER TABLE kv ADD CONSTRAINT not_250 CHECK (n <> 250)")
        .execute(&mut s.conn("busan").await)
        .await
        .unwrap();
    let (code, out) = mmsync(&s.topology, &["join", "--master", "busan", "--from", "seoul", "--batch", "100"]).await;
    assert_eq!(code, 1, "a refused row fails the join's exit code: {out}");
    assert!(out.contains("1 refused (see dead letters)"), "{out}");
    let mut busan = s.conn("busan").await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM kv").fetch_one(&mut busan).await.unwrap();
    assert_eq!(n, 499, "every other row is copied, the refused range row by row");
    let reasons = crate::common::dead_letter_reasons(&s, "busan").await;
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    assert!(reasons[0].contains("not_250"), "{reasons:?}");
}
