//! What belongs to MariaDB alone, beside [`crate::postgres`]; the change, the
//! Kafka side, the last-writer-wins plan and the topology are shared.
//!
//! - [`db`]: connections (`mariadb://` and `mysql://` URLs), the session
//!   settings that make values' text canonical, and what a table looks like;
//! - [`capture`]: the source of a master: its binlog streamed as a replica,
//!   the row events turned into changes, produced to Kafka, and the GTID
//!   position stored on the master only after Kafka acknowledged;
//! - [`schema`]: what `check` and `init` look at and install (mmsync's
//!   database, the columns, the triggers, the first position);
//! - [`apply`]: the statements that apply a batch of changes to one table by
//!   last-writer-wins, for the sink;
//! - [`errors`]: what MariaDB's error numbers mean.
//!
//! How a MariaDB table is named: `schema.table` in `topology.toml` is
//! database `schema`, except `public`, the schema a PostgreSQL table has when
//! none is written, which is the database of the master's URL. So
//! `public.items` is the same table on a PostgreSQL and a MariaDB master.

pub mod apply;
pub mod capture;
pub mod db;
pub mod errors;
pub mod schema;
