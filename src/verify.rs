//! `mmsync verify`: are the synced tables identical on every master?
//!
//! Each master is read in one REPEATABLE READ READ ONLY transaction (a
//! consistent snapshot; nothing is written). Rows are spread over buckets by a
//! hash of their primary key; per bucket each master reports a count and a
//! hash of its rows (all columns, mmsync's included). Only buckets that differ
//! are read key by key, so a large table that matches costs one scan per master.

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
