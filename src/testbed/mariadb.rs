//! MariaDB for the test bed: a server made with `mariadb-install-db` in a
//! temporary folder (Debian's `mariadb-server`, 10.11), on a free loopback
//! port, run as every server of the bed is ([`super::process`]): killable
//! with SIGKILL and restartable on its data and port, gone with the test.
//!
//! It runs with what a MariaDB master of mmsync needs (the issue's `check`
//! list): the binary log in ROW format with FULL row images and metadata, a
//! server id and GTID domain of its own. The bed's client is the `mariadb`
//! command over the server's socket, as `root` (socket authentication), so
//! the bed needs no MySQL driver.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;
use tokio::process::Command;

use super::process::{start_until_ready, Launch, ServerProcess};
use super::{chown_tree, free_port, io, system_user, temp_dir, BedError, Result};

/// How long a server may take to accept connections (crash recovery included).
const START_DEADLINE: Duration = Duration::from_secs(60);

/// The user mmsync connects as on a bed server.
pub const MMSYNC_USER: &str = "mmsync";
/// A user with privileges on the application's database only.
pub const APP_USER: &str = "app";
/// Both users' password.
const PASSWORD: &str = "bed-secret";

/// A MariaDB server in a temporary folder.
pub struct MariaDb {
    dir: TempDir,
    port: u16,
    server_id: u32,
    owner: Option<(u32, u32)>,
    extra_args: Vec<String>,
    server: Option<ServerProcess>,
}

/// The name of the OS user running this process.
fn os_user() -> String {
    std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| "root".into())
}

/// Where Debian puts a program: `/usr/sbin` for the server, the `PATH` otherwise.
fn program(name: &str) -> Result<PathBuf> {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/bin"] {
        let path = Path::new(dir).join(name);
        if path.exists() {
            return Ok(path);
        }
    }
    Err(BedError::Setup(format!("{name} not found; run scripts/setup (it installs Debian's mariadb-server)")))
}

impl MariaDb {
    /// Makes and starts a server; `server_id` is also its GTID domain.
    pub async fn start(server_id: u32) -> Result<MariaDb> {
        MariaDb::start_with(server_id, &[]).await
    }

    /// Like [`MariaDb::start`], with more server options (after the bed's
    /// own, so they win: `--binlog-row-metadata=MINIMAL` for a broken master).
    pub async fn start_with(server_id: u32, extra_args: &[&str]) -> Result<MariaDb> {
        let owner = system_user("mysql", "MariaDB", "mariadb-server")?;
        let dir = temp_dir("mmsync-mariadb-")?;
        chown_tree(dir.path(), owner)?;
        // A temporary folder of its own: servers installed at once would
        // otherwise share /tmp's temporary table names and trip over each other.
        let tmp = dir.path().join("tmp");
        std::fs::create_dir_all(&tmp).map_err(io("making the server's tmp folder"))?;
        chown_tree(&tmp, owner)?;
        let mut install = Command::new(program("mariadb-install-db")?);
        install
            .env("TMPDIR", &tmp)
            .arg("--no-defaults")
            .arg(format!("--datadir={}", dir.path().join("data").display()))
            .args(["--auth-root-authentication-method=socket", "--skip-test-db"])
            // root authenticates by the socket's peer: the OS user running the bed.
            .arg(format!("--auth-root-socket-user={}", if owner.is_some() { "root".into() } else { os_user() }))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        if let Some((uid, gid)) = owner {
            install.uid(uid).gid(gid);
        }
        let out = install.output().await.map_err(io("running mariadb-install-db"))?;
        if !out.status.success() {
            return Err(BedError::Setup(format!(
                "mariadb-install-db failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let extra_args = extra_args.iter().map(|a| a.to_string()).collect();
        let mut db = MariaDb { dir, port: free_port(), server_id, owner, extra_args, server: None };
        db.launch().await?;
        Ok(db)
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("mariadb.sock")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("mariadb.log")
    }

    /// Starts the server on its data and waits until it answers.
    async fn launch(&mut self) -> Result<()> {
        let d = self.dir.path();
        std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).map_err(io("mariadb log"))?;
        chown_tree(&self.log_path(), self.owner)?;
        let launch = || {
            let mut launch =
                Launch::new(format!("mariadb on port {}", self.port), program("mariadbd")?, self.log_path())
                    .args([
                        "--no-defaults".to_string(),
                        format!("--datadir={}", d.join("data").display()),
                        format!("--port={}", self.port),
                        "--bind-address=127.0.0.1".into(),
                        format!("--socket={}", self.socket().display()),
                        format!("--pid-file={}", d.join("mariadb.pid").display()),
                        format!("--tmpdir={}", d.join("tmp").display()),
                        format!("--log-bin={}", d.join("data/binlog").display()),
                        "--binlog-format=ROW".into(),
                        "--binlog-row-image=FULL".into(),
                        "--binlog-row-metadata=FULL".into(),
                        format!("--server-id={}", self.server_id),
                        format!("--gtid-domain-id={}", self.server_id),
                        "--skip-name-resolve".into(),
                        "--innodb-buffer-pool-size=64M".into(),
                        // Process kills are what the tests do, not OS crashes.
                        "--innodb-flush-log-at-trx-commit=2".into(),
                        "--sync-binlog=0".into(),
                        // Triggers may then be created without SUPER (the README's setup).
                        "--log-bin-trust-function-creators=1".into(),
                    ])
                    .args(self.extra_args.clone());
            launch.user = self.owner;
            launch.remove_after = Some(d.to_path_buf());
            Ok(launch)
        };
        let ready = || async { self.sql("SELECT 1").await.is_ok() };
        let server = start_until_ready(launch, ready, START_DEADLINE, &self.log_path()).await?;
        self.server = Some(server);
        Ok(())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Makes the server a master of `masters` at `place` (1-based) for
    /// mmsync: database `db`, mmsync's user ([`MMSYNC_USER`]) with the
    /// privileges the README lists and no more, an application user
    /// ([`APP_USER`]) with privileges on `db` only, and ids interleaved as
    /// `check` asks.
    pub async fn prepare_master(&self, db: &str, masters: usize, place: usize) -> Result<()> {
        self.sql(&format!(
            "CREATE DATABASE IF NOT EXISTS `{db}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;
             CREATE USER IF NOT EXISTS '{MMSYNC_USER}'@'%' IDENTIFIED BY '{PASSWORD}';
             GRANT REPLICATION SLAVE, BINLOG MONITOR ON *.* TO '{MMSYNC_USER}'@'%';
             GRANT SELECT, INSERT, UPDATE, DELETE, ALTER, TRIGGER ON `{db}`.* TO '{MMSYNC_USER}'@'%';
             GRANT ALL PRIVILEGES ON mmsync.* TO '{MMSYNC_USER}'@'%';
             CREATE USER IF NOT EXISTS '{APP_USER}'@'%' IDENTIFIED BY '{PASSWORD}';
             GRANT ALL PRIVILEGES ON `{db}`.* TO '{APP_USER}'@'%';
             SET GLOBAL auto_increment_increment = {masters};
             SET GLOBAL auto_increment_offset = {place};"
        ))
        .await
        .map(|_| ())
    }

    /// Makes this server a replica of `source` by MariaDB's own
    /// replication (GTID, `slave_pos`), from `source`'s position `gtid_pos`
    /// on; not started (`START SLAVE`).
    pub async fn replicate_from(&self, source: &MariaDb, gtid_pos: &str) -> Result<()> {
        self.sql(&format!(
            "SET GLOBAL gtid_slave_pos = '{gtid_pos}';
             CHANGE MASTER TO MASTER_HOST = '127.0.0.1', MASTER_PORT = {}, MASTER_USER = '{MMSYNC_USER}',
                 MASTER_PASSWORD = '{PASSWORD}', MASTER_USE_GTID = slave_pos",
            source.port
        ))
        .await
        .map(|_| ())
    }

    /// The URL mmsync connects to `db` with, as [`MMSYNC_USER`].
    pub fn url(&self, db: &str) -> String {
        format!("mariadb://{MMSYNC_USER}:{PASSWORD}@127.0.0.1:{}/{db}", self.port)
    }

    /// The URL an application connects to `db` with, as [`APP_USER`].
    pub fn app_url(&self, db: &str) -> String {
        format!("mysql://{APP_USER}:{PASSWORD}@127.0.0.1:{}/{db}", self.port)
    }

    /// Runs SQL as root over the server's socket; returns what it printed
    /// (tab-separated rows, no header).
    pub async fn sql(&self, sql: &str) -> Result<String> {
        let out = Command::new(program("mariadb")?)
            .arg("--no-defaults")
            .arg(format!("--socket={}", self.socket().display()))
            .args(["-u", "root", "--batch", "--skip-column-names", "-e", sql])
            .output()
            .await
            .map_err(io("running mariadb"))?;
        if !out.status.success() {
            return Err(BedError::Setup(format!("mariadb: {sql}: {}", String::from_utf8_lossy(&out.stderr).trim())));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Kills the server with SIGKILL, as a crash would.
    pub async fn kill(&mut self) {
        if let Some(server) = self.server.take() {
            server.kill();
        }
    }

    /// Starts the server again on the same data and port.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill().await;
        self.launch().await
    }
}
