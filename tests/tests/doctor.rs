//! `egpuctl doctor` end to end: the real binary, the repository's worker venv (worker/.venv,
//! made by scripts/setup-worker.sh) and DEV=CPU, which needs clang like the worker's own tests.
//! Also `service install --env/--backend`, the last step of docs/mac-egpu.md.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use egpu_e2e::*;
use serde_json::Value;

/// The checkout's worker venv; a clear failure, not a skip, when it is missing.
fn repo_worker_python() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../worker/.venv/bin/python");
    assert!(
        path.exists(),
        "{} is missing: run scripts/setup-worker.sh (scripts/test.sh does) to create the worker venv",
        path.display()
    );
    path
}

/// egpuctl with nothing from the caller's environment that doctor reads.
fn egpuctl(args: &[&str]) -> Command {
    let mut cmd = Command::new(binary("egpuctl"));
    cmd.args(args)
        .env("NO_COLOR", "1")
        .env_remove("DEV")
        .env_remove("EGPU_WORKER_PYTHON")
        .env_remove("EGPU_SOCKET")
        .stdin(Stdio::null());
    cmd
}

/// Runs a command to its end, for at most 5 minutes.
fn output(cmd: Command) -> Output {
    output_within(cmd, Duration::from_secs(300))
}

fn report(out: &Output) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "doctor --json printed no JSON ({e}):\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {name} check in {report:#}"))
}

fn nowhere() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("no-egpud.sock").display().to_string();
    (dir, socket)
}

#[test]
fn doctor_with_the_repo_venv_and_dev_cpu_is_ok() {
    let python = repo_worker_python();
    let (_dir, socket) = nowhere();
    let mut cmd = egpuctl(&["--socket", &socket, "doctor", "--json"]);
    cmd.env("DEV", "CPU").env("EGPU_WORKER_PYTHON", &python);
    let out = output(cmd);
    let report = report(&out);
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    assert_eq!(report["ok"], true);
    assert_eq!(report["dev"], "CPU");
    for name in [
        "worker-python",
        "python-version",
        "tinygrad",
        "grpcio",
        "worker-package",
        "compiler",
        "device",
    ] {
        let c = check(&report, name);
        assert_eq!(c["status"], "ok", "{c:#}");
        assert_eq!(c["hint"], Value::Null, "{c:#}");
    }
    let venv = check(&report, "worker-python")["detail"].as_str().unwrap();
    assert!(venv.contains(&python.display().to_string()), "{venv}");
    assert!(venv.contains("$EGPU_WORKER_PYTHON"), "{venv}");
    assert_eq!(check(&report, "tinygrad")["detail"], "tinygrad 0.14.0");
    // The device: the probe's own JSON, and its name in the line.
    assert_eq!(report["device"]["device"], "CPU");
    assert_eq!(report["device"]["kernel"]["result"], 136);
    assert!(report["device"]["memory_total_bytes"].as_u64().unwrap() > 0);
    let device = check(&report, "device")["detail"].as_str().unwrap();
    assert!(device.starts_with("DEV=CPU: CPU"), "{device}");
    assert!(device.contains("test kernel ok"), "{device}");
    if cfg!(target_os = "linux") {
        for name in ["tinygpu-app", "driver-extension", "tinygpu-cache"] {
            let c = check(&report, name);
            assert_eq!(
                (c["status"].as_str(), c["detail"].as_str()),
                (Some("skip"), Some("macOS only"))
            );
        }
    }
    // No egpud on that socket: a warning with a hint, not a failure.
    let egpud = check(&report, "egpud");
    assert_eq!(egpud["status"], "warn");
    assert!(egpud["hint"].as_str().unwrap().contains("egpud"));
}

#[test]
fn a_missing_worker_python_fails_with_a_hint_and_exit_status_1() {
    let (_dir, socket) = nowhere();
    let out = output(egpuctl(&[
        "--socket",
        &socket,
        "doctor",
        "--dev",
        "CPU",
        "--worker-python",
        "/nonexistent",
        "--json",
    ]));
    let report = report(&out);
    assert_eq!(out.status.code(), Some(1), "{report:#}");
    assert_eq!(report["ok"], false);
    let venv = check(&report, "worker-python");
    assert_eq!(venv["status"], "fail");
    assert_eq!(
        venv["detail"],
        "/nonexistent (from --worker-python) does not exist"
    );
    assert!(
        venv["hint"]
            .as_str()
            .unwrap()
            .contains("scripts/setup-worker.sh"),
        "{venv:#}"
    );
    assert_eq!(check(&report, "device")["status"], "skip");
    assert_eq!(report["device"], Value::Null);

    // The same as lines: the failure, its fix, and the summary.
    let out = output(egpuctl(&[
        "--socket",
        &socket,
        "doctor",
        "--dev",
        "CPU",
        "--worker-python",
        "/nonexistent",
    ]));
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains(
            "\nFAIL  worker-python     /nonexistent (from --worker-python) does not exist\n"
        ),
        "{text}"
    );
    assert!(
        text.contains("fix: pass the path of an existing interpreter"),
        "{text}"
    );
    assert!(text.ends_with("1 failed, 1 warning(s)\n"), "{text}");
    assert!(!text.contains('\x1b'), "NO_COLOR is set: {text}");
}

#[test]
fn doctor_sees_a_running_egpud() {
    let python = repo_worker_python();
    let daemon = TestDaemon::start(&[]);
    let socket = daemon.socket.display().to_string();
    let python = python.display().to_string();
    let out = output(egpuctl(&[
        "--socket",
        &socket,
        "doctor",
        "--dev",
        "CPU",
        "--worker-python",
        &python,
    ]));
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("ok    egpud"))
        .unwrap_or_else(|| panic!("no ok egpud line:\n{text}"));
    assert!(line.contains(&format!("answers on {socket}")), "{line}");
    assert!(text.ends_with("no problems found\n"), "{text}");
}

#[test]
fn service_install_takes_the_device_and_backend() {
    let python = repo_worker_python();
    let home = tempfile::tempdir().unwrap();
    let mut cmd = egpuctl(&[
        "service",
        "install",
        "--dry-run",
        "--platform",
        "macos",
        "--env",
        "DEV=PCI+AMD:LLVM",
        "--backend",
        "tinygrad",
        "--",
        "--keep-alive",
        "30m",
    ]);
    cmd.env("HOME", home.path())
        .env("EGPU_WORKER_PYTHON", &python)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("DBUS_SESSION_BUS_ADDRESS");
    let out = output(cmd);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plist_path = home
        .path()
        .join("Library/LaunchAgents/dev.egpu.egpud.plist");
    let start = format!("# write {}:\n", plist_path.display());
    let from = text.find(&start).expect("the plist in the dry run") + start.len();
    let to = text[from..].find("# end of ").unwrap() + from;
    let value =
        plist::Value::from_reader_xml(&text.as_bytes()[from..to]).expect("the plist parses");
    let dict = value.as_dictionary().unwrap();
    let program: Vec<&str> = dict["ProgramArguments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_string().unwrap())
        .collect();
    assert_eq!(
        program[1..],
        ["--backend", "tinygrad", "--keep-alive", "30m"]
    );
    let env = dict["EnvironmentVariables"].as_dictionary().unwrap();
    assert_eq!(env["DEV"].as_string(), Some("PCI+AMD:LLVM"));
    assert_eq!(env["EGPU_WORKER_PYTHON"].as_string(), python.to_str());
    assert_eq!(env["EGPU_LOG"].as_string(), Some("info"));

    // A malformed --env is a usage error (exit status 1), before anything is written.
    let out = output(egpuctl(&[
        "service",
        "install",
        "--dry-run",
        "--env",
        "DEV",
    ]));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not KEY=VALUE"));
}
