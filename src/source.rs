//! The source of one master: reads its slot through SQL, turns pgoutput
//! messages into [`Change`]s, drops what came from other masters (loop
//! suppression), produces the rest to Kafka, and advances the slot only after
//! Kafka acknowledged every record of the round.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use futures_util::TryStreamExt as _;
use metrics::{counter, gauge};
use rdkafka::producer::FutureProducer;
use sqlx::{PgConnection, Row as _};
use tokio::sync::watch;

use crate::change::{Change, Key, Op, Position, Row};
use crate::error::{Class, Error, Result};
use crate::metrics as m;
use crate::pgoutput::{self, format_lsn, parse_lsn, Lsn, Message, Relation, Value};
use crate::schema::{slot_name, PUBLICATION};
use crate::topology::{Master, TableName, Topology, ORIGIN_COLUMN, VERSION_COLUMN};

/// How often the retained WAL is measured.
const MEASURE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

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

/// A connected source.
pub struct Capture {
    master: Master,
    conn: PgConnection,
    slot: String,
    decoder: Decoder,
    /// Where the slot stands; it never moves backwards.
    confirmed: Lsn,
    /// Test hook (`MMSYNC_TEST_CRASH_AFTER_PRODUCE`): SIGKILL this process
    /// after Kafka acknowledged a round and before the slot moves, the one
    /// moment where a crash must cost duplicates and never a gap.
    crash_after_produce: bool,
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
        Ok(Capture {
            master: master.clone(),
            conn,
            slot,
            decoder: Decoder::new(&master.name, topology),
            confirmed,
            crash_after_produce: std::env::var_os("MMSYNC_TEST_CRASH_AFTER_PRODUCE").is_some(),
        })
    }

    async fn run(
        &mut self,
        topology: &Topology,
        producer: &FutureProducer,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<()> {
        let (mut last_beat, mut last_measure): (Option<Instant>, Option<Instant>) = (None, None);
        loop {
            // Shutdown first: a round is never cut in half, it is just not started.
            if *shutdown.borrow() {
                return Ok(());
            }
            if last_beat.is_none_or(|t| t.elapsed() >= topology.sync.heartbeat_interval) {
                self.beat().await?;
                last_beat = Some(Instant::now());
            }
            if last_measure.is_none_or(|t| t.elapsed() >= MEASURE_EVERY) {
                self.measure_retained_wal().await?;
                last_measure = Some(Instant::now());
            }
            let messages = self.round(topology, producer).await?;
            if messages == 0 {
                tokio::select! {
                    _ = shutdown.wait_for(|s| *s) => return Ok(()),
                    _ = tokio::time::sleep(topology.sync.capture_idle) => {}
                }
            }
        }
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
        .bind(&self.slot)
        .fetch_optional(&mut self.conn)
        .await
        .map_err(Error::db(&self.master.name, "measuring retained WAL"))?
        .flatten();
        gauge!(m::SLOT_RETAINED_WAL, m::MASTER => self.master.name.clone()).set(retained.unwrap_or(0) as f64);
        Ok(())
    }

    /// One round: read the slot, produce this master's changes, wait for every
    /// acknowledgement, then advance the slot. Returns the messages read (0
    /// when the slot had nothing new).
    ///
    /// Every read of a slot through SQL decodes the WAL again from the slot's
    /// restart point, which PostgreSQL moves only every few seconds: that
    /// cost is per round, whatever the round carries, so rounds are large
    /// (`capture_max_changes`). Rows are decoded as they arrive and produced
    /// in chunks, so a large round is never held in memory at once.
    pub async fn round(&mut self, topology: &Topology, producer: &FutureProducer) -> Result<usize> {
        let name = self.master.name.clone();
        let max = topology.sync.capture_max_changes;
        // Everything committed up to the flushed end of WAL now; if the peek
        // returns fewer rows than asked, it read all of it and the slot may
        // move there even when every change was filtered out.
        let upto: String = sqlx::query_scalar("SELECT pg_current_wal_flush_lsn()::text")
            .fetch_one(&mut self.conn)
            .await
            .map_err(Error::db(&name, "reading the WAL position"))?;
        let mut rows = sqlx::query(
            "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes($1, $2::text::pg_lsn, $3, \
             'proto_version', '1', 'publication_names', $4)",
        )
        .bind(&self.slot)
        .bind(&upto)
        .bind(max as i32)
        .bind(PUBLICATION)
        .fetch(&mut self.conn);
        let (mut messages, mut last_commit_end) = (0, None);
        let mut decoded = Decoded::default();
        let mut refused = Vec::new();
        let mut produced = 0;
        while let Some(row) = rows.try_next().await.map_err(Error::db(&name, format!("reading slot {}", self.slot)))? {
            messages += 1;
            let lsn: String = row.get(0);
            let data: &[u8] = row.get(1);
            let stream_error = |reason: String| Error::Stream { master: name.clone(), lsn: lsn.clone(), reason };
            let message = pgoutput::parse(data).map_err(|e| stream_error(e.to_string()))?;
            if let Message::Commit { end_lsn, .. } = message {
                last_commit_end = Some(end_lsn);
            }
            self.decoder.message(message, &mut decoded).map_err(stream_error)?;
            if decoded.changes.len() >= PRODUCE_CHUNK {
                produced += decoded.changes.len();
                refused.extend(produce(topology, producer, &name, std::mem::take(&mut decoded.changes)).await?);
            }
        }
        drop(rows);
        produced += decoded.changes.len();
        refused.extend(produce(topology, producer, &name, decoded.changes).await?);
        tracing::debug!(master = %name, messages, produced, suppressed = decoded.suppressed, "read a round");
        counter!(m::LOOP_SUPPRESSED, m::MASTER => name.clone()).increment(decoded.suppressed);
        self.keep_dead_letters(topology, refused).await?;
        if produced > 0 && self.crash_after_produce {
            tracing::warn!("MMSYNC_TEST_CRASH_AFTER_PRODUCE: killing mmsync before the slot advances");
            // SAFETY: kill(2) on our own pid with a valid signal.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
        let advance_to = if messages < max { parse_lsn(&upto) } else { last_commit_end };
        if let Some(lsn) = advance_to {
            self.advance(lsn).await?;
        }
        Ok(messages)
    }

    /// Keeps, on this master, the changes Kafka refused for their size: the
    /// other masters never see them.
    async fn keep_dead_letters(&mut self, topology: &Topology, refused: Vec<(Change, String)>) -> Result<()> {
        for (c, reason) in refused {
            let topic = crate::kafka::topic_name(&topology.kafka.topic_prefix, &c.origin, &c.table);
            tracing::warn!(master = %self.master.name, "dead letter: {} key {}: {reason}", c.table, c.kafka_key());
            sqlx::query(
                "INSERT INTO mmsync.dead_letters (topic, partition, kafka_offset, reason, record_key, record_value)
                 VALUES ($1, -1, -1, $2, $3, $4)",
            )
            .bind(&topic)
            .bind(&reason)
            .bind(c.kafka_key().into_bytes())
            .bind(c.kafka_value())
            .execute(&mut self.conn)
            .await
            .map_err(Error::db(&self.master.name, "writing a dead letter"))?;
            counter!(m::DEAD_LETTERS, m::TARGET => self.master.name.clone()).increment(1);
        }
        Ok(())
    }

    /// Moves the slot to `lsn` (never backwards), releasing the WAL before it.
    async fn advance(&mut self, lsn: Lsn) -> Result<()> {
        if lsn <= self.confirmed {
            return Ok(());
        }
        sqlx::query("SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)")
            .bind(&self.slot)
            .bind(format_lsn(lsn))
            .execute(&mut self.conn)
            .await
            .map_err(Error::db(&self.master.name, format!("advancing slot {}", self.slot)))?;
        self.confirmed = lsn;
        gauge!(m::SLOT_CONFIRMED_LSN, m::MASTER => self.master.name.clone()).set(lsn as f64);
        Ok(())
    }
}

/// Changes a round produces at a time: what the source holds in memory.
const PRODUCE_CHUNK: usize = 10_000;

/// Produces a chunk of changes and waits until Kafka acknowledged every one;
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
