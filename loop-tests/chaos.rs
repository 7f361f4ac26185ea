//! Chaos: kill a master, the broker or mmsync itself while every master takes
//! conflicting writes. Afterwards `mmsync verify` finds the masters identical
//! and every acknowledged write is there, or lost last-writer-wins to a newer
//! one. CI runs a few fault cycles; `MMSYNC_CHAOS_CYCLES=50` runs the long version.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mmsync::testbed::{wait_for, BrokerStorage, BED_DATABASE};
use sqlx::{Connection, PgConnection};
use tokio::task::JoinHandle;

use crate::common::{kv_state, mmsync, seed, write_once, Rng, Synced, Uncertain, Written, DEADLINE, KV};

/// Keys the writers fight over.
const KEYS: u64 = 300;

fn cycles() -> usize {
    std::env::var("MMSYNC_CHAOS_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(3)
}

/// Writers on every master, each reconnecting after its master died.
struct Load {
    stop: Arc<AtomicBool>,
    progress: BTreeMap<String, Arc<AtomicUsize>>,
    writers: Vec<JoinHandle<(Vec<Written>, Vec<Uncertain>)>>,
}

impl Load {
    fn start(s: &Synced, seed: u64) -> Load {
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
                    match write_once(c, &name, i, &mut rng, KEYS).await {
                        Ok(Some(w)) => {
                            written.push(w);
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(None) => {}
                        Err(u) => {
                            uncertain.push(u);
                            conn = None;
                        }
                    }
                }
                (written, uncertain)
            }));
        }
        Load { stop, progress, writers }
    }

    /// Waits until each of `masters` acknowledged `more` further writes.
    async fn progress(&self, masters: &[&str], more: usize) {
        let from: Vec<usize> = masters.iter().map(|m| self.progress[*m].load(Ordering::Relaxed)).collect();
        wait_for(&format!("{more} more writes on {masters:?}"), DEADLINE, || async {
            masters.iter().zip(&from).all(|(m, f)| self.progress[*m].load(Ordering::Relaxed) >= f + more).then_some(())
        })
        .await;
    }

    /// Lets every master take 100 more writes, stops the load, and checks
    /// that the masters converged with nothing lost; prints the figures.
    async fn settle(self, s: &Synced, seed: u64, test: &str, f: Figures) {
        let masters: Vec<String> = self.progress.keys().cloned().collect();
        let masters: Vec<&str> = masters.iter().map(String::as_str).collect();
        self.progress(&masters, 100).await;
        let (written, uncertain) = self.finish().await;
        converged_without_loss(s, seed, &written, &uncertain).await;
        eprintln!(
            "{test}: seed {seed}: cycles {}, faults {}, writes acknowledged {}, writes unacknowledged {}, lost 0, divergent 0",
            f.cycles,
            f.cycles,
            written.len(),
            uncertain.len()
        );
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

/// What a chaos run did, for the report (one fault per cycle).
#[derive(Debug, Default)]
struct Figures {
    cycles: usize,
}

/// Waits for `mmsync verify` to pass, then checks every key against the
/// last-writer-wins model of the acknowledged writes. A row newer than the
/// model's winner must be a write whose acknowledgement was lost to a fault.
async fn converged_without_loss(s: &Synced, seed: u64, written: &[Written], uncertain: &[Uncertain]) {
    let started = Instant::now();
    loop {
        let (code, out) = mmsync(&s.topology, &["verify"]).await;
        if code == 0 {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE * 2,
            "seed {seed}: masters still differ:\n{out}\nmmsync log:\n{}",
            s.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut model: BTreeMap<i32, &Written> = BTreeMap::new();
    for w in written {
        if model.get(&w.id).is_none_or(|m| (w.version, &w.origin) > (m.version, &m.origin)) {
            model.insert(w.id, w);
        }
    }
    let actual: BTreeMap<i32, Vec<String>> = kv_state(s, "seoul")
        .await
        .into_iter()
        .map(|r| {
            let f: Vec<String> = r.split('|').map(str::to_string).collect();
            (f[0].parse().unwrap(), f)
        })
        .collect();
    let maybe = |id: i32, val: Option<&str>| uncertain.iter().any(|u| u.id == id && u.val.as_deref() == val);
    for id in 0..KEYS as i32 {
        let row = actual.get(&id);
        let stamp = row.map(|f| (f[3].parse::<i64>().unwrap(), f[4].clone()));
        match (model.get(&id), row) {
            (None, None) => {}
            (Some(w), None) => assert!(
                w.value.is_none() || maybe(id, None),
                "seed {seed}: key {id} is gone everywhere, but its newest acknowledged write {w:?} is not a delete"
            ),
            (m, Some(f)) => {
                let s = stamp.unwrap();
                match m {
                    Some(w) if (w.version, w.origin.clone()) == s => assert_eq!(
                        w.value.as_ref().map(|(v, n)| (v.clone(), n.to_string())),
                        Some((f[1].clone(), f[2].clone())),
                        "seed {seed}: key {id}"
                    ),
                    Some(w) if (w.version, w.origin.clone()) > s => {
                        panic!("seed {seed}: key {id} LOST the acknowledged write {w:?}; the masters hold {f:?}")
                    }
                    _ => assert!(
                        maybe(id, Some(&f[1])),
                        "seed {seed}: key {id} holds {f:?}, newer than any acknowledged write ({m:?}) and no unacknowledged one either"
                    ),
                }
            }
        }
    }
}

#[tokio::test]
async fn a_master_killed_mid_load_catches_up_and_verify_sees_a_planted_difference() {
    let seed = seed("a_master_killed_mid_load");
    let mut s = Synced::new(&["seoul", "busan"], BrokerStorage::Memory, KV, &["public.kv"], "").await;
    s.start();
    let load = Load::start(&s, seed);
    let mut f = Figures::default();
    for _ in 0..cycles() {
        load.progress(&["seoul", "busan"], 100).await;
        s.bed.master_mut("seoul").kill().await;
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
    let mut s = Synced::new(&["seoul", "busan"], BrokerStorage::Memory, KV, &["public.kv"], "").await;
    s.start();
    let load = Load::start(&s, seed);
    let mut f = Figures::default();
    for _ in 0..cycles() {
        load.progress(&["seoul", "busan"], 20 + rng.below(200) as usize).await;
        s.kill().await;
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
    let mut s = Synced::new(&["seoul", "busan"], BrokerStorage::Sqlite, KV, &["public.kv"], "").await;
    s.start();
    let load = Load::start(&s, seed);
    let mut f = Figures::default();
    for _ in 0..cycles() {
        load.progress(&["seoul", "busan"], 150).await;
        s.bed.broker.kill().await;
        load.progress(&["seoul", "busan"], 150).await;
        s.bed.broker.restart().await.unwrap();
        f.cycles += 1;
    }
    load.settle(&s, seed, "broker_killed", f).await;
    s.stop().await;
}

#[tokio::test]
async fn randomized_faults_on_three_masters_converge() {
    let seed = seed("randomized_faults");
    let mut rng = Rng::new(seed ^ 0x5eed);
    let names = ["seoul", "busan", "jeju"];
    let mut s = Synced::new(&names, BrokerStorage::Sqlite, KV, &["public.kv"], "").await;
    s.start();
    let load = Load::start(&s, seed);
    let mut f = Figures::default();
    for _ in 0..cycles() {
        load.progress(&names, 30 + rng.below(100) as usize).await;
        match rng.below(3) {
            0 => {
                let victim = names[rng.below(3) as usize];
                let others: Vec<&str> = names.iter().copied().filter(|n| *n != victim).collect();
                s.bed.master_mut(victim).kill().await;
                load.progress(&others, 50 + rng.below(150) as usize).await;
                s.bed.master_mut(victim).restart().await.unwrap();
            }
            1 => {
                s.kill().await;
                load.progress(&names, 20 + rng.below(100) as usize).await;
                s.start();
            }
            _ => {
                s.bed.broker.kill().await;
                load.progress(&names, 20 + rng.below(100) as usize).await;
                s.bed.broker.restart().await.unwrap();
            }
        }
        f.cycles += 1;
    }
    load.settle(&s, seed, "randomized_faults", f).await;
    s.stop().await;
}
