//! The test bed: real PostgreSQL clusters and real Apache Kafka ([`kafka`]) on
//! loopback, started in temporary folders and removed when dropped. Shared by the
//! integration tests, `loop-tests/`, the benchmarks and the demo
//! (`mmsync-bed`).
//!
//! Each server can be killed with SIGKILL and started again on the same data
//! and port, which the chaos tests need. When the bed runs as root (as CI
//! does), PostgreSQL runs as the unprivileged `postgres` system user, since
//! `initdb` and `postgres` refuse to run as root.

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};
use std::sync::Arc;
use tempfile::TempDir;
use tokio::process::{Child, Command};

pub mod connect;
pub mod kafka;
pub mod mariadb;
pub mod process;

pub use kafka::{KafkaCluster, KafkaOptions};

/// How long a server may take to start before the bed gives up.
const START_DEADLINE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum BedError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{0}")]
    Setup(String),
    #[error("{what} did not start within {secs}s; its log ({log}) ends with:\n{tail}")]
    NotStarted { what: String, secs: u64, log: String, tail: String },
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

type Result<T> = std::result::Result<T, BedError>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BedError {
    let what = what.into();
    move |source| BedError::Io { what, source }
}

/// A temporary folder, kept after the test when `MMSYNC_KEEP_BED` is set (to
/// read the servers' logs after a failure).
fn temp_dir(prefix: &str) -> Result<TempDir> {
    let mut dir = tempfile::Builder::new().prefix(prefix).tempdir().map_err(io("making a temporary folder"))?;
    if std::env::var_os("MMSYNC_KEEP_BED").is_some() {
        dir.disable_cleanup(true);
        eprintln!("MMSYNC_KEEP_BED: keeping {}", dir.path().display());
    }
    Ok(dir)
}

/// The body of a `GET` answered with 200, over plain HTTP/1.0 (for the
/// metrics endpoint and Prometheus' API on loopback).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    match text.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200") => {
            Ok(body.to_string())
        }
        _ => Err(std::io::Error::other(text)),
    }
}

/// Runs `mmsync --topology <topology> <args>` to completion; returns its exit
/// code and everything it printed.
pub async fn run_mmsync(bin: &Path, topology: &Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(bin)
        .arg("--topology")
        .arg(topology)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .await
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("the loopback interface has a free port")
}

/// Polls `check` until it returns `Some`, or fails after `deadline`.
/// The bed's and the tests' only way to wait: on a condition, never a fixed sleep.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    wait_every(what, deadline, Duration::from_millis(50), check).await
}

/// [`wait_for`], checking every `interval` (a benchmark polls less often,
/// so that its checks cost little beside what it measures).
pub async fn wait_every<T, F, Fut>(what: &str, deadline: Duration, interval: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(start.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}");
        tokio::time::sleep(interval).await;
    }
}

/// Makes `ca.key`/`ca.crt`, a CA of the bed's own, and `server.key`/`server.crt`,
/// a server certificate it signed for `subject_alt_names` (openssl's form:
/// `DNS:name,IP:127.0.0.1`), in `dir`.
async fn make_certificates(dir: &Path, subject_alt_names: &str) -> Result<()> {
    std::fs::write(dir.join("server.ext"), format!("basicConstraints=CA:FALSE\nsubjectAltName={subject_alt_names}\n"))
        .map_err(io("writing server.ext"))?;
    let steps: [&[&str]; 3] = [
        &["req", "-new", "-x509", "-days", "2", "-nodes", "-subj", "/CN=mmsync-test-ca"],
        &["req", "-new", "-nodes", "-subj", "/CN=mmsync-test", "-newkey", "rsa:2048"],
        &["x509", "-req", "-days", "2", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key"],
    ];
    let outputs: [&[&str]; 3] = [
        &["-newkey", "rsa:2048", "-keyout", "ca.key", "-out", "ca.crt"],
        &["-keyout", "server.key", "-out", "server.csr"],
        &["-CAcreateserial", "-extfile", "server.ext", "-out", "server.crt"],
    ];
    for (step, out) in steps.iter().zip(outputs) {
        openssl(dir, &[step, out].concat()).await?;
    }
    Ok(())
}

/// Runs `openssl args` in `dir`; its stderr is the error if it fails.
async fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl").args(args).current_dir(dir).output().await.map_err(io("running openssl"))?;
    if !out.status.success() {
        return Err(BedError::Setup(format!("openssl failed: {}", String::from_utf8_lossy(&out.stderr))));
    }
    Ok(())
}

/// Makes `<name>.key`/`<name>.crt` in `dir`: a CA that signs nothing, for
/// tests of what a client trusts. Returns the certificate's path.
pub async fn make_ca(dir: &Path, name: &str) -> Result<PathBuf> {
    let (key, crt) = (format!("{name}.key"), format!("{name}.crt"));
    let subject = format!("/CN={name}");
    openssl(
        dir,
        &[
            "req", "-new", "-x509", "-days", "2", "-nodes", "-subj", &subject, "-newkey", "rsa:2048", "-keyout", &key,
            "-out", &crt,
        ],
    )
    .await?;
    Ok(dir.join(crt))
}

/// An IPv4 address of this machine other than loopback, if it has one: for
/// tests of what mmsync does when a master is across a network.
pub fn non_loopback_ipv4() -> Option<std::net::Ipv4Addr> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a list that freeifaddrs frees below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return None;
    }
    let mut found = None;
    let mut node = list;
    while !node.is_null() && found.is_none() {
        // SAFETY: `node` is an entry of the list, which is not freed yet; an
        // address of family AF_INET is a sockaddr_in.
        unsafe {
            let addr = (*node).ifa_addr;
            if !addr.is_null() && i32::from((*addr).sa_family) == libc::AF_INET {
                let ip = std::net::Ipv4Addr::from(u32::from_be((*addr.cast::<libc::sockaddr_in>()).sin_addr.s_addr));
                found = Some(ip).filter(|ip| !ip.is_loopback());
            }
            node = (*node).ifa_next;
        }
    }
    // SAFETY: `list` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    found
}

/// The `java` of `$JAVA_HOME`, else the one on the `PATH`: what the bed's
/// JVMs (Kafka, Kafka Connect) run on.
pub(crate) fn java_bin() -> PathBuf {
    std::env::var_os("JAVA_HOME")
        .map(|h| PathBuf::from(h).join("bin/java"))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("java"))
}

/// Writes a log4j2 configuration to `config` that sends a JVM's log to
/// `log_file` at INFO, with each of `quiet` (logger names) at WARN.
pub(crate) fn write_log4j2(config: &Path, log_file: &Path, quiet: &[&str]) -> Result<()> {
    let mut text = format!(
        "status = error\n\
         appender.file.type = File\n\
         appender.file.name = file\n\
         appender.file.fileName = {}\n\
         appender.file.layout.type = PatternLayout\n\
         appender.file.layout.pattern = [%d] %p %m (%c)%n\n\
         rootLogger.level = INFO\n\
         rootLogger.appenderRef.file.ref = file\n",
        log_file.display()
    );
    for (i, name) in quiet.iter().enumerate() {
        text.push_str(&format!("logger.quiet{i}.name = {name}\nlogger.quiet{i}.level = WARN\n"));
    }
    std::fs::write(config, text).map_err(io("writing log4j2.properties"))
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// The first lines of a log that say ERROR or FATAL (a server that shut
/// itself down says why long before its last lines), for failure messages.
fn log_errors(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let errors: Vec<&str> = text.lines().filter(|l| l.contains("ERROR") || l.contains("FATAL")).take(10).collect();
    if errors.is_empty() {
        String::new()
    } else {
        format!("first errors:\n{}\nlast lines:\n", errors.join("\n"))
    }
}

/// The uid and gid of the `postgres` system user when we run as root.
fn postgres_user() -> Result<Option<(u32, u32)>> {
    system_user("postgres", "PostgreSQL", "postgresql")
}

/// When running as root, the uid and gid of the system user `name` that a
/// server refusing root runs as (`what`, installed by Debian's `package`).
fn system_user(name: &str, what: &str, package: &str) -> Result<Option<(u32, u32)>> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(io("reading /etc/passwd"))?;
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.first() == Some(&name) && f.len() > 3)
        .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
        .map(Some)
        .ok_or_else(|| {
            BedError::Setup(format!(
                "running as root, but there is no '{name}' system user to run {what} as; \
                 install the {package} package (scripts/setup does)"
            ))
        })
}

/// The folder holding `initdb` and `postgres`: `$MMSYNC_PG_BIN`, else the
/// newest `/usr/lib/postgresql/*/bin`, else the `PATH`.
pub fn pg_bin_dir() -> Result<PathBuf> {
    if let Ok(dir) = std::env::var("MMSYNC_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, p)| p.join("initdb").exists())
        .collect();
    dirs.sort();
    if let Some((_, dir)) = dirs.pop() {
        return Ok(dir);
    }
    which("initdb").and_then(|p| p.parent().map(Path::to_path_buf)).ok_or_else(|| {
        BedError::Setup("initdb not found; run scripts/setup (it installs PostgreSQL) or set MMSYNC_PG_BIN".into())
    })
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").iter().flat_map(std::env::split_paths).map(|d| d.join(name)).find(|p| p.is_file())
}

fn chown_tree(path: &Path, owner: Option<(u32, u32)>) -> Result<()> {
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(io(format!("chown {}", path.display())))?;
    }
    Ok(())
}

/// Options of a PostgreSQL cluster.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// `wal_level`; `logical` unless a test needs a broken master.
    pub wal_level: String,
    /// Port to listen on; a free one when `None`.
    pub port: Option<u16>,
    /// Extra lines for postgresql.conf.
    pub extra_conf: Vec<String>,
    /// Serve TLS with a server certificate signed by a fresh CA of its own (made with openssl).
    pub ssl: bool,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions { wal_level: "logical".into(), port: None, extra_conf: Vec::new(), ssl: false }
    }
}

/// A PostgreSQL cluster made with `initdb` in a temporary folder.
pub struct PgCluster {
    dir: TempDir,
    port: u16,
    bin: PathBuf,
    owner: Option<(u32, u32)>,
    child: Option<process::ServerProcess>,
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        // The server dies with its wrapper (SIGKILL), which leaves its small
        // System V shared memory segment behind (the interlock the postmaster
        // names in postmaster.pid); with its folder gone nothing would remove
        // it, and a machine that runs the tests all day runs out of segments
        // (kernel.shmmni: initdb then fails with "No space left on device").
        // Marked for removal, it goes once the last dying process detaches.
        let shmid = std::fs::read_to_string(self.dir.path().join("data/postmaster.pid")).ok().and_then(|pid| {
            pid.lines().nth(6).and_then(|l| l.split_whitespace().nth(1)).and_then(|id| id.parse::<i32>().ok())
        });
        drop(self.child.take());
        if let Some(id) = shmid {
            // SAFETY: IPC_RMID takes no buffer; an id that is gone or not ours only fails.
            unsafe {
                libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut());
            }
        }
    }
}

impl PgCluster {
    /// Makes and starts a cluster. Superuser `postgres`, trust authentication on 127.0.0.1.
    pub async fn start(opts: PgOptions) -> Result<PgCluster> {
        let bin = pg_bin_dir()?;
        let owner = postgres_user()?;
        let dir = temp_dir("mmsync-pg-")?;
        chown_tree(dir.path(), owner)?;
        let data = dir.path().join("data");
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some((uid, gid)) = owner {
            initdb.uid(uid).gid(gid);
        }
        let out = initdb.output().await.map_err(io(format!("running {}", bin.join("initdb").display())))?;
        if !out.status.success() {
            return Err(BedError::Setup(format!("initdb failed: {}", String::from_utf8_lossy(&out.stderr))));
        }
        let port = opts.port.unwrap_or_else(free_port);
        let mut conf = vec![
            format!("port = {port}"),
            "listen_addresses = '127.0.0.1'".to_string(),
            format!("unix_socket_directories = '{}'", dir.path().display()),
            format!("wal_level = {}", opts.wal_level),
            "max_replication_slots = 20".into(),
            "max_wal_senders = 20".into(),
            "max_connections = 100".into(),
            "shared_buffers = 64MB".into(),
            // Process kills are what the chaos tests do; an OS crash is not, so
            // skipping fsync loses nothing the tests look at and saves time.
            "fsync = off".into(),
            "full_page_writes = off".into(),
            "log_min_messages = warning".into(),
        ];
        conf.extend(opts.extra_conf);
        if opts.ssl {
            // For the name "mmsync-test", not 127.0.0.1: verify-full must refuse it.
            make_certificates(&data, "DNS:mmsync-test").await?;
            for file in ["server.key", "server.crt"] {
                chown_tree(&data.join(file), owner)?;
            }
            std::fs::set_permissions(data.join("server.key"), std::fs::Permissions::from_mode(0o600))
                .map_err(io("chmod server.key"))?;
            conf.push("ssl = on".into());
        }
        let conf_path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path).map_err(io("reading postgresql.conf"))?;
        text.push_str("\n# mmsync test bed\n");
        text.push_str(&conf.join("\n"));
        text.push('\n');
        std::fs::write(&conf_path, text).map_err(io("writing postgresql.conf"))?;
        let mut cluster = PgCluster { dir, port, bin, owner, child: None };
        cluster.launch().await?;
        Ok(cluster)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// Starts the postmaster and waits until it accepts connections. After a
    /// SIGKILL the old postmaster's children may hold the shared memory for a
    /// moment: the start is tried again until the deadline.
    async fn launch(&mut self) -> Result<()> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(io("opening the postgres log"))?;
        std::fs::set_permissions(self.log_path(), std::fs::Permissions::from_mode(0o666)).ok();
        let launch = || {
            let mut launch = process::Launch::new(
                format!("postgres on port {}", self.port),
                self.bin.join("postgres"),
                self.log_path(),
            )
            .args([std::ffi::OsString::from("-D"), self.dir.path().join("data").into_os_string()]);
            launch.user = self.owner;
            launch.remove_after = Some(self.dir.path().to_path_buf());
            Ok(launch)
        };
        let ready = || async { self.connect("postgres").await.is_ok() };
        let server = process::start_until_ready(launch, ready, START_DEADLINE, &self.log_path()).await?;
        self.child = Some(server);
        Ok(())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// URL of a database on this cluster.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    pub async fn connect(&self, db: &str) -> std::result::Result<PgConnection, sqlx::Error> {
        PgConnection::connect(&self.url(db)).await
    }

    /// The CA that signed the certificate of a cluster started with `ssl: true`.
    pub fn tls_root_certificate(&self) -> PathBuf {
        self.dir.path().join("data/ca.crt")
    }

    /// Puts `lines` in front of pg_hba.conf (first match wins) and reloads.
    pub async fn prepend_hba(&self, lines: &[&str]) -> Result<()> {
        let path = self.dir.path().join("data/pg_hba.conf");
        let old = std::fs::read_to_string(&path).map_err(io("reading pg_hba.conf"))?;
        std::fs::write(&path, format!("{}\n{old}", lines.join("\n"))).map_err(io("writing pg_hba.conf"))?;
        let mut conn = self.connect("postgres").await?;
        sqlx::query("SELECT pg_reload_conf()").execute(&mut conn).await?;
        Ok(())
    }

    /// Creates a database (no error if it exists).
    pub async fn create_database(&self, db: &str) -> Result<()> {
        let mut conn = self.connect("postgres").await?;
        let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(db)
            .fetch_one(&mut conn)
            .await?;
        if !exists {
            sqlx::raw_sql(&format!("CREATE DATABASE {}", crate::topology::quote_ident(db))).execute(&mut conn).await?;
        }
        Ok(())
    }

    /// Kills the postmaster with SIGKILL, as a crash would.
    pub async fn kill(&mut self) {
        if let Some(server) = self.child.take() {
            server.kill();
        }
    }

    /// Starts the cluster again on the same data and port.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill().await;
        self.launch().await
    }
}

/// N masters (one database `app` each) and a broker, plus a topology file
/// describing them.
pub struct Bed {
    pub masters: Vec<(String, PgCluster)>,
    pub broker: Arc<KafkaCluster>,
    /// The topology's `topic_prefix`: a bed on the shared cluster has one of its own.
    pub topic_prefix: String,
    pub dir: TempDir,
}

/// Which Kafka a bed runs on.
#[derive(Debug, Clone)]
pub enum BedKafka {
    /// The cluster this test binary shares ([`KafkaCluster::shared`]): for
    /// tests that never kill the broker.
    Shared,
    /// A cluster of the bed's own, which it may kill and restart.
    Own(KafkaOptions),
}

impl BedKafka {
    /// A one-node cluster of the bed's own.
    pub fn own() -> BedKafka {
        BedKafka::Own(KafkaOptions::default())
    }

    /// Three nodes of the bed's own: replication factor 3, `min.insync.replicas = 2`.
    pub fn three_nodes() -> BedKafka {
        BedKafka::Own(KafkaOptions { nodes: 3, ..KafkaOptions::default() })
    }
}

static BEDS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Database name of every master in the bed.
pub const BED_DATABASE: &str = "app";

impl Bed {
    /// Starts `names.len()` masters and a broker concurrently.
    pub async fn start(names: &[&str], kafka: BedKafka) -> Result<Bed> {
        Bed::start_with(names, kafka, Vec::new()).await
    }

    /// Like [`Bed::start`], with extra postgresql.conf lines for every master.
    pub async fn start_with(names: &[&str], kafka: BedKafka, extra_conf: Vec<String>) -> Result<Bed> {
        let dir = temp_dir("mmsync-bed-")?;
        let topic_prefix = match kafka {
            BedKafka::Shared => format!("mmsync-t{}", BEDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)),
            BedKafka::Own(_) => "mmsync".to_string(),
        };
        let broker = async {
            match kafka {
                BedKafka::Shared => KafkaCluster::shared().await,
                BedKafka::Own(opts) => Ok(Arc::new(KafkaCluster::start(opts).await?)),
            }
        };
        let masters = async {
            let mut started = Vec::new();
            for name in names {
                let cluster =
                    PgCluster::start(PgOptions { extra_conf: extra_conf.clone(), ..PgOptions::default() }).await?;
                cluster.create_database(BED_DATABASE).await?;
                started.push((name.to_string(), cluster));
            }
            Ok::<_, BedError>(started)
        };
        let (broker, masters) = tokio::join!(broker, masters);
        Ok(Bed { masters: masters?, broker: broker?, topic_prefix, dir })
    }

    /// Starts one more master, as a new region would bring: empty, with the
    /// bed's database. (Write the topology again to include it.)
    pub async fn add_master(&mut self, name: &str) -> Result<()> {
        let cluster = PgCluster::start(PgOptions::default()).await?;
        cluster.create_database(BED_DATABASE).await?;
        self.masters.push((name.to_string(), cluster));
        Ok(())
    }

    pub fn master(&self, name: &str) -> &PgCluster {
        &self.masters.iter().find(|(n, _)| n == name).expect("a master of this bed").1
    }

    pub fn master_mut(&mut self, name: &str) -> &mut PgCluster {
        &mut self.masters.iter_mut().find(|(n, _)| n == name).expect("a master of this bed").1
    }

    /// Writes a topology for this bed with the given tables and extra `[sync]`
    /// lines, and returns its path.
    pub fn write_topology(&self, tables: &[&str], extra_sync: &str) -> PathBuf {
        self.write_topology_as("topology.toml", tables, extra_sync, &self.broker.address(), "")
    }

    /// Like [`Bed::write_topology`], into file `name` of the bed's folder,
    /// with other brokers (the SASL or TLS listeners, say) and `[kafka.client]` lines.
    pub fn write_topology_as(
        &self,
        name: &str,
        tables: &[&str],
        extra_sync: &str,
        brokers: &str,
        kafka_client: &str,
    ) -> PathBuf {
        let mut text = format!(
            "[kafka]\nbrokers = \"{brokers}\"\ntopic_prefix = \"{}\"\npartitions = 3\nreplication_factor = {}\n\n\
             [kafka.client]\n{kafka_client}\n\n[metrics]\nlisten = \"127.0.0.1:{}\"\n\n",
            self.topic_prefix,
            self.broker.node_count(),
            free_port()
        );
        for (name, cluster) in &self.masters {
            text.push_str(&format!("[[masters]]\nname = \"{name}\"\nurl = \"{}\"\n\n", cluster.url(BED_DATABASE)));
        }
        let tables: Vec<String> = tables.iter().map(|t| format!("{t:?}")).collect();
        text.push_str(&format!("[sync]\ntables = [{}]\n{extra_sync}\n", tables.join(", ")));
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).expect("the bed folder is writable");
        path
    }

    /// The topic of `master`'s changes to `table` (`schema.table`) in this bed.
    pub fn topic(&self, master: &str, table: &str) -> String {
        let table = crate::topology::TableName::parse(table).expect("a valid table name");
        crate::kafka::topic_name(&self.topic_prefix, master, &table)
    }

    /// Runs SQL on every master.
    pub async fn sql_everywhere(&self, sql: &str) -> Result<()> {
        for (_, cluster) in &self.masters {
            let mut conn = cluster.connect(BED_DATABASE).await?;
            sqlx::raw_sql(sql).execute(&mut conn).await?;
        }
        Ok(())
    }
}

/// The `mmsync` binary as a child process, its output in a log file.
pub struct MmsyncProcess {
    child: Child,
    log: PathBuf,
}

impl MmsyncProcess {
    /// Starts `mmsync --topology <topology> <args>`.
    pub fn spawn(
        bin: &Path,
        topology: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        log: PathBuf,
    ) -> Result<MmsyncProcess> {
        let file = std::fs::File::create(&log).map_err(io("creating the mmsync log"))?;
        let child = Command::new(bin)
            .arg("--topology")
            .arg(topology)
            .args(args)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone().map_err(io("log"))?)
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .map_err(io(format!("starting {}", bin.display())))?;
        Ok(MmsyncProcess { child, log })
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_path(&self) -> PathBuf {
        self.log.clone()
    }

    pub fn id(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) with a pid we own and a valid signal number.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
        self.child.wait().await.expect("waiting for mmsync")
    }

    /// Kills with SIGKILL, as a crash would.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }

    /// Waits for the process to exit by itself.
    pub async fn wait(mut self) -> std::process::ExitStatus {
        self.child.wait().await.expect("waiting for mmsync")
    }
}

/// The peak resident memory of process `pid` so far (VmHWM), in KiB; 0 once it is gone.
pub fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// A Prometheus server (Debian's `prometheus` package) scraping the given
/// targets every second, for tests of the metrics and the dashboard.
pub struct Prometheus {
    _dir: TempDir,
    port: u16,
    _child: Child,
}

impl Prometheus {
    pub async fn start(targets: &[std::net::SocketAddr]) -> Result<Prometheus> {
        let bin = which("prometheus").ok_or_else(|| {
            BedError::Setup("prometheus not found; run scripts/setup (it installs Debian's prometheus package)".into())
        })?;
        let dir = temp_dir("mmsync-prom-")?;
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: mmsync\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).map_err(io("writing prometheus.yml"))?;
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).map_err(io("prometheus log"))?;
        let child = Command::new(bin)
            .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io("log"))?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(io("starting prometheus"))?;
        let prometheus = Prometheus { _dir: dir, port, _child: child };
        let start = Instant::now();
        while prometheus.get("/-/ready").await.is_err() {
            if start.elapsed() > START_DEADLINE {
                return Err(BedError::Setup(format!("prometheus did not get ready on port {port}")));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(prometheus)
    }

    async fn get(&self, path: &str) -> std::io::Result<String> {
        http_get(([127, 0, 0, 1], self.port).into(), path).await
    }

    /// Evaluates a PromQL expression now; returns the `data.result` array.
    pub async fn query(&self, expr: &str) -> std::result::Result<Vec<serde_json::Value>, String> {
        let encoded: String = expr
            .bytes()
            .map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") })
            .collect();
        let body = self.get(&format!("/api/v1/query?query={encoded}")).await.map_err(|e| e.to_string())?;
        let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        v["data"]["result"].as_array().cloned().ok_or(body)
    }
}
