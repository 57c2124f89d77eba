//! Sub-cases of one #[test] that owns an expensive cluster: each runs even when an
//! earlier one failed, and the test fails at the end with all failures.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Instant;

use futures::FutureExt;

/// Runs one sub-case, catching errors and panics so that the others still run; a
/// failure is appended to `failures` as `"<name>: <reason>"`.
pub async fn check(
    failures: &mut Vec<String>,
    kind: &str,
    name: &str,
    case: impl Future<Output = anyhow::Result<()>>,
) {
    let started = Instant::now();
    let outcome = AssertUnwindSafe(case).catch_unwind().await;
    let elapsed = started.elapsed();
    let failure = match outcome {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(format!("{e:#}")),
        Err(panic) => Some(
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into()),
        ),
    };
    match failure {
        None => eprintln!("{kind} case {name} ... ok ({elapsed:.1?})"),
        Some(f) => {
            eprintln!("{kind} case {name} ... FAILED ({elapsed:.1?}): {f}");
            failures.push(format!("{name}: {f}"));
        }
    }
}
