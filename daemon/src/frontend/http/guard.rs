//! What a request over TCP must show before it reaches a handler. TCP on loopback is reachable
//! by every local user and by every web page the user opens, so:
//!
//! - `Host` must name a loopback host (or one of `--http-allowed-hosts`): a page on an
//!   attacker's domain that rebinds its DNS to 127.0.0.1 still sends its own domain (403).
//! - A request with an `Origin` (browsers send one on cross-origin calls) must come from one of
//!   `--http-origins` (403 otherwise); preflights from those are answered, and their responses
//!   carry the CORS headers.
//! - The key: `Authorization: Bearer <key>` or `x-api-key: <key>` (401), unless
//!   `--http-auth none`.
//!
//! The Unix socket needs none of this: only egpud's own user can connect to it.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::{ApiError, Dialect};
use super::{AppState, Peer};

/// Host names every TCP request may use.
const LOOPBACK_HOSTS: &[&str] = &["localhost", "127.0.0.1", "::1"];

pub async fn guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let dialect = Dialect::of_path(request.uri().path());
    let over_tcp = matches!(request.extensions().get::<Peer>(), Some(Peer::Tcp(_)));
    if !over_tcp {
        return next.run(request).await;
    }
    let settings = &state.settings;
    let headers = request.headers();
    if !host_allowed(headers, &settings.allowed_hosts) {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        return ApiError::new(
            dialect,
            StatusCode::FORBIDDEN,
            format!(
                "Host {host:?} is not a loopback name; egpud answers only localhost, \
                 127.0.0.1 and [::1] (and --http-allowed-hosts)"
            ),
        )
        .into_response();
    }
    let origin = match headers.get(header::ORIGIN) {
        None => None,
        Some(origin) => {
            let text = origin.to_str().unwrap_or("");
            if !settings.origins.iter().any(|o| o == text) {
                return ApiError::new(
                    dialect,
                    StatusCode::FORBIDDEN,
                    format!("origin {text:?} is not allowed (egpud --http-origins lists those that are)"),
                )
                .into_response();
            }
            Some(origin.clone())
        }
    };
    if let (Some(origin), true) = (&origin, request.method() == Method::OPTIONS) {
        return preflight(origin, headers);
    }
    if let Some(key) = &settings.api_key {
        if !key_matches(headers, key) {
            return ApiError::new(
                dialect,
                StatusCode::UNAUTHORIZED,
                "a valid API key is required: send `Authorization: Bearer <key>` (the key is in \
                 <state-dir>/api-key; `egpuctl api-key` prints it)",
            )
            .with_code("invalid_api_key")
            .into_response();
        }
    }
    let mut response = next.run(request).await;
    if let Some(origin) = origin {
        let h = response.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
    }
    response
}

/// The answer to a CORS preflight from an allowed origin.
fn preflight(origin: &HeaderValue, headers: &HeaderMap) -> Response {
    let allow_headers = headers
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("authorization, content-type, x-api-key"));
    (
        StatusCode::NO_CONTENT,
        [
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone()),
            (
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, POST, DELETE, OPTIONS"),
            ),
            (header::ACCESS_CONTROL_ALLOW_HEADERS, allow_headers),
            (
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("600"),
            ),
            (header::VARY, HeaderValue::from_static("Origin")),
        ],
    )
        .into_response()
}

/// Whether `Host` names a loopback host or an allowed one, with any port.
pub fn host_allowed(headers: &HeaderMap, extra: &[String]) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let name = host_name(host).to_ascii_lowercase();
    LOOPBACK_HOSTS.contains(&name.as_str()) || extra.iter().any(|h| h.eq_ignore_ascii_case(&name))
}

/// The name part of a `Host` value: `[::1]:8080` → `::1`, `localhost:11470` → `localhost`.
fn host_name(host: &str) -> &str {
    let host = host.trim();
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("");
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => host,
    }
}

fn key_matches(headers: &HeaderMap, key: &str) -> bool {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let api_key = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    [bearer, api_key]
        .into_iter()
        .flatten()
        .any(|given| same_bytes(given.as_bytes(), key.as_bytes()))
}

/// Compares without stopping at the first difference, so timing does not reveal the key.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(name: header::HeaderName, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn loopback_hosts_with_any_port_pass() {
        for ok in [
            "localhost",
            "localhost:11470",
            "127.0.0.1:80",
            "[::1]:11470",
            "[::1]",
            "LOCALHOST",
        ] {
            assert!(host_allowed(&with(header::HOST, ok), &[]), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:11470",
            "127.0.0.1.evil.example",
            "localhost.evil.example",
            "",
        ] {
            assert!(!host_allowed(&with(header::HOST, bad), &[]), "{bad}");
        }
        assert!(!host_allowed(&HeaderMap::new(), &[]));
        assert!(host_allowed(
            &with(header::HOST, "mybox.lan:11470"),
            &["mybox.lan".into()]
        ));
    }

    #[test]
    fn keys_by_bearer_or_x_api_key() {
        assert!(key_matches(
            &with(header::AUTHORIZATION, "Bearer s3cret"),
            "s3cret"
        ));
        assert!(key_matches(
            &with(header::HeaderName::from_static("x-api-key"), "s3cret"),
            "s3cret"
        ));
        assert!(!key_matches(
            &with(header::AUTHORIZATION, "Bearer s3cre"),
            "s3cret"
        ));
        assert!(!key_matches(
            &with(header::AUTHORIZATION, "s3cret"),
            "s3cret"
        ));
        assert!(!key_matches(&HeaderMap::new(), "s3cret"));
    }
}
