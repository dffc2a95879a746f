//! The CBOR→JSON mapping of SPEC.md §2: one CBOR record value in, its JSON text appended to a buffer.
//! Built for throughput: no value tree, no allocation per value, scratch buffers reused across records.

use num_bigint::BigUint;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::cbor::{self, CborError, Frame, Item, Role, Slot, Str, Visitor, MAX_BIGNUM_BYTES};

/// The layout of the JSON text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JsonStyle {
    /// No whitespace: json and json-lines exports.
    Compact,
    /// Two-space indent like JavaScript's `JSON.stringify(v, null, 2)`, `[]`/`{}` for empty containers:
    /// the zip export's per-record files, meant for people.
    Pretty,
}

/// Reusable converter: holds scratch buffers so converting many records allocates nothing per record in steady state.
///
/// Whether a map becomes a JSON object depends on all of its keys, known only at its end, after its
/// first bytes are written. So the converter writes every map as an object optimistically while
/// recording each map's verdict; in the rare case a map does not qualify, it discards the output and
/// writes once more with every verdict known. Work stays linear: at most two passes, each linear
/// (keys are compared pairwise in small maps, sorted in large ones).
#[derive(Default)]
pub struct JsonConverter {
    /// The walker's stack of open containers, kept for its allocation.
    stack: Vec<Frame<Open>>,
    /// Verdicts and key scratch for maps, kept for their allocations.
    forms: MapForms,
    /// Joins the chunks of an indefinite-length string that must be read whole (date text, bignum bytes).
    joined: Vec<u8>,
}

impl JsonConverter {
    /// A converter with empty scratch buffers; they grow to fit the largest record seen.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends the JSON form of the single CBOR item in `bytes` to `out`. On error, `out` is truncated back to its
    /// length at entry (nothing partial is left behind).
    pub fn convert(&mut self, bytes: &[u8], style: JsonStyle, out: &mut Vec<u8>) -> Result<(), CborError> {
        let start = out.len();
        out.reserve(bytes.len() + bytes.len() / 2);
        self.forms.clear();
        let mut result = self.pass(bytes, style, out, true);
        if result.is_ok() && self.forms.mismatch {
            out.truncate(start);
            result = self.pass(bytes, style, out, false);
        }
        if result.is_err() {
            out.truncate(start);
        }
        result
    }

    /// One walk over the item, writing JSON; `learn` records map verdicts (first pass) instead of trusting them.
    fn pass(
        &mut self,
        bytes: &[u8],
        style: JsonStyle,
        out: &mut Vec<u8>,
        learn: bool,
    ) -> Result<(), CborError> {
        let mut writer = Writer {
            input: bytes,
            out,
            pretty: style == JsonStyle::Pretty,
            level: 0,
            tag: None,
            forms: &mut self.forms,
            learn,
            next_map: 0,
            joined: &mut self.joined,
        };
        cbor::walk(bytes, &mut writer, &mut self.stack)
    }
}

/// Appends `s` as a JSON string literal: JSON escapes, plus U+0085, U+2028, U+2029 as \uXXXX. Used for record IDs.
pub fn write_json_string(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    write_escaped(s.as_bytes(), out);
    out.push(b'"');
}

/// Appends UTF-8 `text` with JSON escapes and no quotes. Most text needs no escaping at all, so safe runs
/// are found quickly and copied whole.
fn write_escaped(mut text: &[u8], out: &mut Vec<u8>) {
    while let Some(at) = find_suspect(text) {
        let (len, escaped) = escape_at(&text[at..]).unwrap_or((1, &text[at..=at]));
        out.extend_from_slice(&text[..at]);
        out.extend_from_slice(escaped);
        text = &text[at + len..];
    }
    out.extend_from_slice(text);
}

/// The first byte of `text` that might start something `escape_at` escapes. Eight bytes at a time are
/// cleared with one word test before any byte is looked up.
fn find_suspect(text: &[u8]) -> Option<usize> {
    let words = text.chunks_exact(8);
    let tail = words.remainder();
    for (i, word) in words.enumerate() {
        let bytes: [u8; 8] = word.try_into().unwrap_or_default();
        if word_is_suspect(u64::from_le_bytes(bytes)) {
            if let Some(at) = word.iter().position(|&b| SUSPECT[usize::from(b)]) {
                return Some(i * 8 + at);
            }
        }
    }
    let at = tail.iter().position(|&b| SUSPECT[usize::from(b)])?;
    Some(text.len() - tail.len() + at)
}

/// Whether any byte of `word` might need escaping: a control character, `"`, `\\`, or any non-ASCII byte
/// (U+0085, U+2028 and U+2029 are non-ASCII). False positives only cost a byte-by-byte look.
fn word_is_suspect(word: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH_BITS: u64 = 0x8080_8080_8080_8080;
    let has_zero_byte = |x: u64| x.wrapping_sub(ONES) & !x & HIGH_BITS != 0;
    let below_space = word.wrapping_sub(ONES * 0x20) & !word & HIGH_BITS != 0;
    word & HIGH_BITS != 0
        || below_space
        || has_zero_byte(word ^ (ONES * 0x22))
        || has_zero_byte(word ^ (ONES * 0x5c))
}

/// The escape for the character starting `text`, with its length in bytes, if it needs one.
/// U+0085, U+2028 and U+2029 are escaped so that no line splitter ever breaks a json-lines record.
fn escape_at(text: &[u8]) -> Option<(usize, &'static [u8])> {
    match *text {
        [byte @ 0..=0x1f, ..] => Some((1, CONTROL_ESCAPES[usize::from(byte)])),
        [b'"', ..] => Some((1, b"\\\"")),
        [b'\\', ..] => Some((1, b"\\\\")),
        [0xc2, 0x85, ..] => Some((2, b"\\u0085")),
        [0xe2, 0x80, 0xa8, ..] => Some((3, b"\\u2028")),
        [0xe2, 0x80, 0xa9, ..] => Some((3, b"\\u2029")),
        _ => None,
    }
}

/// Bytes that may start something `escape_at` escapes; a table lookup keeps the common path to one load.
static SUSPECT: [bool; 256] = {
    let mut table = [false; 256];
    let mut byte = 0;
    while byte < 0x20 {
        table[byte] = true;
        byte += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table[0xc2] = true;
    table[0xe2] = true;
    table
};

/// JSON escapes for U+0000..U+001F, short forms where JSON has them.
static CONTROL_ESCAPES: [&[u8]; 32] = [
    b"\\u0000", b"\\u0001", b"\\u0002", b"\\u0003", b"\\u0004", b"\\u0005", b"\\u0006", b"\\u0007", b"\\b",
    b"\\t", b"\\n", b"\\u000b", b"\\f", b"\\r", b"\\u000e", b"\\u000f", b"\\u0010", b"\\u0011", b"\\u0012",
    b"\\u0013", b"\\u0014", b"\\u0015", b"\\u0016", b"\\u0017", b"\\u0018", b"\\u0019", b"\\u001a",
    b"\\u001b", b"\\u001c", b"\\u001d", b"\\u001e", b"\\u001f",
];

/// Decimal text of every byte value (length first), so Buffer data is written without formatting.
static BYTE_DECIMALS: [[u8; 4]; 256] = {
    let mut table = [[0u8; 4]; 256];
    let mut n = 0;
    while n < 256 {
        let b = n as u8;
        table[n] = if b >= 100 {
            [3, b'0' + b / 100, b'0' + b / 10 % 10, b'0' + b % 10]
        } else if b >= 10 {
            [2, b'0' + b / 10, b'0' + b % 10, 0]
        } else {
            [1, b'0' + b, 0, 0]
        };
        n += 1;
    }
    table
};

/// Per-map verdicts (object or typed Map) and the scratch needed to reach them.
#[derive(Default)]
struct MapForms {
    /// One entry per map in order of appearance: true while it may be written as a JSON object.
    objects: Vec<bool>,
    /// The keys of the maps still open; each map's keys are popped at its end.
    keys: Vec<KeyRef>,
    /// Indefinite-length keys, joined: the only keys that are not one slice of the input.
    joined_keys: Vec<u8>,
    /// A map written as an object turned out not to qualify: the output must be written again.
    mismatch: bool,
}

/// One text key, located rather than copied: offsets survive from one record to the next where
/// borrowed slices could not, so the buffer holding them is reused.
#[derive(Clone, Copy, Debug)]
struct KeyRef {
    /// Offset of the key's bytes in the input, or in `MapForms::joined_keys` when `joined`.
    from: usize,
    /// Length in bytes; keys of different lengths differ without a look at their bytes.
    len: usize,
    /// The key's first eight bytes, zero-padded: most distinct keys differ here, so most comparisons
    /// never touch the bytes.
    prefix: u64,
    /// Located in `MapForms::joined_keys` rather than in the input.
    joined: bool,
}

impl KeyRef {
    fn new(from: usize, bytes: &[u8], joined: bool) -> Self {
        let prefix = bytes.iter().take(8).rev().fold(0, |acc, &b| acc << 8 | u64::from(b));
        KeyRef { from, len: bytes.len(), prefix, joined }
    }
}

/// Key checking state of one open map during the learning pass.
#[derive(Clone, Copy, Debug)]
struct KeyCheck {
    /// The map's index in `MapForms::objects`.
    map: usize,
    /// Where its keys start in `MapForms::keys`.
    keys_from: usize,
    /// Where its joined keys start in `MapForms::joined_keys`.
    joined_from: usize,
    /// Every key so far is untagged text.
    text_keys: bool,
}

impl MapForms {
    fn clear(&mut self) {
        self.objects.clear();
        self.keys.clear();
        self.joined_keys.clear();
        self.mismatch = false;
    }

    fn is_object(&self, map: usize) -> bool {
        self.objects.get(map).copied().unwrap_or(false)
    }

    fn start(&mut self, map: usize) -> KeyCheck {
        KeyCheck { map, keys_from: self.keys.len(), joined_from: self.joined_keys.len(), text_keys: true }
    }

    /// Notes one key of `check`'s map: `text` is its content when it is an untagged text string.
    fn key(&mut self, check: &mut KeyCheck, text: Option<Str<'_>>, input: &[u8]) {
        if !check.text_keys {
            return;
        }
        let key = match text {
            None => return check.text_keys = false,
            Some(Str::Whole(bytes)) => KeyRef::new(offset_in(input, bytes), bytes, false),
            Some(Str::Chunked(chunks)) => {
                let from = self.joined_keys.len();
                chunks.for_each(|chunk| self.joined_keys.extend_from_slice(chunk));
                KeyRef::new(from, self.joined_keys.get(from..).unwrap_or_default(), true)
            }
        };
        self.keys.push(key);
    }

    fn finish(&mut self, check: KeyCheck, input: &[u8]) {
        if !(check.text_keys && self.distinct(check.keys_from, input)) {
            if let Some(verdict) = self.objects.get_mut(check.map) {
                *verdict = false;
            }
            self.mismatch = true;
        }
        self.keys.truncate(check.keys_from);
        self.joined_keys.truncate(check.joined_from);
    }

    /// Whether the keys from `keys_from` on are pairwise distinct. Few keys: compare each pair, no setup.
    /// Many keys: sort and compare neighbours, O(n log n) comparisons rather than O(n²).
    fn distinct(&mut self, keys_from: usize, input: &[u8]) -> bool {
        let joined = &self.joined_keys;
        let bytes = |key: &KeyRef| {
            let source = if key.joined { joined } else { input };
            source.get(key.from..key.from.saturating_add(key.len)).unwrap_or_default()
        };
        let same = |a: &KeyRef, b: &KeyRef| {
            a.len == b.len && a.prefix == b.prefix && (a.len <= 8 || bytes(a) == bytes(b))
        };
        let keys = self.keys.get_mut(keys_from..).unwrap_or_default();
        if keys.len() <= 16 {
            return keys.iter().enumerate().all(|(i, a)| keys[i + 1..].iter().all(|b| !same(a, b)));
        }
        keys.sort_unstable_by(|a, b| {
            (a.len, a.prefix).cmp(&(b.len, b.prefix)).then_with(|| bytes(a).cmp(bytes(b)))
        });
        keys.windows(2).all(|pair| !same(&pair[0], &pair[1]))
    }
}

/// Where `part`, a slice of `whole`, starts in it.
fn offset_in(whole: &[u8], part: &[u8]) -> usize {
    (part.as_ptr() as usize).wrapping_sub(whole.as_ptr() as usize)
}

/// The JSON shape chosen for an open array or map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Form {
    /// A plain JSON array.
    Array,
    /// Tag 258 on an array: `{"type":"Set","data":[…]}`.
    Set,
    /// A map whose keys are all distinct untagged text: a JSON object in key order.
    Object,
    /// Any other map, or tag 259: `{"type":"Map","data":[[k,v],…]}`.
    TypedMap,
}

/// The converter's data for each open container.
#[derive(Clone, Copy, Debug)]
struct Open {
    form: Form,
    /// Present for maps during the learning pass.
    keys: Option<KeyCheck>,
}

/// The visitor that writes JSON for one pass over one record.
struct Writer<'w, 'a> {
    /// The record being converted: map keys are located in it.
    input: &'a [u8],
    /// The caller's buffer; `convert` truncates it on failure.
    out: &'w mut Vec<u8>,
    /// `JsonStyle::Pretty`, as a flag tested at every separator.
    pretty: bool,
    /// JSON nesting depth, for indentation.
    level: usize,
    /// The innermost tag before the current item: only the tag directly on an item gives it a special form.
    tag: Option<u64>,
    /// The converter's map verdicts: recorded while learning, obeyed otherwise.
    forms: &'w mut MapForms,
    /// First pass: record map verdicts, assuming every map is an object until its keys say otherwise.
    learn: bool,
    /// Index of the next map to open, in order of appearance (the same in both passes).
    next_map: usize,
    /// The converter's scratch for strings that must be read whole.
    joined: &'w mut Vec<u8>,
}

impl<'a> Visitor<'a> for Writer<'_, 'a> {
    type Frame = Open;

    fn tag(&mut self, tag: u64) {
        self.tag = Some(tag);
    }

    fn item(&mut self, slot: Slot<'_, Open>, item: Item<'a>) -> Result<(), CborError> {
        let tag = self.tag.take();
        let untagged_text = match item {
            Item::Text(text) if tag.is_none() => Some(text),
            _ => None,
        };
        self.separate(slot, untagged_text);
        match item {
            Item::Uint(n) if tag == Some(1) => self.date(i128::from(n) * 1000),
            Item::Nint(n) if tag == Some(1) => self.date((-1 - i128::from(n)) * 1000),
            Item::Uint(n) => self.number(itoa::Buffer::new().format(n)),
            Item::Nint(n) => match i64::try_from(n) {
                Ok(n) => self.number(itoa::Buffer::new().format(-1 - n)),
                Err(_) => self.number(itoa::Buffer::new().format(-1 - i128::from(n))),
            },
            Item::Float(f) => self.float(f, tag),
            Item::Simple(simple) => self.simple(simple),
            Item::Bytes(bytes) => return self.bytes(bytes, tag),
            Item::Text(text) => self.text(text, tag),
        }
        Ok(())
    }

    fn open(&mut self, slot: Slot<'_, Open>, map: bool) -> Result<Open, CborError> {
        let tag = self.tag.take();
        self.separate(slot, None);
        if !map {
            let form = if tag == Some(258) {
                self.wrapper_start("Set");
                Form::Set
            } else {
                Form::Array
            };
            self.open_json(b'[');
            return Ok(Open { form, keys: None });
        }
        let map = self.next_map;
        self.next_map += 1;
        if self.learn {
            self.forms.objects.push(true);
        }
        let typed = tag == Some(259);
        let keys = (self.learn && !typed).then(|| self.forms.start(map));
        if typed || !self.forms.is_object(map) {
            self.wrapper_start("Map");
            self.open_json(b'[');
            return Ok(Open { form: Form::TypedMap, keys });
        }
        self.open_json(b'{');
        Ok(Open { form: Form::Object, keys })
    }

    fn close(&mut self, open: Open, empty: bool) {
        match open.form {
            Form::Array => self.close_json(b']', empty),
            Form::Object => self.close_json(b'}', empty),
            Form::Set => {
                self.close_json(b']', empty);
                self.close_json(b'}', false);
            }
            Form::TypedMap => {
                if !empty {
                    self.close_json(b']', false);
                }
                self.close_json(b']', empty);
                self.close_json(b'}', false);
            }
        }
        if let Some(check) = open.keys {
            self.forms.finish(check, self.input);
        }
    }
}

impl Writer<'_, '_> {
    /// Writes what goes between the previous item and this one, and notes map keys while learning.
    #[inline(always)]
    fn separate(&mut self, slot: Slot<'_, Open>, untagged_text: Option<Str<'_>>) {
        let Some(parent) = slot.parent else { return };
        if slot.role == Role::Key {
            if let Some(check) = parent.keys.as_mut() {
                self.forms.key(check, untagged_text, self.input);
            }
        }
        match (parent.form, slot.role) {
            (Form::Object, Role::Value) => self.colon(),
            (Form::TypedMap, Role::Key) => {
                if !slot.first {
                    self.close_json(b']', false);
                }
                self.element(slot.first);
                self.open_json(b'[');
                self.element(true);
            }
            (Form::TypedMap, Role::Value) => self.element(false),
            _ => self.element(slot.first),
        }
    }

    fn number(&mut self, digits: &str) {
        self.out.extend_from_slice(digits.as_bytes());
    }

    fn float(&mut self, f: f64, tag: Option<u64>) {
        if let (Some(1), Some(ms)) = (tag, epoch_ms(f)) {
            self.date(ms);
        } else if f.is_finite() {
            self.number(zmij::Buffer::new().format_finite(f));
        } else if f.is_nan() {
            self.constant("NaN");
        } else if f > 0.0 {
            self.constant("infinity");
        } else {
            self.constant("-infinity");
        }
    }

    fn simple(&mut self, simple: u8) {
        match simple {
            20 => self.out.extend_from_slice(b"false"),
            21 => self.out.extend_from_slice(b"true"),
            23 => self.constant("undefined"),
            _ => self.out.extend_from_slice(b"null"),
        }
    }

    fn bytes(&mut self, bytes: Str<'_>, tag: Option<u64>) -> Result<(), CborError> {
        if let Some(negative) = match tag {
            Some(2) => Some(false),
            Some(3) => Some(true),
            _ => None,
        } {
            self.wrapper_start("BigInteger");
            self.out.push(b'"');
            write_bignum(join(bytes, self.joined), negative, self.out)?;
            self.out.push(b'"');
            self.close_json(b'}', false);
            return Ok(());
        }
        self.wrapper_start("Buffer");
        self.open_json(b'[');
        let mut first = true;
        for byte in bytes.into_iter().flatten() {
            self.element(first);
            first = false;
            let decimal = &BYTE_DECIMALS[usize::from(*byte)];
            self.out.extend_from_slice(&decimal[1..=usize::from(decimal[0])]);
        }
        self.close_json(b']', first);
        self.close_json(b'}', false);
        Ok(())
    }

    fn text(&mut self, text: Str<'_>, tag: Option<u64>) {
        if tag == Some(0) {
            if let Some(ms) = rfc3339_ms(join(text, self.joined)) {
                return self.date(ms);
            }
        }
        self.out.push(b'"');
        match text {
            Str::Whole(text) => write_escaped(text, self.out),
            Str::Chunked(chunks) => chunks.for_each(|chunk| write_escaped(chunk, self.out)),
        }
        self.out.push(b'"');
    }

    fn date(&mut self, ms: i128) {
        self.wrapper_start("Date");
        self.number(itoa::Buffer::new().format(ms));
        self.close_json(b'}', false);
    }

    fn constant(&mut self, name: &str) {
        self.wrapper_start("constant");
        self.quoted(name);
        self.close_json(b'}', false);
    }

    /// Opens `{"type":"<kind>","data":` for the typed forms the dataset server's codec reads back.
    fn wrapper_start(&mut self, kind: &str) {
        self.open_json(b'{');
        self.element(true);
        self.quoted("type");
        self.colon();
        self.quoted(kind);
        self.element(false);
        self.quoted("data");
        self.colon();
    }

    fn quoted(&mut self, plain: &str) {
        self.out.push(b'"');
        self.out.extend_from_slice(plain.as_bytes());
        self.out.push(b'"');
    }

    fn open_json(&mut self, bracket: u8) {
        self.out.push(bracket);
        self.level += 1;
    }

    fn close_json(&mut self, bracket: u8, empty: bool) {
        self.level = self.level.saturating_sub(1);
        if !empty {
            self.newline();
        }
        self.out.push(bracket);
    }

    fn element(&mut self, first: bool) {
        if !first {
            self.out.push(b',');
        }
        self.newline();
    }

    fn newline(&mut self) {
        if self.pretty {
            self.out.push(b'\n');
            self.out.resize(self.out.len() + 2 * self.level, b' ');
        }
    }

    fn colon(&mut self) {
        self.out.extend_from_slice(if self.pretty { b": " } else { b":" });
    }
}

/// The whole content of a string: its one slice, or its chunks joined in `scratch`.
fn join<'s>(text: Str<'s>, scratch: &'s mut Vec<u8>) -> &'s [u8] {
    match text {
        Str::Whole(bytes) => bytes,
        Str::Chunked(chunks) => {
            scratch.clear();
            chunks.for_each(|chunk| scratch.extend_from_slice(chunk));
            scratch
        }
    }
}

/// Epoch milliseconds for float seconds, truncated toward zero as JavaScript's `Date` does;
/// None when there is no such integer (NaN, infinities, magnitudes beyond i128).
fn epoch_ms(seconds: f64) -> Option<i128> {
    const LIMIT: f64 = i128::MAX as f64;
    let ms = (seconds * 1000.0).trunc();
    (ms.is_finite() && ms.abs() < LIMIT).then_some(ms as i128)
}

/// Epoch milliseconds for RFC 3339 text; sub-millisecond digits are dropped as JavaScript's `Date.parse`
/// does, which rounds toward the past (hence `div_euclid`).
fn rfc3339_ms(text: &[u8]) -> Option<i128> {
    let text = std::str::from_utf8(text).ok()?;
    let date = OffsetDateTime::parse(text, &Rfc3339).ok()?;
    Some(date.unix_timestamp_nanos().div_euclid(1_000_000))
}

/// Writes the decimal digits of a bignum: `magnitude` big-endian, negative meaning -1 - magnitude (tag 3).
fn write_bignum(magnitude: &[u8], negative: bool, out: &mut Vec<u8>) -> Result<(), CborError> {
    let significant = magnitude.iter().position(|&b| b != 0).unwrap_or(magnitude.len());
    let magnitude = &magnitude[significant..];
    if negative {
        out.push(b'-');
    }
    if magnitude.len() <= 16 {
        let n = magnitude.iter().fold(0u128, |acc, &b| acc << 8 | u128::from(b));
        if let Some(n) = if negative { n.checked_add(1) } else { Some(n) } {
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            return Ok(());
        }
    }
    if magnitude.len() > MAX_BIGNUM_BYTES {
        return Err(CborError::BignumTooLarge(magnitude.len()));
    }
    let mut n = BigUint::from_bytes_be(magnitude);
    if negative {
        n += 1u32;
    }
    out.extend_from_slice(n.to_string().as_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    fn convert(bytes: &[u8], style: JsonStyle) -> Result<String, CborError> {
        let mut out = Vec::new();
        JsonConverter::new().convert(bytes, style, &mut out)?;
        Ok(String::from_utf8(out).unwrap())
    }

    fn compact(s: &str) -> String {
        convert(&hex(s), JsonStyle::Compact).unwrap()
    }

    #[test]
    fn pretty_matches_javascript_stringify() {
        // {"a": [1, {}], "b": [], "c": h'00ff', "d": {1: "x"}}
        let value = hex("a4616182 01a0 616280 616342 00ff 6164 a1 01 6178".replace(' ', "").as_str());
        let expected = "{\n  \"a\": [\n    1,\n    {}\n  ],\n  \"b\": [],\n  \"c\": {\n    \"type\": \"Buffer\",\n    \
                        \"data\": [\n      0,\n      255\n    ]\n  },\n  \"d\": {\n    \"type\": \"Map\",\n    \
                        \"data\": [\n      [\n        1,\n        \"x\"\n      ]\n    ]\n  }\n}";
        assert_eq!(convert(&value, JsonStyle::Pretty).unwrap(), expected);
        assert_eq!(
            convert(&value, JsonStyle::Compact).unwrap(),
            r#"{"a":[1,{}],"b":[],"c":{"type":"Buffer","data":[0,255]},"d":{"type":"Map","data":[[1,"x"]]}}"#
        );
        assert_eq!(
            convert(&hex("40"), JsonStyle::Pretty).unwrap(),
            "{\n  \"type\": \"Buffer\",\n  \"data\": []\n}"
        );
    }

    #[test]
    fn error_leaves_output_as_it_was() {
        let mut converter = JsonConverter::new();
        let mut out = b"kept".to_vec();
        for bad in ["83616101", "a2616101616102ff", "8262c328", "820101ff"] {
            assert!(converter.convert(&hex(bad), JsonStyle::Pretty, &mut out).is_err(), "{bad}");
            assert_eq!(out, b"kept");
        }
        converter.convert(&hex("01"), JsonStyle::Compact, &mut out).unwrap();
        assert_eq!(out, b"kept1");
    }

    #[test]
    fn repeated_or_non_text_keys_fall_back_to_typed_map() {
        assert_eq!(compact("a2616101616102"), r#"{"type":"Map","data":[["a",1],["a",2]]}"#);
        assert_eq!(compact("a261610101f5"), r#"{"type":"Map","data":[["a",1],[1,true]]}"#);
        // A tagged text key is not plain text: keep the map lossless.
        assert_eq!(compact("a1d820616101"), r#"{"type":"Map","data":[["a",1]]}"#);
        // Only the map with the bad keys changes form, inside and around objects.
        assert_eq!(compact("a16178a2616101616102"), r#"{"x":{"type":"Map","data":[["a",1],["a",2]]}}"#);
        assert_eq!(compact("a1a1616101a1616202"), r#"{"type":"Map","data":[[{"a":1},{"b":2}]]}"#);
    }

    #[test]
    fn many_keys_use_the_sorting_check() {
        let map = |keys: &[u8]| {
            let mut bytes = vec![0xb8, keys.len() as u8];
            for &k in keys {
                bytes.extend_from_slice(&[0x61, k, 0x00]);
            }
            bytes
        };
        let distinct: Vec<u8> = (b'a'..=b'z').rev().collect();
        let out = convert(&map(&distinct), JsonStyle::Compact).unwrap();
        assert!(out.starts_with(r#"{"z":0,"y":0"#), "{out}");
        let mut repeated = distinct.clone();
        repeated[20] = b'z';
        let out = convert(&map(&repeated), JsonStyle::Compact).unwrap();
        assert!(out.starts_with(r#"{"type":"Map","data":[["z",0],["y",0]"#), "{out}");
    }

    #[test]
    fn long_keys_sharing_a_prefix_are_compared_in_full() {
        let map = |keys: &[&str]| {
            let mut bytes = vec![0xb8, keys.len() as u8];
            for key in keys {
                bytes.extend_from_slice(&[0x78, key.len() as u8]);
                bytes.extend_from_slice(key.as_bytes());
                bytes.push(0xf6);
            }
            convert(&bytes, JsonStyle::Compact).unwrap()
        };
        let few = ["prefix__a", "prefix__b"];
        assert_eq!(map(&few), r#"{"prefix__a":null,"prefix__b":null}"#);
        assert!(map(&["prefix__a", "prefix__a"]).starts_with(r#"{"type":"Map""#));
        let many: Vec<String> = (0..40).map(|i| format!("shared-prefix-{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(map(&many).starts_with(r#"{"shared-prefix-0":null,"#));
        let mut repeated = many.clone();
        repeated[39] = repeated[7];
        assert!(map(&repeated).starts_with(r#"{"type":"Map""#));
    }

    #[test]
    fn indefinite_text_keys_are_joined_before_comparing() {
        assert_eq!(compact("a27f616161626163ff017f6161ff02"), r#"{"abc":1,"a":2}"#);
        assert_eq!(
            compact("a27f61616162ff01626162 02".replace(' ', "").as_str()),
            r#"{"type":"Map","data":[["ab",1],["ab",2]]}"#
        );
    }

    #[test]
    fn special_tags_on_the_wrong_content_are_dropped() {
        assert_eq!(compact("c26161"), r#""a""#);
        assert_eq!(compact("c0636e6f77"), r#""now""#);
        assert_eq!(compact("d9010201"), "1");
        assert_eq!(compact("d90103820102"), "[1,2]");
        assert_eq!(compact("c1f97e00"), r#"{"type":"constant","data":"NaN"}"#);
        assert_eq!(compact("d90102d8208101"), "[1]");
        assert_eq!(compact("d820d9010281f6"), r#"{"type":"Set","data":[null]}"#);
    }

    #[test]
    fn bignums_and_dates() {
        assert_eq!(compact("c240"), r#"{"type":"BigInteger","data":"0"}"#);
        assert_eq!(compact("c340"), r#"{"type":"BigInteger","data":"-1"}"#);
        assert_eq!(compact("c25f4101420000ff"), r#"{"type":"BigInteger","data":"65536"}"#);
        let max128 = format!("c350{}", "ff".repeat(16));
        assert_eq!(
            compact(&max128),
            r#"{"type":"BigInteger","data":"-340282366920938463463374607431768211456"}"#
        );
        let big = [vec![0xc2, 0x59, 0x10, 0x01, 0x01], vec![0; 4096]].concat();
        assert!(matches!(convert(&big, JsonStyle::Compact), Err(CborError::BignumTooLarge(4097))));
        assert_eq!(compact("c13a0001869f"), r#"{"type":"Date","data":-100000000}"#);
        assert_eq!(compact("c1fbbff8000000000000"), r#"{"type":"Date","data":-1500}"#);
        // 1969-12-31T23:59:59.9995Z: JavaScript keeps .999, one millisecond before the epoch.
        assert_eq!(
            compact("c07819313936392d31322d33315432333a35393a35392e393939355a"),
            r#"{"type":"Date","data":-1}"#
        );
    }

    #[test]
    fn escapes_what_json_and_line_splitters_need() {
        let mut out = Vec::new();
        write_json_string("a\"b\\c\n\r\t\u{8}\u{c}\u{1}\u{7f}\u{85}\u{2028}\u{2029}é€🤟", &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "\"a\\\"b\\\\c\\n\\r\\t\\b\\f\\u0001\u{7f}\\u0085\\u2028\\u2029é€🤟\""
        );
    }

    #[test]
    fn deep_nesting_converts_to_the_limit_and_fails_beyond() {
        let nested = |depth: usize| [vec![0x81; depth], vec![0x00]].concat();
        let out = convert(&nested(cbor::MAX_DEPTH), JsonStyle::Pretty).unwrap();
        assert_eq!(out.matches('[').count(), cbor::MAX_DEPTH);
        assert!(matches!(convert(&nested(100_000), JsonStyle::Compact), Err(CborError::TooDeep)));
        let maps = [[0xa1, 0x60].repeat(cbor::MAX_DEPTH), vec![0xf6]].concat();
        assert!(convert(&maps, JsonStyle::Compact).unwrap().starts_with(r#"{"":{"":"#));
    }

    #[test]
    fn converter_reuse_keeps_records_independent() {
        let mut converter = JsonConverter::new();
        let mut out = Vec::new();
        for record in ["a2616101616102", "a1616101", "a10101", "a1616101"] {
            converter.convert(&hex(record), JsonStyle::Compact, &mut out).unwrap();
            out.push(b'\n');
        }
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"type\":\"Map\",\"data\":[[\"a\",1],[\"a\",2]]}\n{\"a\":1}\n{\"type\":\"Map\",\"data\":[[1,1]]}\n{\"a\":1}\n"
        );
    }

    /// A deterministic xorshift generator: reproducible cases without a property-testing crate.
    fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        }
    }

    fn random_text(next: &mut impl FnMut() -> u64) -> String {
        const PIECES: [&str; 12] =
            ["a", "key", " ", "\"", "\\", "\n", "\u{1}", "é", "\u{85}", "\u{2028}", "🤟", "\u{7f}"];
        (0..next() % 6).map(|_| PIECES[(next() % 12) as usize]).collect()
    }

    fn random_value(next: &mut impl FnMut() -> u64, depth: u32) -> serde_json::Value {
        use serde_json::Value;
        match next() % if depth == 0 { 5 } else { 7 } {
            0 => Value::Null,
            1 => Value::Bool(next() & 1 == 0),
            2 => Value::from(next() as i64 >> (next() % 64)),
            3 => Value::from(f64::from_bits(next()) % 1e6),
            4 => Value::String(random_text(next)),
            5 => (0..next() % 4).map(|_| random_value(next, depth - 1)).collect(),
            _ => Value::Object(
                (0..next() % 4).map(|_| (random_text(next), random_value(next, depth - 1))).collect(),
            ),
        }
    }

    /// ciborium writes the CBOR (choosing half and single floats where exact); serde_json reads our JSON back.
    #[test]
    fn plain_values_survive_cbor_and_back() {
        let mut next = xorshift(0x853c_49e6_748f_ea9b);
        let mut converter = JsonConverter::new();
        for _ in 0..2000 {
            let value = random_value(&mut next, 3);
            let mut cbor = Vec::new();
            ciborium::into_writer(&value, &mut cbor).unwrap();
            for style in [JsonStyle::Compact, JsonStyle::Pretty] {
                let mut out = Vec::new();
                converter.convert(&cbor, style, &mut out).unwrap();
                let back: serde_json::Value = serde_json::from_slice(&out).unwrap();
                assert_eq!(back, value, "{}", String::from_utf8_lossy(&out));
            }
        }
    }

    /// Mutations of valid items reach deep into the walker; random bytes alone mostly stop at the first head.
    #[test]
    fn mutated_input_never_panics_and_agrees_with_validate() {
        let seeds = [
            "a3657469746c65617864746167738261616162616ea164646565708201a1616bf6",
            "9f01bf6161f5ff5f42010243030405ff7f657374726561646d696e67ffff",
            "d90103a2616101f5f4d9010283c249010000000000000000c0781932303133",
            "a2616101616102c1fb41d954fc40200000f97e00",
        ];
        let mut next = xorshift(0x2545_f491_4f6c_dd1d);
        let mut converter = JsonConverter::new();
        for round in 0..4000 {
            let mut bytes = hex(seeds[round % seeds.len()]);
            for _ in 0..1 + next() % 4 {
                let at = (next() as usize) % bytes.len();
                match next() % 3 {
                    0 => bytes[at] = next() as u8,
                    1 => bytes.truncate(at),
                    _ => bytes.insert(at, next() as u8),
                }
                if bytes.is_empty() {
                    break;
                }
            }
            let mut out = Vec::new();
            let converted = converter.convert(&bytes, JsonStyle::Compact, &mut out);
            assert_eq!(converted.is_ok(), cbor::validate(&bytes).is_ok(), "{bytes:02x?}");
            if converted.is_ok() {
                serde_json::from_slice::<serde_json::Value>(&out)
                    .unwrap_or_else(|e| panic!("{bytes:02x?} gave invalid JSON: {e}"));
            } else {
                assert!(out.is_empty());
            }
        }
    }
}
