//! Requests of one client, counted at the kube-apiserver from its audit log.
//!
//! `tests/cluster/up.sh` with `REAPER_CLUSTER_AUDIT=1` logs the requests of the group
//! `reaper:audited` only (Metadata level, no RequestReceived stage) and writes a
//! kubeconfig of that group, `operator.kubeconfig`. The operator runs with it, the harness
//! with the admin one, so every event in the log is one of the operator's requests.
//!
//! A request is counted once (by its `auditID`) when the apiserver received it within the
//! window (`requestReceivedTimestamp`, the same machine's clock as the harness). A watch
//! is logged when it opens and again when it ends; it is counted as one watch open, apart
//! from the other verbs: an open watch is not traffic, opening one is.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, ensure};
use chrono::{DateTime, Utc};
use serde_json::Value;

/// The environment variable of `tests/cluster/up.sh` that turns the audit log on.
pub const AUDIT_ENV: &str = "REAPER_CLUSTER_AUDIT";

/// The audit log and the audited kubeconfig of a cluster started by `up.sh`.
pub struct AuditLog {
    log: PathBuf,
    kubeconfig: PathBuf,
}

/// Where a measurement window starts: the log's length and the time.
pub struct Mark {
    offset: u64,
    at: DateTime<Utc>,
}

/// The audited client's requests over a window.
#[derive(Clone, Debug, Default)]
pub struct ApiCounts {
    /// Requests other than watches, by verb (get, list, patch, update, create, ...).
    pub by_verb: BTreeMap<String, u64>,
    /// Watches opened.
    pub watch_opens: u64,
    /// Every request (watch opens included) by verb and resource, e.g. `get deployments`,
    /// `patch reapers/status`, `get /api` (a path for non-resource requests).
    pub by_target: BTreeMap<String, u64>,
    /// Requests answered with a status of 400 or more (watch opens included).
    pub errors: u64,
    /// Length of the window, in seconds.
    pub secs: f64,
}

impl Mark {
    pub fn at(&self) -> DateTime<Utc> {
        self.at
    }
}

impl ApiCounts {
    /// Requests, watch opens left out.
    pub fn requests(&self) -> u64 {
        self.by_verb.values().sum()
    }

    /// Requests per second, watch opens left out.
    pub fn requests_per_s(&self) -> f64 {
        self.by_verb.values().sum::<u64>() as f64 / self.secs
    }

    pub fn rate(&self, count: u64) -> f64 {
        count as f64 / self.secs
    }
}

impl AuditLog {
    /// The audit log of the cluster whose admin kubeconfig is `admin_kubeconfig` (the
    /// state directory of up.sh holds both); an error when that cluster was started
    /// without `REAPER_CLUSTER_AUDIT=1`.
    pub fn of(admin_kubeconfig: &Path) -> Result<Self> {
        let state = admin_kubeconfig
            .parent()
            .ok_or_else(|| anyhow!("{} has no directory", admin_kubeconfig.display()))?;
        let log = state.join("logs/audit.log");
        let kubeconfig = state.join("operator.kubeconfig");
        ensure!(
            log.is_file() && kubeconfig.is_file(),
            "the cluster in {} has no audit log or audited kubeconfig ({} and {}); start it \
             with {AUDIT_ENV}=1 tests/cluster/up.sh NAME",
            state.display(),
            log.display(),
            kubeconfig.display()
        );
        Ok(Self { log, kubeconfig })
    }

    /// The kubeconfig whose requests are logged.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Marks the start of a window (now).
    pub fn mark(&self) -> Result<Mark> {
        let at = Utc::now();
        let offset = std::fs::metadata(&self.log)
            .with_context(|| format!("stat {}", self.log.display()))?
            .len();
        Ok(Mark { offset, at })
    }

    /// Counts the requests received from `mark` until `end`. Waits until half a second
    /// after `end` first, so that requests received just before it are logged.
    pub async fn count(&self, mark: &Mark, end: DateTime<Utc>) -> Result<ApiCounts> {
        let wait = (end + chrono::Duration::milliseconds(500) - Utc::now())
            .to_std()
            .unwrap_or_default();
        tokio::time::sleep(wait).await;
        let path = self.log.clone();
        let offset = mark.offset;
        let start = mark.at;
        tokio::task::spawn_blocking(move || count_file(&path, offset, start, end))
            .await
            .context("audit log reader")?
    }
}

fn count_file(
    path: &Path,
    offset: u64,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> Result<ApiCounts> {
    let mut file = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    file.seek(SeekFrom::Start(offset))?;
    // Line by line: at a thousand Reapers the log grows by hundreds of MB.
    let lines = BufReader::new(file)
        .lines()
        .map(|l| l.with_context(|| format!("read {}", path.display())));
    let mut counts =
        count_events(lines, start, end).with_context(|| format!("parse {}", path.display()))?;
    counts.secs = (end - start).to_std().unwrap_or_default().as_secs_f64();
    ensure!(counts.secs > 0.0, "empty audit window");
    Ok(counts)
}

/// One request, from its events.
struct Request {
    verb: String,
    target: String,
    error: bool,
}

/// Counts the requests received in `[start, end)` among the JSON events `lines`.
fn count_events(
    lines: impl Iterator<Item = Result<String>>,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> Result<ApiCounts> {
    let mut requests: HashMap<String, Request> = HashMap::new();
    // The apiserver keeps writing while this reads: the last line may be half written (it
    // is then later than the window). Any other line that is not JSON is an error.
    let mut broken: Option<anyhow::Error> = None;
    for line in lines {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        if let Some(e) = broken.take() {
            return Err(e);
        }
        let event: Value = match serde_json::from_str(&line) {
            Ok(event) => event,
            Err(e) => {
                broken = Some(anyhow!(e).context("an audit event is not JSON"));
                continue;
            }
        };
        let field = |name: &str| event.get(name).and_then(Value::as_str);
        let received: DateTime<Utc> = field("requestReceivedTimestamp")
            .ok_or_else(|| anyhow!("an audit event without requestReceivedTimestamp"))?
            .parse()
            .context("requestReceivedTimestamp")?;
        if received < start || received >= end {
            continue;
        }
        let id = field("auditID").ok_or_else(|| anyhow!("an audit event without auditID"))?;
        let code = event
            .pointer("/responseStatus/code")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let entry = requests.entry(id.to_owned()).or_insert_with(|| Request {
            verb: field("verb").unwrap_or("?").to_owned(),
            target: target(&event),
            error: false,
        });
        entry.error |= code >= 400;
    }
    let mut counts = ApiCounts::default();
    for r in requests.into_values() {
        if r.verb == "watch" {
            counts.watch_opens += 1;
        } else {
            *counts.by_verb.entry(r.verb.clone()).or_default() += 1;
        }
        *counts
            .by_target
            .entry(format!("{} {}", r.verb, r.target))
            .or_default() += 1;
        counts.errors += u64::from(r.error);
    }
    Ok(counts)
}

/// `resource[/subresource]`, or the path of a non-resource request.
fn target(event: &Value) -> String {
    let s = |p: &str| event.pointer(p).and_then(Value::as_str).unwrap_or("");
    match s("/objectRef/resource") {
        "" => s("/requestURI")
            .split('?')
            .next()
            .unwrap_or_default()
            .to_owned(),
        resource => match s("/objectRef/subresource") {
            "" => resource.to_owned(),
            sub => format!("{resource}/{sub}"),
        },
    }
}
