//! PostgreSQL's SQLSTATE codes, classed in one place: what stops mmsync
//! until the operator acts, what refuses one record (it becomes a dead
//! letter, the rest flows), and what passes (the link waits and retries).
//! [`crate::error::Error::class`] and the sink ask here; nothing else reads
//! a code.

/// A unique value another row holds (the sink settles it by last-writer-wins).
pub const UNIQUE_VIOLATION: &str = "23505";

/// A connection or set-up statement failed for good: authentication (class
/// 28), no such database (3D000), no privilege or no such object (class 42).
pub fn is_fatal_setup(code: &str) -> bool {
    code.starts_with("28") || code == "3D000" || code.starts_with("42")
}

/// The same for the replication connection, which also meets a server
/// whose `wal_level` is not logical (55000).
pub fn is_fatal_replication(code: &str) -> bool {
    is_fatal_setup(code) || code == "55000"
}

/// The target refuses this data, not "try again later": class 22 (data
/// exception), 23 (integrity constraint), 42 (a column or type that does
/// not exist: drift), except the refusals that pass; and 21000, an upsert
/// that met one row twice (two keys whose texts differ but that the target
/// finds equal, `1` and `01`, citext `ABC` and `abc`, in one statement:
/// each record alone then settles them).
pub fn refuses_the_data(code: &str) -> bool {
    (code.starts_with("22") || code.starts_with("23") || code.starts_with("42") || code == "21000")
        && !is_passing_refusal(code)
}

/// Refusals about the table, not the record, that an operator's fix or a
/// moment ends: a privilege revoked (42501), the table dropped or renamed
/// while being recreated (42P01). The records wait in Kafka.
pub fn is_passing_refusal(code: &str) -> bool {
    matches!(code, "42501" | "42P01")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_code_has_one_meaning_per_place_it_is_met() {
        // Set-up: bad password, no database, no privilege are fatal; a lost connection is not.
        assert!(is_fatal_setup("28P01") && is_fatal_setup("3D000") && is_fatal_setup("42501"));
        assert!(!is_fatal_setup("08006") && !is_fatal_setup("57P01") && !is_fatal_setup("55000"));
        assert!(is_fatal_replication("55000"));
        // Apply: a check or unique violation, a bad value, drift refuse the record...
        for code in ["23514", UNIQUE_VIOLATION, "22P02", "42703", "21000"] {
            assert!(refuses_the_data(code), "{code}");
        }
        // ...a revoked privilege or a table being recreated pass, and so do
        // serialization failures and deadlocks (retried).
        for code in ["42501", "42P01", "40001", "40P01", "08006"] {
            assert!(!refuses_the_data(code), "{code}");
        }
        assert!(is_passing_refusal("42501") && is_passing_refusal("42P01") && !is_passing_refusal("23505"));
    }
}
