//! egpu.v1 messages to the core's types and back, and domain errors to gRPC statuses: the
//! one place where the gRPC front end meets the protocol's types.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use egpu_engine::chat::ChatMessage;
use egpu_proto::v1::{self as pb, generate_request::Input, load_event};
use tonic::{Code, Status};

use crate::backend::device::DeviceInfo;
use crate::core::requests::{
    Constraint, GenerateRequest, PromptInput, SamplingOptions, ScoreRequest, TranslateRequest,
};
use crate::core::tools::{ToolCall, ToolChoice, Tools};
use crate::core::{BackendReport, StatusReport};
use crate::error::DaemonError;
use crate::residency::{KeepAlive, LoadOptions, LoadProgress, ModelFile, ModelInfo, ModelState};
use crate::scheduler::events::{
    FinishReason, GenerationDone, ScoreResult, TokenChunk, TokenLogprob, TokenLogprobs,
    TranslateResult,
};

/// The gRPC code of each domain error.
pub fn status(err: DaemonError) -> Status {
    let code = match &err {
        DaemonError::UnknownModel { .. }
        | DaemonError::MissingFile(_)
        | DaemonError::UnknownSource { .. }
        | DaemonError::NotInHfCache(_) => Code::NotFound,
        DaemonError::BadModelFile { .. }
        | DaemonError::InvalidArgument(_)
        | DaemonError::UnsupportedBackend { .. } => Code::InvalidArgument,
        DaemonError::NameTaken { .. } => Code::AlreadyExists,
        DaemonError::OverBudget { .. }
        | DaemonError::TranslationTooLarge { .. }
        | DaemonError::QueueFull { .. }
        | DaemonError::DeviceOutOfMemory(_) => Code::ResourceExhausted,
        DaemonError::Busy { .. } => Code::FailedPrecondition,
        DaemonError::Unloaded(_) | DaemonError::ModelFileChanged(_) => Code::Aborted,
        DaemonError::ShuttingDown
        | DaemonError::DeviceLost(_)
        | DaemonError::DeviceUnavailable(_)
        | DaemonError::PinWaiting { .. }
        | DaemonError::StillLoading(_) => Code::Unavailable,
        DaemonError::DeadlineExceeded { .. } => Code::DeadlineExceeded,
        DaemonError::Internal(_) => Code::Internal,
    };
    Status::new(code, err.to_string())
}

pub fn load_options(req: pb::LoadRequest) -> LoadOptions {
    LoadOptions {
        source: req.source,
        name: Some(req.name).filter(|n| !n.is_empty()),
        context: Some(req.context_length as usize).filter(|&c| c > 0),
        slots: Some(req.slots as usize).filter(|&s| s > 0),
        pin: req.pin,
        keep_alive: req.keep_alive_ms.map(KeepAlive::from_millis),
        backend: Some(req.backend).filter(|b| !b.is_empty()),
        quantize: Some(req.quantize).filter(|q| !q.is_empty()),
    }
}

pub fn generate_request(req: pb::GenerateRequest) -> Result<GenerateRequest, DaemonError> {
    Ok(GenerateRequest {
        model: req.model,
        input: req.input.map(|input| match input {
            Input::Prompt(p) => PromptInput::Text(p),
            Input::Messages(m) => {
                PromptInput::Messages(m.messages.into_iter().map(chat_message).collect())
            }
        }),
        raw: req.raw,
        sampling: req.sampling.map(sampling).unwrap_or_default(),
        max_tokens: req.max_tokens,
        stop: req.stop,
        top_logprobs: req.top_logprobs,
        stop_at_eos: req.stop_at_eos,
        constraint: req.constraint.and_then(|c| c.kind).and_then(constraint),
        tools: req.tools.map(tools).transpose()?,
    })
}

/// A message, with an assistant turn's calls in the form templates render (transformers':
/// arguments as a JSON object).
fn chat_message(m: pb::ChatMessage) -> ChatMessage {
    let mut message = ChatMessage::new(m.role, m.content);
    if !m.tool_calls.is_empty() {
        let calls = m.tool_calls.into_iter().map(|c| {
            let arguments = serde_json::from_str(&c.arguments_json)
                .unwrap_or(serde_json::Value::String(c.arguments_json));
            serde_json::json!({
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": arguments},
            })
        });
        message.tool_calls = Some(serde_json::Value::Array(calls.collect()));
    }
    message.tool_call_id = Some(m.tool_call_id).filter(|id| !id.is_empty());
    message.name = Some(m.name).filter(|name| !name.is_empty());
    message
}

fn tools(t: pb::Tools) -> Result<Tools, DaemonError> {
    let invalid = |m: String| Err(DaemonError::InvalidArgument(m));
    let list = match serde_json::from_str(&t.json) {
        Ok(serde_json::Value::Array(list)) => list,
        Ok(_) => return invalid("tools.json must be a JSON array of tools".into()),
        Err(e) => return invalid(format!("tools.json is not JSON: {e}")),
    };
    let choice = if !t.function.is_empty() {
        ToolChoice::Function(t.function)
    } else {
        match t.choice.as_str() {
            "" | "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" => ToolChoice::Required,
            other => {
                return invalid(format!(
                    "tools.choice {other:?} is not auto, none or required (tools.function \
                     names a function)"
                ))
            }
        }
    };
    Ok(Tools { list, choice })
}

/// The calls a model made, with fresh ids.
pub fn tool_calls(calls: Vec<ToolCall>) -> Vec<pb::ToolCall> {
    calls
        .into_iter()
        .map(|c| pb::ToolCall {
            id: crate::frontend::completion_id("call"),
            name: c.name,
            arguments_json: c.arguments.to_string(),
        })
        .collect()
}

/// `json_object: false` asks for nothing.
fn constraint(kind: pb::constraint::Kind) -> Option<Constraint> {
    Some(match kind {
        pb::constraint::Kind::JsonSchema(schema) => Constraint::JsonSchema(schema),
        pb::constraint::Kind::JsonObject(true) => Constraint::JsonObject,
        pb::constraint::Kind::JsonObject(false) => return None,
        pb::constraint::Kind::Regex(regex) => Constraint::Regex(regex),
        pb::constraint::Kind::LarkGrammar(lark) => Constraint::Lark(lark),
    })
}

fn sampling(o: pb::SamplingOptions) -> SamplingOptions {
    SamplingOptions {
        temperature: o.temperature,
        top_k: o.top_k,
        top_p: o.top_p,
        min_p: o.min_p,
        repeat_penalty: o.repeat_penalty,
        frequency_penalty: o.frequency_penalty,
        presence_penalty: o.presence_penalty,
        penalty_last_n: o.penalty_last_n,
        seed: o.seed,
    }
}

pub fn score_request(req: pb::ScoreRequest) -> ScoreRequest {
    ScoreRequest {
        model: req.model,
        text: req.text,
        raw: req.raw,
        top_k: req.top_k,
    }
}

pub fn translate_request(req: pb::TranslateRequest) -> TranslateRequest {
    TranslateRequest {
        model: req.model,
        texts: req.texts,
        num_beams: req.num_beams,
        max_tokens: req.max_tokens,
    }
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn device(d: DeviceInfo) -> pb::DeviceInfo {
    pb::DeviceInfo {
        name: d.name,
        kind: d.kind,
        memory_total_bytes: d.memory_total,
        memory_free_bytes: d.memory_free,
    }
}

pub fn model_info(m: ModelInfo) -> pb::ModelInfo {
    pb::ModelInfo {
        name: m.name,
        source: m.source.display().to_string(),
        architecture: m.architecture,
        quant_mix: m
            .quant_mix
            .into_iter()
            .map(|q| pb::QuantShare {
                r#type: q.ggml_type,
                tensors: q.tensors as u32,
                bytes: q.bytes,
            })
            .collect(),
        bytes: m.bytes,
        bytes_estimated: m.bytes_estimated,
        context_length: m.context_length as u32,
        slots: m.slots as u32,
        pinned: m.pinned,
        keep_alive_expires_unix_ms: m.keep_alive_expires.map_or(0, unix_ms),
        active: m.active as u32,
        queued: m.queued as u32,
        requests_served: m.requests_served,
        last_used_unix_ms: unix_ms(m.last_used),
        backend: m.backend.as_str().into(),
        state: match m.state {
            ModelState::Loading => pb::ModelState::Loading,
            ModelState::Ready => pb::ModelState::Ready,
            ModelState::Waiting => pb::ModelState::Waiting,
        } as i32,
        detail: m.detail,
        parameters: m.parameters,
        vocab_size: m.vocab_size as u32,
        trained_context_length: m.trained_context_length.unwrap_or(0) as u32,
        prefix_cache: Some(pb::PrefixCacheStats {
            lookups: m.prefix_cache.lookups,
            hits: m.prefix_cache.hits,
            reused_tokens: m.prefix_cache.reused_tokens,
            copies: m.prefix_cache.copies,
            copied_tokens: m.prefix_cache.copied_tokens,
        }),
    }
}

pub fn load_progress(p: LoadProgress) -> pb::LoadEvent {
    pb::LoadEvent {
        event: Some(load_event::Event::Progress(pb::LoadProgress {
            stage: p.stage,
            done: p.done,
            total: p.total,
            message: p.message,
        })),
        already_resident: false,
    }
}

pub fn model_event(model: ModelInfo, already_resident: bool) -> pb::LoadEvent {
    pb::LoadEvent {
        event: Some(load_event::Event::Model(model_info(model))),
        already_resident,
    }
}

fn backend_status(b: BackendReport) -> pb::BackendStatus {
    pb::BackendStatus {
        backend: b.backend.as_str().into(),
        state: b.state.as_str().into(),
        detail: b.detail,
        device: b.device.map(device),
        dev: b.dev,
        arch: b.arch,
        interface: b.interface,
        budget_bytes: b.budget,
        used_bytes: b.used,
        restarts: b.restarts,
        pid: b.pid,
        allocated_bytes: b.allocated,
    }
}

pub fn status_response(s: StatusReport) -> pb::StatusResponse {
    pb::StatusResponse {
        device: Some(device(s.device)),
        budget_bytes: s.budget,
        used_bytes: s.used,
        backends: s.backends.into_iter().map(backend_status).collect(),
        models: s.models.into_iter().map(model_info).collect(),
        version: s.version.into(),
        uptime_seconds: s.uptime.as_secs_f64(),
        models_dir: s.models_dir.display().to_string(),
        threads: s.threads as u32,
        http_url: s.endpoints.http_url,
        http_socket: s.endpoints.http_socket,
        api_key_file: s.endpoints.api_key_file,
    }
}

fn token_logprob(t: TokenLogprob) -> pb::TokenLogprob {
    pb::TokenLogprob {
        id: t.id,
        logprob: t.logprob,
        text: t.text,
    }
}

fn token_logprobs(t: TokenLogprobs) -> pb::TokenLogprobs {
    pb::TokenLogprobs {
        token: Some(token_logprob(t.token)),
        top: t.top.into_iter().map(token_logprob).collect(),
    }
}

pub fn chunk_event(c: TokenChunk) -> pb::GenerateEvent {
    pb::GenerateEvent {
        event: Some(pb::generate_event::Event::Chunk(pb::GenerateChunk {
            text: c.text,
            token_ids: c.token_ids,
            logprobs: c.logprobs.into_iter().map(token_logprobs).collect(),
        })),
    }
}

/// A chunk of text alone (no tokens: the text of tokens already reported).
pub fn text_event(text: String) -> pb::GenerateEvent {
    pb::GenerateEvent {
        event: Some(pb::generate_event::Event::Chunk(pb::GenerateChunk {
            text,
            ..pb::GenerateChunk::default()
        })),
    }
}

pub fn done_event(d: GenerationDone, tool_calls: Vec<pb::ToolCall>) -> pb::GenerateEvent {
    let finish_reason = match d.finish_reason {
        FinishReason::Stop => pb::FinishReason::Stop,
        FinishReason::Length => pb::FinishReason::Length,
        FinishReason::StopString => pb::FinishReason::StopString,
        FinishReason::ContextLength => pb::FinishReason::ContextLength,
    };
    let t = d.timings;
    pb::GenerateEvent {
        event: Some(pb::generate_event::Event::Done(pb::GenerateDone {
            finish_reason: finish_reason as i32,
            prompt_tokens: d.prompt_tokens as u32,
            cached_prompt_tokens: d.cached_prompt_tokens as u32,
            completion_tokens: d.completion_tokens as u32,
            tool_calls,
            timings: Some(pb::Timings {
                queue_ms: ms(t.queue),
                prefill_ms: ms(t.prefill),
                decode_ms: ms(t.decode),
                prefill_tokens_per_s: t.prefill_tokens_per_s,
                decode_tokens_per_s: t.decode_tokens_per_s,
            }),
        })),
    }
}

pub fn score_response(s: ScoreResult) -> pb::ScoreResponse {
    pb::ScoreResponse {
        token_ids: s.token_ids,
        positions: s
            .positions
            .into_iter()
            .map(|p| pb::ScorePosition {
                logprob: p.logprob,
                top: p.top.into_iter().map(token_logprob).collect(),
            })
            .collect(),
        total_logprob: s.total_logprob,
    }
}

pub fn translate_response(t: TranslateResult) -> pb::TranslateResponse {
    pb::TranslateResponse {
        translations: t
            .translations
            .into_iter()
            .map(|t| pb::Translation {
                text: t.text,
                token_ids: t.token_ids,
                score: t.score,
                source_tokens: t.source_tokens as u32,
            })
            .collect(),
        num_beams: t.num_beams as u32,
        queued_ms: ms(t.queued),
        translate_ms: ms(t.translating),
    }
}

pub fn model_file(f: ModelFile) -> pb::ModelFile {
    pb::ModelFile {
        name: f.file.name,
        path: f.file.path.display().to_string(),
        size_bytes: f.file.size_bytes,
        architecture: f.file.architecture,
        resident_as: f.resident_as,
        error: f.file.error,
        store: f.file.store.as_str().into(),
    }
}
