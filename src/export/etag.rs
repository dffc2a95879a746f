//! Strong entity tags for exports: one per (collection, version, encoding, sync point, coding),
//! so a client holding the same export gets a 304 without any record being fetched.

use super::body::ContentCoding;
use super::route::{Encoding, Since};
use crate::collection::Collection;
use sha2::{Digest, Sha256};

/// The tag of one export representation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportTag(String);

impl ExportTag {
    pub fn new(
        collection: &Collection,
        version: &str,
        encoding: Encoding,
        since: Option<&Since>,
        coding: ContentCoding,
    ) -> ExportTag {
        let (since_kind, since_version) = match since {
            None => ("full", ""),
            Some(Since::After(v)) => ("after", v.as_str()),
            Some(Since::At(v)) => ("at", v.as_str()),
        };
        let mut hash = Sha256::new();
        // Length-prefixed parts, so no two different inputs concatenate to the same bytes.
        for part in [
            collection.realm.as_str(),
            &collection.user,
            &collection.name,
            version,
            encoding.as_str(),
            since_kind,
            since_version,
            coding.header_value().unwrap_or("identity"),
        ] {
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part.as_bytes());
        }
        let digest = hash.finalize();
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        ExportTag(format!("\"{hex}\""))
    }

    /// The `ETag` header value, quotes included.
    pub fn header_value(&self) -> &str {
        &self.0
    }

    /// Whether an `If-None-Match` value names this tag. That header uses weak comparison, so
    /// a `W/` prefix is ignored; `*` matches any current representation.
    pub fn matches(&self, if_none_match: Option<&str>) -> bool {
        let Some(header) = if_none_match else {
            return false;
        };
        header
            .split(',')
            .map(str::trim)
            .any(|candidate| candidate == "*" || candidate.strip_prefix("W/").unwrap_or(candidate) == self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collection::Realm;

    fn tag(version: &str, encoding: Encoding, since: Option<&Since>, coding: ContentCoding) -> ExportTag {
        let c = Collection { realm: Realm::Datasets, user: "u".into(), name: "n".into() };
        ExportTag::new(&c, version, encoding, since, coding)
    }

    #[test]
    fn every_part_changes_the_tag() {
        let base = tag("1", Encoding::Json, None, ContentCoding::Identity);
        assert_eq!(base, tag("1", Encoding::Json, None, ContentCoding::Identity));
        assert_ne!(base, tag("2", Encoding::Json, None, ContentCoding::Identity));
        assert_ne!(base, tag("1", Encoding::Cbor, None, ContentCoding::Identity));
        assert_ne!(base, tag("1", Encoding::Json, None, ContentCoding::Gzip));
        let after = Since::After("1".into());
        let at = Since::At("1".into());
        assert_ne!(base, tag("1", Encoding::Json, Some(&after), ContentCoding::Identity));
        assert_ne!(
            tag("1", Encoding::Json, Some(&after), ContentCoding::Identity),
            tag("1", Encoding::Json, Some(&at), ContentCoding::Identity)
        );
    }

    #[test]
    fn if_none_match_forms() {
        let t = tag("1", Encoding::Json, None, ContentCoding::Identity);
        let value = t.header_value().to_owned();
        assert!(t.matches(Some(&value)));
        assert!(t.matches(Some(&format!("W/{value}"))));
        assert!(t.matches(Some(&format!("\"other\", {value}"))));
        assert!(t.matches(Some("*")));
        assert!(!t.matches(Some("\"other\"")));
        assert!(!t.matches(None));
    }
}
