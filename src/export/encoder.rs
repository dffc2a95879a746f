//! Framing of records in the three export encodings: CBOR sequence, one JSON object, JSON lines.
//! Record values arrive as upstream CBOR bytes; CBOR output copies them, JSON output converts.

use super::route::Encoding;
use crate::codec::cbor::{self, CborError};
use crate::codec::json::{write_json_string, JsonConverter, JsonStyle};
use std::ops::Range;

/// Writes one export's records, in order, into caller-owned buffers.
pub struct RecordEncoder {
    encoding: Encoding,
    /// Reused across records so steady-state conversion allocates nothing.
    json: JsonConverter,
    /// Records written so far; the JSON object needs it to place commas.
    written: u64,
}

impl RecordEncoder {
    pub fn new(encoding: Encoding) -> RecordEncoder {
        RecordEncoder { encoding, json: JsonConverter::new(), written: 0 }
    }

    pub fn records_written(&self) -> u64 {
        self.written
    }

    /// What comes before the first record.
    pub fn begin(&mut self, out: &mut Vec<u8>) {
        if self.encoding == Encoding::Json {
            out.push(b'{');
        }
    }

    /// Appends one record from U2's CBOR, checking it (and converting it for JSON). Returns where
    /// the value's encoded form sits in `out`, so it can be kept for the next export. On error,
    /// `out` may hold a partial record (the export is abandoned anyway).
    pub fn record(&mut self, id: &str, cbor: &[u8], out: &mut Vec<u8>) -> Result<Range<usize>, CborError> {
        if self.encoding == Encoding::Cbor {
            cbor::validate(cbor)?;
        }
        self.frame(id, out, |json, out| match json {
            Some(converter) => converter.convert(cbor, JsonStyle::Compact, out),
            None => {
                out.extend_from_slice(cbor);
                Ok(())
            }
        })
    }

    /// Appends one record whose value is already in this encoding's form: checked CBOR, or
    /// compact JSON converted by an earlier export.
    pub fn encoded(&mut self, id: &str, value: &[u8], out: &mut Vec<u8>) {
        let copied: Result<_, CborError> = self.frame(id, out, |_, out| {
            out.extend_from_slice(value);
            Ok(())
        });
        debug_assert!(copied.is_ok(), "copying cannot fail");
    }

    /// Writes the framing of one record around `value`, which writes the value itself (given
    /// the JSON converter when the encoding is JSON).
    fn frame(
        &mut self,
        id: &str,
        out: &mut Vec<u8>,
        value: impl FnOnce(Option<&mut JsonConverter>, &mut Vec<u8>) -> Result<(), CborError>,
    ) -> Result<Range<usize>, CborError> {
        let start;
        match self.encoding {
            Encoding::Cbor => {
                out.push(0x82);
                write_cbor_text(id, out);
                start = out.len();
                value(None, out)?;
            }
            Encoding::Json => {
                if self.written > 0 {
                    out.push(b',');
                }
                write_json_string(id, out);
                out.push(b':');
                start = out.len();
                value(Some(&mut self.json), out)?;
            }
            Encoding::JsonLines => {
                out.push(b'[');
                write_json_string(id, out);
                out.push(b',');
                start = out.len();
                value(Some(&mut self.json), out)?;
            }
        }
        let end = out.len();
        if self.encoding == Encoding::JsonLines {
            out.extend_from_slice(b"]\n");
        }
        self.written += 1;
        Ok(start..end)
    }

    /// Appends a tombstone: the record existed at the client's version and is gone now.
    /// CBOR says so with `undefined`, JSON with `null` (the dataset server stores no nulls).
    pub fn tombstone(&mut self, id: &str, out: &mut Vec<u8>) {
        let marker: &[u8] = if self.encoding == Encoding::Cbor { &[0xf7] } else { b"null" };
        self.encoded(id, marker, out);
    }

    /// What comes after the last record.
    pub fn end(&mut self, out: &mut Vec<u8>) {
        if self.encoding == Encoding::Json {
            out.extend_from_slice(b"}\n");
        }
    }
}

/// A CBOR text string head (major type 3) followed by the text.
fn write_cbor_text(text: &str, out: &mut Vec<u8>) {
    let len = text.len() as u64;
    const MAJOR_TEXT: u8 = 3 << 5;
    match len {
        0..=23 => out.push(MAJOR_TEXT | len as u8),
        24..=0xff => out.extend_from_slice(&[MAJOR_TEXT | 24, len as u8]),
        0x100..=0xffff => {
            out.push(MAJOR_TEXT | 25);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(MAJOR_TEXT | 26);
            out.extend_from_slice(&(len as u32).to_be_bytes());
        }
        _ => {
            out.push(MAJOR_TEXT | 27);
            out.extend_from_slice(&len.to_be_bytes());
        }
    }
    out.extend_from_slice(text.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export(encoding: Encoding, records: &[(&str, &[u8])]) -> Vec<u8> {
        let mut encoder = RecordEncoder::new(encoding);
        let mut out = Vec::new();
        encoder.begin(&mut out);
        for (id, value) in records {
            encoder.record(id, value, &mut out).expect("valid record");
        }
        encoder.end(&mut out);
        out
    }

    #[test]
    fn cbor_text_heads_match_ciborium() {
        for len in [0usize, 23, 24, 255, 256, 65_535, 65_536] {
            let text = "x".repeat(len);
            let mut ours = Vec::new();
            write_cbor_text(&text, &mut ours);
            let mut reference = Vec::new();
            ciborium::into_writer(&text, &mut reference).expect("encode");
            assert_eq!(ours, reference, "length {len}");
        }
    }

    #[test]
    fn cbor_sequence_copies_values_verbatim() {
        // A value ciborium would re-encode differently (non-shortest integer head).
        let value: &[u8] = &[0x18, 0x01];
        let out = export(Encoding::Cbor, &[("a", value)]);
        assert_eq!(out, [0x82, 0x61, b'a', 0x18, 0x01]);
    }

    #[test]
    fn json_object_and_lines() {
        let one: &[u8] = &[0x01];
        let list: &[u8] = &[0x82, 0xf5, 0xf6];
        assert_eq!(export(Encoding::Json, &[]), b"{}\n");
        assert_eq!(export(Encoding::Json, &[("a", one), ("b", list)]), b"{\"a\":1,\"b\":[true,null]}\n");
        assert_eq!(
            export(Encoding::JsonLines, &[("a\u{2028}", one), ("b", list)]),
            b"[\"a\\u2028\",1]\n[\"b\",[true,null]]\n"
        );
    }

    #[test]
    fn a_kept_value_writes_the_same_record_again() {
        let value: &[u8] = &[0xa1, 0x61, b'k', 0x82, 0x01, 0xf4];
        for encoding in [Encoding::Cbor, Encoding::Json, Encoding::JsonLines] {
            let mut first = RecordEncoder::new(encoding);
            let mut converted = Vec::new();
            first.begin(&mut converted);
            let range = first.record("id", value, &mut converted).expect("valid");
            let kept = converted[range].to_vec();
            let mut second = RecordEncoder::new(encoding);
            let mut again = Vec::new();
            second.begin(&mut again);
            second.encoded("id", &kept, &mut again);
            assert_eq!(again, converted, "{encoding:?}");
            let expected: &[u8] = if encoding == Encoding::Cbor { value } else { b"{\"k\":[1,false]}" };
            assert_eq!(kept, expected, "{encoding:?}");
        }
    }

    #[test]
    fn tombstones() {
        let mut out = Vec::new();
        let mut encoder = RecordEncoder::new(Encoding::Cbor);
        encoder.tombstone("a", &mut out);
        assert_eq!(out, [0x82, 0x61, b'a', 0xf7]);
        for (encoding, expected) in [
            (Encoding::Json, &b"{\"a\":1,\"b\":null}\n"[..]),
            (Encoding::JsonLines, &b"[\"a\",1]\n[\"b\",null]\n"[..]),
        ] {
            let mut encoder = RecordEncoder::new(encoding);
            let mut out = Vec::new();
            encoder.begin(&mut out);
            encoder.record("a", &[0x01], &mut out).expect("valid");
            encoder.tombstone("b", &mut out);
            encoder.end(&mut out);
            assert_eq!(out, expected);
        }
    }

    #[test]
    fn malformed_value_is_refused_in_every_encoding() {
        for encoding in [Encoding::Cbor, Encoding::Json, Encoding::JsonLines] {
            let mut encoder = RecordEncoder::new(encoding);
            let mut out = Vec::new();
            assert!(encoder.record("a", &[0x82, 0x01], &mut out).is_err(), "{encoding:?}");
            assert_eq!(encoder.records_written(), 0);
        }
    }
}
