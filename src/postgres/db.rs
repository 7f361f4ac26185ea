//! Connections to masters, all with the same session settings, so that every
//! value's text form (what pgoutput sends and what keys are built from) is the
//! same on every master and in every session.
//!
//! Two rules about TLS, for every connection opened through [`connect_with`]:
//!
//! - **verify-ca and verify-full go through mmsync's own TLS.** sqlx's would
//!   trust every public CA beside `sslrootcert` (see [`crate::postgres::tls`] for why,
//!   and why a check beforehand would not do). mmsync opens the connection,
//!   checks the certificate, and hands the stream to sqlx through a Unix
//!   socket in a fresh folder only this user may enter, removed as soon as
//!   sqlx is connected; a task copies the bytes both ways for as long as the
//!   connection lives. sqlx then speaks plain protocol to that socket, and the
//!   server sees one TLS connection from mmsync.
//! - **No password crosses a network in clear, unless the url says so.**
//!   With no `sslmode` (or `prefer`, `allow`), libpq and sqlx go on in plain
//!   when the server answers that it has no TLS, and then send the password
//!   if the server asks for it in clear: an attacker on the path only has to
//!   answer "no TLS" and ask. The replication connection refuses that at
//!   authentication ([`crate::postgres::replication`]); sqlx answers authentication
//!   requests itself, so for its connections mmsync insists on TLS
//!   (`require`) to any host that is not loopback when the url has no
//!   `sslmode`, or `prefer` or `allow`. A server with TLS is reached as
//!   before; one without it is refused with the fix: turn TLS on, or write
//!   `sslmode=disable` when that network is trusted.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgSslMode};
use sqlx::{ConnectOptions, PgConnection};

use crate::error::{Error, Result};
use crate::postgres::tls::{is_loopback, sslmode_name, Io, TlsError};
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

/// The connection options of a master. Open sqlx connections with them
/// through [`connect_with`], not `ConnectOptions::connect`, which would skip
/// the TLS rules of the module doc.
pub fn options(master: &Master) -> Result<PgConnectOptions> {
    let (url, dropped) = known_parameters_only(master.url.expose());
    for key in dropped {
        tracing::warn!(master = %master.name, "ignoring url parameter {key:?}, which mmsync does not use (its value is not shown)");
    }
    let url = url.as_str();
    let mut opts = PgConnectOptions::from_str(url).map_err(|e| Error::Setup {
        master: master.name.clone(),
        problem: format!("url {} is not a valid PostgreSQL URL ({e})", master.url),
        fix: "write it as postgres://user:password@host:port/database".into(),
    })?;
    // sslrootcert=system, as libpq has it: the public CAs' store, so
    // verify-full is the default and nothing weaker is allowed.
    let root = opts.to_url_lossy().query_pairs().find(|(k, _)| k == "sslrootcert").map(|(_, v)| v.into_owned());
    if matches!(root.as_deref(), Some("file: system")) {
        if !sslmode_written(url) {
            opts = opts.ssl_mode(PgSslMode::VerifyFull);
        } else if !matches!(opts.get_ssl_mode(), PgSslMode::VerifyFull) {
            return Err(Error::Setup {
                master: master.name.clone(),
                problem: format!(
                    "url {} has sslrootcert=system with sslmode={}: the system's store holds every public CA, so \
                     any certificate one of them issued would pass",
                    master.url,
                    sslmode_name(opts.get_ssl_mode())
                ),
                fix: "use sslmode=verify-full with sslrootcert=system, or give sslrootcert the file of the CA that \
                      signed the server's certificate"
                    .into(),
            });
        }
    }
    Ok(opts
        .options(CANONICAL_SETTINGS.iter().copied())
        .application_name(&format!("mmsync:{}", master.name))
        .disable_statement_logging())
}

/// The url parameters sqlx reads. sqlx logs any other one with its value,
/// which could be a secret (`sslpassword=`, a password pasted in the wrong
/// place): those are taken out before sqlx sees the url.
const KNOWN_PARAMETERS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// The url without the query parameters sqlx does not know, and their names.
fn known_parameters_only(url: &str) -> (String, Vec<String>) {
    let (base, rest) = match url.split_once('?') {
        Some(split) => split,
        None => return (url.to_string(), Vec::new()),
    };
    let (query, fragment) = rest.split_once('#').map_or((rest, None), |(q, f)| (q, Some(f)));
    let (mut kept, mut dropped) = (Vec::new(), Vec::new());
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let key = pair.split('=').next().unwrap_or_default();
        if KNOWN_PARAMETERS.contains(&key) {
            kept.push(pair);
        } else {
            dropped.push(key.to_string());
        }
    }
    let mut out = base.to_string();
    if !kept.is_empty() {
        out.push('?');
        out.push_str(&kept.join("&"));
    }
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    (out, dropped)
}

/// Whether the url (or PGSSLMODE) chooses an sslmode, rather than leaving the default.
fn sslmode_written(url: &str) -> bool {
    let query = url.split_once('?').map_or("", |(_, q)| q);
    query.split('&').any(|pair| matches!(pair.split('=').next(), Some("sslmode" | "ssl-mode")))
        || std::env::var_os("PGSSLMODE").is_some()
}

/// Opens one connection to a master, giving up after [`CONNECT_TIMEOUT`].
pub async fn connect(master: &Master) -> Result<PgConnection> {
    connect_with(master, options(master)?).await
}

/// Opens one connection to a master with `opts` (from [`options`]), giving
/// up after [`CONNECT_TIMEOUT`].
pub async fn connect_with(master: &Master, opts: PgConnectOptions) -> Result<PgConnection> {
    let failed = || Error::db(&master.name, format!("connecting to {}", master.url));
    let insisting = matches!(opts.get_ssl_mode(), PgSslMode::Prefer | PgSslMode::Allow)
        && opts.get_socket().is_none()
        && !is_loopback(opts.get_host());
    let opts = if insisting { opts.ssl_mode(PgSslMode::Require) } else { opts };
    let connecting = async {
        match opts.get_ssl_mode() {
            PgSslMode::VerifyCa | PgSslMode::VerifyFull if opts.get_socket().is_none() => through_own_tls(opts).await,
            _ => opts.connect().await,
        }
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(sqlx::Error::Tls(e))) if insisting => Err(Error::Setup {
            master: master.name.clone(),
            problem: format!(
                "cannot reach {} over TLS ({e}); to a host that is not loopback, mmsync insists on TLS when the url \
                 has no sslmode (or prefer, allow), since an attacker on the path could otherwise answer that the \
                 server has no TLS and ask for the password in clear",
                master.url
            ),
            fix: "turn ssl on in the server and add sslmode=require or better (verify-full, with sslrootcert) to the \
                  url, or add sslmode=disable if the network to the server is trusted"
                .into(),
        }),
        Ok(Err(e)) => Err(failed()(e)),
        Err(_) => Err(failed()(sqlx::Error::PoolTimedOut)),
    }
}

/// A verify-ca or verify-full connection: mmsync's TLS, sqlx's protocol
/// (see the module doc).
async fn through_own_tls(opts: PgConnectOptions) -> sqlx::Result<PgConnection> {
    let (server, _) = crate::postgres::tls::connect(&opts).await.map_err(|e| match e {
        TlsError::Io(e) => sqlx::Error::Io(e),
        TlsError::Refused(why) => sqlx::Error::Tls(why.into()),
    })?;
    // tempfile makes the folder with mode 0700.
    let dir = tempfile::Builder::new().prefix("mmsync-tls-").tempdir()?;
    let listener = tokio::net::UnixListener::bind(dir.path().join(format!(".s.PGSQL.{}", opts.get_port())))?;
    let socket_dir = dir.path().to_path_buf();
    tokio::spawn(bridge(listener, dir, server));
    opts.socket(Path::new(&socket_dir)).ssl_mode(PgSslMode::Disable).connect().await
}

/// Takes sqlx's connection on `listener`, removes the socket's folder, and
/// copies bytes between it and the server until either side closes.
async fn bridge(listener: tokio::net::UnixListener, dir: tempfile::TempDir, mut server: Box<dyn Io>) {
    let accepted = tokio::time::timeout(CONNECT_TIMEOUT, listener.accept()).await;
    drop(listener);
    drop(dir);
    if let Ok(Ok((mut client, _))) = accepted {
        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parameters_sqlx_does_not_know_never_reach_it_so_it_cannot_log_their_values() {
        let (url, dropped) =
            known_parameters_only("postgres://u:p@h/db?sslpassword=secret&sslmode=require&target_session_attrs=any");
        assert_eq!(url, "postgres://u:p@h/db?sslmode=require");
        assert_eq!(dropped, ["sslpassword", "target_session_attrs"]);
        assert_eq!(known_parameters_only("postgres://h/db"), ("postgres://h/db".to_string(), vec![]));
        assert_eq!(known_parameters_only("postgres://h/db?x=1").0, "postgres://h/db");
    }
}
