//! Tombstone retention: a tombstone goes once it is older than the horizon
//! and no other master can still send a change older than it; a master that
//! is away holds them, however long.

use mmsync::testbed::{wait_for, BedKafka};

use crate::common::{mmsync, Synced, DEADLINE, KV};

async fn tombstone_of(s: &Synced, master: &str, id: i32) -> Option<i64> {
    sqlx::query_scalar(
        "SELECT version FROM mmsync.tombstones WHERE table_name = 'kv' AND key = jsonb_build_object('id', $1::text)",
    )
    .bind(id.to_string())
    .fetch_optional(&mut s.conn(master).await)
    .await
    .unwrap()
}

/// Waits until `master`'s clock is `margin_us` past `deleted` and three more
/// retention rounds have run there; then the tombstone of `id` must still
/// be there, at `deleted`.
async fn kept_past(s: &Synced, master: &str, id: i32, deleted: i64, margin_us: i64, why: &str) {
    wait_for("the horizon to pass", DEADLINE, || async {
        let now: i64 = sqlx::query_scalar("SELECT mmsync.now_us()").fetch_one(&mut s.conn(master).await).await.unwrap();
        (now > deleted + margin_us).then_some(())
    })
    .await;
    let runs = s.metric("mmsync_tombstone_retention_runs_total", &[("master", master)]).await;
    s.wait_metric("mmsync_tombstone_retention_runs_total", &[("master", master)], runs + 3.0).await;
    assert_eq!(tombstone_of(s, master, id).await, Some(deleted), "{why}");
}

async fn rows_exactly(s: &Synced, master: &str, rows: i64) {
    wait_for(&format!("{rows} rows in kv on {master}"), DEADLINE, || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM kv").fetch_one(&mut s.conn(master).await).await.ok()?;
        (n == rows).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_tombstone_outlives_its_horizon_while_a_master_that_could_still_undo_it_is_away_and_goes_after() {
    let mut s =
        Synced::new(&["seoul", "busan"], BedKafka::Shared, KV, &["public.kv"], "tombstones_keep_seconds = 1").await;
    s.start();
    let mut seoul = s.conn("seoul").await;
    let mut busan = s.conn("busan").await;
    sqlx::raw_sql("INSERT INTO kv VALUES (1, 'first', 1), (2, 'other', 1)").execute(&mut seoul).await.unwrap();
    rows_exactly(&s, "busan", 2).await;
    // Tombstones of the past go once the horizon has passed: both masters hear from each other.
    sqlx::raw_sql("DELETE FROM kv WHERE id = 2").execute(&mut seoul).await.unwrap();
    rows_exactly(&s, "busan", 1).await;
    for m in ["seoul", "busan"] {
        wait_for("the old tombstone to go", DEADLINE, || async {
            tombstone_of(&s, m, 2).await.is_none().then_some(())
        })
        .await;
    }

    // busan's source stops, as when its mmsync is down: its heartbeat row is
    // locked, so the source waits on it and captures nothing meanwhile.
    let mut hold = s.conn("busan").await;
    sqlx::raw_sql("BEGIN; SELECT 1 FROM mmsync.heartbeats WHERE master = 'busan' FOR UPDATE")
        .execute(&mut hold)
        .await
        .unwrap();
    // Not before its next beat: until then it still captures, and would
    // send the update below before seoul's delete (no race left to test).
    wait_for("busan's source to wait on its heartbeat row", DEADLINE, || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%mmsync.heartbeats%'",
        )
        .fetch_one(&mut s.conn("busan").await)
        .await
        .ok()?;
        (waiting > 0).then_some(())
    })
    .await;
    // An update on busan that its source has not sent yet, then a newer
    // delete on seoul, which reaches busan and wins there.
    sqlx::raw_sql("UPDATE kv SET val = 'late', n = 2 WHERE id = 1").execute(&mut busan).await.unwrap();
    sqlx::raw_sql("DELETE FROM kv WHERE id = 1").execute(&mut seoul).await.unwrap();
    rows_exactly(&s, "busan", 0).await;
    let deleted = tombstone_of(&s, "seoul", 1).await.expect("seoul's delete left a tombstone");

    // Retention runs on seoul well past the horizon, and keeps it: busan's
    // late update is still to come, and only the tombstone makes it lose.
    kept_past(&s, "seoul", 1, deleted, 1_000_000, "seoul dropped the tombstone busan's update needs").await;
    let behind = s.metric("mmsync_tombstone_retention_behind_seconds", &[("master", "seoul")]).await;
    assert!(behind > 1.0, "the gauge shows retention held back: {behind}");
    let (code, out) = mmsync(&s.topology, &["status"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("the latest heartbeat of busan here"), "status names what holds seoul's tombstones: {out}");
    assert!(out.contains("seoul: tombstones are kept past [sync] tombstones_keep_seconds = 1"), "{out}");
    let (code, out) = mmsync(&s.topology, &["check"]).await;
    assert_eq!(code, 0, "a master away is no problem of the setup: {out}");
    assert!(out.contains("warning: master \"seoul\": tombstones are kept past"), "check says so too: {out}");

    // busan is back: its update reaches seoul and loses to the tombstone,
    // and then the tombstone goes on both masters.
    sqlx::raw_sql("COMMIT").execute(&mut hold).await.unwrap();
    for m in ["seoul", "busan"] {
        wait_for("the tombstone to go", DEADLINE, || async { tombstone_of(&s, m, 1).await.is_none().then_some(()) })
            .await;
    }
    let lost: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM mmsync.conflicts WHERE key = '{\"id\": \"1\"}' AND incoming_origin = 'busan'",
    )
    .fetch_one(&mut seoul)
    .await
    .unwrap();
    assert_eq!(lost, 1, "busan's late update lost to the tombstone on seoul");
    assert!(s.converged("kv").await.is_empty(), "no master brought key 1 back");
    let (code, out) = mmsync(&s.topology, &["verify"]).await;
    assert_eq!(code, 0, "{out}");
    let pruned = s.metric("mmsync_tombstones_pruned_total", &[("master", "seoul")]).await;
    assert!(pruned >= 2.0, "{pruned}");

    // A dead letter of busan's waits on seoul, an hour old: retried later,
    // it must meet the tombstone of a newer delete, which is kept meanwhile.
    let topic = s.bed.topic("busan", "public.kv");
    sqlx::query(
        "INSERT INTO mmsync.dead_letters (topic, partition, kafka_offset, reason, record_value)
         VALUES ($1, 0, 0, 'refused', convert_to('{\"format\": 1, \"op\": \"u\", \"version\": '
                 || (mmsync.now_us() - 3600000000) || ', \"origin\": \"busan\"}', 'UTF8'))",
    )
    .bind(&topic)
    .execute(&mut seoul)
    .await
    .unwrap();
    sqlx::raw_sql("INSERT INTO kv VALUES (3, 'third', 1)").execute(&mut seoul).await.unwrap();
    rows_exactly(&s, "busan", 1).await;
    sqlx::raw_sql("DELETE FROM kv WHERE id = 3").execute(&mut seoul).await.unwrap();
    let deleted = tombstone_of(&s, "seoul", 3).await.expect("a tombstone");
    // Past the horizon and the heartbeats' own lag, by a margin: without
    // the dead letter, the tombstone would go by now.
    kept_past(&s, "seoul", 3, deleted, 5_000_000, "the dead letter holds it").await;
    let behind = s.metric("mmsync_tombstone_retention_behind_seconds", &[("master", "seoul")]).await;
    assert!(behind > 3000.0, "held an hour back, at the dead letter's version: {behind}");
    let (_, out) = mmsync(&s.topology, &["status"]).await;
    assert!(out.contains("a pending dead letter here"), "{out}");
    sqlx::raw_sql("UPDATE mmsync.dead_letters SET retried_at = now()").execute(&mut seoul).await.unwrap();
    wait_for("the tombstone to go", DEADLINE, || async { tombstone_of(&s, "seoul", 3).await.is_none().then_some(()) })
        .await;
    s.stop().await;
}

#[tokio::test]
async fn a_tombstone_is_kept_while_a_link_is_stuck_behind_an_older_change_even_as_heartbeats_flow() {
    // One partition per topic: a change stuck at its head holds back the
    // ones behind it.
    let mut s = Synced::with_partitions(
        &["seoul", "busan"],
        BedKafka::Shared,
        KV,
        &["public.kv"],
        "tombstones_keep_seconds = 1",
        Some(1),
    )
    .await;
    s.start();
    let mut seoul = s.conn("seoul").await;
    let mut busan = s.conn("busan").await;
    sqlx::raw_sql("INSERT INTO kv VALUES (1, 'first', 1), (2, 'second', 1)").execute(&mut seoul).await.unwrap();
    rows_exactly(&s, "busan", 2).await;
    // seoul's sink cannot apply busan's change of key 2 (a session holds
    // that row), and busan's older change of key 1 waits behind it; busan's
    // heartbeats reach seoul all along.
    let mut hold = s.conn("seoul").await;
    sqlx::raw_sql("BEGIN; SELECT 1 FROM kv WHERE id = 2 FOR UPDATE").execute(&mut hold).await.unwrap();
    sqlx::raw_sql("UPDATE kv SET val = 'stuck' WHERE id = 2; UPDATE kv SET val = 'late' WHERE id = 1")
        .execute(&mut busan)
        .await
        .unwrap();
    s.wait_metric("mmsync_kafka_pending_records", &[("source", "busan"), ("target", "seoul")], 2.0).await;
    sqlx::raw_sql("DELETE FROM kv WHERE id = 1").execute(&mut seoul).await.unwrap();
    let deleted = tombstone_of(&s, "seoul", 1).await.expect("seoul's delete left a tombstone");
    rows_exactly(&s, "busan", 1).await;
    // Long past the horizon, with busan's heartbeats newer than the delete.
    wait_for("the horizon and a heartbeat to pass", DEADLINE, || async {
        let now: i64 =
            sqlx::query_scalar("SELECT mmsync.now_us()").fetch_one(&mut s.conn("seoul").await).await.unwrap();
        let beat: i64 = sqlx::query_scalar(
            "SELECT (extract(epoch FROM beat_at) * 1000000)::int8 FROM mmsync.heartbeats WHERE master = 'busan'",
        )
        .fetch_one(&mut s.conn("seoul").await)
        .await
        .unwrap();
        (now > deleted + 5_000_000 && beat > deleted + 3_000_000).then_some(())
    })
    .await;
    kept_past(&s, "seoul", 1, deleted, 5_000_000, "the stuck link holds it").await;
    let (_, out) = mmsync(&s.topology, &["status"]).await;
    assert!(out.contains("records of busan not applied here yet"), "{out}");

    // The link moves: busan's older change of key 1 loses to the tombstone.
    sqlx::raw_sql("COMMIT").execute(&mut hold).await.unwrap();
    wait_for("the tombstone to go", DEADLINE, || async { tombstone_of(&s, "seoul", 1).await.is_none().then_some(()) })
        .await;
    let rows = s.converged("kv").await;
    assert_eq!(rows.len(), 1, "key 1 stays deleted everywhere: {rows:?}");
    s.stop().await;
}
