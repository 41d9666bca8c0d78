//! From facts to lines: one [`Check`] per thing that must be right, with what was found and,
//! when it is not ok, what to do. Pure: the unit tests drive it with facts of their own.

use std::path::Path;

use egpu_proto::paths::PythonRule;
use serde::Serialize;
use serde_json::Value;

use super::facts::{parse_target, str_of, Facts, Host, Os};
use super::{DEXT_ID, TINYGPU_APP, TINYGRAD_VERSION};
use crate::format::bytes_decimal;

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
    pub(super) fn new(name: &'static str, status: Status, detail: impl Into<String>) -> Check {
        Check {
            name,
            status,
            detail: detail.into(),
            hint: None,
        }
    }
    pub(super) fn ok(name: &'static str, detail: impl Into<String>) -> Check {
        Check::new(name, Status::Ok, detail)
    }
    pub(super) fn skip(name: &'static str, detail: impl Into<String>) -> Check {
        Check::new(name, Status::Skip, detail)
    }
    pub(super) fn warn(
        name: &'static str,
        detail: impl Into<String>,
        hint: impl Into<String>,
    ) -> Check {
        Check::new(name, Status::Warn, detail).hint(hint)
    }
    pub(super) fn fail(
        name: &'static str,
        detail: impl Into<String>,
        hint: impl Into<String>,
    ) -> Check {
        Check::new(name, Status::Fail, detail).hint(hint)
    }
    pub(super) fn hint(mut self, hint: impl Into<String>) -> Check {
        self.hint = Some(hint.into());
        self
    }
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

pub(super) fn platform(host: &Host) -> Check {
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

pub(super) const SETUP: &str = "scripts/setup-worker.sh";

pub(super) fn python_checks(f: &Facts) -> Vec<Check> {
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

pub(super) fn compiler(f: &Facts) -> Check {
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
pub(super) fn ensure_app_command(f: &Facts) -> String {
    format!(
        "{} -c 'from egpu_worker.env import default_cache_env; default_cache_env(); from \
         tinygrad.runtime.support.system import APLRemotePCIDevice as A; A.ensure_app()'",
        f.python.path.display()
    )
}

pub(super) fn tinygpu_checks(f: &Facts) -> Vec<Check> {
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

pub(super) fn tinygpu_cache(f: &Facts) -> Check {
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

pub(super) fn device(f: &Facts) -> Check {
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
pub(super) fn device_hint(f: &Facts, error: &str, dev: &str) -> String {
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

pub(super) fn egpud(f: &Facts) -> Check {
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
