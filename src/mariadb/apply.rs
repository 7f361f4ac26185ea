//! MariaDB's side of applying changes: the statements of one table (lock
//! the rows and tombstones of a batch's keys, upsert, delete, record
//! tombstones), run in the sink's transaction as the applier, with what the
//! target refuses returned as dead letters. The plan of what to write is
//! [`crate::lww::plan`]'s, as on PostgreSQL.
//!
//! Values are bound as text (MariaDB converts them to the column's type, and
//! strict mode refuses what does not fit), except binary columns, whose
//! `\x` hex text is decoded to bytes first.

use std::collections::{BTreeMap, HashMap};

use metrics::counter;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Params, Value};

use crate::change::{encode_key, Change, Key};
use crate::error::{Error, Result};
use crate::mariadb::db::{describe, quote_ident, url_database, Table, TextForm};
use crate::mariadb::schema::TOMBSTONE_UPSERT;
use crate::metrics as m;
use crate::sink::{DeadLetter, Rec};
use crate::topology::{Master, TableName, Topology, ORIGIN_COLUMN, VERSION_COLUMN};

/// What marks a session as the applier (see [`crate::mariadb::schema`]),
/// and lets it write rows whose parents another table's sink has not
/// applied yet, as PostgreSQL's `session_replication_role = replica` does.
const APPLIER_SESSION: &[&str] = &["SET @mmsync_applier = 1", "SET SESSION foreign_key_checks = 0"];

/// Parameters a statement may carry (MariaDB allows 65,535).
const MAX_PARAMS: usize = 60_000;

/// A connected sink's target: the connection, marked as the applier, and the
/// statements of its table.
pub(crate) struct Target {
    pub(crate) conn: Conn,
    pub(crate) sql: TableSql,
}

impl Target {
    /// Connects as the applier and reads the table and the stored offsets.
    pub(crate) async fn connect(
        topology: &Topology,
        target: &Master,
        table: &TableName,
    ) -> Result<(Target, HashMap<(String, i32), i64>)> {
        let name = target.name.as_str();
        let mut conn = crate::mariadb::db::connect(target).await?;
        for sql in APPLIER_SESSION {
            conn.query_drop(*sql).await.map_err(Error::mariadb(name, "marking the applier session"))?;
        }
        let url_db = url_database(target)?;
        let info = describe(&mut conn, name, table, &url_db).await?.ok_or_else(|| Error::Missing {
            master: name.into(),
            problem: format!("table {table} does not exist; its changes wait in Kafka"),
            fix: "create it (same columns as on the other masters), then run `mmsync init`".into(),
        })?;
        let stored: Vec<(String, i32, i64)> = conn
            .query("SELECT topic, `partition`, next_offset FROM mmsync.applied_offsets")
            .await
            .map_err(Error::mariadb(name, "reading applied offsets (has `mmsync init` run?)"))?;
        let stored = stored.into_iter().map(|(t, p, o)| ((t, p), o)).collect();
        Ok((Target { conn, sql: TableSql::new(info, topology.sync.max_clock_skew) }, stored))
    }

    /// Applies one batch and stores its offsets, in one transaction; returns
    /// the changes that took effect.
    pub(crate) async fn commit_batch(&mut self, batch: crate::sink::Batch<'_>) -> Result<Vec<Change>> {
        let crate::sink::Batch { target, recs, mut dead, offsets, commits, sources, max_dead_letters } = batch;
        if recs.iter().any(|r| self.sql.shape_problem(&r.change).is_some()) {
            // The table may have changed since this sink connected: look
            // again before refusing. (A `public` table's database is the
            // URL's; other names ignore it.)
            let (name, db) = (self.sql.info.name.clone(), self.sql.info.database.clone());
            if let Some(info) = describe(&mut self.conn, target, &name, &db).await? {
                self.sql = TableSql::new(info, self.sql.max_clock_skew);
            }
        }
        let conn = &mut self.conn;
        exec(conn, target, "beginning a transaction", "START TRANSACTION").await?;
        let mut applied = Vec::new();
        if !recs.is_empty() {
            let (ok, refused) = self.sql.apply_isolated(conn, target, recs).await?;
            applied = ok;
            dead.extend(refused);
        }
        if !dead.is_empty() {
            let mut adding: BTreeMap<&str, i64> = BTreeMap::new();
            for d in &dead {
                *adding.entry(d.at.topic.as_str()).or_default() += 1;
            }
            for (topic, n) in adding {
                let pending: i64 = conn
                    .exec_first(
                        "SELECT count(*) FROM mmsync.dead_letters WHERE topic = ? AND retried_at IS NULL",
                        (topic,),
                    )
                    .await
                    .map_err(Error::mariadb(target, "counting dead letters"))?
                    .unwrap_or(0);
                if pending + n > max_dead_letters {
                    return Err(crate::sink::dead_letter_bound_error(
                        target,
                        sources,
                        topic,
                        pending,
                        n,
                        max_dead_letters,
                    ));
                }
            }
        }
        for d in &dead {
            keep_dead_letter(conn, target, d).await?;
        }
        store_offsets(conn, target, offsets, commits).await?;
        exec(conn, target, "committing a batch", "COMMIT").await?;
        Ok(applied)
    }
}

async fn exec(conn: &mut Conn, target: &str, what: &str, sql: &str) -> Result<()> {
    conn.query_drop(sql).await.map_err(Error::mariadb(target, what.to_string()))
}

/// Writes a dead letter to `master`'s mmsync.dead_letters and counts it.
pub(crate) async fn keep_dead_letter(conn: &mut Conn, master: &str, d: &DeadLetter) -> Result<()> {
    let crate::sink::RecordId { topic, partition, offset } = &d.at;
    tracing::warn!(master = %master, "dead letter from {topic}[{partition}]@{offset}: {}", d.reason);
    conn.exec_drop(
        "INSERT INTO mmsync.dead_letters (topic, `partition`, kafka_offset, reason, record_key, record_value)
         VALUES (?, ?, ?, ?, ?, ?)",
        (topic, partition, offset, &d.reason, &d.key, &d.value),
    )
    .await
    .map_err(Error::mariadb(master, "writing a dead letter"))?;
    counter!(m::DEAD_LETTERS, m::TARGET => master.to_string()).increment(1);
    Ok(())
}

/// `mmsync dead-letters retry` on a MariaDB master: as
/// [`crate::sink::retry_dead_letters`] does on PostgreSQL, in one
/// transaction, as the applier.
pub(crate) async fn retry_dead_letters(topology: &Topology, target: &Master) -> Result<crate::sink::RetryReport> {
    let name = target.name.as_str();
    let mut db = crate::mariadb::db::connect(target).await?;
    for sql in APPLIER_SESSION {
        db.query_drop(*sql).await.map_err(Error::mariadb(name, "marking the applier session"))?;
    }
    let rows: Vec<mysql_async::Row> = db
        .query(
            "SELECT id, topic, `partition`, kafka_offset, record_key, record_value FROM mmsync.dead_letters
             WHERE retried_at IS NULL AND `partition` >= 0 ORDER BY id",
        )
        .await
        .map_err(Error::mariadb(name, "reading dead letters"))?;
    let rows: Vec<crate::sink::Letter> = rows
        .into_iter()
        .map(|mut r| {
            let id: i64 = r.take(0).unwrap_or(0);
            let topic: String = r.take(1).unwrap_or_default();
            let partition: i32 = r.take(2).unwrap_or(0);
            let offset: i64 = r.take(3).unwrap_or(0);
            (id, topic, partition, offset, r.take(4).flatten(), r.take(5).flatten())
        })
        .collect();
    let mut report = crate::sink::RetryReport::default();
    let groups = crate::sink::group_dead_letters(topology, rows, &mut report);
    let url_db = url_database(target)?;
    exec(&mut db, name, "beginning a transaction", "START TRANSACTION").await?;
    let mut applied: Vec<i64> = Vec::new();
    for (table, entries) in groups {
        let Some(info) = describe(&mut db, name, &table, &url_db).await? else {
            report.still_dead.extend(entries.iter().map(|(id, _)| (*id, format!("table {table} does not exist here"))));
            continue;
        };
        let recs: Vec<Rec> = entries.iter().map(|(_, r)| Rec { change: r.change.clone(), at: r.at.clone() }).collect();
        let (_, refused) =
            TableSql::new(info, topology.sync.max_clock_skew).apply_isolated(&mut db, name, recs).await?;
        applied.extend(crate::sink::applied_ids(&entries, refused, &mut report));
    }
    for id in &applied {
        db.exec_drop("UPDATE mmsync.dead_letters SET retried_at = CURRENT_TIMESTAMP(6) WHERE id = ?", (id,))
            .await
            .map_err(Error::mariadb(name, "marking dead letters retried"))?;
    }
    for (id, reason) in &report.still_dead {
        db.exec_drop("UPDATE mmsync.dead_letters SET reason = ? WHERE id = ?", (reason, id))
            .await
            .map_err(Error::mariadb(name, "updating a dead letter"))?;
    }
    exec(&mut db, name, "committing the retry", "COMMIT").await?;
    report.applied = applied.len();
    Ok(report)
}

/// `mmsync dead-letters list` on a MariaDB master: (id, logged at, topic,
/// partition, offset, reason) of each pending one.
pub async fn pending_dead_letters(target: &Master) -> Result<Vec<(i64, String, String, i32, i64, String)>> {
    let mut conn = crate::mariadb::db::connect(target).await?;
    let rows: Vec<mysql_async::Row> = conn
        .query(
            "SELECT id, DATE_FORMAT(logged_at, '%Y-%m-%d %H:%i:%s'), topic, `partition`, kafka_offset, reason
             FROM mmsync.dead_letters WHERE retried_at IS NULL ORDER BY id",
        )
        .await
        .map_err(Error::mariadb(&target.name, "reading dead letters"))?;
    Ok(rows
        .into_iter()
        .map(|mut r| {
            (
                r.take(0).unwrap_or(0),
                r.take(1).unwrap_or_default(),
                r.take(2).unwrap_or_default(),
                r.take(3).unwrap_or(0),
                r.take(4).unwrap_or(0),
                r.take(5).unwrap_or_default(),
            )
        })
        .collect())
}

/// Stores where the sinks of `target` go on, in the caller's transaction,
/// with the commit time of the last change taken from each partition
/// (a partition without one keeps the time it had).
async fn store_offsets(
    conn: &mut Conn,
    target: &str,
    offsets: &BTreeMap<(String, i32), i64>,
    commits: &BTreeMap<(String, i32), i64>,
) -> Result<()> {
    if offsets.is_empty() {
        return Ok(());
    }
    let rows = vec!["(?, ?, ?, ?)"; offsets.len()].join(", ");
    let mut params: Vec<Value> = Vec::with_capacity(offsets.len() * 4);
    for ((topic, partition), next) in offsets {
        params.push(topic.as_str().into());
        params.push((*partition).into());
        params.push((*next).into());
        params.push(commits.get(&(topic.clone(), *partition)).copied().into());
    }
    conn.exec_drop(
        format!(
            "INSERT INTO mmsync.applied_offsets (topic, `partition`, next_offset, last_commit_ms) VALUES {rows}
             ON DUPLICATE KEY UPDATE next_offset = VALUES(next_offset), applied_at = CURRENT_TIMESTAMP(6),
                 last_commit_ms = COALESCE(VALUES(last_commit_ms), last_commit_ms)"
        ),
        Params::Positional(params),
    )
    .await
    .map_err(Error::mariadb(target, "storing offsets"))
}

use crate::sink::Outcome;

/// A statement the database refused as data.
#[derive(Debug)]
pub(crate) struct Refusal {
    code: Option<u16>,
    /// What the server said, as it said it (the dead letter's reason).
    message: String,
}

impl Refusal {
    /// The server's own message, with its error number.
    fn of(source: &mysql_async::Error) -> Refusal {
        let message = match source {
            mysql_async::Error::Server(e) => format!("{} ({})", e.message, e.code),
            other => other.to_string(),
        };
        Refusal { code: crate::mariadb::errors::code(source), message }
    }

    /// The unique index a duplicate entry was refused by: MariaDB names it
    /// last in its message, "Duplicate entry '...' for key 'email'".
    fn unique_index(&self) -> Option<&str> {
        if self.code != Some(crate::mariadb::errors::DUPLICATE_ENTRY) {
            return None;
        }
        let rest = self.message.rsplit_once(" for key '")?.1;
        let name = rest.split('\'').next()?;
        // MySQL 8 writes `table.index`.
        Some(name.rsplit('.').next().unwrap_or(name))
    }
}

/// The statements of one table.
pub(crate) struct TableSql {
    pub(crate) info: Table,
    /// The data columns' names, sorted: what a record's row must have.
    columns: Vec<String>,
    /// Each column's text form, looked up per value.
    forms: HashMap<String, TextForm>,
    pub(crate) max_clock_skew: std::time::Duration,
}

/// `(version, origin) < (VALUES(version), VALUES(origin))`: the incoming
/// row is newer than the one the table holds.
fn newer_incoming() -> String {
    let (o, v) = (quote_ident(ORIGIN_COLUMN), quote_ident(VERSION_COLUMN));
    format!("({v}, {o}) < (VALUES({v}), VALUES({o}))")
}

impl TableSql {
    pub(crate) fn new(info: Table, max_clock_skew: std::time::Duration) -> TableSql {
        let mut columns: Vec<String> = info.data_columns().map(|c| c.name.clone()).collect();
        columns.sort_unstable();
        let forms = info.columns.iter().map(|c| (c.name.clone(), c.form)).collect();
        TableSql { info, columns, forms, max_clock_skew }
    }

    pub(crate) fn shape_problem(&self, change: &Change) -> Option<String> {
        crate::sink::shape_problem(change, &self.columns, &self.info.name)
    }

    /// Applies a table's records in a savepoint. If the database refuses them
    /// as data, each record is tried alone, and the ones still refused
    /// become dead letters, so one bad row never blocks its partition.
    pub(crate) async fn apply_isolated(
        &self,
        conn: &mut Conn,
        target: &str,
        recs: Vec<Rec>,
    ) -> Result<(Vec<Change>, Vec<DeadLetter>)> {
        let outcome = match self.apply_in_savepoint(conn, target, &recs).await? {
            Ok(outcome) => outcome,
            Err(_) => {
                let mut total = Outcome::default();
                for (i, rec) in recs.iter().enumerate() {
                    total.add(i, self.apply_one(conn, target, rec).await?.map_err(|r| r.message));
                }
                total
            }
        };
        Ok(outcome.split(recs))
    }

    /// One record alone. When a unique index besides the key refuses it,
    /// the value goes to the newer of the two writes by (version, origin),
    /// as every master decides alike (see [`TableSql::settle_unique`]), and
    /// the record is tried again.
    async fn apply_one(
        &self,
        conn: &mut Conn,
        target: &str,
        rec: &Rec,
    ) -> Result<std::result::Result<Outcome, Refusal>> {
        for _ in 0..=self.info.unique.len() {
            let refusal = match self.apply_in_savepoint(conn, target, std::slice::from_ref(rec)).await? {
                Ok(outcome) => return Ok(Ok(outcome)),
                Err(refusal) => refusal,
            };
            let Some(columns) = refusal
                .unique_index()
                .and_then(|index| self.info.unique.iter().find(|(name, _)| name == index))
                .map(|(_, columns)| columns.clone())
            else {
                return Ok(Err(refusal));
            };
            if !self.settle_unique(conn, target, rec, &columns).await? {
                // The incoming change lost: settled, nothing left to apply.
                return Ok(Ok(Outcome::default()));
            }
        }
        self.apply_in_savepoint(conn, target, std::slice::from_ref(rec)).await
    }

    /// Settles a unique value (of `columns`) that `rec` and rows under other
    /// keys both hold; returns whether `rec` won (and should be applied
    /// again). The older writes' rows are removed, with a tombstone at the
    /// winner's stamp that is this master's own, so that this master's
    /// source sends it: whether the loser meets the winner depends on
    /// arrival order, so every master that sees the clash tells the others.
    /// Each loser is logged whole to `mmsync.conflicts`.
    async fn settle_unique(&self, conn: &mut Conn, target: &str, rec: &Rec, columns: &[String]) -> Result<bool> {
        let db = |what: &str| Error::mariadb(target, format!("{what} of {}", self.info.name));
        let change = &rec.change;
        let Some(row) = change.row.as_ref() else { return Ok(true) };
        let (o, v) = (quote_ident(ORIGIN_COLUMN), quote_ident(VERSION_COLUMN));
        // The rows under other keys holding the incoming row's values, locked.
        let mut params: Vec<Value> = Vec::new();
        let mut same: Vec<String> = Vec::new();
        for c in columns {
            same.push(format!("{} = ?", quote_ident(c)));
            params.push(self.value(c, row.get(c).unwrap_or(&None)).map_err(|p| refused_as_data(target, p))?);
        }
        let (this_key, key_params) = self.keys_in(&[&change.key]);
        params.extend(key_params);
        let data: Vec<String> = self.info.data_columns().map(|c| c.name.clone()).collect();
        let cast: Vec<String> = data.iter().map(|c| format!("CAST({} AS CHAR)", quote_ident(c))).collect();
        let rows: Vec<mysql_async::Row> = conn
            .exec(
                format!(
                    "SELECT {v}, {o}, {} FROM {} WHERE {} AND NOT {this_key} FOR UPDATE",
                    cast.join(", "),
                    self.info.quoted(),
                    same.join(" AND ")
                ),
                Params::Positional(params),
            )
            .await
            .map_err(db("finding a unique value's holder"))?;
        let mut holders: Vec<(crate::lww::Stamp, crate::change::Row)> = Vec::new();
        for mut r in rows {
            let stamp = (r.take::<i64, _>(0).unwrap_or(0), r.take::<String, _>(1).unwrap_or_default());
            let values =
                data.iter().enumerate().map(|(i, c)| (c.clone(), r.take::<Option<String>, _>(i + 2).flatten()));
            holders.push((stamp, values.collect()));
        }
        let incoming = crate::lww::stamp(change);
        let newest = holders.iter().map(|(s, _)| s.clone()).max();
        let (won, winner, losers) = match newest {
            Some(h) if h > incoming => (false, h, vec![row.clone()]),
            _ => (true, incoming, holders.into_iter().map(|(_, r)| r).collect::<Vec<_>>()),
        };
        for loser in &losers {
            let key: Key = self
                .info
                .key
                .iter()
                .map(|k| (k.clone(), loser.get(k).cloned().flatten().unwrap_or_default()))
                .collect();
            let (cond, mut params) = self.keys_in(&[&key]);
            params.extend([Value::from(winner.0), Value::from(winner.1.as_str())]);
            conn.exec_drop(
                format!("DELETE FROM {} WHERE {cond} AND ({v}, {o}) < (?, ?)", self.info.quoted()),
                Params::Positional(params),
            )
            .await
            .map_err(db("removing a unique value's loser"))?;
            let mut params: Vec<Value> =
                vec![self.info.name.schema.as_str().into(), self.info.name.name.as_str().into()];
            params.extend(self.key_text_values(&key));
            params.extend([Value::from(winner.0), Value::from(target)]);
            conn.exec_drop(
                format!(
                    "INSERT INTO mmsync.tombstones (schema_name, table_name, key_text, version, origin)
                     VALUES (?, ?, {}, ?, ?) {TOMBSTONE_UPSERT}",
                    self.key_text_params()
                ),
                Params::Positional(params),
            )
            .await
            .map_err(db("recording tombstones"))?;
            conn.exec_drop(
                "INSERT INTO mmsync.conflicts (schema_name, table_name, key_text, kind, incoming_op, incoming_version,
                     incoming_origin, winner_version, winner_origin, loser_row)
                 VALUES (?, ?, ?, 'unique_value_lost', ?, ?, ?, ?, ?, ?)",
                Params::Positional(vec![
                    self.info.name.schema.as_str().into(),
                    self.info.name.name.as_str().into(),
                    encode_key(&key).into(),
                    change.op.letter().into(),
                    change.version.into(),
                    change.origin.as_str().into(),
                    winner.0.into(),
                    winner.1.as_str().into(),
                    serde_json::to_string(loser).expect("strings").into(),
                ]),
            )
            .await
            .map_err(db("logging a unique value's conflict"))?;
        }
        counter!(m::CONFLICTS, m::TARGET => target.to_string(), m::TABLE => self.info.name.to_string(), m::KIND => "unique_value_lost")
            .increment(losers.len() as u64);
        Ok(won)
    }

    /// `Ok(Err(refusal))` when the database refused the data; `Err` for everything else.
    async fn apply_in_savepoint(
        &self,
        conn: &mut Conn,
        target: &str,
        recs: &[Rec],
    ) -> Result<std::result::Result<Outcome, Refusal>> {
        exec(conn, target, "savepoint", "SAVEPOINT mmsync_table").await?;
        match self.apply(conn, target, recs).await {
            Ok(outcome) => {
                exec(conn, target, "savepoint", "RELEASE SAVEPOINT mmsync_table").await?;
                Ok(Ok(outcome))
            }
            Err(Error::Mariadb { source, .. })
                if crate::mariadb::errors::code(&source).is_some_and(crate::mariadb::errors::refuses_the_data) =>
            {
                exec(conn, target, "savepoint", "ROLLBACK TO SAVEPOINT mmsync_table").await?;
                Ok(Err(Refusal::of(&source)))
            }
            Err(e) => Err(e),
        }
    }

    /// The keys of `changes` as a condition on the table's key columns, with
    /// their values.
    fn keys_in(&self, keys: &[&Key]) -> (String, Vec<Value>) {
        let cols: Vec<String> = self.info.key.iter().map(|k| quote_ident(k)).collect();
        let one = format!("({})", vec!["?"; cols.len()].join(", "));
        let sql = format!("({}) IN ({})", cols.join(", "), vec![one.as_str(); keys.len()].join(", "));
        let mut params = Vec::with_capacity(keys.len() * cols.len());
        for key in keys {
            for k in &self.info.key {
                params.push(Value::from(key.get(k).map(String::as_str).unwrap_or_default()));
            }
        }
        (sql, params)
    }

    /// The SQL of a key's text from bound parameters, one per key column in name order.
    fn key_text_params(&self) -> String {
        self.info.key_text_sql(|_| "?".to_string())
    }

    fn key_text_values(&self, key: &Key) -> Vec<Value> {
        let mut names: Vec<&String> = self.info.key.iter().collect();
        names.sort();
        names.into_iter().map(|k| Value::from(key.get(k).map(String::as_str).unwrap_or_default())).collect()
    }

    /// A value of `column` as the statement binds it. Text from a
    /// PostgreSQL master is met where it differs (see [`crate::type_map`]):
    /// booleans are `t`/`f` there, and instants carry their UTC offset.
    fn value(&self, column: &str, text: &Option<String>) -> std::result::Result<Value, String> {
        let Some(text) = text else { return Ok(Value::NULL) };
        match self.forms.get(column).copied().unwrap_or(TextForm::Plain) {
            TextForm::Plain | TextForm::Time(_) => Ok(Value::Bytes(text.as_bytes().to_vec())),
            TextForm::Boolean => {
                let b = match text.as_str() {
                    "t" | "true" => "1",
                    "f" | "false" => "0",
                    other => other,
                };
                Ok(Value::Bytes(b.as_bytes().to_vec()))
            }
            TextForm::Instant(_) => {
                let local = ["+00:00", "+00", "Z"].iter().find_map(|z| text.strip_suffix(z)).unwrap_or(text);
                if local.len() > 19 && local[19..].contains(['+', '-']) {
                    return Err(format!("column {column}: {text:?} is not in UTC"));
                }
                Ok(Value::Bytes(local.as_bytes().to_vec()))
            }
            TextForm::Binary => unhex(column, text),
        }
    }
}

/// A binary column's `\x` hex text as its bytes.
fn unhex(column: &str, text: &str) -> std::result::Result<Value, String> {
    let hex =
        text.strip_prefix("\\x").ok_or_else(|| format!("column {column} is binary, and {text:?} is not \\x hex"))?;
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("zz"), 16))
        .collect::<std::result::Result<Vec<u8>, _>>()
        .map(Value::Bytes)
        .map_err(|_| format!("column {column}: {text:?} is not \\x hex"))
}

impl TableSql {
    /// Last-writer-wins for one table's records: validated, planned by
    /// [`crate::lww::plan`] against the target's rows (locked) and
    /// tombstones of their keys, and written as the plan says.
    async fn apply(&self, conn: &mut Conn, target: &str, recs: &[Rec]) -> Result<Outcome> {
        let db = |what: &str| Error::mariadb(target, format!("{what} of {}", self.info.name));
        let mut outcome = Outcome::default();
        let valid = crate::sink::validate(recs, |c| self.shape_problem(c), self.max_clock_skew, &mut outcome.dead);
        if valid.is_empty() {
            return Ok(outcome);
        }
        let changes: Vec<&Change> = valid.iter().map(|&i| &recs[i].change).collect();
        let mut seen = std::collections::HashSet::new();
        let keys: Vec<&Key> = changes.iter().filter(|c| seen.insert(c.kafka_key())).map(|c| &c.key).collect();

        // The target's current state of those keys; existing rows are locked
        // so that no local write slips between this read and the writes.
        let mut held: HashMap<String, crate::lww::Held> = HashMap::new();
        let (o, v) = (quote_ident(ORIGIN_COLUMN), quote_ident(VERSION_COLUMN));
        for part in keys.chunks(MAX_PARAMS / self.info.key.len().max(1)) {
            let (cond, params) = self.keys_in(part);
            let cols: Vec<String> = self.info.key.iter().map(|k| format!("CAST({} AS CHAR)", quote_ident(k))).collect();
            let rows: Vec<mysql_async::Row> = conn
                .exec(
                    format!("SELECT {}, {v}, {o} FROM {} WHERE {cond} FOR UPDATE", cols.join(", "), self.info.quoted()),
                    Params::Positional(params),
                )
                .await
                .map_err(db("locking rows"))?;
            for mut r in rows {
                let mut key = Key::new();
                for (i, k) in self.info.key.iter().enumerate() {
                    key.insert(k.clone(), r.take::<String, _>(i).unwrap_or_default());
                }
                let n = self.info.key.len();
                let stamp = (r.take::<i64, _>(n).unwrap_or(0), r.take::<String, _>(n + 1).unwrap_or_default());
                held.entry(encode_key(&key)).or_default().row = Some(stamp);
            }
            let texts = vec![self.key_text_params(); part.len()].join(", ");
            let mut params: Vec<Value> =
                vec![self.info.name.schema.as_str().into(), self.info.name.name.as_str().into()];
            for key in part {
                params.extend(self.key_text_values(key));
            }
            let rows: Vec<(String, i64, String)> = conn
                .exec(
                    format!(
                        "SELECT key_text, version, origin FROM mmsync.tombstones
                         WHERE schema_name = ? AND table_name = ? AND key_text IN ({texts}) FOR UPDATE"
                    ),
                    Params::Positional(params),
                )
                .await
                .map_err(db("reading tombstones"))?;
            for (key_text, version, origin) in rows {
                let key: Key = serde_json::from_str(&key_text).unwrap_or_default();
                held.entry(encode_key(&key)).or_default().tombstone = Some((version, origin));
            }
        }

        let plan = crate::lww::plan(&changes, &held);
        outcome.applied.extend(plan.applied.iter().map(|&j| valid[j]));
        outcome.dead.extend(plan.dead.iter().map(|(j, reason)| (valid[*j], reason.clone())));
        let table = self.info.name.to_string();
        if plan.skipped > 0 {
            counter!(m::CHANGES_SKIPPED, m::TARGET => target.to_string(), m::TABLE => table.clone())
                .increment(plan.skipped);
        }

        // Upserts, in statements of up to MAX_PARAMS values. `ON DUPLICATE
        // KEY UPDATE` updates the row of whichever unique index the insert
        // collides with first, so it is used only for keys whose row is here
        // (the primary key, checked first, is then the one it meets): a new
        // key goes in with a plain INSERT, and a unique value another key
        // holds is refused, and settled, instead of written over that row.
        let data: Vec<String> = self.info.data_columns().map(|c| c.name.clone()).collect();
        let (present, absent): (Vec<&Change>, Vec<&Change>) = plan
            .upserts
            .iter()
            .map(|&j| plan.whole(j, &changes))
            .partition(|c| held.get(&c.kafka_key()).is_some_and(|h| h.row.is_some()));
        let cols: Vec<String> = data.iter().map(|c| quote_ident(c)).collect();
        let one = format!("({})", vec!["?"; data.len() + 2].join(", "));
        let cond = newer_incoming();
        let mut set: Vec<String> = data
            .iter()
            .filter(|c| !self.info.key.contains(c))
            .map(|c| format!("{0} = IF({cond}, VALUES({0}), {0})", quote_ident(c)))
            .collect();
        // Assignments run left to right, and the condition reads the
        // version and origin: they go last, the version after the origin.
        set.push(format!("{o} = IF({cond}, VALUES({o}), {o})"));
        set.push(format!("{v} = IF({cond}, VALUES({v}), {v})"));
        let on_duplicate = format!("ON DUPLICATE KEY UPDATE {}", set.join(", "));
        for (upserts, tail) in [(present, on_duplicate.as_str()), (absent, "")] {
            for part in upserts.chunks(MAX_PARAMS / (data.len() + 2)) {
                let mut params: Vec<Value> = Vec::with_capacity(part.len() * (data.len() + 2));
                for c in part {
                    let row = c.row.as_ref().expect("upserts have rows");
                    for col in &data {
                        match self.value(col, row.get(col).unwrap_or(&None)) {
                            Ok(value) => params.push(value),
                            Err(problem) => return Err(refused_as_data(target, problem)),
                        }
                    }
                    params.push(c.origin.as_str().into());
                    params.push(c.version.into());
                }
                conn.exec_drop(
                    format!(
                        "INSERT INTO {} ({}, {o}, {v}) VALUES {} {tail}",
                        self.info.quoted(),
                        cols.join(", "),
                        vec![one.as_str(); part.len()].join(", "),
                    ),
                    Params::Positional(params),
                )
                .await
                .map_err(db("upserting rows"))?;
            }
        }
        for &j in &plan.partial {
            let c = changes[j];
            let row = c.row.as_ref().expect("updates have rows");
            let mut set = Vec::new();
            let mut params = Vec::new();
            for (col, text) in row.iter().filter(|(col, _)| !self.info.key.contains(col)) {
                set.push(format!("{} = ?", quote_ident(col)));
                params.push(self.value(col, text).map_err(|p| refused_as_data(target, p))?);
            }
            let (cond, key_params) = self.keys_in(&[&c.key]);
            params.extend([Value::from(c.origin.as_str()), Value::from(c.version)]);
            params.extend(key_params);
            params.extend([Value::from(c.version), Value::from(c.origin.as_str())]);
            conn.exec_drop(
                format!(
                    "UPDATE {} SET {}{o} = ?, {v} = ? WHERE {cond} AND ({v}, {o}) < (?, ?)",
                    self.info.quoted(),
                    set.iter().map(|s| format!("{s}, ")).collect::<String>(),
                ),
                Params::Positional(params),
            )
            .await
            .map_err(db("updating rows"))?;
        }
        // One statement per chunk of deletes: each key goes only if its row
        // is older than that delete.
        let per_delete = self.info.key.len() + 2;
        for part in plan.deletes.chunks(MAX_PARAMS / per_delete) {
            let mut params: Vec<Value> = Vec::with_capacity(part.len() * per_delete);
            let mut each = Vec::with_capacity(part.len());
            for &j in part {
                let c = changes[j];
                let (cond, key_params) = self.keys_in(&[&c.key]);
                each.push(format!("({cond} AND ({v}, {o}) < (?, ?))"));
                params.extend(key_params);
                params.extend([Value::from(c.version), Value::from(c.origin.as_str())]);
            }
            conn.exec_drop(
                format!("DELETE FROM {} WHERE {}", self.info.quoted(), each.join(" OR ")),
                Params::Positional(params),
            )
            .await
            .map_err(db("deleting rows"))?;
        }
        if !plan.deletes.is_empty() {
            let one = format!("(?, ?, {}, ?, ?)", self.key_text_params());
            for part in plan.deletes.chunks(MAX_PARAMS / (self.info.key.len() + 4)) {
                let mut params: Vec<Value> = Vec::new();
                for &j in part {
                    let c = changes[j];
                    params.extend([self.info.name.schema.as_str().into(), self.info.name.name.as_str().into()]);
                    params.extend(self.key_text_values(&c.key));
                    params.extend([Value::from(c.version), Value::from(c.origin.as_str())]);
                }
                conn.exec_drop(
                    format!(
                        "INSERT INTO mmsync.tombstones (schema_name, table_name, key_text, version, origin) VALUES {} {TOMBSTONE_UPSERT}",
                        vec![one.as_str(); part.len()].join(", ")
                    ),
                    Params::Positional(params),
                )
                .await
                .map_err(db("recording tombstones"))?;
            }
        }
        for conflict in &plan.conflicts {
            let change = changes[conflict.index];
            counter!(m::CONFLICTS, m::TARGET => target.to_string(), m::TABLE => table.clone(), m::KIND => conflict.kind.clone()).increment(1);
            conn.exec_drop(
                "INSERT INTO mmsync.conflicts (schema_name, table_name, key_text, kind, incoming_op, incoming_version,
                     incoming_origin, winner_version, winner_origin, loser_row) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                Params::Positional(vec![
                    self.info.name.schema.as_str().into(),
                    self.info.name.name.as_str().into(),
                    change.kafka_key().into(),
                    conflict.kind.as_str().into(),
                    change.op.letter().into(),
                    change.version.into(),
                    change.origin.as_str().into(),
                    conflict.winner.0.into(),
                    conflict.winner.1.as_str().into(),
                    change.row.as_ref().map(|r| serde_json::to_string(r).expect("strings")).into(),
                ]),
            )
            .await
            .map_err(db("logging conflicts"))?;
        }
        Ok(outcome)
    }
}

/// A value mmsync itself cannot bind, refused like one the database refuses.
fn refused_as_data(target: &str, problem: String) -> Error {
    Error::Mariadb {
        master: target.to_string(),
        context: "binding a value".into(),
        source: mysql_async::Error::Server(mysql_async::ServerError {
            code: 1366,
            message: problem,
            state: "HY000".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duplicate_entry_names_the_unique_index_it_was_refused_by() {
        let refusal = |code, message: &str| Refusal { code: Some(code), message: message.into() };
        let server = |code, message: &str| {
            Refusal::of(&mysql_async::Error::Server(mysql_async::ServerError {
                code,
                message: message.into(),
                state: "23000".into(),
            }))
        };
        assert_eq!(server(1062, "Duplicate entry 'a@x' for key 'email'").unique_index(), Some("email"));
        assert_eq!(refusal(1062, "Duplicate entry 'x' for key 'users.email'").unique_index(), Some("email"));
        assert_eq!(refusal(1366, "Incorrect integer value").unique_index(), None);
    }
}
