//! `egpuctl embed`: one vector per text.

use std::path::Path;
use std::process::ExitCode;

use egpu_proto::v1::EmbedRequest;

use crate::client::{connect, request};
use crate::format;
use crate::generate::text_argument;

#[derive(Debug, clap::Args)]
pub struct EmbedArgs {
    /// Name of a resident model (on the cpu backend).
    model: String,
    /// The texts, one vector each; `-` reads all of stdin as one text.
    #[arg(required = true)]
    texts: Vec<String>,
    /// Keep the first N dimensions.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    dimensions: Option<u32>,
    /// Return the vectors as the model gives them, not scaled to unit length.
    #[arg(long)]
    raw: bool,
    /// Print JSON (`{"embeddings": [[…]], "prompt_tokens": N}`) instead of one line per text.
    #[arg(long)]
    json: bool,
}

pub async fn run(socket: &Path, args: &EmbedArgs) -> anyhow::Result<ExitCode> {
    let inputs = args
        .texts
        .iter()
        .map(|t| text_argument(t))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut client = connect(socket).await?;
    let response = client
        .embed(request(EmbedRequest {
            model: args.model.clone(),
            inputs,
            dimensions: args.dimensions,
            normalize: Some(!args.raw),
        }))
        .await?
        .into_inner();
    let vectors: Vec<&[f32]> = response.embeddings.iter().map(|e| &e.values[..]).collect();
    if args.json {
        format::emit_json(&serde_json::json!({
            "embeddings": vectors,
            "prompt_tokens": response.prompt_tokens,
        }))?;
    } else {
        // One line of space-separated values per text, in order: easy to paste or pipe.
        let mut out = String::new();
        for v in vectors {
            let line: Vec<String> = v.iter().map(|x| x.to_string()).collect();
            out.push_str(&line.join(" "));
            out.push('\n');
        }
        format::emit(&out)?;
    }
    Ok(ExitCode::SUCCESS)
}
