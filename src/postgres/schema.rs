//! What mmsync needs on every master, and the checks before it: table shapes,
//! `check`, and `init` (mmsync's schema, the origin and version columns, the
//! stamping triggers, the publication, the slot, interleaved sequences).

use sqlx::{PgConnection, Row as _};

use crate::error::{Error, Result};
use crate::topology::{quote_ident, quote_literal, Master, TableName, Topology, ORIGIN_COLUMN, VERSION_COLUMN};

/// Publication that holds the synced tables and `mmsync.tombstones`.
pub const PUBLICATION: &str = "mmsync";

/// Replication slot of a master: slots are per cluster, so the name carries the master's.
pub fn slot_name(master: &str) -> String {
    format!("mmsync_{master}")
}

/// Types whose values mean nothing on another server (object ids, system columns).
const UNCARRIABLE_TYPES: &[&str] = &[
    "regclass",
    "regproc",
    "regprocedure",
    "regoper",
    "regoperator",
    "regtype",
    "regconfig",
    "regdictionary",
    "regnamespace",
    "regrole",
    "regcollation",
    "tid",
    "xid",
    "xid8",
    "cid",
    "oid",
];

/// A synced table as it is on one master.
#[derive(Debug, Clone)]
pub struct TableInfo {
    pub name: TableName,
    pub oid: i64,
    /// Columns in table order, generated columns excluded (pgoutput does not send them).
    pub columns: Vec<ColumnInfo>,
    /// Primary key columns in key order.
    pub key: Vec<String>,
    pub replica_identity: String,
    /// Unique indexes besides the primary key.
    pub unique: Vec<UniqueIndex>,
}

/// A unique index other than the primary key: two masters can each take the
/// same value under different keys, and only one row can keep it.
#[derive(Debug, Clone)]
pub struct UniqueIndex {
    pub name: String,
    /// Its key columns or expressions, in index order, as SQL over the
    /// table's unqualified columns (`email`, `lower(handle)`).
    pub exprs: Vec<String>,
    /// The predicate of a partial index (`deleted_at IS NULL`).
    pub predicate: Option<String>,
    /// `NULLS NOT DISTINCT`: two NULLs clash too.
    pub nulls_not_distinct: bool,
}

#[derive(Debug, Clone)]
pub struct ColumnInfo {
    pub name: String,
    /// The type as SQL spells it, e.g. `numeric(10,2)`, `integer[]`, `public.mood`.
    pub sql_type: String,
    pub type_name: String,
}

impl TableInfo {
    pub fn column(&self, name: &str) -> Option<&ColumnInfo> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// Columns of the application, without mmsync's own two.
    pub fn data_columns(&self) -> impl Iterator<Item = &ColumnInfo> {
        self.columns.iter().filter(|c| c.name != ORIGIN_COLUMN && c.name != VERSION_COLUMN)
    }

    /// SQL building the canonical key `{"col": "text", ...}` from a row alias.
    pub fn key_json_sql(&self, alias: &str) -> String {
        let parts: Vec<String> =
            self.key.iter().map(|k| format!("{}, {alias}.{}::text", quote_literal(k), quote_ident(k))).collect();
        format!("jsonb_build_object({})", parts.join(", "))
    }

    /// Whether the text form of a key column depends on session settings
    /// (dates, times, floats, bytea, money...): anything but the types below.
    pub fn key_text_depends_on_settings(&self) -> bool {
        const PLAIN: &[&str] =
            &["int2", "int4", "int8", "text", "varchar", "bpchar", "uuid", "numeric", "bool", "name", "citext"];
        self.key.iter().any(|k| self.column(k).is_none_or(|c| !PLAIN.contains(&c.type_name.as_str())))
    }

    /// Problems that stop this table from being synced, each with its fix.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.key.is_empty() {
            out.push(format!(
                "table {} has no primary key; add one (ALTER TABLE {} ADD PRIMARY KEY (...)): mmsync needs it to key changes and resolve conflicts",
                self.name,
                self.name.quoted()
            ));
        }
        if self.replica_identity == "n" {
            out.push(format!(
                "table {} has REPLICA IDENTITY NOTHING; run ALTER TABLE {} REPLICA IDENTITY DEFAULT",
                self.name,
                self.name.quoted()
            ));
        }
        for c in &self.columns {
            if UNCARRIABLE_TYPES.contains(&c.type_name.as_str()) {
                out.push(format!(
                    "column {:?} of table {} has type {}, which mmsync cannot carry between servers (its values are local object ids); change it to text or drop it",
                    c.name, self.name, c.sql_type
                ));
            }
        }
        out
    }
}

/// Reads a table's shape, or `None` if it does not exist.
pub async fn describe(conn: &mut PgConnection, master: &str, table: &TableName) -> Result<Option<TableInfo>> {
    let row = sqlx::query(
        "SELECT c.oid::int8, c.relreplident::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
    )
    .bind(&table.schema)
    .bind(&table.name)
    .fetch_optional(&mut *conn)
    .await
    .map_err(Error::db(master, format!("looking up table {table}")))?;
    let Some(row) = row else { return Ok(None) };
    let oid: i64 = row.get(0);
    let replica_identity: String = row.get(1);
    let rows = sqlx::query(
        "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), t.typname::text,
                array_position(i.indkey::int2[], a.attnum)
         FROM pg_attribute a
         JOIN pg_type t ON t.oid = a.atttypid
         LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary
         WHERE a.attrelid = $1::oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
         ORDER BY a.attnum",
    )
    .bind(oid)
    .fetch_all(&mut *conn)
    .await
    .map_err(Error::db(master, format!("reading the columns of {table}")))?;
    let mut columns = Vec::new();
    let mut key: Vec<(i32, String)> = Vec::new();
    for r in rows {
        let name: String = r.get(0);
        if let Some(pos) = r.get::<Option<i32>, _>(3) {
            key.push((pos, name.clone()));
        }
        columns.push(ColumnInfo { name, sql_type: r.get(1), type_name: r.get(2) });
    }
    key.sort();
    let unique = sqlx::query_as::<_, (String, Vec<String>, Option<String>, bool)>(
        "SELECT ic.relname::text,
                array(SELECT pg_get_indexdef(i.indexrelid, n, true) FROM generate_series(1, i.indnkeyatts) AS n),
                pg_get_expr(i.indpred, i.indrelid, true),
                i.indnullsnotdistinct
         FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
         WHERE i.indrelid = $1::oid AND i.indisunique AND NOT i.indisprimary
         ORDER BY 1",
    )
    .bind(oid)
    .fetch_all(&mut *conn)
    .await
    .map_err(Error::db(master, format!("reading the unique indexes of {table}")))?
    .into_iter()
    .map(|(name, exprs, predicate, nulls_not_distinct)| UniqueIndex { name, exprs, predicate, nulls_not_distinct })
    .collect();
    Ok(Some(TableInfo {
        name: table.clone(),
        oid,
        columns,
        key: key.into_iter().map(|(_, n)| n).collect(),
        replica_identity,
        unique,
    }))
}

// ---------------------------------------------------------------------------
// check

/// Checks every master's prerequisites and the broker. Returns every problem
/// found (empty when all is well); prints what it checked to `out`.
pub async fn check(topology: &Topology, out: &mut Vec<String>) -> Vec<String> {
    let mut problems = Vec::new();
    let mut records = Vec::new();
    for master in &topology.masters {
        let checked = match master.database() {
            crate::topology::Database::Postgres => check_master(topology, master, &mut records).await,
            crate::topology::Database::Mariadb => crate::mariadb::schema::check_master(topology, master).await,
        };
        match checked {
            Ok((summary, mut p)) => {
                if p.is_empty() {
                    out.push(format!("master {:?}: ok ({summary})", master.name));
                }
                problems.append(&mut p);
            }
            // A refusal of mmsync's own (TLS rules, the url) names its fix.
            Err(e @ Error::Setup { .. }) => problems.push(e.to_string()),
            Err(e) => problems.push(format!(
                "master {:?}: cannot connect to {} ({}); check that the server is running and the url is right",
                master.name,
                master.url,
                root_cause(&e)
            )),
        }
    }
    // A table on masters of both kinds: do its columns hold the same values?
    match crate::type_map::check(topology).await {
        Ok(mixed) => problems.extend(mixed),
        Err(e) => problems.push(format!("comparing the tables of PostgreSQL and MariaDB masters: {e}")),
    }
    let kafka = crate::kafka::check::check(topology, &records).await;
    out.extend(kafka.ok);
    out.extend(kafka.warnings.into_iter().map(|w| format!("warning: {w}")));
    problems.extend(kafka.problems);
    problems
}

/// Tables with at most this many rows (by the planner's estimate) are read
/// whole to find their largest row; larger ones are sampled down to about it.
const SIZE_SCAN_ROWS: f64 = 100_000.0;

/// What a record adds to a row's JSON: key, envelope fields, headers.
const RECORD_OVERHEAD_BYTES: u64 = 512;

/// The largest record a table's rows would make now, and whether it was sampled.
async fn largest_record(conn: &mut PgConnection, master: &str, table: &TableName) -> Result<(u64, bool)> {
    let rows: f64 = sqlx::query_scalar("SELECT reltuples::float8 FROM pg_class WHERE oid = $1::regclass")
        .bind(table.quoted())
        .fetch_one(&mut *conn)
        .await
        .map_err(Error::db(master, format!("estimating the rows of {table}")))?;
    let sample = if rows > SIZE_SCAN_ROWS {
        format!(" TABLESAMPLE SYSTEM ({})", (SIZE_SCAN_ROWS / rows * 100.0).max(0.01))
    } else {
        String::new()
    };
    let largest: i64 = sqlx::query_scalar(&format!(
        "SELECT coalesce(max(octet_length(row_to_json(t)::text)), 0)::int8 FROM {} t{sample}",
        table.quoted()
    ))
    .fetch_one(&mut *conn)
    .await
    .map_err(Error::db(master, format!("measuring the largest row of {table}")))?;
    Ok((largest as u64 + RECORD_OVERHEAD_BYTES, !sample.is_empty()))
}

fn root_cause(e: &Error) -> String {
    match e {
        Error::Db { source, .. } => source.to_string(),
        Error::Mariadb { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}

async fn check_master(
    topology: &Topology,
    master: &Master,
    records: &mut Vec<crate::kafka::check::RecordSize>,
) -> Result<(String, Vec<String>)> {
    let mut conn = crate::postgres::db::connect(master).await?;
    let name = &master.name;
    let mut problems = Vec::new();
    let setting = |rows: &[(String, String)], key: &str| {
        rows.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()).unwrap_or_default()
    };
    let settings: Vec<(String, String)> = sqlx::query_as(
        "SELECT name, setting FROM pg_settings WHERE name IN ('wal_level', 'max_replication_slots', 'max_wal_senders', 'server_version')",
    )
    .fetch_all(&mut conn)
    .await
    .map_err(Error::db(name, "reading settings"))?;
    let wal_level = setting(&settings, "wal_level");
    if wal_level != "logical" {
        problems.push(format!(
            "master {name:?}: wal_level is {wal_level:?}; set wal_level = logical in postgresql.conf and restart"
        ));
    }
    let (role, may_replicate): (String, bool) =
        sqlx::query_as("SELECT rolname::text, rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user")
            .fetch_one(&mut conn)
            .await
            .map_err(Error::db(name, "reading the role"))?;
    if !may_replicate {
        problems.push(format!(
            "master {name:?}: role {role:?} may not stream from a replication slot; run ALTER ROLE {} REPLICATION \
             (or connect as a superuser)",
            quote_ident(&role)
        ));
    }
    let may_apply: bool = sqlx::query_scalar(
        "SELECT rolsuper OR has_parameter_privilege('session_replication_role', 'SET') FROM pg_roles WHERE rolname = current_user",
    )
    .fetch_one(&mut conn)
    .await
    .map_err(Error::db(name, "reading the role's privileges"))?;
    if !may_apply {
        problems.push(format!(
            "master {name:?}: role {role:?} may not set session_replication_role, which mmsync's applier uses so that \
             replicated rows skip foreign-key checks and ordinary triggers (as PostgreSQL's own replication does); \
             run GRANT SET ON PARAMETER session_replication_role TO {} (or connect as a superuser)",
            quote_ident(&role)
        ));
    }
    let (slots_used, own_slot): (i64, bool) =
        sqlx::query_as("SELECT count(*), coalesce(bool_or(slot_name = $1), false) FROM pg_replication_slots")
            .bind(slot_name(name))
            .fetch_one(&mut conn)
            .await
            .map_err(Error::db(name, "reading replication slots"))?;
    let max_slots: i64 = setting(&settings, "max_replication_slots").parse().unwrap_or(0);
    if !own_slot && slots_used >= max_slots {
        problems.push(format!(
            "master {name:?}: max_replication_slots is {max_slots} and {slots_used} are in use; raise max_replication_slots in postgresql.conf and restart"
        ));
    }
    let max_senders: i64 = setting(&settings, "max_wal_senders").parse().unwrap_or(0);
    if max_senders < 1 {
        problems.push(format!(
            "master {name:?}: max_wal_senders is {max_senders}; set it to at least 1 in postgresql.conf and restart"
        ));
    }
    for table in &topology.tables {
        match describe(&mut conn, name, table).await? {
            None => problems.push(format!(
                "master {name:?}: table {table} does not exist; create it on every master (same columns) or remove it from [sync] tables"
            )),
            Some(info) => {
                problems.extend(info.problems().into_iter().map(|p| format!("master {name:?}: {p}")));
                match largest_record(&mut conn, name, table).await {
                    Ok((bytes, sampled)) => records.push(crate::kafka::check::RecordSize {
                        topic: crate::kafka::topic_name(&topology.kafka.topic_prefix, name, table),
                        what: format!("the largest row of {table} on {name}{}", if sampled { " (sampled)" } else { "" }),
                        bytes,
                    }),
                    Err(e) => problems.push(format!(
                        "master {name:?}: cannot read {table} ({}); mmsync's role needs SELECT, INSERT, UPDATE and \
                         DELETE on every synced table",
                        root_cause(&e)
                    )),
                }
            }
        }
    }
    let summary = format!(
        "PostgreSQL {}, wal_level {wal_level}, {} table(s)",
        setting(&settings, "server_version"),
        topology.tables.len()
    );
    Ok((summary, problems))
}

// ---------------------------------------------------------------------------
// init

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Installs everything sync needs on every master and creates the topics.
/// Idempotent: returns one line per thing it changed, nothing on a second run.
pub async fn init(topology: &Topology) -> Result<Vec<String>> {
    let mut done = Vec::new();
    // Every table must be syncable everywhere before anything is changed anywhere.
    let mixed = crate::type_map::check(topology).await?;
    if !mixed.is_empty() {
        return Err(Error::Setup {
            master: "all".into(),
            problem: format!("tables differ between the PostgreSQL and MariaDB masters: {}", mixed.join("; ")),
            fix: "change the columns as each problem says (`mmsync check` lists them all), then run init again".into(),
        });
    }
    let mut conns = Vec::new();
    for master in topology.masters.iter().filter(|m| m.database() == crate::topology::Database::Postgres) {
        let mut conn = crate::postgres::db::connect(master).await?;
        for table in &topology.tables {
            let info = describe(&mut conn, &master.name, table).await?.ok_or_else(|| Error::Setup {
                master: master.name.clone(),
                problem: format!("table {table} does not exist"),
                fix: "create it on every master (same columns) or remove it from [sync] tables".into(),
            })?;
            if let Some(problem) = info.problems().into_iter().next() {
                return Err(Error::Setup { master: master.name.clone(), problem, fix: "then run init again".into() });
            }
        }
        conns.push((master, conn));
    }
    for (master, conn) in conns.iter_mut() {
        for line in init_master(topology, master, conn).await? {
            done.push(format!("master {:?}: {line}", master.name));
        }
    }
    done.extend(crate::mariadb::schema::init(topology).await?);
    if !conns.is_empty() {
        for table in &topology.synced_tables() {
            done.extend(interleave_sequences(topology, &mut conns, table).await?);
        }
    }
    for topic in crate::kafka::create_topics(topology).await? {
        done.push(format!("kafka: created topic {topic} ({} partitions)", topology.kafka.partitions));
    }
    Ok(done)
}

/// Runs SQL on `master`, naming `what` it does in the error.
pub(crate) async fn exec(conn: &mut PgConnection, master: &str, what: &str, sql: &str) -> Result<()> {
    sqlx::raw_sql(sql).execute(&mut *conn).await.map_err(Error::db(master, what.to_string()))?;
    Ok(())
}

async fn init_master(topology: &Topology, master: &Master, conn: &mut PgConnection) -> Result<Vec<String>> {
    let name = master.name.as_str();
    let mut done = Vec::new();

    // mmsync's own schema, with sqlx's bookkeeping kept inside it.
    let had_schema: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'mmsync')")
        .fetch_one(&mut *conn)
        .await
        .map_err(Error::db(name, "looking up schema mmsync"))?;
    exec(conn, name, "creating schema mmsync", "CREATE SCHEMA IF NOT EXISTS mmsync; SET search_path TO mmsync").await?;
    let migrated = MIGRATOR.run(&mut *conn).await;
    exec(conn, name, "resetting search_path", "RESET search_path").await?;
    migrated.map_err(|e| Error::Setup {
        master: name.into(),
        problem: format!("applying mmsync's migrations failed: {e}"),
        fix: "check that the user may create schemas and tables in this database".into(),
    })?;
    if !had_schema {
        done.push("created schema mmsync".to_string());
    }
    let current: Option<String> = sqlx::query_scalar(
        "SELECT prosrc FROM pg_proc WHERE proname = 'local_master' AND pronamespace = 'mmsync'::regnamespace",
    )
    .fetch_optional(&mut *conn)
    .await
    .map_err(Error::db(name, "reading mmsync.local_master"))?;
    let body = format!(" SELECT {}::text ", quote_literal(name));
    if current.as_deref() != Some(body.as_str()) {
        exec(
            conn,
            name,
            "creating mmsync.local_master",
            &format!(
                "CREATE OR REPLACE FUNCTION mmsync.local_master() RETURNS text LANGUAGE sql IMMUTABLE AS $${body}$$"
            ),
        )
        .await?;
        done.push(format!("this database is master {name:?}"));
    }
    let skew_us = topology.sync.max_clock_skew.as_micros() as i64;
    let current: Option<String> = sqlx::query_scalar(
        "SELECT prosrc FROM pg_proc WHERE proname = 'max_clock_skew_us' AND pronamespace = 'mmsync'::regnamespace",
    )
    .fetch_optional(&mut *conn)
    .await
    .map_err(Error::db(name, "reading mmsync.max_clock_skew_us"))?;
    let body = format!(" SELECT {skew_us}::bigint ");
    if current.as_deref() != Some(body.as_str()) {
        exec(
            conn,
            name,
            "creating mmsync.max_clock_skew_us",
            &format!(
                "CREATE OR REPLACE FUNCTION mmsync.max_clock_skew_us() RETURNS bigint LANGUAGE sql IMMUTABLE AS $${body}$$"
            ),
        )
        .await?;
        done.push(format!("versions may run at most {} ms ahead of the clock", skew_us / 1000));
    }

    for table in &topology.synced_tables() {
        let info = describe(conn, name, table).await?.expect("checked above, or made by the migrations");
        done.extend(install_table(conn, name, &info).await?);
    }

    // The publication: synced tables and the tombstones that carry deletes.
    let published: Vec<(String, String)> =
        sqlx::query_as("SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1")
            .bind(PUBLICATION)
            .fetch_all(&mut *conn)
            .await
            .map_err(Error::db(name, "reading the publication"))?;
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)")
        .bind(PUBLICATION)
        .fetch_one(&mut *conn)
        .await
        .map_err(Error::db(name, "looking up the publication"))?;
    let mut wanted = vec![TableName { schema: "mmsync".into(), name: "tombstones".into() }];
    wanted.extend(topology.synced_tables());
    let missing: Vec<&TableName> =
        wanted.iter().filter(|t| !published.iter().any(|(s, n)| *s == t.schema && *n == t.name)).collect();
    if !missing.is_empty() {
        let list: Vec<String> = missing.iter().map(|t| t.quoted()).collect();
        let sql = if exists {
            format!("ALTER PUBLICATION {} ADD TABLE {}", quote_ident(PUBLICATION), list.join(", "))
        } else {
            format!("CREATE PUBLICATION {} FOR TABLE {}", quote_ident(PUBLICATION), list.join(", "))
        };
        exec(conn, name, "creating the publication", &sql).await?;
        let names: Vec<String> = missing.iter().map(|t| t.to_string()).collect();
        done.push(format!("publication {PUBLICATION} now includes {}", names.join(", ")));
    }

    // The slot, last: changes from here on are captured.
    let slot = slot_name(name);
    let has_slot: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)")
        .bind(&slot)
        .fetch_one(&mut *conn)
        .await
        .map_err(Error::db(name, "looking up the slot"))?;
    if !has_slot {
        sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
            .bind(&slot)
            .execute(&mut *conn)
            .await
            .map_err(Error::db(name, format!("creating replication slot {slot}")))?;
        done.push(format!("created replication slot {slot} (pgoutput)"));
    }
    Ok(done)
}

/// Adds the origin and version columns and the stamping triggers to one table.
async fn install_table(conn: &mut PgConnection, master: &str, info: &TableInfo) -> Result<Vec<String>> {
    let mut done = Vec::new();
    let t = info.name.quoted();
    if info.column(ORIGIN_COLUMN).is_none() || info.column(VERSION_COLUMN).is_none() {
        // Rows that exist before init get an empty origin and version 0 on every
        // master alike, so identical data stays identical.
        exec(
            conn,
            master,
            &format!("adding mmsync columns to {}", info.name),
            &format!(
                "ALTER TABLE {t} ADD COLUMN IF NOT EXISTS {} text COLLATE \"C\" NOT NULL DEFAULT '', \
                 ADD COLUMN IF NOT EXISTS {} bigint NOT NULL DEFAULT 0",
                quote_ident(ORIGIN_COLUMN),
                quote_ident(VERSION_COLUMN)
            ),
        )
        .await?;
        done.push(format!("added columns {ORIGIN_COLUMN}, {VERSION_COLUMN} to {}", info.name));
    }
    let function = format!("mmsync.{}", quote_ident(&format!("stamp_{}", info.oid)));
    let body = trigger_body(info);
    let current: Option<String> =
        sqlx::query_scalar("SELECT prosrc FROM pg_proc WHERE proname = $1 AND pronamespace = 'mmsync'::regnamespace")
            .bind(format!("stamp_{}", info.oid))
            .fetch_optional(&mut *conn)
            .await
            .map_err(Error::db(master, "reading trigger functions"))?;
    let triggers: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = $1::oid AND tgname IN ('mmsync_stamp', 'mmsync_tombstone', 'mmsync_truncate')",
    )
    .bind(info.oid)
    .fetch_one(&mut *conn)
    .await
    .map_err(Error::db(master, "reading triggers"))?;
    if current.as_deref() != Some(body.as_str()) || triggers != 3 {
        // The key text must not depend on the writer's session settings: when
        // a key type's text form does, the function pins the same settings as
        // mmsync's own connections (that costs a little on every write, so
        // only then).
        let pinned = if info.key_text_depends_on_settings() {
            "SET datestyle = 'ISO, MDY' SET intervalstyle = 'postgres' SET timezone = 'UTC' \
             SET extra_float_digits = 2 SET bytea_output = 'hex' SET lc_monetary = 'C'"
        } else {
            ""
        };
        let quoted = dollar_quote(&body);
        let sql = format!(
            "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql {pinned} AS {quoted};
             CREATE OR REPLACE TRIGGER mmsync_stamp BEFORE INSERT OR UPDATE ON {t} FOR EACH ROW EXECUTE FUNCTION {function}();
             CREATE OR REPLACE TRIGGER mmsync_tombstone AFTER DELETE ON {t} FOR EACH ROW EXECUTE FUNCTION {function}();
             CREATE OR REPLACE TRIGGER mmsync_truncate BEFORE TRUNCATE ON {t} FOR EACH STATEMENT EXECUTE FUNCTION mmsync.refuse_truncate();
             ALTER TABLE {t} ENABLE TRIGGER mmsync_stamp, ENABLE TRIGGER mmsync_tombstone, ENABLE TRIGGER mmsync_truncate;"
        );
        exec(conn, master, &format!("installing triggers on {}", info.name), &sql).await?;
        done.push(format!("installed triggers on {}", info.name));
    }
    Ok(done)
}

/// `body` between dollar quotes whose tag it does not contain, so that no
/// identifier in it (a column named `a$mmsync$b`, say) can end the quoting.
fn dollar_quote(body: &str) -> String {
    let tag = (0..)
        .map(|n| if n == 0 { "$mmsync$".to_string() } else { format!("$mmsync{n}$") })
        .find(|tag| !body.contains(tag.as_str()))
        .expect("some tag is absent from a finite body");
    format!("{tag}{body}{tag}")
}

/// The trigger: a local write stamps origin = this master and a version that
/// beats both the clock and what it replaces; a local delete records a
/// tombstone. Writes of mmsync's applier never get here: it writes with
/// `session_replication_role = replica` ([`crate::postgres::apply::APPLIER_SESSION`]),
/// in which ordinary triggers do not fire, so what it sets is kept.
///
/// An insert (or a key change) must also beat its key's tombstone, but a
/// tombstone can only matter when its version has reached the clock, and
/// `mmsync.tombstone_high` bounds them all (migration 0003): the tombstone is
/// looked up only when that bound has reached the clock.
///
/// It runs on every local write, so it does the least work plpgsql allows:
/// the clock is read once, `next_version(previous, n)` is inlined into plain
/// arithmetic, and nothing it calls is planned again per row (migration
/// 0010; the version before planned `next_version` on each call, which cost
/// a synced table more than half its upsert rate).
fn trigger_body(info: &TableInfo) -> String {
    let (o, v) = (quote_ident(ORIGIN_COLUMN), quote_ident(VERSION_COLUMN));
    let (schema, table) = (quote_literal(&info.name.schema), quote_literal(&info.name.name));
    let new_key = info.key_json_sql("NEW");
    let old_key = info.key_json_sql("OLD");
    let key_changed: Vec<String> =
        info.key.iter().map(|k| format!("NEW.{0} IS DISTINCT FROM OLD.{0}", quote_ident(k))).collect();
    format!(
        r#"
-- key text: {key_text}; the applier's writes (session_replication_role = replica) skip this trigger
DECLARE
    n bigint := mmsync.now_us();
    tombstone bigint;
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM mmsync.record_tombstone({schema}, {table}, {old_key}, mmsync.next_version(OLD.{v}, n), mmsync.local_master());
        RETURN OLD;
    END IF;
    IF (TG_OP = 'INSERT' OR ({key_changed}))
       AND coalesce(pg_sequence_last_value('mmsync.tombstone_high'), 0) >= n THEN
        SELECT version INTO tombstone FROM mmsync.tombstones
         WHERE schema_name = {schema} AND table_name = {table} AND key = {new_key};
    END IF;
    NEW.{o} := mmsync.local_master();
    IF TG_OP = 'INSERT' THEN
        NEW.{v} := mmsync.next_version(tombstone, n);
    ELSE
        NEW.{v} := mmsync.next_version(greatest(OLD.{v}, tombstone), n);
        IF {key_changed} THEN
            -- the old key is gone: to the other masters that is a delete
            PERFORM mmsync.record_tombstone({schema}, {table}, {old_key}, NEW.{v}, mmsync.local_master());
        END IF;
    END IF;
    RETURN NEW;
END
"#,
        key_changed = key_changed.join(" OR "),
        key_text = if info.key_text_depends_on_settings() { "settings pinned" } else { "independent of settings" },
    )
}

/// For integer keys fed by a sequence or identity: increment = number of
/// masters, and a residue per master (its place in the topology), so two
/// masters never mint the same id.
///
/// Applications keep writing meanwhile, and ids minted under the old
/// increment may not have reached every master yet (a master that joins, or
/// `mmsync run` stopped), so no master's own rows say where it is safe to
/// start. The sequences are therefore changed together: each master's is
/// locked first (a no-op `ALTER SEQUENCE` blocks `nextval` until commit),
/// then the highest id any of them minted or holds is read under those
/// locks, and every sequence restarts above it, at its own residue. Inserts
/// wait for the moment that takes; none can mint an id that exists.
async fn interleave_sequences(
    topology: &Topology,
    conns: &mut [(&Master, PgConnection)],
    table: &TableName,
) -> Result<Vec<String>> {
    // Every master counts, MariaDB ones too (their auto_increment_offset is
    // their place in the topology, as `check` asks).
    let n = topology.masters.len() as i64;
    let place = |master: &Master| topology.masters.iter().position(|m| m.name == master.name).unwrap_or(0);
    let mut done = Vec::new();
    let first = &mut conns[0];
    let Some(info) = describe(&mut first.1, &first.0.name, table).await? else { return Ok(done) };
    for key in &info.key {
        let column = info.column(key).expect("key columns are columns");
        if !["int2", "int4", "int8"].contains(&column.type_name.as_str()) {
            continue;
        }
        // Each master's sequence of this column, and whether it is in place.
        let mut seqs: Vec<Option<String>> = Vec::new();
        let mut in_place = true;
        for (master, conn) in conns.iter_mut() {
            let index = place(master);
            let seq: Option<String> = sqlx::query_scalar("SELECT pg_get_serial_sequence($1, $2)")
                .bind(table.quoted())
                .bind(key)
                .fetch_one(&mut *conn)
                .await
                .map_err(Error::db(&master.name, format!("looking up the sequence of {table}.{key}")))?;
            if let Some(seq) = &seq {
                let (increment, next) = sequence_state(conn, &master.name, seq).await?;
                in_place &= increment == n && next.rem_euclid(n) == residue(index, n);
            }
            seqs.push(seq);
        }
        if in_place {
            continue;
        }
        let places: Vec<usize> = conns.iter().map(|(m, _)| place(m)).collect();
        match restart_together(conns, &seqs, &places, table, key, n).await {
            Ok(lines) => done.extend(lines),
            Err(e) => {
                // Nothing changes where nothing committed: no lock stays held.
                for (_, conn) in conns.iter_mut() {
                    let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
                }
                return Err(e);
            }
        }
    }
    Ok(done)
}

/// Locks every master's sequence of `table.key`, finds the highest id any
/// master minted or holds, and restarts each above it at its own residue,
/// in one transaction per master, committed together at the end (a commit
/// that fails there leaves the masters before it changed: run init again).
async fn restart_together(
    conns: &mut [(&Master, PgConnection)],
    seqs: &[Option<String>],
    places: &[usize],
    table: &TableName,
    key: &str,
    n: i64,
) -> Result<Vec<String>> {
    let mut done = Vec::new();
    // Lock every sequence, then find the highest id anywhere.
    let mut high = 0i64;
    for ((master, conn), seq) in conns.iter_mut().zip(seqs) {
        let name = master.name.as_str();
        exec(conn, name, "beginning", "BEGIN; SET LOCAL lock_timeout = '30s'").await?;
        if let Some(seq) = seq {
            let (increment, next) = sequence_state(conn, name, seq).await?;
            exec(
                conn,
                name,
                &format!("locking sequence {seq}"),
                &format!("ALTER SEQUENCE {seq} INCREMENT BY {increment}"),
            )
            .await?;
            // Read again under the lock: nextval may have moved it since.
            let (_, next_locked) = sequence_state(conn, name, seq).await?;
            high = high.max(next.max(next_locked) - 1);
        }
        let max_key: Option<i64> =
            sqlx::query_scalar(&format!("SELECT max({})::int8 FROM {}", quote_ident(key), table.quoted()))
                .fetch_one(&mut *conn)
                .await
                .map_err(Error::db(name, format!("reading max({key}) of {table}")))?;
        high = high.max(max_key.unwrap_or(0));
    }
    for (((master, conn), seq), &index) in conns.iter_mut().zip(seqs).zip(places) {
        let name = master.name.as_str();
        if let Some(seq) = seq {
            let residue = residue(index, n);
            let restart = (high + 1) + (residue - (high + 1)).rem_euclid(n);
            exec(
                conn,
                name,
                &format!("interleaving sequence {seq}"),
                &format!("ALTER SEQUENCE {seq} INCREMENT BY {n} RESTART WITH {restart}"),
            )
            .await?;
            done.push(format!(
                "master {name:?}: sequence {seq} of {table}.{key}: increment {n}, next value {restart} \
                 (ids = {residue} mod {n} on this master, above {high}, the highest id any master minted or holds)"
            ));
        }
    }
    for (master, conn) in conns.iter_mut() {
        exec(conn, &master.name, "committing the sequences", "COMMIT").await?;
    }
    Ok(done)
}

/// The residue of ids minted on the master at `index` of `n`.
fn residue(index: usize, n: i64) -> i64 {
    (index as i64 + 1) % n
}

/// A sequence's increment and the value its next `nextval` returns.
async fn sequence_state(conn: &mut PgConnection, master: &str, seq: &str) -> Result<(i64, i64)> {
    let increment: i64 = sqlx::query_scalar("SELECT seqincrement FROM pg_sequence WHERE seqrelid = $1::regclass")
        .bind(seq)
        .fetch_one(&mut *conn)
        .await
        .map_err(Error::db(master, format!("reading sequence {seq}")))?;
    let (last, called): (i64, bool) = sqlx::query_as(&format!("SELECT last_value, is_called FROM {seq}"))
        .fetch_one(&mut *conn)
        .await
        .map_err(Error::db(master, format!("reading sequence {seq}")))?;
    Ok((increment, if called { last + increment } else { last }))
}

#[cfg(test)]
mod tests {
    #[test]
    fn no_identifier_can_end_the_trigger_functions_quoting() {
        let body = r#"NEW."k$mmsync$; ALTER ROLE app SUPERUSER; --" := 1; -- $mmsync1$"#;
        assert_eq!(super::dollar_quote(body), format!("$mmsync2${body}$mmsync2$"));
        assert_eq!(super::dollar_quote("plain"), "$mmsync$plain$mmsync$");
    }
}
