//! Masters that held rows before `mmsync init`: `mmsync adopt` stamps them
//! so that they reach the other masters, and keys held differently are
//! settled alike everywhere, while the applications keep writing.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use mmsync::testbed::{BedKafka, BED_DATABASE};
use sqlx::{Connection, PgConnection};

use crate::common::{mmsync, Rng, Synced};

/// Rows seoul holds before init: enough that adoption overlaps the
/// applications' writes for a while.
const N: i32 = 100_000;

const ITEMS: &str = "CREATE TABLE items (id int PRIMARY KEY, body text NOT NULL, updated_at timestamptz NOT NULL)";

/// Rows as they were before init: written with the triggers off, so they
/// have no origin and version 0, and no source sends them.
async fn existing(conn: &mut PgConnection, sql: &str) {
    sqlx::raw_sql(&format!("BEGIN; SET LOCAL session_replication_role = replica; {sql}; COMMIT;"))
        .execute(conn)
        .await
        .unwrap();
}

/// What one master's application writes while adoption runs: upserts of
/// random keys (existing or new); returns the newest stamp it got per key.
async fn application(
    url: String,
    master: &'static str,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> BTreeMap<i32, (i64, String, String)> {
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let mut rng = Rng::new(seed);
    let mut newest = BTreeMap::new();
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let id = rng.below(2 * N as u64 + 6000) as i32;
        let body = format!("{master} wrote {i}");
        let (version, origin): (i64, String) = sqlx::query_as(
            "INSERT INTO items VALUES ($1, $2, now()) ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body, updated_at = now()
             RETURNING mmsync_version, mmsync_origin::text",
        )
        .bind(id)
        .bind(&body)
        .fetch_one(&mut conn)
        .await
        .unwrap();
        newest.insert(id, (version, origin, body));
    }
    newest
}

#[tokio::test]
async fn existing_rows_reach_every_master_and_the_seed_wins_where_they_differ_while_applications_write() {
    let mut s = Synced::new(&["seoul", "busan"], BedKafka::Shared, ITEMS, &["public.items"], "").await;
    let (mut seoul, mut busan) = (s.conn("seoul").await, s.conn("busan").await);
    // seoul holds 1..N; busan the last 500 of them (differently) and 200 of its own.
    let (overlap, own) = ((N - 499)..=N, (2 * N + 1)..=(2 * N + 200));
    existing(&mut seoul, &format!("INSERT INTO items SELECT i, 'seoul ' || i, now() FROM generate_series(1, {N}) i"))
        .await;
    existing(
        &mut busan,
        &format!(
            "INSERT INTO items SELECT i, 'busan ' || i, now() FROM generate_series({}, {}) i
             UNION ALL SELECT i, 'busan ' || i, now() FROM generate_series({}, {}) i",
            overlap.start(),
            overlap.end(),
            own.start(),
            own.end()
        ),
    )
    .await;

    // Adopt refuses while a run syncs: a sink could overwrite a row not yet stamped.
    s.start();
    for m in ["seoul", "busan"] {
        s.wait_metric("mmsync_master_up", &[("master", m)], 1.0).await;
    }
    let (code, out) = mmsync(&s.topology, &["adopt", "--seed", "seoul"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("another mmsync run, adopt or join holds this master"), "{out}");
    s.stop().await;

    // The applications write throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let seed = crate::common::seed("adopt");
    let writers: Vec<_> = [("seoul", 1), ("busan", 2)]
        .into_iter()
        .map(|(m, k)| {
            let url = s.bed.master(m).url(BED_DATABASE);
            tokio::spawn(application(url, m, seed + k, stop.clone()))
        })
        .collect();
    let (code, out) = mmsync(&s.topology, &["adopt", "--seed", "seoul", "--batch", "5000"]).await;
    assert_eq!(code, 0, "{out}");
    // Rows the applications wrote since init have their stamps already.
    let adopted: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("seoul public.items: ")?.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!((1..=N as u64).contains(&adopted), "{out}");
    s.start();
    let mut written: BTreeMap<i32, (i64, String, String)> = BTreeMap::new();
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        for (id, stamp) in w.await.unwrap() {
            let e = written.entry(id).or_insert(stamp.clone());
            if (stamp.0, &stamp.1) > (e.0, &e.1) {
                *e = stamp;
            }
        }
    }
    assert!(written.len() > 50, "the applications wrote only {} keys", written.len());
    s.converged("items").await;
    let (code, out) = mmsync(&s.topology, &["verify"]).await;
    assert_eq!(code, 0, "{out}");

    let rows: BTreeMap<i32, String> = sqlx::query_as::<_, (i32, String)>("SELECT id, body FROM items")
        .fetch_all(&mut busan)
        .await
        .unwrap()
        .into_iter()
        .collect();
    for id in (1..=N).chain(own.clone()) {
        let expected = match written.get(&id) {
            Some((_, _, body)) => body.clone(),
            None if id <= N => format!("seoul {id}"),
            None => format!("busan {id}"),
        };
        assert_eq!(rows.get(&id), Some(&expected), "seed {seed}: key {id}");
    }
    // Busan's rows that lost to seoul's are logged, whole, where seoul's won.
    let logged: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM mmsync.conflicts WHERE loser_row->>'body' LIKE 'busan %' AND winner_origin = 'seoul'",
    )
    .fetch_one(&mut seoul)
    .await
    .unwrap();
    let overlap_untouched = overlap.filter(|id| !written.contains_key(id)).count() as i64;
    assert!(logged >= overlap_untouched, "{logged} logged, {overlap_untouched} expected");
    // Nothing is left without an origin, and running adopt again changes nothing.
    s.stop().await;
    let (code, out) = mmsync(&s.topology, &["adopt", "--seed", "seoul"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("seoul public.items: 0 rows adopted") && out.contains("busan public.items: 0 rows adopted"),
        "{out}"
    );
}

#[tokio::test]
async fn with_a_version_column_the_most_recently_updated_existing_row_wins_on_every_master() {
    let names = ["seoul", "busan", "jeju"];
    let mut s = Synced::new(&names, BedKafka::Shared, ITEMS, &["public.items"], "").await;
    // Key i: seoul's row is newer for even i, jeju's for odd i; busan's is
    // always the oldest. Key 100 is busan's alone.
    let mut conns = Vec::new();
    for m in names {
        conns.push(s.conn(m).await);
    }
    existing(
        &mut conns[0],
        "INSERT INTO items SELECT i, 'seoul', now() - (i % 2) * interval '1 day' FROM generate_series(1, 50) i",
    )
    .await;
    existing(
        &mut conns[1],
        "INSERT INTO items SELECT i, 'busan', now() - interval '3 days' FROM generate_series(1, 50) i",
    )
    .await;
    existing(&mut conns[1], "INSERT INTO items VALUES (100, 'busan', now() - interval '9 days')").await;
    existing(
        &mut conns[2],
        "INSERT INTO items SELECT i, 'jeju', now() - interval '12 hours' FROM generate_series(1, 50) i",
    )
    .await;
    let (code, out) = mmsync(&s.topology, &["adopt", "--version-column", "updated_at"]).await;
    assert_eq!(code, 0, "{out}");
    s.start();
    s.converged("items").await;
    let rows: Vec<(i32, String)> =
        sqlx::query_as("SELECT id, body FROM items ORDER BY id").fetch_all(&mut conns[1]).await.unwrap();
    assert_eq!(rows.len(), 51);
    for (id, body) in rows {
        let expected = if id == 100 {
            "busan"
        } else if id % 2 == 0 {
            "seoul"
        } else {
            "jeju"
        };
        assert_eq!(body, expected, "key {id}");
    }
    let (code, out) = mmsync(&s.topology, &["verify"]).await;
    assert_eq!(code, 0, "{out}");
    s.stop().await;
}
