//! mmsync beside PostgreSQL's native logical replication, pglogical 2 and
//! Debezium (its PostgreSQL source and JDBC sink in Kafka Connect, the usual
//! way to move PostgreSQL rows through Kafka), on the same workload, in one
//! run on this machine (the test bed: real PostgreSQL 15 clusters, Apache
//! Kafka (KRaft), the release `mmsync` binary).
//!
//! `cargo bench --bench compare` (MMSYNC_BENCH_CHANGES changes, default
//! 1,000,000; MMSYNC_BENCH_BACKLOG changes for the catch-up, default the same;
//! MMSYNC_BENCH_SECONDS per timed load phase, default 20). Prints a
//! table and writes target/bench/compare.json. pglogical runs when Debian's
//! postgresql-15-pglogical is installed, Debezium when its jars are in the
//! cache (scripts/bench does both; MMSYNC_BENCH_DEBEZIUM=0 skips Debezium).
//!
//! 1. one-way throughput: N changes (40% inserts, 50% updates, 10% deletes)
//!    written on A as fast as they go; time until B holds the same rows;
//! 2. catch-up: a backlog of that many changes (or MMSYNC_BENCH_BACKLOG) written
//!    while the replicator is stopped, then drained;
//! 3. lag under steady load: both masters writing 2,000 changes/s each;
//! 4. cost on the master: pgbench upserts on a synced table against a plain
//!    one, with mmsync's triggers alone (mmsync stopped), and with each
//!    replicator running;
//! 5. peak resident memory of `mmsync run` (and of the Connect worker);
//! 6. single-row transactions: pgbench, 4 clients, N transactions of one row
//!    each on `bench` (90% upserts, 10% deletes, on keys 40,000,001 to
//!    40,200,000), with the replicator running: pgbench's rate (beside the
//!    same pgbench on `bench_plain`, a table with no triggers, with no
//!    replicator running), and the one-way throughput, from pgbench's start
//!    until B holds what A holds.
//!
//! Native logical replication and Debezium replicate one way, A to B; their
//! lag, where measured, is one way too.

use std::path::Path;
use std::time::{Duration, Instant};

use mmsync::testbed::connect::{self, Connector, KafkaConnect};
use mmsync::testbed::{Bed, BedKafka, MmsyncProcess, PgCluster};
use sqlx::PgConnection;

const TABLE: &str = "CREATE TABLE bench (id bigint PRIMARY KEY, name text NOT NULL, amount numeric(12,2), at timestamptz);
                     CREATE TABLE bench_plain (id bigint PRIMARY KEY, name text NOT NULL, amount numeric(12,2), at timestamptz);
                     CREATE TABLE wc_plain (id int PRIMARY KEY, v int); CREATE TABLE wc_synced (id int PRIMARY KEY, v int);";

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

async fn exec(conn: &mut PgConnection, sql: &str) {
    sqlx::raw_sql(sql).execute(conn).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Writes `n` changes to `bench` on ids from `first`: 40% inserts, 50% updates, 10% deletes,
/// 1,000 row changes per statement and transaction.
async fn workload(conn: &mut PgConnection, first: i64, n: i64) {
    let inserts = n * 4 / 10;
    let updates = n / 2;
    let deletes = n - inserts - updates;
    let chunks = |count: i64| (0..count).step_by(1000).map(move |s| (s, (s + 1000).min(count)));
    for (s, e) in chunks(inserts) {
        sqlx::query(
            "INSERT INTO bench SELECT i, 'name ' || i, i * 0.25, now() FROM generate_series($1::int8, $2::int8 - 1) i",
        )
        .bind(first + s)
        .bind(first + e)
        .execute(&mut *conn)
        .await
        .unwrap();
    }
    for (s, e) in chunks(updates) {
        // updates walk the inserted rows, wrapping around
        let (a, b) = (first + s % inserts, first + s % inserts + (e - s));
        sqlx::query("UPDATE bench SET amount = amount + 1, at = now() WHERE id >= $1 AND id < $2")
            .bind(a)
            .bind(b.min(first + inserts))
            .execute(&mut *conn)
            .await
            .unwrap();
    }
    for (s, e) in chunks(deletes) {
        sqlx::query("DELETE FROM bench WHERE id >= $1 AND id < $2")
            .bind(first + inserts - deletes + s)
            .bind(first + inserts - deletes + e)
            .execute(&mut *conn)
            .await
            .unwrap();
    }
}

/// (rows, sum of amounts) of `bench`, on one kept connection per database:
/// a new backend on every poll would tax the two cores that every system
/// measured here shares.
async fn state(cluster: &PgCluster, db: &str) -> (i64, String) {
    static POOLS: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<String, sqlx::PgPool>>> =
        std::sync::OnceLock::new();
    let url = cluster.url(db);
    let pool = POOLS
        .get_or_init(Default::default)
        .lock()
        .unwrap()
        .entry(url.clone())
        .or_insert_with(|| {
            sqlx::postgres::PgPoolOptions::new().max_connections(2).connect_lazy(&url).expect("a database url")
        })
        .clone();
    sqlx::query_as("SELECT count(*), coalesce(sum(amount), 0)::text FROM bench").fetch_one(&pool).await.unwrap()
}

/// [`mmsync::testbed::wait_for`], polling every 100 ms: the polls' own
/// work stays small beside what is measured (at most 0.1 s on a phase).
async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    mmsync::testbed::wait_every(what, deadline, Duration::from_millis(100), check).await
}

/// Writes the workload on A and returns the seconds until B holds the same rows.
async fn one_way(a: &PgCluster, b: &PgCluster, db: &str, first: i64, n: i64) -> f64 {
    let started = Instant::now();
    let mut conn = a.connect(db).await.unwrap();
    workload(&mut conn, first, n).await;
    let want = state(a, db).await;
    wait_for(&format!("{db}: B to catch up"), Duration::from_secs(3600), || async {
        (state(b, db).await == want).then_some(())
    })
    .await;
    started.elapsed().as_secs_f64()
}

fn rss_peak_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Cumulative bucket counts of a histogram, summed over its series: (upper bound, count).
fn buckets(metrics: &str, name: &str) -> Vec<(f64, f64)> {
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for line in metrics.lines().filter(|l| l.starts_with(&format!("{name}_bucket"))) {
        let Some(le) = line.split("le=\"").nth(1).and_then(|r| r.split('"').next()) else { continue };
        let le = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::NAN) };
        let Some(count) = line.rsplit(' ').next().and_then(|c| c.parse::<f64>().ok()) else { continue };
        match buckets.iter_mut().find(|(l, _)| *l == le) {
            Some(b) => b.1 += count,
            None => buckets.push((le, count)),
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// Percentile of the observations made between two scrapes (upper bound of
/// the bucket that holds it).
fn percentile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let during: Vec<(f64, f64)> =
        after.iter().map(|(le, c)| (*le, c - before.iter().find(|(l, _)| l == le).map_or(0.0, |(_, b)| *b))).collect();
    let total = during.last()?.1;
    during.iter().find(|(_, c)| *c >= q * total).map(|(le, _)| *le)
}

async fn metrics_text(addr: std::net::SocketAddr) -> String {
    mmsync::testbed::http_get(addr, "/metrics").await.unwrap_or_default()
}

/// Writes `rate` changes per second (upserts of 100 random keys per statement) for `secs`.
async fn steady(cluster: &PgCluster, db: &str, rate: u64, secs: u64, offset: i64) {
    let mut conn = cluster.connect(db).await.unwrap();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let per_tick = (rate / 20) as i64;
    let until = Instant::now() + Duration::from_secs(secs);
    let mut i = 0i64;
    while Instant::now() < until {
        tick.tick().await;
        sqlx::query(
            "INSERT INTO bench SELECT $1::int8 + (g * 7919 + $2::int8) % 50000, 'steady', g, now() FROM generate_series(1, $3::int8) g
             ON CONFLICT (id) DO UPDATE SET amount = EXCLUDED.amount, at = now()",
        )
        .bind(offset)
        .bind(i)
        .bind(per_tick)
        .execute(&mut conn)
        .await
        .unwrap();
        i += per_tick;
    }
}

/// pgbench upserts on `table` for `secs` seconds; transactions per second.
fn pgbench(cluster: &PgCluster, db: &str, table: &str, secs: u64, dir: &Path) -> f64 {
    let script = dir.join(format!("{table}.sql"));
    std::fs::write(
        &script,
        format!("\\set id random(1, 100000)\nINSERT INTO {table} VALUES (:id, 1) ON CONFLICT (id) DO UPDATE SET v = {table}.v + 1;\n"),
    )
    .unwrap();
    let secs = secs.to_string();
    run_pgbench(cluster, db, &["-c", "2", "-j", "2", "-T", &secs, "-f", &script.to_string_lossy()])
}

/// Runs pgbench (no vacuum first) on `db` with `args`; transactions per second.
fn run_pgbench(cluster: &PgCluster, db: &str, args: &[&str]) -> f64 {
    let bin = mmsync::testbed::pg_bin_dir().unwrap().join("pgbench");
    let out = std::process::Command::new(bin)
        .args(["-n", "-h", "127.0.0.1", "-U", "postgres"])
        .arg("-p")
        .arg(cluster.port().to_string())
        .args(args)
        .arg(db)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("pgbench said: {text}{}", String::from_utf8_lossy(&out.stderr)))
}

/// The write cost of syncing a table: pgbench upserts on `wc_plain` and on
/// `wc_synced`, alternated twice against noise; (plain tps, synced tps).
fn write_cost(cluster: &PgCluster, db: &str, secs: u64, dir: &Path) -> (f64, f64) {
    let (mut plain, mut synced) = (0.0, 0.0);
    for _ in 0..2 {
        plain += pgbench(cluster, db, "wc_plain", secs, dir) / 2.0;
        synced += pgbench(cluster, db, "wc_synced", secs, dir) / 2.0;
    }
    (plain, synced)
}

fn cost_percent((plain, synced): (f64, f64)) -> f64 {
    (1.0 - synced / plain) * 100.0
}

/// The single-row workload's keys: 40,000,001 to 40,200,000, apart from the
/// other phases' (from 1, 10,000,000, 20,000,000 and 30,000,000).
const SINGLE_FIRST: i64 = 40_000_001;
const SINGLE_KEYS: i64 = 200_000;
/// pgbench clients of the single-row workload.
const SINGLE_CLIENTS: i64 = 4;

/// Transactions of the single-row workload for `n` changes: `n` split across
/// the clients (`-t` is per client).
fn single_row_transactions(n: i64) -> i64 {
    (n / SINGLE_CLIENTS).max(1) * SINGLE_CLIENTS
}

/// The single-row workload on `table`: pgbench, 4 clients, each transaction
/// one row, 90% upserts and 10% deletes of random keys; transactions per second.
fn single_row_pgbench(cluster: &PgCluster, db: &str, table: &str, n: i64, dir: &Path) -> f64 {
    let set = format!("\\set id random({SINGLE_FIRST}, {})\n", SINGLE_FIRST + SINGLE_KEYS - 1);
    let upsert = dir.join(format!("single_upsert_{table}.sql"));
    std::fs::write(
        &upsert,
        format!(
            "{set}INSERT INTO {table} VALUES (:id, 'name', :id * 0.25, now()) \
             ON CONFLICT (id) DO UPDATE SET amount = {table}.amount + 1, at = now();\n"
        ),
    )
    .unwrap();
    let delete = dir.join(format!("single_delete_{table}.sql"));
    std::fs::write(&delete, format!("{set}DELETE FROM {table} WHERE id = :id;\n")).unwrap();
    let per_client = (single_row_transactions(n) / SINGLE_CLIENTS).to_string();
    let clients = SINGLE_CLIENTS.to_string();
    let (upsert, delete) = (format!("{}@9", upsert.display()), format!("{}@1", delete.display()));
    run_pgbench(cluster, db, &["-c", &clients, "-j", "2", "-t", &per_client, "-f", &upsert, "-f", &delete])
}

/// What the single-row workload measured of one system.
#[derive(Clone, Copy)]
struct SingleRow {
    /// pgbench on `bench_plain`, no replicator running.
    tps_plain: f64,
    /// pgbench on `bench`, the replicator running.
    tps_synced: f64,
    /// From pgbench's start until B held what A held.
    one_way_s: f64,
}

impl SingleRow {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({"one_way_s": self.one_way_s, "tps_synced": self.tps_synced, "tps_plain": self.tps_plain})
    }
}

/// The single-row workload on A's `bench` while the replicator runs: waits
/// for A and B to agree (not timed), then runs pgbench; returns its
/// transactions per second and the seconds from its start until B holds what
/// A holds again.
async fn single_row_synced(a: &PgCluster, b: &PgCluster, db: &str, n: i64, dir: &Path) -> (f64, f64) {
    // Both read each time: after mmsync's steady phase, B's own writes may still be on their way to A.
    wait_for(&format!("{db}: A and B to agree before the single-row load"), Duration::from_secs(3600), || async {
        (state(a, db).await == state(b, db).await).then_some(())
    })
    .await;
    let started = Instant::now();
    let tps = single_row_pgbench(a, db, "bench", n, dir);
    let want = state(a, db).await;
    wait_for(&format!("{db}: B to catch up with the single-row load"), Duration::from_secs(3600), || async {
        (state(b, db).await == want).then_some(())
    })
    .await;
    (tps, started.elapsed().as_secs_f64())
}

/// What Debezium measured: seconds, and tps for the write cost.
struct Debezium {
    one_way_s: f64,
    catch_up_s: f64,
    /// Of the catch-up: from starting the worker to its connectors running.
    connect_start_s: f64,
    /// p50, p99, max.
    lag_s: (f64, f64, f64),
    write_cost: (f64, f64),
    rss_peak_kib: u64,
    single: SingleRow,
}

/// Debezium's PostgreSQL source on A and its JDBC sink into B, in one Kafka
/// Connect worker (standalone) on the bed's broker, on databases `dbz`.
///
/// Configured as Debezium documents a PostgreSQL-to-PostgreSQL pipeline:
/// pgoutput, a publication of the two tables, no snapshot (only the workload
/// streams, as for the other rows); the sink upserts, deletes by record key,
/// maps each topic to its source table and leaves B's tables as they are;
/// batches are Debezium's default (500 records, as many as a poll returns).
/// Its PostgreSQL UNNEST inserts (`dialect.postgres.unnest.insert.enabled`)
/// were tried once, at 20,000 changes on a busy machine, and were slower.
/// Deletes travel as delete events alone (`tombstones.on.delete=false`): the
/// sink deletes on those, and a tombstone would only be one more record.
///
/// Lag: a trigger on B notes when each row of the steady load lands
/// (`clock_timestamp()`), against the `now()` of the transaction that wrote
/// it on A; one clock, one machine, so the difference is the lag itself,
/// not a histogram bucket as mmsync's figure is.
async fn debezium(bed: &Bed, n: i64, backlog: i64, secs: u64, dir: &Path) -> Result<Debezium, String> {
    const DB: &str = "dbz";
    let (a, b) = (bed.master("a"), bed.master("b"));
    for c in [a, b] {
        c.create_database(DB).await.map_err(|e| e.to_string())?;
        exec(&mut c.connect(DB).await.unwrap(), TABLE).await;
    }
    let brokers = bed.broker.address();
    connect::create_topics(&brokers, &["dbz.public.bench", "dbz.public.wc_synced"], 1)
        .await
        .map_err(|e| e.to_string())?;
    let source = Connector::new("dbz-source", "io.debezium.connector.postgresql.PostgresConnector")
        .set("tasks.max", 1)
        .set("plugin.name", "pgoutput")
        .set("database.hostname", "127.0.0.1")
        .set("database.port", a.port())
        .set("database.user", "postgres")
        .set("database.dbname", DB)
        .set("topic.prefix", "dbz")
        .set("table.include.list", "public.bench,public.wc_synced")
        .set("slot.name", "dbz_bench")
        .set("publication.name", "dbz_bench")
        .set("publication.autocreate.mode", "filtered")
        .set("snapshot.mode", "no_data")
        .set("tombstones.on.delete", false);
    let sink = Connector::new("dbz-sink", "io.debezium.connector.jdbc.JdbcSinkConnector")
        .set("tasks.max", 1)
        .set("topics", "dbz.public.bench,dbz.public.wc_synced")
        .set("connection.url", format!("jdbc:postgresql://127.0.0.1:{}/{DB}", b.port()))
        .set("connection.username", "postgres")
        .set("connection.password", "")
        .set("insert.mode", "upsert")
        .set("delete.enabled", true)
        .set("primary.key.mode", "record_key")
        .set("schema.evolution", "none")
        .set("collection.name.format", "${source.table}");
    // The single-row workload's rate with no replicator running (nor its slot made yet).
    let single_plain = single_row_pgbench(a, DB, "bench_plain", n, dir);
    let mut worker = KafkaConnect::new(&brokers, &[source, sink], &[]).map_err(|e| e.to_string())?;
    worker.start().await.map_err(|e| e.to_string())?;
    // The slot is made when the source starts; a change written before it is not streamed.
    wait_for("Debezium's slot streaming", Duration::from_secs(120), || async {
        let mut conn = a.connect(DB).await.ok()?;
        let active: Option<bool> =
            sqlx::query_scalar("SELECT active FROM pg_replication_slots WHERE slot_name = 'dbz_bench'")
                .fetch_optional(&mut conn)
                .await
                .ok()?;
        (active == Some(true)).then_some(())
    })
    .await;
    let one_way_s = one_way(a, b, DB, 1, n).await;

    // catch-up: the worker stopped as an operator would, the backlog written, the worker started.
    worker.stop().await.map_err(|e| e.to_string())?;
    workload(&mut a.connect(DB).await.unwrap(), 10_000_000, backlog).await;
    let want = state(a, DB).await;
    let started = Instant::now();
    worker.start().await.map_err(|e| format!("{e}\n{}", worker.log_tail()))?;
    let connect_start_s = started.elapsed().as_secs_f64();
    wait_for("Debezium catch-up", Duration::from_secs(3600), || async { (state(b, DB).await == want).then_some(()) })
        .await;
    let catch_up_s = started.elapsed().as_secs_f64();

    // lag under steady load, one way.
    exec(
        &mut b.connect(DB).await.unwrap(),
        "CREATE TABLE lag_seen (at timestamptz, seen timestamptz);
         CREATE FUNCTION lag_seen() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN INSERT INTO lag_seen VALUES (NEW.at, clock_timestamp()); RETURN NULL; END $$;
         CREATE TRIGGER lag_seen AFTER INSERT OR UPDATE ON bench FOR EACH ROW WHEN (NEW.name = 'steady')
           EXECUTE FUNCTION lag_seen();",
    )
    .await;
    steady(a, DB, 2000, secs, 20_000_000).await;
    let want = state(a, DB).await;
    wait_for("Debezium after the steady load", Duration::from_secs(600), || async {
        (state(b, DB).await == want).then_some(())
    })
    .await;
    let lag_s: (f64, f64, f64) = sqlx::query_as(
        "SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY l), percentile_disc(0.99) WITHIN GROUP (ORDER BY l), max(l)
         FROM (SELECT extract(epoch FROM seen - at)::float8 AS l FROM lag_seen) s",
    )
    .fetch_one(&mut b.connect(DB).await.unwrap())
    .await
    .map_err(|e| format!("the lag of the steady load: {e}"))?;

    let (tps_synced, single_s) = single_row_synced(a, b, DB, n, dir).await;
    let single = SingleRow { tps_plain: single_plain, tps_synced, one_way_s: single_s };
    let write_cost = write_cost(a, DB, secs, dir);
    let rss_peak_kib = worker.pid().map_or(0, rss_peak_kib);
    worker.stop().await.map_err(|e| e.to_string())?;
    Ok(Debezium { one_way_s, catch_up_s, connect_start_s, lag_s, write_cost, rss_peak_kib, single })
}

/// Whether the bed's `postgres` has a setting (`--describe-config` lists them,
/// and runs as root too).
fn pg_knows_setting(name: &str) -> bool {
    let Ok(bin) = mmsync::testbed::pg_bin_dir() else { return false };
    std::process::Command::new(bin.join("postgres"))
        .arg("--describe-config")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).lines().any(|l| l.split('\t').next() == Some(name)))
}

fn pglogical_installed() -> bool {
    mmsync::testbed::pg_bin_dir().is_ok_and(|bin| bin.join("../lib/pglogical.so").exists())
}

#[tokio::main]
async fn main() {
    let n = env_num("MMSYNC_BENCH_CHANGES", 1_000_000) as i64;
    // The catch-up's backlog, for every system (the is 1,000,000).
    let backlog = env_num("MMSYNC_BENCH_BACKLOG", n as u64) as i64;
    let secs = env_num("MMSYNC_BENCH_SECONDS", 20);
    let with_pglogical = pglogical_installed();
    let mut extra = Vec::new();
    if with_pglogical {
        extra.extend([
            "shared_preload_libraries = 'pglogical'".to_string(),
            "track_commit_timestamp = on".into(),
            "pglogical.conflict_resolution = 'last_update_wins'".into(),
        ]);
        // PostgreSQL 15.20 lets only listed libraries be output plugins; an
        // older 15 does not know the setting and refuses to start with it.
        if pg_knows_setting("output_plugin_libraries") {
            extra.push("output_plugin_libraries = 'pgoutput, test_decoding, pglogical_output'".into());
        }
    }
    let bed = Bed::start_with(&["a", "b"], BedKafka::own(), extra).await.expect("bed");
    let (a, b) = (bed.master("a"), bed.master("b"));
    bed.sql_everywhere(TABLE).await.unwrap();
    let topology = bed.write_topology(&["public.bench", "public.wc_synced"], "");
    let bin = Path::new(env!("CARGO_BIN_EXE_mmsync"));
    let (code, out) = mmsync::testbed::run_mmsync(bin, &topology, &["init"], &[]).await;
    assert_eq!(code, 0, "{out}");
    let metrics_addr = mmsync::topology::Topology::load(&topology).unwrap().metrics_listen;
    let log = bed.dir.path().join("mmsync.log");
    let db = mmsync::testbed::BED_DATABASE;

    let dir = bed.dir.path();

    // mmsync: one way, while running.
    let run = MmsyncProcess::spawn(bin, &topology, &["run"], &[], log.clone()).unwrap();
    let pid = run.id().unwrap();
    wait_for("mmsync metrics", Duration::from_secs(60), || async {
        (!metrics_text(metrics_addr).await.is_empty()).then_some(())
    })
    .await;
    let mmsync_one_way = one_way(a, b, db, 1, n).await;
    let rss_one_way = rss_peak_kib(pid);
    // catch-up: a backlog written while mmsync is stopped.
    assert!(run.terminate().await.success());
    let mut conn = a.connect(db).await.unwrap();
    workload(&mut conn, 10_000_000, backlog).await;
    let want = state(a, db).await;
    let run = MmsyncProcess::spawn(bin, &topology, &["run"], &[], log.clone()).unwrap();
    let started = Instant::now();
    wait_for("mmsync catch-up", Duration::from_secs(3600), || async { (state(b, db).await == want).then_some(()) })
        .await;
    let mmsync_catch_up = started.elapsed().as_secs_f64();
    // lag under steady load, both ways.
    let pid = run.id().unwrap();
    const LAG: &str = "mmsync_replication_lag_distribution_seconds";
    // The catch-up above left its (large) lags in the histogram: count only
    // what is observed during the steady phase.
    let before = buckets(&metrics_text(metrics_addr).await, LAG);
    tokio::join!(steady(a, db, 2000, secs, 20_000_000), steady(b, db, 2000, secs, 30_000_000));
    let after = buckets(&metrics_text(metrics_addr).await, LAG);
    let lag = |q| percentile(&before, &after, q);
    let (lag_p50, lag_p99, lag_max) = (lag(0.5), lag(0.99), lag(1.0));
    // and at 10,000 changes/s per master.
    let before = buckets(&metrics_text(metrics_addr).await, LAG);
    tokio::join!(steady(a, db, 10_000, secs, 20_000_000), steady(b, db, 10_000, secs, 30_000_000));
    let after = buckets(&metrics_text(metrics_addr).await, LAG);
    let lag = |q| percentile(&before, &after, q);
    let lag_10k = (lag(0.5), lag(0.99), lag(1.0));
    let rss_steady = rss_peak_kib(pid);
    // single-row transactions on A, mmsync running.
    let (mmsync_single_tps, mmsync_single_s) = single_row_synced(a, b, db, n, dir).await;
    // cost on the master, with mmsync running.
    let cost_running = write_cost(a, db, secs, dir);
    assert!(run.terminate().await.success());
    // The single-row workload on a table without triggers, mmsync stopped.
    let mmsync_single = SingleRow {
        tps_plain: single_row_pgbench(a, db, "bench_plain", n, dir),
        tps_synced: mmsync_single_tps,
        one_way_s: mmsync_single_s,
    };
    // Cost on the master of the triggers and columns alone, mmsync stopped.
    // Last: what it writes waits in A's slot, and a phase after it would
    // first drain that backlog (hundreds of thousands of changes).
    let cost_triggers = write_cost(a, db, secs, dir);

    // Native logical replication, one way, on its own databases.
    for c in [a, b] {
        c.create_database("native").await.unwrap();
        let mut conn = c.connect("native").await.unwrap();
        exec(&mut conn, TABLE).await;
    }
    // The single-row workload with no replicator (no publication, no slot yet).
    let native_single_plain = single_row_pgbench(a, "native", "bench_plain", n, dir);
    exec(&mut a.connect("native").await.unwrap(), "CREATE PUBLICATION bench_pub FOR TABLE bench, wc_synced").await;
    exec(
        &mut b.connect("native").await.unwrap(),
        &format!("CREATE SUBSCRIPTION bench_sub CONNECTION 'host=127.0.0.1 port={} dbname=native user=postgres' PUBLICATION bench_pub", a.port()),
    )
    .await;
    wait_for("native subscription ready", Duration::from_secs(120), || async {
        let mut conn = b.connect("native").await.ok()?;
        let ready: bool = sqlx::query_scalar("SELECT bool_and(srsubstate = 'r') FROM pg_subscription_rel")
            .fetch_one(&mut conn)
            .await
            .ok()?;
        ready.then_some(())
    })
    .await;
    let native_one_way = one_way(a, b, "native", 1, n).await;
    exec(&mut b.connect("native").await.unwrap(), "ALTER SUBSCRIPTION bench_sub DISABLE").await;
    workload(&mut a.connect("native").await.unwrap(), 10_000_000, backlog).await;
    let want = state(a, "native").await;
    let started = Instant::now();
    exec(&mut b.connect("native").await.unwrap(), "ALTER SUBSCRIPTION bench_sub ENABLE").await;
    wait_for("native catch-up", Duration::from_secs(3600), || async {
        (state(b, "native").await == want).then_some(())
    })
    .await;
    let native_catch_up = started.elapsed().as_secs_f64();
    let (tps_synced, one_way_s) = single_row_synced(a, b, "native", n, dir).await;
    let native_single = SingleRow { tps_plain: native_single_plain, tps_synced, one_way_s };
    let native_cost = write_cost(a, "native", secs, dir);

    // pglogical 2, both ways, last_update_wins, forward_origins '{}'.
    let mut pglogical: Option<Pglogical> = None;
    if with_pglogical {
        let dsn = |c: &PgCluster| format!("host=127.0.0.1 port={} dbname=pgl user=postgres", c.port());
        for (name, c) in [("a", a), ("b", b)] {
            c.create_database("pgl").await.unwrap();
            let mut conn = c.connect("pgl").await.unwrap();
            exec(&mut conn, TABLE).await;
            exec(&mut conn, "CREATE EXTENSION pglogical").await;
            exec(&mut conn, &format!("SELECT pglogical.create_node(node_name := '{name}', dsn := '{}')", dsn(c))).await;
            exec(&mut conn, "SELECT pglogical.replication_set_add_table('default', 'bench')").await;
            exec(&mut conn, "SELECT pglogical.replication_set_add_table('default', 'wc_synced')").await;
        }
        // The single-row workload with no replicator (no subscription, no slot yet).
        let single_plain = single_row_pgbench(a, "pgl", "bench_plain", n, dir);
        for (name, sub, provider) in [("b_from_a", b, a), ("a_from_b", a, b)] {
            let mut conn = sub.connect("pgl").await.unwrap();
            exec(
                &mut conn,
                &format!(
                    "SELECT pglogical.create_subscription(subscription_name := '{name}', provider_dsn := '{}', forward_origins := '{{}}', synchronize_data := false)",
                    dsn(provider)
                ),
            )
            .await;
        }
        for c in [a, b] {
            wait_for("pglogical replicating", Duration::from_secs(120), || async {
                let mut conn = c.connect("pgl").await.ok()?;
                let s: String = sqlx::query_scalar("SELECT status FROM pglogical.show_subscription_status()")
                    .fetch_one(&mut conn)
                    .await
                    .ok()?;
                (s == "replicating").then_some(())
            })
            .await;
        }
        let one = one_way(a, b, "pgl", 1, n).await;
        let mut conn = b.connect("pgl").await.unwrap();
        exec(&mut conn, "SELECT pglogical.alter_subscription_disable('b_from_a')").await;
        workload(&mut a.connect("pgl").await.unwrap(), 10_000_000, backlog).await;
        let want = state(a, "pgl").await;
        let started = Instant::now();
        exec(&mut conn, "SELECT pglogical.alter_subscription_enable('b_from_a')").await;
        wait_for("pglogical catch-up", Duration::from_secs(3600), || async {
            (state(b, "pgl").await == want).then_some(())
        })
        .await;
        let catch_up_s = started.elapsed().as_secs_f64();
        let (tps_synced, single_s) = single_row_synced(a, b, "pgl", n, dir).await;
        let single = SingleRow { tps_plain: single_plain, tps_synced, one_way_s: single_s };
        let write_cost = write_cost(a, "pgl", secs, dir);
        pglogical = Some(Pglogical { changes: n, one_way_s: one, catch_up_s, write_cost, single });
    }

    // Debezium, one way, in Kafka Connect.
    let debezium = match (std::env::var("MMSYNC_BENCH_DEBEZIUM").as_deref(), connect::connect_libs()) {
        (Ok("0"), _) => Err("skipped (MMSYNC_BENCH_DEBEZIUM=0)".to_string()),
        (_, Err(e)) => Err(format!("skipped: {e}")),
        (_, Ok(_)) => debezium(&bed, n, backlog, secs, dir).await.map_err(|e| format!("failed: {e}")),
    };
    if let Err(why) = &debezium {
        eprintln!("compare: Debezium {why}");
    }
    let dbz = debezium.as_ref().ok();

    let rate = |s: f64| n as f64 / s;
    let backlog_rate = |s: f64| backlog as f64 / s;
    let single_n = single_row_transactions(n);
    let single_rate = |s: &SingleRow| single_n as f64 / s.one_way_s;
    println!("\nmmsync beside the anchors, {n} changes (40% inserts, 50% updates, 10% deletes), this machine\n");
    println!(
        "| figure | mmsync | native logical replication | pglogical 2 | Debezium (PostgreSQL source, JDBC sink) \
         | mmsync / native | mmsync / pglogical | mmsync / Debezium |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let pgl = |f: fn(&Pglogical) -> f64| pglogical.as_ref().map(f);
    let row = |name: &str, m: f64, nat: f64, p: Option<f64>, d: Option<f64>, unit: &str| {
        let cell = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0} {unit}"));
        let ratio = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.2}", m / v));
        println!(
            "| {name} | {m:.0} {unit} | {nat:.0} {unit} | {} | {} | {:.2} | {} | {} |",
            cell(p),
            cell(d),
            m / nat,
            ratio(p),
            ratio(d)
        );
    };
    row(
        "one-way throughput",
        rate(mmsync_one_way),
        rate(native_one_way),
        pgl(|p| p.rate(p.one_way_s)),
        dbz.map(|d| rate(d.one_way_s)),
        "changes/s",
    );
    row(
        &format!("catch-up of a backlog of {backlog} changes"),
        backlog_rate(mmsync_catch_up),
        backlog_rate(native_catch_up),
        pgl(|p| p.catch_up_s).map(backlog_rate),
        dbz.map(|d| backlog_rate(d.catch_up_s)),
        "changes/s",
    );
    row(
        &format!(
            "one-way throughput, single-row transactions (pgbench, {SINGLE_CLIENTS} clients, {single_n} transactions)"
        ),
        single_rate(&mmsync_single),
        single_rate(&native_single),
        pgl(|p| single_row_transactions(p.changes) as f64 / p.single.one_way_s),
        dbz.map(|d| single_rate(&d.single)),
        "changes/s",
    );
    let fmt = |v: Option<f64>| v.map_or("-".into(), |v| format!("≤ {:.0} ms", v * 1000.0));
    let dbz_lag = dbz.map_or("-".to_string(), |d| {
        let (p50, p99, max) = d.lag_s;
        format!("{:.0} / {:.0} / {:.0} ms (A to B only)", p50 * 1000.0, p99 * 1000.0, max * 1000.0)
    });
    println!(
        "| lag p50 / p99 / max at 2,000 changes/s per master | {} / {} / {} | (one way only) | | {dbz_lag} | | | |",
        fmt(lag_p50),
        fmt(lag_p99),
        fmt(lag_max)
    );
    println!(
        "| lag p50 / p99 / max at 10,000 changes/s per master | {} / {} / {} | | | | | | |",
        fmt(lag_10k.0),
        fmt(lag_10k.1),
        fmt(lag_10k.2)
    );
    let tps =
        |(plain, synced): (f64, f64)| format!("{:.1}% ({synced:.0} vs {plain:.0} tps)", cost_percent((plain, synced)));
    println!(
        "| master write cost, pgbench upserts (2 clients): triggers and columns, replicator stopped | {} | (no triggers) | (no triggers) | (no triggers) | | | |",
        tps(cost_triggers)
    );
    println!(
        "| master write cost, same, replicator running on this machine | {} | {} | {} | {} | | | |",
        tps(cost_running),
        tps(native_cost),
        pglogical.as_ref().map_or("-".into(), |p| tps(p.write_cost)),
        dbz.map_or("-".into(), |d| tps(d.write_cost))
    );
    let while_syncing = |s: &SingleRow| {
        format!("{:.0} vs {:.0} tps ({:+.1}%)", s.tps_synced, s.tps_plain, (s.tps_synced / s.tps_plain - 1.0) * 100.0)
    };
    let tps_ratio = |s: Option<&SingleRow>| {
        s.map_or("-".to_string(), |s| format!("{:.2}", mmsync_single.tps_synced / s.tps_synced))
    };
    println!(
        "| master write rate while syncing, single-row (tps), vs no replication (mmsync: a table without triggers) \
         | {} | {} | {} | {} | {:.2} | {} | {} |",
        while_syncing(&mmsync_single),
        while_syncing(&native_single),
        pglogical.as_ref().map_or("-".into(), |p| while_syncing(&p.single)),
        dbz.map_or("-".into(), |d| while_syncing(&d.single)),
        mmsync_single.tps_synced / native_single.tps_synced,
        tps_ratio(pglogical.as_ref().map(|p| &p.single)),
        tps_ratio(dbz.map(|d| &d.single)),
    );
    println!(
        "| peak RSS of mmsync run (Debezium: of the Connect worker) | {} MiB (one-way), {} MiB (steady) | | | {} | | | |",
        rss_one_way / 1024,
        rss_steady / 1024,
        dbz.map_or("-".into(), |d| format!("{} MiB", d.rss_peak_kib / 1024))
    );
    match &debezium {
        Ok(d) => println!(
            "\nDebezium {} in Kafka Connect {} (standalone, JSON converters with schemas); its catch-up includes \
             {:.1} s from starting the worker to its connectors running.",
            connect::DEBEZIUM_VERSION,
            connect::CONNECT_VERSION,
            d.connect_start_s
        ),
        Err(why) => println!("\nDebezium: {why}"),
    }
    let json = serde_json::json!({
        "changes": n,
        "backlog": backlog,
        "seconds_per_load_phase": secs,
        "single_row": {"transactions": single_n, "clients": SINGLE_CLIENTS, "upserts_percent": 90, "deletes_percent": 10,
                       "first_key": SINGLE_FIRST, "keys": SINGLE_KEYS},
        "mmsync": {"one_way_s": mmsync_one_way, "catch_up_s": mmsync_catch_up, "lag_p50_s": lag_p50, "lag_p99_s": lag_p99, "lag_max_s": lag_max,
                   "lag_10k": {"p50_s": lag_10k.0, "p99_s": lag_10k.1, "max_s": lag_10k.2},
                   "rss_one_way_kib": rss_one_way, "rss_steady_kib": rss_steady, "single_row": mmsync_single.json()},
        "native": {"one_way_s": native_one_way, "catch_up_s": native_catch_up, "single_row": native_single.json()},
        "pglogical": pglogical.as_ref().map(|p| serde_json::json!({"one_way_s": p.one_way_s, "catch_up_s": p.catch_up_s,
                                   "write_cost": {"tps_plain": p.write_cost.0, "tps_synced": p.write_cost.1},
                                   "single_row": p.single.json()})),
        "debezium": match &debezium {
            Ok(d) => serde_json::json!({"version": connect::DEBEZIUM_VERSION, "connect_version": connect::CONNECT_VERSION,
                "one_way_s": d.one_way_s, "catch_up_s": d.catch_up_s, "connect_start_s": d.connect_start_s,
                "lag_p50_s": d.lag_s.0, "lag_p99_s": d.lag_s.1, "lag_max_s": d.lag_s.2,
                "write_cost": {"tps_plain": d.write_cost.0, "tps_synced": d.write_cost.1}, "rss_peak_kib": d.rss_peak_kib,
                "single_row": d.single.json()}),
            Err(why) => serde_json::json!({"measured": false, "why": why}),
        },
        "master_cost": {
            "triggers_only": {"tps_plain": cost_triggers.0, "tps_synced": cost_triggers.1},
            "mmsync_running": {"tps_plain": cost_running.0, "tps_synced": cost_running.1},
            "native_running": {"tps_plain": native_cost.0, "tps_synced": native_cost.1},
        },
    });
    std::fs::create_dir_all("target/bench").unwrap();
    std::fs::write("target/bench/compare.json", serde_json::to_string_pretty(&json).unwrap()).unwrap();
}

/// What pglogical measured.
struct Pglogical {
    /// The bulk phases' changes.
    changes: i64,
    one_way_s: f64,
    catch_up_s: f64,
    write_cost: (f64, f64),
    single: SingleRow,
}

impl Pglogical {
    /// The bulk phases' changes per second, over `secs`.
    fn rate(&self, secs: f64) -> f64 {
        self.changes as f64 / secs
    }
}
