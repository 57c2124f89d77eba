//! A pod as the controller reads it: name, namespace, labels, deletion mark, phase and
//! Ready condition. Deserialized straight from the API server's JSON with everything
//! else skipped by the parser, so a cluster full of unrelated pods costs the operator
//! only what it keeps: a full `Pod` is allocated in whole (spec, container statuses,
//! managed fields) before it can be trimmed, and the allocator keeps the pages that its
//! short-lived parts were spread over.

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::Resource;
use serde::{Deserialize, Deserializer};

/// The part of a `v1/Pod` the workload count needs.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct PodSummary {
    #[serde(default, deserialize_with = "summary_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub status: Option<PodSummaryStatus>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct PodSummaryStatus {
    #[serde(default)]
    pub phase: Option<String>,
    /// A Ready condition of the pod is "True".
    #[serde(default, rename = "conditions", deserialize_with = "ready_condition")]
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

impl Resource for PodSummary {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "Pod".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "pods".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The metadata fields a pod is found (name, namespace), matched (labels), tracked
/// (uid, resourceVersion, which the watch resumes from) and judged by (deletion).
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
    }
    let kept = Option::<Kept>::deserialize(d)?.unwrap_or_default();
    Ok(ObjectMeta {
        name: kept.name,
        namespace: kept.namespace,
        uid: kept.uid,
        resource_version: kept.resource_version,
        labels: kept.labels,
        deletion_timestamp: kept.deletion_timestamp,
        ..ObjectMeta::default()
    })
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
