//! The libpq floor: the same statements sent by `pgbench` (PostgreSQL's own C client on
//! libpq), one client, simple protocol, so a benchmark can report its own client's
//! latency as a ratio to what a lean client reaches on the same server in the same run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use nix::sys::resource::{UsageWho, getrusage};

/// User + system CPU time of this process (all threads) or of its waited-for children.
pub fn cpu_time(who: UsageWho) -> Duration {
    let Ok(usage) = getrusage(who) else {
        return Duration::ZERO;
    };
    let micros = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec().max(0) as u64)
            + Duration::from_micros(t.tv_usec().max(0) as u64)
    };
    micros(usage.user_time()) + micros(usage.system_time())
}

/// `pgbench` of the newest PostgreSQL under /usr/lib/postgresql (or `$PG_BIN`, as
/// tests/db/up.sh), or the one on `PATH`.
pub fn pgbench() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("PG_BIN") {
        let path = Path::new(&bin).join("pgbench");
        ensure!(path.exists(), "PG_BIN={} has no pgbench", path.display());
        return Ok(path);
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let path = e.path().join("bin/pgbench");
            path.exists().then_some((version, path))
        })
        .collect();
    found.sort();
    if let Some((_, path)) = found.pop() {
        return Ok(path);
    }
    let on_path = Command::new("pgbench").arg("--version").output();
    if on_path.is_ok_and(|o| o.status.success()) {
        return Ok(PathBuf::from("pgbench"));
    }
    bail!(
        "pgbench not found (it comes with the PostgreSQL server packages, e.g. \
         /usr/lib/postgresql/15/bin/pgbench; set PG_BIN to its directory)"
    )
}

/// One `pgbench` run of a script.
pub struct PgbenchRun {
    /// Mean latency of each command of the script (`pgbench -r`), in script order.
    pub command_means: Vec<Duration>,
    /// User + system CPU time of pgbench for the whole run.
    pub cpu: Duration,
}

/// Runs `script` (pgbench script syntax) `transactions` times on one connection to
/// `url` with the simple query protocol.
pub fn run_pgbench(
    pgbench: &Path,
    url: &str,
    script: &str,
    transactions: usize,
    workdir: &Path,
) -> anyhow::Result<PgbenchRun> {
    std::fs::create_dir_all(workdir)?;
    let script_path = workdir.join("script.sql");
    std::fs::write(&script_path, script)?;
    let prefix = workdir.join("txlog");
    for entry in std::fs::read_dir(workdir)?.flatten() {
        if entry.file_name().to_string_lossy().starts_with("txlog") {
            std::fs::remove_file(entry.path())?;
        }
    }
    let cpu_before = cpu_time(UsageWho::RUSAGE_CHILDREN);
    let output = Command::new(pgbench)
        .args(["-n", "-M", "simple", "-c", "1", "-j", "1", "-r", "-l"])
        .arg(format!("--log-prefix={}", prefix.display()))
        .arg("-t")
        .arg(transactions.to_string())
        .arg("-f")
        .arg(&script_path)
        .arg(url)
        .output()
        .with_context(|| format!("run {}", pgbench.display()))?;
    let cpu = cpu_time(UsageWho::RUSAGE_CHILDREN).saturating_sub(cpu_before);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        output.status.success() && !stderr.contains("ERROR"),
        "pgbench failed ({}):\n{stderr}\n{stdout}",
        output.status
    );
    // Lines after "statement latencies in milliseconds...": `<ms> [<failures>] <command>`.
    let command_means = stdout
        .lines()
        .skip_while(|l| !l.contains("statement latencies"))
        .skip(1)
        .filter_map(|l| l.split_whitespace().next()?.parse::<f64>().ok())
        .map(|ms| Duration::from_secs_f64(ms / 1e3))
        .collect();
    let mut transactions_us = Vec::new();
    for entry in std::fs::read_dir(workdir)?.flatten() {
        if !entry.file_name().to_string_lossy().starts_with("txlog") {
            continue;
        }
        // `client_id transaction_no time_us script_no epoch epoch_us` per transaction.
        let text = std::fs::read_to_string(entry.path())?;
        for line in text.lines() {
            let us: u64 = line
                .split_whitespace()
                .nth(2)
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("pgbench log line {line:?}"))?;
            transactions_us.push(Duration::from_micros(us));
        }
    }
    ensure!(
        transactions_us.len() == transactions,
        "pgbench logged {} of {transactions} transactions",
        transactions_us.len()
    );
    Ok(PgbenchRun { command_means, cpu })
}

/// A query message of several statements (`a; b; c`) as one pgbench command: `\;`
/// keeps them in one message, so the server runs them as one implicit transaction, as
/// the store sends them.
pub fn one_message(sql: &str) -> String {
    format!("{};\n", sql.replace("; ", " \\; "))
}
