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

/// The tools of `tools_check.py`, as the gRPC `Tools.json` and egpuctl's `--tools` file take them.
const TOOLS_JSON: &str = r#"[
  {"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city.",
   "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
     "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
     "required": ["city", "unit"], "additionalProperties": false}}},
  {"type": "function", "function": {"name": "get_time", "description": "The time in a time zone.",
   "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 30}},
     "required": ["zone"], "additionalProperties": false}}}
]"#;

/// A call's arguments hold exactly what its tool's schema asks for.
fn check_arguments(name: &str, arguments: &Value) {
    let object = arguments.as_object().expect("arguments are an object");
    let string = |key: &str| {
        let value = object[key]
            .as_str()
            .unwrap_or_else(|| panic!("{key} in {arguments}"));
        assert!(value.chars().count() <= 30, "{arguments}");
        value
    };
    match name {
        "get_weather" => {
            assert_eq!(object.len(), 2, "{arguments}");
            string("city");
            assert!(
                ["celsius", "fahrenheit"].contains(&string("unit")),
                "{arguments}"
            );
        }
        "get_time" => {
            assert_eq!(object.len(), 1, "{arguments}");
            string("zone");
        }
        other => panic!("a call to {other}, which was not offered"),
    }
}

fn asking(
    model: &str,
    messages: Vec<pb::ChatMessage>,
    choice: &str,
    function: &str,
) -> pb::GenerateRequest {
    pb::GenerateRequest {
        model: model.into(),
        input: Some(pb::generate_request::Input::Messages(pb::ChatMessages {
            messages,
        })),
        max_tokens: Some(96),
        tools: Some(pb::Tools {
            json: TOOLS_JSON.into(),
            choice: choice.into(),
            function: function.into(),
        }),
        ..Default::default()
    }
}

fn user(content: &str) -> pb::ChatMessage {
    pb::ChatMessage {
        role: "user".into(),
        content: content.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_over_grpc_and_egpuctl() {
    let daemon = TestDaemon::start(&[]);
    let mut client = daemon.client().await;
    let dir = tempfile::tempdir().unwrap();
    let template = std::fs::read_to_string(
        models_dir()
            .join("templates")
            .join("Qwen-Qwen2.5-7B-Instruct.jinja"),
    )
    .expect("the Qwen 2.5 template (scripts/fetch-models.sh fetches it)");
    let hermes = with_chat_template(
        &model_path(SMOLLM2),
        &template,
        &dir.path().join("smol-qwen-template.gguf"),
    );
    load_as(&mut client, &hermes, "hermes").await;
    let question = vec![user("What is the weather in Paris?")];

    // Required: one call in GenerateDone, whose arguments match its tool; no call text in the
    // chunks.
    let required = generate(
        &mut client,
        asking("hermes", question.clone(), "required", ""),
    )
    .await
    .expect("a required call");
    let done = required.done.expect("a done event");
    assert_eq!(done.finish_reason, pb::FinishReason::Stop as i32);
    let [call] = done.tool_calls.as_slice() else {
        panic!("one call: {done:?}");
    };
    let arguments: Value = serde_json::from_str(&call.arguments_json).unwrap();
    check_arguments(&call.name, &arguments);
    assert!(call.id.starts_with("call-"), "{call:?}");
    assert!(
        !required.text.contains("<tool_call>"),
        "{:?}",
        required.text
    );

    // A named function, sampled: that function whatever the seed.
    for seed in [1, 2] {
        let mut request = asking("hermes", question.clone(), "", "get_time");
        request.sampling = Some(pb::SamplingOptions {
            temperature: 1.2,
            seed: Some(seed),
            ..Default::default()
        });
        let done = generate(&mut client, request).await.unwrap().done.unwrap();
        let [call] = done.tool_calls.as_slice() else {
            panic!("one call: {done:?}");
        };
        assert_eq!(call.name, "get_time");
        check_arguments(
            &call.name,
            &serde_json::from_str(&call.arguments_json).unwrap(),
        );
    }

    // The round trip: the call goes back in the assistant's turn, the tool's result after it,
    // and the model answers in text.
    let mut history = question.clone();
    history.push(pb::ChatMessage {
        role: "assistant".into(),
        tool_calls: vec![call.clone()],
        ..Default::default()
    });
    history.push(pb::ChatMessage {
        role: "tool".into(),
        content: r#"{"temperature": 18}"#.into(),
        tool_call_id: call.id.clone(),
        name: call.name.clone(),
        ..Default::default()
    });
    let answer = generate(&mut client, asking("hermes", history.clone(), "none", ""))
        .await
        .unwrap();
    assert!(answer.done.as_ref().unwrap().tool_calls.is_empty());
    assert!(!answer.text.trim().is_empty(), "{answer:?}");
    // Auto: text or calls, each call well formed.
    let auto = generate(&mut client, asking("hermes", history, "auto", ""))
        .await
        .unwrap();
    for call in &auto.done.as_ref().unwrap().tool_calls {
        check_arguments(
            &call.name,
            &serde_json::from_str(&call.arguments_json).unwrap(),
        );
    }

    // Bad tool requests are INVALID_ARGUMENT naming the problem.
    for (request, expected) in [
        (
            pb::GenerateRequest {
                tools: Some(pb::Tools {
                    json: "[{".into(),
                    ..Default::default()
                }),
                ..asking("hermes", question.clone(), "", "")
            },
            "tools.json",
        ),
        (
            asking("hermes", question.clone(), "sometimes", ""),
            "tools.choice",
        ),
        (
            asking("hermes", question.clone(), "", "nope"),
            "not among the tools",
        ),
    ] {
        let err = generate(&mut client, request).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(expected), "{err:?}");
    }

    // egpuctl generate --tools: the calls after the text, or in --json.
    let tools_file = dir.path().join("tools.json");
    std::fs::write(&tools_file, TOOLS_JSON).unwrap();
    let egpuctl = |extra: &[&str]| {
        let mut cmd = Command::new(binary("egpuctl"));
        cmd.arg("--socket").arg(&daemon.socket);
        cmd.args([
            "generate",
            "hermes",
            "What is the weather in Paris?",
            "--tools",
        ])
        .arg(&tools_file)
        .args(["--tool-choice", "required", "--max-tokens", "96"])
        .args(extra);
        let out = output_within(cmd, Duration::from_secs(120));
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let printed = egpuctl(&[]);
    let line = printed
        .lines()
        .find_map(|l| l.strip_prefix("tool call: "))
        .unwrap_or_else(|| panic!("no call printed: {printed:?}"));
    let (name, arguments) = line.split_once(' ').unwrap();
    check_arguments(name, &serde_json::from_str(arguments).unwrap());
    let json: Value = serde_json::from_str(&egpuctl(&["--json"])).unwrap();
    let calls = json["tool_calls"].as_array().expect("tool_calls in --json");
    assert_eq!(calls.len(), 1, "{json}");
    check_arguments(calls[0]["name"].as_str().unwrap(), &calls[0]["arguments"]);
}
