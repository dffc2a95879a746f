//! Checks the CBOR→JSON converter against every row of tests/fixtures/cbor-to-json.jsonl, the shared
//! vectors for SPEC.md §2. Numbers are compared by exact decimal text for integers, so lost digits show.
//! The output is read back with a strict parser of our own: serde_json stops at 128 levels of nesting.

use std::panic::{catch_unwind, AssertUnwindSafe};

use export_sidecar::codec::{validate, JsonConverter, JsonStyle};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/cbor-to-json.jsonl");

#[test]
fn every_vector_converts_as_specified() {
    let rows = std::fs::read_to_string(FIXTURE).expect("the fixture file is readable");
    let mut converter = JsonConverter::new();
    let mut failures = Vec::new();
    let mut checked = 0;
    for (line, text) in rows.lines().enumerate().filter(|(_, text)| !text.trim().is_empty()) {
        let row = match Json::parse(text.as_bytes()) {
            Ok(row) => row,
            Err(e) => {
                failures.push(format!("line {}: unreadable row: {e}", line + 1));
                continue;
            }
        };
        let name = match row.field("name") {
            Some(Json::Str(name)) => name.clone(),
            _ => format!("line {}", line + 1),
        };
        let outcome = catch_unwind(AssertUnwindSafe(|| check_row(&row, &mut converter)));
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(why)) => failures.push(format!("{name}: {why}")),
            Err(_) => failures.push(format!("{name}: panicked")),
        }
        checked += 1;
    }
    assert!(checked > 0, "no vectors found in {FIXTURE}");
    assert!(failures.is_empty(), "{} of {checked} vectors failed:\n{}", failures.len(), failures.join("\n"));
}

fn check_row(row: &Json, converter: &mut JsonConverter) -> Result<(), String> {
    let Some(Json::Str(cbor_hex)) = row.field("cbor_hex") else {
        return Err("no cbor_hex".into());
    };
    let cbor = decode_hex(cbor_hex)?;
    if row.field("error") == Some(&Json::Bool(true)) {
        return check_rejected(&cbor, converter);
    }
    let expected = row.field("json").ok_or("neither json nor error")?;
    validate(&cbor).map_err(|e| format!("validate refused a valid item: {e}"))?;
    for style in [JsonStyle::Compact, JsonStyle::Pretty] {
        let mut out = b"[".to_vec();
        converter
            .convert(&cbor, style, &mut out)
            .map_err(|e| format!("{style:?}: conversion failed: {e}"))?;
        let json = &out[1..];
        let shown = String::from_utf8_lossy(json);
        let actual = Json::parse(json).map_err(|e| format!("{style:?}: not JSON ({e}): {shown}"))?;
        if !actual.same_as(expected) {
            return Err(format!("{style:?}: got {shown}, expected {expected:?}"));
        }
        if ["\u{85}", "\u{2028}", "\u{2029}"].iter().any(|s| shown.contains(s)) {
            return Err(format!("raw U+0085/U+2028/U+2029 in output: {shown:?}"));
        }
    }
    Ok(())
}

fn check_rejected(cbor: &[u8], converter: &mut JsonConverter) -> Result<(), String> {
    if validate(cbor).is_ok() {
        return Err("validate accepted an invalid item".into());
    }
    let mut out = b"kept".to_vec();
    if converter.convert(cbor, JsonStyle::Compact, &mut out).is_ok() {
        return Err(format!("converted an invalid item to {}", String::from_utf8_lossy(&out)));
    }
    if out != b"kept" {
        return Err("a failed conversion left output behind".into());
    }
    Ok(())
}

fn decode_hex(text: &str) -> Result<Vec<u8>, String> {
    let digits = text.as_bytes();
    if !digits.len().is_multiple_of(2) {
        return Err("odd-length cbor_hex".into());
    }
    digits
        .chunks(2)
        .map(|pair| {
            std::str::from_utf8(pair)
                .ok()
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                .ok_or_else(|| format!("bad hex {pair:?}"))
        })
        .collect()
}

/// A JSON value that keeps numbers as their text, so big integers compare digit for digit.
#[derive(Debug, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    Number(String),
    Str(String),
    Array(Vec<Json>),
    /// Pairs in document order: the mapping keeps key order.
    Object(Vec<(String, Json)>),
}

impl Json {
    fn parse(text: &[u8]) -> Result<Json, String> {
        let mut parser = Parser { text, pos: 0 };
        let value = parser.value()?;
        parser.skip_space();
        if parser.pos != text.len() {
            return Err(format!("trailing text at byte {}", parser.pos));
        }
        Ok(value)
    }

    fn field(&self, name: &str) -> Option<&Json> {
        match self {
            Json::Object(pairs) => pairs.iter().find(|(key, _)| key == name).map(|(_, value)| value),
            _ => None,
        }
    }

    /// Equality with integers by exact text and other numbers by value (-0.0 equals 0).
    fn same_as(&self, other: &Json) -> bool {
        match (self, other) {
            (Json::Number(a), Json::Number(b)) => same_number(a, b),
            (Json::Array(a), Json::Array(b)) => {
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.same_as(y))
            }
            (Json::Object(a), Json::Object(b)) => {
                a.len() == b.len() && a.iter().zip(b).all(|((ka, va), (kb, vb))| ka == kb && va.same_as(vb))
            }
            _ => self == other,
        }
    }
}

fn same_number(a: &str, b: &str) -> bool {
    let integer = |n: &str| !n.contains(['.', 'e', 'E']);
    if integer(a) && integer(b) {
        let signless_zero = |n: &str| {
            if n.trim_start_matches('-') == "0" {
                "0".to_string()
            } else {
                n.to_string()
            }
        };
        return signless_zero(a) == signless_zero(b);
    }
    matches!((a.parse::<f64>(), b.parse::<f64>()), (Ok(x), Ok(y)) if x == y)
}

struct Parser<'t> {
    text: &'t [u8],
    pos: usize,
}

impl Parser<'_> {
    fn skip_space(&mut self) {
        while matches!(self.text.get(self.pos), Some(b' ' | b'\n' | b'\r' | b'\t')) {
            self.pos += 1;
        }
    }

    fn peek(&mut self) -> Result<u8, String> {
        self.skip_space();
        self.text.get(self.pos).copied().ok_or_else(|| "unexpected end of JSON".to_string())
    }

    fn expect(&mut self, byte: u8) -> Result<(), String> {
        if self.peek()? != byte {
            return Err(format!("expected {:?} at byte {}", byte as char, self.pos));
        }
        self.pos += 1;
        Ok(())
    }

    fn literal(&mut self, word: &str, value: Json) -> Result<Json, String> {
        if !self.text[self.pos..].starts_with(word.as_bytes()) {
            return Err(format!("bad literal at byte {}", self.pos));
        }
        self.pos += word.len();
        Ok(value)
    }

    fn value(&mut self) -> Result<Json, String> {
        match self.peek()? {
            b'n' => self.literal("null", Json::Null),
            b't' => self.literal("true", Json::Bool(true)),
            b'f' => self.literal("false", Json::Bool(false)),
            b'"' => self.string().map(Json::Str),
            b'[' => self.array(),
            b'{' => self.object(),
            _ => self.number(),
        }
    }

    fn array(&mut self) -> Result<Json, String> {
        self.expect(b'[')?;
        let mut items = Vec::new();
        if self.peek()? == b']' {
            self.pos += 1;
            return Ok(Json::Array(items));
        }
        loop {
            items.push(self.value()?);
            match self.peek()? {
                b',' => self.pos += 1,
                _ => break,
            }
        }
        self.expect(b']')?;
        Ok(Json::Array(items))
    }

    fn object(&mut self) -> Result<Json, String> {
        self.expect(b'{')?;
        let mut pairs = Vec::new();
        if self.peek()? == b'}' {
            self.pos += 1;
            return Ok(Json::Object(pairs));
        }
        loop {
            self.peek()?;
            let key = self.string()?;
            self.expect(b':')?;
            pairs.push((key, self.value()?));
            match self.peek()? {
                b',' => self.pos += 1,
                _ => break,
            }
        }
        self.expect(b'}')?;
        Ok(Json::Object(pairs))
    }

    /// RFC 8259 number grammar: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
    fn number(&mut self) -> Result<Json, String> {
        let start = self.pos;
        self.optional(b"-");
        if !self.optional(b"0") && self.digits() == 0 {
            return Err(format!("bad number at byte {start}"));
        }
        if self.optional(b".") && self.digits() == 0 {
            return Err(format!("no digits after the point at byte {start}"));
        }
        if self.optional(b"eE") {
            self.optional(b"+-");
            if self.digits() == 0 {
                return Err(format!("no exponent digits at byte {start}"));
            }
        }
        let number = std::str::from_utf8(&self.text[start..self.pos]).map_err(|e| e.to_string())?;
        Ok(Json::Number(number.to_string()))
    }

    fn optional(&mut self, any_of: &[u8]) -> bool {
        let found = self.text.get(self.pos).is_some_and(|b| any_of.contains(b));
        self.pos += usize::from(found);
        found
    }

    fn digits(&mut self) -> usize {
        let start = self.pos;
        while self.text.get(self.pos).is_some_and(u8::is_ascii_digit) {
            self.pos += 1;
        }
        self.pos - start
    }

    fn string(&mut self) -> Result<String, String> {
        self.expect(b'"')?;
        let mut units: Vec<u16> = Vec::new();
        loop {
            let rest = std::str::from_utf8(&self.text[self.pos..]).map_err(|e| e.to_string())?;
            let c = rest.chars().next().ok_or("unterminated string")?;
            self.pos += c.len_utf8();
            match c {
                '"' => return String::from_utf16(&units).map_err(|e| e.to_string()),
                '\\' => units.push(self.escape()?),
                c if (c as u32) < 0x20 => {
                    return Err(format!("raw control character in string at byte {}", self.pos))
                }
                c => units.extend(c.encode_utf16(&mut [0; 2]).iter()),
            }
        }
    }

    fn escape(&mut self) -> Result<u16, String> {
        let byte = *self.text.get(self.pos).ok_or("unterminated escape")?;
        self.pos += 1;
        Ok(match byte {
            b'"' => 0x22,
            b'\\' => 0x5c,
            b'/' => 0x2f,
            b'b' => 0x08,
            b'f' => 0x0c,
            b'n' => 0x0a,
            b'r' => 0x0d,
            b't' => 0x09,
            b'u' => {
                let digits = self.text.get(self.pos..self.pos + 4).ok_or("short \\u escape")?;
                self.pos += 4;
                let digits = std::str::from_utf8(digits).map_err(|e| e.to_string())?;
                u16::from_str_radix(digits, 16).map_err(|e| e.to_string())?
            }
            _ => return Err(format!("bad escape at byte {}", self.pos)),
        })
    }
}
