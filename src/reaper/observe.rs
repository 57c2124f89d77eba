//! What a reconcile reads from Kubernetes: the singleton Deployment, its pods (still
//! counted while they stop, and after the Deployment is gone), and what could run a
//! second pod.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, ListParams};
use kube::core::Selector;
use kube::{Client, ResourceExt};

use super::reconcile::{Error, steady_requeue};
use super::summary::{DeploymentSummary, PodSelector, PodSummary};
use super::watches::Caches;
use crate::config::LeaseTimings;
use crate::lease::{ReportTiming, WorkloadCounts};

/// What this cluster's workload looks like.
pub struct Workload {
    pub deployment: Option<DeploymentSummary>,
    /// The label selector its pods were counted by: the Deployment's, or the one
    /// remembered from it once it is gone.
    pub selector: Option<String>,
    pub counts: WorkloadCounts,
    /// How long its pods may take to stop once told to (their grace period).
    pub stop_grace: Duration,
}

impl Workload {
    /// What to report when the workload cannot be observed (the API server does not
    /// answer): one pod that may be running, stopping within the default grace period.
    /// Silence would read as "this cluster is dead" once its report goes stale.
    pub fn unobservable() -> Self {
        Self {
            deployment: None,
            selector: None,
            counts: WorkloadCounts {
                replicas: 1,
                running_pods: 1,
                ready_pods: 0,
            },
            stop_grace: DEFAULT_GRACE,
        }
    }

    /// How other clusters judge this cluster's report. A cluster cut off from the
    /// database last reported at most one refresh before its last renew; its fence fires
    /// at the first elector tick after the renew deadline (at most a retry period
    /// late), and its pod then takes up to its grace period to stop. So the report stays
    /// credible for refresh + ttl + retry + grace: past that, the pod is gone with a
    /// margin of ttl − renew deadline for the API server to act.
    pub fn report_timing(&self, timings: LeaseTimings) -> ReportTiming {
        let refresh = steady_requeue(timings);
        ReportTiming {
            stale_after: refresh + timings.ttl + timings.retry_period + self.stop_grace,
            refresh,
        }
    }
}

/// What Kubernetes gives a pod that sets no terminationGracePeriodSeconds.
const DEFAULT_GRACE: Duration = Duration::from_secs(30);

/// Reads the Deployment `name` and counts its pods from the API server. When the
/// Deployment is gone its pods may still be stopping (deletion cascades to them in the
/// background), so they are counted by `remembered_selector`. A workload whose pods
/// cannot be counted is an error, never "0 pods".
pub async fn observe_workload(
    client: &Client,
    ns: &str,
    name: &str,
    remembered_selector: Option<&str>,
) -> Result<Workload, Error> {
    let deployments: Api<DeploymentSummary> = Api::namespaced(client.clone(), ns);
    let deployment = deployments.get_opt(name).await?;
    let selector = match &deployment {
        Some(d) => Some(pod_selector(d)?.to_string()),
        None => remembered_selector.map(str::to_owned),
    };
    let (running_pods, ready_pods) = match &selector {
        Some(selector) => count_pods(client, ns, selector).await?,
        // Never seen, so never scaled up by this operator: nothing of it to count.
        None => (0, 0),
    };
    Ok(workload(deployment, selector, running_pods, ready_pods))
}

/// The same as [`observe_workload`], from the watch caches: `None` when they cannot
/// answer (not listed yet, a watch failing, or a Deployment gone whose pods are counted
/// by a remembered selector string), so the caller asks the API server.
pub fn observe_cached(
    caches: &Caches,
    ns: &str,
    name: &str,
    remembered_selector: Option<&str>,
) -> Result<Option<Workload>, Error> {
    if !caches.live() {
        return Ok(None);
    }
    let Some(deployment) = caches.deployment(ns, name) else {
        return Ok(match remembered_selector {
            Some(_) => None,
            None => Some(workload(None, None, 0, 0)),
        });
    };
    let selector = pod_selector(&deployment)?;
    let pods = caches.pods_matching(ns, selector);
    let (running_pods, ready_pods) = tally(pods.iter().map(|p| &**p));
    Ok(Some(workload(
        Some((*deployment).clone()),
        Some(selector.to_string()),
        running_pods,
        ready_pods,
    )))
}

fn workload(
    deployment: Option<DeploymentSummary>,
    selector: Option<String>,
    running_pods: i32,
    ready_pods: i32,
) -> Workload {
    let replicas = deployment
        .as_ref()
        .map_or(0, |d| d.spec.replicas.unwrap_or(1));
    let running_pods = match &deployment {
        Some(d) => running_pods.max(unsettled_pods(d)),
        None => running_pods,
    };
    let stop_grace = deployment
        .as_ref()
        .and_then(|d| d.spec.termination_grace_period_seconds)
        .map_or(DEFAULT_GRACE, |s| Duration::from_secs(s.max(0) as u64));
    Workload {
        deployment,
        selector,
        stop_grace,
        counts: WorkloadCounts {
            replicas,
            running_pods,
            ready_pods,
        },
    }
}

/// Pods the Deployment may have that a pod list can miss: those its status counts
/// (`terminatingReplicas`, beta and on by default since Kubernetes 1.35, adds the
/// stopping ones; it cannot replace the pod list, which still works once the Deployment
/// is deleted and on clusters without that field), and while its controller has not yet
/// seen the latest spec (a scale just made), at least one if it had or wants any (its
/// ReplicaSet may be creating one right now).
fn unsettled_pods(d: &DeploymentSummary) -> i32 {
    let status = d.status.clone().unwrap_or_default();
    let counted = status.replicas.unwrap_or(0) + status.terminating_replicas.unwrap_or(0);
    let settled = status.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0);
    let wanted = d.spec.replicas.unwrap_or(1);
    if !settled && (wanted > 0 || counted > 0) {
        counted.max(1)
    } else {
        counted
    }
}

/// The Deployment's full label selector (`matchLabels` and `matchExpressions`). One that
/// selects everything, or cannot be parsed, is refused: the pods could not be told apart
/// from any other pod.
pub fn pod_selector(deployment: &DeploymentSummary) -> Result<&Selector, Error> {
    match &deployment.spec.selector {
        PodSelector::Invalid(reason) => Err(Error::Selector(deployment.name_any(), reason.clone())),
        PodSelector::Valid(selector) if selector.selects_all() => Err(Error::Selector(
            deployment.name_any(),
            "it selects every pod".into(),
        )),
        PodSelector::Valid(selector) => Ok(selector),
    }
}

/// Pods matching `selector` that have not finished (terminating ones count: they may
/// still be acting), and how many of them are ready.
async fn count_pods(client: &Client, ns: &str, selector: &str) -> Result<(i32, i32), Error> {
    let pods: Api<PodSummary> = Api::namespaced(client.clone(), ns);
    let list = pods.list(&ListParams::default().labels(selector)).await?;
    Ok(tally(list.items.iter()))
}

fn tally<'a>(pods: impl Iterator<Item = &'a PodSummary>) -> (i32, i32) {
    pods.fold((0, 0), |(running, ready), pod| {
        (
            running + i32::from(pod.running()),
            ready + i32::from(pod.ready()),
        )
    })
}

/// `Some(maxSurge)` when a rollout could briefly run two pods.
pub fn rolling_surge(deployment: &DeploymentSummary) -> Option<String> {
    let strategy = deployment.spec.strategy.as_ref();
    let kind = strategy
        .and_then(|s| s.type_.as_deref())
        .unwrap_or("RollingUpdate");
    if kind != "RollingUpdate" {
        return None;
    }
    let surge = strategy
        .and_then(|s| s.rolling_update.as_ref())
        .and_then(|r| r.max_surge.clone())
        .unwrap_or(IntOrString::String("25%".into()));
    match surge {
        IntOrString::Int(0) => None,
        IntOrString::String(s) if s == "0" || s == "0%" => None,
        IntOrString::Int(n) => Some(n.to_string()),
        IntOrString::String(s) => Some(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};

    fn deployment(selector: LabelSelector) -> DeploymentSummary {
        let mut d = DeploymentSummary::default();
        d.metadata.name = Some("d".into());
        d.spec.selector = selector.into();
        d
    }

    #[test]
    fn selector_keeps_match_expressions() {
        let selector = LabelSelector {
            match_labels: Some([("app".to_string(), "r".to_string())].into()),
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "tier".into(),
                operator: "In".into(),
                values: Some(vec!["a".into(), "b".into()]),
            }]),
        };
        assert_eq!(
            pod_selector(&deployment(selector)).unwrap().to_string(),
            "app=r,tier in (a,b)"
        );
        // Only expressions: counted by them, not "no labels, so 0 pods".
        let only_expressions = LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "app".into(),
                operator: "Exists".into(),
                values: None,
            }]),
        };
        assert_eq!(
            pod_selector(&deployment(only_expressions))
                .unwrap()
                .to_string(),
            "app"
        );
        assert!(pod_selector(&deployment(LabelSelector::default())).is_err());
    }

    #[test]
    fn a_deployment_its_controller_has_not_caught_up_with_may_have_a_pod() {
        use crate::reaper::summary::DeploymentSummaryStatus;
        let mut d = deployment(LabelSelector::default());
        d.metadata.generation = Some(3);
        d.spec.replicas = Some(0);
        d.status = Some(DeploymentSummaryStatus {
            observed_generation: Some(3),
            replicas: Some(0),
            ..Default::default()
        });
        assert_eq!(unsettled_pods(&d), 0);
        // Just scaled to 1, not yet observed: a pod may be on its way.
        d.spec.replicas = Some(1);
        d.metadata.generation = Some(4);
        assert_eq!(unsettled_pods(&d), 1);
        // Scaled to 0 while its pod still counts.
        d.spec.replicas = Some(0);
        d.metadata.generation = Some(5);
        d.status.as_mut().unwrap().replicas = Some(1);
        assert_eq!(unsettled_pods(&d), 1);
    }
}
