//! The facts `doctor` checks: everything it learns by running programs (the worker's Python,
//! the device probe, `systemextensionsctl`, `sw_vers`) or by asking egpud, gathered before any
//! line is written.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use egpu_proto::paths::{worker_python, WorkerPython};
use egpu_proto::v1::StatusRequest;
use serde_json::Value;

use super::{DoctorArgs, TINYGPU_APP};
use crate::client::{connect, request};
use crate::format;
use crate::subprocess::run_with_timeout;

/// Asks the worker's Python about itself (see the file's header).
const ENV_SCRIPT: &str = include_str!("../doctor_env.py");
/// How long the environment script may take (it imports tinygrad and dlopens libraries).
pub(super) const ENV_TIMEOUT: Duration = Duration::from_secs(60);
/// How long egpud may take to answer Status.
const EGPUD_TIMEOUT: Duration = Duration::from_secs(5);

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
    pub(super) fn detect() -> Host {
        let os = match std::env::consts::OS {
            "macos" => Os::Macos,
            "linux" => Os::Linux,
            _ => Os::Other,
        };
        let macos_version = (os == Os::Macos)
            .then(|| {
                run_with_timeout(Command::new("sw_vers").arg("-productVersion"), ENV_TIMEOUT).ok()
            })
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
    pub(super) fn env(&self) -> Option<&Value> {
        self.env.as_ref().and_then(|e| e.as_ref().ok())
    }

    pub(super) fn target(&self) -> Option<Target> {
        self.dev.dev.as_deref().map(parse_target)
    }

    /// Whether the chosen DEV reaches the GPU through TinyGPU: macOS, AMD or NV, over the PCI
    /// interface (named, or the one tinygrad falls back to on macOS where KFD/NVK do not exist).
    pub(super) fn uses_tinygpu(&self) -> bool {
        self.host.os == Os::Macos
            && self.target().is_some_and(|t| {
                matches!(t.device.as_str(), "AMD" | "NV")
                    && matches!(t.interface.as_str(), "" | "PCI")
            })
    }

    pub(super) fn worker_cache(&self) -> Option<&Value> {
        self.env().map(|e| &e["cache"]).filter(|c| c.is_object())
    }

    /// What is missing for tinygrad to open the eGPU without a network: the app, its zip in
    /// the worker's download cache. Empty when nothing is.
    pub(super) fn tinygpu_missing(&self) -> Vec<String> {
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

pub(super) fn str_of(v: &Value) -> Option<&str> {
    v.as_str().filter(|s| !s.is_empty())
}

/// Everything the checks need: the host, the DEV, the worker's Python and what it says about
/// itself, on macOS the driver extension, the device probe (when it can run), and egpud.
pub(super) fn gather(socket: &Path, args: &DoctorArgs) -> anyhow::Result<Facts> {
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
            run_with_timeout(Command::new("systemextensionsctl").arg("list"), ENV_TIMEOUT)
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
    Ok(facts)
}

/// Why the device probe cannot (or should not) run yet; `None` when it can.
pub(super) fn probe_blocker(f: &Facts) -> Option<String> {
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

pub(super) async fn egpud_status(socket: &Path) -> Result<String, String> {
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

/// The last line of `text` that parses as a JSON object.
pub(super) fn last_json_line(text: &str) -> Option<Value> {
    text.lines()
        .rev()
        .map(str::trim)
        .filter(|l| l.starts_with('{'))
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(Value::is_object)
}

/// The last non-empty line of stderr, for messages.
pub(super) fn last_line(text: &str) -> &str {
    text.lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("no output")
}

/// Runs a Python command and reads the JSON it prints last.
pub(super) fn python_json(cmd: &mut Command, timeout: Duration) -> Result<Value, String> {
    let ran = run_with_timeout(cmd, timeout).map_err(|e| format!("{e:#}"))?;
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

pub(super) fn run_env_script(python: &Path) -> Result<Value, String> {
    python_json(Command::new(python).arg("-c").arg(ENV_SCRIPT), ENV_TIMEOUT)
}

pub(super) fn run_probe(
    python: &Path,
    dev: Option<&str>,
    timeout: Duration,
) -> Result<Value, String> {
    python_json(
        Command::new(python)
            .args(["-m", "egpu_worker.probe", "--dev"])
            .arg(dev.unwrap_or("auto")),
        timeout,
    )
}
