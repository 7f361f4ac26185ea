//! Last-writer-wins for one batch of one table, as a pure function: which
//! change of each key wins, and what it does to the target, given the
//! target's row and tombstone of that key. The sink validates the records,
//! reads (and locks) what the target holds of their keys, calls [`plan`], and
//! writes what the plan says; every rule of conflict resolution is here, and
//! tested without a database.
//!
//! The rules: a change is stamped (version, origin), compared as the SQL
//! `(version, origin COLLATE "C")`; the highest stamp of a key wins, in the
//! batch and against the target's row and tombstone. A delete's tombstone is
//! recorded (or raised) whether or not the delete wins, so a later, older
//! upsert still loses to it. Applying a change twice, or a batch in any
//! order, ends in the same state (the property tests below).

use std::collections::HashMap;

use crate::change::{Change, Op};

/// A version stamp with its tie-breaker.
pub type Stamp = (i64, String);

pub fn stamp(c: &Change) -> Stamp {
    (c.version, c.origin.clone())
}

/// What the target holds of a key.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Held {
    pub row: Option<Stamp>,
    pub tombstone: Option<Stamp>,
}

/// A change that lost to another master's newer write (logged to
/// `mmsync.conflicts`).
#[derive(Debug, Clone, PartialEq)]
pub struct Conflict {
    /// Index of the losing change in the batch.
    pub index: usize,
    /// `upsert_older_than_row`, `delete_older_than_tombstone`, ...
    pub kind: String,
    pub winner: Stamp,
}

/// What to write, by index into the batch.
#[derive(Debug, Default)]
pub struct Plan {
    /// Whole rows to upsert ([`Plan::whole`] gives each one's change).
    pub upserts: Vec<usize>,
    /// Winners whose columns an update left unchanged were filled in from the
    /// same master's previous change of the row in this batch: only these are
    /// copies, every other change is planned by reference.
    pub filled: HashMap<usize, Change>,
    /// Updates that set only the columns they carry, on a row the target has.
    pub partial: Vec<usize>,
    /// Deletes whose tombstone is recorded or raised; the row goes if older.
    pub deletes: Vec<usize>,
    /// Changes that take effect.
    pub applied: Vec<usize>,
    /// Changes that can never be applied as they stand, with the reason.
    pub dead: Vec<(usize, String)>,
    /// Changes the target already holds, or that a later change of the same
    /// master (or a newer delete) supersedes.
    pub skipped: u64,
    pub conflicts: Vec<Conflict>,
}

/// Plans a batch. `held` has what the target holds of each key of the
/// batch, by canonical key text ([`Change::kafka_key`]); a key it lacks is
/// neither a row nor a tombstone there.
pub fn plan(changes: &[&Change], held: &HashMap<String, Held>) -> Plan {
    let mut plan = Plan::default();
    // One change per key: the highest stamp. What it beats within the batch
    // is superseded (same origin) or a conflict it won (another origin).
    let mut winners: HashMap<String, usize> = HashMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut losers: Vec<(usize, Stamp)> = Vec::new();
    // Winners whose unchanged (TOASTed) columns were filled in from the
    // change of the same master they directly follow in this batch.
    let mut filled: HashMap<usize, Change> = HashMap::new();
    for (i, change) in changes.iter().enumerate() {
        match winners.entry(change.kafka_key()) {
            std::collections::hash_map::Entry::Occupied(mut w) => {
                let older = *w.get();
                let (ws, s) = (stamp(changes[older]), stamp(change));
                if ws >= s {
                    losers.push((i, ws));
                    continue;
                }
                w.insert(i);
                losers.push((older, s));
                let base = filled.get(&older).unwrap_or(changes[older]);
                if let Some(whole) = fill_unchanged(change, base) {
                    filled.insert(i, whole);
                }
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                order.push(v.key().clone());
                v.insert(i);
            }
        }
    }
    let nothing = Held::default();
    for key in order {
        let i = winners[&key];
        let change = filled.get(&i).unwrap_or(changes[i]);
        let s = stamp(change);
        let held = held.get(&key).unwrap_or(&nothing);
        if change.op == Op::Delete {
            // The tombstone is recorded or raised whether or not the delete wins.
            // It takes effect if it removes a row, or raises the tombstone
            // where there is none; one that finds the key already deleted
            // by itself (a replay) or by a newer delete is not applied again.
            plan.deletes.push(i);
            match (&held.row, &held.tombstone) {
                (Some(r), _) if *r >= s => losers.push((i, r.clone())),
                (None, Some(t)) if *t >= s => losers.push((i, t.clone())),
                _ => plan.applied.push(i),
            }
            continue;
        }
        match [held.row.as_ref(), held.tombstone.as_ref()].into_iter().flatten().max() {
            Some(newest) if *newest >= s => losers.push((i, newest.clone())),
            _ if change.unchanged.is_empty() => {
                plan.upserts.push(i);
                plan.applied.push(i);
            }
            // Its source had the row deleted by a newer change before it
            // could read the unchanged values back: that newer delete
            // reaches this master too, and beats this change.
            _ if held.row.is_none() && change.superseded => plan.skipped += 1,
            _ if held.row.is_none() => plan.dead.push((
                i,
                "an update that left TOASTed columns unchanged reached a row this master does not have, and the record does not carry their values (it was produced before sources read such values back); write the row again on its origin".into(),
            )),
            _ => {
                plan.partial.push(i);
                plan.applied.push(i);
            }
        }
    }
    for (i, winner) in losers {
        let change = changes[i];
        if winner == stamp(change) || winner.1 == change.origin {
            plan.skipped += 1; // already applied, or superseded by a later write of the same master
            continue;
        }
        let against = if held.get(&change.kafka_key()).and_then(|h| h.tombstone.as_ref()) == Some(&winner) {
            "tombstone"
        } else {
            "row"
        };
        let kind = format!("{}_older_than_{against}", if change.op == Op::Delete { "delete" } else { "upsert" });
        plan.conflicts.push(Conflict { index: i, kind, winner });
    }
    plan.filled = filled;
    plan
}

impl Plan {
    /// The change that upsert `i` writes: filled in, or as it came.
    pub fn whole<'a>(&'a self, i: usize, changes: &[&'a Change]) -> &'a Change {
        self.filled.get(&i).unwrap_or(changes[i])
    }
}

/// `newer` with its unchanged columns taken from `older`, when `older` is the
/// same master's previous version of the row and carries them.
fn fill_unchanged(newer: &Change, older: &Change) -> Option<Change> {
    if newer.unchanged.is_empty() || newer.origin != older.origin {
        return None;
    }
    let old_row = older.row.as_ref()?;
    let mut whole = newer.clone();
    let row = whole.row.as_mut()?;
    whole.unchanged.retain(|c| match old_row.get(c) {
        Some(v) => {
            row.insert(c.clone(), v.clone());
            false
        }
        None => true,
    });
    Some(whole)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::change::{Key, Position, Row};
    use crate::topology::TableName;

    fn change(id: &str, op: Op, version: i64, origin: &str) -> Change {
        let key: Key = [("id".to_string(), id.to_string())].into();
        Change {
            table: TableName { schema: "public".into(), name: "t".into() },
            op,
            row: (op != Op::Delete).then(|| {
                Row::from([
                    ("id".to_string(), Some(id.to_string())),
                    ("v".to_string(), Some(format!("{origin}{version}"))),
                ])
            }),
            key,
            unchanged: vec![],
            superseded: false,
            origin: origin.into(),
            version,
            position: Position { master: origin.into(), at: crate::change::LogPosition::Copied, commit_ms: 0 },
        }
    }

    fn held(row: Option<(i64, &str)>, tombstone: Option<(i64, &str)>) -> Held {
        Held { row: row.map(|(v, o)| (v, o.to_string())), tombstone: tombstone.map(|(v, o)| (v, o.to_string())) }
    }

    fn key(id: &str) -> String {
        format!("{{\"id\":\"{id}\"}}")
    }

    #[test]
    fn the_highest_stamp_wins_and_ties_go_to_the_greater_origin() {
        let a = change("1", Op::Update, 5, "seoul");
        let b = change("1", Op::Update, 5, "busan");
        let c = change("1", Op::Update, 4, "jeju");
        let p = plan(&[&a, &b, &c], &HashMap::new());
        assert_eq!(p.upserts.len(), 1);
        assert_eq!(p.whole(p.upserts[0], &[&a, &b, &c]).origin, "seoul");
        let kinds: Vec<&str> = p.conflicts.iter().map(|c| c.kind.as_str()).collect();
        assert_eq!(kinds, ["upsert_older_than_row", "upsert_older_than_row"]);
    }

    #[test]
    fn an_upsert_older_than_the_tombstone_loses_to_it() {
        let a = change("1", Op::Insert, 5, "seoul");
        let p = plan(&[&a], &HashMap::from([(key("1"), held(None, Some((6, "busan"))))]));
        assert!(p.upserts.is_empty() && p.applied.is_empty());
        assert_eq!(p.conflicts[0].kind, "upsert_older_than_tombstone");
    }

    #[test]
    fn a_delete_records_its_tombstone_even_when_it_loses() {
        let d = change("1", Op::Delete, 5, "seoul");
        let p = plan(&[&d], &HashMap::from([(key("1"), held(Some((6, "busan")), None))]));
        assert_eq!(p.deletes, [0]);
        assert!(p.applied.is_empty());
        assert_eq!(p.conflicts[0].kind, "delete_older_than_row");
    }

    #[test]
    fn a_change_already_held_is_skipped_not_a_conflict() {
        let a = change("1", Op::Update, 5, "seoul");
        let p = plan(&[&a], &HashMap::from([(key("1"), held(Some((5, "seoul")), None))]));
        assert_eq!((p.skipped, p.conflicts.len(), p.applied.len()), (1, 0, 0));
    }

    #[test]
    fn a_partial_update_fills_from_the_same_masters_previous_change_in_the_batch() {
        let insert = change("1", Op::Insert, 5, "seoul");
        let mut update = change("1", Op::Update, 6, "seoul");
        update.row.as_mut().unwrap().remove("v");
        update.unchanged = vec!["v".into()];
        let p = plan(&[&insert, &update], &HashMap::new());
        assert_eq!(p.upserts.len(), 1);
        assert_eq!(p.whole(p.upserts[0], &[&insert, &update]).row.as_ref().unwrap()["v"], Some("seoul5".into()));
        assert_eq!(p.skipped, 1);
    }

    #[test]
    fn a_partial_update_of_a_missing_row_is_skipped_if_superseded_and_dead_if_not() {
        let mut update = change("1", Op::Update, 6, "seoul");
        update.unchanged = vec!["doc".into()];
        update.superseded = true;
        let p = plan(&[&update], &HashMap::new());
        assert_eq!((p.skipped, p.dead.len()), (1, 0));
        update.superseded = false;
        let p = plan(&[&update], &HashMap::new());
        assert_eq!(p.dead.len(), 1);
        let p = plan(&[&update], &HashMap::from([(key("1"), held(Some((5, "busan")), None))]));
        assert_eq!((p.partial.as_slice(), p.applied.as_slice()), ([0].as_slice(), [0].as_slice()));
    }

    /// A target as the model sees it: per key, the row (stamp) and tombstone.
    type State = BTreeMap<String, Held>;

    /// Applies a plan to a model state the way the sink's SQL does: upserts
    /// and partial updates only over an older row, deletes only of an older
    /// row, tombstones only raised.
    fn apply(state: &mut State, changes: &[&Change], p: &Plan) {
        let newer = |a: &Option<Stamp>, s: &Stamp| a.as_ref().is_none_or(|a| a < s);
        for c in p.upserts.iter().map(|&i| p.whole(i, changes)) {
            let h = state.entry(c.kafka_key()).or_default();
            if newer(&h.row, &stamp(c)) {
                h.row = Some(stamp(c));
            }
        }
        for &i in &p.partial {
            let h = state.entry(changes[i].kafka_key()).or_default();
            if h.row.is_some() && newer(&h.row, &stamp(changes[i])) {
                h.row = Some(stamp(changes[i]));
            }
        }
        for &i in &p.deletes {
            let s = stamp(changes[i]);
            let h = state.entry(changes[i].kafka_key()).or_default();
            if h.row.as_ref().is_some_and(|r| *r < s) {
                h.row = None;
            }
            if newer(&h.tombstone, &s) {
                h.tombstone = Some(s);
            }
        }
    }

    fn held_map(state: &State) -> HashMap<String, Held> {
        state.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Per key, the newest stamp of all, and whether it is a row.
    fn outcome(state: &State) -> BTreeMap<String, Option<Stamp>> {
        state.iter().map(|(k, h)| (k.clone(), h.row.clone())).collect()
    }

    fn arb_change() -> impl Strategy<Value = Change> {
        let version = prop_oneof![0i64..6, Just(i64::MIN), Just(i64::MAX), Just(-1i64)];
        let origin = prop_oneof![Just("busan"), Just("seoul"), Just(""), Just("Seoul"), Just("\u{1F600}")];
        let op = prop_oneof![Just(Op::Insert), Just(Op::Update), Just(Op::Delete)];
        let id = prop_oneof![Just("1"), Just("2"), Just("01"), Just(""), Just("\"")];
        (id, op, version, origin).prop_map(|(id, op, version, origin)| change(id, op, version, origin))
    }

    /// A target as a real one can be: a row is newer than its key's
    /// tombstone (a delete that lost leaves an older tombstone; nothing
    /// writes a row older than one). Its stamps come from masters the
    /// batches do not, as a master never stamps two writes of a key alike.
    fn arb_state() -> impl Strategy<Value = State> {
        let stamp = proptest::option::of((0i64..6, prop_oneof![Just("jeju".to_string()), Just("daegu".to_string())]));
        proptest::collection::btree_map(
            prop_oneof![Just(key("1")), Just(key("2")), Just(key("01"))],
            (stamp.clone(), stamp).prop_map(|(row, tombstone)| {
                let row = row.filter(|r| tombstone.as_ref().is_none_or(|t| r > t));
                Held { row, tombstone }
            }),
            0..3,
        )
    }

    /// A batch in which no two changes of a key share a stamp (a master
    /// stamps each write of a key higher than the last).
    fn arb_batch() -> impl Strategy<Value = Vec<Change>> {
        proptest::collection::vec(arb_change(), 0..12).prop_map(|batch| {
            let mut seen = std::collections::HashSet::new();
            batch.into_iter().filter(|c| seen.insert((c.kafka_key(), stamp(c)))).collect()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// Any batch over any target state, however adversarial its keys,
        /// versions and origins: a plan in any order of the batch ends the
        /// same, equals the batch applied one change at a time, and applying
        /// it again changes nothing.
        #[test]
        fn a_batch_ends_alike_in_any_order_once_or_twice(
            batch in arb_batch(),
            state in arb_state(),
            seed in any::<u64>(),
        ) {
            let refs: Vec<&Change> = batch.iter().collect();
            let mut whole = state.clone();
            let p = plan(&refs, &held_map(&whole));
            apply(&mut whole, &refs, &p);

            let mut shuffled = refs.clone();
            let mut s = seed.max(1);
            for i in (1..shuffled.len()).rev() {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                shuffled.swap(i, (s % (i as u64 + 1)) as usize);
            }
            let mut other = state.clone();
            let p2 = plan(&shuffled, &held_map(&other));
            apply(&mut other, &shuffled, &p2);
            prop_assert_eq!(outcome(&whole), outcome(&other));

            let mut one_by_one = state.clone();
            for c in &refs {
                let p = plan(std::slice::from_ref(c), &held_map(&one_by_one));
                apply(&mut one_by_one, std::slice::from_ref(c), &p);
            }
            prop_assert_eq!(outcome(&whole), outcome(&one_by_one));

            let again = plan(&refs, &held_map(&whole));
            prop_assert!(again.applied.is_empty(), "{:?}", again);
            let mut twice = whole.clone();
            apply(&mut twice, &refs, &again);
            prop_assert_eq!(outcome(&whole), outcome(&twice));
        }

        /// Every row left is the highest stamp of its key among the target's
        /// row and tombstone and the batch, and a key whose highest stamp is
        /// a delete or a tombstone has no row.
        #[test]
        fn what_is_left_is_the_newest_write_of_each_key(
            batch in arb_batch(),
            state in arb_state(),
        ) {
            let refs: Vec<&Change> = batch.iter().collect();
            let mut after = state.clone();
            let p = plan(&refs, &held_map(&after));
            apply(&mut after, &refs, &p);
            let mut newest: BTreeMap<String, (Stamp, bool)> = BTreeMap::new();
            let mut see = |k: String, s: Stamp, is_row: bool| {
                let e = newest.entry(k).or_insert((s.clone(), is_row));
                if s > e.0 || (s == e.0 && !is_row) {
                    *e = (s, is_row);
                }
            };
            for (k, h) in &state {
                if let Some(r) = &h.row { see(k.clone(), r.clone(), true); }
                if let Some(t) = &h.tombstone { see(k.clone(), t.clone(), false); }
            }
            for c in &batch {
                see(c.kafka_key(), stamp(c), c.op != Op::Delete);
            }
            for (k, (s, is_row)) in newest {
                let row = after.get(&k).and_then(|h| h.row.clone());
                if is_row {
                    prop_assert_eq!(row, Some(s), "key {}", k);
                } else {
                    prop_assert_eq!(row, None, "key {}", k);
                }
            }
        }
    }
}
