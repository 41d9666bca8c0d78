//! Prints the engine's configuration of a GGUF model as one line of JSON: the hyper-parameters
//! the tinygrad worker runs it with (egpud sends the same in each Load). Exit status 2 when
//! the engine does not support the model, 1 for any other error.
//!
//!     cargo run -p egpu-engine --example model_config -- models/SmolLM2-135M-Instruct.Q4_1.gguf

use std::process::ExitCode;

use egpu_engine::gguf::GgufFile;
use egpu_engine::models::decoder::{ModelConfig, ModelError};

fn main() -> ExitCode {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: model_config MODEL.gguf");
        return ExitCode::from(1);
    };
    let file = match GgufFile::open(&path) {
        Ok(file) => file,
        Err(e) => {
            eprintln!("{path}: {e}");
            return ExitCode::from(1);
        }
    };
    match ModelConfig::from_gguf(&file) {
        Ok(config) => {
            println!(
                "{}",
                serde_json::to_string(&config).expect("a config serializes")
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{path}: {e}");
            let unsupported = matches!(
                e,
                ModelError::UnsupportedArchitecture { .. }
                    | ModelError::Unsupported(_)
                    | ModelError::UnsupportedTensorType { .. }
            );
            ExitCode::from(if unsupported { 2 } else { 1 })
        }
    }
}
