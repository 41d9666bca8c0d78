//! Hugging Face model folders through egpud: a GPT-2 folder (safetensors + vocab.json/merges.txt)
//! loaded by path and by repo id from an HF cache, scored and generated against transformers'
//! outputs for the same folder (`engine/tests/fixtures/hf`, made by `scripts/gen_tiny_hf.py`).

use std::path::{Path, PathBuf};

use egpu_e2e::v1 as pb;
use egpu_e2e::{generate, greedy, load, status, TestDaemon};
use serde_json::Value;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../engine/tests/fixtures/hf/tiny-gpt2")
}

fn reference() -> Value {
    let path = fixture().with_file_name("tiny-gpt2.ref.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn source_request(source: &Path) -> pb::LoadRequest {
    pb::LoadRequest {
        source: source.display().to_string(),
        ..Default::default()
    }
}

/// A fake HF hub cache holding the fixture as `egpu-test/tiny-gpt2`, snapshot `abc123`.
fn hub_with_fixture(root: &Path) -> PathBuf {
    let hub = root.join("hub");
    let snap = hub.join("models--egpu-test--tiny-gpt2/snapshots/abc123");
    std::fs::create_dir_all(&snap).unwrap();
    for entry in std::fs::read_dir(fixture()).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, snap.join(path.file_name().unwrap())).unwrap();
    }
    std::fs::create_dir_all(hub.join("models--egpu-test--tiny-gpt2/refs")).unwrap();
    std::fs::write(hub.join("models--egpu-test--tiny-gpt2/refs/main"), "abc123").unwrap();
    hub
}

#[tokio::test]
async fn gpt2_folder_loads_scores_and_generates_like_transformers() {
    let models = tempfile::tempdir().unwrap();
    let daemon = TestDaemon::start_with_models(models.path(), &[], &[]);
    let mut client = daemon.client().await;
    let info = load(&mut client, source_request(&fixture())).await.unwrap();
    assert_eq!(info.name, "tiny-gpt2");
    let st = status(&mut client).await;
    assert!(st.models.iter().any(|m| m.name == "tiny-gpt2"), "{st:?}");

    let reference = reference();
    let text = &reference["greedy_text"];
    let scored = client
        .score(pb::ScoreRequest {
            model: "tiny-gpt2".into(),
            text: text["prompt"].as_str().unwrap().into(),
            raw: true,
            top_k: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        scored.token_ids,
        ids(&text["prompt_ids"]),
        "tokenization differs from transformers'"
    );
    let mut max_diff = 0f64;
    for (pos, want) in scored.positions[1..]
        .iter()
        .zip(text["score_logprobs"].as_array().unwrap())
    {
        max_diff = max_diff.max((f64::from(pos.logprob.unwrap()) - want.as_f64().unwrap()).abs());
    }
    println!("max |logprob - transformers| over the prompt: {max_diff:e}");
    assert!(max_diff < 1e-4, "{max_diff}");

    let mut want = ids(&text["continuation"]);
    if let Some(eos) = want.iter().position(|&t| t == 319) {
        want.truncate(eos + 1); // egpud stops at <|endoftext|>; transformers was told not to
    }
    let got = generate(
        &mut client,
        greedy(
            "tiny-gpt2",
            text["prompt"].as_str().unwrap(),
            want.len() as u32,
        ),
    )
    .await
    .unwrap();
    assert_eq!(got.token_ids, want);

    // The conversion is kept: one GGUF under the models folder's hf/, reused by a second load.
    let converted: Vec<PathBuf> = walk(&models.path().join("hf"));
    assert_eq!(converted.len(), 1, "{converted:?}");
    assert!(converted[0].ends_with("tiny-gpt2.gguf"));
    let modified = std::fs::metadata(&converted[0])
        .unwrap()
        .modified()
        .unwrap();
    client
        .unload(pb::UnloadRequest {
            name: "tiny-gpt2".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    load(&mut client, source_request(&fixture())).await.unwrap();
    assert_eq!(
        std::fs::metadata(&converted[0])
            .unwrap()
            .modified()
            .unwrap(),
        modified
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[tokio::test]
async fn repo_ids_resolve_offline_from_the_hf_cache() {
    let models = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let hub = hub_with_fixture(cache.path());
    let daemon = TestDaemon::start_with_models(
        models.path(),
        &[],
        &[("HF_HUB_CACHE", hub.to_str().unwrap())],
    );
    let mut client = daemon.client().await;
    let info = load(
        &mut client,
        pb::LoadRequest {
            source: "egpu-test/tiny-gpt2".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(info.name, "tiny-gpt2");

    let err = load(
        &mut client,
        pb::LoadRequest {
            source: "egpu-test/not-downloaded".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(
        err.message().contains("not in the Hugging Face cache"),
        "{}",
        err.message()
    );

    // A folder of another architecture is refused with the supported list; egpud keeps serving.
    let llama = cache.path().join("llama");
    std::fs::create_dir_all(&llama).unwrap();
    let config = std::fs::read_to_string(fixture().join("config.json"))
        .unwrap()
        .replace("\"gpt2\"", "\"llama\"");
    std::fs::write(llama.join("config.json"), config).unwrap();
    let err = load(&mut client, source_request(&llama)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("supported: gpt2"),
        "{}",
        err.message()
    );
    assert!(status(&mut client)
        .await
        .models
        .iter()
        .any(|m| m.name == "tiny-gpt2"));
}
