//! `mmsync join`: a master that joins a running mesh (or is rebuilt after a
//! loss) gets another master's rows, and the Kafka positions those rows
//! stand for, so that its sinks go on from there with no gap.
//!
//! The copy is read from the source master `from` in one snapshot
//! (REPEATABLE READ): its rows and tombstones, and the offsets up to which
//! `from` had applied the other masters' topics, which is exactly what that
//! snapshot holds of them. For `from`'s own topics, the positions are their
//! ends read just before the snapshot: every record before them is a change
//! committed before it. The new master's sinks start at those positions;
//! whatever the copy already holds and is applied again, or arrives twice,
//! is settled by last-writer-wins, as every change is (the copy is applied
//! through the sink's own rules, with the rows' own origins and versions).
//! A master being rebuilt keeps what is newer than the copy, and loses what
//! is older, including rows the copy's tombstones delete.
//!
//! The applications keep writing on every master meanwhile; `mmsync run`
//! must not (join holds every run lock): its sinks would start the new
//! master from nothing. A stopped join is simply run again.

use std::collections::HashMap;
use std::time::Instant;

use rdkafka::consumer::BaseConsumer;
use sqlx::{Connection, PgConnection, Row as _};

use crate::change::{Change, Key, Op, Position, Row};
use crate::error::{Error, Result};
use crate::schema::{describe, TableInfo};
use crate::topology::{quote_ident, quote_literal, TableName, Topology, ORIGIN_COLUMN, VERSION_COLUMN};

/// What joining copied of one table.
#[derive(Debug, Clone)]
pub struct Copied {
    pub table: TableName,
    pub rows: u64,
    pub tombstones: u64,
    /// Rows the new master refused (kept as its dead letters).
    pub refused: u64,
    pub seconds: f64,
}

/// Copies `from`'s synced tables to master `new` and records where `new`'s
/// sinks go on. `progress` is called after each batch with (table, rows
/// copied so far).
pub async fn join(
    topology: &Topology,
    new: &str,
    from: &str,
    batch_rows: u64,
    mut progress: impl FnMut(&TableName, u64),
) -> Result<Vec<Copied>> {
    let setup = |problem: String| Error::Setup {
        master: new.to_string(),
        problem,
        fix: format!(
            "name masters of the topology: `mmsync join --master NEW --from EXISTING` ({})",
            topology.masters.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ")
        ),
    };
    let target = topology.master(new).ok_or_else(|| setup(format!("{new:?} is not a master of the topology")))?;
    let source = topology.master(from).ok_or_else(|| setup(format!("{from:?} is not a master of the topology")))?;
    if new == from {
        return Err(setup("a master cannot join from itself".into()));
    }
    let mut locks = Vec::new();
    for master in &topology.masters {
        locks.push(crate::fence::acquire_as(master, "join").await?);
    }

    // The ends of `from`'s own topics, before its snapshot.
    let consumer: BaseConsumer = crate::kafka::consumer(&topology.kafka, &format!("mmsync-join-{new}"))?;
    let mut positions: HashMap<(String, i32), i64> = HashMap::new();
    let topics: Vec<String> =
        crate::kafka::all_topics(topology).into_iter().filter(|(m, _, _)| m == from).map(|(_, _, t)| t).collect();
    let ends = crate::kafka::ends(&consumer, &topics)?;
    if let Some(topic) = topics.iter().find(|t| !ends.iter().any(|(e, _, _)| e == *t)) {
        return Err(Error::Missing {
            master: from.to_string(),
            problem: format!("topic {topic} does not exist"),
            fix: "run `mmsync init`".into(),
        });
    }
    for (topic, p, high) in ends {
        positions.insert((topic, p), high);
    }

    let mut read = crate::db::connect(source).await?;
    let mut write = crate::db::connect(target).await?;
    let db = |master: &str, what: String| Error::db(master, what);
    sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut read)
        .await
        .map_err(db(from, "beginning the snapshot".into()))?;
    // What the snapshot holds of the other masters' topics (not the new one's).
    let own: Vec<String> = crate::kafka::all_topics(topology)
        .into_iter()
        .filter(|(m, _, _)| m == new || m == from)
        .map(|(_, _, t)| t)
        .collect();
    let applied: Vec<(String, i32, i64)> =
        sqlx::query_as("SELECT topic, partition, next_offset FROM mmsync.applied_offsets")
            .fetch_all(&mut read)
            .await
            .map_err(db(from, "reading applied offsets".into()))?;
    let known: Vec<String> = crate::kafka::all_topics(topology).into_iter().map(|(_, _, t)| t).collect();
    for (topic, p, next) in applied {
        if known.contains(&topic) && !own.contains(&topic) {
            positions.insert((topic, p), next);
        }
    }

    let mut report = Vec::new();
    for table in &topology.tables {
        let missing = |m: &str| Error::Setup {
            master: m.to_string(),
            problem: format!("table {table} does not exist"),
            fix: "create it like on the other masters, then run `mmsync init`".into(),
        };
        let from_info = describe(&mut read, from, table).await?.ok_or_else(|| missing(from))?;
        let new_info = describe(&mut write, new, table).await?.ok_or_else(|| missing(new))?;
        let copied =
            copy_table(&mut read, &mut write, topology, from, new, &from_info, new_info, batch_rows, &mut progress)
                .await?;
        report.push(copied);
    }
    sqlx::query("ROLLBACK").execute(&mut read).await.map_err(db(from, "ending the snapshot".into()))?;

    // Where the new master's sinks go on, in one transaction.
    let positions: std::collections::BTreeMap<(String, i32), i64> = positions.into_iter().collect();
    crate::sink::store_offsets(&mut write, new, &positions, &Default::default()).await?;
    drop(locks);
    Ok(report)
}

#[allow(clippy::too_many_arguments)]
async fn copy_table(
    read: &mut PgConnection,
    write: &mut PgConnection,
    topology: &Topology,
    from: &str,
    new: &str,
    info: &TableInfo,
    new_info: TableInfo,
    batch_rows: u64,
    progress: &mut impl FnMut(&TableName, u64),
) -> Result<Copied> {
    let started = Instant::now();
    let table = &info.name;
    let t = table.quoted();
    let (o, v) = (quote_ident(ORIGIN_COLUMN), quote_ident(VERSION_COLUMN));
    let columns: Vec<&str> = info.data_columns().map(|c| c.name.as_str()).collect();
    // Values in the text of each type's output function, as pgoutput sends them.
    let names: Vec<String> = columns.iter().map(|c| quote_literal(c)).collect();
    let values: Vec<String> = columns
        .iter()
        .map(|c| format!("CASE WHEN t.{0} IS NULL THEN NULL ELSE concat(t.{0}) END", quote_ident(c)))
        .collect();
    let select = format!(
        "SELECT jsonb_object(ARRAY[{}]::text[], ARRAY[{}]::text[]), t.{v}, t.{o}::text FROM {t} AS t
         WHERE t.{o} <> '' AND ctid >= format('(%s,0)', $1::int8)::tid AND ctid < format('(%s,0)', $2::int8)::tid",
        names.join(", "),
        values.join(", ")
    );
    let (rows, blocks): (i64, i64) = sqlx::query_as(&format!(
        "SELECT (SELECT count(*) FROM {t}), pg_relation_size({})::int8 / current_setting('block_size')::int8",
        quote_literal(&t)
    ))
    .fetch_one(&mut *read)
    .await
    .map_err(Error::db(from, format!("sizing {table}")))?;
    let step = ((batch_rows as f64 / (rows as f64 / blocks.max(1) as f64).max(1.0)).ceil() as i64).max(1);
    let position = Position { master: from.to_string(), lsn: 0, txid: 0, commit_ms: crate::metrics::now_ms() };
    let change = |op: Op, key: Key, row: Option<Row>, origin: String, version: i64| Change {
        table: table.clone(),
        op,
        key,
        row,
        unchanged: Vec::new(),
        superseded: false,
        origin,
        version,
        position: position.clone(),
    };
    let mut done = Copied { table: table.clone(), rows: 0, tombstones: 0, refused: 0, seconds: 0.0 };
    let mut block = 0i64;
    while block < blocks {
        let batch = sqlx::query(&select)
            .bind(block)
            .bind(block + step)
            .fetch_all(&mut *read)
            .await
            .map_err(Error::db(from, format!("reading {table}")))?;
        block += step;
        let mut changes = Vec::with_capacity(batch.len());
        for r in batch {
            let row: Row = serde_json::from_value(r.get::<serde_json::Value, _>(0)).expect("a JSON object of text");
            let key: Key =
                info.key.iter().map(|k| (k.clone(), row.get(k).cloned().flatten().unwrap_or_default())).collect();
            changes.push(change(Op::Insert, key, Some(row), r.get(2), r.get(1)));
        }
        done.rows += changes.len() as u64;
        done.refused += apply(write, topology, new, from, &new_info, changes).await?;
        progress(table, done.rows);
    }
    // Its tombstones, so that an older change arriving later stays deleted.
    let tombstones: Vec<(serde_json::Value, i64, String)> = sqlx::query_as(
        "SELECT key, version, origin::text FROM mmsync.tombstones WHERE schema_name = $1 AND table_name = $2",
    )
    .bind(&table.schema)
    .bind(&table.name)
    .fetch_all(&mut *read)
    .await
    .map_err(Error::db(from, format!("reading the tombstones of {table}")))?;
    for chunk in tombstones.chunks(batch_rows.max(1) as usize) {
        let changes: Vec<Change> = chunk
            .iter()
            .map(|(key, version, origin)| {
                let key: Key = serde_json::from_value(key.clone()).unwrap_or_default();
                change(Op::Delete, key, None, origin.clone(), *version)
            })
            .collect();
        done.tombstones += changes.len() as u64;
        done.refused += apply(write, topology, new, from, &new_info, changes).await?;
    }
    done.seconds = started.elapsed().as_secs_f64();
    Ok(done)
}

/// One batch on the new master, in its own transaction; returns how many it refused.
async fn apply(
    write: &mut PgConnection,
    topology: &Topology,
    new: &str,
    from: &str,
    info: &TableInfo,
    changes: Vec<Change>,
) -> Result<u64> {
    if changes.is_empty() {
        return Ok(0);
    }
    let mut tx = write.begin().await.map_err(Error::db(new, "beginning a transaction"))?;
    let (_, dead) =
        crate::sink::apply_changes(&mut tx, new, info.clone(), topology.sync.max_clock_skew, from, changes).await?;
    let refused = dead.len() as u64;
    for d in dead {
        d.keep(&mut tx, new).await?;
    }
    tx.commit().await.map_err(Error::db(new, "committing a batch of the copy"))?;
    Ok(refused)
}
