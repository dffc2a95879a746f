//! The errors a client can see, and the one place they become an HTTP status and JSON body.
//! Every module's failure that reaches a client is converted into an `ApiError` first.

use bytes::Bytes;
use serde::Serialize;

/// A failure answered before the response head: a status, a stable code and advice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    /// Machine-readable code, stable across releases (`bad_request`, `upstream_unavailable`…).
    pub code: &'static str,
    /// What happened and what the client can do about it.
    pub message: String,
    /// Extra response headers the status calls for (`WWW-Authenticate`, `Allow`, `Retry-After`).
    pub headers: Vec<(&'static str, String)>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: &'a str,
    message: &'a str,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), headers: Vec::new() }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "bad_request", message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(404, "not_found", message)
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> ApiError {
        self.headers.push((name, value.into()));
        self
    }

    /// The JSON body `{"error": code, "message": message}`.
    pub fn body(&self) -> Bytes {
        let body = Body { error: self.code, message: &self.message };
        // Serializing two strings cannot fail.
        Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.code, self.message)
    }
}
