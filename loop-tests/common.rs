//! What the loop-tests share: a synced bed, the mmsync process, reading rows,
//! metrics and Kafka records.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use mmsync::testbed::{wait_for, Bed, BedKafka, MmsyncProcess, BED_DATABASE};
use mmsync::topology::Topology;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sqlx::PgConnection;

/// How long any condition in these tests may take to become true.
pub const DEADLINE: Duration = Duration::from_secs(90);

/// A bed with tables created, `mmsync init` done, and optionally `mmsync run`.
pub struct Synced {
    pub bed: Bed,
    pub topology: PathBuf,
    pub run: Option<MmsyncProcess>,
    runs: usize,
}

/// Runs `mmsync <args>` to completion; returns (exit code, output).
pub async fn mmsync(topology: &std::path::Path, args: &[&str]) -> (i32, String) {
    mmsync::testbed::run_mmsync(std::path::Path::new(env!("CARGO_BIN_EXE_mmsync")), topology, args, &[]).await
}

impl Synced {
    /// Starts masters and broker, creates the schema on every master, runs init.
    pub async fn new(masters: &[&str], kafka: BedKafka, schema: &str, tables: &[&str], extra_sync: &str) -> Synced {
        Synced::with_partitions(masters, kafka, schema, tables, extra_sync, None).await
    }

    /// Like [`Synced::new`], with this many partitions per topic instead of the bed's.
    pub async fn with_partitions(
        masters: &[&str],
        kafka: BedKafka,
        schema: &str,
        tables: &[&str],
        extra_sync: &str,
        partitions: Option<u32>,
    ) -> Synced {
        let bed = Bed::start(masters, kafka).await.expect("bed starts");
        bed.sql_everywhere(schema).await.expect("schema");
        let topology = bed.write_topology(tables, extra_sync);
        if let Some(n) = partitions {
            let text = std::fs::read_to_string(&topology).unwrap();
            assert!(text.contains("\npartitions = "), "{text}");
            let text: Vec<String> = text
                .lines()
                .map(|l| if l.starts_with("partitions = ") { format!("partitions = {n}") } else { l.to_string() })
                .collect();
            std::fs::write(&topology, text.join("\n")).unwrap();
        }
        let (code, out) = mmsync(&topology, &["init"]).await;
        assert_eq!(code, 0, "init failed: {out}");
        Synced { bed, topology, run: None, runs: 0 }
    }

    pub fn topology(&self) -> Topology {
        Topology::load(&self.topology).expect("the bed writes valid topologies")
    }

    /// Starts `mmsync run` in the background.
    pub fn start(&mut self) {
        self.start_with_env(&[]);
    }

    /// Starts `mmsync run` in the background with extra environment variables.
    pub fn start_with_env(&mut self, env: &[(&str, &str)]) {
        assert!(self.run.is_none(), "mmsync is already running");
        self.runs += 1;
        let log = self.bed.dir.path().join(format!("mmsync-run-{}.log", self.runs));
        self.run = Some(
            MmsyncProcess::spawn(
                std::path::Path::new(env!("CARGO_BIN_EXE_mmsync")),
                &self.topology,
                &["run"],
                env,
                log,
            )
            .expect("mmsync starts"),
        );
    }

    /// SIGTERM, and the exit must be clean.
    pub async fn stop(&mut self) {
        let run = self.run.take().expect("mmsync is running");
        let log_path = run.log();
        let status = run.terminate().await;
        assert!(status.success(), "mmsync run exited with {status}; log:\n{log_path}");
    }

    /// SIGKILL, as a crash would.
    pub async fn kill(&mut self) {
        self.run.take().expect("mmsync is running").kill().await;
    }

    /// Waits until mmsync exits by itself; returns its status and log.
    pub async fn exited(&mut self) -> (std::process::ExitStatus, String) {
        let run = self.run.take().expect("mmsync is running");
        let log = run.log_path();
        let status = tokio::time::timeout(DEADLINE, run.wait()).await.unwrap_or_else(|_| {
            panic!("mmsync did not exit; log:\n{}", std::fs::read_to_string(&log).unwrap_or_default())
        });
        (status, std::fs::read_to_string(log).unwrap_or_default())
    }

    pub fn log(&self) -> String {
        self.run.as_ref().map(|r| r.log()).unwrap_or_default()
    }

    pub async fn conn(&self, master: &str) -> PgConnection {
        self.bed.master(master).connect(BED_DATABASE).await.expect("master answers")
    }

    /// Every row of a table as JSON text, ordered by its primary key text.
    pub async fn rows(&self, master: &str, table: &str) -> Vec<String> {
        let mut conn = self.conn(master).await;
        sqlx::query_scalar(&format!("SELECT to_jsonb(whole_row)::text FROM {table} whole_row ORDER BY 1"))
            .fetch_all(&mut conn)
            .await
            .expect("rows")
    }

    /// Waits until every master holds the same rows of `table`; returns them.
    pub async fn converged(&self, table: &str) -> Vec<String> {
        let names: Vec<String> = self.bed.masters.iter().map(|(n, _)| n.clone()).collect();
        let mut last = BTreeMap::new();
        let result = tokio::time::timeout(DEADLINE, async {
            loop {
                let mut all = BTreeMap::new();
                for n in &names {
                    all.insert(n.clone(), self.rows(n, table).await);
                }
                let first = all.values().next().unwrap().clone();
                if all.values().all(|r| *r == first) {
                    return first;
                }
                last = all;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        match result {
            Ok(rows) => rows,
            Err(_) => {
                let diff: Vec<String> = last.iter().map(|(n, r)| format!("{n}: {} rows", r.len())).collect();
                panic!("masters did not converge on {table} within {DEADLINE:?}: {diff:?}\nmmsync log:\n{}", self.log())
            }
        }
    }

    /// The metrics endpoint's text.
    pub async fn metrics(&self) -> String {
        mmsync::testbed::http_get(self.topology().metrics_listen, "/metrics").await.expect("metrics endpoint answers")
    }

    /// The sum of a metric's samples whose labels contain all of `labels`.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_sum(&self.metrics().await, name, labels)
    }

    pub async fn wait_metric(&self, name: &str, labels: &[(&str, &str)], at_least: f64) -> f64 {
        wait_for(&format!("{name}{labels:?} >= {at_least}"), DEADLINE, || async {
            let addr = self.topology().metrics_listen;
            tokio::net::TcpStream::connect(addr).await.ok()?;
            let v = self.metric(name, labels).await;
            (v >= at_least).then_some(v)
        })
        .await
    }

    /// Every record of a topic, read from the beginning until `count` arrived.
    pub fn records(&self, topic: &str, count: usize) -> Vec<Record> {
        self.records_until(topic, &format!("{count} records"), |r| r.len() >= count)
    }

    /// Records of a topic from the beginning, until `enough` says so.
    pub fn records_until(&self, topic: &str, what: &str, enough: impl Fn(&[Record]) -> bool) -> Vec<Record> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.bed.broker.address())
            .set("group.id", "loop-tests")
            .set("fetch.wait.max.ms", "20")
            .create()
            .unwrap();
        let partitions = mmsync::kafka::partitions(&consumer, topic).unwrap().expect("topic exists");
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let mut out: Vec<Record> = Vec::new();
        let start = std::time::Instant::now();
        while !enough(&out) {
            if start.elapsed() > DEADLINE {
                let mut last: BTreeMap<i32, (usize, i64)> = BTreeMap::new();
                for r in &out {
                    let e = last.entry(r.partition).or_insert((0, -1));
                    *e = (e.0 + 1, e.1.max(r.offset));
                }
                panic!(
                    "waited in vain for {what} on {topic}: {} records; per partition (count, last offset): {last:?}",
                    out.len()
                );
            }
            if let Some(Ok(msg)) = consumer.poll(Duration::from_millis(100)) {
                let headers = msg
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                (h.key.to_string(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned())
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(Record {
                    partition: msg.partition(),
                    offset: msg.offset(),
                    key: String::from_utf8_lossy(msg.key().unwrap_or_default()).into_owned(),
                    value: serde_json::from_slice(msg.payload().unwrap_or_default()).expect("JSON envelope"),
                    headers,
                });
            }
        }
        out
    }
}

/// A Kafka record as the tests see it.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: String,
    pub value: serde_json::Value,
    pub headers: BTreeMap<String, String>,
}

/// Sums the samples of `name` in Prometheus text whose labels include `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            if metric != name {
                return None;
            }
            labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// A small deterministic random generator (xorshift64*), so a failing run can
/// be repeated from its printed seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A seed from the environment (`MMSYNC_SEED`) or the clock, printed so a
/// failure can be replayed.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("MMSYNC_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    eprintln!("{test}: MMSYNC_SEED={seed}");
    seed
}

/// One write acknowledged by a master, with the stamp it got.
#[derive(Debug, Clone)]
pub struct Written {
    pub id: i32,
    pub version: i64,
    pub origin: String,
    /// The whole row the master held after the write, `val|n|md5(doc)`
    /// (what RETURNING saw); `None` for a delete.
    pub value: Option<String>,
}

/// The table the conflict tests write to. `doc` is a large value stored out
/// of line, so updates that leave it alone reach pgoutput without it.
pub const KV: &str = "
CREATE TABLE kv (id int PRIMARY KEY, val text NOT NULL, n int NOT NULL, doc text NOT NULL DEFAULT '');
ALTER TABLE kv ALTER COLUMN doc SET STORAGE EXTERNAL;
";

/// What RETURNING gives for the model: the stamp and the whole row.
const RETURNING: &str = "RETURNING mmsync_version, mmsync_origin::text, concat_ws('|', val, n, md5(doc))";

/// A write whose outcome is unknown: the connection failed while it ran.
#[derive(Debug, Clone)]
pub struct Uncertain {
    pub id: i32,
    /// `None` for a delete.
    pub val: Option<String>,
}

/// One random write on keys `0..keys`: an insert or update of the whole row
/// (a new 3,200-byte doc), an update that leaves the doc alone, an update of
/// the doc alone, a key change (the row moves to a free key, doc untouched),
/// or a delete. Returns what the master acknowledged (nothing for an update
/// or delete of a missing key; two writes for a key change: a delete of the
/// old key and the row under the new one, with one stamp).
pub async fn write_once(
    conn: &mut PgConnection,
    master: &str,
    i: usize,
    rng: &mut Rng,
    keys: u64,
) -> Result<Vec<Written>, Vec<Uncertain>> {
    write_once_from(conn, master, i, rng, 0, keys).await
}

/// [`write_once`] on keys `first..first + keys`.
pub async fn write_once_from(
    conn: &mut PgConnection,
    master: &str,
    i: usize,
    rng: &mut Rng,
    first: i32,
    keys: u64,
) -> Result<Vec<Written>, Vec<Uncertain>> {
    let id = first + rng.below(keys) as i32;
    let val = format!("{master}-{i}");
    let n = rng.below(1000) as i32;
    let kind = rng.below(20);
    let uncertain = |val: Option<&String>| vec![Uncertain { id, val: val.cloned() }];
    let row = |(version, origin, value): (i64, String, String)| Written { id, version, origin, value: Some(value) };
    let update = |set: &str| format!("UPDATE kv SET {set} WHERE id = $1 {RETURNING}");
    let stamped: Option<(i64, String, String)> = match kind {
        0..=5 => Some(
            sqlx::query_as(&format!(
                "INSERT INTO kv VALUES ($1, $2, $3, repeat(md5($2), 100))
                 ON CONFLICT (id) DO UPDATE SET val = EXCLUDED.val, n = EXCLUDED.n, doc = EXCLUDED.doc {RETURNING}"
            ))
            .bind(id)
            .bind(&val)
            .bind(n)
            .fetch_one(&mut *conn)
            .await
            .map_err(|_| uncertain(Some(&val)))?,
        ),
        6..=10 => sqlx::query_as(&update("val = $2, n = $3"))
            .bind(id)
            .bind(&val)
            .bind(n)
            .fetch_optional(&mut *conn)
            .await
            .map_err(|_| uncertain(Some(&val)))?,
        11..=12 => sqlx::query_as(&update("val = $2, doc = repeat(md5($2), 100)"))
            .bind(id)
            .bind(&val)
            .fetch_optional(&mut *conn)
            .await
            .map_err(|_| uncertain(Some(&val)))?,
        13..=15 => {
            let to = first + rng.below(keys) as i32;
            let moved: Result<Option<(i64, String, String)>, sqlx::Error> = sqlx::query_as(&format!(
                "UPDATE kv SET id = $2, val = $3 WHERE id = $1 AND NOT EXISTS (SELECT 1 FROM kv WHERE id = $2) {RETURNING}"
            ))
            .bind(id)
            .bind(to)
            .bind(&val)
            .fetch_optional(&mut *conn)
            .await;
            return match moved {
                Ok(Some((version, origin, value))) if to != id => Ok(vec![
                    Written { id, version, origin: origin.clone(), value: None },
                    Written { id: to, version, origin, value: Some(value) },
                ]),
                Ok(_) => Ok(vec![]),
                // The applier took the free key a moment earlier: nothing changed.
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23505") => Ok(vec![]),
                Err(_) => Err(vec![Uncertain { id, val: None }, Uncertain { id: to, val: Some(val) }]),
            };
        }
        _ => {
            let mut tx = sqlx::Connection::begin(&mut *conn).await.map_err(|_| uncertain(None))?;
            let deleted: Option<i32> = sqlx::query_scalar("DELETE FROM kv WHERE id = $1 RETURNING id")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(|_| uncertain(None))?;
            let mut written = vec![];
            if deleted.is_some() {
                let (version, origin): (i64, String) = sqlx::query_as(
                    "SELECT version, origin::text FROM mmsync.tombstones
                     WHERE schema_name = 'public' AND table_name = 'kv' AND key = jsonb_build_object('id', $1::text)",
                )
                .bind(id)
                .fetch_one(&mut *tx)
                .await
                .map_err(|_| uncertain(None))?;
                written.push(Written { id, version, origin, value: None });
            }
            tx.commit().await.map_err(|_| uncertain(None))?;
            return Ok(written);
        }
    };
    Ok(stamped.map(row).into_iter().collect())
}

/// Random writes ([`write_once`]) on keys `0..keys`; returns every write
/// the master acknowledged, with its version (for deletes, the tombstone's).
pub async fn random_writes(conn: &mut PgConnection, master: &str, seed: u64, ops: usize, keys: u64) -> Vec<Written> {
    let mut rng = Rng::new(seed);
    let mut log = Vec::new();
    for i in 0..ops {
        log.extend(write_once(conn, master, i, &mut rng, keys).await.expect("no faults here"));
    }
    log
}

/// What last-writer-wins must leave: per key, the write with the highest
/// (version, origin); absent if that write is a delete. Rows are
/// `id|val|n|md5(doc)|version|origin`.
pub fn lww_model(writes: &[Written]) -> Vec<String> {
    let mut winners: BTreeMap<i32, &Written> = BTreeMap::new();
    for w in writes {
        let better = winners.get(&w.id).is_none_or(|cur| (w.version, &w.origin) > (cur.version, &cur.origin));
        if better {
            winners.insert(w.id, w);
        }
    }
    winners
        .values()
        .filter_map(|w| w.value.as_ref().map(|value| format!("{}|{value}|{}|{}", w.id, w.version, w.origin)))
        .collect()
}

/// Waits until `table` on `master` holds at least `rows` rows.
pub async fn wait_rows(s: &Synced, master: &str, table: &str, rows: i64) {
    wait_for(&format!("{rows} rows in {table} on {master}"), DEADLINE, || async {
        let mut conn = s.conn(master).await;
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}")).fetch_one(&mut conn).await.ok()?;
        (n >= rows).then_some(())
    })
    .await;
}

/// The kv table of a master in the model's form.
pub async fn kv_state(s: &Synced, master: &str) -> Vec<String> {
    let mut conn = s.conn(master).await;
    sqlx::query_scalar("SELECT concat_ws('|', id, val, n, md5(doc), mmsync_version, mmsync_origin) FROM kv ORDER BY id")
        .fetch_all(&mut conn)
        .await
        .unwrap()
}

/// Why each record a master could not apply was kept as a dead letter.
pub async fn dead_letter_reasons(s: &Synced, master: &str) -> Vec<String> {
    let mut conn = s.conn(master).await;
    sqlx::query_scalar("SELECT reason FROM mmsync.dead_letters").fetch_all(&mut conn).await.unwrap()
}
