//! The PostgreSQL lease: storage ([`store`]) and the per-lease leadership state machine
//! ([`elector`]).

pub mod batch;
pub mod elector;
pub mod store;

pub use batch::LeaseBatcher;
pub use elector::{
    Clock, Elector, ElectorConfig, LeaderWatch, Leadership, ManualClock, MonotonicClock, Tick,
};
pub use store::{
    Lease, LeaseEvent, LeaseStore, NOTIFY_CHANNEL, ReportTiming, WorkloadCounts, WorkloadReport,
};
