//! What egpuctl does when egpud is not there: the real binary, a socket path that cannot
//! exist, and the commands that need no daemon at all.

use std::process::{Command, Output};

const MISSING_SOCKET: &str = "/nonexistent/dir/x.sock";

fn egpuctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_egpuctl"))
        .args(args)
        // The flag must win over an EGPU_SOCKET set in the developer's shell.
        .env_remove("EGPU_SOCKET")
        .output()
        .expect("run egpuctl")
}

fn assert_unreachable(out: &Output) {
    let stderr = String::from_utf8(out.stderr.clone()).unwrap();
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "stderr: {stderr:?}");
    assert!(stderr.starts_with("egpuctl: "), "{stderr}");
    assert!(stderr.contains(MISSING_SOCKET), "{stderr}");
    assert!(stderr.contains("egpud"), "{stderr}");
    assert!(out.stdout.is_empty(), "stdout: {:?}", out.stdout);
}

#[test]
fn status_without_daemon_exits_2_with_one_line() {
    assert_unreachable(&egpuctl(&["--socket", MISSING_SOCKET, "status"]));
}

#[test]
fn generate_without_daemon_exits_2_with_one_line() {
    assert_unreachable(&egpuctl(&[
        "generate",
        "m",
        "hello",
        "--socket",
        MISSING_SOCKET,
    ]));
}

#[test]
fn socket_from_the_environment() {
    let out = Command::new(env!("CARGO_BIN_EXE_egpuctl"))
        .args(["models", "--json"])
        .env("EGPU_SOCKET", MISSING_SOCKET)
        .output()
        .expect("run egpuctl");
    assert_unreachable(&out);
}

#[test]
fn a_socket_nobody_listens_on_is_unreachable_too() {
    // A regular file where the socket should be: it exists, but connecting fails, as
    // with a stale socket left by a killed egpud.
    let dir = std::env::temp_dir().join(format!("egpuctl-no-daemon-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let stale = dir.join("stale.sock");
    std::fs::write(&stale, b"").unwrap();
    let stale = stale.to_str().unwrap();
    let out = egpuctl(&["--socket", stale, "status", "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr:?}");
    assert!(
        stderr.contains(stale) && stderr.contains("egpud"),
        "{stderr}"
    );
}

#[test]
fn usage_errors_exit_1_not_2() {
    let out = egpuctl(&["generate", "--max-tokens", "0", "m", "p"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(!out.stderr.is_empty());
}

#[test]
fn help_documents_exit_statuses() {
    let out = egpuctl(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(help.contains("Exit status:"), "{help}");
    assert!(help.contains("2  egpud is not running"), "{help}");
}

#[test]
fn completions_need_no_daemon() {
    for shell in ["bash", "zsh", "fish"] {
        let out = egpuctl(&["--socket", MISSING_SOCKET, "completions", shell]);
        assert_eq!(out.status.code(), Some(0), "{shell}");
        let script = String::from_utf8(out.stdout).unwrap();
        assert!(script.contains("egpuctl"), "{shell}: {script}");
        assert!(script.contains("generate"), "{shell}: subcommands missing");
    }
}
