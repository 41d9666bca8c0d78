//! `egpuctl translate`: sentences through a resident translation model (Marian / opus-mt).

use std::io::BufRead as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use egpu_proto::v1::{TranslateRequest, TranslateResponse};

use crate::client::{connect, request};
use crate::format;

/// Sentences sent per request when they come from stdin: large enough to batch well, small
/// enough that the first lines come back soon.
const STDIN_BATCH: usize = 32;

#[derive(Debug, clap::Args)]
pub struct TranslateArgs {
    /// Name of a resident translation model (e.g. opus-mt-en-de).
    model: String,
    /// Sentences to translate, translated together; with none, every line of stdin is one
    /// (empty lines stay empty).
    texts: Vec<String>,
    /// Beams of beam search; 1 = greedy [default: the model's generation_config.json].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=16))]
    beams: Option<u32>,
    /// Most output tokens per sentence [default: the model's].
    #[arg(long)]
    max_tokens: Option<u32>,
    /// Print one JSON object per sentence (text, token ids, score) instead of the text.
    #[arg(long)]
    json: bool,
}

pub async fn run(socket: &Path, args: &TranslateArgs) -> anyhow::Result<ExitCode> {
    let client = connect(socket).await?;
    let translate = |texts: Vec<String>| {
        let req = TranslateRequest {
            model: args.model.clone(),
            texts,
            num_beams: args.beams.unwrap_or(0),
            max_tokens: args.max_tokens.unwrap_or(0),
        };
        let mut client = client.clone();
        async move { Ok::<_, anyhow::Error>(client.translate(request(req)).await?.into_inner()) }
    };
    if !args.texts.is_empty() {
        let response = translate(args.texts.clone()).await?;
        print(&response, args.json)?;
        return Ok(ExitCode::SUCCESS);
    }
    // stdin: blank lines are kept in place (a translation model has nothing to say about them).
    let mut pending: Vec<String> = Vec::new();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        let line = lines.next().transpose().context("reading stdin")?;
        let end = line.is_none();
        if let Some(line) = line {
            pending.push(line);
        }
        if pending.len() >= STDIN_BATCH || (end && !pending.is_empty()) {
            let batch = std::mem::take(&mut pending);
            let texts: Vec<String> = batch
                .iter()
                .filter(|l| !l.trim().is_empty())
                .cloned()
                .collect();
            let mut translated = if texts.is_empty() {
                Vec::new()
            } else {
                translate(texts).await?.translations
            }
            .into_iter();
            let mut out = String::new();
            for line in &batch {
                if line.trim().is_empty() {
                    out.push('\n');
                    continue;
                }
                let t = translated.next().unwrap_or_default();
                if args.json {
                    out.push_str(&crate::json::translation(&t).to_string());
                } else {
                    out.push_str(&t.text);
                }
                out.push('\n');
            }
            format::emit(&out)?;
        }
        if end {
            return Ok(ExitCode::SUCCESS);
        }
    }
}

fn print(response: &TranslateResponse, json: bool) -> anyhow::Result<()> {
    let mut out = String::new();
    for t in &response.translations {
        if json {
            out.push_str(&crate::json::translation(t).to_string());
        } else {
            out.push_str(&t.text);
        }
        out.push('\n');
    }
    format::emit(&out)?;
    Ok(())
}
