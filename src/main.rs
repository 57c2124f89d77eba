use std::process::ExitCode;

use clap::Parser;
use reaper_operator::cli::{self, Cli, Command, Outcome};
use reaper_operator::telemetry;

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Migrate => cli::migrate(&cli.database).await,
            Command::Lease { command } => cli::lease(&cli.database, command).await,
        }
    });
    match result {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::NotDone) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {}", cli::describe_error(&e));
            ExitCode::from(2)
        }
    }
}
