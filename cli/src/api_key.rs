//! `egpuctl api-key`: the key HTTP clients send to egpud over TCP, for `OPENAI_API_KEY` or
//! `OLLAMA_API_KEY`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use egpu_proto::v1::StatusRequest;

use crate::client::{connect, request};
use crate::format;

#[derive(Debug, clap::Args)]
pub struct ApiKeyArgs {
    /// egpud's state folder [default: where the running egpud keeps its key, else
    /// $XDG_STATE_HOME/egpu or ~/.local/state/egpu].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

/// Prints the key. The running egpud says where its key file is; without one (or with
/// `--state-dir`) the default state folder is read.
pub async fn run(socket: &Path, args: &ApiKeyArgs) -> anyhow::Result<ExitCode> {
    let file = match &args.state_dir {
        Some(dir) => dir.join(egpu_proto::API_KEY_FILE),
        None => match running_key_file(socket).await {
            Some(file) => file,
            None => egpu_proto::default_state_dir().join(egpu_proto::API_KEY_FILE),
        },
    };
    let key = std::fs::read_to_string(&file).with_context(|| {
        format!(
            "reading {} (egpud writes it when it first serves HTTP on TCP with --http-auth key)",
            file.display()
        )
    })?;
    format::emit(&format!("{}\n", key.trim()))?;
    Ok(ExitCode::SUCCESS)
}

/// The key file of the egpud on `socket`, if one answers and uses a key.
async fn running_key_file(socket: &Path) -> Option<PathBuf> {
    let mut client = connect(socket).await.ok()?;
    let status = client
        .status(request(StatusRequest {}))
        .await
        .ok()?
        .into_inner();
    (!status.api_key_file.is_empty()).then(|| PathBuf::from(status.api_key_file))
}
