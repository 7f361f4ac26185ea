//! MariaDB masters end to end: real MariaDB 10.11 servers (binlog in ROW
//! format), the shared Apache Kafka, the real `mmsync` binary.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use mmsync::testbed::mariadb::MariaDb;
use mmsync::testbed::{KafkaCluster, KafkaOptions, MmsyncProcess, PgCluster, PgOptions};
use mysql_async::prelude::Queryable;
use mysql_async::Conn;

use crate::common::{lww_model, mmsync, seed, Rng, Written, DEADLINE};

static MESHES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The application's database on every server.
const DB: &str = "shop";

/// A master of the mesh.
enum Server {
    Postgres(PgCluster),
    Mariadb(MariaDb),
}

/// What a test says of a master: its name and kind.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Pg,
    Maria,
}

/// Masters of either kind on the shared Kafka, with `mmsync init` done.
struct Mesh {
    masters: Vec<(String, Server)>,
    broker: Arc<KafkaCluster>,
    prefix: String,
    dir: tempfile::TempDir,
    topology: PathBuf,
    run: Option<MmsyncProcess>,
    runs: usize,
}

/// A statement for each kind of master.
#[derive(Clone, Copy)]
struct Sql<'a> {
    pg: &'a str,
    maria: &'a str,
}

impl Mesh {
    /// Starts a server per master, runs the schema on each as the
    /// application, writes the topology and runs `mmsync init`.
    async fn new(masters: &[(&str, Kind)], schema: Sql<'_>, tables: &[&str]) -> Mesh {
        Mesh::new_on(masters, schema, tables, false).await
    }

    /// Like [`Mesh::new`], on a broker of its own when `own_broker` (one it may kill).
    async fn new_on(masters: &[(&str, Kind)], schema: Sql<'_>, tables: &[&str], own_broker: bool) -> Mesh {
        let mesh = Mesh::servers_on(masters, schema, tables, &[], own_broker).await;
        let (code, out) = mmsync(&mesh.topology, &["init"]).await;
        assert_eq!(code, 0, "init failed: {out}");
        mesh
    }

    /// Like [`Mesh::new`] without `mmsync init`, the MariaDB servers
    /// started with `server_args` too.
    async fn servers(masters: &[(&str, Kind)], schema: Sql<'_>, tables: &[&str], server_args: &[&str]) -> Mesh {
        Mesh::servers_on(masters, schema, tables, server_args, false).await
    }

    async fn servers_on(
        masters: &[(&str, Kind)],
        schema: Sql<'_>,
        tables: &[&str],
        server_args: &[&str],
        own_broker: bool,
    ) -> Mesh {
        let broker = if own_broker {
            Arc::new(KafkaCluster::start(KafkaOptions::default()).await.expect("kafka"))
        } else {
            KafkaCluster::shared().await.expect("kafka")
        };
        let mut started = Vec::new();
        for (i, (name, kind)) in masters.iter().enumerate() {
            let server = match kind {
                Kind::Maria => {
                    let server = MariaDb::start_with(i as u32 + 1, server_args).await.expect("mariadb starts");
                    server.prepare_master(DB, masters.len(), i + 1).await.expect("prepare");
                    Server::Mariadb(server)
                }
                Kind::Pg => {
                    let cluster = PgCluster::start(PgOptions::default()).await.expect("postgres starts");
                    cluster.create_database(DB).await.expect("database");
                    Server::Postgres(cluster)
                }
            };
            started.push((name.to_string(), server));
        }
        let prefix = format!("mmsync-mesh{}", MESHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let dir = tempfile::tempdir().unwrap();
        let mut text = format!(
            "[kafka]\nbrokers = \"{}\"\ntopic_prefix = \"{prefix}\"\npartitions = 3\nreplication_factor = 1\n\n\
             [metrics]\nlisten = \"127.0.0.1:{}\"\n\n",
            broker.address(),
            mmsync::testbed::free_port()
        );
        for (name, server) in &started {
            let url = match server {
                Server::Postgres(c) => c.url(DB),
                Server::Mariadb(m) => m.url(DB),
            };
            text.push_str(&format!("[[masters]]\nname = \"{name}\"\nurl = \"{url}\"\n\n"));
        }
        let tables: Vec<String> = tables.iter().map(|t| format!("{t:?}")).collect();
        text.push_str(&format!("[sync]\ntables = [{}]\n", tables.join(", ")));
        let topology = dir.path().join("topology.toml");
        std::fs::write(&topology, text).unwrap();
        let mesh = Mesh { masters: started, broker, prefix, dir, topology, run: None, runs: 0 };
        for (name, _) in &mesh.masters {
            mesh.exec(name, schema).await;
        }
        mesh
    }

    fn server(&self, name: &str) -> &Server {
        &self.masters.iter().find(|(n, _)| n == name).expect("a master").1
    }

    fn maria(&self, name: &str) -> &MariaDb {
        match self.server(name) {
            Server::Mariadb(m) => m,
            Server::Postgres(_) => panic!("{name} is a PostgreSQL master"),
        }
    }

    /// A MariaDB connection as the application.
    async fn app(&self, name: &str) -> Conn {
        Conn::from_url(self.maria(name).app_url(DB)).await.expect("mariadb answers")
    }

    /// A PostgreSQL connection.
    async fn pg(&self, name: &str) -> sqlx::PgConnection {
        match self.server(name) {
            Server::Postgres(c) => c.connect(DB).await.expect("postgres answers"),
            Server::Mariadb(_) => panic!("{name} is a MariaDB master"),
        }
    }

    /// Runs the statement of the master's kind, as the application.
    async fn exec(&self, name: &str, sql: Sql<'_>) {
        match self.server(name) {
            Server::Postgres(_) => {
                sqlx::raw_sql(sql.pg).execute(&mut self.pg(name).await).await.expect("postgres statement");
            }
            Server::Mariadb(_) => self.app(name).await.query_drop(sql.maria).await.expect("mariadb statement"),
        }
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

    /// Every row of the query's result as text, on `master`, read as mmsync
    /// reads (MariaDB sessions in UTC).
    async fn rows(&self, master: &str, sql: Sql<'_>) -> Vec<String> {
        match self.server(master) {
            Server::Postgres(_) => {
                sqlx::query_scalar(sql.pg).fetch_all(&mut self.pg(master).await).await.expect("rows")
            }
            Server::Mariadb(m) => {
                let url = m.url(DB).replacen("mariadb://", "mysql://", 1);
                let mut conn = Conn::from_url(url).await.expect("mariadb answers");
                conn.query_drop("SET time_zone = '+00:00'").await.expect("time zone");
                conn.query(sql.maria).await.expect("rows")
            }
        }
    }

    /// Waits until every master returns the same rows; returns them.
    async fn converged(&self, sql: Sql<'_>) -> Vec<String> {
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

    /// Dead letters' reasons on every master.
    async fn dead_letters(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (name, _) in &self.masters {
            let sql = "SELECT reason FROM mmsync.dead_letters";
            out.extend(self.rows(name, Sql { pg: sql, maria: sql }).await.into_iter().map(|r| format!("{name}: {r}")));
        }
        out
    }

    /// The (key, origin) of each change in `master`'s topic of `table`, read
    /// until one has `until_key`; a change sent twice (delivery is at least
    /// once, and a source that reconnects sends its last round again) counts once.
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
        let mut seen = std::collections::HashSet::new();
        let mut read = 0;
        let start = std::time::Instant::now();
        // Until the key is read, and then every record the topic holds.
        let mut total: Option<usize> = None;
        while total != Some(read) {
            assert!(start.elapsed() < DEADLINE, "no record {until_key} in {topic}: {out:?}");
            if total.is_none() && out.iter().any(|(k, _)| k == until_key) {
                let ends = (0..3).map(|p| consumer.fetch_watermarks(&topic, p, DEADLINE).unwrap());
                total = Some(ends.map(|(low, high)| (high - low) as usize).sum());
                continue;
            }
            if let Some(Ok(msg)) = consumer.poll(std::time::Duration::from_millis(100)) {
                let value: serde_json::Value = serde_json::from_slice(msg.payload().unwrap()).unwrap();
                let key = String::from_utf8_lossy(msg.key().unwrap()).into_owned();
                read += 1;
                if seen.insert((key.clone(), value["version"].as_i64().unwrap(), value["op"].to_string())) {
                    out.push((key, value["origin"].as_str().unwrap().to_string()));
                }
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
    let mut mesh =
        Mesh::new(&[("seoul", Kind::Maria), ("busan", Kind::Maria)], Sql { pg: "", maria: ITEMS }, &["public.items"])
            .await;
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
    let rows = mesh.converged(Sql { pg: "", maria: ITEM_ROWS }).await;
    assert_eq!(rows.len(), 5, "{rows:#?}");
    assert_eq!(
        rows[0],
        "1|kimchi|4294967295|12.50|2026-11-26 08:00:00.123456|2026-11-25 23:00:00.500|2026-11-26|00FF10|multi\nline \\ 한국어|{\"a\": [1, 2]}|0.1|seoul"
    );
    assert!(rows[2].ends_with("posing|seoul"), "{rows:#?}");

    busan.query_drop("UPDATE items SET qty = qty + 1 WHERE id = 2 OR id = 11").await.unwrap();
    seoul.query_drop("DELETE FROM items WHERE id = 10").await.unwrap();
    seoul.query_drop("UPDATE items SET id = 12 WHERE id = 3").await.unwrap();
    let rows = mesh.converged(Sql { pg: "", maria: ITEM_ROWS }).await;
    let ids: Vec<&str> = rows.iter().map(|r| r.split('|').next().unwrap()).collect();
    assert_eq!(ids, ["1", "2", "11", "12"], "{rows:#?}");
    assert!(rows[1].starts_with("2|rice|") && rows[1].ends_with("|busan"), "{rows:#?}");
    assert!(rows[2].starts_with("11|salt|2|") && rows[2].ends_with("|busan"), "{rows:#?}");
    assert!(rows[3].starts_with("12|posing|") && rows[3].ends_with("|seoul"), "{rows:#?}");

    // REPLACE over busan's row 2 deletes it and inserts it again in one
    // statement: the row must win over its own delete's tombstone everywhere.
    seoul.query_drop("REPLACE INTO items (id, name, qty) VALUES (2, 'replaced', 5)").await.unwrap();
    let rows = mesh.converged(Sql { pg: "", maria: ITEM_ROWS }).await;
    assert_eq!(rows[1], "2|replaced|5|seoul", "{rows:#?}");

    // Nothing applied on seoul came back into seoul's topic: after a marker
    // seoul writes last, the topic holds seoul's own changes only.
    seoul.query_drop("INSERT INTO items (id, name) VALUES (99, 'marker')").await.unwrap();
    let records = mesh.topic_origins("seoul", "public.items", r#"{"id":"99"}"#);
    assert!(records.iter().all(|(_, origin)| origin == "seoul"), "{records:?}");
    // 1, 2, 3 inserted; 10 deleted; 3 -> 12 (a delete of 3 and an upsert of
    // 12); 2 replaced (its delete and its insert); the marker.
    assert_eq!(records.len(), 9, "{records:?}");
    let dead = mesh.dead_letters().await;
    assert!(dead.is_empty(), "{dead:?}");
}

const KV_ROWS: &str = "SELECT CONCAT_WS('|', id, val, n, mmsync_version, mmsync_origin) FROM kv ORDER BY id";

/// A connection an application writes through, of either kind.
enum Writer {
    Pg(sqlx::PgConnection),
    Maria(Conn),
}

impl Mesh {
    async fn writer(&self, name: &str) -> Writer {
        match self.server(name) {
            Server::Postgres(_) => Writer::Pg(self.pg(name).await),
            Server::Mariadb(_) => Writer::Maria(self.app(name).await),
        }
    }
}

/// One application write, with the stamp it got. A deadlock with the
/// applier (two sessions locking the same keys in another order) is
/// retried, as an application would.
async fn write(conn: &mut Writer, master: &str, rng: &mut Rng, keys: u64) -> Written {
    let id = rng.below(keys) as i32;
    let val = (rng.below(5) != 0).then(|| format!("{master}-{}", rng.next() % 1000));
    loop {
        let outcome = match conn {
            Writer::Maria(c) => maria_write(c, master, id, val.as_deref()).await.map_err(|e| match e {
                mysql_async::Error::Server(e) if e.code == 1213 => None,
                e => Some(e.to_string()),
            }),
            Writer::Pg(c) => pg_write(c, master, id, val.as_deref()).await.map_err(|e| match &e {
                sqlx::Error::Database(d) if d.code().as_deref() == Some("40P01") => None,
                e => Some(e.to_string()),
            }),
        };
        match outcome {
            Ok(w) => return w,
            Err(None) => {
                if let Writer::Maria(c) = conn {
                    c.query_drop("ROLLBACK").await.unwrap();
                }
            }
            Err(Some(e)) => panic!("{master}: {e}"),
        }
    }
}

/// Upserts `val` under `id` on PostgreSQL, or deletes `id` when `val` is `None`.
async fn pg_write(conn: &mut sqlx::PgConnection, master: &str, id: i32, val: Option<&str>) -> sqlx::Result<Written> {
    use sqlx::Connection;
    let mut tx = conn.begin().await?;
    let written = match val {
        None => {
            sqlx::query("DELETE FROM kv WHERE id = $1").bind(id).execute(&mut *tx).await?;
            let version: Option<i64> = sqlx::query_scalar(
                "SELECT version FROM mmsync.tombstones
                 WHERE table_name = 'kv' AND key = jsonb_build_object('id', $1::text)",
            )
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
            Written { id, version: version.unwrap_or(0), origin: master.into(), value: None }
        }
        Some(val) => {
            let (value, version): (String, i64) = sqlx::query_as(
                "INSERT INTO kv (id, val, n) VALUES ($1, $2, 1)
                 ON CONFLICT (id) DO UPDATE SET val = EXCLUDED.val, n = kv.n + 1
                 RETURNING concat_ws('|', val, n), mmsync_version",
            )
            .bind(id)
            .bind(val)
            .fetch_one(&mut *tx)
            .await?;
            Written { id, version, origin: master.into(), value: Some(value) }
        }
    };
    tx.commit().await?;
    Ok(written)
}

/// Upserts `val` under `id` on MariaDB, or deletes `id` when `val` is `None`.
async fn maria_write(conn: &mut Conn, master: &str, id: i32, val: Option<&str>) -> mysql_async::Result<Written> {
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

const KV: Sql = Sql {
    pg: "CREATE TABLE kv (id int PRIMARY KEY, val varchar(40) NOT NULL, n int NOT NULL)",
    maria: "CREATE TABLE kv (id INT PRIMARY KEY, val VARCHAR(40) NOT NULL, n INT NOT NULL) ENGINE = InnoDB",
};

/// Every master writes the same keys at once, three rounds; the last
/// (MariaDB) master is killed with SIGKILL after the first, and with
/// `kill_broker` the broker too, until after the second round; mmsync is
/// killed after the second: every master must end as the last-writer-wins
/// model of every acknowledged write says.
async fn conflicting_writes_end_as_the_model(masters: &[(&str, Kind)], kill_broker: bool) {
    let mut mesh = Mesh::new_on(masters, KV, &["public.kv"], kill_broker).await;
    // The test reads tombstones as the application: allowed here only.
    for (name, server) in &mesh.masters {
        if let Server::Mariadb(m) = server {
            m.sql("GRANT SELECT ON mmsync.tombstones TO 'app'@'%'").await.unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
    mesh.start();
    let seed = seed("conflicting writes");
    let mut writes = Vec::new();
    for round in 0..3 {
        let mut tasks = Vec::new();
        for (i, (name, _)) in mesh.masters.iter().enumerate() {
            let mut conn = mesh.writer(name).await;
            let name = name.clone();
            let mut rng = Rng::new(seed ^ ((round * 8 + i) as u64 + 1));
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
        if round == 0 {
            // The MariaDB master dies with SIGKILL and comes back on its
            // data; mmsync's links to it retry meanwhile.
            let Some((_, Server::Mariadb(m))) = mesh.masters.last_mut() else { panic!("the last master is MariaDB") };
            m.restart().await.expect("mariadb restarts");
            if kill_broker {
                // The next round's writes find no broker: the sources wait.
                mesh.broker.kill().await;
            }
        }
        if round == 1 {
            if kill_broker {
                mesh.broker.restart().await.expect("kafka restarts");
            }
            // mmsync dies between rounds; the next run goes on from the
            // positions and offsets it stored.
            mesh.run.take().unwrap().kill().await;
            mesh.start();
        }
    }
    let rows = mesh.converged(Sql { pg: KV_ROWS, maria: KV_ROWS }).await;
    assert_eq!(rows, lww_model(&writes));
    let dead = mesh.dead_letters().await;
    assert!(dead.is_empty(), "{dead:?}");
    // status reads every link, MariaDB's too: its GTID position, each
    // source's heartbeat applied on every target (the heartbeats' topics
    // may trail the table's for a moment).
    let mut last = String::new();
    let settled = tokio::time::timeout(DEADLINE, async {
        loop {
            let (code, out) = mmsync(&mesh.topology, &["status", "--json"]).await;
            last = out.clone();
            let status: serde_json::Value =
                serde_json::from_str(&out[out.find('{').unwrap_or(0)..]).unwrap_or_default();
            let links = status["links"].as_array().cloned().unwrap_or_default();
            let fine = |l: &serde_json::Value| {
                l["problems"].as_array().is_some_and(|p| p.is_empty()) && l["lag_seconds"].as_f64().is_some()
            };
            if code == 0 && !links.is_empty() && links.iter().all(fine) {
                return links;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    })
    .await;
    let links = settled.unwrap_or_else(|_| panic!("status never settled: {last}\nlog:\n{}", mesh.log()));
    for link in &links {
        let place = mesh.masters.iter().position(|(n, _)| *n == link["source"]).unwrap();
        if let Server::Mariadb(_) = mesh.masters[place].1 {
            // Server id and GTID domain are the master's place, from 1.
            let gtid = format!("GTID {0}-{0}-", place + 1);
            assert!(link["source_position"].as_str().unwrap().starts_with(&gtid), "{link}");
        }
    }
    let (code, out) = mmsync(&mesh.topology, &["verify"]).await;
    assert_eq!(code, 0, "{out}");
    let counts: Vec<String> = mesh.masters.iter().map(|(name, _)| format!("{name} {}", rows.len())).collect();
    assert!(out.contains(&format!("public.kv: identical (rows: {})", counts.join(", "))), "{out}");
    // A row changed behind mmsync's back (as its applier, whom the triggers
    // leave alone) is found, with each master's stamp.
    let (_, Server::Mariadb(m)) = mesh.masters.last().unwrap() else { panic!("the last master is MariaDB") };
    let mut applier = Conn::from_url(m.url(DB).replacen("mariadb://", "mysql://", 1)).await.unwrap();
    applier
        .query_drop("SET @mmsync_applier = 1; UPDATE shop.kv SET mmsync_version = 7 ORDER BY id LIMIT 1")
        .await
        .unwrap();
    let (code, out) = mmsync(&mesh.topology, &["verify"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("public.kv: DIFFERENT, 1 key(s) differ") && out.contains("version 7 origin"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn conflicting_writes_on_a_mariadb_pair_end_as_the_last_writer_wins_model_across_crashes() {
    conflicting_writes_end_as_the_model(&[("seoul", Kind::Maria), ("busan", Kind::Maria)], false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn conflicting_writes_on_a_postgres_and_a_mariadb_master_end_as_the_last_writer_wins_model_across_crashes() {
    conflicting_writes_end_as_the_model(&[("seoul", Kind::Pg), ("busan", Kind::Maria)], true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn conflicting_writes_on_three_masters_of_both_kinds_end_as_the_last_writer_wins_model_across_crashes() {
    let masters = [("seoul", Kind::Maria), ("busan", Kind::Pg), ("jeju", Kind::Maria)];
    conflicting_writes_end_as_the_model(&masters, false).await;
}

const MIXED_ITEMS: Sql = Sql {
    pg: "CREATE TABLE items (id bigint PRIMARY KEY, name varchar(100) NOT NULL, price numeric(12,2), ok boolean,
         seen timestamptz, raw bytea, doc jsonb, ratio double precision, day date)",
    maria: "CREATE TABLE items (id BIGINT PRIMARY KEY, name VARCHAR(100) NOT NULL, price DECIMAL(12,2), ok TINYINT(1),
            seen DATETIME(6), raw VARBINARY(16), doc LONGTEXT, ratio DOUBLE, day DATE) ENGINE = InnoDB",
};

const MIXED_ROWS: Sql = Sql {
    pg: "SELECT concat_ws('|', id, name, price, ok::int, to_char(seen AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US'),
         upper(encode(raw, 'hex')), doc::text, ratio, day, mmsync_origin) FROM items ORDER BY id",
    maria: "SELECT CONCAT_WS('|', id, name, price, ok, seen, HEX(raw), doc, ratio, day, mmsync_origin)
            FROM items ORDER BY id",
};

#[tokio::test(flavor = "multi_thread")]
async fn a_postgres_and_a_mariadb_master_sync_every_mapped_type_both_ways() {
    let mut mesh = Mesh::new(&[("seoul", Kind::Pg), ("busan", Kind::Maria)], MIXED_ITEMS, &["public.items"]).await;
    mesh.start();
    let seoul = "SET TimeZone = 'Asia/Seoul';
        INSERT INTO items VALUES (1, 'kimchi ''김치''', 12.50, true, '2026-11-26 17:00:00.123456+09', '\\x00ff10',
            '{\"a\": [1, 2]}', 0.1, '2026-11-26'),
        (2, 'rice', NULL, false, NULL, NULL, NULL, NULL, NULL)";
    mesh.exec("seoul", Sql { pg: seoul, maria: "" }).await;
    let busan = "INSERT INTO items (id, name, price, ok, seen, raw, doc, ratio, day) VALUES
        (11, 'fish', -3.10, 1, '2026-01-02 03:04:05.000006', X'CAFE', '{\"b\": null}', -2.5, '1999-12-31')";
    mesh.exec("busan", Sql { pg: "", maria: busan }).await;
    let rows = mesh.converged(MIXED_ROWS).await;
    assert_eq!(
        rows,
        [
            "1|kimchi '김치'|12.50|1|2026-11-26 08:00:00.123456|00FF10|{\"a\": [1, 2]}|0.1|2026-11-26|seoul",
            "2|rice|0|seoul",
            "11|fish|-3.10|1|2026-01-02 03:04:05.000006|CAFE|{\"b\": null}|-2.5|1999-12-31|busan",
        ]
    );
    // Each side changes the other's rows: an update, a delete, a key change.
    mesh.exec("seoul", Sql { pg: "UPDATE items SET ok = false, price = 0.01 WHERE id = 11", maria: "" }).await;
    mesh.exec("busan", Sql { pg: "", maria: "DELETE FROM items WHERE id = 2; UPDATE items SET id = 3 WHERE id = 1" })
        .await;
    let rows = mesh.converged(MIXED_ROWS).await;
    let short: Vec<String> = rows
        .iter()
        .map(|r| {
            let f: Vec<&str> = r.split('|').collect();
            format!("{}|{}|{}", f[0], f[2], f.last().unwrap())
        })
        .collect();
    assert_eq!(short, ["3|12.50|busan", "11|0.01|seoul"], "{rows:#?}");
    // Nothing applied on seoul came back into its topic.
    mesh.exec("seoul", Sql { pg: "INSERT INTO items (id, name) VALUES (99, 'marker')", maria: "" }).await;
    let records = mesh.topic_origins("seoul", "public.items", r#"{"id":"99"}"#);
    assert!(records.iter().all(|(_, origin)| origin == "seoul"), "{records:?}");
    // 1 and 2 inserted, 11 updated, the marker.
    assert_eq!(records.len(), 4, "{records:?}");
    let dead = mesh.dead_letters().await;
    assert!(dead.is_empty(), "{dead:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn check_lists_what_a_mariadb_master_and_a_mixed_table_lack_each_with_its_fix() {
    let good = Sql {
        pg: "CREATE TABLE t (id bigint PRIMARY KEY, name varchar(10), price numeric(8,2))",
        maria: "CREATE TABLE t (id BIGINT PRIMARY KEY, name VARCHAR(10), price DECIMAL(8,2)) ENGINE = InnoDB",
    };
    let mesh = Mesh::servers(&[("seoul", Kind::Pg), ("busan", Kind::Maria)], good, &["public.t"], &[]).await;
    let (code, out) = mmsync(&mesh.topology, &["check"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("master \"busan\": ok (MariaDB 10.11"), "{out}");

    let bad = Sql {
        pg: "CREATE TABLE t (id varchar(10) PRIMARY KEY, n integer, tags text[], mood text, name varchar(20), p int,
             u uuid)",
        maria: "CREATE TABLE parent (id INT PRIMARY KEY) ENGINE = InnoDB;
                CREATE TABLE t (id VARCHAR(10) COLLATE utf8mb4_general_ci PRIMARY KEY, n BIGINT, tags TEXT,
                mood ENUM('ok', 'sad'), name VARCHAR(10), p INT, u UUID,
                CONSTRAINT to_parent FOREIGN KEY (p) REFERENCES parent (id) ON DELETE CASCADE) ENGINE = InnoDB;
                CREATE TRIGGER audit BEFORE UPDATE ON t FOR EACH ROW SET NEW.n = NEW.n + 1",
    };
    let mesh = Mesh::servers(
        &[("seoul", Kind::Pg), ("busan", Kind::Maria)],
        bad,
        &["public.t"],
        &["--binlog-row-metadata=MINIMAL"],
    )
    .await;
    mesh.maria("busan").sql("SET GLOBAL auto_increment_increment = 1").await.unwrap();
    let (code, out) = mmsync(&mesh.topology, &["check"]).await;
    assert_ne!(code, 0, "{out}");
    for expected in [
        "binlog_row_metadata is \"MINIMAL\", not FULL",
        "set auto_increment_increment = 2 and auto_increment_offset = 2",
        "column mood is enum('ok','sad'), which mmsync cannot yet read from the binlog",
        "column n is integer on seoul and bigint(20) on busan",
        "tags is an array",
        "key column id has collation utf8mb4_general_ci",
        "COLLATE utf8mb4_nopad_bin",
        "column name is character varying(20) on seoul and varchar(10) on busan",
        "foreign key to_parent (ON DELETE CASCADE ON UPDATE RESTRICT) cascades, and InnoDB's cascades fire no trigger",
        "trigger audit fires on mmsync's applier too",
        "IF NOT (@mmsync_applier <=> 1) THEN",
        "column u is uuid, which the binlog holds as raw bytes",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in:\n{out}");
    }
    let (code, out) = mmsync(&mesh.topology, &["init"]).await;
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("tables differ between the PostgreSQL and MariaDB masters"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn ids_minted_on_a_postgres_and_a_mariadb_master_never_collide() {
    let notes = Sql {
        pg: "CREATE TABLE notes (id bigserial PRIMARY KEY, body varchar(100))",
        maria: "CREATE TABLE notes (id BIGINT AUTO_INCREMENT PRIMARY KEY, body VARCHAR(100)) ENGINE = InnoDB",
    };
    let mut mesh = Mesh::new(&[("seoul", Kind::Pg), ("busan", Kind::Maria)], notes, &["public.notes"]).await;
    mesh.start();
    let mut seoul = mesh.pg("seoul").await;
    let mut busan = mesh.app("busan").await;
    for i in 0..20 {
        sqlx::query("INSERT INTO notes (body) VALUES ($1)")
            .bind(format!("seoul {i}"))
            .execute(&mut seoul)
            .await
            .unwrap();
        busan.exec_drop("INSERT INTO notes (body) VALUES (?)", (format!("busan {i}"),)).await.unwrap();
    }
    let sql = "SELECT CONCAT_WS('|', id, body) FROM notes ORDER BY id";
    let rows = mesh.converged(Sql { pg: sql, maria: sql }).await;
    assert_eq!(rows.len(), 40, "{rows:#?}");
    // seoul (place 1 of 2) mints odd ids, busan even ones.
    for r in &rows {
        let (id, body) = r.split_once('|').unwrap();
        let odd = id.parse::<i64>().unwrap() % 2 == 1;
        assert_eq!(odd, body.starts_with("seoul"), "{rows:#?}");
    }
    let dead = mesh.dead_letters().await;
    assert!(dead.is_empty(), "{dead:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_binlog_purged_while_mmsync_was_away_stops_the_source_with_the_way_out() {
    let mut mesh = Mesh::new(&[("seoul", Kind::Maria), ("busan", Kind::Maria)], KV, &["public.kv"]).await;
    mesh.start();
    mesh.exec("seoul", Sql { pg: "", maria: "INSERT INTO kv (id, val, n) VALUES (1, 'before', 1)" }).await;
    mesh.converged(Sql { pg: KV_ROWS, maria: KV_ROWS }).await;
    let status = mesh.run.take().unwrap().terminate().await;
    assert!(status.success());
    // Written while mmsync is away, then purged with the binlog that held it.
    mesh.exec("seoul", Sql { pg: "", maria: "INSERT INTO kv (id, val, n) VALUES (2, 'lost', 1)" }).await;
    let seoul = mesh.maria("seoul");
    seoul.sql("FLUSH BINARY LOGS").await.unwrap();
    let current = seoul.sql("SHOW MASTER STATUS").await.unwrap();
    let file = current.split('\t').next().unwrap().to_string();
    // A binlog goes only once InnoDB made its transactions durable (the
    // binlog checkpoint): purge until the server lets it go.
    mmsync::testbed::wait_for("the old binlogs to be purged", DEADLINE, || async {
        seoul.sql(&format!("PURGE BINARY LOGS TO '{file}'")).await.ok()?;
        (seoul.sql("SHOW BINARY LOGS").await.ok()?.lines().count() == 1).then_some(())
    })
    .await;
    mesh.start();
    let run = mesh.run.take().unwrap();
    let log = run.log_path();
    let status = tokio::time::timeout(DEADLINE, run.wait()).await;
    let log = std::fs::read_to_string(log).unwrap();
    if status.is_err() {
        let rows = mesh.rows("busan", Sql { pg: "", maria: KV_ROWS }).await;
        let logs =
            mesh.maria("seoul").sql("SHOW BINARY LOGS; SELECT @@gtid_binlog_state, @@gtid_binlog_pos").await.unwrap();
        panic!("mmsync did not stop by itself:\n{log}\nbusan: {rows:?}\nseoul: {logs}");
    }
    let status = status.unwrap();
    assert!(!status.success(), "{log}");
    for expected in [
        "binlogs were purged while mmsync was away",
        "`mmsync verify`",
        "UPDATE mmsync.capture_position SET gtid_pos = @@gtid_binlog_pos WHERE master = 'seoul'",
        "binlog_expire_logs_seconds",
    ] {
        assert!(log.contains(expected), "missing {expected:?}:\n{log}");
    }
    // Nothing was skipped in silence: busan never got row 2.
    let rows = mesh.rows("busan", Sql { pg: "", maria: KV_ROWS }).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn replaying_every_record_on_a_postgres_and_a_mariadb_master_changes_no_row() {
    let mut mesh = Mesh::new(&[("seoul", Kind::Pg), ("busan", Kind::Maria)], KV, &["public.kv"]).await;
    for (_, server) in &mesh.masters {
        if let Server::Mariadb(m) = server {
            m.sql("GRANT SELECT ON mmsync.tombstones TO 'app'@'%'").await.unwrap();
        }
    }
    mesh.start();
    let mut rng = Rng::new(seed("replay"));
    for (name, _) in &mesh.masters {
        let mut conn = mesh.writer(name).await;
        for _ in 0..100 {
            write(&mut conn, name, &mut rng, 30).await;
        }
    }
    let before = mesh.converged(Sql { pg: KV_ROWS, maria: KV_ROWS }).await;
    let status = mesh.run.take().unwrap().terminate().await;
    assert!(status.success());
    // Every master forgets what it applied: the next run applies every record again.
    let sum = "SELECT CAST(COALESCE(SUM(next_offset), 0) AS CHAR) FROM mmsync.applied_offsets";
    let mut applied = Vec::new();
    for (name, _) in &mesh.masters {
        let next: i64 = mesh
            .rows(
                name,
                Sql { pg: "SELECT coalesce(sum(next_offset), 0)::text FROM mmsync.applied_offsets", maria: sum },
            )
            .await[0]
            .parse()
            .unwrap();
        assert!(next > 0, "{name}");
        applied.push((name.clone(), next));
        match mesh.server(name) {
            Server::Postgres(_) => {
                sqlx::raw_sql("DELETE FROM mmsync.applied_offsets").execute(&mut mesh.pg(name).await).await.unwrap();
            }
            Server::Mariadb(m) => {
                let mut conn = Conn::from_url(m.url(DB).replacen("mariadb://", "mysql://", 1)).await.unwrap();
                conn.query_drop("DELETE FROM mmsync.applied_offsets").await.unwrap();
            }
        }
    }
    mesh.start();
    for (name, next) in &applied {
        mmsync::testbed::wait_for(&format!("{name} to apply every record again"), DEADLINE, || async {
            let sql = Sql { pg: "SELECT coalesce(sum(next_offset), 0)::text FROM mmsync.applied_offsets", maria: sum };
            let now: i64 = mesh.rows(name, sql).await[0].parse().ok()?;
            (now >= *next).then_some(())
        })
        .await;
    }
    assert_eq!(mesh.rows("seoul", Sql { pg: KV_ROWS, maria: KV_ROWS }).await, before);
    assert_eq!(mesh.rows("busan", Sql { pg: KV_ROWS, maria: KV_ROWS }).await, before);
    // Every record was skipped as held already: none took effect again.
    let listen = mmsync::topology::Topology::load(&mesh.topology).unwrap().metrics_listen;
    let metrics = mmsync::testbed::http_get(listen, "/metrics").await.unwrap();
    let applied = crate::common::metric_sum(&metrics, "mmsync_changes_applied_total", &[("table", "public.kv")]);
    let skipped = crate::common::metric_sum(&metrics, "mmsync_changes_skipped_total", &[("table", "public.kv")]);
    assert_eq!(applied, 0.0, "{metrics}");
    assert!(skipped >= 100.0, "{skipped}");
}

/// Two masters take the same unique value under different keys while
/// mmsync is down; once it runs, the newer write keeps it everywhere and the
/// older row goes everywhere, logged as a conflict on a master that saw it.
async fn a_unique_value_taken_twice_goes_to_the_newer_write(masters: &[(&str, Kind)]) {
    let users = Sql {
        pg: "CREATE TABLE users (id int PRIMARY KEY, email varchar(100) NOT NULL UNIQUE, name varchar(20))",
        maria: "CREATE TABLE users (id INT PRIMARY KEY, email VARCHAR(100) NOT NULL UNIQUE, name VARCHAR(20)) ENGINE = InnoDB",
    };
    let mut mesh = Mesh::new(masters, users, &["public.users"]).await;
    let insert = |id: i32, name: &'static str| {
        let sql: &'static str =
            Box::leak(format!("INSERT INTO users (id, email, name) VALUES ({id}, 'a@x', '{name}')").into_boxed_str());
        Sql { pg: sql, maria: sql }
    };
    mesh.exec("seoul", insert(1, "seoul")).await;
    mesh.exec("busan", insert(2, "busan")).await;
    mesh.start();
    let sql = "SELECT CONCAT_WS('|', id, email, name, mmsync_origin) FROM users ORDER BY id";
    let rows = mesh.converged(Sql { pg: sql, maria: sql }).await;
    assert_eq!(rows, ["2|a@x|busan|busan"]);
    let dead = mesh.dead_letters().await;
    assert!(dead.is_empty(), "{dead:?}");
    let mut logged = 0;
    for (name, _) in &mesh.masters {
        let count = "SELECT CAST(count(*) AS CHAR) FROM mmsync.conflicts WHERE kind = 'unique_value_lost'";
        let pg_count = "SELECT count(*)::text FROM mmsync.conflicts WHERE kind = 'unique_value_lost'";
        logged += mesh.rows(name, Sql { pg: pg_count, maria: count }).await[0].parse::<i32>().unwrap();
    }
    assert!(logged >= 1, "the loser was logged on some master");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_unique_value_two_mariadb_masters_took_under_different_keys_goes_to_the_newer_write() {
    a_unique_value_taken_twice_goes_to_the_newer_write(&[("seoul", Kind::Maria), ("busan", Kind::Maria)]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_unique_value_a_postgres_and_a_mariadb_master_took_goes_to_the_newer_write() {
    a_unique_value_taken_twice_goes_to_the_newer_write(&[("seoul", Kind::Pg), ("busan", Kind::Maria)]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_has_data_for_every_panel_with_a_mariadb_master_in_the_mesh() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let mut mesh = Mesh::new(&[("seoul", Kind::Pg), ("busan", Kind::Maria)], KV, &["public.kv"]).await;
    // Tombstones go a second after no master can undo them: the retention panels get data.
    let text = std::fs::read_to_string(&mesh.topology).unwrap();
    std::fs::write(&mesh.topology, format!("{text}tombstones_keep_seconds = 1\nheartbeat_interval_ms = 500\n"))
        .unwrap();
    for (_, server) in &mesh.masters {
        if let Server::Mariadb(m) = server {
            m.sql("GRANT SELECT ON mmsync.tombstones TO 'app'@'%'").await.unwrap();
        }
    }
    mesh.start();
    let listen = mmsync::topology::Topology::load(&mesh.topology).unwrap().metrics_listen;
    let prometheus = mmsync::testbed::Prometheus::start(&[listen]).await.expect("prometheus starts");
    // Conflicting writes on both, and one record that is not mmsync's.
    let seed = seed("mariadb observability");
    let mut tasks = Vec::new();
    for (i, (name, _)) in mesh.masters.iter().enumerate() {
        let mut conn = mesh.writer(name).await;
        let name = name.clone();
        let mut rng = Rng::new(seed + i as u64);
        tasks.push(tokio::spawn(async move {
            for _ in 0..300 {
                write(&mut conn, &name, &mut rng, 40).await;
            }
        }));
    }
    let producer: FutureProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", mesh.broker.address()).create().unwrap();
    let topic =
        mmsync::kafka::topic_name(&mesh.prefix, "busan", &mmsync::topology::TableName::parse("public.kv").unwrap());
    producer
        .send(FutureRecord::to(&topic).key("not json").payload("poison"), std::time::Duration::from_secs(10))
        .await
        .expect("delivered");
    for t in tasks {
        t.await.unwrap();
    }
    mesh.converged(Sql { pg: KV_ROWS, maria: KV_ROWS }).await;
    // busan's server dies and comes back: errors, and lag rising while it is away.
    let Some((_, Server::Mariadb(busan))) = mesh.masters.last_mut() else { panic!("busan is MariaDB") };
    busan.kill().await;
    let lag = || async {
        let metrics = mmsync::testbed::http_get(listen, "/metrics").await.ok()?;
        Some(crate::common::metric_sum(
            &metrics,
            "mmsync_replication_lag_seconds",
            &[("source", "seoul"), ("target", "busan")],
        ))
    };
    mmsync::testbed::wait_for("lag to busan to rise past 3 s", DEADLINE, || async { lag().await.filter(|l| *l > 3.0) })
        .await;
    let Some((_, Server::Mariadb(busan))) = mesh.masters.last_mut() else { panic!("busan is MariaDB") };
    busan.restart().await.expect("busan restarts");
    mmsync::testbed::wait_for("lag to busan to fall", DEADLINE, || async { lag().await.filter(|l| *l < 1.0) }).await;
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/grafana/dashboards/mmsync.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            mmsync::testbed::wait_for(&format!("data for {expr}"), DEADLINE, || async {
                prometheus.query(expr).await.ok().filter(|r| !r.is_empty())
            })
            .await;
        }
    }
    // busan's own series, not only seoul's, for what a MariaDB source reports.
    for expr in [
        "mmsync_binlog_kept_bytes{master=\"busan\"}",
        "mmsync_changes_captured_total{master=\"busan\"}",
        "mmsync_dead_letters_pending{master=\"busan\"}",
        "mmsync_replication_lag_seconds{source=\"busan\"}",
    ] {
        mmsync::testbed::wait_for(&format!("data for {expr}"), DEADLINE, || async {
            prometheus.query(expr).await.ok().filter(|r| !r.is_empty())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_record_a_mariadb_master_refuses_waits_as_a_dead_letter_and_applies_once_retried() {
    let kv = Sql {
        pg: KV.pg,
        maria: "CREATE TABLE kv (id INT PRIMARY KEY, val VARCHAR(40) NOT NULL, n INT NOT NULL,
                CONSTRAINT small CHECK (n < 100)) ENGINE = InnoDB",
    };
    let mut mesh = Mesh::new(&[("seoul", Kind::Pg), ("busan", Kind::Maria)], kv, &["public.kv"]).await;
    mesh.start();
    let write = "INSERT INTO kv (id, val, n) VALUES (1, 'fine', 1), (2, 'large', 500), (3, 'fine', 3)";
    mesh.exec("seoul", Sql { pg: write, maria: "" }).await;
    let dead = mmsync::testbed::wait_for("busan's dead letter", DEADLINE, || async {
        Some(mesh.dead_letters().await).filter(|d| !d.is_empty())
    })
    .await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].starts_with("busan: ") && dead[0].contains("small"), "{dead:?}");
    let sql = "SELECT CONCAT_WS('|', id, val, n) FROM kv ORDER BY id";
    mmsync::testbed::wait_for("the other rows on busan", DEADLINE, || async {
        (mesh.rows("busan", Sql { pg: "", maria: sql }).await == ["1|fine|1", "3|fine|3"]).then_some(())
    })
    .await;
    let (code, out) = mmsync(&mesh.topology, &["dead-letters", "list"]).await;
    assert_eq!(code, 1, "{out}");
    let line = out.lines().find(|l| l.starts_with("master \"busan\": #")).unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains("small"), "{out}");
    let id = line["master \"busan\": #".len()..].split(' ').next().unwrap().to_string();
    // Still refused: retried, it stays, with the reason.
    let (code, out) = mmsync(&mesh.topology, &["dead-letters", "--master", "busan", "retry"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("dead letter {id} still fails")) && out.contains("small"), "{out}");
    // Fixed, it applies.
    mesh.maria("busan").sql("ALTER TABLE shop.kv DROP CONSTRAINT small").await.unwrap();
    let (code, out) = mmsync(&mesh.topology, &["dead-letters", "--master", "busan", "retry"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("master \"busan\": 1 dead letter(s) applied"), "{out}");
    let rows = mesh.converged(Sql { pg: sql, maria: sql }).await;
    assert_eq!(rows, ["1|fine|1", "2|large|500", "3|fine|3"]);
    let (code, out) = mmsync(&mesh.topology, &["dead-letters", "list"]).await;
    assert_eq!(code, 0, "{out}");
}
