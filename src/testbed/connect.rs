//! Kafka Connect for the benchmark's Debezium anchor (`benches/compare.rs`):
//! one standalone worker (`ConnectStandalone`) on the bed's broker, running
//! Debezium's PostgreSQL source and JDBC sink from the jars `scripts/bench`
//! fetches from Maven Central (`scripts/kafka/connect-pom.xml`) into
//! `$MMSYNC_CACHE/connect-<Debezium version>/libs`, all on one classpath.
//!
//! Standalone, because the anchor is one pipeline on one machine, as mmsync
//! is: source offsets in a file in the worker's folder, the sink's in its
//! consumer group. JSON converters with schemas: Debezium's JDBC sink needs
//! each record's schema, and without a schema registry JSON is the converter
//! that carries it.
//!
//! The worker can be stopped as an operator would (SIGTERM: connectors stop,
//! offsets are flushed, the slot is confirmed) and started again on the same
//! folder, which is how a catch-up is measured. Like every server of the bed
//! it runs under a wrapper that kills it when this process ends
//! ([`super::process`]): nothing outlives the benchmark.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::kafka::cache_dir;
use super::process::{Launch, ServerProcess};
use super::{free_port, io, log_tail, temp_dir, BedError, Result};

/// The Debezium version `scripts/kafka/connect-pom.xml` pins (both connectors).
pub const DEBEZIUM_VERSION: &str = "3.6.0.Final";

/// The Kafka Connect worker it pins: the Kafka that Debezium release is built against.
pub const CONNECT_VERSION: &str = "4.3.0";

/// A JVM that loads Hibernate and a hundred jars on two busy cores takes a while.
const START_DEADLINE: Duration = Duration::from_secs(180);

/// How long a stopping worker may take to flush and exit before it is killed.
const STOP_DEADLINE: Duration = Duration::from_secs(60);

/// The folder of the worker's and connectors' jars: `$MMSYNC_CONNECT_LIBS`,
/// else `$MMSYNC_CACHE/connect-<version>/libs`, where `scripts/bench` puts them.
pub fn connect_libs() -> Result<PathBuf> {
    let dir = match std::env::var_os("MMSYNC_CONNECT_LIBS") {
        Some(dir) => PathBuf::from(dir),
        None => cache_dir().join(format!("connect-{DEBEZIUM_VERSION}/libs")),
    };
    let marker = format!("debezium-connector-jdbc-{DEBEZIUM_VERSION}.jar");
    if dir.join(&marker).is_file() && dir.join(format!("debezium-connector-postgres-{DEBEZIUM_VERSION}.jar")).is_file()
    {
        Ok(dir)
    } else {
        Err(BedError::Setup(format!(
            "Kafka Connect and Debezium {DEBEZIUM_VERSION} jars not found in {}; run scripts/bench (it fetches \
             them with Maven) or set MMSYNC_CONNECT_LIBS",
            dir.display()
        )))
    }
}

/// A connector's name and properties, as a `.properties` file gives them to
/// `ConnectStandalone`.
#[derive(Debug, Clone)]
pub struct Connector {
    name: String,
    config: Vec<(String, String)>,
}

impl Connector {
    pub fn new(name: &str, class: &str) -> Connector {
        Connector {
            name: name.to_string(),
            config: vec![("name".into(), name.to_string()), ("connector.class".into(), class.to_string())],
        }
    }

    /// Sets a property (a later value of the same key wins, as in a properties file).
    pub fn set(mut self, key: &str, value: impl ToString) -> Connector {
        self.config.push((key.to_string(), value.to_string()));
        self
    }
}

/// `key=value` lines; a properties file reads `\` as an escape, so it is doubled.
fn properties(pairs: &[(String, String)]) -> String {
    pairs.iter().map(|(k, v)| format!("{k}={}\n", v.replace('\\', "\\\\"))).collect()
}

/// A standalone Kafka Connect worker and its connectors, in a temporary folder.
pub struct KafkaConnect {
    dir: TempDir,
    libs: PathBuf,
    rest_port: u16,
    connectors: Vec<String>,
    worker: Option<ServerProcess>,
}

impl KafkaConnect {
    /// Writes the worker's and the connectors' properties for a worker on
    /// `brokers`; starts nothing. `worker_extra` lines win over the bed's.
    pub fn new(brokers: &str, connectors: &[Connector], worker_extra: &[(&str, &str)]) -> Result<KafkaConnect> {
        let libs = connect_libs()?;
        let dir = temp_dir("mmsync-connect-")?;
        let rest_port = free_port();
        let mut worker: Vec<(String, String)> = [
            ("bootstrap.servers", brokers.to_string()),
            ("key.converter", "org.apache.kafka.connect.json.JsonConverter".into()),
            ("value.converter", "org.apache.kafka.connect.json.JsonConverter".into()),
            ("key.converter.schemas.enable", "true".into()),
            ("value.converter.schemas.enable", "true".into()),
            ("offset.storage.file.filename", dir.path().join("offsets.dat").display().to_string()),
            ("listeners", format!("http://127.0.0.1:{rest_port}")),
            // Every plugin here declares itself in META-INF/services: no classpath scan.
            ("plugin.discovery", "service_load".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        worker.extend(worker_extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        std::fs::write(dir.path().join("worker.properties"), properties(&worker))
            .map_err(io("writing worker.properties"))?;
        for c in connectors {
            std::fs::write(dir.path().join(format!("{}.properties", c.name)), properties(&c.config))
                .map_err(io("writing a connector's properties"))?;
        }
        super::write_log4j2(
            &dir.path().join("log4j2.properties"),
            &dir.path().join("connect.log"),
            &["org.hibernate"],
        )?;
        let connectors = connectors.iter().map(|c| c.name.clone()).collect();
        Ok(KafkaConnect { dir, libs, rest_port, connectors, worker: None })
    }

    /// Starts the worker and waits until every connector and each of its
    /// tasks is running; fails at once, with the trace, when one has failed.
    pub async fn start(&mut self) -> Result<()> {
        assert!(self.worker.is_none(), "the worker is running");
        let java = super::java_bin();
        let heap = std::env::var("MMSYNC_CONNECT_HEAP").unwrap_or_else(|_| "2g".into());
        let dir = self.dir.path();
        let launch = Launch::new("Kafka Connect", java, dir.join("stdout.log"))
            .args([
                format!("-Dlog4j2.configurationFile={}", dir.join("log4j2.properties").display()),
                "-cp".into(),
                format!("{}/*", self.libs.display()),
            ])
            // Kafka's own launch options for a worker: connect-standalone.sh's
            // heap (256 MiB to 2 GiB; MMSYNC_CONNECT_HEAP sets the top), which a
            // 24 GiB machine gives without thinking, and kafka-run-class.sh's GC.
            .args(super::kafka::jvm_options(&heap))
            .args(["org.apache.kafka.connect.cli.ConnectStandalone"])
            .args([dir.join("worker.properties")])
            .args(self.connectors.iter().map(|c| dir.join(format!("{c}.properties"))));
        self.worker = Some(ServerProcess::spawn(launch)?);
        self.wait_running().await
    }

    async fn wait_running(&mut self) -> Result<()> {
        let start = Instant::now();
        loop {
            let mut running = true;
            for name in &self.connectors {
                let addr = ([127, 0, 0, 1], self.rest_port).into();
                let status = super::http_get(addr, &format!("/connectors/{name}/status")).await.ok();
                let status: serde_json::Value =
                    status.and_then(|s| serde_json::from_str(&s).ok()).unwrap_or(serde_json::Value::Null);
                let states: Vec<(&str, &str)> = std::iter::once(&status["connector"])
                    .chain(status["tasks"].as_array().into_iter().flatten())
                    .map(|s| (s["state"].as_str().unwrap_or(""), s["trace"].as_str().unwrap_or("")))
                    .collect();
                if let Some((_, trace)) = states.iter().find(|(state, _)| *state == "FAILED") {
                    return Err(BedError::Setup(format!("Kafka Connect: {name} failed: {trace}")));
                }
                // A connector without tasks yet is not running.
                running &= states.len() > 1 && states.iter().all(|(state, _)| *state == "RUNNING");
            }
            if running {
                return Ok(());
            }
            let exited = self.worker.as_mut().is_none_or(|w| w.exited());
            if exited || start.elapsed() > START_DEADLINE {
                return Err(BedError::NotStarted {
                    what: format!("Kafka Connect (REST on port {})", self.rest_port),
                    secs: START_DEADLINE.as_secs(),
                    log: self.dir.path().join("connect.log").display().to_string(),
                    tail: self.log_tail(),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops the worker as an operator would (SIGTERM: connectors stop and
    /// flush their offsets) and waits for it to exit; kills it after a deadline.
    pub async fn stop(&mut self) -> Result<()> {
        let Some(mut worker) = self.worker.take() else { return Ok(()) };
        worker.signal(libc::SIGTERM);
        let start = Instant::now();
        while !worker.exited() {
            if start.elapsed() > STOP_DEADLINE {
                worker.kill();
                return Err(BedError::Setup(format!(
                    "Kafka Connect did not stop within {}s of SIGTERM and was killed; its log ends with:\n{}",
                    STOP_DEADLINE.as_secs(),
                    self.log_tail()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// The worker JVM's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.worker.as_ref().map(|w| w.pid())
    }

    /// The last lines of the worker's log, for failure messages.
    pub fn log_tail(&self) -> String {
        format!("{}\n{}", log_tail(&self.dir.path().join("connect.log")), log_tail(&self.dir.path().join("stdout.log")))
    }
}

/// Creates topics with one replica on `brokers`, a one-node bed broker (it
/// creates none by itself): the source's, before it writes, and so the
/// sink's, before it subscribes.
pub async fn create_topics(brokers: &str, topics: &[&str], partitions: i32) -> Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .map_err(|e| BedError::Setup(format!("a Kafka admin client: {e}")))?;
    let new: Vec<NewTopic> = topics.iter().map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1))).collect();
    let results = admin
        .create_topics(&new, &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))))
        .await
        .map_err(|e| BedError::Setup(format!("creating topics {topics:?}: {e}")))?;
    for result in results {
        match result {
            Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(BedError::Setup(format!("creating topic {topic}: {code}"))),
        }
    }
    Ok(())
}
