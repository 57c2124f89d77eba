//! Faults that people cause rather than machines: the operator scaled to 0 in one
//! cluster, a Reaper deleted and created again, a Deployment deleted before its Reaper,
//! and a second Reaper naming a lease that is already used (in the same namespace: it
//! must be refused as a conflict; in another namespace: refused as outside its
//! namespace, or, naming the same lease within its own namespace, given a row of its
//! own).
//!
//! Each records what it finds wrong in the fault's `problems` (violations), besides what
//! the checker finds in the recorded pods.

use crate::support::id;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::apps::v1::Deployment;
use kube::Resource;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use reaper_operator::reaper::{Phase, Reaper, ReaperStatus};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::checker::{Effect, Kind};
use crate::faults::{FaultLog, Injector, Planned};
use crate::support::fixtures::{self, PodStop};

/// How long a deleted Reaper may take to be finalized: its pods' longest stop, a
/// requeue and margin.
const FINALIZE_BOUND: Duration = Duration::from_secs(crate::POD_STOP_MAX_SECONDS + 25);
/// How long a second Reaper may take to show its verdict (refused, or leading its own
/// row).
const VERDICT_BOUND: Duration = Duration::from_secs(20);

impl Injector<'_> {
    /// Effect and target of a fault on lease `pick % leases` in the cluster of its holder.
    pub(crate) fn resolve_object_fault(&self, id: usize, p: &Planned) -> (Effect, String) {
        let (cluster, where_) = self.resolve_cluster(p.pick);
        let lease = p.pick as usize % self.leases.len();
        let name = &self.deployments[lease];
        match p.kind {
            Kind::RecreateReaper => (
                Effect::Objects { cluster, lease },
                format!("Reaper {name} in {where_}"),
            ),
            Kind::DeleteDeployment => (
                Effect::Objects { cluster, lease },
                format!(
                    "Deployment {name}, {} ms later its Reaper, in {where_}",
                    deletion_gap(p).as_millis()
                ),
            ),
            _ => {
                let second = second_name(id);
                let (ns, lease_name, verdict) = self.second_reaper_plan(p, lease);
                let refused = verdict != Verdict::OwnRow;
                (
                    Effect::SecondReaper {
                        cluster,
                        lease,
                        deployment: refused.then(|| second.clone()),
                    },
                    format!(
                        "Reaper {ns}/{second} naming lease {lease_name:?} in {where_}, to be {}",
                        verdict.describe()
                    ),
                )
            }
        }
    }

    /// Where a second Reaper goes, the lease name it gives, and what must become of it:
    /// in the lease's namespace, its name as written (refused: one Reaper per lease in
    /// a cluster); in the other namespace, either that same name (refused: outside its
    /// namespace) or the same name within its own namespace (a row of its own).
    fn second_reaper_plan(&self, p: &Planned, lease: usize) -> (String, String, Verdict) {
        let full = self.leases[lease].clone();
        if p.kind == Kind::SecondReaperSameNamespace {
            return (self.namespace.to_owned(), full, Verdict::Conflict);
        }
        let ns = self.other_namespace.to_owned();
        if p.variant {
            return (ns, full, Verdict::OutsideNamespace);
        }
        let short = full
            .strip_prefix(&format!("{}.", self.namespace))
            .unwrap_or(&full);
        let own = format!("{ns}.{short}");
        (ns, own, Verdict::OwnRow)
    }

    /// SIGTERM to both replicas of a cluster (the operator scaled to 0): each hands over
    /// the leases it holds, after their pods have stopped, and exits; after `down` both
    /// start again.
    pub(crate) async fn stop_operators(
        &mut self,
        replicas: &[usize],
        down: Duration,
        problems: &mut Vec<String>,
        log: &mut FaultLog,
    ) -> Result<()> {
        let started = Instant::now();
        for &r in replicas {
            self.replicas[r].signal("TERM")?;
        }
        // The operator gives its handovers the shutdown timeout + 5 s.
        let bound = Duration::from_secs(crate::SHUTDOWN_TIMEOUT_SECONDS + 10);
        let mut running: Vec<usize> = replicas.to_vec();
        while !running.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let replicas = &mut *self.replicas;
            running.retain(|&r| {
                let Some(status) = replicas[r].exited() else {
                    return true;
                };
                log.line(&format!(
                    "  {} exited ({status}) {:.1} s after SIGTERM",
                    replicas[r].name(),
                    started.elapsed().as_secs_f64()
                ));
                replicas[r].stop_and_archive();
                false
            });
            if started.elapsed() > bound {
                for &r in &running {
                    problems.push(format!(
                        "{} still ran {bound:?} after SIGTERM (shutdown timeout + 10 s)",
                        self.replicas[r].name()
                    ));
                    self.replicas[r].kill9()?;
                }
                break;
            }
        }
        tokio::time::sleep(down).await;
        self.start_and_wait_ready(replicas).await
    }

    /// The Kubernetes-object faults: delete and create again, or add a second Reaper and
    /// remove it.
    pub(crate) async fn object_fault(
        &mut self,
        id: usize,
        p: &Planned,
        effect: &Effect,
        problems: &mut Vec<String>,
        log: &mut FaultLog,
    ) -> Result<()> {
        match (p.kind, effect) {
            (Kind::RecreateReaper, &Effect::Objects { cluster, lease }) => {
                let client = self.clients[cluster].clone();
                let name = &self.deployments[lease];
                let api: Api<Reaper> = Api::namespaced(client.clone(), self.namespace);
                delete_and_wait(&api, name, FINALIZE_BOUND, problems, log).await?;
                tokio::time::sleep(p.hold).await;
                crate::create_reaper(&client, self.namespace, name, &self.leases[lease]).await
            }
            (Kind::DeleteDeployment, &Effect::Objects { cluster, lease }) => {
                self.delete_deployment_then_reaper(p, cluster, lease, problems, log)
                    .await
            }
            (_, Effect::SecondReaper { cluster, lease, .. }) => {
                let name = second_name(id);
                self.second_reaper(p, &name, *cluster, *lease, problems, log)
                    .await
            }
            _ => Ok(()),
        }
    }

    /// As `kubectl delete -f` of a file listing the Deployment before its Reaper; both
    /// come back after the pause, in an order the plan chooses.
    async fn delete_deployment_then_reaper(
        &mut self,
        p: &Planned,
        cluster: usize,
        lease: usize,
        problems: &mut Vec<String>,
        log: &mut FaultLog,
    ) -> Result<()> {
        let client = self.clients[cluster].clone();
        let ns = self.namespace;
        let name = &self.deployments[lease];
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
        let reapers: Api<Reaper> = Api::namespaced(client.clone(), ns);
        deployments
            .delete(name, &DeleteParams::background())
            .await
            .with_context(|| format!("delete Deployment {name}"))?;
        tokio::time::sleep(deletion_gap(p)).await;
        delete_and_wait(&reapers, name, FINALIZE_BOUND, problems, log).await?;
        delete_and_wait(&deployments, name, Duration::from_secs(30), problems, log).await?;
        tokio::time::sleep(p.hold).await;
        let stop = self.stops[lease];
        let deployment = || {
            fixtures::create_deployment_with_stop(&client, ns, name, "Recreate", json!({}), stop)
        };
        if p.variant {
            crate::create_reaper(&client, ns, name, &self.leases[lease]).await?;
            deployment().await
        } else {
            deployment().await?;
            crate::create_reaper(&client, ns, name, &self.leases[lease]).await
        }
    }

    /// A second Reaper naming lease `lease`, with a Deployment of its own: in the same
    /// namespace it must be refused (and its Deployment never runs a pod: the checker
    /// looks); in the other namespace it leads a row of its own. Removed at the heal.
    async fn second_reaper(
        &mut self,
        p: &Planned,
        name: &str,
        cluster: usize,
        lease: usize,
        problems: &mut Vec<String>,
        log: &mut FaultLog,
    ) -> Result<()> {
        let (ns, lease_name, expected) = self.second_reaper_plan(p, lease);
        let ns = ns.as_str();
        let client = self.clients[cluster].clone();
        // Its pods stop in a second: only a Reaper with a row of its own runs one.
        fixtures::create_deployment_with_stop(
            &client,
            ns,
            name,
            "Recreate",
            json!({}),
            PodStop::default(),
        )
        .await?;
        fixtures::create_reaper(&client, ns, name, name, crate::lease_spec(&lease_name)).await?;
        let api: Api<Reaper> = Api::namespaced(client.clone(), ns);
        let held = Instant::now();
        let verdict = match expected {
            Verdict::OwnRow => {
                self.extra_leases.push(lease_name.clone());
                self.wait_own_row(&api, name, &lease_name, cluster).await
            }
            refused => wait_refused(&api, name, refused.reason()).await,
        };
        match verdict {
            Ok(seen) => log.line(&format!(
                "  {ns}/{name}: {seen} after {:.1} s",
                held.elapsed().as_secs_f64()
            )),
            Err(problem) => problems.push(format!("{ns}/{name}: {problem}")),
        }
        tokio::time::sleep(p.hold.saturating_sub(held.elapsed())).await;
        delete_and_wait(&api, name, FINALIZE_BOUND, problems, log).await?;
        let deployments: Api<Deployment> = Api::namespaced(client, ns);
        deployments
            .delete(name, &DeleteParams::background())
            .await
            .with_context(|| format!("delete Deployment {ns}/{name}"))?;
        Ok(())
    }

    /// Until the Reaper leads the row `row` (status and database), held by a replica of
    /// `cluster`.
    async fn wait_own_row(
        &self,
        api: &Api<Reaper>,
        name: &str,
        row: &str,
        cluster: usize,
    ) -> Result<String, String> {
        let prefix = format!("{}/", self.clusters[cluster]);
        let verdict = format!("leads its own row {row}");
        let missed = format!("did not lead a row of its own ({row})");
        poll_status(api, name, verdict, missed, async |status: &ReaperStatus| {
            let leading =
                status.phase == Some(Phase::Leading) && status.lease_name.as_deref() == Some(row);
            let held = match self.store.get(&id::lease(row)).await {
                Ok(Some(lease)) => lease.is_held() && lease.holder.starts_with(&prefix),
                _ => false,
            };
            leading && held
        })
        .await
    }
}

/// What must become of a second Reaper.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    /// Refused: an older Reaper of the cluster uses the lease.
    Conflict,
    /// Refused: the lease is another namespace's.
    OutsideNamespace,
    /// It leads a row of its own.
    OwnRow,
}

impl Verdict {
    fn reason(self) -> &'static str {
        match self {
            Verdict::Conflict => "LeaseNameConflict",
            Verdict::OutsideNamespace => "LeaseNameOutsideNamespace",
            Verdict::OwnRow => "",
        }
    }

    fn describe(self) -> String {
        match self {
            Verdict::OwnRow => "leading a row of its own".into(),
            refused => format!("refused ({})", refused.reason()),
        }
    }
}

/// Until the Reaper says `Leader=False` with `reason` (phase Invalid).
async fn wait_refused(api: &Api<Reaper>, name: &str, reason: &str) -> Result<String, String> {
    let verdict = format!("refused with {reason}");
    let missed = format!("not refused with Leader=False/{reason} (phase Invalid)");
    poll_status(api, name, verdict, missed, async |status: &ReaperStatus| {
        let refused = status
            .conditions
            .iter()
            .any(|c| c.type_ == "Leader" && c.status == "False" && c.reason == reason);
        refused && status.phase == Some(Phase::Invalid)
    })
    .await
}

/// Reads the Reaper `name` every 200 ms until `reached` accepts its status, for at most
/// [`VERDICT_BOUND`]: then `verdict`, else the error that it `missed` in time, with the
/// last status read.
async fn poll_status(
    api: &Api<Reaper>,
    name: &str,
    verdict: String,
    missed: String,
    mut reached: impl AsyncFnMut(&ReaperStatus) -> bool,
) -> Result<String, String> {
    let mut last = None;
    let deadline = Instant::now() + VERDICT_BOUND;
    while Instant::now() < deadline {
        if let Ok(reaper) = api.get(name).await {
            let status = reaper.status.unwrap_or_default();
            if reached(&status).await {
                return Ok(verdict);
            }
            last = Some(status);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(format!(
        "{missed} within {VERDICT_BOUND:?}; last status: {}",
        describe(last.as_ref())
    ))
}

fn second_name(id: usize) -> String {
    format!("second-reaper-{id}")
}

/// Between the Deployment's deletion and its Reaper's: 0 to 2 s, from the plan.
fn deletion_gap(p: &Planned) -> Duration {
    Duration::from_millis(u64::from(p.pick >> 16) % 2000)
}

fn describe(status: Option<&ReaperStatus>) -> String {
    let Some(s) = status else {
        return "none".into();
    };
    let leader = s.conditions.iter().find(|c| c.type_ == "Leader");
    format!(
        "phase {:?}, leaseName {:?}, Leader {:?}",
        s.phase,
        s.lease_name,
        leader.map(|c| (&c.status, &c.reason))
    )
}

/// Deletes `name` (background) and waits until it is gone. A Reaper still there after
/// `bound` is a problem: its finalizer is then removed by hand so that the run goes on.
async fn delete_and_wait<K>(
    api: &Api<K>,
    name: &str,
    bound: Duration,
    problems: &mut Vec<String>,
    log: &mut FaultLog,
) -> Result<()>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    let started = Instant::now();
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("delete {kind} {name}")),
    }
    let mut forced = false;
    loop {
        if api.get_opt(name).await?.is_none() {
            break;
        }
        if started.elapsed() > bound && !forced {
            problems.push(format!(
                "{kind} {name} still there {:.0} s after its deletion; removing its finalizers",
                bound.as_secs_f64()
            ));
            let patch = Patch::Merge(json!({"metadata": {"finalizers": null}}));
            api.patch(name, &PatchParams::default(), &patch).await?;
            forced = true;
        }
        anyhow::ensure!(
            started.elapsed() < bound * 2,
            "{kind} {name} is not gone after {:?}",
            bound * 2
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    log.line(&format!(
        "  {kind} {name} gone {:.1} s after its deletion",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}
