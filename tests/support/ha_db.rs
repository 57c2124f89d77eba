//! A PostgreSQL primary with a streaming standby, started by the test itself with
//! `REAPER_DB_STANDBY=sync|async tests/db/up.sh` (each scenario kills its primary, so it
//! needs a pair of its own), and the failover step `tests/db/failover.sh`.
//!
//! PgBouncer (transaction mode, and a stock one in session mode) stands in front of
//! whichever server is the primary: the failover step repoints both, so clients that go
//! through them follow the failover as they would follow a virtual IP or a Patroni
//! HAProxy in production.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use super::cluster::repo_root;
use super::command::run;

/// How the standby confirms commits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replication {
    /// `synchronous_standby_names` names the standby: a commit returns once the standby
    /// has it on disk.
    Sync,
    /// The standby may lag: a commit returns before the standby has it.
    Async,
}

impl Replication {
    pub fn as_str(self) -> &'static str {
        match self {
            Replication::Sync => "sync",
            Replication::Async => "async",
        }
    }
}

pub struct HaDatabase {
    name: String,
    env: HashMap<String, String>,
    /// The direct URL of the current primary.
    primary_url: String,
}

/// Timings of one failover, as `tests/db/failover.sh` ran it.
#[derive(Clone, Copy, Debug)]
pub struct Failover {
    /// When the old primary was killed.
    pub killed_at: Instant,
    /// The same, on the wall clock (the database's clock, on this machine).
    pub killed_wall: chrono::DateTime<chrono::Utc>,
}

fn script(name: &str) -> PathBuf {
    repo_root().join("tests/db").join(name)
}

/// `KEY=value` and `KEY='value'` lines, as tests/db/up.sh writes its env file.
fn parse_env(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| {
            let value = value.trim();
            let value = value
                .strip_prefix('\'')
                .and_then(|v| v.strip_suffix('\''))
                .unwrap_or(value);
            (key.trim().to_owned(), value.to_owned())
        })
        .collect()
}

impl HaDatabase {
    /// Starts a primary, a standby replicating as `replication` says, and two PgBouncers
    /// in front of the primary.
    pub fn start(prefix: &str, replication: Replication) -> Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .subsec_nanos();
        let name = format!("{prefix}-{}-{nanos:x}", std::process::id());
        let stdout = run(Command::new(script("up.sh"))
            .arg(&name)
            .env("REAPER_DB_STANDBY", replication.as_str()))?;
        let env_file = stdout
            .lines()
            .last()
            .context("tests/db/up.sh printed no env file")?;
        let env = parse_env(&std::fs::read_to_string(env_file)?);
        let primary_url = env
            .get("REAPER_TEST_DATABASE_URL")
            .context("no REAPER_TEST_DATABASE_URL in the env file")?
            .clone();
        Ok(Self {
            name,
            env,
            primary_url,
        })
    }

    fn var(&self, key: &str) -> &str {
        self.env
            .get(key)
            .unwrap_or_else(|| panic!("{key} missing from the env file of {}", self.name))
    }

    /// The current primary, directly (migrations need a direct connection).
    pub fn primary_url(&self) -> &str {
        &self.primary_url
    }

    /// Through PgBouncer in transaction mode: follows a failover.
    pub fn pgbouncer_url(&self) -> &str {
        self.var("REAPER_TEST_PGBOUNCER_URL")
    }

    /// Through the stock PgBouncer (session mode, for LISTEN): follows a failover.
    pub fn pgbouncer_session_url(&self) -> &str {
        self.var("REAPER_TEST_PGBOUNCER_SESSION_URL")
    }

    /// The standby, directly (read-only while it is one).
    pub fn standby_url(&self) -> &str {
        self.var("REAPER_TEST_STANDBY_URL")
    }

    /// Stops WAL from reaching the standby (its walsender is stopped): with an
    /// asynchronous standby commits go on and the standby falls behind; with a
    /// synchronous one commits wait.
    pub fn pause_replication(&self) -> Result<()> {
        run(Command::new(script("replication.sh"))
            .arg(&self.name)
            .arg("pause"))
        .map(|_| ())
    }

    pub fn resume_replication(&self) -> Result<()> {
        run(Command::new(script("replication.sh"))
            .arg(&self.name)
            .arg("resume"))
        .map(|_| ())
    }

    /// Whether the standby has replayed everything the primary wrote.
    pub fn replay_caught_up(&self) -> Result<bool> {
        let lag = run(Command::new(script("replication.sh"))
            .arg(&self.name)
            .arg("lag"))?;
        Ok(lag.trim() == "0")
    }

    /// Kills the primary (SIGKILL to every process of it), promotes the standby and
    /// repoints both PgBouncers to it.
    pub fn fail_over(&mut self) -> Result<Failover> {
        let (killed_at, killed_wall) = (Instant::now(), chrono::Utc::now());
        let stdout = run(Command::new(script("failover.sh")).arg(&self.name))?;
        let url = stdout
            .lines()
            .last()
            .context("tests/db/failover.sh printed no URL")?;
        if !url.starts_with("postgres://") {
            bail!("tests/db/failover.sh printed {url:?}, not a URL");
        }
        self.primary_url = url.to_owned();
        Ok(Failover {
            killed_at,
            killed_wall,
        })
    }
}

impl HaDatabase {
    /// A new standby of the current primary, replicating as at the start
    /// (`tests/db/standby.sh`), so that the pair can fail over again.
    pub fn add_standby(&self) -> Result<()> {
        run(Command::new(script("standby.sh")).arg(&self.name)).map(|_| ())
    }
}

/// When the first acquire on WAL timeline `timeline` ran in `schema` (it starts the
/// wait after a failover), read on the current primary.
pub async fn first_seen_on_timeline(
    db: &HaDatabase,
    schema: &reaper_operator::config::Schema,
    timeline: i64,
) -> Result<chrono::DateTime<chrono::Utc>> {
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect_with(&super::db::options(
        db.primary_url(),
    ))
    .await?;
    let sql = format!(
        "SELECT first_seen_at FROM {} WHERE timeline = {timeline}",
        schema.qualify("lease_timeline")
    );
    Ok(super::db::scalar(&mut conn, &sql).await?)
}

impl Drop for HaDatabase {
    fn drop(&mut self) {
        let _ = Command::new(script("down.sh")).arg(&self.name).status();
    }
}
