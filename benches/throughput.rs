//! Throughput on this machine, on the test bed (real PostgreSQL, real Apache Kafka):
//!
//! - capture: one source streams N committed changes from its slot and
//!   produces them to Kafka, until the slot is confirmed past them (every
//!   delivery acknowledged);
//! - end to end: `mmsync run` (in process, every master's sources and sinks)
//!   until every other master holds them.
//!
//! `cargo bench --bench throughput`. Prints a table and writes
//! target/bench/throughput.json.
//!
//! - MMSYNC_BENCH_CHANGES: N (default 100,000; for rows over 10,000 B,
//!   1,000,000,000 / MMSYNC_BENCH_ROW_BYTES, so that the inserted values stay
//!   near 600 MB a master: 10,000 changes at 100 KB);
//! - MMSYNC_BENCH_MASTERS: masters in the topology (default 2). The workload is
//!   written on master `a`; the apply stage ends when every other master holds
//!   every row. Its rate is given per target master (N / the seconds until
//!   that master held every row) and over all targets (N × (masters − 1) /
//!   the seconds until the last one did);
//! - MMSYNC_BENCH_ROW_BYTES: bytes of the `name` column of each row (default
//!   100): md5 text, which pglz cannot compress, so a value over about 2,000
//!   bytes is stored out of line in TOAST (the output says how it was stored).
//!   Updates change `amount` only, so an update of a row with a TOASTed value
//!   leaves that value out of the WAL and the source reads it back;
//! - MMSYNC_BENCH_COMPRESSION: the producer's `compression.type` (none, lz4,
//!   zstd, ...; set in `[kafka.client]` as an operator would). The output
//!   gives the bytes the records take in Kafka, per change.
//!
//! The workload: 60% inserts, 30% updates, 10% deletes, in transactions of
//! 1,000 rows, all committed before either stage starts. The output also
//! gives the peak resident memory of this process (the source, and then
//! `mmsync run` for every master, run in it).
//!
//! The grid of the performance issue (2, 3 and 5 masters; 100 B, 2 KB and 100 KB rows):
//!
//! ```sh
//! for m in 2 3 5; do for b in 100 2048 100000; do
//!   MMSYNC_BENCH_MASTERS=$m MMSYNC_BENCH_ROW_BYTES=$b cargo bench --bench throughput
//!   cp target/bench/throughput.json target/bench/throughput-$m-masters-$b-bytes.json
//! done; done
//! ```

use std::time::{Duration, Instant};

use mmsync::testbed::{wait_for, Bed, BedKafka, PgCluster, BED_DATABASE};
use mmsync::topology::Topology;

const SCHEMA: &str =
    "CREATE TABLE bench (id bigint PRIMARY KEY, name text NOT NULL, amount numeric(12,2), at timestamptz)";

/// Master names: a, b, c, …
const NAMES: [&str; 8] = ["a", "b", "c", "d", "e", "f", "g", "h"];

fn env_num(name: &str) -> Option<i64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// (rows, sum of amounts, md5 of every row's `name` in key order) of `bench`:
/// to check, after the clock stopped, that a target holds the very values.
async fn fingerprint(cluster: &PgCluster) -> (i64, String, Option<String>) {
    let mut conn = cluster.connect(BED_DATABASE).await.unwrap();
    sqlx::query_as(
        "SELECT count(*), coalesce(sum(amount), 0)::text, md5(string_agg(md5(name), '' ORDER BY id)) FROM bench",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap()
}

#[tokio::main]
async fn main() {
    let bytes = env_num("MMSYNC_BENCH_ROW_BYTES").unwrap_or(100).max(1);
    let n: i64 = env_num("MMSYNC_BENCH_CHANGES").unwrap_or(if bytes > 10_000 {
        (1_000_000_000 / bytes).max(1000)
    } else {
        100_000
    });
    let masters = env_num("MMSYNC_BENCH_MASTERS").unwrap_or(2) as usize;
    assert!((2..=NAMES.len()).contains(&masters), "MMSYNC_BENCH_MASTERS: from 2 to {}", NAMES.len());
    let names = &NAMES[..masters];
    let bed = Bed::start(names, BedKafka::own()).await.expect("bed");
    bed.sql_everywhere(SCHEMA).await.unwrap();
    // The producer's compression.type, as an operator sets it in [kafka.client].
    let compression = std::env::var("MMSYNC_BENCH_COMPRESSION").ok();
    let client = compression.as_ref().map_or(String::new(), |c| format!("\"compression.type\" = {c:?}"));
    let path = bed.write_topology_as("topology.toml", &["public.bench"], "", &bed.broker.address(), &client);
    let topology = Topology::load(&path).unwrap();
    mmsync::postgres::schema::init(&topology).await.expect("init");

    // N changes on master a: 60% inserts, 30% updates, 10% deletes, in transactions of 1,000.
    let mut conn = bed.master("a").connect(BED_DATABASE).await.unwrap();
    let inserts = n * 6 / 10;
    let updates = n * 3 / 10;
    let deletes = n - inserts - updates;
    let mut done = 0;
    while done < inserts {
        let upto = (done + 1000).min(inserts);
        // `name`: the row's id, then md5 text (one block per statement, of
        // md5s of different seeds: nothing in a value repeats, so pglz does
        // not compress it), `bytes` in all.
        sqlx::query(
            "WITH p AS (SELECT string_agg(md5(g::text), '') AS p FROM generate_series(1, $3::int8 / 32 + 1) g)
             INSERT INTO bench SELECT i, left(i::text || ':' || p.p, $3::int), i * 1.25, now()
             FROM p, generate_series($1::int8, $2::int8) i",
        )
        .bind(done + 1)
        .bind(upto)
        .bind(bytes)
        .execute(&mut conn)
        .await
        .unwrap();
        done = upto;
    }
    // Updates change `amount` alone: a TOASTed `name` stays out of their WAL.
    for (sql, count) in [
        ("UPDATE bench SET amount = amount + 1 WHERE id BETWEEN $1 AND $2", updates),
        ("DELETE FROM bench WHERE id BETWEEN $1 AND $2", deletes),
    ] {
        let mut done = 0;
        while done < count {
            let upto = (done + 1000).min(count);
            sqlx::query(sql).bind(done + 1).bind(upto).execute(&mut conn).await.unwrap();
            done = upto;
        }
    }
    // How `name` is stored: its bytes on disk per value (compressed or not)
    // and the size of the table's TOAST relation (0: every value in line).
    let (stored, toast_bytes): (f64, i64) = sqlx::query_as(
        "SELECT coalesce(avg(pg_column_size(name)), 0)::float8,
                (SELECT pg_relation_size(reltoastrelid) FROM pg_class WHERE oid = 'bench'::regclass)
         FROM bench",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();

    // Capture: one source, alone, until its slot is confirmed past the workload.
    let master = topology.master("a").unwrap().clone();
    let target: String =
        sqlx::query_scalar("SELECT pg_current_wal_insert_lsn()::text").fetch_one(&mut conn).await.unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let source = tokio::spawn(mmsync::postgres::capture::run(std::sync::Arc::new(topology.clone()), master, stopped));
    wait_for("the source to confirm the workload", Duration::from_secs(1800), || async {
        let mut c = bed.master("a").connect(BED_DATABASE).await.ok()?;
        let done: bool = sqlx::query_scalar(
            "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = 'mmsync_a'",
        )
        .bind(&target)
        .fetch_one(&mut c)
        .await
        .ok()?;
        done.then_some(())
    })
    .await;
    let capture_secs = started.elapsed().as_secs_f64();
    stop.send(true).unwrap();
    source.await.unwrap().unwrap();
    let rss_capture = mmsync::testbed::peak_rss_kib(std::process::id());
    let kafka_bytes = bed.broker.topic_log_bytes(&bed.topic("a", "public.bench"));

    // End to end: reset nothing; the records are in Kafka, the sinks of every other master apply them.
    let rows = inserts - deletes;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let sync = tokio::spawn(mmsync::run::run(topology.clone(), async {
        let _ = stopped.await;
    }));
    let started = Instant::now();
    let targets = &names[1..];
    // Seconds until each target held every row.
    let mut held: Vec<Option<f64>> = vec![None; targets.len()];
    // One kept connection per target, polled every 100 ms: a new backend on
    // every poll taxed the two cores that the apply measured here runs on.
    let mut polls = Vec::new();
    for name in targets {
        polls.push(bed.master(name).connect(BED_DATABASE).await.unwrap());
    }
    while held.iter().any(Option::is_none) {
        assert!(
            started.elapsed() < Duration::from_secs(1800),
            "timed out waiting for every other master to hold every row"
        );
        for (c, secs) in polls.iter_mut().zip(held.iter_mut()).filter(|(_, s)| s.is_none()) {
            let counted: Result<(i64, i64), _> =
                sqlx::query_as("SELECT count(*), count(*) FILTER (WHERE amount <> id * 1.25) FROM bench")
                    .fetch_one(&mut *c)
                    .await;
            if counted.is_ok_and(|(count, updated)| count == rows && updated == updates - deletes) {
                *secs = Some(started.elapsed().as_secs_f64());
            }
        }
        if held.iter().any(Option::is_none) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let apply_secs = started.elapsed().as_secs_f64();
    let _ = stop.send(());
    sync.await.unwrap().unwrap();
    let rss_peak = mmsync::testbed::peak_rss_kib(std::process::id());
    let held: Vec<f64> = held.into_iter().map(Option::unwrap).collect();
    // Not timed: every target holds a's very rows, `name` included.
    let want = fingerprint(bed.master("a")).await;
    for name in targets {
        assert_eq!(fingerprint(bed.master(name)).await, want, "master {name} differs from a");
    }

    let capture_rate = n as f64 / capture_secs;
    let apply_rate = n as f64 / apply_secs;
    let total_rate = (n * targets.len() as i64) as f64 / apply_secs;
    let storage = if toast_bytes > 0 {
        format!("out of line: TOAST {:.1} MiB", toast_bytes as f64 / 1_048_576.0)
    } else {
        "in line".to_string()
    };
    println!(
        "\nthroughput: {masters} masters (the workload on a, applied on {}), {n} changes, `name` of {bytes} B \
         ({stored:.0} B stored a value, {storage})\n",
        targets.join(", ")
    );
    println!("| stage | changes | seconds | changes/s |");
    println!("|---|---:|---:|---:|");
    println!("| capture + produce (one source) | {n} | {capture_secs:.2} | {capture_rate:.0} |");
    if targets.len() == 1 {
        println!("| consume + apply (the sinks of one master, from Kafka) | {n} | {apply_secs:.2} | {apply_rate:.0} |");
    } else {
        for (name, secs) in targets.iter().zip(&held) {
            println!(
                "| consume + apply (the sinks of master {name}, from Kafka, beside the others) | {n} | {secs:.2} | {:.0} |",
                n as f64 / secs
            );
        }
        println!(
            "| consume + apply, all {} targets (until the last held every row) | {} | {apply_secs:.2} | {total_rate:.0} |",
            targets.len(),
            n * targets.len() as i64
        );
    }
    println!(
        "\nin Kafka: {:.1} MiB, {:.0} B a change (compression.type {})",
        kafka_bytes as f64 / 1_048_576.0,
        kafka_bytes as f64 / n as f64,
        compression.as_deref().unwrap_or("librdkafka's default")
    );
    println!(
        "\npeak RSS of this process (source, then `mmsync run` for {masters} masters): {} MiB after capture, {} MiB at the end",
        rss_capture / 1024,
        rss_peak / 1024
    );
    let json = serde_json::json!({
        "changes": n,
        "masters": masters,
        "row_bytes": bytes,
        "stored_bytes_per_value": stored,
        "toast_bytes": toast_bytes,
        "capture": {"seconds": capture_secs, "changes_per_second": capture_rate},
        // Until the last target held every row; per target.
        "apply": {"seconds": apply_secs, "changes_per_second": apply_rate,
                  "total_changes_per_second": total_rate,
                  "targets": targets.iter().zip(&held).map(|(name, secs)| serde_json::json!({
                      "master": name, "seconds": secs, "changes_per_second": n as f64 / secs}))
                      .collect::<Vec<_>>()},
        "peak_rss_kib": {"after_capture": rss_capture, "end": rss_peak},
        "kafka": {"compression": compression, "bytes": kafka_bytes, "bytes_per_change": kafka_bytes as f64 / n as f64},
    });
    std::fs::create_dir_all("target/bench").unwrap();
    std::fs::write("target/bench/throughput.json", serde_json::to_string_pretty(&json).unwrap()).unwrap();
}
