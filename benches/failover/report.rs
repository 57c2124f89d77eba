//! Statistics of the measured times, and the formatting of the benchmark documents.

use std::fmt::{Display, Write as _};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use chrono::{DateTime, Utc};

use super::FailoverArgs;
use super::machine::Machine;
use super::markdown::Table;

#[derive(Clone, Copy, Debug)]
pub struct Stats {
    median: Duration,
    p99: Duration,
    min: Duration,
    max: Duration,
}

impl Stats {
    /// Nearest-rank percentiles.
    pub fn of(mut samples: Vec<Duration>) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let rank = |q: f64| {
            let r = (q * samples.len() as f64).ceil() as usize;
            samples[r.clamp(1, samples.len()) - 1]
        };
        Some(Self {
            median: rank(0.50),
            p99: rank(0.99),
            min: samples[0],
            max: samples[samples.len() - 1],
        })
    }
}

/// A table of timing statistics, one row per measured step, from `origin` on.
pub fn write_stats_table(w: &mut String, origin: &str, rows: &[(&str, Option<Stats>)]) {
    let titles = format!("from {origin} to | median | p99 | min | max");
    let mut table = Table::new(w, "lrrrr", &titles);
    for (label, stats) in rows {
        if let Some(s) = stats {
            let [median, p99, min, max] = [s.median, s.p99, s.min, s.max].map(fmt_dur);
            table.row(&[label as &dyn Display, &median, &p99, &min, &max]);
        }
    }
}

/// A failover run as its section describes it, besides its trials.
pub struct RunInfo<'a> {
    pub args: &'a FailoverArgs,
    pub machine: &'a Machine,
    /// When it started, and how long it took.
    pub started: DateTime<Utc>,
    pub elapsed: Duration,
}

/// The heading of a failover section and its first lines: the command that wrote it (with
/// `--grace-seconds` where `grace` is given), when it ran and how many trials, and the
/// machine.
pub fn section_head(run: &RunInfo, grace: Option<i64>, trials: usize) -> (String, String) {
    let (args, started) = (run.args, run.started);
    let (mode, t) = (args.mode.flag(), args.timing);
    let heading = format!(
        "## `--mode {mode}`, {}{}",
        t.label(),
        grace.map_or_else(String::new, |g| format!(", grace {g} s"))
    );
    let mut w = String::new();
    let _ = writeln!(
        w,
        "- **Command:** `cargo bench --bench failover -- failover --mode {mode} --trials {} {}{} --write`",
        args.trials,
        t.flags(),
        grace.map_or_else(String::new, |g| format!(" --grace-seconds {g}"))
    );
    let _ = writeln!(
        w,
        "- **Date:** {} ({} trial{}, {:.0} s in all).",
        started.format("%Y-%m-%d %H:%M UTC"),
        trials,
        if trials == 1 { "" } else { "s" },
        run.elapsed.as_secs_f64()
    );
    run.machine.describe(&mut w);
    (heading, w)
}

pub fn fmt_dur(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms < 1_000.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{:.2} s", ms / 1e3)
    }
}

pub fn fmt_rate(r: f64) -> String {
    if r >= 100.0 {
        format!("{r:.0}")
    } else if r >= 10.0 {
        format!("{r:.1}")
    } else {
        format!("{r:.2}")
    }
}

/// `t - t0` as a non-negative duration.
pub fn since(t0: DateTime<Utc>, t: DateTime<Utc>, what: &str) -> Result<Duration> {
    (t - t0)
        .to_std()
        .map_err(|_| anyhow!("{what} at {t} is before the signal at {t0}"))
}

/// Replaces the `## heading` section of a generated document, or appends it.
pub fn write_section(path: &Path, preamble: &str, heading: &str, section: &str) -> Result<()> {
    let existing = std::fs::read_to_string(path).unwrap_or_default();
    let mut sections: Vec<String> = Vec::new();
    for line in existing.lines() {
        if line.starts_with("## ") {
            sections.push(String::new());
        }
        if let Some(s) = sections.last_mut() {
            s.push_str(line);
            s.push('\n');
        }
    }
    let new = format!("{heading}\n\n{}", section.trim_end());
    match sections
        .iter_mut()
        .find(|s| s.lines().next() == Some(heading))
    {
        Some(s) => *s = new,
        None => sections.push(new),
    }
    let mut out = preamble.trim_end().to_owned();
    out.push('\n');
    for s in sections {
        out.push('\n');
        out.push_str(s.trim_end());
        out.push('\n');
    }
    std::fs::write(path, out).with_context(|| format!("write {}", path.display()))
}
