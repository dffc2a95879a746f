//! Incoming change webhooks (U4): verifies the Standard Webhooks signature when a secret is set,
//! parses the notice, and recognises replays, independent of any HTTP framework.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use http::HeaderMap;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::collection::{Collection, Realm};

/// Largest body accepted: a notice is a few short fields, so anything bigger is a mistake or an
/// attack, refused before it is parsed or hashed.
pub const MAX_BODY: usize = 64 * 1024;

/// How far `webhook-timestamp` may be from our clock, either way (the Standard Webhooks default):
/// wide enough for clock skew, narrow enough that a captured request cannot be replayed later.
const TOLERANCE_SECS: u64 = 5 * 60;

/// How long a verified `webhook-id` is remembered. Longer than the timestamp tolerance on both
/// sides, so a signed request cannot be replayed after its id is forgotten.
const REPLAY_WINDOW: Duration = Duration::from_secs(10 * 60);

/// Most ids remembered at once, so a flood of distinct ids cannot grow memory without bound.
const MAX_REMEMBERED: usize = 100_000;

/// A parsed change notification: which collection changed (and, if the sender said, to which
/// version). The version is only a hint: the listing (U1) is always re-read for the truth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeNotice {
    /// The collection to re-read.
    pub collection: Collection,
    /// The sender's new version, as text; `None` when absent, `null` or empty.
    pub version: Option<String>,
}

/// Why a webhook is refused; each maps to a status (401 or 400) and a short reason label for
/// logs/metrics. A refused webhook changes nothing, not even the replay memory.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WebhookRejection {
    #[error("webhook-id, webhook-timestamp and webhook-signature are required")]
    MissingHeaders,
    /// 401, not 400: the timestamp is part of what is signed, so an unreadable one is an
    /// authentication failure like a bad signature.
    #[error("webhook-timestamp is not an integer number of seconds")]
    BadTimestamp,
    #[error("webhook-timestamp is more than 5 minutes from the receiver's clock")]
    StaleTimestamp,
    #[error("no webhook-signature entry matches")]
    BadSignature,
    #[error("malformed body: {0}")]
    MalformedBody(String),
    #[error("realm must be \"datasets\" or \"lenses\"")]
    UnknownRealm,
    #[error("body larger than {MAX_BODY} bytes")]
    TooLarge,
}

impl WebhookRejection {
    /// 401 for anything about authentication (the sender should fix its secret or clock),
    /// 400 for a body we cannot use.
    pub fn status(&self) -> u16 {
        match self {
            WebhookRejection::MissingHeaders
            | WebhookRejection::BadTimestamp
            | WebhookRejection::StaleTimestamp
            | WebhookRejection::BadSignature => 401,
            WebhookRejection::MalformedBody(_)
            | WebhookRejection::UnknownRealm
            | WebhookRejection::TooLarge => 400,
        }
    }

    /// A fixed label, safe as a metric label value (no input in it).
    pub fn reason(&self) -> &'static str {
        match self {
            WebhookRejection::MissingHeaders => "missing_headers",
            WebhookRejection::BadTimestamp => "bad_timestamp",
            WebhookRejection::StaleTimestamp => "stale_timestamp",
            WebhookRejection::BadSignature => "bad_signature",
            WebhookRejection::MalformedBody(_) => "malformed_body",
            WebhookRejection::UnknownRealm => "unknown_realm",
            WebhookRejection::TooLarge => "too_large",
        }
    }
}

/// What to do with a webhook that passed verification.
#[derive(Debug, PartialEq, Eq)]
pub enum Accepted {
    /// A new notice: re-read this collection.
    Notice(ChangeNotice),
    /// The `webhook-id` was seen in the last 10 minutes: acknowledge (202), do nothing. Senders
    /// retry deliveries they think failed, so this is normal, not an error.
    Replay,
}

/// Verifies (when a secret is configured) and parses webhooks; remembers recent webhook-ids.
/// Shared by every request on the internal listener, hence `&self` methods.
pub struct WebhookVerifier {
    /// The decoded HMAC key; `None` accepts unsigned webhooks (an operator's explicit choice).
    key: Option<Vec<u8>>,
    /// Ids of recently accepted webhooks. A std `Mutex`: the critical section is a hash-map
    /// lookup and insert, never held across an await.
    seen: Mutex<ReplayMemory>,
}

impl WebhookVerifier {
    /// `secret`: None or empty = accept unsigned webhooks. Otherwise the Standard Webhooks secret:
    /// base64 after an optional `whsec_` prefix. A secret that is not valid base64 (or decodes
    /// to nothing) is an error naming the setting, so start-up refuses it instead of every
    /// webhook failing later.
    pub fn new(secret: Option<&str>) -> Result<WebhookVerifier, String> {
        let key = match secret.map(str::trim).filter(|s| !s.is_empty()) {
            None => None,
            Some(secret) => Some(decode_secret(secret)?),
        };
        Ok(WebhookVerifier { key, seen: Mutex::new(ReplayMemory::new(MAX_REMEMBERED)) })
    }

    /// The whole verdict for one request. Order matters: size first (cheap), then the
    /// signature, then the body, and only a fully valid webhook marks its id as seen, so neither
    /// forged nor malformed requests can make a later genuine delivery look like a replay.
    pub fn check(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now: SystemTime,
    ) -> Result<Accepted, WebhookRejection> {
        if body.len() > MAX_BODY {
            return Err(WebhookRejection::TooLarge);
        }
        if let Some(key) = &self.key {
            verify_signature(key, headers, body, now)?;
        }
        let notice = parse_notice(body)?;
        match header(headers, "webhook-id") {
            Some(id) if !self.remember(id, now) => Ok(Accepted::Replay),
            _ => Ok(Accepted::Notice(notice)),
        }
    }

    /// Records `id` as seen at `now`; false when it was already seen within the window.
    fn remember(&self, id: &[u8], now: SystemTime) -> bool {
        let digest: [u8; 32] = Sha256::digest(id).into();
        self.seen.lock().unwrap_or_else(PoisonError::into_inner).insert(digest, now)
    }
}

/// The HMAC key from a Standard Webhooks secret (`whsec_` + base64, or bare base64).
fn decode_secret(secret: &str) -> Result<Vec<u8>, String> {
    let encoded = secret.strip_prefix("whsec_").unwrap_or(secret);
    let key = STANDARD.decode(encoded).map_err(|err| {
        format!("changes.webhook_secret: not valid base64 after the optional `whsec_` prefix: {err}")
    })?;
    if key.is_empty() {
        return Err("changes.webhook_secret: the secret decodes to no bytes".to_owned());
    }
    Ok(key)
}

/// A header's raw bytes, treating an empty value like an absent one.
fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    headers.get(name).map(|value| value.as_bytes()).filter(|value| !value.is_empty())
}

/// Checks the three Standard Webhooks headers against the body.
fn verify_signature(
    key: &[u8],
    headers: &HeaderMap,
    body: &[u8],
    now: SystemTime,
) -> Result<(), WebhookRejection> {
    let (Some(id), Some(timestamp), Some(signatures)) = (
        header(headers, "webhook-id"),
        header(headers, "webhook-timestamp"),
        header(headers, "webhook-signature"),
    ) else {
        return Err(WebhookRejection::MissingHeaders);
    };
    check_timestamp(timestamp, now)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(key).map_err(|_| WebhookRejection::BadSignature)?;
    // The timestamp is signed as sent, exactly the bytes the sender put in the header.
    mac.update(id);
    mac.update(b".");
    mac.update(timestamp);
    mac.update(b".");
    mac.update(body);
    match any_signature_matches(&mac, signatures) {
        true => Ok(()),
        false => Err(WebhookRejection::BadSignature),
    }
}

/// Refuses a timestamp that is not an integer, or more than [`TOLERANCE_SECS`] from `now`.
fn check_timestamp(timestamp: &[u8], now: SystemTime) -> Result<(), WebhookRejection> {
    let seconds: i64 = std::str::from_utf8(timestamp)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or(WebhookRejection::BadTimestamp)?;
    match seconds.abs_diff(unix_seconds(now)) > TOLERANCE_SECS {
        true => Err(WebhookRejection::StaleTimestamp),
        false => Ok(()),
    }
}

/// `now` as signed unix seconds (negative before 1970, so a broken clock is still comparable).
fn unix_seconds(now: SystemTime) -> i64 {
    let saturate = |secs: u64| i64::try_from(secs).unwrap_or(i64::MAX);
    match now.duration_since(UNIX_EPOCH) {
        Ok(after) => saturate(after.as_secs()),
        Err(before) => -saturate(before.duration().as_secs()),
    }
}

/// True when any `v1,<base64>` entry of the space-separated list matches. Entries of other
/// versions (`v1a,…`) and undecodable ones are skipped, as the scheme asks, so a sender can
/// rotate keys or add schemes. `verify_slice` compares in constant time.
fn any_signature_matches(mac: &Hmac<Sha256>, signatures: &[u8]) -> bool {
    signatures
        .split(|byte| *byte == b' ')
        .filter_map(|entry| entry.strip_prefix(b"v1,"))
        .filter_map(|encoded| STANDARD.decode(encoded).ok())
        .any(|signature| mac.clone().verify_slice(&signature).is_ok())
}

/// The notice from a JSON body `{"realm","user","name","version"?}`; other fields are ignored.
fn parse_notice(body: &[u8]) -> Result<ChangeNotice, WebhookRejection> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|err| WebhookRejection::MalformedBody(format!("not JSON: {err}")))?;
    let Value::Object(fields) = value else {
        return Err(malformed("not a JSON object"));
    };
    let realm = Realm::parse(text_field(&fields, "realm")?).ok_or(WebhookRejection::UnknownRealm)?;
    let user = non_empty_field(&fields, "user")?;
    let name = non_empty_field(&fields, "name")?;
    let version = version_field(&fields)?;
    Ok(ChangeNotice { collection: Collection { realm, user, name }, version })
}

fn malformed(detail: &str) -> WebhookRejection {
    WebhookRejection::MalformedBody(detail.to_owned())
}

/// A required text field.
fn text_field<'a>(fields: &'a Map<String, Value>, key: &str) -> Result<&'a str, WebhookRejection> {
    match fields.get(key) {
        Some(Value::String(text)) => Ok(text),
        Some(_) => Err(WebhookRejection::MalformedBody(format!("`{key}` must be text"))),
        None => Err(WebhookRejection::MalformedBody(format!("`{key}` is missing"))),
    }
}

/// A required text field that names something, so it cannot be empty.
fn non_empty_field(fields: &Map<String, Value>, key: &str) -> Result<String, WebhookRejection> {
    match text_field(fields, key)? {
        "" => Err(WebhookRejection::MalformedBody(format!("`{key}` is empty"))),
        text => Ok(text.to_owned()),
    }
}

/// The optional version, text or number, kept as text. Absent, `null` and `""` all mean "not
/// said" (the listing tells the version anyway). CR, LF and NUL are refused: versions become
/// event-stream ids, where those characters would end or corrupt the field.
fn version_field(fields: &Map<String, Value>) -> Result<Option<String>, WebhookRejection> {
    let version = match fields.get("version") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(text)) => text.clone(),
        Some(Value::Number(number)) => number.to_string(),
        Some(_) => return Err(malformed("`version` must be text or a number")),
    };
    if version.contains(['\r', '\n', '\0']) {
        return Err(malformed("`version` contains CR, LF or NUL"));
    }
    Ok(Some(version).filter(|version| !version.is_empty()))
}

/// Ids of recently accepted webhooks, bounded in time and count. Ids are kept as SHA-256
/// digests so memory per entry is fixed however long the sender's ids are.
struct ReplayMemory {
    /// When each remembered id was accepted.
    seen_at: HashMap<[u8; 32], SystemTime>,
    /// The same entries in insertion order, so expiry and the count cap drop the oldest
    /// without scanning the map. May hold an id twice when it was re-accepted after its
    /// window; the map decides which entry is current.
    order: VecDeque<([u8; 32], SystemTime)>,
    /// Most entries kept (a parameter so tests can use a small one).
    capacity: usize,
}

impl ReplayMemory {
    fn new(capacity: usize) -> ReplayMemory {
        ReplayMemory { seen_at: HashMap::new(), order: VecDeque::new(), capacity }
    }

    /// Remembers `id` at `now`; false when it was already remembered within the window.
    fn insert(&mut self, id: [u8; 32], now: SystemTime) -> bool {
        if self.seen_at.get(&id).is_some_and(|&at| within_window(at, now)) {
            return false;
        }
        self.expire(now);
        while self.order.len() >= self.capacity.max(1) {
            self.drop_oldest();
        }
        self.seen_at.insert(id, now);
        self.order.push_back((id, now));
        true
    }

    /// Drops entries from the front while they are older than the window.
    fn expire(&mut self, now: SystemTime) {
        while self.order.front().is_some_and(|&(_, at)| !within_window(at, now)) {
            self.drop_oldest();
        }
    }

    /// Removes the oldest queue entry, and its map entry unless the id was re-accepted since.
    fn drop_oldest(&mut self) {
        if let Some((id, at)) = self.order.pop_front() {
            if self.seen_at.get(&id) == Some(&at) {
                self.seen_at.remove(&id);
            }
        }
    }
}

/// True when `at` is less than [`REPLAY_WINDOW`] before `now` (or after it: a clock that went
/// back must not make a replay look new).
fn within_window(at: SystemTime, now: SystemTime) -> bool {
    now.duration_since(at).map_or(true, |age| age < REPLAY_WINDOW)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::sign;
    use http::HeaderValue;

    /// The Standard Webhooks specification's example secret, message and signature.
    const SPEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SPEC_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SPEC_TIMESTAMP: i64 = 1614265330;
    const SPEC_SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    const SECRET: &str = "whsec_c2VjcmV0LWtleS1mb3ItdGVzdHM=";
    const NOW: i64 = 1_700_000_000;
    const BODY: &[u8] = br#"{"realm":"datasets","user":"demo","name":"animals","version":"7"}"#;

    fn at(unix: i64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(u64::try_from(unix).expect("test times are after 1970"))
    }

    fn headers(id: &str, timestamp: &str, signature: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in
            [("webhook-id", id), ("webhook-timestamp", timestamp), ("webhook-signature", signature)]
        {
            headers.insert(name, HeaderValue::from_str(value).expect("test header"));
        }
        headers
    }

    /// Headers for `body` signed with `secret` at `timestamp`.
    fn signed(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> HeaderMap {
        let signature = sign(secret, id, timestamp, body).expect("test secret is base64");
        headers(id, &timestamp.to_string(), &signature)
    }

    fn verifier() -> WebhookVerifier {
        WebhookVerifier::new(Some(SECRET)).expect("test secret is base64")
    }

    fn animals(version: Option<&str>) -> Accepted {
        Accepted::Notice(ChangeNotice {
            collection: Collection { realm: Realm::Datasets, user: "demo".into(), name: "animals".into() },
            version: version.map(str::to_owned),
        })
    }

    #[test]
    fn valid_signature_is_accepted() {
        let verdict = verifier().check(&signed(SECRET, "msg_1", NOW, BODY), BODY, at(NOW));
        assert_eq!(verdict, Ok(animals(Some("7"))));
    }

    #[test]
    fn standard_webhooks_example_verifies() {
        let body = br#"{"test": 2432232314}"#;
        let verifier = WebhookVerifier::new(Some(SPEC_SECRET)).unwrap();
        let headers = headers(SPEC_ID, &SPEC_TIMESTAMP.to_string(), SPEC_SIGNATURE);
        let verdict = verifier.check(&headers, body, at(SPEC_TIMESTAMP));
        // The signature passes; the example body is not a change notice.
        assert!(matches!(verdict, Err(WebhookRejection::MalformedBody(_))));
    }

    #[test]
    fn one_valid_entry_among_several_suffices() {
        let good = sign(SECRET, "msg_1", NOW, BODY).unwrap();
        let other = sign("whsec_b3RoZXI=", "msg_1", NOW, BODY).unwrap();
        let v1a = good.replacen("v1,", "v1a,", 1);
        let list = format!("{v1a} garbage v1,!!notbase64 {other} v2,abc {good}");
        let verdict = verifier().check(&headers("msg_1", &NOW.to_string(), &list), BODY, at(NOW));
        assert_eq!(verdict, Ok(animals(Some("7"))));
    }

    #[test]
    fn only_v1_entries_count() {
        let v1a = sign(SECRET, "msg_1", NOW, BODY).unwrap().replacen("v1,", "v1a,", 1);
        let verdict = verifier().check(&headers("msg_1", &NOW.to_string(), &v1a), BODY, at(NOW));
        assert_eq!(verdict, Err(WebhookRejection::BadSignature));
    }

    #[test]
    fn tampering_breaks_the_signature() {
        let verifier = verifier();
        let check = |headers: &HeaderMap, body: &[u8]| verifier.check(headers, body, at(NOW));
        let bad = Err(WebhookRejection::BadSignature);
        let wrong_secret = signed("whsec_b3RoZXI=", "msg_1", NOW, BODY);
        assert_eq!(check(&wrong_secret, BODY), bad);
        let tampered_body = br#"{"realm":"datasets","user":"demo","name":"animals","version":"8"}"#;
        assert_eq!(check(&signed(SECRET, "msg_1", NOW, BODY), tampered_body), bad);
        let signature = sign(SECRET, "msg_1", NOW, BODY).unwrap();
        assert_eq!(check(&headers("msg_2", &NOW.to_string(), &signature), BODY), bad);
        let later = (NOW + 1).to_string();
        assert_eq!(check(&headers("msg_1", &later, &signature), BODY), bad);
    }

    #[test]
    fn timestamps_more_than_five_minutes_off_are_stale() {
        let verifier = verifier();
        for (offset, id) in [(-360, "past"), (360, "future")] {
            let headers = signed(SECRET, id, NOW + offset, BODY);
            let verdict = verifier.check(&headers, BODY, at(NOW));
            assert_eq!(verdict, Err(WebhookRejection::StaleTimestamp), "{id}");
        }
        for (offset, id) in [(-240, "past"), (240, "future"), (300, "edge")] {
            let headers = signed(SECRET, id, NOW + offset, BODY);
            assert_eq!(verifier.check(&headers, BODY, at(NOW)), Ok(animals(Some("7"))));
        }
    }

    #[test]
    fn unreadable_timestamp_is_refused() {
        let signature = sign(SECRET, "msg_1", NOW, BODY).unwrap();
        for timestamp in ["soon", "1.5", "99999999999999999999"] {
            let verdict = verifier().check(&headers("msg_1", timestamp, &signature), BODY, at(NOW));
            assert_eq!(verdict, Err(WebhookRejection::BadTimestamp), "{timestamp}");
        }
        assert_eq!(WebhookRejection::BadTimestamp.status(), 401);
    }

    #[test]
    fn every_header_is_required_with_a_secret() {
        for missing in ["webhook-id", "webhook-timestamp", "webhook-signature"] {
            let mut headers = signed(SECRET, "msg_1", NOW, BODY);
            headers.remove(missing);
            let verdict = verifier().check(&headers, BODY, at(NOW));
            assert_eq!(verdict, Err(WebhookRejection::MissingHeaders), "{missing}");
        }
        let verdict = verifier().check(&HeaderMap::new(), BODY, at(NOW));
        assert_eq!(verdict.map_err(|err| err.status()), Err(401));
    }

    #[test]
    fn replay_within_the_window_is_acknowledged_only() {
        let verifier = verifier();
        let first = signed(SECRET, "msg_1", NOW, BODY);
        assert_eq!(verifier.check(&first, BODY, at(NOW)), Ok(animals(Some("7"))));
        let resent = signed(SECRET, "msg_1", NOW + 60, BODY);
        assert_eq!(verifier.check(&resent, BODY, at(NOW + 60)), Ok(Accepted::Replay));
        let much_later = signed(SECRET, "msg_1", NOW + 11 * 60, BODY);
        let verdict = verifier.check(&much_later, BODY, at(NOW + 11 * 60));
        assert_eq!(verdict, Ok(animals(Some("7"))));
    }

    #[test]
    fn forged_requests_do_not_mark_the_id_seen() {
        let verifier = verifier();
        let forged = signed("whsec_b3RoZXI=", "msg_1", NOW, BODY);
        assert_eq!(verifier.check(&forged, BODY, at(NOW)), Err(WebhookRejection::BadSignature));
        let genuine = signed(SECRET, "msg_1", NOW, BODY);
        assert_eq!(verifier.check(&genuine, BODY, at(NOW)), Ok(animals(Some("7"))));
    }

    #[test]
    fn malformed_bodies_do_not_mark_the_id_seen() {
        let verifier = verifier();
        let bad = br#"{"realm":"things","user":"demo","name":"animals"}"#;
        let rejected = verifier.check(&signed(SECRET, "msg_1", NOW, bad), bad, at(NOW));
        assert_eq!(rejected, Err(WebhookRejection::UnknownRealm));
        let genuine = signed(SECRET, "msg_1", NOW, BODY);
        assert_eq!(verifier.check(&genuine, BODY, at(NOW)), Ok(animals(Some("7"))));
    }

    #[test]
    fn unsigned_mode_accepts_and_still_dedups_by_id() {
        for secret in [None, Some(""), Some("  ")] {
            let verifier = WebhookVerifier::new(secret).unwrap();
            assert_eq!(verifier.check(&HeaderMap::new(), BODY, at(NOW)), Ok(animals(Some("7"))));
            let mut with_id = HeaderMap::new();
            with_id.insert("webhook-id", HeaderValue::from_static("msg_1"));
            assert_eq!(verifier.check(&with_id, BODY, at(NOW)), Ok(animals(Some("7"))));
            assert_eq!(verifier.check(&with_id, BODY, at(NOW)), Ok(Accepted::Replay));
        }
    }

    /// The verdict for `body` sent unsigned, so only the body rules apply.
    fn unsigned(body: &[u8]) -> Result<Accepted, WebhookRejection> {
        WebhookVerifier::new(None).unwrap().check(&HeaderMap::new(), body, at(NOW))
    }

    #[test]
    fn malformed_bodies_are_refused() {
        let cases: [&[u8]; 9] = [
            b"not json",
            b"[]",
            br#"["datasets","demo","animals"]"#,
            br#"{"realm":"datasets","user":"demo"}"#,
            br#"{"realm":"datasets","user":"demo","name":7}"#,
            br#"{"realm":"datasets","user":"","name":"animals"}"#,
            br#"{"realm":"datasets","user":"demo","name":""}"#,
            br#"{"realm":"datasets","user":"demo","name":"animals","version":"7\n8"}"#,
            br#"{"realm":"datasets","user":"demo","name":"animals","version":[7]}"#,
        ];
        for body in cases {
            let verdict = unsigned(body);
            let body = String::from_utf8_lossy(body);
            assert!(matches!(verdict, Err(WebhookRejection::MalformedBody(_))), "{body}");
            assert_eq!(verdict.map_err(|err| err.status()), Err(400), "{body}");
        }
    }

    #[test]
    fn versions_with_line_breaks_or_nul_are_refused() {
        for version in ["a\rb", "a\nb", "a\\u0000b"] {
            let body = format!(r#"{{"realm":"lenses","user":"u","name":"n","version":"{version}"}}"#);
            let body = body.replace("\r", "\\r").replace("\n", "\\n");
            let verdict = unsigned(body.as_bytes());
            assert!(matches!(verdict, Err(WebhookRejection::MalformedBody(_))), "{body}");
        }
    }

    #[test]
    fn unknown_realm_is_refused() {
        let verdict = unsigned(br#"{"realm":"things","user":"demo","name":"animals"}"#);
        assert_eq!(verdict, Err(WebhookRejection::UnknownRealm));
        assert_eq!(WebhookRejection::UnknownRealm.status(), 400);
    }

    #[test]
    fn huge_body_is_refused_before_parsing() {
        let huge = vec![b'x'; MAX_BODY + 1];
        assert_eq!(unsigned(&huge), Err(WebhookRejection::TooLarge));
        // Also before the signature is checked: no headers needed for this verdict.
        assert_eq!(verifier().check(&HeaderMap::new(), &huge, at(NOW)), Err(WebhookRejection::TooLarge));
    }

    #[test]
    fn version_is_optional_and_numbers_become_text() {
        let lenses = |version: Option<&str>| {
            Accepted::Notice(ChangeNotice {
                collection: Collection { realm: Realm::Lenses, user: "u".into(), name: "n".into() },
                version: version.map(str::to_owned),
            })
        };
        let base = r#""realm":"lenses","user":"u","name":"n","extra":{"ignored":true}"#;
        for (version, expected) in [
            ("", None),
            (r#","version":null"#, None),
            (r#","version":"""#, None),
            (r#","version":42"#, Some("42")),
            (r#","version":"v-9""#, Some("v-9")),
        ] {
            let body = format!("{{{base}{version}}}");
            assert_eq!(unsigned(body.as_bytes()), Ok(lenses(expected)), "{body}");
        }
    }

    #[test]
    fn secret_works_with_and_without_prefix() {
        let bare = SECRET.strip_prefix("whsec_").unwrap();
        let headers = signed(SECRET, "msg_1", NOW, BODY);
        let bare_verifier = WebhookVerifier::new(Some(bare)).unwrap();
        let verdict = bare_verifier.check(&headers, BODY, at(NOW));
        assert_eq!(verdict, Ok(animals(Some("7"))));
        let headers = signed(bare, "msg_2", NOW, BODY);
        assert_eq!(verifier().check(&headers, BODY, at(NOW)), Ok(animals(Some("7"))));
    }

    #[test]
    fn invalid_secret_is_refused_naming_the_setting() {
        for secret in ["whsec_not base64!", "%%%", "whsec_"] {
            let err = WebhookVerifier::new(Some(secret)).err().expect(secret);
            assert!(err.contains("changes.webhook_secret"), "{err}");
        }
    }

    #[test]
    fn rejections_have_statuses_and_fixed_reasons() {
        let all = [
            WebhookRejection::MissingHeaders,
            WebhookRejection::BadTimestamp,
            WebhookRejection::StaleTimestamp,
            WebhookRejection::BadSignature,
            WebhookRejection::MalformedBody("detail".into()),
            WebhookRejection::UnknownRealm,
            WebhookRejection::TooLarge,
        ];
        let statuses: Vec<u16> = all.iter().map(WebhookRejection::status).collect();
        assert_eq!(statuses, [401, 401, 401, 401, 400, 400, 400]);
        let reasons: std::collections::HashSet<_> = all.iter().map(|r| r.reason()).collect();
        assert_eq!(reasons.len(), all.len());
    }

    #[test]
    fn replay_memory_is_bounded_by_count_and_time() {
        let id = |n: u8| [n; 32];
        let mut memory = ReplayMemory::new(3);
        for n in 0..4 {
            assert!(memory.insert(id(n), at(NOW + i64::from(n))));
        }
        assert_eq!(memory.seen_at.len(), 3);
        // The oldest was dropped to make room, so it counts as new again.
        assert!(memory.insert(id(0), at(NOW + 5)));
        assert!(!memory.insert(id(3), at(NOW + 6)));
        // Ten minutes on, everything has expired.
        assert!(memory.insert(id(9), at(NOW + 20 * 60)));
        assert_eq!((memory.seen_at.len(), memory.order.len()), (1, 1));
    }
}
