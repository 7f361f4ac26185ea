//! Progress of a long copy (`join`, `adopt`): a bar redrawn in place when
//! standard error is a terminal, and otherwise (a log file, a CI job) a log
//! line every few seconds, both with rows/s and the time left.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// How often the bar is redrawn, and a log line written.
const REDRAW: Duration = Duration::from_millis(100);
const LOG_EVERY: Duration = Duration::from_secs(2);

pub struct Progress {
    what: String,
    terminal: bool,
    /// The item being worked on, when it started, and its count then (a
    /// resumed copy does not count what an earlier run did in its rate).
    item: Option<(String, Instant, u64)>,
    last: Option<Instant>,
}

impl Progress {
    /// `what` starts each line: "joining jeju from seoul", say.
    pub fn new(what: impl Into<String>) -> Progress {
        Progress { what: what.into(), terminal: std::io::stderr().is_terminal(), item: None, last: None }
    }

    /// `done` of `total` rows of `item`.
    pub fn update(&mut self, item: &str, done: u64, total: u64) {
        if self.item.as_ref().is_none_or(|(i, _, _)| i != item) {
            self.finish();
            self.item = Some((item.to_string(), Instant::now(), done));
            self.last = None;
        }
        let (_, started, first) = self.item.as_ref().expect("set above");
        let finished = done >= total;
        let every = if self.terminal { REDRAW } else { LOG_EVERY };
        if !finished && self.last.is_some_and(|l| l.elapsed() < every) {
            return;
        }
        self.last = Some(Instant::now());
        let seconds = started.elapsed().as_secs_f64();
        let rate = done.saturating_sub(*first) as f64 / seconds.max(0.001);
        let left = if rate > 0.0 { total.saturating_sub(done) as f64 / rate } else { f64::NAN };
        let line = describe(done, total, rate, left);
        if self.terminal {
            let share = if total == 0 { 1.0 } else { (done as f64 / total as f64).min(1.0) };
            let filled = (share * 30.0).round() as usize;
            let bar = format!("{}{}", "#".repeat(filled), ".".repeat(30 - filled));
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K{} {item} [{bar}] {:>3.0}% {line}", self.what, share * 100.0);
            let _ = err.flush();
        } else {
            tracing::info!("{} {item}: {line}", self.what);
        }
    }

    /// Ends the bar's line (nothing to do for log lines).
    pub fn finish(&mut self) {
        if self.terminal && self.item.take().is_some() {
            eprintln!();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

/// "123456 of 270000 rows, 69330 rows/s, 2 s left".
fn describe(done: u64, total: u64, rate: f64, left: f64) -> String {
    let left = if left.is_finite() { format!("{} left", duration(left)) } else { "time left unknown".into() };
    format!("{done} of {total} rows, {rate:.0} rows/s, {left}")
}

fn duration(seconds: f64) -> String {
    let s = seconds.round() as u64;
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_progress_line_says_rows_rate_and_time_left() {
        assert_eq!(super::describe(500, 1500, 100.0, 10.0), "500 of 1500 rows, 100 rows/s, 10 s left");
        assert_eq!(super::describe(0, 10, 0.0, f64::NAN), "0 of 10 rows, 0 rows/s, time left unknown");
        assert_eq!(super::duration(3725.0), "1 h 2 min");
        assert_eq!(super::duration(125.0), "2 min 5 s");
    }
}
