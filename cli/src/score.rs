//! `egpuctl score`: how likely a model finds each token of a text.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;

use egpu_proto::v1::{DetokenizeRequest, ScoreRequest, ScoreResponse, TokenizeRequest};

use crate::client::{connect, request, Client};
use crate::format::{self, Align};
use crate::generate::text_argument;
use crate::json;

#[derive(Debug, clap::Args)]
pub struct ScoreArgs {
    /// Name of a resident model.
    model: String,
    /// The text to score; `-` reads all of stdin.
    text: String,
    /// Tokenize the text exactly, without putting the model's BOS first.
    #[arg(long)]
    raw: bool,
    /// Show this many alternatives per position (0..=20) [default: 1, the best one].
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u32).range(0..=20))]
    top: Option<u32>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub async fn run(socket: &Path, args: &ScoreArgs) -> anyhow::Result<ExitCode> {
    let text = text_argument(&args.text)?;
    let mut client = connect(socket).await?;
    let top_k = args.top.unwrap_or(if args.json { 0 } else { 1 });
    let response = client
        .score(request(ScoreRequest {
            model: args.model.clone(),
            text: text.clone(),
            raw: args.raw,
            top_k,
        }))
        .await?
        .into_inner();
    if args.json {
        format::emit_json(&json::score(&response))?;
        return Ok(ExitCode::SUCCESS);
    }
    let pieces = token_pieces(&mut client, &args.model, &text, args.raw, &response).await?;
    format::emit(&render(&response, &pieces, format::use_color()))?;
    Ok(ExitCode::SUCCESS)
}

/// The text of each scored token. One Tokenize call usually gives them all; when its
/// tokens differ from the scored ones (egpud's scoring may treat specials differently),
/// each distinct id is detokenized instead.
async fn token_pieces(
    client: &mut Client,
    model: &str,
    text: &str,
    raw: bool,
    response: &ScoreResponse,
) -> anyhow::Result<Vec<String>> {
    let tokenized = client
        .tokenize(request(TokenizeRequest {
            model: model.to_owned(),
            text: text.to_owned(),
            add_special: !raw,
            parse_special: false,
        }))
        .await?
        .into_inner();
    if tokenized.token_ids == response.token_ids
        && tokenized.pieces.len() == response.token_ids.len()
    {
        return Ok(tokenized.pieces);
    }
    let mut texts = BTreeMap::new();
    for &id in &response.token_ids {
        if texts.contains_key(&id) {
            continue;
        }
        let piece = client
            .detokenize(request(DetokenizeRequest {
                model: model.to_owned(),
                token_ids: vec![id],
            }))
            .await?
            .into_inner()
            .text;
        texts.insert(id, piece);
    }
    Ok(response
        .token_ids
        .iter()
        .map(|id| texts[id].clone())
        .collect())
}

/// One row per token (position, id, text, log-probability, best alternative), then the
/// total and the perplexity over the positions that have a log-probability.
pub fn render(response: &ScoreResponse, pieces: &[String], bold: bool) -> String {
    let headers = [
        ("POS", Align::Right),
        ("ID", Align::Right),
        ("TOKEN", Align::Left),
        ("LOGPROB", Align::Right),
        ("BEST ALTERNATIVE", Align::Left),
    ];
    let rows: Vec<Vec<String>> = response
        .token_ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let position = response.positions.get(i);
            let logprob = position
                .and_then(|p| p.logprob)
                .map_or_else(|| "-".to_owned(), |l| format!("{l:.3}"));
            let best = position.and_then(|p| p.top.first()).map_or_else(
                || "-".to_owned(),
                |best| {
                    if best.id == *id {
                        "(this one)".to_owned()
                    } else {
                        format!("{} {:.3}", format::token_text(&best.text), best.logprob)
                    }
                },
            );
            vec![
                i.to_string(),
                id.to_string(),
                format::token_text(pieces.get(i).map_or("", String::as_str)),
                logprob,
                best,
            ]
        })
        .collect();
    let mut out = format::table(&headers, &rows, bold);
    let scored = response
        .positions
        .iter()
        .filter(|p| p.logprob.is_some())
        .count();
    out.push_str(&format!(
        "total {:.3} over {} token{}",
        response.total_logprob,
        scored,
        if scored == 1 { "" } else { "s" }
    ));
    if scored > 0 {
        let perplexity = (-response.total_logprob / scored as f64).exp();
        out.push_str(&format!(" · perplexity {perplexity:.2}"));
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use egpu_proto::v1::{ScorePosition, TokenLogprob};

    #[test]
    fn table_and_total() {
        let alternative = |id, logprob, text: &str| TokenLogprob {
            id,
            logprob,
            text: text.into(),
        };
        let response = ScoreResponse {
            token_ids: vec![1, 504, 198],
            positions: vec![
                ScorePosition {
                    logprob: None,
                    top: vec![],
                },
                ScorePosition {
                    logprob: Some(-2.5),
                    top: vec![alternative(30, -1.25, " a")],
                },
                ScorePosition {
                    logprob: Some(-0.5),
                    top: vec![alternative(198, -0.5, "\n")],
                },
            ],
            total_logprob: -3.0,
        };
        let pieces = ["<s>".to_owned(), " The".to_owned(), "\n".to_owned()];
        assert_eq!(
            render(&response, &pieces, false),
            "POS    ID   TOKEN    LOGPROB   BEST ALTERNATIVE\n\
             \x20 0     1   \"<s>\"          -   -\n\
             \x20 1   504   \" The\"    -2.500   \" a\" -1.250\n\
             \x20 2   198   \"\\n\"      -0.500   (this one)\n\
             total -3.000 over 2 tokens · perplexity 4.48\n"
        );
    }
}
