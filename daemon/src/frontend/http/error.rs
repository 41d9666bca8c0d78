//! HTTP errors in the shape each API's clients parse: OpenAI's
//! `{"error": {"message", "type", "param", "code"}}` under `/v1`, Ollama's `{"error": "..."}`
//! elsewhere; and the one mapping of domain errors to HTTP status codes.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::error::DaemonError;

/// Which API a request spoke, so its errors come back in that API's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    OpenAi,
    Ollama,
}

impl Dialect {
    pub fn of_path(path: &str) -> Dialect {
        if path == "/v1" || path.starts_with("/v1/") {
            Dialect::OpenAi
        } else {
            Dialect::Ollama
        }
    }
}

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`.
    pub kind: &'static str,
    /// OpenAI's `code`.
    pub code: Option<&'static str>,
    /// OpenAI's `param`: the request field at fault.
    pub param: Option<&'static str>,
    pub dialect: Dialect,
}

impl ApiError {
    pub fn new(dialect: Dialect, status: StatusCode, message: impl Into<String>) -> ApiError {
        let kind = match status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        };
        ApiError {
            status,
            message: message.into(),
            kind,
            code: None,
            param: None,
            dialect,
        }
    }

    pub fn invalid(dialect: Dialect, param: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            param: Some(param),
            ..ApiError::new(dialect, StatusCode::BAD_REQUEST, message)
        }
    }

    pub fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    /// The status each domain error gets: 4xx for what the client can fix, 503 for what waits
    /// on the server (budget, device), and 500 only for egpud's own faults.
    pub fn from_daemon(err: DaemonError, dialect: Dialect) -> ApiError {
        let (status, code) = match &err {
            DaemonError::UnknownModel { .. }
            | DaemonError::MissingFile(_)
            | DaemonError::UnknownSource { .. }
            | DaemonError::NotInHfCache(_) => (StatusCode::NOT_FOUND, "model_not_found"),
            DaemonError::BadModelFile { .. } => (StatusCode::BAD_REQUEST, "bad_model_file"),
            DaemonError::InvalidArgument(_) | DaemonError::UnsupportedBackend { .. } => {
                (StatusCode::BAD_REQUEST, "invalid_request")
            }
            DaemonError::NameTaken { .. } => (StatusCode::CONFLICT, "name_taken"),
            DaemonError::Busy { .. } => (StatusCode::CONFLICT, "model_busy"),
            DaemonError::QueueFull { .. } => (StatusCode::TOO_MANY_REQUESTS, "queue_full"),
            DaemonError::OverBudget { .. }
            | DaemonError::TranslationTooLarge { .. }
            | DaemonError::DeviceOutOfMemory(_) => (StatusCode::SERVICE_UNAVAILABLE, "over_budget"),
            DaemonError::Unloaded(_) | DaemonError::ModelFileChanged(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "model_unloaded")
            }
            DaemonError::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
            DaemonError::DeviceLost(_)
            | DaemonError::DeviceUnavailable(_)
            | DaemonError::PinWaiting { .. } => (StatusCode::SERVICE_UNAVAILABLE, "device_lost"),
            DaemonError::StillLoading(_) => (StatusCode::SERVICE_UNAVAILABLE, "model_loading"),
            DaemonError::DeadlineExceeded { .. } => {
                (StatusCode::GATEWAY_TIMEOUT, "deadline_exceeded")
            }
            DaemonError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
        };
        ApiError::new(dialect, status, err.to_string()).with_code(code)
    }

    /// The error as its API writes it (also inside a stream).
    pub fn body(&self) -> serde_json::Value {
        match self.dialect {
            Dialect::OpenAi => json!({
                "error": {
                    "message": self.message,
                    "type": self.kind,
                    "param": self.param,
                    "code": self.code,
                }
            }),
            Dialect::Ollama => json!({ "error": self.message }),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            // A queue frees a slot per finished request; a second is a sensible first wait.
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, 1.into());
        }
        response
    }
}
