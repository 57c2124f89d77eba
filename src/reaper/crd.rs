//! The `Reaper` custom resource (`pglease.dev/v1alpha1`).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

pub use super::decide::ScaleRecord;

/// Runs the named Deployment as a singleton: one replica while this cluster holds the
/// PostgreSQL lease, zero otherwise.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "pglease.dev",
    version = "v1alpha1",
    kind = "Reaper",
    plural = "reapers",
    shortname = "rpr",
    namespaced,
    status = "ReaperStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Holder","type":"string","jsonPath":".status.holder"}"#,
    printcolumn = r#"{"name":"Epoch","type":"integer","jsonPath":".status.epoch"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.ready"}"#,
    printcolumn = r#"{"name":"Acquired","type":"date","jsonPath":".status.acquiredAt"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ReaperSpec {
    /// Name of the Deployment, in the Reaper's namespace, that runs the singleton. The
    /// operator owns its replica count: 1 in the cluster that holds the lease, 0 elsewhere.
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')").message("deploymentName must name a Deployment in this namespace: a DNS-1123 subdomain of lowercase letters, digits, '-' and '.', starting and ending with a letter or digit"))]
    #[schemars(length(max = 253))]
    pub deployment_name: String,

    /// The PostgreSQL lease that arbitrates this singleton.
    #[serde(default)]
    pub lease: LeaseSpec,

    /// Keep competing for the lease and reporting status, but do not touch the Deployment.
    #[serde(default)]
    pub paused: bool,
}

/// Lease settings. Must satisfy ttl > renewDeadline > 1.2 × retryPeriod.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.ttlSeconds > self.renewDeadlineSeconds").message("lease.ttlSeconds must be greater than lease.renewDeadlineSeconds: a holder must stop acting before others may take the lease"),
    validation = Rule::new("self.renewDeadlineSeconds * 10 > self.retryPeriodSeconds * 12").message("lease.renewDeadlineSeconds must be greater than 1.2 × lease.retryPeriodSeconds: a holder needs more than one renew attempt per deadline"),
    validation = Rule::new("!has(self.name) || self.name.matches('^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$')").message("lease.name may use only ASCII letters, digits, '.', '_' and '-', and must start and end with a letter or digit")
)]
pub struct LeaseSpec {
    /// Lease row name. Defaults to `<namespace>.<reaper name>`. Must start with
    /// `<namespace>.` (a Reaper competes only for leases of its own namespace) unless the
    /// operator runs with `--allow-cross-namespace-leases`. Reapers in different clusters
    /// with the same lease name share one singleton. ASCII letters, digits, `.`, `_`, `-`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 189))]
    pub name: Option<String>,

    /// How long a lease stays valid after its last renew, judged by the database clock.
    #[serde(default = "default_ttl")]
    #[schemars(range(min = 2, max = 3600))]
    pub ttl_seconds: i32,

    /// A holder that could not renew for this long stops acting (monotonic clock).
    #[serde(default = "default_renew_deadline")]
    #[schemars(range(min = 1, max = 3600))]
    pub renew_deadline_seconds: i32,

    /// How often candidates try to acquire and the holder renews.
    #[serde(default = "default_retry_period")]
    #[schemars(range(min = 1, max = 600))]
    pub retry_period_seconds: i32,

    /// After taking the lease over from a holder in another cluster, wait this long
    /// before scaling up, on top of waiting for that cluster to report no running pods.
    #[serde(default)]
    #[schemars(range(min = 0, max = 3600))]
    pub handover_delay_seconds: i32,
}

fn default_ttl() -> i32 {
    15
}
fn default_renew_deadline() -> i32 {
    10
}
fn default_retry_period() -> i32 {
    2
}

impl Default for LeaseSpec {
    fn default() -> Self {
        Self {
            name: None,
            ttl_seconds: default_ttl(),
            renew_deadline_seconds: default_renew_deadline(),
            retry_period_seconds: default_retry_period(),
            handover_delay_seconds: 0,
        }
    }
}

/// Observed state, written by the replica that acts for this cluster.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReaperStatus {
    /// Leading, Standby, Invalid or Degraded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The lease row this Reaper competes for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_name: Option<String>,
    /// Current lease holder, `<cluster>/<identity>`; empty when free.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    /// Fencing token of the current holder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acquired_at: Option<String>,
    /// Deprecated, no longer written: the renewals are in the database row
    /// (`reaper-operator lease status`). Kept in the schema so that replicas of an
    /// earlier version, which still write it, keep working during an upgrade.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewed_at: Option<String>,
    /// Deprecated, no longer written (see `renewedAt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// Desired replicas of the Deployment in this cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// `ready/desired`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Leader, WorkloadReady, DatabaseReachable, SingletonSafe.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Label selector of the workload's pods, remembered so that pods still stopping
    /// after their Deployment was deleted keep counting as running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<String>,
    /// Which holder, at which epoch, scaled this cluster's Deployment up. Written before
    /// the scale-up; a replica that finds the Deployment running under a record nobody
    /// can prove is still held scales it to 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaled_up_by: Option<ScaleRecord>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum Phase {
    /// This cluster holds the lease and runs the workload.
    Leading,
    /// Another cluster (or nobody) holds the lease; the workload is at 0 here.
    Standby,
    /// The spec cannot be used (see the conditions).
    Invalid,
    /// The database or the Deployment cannot be reached; the workload was not scaled up.
    Degraded,
}

/// Which lease rows a Reaper may compete for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LeaseScope {
    /// Only `<its namespace>.<…>`: a tenant who may create Reapers in one namespace
    /// cannot contend for (and so hold down) another namespace's singleton.
    #[default]
    Namespace,
    /// Any name (`--allow-cross-namespace-leases`).
    Shared,
}

impl Reaper {
    /// The lease row this Reaper competes for (see [`LeaseSpec::name`]), or why it may
    /// not compete for the one it names. A name outside the namespace is refused, not
    /// rewritten: a silent rewrite would move the singleton to a new row, and a cluster
    /// still on the old row would run a second pod. Namespace names are DNS labels (no
    /// `.`), so the prefix cannot be forged by another namespace.
    pub fn lease_name(&self, scope: LeaseScope) -> Result<String, String> {
        let ns = self.metadata.namespace.as_deref().unwrap_or("default");
        match (&self.spec.lease.name, scope) {
            (None, _) => Ok(format!(
                "{ns}.{}",
                self.metadata.name.as_deref().unwrap_or_default()
            )),
            (Some(name), LeaseScope::Shared) => Ok(name.clone()),
            (Some(name), LeaseScope::Namespace)
                if name
                    .strip_prefix(ns)
                    .and_then(|rest| rest.strip_prefix('.'))
                    .is_some_and(|rest| !rest.is_empty()) =>
            {
                Ok(name.clone())
            }
            (Some(name), LeaseScope::Namespace) => Err(format!(
                "spec.lease.name {name:?} must start with \"{ns}.\": a Reaper competes only for leases of its own namespace \
                 (use the same name in every cluster; sharing a lease across namespaces needs the operator's \
                 --allow-cross-namespace-leases)"
            )),
        }
    }
}

/// The CRD as YAML, as `reaper-operator crdgen` prints it and `crds/` commits it.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    serde_norway::to_string(&Reaper::crd()).expect("the CRD serialises to YAML")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reaper(ns: &str, name: &str, lease: Option<&str>) -> Reaper {
        let mut r = Reaper::new(
            name,
            ReaperSpec {
                deployment_name: "d".into(),
                lease: LeaseSpec {
                    name: lease.map(str::to_owned),
                    ..LeaseSpec::default()
                },
                paused: false,
            },
        );
        r.metadata.namespace = Some(ns.into());
        r
    }

    #[test]
    fn lease_names_stay_inside_their_namespace() {
        let ns = LeaseScope::Namespace;
        let name = |r: Reaper| r.lease_name(ns);
        assert_eq!(name(reaper("prod", "pay", None)), Ok("prod.pay".into()));
        assert_eq!(
            name(reaper("prod", "r", Some("prod.pay"))),
            Ok("prod.pay".into())
        );
        // Another namespace's lease, or one outside any: refused, never rewritten.
        for other in [
            "pay",
            "production.x",
            "prod.",
            "prodx.pay",
            "tenant.prod.pay",
        ] {
            let err = name(reaper("prod", "r", Some(other))).unwrap_err();
            assert!(err.contains("must start with \"prod.\""), "{other}: {err}");
        }
        // Sharing across namespaces is the operator's explicit choice.
        let shared = LeaseScope::Shared;
        assert_eq!(
            reaper("tenant", "r", Some("prod.pay")).lease_name(shared),
            Ok("prod.pay".into())
        );
        assert_eq!(
            reaper("prod", "pay", None).lease_name(shared),
            Ok("prod.pay".into())
        );
    }
}
