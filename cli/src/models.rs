//! `egpuctl models`: the model files in egpud's models folder.

use std::path::Path;
use std::process::ExitCode;

use egpu_proto::v1::{ListModelFilesRequest, ListModelFilesResponse, PruneConversionsRequest};

use crate::client::{connect, request};
use crate::format::{self, bytes_decimal, Align};
use crate::json;

#[derive(Debug, clap::Args)]
pub struct ModelsArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub async fn run(socket: &Path, args: &ModelsArgs) -> anyhow::Result<ExitCode> {
    let mut client = connect(socket).await?;
    let response = client
        .list_model_files(request(ListModelFilesRequest {}))
        .await?
        .into_inner();
    if args.json {
        format::emit_json(&json::model_files(&response))?;
    } else {
        format::emit(&render(&response, format::use_color()))?;
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, clap::Args)]
pub struct PruneArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// `egpuctl prune`: conversions of HF folders that nothing resident uses, removed by egpud.
pub async fn run_prune(socket: &Path, args: &PruneArgs) -> anyhow::Result<ExitCode> {
    let mut client = connect(socket).await?;
    let response = client
        .prune_conversions(request(PruneConversionsRequest {}))
        .await?
        .into_inner();
    if args.json {
        format::emit_json(&serde_json::json!({
            "removed": response.removed,
            "freed_bytes": response.freed_bytes,
        }))?;
    } else {
        let mut out = String::new();
        for dir in &response.removed {
            out.push_str(&format!("removed {dir}\n"));
        }
        out.push_str(&format!(
            "{} conversion(s) removed, {} freed\n",
            response.removed.len(),
            bytes_decimal(response.freed_bytes)
        ));
        format::emit(&out)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The folder, a table of its files, then why any unreadable file could not be read
/// (too long for a column).
pub fn render(response: &ListModelFilesResponse, bold: bool) -> String {
    let mut out = format!("models in {}\n", response.models_dir);
    let rows: Vec<Vec<String>> = response
        .files
        .iter()
        .map(|f| {
            let dash_if_empty = |s: String| if s.is_empty() { "-".to_owned() } else { s };
            vec![
                f.name.clone(),
                dash_if_empty(f.store.clone()),
                bytes_decimal(f.size_bytes),
                dash_if_empty(if f.error.is_empty() {
                    f.architecture.clone()
                } else {
                    "?".to_owned()
                }),
                dash_if_empty(f.resident_as.join(", ")),
                f.path.clone(),
            ]
        })
        .collect();
    let headers = [
        ("NAME", Align::Left),
        ("STORE", Align::Left),
        ("SIZE", Align::Right),
        ("ARCH", Align::Left),
        ("RESIDENT AS", Align::Left),
        ("PATH", Align::Left),
    ];
    out.push_str(&format::table(&headers, &rows, bold));
    for file in response.files.iter().filter(|f| !f.error.is_empty()) {
        out.push_str(&format!("? {}: {}\n", file.name, file.error));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use egpu_proto::v1::ModelFile;

    #[test]
    fn folder_table_and_errors() {
        let response = ListModelFilesResponse {
            models_dir: "/m".into(),
            files: vec![
                ModelFile {
                    name: "SmolLM2".into(),
                    path: "/m/SmolLM2.gguf".into(),
                    size_bytes: 105_000_000,
                    architecture: "llama".into(),
                    resident_as: vec!["smol".into(), "smol2".into()],
                    error: String::new(),
                    store: "models".into(),
                },
                ModelFile {
                    name: "broken".into(),
                    path: "/m/broken.gguf".into(),
                    size_bytes: 12,
                    architecture: String::new(),
                    resident_as: vec![],
                    error: "not a GGUF file".into(),
                    store: "ollama".into(),
                },
            ],
        };
        assert_eq!(
            render(&response, false),
            "models in /m\n\
             NAME      STORE        SIZE   ARCH    RESIDENT AS   PATH\n\
             SmolLM2   models   105.0 MB   llama   smol, smol2   /m/SmolLM2.gguf\n\
             broken    ollama       12 B   ?       -             /m/broken.gguf\n\
             ? broken: not a GGUF file\n"
        );
    }
}
