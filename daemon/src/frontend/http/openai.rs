//! OpenAI-compatible endpoints: `/v1/models`, `/v1/chat/completions`, `/v1/completions`, with
//! streaming as Server-Sent Events exactly as OpenAI sends them.
//!
//! Unknown fields are ignored; fields egpud cannot honour yet (`n` > 1, images, `tools`) get a
//! 400 naming the field rather than being dropped silently. `response_format` (`json_object`,
//! `json_schema`) constrains the output token by token, so it always parses and validates;
//! `strict` is accepted either way, because the schema is always enforced.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use egpu_engine::chat::ChatMessage;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;

use super::error::{ApiError, Dialect};
use super::{caller, check_model_name, completion_id, json_body, unix_seconds, AppState, PeerInfo};
use crate::core::on_demand::LoadHints;
use crate::core::requests::{
    Constraint, EmbedRequest, GenerateRequest, PromptInput, SamplingOptions, ToolChoice, Tools,
    MAX_TOP_LOGPROBS,
};
use crate::core::tools::{ToolCall, ToolReader, ToolStream};
use crate::core::GenerationStream;
use crate::error::DaemonError;
use crate::scheduler::events::{
    FinishReason, GenerationDone, GenerationEvent, TokenChunk, TokenLogprob, TokenLogprobs,
};

const DIALECT: Dialect = Dialect::OpenAi;

fn api(err: DaemonError) -> ApiError {
    ApiError::from_daemon(err, DIALECT)
}

/// `GET /v1/models`: resident models first, then every model a request may name.
pub async fn models(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let available = state.core.available().await.map_err(api)?;
    let data: Vec<Value> = available
        .iter()
        .map(|m| {
            let created = m
                .modified
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs());
            json!({
                "id": m.name,
                "object": "model",
                "created": created,
                "owned_by": m.store.map_or("egpud", |s| s.as_str()),
            })
        })
        .collect();
    Ok(Json(json!({ "object": "list", "data": data })))
}

/// `GET /v1/models/{model}`.
pub async fn model(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let available = state.core.available().await.map_err(api)?;
    let found = available.iter().find(|m| m.name == name).ok_or_else(|| {
        ApiError::new(
            DIALECT,
            StatusCode::NOT_FOUND,
            format!("no model named {name:?}"),
        )
        .with_code("model_not_found")
    })?;
    Ok(Json(json!({
        "id": found.name,
        "object": "model",
        "created": 0,
        "owned_by": found.store.map_or("egpud", |s| s.as_str()),
    })))
}

#[derive(Debug, Deserialize)]
struct EmbeddingsRequest {
    model: String,
    input: Value,
    encoding_format: Option<String>,
    dimensions: Option<u32>,
    user: Option<String>,
}

/// `POST /v1/embeddings`: a string or a list of strings; `encoding_format` `float` (default)
/// or `base64` (little-endian f32s); `dimensions` keeps that many leading dimensions.
pub async fn embeddings(
    State(state): State<AppState>,
    peer: PeerInfo,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let req: EmbeddingsRequest = json_body(body, state.settings.max_body_bytes, DIALECT).await?;
    check_model_name(&req.model, DIALECT)?;
    let inputs = super::input_texts(req.input).ok_or_else(|| {
        ApiError::invalid(
            DIALECT,
            "input",
            "input must be a string or a list of strings (token arrays are not supported)",
        )
    })?;
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                DIALECT,
                "encoding_format",
                format!("encoding_format {other:?} is not float or base64"),
            ))
        }
    };
    let model = match state
        .core
        .resident_or_load(&req.model, LoadHints::default())
        .await
    {
        Ok(model) => model,
        Err(e) => return Err(super::model_error(&state, &req.model, e, DIALECT).await),
    };
    let caller = caller(&peer, &headers, req.user.as_deref());
    let request = EmbedRequest {
        model: model.name.clone(),
        inputs,
        dimensions: req.dimensions,
        normalize: None,
        // OpenAI refuses an input over the model's limit.
        truncate: false,
    };
    let result = state.core.embed(request, caller).await.map_err(api)?;
    let data: Vec<Value> = result
        .embeddings
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(super::base64(&bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": req.model,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }))
    .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
    /// An assistant turn's calls: `{"id", "type": "function", "function": {"name",
    /// "arguments": "<JSON text>"}}`.
    #[serde(default)]
    tool_calls: Option<Vec<Value>>,
    #[serde(default)]
    tool_call_id: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The fields both completion endpoints share.
#[derive(Debug, Deserialize)]
struct Common {
    model: String,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<i64>,
    stop: Option<OneOrMany>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    n: Option<u32>,
    user: Option<String>,
    /// Not OpenAI's: generate past end-of-text tokens (llama-server takes it too), for
    /// benchmarks that need a fixed number of tokens.
    #[serde(default)]
    ignore_eos: bool,
    response_format: Option<Value>,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    functions: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    #[serde(flatten)]
    common: Common,
    messages: Vec<Message>,
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    #[serde(flatten)]
    common: Common,
    prompt: OneOrMany,
    /// The legacy API's count of alternatives per token.
    logprobs: Option<u32>,
    #[serde(default)]
    echo: bool,
    suffix: Option<String>,
}

/// Which shape responses take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Completion,
}

/// What a completion request becomes, whatever its endpoint.
struct Plan {
    request: GenerateRequest,
    model: String,
    stream: bool,
    include_usage: bool,
    /// Alternatives reported per token; None = no log-probabilities.
    logprobs: Option<u32>,
    endpoint: Endpoint,
}

fn check_common(c: &Common) -> Result<(), ApiError> {
    check_model_name(&c.model, DIALECT)?;
    if c.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid(
            DIALECT,
            "n",
            "egpud returns one choice per request: n must be 1",
        ));
    }
    let non_empty = |v: &Option<Value>| {
        v.as_ref()
            .is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
    };
    if non_empty(&c.functions) {
        return Err(ApiError::invalid(
            DIALECT,
            "functions",
            "the legacy functions field is not supported: send tools",
        ));
    }
    Ok(())
}

/// `tools` and `tool_choice` (`"none"`, `"auto"`, `"required"` or
/// `{"type": "function", "function": {"name": …}}`); no tools is None.
fn tools(c: &Common) -> Result<Option<Tools>, ApiError> {
    let choice =
        match &c.tool_choice {
            None | Some(Value::Null) => ToolChoice::Auto,
            Some(Value::String(s)) => match s.as_str() {
                "none" => ToolChoice::None,
                "auto" => ToolChoice::Auto,
                "required" => ToolChoice::Required,
                other => {
                    return Err(ApiError::invalid(
                        DIALECT,
                        "tool_choice",
                        format!("tool_choice {other:?} is not none, auto, required or a function"),
                    ))
                }
            },
            Some(named) => match named.pointer("/function/name").and_then(Value::as_str) {
                Some(name) => ToolChoice::Function(name.to_owned()),
                None => return Err(ApiError::invalid(
                    DIALECT,
                    "tool_choice",
                    "a named tool_choice is {\"type\": \"function\", \"function\": {\"name\": …}}",
                )),
            },
        };
    let list = match &c.tools {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => list.clone(),
        Some(_) => return Err(ApiError::invalid(DIALECT, "tools", "tools must be a list")),
    };
    if list.is_empty() {
        return match choice {
            ToolChoice::Required | ToolChoice::Function(_) => Err(ApiError::invalid(
                DIALECT,
                "tool_choice",
                "tool_choice asks for a tool call but no tools were given",
            )),
            _ => Ok(None),
        };
    }
    Ok(Some(Tools { list, choice }))
}

/// An assistant turn's OpenAI tool calls in transformers' form, which templates render: the
/// arguments as a JSON object rather than the text OpenAI sends.
fn template_tool_calls(calls: Vec<Value>) -> Value {
    Value::Array(
        calls
            .into_iter()
            .map(|mut call| {
                if let Some(args) = call.pointer_mut("/function/arguments") {
                    if let Some(parsed) = args.as_str().and_then(|t| serde_json::from_str(t).ok()) {
                        *args = parsed;
                    }
                }
                call
            })
            .collect(),
    )
}

/// `response_format`: text (or none), `json_object`, or `json_schema` with its `schema`.
fn response_format(c: &Common) -> Result<Option<Constraint>, ApiError> {
    let bad = |message: String| ApiError::invalid(DIALECT, "response_format", &message);
    let Some(format) = c.response_format.as_ref().filter(|f| !f.is_null()) else {
        return Ok(None);
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Constraint::JsonObject)),
        Some("json_schema") => {
            let schema = format
                .get("json_schema")
                .and_then(|s| s.get("schema"))
                .ok_or_else(|| bad("response_format.json_schema.schema is required".into()))?;
            Ok(Some(Constraint::JsonSchema(schema.to_string())))
        }
        Some(other) => Err(bad(format!(
            "response_format type {other:?} is not one of text, json_object, json_schema"
        ))),
        None => Err(bad("response_format needs a type".into())),
    }
}

fn sampling(c: &Common) -> SamplingOptions {
    SamplingOptions {
        // OpenAI's default temperature is 1.
        temperature: c.temperature.unwrap_or(1.0),
        top_p: c.top_p,
        frequency_penalty: c.frequency_penalty.unwrap_or(0.0),
        presence_penalty: c.presence_penalty.unwrap_or(0.0),
        seed: c.seed.map(|s| s as u64),
        ..SamplingOptions::default()
    }
}

fn messages(messages: Vec<Message>) -> Result<Vec<ChatMessage>, ApiError> {
    messages
        .into_iter()
        .map(|m| {
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(text)) => text,
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for part in parts {
                        match (part.kind.as_str(), part.text) {
                            ("text", Some(t)) => text.push_str(&t),
                            ("text", None) => {}
                            (kind, _) => {
                                return Err(ApiError::invalid(
                                    DIALECT,
                                    "messages",
                                    format!(
                                        "content parts of type {kind:?} are not supported (egpud's \
                                         models read text only)"
                                    ),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            let mut message = ChatMessage::new(m.role, content);
            message.tool_calls = m
                .tool_calls
                .filter(|c| !c.is_empty())
                .map(template_tool_calls);
            message.tool_call_id = m.tool_call_id;
            message.name = m.name;
            Ok(message)
        })
        .collect()
}

fn plan_chat(req: ChatRequest) -> Result<Plan, ApiError> {
    check_common(&req.common)?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid(DIALECT, "messages", "messages is empty"));
    }
    if req.top_logprobs.is_some() && !req.logprobs {
        return Err(ApiError::invalid(
            DIALECT,
            "top_logprobs",
            "top_logprobs needs logprobs: true",
        ));
    }
    let logprobs = req.logprobs.then(|| req.top_logprobs.unwrap_or(0));
    let constraint = response_format(&req.common)?;
    let tools = tools(&req.common)?;
    let c = req.common;
    Ok(Plan {
        request: GenerateRequest {
            model: c.model.clone(),
            input: Some(PromptInput::Messages(messages(req.messages)?)),
            raw: false,
            sampling: sampling(&c),
            max_tokens: c.max_completion_tokens.or(c.max_tokens),
            stop: c.stop.map(OneOrMany::into_vec).unwrap_or_default(),
            top_logprobs: logprobs.map_or(0, |k| k.max(1)),
            stop_at_eos: c.ignore_eos.then_some(false),
            constraint,
            tools,
        },
        model: c.model,
        stream: c.stream,
        include_usage: c.stream_options.is_some_and(|o| o.include_usage),
        logprobs,
        endpoint: Endpoint::Chat,
    })
}

fn plan_completion(req: CompletionRequest) -> Result<Plan, ApiError> {
    check_common(&req.common)?;
    if req.echo {
        return Err(ApiError::invalid(DIALECT, "echo", "echo is not supported"));
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid(
            DIALECT,
            "suffix",
            "suffix (fill-in-the-middle) is not supported",
        ));
    }
    let prompt = match req.prompt.into_vec().as_slice() {
        [one] => one.clone(),
        _ => {
            return Err(ApiError::invalid(
                DIALECT,
                "prompt",
                "prompt must be one string (egpud returns one choice per request)",
            ))
        }
    };
    let constraint = response_format(&req.common)?;
    if tools(&req.common)?.is_some() {
        return Err(ApiError::invalid(
            DIALECT,
            "tools",
            "tools need a chat: send them to /v1/chat/completions",
        ));
    }
    let c = req.common;
    Ok(Plan {
        request: GenerateRequest {
            model: c.model.clone(),
            input: Some(PromptInput::Text(prompt)),
            raw: true,
            sampling: sampling(&c),
            max_tokens: c.max_tokens.or(c.max_completion_tokens),
            stop: c.stop.map(OneOrMany::into_vec).unwrap_or_default(),
            top_logprobs: req.logprobs.map_or(0, |k| k.max(1)),
            stop_at_eos: c.ignore_eos.then_some(false),
            constraint,
            tools: None,
        },
        model: c.model,
        stream: c.stream,
        include_usage: c.stream_options.is_some_and(|o| o.include_usage),
        logprobs: req.logprobs,
        endpoint: Endpoint::Completion,
    })
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<AppState>,
    peer: PeerInfo,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let req: ChatRequest = json_body(body, state.settings.max_body_bytes, DIALECT).await?;
    let user = req.common.user.clone();
    let plan = plan_chat(req)?;
    run(state, &peer, &headers, user.as_deref(), plan).await
}

/// `POST /v1/completions`.
pub async fn completions(
    State(state): State<AppState>,
    peer: PeerInfo,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let req: CompletionRequest = json_body(body, state.settings.max_body_bytes, DIALECT).await?;
    let user = req.common.user.clone();
    let plan = plan_completion(req)?;
    run(state, &peer, &headers, user.as_deref(), plan).await
}

async fn run(
    state: AppState,
    peer: &PeerInfo,
    headers: &HeaderMap,
    user: Option<&str>,
    mut plan: Plan,
) -> Result<Response, ApiError> {
    if plan.logprobs.is_some_and(|k| k > MAX_TOP_LOGPROBS) {
        return Err(ApiError::invalid(
            DIALECT,
            "top_logprobs",
            format!("at most {MAX_TOP_LOGPROBS} alternatives per token"),
        ));
    }
    let caller = caller(peer, headers, user);
    let request = std::mem::take(&mut plan.request);
    let events = match state
        .core
        .generate_on_demand(&plan.model, LoadHints::default(), request, caller)
        .await
    {
        Ok((events, _)) => events,
        Err(e) => return Err(super::model_error(&state, &plan.model, e, DIALECT).await),
    };
    if plan.stream {
        Ok(stream_response(events, plan))
    } else {
        whole_response(events, plan).await
    }
}

/// One choice's worth of text and log-probabilities, as events arrive.
#[derive(Default)]
struct Collected {
    text: String,
    logprobs: Vec<TokenLogprobs>,
}

impl Collected {
    fn push(&mut self, chunk: TokenChunk) {
        self.text.push_str(&chunk.text);
        self.logprobs.extend(chunk.logprobs);
    }
}

/// The calls as OpenAI's `tool_calls` (arguments as JSON text); in a streamed delta each also
/// carries its `index`.
fn tool_calls_json(calls: &[ToolCall], indexed: bool) -> Value {
    Value::Array(
        calls
            .iter()
            .enumerate()
            .map(|(i, call)| {
                let mut v = json!({
                    "id": completion_id("call"),
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments.to_string()},
                });
                if indexed {
                    v["index"] = json!(i);
                }
                v
            })
            .collect(),
    )
}

/// A chat answer read for tool calls when the model was shown tools: the text and the calls.
fn read_tool_calls(tools: Option<&ToolReader>, text: &str) -> (String, Vec<ToolCall>) {
    match tools {
        Some(reader) => reader.read(text),
        None => (text.to_owned(), Vec::new()),
    }
}

async fn whole_response(mut events: GenerationStream, plan: Plan) -> Result<Response, ApiError> {
    let mut collected = Collected::default();
    let done = loop {
        match events.next().await {
            Some(GenerationEvent::Chunk(chunk)) => collected.push(chunk),
            Some(GenerationEvent::Done(done)) => break done,
            Some(GenerationEvent::Failed(err)) => return Err(api(err)),
            None => {
                return Err(api(DaemonError::Internal(
                    "the generation ended early".into(),
                )))
            }
        }
    };
    let mut finish = finish_reason(done.finish_reason);
    let logprobs = plan
        .logprobs
        .map(|k| logprobs_json(plan.endpoint, &collected.logprobs, k as usize));
    let (id, object, choice) = match plan.endpoint {
        Endpoint::Chat => {
            let (content, calls) = read_tool_calls(events.tools.as_ref(), &collected.text);
            let message = if calls.is_empty() {
                json!({"role": "assistant", "content": content, "refusal": null})
            } else {
                finish = "tool_calls";
                json!({
                    "role": "assistant",
                    "content": (!content.is_empty()).then_some(content),
                    "tool_calls": tool_calls_json(&calls, false),
                    "refusal": null,
                })
            };
            (
                completion_id("chatcmpl"),
                "chat.completion",
                json!({
                    "index": 0,
                    "message": message,
                    "logprobs": logprobs,
                    "finish_reason": finish,
                }),
            )
        }
        Endpoint::Completion => (
            completion_id("cmpl"),
            "text_completion",
            json!({
                "index": 0,
                "text": collected.text,
                "logprobs": logprobs,
                "finish_reason": finish,
            }),
        ),
    };
    Ok(Json(json!({
        "id": id,
        "object": object,
        "created": unix_seconds(),
        "model": plan.model,
        "system_fingerprint": fingerprint(),
        "choices": [choice],
        "usage": usage(&done),
    }))
    .into_response())
}

/// Streams the generation as SSE: `data: {chunk}` frames, an optional usage chunk, then
/// `data: [DONE]`. A client that disconnects drops the stream, which cancels the generation
/// at its next step.
fn stream_response(mut events: GenerationStream, plan: Plan) -> Response {
    let (tx, rx) = mpsc::channel::<Result<String, std::convert::Infallible>>(64);
    tokio::spawn(async move {
        let id = completion_id(match plan.endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completion => "cmpl",
        });
        let created = unix_seconds();
        let object = match plan.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completion => "text_completion",
        };
        let frame = |choices: Value, usage: Value| {
            let mut chunk = json!({
                "id": id,
                "object": object,
                "created": created,
                "model": plan.model,
                "system_fingerprint": fingerprint(),
                "choices": choices,
            });
            if plan.include_usage {
                chunk["usage"] = usage;
            }
            format!("data: {chunk}\n\n")
        };
        let choice = |delta: Value, logprobs: Value, finish: Value| match plan.endpoint {
            Endpoint::Chat => json!([{
                "index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish,
            }]),
            Endpoint::Completion => json!([{
                "index": 0,
                "text": delta.get("content").and_then(Value::as_str).unwrap_or(""),
                "logprobs": logprobs,
                "finish_reason": finish,
            }]),
        };
        // With tools shown, the text that cannot be part of a call streams; a call is held back
        // until the answer is whole (`ToolStream`).
        let mut tool_stream = events.tools.clone().map(ToolStream::new);
        let mut held_logprobs = Vec::new();
        let mut frames = Vec::new();
        if plan.endpoint == Endpoint::Chat {
            frames.push(frame(
                choice(
                    json!({"role": "assistant", "content": ""}),
                    Value::Null,
                    Value::Null,
                ),
                Value::Null,
            ));
        }
        loop {
            for f in frames.drain(..) {
                if tx.send(Ok(f)).await.is_err() {
                    return; // the client left; dropping `events` cancels the generation
                }
            }
            let event = tokio::select! {
                event = events.next() => event,
                () = tx.closed() => return,
            };
            match event {
                Some(GenerationEvent::Chunk(chunk)) => {
                    let (text, chunk_logprobs) = match tool_stream.as_mut() {
                        Some(stream) => {
                            // Held text's logprobs go out with the next text passed on.
                            held_logprobs.extend(chunk.logprobs);
                            let text = stream.push(&chunk.text);
                            if text.is_empty() {
                                continue;
                            }
                            (text, std::mem::take(&mut held_logprobs))
                        }
                        None => (chunk.text, chunk.logprobs),
                    };
                    if text.is_empty() && chunk_logprobs.is_empty() {
                        continue;
                    }
                    let logprobs = plan.logprobs.map_or(Value::Null, |k| {
                        logprobs_json(plan.endpoint, &chunk_logprobs, k as usize)
                    });
                    frames.push(frame(
                        choice(json!({"content": text}), logprobs, Value::Null),
                        Value::Null,
                    ));
                }
                Some(GenerationEvent::Done(done)) => {
                    let mut finish = finish_reason(done.finish_reason);
                    if let Some(stream) = tool_stream.take() {
                        let (content, calls) = stream.finish();
                        let logprobs = plan.logprobs.map_or(Value::Null, |k| {
                            logprobs_json(plan.endpoint, &held_logprobs, k as usize)
                        });
                        if !content.is_empty() || !held_logprobs.is_empty() {
                            frames.push(frame(
                                choice(json!({"content": content}), logprobs, Value::Null),
                                Value::Null,
                            ));
                        }
                        if !calls.is_empty() {
                            finish = "tool_calls";
                            frames.push(frame(
                                choice(
                                    json!({"tool_calls": tool_calls_json(&calls, true)}),
                                    Value::Null,
                                    Value::Null,
                                ),
                                Value::Null,
                            ));
                        }
                    }
                    frames.push(frame(
                        choice(json!({}), Value::Null, json!(finish)),
                        Value::Null,
                    ));
                    if plan.include_usage {
                        frames.push(frame(json!([]), usage(&done)));
                    }
                    frames.push("data: [DONE]\n\n".to_owned());
                    for f in frames.drain(..) {
                        if tx.send(Ok(f)).await.is_err() {
                            return;
                        }
                    }
                    return;
                }
                Some(GenerationEvent::Failed(err)) => {
                    let body = api(err).body();
                    let _ = tx.send(Ok(format!("data: {body}\n\n"))).await;
                    return;
                }
                None => return,
            }
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

fn fingerprint() -> String {
    format!("egpud-{}", env!("CARGO_PKG_VERSION"))
}

fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop | FinishReason::StopString => "stop",
        FinishReason::Length | FinishReason::ContextLength => "length",
    }
}

fn usage(done: &GenerationDone) -> Value {
    json!({
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": done.cached_prompt_tokens},
    })
}

/// Log-probabilities as each endpoint reports them: chat's `{"content": [...]}`, the legacy
/// completions' parallel arrays.
fn logprobs_json(endpoint: Endpoint, tokens: &[TokenLogprobs], k: usize) -> Value {
    let bytes = |t: &TokenLogprob| t.text.as_bytes().to_vec();
    match endpoint {
        Endpoint::Chat => json!({
            "content": tokens.iter().map(|t| json!({
                "token": t.token.text,
                "logprob": t.token.logprob,
                "bytes": bytes(&t.token),
                "top_logprobs": t.top.iter().take(k).map(|a| json!({
                    "token": a.text, "logprob": a.logprob, "bytes": bytes(a),
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "refusal": null,
        }),
        Endpoint::Completion => {
            let mut offset = 0;
            let mut text_offset = Vec::new();
            for t in tokens {
                text_offset.push(offset);
                offset += t.token.text.len();
            }
            json!({
                "tokens": tokens.iter().map(|t| &t.token.text).collect::<Vec<_>>(),
                "token_logprobs": tokens.iter().map(|t| t.token.logprob).collect::<Vec<_>>(),
                "top_logprobs": tokens.iter().map(|t| {
                    t.top.iter().take(k).map(|a| (a.text.clone(), json!(a.logprob)))
                        .collect::<serde_json::Map<String, Value>>()
                }).collect::<Vec<_>>(),
                "text_offset": text_offset,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: Value) -> Result<Plan, ApiError> {
        plan_chat(serde_json::from_value(body).unwrap())
    }

    #[test]
    fn chat_fields_map_to_the_core_request() {
        let plan = chat(json!({
            "model": "smol",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}]}
            ],
            "max_completion_tokens": 7,
            "temperature": 0,
            "stop": "\n",
            "seed": 3,
            "logprobs": true,
            "top_logprobs": 2,
            "stream": true,
            "stream_options": {"include_usage": true},
            "some_future_field": {"ignored": true}
        }))
        .unwrap();
        assert_eq!(plan.request.max_tokens, Some(7));
        assert_eq!(plan.request.stop, vec!["\n".to_owned()]);
        assert_eq!(plan.request.sampling.temperature, 0.0);
        assert_eq!(plan.request.sampling.seed, Some(3));
        assert_eq!(plan.request.top_logprobs, 2);
        assert!(plan.stream && plan.include_usage);
        assert_eq!(
            plan.request.input,
            Some(PromptInput::Messages(vec![
                ChatMessage::new("system", "Be brief."),
                ChatMessage::new("user", "Hi!"),
            ]))
        );
        // Without a temperature, OpenAI's default of 1 applies.
        let plan =
            chat(json!({"model": "m", "messages": [{"role": "user", "content": "x"}]})).unwrap();
        assert_eq!(plan.request.sampling.temperature, 1.0);
        assert_eq!(plan.request.top_logprobs, 0);
        assert!(!plan.include_usage);
    }

    #[test]
    fn unsupported_fields_are_refused_by_name() {
        let base = || json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
        let cases = [
            ("n", json!(2)),
            ("response_format", json!({"type": "xml"})),
            (
                "response_format",
                json!({"type": "json_schema", "json_schema": {"name": "x"}}),
            ),
            ("tools", json!({"type": "function"})),
            ("tool_choice", json!("sometimes")),
            (
                "functions",
                json!([{"name": "f", "parameters": {"type": "object"}}]),
            ),
        ];
        for (field, value) in cases {
            let mut body = base();
            body[field] = value;
            let err = chat(body).err().expect(field);
            assert_eq!(
                (err.status, err.param),
                (StatusCode::BAD_REQUEST, Some(field))
            );
        }
        let mut image = base();
        image["messages"][0]["content"] =
            json!([{"type": "image_url", "image_url": {"url": "data:..."}}]);
        assert_eq!(chat(image).err().unwrap().param, Some("messages"));
        // Empty tools and a text response format are fine.
        let mut fine = base();
        fine["tools"] = json!([]);
        fine["response_format"] = json!({"type": "text"});
        assert_eq!(chat(fine).unwrap().request.constraint, None);
        let mut json_object = base();
        json_object["response_format"] = json!({"type": "json_object"});
        assert_eq!(
            chat(json_object).unwrap().request.constraint,
            Some(Constraint::JsonObject)
        );
        let mut schema = base();
        let wanted = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        schema["response_format"] = json!({"type": "json_schema",
            "json_schema": {"name": "x", "strict": true, "schema": wanted}});
        let Some(Constraint::JsonSchema(text)) = chat(schema).unwrap().request.constraint else {
            panic!("a json_schema response format is a schema constraint");
        };
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), wanted);
        let mut with_tools = base();
        with_tools["tools"] = json!([{"type": "function", "function": {"name": "f"}}]);
        with_tools["tool_choice"] = json!({"type": "function", "function": {"name": "f"}});
        assert_eq!(
            chat(with_tools).unwrap().request.tools,
            Some(Tools {
                list: vec![json!({"type": "function", "function": {"name": "f"}})],
                choice: ToolChoice::Function("f".into()),
            })
        );
        // An assistant turn's calls reach the template with their arguments as a map.
        let mut history = base();
        history["messages"] = json!([{"role": "assistant", "content": null, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "2"}]);
        let Some(PromptInput::Messages(m)) = chat(history).unwrap().request.input else {
            panic!("a chat is messages");
        };
        assert_eq!(
            m[0].tool_calls,
            Some(
                json!([{"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}])
            )
        );
        assert_eq!(m[1].tool_call_id.as_deref(), Some("c1"));
        let mut path = base();
        path["model"] = json!("/etc/passwd");
        assert_eq!(chat(path).err().unwrap().status, StatusCode::NOT_FOUND);
    }
}
