//! `mmsync-bed`: the test bed as a command. `demo` brings up the servers of
//! `topology.toml` and runs the sync between them; `up` starts a throwaway bed
//! of N masters and a broker and writes a topology for it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use mmsync::testbed::{wait_for, Bed, BedKafka, KafkaCluster, KafkaOptions, MmsyncProcess, PgCluster, PgOptions};
use mmsync::topology::Topology;
use sqlx::postgres::PgConnectOptions;

#[derive(Parser)]
#[command(name = "mmsync-bed", about = "Real PostgreSQL masters and Apache Kafka on loopback, for demos and tests.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the masters and the broker that a topology names (on its ports),
    /// create the demo tables, run `mmsync check`, `init` and `run`, write a row
    /// on the first master and show it arriving on the others. Ctrl-C stops all.
    Demo {
        #[arg(long, env = "MMSYNC_TOPOLOGY", default_value = "topology.toml")]
        topology: PathBuf,
    },
    /// Start N masters (database `app`) and a broker on free ports, write a
    /// topology for them and wait for Ctrl-C.
    Up {
        #[arg(long, default_value_t = 2)]
        masters: usize,
        /// Tables to list in the topology (create them yourself).
        #[arg(long, default_value = "public.users")]
        tables: Vec<String>,
    },
}

const DEMO_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS users (
    id bigserial PRIMARY KEY,
    name text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS messages (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id bigint NOT NULL,
    body text NOT NULL,
    sent_at timestamptz NOT NULL DEFAULT now()
);";

fn mmsync_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("the running executable");
    exe.with_file_name("mmsync")
}

async fn mmsync(topology: &Path, args: &[&str]) -> bool {
    let status = tokio::process::Command::new(mmsync_bin())
        .arg("--topology")
        .arg(topology)
        .args(args)
        .status()
        .await
        .expect("running mmsync");
    status.success()
}

#[tokio::main]
async fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Demo { topology } => demo(&topology).await,
        Command::Up { masters, tables } => up(masters, &tables).await,
    }
}

async fn demo(path: &Path) -> ExitCode {
    let topology = match Topology::load(path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let broker_port: u16 = topology
        .kafka
        .brokers
        .split(',')
        .next()
        .and_then(|b| b.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .expect("[kafka] brokers is host:port");
    println!("demo: starting Apache Kafka {} on port {broker_port}", mmsync::testbed::kafka::KAFKA_VERSION);
    let _broker = KafkaCluster::start(KafkaOptions { port: Some(broker_port), ..KafkaOptions::default() })
        .await
        .expect("Kafka starts");
    let mut clusters = Vec::new();
    for m in &topology.masters {
        let opts = PgConnectOptions::from_str(m.url.expose()).expect("a valid url");
        let db = opts.get_database().unwrap_or("postgres").to_string();
        println!("demo: starting master {:?}: PostgreSQL on port {}, database {db}", m.name, opts.get_port());
        let cluster = PgCluster::start(PgOptions { port: Some(opts.get_port()), ..PgOptions::default() })
            .await
            .expect("postgres starts");
        cluster.create_database(&db).await.expect("database");
        let mut conn = cluster.connect(&db).await.expect("connect");
        sqlx::raw_sql(DEMO_SCHEMA).execute(&mut conn).await.expect("demo tables");
        clusters.push((m.name.clone(), cluster, db));
    }
    if !mmsync(path, &["check"]).await || !mmsync(path, &["init"]).await {
        return ExitCode::FAILURE;
    }
    let log = std::env::temp_dir().join("mmsync-demo.log");
    let run = MmsyncProcess::spawn(&mmsync_bin(), path, &["run"], &[], log.clone()).expect("mmsync run starts");
    println!("demo: mmsync run started (log: {})", log.display());

    let (first, first_cluster, first_db) = &clusters[0];
    let mut conn = first_cluster.connect(first_db).await.expect("connect");
    let name = format!("hello from {first}");
    let id: i64 = sqlx::query_scalar("INSERT INTO users (name) VALUES ($1) RETURNING id")
        .bind(&name)
        .fetch_one(&mut conn)
        .await
        .expect("insert");
    let written = Instant::now();
    println!("demo: wrote users row {id} ({name:?}) on {first}");
    for (other, cluster, db) in &clusters[1..] {
        let origin: String = wait_for(&format!("the row on {other}"), Duration::from_secs(60), || async {
            let mut conn = cluster.connect(db).await.ok()?;
            sqlx::query_scalar("SELECT mmsync_origin::text FROM users WHERE id = $1")
                .bind(id)
                .fetch_optional(&mut conn)
                .await
                .ok()
                .flatten()
        })
        .await;
        println!("demo: row {id} is on {other} after {:?} (mmsync_origin = {origin})", written.elapsed());
    }
    println!("\nThe masters are yours to write to; changes flow both ways:");
    for (name, cluster, db) in &clusters {
        println!("  {name}: psql {}", cluster.url(db));
    }
    println!("Metrics: http://{}/metrics\nCtrl-C stops mmsync and the servers.", topology.metrics_listen);
    mmsync::run::signal().await;
    let status = run.terminate().await;
    println!("demo: mmsync run exited with {status}");
    ExitCode::SUCCESS
}

async fn up(masters: usize, tables: &[String]) -> ExitCode {
    let names: Vec<String> = (1..=masters).map(|i| format!("m{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let bed = Bed::start(&names, BedKafka::own()).await.expect("bed starts");
    let tables: Vec<&str> = tables.iter().map(String::as_str).collect();
    let topology = bed.write_topology(&tables, "");
    println!("topology: {}", topology.display());
    for (name, cluster) in &bed.masters {
        println!("  {name}: psql {}", cluster.url(mmsync::testbed::BED_DATABASE));
    }
    println!("  broker: {}\nCtrl-C stops everything and removes the folders.", bed.broker.address());
    mmsync::run::signal().await;
    ExitCode::SUCCESS
}
