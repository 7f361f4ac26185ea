//! The sink of one master: consumes every other master's topics and applies
//! the changes by last-writer-wins, one transaction per batch, with the
//! consumed offsets stored in the same transaction. This is Kafka's side
//! (the consumer, batches, offsets and their gaps, dead letters and their
//! bound, metrics); the statements that apply a batch to a PostgreSQL table
//! are [`crate::postgres::apply`]'s.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use metrics::{counter, gauge, histogram};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message as _};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgConnection;
use tokio::sync::watch;

use crate::change::{Change, Op, HEADER_ORIGIN};
use crate::error::{Class, Error, Result};
use crate::metrics as m;
use crate::postgres::apply::{TableSql, APPLIER_SESSION};
use crate::postgres::schema::describe;
use crate::topology::{quote_literal, Master, TableName, Topology};

/// Runs the sink of one table on `target` until `shutdown` turns true,
/// reconnecting with capped backoff after transient errors. Each table has its
/// own sink (consumer, connection, transactions), so a slow or blocked table
/// never holds the others back.
pub async fn run(
    topology: Arc<Topology>,
    target: Master,
    table: TableName,
    worker: Worker,
    progress: Arc<m::Progress>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let mut backoff = crate::error::Backoff::new();
    let mut was_up = None;
    loop {
        let result = match Apply::connect(&topology, &target, &table, worker, progress.clone()).await {
            Ok(mut apply) => {
                if was_up != Some(true) {
                    tracing::info!(master = %target.name, "sink {worker} of {table} connected, applying {} topic(s)", apply.sources.len());
                    was_up = Some(true);
                }
                let result = apply.run(&topology, &mut shutdown).await;
                // Only real progress resets the backoff: a sink that connects
                // and fails at once, again and again, backs off.
                if apply.progressed {
                    backoff.reset();
                }
                result
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => return Ok(()),
            Err(e) if e.class() == Class::Fatal => {
                counter!(m::ERRORS, m::STAGE => "apply", m::KIND => "fatal").increment(1);
                return Err(e);
            }
            Err(e) => {
                counter!(m::ERRORS, m::STAGE => "apply", m::KIND => "retry").increment(1);
                if was_up != Some(false) {
                    tracing::warn!(master = %target.name, "sink {worker} of {table} paused, retrying with backoff: {e}");
                    was_up = Some(false);
                }
            }
        }
        let delay = backoff.next_delay();
        gauge!(m::RETRY_DELAY, m::STAGE => "apply", m::MASTER => target.name.clone()).set(delay.as_secs_f64());
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// One of the sinks of a (master, table): worker `index` of `count` applies
/// the partitions `p` with `p % count == index`.
#[derive(Debug, Clone, Copy)]
pub struct Worker {
    pub index: usize,
    pub count: usize,
}

impl Worker {
    fn applies(&self, partition: i32) -> bool {
        partition as usize % self.count == self.index
    }
}

impl std::fmt::Display for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index + 1, self.count)
    }
}

/// Where a record was read from (partition and offset -1: never produced).
#[derive(Debug, Clone)]
pub(crate) struct RecordId {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// A change with the record it came in.
pub(crate) struct Rec {
    pub change: Change,
    pub at: RecordId,
}

/// A record that cannot be applied (or produced), kept whole with the reason.
pub(crate) struct DeadLetter {
    pub at: RecordId,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub reason: String,
}

impl DeadLetter {
    /// Writes it to `master`'s mmsync.dead_letters and counts it.
    pub async fn keep(&self, conn: &mut PgConnection, master: &str) -> Result<()> {
        let RecordId { topic, partition, offset } = &self.at;
        tracing::warn!(master = %master, "dead letter from {topic}[{partition}]@{offset}: {}", self.reason);
        sqlx::query(
            "INSERT INTO mmsync.dead_letters (topic, partition, kafka_offset, reason, record_key, record_value)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(topic)
        .bind(partition)
        .bind(offset)
        .bind(&self.reason)
        .bind(&self.key)
        .bind(&self.value)
        .execute(conn)
        .await
        .map_err(Error::db(master, "writing a dead letter"))?;
        counter!(m::DEAD_LETTERS, m::TARGET => master.to_string()).increment(1);
        Ok(())
    }

    pub(crate) fn of(rec: Rec, reason: String) -> DeadLetter {
        DeadLetter {
            key: Some(rec.change.kafka_key().into_bytes()),
            value: Some(rec.change.kafka_value()),
            at: rec.at,
            reason,
        }
    }
}

/// What applying a table's records did, by index into them, whatever the
/// kind of target.
#[derive(Default)]
pub(crate) struct Outcome {
    pub applied: Vec<usize>,
    pub dead: Vec<(usize, String)>,
}

impl Outcome {
    /// Adds what applying record `i` alone did, or why it was refused.
    pub(crate) fn add(&mut self, i: usize, one: std::result::Result<Outcome, String>) {
        match one {
            Ok(o) => {
                self.applied.extend(o.applied.iter().map(|_| i));
                self.dead.extend(o.dead.into_iter().map(|(_, r)| (i, r)));
            }
            Err(reason) => self.dead.push((i, reason)),
        }
    }

    /// The changes that took effect, and the dead letters with their reasons.
    pub(crate) fn split(self, recs: Vec<Rec>) -> (Vec<Change>, Vec<DeadLetter>) {
        let mut recs: Vec<Option<Rec>> = recs.into_iter().map(Some).collect();
        let applied = self.applied.iter().filter_map(|&i| recs[i].take()).map(|r| r.change).collect();
        let dead =
            self.dead.into_iter().filter_map(|(i, reason)| Some(DeadLetter::of(recs[i].take()?, reason))).collect();
        (applied, dead)
    }
}

/// One consumed record, read: a change, a dead letter, or a record of a
/// newer envelope format (see [`crate::change::ENVELOPE_FORMAT`]).
enum Incoming {
    Change { rec: Rec, header_origin: Option<String> },
    Unreadable(DeadLetter),
    Newer { at: RecordId, format: u32 },
}

impl Incoming {
    fn read(msg: &BorrowedMessage<'_>) -> Incoming {
        let at = RecordId { topic: msg.topic().to_string(), partition: msg.partition(), offset: msg.offset() };
        match Change::decode(msg.key(), msg.payload()) {
            Ok(change) => {
                let header_origin = msg.headers().and_then(|h| {
                    h.iter()
                        .find(|h| h.key == HEADER_ORIGIN)
                        .and_then(|h| h.value)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                });
                Incoming::Change { rec: Rec { change, at }, header_origin }
            }
            Err(crate::change::DecodeError::NewerFormat(format)) => Incoming::Newer { at, format },
            Err(e) => Incoming::Unreadable(DeadLetter {
                at,
                key: msg.key().map(<[u8]>::to_vec),
                value: msg.payload().map(<[u8]>::to_vec),
                reason: e.to_string(),
            }),
        }
    }

    fn at(&self) -> &RecordId {
        match self {
            Incoming::Change { rec, .. } => &rec.at,
            Incoming::Unreadable(d) => &d.at,
            Incoming::Newer { at, .. } => at,
        }
    }
}

/// The database side of a connected sink: its connection, marked as the
/// applier, and the statements of its table.
enum TargetDb {
    Postgres { conn: PgConnection, sql: TableSql },
    Mariadb(crate::mariadb::apply::Target),
}

impl TargetDb {
    /// Connects to `target` and reads the table and the offsets stored there.
    async fn connect(
        topology: &Topology,
        target: &Master,
        table: &TableName,
    ) -> Result<(TargetDb, HashMap<(String, i32), i64>)> {
        if target.database() == crate::topology::Database::Mariadb {
            let (db, stored) = crate::mariadb::apply::Target::connect(topology, target, table).await?;
            return Ok((TargetDb::Mariadb(db), stored));
        }
        let mut conn = crate::postgres::db::connect(target).await?;
        let info = describe(&mut conn, &target.name, table).await?.ok_or_else(|| Error::Missing {
            master: target.name.clone(),
            problem: format!("table {table} does not exist; its changes wait in Kafka"),
            fix: "create it (same columns as on the other masters), then run `mmsync init`".into(),
        })?;
        let sql = TableSql::new(info, topology.sync.max_clock_skew);
        let stored: Vec<(String, i32, i64)> =
            sqlx::query_as("SELECT topic, partition, next_offset FROM mmsync.applied_offsets")
                .fetch_all(&mut conn)
                .await
                .map_err(Error::db(&target.name, "reading applied offsets (has `mmsync init` run?)"))?;
        let stored = stored.into_iter().map(|(t, p, o)| ((t, p), o)).collect();
        Ok((TargetDb::Postgres { conn, sql }, stored))
    }

    fn table(&self) -> &TableName {
        match self {
            TargetDb::Postgres { sql, .. } => &sql.info.name,
            TargetDb::Mariadb(db) => &db.sql.info.name,
        }
    }

    /// Applies one batch and stores its offsets, in one transaction;
    /// returns the changes that took effect.
    async fn commit_batch(&mut self, batch: Batch<'_>) -> Result<Vec<Change>> {
        match self {
            TargetDb::Postgres { conn, sql } => crate::postgres::apply::commit_batch(conn, sql, batch).await,
            TargetDb::Mariadb(db) => db.commit_batch(batch).await,
        }
    }
}

/// What one batch's transaction writes on the target, whatever its kind.
pub(crate) struct Batch<'a> {
    pub target: &'a str,
    /// Changes to apply by last-writer-wins.
    pub recs: Vec<Rec>,
    /// Records already known to be dead letters.
    pub dead: Vec<DeadLetter>,
    /// (topic, partition) -> the next offset to apply.
    pub offsets: &'a BTreeMap<(String, i32), i64>,
    /// (topic, partition) -> the commit time of the last change taken from it.
    pub commits: &'a BTreeMap<(String, i32), i64>,
    /// Topic -> the master whose changes it carries.
    pub sources: &'a HashMap<String, String>,
    /// [`crate::topology::SyncSettings::dead_letters_max_per_topic`].
    pub max_dead_letters: i64,
}

/// A connected sink.
struct Apply {
    target: String,
    db: TargetDb,
    consumer: StreamConsumer,
    /// Topic -> the master whose changes it carries.
    sources: HashMap<String, String>,
    progress: Arc<m::Progress>,
    /// A batch was committed since this sink connected.
    progressed: bool,
    /// [`crate::topology::SyncSettings::dead_letters_max_per_topic`].
    max_dead_letters: i64,
}

impl Apply {
    async fn connect(
        topology: &Topology,
        target: &Master,
        table: &TableName,
        worker: Worker,
        progress: Arc<m::Progress>,
    ) -> Result<Apply> {
        let (db, stored) = TargetDb::connect(topology, target, table).await?;
        let consumer: StreamConsumer = crate::kafka::consumer(
            &topology.kafka,
            &format!("{}-{}-{table}-{}", topology.kafka.topic_prefix, target.name, worker.index),
            topology.sink_read_ahead_bytes(),
            // Two batches: one being applied, the next one ready.
            2 * topology.sync.batch_max_changes,
        )?;
        let mut tpl = TopicPartitionList::new();
        let mut sources = HashMap::new();
        let mut gaps = Vec::new();
        for (master, t, topic) in crate::kafka::all_topics(topology) {
            if master == target.name || t != *table {
                continue;
            }
            // Missing may mean "being created": a topic just made is listed by
            // the brokers a moment later. The sink waits and retries.
            let partitions = crate::kafka::partitions(&consumer, &topic)?.ok_or_else(|| Error::Missing {
                master: target.name.clone(),
                problem: format!("topic {topic} does not exist"),
                fix: "run `mmsync init` (mmsync creates its topics; it never relies on auto-create); this sink retries"
                    .into(),
            })?;
            // Only this worker's share is read.
            for p in (0..partitions).filter(|p| worker.applies(*p)) {
                let n = stored.get(&(topic.clone(), p)).copied().unwrap_or(0);
                progress.offset(&topic, p, &master, &target.name, n);
                gaps.extend(offset_gap(&consumer, &topic, p, n)?);
                let from = if n > 0 { Offset::Offset(n) } else { Offset::Beginning };
                tpl.add_partition_offset(&topic, p, from).map_err(Error::kafka("assigning partitions"))?;
            }
            sources.insert(topic, master);
        }
        if !gaps.is_empty() {
            return Err(gaps_error(&target.name, &sources, &gaps));
        }
        consumer.assign(&tpl).map_err(Error::kafka("assigning partitions"))?;
        Ok(Apply {
            target: target.name.clone(),
            db,
            consumer,
            sources,
            progress,
            progressed: false,
            max_dead_letters: topology.sync.dead_letters_max_per_topic,
        })
    }

    async fn run(&mut self, topology: &Topology, shutdown: &mut watch::Receiver<bool>) -> Result<()> {
        loop {
            // Shutdown first; a batch that has started is applied and committed.
            let first = tokio::select! {
                biased;
                _ = shutdown.wait_for(|s| *s) => return Ok(()),
                msg = self.recv_new() => msg,
            };
            // A batch ends at batch_max_changes or batch_max_bytes of
            // records, whichever comes first: what a sink holds is bounded
            // by configuration whatever the rows' size or the backlog.
            let (mut batch, mut bytes) = (Vec::new(), 0);
            let mut stop = self.take(first, &mut batch, &mut bytes).err();
            let deadline = tokio::time::Instant::now() + topology.sync.batch_max_wait;
            while stop.is_none()
                && batch.len() < topology.sync.batch_max_changes
                && bytes < topology.sync.batch_max_bytes
            {
                match tokio::time::timeout_at(deadline, self.recv_new()).await {
                    Ok(incoming) => stop = self.take(incoming, &mut batch, &mut bytes).err(),
                    Err(_) => break,
                }
            }
            // What came before a stop is applied: the sink resumes after it.
            if !batch.is_empty() {
                self.apply_batch(batch).await?;
                self.progressed = true;
            }
            if let Some(e) = stop {
                return Err(e);
            }
        }
    }

    /// Adds a received record to the batch, or says why the batch ends
    /// here: the consumer failed, or a record is of a newer format than this
    /// mmsync reads (good, only newer: not a dead letter; it waits in Kafka
    /// until mmsync is upgraded, and this link retries until then).
    fn take(&self, incoming: Result<(Incoming, usize)>, batch: &mut Vec<Incoming>, bytes: &mut usize) -> Result<()> {
        let (incoming, size) = incoming?;
        *bytes += size;
        match incoming {
            Incoming::Newer { at, format } => Err(Error::Missing {
                master: self.target.clone(),
                problem: format!(
                    "record {}[{}]@{} has envelope format {format}, newer than this mmsync reads (format {})",
                    at.topic,
                    at.partition,
                    at.offset,
                    crate::change::ENVELOPE_FORMAT
                ),
                fix: "upgrade mmsync here to the version its source runs; that record and the ones behind it wait in \
                      Kafka and this sink retries"
                    .into(),
            }),
            incoming => {
                batch.push(incoming);
                Ok(())
            }
        }
    }

    /// The next record: the consumer starts at the stored offsets, so every
    /// record it hands out is one this sink has not applied yet. With its
    /// size (key and value bytes).
    async fn recv_new(&self) -> Result<(Incoming, usize)> {
        loop {
            match self.consumer.recv().await {
                Ok(msg) => {
                    let size = msg.key_len() + msg.payload_len();
                    return Ok((Incoming::read(&msg), size));
                }
                // librdkafka hands the consumer word of a broker it lost (one
                // of three killed, say) and reconnects, or reads from the new
                // leader, by itself: counted, not a reason to start over.
                Err(KafkaError::MessageConsumption(code)) if crate::kafka::is_passing(code) => {
                    counter!(m::ERRORS, m::STAGE => "consume", m::KIND => "retry").increment(1);
                }
                Err(e) => return Err(Error::kafka("consuming")(e)),
            }
        }
    }

    /// Applies one batch and stores its offsets, in one transaction.
    async fn apply_batch(&mut self, batch: Vec<Incoming>) -> Result<()> {
        let started = Instant::now();
        let target = self.target.clone();
        let mut offsets: BTreeMap<(String, i32), i64> = BTreeMap::new();
        // The commit time of the last change taken from each partition (tombstone retention).
        let mut commits: BTreeMap<(String, i32), i64> = BTreeMap::new();
        let mut recs: Vec<Rec> = Vec::with_capacity(batch.len());
        let mut dead: Vec<DeadLetter> = Vec::new();
        let mut own = 0u64;
        for inc in batch {
            let at = inc.at();
            offsets.insert((at.topic.clone(), at.partition), at.offset + 1);
            let (rec, header_origin) = match inc {
                Incoming::Change { rec, header_origin } => (rec, header_origin),
                Incoming::Unreadable(d) => {
                    dead.push(d);
                    continue;
                }
                Incoming::Newer { .. } => unreachable!("a newer record ends the batch before it"),
            };
            if header_origin.as_deref() == Some(target.as_str()) || rec.change.origin == target {
                own += 1;
                continue;
            }
            // Only a topic's own master writes it: a record claiming another
            // origin was forged or misrouted (and would add metric series
            // and lag entries without bound).
            let topic_master = self.sources.get(&rec.at.topic).map(String::as_str);
            if topic_master != Some(rec.change.origin.as_str())
                || header_origin.as_deref().is_some_and(|h| h != rec.change.origin)
            {
                let reason = format!(
                    "the record says origin {:?} (header {:?}), but topic {} carries the changes of master {:?} only",
                    rec.change.origin,
                    header_origin.as_deref().unwrap_or("none"),
                    rec.at.topic,
                    topic_master.unwrap_or("?")
                );
                dead.push(DeadLetter::of(rec, reason));
                continue;
            }
            if rec.change.table != *self.db.table() {
                let reason =
                    format!("the record names table {}, but its topic carries {}", rec.change.table, self.db.table());
                dead.push(DeadLetter::of(rec, reason));
                continue;
            }
            commits.insert((rec.at.topic.clone(), rec.at.partition), rec.change.position.commit_ms);
            recs.push(rec);
        }
        counter!(m::LOOP_SUPPRESSED, m::MASTER => target.clone()).increment(own);
        // How far each source has been read, applied or not (the lag gauge).
        let mut newest: HashMap<String, i64> = HashMap::new();
        for r in &recs {
            let n = newest.entry(r.change.origin.clone()).or_insert(r.change.position.commit_ms);
            *n = (*n).max(r.change.position.commit_ms);
        }

        let batch = Batch {
            target: &target,
            recs,
            dead,
            offsets: &offsets,
            commits: &commits,
            sources: &self.sources,
            max_dead_letters: self.max_dead_letters,
        };
        let applied = self.db.commit_batch(batch).await?;

        let now_ms = m::now_ms();
        for (source, commit_ms) in newest {
            self.progress.applied(&source, &target, commit_ms, lag_seconds(now_ms, commit_ms));
        }
        for ((topic, partition), next) in &offsets {
            if let Some(source) = self.sources.get(topic) {
                self.progress.offset(topic, *partition, source, &target, *next);
            }
        }
        histogram!(m::APPLY_DURATION, m::TARGET => target.clone()).record(started.elapsed().as_secs_f64());
        histogram!(m::APPLY_BATCH_SIZE, m::TARGET => target.clone()).record(applied.len() as f64);
        // One counter update per (source, op) and one histogram handle per
        // source a batch, not a registry lookup per change.
        let table = self.db.table().to_string();
        let mut counts: HashMap<(&str, Op), u64> = HashMap::new();
        let mut lags: HashMap<&str, Vec<f64>> = HashMap::new();
        for c in &applied {
            *counts.entry((c.origin.as_str(), c.op)).or_default() += 1;
            lags.entry(c.origin.as_str()).or_default().push(lag_seconds(now_ms, c.position.commit_ms));
        }
        for ((source, op), n) in counts {
            counter!(m::CHANGES_APPLIED, m::SOURCE => source.to_string(), m::TARGET => target.clone(), m::TABLE => table.clone(), m::OP => op.name())
                .increment(n);
        }
        for (source, lags) in lags {
            let h =
                histogram!(m::REPLICATION_LAG_HISTOGRAM, m::SOURCE => source.to_string(), m::TARGET => target.clone());
            lags.into_iter().for_each(|lag| h.record(lag));
        }
        Ok(())
    }
}

/// A partition whose next record (for this sink) the topic no longer holds.
struct Gap {
    topic: String,
    partition: i32,
    next: i64,
    low: i64,
    high: i64,
}

/// Whether the topic still holds the record at `next` (the next one this
/// sink applies) and everything after it. It does not when retention deleted
/// records this target never applied (`next` below the topic's first offset)
/// or the topic was deleted and made again (`next` beyond its end): changes
/// of the topic's master may be missing on this target.
fn offset_gap(consumer: &StreamConsumer, topic: &str, partition: i32, next: i64) -> Result<Option<Gap>> {
    let (low, high) = consumer
        .fetch_watermarks(topic, partition, crate::kafka::REQUEST_TIMEOUT)
        .map_err(Error::kafka(format!("reading the offsets {topic}[{partition}] holds")))?;
    Ok((!(low..=high).contains(&next)).then(|| Gap { topic: topic.to_string(), partition, next, low, high }))
}

/// The error that stops a link with gaps (the others go on): what happened,
/// and how to resume, in one statement. It is never skipped in silence.
fn gaps_error(target: &str, sources: &HashMap<String, String>, gaps: &[Gap]) -> Error {
    counter!(m::OFFSET_GAPS, m::TARGET => target.to_string()).increment(gaps.len() as u64);
    let what: Vec<String> = gaps
        .iter()
        .map(|g| {
            let source = sources.get(&g.topic).map_or("?", String::as_str);
            let why = if g.next < g.low {
                format!("records {}..{} were deleted before this master applied them (retention)", g.next, g.low)
            } else {
                "the topic was deleted and made again, or truncated".to_string()
            };
            format!(
                "{}[{}] (changes of master {source:?}): next record {}, the topic holds {}..{}: {why}",
                g.topic, g.partition, g.next, g.low, g.high
            )
        })
        .collect();
    let values: Vec<String> =
        gaps.iter().map(|g| format!("({}, {}, {})", quote_literal(&g.topic), g.partition, g.low)).collect();
    Error::Missing {
        master: target.to_string(),
        problem: format!("changes may be missing here: {}", what.join("; ")),
        fix: format!(
            "find the differences with `mmsync verify` and write those rows again on their master; then let this \
             link go on from each topic's first record with, on this master: INSERT INTO mmsync.applied_offsets \
             (topic, partition, next_offset) VALUES {} ON CONFLICT (topic, partition) DO UPDATE SET next_offset = \
             EXCLUDED.next_offset; until then this link retries (mmsync_offset_gaps_total counts it)",
            values.join(", ")
        ),
    }
}

/// Refuses to add dead letters of a topic past `max` pending ones
/// (`dead_letters_max_per_topic`): the batch is not committed, that link
/// stops with an error and retries, and its records wait in Kafka. A forged
/// or broken stream cannot fill the target's disk, and nobody loses a record
/// to a limit.
pub(crate) async fn check_dead_letter_bound(
    tx: &mut PgConnection,
    target: &str,
    sources: &HashMap<String, String>,
    max: i64,
    dead: &[DeadLetter],
) -> Result<()> {
    let mut adding: BTreeMap<&str, i64> = BTreeMap::new();
    for d in dead {
        *adding.entry(d.at.topic.as_str()).or_default() += 1;
    }
    for (topic, n) in adding {
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM mmsync.dead_letters WHERE topic = $1 AND retried_at IS NULL")
                .bind(topic)
                .fetch_one(&mut *tx)
                .await
                .map_err(Error::db(target, "counting dead letters"))?;
        if pending + n > max {
            return Err(dead_letter_bound_error(target, sources, topic, pending, n, max));
        }
    }
    Ok(())
}

/// The records of a batch that may be planned (their indices), with the
/// others added to `dead` with the reason: columns that do not fit the
/// target's table, or a version beyond its clock plus the allowed skew.
pub(crate) fn validate(
    recs: &[Rec],
    shape_problem: impl Fn(&Change) -> Option<String>,
    max_clock_skew: std::time::Duration,
    dead: &mut Vec<(usize, String)>,
) -> Vec<usize> {
    let now_us = crate::change::now_us();
    let mut valid = Vec::with_capacity(recs.len());
    for (i, rec) in recs.iter().enumerate() {
        let change = &rec.change;
        if let Some(problem) = shape_problem(change) {
            dead.push((i, problem));
        } else if let Some(problem) = crate::change::version_problem(change.version, now_us, max_clock_skew) {
            dead.push((
                i,
                format!(
                    "{problem}: a forged record, or its master's clock runs ahead; fix that clock (NTP), then \
                     `mmsync dead-letters retry`"
                ),
            ));
        } else {
            valid.push(i);
        }
    }
    valid
}

/// Why an upsert's columns do not fit a table whose data columns, sorted,
/// are `columns` (schema drift), if they don't.
pub(crate) fn shape_problem(change: &Change, columns: &[String], table: &TableName) -> Option<String> {
    let row = change.row.as_ref()?;
    // Rows are maps sorted by column name, like `columns`: the common case
    // compares without allocating.
    let fits = if change.unchanged.is_empty() {
        row.keys().eq(columns.iter())
    } else {
        let mut sent: Vec<&String> = row.keys().chain(&change.unchanged).collect();
        sent.sort_unstable();
        sent.into_iter().eq(columns.iter())
    };
    if fits {
        return None;
    }
    let sent: Vec<&String> = row.keys().chain(&change.unchanged).collect();
    let missing: Vec<&&String> = sent.iter().filter(|c| !columns.contains(c)).collect();
    let extra: Vec<&String> = columns.iter().filter(|c| !sent.contains(c)).collect();
    Some(format!(
        "the columns of {table} differ between masters: the record has {missing:?} that this master lacks, this master has {extra:?} that the record lacks; make the table the same on every master, then re-apply the dead letters"
    ))
}

/// The error that stops a link before it adds dead letters past
/// `dead_letters_max_per_topic`, whatever the kind of target.
pub(crate) fn dead_letter_bound_error(
    target: &str,
    sources: &HashMap<String, String>,
    topic: &str,
    pending: i64,
    adding: i64,
    max: i64,
) -> Error {
    let source = sources.get(topic).map_or("?", String::as_str);
    Error::Missing {
        master: target.to_string(),
        problem: format!(
            "{pending} dead letters of topic {topic} (changes of master {source:?}) are pending here, and \
             {adding} more would pass [sync] dead_letters_max_per_topic = {max}; this link stops before adding them"
        ),
        fix: "look at them with `mmsync dead-letters list`: fix their cause and run `mmsync dead-letters \
              retry`, or delete the ones you do not want (DELETE FROM mmsync.dead_letters WHERE ...), or \
              raise the limit; the records wait in Kafka and this link retries"
            .into(),
    }
}

/// Commit-to-apply time from a record's `ts_ms`, never negative; saturating,
/// so that a forged `ts_ms` cannot overflow the arithmetic.
fn lag_seconds(now_ms: i64, commit_ms: i64) -> f64 {
    now_ms.saturating_sub(commit_ms).max(0) as f64 / 1000.0
}

/// What `mmsync dead-letters retry` did on one master.
#[derive(Debug, Default)]
pub struct RetryReport {
    /// Dead letters applied now (or found already superseded) and marked retried.
    pub applied: usize,
    /// Dead letters that still cannot be applied: (id, reason).
    pub still_dead: Vec<(i64, String)>,
}

/// A stored dead letter: id, topic, partition, offset, key, value.
pub(crate) type Letter = (i64, String, i32, i64, Option<Vec<u8>>, Option<Vec<u8>>);

/// Reads stored dead letters back as changes, grouped by table; the ones
/// that cannot be applied as they stand go to `report.still_dead` with the
/// reason. The same for every kind of master.
pub(crate) fn group_dead_letters(
    topology: &Topology,
    rows: Vec<Letter>,
    report: &mut RetryReport,
) -> BTreeMap<TableName, Vec<(i64, Rec)>> {
    let mut groups: BTreeMap<TableName, Vec<(i64, Rec)>> = BTreeMap::new();
    let topic_master: HashMap<String, String> =
        crate::kafka::all_topics(topology).into_iter().map(|(m, _, t)| (t, m)).collect();
    for (id, topic, partition, offset, key, value) in rows {
        match Change::decode(key.as_deref(), value.as_deref()) {
            Ok(change) if topic_master.get(&topic) != Some(&change.origin) => report.still_dead.push((
                id,
                format!(
                    "the record says origin {:?}, but topic {topic} is not that master's: it is not applied",
                    change.origin
                ),
            )),
            Ok(change) if topology.synced_tables().contains(&change.table) => groups
                .entry(change.table.clone())
                .or_default()
                .push((id, Rec { change, at: RecordId { topic, partition, offset } })),
            Ok(change) => report.still_dead.push((id, format!("table {} is not in [sync] tables", change.table))),
            Err(e @ crate::change::DecodeError::NewerFormat(_)) => {
                report.still_dead.push((id, format!("{e}, then retry")))
            }
            Err(e) => report
                .still_dead
                .push((id, format!("{e}; not mmsync's record, so it cannot be applied: delete it once checked"))),
        }
    }
    groups
}

/// Which of a table's dead letters (`entries`) applied: their ids, with
/// the ones refused again added to `report.still_dead`.
pub(crate) fn applied_ids(entries: &[(i64, Rec)], refused: Vec<DeadLetter>, report: &mut RetryReport) -> Vec<i64> {
    let ids: HashMap<(&str, i32, i64), i64> =
        entries.iter().map(|(id, r)| ((r.at.topic.as_str(), r.at.partition, r.at.offset), *id)).collect();
    let mut refused_ids = std::collections::HashSet::new();
    for d in refused {
        if let Some(id) = ids.get(&(d.at.topic.as_str(), d.at.partition, d.at.offset)) {
            refused_ids.insert(*id);
            report.still_dead.push((*id, d.reason));
        }
    }
    ids.values().filter(|id| !refused_ids.contains(id)).copied().collect()
}

/// Applies a master's dead letters again (once the schema is fixed, say),
/// except those its own source could not produce (partition -1), which
/// stay listed until their row is written again,
/// by the same last-writer-wins rules, in one transaction. The ones that now
/// apply are marked `retried_at`; the others keep their row with the new reason.
pub async fn retry_dead_letters(topology: &Topology, target: &Master) -> Result<RetryReport> {
    if target.database() == crate::topology::Database::Mariadb {
        return crate::mariadb::apply::retry_dead_letters(topology, target).await;
    }
    let name = target.name.as_str();
    let mut conn = crate::postgres::db::connect(target).await?;
    let rows: Vec<Letter> = sqlx::query_as(
        "SELECT id, topic, partition, kafka_offset, record_key, record_value FROM mmsync.dead_letters
         WHERE retried_at IS NULL AND partition >= 0 ORDER BY id",
    )
    .fetch_all(&mut conn)
    .await
    .map_err(Error::db(name, "reading dead letters"))?;
    let mut report = RetryReport::default();
    let groups = group_dead_letters(topology, rows, &mut report);
    let mut tx = sqlx::Connection::begin(&mut conn).await.map_err(Error::db(name, "beginning a transaction"))?;
    sqlx::query(APPLIER_SESSION).execute(&mut *tx).await.map_err(Error::db(name, "marking the applier"))?;
    let mut applied_ids: Vec<i64> = Vec::new();
    for (table, entries) in groups {
        let Some(info) = describe(&mut tx, name, &table).await? else {
            report.still_dead.extend(entries.iter().map(|(id, _)| (*id, format!("table {table} does not exist here"))));
            continue;
        };
        let recs: Vec<Rec> = entries.iter().map(|(_, r)| Rec { change: r.change.clone(), at: r.at.clone() }).collect();
        let (_, refused) =
            TableSql::new(info, topology.sync.max_clock_skew).apply_isolated(&mut tx, name, recs).await?;
        applied_ids.extend(crate::sink::applied_ids(&entries, refused, &mut report));
    }
    sqlx::query("UPDATE mmsync.dead_letters SET retried_at = now() WHERE id = ANY($1)")
        .bind(&applied_ids)
        .execute(&mut *tx)
        .await
        .map_err(Error::db(name, "marking dead letters retried"))?;
    for (id, reason) in &report.still_dead {
        sqlx::query("UPDATE mmsync.dead_letters SET reason = $2 WHERE id = $1")
            .bind(id)
            .bind(reason)
            .execute(&mut *tx)
            .await
            .map_err(Error::db(name, "updating a dead letter"))?;
    }
    tx.commit().await.map_err(Error::db(name, "committing the retry"))?;
    report.applied = applied_ids.len();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_from_a_forged_timestamp_neither_overflows_nor_goes_negative() {
        assert_eq!(lag_seconds(10_000, 7_500), 2.5);
        assert_eq!(lag_seconds(10_000, 20_000), 0.0);
        assert!(lag_seconds(i64::MAX, i64::MIN) > 9e15);
        assert_eq!(lag_seconds(i64::MIN, i64::MAX), 0.0);
        let progress = m::Progress::default();
        progress.applied("seoul", "busan", i64::MIN, lag_seconds(0, i64::MIN));
        progress.publish_lag(i64::MAX, std::time::Duration::from_secs(1));
    }
}
