//! Turns an `/export/...` request line into what to export and how, or a client error.
//! Names are split before they are percent-decoded, so an escaped `:` or `/` stays in its name.

use crate::collection::{Collection, Realm};
use crate::error::ApiError;
use percent_encoding::percent_decode_str;

/// The path prefix the sidecar answers itself; everything else is passed through.
pub const PREFIX: &str = "/export/";

/// Longest request path accepted; far above any real collection name.
const MAX_PATH: usize = 8 * 1024;

/// A parsed export request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRequest {
    pub collection: Collection,
    pub kind: ExportKind,
}

/// What the client asked for under the collection's path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportKind {
    Records {
        encoding: Encoding,
        since: Option<Since>,
    },
    /// `attachments`: also every blob the records link (`?attachments=true`).
    Zip {
        attachments: bool,
    },
    EventStream,
}

/// The three record encodings of a plain export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Cbor,
    Json,
    JsonLines,
}

impl Encoding {
    fn parse(s: &str) -> Option<Encoding> {
        match s {
            "cbor" => Some(Encoding::Cbor),
            "json" => Some(Encoding::Json),
            "json-lines" => Some(Encoding::JsonLines),
            _ => None,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Encoding::Cbor => "application/cbor-seq",
            Encoding::Json => "application/json",
            Encoding::JsonLines => "application/x-ndjson",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Cbor => "cbor",
            Encoding::Json => "json",
            Encoding::JsonLines => "json-lines",
        }
    }
}

/// A pull-sync starting point: changes after version V, or changes in and after V.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Since {
    After(String),
    At(String),
}

/// True when the sidecar answers this path itself.
pub fn is_export_path(path: &str) -> bool {
    path.starts_with(PREFIX) || path == "/export"
}

/// The `route` label of the request metrics, from the path alone, so requests that fail to
/// parse are counted under the API they were meant for.
pub fn label(path: &str) -> &'static str {
    if !is_export_path(path) {
        return "passthrough";
    }
    match path.rsplit('/').next() {
        Some("zip") => "export-zip",
        Some("event-stream") => "export-events",
        _ => "export-records",
    }
}

/// Parses the path (still percent-encoded) and the raw query string.
pub fn parse(path: &str, query: Option<&str>) -> Result<ExportRequest, ApiError> {
    if path.len() > MAX_PATH {
        return Err(ApiError::new(414, "path_too_long", "the request path is too long"));
    }
    let rest = path.strip_prefix(PREFIX).ok_or_else(usage_not_found)?;
    let segments: Vec<&str> = rest.split('/').collect();
    let (realm, owner_name, tail) = match segments.as_slice() {
        [realm, owner_name] => (*realm, *owner_name, None),
        [realm, owner_name, tail] => (*realm, *owner_name, Some(*tail)),
        _ => return Err(usage_not_found()),
    };
    let realm = Realm::parse(&decode(realm, "realm")?)
        .ok_or_else(|| ApiError::not_found("no such realm: use /export/datasets/… or /export/lenses/…"))?;
    let collection = parse_collection(realm, owner_name)?;
    let params = QueryParams::parse(query.unwrap_or(""))?;
    let tail = tail.map(|t| decode(t, "path")).transpose()?;
    let kind = match tail.as_deref() {
        None => ExportKind::Records { encoding: params.encoding()?, since: params.since()? },
        Some("zip") => {
            params.refuse_sync(
                "a zip archive always holds the whole collection; sync with ?encoding=…&after=",
            )?;
            ExportKind::Zip { attachments: params.attachments()? }
        }
        Some("event-stream") => {
            params.refuse_sync("an event stream resumes from Last-Event-ID or ?last_event_id=")?;
            ExportKind::EventStream
        }
        Some(_) => return Err(usage_not_found()),
    };
    Ok(ExportRequest { collection, kind })
}

fn usage_not_found() -> ApiError {
    ApiError::not_found("export paths are /export/{datasets|lenses}/{user}:{name}[/zip|/event-stream]")
}

/// `user:name`, split at the first literal colon, then each half decoded.
fn parse_collection(realm: Realm, owner_name: &str) -> Result<Collection, ApiError> {
    let (user, name) = owner_name
        .split_once(':')
        .ok_or_else(|| ApiError::bad_request("the collection must be written user:name (with a colon)"))?;
    let user = decode(user, "user")?;
    let name = decode(name, "name")?;
    if user.is_empty() || name.is_empty() {
        return Err(ApiError::bad_request("both user and name must be non-empty in user:name"));
    }
    Ok(Collection { realm, user, name })
}

/// Percent-decodes one path part; it must be UTF-8 without NUL.
fn decode(raw: &str, what: &str) -> Result<String, ApiError> {
    if !well_formed_escapes(raw) {
        return Err(ApiError::bad_request(format!("the {what} has a malformed %-escape")));
    }
    let text = percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| ApiError::bad_request(format!("the {what} is not UTF-8 once %-decoded")))?;
    if text.contains('\0') {
        return Err(ApiError::bad_request(format!("the {what} contains a NUL character")));
    }
    Ok(text.into_owned())
}

/// `percent_decode` passes a stray `%` through; the client almost surely meant something else.
fn well_formed_escapes(raw: &str) -> bool {
    let bytes = raw.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3);
            if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                return false;
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    true
}

/// The query parameters an export understands; others are ignored (cache busters and the like).
#[derive(Default)]
struct QueryParams {
    encoding: Option<String>,
    after: Option<String>,
    at: Option<String>,
    attachments: Option<String>,
}

impl QueryParams {
    const KEYS: [&'static str; 4] = ["encoding", "after", "at", "attachments"];

    fn parse(query: &str) -> Result<QueryParams, ApiError> {
        // Decoding passes a stray `%` through, which would turn `after=%ZZ` into an unknown
        // version (410, "re-sync") instead of the client's mistake.
        for pair in query.split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if Self::KEYS.contains(&key) && !well_formed_escapes(value) {
                let message = format!("`{key}` has a malformed %-escape: write a literal % as %25");
                return Err(ApiError::bad_request(message));
            }
        }
        let mut params = QueryParams::default();
        for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
            let slot = match key.as_ref() {
                "encoding" => &mut params.encoding,
                "after" => &mut params.after,
                "at" => &mut params.at,
                "attachments" => &mut params.attachments,
                _ => continue,
            };
            if slot.is_some() {
                return Err(ApiError::bad_request(format!("`{key}` is given more than once")));
            }
            *slot = Some(value.into_owned());
        }
        Ok(params)
    }

    fn encoding(&self) -> Result<Encoding, ApiError> {
        let value = self.encoding.as_deref().ok_or_else(|| {
            ApiError::bad_request("add ?encoding=cbor, ?encoding=json or ?encoding=json-lines")
        })?;
        Encoding::parse(value).ok_or_else(|| {
            ApiError::bad_request(format!("unknown encoding `{value}`: use cbor, json or json-lines"))
        })
    }

    /// `attachments=true|false` of a zip export; absent means false.
    fn attachments(&self) -> Result<bool, ApiError> {
        match self.attachments.as_deref() {
            None | Some("false") => Ok(false),
            Some("true") => Ok(true),
            Some(other) => {
                Err(ApiError::bad_request(format!("attachments=`{other}` is not allowed: use true or false")))
            }
        }
    }

    /// A sync point where none applies is refused rather than ignored: the client expects
    /// something the answer would not give.
    fn refuse_sync(&self, advice: &str) -> Result<(), ApiError> {
        match self.after.is_some() || self.at.is_some() {
            true => Err(ApiError::bad_request(format!("after= and at= do not apply here: {advice}"))),
            false => Ok(()),
        }
    }

    fn since(&self) -> Result<Option<Since>, ApiError> {
        match (&self.after, &self.at) {
            (Some(_), Some(_)) => Err(ApiError::bad_request("give either after= or at=, not both")),
            (Some(v), None) => Ok(Some(Since::After(non_empty(v, "after")?))),
            (None, Some(v)) => Ok(Some(Since::At(non_empty(v, "at")?))),
            (None, None) => Ok(None),
        }
    }
}

fn non_empty(value: &str, key: &str) -> Result<String, ApiError> {
    if value.is_empty() {
        return Err(ApiError::bad_request(format!("{key}= needs a version from X-Version")));
    }
    Ok(value.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(path: &str, query: &str) -> Result<ExportRequest, ApiError> {
        parse(path, Some(query))
    }

    #[test]
    fn metric_routes_come_from_the_path_alone() {
        assert_eq!(label("/export/datasets/a:b"), "export-records");
        assert_eq!(label("/export/nowhere/a:b/zip"), "export-zip");
        assert_eq!(label("/export/lenses/a:b/event-stream"), "export-events");
        assert_eq!(label("/export"), "export-records");
        assert_eq!(label("/datasets/a:b/records/zip"), "passthrough");
    }

    #[test]
    fn parses_a_plain_export() {
        let r = records("/export/datasets/alice:birds", "encoding=json").expect("valid");
        assert_eq!(r.collection.user, "alice");
        assert_eq!(r.collection.name, "birds");
        assert_eq!(r.kind, ExportKind::Records { encoding: Encoding::Json, since: None });
    }

    #[test]
    fn escaped_colon_and_slash_stay_in_their_name() {
        let r = records("/export/lenses/a%3Ab:c%2Fd", "encoding=cbor").expect("valid");
        assert_eq!(r.collection.user, "a:b");
        assert_eq!(r.collection.name, "c/d");
        assert_eq!(r.collection.listing_path(), "/lenses/a%3Ab:c%2Fd/records/");
    }

    #[test]
    fn client_errors() {
        let status = |p: &str, q: &str| records(p, q).unwrap_err().status;
        assert_eq!(status("/export/things/a:b", "encoding=json"), 404);
        assert_eq!(status("/export/datasets/ab", "encoding=json"), 400);
        assert_eq!(status("/export/datasets/:b", "encoding=json"), 400);
        assert_eq!(status("/export/datasets/a:b", ""), 400);
        assert_eq!(status("/export/datasets/a:b", "encoding=xml"), 400);
        assert_eq!(status("/export/datasets/a:b", "encoding=json&after=1&at=2"), 400);
        assert_eq!(status("/export/datasets/a:b", "encoding=json&encoding=cbor"), 400);
        assert_eq!(status("/export/datasets/a:b%zz", "encoding=json"), 400);
        assert_eq!(status("/export/datasets/a:b", "encoding=json&after=%ZZ"), 400);
        assert_eq!(status("/export/datasets/a:b", "encoding=json&at=5%"), 400);
        assert_eq!(status("/export/datasets/a:b", "encoding=js%6"), 400);
        assert_eq!(status("/export/datasets/a:b%00", "encoding=json"), 400);
        assert_eq!(status("/export/datasets/a:b%ff", "encoding=json"), 400);
        assert_eq!(status("/export/datasets/a:b/c/d", "encoding=json"), 404);
        assert_eq!(status("/export/datasets/a:b/other", ""), 404);
        assert_eq!(status("/export/datasets/a:b/zip", "after=3"), 400);
        assert_eq!(status("/export/datasets/a:b/event-stream", "at=3"), 400);
    }

    #[test]
    fn sync_versions_are_decoded_and_other_parameters_ignored() {
        let kind = records("/export/datasets/a:b", "encoding=json&after=v%2F7&_=50%off").expect("valid").kind;
        let since = Some(Since::After("v/7".into()));
        assert_eq!(kind, ExportKind::Records { encoding: Encoding::Json, since });
    }

    #[test]
    fn every_path_part_is_decoded() {
        let kind = records("/export/dataset%73/a:b/event%2Dstream", "").expect("valid").kind;
        assert_eq!(kind, ExportKind::EventStream);
    }

    #[test]
    fn zip_and_event_stream_need_no_encoding() {
        let kind = records("/export/datasets/a:b/zip", "").expect("valid").kind;
        assert_eq!(kind, ExportKind::Zip { attachments: false });
        let kind = records("/export/datasets/a:b/event-stream", "").expect("valid").kind;
        assert_eq!(kind, ExportKind::EventStream);
    }

    #[test]
    fn zip_attachments_is_true_or_false() {
        let kind = |q: &str| records("/export/datasets/a:b/zip", q).map(|r| r.kind);
        assert_eq!(kind("attachments=true").expect("valid"), ExportKind::Zip { attachments: true });
        assert_eq!(kind("attachments=false").expect("valid"), ExportKind::Zip { attachments: false });
        for bad in
            ["attachments=yes", "attachments=", "attachments=TRUE", "attachments=true&attachments=true"]
        {
            assert_eq!(kind(bad).unwrap_err().status, 400, "{bad}");
        }
    }
}
