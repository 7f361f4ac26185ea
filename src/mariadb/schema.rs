//! What `mmsync check` looks at and `mmsync init` installs on a MariaDB master.
//!
//! mmsync's own tables live in database `mmsync`: tombstones, applied
//! offsets, conflicts, dead letters, heartbeats, and the binlog position the
//! source has produced up to (there is no slot: the position is mmsync's to
//! keep). Each synced table gets the origin and version columns and three
//! triggers that stamp local writes, as on PostgreSQL:
//!
//! - BEFORE INSERT and BEFORE UPDATE set the origin to this master and the
//!   version to a microsecond clock in UTC (independent of the session's
//!   time zone) that also beats the version the row replaces and the key's
//!   tombstone; an update that changes the key records the old key's
//!   tombstone.
//! - AFTER DELETE records the key's tombstone, which is how a delete leaves
//!   this master (the binlog's delete event is not needed).
//!
//! MariaDB has no `session_replication_role`: triggers fire for every
//! session. The applier's writes are told apart by two things together: its
//! session sets `@mmsync_applier = 1`, and it is connected as mmsync's own
//! user (the triggers name it). An application can set the variable but
//! cannot be that user without its password, so it cannot pass for the
//! applier and write rows that are never sent.

use mysql_async::prelude::Queryable;
use mysql_async::Conn;

use crate::error::{Error, Result};
use crate::mariadb::db::{connect, describe, quote_ident, quote_literal, url_database, user, Table};
use crate::topology::{Database, Master, Topology, ORIGIN_COLUMN, VERSION_COLUMN};

/// mmsync's own tables. `IF NOT EXISTS` throughout: init runs again safely.
const OWN_TABLES: &[&str] = &[
    "CREATE DATABASE IF NOT EXISTS mmsync CHARACTER SET utf8mb4 COLLATE utf8mb4_bin",
    // Deleted keys: `key_text` is the key as a JSON object of its columns'
    // text ([`Table::key_text_sql`]).
    "CREATE TABLE IF NOT EXISTS mmsync.tombstones (
        schema_name VARCHAR(64) NOT NULL,
        table_name  VARCHAR(64) NOT NULL,
        key_text    VARCHAR(512) NOT NULL,
        version     BIGINT NOT NULL,
        origin      VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
        deleted_at  DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
        PRIMARY KEY (schema_name, table_name, key_text)
    ) ENGINE = InnoDB",
    "CREATE TABLE IF NOT EXISTS mmsync.applied_offsets (
        topic          VARCHAR(249) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
        `partition`    INT NOT NULL,
        next_offset    BIGINT NOT NULL,
        last_commit_ms BIGINT NULL,
        applied_at     DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
        PRIMARY KEY (topic, `partition`)
    ) ENGINE = InnoDB",
    "CREATE TABLE IF NOT EXISTS mmsync.conflicts (
        id               BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        logged_at        DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
        schema_name      VARCHAR(64) NOT NULL,
        table_name       VARCHAR(64) NOT NULL,
        key_text         TEXT NOT NULL,
        kind             VARCHAR(64) NOT NULL,
        incoming_op      VARCHAR(1) NOT NULL,
        incoming_version BIGINT NOT NULL,
        incoming_origin  VARCHAR(64) NOT NULL,
        winner_version   BIGINT NOT NULL,
        winner_origin    VARCHAR(64) NOT NULL,
        loser_row        LONGTEXT NULL
    ) ENGINE = InnoDB",
    "CREATE TABLE IF NOT EXISTS mmsync.dead_letters (
        id           BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        logged_at    DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
        topic        VARCHAR(249) NOT NULL,
        `partition`  INT NOT NULL,
        kafka_offset BIGINT NOT NULL,
        reason       TEXT NOT NULL,
        record_key   LONGBLOB NULL,
        record_value LONGBLOB NULL,
        retried_at   DATETIME(6) NULL,
        KEY pending (topic, retried_at)
    ) ENGINE = InnoDB",
    "CREATE TABLE IF NOT EXISTS mmsync.heartbeats (
        master  VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
        beat_at DATETIME(6) NOT NULL
    ) ENGINE = InnoDB",
    // The GTID position (as @@gtid_binlog_pos writes it) after the last
    // transaction whose changes Kafka acknowledged.
    "CREATE TABLE IF NOT EXISTS mmsync.capture_position (
        master     VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
        gtid_pos   VARCHAR(4096) NOT NULL,
        updated_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)
    ) ENGINE = InnoDB",
];

/// The server settings a MariaDB master needs: (variable, wanted value, why).
const BINLOG_SETTINGS: &[(&str, &str, &str)] = &[
    ("log_bin", "1", "the binlog is what mmsync captures; start the server with log_bin"),
    ("binlog_format", "ROW", "statements cannot be turned into row changes; set binlog_format = ROW"),
    ("binlog_row_image", "FULL", "every column of a row must be in its event; set binlog_row_image = FULL"),
    ("binlog_row_metadata", "FULL", "column names and signedness come from the binlog; set binlog_row_metadata = FULL"),
];

/// The condition under which a trigger leaves a write alone: mmsync's
/// applier, marked and connected as mmsync's user.
fn applier_condition(applier_user: &str) -> String {
    format!("(@mmsync_applier <=> 1 AND SUBSTRING_INDEX(USER(), '@', 1) = {})", quote_literal(applier_user))
}

/// A version that beats the clock and `previous`, within the allowed skew.
fn next_version(previous: &str, skew_us: i64) -> String {
    format!("GREATEST(n, LEAST(COALESCE({previous}, 0), n + {skew_us} - 1) + 1)")
}

/// The microsecond clock, in UTC whatever the session's time zone.
const NOW_US: &str = "SET n = TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6));";

/// Records or raises a tombstone: the newer (version, origin) stays. In
/// `ON DUPLICATE KEY UPDATE` assignments run left to right, so the version,
/// which the comparison reads, is assigned last.
pub const TOMBSTONE_UPSERT: &str = "ON DUPLICATE KEY UPDATE
    deleted_at = IF((version, origin) < (VALUES(version), VALUES(origin)), CURRENT_TIMESTAMP(6), deleted_at),
    origin = IF((version, origin) < (VALUES(version), VALUES(origin)), VALUES(origin), origin),
    version = IF((version, origin) < (VALUES(version), VALUES(origin)), VALUES(version), version)";

/// The three triggers of a table: (name, statement).
fn triggers(table: &Table, master: &str, applier_user: &str, skew_us: i64) -> Vec<(String, String)> {
    let t = table.quoted();
    let db = quote_ident(&table.database);
    let (o, v) = (quote_ident(ORIGIN_COLUMN), quote_ident(VERSION_COLUMN));
    let (schema, name) = (quote_literal(&table.name.schema), quote_literal(&table.name.name));
    let me = quote_literal(master);
    let applier = applier_condition(applier_user);
    let new_key = table.key_text_sql(|k| format!("NEW.{}", quote_ident(k)));
    let old_key = table.key_text_sql(|k| format!("OLD.{}", quote_ident(k)));
    let same_key: Vec<String> =
        table.key.iter().map(|k| format!("BINARY NEW.{0} <=> BINARY OLD.{0}", quote_ident(k))).collect();
    let same_key = same_key.join(" AND ");
    // A locking read: it sees the newest committed tombstone (and waits
    // for one being written), whatever the session's snapshot says.
    let tombstone_into = |key: &str, var: &str| {
        format!(
            "SELECT version INTO {var} FROM mmsync.tombstones
             WHERE schema_name = {schema} AND table_name = {name} AND key_text = {key} LOCK IN SHARE MODE;"
        )
    };
    let new_key_match: Vec<String> = table.key.iter().map(|k| format!("{0} = NEW.{0}", quote_ident(k))).collect();
    let record_tombstone = |key: &str, version: &str| {
        format!(
            "INSERT INTO mmsync.tombstones (schema_name, table_name, key_text, version, origin)
             VALUES ({schema}, {name}, {key}, {version}, {me}) {TOMBSTONE_UPSERT};"
        )
    };
    let trigger_name = |what: &str| format!("mmsync_{}_{what}", table.name.name);
    vec![
        (
            trigger_name("bi"),
            format!(
                "CREATE OR REPLACE TRIGGER {db}.{} BEFORE INSERT ON {t} FOR EACH ROW
                 BEGIN
                   DECLARE n BIGINT;
                   DECLARE previous BIGINT;
                   DECLARE existing BIGINT;
                   IF NOT {applier} THEN
                     {NOW_US}
                     {}
                     -- REPLACE deletes the row it replaces after this trigger ran, and
                     -- the delete's tombstone would beat (or tie) this row: beat it.
                     SELECT {v} INTO existing FROM {t} WHERE {};
                     IF existing IS NOT NULL THEN
                       SET previous = GREATEST(COALESCE(previous, 0), {});
                     END IF;
                     SET NEW.{o} = {me};
                     SET NEW.{v} = {};
                   END IF;
                 END",
                quote_ident(&trigger_name("bi")),
                tombstone_into(&new_key, "previous"),
                new_key_match.join(" AND "),
                next_version("existing", skew_us),
                next_version("previous", skew_us)
            ),
        ),
        (
            trigger_name("bu"),
            format!(
                "CREATE OR REPLACE TRIGGER {db}.{} BEFORE UPDATE ON {t} FOR EACH ROW
                 BEGIN
                   DECLARE n BIGINT;
                   DECLARE previous BIGINT;
                   DECLARE tombstone BIGINT;
                   IF NOT {applier} THEN
                     {NOW_US}
                     SET previous = OLD.{v};
                     IF NOT ({same_key}) THEN
                       {}
                       SET previous = GREATEST(COALESCE(previous, 0), COALESCE(tombstone, 0));
                     END IF;
                     SET NEW.{o} = {me};
                     SET NEW.{v} = {};
                     IF NOT ({same_key}) THEN
                       {}
                     END IF;
                   END IF;
                 END",
                quote_ident(&trigger_name("bu")),
                tombstone_into(&new_key, "tombstone"),
                next_version("previous", skew_us),
                record_tombstone(&old_key, &format!("NEW.{v}")),
            ),
        ),
        (
            trigger_name("ad"),
            format!(
                "CREATE OR REPLACE TRIGGER {db}.{} AFTER DELETE ON {t} FOR EACH ROW
                 BEGIN
                   DECLARE n BIGINT;
                   IF NOT {applier} THEN
                     {NOW_US}
                     {}
                   END IF;
                 END",
                quote_ident(&trigger_name("ad")),
                record_tombstone(&old_key, &next_version(&format!("OLD.{v}"), skew_us)),
            ),
        ),
    ]
}

/// Runs one statement on a MariaDB master, naming `what` it does in the error.
pub(crate) async fn exec(conn: &mut Conn, master: &str, what: &str, sql: &str) -> Result<()> {
    conn.query_drop(sql).await.map_err(Error::mariadb(master, what.to_string()))
}

/// A server variable's value as text.
async fn variable(conn: &mut Conn, master: &str, name: &str) -> Result<String> {
    let value: Option<Option<String>> = conn
        .query_first(format!("SELECT CAST(@@GLOBAL.{name} AS CHAR)"))
        .await
        .map_err(Error::mariadb(master, format!("reading @@{name}")))?;
    Ok(value.flatten().unwrap_or_default())
}

/// The binlog settings of the server that are not what mmsync needs:
/// (variable, its value, what is wanted, why).
async fn binlog_problems(
    conn: &mut Conn,
    master: &str,
) -> Result<Vec<(&'static str, String, &'static str, &'static str)>> {
    let mut out = Vec::new();
    for (var, wanted, why) in BINLOG_SETTINGS {
        let value = variable(conn, master, var).await?;
        let fine = value.eq_ignore_ascii_case(wanted) || (*wanted == "1" && value.eq_ignore_ascii_case("ON"));
        if !fine {
            out.push((*var, value, *wanted, *why));
        }
    }
    Ok(out)
}

/// The problems `check` reports for a MariaDB master (empty when it is ready),
/// and a summary line.
pub async fn check_master(topology: &Topology, master: &Master) -> Result<(String, Vec<String>)> {
    let name = master.name.as_str();
    let mut conn = connect(master).await?;
    let mut problems = Vec::new();
    for (var, value, wanted, why) in binlog_problems(&mut conn, name).await? {
        problems.push(format!(
            "master {name:?}: {var} is {value:?}, not {wanted}: {why} (in the server's configuration, then restart it)"
        ));
    }
    let version = variable(&mut conn, name, "version").await?;
    let server_id = variable(&mut conn, name, "server_id").await?;
    let domain = variable(&mut conn, name, "gtid_domain_id").await?;
    let increment: i64 = variable(&mut conn, name, "auto_increment_increment").await?.parse().unwrap_or(1);
    let offset: i64 = variable(&mut conn, name, "auto_increment_offset").await?.parse().unwrap_or(1);
    let n = topology.masters.len() as i64;
    let place = topology.masters.iter().position(|m| m.name == master.name).unwrap_or(0) as i64 + 1;
    if (increment, offset) != (n, place) {
        problems.push(format!(
            "master {name:?}: auto_increment_increment is {increment} and auto_increment_offset {offset}, so two masters can mint the same id; \
             set auto_increment_increment = {n} and auto_increment_offset = {place} (its place in topology.toml) in its configuration (SET GLOBAL for the running server)"
        ));
    }
    let grants: Vec<String> = conn.query("SHOW GRANTS").await.map_err(Error::mariadb(name, "reading grants"))?;
    let all = grants.join(" ").to_uppercase();
    for (privilege, why) in
        [("REPLICATION SLAVE", "to stream the binlog"), ("TRIGGER", "to install the stamping triggers")]
    {
        if !all.contains(privilege) && !all.contains("ALL PRIVILEGES ON *.*") {
            problems.push(format!(
                "master {name:?}: the user may not {why}; GRANT {privilege} ON *.* TO it (see SHOW GRANTS)"
            ));
        }
    }
    let url_db = url_database(master)?;
    for table in &topology.tables {
        match describe(&mut conn, name, table, &url_db).await? {
            None => problems.push(format!(
                "master {name:?}: table {table} (database {}) does not exist; create it (same columns as on the other masters)",
                crate::mariadb::db::database_of(table, &url_db)
            )),
            Some(t) => problems.extend(t.problems().into_iter().map(|p| format!("master {name:?}: {p}"))),
        }
    }
    let expire = variable(&mut conn, name, "binlog_expire_logs_seconds").await.unwrap_or_default();
    let summary = format!(
        "MariaDB {version}, server_id {server_id}, gtid_domain_id {domain}, binlogs kept {}",
        match expire.parse::<u64>() {
            Ok(0) | Err(_) => "until purged by hand".to_string(),
            Ok(s) => format!("{} h (mmsync may be away no longer)", s / 3600),
        }
    );
    Ok((summary, problems))
}

/// Installs mmsync on every MariaDB master of the topology, after checking
/// that every table can be synced on every one of them.
pub async fn init(topology: &Topology) -> Result<Vec<String>> {
    let mut done = Vec::new();
    let mut conns = Vec::new();
    for master in topology.masters.iter().filter(|m| m.database() == Database::Mariadb) {
        let mut conn = connect(master).await?;
        let url_db = url_database(master)?;
        if let Some((var, value, wanted, why)) = binlog_problems(&mut conn, &master.name).await?.into_iter().next() {
            return Err(Error::Setup {
                master: master.name.clone(),
                problem: format!("{var} is {value:?}, not {wanted}"),
                fix: format!("{why} (in the server's configuration, then restart it), then run init again"),
            });
        }
        for table in &topology.tables {
            let info = describe(&mut conn, &master.name, table, &url_db).await?.ok_or_else(|| Error::Setup {
                master: master.name.clone(),
                problem: format!(
                    "table {table} does not exist (database {})",
                    crate::mariadb::db::database_of(table, &url_db)
                ),
                fix: "create it on every master (same columns) or remove it from [sync] tables".into(),
            })?;
            if let Some(problem) = info.problems().into_iter().next() {
                return Err(Error::Setup { master: master.name.clone(), problem, fix: "then run init again".into() });
            }
        }
        conns.push((master, conn, url_db));
    }
    for (master, conn, url_db) in conns.iter_mut() {
        for line in init_master(topology, master, conn, url_db).await? {
            done.push(format!("master {:?}: {line}", master.name));
        }
    }
    Ok(done)
}

async fn init_master(topology: &Topology, master: &Master, conn: &mut Conn, url_db: &str) -> Result<Vec<String>> {
    let name = master.name.as_str();
    let mut done = Vec::new();
    for sql in OWN_TABLES {
        exec(conn, name, "creating mmsync's tables", sql).await?;
    }
    // The first position, before any trigger exists: every write stamped by
    // this master comes after it. Writes before it carry no origin and are
    // not sent (as on PostgreSQL, existing rows are `adopt`'s).
    let stored: Option<String> = conn
        .exec_first("SELECT gtid_pos FROM mmsync.capture_position WHERE master = ?", (name,))
        .await
        .map_err(Error::mariadb(name, "reading the capture position"))?;
    if stored.is_none() {
        let pos: String = conn
            .query_first("SELECT @@GLOBAL.gtid_binlog_pos")
            .await
            .map_err(Error::mariadb(name, "reading @@gtid_binlog_pos"))?
            .unwrap_or_default();
        conn.exec_drop("INSERT INTO mmsync.capture_position (master, gtid_pos) VALUES (?, ?)", (name, &pos))
            .await
            .map_err(Error::mariadb(name, "storing the first capture position"))?;
        done.push(format!("captures from binlog position {pos:?} on"));
    }
    let n = topology.masters.len() as i64;
    let place = topology.masters.iter().position(|m| m.name == master.name).unwrap_or(0) as i64 + 1;
    let increment: i64 = variable(conn, name, "auto_increment_increment").await?.parse().unwrap_or(1);
    let offset: i64 = variable(conn, name, "auto_increment_offset").await?.parse().unwrap_or(1);
    if (increment, offset) != (n, place) {
        // Server settings: mmsync cannot make them stick across a restart.
        done.push(format!(
            "warning: set auto_increment_increment = {n} and auto_increment_offset = {place} in this server's \
             configuration (and SET GLOBAL them now), so that ids minted here never collide with another master's"
        ));
    }
    let applier_user = user(master)?;
    let skew_us = topology.sync.max_clock_skew.as_micros() as i64;
    for table in topology.synced_tables() {
        let info = describe(conn, name, &table, url_db).await?.expect("checked by init, or made by OWN_TABLES");
        done.extend(install_table(conn, name, &info, &applier_user, skew_us).await?);
    }
    Ok(done)
}

/// Adds the origin and version columns and the stamping triggers to one table.
async fn install_table(
    conn: &mut Conn,
    master: &str,
    table: &Table,
    applier_user: &str,
    skew_us: i64,
) -> Result<Vec<String>> {
    let mut done = Vec::new();
    if table.name.name.len() > 54 {
        return Err(Error::Setup {
            master: master.into(),
            problem: format!(
                "the name of table {} is longer than 54 characters, too long for its triggers' names",
                table.name
            ),
            fix: "rename the table".into(),
        });
    }
    if table.column(ORIGIN_COLUMN).is_none() || table.column(VERSION_COLUMN).is_none() {
        // Rows that exist before init get an empty origin and version 0 on
        // every master alike, so identical data stays identical.
        exec(
            conn,
            master,
            "adding mmsync's columns",
            &format!(
                "ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL DEFAULT '',
                 ADD COLUMN IF NOT EXISTS {} BIGINT NOT NULL DEFAULT 0",
                table.quoted(),
                quote_ident(ORIGIN_COLUMN),
                quote_ident(VERSION_COLUMN)
            ),
        )
        .await?;
        done.push(format!("added {ORIGIN_COLUMN} and {VERSION_COLUMN} to {}", table.name));
    }
    for (trigger, sql) in triggers(table, master, applier_user, skew_us) {
        exec(conn, master, &format!("creating trigger {trigger}"), &sql).await?;
    }
    done.push(format!("stamping triggers on {}", table.name));
    Ok(done)
}
