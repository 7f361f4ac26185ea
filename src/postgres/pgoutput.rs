//! pgoutput (protocol version 1) messages, as a walsender streams them in
//! XLogData (see [`crate::postgres::replication`]).
//!
//! Format reference: PostgreSQL 15 docs, "Logical Replication Message Formats".
//! All integers are big-endian. Streaming and two-phase messages (protocol
//! versions 2 and 3) are not produced for version 1 and are rejected as unknown.

pub type Lsn = u64;

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Begin {
        final_lsn: Lsn,
        commit_time_us: i64,
        xid: u32,
    },
    Commit {
        flags: u8,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time_us: i64,
    },
    Origin {
        commit_lsn: Lsn,
        name: String,
    },
    Relation(Relation),
    Type {
        oid: u32,
        schema: String,
        name: String,
    },
    Insert {
        relation: u32,
        new: Vec<Value>,
    },
    /// old is Some for 'K' (key columns only, others Null) or 'O' (full old row).
    Update {
        relation: u32,
        old: Option<Vec<Value>>,
        new: Vec<Value>,
    },
    Delete {
        relation: u32,
        old: Vec<Value>,
    },
    Truncate {
        options: u8,
        relations: Vec<u32>,
    },
    /// 'M' logical decoding message (only if messages were requested).
    LogicalMessage {
        flags: u8,
        lsn: Lsn,
        prefix: String,
        content: Vec<u8>,
    },
}

/// Table description; sent before the first change to a relation (and after schema changes).
#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    pub oid: u32,
    /// Empty for pg_catalog.
    pub schema: String,
    pub name: String,
    /// `relreplident`: b'd' default, b'n' nothing, b'f' full, b'i' index.
    pub replica_identity: u8,
    pub columns: Vec<Column>,
}

/// One (non-generated) column of a [`Relation`].
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub is_key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// One column value of a tuple.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    /// 'u': unchanged TOASTed value, not sent
    Unchanged,
    Text(String),
    Binary(Vec<u8>),
}

/// Why a message could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ParseError {
    #[error("pgoutput message truncated while reading {what}")]
    Truncated { what: &'static str },
    #[error("unknown pgoutput message type {}", show_byte(*.0))]
    UnknownMessage(u8),
    #[error("unknown tuple marker {} (expected 'K', 'O' or 'N')", show_byte(*.0))]
    UnknownTupleKind(u8),
    #[error("unknown column value kind {} (expected 'n', 'u', 't' or 'b')", show_byte(*.0))]
    UnknownColumnKind(u8),
    #[error("{what} is not valid UTF-8")]
    InvalidUtf8 { what: &'static str },
    #[error("negative length {len} for {what}")]
    NegativeLength { what: &'static str, len: i32 },
    #[error("{bytes} trailing byte(s) after a complete pgoutput message")]
    Trailing { bytes: usize },
}

/// Renders a tag byte as `'B'` when printable, else as `0x00`.
fn show_byte(b: u8) -> String {
    if b.is_ascii_graphic() {
        format!("'{}'", char::from(b))
    } else {
        format!("0x{b:02X}")
    }
}

/// Decodes one complete pgoutput message.
///
/// # Errors
/// Any malformed, truncated or over-long input; never panics.
pub fn parse(data: &[u8]) -> Result<Message, ParseError> {
    let mut r = Reader { buf: data };
    let msg = match r.u8("message type")? {
        b'B' => Message::Begin {
            final_lsn: r.u64("begin final LSN")?,
            commit_time_us: r.i64("begin commit timestamp")?,
            xid: r.u32("begin xid")?,
        },
        b'C' => Message::Commit {
            flags: r.u8("commit flags")?,
            commit_lsn: r.u64("commit LSN")?,
            end_lsn: r.u64("commit end LSN")?,
            commit_time_us: r.i64("commit timestamp")?,
        },
        b'O' => Message::Origin { commit_lsn: r.u64("origin commit LSN")?, name: r.cstr("origin name")? },
        b'R' => Message::Relation(relation(&mut r)?),
        b'Y' => Message::Type { oid: r.u32("type OID")?, schema: r.cstr("type schema")?, name: r.cstr("type name")? },
        b'I' => {
            let relation = r.u32("insert relation OID")?;
            match r.u8("insert tuple marker")? {
                b'N' => Message::Insert { relation, new: tuple(&mut r)? },
                other => return Err(ParseError::UnknownTupleKind(other)),
            }
        }
        b'U' => {
            let relation = r.u32("update relation OID")?;
            let (old, marker) = match r.u8("update tuple marker")? {
                b'K' | b'O' => (Some(tuple(&mut r)?), r.u8("update new tuple marker")?),
                marker => (None, marker),
            };
            if marker != b'N' {
                return Err(ParseError::UnknownTupleKind(marker));
            }
            Message::Update { relation, old, new: tuple(&mut r)? }
        }
        b'D' => {
            let relation = r.u32("delete relation OID")?;
            match r.u8("delete tuple marker")? {
                b'K' | b'O' => Message::Delete { relation, old: tuple(&mut r)? },
                other => return Err(ParseError::UnknownTupleKind(other)),
            }
        }
        b'T' => {
            let count = r.len("truncate relation count")?;
            let options = r.u8("truncate options")?;
            let relations = (0..count).map(|_| r.u32("truncate relation OID")).collect::<Result<_, _>>()?;
            Message::Truncate { options, relations }
        }
        b'M' => Message::LogicalMessage {
            flags: r.u8("message flags")?,
            lsn: r.u64("message LSN")?,
            prefix: r.cstr("message prefix")?,
            content: r.counted("message content")?.to_vec(),
        },
        other => return Err(ParseError::UnknownMessage(other)),
    };
    r.finish()?;
    Ok(msg)
}

/// Body of an 'R' message (after the tag byte).
fn relation(r: &mut Reader<'_>) -> Result<Relation, ParseError> {
    let oid = r.u32("relation OID")?;
    let schema = r.cstr("relation schema")?;
    let name = r.cstr("relation name")?;
    let replica_identity = r.u8("relation replica identity")?;
    let count = r.u16("relation column count")?;
    let columns = (0..count)
        .map(|_| {
            Ok(Column {
                is_key: r.u8("column flags")? & 1 != 0,
                name: r.cstr("column name")?,
                type_oid: r.u32("column type OID")?,
                type_modifier: r.i32("column type modifier")?,
            })
        })
        .collect::<Result<_, ParseError>>()?;
    Ok(Relation { oid, schema, name, replica_identity, columns })
}

/// TupleData: Int16 column count, then one kind byte (plus payload) per column.
fn tuple(r: &mut Reader<'_>) -> Result<Vec<Value>, ParseError> {
    let count = r.u16("tuple column count")?;
    (0..count)
        .map(|_| match r.u8("column value kind")? {
            b'n' => Ok(Value::Null),
            b'u' => Ok(Value::Unchanged),
            b't' => {
                let bytes = r.counted("text column value")?;
                std::str::from_utf8(bytes)
                    .map(|s| Value::Text(s.to_owned()))
                    .map_err(|_| ParseError::InvalidUtf8 { what: "text column value" })
            }
            b'b' => Ok(Value::Binary(r.counted("binary column value")?.to_vec())),
            other => Err(ParseError::UnknownColumnKind(other)),
        })
        .collect()
}

/// Big-endian reader over the unread rest of a message.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ParseError> {
        let (head, rest) = self.buf.split_at_checked(n).ok_or(ParseError::Truncated { what })?;
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], ParseError> {
        let (head, rest) = self.buf.split_first_chunk::<N>().ok_or(ParseError::Truncated { what })?;
        self.buf = rest;
        Ok(*head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, ParseError> {
        self.array::<1>(what).map(|[b]| b)
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, ParseError> {
        self.array(what).map(u16::from_be_bytes)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, ParseError> {
        self.array(what).map(u32::from_be_bytes)
    }

    fn i32(&mut self, what: &'static str) -> Result<i32, ParseError> {
        self.array(what).map(i32::from_be_bytes)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, ParseError> {
        self.array(what).map(u64::from_be_bytes)
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, ParseError> {
        self.array(what).map(i64::from_be_bytes)
    }

    /// Int32 count or length; negative values are rejected.
    fn len(&mut self, what: &'static str) -> Result<usize, ParseError> {
        let len = self.i32(what)?;
        usize::try_from(len).map_err(|_| ParseError::NegativeLength { what, len })
    }

    /// Int32 length followed by that many bytes.
    fn counted(&mut self, what: &'static str) -> Result<&'a [u8], ParseError> {
        let len = self.len(what)?;
        self.take(len, what)
    }

    /// NUL-terminated UTF-8 string.
    fn cstr(&mut self, what: &'static str) -> Result<String, ParseError> {
        let nul = self.buf.iter().position(|&b| b == 0).ok_or(ParseError::Truncated { what })?;
        let bytes = self.take(nul, what)?;
        self.take(1, what)?;
        std::str::from_utf8(bytes).map(str::to_owned).map_err(|_| ParseError::InvalidUtf8 { what })
    }

    fn finish(self) -> Result<(), ParseError> {
        match self.buf.len() {
            0 => Ok(()),
            bytes => Err(ParseError::Trailing { bytes }),
        }
    }
}

/// Milliseconds between 1970-01-01 and 2000-01-01.
const PG_EPOCH_UNIX_MS: i64 = 946_684_800_000;

/// Microseconds since 2000-01-01 (PostgreSQL epoch) -> milliseconds since 1970-01-01.
pub fn pg_time_to_unix_ms(us: i64) -> i64 {
    // Cannot actually saturate: |us / 1000| <= 9.3e15 and the offset is ~9.5e11.
    us.div_euclid(1000).saturating_add(PG_EPOCH_UNIX_MS)
}

/// Formats an LSN the way PostgreSQL prints it, e.g. "0/16B3748" (upper-case hex, no padding).
pub fn format_lsn(lsn: Lsn) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Parses "0/16B3748" into an LSN.
pub fn parse_lsn(s: &str) -> Option<Lsn> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from(lsn_half(hi)?) << 32) | u64::from(lsn_half(lo)?))
}

/// One side of an LSN: 1 to 8 hex digits, as accepted by PostgreSQL's `pg_lsn_in`.
fn lsn_half(part: &str) -> Option<u32> {
    if !(1..=8).contains(&part.len()) || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(part, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Test-only big-endian message builder.
    #[derive(Default)]
    struct Buf(Vec<u8>);

    impl Buf {
        fn tag(c: u8) -> Self {
            Buf(vec![c])
        }
        fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        fn bytes(mut self, v: &[u8]) -> Self {
            self.0.extend_from_slice(v);
            self
        }
        fn u16(self, v: u16) -> Self {
            self.bytes(&v.to_be_bytes())
        }
        fn u32(self, v: u32) -> Self {
            self.bytes(&v.to_be_bytes())
        }
        fn i32(self, v: i32) -> Self {
            self.bytes(&v.to_be_bytes())
        }
        fn u64(self, v: u64) -> Self {
            self.bytes(&v.to_be_bytes())
        }
        fn i64(self, v: i64) -> Self {
            self.bytes(&v.to_be_bytes())
        }
        fn cstr(self, s: &str) -> Self {
            self.bytes(s.as_bytes()).u8(0)
        }
        fn counted(self, v: &[u8]) -> Self {
            let len = i32::try_from(v.len()).expect("test data fits in i32");
            self.i32(len).bytes(v)
        }
        fn tuple(self, values: &[Value]) -> Self {
            let count = u16::try_from(values.len()).expect("test tuple fits in u16");
            values.iter().fold(self.u16(count), |b, v| match v {
                Value::Null => b.u8(b'n'),
                Value::Unchanged => b.u8(b'u'),
                Value::Text(s) => b.u8(b't').counted(s.as_bytes()),
                Value::Binary(d) => b.u8(b'b').counted(d),
            })
        }
    }

    /// Test-only encoder, the inverse of `parse`.
    fn encode(msg: &Message) -> Vec<u8> {
        let b = match msg {
            Message::Begin { final_lsn, commit_time_us, xid } => {
                Buf::tag(b'B').u64(*final_lsn).i64(*commit_time_us).u32(*xid)
            }
            Message::Commit { flags, commit_lsn, end_lsn, commit_time_us } => {
                Buf::tag(b'C').u8(*flags).u64(*commit_lsn).u64(*end_lsn).i64(*commit_time_us)
            }
            Message::Origin { commit_lsn, name } => Buf::tag(b'O').u64(*commit_lsn).cstr(name),
            Message::Relation(rel) => {
                let count = u16::try_from(rel.columns.len()).expect("test relation fits in u16");
                let head =
                    Buf::tag(b'R').u32(rel.oid).cstr(&rel.schema).cstr(&rel.name).u8(rel.replica_identity).u16(count);
                rel.columns
                    .iter()
                    .fold(head, |b, c| b.u8(u8::from(c.is_key)).cstr(&c.name).u32(c.type_oid).i32(c.type_modifier))
            }
            Message::Type { oid, schema, name } => Buf::tag(b'Y').u32(*oid).cstr(schema).cstr(name),
            Message::Insert { relation, new } => Buf::tag(b'I').u32(*relation).u8(b'N').tuple(new),
            Message::Update { relation, old, new } => {
                let b = Buf::tag(b'U').u32(*relation);
                let b = match old {
                    Some(old) => b.u8(b'O').tuple(old),
                    None => b,
                };
                b.u8(b'N').tuple(new)
            }
            Message::Delete { relation, old } => Buf::tag(b'D').u32(*relation).u8(b'K').tuple(old),
            Message::Truncate { options, relations } => {
                let count = i32::try_from(relations.len()).expect("test data fits in i32");
                relations.iter().fold(Buf::tag(b'T').i32(count).u8(*options), |b, r| b.u32(*r))
            }
            Message::LogicalMessage { flags, lsn, prefix, content } => {
                Buf::tag(b'M').u8(*flags).u64(*lsn).cstr(prefix).counted(content)
            }
        };
        b.0
    }

    fn text(s: &str) -> Value {
        Value::Text(s.to_owned())
    }

    fn users_relation() -> Relation {
        Relation {
            oid: 16385,
            schema: "public".into(),
            name: "users".into(),
            replica_identity: b'd',
            columns: vec![
                Column { is_key: true, name: "id".into(), type_oid: 23, type_modifier: -1 },
                Column { is_key: false, name: "name".into(), type_oid: 1043, type_modifier: 68 },
            ],
        }
    }

    /// One valid sample of every message kind.
    fn samples() -> Vec<Message> {
        vec![
            Message::Begin { final_lsn: 0x16B_3748, commit_time_us: 700_000_000_123_456, xid: 735 },
            Message::Commit {
                flags: 0,
                commit_lsn: 0x16B_3748,
                end_lsn: 0x16B_3778,
                commit_time_us: 700_000_000_123_456,
            },
            Message::Origin { commit_lsn: 0x1_0000_0010, name: "pg_16390".into() },
            Message::Relation(users_relation()),
            Message::Type { oid: 16400, schema: "public".into(), name: "mood".into() },
            Message::Insert { relation: 16385, new: vec![text("1"), text("ünï")] },
            Message::Update {
                relation: 16385,
                old: Some(vec![text("1"), Value::Null]),
                new: vec![text("1"), Value::Unchanged],
            },
            Message::Update { relation: 16385, old: None, new: vec![text("2"), Value::Null] },
            Message::Delete { relation: 16385, old: vec![text("1"), Value::Null] },
            Message::Truncate { options: 3, relations: vec![16385, 16390] },
            Message::LogicalMessage { flags: 1, lsn: 0x2A, prefix: "mmsync".into(), content: vec![0, 1, 2, 255] },
            Message::Insert { relation: 7, new: vec![Value::Binary(vec![0, 0, 0, 42])] },
        ]
    }

    #[test]
    fn begin_literal_bytes() {
        let data = b"B\x00\x00\x00\x00\x01\x6B\x37\x48\x00\x02\x7C\xA5\x7F\xCA\x68\x40\x00\x00\x02\xDF";
        let msg = parse(data).unwrap();
        assert_eq!(msg, Message::Begin { final_lsn: 0x16B_3748, commit_time_us: 0x0002_7CA5_7FCA_6840, xid: 735 });
    }

    #[test]
    fn begin_and_commit() {
        let begin = Buf::tag(b'B').u64(0x16B_3748).i64(-5).u32(u32::MAX).0;
        assert_eq!(parse(&begin).unwrap(), Message::Begin { final_lsn: 0x16B_3748, commit_time_us: -5, xid: u32::MAX });
        let commit = Buf::tag(b'C').u8(0).u64(10).u64(20).i64(30).0;
        assert_eq!(
            parse(&commit).unwrap(),
            Message::Commit { flags: 0, commit_lsn: 10, end_lsn: 20, commit_time_us: 30 }
        );
    }

    #[test]
    fn origin() {
        let data = Buf::tag(b'O').u64(99).cstr("node_a").0;
        assert_eq!(parse(&data).unwrap(), Message::Origin { commit_lsn: 99, name: "node_a".into() });
    }

    #[test]
    fn relation_with_key_and_non_key_columns() {
        let data = Buf::tag(b'R')
            .u32(16385)
            .cstr("public")
            .cstr("users")
            .u8(b'd')
            .u16(2)
            .u8(1)
            .cstr("id")
            .u32(23)
            .i32(-1)
            .u8(0)
            .cstr("name")
            .u32(1043)
            .i32(68)
            .0;
        assert_eq!(parse(&data).unwrap(), Message::Relation(users_relation()));
    }

    #[test]
    fn relation_in_pg_catalog_has_empty_schema_and_no_columns() {
        let data = Buf::tag(b'R').u32(1).cstr("").cstr("t").u8(b'n').u16(0).0;
        let Message::Relation(rel) = parse(&data).unwrap() else { panic!("not a relation") };
        assert_eq!((rel.schema.as_str(), rel.replica_identity, rel.columns.len()), ("", b'n', 0));
    }

    #[test]
    fn type_message() {
        let data = Buf::tag(b'Y').u32(16400).cstr("public").cstr("mood").0;
        assert_eq!(parse(&data).unwrap(), Message::Type { oid: 16400, schema: "public".into(), name: "mood".into() });
    }

    #[test]
    fn insert_with_every_value_kind() {
        let data = Buf::tag(b'I')
            .u32(5)
            .u8(b'N')
            .u16(5)
            .u8(b'n')
            .u8(b'u')
            .u8(b't')
            .counted(b"hello")
            .u8(b't')
            .counted(b"")
            .u8(b'b')
            .counted(&[0xFF, 0x00])
            .0;
        assert_eq!(
            parse(&data).unwrap(),
            Message::Insert {
                relation: 5,
                new: vec![Value::Null, Value::Unchanged, text("hello"), text(""), Value::Binary(vec![0xFF, 0x00]),],
            }
        );
    }

    #[test]
    fn update_with_key_old_full_old_and_no_old() {
        let new = [text("1"), Value::Unchanged];
        let key = [text("1"), Value::Null];
        let with_key = Buf::tag(b'U').u32(5).u8(b'K').tuple(&key).u8(b'N').tuple(&new).0;
        assert_eq!(
            parse(&with_key).unwrap(),
            Message::Update { relation: 5, old: Some(key.to_vec()), new: new.to_vec() }
        );
        let full = [text("1"), text("old")];
        let with_full = Buf::tag(b'U').u32(5).u8(b'O').tuple(&full).u8(b'N').tuple(&new).0;
        assert_eq!(
            parse(&with_full).unwrap(),
            Message::Update { relation: 5, old: Some(full.to_vec()), new: new.to_vec() }
        );
        let plain = Buf::tag(b'U').u32(5).u8(b'N').tuple(&new).0;
        assert_eq!(parse(&plain).unwrap(), Message::Update { relation: 5, old: None, new: new.to_vec() });
    }

    #[test]
    fn delete_with_key_and_full_old() {
        for marker in [b'K', b'O'] {
            let data = Buf::tag(b'D').u32(9).u8(marker).tuple(&[text("7")]).0;
            assert_eq!(parse(&data).unwrap(), Message::Delete { relation: 9, old: vec![text("7")] });
        }
    }

    #[test]
    fn truncate() {
        let data = Buf::tag(b'T').i32(2).u8(1).u32(100).u32(200).0;
        assert_eq!(parse(&data).unwrap(), Message::Truncate { options: 1, relations: vec![100, 200] });
    }

    #[test]
    fn logical_message() {
        let data = Buf::tag(b'M').u8(1).u64(77).cstr("pfx").counted(b"\x00\xFFraw").0;
        assert_eq!(
            parse(&data).unwrap(),
            Message::LogicalMessage { flags: 1, lsn: 77, prefix: "pfx".into(), content: b"\x00\xFFraw".to_vec() }
        );
    }

    #[test]
    fn samples_round_trip_through_encoder() {
        for msg in samples() {
            assert_eq!(parse(&encode(&msg)), Ok(msg));
        }
    }

    #[test]
    fn every_strict_prefix_is_truncated() {
        for msg in samples() {
            let data = encode(&msg);
            for cut in 0..data.len() {
                let err = parse(&data[..cut]).unwrap_err();
                assert!(matches!(err, ParseError::Truncated { .. }), "{msg:?} cut at {cut}: {err:?}");
            }
        }
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        for msg in samples() {
            let mut data = encode(&msg);
            data.extend_from_slice(&[0, 0]);
            assert_eq!(parse(&data), Err(ParseError::Trailing { bytes: 2 }));
        }
    }

    #[test]
    fn empty_input() {
        assert_eq!(parse(&[]), Err(ParseError::Truncated { what: "message type" }));
    }

    #[test]
    fn unknown_tags() {
        // 'S' (stream start) and 'P' (prepare) only exist in protocol versions 2 and 3.
        for tag in [b'S', b'P', b'x', 0] {
            assert_eq!(parse(&[tag, 0, 0, 0, 0]), Err(ParseError::UnknownMessage(tag)));
        }
        let insert_old = Buf::tag(b'I').u32(1).u8(b'K').tuple(&[]).0;
        assert_eq!(parse(&insert_old), Err(ParseError::UnknownTupleKind(b'K')));
        let update_bad = Buf::tag(b'U').u32(1).u8(b'X').0;
        assert_eq!(parse(&update_bad), Err(ParseError::UnknownTupleKind(b'X')));
        let update_no_new = Buf::tag(b'U').u32(1).u8(b'K').tuple(&[]).u8(b'K').tuple(&[]).0;
        assert_eq!(parse(&update_no_new), Err(ParseError::UnknownTupleKind(b'K')));
        let delete_new = Buf::tag(b'D').u32(1).u8(b'N').tuple(&[]).0;
        assert_eq!(parse(&delete_new), Err(ParseError::UnknownTupleKind(b'N')));
        let bad_column = Buf::tag(b'I').u32(1).u8(b'N').u16(1).u8(b'z').0;
        assert_eq!(parse(&bad_column), Err(ParseError::UnknownColumnKind(b'z')));
    }

    #[test]
    fn invalid_utf8() {
        let value = Buf::tag(b'I').u32(1).u8(b'N').u16(1).u8(b't').counted(&[0xC3, 0x28]).0;
        assert_eq!(parse(&value), Err(ParseError::InvalidUtf8 { what: "text column value" }));
        let name = Buf::tag(b'R').u32(1).cstr("public").bytes(&[0xFF, 0]).u8(b'd').u16(0).0;
        assert_eq!(parse(&name), Err(ParseError::InvalidUtf8 { what: "relation name" }));
        let origin = Buf::tag(b'O').u64(1).bytes(&[0x80, 0]).0;
        assert_eq!(parse(&origin), Err(ParseError::InvalidUtf8 { what: "origin name" }));
        // Binary values and logical message content are raw bytes.
        let binary = Buf::tag(b'I').u32(1).u8(b'N').tuple(&[Value::Binary(vec![0xFF])]).0;
        assert!(parse(&binary).is_ok());
    }

    #[test]
    fn missing_nul_terminator_is_truncated() {
        let data = Buf::tag(b'Y').u32(1).cstr("public").bytes(b"mood").0;
        assert_eq!(parse(&data), Err(ParseError::Truncated { what: "type name" }));
    }

    #[test]
    fn negative_and_oversized_lengths() {
        let negative = Buf::tag(b'I').u32(1).u8(b'N').u16(1).u8(b't').i32(-1).0;
        assert_eq!(parse(&negative), Err(ParseError::NegativeLength { what: "text column value", len: -1 }));
        let huge = Buf::tag(b'I').u32(1).u8(b'N').u16(1).u8(b'b').i32(i32::MAX).bytes(b"ab").0;
        assert_eq!(parse(&huge), Err(ParseError::Truncated { what: "binary column value" }));
        let truncate = Buf::tag(b'T').i32(i32::MIN).u8(0).0;
        assert_eq!(
            parse(&truncate),
            Err(ParseError::NegativeLength { what: "truncate relation count", len: i32::MIN })
        );
        let many = Buf::tag(b'T').i32(i32::MAX).u8(0).u32(1).0;
        assert_eq!(parse(&many), Err(ParseError::Truncated { what: "truncate relation OID" }));
        let content = Buf::tag(b'M').u8(0).u64(1).cstr("p").i32(-7).0;
        assert_eq!(parse(&content), Err(ParseError::NegativeLength { what: "message content", len: -7 }));
    }

    #[test]
    fn error_messages_are_readable() {
        assert_eq!(ParseError::UnknownMessage(b'S').to_string(), "unknown pgoutput message type 'S'");
        assert_eq!(ParseError::UnknownMessage(0).to_string(), "unknown pgoutput message type 0x00");
        assert_eq!(
            ParseError::Truncated { what: "begin xid" }.to_string(),
            "pgoutput message truncated while reading begin xid"
        );
        assert_eq!(
            ParseError::Trailing { bytes: 3 }.to_string(),
            "3 trailing byte(s) after a complete pgoutput message"
        );
    }

    #[test]
    fn pg_time_conversion() {
        assert_eq!(pg_time_to_unix_ms(0), 946_684_800_000);
        assert_eq!(pg_time_to_unix_ms(1_999), 946_684_800_001);
        // Rounds towards the past, also before 2000.
        assert_eq!(pg_time_to_unix_ms(-1), 946_684_799_999);
        assert_eq!(pg_time_to_unix_ms(-946_684_800_000_000), 0);
        // 2024-01-01T00:00:00Z
        assert_eq!(pg_time_to_unix_ms(757_382_400_000_000), 1_704_067_200_000);
        // Extremes (PostgreSQL's +/-infinity) do not overflow.
        assert!(pg_time_to_unix_ms(i64::MAX) > 0);
        assert!(pg_time_to_unix_ms(i64::MIN) < 0);
    }

    #[test]
    fn lsn_format_and_parse() {
        assert_eq!(format_lsn(0x16B_3748), "0/16B3748");
        assert_eq!(format_lsn(0), "0/0");
        assert_eq!(format_lsn(0x1_0000_00AB), "1/AB");
        assert_eq!(format_lsn(u64::MAX), "FFFFFFFF/FFFFFFFF");
        assert_eq!(parse_lsn("0/16B3748"), Some(0x16B_3748));
        assert_eq!(parse_lsn("0/16b3748"), Some(0x16B_3748));
        assert_eq!(parse_lsn("00000001/000000AB"), Some(0x1_0000_00AB));
        assert_eq!(parse_lsn("FFFFFFFF/FFFFFFFF"), Some(u64::MAX));
        for bad in ["", "/", "0/", "/0", "0", "0/0/0", "+1/0", "0/-1", "G/0", " 0/0", "0/0 ", "1FFFFFFFF/0"] {
            assert_eq!(parse_lsn(bad), None, "{bad:?}");
        }
    }

    const TAGS: &[u8] = b"BCORYIUDTM";

    fn no_nul() -> impl Strategy<Value = String> {
        any::<String>().prop_map(|s| s.replace('\0', ""))
    }

    fn values() -> impl Strategy<Value = Vec<Value>> {
        let value = prop_oneof![
            Just(Value::Null),
            Just(Value::Unchanged),
            any::<String>().prop_map(Value::Text),
            proptest::collection::vec(any::<u8>(), 0..8).prop_map(Value::Binary),
        ];
        proptest::collection::vec(value, 0..6)
    }

    fn messages() -> impl Strategy<Value = Message> {
        let column = (any::<bool>(), no_nul(), any::<u32>(), any::<i32>())
            .prop_map(|(is_key, name, type_oid, type_modifier)| Column { is_key, name, type_oid, type_modifier });
        let relation = (any::<u32>(), no_nul(), no_nul(), any::<u8>(), proptest::collection::vec(column, 0..5))
            .prop_map(|(oid, schema, name, replica_identity, columns)| Relation {
                oid,
                schema,
                name,
                replica_identity,
                columns,
            });
        prop_oneof![
            (any::<u64>(), any::<i64>(), any::<u32>()).prop_map(|(final_lsn, commit_time_us, xid)| Message::Begin {
                final_lsn,
                commit_time_us,
                xid
            }),
            (any::<u8>(), any::<u64>(), any::<u64>(), any::<i64>()).prop_map(
                |(flags, commit_lsn, end_lsn, commit_time_us)| Message::Commit {
                    flags,
                    commit_lsn,
                    end_lsn,
                    commit_time_us
                }
            ),
            (any::<u64>(), no_nul()).prop_map(|(commit_lsn, name)| Message::Origin { commit_lsn, name }),
            relation.prop_map(Message::Relation),
            (any::<u32>(), no_nul(), no_nul()).prop_map(|(oid, schema, name)| Message::Type { oid, schema, name }),
            (any::<u32>(), values()).prop_map(|(relation, new)| Message::Insert { relation, new }),
            (any::<u32>(), proptest::option::of(values()), values()).prop_map(|(relation, old, new)| Message::Update {
                relation,
                old,
                new
            }),
            (any::<u32>(), values()).prop_map(|(relation, old)| Message::Delete { relation, old }),
            (any::<u8>(), proptest::collection::vec(any::<u32>(), 0..6))
                .prop_map(|(options, relations)| Message::Truncate { options, relations }),
            (any::<u8>(), any::<u64>(), no_nul(), proptest::collection::vec(any::<u8>(), 0..16))
                .prop_map(|(flags, lsn, prefix, content)| Message::LogicalMessage { flags, lsn, prefix, content }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5_000))]

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse(&data);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(10_000))]

        #[test]
        fn tagged_bytes_never_panic(
            tag in proptest::sample::select(TAGS),
            rest in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let mut data = vec![tag];
            data.extend(rest);
            let _ = parse(&data);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        #[test]
        fn encoded_messages_round_trip(msg in messages()) {
            prop_assert_eq!(parse(&encode(&msg)), Ok(msg));
        }

        #[test]
        fn corrupted_messages_never_panic(
            msg in messages(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut data = encode(&msg);
            for (at, byte) in edits {
                let i = at.index(data.len());
                data[i] = byte;
            }
            data.truncate(cut.index(data.len() + 1));
            let _ = parse(&data);
        }

        #[test]
        fn lsn_text_round_trip(lsn in any::<u64>()) {
            prop_assert_eq!(parse_lsn(&format_lsn(lsn)), Some(lsn));
        }
    }
}
