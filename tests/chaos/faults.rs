//! The fault plan (a pure function of the seed) and the injector that carries it out,
//! one fault at a time: inject, hold, heal, pause, next.
//!
//! The seed fixes the sequence of fault kinds, target choices (as roles such as "the
//! holder of lease 2" or "replica 3"), hold times and pauses. Which process a role
//! names, and everything the system does in between, depends on timing, so a replay
//! takes the same path only approximately.

use std::fs::File;
use std::io::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use chrono::Utc;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng, rngs::StdRng};

use reaper_operator::lease::LeaseStore;

use crate::checker::{Effect, FaultRecord, Kind};
use crate::guarded::{FrozenGuard, Guards};
use crate::infra::{ApiServer, Database, Replica};
use crate::observer::Observer;
use crate::support::fixtures::PodStop;
use crate::support::proxy::Mode;

/// Every kind once per round, in a seeded order, so that a short run sees each kind.
const DECK: [Kind; 16] = [
    Kind::Kill9,
    Kind::Pause,
    Kind::CutReset,
    Kind::CutBlackhole,
    Kind::RestartPgBouncer,
    Kind::RestartPostgres,
    Kind::FailoverPostgres,
    Kind::RestartApiserver,
    Kind::FreezeCluster,
    Kind::CutCluster,
    Kind::StopOperators,
    Kind::RecreateReaper,
    Kind::DeleteDeployment,
    Kind::SecondReaperSameNamespace,
    Kind::SecondReaperOtherNamespace,
    Kind::GuardSigstop,
];

/// Added to every round after the first: crashes and stalls, the commonest faults,
/// come twice as often once every kind has had its turn.
const EXTRA: [Kind; 2] = [Kind::Kill9, Kind::Pause];

#[derive(Clone, Debug)]
pub struct Planned {
    pub kind: Kind,
    /// Picks the target (see [`Injector::resolve_replica`] and friends).
    pub pick: u32,
    pub hold: Duration,
    /// Pause after the heal before the next fault.
    pub gap: Duration,
    /// Fast or immediate PostgreSQL stop; reset or blackhole for a cluster cut; which
    /// object comes back first after a Deployment deletion; the short or the full lease
    /// name for a second Reaper; the operators frozen too, or not, for `guard-sigstop`.
    pub variant: bool,
}

pub struct Plan {
    rng: StdRng,
    deck: Vec<Kind>,
    rounds: usize,
    ttl: f64,
    /// Per lease: how long its workload reports stay credible.
    report_bounds: Vec<f64>,
}

impl Plan {
    pub fn new(seed: u64, ttl: Duration, report_bounds: Vec<Duration>) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            deck: Vec::new(),
            rounds: 0,
            ttl: ttl.as_secs_f64(),
            report_bounds: report_bounds.iter().map(Duration::as_secs_f64).collect(),
        }
    }

    /// Whether every kind has been dealt at least once (the first round is over).
    pub fn dealt_every_kind(&self) -> bool {
        self.rounds > 1 || (self.rounds == 1 && self.deck.is_empty())
    }

    /// The same number of draws for every fault, so the stream never shifts.
    pub fn next_fault(&mut self) -> Planned {
        if self.deck.is_empty() {
            self.deck = DECK.to_vec();
            if self.rounds > 0 {
                self.deck.extend(EXTRA);
            }
            self.rounds += 1;
            self.deck.shuffle(&mut self.rng);
        }
        let kind = self.deck.pop().expect("refilled");
        let pick: u32 = self.rng.random();
        let u: f64 = self.rng.random();
        let g: f64 = self.rng.random();
        let variant: bool = self.rng.random();
        let ttl = self.ttl;
        let (lo, hi) = match kind {
            Kind::Kill9 => (1.0, 6.0),
            // Longer than the ttl, so the lease expires under the stopped process (or
            // the stopped guard's last confirmation runs out).
            Kind::Pause | Kind::GuardSigstop => (ttl + 1.0, ttl + 5.0),
            Kind::CutReset | Kind::CutBlackhole => (1.0, 8.0),
            Kind::RestartPgBouncer | Kind::RestartPostgres => (0.0, 3.0),
            // How long the promoted primary runs without a standby.
            Kind::FailoverPostgres => (0.0, 3.0),
            Kind::RestartApiserver => (1.0, 5.0), // down, plus ~2 s to start
            // Long enough for the frozen cluster's report of the targeted lease
            // (`pick % leases`, as the injector resolves it) to go stale, so that the
            // other cluster takes over: its report bound (which includes the ttl) + 1
            // to 4 s.
            Kind::FreezeCluster => {
                let bound = self.report_bounds[pick as usize % self.report_bounds.len()];
                (bound + 1.0, bound + 4.0)
            }
            Kind::CutCluster => (3.0, 8.0),
            // How long the operators stay down after they exited, or the objects stay
            // away after the deleted Reaper is gone.
            // (They also wait for pods to stop: up to 20 s.)
            Kind::StopOperators | Kind::RecreateReaper | Kind::DeleteDeployment => (1.0, 4.0),
            // How long the second Reaper stays (at least until its verdict is seen).
            Kind::SecondReaperSameNamespace | Kind::SecondReaperOtherNamespace => (2.0, 6.0),
        };
        Planned {
            kind,
            pick,
            hold: Duration::from_secs_f64(lo + u * (hi - lo)),
            gap: Duration::from_secs_f64(1.0 + 3.0 * g),
            variant,
        }
    }
}

/// Prints each line with the seed, the wall-clock time and the time since the start,
/// and appends it to a file.
pub struct FaultLog {
    pub seed: u64,
    pub started: Instant,
    file: Option<File>,
}

impl FaultLog {
    pub fn new(seed: u64, path: &std::path::Path) -> Self {
        Self {
            seed,
            started: Instant::now(),
            file: File::create(path).ok(),
        }
    }

    pub fn line(&mut self, message: &str) {
        let line = format!(
            "[chaos seed={} {} +{:7.2}s] {message}",
            self.seed,
            Utc::now().format("%H:%M:%S%.3f"),
            self.started.elapsed().as_secs_f64()
        );
        eprintln!("{line}");
        if let Some(f) = &mut self.file {
            let _ = writeln!(f, "{line}");
        }
    }
}

pub struct Injector<'a> {
    pub replicas: &'a mut Vec<Replica>,
    pub db: &'a Database,
    pub apiservers: &'a mut [ApiServer; 2],
    pub clients: [Client; 2],
    pub observer: &'a Observer,
    pub leases: &'a [String],
    /// Per lease index: its Deployment and Reaper (one name), and how its pods stop.
    pub deployments: &'a [String],
    pub stops: &'a [PodStop],
    pub clusters: [&'a str; 2],
    /// Where the canary, the Deployments and the Reapers live.
    pub namespace: &'a str,
    /// Where second Reapers of another namespace go.
    pub other_namespace: &'a str,
    /// A direct connection, to look at the rows second Reapers use.
    pub store: &'a LeaseStore,
    pub records: Vec<FaultRecord>,
    /// Lease rows of second Reapers in the other namespace (audited at the end).
    pub extra_leases: Vec<String>,
    /// Replicas that exited without being killed: a finding.
    pub unexpected_exits: Vec<String>,
    /// The guarded workload: cut with its cluster, frozen by `guard-sigstop`.
    pub guards: &'a Guards,
}

impl Injector<'_> {
    fn replica_of_holder(&self, lease: usize) -> Option<usize> {
        let holder = self.observer.holder_of(lease)?;
        self.replicas.iter().position(|r| r.name() == holder)
    }

    /// Three times in four the holder of a lease (when one is known), else any replica.
    fn resolve_replica(&self, pick: u32) -> (usize, String) {
        let lease = (pick / 4) as usize % self.leases.len();
        if !pick.is_multiple_of(4)
            && let Some(r) = self.replica_of_holder(lease)
        {
            return (
                r,
                format!(
                    "{} (holder of {})",
                    self.replicas[r].name(),
                    self.leases[lease]
                ),
            );
        }
        let r = (pick / 4) as usize % self.replicas.len();
        (r, self.replicas[r].name())
    }

    /// The cluster of the holder of lease `pick % leases` (when known), else either.
    pub(crate) fn resolve_cluster(&self, pick: u32) -> (usize, String) {
        let lease = pick as usize % self.leases.len();
        if let Some(r) = self.replica_of_holder(lease) {
            let c = self.replicas[r].config.cluster.clone();
            let i = self.clusters.iter().position(|n| *n == c).unwrap_or(0);
            return (i, format!("cluster {c} (holds {})", self.leases[lease]));
        }
        let i = (pick / 3) as usize % 2;
        (i, format!("cluster {}", self.clusters[i]))
    }

    pub(crate) fn replicas_in(&self, cluster: usize) -> Vec<usize> {
        (0..self.replicas.len())
            .filter(|&r| self.replicas[r].config.cluster == self.clusters[cluster])
            .collect()
    }

    /// Restarts replicas that exited on their own (recording it).
    pub fn check_exits(&mut self, log: &mut FaultLog) {
        for r in self.replicas.iter_mut() {
            if let Some(status) = r.exited() {
                let line = format!(
                    "replica {} exited by itself ({status}); restarting it",
                    r.name()
                );
                log.line(&line);
                self.unexpected_exits.push(line);
                r.stop_and_archive();
                r.start();
            }
        }
    }

    /// Injects one fault, holds it, heals it; records it.
    pub async fn run(&mut self, id: usize, p: &Planned, log: &mut FaultLog) -> Result<()> {
        let kind = p.kind;
        let hold = p.hold;
        let (effect, target, guard_cluster) = self.resolve(id, p);
        let targets: Vec<usize> = match &effect {
            Effect::Unable(rs) | Effect::Cut(rs) | Effect::Stopped(rs) => rs.clone(),
            _ => Vec::new(),
        };
        let (cut_mode, detail) = Self::cut_mode(p);
        log.line(&format!(
            "fault #{id} {}: {target}{detail}, for {:.1} s",
            kind.name(),
            hold.as_secs_f64()
        ));
        let start = Utc::now();
        let mut record = FaultRecord {
            id,
            kind,
            target: format!("{target}{detail}"),
            effect: effect.clone(),
            start,
            healed: None,
            problems: Vec::new(),
            frozen_guards: Vec::new(),
        };
        let result = match kind {
            Kind::StopOperators => self
                .stop_operators(&targets, hold, &mut record.problems, log)
                .await
                .map(|()| None),
            Kind::RecreateReaper
            | Kind::DeleteDeployment
            | Kind::SecondReaperSameNamespace
            | Kind::SecondReaperOtherNamespace => self
                .object_fault(id, p, &effect, &mut record.problems, log)
                .await
                .map(|()| None),
            _ => {
                let mut frozen = Vec::new();
                let result = self
                    .inject_and_heal(
                        kind,
                        &effect,
                        &targets,
                        cut_mode,
                        hold,
                        p.variant,
                        (guard_cluster, &mut frozen),
                    )
                    .await;
                record.frozen_guards = frozen.iter().map(|g| (g.cluster, g.lease, g.run)).collect();
                if kind == Kind::GuardSigstop {
                    let runs: Vec<String> = frozen
                        .iter()
                        .map(|g| format!("{} run {}", self.leases[g.lease], g.run))
                        .collect();
                    log.line(&format!("  guards it froze: {}", runs.join(", ")));
                }
                result
            }
        };
        for problem in &record.problems {
            log.line(&format!("fault #{id} {}: PROBLEM: {problem}", kind.name()));
        }
        record.healed = Some(Utc::now());
        let result = Self::log_outcome(log, id, kind, start, result);
        self.records.push(record);
        result
    }

    /// What fault `p` does, to whom (as the log names it), and the cluster whose guards a
    /// cluster fault hits too.
    fn resolve(&self, id: usize, p: &Planned) -> (Effect, String, Option<usize>) {
        let kind = p.kind;
        let mut guard_cluster = None;
        let (effect, target) = match kind {
            Kind::Kill9 | Kind::Pause | Kind::CutReset | Kind::CutBlackhole => {
                let (r, target) = self.resolve_replica(p.pick);
                let effect = match kind {
                    Kind::Kill9 | Kind::Pause => Effect::Unable(vec![r]),
                    _ => Effect::Cut(vec![r]),
                };
                (effect, target)
            }
            Kind::FreezeCluster | Kind::CutCluster => {
                let (c, target) = self.resolve_cluster(p.pick);
                if kind == Kind::CutCluster {
                    guard_cluster = Some(c);
                }
                let rs = self.replicas_in(c);
                let effect = match kind {
                    Kind::FreezeCluster => Effect::Unable(rs),
                    _ => Effect::Cut(rs),
                };
                (effect, target)
            }
            // The guards of the cluster holding a lease (not their commands); with the
            // variant, both of its operator replicas too, so that the lease moves to
            // the other cluster while only the watchdogs can stop the commands.
            Kind::GuardSigstop => {
                let (c, target) = self.resolve_cluster(p.pick);
                guard_cluster = Some(c);
                let (rs, detail) = if p.variant {
                    (self.replicas_in(c), " and both its replicas")
                } else {
                    (Vec::new(), "")
                };
                (
                    Effect::Unable(rs),
                    format!("the guards of {target}{detail}"),
                )
            }
            Kind::RestartApiserver => {
                let (holder_cluster, _) = self.resolve_cluster(p.pick / 2);
                let c = if p.pick.is_multiple_of(2) {
                    holder_cluster
                } else {
                    1 - holder_cluster
                };
                (
                    Effect::ApiserverDown(c),
                    format!("apiserver of cluster {}", self.clusters[c]),
                )
            }
            Kind::StopOperators => {
                let (c, target) = self.resolve_cluster(p.pick);
                (
                    Effect::Stopped(self.replicas_in(c)),
                    format!("both replicas of {target} (SIGTERM)"),
                )
            }
            Kind::RecreateReaper
            | Kind::DeleteDeployment
            | Kind::SecondReaperSameNamespace
            | Kind::SecondReaperOtherNamespace => self.resolve_object_fault(id, p),
            Kind::RestartPgBouncer => (Effect::DatabaseDown, "PgBouncer".to_owned()),
            Kind::FailoverPostgres => (
                Effect::DatabaseDown,
                "PostgreSQL primary (kill -9, the synchronous standby promoted)".to_owned(),
            ),
            Kind::RestartPostgres => (
                Effect::DatabaseDown,
                format!(
                    "PostgreSQL (pg_ctl stop -m {})",
                    if p.variant { "immediate" } else { "fast" }
                ),
            ),
        };
        (effect, target, guard_cluster)
    }

    /// How a cut fault cuts, and what the log adds to its target.
    fn cut_mode(p: &Planned) -> (Mode, String) {
        let kind = p.kind;
        let cut_mode = match kind {
            Kind::CutReset => Mode::Reset,
            Kind::CutBlackhole => Mode::Blackhole,
            _ if p.variant => Mode::Blackhole,
            _ => Mode::Reset,
        };
        let mode_name = if cut_mode == Mode::Reset {
            "reset"
        } else {
            "blackhole"
        };
        let detail = match kind {
            Kind::CutCluster => format!(" ({mode_name})"),
            _ => String::new(),
        };
        (cut_mode, detail)
    }

    /// Logs how the fault ended: healed (and when the database was back), or failed.
    fn log_outcome(
        log: &mut FaultLog,
        id: usize,
        kind: Kind,
        start: chrono::DateTime<Utc>,
        result: Result<Option<chrono::DateTime<Utc>>>,
    ) -> Result<()> {
        let took = |t: chrono::DateTime<Utc>| (t - start).num_milliseconds() as f64 / 1000.0;
        match result {
            Ok(restarted) => {
                let verb = if kind == Kind::FailoverPostgres {
                    "promoted"
                } else {
                    "restarted"
                };
                let detail = restarted.map_or(String::new(), |t| {
                    format!(
                        " ({verb} after {:.1} s, then usable through PgBouncer)",
                        took(t)
                    )
                });
                log.line(&format!(
                    "fault #{id} {} healed after {:.1} s{detail}",
                    kind.name(),
                    took(Utc::now())
                ));
                Ok(())
            }
            Err(e) => {
                log.line(&format!("fault #{id} {} FAILED: {e:#}", kind.name()));
                Err(e)
            }
        }
    }

    /// `guards`: the cluster whose guards the fault hits too, and where to put the
    /// guards it froze.
    #[allow(clippy::too_many_arguments)]
    async fn inject_and_heal(
        &mut self,
        kind: Kind,
        effect: &Effect,
        targets: &[usize],
        cut_mode: Mode,
        hold: Duration,
        variant: bool,
        guards: (Option<usize>, &mut Vec<FrozenGuard>),
    ) -> Result<Option<chrono::DateTime<Utc>>> {
        let (guard_cluster, frozen) = guards;
        match kind {
            Kind::Kill9 => {
                for &r in targets {
                    self.replicas[r].kill9()?;
                }
                tokio::time::sleep(hold).await;
                self.start_and_wait_ready(targets).await?;
            }
            Kind::Pause | Kind::FreezeCluster => {
                for &r in targets {
                    self.replicas[r].signal("STOP")?;
                }
                tokio::time::sleep(hold).await;
                for &r in targets {
                    self.replicas[r].signal("CONT")?;
                }
            }
            Kind::GuardSigstop => {
                // The guards first: their last confirmation is then as fresh as it gets.
                if let Some(c) = guard_cluster {
                    *frozen = self.guards.freeze(c);
                }
                for &r in targets {
                    self.replicas[r].signal("STOP")?;
                }
                tokio::time::sleep(hold).await;
                for &r in targets {
                    self.replicas[r].signal("CONT")?;
                }
                self.guards.thaw(frozen);
            }
            Kind::StopOperators
            | Kind::RecreateReaper
            | Kind::DeleteDeployment
            | Kind::SecondReaperSameNamespace
            | Kind::SecondReaperOtherNamespace => {
                return Err(anyhow!("{} is not injected here", kind.name()));
            }
            Kind::CutReset | Kind::CutBlackhole | Kind::CutCluster => {
                for &r in targets {
                    self.replicas[r].cut(cut_mode);
                }
                if let Some(c) = guard_cluster {
                    self.guards.cut(c, cut_mode);
                }
                tokio::time::sleep(hold).await;
                for &r in targets {
                    self.replicas[r].cut(Mode::Pass);
                }
                if let Some(c) = guard_cluster {
                    self.guards.cut(c, Mode::Pass);
                }
            }
            Kind::RestartPgBouncer | Kind::RestartPostgres | Kind::FailoverPostgres => {
                return self.database_fault(kind, hold, variant).await.map(Some);
            }
            Kind::RestartApiserver => self.restart_apiserver(effect, hold).await?,
        }
        Ok(None)
    }

    /// Starts the replicas `targets` again; a restart is healed once each new process
    /// answers /readyz (database reachable, caches synced).
    pub(crate) async fn start_and_wait_ready(&mut self, targets: &[usize]) -> Result<()> {
        for &r in targets {
            self.replicas[r].start();
        }
        for &r in targets {
            let port = self.replicas[r].http_port().unwrap_or_default();
            wait_ready(port, Duration::from_secs(60))
                .await
                .with_context(|| format!("{} after restart", self.replicas[r].name()))?;
        }
        Ok(())
    }

    /// Stops PgBouncer or PostgreSQL, or fails PostgreSQL over, for `hold`; returns when
    /// the database was back (restarted, or the standby promoted), once the operators'
    /// path works again.
    async fn database_fault(
        &mut self,
        kind: Kind,
        hold: Duration,
        variant: bool,
    ) -> Result<chrono::DateTime<Utc>> {
        // A database fault is healed once the operators' path works again, which after
        // a PostgreSQL restart can be much later than the restart itself.
        let usable = Duration::from_secs(60);
        let back = match kind {
            Kind::RestartPgBouncer => {
                self.db.stop_pgbouncer().await?;
                tokio::time::sleep(hold).await;
                self.db.start_pgbouncer().await?;
                Utc::now()
            }
            Kind::RestartPostgres => {
                let mode = if variant { "immediate" } else { "fast" };
                self.db.stop_postgres(mode).await?;
                tokio::time::sleep(hold).await;
                self.db.start_postgres().await?;
                Utc::now()
            }
            Kind::FailoverPostgres => {
                self.db.fail_over().await?;
                let promoted = Utc::now();
                tokio::time::sleep(hold).await;
                self.db.add_standby().await?;
                promoted
            }
            _ => return Err(anyhow!("{} is not a database fault", kind.name())),
        };
        self.db.wait_usable(usable).await?;
        Ok(back)
    }

    /// Stops the API server of the effect's cluster for `hold`; healed once it answers
    /// and the cluster runs a pod again.
    async fn restart_apiserver(&mut self, effect: &Effect, hold: Duration) -> Result<()> {
        let Effect::ApiserverDown(c) = *effect else {
            return Err(anyhow!("apiserver fault without a cluster"));
        };
        self.apiservers[c].stop().await?;
        tokio::time::sleep(hold).await;
        self.apiservers[c].start()?;
        wait_apiserver(&self.clients[c], Duration::from_secs(60))
            .await
            .with_context(|| format!("apiserver of {} after restart", self.clusters[c]))?;
        // Healed once the cluster runs a pod again: after an apiserver crash the
        // controller-manager, scheduler and kwok reconnect with their own back-off.
        canary(&self.clients[c], self.namespace)
            .await
            .with_context(|| format!("canary pod in {} after restart", self.clusters[c]))?;
        Ok(())
    }
}

pub const CANARY: &str = "canary";

/// Scales the canary Deployment to 1, waits for its pod to be ready, scales it back to
/// 0 and waits for the pod to be gone (60 s at most each).
pub async fn canary(client: &Client, namespace: &str) -> Result<()> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    for replicas in [1, 0] {
        let deadline = Instant::now() + Duration::from_secs(60);
        let patch = Patch::Merge(serde_json::json!({ "spec": { "replicas": replicas } }));
        loop {
            let scaled = deployments
                .patch_scale(CANARY, &PatchParams::default(), &patch)
                .await;
            let done = scaled.is_ok()
                && if replicas == 1 {
                    deployments
                        .get(CANARY)
                        .await
                        .ok()
                        .and_then(|d| d.status)
                        .and_then(|s| s.ready_replicas)
                        .unwrap_or(0)
                        >= 1
                } else {
                    pods.list(&ListParams::default().labels(&format!("app={CANARY}")))
                        .await
                        .is_ok_and(|l| l.items.is_empty())
                };
            if done {
                break;
            }
            if Instant::now() > deadline {
                return Err(anyhow!("the canary did not reach {replicas} replica(s)"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// Until `GET /readyz` on the replica's port answers 200.
async fn wait_ready(port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match crate::infra::http_get(port, "/readyz").await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Until the apiserver answers a list again.
pub async fn wait_apiserver(client: &Client, timeout: Duration) -> Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = tokio::time::timeout(
            Duration::from_secs(2),
            api.list(&ListParams::default().limit(1)),
        )
        .await;
        match attempt {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) if Instant::now() > deadline => return Err(e.into()),
            Err(_) if Instant::now() > deadline => return Err(anyhow!("timed out")),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}
