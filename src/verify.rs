//! `mmsync verify`: are the synced tables identical on every master?
//!
//! Each master is read in one REPEATABLE READ READ ONLY transaction (a
//! consistent snapshot; nothing is written). Rows are spread over buckets by a
//! hash of their primary key; per bucket each master reports a count and a
//! hash of its rows (all columns, mmsync's included). Only buckets that differ
//! are read key by key, so a large table that matches costs one scan per master.
//!
//! With a MariaDB master in the topology the rows' text differs between the
//! kinds (booleans, instants, JSON spacing), so [`by_stamps`] compares what
//! last-writer-wins decides instead: per key, the (version, origin) of the
//! row each master holds. Rows are streamed (not held) in one consistent
//! snapshot per master, buckets summed on mmsync's side, and only the keys
//! of differing buckets kept.

use std::collections::{BTreeMap, BTreeSet};

use sqlx::{PgConnection, Row as _};

use crate::error::{Error, Result};
use crate::postgres::schema::describe;
use crate::topology::{TableName, Topology, ORIGIN_COLUMN, VERSION_COLUMN};

/// Buckets per table.
const BUCKETS: i32 = 256;

/// What one table looks like across the masters.
#[derive(Debug)]
pub struct TableReport {
    pub table: TableName,
    /// Rows per master, in topology order.
    pub rows: Vec<(String, i64)>,
    /// Keys whose rows differ, at most the requested number.
    pub differences: Vec<KeyDifference>,
    /// How many keys differ in all.
    pub differing_keys: usize,
}

impl TableReport {
    pub fn identical(&self) -> bool {
        self.differing_keys == 0
    }
}

/// One key and what each master holds for it: `None` when the row is missing.
#[derive(Debug)]
pub struct KeyDifference {
    pub key: String,
    pub masters: Vec<(String, Option<(i64, String)>)>,
}

type Bucket = (i64, String);

/// Compares `tables` (all synced tables when `None`) on every master.
pub async fn verify(topology: &Topology, only: Option<&TableName>, max_keys: usize) -> Result<Vec<TableReport>> {
    let tables: Vec<&TableName> = topology.tables.iter().filter(|t| only.is_none_or(|o| o == *t)).collect();
    if let Some(o) = only {
        if tables.is_empty() {
            return Err(Error::Setup {
                master: topology.masters[0].name.clone(),
                problem: format!("table {o} is not in [sync] tables"),
                fix: "name one of the synced tables".into(),
            });
        }
    }
    if topology.masters.iter().any(|m| m.database() == crate::topology::Database::Mariadb) {
        let mut reports = Vec::new();
        for table in tables {
            reports.push(by_stamps::verify_table(topology, table, max_keys).await?);
        }
        return Ok(reports);
    }
    let mut conns = Vec::new();
    for m in &topology.masters {
        let mut conn = crate::postgres::db::connect(m).await?;
        sqlx::raw_sql("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut conn)
            .await
            .map_err(Error::db(&m.name, "starting a snapshot"))?;
        conns.push((m.name.clone(), conn));
    }
    let mut reports = Vec::new();
    for table in tables {
        reports.push(verify_table(&mut conns, table, max_keys).await?);
    }
    Ok(reports)
}

async fn verify_table(conns: &mut [(String, PgConnection)], table: &TableName, max_keys: usize) -> Result<TableReport> {
    let mut per_master: Vec<BTreeMap<i32, Bucket>> = Vec::new();
    let mut queries = Vec::new();
    for (name, conn) in conns.iter_mut() {
        let info = describe(conn, name, table).await?.ok_or_else(|| Error::Setup {
            master: name.clone(),
            problem: format!("table {table} does not exist"),
            fix: "create it on every master".into(),
        })?;
        let source = format!(
            "(SELECT {key} AS k, x::text AS r, x.{v} AS v, x.{o}::text AS o FROM {t} AS x) s",
            key = info.key_json_sql("x"),
            t = table.quoted(),
            v = crate::topology::quote_ident(VERSION_COLUMN),
            o = crate::topology::quote_ident(ORIGIN_COLUMN),
        );
        let rows = sqlx::query(&format!(
            "SELECT (hashtext(k::text) & {mask})::int4, count(*), md5(string_agg(md5(r), '' ORDER BY k::text)) FROM {source} GROUP BY 1",
            mask = BUCKETS - 1
        ))
        .fetch_all(&mut *conn)
        .await
        .map_err(Error::db(name, format!("hashing {table}")))?;
        per_master
            .push(rows.iter().map(|r| (r.get::<i32, _>(0), (r.get::<i64, _>(1), r.get::<String, _>(2)))).collect());
        queries.push(source);
    }
    let rows = conns.iter().zip(&per_master).map(|((n, _), b)| (n.clone(), b.values().map(|(c, _)| c).sum())).collect();
    let buckets: BTreeSet<i32> = per_master.iter().flat_map(|b| b.keys().copied()).collect();
    let differing: Vec<i32> =
        buckets.into_iter().filter(|b| per_master.iter().any(|m| m.get(b) != per_master[0].get(b))).collect();
    if differing.is_empty() {
        return Ok(TableReport { table: table.clone(), rows, differences: Vec::new(), differing_keys: 0 });
    }

    // Narrow the differing buckets down to keys.
    /// Per key, per master: (row hash, version, origin), or nothing.
    type Held = Vec<Option<(String, i64, String)>>;
    let mut keys: BTreeMap<String, Held> = BTreeMap::new();
    let masters = conns.len();
    for (i, ((name, conn), source)) in conns.iter_mut().zip(&queries).enumerate() {
        let rows = sqlx::query(&format!(
            "SELECT k::text, md5(r), v, o FROM {source} WHERE (hashtext(k::text) & {mask})::int4 = ANY($1)",
            mask = BUCKETS - 1
        ))
        .bind(&differing)
        .fetch_all(&mut *conn)
        .await
        .map_err(Error::db(name, format!("reading differing keys of {table}")))?;
        for r in rows {
            let slot = keys.entry(r.get(0)).or_insert_with(|| vec![None; masters]);
            slot[i] = Some((r.get(1), r.get(2), r.get(3)));
        }
    }
    let differences: Vec<KeyDifference> = keys
        .into_iter()
        .filter(|(_, held)| held.iter().any(|h| h.as_ref().map(|x| &x.0) != held[0].as_ref().map(|x| &x.0)))
        .map(|(key, held)| KeyDifference {
            key,
            masters: conns.iter().zip(held).map(|((n, _), h)| (n.clone(), h.map(|(_, v, o)| (v, o)))).collect(),
        })
        .collect();
    let differing_keys = differences.len();
    Ok(TableReport {
        table: table.clone(),
        rows,
        differences: differences.into_iter().take(max_keys).collect(),
        differing_keys,
    })
}

/// Verify by (version, origin) per key, for topologies with MariaDB masters.
mod by_stamps {
    use std::collections::{BTreeMap, HashMap};
    use std::hash::{Hash, Hasher};

    use futures_util::TryStreamExt;
    use mysql_async::prelude::Queryable;
    use sqlx::Row as _;

    use super::{KeyDifference, TableReport, BUCKETS};
    use crate::change::{encode_key, Key};
    use crate::error::{Error, Result};
    use crate::topology::{Database, Master, TableName, Topology, ORIGIN_COLUMN, VERSION_COLUMN};

    /// A master's snapshot, open for the two passes.
    enum Snapshot {
        Postgres(sqlx::PgConnection),
        Mariadb(mysql_async::Conn, String),
    }

    fn hash(text: &str) -> u64 {
        // DefaultHasher::new() has fixed keys: the same on every run.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        text.hash(&mut h);
        h.finish()
    }

    fn bucket(key: &str) -> i32 {
        (hash(key) % BUCKETS as u64) as i32
    }

    impl Snapshot {
        async fn open(m: &Master) -> Result<Snapshot> {
            Ok(match m.database() {
                Database::Postgres => {
                    let mut conn = crate::postgres::db::connect(m).await?;
                    sqlx::raw_sql("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                        .execute(&mut conn)
                        .await
                        .map_err(Error::db(&m.name, "starting a snapshot"))?;
                    Snapshot::Postgres(conn)
                }
                Database::Mariadb => {
                    let mut conn = crate::mariadb::db::connect(m).await?;
                    conn.query_drop("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                        .await
                        .and(conn.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY").await)
                        .map_err(Error::mariadb(&m.name, "starting a snapshot"))?;
                    Snapshot::Mariadb(conn, crate::mariadb::db::url_database(m)?)
                }
            })
        }

        /// Calls `each(key text, version, origin)` for every row of `table`.
        async fn rows(
            &mut self,
            master: &str,
            table: &TableName,
            mut each: impl FnMut(String, i64, String),
        ) -> Result<()> {
            let missing = || Error::Setup {
                master: master.to_string(),
                problem: format!("table {table} does not exist"),
                fix: "create it on every master".into(),
            };
            match self {
                Snapshot::Postgres(conn) => {
                    let info = crate::postgres::schema::describe(conn, master, table).await?.ok_or_else(missing)?;
                    let sql = format!(
                        "SELECT {}::text, x.{}, x.{}::text FROM {} AS x",
                        info.key_json_sql("x"),
                        crate::topology::quote_ident(VERSION_COLUMN),
                        crate::topology::quote_ident(ORIGIN_COLUMN),
                        table.quoted()
                    );
                    let mut rows = sqlx::query(&sql).fetch(&mut *conn);
                    while let Some(r) = rows.try_next().await.map_err(Error::db(master, format!("reading {table}")))? {
                        let key: Key = serde_json::from_str(r.get::<&str, _>(0)).unwrap_or_default();
                        each(encode_key(&key), r.get(1), r.get(2));
                    }
                }
                Snapshot::Mariadb(conn, url_db) => {
                    let info = crate::mariadb::db::describe(conn, master, table, url_db).await?.ok_or_else(missing)?;
                    let q = crate::mariadb::db::quote_ident;
                    let keys: Vec<String> = info.key.iter().map(|k| format!("CAST({} AS CHAR)", q(k))).collect();
                    let sql = format!(
                        "SELECT {}, {}, {} FROM {}",
                        keys.join(", "),
                        q(VERSION_COLUMN),
                        q(ORIGIN_COLUMN),
                        info.quoted()
                    );
                    let n = info.key.len();
                    let read = |e| Error::mariadb(master, format!("reading {table}"))(e);
                    let mut result = conn.query_iter(sql).await.map_err(read)?;
                    result
                        .for_each(|mut r| {
                            let mut key = Key::new();
                            for (i, k) in info.key.iter().enumerate() {
                                key.insert(k.clone(), r.take::<String, _>(i).unwrap_or_default());
                            }
                            each(encode_key(&key), r.take(n).unwrap_or(0), r.take(n + 1).unwrap_or_default());
                        })
                        .await
                        .map_err(read)?;
                }
            }
            Ok(())
        }
    }

    pub(super) async fn verify_table(topology: &Topology, table: &TableName, max_keys: usize) -> Result<TableReport> {
        let mut snapshots = Vec::new();
        for m in &topology.masters {
            snapshots.push((m.name.clone(), Snapshot::open(m).await?));
        }
        // Pass 1: per bucket, a count and an order-free sum of the stamps' hashes.
        let mut per_master: Vec<HashMap<i32, (i64, u64)>> = Vec::new();
        for (name, snap) in snapshots.iter_mut() {
            let mut buckets: HashMap<i32, (i64, u64)> = HashMap::new();
            snap.rows(name, table, |key, version, origin| {
                let b = buckets.entry(bucket(&key)).or_default();
                b.0 += 1;
                b.1 = b.1.wrapping_add(hash(&format!("{key}|{version}|{origin}")));
            })
            .await?;
            per_master.push(buckets);
        }
        let rows: Vec<(String, i64)> = snapshots
            .iter()
            .zip(&per_master)
            .map(|((n, _), b)| (n.clone(), b.values().map(|(c, _)| c).sum()))
            .collect();
        let all: std::collections::BTreeSet<i32> = per_master.iter().flat_map(|b| b.keys().copied()).collect();
        let differing: std::collections::HashSet<i32> =
            all.into_iter().filter(|b| per_master.iter().any(|m| m.get(b) != per_master[0].get(b))).collect();
        if differing.is_empty() {
            return Ok(TableReport { table: table.clone(), rows, differences: Vec::new(), differing_keys: 0 });
        }
        // Pass 2: the keys of the differing buckets, from the same snapshots.
        let masters = snapshots.len();
        let mut keys: BTreeMap<String, Vec<Option<(i64, String)>>> = BTreeMap::new();
        for (i, (name, snap)) in snapshots.iter_mut().enumerate() {
            snap.rows(name, table, |key, version, origin| {
                if differing.contains(&bucket(&key)) {
                    keys.entry(key).or_insert_with(|| vec![None; masters])[i] = Some((version, origin));
                }
            })
            .await?;
        }
        let differences: Vec<KeyDifference> = keys
            .into_iter()
            .filter(|(_, held)| held.iter().any(|h| *h != held[0]))
            .map(|(key, held)| KeyDifference {
                key,
                masters: snapshots.iter().map(|(n, _)| n.clone()).zip(held).collect(),
            })
            .collect();
        let differing_keys = differences.len();
        Ok(TableReport {
            table: table.clone(),
            rows,
            differences: differences.into_iter().take(max_keys).collect(),
            differing_keys,
        })
    }
}
