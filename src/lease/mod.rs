//! The PostgreSQL lease: storage ([`store`]), connecting to it ([`connect`]) and the
//! per-lease leadership state machine ([`elector`]).

pub mod batch;
pub mod connect;
mod conns;
pub mod elector;
pub mod identity;
pub mod store;

pub use batch::LeaseBatcher;
pub use connect::{connect_options, connection_hint};
pub use elector::{Clock, Elector, ElectorConfig, LeaderWatch, Leadership, MonotonicClock, Tick};
pub use identity::{ClusterName, Holder, LeaseName, cluster_of};
pub use store::{
    Lease, LeaseEvent, LeaseStore, NOTIFY_CHANNEL, PROBE_TABLE, Reference, ReportTiming, Statement,
    SyncedReports, WorkloadCounts, WorkloadReport, WorkloadUpdate,
};
