//! `egpuctl status`: the device, the memory budget and the resident models.

use std::path::Path;
use std::process::ExitCode;

use egpu_proto::v1::{ModelInfo, StatusRequest, StatusResponse};

use crate::client::{connect, request};
use crate::format::{self, bytes_decimal, Align};
use crate::json;

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub async fn run(socket: &Path, args: &StatusArgs) -> anyhow::Result<ExitCode> {
    let mut client = connect(socket).await?;
    let response = client.status(request(StatusRequest {})).await?.into_inner();
    if args.json {
        format::emit_json(&json::status(&response))?;
    } else {
        format::emit(&render(&response, now_unix_ms(), format::use_color()))?;
    }
    Ok(ExitCode::SUCCESS)
}

pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The summary line and the model table, with keep-alive times relative to `now_ms`.
pub fn render(response: &StatusResponse, now_ms: i64, bold: bool) -> String {
    let device = response.device.clone().unwrap_or_default();
    let mut out = format!(
        "{} ({}) · {} / {} used · egpud {} · up {}\n",
        device.name,
        device.kind,
        bytes_decimal(response.used_bytes),
        bytes_decimal(response.budget_bytes),
        response.version,
        format::uptime(response.uptime_seconds),
    );
    for b in response.backends.iter().filter(|b| b.backend != "cpu") {
        out.push_str(&backend_line(b));
    }
    if let Some(line) = http_line(response) {
        out.push_str(&line);
    }
    // The backend column only when there is a choice of backends.
    let with_backend = response.backends.len() > 1;
    let mut headers = vec![
        ("NAME", Align::Left),
        ("ARCH", Align::Left),
        ("SIZE", Align::Right),
        ("QUANT", Align::Left),
        ("CTX", Align::Right),
        ("SLOTS", Align::Right),
        ("ACTIVE", Align::Right),
        ("QUEUED", Align::Right),
        ("PINNED", Align::Left),
        ("UNTIL", Align::Left),
        ("STATE", Align::Left),
    ];
    if with_backend {
        headers.insert(2, ("BACKEND", Align::Left));
    }
    let rows: Vec<Vec<String>> = response
        .models
        .iter()
        .map(|m| {
            let mut row = vec![
                m.name.clone(),
                m.architecture.clone(),
                bytes_decimal(m.bytes),
                main_quant(m),
                m.context_length.to_string(),
                m.slots.to_string(),
                m.active.to_string(),
                m.queued.to_string(),
                if m.pinned { "yes" } else { "no" }.to_owned(),
                until(m, now_ms),
                json::model_state(m.state).to_owned(),
            ];
            if with_backend {
                row.insert(2, m.backend.clone());
            }
            row
        })
        .collect();
    out.push_str(&format::table(&headers, &rows, bold));
    for m in &response.models {
        if m.state == egpu_proto::v1::ModelState::Waiting as i32 {
            out.push_str(&format!(
                "{} is waiting (egpud retries it; `egpuctl unload {}` gives it up): {}\n",
                m.name, m.name, m.detail
            ));
        }
    }
    out
}

/// Where the OpenAI/Ollama-compatible HTTP API answers, if anywhere.
fn http_line(response: &StatusResponse) -> Option<String> {
    let mut parts = Vec::new();
    if !response.http_url.is_empty() {
        parts.push(if response.api_key_file.is_empty() {
            format!("{} (no key)", response.http_url)
        } else {
            format!("{} (key: egpuctl api-key)", response.http_url)
        });
    }
    if !response.http_socket.is_empty() {
        parts.push(format!("unix {}", response.http_socket));
    }
    (!parts.is_empty()).then(|| format!("http: {}\n", parts.join(" · ")))
}

/// A non-cpu backend: its device and memory when ready, else its state and why.
fn backend_line(b: &egpu_proto::v1::BackendStatus) -> String {
    if b.state == "ready" {
        let device = b.device.clone().unwrap_or_default();
        let mut what = vec![b.dev.clone(), b.arch.clone(), b.interface.clone()];
        what.retain(|s| !s.is_empty());
        format!(
            "{}: {} ({}) · {} / {} used · worker pid {}{}\n",
            b.backend,
            device.name,
            what.join(", "),
            bytes_decimal(b.used_bytes),
            bytes_decimal(b.budget_bytes),
            b.pid,
            if b.restarts > 0 {
                format!(" · {} restarts", b.restarts)
            } else {
                String::new()
            }
        )
    } else {
        let detail = if b.detail.is_empty() {
            String::new()
        } else {
            format!(": {}", b.detail)
        };
        format!("{}: {}{detail}\n", b.backend, b.state)
    }
}

/// The GGML type that holds most of the weights, which is what "Q4_K model" means.
fn main_quant(model: &ModelInfo) -> String {
    model
        .quant_mix
        .iter()
        .max_by_key(|q| q.bytes)
        .map_or_else(|| "-".to_owned(), |q| q.r#type.clone())
}

/// When an idle model unloads: never for pinned models and for expiry 0 (the proto's
/// "never"); otherwise relative to now.
fn until(model: &ModelInfo, now_ms: i64) -> String {
    if model.pinned || model.keep_alive_expires_unix_ms == 0 {
        "forever".to_owned()
    } else {
        format::until(model.keep_alive_expires_unix_ms, now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::tests::{sample_model, sample_status};
    use egpu_proto::v1::ModelState;

    #[test]
    fn table_like_ollama_ps() {
        let mut status = sample_status();
        let mut pinned = sample_model();
        pinned.name = "qwen3-0.6b".into();
        pinned.architecture = "qwen3".into();
        pinned.bytes = 1_234_500_000;
        pinned.quant_mix.reverse(); // the largest entry is found wherever it is
        pinned.pinned = true;
        pinned.active = 0;
        pinned.queued = 0;
        pinned.state = ModelState::Loading as i32;
        status.models.push(pinned);
        // Sample model expires at 1_700_000_300_000: 4 min 10 s after this "now".
        let text = render(&status, 1_700_000_050_000, false);
        assert_eq!(
            text,
            "AMD EPYC 7B13 (cpu) · 104.2 MB / 8.0 GB used · egpud 0.1.0 · up 3m 12s\n\
             http: http://127.0.0.1:11470 (key: egpuctl api-key) · unix /run/user/1000/egpu-http.sock\n\
             NAME         ARCH        SIZE   QUANT    CTX   SLOTS   ACTIVE   QUEUED   PINNED   UNTIL                STATE\n\
             smollm2      llama   104.2 MB   Q4_1    2048       4        1        2   no       4 minutes from now   ready\n\
             qwen3-0.6b   qwen3     1.2 GB   Q4_1    2048       4        0        0   yes      forever              loading\n"
        );
    }

    #[test]
    fn no_models_still_prints_headers_and_expiry_zero_is_forever() {
        let mut status = sample_status();
        status.models.clear();
        status.http_url.clear();
        status.http_socket.clear();
        let text = render(&status, 0, false);
        assert!(text.ends_with("STATE\n"), "{text}");
        assert_eq!(text.lines().count(), 2);

        let mut model = sample_model();
        model.keep_alive_expires_unix_ms = 0;
        model.quant_mix.clear();
        assert_eq!(until(&model, 5), "forever");
        assert_eq!(main_quant(&model), "-");
    }
}
