//! Hugging Face model folders through egpud: a GPT-2 folder (safetensors + vocab.json/merges.txt)
//! loaded by path and by repo id from an HF cache, scored and generated against transformers'
//! outputs for the same folder (`engine/tests/fixtures/hf`, made by `scripts/gen_tiny_hf.py`).

use std::path::{Path, PathBuf};

use egpu_e2e::v1 as pb;
use egpu_e2e::{binary, generate, greedy, load, status, TestDaemon};
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
    let converted: Vec<PathBuf> = ggufs(&models.path().join("hf"));
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

/// The GGUF files under `dir`.
fn ggufs(dir: &Path) -> Vec<PathBuf> {
    walk(dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .collect()
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

/// Converting is coalesced, atomic, checked on reuse, refused early for a bad name, and its
/// leftovers can be pruned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversions_are_coalesced_verified_on_reuse_and_prunable() {
    let models = tempfile::tempdir().unwrap();
    let daemon = TestDaemon::start_with_models(models.path(), &[], &[]);
    let hf = models.path().join("hf");

    // A bad name is refused before anything is converted.
    let err = load(
        &mut daemon.client().await,
        pb::LoadRequest {
            name: "no spaces allowed".into(),
            ..source_request(&fixture())
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(ggufs(&hf).is_empty(), "{:?}", walk(&hf));

    // Four loads of one folder at once: one conversion, four models (the second rename of a
    // shared temporary name used to fail).
    let mut loads = Vec::new();
    for i in 0..4 {
        let mut client = daemon.client().await;
        loads.push(tokio::spawn(async move {
            load(
                &mut client,
                pb::LoadRequest {
                    name: format!("gpt2-{i}"),
                    ..source_request(&fixture())
                },
            )
            .await
        }));
    }
    for l in loads {
        l.await.unwrap().expect("concurrent load");
    }
    let converted = ggufs(&hf);
    assert_eq!(converted.len(), 1, "{converted:?}");
    let whole = std::fs::read(&converted[0]).unwrap();
    // No temporary file is left beside it.
    assert!(
        walk(&hf).iter().all(|p| !p
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(".converting-")),
        "{:?}",
        walk(&hf)
    );

    // A conversion cut short (a crash of an older egpud mid-write) is converted again, not
    // reused for ever. (Damaged with no model mapping it: one that did would be unloaded.)
    let mut client = daemon.client().await;
    for i in 0..4 {
        client
            .unload(pb::UnloadRequest {
                name: format!("gpt2-{i}"),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    std::fs::write(&converted[0], &whole[..whole.len() / 2]).unwrap();
    let info = load(
        &mut client,
        pb::LoadRequest {
            name: "gpt2-again".into(),
            ..source_request(&fixture())
        },
    )
    .await
    .expect("a damaged conversion is redone");
    assert!(info.bytes_estimated > 0);
    assert_eq!(std::fs::read(&converted[0]).unwrap(), whole);

    // Pruning keeps what resident models use, and removes the rest.
    let prune = |socket: PathBuf| {
        let out = std::process::Command::new(binary("egpuctl"))
            .arg("--socket")
            .arg(socket)
            .args(["prune", "--json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let kept = prune(daemon.socket.clone());
    assert_eq!(kept["removed"].as_array().unwrap().len(), 0, "{kept}");
    assert_eq!(ggufs(&hf).len(), 1);
    client
        .unload(pb::UnloadRequest {
            name: "gpt2-again".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let pruned = prune(daemon.socket.clone());
    assert_eq!(pruned["removed"].as_array().unwrap().len(), 1, "{pruned}");
    assert!(pruned["freed_bytes"].as_u64().unwrap() >= whole.len() as u64);
    assert!(ggufs(&hf).is_empty(), "{:?}", walk(&hf));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversion_that_does_not_fit_the_budget_is_refused_before_it_runs() {
    let models = tempfile::tempdir().unwrap();
    let daemon = TestDaemon::start_with_models(models.path(), &["--memory-budget", "100KB"], &[]);
    let err = load(&mut daemon.client().await, source_request(&fixture()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("converting"), "{}", err.message());
    assert!(ggufs(&models.path().join("hf")).is_empty());
}
