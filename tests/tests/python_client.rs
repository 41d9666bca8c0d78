//! The Python example client (grpcio) generates over the socket, and sees the same tokens
//! as a Rust client; gRPC reflection lists egpu's service (what grpcurl relies on).

use std::path::PathBuf;
use std::process::Command;

use egpu_e2e::*;

fn client_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../clients/python/egpu_client.py")
}

fn run_client(daemon: &TestDaemon, args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg(client_script())
        .arg("--socket")
        .arg(&daemon.socket)
        .args(args)
        .env("PYTHONPATH", pydeps())
        .output()
        .expect("running python3");
    assert!(
        out.status.success(),
        "python client failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        daemon.log_text()
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_generates_over_the_socket() {
    let daemon = TestDaemon::start(&[]);
    let mut client = daemon.client().await;
    load_smollm2(&mut client, "smollm2", 256, 2).await;
    let prompt = "The capital of France is";
    let from_rust = generate(&mut client, greedy("smollm2", prompt, 12))
        .await
        .unwrap();

    let json = run_client(
        &daemon,
        &[
            "--model",
            "smollm2",
            "--raw",
            "--max-tokens",
            "12",
            "--json",
            prompt,
        ],
    );
    let line = json.trim();
    let ids: Vec<u32> = {
        let start = line.find("\"token_ids\": [").expect("token_ids") + "\"token_ids\": [".len();
        let end = start + line[start..].find(']').expect("]");
        line[start..end]
            .split(',')
            .map(|s| s.trim().parse().expect("an id"))
            .collect()
    };
    assert_eq!(ids, from_rust.token_ids, "{line}");
    assert!(line.contains("\"finish_reason\": \"length\""), "{line}");

    let services = run_client(&daemon, &["--services"]);
    let services: Vec<&str> = services.lines().collect();
    assert!(services.contains(&"egpu.v1.Egpu"), "{services:?}");
    assert!(services.contains(&"grpc.health.v1.Health"), "{services:?}");
}
