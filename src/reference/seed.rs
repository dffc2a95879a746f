//! The demo data: a few collections of varied records (every CBOR kind the exports care about,
//! awkward record IDs, attachment links), generated deterministically so runs are comparable.

use bytes::Bytes;
use ciborium::Value;

use super::store::{attachment_link, CollectionId, Store};
use super::value::encode_cbor;

/// The token that opens `datasets/private:diary`, as a bearer token or `session` cookie.
pub const DEMO_TOKEN: &str = "demo-token";

/// Fills a store with the demo collections: `datasets/demo:animals` (~500 varied records,
/// written in five versions), `datasets/demo:signs` (~200, linking attachments),
/// `lenses/demo:word-index` (~300 small ones), `datasets/demo:empty` (exists, no records) and
/// `datasets/private:diary` (~20, protected with [`DEMO_TOKEN`]). Seeding twice changes nothing.
pub fn seed_demo(store: &Store) {
    let mut rng = SplitMix64(0x5eed_de30);
    seed_animals(store, &mut rng);
    let stills = seed_stills(store, &mut rng);
    seed_signs(store, &mut rng, &stills);
    seed_word_index(store, &mut rng);
    seed_empty(store);
    seed_diary(store, &mut rng);
}

/// A tiny, fixed pseudo-random generator (SplitMix64): the same demo (and benchmark data) on
/// every machine and every version of every crate.
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

const SPECIES: &[&str] = &[
    "aardvark", "badger", "capybara", "dingo", "eland", "fennec", "gecko", "heron", "ibis", "jackal",
    "kinkajou", "lemur", "marmot", "narwhal", "ocelot", "pangolin", "quokka", "raccoon", "serval", "tapir",
    "urial", "vicuña", "wombat", "xerus", "yak", "zebu",
];
const CONTINENTS: &[&str] = &["Africa", "Asia", "Europe", "North America", "Oceania", "South America"];
const CLIMATES: &[&str] = &["arid", "temperate", "tropical", "polar", "alpine"];
const FOODS: &[&str] = &["grass", "insects", "fish", "fruit", "roots", "seeds", "carrion", "leaves"];
/// IDs that test every path-encoding corner: non-ASCII, spaces, `/`, `%`, `+`, `?`, `#`.
const AWKWARD_IDS: &[&str] = &[
    "vicuña",
    "北极狐",
    "café au lait",
    "with space",
    "a/b",
    "100%",
    "50% off/sale",
    "1+1",
    "what?",
    "#hash",
    "emoji 🦔",
];

fn text(s: &str) -> Value {
    Value::Text(s.to_owned())
}

fn map(entries: Vec<(&str, Value)>) -> Value {
    Value::Map(entries.into_iter().map(|(k, v)| (text(k), v)).collect())
}

/// A date as CBOR tag 1 (epoch seconds), the way the exports expect dates.
fn date(epoch_seconds: u64) -> Value {
    Value::Tag(1, Box::new(epoch_seconds.into()))
}

fn seed_animals(store: &Store, rng: &mut SplitMix64) {
    let c = CollectionId::new("datasets", "demo", "animals");
    let mut ids: Vec<String> = (0..490).map(|i| format!("{}-{i:03}", SPECIES[i % SPECIES.len()])).collect();
    ids.extend(AWKWARD_IDS.iter().map(|id| id.to_string()));
    for batch in ids.chunks(100) {
        let changes = batch.iter().enumerate().map(|(i, id)| {
            let value = if i % 25 == 7 { odd_value(rng) } else { animal(id, rng) };
            (id.clone(), Some(encode_cbor(&value)))
        });
        store.write(&c, changes.collect());
    }
}

/// A typical record: text, integers, a float, a nested map, arrays, bytes and a date.
fn animal(id: &str, rng: &mut SplitMix64) -> Value {
    let species = id.split('-').next().unwrap_or(id);
    let diet = (0..1 + rng.below(3)).map(|_| text(rng.pick(FOODS))).collect();
    let markings = 8 + rng.below(24) as usize;
    map(vec![
        ("species", text(species)),
        ("legs", (rng.below(5) * 2).into()),
        ("weight_kg", Value::Float((rng.below(500_000) as f64) / 1000.0)),
        ("endangered", Value::Bool(rng.below(4) == 0)),
        (
            "habitat",
            map(vec![
                ("continent", text(rng.pick(CONTINENTS))),
                ("climate", text(rng.pick(CLIMATES))),
                ("elevation_m", (rng.below(6000) as i64 - 400).into()),
            ]),
        ),
        ("diet", Value::Array(diet)),
        ("markings", Value::Bytes(rng.bytes(markings))),
        ("first_described", date(1_500_000_000 + rng.below(200_000_000))),
        ("notes", Value::Null),
    ])
}

/// The occasional record that is not a map: the exports must take any CBOR item.
fn odd_value(rng: &mut SplitMix64) -> Value {
    match rng.below(6) {
        0 => text("just a sentence, no structure"),
        1 => Value::from(u64::MAX - rng.below(1000)),
        2 => Value::from(-(rng.below(1_000_000) as i64)),
        3 => Value::Float(-0.5 - rng.below(100) as f64),
        4 => Value::Array(vec![text("mixed"), 42.into(), Value::Bool(false), Value::Null]),
        _ => Value::Bytes(rng.bytes(16)),
    }
}

/// Stores twelve "images" of 2 KB to ~100 KB (a PNG signature, then noise); returns their links.
fn seed_stills(store: &Store, rng: &mut SplitMix64) -> Vec<String> {
    const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";
    (0..12)
        .map(|i| {
            let mut image = PNG_SIGNATURE.to_vec();
            image.extend(rng.bytes(2048 + i * 8900));
            let hex = store.add_attachment(Bytes::from(image), "image/png");
            attachment_link(&hex, "image/png")
        })
        .collect()
}

/// Signs link their stills from nested values; a few links use upper-case hex, a few are map keys.
fn seed_signs(store: &Store, rng: &mut SplitMix64, stills: &[String]) {
    let c = CollectionId::new("datasets", "demo", "signs");
    let changes = (0..200).map(|i| {
        let still = &stills[rng.below(stills.len() as u64) as usize];
        let still = if i % 40 == 3 { upper_hex(still) } else { still.clone() };
        let mut entries = vec![
            ("gloss", text(&word(i))),
            ("hand", text(rng.pick(&["left", "right", "both"]))),
            ("media", map(vec![("still", text(&still)), ("frames", frames(rng, stills))])),
        ];
        if i % 50 == 11 {
            let key = &stills[i % stills.len()];
            entries.push(("annotations", Value::Map(vec![(text(key), text("handshape"))])));
        }
        (format!("sign-{i:03}"), Some(encode_cbor(&map(entries))))
    });
    store.write(&c, changes.collect());
}

fn frames(rng: &mut SplitMix64, stills: &[String]) -> Value {
    let count = rng.below(3);
    let links = (0..count).map(|_| text(&stills[rng.below(stills.len() as u64) as usize]));
    Value::Array(links.collect())
}

/// The same link with its hex digits in upper case (the dataset server accepts both).
fn upper_hex(link: &str) -> String {
    let (hex, query) = link["hash://sha256/".len()..].split_at(64);
    format!("hash://sha256/{}{query}", hex.to_ascii_uppercase())
}

/// A made-up word, unique for every `i` below 1000.
fn word(i: usize) -> String {
    const SYLLABLES: [&str; 10] = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa"];
    [i % 10, (i / 10) % 10, (i / 100) % 10].iter().map(|&s| SYLLABLES[s]).collect()
}

fn seed_word_index(store: &Store, rng: &mut SplitMix64) {
    let c = CollectionId::new("lenses", "demo", "word-index");
    let changes = (0..300).map(|i| {
        let count = 1 + rng.below(3);
        let signs = (0..count).map(|_| text(&format!("sign-{:03}", rng.below(200)))).collect();
        let entry = map(vec![("count", rng.below(100).into()), ("signs", Value::Array(signs))]);
        (word(i), Some(encode_cbor(&entry)))
    });
    store.write(&c, changes.collect());
}

/// A collection that exists with no records: written once, then emptied.
fn seed_empty(store: &Store) {
    let c = CollectionId::new("datasets", "demo", "empty");
    if store.version(&c).is_none() {
        store.write(&c, vec![("placeholder".into(), Some(encode_cbor(&Value::Bool(true))))]);
        store.write(&c, vec![("placeholder".into(), None)]);
    }
}

fn seed_diary(store: &Store, rng: &mut SplitMix64) {
    let c = CollectionId::new("datasets", "private", "diary");
    store.protect(&c, Some(DEMO_TOKEN.to_owned()));
    let changes = (1..=20).map(|day| {
        let entry = map(vec![
            ("mood", text(rng.pick(&["calm", "busy", "curious", "tired"]))),
            ("entry", text(&format!("Day {day}: nothing anyone else needs to read."))),
            ("written", date(1_704_067_200 + day * 86_400)),
        ]);
        (format!("2024-01-{day:02}"), Some(encode_cbor(&entry)))
    });
    store.write(&c, changes.collect());
}
