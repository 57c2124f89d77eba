//! The `Reaper` resource and its controller.

pub mod crd;

pub use crd::{LeaseScope, LeaseSpec, Phase, Reaper, ReaperSpec, ReaperStatus};
pub mod candidates;
pub mod decide;
pub mod events;
pub mod handover;
pub mod observe;
pub mod presence;
pub mod reconcile;
pub mod reports;
pub mod status;
pub mod summary;
pub mod watches;
