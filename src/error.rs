//! Errors of the running sync, each classed once as retry or fatal.

use rdkafka::error::KafkaError;

/// What to do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Transient (connection lost, broker down, serialization failure): retry with backoff.
    Retry,
    /// The operator must change something (config, schema, permissions): stop and say what.
    Fatal,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("master {master:?}: {context}: {source}")]
    Db {
        master: String,
        context: String,
        #[source]
        source: sqlx::Error,
    },
    /// A MariaDB master's connection, statement or binlog stream.
    #[error("master {master:?}: {context}: {source}")]
    Mariadb {
        master: String,
        context: String,
        #[source]
        source: mysql_async::Error,
    },
    #[error("kafka: {context}: {source}")]
    Kafka {
        context: String,
        #[source]
        source: KafkaError,
    },
    /// The replication connection of a source.
    #[error("master {master:?}: {context}: {source}")]
    Replication {
        master: String,
        context: String,
        #[source]
        source: crate::postgres::replication::ReplicationError,
    },
    /// Something about the Kafka cluster that the operator has to fix (the message says what).
    #[error("{0}")]
    KafkaSetup(String),
    /// Something about a master or table that the operator has to fix.
    #[error("master {master:?}: {problem}; {fix}")]
    Setup { master: String, problem: String, fix: String },
    /// Something is missing that may come back (a table dropped on one
    /// master): this part waits and retries while the rest keeps syncing.
    #[error("master {master:?}: {problem}; {fix}")]
    Missing { master: String, problem: String, fix: String },
    /// The replication stream held something mmsync cannot read.
    #[error("master {master:?}: unreadable replication message at {lsn}: {reason}")]
    Stream { master: String, lsn: String, reason: String },
    /// A bug in mmsync.
    #[error("internal error: {0}; please report it with the log")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn db(master: &str, context: impl Into<String>) -> impl FnOnce(sqlx::Error) -> Error {
        let (master, context) = (master.to_string(), context.into());
        move |source| Error::Db { master, context, source }
    }

    pub fn mariadb(master: &str, context: impl Into<String>) -> impl FnOnce(mysql_async::Error) -> Error {
        let (master, context) = (master.to_string(), context.into());
        move |source| Error::Mariadb { master, context, source }
    }

    pub fn replication(
        master: &str,
        context: impl Into<String>,
    ) -> impl FnOnce(crate::postgres::replication::ReplicationError) -> Error {
        let (master, context) = (master.to_string(), context.into());
        move |source| Error::Replication { master, context, source }
    }

    pub fn kafka(context: impl Into<String>) -> impl FnOnce(KafkaError) -> Error {
        let context = context.into();
        move |source| Error::Kafka { context, source }
    }

    /// The single place where errors are classed.
    pub fn class(&self) -> Class {
        match self {
            Error::Db { source, .. } => db_class(source),
            Error::Mariadb { source, .. } => crate::mariadb::errors::class(source),
            Error::Kafka { source, .. } => match source.rdkafka_error_code() {
                Some(code) if is_fatal_kafka(code) => Class::Fatal,
                _ => Class::Retry,
            },
            Error::Replication { source, .. } if source.is_fatal() => Class::Fatal,
            Error::Missing { .. } | Error::Replication { .. } => Class::Retry,
            Error::Setup { .. } | Error::KafkaSetup(_) | Error::Stream { .. } | Error::Internal(_) => Class::Fatal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_below_each_step() {
        let mut b = Backoff::new();
        let delays: Vec<std::time::Duration> = (0..12).map(|_| b.next_delay()).collect();
        let mut step = Backoff::FIRST;
        for d in &delays {
            assert!(*d >= step / 2 && *d <= step, "{d:?} not within [{:?}, {step:?}]", step / 2);
            step = (step * 2).min(Backoff::CAP);
        }
        let distinct: std::collections::HashSet<_> = (0..20).map(|_| Backoff::new().next_delay()).collect();
        assert!(distinct.len() > 1, "no jitter: {distinct:?}");
    }
}

fn db_class(e: &sqlx::Error) -> Class {
    match e {
        sqlx::Error::Database(db) => match db.code().as_deref() {
            Some(code) if crate::postgres::sqlstate::is_fatal_setup(code) => Class::Fatal,
            _ => Class::Retry,
        },
        sqlx::Error::Configuration(_) | sqlx::Error::Tls(_) => Class::Fatal,
        _ => Class::Retry,
    }
}

fn is_fatal_kafka(code: rdkafka::types::RDKafkaErrorCode) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        code,
        C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::SaslAuthenticationFailed
            | C::InvalidConfig
            | C::MessageSizeTooLarge
            | C::InvalidArgument
    )
}

/// Capped exponential backoff for retried connections.
#[derive(Debug)]
pub struct Backoff {
    next: std::time::Duration,
}

impl Backoff {
    const FIRST: std::time::Duration = std::time::Duration::from_millis(200);
    const CAP: std::time::Duration = std::time::Duration::from_secs(10);

    pub fn new() -> Backoff {
        Backoff { next: Self::FIRST }
    }

    /// The delay before the next attempt: doubles up to the cap, and is
    /// drawn between half of that and all of it, so that the many sinks a
    /// master's restart stopped together do not all come back at once.
    pub fn next_delay(&mut self) -> std::time::Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Self::CAP);
        d.mul_f64(0.5 + 0.5 * jitter())
    }

    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// A number in [0, 1) that differs from call to call (std's hasher keys are
/// random per process and advance per `RandomState`).
fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let bits = std::collections::hash_map::RandomState::new().build_hasher().finish();
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new()
    }
}
