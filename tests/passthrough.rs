//! End-to-end pass-through: everything outside `/export/` reaches the dataset server
//! unchanged and its answers come back unchanged.

mod common;

use common::Stack;
use futures::StreamExt;
use serde_json::Value;

async fn echo(stack: &Stack, method: reqwest::Method, path: &str, body: Option<&'static [u8]>) -> Value {
    let mut request = stack.client.request(method, stack.url(path)).header("x-custom", "kept");
    if let Some(body) = body {
        request = request.body(body);
    }
    let response = request.send().await.expect("sent");
    assert_eq!(response.status(), 200);
    serde_json::from_slice(&response.bytes().await.expect("body")).expect("echo is JSON")
}

#[tokio::test]
async fn methods_paths_queries_headers_and_bodies_pass_unchanged() {
    let stack = Stack::start().await;
    for method in [reqwest::Method::GET, reqwest::Method::POST, reqwest::Method::PUT, reqwest::Method::DELETE]
    {
        let body: Option<&'static [u8]> =
            if method == reqwest::Method::GET { None } else { Some(b"payload \x00\xff bytes") };
        let seen = echo(&stack, method.clone(), "/debug/echo/a%2Fb/c?x=1&y=%20z&x=2", body).await;
        assert_eq!(seen["method"], method.as_str());
        assert_eq!(seen["path"], "/debug/echo/a%2Fb/c", "{method}");
        assert_eq!(seen["query"], "x=1&y=%20z&x=2");
        assert_eq!(seen["headers"]["x-custom"][0], "kept");
        assert_eq!(seen["body_len"], body.map_or(0, |b| b.len()));
    }
}

#[tokio::test]
async fn status_codes_pass_unchanged() {
    let stack = Stack::start().await;
    for code in [200u16, 201, 204, 301, 400, 404, 418, 500, 503] {
        let response =
            stack.client.get(stack.url(&format!("/debug/status/{code}"))).send().await.expect("sent");
        assert_eq!(response.status().as_u16(), code);
    }
}

#[tokio::test]
async fn head_and_large_streamed_bodies() {
    let stack = Stack::start().await;
    let size = 8 * 1024 * 1024;
    let head = stack.client.head(stack.url(&format!("/debug/bytes/{size}"))).send().await.expect("sent");
    assert_eq!(head.status(), 200);
    assert!(head.bytes().await.expect("empty").is_empty());

    let response = stack.get(&format!("/debug/bytes/{size}")).await;
    let mut stream = response.bytes_stream();
    let direct = stack
        .client
        .get(format!("{}/debug/bytes/{size}", stack.reference.url()))
        .send()
        .await
        .expect("sent")
        .bytes()
        .await
        .expect("body");
    let mut received = Vec::with_capacity(size);
    while let Some(chunk) = stream.next().await {
        received.extend_from_slice(&chunk.expect("chunk"));
    }
    assert_eq!(received.len(), size);
    assert!(received == direct.as_ref(), "bytes differ from the upstream's");
}

#[tokio::test]
async fn records_can_be_written_and_read_through_the_sidecar() {
    let stack = Stack::start().await;
    let base = "/datasets/dave:notes/records/";
    let write = stack
        .client
        .post(stack.url(base))
        .header("content-type", "application/json")
        .body(r#"{"one": {"text": "hello"}, "two": [1, 2]}"#)
        .send()
        .await
        .expect("sent");
    assert_eq!(write.status(), 200);
    let put = stack
        .client
        .put(stack.url(&format!("{base}three")))
        .header("content-type", "application/json")
        .body("3")
        .send()
        .await
        .expect("sent");
    assert!(put.status().is_success());
    let delete = stack.client.delete(stack.url(&format!("{base}two"))).send().await.expect("sent");
    assert!(delete.status().is_success());
    let listing =
        stack.client.get(stack.url(base)).header("accept", "application/json").send().await.expect("sent");
    assert_eq!(listing.headers()["x-version"], "3");
    let listing: Value = serde_json::from_slice(&listing.bytes().await.expect("body")).expect("json");
    let mut ids: Vec<_> = listing.as_object().expect("map").keys().cloned().collect();
    ids.sort();
    assert_eq!(ids, ["one", "three"]);
    let export = stack.get("/export/datasets/dave:notes?encoding=json").await;
    assert_eq!(export.headers()["x-version"], "3");
    assert_eq!(export.text().await.expect("body"), "{\"one\":{\"text\":\"hello\"},\"three\":3}\n");
}
