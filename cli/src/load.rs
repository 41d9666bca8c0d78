//! `egpuctl load` and `egpuctl unload`: making a model resident and releasing it.

use std::io::IsTerminal as _;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use egpu_proto::v1::{load_event, LoadProgress, LoadRequest, ModelInfo, UnloadRequest};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::client::{connect, request};
use crate::duration::parse_keep_alive;
use crate::format::{self, bytes_decimal};
use crate::json;

#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// A .gguf path, a name in egpud's models folder (see `egpuctl models`), a Hugging Face
    /// model folder, or a Hugging Face repo id found in the local HF cache (GPT-2 family,
    /// Marian opus-mt).
    pub source: String,
    /// Serve the model under this name [default: the file's stem].
    #[arg(long)]
    pub name: Option<String>,
    /// Tokens per slot's KV cache [default: min(trained context, 4096)].
    #[arg(long)]
    pub ctx: Option<u32>,
    /// Sequences decoded together [default: 4].
    #[arg(long)]
    pub slots: Option<u32>,
    /// Never evict or expire this model.
    #[arg(long)]
    pub pin: bool,
    /// How long the model stays resident while idle: 30s, 10m, 2h, 0 (unload when idle),
    /// -1 or forever [default: egpud's, 5 minutes].
    #[arg(long, value_parser = parse_keep_alive, allow_hyphen_values = true)]
    pub keep_alive: Option<i64>,
    /// "cpu" or "tinygrad" [default: egpud's --backend].
    #[arg(long)]
    pub backend: Option<String>,
    /// For a Hugging Face folder: store the converted weights as "f32" or "q8_0" (8-bit,
    /// about 3.8x smaller) [default: f32].
    #[arg(long, value_name = "FORMAT")]
    pub quantize: Option<String>,
    /// Print the model as JSON instead of a sentence.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct UnloadArgs {
    /// Name of a resident model.
    pub name: String,
    /// Unload even while requests run or wait; they end with ABORTED.
    #[arg(long)]
    pub force: bool,
    /// Print JSON instead of a sentence.
    #[arg(long)]
    pub json: bool,
}

pub async fn run_load(socket: &Path, args: &LoadArgs) -> anyhow::Result<ExitCode> {
    let mut client = connect(socket).await?;
    let started = Instant::now();
    let load = LoadRequest {
        source: daemon_source(&args.source),
        name: args.name.clone().unwrap_or_default(),
        context_length: args.ctx.unwrap_or(0),
        slots: args.slots.unwrap_or(0),
        pin: args.pin,
        keep_alive_ms: args.keep_alive,
        backend: args.backend.clone().unwrap_or_default(),
        quantize: args.quantize.clone().unwrap_or_default(),
    };
    let mut events = client.load(request(load)).await?.into_inner();
    let mut progress = Progress::new(std::io::stderr().is_terminal());
    let mut resident = None;
    // The bar must be cleared on every path out, errors included, or the error line would
    // be printed after a half-drawn bar.
    let outcome = async {
        while let Some(event) = events.message().await? {
            match event.event {
                Some(load_event::Event::Progress(p)) => progress.update(&p),
                Some(load_event::Event::Model(model)) => {
                    resident = Some((model, event.already_resident));
                    break;
                }
                None => {}
            }
        }
        anyhow::Ok(())
    }
    .await;
    progress.finish();
    outcome?;
    let (model, already_resident) =
        resident.context("egpud ended the load stream without the model")?;
    if args.json {
        format::emit_json(&json::load(&model, already_resident))?;
    } else {
        format::emit(&(loaded_line(&model, already_resident, started.elapsed()) + "\n"))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `loaded smollm2 (llama, 104.2 MB, ctx 2048 × 4 slots) in 0.12 s`.
pub fn loaded_line(model: &ModelInfo, already_resident: bool, took: Duration) -> String {
    if already_resident {
        return format!("{} is already resident", model.name);
    }
    format!(
        "loaded {} ({}, {}, ctx {} × {} slots) in {:.2} s",
        model.name,
        model.architecture,
        bytes_decimal(model.bytes),
        model.context_length,
        model.slots,
        took.as_secs_f64()
    )
}

/// The progress bar on stderr; silent when stderr is not a terminal, so logs and pipes
/// get only the final line.
struct Progress {
    bar: Option<ProgressBar>,
    stage: String,
}

impl Progress {
    fn new(enabled: bool) -> Self {
        let bar = enabled.then(|| {
            // Spinner until the first event says more; indicatif's default is an empty bar.
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
                .with_style(style_for(&LoadProgress::default()))
                .with_message("connecting");
            bar.enable_steady_tick(Duration::from_millis(100));
            bar
        });
        Progress {
            bar,
            stage: String::new(),
        }
    }

    fn update(&mut self, progress: &LoadProgress) {
        let Some(bar) = &self.bar else { return };
        // The steady tick may draw between any two calls: message and counts go first, so
        // no frame shows the new stage's bar with the old stage's numbers.
        let message = if progress.message.is_empty() {
            progress.stage.clone()
        } else {
            format!("{}: {}", progress.stage, progress.message)
        };
        bar.set_message(message);
        bar.set_length(progress.total);
        bar.set_position(progress.done);
        if progress.stage != self.stage {
            self.stage.clone_from(&progress.stage);
            bar.set_style(style_for(progress));
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Only "reading weights" counts bytes (egpu.proto says so); other stages count units
/// without a name, or nothing when their total is unknown.
fn template_for(progress: &LoadProgress) -> &'static str {
    if progress.total == 0 {
        "{spinner} {msg}"
    } else if progress.stage == "reading weights" {
        "{spinner} {msg} [{bar:30}] {bytes}/{total_bytes}"
    } else {
        "{spinner} {msg} [{bar:30}] {pos}/{len}"
    }
}

fn style_for(progress: &LoadProgress) -> ProgressStyle {
    ProgressStyle::with_template(template_for(progress))
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
        .progress_chars("=> ")
}

pub async fn run_unload(socket: &Path, args: &UnloadArgs) -> anyhow::Result<ExitCode> {
    let mut client = connect(socket).await?;
    let response = client
        .unload(request(UnloadRequest {
            name: args.name.clone(),
            force: args.force,
        }))
        .await?
        .into_inner();
    if args.json {
        format::emit_json(&json::unload(&args.name, &response))?;
    } else {
        let mut line = format!(
            "unloaded {} (freed {})",
            args.name,
            bytes_decimal(response.freed_bytes)
        );
        if response.aborted_requests > 0 {
            line.push_str(&format!(
                ", aborted {} running request{}",
                response.aborted_requests,
                if response.aborted_requests == 1 {
                    ""
                } else {
                    "s"
                }
            ));
        }
        format::emit(&(line + "\n"))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// egpud runs in another working directory: a source that names a file or a folder (a Hugging
/// Face model folder) here is sent as an absolute path; anything else is a name for egpud's
/// models folder or a Hugging Face repo id.
fn daemon_source(source: &str) -> String {
    let path = Path::new(source);
    if path.is_file() || path.is_dir() {
        if let Ok(absolute) = std::fs::canonicalize(path) {
            return absolute.display().to_string();
        }
    }
    source.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::tests::sample_model;

    #[test]
    fn local_files_and_folders_are_sent_canonical_names_as_given() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("gpt2-folder")).unwrap();
        std::fs::write(dir.path().join("m.gguf"), b"").unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        // a roundabout spelling of each comes back canonical, as egpud needs it
        let roundabout = |name: &str| dir.path().join(".").join(name).display().to_string();
        assert_eq!(
            daemon_source(&roundabout("gpt2-folder")),
            root.join("gpt2-folder").display().to_string()
        );
        assert_eq!(
            daemon_source(&roundabout("m.gguf")),
            root.join("m.gguf").display().to_string()
        );
        assert_eq!(
            daemon_source("openai-community/gpt2"),
            "openai-community/gpt2"
        );
        assert_eq!(daemon_source("smollm2"), "smollm2");
    }

    #[test]
    fn loaded_sentence() {
        let model = sample_model();
        assert_eq!(
            loaded_line(&model, false, Duration::from_millis(123)),
            "loaded smollm2 (llama, 104.2 MB, ctx 2048 × 4 slots) in 0.12 s"
        );
        assert_eq!(
            loaded_line(&model, true, Duration::ZERO),
            "smollm2 is already resident"
        );
    }

    #[test]
    fn bytes_only_for_reading_weights() {
        let progress = |stage: &str, total| LoadProgress {
            stage: stage.into(),
            done: 1,
            total,
            message: String::new(),
        };
        let cases = [
            (progress("mapping", 0), "{spinner} {msg}"),
            (
                progress("reading weights", 10),
                "{spinner} {msg} [{bar:30}] {bytes}/{total_bytes}",
            ),
            (
                progress("evicting", 2),
                "{spinner} {msg} [{bar:30}] {pos}/{len}",
            ),
        ];
        for (p, expected) in cases {
            assert_eq!(template_for(&p), expected);
            assert!(ProgressStyle::with_template(expected).is_ok(), "{expected}");
        }
    }
}
