use std::process::ExitCode;

use clap::Parser;
use reaper_operator::cli::{self, Cli, Command, Outcome};
use reaper_operator::{reaper, telemetry};

/// jemalloc, not glibc's malloc: a replica's heap is many small allocations per Reaper
/// that live for as long as it does, and glibc kept about a fifth of it as free space
/// between them (docs/dependencies.md).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// One arena (a replica runs a handful of threads; more arenas only spread the per-Reaper
/// allocations over more partly used pages) and a background thread that returns freed
/// pages after 5 s even when nothing allocates. `_RJEM_MALLOC_CONF` overrides it.
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: &[u8] =
    b"narenas:1,background_thread:true,dirty_decay_ms:5000,muzzy_decay_ms:0\0";

fn main() -> ExitCode {
    let cli = Cli::try_parse_from(cli::args_with_guard_alias())
        .unwrap_or_else(|error| cli::exit_on_parse_error(error));
    telemetry::init(cli.log_format);
    // Before any runtime thread exists: this process becomes the guarded command.
    if let Command::GuardExec { gate_fd, command } = &cli.command {
        return ExitCode::from(reaper_operator::guard::exec_after_gate(*gate_fd, command));
    }
    // One thread, no runtime: nothing it needs can fail after it says it runs.
    if let Command::GuardWatchdog {
        pgid,
        grace_ms,
        kill_at_ns,
    } = cli.command
    {
        return ExitCode::from(reaper_operator::guard::watchdog(
            pgid,
            std::time::Duration::from_millis(grace_ms),
            std::time::Duration::from_nanos(kill_at_ns),
        ));
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result: anyhow::Result<Outcome> = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => cli::run(&cli.database, &args).await,
            Command::Crdgen => {
                print!("{}", reaper::crd::crd_yaml());
                Ok(Outcome::Done)
            }
            Command::Migrate => cli::migrate(&cli.database).await.map_err(describe),
            Command::Lease { command } => {
                cli::lease(&cli.database, command).await.map_err(describe)
            }
            Command::Guard(args) => cli::guard(&cli.database, args).await,
            Command::InstallGuard { path } => cli::install_guard(&path),
            Command::GuardWatchdog { .. } => unreachable!("handled before the runtime starts"),
            Command::GuardExec { .. } => unreachable!("handled before the runtime starts"),
        }
    });
    match result {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::NotDone) => ExitCode::from(1),
        Ok(Outcome::Exit(code)) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn describe(e: reaper_operator::Error) -> anyhow::Error {
    anyhow::anyhow!(cli::describe_error(&e))
}
