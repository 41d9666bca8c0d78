//! `egpuctl inspect FILE`: what a GGUF file holds and what keeping it resident costs.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use egpu_engine::gguf::GgufFile;
use egpu_engine::models::info::{bytes_by_type, estimate_memory, MemoryEstimate, ModelSummary};
use serde::Serialize;

use crate::format::bytes;

/// Context length used for the memory estimate when `--ctx` is not given (capped by the
/// model's own maximum). The daemon uses the same default.
pub const DEFAULT_CONTEXT: u64 = 4096;

#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// A .gguf file (for split models, any shard).
    file: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Context length for the memory estimate [default: min(4096, model maximum)].
    #[arg(long)]
    ctx: Option<u64>,
    /// Also list every metadata key (long arrays are summarised).
    #[arg(long)]
    metadata: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    path: String,
    file_bytes: u64,
    gguf_version: u32,
    shards: usize,
    alignment: u64,
    summary: ModelSummary,
    tokenizer_kind: String,
    memory: MemoryEstimate,
    by_type: Vec<TypeRow>,
    tensors: Vec<TensorRow>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<Vec<(String, String)>>,
}

#[derive(Debug, Serialize)]
struct TypeRow {
    ggml_type: String,
    tensors: usize,
    bytes: u64,
}

#[derive(Debug, Serialize)]
struct TensorRow {
    name: String,
    ggml_type: String,
    dims: Vec<u64>,
    bytes: u64,
    offset: u64,
    shard: usize,
}

pub fn run(args: &InspectArgs) -> anyhow::Result<ExitCode> {
    let file = GgufFile::open(&args.file).with_context(|| format!("{}", args.file.display()))?;
    let summary = ModelSummary::from_metadata(file.metadata());
    let context = args.ctx.unwrap_or_else(|| {
        summary
            .context_length
            .map_or(DEFAULT_CONTEXT, |max| max.min(DEFAULT_CONTEXT))
    });
    let report = Report {
        path: args.file.display().to_string(),
        file_bytes: file.file_bytes(),
        gguf_version: file.version(),
        shards: file.shard_count(),
        alignment: file.alignment(),
        tokenizer_kind: summary.tokenizer_kind(),
        memory: estimate_memory(&file, context),
        by_type: bytes_by_type(&file)
            .into_iter()
            .map(|(ty, (tensors, bytes))| TypeRow {
                ggml_type: ty.name().to_owned(),
                tensors,
                bytes,
            })
            .collect(),
        tensors: file
            .tensors()
            .iter()
            .map(|t| TensorRow {
                name: t.name.clone(),
                ggml_type: t.ggml_type.name().to_owned(),
                dims: t.dims.clone(),
                bytes: t.n_bytes,
                offset: t.file_offset,
                shard: t.shard,
            })
            .collect(),
        metadata: args.metadata.then(|| {
            file.metadata()
                .iter()
                .map(|(k, v)| (k.to_owned(), v.to_string()))
                .collect()
        }),
        summary,
    };
    let text = if args.json {
        serde_json::to_string_pretty(&report)? + "\n"
    } else {
        render_text(&report)
    };
    crate::format::emit(&text)?;
    Ok(ExitCode::SUCCESS)
}

fn render_text(r: &Report) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let s = &r.summary;
    writeln!(out, "file          {}", r.path).ok();
    writeln!(
        out,
        "format        GGUF v{}, {} file(s), {}, alignment {}",
        r.gguf_version,
        r.shards,
        bytes(r.file_bytes),
        r.alignment
    )
    .ok();
    if let Some(name) = &s.name {
        writeln!(out, "name          {name}").ok();
    }
    writeln!(out, "architecture  {}", s.architecture).ok();
    match s.context_length {
        Some(ctx) => writeln!(out, "context       {ctx} tokens (trained maximum)"),
        None => writeln!(out, "context       unknown"),
    }
    .ok();
    let kv: Vec<String> = {
        let mut kv = s.head_count_kv.clone();
        kv.dedup();
        kv.iter().map(u64::to_string).collect()
    };
    writeln!(
        out,
        "shape         {} layers, embedding {}, feed-forward {}, {} heads ({} KV), head dim {}",
        s.block_count,
        s.embedding_length,
        s.feed_forward_length,
        s.head_count,
        kv.join("/"),
        s.key_length
    )
    .ok();
    if let Some(window) = s.sliding_window {
        writeln!(out, "attention     sliding window {window}").ok();
    }
    writeln!(out, "vocabulary    {} tokens", s.vocab_size).ok();
    writeln!(out, "tokenizer     {}", r.tokenizer_kind).ok();
    writeln!(
        out,
        "chat template {}",
        if s.has_chat_template {
            "yes"
        } else {
            "none in the file (egpu uses built-in Gemma for Gemma vocabularies, else ChatML)"
        }
    )
    .ok();
    let m = &r.memory;
    writeln!(
        out,
        "memory        {} at context {}: weights {} + KV cache (f16) {} + scratch {}",
        bytes(m.total),
        m.context,
        bytes(m.weights),
        bytes(m.kv_cache),
        bytes(m.scratch)
    )
    .ok();
    writeln!(out).ok();
    writeln!(
        out,
        "{:<8} {:>7} {:>12} {:>7}",
        "type", "tensors", "bytes", "share"
    )
    .ok();
    let total: u64 = r.by_type.iter().map(|t| t.bytes).sum();
    for t in &r.by_type {
        writeln!(
            out,
            "{:<8} {:>7} {:>12} {:>6.1}%",
            t.ggml_type,
            t.tensors,
            bytes(t.bytes),
            100.0 * t.bytes as f64 / total.max(1) as f64
        )
        .ok();
    }
    writeln!(out).ok();
    let width = r.tensors.iter().map(|t| t.name.len()).max().unwrap_or(4);
    writeln!(
        out,
        "{:<width$} {:<8} {:<22} {:>12} {:>12}",
        "tensor", "type", "dims", "bytes", "offset"
    )
    .ok();
    for t in &r.tensors {
        let dims: Vec<String> = t.dims.iter().map(u64::to_string).collect();
        writeln!(
            out,
            "{:<width$} {:<8} {:<22} {:>12} {:>12}",
            t.name,
            t.ggml_type,
            dims.join(" × "),
            t.bytes,
            t.offset
        )
        .ok();
    }
    if let Some(meta) = &r.metadata {
        writeln!(out).ok();
        for (k, v) in meta {
            writeln!(out, "{k} = {v}").ok();
        }
    }
    out
}
