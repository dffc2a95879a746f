//! The internal listener: operator endpoints that must never be reachable from the public one.
//! `/healthz` says the process is alive; `/readyz` says the public listener accepts connections.

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use std::net::SocketAddr;
use std::time::Duration;

/// Answers the internal listener's requests.
pub struct Admin {
    /// The public listener, probed by `/readyz`: ready means a client can connect now.
    pub public: SocketAddr,
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_owned();
        match path.as_str() {
            "/healthz" => json(StatusCode::OK, r#"{"status":"alive"}"#),
            "/readyz" => self.readiness().await,
            "/hooks/changes" => json(
                StatusCode::NOT_IMPLEMENTED,
                r#"{"error":"not_implemented","message":"webhooks are not handled yet"}"#,
            ),
            _ => json(
                StatusCode::NOT_FOUND,
                r#"{"error":"not_found","message":"internal endpoints are /healthz and /readyz"}"#,
            ),
        }
    }
}

impl Admin {
    async fn readiness(&self) -> Response<Vec<u8>> {
        let probe = tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::TcpStream::connect(loopback_for(self.public)),
        )
        .await;
        match probe {
            Ok(Ok(_)) => json(StatusCode::OK, r#"{"status":"ready"}"#),
            _ => json(
                StatusCode::SERVICE_UNAVAILABLE,
                r#"{"error":"not_ready","message":"the public listener is not accepting connections yet"}"#,
            ),
        }
    }
}

/// A wildcard listen address cannot be connected to; its loopback twin can.
fn loopback_for(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(a) if a.ip().is_unspecified() => {
            SocketAddr::from(([127, 0, 0, 1], a.port()))
        }
        SocketAddr::V6(a) if a.ip().is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, a.port()))
        }
        other => other,
    }
}

fn json(status: StatusCode, body: &str) -> Response<Vec<u8>> {
    let mut response = Response::new(body.as_bytes().to_vec());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    headers.insert("content-length", http::HeaderValue::from(body.len()));
    headers.insert("cache-control", http::HeaderValue::from_static("no-store"));
    response
}
