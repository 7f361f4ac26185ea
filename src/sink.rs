//! The sink of one master: consumes every other master's topics and applies
//! the changes by last-writer-wins, one transaction per batch, with the
//! consumed offsets stored in the same transaction.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use metrics::{counter, gauge, histogram};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message as _};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::{PgConnection, Row as _};
use tokio::sync::watch;

use crate::change::{encode_key, Change, Key, Op, HEADER_ORIGIN};
use crate::error::{Class, Error, Result};
use crate::lww::{stamp, Stamp};
use crate::metrics as m;
use crate::postgres::schema::{describe, TableInfo};
use crate::topology::{quote_ident, quote_literal, Master, TableName, Topology, ORIGIN_COLUMN, VERSION_COLUMN};

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
struct Rec {
    change: Change,
    at: RecordId,
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

    fn of(rec: Rec, reason: String) -> DeadLetter {
        DeadLetter {
            key: Some(rec.change.kafka_key().into_bytes()),
            value: Some(rec.change.kafka_value()),
            at: rec.at,
            reason,
        }
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

/// A connected sink.
struct Apply {
    target: String,
    conn: PgConnection,
    consumer: StreamConsumer,
    sql: TableSql,
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
        let stored: HashMap<(String, i32), i64> = stored.into_iter().map(|(t, p, o)| ((t, p), o)).collect();

        let consumer: StreamConsumer = crate::kafka::consumer(
            &topology.kafka,
            &format!("{}-{}-{table}-{}", topology.kafka.topic_prefix, target.name, worker.index),
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
            conn,
            consumer,
            sql,
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
            let mut batch = Vec::new();
            let mut stop = self.take(first, &mut batch).err();
            let deadline = tokio::time::Instant::now() + topology.sync.batch_max_wait;
            while stop.is_none() && batch.len() < topology.sync.batch_max_changes {
                match tokio::time::timeout_at(deadline, self.recv_new()).await {
                    Ok(incoming) => stop = self.take(incoming, &mut batch).err(),
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
    fn take(&self, incoming: Result<Incoming>, batch: &mut Vec<Incoming>) -> Result<()> {
        match incoming? {
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
    /// record it hands out is one this sink has not applied yet.
    async fn recv_new(&self) -> Result<Incoming> {
        loop {
            match self.consumer.recv().await {
                Ok(msg) => return Ok(Incoming::read(&msg)),
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
        let db = |what: &str| Error::db(&target, what.to_string());
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
            if rec.change.table != self.sql.info.name {
                let reason = format!(
                    "the record names table {}, but its topic carries {}",
                    rec.change.table, self.sql.info.name
                );
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

        if recs.iter().any(|r| self.sql.shape_problem(&r.change).is_some()) {
            // The table may have changed since this sink connected (a column
            // added to fix drift, say): look at it again before refusing.
            if let Some(info) = describe(&mut self.conn, &target, &self.sql.info.name).await? {
                self.sql = TableSql::new(info, self.sql.max_clock_skew);
            }
        }
        let mut tx = sqlx::Connection::begin(&mut self.conn).await.map_err(db("beginning a transaction"))?;
        sqlx::query(APPLIER_SESSION).execute(&mut *tx).await.map_err(db("marking the applier session"))?;
        let mut applied: Vec<Change> = Vec::new();
        if !recs.is_empty() {
            let (ok, refused) = self.sql.apply_isolated(&mut tx, &target, recs).await?;
            applied.extend(ok);
            dead.extend(refused);
        }
        if !dead.is_empty() {
            check_dead_letter_bound(&mut tx, &target, &self.sources, self.max_dead_letters, &dead).await?;
        }
        for d in dead {
            d.keep(&mut tx, &target).await?;
        }
        store_offsets(&mut tx, &target, &offsets, &commits).await?;
        tx.commit().await.map_err(db("committing a batch"))?;

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
        let table = self.sql.info.name.to_string();
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
async fn check_dead_letter_bound(
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
            let source = sources.get(topic).map_or("?", String::as_str);
            return Err(Error::Missing {
                    master: target.to_string(),
                    problem: format!(
                        "{pending} dead letters of topic {topic} (changes of master {source:?}) are pending here, and \
                         {n} more would pass [sync] dead_letters_max_per_topic = {max}; this link stops before adding them"
                    ),
                    fix: "look at them with `mmsync dead-letters list`: fix their cause and run `mmsync dead-letters \
                          retry`, or delete the ones you do not want (DELETE FROM mmsync.dead_letters WHERE ...), or \
                          raise the limit; the records wait in Kafka and this link retries"
                        .into(),
                });
        }
    }
    Ok(())
}

/// What applying a table's records did, by index into them.
#[derive(Default)]
struct Outcome {
    applied: Vec<usize>,
    dead: Vec<(usize, String)>,
}

/// Why the target database refused records as data.
#[derive(Debug)]
struct Refusal {
    code: Option<String>,
    constraint: Option<String>,
    message: String,
}

/// The statements of one table, built once per connection.
struct TableSql {
    info: TableInfo,
    /// The data columns' names, sorted: what a record's row and unchanged columns must be.
    columns: Vec<String>,
    upsert: String,
    delete: String,
    tombstone: String,
    lock_rows: String,
    read_tombstones: String,
    /// Per plain unique index besides the key: (index name, the statement
    /// that finds and locks the rows holding a record's values under another key).
    unique_holders: Vec<(String, String)>,
    /// Versions further ahead of the clock are refused ([`crate::topology::SyncSettings::max_clock_skew`]).
    max_clock_skew: std::time::Duration,
}

impl TableSql {
    fn new(info: TableInfo, max_clock_skew: std::time::Duration) -> TableSql {
        let t = info.name.quoted();
        let (o, v) = (quote_ident(ORIGIN_COLUMN), quote_ident(VERSION_COLUMN));
        let cast = |c: &str, from: &str| {
            let ty = &info.column(c).expect("a column of the table").sql_type;
            format!("({from}->>{})::{ty}", quote_literal(c))
        };
        let data: Vec<String> = info.data_columns().map(|c| c.name.clone()).collect();
        let cols: Vec<String> = data.iter().map(|c| quote_ident(c)).collect();
        let values: Vec<String> = data.iter().map(|c| cast(c, "(e->'row')")).collect();
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
             SELECT {values}, e->>'origin', (e->>'version')::int8 FROM jsonb_array_elements($1::jsonb) AS e
             ON CONFLICT ({keys}) DO UPDATE SET {set}
             WHERE (t.{v}, t.{o}) < (EXCLUDED.{v}, EXCLUDED.{o})",
            cols = cols.join(", "),
            values = values.join(", "),
            keys = keys.join(", "),
            set = set.join(", "),
        );
        // Every statement that finds rows by key walks the batch and probes the
        // primary key once per element (LATERAL ... LIMIT 1). Left to itself
        // the planner joins a batch against a whole table or against every
        // tombstone of it, which costs more the bigger they grow.
        let probe = |from: &str| {
            let m: Vec<String> = info.key.iter().map(|k| format!("t.{} = {}", quote_ident(k), cast(k, from))).collect();
            m.join(" AND ")
        };
        let delete = format!(
            "DELETE FROM {t} WHERE ctid = ANY(ARRAY(
                SELECT t.ctid FROM jsonb_array_elements($1::jsonb) AS e
                CROSS JOIN LATERAL (SELECT t.ctid, t.{v}, t.{o} FROM {t} AS t WHERE {} LIMIT 1) AS t
                WHERE (t.{v}, t.{o}) < ((e->>'version')::int8, (e->>'origin') COLLATE \"C\")))",
            probe("(e->'key')")
        );
        let tombstone = format!(
            "INSERT INTO mmsync.tombstones AS tb (schema_name, table_name, key, version, origin)
             SELECT {}, {}, e->'key', (e->>'version')::int8, e->>'origin' FROM jsonb_array_elements($1::jsonb) AS e
             ON CONFLICT (schema_name, table_name, key) DO UPDATE
                SET version = EXCLUDED.version, origin = EXCLUDED.origin, deleted_at = now()
                WHERE (tb.version, tb.origin) < (EXCLUDED.version, EXCLUDED.origin)",
            quote_literal(&info.name.schema),
            quote_literal(&info.name.name)
        );
        let lock_rows = format!(
            "SELECT {}, t.{v}, t.{o}::text FROM jsonb_array_elements($1::jsonb) AS e
             CROSS JOIN LATERAL (SELECT * FROM {t} AS t WHERE {} LIMIT 1 FOR UPDATE) AS t",
            info.key_json_sql("t"),
            probe("e")
        );
        let read_tombstones = format!(
            "SELECT tb.key, tb.version, tb.origin::text FROM jsonb_array_elements($1::jsonb) AS e
             CROSS JOIN LATERAL (SELECT key, version, origin FROM mmsync.tombstones
                 WHERE schema_name = {} AND table_name = {} AND key = e LIMIT 1) AS tb",
            quote_literal(&info.name.schema),
            quote_literal(&info.name.name)
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
        let mut columns: Vec<String> = info.data_columns().map(|c| c.name.clone()).collect();
        columns.sort_unstable();
        TableSql {
            info,
            columns,
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
    async fn apply_isolated(
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
                    match self.apply_one(conn, target, rec).await? {
                        Ok(o) => {
                            total.applied.extend(o.applied.iter().map(|_| i));
                            total.dead.extend(o.dead.into_iter().map(|(_, r)| (i, r)));
                        }
                        Err(refusal) => total.dead.push((i, refusal.message)),
                    }
                }
                total
            }
        };
        let mut recs: Vec<Option<Rec>> = recs.into_iter().map(Some).collect();
        let applied = outcome.applied.iter().filter_map(|&i| recs[i].take()).map(|r| r.change).collect();
        let dead =
            outcome.dead.into_iter().filter_map(|(i, reason)| Some(DeadLetter::of(recs[i].take()?, reason))).collect();
        Ok((applied, dead))
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
        let deletes: Vec<serde_json::Value> = losers
            .iter()
            .map(|(key, _)| serde_json::json!({"key": key, "version": winner.0, "origin": winner.1}))
            .collect();
        let deletes = serde_json::Value::Array(deletes);
        sqlx::query(&self.delete)
            .bind(&deletes)
            .execute(&mut *conn)
            .await
            .map_err(db("removing a unique value's loser"))?;
        let tombstones: Vec<serde_json::Value> = losers
            .iter()
            .map(|(key, _)| serde_json::json!({"key": key, "version": winner.0, "origin": target}))
            .collect();
        sqlx::query(&self.tombstone)
            .bind(serde_json::Value::Array(tombstones))
            .execute(&mut *conn)
            .await
            .map_err(db("recording tombstones"))?;
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
        let now_us = crate::change::now_us();
        // Indices (into `recs`) of the records that may be planned.
        let mut valid: Vec<usize> = Vec::with_capacity(recs.len());
        for (i, rec) in recs.iter().enumerate() {
            let change = &rec.change;
            if let Some(problem) = self.shape_problem(change) {
                outcome.dead.push((i, problem));
            } else if let Some(problem) = crate::change::version_problem(change.version, now_us, self.max_clock_skew) {
                outcome.dead.push((
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
        if valid.is_empty() {
            return Ok(outcome);
        }
        let changes: Vec<&Change> = valid.iter().map(|&i| &recs[i].change).collect();

        // The target's current state of those keys; existing rows are locked
        // so that no local write slips between this read and the writes.
        let mut seen = std::collections::HashSet::new();
        let keys: Vec<serde_json::Value> = changes
            .iter()
            .filter(|c| seen.insert(c.kafka_key()))
            .map(|c| serde_json::to_value(&c.key).expect("strings"))
            .collect();
        let keys = serde_json::Value::Array(keys);
        let mut held: HashMap<String, crate::lww::Held> = HashMap::new();
        for r in sqlx::query(&self.lock_rows).bind(&keys).fetch_all(&mut *conn).await.map_err(db("locking rows"))? {
            held.entry(key_text(r.get(0))).or_default().row = Some((r.get(1), r.get(2)));
        }
        for r in sqlx::query(&self.read_tombstones)
            .bind(&keys)
            .fetch_all(&mut *conn)
            .await
            .map_err(db("reading tombstones"))?
        {
            held.entry(key_text(r.get(0))).or_default().tombstone = Some((r.get(1), r.get(2)));
        }

        let plan = crate::lww::plan(&changes, &held);
        outcome.applied.extend(plan.applied.iter().map(|&j| valid[j]));
        outcome.dead.extend(plan.dead.iter().map(|(j, reason)| (valid[*j], reason.clone())));
        let upserts: Vec<serde_json::Value> =
            plan.upserts.iter().map(|&j| self.row_json(plan.whole(j, &changes))).collect();
        let partial: Vec<&Change> = plan.partial.iter().map(|&j| changes[j]).collect();
        let deletes: Vec<serde_json::Value> = plan
            .deletes
            .iter()
            .map(|&j| {
                let c = changes[j];
                serde_json::json!({"key": c.key, "version": c.version, "origin": c.origin})
            })
            .collect();
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
            sqlx::query(&self.upsert)
                .bind(serde_json::Value::Array(upserts))
                .execute(&mut *conn)
                .await
                .map_err(db("upserting rows"))?;
        }
        for change in partial {
            self.update_present_columns(conn, change).await.map_err(db("updating rows"))?;
        }
        if !deletes.is_empty() {
            let deletes = serde_json::Value::Array(deletes);
            sqlx::query(&self.delete).bind(&deletes).execute(&mut *conn).await.map_err(db("deleting rows"))?;
            sqlx::query(&self.tombstone)
                .bind(&deletes)
                .execute(&mut *conn)
                .await
                .map_err(db("recording tombstones"))?;
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
    fn shape_problem(&self, change: &Change) -> Option<String> {
        let row = change.row.as_ref()?;
        // Rows are maps sorted by column name, like `self.columns`: the
        // common case compares without allocating.
        let fits = if change.unchanged.is_empty() {
            row.keys().eq(self.columns.iter())
        } else {
            let mut sent: Vec<&String> = row.keys().chain(&change.unchanged).collect();
            sent.sort_unstable();
            sent.into_iter().eq(self.columns.iter())
        };
        if fits {
            return None;
        }
        let sent: Vec<&String> = row.keys().chain(&change.unchanged).collect();
        let missing: Vec<&&String> = sent.iter().filter(|c| !self.columns.contains(c)).collect();
        let extra: Vec<&String> = self.columns.iter().filter(|c| !sent.contains(c)).collect();
        Some(format!(
            "the columns of {} differ between masters: the record has {missing:?} that this master lacks, this master has {extra:?} that the record lacks; make the table the same on every master, then re-apply the dead letters",
            self.info.name
        ))
    }

    /// The JSON element for the upsert statement: the row plus the stamp.
    fn row_json(&self, change: &Change) -> serde_json::Value {
        serde_json::json!({"row": change.row, "origin": change.origin, "version": change.version})
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

/// Commit-to-apply time from a record's `ts_ms`, never negative; saturating,
/// so that a forged `ts_ms` cannot overflow the arithmetic.
fn lag_seconds(now_ms: i64, commit_ms: i64) -> f64 {
    now_ms.saturating_sub(commit_ms).max(0) as f64 / 1000.0
}

/// The canonical key text of a key object read back from the database.
fn key_text(v: serde_json::Value) -> String {
    let key: Key = serde_json::from_value(v).unwrap_or_default();
    encode_key(&key)
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

/// What `mmsync dead-letters retry` did on one master.
#[derive(Debug, Default)]
pub struct RetryReport {
    /// Dead letters applied now (or found already superseded) and marked retried.
    pub applied: usize,
    /// Dead letters that still cannot be applied: (id, reason).
    pub still_dead: Vec<(i64, String)>,
}

/// Applies a master's dead letters again (once the schema is fixed, say),
/// except those its own source could not produce (partition -1), which
/// stay listed until their row is written again,
/// by the same last-writer-wins rules, in one transaction. The ones that now
/// apply are marked `retried_at`; the others keep their row with the new reason.
pub async fn retry_dead_letters(topology: &Topology, target: &Master) -> Result<RetryReport> {
    let name = target.name.as_str();
    let mut conn = crate::postgres::db::connect(target).await?;
    /// id, topic, partition, offset, key, value.
    type Letter = (i64, String, i32, i64, Option<Vec<u8>>, Option<Vec<u8>>);
    let rows: Vec<Letter> = sqlx::query_as(
        "SELECT id, topic, partition, kafka_offset, record_key, record_value FROM mmsync.dead_letters
         WHERE retried_at IS NULL AND partition >= 0 ORDER BY id",
    )
    .fetch_all(&mut conn)
    .await
    .map_err(Error::db(name, "reading dead letters"))?;
    let mut report = RetryReport::default();
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
    let mut tx = sqlx::Connection::begin(&mut conn).await.map_err(Error::db(name, "beginning a transaction"))?;
    sqlx::query(APPLIER_SESSION).execute(&mut *tx).await.map_err(Error::db(name, "marking the applier"))?;
    let mut applied_ids: Vec<i64> = Vec::new();
    for (table, entries) in groups {
        let Some(info) = describe(&mut tx, name, &table).await? else {
            report.still_dead.extend(entries.iter().map(|(id, _)| (*id, format!("table {table} does not exist here"))));
            continue;
        };
        let ids: HashMap<(String, i32, i64), i64> =
            entries.iter().map(|(id, r)| ((r.at.topic.clone(), r.at.partition, r.at.offset), *id)).collect();
        let recs: Vec<Rec> = entries.into_iter().map(|(_, r)| r).collect();
        let (_, refused) =
            TableSql::new(info, topology.sync.max_clock_skew).apply_isolated(&mut tx, name, recs).await?;
        let mut refused_ids = std::collections::HashSet::new();
        for d in refused {
            if let Some(id) = ids.get(&(d.at.topic, d.at.partition, d.at.offset)) {
                refused_ids.insert(*id);
                report.still_dead.push((*id, d.reason));
            }
        }
        applied_ids.extend(ids.values().filter(|id| !refused_ids.contains(id)));
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
