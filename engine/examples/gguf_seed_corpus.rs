//! Writes a seed corpus for the `gguf_parse` fuzz target: small valid GGUF files built with the
//! writer, plus the real SmolLM2 file's header (with a small tensor table) when it is present.
//!
//!     cargo run -p egpu-engine --example gguf_seed_corpus -- DIR

use egpu_engine::gguf::write::GgufWriter;
use egpu_engine::gguf::{GgufFile, MetaArray, MetaValue};
use egpu_engine::quant::GgmlType;

fn main() -> std::io::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "fuzz/corpus/gguf_parse".into());
    std::fs::create_dir_all(&dir)?;
    let write = |name: &str, bytes: Vec<u8>| std::fs::write(format!("{dir}/{name}"), bytes);

    write("empty.gguf", GgufWriter::new().to_bytes())?;
    write(
        "v2.gguf",
        GgufWriter::new()
            .version(2)
            .tensor_f32("a", &[2], &[1.0, 2.0])
            .to_bytes(),
    )?;
    write(
        "values.gguf",
        GgufWriter::new()
            .kv("general.architecture", MetaValue::String("llama".into()))
            .kv("llama.block_count", MetaValue::U32(1))
            .kv("f", MetaValue::F64(1.5))
            .kv("b", MetaValue::Bool(true))
            .kv("i", MetaValue::I16(-3))
            .kv(
                "tokenizer.ggml.tokens",
                MetaValue::Array(MetaArray::String(vec!["a".into(), "b".into()])),
            )
            .kv(
                "n",
                MetaValue::Array(MetaArray::Array(vec![MetaArray::U64(vec![1, 2])])),
            )
            .to_bytes(),
    )?;
    let mut quants = GgufWriter::new().alignment(64);
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
        GgmlType::IQ4_XS,
        GgmlType::BF16,
    ] {
        let n = ty.block_size().max(32) as u64;
        let bytes = ty.bytes_for(n).unwrap_or(0) as usize;
        quants = quants.tensor(format!("t.{ty}"), &[n], ty, vec![0x11; bytes]);
    }
    write("quants.gguf", quants.to_bytes())?;

    let real = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if let Ok(file) = GgufFile::open(&real) {
        // The real metadata, re-written with one small tensor, keeps the seed a few MB.
        let mut w = GgufWriter::new();
        for (k, v) in file.metadata().iter() {
            w = w.kv(k, v.clone());
        }
        write(
            "smollm2-header.gguf",
            w.tensor_f32("x", &[4], &[0.0; 4]).to_bytes(),
        )?;
    }
    Ok(())
}
