//! Metrics, the Grafana dashboard and `mmsync status`, against a real
//! Prometheus scraping a running `mmsync run` under load.

use std::time::Duration;

use mmsync::testbed::{wait_for, BedKafka, Prometheus};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

use crate::common::{mmsync, random_writes, seed, Synced, DEADLINE, KV};

/// Every PromQL expression of the dashboard.
fn dashboard_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/grafana/dashboards/mmsync.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().unwrap().to_string());
        }
    }
    exprs
}

async fn lag(s: &Synced) -> f64 {
    s.metric("mmsync_replication_lag_seconds", &[("source", "seoul"), ("target", "busan")]).await
}

#[tokio::test]
async fn prometheus_has_data_for_every_panel_and_lag_follows_a_stopped_master() {
    let mut s =
        Synced::new(&["seoul", "busan"], BedKafka::Shared, KV, &["public.kv"], "heartbeat_interval_ms = 500").await;
    s.start();
    let prometheus = Prometheus::start(&[s.topology().metrics_listen]).await.expect("prometheus starts");

    // Load with conflicts on both masters, and one record that is not mmsync's.
    let seed = seed("observability");
    let mut writers = Vec::new();
    for (i, m) in ["seoul", "busan"].into_iter().enumerate() {
        let mut conn = s.conn(m).await;
        writers.push(tokio::spawn(async move { random_writes(&mut conn, m, seed + i as u64, 600, 100).await }));
    }
    let producer: FutureProducer =
        ClientConfig::new().set("bootstrap.servers", s.bed.broker.address()).create().unwrap();
    producer
        .send(
            FutureRecord::to(&s.bed.topic("seoul", "public.kv")).key("not json").payload("poison"),
            Duration::from_secs(10),
        )
        .await
        .expect("delivered");
    for w in writers {
        w.await.unwrap();
    }
    s.converged("kv").await;
    s.wait_metric("mmsync_dead_letters_total", &[("target", "busan")], 1.0).await;

    // Lag rises while busan is down, and comes back near zero after.
    s.bed.master_mut("busan").kill().await;
    wait_for("the lag gauge to rise past 3s", DEADLINE, || async { (lag(&s).await > 3.0).then_some(()) }).await;
    let (code, out) = mmsync(&s.topology, &["status"]).await;
    assert_eq!(code, 1, "status with a master down: {out}");
    assert!(out.contains("seoul -> busan: target busan: "), "{out}");
    s.bed.master_mut("busan").restart().await.unwrap();
    wait_for("the lag gauge to return near zero", DEADLINE, || async { (lag(&s).await < 1.0).then_some(()) }).await;

    // Every panel of the dashboard finds data in Prometheus.
    let exprs = dashboard_exprs();
    assert!(exprs.len() >= 10, "{exprs:?}");
    for expr in &exprs {
        wait_for(&format!("data for {expr}"), DEADLINE, || async {
            prometheus.query(expr).await.ok().filter(|r| !r.is_empty())
        })
        .await;
    }

    // status: a table for people, JSON for scripts.
    wait_for("status to show nothing pending", DEADLINE, || async {
        let (code, out) = mmsync(&s.topology, &["status", "--json"]).await;
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        let links = v["links"].as_array()?.clone();
        (code == 0
            && links.len() == 2
            && links.iter().all(|l| l["pending_records"] == 0 && l["lag_seconds"].as_f64().is_some_and(|s| s < 5.0)))
        .then_some(())
    })
    .await;
    let (code, out) = mmsync(&s.topology, &["status"]).await;
    assert_eq!(code, 0, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("LINK") && lines[0].contains("PENDING") && lines[0].contains("LAG"), "{out}");
    assert!(lines.iter().any(|l| l.starts_with("seoul -> busan") && l.contains('/')), "{out}");
    assert!(lines.iter().any(|l| l.starts_with("busan -> seoul")), "{out}");
    s.stop().await;
}

/// `mmsync_kafka_pending_records` and `status`'s PENDING are Kafka's end
/// offsets minus what the target stored as applied: with busan's table
/// locked, they must equal the records seoul produced (counted by reading
/// them back), and fall to zero once busan applies them.
#[tokio::test]
async fn pending_records_are_the_records_produced_and_not_yet_applied() {
    let mut s =
        Synced::new(&["seoul", "busan"], BedKafka::Shared, KV, &["public.kv"], "heartbeat_interval_ms = 3600000").await;
    s.start();
    let mut busan = s.conn("busan").await;
    sqlx::raw_sql("BEGIN; LOCK TABLE kv IN EXCLUSIVE MODE").execute(&mut busan).await.unwrap();
    let mut seoul = s.conn("seoul").await;
    sqlx::raw_sql(
        "INSERT INTO kv SELECT i, 'v' || i, i FROM generate_series(1, 700) i;
         UPDATE kv SET n = n + 1 WHERE id <= 100;",
    )
    .execute(&mut seoul)
    .await
    .unwrap();
    let topic = s.bed.topic("seoul", "public.kv");
    let produced = s.records(&topic, 800).len();
    assert_eq!(produced, 800, "records on {topic}");

    wait_for("pending records to show what seoul produced", DEADLINE, || async {
        pending(&s).await.filter(|p| *p == (800, 800))
    })
    .await;
    sqlx::raw_sql("ROLLBACK").execute(&mut busan).await.unwrap();
    s.converged("kv").await;
    wait_for("pending records to fall to zero", DEADLINE, || async { pending(&s).await.filter(|p| *p == (0, 0)) })
        .await;
    s.stop().await;
}

/// Records waiting for busan from seoul: (the metric, `status --json`).
async fn pending(s: &Synced) -> Option<(i64, i64)> {
    let metric = s.metric("mmsync_kafka_pending_records", &[("source", "seoul"), ("target", "busan")]).await;
    let (_, out) = mmsync(&s.topology, &["status", "--json"]).await;
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    let link = v["links"].as_array()?.iter().find(|l| l["source"] == "seoul" && l["target"] == "busan")?.clone();
    Some((metric as i64, link["pending_records"].as_i64()?))
}
