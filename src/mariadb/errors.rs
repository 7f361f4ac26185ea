//! What MariaDB's error numbers mean to mmsync, in one place: which errors
//! are worth a retry, which need the operator, and which say that the target
//! refuses a record's data (a dead letter, never a retry loop).

use crate::error::Class;

/// ER_DUP_ENTRY: a unique index (other than the key the upsert names) holds the value.
pub const DUPLICATE_ENTRY: u16 = 1062;
/// ER_MASTER_FATAL_ERROR_READING_BINLOG: the binlog the position needs is gone, or unreadable.
pub const BINLOG_UNREADABLE: u16 = 1236;

/// The server's error number, if the error came from the server.
pub fn code(e: &mysql_async::Error) -> Option<u16> {
    match e {
        mysql_async::Error::Server(s) => Some(s.code),
        _ => None,
    }
}

/// Errors that say the record's data cannot go into this table as it is:
/// a constraint, a value the column cannot take, a column that is missing.
pub fn refuses_the_data(code: u16) -> bool {
    matches!(
        code,
        1048 // column cannot be null
        | 1054 // unknown column (the tables differ between masters)
        | 1062 // duplicate entry in a unique index
        | 1264 // out of range
        | 1265 // data truncated
        | 1292 // incorrect value (dates, numbers)
        | 1364 // a column without a default was not given
        | 1366 // incorrect value for the column's type or character set
        | 1406 // data too long
        | 1451 | 1452 // a foreign key (when checks are on)
        | 1690 // value out of range in an expression
        | 3140 // invalid JSON
        | 4025 // CHECK constraint
        | 4078 // illegal parameter data type
    )
}

/// Errors that need the operator: credentials, privileges on mmsync's own
/// database, a database that does not exist.
fn needs_the_operator(code: u16) -> bool {
    matches!(
        code,
        1044 // access denied to a database
        | 1045 // access denied (user or password)
        | 1049 // unknown database
        | 1227 // a privilege is missing (REPLICATION SLAVE, say)
        | 1236 // the binlog the position needs is gone
        | 1251 // the client cannot use the server's authentication method
    )
}

/// The single place where MariaDB errors are classed.
pub fn class(e: &mysql_async::Error) -> Class {
    match e {
        mysql_async::Error::Server(s) if needs_the_operator(s.code) => Class::Fatal,
        mysql_async::Error::Url(_) => Class::Fatal,
        // Lock waits, deadlocks, lost connections, a server shutting down,
        // a table dropped for a moment: retried with backoff.
        _ => Class::Retry,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: u16) -> mysql_async::Error {
        mysql_async::Error::Server(mysql_async::ServerError { code, message: String::new(), state: String::new() })
    }

    #[test]
    fn a_deadlock_is_retried_bad_credentials_are_not_and_a_duplicate_is_the_datas_fault() {
        assert_eq!(class(&server(1213)), Class::Retry);
        assert_eq!(class(&server(1205)), Class::Retry);
        assert_eq!(class(&server(1045)), Class::Fatal);
        assert_eq!(class(&server(BINLOG_UNREADABLE)), Class::Fatal);
        assert!(refuses_the_data(DUPLICATE_ENTRY) && refuses_the_data(4025));
        assert!(!refuses_the_data(1213));
    }
}
