//! The benchmark's records: about `size` bytes of CBOR each, a realistic mix of text, integers,
//! floats, booleans, nested maps, arrays and byte strings, generated the same on every run.

use bytes::Bytes;
use ciborium::Value;
use export_sidecar::reference::SplitMix64;

const WORDS: &[&str] = &[
    "river", "stone", "amber", "falcon", "meadow", "copper", "lantern", "harbor", "willow", "summit",
    "ember", "glacier", "orchard", "quartz", "thistle", "velvet",
];

/// `count` words picked by `mix`, joined by spaces.
fn words(mix: &mut SplitMix64, count: usize) -> String {
    let words: Vec<&str> = (0..count).map(|_| mix.pick(WORDS)).collect();
    words.join(" ")
}

fn text(key: &str) -> Value {
    Value::Text(key.to_owned())
}

/// Record `i` of a benchmark collection, about `size` bytes once encoded.
pub fn record(i: usize, size: usize) -> Bytes {
    let mut mix = SplitMix64(i as u64 ^ 0xbe4c_0000);
    let tags = (0..1 + mix.below(4)).map(|_| Value::Text(words(&mut mix, 1))).collect();
    let readings = (0..4).map(|_| Value::Float(mix.below(100_000) as f64 / 100.0)).collect();
    let address = Value::Map(vec![
        (text("street"), Value::Text(format!("{} {} road", mix.below(999), words(&mut mix, 1)))),
        (text("city"), Value::Text(words(&mut mix, 2))),
        (
            text("geo"),
            Value::Map(vec![
                (text("lat"), Value::Float(mix.below(18_000) as f64 / 100.0 - 90.0)),
                (text("lon"), Value::Float(mix.below(36_000) as f64 / 100.0 - 180.0)),
            ]),
        ),
    ]);
    let mut fields = vec![
        (text("id"), Value::Integer((i as u64).into())),
        (text("name"), Value::Text(words(&mut mix, 3))),
        (text("active"), Value::Bool(mix.below(2) == 0)),
        (text("count"), Value::Integer((mix.below(1 << 40) as i64 - (1 << 39)).into())),
        (text("score"), Value::Float(mix.below(1_000_000) as f64 / 1000.0)),
        (text("tags"), Value::Array(tags)),
        (text("address"), address),
        (text("readings"), Value::Array(readings)),
        (text("checksum"), Value::Bytes((0..32).map(|_| mix.next_u64() as u8).collect())),
    ];
    let mut encoded = encode(&Value::Map(fields.clone()));
    if encoded.len() < size {
        // The rest is prose and a thumbnail-like byte string, as records with a description do.
        let room = size - encoded.len();
        let count = room * 2 / 3 / 7;
        fields.push((text("description"), Value::Text(words(&mut mix, count.max(1)))));
        let used = encode(&Value::Map(fields.clone())).len();
        let blob = size.saturating_sub(used + 12);
        fields.push((text("thumbnail"), Value::Bytes((0..blob).map(|_| mix.next_u64() as u8).collect())));
        encoded = encode(&Value::Map(fields));
    }
    Bytes::from(encoded)
}

fn encode(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).expect("encoding into memory cannot fail");
    out
}

/// Attachment `i`: `len` pseudo-random bytes, as incompressible as photos and video.
pub fn blob(i: usize, len: usize) -> Bytes {
    let mut mix = SplitMix64(i as u64 ^ 0xb10b_0000);
    let mut bytes = Vec::with_capacity(len + 8);
    while bytes.len() < len {
        bytes.extend_from_slice(&mix.next_u64().to_le_bytes());
    }
    bytes.truncate(len);
    Bytes::from(bytes)
}

/// The recordID of record `i`: fixed width, so recordID order is generation order.
pub fn record_id(i: usize) -> String {
    format!("rec-{i:07}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn records_come_out_near_the_asked_size() {
        for size in [300, 1000, 4000] {
            let len = super::record(7, size).len();
            assert!(len.abs_diff(size) < size / 10 + 40, "{size}: {len}");
        }
    }
}
