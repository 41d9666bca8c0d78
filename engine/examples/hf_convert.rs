//! Converts a Hugging Face model folder (GPT-2 family, Marian, BERT) to the GGUF egpud would make of it,
//! for benchmarks that run llama.cpp on the same file.
//!
//! ```text
//! cargo run --release -p egpu-engine --example hf_convert -- FOLDER OUT.gguf [--quantize q8_0]
//! ```

use std::process::ExitCode;

use egpu_engine::convert::{gguf_from_hf_folder, WeightFormat};

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut paths = Vec::new();
    let mut format = WeightFormat::F32;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quantize" => {
                let name = args.next().ok_or("--quantize needs a value")?;
                format = WeightFormat::parse(&name).ok_or(format!("unknown format {name}"))?;
            }
            other => paths.push(other.to_owned()),
        }
    }
    let [folder, out] = paths.as_slice() else {
        return Err("usage: hf_convert FOLDER OUT.gguf [--quantize f32|q8_0]".into());
    };
    let started = std::time::Instant::now();
    let bytes = gguf_from_hf_folder(std::path::Path::new(folder), format)?;
    std::fs::write(out, &bytes)?;
    eprintln!(
        "wrote {out}: {} bytes, {} in {:.2} s",
        bytes.len(),
        format.name(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hf_convert: {e}");
            ExitCode::FAILURE
        }
    }
}
