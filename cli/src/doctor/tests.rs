//! `doctor`'s unit tests: facts built by hand, through the checks and the rendering.

use std::process::Command;
use std::time::Duration;

use egpu_proto::paths::{PythonRule, WorkerPython};
use serde_json::Value;

use super::checks::*;
use super::facts::*;
use super::render::*;
use super::{DEXT_ID, TINYGPU_APP};
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
fn python_json_reports_a_failed_command_by_its_status_and_last_line() {
    let err = python_json(
        Command::new("sh").args(["-c", "echo oops >&2; exit 3"]),
        ENV_TIMEOUT,
    )
    .unwrap_err();
    assert_eq!(err, "exit status 3: oops");
    let err = python_json(
        Command::new("sh").args(["-c", "sleep 5"]),
        Duration::from_millis(200),
    )
    .unwrap_err();
    assert!(err.contains("killed"), "{err}");
}
