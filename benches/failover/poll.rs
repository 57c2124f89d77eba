//! Waiting for a condition without blocking a thread of the runtime, which the watches
//! need to timestamp their events as they arrive.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};

/// Calls `check` every `interval` until it returns `Some`; fails with `timed_out()` once
/// `timeout` has passed.
pub async fn poll<T>(
    interval: Duration,
    timeout: Duration,
    mut check: impl FnMut() -> Result<Option<T>>,
    timed_out: impl Fn() -> String,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check()? {
            return Ok(value);
        }
        ensure!(Instant::now() < deadline, "{}", timed_out());
        tokio::time::sleep(interval).await;
    }
}
