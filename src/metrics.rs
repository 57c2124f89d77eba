//! Prometheus/OpenMetrics metrics, served on `/metrics` (names in docs/operations.md).

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::lease::Tick;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LeaseLabels {
    pub lease: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: String,
}

/// `lost` (someone else took it / it expired) and `deadline` (no renew in time).
const LOSS_REASONS: [&str; 2] = ["lost", "deadline"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LossLabels {
    pub lease: String,
    /// `lost` (someone else took it / it expired) or `deadline` (no renew in time).
    pub reason: String,
}

pub struct Metrics {
    pub registry: Registry,
    pub leader: Family<LeaseLabels, Gauge>,
    pub acquisitions: Family<LeaseLabels, Counter>,
    pub takeovers: Family<LeaseLabels, Counter>,
    pub losses: Family<LossLabels, Counter>,
    pub renew_duration: Histogram,
    pub database_errors: Counter,
    pub reconciliations: Counter,
    pub reconcile_errors: Counter,
    pub reconcile_duration: Histogram,
    pub presence_errors: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut metrics = Self {
            registry: Registry::with_prefix("reaper"),
            leader: Family::default(),
            acquisitions: Family::default(),
            takeovers: Family::default(),
            losses: Family::default(),
            // 0.5 ms .. ~4 s
            renew_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            database_errors: Counter::default(),
            reconciliations: Counter::default(),
            reconcile_errors: Counter::default(),
            reconcile_duration: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            presence_errors: Counter::default(),
        };
        metrics.register();
        metrics
    }
}

impl Metrics {
    /// Registers every metric under its exposed name (the registry keeps a handle; the
    /// fields are the same series).
    fn register(&mut self) {
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_owned(),
            })
            .set(1);
        let registry = &mut self.registry;
        registry.register(
            "build_info",
            "Always 1; the version label names the running build",
            build_info,
        );
        registry.register(
            "leader",
            "1 while this replica holds the lease and may act",
            self.leader.clone(),
        );
        registry.register(
            "lease_acquisitions",
            "Leases acquired by this replica (free or expired)",
            self.acquisitions.clone(),
        );
        registry.register(
            "lease_takeovers",
            "Acquisitions that displaced an expired holder",
            self.takeovers.clone(),
        );
        registry.register(
            "lease_losses",
            "Times this replica stepped down",
            self.losses.clone(),
        );
        registry.register(
            "lease_renew_duration_seconds",
            "Latency of successful renew statements",
            self.renew_duration.clone(),
        );
        registry.register(
            "database_errors",
            "Lease database calls that failed or timed out",
            self.database_errors.clone(),
        );
        registry.register(
            "reconciliations",
            "Reconciles of Reaper objects",
            self.reconciliations.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconciles that failed",
            self.reconcile_errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of Reaper reconciles",
            self.reconcile_duration.clone(),
        );
        registry.register(
            "presence_errors",
            "Failed renewals of this replica's presence Lease (peers cut off from the database cannot count on it)",
            self.presence_errors.clone(),
        );
    }

    /// Records one elector tick. `is_leader` is the elector's state after it.
    pub fn observe_tick(&self, lease: &str, tick: &Tick, took: Duration, is_leader: bool) {
        let labels = || LeaseLabels {
            lease: lease.to_owned(),
        };
        let loss = |reason: &str| LossLabels {
            lease: lease.to_owned(),
            reason: reason.to_owned(),
        };
        match tick {
            Tick::Acquired(l) => {
                self.acquisitions.get_or_create(&labels()).inc();
                if !l.previous_holder.is_empty() {
                    self.takeovers.get_or_create(&labels()).inc();
                }
            }
            Tick::Renewed(_) => self.renew_duration.observe(took.as_secs_f64()),
            Tick::Lost { .. } => {
                self.losses.get_or_create(&loss(LOSS_REASONS[0])).inc();
            }
            Tick::DeadlineMissed { .. } => {
                self.losses.get_or_create(&loss(LOSS_REASONS[1])).inc();
            }
            Tick::Standby(_) | Tick::DatabaseError { .. } => {}
        }
        if !tick.database_reachable() {
            self.database_errors.inc();
        }
        self.leader
            .get_or_create(&labels())
            .set(i64::from(is_leader));
    }

    /// Drops the per-lease series of a lease this replica no longer competes for.
    pub fn forget_lease(&self, lease: &str) {
        let labels = LeaseLabels {
            lease: lease.to_owned(),
        };
        self.leader.remove(&labels);
        self.acquisitions.remove(&labels);
        self.takeovers.remove(&labels);
        for reason in LOSS_REASONS {
            self.losses.remove(&LossLabels {
                lease: lease.to_owned(),
                reason: reason.to_owned(),
            });
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_drive_the_leader_gauge_and_counters() {
        let m = Metrics::default();
        m.observe_tick("a", &Tick::Lost { epoch: 1 }, Duration::ZERO, false);
        m.observe_tick("a", &Tick::Standby(None), Duration::ZERO, false);
        let text = m.encode();
        assert!(text.contains("reaper_leader{lease=\"a\"} 0"), "{text}");
        assert!(
            text.contains("reaper_lease_losses_total{lease=\"a\",reason=\"lost\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("# EOF"),
            "OpenMetrics text ends with # EOF: {text}"
        );
        m.observe_tick("b", &Tick::Standby(None), Duration::ZERO, false);
        m.forget_lease("a");
        let text = m.encode();
        assert!(
            !text.contains("lease=\"a\""),
            "series of a forgotten lease: {text}"
        );
        assert!(text.contains("reaper_leader{lease=\"b\"} 0"), "{text}");
    }

    #[test]
    fn build_info_names_the_version() {
        let text = Metrics::default().encode();
        let line = format!(
            "reaper_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.contains(&line), "{text}");
    }
}
