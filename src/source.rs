//! The source of one master: streams its slot (pgoutput, over the
//! replication protocol), turns the messages into [`Change`]s, drops what came
//! from other masters (loop suppression), produces the rest to Kafka, and lets
//! the slot move only past what Kafka acknowledged.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use metrics::{counter, gauge};
use rdkafka::producer::FutureProducer;
use sqlx::PgConnection;
use tokio::sync::watch;

use crate::change::{Change, Key, Op, Position, Row};
use crate::error::{Class, Error, Result};
use crate::metrics as m;
use crate::pgoutput::{self, format_lsn, parse_lsn, Lsn, Message, Relation, Value};
use crate::replication::{WalMessage, WalStream};
use crate::schema::{slot_name, PUBLICATION};
use crate::sink::{DeadLetter, RecordId};
use crate::topology::{Master, TableName, Topology, ORIGIN_COLUMN, VERSION_COLUMN};

/// How often the retained WAL is measured.
const MEASURE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

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
}

/// Runs the source of `master` until `shutdown` turns true, reconnecting with
/// capped backoff after transient errors. Returns only on shutdown or a fatal error.
pub async fn run(topology: Arc<Topology>, master: Master, mut shutdown: watch::Receiver<bool>) -> Result<()> {
    let mut backoff = crate::error::Backoff::new();
    let mut was_up = None;
    loop {
        // A fresh producer per attempt: an idempotent producer that hit a fatal
        // error (a broker that lost its state, say) cannot be used again.
        let producer = crate::kafka::producer(&topology.kafka, &format!("mmsync-source-{}", master.name));
        let result = match (producer, Capture::connect(&topology, &master).await) {
            (Err(e), _) | (_, Err(e)) => Err(e),
            (Ok(producer), Ok(mut capture)) => {
                gauge!(m::MASTER_UP, m::MASTER => master.name.clone()).set(1.0);
                if was_up != Some(true) {
                    tracing::info!(master = %master.name, "source connected, capturing from slot {}", slot_name(&master.name));
                    was_up = Some(true);
                }
                backoff.reset();
                capture.run(&topology, &producer, &mut shutdown).await
            }
        };
        match result {
            Ok(()) => return Ok(()),
            Err(e) if e.class() == Class::Fatal => {
                counter!(m::ERRORS, m::STAGE => "capture", m::KIND => "fatal").increment(1);
                return Err(e);
            }
            Err(e) => {
                counter!(m::ERRORS, m::STAGE => "capture", m::KIND => "retry").increment(1);
                gauge!(m::MASTER_UP, m::MASTER => master.name.clone()).set(0.0);
                if was_up != Some(false) {
                    tracing::warn!(master = %master.name, "source paused, retrying with backoff: {e}");
                    was_up = Some(false);
                }
            }
        }
        let delay = backoff.next_delay();
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Resolves once `shutdown` turns true.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
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
        let mut conn = crate::db::connect(master).await?;
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
        let options = crate::db::options(master)?.application_name(&format!("mmsync:{}:source", master.name));
        let starting = format!("starting replication from slot {slot}");
        let stream = tokio::time::timeout(
            crate::replication::START_TIMEOUT,
            WalStream::start(&options, &slot, PUBLICATION, confirmed),
        )
        .await
        .unwrap_or_else(|_| Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into()))
        .map_err(Error::replication(&master.name, starting))?;
        Ok(Capture {
            master: master.clone(),
            conn,
            stream,
            decoder: Decoder::new(&master.name, topology),
            confirmed,
            crash_after_produce: crate::failpoint::armed(crate::failpoint::CRASH_AFTER_PRODUCE),
        })
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
        let mut decoded = Decoded::default();
        let mut stream_state = StreamState::default();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut last_beat, mut last_measure, mut last_status): (Option<Instant>, Option<Instant>, Instant) =
            (None, None, Instant::now());
        loop {
            tokio::select! {
                biased;
                // Shutdown first: what was read and not confirmed is sent again next time.
                _ = stopped(shutdown) => return Ok(()),
                message = self.stream.recv() => {
                    self.take(message, &mut decoded, &mut stream_state)?;
                    // Everything that is already here, up to a chunk.
                    while decoded.changes.len() < chunk {
                        let Some(message) = self.stream.try_recv() else { break };
                        self.take(message, &mut decoded, &mut stream_state)?;
                    }
                }
                _ = tick.tick() => {
                    if last_beat.is_none_or(|t| t.elapsed() >= topology.sync.heartbeat_interval) {
                        self.beat().await?;
                        last_beat = Some(Instant::now());
                    }
                    if last_measure.is_none_or(|t| t.elapsed() >= MEASURE_EVERY) {
                        self.measure_retained_wal().await?;
                        last_measure = Some(Instant::now());
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
            if !decoded.changes.is_empty() && (!stream_state.in_transaction || decoded.changes.len() >= chunk) {
                // The failpoint waits for a round of the application's changes
                // (not only mmsync's own heartbeat).
                let crash = self.crash_after_produce && decoded.changes.iter().any(|c| c.table.schema != "mmsync");
                let refused = produce(topology, producer, &name, std::mem::take(&mut decoded.changes)).await?;
                self.keep_dead_letters(topology, refused).await?;
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

    /// Takes one message from the stream into the decoder.
    fn take(
        &mut self,
        message: std::result::Result<WalMessage, crate::replication::ReplicationError>,
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

/// Produces changes and waits until Kafka acknowledged every one;
/// returns the changes Kafka refused for their size, with the reason.
async fn produce(
    topology: &Topology,
    producer: &FutureProducer,
    master: &str,
    changes: Vec<Change>,
) -> Result<Vec<(Change, String)>> {
    if changes.is_empty() {
        return Ok(Vec::new());
    }
    let refused = crate::kafka::produce_all(producer, &topology.kafka.topic_prefix, &changes).await?;
    // Counted per (table, op) once a chunk, not once a row.
    let mut captured: HashMap<(&TableName, Op), u64> = HashMap::new();
    for c in &changes {
        *captured.entry((&c.table, c.op)).or_default() += 1;
    }
    for ((table, op), n) in captured {
        counter!(m::CHANGES_CAPTURED, m::MASTER => master.to_string(), m::TABLE => table.to_string(), m::OP => op.name())
            .increment(n);
    }
    counter!(m::RECORDS_PRODUCED, m::MASTER => master.to_string()).increment((changes.len() - refused.len()) as u64);
    let mut changes: Vec<Option<Change>> = changes.into_iter().map(Some).collect();
    Ok(refused.into_iter().filter_map(|(i, reason)| Some((changes[i].take()?, reason))).collect())
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
    relations: HashMap<u32, (Relation, Kind)>,
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
                self.relations.insert(rel.oid, (rel, kind));
            }
            Message::Insert { relation, new } => self.row(relation, Op::Insert, new, round)?,
            Message::Update { relation, new, .. } => self.row(relation, Op::Update, new, round)?,
            // A delete reaches the other masters as the tombstone its trigger wrote.
            Message::Delete { .. } => {}
            Message::Truncate { relations, .. } => {
                for oid in relations {
                    if let Some((rel, Kind::Synced(table))) = self.relations.get(&oid) {
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
        let (rel, kind) = self
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
                let mut key = Key::new();
                for c in rel.columns.iter().filter(|c| c.is_key) {
                    let v = text(&row, &c.name)
                        .ok_or_else(|| format!("{table}: key column {:?} is null or unchanged", c.name))?;
                    key.insert(c.name.clone(), v);
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
        round.changes.push(Change {
            table,
            op,
            key,
            row,
            unchanged,
            origin,
            version,
            position: Position {
                master: self.master.clone(),
                lsn: self.lsn,
                txid: self.txid,
                commit_ms: self.commit_ms,
            },
        });
        Ok(())
    }
}
