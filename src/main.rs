//! The `mmsync` command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mmsync::topology::Topology;

/// Exit code when a check fails or masters differ.
const EXIT_FAILED: u8 = 1;
/// Exit code for bad usage or a bad topology file (clap uses 2 as well).
const EXIT_USAGE: u8 = 2;

#[derive(Parser)]
#[command(
    name = "mmsync",
    version,
    about = "Keep two or more PostgreSQL and MariaDB masters in sync in both directions through Kafka.",
    long_about = "Keep two or more PostgreSQL and MariaDB masters in sync in both directions through Kafka.\n\n\
Every master takes writes. Each master's changes are read from its log (PostgreSQL: logical decoding, \
pgoutput; MariaDB: the binlog, read as a replica), produced to Kafka, and applied to every other master \
by last-writer-wins on a per-row version stamp. Changes that arrived by replication are never captured \
again. A url of mariadb:// or mysql:// makes a MariaDB master; adopt, join and remove work on \
PostgreSQL masters only so far.\n\n\
Typical use: `mmsync check`, then `mmsync init` once (and again after adding tables), then `mmsync run`.\n\n\
Exit codes: 0 ok, 1 a failed check or a difference, 2 bad usage or a bad topology file."
)]
struct Cli {
    /// The topology file: masters, tables and Kafka.
    #[arg(long, global = true, env = "MMSYNC_TOPOLOGY", default_value = mmsync::topology::DEFAULT_PATH)]
    topology: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the topology and every master's prerequisites (reachable,
    /// wal_level = logical and free replication slots on PostgreSQL, a ROW
    /// binlog with full images and metadata and interleaved auto_increment
    /// on MariaDB, tables with primary keys, carriable column types, the
    /// same values on both kinds in a mixed mesh) and that the Kafka brokers answer. Reports every
    /// problem with its fix; exits 1 if there is any. Also warns (without
    /// failing) when a master's tombstones are held back past
    /// [sync] tombstones_keep_seconds by a master that is away.
    Check,
    /// Install what sync needs on every master: mmsync's schema (a database
    /// on MariaDB), an origin and a version column and triggers on every
    /// synced table, a publication and a replication slot (PostgreSQL) or the
    /// first binlog position (MariaDB), interleaved integer sequences, and
    /// the Kafka topics.
    /// Idempotent: run it again after adding tables to [sync] tables.
    Init,
    /// Run the sync: a source and a sink for every master, until SIGINT or
    /// SIGTERM (current batches finish and positions are stored first).
    Run,
    /// Bring a master that joins the mesh (or is rebuilt after a loss) up to
    /// date from another: its rows and tombstones, read in one snapshot, are
    /// applied by last-writer-wins, and the new master's sinks will go on from
    /// the Kafka positions that snapshot stands for. Add the master to the
    /// topology and run `mmsync init` first; applications may keep writing
    /// everywhere, but `mmsync run` must not run meanwhile. Then `mmsync run`.
    /// Rows stream with COPY; progress shows as a bar on a terminal and as log
    /// lines otherwise. A join that was stopped goes on where it stopped when run
    /// again with the same --from.
    Join {
        /// The master that joins.
        #[arg(long)]
        master: String,
        /// The master to copy from.
        #[arg(long)]
        from: String,
        /// Rows per transaction on the joining master (a range of the source
        /// table's blocks holding about this many; streamed, not held in memory).
        #[arg(long, default_value_t = 10_000)]
        batch: u64,
    },
    /// Take a master out of the mesh: once everything it wrote has reached
    /// the others (refused otherwise, with what is missing), drop its slot and
    /// publication, forget its heartbeat on the other masters (tombstone
    /// retention and `status` stop waiting for it), and keep or delete its
    /// topics (and the offsets in them). Its database keeps its rows. Stop `mmsync run`
    /// first, run this while topology.toml still names the master, then
    /// delete its [[masters]] entry and run `mmsync init` (which re-interleaves
    /// the other masters' sequences).
    Remove {
        /// The master that leaves.
        #[arg(long)]
        master: String,
        /// Also delete its topics from Kafka (kept by default).
        #[arg(long)]
        delete_topics: bool,
        /// Remove it even though changes of it have not reached the others
        /// (they are lost), or it does not answer (its slot then stays on it).
        #[arg(long)]
        force: bool,
    },
    /// Adopt the rows the synced tables held before `mmsync init`: stamp them
    /// on every master, in batches, with their master as origin and a version
    /// by one rule, so that they reach the other masters and every master
    /// settles keys they hold differently alike (each losing row is logged in
    /// mmsync.conflicts on the master whose row won). Applications may keep
    /// writing; `mmsync run` must not run meanwhile (adopt holds its locks).
    /// Run it after `init` and before `run`; run it again if it was stopped.
    Adopt {
        /// Where masters hold the same key, this master's row wins (the others'
        /// rows are settled by master name).
        #[arg(long, required_unless_present = "version_column", conflicts_with = "version_column")]
        seed: Option<String>,
        /// Instead of a seed: a timestamp column (such as updated_at) every
        /// synced table has; the most recently updated row of a key wins.
        #[arg(long)]
        version_column: Option<String>,
        /// Rows stamped per transaction.
        #[arg(long, default_value_t = 10_000)]
        batch: u64,
    },
    /// Show, per link (source -> target): the source slot's position and the
    /// WAL it retains, the offsets applied on the target, the records waiting
    /// in Kafka, and the lag by the source's latest heartbeat on the target;
    /// then, per master, the tombstones it keeps and what holds their
    /// retention back. Reads the masters and Kafka directly; exits 1 if
    /// something did not answer.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List or re-apply the records a master could not apply (kept in its
    /// mmsync.dead_letters table with the reason and the whole record).
    DeadLetters {
        #[command(subcommand)]
        action: DeadLetterAction,
        /// Only this master (all masters by default).
        #[arg(long)]
        master: Option<String>,
    },
    /// Compare the synced tables across all masters, each read in one
    /// consistent snapshot (nothing is written): row counts, then a hash per
    /// bucket of primary keys, narrowed down to the keys that differ, printed
    /// with each master's version and origin. Exit 0 identical, 1 different.
    /// Run it when writes are quiet: rows still in flight show as differences.
    /// With a MariaDB master in the topology, rows are compared by their
    /// (version, origin) per key, since their text differs between the kinds.
    Verify {
        /// Only this table (schema.table).
        #[arg(long)]
        table: Option<String>,
        /// Print at most this many differing keys per table.
        #[arg(long, default_value_t = 20)]
        max_keys: usize,
    },
}

#[derive(Subcommand)]
enum DeadLetterAction {
    /// Print every dead letter not yet re-applied: id, when, where from, why.
    List,
    /// Apply the dead letters again by last-writer-wins (after fixing the
    /// schema, say). Those that apply are marked retried; the others stay with
    /// their new reason, and the command exits 1.
    Retry,
}

async fn join(topology: &Topology, master: &str, from: &str, batch: u64) -> ExitCode {
    let mut bar = mmsync::progress::Progress::new(format!("joining {master} from {from}:"));
    let progress = |table: &mmsync::topology::TableName, done: u64, total: u64| {
        bar.update(&table.to_string(), done, total);
    };
    let result = mmsync::join::join(topology, master, from, batch.max(1), progress).await;
    bar.finish();
    match result {
        Ok(report) => {
            let mut refused = 0;
            for c in report {
                let went_on = if c.resumed_from > 0 {
                    format!(", going on from row {} where a stopped join had got to", c.resumed_from)
                } else {
                    String::new()
                };
                println!(
                    "{}: {} rows and {} tombstones copied from {from} in {:.1} s ({:.0} rows/s{went_on}){}",
                    c.table,
                    c.rows,
                    c.tombstones,
                    c.seconds,
                    (c.rows - c.resumed_from) as f64 / c.seconds.max(0.001),
                    if c.refused > 0 { format!(", {} refused (see dead letters)", c.refused) } else { String::new() }
                );
                refused += c.refused;
            }
            println!("{master} joined; now `mmsync run`, and `mmsync verify` once it has caught up");
            if refused > 0 {
                ExitCode::from(EXIT_FAILED)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("join failed: {e}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

async fn adopt(topology: &Topology, seed: Option<String>, version_column: Option<String>, batch: u64) -> ExitCode {
    let rule = match (seed, version_column) {
        (Some(seed), _) => mmsync::adopt::Rule::Seed(seed),
        (None, Some(column)) => mmsync::adopt::Rule::VersionColumn(column),
        (None, None) => unreachable!("clap requires one"),
    };
    let mut bar = mmsync::progress::Progress::new("adopting");
    let progress = |master: &str, table: &mmsync::topology::TableName, done: u64, total: u64| {
        bar.update(&format!("{master} {table}"), done, total);
    };
    let result = mmsync::adopt::adopt(topology, &rule, batch.max(1), progress).await;
    bar.finish();
    match result {
        Ok(report) => {
            for a in report {
                println!("{} {}: {} rows adopted in {:.1} s", a.master, a.table, a.rows, a.seconds);
            }
            println!("adopted; now `mmsync run`, and `mmsync verify` once it has caught up");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("adopt failed: {e}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rdkafka=warn,sqlx=warn,mysql_async=warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colours on a terminal only: not in log files or the journal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let topology = match Topology::load(&cli.topology) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // MariaDB masters take part in check, init and run so far.
    let command = match &cli.command {
        Command::Check | Command::Init | Command::Run => None,
        Command::Adopt { .. } => Some("adopt"),
        Command::Join { .. } => Some("join"),
        Command::Remove { .. } => Some("remove"),
        Command::DeadLetters { .. } => None,
        Command::Verify { .. } => None,
        Command::Status { .. } => None,
    };
    if let Some(command) = command {
        if let Some(Err(e)) = topology.masters.iter().map(|m| m.postgres_only(command)).find(|r| r.is_err()) {
            eprintln!("{e}");
            return ExitCode::from(EXIT_USAGE);
        }
    }
    let runtime = tokio::runtime::Runtime::new().expect("starting the tokio runtime");
    runtime.block_on(async move {
        match cli.command {
            Command::Check => check(&topology).await,
            Command::Init => init(&topology).await,
            Command::Run => run(topology).await,
            Command::Adopt { seed, version_column, batch } => adopt(&topology, seed, version_column, batch).await,
            Command::Join { master, from, batch } => join(&topology, &master, &from, batch).await,
            Command::Remove { master, delete_topics, force } => {
                match mmsync::remove::remove(&topology, &master, force, delete_topics).await {
                    Ok(removed) => {
                        for line in removed.lines {
                            println!("remove: {line}");
                        }
                        println!(
                            "remove: {master} left the mesh; delete its [[masters]] entry from the topology, then \
                             run `mmsync init` and `mmsync run`"
                        );
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("remove failed: {e}");
                        ExitCode::from(EXIT_FAILED)
                    }
                }
            }
            Command::DeadLetters { action, master } => dead_letters(&topology, action, master.as_deref()).await,
            Command::Verify { table, max_keys } => verify(&topology, table.as_deref(), max_keys).await,
            Command::Status { json } => {
                let links = mmsync::status::status(&topology).await;
                let tombstones = mmsync::status::tombstones(&topology).await;
                if json {
                    let all = serde_json::json!({ "links": links, "tombstones": tombstones });
                    println!("{}", serde_json::to_string_pretty(&all).expect("plain data"));
                } else {
                    print!("{}", mmsync::status::table(&links));
                    println!();
                    print!("{}", mmsync::status::tombstones_table(&tombstones, topology.sync.tombstones_keep));
                }
                if links.iter().any(|l| !l.problems.is_empty()) || tombstones.iter().any(|t| t.problem.is_some()) {
                    ExitCode::from(EXIT_FAILED)
                } else {
                    ExitCode::SUCCESS
                }
            }
        }
    })
}

async fn check(topology: &Topology) -> ExitCode {
    let mut ok = Vec::new();
    let problems = mmsync::postgres::schema::check(topology, &mut ok).await;
    for line in ok {
        println!("{line}");
    }
    for p in &problems {
        println!("problem: {p}");
    }
    if problems.is_empty() {
        // Not a problem of the setup, but worth knowing: a master away, or a
        // link stuck, holds every other master's tombstones.
        for t in mmsync::status::tombstones(topology).await {
            if let Some(line) = mmsync::status::held_back(&t, topology.sync.tombstones_keep) {
                println!("warning: master {:?}: {line}", t.master);
            }
        }
    }
    if problems.is_empty() {
        println!("check passed");
        ExitCode::SUCCESS
    } else {
        println!("check failed: {} problem(s)", problems.len());
        ExitCode::from(EXIT_FAILED)
    }
}

async fn init(topology: &Topology) -> ExitCode {
    match mmsync::postgres::schema::init(topology).await {
        Ok(done) if done.is_empty() => {
            println!("init: everything was already in place");
            ExitCode::SUCCESS
        }
        Ok(done) => {
            for line in done {
                println!("init: {line}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("init failed: {e}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

async fn dead_letters(topology: &Topology, action: DeadLetterAction, only: Option<&str>) -> ExitCode {
    if let Some(name) = only.filter(|n| topology.master(n).is_none()) {
        eprintln!("--master: no master {name:?} in the topology");
        return ExitCode::from(EXIT_USAGE);
    }
    let mut clean = true;
    for master in topology.masters.iter().filter(|m| only.is_none_or(|o| o == m.name)) {
        let result = match action {
            DeadLetterAction::List => list_dead_letters(master).await,
            DeadLetterAction::Retry => mmsync::sink::retry_dead_letters(topology, master).await.map(|r| {
                println!("master {:?}: {} dead letter(s) applied", master.name, r.applied);
                for (id, reason) in &r.still_dead {
                    println!("master {:?}: dead letter {id} still fails: {reason}", master.name);
                }
                r.still_dead.is_empty()
            }),
        };
        match result {
            Ok(ok) => clean &= ok,
            Err(e) => {
                eprintln!("{e}");
                clean = false;
            }
        }
    }
    if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    }
}

/// Prints a master's pending dead letters; `Ok(true)` when there are none.
async fn list_dead_letters(master: &mmsync::topology::Master) -> mmsync::error::Result<bool> {
    let rows = if master.database() == mmsync::topology::Database::Mariadb {
        mmsync::mariadb::apply::pending_dead_letters(master).await?
    } else {
        postgres_dead_letters(master).await?
    };
    for (id, at, topic, partition, offset, reason) in &rows {
        println!("master {:?}: #{id} {at} {topic}[{partition}]@{offset}: {reason}", master.name);
    }
    if rows.is_empty() {
        println!("master {:?}: no dead letters", master.name);
    }
    Ok(rows.is_empty())
}

/// A PostgreSQL master's pending dead letters.
async fn postgres_dead_letters(
    master: &mmsync::topology::Master,
) -> mmsync::error::Result<Vec<(i64, String, String, i32, i64, String)>> {
    let mut conn = mmsync::postgres::db::connect(master).await?;
    let rows: Vec<(i64, String, String, i32, i64, String)> = sqlx::query_as(
        "SELECT id, to_char(logged_at, 'YYYY-MM-DD HH24:MI:SS'), topic, partition, kafka_offset, reason
         FROM mmsync.dead_letters WHERE retried_at IS NULL ORDER BY id",
    )
    .fetch_all(&mut conn)
    .await
    .map_err(mmsync::error::Error::db(&master.name, "reading dead letters"))?;
    Ok(rows)
}

async fn verify(topology: &Topology, table: Option<&str>, max_keys: usize) -> ExitCode {
    let only = match table.map(mmsync::topology::TableName::parse).transpose() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("--table: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let reports = match mmsync::verify::verify(topology, only.as_ref(), max_keys).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("verify failed: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let mut identical = true;
    for r in &reports {
        let rows: Vec<String> = r.rows.iter().map(|(m, n)| format!("{m} {n}")).collect();
        if r.identical() {
            println!("{}: identical (rows: {})", r.table, rows.join(", "));
            continue;
        }
        identical = false;
        println!("{}: DIFFERENT, {} key(s) differ (rows: {})", r.table, r.differing_keys, rows.join(", "));
        for d in &r.differences {
            let held: Vec<String> = d
                .masters
                .iter()
                .map(|(m, h)| match h {
                    Some((v, o)) => format!("{m}: version {v} origin {o:?}"),
                    None => format!("{m}: missing"),
                })
                .collect();
            println!("  {}  {}", d.key, held.join("; "));
        }
        if r.differing_keys > r.differences.len() {
            println!("  ... and {} more", r.differing_keys - r.differences.len());
        }
    }
    if identical {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    }
}

async fn run(topology: Topology) -> ExitCode {
    if let Err(e) = mmsync::metrics::install(topology.metrics_listen) {
        eprintln!("{e}");
        return ExitCode::from(EXIT_USAGE);
    }
    match mmsync::run::run(topology, mmsync::run::signal()).await {
        Ok(()) => {
            tracing::info!("stopped cleanly");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("mmsync stopped: {e}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}
