//! egpuctl end to end: the real binary against a real egpud and the real SmolLM2.

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use egpu_e2e::*;
use serde_json::Value;

fn egpuctl(daemon: &TestDaemon, args: &[&str]) -> Command {
    let mut cmd = Command::new(binary("egpuctl"));
    cmd.arg("--socket").arg(&daemon.socket).args(args);
    cmd.env_remove("EGPU_SOCKET").env("NO_COLOR", "1");
    cmd
}

/// Runs egpuctl with `input` as its (non-terminal) stdin.
fn with_stdin(daemon: &TestDaemon, args: &[&str], input: &[u8]) -> Output {
    let mut child = egpuctl(daemon, args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running egpuctl");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(input)
        .expect("writing stdin");
    child.wait_with_output().expect("waiting for egpuctl")
}

fn run_ok(daemon: &TestDaemon, args: &[&str]) -> String {
    let out = egpuctl(daemon, args).output().expect("running egpuctl");
    assert_ok(&out, args, daemon);
    String::from_utf8(out.stdout).expect("utf-8")
}

fn assert_ok(out: &Output, args: &[&str], daemon: &TestDaemon) {
    assert!(
        out.status.success(),
        "egpuctl {args:?} failed ({:?}): {}\n--- egpud log ---\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr),
        daemon.log_text()
    );
}

fn json(daemon: &TestDaemon, args: &[&str]) -> Value {
    let text = run_ok(daemon, args);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: {e}: {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_tour_with_stable_json_shapes() {
    let daemon = TestDaemon::start(&[]);
    let model = model_path(SMOLLM2).display().to_string();

    let loaded = json(
        &daemon,
        &[
            "load", &model, "--name", "smollm2", "--ctx", "512", "--slots", "2", "--json",
        ],
    );
    assert_eq!(loaded["name"], "smollm2");
    assert_eq!(loaded["state"], "ready");
    assert_eq!(loaded["already_resident"], false);
    let human = run_ok(&daemon, &["load", &model, "--name", "smollm2"]);
    assert!(human.contains("already resident"), "{human}");

    let status = json(&daemon, &["status", "--json"]);
    for key in ["budget_bytes", "used_bytes", "device", "models"] {
        assert!(
            status.get(key).is_some(),
            "status --json lacks {key}: {status}"
        );
    }
    let m = &status["models"][0];
    for key in ["name", "source", "bytes", "pinned", "active", "queued"] {
        assert!(m.get(key).is_some(), "model lacks {key}: {m}");
    }
    assert_eq!(m["source"], model.as_str());
    assert!(m["bytes"].as_u64().unwrap() > 0);
    let table = run_ok(&daemon, &["status"]);
    assert!(
        table.contains("smollm2") && table.contains("NAME"),
        "{table}"
    );

    // generate --json: the documented shape, and the same tokens as the gRPC API gives.
    let prompt = "The capital of France is";
    let gen = json(
        &daemon,
        &[
            "generate",
            "smollm2",
            prompt,
            "--raw",
            "--max-tokens",
            "10",
            "--logprobs",
            "2",
            "--json",
        ],
    );
    for key in [
        "text",
        "token_ids",
        "logprobs",
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
    ] {
        assert!(gen.get(key).is_some(), "generate --json lacks {key}: {gen}");
    }
    let mut client = daemon.client().await;
    let direct = generate(&mut client, greedy("smollm2", prompt, 10))
        .await
        .unwrap();
    let ids: Vec<u32> = gen["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(ids, direct.token_ids);
    assert_eq!(gen["text"], direct.text.as_str());
    assert_eq!(gen["finish_reason"], "length");
    let lps = gen["logprobs"].as_array().unwrap();
    assert_eq!(lps.len(), ids.len());
    assert_eq!(lps[0].as_array().unwrap().len(), 2);
    assert_eq!(lps[0][0]["id"], ids[0]);

    // Streaming text, prompt from stdin.
    let out = with_stdin(
        &daemon,
        &["generate", "smollm2", "-", "--raw", "--max-tokens", "10"],
        prompt.as_bytes(),
    );
    assert_ok(&out, &["generate", "-"], &daemon);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim_end(),
        direct.text.trim_end()
    );

    // score --json: null first, one log-prob per token, top alternatives.
    let score = json(
        &daemon,
        &["score", "smollm2", "Hello world", "--top", "3", "--json"],
    );
    let ids = score["token_ids"].as_array().unwrap();
    let logprobs = score["logprobs"].as_array().unwrap();
    let top = score["top"].as_array().unwrap();
    assert_eq!(ids.len(), logprobs.len());
    assert_eq!(ids.len(), top.len());
    assert!(logprobs[0].is_null());
    assert!(logprobs[1..].iter().all(|v| v.as_f64().unwrap() <= 0.0));
    assert_eq!(top[1].as_array().unwrap().len(), 3);

    // chat with stdin that is not a terminal: a reply per line, history kept.
    let out = with_stdin(
        &daemon,
        &["chat", "smollm2", "--max-tokens", "12"],
        b"My name is Ada.\nWhat is my name?\n",
    );
    assert_ok(&out, &["chat"], &daemon);
    let replies = String::from_utf8_lossy(&out.stdout);
    assert!(
        replies.lines().filter(|l| !l.trim().is_empty()).count() >= 2,
        "{replies}"
    );
    assert_eq!(
        json(&daemon, &["status", "--json"])["models"][0]["requests_served"],
        6
    );

    let models = json(&daemon, &["models", "--json"]);
    let text = models.to_string();
    assert!(
        text.contains("SmolLM2-135M-Instruct.Q4_1") && text.contains("smollm2"),
        "{text}"
    );

    run_ok(&daemon, &["unload", "smollm2"]);
    assert_eq!(
        json(&daemon, &["status", "--json"])["models"],
        Value::Array(vec![])
    );

    // Errors: one line, the gRPC code, exit 1.
    let out = egpuctl(&daemon, &["generate", "nope", "Hi"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("NOT_FOUND") && err.contains("nope"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_egpuctl_frees_its_slot_within_a_second() {
    let daemon = TestDaemon::start(&[]);
    let mut client = daemon.client().await;
    load_smollm2(&mut client, "m", 1024, 1).await;
    let mut child = egpuctl(
        &daemon,
        &[
            "generate",
            "m",
            "Write a long story about a dragon.",
            "--max-tokens",
            "900",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    // Wait for streamed text: the request holds the slot now.
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = Vec::new();
    stdout.read_until(b' ', &mut first).unwrap();
    assert_eq!(status(&mut client).await.models[0].active, 1);
    child.kill().unwrap();
    child.wait().unwrap();
    let killed = Instant::now();
    loop {
        let st = status(&mut client).await;
        if st.models[0].active == 0 {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(1),
            "slot still held 1 s after the client was killed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The next request gets the slot at once.
    let ok = generate(&mut client, greedy("m", "Hi", 2)).await.unwrap();
    assert_eq!(ok.token_ids.len(), 2);
}

#[test]
fn egpuctl_without_a_daemon_says_how_to_start_it() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("none.sock");
    let out = Command::new(binary("egpuctl"))
        .arg("--socket")
        .arg(&socket)
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("none.sock") && err.contains("egpud"), "{err}");
}
