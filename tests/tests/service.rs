//! `egpuctl service` end to end: the real binary with HOME in a temporary folder. CI is Linux,
//! as root, with no user session bus: real installs are checked to fail cleanly there, and
//! everything else goes through `--dry-run`, which must change nothing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use egpu_e2e::*;

/// egpuctl with HOME in `home` and no session bus, XDG folders or socket from the caller.
fn egpuctl(home: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(binary("egpuctl"));
    cmd.args(args)
        .env("HOME", home)
        .env("NO_COLOR", "1")
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("DBUS_SESSION_BUS_ADDRESS")
        .env_remove("EGPU_SOCKET")
        .stdin(Stdio::null());
    cmd
}

/// Runs a command to its end, for at most 60 s.
fn output(cmd: Command) -> Output {
    output_within(cmd, Duration::from_secs(60))
}

fn run_ok(home: &Path, args: &[&str]) -> String {
    let out = output(egpuctl(home, args));
    assert!(
        out.status.success(),
        "egpuctl {args:?} failed ({:?}): {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// The file a dry run prints between `# write PATH:` and `# end of PATH`.
fn written_file(stdout: &str, path: &Path) -> String {
    let start = format!("# write {}:\n", path.display());
    let end = format!("# end of {}\n", path.display());
    let from = stdout
        .find(&start)
        .unwrap_or_else(|| panic!("no {start:?} in:\n{stdout}"))
        + start.len();
    let to = stdout[from..].find(&end).expect("end of the file") + from;
    stdout[from..to].to_owned()
}

/// Every file and folder under `dir`.
fn everything_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).expect("reading a folder") {
        let path = entry.unwrap().path();
        found.push(path.clone());
        if path.is_dir() {
            found.extend(everything_under(&path));
        }
    }
    found
}

fn real_egpud() -> String {
    std::fs::canonicalize(binary("egpud"))
        .unwrap()
        .display()
        .to_string()
}

#[test]
fn install_dry_run_macos_prints_a_valid_launch_agent() {
    let home = tempfile::tempdir().unwrap();
    let out = run_ok(
        home.path(),
        &[
            "service",
            "install",
            "--dry-run",
            "--platform",
            "macos",
            "--",
            "--keep-alive",
            "30m",
        ],
    );
    let plist_path = home
        .path()
        .join("Library/LaunchAgents/dev.egpu.egpud.plist");
    let text = written_file(&out, &plist_path);
    let value = plist::Value::from_reader_xml(text.as_bytes()).expect("the plist parses");
    let dict = value.as_dictionary().expect("a dictionary");
    assert_eq!(dict["Label"].as_string(), Some("dev.egpu.egpud"));
    let program: Vec<&str> = dict["ProgramArguments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_string().unwrap())
        .collect();
    assert_eq!(program, [real_egpud().as_str(), "--keep-alive", "30m"]);
    assert_eq!(dict["RunAtLoad"].as_boolean(), Some(true));
    let keep_alive = dict["KeepAlive"]
        .as_dictionary()
        .expect("KeepAlive dictionary");
    assert_eq!(keep_alive["SuccessfulExit"].as_boolean(), Some(false));
    assert!(dict["ThrottleInterval"].as_unsigned_integer().unwrap() > 0);
    let log = home.path().join("Library/Logs/egpu/egpud.log");
    assert_eq!(dict["StandardErrorPath"].as_string(), log.to_str());
    assert_eq!(dict["StandardOutPath"].as_string(), log.to_str());
    let env = dict["EnvironmentVariables"].as_dictionary().unwrap();
    assert_eq!(env["DEV"].as_string(), Some("PCI+AMD"));
    let path = env["PATH"].as_string().unwrap();
    assert!(path.split(':').any(|d| d == "/usr/bin"), "{path}");
    assert!(
        out.contains(&format!(
            "launchctl bootstrap gui/{} {}",
            rustix::process::getuid().as_raw(),
            plist_path.display()
        )),
        "{out}"
    );
    assert_eq!(
        everything_under(home.path()),
        Vec::<PathBuf>::new(),
        "a dry run wrote files"
    );
}

#[test]
fn install_dry_run_linux_prints_a_unit_that_systemd_accepts() {
    let home = tempfile::tempdir().unwrap();
    let out = run_ok(
        home.path(),
        &["service", "install", "--dry-run", "--platform", "linux"],
    );
    let unit_path = home.path().join(".config/systemd/user/egpud.service");
    let unit = written_file(&out, &unit_path);
    assert!(
        unit.contains(&format!("\nExecStart={}\n", real_egpud())),
        "{unit}"
    );
    assert!(unit.contains("\nRestart=on-failure\n"), "{unit}");
    assert!(unit.contains("\nEnvironment=DEV=PCI+AMD\n"), "{unit}");
    assert!(out.contains("systemctl --user daemon-reload\n"), "{out}");
    assert!(
        out.contains("systemctl --user enable --now egpud.service\n"),
        "{out}"
    );
    assert_eq!(
        everything_under(home.path()),
        Vec::<PathBuf>::new(),
        "a dry run wrote files"
    );

    let scratch = tempfile::tempdir().unwrap();
    let file = scratch.path().join("egpud.service");
    std::fs::write(&file, &unit).unwrap();
    match Command::new("systemd-analyze")
        .arg("verify")
        .arg(&file)
        .output()
    {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("note: systemd-analyze is not installed; skipping `systemd-analyze verify`");
        }
        Err(e) => panic!("running systemd-analyze: {e}"),
        Ok(verify) => assert!(
            verify.status.success() && verify.stderr.is_empty(),
            "systemd-analyze verify: {}{}\n{unit}",
            String::from_utf8_lossy(&verify.stdout),
            String::from_utf8_lossy(&verify.stderr)
        ),
    }
}

#[test]
fn uninstall_dry_run_names_what_it_would_remove_and_removes_nothing() {
    let home = tempfile::tempdir().unwrap();
    let plist_path = home
        .path()
        .join("Library/LaunchAgents/dev.egpu.egpud.plist");
    let log_dir = home.path().join("Library/Logs/egpu");
    let unit_path = home.path().join(".config/systemd/user/egpud.service");
    for file in [&plist_path, &log_dir.join("egpud.log"), &unit_path] {
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, "installed\n").unwrap();
    }
    let before = everything_under(home.path());

    let out = run_ok(
        home.path(),
        &["service", "uninstall", "--dry-run", "--platform", "macos"],
    );
    assert!(out.contains("launchctl bootout gui/"), "{out}");
    assert!(
        out.contains(&format!("rm -rf {}\n", plist_path.display())),
        "{out}"
    );
    assert!(
        out.contains(&format!("rm -rf {}\n", log_dir.display())),
        "{out}"
    );
    let out = run_ok(
        home.path(),
        &["service", "uninstall", "--dry-run", "--platform", "linux"],
    );
    assert!(
        out.contains("systemctl --user disable --now egpud.service"),
        "{out}"
    );
    assert!(
        out.contains(&format!("rm -rf {}\n", unit_path.display())),
        "{out}"
    );

    assert_eq!(everything_under(home.path()), before);
    for file in [&plist_path, &unit_path] {
        assert_eq!(std::fs::read_to_string(file).unwrap(), "installed\n");
    }
}

#[test]
fn logs_dry_run_prints_the_command() {
    let home = tempfile::tempdir().unwrap();
    let out = run_ok(
        home.path(),
        &[
            "service",
            "logs",
            "--dry-run",
            "--platform",
            "linux",
            "-n",
            "20",
        ],
    );
    assert_eq!(out, "journalctl --user -u egpud.service --no-pager -n 20\n");
    let out = run_ok(
        home.path(),
        &[
            "service",
            "logs",
            "--dry-run",
            "--platform",
            "macos",
            "--follow",
        ],
    );
    let log = home.path().join("Library/Logs/egpu/egpud.log");
    assert_eq!(out, format!("tail -n 100 -F {}\n", log.display()));
}

#[cfg(target_os = "linux")]
#[test]
fn real_install_without_a_user_session_fails_in_one_line_and_writes_nothing() {
    let home = tempfile::tempdir().unwrap();
    let out = output(egpuctl(home.path(), &["service", "install"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("no systemd user session"), "{stderr}");
    assert_eq!(everything_under(home.path()), Vec::<PathBuf>::new());

    // Another OS's service manager only for a dry run.
    let out = output(egpuctl(
        home.path(),
        &["service", "install", "--platform", "macos"],
    ));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("only with --dry-run"));
    assert_eq!(everything_under(home.path()), Vec::<PathBuf>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_says_installed_loaded_and_answering() {
    let home = tempfile::tempdir().unwrap();
    let daemon = TestDaemon::start(&[]);
    let socket = daemon.socket.display().to_string();
    let out = output(egpuctl(
        home.path(),
        &["--socket", &socket, "service", "status"],
    ));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("installed: no"), "{stdout}");
    assert!(stdout.contains("loaded:"), "{stdout}");
    assert!(stdout.contains("answering: yes, egpud "), "{stdout}");

    // Installed (the file is there) but nothing answers: exit status 2.
    let unit = home.path().join(".config/systemd/user/egpud.service");
    std::fs::create_dir_all(unit.parent().unwrap()).unwrap();
    std::fs::write(&unit, "[Service]\n").unwrap();
    let gone = home.path().join("nothing.sock").display().to_string();
    let out = output(egpuctl(
        home.path(),
        &[
            "--socket",
            &gone,
            "service",
            "status",
            "--platform",
            "linux",
        ],
    ));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("installed: yes, {}", unit.display())),
        "{stdout}"
    );
    assert!(stdout.contains("answering: no"), "{stdout}");
    assert_eq!(out.status.code(), Some(2), "{stdout}");
}
