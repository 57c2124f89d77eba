//! What the benchmark documents say about the machine a run was measured on.

/// CPU model, memory, kernel and core count, read from `/proc`.
#[derive(Default)]
pub struct Host {
    pub nproc: usize,
    pub cpu: String,
    pub memory: String,
    pub kernel: String,
}

impl Host {
    pub fn probe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or_else(|| "unknown".to_owned(), |(_, v)| v.trim().to_owned());
        let memory = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                let line = m.lines().find(|l| l.starts_with("MemTotal:"))?.to_owned();
                let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
                Some(format!("{:.1} GiB RAM", kib / 1024.0 / 1024.0))
            })
            .unwrap_or_else(|| "unknown RAM".to_owned());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "unknown".to_owned(), |k| k.trim().to_owned());
        Self {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu,
            memory,
            kernel,
        }
    }
}

/// The 1, 5 and 15 minute load averages, space-separated.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The first line `program arg` prints, if it runs and prints one.
pub fn first_line(program: &str, arg: &str) -> Option<String> {
    std::process::Command::new(program)
        .arg(arg)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim().to_owned())
        })
        .filter(|v| !v.is_empty())
}

/// The direct and the PgBouncer URL of the benchmark database, from the variables
/// `tests/db/up.sh` writes; `setup` is the command that sets them, for the error.
pub fn database_urls(setup: &str) -> anyhow::Result<(String, String)> {
    const DIRECT: &str = "REAPER_TEST_DATABASE_URL";
    const PGBOUNCER: &str = "REAPER_TEST_PGBOUNCER_URL";
    let get = |var: &str| {
        std::env::var(var)
            .ok()
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "{var} is not set. This benchmark needs a real PostgreSQL ({DIRECT}) and a \
                 PgBouncer in transaction mode in front of it ({PGBOUNCER}): run `{setup}` first"
                )
            })
    };
    Ok((get(DIRECT)?, get(PGBOUNCER)?))
}

/// The "**Machine:**" line of a benchmark document, and the highest 1-minute load
/// average at its start or end.
pub fn machine_line(host: &Host, load_start: &str, load_end: &str) -> (String, f64) {
    let line = format!(
        "- **Machine:** `nproc` = {}, CPU {}, {}, Linux {}. Load average (1/5/15 min) at \
         start {load_start}, at end {load_end}.",
        host.nproc, host.cpu, host.memory, host.kernel
    );
    let busy = [load_start, load_end]
        .iter()
        .filter_map(|l| l.split_whitespace().next()?.parse::<f64>().ok())
        .fold(0.0_f64, f64::max);
    (line, busy)
}
