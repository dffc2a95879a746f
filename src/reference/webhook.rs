//! Outgoing change webhooks (U4): after each write a background task POSTs the collection's new
//! version to the configured URL, signed the Standard Webhooks way when a secret is set.

use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinSet;

use super::{CollectionId, StopSignal};

/// Attempts per webhook before it is given up (and logged).
const ATTEMPTS: u32 = 4;
/// Wait before the first retry; doubled for each later one.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// Per attempt, so a receiver that never answers cannot pile up deliveries.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// One change to announce: the store sends it, the dispatcher delivers it.
pub(super) struct ChangeNotice {
    pub(super) collection: CollectionId,
    /// The collection's new version; `None` when the collection was deleted.
    pub(super) version: Option<u64>,
}

/// Why a webhook cannot be signed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("the webhook secret is not base64 (after an optional `whsec_` prefix): {0}")]
    Secret(#[from] base64::DecodeError),
}

/// The `webhook-signature` value for one message, per Standard Webhooks:
/// `v1,` + base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}")), where the key is the secret
/// base64-decoded after an optional `whsec_` prefix. Public so the sidecar's verifier tests
/// can sign what they send.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> Result<String, SignError> {
    let key = STANDARD.decode(secret.strip_prefix("whsec_").unwrap_or(secret))?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("HMAC accepts keys of any length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    Ok(format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes())))
}

/// Where webhooks go and how they are signed.
pub(super) struct WebhookTarget {
    /// One client for every delivery, so connections to the receiver are reused.
    client: reqwest::Client,
    /// Where notices are POSTed.
    url: String,
    /// Signs each delivery when set (checked at start-up).
    secret: Option<String>,
    /// Random per server, so `webhook-id`s from two runs never collide in a receiver's dedup.
    id_prefix: String,
}

/// Why one delivery attempt failed.
#[derive(Debug, thiserror::Error)]
enum DeliveryError {
    #[error(transparent)]
    Sign(#[from] SignError),
    #[error("request failed: {0}")]
    Http(#[from] reqwest::Error),
    #[error("receiver answered {0}")]
    Status(reqwest::StatusCode),
}

impl WebhookTarget {
    /// Checks the secret now, so a bad one stops start-up instead of every delivery.
    pub(super) fn new(url: String, secret: Option<String>) -> io::Result<WebhookTarget> {
        if let Some(secret) = &secret {
            sign(secret, "", 0, b"").map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
        }
        let client = reqwest::Client::builder().timeout(ATTEMPT_TIMEOUT).build().map_err(io::Error::other)?;
        let id_prefix = format!("msg_{:016x}", rand::random::<u64>());
        Ok(WebhookTarget { client, url, secret, id_prefix })
    }

    /// One attempt: a fresh timestamp and signature, the same `webhook-id` on every retry.
    async fn post(&self, id: &str, body: &[u8]) -> Result<(), DeliveryError> {
        let mut request = self.client.post(&self.url).header("content-type", "application/json");
        if let Some(secret) = &self.secret {
            let timestamp = unix_now();
            request = request
                .header("webhook-id", id)
                .header("webhook-timestamp", timestamp.to_string())
                .header("webhook-signature", sign(secret, id, timestamp, body)?);
        }
        let response = request.body(body.to_vec()).send().await?;
        match response.status().is_success() {
            true => Ok(()),
            false => Err(DeliveryError::Status(response.status())),
        }
    }
}

/// Delivers notices until the server stops, each on its own task so a slow or failing receiver
/// never delays a write or another webhook. Stopping drops (aborts) deliveries still retrying.
pub(super) async fn dispatch(
    target: WebhookTarget,
    mut notices: UnboundedReceiver<ChangeNotice>,
    stop: StopSignal,
) {
    let target = Arc::new(target);
    let mut deliveries = JoinSet::new();
    let stopped = stop.wait();
    tokio::pin!(stopped);
    let mut sent: u64 = 0;
    loop {
        tokio::select! {
            () = &mut stopped => break,
            Some(_) = deliveries.join_next(), if !deliveries.is_empty() => {}
            notice = notices.recv() => {
                let Some(notice) = notice else { break };
                sent += 1;
                let id = format!("{}_{sent}", target.id_prefix);
                deliveries.spawn(deliver(Arc::clone(&target), id, notice));
            }
        }
    }
}

/// Posts one notice, retrying with doubling backoff; gives up with a warning.
async fn deliver(target: Arc<WebhookTarget>, id: String, notice: ChangeNotice) {
    let body = notice_body(&notice);
    let collection = &notice.collection;
    let mut backoff = FIRST_BACKOFF;
    for attempt in 1..=ATTEMPTS {
        match target.post(&id, &body).await {
            Ok(()) => {
                tracing::debug!(%collection, webhook_id = %id, attempt, "webhook delivered");
                return;
            }
            Err(err) if attempt < ATTEMPTS => {
                tracing::debug!(%collection, webhook_id = %id, attempt, %err, "webhook failed, retrying");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
            Err(err) => {
                tracing::warn!(%collection, webhook_id = %id, url = %target.url, %err, "webhook given up");
            }
        }
    }
}

/// `{"realm","user","name","version"}`, the version as a string (left out after a deletion).
fn notice_body(notice: &ChangeNotice) -> Vec<u8> {
    let c = &notice.collection;
    let mut body = serde_json::json!({ "realm": c.realm, "user": c.user, "name": c.name });
    if let Some(version) = notice.version {
        body["version"] = version.to_string().into();
    }
    serde_json::to_vec(&body).expect("a serde_json::Value always serializes")
}

fn unix_now() -> i64 {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since_epoch.as_secs()).unwrap_or(i64::MAX)
}
