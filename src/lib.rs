//! mmsync keeps two or more PostgreSQL masters in sync in both directions
//! through Kafka.
//!
//! The path of one change: an application writes a row on master A; the
//! trigger installed by [`postgres::schema::init`] stamps its origin and
//! version; [`postgres::capture`] streams it from A's slot (pgoutput, over
//! [`postgres::replication`]) as a [`change::Change`],
//! [`kafka`] produces it, and the [`sink`] of every other master applies it by
//! last-writer-wins ([`lww`]), storing the Kafka offset in the same transaction.

pub mod adopt;
pub mod change;
pub mod error;
pub mod failpoint;
pub mod fence;
pub mod join;
pub mod kafka;
pub mod lww;
pub mod mariadb;
pub mod metrics;
pub mod postgres;
pub mod produce;
pub mod progress;
pub mod remove;
pub mod run;
pub mod sink;
pub mod status;
#[cfg(feature = "testbed")]
pub mod testbed;
pub mod tombstones;
pub mod topology;
pub mod type_map;
pub mod verify;
