//! Chaos suite: "at most one reaper", under random faults. See docs/chaos.md.
//!
//! Two local control planes (clusters `a` and `b`), two `reaper-operator run` replicas
//! in each, every replica's lease statements going through its own fault proxy to
//! PgBouncer (transaction mode) and its LISTEN connection through a second proxy to
//! PostgreSQL. Three Reapers per cluster share three lease names across the clusters;
//! their pods take 0 to 20 s to stop once deleted (kwok keeps them Terminating). A
//! seeded injector kills, stops, cuts off and restarts things one at a time, shuts a
//! cluster's operators down gracefully, deletes and recreates Reapers and Deployments,
//! and adds second Reapers naming used leases; an observer records every Deployment
//! change and every pod's life in both clusters and the workload reports; at the end
//! the checker reads the `lease_event` history and checks (a) no two clusters have a
//! live pod (Terminating included) of one lease at once (except the documented fencing
//! case), (b) the audit history is a sequence of non-overlapping tenures with strictly
//! increasing epochs, (c) everything converges after the last fault, (d) refused
//! Reapers never ran a pod and the object faults behaved as documented. Beside the
//! pods, every cluster runs each lease's workload as a local process under
//! `reaper-operator guard`, restarted whenever it exits; (f) the commands of both
//! clusters never act at once (but for the documented release case), (g) a frozen
//! guard's watchdog stops its command before the lease could expire.
//!
//! `#[ignore]`d because it stops and restarts the database it is given: run it with
//! `scripts/chaos.sh` (what `make chaos` and `make test` do), which starts a private
//! one, or `cargo test --test chaos -- --ignored --nocapture` with the variables of a
//! `tests/db/up.sh` database nothing else uses.
//! `REAPER_CHAOS_SECONDS` (default 150) sets how long faults are injected (and at least
//! until every kind has been dealt once),
//! `REAPER_CHAOS_SEED` replays a run, `REAPER_CHAOS_KEEP=1` keeps the run directory
//! (fault log, timeline, operator logs) even when the run passes.

mod support;

#[path = "chaos/checker.rs"]
mod checker;
#[path = "chaos/faults.rs"]
mod faults;
#[path = "chaos/guard_check.rs"]
mod guard_check;
#[path = "chaos/guarded.rs"]
mod guarded;
#[path = "chaos/infra.rs"]
mod infra;
#[path = "chaos/objects.rs"]
mod objects;
#[path = "chaos/observer.rs"]
mod observer;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::id;

use anyhow::{Context, Result, anyhow};
use chrono::Utc;
use k8s_openapi::api::apps::v1::Deployment;
use kube::Client;
use kube::api::Api;
use reaper_operator::config::Schema;
use reaper_operator::lease::{LeaseEvent, LeaseStore};
use reaper_operator::reaper::{LeaseSpec, Phase, Reaper};
use serde_json::json;
use support::cluster::TestCluster;
use support::fixtures::{PodStop, create_namespace};
use support::{db, fixtures};

use checker::{FaultRecord, Input, Time, cluster_of};
use faults::{FaultLog, Injector, Plan};
use guard_check::GuardExit;
use guarded::Guards;
use infra::{ApiServer, Database, DatabaseGuard, Replica, ReplicaConfig};
use observer::Observer;

const TTL: u64 = 3;
const DEADLINE: u64 = 2;
const RETRY: u64 = 1;
const HANDOVER: u64 = 0;
const LEASES: usize = 3;
const CLUSTERS: [&str; 2] = ["a", "b"];
/// The longest a reaper pod takes to stop once deleted (see [`pod_stop`]).
const POD_STOP_MAX_SECONDS: u64 = 20;
/// `--shutdown-timeout-seconds` of every replica: above the longest pod stop, with margin,
/// so that a graceful shutdown always outlasts the pods it waits for.
const SHUTDOWN_TIMEOUT_SECONDS: u64 = 30;
/// Check (c): after the last heal, one leader and one ready replica per lease (and no
/// pod left anywhere else) within ttl + retry + handover + the longest pod stop + 5 s:
/// the last fault may leave a handover that waits for a stopping pod, or a stopping pod
/// in the cluster that lost the lease.
const CONVERGE_BOUND: u64 = TTL + RETRY + HANDOVER + POD_STOP_MAX_SECONDS + 5;

struct Settings {
    seed: u64,
    seconds: u64,
    keep: bool,
    dir: PathBuf,
}

struct Outcome {
    summary: String,
    violations: usize,
}

#[test]
#[ignore = "restarts the database it is given: run by scripts/chaos.sh (`make chaos`, `make test`)"]
fn chaos_short_profile() {
    let seconds = std::env::var("REAPER_CHAOS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150);
    let seed = std::env::var("REAPER_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            now.as_secs() ^ u64::from(now.subsec_nanos())
        });
    let dir = std::env::temp_dir().join(format!("reaper-chaos-{}-{seed}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create the run directory");
    let settings = Settings {
        seed,
        seconds,
        keep: std::env::var_os("REAPER_CHAOS_KEEP").is_some_and(|v| v == "1"),
        dir,
    };
    eprintln!(
        "[chaos] seed {seed}, {seconds} s of faults; replay with REAPER_CHAOS_SEED={seed} REAPER_CHAOS_SECONDS={seconds}; \
         run directory {}",
        settings.dir.display()
    );

    let database = Database::from_env().expect("database settings");
    assert!(
        database.postgres_running() && database.pgbouncer_pid().is_some(),
        "PostgreSQL and PgBouncer must be running before the chaos suite starts"
    );
    // Dropped last: leaves PostgreSQL and PgBouncer running, also on a panic.
    let _database_guard = DatabaseGuard(database.clone());

    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| TestCluster::start_new("chaos-a"));
        let b = s.spawn(|| TestCluster::start_new("chaos-b"));
        (a.join().unwrap(), b.join().unwrap())
    });
    let clusters = [a.expect("start cluster a"), b.expect("start cluster b")];
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let outcome = runtime.block_on(run(&settings, &database, &clusters));
    drop(runtime);
    drop(clusters);
    match outcome {
        Ok(outcome) => {
            eprintln!(
                "\n===== chaos summary (seed {seed}, {seconds} s of faults) =====\n{}",
                outcome.summary
            );
            if outcome.violations == 0 && !settings.keep {
                let _ = std::fs::remove_dir_all(&settings.dir);
            } else {
                eprintln!("[chaos] run directory kept: {}", settings.dir.display());
            }
            assert_eq!(
                outcome.violations,
                0,
                "{} violation(s); seed {seed}; see the summary above and {}",
                outcome.violations,
                settings.dir.display()
            );
        }
        Err(e) => panic!(
            "chaos run failed (seed {seed}): {e:#}\nrun directory: {}",
            settings.dir.display()
        ),
    }
}

/// Everything the run sets up, for the convergence check.
struct Scene<'a> {
    clients: [Client; 2],
    namespace: String,
    leases: Vec<String>,
    deployments: Vec<String>,
    store: &'a LeaseStore,
}

/// What the run sets up before the faults. The fields that stop something on drop come
/// first, in the reverse order of their making: the API servers, the guarded commands,
/// the replicas, the observer.
struct Setup {
    apiservers: [ApiServer; 2],
    guards: Guards,
    replicas: Vec<Replica>,
    replica_names: Vec<String>,
    replica_cluster: Vec<usize>,
    observer: Observer,
    store: LeaseStore,
    schema: Schema,
    clients: [Client; 2],
    namespace: String,
    /// Where second Reapers of another namespace go.
    other_namespace: String,
    leases: Vec<String>,
    deployments: Vec<String>,
    stops: Vec<PodStop>,
}

/// What the injector kept of the faults.
struct Injected {
    records: Vec<FaultRecord>,
    extra_leases: Vec<String>,
    unexpected_exits: Vec<String>,
}

async fn run(
    settings: &Settings,
    database: &Database,
    clusters: &[TestCluster; 2],
) -> Result<Outcome> {
    let mut setup = set_up(settings, database, clusters).await?;
    let scene = Scene {
        clients: setup.clients.clone(),
        namespace: setup.namespace.clone(),
        leases: setup.leases.clone(),
        deployments: setup.deployments.clone(),
        store: &setup.store,
    };

    let mut log = FaultLog::new(settings.seed, &settings.dir.join("faults.log"));
    log.line(&format!(
        "seed {} | namespace {} | schema {} | leases {} | ttl {TTL} s, deadline {DEADLINE} s, retry {RETRY} s, handover {HANDOVER} s",
        settings.seed,
        setup.namespace,
        setup.schema.as_str(),
        setup.leases.join(", ")
    ));
    initial_state(&scene, &setup, &mut log).await?;

    let chaos_start = Utc::now();
    let mut injector = Injector {
        replicas: &mut setup.replicas,
        db: database,
        apiservers: &mut setup.apiservers,
        clients: setup.clients.clone(),
        observer: &setup.observer,
        leases: &setup.leases,
        deployments: &setup.deployments,
        stops: &setup.stops,
        clusters: CLUSTERS,
        namespace: &setup.namespace,
        other_namespace: &setup.other_namespace,
        store: &setup.store,
        records: Vec::new(),
        extra_leases: Vec::new(),
        unexpected_exits: Vec::new(),
        guards: &setup.guards,
    };
    let injected = inject_faults(&mut injector, settings, &mut log).await;
    let faults = Injected {
        records: std::mem::take(&mut injector.records),
        extra_leases: std::mem::take(&mut injector.extra_leases),
        unexpected_exits: std::mem::take(&mut injector.unexpected_exits),
    };
    drop(injector);
    injected.context("a fault could not be injected or healed")?;
    let converged = converge_after_last_heal(
        &scene,
        &setup.replicas,
        &faults.records,
        chaos_start,
        &mut log,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let end = Utc::now();
    setup.observer.stop();
    let guard_exits = setup.guards.stop().await;
    for r in setup.replicas.iter_mut() {
        r.stop_and_archive();
    }
    check(
        settings,
        &setup,
        faults,
        &converged,
        &guard_exits,
        chaos_start,
        end,
    )
    .await
}

/// The objects in both clusters, the lease schema, the observer, the replicas, their
/// guarded commands, and a handle on each cluster's API server.
async fn set_up(
    settings: &Settings,
    database: &Database,
    clusters: &[TestCluster; 2],
) -> Result<Setup> {
    let clients = [clusters[0].client().await?, clusters[1].client().await?];
    let suffix = format!("{:x}", Utc::now().timestamp_subsec_nanos());
    let namespace = format!("chaos-{suffix}");
    let leases: Vec<String> = (0..LEASES)
        .map(|i| format!("{namespace}.lease-{i}"))
        .collect();
    let deployments: Vec<String> = (0..LEASES).map(|i| format!("reaper-{i}")).collect();
    let stops: Vec<PodStop> = (0..LEASES).map(pod_stop).collect();
    // Where second Reapers of another namespace go.
    let other_namespace = format!("{namespace}-other");
    let objects = Objects {
        namespace: &namespace,
        other_namespace: &other_namespace,
        leases: &leases,
        deployments: &deployments,
        stops: &stops,
    };
    for c in &clients {
        objects.create(c).await?;
    }
    let schema = db::unique_schema("chaos");
    let store = LeaseStore::connect(&database.direct_url, &schema, Duration::from_secs(2), 2)
        .await
        .context("connect to the database directly")?;
    store.migrate().await?;

    let mut observer = Observer::new();
    for (i, c) in clients.iter().enumerate() {
        for ns in [&namespace, &other_namespace] {
            observer.watch_cluster(i, c.clone(), ns, deployments.clone(), faults::CANARY);
            observer.watch_pods(i, c.clone(), ns, faults::CANARY);
        }
    }
    observer.poll_database(
        &database.direct_url,
        schema.as_str(),
        leases.clone(),
        CLUSTERS.map(str::to_owned),
    )?;

    let replicas = start_replicas(clusters, schema.as_str(), database, &settings.dir).await?;
    let guards = Guards::start(database, schema.as_str(), CLUSTERS, &leases, &settings.dir).await?;
    let replica_names: Vec<String> = replicas.iter().map(Replica::name).collect();
    let replica_cluster: Vec<usize> = replicas
        .iter()
        .map(|r| {
            CLUSTERS
                .iter()
                .position(|c| *c == r.config.cluster)
                .unwrap()
        })
        .collect();
    let apiservers = [
        ApiServer::of(
            clusters[0]
                .name()
                .ok_or_else(|| anyhow!("cluster a has no name"))?,
        )?,
        ApiServer::of(
            clusters[1]
                .name()
                .ok_or_else(|| anyhow!("cluster b has no name"))?,
        )?,
    ];
    Ok(Setup {
        apiservers,
        guards,
        replicas,
        replica_names,
        replica_cluster,
        observer,
        store,
        schema,
        clients,
        namespace,
        other_namespace,
        leases,
        deployments,
        stops,
    })
}

/// Before the faults: one leader and one ready replica per lease, and one guarded
/// command acting per lease.
async fn initial_state(scene: &Scene<'_>, setup: &Setup, log: &mut FaultLog) -> Result<()> {
    let replicas = &setup.replicas;
    let converged = converge(scene, replicas, Duration::from_secs(90)).await;
    if let Err(e) = converged {
        let logs: Vec<String> = replicas
            .iter()
            .filter_map(|r| {
                r.process
                    .as_ref()
                    .map(|p| format!("--- {}:\n{}", r.name(), p.log_tail()))
            })
            .collect();
        return Err(anyhow!(
            "the initial state never converged: {e}\n{}",
            logs.join("\n")
        ));
    }
    guarded::wait_acting(&setup.guards.tick_files(), LEASES, Duration::from_secs(30))
        .await
        .context("the guarded commands did not start")?;
    log.line(&format!(
        "initial state: one leader and one ready replica per lease, one guarded command acting per lease ({}); \
         injecting faults",
        guard_settings()
    ));
    Ok(())
}

/// Faults one after the other for `settings.seconds`, and at least until every kind has
/// been dealt once; the first one that cannot be injected or healed ends the run.
async fn inject_faults(
    injector: &mut Injector<'_>,
    settings: &Settings,
    log: &mut FaultLog,
) -> Result<()> {
    let chaos_started = Instant::now();
    let report_bounds: Vec<Duration> = injector.stops.iter().map(report_bound).collect();
    let mut plan = Plan::new(settings.seed, Duration::from_secs(TTL), report_bounds);
    let mut id = 0;
    let mut failure = None;
    // At least one full round, so that even a short run sees every kind.
    while chaos_started.elapsed() < Duration::from_secs(settings.seconds)
        || !plan.dealt_every_kind()
    {
        injector.check_exits(log);
        id += 1;
        let planned = plan.next_fault();
        if let Err(e) = injector.run(id, &planned, log).await {
            failure = Some(e);
            break;
        }
        tokio::time::sleep(planned.gap).await;
    }
    injector.check_exits(log);
    failure.map_or(Ok(()), Err)
}

/// (c) Within the bound after the last heal; keeps looking a while longer to report how
/// long it actually took if it missed.
async fn converge_after_last_heal(
    scene: &Scene<'_>,
    replicas: &[Replica],
    records: &[FaultRecord],
    chaos_start: Time,
    log: &mut FaultLog,
) -> Result<f64, String> {
    let last_heal = records
        .iter()
        .filter_map(|r| r.healed)
        .max()
        .unwrap_or(chaos_start);
    log.line(&format!(
        "{} faults injected; last heal at {}; checking convergence (bound {CONVERGE_BOUND} s)",
        records.len(),
        last_heal.format("%H:%M:%S%.3f")
    ));
    let bound = Duration::from_secs(CONVERGE_BOUND);
    let converged = match converge(scene, replicas, bound + Duration::from_secs(30)).await {
        Ok(()) => {
            let after = checker::seconds(Utc::now() - last_heal);
            if after <= bound.as_secs_f64() {
                Ok(after)
            } else {
                Err(format!(
                    "converged only {after:.2} s after the last heal (bound {CONVERGE_BOUND} s)"
                ))
            }
        }
        Err(e) => Err(format!(
            "not converged {:.1} s after the last heal: {e}",
            checker::seconds(Utc::now() - last_heal)
        )),
    };
    log.line(&format!("convergence: {converged:?}"));
    converged
}

/// Checks what the run recorded (the lease history, the observer's records, the guarded
/// commands' ticks and exits), writes the timeline and makes the summary; drops the run's
/// schema when nothing was violated.
async fn check(
    settings: &Settings,
    setup: &Setup,
    faults: Injected,
    converged: &Result<f64, String>,
    guard_exits: &[GuardExit],
    chaos_start: Time,
    end: Time,
) -> Result<Outcome> {
    let (store, schema) = (&setup.store, &setup.schema);
    let mut events: Vec<Vec<LeaseEvent>> = Vec::new();
    for lease in &setup.leases {
        events.push(store.events(&id::lease(lease)).await?);
    }
    let mut extra_events: Vec<(String, Vec<LeaseEvent>)> = Vec::new();
    for lease in faults.extra_leases {
        let e = store.events(&id::lease(&lease)).await?;
        extra_events.push((lease, e));
    }
    let recorded = std::mem::take(&mut *setup.observer.records.lock().unwrap());
    let input = Input {
        ttl: Duration::from_secs(TTL),
        clusters: CLUSTERS,
        replica_cluster: &setup.replica_cluster,
        replica_names: &setup.replica_names,
        leases: &setup.leases,
        deployments: &setup.deployments,
        samples: &recorded.samples,
        pods: &recorded.pods,
        other_samples: &recorded.other_samples,
        reports: &recorded.reports,
        blind: &recorded.blind,
        faults: &faults.records,
        events: &events,
        extra_events: &extra_events,
        chaos_start,
        end,
    };
    let analysis = checker::analyse(&input);
    let mut summary = checker::summary(&input, &analysis, converged, CONVERGE_BOUND as f64);
    let logs: Vec<(String, Vec<PathBuf>)> = setup
        .replicas
        .iter()
        .map(|r| (r.name(), r.logs()))
        .collect();
    write_timeline(&settings.dir.join("timeline.txt"), &input, &analysis);
    let guard_violations = check_guards(settings, setup, guard_exits, &input, &mut summary);
    if !faults.unexpected_exits.is_empty() {
        let _ = writeln!(
            summary,
            "replicas that exited by themselves: {:?}",
            faults.unexpected_exits
        );
    }
    let _ = writeln!(
        summary,
        "database polls that failed (outages): {}",
        recorded.db_poll_errors
    );
    let violations = analysis.violations() + usize::from(converged.is_err()) + guard_violations;
    let _ = writeln!(summary, "violations: {violations}");
    summary.push_str(&violation_contexts(&input, &analysis, &logs));
    if let Err(e) = converged {
        let _ = writeln!(summary, "\n--- (c) failed: {e}");
    }
    drop(recorded);
    if violations == 0 {
        let drop_schema = format!("DROP SCHEMA \"{}\" CASCADE", schema.as_str());
        if let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(drop_schema))
            .execute(store.pool())
            .await
        {
            eprintln!("[chaos] could not drop schema {}: {e}", schema.as_str());
        }
    }
    Ok(Outcome {
        summary,
        violations,
    })
}

/// Checks (f) and (g) on the guarded commands' ticks and exits: their lines of the summary
/// and of the timeline (after the pods' ones), and their number of violations.
fn check_guards(
    settings: &Settings,
    setup: &Setup,
    guard_exits: &[GuardExit],
    input: &Input<'_>,
    summary: &mut String,
) -> usize {
    let mut guard_runs = Vec::new();
    for (cluster, lease, path) in setup.guards.tick_files() {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        guard_runs.extend(guard_check::parse_runs(cluster, lease, &text));
    }
    let guard_input = guard_check::GuardInput {
        ttl: Duration::from_secs(TTL),
        margin: Duration::from_millis(guarded::MARGIN_MS),
        clusters: CLUSTERS,
        leases: &setup.leases,
        runs: &guard_runs,
        exits: guard_exits,
        faults: input.faults,
        events: input.events,
        end: input.end,
    };
    let guard_analysis = guard_check::analyse(&guard_input);
    summary.push_str(&guard_check::summary(
        &guard_input,
        &guard_analysis,
        &guard_settings(),
    ));
    write_guard_timeline(
        &settings.dir.join("timeline.txt"),
        &guard_input,
        &guard_analysis,
    );
    guard_analysis.violations()
}

/// The guards' timings, as the summary prints them.
fn guard_settings() -> String {
    format!(
        "grace {} ms, poll {} ms, margin {} ms",
        guarded::GRACE_MS,
        guarded::POLL_MS,
        guarded::MARGIN_MS
    )
}

/// Appends every guarded command's run, every guard exit and every overlap of the
/// commands to the timeline.
fn write_guard_timeline(
    path: &Path,
    input: &guard_check::GuardInput<'_>,
    analysis: &guard_check::GuardAnalysis,
) {
    let mut lines: Vec<(checker::Time, String)> = Vec::new();
    for r in input.runs {
        lines.push((
            r.first,
            format!(
                "guarded {} {} run {} (epoch {:?}) acting until {} ({} actions, {} SIGTERM, longest pause {:.3} s)",
                input.clusters[r.cluster],
                input.leases[r.lease],
                r.run,
                r.epoch,
                r.last.format("%H:%M:%S%.3f"),
                r.actions,
                r.terms,
                r.max_gap
            ),
        ));
    }
    for e in input.exits {
        lines.push((
            e.at,
            format!(
                "guard {} {} run {} exited {:?}: {}",
                input.clusters[e.cluster], input.leases[e.lease], e.run, e.code, e.reason
            ),
        ));
    }
    for o in &analysis.overlaps {
        lines.push((o.start, format!("guarded overlap {o:?}")));
    }
    lines.sort_by_key(|l| l.0);
    let mut s = String::new();
    for (at, line) in lines {
        let _ = writeln!(s, "{} {line}", at.format("%H:%M:%S%.3f"));
    }
    let _ = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, s.as_bytes()));
}

/// Two replicas per cluster, `a/op-1`, `a/op-2`, `b/op-1`, `b/op-2`.
async fn start_replicas(
    clusters: &[TestCluster; 2],
    schema: &str,
    database: &Database,
    dir: &Path,
) -> Result<Vec<Replica>> {
    let mut replicas = Vec::new();
    for (i, cluster) in clusters.iter().enumerate() {
        for identity in ["op-1", "op-2"] {
            let config = ReplicaConfig {
                kubeconfig: cluster.kubeconfig().to_owned(),
                schema: schema.to_owned(),
                // Every namespace (the clusters are the run's own): second Reapers go
                // to another namespace too.
                namespace: String::new(),
                cluster: CLUSTERS[i].to_owned(),
                identity: identity.to_owned(),
                shutdown_timeout_seconds: SHUTDOWN_TIMEOUT_SECONDS,
            };
            replicas.push(Replica::new(config, database, dir).await?);
        }
    }
    Ok(replicas)
}

/// The Kubernetes objects of a run, the same in both clusters.
struct Objects<'a> {
    namespace: &'a str,
    /// For second Reapers of another namespace.
    other_namespace: &'a str,
    leases: &'a [String],
    /// Per lease: its Deployment and its Reaper (one name).
    deployments: &'a [String],
    stops: &'a [PodStop],
}

impl Objects<'_> {
    /// The CRD, both namespaces, the canary, and per lease a Deployment (its pods stop
    /// as [`pod_stop`] says) and a Reaper.
    async fn create(&self, client: &Client) -> Result<()> {
        support::cluster::install_reaper_crd(client).await?;
        create_namespace(client, self.namespace).await?;
        create_namespace(client, self.other_namespace).await?;
        // Not managed by any Reaper: the injector runs a pod with it to know that a
        // cluster whose apiserver restarted works again.
        fixtures::create_deployment(
            client,
            self.namespace,
            faults::CANARY,
            "Recreate",
            json!({}),
        )
        .await?;
        for ((lease, deployment), stop) in self.leases.iter().zip(self.deployments).zip(self.stops)
        {
            fixtures::create_deployment_with_stop(
                client,
                self.namespace,
                deployment,
                "Recreate",
                json!({}),
                *stop,
            )
            .await?;
            create_reaper(client, self.namespace, deployment, lease).await?;
        }
        Ok(())
    }
}

/// The timeline around every overlap that is a violation, and around every two pods of
/// one lease in one cluster.
fn violation_contexts(
    input: &Input<'_>,
    analysis: &checker::Analysis,
    logs: &[(String, Vec<PathBuf>)],
) -> String {
    let mut summary = String::new();
    let (leases, deployments) = (input.leases, input.deployments);
    for o in analysis.overlaps.iter().filter(|o| !o.expected) {
        let from = o.start - checker::secs(10.0);
        let to = o.end + checker::secs(2.0);
        let _ = writeln!(
            summary,
            "\n--- context of the violation on {} at {}:\n{}",
            leases[o.lease],
            o.start.format("%H:%M:%S%.3f"),
            context(input, o.lease, from, to, logs, &deployments[o.lease])
        );
    }
    for &(lease, cluster, start, end) in &analysis.double_pods {
        let _ = writeln!(
            summary,
            "\n--- context of the two pods of {} in {} at {}:\n{}",
            leases[lease],
            CLUSTERS[cluster],
            start.format("%H:%M:%S%.3f"),
            context(
                input,
                lease,
                start - checker::secs(10.0),
                end + checker::secs(2.0),
                logs,
                &deployments[lease]
            )
        );
    }
    summary
}

/// Polls (every 200 ms, up to `timeout`) until, for every lease: the row is held by a
/// replica of one cluster X; X's Deployment is at 1 replica, ready, with one live pod;
/// the other's at 0 with no pod left (not even a stopping one);
/// X's Reaper says Leading with that holder and the other's does not; and exactly one
/// replica's `reaper_leader` gauge is 1. The error says what was still wrong.
async fn converge(
    scene: &Scene<'_>,
    replicas: &[Replica],
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let problem = match converged_now(scene, replicas).await {
            Ok(None) => return Ok(()),
            Ok(Some(p)) => p,
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() >= deadline {
            return Err(problem);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn converged_now(scene: &Scene<'_>, replicas: &[Replica]) -> Result<Option<String>> {
    let mut metrics = Vec::new();
    for r in replicas {
        if let Some(port) = r.http_port() {
            metrics.push(infra::http_get(port, "/metrics").await.unwrap_or_default());
        }
    }
    for (lease, deployment) in scene.leases.iter().zip(&scene.deployments) {
        let Some(row) = scene.store.get(&id::lease(lease)).await? else {
            return Ok(Some(format!("lease {lease} has no row")));
        };
        if !row.is_held() {
            return Ok(Some(format!("lease {lease} is not held: {row:?}")));
        }
        let Some(x) = cluster_of(&row.holder, &CLUSTERS) else {
            return Ok(Some(format!("lease {lease} held by {}", row.holder)));
        };
        let mut state = Vec::new();
        for (c, client) in scene.clients.iter().enumerate() {
            let d = Api::<Deployment>::namespaced(client.clone(), &scene.namespace)
                .get(deployment)
                .await?;
            let spec = d.spec.replicas.unwrap_or(1);
            let ready = d.status.and_then(|s| s.ready_replicas).unwrap_or(0);
            let reaper = Api::<Reaper>::namespaced(client.clone(), &scene.namespace)
                .get(deployment)
                .await?
                .status
                .unwrap_or_default();
            let pods = fixtures::live_pods(client, &scene.namespace, deployment).await?;
            state.push((c, spec, ready, pods, reaper.phase, reaper.holder));
        }
        for (c, spec, ready, pods, phase, holder) in &state {
            let ok = if *c == x {
                (*spec, *ready, *pods) == (1, 1, 1)
                    && *phase == Some(Phase::Leading)
                    && holder.as_deref() == Some(row.holder.as_str())
            } else {
                (*spec, *ready, *pods) == (0, 0, 0) && *phase != Some(Phase::Leading)
            };
            if !ok {
                return Ok(Some(format!(
                    "lease {lease} held by {} (epoch {}); cluster {}: replicas {spec}, ready {ready}, live pods {pods}, phase {phase:?}, status holder {holder:?}",
                    row.holder, row.epoch, CLUSTERS[*c]
                )));
            }
        }
        let series = format!("reaper_leader{{lease=\"{lease}\"}} ");
        let leaders: usize = metrics
            .iter()
            .filter(|m| {
                m.lines()
                    .any(|l| l.strip_prefix(&series).is_some_and(|v| v.trim() == "1"))
            })
            .count();
        if leaders != 1 {
            return Ok(Some(format!(
                "lease {lease}: {leaders} replicas report reaper_leader 1"
            )));
        }
    }
    Ok(None)
}

/// The run's lease timings, for the lease `name`.
fn lease_spec(name: &str) -> LeaseSpec {
    fixtures::lease_spec(name, TTL, DEADLINE, RETRY, HANDOVER)
}

/// How long the operator lets other clusters trust a cluster's workload report for a
/// Deployment whose pods stop as `stop` says (README: refresh + ttl + retry + the pods'
/// grace period, the refresh being a quarter ttl, at least the retry period). Only used
/// to make `cluster-sigstop` long enough; the checker reads each report's own bound.
fn report_bound(stop: &PodStop) -> Duration {
    let refresh = Duration::from_secs(RETRY).max(Duration::from_secs(TTL) / 4);
    refresh + Duration::from_secs(TTL + RETRY + stop.grace_seconds as u64)
}

/// A Reaper `name` for the Deployment `name`, competing for `lease`.
async fn create_reaper(client: &Client, ns: &str, name: &str, lease: &str) -> Result<()> {
    fixtures::create_reaper(client, ns, name, name, lease_spec(lease)).await
}

/// How the pods of lease `i`'s Deployment stop: after a random time in a band of its
/// own, the three bands covering 0 to [`POD_STOP_MAX_SECONDS`] (0-6.7 s, 6.7-13.3 s,
/// 13.3-20 s), within a grace period that covers the band (7, 14, 20 s), as a workload
/// that exits on SIGTERM in its own time. One lease always hands over quickly (so the
/// short profile keeps many failovers), one always outlives the ttl several times over.
fn pod_stop(i: usize) -> PodStop {
    let band = POD_STOP_MAX_SECONDS as f64 / LEASES as f64;
    let to = band * (i + 1) as f64;
    PodStop {
        grace_seconds: to.ceil() as i64,
        ..PodStop::between(
            Duration::from_secs_f64(band * i as f64),
            Duration::from_secs_f64(to),
        )
    }
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Faults, Deployment changes, reports, audit events and the operators' lease and
/// scaling log lines of one lease between `from` and `to`, in time order.
fn context(
    input: &Input<'_>,
    lease: usize,
    from: checker::Time,
    to: checker::Time,
    logs: &[(String, Vec<PathBuf>)],
    deployment: &str,
) -> String {
    let mut lines: Vec<(checker::Time, String)> = Vec::new();
    for f in input.faults {
        if f.start <= to && f.healed.is_none_or(|h| h >= from) {
            lines.push((
                f.start,
                format!("fault #{} {} {}", f.id, f.kind.name(), f.target),
            ));
            if let Some(h) = f.healed {
                lines.push((h, format!("fault #{} healed", f.id)));
            }
        }
    }
    let within = |at: checker::Time| from <= at && at <= to;
    for s in input
        .samples
        .iter()
        .filter(|s| s.lease == lease && within(s.at))
    {
        let cluster = &input.clusters[s.cluster];
        let line = format!("observed {cluster}: replicas {} ready {}", s.spec, s.ready);
        lines.push((s.at, line));
    }
    lines.extend(pod_lines(input, deployment, from, to));
    for r in input
        .reports
        .iter()
        .filter(|r| r.lease == lease && within(r.reported_at))
    {
        let cluster = &input.clusters[r.cluster];
        let line = format!("report of {cluster}: {} running pod(s)", r.running_pods);
        lines.push((r.reported_at, line));
    }
    for e in input.events[lease].iter().filter(|e| within(e.at)) {
        let line = format!(
            "lease_event {} epoch {} holder {} previous {:?}",
            e.kind, e.epoch, e.holder, e.previous_holder
        );
        lines.push((e.at, line));
    }
    let lease_name = &input.leases[lease];
    for (replica, paths) in logs {
        for path in paths {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            for raw in text.lines() {
                let line = strip_ansi(raw);
                let relevant = line.contains(lease_name.as_str())
                    || line.contains(&format!("deployment=\"{deployment}\""))
                    || line.contains(&format!("deployment={deployment} "));
                if !relevant || line.contains("lease database call failed") {
                    continue;
                }
                let Some(at) = line
                    .split_whitespace()
                    .next()
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                    .map(|t| t.with_timezone(&Utc))
                else {
                    continue;
                };
                if at >= from && at <= to {
                    let message = line.split_once(": ").map_or(line.as_str(), |(_, m)| m);
                    lines.push((at, format!("log {replica}: {message}")));
                }
            }
        }
    }
    lines.sort_by_key(|l| l.0);
    lines
        .iter()
        .map(|(t, l)| format!("  {} {l}", t.format("%H:%M:%S%.3f")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// When each pod of `app` between `from` and `to` appeared, started stopping and was gone.
fn pod_lines(
    input: &Input<'_>,
    app: &str,
    from: checker::Time,
    to: checker::Time,
) -> Vec<(checker::Time, String)> {
    let mut lines = Vec::new();
    for p in input.pods.iter().filter(|p| p.app == app) {
        let c = input.clusters[p.cluster];
        let moments = [
            (Some(p.appeared), "appeared"),
            (p.deleting, "Terminating"),
            (p.gone, "gone"),
        ];
        for (at, what) in moments {
            if let Some(at) = at.filter(|t| *t >= from && *t <= to) {
                lines.push((at, format!("pod {c} {} {what}", p.name)));
            }
        }
    }
    lines
}

fn write_timeline(path: &Path, input: &Input<'_>, analysis: &checker::Analysis) {
    let mut s = String::new();
    for f in input.faults {
        let _ = writeln!(
            s,
            "fault #{} {} {} {} -> {:?}",
            f.id,
            f.kind.name(),
            f.target,
            f.start.format("%H:%M:%S%.3f"),
            f.healed.map(|h| h.format("%H:%M:%S%.3f").to_string())
        );
    }
    for sample in input.samples {
        let _ = writeln!(
            s,
            "{} observed {} {}: replicas {} ready {}",
            sample.at.format("%H:%M:%S%.3f"),
            input.clusters[sample.cluster],
            input.leases[sample.lease],
            sample.spec,
            sample.ready
        );
    }
    let (from, to) = (input.chaos_start - checker::secs(600.0), input.end);
    let mut pods: Vec<(checker::Time, String)> = input
        .deployments
        .iter()
        .flat_map(|d| pod_lines(input, d, from, to))
        .collect();
    pods.sort_by_key(|p| p.0);
    for (at, line) in pods {
        let _ = writeln!(s, "{} {line}", at.format("%H:%M:%S%.3f"));
    }
    for (lease, events) in input.events.iter().enumerate() {
        for e in events {
            let _ = writeln!(
                s,
                "{} lease_event {} {} epoch {} holder {} previous {:?}",
                e.at.format("%H:%M:%S%.3f"),
                input.leases[lease],
                e.kind,
                e.epoch,
                e.holder,
                e.previous_holder
            );
        }
    }
    for f in &analysis.failovers {
        let _ = writeln!(s, "failover {f:?}");
    }
    for o in &analysis.overlaps {
        let _ = writeln!(s, "overlap {o:?}");
    }
    let _ = std::fs::write(path, s);
}
