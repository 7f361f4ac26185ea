//! MariaDB masters end to end: real MariaDB 10.11 servers (binlog in ROW
//! format), the shared Apache Kafka, the real `mmsync` binary.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use mmsync::testbed::mariadb::MariaDb;
use mmsync::testbed::{KafkaCluster, MmsyncProcess};
use mysql_async::prelude::Queryable;
use mysql_async::Conn;

use crate::common::{lww_model, mmsync, seed, Rng, Written, DEADLINE};

static PAIRS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The application's database on every server.
const DB: &str = "shop";

/// MariaDB masters on the shared Kafka, with `mmsync init` done.
struct MariaMesh {
    masters: Vec<(String, MariaDb)>,
    broker: Arc<KafkaCluster>,
    prefix: String,
    dir: tempfile::TempDir,
    topology: PathBuf,
    run: Option<MmsyncProcess>,
    runs: usize,
}

impl MariaMesh {
    /// Starts a server per name, runs `schema` on each as the application,
    /// writes the topology and runs `mmsync init`.
    async fn new(names: &[&str], schema: &str, tables: &[&str]) -> MariaMesh {
        let broker = KafkaCluster::shared().await.expect("kafka");
        let mut masters = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let server = MariaDb::start(i as u32 + 1).await.expect("mariadb starts");
            server.prepare_master(DB, names.len(), i + 1).await.expect("prepare");
            masters.push((name.to_string(), server));
        }
        let prefix = format!("mmsync-maria{}", PAIRS.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let dir = tempfile::tempdir().unwrap();
        let mut text = format!(
            "[kafka]\nbrokers = \"{}\"\ntopic_prefix = \"{prefix}\"\npartitions = 3\nreplication_factor = 1\n\n\
             [metrics]\nlisten = \"127.0.0.1:{}\"\n\n",
            broker.address(),
            mmsync::testbed::free_port()
        );
        for (name, server) in &masters {
            text.push_str(&format!("[[masters]]\nname = \"{name}\"\nurl = \"{}\"\n\n", server.url(DB)));
        }
        let tables: Vec<String> = tables.iter().map(|t| format!("{t:?}")).collect();
        text.push_str(&format!("[sync]\ntables = [{}]\n", tables.join(", ")));
        let topology = dir.path().join("topology.toml");
        std::fs::write(&topology, text).unwrap();
        let mesh = MariaMesh { masters, broker, prefix, dir, topology, run: None, runs: 0 };
        for (name, _) in &mesh.masters {
            let mut conn = mesh.app(name).await;
            conn.query_drop(schema).await.expect("schema");
        }
        let (code, out) = mmsync(&mesh.topology, &["init"]).await;
        assert_eq!(code, 0, "init failed: {out}");
        mesh
    }

    fn server(&self, name: &str) -> &MariaDb {
        &self.masters.iter().find(|(n, _)| n == name).expect("a master").1
    }

    /// A connection as the application.
    async fn app(&self, name: &str) -> Conn {
        Conn::from_url(self.server(name).app_url(DB)).await.expect("mariadb answers")
    }

    /// A connection as root would see it, for reading mmsync's tables.
    async fn admin(&self, name: &str) -> Conn {
        let url = self.server(name).url(DB).replacen("mariadb://", "mysql://", 1);
        Conn::from_url(url).await.expect("mariadb answers")
    }

    fn start(&mut self) {
        assert!(self.run.is_none(), "mmsync is already running");
        self.runs += 1;
        let log = self.dir.path().join(format!("mmsync-run-{}.log", self.runs));
        let bin = std::path::Path::new(env!("CARGO_BIN_EXE_mmsync"));
        self.run = Some(MmsyncProcess::spawn(bin, &self.topology, &["run"], &[], log).expect("mmsync starts"));
    }

    fn log(&self) -> String {
        self.run.as_ref().map(|r| r.log()).unwrap_or_default()
    }

    /// Every row of `sql`'s result as text, on `master`.
    async fn rows(&self, master: &str, sql: &str) -> Vec<String> {
        let mut conn = self.admin(master).await;
        conn.query_drop("SET time_zone = '+00:00'").await.expect("time zone");
        conn.query(sql).await.expect("rows")
    }

    /// Waits until every master returns the same rows for `sql`; returns them.
    async fn converged(&self, sql: &str) -> Vec<String> {
        let mut last = BTreeMap::new();
        let outcome = tokio::time::timeout(DEADLINE, async {
            loop {
                let mut all = BTreeMap::new();
                for (n, _) in &self.masters {
                    all.insert(n.clone(), self.rows(n, sql).await);
                }
                let first = all.values().next().unwrap().clone();
                if all.values().all(|r| *r == first) {
                    return first;
                }
                last = all;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        })
        .await;
        outcome.unwrap_or_else(|_| panic!("no convergence within {DEADLINE:?}: {last:#?}\nlog:\n{}", self.log()))
    }

    /// The origins of the records in `master`'s topic of `table`, read until
    /// one has `until_key`.
    fn topic_origins(&self, master: &str, table: &str, until_key: &str) -> Vec<(String, String)> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::message::Message;
        let table = mmsync::topology::TableName::parse(table).unwrap();
        let topic = mmsync::kafka::topic_name(&self.prefix, master, &table);
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", self.broker.address())
            .set("group.id", "loop-tests")
            .create()
            .unwrap();
        let mut tpl = rdkafka::TopicPartitionList::new();
        for p in 0..3 {
            tpl.add_partition_offset(&topic, p, rdkafka::Offset::Beginning).unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let mut out: Vec<(String, String)> = Vec::new();
        let start = std::time::Instant::now();
        // Until the key is read, and then every record the topic holds.
        let mut total: Option<usize> = None;
        while total != Some(out.len()) {
            assert!(start.elapsed() < DEADLINE, "no record {until_key} in {topic}: {out:?}");
            if total.is_none() && out.iter().any(|(k, _)| k == until_key) {
                let ends = (0..3).map(|p| consumer.fetch_watermarks(&topic, p, DEADLINE).unwrap());
                total = Some(ends.map(|(low, high)| (high - low) as usize).sum());
                continue;
            }
            if let Some(Ok(msg)) = consumer.poll(std::time::Duration::from_millis(100)) {
                let value: serde_json::Value = serde_json::from_slice(msg.payload().unwrap()).unwrap();
                let key = String::from_utf8_lossy(msg.key().unwrap()).into_owned();
                out.push((key, value["origin"].as_str().unwrap().to_string()));
            }
        }
        out
    }
}

const ITEMS: &str = "CREATE TABLE items (
    id BIGINT PRIMARY KEY,
    name VARCHAR(100) NOT NULL,
    qty INT UNSIGNED,
    price DECIMAL(12,2),
    seen DATETIME(6),
    stamped TIMESTAMP(3) NULL,
    day DATE,
    raw VARBINARY(16),
    note TEXT,
    doc JSON,
    ratio DOUBLE
) ENGINE = InnoDB";

const ITEM_ROWS: &str = "SELECT CONCAT_WS('|', id, name, qty, price, seen, stamped, day, HEX(raw), note, doc, ratio,
    mmsync_origin) FROM items ORDER BY id";

#[tokio::test(flavor = "multi_thread")]
async fn a_mariadb_pair_syncs_inserts_updates_and_deletes_both_ways_and_nothing_comes_back() {
    let mut mesh = MariaMesh::new(&["seoul", "busan"], ITEMS, &["public.items"]).await;
    mesh.start();
    let mut seoul = mesh.app("seoul").await;
    let mut busan = mesh.app("busan").await;
    seoul
        .query_drop(
            "SET time_zone = '+09:00';
             INSERT INTO items (id, name, qty, price, seen, stamped, day, raw, note, doc, ratio) VALUES
               (1, 'kimchi', 4294967295, 12.50, '2026-11-26 08:00:00.123456', '2026-11-26 08:00:00.5', '2026-11-26',
                X'00ff10', 'multi\nline \\\\ 한국어', '{\"a\": [1, 2]}', 0.1),
               (2, 'rice', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)",
        )
        .await
        .unwrap();
    // An application that sets the applier's variable is still stamped (and synced).
    seoul.query_drop("SET @mmsync_applier = 1; INSERT INTO items (id, name) VALUES (3, 'posing')").await.unwrap();
    busan.query_drop("INSERT INTO items (id, name, qty) VALUES (10, 'fish', 7), (11, 'salt', 1)").await.unwrap();
    let rows = mesh.converged(ITEM_ROWS).await;
    assert_eq!(rows.len(), 5, "{rows:#?}");
    assert_eq!(
        rows[0],
        "1|kimchi|4294967295|12.50|2026-11-26 08:00:00.123456|2026-11-25 23:00:00.500|2026-11-26|00FF10|multi\nline \\ 한국어|{\"a\": [1, 2]}|0.1|seoul"
    );
    assert!(rows[2].ends_with("posing|seoul"), "{rows:#?}");

    busan.query_drop("UPDATE items SET qty = qty + 1 WHERE id = 2 OR id = 11").await.unwrap();
    seoul.query_drop("DELETE FROM items WHERE id = 10").await.unwrap();
    seoul.query_drop("UPDATE items SET id = 12 WHERE id = 3").await.unwrap();
    let rows = mesh.converged(ITEM_ROWS).await;
    let ids: Vec<&str> = rows.iter().map(|r| r.split('|').next().unwrap()).collect();
    assert_eq!(ids, ["1", "2", "11", "12"], "{rows:#?}");
    assert!(rows[1].starts_with("2|rice|") && rows[1].ends_with("|busan"), "{rows:#?}");
    assert!(rows[2].starts_with("11|salt|2|") && rows[2].ends_with("|busan"), "{rows:#?}");
    assert!(rows[3].starts_with("12|posing|") && rows[3].ends_with("|seoul"), "{rows:#?}");

    // Nothing applied on seoul came back into seoul's topic: after a marker
    // seoul writes last, the topic holds seoul's own changes only.
    seoul.query_drop("INSERT INTO items (id, name) VALUES (99, 'marker')").await.unwrap();
    let records = mesh.topic_origins("seoul", "public.items", r#"{"id":"99"}"#);
    assert!(records.iter().all(|(_, origin)| origin == "seoul"), "{records:?}");
    // 1, 2, 3 inserted; 10 deleted; 3 -> 12 (a delete of 3 and an upsert of 12); the marker.
    assert_eq!(records.len(), 7, "{records:?}");
    let dead: Vec<String> = mesh.rows("busan", "SELECT reason FROM mmsync.dead_letters").await;
    assert!(dead.is_empty(), "{dead:?}");
}

/// One application write on a MariaDB master, with the stamp it got. A
/// deadlock with the applier (InnoDB's answer to two sessions locking the
/// same keys in another order) is retried, as an application would.
async fn write(conn: &mut Conn, master: &str, rng: &mut Rng, keys: u64) -> Written {
    let id = rng.below(keys) as i32;
    let delete = rng.below(5) == 0;
    let val = format!("{master}-{}", rng.next() % 1000);
    loop {
        match try_write(conn, master, id, delete.then_some(()).map_or(Some(val.as_str()), |_| None)).await {
            Ok(w) => return w,
            Err(mysql_async::Error::Server(e)) if e.code == 1213 => {
                conn.query_drop("ROLLBACK").await.unwrap();
            }
            Err(e) => panic!("{master}: {e}"),
        }
    }
}

/// Upserts `val` under `id`, or deletes `id` when `val` is `None`.
async fn try_write(conn: &mut Conn, master: &str, id: i32, val: Option<&str>) -> mysql_async::Result<Written> {
    conn.query_drop("START TRANSACTION").await?;
    let written = match val {
        None => {
            conn.exec_drop("DELETE FROM kv WHERE id = ?", (id,)).await?;
            let version: Option<i64> = conn
                .exec_first(
                    "SELECT version FROM mmsync.tombstones
                     WHERE table_name = 'kv' AND key_text = JSON_COMPACT(JSON_OBJECT('id', CAST(? AS CHAR)))",
                    (id,),
                )
                .await?;
            Written { id, version: version.unwrap_or(0), origin: master.into(), value: None }
        }
        Some(val) => {
            conn.exec_drop(
                "INSERT INTO kv (id, val, n) VALUES (?, ?, 1) ON DUPLICATE KEY UPDATE val = VALUES(val), n = n + 1",
                (id, val),
            )
            .await?;
            let (value, version): (String, i64) = conn
                .exec_first("SELECT CONCAT_WS('|', val, n), mmsync_version FROM kv WHERE id = ?", (id,))
                .await?
                .expect("the row just written");
            Written { id, version, origin: master.into(), value: Some(value) }
        }
    };
    conn.query_drop("COMMIT").await?;
    Ok(written)
}

#[tokio::test(flavor = "multi_thread")]
async fn conflicting_writes_on_a_mariadb_pair_end_as_the_last_writer_wins_model_across_a_crash() {
    let schema = "CREATE TABLE kv (id INT PRIMARY KEY, val VARCHAR(40) NOT NULL, n INT NOT NULL) ENGINE = InnoDB";
    let mut mesh = MariaMesh::new(&["seoul", "busan"], schema, &["public.kv"]).await;
    // The test reads tombstones as the application: allowed here only.
    for (_, server) in &mesh.masters {
        server.sql("GRANT SELECT ON mmsync.tombstones TO 'app'@'%'").await.unwrap();
    }
    mesh.start();
    let seed = seed("mariadb conflicts");
    let mut writes = Vec::new();
    for round in 0..3 {
        let mut tasks = Vec::new();
        for (i, (name, _)) in mesh.masters.iter().enumerate() {
            let mut conn = mesh.app(name).await;
            let name = name.clone();
            let mut rng = Rng::new(seed ^ ((round * 2 + i) as u64 + 1));
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::new();
                for _ in 0..150 {
                    out.push(write(&mut conn, &name, &mut rng, 25).await);
                }
                out
            }));
        }
        for t in tasks {
            writes.extend(t.await.unwrap());
        }
        if round == 1 {
            // mmsync dies between rounds; the next run goes on from the
            // positions and offsets it stored.
            mesh.run.take().unwrap().kill().await;
            mesh.start();
        }
    }
    let rows =
        mesh.converged("SELECT CONCAT_WS('|', id, val, n, mmsync_version, mmsync_origin) FROM kv ORDER BY id").await;
    assert_eq!(rows, lww_model(&writes));
    for (name, _) in &mesh.masters {
        let dead: Vec<String> = mesh.rows(name, "SELECT reason FROM mmsync.dead_letters").await;
        assert!(dead.is_empty(), "{name}: {dead:?}");
    }
}
