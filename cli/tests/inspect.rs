//! `egpuctl inspect` as a user runs it: the real binary on real and corrupt files.

use std::path::PathBuf;
use std::process::Command;

fn models_dir() -> PathBuf {
    match std::env::var_os("EGPU_MODELS") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models"),
    }
}

fn model(file: &str) -> PathBuf {
    let path = models_dir().join(file);
    assert!(
        path.is_file(),
        "{} missing: run scripts/fetch-models.sh",
        path.display()
    );
    path
}

fn egpuctl(args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_egpuctl"))
        .args(args)
        .output()
        .expect("run egpuctl")
}

#[test]
fn inspect_smollm2_text() {
    let path = model("SmolLM2-135M-Instruct.Q4_1.gguf");
    let out = egpuctl(&["inspect".as_ref(), path.as_os_str()]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for expected in [
        "architecture  llama",
        "context       8192 tokens",
        "30 layers, embedding 576, feed-forward 1536, 9 heads (3 KV), head dim 64",
        "vocabulary    49152 tokens",
        "byte-level BPE (gpt2, pre-tokenizer smollm)",
        "Q4_1         210",
        "token_embd.weight",
        "blk.29.ffn_down.weight",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
}

#[test]
fn inspect_json_estimates_memory_for_the_requested_context() {
    let path = model("SmolLM2-135M-Instruct.Q4_1.gguf");
    let run = |ctx: &str| -> serde_json::Value {
        let out = egpuctl(&[
            "inspect".as_ref(),
            path.as_os_str(),
            "--json".as_ref(),
            "--ctx".as_ref(),
            ctx.as_ref(),
        ]);
        assert!(out.status.success());
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let small = run("1024");
    let big = run("8192");
    assert_eq!(small["summary"]["vocab_size"], 49152);
    assert_eq!(small["tensors"].as_array().unwrap().len(), 272);
    let weights = small["memory"]["weights"].as_u64().unwrap();
    let tensor_sum: u64 = small["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(weights, tensor_sum);
    // 30 layers × 3 KV heads × (64 + 64) × 2 bytes per token of context.
    assert_eq!(
        small["memory"]["kv_cache"].as_u64().unwrap(),
        1024 * 30 * 3 * 128 * 2
    );
    assert_eq!(
        big["memory"]["kv_cache"].as_u64().unwrap(),
        8192 * 30 * 3 * 128 * 2
    );
    let total = |v: &serde_json::Value| v["memory"]["total"].as_u64().unwrap();
    assert!(total(&big) > total(&small));
}

#[test]
fn corrupt_or_missing_file_is_one_line_and_exit_1() {
    let dir = std::env::temp_dir().join(format!("egpuctl-inspect-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let truncated = dir.join("truncated.gguf");
    let real = std::fs::read(model("SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
    std::fs::write(&truncated, &real[..100_000]).unwrap();
    let not_gguf = dir.join("readme.gguf");
    std::fs::write(&not_gguf, b"hello world, not a model").unwrap();
    let missing = dir.join("missing.gguf");
    for (path, needle) in [
        (&truncated, "truncated at offset"),
        (&not_gguf, "not a GGUF file"),
        (&missing, "cannot read"),
    ] {
        let out = egpuctl(&["inspect".as_ref(), path.as_os_str()]);
        assert_eq!(out.status.code(), Some(1), "{}", path.display());
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(needle), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(out.stdout.is_empty());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
