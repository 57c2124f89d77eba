//! A real node (kubelet, containerd, runc; tests/cluster/node.sh) joined to a local control
//! plane: hardened pods run and reach the apiserver and the host, a process that ignores
//! SIGTERM keeps its pod Terminating for the grace period, and teardown leaves the host
//! as it was (docs/local-cluster.md, "A real node").
//!
//! The cases share one control plane and node (support::trials), made by the first case
//! that runs; the last case takes the node down.
//!
//! Runs when `REAPER_REAL_NODE=1` or `CI=true`, and then needs root (its cases fail, with
//! the reason, when not root). Otherwise it prints why it did nothing and reports its cases
//! as ignored (`-- --ignored` runs them all the same): one real node per machine means
//! that two checkouts testing at once would take turns (node.sh waits up to
//! `REAPER_NODE_WAIT`, 600 s here), so it is opt-in outside CI.

mod support;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use support::id;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, LogParams, PostParams};
use reaper_operator::reaper::{Phase, Reaper};
use serde_json::json;
use support::cluster::{TestCluster, condition_true, repo_root, wait_until};
use support::trials::Suite;

const NODE_NAME: &str = "reaper-real-node";
const NAMESPACE: &str = "default";
/// What kubelet's setupKernelTunables changes on the host.
const SYSCTLS: [&str; 6] = [
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
];
/// Fixed host paths containerd, CNI and kubelet create whatever they are told.
const FIXED_PATHS: [&str; 7] = [
    "/run/containerd",
    "/var/lib/kubelet",
    "/var/log/containers",
    "/var/log/pods",
    "/var/lib/cni",
    "/opt/containerd",
    "/var/lib/containerd",
];

fn enabled() -> bool {
    std::env::var("REAPER_REAL_NODE").is_ok_and(|v| v == "1")
        || std::env::var("CI").is_ok_and(|v| v == "true")
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|v| v.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// The node started by `node.sh up`, removed by `node.sh down` on drop.
struct RealNode {
    cluster: String,
    env: BTreeMap<String, String>,
    up: AtomicBool,
}

impl RealNode {
    fn up(cluster: &str) -> Result<Self> {
        let script = repo_root().join("tests/cluster/node.sh");
        let out = Command::new("bash")
            .arg(&script)
            .args(["up", cluster])
            .env("REAPER_NODE_WAIT", "600")
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("running {}", script.display()))?;
        ensure!(
            out.status.success(),
            "{} up {cluster} failed ({}); its stderr is above",
            script.display(),
            out.status
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let env_file = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
        let text = std::fs::read_to_string(&env_file)
            .with_context(|| format!("reading {}", env_file.display()))?;
        let env = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Ok(Self {
            cluster: cluster.to_string(),
            env,
            up: AtomicBool::new(true),
        })
    }

    fn var(&self, key: &str) -> Result<&str> {
        self.env
            .get(key)
            .map(String::as_str)
            .with_context(|| format!("node.env has no {key}"))
    }

    /// `node.sh forward PORT`: host loopback PORT reachable from the node at HOST_IP:PORT.
    fn forward(&self, port: u16) -> Result<String> {
        let out = Command::new("bash")
            .arg(repo_root().join("tests/cluster/node.sh"))
            .args(["forward", &port.to_string()])
            .stdin(Stdio::null())
            .output()?;
        ensure!(
            out.status.success(),
            "node.sh forward {port} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// `node.sh import ARCHIVE`: an image into the node's containerd.
    fn import(&self, archive: &Path) -> Result<()> {
        let out = Command::new("bash")
            .arg(repo_root().join("tests/cluster/node.sh"))
            .arg("import")
            .arg(archive)
            .stdin(Stdio::null())
            .output()?;
        ensure!(
            out.status.success(),
            "node.sh import {} failed: {}",
            archive.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// `node.sh down`, once.
    fn down(&self) -> Result<()> {
        if !self.up.swap(false, Ordering::SeqCst) {
            return Ok(());
        }
        let out = Command::new("bash")
            .arg(repo_root().join("tests/cluster/node.sh"))
            .args(["down", &self.cluster])
            .stdin(Stdio::null())
            .output()?;
        ensure!(
            out.status.success(),
            "node.sh down failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        if let Err(e) = self.down() {
            eprintln!("warning: {e:#}");
        }
    }
}

/// Host state a node may change, to compare before up and after down. Only what is the
/// node's own is compared (links and iptables rules of other software on a shared machine
/// may change meanwhile).
#[derive(Debug, PartialEq)]
struct HostState {
    sysctls: Vec<(String, String)>,
    existing_paths: Vec<String>,
    kubepods_cgroups: Vec<String>,
    node_mounts: Vec<String>,
    netns: bool,
    links: Vec<String>,
    iptables: String,
    node_processes: Vec<String>,
}

fn host_state() -> Result<HostState> {
    let sysctls = SYSCTLS
        .iter()
        .map(|k| {
            let v = std::fs::read_to_string(Path::new("/proc/sys").join(k))
                .with_context(|| format!("reading /proc/sys/{k}"))?;
            Ok((k.to_string(), v.trim().to_string()))
        })
        .collect::<Result<_>>()?;
    let existing_paths = FIXED_PATHS
        .iter()
        .filter(|p| Path::new(p).exists())
        .map(|p| p.to_string())
        .collect();
    let mut kubepods_cgroups = Vec::new();
    for entry in std::fs::read_dir("/sys/fs/cgroup")? {
        let dir = entry?.path().join("kubepods");
        if dir.exists() {
            kubepods_cgroups.push(dir.display().to_string());
        }
    }
    let node_mounts = std::fs::read_to_string("/proc/self/mountinfo")?
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.contains("/.real-node"))
        .map(str::to_string)
        .collect();
    let links = run_text(Command::new("ip").args(["-o", "link", "show"]))?
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n.starts_with("rn-"))
        .collect();
    // Chains and rules kubelet or CNI would make, were they in the host's namespace.
    let iptables = run_text(&mut Command::new("iptables-save"))?
        .lines()
        .filter(|l| {
            ["KUBE-", "CNI-", "10.213.", "10.214.", "rn-"]
                .iter()
                .any(|m| l.contains(m))
        })
        .collect::<Vec<_>>()
        .join("\n");
    let mut node_processes = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        if !entry
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains("/.real-node/") || cmdline.contains("bind=10.213.0.1") {
                node_processes.push(cmdline);
            }
        }
    }
    Ok(HostState {
        sysctls,
        existing_paths,
        kubepods_cgroups,
        node_mounts,
        netns: Path::new("/run/netns/reaper-node").exists(),
        links,
        iptables,
        node_processes,
    })
}

fn run_text(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(out.status.success(), "{cmd:?} failed: {}", out.status);
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn main() -> ExitCode {
    let enabled = enabled();
    if !enabled {
        eprintln!(
            "real_node: not run (set REAPER_REAL_NODE=1, as root, to run it; CI=true runs it)"
        );
    }
    let suite = Suite::new(set_up);
    let trials = vec![
        suite.case("node_ready", async |s: &Shared| {
            node_ready(&s.client, &s.node).await
        }),
        suite.case(
            "hardened_pod_runs_and_reaches_apiserver_and_host",
            async |s: &Shared| hardened_pod(&s.client, &s.node).await,
        ),
        suite.case(
            "sigterm_ignored_keeps_pod_terminating_for_grace_period",
            async |s: &Shared| grace_period(&s.client).await,
        ),
        suite.case(
            "chart_operator_pods_on_real_node_lead_a_slow_workload",
            async |s: &Shared| match image_archive()? {
                Some(archive) => chart_on_real_node(&s.cluster, &s.client, &s.node, &archive).await,
                None => Ok(()),
            },
        ),
        suite.case("teardown_restores_host", teardown_restores_host),
    ];
    let trials = trials
        .into_iter()
        .map(|trial| trial.with_ignored_flag(!enabled))
        .collect();
    suite.run(trials, async |s: Shared| {
        let Shared { node, cluster, .. } = s;
        drop(node);
        cluster.stop().context("tests/cluster/down.sh")
    })
}

/// The host as it was before, and the node joined to its control plane. The node goes
/// (on drop) before the control plane.
struct Shared {
    before: HostState,
    client: Client,
    node: RealNode,
    cluster: TestCluster,
}

async fn set_up() -> Result<Shared> {
    ensure!(
        is_root(),
        "a real node needs root (network namespace, mounts, cgroups); run as root or unset REAPER_REAL_NODE/CI"
    );
    let before = host_state().context("host state before the node")?;
    let cluster =
        TestCluster::start_new("realnode").context("could not start the local control plane")?;
    let name = cluster.name().context("started by this test")?.to_string();
    let started = Instant::now();
    let node = RealNode::up(&name)?;
    eprintln!("real node up in {:.1?}", started.elapsed());
    Ok(Shared {
        before,
        client: cluster.client().await.context("admin client")?,
        node,
        cluster,
    })
}

/// After `node.sh down`, the host is as it was before `node.sh up`.
async fn teardown_restores_host(s: &Shared) -> Result<()> {
    let started = Instant::now();
    let down = s.node.down();
    eprintln!("real node down in {:.1?}", started.elapsed());
    down?;
    let after = host_state()?;
    ensure!(
        after == s.before,
        "host state differs after node.sh down:\nbefore {:#?}\nafter {after:#?}",
        s.before
    );
    Ok(())
}

async fn node_ready(client: &Client, node: &RealNode) -> Result<()> {
    let n = Api::<Node>::all(client.clone()).get(NODE_NAME).await?;
    let ready = condition_true(&n, "Ready");
    let status = n.status.context("Node has no status")?;
    ensure!(ready, "Node {NODE_NAME} is not Ready");
    let info = status.node_info.context("Node has no nodeInfo")?;
    ensure!(
        info.kubelet_version == "v1.37.2",
        "kubelet reports {}, not the pinned v1.37.2",
        info.kubelet_version
    );
    ensure!(
        info.container_runtime_version.starts_with("containerd://"),
        "runtime {}",
        info.container_runtime_version
    );
    let ip = status
        .addresses
        .unwrap_or_default()
        .into_iter()
        .find(|a| a.type_ == "InternalIP")
        .map(|a| a.address)
        .context("Node has no InternalIP")?;
    ensure!(ip == node.var("NODE_IP")?, "InternalIP {ip}");
    Ok(())
}

/// A pod as locked down as a production one: non-root UID, read-only root, no
/// capabilities, no privilege escalation, the runtime's default seccomp profile.
fn pod_spec(name: &str, host_network: bool, grace: i64, args: &[&str]) -> Result<Pod> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "nodeName": NODE_NAME,
            "hostNetwork": host_network,
            "terminationGracePeriodSeconds": grace,
            "securityContext": {
                "runAsNonRoot": true,
                "runAsUser": 65532,
                "runAsGroup": 65532,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [{
                "name": "main",
                "image": "localhost/reaper-node-test:1",
                "imagePullPolicy": "Never",
                "args": args,
                "securityContext": {
                    "allowPrivilegeEscalation": false,
                    "readOnlyRootFilesystem": true,
                    "capabilities": {"drop": ["ALL"]},
                },
            }],
        },
    }))?)
}

async fn wait_ready(pods: &Api<Pod>, name: &str) -> Result<Duration> {
    let started = Instant::now();
    wait_until(
        &format!("pod {name} to be Ready"),
        Duration::from_secs(60),
        || async {
            let pod = pods.get(name).await?;
            let ready = pod_ready(&pod);
            let status = pod.status.unwrap_or_default();
            if let Some(waiting) = status
                .container_statuses
                .unwrap_or_default()
                .into_iter()
                .find_map(|c| c.state.and_then(|s| s.waiting))
                && matches!(
                    waiting.reason.as_deref(),
                    Some("ErrImageNeverPull" | "CreateContainerConfigError" | "CrashLoopBackOff")
                )
            {
                bail!("pod {name} cannot start: {waiting:?}");
            }
            Ok(ready.then_some(()))
        },
    )
    .await?;
    Ok(started.elapsed())
}

/// Deletes the pod and returns how long it stayed (Terminating) until it was gone.
async fn delete_and_time(pods: &Api<Pod>, name: &str) -> Result<Duration> {
    let started = Instant::now();
    pods.delete(name, &DeleteParams::default()).await?;
    wait_until(
        &format!("pod {name} to be gone"),
        Duration::from_secs(90),
        || async {
            Ok(match pods.get_opt(name).await? {
                None => Some(()),
                Some(_) => None,
            })
        },
    )
    .await?;
    Ok(started.elapsed())
}

async fn hardened_pod(client: &Client, node: &RealNode) -> Result<()> {
    // A listener on the host's loopback, reached from the pods through node.sh forward,
    // the way a test PostgreSQL is.
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let host_addr = node.forward(listener.local_addr()?.port())?;
    ensure!(
        host_addr.starts_with(node.var("HOST_IP")?),
        "node.sh forward printed {host_addr}"
    );
    let pods = Api::<Pod>::namespaced(client.clone(), NAMESPACE);
    let args = ["-report", "-apiserver", "-dial", host_addr.as_str()];
    for (name, host_network) in [("hardened-bridge", false), ("hardened-host", true)] {
        pods.create(
            &PostParams::default(),
            &pod_spec(name, host_network, 2, &args)?,
        )
        .await?;
        let ready = wait_ready(&pods, name).await?;
        eprintln!("pod {name} (hostNetwork {host_network}) Ready in {ready:.1?}");
        let expected = [
            "uid=65532 gid=65532 CapEff=0000000000000000 NoNewPrivs=1 Seccomp=2 rootfs=read-only"
                .to_string(),
            format!("apiserver: 201 system:serviceaccount:{NAMESPACE}:default"),
            format!("dial {host_addr}: ok"),
        ];
        // The lines come from the kubelet (apiserver -> kubelet at the node's InternalIP).
        let logs = wait_until(
            &format!("the log lines of pod {name}"),
            Duration::from_secs(30),
            || async {
                let logs = pods.logs(name, &LogParams::default()).await?;
                Ok((logs.lines().count() >= expected.len()).then_some(logs))
            },
        )
        .await?;
        for line in &expected {
            ensure!(
                logs.lines().any(|l| l == line),
                "pod {name}: no line {line:?} in its log:\n{logs}"
            );
        }
        let ip = pods
            .get(name)
            .await?
            .status
            .and_then(|s| s.pod_ip)
            .unwrap_or_default();
        if host_network {
            ensure!(ip == node.var("NODE_IP")?, "hostNetwork pod IP {ip}");
        } else {
            ensure!(ip.starts_with("10.214.0."), "bridge pod IP {ip}");
        }
        delete_and_time(&pods, name).await?;
    }
    Ok(())
}

async fn grace_period(client: &Client) -> Result<()> {
    const GRACE: i64 = 10;
    let pods = Api::<Pod>::namespaced(client.clone(), NAMESPACE);
    // Control: the same pod honouring SIGTERM goes at once, so the wait below comes from
    // the ignored signal and not from a fixed delay somewhere.
    pods.create(
        &PostParams::default(),
        &pod_spec("stops-on-term", false, GRACE, &[])?,
    )
    .await?;
    wait_ready(&pods, "stops-on-term").await?;
    let quick = delete_and_time(&pods, "stops-on-term").await?;
    eprintln!("pod honouring SIGTERM gone in {quick:.1?} (grace period {GRACE} s)");
    ensure!(
        quick < Duration::from_secs(GRACE as u64 - 3),
        "a pod that exits on SIGTERM took {quick:?} to go"
    );

    pods.create(
        &PostParams::default(),
        &pod_spec("ignores-term", false, GRACE, &["-ignore-term"])?,
    )
    .await?;
    wait_ready(&pods, "ignores-term").await?;
    let slow = delete_and_time(&pods, "ignores-term").await?;
    eprintln!("pod ignoring SIGTERM gone in {slow:.1?} (grace period {GRACE} s)");
    ensure!(
        slow >= Duration::from_secs(GRACE as u64),
        "a pod ignoring SIGTERM went after {slow:?}, before its {GRACE} s grace period"
    );
    ensure!(
        slow < Duration::from_secs(GRACE as u64 + 10),
        "a pod ignoring SIGTERM took {slow:?}, far beyond its {GRACE} s grace period"
    );
    Ok(())
}

/// The operator's image (tests/image/build.sh, saved by scripts/test.sh), or why not.
fn image_archive() -> Result<Option<PathBuf>> {
    match std::env::var_os("REAPER_TEST_IMAGE_ARCHIVE") {
        Some(path) => Ok(Some(PathBuf::from(path))),
        None if std::env::var("CI").is_ok_and(|v| v == "true") => bail!(
            "REAPER_TEST_IMAGE_ARCHIVE is not set: scripts/test.sh builds the image and saves it \
             before the tests when it runs as root"
        ),
        None => {
            eprintln!(
                "chart on the real node: not run (REAPER_TEST_IMAGE_ARCHIVE unset; `make test` as root sets it)"
            );
            Ok(None)
        }
    }
}

const OPS: &str = "reaper-system";
const WORK: &str = "reaper-work";
const WORKLOAD_GRACE: i64 = 8;

/// The chart with the real image on the real node, under the `restricted` Pod Security
/// Standard: the database is down at install (pods run, unready, never restart), comes up
/// (the same pods become Ready through their probes and lead), the Reaper's slow workload
/// (ignores SIGTERM) runs, `helm upgrade` hands over without two workload pods at once,
/// deleting the Reaper waits for the pod's whole grace period before releasing the lease,
/// and `helm uninstall` removes the operator.
async fn chart_on_real_node(
    cluster: &TestCluster,
    client: &Client,
    node: &RealNode,
    archive: &Path,
) -> Result<()> {
    node.import(archive)?;
    let home = std::env::temp_dir().join(format!("real-node-helm-{}", std::process::id()));
    std::fs::create_dir_all(&home)?;
    restricted_namespaces(client).await?;
    let (db_port, schema) = database_secret(client, node).await?;
    let release = Release::install(cluster, client, node, home, schema)?;
    release.database_down().await?;
    release.database_up(db_port).await?;
    let first = release.slow_reaper().await?;
    release.upgrade_hands_over(&first).await?;
    release.delete_reaper().await?;
    release.uninstall().await?;
    let _ = std::fs::remove_dir_all(&release.home);
    Ok(())
}

/// The namespaces of the operator and of the workload, enforcing the `restricted` Pod
/// Security Standard.
async fn restricted_namespaces(client: &Client) -> Result<()> {
    let namespaces = Api::<Namespace>::all(client.clone());
    for name in [OPS, WORK] {
        let ns: Namespace = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/enforce-version": "latest",
            }},
        }))?;
        namespaces.create(&PostParams::default(), &ns).await?;
    }
    // The namespace really enforces: a pod that may escalate is refused.
    let mut loose = pod_spec("loose", false, 1, &[])?;
    loose.metadata.namespace = Some(OPS.into());
    loose.spec.as_mut().unwrap().containers[0]
        .security_context
        .as_mut()
        .unwrap()
        .allow_privilege_escalation = Some(true);
    let refused = Api::<Pod>::namespaced(client.clone(), OPS)
        .create(&PostParams::default(), &loose)
        .await;
    ensure!(
        matches!(&refused, Err(kube::Error::Api(e)) if e.message.contains("restricted")),
        "a pod allowing privilege escalation was not refused under restricted: {refused:?}"
    );
    Ok(())
}

/// The database Secret of the release: the URL as the pods will see it, before anything
/// forwards that port. Returns the port to forward and the lease schema.
async fn database_secret(client: &Client, node: &RealNode) -> Result<(u16, String)> {
    let db_url = url::Url::parse(&support::db::direct_url())?;
    let db_port = db_url.port().context("test database URL has no port")?;
    let mut pod_url = db_url.clone();
    pod_url
        .set_host(Some(node.var("HOST_IP")?))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let schema = format!("realnode_{}", std::process::id());
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "reaper-db", "namespace": OPS},
        "stringData": {"url": pod_url.as_str()},
    }))?;
    Api::<Secret>::namespaced(client.clone(), OPS)
        .create(&PostParams::default(), &secret)
        .await?;
    Ok((db_port, schema))
}

/// The chart's release on the real node, and what its steps look at.
struct Release<'a> {
    cluster: &'a TestCluster,
    node: &'a RealNode,
    /// HELM_CACHE_HOME & co.
    home: PathBuf,
    chart: String,
    /// The `--set` values of the install and of the upgrade.
    values: Vec<String>,
    schema: String,
    /// The operator's pods.
    pods: Api<Pod>,
    operator_pods: ListParams,
    /// The workload's pods.
    work_pods: Api<Pod>,
    workload_pods: ListParams,
    reapers: Api<Reaper>,
    deployments: Api<Deployment>,
}

impl<'a> Release<'a> {
    fn install(
        cluster: &'a TestCluster,
        client: &Client,
        node: &'a RealNode,
        home: PathBuf,
        schema: String,
    ) -> Result<Self> {
        let chart = repo_root().join("charts/reaper-operator");
        let chart = chart.to_str().context("chart path")?.to_owned();
        let image_ref = "localhost/reaper-operator:test";
        let (repository, tag) = image_ref.rsplit_once(':').context("image ref")?;
        let values = vec![
            "clusterName=east".to_string(),
            "database.existingSecret=reaper-db".into(),
            format!("database.schema={schema}"),
            format!("image.repository={repository}"),
            format!("image.tag={tag}"),
            "image.pullPolicy=Never".into(),
            format!("nodeSelector.kubernetes\\.io/hostname={NODE_NAME}"),
            "shutdownTimeoutSeconds=30".into(),
        ];
        let release = Self {
            cluster,
            node,
            home,
            chart,
            values,
            schema,
            pods: Api::<Pod>::namespaced(client.clone(), OPS),
            operator_pods: ListParams::default().labels("app.kubernetes.io/name=reaper-operator"),
            work_pods: Api::<Pod>::namespaced(client.clone(), WORK),
            workload_pods: ListParams::default().labels("app=slow-reaper"),
            reapers: Api::<Reaper>::namespaced(client.clone(), WORK),
            deployments: Api::<Deployment>::namespaced(client.clone(), WORK),
        };
        let mut install = vec!["install", "reaper", release.chart.as_str(), "-n", OPS];
        for v in &release.values {
            install.extend(["--set", v.as_str()]);
        }
        release.helm(&install)?;
        Ok(release)
    }

    fn helm(&self, args: &[&str]) -> Result<String> {
        let out = self.cluster.helm(&self.home)?.args(args).output()?;
        ensure!(
            out.status.success(),
            "helm {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// 1. Database down at start: the pods run and stay unready, never restarting.
    async fn database_down(&self) -> Result<()> {
        let (pods, operator_pods) = (&self.pods, &self.operator_pods);
        wait_until(
            "both operator pods to be Running",
            Duration::from_secs(90),
            || async {
                let list = pods.list(operator_pods).await?;
                for pod in &list.items {
                    if let Some(w) = pod
                        .status
                        .as_ref()
                        .and_then(|s| s.container_statuses.as_ref())
                        .and_then(|c| c.first())
                        .and_then(|c| c.state.as_ref())
                        .and_then(|s| s.waiting.as_ref())
                        && w.reason.as_deref() != Some("ContainerCreating")
                    {
                        bail!("operator pod cannot start: {w:?}");
                    }
                }
                let running = list
                    .items
                    .iter()
                    .filter(|p| {
                        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                    })
                    .count();
                Ok((running == 2).then_some(()))
            },
        )
        .await?;
        tokio::time::sleep(Duration::from_secs(25)).await;
        let list = pods.list(operator_pods).await?;
        for pod in &list.items {
            let status = pod.status.clone().unwrap_or_default();
            let name = pod.metadata.name.clone().unwrap_or_default();
            let container = status
                .container_statuses
                .clone()
                .unwrap_or_default()
                .into_iter()
                .next()
                .context("no container status")?;
            ensure!(
                container.restart_count == 0 && !container.ready,
                "with the database down, pod {name} should run unready without restarts: {container:?}"
            );
            ensure!(
                status.phase.as_deref() == Some("Running"),
                "pod {name}: {:?}",
                status.phase
            );
            let spec = pod.spec.clone().unwrap_or_default();
            let env = spec.containers[0].env.clone().unwrap_or_default();
            ensure!(
                !env.iter().any(|e| e.name == "KUBECONFIG"),
                "pod {name} has a KUBECONFIG: it must use its service account"
            );
        }
        eprintln!("database down: both operator pods Running, unready, 0 restarts for 25 s");
        Ok(())
    }

    /// 2. The database comes up: the same pods become Ready through their probes.
    async fn database_up(&self, db_port: u16) -> Result<()> {
        let (pods, operator_pods) = (&self.pods, &self.operator_pods);
        self.node.forward(db_port)?;
        let started = Instant::now();
        wait_until(
            "the operator pods to become Ready once the database is up",
            Duration::from_secs(90),
            || async {
                let list = pods.list(operator_pods).await?;
                let ready = list
                    .items
                    .iter()
                    .filter(|p| {
                        p.status
                            .as_ref()
                            .and_then(|s| s.container_statuses.as_ref())
                            .and_then(|c| c.first())
                            .is_some_and(|c| c.ready && c.restart_count == 0)
                    })
                    .count();
                Ok((ready == 2).then_some(()))
            },
        )
        .await?;
        eprintln!(
            "database up: both operator pods Ready in {:.1?}, no restart",
            started.elapsed()
        );
        Ok(())
    }

    /// 3. A Reaper with a slow workload of our own image. Returns the workload's pod.
    async fn slow_reaper(&self) -> Result<Pod> {
        let mut template = pod_spec("unused", false, WORKLOAD_GRACE, &["-ignore-term"])?
            .spec
            .context("pod spec")?;
        template.node_name = None;
        template.node_selector =
            Some([("kubernetes.io/hostname".to_string(), NODE_NAME.to_string())].into());
        let workload: Deployment = serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "slow-reaper", "namespace": WORK},
            "spec": {
                "replicas": 0,
                "strategy": {"type": "Recreate"},
                "selector": {"matchLabels": {"app": "slow-reaper"}},
                "template": {
                    "metadata": {"labels": {"app": "slow-reaper"}},
                    "spec": template,
                },
            },
        }))?;

        self.deployments
            .create(&PostParams::default(), &workload)
            .await?;
        let reaper: Reaper = serde_json::from_value(json!({
            "apiVersion": "pglease.dev/v1alpha1", "kind": "Reaper",
            "metadata": {"name": "slow-reaper", "namespace": WORK},
            "spec": {
                "deploymentName": "slow-reaper",
                "lease": {"ttlSeconds": 15, "renewDeadlineSeconds": 10, "retryPeriodSeconds": 2},
            },
        }))?;
        self.reapers.create(&PostParams::default(), &reaper).await?;
        let (work_pods, workload_pods) = (&self.work_pods, &self.workload_pods);
        let started = Instant::now();
        let first = wait_until(
            "the workload pod to be Ready on the real node",
            Duration::from_secs(90),
            || async {
                let list = work_pods.list(workload_pods).await?;
                Ok(list.items.into_iter().find(pod_ready))
            },
        )
        .await?;
        let status = self
            .reapers
            .get("slow-reaper")
            .await?
            .status
            .unwrap_or_default();
        ensure!(
            status.phase == Some(Phase::Leading)
                && status
                    .holder
                    .as_deref()
                    .is_some_and(|h| h.starts_with("east/reaper-")),
            "the Reaper is not led by an operator pod: {status:?}"
        );
        eprintln!(
            "Reaper led by {:?}; workload pod {} Ready in {:.1?}",
            status.holder,
            first.metadata.name.clone().unwrap_or_default(),
            started.elapsed()
        );
        Ok(first)
    }

    /// 4. helm upgrade: the operator pods are replaced; the leader hands over (scale to 0,
    ///    wait for its slow pod to be gone, release), a new pod takes over. At no instant
    ///    two workload pods, Terminating ones included.
    async fn upgrade_hands_over(&self, first: &Pod) -> Result<()> {
        let (work_pods, workload_pods) = (&self.work_pods, &self.workload_pods);
        let watch_pods = work_pods.clone();
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let watcher = tokio::spawn(async move {
            let mut most = 0usize;
            let mut seen = std::collections::BTreeSet::new();
            loop {
                if let Ok(list) = watch_pods
                    .list(&ListParams::default().labels("app=slow-reaper"))
                    .await
                {
                    most = most.max(acting(&list.items));
                    for p in list.items {
                        seen.insert(p.metadata.name.unwrap_or_default());
                    }
                }
                tokio::select! {
                    _ = &mut stop_rx => return (most, seen),
                    _ = tokio::time::sleep(Duration::from_millis(150)) => {}
                }
            }
        });
        let mut upgrade = vec![
            "upgrade",
            "reaper",
            self.chart.as_str(),
            "-n",
            OPS,
            "--wait",
            "--timeout",
            "180s",
        ];
        for v in &self.values {
            upgrade.extend(["--set", v.as_str()]);
        }
        upgrade.extend(["--set", "logLevel=debug"]);
        let started = Instant::now();
        self.helm(&upgrade)?;
        let first_name = first.metadata.name.clone().unwrap_or_default();
        let second = wait_until(
            "a new workload pod after the operator's upgrade",
            Duration::from_secs(120),
            || async {
                let list = work_pods.list(workload_pods).await?;
                Ok(list.items.into_iter().find(|p| {
                    p.metadata.name.as_deref() != Some(first_name.as_str())
                        && p.metadata.deletion_timestamp.is_none()
                        && pod_ready(p)
                }))
            },
        )
        .await?;
        let _ = stop_tx.send(());
        let (most, seen) = watcher.await?;
        ensure!(
            most <= 1,
            "{most} workload pods existed at once during the upgrade: {seen:?}"
        );
        ensure!(
            seen.len() >= 2,
            "the upgrade did not hand the workload over: {seen:?}"
        );
        ensure!(
            started.elapsed() >= Duration::from_secs(WORKLOAD_GRACE as u64),
            "the handover took {:?}, less than the slow pod's {WORKLOAD_GRACE} s grace",
            started.elapsed()
        );
        eprintln!(
            "helm upgrade: handed over to {} in {:.1?}; at most {most} workload pod at a time",
            second.metadata.name.clone().unwrap_or_default(),
            started.elapsed()
        );
        Ok(())
    }

    /// 5. Deleting the Reaper: the lease is released only after the slow pod is gone.
    async fn delete_reaper(&self) -> Result<()> {
        let (work_pods, workload_pods, reapers) =
            (&self.work_pods, &self.workload_pods, &self.reapers);
        let store = reaper_operator::lease::LeaseStore::connect(
            &support::db::direct_url(),
            &reaper_operator::config::Schema::new(&self.schema)?,
            Duration::from_secs(5),
            1,
        )
        .await?;
        let lease_name = format!("{WORK}.slow-reaper");
        let started = Instant::now();
        reapers
            .delete("slow-reaper", &DeleteParams::default())
            .await?;
        let mut pod_gone = None;
        loop {
            ensure!(
                started.elapsed() < Duration::from_secs(120),
                "the Reaper was not deleted in 120 s"
            );
            // The lease first: a pod listed after a release existed at the release too
            // (none comes back while the Reaper goes).
            let lease = store.get(&id::lease(&lease_name)).await?;
            let held = lease.as_ref().is_some_and(|l| l.is_held());
            let pods_left = acting(&work_pods.list(workload_pods).await?.items);
            if pods_left > 0 {
                ensure!(
                    held,
                    "the lease was released while a workload pod still existed: {lease:?}"
                );
            } else if pod_gone.is_none() {
                pod_gone = Some(started.elapsed());
            }
            if reapers.get_opt("slow-reaper").await?.is_none() {
                // Looked at after the Reaper was gone: its finalizer had finished by then.
                let lease = store.get(&id::lease(&lease_name)).await?;
                let pods_left = acting(&work_pods.list(workload_pods).await?.items);
                ensure!(
                    pods_left == 0 && !lease.as_ref().is_some_and(|l| l.is_held()),
                    "the Reaper went with pods {pods_left}, lease {lease:?}"
                );
                if pod_gone.is_none() {
                    pod_gone = Some(started.elapsed());
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        let pod_gone = pod_gone.context("no instant without pods")?;
        ensure!(
            pod_gone >= Duration::from_secs(WORKLOAD_GRACE as u64),
            "the slow pod was gone after {pod_gone:?}, before its {WORKLOAD_GRACE} s grace"
        );
        eprintln!(
            "Reaper deleted: its slow pod gone after {pod_gone:.1?}, the Reaper and the lease after {:.1?}",
            started.elapsed()
        );
        Ok(())
    }

    /// 6. helm uninstall removes the operator's pods.
    async fn uninstall(&self) -> Result<()> {
        self.helm(&[
            "uninstall",
            "reaper",
            "-n",
            OPS,
            "--wait",
            "--timeout",
            "120s",
        ])?;
        // The pods go through garbage collection and their own grace period.
        let (pods, operator_pods) = (&self.pods, &self.operator_pods);
        let started = Instant::now();
        wait_until(
            "the operator pods to be gone after helm uninstall",
            Duration::from_secs(90),
            || async {
                Ok(pods
                    .list(operator_pods)
                    .await?
                    .items
                    .is_empty()
                    .then_some(()))
            },
        )
        .await?;
        eprintln!(
            "helm uninstall: operator pods gone {:.1?} after it returned",
            started.elapsed()
        );
        Ok(())
    }
}

/// Pods that may still act: every pod but those whose containers have all ended
/// (phase Succeeded or Failed); Terminating ones count.
fn acting(pods: &[Pod]) -> usize {
    pods.iter()
        .filter(|p| {
            !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            )
        })
        .count()
}

/// The pod's Ready condition is True.
fn pod_ready(pod: &Pod) -> bool {
    condition_true(pod, "Ready")
}
