//! The observer: a watch on the Deployments of each cluster (every change of
//! `spec.replicas` and `status.readyReplicas`, with the time it was seen) and a poll of
//! the lease tables every 200 ms on a direct connection (the workload reports, for the
//! checker's staleness judgement, and the current holders, for targeting faults).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use kube::runtime::utils::Backoff;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use sqlx::{AssertSqlSafe, Row};

use crate::checker::{Blind, Report, Sample};

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

    /// Watches the Deployments `deployments[i]` (lease index i) of one cluster.
    pub fn watch_cluster(
        &mut self,
        cluster: usize,
        client: Client,
        namespace: &str,
        deployments: Vec<String>,
    ) {
        let records = self.records.clone();
        let api: Api<Deployment> = Api::namespaced(client, namespace);
        self.tasks.push(tokio::spawn(async move {
            let stream = watcher(api, watcher::Config::default())
                .backoff(Constant(Duration::from_millis(200)));
            let mut stream = std::pin::pin!(stream);
            let mut last: HashMap<usize, (i32, i32)> = HashMap::new();
            let mut blind_since: Option<DateTime<Utc>> = None;
            while let Some(event) = stream.next().await {
                let now = Utc::now();
                let object = match event {
                    Ok(watcher::Event::Apply(d)) | Ok(watcher::Event::InitApply(d)) => Some(d),
                    Ok(watcher::Event::InitDone) => None,
                    Ok(_) => continue,
                    Err(_) => {
                        blind_since.get_or_insert(now);
                        continue;
                    }
                };
                let mut r = records.lock().unwrap();
                if let Some(from) = blind_since.take() {
                    r.blind.push(Blind {
                        cluster,
                        from,
                        to: now,
                    });
                }
                let Some(d) = object else { continue };
                let Some(lease) = deployments.iter().position(|n| *n == d.name_any()) else {
                    continue;
                };
                let spec = d.spec.replicas.unwrap_or(1);
                let ready = d
                    .status
                    .as_ref()
                    .and_then(|s| s.ready_replicas)
                    .unwrap_or(0);
                if last.insert(lease, (spec, ready)) != Some((spec, ready)) {
                    r.samples.push(Sample {
                        at: now,
                        cluster,
                        lease,
                        spec,
                        ready,
                    });
                }
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
            "SELECT name, cluster, running_pods, reported_at FROM \"{schema}\".lease_workload"
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
                    let (Ok(name), Ok(cluster), Ok(running_pods), Ok(reported_at)) = (
                        row.try_get::<String, _>("name"),
                        row.try_get::<String, _>("cluster"),
                        row.try_get::<i32, _>("running_pods"),
                        row.try_get::<DateTime<Utc>, _>("reported_at"),
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
