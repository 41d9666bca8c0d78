//! Constrained generation end to end: JSON schemas through the `openai` and `ollama` Python
//! packages on SmolLM2 and Gemma 3, every answer validated by the `jsonschema` package; regular
//! expressions, Lark grammars, stop strings and bad constraints over gRPC.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use egpu_e2e::*;
use egpu_proto::v1 as pb;
use pb::constraint::Kind;
use serde_json::Value;

const GEMMA3: &str = "gemma-3-270m-q4_k_m.gguf";

async fn load_model(
    client: &mut pb::egpu_client::EgpuClient<tonic::transport::Channel>,
    file: &str,
    name: &str,
) {
    load(
        client,
        pb::LoadRequest {
            source: model_path(file).display().to_string(),
            name: name.into(),
            context_length: 1024,
            slots: 2,
            ..Default::default()
        },
    )
    .await
    .unwrap_or_else(|e| panic!("loading {file}: {e}"));
}

fn constrained(
    model: &str,
    prompt: &str,
    kind: Kind,
    sampling: pb::SamplingOptions,
) -> pb::GenerateRequest {
    pb::GenerateRequest {
        model: model.into(),
        input: Some(pb::generate_request::Input::Prompt(prompt.into())),
        sampling: Some(sampling),
        max_tokens: Some(64),
        constraint: Some(pb::Constraint { kind: Some(kind) }),
        ..Default::default()
    }
}

fn sampled(seed: u64) -> pb::SamplingOptions {
    pb::SamplingOptions {
        temperature: 1.5,
        seed: Some(seed),
        ..Default::default()
    }
}

fn finish(out: &Generated) -> pb::FinishReason {
    out.done.as_ref().expect("a Done event").finish_reason()
}

/// `dddd-dd-dd`, digits only.
fn is_date(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() == 10
        && b.iter().enumerate().all(|(i, c)| {
            if i == 4 || i == 7 {
                *c == b'-'
            } else {
                c.is_ascii_digit()
            }
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_schemas_always_validate_through_the_openai_and_ollama_packages() {
    let daemon = TestDaemon::start(&[]);
    let mut client = daemon.client().await;
    load_smollm2(&mut client, "smollm2", 1024, 2).await;
    load_model(&mut client, GEMMA3, "gemma3").await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/constrained_check.py");
    let mut cmd = Command::new("python3");
    cmd.arg(script)
        .args(["--base-url", &format!("{}/v1", daemon.http_url())])
        .args(["--key", &daemon.api_key()])
        .args(["--model", "smollm2", "--model", "gemma3"]);
    let report = run_python_json(&daemon, cmd, Duration::from_secs(900));
    // 2 models × (5 schemas × (3 settings + 1 stream) + json_object + 2 Ollama) answers.
    assert_eq!(report["total"], 2 * (5 * 4 + 3), "{report}");
    assert_eq!(report["valid"], report["total"], "{report}");
    assert_eq!(report["failures"], Value::Array(vec![]));
    // Every answer ended because its document was complete, not at the token limit.
    let finishes = report["finish"].as_object().unwrap();
    assert!(
        finishes.keys().all(|k| k == "stop" || k == "stream"),
        "{report}"
    );
    let errors = &report["errors"];
    assert!(
        errors["bad_type"]
            .as_str()
            .unwrap()
            .contains("invalid JSON schema"),
        "{errors}"
    );
    assert!(
        errors["unsupported"].as_str().unwrap().contains("not"),
        "{errors}"
    );
    assert!(
        errors["ollama_bad_type"]
            .as_str()
            .unwrap()
            .starts_with("400"),
        "{errors}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regexes_grammars_and_stop_strings_hold_over_grpc() {
    let daemon = TestDaemon::start(&[]);
    let mut client = daemon.client().await;
    load_smollm2(&mut client, "smollm2", 1024, 2).await;
    let date = || Kind::Regex("[0-9]{4}-[0-9]{2}-[0-9]{2}".into());

    // The end comes only where the expression is complete: every sampled answer is a whole
    // date, however hot the sampling (EOS is likely early on at 1.5 without the mask).
    for seed in 0..6 {
        let req = constrained("smollm2", "The date today is", date(), sampled(seed));
        let out = generate(&mut client, req).await.unwrap();
        assert!(is_date(&out.text), "seed {seed}: {:?}", out.text);
        assert_eq!(finish(&out), pb::FinishReason::Stop, "seed {seed}");
    }
    // Greedy is deterministic.
    let greedy = || constrained("smollm2", "The date today is", date(), Default::default());
    let first = generate(&mut client, greedy()).await.unwrap();
    assert_eq!(
        generate(&mut client, greedy()).await.unwrap().text,
        first.text
    );

    // A Lark grammar with alternatives.
    let yes_no = Kind::LarkGrammar("start: (\"yes\" | \"no\") \"!\"\n".into());
    for seed in 0..4 {
        let req = constrained("smollm2", "Answer:", yes_no.clone(), sampled(seed));
        let out = generate(&mut client, req).await.unwrap();
        assert!(out.text == "yes!" || out.text == "no!", "{:?}", out.text);
    }

    // A stop string inside the constrained text still stops it, and is not returned.
    let mut req = constrained(
        "smollm2",
        "Some fruits:",
        Kind::Regex("[a-z]{1,8}(, [a-z]{1,8}){3,5}".into()),
        Default::default(),
    );
    req.stop = vec![",".into()];
    let out = generate(&mut client, req).await.unwrap();
    assert_eq!(finish(&out), pb::FinishReason::StopString, "{:?}", out.text);
    assert!(
        !out.text.is_empty() && out.text.bytes().all(|b| b.is_ascii_lowercase()),
        "{:?}",
        out.text
    );

    // Bad constraints are INVALID_ARGUMENT naming the problem, and the daemon serves on.
    let bad = [
        (Kind::Regex("[0-9".into()), "regular expression"),
        (
            Kind::LarkGrammar("start: nothing_defined\n".into()),
            "Lark grammar",
        ),
        (Kind::JsonSchema("{\"type\": ".into()), "not JSON"),
        (
            Kind::JsonSchema("{\"type\": \"object\", \"not\": {}}".into()),
            "not",
        ),
    ];
    for (kind, needle) in bad {
        let err = generate(
            &mut client,
            constrained("smollm2", "x", kind, Default::default()),
        )
        .await
        .expect_err(needle);
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(
            err.message().contains(needle),
            "{needle}: {}",
            err.message()
        );
    }
    let after = generate(&mut client, greedy()).await.unwrap();
    assert_eq!(after.text, first.text);
}
