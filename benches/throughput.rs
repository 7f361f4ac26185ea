//! Throughput on this machine, on the test bed (real PostgreSQL, real Apache Kafka):
//!
//! - capture: one source streams N committed changes from its slot and
//!   produces them to Kafka, until the slot is confirmed past them (every
//!   delivery acknowledged);
//! - end to end: `mmsync run` (in process) until the other master holds them.
//!
//! `cargo bench --bench throughput` (N = 100,000; set MMSYNC_BENCH_CHANGES).
//! Prints a table and writes target/bench/throughput.json.

use std::time::{Duration, Instant};

use mmsync::testbed::{wait_for, Bed, BedKafka, BED_DATABASE};
use mmsync::topology::Topology;

const SCHEMA: &str =
    "CREATE TABLE bench (id bigint PRIMARY KEY, name text NOT NULL, amount numeric(12,2), at timestamptz)";

#[tokio::main]
async fn main() {
    let n: i64 = std::env::var("MMSYNC_BENCH_CHANGES").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let bed = Bed::start(&["a", "b"], BedKafka::own()).await.expect("bed");
    bed.sql_everywhere(SCHEMA).await.unwrap();
    let path = bed.write_topology(&["public.bench"], "");
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
        sqlx::query(
            "INSERT INTO bench SELECT i, 'name ' || i, i * 1.25, now() FROM generate_series($1::int8, $2::int8) i",
        )
        .bind(done + 1)
        .bind(upto)
        .execute(&mut conn)
        .await
        .unwrap();
        done = upto;
    }
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

    // End to end: reset nothing; the records are in Kafka, the sink of b applies them.
    let rows = inserts - deletes;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let sync = tokio::spawn(mmsync::run::run(topology.clone(), async {
        let _ = stopped.await;
    }));
    let started = Instant::now();
    let b = bed.master("b");
    wait_for("b to hold every row", Duration::from_secs(1800), || async {
        let mut b = b.connect(BED_DATABASE).await.ok()?;
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM bench").fetch_one(&mut b).await.ok()?;
        let updated: i64 =
            sqlx::query_scalar("SELECT count(*) FROM bench WHERE amount <> id * 1.25").fetch_one(&mut b).await.ok()?;
        (count == rows && updated == updates - deletes).then_some(())
    })
    .await;
    let apply_secs = started.elapsed().as_secs_f64();
    let _ = stop.send(());
    sync.await.unwrap().unwrap();

    let capture_rate = n as f64 / capture_secs;
    let apply_rate = n as f64 / apply_secs;
    println!("| stage | changes | seconds | changes/s |");
    println!("|---|---:|---:|---:|");
    println!("| capture + produce (one source) | {n} | {capture_secs:.2} | {capture_rate:.0} |");
    println!("| consume + apply (the sinks of one master, from Kafka) | {n} | {apply_secs:.2} | {apply_rate:.0} |");
    let json = serde_json::json!({
        "changes": n,
        "capture": {"seconds": capture_secs, "changes_per_second": capture_rate},
        "apply": {"seconds": apply_secs, "changes_per_second": apply_rate},
    });
    std::fs::create_dir_all("target/bench").unwrap();
    std::fs::write("target/bench/throughput.json", serde_json::to_string_pretty(&json).unwrap()).unwrap();
}
