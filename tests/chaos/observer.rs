//! The observer: a watch on the Deployments of each cluster (every change of
//! `spec.replicas` and `status.readyReplicas`, with the time it was seen), a watch on
//! the pods of each cluster (when each appeared, started stopping and was gone), and a
//! poll of the lease tables every 200 ms on a direct connection (the workload reports,
//! for the checker's staleness judgement, and the current holders, for targeting
//! faults).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::utils::Backoff;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use sqlx::{AssertSqlSafe, Row};

use crate::checker::{Blind, OtherSample, PodLife, Report, Sample};

/// Reconnects a broken watch every 200 ms (the default backoff grows to 30 s, which
/// would leave the observer blind long after an apiserver restart).
struct Constant(Duration);

impl Iterator for Constant {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        Some(self.0)
    }
}

impl Backoff for Constant {
    fn reset(&mut self) {}
}

/// A lease row as last polled.
#[derive(Clone, Debug)]
pub struct Holder {
    pub holder: String,
    pub held: bool,
}

#[derive(Default)]
pub struct Records {
    pub samples: Vec<Sample>,
    /// Deployments that no lease owns (second Reapers'; not the canary).
    pub other_samples: Vec<OtherSample>,
    pub pods: Vec<PodLife>,
    pub reports: Vec<Report>,
    pub blind: Vec<Blind>,
    /// Per lease index: the row at the last successful poll.
    pub holders: HashMap<usize, Holder>,
    pub db_poll_errors: u64,
}

pub struct Observer {
    pub records: Arc<Mutex<Records>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Observer {
    pub fn new() -> Self {
        Self {
            records: Arc::default(),
            tasks: Vec::new(),
        }
    }

    /// Watches the Deployments of one cluster's namespace: `deployments[i]` is lease
    /// index i's; a deleted one counts as 0 replicas; others (but `ignore`) are recorded
    /// apart.
    pub fn watch_cluster(
        &mut self,
        cluster: usize,
        client: Client,
        namespace: &str,
        deployments: Vec<String>,
        ignore: &str,
    ) {
        let records = self.records.clone();
        let ignore = ignore.to_owned();
        let api: Api<Deployment> = Api::namespaced(client, namespace);
        self.tasks.push(tokio::spawn(async move {
            let stream = watcher(api, watcher::Config::default())
                .backoff(Constant(Duration::from_millis(200)));
            let mut stream = std::pin::pin!(stream);
            let mut last: HashMap<String, (i32, i32)> = HashMap::new();
            let mut blind_since: Option<DateTime<Utc>> = None;
            while let Some(event) = stream.next().await {
                let now = Utc::now();
                let (object, deleted) = match event {
                    Ok(watcher::Event::Apply(d)) | Ok(watcher::Event::InitApply(d)) => {
                        (Some(d), false)
                    }
                    Ok(watcher::Event::Delete(d)) => (Some(d), true),
                    Ok(watcher::Event::InitDone) => (None, false),
                    Ok(watcher::Event::Init) => continue,
                    Err(_) => {
                        blind_since.get_or_insert(now);
                        continue;
                    }
                };
                let mut r = records.lock().unwrap();
                if let Some(from) = blind_since.take() {
                    r.blind.push(Blind {
                        watch: "deployments",
                        cluster,
                        from,
                        to: now,
                    });
                }
                let Some(d) = object else { continue };
                let name = d.name_any();
                if name == ignore {
                    continue;
                }
                let (spec, ready) = if deleted {
                    (0, 0)
                } else {
                    let ready = d.status.as_ref().and_then(|s| s.ready_replicas);
                    (d.spec.replicas.unwrap_or(1), ready.unwrap_or(0))
                };
                if last.insert(name.clone(), (spec, ready)) == Some((spec, ready)) {
                    continue;
                }
                match deployments.iter().position(|n| *n == name) {
                    Some(lease) => r.samples.push(Sample {
                        at: now,
                        cluster,
                        lease,
                        spec,
                        ready,
                    }),
                    None => r.other_samples.push(OtherSample {
                        at: now,
                        cluster,
                        name,
                        spec,
                    }),
                }
            }
        }));
    }

    /// Watches the pods of one cluster's namespace that have an `app` label (but
    /// `ignore`): when each was first seen, first seen Terminating, and gone (a delete
    /// event, a finished phase, or missing from a fresh list after the watch broke).
    pub fn watch_pods(&mut self, cluster: usize, client: Client, namespace: &str, ignore: &str) {
        let records = self.records.clone();
        let api: Api<Pod> = Api::namespaced(client, namespace);
        let config = watcher::Config::default().labels(&format!("app,app!={ignore}"));
        self.tasks.push(tokio::spawn(async move {
            let stream = watcher(api, config).backoff(Constant(Duration::from_millis(200)));
            let mut stream = std::pin::pin!(stream);
            // uid -> index in records.pods, for pods not gone yet.
            let mut live: HashMap<String, usize> = HashMap::new();
            let mut listed: HashSet<String> = HashSet::new();
            let mut blind_since: Option<DateTime<Utc>> = None;
            while let Some(event) = stream.next().await {
                let now = Utc::now();
                let mut r = records.lock().unwrap();
                if event.is_ok()
                    && let Some(from) = blind_since.take()
                {
                    r.blind.push(Blind {
                        watch: "pods",
                        cluster,
                        from,
                        to: now,
                    });
                }
                let (pod, deleted) = match event {
                    Ok(watcher::Event::Apply(p)) => (p, false),
                    Ok(watcher::Event::Delete(p)) => (p, true),
                    Ok(watcher::Event::InitApply(p)) => {
                        listed.insert(p.uid().unwrap_or_default());
                        (p, false)
                    }
                    Ok(watcher::Event::Init) => {
                        listed.clear();
                        continue;
                    }
                    Ok(watcher::Event::InitDone) => {
                        // Deleted while the watch was broken.
                        live.retain(|uid, &mut i| {
                            let there = listed.contains(uid);
                            if !there {
                                r.pods[i].gone = Some(now);
                            }
                            there
                        });
                        continue;
                    }
                    Err(_) => {
                        blind_since.get_or_insert(now);
                        continue;
                    }
                };
                record_pod(&mut r.pods, &mut live, cluster, &pod, deleted, now);
            }
        }));
    }

    /// Polls `lease_workload` and `lease` of `schema` every 200 ms.
    pub fn poll_database(
        &mut self,
        direct_url: &str,
        schema: &str,
        leases: Vec<String>,
        clusters: [String; 2],
    ) -> anyhow::Result<()> {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(1))
            .connect_lazy(direct_url)?;
        let records = self.records.clone();
        let workload_sql = format!(
            "SELECT name, cluster, running_pods, reported_at, stale_after_ms FROM \"{schema}\".lease_workload"
        );
        let lease_sql = format!(
            "SELECT name, holder, \
                    (renewed_at + ttl_ms * interval '1 millisecond' > clock_timestamp()) AS held \
             FROM \"{schema}\".lease"
        );
        self.tasks.push(tokio::spawn(async move {
            let mut seen: HashMap<(usize, usize), DateTime<Utc>> = HashMap::new();
            let mut interval = tokio::time::interval(Duration::from_millis(200));
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let poll = async {
                    let workload = sqlx::raw_sql(AssertSqlSafe(workload_sql.clone()))
                        .fetch_all(&pool)
                        .await?;
                    let lease = sqlx::raw_sql(AssertSqlSafe(lease_sql.clone()))
                        .fetch_all(&pool)
                        .await?;
                    Ok::<_, sqlx::Error>((workload, lease))
                };
                let (workload, lease) =
                    match tokio::time::timeout(Duration::from_secs(1), poll).await {
                        Ok(Ok(rows)) => rows,
                        _ => {
                            records.lock().unwrap().db_poll_errors += 1;
                            continue;
                        }
                    };
                let mut r = records.lock().unwrap();
                for row in &workload {
                    let (Ok(name), Ok(cluster), Ok(running_pods), Ok(reported_at), Ok(bound)) = (
                        row.try_get::<String, _>("name"),
                        row.try_get::<String, _>("cluster"),
                        row.try_get::<i32, _>("running_pods"),
                        row.try_get::<DateTime<Utc>, _>("reported_at"),
                        row.try_get::<i64, _>("stale_after_ms"),
                    ) else {
                        continue;
                    };
                    let (Some(l), Some(c)) = (
                        leases.iter().position(|n| *n == name),
                        clusters.iter().position(|n| *n == cluster),
                    ) else {
                        continue;
                    };
                    if seen.insert((l, c), reported_at) != Some(reported_at) {
                        r.reports.push(Report {
                            lease: l,
                            cluster: c,
                            reported_at,
                            running_pods,
                            stale_after: Duration::from_millis(bound.max(0) as u64),
                        });
                    }
                }
                for row in &lease {
                    let (Ok(name), Ok(holder), Ok(held)) = (
                        row.try_get::<String, _>("name"),
                        row.try_get::<String, _>("holder"),
                        row.try_get::<bool, _>("held"),
                    ) else {
                        continue;
                    };
                    if let Some(l) = leases.iter().position(|n| *n == name) {
                        r.holders.insert(
                            l,
                            Holder {
                                holder,
                                held: held && !name.is_empty(),
                            },
                        );
                    }
                }
            }
        }));
        Ok(())
    }

    /// The holder of lease `l` at the last poll, if the lease is held.
    pub fn holder_of(&self, l: usize) -> Option<String> {
        let r = self.records.lock().unwrap();
        r.holders
            .get(&l)
            .filter(|h| h.held && !h.holder.is_empty())
            .map(|h| h.holder.clone())
    }

    pub fn stop(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One watch event of a pod: a new life, its deletion seen, or its end.
fn record_pod(
    pods: &mut Vec<PodLife>,
    live: &mut HashMap<String, usize>,
    cluster: usize,
    pod: &Pod,
    deleted: bool,
    now: DateTime<Utc>,
) {
    let uid = pod.uid().unwrap_or_default();
    let finished = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed");
    let i = match live.get(&uid) {
        Some(&i) => i,
        None if deleted || finished => return,
        None => {
            pods.push(PodLife {
                cluster,
                app: pod.labels().get("app").cloned().unwrap_or_default(),
                name: pod.name_any(),
                appeared: now,
                deleting: None,
                gone: None,
            });
            live.insert(uid.clone(), pods.len() - 1);
            pods.len() - 1
        }
    };
    if pod.metadata.deletion_timestamp.is_some() && pods[i].deleting.is_none() {
        pods[i].deleting = Some(now);
    }
    if deleted || finished {
        pods[i].gone = Some(now);
        live.remove(&uid);
    }
}
