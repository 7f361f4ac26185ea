//! PostgreSQL's side of applying changes: the statements of one table
//! (lock the rows and tombstones of a batch's keys, upsert, delete, record
//! tombstones, settle unique values), run in the sink's transaction as the
//! applier, with what the target refuses returned as dead letters. The plan
//! of what to write is [`crate::lww::plan`]'s, shared by every kind of
//! master; the Kafka consumer that feeds it is [`crate::sink`]'s.

use std::collections::{BTreeMap, HashMap};

use metrics::counter;
use sqlx::{PgConnection, Row as _};

use crate::change::{encode_key, Change, Key};
use crate::error::{Error, Result};
use crate::lww::{stamp, Stamp};
use crate::metrics as m;
use crate::postgres::schema::TableInfo;
use crate::sink::{DeadLetter, Rec, RecordId};
use crate::topology::{quote_ident, quote_literal, ORIGIN_COLUMN, VERSION_COLUMN};

use crate::sink::Outcome;

/// Why the target database refused records as data.
#[derive(Debug)]
struct Refusal {
    code: Option<String>,
    constraint: Option<String>,
    message: String,
}

/// The statements of one table, built once per connection.
pub(crate) struct TableSql {
    pub(crate) info: TableInfo,
    /// The data columns' names, sorted: what a record's row and unchanged columns must be.
    columns: Vec<String>,
    /// The data columns' names in table order: the upsert's arrays.
    data: Vec<String>,
    /// Rows of whole changes: the data columns' arrays, origins, versions.
    upsert: String,
    /// Deletes by key, where older: the key columns' arrays, versions, origins.
    delete: String,
    /// Tombstones recorded or raised: canonical keys, versions, origins.
    tombstone: String,
    /// The row of each key, locked: the key columns' arrays.
    lock_rows: String,
    /// The tombstone of each key: canonical keys, the batch's newest version of each.
    read_tombstones: String,
    /// Per plain unique index besides the key: (index name, the statement
    /// that finds and locks the rows holding a record's values under another key).
    unique_holders: Vec<(String, String)>,
    /// Versions further ahead of the clock are refused ([`crate::topology::SyncSettings::max_clock_skew`]).
    pub(crate) max_clock_skew: std::time::Duration,
}

impl TableSql {
    pub(crate) fn new(info: TableInfo, max_clock_skew: std::time::Duration) -> TableSql {
        let t = info.name.quoted();
        let (o, v) = (quote_ident(ORIGIN_COLUMN), quote_ident(VERSION_COLUMN));
        let ty = |c: &str| &info.column(c).expect("a column of the table").sql_type;
        let cast = |c: &str, from: &str| format!("({from}->>{})::{}", quote_literal(c), ty(c));
        // A batch travels as one text array per column (the values' text
        // form, cast to the column's type in SQL) and unnest() makes its
        // rows: no JSON to build here or to parse there, per value.
        let data: Vec<String> = info.data_columns().map(|c| c.name.clone()).collect();
        let arrays = |n: usize, then: &[&str]| {
            let mut a: Vec<String> = (1..=n).map(|i| format!("${i}::text[]")).collect();
            a.extend(then.iter().enumerate().map(|(j, ty)| format!("${}::{ty}[]", n + 1 + j)));
            a.join(", ")
        };
        let aliases = |n: usize, then: &[&str]| {
            let mut a: Vec<String> = (0..n).map(|i| format!("c{i}")).collect();
            a.extend(then.iter().map(|s| s.to_string()));
            a.join(", ")
        };
        let cols: Vec<String> = data.iter().map(|c| quote_ident(c)).collect();
        let values: Vec<String> = data.iter().enumerate().map(|(i, c)| format!("e.c{i}::{}", ty(c))).collect();
        let keys: Vec<String> = info.key.iter().map(|k| quote_ident(k)).collect();
        let mut set: Vec<String> = data
            .iter()
            .filter(|c| !info.key.contains(c))
            .map(|c| format!("{0} = EXCLUDED.{0}", quote_ident(c)))
            .collect();
        set.push(format!("{o} = EXCLUDED.{o}"));
        set.push(format!("{v} = EXCLUDED.{v}"));
        let upsert = format!(
            "INSERT INTO {t} AS t ({cols}, {o}, {v}) OVERRIDING SYSTEM VALUE
             SELECT {values}, e.origin, e.version FROM unnest({arrays}) AS e({aliases})
             ON CONFLICT ({keys}) DO UPDATE SET {set}
             WHERE (t.{v}, t.{o}) < (EXCLUDED.{v}, EXCLUDED.{o})",
            cols = cols.join(", "),
            values = values.join(", "),
            arrays = arrays(data.len(), &["text", "int8"]),
            aliases = aliases(data.len(), &["origin", "version"]),
            keys = keys.join(", "),
            set = set.join(", "),
        );
        // Every statement that finds rows by key walks the batch and probes the
        // primary key once per element (LATERAL ... LIMIT 1). Left to itself
        // the planner joins a batch against a whole table or against every
        // tombstone of it, which costs more the bigger they grow.
        let probe = info
            .key
            .iter()
            .enumerate()
            .map(|(i, k)| format!("t.{} = e.c{i}::{}", quote_ident(k), ty(k)))
            .collect::<Vec<String>>()
            .join(" AND ");
        let n = info.key.len();
        let delete = format!(
            "DELETE FROM {t} WHERE ctid = ANY(ARRAY(
                SELECT t.ctid FROM unnest({}) AS e({})
                CROSS JOIN LATERAL (SELECT t.ctid, t.{v}, t.{o} FROM {t} AS t WHERE {probe} LIMIT 1) AS t
                WHERE (t.{v}, t.{o}) < (e.version, e.origin COLLATE \"C\")))",
            arrays(n, &["int8", "text"]),
            aliases(n, &["version", "origin"]),
        );
        let (schema, table) = (quote_literal(&info.name.schema), quote_literal(&info.name.name));
        // Keys as mmsync.tombstones holds them: the canonical key JSON.
        let tombstone = format!(
            "INSERT INTO mmsync.tombstones AS tb (schema_name, table_name, key, version, origin)
             SELECT {schema}, {table}, e.key::jsonb, e.version, e.origin
             FROM unnest($1::text[], $2::int8[], $3::text[]) AS e(key, version, origin)
             ON CONFLICT (schema_name, table_name, key) DO UPDATE
                SET version = EXCLUDED.version, origin = EXCLUDED.origin, deleted_at = now()
                WHERE (tb.version, tb.origin) < (EXCLUDED.version, EXCLUDED.origin)"
        );
        // The row of each key, locked, by its place in the batch's list of keys.
        let lock_rows = format!(
            "SELECT e.n, t.{v}, t.{o}::text FROM unnest({}) WITH ORDINALITY AS e({}, n)
             CROSS JOIN LATERAL (SELECT t.{v}, t.{o} FROM {t} AS t WHERE {probe} LIMIT 1 FOR UPDATE) AS t",
            arrays(n, &[]),
            aliases(n, &[]),
        );
        // The tombstone of each key, likewise. Only a tombstone at least as
        // new as the batch's newest change of its key can change the plan,
        // and every tombstone is older than `mmsync.tombstone_high` (its
        // trigger keeps it so): a key whose newest change is not older than
        // that has no tombstone worth the lookup, which is most keys while no
        // delete is recent. (Only a conflict's label can differ: a change that
        // lost inside the batch to an earlier one whose stamp a skipped
        // tombstone happens to share is logged as older than the row.)
        let read_tombstones = format!(
            "SELECT e.n, tb.version, tb.origin::text
             FROM unnest($1::text[], $2::int8[]) WITH ORDINALITY AS e(key, newest, n)
             CROSS JOIN LATERAL (SELECT version, origin FROM mmsync.tombstones
                 WHERE schema_name = {schema} AND table_name = {table} AND key = e.key::jsonb LIMIT 1) AS tb
             WHERE e.newest < (SELECT coalesce(pg_sequence_last_value('mmsync.tombstone_high'), 0))"
        );
        let same_key: Vec<String> =
            info.key.iter().map(|k| format!("t.{} = {}", quote_ident(k), cast(k, "($1->'row')"))).collect();
        // The rows holding what the incoming row would put in a unique index:
        // the index's columns or expressions are computed over the incoming
        // row (inside `n`, unqualified names are its columns) and over each
        // row of the table (outside, they can only be `t`'s), under the
        // index's predicate if it is partial.
        let unique_holders = info
            .unique
            .iter()
            .filter(|u| !u.exprs.is_empty())
            .map(|u| {
                let computed: Vec<String> =
                    u.exprs.iter().enumerate().map(|(k, e)| format!("({e}) AS mmsync_e{k}")).collect();
                let equal = if u.nulls_not_distinct { "IS NOT DISTINCT FROM" } else { "=" };
                let mut same: Vec<String> =
                    u.exprs.iter().enumerate().map(|(k, e)| format!("({e}) {equal} n.mmsync_e{k}")).collect();
                if let Some(predicate) = &u.predicate {
                    same.push(format!("({predicate})"));
                }
                let sql = format!(
                    "SELECT {}, t.{v}, t.{o}::text, to_jsonb(t)
                     FROM {t} AS t, (SELECT {} FROM jsonb_populate_record(NULL::{t}, $1->'row')) AS n
                     WHERE {} AND NOT ({}) FOR UPDATE OF t",
                    info.key_json_sql("t"),
                    computed.join(", "),
                    same.join(" AND "),
                    same_key.join(" AND ")
                );
                (u.name.clone(), sql)
            })
            .collect();
        let mut columns = data.clone();
        columns.sort_unstable();
        TableSql {
            info,
            columns,
            data,
            upsert,
            delete,
            tombstone,
            lock_rows,
            read_tombstones,
            unique_holders,
            max_clock_skew,
        }
    }

    /// Applies a table's records in a savepoint. If the database refuses them
    /// as data (a constraint, a value the column cannot take, a missing
    /// column), each record is tried alone: a unique value another key holds
    /// is settled by [`TableSql::apply_one`], and the records still refused
    /// become dead letters, so one bad row never blocks its partition.
    pub(crate) async fn apply_isolated(
        &self,
        conn: &mut PgConnection,
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

    /// One record alone. When a unique index besides the key refuses it, the
    /// value goes to the newer of the two writes by (version, origin), as
    /// every master decides alike: the older key's row is removed (with a
    /// tombstone at the winner's stamp, and logged with its whole row to
    /// `mmsync.conflicts`), then the record is tried again.
    async fn apply_one(
        &self,
        conn: &mut PgConnection,
        target: &str,
        rec: &Rec,
    ) -> Result<std::result::Result<Outcome, Refusal>> {
        // Each round settles one index; a row can clash on each of them.
        for _ in 0..=self.unique_holders.len() {
            let refusal = match self.apply_in_savepoint(conn, target, std::slice::from_ref(rec)).await? {
                Ok(outcome) => return Ok(Ok(outcome)),
                Err(refusal) => refusal,
            };
            let index = refusal
                .constraint
                .as_deref()
                .filter(|_| refusal.code.as_deref() == Some(crate::postgres::sqlstate::UNIQUE_VIOLATION));
            let Some((_, holders)) = self.unique_holders.iter().find(|(name, _)| Some(name.as_str()) == index) else {
                return Ok(Err(refusal));
            };
            if !self.settle_unique(conn, target, rec, holders).await? {
                // The incoming change lost: settled, nothing left to apply.
                return Ok(Ok(Outcome::default()));
            }
        }
        self.apply_in_savepoint(conn, target, std::slice::from_ref(rec)).await
    }

    /// Settles a unique value that `rec` and rows under other keys both hold.
    /// Returns whether `rec` won (and should be applied again).
    async fn settle_unique(&self, conn: &mut PgConnection, target: &str, rec: &Rec, holders: &str) -> Result<bool> {
        let db = |what: &str| Error::db(target, format!("{what} of {}", self.info.name));
        let change = &rec.change;
        let incoming = self.row_json(change);
        let rows = sqlx::query(holders)
            .bind(&incoming)
            .fetch_all(&mut *conn)
            .await
            .map_err(db("finding a unique value's holder"))?;
        let held: Vec<(serde_json::Value, Stamp, serde_json::Value)> =
            rows.into_iter().map(|r| (r.get(0), (r.get(1), r.get(2)), r.get(3))).collect();
        let s = stamp(change);
        let newest_holder = held.iter().map(|(_, st, _)| st.clone()).max();
        let (won, losers, winner) = match newest_holder {
            Some(h) if h > s => {
                let row = serde_json::to_value(&change.row).expect("strings");
                (false, vec![(serde_json::to_value(&change.key).expect("strings"), row)], h)
            }
            _ => (true, held.iter().map(|(k, _, row)| (k.clone(), row.clone())).collect::<Vec<_>>(), s.clone()),
        };
        // Removed at the winner's stamp. Its tombstone is this master's own
        // (the winner's version, this master's name), so this master's
        // source sends it: whether the loser meets the winner depends on
        // arrival order (the winner may be deleted on some master before the
        // loser gets there, and then nothing clashes there), so every master
        // that sees the clash tells the others, and the loser goes everywhere.
        let keys: Vec<Key> =
            losers.iter().map(|(key, _)| serde_json::from_value(key.clone()).unwrap_or_default()).collect();
        let deletes: Vec<(&Key, i64, &str)> = keys.iter().map(|k| (k, winner.0, winner.1.as_str())).collect();
        self.delete_rows(conn, &deletes).await.map_err(db("removing a unique value's loser"))?;
        let tombstones: Vec<(&Key, i64, &str)> = keys.iter().map(|k| (k, winner.0, target)).collect();
        self.record_tombstones(conn, &tombstones).await.map_err(db("recording tombstones"))?;
        let logged: Vec<serde_json::Value> = losers
            .iter()
            .map(|(key, row)| {
                serde_json::json!({"key": key, "op": change.op.letter(), "iv": change.version, "io": change.origin,
                                   "wv": winner.0, "wo": winner.1, "row": row})
            })
            .collect();
        sqlx::query(
            "INSERT INTO mmsync.conflicts (schema_name, table_name, key, kind, incoming_op, incoming_version, incoming_origin, winner_version, winner_origin, loser_row)
             SELECT $1, $2, x.key, 'unique_value_lost', x.op, x.iv, x.io, x.wv, x.wo, x.row
             FROM jsonb_to_recordset($3::jsonb) AS x(key jsonb, op text, iv int8, io text, wv int8, wo text, row jsonb)",
        )
        .bind(&self.info.name.schema)
        .bind(&self.info.name.name)
        .bind(serde_json::Value::Array(logged))
        .execute(&mut *conn)
        .await
        .map_err(db("logging a unique value's conflict"))?;
        counter!(m::CONFLICTS, m::TARGET => target.to_string(), m::TABLE => self.info.name.to_string(), m::KIND => "unique_value_lost")
            .increment(losers.len() as u64);
        Ok(won)
    }

    /// `Ok(Err(refusal))` when the database refused the data; `Err` for everything else.
    async fn apply_in_savepoint(
        &self,
        conn: &mut PgConnection,
        target: &str,
        recs: &[Rec],
    ) -> Result<std::result::Result<Outcome, Refusal>> {
        savepoint(conn, target, "SAVEPOINT mmsync_table").await?;
        match self.apply(conn, target, recs).await {
            Ok(outcome) => {
                savepoint(conn, target, "RELEASE SAVEPOINT mmsync_table").await?;
                Ok(Ok(outcome))
            }
            Err(Error::Db { source, .. }) if is_data_error(&source) => {
                savepoint(conn, target, "ROLLBACK TO SAVEPOINT mmsync_table").await?;
                let (code, constraint) = match &source {
                    sqlx::Error::Database(e) => (e.code().map(|c| c.into_owned()), e.constraint().map(str::to_string)),
                    _ => (None, None),
                };
                Ok(Err(Refusal { code, constraint, message: source.to_string() }))
            }
            Err(Error::Db { source, .. }) if is_passing_refusal(&source) => Err(Error::Missing {
                master: target.to_string(),
                problem: format!("applying to {}: {source}", self.info.name),
                fix: "give mmsync's role back its privileges on the table, or create the table again; its changes \
                      wait in Kafka and this sink retries"
                    .into(),
            }),
            Err(e) => Err(e),
        }
    }

    /// Last-writer-wins for one table's records: validated here, planned by
    /// [`crate::lww::plan`] against the target's rows (locked) and
    /// tombstones of their keys, and written as the plan says.
    async fn apply(&self, conn: &mut PgConnection, target: &str, recs: &[Rec]) -> Result<Outcome> {
        let db = |what: &str| Error::db(target, format!("{what} of {}", self.info.name));
        let mut outcome = Outcome::default();
        let valid = crate::sink::validate(recs, |c| self.shape_problem(c), self.max_clock_skew, &mut outcome.dead);
        if valid.is_empty() {
            return Ok(outcome);
        }
        let changes: Vec<&Change> = valid.iter().map(|&i| &recs[i].change).collect();

        // The target's current state of those keys; existing rows are locked
        // so that no local write slips between this read and the writes.
        // Each key once, with the newest version the batch has of it.
        let mut place: HashMap<String, usize> = HashMap::new();
        let mut unique: Vec<(String, &Key, i64)> = Vec::new();
        for c in &changes {
            match place.entry(c.kafka_key()) {
                std::collections::hash_map::Entry::Occupied(at) => {
                    let newest = &mut unique[*at.get()].2;
                    *newest = (*newest).max(c.version);
                }
                std::collections::hash_map::Entry::Vacant(at) => {
                    unique.push((at.key().clone(), &c.key, c.version));
                    at.insert(unique.len() - 1);
                }
            }
        }
        // First the rows, locked, then (a statement later, so that its
        // snapshot is taken once the locks are held) the tombstones: a local
        // delete that the lock waited for has committed its tombstone by
        // then, and this read sees it. One statement would read tombstones as
        // of before the wait.
        let mut query = sqlx::query(&self.lock_rows);
        for column in self.key_arrays(unique.iter().map(|(_, k, _)| *k)) {
            query = query.bind(column);
        }
        let mut held: HashMap<String, crate::lww::Held> = HashMap::new();
        for r in query.fetch_all(&mut *conn).await.map_err(db("locking rows"))? {
            let n: i64 = r.get(0);
            held.entry(unique[n as usize - 1].0.clone()).or_default().row = Some((r.get(1), r.get(2)));
        }
        let rows = sqlx::query(&self.read_tombstones)
            .bind(unique.iter().map(|(k, _, _)| k.as_str()).collect::<Vec<&str>>())
            .bind(unique.iter().map(|(_, _, v)| *v).collect::<Vec<i64>>())
            .fetch_all(&mut *conn)
            .await
            .map_err(db("reading tombstones"))?;
        for r in rows {
            let n: i64 = r.get(0);
            held.entry(unique[n as usize - 1].0.clone()).or_default().tombstone = Some((r.get(1), r.get(2)));
        }
        let plan = crate::lww::plan(&changes, &held);
        outcome.applied.extend(plan.applied.iter().map(|&j| valid[j]));
        outcome.dead.extend(plan.dead.iter().map(|(j, reason)| (valid[*j], reason.clone())));
        let upserts: Vec<&Change> = plan.upserts.iter().map(|&j| plan.whole(j, &changes)).collect();
        let partial: Vec<&Change> = plan.partial.iter().map(|&j| changes[j]).collect();
        let deletes: Vec<(&Key, i64, &str)> =
            plan.deletes.iter().map(|&j| (&changes[j].key, changes[j].version, changes[j].origin.as_str())).collect();
        let table = self.info.name.to_string();
        let mut conflicts: Vec<serde_json::Value> = Vec::new();
        for conflict in &plan.conflicts {
            let change = changes[conflict.index];
            counter!(m::CONFLICTS, m::TARGET => target.to_string(), m::TABLE => table.clone(), m::KIND => conflict.kind.clone()).increment(1);
            // The losing row is kept whole: the winner is what the table holds.
            conflicts.push(serde_json::json!({
                "key": change.key, "kind": conflict.kind, "op": change.op.letter(),
                "iv": change.version, "io": change.origin, "wv": conflict.winner.0, "wo": conflict.winner.1,
                "row": change.row,
            }));
        }
        if plan.skipped > 0 {
            counter!(m::CHANGES_SKIPPED, m::TARGET => target.to_string(), m::TABLE => table).increment(plan.skipped);
        }

        if !upserts.is_empty() {
            self.upsert_rows(conn, &upserts).await.map_err(db("upserting rows"))?;
        }
        for change in partial {
            self.update_present_columns(conn, change).await.map_err(db("updating rows"))?;
        }
        if !deletes.is_empty() {
            self.delete_rows(conn, &deletes).await.map_err(db("deleting rows"))?;
            self.record_tombstones(conn, &deletes).await.map_err(db("recording tombstones"))?;
        }
        if !conflicts.is_empty() {
            sqlx::query(
                "INSERT INTO mmsync.conflicts (schema_name, table_name, key, kind, incoming_op, incoming_version, incoming_origin, winner_version, winner_origin, loser_row)
                 SELECT $1, $2, x.key, x.kind, x.op, x.iv, x.io, x.wv, x.wo, x.row
                 FROM jsonb_to_recordset($3::jsonb) AS x(key jsonb, kind text, op text, iv int8, io text, wv int8, wo text, row jsonb)",
            )
            .bind(&self.info.name.schema)
            .bind(&self.info.name.name)
            .bind(serde_json::Value::Array(conflicts))
            .execute(&mut *conn)
            .await
            .map_err(db("logging conflicts"))?;
        }
        Ok(outcome)
    }

    /// Why an upsert's columns do not fit this table (schema drift), if they don't.
    pub(crate) fn shape_problem(&self, change: &Change) -> Option<String> {
        crate::sink::shape_problem(change, &self.columns, &self.info.name)
    }

    /// One text array per key column, in key order; a key that lacks a
    /// column has NULL there, which matches no row.
    fn key_arrays<'k>(&self, keys: impl Iterator<Item = &'k Key> + Clone) -> Vec<Vec<Option<&'k str>>> {
        self.info.key.iter().map(|k| keys.clone().map(|key| key.get(k).map(String::as_str)).collect()).collect()
    }

    /// Writes whole rows, each where the target's row of its key is older or missing.
    async fn upsert_rows(&self, conn: &mut PgConnection, changes: &[&Change]) -> std::result::Result<(), sqlx::Error> {
        let mut query = sqlx::query(&self.upsert);
        for column in &self.data {
            let values: Vec<Option<&str>> = changes
                .iter()
                .map(|c| c.row.as_ref().and_then(|row| row.get(column)).and_then(|v| v.as_deref()))
                .collect();
            query = query.bind(values);
        }
        query
            .bind(changes.iter().map(|c| c.origin.as_str()).collect::<Vec<&str>>())
            .bind(changes.iter().map(|c| c.version).collect::<Vec<i64>>())
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    /// Deletes the rows of these (key, version, origin) that are older than them.
    async fn delete_rows(
        &self,
        conn: &mut PgConnection,
        deletes: &[(&Key, i64, &str)],
    ) -> std::result::Result<(), sqlx::Error> {
        let mut query = sqlx::query(&self.delete);
        for column in self.key_arrays(deletes.iter().map(|(k, _, _)| *k)) {
            query = query.bind(column);
        }
        query
            .bind(deletes.iter().map(|(_, v, _)| *v).collect::<Vec<i64>>())
            .bind(deletes.iter().map(|(_, _, o)| *o).collect::<Vec<&str>>())
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    /// Records or raises the tombstones of these (key, version, origin).
    async fn record_tombstones(
        &self,
        conn: &mut PgConnection,
        tombstones: &[(&Key, i64, &str)],
    ) -> std::result::Result<(), sqlx::Error> {
        sqlx::query(&self.tombstone)
            .bind(tombstones.iter().map(|(k, _, _)| encode_key(k)).collect::<Vec<String>>())
            .bind(tombstones.iter().map(|(_, v, _)| *v).collect::<Vec<i64>>())
            .bind(tombstones.iter().map(|(_, _, o)| *o).collect::<Vec<&str>>())
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    /// The JSON of a change's row, as the unique-value statements read it.
    fn row_json(&self, change: &Change) -> serde_json::Value {
        serde_json::json!({"row": change.row})
    }

    /// An update that left some (TOASTed) columns out: set only what it sent.
    async fn update_present_columns(
        &self,
        conn: &mut PgConnection,
        change: &Change,
    ) -> std::result::Result<(), sqlx::Error> {
        let (o, v) = (quote_ident(ORIGIN_COLUMN), quote_ident(VERSION_COLUMN));
        let row = change.row.as_ref().expect("updates have rows");
        let mut set: Vec<String> = row
            .keys()
            .filter(|c| !self.info.key.contains(c))
            .map(|c| {
                let ty = &self.info.column(c).expect("shape checked").sql_type;
                format!("{} = ($1::jsonb->>{})::{ty}", quote_ident(c), quote_literal(c))
            })
            .collect();
        set.push(format!("{o} = $2"));
        set.push(format!("{v} = $3"));
        let key_match: Vec<String> = self
            .info
            .key
            .iter()
            .map(|k| {
                format!(
                    "{} = ($1::jsonb->>{})::{}",
                    quote_ident(k),
                    quote_literal(k),
                    self.info.column(k).expect("key").sql_type
                )
            })
            .collect();
        let sql = format!(
            "UPDATE {} SET {} WHERE {} AND ({v}, {o}) < ($3, $2 COLLATE \"C\")",
            self.info.name.quoted(),
            set.join(", "),
            key_match.join(" AND ")
        );
        sqlx::query(&sql)
            .bind(serde_json::to_value(row).expect("strings"))
            .bind(&change.origin)
            .bind(change.version)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }
}

async fn savepoint(conn: &mut PgConnection, target: &str, sql: &'static str) -> Result<()> {
    // Executor::execute returns a boxed future; `raw_sql(..).execute` would trip
    // rustc's higher-ranked Send check when the sink is spawned.
    sqlx::Executor::execute(conn, sql).await.map_err(Error::db(target, "savepoint"))?;
    Ok(())
}

/// What makes a transaction the applier's, as PostgreSQL's own apply worker
/// does it: replicated rows skip foreign-key checks and ordinary triggers
/// (mmsync's stamping triggers, which would restamp them, and the
/// application's own; `ENABLE REPLICA` or `ENABLE ALWAYS` triggers still
/// fire). A change of one source therefore never waits for another table's
/// sink, whatever order the tables' changes arrive in. An application role
/// cannot set it: it takes a superuser or `GRANT SET ON PARAMETER
/// session_replication_role`, which `mmsync check` asks for.
pub const APPLIER_SESSION: &str = "SET LOCAL session_replication_role = replica";

/// Applies one batch of the sink and stores its offsets, in one
/// transaction; returns the changes that took effect.
pub(crate) async fn commit_batch(
    conn: &mut PgConnection,
    sql: &mut TableSql,
    batch: crate::sink::Batch<'_>,
) -> Result<Vec<Change>> {
    let crate::sink::Batch { target, recs, mut dead, offsets, commits, sources, max_dead_letters } = batch;
    let db = |what: &str| Error::db(target, what.to_string());
    if recs.iter().any(|r| sql.shape_problem(&r.change).is_some()) {
        // The table may have changed since this sink connected (a column
        // added to fix drift, say): look at it again before refusing.
        if let Some(info) = crate::postgres::schema::describe(conn, target, &sql.info.name).await? {
            *sql = TableSql::new(info, sql.max_clock_skew);
        }
    }
    let mut tx = sqlx::Connection::begin(&mut *conn).await.map_err(db("beginning a transaction"))?;
    sqlx::query(APPLIER_SESSION).execute(&mut *tx).await.map_err(db("marking the applier session"))?;
    let mut applied: Vec<Change> = Vec::new();
    if !recs.is_empty() {
        let (ok, refused) = sql.apply_isolated(&mut tx, target, recs).await?;
        applied.extend(ok);
        dead.extend(refused);
    }
    if !dead.is_empty() {
        crate::sink::check_dead_letter_bound(&mut tx, target, sources, max_dead_letters, &dead).await?;
    }
    for d in dead {
        d.keep(&mut tx, target).await?;
    }
    store_offsets(&mut tx, target, offsets, commits).await?;
    tx.commit().await.map_err(db("committing a batch"))?;
    Ok(applied)
}

/// Stores where the sinks of `target` go on, (topic, partition) -> next
/// offset, in the caller's transaction, with the commit time of the last
/// change taken from each partition where there was one (a partition
/// without keeps the time it had: see [`crate::tombstones`]).
pub(crate) async fn store_offsets(
    conn: &mut PgConnection,
    target: &str,
    offsets: &BTreeMap<(String, i32), i64>,
    commits: &BTreeMap<(String, i32), i64>,
) -> Result<()> {
    let topics: Vec<&str> = offsets.keys().map(|(t, _)| t.as_str()).collect();
    let partitions: Vec<i32> = offsets.keys().map(|(_, p)| *p).collect();
    let next: Vec<i64> = offsets.values().copied().collect();
    let commit: Vec<Option<i64>> = offsets.keys().map(|at| commits.get(at).copied()).collect();
    sqlx::query(
        "INSERT INTO mmsync.applied_offsets AS a (topic, partition, next_offset, last_commit_ms)
         SELECT * FROM unnest($1::text[], $2::int4[], $3::int8[], $4::int8[])
         ON CONFLICT (topic, partition) DO UPDATE SET next_offset = EXCLUDED.next_offset, applied_at = now(),
             last_commit_ms = coalesce(EXCLUDED.last_commit_ms, a.last_commit_ms)",
    )
    .bind(&topics)
    .bind(&partitions)
    .bind(&next)
    .bind(&commit)
    .execute(conn)
    .await
    .map_err(Error::db(target, "storing offsets"))?;
    Ok(())
}

/// Applies changes that did not come from Kafka (a copy from another master,
/// say) to one table of `target` in the open transaction `conn`, by the
/// sink's own rules: last-writer-wins against rows and tombstones, unique
/// values settled, what the target refuses returned as dead letters (kept
/// by the caller). Returns how many took effect.
pub(crate) async fn apply_changes(
    conn: &mut PgConnection,
    target: &str,
    info: TableInfo,
    max_clock_skew: std::time::Duration,
    origin_of_copy: &str,
    changes: Vec<Change>,
) -> Result<(usize, Vec<DeadLetter>)> {
    sqlx::query(APPLIER_SESSION).execute(&mut *conn).await.map_err(Error::db(target, "marking the applier"))?;
    let at = RecordId { topic: format!("copy from {origin_of_copy}"), partition: -1, offset: -1 };
    let recs = changes.into_iter().map(|change| Rec { change, at: at.clone() }).collect();
    let (applied, dead) = TableSql::new(info, max_clock_skew).apply_isolated(conn, target, recs).await?;
    Ok((applied.len(), dead))
}

/// Whether the target refuses this data (see [`crate::postgres::sqlstate`]).
pub(crate) fn is_data_error(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().is_some_and(|c| crate::postgres::sqlstate::refuses_the_data(&c)))
}

/// Whether the target refuses the table for a moment (see [`crate::postgres::sqlstate`]).
fn is_passing_refusal(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().is_some_and(|c| crate::postgres::sqlstate::is_passing_refusal(&c)))
}
