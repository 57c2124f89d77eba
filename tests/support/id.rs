//! The typed names of the lease store, from the literals tests spell them with
//! (`id::lease("l")`); a name the store would refuse is a mistake in the test.

use std::time::Duration;

use reaper_operator::lease::{
    ClusterName, Holder, Lease, LeaseEvent, LeaseName, LeaseStore, ReportTiming, WorkloadCounts,
    WorkloadReport,
};

pub fn lease(name: impl AsRef<str>) -> LeaseName {
    LeaseName::new(name.as_ref()).expect("a valid lease name")
}

pub fn holder(holder: impl AsRef<str>) -> Holder {
    Holder::new(holder.as_ref()).expect("a valid holder")
}

pub fn cluster(name: impl AsRef<str>) -> ClusterName {
    ClusterName::new(name.as_ref()).expect("a valid cluster name")
}

/// The store's calls with the names spelled as text, as tests write them. A database
/// error fails the test where it happens; what is left is the store's answer (`None`:
/// refused, or no such row). Tests that expect an error call the store itself.
#[allow(
    async_fn_in_trait,
    reason = "test helpers; no caller needs a Send bound spelled"
)]
pub trait SpelledNames {
    fn store(&self) -> &LeaseStore;

    async fn try_acquire(
        &self,
        name: impl AsRef<str>,
        holder: &str,
        ttl: Duration,
    ) -> Option<Lease> {
        self.store()
            .acquire(&lease(name), &self::holder(holder), ttl)
            .await
            .expect("acquire")
    }

    async fn try_renew(&self, name: impl AsRef<str>, holder: &str, epoch: i64) -> Option<Lease> {
        self.store()
            .renew(&lease(name), &self::holder(holder), epoch)
            .await
            .expect("renew")
    }

    async fn try_release(&self, name: impl AsRef<str>, holder: &str, epoch: i64) -> Option<Lease> {
        self.store()
            .release(&lease(name), &self::holder(holder), epoch)
            .await
            .expect("release")
    }

    async fn row(&self, name: impl AsRef<str>) -> Option<Lease> {
        self.store()
            .get(&lease(name))
            .await
            .expect("read the lease row")
    }

    async fn history(&self, name: impl AsRef<str>) -> Vec<LeaseEvent> {
        self.store()
            .events(&lease(name))
            .await
            .expect("read the lease history")
    }

    /// `holder`'s renews of `(name, epoch)`: the leases it still held.
    async fn try_renew_many(&self, holder: &str, held: &[(&str, i64)]) -> Vec<Lease> {
        let held: Vec<(LeaseName, i64)> = held.iter().map(|(n, e)| (lease(n), *e)).collect();
        self.store()
            .renew_many(&self::holder(holder), &held)
            .await
            .expect("renew_many")
    }

    /// `cluster`'s report of the workload behind `name`, by `holder`: the other
    /// clusters' reports.
    async fn report(
        &self,
        name: impl AsRef<str>,
        cluster: &str,
        holder: &str,
        counts: WorkloadCounts,
        timing: impl Into<ReportTiming>,
    ) -> Vec<WorkloadReport> {
        self.store()
            .sync_workload(
                &lease(name),
                &self::cluster(cluster),
                &self::holder(holder),
                counts,
                timing,
            )
            .await
            .expect("sync_workload")
    }
}

impl SpelledNames for LeaseStore {
    fn store(&self) -> &LeaseStore {
        self
    }
}
