//! Names of collections and records, and how they are spelled in upstream URLs.
//! Every path the sidecar sends upstream is built here, so no name reaches a URL unescaped.

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use std::fmt;

/// Bytes JavaScript's `encodeURIComponent` leaves alone; everything else is escaped.
/// The dataset server decodes names this way, so sending them this way round-trips any string.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'!')
    .remove(b'~')
    .remove(b'*')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')');

/// The two kinds of collection a dataset server holds; anything else is not a collection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Realm {
    Datasets,
    Lenses,
}

impl Realm {
    pub fn parse(s: &str) -> Option<Realm> {
        match s {
            "datasets" => Some(Realm::Datasets),
            "lenses" => Some(Realm::Lenses),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Realm::Datasets => "datasets",
            Realm::Lenses => "lenses",
        }
    }
}

/// One collection: realm, owner and name, held decoded (as the user meant them).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Collection {
    pub realm: Realm,
    pub user: String,
    pub name: String,
}

impl Collection {
    /// Upstream path of the listing (U1): `/{realm}/{user}:{name}/records/`.
    pub fn listing_path(&self) -> String {
        format!(
            "/{}/{}:{}/records/",
            self.realm.as_str(),
            encode_component(&self.user),
            encode_component(&self.name)
        )
    }

    /// Upstream path of one record (U2). The listing path plus the escaped recordID.
    pub fn record_path(&self, id: &str) -> String {
        let mut path = self.listing_path();
        path.push_str(&encode_component(id));
        path
    }
}

impl fmt::Display for Collection {
    /// The form operators read in logs: `datasets/user:name`, unescaped.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}:{}", self.realm.as_str(), self.user, self.name)
    }
}

/// `encodeURIComponent`, except that `.` and `..` become `%2E` and `%2E%2E`: HTTP stacks
/// remove dot segments, which would turn a record's URL into its parent's.
pub fn encode_component(s: &str) -> String {
    match s {
        "." => "%2E".to_owned(),
        ".." => "%2E%2E".to_owned(),
        _ => utf8_percent_encode(s, COMPONENT).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_like_encode_uri_component() {
        assert_eq!(encode_component("a/b c%é"), "a%2Fb%20c%25%C3%A9");
        assert_eq!(encode_component("-_.!~*'()"), "-_.!~*'()");
        assert_eq!(encode_component("?#&=+:@"), "%3F%23%26%3D%2B%3A%40");
    }

    #[test]
    fn dot_segments_are_escaped() {
        assert_eq!(encode_component("."), "%2E");
        assert_eq!(encode_component(".."), "%2E%2E");
        assert_eq!(encode_component("..."), "...");
    }

    #[test]
    fn record_path_escapes_every_part() {
        let c = Collection { realm: Realm::Lenses, user: "a:b".into(), name: "n/m".into() };
        assert_eq!(c.record_path(".."), "/lenses/a%3Ab:n%2Fm/records/%2E%2E");
        assert_eq!(c.to_string(), "lenses/a:b:n/m");
    }
}
