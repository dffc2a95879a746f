//! End-to-end exports: the sidecar binary in front of the reference server, decoded by real
//! parsers and compared with what was written upstream.

mod common;

use ciborium::Value;
use common::{cbor, collection, error_body, expected_json, object_entries, Stack};
use std::io::Read;

/// Record IDs that break naive URL or file handling, with values of every kind tests write.
fn tricky_records() -> Vec<(String, Value)> {
    let ids = [
        "plain",
        "a/b",
        "100%",
        "with space",
        "é-accent",
        "日本語",
        ".",
        "..",
        "?q=1#frag",
        "%2F",
        "+plus",
        "line\u{2028}sep",
        "Zebra",
        "zebra",
        "~tilde",
    ];
    ids.iter()
        .enumerate()
        .map(|(i, id)| {
            let value = Value::Map(vec![
                ("id".into(), Value::Text(id.to_string())),
                ("n".into(), Value::Integer((i as i64 * 1_000_003).into())),
                ("big".into(), Value::Integer(u64::MAX.into())),
                ("f".into(), Value::Float(i as f64 + 0.25)),
                ("bytes".into(), Value::Bytes(vec![0, 255, i as u8])),
                ("when".into(), Value::Tag(1, Box::new(Value::Integer(1_700_000_000.into())))),
                (
                    "nested".into(),
                    Value::Map(vec![
                        ("list".into(), Value::Array(vec![Value::Bool(true), Value::Null, "x".into()])),
                        ("numbers".into(), Value::Map(vec![(1.into(), "one".into())])),
                    ]),
                ),
            ]);
            (id.to_string(), value)
        })
        .collect()
}

async fn stack_with_tricky_records() -> (Stack, Vec<(String, Value)>) {
    let stack = Stack::start().await;
    let records = tricky_records();
    let changes = records.iter().map(|(id, v)| (id.clone(), Some(cbor(v)))).collect();
    stack.store().write(&collection("datasets", "alice", "tricky"), changes);
    let mut sorted = records;
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    (stack, sorted)
}

#[tokio::test]
async fn cbor_export_is_the_upstream_bytes_in_id_order() {
    let (stack, records) = stack_with_tricky_records().await;
    let response = stack.get("/export/datasets/alice:tricky?encoding=cbor").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/cbor-seq");
    let version = stack.store().version(&collection("datasets", "alice", "tricky")).expect("exists");
    assert_eq!(response.headers()["x-version"], version.to_string().as_str());
    let body = response.bytes().await.expect("complete body");

    let mut expected = Vec::new();
    for (id, _, value) in stack.store().records(&collection("datasets", "alice", "tricky")) {
        expected.push(0x82);
        ciborium::into_writer(&id, &mut expected).expect("encode id");
        expected.extend_from_slice(&value);
    }
    assert_eq!(body.as_ref(), expected.as_slice(), "byte-for-byte CBOR sequence");

    // And a real CBOR decoder reads it as [id, value] pairs in byte order.
    let mut reader = body.as_ref();
    let mut decoded = Vec::new();
    while !reader.is_empty() {
        let item: Value = ciborium::from_reader(&mut reader).expect("one sequence item");
        let pair = item.into_array().expect("2-element array");
        decoded.push((pair[0].as_text().expect("text id").to_owned(), pair[1].clone()));
    }
    assert_eq!(decoded, records);
}

#[tokio::test]
async fn json_export_maps_every_value() {
    let (stack, records) = stack_with_tricky_records().await;
    let response = stack.get("/export/datasets/alice:tricky?encoding=json").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let text = response.text().await.expect("complete body");
    let entries = object_entries(&text);
    let expected: Vec<_> = records.iter().map(|(id, v)| (id.clone(), expected_json(v))).collect();
    assert_eq!(entries, expected);
    assert!(!text.contains('\u{2028}'), "U+2028 is escaped");
}

#[tokio::test]
async fn json_lines_export_is_one_record_per_line() {
    let (stack, records) = stack_with_tricky_records().await;
    let response = stack.get("/export/datasets/alice:tricky?encoding=json-lines").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/x-ndjson");
    let text = response.text().await.expect("complete body");
    assert!(text.ends_with('\n'));
    // Split the way a naive client would: on every line terminator Unicode knows.
    let lines: Vec<&str> =
        text.split(['\n', '\r', '\u{85}', '\u{2028}', '\u{2029}']).filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), records.len());
    for (line, (id, value)) in lines.iter().zip(&records) {
        let parsed: serde_json::Value = serde_json::from_str(line).expect("each line is JSON");
        assert_eq!(parsed, serde_json::json!([id, expected_json(value)]));
    }
}

#[tokio::test]
async fn empty_collection_in_every_encoding() {
    let stack = Stack::start().await;
    let empty = collection("lenses", "bob", "empty");
    stack.store().write(&empty, vec![("x".into(), Some(cbor(&Value::Integer(1.into()))))]);
    stack.store().write(&empty, vec![("x".into(), None)]);
    for (encoding, body) in [("cbor", ""), ("json", "{}\n"), ("json-lines", "")] {
        let response = stack.get(&format!("/export/lenses/bob:empty?encoding={encoding}")).await;
        assert_eq!(response.status(), 200, "{encoding}");
        assert_eq!(response.headers()["x-version"], "2");
        assert_eq!(response.text().await.expect("body"), body, "{encoding}");
    }
}

#[tokio::test]
async fn client_errors_are_json_with_advice() {
    let stack = Stack::start().await;
    stack.store().write(&collection("datasets", "a", "b"), vec![("x".into(), Some(cbor(&Value::Null)))]);
    let cases = [
        ("/export/things/a:b?encoding=json", 404, "not_found"),
        ("/export/datasets/a:b", 400, "bad_request"),
        ("/export/datasets/a:b?encoding=xml", 400, "bad_request"),
        ("/export/datasets/ab?encoding=json", 400, "bad_request"),
        ("/export/datasets/a:b?encoding=json&after=1&at=1", 400, "bad_request"),
        ("/export/datasets/a:b?encoding=json&after=999", 410, "version_unknown"),
        ("/export/datasets/a:b%ZZ?encoding=json", 400, "bad_request"),
        ("/export/datasets/nobody:nothing?encoding=json", 404, "not_found"),
        ("/export/datasets/a:b/unknown", 404, "not_found"),
    ];
    for (path, status, code) in cases {
        let (got_status, got_code, _) = error_body(stack.get(path).await).await;
        assert_eq!((got_status, got_code.as_str()), (status, code), "{path}");
    }
    let post = stack.client.post(stack.url("/export/datasets/a:b?encoding=json")).send().await.expect("sent");
    assert_eq!(post.headers()["allow"], "GET, HEAD");
    assert_eq!(error_body(post).await.0, 405);
}

#[tokio::test]
async fn head_answers_headers_only() {
    let (stack, _) = stack_with_tricky_records().await;
    let response = stack
        .client
        .head(stack.url("/export/datasets/alice:tricky?encoding=json"))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    assert!(response.headers().contains_key("x-version"));
    assert!(response.bytes().await.expect("no body").is_empty());
}

#[tokio::test]
async fn compressed_exports_decode_to_the_plain_one() {
    let (stack, _) = stack_with_tricky_records().await;
    let path = "/export/datasets/alice:tricky?encoding=json-lines";
    let plain = stack.get(path).await.bytes().await.expect("plain");
    for coding in ["gzip", "zstd"] {
        let response =
            stack.client.get(stack.url(path)).header("accept-encoding", coding).send().await.expect("sent");
        assert_eq!(response.headers()["content-encoding"], coding);
        assert_eq!(response.headers()["vary"], "accept-encoding");
        let body = response.bytes().await.expect("body");
        let mut decoded = Vec::new();
        match coding {
            "gzip" => flate2::read::GzDecoder::new(&body[..]).read_to_end(&mut decoded).map(|_| ()),
            _ => zstd::stream::copy_decode(&body[..], &mut decoded),
        }
        .expect("decodes");
        assert_eq!(decoded, plain.as_ref(), "{coding}");
    }
}

#[tokio::test]
async fn empty_record_id_cannot_be_written_or_exported() {
    let stack = Stack::start().await;
    let c = collection("datasets", "a", "empty-id");
    let refused = stack
        .client
        .put(format!("{}/datasets/a:empty-id/records/", stack.reference.url()))
        .header("content-type", "application/json")
        .body(r#"{"": 1}"#)
        .send()
        .await
        .expect("sent");
    assert_eq!(refused.status(), 400, "the reference server refuses an empty recordID");
    // A server that holds one anyway gets a clear 502: its U2 URL would be the listing's.
    stack.store().put_raw(&c, "", cbor(&Value::Integer(1.into())));
    let (status, code, message) =
        error_body(stack.get("/export/datasets/a:empty-id?encoding=json").await).await;
    assert_eq!((status, code.as_str()), (502, "upstream_invalid"));
    assert!(message.contains("empty ID"), "{message}");
}
