//! The streaming replication protocol, as much of it as a logical source
//! needs: a walsender connection (`replication=database`), START_REPLICATION
//! of a pgoutput slot, the XLogData and keepalive messages that follow, and
//! the standby status updates that move the slot.
//!
//! Reading a slot through SQL (`pg_logical_slot_peek_binary_changes`) decodes
//! the WAL again from the slot's restart point on every call, and PostgreSQL
//! moves that point only every few seconds: the cost of each read grows with
//! the write rate. A walsender decodes each record once. sqlx has no walsender
//! mode, so this module speaks the protocol itself, with the URL, session
//! settings, TLS ([`crate::postgres::tls`]) and authentication of mmsync's other
//! connections. Since it answers the server's authentication requests
//! itself, it can refuse what sqlx cannot: sending a password in clear or as
//! md5 over plain TCP to a host that is not loopback (see `authenticate`).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::postgres::{PgConnectOptions, PgSslMode};
use sqlx::ConnectOptions as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader, WriteHalf};
use tokio::sync::mpsc;

use crate::postgres::pgoutput::{format_lsn, Lsn};
use crate::postgres::tls::Io;

/// Messages the reader may hold before it stops reading the socket.
const BUFFERED_MESSAGES: usize = 10_000;

/// A message in the queue, holding its share of the reader's byte budget
/// until the source takes it.
type Queued = (Result<WalMessage>, Option<tokio::sync::OwnedSemaphorePermit>);

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// What the walsender sends once replication has started.
#[derive(Debug)]
pub enum WalMessage {
    /// One pgoutput message.
    Data(Vec<u8>),
    /// The server's WAL end; `reply` asks for a status update at once.
    Keepalive { wal_end: Lsn, reply: bool },
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{message} (SQLSTATE {code})")]
    Server { code: String, message: String },
    #[error("authentication: {0}")]
    Auth(String),
    #[error("unexpected message from the server: {0}")]
    Protocol(String),
    #[error("the server ended the replication stream")]
    Ended,
}

impl ReplicationError {
    /// Whether retrying cannot help: bad credentials, TLS set-up, missing
    /// privileges or objects, a server mmsync does not understand.
    pub fn is_fatal(&self) -> bool {
        match self {
            ReplicationError::Server { code, .. } => crate::postgres::sqlstate::is_fatal_replication(code),
            ReplicationError::Auth(_) | ReplicationError::Tls(_) | ReplicationError::Protocol(_) => true,
            ReplicationError::Io(_) | ReplicationError::Ended => false,
        }
    }
}

impl From<crate::postgres::tls::TlsError> for ReplicationError {
    fn from(e: crate::postgres::tls::TlsError) -> Self {
        match e {
            crate::postgres::tls::TlsError::Io(e) => ReplicationError::Io(e),
            crate::postgres::tls::TlsError::Refused(reason) => ReplicationError::Tls(reason),
        }
    }
}

type Result<T> = std::result::Result<T, ReplicationError>;

/// A started replication stream. Messages are read by a task of their own
/// into a bounded queue, so that waiting for one can be cancelled and the
/// source can see whether more are ready without blocking.
pub struct WalStream {
    rx: mpsc::Receiver<Queued>,
    writer: WriteHalf<Box<dyn Io>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for WalStream {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl WalStream {
    /// Connects as a walsender and starts streaming `slot` from `from`,
    /// pgoutput protocol 1 (whole transactions, at commit) of `publication`.
    /// `options` are the connection options of the master, with its session settings.
    /// The reader holds at most `buffered_bytes` of messages before it stops
    /// reading the socket: a bound on memory whatever the rows' sizes (a
    /// message larger than this still passes, alone).
    pub async fn start(
        options: &PgConnectOptions,
        slot: &str,
        publication: &str,
        from: Lsn,
        buffered_bytes: usize,
    ) -> Result<WalStream> {
        let mut io = connect(options).await?;
        let command = format!(
            "START_REPLICATION SLOT {} LOGICAL {} (\"proto_version\" '1', \"publication_names\" {})",
            crate::topology::quote_ident(slot),
            format_lsn(from),
            crate::topology::quote_literal(&crate::topology::quote_ident(publication)),
        );
        io.write_all(&message(b'Q', &cstring(&command))).await?;
        io.flush().await?;
        loop {
            let (tag, body) = read_message(&mut io).await?;
            match tag {
                b'W' => break,
                b'E' => return Err(server_error(&body)),
                b'N' | b'S' => {}
                other => {
                    return Err(ReplicationError::Protocol(format!("{:?} after START_REPLICATION", other as char)))
                }
            }
        }
        let (reader, writer) = tokio::io::split(io);
        let (tx, rx) = mpsc::channel(BUFFERED_MESSAGES);
        let budget = Arc::new(tokio::sync::Semaphore::new(buffered_bytes));
        let reader = tokio::spawn(read_stream(BufReader::with_capacity(1 << 16, reader), tx, budget, buffered_bytes));
        Ok(WalStream { rx, writer, reader })
    }

    /// The next message; cancel-safe.
    pub async fn recv(&mut self) -> Result<WalMessage> {
        self.rx.recv().await.map_or(Err(ReplicationError::Ended), |(message, _bytes)| message)
    }

    /// The next message if one is already here.
    pub fn try_recv(&mut self) -> Option<Result<WalMessage>> {
        self.rx.try_recv().ok().map(|(message, _bytes)| message)
    }

    /// Tells the server that everything before `flushed` is safe: the slot
    /// moves there. With `reply`, the server answers with a keepalive that
    /// carries its WAL end.
    pub async fn confirm(&mut self, flushed: Lsn, reply: bool) -> Result<()> {
        let now_us = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64);
        let mut body = Vec::with_capacity(34);
        body.push(b'r');
        for position in [flushed, flushed, flushed] {
            body.extend_from_slice(&position.to_be_bytes()); // written, flushed, applied
        }
        body.extend_from_slice(&(now_us - PG_EPOCH_OFFSET_US).to_be_bytes());
        body.push(u8::from(reply));
        self.writer.write_all(&message(b'd', &body)).await?;
        self.writer.flush().await?;
        Ok(())
    }
}

/// Reads CopyData messages until the stream ends or fails; the last item sent is the error.
/// A data message waits for its size in `budget` (at most `limit`) before it is queued.
async fn read_stream<R: AsyncRead + Unpin>(
    mut reader: R,
    tx: mpsc::Sender<Queued>,
    budget: Arc<tokio::sync::Semaphore>,
    limit: usize,
) {
    loop {
        let item = match read_message(&mut reader).await {
            Ok((b'd', body)) => match body.first() {
                // XLogData: start, end, send time (8 bytes each), then the message.
                Some(b'w') if body.len() >= 25 => {
                    let mut data = body;
                    data.drain(..25); // in place: no second copy per row
                    Ok(WalMessage::Data(data))
                }
                // Keepalive: WAL end, send time, reply requested.
                Some(b'k') if body.len() >= 18 => {
                    Ok(WalMessage::Keepalive { wal_end: be_u64(&body[1..9]), reply: body[17] == 1 })
                }
                _ => {
                    Err(ReplicationError::Protocol(format!("CopyData of kind {:?}", body.first().map(|b| *b as char))))
                }
            },
            Ok((b'N', _)) => continue,
            Ok((b'E', body)) => Err(server_error(&body)),
            Ok((b'c', _)) => Err(ReplicationError::Ended),
            Ok((tag, _)) => Err(ReplicationError::Protocol(format!("{:?} during replication", tag as char))),
            Err(e) => Err(e),
        };
        let failed = item.is_err();
        let size = match &item {
            Ok(WalMessage::Data(data)) => data.len().clamp(1, limit),
            _ => 1,
        };
        let Ok(bytes) = budget.clone().acquire_many_owned(size as u32).await else { return };
        if tx.send((item, Some(bytes))).await.is_err() || failed {
            return;
        }
    }
}

// ---------------------------------------------------------------------------
// Connecting: transport, TLS, start-up, authentication.

async fn connect(options: &PgConnectOptions) -> Result<Box<dyn Io>> {
    let url = options.to_url_lossy();
    let password = url
        .password()
        .map(|p| percent_encoding::percent_decode_str(p).decode_utf8_lossy().into_owned())
        .or_else(|| std::env::var("PGPASSWORD").ok());
    let user = options.get_username().to_string();

    // `exposed`: the host to name when the password would cross a network
    // in clear (see `authenticate`).
    let (mut io, exposed): (Box<dyn Io>, Option<&str>) = match options.get_socket() {
        Some(dir) => {
            let path = dir.join(format!(".s.PGSQL.{}", options.get_port()));
            (Box::new(tokio::net::UnixStream::connect(path).await?), None)
        }
        None => {
            let (io, encrypted) = crate::postgres::tls::connect(options).await?;
            let host = options.get_host();
            let chose_plain = matches!(options.get_ssl_mode(), PgSslMode::Disable);
            (io, (!encrypted && !chose_plain && !crate::postgres::tls::is_loopback(host)).then_some(host))
        }
    };

    // The same session settings as mmsync's sqlx connections (see crate::postgres::db),
    // so that pgoutput writes every value in the same text form.
    let mut params: Vec<(&str, String)> = vec![
        ("user", user.clone()),
        ("database", options.get_database().unwrap_or(&user).to_string()),
        ("replication", "database".into()),
        ("application_name", options.get_application_name().unwrap_or("mmsync").to_string()),
        ("DateStyle", "ISO, MDY".into()),
        ("TimeZone", "UTC".into()),
        ("client_encoding", "UTF8".into()),
        ("extra_float_digits", "2".into()),
    ];
    params.extend(crate::postgres::db::CANONICAL_SETTINGS.iter().map(|(k, v)| (*k, v.to_string())));
    io.write_all(&startup(&params)).await?;
    io.flush().await?;
    authenticate(&mut io, &user, password.as_deref(), exposed).await?;
    Ok(io)
}

/// Answers the server's authentication requests until it is ready.
///
/// `exposed` names the host when the connection is plain TCP to a host that
/// is not loopback, and the url did not choose that with `sslmode=disable`
/// (`prefer` or `allow` to a server without TLS, or an attacker on the path
/// who says it has none). Then the password is not sent in clear, nor as an
/// md5 hash (which an eavesdropper can crack offline); SCRAM never sends it.
async fn authenticate(io: &mut Box<dyn Io>, user: &str, password: Option<&str>, exposed: Option<&str>) -> Result<()> {
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
    let need_password = || {
        password.ok_or_else(|| {
            ReplicationError::Auth(format!(
                "the server asks user {user:?} for a password and the url has none; add it to the url or use url_env"
            ))
        })
    };
    let mut scram: Option<ScramSha256> = None;
    loop {
        let (tag, body) = read_message(io).await?;
        match tag {
            b'R' => {
                let code = body.get(..4).map_or(-1, |b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                if let (3 | 5, Some(host)) = (code, exposed) {
                    return Err(ReplicationError::Auth(format!(
                        "the server asks for the password {} over a connection that is not encrypted, and {host} is \
                         not loopback: anyone on the path could read it, or be the one asking; add sslmode=require \
                         or better (verify-full, with sslrootcert) to the url and turn ssl on in the server, or add \
                         sslmode=disable if that network is trusted",
                        if code == 3 { "in clear" } else { "as an md5 hash" }
                    )));
                }
                let reply = match code {
                    0 => None,
                    3 => Some(cstring(need_password()?)),
                    5 => {
                        let salt: [u8; 4] = body
                            .get(4..8)
                            .and_then(|s| s.try_into().ok())
                            .ok_or_else(|| ReplicationError::Protocol("md5 request without salt".into()))?;
                        let hash = postgres_protocol::authentication::md5_hash(
                            user.as_bytes(),
                            need_password()?.as_bytes(),
                            salt,
                        );
                        Some(cstring(&hash))
                    }
                    10 => {
                        let offered = String::from_utf8_lossy(&body[4..]).into_owned();
                        if !offered.split('\0').any(|m| m == "SCRAM-SHA-256") {
                            return Err(ReplicationError::Auth(format!(
                                "the server offers SASL mechanisms {offered:?}; mmsync speaks SCRAM-SHA-256"
                            )));
                        }
                        let s = ScramSha256::new(need_password()?.as_bytes(), ChannelBinding::unsupported());
                        let first = s.message().to_vec();
                        scram = Some(s);
                        let mut b = cstring("SCRAM-SHA-256");
                        b.extend_from_slice(&(first.len() as i32).to_be_bytes());
                        b.extend_from_slice(&first);
                        Some(b)
                    }
                    11 | 12 => {
                        let s = scram.as_mut().ok_or_else(|| ReplicationError::Protocol("SASL out of order".into()))?;
                        let step = if code == 11 { s.update(&body[4..]) } else { s.finish(&body[4..]) };
                        step.map_err(|e| ReplicationError::Auth(e.to_string()))?;
                        (code == 11).then(|| s.message().to_vec())
                    }
                    other => {
                        return Err(ReplicationError::Auth(format!(
                            "the server asks for authentication method {other}, which mmsync does not speak; use \
                             scram-sha-256, md5, password or trust in pg_hba.conf"
                        )))
                    }
                };
                if let Some(reply) = reply {
                    io.write_all(&message(b'p', &reply)).await?;
                    io.flush().await?;
                }
            }
            b'E' => return Err(server_error(&body)),
            b'S' | b'K' | b'N' => {}
            b'Z' => return Ok(()),
            other => return Err(ReplicationError::Protocol(format!("{:?} while connecting", other as char))),
        }
    }
}

// ---------------------------------------------------------------------------
// Framing.

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

fn cstring(s: &str) -> Vec<u8> {
    let mut b = s.as_bytes().to_vec();
    b.push(0);
    b
}

/// A frontend message: tag, length (itself included), body.
fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(body.len() + 5);
    m.push(tag);
    m.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// The start-up message, protocol 3.0.
fn startup(params: &[(&str, String)]) -> Vec<u8> {
    let mut body = 196_608i32.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend(cstring(k));
        body.extend(cstring(v));
    }
    body.push(0);
    let mut m = (body.len() as i32 + 4).to_be_bytes().to_vec();
    m.extend(body);
    m
}

/// One backend message: (tag, body).
async fn read_message<R: AsyncRead + Unpin>(r: &mut R) -> Result<(u8, Vec<u8>)> {
    let tag = r.read_u8().await?;
    let len = r.read_i32().await?;
    if !(4..=1 << 30).contains(&len) {
        return Err(ReplicationError::Protocol(format!("a message of length {len}")));
    }
    let mut body = vec![0u8; len as usize - 4];
    r.read_exact(&mut body).await?;
    Ok((tag, body))
}

/// An ErrorResponse's SQLSTATE and message (with detail and hint when given).
fn server_error(body: &[u8]) -> ReplicationError {
    let (mut code, mut text, mut extra) = (String::new(), String::new(), Vec::new());
    for field in body.split(|b| *b == 0).filter(|f| !f.is_empty()) {
        let value = String::from_utf8_lossy(&field[1..]).into_owned();
        match field[0] {
            b'C' => code = value,
            b'M' => text = value,
            b'D' | b'H' => extra.push(value),
            _ => {}
        }
    }
    if !extra.is_empty() {
        text = format!("{text} ({})", extra.join("; "));
    }
    ReplicationError::Server { code, message: text }
}

/// How long connecting and starting replication may take.
pub const START_TIMEOUT: Duration = crate::postgres::db::CONNECT_TIMEOUT;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn the_reader_holds_no_more_bytes_than_its_budget() {
        let (mut server, client) = tokio::io::duplex(1 << 16);
        let (tx, mut rx) = mpsc::channel(BUFFERED_MESSAGES);
        let budget = Arc::new(tokio::sync::Semaphore::new(100));
        tokio::spawn(read_stream(client, tx, budget.clone(), 100));
        // Three XLogData messages of 60 bytes each (25 bytes of header).
        for i in 0..3u8 {
            let mut body = vec![b'w'];
            body.extend_from_slice(&[0; 24]);
            body.extend_from_slice(&[i; 60]);
            server.write_all(&message(b'd', &body)).await.unwrap();
        }
        // The first is queued; the second waits for bytes, however long the
        // reader runs.
        while rx.is_empty() {
            tokio::task::yield_now().await;
        }
        for _ in 0..1000 {
            tokio::task::yield_now().await;
        }
        // (The waiting second message has taken the 40 bytes left meanwhile.)
        assert_eq!((rx.len(), budget.available_permits()), (1, 0));
        // Taking one frees its bytes: the next comes in.
        assert!(matches!(rx.recv().await, Some((Ok(WalMessage::Data(d)), _)) if d == [0; 60]));
        assert!(matches!(rx.recv().await, Some((Ok(WalMessage::Data(d)), _)) if d == [1; 60]));
        assert!(matches!(rx.recv().await, Some((Ok(WalMessage::Data(d)), _)) if d == [2; 60]));
    }

    #[test]
    fn frames_and_errors_are_read_as_postgres_writes_them() {
        assert_eq!(message(b'Q', b"x\0"), vec![b'Q', 0, 0, 0, 6, b'x', 0]);
        let s = startup(&[("user", "u".into())]);
        assert_eq!(&s[..4], &(s.len() as i32).to_be_bytes());
        assert_eq!(&s[4..8], &196_608i32.to_be_bytes());
        assert_eq!(&s[8..], b"user\0u\0\0");
        let e = server_error(b"SERROR\0C55006\0Mreplication slot \"s\" is active for PID 7\0\0");
        assert!(matches!(&e, ReplicationError::Server { code, .. } if code == "55006"));
        assert!(!e.is_fatal(), "a slot still held by an old connection is waited out");
        assert!(server_error(b"C42704\0Mno such slot\0").is_fatal());
        assert!(server_error(b"C28P01\0Mpassword authentication failed\0").is_fatal());
    }
}
