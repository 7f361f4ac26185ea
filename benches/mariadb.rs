//! MariaDB masters: how fast mmsync drains a backlog of MMSYNC_BENCH_CHANGES
//! inserts (default 100,000, about 60 B of data each) from one master into
//! another, MariaDB to MariaDB beside MariaDB's own replication (a GTID
//! replica catching up the same backlog), and between PostgreSQL and
//! MariaDB both ways, on this machine's test bed (MariaDB 10.11, PostgreSQL
//! 15, Apache Kafka, the release `mmsync` binary).
//!
//! A backlog, not a live load: the rows are written while the replicator is
//! stopped, then it starts and the clock runs until the target holds them
//! all. That measures the replicator, not how fast the bench can write.
//!
//! Both ways too: half the backlog written on each master, mmsync beside
//! two MariaDB servers replicating from each other (`log_slave_updates`,
//! `gtid_ignore_duplicates`). Where one source drains, how soon Kafka held
//! every change (capture alone) is measured too.
//!
//! `cargo bench --bench mariadb`. Prints changes/s and mmsync's peak resident
//! memory; writes target/bench/mariadb.json.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mmsync::testbed::mariadb::MariaDb;
use mmsync::testbed::{run_mmsync, wait_for, KafkaCluster, MmsyncProcess, PgCluster, PgOptions};
use mysql_async::prelude::Queryable;

const DB: &str = "shop";
const MARIA_TABLE: &str = "CREATE TABLE bench (id BIGINT PRIMARY KEY, name VARCHAR(64) NOT NULL,
    amount DECIMAL(12,2), at DATETIME(6)) ENGINE = InnoDB";
const PG_TABLE: &str =
    "CREATE TABLE bench (id bigint PRIMARY KEY, name varchar(64) NOT NULL, amount numeric(12,2), at timestamptz)";
/// How long one phase may take.
const DEADLINE: Duration = Duration::from_secs(1800);

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A master of either kind, as the bench writes to and counts on it.
enum Master<'a> {
    Maria(&'a MariaDb),
    Pg(&'a PgCluster),
}

impl Master<'_> {
    fn url(&self) -> String {
        match self {
            Master::Maria(m) => m.url(DB),
            Master::Pg(c) => c.url(DB),
        }
    }

    /// Inserts ids `from..from + n`, 1,000 rows a statement and transaction.
    async fn fill(&self, from: u64, n: u64) {
        match self {
            Master::Maria(m) => {
                let mut conn = mysql_async::Conn::from_url(m.app_url(DB)).await.unwrap();
                for start in (from..from + n).step_by(1000) {
                    let rows: Vec<String> = (start..(start + 1000).min(from + n))
                        .map(|i| format!("({i}, 'name {i}', {i} * 0.25, UTC_TIMESTAMP(6))"))
                        .collect();
                    let sql = format!("INSERT INTO bench (id, name, amount, at) VALUES {}", rows.join(", "));
                    conn.query_drop(sql).await.unwrap();
                }
            }
            Master::Pg(c) => {
                let mut conn = c.connect(DB).await.unwrap();
                for start in (from..from + n).step_by(1000) {
                    let end = (start + 1000).min(from + n) - 1;
                    sqlx::raw_sql(&format!(
                        "INSERT INTO bench SELECT i, 'name ' || i, i * 0.25, now() FROM generate_series({start}, {end}) i"
                    ))
                    .execute(&mut conn)
                    .await
                    .unwrap();
                }
            }
        }
    }

    async fn count(&self) -> u64 {
        match self {
            Master::Maria(m) => {
                let out = m.sql(&format!("SELECT count(*) FROM {DB}.bench")).await.unwrap();
                out.trim().parse().unwrap()
            }
            Master::Pg(c) => {
                let mut conn = c.connect(DB).await.unwrap();
                let n: i64 = sqlx::query_scalar("SELECT count(*) FROM bench").fetch_one(&mut conn).await.unwrap();
                n as u64
            }
        }
    }
}

/// Writes a topology of `masters` syncing `public.bench`; returns its path.
fn topology(dir: &Path, name: &str, broker: &KafkaCluster, masters: &[(&str, &Master<'_>)]) -> PathBuf {
    let mut text = format!(
        "[kafka]\nbrokers = \"{}\"\ntopic_prefix = \"bench-{name}\"\npartitions = 3\nreplication_factor = 1\n\n\
         [metrics]\nlisten = \"127.0.0.1:{}\"\n\n",
        broker.address(),
        mmsync::testbed::free_port()
    );
    for (name, m) in masters {
        text.push_str(&format!("[[masters]]\nname = \"{name}\"\nurl = \"{}\"\n\n", m.url()));
    }
    text.push_str("[sync]\ntables = [\"public.bench\"]\n");
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

struct Figure {
    name: String,
    /// Changes the phase moved.
    changes: u64,
    seconds: f64,
    /// Until Kafka held every change (mmsync's capture alone), where measured.
    capture_seconds: Option<f64>,
    peak_rss_mib: Option<f64>,
}

/// Records in `topic` (3 partitions), from its watermarks.
fn records(broker: &KafkaCluster, topic: &str) -> u64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", broker.address()).create().unwrap();
    (0..3)
        .filter_map(|p| consumer.fetch_watermarks(topic, p, Duration::from_secs(10)).ok())
        .map(|(low, high)| (high - low) as u64)
        .sum()
}

/// Starts `mmsync run` on `topology` and times it until every target holds
/// its rows; with `captured` = (broker, topic, records), also until that
/// topic holds that many records.
async fn drain(
    topology: &Path,
    dir: &Path,
    targets: &[(&Master<'_>, u64)],
    captured: Option<(&KafkaCluster, &str, u64)>,
    name: &str,
) -> Figure {
    let bin = Path::new(env!("CARGO_BIN_EXE_mmsync"));
    let log = dir.join(format!("{name}.log"));
    let started = Instant::now();
    let run = MmsyncProcess::spawn(bin, topology, &["run"], &[], log.clone()).unwrap();
    let pid = run.id().unwrap();
    let mut peak = 0;
    let mut capture_seconds = None;
    loop {
        peak = peak.max(mmsync::testbed::peak_rss_kib(pid));
        if let Some((broker, topic, n)) = captured.filter(|_| capture_seconds.is_none()) {
            if records(broker, topic) >= n {
                capture_seconds = Some(started.elapsed().as_secs_f64());
            }
        }
        let mut done = true;
        for (target, rows) in targets {
            done &= target.count().await >= *rows;
        }
        if done && (captured.is_none() || capture_seconds.is_some()) {
            break;
        }
        assert!(started.elapsed() < DEADLINE, "{name}: {}", std::fs::read_to_string(&log).unwrap_or_default());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let status = run.terminate().await;
    assert!(status.success(), "{}", std::fs::read_to_string(&log).unwrap_or_default());
    Figure { name: name.into(), changes: 0, seconds, capture_seconds, peak_rss_mib: Some(peak as f64 / 1024.0) }
}

/// A server of MariaDB's own two-way replication: binlogs what it applies,
/// and drops what comes back to it.
async fn native_master(id: u32, place: usize) -> MariaDb {
    let m = MariaDb::start_with(id, &["--log-slave-updates=ON", "--gtid-ignore-duplicates=ON"]).await.unwrap();
    m.prepare_master(DB, 2, place).await.unwrap();
    m.sql(&format!("USE {DB}; {MARIA_TABLE}")).await.unwrap();
    m
}

#[tokio::main]
async fn main() {
    let n = env_num("MMSYNC_BENCH_CHANGES", 100_000);
    let broker: Arc<KafkaCluster> = KafkaCluster::shared().await.expect("kafka");
    let dir = tempfile::tempdir().unwrap();
    let bin = Path::new(env!("CARGO_BIN_EXE_mmsync"));
    let mut figures = Vec::new();

    // MariaDB -> MariaDB by mmsync.
    let (seoul, busan) = (MariaDb::start(1).await.unwrap(), MariaDb::start(2).await.unwrap());
    seoul.prepare_master(DB, 2, 1).await.unwrap();
    busan.prepare_master(DB, 2, 2).await.unwrap();
    for m in [&seoul, &busan] {
        m.sql(&format!("USE {DB}; {MARIA_TABLE}")).await.unwrap();
    }
    let (a, b) = (Master::Maria(&seoul), Master::Maria(&busan));
    let pair = topology(dir.path(), "pair", &broker, &[("seoul", &a), ("busan", &b)]);
    let (code, out) = run_mmsync(bin, &pair, &["init"], &[]).await;
    assert_eq!(code, 0, "{out}");
    a.fill(1, n).await;
    let topic = "bench-pair.seoul.public.bench".to_string();
    let mut f = drain(&pair, dir.path(), &[(&b, n)], Some((&broker, &topic, n)), "mmsync, MariaDB to MariaDB").await;
    f.changes = n;
    figures.push(f);
    // Both ways at once: half the backlog written on each.
    a.fill(n + 1, n / 2).await;
    b.fill(2 * n + 1, n - n / 2).await;
    let mut f = drain(&pair, dir.path(), &[(&a, 2 * n), (&b, 2 * n)], None, "mmsync, MariaDB both ways").await;
    f.changes = n;
    figures.push(f);

    // MariaDB's own replication: a GTID replica of seoul, stopped while the
    // same backlog is written, then started.
    let replica = MariaDb::start(3).await.unwrap();
    let create = seoul.sql(&format!("SHOW CREATE TABLE {DB}.bench")).await.unwrap();
    let create = create.split_once('\t').unwrap().1.replace("\\n", "\n");
    replica.sql(&format!("CREATE DATABASE {DB}; USE {DB}; {create}")).await.unwrap();
    let pos = seoul.sql("SELECT @@gtid_binlog_pos").await.unwrap();
    replica.replicate_from(&seoul, pos.trim()).await.unwrap();
    a.fill(3 * n + 1, n).await;
    let started = Instant::now();
    replica.sql("START SLAVE").await.unwrap();
    let target = Master::Maria(&replica);
    wait_for("the replica to catch up", DEADLINE, || async { (target.count().await >= n).then_some(()) }).await;
    figures.push(Figure {
        name: "MariaDB replication (GTID replica)".into(),
        changes: n,
        seconds: started.elapsed().as_secs_f64(),
        capture_seconds: None,
        peak_rss_mib: None,
    });
    // And both ways: two servers replicating from each other
    // (log_slave_updates, gtid_ignore_duplicates), half the backlog on each.
    let (x, y) = (native_master(5, 1).await, native_master(6, 2).await);
    // Each from where the other stands now (their setup is not replayed).
    let (x_pos, y_pos) =
        (x.sql("SELECT @@gtid_binlog_pos").await.unwrap(), y.sql("SELECT @@gtid_binlog_pos").await.unwrap());
    x.replicate_from(&y, y_pos.trim()).await.unwrap();
    y.replicate_from(&x, x_pos.trim()).await.unwrap();
    let (mx, my) = (Master::Maria(&x), Master::Maria(&y));
    mx.fill(1, n / 2).await;
    my.fill(n + 1, n - n / 2).await;
    let started = Instant::now();
    x.sql("START SLAVE").await.unwrap();
    y.sql("START SLAVE").await.unwrap();
    wait_for("both to catch up", DEADLINE, || async { (mx.count().await >= n && my.count().await >= n).then_some(()) })
        .await;
    figures.push(Figure {
        name: "MariaDB replication, both ways".into(),
        changes: n,
        seconds: started.elapsed().as_secs_f64(),
        capture_seconds: None,
        peak_rss_mib: None,
    });

    // PostgreSQL -> MariaDB and back, by mmsync.
    let pg = PgCluster::start(PgOptions::default()).await.unwrap();
    pg.create_database(DB).await.unwrap();
    sqlx::raw_sql(PG_TABLE).execute(&mut pg.connect(DB).await.unwrap()).await.unwrap();
    let jeju = MariaDb::start(4).await.unwrap();
    jeju.prepare_master(DB, 2, 2).await.unwrap();
    jeju.sql(&format!("USE {DB}; {MARIA_TABLE}")).await.unwrap();
    let (p, j) = (Master::Pg(&pg), Master::Maria(&jeju));
    let mixed = topology(dir.path(), "mixed", &broker, &[("pg", &p), ("jeju", &j)]);
    let (code, out) = run_mmsync(bin, &mixed, &["init"], &[]).await;
    assert_eq!(code, 0, "{out}");
    p.fill(1, n).await;
    let mut f = drain(&mixed, dir.path(), &[(&j, n)], None, "mmsync, PostgreSQL to MariaDB").await;
    f.changes = n;
    figures.push(f);
    j.fill(n + 1, n).await;
    let topic = "bench-mixed.jeju.public.bench".to_string();
    let mut f =
        drain(&mixed, dir.path(), &[(&p, 2 * n)], Some((&broker, &topic, n)), "mmsync, MariaDB to PostgreSQL").await;
    f.changes = n;
    figures.push(f);

    let date = std::process::Command::new("date").arg("+%Y-%m-%d").output().unwrap();
    println!("\nbacklog of {n} inserts drained, {}", String::from_utf8_lossy(&date.stdout).trim());
    println!(
        "{:<36} {:>10} {:>12} {:>18} {:>14}",
        "system", "seconds", "changes/s", "captured/s (Kafka)", "peak RSS MiB"
    );
    let mut json = Vec::new();
    for f in &figures {
        let rate = f.changes as f64 / f.seconds;
        let capture = f.capture_seconds.map(|c| f.changes as f64 / c);
        let rss = f.peak_rss_mib.map_or("-".to_string(), |r| format!("{r:.0}"));
        let cap = capture.map_or("-".to_string(), |c| format!("{c:.0}"));
        println!("{:<36} {:>10.2} {:>12.0} {:>18} {:>14}", f.name, f.seconds, rate, cap, rss);
        json.push(serde_json::json!({"system": f.name, "changes": f.changes, "seconds": f.seconds,
            "changes_per_s": rate, "captured_per_s": capture, "peak_rss_mib": f.peak_rss_mib}));
    }
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    let all = serde_json::json!({ "changes": n, "figures": json });
    std::fs::write(out.join("mariadb.json"), serde_json::to_string_pretty(&all).unwrap()).unwrap();
}
