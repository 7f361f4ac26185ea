//! Connections to masters, all with the same session settings, so that every
//! value's text form (what pgoutput sends and what keys are built from) is the
//! same on every master and in every session.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, PgConnection};

use crate::error::{Error, Result};
use crate::topology::Master;

/// Settings sqlx does not already pin (it sets DateStyle ISO, TimeZone UTC,
/// client_encoding UTF8 and extra_float_digits 2). The trigger functions that
/// build tombstone keys pin the same ones. `standard_conforming_strings` is
/// pinned too, so that no database or role default changes how mmsync's SQL
/// reads (its literals are safe either way: [`crate::topology::quote_literal`]).
pub const CANONICAL_SETTINGS: &[(&str, &str)] =
    &[("intervalstyle", "postgres"), ("bytea_output", "hex"), ("standard_conforming_strings", "on")];

/// How long to wait for a master to accept a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub fn options(master: &Master) -> Result<PgConnectOptions> {
    let opts = PgConnectOptions::from_str(master.url.expose()).map_err(|e| Error::Setup {
        master: master.name.clone(),
        problem: format!("url {} is not a valid PostgreSQL URL ({e})", master.url),
        fix: "write it as postgres://user:password@host:port/database".into(),
    })?;
    Ok(opts
        .options(CANONICAL_SETTINGS.iter().copied())
        .application_name(&format!("mmsync:{}", master.name))
        .disable_statement_logging())
}

/// Opens one connection to a master, giving up after [`CONNECT_TIMEOUT`].
pub async fn connect(master: &Master) -> Result<PgConnection> {
    let opts = options(master)?;
    match tokio::time::timeout(CONNECT_TIMEOUT, opts.connect()).await {
        Ok(conn) => conn.map_err(Error::db(&master.name, format!("connecting to {}", master.url))),
        Err(_) => Err(Error::db(&master.name, format!("connecting to {}", master.url))(sqlx::Error::PoolTimedOut)),
    }
}
