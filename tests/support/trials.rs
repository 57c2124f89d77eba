//! The cases of a test binary that share one expensive set-up (a control plane, TLS-only
//! servers, a real node), as libtest-mimic trials: each case is a test of its own in
//! `cargo test`'s report, `--list` lists them, and a filter (`cargo test --test chart --
//! upgrade`) runs some of them.
//!
//! The first case that runs makes the set-up, so `--list`, or a filter that keeps no case
//! needing it, starts nothing. [`Suite::run`] tears it down after the last trial, also when
//! cases failed or panicked (a panic fails its own case only). The trials run one after
//! the other on the main thread, in the order given whatever `--test-threads` says (a case
//! may rely on an earlier one, as the chart's upgrade does on its install), on one tokio
//! runtime for the whole binary. A set-up that fails fails every case: the first one with
//! the error, the others with a pointer to it.
//!
//! The test target has `harness = false` in Cargo.toml and its `main` returns what
//! [`Suite::run`] returns.

use std::panic::AssertUnwindSafe;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use anyhow::Result;
use libtest_mimic::{Arguments, Failed, Trial};
use tokio::runtime::Runtime;

type SetUp<T> = Box<dyn FnOnce(&Runtime) -> Result<T> + Send>;

/// The trials of one test binary and the set-up its cases share.
pub struct Suite<T> {
    runtime: Runtime,
    set_up: Mutex<Option<SetUp<T>>>,
    shared: OnceLock<Result<T, String>>,
}

impl<T: Send + Sync + 'static> Suite<T> {
    /// A suite whose cases share what `set_up` makes.
    pub fn new(set_up: impl AsyncFnOnce() -> Result<T> + Send + 'static) -> Arc<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        Arc::new(Self {
            runtime,
            set_up: Mutex::new(Some(Box::new(move |runtime: &Runtime| {
                runtime.block_on(set_up())
            }))),
            shared: OnceLock::new(),
        })
    }

    /// A trial that runs `case` on the shared set-up. It prints how long the case took.
    pub fn case(
        self: &Arc<Self>,
        name: &str,
        case: impl AsyncFnOnce(&T) -> Result<()> + Send + 'static,
    ) -> Trial {
        let suite = Arc::clone(self);
        Trial::test(name, move || {
            let shared = suite.shared()?;
            let started = Instant::now();
            let outcome = suite.runtime.block_on(case(shared));
            eprint!("({:.1?}) ", started.elapsed());
            outcome.map_err(|e| format!("{e:#}").into())
        })
    }

    /// A trial that needs nothing of the shared set-up; it fails by panicking.
    pub fn test(self: &Arc<Self>, name: &str, test: impl AsyncFnOnce() + Send + 'static) -> Trial {
        let suite = Arc::clone(self);
        Trial::test(name, move || {
            suite.runtime.block_on(test());
            Ok(())
        })
    }

    /// Runs `trials` as `cargo test` would, but one at a time and in this order, then
    /// `tear_down` if a case made the set-up. The exit code is libtest's, or 101 when
    /// tearing down failed.
    pub fn run(
        self: Arc<Self>,
        trials: Vec<Trial>,
        tear_down: impl AsyncFnOnce(T) -> Result<()>,
    ) -> ExitCode {
        let mut args = Arguments::from_args();
        args.test_threads = Some(1);
        let conclusion = libtest_mimic::run(&args, trials);
        let suite = Arc::into_inner(self).expect("run has dropped every trial");
        if let Some(Ok(shared)) = suite.shared.into_inner()
            && let Err(e) = suite.runtime.block_on(tear_down(shared))
        {
            eprintln!("tearing the set-up down failed: {e:#}");
            return ExitCode::from(101);
        }
        conclusion.exit_code()
    }

    /// The shared set-up, made now if no case made it yet.
    fn shared(&self) -> Result<&T, Failed> {
        let mut made_now = false;
        let shared = self.shared.get_or_init(|| {
            made_now = true;
            // The set-up's output on lines of its own, not after "test NAME ... ".
            eprintln!();
            let set_up = self.set_up.lock().unwrap().take().expect("made once");
            match std::panic::catch_unwind(AssertUnwindSafe(|| set_up(&self.runtime))) {
                Ok(made) => made.map_err(|e| format!("{e:#}")),
                Err(panic) => Err(panic_message(panic.as_ref())),
            }
        });
        match shared {
            Ok(shared) => Ok(shared),
            Err(e) if made_now => Err(format!("the set-up failed: {e}").into()),
            Err(_) => Err("the set-up failed: see the first case that ran".into()),
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}
