//! The `Reaper` resource and its controller.

pub mod crd;

pub use crd::{LeaseSpec, Phase, Reaper, ReaperSpec, ReaperStatus};
pub mod candidates;
pub mod reconcile;
pub mod status;
