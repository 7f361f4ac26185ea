//! Real schemas: foreign keys (CASCADE, SET NULL, self-references), and
//! triggers of the application's own, under concurrent writes on every
//! master. Tables have their own sinks, so a child's change may arrive before
//! its parent's: the applier writes as PostgreSQL's own apply worker does
//! (`session_replication_role = replica`), so arrival order never makes a good
//! change a dead letter.

use mmsync::testbed::BedKafka;
use sqlx::PgConnection;

use crate::common::{mmsync, Synced};

/// The chat service of the foreign-keys issue, plus replies (a message
/// referencing a message) and an audit trail kept by a trigger of its own.
const CHAT: &str = "
CREATE TABLE rooms (id bigserial PRIMARY KEY, title text NOT NULL);
CREATE TABLE messages (
    id bigserial PRIMARY KEY,
    room_id bigint NOT NULL REFERENCES rooms(id) ON DELETE CASCADE,
    reply_to bigint REFERENCES messages(id) ON DELETE SET NULL,
    body text NOT NULL
);
CREATE TABLE audit (id bigserial PRIMARY KEY, message_id bigint NOT NULL, at timestamptz NOT NULL DEFAULT now());
CREATE FUNCTION audit_message() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO audit (message_id) VALUES (NEW.id); RETURN NEW; END $$;
CREATE TRIGGER audit_message AFTER INSERT ON messages FOR EACH ROW EXECUTE FUNCTION audit_message();
";

const TABLES: &[&str] = &["public.rooms", "public.messages"];

async fn scalar(conn: &mut PgConnection, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(conn).await.unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// What one master's application does: rooms each followed by its first
/// message in a second quick transaction, replies, one room with 100
/// messages in one transaction, and a few rooms deleted (their messages go
/// by cascade, replies to them lose their reference). Returns the messages
/// it inserted.
async fn chat(conn: &mut PgConnection, rooms: usize) -> i64 {
    let mut inserted = 0;
    let mut mine = Vec::new();
    for i in 0..rooms {
        let room: i64 = sqlx::query_scalar("INSERT INTO rooms (title) VALUES ($1) RETURNING id")
            .bind(format!("room {i}"))
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        mine.push(room);
        let first: i64 = sqlx::query_scalar("INSERT INTO messages (room_id, body) VALUES ($1, 'hello') RETURNING id")
            .bind(room)
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        inserted += 1;
        if i % 3 == 0 {
            sqlx::query("INSERT INTO messages (room_id, reply_to, body) VALUES ($1, $2, 'a reply')")
                .bind(room)
                .bind(first)
                .execute(&mut *conn)
                .await
                .unwrap();
            inserted += 1;
        }
        if i % 10 == 9 {
            // One of this master's own rooms, ten rooms back.
            sqlx::query("DELETE FROM rooms WHERE id = $1").bind(mine[i - 9]).execute(&mut *conn).await.unwrap();
        }
    }
    // One statement, one transaction: a room and its 100 messages.
    sqlx::query(
        "WITH r AS (INSERT INTO rooms (title) VALUES ('busy') RETURNING id)
         INSERT INTO messages (room_id, body) SELECT r.id, 'm' || i FROM r, generate_series(1, 100) i",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    inserted + 100
}

async fn chat_converges(masters: &[&str]) {
    let mut s = Synced::new(masters, BedKafka::Shared, CHAT, TABLES, "").await;
    s.start();
    let mut writers = Vec::new();
    for m in masters {
        let mut conn = s.conn(m).await;
        writers.push(tokio::spawn(async move { chat(&mut conn, 250).await }));
    }
    let mut local = Vec::new();
    for w in writers {
        local.push(w.await.unwrap());
    }
    let rooms = s.converged("rooms").await;
    let messages = s.converged("messages").await;
    assert!(
        rooms.len() > 200 * masters.len() && messages.len() > 300 * masters.len(),
        "{} rooms, {} messages",
        rooms.len(),
        messages.len()
    );
    let (code, out) = mmsync(&s.topology, &["verify"]).await;
    assert_eq!(code, 0, "{out}");
    for (m, inserted) in masters.iter().zip(&local) {
        assert_eq!(crate::common::dead_letter_reasons(&s, m).await, Vec::<String>::new(), "dead letters on {m}");
        let mut conn = s.conn(m).await;
        // Every message's room and replied-to message is there: the sources'
        // transactions kept the constraints, and so does their sum.
        let orphans = scalar(
            &mut conn,
            "SELECT count(*) FROM messages m WHERE NOT EXISTS (SELECT 1 FROM rooms r WHERE r.id = m.room_id)
               OR (m.reply_to IS NOT NULL AND NOT EXISTS (SELECT 1 FROM messages p WHERE p.id = m.reply_to))",
        )
        .await;
        assert_eq!(orphans, 0, "messages without their room or their replied-to message on {m}");
        // The application's trigger fired for this master's own writes only,
        // as it would under PostgreSQL's own replication.
        let audited = scalar(&mut conn, "SELECT count(*) FROM audit").await;
        assert_eq!(audited, *inserted, "audit rows on {m}");
    }
    s.stop().await;
}

#[tokio::test]
async fn a_chat_schema_with_foreign_keys_converges_without_dead_letters_on_two_masters() {
    chat_converges(&["seoul", "busan"]).await;
}

#[tokio::test]
async fn a_chat_schema_with_foreign_keys_converges_without_dead_letters_on_three_masters() {
    chat_converges(&["seoul", "busan", "jeju"]).await;
}

/// Seoul deletes a room while busan, not having seen that yet, posts in it.
/// Neither master refuses the other's change: both end with the message and
/// without its room (an orphan, the same on every master, as PostgreSQL's own
/// replication would leave it), and nothing is a dead letter.
#[tokio::test]
async fn a_room_deleted_on_one_master_while_another_posts_in_it_converges_without_dead_letters() {
    let mut s = Synced::new(&["seoul", "busan"], BedKafka::Shared, CHAT, TABLES, "").await;
    s.start();
    let mut seoul = s.conn("seoul").await;
    let room: i64 = sqlx::query_scalar("INSERT INTO rooms (title) VALUES ('doomed') RETURNING id")
        .fetch_one(&mut seoul)
        .await
        .unwrap();
    s.converged("rooms").await;
    s.stop().await;
    // Both writes while mmsync is stopped: neither master sees the other's.
    sqlx::query("DELETE FROM rooms WHERE id = $1").bind(room).execute(&mut seoul).await.unwrap();
    let mut busan = s.conn("busan").await;
    sqlx::query("INSERT INTO messages (room_id, body) VALUES ($1, 'anyone here?')")
        .bind(room)
        .execute(&mut busan)
        .await
        .unwrap();
    s.start();
    assert!(s.converged("rooms").await.is_empty());
    let messages = s.converged("messages").await;
    assert_eq!(messages.len(), 1, "{messages:?}");
    let (code, out) = mmsync(&s.topology, &["verify"]).await;
    assert_eq!(code, 0, "{out}");
    for m in ["seoul", "busan"] {
        assert_eq!(crate::common::dead_letter_reasons(&s, m).await, Vec::<String>::new(), "dead letters on {m}");
    }
    s.stop().await;
}

/// Every master takes the same e-mail addresses under keys of its own while
/// none sees the others (mmsync stopped). Only one row may keep each address:
/// the newest write by (version, origin), on every master; each loser is
/// removed everywhere and logged with its whole row; nothing is a dead letter.
#[tokio::test]
async fn an_email_taken_on_three_masters_at_once_ends_with_the_newest_owner_everywhere() {
    const USERS: &str = "CREATE TABLE users (id bigserial PRIMARY KEY, email text NOT NULL UNIQUE, name text NOT NULL)";
    let names = ["seoul", "busan", "jeju"];
    let mut s = Synced::new(&names, BedKafka::Shared, USERS, &["public.users"], "").await;
    let seed = crate::common::seed("unique_email");
    let mut rng = crate::common::Rng::new(seed);
    let mut conns = Vec::new();
    for m in names {
        conns.push(s.conn(m).await);
    }
    // 40 addresses; each taken on every master, in a random order of masters.
    let mut newest = std::collections::BTreeMap::new();
    for e in 0..40 {
        let mut order = vec![0usize, 1, 2];
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        for m in order {
            sqlx::query("INSERT INTO users (email, name) VALUES ($1, $2)")
                .bind(format!("user{e}@example.com"))
                .bind(names[m])
                .execute(&mut conns[m])
                .await
                .unwrap();
            newest.insert(format!("user{e}@example.com"), names[m]);
        }
    }
    s.start();
    let rows = s.converged("users").await;
    assert_eq!(rows.len(), 40, "seed {seed}: one owner per address: {rows:?}");
    let (code, out) = mmsync(&s.topology, &["verify"]).await;
    assert_eq!(code, 0, "{out}");
    let mut seoul = s.conn("seoul").await;
    let owners: Vec<(String, String)> =
        sqlx::query_as("SELECT email, name FROM users ORDER BY email").fetch_all(&mut seoul).await.unwrap();
    for (email, name) in &owners {
        assert_eq!(newest[email], name, "seed {seed}: {email} went to an older write");
    }
    for m in names {
        assert_eq!(crate::common::dead_letter_reasons(&s, m).await, Vec::<String>::new(), "dead letters on {m}");
        let mut conn = s.conn(m).await;
        // Every loser that reached this master was logged here with its row.
        let logged = scalar(
            &mut conn,
            "SELECT count(*) FROM mmsync.conflicts WHERE kind = 'unique_value_lost' AND loser_row ? 'email'",
        )
        .await;
        assert!(logged >= 40, "{m} logged {logged} unique-value conflicts");
    }
    s.stop().await;
}

#[tokio::test]
async fn partial_and_expression_unique_indexes_are_settled_like_plain_ones() {
    const ACCOUNTS: &str = "
        CREATE TABLE accounts (id int PRIMARY KEY, handle text NOT NULL, email text, deleted boolean NOT NULL DEFAULT false);
        CREATE UNIQUE INDEX accounts_handle ON accounts (lower(handle));
        CREATE UNIQUE INDEX accounts_live_email ON accounts (email) WHERE NOT deleted;";
    let mut s = Synced::new(&["seoul", "busan"], BedKafka::Shared, ACCOUNTS, &["public.accounts"], "").await;
    let (mut seoul, mut busan) = (s.conn("seoul").await, s.conn("busan").await);
    // Each pair written seoul first, then busan: busan's is the newer write.
    for (sql_seoul, sql_busan) in [
        // The same handle to lower(): busan's wins.
        ("INSERT INTO accounts VALUES (1, 'Alice', 'a@x')", "INSERT INTO accounts VALUES (2, 'ALICE', 'b@x')"),
        // The same live email: busan's wins.
        ("INSERT INTO accounts VALUES (3, 'carol', 'c@x')", "INSERT INTO accounts VALUES (4, 'dave', 'c@x')"),
        // An email of a deleted account is free: both stay.
        ("INSERT INTO accounts VALUES (5, 'erin', 'e@x', true)", "INSERT INTO accounts VALUES (6, 'frank', 'e@x')"),
    ] {
        sqlx::raw_sql(sql_seoul).execute(&mut seoul).await.unwrap();
        sqlx::raw_sql(sql_busan).execute(&mut busan).await.unwrap();
    }
    s.start();
    let rows = s.converged("accounts").await;
    let ids: Vec<i64> = {
        let mut conn = s.conn("seoul").await;
        sqlx::query_scalar("SELECT id::int8 FROM accounts ORDER BY id").fetch_all(&mut conn).await.unwrap()
    };
    assert_eq!(ids, [2, 4, 5, 6], "{rows:?}");
    let (code, out) = mmsync(&s.topology, &["verify"]).await;
    assert_eq!(code, 0, "{out}");
    for m in ["seoul", "busan"] {
        assert_eq!(crate::common::dead_letter_reasons(&s, m).await, Vec::<String>::new(), "dead letters on {m}");
    }
    // Each of seoul's two losers is logged with its row where it lost:
    // on seoul when busan's winner arrived first, or on busan when seoul's
    // row arrived there first (busan then sends the loser's removal, which
    // reaches seoul as a plain delete).
    for key in [1, 3] {
        let mut logged = 0;
        for conn in [&mut seoul, &mut busan] {
            logged += scalar(
                conn,
                &format!(
                    "SELECT count(*) FROM mmsync.conflicts WHERE kind = 'unique_value_lost' AND loser_row ? 'handle'
                     AND key = '{{\"id\": \"{key}\"}}'"
                ),
            )
            .await;
        }
        assert!(logged >= 1, "seoul's loser {key} is logged with its row on some master");
    }
    s.stop().await;
}
