//! The Helm chart (charts/reaper-operator) with the real `helm` against a real local
//! control plane (tests/cluster/up.sh) and a real PostgreSQL.
//!
//! The cases share one cluster (support::trials) and run in this order, each after the
//! previous one (the install is used by the RBAC and upgrade cases); a failing case does
//! not stop the others:
//!
//! 1. `helm lint --strict` is clean; bad values are refused by the values schema (or by
//!    the templates, with a message naming the value); the defaults and every option
//!    (ci/full-values.yaml) render what the values say.
//! 2. `helm install` succeeds and its objects exist.
//! 3. The operator, run as a local process with a token of the chart's ServiceAccount
//!    (not admin), reconciles a Reaper (the RBAC is sufficient); the same token is refused
//!    what the operator does not need (the RBAC is minimal).
//! 4. The PrometheusRule's alerts are docs/operations.md's, and every metric they name is
//!    served on /metrics by an operator that has taken over an expired lease (so that the
//!    per-lease counters exist).
//! 5. The aggregated ClusterRoles: a user bound to the built-in `view` role in a namespace
//!    may read Reapers there and not change them; `edit` and `admin` may change them;
//!    nobody but the operator may write their status.
//! 6. `helm upgrade` with a changed CRD and every option on (NetworkPolicy, TLS Secret
//!    volume, IPv6 listener, priority class, ...) updates the CRD and is accepted by the
//!    API server.
//! 7. `helm uninstall` keeps the CRD (`helm.sh/resource-policy: keep`) and removes the
//!    aggregated roles (the `view` user is refused again).
//!
//! That the chart's CRD file is crds/reaper.yaml is tests/crd_drift.rs's, without a
//! cluster.
//!
//! Run it alone with `cargo test --test chart` after
//! `set -a; . "$(tests/db/up.sh dev | tail -n 1)"; set +a`; it takes about 40 seconds
//! with the control-plane binaries built. `REAPER_KEEP_CLUSTER=1` keeps the cluster.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};
use support::id::SpelledNames;

use anyhow::{Context, Result, anyhow, bail, ensure};
use assert_json_diff::{CompareMode, Config, NumericMode, assert_json_matches_no_panic};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Secret, Service, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, RoleBinding};
use k8s_openapi::api::scheduling::v1::PriorityClass;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::Kubeconfig;
use kube::{Client, ResourceExt};
use reaper_operator::config::Schema;
use reaper_operator::lease::LeaseStore;
use reaper_operator::reaper::{LeaseSpec, Phase, Reaper, ReaperSpec};
use serde::Deserialize;
use serde_json::{Value, json};
use support::cluster::{TestCluster, condition_true, repo_root, wait_until};
use support::db;
use support::fixtures::{create_deployment, create_reaper, lease_spec};
use support::operator::{OperatorProcess, OperatorSpec};
use support::trials::Suite;

const CHART: &str = "charts/reaper-operator";
const CRD_FILE: &str = "files/reaper-crd.yaml";
const RELEASE: &str = "reaper-operator";
const SECRET: &str = "reaper-db";
const CRD_NAME: &str = "reapers.pglease.dev";
const CLUSTER_NAME: &str = "chart";
const WAIT: Duration = Duration::from_secs(90);
const SCHEMA_ERROR: &str = "values don't meet the specifications of the schema";
/// Every option on: also what scripts/lint-chart.sh lints.
const FULL_VALUES: &str = "ci/full-values.yaml";
/// The PostgreSQL TLS Secret and the PriorityClass that ci/full-values.yaml names.
const TLS_SECRET: &str = "reaper-db-tls";
const PRIORITY_CLASS: &str = "platform-critical";
/// The alerts the chart ships (docs/operations.md "Alerts worth having").
const ALERTS: [&str; 5] = [
    "ReaperNoLeader",
    "ReaperTwoLeaders",
    "ReaperTakeovers",
    "ReaperDatabaseErrors",
    "ReaperRenewSlow",
];

fn main() -> ExitCode {
    let started = Instant::now();
    let suite = Suite::new(set_up);
    let trials = vec![
        suite.case("1 lint and values schema", lint),
        suite.case("2 helm install", install),
        suite.case("3 operator with the chart's RBAC", rbac),
        suite.case(
            "4 PrometheusRule alerts use served metrics",
            prometheus_rule,
        ),
        suite.case("5 aggregated view/edit/admin roles", aggregated_roles),
        suite.case("6 helm upgrade updates the CRD, every option on", upgrade),
        suite.case("7 helm uninstall keeps the CRD", uninstall),
    ];
    suite.run(trials, async move |ctx: Ctx| {
        ctx.cleanup().await;
        ctx.cluster.stop().context("tests/cluster/down.sh")?;
        eprintln!("chart test took {:.1?}", started.elapsed());
        Ok(())
    })
}

async fn set_up() -> Result<Ctx> {
    // Before a cluster is started: without a database this stops at once.
    db::direct_url();
    let started = Instant::now();
    // Always a private cluster (REAPER_TEST_KUBECONFIG is ignored): the release owns
    // cluster-scoped objects (the CRD, which case 4 changes, and a ClusterRole) that a
    // shared cluster already has or that other tests rely on.
    let cluster =
        TestCluster::start_new("chart").context("could not start the local control plane")?;
    eprintln!(
        "cluster ready in {:.1?} (kubeconfig {})",
        started.elapsed(),
        cluster.kubeconfig().display()
    );
    let suffix = format!(
        "{:x}{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
            >> 12
    );
    let home = std::env::temp_dir().join(format!("reaper-chart-test-{suffix}"));
    std::fs::create_dir_all(&home).context("helm state directory")?;
    Ok(Ctx {
        client: cluster.client().await.context("admin client")?,
        cluster,
        namespace: format!("chart-{suffix}"),
        schema: db::unique_schema("chart"),
        home,
        suffix,
    })
}

struct Ctx {
    cluster: TestCluster,
    client: Client,
    /// The release's namespace.
    namespace: String,
    /// The lease schema the release (and the operator of case 3) uses.
    schema: Schema,
    /// HELM_CACHE_HOME & co.
    home: PathBuf,
    suffix: String,
}

impl Ctx {
    fn chart(&self) -> PathBuf {
        repo_root().join(CHART)
    }

    fn helm(&self, args: &[&str]) -> Result<HelmOutput> {
        let mut cmd = self.cluster.helm(&self.home)?;
        cmd.args(args);
        helm_output(&mut cmd)
    }

    /// `helm template` of the release in namespace "ops" with the required values and
    /// `args`, as objects.
    fn template(&self, args: &[&str]) -> Result<Vec<Value>> {
        let chart = self.chart();
        let required = format!("database.existingSecret={SECRET},clusterName={CLUSTER_NAME}");
        let mut full = vec!["template", RELEASE, chart.to_str().unwrap(), "-n", "ops"];
        full.extend(["--set", &required]);
        full.extend_from_slice(args);
        let text = self.helm(&full)?.ok(&format!("helm {}", full.join(" ")))?;
        yaml_documents(&text)
    }

    /// `--set` arguments of the release (cases 2 and 6).
    fn release_values(&self) -> Vec<String> {
        [
            format!("database.existingSecret={SECRET}"),
            format!("database.schema={}", self.schema),
            "image.repository=example.invalid/reaper-operator".into(),
            format!("clusterName={CLUSTER_NAME}"),
        ]
        .into_iter()
        .flat_map(|v| ["--set".to_owned(), v])
        .collect()
    }

    /// Creates a labelled namespace (so that cleanup finds it).
    async fn create_namespace(&self, name: &str) -> Result<()> {
        let ns: Namespace = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {"reaper-chart-test": self.suffix}},
        }))?;
        Api::<Namespace>::all(self.client.clone())
            .patch(
                name,
                &PatchParams::apply("reaper-chart-test").force(),
                &Patch::Apply(&ns),
            )
            .await
            .with_context(|| format!("creating namespace {name}"))?;
        Ok(())
    }

    /// Best effort: uninstalls the release, removes this run's namespaces and schema
    /// (matters when attached to a cluster that outlives the test).
    async fn cleanup(&self) {
        let _ = self.helm(&["uninstall", RELEASE, "-n", &self.namespace, "--wait"]);
        let _ = Api::<PriorityClass>::all(self.client.clone())
            .delete(PRIORITY_CLASS, &DeleteParams::default())
            .await;
        let api = Api::<Namespace>::all(self.client.clone());
        let selector = format!("reaper-chart-test={}", self.suffix);
        if let Ok(list) = api.list(&ListParams::default().labels(&selector)).await {
            for ns in list {
                let _ = api
                    .delete(&ns.name_any(), &DeleteParams::background())
                    .await;
            }
        }
        if let Ok(pool) = sqlx::PgPool::connect(&db::direct_url()).await {
            let sql = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.schema);
            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&pool).await;
            pool.close().await;
        }
        let _ = std::fs::remove_dir_all(&self.home);
    }
}

struct HelmOutput {
    success: bool,
    stdout: String,
    stderr: String,
}

fn helm_output(cmd: &mut Command) -> Result<HelmOutput> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    Ok(HelmOutput {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

impl HelmOutput {
    fn ok(self, what: &str) -> Result<String> {
        ensure!(
            self.success,
            "{what} failed:\n{}{}",
            self.stdout,
            self.stderr
        );
        Ok(self.stdout)
    }
}

/// The documents of a multi-document YAML stream (`helm template` output).
fn yaml_documents(text: &str) -> Result<Vec<Value>> {
    let mut docs = Vec::new();
    for doc in serde_norway::Deserializer::from_str(text) {
        let value = Value::deserialize(doc)?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

/// Whether the objects of `docs` are of the kinds `expected` names, in alphabetical
/// order and separated by white space.
fn has_kinds(docs: &[Value], expected: &str) -> bool {
    kinds(docs)
        .iter()
        .map(String::as_str)
        .eq(expected.split_whitespace())
}

fn kinds(docs: &[Value]) -> Vec<String> {
    let mut kinds: Vec<String> = docs
        .iter()
        .map(|d| d["kind"].as_str().unwrap_or_default().to_owned())
        .collect();
    kinds.sort();
    kinds
}

// ---------------------------------------------------------------------------------------
// 1. lint, the values schema and what the templates render.

async fn lint(ctx: &Ctx) -> Result<()> {
    let chart = ctx.chart();
    let chart = chart.to_str().unwrap();
    let secret = format!("database.existingSecret={SECRET},clusterName={CLUSTER_NAME}");
    let full_values = ctx.chart().join(FULL_VALUES);
    let full_values = full_values.to_str().unwrap();

    lint_is_clean(ctx, chart, &secret, full_values)?;
    schema_refuses_bad_values(ctx, chart, &secret)?;
    templates_refuse_what_the_schema_cannot_see(ctx, chart, &secret)?;
    defaults_render(ctx, chart, &secret)?;
    watch_namespace_renders(ctx)?;
    // Every option on.
    check_full_render(&ctx.template(&["-f", full_values])?)?;
    security_context_defaults_can_be_removed_or_replaced(ctx)?;
    listener_renders(ctx)?;
    prometheus_rule_renders(ctx)
}

/// Clean with the defaults (plus the one required value) and with the optional parts on.
fn lint_is_clean(ctx: &Ctx, chart: &str, secret: &str, full_values: &str) -> Result<()> {
    for extra in [
        &[][..],
        &["-f", full_values][..],
        &[
            "--set",
            "watchNamespace=jobs,serviceMonitor.enabled=true,\
             database.listenUrlKey=listen-url,database.migrate=false",
        ][..],
    ] {
        let mut args = vec!["lint", "--strict", chart, "--set", secret];
        args.extend_from_slice(extra);
        let out = ctx.helm(&args)?.ok(&format!("helm {}", args.join(" ")))?;
        ensure!(
            out.contains("1 chart(s) linted, 0 chart(s) failed")
                && !out.contains("[WARNING]")
                && !out.contains("[ERROR]"),
            "helm {}:\n{out}",
            args.join(" ")
        );
    }
    Ok(())
}

/// Bad values are refused by both `helm template` and `helm lint`, naming the value.
fn schema_refuses_bad_values(ctx: &Ctx, chart: &str, secret: &str) -> Result<()> {
    let float_values = ctx.home.join("float-replicas.yaml");
    std::fs::write(&float_values, "replicaCount: 1.5\n")?;
    let float_values = float_values.to_str().unwrap().to_owned();
    let only_secret = format!("database.existingSecret={SECRET}");
    let long_secret = format!(
        "database.existingSecret={},clusterName={CLUSTER_NAME}",
        "a".repeat(254)
    );
    let bad = [
        missing_or_malformed_required_values(secret, &only_secret, &long_secret),
        malformed_secret_keys(secret),
        out_of_range_numbers(secret, &float_values),
        unknown_or_malformed_options(secret),
    ]
    .concat();
    for (what, args, path, message) in &bad {
        for command in ["template", "lint"] {
            let mut full = vec![command];
            if command == "template" {
                full.push("test");
            }
            full.push(chart);
            full.extend(args.iter().copied());
            let out = ctx.helm(&full)?;
            let text = format!("{}{}", out.stdout, out.stderr);
            ensure!(!out.success, "{what}: helm {command} accepted it:\n{text}");
            ensure!(
                text.contains(SCHEMA_ERROR)
                    && text.contains(&format!("at '{path}"))
                    && text.contains(message),
                "{what}: helm {command} did not refuse it with the schema message \
                 (at '{path}': {message}):\n{text}"
            );
        }
    }
    Ok(())
}

/// A value the values schema refuses: what it is, the `helm` arguments that give it, and
/// where (a JSON pointer) and how the schema's message says so.
type SchemaRefusal<'a> = (&'a str, Vec<&'a str>, &'a str, &'a str);

/// Values set on top of the required values (`secret`) that the schema refuses, from a
/// table of a case a line: `what it is | the --set value | path | message`.
fn refused_values<'a>(secret: &'a str, table: &'a str) -> Vec<SchemaRefusal<'a>> {
    table
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(|line| {
            let fields: Vec<&str> = line.split('|').map(str::trim).collect();
            let [what, set, path, message] = fields[..] else {
                panic!("not a case of four fields: {line}");
            };
            (what, vec!["--set", secret, "--set", set], path, message)
        })
        .collect()
}

/// The database Secret and the cluster name: missing, empty, or not a name.
fn missing_or_malformed_required_values<'a>(
    secret: &'a str,
    only_secret: &'a str,
    long_secret: &'a str,
) -> Vec<SchemaRefusal<'a>> {
    let mut cases = vec![
        (
            "no database Secret",
            vec![],
            "/database/existingSecret",
            "minLength: got 0, want 1",
        ),
        (
            "empty database Secret",
            vec!["--set", "database.existingSecret="],
            "/database/existingSecret",
            "minLength: got 0, want 1",
        ),
        (
            "no clusterName",
            vec!["--set", only_secret],
            "/clusterName",
            "minLength: got 0, want 1",
        ),
        (
            "database Secret not a DNS-1123 subdomain",
            vec![
                "--set",
                "database.existingSecret=Reaper_DB",
                "--set",
                "clusterName=x",
            ],
            "/database/existingSecret",
            "'Reaper_DB' does not match pattern",
        ),
        (
            "database Secret of 254 characters",
            vec!["--set", long_secret],
            "/database/existingSecret",
            "maxLength: got 254, want 253",
        ),
    ];
    cases.extend(refused_values(
        secret,
        "clusterName not a DNS label | clusterName=East_1 | /clusterName | does not match pattern",
    ));
    cases
}

/// The keys and the TLS Secret read from the database Secrets: not names.
fn malformed_secret_keys(secret: &str) -> Vec<SchemaRefusal<'_>> {
    refused_values(
        secret,
        "
        urlKey not a Secret key | database.urlKey=db/url | /database/urlKey | 'db/url' does not match pattern
        listenUrlKey not a Secret key | database.listenUrlKey=listen url | /database/listenUrlKey | 'listen url' does not match pattern
        TLS Secret not a DNS-1123 subdomain | database.tls.existingSecret=-tls | /database/tls/existingSecret | '-tls' does not match pattern
        TLS caKey not a Secret key | database.tls.caKey=ca crt | /database/tls/caKey | 'ca crt' does not match pattern
        client certificate without its key | database.tls.certKey=tls.crt | /database/tls/keyKey | minLength: got 0, want 1
        ",
    )
}

/// Numbers out of their range, or not integers.
fn out_of_range_numbers<'a>(secret: &'a str, float_values: &'a str) -> Vec<SchemaRefusal<'a>> {
    let mut cases = vec![
        (
            "replicaCount 1.5",
            vec!["--set", secret, "-f", float_values],
            "/replicaCount",
            "got number, want integer",
        ),
        (
            "replicaCount a string",
            vec!["--set", secret, "--set-string", "replicaCount=2"],
            "/replicaCount",
            "got string, want integer",
        ),
    ];
    cases.extend(refused_values(
        secret,
        "
        replicaCount 0 | replicaCount=0 | /replicaCount | minimum: got 0, want 1
        shutdownTimeoutSeconds 0 | shutdownTimeoutSeconds=0 | /shutdownTimeoutSeconds | minimum: got 0, want 1
        shutdownTimeoutSeconds 3601 | shutdownTimeoutSeconds=3601 | /shutdownTimeoutSeconds | maximum
        minAvailable 100% (no pod evictable: every drain blocked) | podDisruptionBudget.minAvailable=100% | /podDisruptionBudget/minAvailable | '100%' does not match pattern
        minAvailable -1 | podDisruptionBudget.minAvailable=-1 | /podDisruptionBudget/minAvailable | minimum: got -1, want 0
        http.port 0 | http.port=0 | /http/port | minimum: got 0, want 1
        ",
    ));
    cases
}

/// Values that are no option of the chart, and options in the wrong form (the empty path
/// is the top level).
fn unknown_or_malformed_options(secret: &str) -> Vec<SchemaRefusal<'_>> {
    refused_values(
        secret,
        "
        logFormat xml | logFormat=xml | /logFormat | value must be one of 'text', 'json'
        a misspelt value | replicas=3 | | additional properties 'replicas' not allowed
        a probe that would cut the handover's grace period short | probes.liveness.terminationGracePeriodSeconds=1 | /probes/liveness | additional properties 'terminationGracePeriodSeconds' not allowed
        image digest not sha256 | image.digest=latest | /image/digest | 'latest' does not match pattern
        http.address in brackets | http.address=[::] | /http/address | '[::]' does not match pattern
        http.address a host name | http.address=localhost | /http/address | 'localhost' does not match pattern
        an unknown alert to disable | prometheusRule.disabledAlerts[0]=NoLeader | /prometheusRule/disabledAlerts/0 | value must be one of
        an API server CIDR without its prefix length | networkPolicy.egress.apiServer.cidrs[0]=10.0.0.1 | /networkPolicy/egress/apiServer/cidrs/0 | '10.0.0.1' does not match pattern
        a misspelt securityContext field | securityContext.runAsUid=1000 | /securityContext | additional properties 'runAsUid' not allowed
        a probe path (the chart's own) | probes.liveness.path=/x | /probes/liveness | additional properties 'path' not allowed
        ",
    )
}

/// What the schema cannot see, the templates refuse, naming the value.
fn templates_refuse_what_the_schema_cannot_see(ctx: &Ctx, chart: &str, secret: &str) -> Result<()> {
    let only_secret = format!("database.existingSecret={SECRET}");
    let refused: Vec<(&str, Vec<&str>, &str)> = vec![
        (
            "minAvailable 60% of 2 pods",
            vec!["--set", "podDisruptionBudget.minAvailable=60%"],
            "podDisruptionBudget.minAvailable 60% of replicaCount 2 is 2 pod(s)",
        ),
        (
            "minAvailable 100% without the schema",
            vec![
                "--skip-schema-validation",
                "--set",
                "podDisruptionBudget.minAvailable=100%",
            ],
            "podDisruptionBudget.minAvailable 100% of replicaCount 2 is 2 pod(s)",
        ),
        (
            "minAvailable 2 of 2 pods",
            vec!["--set", "podDisruptionBudget.minAvailable=2"],
            "podDisruptionBudget.minAvailable (2) must be less than replicaCount (2)",
        ),
        (
            "extraEnv setting a variable of the chart",
            vec![
                "--set",
                "extraEnv[0].name=REAPER_HTTP_ADDR",
                "--set",
                "extraEnv[0].value=0.0.0.0:1",
            ],
            "extraEnv sets REAPER_HTTP_ADDR, which the chart sets itself",
        ),
        (
            "client certificate without its key, without the schema",
            vec![
                "--skip-schema-validation",
                "--set",
                "database.tls.existingSecret=tls",
                "--set",
                "database.tls.certKey=tls.crt",
            ],
            "database.tls.certKey and database.tls.keyKey name the client certificate and its key: set both or neither",
        ),
    ];
    for (what, args, message) in &refused {
        let mut full = vec!["template", "test", chart, "--set", secret];
        full.extend(args.iter().copied());
        let out = ctx.helm(&full)?;
        ensure!(
            !out.success && out.stderr.contains(message),
            "{what}: helm template did not refuse it with {message:?}:\n{}{}",
            out.stdout,
            out.stderr
        );
    }

    // Without schema validation the template still refuses a missing cluster name, and a
    // missing Secret, clearly.
    let only_cluster = format!("clusterName={CLUSTER_NAME}");
    for (what, set, message) in [
        ("clusterName", &only_secret, "clusterName is required"),
        (
            "a Secret",
            &only_cluster,
            "database.existingSecret is required",
        ),
    ] {
        let out = ctx.helm(&[
            "template",
            "test",
            chart,
            "--skip-schema-validation",
            "--set",
            set,
        ])?;
        ensure!(
            !out.success && out.stderr.contains(message),
            "template without {what} and without the schema:\n{}{}",
            out.stdout,
            out.stderr
        );
    }
    Ok(())
}

/// What the defaults render: the objects, the CRD, the Deployment, the aggregated roles,
/// and no database URL in plain text.
fn defaults_render(ctx: &Ctx, chart: &str, secret: &str) -> Result<()> {
    let text = ctx
        .helm(&["template", RELEASE, chart, "-n", "ops", "--set", secret])?
        .ok("helm template")?;
    let docs = yaml_documents(&text)?;
    ensure!(
        has_kinds(
            &docs,
            "ClusterRole ClusterRole ClusterRole ClusterRoleBinding \
             CustomResourceDefinition Deployment PodDisruptionBudget Role RoleBinding \
             Service ServiceAccount",
        ),
        "rendered kinds: {:?}",
        kinds(&docs)
    );
    check_rendered_crd(find(&docs, "CustomResourceDefinition")[0])?;
    check_rendered_deployment(find(&docs, "Deployment")[0])?;
    check_aggregated_roles(&docs)?;
    ensure!(
        !text.contains("postgres://"),
        "a database URL is rendered in plain text"
    );
    Ok(())
}

/// watchNamespace: a Role and RoleBinding in that namespace, no cluster-wide RBAC for
/// the operator (the aggregated roles are for users, and can be turned off too).
fn watch_namespace_renders(ctx: &Ctx) -> Result<()> {
    let docs = ctx.template(&["--set", "watchNamespace=jobs,crds.install=false"])?;
    ensure!(
        has_kinds(
            &docs,
            "ClusterRole ClusterRole Deployment PodDisruptionBudget Role Role \
             RoleBinding RoleBinding Service ServiceAccount",
        ),
        "rendered kinds with watchNamespace and without the CRD: {:?}",
        kinds(&docs)
    );
    // The controller's Role in the watched namespace; the presence Role (leases) in
    // the release namespace, where the replicas run.
    for kind in ["Role", "RoleBinding"] {
        let namespaces: BTreeSet<&str> = find(&docs, kind)
            .iter()
            .filter_map(|d| d["metadata"]["namespace"].as_str())
            .collect();
        ensure!(
            namespaces == BTreeSet::from(["jobs", "ops"]),
            "{kind}s in namespaces {namespaces:?}, expected the watched one and the release's"
        );
    }
    ensure!(
        find(&docs, "RoleBinding")
            .iter()
            .all(|b| b["subjects"][0]["namespace"] == "ops"),
        "a RoleBinding does not name the ServiceAccount in the release namespace"
    );
    let env = &find(&docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["env"];
    ensure!(
        env.as_array().is_some_and(
            |e| e.contains(&json!({"name": "REAPER_WATCH_NAMESPACE", "value": "jobs"}))
        ),
        "REAPER_WATCH_NAMESPACE not set: {env}"
    );
    let docs = ctx.template(&[
        "--set",
        "watchNamespace=jobs,crds.install=false,rbac.aggregateToDefaultRoles=false",
    ])?;
    ensure!(
        find(&docs, "ClusterRole").is_empty(),
        "aggregateToDefaultRoles=false still renders ClusterRoles: {:?}",
        kinds(&docs)
    );
    Ok(())
}

/// OpenShift: null removes a default, the rest of the context stays.
fn security_context_defaults_can_be_removed_or_replaced(ctx: &Ctx) -> Result<()> {
    let docs = ctx.template(&[
        "--set",
        "securityContext.runAsUser=null,securityContext.runAsGroup=null",
        "--set",
        "podSecurityContext.runAsUser=null,podSecurityContext.runAsGroup=null,\
         podSecurityContext.fsGroup=null",
    ])?;
    let pod = &find(&docs, "Deployment")[0]["spec"]["template"]["spec"];
    let (psc, sc) = (
        &pod["securityContext"],
        &pod["containers"][0]["securityContext"],
    );
    for (what, context) in [("pod", psc), ("container", sc)] {
        for key in ["runAsUser", "runAsGroup", "fsGroup"] {
            ensure!(
                context.get(key).is_none(),
                "{what} securityContext.{key} set to null is still rendered: {context}"
            );
        }
        ensure!(
            context["runAsNonRoot"] == true
                && context["seccompProfile"]["type"] == "RuntimeDefault",
            "{what} securityContext lost its other defaults: {context}"
        );
    }
    ensure!(
        sc["readOnlyRootFilesystem"] == true && sc["capabilities"]["drop"] == json!(["ALL"]),
        "container securityContext lost its other defaults: {sc}"
    );
    // ... and a value replaces one.
    let docs = ctx.template(&["--set", "securityContext.runAsUser=1000700000"])?;
    let sc = &find(&docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["securityContext"];
    ensure!(
        sc["runAsUser"] == 1000700000_i64,
        "runAsUser override: {sc}"
    );
    Ok(())
}

/// The listener: IPv6 in brackets, IPv4 as it is, the port everywhere.
fn listener_renders(ctx: &Ctx) -> Result<()> {
    for (address, port, expected) in [
        ("::1", "8080", "[::1]:8080"),
        ("fd00::10", "9443", "[fd00::10]:9443"),
        ("127.0.0.1", "9000", "127.0.0.1:9000"),
    ] {
        let docs = ctx.template(&[
            "--set-string",
            &format!("http.address={address}"),
            "--set",
            &format!("http.port={port}"),
        ])?;
        let container = &find(&docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0];
        let addr = env_var(container, "REAPER_HTTP_ADDR").map(|v| v["value"].clone());
        ensure!(
            addr == Some(json!(expected)),
            "http.address={address} http.port={port}: REAPER_HTTP_ADDR {addr:?}, expected {expected}"
        );
        ensure!(
            container["ports"]
                == json!([{"name": "http", "containerPort": port.parse::<u16>()?, "protocol": "TCP"}]),
            "containerPort for http.port={port}: {}",
            container["ports"]
        );
    }
    Ok(())
}

/// PrometheusRule: off by default (defaults_render); on, the documented alerts, minus
/// disabled ones.
fn prometheus_rule_renders(ctx: &Ctx) -> Result<()> {
    let docs = ctx.template(&[
        "--set",
        "prometheusRule.enabled=true,prometheusRule.disabledAlerts[0]=ReaperRenewSlow",
    ])?;
    let names: Vec<String> = rule_alerts(&docs)?.into_iter().map(|(n, _)| n).collect();
    ensure!(
        names == ALERTS[..4],
        "alerts with ReaperRenewSlow disabled: {names:?}"
    );
    Ok(())
}

/// The env var `name` of a rendered container.
fn env_var<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == name)
}

/// (alert, expr) of every rule of the rendered PrometheusRule.
fn rule_alerts(docs: &[Value]) -> Result<Vec<(String, String)>> {
    let rules = find(docs, "PrometheusRule");
    ensure!(
        rules.len() == 1,
        "PrometheusRules rendered: {}",
        rules.len()
    );
    let groups = rules[0]["spec"]["groups"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    Ok(groups
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .map(|r| {
            (
                r["alert"].as_str().unwrap_or_default().to_owned(),
                r["expr"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect())
}

/// The two aggregated ClusterRoles of the release "reaper-operator".
fn check_aggregated_roles(docs: &[Value]) -> Result<()> {
    let role = |name: &str| {
        find(docs, "ClusterRole")
            .into_iter()
            .find(|r| r["metadata"]["name"] == name)
            .ok_or_else(|| anyhow!("no ClusterRole {name}"))
    };
    let label = "rbac.authorization.k8s.io/aggregate-to-";
    let view = role(&format!("{RELEASE}-view"))?;
    let edit = role(&format!("{RELEASE}-edit"))?;
    ensure!(
        view["metadata"]["labels"][format!("{label}view")] == "true",
        "the view role is not aggregated to view: {}",
        view["metadata"]
    );
    ensure!(
        view["rules"]
            == json!([{"apiGroups": ["pglease.dev"], "resources": ["reapers", "reapers/status"], "verbs": ["get", "list", "watch"]}]),
        "view rules: {}",
        view["rules"]
    );
    for to in ["edit", "admin"] {
        ensure!(
            edit["metadata"]["labels"][format!("{label}{to}")] == "true",
            "the edit role is not aggregated to {to}: {}",
            edit["metadata"]
        );
    }
    ensure!(
        edit["metadata"]["labels"]
            .get(format!("{label}view"))
            .is_none(),
        "the edit role must not reach view"
    );
    ensure!(
        edit["rules"].as_array().is_some_and(|rules| rules
            .iter()
            .all(|r| r["apiGroups"] == json!(["pglease.dev"])
                && r["resources"] == json!(["reapers"]))),
        "the edit role grants more than reapers (their status is the operator's): {}",
        edit["rules"]
    );
    let verbs: BTreeSet<String> = edit["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|r| r["verbs"].as_array().cloned().unwrap_or_default())
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    for verb in ["create", "update", "patch", "delete"] {
        ensure!(
            verbs.contains(verb),
            "the edit role lacks {verb}: {verbs:?}"
        );
    }
    Ok(())
}

/// The rendered CRD is crds/reaper.yaml plus the keep annotation and the chart's labels.
fn check_rendered_crd(rendered: &Value) -> Result<()> {
    let committed: Value = serde_norway::from_str(&std::fs::read_to_string(
        repo_root().join("crds/reaper.yaml"),
    )?)?;
    ensure!(
        rendered["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep",
        "the CRD lacks helm.sh/resource-policy: keep: {}",
        rendered["metadata"]
    );
    let mut stripped = rendered.clone();
    let meta = stripped["metadata"].as_object_mut().unwrap();
    meta.remove("annotations");
    meta.remove("labels");
    // Strict: no key more or less on either side. Numbers as floats: crds/reaper.yaml
    // writes `maximum: 3600.0`, toYaml writes 3600, the same JSON number.
    let config = Config::new(CompareMode::Strict).numeric_mode(NumericMode::AssumeFloat);
    assert_json_matches_no_panic(&stripped, &committed, config).map_err(|differences| {
        anyhow!(
            "the rendered CRD (lhs) is not crds/reaper.yaml (rhs) (fromYaml/toYaml changed \
             something):\n{differences}"
        )
    })
}

fn check_rendered_deployment(d: &Value) -> Result<()> {
    let pod = &d["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let env: Vec<&Value> = container["env"].as_array().into_iter().flatten().collect();
    let var = |name: &str| env.iter().find(|e| e["name"] == name).copied();
    ensure!(
        d["spec"]["replicas"] == 2,
        "replicas: {}",
        d["spec"]["replicas"]
    );
    ensure!(
        var("POD_NAME").map(|v| &v["valueFrom"]["fieldRef"]["fieldPath"])
            == Some(&json!("metadata.name")),
        "POD_NAME is not from the downward API"
    );
    ensure!(
        var("DATABASE_URL").map(|v| &v["valueFrom"]["secretKeyRef"])
            == Some(&json!({"name": SECRET, "key": "url"})),
        "DATABASE_URL is not from the Secret: {:?}",
        var("DATABASE_URL")
    );
    ensure!(
        var("REAPER_CLUSTER_NAME").map(|v| &v["value"]) == Some(&json!(CLUSTER_NAME)),
        "REAPER_CLUSTER_NAME"
    );
    ensure!(
        var("REAPER_NO_MIGRATE").is_none() && var("REAPER_WATCH_NAMESPACE").is_none(),
        "defaults must migrate and watch all namespaces"
    );
    ensure!(
        var("REAPER_HTTP_ADDR").map(|v| &v["value"]) == Some(&json!("0.0.0.0:8080"))
            && container["ports"]
                == json!([{"name": "http", "containerPort": 8080, "protocol": "TCP"}]),
        "the listener: {:?} {}",
        var("REAPER_HTTP_ADDR"),
        container["ports"]
    );
    let app_version = serde_norway::from_str::<Value>(&std::fs::read_to_string(
        repo_root().join(CHART).join("Chart.yaml"),
    )?)?["appVersion"]
        .clone();
    ensure!(
        container["image"] == format!("reaper-operator:{}", app_version.as_str().unwrap_or("?")),
        "image {} is not reaper-operator:<appVersion {app_version}>",
        container["image"]
    );
    let http_get = |path: &str| json!({"path": path, "port": "http"});
    ensure!(
        container["startupProbe"]
            == json!({"httpGet": http_get("/healthz"), "periodSeconds": 2, "timeoutSeconds": 3, "failureThreshold": 30})
            && container["livenessProbe"]
                == json!({"httpGet": http_get("/healthz"), "periodSeconds": 10, "timeoutSeconds": 3, "failureThreshold": 3})
            && container["readinessProbe"]
                == json!({"httpGet": http_get("/readyz"), "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 3}),
        "probes: startup {} liveness {} readiness {}",
        container["startupProbe"],
        container["livenessProbe"],
        container["readinessProbe"]
    );
    let sc = &container["securityContext"];
    ensure!(
        sc["runAsNonRoot"] == true
            && sc["runAsUser"] == 65532
            && sc["runAsGroup"] == 65532
            && sc["readOnlyRootFilesystem"] == true
            && sc["allowPrivilegeEscalation"] == false
            && sc["privileged"] == false
            && sc["capabilities"]["drop"] == json!(["ALL"])
            && sc["seccompProfile"]["type"] == "RuntimeDefault",
        "securityContext: {sc}"
    );
    let psc = &pod["securityContext"];
    ensure!(
        *psc == json!({"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}}),
        "pod securityContext: {psc}"
    );
    ensure!(
        pod.get("volumes").is_none() && container.get("volumeMounts").is_none(),
        "volumes by default: {} {}",
        pod["volumes"],
        container["volumeMounts"]
    );
    ensure!(
        pod["terminationGracePeriodSeconds"].as_i64() > Some(45),
        "terminationGracePeriodSeconds must exceed shutdownTimeoutSeconds: {}",
        pod["terminationGracePeriodSeconds"]
    );
    ensure!(
        pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
            ["topologyKey"]
            == "kubernetes.io/hostname",
        "no pod anti-affinity: {}",
        pod["affinity"]
    );
    Ok(())
}

/// ci/full-values.yaml: every option rendered as its values say.
fn check_full_render(docs: &[Value]) -> Result<()> {
    ensure!(
        has_kinds(
            docs,
            "ClusterRole ClusterRole ClusterRole ClusterRoleBinding \
             CustomResourceDefinition Deployment NetworkPolicy PodDisruptionBudget \
             PrometheusRule Role RoleBinding Service ServiceAccount ServiceMonitor",
        ),
        "kinds with every option: {:?}",
        kinds(docs)
    );
    check_full_deployment(docs)?;
    let selector = &find(docs, "Deployment")[0]["spec"]["selector"]["matchLabels"];
    check_full_network_policy(find(docs, "NetworkPolicy")[0], selector)?;
    check_full_prometheus_rule(docs)
}

/// The Deployment, its Service and its PodDisruptionBudget with every option on.
fn check_full_deployment(docs: &[Value]) -> Result<()> {
    let d = find(docs, "Deployment")[0];
    let pod = &d["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    ensure!(
        container["image"] == format!("registry.example.com/reaper-operator@{digest}"),
        "image with a digest (the tag must not be used): {}",
        container["image"]
    );
    ensure!(
        env_var(container, "REAPER_HTTP_ADDR").map(|v| &v["value"]) == Some(&json!("[::]:9090"))
            && container["ports"]
                == json!([{"name": "http", "containerPort": 9090, "protocol": "TCP"}]),
        "IPv6 listener: {:?} {}",
        env_var(container, "REAPER_HTTP_ADDR"),
        container["ports"]
    );
    let svc = find(docs, "Service")[0];
    ensure!(
        svc["spec"]["ports"]
            == json!([{"name": "http", "port": 9090, "targetPort": "http", "protocol": "TCP"}]),
        "Service ports: {}",
        svc["spec"]["ports"]
    );
    // Merged over the defaults: the override and the untouched default.
    ensure!(
        container["startupProbe"]["failureThreshold"] == 60
            && container["startupProbe"]["periodSeconds"] == 2
            && container["startupProbe"]["httpGet"]["path"] == "/healthz",
        "startupProbe: {}",
        container["startupProbe"]
    );
    check_full_volumes(pod, container)?;
    ensure!(
        env_var(container, "OTEL_SERVICE_NAME").map(|v| &v["value"])
            == Some(&json!("reaper-operator")),
        "extraEnv not rendered: {}",
        container["env"]
    );
    ensure!(
        pod["priorityClassName"] == PRIORITY_CLASS,
        "priorityClassName: {}",
        pod["priorityClassName"]
    );
    let selector = &d["spec"]["selector"]["matchLabels"];
    ensure!(
        pod["topologySpreadConstraints"]
            == json!([{
                "maxSkew": 1,
                "topologyKey": "topology.kubernetes.io/zone",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": selector},
            }]),
        "topologySpreadConstraints (labelSelector filled in): {}",
        pod["topologySpreadConstraints"]
    );
    ensure!(
        find(docs, "PodDisruptionBudget")[0]["spec"]["minAvailable"] == "50%",
        "PDB minAvailable 50%"
    );
    Ok(())
}

/// The TLS Secret under fixed file names, 0440, readable through fsGroup; the extra
/// volume beside it.
fn check_full_volumes(pod: &Value, container: &Value) -> Result<()> {
    ensure!(
        pod["volumes"][0]
            == json!({"name": "pg-tls", "secret": {
                "secretName": TLS_SECRET,
                "defaultMode": 0o440,
                "items": [
                    {"key": "ca.crt", "path": "ca.crt"},
                    {"key": "tls.crt", "path": "tls.crt"},
                    {"key": "tls.key", "path": "tls.key"},
                ],
            }}),
        "TLS volume: {}",
        pod["volumes"][0]
    );
    ensure!(
        container["volumeMounts"][0]
            == json!({"name": "pg-tls", "mountPath": "/etc/reaper/pg-tls", "readOnly": true}),
        "TLS mount: {}",
        container["volumeMounts"][0]
    );
    ensure!(
        pod["securityContext"]["fsGroup"] == 65532,
        "fsGroup: {}",
        pod["securityContext"]
    );
    ensure!(
        pod["volumes"][1]["name"] == "scratch"
            && container["volumeMounts"][1] == json!({"name": "scratch", "mountPath": "/tmp"}),
        "extraVolumes/extraVolumeMounts: {} {}",
        pod["volumes"],
        container["volumeMounts"]
    );
    Ok(())
}

/// NetworkPolicy: in on the http port only, out to the API server, the database and DNS.
fn check_full_network_policy(np: &Value, selector: &Value) -> Result<()> {
    let spec = &np["spec"];
    ensure!(
        spec["podSelector"]["matchLabels"] == *selector
            && spec["policyTypes"] == json!(["Ingress", "Egress"]),
        "NetworkPolicy selector/types: {spec}"
    );
    let ingress = spec["ingress"].as_array().cloned().unwrap_or_default();
    ensure!(
        ingress.len() == 1
            && ingress[0]["ports"] == json!([{"port": "http", "protocol": "TCP"}])
            && ingress[0]["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                == "monitoring",
        "NetworkPolicy ingress: {}",
        spec["ingress"]
    );
    let tcp = |ports: &[u16]| -> Value {
        ports
            .iter()
            .map(|p| json!({"port": p, "protocol": "TCP"}))
            .collect()
    };
    let egress = spec["egress"].as_array().cloned().unwrap_or_default();
    ensure!(
        egress.len() == 3,
        "NetworkPolicy egress rules: {}",
        spec["egress"]
    );
    ensure!(
        egress[0]["ports"] == tcp(&[443, 6443])
            && egress[0]["to"]
                == json!([{"ipBlock": {"cidr": "10.0.0.1/32"}}, {"ipBlock": {"cidr": "192.168.10.0/24"}}]),
        "egress to the API server: {}",
        egress[0]
    );
    ensure!(
        egress[1]["ports"] == tcp(&[5432, 6432])
            && egress[1]["to"][0] == json!({"ipBlock": {"cidr": "10.20.0.0/16"}}),
        "egress to the database: {}",
        egress[1]
    );
    ensure!(
        egress[2]["ports"]
            == json!([{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}])
            && egress[2]["to"][0]["podSelector"]["matchLabels"]["k8s-app"] == "kube-dns",
        "egress to DNS: {}",
        egress[2]
    );
    Ok(())
}

/// PrometheusRule: the documented alerts, the extra one, the configured labels.
fn check_full_prometheus_rule(docs: &[Value]) -> Result<()> {
    let rule = find(docs, "PrometheusRule")[0];
    ensure!(
        rule["metadata"]["labels"]["release"] == "kube-prometheus-stack",
        "PrometheusRule labels: {}",
        rule["metadata"]
    );
    let names: Vec<String> = rule_alerts(docs)?.into_iter().map(|(n, _)| n).collect();
    let mut expected: Vec<String> = ALERTS.iter().map(|a| a.to_string()).collect();
    expected.push("ReaperReconcileErrors".into());
    ensure!(names == expected, "alerts: {names:?}");
    for r in rule["spec"]["groups"][0]["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .take(ALERTS.len())
    {
        ensure!(
            r["labels"]["team"] == "platform"
                && ["critical", "warning"]
                    .contains(&r["labels"]["severity"].as_str().unwrap_or(""))
                && r["annotations"]["runbook_url"]
                    .as_str()
                    .is_some_and(|u| u.starts_with("https://"))
                && r["annotations"]["summary"].is_string(),
            "alert labels/annotations: {r}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 2. helm install into a namespace that holds the database Secret.

async fn install(ctx: &Ctx) -> Result<()> {
    let ns = &ctx.namespace;
    ctx.create_namespace(ns).await?;
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": SECRET},
        "stringData": {"url": db::direct_url()},
    }))?;
    Api::<Secret>::namespaced(ctx.client.clone(), ns)
        .create(&PostParams::default(), &secret)
        .await
        .context("creating the database Secret")?;
    // The lease tables, migrated over the direct URL (kwok's pods never run the image).
    let store = LeaseStore::connect(&db::direct_url(), &ctx.schema, Duration::from_secs(10), 1)
        .await
        .context("connecting to the test database")?;
    store.migrate().await.context("migrating the schema")?;
    store.pool().close().await;

    let chart = ctx.chart();
    install_without_a_secret_is_refused(ctx, &chart)?;

    let mut args = vec!["install", RELEASE, chart.to_str().unwrap(), "-n", ns];
    args.extend(["--wait", "--timeout", "120s"]);
    let values = ctx.release_values();
    args.extend(values.iter().map(String::as_str));
    let notes = ctx.helm(&args)?.ok("helm install")?;
    for needle in [
        "kubectl get reapers -A",
        "involvedObject.kind=Reaper",
        "reaper-operator lease status",
    ] {
        ensure!(
            notes.contains(needle),
            "NOTES do not mention {needle:?}:\n{notes}"
        );
    }

    installed_objects(ctx).await?;
    let status = ctx
        .helm(&["status", RELEASE, "-n", ns])?
        .ok("helm status")?;
    ensure!(status.contains("STATUS: deployed"), "helm status: {status}");
    Ok(())
}

/// Without a Secret: refused before anything is created, with the schema's message.
fn install_without_a_secret_is_refused(ctx: &Ctx, chart: &Path) -> Result<()> {
    let ns = &ctx.namespace;
    let out = ctx.helm(&["install", RELEASE, chart.to_str().unwrap(), "-n", ns])?;
    let text = format!("{}{}", out.stdout, out.stderr);
    ensure!(
        !out.success
            && text.contains("INSTALLATION FAILED")
            && text.contains(SCHEMA_ERROR)
            && text.contains("at '/database/existingSecret': minLength: got 0, want 1"),
        "helm install without database.existingSecret:\n{text}"
    );
    let releases = ctx.helm(&["list", "-n", ns, "-a", "-q"])?.ok("helm list")?;
    ensure!(
        releases.trim().is_empty(),
        "a refused install left a release: {releases}"
    );
    Ok(())
}

/// The release's objects exist, as the values say, and the CRD is Established.
async fn installed_objects(ctx: &Ctx) -> Result<()> {
    let ns = &ctx.namespace;
    let d = Api::<Deployment>::namespaced(ctx.client.clone(), ns)
        .get(RELEASE)
        .await
        .context("the Deployment")?;
    ensure!(d.spec.replicas == Some(2), "replicas: {:?}", d.spec);
    ensure!(
        d.status.as_ref().and_then(|s| s.ready_replicas) == Some(2),
        "helm --wait returned before 2 ready replicas: {:?}",
        d.status
    );
    Api::<ServiceAccount>::namespaced(ctx.client.clone(), ns)
        .get(RELEASE)
        .await
        .context("the ServiceAccount")?;
    let role = Api::<ClusterRole>::all(ctx.client.clone())
        .get(RELEASE)
        .await
        .context("the ClusterRole")?;
    ensure!(
        role.rules.as_ref().is_some_and(|r| !r.is_empty()),
        "ClusterRole without rules"
    );
    let binding = Api::<ClusterRoleBinding>::all(ctx.client.clone())
        .get(RELEASE)
        .await
        .context("the ClusterRoleBinding")?;
    let subject = binding.subjects.unwrap_or_default();
    ensure!(
        subject.len() == 1
            && subject[0].kind == "ServiceAccount"
            && subject[0].name == RELEASE
            && subject[0].namespace.as_deref() == Some(ns.as_str()),
        "ClusterRoleBinding subjects: {subject:?}"
    );
    let svc = Api::<Service>::namespaced(ctx.client.clone(), ns)
        .get(RELEASE)
        .await
        .context("the Service")?;
    let ports = svc.spec.and_then(|s| s.ports).unwrap_or_default();
    ensure!(
        ports.len() == 1 && ports[0].name.as_deref() == Some("http") && ports[0].port == 8080,
        "Service ports: {ports:?}"
    );
    let pdb = Api::<PodDisruptionBudget>::namespaced(ctx.client.clone(), ns)
        .get(RELEASE)
        .await
        .context("the PodDisruptionBudget")?;
    ensure!(
        pdb.spec.and_then(|s| s.min_available)
            == Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1)),
        "PDB minAvailable"
    );
    let crd = Api::<CustomResourceDefinition>::all(ctx.client.clone())
        .get(CRD_NAME)
        .await
        .context("the CRD")?;
    ensure!(
        kept_by_helm(&crd),
        "CRD annotations: {:?}",
        crd.annotations()
    );
    ensure!(
        condition_true(&crd, "Established"),
        "the CRD is not Established after helm --wait"
    );
    Ok(())
}

/// The CRD carries `helm.sh/resource-policy: keep`: `helm uninstall` leaves it, and with
/// it every Reaper.
fn kept_by_helm(crd: &CustomResourceDefinition) -> bool {
    crd.annotations()
        .get("helm.sh/resource-policy")
        .is_some_and(|policy| policy == "keep")
}

// ---------------------------------------------------------------------------------------
// 3. The operator with the chart's ServiceAccount token: sufficient and minimal.

async fn rbac(ctx: &Ctx) -> Result<()> {
    let sa_ns = &ctx.namespace;
    let token = support::cluster::service_account_token(&ctx.client, sa_ns, RELEASE, 3600).await?;
    let kubeconfig = ctx.home.join("operator.kubeconfig");
    write_token_kubeconfig(ctx.cluster.kubeconfig(), &token, sa_ns, &kubeconfig)?;
    let sa = support::cluster::client_from(Kubeconfig::read_from(&kubeconfig)?).await?;

    // The workload: a Recreate Deployment at 0 replicas and its Reaper, made by an admin.
    let ns = format!("chart-app-{}", ctx.suffix);
    ctx.create_namespace(&ns).await?;
    create_workload(ctx, &ns, "sweeper").await?;

    // The RBAC authorizer's cache may need a moment for the binding.
    let sa_reapers = Api::<Reaper>::namespaced(sa.clone(), &ns);
    wait_until("the ServiceAccount to list Reapers", WAIT, || {
        let sa_reapers = sa_reapers.clone();
        async move {
            match sa_reapers.list(&ListParams::default()).await {
                Ok(_) => Ok(Some(())),
                Err(kube::Error::Api(s)) if s.code == 403 => Ok(None),
                Err(e) => Err(e.into()),
            }
        }
    })
    .await?;

    let op = OperatorProcess::start(OperatorSpec {
        kubeconfig: &kubeconfig,
        database_url: &db::direct_url(),
        listen_database_url: None,
        schema: ctx.schema.as_str(),
        cluster: CLUSTER_NAME,
        identity: "op-1",
        migrate: false,
        namespace: &ns,
    });
    // Sufficient: the whole job done with the chart's RBAC, and not one refusal logged.
    let mut problems = Vec::new();
    if let Err(e) = sufficient(ctx, &ns, &op).await {
        problems.push(format!("{e:#}\n--- operator log:\n{}", op.log_tail()));
    }
    let log_path = op.log.clone();
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    drop(op); // kills the process
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| l.to_lowercase().contains("forbidden"))
        .collect();
    if !refusals.is_empty() {
        problems.push(format!(
            "the operator was refused something with the chart's RBAC:\n{}",
            refusals.join("\n")
        ));
    }
    // Minimal: the same token is refused what the operator does not need.
    if let Err(e) = minimal(ctx, &sa, &ns).await {
        problems.push(format!("{e:#}"));
    }
    ensure!(problems.is_empty(), "{}", problems.join("\n"));
    let _ = std::fs::remove_file(&log_path); // kept for inspection when the case fails
    Ok(())
}

/// A Recreate Deployment `name` at 0 replicas and its Reaper `name` on the lease
/// `<ns>.<name>` (ttl 3 s), made by an admin in `ns`.
async fn create_workload(ctx: &Ctx, ns: &str, name: &str) -> Result<()> {
    create_deployment(&ctx.client, ns, name, "Recreate", json!({})).await?;
    let lease = lease_spec(&format!("{ns}.{name}"), 3, 2, 1, 0);
    create_reaper(&ctx.client, ns, name, name, lease).await
}

/// Writes a kubeconfig with the admin kubeconfig's server and CA and `token` as the user.
fn write_token_kubeconfig(admin: &Path, token: &str, namespace: &str, path: &Path) -> Result<()> {
    let admin = Kubeconfig::read_from(admin)?;
    let cluster = admin
        .clusters
        .first()
        .and_then(|c| c.cluster.as_ref())
        .ok_or_else(|| anyhow!("no cluster in the admin kubeconfig"))?;
    let mut entry = json!({"server": cluster.server.clone().unwrap_or_default()});
    if let Some(ca) = &cluster.certificate_authority_data {
        entry["certificate-authority-data"] = json!(ca);
    } else if let Some(ca) = &cluster.certificate_authority {
        entry["certificate-authority"] = json!(ca);
    } else {
        bail!("the admin kubeconfig has no CA");
    }
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": entry}],
        "users": [{"name": "reaper-operator", "user": {"token": token}}],
        // As in a pod, where the default namespace is the service account's.
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "reaper-operator", "namespace": namespace}}],
        "current-context": "c",
    });
    std::fs::write(path, serde_json::to_string_pretty(&config)?)?; // JSON is YAML
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// The operator, with only the chart's RBAC, does its whole job.
async fn sufficient(ctx: &Ctx, ns: &str, op: &OperatorProcess) -> Result<()> {
    let client = &ctx.client;
    let deployments = Api::<Deployment>::namespaced(client.clone(), ns);
    let reapers = Api::<Reaper>::namespaced(client.clone(), ns);
    // Scaled through deployments/scale; kwok makes the pod Ready.
    wait_until("the workload to run 1 ready pod", WAIT, || async {
        let d = deployments.get("sweeper").await?;
        let want = d.spec.replicas == Some(1)
            && d.status.as_ref().and_then(|s| s.ready_replicas) == Some(1);
        Ok(want.then_some(()))
    })
    .await?;
    // Status through reapers/status; the finalizer through a patch of reapers.
    let reaper = wait_until("the Reaper to be Leading", WAIT, || async {
        let r = reapers.get("sweeper").await?;
        let s = r.status.clone().unwrap_or_default();
        Ok((s.phase == Some(Phase::Leading) && s.ready.as_deref() == Some("1/1")).then_some(r))
    })
    .await?;
    let status = reaper.status.clone().unwrap_or_default();
    ensure!(
        status.holder.as_deref() == Some(op.holder().as_str()),
        "holder {:?}, expected {}",
        status.holder,
        op.holder()
    );
    ensure!(
        reaper
            .finalizers()
            .iter()
            .any(|f| f == "pglease.dev/cleanup"),
        "finalizer not added: {:?}",
        reaper.finalizers()
    );
    // The presence through coordination.k8s.io leases in the release namespace.
    let presences = Api::<Lease>::namespaced(client.clone(), &ctx.namespace);
    wait_until(
        "the operator's presence Lease",
        Duration::from_secs(20),
        || async {
            let list = presences
                .list(&ListParams::default().labels("pglease.dev/presence"))
                .await?;
            Ok(list
                .items
                .iter()
                .any(|l| {
                    l.spec.as_ref().and_then(|s| s.holder_identity.as_deref())
                        == Some(op.holder().as_str())
                })
                .then_some(()))
        },
    )
    .await?;
    // Events through events.k8s.io, as NOTES.txt tells users to look at them.
    let events = Api::<Event>::namespaced(client.clone(), ns);
    wait_until("a LeaseAcquired Event", Duration::from_secs(20), || async {
        let list = events.list(&ListParams::default()).await?;
        Ok(list
            .items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("LeaseAcquired")
                    && e.reporting_controller.as_deref() == Some("reaper-operator")
            })
            .then_some(()))
    })
    .await?;
    let out = ctx
        .cluster
        .kubectl()?
        .args(["get", "events", "-n", ns, "--field-selector"])
        .arg("involvedObject.kind=Reaper")
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && text.contains("LeaseAcquired"),
        "the NOTES' events command does not show LeaseAcquired:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Deleting the Reaper: the operator scales the workload to 0 and removes its finalizer.
    reapers
        .delete("sweeper", &DeleteParams::default())
        .await
        .context("deleting the Reaper")?;
    wait_until("the Reaper's finalizer to finish", WAIT, || async {
        Ok(reapers.get_opt("sweeper").await?.is_none().then_some(()))
    })
    .await?;
    let d = deployments.get("sweeper").await?;
    ensure!(
        d.spec.replicas == Some(0),
        "the workload was not scaled to 0 when its Reaper was deleted"
    );
    Ok(())
}

/// The same token is refused what the operator does not need.
async fn minimal(ctx: &Ctx, sa: &Client, ns: &str) -> Result<()> {
    let deployments = Api::<Deployment>::namespaced(sa.clone(), ns);
    let mut refused: Vec<(&str, kube::Result<()>)> = vec![
        (
            "delete a Deployment",
            deployments
                .delete("sweeper", &DeleteParams::default())
                .await
                .map(|_| ()),
        ),
        (
            "patch a Deployment (not its scale)",
            deployments
                .patch(
                    "sweeper",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
                )
                .await
                .map(|_| ()),
        ),
        (
            "get a Deployment's scale",
            deployments.get_scale("sweeper").await.map(|_| ()),
        ),
        (
            "delete a Reaper",
            Api::<Reaper>::namespaced(sa.clone(), ns)
                .delete("sweeper", &DeleteParams::default())
                .await
                .map(|_| ()),
        ),
        (
            "list Secrets in the release namespace",
            Api::<Secret>::namespaced(sa.clone(), &ctx.namespace)
                .list(&ListParams::default())
                .await
                .map(|_| ()),
        ),
        (
            "get the database Secret",
            Api::<Secret>::namespaced(sa.clone(), &ctx.namespace)
                .get(SECRET)
                .await
                .map(|_| ()),
        ),
        (
            "list Secrets in all namespaces",
            Api::<Secret>::all(sa.clone())
                .list(&ListParams::default())
                .await
                .map(|_| ()),
        ),
    ];
    refused.push((
        "create a coordination.k8s.io Lease",
        Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(sa.clone(), ns)
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": "x"}}))?,
            )
            .await
            .map(|_| ()),
    ));
    let who = format!("system:serviceaccount:{}:{RELEASE}", ctx.namespace);
    let mut problems = Vec::new();
    for (what, result) in refused {
        match result {
            Err(kube::Error::Api(s)) if s.code == 403 && s.message.contains(&who) => {}
            Err(kube::Error::Api(s)) => problems.push(format!(
                "{what}: expected 403 for {who}, got {}: {}",
                s.code, s.message
            )),
            Err(e) => problems.push(format!("{what}: expected 403, got {e:#}")),
            Ok(()) => problems.push(format!("{what}: allowed, expected 403")),
        }
    }
    ensure!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 4. The PrometheusRule: docs/operations.md's alerts, on metrics the operator serves.

async fn prometheus_rule(ctx: &Ctx) -> Result<()> {
    let alerts = rule_alerts(&ctx.template(&["--set", "prometheusRule.enabled=true"])?)?;
    let documented = documented_alerts()?;
    ensure!(
        alerts == documented,
        "the chart's alerts are not docs/operations.md's:\nchart: {alerts:#?}\ndocs: {documented:#?}"
    );
    let metrics = takeover_metrics(ctx).await?;
    let served = served_series(&metrics);
    let mut unknown = Vec::new();
    for (alert, expr) in &alerts {
        let names = metric_names(expr);
        ensure!(
            !names.is_empty(),
            "{alert}: `{expr}` names no reaper_ metric"
        );
        unknown.extend(
            names
                .into_iter()
                .filter(|n| !served.contains(n))
                .map(|n| format!("{alert}: {n}")),
        );
    }
    ensure!(
        unknown.is_empty(),
        "alerts name series the operator does not serve:\n{}\nserved: {served:?}",
        unknown.join("\n")
    );
    Ok(())
}

/// /metrics of an operator that took over an expired lease and renewed it: the families
/// that appear only after such events (takeovers, the renew histogram) are in it.
async fn takeover_metrics(ctx: &Ctx) -> Result<String> {
    let ns = format!("chart-metrics-{}", ctx.suffix);
    ctx.create_namespace(&ns).await?;
    let lease = format!("{ns}.ghost");
    let store = LeaseStore::connect(&db::direct_url(), &ctx.schema, Duration::from_secs(10), 1)
        .await
        .context("connecting to the test database")?;
    store.migrate().await?;
    store
        .try_acquire(&lease, "elsewhere/op-0", Duration::from_secs(1))
        .await
        .ok_or_else(|| anyhow!("could not plant the expiring lease {lease}"))?;
    store.pool().close().await;

    create_workload(ctx, &ns, "ghost").await?;
    let reapers = Api::<Reaper>::namespaced(ctx.client.clone(), &ns);

    let op = OperatorProcess::start(OperatorSpec {
        kubeconfig: ctx.cluster.kubeconfig(),
        database_url: &db::direct_url(),
        listen_database_url: None,
        schema: ctx.schema.as_str(),
        cluster: CLUSTER_NAME,
        identity: "op-metrics",
        migrate: false,
        namespace: &ns,
    });
    let takeover = format!("reaper_lease_takeovers_total{{lease=\"{lease}\"}} 1");
    let scraped = wait_until("a takeover and a renew on /metrics", WAIT, || async {
        let Some((200, text)) = op.http("/metrics") else {
            return Ok(None);
        };
        let renewed = text.lines().any(|l| {
            l.starts_with("reaper_lease_renew_duration_seconds_count") && !l.ends_with(" 0")
        });
        Ok((text.contains(&takeover) && renewed).then_some(text))
    })
    .await
    .map_err(|e| anyhow!("{e:#}\n--- operator log:\n{}", op.log_tail()))?;
    // Hand the lease back (the finalizer) before the process goes.
    reapers.delete("ghost", &DeleteParams::default()).await?;
    wait_until("the ghost Reaper's finalizer to finish", WAIT, || async {
        Ok(reapers.get_opt("ghost").await?.is_none().then_some(()))
    })
    .await?;
    let _ = std::fs::remove_file(&op.log);
    Ok(scraped)
}

/// (alert, expr) of the YAML block under "## Alerts worth having" in docs/operations.md.
fn documented_alerts() -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(repo_root().join("docs/operations.md"))?;
    let section = text
        .split("## Alerts worth having")
        .nth(1)
        .ok_or_else(|| anyhow!("docs/operations.md has no \"Alerts worth having\""))?;
    let block = section
        .split("```yaml\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .ok_or_else(|| anyhow!("no yaml block under \"Alerts worth having\""))?;
    let rules: Vec<Value> = serde_norway::from_str(block)?;
    Ok(rules
        .iter()
        .map(|r| {
            (
                r["alert"].as_str().unwrap_or_default().to_owned(),
                r["expr"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect())
}

/// The series names an OpenMetrics exposition can hold, from its `# TYPE` lines (a
/// family without samples yet, e.g. a counter per lease before the first takeover, is
/// still listed): counters as `<name>_total`, histograms as `_bucket`, `_sum`, `_count`.
fn served_series(metrics: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in metrics.lines() {
        let mut words = line
            .strip_prefix("# TYPE ")
            .unwrap_or("")
            .split_whitespace();
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            continue;
        };
        match kind {
            "counter" => {
                names.insert(format!("{name}_total"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
            "info" => {
                names.insert(format!("{name}_info"));
            }
            _ => {
                names.insert(name.to_owned());
            }
        }
    }
    names
}

/// The `reaper_*` metric names in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.starts_with("reaper_"))
        .map(str::to_owned)
        .collect()
}

// ---------------------------------------------------------------------------------------
// 5. The aggregated roles, on the real RBAC authorizer.

const VIEWER: &str = "chart-viewer";
const EDITOR: &str = "chart-editor";
const NS_ADMIN: &str = "chart-admin";

/// The namespace of case 5's users and Reaper (case 7 checks it again).
fn users_namespace(ctx: &Ctx) -> String {
    format!("chart-users-{}", ctx.suffix)
}

/// An admin client that impersonates `user` (RBAC judges the user, not the admin).
async fn impersonating(ctx: &Ctx, user: &str) -> Result<Client> {
    let mut kubeconfig = Kubeconfig::read_from(ctx.cluster.kubeconfig())?;
    for named in &mut kubeconfig.auth_infos {
        if let Some(info) = named.auth_info.as_mut() {
            info.impersonate = Some(user.to_owned());
        }
    }
    support::cluster::client_from(kubeconfig).await
}

fn is_forbidden<T>(result: &kube::Result<T>) -> bool {
    matches!(result, Err(kube::Error::Api(s)) if s.code == 403)
}

async fn aggregated_roles(ctx: &Ctx) -> Result<()> {
    let ns = users_namespace(ctx);
    ctx.create_namespace(&ns).await?;
    let reaper = reaper_and_role_bindings(ctx, &ns).await?;

    let dry_post = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let dry_delete = DeleteParams {
        dry_run: true,
        ..Default::default()
    };
    let mut copy = reaper.clone();
    copy.metadata.name = Some("nightly-copy".into());
    let label = Patch::Merge(json!({"metadata": {"labels": {"checked-by": "chart-test"}}}));
    let status = Patch::Merge(json!({"status": {"holder": "someone/else"}}));

    // The aggregation controller (kube-controller-manager) copies the rules into view,
    // edit and admin asynchronously.
    let viewer = Api::<Reaper>::namespaced(impersonating(ctx, VIEWER).await?, &ns);
    wait_until("the view role to include Reapers", WAIT, || async {
        let r = viewer.get("nightly").await;
        if is_forbidden(&r) {
            return Ok(None);
        }
        r.map(Some).context("get as the viewer")
    })
    .await?;
    let mut problems = Vec::new();
    let mut expect = |what: &str, allowed: bool, forbidden: bool| match (allowed, forbidden) {
        (true, true) => problems.push(format!("{what}: refused (403), expected allowed")),
        (false, false) => problems.push(format!("{what}: allowed, expected 403")),
        _ => {}
    };
    let r = viewer.list(&ListParams::default()).await;
    expect("viewer lists Reapers", true, is_forbidden(&r));
    let r = viewer.get_status("nightly").await;
    expect("viewer reads a Reaper's status", true, is_forbidden(&r));
    let r = viewer.create(&dry_post, &copy).await;
    expect("viewer creates a Reaper", false, is_forbidden(&r));
    let r = viewer
        .patch("nightly", &PatchParams::default(), &label)
        .await;
    expect("viewer patches a Reaper", false, is_forbidden(&r));
    let r = viewer.delete("nightly", &dry_delete).await;
    expect("viewer deletes a Reaper", false, is_forbidden(&r));
    let r = viewer
        .patch_status("nightly", &PatchParams::default(), &status)
        .await;
    expect("viewer writes a Reaper's status", false, is_forbidden(&r));

    for user in [EDITOR, NS_ADMIN] {
        let api = Api::<Reaper>::namespaced(impersonating(ctx, user).await?, &ns);
        let what = format!("the {user} role to include writing Reapers");
        wait_until(&what, WAIT, || async {
            let r = api.create(&dry_post, &copy).await;
            if is_forbidden(&r) {
                return Ok(None);
            }
            r.map(Some).with_context(|| format!("create as {user}"))
        })
        .await?;
        let r = api.get("nightly").await;
        expect(&format!("{user} reads a Reaper"), true, is_forbidden(&r));
        let r = api.patch("nightly", &PatchParams::default(), &label).await;
        expect(&format!("{user} patches a Reaper"), true, is_forbidden(&r));
        let r = api
            .replace(
                "nightly",
                &PostParams {
                    dry_run: true,
                    ..Default::default()
                },
                &api.get("nightly").await?,
            )
            .await;
        expect(&format!("{user} updates a Reaper"), true, is_forbidden(&r));
        let r = api.delete("nightly", &dry_delete).await;
        expect(&format!("{user} deletes a Reaper"), true, is_forbidden(&r));
        let r = api
            .patch_status("nightly", &PatchParams::default(), &status)
            .await;
        expect(
            &format!("{user} writes a Reaper's status"),
            false,
            is_forbidden(&r),
        );
    }
    ensure!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(())
}

/// A Reaper made by an admin in `ns`, and each user bound to a built-in role there.
async fn reaper_and_role_bindings(ctx: &Ctx, ns: &str) -> Result<Reaper> {
    let reaper = Reaper::new(
        "nightly",
        ReaperSpec {
            deployment_name: "nightly".into(),
            paused: true,
            lease: LeaseSpec::default(),
        },
    );
    Api::<Reaper>::namespaced(ctx.client.clone(), ns)
        .create(&PostParams::default(), &reaper)
        .await
        .context("creating a Reaper as admin")?;
    // Each user gets a built-in role in this namespace only, as a namespace owner would.
    let bindings = Api::<RoleBinding>::namespaced(ctx.client.clone(), ns);
    for (user, role) in [(VIEWER, "view"), (EDITOR, "edit"), (NS_ADMIN, "admin")] {
        let binding: RoleBinding = serde_json::from_value(json!({
            "metadata": {"name": format!("{user}-{role}")},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
        }))?;
        bindings
            .create(&PostParams::default(), &binding)
            .await
            .with_context(|| format!("binding {role} to {user}"))?;
    }
    Ok(reaper)
}

// ---------------------------------------------------------------------------------------
// 6. helm upgrade with a changed CRD and every option on.

const NEW_COLUMN: &str =
    "    - jsonPath: .spec.deploymentName\n      name: Deployment\n      type: string\n";

async fn upgrade(ctx: &Ctx) -> Result<()> {
    let copy = chart_with_a_new_column(ctx)?;
    create_what_full_values_names(ctx).await?;

    let full_values = copy.join(FULL_VALUES);
    let mut args = vec!["upgrade", RELEASE, copy.to_str().unwrap()];
    args.extend(["-n", &ctx.namespace, "--wait", "--timeout", "120s"]);
    args.extend(["-f", full_values.to_str().unwrap()]);
    let values = ctx.release_values();
    args.extend(values.iter().map(String::as_str));
    // This cluster has neither the Prometheus Operator's CRDs nor a listen-url key.
    args.extend([
        "--set",
        "serviceMonitor.enabled=false,prometheusRule.enabled=false",
        "--set",
        "database.listenUrlKey=",
    ]);
    ctx.helm(&args)?.ok("helm upgrade")?;

    the_cluster_took_every_option(ctx).await?;

    let crd = Api::<CustomResourceDefinition>::all(ctx.client.clone())
        .get(CRD_NAME)
        .await?;
    let columns: Vec<String> = crd
        .spec
        .versions
        .iter()
        .flat_map(|v| v.additional_printer_columns.iter().flatten())
        .map(|c| format!("{}={}", c.name, c.json_path))
        .collect();
    ensure!(
        columns.first().map(String::as_str) == Some("Deployment=.spec.deploymentName"),
        "helm upgrade did not update the CRD: printer columns {columns:?}"
    );
    ensure!(
        kept_by_helm(&crd),
        "the upgraded CRD lost the keep annotation"
    );
    let history = ctx
        .helm(&["history", RELEASE, "-n", &ctx.namespace])?
        .ok("helm history")?;
    ensure!(
        history
            .lines()
            .any(|l| l.starts_with('2') && l.contains("deployed")),
        "helm history:\n{history}"
    );
    Ok(())
}

/// A copy of the chart whose CRD has a new printer column.
fn chart_with_a_new_column(ctx: &Ctx) -> Result<PathBuf> {
    let copy = ctx.home.join("chart-v2");
    copy_dir(&ctx.chart(), &copy)?;
    let crd_file = copy.join(CRD_FILE);
    let crd = std::fs::read_to_string(&crd_file)?;
    let anchor = "  - additionalPrinterColumns:\n";
    ensure!(crd.contains(anchor), "no printer columns in {CRD_FILE}");
    std::fs::write(
        &crd_file,
        crd.replacen(anchor, &format!("{anchor}{NEW_COLUMN}"), 1),
    )?;
    Ok(copy)
}

/// What ci/full-values.yaml refers to. The TLS files are never read: kwok's pods do
/// not run the image.
async fn create_what_full_values_names(ctx: &Ctx) -> Result<()> {
    let class: PriorityClass = serde_json::from_value(json!({
        "metadata": {"name": PRIORITY_CLASS},
        "value": 1_000_000,
        "description": "reaper-operator chart test",
    }))?;
    Api::<PriorityClass>::all(ctx.client.clone())
        .create(&PostParams::default(), &class)
        .await
        .context("creating the PriorityClass")?;
    let tls: Secret = serde_json::from_value(json!({
        "metadata": {"name": TLS_SECRET},
        "stringData": {"ca.crt": "not read", "tls.crt": "not read", "tls.key": "not read"},
    }))?;
    Api::<Secret>::namespaced(ctx.client.clone(), &ctx.namespace)
        .create(&PostParams::default(), &tls)
        .await
        .context("creating the TLS Secret")?;
    Ok(())
}

/// The API server took every option.
async fn the_cluster_took_every_option(ctx: &Ctx) -> Result<()> {
    let np = Api::<NetworkPolicy>::namespaced(ctx.client.clone(), &ctx.namespace)
        .get(RELEASE)
        .await
        .context("the NetworkPolicy")?;
    let egress_ports: Vec<String> = np
        .spec
        .and_then(|s| s.egress)
        .unwrap_or_default()
        .iter()
        .flat_map(|rule| rule.ports.clone().unwrap_or_default())
        .map(|p| {
            format!(
                "{}/{}",
                p.port
                    .map(|p| match p {
                        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i) =>
                            i.to_string(),
                        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s) => s,
                    })
                    .unwrap_or_default(),
                p.protocol.unwrap_or_default()
            )
        })
        .collect();
    ensure!(
        egress_ports
            == [
                "443/TCP", "6443/TCP", "5432/TCP", "6432/TCP", "53/UDP", "53/TCP"
            ],
        "NetworkPolicy egress ports in the cluster: {egress_ports:?}"
    );
    let d = Api::<Deployment>::namespaced(ctx.client.clone(), &ctx.namespace)
        .get(RELEASE)
        .await?;
    ensure!(
        d.status.as_ref().and_then(|s| s.ready_replicas) == Some(3),
        "helm --wait returned before 3 ready replicas: {:?}",
        d.status
    );
    let pod = d.spec.template.spec.ok_or_else(|| anyhow!("no pod spec"))?;
    let volume = pod
        .volumes
        .unwrap_or_default()
        .into_iter()
        .find(|v| v.name == "pg-tls")
        .and_then(|v| v.secret)
        .ok_or_else(|| anyhow!("no pg-tls Secret volume in the cluster's Deployment"))?;
    ensure!(
        volume.secret_name.as_deref() == Some(TLS_SECRET) && volume.default_mode == Some(0o440),
        "pg-tls volume: {volume:?}"
    );
    ensure!(
        pod.priority_class_name.as_deref() == Some(PRIORITY_CLASS),
        "priorityClassName: {:?}",
        pod.priority_class_name
    );
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 7. helm uninstall removes the release but keeps the CRD.

async fn uninstall(ctx: &Ctx) -> Result<()> {
    let out = ctx
        .helm(&["uninstall", RELEASE, "-n", &ctx.namespace, "--wait"])?
        .ok("helm uninstall")?;
    ensure!(
        out.contains("kept due to the resource policy") && out.contains(CRD_NAME),
        "helm uninstall did not report keeping the CRD:\n{out}"
    );
    Api::<CustomResourceDefinition>::all(ctx.client.clone())
        .get(CRD_NAME)
        .await
        .context("the CRD is gone after helm uninstall")?;
    ensure!(
        Api::<Deployment>::namespaced(ctx.client.clone(), &ctx.namespace)
            .get_opt(RELEASE)
            .await?
            .is_none(),
        "the operator Deployment outlived the release"
    );
    for role in [
        RELEASE.to_owned(),
        format!("{RELEASE}-view"),
        format!("{RELEASE}-edit"),
    ] {
        ensure!(
            Api::<ClusterRole>::all(ctx.client.clone())
                .get_opt(&role)
                .await?
                .is_none(),
            "the ClusterRole {role} outlived the release"
        );
    }
    // The aggregation controller takes the Reaper rules out of view again.
    let viewer =
        Api::<Reaper>::namespaced(impersonating(ctx, VIEWER).await?, &users_namespace(ctx));
    wait_until(
        "the view role to lose Reapers after uninstall",
        WAIT,
        || async { Ok(is_forbidden(&viewer.get("nightly").await).then_some(())) },
    )
    .await?;
    Ok(())
}
