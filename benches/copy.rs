//! The copy of `mmsync join` beside `pg_dump | psql` and native logical
//! replication's initial copy (`copy_data = true`): one table of
//! MMSYNC_BENCH_ROWS rows (default 1,000,000, about 60 B of data each) from
//! master A to an empty B, on this machine's test bed (PostgreSQL 15
//! clusters, Apache Kafka, the release `mmsync` binary).
//!
//! `cargo bench --bench copy`. Prints rows/s, MB/s (of A's table on disk)
//! and, for `mmsync join`, its peak resident memory; writes
//! target/bench/copy.json.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use mmsync::testbed::{pg_bin_dir, wait_for, Bed, BedKafka, MmsyncProcess, PgCluster};

const TABLE: &str =
    "CREATE TABLE copy_bench (id bigint PRIMARY KEY, name text NOT NULL, amount numeric(12,2), at timestamptz)";
const FILL: &str = "INSERT INTO copy_bench SELECT i, 'name ' || i, i * 0.25, now() FROM generate_series(1, $1::int8) i";

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

async fn exec(cluster: &PgCluster, db: &str, sql: &str) {
    let mut conn = cluster.connect(db).await.unwrap();
    sqlx::raw_sql(sql).execute(&mut conn).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn fill(cluster: &PgCluster, db: &str, rows: i64) {
    let mut conn = cluster.connect(db).await.unwrap();
    sqlx::query(FILL).bind(rows).execute(&mut conn).await.unwrap();
    sqlx::raw_sql("VACUUM ANALYZE copy_bench").execute(&mut conn).await.unwrap();
}

async fn count(cluster: &PgCluster, db: &str) -> i64 {
    let mut conn = cluster.connect(db).await.unwrap();
    sqlx::query_scalar("SELECT count(*) FROM copy_bench").fetch_one(&mut conn).await.unwrap()
}

async fn table_mb(cluster: &PgCluster, db: &str) -> f64 {
    let mut conn = cluster.connect(db).await.unwrap();
    let bytes: i64 = sqlx::query_scalar("SELECT pg_relation_size('copy_bench')").fetch_one(&mut conn).await.unwrap();
    bytes as f64 / 1e6
}

struct Figure {
    name: &'static str,
    seconds: f64,
    peak_rss_mib: Option<f64>,
}

#[tokio::main]
async fn main() {
    let rows = env_num("MMSYNC_BENCH_ROWS", 1_000_000) as i64;
    let bed = Bed::start(&["a", "b"], BedKafka::own()).await.expect("bed");
    let (a, b) = (bed.master("a"), bed.master("b"));
    let db = mmsync::testbed::BED_DATABASE;
    let bin = Path::new(env!("CARGO_BIN_EXE_mmsync"));
    let mut figures = Vec::new();

    // mmsync join: the rows are written after init, so they carry origin and version.
    bed.sql_everywhere(TABLE).await.unwrap();
    let topology = bed.write_topology(&["public.copy_bench"], "");
    let (code, out) = mmsync::testbed::run_mmsync(bin, &topology, &["init"], &[]).await;
    assert_eq!(code, 0, "{out}");
    fill(a, db, rows).await;
    let mb = table_mb(a, db).await;
    let log = bed.dir.path().join("join.log");
    let started = Instant::now();
    let join =
        MmsyncProcess::spawn(bin, &topology, &["join", "--master", "b", "--from", "a"], &[], log.clone()).unwrap();
    let pid = join.id().unwrap();
    let mut peak = 0;
    let sampling = async {
        loop {
            peak = peak.max(mmsync::testbed::peak_rss_kib(pid));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let status = tokio::select! {
        status = join.wait() => status,
        _ = sampling => unreachable!(),
    };
    let seconds = started.elapsed().as_secs_f64();
    assert!(status.success(), "{}", std::fs::read_to_string(&log).unwrap_or_default());
    assert_eq!(count(b, db).await, rows);
    figures.push(Figure { name: "mmsync join", seconds, peak_rss_mib: Some(peak as f64 / 1024.0) });

    // pg_dump | psql, table only, into an empty table.
    for c in [a, b] {
        c.create_database("dump").await.unwrap();
    }
    exec(a, "dump", TABLE).await;
    fill(a, "dump", rows).await;
    exec(b, "dump", TABLE).await;
    let bin_dir = pg_bin_dir().unwrap();
    let started = Instant::now();
    let mut dump = std::process::Command::new(bin_dir.join("pg_dump"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &a.port().to_string(),
            "-U",
            "postgres",
            "--data-only",
            "-t",
            "copy_bench",
            "dump",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let restore = std::process::Command::new(bin_dir.join("psql"))
        .args([
            "-q",
            "-h",
            "127.0.0.1",
            "-p",
            &b.port().to_string(),
            "-U",
            "postgres",
            "-d",
            "dump",
            "-v",
            "ON_ERROR_STOP=1",
        ])
        .stdin(dump.stdout.take().unwrap())
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(dump.wait().unwrap().success() && restore.success());
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(count(b, "dump").await, rows);
    figures.push(Figure { name: "pg_dump | psql", seconds, peak_rss_mib: None });

    // Native logical replication's initial copy.
    for c in [a, b] {
        c.create_database("native").await.unwrap();
        exec(c, "native", TABLE).await;
    }
    fill(a, "native", rows).await;
    exec(a, "native", "CREATE PUBLICATION copy_pub FOR TABLE copy_bench").await;
    let started = Instant::now();
    exec(
        b,
        "native",
        &format!(
            "CREATE SUBSCRIPTION copy_sub CONNECTION 'host=127.0.0.1 port={} dbname=native user=postgres' \
             PUBLICATION copy_pub WITH (copy_data = true)",
            a.port()
        ),
    )
    .await;
    wait_for("the native initial copy", Duration::from_secs(3600), || async {
        let mut conn = b.connect("native").await.ok()?;
        let ready: Option<bool> = sqlx::query_scalar("SELECT bool_and(srsubstate = 'r') FROM pg_subscription_rel")
            .fetch_one(&mut conn)
            .await
            .ok()?;
        ready.unwrap_or(false).then_some(())
    })
    .await;
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(count(b, "native").await, rows);
    figures.push(Figure { name: "native copy_data", seconds, peak_rss_mib: None });

    println!("\ncopy of {rows} rows, {mb:.1} MB on disk (A's table), {}", chrono_free_date());
    println!("{:<20} {:>10} {:>12} {:>10} {:>14}", "system", "seconds", "rows/s", "MB/s", "peak RSS MiB");
    let mut json = Vec::new();
    for f in &figures {
        let rate = rows as f64 / f.seconds;
        println!(
            "{:<20} {:>10.1} {:>12.0} {:>10.1} {:>14}",
            f.name,
            f.seconds,
            rate,
            mb / f.seconds,
            f.peak_rss_mib.map_or("-".to_string(), |m| format!("{m:.0}"))
        );
        json.push(serde_json::json!({
            "system": f.name, "seconds": f.seconds, "rows_per_s": rate, "mb_per_s": mb / f.seconds,
            "peak_rss_mib": f.peak_rss_mib,
        }));
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    let all = serde_json::json!({ "rows": rows, "table_mb": mb, "figures": json });
    std::fs::write(dir.join("copy.json"), serde_json::to_string_pretty(&all).unwrap()).unwrap();
}

/// Today's date from `date`, for the printout.
fn chrono_free_date() -> String {
    std::process::Command::new("date")
        .arg("+%Y-%m-%d")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
