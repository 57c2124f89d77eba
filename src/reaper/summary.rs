//! Pods and Deployments as the controller reads them. Deserialized straight from the
//! API server's JSON with everything else skipped by the parser, so a cluster full of
//! objects costs the operator only what it keeps: a full `Pod` or `Deployment` is
//! allocated in whole (pod template, container statuses, managed fields) before it can
//! be trimmed, and the allocator keeps the pages that its short-lived parts were spread
//! over. A replica with 10 000 Reapers caches 10 000 Deployments.
//!
//! - pods: name, namespace, labels, deletion mark, phase and Ready condition;
//! - Deployments: name, namespace, generation, replicas, selector (as the `Selector`
//!   its pods are matched by), strategy, the pod template's grace period, and the
//!   status counts. Not their labels: nothing matches Deployments by label.

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::DeploymentStrategy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, Time};
use kube::Resource;
use kube::core::Selector;
use serde::{Deserialize, Deserializer};

/// The part of a `v1/Pod` the workload count needs.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct PodSummary {
    #[serde(deserialize_with = "summary_meta")]
    pub metadata: ObjectMeta,
    pub status: Option<PodSummaryStatus>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct PodSummaryStatus {
    pub phase: Option<String>,
    /// A Ready condition of the pod is "True".
    #[serde(rename = "conditions", deserialize_with = "ready_condition")]
    pub ready: bool,
}

impl PodSummary {
    /// Not finished: terminating pods count, they may still be acting.
    pub fn running(&self) -> bool {
        let phase = self
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .unwrap_or("Pending");
        phase != "Succeeded" && phase != "Failed"
    }

    /// Running, Ready, and not being deleted.
    pub fn ready(&self) -> bool {
        self.running()
            && self.metadata.deletion_timestamp.is_none()
            && self.status.as_ref().is_some_and(|s| s.ready)
    }
}

/// The part of an `apps/v1/Deployment` the workload count, the handover and the status
/// need. The field names are the Deployment's.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct DeploymentSummary {
    #[serde(deserialize_with = "unlabelled_meta")]
    pub metadata: ObjectMeta,
    #[serde(deserialize_with = "null_as_default")]
    pub spec: DeploymentSummarySpec,
    pub status: Option<DeploymentSummaryStatus>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct DeploymentSummarySpec {
    pub replicas: Option<i32>,
    #[serde(deserialize_with = "pod_selector")]
    pub selector: PodSelector,
    pub strategy: Option<DeploymentStrategy>,
    /// `template.spec.terminationGracePeriodSeconds`.
    #[serde(rename = "template", deserialize_with = "template_grace")]
    pub termination_grace_period_seconds: Option<i64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct DeploymentSummaryStatus {
    pub replicas: Option<i32>,
    pub terminating_replicas: Option<i32>,
    pub observed_generation: Option<i64>,
}

/// A Deployment's `spec.selector`, converted once when the Deployment is read: a
/// `LabelSelector`'s maps take several times the room of the expressions they hold,
/// and every pod event of the namespace is matched against it.
#[derive(Clone, Debug, PartialEq)]
pub enum PodSelector {
    Valid(Selector),
    /// Why it is no selector (an operator or values the API server should have refused).
    Invalid(String),
}

impl Default for PodSelector {
    /// What a Deployment without a selector has: one that selects everything.
    fn default() -> Self {
        Self::Valid(Selector::default())
    }
}

impl From<LabelSelector> for PodSelector {
    fn from(selector: LabelSelector) -> Self {
        match Selector::try_from(selector) {
            Ok(selector) => Self::Valid(selector),
            Err(error) => Self::Invalid(error.to_string()),
        }
    }
}

/// A summary is read and watched as the kind it summarizes.
macro_rules! summary_of {
    ($summary:ty, $kind:literal, $group:literal, $version:literal, $plural:literal) => {
        impl Resource for $summary {
            type DynamicType = ();
            type Scope = NamespaceResourceScope;

            fn kind(_: &()) -> Cow<'_, str> {
                $kind.into()
            }
            fn group(_: &()) -> Cow<'_, str> {
                $group.into()
            }
            fn version(_: &()) -> Cow<'_, str> {
                $version.into()
            }
            fn plural(_: &()) -> Cow<'_, str> {
                $plural.into()
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

summary_of!(PodSummary, "Pod", "", "v1", "pods");
summary_of!(DeploymentSummary, "Deployment", "apps", "v1", "deployments");

/// The metadata fields an object is found (name, namespace), matched (labels), tracked
/// (uid, resourceVersion, which the watch resumes from) and judged by (deletion, and
/// the generation a Deployment's status is compared with).
fn summary_meta<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    #[derive(Default, Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Kept {
        name: Option<String>,
        namespace: Option<String>,
        uid: Option<String>,
        resource_version: Option<String>,
        labels: Option<BTreeMap<String, String>>,
        deletion_timestamp: Option<Time>,
        generation: Option<i64>,
    }
    let kept = Option::<Kept>::deserialize(d)?.unwrap_or_default();
    Ok(ObjectMeta {
        name: kept.name,
        namespace: kept.namespace,
        uid: kept.uid,
        resource_version: kept.resource_version,
        labels: kept.labels,
        deletion_timestamp: kept.deletion_timestamp,
        generation: kept.generation,
        ..ObjectMeta::default()
    })
}

/// [`summary_meta`] without the labels.
fn unlabelled_meta<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let mut meta = summary_meta(d)?;
    meta.labels = None;
    Ok(meta)
}

/// `null` or missing: the default, as for a typed Deployment.
fn pod_selector<'de, D: Deserializer<'de>>(d: D) -> Result<PodSelector, D::Error> {
    Ok(Option::<LabelSelector>::deserialize(d)?
        .unwrap_or_default()
        .into())
}

/// `null` read as the default, as k8s-openapi reads it (its fields are `Option`s).
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// The grace period of a Deployment's pod template, the only part of it kept.
fn template_grace<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct PodSpec {
        #[serde(default)]
        termination_grace_period_seconds: Option<i64>,
    }
    #[derive(Deserialize)]
    struct Template {
        #[serde(default)]
        spec: Option<PodSpec>,
    }
    let template = Option::<Template>::deserialize(d)?;
    Ok(template
        .and_then(|t| t.spec)
        .and_then(|s| s.termination_grace_period_seconds))
}

/// Lenient where a full `Pod` is (a condition without a type or status): a pod that
/// cannot be parsed costs the cache a re-list.
fn ready_condition<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    #[derive(Deserialize)]
    struct Condition {
        #[serde(default, rename = "type")]
        type_: Option<String>,
        #[serde(default)]
        status: Option<String>,
    }
    let conditions = Option::<Vec<Condition>>::deserialize(d)?;
    Ok(conditions
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_.as_deref() == Some("Ready") && c.status.as_deref() == Some("True")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::ResourceExt;
    use serde_json::json;

    fn pod(phase: &str, ready: &str, deleting: bool) -> PodSummary {
        let mut metadata = json!({
            "name": "p", "namespace": "ns", "uid": "u", "resourceVersion": "7",
            "labels": {"app": "r"}, "annotations": {"a": "b"},
            "managedFields": [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}],
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "r", "uid": "x"}]
        });
        if deleting {
            metadata["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": metadata,
            "spec": {"containers": [{"name": "c", "image": "i"}], "nodeName": "n"},
            "status": {
                "phase": phase,
                "hostIP": "10.0.0.1",
                "conditions": [
                    {"type": "PodScheduled", "status": "True"},
                    {"type": "Ready", "status": ready, "lastTransitionTime": "2026-01-01T00:00:00Z"}
                ],
                "containerStatuses": [{"name": "c", "ready": true, "restartCount": 0, "image": "i", "imageID": ""}]
            }
        }))
        .unwrap()
    }

    #[test]
    fn a_summary_keeps_what_is_counted_and_matched_and_nothing_else() {
        let p = pod("Running", "True", false);
        assert_eq!(p.metadata.name.as_deref(), Some("p"));
        assert_eq!(p.metadata.namespace.as_deref(), Some("ns"));
        assert_eq!(p.metadata.resource_version.as_deref(), Some("7"));
        assert_eq!(p.labels().get("app").map(String::as_str), Some("r"));
        assert!(p.metadata.annotations.is_none());
        assert!(p.metadata.managed_fields.is_none());
        assert!(p.metadata.owner_references.is_none());
        assert!(p.running() && p.ready());
    }

    #[test]
    fn a_deployment_summary_keeps_what_the_controller_reads() {
        let full = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {
                "name": "d", "namespace": "ns", "uid": "u", "resourceVersion": "9",
                "generation": 4, "labels": {"app": "r"},
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
                "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}]
            },
            "spec": {
                "replicas": 1,
                "selector": {
                    "matchLabels": {"app": "r"},
                    "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a"]}]
                },
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
                "template": {
                    "metadata": {"labels": {"app": "r", "tier": "a"}},
                    "spec": {
                        "terminationGracePeriodSeconds": 45,
                        "containers": [{"name": "c", "image": "i", "args": ["x"]}]
                    }
                }
            },
            "status": {
                "observedGeneration": 3, "replicas": 1, "readyReplicas": 1,
                "terminatingReplicas": 2,
                "conditions": [{"type": "Available", "status": "True"}]
            }
        });
        let d: DeploymentSummary = serde_json::from_value(full.clone()).unwrap();
        let typed: k8s_openapi::api::apps::v1::Deployment = serde_json::from_value(full).unwrap();
        assert_eq!(d.metadata.name.as_deref(), Some("d"));
        assert_eq!(d.metadata.namespace.as_deref(), Some("ns"));
        assert_eq!(d.metadata.generation, Some(4));
        assert_eq!(d.metadata.resource_version.as_deref(), Some("9"));
        assert!(d.metadata.annotations.is_none() && d.metadata.managed_fields.is_none());
        assert!(d.metadata.labels.is_none());
        assert_eq!(d.spec.replicas, typed.spec.replicas);
        assert_eq!(d.spec.selector, typed.spec.selector.clone().into());
        assert_eq!(d.spec.strategy, typed.spec.strategy);
        assert_eq!(d.spec.termination_grace_period_seconds, Some(45));
        let status = d.status.unwrap();
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!(status.replicas, Some(1));
        assert_eq!(status.terminating_replicas, Some(2));
        // A Deployment as bare as the API server could send still parses.
        let bare: DeploymentSummary =
            serde_json::from_value(json!({"metadata": {"name": "d"}, "spec": {"template": {}}}))
                .unwrap();
        assert_eq!(bare.spec.termination_grace_period_seconds, None);
        assert!(bare.status.is_none());
        // What a full Deployment accepts, a summary accepts too.
        for odd in [
            json!({"metadata": {"name": "d"}, "spec": null}),
            json!({"metadata": {"name": "d"}, "spec": {"selector": null, "template": null}}),
        ] {
            let typed: k8s_openapi::api::apps::v1::Deployment =
                serde_json::from_value(odd.clone()).unwrap();
            let d: DeploymentSummary = serde_json::from_value(odd).unwrap();
            assert_eq!(d.spec.selector, typed.spec.selector.clone().into());
            assert_eq!(d.spec.replicas, typed.spec.replicas);
        }
    }

    #[test]
    fn stopping_unready_and_finished_pods_are_told_apart() {
        let deleting = pod("Running", "True", true);
        assert!(
            deleting.running() && !deleting.ready(),
            "a Terminating pod still runs"
        );
        let unready = pod("Running", "False", false);
        assert!(unready.running() && !unready.ready());
        for finished in ["Succeeded", "Failed"] {
            let p = pod(finished, "False", false);
            assert!(!p.running() && !p.ready());
        }
        let fresh: PodSummary = serde_json::from_value(json!({"metadata": {"name": "p"}})).unwrap();
        assert!(fresh.running() && !fresh.ready(), "no status yet: Pending");
        // What a full Pod accepts, a summary accepts too.
        let odd: PodSummary = serde_json::from_value(json!({
            "metadata": null,
            "status": {"phase": null, "conditions": [{"type": "Ready"}, {"status": "True"}]}
        }))
        .unwrap();
        assert!(odd.running() && !odd.ready());
    }
}
