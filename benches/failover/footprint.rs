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
use super::support::cluster::{install_reaper_crd, wait_until};
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
    let timing = args.timing;
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
    let max_n = *sizes.last().unwrap_or(&0);
    if max_n + 10 > DEFAULT_NODE_PODS {
        add_fake_node(&client, "bench-kwok-node-1", max_n + 20).await?;
    }
    let audit = audit::AuditLog::of(cluster.kubeconfig())?;
    if args.unrelated_pods > 0 {
        unrelated::create_unrelated_pods(&client, args.unrelated_pods, args.concurrency).await?;
    }

    let ticks_per_s = clock_ticks_per_second();
    let mut created = 0usize;
    let mut namespaces = 0usize;
    let mut previous: Option<Operator> = None;
    let mut rows = Vec::new();
    for &n in sizes {
        // A fresh replica per size (a new identity): the previous one is killed, and the
        // new one takes its leases over when they expire (same cluster, Deployments stay up).
        if let Some(mut old) = previous.take() {
            old.kill9()?;
            old.wait_exit(Duration::from_secs(10)).await?;
        }
        if n > created {
            eprintln!("creating Reapers {}..{n}", created + 1);
            let creating = Instant::now();
            while namespaces * PER_NAMESPACE < n {
                create_namespace(&client, &fp_namespace(namespaces)).await?;
                namespaces += 1;
            }
            futures::stream::iter(created..n)
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
                .buffer_unordered(args.concurrency)
                .try_collect::<Vec<()>>()
                .await?;
            created = n;
            eprintln!("  created in {:.1?}", creating.elapsed());
        }

        let op_mark = audit.mark()?;
        let identity = format!("op-{n}");
        let op = Operator::start(
            OperatorSpec {
                // Its own identity, whose requests the apiserver's audit log holds.
                kubeconfig: audit.kubeconfig(),
                database_url: &bouncer,
                listen_database_url: Some(&direct),
                schema: schema.as_str(),
                cluster: "fp",
                identity: &identity,
                migrate: false,
                // Every namespace (the operator reads an empty value as none given).
                namespace: "",
            },
            log_dir,
        )?;
        let holder = op.holder();
        let up = Instant::now();
        let timeout = Duration::from_secs(timing.ttl + 180) + Duration::from_millis(500) * n as u32;
        let readyz = wait_until(
            "the replica to be ready (/readyz)",
            Duration::from_secs(60),
            || async { Ok((op.http("/readyz").map(|(c, _)| c) == Some(200)).then_some(())) },
        )
        .await;
        with_logs(readyz, &[&op]).with_context(|| format!("N = {n}"))?;
        let held_sql = format!(
            "SELECT count(*) AS n FROM {lease_table} WHERE holder = $1 \
             AND renewed_at + ttl_ms * interval '1 millisecond' > clock_timestamp()"
        );
        let held = || async {
            let held: i64 = sqlx::query(AssertSqlSafe(held_sql.clone()))
                .bind(&holder)
                .fetch_one(store.pool())
                .await?
                .try_get("n")?;
            anyhow::Ok(held as usize)
        };
        let deployments_ready = || async {
            let list = Api::<Deployment>::all(client.clone())
                .list(&ListParams::default().labels("reaper-bench=footprint"))
                .await?;
            let one = Scale {
                replicas: 1,
                ready: 1,
            };
            anyhow::Ok(list.items.iter().filter(|d| scale_of(d) == one).count())
        };
        // A replica that cannot keep all N leases (or a control plane that cannot start
        // all pods) is measured anyway; the report shows how many it held.
        let settled = async {
            wait_until(&format!("{holder} to hold {n} leases"), timeout, || async {
                Ok((held().await? == n).then_some(()))
            })
            .await?;
            let last_report = std::cell::Cell::new(Instant::now());
            wait_until(
                &format!("{n} Deployments at 1 ready replica"),
                timeout,
                || async {
                    let ready = deployments_ready().await?;
                    if last_report.get().elapsed() > Duration::from_secs(15) {
                        eprintln!("  {ready} of {n} Deployments ready");
                        last_report.set(Instant::now());
                    }
                    Ok((ready == n).then_some(()))
                },
            )
            .await
        }
        .await;
        let ready_after = up.elapsed();
        let settled_ok = settled.is_ok();
        match settled {
            Ok(()) => eprintln!(
                "N = {n}: {holder} holds every lease, Deployments ready after {ready_after:.1?}; \
                 settling {} s, measuring {} s",
                args.settle, args.window
            ),
            Err(e) => eprintln!("warning: N = {n}: {e:#}; measuring anyway"),
        }
        tokio::time::sleep(Duration::from_secs(args.settle)).await;

        let held_before = held().await?;
        let measured = measure(
            &op,
            n,
            args,
            (admin, db, counting),
            (&audit, &op_mark),
            ticks_per_s,
            ready_after,
        )
        .await;
        let mut row = with_logs(measured, &[&op]).with_context(|| format!("N = {n}"))?;
        // After the window's last snapshot, so these reads are not counted.
        row.settled = settled_ok;
        row.held = (held_before, held().await?);
        row.deployments_ready = deployments_ready().await?;
        ensure!(
            row.n == 0 || row.held.1 > 0,
            "the replica holds none of the {n} leases after the window"
        );
        println!("{}", row.line());
        rows.push(row);
        previous = Some(op);
    }
    drop(previous);
    store.close().await;
    Ok(rows)
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
