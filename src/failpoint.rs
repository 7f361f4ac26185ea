//! Failpoints: places where a test makes mmsync crash on purpose, to prove
//! what a crash at exactly that moment costs. They exist only in debug builds
//! (what the tests run); a release build compiles every check to `false`, so
//! no environment can reach them in production.
//!
//! A test arms them with `MMSYNC_FAILPOINTS=name[,name…]`.

/// After Kafka acknowledged a round holding changes of the application's
/// tables (not only mmsync's heartbeat) and before the slot is told it may
/// move past them.
pub const CRASH_AFTER_PRODUCE: &str = "crash-after-produce";

/// Whether the failpoint `name` is armed in this process.
#[cfg(debug_assertions)]
pub fn armed(name: &str) -> bool {
    std::env::var("MMSYNC_FAILPOINTS").is_ok_and(|v| v.split(',').any(|f| f.trim() == name))
}

/// Whether the failpoint `name` is armed: never, in a release build.
#[cfg(not(debug_assertions))]
pub fn armed(_name: &str) -> bool {
    false
}

/// Dies at once with SIGKILL, as a crash would: no destructor, no flush.
pub fn crash(name: &str) -> ! {
    tracing::warn!("failpoint {name}: killing mmsync");
    // SAFETY: kill(2) on our own pid with a valid signal.
    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    unreachable!("SIGKILL does not return")
}
