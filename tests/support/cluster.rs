//! A real local Kubernetes control plane for integration tests (see docs/local-cluster.md).
//!
//! [`TestCluster::start`] either attaches to an existing cluster, when the environment
//! variable `REAPER_TEST_KUBECONFIG` names its kubeconfig, or runs
//! `tests/cluster/up.sh <unique name>` (etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler and kwok, built from their Go modules by `tests/cluster/build.sh`) and
//! stops it again with `tests/cluster/down.sh` when the `TestCluster` is dropped, also when
//! the test panics. A cluster that cannot be started is an error carrying up.sh's stderr:
//! the test fails, it never skips.
//!
//! Rust's test harness has no hook at process exit, and statics are never dropped, so a
//! cluster shared through a `static` would be leaked. Keep the `TestCluster` in a local of
//! one `#[test]`, or share it among the cases of a test binary with
//! [`super::trials::Suite`], which stops it after the last case, so that its `Drop` runs.
//!
//! Set `REAPER_KEEP_CLUSTER=1` to leave a started cluster running for inspection.
//!
//! Deleted Pods stay Terminating for their grace period (kwok's stages of up.sh, see
//! [`KwokStages`] and docs/local-cluster.md); [`TestCluster::start_new_with_stages`] starts a
//! cluster whose Pods vanish at once instead.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use kube::Client;
use kube::config::{Config, KubeConfigOptions, Kubeconfig};

/// The repository root (where Cargo.toml is).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The directory holding etcd, kube-apiserver, kubectl, kwok, helm, ... as built (or
/// reused from the cache) by `tests/cluster/build.sh`. Computed once per test binary.
pub fn bin_dir() -> Result<PathBuf> {
    static BIN: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        let script = repo_root().join("tests/cluster/build.sh");
        let out = run_streaming(Command::new("bash").arg(&script)).map_err(|e| format!("{e:#}"))?;
        if !out.status.success() {
            return Err(format!(
                "{} failed ({}):\n{}",
                script.display(),
                out.status,
                out.stderr
            ));
        }
        last_line(&out.stdout)
            .map(PathBuf::from)
            .ok_or_else(|| format!("{} printed nothing on stdout", script.display()))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// How kwok finishes Pod deletions in a cluster (`REAPER_KWOK_STAGES` of up.sh).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KwokStages {
    /// A deleted Pod stays Terminating (phase Running) until its `deletionTimestamp`, i.e.
    /// for its grace period, or for its `pod-delete.stage.kwok.x-k8s.io/delay` annotation
    /// (see [`POD_DELETE_DELAY`]). up.sh's default.
    Grace,
    /// kwok's fast stage: a deleted Pod vanishes at once.
    Fast,
}

/// Pod annotation (a Go duration, e.g. `"2s"`): how long a deleted Pod stays Terminating
/// instead of its grace period (kwok's own annotation convention).
pub const POD_DELETE_DELAY: &str = "pod-delete.stage.kwok.x-k8s.io/delay";
/// Pod annotation (a Go duration): with it, the Pod stays Terminating for a uniformly
/// random time between its delay (above, or its grace period) and this upper bound.
pub const POD_DELETE_JITTER_DELAY: &str = "pod-delete.stage.kwok.x-k8s.io/jitter-delay";

impl KwokStages {
    /// The value of `REAPER_KWOK_STAGES`.
    pub fn as_str(self) -> &'static str {
        match self {
            KwokStages::Grace => "grace",
            KwokStages::Fast => "fast",
        }
    }
}

/// A running control plane, started by this process or attached to.
pub struct TestCluster {
    /// Set when this process started the cluster (and so must stop it).
    name: Option<String>,
    kubeconfig: PathBuf,
}

impl TestCluster {
    /// Attaches to `$REAPER_TEST_KUBECONFIG` if set, otherwise starts a new cluster named
    /// `<prefix>-<pid>-<time>` with `tests/cluster/up.sh`. Blocks until it is ready.
    pub fn start(prefix: &str) -> Result<Self> {
        if let Some(path) = std::env::var_os("REAPER_TEST_KUBECONFIG").filter(|p| !p.is_empty()) {
            let kubeconfig = PathBuf::from(path);
            if !kubeconfig.is_file() {
                bail!(
                    "REAPER_TEST_KUBECONFIG={} is not a file",
                    kubeconfig.display()
                );
            }
            return Ok(Self {
                name: None,
                kubeconfig,
            });
        }
        Self::start_new(prefix)
    }

    /// Always starts a new cluster with `tests/cluster/up.sh` (ignores
    /// `REAPER_TEST_KUBECONFIG`), e.g. for a second cluster beside the first one.
    pub fn start_new(prefix: &str) -> Result<Self> {
        Self::start_new_inner(prefix, None)
    }

    /// Like [`TestCluster::start_new`], with the given kwok stages whatever
    /// `REAPER_KWOK_STAGES` says.
    pub fn start_new_with_stages(prefix: &str, stages: KwokStages) -> Result<Self> {
        Self::start_new_inner(prefix, Some(stages))
    }

    fn start_new_inner(prefix: &str, stages: Option<KwokStages>) -> Result<Self> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let name = format!("{prefix}-{}-{nanos:x}", std::process::id());
        let script = repo_root().join("tests/cluster/up.sh");
        let started = Instant::now();
        let mut cmd = Command::new("bash");
        cmd.arg(&script).arg(&name);
        if let Some(stages) = stages {
            cmd.env("REAPER_KWOK_STAGES", stages.as_str());
        }
        let out = run_streaming(&mut cmd)?;
        if !out.status.success() {
            bail!(
                "{} {name} failed ({}) after {:.1?}; its stderr:\n{}",
                script.display(),
                out.status,
                started.elapsed(),
                out.stderr
            );
        }
        let kubeconfig = last_line(&out.stdout)
            .map(PathBuf::from)
            .filter(|p| p.is_file())
            .ok_or_else(|| {
                anyhow!(
                    "{} {name} did not print a kubeconfig path as its last line; stdout:\n{}\nstderr:\n{}",
                    script.display(),
                    out.stdout,
                    out.stderr
                )
            })?;
        STARTED_AND_RUNNING.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(Self {
            name: Some(name),
            kubeconfig,
        })
    }

    /// The cluster's name when this process started it (`None` when attached).
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Path of an admin (system:masters) kubeconfig, for kubectl, helm or child processes.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The kwok stages the cluster runs with, from the `cluster.env` that up.sh writes
    /// beside the kubeconfig (`None` when there is none, e.g. a cluster not made by up.sh).
    pub fn kwok_stages(&self) -> Option<KwokStages> {
        let env = std::fs::read_to_string(self.kubeconfig.parent()?.join("cluster.env")).ok()?;
        match env.lines().find_map(|l| l.strip_prefix("KWOK_STAGES="))? {
            "grace" => Some(KwokStages::Grace),
            "fast" => Some(KwokStages::Fast),
            _ => None,
        }
    }

    /// An admin client.
    pub async fn client(&self) -> Result<Client> {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig)
            .with_context(|| format!("reading {}", self.kubeconfig.display()))?;
        client_from(kubeconfig).await
    }

    /// A client that authenticates with a bearer token (e.g. a ServiceAccount token from
    /// the TokenRequest API) instead of the admin certificate.
    pub async fn client_with_token(&self, token: &str) -> Result<Client> {
        let admin = Kubeconfig::read_from(&self.kubeconfig)?;
        let cluster = admin
            .clusters
            .first()
            .and_then(|c| c.cluster.as_ref())
            .ok_or_else(|| anyhow!("no cluster in {}", self.kubeconfig.display()))?;
        let server = cluster.server.clone().unwrap_or_default();
        let ca = cluster
            .certificate_authority_data
            .clone()
            .unwrap_or_default();
        let yaml = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "c", "cluster": {"server": server, "certificate-authority-data": ca}}],
            "users": [{"name": "u", "user": {"token": token}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "c",
        })
        .to_string(); // JSON is YAML
        client_from(Kubeconfig::from_yaml(&yaml)?).await
    }

    /// `kubectl --kubeconfig <admin>`, using the kubectl built with the pinned Kubernetes
    /// version (so client and server versions match).
    pub fn kubectl(&self) -> Result<Command> {
        let mut cmd = Command::new(bin_dir()?.join("kubectl"));
        cmd.arg("--kubeconfig").arg(&self.kubeconfig);
        Ok(cmd)
    }

    /// `helm` from the cache, with `KUBECONFIG` set and its cache/config/data directories
    /// under `state_dir` (so the user's helm setup does not leak in).
    pub fn helm(&self, state_dir: &Path) -> Result<Command> {
        let mut cmd = Command::new(bin_dir()?.join("helm"));
        cmd.env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", state_dir.join("cache"))
            .env("HELM_CONFIG_HOME", state_dir.join("config"))
            .env("HELM_DATA_HOME", state_dir.join("data"));
        Ok(cmd)
    }

    /// Stops the cluster now (if this process started it) and reports a failure of down.sh.
    pub fn stop(mut self) -> Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<()> {
        let Some(name) = self.name.take() else {
            return Ok(());
        };
        if std::env::var_os("REAPER_KEEP_CLUSTER").is_some_and(|v| v == "1") {
            eprintln!(
                "REAPER_KEEP_CLUSTER=1: leaving cluster {name} running; stop it with tests/cluster/down.sh {name}"
            );
            return Ok(());
        }
        let script = repo_root().join("tests/cluster/down.sh");
        let out = Command::new("bash")
            .arg(&script)
            .arg(&name)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", script.display()))?;
        if !out.status.success() {
            bail!(
                "{} {name} failed ({}): {}",
                script.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

/// Clusters this process started and has not stopped: while there are any, a test
/// that cannot go on must unwind (their `Drop` stops them), not exit.
static STARTED_AND_RUNNING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

pub fn started_and_running() -> usize {
    STARTED_AND_RUNNING.load(std::sync::atomic::Ordering::SeqCst)
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if self.name.is_some() {
            STARTED_AND_RUNNING.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
        if let Err(e) = self.stop_inner() {
            eprintln!("warning: could not stop the test cluster: {e:#}");
        }
    }
}

/// A client for an in-memory kubeconfig.
pub async fn client_from(kubeconfig: Kubeconfig) -> Result<Client> {
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

/// A token of the ServiceAccount `namespace/name` (TokenRequest API), valid for
/// `expiration_seconds`.
pub async fn service_account_token(
    client: &Client,
    namespace: &str,
    name: &str,
    expiration_seconds: i64,
) -> Result<String> {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    use k8s_openapi::api::core::v1::ServiceAccount;
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(expiration_seconds),
            ..TokenRequestSpec::default()
        }),
        ..TokenRequest::default()
    };
    kube::Api::<ServiceAccount>::namespaced(client.clone(), namespace)
        .create_token_request(name, &Default::default(), &request)
        .await
        .with_context(|| format!("TokenRequest for the ServiceAccount {namespace}/{name}"))?
        .status
        .and_then(|s| s.token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| anyhow!("TokenRequest returned no token"))
}

/// Server-side applies the committed `crds/reaper.yaml` and waits until it is served.
pub async fn install_reaper_crd(client: &Client) -> Result<()> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::ResourceExt;
    use kube::api::{Patch, PatchParams};
    let yaml = std::fs::read_to_string(repo_root().join("crds/reaper.yaml"))?;
    let crd: CustomResourceDefinition = serde_norway::from_str(&yaml)?;
    let crds: kube::Api<CustomResourceDefinition> = kube::Api::all(client.clone());
    crds.patch(
        &crd.name_any(),
        &PatchParams::apply("reaper-tests").force(),
        &Patch::Apply(&crd),
    )
    .await
    .context("the apiserver refused crds/reaper.yaml")?;
    wait_crd_established(client, &crd.name_any()).await
}

/// Waits (30 s at most) until the CRD `name` reports `Established=True`.
pub async fn wait_crd_established(client: &Client, name: &str) -> Result<()> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let crds: kube::Api<CustomResourceDefinition> = kube::Api::all(client.clone());
    wait_condition(
        &crds,
        name,
        "Established",
        &format!("CRD {name} to be Established"),
        Duration::from_secs(30),
    )
    .await
}

/// Waits (`timeout` at most; `what` names the wait in its error) until the object `name`
/// of `api` has the condition `type_` True (see [`condition_true`]).
pub async fn wait_condition<K>(
    api: &kube::Api<K>,
    name: &str,
    type_: &str,
    what: &str,
    timeout: Duration,
) -> Result<()>
where
    K: Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    wait_until(what, timeout, || async {
        let object = api.get(name).await?;
        Ok(condition_true(&object, type_).then_some(()))
    })
    .await
}

/// Whether `object` (a Node, a CRD, a Pod, ...) has the condition `type_` with status
/// "True" in its `status.conditions`. Read from its JSON: each kind has a condition type
/// of its own, but they all serialize alike.
pub fn condition_true(object: &impl serde::Serialize, type_: &str) -> bool {
    serde_json::to_value(object).is_ok_and(|v| {
        v.pointer("/status/conditions")
            .and_then(serde_json::Value::as_array)
            .is_some_and(|conditions| {
                conditions
                    .iter()
                    .any(|c| c["type"] == type_ && c["status"] == "True")
            })
    })
}

/// Polls `check` every 250 ms until it returns `Ok(Some(v))`; fails after `timeout` with
/// the last error or `what`.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => None,
            Err(e) => Some(e),
        };
        if Instant::now() >= deadline {
            return Err(match last {
                Some(e) => e.context(format!("timed out after {timeout:?} waiting for {what}")),
                None => anyhow!("timed out after {timeout:?} waiting for {what}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Output of a finished script: stdout, and stderr (which was also echoed live).
struct ScriptOutput {
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `cmd`, echoing its stderr live to this process's stderr (a cold build takes a long
/// time, so progress should be visible) while also collecting it for error messages.
fn run_streaming(cmd: &mut Command) -> Result<ScriptOutput> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let stderr = child.stderr.take().expect("piped stderr");
    let echo = std::thread::spawn(move || {
        let mut collected = String::new();
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = writeln!(std::io::stderr().lock(), "{line}");
            collected.push_str(&line);
            collected.push('\n');
        }
        collected
    });
    let mut stdout = String::new();
    if let Some(mut out) = child.stdout.take() {
        std::io::Read::read_to_string(&mut out, &mut stdout)?;
    }
    let status = child.wait()?;
    let stderr = echo.join().unwrap_or_default();
    Ok(ScriptOutput {
        status,
        stdout,
        stderr,
    })
}

fn last_line(s: &str) -> Option<String> {
    s.lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_owned)
}
