//! Chaos: kill a master, the broker or mmsync itself while every master takes
//! conflicting writes. Afterwards `mmsync verify` finds the masters identical
//! and every acknowledged write is there, or lost last-writer-wins to a newer
//! one. CI runs a few fault cycles; `MMSYNC_CHAOS_CYCLES=50` runs the long version.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mmsync::testbed::{wait_for, BedKafka, BED_DATABASE};
use sqlx::{Connection, PgConnection};
use tokio::task::JoinHandle;

use crate::common::{kv_state, mmsync, seed, write_once, Rng, Synced, Uncertain, Written, DEADLINE, KV};

/// Keys the writers fight over.
const KEYS: u64 = 300;

fn cycles() -> usize {
    std::env::var("MMSYNC_CHAOS_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(3)
}

/// What the writers do.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Workload {
    /// [`write_once`] on the kv table, checked against the LWW model.
    Kv,
    /// [`chat_once`] on rooms and messages (a foreign key with CASCADE).
    Chat,
}

/// The chat schema of the foreign-keys issue, for the chaos runs: a unique
/// room slug that masters take at once, and an audit trail kept by a
/// trigger of the application's own (not synced).
const CHAT: &str = "
CREATE TABLE rooms (id bigserial PRIMARY KEY, title text NOT NULL, slug text UNIQUE);
CREATE TABLE messages (
    id bigserial PRIMARY KEY,
    room_id bigint NOT NULL REFERENCES rooms(id) ON DELETE CASCADE,
    reply_to bigint REFERENCES messages(id) ON DELETE SET NULL,
    body text NOT NULL
);
CREATE TABLE audit (id bigserial PRIMARY KEY, message_id bigint NOT NULL);
CREATE FUNCTION audit_message() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO audit (message_id) VALUES (NEW.id); RETURN NEW; END $$;
CREATE TRIGGER audit_message AFTER INSERT ON messages FOR EACH ROW EXECUTE FUNCTION audit_message();";

/// One step of a chat application: a room and its first message in two
/// quick transactions; a post or a reply in any room (another master's
/// included); now and then a room deleted, whoever made it. Another
/// master's delete of a room can refuse a post here (a foreign-key error,
/// nothing written): that counts as no write.
async fn chat_once(conn: &mut PgConnection, rng: &mut Rng) -> Result<bool, ()> {
    let step = rng.below(10);
    let result = match step {
        0..=3 => {
            // A slug of 300: masters take the same one at once, and mmsync
            // settles it (a slug taken here already is no write).
            let room: Option<i64> = sqlx::query_scalar(
                "INSERT INTO rooms (title, slug) VALUES ('room', $1) ON CONFLICT (slug) DO NOTHING RETURNING id",
            )
            .bind(format!("slug-{}", rng.below(300)))
            .fetch_optional(&mut *conn)
            .await
            .map_err(|_| ())?;
            let Some(room) = room else { return Ok(false) };
            sqlx::query("INSERT INTO messages (room_id, body) VALUES ($1, 'hello')")
                .bind(room)
                .execute(&mut *conn)
                .await
        }
        4..=6 => {
            sqlx::query("INSERT INTO messages (room_id, body) SELECT id, 'post' FROM rooms ORDER BY random() LIMIT 1")
                .execute(&mut *conn)
                .await
        }
        7..=8 => {
            sqlx::query(
                "INSERT INTO messages (room_id, reply_to, body)
                 SELECT room_id, id, 'reply' FROM messages ORDER BY random() LIMIT 1",
            )
            .execute(&mut *conn)
            .await
        }
        _ => {
            sqlx::query("DELETE FROM rooms WHERE id = (SELECT id FROM rooms ORDER BY random() LIMIT 1)")
                .execute(&mut *conn)
                .await
        }
    };
    match result {
        Ok(done) => Ok(done.rows_affected() > 0),
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23503") => Ok(false),
        Err(_) => Err(()),
    }
}

/// Writers on every master, each reconnecting after its master died.
struct Load {
    workload: Workload,
    stop: Arc<AtomicBool>,
    progress: BTreeMap<String, Arc<AtomicUsize>>,
    writers: Vec<JoinHandle<(Vec<Written>, Vec<Uncertain>)>>,
}

impl Load {
    fn start(s: &Synced, seed: u64) -> Load {
        Load::start_with(s, seed, Workload::Kv)
    }

    fn start_with(s: &Synced, seed: u64, workload: Workload) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let mut progress = BTreeMap::new();
        let mut writers = Vec::new();
        for (i, (name, cluster)) in s.bed.masters.iter().enumerate() {
            let count = Arc::new(AtomicUsize::new(0));
            progress.insert(name.clone(), count.clone());
            let (url, name, stop) = (cluster.url(BED_DATABASE), name.clone(), stop.clone());
            writers.push(tokio::spawn(async move {
                let mut rng = Rng::new(seed.wrapping_add(i as u64 * 7919));
                let (mut written, mut uncertain) = (Vec::new(), Vec::new());
                let mut conn: Option<PgConnection> = None;
                // About 500 writes a second per master: load, not a CPU hog.
                let mut pace = tokio::time::interval(Duration::from_millis(2));
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    pace.tick().await;
                    let Some(c) = conn.as_mut() else {
                        conn = PgConnection::connect(&url).await.ok();
                        continue;
                    };
                    i += 1;
                    if workload == Workload::Chat {
                        match chat_once(c, &mut rng).await {
                            Ok(true) => {
                                count.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(false) => {}
                            Err(()) => conn = None,
                        }
                        continue;
                    }
                    match write_once(c, &name, i, &mut rng, KEYS).await {
                        Ok(w) => {
                            if !w.is_empty() {
                                count.fetch_add(1, Ordering::Relaxed);
                            }
                            written.extend(w);
                        }
                        Err(u) => {
                            uncertain.extend(u);
                            conn = None;
                        }
                    }
                }
                (written, uncertain)
            }));
        }
        Load { workload, stop, progress, writers }
    }

    /// Waits until each of `masters` acknowledged `more` further writes.
    async fn progress(&self, masters: &[&str], more: usize) {
        let from: Vec<usize> = masters.iter().map(|m| self.progress[*m].load(Ordering::Relaxed)).collect();
        wait_for(&format!("{more} more writes on {masters:?}"), DEADLINE, || async {
            masters.iter().zip(&from).all(|(m, f)| self.progress[*m].load(Ordering::Relaxed) >= f + more).then_some(())
        })
        .await;
    }

    /// Lets every master take 100 more writes, stops the load, measures how
    /// many keys differ between the masters and how many acknowledged writes
    /// were lost, prints those counts, and fails unless both are zero.
    async fn settle(self, s: &Synced, seed: u64, test: &str, f: Figures) {
        let masters: Vec<String> = self.progress.keys().cloned().collect();
        let masters: Vec<&str> = masters.iter().map(String::as_str).collect();
        self.progress(&masters, 100).await;
        let workload = self.workload;
        let counters: Vec<Arc<AtomicUsize>> = self.progress.values().cloned().collect();
        let (written, uncertain) = self.finish().await;
        // Every acknowledged write: the model's writes (a key change is two:
        // the old key's delete and the new key's row), or the chat's steps.
        let acknowledged: usize = match workload {
            Workload::Kv => written.len(),
            Workload::Chat => counters.iter().map(|c| c.load(Ordering::Relaxed)).sum(),
        };
        let divergent = divergent_keys(s).await;
        let violations = if divergent.0 == 0 && workload == Workload::Kv {
            model_violations(s, seed, &written, &uncertain).await
        } else {
            vec![]
        };
        let lost = violations.iter().filter(|v| v.starts_with("LOST")).count();
        let mut dead = Vec::new();
        for m in &masters {
            let mut conn = s.conn(m).await;
            let reasons: Vec<String> =
                sqlx::query_scalar("SELECT reason FROM mmsync.dead_letters").fetch_all(&mut conn).await.unwrap();
            dead.extend(reasons.into_iter().map(|r| format!("{m}: {r}")));
        }
        eprintln!(
            "{test}: seed {seed}: cycles {}, faults injected {}, writes acknowledged {}, writes unacknowledged {}, \
             lost {lost}, other model violations {}, divergent keys {}, dead letters {}",
            f.cycles,
            f.faults,
            acknowledged,
            uncertain.len(),
            violations.len() - lost,
            divergent.0,
            dead.len(),
        );
        assert_eq!(divergent.0, 0, "seed {seed}: masters still differ:\n{}\nmmsync log:\n{}", divergent.1, s.log());
        assert!(dead.is_empty(), "seed {seed}: dead letters: {dead:?}");
        assert!(violations.is_empty(), "seed {seed}: {}", violations.join("\n"));
        assert!(f.faults >= f.cycles, "every cycle injects a fault");
    }

    async fn finish(self) -> (Vec<Written>, Vec<Uncertain>) {
        self.stop.store(true, Ordering::Relaxed);
        let (mut written, mut uncertain) = (Vec::new(), Vec::new());
        for w in self.writers {
            let (a, b) = w.await.unwrap();
            written.extend(a);
            uncertain.extend(b);
        }
        (written, uncertain)
    }
}

/// What a chaos run did, counted as it happened.
#[derive(Debug, Default)]
struct Figures {
    cycles: usize,
    /// Processes killed with SIGKILL.
    faults: usize,
}

/// Waits (up to a deadline) for `mmsync verify` to find the masters
/// identical; returns how many keys still differ then (0 when they
/// converged) and verify's report.
async fn divergent_keys(s: &Synced) -> (usize, String) {
    let started = Instant::now();
    loop {
        let (code, out) = mmsync(&s.topology, &["verify"]).await;
        if code == 0 {
            return (0, out);
        }
        if started.elapsed() > DEADLINE * 2 {
            let differ = out
                .lines()
                .filter_map(|l| l.split_once("DIFFERENT, ")?.1.split_once(' ')?.0.parse::<usize>().ok())
                .sum::<usize>();
            return (differ.max(1), out);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Checks every key against the last-writer-wins model of the acknowledged
/// writes; returns one line per key that breaks it (`LOST …` for an
/// acknowledged write that is gone). A row newer than the model's winner must
/// be a write whose acknowledgement was lost to a fault.
async fn model_violations(s: &Synced, seed: u64, written: &[Written], uncertain: &[Uncertain]) -> Vec<String> {
    let mut violations = Vec::new();
    let mut model: BTreeMap<i32, &Written> = BTreeMap::new();
    for w in written {
        if model.get(&w.id).is_none_or(|m| (w.version, &w.origin) > (m.version, &m.origin)) {
            model.insert(w.id, w);
        }
    }
    // Rows as (id, val, whole value `val|n|md5(doc)`, version, origin).
    let actual: BTreeMap<i32, Vec<String>> = kv_state(s, "seoul")
        .await
        .into_iter()
        .map(|r| {
            let f: Vec<&str> = r.split('|').collect();
            (f[0].parse().unwrap(), vec![f[0].into(), f[1].into(), f[1..4].join("|"), f[4].into(), f[5].into()])
        })
        .collect();
    let maybe = |id: i32, val: Option<&str>| uncertain.iter().any(|u| u.id == id && u.val.as_deref() == val);
    for id in 0..KEYS as i32 {
        let row = actual.get(&id);
        let stamp = row.map(|f| (f[3].parse::<i64>().unwrap(), f[4].clone()));
        match (model.get(&id), row) {
            (None, None) => {}
            (Some(w), None) => {
                if w.value.is_some() && !maybe(id, None) {
                    violations.push(format!(
                        "LOST: seed {seed}: key {id} is gone everywhere, but its newest acknowledged write {w:?} is not a delete"
                    ));
                }
            }
            (m, Some(f)) => {
                let s = stamp.unwrap();
                match m {
                    Some(w) if (w.version, w.origin.clone()) == s => {
                        if w.value.as_ref() != Some(&f[2]) {
                            violations.push(format!("seed {seed}: key {id} holds {f:?} under the stamp of {w:?}"));
                        }
                    }
                    Some(w) if (w.version, w.origin.clone()) > s => violations.push(format!(
                        "LOST: seed {seed}: key {id} lost the acknowledged write {w:?}; the masters hold {f:?}"
                    )),
                    _ => {
                        if !maybe(id, Some(&f[1])) {
                            violations.push(format!(
                                "seed {seed}: key {id} holds {f:?}, newer than any acknowledged write ({m:?}) and no unacknowledged one either"
                            ));
                        }
                    }
                }
            }
        }
    }
    violations
}

#[tokio::test]
async fn a_master_killed_mid_load_catches_up_and_verify_sees_a_planted_difference() {
    let seed = seed("a_master_killed_mid_load");
    let mut s = Synced::new(&["seoul", "busan"], BedKafka::Shared, KV, &["public.kv"], "").await;
    s.start();
    let load = Load::start(&s, seed);
    let mut f = Figures::default();
    for _ in 0..cycles() {
        load.progress(&["seoul", "busan"], 100).await;
        s.bed.master_mut("seoul").kill().await;
        f.faults += 1;
        load.progress(&["busan"], 300).await; // busan keeps taking writes
        s.bed.master_mut("seoul").restart().await.unwrap();
        f.cycles += 1;
    }
    load.settle(&s, seed, "a_master_killed_mid_load", f).await;

    // A row changed by hand on busan with the triggers off: verify must say so.
    let mut busan = s.conn("busan").await;
    let (id, version): (i32, i64) =
        sqlx::query_as("SELECT id, mmsync_version FROM kv ORDER BY id LIMIT 1").fetch_one(&mut busan).await.unwrap();
    sqlx::raw_sql(&format!("SET session_replication_role = replica; UPDATE kv SET val = 'planted' WHERE id = {id}"))
        .execute(&mut busan)
        .await
        .unwrap();
    let (code, out) = mmsync(&s.topology, &["verify"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("public.kv: DIFFERENT, 1 key(s) differ"), "{out}");
    assert!(
        out.contains(&format!("{{\"id\": \"{id}\"}}")) && out.contains(&format!("busan: version {version}")),
        "{out}"
    );
    s.stop().await;
}

#[tokio::test]
async fn mmsync_killed_at_random_moments_loses_nothing() {
    let seed = seed("mmsync_killed");
    let mut rng = Rng::new(seed);
    let mut s = Synced::new(&["seoul", "busan"], BedKafka::Shared, KV, &["public.kv"], "").await;
    s.start();
    let load = Load::start(&s, seed);
    let mut f = Figures::default();
    for _ in 0..cycles() {
        load.progress(&["seoul", "busan"], 20 + rng.below(200) as usize).await;
        s.kill().await;
        f.faults += 1;
        load.progress(&["seoul", "busan"], 20 + rng.below(100) as usize).await;
        s.start();
        f.cycles += 1;
    }
    load.settle(&s, seed, "mmsync_killed", f).await;
    s.stop().await;
}

#[tokio::test]
async fn the_broker_killed_and_restarted_loses_nothing() {
    let seed = seed("broker_killed");
    let mut s = Synced::new(&["seoul", "busan"], BedKafka::own(), KV, &["public.kv"], "").await;
    s.start();
    let load = Load::start(&s, seed);
    let mut f = Figures::default();
    for _ in 0..cycles() {
        load.progress(&["seoul", "busan"], 150).await;
        s.bed.broker.kill().await;
        f.faults += 1;
        load.progress(&["seoul", "busan"], 150).await;
        s.bed.broker.restart().await.unwrap();
        f.cycles += 1;
    }
    load.settle(&s, seed, "broker_killed", f).await;
    s.stop().await;
}

/// Three brokers, replication factor 3, `min.insync.replicas = 2`: with one
/// broker down, changes keep flowing both ways (a marker row crosses while it
/// is down), and with `acks=all` nothing acknowledged is lost.
#[tokio::test]
async fn one_broker_of_three_killed_under_load_loses_nothing_and_changes_keep_flowing() {
    let seed = seed("one_broker_of_three_killed");
    let mut s = Synced::new(&["seoul", "busan"], BedKafka::three_nodes(), KV, &["public.kv"], "").await;
    s.start();
    let load = Load::start(&s, seed);
    let mut f = Figures::default();
    for cycle in 0..cycles() {
        load.progress(&["seoul", "busan"], 150).await;
        let victim = cycle % 3;
        s.bed.broker.kill_node(victim);
        f.faults += 1;
        // While it is down: both masters' changes still cross.
        for (from, to) in [("seoul", "busan"), ("busan", "seoul")] {
            let marker = 100_000 + (cycle as i32) * 2 + (from == "busan") as i32;
            let mut conn = s.conn(from).await;
            sqlx::query("INSERT INTO kv VALUES ($1, 'marker', 0)").bind(marker).execute(&mut conn).await.unwrap();
            let crossed = tokio::time::timeout(DEADLINE, async {
                loop {
                    if let Ok(mut conn) = s.bed.master(to).connect(BED_DATABASE).await {
                        let found = sqlx::query_scalar::<_, i32>("SELECT id FROM kv WHERE id = $1")
                            .bind(marker)
                            .fetch_optional(&mut conn)
                            .await;
                        if matches!(found, Ok(Some(_))) {
                            return;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await;
            assert!(
                crossed.is_ok(),
                "seed {seed}: marker {marker} from {from} never reached {to} with broker {} down; mmsync log:\n{}",
                victim + 1,
                s.log()
            );
        }
        load.progress(&["seoul", "busan"], 150).await;
        s.bed.broker.restart_node(victim).await.unwrap();
        f.cycles += 1;
    }
    load.settle(&s, seed, "one_broker_of_three_killed", f).await;
    s.stop().await;
}

#[tokio::test]
async fn randomized_faults_on_two_masters_converge() {
    randomized_faults(&["seoul", "busan"], "randomized_faults_two").await;
}

#[tokio::test]
async fn randomized_faults_on_three_masters_converge() {
    randomized_faults(&["seoul", "busan", "jeju"], "randomized_faults").await;
}

#[tokio::test]
async fn randomized_faults_on_five_masters_converge() {
    randomized_faults(&["seoul", "busan", "jeju", "incheon", "daegu"], "randomized_faults_five").await;
}

#[tokio::test]
async fn a_chat_schema_under_randomized_faults_converges_without_dead_letters() {
    randomized_faults_with(&["seoul", "busan", "jeju"], "randomized_faults_chat", Workload::Chat).await;
}

#[tokio::test]
async fn a_chat_schema_on_two_masters_under_randomized_faults_converges_without_dead_letters() {
    randomized_faults_with(&["seoul", "busan"], "randomized_faults_chat_two", Workload::Chat).await;
}

/// Kills, at random, one master, mmsync or the broker, while every master
/// takes conflicting writes of every kind (see [`write_once`]).
async fn randomized_faults(names: &[&str], test: &str) {
    randomized_faults_with(names, test, Workload::Kv).await;
}

async fn randomized_faults_with(names: &[&str], test: &str, workload: Workload) {
    let seed = seed(test);
    let mut rng = Rng::new(seed ^ 0x5eed);
    let mut s = match workload {
        Workload::Kv => Synced::new(names, BedKafka::own(), KV, &["public.kv"], "").await,
        Workload::Chat => Synced::new(names, BedKafka::own(), CHAT, &["public.rooms", "public.messages"], "").await,
    };
    s.start();
    let load = Load::start_with(&s, seed, workload);
    let mut f = Figures::default();
    for _ in 0..cycles() {
        load.progress(names, 30 + rng.below(100) as usize).await;
        match rng.below(3) {
            0 => {
                let victim = names[rng.below(names.len() as u64) as usize];
                let others: Vec<&str> = names.iter().copied().filter(|n| *n != victim).collect();
                s.bed.master_mut(victim).kill().await;
                f.faults += 1;
                load.progress(&others, 50 + rng.below(150) as usize).await;
                s.bed.master_mut(victim).restart().await.unwrap();
            }
            1 => {
                s.kill().await;
                f.faults += 1;
                load.progress(names, 20 + rng.below(100) as usize).await;
                s.start();
            }
            _ => {
                s.bed.broker.kill().await;
                f.faults += 1;
                load.progress(names, 20 + rng.below(100) as usize).await;
                s.bed.broker.restart().await.unwrap();
            }
        }
        f.cycles += 1;
    }
    load.settle(&s, seed, test, f).await;
    s.stop().await;
}

/// Rows of `kv` on the master `m` whose id is at least `from`.
async fn count_from(s: &Synced, m: &str, from: i32) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM kv WHERE id >= $1")
        .bind(from)
        .fetch_one(&mut s.conn(m).await)
        .await
        .unwrap_or(0)
}

#[tokio::test]
async fn a_join_killed_and_then_its_source_master_killed_mid_copy_goes_on_where_it_stopped_and_loses_nothing() {
    const BULK: i64 = 200_000;
    const FIRST: i32 = 100_000;
    let seed = seed("join_killed");
    let mut s = Synced::new(&["seoul", "busan"], BedKafka::Shared, KV, &["public.kv"], "").await;
    s.start();
    // Rows enough that the copy overlaps the writes and the faults, on ids
    // the load does not touch; with room in their pages, so that an update
    // stays in place (HOT), in a part of the table a join already copied.
    sqlx::raw_sql("ALTER TABLE kv SET (fillfactor = 70)").execute(&mut s.conn("seoul").await).await.unwrap();
    sqlx::query("INSERT INTO kv SELECT i, 'bulk', i FROM generate_series($1::int, $1::int + $2::int - 1) i")
        .bind(FIRST)
        .bind(BULK as i32)
        .execute(&mut s.conn("seoul").await)
        .await
        .unwrap();
    wait_for("the bulk rows on busan", DEADLINE * 2, || async {
        (count_from(&s, "busan", FIRST).await == BULK).then_some(())
    })
    .await;
    let load = Load::start(&s, seed);
    load.progress(&["seoul", "busan"], 100).await;
    // jeju joins from seoul while both keep taking writes (mmsync stopped, as join needs).
    s.kill().await;
    s.bed.add_master("jeju").await.unwrap();
    sqlx::raw_sql(KV).execute(&mut s.conn("jeju").await).await.unwrap();
    s.topology = s.bed.write_topology(&["public.kv"], "");
    let (code, out) = mmsync(&s.topology, &["init"]).await;
    assert_eq!(code, 0, "{out}");
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_mmsync"));
    let (dir, topology) = (s.bed.dir.path().to_path_buf(), s.topology.clone());
    let join = |run: usize| {
        let log = dir.join(format!("join-{run}.log"));
        let args = ["join", "--master", "jeju", "--from", "seoul", "--batch", "2000"];
        mmsync::testbed::MmsyncProcess::spawn(bin, &topology, &args, &[], log).unwrap()
    };
    let mut f = Figures { cycles: 1, faults: 0 };

    // The join is killed a fifth of the way.
    let first = join(1);
    wait_for("a fifth of the copy", DEADLINE, || async {
        (count_from(&s, "jeju", FIRST).await >= BULK / 5).then_some(())
    })
    .await;
    first.kill().await;
    f.faults += 1;
    // Rows the first run copied change in place before the next run: only
    // Kafka, read from the first run's positions, brings these to jeju.
    sqlx::query("UPDATE kv SET val = 'hot' WHERE id >= $1 AND id < $1 + 1000")
        .bind(FIRST)
        .execute(&mut s.conn("seoul").await)
        .await
        .unwrap();
    // Run again, it goes on; seoul dies half way through.
    let second = join(2);
    wait_for("half of the copy", DEADLINE, || async {
        (count_from(&s, "jeju", FIRST).await >= BULK / 2).then_some(())
    })
    .await;
    s.bed.master_mut("seoul").kill().await;
    f.faults += 1;
    let log = second.log();
    assert!(!second.wait().await.success(), "the join cannot go on without seoul: {log}");
    s.bed.master_mut("seoul").restart().await.unwrap();
    // Run a third time, it finishes from where the second one came.
    let third = join(3);
    let log = third.log_path();
    assert!(third.wait().await.success(), "{}", std::fs::read_to_string(&log).unwrap());
    let out = std::fs::read_to_string(&log).unwrap();
    let went_on: u64 = out
        .split("going on from row ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("the third join goes on where the second stopped: {out}"));
    assert!(went_on >= BULK as u64 / 2, "it went on from row {went_on}, not from the start: {out}");

    // The copy alone holds every bulk row (seoul's slot may send them again
    // once mmsync runs: a crash makes a slot forget how far it was confirmed
    // since its last checkpoint, which would hide rows the copy skipped).
    assert_eq!(count_from(&s, "jeju", FIRST).await, BULK, "the copy skipped rows: {out}");
    s.start();
    load.settle(&s, seed, "join_killed", f).await;
    for m in ["seoul", "busan", "jeju"] {
        let bulk: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM kv WHERE id >= $1 AND val = CASE WHEN id < $1 + 1000 THEN 'hot' ELSE 'bulk' END AND n = id",
        )
            .bind(FIRST)
            .fetch_one(&mut s.conn(m).await)
            .await
            .unwrap();
        assert_eq!(bulk, BULK, "{m} holds every bulk row as written");
    }
    assert_eq!(crate::common::dead_letter_reasons(&s, "jeju").await, Vec::<String>::new());
    s.stop().await;
}
