//! `egpuctl`: the command-line client for egpud, plus commands that need no daemon.
//!
//! The binary is a thin `main` over [`run`]. The library exists so that end-to-end tests
//! can reuse the `--json` shapes ([`json`]) and the exit statuses ([`client`]).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory as _, Parser};

/// The exit statuses, as a literal so that commands with their own after-help text can
/// `concat!` it.
macro_rules! exit_status_help {
    () => {
        "\
Exit status:
  0  success
  1  an error: bad arguments, an error egpud answered (printed as `egpuctl: CODE: message`),
     an unreadable file
  2  egpud is not running or not answering on the socket (start it with `egpud`)"
    };
}

const AFTER_HELP: &str = exit_status_help!();

pub mod api_key;
pub mod chat;
pub mod client;
pub mod doctor;
pub mod duration;
pub mod embed;
pub mod format;
pub mod generate;
pub mod inspect;
pub mod json;
pub mod load;
pub mod models;
pub mod score;
pub mod service;
pub mod status;
pub mod subprocess;
pub mod tokens;
pub mod translate;

#[derive(Debug, Parser)]
#[command(
    name = "egpuctl",
    version,
    about = "Control egpud and inspect model files",
    after_help = AFTER_HELP
)]
pub struct Cli {
    /// egpud's Unix socket.
    #[arg(long, global = true, env = egpu_proto::SOCKET_ENV, value_name = "PATH",
          default_value_os_t = egpu_proto::default_socket_path())]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Show the device, the memory budget and the resident models.
    #[command(after_help = AFTER_HELP)]
    Status(status::StatusArgs),
    /// Make a model resident (a path or a name in egpud's models folder).
    #[command(after_help = AFTER_HELP)]
    Load(load::LoadArgs),
    /// Release a resident model.
    #[command(after_help = AFTER_HELP)]
    Unload(load::UnloadArgs),
    /// Generate text from a prompt, streamed as it is decided.
    #[command(after_help = AFTER_HELP)]
    Generate(generate::GenerateArgs),
    /// Chat with a model; the conversation is kept until the command ends.
    Chat(chat::ChatArgs),
    /// Log-probability of every token of a text.
    #[command(after_help = AFTER_HELP)]
    Score(score::ScoreArgs),
    /// Embedding vectors of texts (a decoder model on the cpu backend).
    #[command(after_help = AFTER_HELP)]
    Embed(embed::EmbedArgs),
    /// Translate sentences with a translation model (text arguments, or stdin lines).
    #[command(after_help = AFTER_HELP)]
    Translate(translate::TranslateArgs),
    /// Text to token ids with a model's tokenizer.
    #[command(after_help = AFTER_HELP)]
    Tokenize(tokens::TokenizeArgs),
    /// Token ids back to text.
    #[command(after_help = AFTER_HELP)]
    Detokenize(tokens::DetokenizeArgs),
    /// List the models egpud can load: its models folder, Ollama's and LM Studio's stores, GGUF
    /// files in the Hugging Face cache.
    #[command(after_help = AFTER_HELP)]
    Models(models::ModelsArgs),
    /// Remove the GGUF conversions of Hugging Face folders that no resident model uses.
    #[command(after_help = AFTER_HELP)]
    Prune(models::PruneArgs),
    /// Describe a GGUF model file without loading it (no daemon needed).
    Inspect(inspect::InspectArgs),
    /// Print the key HTTP clients send over TCP (for OPENAI_API_KEY or OLLAMA_API_KEY).
    ApiKey(api_key::ApiKeyArgs),
    /// Run egpud at login and restart it when it crashes (launchd or systemd --user).
    Service(service::ServiceArgs),
    /// Check the tinygrad backend's setup: worker Python, compiler, the macOS eGPU driver, the
    /// device, egpud (exit status 1 when a check fails).
    Doctor(doctor::DoctorArgs),
    /// Print a shell completion script (no daemon needed).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Parses the command line and runs the command. Errors come back for [`client::report`].
pub fn run() -> anyhow::Result<ExitCode> {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            // clap exits 2 for usage errors by default; 2 is reserved for "egpud not
            // reachable", so usage errors get the generic 1. --help and --version are 0.
            let _ = error.print();
            return Ok(if error.use_stderr() {
                ExitCode::from(client::EXIT_ERROR)
            } else {
                ExitCode::SUCCESS
            });
        }
    };
    match &cli.command {
        Command::Inspect(args) => inspect::run(args),
        Command::Doctor(args) => doctor::run(&cli.socket, args),
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "egpuctl", &mut out);
            format::emit(&String::from_utf8_lossy(&out))?;
            Ok(ExitCode::SUCCESS)
        }
        command => {
            // Worker threads (rather than a current-thread runtime) keep the HTTP/2
            // connection serviced while `chat` blocks on reading stdin.
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(run_daemon_command(&cli.socket, command))
        }
    }
}

async fn run_daemon_command(socket: &Path, command: &Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Status(args) => status::run(socket, args).await,
        Command::Load(args) => load::run_load(socket, args).await,
        Command::Unload(args) => load::run_unload(socket, args).await,
        Command::Generate(args) => generate::run(socket, args).await,
        Command::Chat(args) => chat::run(socket, args).await,
        Command::Score(args) => score::run(socket, args).await,
        Command::Embed(args) => embed::run(socket, args).await,
        Command::Translate(args) => translate::run(socket, args).await,
        Command::Tokenize(args) => tokens::run_tokenize(socket, args).await,
        Command::Detokenize(args) => tokens::run_detokenize(socket, args).await,
        Command::Models(args) => models::run(socket, args).await,
        Command::Prune(args) => models::run_prune(socket, args).await,
        Command::ApiKey(args) => api_key::run(socket, args).await,
        Command::Service(args) => service::run(socket, args).await,
        Command::Inspect(_) | Command::Doctor(_) | Command::Completions { .. } => {
            unreachable!("handled without a runtime in run()")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn socket_is_global_and_keep_alive_takes_negatives() {
        let cli = Cli::try_parse_from([
            "egpuctl",
            "load",
            "smollm2",
            "--keep-alive",
            "-1",
            "--socket",
            "/tmp/x.sock",
        ])
        .unwrap();
        assert_eq!(cli.socket, PathBuf::from("/tmp/x.sock"));
        let Command::Load(args) = cli.command else {
            panic!("parsed as {:?}", cli.command)
        };
        assert_eq!(args.keep_alive, Some(-1));
        assert_eq!(args.source, "smollm2");
    }
}
