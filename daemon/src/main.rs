//! The `egpud` binary: flags, logging, signals; everything else is in the library.

use std::io::IsTerminal as _;
use std::process::ExitCode;

use clap::Parser as _;
use tracing_subscriber::EnvFilter;

/// The system allocator, counting: a chat template renderer caps its heap with it (see
/// `egpud::core::templates`); egpud itself runs with no cap.
#[global_allocator]
static ALLOCATOR: cap::Cap<std::alloc::System> = cap::Cap::new(std::alloc::System, usize::MAX);

fn main() -> ExitCode {
    if std::env::args_os().nth(1).as_deref()
        == Some(std::ffi::OsStr::new(egpud::core::templates::RENDERER_ARG))
    {
        return render_chat_templates();
    }
    let config = egpud::Config::parse();
    let filter = EnvFilter::try_from_env("EGPU_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal; logs captured by launchd/journald stay plain.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("egpud: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// A chat template renderer: egpud started by itself, with its heap capped.
fn render_chat_templates() -> ExitCode {
    if ALLOCATOR
        .set_limit(egpud::core::templates::RENDERER_MEMORY)
        .is_err()
    {
        eprintln!("egpud renderer: already past its memory cap at start");
        return ExitCode::FAILURE;
    }
    match egpud::core::templates::serve_renderer() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("egpud renderer: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: egpud::Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = runtime.block_on(egpud::server::run(config, shutdown_signal()));
    // A model load still reading its file must not hold the exit: blocking tasks get a few
    // seconds, then egpud exits anyway (the OS frees what they held).
    runtime.shutdown_timeout(std::time::Duration::from_secs(3));
    result
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot listen for SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
