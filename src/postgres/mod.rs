//! What belongs to PostgreSQL alone, so that a second kind of master
//! (MariaDB) is an addition beside it, not a fork. For now its SQLSTATE
//! rules ([`sqlstate`]); its capture (`source`, `pgoutput`, `replication`),
//! apply SQL, schema installation and connections move here next.

pub mod sqlstate;
