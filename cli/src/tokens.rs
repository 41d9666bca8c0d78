//! `egpuctl tokenize` and `egpuctl detokenize`: the model's tokenizer, for scripts.

use std::path::Path;
use std::process::ExitCode;

use egpu_proto::v1::{DetokenizeRequest, TokenizeRequest, TokenizeResponse};

use crate::client::{connect, request};
use crate::format::{self, Align};
use crate::generate::text_argument;
use crate::json;

#[derive(Debug, clap::Args)]
pub struct TokenizeArgs {
    /// Name of a resident model.
    model: String,
    /// The text; `-` reads all of stdin.
    text: String,
    /// Neither add BOS/EOS nor recognise special tokens written in the text.
    #[arg(long)]
    no_special: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub struct DetokenizeArgs {
    /// Name of a resident model.
    model: String,
    /// Token ids, e.g. the output of `tokenize`.
    #[arg(required = true, num_args = 1..)]
    ids: Vec<u32>,
    /// Print {"text": ...} instead of the bare text (exact, without an added newline).
    #[arg(long)]
    json: bool,
}

pub async fn run_tokenize(socket: &Path, args: &TokenizeArgs) -> anyhow::Result<ExitCode> {
    let text = text_argument(&args.text)?;
    let mut client = connect(socket).await?;
    let response = client
        .tokenize(request(TokenizeRequest {
            model: args.model.clone(),
            text,
            add_special: !args.no_special,
            parse_special: !args.no_special,
        }))
        .await?
        .into_inner();
    if args.json {
        format::emit_json(&json::TokenizeJson {
            token_ids: response.token_ids,
            pieces: response.pieces,
        })?;
    } else {
        format::emit(&render_tokens(&response, format::use_color()))?;
    }
    Ok(ExitCode::SUCCESS)
}

pub fn render_tokens(response: &TokenizeResponse, bold: bool) -> String {
    let rows: Vec<Vec<String>> = response
        .token_ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let piece = response.pieces.get(i).map_or("", String::as_str);
            vec![id.to_string(), format::token_text(piece)]
        })
        .collect();
    format::table(&[("ID", Align::Right), ("PIECE", Align::Left)], &rows, bold)
}

pub async fn run_detokenize(socket: &Path, args: &DetokenizeArgs) -> anyhow::Result<ExitCode> {
    let mut client = connect(socket).await?;
    let text = client
        .detokenize(request(DetokenizeRequest {
            model: args.model.clone(),
            token_ids: args.ids.clone(),
        }))
        .await?
        .into_inner()
        .text;
    if args.json {
        format::emit_json(&serde_json::json!({ "text": text }))?;
    } else {
        format::emit(&(text + "\n"))?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_table() {
        let response = TokenizeResponse {
            token_ids: vec![1, 19556, 13],
            pieces: vec!["<s>".into(), "Hello".into(), "\n".into()],
        };
        assert_eq!(
            render_tokens(&response, false),
            "   ID   PIECE\n    1   \"<s>\"\n19556   \"Hello\"\n   13   \"\\n\"\n"
        );
    }
}
