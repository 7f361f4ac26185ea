//! Which PostgreSQL and MariaDB column types carry the same values, for a
//! table synced between masters of both kinds (a mixed mesh).
//!
//! A record's values are text: PostgreSQL's output text on a PostgreSQL
//! source, MariaDB's on a MariaDB source, with two conventions that make them
//! meet: binary strings travel as `\x` and hex digits on both, and times as
//! UTC. A column may join a mixed mesh only when every value one side can
//! hold reaches the other side exactly and comes back the same:
//!
//! | values | PostgreSQL | MariaDB |
//! |---|---|---|
//! | integers | `smallint`, `integer`, `bigint` | `smallint`, `int`, `bigint` (same width, signed) |
//! | exact numbers | `numeric(p,s)` | `decimal(p,s)` (same p and s) |
//! | text | `varchar(n)`, `char(n)`; `text` | the same `varchar(n)`, `char(n)`; `text`, `mediumtext`, `longtext` (utf8mb4) |
//! | bytes | `bytea` | `binary`, `varbinary`, `*blob` |
//! | truth | `boolean` (`t`/`f`, written `1`/`0` there) | `tinyint(1)` |
//! | instants | `timestamptz(p)`, `timestamp(p)` | `datetime(p)`, `timestamp(p)` (same p, in UTC) |
//! | days, times | `date`, `time(p)` | `date`, `time(p)` |
//! | JSON | `json`, `jsonb` | `json`, `longtext` |
//! | UUIDs | `uuid` | `char(36)` |
//! | floating | `double precision`, `real` | `double`, `float` |
//!
//! Everything else is refused by `check` and `init`, with the reason:
//! arrays, ranges, intervals, enums and composite types have no MariaDB
//! twin; an unconstrained `numeric` holds NaN, infinities and scales no
//! `decimal` can; MariaDB's zero dates have no PostgreSQL twin. Keys in a
//! mixed mesh are integers or text, and text keys must compare as
//! PostgreSQL's do (byte for byte, trailing spaces included: a `*_nopad_bin`
//! collation or `binary`): under a case-insensitive or PAD SPACE collation
//! two PostgreSQL keys (`a` and `A`, `a` and `a `) would be one MariaDB row.

use crate::mariadb::db::{Column, Table};
use crate::postgres::schema::{ColumnInfo, TableInfo};

/// What a column holds, as far as a mixed mesh is concerned.
#[derive(Debug, Clone, PartialEq)]
pub enum Family {
    /// Width in bytes.
    Integer(u8),
    /// Precision and scale.
    Decimal(u32, u32),
    Text,
    Binary,
    Boolean,
    /// Fractional digits.
    Instant(u32),
    Date,
    Time(u32),
    Json,
    Uuid,
    Double,
    Float,
}

/// The digits in a type's parentheses: `numeric(12,2)` -> [12, 2].
fn modifiers(sql_type: &str) -> Vec<u32> {
    sql_type
        .split_once('(')
        .and_then(|(_, rest)| rest.split(')').next())
        .map(|m| m.split(',').filter_map(|d| d.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// A PostgreSQL column's family, or why it cannot join a mixed mesh.
pub fn postgres_family(c: &ColumnInfo) -> Result<Family, String> {
    let m = modifiers(&c.sql_type);
    Ok(match c.type_name.as_str() {
        "int2" => Family::Integer(2),
        "int4" => Family::Integer(4),
        "int8" => Family::Integer(8),
        "numeric" => match m.as_slice() {
            [p, s] => Family::Decimal(*p, *s),
            [p] => Family::Decimal(*p, 0),
            _ => {
                return Err(format!(
                    "{} is numeric without precision and scale: it holds NaN, infinities and scales no MariaDB decimal can; \
                     give it numeric(p,s) and decimal(p,s) on MariaDB",
                    c.name
                ))
            }
        },
        "text" | "varchar" | "bpchar" => Family::Text,
        "bytea" => Family::Binary,
        "bool" => Family::Boolean,
        "timestamptz" | "timestamp" => Family::Instant(m.first().copied().unwrap_or(6)),
        "date" => Family::Date,
        "time" => Family::Time(m.first().copied().unwrap_or(6)),
        "json" | "jsonb" => Family::Json,
        "uuid" => Family::Uuid,
        "float8" => Family::Double,
        "float4" => Family::Float,
        other => {
            let what = if other.starts_with('_') { "an array".to_string() } else { format!("of type {}", c.sql_type) };
            return Err(format!("{} is {what}, which has no MariaDB twin that holds the same values", c.name));
        }
    })
}

/// A MariaDB column's family, or why it cannot join a mixed mesh.
pub fn mariadb_family(c: &Column) -> Result<Family, String> {
    let m = modifiers(&c.column_type);
    let unsigned = c.column_type.contains("unsigned");
    if unsigned && matches!(c.data_type.as_str(), "tinyint" | "smallint" | "mediumint" | "int" | "bigint") {
        return Err(format!(
            "{} is {}: PostgreSQL has no unsigned integers; make it signed, or one size wider on PostgreSQL's side too",
            c.name, c.column_type
        ));
    }
    Ok(match c.data_type.as_str() {
        "tinyint" if m.first() == Some(&1) => Family::Boolean,
        "smallint" => Family::Integer(2),
        "int" => Family::Integer(4),
        "bigint" => Family::Integer(8),
        "decimal" => Family::Decimal(m.first().copied().unwrap_or(10), m.get(1).copied().unwrap_or(0)),
        "uuid" => Family::Uuid,
        "char" | "varchar" | "tinytext" | "text" | "mediumtext" => Family::Text,
        "longtext" | "json" => Family::Json,
        "binary" | "varbinary" | "tinyblob" | "blob" | "mediumblob" | "longblob" => Family::Binary,
        "datetime" | "timestamp" => Family::Instant(m.first().copied().unwrap_or(0)),
        "date" => Family::Date,
        "time" => Family::Time(m.first().copied().unwrap_or(0)),
        "double" => Family::Double,
        "float" => Family::Float,
        _ => {
            return Err(format!(
                "{} is {}, which has no PostgreSQL twin that holds the same values",
                c.name, c.column_type
            ))
        }
    })
}

/// Whether the two families carry the same values both ways.
fn same(pg: &Family, maria: &Family) -> bool {
    match (pg, maria) {
        // A MariaDB longtext may hold JSON or text: either PostgreSQL type fits.
        (Family::Text, Family::Json) => true,
        // A uuid's text fits char(36).
        (Family::Uuid, Family::Text) => true,
        (a, b) => a == b,
    }
}

/// Why `table` cannot be synced between a PostgreSQL master (`pg`, named
/// `pg_master`) and a MariaDB one: every problem, each naming the fix.
pub fn problems(pg: &TableInfo, pg_master: &str, maria: &Table, maria_master: &str) -> Vec<String> {
    let mut out = Vec::new();
    let name = &pg.name;
    for c in &pg.columns {
        if is_mmsync(&c.name) {
            continue;
        }
        let Some(m) = maria.column(&c.name) else {
            out.push(format!(
                "{name}: column {} is on {pg_master} and not on {maria_master}; make the tables alike",
                c.name
            ));
            continue;
        };
        match (postgres_family(c), mariadb_family(m)) {
            (Err(why), _) => out.push(format!("{name} on {pg_master}: {why}")),
            (_, Err(why)) => out.push(format!("{name} on {maria_master}: {why}")),
            (Ok(a), Ok(b)) if !same(&a, &b) || !same_length(c, m) => out.push(format!(
                "{name}: column {} is {} on {pg_master} and {} on {maria_master}, which do not hold the same values \
                 (see the README's type map)",
                c.name, c.sql_type, m.column_type
            )),
            _ => {}
        }
    }
    for m in maria.data_columns() {
        if pg.column(&m.name).is_none() {
            out.push(format!(
                "{name}: column {} is on {maria_master} and not on {pg_master}; make the tables alike",
                m.name
            ));
        }
    }
    if pg.key != maria.key {
        out.push(format!(
            "{name}: the primary key is {:?} on {pg_master} and {:?} on {maria_master}; make it the same",
            pg.key, maria.key
        ));
    }
    for k in &maria.key {
        let Some(m) = maria.column(k) else { continue };
        let family = mariadb_family(m);
        let text_key = matches!(family, Ok(Family::Text) | Ok(Family::Uuid));
        let exact = m.collation.as_deref().is_none_or(|c| c.ends_with("_nopad_bin") || c == "binary");
        if text_key && !exact {
            out.push(format!(
                "{name} on {maria_master}: key column {k} has collation {}, under which keys PostgreSQL holds apart \
                 ('a' and 'A', or 'a' and 'a ') are one row; give it a byte-exact collation: ALTER TABLE ... MODIFY {k} \
                 ... COLLATE utf8mb4_nopad_bin",
                m.collation.as_deref().unwrap_or("?")
            ));
        }
        if !text_key && !matches!(family, Ok(Family::Integer(_))) {
            out.push(format!(
                "{name}: key column {k} is {}; keys of integers or text only in a mesh of PostgreSQL and MariaDB \
                 (their text would differ between the two)",
                m.column_type
            ));
        }
    }
    out
}

/// Every problem of every synced table between the first PostgreSQL and
/// the first MariaDB master of `topology` (none when it has one kind only).
pub async fn check(topology: &crate::topology::Topology) -> crate::error::Result<Vec<String>> {
    use crate::topology::Database;
    let pg = topology.masters.iter().find(|m| m.database() == Database::Postgres);
    let maria = topology.masters.iter().find(|m| m.database() == Database::Mariadb);
    let (Some(pg), Some(maria)) = (pg, maria) else { return Ok(Vec::new()) };
    let mut pg_conn = crate::postgres::db::connect(pg).await?;
    let mut maria_conn = crate::mariadb::db::connect(maria).await?;
    let url_db = crate::mariadb::db::url_database(maria)?;
    let mut out = Vec::new();
    for table in &topology.tables {
        let a = crate::postgres::schema::describe(&mut pg_conn, &pg.name, table).await?;
        let b = crate::mariadb::db::describe(&mut maria_conn, &maria.name, table, &url_db).await?;
        if let (Some(a), Some(b)) = (a, b) {
            out.extend(problems(&a, &pg.name, &b, &maria.name));
        }
    }
    Ok(out)
}

/// Whether two text columns take the same lengths: `varchar(n)` or
/// `char(n)` on both with the same n, or PostgreSQL's unbounded `text`
/// beside a MariaDB `text`, `mediumtext` or `longtext` (other families:
/// true).
fn same_length(pg: &ColumnInfo, maria: &Column) -> bool {
    if !matches!(pg.type_name.as_str(), "text" | "varchar" | "bpchar") {
        return true;
    }
    let pg_bound = modifiers(&pg.sql_type).first().copied();
    let maria_bound = match maria.data_type.as_str() {
        "char" | "varchar" => modifiers(&maria.column_type).first().copied(),
        "tinytext" => Some(255),
        _ => None,
    };
    pg_bound == maria_bound
}

fn is_mmsync(column: &str) -> bool {
    column == crate::topology::ORIGIN_COLUMN || column == crate::topology::VERSION_COLUMN
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pg(name: &str, sql_type: &str, type_name: &str) -> ColumnInfo {
        ColumnInfo { name: name.into(), sql_type: sql_type.into(), type_name: type_name.into() }
    }

    fn maria(name: &str, data_type: &str, column_type: &str) -> Column {
        Column::new(name, data_type, column_type, None, Some("utf8mb4_nopad_bin".into()))
    }

    #[test]
    fn twins_travel_and_types_without_a_twin_are_refused_with_the_reason() {
        let pairs = [
            (pg("a", "bigint", "int8"), maria("a", "bigint", "bigint(20)"), true),
            (pg("a", "integer", "int4"), maria("a", "bigint", "bigint(20)"), false),
            (pg("a", "numeric(12,2)", "numeric"), maria("a", "decimal", "decimal(12,2)"), true),
            (pg("a", "numeric(12,2)", "numeric"), maria("a", "decimal", "decimal(12,3)"), false),
            (pg("a", "boolean", "bool"), maria("a", "tinyint", "tinyint(1)"), true),
            (pg("a", "timestamp with time zone", "timestamptz"), maria("a", "datetime", "datetime(6)"), true),
            (pg("a", "timestamp with time zone", "timestamptz"), maria("a", "datetime", "datetime"), false),
            (pg("a", "bytea", "bytea"), maria("a", "varbinary", "varbinary(16)"), true),
            (pg("a", "jsonb", "jsonb"), maria("a", "longtext", "longtext"), true),
            (pg("a", "character varying(10)", "varchar"), maria("a", "varchar", "varchar(10)"), true),
            (pg("a", "text", "text"), maria("a", "varchar", "varchar(10)"), false),
            (pg("a", "text", "text"), maria("a", "longtext", "longtext"), true),
        ];
        for (p, m, ok) in pairs {
            let same = matches!((postgres_family(&p), mariadb_family(&m)), (Ok(a), Ok(b)) if same(&a, &b))
                && same_length(&p, &m);
            assert_eq!(same, ok, "{} vs {}", p.sql_type, m.column_type);
        }
        assert!(postgres_family(&pg("a", "integer[]", "_int4")).unwrap_err().contains("an array"));
        assert!(postgres_family(&pg("a", "numeric", "numeric")).unwrap_err().contains("NaN"));
        assert!(postgres_family(&pg("a", "interval", "interval")).is_err());
        assert!(mariadb_family(&maria("a", "int", "int(10) unsigned")).unwrap_err().contains("unsigned"));
    }

    #[test]
    fn a_case_insensitive_text_key_is_refused_for_a_mixed_mesh() {
        let name = crate::topology::TableName { schema: "public".into(), name: "t".into() };
        let pg_table = TableInfo {
            name: name.clone(),
            oid: 1,
            columns: vec![pg("k", "text", "text")],
            key: vec!["k".into()],
            replica_identity: "d".into(),
            unique: vec![],
        };
        let mut m = maria("k", "varchar", "varchar(10)");
        let pg_table = TableInfo { columns: vec![pg("k", "character varying(10)", "varchar")], ..pg_table };
        m.collation = Some("utf8mb4_general_ci".into());
        let maria_table = Table {
            name,
            database: "shop".into(),
            columns: vec![m],
            key: vec!["k".into()],
            unique: vec![],
            cascades: vec![],
            foreign_triggers: vec![],
        };
        let problems = problems(&pg_table, "seoul", &maria_table, "busan");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("utf8mb4_general_ci") && problems[0].contains("nopad_bin"), "{problems:?}");
    }
}
