//! The source of one master: streams its slot (pgoutput, over the
//! replication protocol), turns the messages into [`Change`]s, drops what came
//! from other masters (loop suppression), produces the rest to Kafka, and lets
//! the slot move only past what Kafka acknowledged.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use metrics::{counter, gauge};
use rdkafka::producer::FutureProducer;
use sqlx::{PgConnection, Row as _};
use tokio::sync::watch;

use crate::change::{Change, Key, LogPosition, Op, Position, Row};
use crate::error::{Error, Result};
use crate::metrics as m;
use crate::postgres::pgoutput::{self, format_lsn, parse_lsn, Lsn, Message, Relation, Value};
use crate::postgres::replication::{WalMessage, WalStream};
use crate::postgres::schema::{describe, slot_name, TableInfo, PUBLICATION};
use crate::produce::Every;
use crate::sink::{DeadLetter, RecordId};
use crate::topology::{quote_ident, quote_literal, Master, TableName, Topology, ORIGIN_COLUMN, VERSION_COLUMN};

/// How often the retained WAL is measured.
const MEASURE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// How often the audit tables are pruned and the pending dead letters counted.
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// How often the source looks after its heartbeat, its measurements and an
/// idle slot.
const TICK: std::time::Duration = std::time::Duration::from_millis(250);

/// The longest the server goes without a status update (its
/// wal_sender_timeout is 60 s by default).
const STATUS_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// What the decoder made of the messages read so far.
#[derive(Debug, Default)]
pub struct Decoded {
    /// This master's own changes, in commit order.
    pub changes: Vec<Change>,
    /// Changes dropped because another master wrote them.
    pub suppressed: u64,
    /// The text of `changes` ([`Change::text_bytes`]).
    pub bytes: usize,
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
        format!("slot {}", slot_name(&self.master.name))
    }

    /// Streams changes until `shutdown`: reads what the walsender sends,
    /// produces this master's changes (at most `capture_max_changes` at a
    /// time, waiting for every acknowledgement), and only then tells the
    /// server the slot may move past them.
    async fn run(
        &mut self,
        topology: &Topology,
        producer: &FutureProducer,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<()> {
        let name = self.master.name.clone();
        let chunk = topology.sync.capture_max_changes;
        let chunk_bytes = topology.sync.capture_max_bytes;
        let mut decoded = Decoded::default();
        let mut stream_state = StreamState::default();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut beat, mut measure, mut prune) = (Every::default(), Every::default(), Every::default());
        let mut last_status = Instant::now();
        loop {
            tokio::select! {
                biased;
                // Shutdown first: what was read and not confirmed is sent again next time.
                _ = crate::produce::stopped(shutdown) => return Ok(()),
                message = self.stream.recv() => {
                    self.take(message, &mut decoded, &mut stream_state)?;
                    // Everything that is already here, up to a chunk.
                    while decoded.changes.len() < chunk && decoded.bytes < chunk_bytes {
                        let Some(message) = self.stream.try_recv() else { break };
                        self.take(message, &mut decoded, &mut stream_state)?;
                    }
                }
                _ = tick.tick() => {
                    if beat.due(topology.sync.heartbeat_interval) {
                        self.beat().await?;
                    }
                    if measure.due(MEASURE_EVERY) {
                        self.measure_retained_wal().await?;
                    }
                    if prune.due(PRUNE_EVERY) {
                        self.prune_audit(topology).await?;
                    }
                    // Between transactions with nothing in hand: ask where
                    // the WAL ends, so the slot follows it even when nothing
                    // is published (it would keep WAL forever otherwise).
                    if !stream_state.in_transaction && decoded.changes.is_empty() {
                        self.stream.confirm(self.confirmed, true).await.map_err(Error::replication(&name, "asking for the WAL end"))?;
                        last_status = Instant::now();
                    }
                }
            }
            if decoded.suppressed > 0 {
                counter!(m::LOOP_SUPPRESSED, m::MASTER => name.clone())
                    .increment(std::mem::take(&mut decoded.suppressed));
            }
            // A whole transaction, or a full chunk of a large one.
            let full = decoded.changes.len() >= chunk || decoded.bytes >= chunk_bytes;
            if !decoded.changes.is_empty() && (!stream_state.in_transaction || full) {
                // The failpoint waits for a round of the application's changes
                // (not only mmsync's own heartbeat).
                let crash = self.crash_after_produce && decoded.changes.iter().any(|c| c.table.schema != "mmsync");
                let mut rest: VecDeque<Change> = std::mem::take(&mut decoded.changes).into();
                decoded.bytes = 0;
                // In pieces whose values, read-back ones included, stay
                // within the byte bound: an update that left a TOASTed value
                // out of the WAL is small here and large once read back.
                while !rest.is_empty() {
                    let (mut piece, own) = self.read_back.next_piece(&mut rest, chunk_bytes);
                    let done = self.read_unchanged(&mut piece, chunk_bytes.saturating_sub(own)).await?;
                    // What did not fit once read back leads the next piece.
                    for c in piece.drain(done..).rev() {
                        rest.push_front(c);
                    }
                    let refused = crate::produce::round(topology, producer, &name, piece).await?;
                    self.keep_dead_letters(topology, refused).await?;
                }
                if crash {
                    crate::failpoint::crash(crate::failpoint::CRASH_AFTER_PRODUCE);
                }
            }
            // Everything read so far is in Kafka: the slot may move to the end
            // of the last whole transaction, or to the server's WAL end when
            // no transaction is open.
            let mut safe = self.confirmed;
            if decoded.changes.is_empty() {
                safe = safe.max(stream_state.last_commit_end.unwrap_or(0));
                if !stream_state.in_transaction {
                    safe = safe.max(stream_state.wal_end.take().unwrap_or(0));
                }
            }
            if safe > self.confirmed || stream_state.reply_requested || last_status.elapsed() >= STATUS_EVERY {
                self.stream.confirm(safe, false).await.map_err(Error::replication(&name, "confirming a position"))?;
                stream_state.reply_requested = false;
                last_status = Instant::now();
                if safe > self.confirmed {
                    self.confirmed = safe;
                    gauge!(m::SLOT_CONFIRMED_LSN, m::MASTER => name.clone()).set(safe as f64);
                }
            }
        }
    }

    fn progressed(&self) -> bool {
        self.confirmed > self.connected_at
    }
}

/// A connected source: a walsender streaming the slot, and an SQL
/// connection for heartbeats, measurements and dead letters.
pub struct Capture {
    master: Master,
    conn: PgConnection,
    stream: WalStream,
    decoder: Decoder,
    /// What the slot has been told is safe; it never moves backwards.
    confirmed: Lsn,
    /// `confirmed` when this connection started.
    connected_at: Lsn,
    /// Synced tables as this master has them, for reading back unchanged values.
    tables: HashMap<TableName, TableInfo>,
    /// What reading back unchanged values adds, for bounding a round's bytes.
    read_back: ReadBack,
    /// Failpoint [`crate::failpoint::CRASH_AFTER_PRODUCE`] (debug builds
    /// only): SIGKILL this process after Kafka acknowledged some changes and
    /// before the slot moves, the one moment where a crash must cost
    /// duplicates and never a gap.
    crash_after_produce: bool,
}

/// Where the stream is between two transactions, and what may be confirmed.
#[derive(Debug, Default)]
struct StreamState {
    /// Inside a transaction: between its Begin and its Commit.
    in_transaction: bool,
    /// The end of the last transaction whose Commit was read.
    last_commit_end: Option<Lsn>,
    /// The server's WAL end from its last keepalive, not yet confirmed.
    wal_end: Option<Lsn>,
    /// The server asked for a status update.
    reply_requested: bool,
}

impl Capture {
    pub async fn connect(topology: &Topology, master: &Master) -> Result<Capture> {
        let mut conn = crate::postgres::db::connect(master).await?;
        let slot = slot_name(&master.name);
        let confirmed: Option<String> =
            sqlx::query_scalar("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1")
                .bind(&slot)
                .fetch_optional(&mut conn)
                .await
                .map_err(Error::db(&master.name, "reading the slot"))?
                .flatten();
        let confirmed = confirmed.and_then(|s| parse_lsn(&s)).ok_or_else(|| Error::Setup {
            master: master.name.clone(),
            problem: format!("replication slot {slot} does not exist"),
            fix: "run `mmsync init`".into(),
        })?;
        let options = crate::postgres::db::options(master)?.application_name(&format!("mmsync:{}:source", master.name));
        let starting = format!("starting replication from slot {slot}");
        let stream = tokio::time::timeout(
            crate::postgres::replication::START_TIMEOUT,
            // The reader reads ahead at most one round's worth of the WAL.
            WalStream::start(&options, &slot, PUBLICATION, confirmed, topology.sync.capture_max_bytes),
        )
        .await
        .unwrap_or_else(|_| Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into()))
        .map_err(Error::replication(&master.name, starting))?;
        // Keys come from each table's primary key, whatever its replica
        // identity makes pgoutput flag (FULL flags every column, USING INDEX
        // another index's).
        let mut decoder = Decoder::new(&master.name, topology);
        let mut tables = HashMap::new();
        for table in topology.synced_tables() {
            if let Some(info) = describe(&mut conn, &master.name, &table).await? {
                decoder.keys.insert(table.clone(), info.key.clone());
                tables.insert(table, info);
            }
        }
        Ok(Capture {
            master: master.clone(),
            conn,
            stream,
            decoder,
            confirmed,
            connected_at: confirmed,
            tables,
            read_back: ReadBack::default(),
            crash_after_produce: crate::failpoint::armed(crate::failpoint::CRASH_AFTER_PRODUCE),
        })
    }

    /// Takes one message from the stream into the decoder.
    fn take(
        &mut self,
        message: std::result::Result<WalMessage, crate::postgres::replication::ReplicationError>,
        decoded: &mut Decoded,
        state: &mut StreamState,
    ) -> Result<()> {
        let name = &self.master.name;
        match message.map_err(Error::replication(name, "reading the replication stream"))? {
            WalMessage::Keepalive { wal_end, reply } => {
                state.wal_end = Some(wal_end);
                state.reply_requested |= reply;
            }
            WalMessage::Data(data) => {
                let after = state.last_commit_end.unwrap_or(self.confirmed);
                let stream_error =
                    |reason: String| Error::Stream { master: name.clone(), lsn: format_lsn(after), reason };
                let message = pgoutput::parse(&data).map_err(|e| stream_error(e.to_string()))?;
                match &message {
                    Message::Begin { .. } => state.in_transaction = true,
                    Message::Commit { end_lsn, .. } => {
                        state.in_transaction = false;
                        state.last_commit_end = Some(*end_lsn);
                    }
                    _ => {}
                }
                self.decoder.message(message, decoded).map_err(stream_error)?;
            }
        }
        Ok(())
    }

    /// Rewrites this master's heartbeat row: a change that flows to every
    /// other master even when applications are idle.
    async fn beat(&mut self) -> Result<()> {
        sqlx::query(
            "INSERT INTO mmsync.heartbeats (master, beat_at) VALUES ($1, now())
             ON CONFLICT (master) DO UPDATE SET beat_at = EXCLUDED.beat_at",
        )
        .bind(&self.master.name)
        .execute(&mut self.conn)
        .await
        .map_err(Error::db(&self.master.name, "writing the heartbeat (has `mmsync init` run?)"))?;
        Ok(())
    }

    /// Deletes this master's conflicts and retried dead letters older than
    /// their retention, in bounded steps so that no statement holds locks
    /// for long, and sets the gauge of pending dead letters.
    async fn prune_audit(&mut self, topology: &Topology) -> Result<()> {
        let name = self.master.name.clone();
        let steps = [
            (
                "conflicts",
                "DELETE FROM mmsync.conflicts WHERE id IN (SELECT id FROM mmsync.conflicts
                 WHERE logged_at < now() - make_interval(secs => $1) LIMIT 10000)",
                topology.sync.conflicts_keep,
            ),
            (
                "dead_letters",
                "DELETE FROM mmsync.dead_letters WHERE id IN (SELECT id FROM mmsync.dead_letters
                 WHERE retried_at < now() - make_interval(secs => $1) LIMIT 10000)",
                topology.sync.dead_letters_keep,
            ),
        ];
        for (kind, sql, keep) in steps {
            let pruned = sqlx::query(sql)
                .bind(keep.as_secs_f64())
                .execute(&mut self.conn)
                .await
                .map_err(Error::db(&name, format!("pruning mmsync.{kind}")))?
                .rows_affected();
            counter!(m::AUDIT_PRUNED, m::MASTER => name.clone(), m::KIND => kind).increment(pruned);
        }
        let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM mmsync.dead_letters WHERE retried_at IS NULL")
            .fetch_one(&mut self.conn)
            .await
            .map_err(Error::db(&name, "counting dead letters"))?;
        gauge!(m::DEAD_LETTERS_PENDING, m::MASTER => name).set(pending as f64);
        Ok(())
    }

    /// Sets the gauge of the WAL the master keeps for this slot.
    async fn measure_retained_wal(&mut self) -> Result<()> {
        let retained: Option<i64> = sqlx::query_scalar(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8 FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(slot_name(&self.master.name))
        .fetch_optional(&mut self.conn)
        .await
        .map_err(Error::db(&self.master.name, "measuring retained WAL"))?
        .flatten();
        gauge!(m::SLOT_RETAINED_WAL, m::MASTER => self.master.name.clone()).set(retained.unwrap_or(0) as f64);
        Ok(())
    }

    /// Makes updates whole before they leave: pgoutput leaves out a TOASTed
    /// value an update did not change, and a target may lack the row (a
    /// delete that lost to this update got there first), or hold another
    /// value of that column (written by a third master, older than this
    /// update). Either way only the value this master had can make every
    /// master end alike, so it is read back here, by key, from the table
    /// itself: one statement per table and piece of a round, and only for
    /// updates that left such a value out (others cost nothing).
    ///
    /// The value read may be newer than the change (the row was written
    /// again since); then that newer change follows in this master's log or
    /// another's, reaches every master, and wins there. If the row is gone,
    /// a newer delete removed it, which also reaches every master: the
    /// change is marked `superseded`, and a target lacking the row skips it.
    ///
    /// At most `max_bytes` are read back (at least one value), counted by
    /// the server before it reads a value ([`unchanged_sql`]). Returns how
    /// many of `changes`, from the first, are complete; the rest wait for
    /// the next piece.
    async fn read_unchanged(&mut self, changes: &mut [Change], max_bytes: usize) -> Result<usize> {
        // Tables in the order of their first such update.
        let mut by_table: Vec<(TableName, Vec<usize>)> = Vec::new();
        for (i, c) in changes.iter().enumerate() {
            if needs_read_back(c) {
                match by_table.iter_mut().find(|(t, _)| *t == c.table) {
                    Some((_, at)) => at.push(i),
                    None => by_table.push((c.table.clone(), vec![i])),
                }
            }
        }
        let mut complete = changes.len();
        // Bytes read back so far, and whether anything was (the first value
        // is read whatever its size).
        let (mut bytes, mut taken) = (0usize, false);
        for (table, at) in by_table {
            if at[0] >= complete {
                break;
            }
            let mut columns: Vec<String> = at.iter().flat_map(|&i| changes[i].unchanged.clone()).collect();
            columns.sort_unstable();
            columns.dedup();
            let Some(info) = self.table_info(&table, &columns).await? else {
                // The table is gone, or lacks those columns now: the records
                // go as they are, and a target without the row keeps them as
                // dead letters.
                tracing::warn!(master = %self.master.name, "cannot read back unchanged values of {table}: it no longer has columns {columns:?}");
                continue;
            };
            let keys: Vec<serde_json::Value> =
                at.iter().map(|&i| serde_json::to_value(&changes[i].key).expect("strings")).collect();
            let sql = unchanged_sql(info, &columns);
            let budget = max_bytes.saturating_sub(bytes).min(i64::MAX as usize) as i64;
            let rows = sqlx::query(&sql)
                .bind(serde_json::Value::Array(keys))
                .bind(budget)
                .bind(!taken)
                .fetch_all(&mut self.conn)
                .await
                .map_err(Error::db(&self.master.name, format!("reading back unchanged values of {table}")))?;
            // `at[..next]` are settled: read, or gone (no row came for them).
            let (mut next, mut read, mut gone, mut table_bytes) = (0usize, 0u64, 0u64, 0usize);
            let mut full = false;
            for r in rows {
                let n = r.get::<i64, _>(0) as usize - 1;
                for &i in &at[next..n] {
                    changes[i].superseded = true;
                    gone += 1;
                }
                next = n;
                if r.get::<bool, _>(1) {
                    // Past the bound: this one and the rest wait.
                    full = true;
                    break;
                }
                let change = &mut changes[at[n]];
                let row = change.row.as_mut().expect("updates have rows");
                for (c, column) in columns.iter().enumerate() {
                    if change.unchanged.contains(column) {
                        let value: Option<String> = r.get(c + 2);
                        table_bytes += value.as_ref().map_or(0, String::len);
                        row.insert(column.clone(), value);
                    }
                }
                change.unchanged.clear();
                taken = true;
                read += 1;
                next = n + 1;
            }
            if full {
                complete = complete.min(at[next]);
            } else {
                for &i in &at[next..] {
                    changes[i].superseded = true;
                    gone += 1;
                }
            }
            bytes += table_bytes;
            self.read_back.learn(&table, table_bytes, read as usize);
            let table = table.to_string();
            let name = self.master.name.clone();
            counter!(m::UNCHANGED_READ, m::MASTER => name.clone(), m::TABLE => table.clone(), m::KIND => "found")
                .increment(read);
            counter!(m::UNCHANGED_READ, m::MASTER => name, m::TABLE => table, m::KIND => "gone").increment(gone);
        }
        Ok(complete)
    }

    /// The table's description, read again when it lacks `columns` (a
    /// column added since it was read).
    async fn table_info(&mut self, table: &TableName, columns: &[String]) -> Result<Option<&TableInfo>> {
        let fits = |info: &TableInfo| columns.iter().all(|c| info.column(c).is_some());
        if !self.tables.get(table).is_some_and(fits) {
            match describe(&mut self.conn, &self.master.name, table).await? {
                Some(info) => self.tables.insert(table.clone(), info),
                None => self.tables.remove(table),
            };
        }
        Ok(self.tables.get(table).filter(|info| fits(info)))
    }

    /// Keeps, on this master, the changes Kafka refused for their size: the
    /// other masters never see them.
    async fn keep_dead_letters(&mut self, topology: &Topology, refused: Vec<(Change, String)>) -> Result<()> {
        for (c, reason) in refused {
            let topic = crate::kafka::topic_name(&topology.kafka.topic_prefix, &c.origin, &c.table);
            let letter = DeadLetter {
                at: RecordId { topic, partition: -1, offset: -1 },
                key: Some(c.kafka_key().into_bytes()),
                value: Some(c.kafka_value()),
                reason,
            };
            letter.keep(&mut self.conn, &self.master.name).await?;
        }
        Ok(())
    }
}

/// An update whose WAL left out unchanged TOASTed values: the source reads
/// them back from the table before sending it.
fn needs_read_back(c: &Change) -> bool {
    c.op == Op::Update && !c.unchanged.is_empty()
}

/// How many bytes reading back an update's unchanged values adds, per table,
/// learned from what was read so far: a round goes out in pieces that stay
/// within `capture_max_bytes` once read back. The estimate only sizes the
/// pieces; the read itself stops at the bound ([`unchanged_sql`]).
#[derive(Debug, Default)]
struct ReadBack {
    /// The bytes read back per update, on average in the last read, by table.
    per_update: HashMap<TableName, usize>,
}

impl ReadBack {
    /// A piece holds at most this many updates that need a read-back from
    /// tables nothing was read back from yet (most may find their row
    /// deleted since, and read nothing).
    const FIRST_READS: usize = 256;

    fn learn(&mut self, table: &TableName, bytes: usize, updates: usize) {
        if updates > 0 {
            self.per_update.insert(table.clone(), bytes.div_ceil(updates));
        }
    }

    /// The next changes of a round, up to `max_bytes` of values with what
    /// reading back is expected to add; at least one change.
    fn next_piece(&self, rest: &mut VecDeque<Change>, max_bytes: usize) -> (Vec<Change>, usize) {
        let mut piece = Vec::new();
        // The piece's own bytes, and with what reading back should add.
        let (mut own, mut expected) = (0usize, 0usize);
        let mut unlearned = 0;
        while let Some(c) = rest.front() {
            let size = c.text_bytes();
            let mut more = size;
            if needs_read_back(c) {
                match self.per_update.get(&c.table) {
                    Some(per) => more += per,
                    None if unlearned >= Self::FIRST_READS => break,
                    None => unlearned += 1,
                }
            }
            if !piece.is_empty() && expected + more > max_bytes {
                break;
            }
            own += size;
            expected += more;
            piece.extend(rest.pop_front());
        }
        (piece, own)
    }
}

/// The statement that reads `columns` of the rows under a JSON array of keys `$1`: (1-based
/// position in the array, cut, each column's text) for the keys that have a row, in that order.
/// Values come from each type's output function (`concat`), as pgoutput sends them (a cast to text
/// would differ for booleans, inet, char(n)...). A row whose values would take the running total
/// past `$2` bytes, and every row after it, comes back marked `cut`, without its values (the first
/// row is never cut when `$3`). The sizes come from what the table stores, without reading the
/// values out of TOAST: a text or bytea column's full length, another type's stored size (an
/// estimate of its text).
fn unchanged_sql(info: &TableInfo, columns: &[String]) -> String {
    let probe: Vec<String> = info
        .key
        .iter()
        .map(|k| {
            let ty = &info.column(k).expect("key columns are columns").sql_type;
            format!("t.{} = (e.k->>{})::{ty}", quote_ident(k), quote_literal(k))
        })
        .collect();
    let picked: Vec<String> =
        columns.iter().enumerate().map(|(i, c)| format!("t.{} AS c{i}", quote_ident(c))).collect();
    let sizes: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let ty = &info.column(c).expect("a column of the table").sql_type;
            let size = if ty == "bytea" {
                format!("2 * octet_length(t.c{i}) + 2")
            } else if ty == "text" || ty.starts_with("character") {
                format!("octet_length(t.c{i})")
            } else {
                format!("pg_column_size(t.c{i})")
            };
            format!("coalesce({size}, 0)")
        })
        .collect();
    let values: Vec<String> = (0..columns.len())
        .map(|i| format!("CASE WHEN x.cut OR x.c{i} IS NULL THEN NULL ELSE concat(x.c{i}) END"))
        .collect();
    format!(
        "SELECT x.n, x.cut, {values}
         FROM (SELECT e.n, t.*,
                      sum({sizes}) OVER (ORDER BY e.n) > $2
                      AND NOT ($3 AND row_number() OVER (ORDER BY e.n) = 1) AS cut
               FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS e(k, n)
               CROSS JOIN LATERAL (SELECT {picked} FROM {table} AS t WHERE {probe} LIMIT 1) AS t) AS x
         ORDER BY x.n",
        values = values.join(", "),
        sizes = sizes.join(" + "),
        picked = picked.join(", "),
        table = info.name.quoted(),
        probe = probe.join(" AND "),
    )
}

/// What a relation is to mmsync.
#[derive(Debug)]
enum Kind {
    Synced(TableName),
    Tombstones,
    Other,
}

/// Turns pgoutput messages into changes. Keeps the relation cache and the
/// position of the transaction being read.
pub struct Decoder {
    master: String,
    tables: Vec<TableName>,
    /// Each relation with what it is to mmsync and where its origin column
    /// is (found once per Relation message, not per row).
    relations: HashMap<u32, (Relation, Kind, Option<usize>)>,
    /// Each synced table's primary key columns, as read when the source
    /// connected; a table missing here is keyed by pgoutput's key flags.
    keys: HashMap<TableName, Vec<String>>,
    txid: u32,
    commit_ms: i64,
    lsn: Lsn,
}

impl Decoder {
    pub fn new(master: &str, topology: &Topology) -> Decoder {
        Decoder {
            master: master.to_string(),
            tables: topology.synced_tables(),
            relations: HashMap::new(),
            keys: HashMap::new(),
            txid: 0,
            commit_ms: 0,
            lsn: 0,
        }
    }

    /// Handles one message, adding this master's changes to the round.
    pub fn message(&mut self, message: Message, round: &mut Decoded) -> std::result::Result<(), String> {
        match message {
            Message::Begin { final_lsn, commit_time_us, xid } => {
                self.txid = xid;
                self.commit_ms = pgoutput::pg_time_to_unix_ms(commit_time_us);
                self.lsn = final_lsn;
            }
            Message::Relation(rel) => {
                let table = TableName { schema: rel.schema.clone(), name: rel.name.clone() };
                let kind = if table.schema == "mmsync" && table.name == "tombstones" {
                    Kind::Tombstones
                } else if self.tables.contains(&table) {
                    Kind::Synced(table)
                } else {
                    Kind::Other
                };
                let origin_column = match kind {
                    Kind::Synced(_) => Some(ORIGIN_COLUMN),
                    Kind::Tombstones => Some("origin"),
                    Kind::Other => None,
                };
                let origin_at = origin_column.and_then(|o| rel.columns.iter().position(|c| c.name == o));
                self.relations.insert(rel.oid, (rel, kind, origin_at));
            }
            Message::Insert { relation, new } => self.row(relation, Op::Insert, new, round)?,
            Message::Update { relation, new, .. } => self.row(relation, Op::Update, new, round)?,
            // A delete reaches the other masters as the tombstone its trigger wrote.
            Message::Delete { .. } => {}
            Message::Truncate { relations, .. } => {
                for oid in relations {
                    if let Some((rel, Kind::Synced(table), _)) = self.relations.get(&oid) {
                        tracing::warn!(master = %self.master, "TRUNCATE of {table} is not replicated; truncate it on every master or delete rows instead");
                        counter!(m::TRUNCATES_IGNORED, m::MASTER => self.master.clone(), m::TABLE => format!("{}.{}", rel.schema, rel.name)).increment(1);
                    }
                }
            }
            Message::Commit { .. } | Message::Origin { .. } | Message::Type { .. } | Message::LogicalMessage { .. } => {
            }
        }
        Ok(())
    }

    fn row(
        &mut self,
        relation: u32,
        op: Op,
        tuple: Vec<Value>,
        round: &mut Decoded,
    ) -> std::result::Result<(), String> {
        let (rel, kind, origin_at) = self
            .relations
            .get(&relation)
            .ok_or_else(|| format!("a change of relation {relation} arrived before its Relation message"))?;
        if tuple.len() != rel.columns.len() {
            return Err(format!(
                "{}.{}: {} values for {} columns",
                rel.schema,
                rel.name,
                tuple.len(),
                rel.columns.len()
            ));
        }
        // Another master's change (applied here by mmsync's sink) is
        // dropped before its row is built: in a mesh, about as many rows
        // arrive here to be dropped as to be sent.
        if matches!(kind, Kind::Other) {
            return Ok(());
        }
        if let Some(Value::Text(origin)) = origin_at.map(|i| &tuple[i]) {
            if *origin != self.master {
                round.suppressed += 1;
                return Ok(());
            }
        }
        let mut row = Row::new();
        let mut unchanged = Vec::new();
        for (column, value) in rel.columns.iter().zip(tuple) {
            match value {
                Value::Null => {
                    row.insert(column.name.clone(), None);
                }
                Value::Text(t) => {
                    row.insert(column.name.clone(), Some(t));
                }
                Value::Unchanged => unchanged.push(column.name.clone()),
                Value::Binary(_) => {
                    return Err(format!("binary value in column {:?}; mmsync asks for text", column.name))
                }
            }
        }
        let text = |row: &Row, col: &str| row.get(col).cloned().flatten();
        let (table, op, key, row, origin, version) = match kind {
            Kind::Other => return Ok(()),
            Kind::Synced(table) => {
                let origin = text(&row, ORIGIN_COLUMN)
                    .ok_or_else(|| format!("{table} has no {ORIGIN_COLUMN}; run `mmsync init`"))?;
                let version = text(&row, VERSION_COLUMN)
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| format!("{table} has no {VERSION_COLUMN}; run `mmsync init`"))?;
                let flagged: Vec<String>;
                let key_columns = match self.keys.get(table) {
                    Some(primary) => primary,
                    None => {
                        flagged = rel.columns.iter().filter(|c| c.is_key).map(|c| c.name.clone()).collect();
                        &flagged
                    }
                };
                let mut key = Key::new();
                for name in key_columns {
                    let v = text(&row, name).ok_or_else(|| {
                        format!("{table}: key column {name:?} is null, unchanged or gone; does the table still have its primary key? (restart mmsync after changing it)")
                    })?;
                    key.insert(name.clone(), v);
                }
                if key.is_empty() {
                    return Err(format!(
                        "{table} has no key columns in its Relation message; does it still have a primary key?"
                    ));
                }
                row.remove(ORIGIN_COLUMN);
                row.remove(VERSION_COLUMN);
                (table.clone(), op, key, Some(row), origin, version)
            }
            Kind::Tombstones => {
                let field = |c: &str| text(&row, c).ok_or_else(|| format!("mmsync.tombstones row without {c}"));
                let table = TableName { schema: field("schema_name")?, name: field("table_name")? };
                let key: Key = serde_json::from_str(&field("key")?).map_err(|e| format!("tombstone key: {e}"))?;
                let version = field("version")?.parse().map_err(|e| format!("tombstone version: {e}"))?;
                if !self.tables.contains(&table) {
                    return Ok(());
                }
                (table, Op::Delete, key, None, field("origin")?, version)
            }
        };
        if origin != self.master {
            // Written by mmsync's applier (or before init, origin ''): not ours to send.
            round.suppressed += 1;
            return Ok(());
        }
        let change = Change {
            table,
            op,
            key,
            row,
            unchanged,
            superseded: false,
            origin,
            version,
            position: Position {
                master: self.master.clone(),
                at: LogPosition::Postgres { lsn: self.lsn, txid: self.txid },
                commit_ms: self.commit_ms,
            },
        };
        round.bytes += change.text_bytes();
        round.changes.push(change);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{Key, Position, Row};

    /// A change of table `t` with `bytes` of value; an update that left a
    /// TOASTed column out of the WAL when `read_back`.
    fn change(t: &str, bytes: usize, read_back: bool) -> Change {
        Change {
            table: TableName { schema: "public".into(), name: t.into() },
            op: if read_back { Op::Update } else { Op::Insert },
            key: Key::new(),
            row: Some(Row::from([("v".to_string(), Some("x".repeat(bytes)))])),
            unchanged: if read_back { vec!["big".into()] } else { vec![] },
            superseded: false,
            origin: "a".into(),
            version: 1,
            position: Position::copied_from("a"),
        }
    }

    fn pieces(read_back: &ReadBack, changes: Vec<Change>, max_bytes: usize) -> Vec<usize> {
        let mut rest: VecDeque<Change> = changes.into();
        let mut sizes = Vec::new();
        while !rest.is_empty() {
            let (piece, own) = read_back.next_piece(&mut rest, max_bytes);
            assert_eq!(own, piece.iter().map(Change::text_bytes).sum::<usize>());
            sizes.push(piece.len());
        }
        sizes
    }

    #[test]
    fn a_round_goes_out_in_pieces_within_the_byte_bound_counting_what_is_read_back() {
        let mut read_back = ReadBack::default();
        read_back.learn(&TableName { schema: "public".into(), name: "t".into() }, 1000 * 100_000, 1000);
        // 1,000 updates of 11 bytes that read back 100,000 more, 1 MB at a time: 9 per piece.
        let updates = (0..1000).map(|_| change("t", 10, true)).collect();
        assert_eq!(pieces(&read_back, updates, 1_000_000), vec![9; 111].into_iter().chain([1]).collect::<Vec<_>>());
        // Inserts count their own bytes only (1,001 each: a column name and 1,000 bytes).
        let inserts = (0..1000).map(|_| change("t", 1000, false)).collect();
        assert_eq!(pieces(&read_back, inserts, 100 * 1001), vec![100; 10]);
    }

    #[test]
    fn updates_of_a_table_not_read_back_yet_go_a_few_hundred_at_a_time() {
        let read_back = ReadBack::default();
        let updates = (0..600).map(|_| change("t", 10, true)).collect();
        assert_eq!(pieces(&read_back, updates, 1 << 30), vec![256, 256, 88]);
    }

    #[test]
    fn a_change_larger_than_the_bound_still_goes_alone() {
        let read_back = ReadBack::default();
        let changes = vec![change("t", 500, false), change("t", 5000, false), change("t", 500, false)];
        assert_eq!(pieces(&read_back, changes, 1000), vec![1, 1, 1]);
    }
}
