//! `egpuctl`: the command-line client for egpud, plus commands that need no daemon.

use std::process::ExitCode;

use clap::Parser;

mod format;
mod inspect;

#[derive(Debug, Parser)]
#[command(
    name = "egpuctl",
    version,
    about = "Control egpud and inspect model files"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Describe a GGUF model file without loading it (no daemon needed).
    Inspect(inspect::InspectArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect(args) => inspect::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            // One line, no backtrace: the chain of causes joined by ": ".
            eprintln!("egpuctl: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
