//! Races between a partial update (one that left a large, TOASTed value
//! alone) and a delete, a key change, a re-insert or another master's new
//! value of that column. pgoutput does not send a TOASTed value an update
//! left unchanged; the winning change must still reach every master whole.

use mmsync::testbed::BedKafka;
use sqlx::PgConnection;

use crate::common::Synced;

/// `doc` is stored out of line and uncompressed, so an update that does not
/// set it reaches pgoutput as "unchanged".
const DOCS: &str = "
CREATE TABLE docs (id int PRIMARY KEY, val text NOT NULL, doc text NOT NULL);
ALTER TABLE docs ALTER COLUMN doc SET STORAGE EXTERNAL;
";

async fn exec(conn: &mut PgConnection, sql: &str) {
    let done = sqlx::raw_sql(sql).execute(conn).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    assert!(done.rows_affected() >= 1, "{sql} changed no row");
}

/// A master's docs as `id|val|md5(doc)`, by id.
async fn docs(s: &Synced, master: &str) -> Vec<String> {
    let mut conn = s.conn(master).await;
    sqlx::query_scalar("SELECT concat_ws('|', id, val, md5(doc)) FROM docs ORDER BY id")
        .fetch_all(&mut conn)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_partial_update_that_wins_a_race_reaches_every_master_whole() {
    let masters = ["seoul", "busan", "jeju"];
    let mut s = Synced::new(&masters, BedKafka::Shared, DOCS, &["public.docs"], "").await;
    s.start();
    let mut seoul = s.conn("seoul").await;
    exec(&mut seoul, "INSERT INTO docs SELECT i, 'first', repeat(md5('d0-' || i), 100) FROM generate_series(1, 6) i")
        .await;
    s.converged("docs").await;
    // Every race is written while mmsync is stopped, each master blind to
    // the others' writes, one after the other (so each later write has the
    // higher version); busan's partial update is the newest write of each key.
    s.stop().await;
    let (mut busan, mut jeju) = (s.conn("busan").await, s.conn("jeju").await);
    // 1: deleted on seoul, then updated on busan: the update wins, and seoul
    //    must get the whole row back.
    exec(&mut seoul, "DELETE FROM docs WHERE id = 1").await;
    exec(&mut busan, "UPDATE docs SET val = 'busan' WHERE id = 1").await;
    // 2: a new doc on jeju, then busan's update of val on its old doc: busan's
    //    row wins whole, its doc included, also on jeju.
    exec(&mut jeju, "UPDATE docs SET doc = repeat(md5('jeju'), 100) WHERE id = 2").await;
    exec(&mut busan, "UPDATE docs SET val = 'busan' WHERE id = 2").await;
    // 3: deleted on seoul, then moved to key 13 on busan: 13 is new to seoul
    //    and jeju, and must arrive with its doc.
    exec(&mut seoul, "DELETE FROM docs WHERE id = 3").await;
    exec(&mut busan, "UPDATE docs SET id = 13 WHERE id = 3").await;
    // 4: deleted and inserted again with a new doc on jeju, then updated on
    //    busan (on the row it had).
    exec(&mut jeju, "DELETE FROM docs WHERE id = 4").await;
    exec(&mut jeju, "INSERT INTO docs VALUES (4, 'jeju', repeat(md5('jeju-4'), 100))").await;
    exec(&mut busan, "UPDATE docs SET val = 'busan' WHERE id = 4").await;
    // 5: updated on busan, then deleted on seoul: the delete is newer and
    //    wins everywhere, and on seoul the update arrives for a row long gone.
    exec(&mut busan, "UPDATE docs SET val = 'busan' WHERE id = 5").await;
    exec(&mut seoul, "DELETE FROM docs WHERE id = 5").await;
    // 6: no race: a partial update keeps the doc everywhere.
    exec(&mut busan, "UPDATE docs SET val = 'busan' WHERE id = 6").await;
    let expected = docs(&s, "busan").await;
    assert_eq!(expected.len(), 6, "busan: {expected:?}");
    s.start();
    let converged = s.converged("docs").await;
    for m in masters {
        assert_eq!(crate::common::dead_letter_reasons(&s, m).await, Vec::<String>::new(), "dead letters on {m}");
    }
    let ids: Vec<&str> = expected.iter().map(|r| r.split('|').next().unwrap()).collect();
    // Busan's rows, except key 5, which seoul's newer delete removed.
    assert_eq!(ids, ["1", "2", "4", "5", "6", "13"], "{expected:?}");
    let wanted: Vec<String> = expected.iter().filter(|r| !r.starts_with("5|")).cloned().collect();
    for m in masters {
        assert_eq!(docs(&s, m).await, wanted, "{m} (converged rows: {converged:?})");
    }
    // Key 2's winner carries the doc busan had, not jeju's newer one.
    let first_doc: String =
        sqlx::query_scalar("SELECT md5(repeat(md5('d0-2'), 100))").fetch_one(&mut busan).await.unwrap();
    assert!(wanted.contains(&format!("2|busan|{first_doc}")), "{wanted:?}");
    s.stop().await;
}
