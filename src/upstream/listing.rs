//! The U1 listing's wire form: a map recordID → `{version, …}` in CBOR (or JSON when the server
//! prefers it), decoded straight into sorted entries with no tree in between.

use super::{ListingEntry, UpstreamError};
use crate::codec::cbor::{self, CborError, Item, Role, Slot, Str, Visitor};
use serde::de::{DeserializeSeed, Deserializer, MapAccess};
use serde::Deserialize;
use std::fmt;

/// The fewest bytes one entry takes on the wire (CBOR: an empty text key, a one-pair map,
/// `"version"`, a one-byte integer; JSON takes more). A listing's claimed count is the server's
/// word: a few bytes can claim 2^64 entries, so no more than the body can hold is reserved.
const MIN_ENTRY_BYTES: usize = 11;

/// Decodes a listing body and sorts it by recordID (byte order).
pub fn parse_listing(body: &[u8], is_json: bool) -> Result<Vec<ListingEntry>, UpstreamError> {
    let most_entries = body.len() / MIN_ENTRY_BYTES;
    let parsed = match is_json {
        true => parse_json(body, most_entries),
        false => parse_cbor(body, most_entries),
    };
    let mut entries = parsed.map_err(|e| {
        UpstreamError::Protocol(format!("the listing is not a map of recordID to {{version}}: {e}"))
    })?;
    entries.sort_unstable_by(|a, b| a.id.cmp(&b.id));
    if let Some(pair) = entries.windows(2).find(|pair| pair[0].id == pair[1].id) {
        return Err(UpstreamError::Protocol(format!("the listing names record {:?} twice", pair[0].id)));
    }
    if entries.first().is_some_and(|e| e.id.is_empty()) {
        return Err(UpstreamError::Protocol(
            "the listing holds a record with an empty ID, which no record URL can address".into(),
        ));
    }
    Ok(entries)
}

/// CBOR through the codec's walker, which checks well-formedness as it goes. The entries are
/// reserved once from the map's count: growing by doubling held two copies at the last step
/// (75 MB at a million records).
fn parse_cbor(body: &[u8], most_entries: usize) -> Result<Vec<ListingEntry>, String> {
    let claimed = match ciborium_ll::Decoder::from(body).pull() {
        Ok(ciborium_ll::Header::Map(Some(count))) => count,
        _ => 0,
    };
    let mut collector = Collector {
        entries: Vec::with_capacity(claimed.min(most_entries)),
        id: None,
        version: None,
        version_next: false,
        refused: None,
    };
    let walked = cbor::walk(body, &mut collector, &mut Vec::new());
    match (collector.refused, walked) {
        (Some(why), _) => Err(why),
        (None, Ok(())) => Ok(collector.entries),
        (None, Err(CborError::TrailingBytes)) => Err("bytes follow the map".to_owned()),
        (None, Err(e)) => Err(e.to_string()),
    }
}

/// Where an open container sits: the listing map, one record's metadata, or deeper.
enum Level {
    Listing,
    Meta,
    Deeper,
}

/// Collects entries as the walker reports items; `refused` says why it stopped the walk.
struct Collector {
    entries: Vec<ListingEntry>,
    /// The recordID whose metadata is being read.
    id: Option<String>,
    version: Option<String>,
    /// The metadata key just read was `version`.
    version_next: bool,
    refused: Option<String>,
}

impl Collector {
    fn refuse(&mut self, why: String) -> CborError {
        self.refused = Some(why);
        CborError::Malformed("listing refused")
    }
}

impl<'a> Visitor<'a> for Collector {
    type Frame = Level;

    fn tag(&mut self, _: u64) {}

    fn item(&mut self, slot: Slot<'_, Level>, item: Item<'a>) -> Result<(), CborError> {
        match (slot.parent, slot.role, item) {
            (Some(Level::Listing), Role::Key, Item::Text(id)) => {
                self.id = Some(text(id));
                Ok(())
            }
            (Some(Level::Listing), Role::Key, _) => Err(self.refuse("a recordID is not text".into())),
            (Some(Level::Listing), _, _) => Err(self.refuse("a record's metadata is not a map".into())),
            (None, _, _) => Err(self.refuse("the listing is not a map".into())),
            (Some(Level::Meta), Role::Key, item) => {
                self.version_next = matches!(item, Item::Text(key) if text_is(key, "version"));
                Ok(())
            }
            (Some(Level::Meta), _, item) if self.version_next => {
                self.version_next = false;
                self.version = Some(match item {
                    Item::Text(version) => text(version),
                    Item::Uint(n) => n.to_string(),
                    Item::Nint(n) => format!("-{}", u128::from(n) + 1),
                    _ => return Err(self.refuse("a version is not text or an integer".into())),
                });
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn open(&mut self, slot: Slot<'_, Level>, map: bool) -> Result<Level, CborError> {
        match (slot.parent, slot.role) {
            (None, _) if map => Ok(Level::Listing),
            (None, _) => Err(self.refuse("the listing is not a map".into())),
            (Some(Level::Listing), Role::Value) if map => {
                self.version = None;
                self.version_next = false;
                Ok(Level::Meta)
            }
            (Some(Level::Listing), Role::Value) => {
                Err(self.refuse("a record's metadata is not a map".into()))
            }
            (Some(Level::Listing), _) => Err(self.refuse("a recordID is not text".into())),
            (Some(Level::Meta), Role::Value) if self.version_next => {
                Err(self.refuse("a version is not text or an integer".into()))
            }
            (Some(_), _) => Ok(Level::Deeper),
        }
    }

    fn close(&mut self, frame: Level, _: bool) {
        if let Level::Meta = frame {
            match (self.id.take(), self.version.take()) {
                (Some(id), Some(version)) => self.entries.push(ListingEntry { id, version }),
                (id, None) => {
                    let id = id.unwrap_or_default();
                    self.refused.get_or_insert_with(|| format!("record {id:?} has no version"));
                }
                (None, Some(_)) => {}
            }
        }
    }
}

/// A text string's content; the walker has checked it is UTF-8.
fn text(s: Str<'_>) -> String {
    let mut out = Vec::new();
    for chunk in s {
        out.extend_from_slice(chunk);
    }
    String::from_utf8(out).unwrap_or_default()
}

fn text_is(s: Str<'_>, want: &str) -> bool {
    match s {
        Str::Whole(bytes) => bytes == want.as_bytes(),
        chunked => text(chunked) == want,
    }
}

/// JSON through serde, reserving as the CBOR path does.
fn parse_json(body: &[u8], most_entries: usize) -> Result<Vec<ListingEntry>, String> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let entries = ListingSeed { most_entries }.deserialize(&mut de).map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    Ok(entries)
}

struct ListingSeed {
    most_entries: usize,
}

impl<'de> DeserializeSeed<'de> for ListingSeed {
    type Value = Vec<ListingEntry>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for ListingSeed {
    type Value = Vec<ListingEntry>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a map of recordID to {version}")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Vec<ListingEntry>, A::Error> {
        let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0).min(self.most_entries));
        while let Some(id) = map.next_key::<String>()? {
            let meta: RecordMeta = map.next_value()?;
            entries.push(ListingEntry { id, version: meta.version });
        }
        Ok(entries)
    }
}

/// One record's JSON metadata; fields other than `version` are ignored.
#[derive(serde::Deserialize)]
struct RecordMeta {
    #[serde(deserialize_with = "version_text")]
    version: String,
}

/// A version as text, whether the server sent text or an integer.
fn version_text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Version {
        Text(String),
        Unsigned(u64),
        Signed(i64),
    }
    Ok(match Version::deserialize(deserializer)? {
        Version::Text(text) => text,
        Version::Unsigned(n) => n.to_string(),
        Version::Signed(n) => n.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cbor(value: &ciborium::Value) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(value, &mut out).expect("encode");
        out
    }

    fn entry(id: &str, version: ciborium::Value) -> (ciborium::Value, ciborium::Value) {
        let meta = ciborium::Value::Map(vec![
            ("version".into(), version),
            ("hash".into(), ciborium::Value::Bytes(vec![1, 2])),
        ]);
        (id.into(), meta)
    }

    #[test]
    fn listing_is_sorted_by_byte_order_and_versions_become_text() {
        let body = cbor(&ciborium::Value::Map(vec![
            entry("b", 7.into()),
            entry("é", "x1".into()),
            entry("B", 3.into()),
        ]));
        let entries = parse_listing(&body, false).expect("parses");
        let ids: Vec<_> = entries.iter().map(|e| (e.id.as_str(), e.version.as_str())).collect();
        assert_eq!(ids, [("B", "3"), ("b", "7"), ("é", "x1")]);
    }

    #[test]
    fn json_listing_parses_too() {
        let entries = parse_listing(br#"{"a":{"version":"1"}}"#, true).expect("parses");
        assert_eq!(entries, [ListingEntry { id: "a".into(), version: "1".into() }]);
    }

    #[test]
    fn not_a_map_is_a_protocol_error() {
        let body = cbor(&ciborium::Value::Array(vec![]));
        assert!(matches!(parse_listing(&body, false), Err(UpstreamError::Protocol(_))));
        let body = cbor(&ciborium::Value::Map(vec![(1.into(), 2.into())]));
        assert!(matches!(parse_listing(&body, false), Err(UpstreamError::Protocol(_))));
    }

    #[test]
    fn decode_errors_read_plainly() {
        let body = cbor(&ciborium::Value::Array(vec![]));
        let err = parse_listing(&body, false).unwrap_err().to_string();
        assert!(!err.contains("Semantic("), "{err}");
    }

    #[test]
    fn bytes_after_the_listing_map_are_refused() {
        let mut body = cbor(&ciborium::Value::Map(vec![entry("a", 1.into())])).to_vec();
        assert!(parse_listing(&body, false).is_ok());
        body.push(0x01);
        let err = parse_listing(&body, false).unwrap_err().to_string();
        assert!(err.contains("bytes follow the map"), "{err}");
    }

    #[test]
    fn a_map_claiming_more_entries_than_it_holds_is_refused() {
        // A map head claiming 2^64 - 1 entries, then nothing.
        let body = [0xbb, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(parse_listing(&body, false), Err(UpstreamError::Protocol(_))));
    }

    #[test]
    fn empty_record_id_is_refused() {
        let body = cbor(&ciborium::Value::Map(vec![entry("", 1.into())]));
        let err = parse_listing(&body, false).unwrap_err().to_string();
        assert!(err.contains("empty ID"), "{err}");
    }

    #[test]
    fn metadata_may_hold_anything_and_versions_may_be_negative() {
        // {"a": {"x": [1, {"version": 2}], "version": -5}, (_ "b", "c"): {(_ "ver", "sion"): "v"}}
        let body = [
            0xa2, 0x61, b'a', 0xa2, 0x61, b'x', 0x82, 0x01, 0xa1, 0x67, b'v', b'e', b'r', b's', b'i', b'o',
            b'n', 0x02, 0x67, b'v', b'e', b'r', b's', b'i', b'o', b'n', 0x24, 0x7f, 0x61, b'b', 0x61, b'c',
            0xff, 0xa1, 0x7f, 0x63, b'v', b'e', b'r', 0x64, b's', b'i', b'o', b'n', 0xff, 0x61, b'v',
        ];
        let entries = parse_listing(&body, false).expect("parses");
        let pairs: Vec<_> = entries.iter().map(|e| (e.id.as_str(), e.version.as_str())).collect();
        assert_eq!(pairs, [("a", "-5"), ("bc", "v")]);
    }

    #[test]
    fn a_record_without_a_usable_version_is_refused() {
        let body = cbor(&ciborium::Value::Map(vec![(
            "a".into(),
            ciborium::Value::Map(vec![("hash".into(), 1.into())]),
        )]));
        let err = parse_listing(&body, false).unwrap_err().to_string();
        assert!(err.contains("\"a\" has no version"), "{err}");
        for version in [ciborium::Value::Float(1.5), ciborium::Value::Array(vec![])] {
            let body = cbor(&ciborium::Value::Map(vec![entry("a", version)]));
            let err = parse_listing(&body, false).unwrap_err().to_string();
            assert!(err.contains("not text or an integer"), "{err}");
        }
    }

    #[test]
    fn entries_are_reserved_once_at_the_claimed_count() {
        let body =
            cbor(&ciborium::Value::Map((0..1000).map(|i| entry(&format!("r{i:04}"), i.into())).collect()));
        let entries = parse_listing(&body, false).expect("parses");
        assert_eq!((entries.len(), entries.capacity()), (1000, 1000));
    }
}
