//! The source of a MariaDB master: streams its binlog as a replica would
//! (from the GTID position mmsync stored), turns the row events of each
//! committed transaction into [`Change`]s, drops what came from other
//! masters (loop suppression, by the origin column), produces the rest to
//! Kafka, and stores the position after them only once Kafka acknowledged.
//!
//! There is no slot: the server does not know how far mmsync has read, and
//! may purge binlogs mmsync still needs (`binlog_expire_logs_seconds`).
//! Such a gap is reported with the way out, never skipped.
//!
//! Deletes leave as the tombstones the AFTER DELETE trigger writes to
//! `mmsync.tombstones`, as on PostgreSQL; the binlog's own delete events are
//! not needed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use metrics::{counter, gauge};
use mysql_async::binlog::events::{Event, EventData, RowsEventData};
use mysql_async::binlog::row::BinlogRow;
use mysql_async::binlog::value::BinlogValue;
use mysql_async::prelude::Queryable;
use mysql_async::{BinlogStream, BinlogStreamRequest, Conn, Value};
use rdkafka::producer::FutureProducer;
use tokio::sync::watch;

use crate::change::{Change, Key, LogPosition, Op, Position, Row};
use crate::error::{Error, Result};
use crate::mariadb::db::{connect, describe, options, quote_literal, table_of, url_database, Column, Table, TextForm};
use crate::metrics as m;
use crate::produce::Every;
use crate::topology::{Master, TableName, Topology, ORIGIN_COLUMN, VERSION_COLUMN};

/// How often the source looks after its heartbeat and its measurements.
const TICK: Duration = Duration::from_millis(250);

/// How often the binlog on disk is measured.
const MEASURE_EVERY: Duration = Duration::from_secs(5);

/// How often the audit tables are pruned and the pending dead letters counted.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// A position moved only by transactions with nothing to send (other
/// masters' changes applied here) is stored at most this often: a restart
/// reads them again, and drops them again.
const STORE_IDLE_EVERY: Duration = Duration::from_secs(5);

/// How often the server sends a heartbeat event when it has nothing else.
const SERVER_HEARTBEAT: Duration = Duration::from_secs(5);

/// A binlog stream silent this long (three server heartbeats) is taken for
/// a dead connection, and the source reconnects.
const SILENT_FOR: Duration = Duration::from_secs(15);

/// MariaDB's own event types, which the MySQL event parser does not know.
const MARIADB_GTID_EVENT: u8 = 0xa2;
/// A GTID event's flag: the transaction is one statement, without BEGIN and COMMIT (DDL).
const GTID_STANDALONE: u8 = 1;
/// Compressed query and row events (`log_bin_compress`).
const COMPRESSED_EVENTS: std::ops::RangeInclusive<u8> = 0xa5..=0xab;

/// A GTID position: for each replication domain, the server id and
/// sequence number of the last transaction read, written as
/// `@@gtid_binlog_pos` writes it: `domain-server-seq`, comma-separated.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Gtids(BTreeMap<u32, (u32, u64)>);

impl Gtids {
    pub fn parse(text: &str) -> std::result::Result<Gtids, String> {
        let mut out = BTreeMap::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let bad = || format!("{part:?} is not a GTID (domain-server-sequence)");
            let mut it = part.split('-');
            let (Some(d), Some(s), Some(n), None) = (it.next(), it.next(), it.next(), it.next()) else {
                return Err(bad());
            };
            let domain = d.parse().map_err(|_| bad())?;
            out.insert(domain, (s.parse().map_err(|_| bad())?, n.parse().map_err(|_| bad())?));
        }
        Ok(Gtids(out))
    }

    pub fn advance(&mut self, domain: u32, server: u32, seq: u64) {
        self.0.insert(domain, (server, seq));
    }
}

impl std::fmt::Display for Gtids {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(d, (s, n))| format!("{d}-{s}-{n}")).collect();
        f.write_str(&parts.join(","))
    }
}

/// Runs the source of `master` until `shutdown` turns true (see
/// [`crate::produce::keep_running`]).
pub async fn run(topology: Arc<Topology>, master: Master, shutdown: watch::Receiver<bool>) -> Result<()> {
    crate::produce::keep_running::<Capture>(topology, master, shutdown).await
}

impl crate::produce::Source for Capture {
    async fn connect(topology: &Topology, master: &Master) -> Result<Capture> {
        Capture::connect(topology, master).await
    }

    fn reading(&self) -> String {
        format!("the binlog from GTID {}", self.stored)
    }

    async fn run(
        &mut self,
        topology: &Topology,
        producer: &FutureProducer,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<()> {
        let name = self.master.name.clone();
        let chunk = topology.sync.capture_max_changes;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut beat, mut measure, mut prune) = (Every::default(), Every::default(), Every::default());
        loop {
            tokio::select! {
                biased;
                // Shutdown first: what was read and not stored is read again next time.
                _ = crate::produce::stopped(shutdown) => return Ok(()),
                event = self.stream.next() => {
                    self.take(event)?;
                    // Everything that is already here, up to a chunk.
                    while self.ready.len() < chunk {
                        let Some(event) = self.stream.next().now_or_never() else { break };
                        self.take(event)?;
                    }
                }
                _ = tick.tick() => {
                    if self.last_event.elapsed() > SILENT_FOR {
                        return Err(Error::Mariadb {
                            master: name.clone(),
                            context: format!("the binlog stream sent nothing, not even a heartbeat, for {SILENT_FOR:?}"),
                            source: mysql_async::Error::Io(mysql_async::IoError::Io(std::io::ErrorKind::TimedOut.into())),
                        });
                    }
                    if beat.due(topology.sync.heartbeat_interval) {
                        self.beat().await?;
                    }
                    if measure.due(MEASURE_EVERY) {
                        self.measure_binlog().await?;
                    }
                    if prune.due(PRUNE_EVERY) {
                        self.prune_audit(topology).await?;
                    }
                }
            }
            if self.suppressed > 0 {
                counter!(m::LOOP_SUPPRESSED, m::MASTER => name.clone()).increment(std::mem::take(&mut self.suppressed));
            }
            if !self.ready.is_empty() {
                let crash = self.crash_after_produce && self.ready.iter().any(|c| c.table.schema != "mmsync");
                let changes = std::mem::take(&mut self.ready);
                let refused = crate::produce::round(topology, producer, &name, changes).await?;
                self.keep_dead_letters(topology, refused).await?;
                if crash {
                    crate::failpoint::crash(crate::failpoint::CRASH_AFTER_PRODUCE);
                }
                self.store().await?;
            } else if self.dirty && self.read != self.stored && self.last_store.elapsed() >= STORE_IDLE_EVERY {
                self.store().await?;
            }
        }
    }

    fn progressed(&self) -> bool {
        self.progressed
    }
}

/// The transaction being read.
#[derive(Debug, Default)]
struct Transaction {
    gtid: Option<(u32, u32, u64)>,
    standalone: bool,
    changes: Vec<Change>,
    /// It changed something besides the capture position itself.
    dirty: bool,
}

/// A connected source.
struct Capture {
    master: Master,
    conn: Conn,
    stream: BinlogStream,
    url_db: String,
    synced: Vec<TableName>,
    /// Synced tables as this master has them (types decide a value's text).
    tables: HashMap<TableName, Table>,
    /// What was read: whole transactions only.
    read: Gtids,
    /// What is stored on the master (everything before it is in Kafka).
    stored: Gtids,
    last_store: Instant,
    /// Read transactions since the last store changed something.
    dirty: bool,
    txn: Transaction,
    /// Changes of whole transactions, not produced yet.
    ready: Vec<Change>,
    suppressed: u64,
    progressed: bool,
    crash_after_produce: bool,
    /// When the stream last sent anything.
    last_event: Instant,
}

/// The server id mmsync's binlog connection registers with: one per master
/// name, in a range real servers seldom use (they must all differ).
fn replica_server_id(master: &str) -> u32 {
    let hash = master.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ b as u32).wrapping_mul(0x0100_0193));
    0x6d6d_0000 | (hash & 0xffff)
}

impl Capture {
    async fn connect(topology: &Topology, master: &Master) -> Result<Capture> {
        let name = master.name.as_str();
        let mut conn = connect(master).await?;
        let url_db = url_database(master)?;
        let stored: Option<String> = conn
            .exec_first("SELECT gtid_pos FROM mmsync.capture_position WHERE master = ?", (name,))
            .await
            .map_err(Error::mariadb(name, "reading the capture position (has `mmsync init` run?)"))?;
        let stored = stored.ok_or_else(|| Error::Setup {
            master: name.into(),
            problem: "mmsync.capture_position has no position for this master".into(),
            fix: "run `mmsync init`".into(),
        })?;
        let stored = Gtids::parse(&stored).map_err(|e| Error::Setup {
            master: name.into(),
            problem: format!("mmsync.capture_position holds an unreadable position: {e}"),
            fix: "set it to a GTID position (SELECT @@gtid_binlog_pos shows the current one)".into(),
        })?;
        let mut tables = HashMap::new();
        for table in topology.synced_tables() {
            if let Some(t) = describe(&mut conn, name, &table, &url_db).await? {
                tables.insert(table, t);
            }
        }
        let mut binlog =
            Conn::new(options(master)?).await.map_err(Error::mariadb(name, "connecting for the binlog"))?;
        for sql in [
            // MariaDB's own events (GTIDs) rather than their MySQL stand-ins.
            "SET @mariadb_slave_capability = 4".to_string(),
            // The server says it is there when it has nothing to send: a
            // stream silent for longer is a dead connection.
            format!("SET @master_heartbeat_period = {}", SERVER_HEARTBEAT.as_nanos()),
            format!("SET @slave_connect_state = {}", quote_literal(&stored.to_string())),
            "SET @slave_gtid_strict_mode = 0".into(),
            "SET @slave_gtid_ignore_duplicates = 0".into(),
        ] {
            binlog.query_drop(sql).await.map_err(Error::mariadb(name, "preparing the binlog stream"))?;
        }
        let stream = binlog
            .get_binlog_stream(BinlogStreamRequest::new(replica_server_id(name)))
            .await
            .map_err(|e| binlog_error(name, &stored, e))?;
        Ok(Capture {
            master: master.clone(),
            conn,
            stream,
            url_db,
            synced: topology.synced_tables(),
            tables,
            read: stored.clone(),
            stored,
            last_store: Instant::now(),
            dirty: false,
            txn: Transaction::default(),
            ready: Vec::new(),
            suppressed: 0,
            progressed: false,
            crash_after_produce: crate::failpoint::armed(crate::failpoint::CRASH_AFTER_PRODUCE),
            last_event: Instant::now(),
        })
    }

    /// Stores the position of the last whole transaction read: everything
    /// before it is in Kafka.
    async fn store(&mut self) -> Result<()> {
        if self.read == self.stored {
            return Ok(());
        }
        let pos = self.read.to_string();
        self.conn
            .exec_drop(
                "UPDATE mmsync.capture_position SET gtid_pos = ?, updated_at = CURRENT_TIMESTAMP(6) WHERE master = ?",
                (&pos, &self.master.name),
            )
            .await
            .map_err(Error::mariadb(&self.master.name, "storing the capture position"))?;
        self.stored = self.read.clone();
        self.last_store = Instant::now();
        self.dirty = false;
        self.progressed = true;
        Ok(())
    }

    /// Rewrites this master's heartbeat row (see the PostgreSQL source).
    async fn beat(&mut self) -> Result<()> {
        self.conn
            .exec_drop(
                "INSERT INTO mmsync.heartbeats (master, beat_at) VALUES (?, UTC_TIMESTAMP(6))
                 ON DUPLICATE KEY UPDATE beat_at = VALUES(beat_at)",
                (&self.master.name,),
            )
            .await
            .map_err(Error::mariadb(&self.master.name, "writing the heartbeat (has `mmsync init` run?)"))
    }

    /// Sets the gauge of the binlog the server keeps.
    async fn measure_binlog(&mut self) -> Result<()> {
        let bytes = crate::mariadb::db::binlog_bytes(&mut self.conn, &self.master.name).await?;
        gauge!(m::BINLOG_KEPT, m::MASTER => self.master.name.clone()).set(bytes as f64);
        Ok(())
    }

    /// Deletes this master's conflicts and retried dead letters older than
    /// their retention, in bounded steps, and sets the gauge of pending
    /// dead letters (as the PostgreSQL source does).
    async fn prune_audit(&mut self, topology: &Topology) -> Result<()> {
        let name = self.master.name.clone();
        let steps = [
            (
                "conflicts",
                "DELETE FROM mmsync.conflicts WHERE logged_at < CURRENT_TIMESTAMP(6) - INTERVAL ? SECOND LIMIT 10000",
                topology.sync.conflicts_keep,
            ),
            (
                "dead_letters",
                "DELETE FROM mmsync.dead_letters WHERE retried_at < CURRENT_TIMESTAMP(6) - INTERVAL ? SECOND LIMIT 10000",
                topology.sync.dead_letters_keep,
            ),
        ];
        for (kind, sql, keep) in steps {
            self.conn
                .exec_drop(sql, (keep.as_secs(),))
                .await
                .map_err(Error::mariadb(&name, format!("pruning mmsync.{kind}")))?;
            let pruned = self.conn.affected_rows();
            counter!(m::AUDIT_PRUNED, m::MASTER => name.clone(), m::KIND => kind).increment(pruned);
        }
        let pending: Option<i64> = self
            .conn
            .query_first("SELECT count(*) FROM mmsync.dead_letters WHERE retried_at IS NULL")
            .await
            .map_err(Error::mariadb(&name, "counting dead letters"))?;
        gauge!(m::DEAD_LETTERS_PENDING, m::MASTER => name).set(pending.unwrap_or(0) as f64);
        Ok(())
    }

    /// Keeps, on this master, the changes that cannot be sent.
    async fn keep_dead_letters(&mut self, topology: &Topology, refused: Vec<(Change, String)>) -> Result<()> {
        for (c, reason) in refused {
            let topic = crate::kafka::topic_name(&topology.kafka.topic_prefix, &c.origin, &c.table);
            let letter = crate::sink::DeadLetter {
                at: crate::sink::RecordId { topic, partition: -1, offset: -1 },
                key: Some(c.kafka_key().into_bytes()),
                value: Some(c.kafka_value()),
                reason,
            };
            crate::mariadb::apply::keep_dead_letter(&mut self.conn, &self.master.name, &letter).await?;
        }
        Ok(())
    }

    /// Takes one event of the stream.
    fn take(&mut self, event: Option<std::result::Result<Event, mysql_async::Error>>) -> Result<()> {
        let name = self.master.name.clone();
        let event = match event {
            Some(Ok(event)) => event,
            Some(Err(e)) => return Err(binlog_error(&name, &self.stored, e)),
            None => {
                return Err(Error::Mariadb {
                    master: name,
                    context: "reading the binlog".into(),
                    source: mysql_async::Error::Io(mysql_async::IoError::Io(std::io::ErrorKind::UnexpectedEof.into())),
                })
            }
        };
        self.last_event = Instant::now();
        let read_at = self.read.to_string();
        let stream_error = |reason: String| Error::Stream { master: name.clone(), lsn: read_at.clone(), reason };
        let header = event.header();
        let raw_type = header.event_type_raw();
        if raw_type == MARIADB_GTID_EVENT {
            let data = event.data();
            if data.len() < 13 {
                return Err(stream_error(format!("a GTID event of {} bytes", data.len())));
            }
            let seq = u64::from_le_bytes(data[0..8].try_into().expect("8 bytes"));
            let domain = u32::from_le_bytes(data[8..12].try_into().expect("4 bytes"));
            if !self.txn.changes.is_empty() {
                // A transaction that never committed in the binlog (an XA
                // transaction PREPAREd, say): dropping it would lose rows.
                return Err(stream_error(format!(
                    "transaction {:?} ended without a commit before GTID {domain}-{}-{seq}; XA transactions on synced \
                     tables are not supported",
                    self.txn.gtid,
                    header.server_id()
                )));
            }
            self.txn = Transaction {
                gtid: Some((domain, header.server_id(), seq)),
                standalone: data[12] & GTID_STANDALONE != 0,
                ..Transaction::default()
            };
            return Ok(());
        }
        if COMPRESSED_EVENTS.contains(&raw_type) {
            return Err(Error::Setup {
                master: name,
                problem: "the binlog holds compressed events, which mmsync cannot read yet".into(),
                fix: "set log_bin_compress = OFF".into(),
            });
        }
        let data = match event.read_data() {
            Ok(Some(data)) => data,
            // MariaDB's other events (annotations, checkpoints, GTID lists).
            Ok(None) => return Ok(()),
            Err(e) => return Err(stream_error(format!("an event of type {raw_type:#x}: {e}"))),
        };
        match data {
            EventData::RowsEvent(rows) => {
                let Some(tme) = self.stream.get_tme(rows.table_id()) else {
                    return Err(stream_error(format!("rows of table id {} before its table map", rows.table_id())));
                };
                let table = table_of(&tme.database_name(), &tme.table_name(), &self.url_db, &self.synced);
                let tombstones = table.schema == "mmsync" && table.name == "tombstones";
                if table.schema == "mmsync" && table.name == "capture_position" {
                    return Ok(());
                }
                self.txn.dirty = true;
                if !tombstones && !self.synced.contains(&table) {
                    return Ok(());
                }
                let op = match &rows {
                    RowsEventData::WriteRowsEvent(_) | RowsEventData::WriteRowsEventV1(_) => Op::Insert,
                    RowsEventData::UpdateRowsEvent(_)
                    | RowsEventData::UpdateRowsEventV1(_)
                    | RowsEventData::PartialUpdateRowsEvent(_) => Op::Update,
                    // A delete leaves as its tombstone.
                    RowsEventData::DeleteRowsEvent(_) | RowsEventData::DeleteRowsEventV1(_) => return Ok(()),
                };
                let mut after_images = Vec::new();
                for row in rows.rows(tme) {
                    let (_, after) = row.map_err(|e| stream_error(format!("a row of {table}: {e}")))?;
                    if let Some(after) = after {
                        after_images.push(after);
                    }
                }
                for after in after_images {
                    let change = if tombstones {
                        self.tombstone(after).map_err(stream_error)?
                    } else {
                        self.row(&table, op, after).map_err(stream_error)?
                    };
                    match change {
                        Some(c) if c.origin == name => self.txn.changes.push(c),
                        Some(_) => self.suppressed += 1,
                        None => {}
                    }
                }
            }
            EventData::XidEvent(_) => self.commit(header.timestamp()),
            EventData::QueryEvent(q) => {
                let query = q.query();
                if self.txn.standalone || query.trim().eq_ignore_ascii_case("COMMIT") {
                    self.commit(header.timestamp());
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The transaction being read committed: its changes are ready, and the
    /// position moves past it once they are in Kafka.
    fn commit(&mut self, timestamp_s: u32) {
        let txn = std::mem::take(&mut self.txn);
        if let Some((domain, server, seq)) = txn.gtid {
            self.read.advance(domain, server, seq);
        }
        self.dirty |= txn.dirty;
        // The binlog's commit time has seconds only; the versions the
        // triggers stamped have microseconds, and are bounded by the clock.
        let now_ms = m::now_ms();
        let newest = txn.changes.iter().map(|c| (c.version / 1000).min(now_ms)).max().unwrap_or(0);
        let commit_ms = (timestamp_s as i64 * 1000).max(newest);
        let at = match txn.gtid {
            Some((domain, server, seq)) => LogPosition::Mariadb { domain, server, seq },
            None => LogPosition::Copied,
        };
        for mut c in txn.changes {
            c.position.at = at;
            c.position.commit_ms = commit_ms;
            self.ready.push(c);
        }
    }

    /// A synced table's row as a change; `None` when it has no key yet.
    fn row(&self, table: &TableName, op: Op, row: BinlogRow) -> std::result::Result<Option<Change>, String> {
        let Some(info) = self.tables.get(table) else {
            return Err(format!("{table} was not found when the source connected; restart mmsync after creating it"));
        };
        let mut values = Row::new();
        for (i, column) in row.columns_ref().iter().enumerate() {
            let name = column.name_str().into_owned();
            if name.starts_with('@') {
                return Err(format!(
                    "the binlog has no column names for {table}; set binlog_row_metadata = FULL on this master"
                ));
            }
            // Binlog columns come in table order: the same place first.
            let Some(c) = info.columns.get(i).filter(|c| c.name == name).or_else(|| info.column(&name)) else {
                return Err(format!(
                    "{table} has a column {name:?} the source did not see when it connected; restart mmsync after changing a table"
                ));
            };
            let value = match row.as_ref(i) {
                None => None,
                Some(BinlogValue::Value(v)) => text(v, c)?,
                Some(BinlogValue::Jsonb(_) | BinlogValue::JsonDiff(_)) => {
                    return Err(format!("{table}.{name}: a MySQL binary JSON value, which MariaDB does not write"))
                }
            };
            values.insert(name, value);
        }
        let origin = values
            .remove(ORIGIN_COLUMN)
            .flatten()
            .ok_or_else(|| format!("{table} has no {ORIGIN_COLUMN}; run `mmsync init`"))?;
        let version = values
            .remove(VERSION_COLUMN)
            .flatten()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{table} has no {VERSION_COLUMN}; run `mmsync init`"))?;
        let mut key = Key::new();
        for k in &info.key {
            let v = values.get(k).cloned().flatten().ok_or_else(|| format!("{table}: key column {k:?} is null"))?;
            key.insert(k.clone(), v);
        }
        Ok(Some(self.change(table.clone(), op, key, Some(values), origin, version)))
    }

    /// A row of `mmsync.tombstones` as the delete it records.
    fn tombstone(&self, row: BinlogRow) -> std::result::Result<Option<Change>, String> {
        let mut fields: HashMap<String, String> = HashMap::new();
        for (i, column) in row.columns_ref().iter().enumerate() {
            if let Some(BinlogValue::Value(v)) = row.as_ref(i) {
                let text = match v {
                    Value::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
                    Value::Int(n) => n.to_string(),
                    Value::UInt(n) => n.to_string(),
                    _ => continue,
                };
                fields.insert(column.name_str().into_owned(), text);
            }
        }
        let field = |c: &str| fields.get(c).cloned().ok_or_else(|| format!("mmsync.tombstones row without {c}"));
        let table = TableName { schema: field("schema_name")?, name: field("table_name")? };
        if !self.synced.contains(&table) {
            return Ok(None);
        }
        let key: Key = serde_json::from_str(&field("key_text")?).map_err(|e| format!("tombstone key: {e}"))?;
        let version = field("version")?.parse().map_err(|e| format!("tombstone version: {e}"))?;
        Ok(Some(self.change(table, Op::Delete, key, None, field("origin")?, version)))
    }

    fn change(&self, table: TableName, op: Op, key: Key, row: Option<Row>, origin: String, version: i64) -> Change {
        Change {
            table,
            op,
            key,
            row,
            unchanged: Vec::new(),
            superseded: false,
            origin,
            version,
            position: Position { master: self.master.name.clone(), at: LogPosition::Copied, commit_ms: 0 },
        }
    }
}

/// What a binlog error means: a position the server no longer has is the
/// operator's to resolve (changes may be missing elsewhere); others retry.
fn binlog_error(master: &str, stored: &Gtids, e: mysql_async::Error) -> Error {
    if crate::mariadb::errors::code(&e) == Some(crate::mariadb::errors::BINLOG_UNREADABLE) {
        return Error::Setup {
            master: master.into(),
            problem: format!(
                "the binlog after position {stored} cannot be read ({e}): binlogs were purged while mmsync was \
                 away, so changes written here after that position may never have reached the other masters"
            ),
            fix: format!(
                "find the differences with `mmsync verify` and write those rows again here; then let the source \
                 go on from now with UPDATE mmsync.capture_position SET gtid_pos = @@gtid_binlog_pos WHERE master = \
                 {}; keep binlogs longer than mmsync may be away (binlog_expire_logs_seconds)",
                quote_literal(master)
            ),
        };
    }
    Error::mariadb(master, "reading the binlog")(e)
}

/// A column value as text: the text MariaDB itself prints for it, except
/// binary strings, which travel as `\x` and hex digits (PostgreSQL's bytea
/// text), and `TIMESTAMP`, in UTC.
fn text(v: &Value, column: &Column) -> std::result::Result<Option<String>, String> {
    let fraction = |us: u32| match column.form {
        TextForm::Instant(0) | TextForm::Time(0) | TextForm::Plain | TextForm::Boolean | TextForm::Binary => {
            String::new()
        }
        TextForm::Instant(digits) | TextForm::Time(digits) => format!(".{us:06}")[..digits + 1].to_string(),
    };
    Ok(Some(match v {
        Value::NULL => return Ok(None),
        Value::Int(n) => n.to_string(),
        Value::UInt(n) => n.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Double(f) => f.to_string(),
        Value::Bytes(b) if column.form == TextForm::Binary => {
            let mut s = String::with_capacity(2 + b.len() * 2);
            s.push_str("\\x");
            for byte in b {
                s.push_str(&format!("{byte:02x}"));
            }
            s
        }
        Value::Bytes(b) if column.data_type == "timestamp" => {
            // Seconds since the epoch, with a fraction when there is one.
            let text = String::from_utf8_lossy(b);
            let (secs, us) = match text.split_once('.') {
                Some((s, f)) => (s.parse::<i64>().unwrap_or(0), f.parse::<u32>().unwrap_or(0)),
                None => (text.parse::<i64>().unwrap_or(0), 0),
            };
            let (y, mo, d) = civil_from_days(secs.div_euclid(86_400));
            let s = secs.rem_euclid(86_400);
            format!("{y:04}-{mo:02}-{d:02} {:02}:{:02}:{:02}{}", s / 3600, s / 60 % 60, s % 60, fraction(us))
        }
        Value::Bytes(b) => String::from_utf8(b.clone())
            .map_err(|_| format!("column {} holds bytes that are not UTF-8; use utf8mb4 tables", column.name))?,
        Value::Date(y, mo, d, h, mi, s, us) => {
            if column.data_type == "date" {
                format!("{y:04}-{mo:02}-{d:02}")
            } else {
                format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}{}", fraction(*us))
            }
        }
        Value::Time(negative, days, h, mi, s, us) => {
            let hours = *days as u64 * 24 + *h as u64;
            format!("{}{hours:02}:{mi:02}:{s:02}{}", if *negative { "-" } else { "" }, fraction(*us))
        }
    }))
}

/// Year, month, day of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(data_type: &str, column_type: &str) -> Column {
        Column::new("c", data_type, column_type, None, None)
    }

    #[test]
    fn a_gtid_position_reads_and_writes_as_mariadb_writes_it() {
        let mut g = Gtids::parse("0-1-5,7-7-100").unwrap();
        g.advance(7, 7, 101);
        g.advance(3, 9, 1);
        assert_eq!(g.to_string(), "0-1-5,3-9-1,7-7-101");
        assert_eq!(Gtids::parse("").unwrap(), Gtids::default());
        assert!(Gtids::parse("0-1").is_err() && Gtids::parse("a-b-c").is_err());
    }

    #[test]
    fn values_read_from_the_binlog_have_the_text_mariadb_prints() {
        let t = |v: Value, d: &str, ct: &str| text(&v, &column(d, ct)).unwrap().unwrap();
        assert_eq!(
            t(Value::Bytes(b"1700000000.123456".to_vec()), "timestamp", "timestamp(6)"),
            "2023-11-14 22:13:20.123456"
        );
        assert_eq!(t(Value::Bytes(b"0".to_vec()), "timestamp", "timestamp"), "1970-01-01 00:00:00");
        assert_eq!(
            t(Value::Date(2024, 2, 29, 23, 59, 58, 120000), "datetime", "datetime(3)"),
            "2024-02-29 23:59:58.120"
        );
        assert_eq!(t(Value::Date(2024, 2, 29, 0, 0, 0, 0), "date", "date"), "2024-02-29");
        assert_eq!(t(Value::Time(true, 1, 2, 3, 4, 0), "time", "time"), "-26:03:04");
        assert_eq!(t(Value::Bytes(vec![0, 0xff]), "blob", "blob"), "\\x00ff");
        assert_eq!(t(Value::UInt(u64::MAX), "bigint", "bigint(20) unsigned"), "18446744073709551615");
        assert_eq!(text(&Value::NULL, &column("int", "int(11)")).unwrap(), None);
        assert!(text(&Value::Bytes(vec![0xff]), &column("varchar", "varchar(3)")).is_err());
    }

    #[test]
    fn each_master_registers_with_its_own_replica_server_id() {
        assert_ne!(replica_server_id("seoul"), replica_server_id("busan"));
        assert_eq!(replica_server_id("seoul") >> 16, 0x6d6d);
    }
}
