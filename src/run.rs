//! `mmsync run`: a source and a sink for every master, as a full mesh, until
//! SIGINT or SIGTERM.

use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::error::{Error, Result};
use crate::topology::{Database, Topology};

/// Runs every source and sink until `shutdown` resolves or one of them fails
/// fatally. On shutdown, running batches finish and positions are stored.
pub async fn run(topology: Topology, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    // Credentials the brokers refuse are a mistake no retry mends: say so
    // now. Brokers that do not answer may be restarting: the links retry.
    let kafka = topology.kafka.clone();
    match tokio::task::spawn_blocking(move || crate::kafka::metadata(&kafka)).await {
        Ok(Err(why)) if why.refused_credentials => return Err(Error::KafkaSetup(why.message)),
        Ok(Err(why)) => tracing::warn!("{why}; the links retry until the brokers answer"),
        _ => {}
    }
    // One run per master: take every master's run lock before anything moves.
    let mut locks = Vec::new();
    for master in &topology.masters {
        match crate::fence::acquire(master).await {
            Ok(conn) => locks.push((master.clone(), Some(conn))),
            Err(e) if e.class() == crate::error::Class::Fatal => return Err(e),
            Err(e) => {
                tracing::warn!("{e}; its run lock is taken when it answers");
                locks.push((master.clone(), None));
            }
        }
    }
    // A join that was stopped must finish first: the sinks of its master
    // would start from offsets it has not stored yet.
    for (master, held) in &mut locks {
        if let Some(crate::fence::Held::Postgres(conn)) = held {
            let from: Option<String> = sqlx::query_scalar("SELECT from_master FROM mmsync.join_progress")
                .fetch_optional(&mut *conn)
                .await
                .unwrap_or(None);
            if let Some(from) = from {
                return Err(Error::Setup {
                    master: master.name.clone(),
                    problem: format!("a join of this master from {from} was stopped before it finished"),
                    fix: format!(
                        "run `mmsync join --master {} --from {from}` again; it goes on where it stopped",
                        master.name
                    ),
                });
            }
        }
    }
    let topology = Arc::new(topology);
    let (stop, stopped) = watch::channel(false);
    let progress = Arc::new(crate::metrics::Progress::default());
    let mut tasks: JoinSet<(String, Result<()>)> = JoinSet::new();
    let (t, p, rx) = (topology.clone(), progress.clone(), stopped.clone());
    tasks.spawn(async move { ("monitor".to_string(), monitor(t, p, rx).await) });
    for (master, held) in locks {
        let rx = stopped.clone();
        tasks.spawn(async move { (format!("run lock {}", master.name), crate::fence::keep(master, held, rx).await) });
    }
    for master in &topology.masters {
        let (t, m, rx) = (topology.clone(), master.clone(), stopped.clone());
        match master.database() {
            Database::Postgres => {
                tasks.spawn(
                    async move { (format!("source {}", m.name), crate::postgres::capture::run(t, m, rx).await) },
                );
                // Tombstone retention reads PostgreSQL's tables so far: a
                // MariaDB master keeps its tombstones.
                let (t, m, rx) = (topology.clone(), master.clone(), stopped.clone());
                tasks.spawn(async move { (format!("tombstones {}", m.name), crate::tombstones::run(t, m, rx).await) });
            }
            Database::Mariadb => {
                tasks
                    .spawn(async move { (format!("source {}", m.name), crate::mariadb::capture::run(t, m, rx).await) });
            }
        }
        for table in topology.synced_tables() {
            let count = topology.sync.apply_workers;
            for index in 0..count {
                let (t, m, p, rx) = (topology.clone(), master.clone(), progress.clone(), stopped.clone());
                let (table, worker) = (table.clone(), crate::sink::Worker { index, count });
                tasks.spawn(async move {
                    (format!("sink {worker} {} {table}", m.name), crate::sink::run(t, m, table, worker, p, rx).await)
                });
            }
        }
    }
    tracing::info!(masters = topology.masters.len(), tables = topology.tables.len(), "mmsync running");

    let mut failure: Option<Error> = None;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            _ = &mut shutdown, if !*stop.borrow() => {
                tracing::info!("shutting down: finishing current batches");
                let _ = stop.send(true);
            }
            joined = tasks.join_next() => match joined {
                None => break,
                Some(Ok((_, Ok(())))) => {}
                Some(Ok((task, Err(e)))) => {
                    tracing::error!("{task} stopped: {e}");
                    let _ = stop.send(true);
                    failure.get_or_insert(e);
                }
                Some(Err(panic)) => {
                    let _ = stop.send(true);
                    failure.get_or_insert(Error::Internal(format!("a task panicked: {panic}")));
                }
            },
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Keeps the gauges that need a clock current: lag every second (it must grow
/// while a link is stalled, when no sink reports anything), and the records
/// waiting in Kafka per link every few seconds (end offsets minus what the
/// sinks applied).
async fn monitor(
    topology: Arc<Topology>,
    progress: Arc<crate::metrics::Progress>,
    mut stopped: watch::Receiver<bool>,
) -> Result<()> {
    use crate::metrics as m;
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    let consumer: Arc<rdkafka::consumer::BaseConsumer> =
        Arc::new(crate::kafka::client_config(&topology.kafka).create().map_err(Error::kafka("creating a client"))?);
    for second in 0u64.. {
        tokio::select! {
            biased;
            _ = stopped.wait_for(|s| *s) => return Ok(()),
            _ = tick.tick() => {}
        }
        progress.publish_lag(m::now_ms(), topology.sync.heartbeat_interval);
        if second % 5 != 0 {
            continue;
        }
        let (positions, consumer) = (progress.positions(), consumer.clone());
        let pending = tokio::task::spawn_blocking(move || {
            let mut pending: std::collections::HashMap<(String, String), i64> = Default::default();
            for (topic, partition, source, target, next) in positions {
                use rdkafka::consumer::Consumer;
                if let Ok((_, high)) = consumer.fetch_watermarks(&topic, partition, crate::kafka::REQUEST_TIMEOUT) {
                    *pending.entry((source, target)).or_default() += (high - next).max(0);
                }
            }
            pending
        })
        .await
        .map_err(|e| Error::Internal(format!("the monitor panicked: {e}")))?;
        for ((source, target), n) in pending {
            metrics::gauge!(m::KAFKA_PENDING, m::SOURCE => source, m::TARGET => target).set(n as f64);
        }
    }
    Ok(())
}

/// Resolves on the first SIGINT or SIGTERM.
pub async fn signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
