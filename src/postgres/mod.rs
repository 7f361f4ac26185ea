//! What belongs to PostgreSQL alone, so that a second kind of master
//! (MariaDB) is an addition beside it, not a fork: its SQLSTATE rules
//! ([`sqlstate`]), the walsender protocol ([`replication`]) and the pgoutput
//! messages it carries ([`pgoutput`]). Its capture (`crate::source`), apply
//! SQL, schema installation and connections move here next.

pub mod pgoutput;
pub mod replication;
pub mod sqlstate;
