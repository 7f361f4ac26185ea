//! Apache Kafka for the test bed: KRaft nodes (broker and controller in one
//! JVM each) run from the jars `scripts/setup` fetches from Maven Central, in
//! a temporary folder, on free loopback ports.
//!
//! One node is what most tests need; three nodes (replication factor 3,
//! `min.insync.replicas = 2`) are for the test that kills one broker under
//! load. Any node can be killed with SIGKILL and started again on the same
//! log directories and ports. Tests that never kill the broker share one per
//! test binary ([`KafkaCluster::shared`]), each with a topic prefix of its own:
//! a JVM broker takes seconds to start on two cores.
//!
//! Each JVM runs as every server of the bed does ([`super::process`]):
//! under a wrapper holding a pipe from this process, which kills it when the
//! test binary ends, however it ends (and, for the shared cluster, removes
//! its folder). Nothing outlives the test binary.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use tempfile::TempDir;

use super::process::{Launch, ServerProcess};
use super::{free_port, io, log_errors, log_tail, temp_dir, BedError, Result};

/// How long a node may take to serve: a node killed under load recovers its
/// logs and catches up on the cluster's metadata before it is unfenced, which
/// on two busy cores takes longer than a PostgreSQL start.
const START_DEADLINE: Duration = Duration::from_secs(120);

/// The Kafka version `scripts/kafka/pom.xml` pins.
pub const KAFKA_VERSION: &str = "4.1.1";

/// The folder of the broker's jars: `$MMSYNC_KAFKA_LIBS`, else
/// `$MMSYNC_CACHE/kafka-<version>/libs` (`MMSYNC_CACHE` defaults to
/// `~/.cache/mmsync`), where `scripts/setup` puts them.
pub fn kafka_libs() -> Result<PathBuf> {
    let dir = match std::env::var_os("MMSYNC_KAFKA_LIBS") {
        Some(dir) => PathBuf::from(dir),
        None => cache_dir().join(format!("kafka-{KAFKA_VERSION}/libs")),
    };
    if dir.join(format!("kafka_2.13-{KAFKA_VERSION}.jar")).is_file() {
        Ok(dir)
    } else {
        Err(BedError::Setup(format!(
            "Apache Kafka {KAFKA_VERSION} jars not found in {}; run scripts/setup (it fetches them with Maven) \
             or set MMSYNC_KAFKA_LIBS",
            dir.display()
        )))
    }
}

/// `$MMSYNC_CACHE`, else `~/.cache/mmsync`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("MMSYNC_CACHE").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache/mmsync")
    })
}

/// How a Kafka cluster of the bed is set up.
#[derive(Debug, Clone)]
pub struct KafkaOptions {
    /// 1, or 3 for replication factor 3 and `min.insync.replicas = 2`.
    pub nodes: usize,
    /// SCRAM-SHA-512 users `(name, password)`, made by Kafka's storage tool
    /// when the log directories are formatted, and a `SASL_PLAINTEXT`
    /// listener. With users, the cluster also runs Kafka's standard
    /// authorizer: `admin` is a super user, every other user has no rights
    /// until an ACL gives them some.
    pub scram_users: Vec<(String, String)>,
    /// A TLS listener whose certificate a CA of the bed's own signed (for
    /// 127.0.0.1 and localhost).
    pub tls: bool,
    /// Extra `server.properties` lines for every node (they win over the bed's).
    pub extra: Vec<String>,
    /// The first node's plaintext port; a free one when `None`.
    pub port: Option<u16>,
    /// Override of the plaintext listener's advertised address (`host:port`),
    /// to test clients against a broker that advertises what they cannot reach.
    pub advertise: Option<String>,
}

impl Default for KafkaOptions {
    fn default() -> Self {
        KafkaOptions { nodes: 1, scram_users: Vec::new(), tls: false, extra: Vec::new(), port: None, advertise: None }
    }
}

/// One KRaft node's ports and process.
struct Node {
    id: usize,
    port: u16,
    controller_port: u16,
    sasl_port: u16,
    tls_port: u16,
    process: Option<ServerProcess>,
}

/// A cluster of KRaft nodes in a temporary folder.
pub struct KafkaCluster {
    dir: TempDir,
    libs: PathBuf,
    opts: KafkaOptions,
    nodes: Mutex<Vec<Node>>,
    /// The shared cluster is never killed and removes its folder itself.
    shared: bool,
}

static SHARED: tokio::sync::OnceCell<Arc<KafkaCluster>> = tokio::sync::OnceCell::const_new();

impl KafkaCluster {
    /// Formats and starts a cluster, and waits until every node serves metadata.
    pub async fn start(opts: KafkaOptions) -> Result<KafkaCluster> {
        Self::start_inner(opts, false).await
    }

    /// The one-node cluster this test binary shares between tests that never
    /// kill it (each gives its topics a prefix of its own). It stops when the
    /// test binary exits.
    pub async fn shared() -> Result<Arc<KafkaCluster>> {
        SHARED
            .get_or_try_init(|| async { Ok(Arc::new(Self::start_inner(KafkaOptions::default(), true).await?)) })
            .await
            .cloned()
    }

    async fn start_inner(opts: KafkaOptions, shared: bool) -> Result<KafkaCluster> {
        assert!(opts.nodes == 1 || opts.nodes == 3, "the bed runs 1 or 3 Kafka nodes");
        let libs = kafka_libs()?;
        let mut dir = temp_dir("mmsync-kafka-")?;
        if shared {
            // The wrapper of its node removes it when the test binary exits.
            dir.disable_cleanup(true);
        }
        let nodes: Vec<Node> = (1..=opts.nodes)
            .map(|id| Node {
                id,
                port: if id == 1 { opts.port.unwrap_or_else(free_port) } else { free_port() },
                controller_port: free_port(),
                sasl_port: free_port(),
                tls_port: free_port(),
                process: None,
            })
            .collect();
        let cluster = KafkaCluster { dir, libs, opts, nodes: Mutex::new(Vec::new()), shared };
        if cluster.opts.tls {
            super::make_certificates(cluster.dir.path(), "IP:127.0.0.1,DNS:localhost").await?;
        }
        cluster.write_files(&nodes)?;
        cluster.format(&nodes).await?;
        *cluster.nodes.lock().unwrap() = nodes;
        for i in 0..cluster.opts.nodes {
            cluster.launch(i)?;
        }
        for i in 0..cluster.opts.nodes {
            cluster.wait_ready(i).await?;
        }
        Ok(cluster)
    }

    /// Bytes of record batches the first node holds for `topic` (its
    /// partitions' `.log` segments): what the records take on the wire and on
    /// disk, compressed or not.
    pub fn topic_log_bytes(&self, topic: &str) -> u64 {
        let data = self.node_dir(1).join("data");
        let Ok(entries) = std::fs::read_dir(&data) else { return 0 };
        entries
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .rsplit_once('-')
                    .is_some_and(|(t, p)| t == topic && p.parse::<u32>().is_ok())
            })
            .flat_map(|e| std::fs::read_dir(e.path()).into_iter().flatten().flatten())
            .filter(|f| f.path().extension().is_some_and(|x| x == "log"))
            .map(|f| f.metadata().map_or(0, |m| m.len()))
            .sum()
    }

    fn node_dir(&self, id: usize) -> PathBuf {
        self.dir.path().join(format!("node-{id}"))
    }

    fn write_files(&self, nodes: &[Node]) -> Result<()> {
        let voters: Vec<String> = nodes.iter().map(|n| format!("{}@127.0.0.1:{}", n.id, n.controller_port)).collect();
        let replicas = nodes.len();
        let min_isr = if replicas >= 3 { 2 } else { 1 };
        for n in nodes {
            let dir = self.node_dir(n.id);
            std::fs::create_dir_all(dir.join("data")).map_err(io("making a Kafka node folder"))?;
            let mut listeners = vec![
                format!("PLAINTEXT://127.0.0.1:{}", n.port),
                format!("CONTROLLER://127.0.0.1:{}", n.controller_port),
            ];
            let mut advertised =
                vec![format!("PLAINTEXT://{}", self.opts.advertise.clone().unwrap_or(format!("127.0.0.1:{}", n.port)))];
            let mut conf = vec![
                "process.roles=broker,controller".to_string(),
                format!("node.id={}", n.id),
                format!("controller.quorum.voters={}", voters.join(",")),
                "controller.listener.names=CONTROLLER".into(),
                "inter.broker.listener.name=PLAINTEXT".into(),
                "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT,SSL:SSL"
                    .into(),
                format!("log.dirs={}", dir.join("data").display()),
                "num.partitions=1".into(),
                format!("default.replication.factor={replicas}"),
                format!("min.insync.replicas={min_isr}"),
                // Kafka's internal topics, small: the bed makes them on first use.
                format!("offsets.topic.replication.factor={replicas}"),
                "offsets.topic.num.partitions=4".into(),
                format!("transaction.state.log.replication.factor={replicas}"),
                format!("transaction.state.log.min.isr={min_isr}"),
                "transaction.state.log.num.partitions=4".into(),
                format!("share.coordinator.state.topic.replication.factor={replicas}"),
                format!("share.coordinator.state.topic.min.isr={min_isr}"),
                "group.initial.rebalance.delay.ms=0".into(),
                // mmsync creates its topics; a typo must not make one.
                "auto.create.topics.enable=false".into(),
                // A killed node is noticed and its partitions move within seconds.
                "broker.session.timeout.ms=6000".into(),
                "broker.heartbeat.interval.ms=1000".into(),
            ];
            if !self.opts.scram_users.is_empty() {
                listeners.push(format!("SASL_PLAINTEXT://127.0.0.1:{}", n.sasl_port));
                advertised.push(format!("SASL_PLAINTEXT://127.0.0.1:{}", n.sasl_port));
                conf.extend([
                    "sasl.enabled.mechanisms=SCRAM-SHA-512".to_string(),
                    "listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;".into(),
                    "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer".into(),
                    // The bed's own plaintext listener, the controllers and `admin` may do anything.
                    "super.users=User:ANONYMOUS;User:admin".into(),
                ]);
            }
            if self.opts.tls {
                listeners.push(format!("SSL://127.0.0.1:{}", n.tls_port));
                advertised.push(format!("SSL://127.0.0.1:{}", n.tls_port));
                let keystore = self.dir.path().join("server.pem");
                let pem = format!(
                    "{}{}",
                    std::fs::read_to_string(self.dir.path().join("server.key")).map_err(io("reading server.key"))?,
                    std::fs::read_to_string(self.dir.path().join("server.crt")).map_err(io("reading server.crt"))?
                );
                std::fs::write(&keystore, pem).map_err(io("writing server.pem"))?;
                conf.extend([
                    "ssl.keystore.type=PEM".to_string(),
                    format!("ssl.keystore.location={}", keystore.display()),
                ]);
            }
            conf.push(format!("listeners={}", listeners.join(",")));
            conf.push(format!("advertised.listeners={}", advertised.join(",")));
            conf.extend(self.opts.extra.iter().cloned());
            std::fs::write(dir.join("server.properties"), conf.join("\n") + "\n")
                .map_err(io("writing server.properties"))?;
            super::write_log4j2(
                &dir.join("log4j2.properties"),
                &dir.join("server.log"),
                &["state.change.logger", "kafka.request.logger"],
            )?;
        }
        Ok(())
    }

    fn java(&self, node: usize) -> std::process::Command {
        let mut cmd = std::process::Command::new(super::java_bin());
        cmd.arg(format!("-Dlog4j2.configurationFile={}", self.node_dir(node).join("log4j2.properties").display()))
            .arg("-cp")
            .arg(format!("{}/*", self.libs.display()));
        cmd
    }

    /// `kafka-storage format` for every node, in parallel, with the SCRAM users.
    async fn format(&self, nodes: &[Node]) -> Result<()> {
        let cluster_id = cluster_id();
        let mut running = Vec::new();
        for n in nodes {
            let mut cmd = self.java(n.id);
            cmd.args(["-Xmx256m", "kafka.tools.StorageTool", "format", "--ignore-formatted", "-t", &cluster_id, "-c"])
                .arg(self.node_dir(n.id).join("server.properties"));
            for (user, password) in &self.opts.scram_users {
                cmd.arg("--add-scram").arg(format!("SCRAM-SHA-512=[name={user},password={password}]"));
            }
            let cmd = tokio::process::Command::from(cmd).output();
            running.push(cmd);
        }
        for out in futures_util::future::join_all(running).await {
            let out = out.map_err(io("running java (kafka.tools.StorageTool)"))?;
            if !out.status.success() {
                return Err(BedError::Setup(format!(
                    "formatting Kafka's log directories failed: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                )));
            }
        }
        Ok(())
    }

    /// Starts node `index` (0-based) under its wrapper; does not wait.
    fn launch(&self, index: usize) -> Result<()> {
        let mut nodes = self.nodes.lock().unwrap();
        let node = &mut nodes[index];
        assert!(node.process.is_none(), "node {} is running", node.id);
        let java = self.java(node.id);
        let heap = std::env::var("MMSYNC_KAFKA_HEAP").unwrap_or_else(|_| "1g".into());
        let mut launch = Launch::new(
            format!("Kafka node {}", node.id),
            java.get_program(),
            self.node_dir(node.id).join("stdout.log"),
        )
        .args(java.get_args())
        .args(jvm_options(&heap))
        .args(["kafka.Kafka"])
        .args([self.node_dir(node.id).join("server.properties")]);
        launch.remove_after = Some(self.dir.path().to_path_buf());
        node.process = Some(ServerProcess::spawn(launch)?);
        Ok(())
    }

    /// Waits until node `index` accepts connections on its own listener (a
    /// restarted node opens it only when it has started) and the cluster's
    /// metadata lists it among the live brokers, with every other node too.
    async fn wait_ready(&self, index: usize) -> Result<()> {
        let (id, port) = {
            let nodes = self.nodes.lock().unwrap();
            (nodes[index].id, nodes[index].port)
        };
        let client: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", format!("127.0.0.1:{port}"))
            .set("socket.connection.setup.timeout.ms", "1000")
            .set_log_level(RDKafkaLogLevel::Emerg)
            .create()
            .map_err(|e| BedError::Setup(format!("a metadata client: {e}")))?;
        let client = Arc::new(client);
        let expected = self.opts.nodes;
        let start = Instant::now();
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                let c = client.clone();
                let live = tokio::task::spawn_blocking(move || {
                    let md = c.fetch_metadata(None, Duration::from_millis(1000)).ok()?;
                    Some(md.brokers().iter().map(|b| b.id()).collect::<Vec<_>>())
                })
                .await
                .ok()
                .flatten()
                .unwrap_or_default();
                if live.contains(&(id as i32)) && live.len() >= expected {
                    return Ok(());
                }
            }
            let exited = {
                let mut nodes = self.nodes.lock().unwrap();
                nodes[index].process.as_mut().is_none_or(|p| p.exited())
            };
            if exited || start.elapsed() > START_DEADLINE {
                let log = self.node_dir(id).join("server.log");
                let stdout = self.node_dir(id).join("stdout.log");
                return Err(BedError::NotStarted {
                    what: format!("Kafka node {id} on port {port}"),
                    secs: START_DEADLINE.as_secs(),
                    log: log.display().to_string(),
                    tail: format!("{}{}\n{}", log_errors(&log), log_tail(&log), log_tail(&stdout)),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `host:port,…` of every node's plaintext listener, for `[kafka] brokers`.
    pub fn address(&self) -> String {
        self.addresses(|n| n.port)
    }

    /// `host:port,…` of the SASL/SCRAM listeners (with `scram_users`).
    pub fn sasl_address(&self) -> String {
        assert!(!self.opts.scram_users.is_empty(), "this cluster has no SCRAM users");
        self.addresses(|n| n.sasl_port)
    }

    /// `host:port,…` of the TLS listeners (with `tls`).
    pub fn tls_address(&self) -> String {
        assert!(self.opts.tls, "this cluster has no TLS listener");
        self.addresses(|n| n.tls_port)
    }

    fn addresses(&self, port: impl Fn(&Node) -> u16) -> String {
        let nodes = self.nodes.lock().unwrap();
        nodes.iter().map(|n| format!("127.0.0.1:{}", port(n))).collect::<Vec<_>>().join(",")
    }

    /// The CA that signed the TLS listener's certificate.
    pub fn ca_certificate(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// How many nodes the cluster has.
    pub fn node_count(&self) -> usize {
        self.opts.nodes
    }

    /// The last lines of node `index`'s log (0-based), for failure messages.
    pub fn log_tail(&self, index: usize) -> String {
        log_tail(&self.node_dir(index + 1).join("server.log"))
    }

    /// Runs a Kafka tool (`kafka-configs` is `org.apache.kafka.tools.ConfigCommand`, say)
    /// against the plaintext listener; returns its output or its error.
    pub async fn tool(&self, class: &str, args: &[&str]) -> Result<String> {
        let mut cmd = self.java(1);
        cmd.args(["-Xmx256m", class, "--bootstrap-server", &self.address()]).args(args);
        let out = tokio::process::Command::from(cmd).output().await.map_err(io(format!("running {class}")))?;
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if out.status.success() {
            Ok(text)
        } else {
            Err(BedError::Setup(format!("{class} {args:?} failed: {text}")))
        }
    }

    /// The record batches of a partition as node `index` (0-based) stores
    /// them, `(base offset, last offset)` each, read with Kafka's own
    /// `DumpLogSegments` from the node's log directory.
    pub async fn batches(&self, index: usize, topic: &str, partition: i32) -> Result<Vec<(i64, i64)>> {
        let dir = self.node_dir(index + 1).join("data").join(format!("{topic}-{partition}"));
        let mut segments: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(io(format!("reading {}", dir.display())))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        segments.sort();
        let mut cmd = self.java(index + 1);
        cmd.args(["-Xmx256m", "kafka.tools.DumpLogSegments", "--files"])
            .arg(segments.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(","));
        let out = tokio::process::Command::from(cmd).output().await.map_err(io("running DumpLogSegments"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let field = |line: &str, name: &str| -> Option<i64> {
            line.split(name).nth(1)?.split_whitespace().next()?.parse().ok()
        };
        Ok(text.lines().filter_map(|l| Some((field(l, "baseOffset: ")?, field(l, "lastOffset: ")?))).collect())
    }

    /// SIGKILLs node `index` (0-based), as a crash would.
    pub fn kill_node(&self, index: usize) {
        assert!(!self.shared, "the shared Kafka cluster is never killed; start the bed with a cluster of its own");
        let process = self.nodes.lock().unwrap()[index].process.take();
        if let Some(p) = process {
            p.kill();
        }
    }

    /// Starts node `index` again on its data and ports and waits until it serves.
    pub async fn restart_node(&self, index: usize) -> Result<()> {
        self.kill_node(index);
        self.launch(index)?;
        self.wait_ready(index).await
    }

    /// SIGKILLs every node.
    pub async fn kill(&self) {
        for i in 0..self.opts.nodes {
            self.kill_node(i);
        }
    }

    /// Starts every node again on its data and ports.
    pub async fn restart(&self) -> Result<()> {
        self.kill().await;
        for i in 0..self.opts.nodes {
            self.launch(i)?;
        }
        for i in 0..self.opts.nodes {
            self.wait_ready(i).await?;
        }
        Ok(())
    }
}

impl Drop for KafkaCluster {
    fn drop(&mut self) {
        let nodes = std::mem::take(&mut *self.nodes.lock().unwrap_or_else(|e| e.into_inner()));
        for node in nodes {
            if let Some(p) = node.process {
                p.kill();
            }
        }
    }
}

/// The JVM options Kafka's own scripts (`kafka-run-class.sh`) start its
/// servers with, with a heap from 256 MiB up to `heap`.
pub(super) fn jvm_options(heap: &str) -> Vec<String> {
    vec![
        "-Xms256m".to_string(),
        format!("-Xmx{heap}"),
        "-XX:+UseG1GC".into(),
        "-XX:MaxGCPauseMillis=20".into(),
        "-XX:InitiatingHeapOccupancyPercent=35".into(),
        "-XX:+ExplicitGCInvokesConcurrent".into(),
        "-Djava.awt.headless=true".into(),
    ]
}

/// A KRaft cluster id: 16 random bytes in URL-safe base64 without padding,
/// never starting with `-` (the storage tool would take it for an option;
/// Kafka's own `Uuid.randomUuid()` draws again in that case too).
fn cluster_id() -> String {
    loop {
        let id = encode_cluster_id(uuid::Uuid::new_v4().into_bytes());
        if !id.starts_with('-') {
            return id;
        }
    }
}

fn encode_cluster_id(bytes: [u8; 16]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut bits: u32 = 0;
    let mut held = 0;
    let mut out = String::with_capacity(22);
    for b in bytes {
        bits = (bits << 8) | b as u32;
        held += 8;
        while held >= 6 {
            held -= 6;
            out.push(ALPHABET[((bits >> held) & 63) as usize] as char);
        }
    }
    if held > 0 {
        out.push(ALPHABET[((bits << (6 - held)) & 63) as usize] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn cluster_ids_are_22_url_safe_characters() {
        let id = super::cluster_id();
        assert_eq!(id.len(), 22);
        assert!(id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "{id}");
    }

    #[test]
    fn cluster_ids_never_start_with_a_dash() {
        // 0xf8 encodes as '-' first: the one that made kafka-storage say
        // "argument --cluster-id: expected one argument".
        assert!(super::encode_cluster_id([0xf8; 16]).starts_with('-'));
        assert!((0..2000).map(|_| super::cluster_id()).all(|id| !id.starts_with('-')));
    }
}
