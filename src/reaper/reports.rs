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
use std::time::{Duration, Instant};

use super::reconcile::Context;
use crate::lease::{WorkloadReport, WorkloadUpdate};

/// The longest the refresher sleeps: a report added meanwhile with a shorter refresh
/// period than any before is due within this.
const MAX_SLEEP: Duration = Duration::from_secs(1);

/// Refreshes the reports until the process ends (the task is aborted at shutdown).
///
/// A report is refreshed once three quarters of its refresh period have passed since it
/// was last written, so reports that fall due at nearby instants go in one statement
/// and none waits longer than its period. The report lock is held from choosing the
/// reports to recording the outcome, so a reconcile's newer report is never overwritten
/// by an older one in flight here (and the other way round).
pub async fn refresh(ctx: Arc<Context>) {
    loop {
        let sleep = {
            let _lock = ctx.report_lock.lock().await;
            let now = Instant::now();
            let due = due(&ctx, now);
            if !due.is_empty() && !write(&ctx, &due, now).await {
                // Failed: its reports are still due, but asking again at once would
                // spin against a database that refuses fast (read-only, access denied).
                MAX_SLEEP
            } else {
                next_due(&ctx, Instant::now())
            }
        };
        tokio::time::sleep(sleep).await;
    }
}

/// Whether a report written at `written` (never: `None`) is to be refreshed at `now`.
fn is_due(written: Option<Instant>, refresh: Duration, now: Instant) -> bool {
    written.is_none_or(|at| now.saturating_duration_since(at) >= refresh * 3 / 4)
}

/// Whether a report goes along with a refresh that is due anyway: any not written in
/// the last quarter of its period. Reports written at scattered instants (each by its
/// own reconcile) so fall into step, and a steady replica sends one statement per
/// period instead of one per report.
fn joins(written: Option<Instant>, refresh: Duration, now: Instant) -> bool {
    written.is_none_or(|at| now.saturating_duration_since(at) >= refresh / 4)
}

/// The reports to refresh now. Not those of a Reaper that is being deleted or gone: its
/// cleanup reports what it sees each time it looks, and a refresh of an older view could
/// land after the final "no pods" of the replica that releases the lease, so that the
/// other clusters would wait for it to go stale.
fn due(ctx: &Context, now: Instant) -> Vec<WorkloadUpdate> {
    let reapers = ctx.reapers.get();
    let mut due = Vec::new();
    let mut any_due = false;
    ctx.candidates.for_each(|key, candidate| {
        let living = reapers
            .and_then(|store| store.get(key))
            .is_some_and(|r| r.metadata.deletion_timestamp.is_none());
        if !living {
            candidate.report = None;
            candidate.report_written = None;
            return;
        }
        if let Some(report) = &candidate.report {
            let written = candidate.report_written;
            any_due |= is_due(written, report.timing.refresh, now);
            if joins(written, report.timing.refresh, now) {
                due.push(report.clone());
            }
        }
    });
    if any_due { due } else { Vec::new() }
}

/// How long until the next report falls due, at most [`MAX_SLEEP`].
fn next_due(ctx: &Context, now: Instant) -> Duration {
    let mut sleep = MAX_SLEEP;
    ctx.candidates.for_each(|_, candidate| {
        if let (Some(report), Some(written)) = (&candidate.report, candidate.report_written) {
            let due_at = written + report.timing.refresh * 3 / 4;
            sleep = sleep.min(due_at.saturating_duration_since(now));
        }
    });
    sleep
}

/// False when the statement failed.
async fn write(ctx: &Context, due: &[WorkloadUpdate], sent: Instant) -> bool {
    match ctx
        .store
        .sync_workloads(&ctx.cluster, &ctx.holder, due)
        .await
    {
        Ok(mut synced) => ctx.candidates.for_each(|key, candidate| {
            let Some(report) = &candidate.report else {
                return;
            };
            let Some(fresh) = synced.others.remove(report.name.as_str()) else {
                return;
            };
            if synced.written.contains(report.name.as_str()) {
                candidate.report_written = Some(sent);
            } else {
                // Refused (a peer of this cluster holds the lease): not repeated, so it
                // cannot be taken later, once the peer no longer holds it, for a view
                // that may be out of date by then.
                candidate.report = None;
                candidate.report_written = None;
            }
            if changed(candidate.others.as_deref(), &fresh) {
                // A leader waiting for another cluster re-judges at once.
                ctx.candidates.trigger(key);
            }
            candidate.others = Some(fresh);
        }),
        Err(error) => {
            tracing::warn!(%error, reports = due.len(), "cannot refresh the workload reports");
            ctx.candidates
                .for_each(|_, candidate| candidate.others = None);
            return false;
        }
    }
    true
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
    fn a_report_is_refreshed_within_its_period() {
        let refresh = Duration::from_secs(4);
        let now = Instant::now();
        assert!(is_due(None, refresh, now), "never written");
        assert!(!is_due(Some(now), refresh, now));
        assert!(!is_due(
            Some(now),
            refresh,
            now + Duration::from_millis(2_999)
        ));
        assert!(is_due(Some(now), refresh, now + Duration::from_secs(3)));
        // Once a refresh is due, every report not written in the last quarter period
        // goes along.
        assert!(joins(None, refresh, now));
        assert!(!joins(Some(now), refresh, now + Duration::from_millis(999)));
        assert!(joins(Some(now), refresh, now + Duration::from_secs(1)));
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
