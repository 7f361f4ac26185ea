//! `mmsync remove`: a master leaves the mesh, and nothing of it is left
//! behind on the others.
//!
//! What it wrote must have reached the others first, or it is lost with it:
//! remove refuses while its slot holds a change of its own that mmsync has
//! not sent (read with mmsync's own decoder from a peek at the slot, which
//! moves nothing), or while another master has not applied all of its
//! tables' topics (its heartbeats' topic aside: a beat carries no row).
//! Then it drops the master's slot and publication (a slot nobody
//! reads keeps WAL forever), forgets its heartbeat on the other masters
//! (retention and `status` wait only for masters the topology names), and
//! deletes its topics, and the offsets in them, if asked: kept, a master
//! added again under that name goes on from them instead of replaying its
//! history. The master's synced tables are locked against writes from the
//! check to the slot's drop, so that no write lands in between and is lost
//! with the slot (its applications should have stopped; a write that comes
//! anyway waits, then stays local to it). Its database keeps its rows,
//! columns and triggers, and goes on alone.
//!
//! The master is named in the topology while it is removed (its address and
//! topics come from there); afterwards its `[[masters]]` entry is deleted and
//! `mmsync init` re-interleaves the others' sequences. They are safe without
//! that too: a residue nobody uses collides with nothing.

use std::collections::HashMap;

use futures_util::TryStreamExt as _;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;

use sqlx::PgConnection;

use crate::error::{Error, Result};
use crate::postgres::schema::{slot_name, PUBLICATION};
use crate::topology::Topology;

/// What `remove` did.
#[derive(Debug, Default)]
pub struct Removed {
    pub lines: Vec<String>,
}

/// Removes master `gone` from the mesh. `force` removes it even though
/// changes of it have not reached the others (they are lost), and even if
/// it does not answer (then its slot stays on it). `delete_topics` deletes
/// its topics from Kafka; otherwise they are kept.
pub async fn remove(topology: &Topology, gone: &str, force: bool, delete_topics: bool) -> Result<Removed> {
    let master = topology.master(gone).ok_or_else(|| Error::Setup {
        master: gone.to_string(),
        problem: format!("{gone:?} is not a master of the topology"),
        fix: "remove a master while topology.toml still names it (its address and topics come from there), then \
              delete its [[masters]] entry"
            .into(),
    })?;
    if topology.masters.len() < 2 {
        return Err(Error::Setup {
            master: gone.to_string(),
            problem: "it is the only master".into(),
            fix: "there is no mesh to leave".into(),
        });
    }
    let mut removed = Removed::default();
    // Nothing may run meanwhile: take every run lock (the gone master's only if it answers).
    let mut locks = Vec::new();
    let mut reachable = true;
    for m in &topology.masters {
        match crate::fence::acquire_as(m, "remove").await {
            Ok(lock) => locks.push(lock),
            Err(e) if m.name == gone && e.class() == crate::error::Class::Retry && force => {
                tracing::warn!("{e}; removing it anyway (--force): its slot stays on it");
                reachable = false;
            }
            Err(e) => return Err(e),
        }
    }

    // Its own changes mmsync has not sent yet. Its synced tables stay
    // locked against writes from this check to the slot's drop, so that no
    // write lands in between and is lost with the slot.
    let mut held: Option<PgConnection> = None;
    if reachable {
        let mut conn = crate::postgres::db::connect(master).await?;
        let db = |what: &str| Error::db(gone, what.to_string());
        sqlx::raw_sql("BEGIN; SET LOCAL lock_timeout = '30s'").execute(&mut conn).await.map_err(db("beginning"))?;
        for table in &topology.tables {
            let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
                .bind(table.quoted())
                .fetch_one(&mut conn)
                .await
                .map_err(db("looking up a synced table"))?;
            if exists {
                sqlx::raw_sql(&format!("LOCK TABLE {} IN SHARE MODE", table.quoted()))
                    .execute(&mut conn)
                    .await
                    .map_err(db(&format!("locking {table} against writes (its applications must stop)")))?;
            }
        }
        let unsent = unsent_changes(&mut conn, topology, master).await?;
        if unsent > 0 && !force {
            return Err(Error::Setup {
                master: gone.to_string(),
                problem: format!("its slot holds {unsent} change(s) of its own that mmsync has not sent yet"),
                fix: "run `mmsync run` until they reach the other masters (`mmsync status`: PENDING 0 on its links), \
                      then remove it again; --force drops them"
                    .into(),
            });
        }
        held = Some(conn);
    }
    // Its records the others have not applied yet.
    let topics: Vec<String> =
        crate::kafka::all_topics(topology).into_iter().filter(|(m, _, _)| m == gone).map(|(_, _, t)| t).collect();
    let ends = crate::kafka::topic_ends(&topology.kafka, topics.clone()).await?;
    let beats_topic =
        crate::kafka::topic_name(&topology.kafka.topic_prefix, gone, &crate::topology::TableName::heartbeats());
    // Every other master is checked before any is changed: a refusal, or a
    // master that does not answer, leaves everything as it was.
    let mut others = Vec::new();
    for other in topology.masters.iter().filter(|m| m.name != gone) {
        let mut conn = crate::postgres::db::connect(other).await?;
        let applied: HashMap<(String, i32), i64> = sqlx::query_as::<_, (String, i32, i64)>(
            "SELECT topic, partition, next_offset FROM mmsync.applied_offsets WHERE topic = ANY($1)",
        )
        .bind(&topics)
        .fetch_all(&mut conn)
        .await
        .map_err(Error::db(&other.name, "reading applied offsets"))?
        .into_iter()
        .map(|(t, p, o)| ((t, p), o))
        .collect();
        // Heartbeats are not counted: they carry no row, the removal forgets
        // them anyway, and a stop of `mmsync run` can always leave the last
        // one unapplied (a refusal for it would never go away).
        let pending: i64 = ends
            .iter()
            .filter(|(t, _, _)| *t != beats_topic)
            .map(|(t, p, end)| (end - applied.get(&(t.clone(), *p)).copied().unwrap_or(0)).max(0))
            .sum();
        if pending > 0 && !force {
            return Err(Error::Setup {
                master: other.name.clone(),
                problem: format!("{pending} record(s) of {gone} in Kafka are not applied here yet"),
                fix: format!(
                    "run `mmsync run` until `mmsync status` shows PENDING 0 on the link {gone} -> {}, then remove \
                     {gone} again; --force drops them",
                    other.name
                ),
            });
        }
        others.push((other, conn));
    }
    for (other, conn) in &mut others {
        // In one transaction, as the applier, so that the heartbeat's delete
        // is neither stamped nor sent.
        let mut tx = sqlx::Connection::begin(conn).await.map_err(Error::db(&other.name, "beginning"))?;
        sqlx::query(crate::postgres::apply::APPLIER_SESSION)
            .execute(&mut *tx)
            .await
            .map_err(Error::db(&other.name, "marking the applier session"))?;
        // Offsets in kept topics are kept: a master added again under this
        // name goes on from them instead of replaying its old history
        // (nothing else reads offsets of a master the topology does not name).
        let forgotten = if delete_topics {
            sqlx::query("DELETE FROM mmsync.applied_offsets WHERE topic = ANY($1)")
                .bind(&topics)
                .execute(&mut *tx)
                .await
                .map_err(Error::db(&other.name, "forgetting the offsets of the removed master's topics"))?
                .rows_affected()
        } else {
            0
        };
        sqlx::query("DELETE FROM mmsync.heartbeats WHERE master = $1")
            .bind(gone)
            .execute(&mut *tx)
            .await
            .map_err(Error::db(&other.name, "forgetting the removed master's heartbeat"))?;
        tx.commit().await.map_err(Error::db(&other.name, "committing"))?;
        removed.lines.push(format!(
            "master {:?}: forgot {forgotten} offset(s) of {gone}'s topics and its heartbeat",
            other.name
        ));
    }

    if let Some(mut conn) = held {
        let slot = slot_name(gone);
        let dropped: Option<bool> = sqlx::query_scalar(
            "SELECT pg_drop_replication_slot(slot_name) IS NULL FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(&slot)
        .fetch_optional(&mut conn)
        .await
        .map_err(Error::db(gone, format!("dropping replication slot {slot}")))?;
        if dropped.is_some() {
            removed.lines.push(format!("master {gone:?}: dropped replication slot {slot}"));
        }
        sqlx::raw_sql(&format!("DROP PUBLICATION IF EXISTS {PUBLICATION}; COMMIT"))
            .execute(&mut conn)
            .await
            .map_err(Error::db(gone, "dropping the publication"))?;
        removed.lines.push(format!("master {gone:?}: dropped publication {PUBLICATION}; its rows stay"));
    } else {
        removed.lines.push(format!(
            "master {gone:?} did not answer: if it comes back, drop its slot there: SELECT pg_drop_replication_slot('{}')",
            slot_name(gone)
        ));
    }

    if delete_topics {
        let admin: AdminClient<DefaultClientContext> =
            crate::kafka::client_config(&topology.kafka).create().map_err(Error::kafka("creating the admin client"))?;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        let opts = AdminOptions::new().request_timeout(Some(crate::kafka::REQUEST_TIMEOUT));
        for r in admin.delete_topics(&names, &opts).await.map_err(Error::kafka("deleting topics"))? {
            match r {
                Ok(topic) => removed.lines.push(format!("kafka: deleted topic {topic}")),
                Err((topic, rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition)) => {
                    removed.lines.push(format!("kafka: topic {topic} was already gone"))
                }
                Err((topic, code)) => {
                    return Err(Error::kafka(format!("deleting topic {topic}"))(rdkafka::error::KafkaError::AdminOp(
                        code,
                    )))
                }
            }
        }
    } else {
        removed.lines.push(format!("kafka: kept {} topic(s) of {gone} (--delete-topics deletes them)", topics.len()));
    }
    drop(locks);
    Ok(removed)
}

/// How many changes of `master`'s own its slot holds that mmsync has not
/// sent: the slot's pending WAL, peeked (nothing moves) and decoded as the
/// source decodes it, heartbeats left out.
async fn unsent_changes(conn: &mut PgConnection, topology: &Topology, master: &crate::topology::Master) -> Result<u64> {
    let slot = slot_name(&master.name);
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)")
        .bind(&slot)
        .fetch_one(&mut *conn)
        .await
        .map_err(Error::db(&master.name, "looking up its slot"))?;
    if !exists {
        return Ok(0);
    }
    let mut decoder = crate::postgres::capture::Decoder::new(&master.name, topology);
    let mut round = crate::postgres::capture::Decoded::default();
    let mut rows = sqlx::query_scalar::<_, Vec<u8>>(
        "SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL, 'proto_version', '1', 'publication_names', $2)",
    )
    .bind(&slot)
    .bind(PUBLICATION)
    .fetch(&mut *conn);
    let mut unsent = 0u64;
    while let Some(data) = rows.try_next().await.map_err(Error::db(&master.name, format!("peeking at slot {slot}")))? {
        let message = crate::postgres::pgoutput::parse(&data).map_err(|e| Error::Stream {
            master: master.name.clone(),
            lsn: "its slot's pending WAL".into(),
            reason: e.to_string(),
        })?;
        decoder.message(message, &mut round).map_err(|reason| Error::Stream {
            master: master.name.clone(),
            lsn: "its slot's pending WAL".into(),
            reason,
        })?;
        unsent += round.changes.drain(..).filter(|c| c.table.schema != "mmsync").count() as u64;
    }
    Ok(unsent)
}
