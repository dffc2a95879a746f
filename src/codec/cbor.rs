//! Strict, non-recursive reading of one CBOR item (RFC 8949) from untrusted bytes.
//! `validate` checks an item; `walk` drives a `Visitor` through it so every codec shares the same checks.

use std::iter::Chain;
use std::option;

/// Deepest nesting of arrays and maps accepted (SPEC.md §2: 256 levels convert, deeper input fails).
/// The bound keeps the walker's heap stack small whatever the input claims.
pub const MAX_DEPTH: usize = 256;

/// Bignums (tags 2 and 3) longer than this, leading zero bytes aside, are refused by the JSON
/// converter: decimal conversion is quadratic in the length, so hostile input must be bounded.
/// 4 KiB is 32,768 bits, far beyond any real integer a record holds.
pub const MAX_BIGNUM_BYTES: usize = 4096;

/// Why bytes are not one acceptable CBOR item.
#[derive(Debug, thiserror::Error)]
pub enum CborError {
    /// The input ends in the middle of an item, or a length points past the end of the input.
    #[error("CBOR input is truncated: it ends before the item it starts is complete")]
    Truncated,
    /// A complete item is followed by more bytes; a record holds exactly one item.
    #[error("CBOR input has trailing bytes after the first complete item; expected exactly one item")]
    TrailingBytes,
    /// A text string (or a chunk of one) is not valid UTF-8.
    #[error("CBOR text string is not valid UTF-8")]
    InvalidUtf8,
    /// Arrays and maps nest deeper than `MAX_DEPTH`.
    #[error("CBOR item nests arrays and maps deeper than {MAX_DEPTH} levels")]
    TooDeep,
    /// A bignum is too long to convert to decimal text; see `MAX_BIGNUM_BYTES`.
    #[error("CBOR bignum of {0} bytes is too large to convert to decimal (limit {MAX_BIGNUM_BYTES} bytes)")]
    BignumTooLarge(usize),
    /// Any other violation of RFC 8949 well-formedness; the text says which.
    #[error("malformed CBOR: {0}")]
    Malformed(&'static str),
}

/// Validates that `bytes` is exactly one well-formed CBOR item (RFC 8949): every length in bounds, text is UTF-8,
/// indefinite-length strings made only of definite chunks of the same major type, breaks only inside indefinite
/// containers, reserved additional-info values 28–30 rejected, nesting ≤ MAX_DEPTH, no trailing bytes.
pub fn validate(bytes: &[u8]) -> Result<(), CborError> {
    walk(bytes, &mut Check, &mut Vec::new())
}

/// Where an item sits in its parent: writers need it for separators, key checks need `Key`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The outermost item.
    Top,
    /// An element of an array.
    Element,
    /// A key of a map.
    Key,
    /// A value of a map.
    Value,
}

/// What a visitor learns about the position of an item before it sees the item.
pub struct Slot<'f, F> {
    /// The item's role in its parent container.
    pub role: Role,
    /// True for the first element of an array or the first key of a map: writers put no separator before it.
    pub first: bool,
    /// The visitor's own data for the enclosing array or map, so it can note things about its children.
    pub parent: Option<&'f mut F>,
}

/// A string's content: one slice, or the chunks of an indefinite-length string, all slices of the input.
#[derive(Clone, Copy, Debug)]
pub enum Str<'a> {
    /// A definite-length string.
    Whole(&'a [u8]),
    /// An indefinite-length string, already checked.
    Chunked(Chunks<'a>),
}

impl<'a> IntoIterator for Str<'a> {
    type Item = &'a [u8];
    type IntoIter = Chain<option::IntoIter<&'a [u8]>, Chunks<'a>>;

    fn into_iter(self) -> Self::IntoIter {
        match self {
            Str::Whole(bytes) => Some(bytes).into_iter().chain(Chunks { rest: &[] }),
            Str::Chunked(chunks) => None.into_iter().chain(chunks),
        }
    }
}

/// The chunks of an indefinite-length string, read back from input that `walk` has already checked.
#[derive(Clone, Copy, Debug)]
pub struct Chunks<'a> {
    /// The encoded chunks after the indefinite head, without the final break.
    rest: &'a [u8],
}

impl<'a> Iterator for Chunks<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let mut reader = Reader { bytes: self.rest, pos: 0 };
        let (Head::Bytes(Some(len)) | Head::Text(Some(len))) = reader.head().ok()? else {
            return None;
        };
        let chunk = reader.take(len).ok()?;
        self.rest = self.rest.get(reader.pos..)?;
        Some(chunk)
    }
}

/// One complete item that is not an array or a map (tags come separately, before it).
#[derive(Clone, Copy, Debug)]
pub enum Item<'a> {
    /// Major type 0.
    Uint(u64),
    /// Major type 1, holding `n` for the value -1 - n (which may not fit an i64).
    Nint(u64),
    /// Half, single or double precision, widened exactly.
    Float(f64),
    /// Simple values: 20 false, 21 true, 22 null, 23 undefined, others unassigned.
    Simple(u8),
    /// A byte string.
    Bytes(Str<'a>),
    /// A text string, already checked to be UTF-8.
    Text(Str<'a>),
}

/// Receives the items of one CBOR item in order; `walk` has checked each before it is passed on.
pub trait Visitor<'a> {
    /// What the visitor keeps for each open array or map.
    type Frame;
    /// A tag that applies to the next item (or to the next tag).
    fn tag(&mut self, tag: u64);
    /// An item that is not a container.
    fn item(&mut self, slot: Slot<'_, Self::Frame>, item: Item<'a>) -> Result<(), CborError>;
    /// An array (`map` false) or map opens.
    fn open(&mut self, slot: Slot<'_, Self::Frame>, map: bool) -> Result<Self::Frame, CborError>;
    /// The most recently opened container closes; `empty` when it held nothing.
    fn close(&mut self, frame: Self::Frame, empty: bool);
}

/// One open array or map on the walker's explicit stack.
pub struct Frame<F> {
    /// Elements (arrays) or pairs (maps) still expected, for definite lengths.
    left: u64,
    /// Ended by a break rather than by a count.
    indefinite: bool,
    /// A map, whose items alternate key and value.
    map: bool,
    /// For maps: the next item is a key.
    key_next: bool,
    /// Nothing has completed inside it yet.
    empty: bool,
    /// The visitor's data for this container.
    data: F,
}

/// Walks the single CBOR item in `bytes`, checking it as `validate` documents and reporting it to `visitor`.
/// `stack` is scratch space, cleared first, passed in so callers can reuse its allocation.
/// Iterative, so nesting costs heap, never call stack.
pub fn walk<'a, V: Visitor<'a>>(
    bytes: &'a [u8],
    visitor: &mut V,
    stack: &mut Vec<Frame<V::Frame>>,
) -> Result<(), CborError> {
    stack.clear();
    let mut reader = Reader { bytes, pos: 0 };
    let mut tagged = false;
    loop {
        let complete = match reader.head()? {
            Head::Tag(tag) => {
                visitor.tag(tag);
                tagged = true;
                continue;
            }
            Head::Break if tagged => {
                return Err(CborError::Malformed("a tag is followed by a break instead of an item"))
            }
            Head::Break => close_indefinite(stack, visitor)?,
            head => start_item(&mut reader, head, stack, visitor)?,
        };
        tagged = false;
        if complete && finish_item(stack, visitor) {
            break;
        }
    }
    if reader.pos == bytes.len() {
        Ok(())
    } else {
        Err(CborError::TrailingBytes)
    }
}

/// Handles an item's head (tags and breaks excluded). Returns true when the item is already complete,
/// false when it opened a container that is still being filled.
fn start_item<'a, V: Visitor<'a>>(
    reader: &mut Reader<'a>,
    head: Head,
    stack: &mut Vec<Frame<V::Frame>>,
    visitor: &mut V,
) -> Result<bool, CborError> {
    let item = match head {
        Head::Uint(n) => Item::Uint(n),
        Head::Nint(n) => Item::Nint(n),
        Head::Float(f) => Item::Float(f),
        Head::Simple(s) => Item::Simple(s),
        Head::Bytes(len) => Item::Bytes(reader.string(len, false)?),
        Head::Text(len) => Item::Text(reader.string(len, true)?),
        Head::Array(len) => return open(stack, visitor, false, len),
        Head::Map(len) => return open(stack, visitor, true, len),
        Head::Tag(_) | Head::Break => return Err(CborError::Malformed("unexpected tag or break")),
    };
    visitor.item(slot(stack), item)?;
    Ok(true)
}

/// Opens an array or map, within the depth limit. Returns true when it is empty and so already complete.
fn open<'a, V: Visitor<'a>>(
    stack: &mut Vec<Frame<V::Frame>>,
    visitor: &mut V,
    map: bool,
    len: Option<u64>,
) -> Result<bool, CborError> {
    if stack.len() >= MAX_DEPTH {
        return Err(CborError::TooDeep);
    }
    let data = visitor.open(slot(stack), map)?;
    if len == Some(0) {
        visitor.close(data, true);
        return Ok(true);
    }
    stack.push(Frame {
        left: len.unwrap_or(0),
        indefinite: len.is_none(),
        map,
        key_next: true,
        empty: true,
        data,
    });
    Ok(false)
}

/// Where the next item goes, from the top of the stack.
fn slot<F>(stack: &mut [Frame<F>]) -> Slot<'_, F> {
    match stack.last_mut() {
        None => Slot { role: Role::Top, first: true, parent: None },
        Some(frame) => Slot {
            role: match (frame.map, frame.key_next) {
                (false, _) => Role::Element,
                (true, true) => Role::Key,
                (true, false) => Role::Value,
            },
            first: frame.empty,
            parent: Some(&mut frame.data),
        },
    }
}

/// Handles a break: it must end an indefinite array, or an indefinite map between pairs.
/// Returns true: the container is a complete item.
fn close_indefinite<'a, V: Visitor<'a>>(
    stack: &mut Vec<Frame<V::Frame>>,
    visitor: &mut V,
) -> Result<bool, CborError> {
    match stack.last() {
        Some(top) if top.indefinite && (!top.map || top.key_next) => {}
        Some(top) if top.indefinite => {
            return Err(CborError::Malformed("a map ends after a key, without its value"))
        }
        _ => {
            return Err(CborError::Malformed(
                "a break appears outside an indefinite-length array, map or string",
            ))
        }
    }
    if let Some(frame) = stack.pop() {
        visitor.close(frame.data, frame.empty);
    }
    Ok(true)
}

/// Records that an item completed in the top container, closing every definite container this fills.
/// Returns true when the outermost item is complete.
fn finish_item<'a, V: Visitor<'a>>(stack: &mut Vec<Frame<V::Frame>>, visitor: &mut V) -> bool {
    while let Some(top) = stack.last_mut() {
        top.empty = false;
        if top.map {
            top.key_next = !top.key_next;
            if !top.key_next {
                return false;
            }
        }
        if top.indefinite {
            return false;
        }
        top.left = top.left.saturating_sub(1);
        if top.left > 0 {
            return false;
        }
        if let Some(frame) = stack.pop() {
            visitor.close(frame.data, false);
        }
    }
    true
}

/// An initial byte and its argument, decoded.
#[derive(Clone, Copy, Debug)]
enum Head {
    Uint(u64),
    Nint(u64),
    Bytes(Option<u64>),
    Text(Option<u64>),
    Array(Option<u64>),
    Map(Option<u64>),
    Tag(u64),
    Simple(u8),
    Float(f64),
    Break,
}

/// A cursor over the input; every read is bounds-checked and fails with `Truncated`.
///
/// Our own head parser rather than `ciborium-ll`'s `Decoder`: that decoder reads through
/// `ciborium_io::Read`, which copies every string out of the input, while the converter wants
/// slices of the record bytes (text is escaped straight from input to output, keys compared in place).
/// It also folds the reserved additional-information values into one opaque syntax error.
struct Reader<'a> {
    /// The whole input, so items can be handed out as slices of it.
    bytes: &'a [u8],
    /// Offset of the next unread byte; never past `bytes.len()`.
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: u64) -> Result<&'a [u8], CborError> {
        let taken = usize::try_from(len)
            .ok()
            .and_then(|len| self.bytes.get(self.pos..self.pos.checked_add(len)?))
            .ok_or(CborError::Truncated)?;
        self.pos += taken.len();
        Ok(taken)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], CborError> {
        let bytes = self.take(N as u64)?;
        bytes.try_into().map_err(|_| CborError::Truncated)
    }

    #[inline]
    fn head(&mut self) -> Result<Head, CborError> {
        let initial = *self.bytes.get(self.pos).ok_or(CborError::Truncated)?;
        self.pos += 1;
        let (major, info) = (initial >> 5, initial & 0x1f);
        let arg = match info {
            0..=23 => Some(u64::from(info)),
            24 => Some(u64::from(u8::from_be_bytes(self.array()?))),
            25 => Some(u64::from(u16::from_be_bytes(self.array()?))),
            26 => Some(u64::from(u32::from_be_bytes(self.array()?))),
            27 => Some(u64::from_be_bytes(self.array()?)),
            28..=30 => return Err(CborError::Malformed("reserved additional information value (28-30)")),
            _ => None,
        };
        match (major, arg) {
            (0, Some(n)) => Ok(Head::Uint(n)),
            (1, Some(n)) => Ok(Head::Nint(n)),
            (2, len) => Ok(Head::Bytes(len)),
            (3, len) => Ok(Head::Text(len)),
            (4, len) => Ok(Head::Array(len)),
            (5, len) => Ok(Head::Map(len)),
            (6, Some(n)) => Ok(Head::Tag(n)),
            (7, _) => simple_or_float(info, arg),
            _ => Err(CborError::Malformed("an integer or tag has indefinite length")),
        }
    }

    /// Reads a string's content after its head; `text` selects major type 3 and UTF-8 checks.
    #[inline]
    fn string(&mut self, len: Option<u64>, text: bool) -> Result<Str<'a>, CborError> {
        match len {
            Some(len) => {
                let bytes = self.take(len)?;
                check_text(bytes, text)?;
                Ok(Str::Whole(bytes))
            }
            None => self.chunks(text).map(Str::Chunked),
        }
    }

    fn chunks(&mut self, text: bool) -> Result<Chunks<'a>, CborError> {
        let start = self.pos;
        loop {
            let end = self.pos;
            let len = match self.head()? {
                Head::Break => break Ok(Chunks { rest: self.bytes.get(start..end).unwrap_or_default() }),
                Head::Text(Some(len)) if text => len,
                Head::Bytes(Some(len)) if !text => len,
                _ => {
                    break Err(CborError::Malformed(
                        "an indefinite-length string holds something other than definite-length chunks of its own type",
                    ))
                }
            };
            let chunk = self.take(len)?;
            check_text(chunk, text)?;
        }
    }
}

fn check_text(bytes: &[u8], text: bool) -> Result<(), CborError> {
    // Most text is ASCII, and the inlined ASCII test is cheaper than a call for short strings.
    if text && !bytes.is_ascii() && std::str::from_utf8(bytes).is_err() {
        return Err(CborError::InvalidUtf8);
    }
    Ok(())
}

fn simple_or_float(info: u8, arg: Option<u64>) -> Result<Head, CborError> {
    let Some(arg) = arg else {
        return Ok(Head::Break);
    };
    match info {
        0..=23 => Ok(Head::Simple(info)),
        24 => match u8::try_from(arg) {
            Ok(simple) if simple >= 32 => Ok(Head::Simple(simple)),
            _ => Err(CborError::Malformed("a two-byte simple value is below 32")),
        },
        25 => Ok(Head::Float(f16_to_f64(arg as u16))),
        26 => Ok(Head::Float(f64::from(f32::from_bits(arg as u32)))),
        _ => Ok(Head::Float(f64::from_bits(arg))),
    }
}

/// Widens an IEEE 754 half-precision value exactly (RFC 8949 Appendix D).
fn f16_to_f64(half: u16) -> f64 {
    let exponent = i32::from(half >> 10 & 0x1f);
    let mantissa = f64::from(half & 0x3ff);
    let magnitude = match exponent {
        0 => mantissa * 2f64.powi(-24),
        31 if mantissa == 0.0 => f64::INFINITY,
        31 => f64::NAN,
        _ => (mantissa + 1024.0) * 2f64.powi(exponent - 25),
    };
    if half & 0x8000 == 0 {
        magnitude
    } else {
        -magnitude
    }
}

/// The visitor behind `validate`: `walk` does all the checking.
struct Check;

impl Visitor<'_> for Check {
    type Frame = ();

    fn tag(&mut self, _: u64) {}

    fn item(&mut self, _: Slot<'_, ()>, _: Item<'_>) -> Result<(), CborError> {
        Ok(())
    }

    fn open(&mut self, _: Slot<'_, ()>, _: bool) -> Result<(), CborError> {
        Ok(())
    }

    fn close(&mut self, _: (), _: bool) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    fn check(s: &str) -> Result<(), CborError> {
        validate(&hex(s))
    }

    #[test]
    fn accepts_well_formed_items() {
        for ok in [
            "00",
            "3bffffffffffffffff",
            "f97e00",
            "fa47c35000",
            "5f42010243030405ff",
            "7f6161ff",
            "7fff",
            "9f01bf6161f5ffff",
            "a2016161026162",
            "c249010000000000000000",
            "d9d9f7a1616101",
            "f820",
            "f7",
            "9fff",
            "bfff",
            "80",
            "a0",
            "c1c2c3f6",
        ] {
            assert!(check(ok).is_ok(), "{ok}: {:?}", check(ok));
        }
    }

    #[test]
    fn rejects_reserved_additional_information() {
        for major in 0u8..8 {
            for info in 28u8..=30 {
                let byte = major << 5 | info;
                assert!(matches!(validate(&[byte]), Err(CborError::Malformed(_))), "{byte:#x}");
            }
        }
    }

    #[test]
    fn rejects_misplaced_indefinite_lengths_and_breaks() {
        for bad in ["1f", "3f", "df", "ff", "8201ff", "a1ff", "bf01ff", "c1ff", "9fc0ff"] {
            assert!(matches!(check(bad), Err(CborError::Malformed(_))), "{bad}: {:?}", check(bad));
        }
    }

    #[test]
    fn rejects_bad_chunks() {
        for bad in ["5f6161ff", "7f4161ff", "7f7f6161ffff", "5f01ff", "7f61c3ff"] {
            assert!(check(bad).is_err(), "{bad}");
        }
        assert!(matches!(check("7f61c3ff"), Err(CborError::InvalidUtf8)));
        assert!(matches!(check("7f6161"), Err(CborError::Truncated)));
    }

    #[test]
    fn rejects_short_simple_values() {
        assert!(matches!(check("f81f"), Err(CborError::Malformed(_))));
        assert!(matches!(check("f8"), Err(CborError::Truncated)));
    }

    #[test]
    fn lengths_past_the_end_are_truncation_not_allocation() {
        for bad in
            ["5bffffffffffffffff", "7b7fffffffffffffff00", "9bffffffffffffffff", "bbffffffffffffffff01"]
        {
            assert!(matches!(check(bad), Err(CborError::Truncated)), "{bad}");
        }
    }

    #[test]
    fn counts_trailing_bytes_and_truncation() {
        assert!(matches!(check("0101"), Err(CborError::TrailingBytes)));
        assert!(matches!(check(""), Err(CborError::Truncated)));
        assert!(matches!(check("8301"), Err(CborError::Truncated)));
        assert!(matches!(check("62c328"), Err(CborError::InvalidUtf8)));
    }

    #[test]
    fn depth_limit_is_exact_and_stack_safe() {
        let nested = |depth: usize| [vec![0x81; depth], vec![0x00]].concat();
        assert!(validate(&nested(MAX_DEPTH)).is_ok());
        assert!(matches!(validate(&nested(MAX_DEPTH + 1)), Err(CborError::TooDeep)));
        assert!(matches!(validate(&nested(100_000)), Err(CborError::TooDeep)));
        let tags = [vec![0xc6; 100_000], vec![0x00]].concat();
        assert!(validate(&tags).is_ok());
    }

    #[test]
    fn half_floats_widen_exactly() {
        assert_eq!(f16_to_f64(0x3e00), 1.5);
        assert_eq!(f16_to_f64(0x0001), 2f64.powi(-24));
        assert_eq!(f16_to_f64(0x7bff), 65504.0);
        assert_eq!(f16_to_f64(0xfc00), f64::NEG_INFINITY);
        assert!(f16_to_f64(0x7e00).is_nan());
    }

    #[test]
    fn chunks_read_back_every_piece() {
        let bytes = hex("5f42010243030405ff");
        let mut reader = Reader { bytes: &bytes, pos: 1 };
        let chunks = reader.chunks(false).unwrap();
        let pieces: Vec<&[u8]> = Str::Chunked(chunks).into_iter().collect();
        assert_eq!(pieces, [&[1u8, 2][..], &[3, 4, 5][..]]);
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..5000 {
            let len = (next() % 40) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let _ = validate(&bytes);
        }
    }
}
