//! The `footprint` subcommand: one replica holding N leases, measured over a window for
//! each N, and docs/benchmarks-footprint.md.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use chrono::Utc;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use kube::Client;
use kube::api::{Api, ListParams};
use reaper_operator::config::Schema;
use reaper_operator::lease::LeaseStore;
use serde_json::json;
use sqlx::postgres::PgPool;
use sqlx::{AssertSqlSafe, Row};

use super::cluster::{DEFAULT_NODE_PODS, add_fake_node, start_cluster};
use super::database::{
    CREATED_PG_STAT_STATEMENTS, Urls, admin_pool, exec, footprint_db_name, with_database,
};
use super::deployments::{Scale, scale_of};
use super::footprint_report::{FpRow, render_footprint};
use super::machine::Machine;
use super::operator::{LogDir, Operator, with_logs};
use super::resource_usage::{clock_ticks_per_second, cpu_ticks, memory_kib};
use super::statements::{Counting, db_counters};
use super::support::cluster::{TestCluster, install_reaper_crd, wait_until};
use super::support::fixtures::{create_deployment, create_namespace, create_reaper};
use super::support::operator::OperatorSpec;
use super::{FootprintArgs, audit, host, support, unrelated};

const FOOTPRINT_DOC: &str = "docs/benchmarks-footprint.md";

/// Reapers (and Deployments) per namespace in `footprint`.
pub const PER_NAMESPACE: usize = 100;

pub async fn footprint(args: &FootprintArgs) -> Result<()> {
    args.timing.validate()?;
    ensure!(args.window >= 1, "--window must be at least 1 s");
    ensure!(args.concurrency >= 1, "--concurrency must be at least 1");
    let mut sizes = args.sizes.clone();
    sizes.sort_unstable();
    sizes.dedup();
    ensure!(!sizes.is_empty(), "--sizes is empty");
    ensure!(
        *sizes.last().unwrap() <= 10_000,
        "sizes above 10 000 are not supported"
    );

    let urls = Urls::from_env()?;
    let started = Utc::now();
    let wall = Instant::now();
    let admin = admin_pool(&urls.direct).await?;
    let mut machine = Machine::probe(&admin).await?;
    let db = footprint_db_name();
    eprintln!(
        "footprint bench: sizes {sizes:?}, window {} s, {}; database {db}; load average {}",
        args.window,
        args.timing.label(),
        machine.load_start
    );

    // pg_stat_statements if the server preloads it; its view lives in the admin database.
    let preload: String = sqlx::raw_sql("SELECT current_setting('shared_preload_libraries') AS s")
        .fetch_one(&admin)
        .await?
        .try_get("s")?;
    let counting = if preload.contains("pg_stat_statements") {
        let exists: bool = sqlx::raw_sql(
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements') AS e",
        )
        .fetch_one(&admin)
        .await?
        .try_get("e")?;
        if !exists {
            exec(&admin, "CREATE EXTENSION pg_stat_statements").await?;
            CREATED_PG_STAT_STATEMENTS.store(true, Ordering::Relaxed);
        }
        Counting::Statements { created: !exists }
    } else {
        eprintln!(
            "pg_stat_statements is not preloaded: counting transactions only (start the \
             database with REAPER_DB_PG_STAT_STATEMENTS=1 tests/db/up.sh NAME for statements by kind)"
        );
        Counting::Transactions
    };

    let mut logs = LogDir::new("footprint")?;
    let outcome = match exec(&admin, &format!("CREATE DATABASE \"{db}\"")).await {
        Ok(()) => run_footprint(args, &sizes, &urls, &admin, &db, counting, &logs.path).await,
        Err(e) => Err(e),
    };
    let dropped = exec(
        &admin,
        &format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"),
    )
    .await;
    if counting == (Counting::Statements { created: true }) {
        let _ = exec(&admin, "DROP EXTENSION IF EXISTS pg_stat_statements").await;
        CREATED_PG_STAT_STATEMENTS.store(false, Ordering::Relaxed);
    }
    admin.close().await;
    let rows = outcome?;
    dropped?;
    logs.succeeded();
    machine.load_end = host::load_average();

    let report = render_footprint(
        args,
        &sizes,
        &machine,
        started,
        wall.elapsed(),
        counting,
        &rows,
    );
    println!("\n{report}");
    if args.write {
        let path = support::cluster::repo_root().join(FOOTPRINT_DOC);
        std::fs::write(&path, &report).with_context(|| format!("write {}", path.display()))?;
        eprintln!("wrote {FOOTPRINT_DOC}");
    } else {
        eprintln!("(not written to {FOOTPRINT_DOC}; pass --write to write it)");
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn run_footprint(
    args: &FootprintArgs,
    sizes: &[usize],
    urls: &Urls,
    admin: &PgPool,
    db: &str,
    counting: Counting,
    log_dir: &Path,
) -> Result<Vec<FpRow>> {
    let max_n = *sizes.last().unwrap_or(&0);
    let mut fp = Footprint::start(args, max_n, urls, (admin, db, counting), log_dir).await?;
    let mut previous: Option<Operator> = None;
    let mut rows = Vec::new();
    for &n in sizes {
        // A fresh replica per size (a new identity): the previous one is killed, and the
        // new one takes its leases over when they expire (same cluster, Deployments stay up).
        if let Some(mut old) = previous.take() {
            old.kill9()?;
            old.wait_exit(Duration::from_secs(10)).await?;
        }
        fp.create_reapers(n).await?;
        let (row, op) = fp.measure_size(n).await?;
        println!("{}", row.line());
        rows.push(row);
        previous = Some(op);
    }
    drop(previous);
    fp.store.close().await;
    Ok(rows)
}

/// The footprint's control plane and bench database, and the Reapers created so far.
/// Fields drop in order: the control plane stops last.
struct Footprint<'a> {
    args: &'a FootprintArgs,
    /// The bench database, its name, and how its statements are counted.
    admin: (&'a PgPool, &'a str, Counting),
    log_dir: &'a Path,
    /// The bench database, direct and through PgBouncer.
    direct: String,
    bouncer: String,
    schema: Schema,
    store: LeaseStore,
    /// Counts the leases a holder holds.
    held_sql: String,
    client: Client,
    audit: audit::AuditLog,
    ticks_per_s: f64,
    /// Reapers created so far, and the namespaces they are in.
    created: usize,
    namespaces: usize,
    /// The control plane: stopped when this is dropped.
    _cluster: TestCluster,
}

impl<'a> Footprint<'a> {
    /// Migrates the bench database and starts the control plane, with room for `max_n`
    /// pods and the `--unrelated-pods`.
    async fn start(
        args: &'a FootprintArgs,
        max_n: usize,
        urls: &Urls,
        admin: (&'a PgPool, &'a str, Counting),
        log_dir: &'a Path,
    ) -> Result<Self> {
        let db = admin.1;
        let direct = with_database(&urls.direct, db)?;
        let bouncer = with_database(&urls.pgbouncer, db)?;
        let schema = Schema::new("reaper")?;
        let store = LeaseStore::connect(&direct, &schema, Duration::from_secs(10), 2)
            .await
            .context("connect to the bench database")?;
        store
            .migrate()
            .await
            .context("migrate the bench database")?;
        let lease_table = schema.qualify("lease");

        eprintln!("starting a control plane (tests/cluster/up.sh)...");
        let cluster = start_cluster("bench-fp").await?;
        let client = cluster.client().await?;
        install_reaper_crd(&client).await?;
        if max_n + 10 > DEFAULT_NODE_PODS {
            add_fake_node(&client, "bench-kwok-node-1", max_n + 20).await?;
        }
        let audit = audit::AuditLog::of(cluster.kubeconfig())?;
        if args.unrelated_pods > 0 {
            unrelated::create_unrelated_pods(&client, args.unrelated_pods, args.concurrency)
                .await?;
        }
        Ok(Self {
            args,
            admin,
            log_dir,
            direct,
            bouncer,
            schema,
            store,
            held_sql: format!(
                "SELECT count(*) AS n FROM {lease_table} WHERE holder = $1 \
                 AND renewed_at + ttl_ms * interval '1 millisecond' > clock_timestamp()"
            ),
            client,
            audit,
            ticks_per_s: clock_ticks_per_second(),
            created: 0,
            namespaces: 0,
            _cluster: cluster,
        })
    }

    /// Creates Reapers (each with its Deployment) up to `n`.
    async fn create_reapers(&mut self, n: usize) -> Result<()> {
        if n <= self.created {
            return Ok(());
        }
        let (client, timing) = (&self.client, self.args.timing);
        eprintln!("creating Reapers {}..{n}", self.created + 1);
        let creating = Instant::now();
        while self.namespaces * PER_NAMESPACE < n {
            create_namespace(client, &fp_namespace(self.namespaces)).await?;
            self.namespaces += 1;
        }
        futures::stream::iter(self.created..n)
            .map(|i| {
                let client = client.clone();
                async move {
                    let ns = fp_namespace(i / PER_NAMESPACE);
                    let name = format!("r-{i:05}");
                    create_deployment(
                        &client,
                        &ns,
                        &name,
                        "Recreate",
                        json!({"reaper-bench": "footprint"}),
                    )
                    .await?;
                    create_reaper(
                        &client,
                        &ns,
                        &name,
                        &name,
                        timing.lease_spec(&format!("{ns}.fp-{i:05}")),
                    )
                    .await
                }
            })
            .buffer_unordered(self.args.concurrency)
            .try_collect::<Vec<()>>()
            .await?;
        self.created = n;
        eprintln!("  created in {:.1?}", creating.elapsed());
        Ok(())
    }

    /// Starts a replica for size `n` with its own identity, and measures it: it settles
    /// (holds all N leases, every Deployment ready), then the window. Returns the row and
    /// the replica, which still runs.
    async fn measure_size(&self, n: usize) -> Result<(FpRow, Operator)> {
        let op_mark = self.audit.mark()?;
        let (op, up) = self.start_replica(n).await?;
        let holder = op.holder();
        // A replica that cannot keep all N leases (or a control plane that cannot start
        // all pods) is measured anyway; the report shows how many it held.
        let settled = self.wait_settled(&holder, n).await;
        let ready_after = up.elapsed();
        let settled_ok = settled.is_ok();
        match settled {
            Ok(()) => eprintln!(
                "N = {n}: {holder} holds every lease, Deployments ready after {ready_after:.1?}; \
                 settling {} s, measuring {} s",
                self.args.settle, self.args.window
            ),
            Err(e) => eprintln!("warning: N = {n}: {e:#}; measuring anyway"),
        }
        tokio::time::sleep(Duration::from_secs(self.args.settle)).await;

        let held_before = self.held(&holder).await?;
        let measured = measure(
            &op,
            n,
            self.args,
            self.admin,
            (&self.audit, &op_mark),
            self.ticks_per_s,
            ready_after,
        )
        .await;
        let mut row = with_logs(measured, &[&op]).with_context(|| format!("N = {n}"))?;
        // After the window's last snapshot, so these reads are not counted.
        row.settled = settled_ok;
        row.held = (held_before, self.held(&holder).await?);
        row.deployments_ready = self.deployments_ready().await?;
        ensure!(
            row.n == 0 || row.held.1 > 0,
            "the replica holds none of the {n} leases after the window"
        );
        Ok((row, op))
    }

    /// Starts the replica of size `n` and waits until it is ready; returns it and when it
    /// started.
    async fn start_replica(&self, n: usize) -> Result<(Operator, Instant)> {
        let identity = format!("op-{n}");
        let op = Operator::start(
            OperatorSpec {
                // Its own identity, whose requests the apiserver's audit log holds.
                kubeconfig: self.audit.kubeconfig(),
                database_url: &self.bouncer,
                listen_database_url: Some(&self.direct),
                schema: self.schema.as_str(),
                cluster: "fp",
                identity: &identity,
                migrate: false,
                // Every namespace (the operator reads an empty value as none given).
                namespace: "",
            },
            self.log_dir,
        )?;
        let up = Instant::now();
        let readyz = wait_until(
            "the replica to be ready (/readyz)",
            Duration::from_secs(60),
            || async { Ok((op.http("/readyz").map(|(c, _)| c) == Some(200)).then_some(())) },
        )
        .await;
        with_logs(readyz, &[&op]).with_context(|| format!("N = {n}"))?;
        Ok((op, up))
    }

    /// Waits until `holder` holds all `n` leases, then until every Deployment is ready.
    async fn wait_settled(&self, holder: &str, n: usize) -> Result<()> {
        let timeout =
            Duration::from_secs(self.args.timing.ttl + 180) + Duration::from_millis(500) * n as u32;
        wait_until(&format!("{holder} to hold {n} leases"), timeout, || async {
            Ok((self.held(holder).await? == n).then_some(()))
        })
        .await?;
        let last_report = std::cell::Cell::new(Instant::now());
        wait_until(
            &format!("{n} Deployments at 1 ready replica"),
            timeout,
            || async {
                let ready = self.deployments_ready().await?;
                if last_report.get().elapsed() > Duration::from_secs(15) {
                    eprintln!("  {ready} of {n} Deployments ready");
                    last_report.set(Instant::now());
                }
                Ok((ready == n).then_some(()))
            },
        )
        .await
    }

    /// The leases `holder` holds (unexpired).
    async fn held(&self, holder: &str) -> Result<usize> {
        let held: i64 = sqlx::query(AssertSqlSafe(self.held_sql.clone()))
            .bind(holder)
            .fetch_one(self.store.pool())
            .await?
            .try_get("n")?;
        Ok(held as usize)
    }

    /// The bench's Deployments with one ready replica.
    async fn deployments_ready(&self) -> Result<usize> {
        let list = Api::<Deployment>::all(self.client.clone())
            .list(&ListParams::default().labels("reaper-bench=footprint"))
            .await?;
        let one = Scale {
            replicas: 1,
            ready: 1,
        };
        Ok(list.items.iter().filter(|d| scale_of(d) == one).count())
    }
}

fn fp_namespace(k: usize) -> String {
    format!("bench-fp-{k:03}")
}

async fn measure(
    op: &Operator,
    n: usize,
    args: &FootprintArgs,
    (admin, db, counting): (&PgPool, &str, Counting),
    (audit, op_mark): (&audit::AuditLog, &audit::Mark),
    ticks_per_s: f64,
    ready_after: Duration,
) -> Result<FpRow> {
    let pid = op.pid();
    let window = Duration::from_secs(args.window);
    let reconciles_0 = op.metric("reaper_reconciliations_total");
    let db_0 = db_counters(admin, db, counting).await?;
    let ticks_0 = cpu_ticks(pid)?;
    let api_mark = audit.mark()?;
    let t0 = Instant::now();
    let mut rss = Vec::new();
    let mut next = t0;
    while t0.elapsed() < window {
        rss.push(memory_kib(pid)?.0);
        next += Duration::from_secs(1);
        let until = next.min(t0 + window);
        tokio::time::sleep_until(until.into()).await;
    }
    let ticks_1 = cpu_ticks(pid)?;
    let elapsed = t0.elapsed();
    let api_end = Utc::now();
    let db_1 = db_counters(admin, db, counting).await?;
    let reconciles_1 = op.metric("reaper_reconciliations_total");
    let (rss_end, hwm) = memory_kib(pid)?;
    rss.push(rss_end);
    rss.sort_unstable();
    let secs = elapsed.as_secs_f64();

    let by_kind = matches!(counting, Counting::Statements { .. }).then(|| {
        let mut m = BTreeMap::new();
        for (kind, (calls, rows)) in &db_1.by_kind {
            let (c0, r0) = db_0.by_kind.get(kind).copied().unwrap_or_default();
            let (dc, dr) = (calls - c0, rows - r0);
            if dc > 0 {
                m.insert(*kind, (dc as f64 / secs, dr as f64 / secs));
            }
        }
        m
    });
    let api = audit.count(&api_mark, api_end).await?;
    let startup_api = audit.count(op_mark, api_mark.at()).await?;
    // Zero requests over both would rather mean that the replica does not use the audited
    // identity than that it is quiet: it lists and watches at start-up.
    ensure!(
        api.requests() + api.watch_opens + startup_api.requests() + startup_api.watch_opens > 0,
        "the apiserver's audit log holds no request of the replica since it started: does it \
         run with {}?",
        audit.kubeconfig().display()
    );
    let periods = secs / args.timing.retry as f64;
    let renews_per_period = by_kind.as_ref().map(|m| {
        let (c, r) = ["renew", "renew_many"]
            .iter()
            .filter_map(|k| m.get(k))
            .fold((0.0, 0.0), |(c, r), (dc, dr)| (c + dc, r + dr));
        (c * secs / periods, r * secs / periods)
    });
    Ok(FpRow {
        n,
        rss_mib: rss[rss.len() / 2] as f64 / 1024.0,
        hwm_mib: hwm as f64 / 1024.0,
        cpu_pct: (ticks_1 - ticks_0) as f64 / ticks_per_s / secs * 100.0,
        window: elapsed,
        by_kind,
        xacts_per_s: (db_1.xacts - db_0.xacts) as f64 / secs,
        reconciles_per_s: match (reconciles_0, reconciles_1) {
            (Some(a), Some(b)) => Some((b - a) / secs),
            _ => None,
        },
        renews_per_period,
        api,
        startup_api,
        ready_after,
        settled: true,
        held: (0, 0),
        deployments_ready: 0,
    })
}
