//! What belongs to PostgreSQL alone, so that a second kind of master
//! (MariaDB) is an addition beside it, not a fork:
//!
//! - [`db`]: connections (URLs, masked secrets, pinned settings), over [`tls`]
//!   where the URL's `sslmode` asks to verify;
//! - [`capture`]: the source of a master: its slot streamed over the
//!   walsender protocol ([`replication`]), the [`pgoutput`] messages decoded
//!   into changes, produced to Kafka;
//! - [`schema`]: what `check` and `init` look at and install (tables,
//!   triggers, publication, slot, sequences);
//! - [`apply`]: the statements that apply a batch of changes to one table
//!   by last-writer-wins, for the sink ([`crate::sink`]: Kafka's side);
//! - [`sqlstate`]: what its error codes mean.

pub mod apply;
pub mod capture;
pub mod db;
pub mod pgoutput;
pub mod replication;
pub mod schema;
pub mod sqlstate;
pub mod tls;
