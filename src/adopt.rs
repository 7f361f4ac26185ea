//! `mmsync adopt`: masters that already held rows before `mmsync init`.
//!
//! Such rows have no origin and version 0 (the defaults of the columns
//! `init` added), so no source sends them and last-writer-wins cannot
//! settle two masters' different rows of one key. Adopting stamps them,
//! on every master, in place: each row gets its master as origin and a
//! version by a rule every master applies alike, written with the
//! applier's session (no trigger of the application fires, nothing else
//! changes). Those writes are in each master's WAL after its slot was made,
//! so the sources send them like any change, and the sinks settle each key
//! by last-writer-wins: no separate copy, no snapshot to line up with the
//! stream, and the applications keep writing meanwhile (their writes get
//! versions from the clock, above every adopted one, and win).
//!
//! The rules: with `--seed M`, M's rows get version 2 and the others'
//! version 1, so where masters hold the same key, M's row wins, and among
//! the others the greater master name; with `--version-column C`, each row
//! gets the time in C (a timestamp) as its version, so the most recently
//! updated row wins. Every row that loses is logged, whole, in
//! `mmsync.conflicts` on the master whose row won.
//!
//! Adopting must finish on every master before any sink applies: a sink
//! would otherwise overwrite a row not yet stamped. So it holds every
//! master's run lock, and `mmsync run` cannot start until it is done. A
//! killed adopt is simply run again: it stamps only rows still without an
//! origin.

use std::time::Instant;

use sqlx::{Connection, PgConnection};

use crate::error::{Error, Result};
use crate::postgres::schema::describe;
use crate::topology::{quote_ident, quote_literal, Master, TableName, Topology, ORIGIN_COLUMN, VERSION_COLUMN};

/// How each master's existing rows get their versions.
#[derive(Debug, Clone)]
pub enum Rule {
    /// This master's rows win where masters hold the same key.
    Seed(String),
    /// The newest value of this (timestamp) column wins.
    VersionColumn(String),
}

/// What adopting did on one master and table.
#[derive(Debug, Clone)]
pub struct Adopted {
    pub master: String,
    pub table: TableName,
    pub rows: u64,
    pub seconds: f64,
}

/// Stamps every master's rows that have no origin yet; reports each table.
/// `progress` is called after each batch with (master, table, rows stamped
/// so far, rows to stamp at the start).
pub async fn adopt(
    topology: &Topology,
    rule: &Rule,
    batch_rows: u64,
    mut progress: impl FnMut(&str, &TableName, u64, u64),
) -> Result<Vec<Adopted>> {
    if let Rule::Seed(seed) = rule {
        if topology.master(seed).is_none() {
            return Err(Error::Setup {
                master: seed.clone(),
                problem: "--seed names no master of the topology".into(),
                fix: format!(
                    "name one of {}",
                    topology.masters.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ")
                ),
            });
        }
    }
    // Every run lock first: no sink may apply while any master is unstamped.
    let mut locks = Vec::new();
    for master in &topology.masters {
        locks.push(crate::fence::acquire_as(master, "adopt").await?);
    }
    let mut report = Vec::new();
    for master in &topology.masters {
        let mut conn = crate::postgres::db::connect(master).await?;
        for table in &topology.tables {
            let done = adopt_table(&mut conn, master, table, rule, batch_rows, &mut progress).await?;
            report.push(done);
        }
    }
    drop(locks);
    Ok(report)
}

async fn adopt_table(
    conn: &mut PgConnection,
    master: &Master,
    table: &TableName,
    rule: &Rule,
    batch_rows: u64,
    progress: &mut impl FnMut(&str, &TableName, u64, u64),
) -> Result<Adopted> {
    let name = master.name.as_str();
    let db = |what: String| Error::db(name, what);
    let info = describe(conn, name, table).await?.ok_or_else(|| Error::Setup {
        master: name.to_string(),
        problem: format!("table {table} does not exist"),
        fix: "create it, then run `mmsync init`".into(),
    })?;
    let (o, v) = (quote_ident(ORIGIN_COLUMN), quote_ident(VERSION_COLUMN));
    if info.column(ORIGIN_COLUMN).is_none() {
        return Err(Error::Setup {
            master: name.to_string(),
            problem: format!("table {table} has no {ORIGIN_COLUMN}"),
            fix: "run `mmsync init` first".into(),
        });
    }
    let version = match rule {
        Rule::Seed(seed) if seed == name => "2".to_string(),
        Rule::Seed(_) => "1".to_string(),
        Rule::VersionColumn(column) => {
            if info.column(column).is_none() {
                return Err(Error::Setup {
                    master: name.to_string(),
                    problem: format!("table {table} has no column {column:?} (--version-column)"),
                    fix: "name a timestamp column every synced table has, or use --seed".into(),
                });
            }
            // Never beyond the clock (a source would refuse it), never
            // below the first version, as a later write of the application.
            format!(
                "greatest(1, least(mmsync.now_us(), (extract(epoch FROM {}) * 1000000)::int8))",
                quote_ident(column)
            )
        }
    };
    let t = table.quoted();
    let (pending, blocks): (i64, i64) = sqlx::query_as(&format!(
        "SELECT (SELECT count(*) FROM {t} WHERE {o} = ''),
                (pg_relation_size({})::int8 / current_setting('block_size')::int8)",
        quote_literal(&t)
    ))
    .fetch_one(&mut *conn)
    .await
    .map_err(db(format!("counting the rows of {table} to adopt")))?;
    let started = Instant::now();
    let mut stamped = 0u64;
    if pending > 0 {
        // Batches by physical blocks (a TID range scan each), so a batch
        // costs its own rows, not the table's: rows written since init live
        // in any block, but have an origin and are left alone.
        let per_block = (pending as f64 / blocks.max(1) as f64).max(1.0);
        let step = ((batch_rows as f64 / per_block).ceil() as i64).max(1);
        let sql = format!(
            "UPDATE {t} SET {o} = $1, {v} = {version}
             WHERE ctid >= format('(%s,0)', $2::int8)::tid AND ctid < format('(%s,0)', $3::int8)::tid AND {o} = ''"
        );
        let mut block = 0i64;
        while block < blocks {
            let mut tx = conn.begin().await.map_err(db("beginning a transaction".into()))?;
            sqlx::query(crate::postgres::apply::APPLIER_SESSION)
                .execute(&mut *tx)
                .await
                .map_err(db("marking the adopting session".into()))?;
            let done = sqlx::query(&sql)
                .bind(name)
                .bind(block)
                .bind(block + step)
                .execute(&mut *tx)
                .await
                .map_err(db(format!("stamping the existing rows of {table}")))?;
            tx.commit().await.map_err(db("committing a batch".into()))?;
            stamped += done.rows_affected();
            block += step;
            progress(name, table, stamped, pending as u64);
        }
    }
    Ok(Adopted {
        master: name.to_string(),
        table: table.clone(),
        rows: stamped,
        seconds: started.elapsed().as_secs_f64(),
    })
}
