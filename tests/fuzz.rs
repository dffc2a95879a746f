//! Property tests at fuzzing scale for the two parsers that read untrusted bytes: the CBOR
//! validator and JSON converter (record values) and the webhook verifier (notice bodies).

use base64::Engine;
use export_sidecar::changes::webhook::{Accepted, WebhookVerifier};
use export_sidecar::codec::{validate, CborError, JsonConverter, JsonStyle};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A whole property run must end within this; a parser that loops fails the test instead of
/// hanging it.
const WATCHDOG: Duration = Duration::from_secs(240);

/// One input may take this long at most (debug build, inputs of a few KiB).
const PER_CASE: Duration = Duration::from_secs(5);

/// Runs `cases` cases of the strategy `make` builds, on a thread of its own, failing if the run
/// outlives the watchdog (a loop) or any case fails.
fn run_bounded<S>(cases: u32, make: fn() -> S, test: fn(S::Value) -> Result<(), TestCaseError>)
where
    S: Strategy + 'static,
    S::Value: std::fmt::Debug,
{
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        let strategy = make();
        let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
        let result = runner.run(&strategy, test).map_err(|e| e.to_string());
        let _ = done.send(result);
    });
    match finished.recv_timeout(WATCHDOG) {
        Ok(result) => result.unwrap_or_else(|e| panic!("{e}")),
        Err(_) => panic!("the property run did not end within {WATCHDOG:?}: a parser loops"),
    }
}

// ---- CBOR → JSON -------------------------------------------------------------------------

/// A CBOR item as a generator builds it, with the encoding choices RFC 8949 leaves open
/// (head widths, indefinite lengths), so the encoder below can write any well-formed form.
#[derive(Clone, Debug)]
enum Cbor {
    Unsigned(u64, u8),
    Negative(u64, u8),
    Bytes(Vec<u8>, Option<usize>),
    Text(String, Option<usize>),
    Array(Vec<Cbor>, bool),
    Map(Vec<(Cbor, Cbor)>, bool),
    Tag(u64, Box<Cbor>),
    Simple(u8),
    Half(u16),
    Single(f32),
    Double(f64),
}

/// Writes a head: major type, argument, and a width (0: shortest, else 1/2/4/8 bytes if it fits).
fn head(major: u8, value: u64, width: u8, out: &mut Vec<u8>) {
    let major = major << 5;
    let width = match width % 5 {
        0 => 0,
        w => 1 << (w - 1),
    };
    let fits = |bytes: u32| bytes == 8 || value < 1u64 << (8 * bytes);
    match width {
        1 if fits(1) => out.extend([major | 24, value as u8]),
        2 if fits(2) => out.extend([[major | 25].as_slice(), &(value as u16).to_be_bytes()].concat()),
        4 if fits(4) => out.extend([[major | 26].as_slice(), &(value as u32).to_be_bytes()].concat()),
        8 => out.extend([[major | 27].as_slice(), &value.to_be_bytes()].concat()),
        _ if value < 24 => out.push(major | value as u8),
        _ if value <= 0xff => out.extend([major | 24, value as u8]),
        _ if value <= 0xffff => out.extend([[major | 25].as_slice(), &(value as u16).to_be_bytes()].concat()),
        _ if value <= 0xffff_ffff => {
            out.extend([[major | 26].as_slice(), &(value as u32).to_be_bytes()].concat())
        }
        _ => out.extend([[major | 27].as_slice(), &value.to_be_bytes()].concat()),
    }
}

/// A byte or text string, whole or as an indefinite string of chunks cut every `chunk` bytes
/// (text is cut at character boundaries, as chunks must each be UTF-8).
fn string(major: u8, bytes: &[u8], chunk: Option<usize>, is_text: bool, out: &mut Vec<u8>) {
    let Some(size) = chunk.map(|c| c.max(1)) else {
        head(major, bytes.len() as u64, 0, out);
        out.extend_from_slice(bytes);
        return;
    };
    out.push(major << 5 | 31);
    let mut start = 0;
    while start < bytes.len() {
        let mut end = (start + size).min(bytes.len());
        while is_text && std::str::from_utf8(&bytes[start..end]).is_err() {
            end += 1;
        }
        head(major, (end - start) as u64, 0, out);
        out.extend_from_slice(&bytes[start..end]);
        start = end;
    }
    out.push(0xff);
}

fn encode(item: &Cbor, out: &mut Vec<u8>) {
    match item {
        Cbor::Unsigned(n, w) => head(0, *n, *w, out),
        Cbor::Negative(n, w) => head(1, *n, *w, out),
        Cbor::Bytes(b, chunk) => string(2, b, *chunk, false, out),
        Cbor::Text(t, chunk) => string(3, t.as_bytes(), *chunk, true, out),
        Cbor::Array(items, indefinite) => {
            match indefinite {
                true => out.push(0x9f),
                false => head(4, items.len() as u64, 0, out),
            }
            items.iter().for_each(|i| encode(i, out));
            if *indefinite {
                out.push(0xff);
            }
        }
        Cbor::Map(entries, indefinite) => {
            match indefinite {
                true => out.push(0xbf),
                false => head(5, entries.len() as u64, 0, out),
            }
            for (k, v) in entries {
                encode(k, out);
                encode(v, out);
            }
            if *indefinite {
                out.push(0xff);
            }
        }
        Cbor::Tag(tag, inner) => {
            head(6, *tag, 0, out);
            encode(inner, out);
        }
        Cbor::Simple(n) if *n < 24 => out.push(0xe0 | n),
        Cbor::Simple(n) => out.extend([0xf8, (*n).max(32)]),
        Cbor::Half(bits) => out.extend([[0xf9].as_slice(), &bits.to_be_bytes()].concat()),
        Cbor::Single(f) => out.extend([[0xfa].as_slice(), &f.to_be_bytes()].concat()),
        Cbor::Double(f) => out.extend([[0xfb].as_slice(), &f.to_be_bytes()].concat()),
    }
}

fn leaf() -> impl Strategy<Value = Cbor> {
    let chunk = proptest::option::weighted(0.2, 1usize..8);
    let date_text = prop_oneof![
        Just("2024-02-29T12:34:56.789Z".to_owned()),
        Just("1970-01-01T00:00:00+01:00".to_owned()),
        "[0-9T:.Z+-]{0,30}",
    ];
    prop_oneof![
        (any::<u64>(), any::<u8>()).prop_map(|(n, w)| Cbor::Unsigned(n, w)),
        (any::<u64>(), any::<u8>()).prop_map(|(n, w)| Cbor::Negative(n, w)),
        (proptest::collection::vec(any::<u8>(), 0..40), chunk.clone()).prop_map(|(b, c)| Cbor::Bytes(b, c)),
        (any::<String>(), chunk.clone()).prop_map(|(t, c)| Cbor::Text(t, c)),
        "[a-c\u{85}\u{2028}\u{2029}\"\\\\\n\u{0}]{0,6}".prop_map(|t| Cbor::Text(t, None)),
        any::<u8>().prop_map(Cbor::Simple),
        any::<u16>().prop_map(Cbor::Half),
        any::<f32>().prop_map(Cbor::Single),
        any::<f64>().prop_map(Cbor::Double),
        date_text.prop_map(|t| Cbor::Tag(0, Box::new(Cbor::Text(t, None)))),
        any::<f64>().prop_map(|f| Cbor::Tag(1, Box::new(Cbor::Double(f)))),
        any::<i64>().prop_map(|n| Cbor::Tag(1, Box::new(Cbor::Unsigned(n.unsigned_abs(), 0)))),
        (2u64..4, proptest::collection::vec(any::<u8>(), 0..48), chunk)
            .prop_map(|(tag, b, c)| Cbor::Tag(tag, Box::new(Cbor::Bytes(b, c)))),
    ]
}

/// Well-formed CBOR items of every major type, nested a few levels.
fn item() -> impl Strategy<Value = Cbor> {
    leaf().prop_recursive(5, 64, 6, |inner| {
        let tags = prop_oneof![
            Just(0u64),
            Just(1),
            Just(2),
            Just(3),
            Just(258),
            Just(259),
            Just(55799),
            any::<u64>()
        ];
        prop_oneof![
            (proptest::collection::vec(inner.clone(), 0..6), any::<bool>())
                .prop_map(|(v, i)| Cbor::Array(v, i)),
            (proptest::collection::vec((inner.clone(), inner.clone()), 0..6), any::<bool>())
                .prop_map(|(v, i)| Cbor::Map(v, i)),
            (proptest::collection::vec(("[ab]{0,2}", inner.clone()), 0..6), any::<bool>()).prop_map(
                |(v, i)| { Cbor::Map(v.into_iter().map(|(k, v)| (Cbor::Text(k, None), v)).collect(), i) }
            ),
            (tags, inner).prop_map(|(t, i)| Cbor::Tag(t, Box::new(i))),
        ]
    })
}

/// Between `count` byte-level edits (kind, position, byte) for `mutate`.
fn edits(count: std::ops::Range<usize>) -> impl Strategy<Value = Vec<(u8, usize, u8)>> {
    proptest::collection::vec((any::<u8>(), any::<usize>(), any::<u8>()), count)
}

/// Byte-level damage: flip, overwrite, insert, delete, truncate.
fn mutate(mut bytes: Vec<u8>, edits: &[(u8, usize, u8)]) -> Vec<u8> {
    for &(kind, at, byte) in edits {
        let at = if bytes.is_empty() { 0 } else { at % (bytes.len() + 1) };
        match kind % 5 {
            0 if at < bytes.len() => bytes[at] ^= 1 << (byte % 8),
            1 if at < bytes.len() => bytes[at] = byte,
            2 => bytes.insert(at, byte),
            3 if at < bytes.len() => {
                bytes.remove(at);
            }
            _ => bytes.truncate(at),
        }
    }
    bytes
}

/// True when every JSON object in `text` has distinct keys (serde_json would silently keep
/// the last of a repeated key, hiding a lost entry).
fn keys_distinct(text: &str) -> bool {
    use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};
    struct Distinct;
    impl<'de> serde::de::DeserializeSeed<'de> for Distinct {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }
    impl<'de> Visitor<'de> for Distinct {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("JSON")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let mut seen = std::collections::HashSet::new();
            while let Some(key) = map.next_key::<String>()? {
                if !seen.insert(key.clone()) {
                    return Err(serde::de::Error::custom(format!("key {key:?} twice")));
                }
                map.next_value_seed(Distinct)?;
            }
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            while seq.next_element_seed(Distinct)?.is_some() {}
            Ok(())
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
    }
    let mut de = deep_json(text);
    serde::de::DeserializeSeed::deserialize(Distinct, &mut de).is_ok() && de.end().is_ok()
}

/// A JSON reader for the converter's output, which may nest as deep as `MAX_DEPTH` (256):
/// serde_json stops at 128 by default.
fn deep_json(text: &str) -> serde_json::Deserializer<serde_json::de::StrRead<'_>> {
    let mut de = serde_json::Deserializer::from_str(text);
    de.disable_recursion_limit();
    de
}

fn parse_deep(text: &str) -> serde_json::Result<serde_json::Value> {
    let mut de = deep_json(text);
    let value = serde::Deserialize::deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

/// The converter's contract on any input: it agrees with `validate`, leaves nothing behind on
/// failure, and writes JSON that parses, in both styles to the same value, with distinct keys
/// and no raw line separators.
fn converts_soundly(bytes: &[u8]) -> Result<(), TestCaseError> {
    let started = Instant::now();
    let valid = validate(bytes);
    let mut converter = JsonConverter::new();
    let prefix = b"[\"id\",".to_vec();
    let mut compact = prefix.clone();
    let converted = converter.convert(bytes, JsonStyle::Compact, &mut compact);
    let mut pretty = Vec::new();
    let pretty_result = converter.convert(bytes, JsonStyle::Pretty, &mut pretty);
    prop_assert!(started.elapsed() < PER_CASE, "{:?} for {} bytes", started.elapsed(), bytes.len());
    prop_assert_eq!(converted.is_ok(), pretty_result.is_ok());
    match converted {
        Err(CborError::BignumTooLarge(_)) => prop_assert!(valid.is_ok(), "a long bignum is valid CBOR"),
        Err(e) => {
            prop_assert!(valid.is_err(), "convert refused what validate accepts: {e}");
            prop_assert_eq!(&compact, &prefix, "a failed conversion leaves nothing behind");
        }
        Ok(()) => {
            prop_assert!(valid.is_ok(), "convert accepted what validate refuses: {:?}", valid);
            prop_assert!(compact.starts_with(&prefix));
            let text = std::str::from_utf8(&compact[prefix.len()..]).expect("JSON output is UTF-8");
            let parsed = parse_deep(text).map_err(|e| TestCaseError::fail(format!("{e}: {text}")))?;
            let text_pretty = std::str::from_utf8(&pretty).expect("UTF-8");
            let parsed_pretty = parse_deep(text_pretty).expect("pretty JSON parses");
            prop_assert_eq!(parsed, parsed_pretty);
            prop_assert!(keys_distinct(text), "repeated key in {}", text);
            prop_assert!(!text.contains(['\n', '\r', '\u{85}', '\u{2028}', '\u{2029}']), "{}", text);
        }
    }
    Ok(())
}

/// Found by `deep_and_long_inputs_are_refused_in_bounded_time`: 129 nested arrays are valid
/// CBOR, but their JSON was checked with a parser that stops at 128 levels.
#[test]
fn the_deepest_accepted_nesting_converts_to_json_that_parses() {
    for depth in [129, export_sidecar::codec::MAX_DEPTH] {
        let mut bytes = vec![0x81; depth];
        bytes.push(0x00);
        converts_soundly(&bytes).unwrap_or_else(|e| panic!("depth {depth}: {e}"));
    }
}

#[test]
fn arbitrary_bytes_never_break_the_converter() {
    run_bounded(4000, || proptest::collection::vec(any::<u8>(), 0..256), |bytes| converts_soundly(&bytes));
}

#[test]
fn well_formed_cbor_is_accepted_and_converts_to_json() {
    run_bounded(3000, item, |item| {
        let mut bytes = Vec::new();
        encode(&item, &mut bytes);
        prop_assert!(validate(&bytes).is_ok(), "{:?} is well-formed: {:02x?}", validate(&bytes), bytes);
        converts_soundly(&bytes)
    });
}

#[test]
fn damaged_cbor_is_refused_or_converted_soundly() {
    run_bounded(
        4000,
        || (item(), edits(1..5)),
        |(item, edits)| {
            let mut bytes = Vec::new();
            encode(&item, &mut bytes);
            converts_soundly(&mutate(bytes, &edits))
        },
    );
}

#[test]
fn deep_and_long_inputs_are_refused_in_bounded_time() {
    let cases = || {
        let opener = prop_oneof![Just(0x81u8), Just(0x9f), Just(0xa1), Just(0xbf), Just(0xc1), Just(0x5f)];
        (opener, 1usize..20_000, edits(0..3))
    };
    run_bounded(200, cases, |(opener, depth, edits)| {
        let mut bytes = vec![opener; depth];
        bytes.push(0x00);
        converts_soundly(&mutate(bytes, &edits))
    });
}

// ---- Webhook bodies -------------------------------------------------------------------

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value as J;
    let text = prop_oneof!["datasets|lenses|[a-z]{0,3}", "[a-z\r\n\u{0} ]{0,4}", any::<String>()];
    let leaf = prop_oneof![
        Just(J::Null),
        any::<bool>().prop_map(J::Bool),
        any::<i64>().prop_map(J::from),
        any::<f64>().prop_map(J::from),
        text.prop_map(J::String),
    ];
    leaf.prop_recursive(3, 24, 5, |inner| {
        let key = prop_oneof![Just("realm"), Just("user"), Just("name"), Just("version"), Just("other")];
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(J::Array),
            proptest::collection::vec((key.prop_map(str::to_owned), inner), 0..6)
                .prop_map(|fields| J::Object(fields.into_iter().collect())),
        ]
    })
}

/// A body: JSON of any shape, a damaged serialisation of one, or bytes.
fn webhook_body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => json_value().prop_map(|v| v.to_string().into_bytes()),
        2 => (json_value(), edits(1..3)).prop_map(|(v, e)| mutate(v.to_string().into_bytes(), &e)),
        1 => proptest::collection::vec(any::<u8>(), 0..64),
    ]
}

/// What the verifier must make of a body, decided independently of it: the notice's
/// (realm, user, name), or `None` when the body is not a usable notice.
fn expected_notice(body: &[u8]) -> Option<(String, String, String)> {
    let serde_json::Value::Object(fields) = serde_json::from_slice(body).ok()? else {
        return None;
    };
    let text = |key: &str| fields.get(key).and_then(|v| v.as_str()).map(str::to_owned);
    let realm = text("realm").filter(|r| r == "datasets" || r == "lenses")?;
    let (user, name) = (text("user").filter(|u| !u.is_empty())?, text("name").filter(|n| !n.is_empty())?);
    let version_ok = match fields.get("version") {
        None | Some(serde_json::Value::Null) | Some(serde_json::Value::Number(_)) => true,
        Some(serde_json::Value::String(v)) => !v.contains(['\r', '\n', '\0']),
        Some(_) => false,
    };
    version_ok.then_some((realm, user, name))
}

fn headers(id: &str, timestamp: &str, signature: &str) -> http::HeaderMap {
    let mut map = http::HeaderMap::new();
    for (name, value) in
        [("webhook-id", id), ("webhook-timestamp", timestamp), ("webhook-signature", signature)]
    {
        if let Ok(value) = http::HeaderValue::from_str(value) {
            map.insert(name, value);
        }
    }
    map
}

fn now_seconds() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

#[test]
fn signed_webhooks_are_accepted_exactly_when_the_body_is_a_notice() {
    let cases = || {
        // Clear of the 300 s tolerance on both sides, so a second ticking by changes no verdict.
        let skew = prop_oneof![4 => -290i64..290, 1 => 310i64..100_000, 1 => -100_000i64..-310];
        (webhook_body(), "[a-zA-Z0-9_-]{1,20}", skew)
    };
    run_bounded(3000, cases, |(body, id, skew)| {
        let verifier = WebhookVerifier::new(Some(SECRET)).expect("a valid secret");
        let timestamp = now_seconds() + skew;
        let signature = export_sidecar::reference::sign(SECRET, &id, timestamp, &body).expect("signs");
        let signed = headers(&id, &timestamp.to_string(), &format!("v1a,junk {signature}"));
        let verdict = verifier.check(&signed, &body, SystemTime::now());
        let expected = expected_notice(&body);
        match (verdict, expected) {
            (Ok(Accepted::Notice(notice)), Some((realm, user, name))) => {
                prop_assert!(skew.abs() <= 300, "a stale timestamp was accepted");
                let c = notice.collection;
                prop_assert_eq!(
                    (c.realm.as_str(), c.user.as_str(), c.name.as_str()),
                    (realm.as_str(), user.as_str(), name.as_str())
                );
                let again = verifier.check(&signed, &body, SystemTime::now());
                prop_assert_eq!(again, Ok(Accepted::Replay), "the same webhook-id again is a replay");
            }
            (Err(e), _) if skew.abs() > 300 => prop_assert_eq!(e.status(), 401),
            (Err(e), None) => prop_assert_eq!(e.status(), 400, "{}", e),
            (verdict, expected) => prop_assert!(false, "{:?} for {:?}", verdict, expected),
        }
        Ok(())
    });
}

#[test]
fn forged_or_garbled_signatures_never_pass() {
    let cases = || {
        let garbled = prop_oneof![
            any::<String>(),
            "(v1,[A-Za-z0-9+/=]{0,50} ?){0,4}",
            proptest::collection::vec(any::<u8>(), 0..40)
                .prop_map(|b| format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(b))),
        ];
        let stamp = prop_oneof![
            any::<String>(),
            any::<i64>().prop_map(|n| n.to_string()),
            Just(now_seconds().to_string())
        ];
        (webhook_body(), any::<String>(), stamp, garbled)
    };
    run_bounded(3000, cases, |(body, id, timestamp, signature)| {
        let verifier = WebhookVerifier::new(Some(SECRET)).expect("a valid secret");
        let verdict = verifier.check(&headers(&id, &timestamp, &signature), &body, SystemTime::now());
        prop_assert!(matches!(&verdict, Err(e) if e.status() == 401), "{:?}", verdict);
        Ok(())
    });
}

#[test]
fn unsigned_webhooks_are_parsed_like_signed_ones() {
    run_bounded(3000, webhook_body, |body| {
        let verifier = WebhookVerifier::new(None).expect("no secret");
        let verdict = verifier.check(&http::HeaderMap::new(), &body, SystemTime::now());
        match (verdict, expected_notice(&body)) {
            (Ok(Accepted::Notice(notice)), Some((_, user, name))) => {
                prop_assert_eq!((notice.collection.user, notice.collection.name), (user, name));
            }
            (Err(e), None) => prop_assert_eq!(e.status(), 400),
            (verdict, expected) => prop_assert!(false, "{:?} for {:?}", verdict, expected),
        }
        Ok(())
    });
}
