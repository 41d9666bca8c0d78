//! `egpuctl doctor`: is this machine ready for egpud's tinygrad backend? One line per check,
//! each ok / warn / fail (or skip, when it does not apply here) with what was found and, when
//! not ok, what to do about it.
//!
//! The checks, in order: the platform; the worker's Python (found like egpud finds it,
//! [`egpu_proto::paths::worker_python`]), its version, tinygrad, grpcio and the egpu_worker
//! package; the compiler tinygrad needs for the chosen DEV; on macOS the TinyGPU app, its driver
//! extension and tinygrad's download cache; the device itself (`python -m egpu_worker.probe`
//! opens it and runs a kernel); and whether egpud answers on the socket.
//!
//! The Python-side facts come from one run of `doctor_env.py` with the worker's Python: it asks
//! tinygrad's own library loaders, so the search paths are tinygrad's, not a copy of them.
//! The module is in three parts: [`facts`] gathers everything (it is the only part that runs
//! programs or asks egpud), [`checks`] turns facts into lines (pure, which is what the unit
//! tests exercise), and [`render`] writes them for a person or as JSON.

mod checks;
mod facts;
mod render;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

pub use checks::{checks, dext_state, Check, DextState, Status};
pub use facts::{choose_dev, parse_target, DevChoice, Facts, Host, Os, Target};
pub use render::{render, Report};

use crate::client::EXIT_ERROR;
use crate::format;

/// The tinygrad release egpu's worker is written against (worker/pyproject.toml pins it).
pub const TINYGRAD_VERSION: &str = "0.14.0";
/// The TinyGPU driver extension's bundle id (tinygrad extra/usbgpu/tbgpu/installer, the app
/// that tinygrad 0.14's APLRemotePCIDevice.ensure_app installs).
pub const DEXT_ID: &str = "org.tinygrad.tinygpu.driver2";
/// Where tinygrad 0.14 expects the TinyGPU app (runtime/support/system.py, APLRemotePCIDevice).
pub const TINYGPU_APP: &str = "/Applications/TinyGPU.app/Contents/MacOS/TinyGPU";

#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// The tinygrad device to check, in DEV syntax: PCI+AMD (the eGPU on macOS), PCI+AMD:LLVM,
    /// AMD, NV, CUDA, CPU; `auto` lets tinygrad pick [default: $DEV, else PCI+AMD on macOS,
    /// else auto].
    #[arg(long, value_name = "DEV")]
    pub(super) dev: Option<String>,
    /// The tinygrad worker's Python [default: $EGPU_WORKER_PYTHON, else worker/.venv of the
    /// checkout egpuctl is in, else $XDG_DATA_HOME/egpu/worker/.venv/bin/python].
    #[arg(long, value_name = "PATH")]
    pub(super) worker_python: Option<PathBuf>,
    /// Print JSON: {"checks": [{"name", "status", "detail", "hint"}], "ok", "dev", "device"}.
    #[arg(long)]
    pub(super) json: bool,
    /// Seconds the device check may take (opening an eGPU boots it, the first time with
    /// firmware downloads).
    #[arg(long, value_name = "SECONDS", default_value_t = 180)]
    pub(super) timeout: u64,
}

/// Gathers the facts, checks them, and prints the result; exit status 1 when a check fails.
pub fn run(socket: &Path, args: &DoctorArgs) -> anyhow::Result<ExitCode> {
    let facts = facts::gather(socket, args)?;
    let checks = checks(&facts);
    let ok = !checks.iter().any(|c| c.status == Status::Fail);
    if args.json {
        format::emit_json(&Report {
            ok,
            dev: facts.dev.dev.clone(),
            device: facts.probe.clone().and_then(Result::ok),
            checks,
        })?;
    } else {
        format::emit(&render(&facts, &checks, format::use_color()))?;
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_ERROR)
    })
}
