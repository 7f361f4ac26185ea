//! The one event that flows from source to sink: a committed row change, and
//! its Kafka form (key, envelope, headers).
//!
//! Values travel as PostgreSQL's own text form of each column (what pgoutput
//! sends, with the canonical session settings of [`crate::postgres::db`]), so every type
//! round-trips exactly: numeric digits, float NaN and infinities, microseconds,
//! arrays, enums and JSON alike. The sink casts them back with the column's type.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::postgres::pgoutput::{format_lsn, parse_lsn, Lsn};
use crate::topology::TableName;

/// Kafka header naming the master where the change was written.
pub const HEADER_ORIGIN: &str = "mmsync-origin";
/// Kafka header with the change's version stamp.
pub const HEADER_VERSION: &str = "mmsync-version";

/// Column name -> text value (`None` is SQL NULL).
pub type Row = BTreeMap<String, Option<String>>;
/// Primary key column name -> text value.
pub type Key = BTreeMap<String, String>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Insert,
    Update,
    Delete,
}

impl Op {
    /// Debezium's letter: c, u, d.
    pub fn letter(self) -> &'static str {
        match self {
            Op::Insert => "c",
            Op::Update => "u",
            Op::Delete => "d",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
        }
    }
}

/// Where and when a change was committed.
#[derive(Debug, Clone, PartialEq)]
pub struct Position {
    /// Master whose log the change was read from.
    pub master: String,
    pub at: LogPosition,
    pub commit_ms: i64,
}

/// Where in its master's log a change was read: each kind of master counts
/// its own way (a MariaDB master will add its GTID here).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LogPosition {
    /// PostgreSQL: the commit's LSN and the transaction's id.
    Postgres { lsn: Lsn, txid: u32 },
    /// MariaDB: the transaction's GTID.
    Mariadb { domain: u32, server: u32, seq: u64 },
    /// Not read from a log: a row `join` copied.
    Copied,
}

impl Position {
    /// A change that was read from no log (a row `join` copied), now.
    pub fn copied_from(master: &str) -> Position {
        Position { master: master.to_string(), at: LogPosition::Copied, commit_ms: crate::metrics::now_ms() }
    }
}

/// A committed row change.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub table: TableName,
    pub op: Op,
    pub key: Key,
    /// The new row for inserts and updates, without mmsync's own columns and
    /// without the columns in `unchanged`; `None` for deletes.
    pub row: Option<Row>,
    /// Columns an update did not touch whose (TOASTed) value pgoutput did
    /// not send. The source reads their values back from its master before
    /// producing ([`crate::postgres::capture`]), so a record carries them only when it
    /// could not: see `superseded`. A target that has the row leaves them as
    /// they are.
    pub unchanged: Vec<String>,
    /// The source no longer had the row when it read back the `unchanged`
    /// values: a newer delete (or key change) of this key was applied there,
    /// and it reaches every master. A target that lacks the row skips this
    /// change instead of guessing the values.
    pub superseded: bool,
    /// Master where this version of the row was written.
    pub origin: String,
    /// Version stamp; for deletes, the tombstone's.
    pub version: i64,
    pub position: Position,
}

/// The format of the envelope this mmsync writes and reads.
///
/// The compatibility rule: a newer mmsync may add fields that an older one
/// can ignore (it applies the change as it understands it, and loses nothing
/// it could have applied), without changing the format; unknown fields are
/// ignored. A change that an older sink must not apply as it understands it
/// raises the format. A sink that reads a format above its own does not
/// apply the record and does not dead-letter it either (it is good, only
/// newer): it stops that link with an error saying to upgrade, and the
/// record waits in Kafka.
pub const ENVELOPE_FORMAT: u32 = 1;

fn format_one() -> u32 {
    1
}

/// The JSON value of a Kafka record, in the shape Debezium users know.
#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    /// Absent in records written before formats were numbered: format 1.
    #[serde(default = "format_one")]
    format: u32,
    op: String,
    before: Option<Row>,
    after: Option<Row>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    unchanged: Vec<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    superseded: bool,
    source: EnvelopeSource,
    origin: String,
    version: i64,
}

#[derive(Debug, Serialize, Deserialize)]
struct EnvelopeSource {
    master: String,
    schema: String,
    table: String,
    lsn: String,
    txid: u32,
    /// A MariaDB master's transaction, `domain-server-sequence` (`lsn` is
    /// then 0/0 and `txid` 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gtid: Option<String>,
    ts_ms: i64,
}

/// Why a record could not be read as a change.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("record has no value")]
    NoValue,
    #[error("record value is not mmsync's JSON envelope: {0}")]
    Envelope(String),
    #[error("record key is not a JSON object of primary key text values: {0}")]
    Key(String),
    #[error("record op {0:?} is not c, u or d")]
    Op(String),
    #[error("record is inconsistent: {0}")]
    Inconsistent(String),
    #[error("record envelope format {0} is newer than this mmsync reads (format {ENVELOPE_FORMAT}): upgrade mmsync")]
    NewerFormat(u32),
}

impl Change {
    /// The Kafka key: the primary key as a JSON object, columns in name order.
    /// About what the change holds in memory: its key's and row's text.
    pub fn text_bytes(&self) -> usize {
        let key: usize = self.key.iter().map(|(k, v)| k.len() + v.len()).sum();
        let row: usize = self.row.iter().flatten().map(|(k, v)| k.len() + v.as_ref().map_or(0, String::len)).sum();
        key + row
    }

    pub fn kafka_key(&self) -> String {
        encode_key(&self.key)
    }

    /// The Kafka value: the JSON envelope.
    pub fn kafka_value(&self) -> Vec<u8> {
        let before =
            (self.op == Op::Delete).then(|| self.key.iter().map(|(k, v)| (k.clone(), Some(v.clone()))).collect());
        let envelope = Envelope {
            format: ENVELOPE_FORMAT,
            op: self.op.letter().to_string(),
            before,
            after: self.row.clone(),
            unchanged: self.unchanged.clone(),
            superseded: self.superseded,
            source: EnvelopeSource {
                master: self.position.master.clone(),
                schema: self.table.schema.clone(),
                table: self.table.name.clone(),
                lsn: match self.position.at {
                    LogPosition::Postgres { lsn, .. } => format_lsn(lsn),
                    LogPosition::Mariadb { .. } | LogPosition::Copied => format_lsn(0),
                },
                txid: match self.position.at {
                    LogPosition::Postgres { txid, .. } => txid,
                    LogPosition::Mariadb { .. } | LogPosition::Copied => 0,
                },
                gtid: match self.position.at {
                    LogPosition::Mariadb { domain, server, seq } => Some(format!("{domain}-{server}-{seq}")),
                    _ => None,
                },
                ts_ms: self.position.commit_ms,
            },
            origin: self.origin.clone(),
            version: self.version,
        };
        serde_json::to_vec(&envelope).expect("an envelope of strings always serializes")
    }

    /// Reads a change back from a record's key and value.
    pub fn decode(key: Option<&[u8]>, value: Option<&[u8]>) -> Result<Change, DecodeError> {
        let value = value.ok_or(DecodeError::NoValue)?;
        let env: Envelope = serde_json::from_slice(value).map_err(|e| DecodeError::Envelope(e.to_string()))?;
        if env.format > ENVELOPE_FORMAT {
            return Err(DecodeError::NewerFormat(env.format));
        }
        let key: Key = serde_json::from_slice(key.unwrap_or_default()).map_err(|e| DecodeError::Key(e.to_string()))?;
        if key.is_empty() {
            return Err(DecodeError::Key("no columns".into()));
        }
        let op = match env.op.as_str() {
            "c" => Op::Insert,
            "u" => Op::Update,
            "d" => Op::Delete,
            other => return Err(DecodeError::Op(other.to_string())),
        };
        match (&env.after, op) {
            (None, Op::Insert | Op::Update) => {
                return Err(DecodeError::Inconsistent("an upsert without \"after\"".into()))
            }
            (Some(_), Op::Delete) => return Err(DecodeError::Inconsistent("a delete with \"after\"".into())),
            (Some(after), _) => {
                for (column, value) in &key {
                    if after.get(column) != Some(&Some(value.clone())) {
                        return Err(DecodeError::Inconsistent(format!("key column {column:?} differs from \"after\"")));
                    }
                }
            }
            (None, Op::Delete) => {}
        }
        let lsn = parse_lsn(&env.source.lsn)
            .ok_or_else(|| DecodeError::Inconsistent(format!("source.lsn {:?} is not an LSN", env.source.lsn)))?;
        let at = match &env.source.gtid {
            None => LogPosition::Postgres { lsn, txid: env.source.txid },
            Some(gtid) => {
                let bad = || DecodeError::Inconsistent(format!("source.gtid {gtid:?} is not a GTID"));
                let parts: Vec<&str> = gtid.split('-').collect();
                let [d, s, n] = parts.as_slice() else { return Err(bad()) };
                LogPosition::Mariadb {
                    domain: d.parse().map_err(|_| bad())?,
                    server: s.parse().map_err(|_| bad())?,
                    seq: n.parse().map_err(|_| bad())?,
                }
            }
        };
        Ok(Change {
            table: TableName { schema: env.source.schema, name: env.source.table },
            op,
            key,
            row: env.after,
            unchanged: env.unchanged,
            superseded: env.superseded,
            origin: env.origin,
            version: env.version,
            position: Position { master: env.source.master, at, commit_ms: env.source.ts_ms },
        })
    }
}

/// The current time as a version stamp counts it: microseconds since the
/// Unix epoch (`mmsync.now_us()` in SQL).
pub fn now_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

/// Why a version stamp is refused: it is further ahead of `now_us` than
/// `allowance`. Such a stamp would win every comparison for that long (near
/// the top of bigint: forever), so it is refused where it enters.
pub fn version_problem(version: i64, now_us: i64, allowance: std::time::Duration) -> Option<String> {
    let allowance_us = i64::try_from(allowance.as_micros()).unwrap_or(i64::MAX);
    let ahead = version.saturating_sub(now_us);
    (ahead > allowance_us).then(|| {
        format!(
            "version {version} is {} s ahead of this host's clock, beyond [sync] max_clock_skew_ms = {}",
            ahead / 1_000_000,
            allowance.as_millis()
        )
    })
}

/// Canonical JSON text of a key: the same key always gives the same bytes,
/// so all changes of one row land in one partition, in order.
pub fn encode_key(key: &Key) -> String {
    serde_json::to_string(key).expect("a map of strings always serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(op: Op) -> Change {
        let key: Key = [("id".to_string(), "7".to_string())].into();
        let row = (op != Op::Delete).then(|| {
            Row::from([
                ("id".to_string(), Some("7".to_string())),
                ("name".to_string(), Some("Ünïcode ✓ \"q\"".to_string())),
                ("note".to_string(), None),
            ])
        });
        Change {
            table: TableName { schema: "public".into(), name: "Order Items".into() },
            op,
            key,
            row,
            unchanged: if op == Op::Update { vec!["blob".into()] } else { vec![] },
            superseded: op == Op::Update,
            origin: "seoul".into(),
            version: 1_700_000_000_000_001,
            position: Position {
                master: "seoul".into(),
                at: LogPosition::Postgres { lsn: 0x016B_3748, txid: 42 },
                commit_ms: 1_700_000_000_000,
            },
        }
    }

    #[test]
    fn round_trips_every_op() {
        for op in [Op::Insert, Op::Update, Op::Delete] {
            let c = sample(op);
            let back = Change::decode(Some(c.kafka_key().as_bytes()), Some(&c.kafka_value())).unwrap();
            assert_eq!(back, c);
        }
    }

    #[test]
    fn envelope_has_debezium_shape() {
        let v: serde_json::Value = serde_json::from_slice(&sample(Op::Update).kafka_value()).unwrap();
        assert_eq!(v["op"], "u");
        assert_eq!(v["after"]["note"], serde_json::Value::Null);
        assert_eq!(v["source"]["lsn"], "0/16B3748");
        assert_eq!(v["source"]["table"], "Order Items");
        assert_eq!(v["unchanged"][0], "blob");
        assert_eq!(v["superseded"], true);
        let insert: serde_json::Value = serde_json::from_slice(&sample(Op::Insert).kafka_value()).unwrap();
        assert!(insert.get("superseded").is_none() && insert.get("unchanged").is_none(), "{insert}");
        assert_eq!(sample(Op::Delete).kafka_key(), r#"{"id":"7"}"#);
    }

    #[test]
    fn a_record_of_the_next_version_is_read_if_its_format_is_ours_and_refused_if_not() {
        let c = sample(Op::Update);
        let mut v: serde_json::Value = serde_json::from_slice(&c.kafka_value()).unwrap();
        assert_eq!(v["format"], ENVELOPE_FORMAT);
        // A field this version does not know, at our format: ignored.
        v["added_later"] = serde_json::json!({"anything": [1, 2]});
        v["source"]["added_later"] = serde_json::json!(true);
        let read = Change::decode(Some(c.kafka_key().as_bytes()), Some(v.to_string().as_bytes())).unwrap();
        assert_eq!(read, c);
        // Records from before formats were numbered are format 1.
        v.as_object_mut().unwrap().remove("format");
        assert_eq!(Change::decode(Some(c.kafka_key().as_bytes()), Some(v.to_string().as_bytes())).unwrap(), c);
        // A newer format: refused as newer, not as a bad record.
        v["format"] = serde_json::json!(ENVELOPE_FORMAT + 1);
        assert_eq!(
            Change::decode(Some(c.kafka_key().as_bytes()), Some(v.to_string().as_bytes())),
            Err(DecodeError::NewerFormat(ENVELOPE_FORMAT + 1))
        );
    }

    #[test]
    fn a_version_is_refused_only_beyond_the_allowed_skew_and_never_overflows() {
        let hour = std::time::Duration::from_secs(3600);
        let now = 1_764_115_200_000_000;
        assert_eq!(version_problem(now, now, hour), None);
        assert_eq!(version_problem(now + 3_600_000_000, now, hour), None);
        assert!(version_problem(now + 3_600_000_001, now, hour).unwrap().contains("3600 s ahead"));
        assert!(version_problem(i64::MAX, now, hour).is_some());
        assert!(version_problem(i64::MAX, i64::MIN, hour).is_some());
        assert_eq!(version_problem(i64::MIN, now, hour), None);
        assert_eq!(version_problem(1, now, std::time::Duration::MAX), None);
    }

    #[test]
    fn bad_records_are_errors() {
        let c = sample(Op::Insert);
        let (k, v) = (c.kafka_key(), c.kafka_value());
        assert_eq!(Change::decode(Some(k.as_bytes()), None), Err(DecodeError::NoValue));
        assert!(matches!(Change::decode(Some(k.as_bytes()), Some(b"not json")), Err(DecodeError::Envelope(_))));
        assert!(matches!(Change::decode(Some(b"[1]"), Some(&v)), Err(DecodeError::Key(_))));
        assert!(matches!(Change::decode(Some(br#"{"id":"8"}"#), Some(&v)), Err(DecodeError::Inconsistent(_))));
        let bad_op = String::from_utf8(v.clone()).unwrap().replace(r#""op":"c""#, r#""op":"x""#);
        assert!(matches!(Change::decode(Some(k.as_bytes()), Some(bad_op.as_bytes())), Err(DecodeError::Op(_))));
    }
}

#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5000))]

        /// Any bytes at all decode to a change or an error, never a panic.
        #[test]
        fn decode_never_panics(key in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)),
                               value in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..512))) {
            let _ = Change::decode(key.as_deref(), value.as_deref());
        }

        /// Envelopes with arbitrary strings in every field.
        #[test]
        fn decode_of_mangled_envelopes_never_panics(op in ".{0,3}", lsn in ".{0,12}", col in ".{0,8}", v in ".{0,8}", version in any::<i64>()) {
            let value = serde_json::json!({
                "op": op, "before": null, "after": {col.clone(): v.clone()},
                "source": {"master": "m", "schema": "s", "table": "t", "lsn": lsn, "txid": 1, "ts_ms": 0},
                "origin": "m", "version": version,
            });
            let key = serde_json::json!({col: v}).to_string();
            let _ = Change::decode(Some(key.as_bytes()), Some(value.to_string().as_bytes()));
        }
    }
}
