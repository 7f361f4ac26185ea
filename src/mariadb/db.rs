//! Connections to a MariaDB master, and what one of its tables looks like.
//!
//! Every mmsync session pins the settings that decide a value's text and how
//! a write is checked: UTC for `TIMESTAMP` columns, `utf8mb4` both ways, and
//! strict mode, so that a value a column cannot hold is refused (a dead
//! letter) instead of cut to fit.

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, OptsBuilder};

use crate::error::{Error, Result};
use crate::topology::{Master, TableName, ORIGIN_COLUMN, VERSION_COLUMN};

/// The session settings of every connection mmsync makes to a MariaDB master.
pub const SESSION: &[&str] = &[
    "SET NAMES utf8mb4 COLLATE utf8mb4_bin",
    "SET time_zone = '+00:00'",
    "SET sql_mode = 'STRICT_ALL_TABLES,NO_ENGINE_SUBSTITUTION,NO_AUTO_VALUE_ON_ZERO,ERROR_FOR_DIVISION_BY_ZERO'",
    "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
];

/// The connection options of `master` (`mariadb://` is read as `mysql://`).
pub fn options(master: &Master) -> Result<Opts> {
    let url = master.url.expose();
    let url = match url.split_once("://") {
        Some((_, rest)) => format!("mysql://{rest}"),
        None => url.to_string(),
    };
    let opts = Opts::from_url(&url).map_err(|e| Error::Setup {
        master: master.name.clone(),
        problem: format!("its url {} cannot be read: {e}", master.url),
        fix: "write it as mariadb://user:password@host:3306/database".into(),
    })?;
    if opts.db_name().is_none() {
        return Err(Error::Setup {
            master: master.name.clone(),
            problem: format!("its url {} names no database", master.url),
            fix: "add the database that holds the synced tables: mariadb://user:password@host:3306/database".into(),
        });
    }
    Ok(OptsBuilder::from_opts(opts).prefer_socket(false).init(SESSION.to_vec()).stmt_cache_size(64).into())
}

/// The database of the master's URL: where `public.*` tables live.
pub fn url_database(master: &Master) -> Result<String> {
    Ok(options(master)?.db_name().expect("checked by options").to_string())
}

/// The user mmsync connects as (the triggers know the applier by it).
pub fn user(master: &Master) -> Result<String> {
    Ok(options(master)?.user().unwrap_or("root").to_string())
}

/// Opens a connection with mmsync's session settings.
pub async fn connect(master: &Master) -> Result<Conn> {
    let opts = options(master)?;
    let connect = Conn::new(opts);
    match tokio::time::timeout(crate::postgres::db::CONNECT_TIMEOUT, connect).await {
        Ok(conn) => conn.map_err(Error::mariadb(&master.name, "connecting")),
        Err(_) => Err(Error::Mariadb {
            master: master.name.clone(),
            context: "connecting".into(),
            source: mysql_async::Error::Io(mysql_async::IoError::Io(std::io::ErrorKind::TimedOut.into())),
        }),
    }
}

/// The bytes of every binlog file the server keeps (`SHOW BINARY LOGS`,
/// which needs BINLOG MONITOR).
pub async fn binlog_bytes(conn: &mut Conn, master: &str) -> Result<i64> {
    let logs: Vec<mysql_async::Row> = conn
        .query("SHOW BINARY LOGS")
        .await
        .map_err(Error::mariadb(master, "measuring the binlog (SHOW BINARY LOGS needs BINLOG MONITOR)"))?;
    Ok(logs.into_iter().filter_map(|mut r| r.take::<i64, _>(1)).sum())
}

/// The MariaDB database that holds `table` on a master whose URL names `url_db`.
pub fn database_of(table: &TableName, url_db: &str) -> String {
    if table.schema == "public" {
        url_db.to_string()
    } else {
        table.schema.clone()
    }
}

/// The topology's name of a table found in MariaDB database `db`: the
/// synced table it is, whether the topology names it `db.name` or (for the
/// URL's database) `public.name`; otherwise `db.name`.
pub fn table_of(db: &str, name: &str, url_db: &str, synced: &[TableName]) -> TableName {
    let exact = TableName { schema: db.to_string(), name: name.to_string() };
    let public = TableName { schema: "public".into(), name: name.to_string() };
    if db == url_db && !synced.contains(&exact) && synced.contains(&public) {
        public
    } else {
        exact
    }
}

/// An identifier quoted for MariaDB: `` `name` ``.
pub fn quote_ident(s: &str) -> String {
    format!("`{}`", s.replace('`', "``"))
}

/// A string literal for MariaDB, whatever `sql_mode` says about backslashes.
pub fn quote_literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for ch in s.chars() {
        match ch {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            '\0' => out.push_str("\\0"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// The characters of `mmsync.tombstones.key_text` (see [`crate::mariadb::schema`]).
pub const TOMBSTONE_KEY_CHARS: usize = 512;

/// One column of a MariaDB table.
#[derive(Debug, Clone)]
pub struct Column {
    pub name: String,
    /// `int`, `varchar`, `datetime`, ... (information_schema's DATA_TYPE).
    pub data_type: String,
    /// The whole type, e.g. `int(10) unsigned`, `tinyint(1)`.
    pub column_type: String,
    /// The character set of a character column (`utf8mb4`, `latin1`...).
    pub charset: Option<String>,
    /// Its collation (`utf8mb4_general_ci`...).
    pub collation: Option<String>,
    /// How its values are written as text (from the types above, once).
    pub form: TextForm,
}

/// How a column's value is written as a record's text, and read back:
/// decided once per column, not per value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TextForm {
    /// As MariaDB prints it.
    Plain,
    /// `tinyint(1)`: PostgreSQL's `t`/`f` arrive as `1`/`0`.
    Boolean,
    /// `datetime(p)`/`timestamp(p)`, in UTC, with `p` fractional digits.
    Instant(usize),
    /// `time(p)`, with `p` fractional digits.
    Time(usize),
    /// Binary strings: `\x` and hex digits (PostgreSQL's bytea text).
    Binary,
}

impl Column {
    /// A column as information_schema describes it (types in lower case).
    pub fn new(
        name: &str,
        data_type: &str,
        column_type: &str,
        charset: Option<String>,
        collation: Option<String>,
    ) -> Column {
        let mut c = Column {
            name: name.to_string(),
            data_type: data_type.to_lowercase(),
            column_type: column_type.to_lowercase(),
            charset,
            collation,
            form: TextForm::Plain,
        };
        c.form = c.text_form();
        c
    }

    fn text_form(&self) -> TextForm {
        let digits = || {
            self.column_type
                .split_once('(')
                .and_then(|(_, rest)| rest.split(')').next())
                .and_then(|p| p.parse().ok())
                .unwrap_or(0usize)
                .min(6)
        };
        match self.data_type.as_str() {
            "binary" | "varbinary" | "tinyblob" | "blob" | "mediumblob" | "longblob" => TextForm::Binary,
            "tinyint" if self.column_type.starts_with("tinyint(1)") => TextForm::Boolean,
            "datetime" | "timestamp" => TextForm::Instant(digits()),
            "time" => TextForm::Time(digits()),
            _ => TextForm::Plain,
        }
    }
}

/// A synced table as a MariaDB master has it.
#[derive(Debug, Clone)]
pub struct Table {
    pub name: TableName,
    /// The database that holds it.
    pub database: String,
    pub columns: Vec<Column>,
    /// Primary key columns, in key order.
    pub key: Vec<String>,
    /// Unique indexes besides the primary key: (name, columns in index order).
    pub unique: Vec<(String, Vec<String>)>,
    /// Foreign keys of this table whose actions cascade (`name ON DELETE CASCADE`):
    /// InnoDB's cascades fire no trigger, so what they change is never sent.
    pub cascades: Vec<String>,
    /// The application's own triggers on this table that do not tell
    /// mmsync's applier apart (they fire on its writes too).
    pub foreign_triggers: Vec<String>,
}

impl Table {
    /// `` `db`.`table` ``.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.database), quote_ident(&self.name.name))
    }

    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// The columns applications write (not mmsync's own two).
    pub fn data_columns(&self) -> impl Iterator<Item = &Column> {
        self.columns.iter().filter(|c| c.name != ORIGIN_COLUMN && c.name != VERSION_COLUMN)
    }

    /// The SQL text of a key, as a JSON object of the key columns' text in
    /// name order: the same expression in the triggers and in the sink, so
    /// that a tombstone written by either is found by both.
    pub fn key_text_sql(&self, value: impl Fn(&str) -> String) -> String {
        let mut names: Vec<&String> = self.key.iter().collect();
        names.sort();
        let pairs: Vec<String> =
            names.iter().map(|k| format!("{}, CAST({} AS CHAR)", quote_literal(k), value(k))).collect();
        format!("JSON_COMPACT(JSON_OBJECT({}))", pairs.join(", "))
    }

    /// Why mmsync cannot sync this table as it is, if it cannot.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.key.is_empty() {
            out.push(format!("{} has no primary key; add one (mmsync keys every change by it)", self.name));
        }
        for k in &self.key {
            let c = self.column(k).expect("a key column is a column");
            let keyable = matches!(
                c.data_type.as_str(),
                "tinyint"
                    | "smallint"
                    | "mediumint"
                    | "int"
                    | "bigint"
                    | "char"
                    | "varchar"
                    | "decimal"
                    | "date"
                    | "datetime"
            );
            if !keyable {
                out.push(format!(
                    "{}: key column {k} is {}; keys of integers, decimals, dates or character strings only so far",
                    self.name, c.column_type
                ));
            }
        }
        // The key as JSON text must fit mmsync.tombstones.key_text, or a
        // delete of that key fails in the trigger.
        let key_chars: usize = 2 + self
            .key
            .iter()
            .filter_map(|k| self.column(k))
            .map(|c| {
                let n = c.column_type.split_once('(').and_then(|(_, r)| r.split([')', ',']).next()?.parse().ok());
                let value = match c.data_type.as_str() {
                    "char" | "varchar" => n.unwrap_or(255),
                    "decimal" => n.unwrap_or(10) + 2,
                    "date" => 10,
                    "datetime" => 26,
                    _ => 20,
                };
                c.name.len() + 6 + value
            })
            .sum::<usize>();
        if key_chars > TOMBSTONE_KEY_CHARS {
            out.push(format!(
                "{}: its key can be {key_chars} characters as JSON text, more than mmsync.tombstones.key_text holds \
                 ({TOMBSTONE_KEY_CHARS}), so deleting such a row would fail; use a shorter key",
                self.name
            ));
        }
        for fk in &self.cascades {
            out.push(format!(
                "{}: foreign key {fk} cascades, and InnoDB's cascades fire no trigger, so the rows they change would \
                 never reach the other masters; use RESTRICT or NO ACTION (delete or update the children first)",
                self.name
            ));
        }
        for trigger in &self.foreign_triggers {
            out.push(format!(
                "{}: trigger {trigger} fires on mmsync's applier too (MariaDB has no session_replication_role), and \
                 would change replicated rows or write rows nobody sends; wrap its body in \
                 IF NOT (@mmsync_applier <=> 1) THEN ... END IF",
                self.name
            ));
        }
        for c in self.data_columns() {
            if matches!(c.data_type.as_str(), "uuid" | "inet4" | "inet6") {
                out.push(format!(
                    "{}: column {} is {}, which the binlog holds as raw bytes mmsync cannot read as text yet; use char(36) (uuid) or varchar(45) (inet)",
                    self.name, c.name, c.column_type
                ));
            }
            if let Some(charset) =
                c.charset.as_deref().filter(|cs| !matches!(*cs, "utf8mb4" | "utf8mb3" | "utf8" | "ascii"))
            {
                out.push(format!(
                    "{}: column {} is in character set {charset}; values travel as UTF-8 text, so convert it: ALTER TABLE ... CONVERT TO CHARACTER SET utf8mb4",
                    self.name, c.name
                ));
            }
            if matches!(c.data_type.as_str(), "enum" | "set" | "bit" | "geometry" | "point" | "linestring" | "polygon")
            {
                out.push(format!(
                    "{}: column {} is {}, which mmsync cannot yet read from the binlog as text; use varchar (enum, set) or an integer (bit)",
                    self.name, c.name, c.column_type
                ));
            }
        }
        out
    }
}

/// Reads `table` on a MariaDB master; `None` when it does not exist.
pub async fn describe(conn: &mut Conn, master: &str, table: &TableName, url_db: &str) -> Result<Option<Table>> {
    let database = database_of(table, url_db);
    /// name, data type, column type, character set, collation.
    type ColumnRow = (String, String, String, Option<String>, Option<String>);
    let rows: Vec<ColumnRow> = conn
        .exec(
            "SELECT column_name, data_type, column_type, character_set_name, collation_name FROM information_schema.columns
             WHERE table_schema = ? AND table_name = ? ORDER BY ordinal_position",
            (&database, &table.name),
        )
        .await
        .map_err(Error::mariadb(master, format!("describing {table}")))?;
    if rows.is_empty() {
        return Ok(None);
    }
    let key: Vec<String> = conn
        .exec(
            "SELECT column_name FROM information_schema.key_column_usage
             WHERE table_schema = ? AND table_name = ? AND constraint_name = 'PRIMARY' ORDER BY ordinal_position",
            (&database, &table.name),
        )
        .await
        .map_err(Error::mariadb(master, format!("reading the primary key of {table}")))?;
    let unique_columns: Vec<(String, String)> = conn
        .exec(
            "SELECT index_name, column_name FROM information_schema.statistics
             WHERE table_schema = ? AND table_name = ? AND non_unique = 0 AND index_name <> 'PRIMARY'
             ORDER BY index_name, seq_in_index",
            (&database, &table.name),
        )
        .await
        .map_err(Error::mariadb(master, format!("reading the unique indexes of {table}")))?;
    let mut unique: Vec<(String, Vec<String>)> = Vec::new();
    for (index, column) in unique_columns {
        match unique.last_mut() {
            Some((name, columns)) if *name == index => columns.push(column),
            _ => unique.push((index, vec![column])),
        }
    }
    let cascades: Vec<(String, String, String)> = conn
        .exec(
            "SELECT constraint_name, delete_rule, update_rule FROM information_schema.referential_constraints
             WHERE constraint_schema = ? AND table_name = ?
               AND (delete_rule IN ('CASCADE', 'SET NULL', 'SET DEFAULT') OR update_rule IN ('CASCADE', 'SET NULL', 'SET DEFAULT'))",
            (&database, &table.name),
        )
        .await
        .map_err(Error::mariadb(master, format!("reading the foreign keys of {table}")))?;
    let cascades = cascades
        .into_iter()
        .map(|(name, on_delete, on_update)| format!("{name} (ON DELETE {on_delete} ON UPDATE {on_update})"))
        .collect();
    let triggers: Vec<(String, String)> = conn
        .exec(
            "SELECT trigger_name, action_statement FROM information_schema.triggers
             WHERE event_object_schema = ? AND event_object_table = ? AND trigger_name NOT LIKE 'mmsync\\_%'",
            (&database, &table.name),
        )
        .await
        .map_err(Error::mariadb(master, format!("reading the triggers of {table}")))?;
    let foreign_triggers =
        triggers.into_iter().filter(|(_, body)| !body.contains("@mmsync_applier")).map(|(name, _)| name).collect();
    Ok(Some(Table {
        cascades,
        foreign_triggers,
        unique,
        name: table.clone(),
        database,
        columns: rows
            .into_iter()
            .map(|(name, data_type, column_type, charset, collation)| {
                Column::new(&name, &data_type, &column_type, charset, collation)
            })
            .collect(),
        key,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_literal_cannot_be_closed_by_a_quote_or_a_backslash_in_it() {
        assert_eq!(quote_literal(r"it's \' x"), r"'it''s \\'' x'");
        assert_eq!(quote_ident("a`b"), "`a``b`");
    }

    #[test]
    fn a_key_too_long_for_the_tombstones_is_refused_before_a_delete_fails_on_it() {
        let column =
            |name: &str, data_type: &str, column_type: &str| Column::new(name, data_type, column_type, None, None);
        let mut t = Table {
            name: TableName { schema: "public".into(), name: "t".into() },
            database: "shop".into(),
            columns: vec![column("id", "bigint", "bigint(20)"), column("code", "varchar", "varchar(600)")],
            key: vec!["id".into()],
            unique: vec![],
            cascades: vec![],
            foreign_triggers: vec![],
        };
        assert!(t.problems().is_empty(), "{:?}", t.problems());
        t.key = vec!["id".into(), "code".into()];
        let problems = t.problems();
        assert!(
            problems.iter().any(|p| p.contains("more than mmsync.tombstones.key_text holds (512)")),
            "{problems:?}"
        );
    }

    #[test]
    fn public_tables_live_in_the_urls_database_and_others_in_their_own() {
        let t = TableName { schema: "public".into(), name: "items".into() };
        assert_eq!(database_of(&t, "shop"), "shop");
        assert_eq!(table_of("shop", "items", "shop", std::slice::from_ref(&t)), t);
        // Named by its database in the topology, it is found by that name.
        let named = TableName { schema: "shop".into(), name: "items".into() };
        assert_eq!(table_of("shop", "items", "shop", std::slice::from_ref(&named)), named);
        let m = TableName { schema: "mmsync".into(), name: "heartbeats".into() };
        assert_eq!(database_of(&m, "shop"), "mmsync");
        assert_eq!(table_of("mmsync", "heartbeats", "shop", std::slice::from_ref(&m)), m);
    }
}
