//! One `mmsync run` per master at a time.
//!
//! Two runs of one topology would not corrupt anything (a slot streams to one
//! walsender only, and last-writer-wins makes a change applied twice
//! harmless), but both would apply every record, rewind each other's stored
//! offsets and fight over row locks; a second run with an older topology or
//! binary would be worse. So each run holds a session-level advisory lock on
//! every master for as long as it runs, and a second run finds it taken and
//! stops, naming the holder. The server drops the lock when the holder's
//! connection ends, so a run that crashed never leaves it behind.
//!
//! Kafka offers two other fences (a `transactional.id` per source, a consumer
//! group per sink); the README's "Kafka transactions and consumer groups" says,
//! with figures, why mmsync does not use them.

use std::time::Duration;

use sqlx::{Connection, PgConnection};
use tokio::sync::watch;

use crate::error::{Backoff, Class, Error, Result};
use crate::topology::Master;

/// The run lock's key, the same on every master: "mmsyncR" in ASCII. It
/// must differ from the one other advisory lock mmsync takes, "mmsync"
/// (0x6d6d73796e63, [`TOMBSTONE_HIGH_LOCK_KEY`]), which every local delete's
/// trigger may take for a moment: sharing it would block those deletes for
/// as long as a run lives.
pub const LOCK_KEY: i64 = 0x006d_6d73_796e_6352;

/// The transaction-level advisory lock under which migration 0003's trigger
/// raises `mmsync.tombstone_high`.
pub const TOMBSTONE_HIGH_LOCK_KEY: i64 = 0x6d6d_7379_6e63;

/// How often a held lock's connection is checked.
const CHECK_EVERY: Duration = Duration::from_secs(5);

/// The connection that holds a master's run lock.
pub enum Held {
    Postgres(PgConnection),
    /// MariaDB's lock is `GET_LOCK('mmsync.run')`, held by the session.
    Mariadb(mysql_async::Conn),
}

impl Held {
    async fn ping(&mut self) -> std::result::Result<(), String> {
        match self {
            Held::Postgres(conn) => conn.ping().await.map_err(|e| e.to_string()),
            Held::Mariadb(conn) => {
                use mysql_async::prelude::Queryable;
                conn.query_drop("DO 1").await.map_err(|e| e.to_string())
            }
        }
    }
}

/// Takes the run lock on `master`: the connection that holds it, or why not.
/// Another run holding it is fatal; a master that does not answer is not.
pub async fn acquire(master: &Master) -> Result<Held> {
    match master.database() {
        crate::topology::Database::Postgres => Ok(Held::Postgres(acquire_as(master, "run").await?)),
        crate::topology::Database::Mariadb => acquire_mariadb(master).await.map(Held::Mariadb),
    }
}

/// MariaDB's run lock: a named lock of the session, which the server
/// releases when the session ends.
async fn acquire_mariadb(master: &Master) -> Result<mysql_async::Conn> {
    use mysql_async::prelude::Queryable;
    let mut conn = crate::mariadb::db::connect(master).await?;
    let db = |what: &str| Error::mariadb(&master.name, what.to_string());
    let taken: Option<Option<i64>> =
        conn.query_first("SELECT GET_LOCK('mmsync.run', 0)").await.map_err(db("taking mmsync's run lock"))?;
    if taken.flatten() == Some(1) {
        return Ok(conn);
    }
    let holder: Option<(i64, String, String, i64)> = conn
        .query_first(
            "SELECT id, user, host, time FROM information_schema.processlist WHERE id = IS_USED_LOCK('mmsync.run')",
        )
        .await
        .map_err(db("finding the holder of mmsync's run lock"))?;
    let who = match holder {
        Some((id, user, host, secs)) => format!("connection {id}, user {user} from {host}, for {secs} s"),
        None => "a session that has just ended".into(),
    };
    Err(Error::Setup {
        master: master.name.clone(),
        problem: format!("another mmsync run holds this master ({who})"),
        fix: "stop it first: run one `mmsync run` per topology".into(),
    })
}

/// Takes the lock for `what` (`run`, `adopt`): the holder shows in
/// `pg_stat_activity` as application `mmsync:<master>:<what>`.
pub async fn acquire_as(master: &Master, what: &str) -> Result<PgConnection> {
    let opts = crate::postgres::db::options(master)?.application_name(&format!("mmsync:{}:{what}", master.name));
    let mut conn = crate::postgres::db::connect_with(master, opts).await?;
    let db = |what: &str| Error::db(&master.name, what.to_string());
    let taken: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(LOCK_KEY)
        .fetch_one(&mut conn)
        .await
        .map_err(db("taking mmsync's run lock"))?;
    if taken {
        return Ok(conn);
    }
    let holder: Option<(i32, String, String, String)> = sqlx::query_as(
        "SELECT a.pid, coalesce(a.application_name, ''), coalesce(host(a.client_addr), 'a local socket'),
                to_char(a.backend_start, 'YYYY-MM-DD HH24:MI:SS TZ')
         FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
         WHERE l.locktype = 'advisory' AND l.granted AND l.classid = $1::int8::oid AND l.objid = $2::int8::oid
           AND l.objsubid = 1 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .bind(LOCK_KEY >> 32)
    .bind(LOCK_KEY & 0xffff_ffff)
    .fetch_optional(&mut conn)
    .await
    .map_err(db("finding the holder of mmsync's run lock"))?;
    let who = match holder {
        Some((pid, app, from, since)) => format!("backend pid {pid}, {app:?}, from {from}, since {since}"),
        None => "a session that has just ended".into(),
    };
    Err(Error::Setup {
        master: master.name.clone(),
        problem: format!("another mmsync run, adopt or join holds this master ({who})"),
        fix: format!(
            "stop it before this {what}: run one `mmsync run` per topology, and none while `mmsync adopt` or `mmsync join` works"
        ),
    })
}

/// Keeps the lock on `master` until `shutdown`: checks the connection that
/// holds it, and takes the lock again after the master came back. Returns an
/// error only when another run took it meanwhile.
pub async fn keep(master: Master, mut held: Option<Held>, mut shutdown: watch::Receiver<bool>) -> Result<()> {
    let mut backoff = Backoff::new();
    loop {
        let wait = match held.as_mut() {
            Some(conn) => match conn.ping().await {
                Ok(()) => CHECK_EVERY,
                Err(e) => {
                    tracing::warn!(master = %master.name, "lost the connection that holds the run lock ({e}); taking it again");
                    held = None;
                    Duration::ZERO
                }
            },
            None => match acquire(&master).await {
                Ok(conn) => {
                    held = Some(conn);
                    backoff.reset();
                    CHECK_EVERY
                }
                Err(e) if e.class() == Class::Fatal => return Err(e),
                Err(_) => backoff.next_delay(),
            },
        };
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_run_lock_never_blocks_the_tombstone_trigger() {
        let migration = include_str!("../migrations/0003_tombstone_high.sql");
        assert!(migration.contains(&format!("pg_advisory_xact_lock({TOMBSTONE_HIGH_LOCK_KEY})")), "{migration}");
        assert!(!migration.contains(&LOCK_KEY.to_string()));
        assert_ne!(LOCK_KEY, TOMBSTONE_HIGH_LOCK_KEY);
    }
}
