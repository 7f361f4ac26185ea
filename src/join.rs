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
//! master from nothing.
//!
//! A join that was stopped (killed, or its source master lost) goes on where
//! it stopped when run again: the positions of the first run and how far each
//! table came are stored on the new master (`mmsync.join_progress`,
//! `mmsync.join_tables`, each table's progress in the transaction of its
//! batch). The run that goes on reads a newer snapshot, and what changed
//! between the two, in ranges already copied or not, is in Kafka after the
//! first run's positions, where the sinks read it: nothing is missed, and
//! what arrives twice is settled by last-writer-wins. (A row an update moved
//! from a range not yet copied into one already copied is such a change.)

use std::collections::HashMap;
use std::time::Instant;

use futures_util::TryStreamExt as _;
use sqlx::{Connection, PgConnection, Row as _};

use crate::change::{Change, Key, Op, Position, Row};
use crate::error::{Error, Result};
use crate::postgres::schema::{describe, exec, TableInfo};
use crate::topology::{quote_ident, quote_literal, TableName, Topology, ORIGIN_COLUMN, VERSION_COLUMN};

/// What joining copied of one table.
#[derive(Debug, Clone)]
pub struct Copied {
    pub table: TableName,
    pub rows: u64,
    pub tombstones: u64,
    /// Rows the new master refused (kept as its dead letters).
    pub refused: u64,
    /// Rows an earlier join that was stopped had copied (this one went on from there).
    pub resumed_from: u64,
    pub seconds: f64,
}

/// Copies `from`'s synced tables to master `new` and records where `new`'s
/// sinks go on. `progress` is called after each batch with (table, rows
/// copied so far, rows the table holds about).
pub async fn join(
    topology: &Topology,
    new: &str,
    from: &str,
    batch_rows: u64,
    mut progress: impl FnMut(&TableName, u64, u64),
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

    let mut read = crate::postgres::db::connect(source).await?;
    let mut write = crate::postgres::db::connect(target).await?;
    let db = |master: &str, what: String| Error::db(master, what);
    // A batch lost to a crash of the new master is copied again (its mark is
    // in its transaction), so its commits need not wait for the disk.
    exec(&mut write, new, "setting synchronous_commit", "SET synchronous_commit = off").await?;

    // A join stopped before goes on, from the same master, with its positions.
    let stored: Option<(String, serde_json::Value)> =
        sqlx::query_as("SELECT from_master, positions FROM mmsync.join_progress")
            .fetch_optional(&mut write)
            .await
            .map_err(db(new, "reading mmsync.join_progress (has `mmsync init` run?)".into()))?;
    let resumed = match stored {
        Some((was, positions)) if was == from => {
            let positions: Vec<(String, i32, i64)> = serde_json::from_value(positions)
                .map_err(|e| Error::Internal(format!("mmsync.join_progress holds unreadable positions: {e}")))?;
            tracing::info!("{new}: going on with the join from {from} that was stopped");
            Some(positions.into_iter().map(|(t, p, o)| ((t, p), o)).collect::<HashMap<_, _>>())
        }
        Some((was, _)) => {
            tracing::warn!("{new}: a join from {was} was stopped; starting over from {from}");
            None
        }
        None => None,
    };

    let positions = match resumed {
        Some(positions) => {
            sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                .execute(&mut read)
                .await
                .map_err(db(from, "beginning the snapshot".into()))?;
            positions
        }
        None => {
            let positions = first_positions(topology, &mut read, new, from).await?;
            let list: Vec<(&String, &i32, &i64)> = positions.iter().map(|((t, p), o)| (t, p, o)).collect();
            let mut tx = write.begin().await.map_err(db(new, "beginning".into()))?;
            sqlx::raw_sql("DELETE FROM mmsync.join_progress; DELETE FROM mmsync.join_tables")
                .execute(&mut *tx)
                .await
                .map_err(db(new, "clearing mmsync.join_progress".into()))?;
            sqlx::query("INSERT INTO mmsync.join_progress (from_master, positions) VALUES ($1, $2)")
                .bind(from)
                .bind(serde_json::to_value(list).expect("plain data"))
                .execute(&mut *tx)
                .await
                .map_err(db(new, "storing the join's positions".into()))?;
            tx.commit().await.map_err(db(new, "storing the join's positions".into()))?;
            positions
        }
    };

    let link = Link { topology, from, new };
    let mut report = Vec::new();
    for table in &topology.tables {
        let missing = |m: &str| Error::Setup {
            master: m.to_string(),
            problem: format!("table {table} does not exist"),
            fix: "create it like on the other masters, then run `mmsync init`".into(),
        };
        let from_info = describe(&mut read, from, table).await?.ok_or_else(|| missing(from))?;
        let new_info = describe(&mut write, new, table).await?.ok_or_else(|| missing(new))?;
        let copied = copy_table(&mut read, &mut write, link, &from_info, new_info, batch_rows, &mut progress).await?;
        report.push(copied);
    }
    sqlx::query("ROLLBACK").execute(&mut read).await.map_err(db(from, "ending the snapshot".into()))?;

    // Where the new master's sinks go on, and the join is over, in one transaction.
    let positions: std::collections::BTreeMap<(String, i32), i64> = positions.into_iter().collect();
    let mut tx = write.begin().await.map_err(db(new, "beginning".into()))?;
    // This commit ends the join: it waits for the disk. Offsets the new
    // master held before (a master rebuilt with its mmsync tables) go, and
    // with them their commit times, which would vouch for what it no
    // longer holds (tombstone retention).
    exec(&mut tx, new, "setting synchronous_commit", "SET LOCAL synchronous_commit = on").await?;
    exec(&mut tx, new, "clearing old offsets", "DELETE FROM mmsync.applied_offsets").await?;
    crate::postgres::apply::store_offsets(&mut tx, new, &positions, &Default::default()).await?;
    sqlx::raw_sql("DELETE FROM mmsync.join_progress; DELETE FROM mmsync.join_tables")
        .execute(&mut *tx)
        .await
        .map_err(db(new, "clearing mmsync.join_progress".into()))?;
    tx.commit().await.map_err(db(new, "storing the positions".into()))?;
    drop(locks);
    Ok(report)
}

/// Where the new master's sinks will go on: the ends of `from`'s own topics,
/// read before its snapshot (every record before them is a change that
/// snapshot holds), and for the other masters' topics the offsets up to
/// which `from` had applied them in that snapshot. Leaves `read` in that
/// snapshot.
async fn first_positions(
    topology: &Topology,
    read: &mut PgConnection,
    new: &str,
    from: &str,
) -> Result<HashMap<(String, i32), i64>> {
    let mut positions: HashMap<(String, i32), i64> = HashMap::new();
    let topics: Vec<String> =
        crate::kafka::all_topics(topology).into_iter().filter(|(m, _, _)| m == from).map(|(_, _, t)| t).collect();
    let ends = crate::kafka::topic_ends(&topology.kafka, topics.clone()).await?;
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
    sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *read)
        .await
        .map_err(Error::db(from, "beginning the snapshot"))?;
    // What the snapshot holds of the other masters' topics (not the new one's).
    let own: Vec<String> = crate::kafka::all_topics(topology)
        .into_iter()
        .filter(|(m, _, _)| m == new || m == from)
        .map(|(_, _, t)| t)
        .collect();
    let applied: Vec<(String, i32, i64)> =
        sqlx::query_as("SELECT topic, partition, next_offset FROM mmsync.applied_offsets")
            .fetch_all(&mut *read)
            .await
            .map_err(Error::db(from, "reading applied offsets"))?;
    let known: Vec<String> = crate::kafka::all_topics(topology).into_iter().map(|(_, _, t)| t).collect();
    for (topic, p, next) in applied {
        if known.contains(&topic) && !own.contains(&topic) {
            positions.insert((topic, p), next);
        }
    }
    Ok(positions)
}

/// What every step of one join shares: the topology, and which master
/// copies from which.
#[derive(Clone, Copy)]
struct Link<'a> {
    topology: &'a Topology,
    from: &'a str,
    new: &'a str,
}

async fn copy_table(
    read: &mut PgConnection,
    write: &mut PgConnection,
    link @ Link { from, new, .. }: Link<'_>,
    info: &TableInfo,
    new_info: TableInfo,
    batch_rows: u64,
    progress: &mut impl FnMut(&TableName, u64, u64),
) -> Result<Copied> {
    let started = Instant::now();
    let table = &info.name;
    let t = table.quoted();
    let mut done = Copied { table: table.clone(), rows: 0, tombstones: 0, refused: 0, resumed_from: 0, seconds: 0.0 };
    // Where a join that was stopped left this table.
    let state: Option<(i64, i64, bool)> = sqlx::query_as(
        "SELECT next_block, rows_copied, done FROM mmsync.join_tables WHERE schema_name = $1 AND table_name = $2",
    )
    .bind(&table.schema)
    .bind(&table.name)
    .fetch_optional(&mut *write)
    .await
    .map_err(Error::db(new, format!("reading how far the copy of {table} came")))?;
    let mut block = match state {
        Some((_, rows, true)) => {
            (done.rows, done.resumed_from) = (rows as u64, rows as u64);
            return Ok(done);
        }
        Some((block, rows, false)) => {
            (done.rows, done.resumed_from) = (rows as u64, rows as u64);
            block
        }
        None => {
            sqlx::query("INSERT INTO mmsync.join_tables (schema_name, table_name) VALUES ($1, $2)")
                .bind(&table.schema)
                .bind(&table.name)
                .execute(&mut *write)
                .await
                .map_err(Error::db(new, format!("recording the copy of {table}")))?;
            0
        }
    };

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
    let position = Position::copied_from(from);
    let total = (rows as u64).max(done.rows);
    progress(table, done.rows, total);
    // COPY when both masters' columns are alike; otherwise every row goes
    // by the sink's rules, which keep what does not fit as dead letters.
    let shape = |i: &TableInfo| {
        let mut c: Vec<(String, String)> = i.data_columns().map(|c| (c.name.clone(), c.sql_type.clone())).collect();
        c.sort();
        c
    };
    let copy = if shape(info) == shape(&new_info) {
        let copy = CopySql::new(info, &new_info);
        exec(write, new, &format!("preparing the staging table of {table}"), &copy.create_stage).await?;
        Some(copy)
    } else {
        tracing::warn!("{table}: its columns differ between {from} and {new}: copied a row at a time");
        None
    };
    while block < blocks {
        let range = (block, block + step);
        // Streamed with COPY (memory stays bounded by a batch), or, when the
        // new master refuses the batch as a whole, a row at a time by the
        // sink's rules (which keep what it refuses as dead letters).
        let fast = match &copy {
            Some(copy) => copy_batch(read, write, link, &new_info, copy, range, done.rows).await?,
            None => Err("the columns differ".to_string()),
        };
        let (copied, refused) = match fast {
            Ok(done) => done,
            Err(why) => {
                if copy.is_some() {
                    tracing::warn!("{table}: blocks {}..{} go a row at a time: {why}", range.0, range.1);
                }
                let batch = sqlx::query(&select)
                    .bind(range.0)
                    .bind(range.1)
                    .fetch_all(&mut *read)
                    .await
                    .map_err(Error::db(from, format!("reading {table}")))?;
                let changes: Vec<Change> = batch.iter().map(|r| copied_row(info, &position, r)).collect();
                let n = changes.len() as u64;
                let mark = Mark { table, next_block: range.1, rows: done.rows + n, done: false };
                (n, apply(write, link, &new_info, changes, mark).await?)
            }
        };
        block = range.1;
        done.rows += copied;
        done.refused += refused;
        progress(table, done.rows, total.max(done.rows));
    }
    // Its tombstones, so that an older change arriving later stays deleted:
    // in pages by key, then the table is done.
    let mut after = serde_json::Value::Null;
    loop {
        let page: Vec<(serde_json::Value, i64, String)> = sqlx::query_as(
            "SELECT key, version, origin::text FROM mmsync.tombstones
             WHERE schema_name = $1 AND table_name = $2 AND ($3::jsonb IS NULL OR key > $3)
             ORDER BY key LIMIT $4",
        )
        .bind(&table.schema)
        .bind(&table.name)
        .bind(&after)
        .bind(batch_rows as i64)
        .fetch_all(&mut *read)
        .await
        .map_err(Error::db(from, format!("reading the tombstones of {table}")))?;
        let last = page.len() < batch_rows as usize;
        after = page.last().map_or(serde_json::Value::Null, |(key, _, _)| key.clone());
        let changes: Vec<Change> = page
            .into_iter()
            .map(|(key, version, origin)| Change {
                table: table.clone(),
                op: Op::Delete,
                key: serde_json::from_value(key).unwrap_or_default(),
                row: None,
                unchanged: Vec::new(),
                superseded: false,
                origin,
                version,
                position: position.clone(),
            })
            .collect();
        done.tombstones += changes.len() as u64;
        let mark = Mark { table, next_block: block, rows: done.rows, done: last };
        done.refused += apply(write, link, &new_info, changes, mark).await?;
        if last {
            break;
        }
    }
    done.seconds = started.elapsed().as_secs_f64();
    Ok(done)
}

/// The statements of the COPY path for one table.
struct CopySql {
    /// A temporary table on the new master shaped like the copied columns,
    /// emptied at each commit.
    create_stage: String,
    /// Reads a range of blocks on the source (`{from}`, `{to}` replaced).
    copy_out: String,
    copy_in: String,
    analyze_stage: String,
    /// Inserts the staged rows whose key the new master neither holds nor
    /// has a tombstone of, and whose version is not from the future, and
    /// returns the others: they go by the sink's rules.
    insert_new: String,
    /// Deletes again what `insert_new` inserted under a key whose tombstone,
    /// newer, committed while it ran (an application's delete on a master
    /// being rebuilt): its snapshot could not see it.
    undo_beaten: String,
}

impl CopySql {
    fn new(info: &TableInfo, new_info: &TableInfo) -> CopySql {
        let t = info.name.quoted();
        let (o, v) = (quote_ident(ORIGIN_COLUMN), quote_ident(VERSION_COLUMN));
        let columns: Vec<String> = info.data_columns().map(|c| quote_ident(&c.name)).collect();
        let listed = format!("{}, {o}, {v}", columns.join(", "));
        let stage = "pg_temp.mmsync_join_stage";
        let keys: Vec<String> = new_info.key.iter().map(|k| quote_ident(k)).collect();
        let key_matches: Vec<String> = keys.iter().map(|k| format!("t.{k} = s.{k}")).collect();
        let names: Vec<String> = info.data_columns().map(|c| quote_literal(&c.name)).collect();
        let values: Vec<String> =
            columns.iter().map(|c| format!("CASE WHEN s.{c} IS NULL THEN NULL ELSE concat(s.{c}) END")).collect();
        CopySql {
            create_stage: format!(
                "DROP TABLE IF EXISTS {stage}; CREATE TEMP TABLE {stage} ON COMMIT DELETE ROWS AS SELECT {listed} FROM {t} WITH NO DATA"
            ),
            copy_out: format!(
                "COPY (SELECT {listed} FROM {t} WHERE {o} <> '' AND ctid >= '({{from}},0)'::tid AND ctid < '({{to}},0)'::tid) TO STDOUT"
            ),
            copy_in: format!("COPY {stage} ({listed}) FROM STDIN"),
            analyze_stage: format!("ANALYZE {stage}"),
            insert_new: format!(
                "WITH inserted AS (
                     INSERT INTO {t} ({listed}) OVERRIDING SYSTEM VALUE SELECT {listed} FROM {stage} AS s
                     WHERE s.{v} <= mmsync.now_us() + mmsync.max_clock_skew_us()
                       AND NOT EXISTS (SELECT 1 FROM mmsync.tombstones tb
                                       WHERE tb.schema_name = $1 AND tb.table_name = $2 AND tb.key = {})
                     ON CONFLICT DO NOTHING
                     RETURNING {})
                 SELECT jsonb_object(ARRAY[{}]::text[], ARRAY[{}]::text[]), s.{v}, s.{o}::text FROM {stage} AS s
                 WHERE NOT EXISTS (SELECT 1 FROM inserted AS t WHERE {})",
                new_info.key_json_sql("s"),
                keys.join(", "),
                names.join(", "),
                values.join(", "),
                key_matches.join(" AND ")
            ),
            undo_beaten: format!(
                "DELETE FROM {t} AS t USING {stage} AS s, mmsync.tombstones AS tb
                 WHERE {} AND t.{v} = s.{v} AND t.{o} = s.{o}
                   AND tb.schema_name = $1 AND tb.table_name = $2 AND tb.key = {}
                   AND (tb.version, tb.origin COLLATE \"C\") > (s.{v}, s.{o} COLLATE \"C\")",
                key_matches.join(" AND "),
                new_info.key_json_sql("s")
            ),
        }
    }
}

/// One range of blocks by COPY, in one transaction on the new master with
/// its mark: the rows stream from the source into the staging table; those
/// the new master lacks go in with one statement; the rest (a key it holds
/// already, with another version, or a tombstone of, or a unique value
/// another key holds) go by the sink's rules. Returns (rows, refused), or
/// why the new master refused the batch as a whole (then nothing of it
/// stays, and the caller goes a row at a time).
async fn copy_batch(
    read: &mut PgConnection,
    write: &mut PgConnection,
    link @ Link { from, new, .. }: Link<'_>,
    info: &TableInfo,
    sql: &CopySql,
    (first, end): (i64, i64),
    rows_before: u64,
) -> Result<std::result::Result<(u64, u64), String>> {
    let table = &info.name;
    let mut tx = write.begin().await.map_err(Error::db(new, "beginning a transaction"))?;
    sqlx::query(crate::postgres::apply::APPLIER_SESSION)
        .execute(&mut *tx)
        .await
        .map_err(Error::db(new, "marking the applier session"))?;
    let refusal = |e: sqlx::Error| -> Result<String> {
        if crate::postgres::apply::is_data_error(&e) {
            Ok(e.to_string())
        } else {
            Err(Error::db(new, format!("copying {table}"))(e))
        }
    };
    let mut sink = match tx.copy_in_raw(&sql.copy_in).await {
        Ok(sink) => sink,
        Err(e) => return Ok(Err(refusal(e)?)),
    };
    let out = sql.copy_out.replace("{from}", &first.to_string()).replace("{to}", &end.to_string());
    let mut source = read.copy_out_raw(&out).await.map_err(Error::db(from, format!("reading {table}")))?;
    loop {
        match source.try_next().await {
            Ok(Some(chunk)) => {
                if let Err(e) = sink.send(chunk).await {
                    return Ok(Err(refusal(e)?));
                }
            }
            Ok(None) => break,
            Err(e) => {
                let _ = sink.abort("the source stopped").await;
                return Err(Error::db(from, format!("reading {table}"))(e));
            }
        }
    }
    drop(source);
    let staged = match sink.finish().await {
        Ok(n) => n,
        Err(e) => return Ok(Err(refusal(e)?)),
    };
    // The planner must know the stage is a batch, not the size of the
    // table: it would hash the whole table to find a batch's keys otherwise.
    sqlx::raw_sql(&sql.analyze_stage).execute(&mut *tx).await.map_err(Error::db(new, "analyzing the staged rows"))?;
    let rest = match sqlx::query(&sql.insert_new).bind(&table.schema).bind(&table.name).fetch_all(&mut *tx).await {
        Ok(rest) => rest,
        Err(e) => return Ok(Err(refusal(e)?)),
    };
    sqlx::query(&sql.undo_beaten)
        .bind(&table.schema)
        .bind(&table.name)
        .execute(&mut *tx)
        .await
        .map_err(Error::db(new, format!("checking the copied rows of {table} against new tombstones")))?;
    let position = Position::copied_from(from);
    let changes: Vec<Change> = rest.iter().map(|r| copied_row(info, &position, r)).collect();
    let refused = apply_and_keep(&mut tx, link, info, changes).await?;
    let mark = Mark { table, next_block: end, rows: rows_before + staged, done: false };
    store_mark(&mut tx, new, &mark).await?;
    tx.commit().await.map_err(Error::db(new, "committing a batch of the copy"))?;
    Ok(Ok((staged, refused)))
}

/// A copied row as a change: `(row as a JSON object of text, version, origin)`.
fn copied_row(info: &TableInfo, position: &Position, r: &sqlx::postgres::PgRow) -> Change {
    let row: Row = serde_json::from_value(r.get::<serde_json::Value, _>(0)).expect("a JSON object of text");
    let key: Key = info.key.iter().map(|k| (k.clone(), row.get(k).cloned().flatten().unwrap_or_default())).collect();
    Change {
        table: info.name.clone(),
        op: Op::Insert,
        key,
        row: Some(row),
        unchanged: Vec::new(),
        superseded: false,
        origin: r.get(2),
        version: r.get(1),
        position: position.clone(),
    }
}

/// Applies copied changes by the sink's rules in the open transaction and
/// keeps what the new master refuses as dead letters; returns how many.
async fn apply_and_keep(
    tx: &mut PgConnection,
    Link { topology, from, new }: Link<'_>,
    info: &TableInfo,
    changes: Vec<Change>,
) -> Result<u64> {
    if changes.is_empty() {
        return Ok(0);
    }
    let (_, dead) =
        crate::postgres::apply::apply_changes(tx, new, info.clone(), topology.sync.max_clock_skew, from, changes)
            .await?;
    for d in &dead {
        d.keep(tx, new).await?;
    }
    Ok(dead.len() as u64)
}

/// How far a table's copy came, stored with the batch that brought it there.
struct Mark<'a> {
    table: &'a TableName,
    next_block: i64,
    rows: u64,
    done: bool,
}

/// One batch on the new master, in its own transaction with its mark;
/// returns how many it refused.
async fn apply(
    write: &mut PgConnection,
    link @ Link { new, .. }: Link<'_>,
    info: &TableInfo,
    changes: Vec<Change>,
    mark: Mark<'_>,
) -> Result<u64> {
    let mut tx = write.begin().await.map_err(Error::db(new, "beginning a transaction"))?;
    let refused = apply_and_keep(&mut tx, link, info, changes).await?;
    store_mark(&mut tx, new, &mark).await?;
    tx.commit().await.map_err(Error::db(new, "committing a batch of the copy"))?;
    Ok(refused)
}

async fn store_mark(conn: &mut PgConnection, new: &str, mark: &Mark<'_>) -> Result<()> {
    sqlx::query(
        "UPDATE mmsync.join_tables SET next_block = $3, rows_copied = $4, done = $5
         WHERE schema_name = $1 AND table_name = $2",
    )
    .bind(&mark.table.schema)
    .bind(&mark.table.name)
    .bind(mark.next_block)
    .bind(mark.rows as i64)
    .bind(mark.done)
    .execute(conn)
    .await
    .map_err(Error::db(new, format!("recording how far the copy of {} came", mark.table)))?;
    Ok(())
}
