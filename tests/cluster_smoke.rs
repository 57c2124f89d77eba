//! Smoke tests against a real kube-apiserver (tests/cluster/up.sh; docs/local-cluster.md).
//!
//! The cases share one cluster (support::trials), run in turn (a failing case does not stop
//! the others), and the cluster is stopped after the last one, also on failure. Set
//! `REAPER_TEST_KUBECONFIG` to run against an already running cluster.

mod support;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams,
};
use kube::config::Kubeconfig;
use kube::{Client, ResourceExt};
use serde_json::json;
use support::cluster::{TestCluster, wait_until};
use support::trials::Suite;

const FIELD_MANAGER: &str = "reaper-smoke";
const WAIT: Duration = Duration::from_secs(90);

fn main() -> ExitCode {
    let suite = Suite::new(set_up);
    let trials = vec![
        suite.case("crd_openapi_bounds_and_cel", crd_validation),
        suite.case("kubectl_printer_columns", printer_columns),
        suite.case("deployment_scale_subresource", deployment_scale),
        suite.case("pods_stop_after_grace_period", pod_stops),
        suite.case("rbac_service_account_token", rbac),
        suite.case("helm_lint_and_install", helm),
        suite.case("second_cluster_side_by_side", second_cluster),
    ];
    suite.run(trials, async |ctx: Ctx| {
        ctx.cleanup().await;
        ctx.cluster.stop().context("tests/cluster/down.sh")
    })
}

async fn set_up() -> Result<Ctx> {
    let started = Instant::now();
    let cluster = TestCluster::start("smoke").context("could not start the local control plane")?;
    eprintln!(
        "cluster ready in {:.1?} (kubeconfig {})",
        started.elapsed(),
        cluster.kubeconfig().display()
    );
    Ok(Ctx {
        client: cluster.client().await.context("admin client")?,
        cluster,
        suffix: format!("{:x}", std::process::id()),
    })
}

struct Ctx {
    cluster: TestCluster,
    client: Client,
    suffix: String,
}

impl Ctx {
    /// Creates (or reuses) a namespace for one sub-case.
    async fn namespace(&self, case: &str) -> Result<String> {
        let name = format!("smoke-{case}-{}", self.suffix);
        let ns: Namespace = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {"reaper-smoke": "true"}},
        }))?;
        Api::<Namespace>::all(self.client.clone())
            .patch(&name, &apply(), &Patch::Apply(&ns))
            .await
            .with_context(|| format!("creating namespace {name}"))?;
        Ok(name)
    }

    /// Best effort: removes this run's namespaces (matters only when attached to a cluster
    /// that outlives the test).
    async fn cleanup(&self) {
        let api = Api::<Namespace>::all(self.client.clone());
        if let Ok(list) = api
            .list(&ListParams::default().labels("reaper-smoke=true"))
            .await
        {
            for ns in list {
                if ns.name_any().ends_with(&format!("-{}", self.suffix)) {
                    let _ = api
                        .delete(&ns.name_any(), &DeleteParams::background())
                        .await;
                }
            }
        }
    }
}

fn apply() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

/// The HTTP status and message of an API error, or a description of what else happened.
fn api_status<T: std::fmt::Debug>(result: kube::Result<T>) -> Result<(u16, String)> {
    match result {
        Err(kube::Error::Api(status)) => Ok((status.code, status.message.clone())),
        Err(other) => Err(anyhow!("expected an API error status, got: {other:#}")),
        Ok(v) => Err(anyhow!(
            "expected the request to be refused, it succeeded: {v:?}"
        )),
    }
}

// ---------------------------------------------------------------------------------------
// (a) CRD with OpenAPI bounds and a CEL rule.

const CEL_MESSAGE: &str = "a singleton widget must have exactly one replica";

fn widget_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("smoke.reaper.test", "v1", "Widget"),
        "widgets",
    )
}

async fn ensure_widget_crd(client: &Client) -> Result<()> {
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.smoke.reaper.test"},
        "spec": {
            "group": "smoke.reaper.test",
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "listKind": "WidgetList"},
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Replicas", "type": "integer", "jsonPath": ".spec.replicas"},
                    {"name": "Mode", "type": "string", "jsonPath": ".spec.mode"},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                ],
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {
                        "spec": {
                            "type": "object",
                            "required": ["replicas", "mode"],
                            "properties": {
                                "replicas": {"type": "integer", "minimum": 1, "maximum": 5},
                                "mode": {"type": "string", "enum": ["active", "standby", "singleton"]},
                            },
                            "x-kubernetes-validations": [{
                                "rule": "self.mode != 'singleton' || self.replicas == 1",
                                "message": CEL_MESSAGE,
                            }],
                        },
                        "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                    },
                }},
            }],
        },
    }))?;
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    crds.patch("widgets.smoke.reaper.test", &apply(), &Patch::Apply(&crd))
        .await
        .context("applying the Widget CRD")?;
    support::cluster::wait_crd_established(client, "widgets.smoke.reaper.test").await
}

fn widget(name: &str, replicas: i64, mode: &str) -> DynamicObject {
    DynamicObject::new(name, &widget_resource()).data(json!({
        "spec": {"replicas": replicas, "mode": mode},
    }))
}

async fn crd_validation(ctx: &Ctx) -> Result<()> {
    ensure_widget_crd(&ctx.client).await?;
    let ns = ctx.namespace("crd").await?;
    let widgets =
        Api::<DynamicObject>::namespaced_with(ctx.client.clone(), &ns, &widget_resource());
    let pp = PostParams::default();

    // The new resource may take a moment to be served after Established.
    let valid = widget("valid", 3, "active");
    wait_until("a valid Widget to be accepted", WAIT, || {
        let (widgets, valid, pp) = (widgets.clone(), valid.clone(), pp.clone());
        async move {
            match widgets.create(&pp, &valid).await {
                Ok(_) => Ok(Some(())),
                Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
                Err(e) => Err(e).context("creating a valid Widget"),
            }
        }
    })
    .await?;
    widgets
        .create(&pp, &widget("one-singleton", 1, "singleton"))
        .await
        .context("a singleton with one replica is valid")?;

    // Refused with 422 and a message that says why: what, the Widget, the message's parts.
    let refused: [(&str, DynamicObject, &[&str]); 4] = [
        (
            "CEL violation",
            widget("bad-cel", 2, "singleton"),
            &[CEL_MESSAGE],
        ),
        (
            "maximum violation",
            widget("bad-max", 9, "active"),
            &["spec.replicas", "less than or equal to 5"],
        ),
        (
            "minimum violation",
            widget("bad-min", 0, "active"),
            &["greater than or equal to 1"],
        ),
        (
            "enum violation",
            widget("bad-enum", 1, "primary"),
            &["spec.mode", "supported values"],
        ),
    ];
    for (what, bad, parts) in refused {
        let (code, message) = api_status(widgets.create(&pp, &bad).await)?;
        ensure!(code == 422, "{what}: expected 422, got {code}: {message}");
        ensure!(
            parts.iter().all(|part| message.contains(part)),
            "{what}: the message does not contain {parts:?}: {message}"
        );
    }

    let names: Vec<String> = widgets
        .list(&ListParams::default())
        .await?
        .into_iter()
        .map(|w| w.name_any())
        .collect();
    ensure!(
        names.len() == 2
            && names.contains(&"valid".into())
            && names.contains(&"one-singleton".into()),
        "only the two valid Widgets may be stored, found {names:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// (c) kubectl renders the CRD's additional printer columns.

async fn printer_columns(ctx: &Ctx) -> Result<()> {
    ensure_widget_crd(&ctx.client).await?;
    let ns = ctx.namespace("columns").await?;
    let widgets =
        Api::<DynamicObject>::namespaced_with(ctx.client.clone(), &ns, &widget_resource());
    widgets
        .patch(
            "printed",
            &apply(),
            &Patch::Apply(&widget("printed", 4, "standby")),
        )
        .await
        .context("applying a Widget")?;

    let out = ctx
        .cluster
        .kubectl()?
        .args(["get", "widgets.smoke.reaper.test", "--namespace", &ns])
        .output()
        .context("running kubectl")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "kubectl get failed ({}): {}{}",
        out.status,
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines = stdout.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    ensure!(
        header == ["NAME", "REPLICAS", "MODE", "AGE"],
        "kubectl header does not show the printer columns: {stdout}"
    );
    let row: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    ensure!(
        row.len() == 4 && row[..3] == ["printed", "4", "standby"],
        "kubectl row does not show the column values: {stdout}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// (b) Deployment scaled through its scale subresource; kwok makes the Pods Ready.

async fn deployment_scale(ctx: &Ctx) -> Result<()> {
    let ns = ctx.namespace("scale").await?;
    let deployments = Api::<Deployment>::namespaced(ctx.client.clone(), &ns);
    let deployment: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                // Scaling down waits for the removed Pod to be gone: keep that short.
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10"}],
                },
            },
        },
    }))?;
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .context("creating the Deployment")?;
    wait_ready(ctx, &ns, 1).await?;

    let scale = deployments
        .patch_scale(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 3}})),
        )
        .await
        .context("patching the scale subresource")?;
    ensure!(
        scale.spec.as_ref().and_then(|s| s.replicas) == Some(3),
        "scale subresource did not take 3 replicas: {scale:?}"
    );
    wait_ready(ctx, &ns, 3).await?;

    // And down again through replace_scale: kwok completes the Pod deletions.
    let mut scale = deployments.get_scale("web").await?;
    ensure!(
        scale.status.as_ref().map(|s| s.replicas) == Some(3),
        "scale status: {scale:?}"
    );
    scale.spec.get_or_insert_with(Default::default).replicas = Some(2);
    deployments
        .replace_scale("web", &PostParams::default(), &scale)
        .await
        .context("replacing the scale subresource")?;
    wait_ready(ctx, &ns, 2).await
}

/// Waits until the Deployment `web`, its ReplicaSet and its Pods all show `n` ready replicas.
async fn wait_ready(ctx: &Ctx, ns: &str, n: i32) -> Result<()> {
    let deployments = Api::<Deployment>::namespaced(ctx.client.clone(), ns);
    let replicasets = Api::<ReplicaSet>::namespaced(ctx.client.clone(), ns);
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), ns);
    let what = format!("Deployment {ns}/web, its ReplicaSet and Pods to have {n} ready replicas");
    wait_until(&what, WAIT, || {
        let (deployments, replicasets, pods) =
            (deployments.clone(), replicasets.clone(), pods.clone());
        async move {
            let d = deployments.get("web").await?;
            let status = d.status.unwrap_or_default();
            if status.ready_replicas.unwrap_or(0) != n
                || status.replicas.unwrap_or(0) != n
                || status.updated_replicas.unwrap_or(0) != n
            {
                return Ok(None);
            }
            let rs = replicasets
                .list(&ListParams::default().labels("app=web"))
                .await?;
            let rs: Vec<_> = rs
                .into_iter()
                .filter(|r| r.spec.replicas.unwrap_or(0) > 0)
                .collect();
            if rs.len() != 1
                || rs[0].spec.replicas != Some(n)
                || rs[0].status.as_ref().and_then(|s| s.ready_replicas) != Some(n)
            {
                return Ok(None);
            }
            let pods = pods.list(&ListParams::default().labels("app=web")).await?;
            let running: Vec<_> = pods
                .iter()
                .filter(|p| {
                    let s = p.status.as_ref();
                    p.metadata.deletion_timestamp.is_none()
                        && s.and_then(|s| s.phase.as_deref()) == Some("Running")
                        && p.spec.as_ref().and_then(|s| s.node_name.as_deref())
                            == Some("kwok-node-0")
                })
                .collect();
            Ok((running.len() == n as usize && pods.items.len() == n as usize).then_some(()))
        }
    })
    .await
}

// ---------------------------------------------------------------------------------------
// (b2) A deleted Pod stays Terminating (still Running) for its grace period, or for the
// delay its annotation asks for, before kwok finishes the deletion, as a container that
// ignores SIGTERM does on a real kubelet; a forced delete (grace 0) is immediate.

/// One Pod of `pod_stops`: how it is made and deleted, and when it must be gone.
struct StopCase {
    name: &'static str,
    grace_seconds: i64,
    annotations: serde_json::Value,
    /// `DeleteOptions.gracePeriodSeconds`.
    delete_grace: Option<u32>,
    /// It must still be there (Terminating) this long after the delete was sent...
    min_gone: Duration,
    /// ...and be gone this long after it.
    max_gone: Duration,
}

impl StopCase {
    /// The Pod `name` with a grace period of `grace_seconds`, no annotations, deleted with
    /// its own grace period, and gone between `min_gone` and `max_gone` after its delete.
    fn new(name: &'static str, grace_seconds: i64, min_gone: Duration, max_gone: Duration) -> Self {
        Self {
            name,
            grace_seconds,
            annotations: json!({}),
            delete_grace: None,
            min_gone,
            max_gone,
        }
    }

    /// With these Pod annotations.
    fn annotations(self, annotations: serde_json::Value) -> Self {
        Self {
            annotations,
            ..self
        }
    }

    /// Deleted with `DeleteOptions.gracePeriodSeconds` `seconds`.
    fn delete_grace(self, seconds: u32) -> Self {
        Self {
            delete_grace: Some(seconds),
            ..self
        }
    }
}

/// What was seen of one Pod after its delete was sent.
#[derive(Default, Debug)]
struct Seen {
    /// The last time it was listed with a deletionTimestamp (since the delete).
    last_terminating: Option<Duration>,
    /// The first time it was no longer listed.
    gone: Option<Duration>,
    /// Phases it was listed with while Terminating.
    phases: Vec<String>,
}

async fn pod_stops(ctx: &Ctx) -> Result<()> {
    use support::cluster::KwokStages;
    let ns = ctx.namespace("stop").await?;
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), &ns);
    // Generous upper margins: kwok sees the deletion through a watch, and the machine may
    // be busy; the lower bounds are what the test is about.
    let margin = Duration::from_secs(8);
    let cases = stop_cases(margin);

    for case in &cases {
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": case.name, "labels": {"app": "stopper"}, "annotations": case.annotations},
            "spec": {
                "terminationGracePeriodSeconds": case.grace_seconds,
                "containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10"}],
            },
        }))?;
        pods.create(&PostParams::default(), &pod)
            .await
            .with_context(|| format!("creating Pod {}", case.name))?;
    }
    let n = cases.len();
    wait_until("the stopper Pods to run on kwok-node-0", WAIT, || {
        let pods = pods.clone();
        async move {
            let list = pods.list(&ListParams::default()).await?;
            let running = list
                .iter()
                .filter(|p| {
                    p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                        && p.spec.as_ref().and_then(|s| s.node_name.as_deref())
                            == Some("kwok-node-0")
                })
                .count();
            Ok((running == n).then_some(()))
        }
    })
    .await?;

    // Delete them all, each with its own clock, then watch them go (10 lists a second).
    let mut sent = Vec::new();
    for case in &cases {
        let dp = DeleteParams {
            grace_period_seconds: case.delete_grace,
            ..DeleteParams::default()
        };
        sent.push(Instant::now());
        pods.delete(case.name, &dp)
            .await
            .with_context(|| format!("deleting Pod {}", case.name))?;
    }
    let seen = watch_them_go(&pods, &cases, &sent, margin).await?;
    let problems = stop_problems(&cases, &seen);
    if !problems.is_empty() {
        let stages = match ctx.cluster.kwok_stages() {
            Some(stages) => format!("kwok stages: {}", stages.as_str()),
            None => "kwok stages unknown (no KWOK_STAGES in cluster.env)".into(),
        };
        let hint = if ctx.cluster.kwok_stages() == Some(KwokStages::Grace) {
            String::new()
        } else {
            " - this needs a cluster started with REAPER_KWOK_STAGES=grace (up.sh's default)".into()
        };
        bail!("{stages}{hint}:\n{}", problems.join("\n"));
    }
    Ok(())
}

/// How each Pod stops, and when it must be gone after its delete.
fn stop_cases(margin: Duration) -> [StopCase; 6] {
    use support::cluster::{POD_DELETE_DELAY, POD_DELETE_JITTER_DELAY};
    let secs = Duration::from_secs_f64;
    [
        // The deletionTimestamp is the delete time + grace, truncated to the second: gone
        // after (N-1, N] s.
        StopCase::new("grace-4s", 4, secs(2.8), secs(4.0) + margin),
        // DeleteOptions.gracePeriodSeconds wins over the Pod's own.
        StopCase::new("delete-grace-3s", 30, secs(1.8), secs(3.0) + margin).delete_grace(3),
        // The annotation wins over the grace period, shorter...
        StopCase::new("annotated-2s", 30, secs(1.8), secs(2.0) + margin)
            .annotations(json!({ POD_DELETE_DELAY: "2s" })),
        // ...or longer, and with a random part: between 3 and 5 s.
        StopCase::new("annotated-3-5s", 1, secs(2.8), secs(5.0) + margin)
            .annotations(json!({ POD_DELETE_DELAY: "3s", POD_DELETE_JITTER_DELAY: "5s" })),
        // No grace period at all: the apiserver removes the Pod itself.
        StopCase::new("spec-grace-0s", 0, Duration::ZERO, secs(1.0)),
        // A forced delete never leaves a Terminating Pod behind.
        StopCase::new("force-0s", 30, Duration::ZERO, secs(1.0))
            .annotations(json!({ POD_DELETE_DELAY: "20s" }))
            .delete_grace(0),
    ]
}

/// Lists the Pods 10 times a second until all are gone (or the longest `max_gone` and
/// `margin` have passed): when each was last seen Terminating, and when it was gone.
async fn watch_them_go(
    pods: &Api<Pod>,
    cases: &[StopCase],
    sent: &[Instant],
    margin: Duration,
) -> Result<Vec<Seen>> {
    let mut seen: Vec<Seen> = cases.iter().map(|_| Seen::default()).collect();
    let deadline = Instant::now() + cases.iter().map(|c| c.max_gone).max().unwrap() + margin;
    while seen.iter().any(|s| s.gone.is_none()) && Instant::now() < deadline {
        let list = pods.list(&ListParams::default()).await?;
        let now = Instant::now();
        for ((case, since), seen) in cases.iter().zip(sent).zip(&mut seen) {
            if seen.gone.is_some() {
                continue;
            }
            match list.iter().find(|p| p.name_any() == case.name) {
                None => seen.gone = Some(now - *since),
                Some(p) if p.metadata.deletion_timestamp.is_some() => {
                    seen.last_terminating = Some(now - *since);
                    let phase = p.status.as_ref().and_then(|s| s.phase.clone());
                    let phase = phase.unwrap_or_else(|| "<none>".into());
                    if !seen.phases.contains(&phase) {
                        seen.phases.push(phase);
                    }
                }
                Some(_) => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    Ok(seen)
}

/// What each Pod did that its case does not allow.
fn stop_problems(cases: &[StopCase], seen: &[Seen]) -> Vec<String> {
    let mut problems = Vec::new();
    for (case, seen) in cases.iter().zip(seen) {
        eprintln!("pod stop {}: {seen:?}", case.name);
        match seen.gone {
            None => problems.push(format!(
                "{}: still there {:?} after its delete (expected gone by {:?})",
                case.name, case.max_gone, case.max_gone
            )),
            Some(gone) if gone < case.min_gone => problems.push(format!(
                "{}: gone {gone:.1?} after its delete, expected Terminating for at least {:?} ({seen:?})",
                case.name, case.min_gone
            )),
            Some(gone) if gone > case.max_gone => problems.push(format!(
                "{}: gone only {gone:.1?} after its delete, expected by {:?} ({seen:?})",
                case.name, case.max_gone
            )),
            Some(_) => {}
        }
        if !case.min_gone.is_zero() && seen.last_terminating.is_none() {
            problems.push(format!("{}: never seen Terminating ({seen:?})", case.name));
        }
        if seen.phases.iter().any(|p| p != "Running") {
            problems.push(format!(
                "{}: phase changed while Terminating: {:?}",
                case.name, seen.phases
            ));
        }
    }
    problems
}

// ---------------------------------------------------------------------------------------
// (d) RBAC: a ServiceAccount token bound to a narrow Role.

async fn rbac(ctx: &Ctx) -> Result<()> {
    let ns = ctx.namespace("rbac").await?;
    let reader = reader_with_a_narrow_role(ctx, &ns).await?;

    // Allowed by the Role (the RBAC authorizer's cache may need a moment for the binding).
    let reader_cms = Api::<ConfigMap>::namespaced(reader.clone(), &ns);
    let names = wait_until("the ServiceAccount to list ConfigMaps", WAIT, || {
        let reader_cms = reader_cms.clone();
        async move {
            match reader_cms.list(&ListParams::default()).await {
                Ok(list) => Ok(Some(
                    list.into_iter().map(|c| c.name_any()).collect::<Vec<_>>(),
                )),
                Err(kube::Error::Api(s)) if s.code == 403 => Ok(None),
                Err(e) => Err(e.into()),
            }
        }
    })
    .await?;
    ensure!(names.contains(&"visible".to_string()), "listed {names:?}");
    let got = reader_cms
        .get("visible")
        .await
        .context("get allowed by the Role")?;
    ensure!(got.data.unwrap_or_default().get("k").map(String::as_str) == Some("v"));

    // Everything else is refused with 403.
    let mut refused = Vec::new();
    let (code, msg) = api_status(
        reader_cms
            .create(&PostParams::default(), &cm_named("forbidden"))
            .await,
    )?;
    refused.push(("create configmap", code, msg));
    let (code, msg) = api_status(reader_cms.delete("visible", &DeleteParams::default()).await)?;
    refused.push(("delete configmap", code, msg));
    let (code, msg) = api_status(
        Api::<Secret>::namespaced(reader.clone(), &ns)
            .list(&ListParams::default())
            .await,
    )?;
    refused.push(("list secrets", code, msg));
    let (code, msg) = api_status(
        Api::<ConfigMap>::namespaced(reader.clone(), "default")
            .list(&ListParams::default())
            .await,
    )?;
    refused.push(("list configmaps in another namespace", code, msg));
    let (code, msg) = api_status(
        Api::<Namespace>::all(reader)
            .list(&ListParams::default())
            .await,
    )?;
    refused.push(("list namespaces", code, msg));
    for (what, code, msg) in refused {
        ensure!(code == 403, "{what}: expected 403, got {code}: {msg}");
        ensure!(
            msg.contains(&format!("system:serviceaccount:{ns}:reader")),
            "{what}: 403 does not name the ServiceAccount: {msg}"
        );
    }
    Ok(())
}

/// A ServiceAccount bound to a Role for `get/list/watch configmaps` in `ns`, a ConfigMap
/// there, and a client with a token of that ServiceAccount (TokenRequest API).
async fn reader_with_a_narrow_role(ctx: &Ctx, ns: &str) -> Result<Client> {
    let client = &ctx.client;
    let sa: ServiceAccount = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "reader"},
    }))?;
    let role: Role = serde_json::from_value(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "configmap-reader"},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch"]}],
    }))?;
    let binding: RoleBinding = serde_json::from_value(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "reader-reads-configmaps"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "configmap-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": ns}],
    }))?;
    let cm: ConfigMap = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "visible"}, "data": {"k": "v"},
    }))?;
    let sas = Api::<ServiceAccount>::namespaced(client.clone(), ns);
    sas.patch("reader", &apply(), &Patch::Apply(&sa)).await?;
    Api::<Role>::namespaced(client.clone(), ns)
        .patch("configmap-reader", &apply(), &Patch::Apply(&role))
        .await?;
    Api::<RoleBinding>::namespaced(client.clone(), ns)
        .patch("reader-reads-configmaps", &apply(), &Patch::Apply(&binding))
        .await?;
    Api::<ConfigMap>::namespaced(client.clone(), ns)
        .patch("visible", &apply(), &Patch::Apply(&cm))
        .await?;

    let token = support::cluster::service_account_token(client, ns, "reader", 600).await?;
    ctx.cluster.client_with_token(&token).await
}

fn cm_named(name: &str) -> ConfigMap {
    let mut cm = ConfigMap::default();
    cm.metadata.name = Some(name.to_string());
    cm
}

// ---------------------------------------------------------------------------------------
// (e) helm lint and helm install of tests/cluster/testdata/smoke-chart.

async fn helm(ctx: &Ctx) -> Result<()> {
    let chart = support::cluster::repo_root().join("tests/cluster/testdata/smoke-chart");
    let home = std::env::temp_dir().join(format!("reaper-smoke-helm-{}", ctx.suffix));
    std::fs::create_dir_all(&home)?;
    let result = helm_inner(ctx, &chart, &home).await;
    let _ = std::fs::remove_dir_all(&home);
    result
}

fn run(cmd: &mut std::process::Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

async fn helm_inner(ctx: &Ctx, chart: &std::path::Path, home: &std::path::Path) -> Result<()> {
    let lint = run(ctx.cluster.helm(home)?.arg("lint").arg(chart))?;
    ensure!(
        lint.contains("1 chart(s) linted, 0 chart(s) failed"),
        "helm lint: {lint}"
    );

    let ns = format!("smoke-helm-{}", ctx.suffix);
    run(ctx
        .cluster
        .helm(home)?
        .args(["install", "smoke", "--namespace", &ns, "--create-namespace"])
        .args(["--wait", "--timeout", "120s", "--set", "replicaCount=2"])
        .arg(chart))?;
    // Label the namespace so that cleanup() finds it when attached to a long-lived cluster.
    Api::<Namespace>::all(ctx.client.clone())
        .patch(
            &ns,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"reaper-smoke": "true"}}})),
        )
        .await?;

    let cm = Api::<ConfigMap>::namespaced(ctx.client.clone(), &ns)
        .get("smoke-smoke-chart")
        .await
        .context("the chart's ConfigMap")?;
    ensure!(
        cm.labels()
            .get("app.kubernetes.io/managed-by")
            .map(String::as_str)
            == Some("Helm"),
        "ConfigMap labels: {:?}",
        cm.labels()
    );
    ensure!(
        cm.data
            .unwrap_or_default()
            .get("message")
            .map(String::as_str)
            == Some("hello from helm"),
        "ConfigMap data not rendered from values"
    );
    let d = Api::<Deployment>::namespaced(ctx.client.clone(), &ns)
        .get("smoke-smoke-chart")
        .await?;
    ensure!(
        d.status.and_then(|s| s.ready_replicas) == Some(2),
        "helm --wait returned before the Deployment had 2 ready replicas"
    );

    let status = run(ctx
        .cluster
        .helm(home)?
        .args(["status", "smoke", "--namespace", &ns]))?;
    ensure!(status.contains("STATUS: deployed"), "helm status: {status}");
    run(ctx
        .cluster
        .helm(home)?
        .args(["uninstall", "smoke", "--namespace", &ns, "--wait"]))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// A second cluster runs beside the first (the failover tests need two): own ports,
// own etcd, own certificates; stopped again by its guard.

async fn second_cluster(ctx: &Ctx) -> Result<()> {
    let second = TestCluster::start_new("smoke-b")?;
    let ready = run(second.kubectl()?.args(["get", "--raw", "/readyz"]))?;
    ensure!(ready.trim() == "ok", "second cluster /readyz: {ready}");
    let other = second.client().await?;
    ensure!(
        other.default_namespace() == "default",
        "unexpected default namespace"
    );

    let first_server = Kubeconfig::read_from(ctx.cluster.kubeconfig())?.clusters[0]
        .cluster
        .as_ref()
        .and_then(|c| c.server.clone());
    let second_server = Kubeconfig::read_from(second.kubeconfig())?.clusters[0]
        .cluster
        .as_ref()
        .and_then(|c| c.server.clone());
    ensure!(
        first_server.is_some() && first_server != second_server,
        "both clusters use {first_server:?}"
    );

    // Separate storage: a namespace made in the first cluster does not exist in the second.
    let ns = ctx.namespace("first-only").await?;
    match Api::<Namespace>::all(other.clone()).get(&ns).await {
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        other => bail!("namespace {ns} of the first cluster seen in the second: {other:?}"),
    }
    // Each cluster has its own CA: the first cluster's kubeconfig pointed at the second
    // server is rejected (its CA does not verify the second's serving certificate).
    let mut kubeconfig = Kubeconfig::read_from(ctx.cluster.kubeconfig())?;
    kubeconfig.clusters[0].cluster.as_mut().unwrap().server = second_server;
    let crossed = support::cluster::client_from(kubeconfig).await?;
    ensure!(
        crossed.apiserver_version().await.is_err(),
        "the second cluster accepted the first cluster's credentials"
    );
    second.stop()
}
