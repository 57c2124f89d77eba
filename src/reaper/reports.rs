//! This replica's workload reports, refreshed for every Reaper at once.
//!
//! A reconcile writes a Reaper's report when what it observes changes (and reads the
//! other clusters' reports fresh whenever it may scale up). Between changes the reports
//! must still be refreshed, or other clusters would presume this cluster dead once a
//! report is older than its bound: that is this task, one statement per refresh period
//! for all of this replica's reports, which also brings back the other clusters'
//! reports for the reconciles to read. The database load does not grow with the number
//! of Reapers.
//!
//! What is refreshed is what the last reconcile saw. While the watch caches are not
//! live (not listed yet, or a watch failing), reconciles read the API server instead,
//! every steady period as they did before the caches, and report "may run a pod" when
//! it does not answer either (`Workload::unobservable`).

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::reflector::ObjectRef;

use super::crd::Reaper;
use super::reconcile::Context;
use crate::lease::{WorkloadReport, WorkloadUpdate};

/// Used while this replica has no report to refresh.
const IDLE_PERIOD: Duration = Duration::from_secs(1);

/// Refreshes the reports until the process ends (the task is aborted at shutdown).
pub async fn refresh(ctx: Arc<Context>) {
    loop {
        let (updates, period) = due(&ctx);
        tokio::time::sleep(period).await;
        if updates.is_empty() {
            continue;
        }
        // Read again: a reconcile may have written a newer report while this slept.
        let (updates, _) = due(&ctx);
        let updates: Vec<WorkloadUpdate> = updates.into_iter().map(|(_, u)| u).collect();
        match ctx
            .store
            .sync_workloads(&ctx.cluster, &ctx.holder, &updates)
            .await
        {
            Ok(mut others) => ctx.candidates.for_each(|key, candidate| {
                let Some(report) = &candidate.report else {
                    return;
                };
                let Some(fresh) = others.remove(&report.name) else {
                    return;
                };
                if changed(candidate.others.as_deref(), &fresh) {
                    // A leader waiting for another cluster re-judges at once.
                    ctx.candidates.trigger(key);
                }
                candidate.others = Some(fresh);
            }),
            Err(error) => {
                tracing::warn!(%error, reports = updates.len(), "cannot refresh the workload reports");
                ctx.candidates
                    .for_each(|_, candidate| candidate.others = None);
            }
        }
    }
}

/// Every report to refresh, and how long until the next refresh: the shortest refresh
/// period any of them promised its readers.
fn due(ctx: &Context) -> (Vec<(ObjectRef<Reaper>, WorkloadUpdate)>, Duration) {
    let mut updates = Vec::new();
    let mut period: Option<Duration> = None;
    ctx.candidates.for_each(|key, candidate| {
        if let Some(report) = &candidate.report {
            period = Some(period.map_or(report.timing.refresh, |p| p.min(report.timing.refresh)));
            updates.push((key.clone(), report.clone()));
        }
    });
    (updates, period.unwrap_or(IDLE_PERIOD))
}

/// Whether the other clusters' reports differ in anything a decision reads (not their
/// age, which changes every time).
pub fn changed(before: Option<&[WorkloadReport]>, after: &[WorkloadReport]) -> bool {
    let key = |r: &WorkloadReport| {
        (
            r.cluster.clone(),
            r.replicas,
            r.running_pods,
            r.ready_pods,
            r.is_stale(),
        )
    };
    match before {
        None => true,
        Some(before) => {
            before.len() != after.len() || before.iter().zip(after).any(|(b, a)| key(b) != key(a))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn report(cluster: &str, running_pods: i32, age: Duration) -> WorkloadReport {
        WorkloadReport {
            cluster: cluster.into(),
            reported_by: format!("{cluster}/op"),
            replicas: running_pods,
            running_pods,
            ready_pods: running_pods,
            reported_at: Utc::now(),
            age,
            stale_after: Duration::from_secs(30),
            refresh: Duration::from_secs(4),
        }
    }

    #[test]
    fn only_what_decisions_read_counts_as_a_change() {
        let before = [report("b", 1, Duration::from_secs(1))];
        assert!(!changed(
            Some(&before),
            &[report("b", 1, Duration::from_secs(5))]
        ));
        assert!(changed(
            Some(&before),
            &[report("b", 0, Duration::from_secs(1))]
        ));
        assert!(changed(
            Some(&before),
            &[report("b", 1, Duration::from_secs(31))]
        ));
        assert!(changed(Some(&before), &[]));
        assert!(changed(None, &before));
    }
}
