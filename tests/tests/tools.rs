//! Tool calling end to end: the `openai` and `ollama` Python packages against a real egpud,
//! with SmolLM2 wearing the real chat templates of two tool-calling families (Qwen 2.5's
//! `<tool_call>` blocks and Llama 3.1's JSON calls, fetched by `scripts/fetch-models.sh`).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use egpu_e2e::*;
use egpu_proto::v1 as pb;
use serde_json::Value;

async fn load_as(
    client: &mut pb::egpu_client::EgpuClient<tonic::transport::Channel>,
    source: &std::path::Path,
    name: &str,
) {
    load(
        client,
        pb::LoadRequest {
            source: source.display().to_string(),
            name: name.into(),
            context_length: 1024,
            slots: 2,
            ..Default::default()
        },
    )
    .await
    .unwrap_or_else(|e| panic!("loading {name}: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_calling_round_trip_through_the_openai_and_ollama_packages() {
    let daemon = TestDaemon::start(&[]);
    let mut client = daemon.client().await;
    let dir = tempfile::tempdir().unwrap();
    let template = |file: &str| {
        std::fs::read_to_string(models_dir().join("templates").join(file))
            .unwrap_or_else(|e| panic!("{file} (scripts/fetch-models.sh fetches it): {e}"))
    };
    let smol = model_path(SMOLLM2);
    let hermes = with_chat_template(
        &smol,
        &template("Qwen-Qwen2.5-7B-Instruct.jinja"),
        &dir.path().join("smol-qwen-template.gguf"),
    );
    let llama = with_chat_template(
        &smol,
        &template("meta-llama-Llama-3.1-8B-Instruct.jinja"),
        &dir.path().join("smol-llama-template.gguf"),
    );
    load_as(&mut client, &hermes, "hermes").await;
    load_as(&mut client, &llama, "llama").await;
    load_smollm2(&mut client, "plain", 1024, 1).await;

    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/tools_check.py");
    let mut cmd = Command::new("python3");
    cmd.arg(script)
        .args(["--base-url", &format!("{}/v1", daemon.http_url())])
        .args(["--key", &daemon.api_key()])
        .args(["--hermes", "hermes", "--llama", "llama", "--plain", "plain"]);
    let out = run_python_json(&daemon, cmd, Duration::from_secs(600));
    eprintln!("tool calls: {out}");
    for family in ["hermes", "llama"] {
        let call = &out[format!("{family}_required")];
        assert!(call["name"].as_str().is_some(), "{out}");
        assert!(
            !out[format!("{family}_answer")]
                .as_str()
                .unwrap_or("")
                .is_empty(),
            "{out}"
        );
    }
    let errors = &out["errors"];
    let error = |label: &str| errors[label].as_str().unwrap_or_default().to_owned();
    assert!(
        error("unknown_tool").contains("not among the tools"),
        "{errors}"
    );
    assert!(
        error("no_tool_template").contains("does not render tools"),
        "{errors}"
    );
    assert!(error("bad_choice").contains("tool_choice"), "{errors}");
    assert_ne!(out["ollama"], Value::Null);
    // With tools shown and `auto`, a text answer streams as it is written (before, it was held
    // back whole): the script checked each streamed answer against the unstreamed one.
    let streamed: Vec<&Value> = ["streamed_auto", "ollama_streamed"]
        .iter()
        .flat_map(|k| out[*k].as_array().into_iter().flatten())
        .collect();
    assert_eq!(streamed.len(), 6, "{out}");
    let texts: Vec<&&Value> = streamed.iter().filter(|s| s["kind"] == "text").collect();
    assert!(!texts.is_empty(), "no streamed answer was text: {out}");
    for s in texts {
        let pieces = s["content_deltas"]
            .as_u64()
            .or(s["content_parts"].as_u64())
            .unwrap_or(0);
        assert!(pieces > 1, "a text answer came in one piece: {s}");
    }
}
