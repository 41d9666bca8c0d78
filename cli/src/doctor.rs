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
//! Everything is gathered into [`Facts`] first; [`checks`] turns facts into lines, which is what
//! the unit tests exercise.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use egpu_proto::paths::{worker_python, PythonRule, WorkerPython};
use egpu_proto::v1::StatusRequest;
use serde::Serialize;
use serde_json::Value;

use crate::client::{connect, request, EXIT_ERROR};
use crate::format::{self, bytes_decimal};

/// Asks the worker's Python about itself (see the file's header).
const ENV_SCRIPT: &str = include_str!("doctor_env.py");
/// The tinygrad release egpu's worker is written against (worker/pyproject.toml pins it).
pub const TINYGRAD_VERSION: &str = "0.14.0";
/// The TinyGPU driver extension's bundle id (tinygrad extra/usbgpu/tbgpu/installer, the app
/// that tinygrad 0.14's APLRemotePCIDevice.ensure_app installs).
pub const DEXT_ID: &str = "org.tinygrad.tinygpu.driver2";
/// Where tinygrad 0.14 expects the TinyGPU app (runtime/support/system.py, APLRemotePCIDevice).
pub const TINYGPU_APP: &str = "/Applications/TinyGPU.app/Contents/MacOS/TinyGPU";
/// How long the environment script may take (it imports tinygrad and dlopens libraries).
const ENV_TIMEOUT: Duration = Duration::from_secs(60);
/// How long egpud may take to answer Status.
const EGPUD_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// The tinygrad device to check, in DEV syntax: PCI+AMD (the eGPU on macOS), PCI+AMD:LLVM,
    /// AMD, NV, CUDA, CPU; `auto` lets tinygrad pick [default: $DEV, else PCI+AMD on macOS,
    /// else auto].
    #[arg(long, value_name = "DEV")]
    dev: Option<String>,
    /// The tinygrad worker's Python [default: $EGPU_WORKER_PYTHON, else worker/.venv of the
    /// checkout egpuctl is in, else $XDG_DATA_HOME/egpu/worker/.venv/bin/python].
    #[arg(long, value_name = "PATH")]
    worker_python: Option<PathBuf>,
    /// Print JSON: {"checks": [{"name", "status", "detail", "hint"}], "ok", "dev", "device"}.
    #[arg(long)]
    json: bool,
    /// Seconds the device check may take (opening an eGPU boots it, the first time with
    /// firmware downloads).
    #[arg(long, value_name = "SECONDS", default_value_t = 180)]
    timeout: u64,
}

/// A check's outcome. `skip`: the check does not apply here (another OS, another device).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
    Skip,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    /// What was found, one line.
    pub detail: String,
    /// What to do about it; `None` when the check is ok or skipped.
    pub hint: Option<String>,
}

impl Check {
    fn new(name: &'static str, status: Status, detail: impl Into<String>) -> Check {
        Check {
            name,
            status,
            detail: detail.into(),
            hint: None,
        }
    }
    fn ok(name: &'static str, detail: impl Into<String>) -> Check {
        Check::new(name, Status::Ok, detail)
    }
    fn skip(name: &'static str, detail: impl Into<String>) -> Check {
        Check::new(name, Status::Skip, detail)
    }
    fn warn(name: &'static str, detail: impl Into<String>, hint: impl Into<String>) -> Check {
        Check::new(name, Status::Warn, detail).hint(hint)
    }
    fn fail(name: &'static str, detail: impl Into<String>, hint: impl Into<String>) -> Check {
        Check::new(name, Status::Fail, detail).hint(hint)
    }
    fn hint(mut self, hint: impl Into<String>) -> Check {
        self.hint = Some(hint.into());
        self
    }
}

/// `doctor --json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
    /// No check failed.
    pub ok: bool,
    /// The DEV that was checked; `null` when tinygrad picks.
    pub dev: Option<String>,
    /// The probe's JSON (`python -m egpu_worker.probe`) when it ran.
    pub device: Option<Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Os {
    Macos,
    Linux,
    Other,
}

/// The machine doctor runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub os: Os,
    /// `std::env::consts::ARCH`: `aarch64`, `x86_64`.
    pub arch: String,
    /// `sw_vers -productVersion` on macOS.
    pub macos_version: Option<String>,
}

impl Host {
    fn detect() -> Host {
        let os = match std::env::consts::OS {
            "macos" => Os::Macos,
            "linux" => Os::Linux,
            _ => Os::Other,
        };
        let macos_version = (os == Os::Macos)
            .then(|| run_for(Command::new("sw_vers").arg("-productVersion"), ENV_TIMEOUT).ok())
            .flatten()
            .map(|r| r.stdout.trim().to_owned())
            .filter(|v| !v.is_empty());
        Host {
            os,
            arch: std::env::consts::ARCH.to_owned(),
            macos_version,
        }
    }
}

/// Which DEV is checked and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevChoice {
    /// `None`: tinygrad picks the first device that opens.
    pub dev: Option<String>,
    pub source: &'static str,
}

/// `--dev` > `$DEV` > PCI+AMD on macOS > tinygrad's pick; `auto` (or empty) = tinygrad's pick.
pub fn choose_dev(flag: Option<&str>, env: Option<&str>, macos: bool) -> DevChoice {
    let explicit = |v: &str| {
        let v = v.trim();
        (!v.is_empty() && !v.eq_ignore_ascii_case("auto")).then(|| v.to_owned())
    };
    if let Some(flag) = flag {
        return DevChoice {
            dev: explicit(flag),
            source: "--dev",
        };
    }
    if let Some(env) = env.filter(|v| !v.trim().is_empty()) {
        return DevChoice {
            dev: explicit(env),
            source: "$DEV",
        };
    }
    if macos {
        return DevChoice {
            dev: Some("PCI+AMD".into()),
            source: "the macOS default",
        };
    }
    DevChoice {
        dev: None,
        source: "tinygrad picks",
    }
}

/// The parts of one DEV target that matter here (tinygrad helpers.py `Target.parse`:
/// `[IFACE[:indices]+]DEVICE[:RENDERER[:ARCH]]`; of several targets joined by `;`, the first).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Target {
    pub interface: String,
    pub device: String,
    pub renderer: String,
}

pub fn parse_target(dev: &str) -> Target {
    let first = dev.split(';').next().unwrap_or_default().trim();
    let (interface, rest) = match first.split_once('+') {
        Some((iface, rest)) => (iface.split(':').next().unwrap_or_default(), rest),
        None => ("", first),
    };
    let mut parts = rest.split(':');
    Target {
        interface: interface.to_ascii_uppercase(),
        device: parts.next().unwrap_or_default().to_ascii_uppercase(),
        renderer: parts.next().unwrap_or_default().to_ascii_uppercase(),
    }
}

/// Everything the checks look at, gathered before any line is written.
#[derive(Debug, Clone)]
pub struct Facts {
    pub host: Host,
    pub dev: DevChoice,
    pub python: WorkerPython,
    /// `doctor_env.py`'s JSON, or why it gave none; `None` when the python is missing.
    pub env: Option<Result<Value, String>>,
    /// `systemextensionsctl list`'s output (macOS, when TinyGPU is involved).
    pub dext: Option<Result<String, String>>,
    /// Whether [`TINYGPU_APP`] exists (macOS).
    pub tinygpu_app: bool,
    /// tinygrad's default download folder outside the worker (`~/Library/Caches/tinygrad/downloads`),
    /// where a TinyGPU zip fetched by tinygrad's own setup script lands.
    pub home_downloads: Option<PathBuf>,
    /// The probe's JSON, or why it gave none; `None` when it was not run.
    pub probe: Option<Result<Value, String>>,
    /// Why the probe was not run, when it was not.
    pub probe_skipped: Option<String>,
    /// egpud's Status in one line, or why it did not answer.
    pub egpud: Result<String, String>,
}

impl Facts {
    fn env(&self) -> Option<&Value> {
        self.env.as_ref().and_then(|e| e.as_ref().ok())
    }

    fn target(&self) -> Option<Target> {
        self.dev.dev.as_deref().map(parse_target)
    }

    /// Whether the chosen DEV reaches the GPU through TinyGPU: macOS, AMD or NV, over the PCI
    /// interface (named, or the one tinygrad falls back to on macOS where KFD/NVK do not exist).
    fn uses_tinygpu(&self) -> bool {
        self.host.os == Os::Macos
            && self.target().is_some_and(|t| {
                matches!(t.device.as_str(), "AMD" | "NV")
                    && matches!(t.interface.as_str(), "" | "PCI")
            })
    }

    fn worker_cache(&self) -> Option<&Value> {
        self.env().map(|e| &e["cache"]).filter(|c| c.is_object())
    }

    /// What is missing for tinygrad to open the eGPU without a network: the app, its zip in
    /// the worker's download cache. Empty when nothing is.
    fn tinygpu_missing(&self) -> Vec<String> {
        let mut missing = Vec::new();
        if !self.tinygpu_app {
            missing.push(format!("{TINYGPU_APP} is missing"));
        }
        if let Some(t) = self.worker_cache().map(|c| &c["tinygpu"]) {
            if t["zip_exists"] != Value::Bool(true) {
                missing.push(format!("no {}", str_of(&t["zip"]).unwrap_or("TinyGPU zip")));
            }
        }
        missing
    }
}

fn str_of(v: &Value) -> Option<&str> {
    v.as_str().filter(|s| !s.is_empty())
}

pub fn run(socket: &Path, args: &DoctorArgs) -> anyhow::Result<ExitCode> {
    let host = Host::detect();
    let env_dev = std::env::var("DEV").ok();
    let dev = choose_dev(
        args.dev.as_deref(),
        env_dev.as_deref(),
        host.os == Os::Macos,
    );
    let python = worker_python(args.worker_python.as_deref());
    let egpud = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(egpud_status(socket));
    let mut facts = Facts {
        host,
        dev,
        env: python.exists.then(|| run_env_script(&python.path)),
        python,
        dext: None,
        tinygpu_app: Path::new(TINYGPU_APP).is_file(),
        home_downloads: std::env::var_os("HOME")
            .map(|h| Path::new(&h).join("Library/Caches/tinygrad/downloads")),
        probe: None,
        probe_skipped: None,
        egpud,
    };
    if facts.uses_tinygpu() {
        facts.dext = Some(
            run_for(Command::new("systemextensionsctl").arg("list"), ENV_TIMEOUT)
                .map(|r| r.stdout)
                .map_err(|e| format!("{e:#}")),
        );
    }
    facts.probe_skipped = probe_blocker(&facts);
    if facts.probe_skipped.is_none() {
        facts.probe = Some(run_probe(
            &facts.python.path,
            facts.dev.dev.as_deref(),
            Duration::from_secs(args.timeout),
        ));
    }
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

/// Why the device probe cannot (or should not) run yet; `None` when it can.
fn probe_blocker(f: &Facts) -> Option<String> {
    if !f.python.exists {
        return Some("needs the worker's Python (see worker-python)".into());
    }
    let env = match &f.env {
        Some(Ok(env)) => env,
        _ => return Some("the worker's Python does not run (see worker-python)".into()),
    };
    if env["tinygrad"].is_null() {
        return Some("needs tinygrad (see tinygrad)".into());
    }
    if env["egpu_worker"]["probe"] != Value::Bool(true) {
        return Some("needs the egpu_worker package with its probe (see worker-package)".into());
    }
    // Opening the eGPU without the app or its cached zip makes tinygrad download TinyGPU.app,
    // kill a running TinyGPU and reinstall it: not something a check should set off.
    if f.uses_tinygpu() && !f.tinygpu_missing().is_empty() {
        return Some(
            "not opened: tinygrad would download and reinstall TinyGPU.app (see tinygpu-app and \
             tinygpu-cache)"
                .into(),
        );
    }
    None
}

/// The lines, in order.
pub fn checks(f: &Facts) -> Vec<Check> {
    let mut out = vec![platform(&f.host)];
    out.extend(python_checks(f));
    out.push(compiler(f));
    out.extend(tinygpu_checks(f));
    out.push(device(f));
    out.push(egpud(f));
    out
}

fn platform(host: &Host) -> Check {
    const NAME: &str = "platform";
    match host.os {
        Os::Macos => {
            let version = host.macos_version.as_deref().unwrap_or("(version unknown)");
            let major: Option<u32> = host
                .macos_version
                .as_deref()
                .and_then(|v| v.split('.').next()?.parse().ok());
            if host.arch != "aarch64" {
                return Check::warn(
                    NAME,
                    format!("macOS {version} on {}: not Apple Silicon", host.arch),
                    "egpu's eGPU setup (docs/mac-egpu.md) is written and documented for Apple \
                     Silicon Macs; on this Mac it is untested",
                );
            }
            if major.is_some_and(|m| m < 13) {
                return Check::fail(
                    NAME,
                    format!("macOS {version} on Apple Silicon"),
                    "TinyGPU needs macOS 13 or later (tinygrad docs/tinygpu.md): update macOS",
                );
            }
            Check::ok(NAME, format!("macOS {version} on Apple Silicon (arm64)"))
        }
        Os::Linux => Check::ok(
            NAME,
            format!(
                "Linux on {}: the GPU is DEV=AMD, NV or CUDA; the TinyGPU checks are macOS only",
                host.arch
            ),
        ),
        Os::Other => Check::warn(
            NAME,
            format!("{} on {}", std::env::consts::OS, host.arch),
            "egpu's tinygrad backend is built for macOS (Apple Silicon) and Linux",
        ),
    }
}

const SETUP: &str = "scripts/setup-worker.sh";

fn python_checks(f: &Facts) -> Vec<Check> {
    let py = &f.python;
    let shown = format!("{} (from {})", py.path.display(), py.rule.describe());
    let skip_rest = |why: &str| -> Vec<Check> {
        ["python-version", "tinygrad", "grpcio", "worker-package"]
            .into_iter()
            .map(|name| Check::skip(name, why))
            .collect()
    };
    if !py.exists {
        let hint = match py.rule {
            PythonRule::Explicit => format!(
                "pass the path of an existing interpreter; {SETUP} creates \
                 <clone>/worker/.venv/bin/python"
            ),
            PythonRule::Env => format!(
                "fix or unset EGPU_WORKER_PYTHON; {SETUP} creates <clone>/worker/.venv/bin/python"
            ),
            PythonRule::Checkout => format!(
                "run {SETUP} in {}",
                py.checkout.as_deref().unwrap_or(Path::new(".")).display()
            ),
            PythonRule::DataHome => format!(
                "run {SETUP} in an egpu clone, then set EGPU_WORKER_PYTHON=<clone>/worker/.venv/bin/python \
                 (or pass --worker-python), or create a venv with egpu's worker at {}",
                py.path.display()
            ),
        };
        let mut out = vec![Check::fail(
            "worker-python",
            format!("{shown} does not exist"),
            hint,
        )];
        out.extend(skip_rest("needs the worker's Python"));
        return out;
    }
    let env = match &f.env {
        Some(Ok(env)) => env,
        other => {
            let why = match other {
                Some(Err(e)) => e.as_str(),
                _ => "not run",
            };
            let mut out = vec![Check::fail(
                "worker-python",
                format!("{shown} does not run: {why}"),
                format!("recreate the environment: {SETUP} (it rebuilds worker/.venv)"),
            )];
            out.extend(skip_rest("needs a working worker Python"));
            return out;
        }
    };
    let mut out = vec![Check::ok("worker-python", shown)];
    let version = str_of(&env["python_version"]).unwrap_or("?");
    out.push(if env["python_ok"] == Value::Bool(true) {
        Check::ok("python-version", format!("Python {version}"))
    } else {
        Check::fail(
            "python-version",
            format!("Python {version}; tinygrad {TINYGRAD_VERSION} needs 3.11 or later"),
            format!(
                "make the venv with a newer Python: PYTHON=python3.12 {SETUP} (macOS: brew install \
                 python@3.12)"
            ),
        )
    });
    out.push(match str_of(&env["tinygrad"]) {
        Some(TINYGRAD_VERSION) => Check::ok("tinygrad", format!("tinygrad {TINYGRAD_VERSION}")),
        Some(other) => Check::fail(
            "tinygrad",
            format!("tinygrad {other}; egpu's worker is written for {TINYGRAD_VERSION}"),
            format!("{SETUP} (reinstalls from worker/pyproject.toml), or pip install tinygrad=={TINYGRAD_VERSION}"),
        ),
        None => Check::fail(
            "tinygrad",
            format!(
                "not importable: {}",
                str_of(&env["tinygrad_error"]).unwrap_or("?")
            ),
            format!("{SETUP}, or pip install tinygrad=={TINYGRAD_VERSION} in that environment"),
        ),
    });
    out.push(match str_of(&env["grpcio"]) {
        Some(v) => Check::ok("grpcio", format!("grpcio {v}")),
        None => Check::fail(
            "grpcio",
            format!(
                "not importable: {}",
                str_of(&env["grpcio_error"]).unwrap_or("?")
            ),
            format!("{SETUP} (installs worker/pyproject.toml's grpcio)"),
        ),
    });
    let worker = &env["egpu_worker"];
    out.push(match (str_of(&worker["path"]), worker["probe"].as_bool()) {
        (Some(path), Some(true)) => Check::ok("worker-package", format!("egpu_worker from {path}")),
        (Some(path), _) => Check::fail(
            "worker-package",
            format!("egpu_worker at {path} has no probe module (an older egpu)"),
            format!("reinstall it from this egpu: {SETUP}, or pip install -e <clone>/worker"),
        ),
        (None, _) => Check::fail(
            "worker-package",
            format!(
                "egpu_worker is not importable: {}",
                str_of(&env["egpu_worker_error"]).unwrap_or("?")
            ),
            format!("{SETUP} installs it (pip install -e <clone>/worker)"),
        ),
    });
    out
}

fn compiler(f: &Facts) -> Check {
    const NAME: &str = "compiler";
    let Some(env) = f.env().filter(|e| !e["tinygrad"].is_null()) else {
        return Check::skip(NAME, "needs tinygrad in the worker's Python");
    };
    // With DEV unset, the device the probe opened tells which compiler matters.
    let target = f.target().or_else(|| {
        let probed = f.probe.as_ref()?.as_ref().ok()?;
        Some(parse_target(probed["device"].as_str()?))
    });
    let Some(target) = target else {
        return Check::skip(
            NAME,
            "DEV is not set and no device opened: nothing to tell which compiler matters",
        );
    };
    let lib = |name: &str| str_of(&env["libraries"][name]["path"]).map(str::to_owned);
    let macos = f.host.os == Os::Macos;
    let cc_hint = if macos {
        "install Apple's command line tools: xcode-select --install (or set CC to a clang)"
    } else {
        "install clang (Debian/Ubuntu: apt-get install clang), or set CC to a clang"
    };
    let comgr_hint = if macos {
        "comgr: put libamd_comgr.dylib in /opt/homebrew/lib (tinygrad's extra/setup_hipcomgr_osx.sh \
         fetches it from github.com/tinygrad/amdcomgr_dylib releases) or set COMGR_PATH to it"
    } else {
        "comgr: install ROCm's comgr (tinygrad loads $ROCM_PATH/lib/libamd_comgr.so, default \
         /opt/rocm) or set COMGR_PATH to the library"
    };
    let llvm_hint = if macos {
        "LLVM: install LLVM 14 to 21 with Homebrew (tinygrad loads \
         /opt/homebrew/opt/llvm@{14..21}/lib/libLLVM.dylib, e.g. brew install llvm@21) or set \
         LLVM_PATH to a libLLVM.dylib, and use DEV=PCI+AMD:LLVM"
    } else {
        "LLVM: install libLLVM 14 to 21 (e.g. apt-get install libllvm15) or set LLVM_PATH, and use \
         DEV=AMD:LLVM"
    };
    match target.device.as_str() {
        "CPU" => {
            let programs = &env["programs"];
            let cc = str_of(&programs["cc"]).unwrap_or("clang");
            let Some(cc_path) = str_of(&programs["cc_path"]) else {
                return Check::fail(
                    NAME,
                    format!("DEV=CPU compiles with {cc}, which is not on the worker's PATH"),
                    cc_hint,
                );
            };
            if target.renderer == "LLVM" && lib("llvm").is_none() {
                return Check::fail(
                    NAME,
                    format!("{cc}: {cc_path}, but CPU:LLVM needs libLLVM, not found"),
                    "install libLLVM 14 to 21 or set LLVM_PATH; or use DEV=CPU",
                );
            }
            Check::ok(NAME, format!("{cc}: {cc_path}"))
        }
        "AMD" => {
            let (comgr, llvm) = (lib("comgr"), lib("llvm"));
            match target.renderer.as_str() {
                "" => match (comgr, llvm) {
                    (Some(c), _) => Check::ok(NAME, format!("comgr: {c} (tinygrad's first choice for AMD)")),
                    (None, Some(l)) => Check::ok(
                        NAME,
                        format!("LLVM: {l} (no comgr; tinygrad falls back to its LLVM renderer)"),
                    ),
                    (None, None) => Check::fail(
                        NAME,
                        "neither comgr (libamd_comgr) nor libLLVM found: AMD kernels cannot be compiled",
                        format!("{comgr_hint}; or {llvm_hint}"),
                    ),
                },
                "HIP" => comgr.map_or_else(
                    || Check::fail(NAME, "AMD:HIP needs comgr (libamd_comgr), not found", comgr_hint),
                    |c| Check::ok(NAME, format!("comgr: {c}")),
                ),
                "LLVM" => llvm.map_or_else(
                    || Check::fail(NAME, "AMD:LLVM needs libLLVM, not found", llvm_hint),
                    |l| Check::ok(NAME, format!("LLVM: {l}")),
                ),
                "HIPCC" => str_of(&env["programs"]["hipcc_path"]).map_or_else(
                    || Check::fail(NAME, "AMD:HIPCC needs hipcc on PATH, not found", "install ROCm's hipcc, or use DEV=AMD (comgr) or AMD:LLVM"),
                    |p| Check::ok(NAME, format!("hipcc: {p}")),
                ),
                other => Check::warn(
                    NAME,
                    format!("AMD renderer {other:?} is not one doctor knows"),
                    "tinygrad 0.14's AMD renderers are HIP (comgr), LLVM and HIPCC",
                ),
            }
        }
        "NV" | "CUDA" if macos => Check::warn(
            NAME,
            format!("DEV={} on macOS: not checked", target.device),
            "tinygrad 0.14 compiles NVIDIA kernels on macOS in a Docker container; see tinygrad's docs/tinygpu.md",
        ),
        device @ ("NV" | "CUDA") => {
            let needs_ptx = target.renderer == "PTX";
            let (lib_name, what) = if needs_ptx {
                ("nvjitlink", "libnvJitLink")
            } else {
                ("nvrtc", "libnvrtc")
            };
            let mut missing = Vec::new();
            if lib(lib_name).is_none() {
                missing.push(what);
            }
            if device == "CUDA" && lib("cuda").is_none() {
                missing.push("libcuda");
            }
            if missing.is_empty() {
                let mut found = vec![format!("{what}: {}", lib(lib_name).unwrap_or_default())];
                if device == "CUDA" {
                    found.push(format!("libcuda: {}", lib("cuda").unwrap_or_default()));
                }
                Check::ok(NAME, found.join(", "))
            } else {
                Check::fail(
                    NAME,
                    format!("DEV={device} needs {}: not found", missing.join(" and ")),
                    "install the NVIDIA driver (libcuda) and the CUDA toolkit's NVRTC / nvJitLink, or set \
                     NVRTC_PATH / NVJITLINK_PATH / CUDA_PATH to the libraries",
                )
            }
        }
        "METAL" => Check::ok(NAME, "Metal compiles kernels through macOS itself"),
        "PYTHON" | "NULL" => Check::ok(NAME, format!("DEV={} needs no compiler", target.device)),
        other => Check::warn(
            NAME,
            format!("no compiler check for DEV device {other:?}"),
            "doctor knows CPU, AMD, NV, CUDA, METAL and PYTHON",
        ),
    }
}

/// The command that fetches TinyGPU.app into the worker's cache and installs it, as tinygrad
/// does on the first open (needs the network once).
fn ensure_app_command(f: &Facts) -> String {
    format!(
        "{} -c 'from egpu_worker.env import default_cache_env; default_cache_env(); from \
         tinygrad.runtime.support.system import APLRemotePCIDevice as A; A.ensure_app()'",
        f.python.path.display()
    )
}

fn tinygpu_checks(f: &Facts) -> Vec<Check> {
    const NAMES: [&str; 3] = ["tinygpu-app", "driver-extension", "tinygpu-cache"];
    if f.host.os != Os::Macos {
        return NAMES
            .into_iter()
            .map(|n| Check::skip(n, "macOS only"))
            .collect();
    }
    if !f.uses_tinygpu() {
        let dev = f.dev.dev.as_deref().unwrap_or("auto");
        return NAMES
            .into_iter()
            .map(|n| {
                Check::skip(
                    n,
                    format!("macOS only, for DEV=PCI+AMD or PCI+NV (DEV={dev})"),
                )
            })
            .collect();
    }
    let app = if f.tinygpu_app {
        Check::ok("tinygpu-app", TINYGPU_APP)
    } else {
        Check::fail(
            "tinygpu-app",
            format!("{TINYGPU_APP} is missing"),
            format!(
                "with the eGPU connected and the network up, run {} (it downloads TinyGPU.app \
                 into /Applications and asks macOS to install its driver extension)",
                ensure_app_command(f)
            ),
        )
    };
    let approve = "approve it: System Settings > General > Login Items & Extensions > Driver \
                   Extensions > TinyGPU on (or Privacy & Security > Allow)";
    let dext = match &f.dext {
        None => Check::skip("driver-extension", "not checked"),
        Some(Err(e)) => Check::warn(
            "driver-extension",
            format!("systemextensionsctl list did not run: {e}"),
            format!("check by hand: systemextensionsctl list | grep {DEXT_ID}"),
        ),
        Some(Ok(list)) => match dext_state(list) {
            DextState::Enabled => Check::ok(
                "driver-extension",
                format!("{DEXT_ID} activated and enabled"),
            ),
            DextState::WaitingForUser => Check::fail(
                "driver-extension",
                format!("{DEXT_ID} is waiting for your approval"),
                approve,
            ),
            DextState::Activating(state) => Check::warn(
                "driver-extension",
                format!("{DEXT_ID} is {state}"),
                format!("wait a moment and run doctor again; if it stays so, {approve}"),
            ),
            DextState::Uninstalling => Check::fail(
                "driver-extension",
                format!("{DEXT_ID} is being uninstalled"),
                format!("reinstall it: {TINYGPU_APP} install, then {approve}"),
            ),
            DextState::Missing => Check::fail(
                "driver-extension",
                format!("{DEXT_ID} is not installed"),
                format!("run {TINYGPU_APP} install, then {approve}"),
            ),
        },
    };
    vec![app, dext, tinygpu_cache(f)]
}

fn tinygpu_cache(f: &Facts) -> Check {
    const NAME: &str = "tinygpu-cache";
    let Some(cache) = f.worker_cache() else {
        return Check::skip(NAME, "needs tinygrad in the worker's Python");
    };
    let downloads = str_of(&cache["downloads_dir"]).unwrap_or("?");
    let tinygpu = &cache["tinygpu"];
    let mut problems = Vec::new();
    let mut hints = Vec::new();
    if tinygpu["zip_exists"] != Value::Bool(true) {
        let zip = str_of(&tinygpu["zip"]);
        problems.push(format!(
            "no {}: tinygrad downloads TinyGPU.app again (and reinstalls it, killing a running \
             TinyGPU) the first time the worker opens the eGPU",
            zip.unwrap_or("TinyGPU zip (its pinned commit was not found in tinygrad's source)")
        ));
        let name = zip.and_then(|z| Path::new(z).file_name()).map(Path::new);
        match (name, &f.home_downloads) {
            (Some(name), Some(home)) if home.join(name).is_file() => hints.push(format!(
                "copy tinygrad's own download: cp {} {downloads}/",
                home.join(name).display()
            )),
            _ => hints.push(format!(
                "run once with the network up: {}",
                ensure_app_command(f)
            )),
        }
    }
    if cache["firmware_files"].as_u64().unwrap_or(0) == 0 {
        problems.push(format!(
            "no AMD firmware in {}: tinygrad fetches it from gitlab.com (linux-firmware) on the \
             first open",
            str_of(&cache["firmware_dir"]).unwrap_or("?")
        ));
        hints.push("open the device once with the network up (egpuctl doctor does, once the lines above are ok)".into());
    }
    if problems.is_empty() {
        return Check::ok(
            NAME,
            format!(
                "TinyGPU zip and {} firmware file(s) in {downloads}: opening the eGPU needs no network",
                cache["firmware_files"]
            ),
        );
    }
    Check::warn(NAME, problems.join("; "), hints.join("; "))
}

/// The TinyGPU driver extension's state in `systemextensionsctl list` (the states tinygrad's
/// TinyGPU app itself looks for: extra/usbgpu/tbgpu/installer/Shared/TinyGPUCLIRunner.swift).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DextState {
    Enabled,
    WaitingForUser,
    Uninstalling,
    /// Listed in another state (the bracketed text).
    Activating(String),
    Missing,
}

pub fn dext_state(list: &str) -> DextState {
    let Some(line) = list.lines().find(|l| l.contains(DEXT_ID)) else {
        return DextState::Missing;
    };
    if line.contains("[activated enabled]") {
        DextState::Enabled
    } else if line.contains("[activated waiting for user]") {
        DextState::WaitingForUser
    } else if line.contains("terminated waiting to uninstall") {
        DextState::Uninstalling
    } else {
        let state = line
            .rsplit_once('[')
            .map(|(_, s)| s.trim_end().trim_end_matches(']').to_owned())
            .unwrap_or_else(|| "in an unknown state".into());
        DextState::Activating(state)
    }
}

fn device(f: &Facts) -> Check {
    const NAME: &str = "device";
    let dev = f.dev.dev.as_deref().unwrap_or("auto");
    let Some(probe) = &f.probe else {
        return Check::skip(
            NAME,
            format!(
                "DEV={dev}: {}",
                f.probe_skipped.as_deref().unwrap_or("not run")
            ),
        );
    };
    let egpud_note = if f.egpud.is_ok() {
        "; egpud is running and may hold the device: stop it and run doctor again"
    } else {
        ""
    };
    let info = match probe {
        Ok(info) => info,
        Err(e) => {
            return Check::fail(
                NAME,
                format!("DEV={dev}: {e}"),
                format!(
                    "run the probe by hand to see tinygrad's output: DEBUG=2 {} -m egpu_worker.probe --dev {dev}{egpud_note}",
                    f.python.path.display()
                ),
            )
        }
    };
    if info["ok"] != Value::Bool(true) {
        let error = str_of(&info["error"]).unwrap_or("the probe failed without saying why");
        return Check::fail(
            NAME,
            format!("DEV={dev}: {error}"),
            format!("{}{egpud_note}", device_hint(f, error, dev)),
        );
    }
    let mut parts = vec![str_of(&info["device"]).unwrap_or("?").to_owned()];
    if let Some(name) = str_of(&info["name"]) {
        parts[0].push_str(&format!(" ({name})"));
    }
    if let Some(arch) = str_of(&info["arch"]) {
        parts.push(arch.to_owned());
    }
    if let Some(iface) = str_of(&info["interface"]) {
        parts.push(format!("via {iface}"));
    }
    if let Some(renderer) = str_of(&info["renderer"]) {
        parts.push(renderer.to_owned());
    }
    match (
        info["memory_total_bytes"].as_u64(),
        info["memory_free_bytes"].as_u64(),
    ) {
        (Some(total), Some(free)) => parts.push(format!(
            "{} memory, {} free",
            bytes_decimal(total),
            bytes_decimal(free)
        )),
        (Some(total), None) => parts.push(format!("{} memory", bytes_decimal(total))),
        _ => parts.push("memory size unknown".into()),
    }
    let kernel = &info["kernel"];
    if kernel["ok"] == Value::Bool(true) {
        parts.push(format!(
            "test kernel ok in {:.2} s",
            kernel["seconds"].as_f64().unwrap_or(0.0)
        ));
    }
    Check::ok(NAME, format!("DEV={dev}: {}", parts.join(", ")))
}

/// What to do about a device that did not open, from tinygrad's error text.
fn device_hint(f: &Facts, error: &str, dev: &str) -> String {
    let lower = error.to_ascii_lowercase();
    if lower.contains("'clang'") || lower.contains("no such file or directory: 'cc'") {
        return "install clang: apt-get install clang (Linux) or xcode-select --install (macOS)"
            .into();
    }
    if lower.contains("tinygpu") {
        return format!(
            "tinygrad could not reach TinyGPU's server: check the tinygpu-app and driver-extension \
             lines, or start it by hand: {TINYGPU_APP} server $TMPDIR/tinygpu.sock"
        );
    }
    if lower.contains("0 devices available") || lower.contains("no usable devices") {
        return if f.host.os == Os::Macos {
            "no GPU found: is the enclosure powered and its Thunderbolt/USB4 cable in? \
             (system_profiler SPThunderboltDataType lists it)"
                .into()
        } else {
            "no GPU found: check lspci, the driver (amdgpu, nvidia) and that you may open \
             /dev/kfd, /dev/dri/renderD* or /dev/nvidia* (the render/video groups)"
                .into()
        };
    }
    if lower.contains("comgr") || lower.contains("llvm") || lower.contains("nvrtc") {
        return "a compiler library is missing: see the compiler line".into();
    }
    if lower.contains("lock") || lower.contains("resource temporarily unavailable") {
        return "another process holds the GPU (egpud's worker?): stop it and run doctor again"
            .into();
    }
    format!(
        "run the probe by hand to see tinygrad's own output: DEBUG=2 {} -m egpu_worker.probe --dev {dev}",
        f.python.path.display()
    )
}

fn egpud(f: &Facts) -> Check {
    match &f.egpud {
        Ok(detail) => Check::ok("egpud", detail.clone()),
        Err(why) => Check::warn(
            "egpud",
            why.clone(),
            "start it: egpud --backend tinygrad (with DEV set), or as a service: egpuctl service install \
             --env DEV=PCI+AMD --backend tinygrad",
        ),
    }
}

async fn egpud_status(socket: &Path) -> Result<String, String> {
    let answer = tokio::time::timeout(EGPUD_TIMEOUT, async {
        let mut client = connect(socket).await?;
        let status = client.status(request(StatusRequest {})).await?.into_inner();
        anyhow::Ok(status)
    })
    .await;
    match answer {
        Ok(Ok(s)) => {
            let device = s.device.unwrap_or_default();
            Ok(format!(
                "egpud {} answers on {}: {} ({}), up {}",
                s.version,
                socket.display(),
                device.name,
                device.kind,
                format::uptime(s.uptime_seconds)
            ))
        }
        Ok(Err(e)) => Err(crate::client::describe(&e)
            .0
            .trim_start_matches("egpuctl: ")
            .to_owned()),
        Err(_) => Err(format!(
            "egpud does not answer on {} within {} s",
            socket.display(),
            EGPUD_TIMEOUT.as_secs()
        )),
    }
}

/// Human output: a header, one line per check (plus an indented `fix:` line when not ok), and
/// a summary.
pub fn render(f: &Facts, checks: &[Check], color: bool) -> String {
    let paint = |code: &str, text: &str| {
        if color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    };
    let dev = match &f.dev.dev {
        Some(dev) => format!("DEV={dev} ({})", f.dev.source),
        None => format!("DEV unset ({})", f.dev.source),
    };
    let mut out = format!(
        "egpuctl doctor: {dev}, worker python {}\n",
        f.python.path.display()
    );
    let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    for c in checks {
        let (word, code) = match c.status {
            Status::Ok => ("ok", "32"),
            Status::Warn => ("warn", "33"),
            Status::Fail => ("FAIL", "1;31"),
            Status::Skip => ("skip", "2"),
        };
        out.push_str(&format!(
            "{}  {:width$}  {}\n",
            paint(code, &format!("{word:4}")),
            c.name,
            c.detail
        ));
        if let Some(hint) = &c.hint {
            out.push_str(&format!("{:4}  {:width$}  fix: {hint}\n", "", ""));
        }
    }
    let count = |s: Status| checks.iter().filter(|c| c.status == s).count();
    let (failed, warned) = (count(Status::Fail), count(Status::Warn));
    out.push_str(&match (failed, warned) {
        (0, 0) => "no problems found\n".to_owned(),
        (0, w) => format!("no failures, {w} warning(s)\n"),
        (n, w) => format!("{n} failed, {w} warning(s)\n"),
    });
    out
}

/// What a child process did.
#[derive(Debug)]
struct Ran {
    /// `None`: killed at the timeout, or ended by a signal.
    code: Option<i32>,
    timed_out: bool,
    stdout: String,
    stderr: String,
}

/// Runs a command with stdin closed, reading its output as it comes, for at most `timeout`.
fn run_for(cmd: &mut Command, timeout: Duration) -> anyhow::Result<Ran> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot run {program}: {e}"))?;
    let reader = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            String::from_utf8_lossy(&bytes).into_owned()
        })
    };
    let stdout = reader(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = reader(child.stderr.take().map(|p| Box::new(p) as _));
    let started = Instant::now();
    let (status, timed_out) = loop {
        if let Some(status) = child.try_wait()? {
            break (Some(status), false);
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break (None, true);
        }
        std::thread::sleep(Duration::from_millis(25));
    };
    Ok(Ran {
        code: status.and_then(|s| s.code()),
        timed_out,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// The last line of `text` that parses as a JSON object.
fn last_json_line(text: &str) -> Option<Value> {
    text.lines()
        .rev()
        .map(str::trim)
        .filter(|l| l.starts_with('{'))
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(Value::is_object)
}

/// The last non-empty line of stderr, for messages.
fn last_line(text: &str) -> &str {
    text.lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("no output")
}

/// Runs a Python command and reads the JSON it prints last.
fn python_json(cmd: &mut Command, timeout: Duration) -> Result<Value, String> {
    let ran = run_for(cmd, timeout).map_err(|e| format!("{e:#}"))?;
    if ran.timed_out {
        return Err(format!("no answer within {} s (killed)", timeout.as_secs()));
    }
    last_json_line(&ran.stdout).ok_or_else(|| {
        format!(
            "exit status {}: {}",
            ran.code.map_or_else(|| "signal".into(), |c| c.to_string()),
            last_line(&ran.stderr)
        )
    })
}

fn run_env_script(python: &Path) -> Result<Value, String> {
    python_json(Command::new(python).arg("-c").arg(ENV_SCRIPT), ENV_TIMEOUT)
}

fn run_probe(python: &Path, dev: Option<&str>, timeout: Duration) -> Result<Value, String> {
    python_json(
        Command::new(python)
            .args(["-m", "egpu_worker.probe", "--dev"])
            .arg(dev.unwrap_or("auto")),
        timeout,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn linux() -> Host {
        Host {
            os: Os::Linux,
            arch: "x86_64".into(),
            macos_version: None,
        }
    }

    fn mac() -> Host {
        Host {
            os: Os::Macos,
            arch: "aarch64".into(),
            macos_version: Some("14.5".into()),
        }
    }

    fn python(exists: bool) -> WorkerPython {
        WorkerPython {
            path: "/src/egpu/worker/.venv/bin/python".into(),
            rule: PythonRule::Checkout,
            exists,
            checkout: Some("/src/egpu".into()),
        }
    }

    fn env_json() -> Value {
        json!({
            "python_version": "3.11.7", "python_ok": true,
            "egpu_worker": {"path": "/src/egpu/worker/egpu_worker", "probe": true},
            "tinygrad": "0.14.0", "grpcio": "1.85.1",
            "libraries": {
                "comgr": {"path": null, "error": "try setting COMGR_PATH?"},
                "llvm": {"path": "/lib/libLLVM-15.so", "error": null},
                "nvrtc": {"path": null}, "nvjitlink": {"path": null}, "cuda": {"path": null}
            },
            "programs": {"cc": "clang", "cc_path": "/usr/bin/clang", "hipcc_path": null},
            "cache": {"cache_dir": "/w/.cache/tinygrad", "downloads_dir": "/w/.cache/tinygrad/downloads",
                      "firmware_dir": "/w/.cache/tinygrad/downloads/fw", "firmware_files": 0}
        })
    }

    fn cpu_probe() -> Value {
        json!({"dev": "CPU", "device": "CPU", "arch": "x86_64", "interface": "", "renderer": "ClangRenderer",
               "name": "AMD EPYC", "memory_total_bytes": 25_000_000_000u64, "memory_free_bytes": 20_000_000_000u64,
               "kernel": {"ok": true, "result": 136, "expected": 136, "seconds": 0.5}, "ok": true, "error": null})
    }

    fn facts(host: Host, dev: Option<&str>) -> Facts {
        Facts {
            host,
            dev: DevChoice {
                dev: dev.map(str::to_owned),
                source: "--dev",
            },
            python: python(true),
            env: Some(Ok(env_json())),
            dext: None,
            tinygpu_app: false,
            home_downloads: None,
            probe: Some(Ok(cpu_probe())),
            probe_skipped: None,
            egpud: Err("egpud is not running: no socket at /tmp/x.sock".into()),
        }
    }

    fn find<'a>(checks: &'a [Check], name: &str) -> &'a Check {
        checks
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no {name} in {checks:?}"))
    }

    #[test]
    fn dev_order_and_auto() {
        assert_eq!(
            choose_dev(Some("CPU"), Some("CUDA"), true),
            DevChoice {
                dev: Some("CPU".into()),
                source: "--dev"
            }
        );
        assert_eq!(choose_dev(Some("auto"), Some("CUDA"), true).dev, None);
        assert_eq!(choose_dev(None, Some("CUDA"), true).source, "$DEV");
        assert_eq!(
            choose_dev(None, Some(" "), true).dev.as_deref(),
            Some("PCI+AMD")
        );
        assert_eq!(
            choose_dev(None, None, false),
            DevChoice {
                dev: None,
                source: "tinygrad picks"
            }
        );
    }

    #[test]
    fn targets_parse_like_tinygrad() {
        let t = |iface: &str, device: &str, renderer: &str| Target {
            interface: iface.into(),
            device: device.into(),
            renderer: renderer.into(),
        };
        assert_eq!(parse_target("PCI+AMD"), t("PCI", "AMD", ""));
        assert_eq!(parse_target("pci+amd:llvm"), t("PCI", "AMD", "LLVM"));
        assert_eq!(
            parse_target("PCI:1+AMD:LLVM:gfx1100"),
            t("PCI", "AMD", "LLVM")
        );
        assert_eq!(parse_target("CUDA:PTX;CPU"), t("", "CUDA", "PTX"));
        assert_eq!(parse_target("CPU"), t("", "CPU", ""));
    }

    #[test]
    fn a_healthy_linux_cpu_setup_has_no_failures() {
        let f = facts(linux(), Some("CPU"));
        let checks = checks(&f);
        let names: Vec<&str> = checks.iter().map(|c| c.name).collect();
        assert_eq!(
            names,
            [
                "platform",
                "worker-python",
                "python-version",
                "tinygrad",
                "grpcio",
                "worker-package",
                "compiler",
                "tinygpu-app",
                "driver-extension",
                "tinygpu-cache",
                "device",
                "egpud"
            ]
        );
        assert!(
            checks.iter().all(|c| c.status != Status::Fail),
            "{checks:#?}"
        );
        assert_eq!(find(&checks, "compiler").detail, "clang: /usr/bin/clang");
        assert_eq!(find(&checks, "tinygpu-app").status, Status::Skip);
        assert_eq!(find(&checks, "tinygpu-app").detail, "macOS only");
        let device = find(&checks, "device");
        assert_eq!(device.status, Status::Ok);
        assert!(
            device.detail.starts_with(
                "DEV=CPU: CPU (AMD EPYC), x86_64, ClangRenderer, 25.0 GB memory, 20.0 GB free"
            ),
            "{}",
            device.detail
        );
        let egpud = find(&checks, "egpud");
        assert_eq!(egpud.status, Status::Warn);
        assert!(egpud
            .hint
            .as_deref()
            .unwrap()
            .contains("egpud --backend tinygrad"));
        assert!(checks
            .iter()
            .all(|c| (c.status == Status::Ok || c.status == Status::Skip) == c.hint.is_none()));
    }

    #[test]
    fn a_missing_python_fails_with_a_hint_and_skips_what_needs_it() {
        let mut f = facts(linux(), Some("CPU"));
        f.python = python(false);
        f.env = None;
        f.probe = None;
        f.probe_skipped = probe_blocker(&f);
        let checks = checks(&f);
        let py = find(&checks, "worker-python");
        assert_eq!(py.status, Status::Fail);
        assert!(py.detail.ends_with("does not exist"), "{}", py.detail);
        assert_eq!(
            py.hint.as_deref(),
            Some("run scripts/setup-worker.sh in /src/egpu")
        );
        for name in [
            "python-version",
            "tinygrad",
            "grpcio",
            "worker-package",
            "compiler",
            "device",
        ] {
            assert_eq!(find(&checks, name).status, Status::Skip, "{name}");
        }

        f.python.rule = PythonRule::Explicit;
        let hint = find(&checks_of(&f), "worker-python").hint.clone().unwrap();
        assert!(hint.contains("setup-worker.sh"), "{hint}");
    }

    fn checks_of(f: &Facts) -> Vec<Check> {
        checks(f)
    }

    #[test]
    fn wrong_versions_fail() {
        let mut f = facts(linux(), Some("CPU"));
        let env = f.env.as_mut().unwrap().as_mut().unwrap();
        env["python_version"] = json!("3.10.4");
        env["python_ok"] = json!(false);
        env["tinygrad"] = json!("0.13.0");
        env["grpcio"] = json!(null);
        env["grpcio_error"] = json!("ModuleNotFoundError: No module named 'grpc'");
        let checks = checks(&f);
        for name in ["python-version", "tinygrad", "grpcio"] {
            let c = find(&checks, name);
            assert_eq!(c.status, Status::Fail, "{name}");
            assert!(c.hint.is_some());
        }
        assert!(find(&checks, "grpcio")
            .detail
            .contains("No module named 'grpc'"));
    }

    #[test]
    fn amd_compilers() {
        let mut f = facts(linux(), Some("AMD"));
        let c = compiler(&f);
        assert_eq!(
            (c.status, c.detail.as_str()),
            (
                Status::Ok,
                "LLVM: /lib/libLLVM-15.so (no comgr; tinygrad falls back to its LLVM renderer)"
            )
        );
        f.dev.dev = Some("AMD:HIP".into());
        assert_eq!(compiler(&f).status, Status::Fail);
        f.dev.dev = Some("PCI+AMD:LLVM".into());
        assert_eq!(compiler(&f).detail, "LLVM: /lib/libLLVM-15.so");
        let env = f.env.as_mut().unwrap().as_mut().unwrap();
        env["libraries"]["llvm"]["path"] = json!(null);
        let c = compiler(&f);
        assert_eq!(c.status, Status::Fail);
        assert!(c.hint.unwrap().contains("LLVM_PATH"));
        f.dev.dev = Some("PCI+AMD".into());
        f.host = mac();
        let c = compiler(&f);
        assert_eq!(c.status, Status::Fail);
        let hint = c.hint.unwrap();
        assert!(
            hint.contains("/opt/homebrew/lib") && hint.contains("llvm@21"),
            "{hint}"
        );
    }

    #[test]
    fn cuda_needs_nvrtc_and_libcuda() {
        let mut f = facts(linux(), Some("CUDA"));
        let c = compiler(&f);
        assert_eq!(c.status, Status::Fail);
        assert_eq!(c.detail, "DEV=CUDA needs libnvrtc and libcuda: not found");
        let env = f.env.as_mut().unwrap().as_mut().unwrap();
        env["libraries"]["nvrtc"]["path"] = json!("/usr/lib/libnvrtc.so.12");
        env["libraries"]["cuda"]["path"] = json!("/usr/lib/libcuda.so.1");
        assert_eq!(
            compiler(&f).detail,
            "libnvrtc: /usr/lib/libnvrtc.so.12, libcuda: /usr/lib/libcuda.so.1"
        );
    }

    #[test]
    fn without_dev_the_opened_device_chooses_the_compiler_check() {
        let mut f = facts(linux(), None);
        assert_eq!(compiler(&f).detail, "clang: /usr/bin/clang");
        f.probe = None;
        assert_eq!(compiler(&f).status, Status::Skip);
    }

    #[test]
    fn dext_states() {
        // The layout of `systemextensionsctl list` (tab-separated columns, the state in brackets
        // last); written for this test, not captured from a Mac.
        let list = |state: &str| {
            format!(
                "1 extension(s)\n--- com.apple.system_extension.driver_extension\n\
                 enabled\tactive\tteamID\tbundleID (version)\tname\t[state]\n\
                 *\t*\tABCDE12345\t{DEXT_ID} (1.0/1)\tTinyGPU\t[{state}]\n"
            )
        };
        assert_eq!(dext_state(&list("activated enabled")), DextState::Enabled);
        assert_eq!(
            dext_state(&list("activated waiting for user")),
            DextState::WaitingForUser
        );
        assert_eq!(
            dext_state(&list("terminated waiting to uninstall on reboot")),
            DextState::Uninstalling
        );
        assert_eq!(
            dext_state(&list("activated waiting to upgrade")),
            DextState::Activating("activated waiting to upgrade".into())
        );
        assert_eq!(dext_state("0 extension(s)\n"), DextState::Missing);
    }

    #[test]
    fn macos_tinygpu_lines_and_the_probe_is_not_run_without_the_app() {
        let mut f = facts(mac(), Some("PCI+AMD"));
        f.env.as_mut().unwrap().as_mut().unwrap()["cache"]["tinygpu"] = json!({
            "app": TINYGPU_APP, "app_exists": false, "commit": "c0d0",
            "zip": "/w/.cache/tinygrad/downloads/TinyGPU_c0d0.zip", "zip_exists": false, "other_zips": []
        });
        f.dext = Some(Ok("0 extension(s)\n".into()));
        assert!(f.uses_tinygpu());
        let blocker = probe_blocker(&f).unwrap();
        assert!(blocker.contains("TinyGPU.app"), "{blocker}");
        f.probe = None;
        f.probe_skipped = Some(blocker);
        let checks = checks(&f);
        assert_eq!(find(&checks, "platform").status, Status::Ok);
        let app = find(&checks, "tinygpu-app");
        assert_eq!(app.status, Status::Fail);
        assert!(app.hint.as_deref().unwrap().contains("A.ensure_app()"));
        let dext = find(&checks, "driver-extension");
        assert_eq!(dext.status, Status::Fail);
        assert!(dext.hint.as_deref().unwrap().contains("TinyGPU install"));
        let cache = find(&checks, "tinygpu-cache");
        assert_eq!(cache.status, Status::Warn);
        assert!(
            cache.detail.contains("TinyGPU_c0d0.zip"),
            "{}",
            cache.detail
        );
        assert!(cache.detail.contains("firmware"), "{}", cache.detail);
        assert_eq!(find(&checks, "device").status, Status::Skip);

        // DEV=CPU on a Mac does not involve TinyGPU.
        f.dev.dev = Some("CPU".into());
        assert!(!f.uses_tinygpu());
        let c = tinygpu_checks(&f);
        assert!(c.iter().all(|c| c.status == Status::Skip), "{c:?}");
    }

    #[test]
    fn a_failed_probe_gets_a_hint_from_the_error() {
        let mut f = facts(linux(), Some("CPU"));
        f.probe = Some(Ok(json!({"ok": false, "device": "CPU",
            "error": "running a kernel on CPU: FileNotFoundError: [Errno 2] No such file or directory: 'clang'"})));
        let c = device(&f);
        assert_eq!(c.status, Status::Fail);
        assert!(c.hint.as_deref().unwrap().contains("apt-get install clang"));
        f.probe = Some(Err("no answer within 180 s (killed)".into()));
        f.egpud = Ok("egpud 0.1.0 answers".into());
        let c = device(&f);
        assert_eq!(c.status, Status::Fail);
        assert!(
            c.hint.as_deref().unwrap().contains("egpud is running"),
            "{c:?}"
        );
    }

    #[test]
    fn render_one_line_per_check_with_fix_lines() {
        let mut f = facts(linux(), Some("CPU"));
        f.python = python(false);
        f.env = None;
        f.probe = None;
        f.probe_skipped = probe_blocker(&f);
        let checks = checks(&f);
        let text = render(&f, &checks, false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "egpuctl doctor: DEV=CPU (--dev), worker python /src/egpu/worker/.venv/bin/python"
        );
        assert!(
            lines[1].starts_with("ok    platform          Linux on x86_64"),
            "{text}"
        );
        assert_eq!(
            lines[2],
            "FAIL  worker-python     /src/egpu/worker/.venv/bin/python (from the checkout's worker/.venv) does not exist"
        );
        assert_eq!(
            lines[3],
            "                        fix: run scripts/setup-worker.sh in /src/egpu"
        );
        assert_eq!(*lines.last().unwrap(), "1 failed, 1 warning(s)");
        assert!(!text.contains('\x1b'));
        assert!(render(&f, &checks, true).contains("\x1b[1;31mFAIL\x1b[0m"));
    }

    #[test]
    fn report_json_shape() {
        let f = facts(linux(), Some("CPU"));
        let checks = checks(&f);
        let report = Report {
            ok: true,
            dev: Some("CPU".into()),
            device: Some(cpu_probe()),
            checks,
        };
        let v = serde_json::to_value(&report).unwrap();
        assert_eq!(v["checks"][0]["name"], "platform");
        assert_eq!(v["checks"][0]["status"], "ok");
        assert_eq!(v["checks"][0]["hint"], Value::Null);
        assert_eq!(v["checks"][11]["status"], "warn");
        assert!(v["checks"][11]["hint"].is_string());
        assert_eq!(v["device"]["device"], "CPU");
    }

    #[test]
    fn json_is_read_from_the_last_json_line() {
        assert_eq!(
            last_json_line("noise\n{\"a\": 1}\n{\"b\": 2}\n\n"),
            Some(json!({"b": 2}))
        );
        assert_eq!(last_json_line("{broken\n"), None);
        assert_eq!(last_line("a\nb\n\n"), "b");
    }

    #[test]
    fn commands_time_out_and_report() {
        let ran = run_for(
            Command::new("sh").args(["-c", "echo out; echo err >&2; sleep 5"]),
            Duration::from_millis(300),
        )
        .unwrap();
        assert!(ran.timed_out);
        assert_eq!(ran.stdout, "out\n");
        assert_eq!(ran.stderr, "err\n");
        let err = python_json(
            Command::new("sh").args(["-c", "echo oops >&2; exit 3"]),
            ENV_TIMEOUT,
        )
        .unwrap_err();
        assert_eq!(err, "exit status 3: oops");
        assert!(run_for(&mut Command::new("/nonexistent/python"), ENV_TIMEOUT).is_err());
    }
}
