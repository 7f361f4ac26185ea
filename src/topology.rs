//! `topology.toml`: which masters, which tables, which Kafka. Parsed with serde
//! (`deny_unknown_fields`, so a typo is an error) and validated once, before
//! anything connects. Every problem is reported with its line and key path.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// Default file name, looked up in the working directory.
pub const DEFAULT_PATH: &str = "topology.toml";

/// Name of the column that holds the master where a row's current version was written.
pub const ORIGIN_COLUMN: &str = "mmsync_origin";
/// Name of the column that holds a row's version stamp.
pub const VERSION_COLUMN: &str = "mmsync_version";

// ---------------------------------------------------------------------------
// The file as written.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    kafka: KafkaFile,
    #[serde(default)]
    metrics: MetricsFile,
    #[serde(default)]
    masters: Vec<MasterFile>,
    sync: SyncFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KafkaFile {
    brokers: Spanned<String>,
    #[serde(default = "default_topic_prefix")]
    topic_prefix: Spanned<String>,
    #[serde(default = "default_partitions")]
    partitions: Spanned<i32>,
    #[serde(default = "default_replication_factor")]
    replication_factor: Spanned<i32>,
    #[serde(default)]
    client: BTreeMap<String, toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsFile {
    #[serde(default = "default_metrics_listen")]
    listen: Spanned<String>,
}

impl Default for MetricsFile {
    fn default() -> Self {
        MetricsFile { listen: default_metrics_listen() }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MasterFile {
    name: Spanned<String>,
    url: Option<Spanned<String>>,
    url_env: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SyncFile {
    tables: Spanned<Vec<Spanned<String>>>,
    #[serde(default = "default_batch_max_changes")]
    batch_max_changes: Spanned<i64>,
    #[serde(default = "default_batch_max_wait_ms")]
    batch_max_wait_ms: Spanned<i64>,
    #[serde(default = "default_batch_max_bytes")]
    batch_max_bytes: Spanned<i64>,
    #[serde(default = "default_read_ahead_max_bytes")]
    read_ahead_max_bytes: Spanned<i64>,
    #[serde(default = "default_capture_max_changes")]
    capture_max_changes: Spanned<i64>,
    #[serde(default = "default_capture_max_bytes")]
    capture_max_bytes: Spanned<i64>,
    /// Unset: [`DEFAULT_APPLY_WORKERS`], or fewer when there are fewer partitions.
    #[serde(default)]
    apply_workers: Option<Spanned<i64>>,
    #[serde(default = "default_heartbeat_interval_ms")]
    heartbeat_interval_ms: Spanned<i64>,
    #[serde(default = "default_max_clock_skew_ms")]
    max_clock_skew_ms: Spanned<i64>,
    #[serde(default = "default_keep_days")]
    conflicts_keep_days: Spanned<i64>,
    #[serde(default = "default_keep_days")]
    dead_letters_keep_days: Spanned<i64>,
    #[serde(default = "default_dead_letters_max_per_topic")]
    dead_letters_max_per_topic: Spanned<i64>,
    #[serde(default = "default_tombstones_keep_seconds")]
    tombstones_keep_seconds: Spanned<i64>,
}

fn unspanned<T>(v: T) -> Spanned<T> {
    Spanned::new(0..0, v)
}
fn default_topic_prefix() -> Spanned<String> {
    unspanned("mmsync".into())
}
fn default_partitions() -> Spanned<i32> {
    unspanned(6)
}
fn default_replication_factor() -> Spanned<i32> {
    unspanned(1)
}
fn default_metrics_listen() -> Spanned<String> {
    unspanned("127.0.0.1:9464".into())
}
fn default_batch_max_changes() -> Spanned<i64> {
    unspanned(1000)
}
fn default_batch_max_wait_ms() -> Spanned<i64> {
    unspanned(5)
}
/// Sinks per (master, table) when the file does not say: at most this many,
/// and never more than `kafka.partitions`.
pub const DEFAULT_APPLY_WORKERS: i64 = 2;
fn default_batch_max_bytes() -> Spanned<i64> {
    unspanned(4 * 1024 * 1024)
}
/// A sink reads ahead at least this much, however many sinks share
/// `read_ahead_max_bytes`: below it, fetches get too small to keep up.
pub const MIN_SINK_READ_AHEAD: usize = 1 << 20;
fn default_read_ahead_max_bytes() -> Spanned<i64> {
    unspanned(32 * 1024 * 1024)
}
fn default_capture_max_bytes() -> Spanned<i64> {
    unspanned(16 * 1024 * 1024)
}
fn default_capture_max_changes() -> Spanned<i64> {
    unspanned(10_000)
}
fn default_heartbeat_interval_ms() -> Spanned<i64> {
    unspanned(1000)
}
/// One hour: far more than NTP-kept clocks drift, far less than forever.
pub const DEFAULT_MAX_CLOCK_SKEW_MS: i64 = 3_600_000;
fn default_max_clock_skew_ms() -> Spanned<i64> {
    unspanned(DEFAULT_MAX_CLOCK_SKEW_MS)
}
fn default_keep_days() -> Spanned<i64> {
    unspanned(30)
}
fn default_dead_letters_max_per_topic() -> Spanned<i64> {
    unspanned(10_000)
}
/// Seven days: far longer than any transaction stays open.
fn default_tombstones_keep_seconds() -> Spanned<i64> {
    unspanned(7 * 86_400)
}

// ---------------------------------------------------------------------------
// The validated topology the rest of mmsync works with.

/// A validated topology.
#[derive(Debug, Clone)]
pub struct Topology {
    pub kafka: Kafka,
    pub metrics_listen: SocketAddr,
    pub masters: Vec<Master>,
    pub tables: Vec<TableName>,
    pub sync: SyncSettings,
}

#[derive(Debug, Clone)]
pub struct Kafka {
    pub brokers: String,
    pub topic_prefix: String,
    pub partitions: i32,
    pub replication_factor: i32,
    /// librdkafka properties passed through as they are.
    pub client: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct Master {
    pub name: String,
    pub url: DbUrl,
}

/// The kind of database a master is, from its URL's scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Database {
    Postgres,
    Mariadb,
}

impl Database {
    pub fn of_url(url: &str) -> Option<Database> {
        let scheme = url.split("://").next().unwrap_or_default().to_ascii_lowercase();
        match scheme.as_str() {
            "postgres" | "postgresql" if url.contains("://") => Some(Database::Postgres),
            "mariadb" | "mysql" if url.contains("://") => Some(Database::Mariadb),
            _ => None,
        }
    }
}

impl Master {
    /// PostgreSQL or MariaDB (validation refused every other URL).
    pub fn database(&self) -> Database {
        Database::of_url(self.url.expose()).unwrap_or(Database::Postgres)
    }

    /// Refuses a command that works on PostgreSQL masters only.
    pub fn postgres_only(&self, command: &str) -> crate::error::Result<()> {
        match self.database() {
            Database::Postgres => Ok(()),
            Database::Mariadb => Err(crate::error::Error::Setup {
                master: self.name.clone(),
                problem: format!("`mmsync {command}` works on PostgreSQL masters only so far, and this is a MariaDB master"),
                fix: "leave this master out of the command; see the README's MariaDB section for what MariaDB masters do today".into(),
            }),
        }
    }
}

/// Batching and polling settings, all with defaults.
#[derive(Debug, Clone)]
pub struct SyncSettings {
    /// A sink applies at most this many changes per transaction.
    pub batch_max_changes: usize,
    /// A sink waits at most this long for a batch to fill.
    pub batch_max_wait: Duration,
    /// Nor more than this many bytes of records (the one that crosses it
    /// ends the batch): with `batch_max_changes`, what bounds a sink's memory
    /// whatever the rows' size.
    pub batch_max_bytes: usize,
    /// What all sinks of one `mmsync run` read ahead from Kafka, together
    /// (split evenly: [`Topology::sink_read_ahead_bytes`]).
    pub read_ahead_max_bytes: usize,
    /// A source produces at most this many changes before it waits for Kafka to acknowledge them.
    pub capture_max_changes: usize,
    /// Nor more than this many bytes of values (PostgreSQL masters; a
    /// MariaDB source holds one whole transaction).
    pub capture_max_bytes: usize,
    /// Sinks per (master, table), each applying its share of the partitions
    /// on its own connection: a key's changes stay in one partition, so
    /// they stay in order.
    pub apply_workers: usize,
    /// Each source rewrites its master's heartbeat row this often.
    pub heartbeat_interval: Duration,
    /// How far ahead of the clock a version stamp may be. A version beyond
    /// it is refused where it enters (the source keeps it as a dead letter
    /// on its own master, a sink as a dead letter on the target), and a
    /// local write never stamps beyond it: a forged version near the top of
    /// bigint can neither win forever nor make `next_version` overflow.
    pub max_clock_skew: Duration,
    /// Rows of `mmsync.conflicts` older than this are deleted.
    pub conflicts_keep: Duration,
    /// Dead letters retried (applied) longer ago than this are deleted;
    /// pending ones are kept until someone deals with them.
    pub dead_letters_keep: Duration,
    /// A sink adds no more pending dead letters of one topic than this: past
    /// it, that link stops with an error (the records wait in Kafka), so a
    /// forged or broken stream cannot fill a target's disk.
    pub dead_letters_max_per_topic: i64,
    /// A tombstone goes once its version is this much older than what every
    /// other master can still send (see [`crate::tombstones`]).
    pub tombstones_keep: Duration,
}

/// A synced table, `schema.name`, as PostgreSQL spells it (case kept).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    /// Parses `schema.table` with SQL identifier rules: bare parts fold to lower
    /// case, `"Quoted"` parts are kept as written; a missing schema is `public`.
    pub fn parse(s: &str) -> Result<TableName, String> {
        let parts = split_identifier(s)?;
        match parts.as_slice() {
            [name] => Ok(TableName { schema: "public".into(), name: name.clone() }),
            [schema, name] => Ok(TableName { schema: schema.clone(), name: name.clone() }),
            _ => Err(format!("{s:?} has {} dotted parts; write schema.table", parts.len())),
        }
    }

    /// mmsync's heartbeat table, synced like the application's tables.
    pub fn heartbeats() -> TableName {
        TableName { schema: "mmsync".into(), name: "heartbeats".into() }
    }

    /// The name quoted for SQL: `"schema"."name"`.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// Quotes an identifier for SQL, doubling embedded quotes.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quotes a string literal for SQL (for DDL, where bind parameters cannot
/// go), as PostgreSQL's own `quote_literal` does: a string with a backslash
/// becomes an `E'...'` literal with the backslash doubled, which reads the
/// same whatever `standard_conforming_strings` says. Trigger functions run
/// in the application's sessions, and a database or role may default it to
/// off, where a backslash in a plain literal escapes the next character.
pub fn quote_literal(s: &str) -> String {
    let quoted = s.replace('\'', "''");
    if s.contains('\\') {
        format!("E'{}'", quoted.replace('\\', "\\\\"))
    } else {
        format!("'{quoted}'")
    }
}

fn split_identifier(s: &str) -> Result<Vec<String>, String> {
    let mut parts = Vec::new();
    let mut chars = s.trim().chars().peekable();
    loop {
        let mut part = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        part.push('"');
                    }
                    Some('"') => break,
                    Some(c) => part.push(c),
                    None => return Err(format!("{s:?} has an unclosed double quote")),
                }
            }
            if part.is_empty() {
                return Err(format!("{s:?} has an empty quoted name"));
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' {
                    break;
                }
                part.push(c.to_ascii_lowercase());
                chars.next();
            }
            let valid = part.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$');
            if !valid {
                return Err(format!(
                    "{s:?}: {part:?} is not a plain identifier; put names with capitals, spaces or symbols in double quotes, e.g. 'public.\"Order Items\"'"
                ));
            }
        }
        parts.push(part);
        match chars.next() {
            None => return Ok(parts),
            Some('.') => continue,
            Some(c) => return Err(format!("{s:?}: unexpected {c:?} after a quoted name")),
        }
    }
}

/// A database URL whose password never prints: `Display` and `Debug` mask it.
#[derive(Clone, PartialEq, Eq)]
pub struct DbUrl(String);

impl DbUrl {
    pub fn new(url: impl Into<String>) -> DbUrl {
        DbUrl(url.into())
    }
    /// The URL with its password, for connecting only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DbUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&mask_password(&self.0))
    }
}

impl fmt::Debug for DbUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DbUrl({self})")
    }
}

/// The URL with every secret replaced by `***`: the password of
/// `scheme://user:password@host` and the value of every query parameter
/// whose name says password (`password=`, `sslpassword=`, in any case, as
/// often as they come). The parts are found as a URL parser finds them: the
/// authority ends at the first `/`, `?` or `#` after `://`, so an `@` in the
/// path or the query is not taken for the end of a user name.
pub fn mask_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        // Not a URL: perhaps libpq's `key=value key=value` form.
        let words: Vec<String> = url
            .split(' ')
            .map(|word| match word.split_once('=') {
                Some((key, _)) if key.to_ascii_lowercase().contains("password") => format!("{key}=***"),
                _ => word.to_string(),
            })
            .collect();
        return words.join(" ");
    };
    let (scheme, rest) = url.split_at(scheme_end + 3);
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rfind('@') {
        Some(at) => {
            let (userinfo, host) = authority.split_at(at);
            match userinfo.find(':') {
                Some(colon) => format!("{}:***{host}", &userinfo[..colon]),
                None => authority.to_string(),
            }
        }
        None => authority.to_string(),
    };
    let (before_fragment, fragment) = tail.split_at(tail.find('#').unwrap_or(tail.len()));
    let tail = match before_fragment.split_once('?') {
        Some((path, query)) => {
            let params: Vec<String> = query
                .split('&')
                .map(|param| match param.split_once('=') {
                    Some((key, _)) if key.to_ascii_lowercase().contains("password") => format!("{key}=***"),
                    _ => param.to_string(),
                })
                .collect();
            format!("{path}?{}{fragment}", params.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{scheme}{authority}{tail}")
}

// ---------------------------------------------------------------------------
// Loading and validation.

/// Everything wrong with a topology file, one problem per entry.
#[derive(Debug, thiserror::Error)]
pub struct TopologyError {
    pub path: PathBuf,
    pub problems: Vec<Problem>,
}

/// One problem: where (line, key) and what to do.
#[derive(Debug, Clone)]
pub struct Problem {
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub key: String,
    pub message: String,
}

impl fmt::Display for TopologyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}", self.path.display())?;
            if let Some(line) = p.line {
                write!(f, ":{line}")?;
                if let Some(col) = p.column {
                    write!(f, ":{col}")?;
                }
            }
            if p.key.is_empty() {
                write!(f, ": {}", p.message)?;
            } else {
                write!(f, ": {}: {}", p.key, p.message)?;
            }
        }
        Ok(())
    }
}

impl Topology {
    /// Reads and validates a topology file; environment variables named by
    /// `url_env` are read from the process environment.
    pub fn load(path: &Path) -> Result<Topology, TopologyError> {
        let text = std::fs::read_to_string(path).map_err(|e| TopologyError {
            path: path.to_path_buf(),
            problems: vec![Problem {
                line: None,
                column: None,
                key: String::new(),
                message: format!("cannot read the topology file: {e}; pass --topology PATH or set MMSYNC_TOPOLOGY"),
            }],
        })?;
        Topology::parse(&text, path, |name| std::env::var(name).ok())
    }

    /// Parses and validates topology text. `env` looks up `url_env` variables.
    pub fn parse(text: &str, path: &Path, env: impl Fn(&str) -> Option<String>) -> Result<Topology, TopologyError> {
        let err = |problems| TopologyError { path: path.to_path_buf(), problems };
        let (file, mut problems) = parse_reporting_unknown_keys(text);
        let Some(file) = file else { return Err(err(problems)) };
        let mut v = Validator { text, problems: Vec::new() };
        let topology = v.validate(file, &env);
        problems.append(&mut v.problems);
        v.problems = problems;
        match topology {
            Some(t) if v.problems.is_empty() => Ok(t),
            _ => Err(err(v.problems)),
        }
    }

    pub fn master(&self, name: &str) -> Option<&Master> {
        self.masters.iter().find(|m| m.name == name)
    }

    /// The tables that flow between masters: `[sync] tables` and mmsync's own
    /// heartbeats.
    /// The sinks one `mmsync run` starts: one per master, synced table
    /// (heartbeats included) and worker.
    pub fn sinks(&self) -> usize {
        self.masters.len() * self.synced_tables().len() * self.sync.apply_workers
    }

    /// What one sink's Kafka consumer may read ahead: its share of
    /// `read_ahead_max_bytes`, and at least [`MIN_SINK_READ_AHEAD`].
    pub fn sink_read_ahead_bytes(&self) -> usize {
        (self.sync.read_ahead_max_bytes / self.sinks().max(1)).max(MIN_SINK_READ_AHEAD)
    }

    pub fn synced_tables(&self) -> Vec<TableName> {
        let mut all = self.tables.clone();
        all.push(TableName::heartbeats());
        all
    }
}

/// Parses the file; an unknown key does not stop it. Serde stops at the
/// first unknown field, so each one found is reported with its line, blanked
/// out (spaces, newlines kept, so every later span still points at the
/// original text) and the file parsed again: every typo is reported at once,
/// along with what validation finds in the rest.
fn parse_reporting_unknown_keys(text: &str) -> (Option<File>, Vec<Problem>) {
    let mut problems = Vec::new();
    let mut current = text.to_string();
    let problem = |e: &toml::de::Error| {
        let (line, column) = e.span().map_or((None, None), |s| {
            let (l, c) = line_col(text, s.start);
            (Some(l), Some(c))
        });
        Problem { line, column, key: String::new(), message: e.message().trim().to_string() }
    };
    loop {
        match toml::from_str::<File>(&current) {
            Ok(file) => return (Some(file), problems),
            Err(e) => {
                problems.push(problem(&e));
                let unknown = e.message().starts_with("unknown field") && problems.len() < 100;
                let Some(region) = e.span().filter(|_| unknown).and_then(|s| key_extent(&current, s.start)) else {
                    return (None, problems);
                };
                let blanked: String =
                    current[region.clone()].chars().map(|c| if c == '\n' { c } else { ' ' }).collect();
                current.replace_range(region, &blanked);
            }
        }
    }
}

/// The bytes of the key at byte `at` and its value, or of its whole table
/// (header to the next header) when it names a table.
fn key_extent(text: &str, at: usize) -> Option<std::ops::Range<usize>> {
    let doc = toml_edit::ImDocument::parse(text).ok()?;
    find_key(doc.as_table(), text, at)
}

fn find_key(table: &toml_edit::Table, text: &str, at: usize) -> Option<std::ops::Range<usize>> {
    let table_extent = |key_start: usize| {
        let start = text[..key_start].rfind('\n').map_or(0, |i| i + 1);
        let mut end = text.len();
        let mut offset = text[start..].find('\n').map_or(text.len(), |i| start + i + 1);
        while offset < text.len() {
            if text[offset..].trim_start().starts_with('[') {
                end = offset;
                break;
            }
            offset = text[offset..].find('\n').map_or(text.len(), |i| offset + i + 1);
        }
        start..end
    };
    for (name, item) in table.iter() {
        let key = table.key(name).and_then(|k| k.span());
        let hit = key.as_ref().is_some_and(|k| k.contains(&at));
        match item {
            toml_edit::Item::Value(value) if hit => return Some(key?.start..value.span()?.end),
            toml_edit::Item::Table(t) if hit && !t.is_dotted() => return Some(table_extent(key?.start)),
            toml_edit::Item::Table(t) => {
                if let Some(r) = find_key(t, text, at) {
                    return Some(r);
                }
            }
            toml_edit::Item::ArrayOfTables(_) if hit => return Some(table_extent(at)),
            toml_edit::Item::ArrayOfTables(tables) => {
                for t in tables.iter() {
                    if let Some(r) = find_key(t, text, at) {
                        return Some(r);
                    }
                }
            }
            _ => {}
        }
    }
    None
}

struct Validator<'a> {
    text: &'a str,
    problems: Vec<Problem>,
}

impl Validator<'_> {
    fn problem<T>(&mut self, at: &Spanned<T>, key: impl Into<String>, message: impl Into<String>) {
        let line = (at.span() != (0..0)).then(|| line_col(self.text, at.span().start).0);
        self.problems.push(Problem { line, column: None, key: key.into(), message: message.into() });
    }

    fn positive(&mut self, v: &Spanned<i64>, key: &str, max: i64) -> i64 {
        let n = *v.get_ref();
        if n < 1 || n > max {
            self.problem(v, key, format!("must be between 1 and {max}, not {n}"));
        }
        n.clamp(1, max)
    }

    fn validate(&mut self, file: File, env: &impl Fn(&str) -> Option<String>) -> Option<Topology> {
        // [kafka]
        let k = &file.kafka;
        if k.brokers.get_ref().trim().is_empty() {
            self.problem(
                &k.brokers,
                "kafka.brokers",
                "is empty; list the bootstrap brokers as \"host:port,host:port\"",
            );
        }
        let prefix = k.topic_prefix.get_ref();
        if prefix.is_empty() || !prefix.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            self.problem(
                &k.topic_prefix,
                "kafka.topic_prefix",
                format!("{prefix:?} must be non-empty and use only letters, digits, '_' and '-'"),
            );
        }
        if !(1..=10_000).contains(k.partitions.get_ref()) {
            self.problem(
                &k.partitions,
                "kafka.partitions",
                format!("must be between 1 and 10000, not {}", k.partitions.get_ref()),
            );
        }
        if !(1..=100).contains(k.replication_factor.get_ref()) {
            self.problem(
                &k.replication_factor,
                "kafka.replication_factor",
                format!("must be between 1 and 100, not {}", k.replication_factor.get_ref()),
            );
        }
        let mut client = BTreeMap::new();
        for (key, value) in &k.client {
            let value = match value {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Table(t) if t.len() == 1 && t.get("env").is_some_and(toml::Value::is_str) => {
                    let var = t["env"].as_str().expect("checked");
                    match env(var) {
                        Some(v) => v,
                        None => {
                            self.problems.push(Problem {
                                line: None,
                                column: None,
                                key: format!("kafka.client.{key:?}"),
                                message: format!("environment variable {var:?} is not set; export it"),
                            });
                            continue;
                        }
                    }
                }
                other => {
                    self.problems.push(Problem {
                        line: None,
                        column: None,
                        key: format!("kafka.client.{key:?}"),
                        message: format!(
                            "must be a string, number, boolean or {{ env = \"VARIABLE\" }}, not a {}",
                            other.type_str()
                        ),
                    });
                    continue;
                }
            };
            client.insert(key.clone(), value);
        }

        // [metrics]
        let listen = match file.metrics.listen.get_ref().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.problem(
                    &file.metrics.listen,
                    "metrics.listen",
                    format!("{:?} is not an address like \"127.0.0.1:9464\"", file.metrics.listen.get_ref()),
                );
                None
            }
        };

        // [[masters]]
        if file.masters.len() < 2 {
            self.problems.push(Problem {
                line: None,
                column: None,
                key: "masters".into(),
                message: format!(
                    "{} master(s) declared; declare at least two [[masters]] with a name and a url",
                    file.masters.len()
                ),
            });
        }
        let mut names = HashSet::new();
        let mut masters = Vec::new();
        for (i, m) in file.masters.iter().enumerate() {
            let key = format!("masters[{i}]");
            let name = m.name.get_ref();
            if name.is_empty()
                || name.len() > 40
                || !name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                self.problem(
                    &m.name,
                    format!("{key}.name"),
                    format!("{name:?} must be 1 to 40 characters of [a-z0-9_]"),
                );
            } else if !names.insert(name.clone()) {
                self.problem(
                    &m.name,
                    format!("{key}.name"),
                    format!("{name:?} is declared twice; every master needs its own name"),
                );
            }
            let url = match (&m.url, &m.url_env) {
                (Some(url), None) => Some(url.get_ref().clone()),
                (None, Some(var)) => match env(var.get_ref()) {
                    Some(url) => Some(url),
                    None => {
                        self.problem(var, format!("{key}.url_env"), format!("environment variable {:?} is not set; export it with the database URL of master {name:?}", var.get_ref()));
                        None
                    }
                },
                (Some(url), Some(_)) => {
                    self.problem(url, key.clone(), "has both url and url_env; keep one");
                    None
                }
                (None, None) => {
                    self.problem(
                        &m.name,
                        key.clone(),
                        format!("master {name:?} has no url; add url = \"postgres://...\" or url_env = \"VARIABLE\""),
                    );
                    None
                }
            };
            if let Some(url) = url {
                if Database::of_url(&url).is_none() {
                    let at = m.url.as_ref().or(m.url_env.as_ref()).expect("one of them is set");
                    self.problem(
                        at,
                        format!("{key}.url"),
                        format!(
                            "{} is neither a PostgreSQL URL (postgres://) nor a MariaDB one (mariadb:// or mysql://)",
                            mask_password(&url)
                        ),
                    );
                }
                masters.push(Master { name: name.clone(), url: DbUrl(url) });
            }
        }

        // [sync]
        let s = &file.sync;
        if s.tables.get_ref().is_empty() {
            self.problem(&s.tables, "sync.tables", "is empty; list the tables to sync, e.g. [\"public.users\"]");
        }
        let mut tables = Vec::new();
        for (i, t) in s.tables.get_ref().iter().enumerate() {
            match TableName::parse(t.get_ref()) {
                Ok(name) if tables.contains(&name) => {
                    self.problem(t, format!("sync.tables[{i}]"), format!("{name} is listed twice"))
                }
                Ok(name) => tables.push(name),
                Err(e) => self.problem(t, format!("sync.tables[{i}]"), e),
            }
        }
        let sync = SyncSettings {
            batch_max_changes: self.positive(&s.batch_max_changes, "sync.batch_max_changes", 1_000_000) as usize,
            batch_max_wait: Duration::from_millis(
                self.positive(&s.batch_max_wait_ms, "sync.batch_max_wait_ms", 600_000) as u64,
            ),
            batch_max_bytes: self.positive(&s.batch_max_bytes, "sync.batch_max_bytes", 1 << 30) as usize,
            read_ahead_max_bytes: self.positive(&s.read_ahead_max_bytes, "sync.read_ahead_max_bytes", 1 << 34) as usize,
            capture_max_changes: self.positive(&s.capture_max_changes, "sync.capture_max_changes", 10_000_000) as usize,
            capture_max_bytes: self.positive(&s.capture_max_bytes, "sync.capture_max_bytes", 1 << 30) as usize,
            apply_workers: {
                let partitions = i64::from((*k.partitions.get_ref()).max(1));
                match &s.apply_workers {
                    // A default fits the rest of the file.
                    None => DEFAULT_APPLY_WORKERS.min(partitions) as usize,
                    Some(workers) => {
                        let n = *workers.get_ref();
                        if n > partitions {
                            self.problem(
                                workers,
                                "sync.apply_workers",
                                format!(
                                    "is {n}, more than kafka.partitions ({partitions}); a worker applies whole partitions"
                                ),
                            );
                        }
                        self.positive(workers, "sync.apply_workers", 64).min(partitions) as usize
                    }
                }
            },
            heartbeat_interval: Duration::from_millis(self.positive(
                &s.heartbeat_interval_ms,
                "sync.heartbeat_interval_ms",
                3_600_000,
            ) as u64),
            max_clock_skew: Duration::from_millis(self.positive(
                &s.max_clock_skew_ms,
                "sync.max_clock_skew_ms",
                7 * 86_400_000,
            ) as u64),
            conflicts_keep: Duration::from_secs(
                self.positive(&s.conflicts_keep_days, "sync.conflicts_keep_days", 36_500) as u64 * 86_400,
            ),
            dead_letters_keep: Duration::from_secs(
                self.positive(&s.dead_letters_keep_days, "sync.dead_letters_keep_days", 36_500) as u64 * 86_400,
            ),
            dead_letters_max_per_topic: self.positive(
                &s.dead_letters_max_per_topic,
                "sync.dead_letters_max_per_topic",
                1_000_000_000,
            ),
            tombstones_keep: Duration::from_secs(self.positive(
                &s.tombstones_keep_seconds,
                "sync.tombstones_keep_seconds",
                36_500 * 86_400,
            ) as u64),
        };

        Some(Topology {
            kafka: Kafka {
                brokers: k.brokers.get_ref().clone(),
                topic_prefix: prefix.clone(),
                partitions: *k.partitions.get_ref(),
                replication_factor: *k.replication_factor.get_ref(),
                client,
            },
            metrics_listen: listen?,
            masters,
            tables,
            sync,
        })
    }
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_read_the_same_whatever_standard_conforming_strings_says() {
        assert_eq!(quote_literal("plain"), "'plain'");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal(r"back\slash'"), r"E'back\\slash'''");
        assert_eq!(quote_literal(r"ends\"), r"E'ends\\'");
    }

    const GOOD: &str = r#"
[kafka]
brokers = "127.0.0.1:9092"
topic_prefix = "mmsync"
partitions = 6
[kafka.client]
"security.protocol" = "plaintext"

[metrics]
listen = "127.0.0.1:9464"

[[masters]]
name = "seoul"
url = "postgres://postgres:secret@127.0.0.1:5433/chat"

[[masters]]
name = "busan"
url_env = "BUSAN_URL"

[sync]
tables = ["public.users", "messages", 'public."Order Items"']
"#;

    fn parse(text: &str) -> Result<Topology, TopologyError> {
        Topology::parse(text, Path::new("topology.toml"), |v| {
            (v == "BUSAN_URL").then(|| "postgres://b@h/db".to_string())
        })
    }

    fn problems(text: &str) -> String {
        parse(text).expect_err("must fail").to_string()
    }

    #[test]
    fn good_file_parses_with_defaults() {
        let t = parse(GOOD).unwrap();
        assert_eq!(t.masters.len(), 2);
        assert_eq!(t.masters[1].url.expose(), "postgres://b@h/db");
        assert_eq!(t.tables[1], TableName { schema: "public".into(), name: "messages".into() });
        assert_eq!(t.tables[2].quoted(), r#""public"."Order Items""#);
        assert_eq!(t.kafka.client["security.protocol"], "plaintext");
        assert_eq!(t.sync.batch_max_changes, 1000);
        assert_eq!(t.sync.batch_max_bytes, 4 << 20);
        assert_eq!(t.sync.capture_max_bytes, 16 << 20);
        assert_eq!(t.sync.batch_max_wait, Duration::from_millis(5));
        assert_eq!(t.sync.apply_workers, 2);
        assert_eq!(t.sync.read_ahead_max_bytes, 32 << 20);
    }

    #[test]
    fn sinks_share_the_read_ahead_and_each_keeps_a_floor() {
        // 2 masters, 3 tables and the heartbeats, 2 workers: 16 sinks.
        let t = parse(GOOD).unwrap();
        assert_eq!(t.sinks(), 16);
        assert_eq!(t.sink_read_ahead_bytes(), 2 << 20);
        let t = parse(&GOOD.replace("[sync]\n", "[sync]\nread_ahead_max_bytes = 1000\n")).unwrap();
        assert_eq!(t.sink_read_ahead_bytes(), MIN_SINK_READ_AHEAD);
    }

    #[test]
    fn the_default_apply_workers_fit_a_single_partition() {
        let t = parse(&GOOD.replace("partitions = 6", "partitions = 1")).unwrap();
        assert_eq!(t.sync.apply_workers, 1);
    }

    #[test]
    fn apply_workers_cannot_outnumber_partitions() {
        let text = GOOD.replace("partitions = 6", "partitions = 3").replace("[sync]", "[sync]\napply_workers = 4");
        let msg = problems(&text);
        assert!(msg.contains("sync.apply_workers: is 4, more than kafka.partitions (3)"), "{msg}");
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let text = GOOD.replace("partitions = 6", "partitions = 6\nbrokerz = 1");
        let msg = problems(&text);
        assert!(msg.starts_with("topology.toml:6:1: unknown field `brokerz`"), "{msg}");
    }

    #[test]
    fn every_unknown_key_is_reported_with_its_line_and_the_rest_is_still_validated() {
        let text = GOOD
            .replace("partitions = 6", "partitions = 6\nbrokerz = 1")
            .replace(
                "listen = \"127.0.0.1:9464\"",
                "listen = \"127.0.0.1:9464\"\n\n[bogus]\nx = 1\ny = [\n  1,\n  2,\n]",
            )
            .replace("name = \"busan\"", "name = \"Busan!\"\nurl_enb = \"X\"")
            .replace("tables = [", "batch_max_changes = 0\nwait = [\n \"a\",\n]\ntables = [");
        let msg = problems(&text);
        assert!(msg.contains("topology.toml:6:1: unknown field `brokerz`"), "{msg}");
        assert!(msg.contains("topology.toml:13:2: unknown field `bogus`"), "{msg}");
        assert!(msg.contains("topology.toml:26:1: unknown field `url_enb`"), "{msg}");
        assert!(msg.contains("topology.toml:31:1: unknown field `wait`"), "{msg}");
        assert!(msg.contains("topology.toml:25: masters[1].name: \"Busan!\" must be"), "{msg}");
        assert!(msg.contains("topology.toml:30: sync.batch_max_changes: must be between 1"), "{msg}");
        assert_eq!(msg.lines().count(), 6, "{msg}");
    }

    #[test]
    fn a_url_of_another_database_is_refused_by_name_with_its_password_masked() {
        let text =
            GOOD.replace("postgres://postgres:secret@127.0.0.1:5433/chat", "oracle://sync:secret@127.0.0.1:1521/chat");
        let msg = problems(&text);
        assert!(
            msg.contains(
                "masters[0].url: oracle://sync:***@127.0.0.1:1521/chat is neither a PostgreSQL URL (postgres://) nor a MariaDB one"
            ),
            "{msg}"
        );
        assert!(!msg.contains("secret"), "{msg}");
    }

    #[test]
    fn syntax_error_has_line() {
        let msg = problems(&GOOD.replace("partitions = 6", "partitions = = 6"));
        assert!(msg.starts_with("topology.toml:5:"), "{msg}");
    }

    #[test]
    fn every_problem_is_reported() {
        let text = GOOD
            .replace("name = \"busan\"", "name = \"seoul\"")
            .replace("\"messages\"", "\"users\"")
            .replace("BUSAN_URL", "NOPE_URL");
        let msg = problems(&text);
        assert!(msg.contains("topology.toml:17: masters[1].name: \"seoul\" is declared twice"), "{msg}");
        assert!(msg.contains("masters[1].url_env: environment variable \"NOPE_URL\" is not set"), "{msg}");
        assert!(msg.contains("sync.tables[1]: public.users is listed twice"), "{msg}");
        assert_eq!(msg.lines().count(), 3, "{msg}");
    }

    #[test]
    fn kafka_client_values_can_come_from_the_environment() {
        let text = GOOD.replace(
            "\"security.protocol\" = \"plaintext\"",
            "\"sasl.password\" = { env = \"BUSAN_URL\" }\n\"sasl.username\" = { env = \"NOPE\" }",
        );
        let msg = problems(&text);
        assert!(msg.contains("kafka.client.\"sasl.username\": environment variable \"NOPE\" is not set"), "{msg}");
        let t = parse(&text.replace("{ env = \"NOPE\" }", "\"user\"")).unwrap();
        assert_eq!(t.kafka.client["sasl.password"], "postgres://b@h/db");
    }

    #[test]
    fn one_master_is_not_enough() {
        let text = GOOD.split("[[masters]]\nname = \"busan\"").collect::<Vec<_>>().join("");
        assert!(problems(&text).contains("masters: 1 master(s) declared; declare at least two"));
    }

    #[test]
    fn bad_master_name() {
        let msg = problems(&GOOD.replace("\"seoul\"", "\"Seoul-1\""));
        assert!(msg.contains("masters[0].name: \"Seoul-1\" must be 1 to 40 characters of [a-z0-9_]"), "{msg}");
    }

    #[test]
    fn table_names() {
        assert_eq!(TableName::parse("Public.Users").unwrap().to_string(), "public.users");
        assert_eq!(TableName::parse(r#""My ""S"""."x""#).unwrap().quoted(), r#""My ""S"""."x""#);
        assert!(TableName::parse("a.b.c").is_err());
        assert!(TableName::parse("public.Order Items").unwrap_err().contains("double quotes"));
        assert!(TableName::parse("\"open").is_err());
    }

    #[test]
    fn passwords_are_masked() {
        assert_eq!(mask_password("postgres://u:pw@h:5/db"), "postgres://u:***@h:5/db");
        assert_eq!(mask_password("postgres://u@h/db?password=pw&x=1"), "postgres://u@h/db?password=***&x=1");
        // Every password parameter, whichever comes first, in any case.
        assert_eq!(
            mask_password("postgres://u@h/db?sslpassword=a&password=b&PASSWORD=c&sslmode=require"),
            "postgres://u@h/db?sslpassword=***&password=***&PASSWORD=***&sslmode=require"
        );
        // An @ in the query is not the end of a user name; the user's password still goes.
        assert_eq!(
            mask_password("postgres://u:pw@h/db?application_name=a@b&password=x"),
            "postgres://u:***@h/db?application_name=a@b&password=***"
        );
        assert_eq!(mask_password("postgres://h/db?options=a@b"), "postgres://h/db?options=a@b");
        // An @ in the password itself, several hosts, a fragment.
        assert_eq!(mask_password("postgres://u:p@ss@h1:5,h2:6/db#x"), "postgres://u:***@h1:5,h2:6/db#x");
        assert_eq!(mask_password("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(mask_password("host=h password=x user=u"), "host=h password=*** user=u");
        let t = parse(GOOD).unwrap();
        assert!(!format!("{:?}", t).contains("secret"));
        assert!(!format!("{}", t.masters[0].url).contains("secret"));
    }
}
