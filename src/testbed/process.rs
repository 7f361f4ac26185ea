//! One way to run every server of the bed (a PostgreSQL postmaster, a Kafka
//! node, a Kafka Connect worker; MariaDB next): under a small `sh` wrapper
//! that holds a pipe from this process, the lifeline.
//!
//! The wrapper starts the server with its output appended to a log, says
//! the server's pid, and exits when the server does, with its status, so a
//! server that dies by itself is seen. When the lifeline closes (this
//! process dropped the server, or ended, however it ended: even a SIGKILL
//! closes the pipe), the wrapper kills the server with SIGKILL; then it
//! removes the folder it was given, if any (a server killed on purpose, to
//! be restarted on its data, keeps it). No server, and no server's folder,
//! outlives the test binary that started it.

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};

use std::time::{Duration, Instant};

use super::{io, log_errors, log_tail, BedError, Result};

/// `$1` is the flag file the watcher leaves when the lifeline closed: only
/// then is the folder removed (a server killed to be restarted keeps it).
const WRAPPER: &str = r#"exec 3<&0 </dev/null
flag=$1; shift
"$@" >>"$MMSYNC_SERVER_LOG" 2>&1 &
server=$!
echo $server
{ read -r _ <&3; : >"$flag"; kill -9 $server 2>/dev/null; } &
watcher=$!
wait $server
status=$?
kill $watcher 2>/dev/null
wait $watcher 2>/dev/null
if [ -e "$flag" ] && [ -n "$MMSYNC_REMOVE" ]; then rm -rf "$MMSYNC_REMOVE"; fi
rm -f "$flag"
exit $status"#;

/// How to start a server.
pub struct Launch {
    /// For messages: "postgres on port 5433", "Kafka node 1".
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// Standard output and error are appended here.
    pub log: PathBuf,
    /// Run as this user and group (PostgreSQL refuses to run as root).
    pub user: Option<(u32, u32)>,
    /// Removed when the lifeline closes (the test process dropped the server
    /// or ended), once the server is dead; not when it is killed to be
    /// restarted, nor when it dies by itself.
    pub remove_after: Option<PathBuf>,
}

impl Launch {
    pub fn new(name: impl Into<String>, program: impl AsRef<Path>, log: impl AsRef<Path>) -> Launch {
        Launch {
            name: name.into(),
            program: program.as_ref().to_path_buf(),
            args: Vec::new(),
            log: log.as_ref().to_path_buf(),
            user: None,
            remove_after: None,
        }
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, args: I) -> Launch {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }
}

/// A running server under its wrapper.
pub struct ServerProcess {
    wrapper: Child,
    /// Held open: the wrapper kills the server when this closes.
    lifeline: Option<ChildStdin>,
    pid: libc::pid_t,
}

impl ServerProcess {
    /// Starts the server; returns once the wrapper said its pid (the server
    /// may not accept connections yet: each kind of server waits for that
    /// its own way).
    pub fn spawn(launch: Launch) -> Result<ServerProcess> {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(WRAPPER)
            .arg(format!("mmsync-bed-{}", launch.name.replace(' ', "-")))
            .arg(std::env::temp_dir().join(format!("mmsync-lifeline-{}-{}", std::process::id(), unique())))
            .arg(&launch.program)
            .args(&launch.args)
            .env("MMSYNC_SERVER_LOG", &launch.log)
            .env("MMSYNC_REMOVE", launch.remove_after.as_deref().unwrap_or(Path::new("")))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if let Some((uid, gid)) = launch.user {
            cmd.uid(uid).gid(gid);
        }
        let mut wrapper = cmd.spawn().map_err(io(format!("starting the wrapper (sh) of {}", launch.name)))?;
        let mut line = String::new();
        BufReader::new(wrapper.stdout.take().expect("piped"))
            .read_line(&mut line)
            .map_err(io(format!("reading the pid of {}", launch.name)))?;
        let pid = line
            .trim()
            .parse()
            .map_err(|_| BedError::Setup(format!("the wrapper of {} said {line:?}, not a pid", launch.name)))?;
        let lifeline = wrapper.stdin.take();
        Ok(ServerProcess { wrapper, lifeline, pid })
    }

    /// The server's pid.
    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// Whether the server has exited (its wrapper exits with it).
    pub fn exited(&mut self) -> bool {
        !matches!(self.wrapper.try_wait(), Ok(None))
    }

    /// Sends `signal` to the server, while it runs.
    pub fn signal(&mut self, signal: libc::c_int) {
        if !self.exited() {
            // SAFETY: kill(2) with a valid signal. The server is the
            // wrapper's child and only the wrapper reaps it, exiting right
            // after: while the wrapper runs, the pid is the server's.
            unsafe { libc::kill(self.pid, signal) };
        }
    }

    /// Kills the server with SIGKILL, as a crash would, and waits until it
    /// is gone. Its folder stays (it is restarted on it): the lifeline
    /// closes only once the wrapper has seen the server die.
    pub fn kill(mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.wrapper.wait();
        drop(self.lifeline.take());
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // The wrapper kills the server when the lifeline closes, and cleans up.
        drop(self.lifeline.take());
    }
}

/// A number no other server of this process got.
fn unique() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Starts a server and waits until `ready` says it answers. A server that
/// exits first is started again (the leftovers of one killed a moment ago
/// may hold its port or shared memory for a while), until `deadline`; then
/// the error quotes the end of `log`.
pub async fn start_until_ready<F, Fut>(
    launch: impl Fn() -> Result<Launch>,
    ready: F,
    deadline: Duration,
    log: &Path,
) -> Result<ServerProcess>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        let launch = launch()?;
        let name = launch.name.clone();
        let mut server = ServerProcess::spawn(launch)?;
        while !server.exited() {
            if ready().await {
                return Ok(server);
            }
            if start.elapsed() > deadline {
                server.kill();
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if start.elapsed() > deadline {
            return Err(BedError::NotStarted {
                what: name,
                secs: deadline.as_secs(),
                log: log.display().to_string(),
                tail: format!("{}{}", log_errors(log), log_tail(log)),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
