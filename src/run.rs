//! `mmsync run`: a source and a sink for every master, as a full mesh, until
//! SIGINT or SIGTERM.

use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::error::{Error, Result};
use crate::topology::Topology;

/// Runs every source and sink until `shutdown` resolves or one of them fails
/// fatally. On shutdown, running batches finish and positions are stored.
pub async fn run(
    topology: Topology,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let topology = Arc::new(topology);
    let (stop, stopped) = watch::channel(false);
    let mut tasks: JoinSet<(String, Result<()>)> = JoinSet::new();
    for master in &topology.masters {
        let (t, m, rx) = (topology.clone(), master.clone(), stopped.clone());
        tasks.spawn(async move {
            (
                format!("source {}", m.name),
                crate::source::run(t, m, rx).await,
            )
        });
        for table in &topology.tables {
            let (t, m, rx, table) = (
                topology.clone(),
                master.clone(),
                stopped.clone(),
                table.clone(),
            );
            tasks.spawn(async move {
                (
                    format!("sink {} {table}", m.name),
                    crate::sink::run(t, m, table, rx).await,
                )
            });
        }
    }
    tracing::info!(
        masters = topology.masters.len(),
        tables = topology.tables.len(),
        "mmsync running"
    );

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

/// Resolves on the first SIGINT or SIGTERM.
pub async fn signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
