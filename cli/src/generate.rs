//! `egpuctl generate`: one prompt in, streamed text out.

use std::io::{IsTerminal as _, Read as _};
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use egpu_proto::v1::{
    constraint, generate_event, generate_request, Constraint, GenerateDone, GenerateRequest,
    SamplingOptions, Tools,
};

use crate::client::{connect, request, Client};
use crate::format;
use crate::json::{self, GenerateJson};

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// Name of a resident model.
    model: String,
    /// The prompt; `-` reads all of stdin.
    prompt: String,
    /// Send the prompt as it is, without the model's chat template.
    #[arg(long)]
    raw: bool,
    /// Stop after this many tokens [default: at the end of text or a full context].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    max_tokens: Option<u32>,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Stop before this string (repeatable); it is not printed.
    #[arg(long = "stop", value_name = "S")]
    stops: Vec<String>,
    /// Also return the K most likely alternatives at each step (0..=20; needs --json to see).
    #[arg(long, value_name = "K", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=20))]
    logprobs: u32,
    #[command(flatten)]
    constraint: ConstraintArgs,
    #[command(flatten)]
    tools: ToolArgs,
    /// Print one JSON object at the end instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Print the token counts and speeds to stderr even when it is not a terminal.
    #[arg(long, short)]
    verbose: bool,
}

/// What the output must match (at most one), enforced by egpud token by token.
#[derive(Debug, Clone, Default, clap::Args)]
#[group(multiple = false)]
pub struct ConstraintArgs {
    /// Output JSON valid against the JSON schema in FILE (`-` reads stdin).
    #[arg(long, value_name = "FILE")]
    json_schema: Option<String>,
    /// Output any JSON object.
    #[arg(long)]
    json_object: bool,
    /// Output text that the regular expression matches as a whole.
    #[arg(long, value_name = "REGEX")]
    regex: Option<String>,
    /// Output text of the Lark grammar in FILE (llguidance's dialect; `-` reads stdin).
    #[arg(long, value_name = "FILE")]
    grammar: Option<String>,
}

impl ConstraintArgs {
    pub fn to_proto(&self) -> anyhow::Result<Option<Constraint>> {
        let read = |path: &str| -> anyhow::Result<String> {
            if path == "-" {
                return text_argument("-");
            }
            std::fs::read_to_string(path).with_context(|| format!("reading {path}"))
        };
        let kind = if let Some(path) = &self.json_schema {
            constraint::Kind::JsonSchema(read(path)?)
        } else if self.json_object {
            constraint::Kind::JsonObject(true)
        } else if let Some(regex) = &self.regex {
            constraint::Kind::Regex(regex.clone())
        } else if let Some(path) = &self.grammar {
            constraint::Kind::LarkGrammar(read(path)?)
        } else {
            return Ok(None);
        };
        Ok(Some(Constraint { kind: Some(kind) }))
    }
}

/// Tools the model may call, shown to it through its chat template.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ToolArgs {
    /// The tools, a JSON array in OpenAI's shape (`[{"type": "function", "function": {"name",
    /// "description", "parameters"}}]`) in FILE (`-` reads stdin). The calls the model makes
    /// are printed after its text, one `tool call: NAME ARGUMENTS` line each.
    #[arg(long, value_name = "FILE")]
    tools: Option<String>,
    /// auto (the model decides; a call it starts matches the tool's schema), none, required
    /// (exactly one call), or the name of the function it must call.
    #[arg(
        long,
        value_name = "CHOICE",
        requires = "tools",
        default_value = "auto"
    )]
    tool_choice: String,
}

impl ToolArgs {
    pub fn to_proto(&self) -> anyhow::Result<Option<Tools>> {
        let Some(path) = &self.tools else {
            return Ok(None);
        };
        let json = if path == "-" {
            text_argument("-")?
        } else {
            std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?
        };
        let (choice, function) = match self.tool_choice.as_str() {
            "auto" | "none" | "required" => (self.tool_choice.clone(), String::new()),
            name => (String::new(), name.to_owned()),
        };
        Ok(Some(Tools {
            json,
            choice,
            function,
        }))
    }
}

/// Sampling settings; unset ones take egpud's defaults (greedy).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SamplingArgs {
    /// 0 = greedy (the default).
    #[arg(long)]
    temperature: Option<f32>,
    /// Keep only the K most likely tokens; 0 = off.
    #[arg(long, value_name = "K")]
    top_k: Option<u32>,
    /// Nucleus sampling, in (0, 1].
    #[arg(long, value_name = "P")]
    top_p: Option<f32>,
    /// Drop tokens below P × the best token's probability.
    #[arg(long, value_name = "P")]
    min_p: Option<f32>,
    /// llama.cpp's repeat penalty; 1 = off.
    #[arg(long, value_name = "R")]
    repeat_penalty: Option<f32>,
    /// Seed for reproducible sampling.
    #[arg(long)]
    seed: Option<u64>,
}

impl SamplingArgs {
    pub fn new(temperature: Option<f32>, seed: Option<u64>) -> Self {
        SamplingArgs {
            temperature,
            seed,
            ..Self::default()
        }
    }

    pub fn to_proto(&self) -> SamplingOptions {
        SamplingOptions {
            temperature: self.temperature.unwrap_or(0.0),
            top_k: self.top_k.unwrap_or(0),
            top_p: self.top_p,
            min_p: self.min_p.unwrap_or(0.0),
            repeat_penalty: self.repeat_penalty,
            seed: self.seed,
            ..SamplingOptions::default()
        }
    }
}

/// Reads `-` as all of stdin; any other argument is the text itself.
pub fn text_argument(argument: &str) -> anyhow::Result<String> {
    if argument != "-" {
        return Ok(argument.to_owned());
    }
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .context("reading stdin")?;
    Ok(text)
}

pub async fn run(socket: &Path, args: &GenerateArgs) -> anyhow::Result<ExitCode> {
    let prompt = text_argument(&args.prompt)?;
    let mut client = connect(socket).await?;
    let generate = GenerateRequest {
        model: args.model.clone(),
        input: Some(generate_request::Input::Prompt(prompt)),
        raw: args.raw,
        sampling: Some(args.sampling.to_proto()),
        max_tokens: args.max_tokens,
        stop: args.stops.clone(),
        top_logprobs: args.logprobs,
        stop_at_eos: None,
        constraint: args.constraint.to_proto()?,
        tools: args.tools.to_proto()?,
    };
    let streaming = !args.json;
    let outcome = stream(&mut client, generate, |text| {
        if streaming {
            format::write_stdout(text)
        } else {
            Ok(true)
        }
    })
    .await?;
    // A closed stdout ended the stream early: nothing left to say, and no failure.
    let Some((result, done)) = outcome else {
        return Ok(ExitCode::SUCCESS);
    };
    if args.json {
        format::emit_json(&result)?;
    } else {
        format::emit("\n")?;
        for call in &done.tool_calls {
            format::emit(&format!(
                "tool call: {} {}\n",
                call.name, call.arguments_json
            ))?;
        }
        if args.verbose || std::io::stderr().is_terminal() {
            eprintln!("{}", stats_line(&done));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs one Generate stream, handing each chunk's text to `on_text` as it arrives.
/// `on_text` returns false to stop early (the stream is dropped, which cancels the
/// request); the result is then `None`.
pub async fn stream(
    client: &mut Client,
    generate: GenerateRequest,
    mut on_text: impl FnMut(&str) -> std::io::Result<bool>,
) -> anyhow::Result<Option<(GenerateJson, GenerateDone)>> {
    let mut events = client.generate(request(generate)).await?.into_inner();
    let mut result = GenerateJson::default();
    while let Some(event) = events.message().await? {
        match event.event {
            Some(generate_event::Event::Chunk(chunk)) => {
                if !chunk.text.is_empty() && !on_text(&chunk.text)? {
                    return Ok(None);
                }
                result.add_chunk(&chunk);
            }
            Some(generate_event::Event::Done(done)) => {
                result.finish(&done);
                return Ok(Some((result, done)));
            }
            None => {}
        }
    }
    anyhow::bail!("egpud ended the generate stream without a done event")
}

/// `[12 prompt + 64 completion tokens · prefill 850 tok/s · decode 95.3 tok/s · stop]`, with
/// `(N cached)` after the prompt count when part of it came from a slot's cache.
pub fn stats_line(done: &GenerateDone) -> String {
    let timings = done.timings.unwrap_or_default();
    let cached = match done.cached_prompt_tokens {
        0 => String::new(),
        n => format!(" ({n} cached)"),
    };
    format!(
        "[{} prompt{cached} + {} completion tokens · prefill {} tok/s · decode {} tok/s · {}]",
        done.prompt_tokens,
        done.completion_tokens,
        format::rate(timings.prefill_tokens_per_s),
        format::rate(timings.decode_tokens_per_s),
        json::finish_reason(done.finish_reason),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use egpu_proto::v1::{FinishReason, Timings};

    #[test]
    fn stats_summary() {
        let done = GenerateDone {
            finish_reason: FinishReason::Stop as i32,
            prompt_tokens: 12,
            cached_prompt_tokens: 0,
            completion_tokens: 64,
            tool_calls: Vec::new(),
            timings: Some(Timings {
                queue_ms: 0.0,
                prefill_ms: 14.1,
                decode_ms: 660.0,
                prefill_tokens_per_s: 850.2,
                decode_tokens_per_s: 95.34,
            }),
        };
        assert_eq!(
            stats_line(&done),
            "[12 prompt + 64 completion tokens · prefill 850 tok/s · decode 95.3 tok/s · stop]"
        );
    }

    #[test]
    fn unset_sampling_flags_leave_egpud_defaults() {
        let options = SamplingArgs::default().to_proto();
        assert_eq!(options, SamplingOptions::default());
        let options = SamplingArgs::new(Some(0.7), Some(42)).to_proto();
        assert_eq!(options.temperature, 0.7);
        assert_eq!(options.seed, Some(42));
        assert_eq!(options.top_p, None);
    }
}
