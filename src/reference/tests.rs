//! Tests of the reference server as a client sees it: a real socket on 127.0.0.1:0, reqwest for
//! ordinary requests and raw bytes on a TCP stream where a URL library would rewrite the path.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use ciborium::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::value::{decode_cbor, encode_cbor};
use super::*;

async fn start() -> ReferenceServer {
    start_with(ReferenceConfig::default()).await
}

async fn start_with(config: ReferenceConfig) -> ReferenceServer {
    let listen: SocketAddr = "127.0.0.1:0".parse().expect("a socket address");
    ReferenceServer::start(listen, config).await.expect("the reference server starts")
}

fn animals() -> CollectionId {
    CollectionId::new("datasets", "demo", "animals")
}

fn cbor(value: Value) -> Bytes {
    encode_cbor(&value)
}

fn text(s: &str) -> Value {
    Value::Text(s.to_owned())
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> &'a str {
    response.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

async fn json_body(response: reqwest::Response) -> serde_json::Value {
    let bytes = response.bytes().await.expect("a body");
    serde_json::from_slice(&bytes).expect("a JSON body")
}

/// A response read off a raw socket.
struct RawResponse {
    status: u16,
    head: String,
    body: Vec<u8>,
}

/// Sends a request byte for byte: reqwest parses URLs with the `url` crate, which (per the URL
/// Standard) treats `%2E` and `%2E%2E` as dot segments, so it cannot send them.
async fn raw(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> RawResponse {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: application/cbor\r\n\
         Content-Type: application/cbor\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("write head");
    stream.write_all(body).await.expect("write body");
    let mut received = Vec::new();
    stream.read_to_end(&mut received).await.expect("read response");
    let split = received.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head");
    let head = String::from_utf8_lossy(&received[..split]).into_owned();
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status");
    RawResponse { status, head, body: received[split + 4..].to_vec() }
}

#[tokio::test]
async fn listing_and_record_in_cbor_and_json() {
    let server = start().await;
    let c = animals();
    let v1 = server.store().write(&c, vec![("a".into(), Some(cbor(text("one"))))]);
    let v2 = server.store().write(&c, vec![("b".into(), Some(cbor(Value::from(2))))]);
    assert_eq!((v1, v2), (1, 2));
    let client = reqwest::Client::new();
    let url = format!("{}/datasets/demo:animals/records/", server.url());

    let listing = client.get(&url).header("accept", "application/cbor").send().await.unwrap();
    assert_eq!(listing.status(), 200);
    assert_eq!(header(&listing, "x-version"), "2");
    assert_eq!(header(&listing, "etag"), "\"2\"");
    assert_eq!(header(&listing, "content-type"), "application/cbor");
    let body = decode_cbor(&listing.bytes().await.unwrap()).unwrap();
    let expected = Value::Map(vec![
        (text("a"), Value::Map(vec![(text("version"), 1.into())])),
        (text("b"), Value::Map(vec![(text("version"), 2.into())])),
    ]);
    assert_eq!(body, expected);

    let json = json_body(client.get(&url).send().await.unwrap()).await;
    assert_eq!(json, serde_json::json!({ "a": { "version": 1 }, "b": { "version": 2 } }));

    let record = client.get(format!("{url}a")).header("accept", "application/cbor").send().await.unwrap();
    assert_eq!(header(&record, "x-version"), "1");
    assert_eq!(record.bytes().await.unwrap(), cbor(text("one")));
    let record = client.get(format!("{url}b")).send().await.unwrap();
    assert_eq!(header(&record, "content-type"), "application/json");
    assert_eq!(json_body(record).await, serde_json::json!(2));

    let missing = client.get(format!("{url}zzz")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    let none = client.get(format!("{}/datasets/demo:nothing/records/", server.url())).send().await.unwrap();
    assert_eq!(none.status(), 404);
    assert_eq!(json_body(none).await["error"], "not_found");
    server.shutdown().await;
}

#[tokio::test]
async fn etag_gives_304() {
    let server = start().await;
    server.store().write(&animals(), vec![("a".into(), Some(cbor(text("one"))))]);
    let url = format!("{}/datasets/demo:animals/records/", server.url());
    let client = reqwest::Client::new();
    let same = client.get(&url).header("if-none-match", "\"1\"").send().await.unwrap();
    assert_eq!(same.status(), 304);
    assert_eq!(header(&same, "x-version"), "1");
    server.store().write(&animals(), vec![("a".into(), Some(cbor(text("two"))))]);
    let changed = client.get(&url).header("if-none-match", "\"1\"").send().await.unwrap();
    assert_eq!(changed.status(), 200);
    assert_eq!(header(&changed, "etag"), "\"2\"");
    server.shutdown().await;
}

#[tokio::test]
async fn http_writes_bump_versions() {
    let server = start().await;
    let client = reqwest::Client::new();
    let base = format!("{}/lenses/demo:words/records/", server.url());
    let post = |body: serde_json::Value| {
        client.post(&base).header("content-type", "application/json").body(body.to_string()).send()
    };
    let merged = post(serde_json::json!({ "x": 1, "y": [true, "z"] })).await.unwrap();
    assert_eq!(json_body(merged).await, serde_json::json!({ "version": 1 }));
    let merged = post(serde_json::json!({ "x": null, "w": { "k": 2.5 } })).await.unwrap();
    assert_eq!(json_body(merged).await["version"], 2);
    let c = CollectionId::new("lenses", "demo", "words");
    let ids: Vec<String> = server.store().records(&c).into_iter().map(|(id, ..)| id).collect();
    assert_eq!(ids, ["w", "y"]);

    let same = post(serde_json::json!({ "w": { "k": 2.5 } })).await.unwrap();
    assert_eq!(json_body(same).await["version"], 2, "a write that changes nothing keeps the version");

    let replacement = cbor(Value::Map(vec![(text("only"), text("me"))]));
    let replaced = client.put(&base).header("content-type", "application/cbor").body(replacement).send();
    assert_eq!(json_body(replaced.await.unwrap()).await["version"], 3);
    let records = server.store().records(&c);
    assert_eq!(records, vec![("only".to_owned(), 3, cbor(text("me")))]);

    let single = client.put(format!("{base}one")).body(cbor(Value::Float(1.5))).send().await.unwrap();
    assert_eq!(json_body(single).await["version"], 4);
    let deleted = client.delete(format!("{base}one")).send().await.unwrap();
    assert_eq!(json_body(deleted).await["version"], 5);
    let again = client.delete(format!("{base}one")).send().await.unwrap();
    assert_eq!(again.status(), 404);
    let nulled = client.put(format!("{base}only")).body(vec![0xf7]).send().await.unwrap();
    assert_eq!(json_body(nulled).await["version"], 6, "undefined deletes");

    let collection = format!("{}/lenses/demo:words/", server.url());
    assert_eq!(client.delete(&collection).send().await.unwrap().status(), 204);
    assert_eq!(server.store().version(&c), None);
    assert_eq!(client.get(&base).send().await.unwrap().status(), 404);
    let recreated = post(serde_json::json!({ "x": 1 })).await.unwrap();
    assert_eq!(json_body(recreated).await["version"], 7, "versions are never reused");
    server.shutdown().await;
}

#[tokio::test]
async fn bad_writes_and_paths_are_refused() {
    let server = start().await;
    let client = reqwest::Client::new();
    let base = format!("{}/datasets/demo:animals/records/", server.url());
    let empty_id = client.post(&base).header("content-type", "application/json").body(r#"{"":1}"#);
    assert_eq!(empty_id.send().await.unwrap().status(), 400);
    let trailing = client.put(format!("{base}a")).body(vec![0x01, 0x02]).send().await.unwrap();
    assert_eq!(trailing.status(), 400);
    let not_a_map = client.post(&base).body(cbor(Value::from(1))).send().await.unwrap();
    assert_eq!(not_a_map.status(), 400);
    assert_eq!(server.store().version(&animals()), None);

    for path in ["/elsewhere/demo:animals/records/", "/datasets/nocolon/records/", "/nothing"] {
        let response = client.get(format!("{}{path}", server.url())).send().await.unwrap();
        assert_eq!(response.status(), 404, "{path}");
        assert_eq!(json_body(response).await["error"], "not_found");
    }
    let patch = client.patch(format!("{base}a")).send().await.unwrap();
    assert_eq!(patch.status(), 405);
    server.shutdown().await;
}

#[tokio::test]
async fn percent_encoded_ids_round_trip() {
    let server = start().await;
    let c = animals();
    let awkward = [
        ("a/b", "a%2Fb"),
        ("100%", "100%25"),
        ("with space", "with%20space"),
        ("é", "%C3%A9"),
        (".", "%2E"),
        ("..", "%2E%2E"),
        ("user:name?#", "user%3Aname%3F%23"),
    ];
    for (n, (id, _)) in awkward.iter().enumerate() {
        server.store().write(&c, vec![(id.to_string(), Some(cbor(Value::from(n as u64))))]);
    }
    for (n, (id, encoded)) in awkward.iter().enumerate() {
        let path = format!("/datasets/demo:animals/records/{encoded}");
        let response = raw(server.addr(), "GET", &path, b"").await;
        assert_eq!(response.status, 200, "{id:?}: {}", response.head);
        assert_eq!(response.body, cbor(Value::from(n as u64)).to_vec(), "{id:?}");
        let logged = server.store().request_log().pop().expect("a logged request");
        assert_eq!(logged.path, path, "the log keeps the raw path");
    }
    let written =
        raw(server.addr(), "PUT", "/datasets/demo:animals/records/%2E%2E", &[0x63, b'n', b'e', b'w']).await;
    assert_eq!(written.status, 200);
    assert_eq!(
        server.store().records(&c).iter().find(|r| r.0 == "..").map(|r| r.2.clone()),
        Some(cbor(text("new")))
    );
    server.shutdown().await;
}

#[tokio::test]
async fn protected_collections_need_the_token() {
    let server = start().await;
    let c = CollectionId::new("datasets", "private", "diary");
    server.store().protect(&c, Some("s3cret".into()));
    server.store().write(&c, vec![("day".into(), Some(cbor(text("hidden"))))]);
    let client = reqwest::Client::new();
    let url = format!("{}/datasets/private:diary/records/", server.url());

    let anonymous = client.get(&url).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    assert_eq!(header(&anonymous, "www-authenticate"), "Bearer");
    let wrong = client.get(&url).header("authorization", "Bearer nope").send().await.unwrap();
    assert_eq!(wrong.status(), 403);
    let bearer = client.get(&url).header("authorization", "Bearer s3cret").send().await.unwrap();
    assert_eq!(bearer.status(), 200);
    let cookie = client.get(format!("{url}day")).header("cookie", "theme=dark; session=s3cret");
    assert_eq!(cookie.send().await.unwrap().status(), 200);
    let write = client.put(format!("{url}day")).body(cbor(text("overwritten"))).send().await.unwrap();
    assert_eq!(write.status(), 401);
    assert_eq!(server.store().version(&c), Some(1));
    server.shutdown().await;
}

#[tokio::test]
async fn attachments_are_content_addressed() {
    let server = start().await;
    let client = reqwest::Client::new();
    let posted = client
        .post(format!("{}/attachments", server.url()))
        .header("content-type", "image/png")
        .body(&b"not really a png"[..])
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), 201);
    let answer = json_body(posted).await;
    let hash = answer["hash"].as_str().expect("a hash").to_owned();
    assert_eq!(hash, format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(b"not really a png")));
    assert_eq!(answer["link"], format!("hash://sha256/{hash}?type=image%2Fpng"));
    for hex in [hash.clone(), hash.to_ascii_uppercase()] {
        let fetched = client.get(format!("{}/attachments/{hex}", server.url())).send().await.unwrap();
        assert_eq!(fetched.status(), 200);
        assert_eq!(header(&fetched, "content-type"), "image/png");
        assert_eq!(fetched.bytes().await.unwrap(), &b"not really a png"[..]);
    }
    let unknown =
        client.get(format!("{}/attachments/{}", server.url(), "0".repeat(64))).send().await.unwrap();
    assert_eq!(unknown.status(), 404);
    server.shutdown().await;
}

/// Collects what a webhook receiver got: headers and body.
async fn receive_webhook(
    State(sink): State<mpsc::UnboundedSender<(HeaderMap, Bytes)>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let _ = sink.send((headers, body));
    StatusCode::ACCEPTED
}

#[tokio::test]
async fn webhooks_are_signed_and_sent_after_writes() {
    let (sink, mut received) = mpsc::unbounded_channel();
    let receiver =
        axum::Router::new().route("/hooks/changes", axum::routing::post(receive_webhook)).with_state(sink);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/hooks/changes", listener.local_addr().unwrap());
    let receiver_task = tokio::spawn(async move { axum::serve(listener, receiver).await });

    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let config = ReferenceConfig { webhook_url: Some(hook_url), webhook_secret: Some(secret.into()) };
    let server = start_with(config).await;
    server.store().write(&animals(), vec![("a".into(), Some(cbor(text("one"))))]);
    let client = reqwest::Client::new();
    let url = format!("{}/datasets/demo:animals/records/b", server.url());
    client.put(url).body(cbor(text("two"))).send().await.unwrap();

    let mut versions = Vec::new();
    for _ in 0..2 {
        let (headers, body) =
            tokio::time::timeout(Duration::from_secs(5), received.recv()).await.unwrap().unwrap();
        let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let timestamp: i64 = get("webhook-timestamp").parse().expect("a unix timestamp");
        let expected = sign(secret, &get("webhook-id"), timestamp, &body).unwrap();
        assert_eq!(get("webhook-signature"), expected);
        assert!(get("webhook-id").starts_with("msg_"));
        let notice: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            (notice["realm"].as_str(), notice["user"].as_str(), notice["name"].as_str()),
            (Some("datasets"), Some("demo"), Some("animals"))
        );
        versions.push(notice["version"].as_str().expect("version as a string").to_owned());
    }
    versions.sort();
    assert_eq!(versions, ["1", "2"]);
    server.shutdown().await;
    receiver_task.abort();
}

#[test]
fn signature_matches_the_standard_webhooks_example() {
    let body = br#"{"test": 2432232314}"#;
    let signature =
        sign("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
    assert_eq!(signature.unwrap(), "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    assert!(sign("whsec_not base64!", "id", 0, b"").is_err());
}

#[tokio::test]
async fn bad_webhook_secret_stops_start() {
    let config = ReferenceConfig {
        webhook_url: Some("http://127.0.0.1:9/".into()),
        webhook_secret: Some("%%%".into()),
    };
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    assert!(ReferenceServer::start(listen, config).await.is_err());
}

#[tokio::test]
async fn faults_break_u2_on_purpose() {
    let server = start().await;
    let c = animals();
    let value = cbor(text("a value long enough to be cut in half"));
    for id in ["status", "slow", "hang", "reset"] {
        server.store().write(&c, vec![(id.into(), Some(value.clone()))]);
    }
    server.store().set_fault(&c, "status", Some(RecordFault::Status(503)));
    server.store().set_fault(&c, "slow", Some(RecordFault::Delay(Duration::from_millis(300))));
    server.store().set_fault(&c, "hang", Some(RecordFault::HangAfterHead));
    server.store().set_fault(&c, "reset", Some(RecordFault::ResetMidBody));
    let client = reqwest::Client::new();
    let url = |id: &str| format!("{}/datasets/demo:animals/records/{id}", server.url());
    let get = |id: &str| client.get(url(id)).header("accept", "application/cbor").send();

    assert_eq!(get("status").await.unwrap().status(), 503);
    let started = Instant::now();
    let slow = get("slow").await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(slow.bytes().await.unwrap(), value);

    let hang = get("hang").await.unwrap();
    assert_eq!(hang.status(), 200, "the head arrives");
    let body = tokio::time::timeout(Duration::from_millis(500), hang.bytes()).await;
    assert!(body.is_err(), "the body never ends");

    let reset = get("reset").await.unwrap();
    assert_eq!(reset.status(), 200);
    assert!(reset.bytes().await.is_err(), "the body breaks");

    server.store().set_fault(&c, "status", None);
    assert_eq!(get("status").await.unwrap().status(), 200);
    let stopping = Instant::now();
    server.shutdown().await;
    assert!(stopping.elapsed() < Duration::from_secs(2), "a hanging body does not hold up shutdown");
}

#[tokio::test]
async fn put_raw_serves_malformed_bytes() {
    let server = start().await;
    let version = server.store().put_raw(&animals(), "broken", Bytes::from_static(&[0x82, 0x01]));
    assert_eq!(version, 1);
    let url = format!("{}/datasets/demo:animals/records/broken", server.url());
    let client = reqwest::Client::new();
    let response = client.get(&url).header("accept", "application/cbor").send().await.unwrap();
    assert_eq!(response.bytes().await.unwrap(), &[0x82, 0x01][..]);
    let as_json = client.get(&url).send().await.unwrap();
    assert_eq!(as_json.status(), 500);
    server.shutdown().await;
}

#[tokio::test]
async fn debug_endpoints_describe_and_stream() {
    let server = start().await;
    let client = reqwest::Client::new();
    let echo = client
        .post(format!("{}/debug/echo/some/where?x=1&y=%2F", server.url()))
        .header("x-custom", "a")
        .body(&b"hello"[..])
        .send()
        .await
        .unwrap();
    let echo = json_body(echo).await;
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/debug/echo/some/where");
    assert_eq!(echo["query"], "x=1&y=%2F");
    assert_eq!(echo["headers"]["x-custom"], serde_json::json!(["a"]));
    assert_eq!(echo["body_len"], 5);
    assert_eq!(echo["body_sha256"], "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824");

    let teapot = client.get(format!("{}/debug/status/418", server.url())).send().await.unwrap();
    assert_eq!(teapot.status(), 418);
    let informational = client.get(format!("{}/debug/status/101", server.url())).send().await.unwrap();
    assert_eq!(informational.status(), 400);

    let n = 1_000_003u64;
    let bytes = client.get(format!("{}/debug/bytes/{n}", server.url())).send().await.unwrap();
    assert_eq!(header(&bytes, "content-length"), n.to_string());
    let body = bytes.bytes().await.unwrap();
    assert_eq!(body.len() as u64, n);
    assert!(body.iter().enumerate().all(|(i, &b)| b == pattern_byte(i as u64)));
    server.shutdown().await;
}

#[tokio::test]
async fn demo_seed_is_varied_and_deterministic() {
    let server = start().await;
    let store = server.store();
    seed_demo(store);
    let count =
        |realm: &str, user: &str, name: &str| store.records(&CollectionId::new(realm, user, name)).len();
    assert!((450..=550).contains(&count("datasets", "demo", "animals")));
    assert_eq!(count("datasets", "demo", "signs"), 200);
    assert_eq!(count("lenses", "demo", "word-index"), 300);
    assert_eq!(count("datasets", "private", "diary"), 20);
    let empty = CollectionId::new("datasets", "demo", "empty");
    assert_eq!((store.version(&empty), count("datasets", "demo", "empty")), (Some(2), 0));

    let versions = store.version(&animals());
    seed_demo(store);
    assert_eq!(store.version(&animals()), versions, "seeding again changes nothing");

    let ids: Vec<String> = store.records(&animals()).into_iter().map(|(id, ..)| id).collect();
    for awkward in ["a/b", "100%", "with space", "北极狐"] {
        assert!(ids.iter().any(|id| id == awkward), "{awkward}");
    }
    let client = reqwest::Client::new();
    let signs = store.records(&CollectionId::new("datasets", "demo", "signs"));
    let link = signs
        .iter()
        .find_map(|(_, _, value)| find_link(&decode_cbor(value).ok()?))
        .expect("signs link attachments");
    let hex = &link["hash://sha256/".len()..][..64];
    let attachment = client.get(format!("{}/attachments/{hex}", server.url())).send().await.unwrap();
    assert_eq!(attachment.status(), 200);
    assert_eq!(header(&attachment, "content-type"), "image/png");

    let diary = format!("{}/datasets/private:diary/records/", server.url());
    assert_eq!(client.get(&diary).send().await.unwrap().status(), 401);
    let opened =
        client.get(&diary).header("authorization", format!("Bearer {DEMO_TOKEN}")).send().await.unwrap();
    assert_eq!(opened.status(), 200);
    server.shutdown().await;
}

fn find_link(value: &Value) -> Option<String> {
    match value {
        Value::Text(s) if s.starts_with("hash://sha256/") => Some(s.clone()),
        Value::Array(items) => items.iter().find_map(find_link),
        Value::Map(entries) => entries.iter().find_map(|(k, v)| find_link(k).or_else(|| find_link(v))),
        _ => None,
    }
}

#[test]
fn two_seeded_stores_are_identical() {
    let (first, second) = (Store::new(None), Store::new(None));
    seed_demo(&first);
    seed_demo(&second);
    for c in [
        animals(),
        CollectionId::new("datasets", "demo", "signs"),
        CollectionId::new("lenses", "demo", "word-index"),
    ] {
        assert_eq!(first.records(&c), second.records(&c));
    }
}
