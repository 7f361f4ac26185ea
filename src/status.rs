//! `mmsync status`: per link (source -> target), where the source's slot
//! stands, how much WAL it holds, how far the target has applied, how many
//! records wait in Kafka, and the lag by the source's latest heartbeat seen on
//! the target. Read from the masters and Kafka, so it works whether or not
//! `mmsync run` is up.

use std::collections::HashMap;

use rdkafka::consumer::BaseConsumer;
use serde::Serialize;

use crate::postgres::schema::slot_name;
use crate::topology::Topology;

/// One link's state; `None` where a master or Kafka did not answer.
#[derive(Debug, Serialize)]
pub struct Link {
    pub source: String,
    pub target: String,
    /// The source slot's confirmed position (LSN), or a MariaDB source's
    /// stored GTID position (`GTID 1-1-42`).
    pub source_position: Option<String>,
    /// WAL the source keeps for mmsync's slot; on MariaDB, the binlog the
    /// server keeps (all of it: there is no slot).
    pub retained_wal_bytes: Option<i64>,
    /// Sum over the source's partitions of the next offset the target will apply.
    pub applied_offsets: Option<i64>,
    /// Records in Kafka the target has not applied yet.
    pub pending_records: Option<i64>,
    /// Now minus the source's latest heartbeat as applied on the target.
    pub lag_seconds: Option<f64>,
    /// What could not be read, and why.
    pub problems: Vec<String>,
}

struct SourceState {
    position: Option<String>,
    retained: Option<i64>,
}

/// Reads every link of the topology.
pub async fn status(topology: &Topology) -> Vec<Link> {
    let mut sources: HashMap<String, Result<SourceState, String>> = HashMap::new();
    /// Per target: applied offsets by (topic, partition), and heartbeat lag by source.
    type TargetState = (HashMap<(String, i32), i64>, HashMap<String, f64>);
    let mut targets: HashMap<String, Result<TargetState, String>> = HashMap::new();
    for m in &topology.masters {
        if m.database() == crate::topology::Database::Mariadb {
            match read_mariadb(m).await {
                Ok((source, offsets, beats)) => {
                    sources.insert(m.name.clone(), Ok(source));
                    targets.insert(m.name.clone(), Ok((offsets, beats)));
                }
                Err(e) => {
                    sources.insert(m.name.clone(), Err(e.clone()));
                    targets.insert(m.name.clone(), Err(e));
                }
            }
            continue;
        }
        let read = async {
            let mut conn = crate::postgres::db::connect(m).await.map_err(|e| e.to_string())?;
            let slot: Option<(Option<String>, Option<i64>)> = sqlx::query_as(
                "SELECT confirmed_flush_lsn::text, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8
                 FROM pg_replication_slots WHERE slot_name = $1",
            )
            .bind(slot_name(&m.name))
            .fetch_optional(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
            let (position, retained) = slot.unwrap_or((None, None));
            let offsets: Vec<(String, i32, i64)> =
                sqlx::query_as("SELECT topic, partition, next_offset FROM mmsync.applied_offsets")
                    .fetch_all(&mut conn)
                    .await
                    .map_err(|e| format!("{e} (has `mmsync init` run?)"))?;
            let beats: Vec<(String, f64)> = sqlx::query_as(
                "SELECT master, extract(epoch FROM clock_timestamp() - beat_at)::float8 FROM mmsync.heartbeats",
            )
            .fetch_all(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
            Ok::<_, String>((
                SourceState { position, retained },
                offsets.into_iter().map(|(t, p, o)| ((t, p), o)).collect(),
                beats.into_iter().collect(),
            ))
        };
        match read.await {
            Ok((source, offsets, beats)) => {
                sources.insert(m.name.clone(), Ok(source));
                targets.insert(m.name.clone(), Ok((offsets, beats)));
            }
            Err(e) => {
                sources.insert(m.name.clone(), Err(e.clone()));
                targets.insert(m.name.clone(), Err(e));
            }
        }
    }

    // End offsets of every partition of every topic.
    let topics: Vec<(String, String)> =
        crate::kafka::all_topics(topology).into_iter().map(|(m, _, t)| (m, t)).collect();
    let names: Vec<String> = topics.iter().map(|(_, t)| t.clone()).collect();
    let master_of: HashMap<&String, &String> = topics.iter().map(|(m, t)| (t, m)).collect();
    let ends: Result<Vec<(String, String, i32, i64)>, String> = crate::kafka::topic_ends(&topology.kafka, names)
        .await
        .map(|ends| ends.into_iter().map(|(t, p, high)| (master_of[&t].clone(), t, p, high)).collect())
        .map_err(|e| e.to_string());

    let mut topics_of: HashMap<String, std::collections::HashSet<String>> = HashMap::new();
    for (m, _, t) in crate::kafka::all_topics(topology) {
        topics_of.entry(m).or_default().insert(t);
    }
    let mut links = Vec::new();
    for source in &topology.masters {
        for target in topology.masters.iter().filter(|t| t.name != source.name) {
            let mut link = Link {
                source: source.name.clone(),
                target: target.name.clone(),
                source_position: None,
                retained_wal_bytes: None,
                applied_offsets: None,
                pending_records: None,
                lag_seconds: None,
                problems: Vec::new(),
            };
            match &sources[&source.name] {
                Ok(s) => {
                    link.source_position = s.position.clone();
                    link.retained_wal_bytes = s.retained;
                }
                Err(e) => link.problems.push(format!("source {}: {e}", source.name)),
            }
            match &targets[&target.name] {
                Ok((offsets, beats)) => {
                    link.lag_seconds = beats.get(&source.name).copied();
                    let mine = &topics_of[&source.name];
                    link.applied_offsets =
                        Some(offsets.iter().filter(|((t, _), _)| mine.contains(t)).map(|(_, o)| o).sum());
                    match &ends {
                        Ok(ends) => {
                            link.pending_records = Some(
                                ends.iter()
                                    .filter(|(m, ..)| *m == source.name)
                                    .map(|(_, t, p, high)| {
                                        (high - offsets.get(&(t.clone(), *p)).copied().unwrap_or(0)).max(0)
                                    })
                                    .sum(),
                            )
                        }
                        Err(e) => link.problems.push(format!("kafka: {e}")),
                    }
                }
                Err(e) => link.problems.push(format!("target {}: {e}", target.name)),
            }
            links.push(link);
        }
    }
    links
}

/// One master's tombstones: how many it keeps, and how far back what the
/// other masters can still send reaches (see [`crate::tombstones`]).
#[derive(Debug, Serialize)]
pub struct Tombstones {
    pub master: String,
    pub kept: Option<i64>,
    /// Now minus the retention watermark.
    pub behind_seconds: Option<f64>,
    /// What holds the watermark.
    pub held_by: Option<String>,
    pub problem: Option<String>,
}

/// A MariaDB master's side of its links: the GTID position its source
/// stored, the binlog the server keeps (all of it: mmsync has no slot to
/// say what it still needs), the offsets it applied and the heartbeats it holds.
async fn read_mariadb(
    m: &crate::topology::Master,
) -> Result<(SourceState, HashMap<(String, i32), i64>, HashMap<String, f64>), String> {
    use mysql_async::prelude::Queryable;
    let mut conn = crate::mariadb::db::connect(m).await.map_err(|e| e.to_string())?;
    let position: Option<String> = conn
        .exec_first("SELECT gtid_pos FROM mmsync.capture_position WHERE master = ?", (&m.name,))
        .await
        .map_err(|e| format!("{e} (has `mmsync init` run?)"))?;
    let retained = crate::mariadb::db::binlog_bytes(&mut conn, &m.name).await.ok();
    let offsets: Vec<(String, i32, i64)> = conn
        .query("SELECT topic, `partition`, next_offset FROM mmsync.applied_offsets")
        .await
        .map_err(|e| e.to_string())?;
    let beats: Vec<(String, f64)> = conn
        .query("SELECT master, TIMESTAMPDIFF(MICROSECOND, beat_at, UTC_TIMESTAMP(6)) / 1e6 FROM mmsync.heartbeats")
        .await
        .map_err(|e| e.to_string())?;
    Ok((
        SourceState { position: position.map(|p| format!("GTID {p}")), retained },
        offsets.into_iter().map(|(t, p, o)| ((t, p), o)).collect(),
        beats.into_iter().collect(),
    ))
}

/// Reads every master's tombstone retention.
pub async fn tombstones(topology: &Topology) -> Vec<Tombstones> {
    let consumer = match crate::kafka::client_config(&topology.kafka).create::<BaseConsumer>() {
        Ok(c) => std::sync::Arc::new(c),
        Err(e) => {
            let problem = Some(format!("kafka: {e}"));
            return topology
                .masters
                .iter()
                .map(|m| Tombstones {
                    master: m.name.clone(),
                    kept: None,
                    behind_seconds: None,
                    held_by: None,
                    problem: problem.clone(),
                })
                .collect();
        }
    };
    let mut out = Vec::new();
    for m in &topology.masters {
        if m.database() == crate::topology::Database::Mariadb {
            // Not a problem of the master: retention does not prune MariaDB's tombstones yet.
            use mysql_async::prelude::Queryable;
            let kept = async {
                let mut conn = crate::mariadb::db::connect(m).await?;
                let n: Option<i64> = conn
                    .query_first("SELECT count(*) FROM mmsync.tombstones")
                    .await
                    .map_err(crate::error::Error::mariadb(&m.name, "counting tombstones"))?;
                Ok::<_, crate::error::Error>(n.unwrap_or(0))
            };
            let (kept, problem) = match kept.await {
                Ok(n) => (Some(n), None),
                Err(e) => (None, Some(e.to_string())),
            };
            out.push(Tombstones {
                master: m.name.clone(),
                kept,
                behind_seconds: None,
                held_by: Some("all kept: retention prunes PostgreSQL masters' only so far".into()),
                problem,
            });
            continue;
        }
        let read = async {
            let mut conn = crate::postgres::db::connect(m).await?;
            let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM mmsync.tombstones")
                .fetch_one(&mut conn)
                .await
                .map_err(crate::error::Error::db(&m.name, "counting tombstones"))?;
            let w = crate::tombstones::assess(&mut conn, topology, &m.name, consumer.clone()).await?;
            Ok::<_, crate::error::Error>((kept, w))
        };
        out.push(match read.await {
            Ok((kept, w)) => Tombstones {
                master: m.name.clone(),
                kept: Some(kept),
                behind_seconds: Some(crate::metrics::now_ms().saturating_sub(w.ms).max(0) as f64 / 1000.0),
                held_by: Some(w.held_by.to_string()),
                problem: None,
            },
            Err(e) => Tombstones {
                master: m.name.clone(),
                kept: None,
                behind_seconds: None,
                held_by: None,
                problem: Some(e.to_string()),
            },
        });
    }
    out
}

/// The tombstones as a table for people, with a line for each master whose
/// retention is held back beyond the horizon.
pub fn tombstones_table(all: &[Tombstones], keep: std::time::Duration) -> String {
    let dash = || "-".to_string();
    let mut rows = vec![["MASTER".to_string(), "TOMBSTONES".into(), "RETENTION BEHIND".into(), "HELD BY".into()]];
    for t in all {
        rows.push([
            t.master.clone(),
            t.kept.map_or_else(dash, |n| n.to_string()),
            t.behind_seconds.map_or_else(dash, |s| format!("{s:.1}s")),
            t.held_by.clone().unwrap_or_else(dash),
        ]);
    }
    let mut out = columns(&rows);
    for t in all {
        if let Some(p) = &t.problem {
            out.push_str(&format!("{}: {p}\n", t.master));
        } else if let Some(line) = held_back(t, keep) {
            out.push_str(&format!("{}: {line}\n", t.master));
        }
    }
    out
}

/// What to say of a master whose tombstones are held back past the horizon.
pub fn held_back(t: &Tombstones, keep: std::time::Duration) -> Option<String> {
    let behind = t.behind_seconds.filter(|s| *s > keep.as_secs_f64())?;
    Some(format!(
        "tombstones are kept past [sync] tombstones_keep_seconds = {} ({behind:.0} s back), held by {}; bring that \
         master or link back, or remove a master that will not come back (`mmsync remove`)",
        keep.as_secs(),
        t.held_by.as_deref().unwrap_or("-")
    ))
}

fn columns<const N: usize>(rows: &[[String; N]]) -> String {
    let widths: Vec<usize> = (0..N).map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in rows {
        let cells: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The links as a table for people.
pub fn table(links: &[Link]) -> String {
    let dash = || "-".to_string();
    let mut rows = vec![[
        "LINK".to_string(),
        "SOURCE POSITION".into(),
        "RETAINED LOG".into(),
        "APPLIED".into(),
        "PENDING".into(),
        "LAG".into(),
    ]];
    for l in links {
        rows.push([
            format!("{} -> {}", l.source, l.target),
            l.source_position.clone().unwrap_or_else(dash),
            l.retained_wal_bytes.map_or_else(dash, bytes),
            l.applied_offsets.map_or_else(dash, |n| n.to_string()),
            l.pending_records.map_or_else(dash, |n| n.to_string()),
            l.lag_seconds.map_or_else(dash, |s| format!("{s:.1}s")),
        ]);
    }
    let mut out = columns(&rows);
    for l in links {
        for p in &l.problems {
            out.push_str(&format!("{} -> {}: {p}\n", l.source, l.target));
        }
    }
    out
}

fn bytes(n: i64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}
