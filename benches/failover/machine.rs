//! The machine, database and build a run measured, as its document describes them.

use std::fmt::Write as _;
use std::process::Command;

use anyhow::{Context, Result};
use sqlx::Row;
use sqlx::postgres::PgPool;

use super::host;
use super::operator::operator_bin;
use super::support;

#[derive(Default)]
pub struct Machine {
    host: host::Host,
    postgres: String,
    pgbouncer: String,
    commit: String,
    pub load_start: String,
    pub load_end: String,
}

impl Machine {
    pub async fn probe(pool: &PgPool) -> Result<Self> {
        let row = sqlx::raw_sql("SELECT current_setting('server_version') AS v")
            .fetch_one(pool)
            .await
            .context("read the server version")?;
        let host = host::Host::probe();
        let pgbouncer = host::first_line("pgbouncer", "--version")
            .unwrap_or_else(|| "PgBouncer (version unknown)".to_owned());
        let root = support::cluster::repo_root();
        let commit = Command::new("git")
            .arg("-C")
            .arg(&root)
            .args(["rev-parse", "--short=12", "HEAD"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .map_or_else(
                || "unknown".to_owned(),
                |c| {
                    let dirty = Command::new("git")
                        .arg("-C")
                        .arg(&root)
                        .args(["status", "--porcelain", "--untracked-files=no"])
                        .output()
                        .is_ok_and(|o| !o.stdout.is_empty());
                    if dirty {
                        format!("{c} with uncommitted changes")
                    } else {
                        c
                    }
                },
            );
        let commit = if std::env::var_os("REAPER_BENCH_OPERATOR").is_some_and(|v| !v.is_empty()) {
            format!("{} (REAPER_BENCH_OPERATOR)", operator_bin().display())
        } else {
            format!("release build of commit {commit}")
        };
        Ok(Self {
            host,
            postgres: row.try_get("v")?,
            pgbouncer,
            commit,
            load_start: host::load_average(),
            ..Self::default()
        })
    }

    pub fn describe(&self, w: &mut String) {
        let (line, busy) = host::machine_line(&self.host, &self.load_start, &self.load_end);
        let _ = writeln!(w, "{line}");
        if busy >= self.host.nproc.max(1) as f64 * 0.75 {
            let _ = writeln!(
                w,
                "  The machine was busy (1-minute load up to {busy:.2} on {} CPUs): the control \
                 planes, PostgreSQL, PgBouncer, the operators and any other jobs competed for \
                 the CPUs, which mostly shows in the p99 and max columns.",
                self.host.nproc
            );
        }
        let _ = writeln!(
            w,
            "- **Software:** operator {}; PostgreSQL {} and {} (`pool_mode = transaction`) on \
             the same machine over loopback; control planes from `tests/cluster/up.sh` \
             (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok).",
            self.commit, self.postgres, self.pgbouncer
        );
    }
}
