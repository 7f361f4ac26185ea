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
//! - [`sqlstate`]: what its error codes mean.
//!
//! The apply SQL still lives in [`crate::sink`], beside the Kafka consumer
//! it serves; it moves here next.

pub mod capture;
pub mod db;
pub mod pgoutput;
pub mod replication;
pub mod schema;
pub mod sqlstate;
pub mod tls;
