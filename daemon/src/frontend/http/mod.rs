//! The HTTP front end: OpenAI-compatible (`/v1`) and Ollama-compatible (`/api`) endpoints and
//! Prometheus metrics, over the same core API as gRPC (same validation, chat templates,
//! sampling, scheduler, fairness and cancellation).
//!
//! - [`listen`]: the listeners (a Unix socket, mode 0600, peer uid checked; and loopback TCP),
//!   connection limits and timeouts.
//! - [`guard`]: what TCP requests must show: a loopback `Host`, an allowed `Origin`, the key.
//! - [`openai`], [`ollama`]: the two APIs, each parsing its requests into the core's.
//! - [`error`]: errors in each API's shape, and their HTTP status codes.

pub mod error;
pub mod guard;
pub mod listen;
pub mod ollama;
pub mod openai;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{middleware, Extension, Router};

use crate::core::requests::Caller;
use crate::core::Core;
use crate::scheduler::ClientKey;
use error::{ApiError, Dialect};

/// Largest request body (a long conversation in JSON is far below this).
pub const DEFAULT_MAX_BODY: usize = 8 << 20;
/// Most connections served at once per listener; more wait in the kernel's backlog.
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;

/// How the HTTP front end is set up.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// The key TCP clients must send; None = no authentication (`--http-auth none`).
    pub api_key: Option<String>,
    /// Host names besides the loopback ones a TCP request's `Host` may name.
    pub allowed_hosts: Vec<String>,
    /// Origins allowed to call from a web page (CORS); none by default.
    pub origins: Vec<String>,
    pub max_body_bytes: usize,
    pub max_connections: usize,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            api_key: None,
            allowed_hosts: Vec::new(),
            origins: Vec::new(),
            max_body_bytes: DEFAULT_MAX_BODY,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// How a client reached egpud; every request carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    Tcp(std::net::SocketAddr),
    /// The Unix socket, with the peer's credentials (its uid is egpud's: others are refused
    /// when they connect).
    Unix {
        uid: u32,
        pid: Option<i32>,
    },
}

#[derive(Debug, Clone)]
pub struct AppState {
    pub core: Core,
    pub settings: Arc<HttpSettings>,
}

/// Every route, behind the guard.
pub fn router(core: Core, settings: Arc<HttpSettings>) -> Router {
    let state = AppState { core, settings };
    Router::new()
        .route("/", get(ollama::root))
        .route("/api/version", get(ollama::version))
        .route("/api/tags", get(ollama::tags))
        .route("/api/ps", get(ollama::ps))
        .route("/api/show", post(ollama::show))
        .route("/api/generate", post(ollama::generate))
        .route("/api/chat", post(ollama::chat))
        .route("/api/pull", post(ollama::never_downloads))
        .route("/api/push", post(ollama::never_downloads))
        .route("/api/create", post(ollama::never_downloads))
        .route("/api/copy", post(ollama::never_downloads))
        .route(
            "/api/delete",
            axum::routing::delete(ollama::never_downloads).post(ollama::never_downloads),
        )
        .route("/api/embed", post(ollama::embed))
        .route("/api/embeddings", post(ollama::embeddings_legacy))
        .route("/v1/models", get(openai::models))
        .route("/v1/models/{*model}", get(openai::model))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), guard::guard))
        .with_state(state)
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.core.metrics_text().await,
    )
        .into_response()
}

async fn not_found(request: Request) -> ApiError {
    let path = request.uri().path().to_owned();
    ApiError::new(
        Dialect::of_path(&path),
        StatusCode::NOT_FOUND,
        format!("no endpoint {} {path}", request.method()),
    )
}

/// The request's JSON body, at most `limit` bytes; errors in the request's API's shape.
pub async fn json_body<T: serde::de::DeserializeOwned>(
    body: Body,
    limit: usize,
    dialect: Dialect,
) -> Result<T, ApiError> {
    let bytes: Bytes = axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            dialect,
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than {limit} bytes"),
        )
    })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            dialect,
            StatusCode::BAD_REQUEST,
            format!("the request body is not valid JSON for this endpoint: {e}"),
        )
    })
}

/// Who calls: over the Unix socket the peer's uid and pid; over TCP nobody can tell a process
/// apart, so the request's `user` (OpenAI), else an `x-egpu-client` header, else the peer's
/// address names the client that fairness shares out between.
pub fn caller(peer: &Peer, headers: &HeaderMap, user: Option<&str>) -> Caller {
    let header = headers
        .get(egpu_client_header())
        .and_then(|v| v.to_str().ok());
    let named = user.or(header).filter(|n| !n.is_empty());
    let client = match peer {
        Peer::Unix { uid, pid } => ClientKey {
            uid: *uid,
            pid: *pid,
            name: named.unwrap_or("http").chars().take(64).collect(),
        },
        Peer::Tcp(addr) => ClientKey {
            uid: u32::MAX,
            pid: None,
            name: named
                .map(|n| n.chars().take(64).collect())
                .unwrap_or_else(|| format!("http {}", addr.ip())),
        },
    };
    Caller {
        client,
        deadline: None,
    }
}

fn egpu_client_header() -> &'static str {
    "x-egpu-client"
}

pub fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An id for a completion: the time and a counter, unique within this egpud.
/// The texts an embedding request's input names: a string, or a list of strings (None for
/// anything else, e.g. token arrays).
pub fn input_texts(input: serde_json::Value) -> Option<Vec<String>> {
    use serde_json::Value;
    match input {
        Value::String(s) => Some(vec![s]),
        Value::Array(items) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Some(s),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

/// Standard base64 (with padding) of `bytes`: OpenAI's `encoding_format: "base64"`.
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let b = [
            group[0],
            *group.get(1).unwrap_or(&0),
            *group.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= group.len() {
                out.push(ALPHABET[(n >> shift & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub use super::completion_id;

/// Model names over HTTP name models, never files: a path would let any key holder make egpud
/// read any file its user can.
pub fn check_model_name(name: &str, dialect: Dialect) -> Result<(), ApiError> {
    if name.trim().is_empty() {
        return Err(ApiError::invalid(
            dialect,
            "model",
            "the request names no model",
        ));
    }
    if name.starts_with('/') || name.split('/').any(|part| part == "..") {
        return Err(ApiError::new(
            dialect,
            StatusCode::NOT_FOUND,
            format!("{name:?} is a path; name a model (GET /v1/models or /api/tags lists them)"),
        )
        .with_code("model_not_found"));
    }
    Ok(())
}

/// Shared by both APIs: the peer as an extractor.
pub type PeerInfo = Extension<Peer>;

/// A failed on-demand load: a name that resolves nowhere is a 404 that lists what exists.
pub async fn model_error(
    state: &AppState,
    name: &str,
    err: crate::error::DaemonError,
    dialect: Dialect,
) -> ApiError {
    use crate::error::DaemonError as E;
    if !matches!(
        err,
        E::UnknownModel { .. } | E::UnknownSource { .. } | E::NotInHfCache(_) | E::MissingFile(_)
    ) {
        return ApiError::from_daemon(err, dialect);
    }
    let names: Vec<String> = state
        .core
        .available()
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|m| m.name)
        .collect();
    let list = if names.is_empty() {
        "none (put a .gguf file in the models folder, or use Ollama's or LM Studio's)".to_owned()
    } else {
        names.join(", ")
    };
    ApiError::new(
        dialect,
        StatusCode::NOT_FOUND,
        format!("model {name:?} not found; available: {list}"),
    )
    .with_code("model_not_found")
}
