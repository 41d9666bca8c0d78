//! Ollama-compatible endpoints (`/api/...`), in the shapes Ollama's clients parse: NDJSON
//! streams ending with a `done: true` object that carries Ollama's counts and durations
//! (nanoseconds), Ollama's sampling defaults, `keep_alive` (a duration; `0` unloads after the
//! request, negative keeps forever), and `options.num_ctx` for a model the request loads.
//!
//! egpud never downloads: `pull`, `push`, `create`, `copy` and `delete` say so and how to add a
//! model file instead.

use egpu_engine::models::ModelKind;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, SecondsFormat, Utc};
use egpu_engine::chat::ChatMessage;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;

use super::error::{ApiError, Dialect};
use super::{caller, check_model_name, json_body, AppState, PeerInfo};
use crate::backend::BackendKind;
use crate::core::on_demand::{Available, LoadHints};
use crate::core::requests::{
    Constraint, EmbedRequest, GenerateRequest, PromptInput, SamplingOptions, ToolChoice, Tools,
};
use crate::core::tools::{ToolCall, ToolReader, ToolStream};
use crate::core::GenerationStream;
use crate::error::DaemonError;
use crate::residency::stores::Store;
use crate::residency::{KeepAlive, ModelInfo};
use crate::scheduler::events::{FinishReason, GenerationDone, GenerationEvent};

const DIALECT: Dialect = Dialect::Ollama;
/// The Ollama API version egpud answers to (`/api/version`): the API it follows, not egpud's
/// own version (which is in `egpud`).
const OLLAMA_API_VERSION: &str = "0.9.0";

fn api(err: DaemonError) -> ApiError {
    ApiError::from_daemon(err, DIALECT)
}

pub async fn root() -> &'static str {
    "egpud is running (Ollama-compatible API)"
}

pub async fn version() -> Json<Value> {
    Json(json!({"version": OLLAMA_API_VERSION, "egpud": env!("CARGO_PKG_VERSION")}))
}

pub async fn never_downloads() -> ApiError {
    ApiError::new(
        DIALECT,
        StatusCode::NOT_IMPLEMENTED,
        "egpud never downloads or changes models: put a .gguf file in egpud's models folder \
         (see `egpuctl status`), or use a model Ollama or LM Studio already has (egpud reads \
         their stores), then name it in a request",
    )
}

#[derive(Debug, Deserialize)]
struct EmbedBody {
    model: String,
    #[serde(default)]
    input: Option<Value>,
    /// The legacy `/api/embeddings`' one text.
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    dimensions: Option<u32>,
    /// Cut inputs longer than the context (Ollama's default) rather than refuse them.
    #[serde(default)]
    truncate: Option<bool>,
    #[serde(default)]
    keep_alive: Option<Value>,
    #[serde(default)]
    options: Option<Options>,
}

/// Embeds for both endpoints: (the vectors, prompt tokens, load time).
async fn embed_texts(
    state: &AppState,
    peer: &PeerInfo,
    headers: &HeaderMap,
    body: EmbedBody,
    inputs: Vec<String>,
    normalize: bool,
) -> Result<(Vec<Vec<f32>>, usize, Duration), ApiError> {
    check_model_name(&body.model, DIALECT)?;
    let hints = LoadHints {
        context: body
            .options
            .as_ref()
            .and_then(|o| o.num_ctx)
            .map(|n| n as usize),
        keep_alive: keep_alive(body.keep_alive.as_ref())?,
    };
    let started = Instant::now();
    let model = match state.core.resident_or_load(&body.model, hints).await {
        Ok(model) => model,
        Err(e) => return Err(super::model_error(state, &body.model, e, DIALECT).await),
    };
    let load = started.elapsed();
    let request = EmbedRequest {
        model: model.name.clone(),
        inputs,
        dimensions: body.dimensions,
        normalize: Some(normalize),
        truncate: body.truncate.unwrap_or(true),
    };
    let result = state
        .core
        .embed(request, caller(peer, headers, None))
        .await
        .map_err(api)?;
    Ok((result.embeddings, result.prompt_tokens, load))
}

/// `POST /api/embed`: `input` a string or a list of strings; unit-length vectors.
pub async fn embed(
    State(state): State<AppState>,
    peer: PeerInfo,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let mut body: EmbedBody = json_body(body, state.settings.max_body_bytes, DIALECT).await?;
    let inputs = body
        .input
        .take()
        .and_then(super::input_texts)
        .ok_or_else(|| {
            ApiError::invalid(
                DIALECT,
                "input",
                "input must be a string or a list of strings",
            )
        })?;
    let model = body.model.clone();
    let (embeddings, tokens, load) =
        embed_texts(&state, &peer, &headers, body, inputs, true).await?;
    Ok(Json(json!({
        "model": model,
        "embeddings": embeddings,
        "total_duration": nanos(started.elapsed()),
        "load_duration": nanos(load),
        "prompt_eval_count": tokens,
    }))
    .into_response())
}

/// `POST /api/embeddings` (Ollama's older endpoint): one `prompt`, its vector as the model
/// gives it (not scaled to unit length, as Ollama returns it there).
pub async fn embeddings_legacy(
    State(state): State<AppState>,
    peer: PeerInfo,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let mut body: EmbedBody = json_body(body, state.settings.max_body_bytes, DIALECT).await?;
    let Some(prompt) = body.prompt.take() else {
        return Err(ApiError::invalid(DIALECT, "prompt", "prompt is required"));
    };
    let (mut embeddings, _, _) =
        embed_texts(&state, &peer, &headers, body, vec![prompt], false).await?;
    Ok(Json(json!({"embedding": embeddings.pop().unwrap_or_default()})).into_response())
}

fn rfc3339(t: SystemTime) -> String {
    DateTime::<Utc>::from(t).to_rfc3339_opts(SecondsFormat::Nanos, true)
}

fn nanos(d: Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128) as u64
}

/// `135M`, `1.2B`: Ollama's `parameter_size`.
fn parameter_size(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.1}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{}M", (n as f64 / 1e6).round()),
        n => n.to_string(),
    }
}

/// A model's digest: Ollama's blob hash for its own blobs, else an identifier of the file
/// (its path, size and modification time), in the same 64-hex-digit form.
fn digest(path: &Path, size: u64, modified: Option<SystemTime>) -> String {
    if let Some(hex) = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("sha256-"))
    {
        return hex.to_owned();
    }
    (0u8..4)
        .map(|salt| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (salt, path, size, modified).hash(&mut h);
            format!("{:016x}", h.finish())
        })
        .collect()
}

fn details(architecture: &str, parameters: u64, quantization: &str) -> Value {
    json!({
        "parent_model": "",
        "format": "gguf",
        "family": architecture,
        "families": [architecture],
        "parameter_size": parameter_size(parameters),
        "quantization_level": quantization,
    })
}

fn tag(m: &Available) -> Value {
    json!({
        "name": m.name,
        "model": m.name,
        "modified_at": rfc3339(m.modified.unwrap_or(SystemTime::UNIX_EPOCH)),
        "size": m.size_bytes,
        "digest": digest(&m.path, m.size_bytes, m.modified),
        "details": details(&m.architecture, m.parameters, &m.quantization),
        "egpu_store": m.store.map_or("resident", Store::as_str),
    })
}

/// `GET /api/tags`: every model a request may name.
pub async fn tags(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let available = state.core.available().await.map_err(api)?;
    Ok(Json(
        json!({ "models": available.iter().map(tag).collect::<Vec<_>>() }),
    ))
}

/// When an idle model unloads; a model that never does shows a date far away, as Ollama's
/// `keep_alive: -1` models do.
fn expires_at(m: &ModelInfo) -> String {
    rfc3339(
        m.keep_alive_expires
            .unwrap_or_else(|| SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_799)),
    )
}

/// `GET /api/ps`: the resident models.
pub async fn ps(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let available = state.core.available().await.map_err(api)?;
    let models: Vec<Value> = available
        .iter()
        .filter_map(|a| {
            let m = a.resident.as_ref()?;
            Some(json!({
                "name": m.name,
                "model": m.name,
                "size": m.bytes,
                "digest": digest(&a.path, a.size_bytes, a.modified),
                "details": details(&a.architecture, a.parameters, &a.quantization),
                "expires_at": expires_at(m),
                "size_vram": if m.backend == BackendKind::Tinygrad { m.bytes } else { 0 },
                "context_length": m.context_length,
            }))
        })
        .collect();
    Ok(Json(json!({ "models": models })))
}

#[derive(Debug, Deserialize)]
struct ShowRequest {
    model: Option<String>,
    name: Option<String>,
}

/// `POST /api/show`: what a model is, from its file's header.
pub async fn show(State(state): State<AppState>, body: Body) -> Result<Json<Value>, ApiError> {
    let req: ShowRequest = json_body(body, state.settings.max_body_bytes, DIALECT).await?;
    let name = req.model.or(req.name).unwrap_or_default();
    check_model_name(&name, DIALECT)?;
    let d = match state.core.describe(&name).await {
        Ok(d) => d,
        Err(e) => return Err(super::model_error(&state, &name, e, DIALECT).await),
    };
    let s = &d.summary;
    let arch = s.architecture.clone();
    let mut info = serde_json::Map::new();
    info.insert("general.architecture".into(), json!(arch));
    info.insert("general.parameter_count".into(), json!(d.parameters));
    if let Some(n) = &s.name {
        info.insert("general.name".into(), json!(n));
    }
    if let Some(c) = s.context_length {
        info.insert(format!("{arch}.context_length"), json!(c));
    }
    info.insert(format!("{arch}.block_count"), json!(s.block_count));
    info.insert(
        format!("{arch}.embedding_length"),
        json!(s.embedding_length),
    );
    Ok(Json(json!({
        "license": "",
        "modelfile": format!("# egpud serves this model from its file\nFROM {}\n", d.path.display()),
        "parameters": "",
        "template": d.chat_template.unwrap_or_default(),
        "details": details(&arch, d.parameters, &d.quantization),
        "model_info": info,
        "capabilities": match ModelKind::of_architecture(&arch) {
            ModelKind::Embedder => ["embedding"],
            _ => ["completion"],
        },
        "modified_at": rfc3339(d.modified.unwrap_or(SystemTime::UNIX_EPOCH)),
    })))
}

#[derive(Debug, Deserialize, Default)]
struct Options {
    temperature: Option<f32>,
    top_k: Option<i64>,
    top_p: Option<f32>,
    min_p: Option<f32>,
    seed: Option<i64>,
    num_predict: Option<i64>,
    stop: Option<Vec<String>>,
    repeat_penalty: Option<f32>,
    repeat_last_n: Option<i64>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    num_ctx: Option<u32>,
}

impl Options {
    /// Ollama's sampling, with Ollama's defaults for what is not given.
    fn sampling(&self) -> SamplingOptions {
        SamplingOptions {
            temperature: self.temperature.unwrap_or(0.8),
            top_k: self.top_k.unwrap_or(40).max(0) as u32,
            top_p: Some(self.top_p.unwrap_or(0.9)),
            min_p: self.min_p.unwrap_or(0.0),
            repeat_penalty: Some(self.repeat_penalty.unwrap_or(1.1)),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            penalty_last_n: Some(self.repeat_last_n.unwrap_or(64).max(0) as u32),
            seed: self.seed.map(|s| s as u64),
        }
    }

    /// `num_predict`: -1 (or any value below 1) means until the model stops or the context
    /// is full.
    fn max_tokens(&self) -> Option<u32> {
        self.num_predict
            .filter(|&n| n > 0)
            .map(|n| n.min(u32::MAX as i64) as u32)
    }
}

#[derive(Debug, Deserialize)]
struct GenerateBody {
    model: String,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    suffix: Option<String>,
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    template: Option<String>,
    #[serde(default)]
    context: Option<Vec<i64>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    raw: bool,
    #[serde(default)]
    format: Option<Value>,
    #[serde(default)]
    images: Option<Vec<Value>>,
    #[serde(default)]
    options: Option<Options>,
    #[serde(default)]
    keep_alive: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct ChatMessageBody {
    role: String,
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    images: Option<Vec<Value>>,
    /// An assistant turn's calls: `{"function": {"name", "arguments": {…}}}`.
    #[serde(default)]
    tool_calls: Option<Vec<Value>>,
    /// The tool a `tool` message answers for.
    #[serde(default)]
    tool_name: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ChatBody {
    model: String,
    #[serde(default)]
    messages: Vec<ChatMessageBody>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    format: Option<Value>,
    #[serde(default)]
    tools: Option<Vec<Value>>,
    #[serde(default)]
    options: Option<Options>,
    #[serde(default)]
    keep_alive: Option<Value>,
}

fn keep_alive(value: Option<&Value>) -> Result<Option<KeepAlive>, ApiError> {
    let parsed = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => {
            let seconds = n.as_f64().unwrap_or(0.0);
            if seconds < 0.0 {
                Ok(KeepAlive::Forever)
            } else {
                Duration::try_from_secs_f64(seconds)
                    .map(KeepAlive::For)
                    .map_err(|e| e.to_string())
            }
        }
        Some(Value::String(s)) => KeepAlive::parse(s),
        Some(other) => Err(format!("{other} is not a duration")),
    };
    parsed
        .map(Some)
        .map_err(|why| ApiError::invalid(DIALECT, "keep_alive", format!("keep_alive: {why}")))
}

fn refuse_if(present: bool, what: &'static str, why: &str) -> Result<(), ApiError> {
    if present {
        Err(ApiError::invalid(DIALECT, what, format!("{what}: {why}")))
    } else {
        Ok(())
    }
}

/// Ollama's `format`: `"json"` (any JSON object) or a JSON schema; absent, null or `""` is
/// free text.
fn format_constraint(format: Option<Value>) -> Result<Option<Constraint>, ApiError> {
    match format {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) if s == "json" => Ok(Some(Constraint::JsonObject)),
        Some(schema @ Value::Object(_)) => Ok(Some(Constraint::JsonSchema(schema.to_string()))),
        Some(other) => Err(ApiError::invalid(
            DIALECT,
            "format",
            format!("format must be \"json\" or a JSON schema object, not {other}"),
        )),
    }
}

/// What both endpoints share once parsed.
struct Plan {
    model: String,
    /// None: load (or unload) the model only.
    input: Option<(PromptInput, bool)>,
    options: Options,
    constraint: Option<Constraint>,
    tools: Option<Tools>,
    keep_alive: Option<KeepAlive>,
    stream: bool,
    chat: bool,
}

/// `POST /api/generate`.
pub async fn generate(
    State(state): State<AppState>,
    peer: PeerInfo,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let req: GenerateBody = json_body(body, state.settings.max_body_bytes, DIALECT).await?;
    check_model_name(&req.model, DIALECT)?;
    refuse_if(
        req.images.as_ref().is_some_and(|i| !i.is_empty()),
        "images",
        "egpud's models read text only",
    )?;
    let constraint = format_constraint(req.format)?;
    refuse_if(
        req.context.as_ref().is_some_and(|c| !c.is_empty()),
        "context",
        "token context from an earlier response is not supported; send the conversation to /api/chat",
    )?;
    refuse_if(
        req.template.as_ref().is_some_and(|t| !t.is_empty()),
        "template",
        "egpud uses the model's own chat template; a custom one is not supported",
    )?;
    refuse_if(
        req.suffix.as_ref().is_some_and(|s| !s.is_empty()),
        "suffix",
        "fill-in-the-middle is not supported",
    )?;
    let input = match req.prompt.filter(|p| !p.is_empty()) {
        None => None,
        Some(prompt) if req.raw => Some((PromptInput::Text(prompt), true)),
        Some(prompt) => match req.system.filter(|s| !s.is_empty()) {
            Some(system) => Some((
                PromptInput::Messages(vec![
                    ChatMessage::new("system", system),
                    ChatMessage::user(prompt),
                ]),
                false,
            )),
            None => Some((PromptInput::Text(prompt), false)),
        },
    };
    let plan = Plan {
        model: req.model,
        input,
        options: req.options.unwrap_or_default(),
        constraint,
        tools: None,
        keep_alive: keep_alive(req.keep_alive.as_ref())?,
        stream: req.stream.unwrap_or(true),
        chat: false,
    };
    run(state, &peer, &headers, plan).await
}

/// `POST /api/chat`.
pub async fn chat(
    State(state): State<AppState>,
    peer: PeerInfo,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let req: ChatBody = json_body(body, state.settings.max_body_bytes, DIALECT).await?;
    check_model_name(&req.model, DIALECT)?;
    let constraint = format_constraint(req.format)?;
    // Ollama's tools are OpenAI's list; the model decides whether to call one.
    let tools = req.tools.filter(|t| !t.is_empty()).map(|list| Tools {
        list,
        choice: ToolChoice::Auto,
    });
    refuse_if(
        req.messages
            .iter()
            .any(|m| m.images.as_ref().is_some_and(|i| !i.is_empty())),
        "images",
        "egpud's models read text only",
    )?;
    let input = (!req.messages.is_empty()).then(|| {
        let messages = req
            .messages
            .into_iter()
            .map(|m| {
                let mut message = ChatMessage::new(m.role, m.content.unwrap_or_default());
                message.tool_calls = m.tool_calls.filter(|c| !c.is_empty()).map(|calls| {
                    Value::Array(
                        calls
                            .into_iter()
                            .map(|c| json!({"type": "function", "function": c["function"]}))
                            .collect(),
                    )
                });
                message.name = m.tool_name;
                message
            })
            .collect();
        (PromptInput::Messages(messages), false)
    });
    let plan = Plan {
        model: req.model,
        input,
        options: req.options.unwrap_or_default(),
        constraint,
        tools,
        keep_alive: keep_alive(req.keep_alive.as_ref())?,
        stream: req.stream.unwrap_or(true),
        chat: true,
    };
    run(state, &peer, &headers, plan).await
}

async fn run(
    state: AppState,
    peer: &PeerInfo,
    headers: &HeaderMap,
    plan: Plan,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let hints = LoadHints {
        context: plan.options.num_ctx.map(|n| n as usize),
        keep_alive: plan.keep_alive,
    };
    let Some((input, raw)) = plan.input else {
        // No prompt: the request only loads the model, or with keep_alive 0 unloads it.
        let resident = match state.core.resident_or_load(&plan.model, hints).await {
            Ok(resident) => resident,
            Err(e) => return Err(super::model_error(&state, &plan.model, e, DIALECT).await),
        };
        if let Some(keep) = plan.keep_alive {
            state
                .core
                .set_keep_alive(&resident.name, keep)
                .map_err(api)?;
        }
        let reason = if plan.keep_alive == Some(KeepAlive::For(Duration::ZERO)) {
            state
                .core
                .unload(&resident.name, false)
                .await
                .map_err(api)?;
            "unload"
        } else {
            "load"
        };
        let mut done = json!({
            "model": plan.model,
            "created_at": rfc3339(SystemTime::now()),
            "done": true,
            "done_reason": reason,
        });
        if plan.chat {
            done["message"] = json!({"role": "assistant", "content": ""});
        } else {
            done["response"] = json!("");
        }
        return Ok(Json(done).into_response());
    };
    let request = GenerateRequest {
        model: plan.model.clone(),
        input: Some(input),
        raw,
        sampling: plan.options.sampling(),
        max_tokens: plan.options.max_tokens(),
        stop: plan.options.stop.clone().unwrap_or_default(),
        top_logprobs: 0,
        stop_at_eos: None,
        constraint: plan.constraint,
        tools: plan.tools,
    };
    let caller = caller(peer, headers, None);
    let (events, load) = match state
        .core
        .generate_on_demand(&plan.model, hints, request, caller)
        .await
    {
        Ok(generating) => generating,
        Err(e) => return Err(super::model_error(&state, &plan.model, e, DIALECT).await),
    };
    let shape = Shape {
        model: plan.model,
        chat: plan.chat,
        started,
        load,
        tools: events.tools.clone(),
    };
    if plan.stream {
        Ok(stream_response(events, shape))
    } else {
        whole_response(events, shape).await
    }
}

/// How responses are written: the model name the client used, chat or generate fields.
struct Shape {
    model: String,
    chat: bool,
    started: Instant,
    load: Duration,
    /// Set when the model was shown tools: its answer is read for calls (streamed: the text
    /// that cannot be part of one streams, calls come at the end).
    tools: Option<ToolReader>,
}

impl Shape {
    fn part(&self, text: &str, done: bool) -> Value {
        let mut v = json!({
            "model": self.model,
            "created_at": rfc3339(SystemTime::now()),
            "done": done,
        });
        if self.chat {
            v["message"] = json!({"role": "assistant", "content": text});
        } else {
            v["response"] = json!(text);
        }
        v
    }

    /// The last object: `text` (with tools, the answer's text less its calls) and the calls.
    fn last(&self, text: &str, calls: &[ToolCall], done: &GenerationDone) -> Value {
        let mut v = self.part(text, true);
        if !calls.is_empty() {
            let calls: Vec<Value> = calls
                .iter()
                .map(|c| json!({"function": {"name": c.name, "arguments": c.arguments}}))
                .collect();
            v["message"] = json!({"role": "assistant", "content": text, "tool_calls": calls});
        }
        v["done_reason"] = json!(match done.finish_reason {
            FinishReason::Stop | FinishReason::StopString => "stop",
            FinishReason::Length | FinishReason::ContextLength => "length",
        });
        v["total_duration"] = json!(nanos(self.started.elapsed()));
        v["load_duration"] = json!(nanos(self.load));
        v["prompt_eval_count"] = json!(done.prompt_tokens);
        v["prompt_eval_duration"] = json!(nanos(done.timings.prefill));
        v["eval_count"] = json!(done.completion_tokens);
        v["eval_duration"] = json!(nanos(done.timings.decode));
        v
    }
}

async fn whole_response(mut events: GenerationStream, shape: Shape) -> Result<Response, ApiError> {
    let mut text = String::new();
    loop {
        match events.next().await {
            Some(GenerationEvent::Chunk(chunk)) => text.push_str(&chunk.text),
            Some(GenerationEvent::Done(done)) => {
                let (text, calls) = match &shape.tools {
                    Some(reader) => reader.read(&text),
                    None => (text, Vec::new()),
                };
                return Ok(Json(shape.last(&text, &calls, &done)).into_response());
            }
            Some(GenerationEvent::Failed(err)) => return Err(api(err)),
            None => {
                return Err(api(DaemonError::Internal(
                    "the generation ended early".into(),
                )))
            }
        }
    }
}

/// NDJSON: one object per chunk of text, then the `done: true` object. A client that leaves
/// drops the stream, which cancels the generation at its next step.
fn stream_response(mut events: GenerationStream, shape: Shape) -> Response {
    let (tx, rx) = mpsc::channel::<Result<String, std::convert::Infallible>>(64);
    tokio::spawn(async move {
        // With tools, the text that cannot be part of a call streams; calls are held back
        // until the answer is whole (`ToolStream`).
        let mut tool_stream = shape.tools.clone().map(ToolStream::new);
        loop {
            let event = tokio::select! {
                event = events.next() => event,
                () = tx.closed() => return,
            };
            let (line, last) = match event {
                Some(GenerationEvent::Chunk(chunk)) => {
                    let text = match tool_stream.as_mut() {
                        Some(stream) => stream.push(&chunk.text),
                        None => chunk.text,
                    };
                    if text.is_empty() {
                        continue;
                    }
                    (shape.part(&text, false), false)
                }
                Some(GenerationEvent::Done(done)) => {
                    let (rest, calls) = match tool_stream.take() {
                        Some(stream) => stream.finish(),
                        None => (String::new(), Vec::new()),
                    };
                    (shape.last(&rest, &calls, &done), true)
                }
                Some(GenerationEvent::Failed(err)) => (api(err).body(), true),
                None => return,
            };
            if tx.send(Ok(format!("{line}\n"))).await.is_err() || last {
                return;
            }
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_alive_forms() {
        let ka = |v: Value| keep_alive(Some(&v)).map_err(|e| e.message);
        assert_eq!(ka(json!(0)), Ok(Some(KeepAlive::For(Duration::ZERO))));
        assert_eq!(ka(json!("0")), Ok(Some(KeepAlive::For(Duration::ZERO))));
        assert_eq!(ka(json!(-1)), Ok(Some(KeepAlive::Forever)));
        assert_eq!(ka(json!("-1m")), Ok(Some(KeepAlive::Forever)));
        assert_eq!(
            ka(json!("5m")),
            Ok(Some(KeepAlive::For(Duration::from_secs(300))))
        );
        assert_eq!(
            ka(json!(30)),
            Ok(Some(KeepAlive::For(Duration::from_secs(30))))
        );
        assert!(ka(json!("soon")).is_err());
        assert_eq!(keep_alive(None).unwrap(), None);
    }

    #[test]
    fn ollama_defaults_and_num_predict() {
        let o = Options::default();
        let s = o.sampling();
        assert_eq!((s.temperature, s.top_k, s.top_p), (0.8, 40, Some(0.9)));
        assert_eq!(s.repeat_penalty, Some(1.1));
        assert_eq!(o.max_tokens(), None);
        let o: Options =
            serde_json::from_value(json!({"num_predict": 12, "temperature": 0, "stop": ["\n"]}))
                .unwrap();
        assert_eq!(o.max_tokens(), Some(12));
        assert_eq!(o.sampling().temperature, 0.0);
        let o: Options = serde_json::from_value(json!({"num_predict": -1})).unwrap();
        assert_eq!(o.max_tokens(), None);
    }

    #[test]
    fn sizes_and_digests() {
        assert_eq!(parameter_size(134_515_008), "135M");
        assert_eq!(parameter_size(8_030_261_248), "8.0B");
        let d = digest(Path::new("/m/blobs/sha256-abc123"), 1, None);
        assert_eq!(d, "abc123");
        let d = digest(Path::new("/m/x.gguf"), 1, None);
        assert_eq!(d.len(), 64);
        assert_ne!(d, digest(Path::new("/m/y.gguf"), 1, None));
    }
}
