//! Writes a copy of a GGUF with another chat template (`tokenizer.chat_template`): for trying a
//! model under another family's template, e.g. the tool-calling benchmark's SmolLM2 wearing
//! Qwen 2.5's `<tool_call>` template.
//!
//!     cargo run --release -p egpu-engine --example with_template -- SOURCE.gguf TEMPLATE.jinja DEST.gguf

use egpu_engine::gguf::write::GgufWriter;
use egpu_engine::gguf::{GgufFile, MetaValue};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [source, template, dest] = args.as_slice() else {
        return Err("usage: with_template SOURCE.gguf TEMPLATE.jinja DEST.gguf".into());
    };
    let file = GgufFile::open(source)?;
    let template = std::fs::read_to_string(template)?;
    let writer =
        GgufWriter::copy_of(&file).set_kv("tokenizer.chat_template", MetaValue::String(template));
    std::fs::write(dest, writer.to_bytes())?;
    Ok(())
}
