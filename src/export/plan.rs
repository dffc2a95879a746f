//! Decides what a record export contains: the whole listing, or for pull-sync only the records
//! changed since a version plus tombstones for deletions, computed from the version journal.

use super::route::Since;
use crate::collection::Collection;
use crate::error::ApiError;
use crate::journal::{Diff, JournalError, Seq, VersionJournal};
use crate::upstream::{Listing, ListingEntry};
use std::sync::Arc;

/// One entry of an export, in recordID order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportItem {
    /// A record to fetch (U2) and write, at the version its listing gave.
    Record(ListingEntry),
    /// A record that existed at the client's version and exists no more.
    Tombstone(String),
}

impl ExportItem {
    pub fn id(&self) -> &str {
        match self {
            ExportItem::Record(entry) => &entry.id,
            ExportItem::Tombstone(id) => id,
        }
    }
}

/// Records `listing` as a version in the journal (so its `X-Version` can be synced from later)
/// and returns what to export.
pub async fn plan(
    journal: &Arc<VersionJournal>,
    collection: &Collection,
    listing: Listing,
    since: Option<Since>,
) -> Result<Vec<ExportItem>, ApiError> {
    let journal = Arc::clone(journal);
    let collection = collection.clone();
    blocking(move || {
        let current = journal.record(&collection, &listing.version, &listing.entries)?;
        let Some(since) = since else {
            return Ok(Ok(listing.entries.into_iter().map(ExportItem::Record).collect()));
        };
        let from = match sync_start(&journal, &collection, &since)? {
            Ok(from) => from,
            Err(error) => return Ok(Err(error)),
        };
        // A client can be ahead of this listing (it heard of a newer version from an event
        // while this read saw an older one): nothing is newer than what it has.
        if from >= current {
            return Ok(Ok(Vec::new()));
        }
        match journal.diff(&collection, Some(from), current) {
            Ok(diff) => Ok(Ok(merge(diff, &listing.entries))),
            // Pruned between looking the version up and reading the diff.
            Err(JournalError::NotKept { .. }) => Ok(Err(version_unknown())),
            Err(e) => Err(e),
        }
    })
    .await?
}

/// The journal sequence a sync starts from, or the client's error when it cannot start.
/// `at=V` starts from the version before V, so V's own changes are included; with no
/// earlier version kept, what changed in V is unknown and only a full export is safe.
fn sync_start(
    journal: &VersionJournal,
    collection: &Collection,
    since: &Since,
) -> Result<Result<Seq, ApiError>, JournalError> {
    let (Since::After(version) | Since::At(version)) = since;
    let Some(seq) = journal.seq_of(collection, version)? else {
        return Ok(Err(version_unknown()));
    };
    if matches!(since, Since::After(_)) {
        return Ok(Ok(seq));
    }
    Ok(journal.previous_seq(collection, seq)?.ok_or_else(nothing_before))
}

/// Changed records and tombstones in one recordID-ordered list (the two are disjoint). A
/// changed record takes its version from `entries`, the listing the diff was recorded from.
fn merge(diff: Diff, entries: &[ListingEntry]) -> Vec<ExportItem> {
    let version_of = |id: &str| match entries.binary_search_by(|e| e.id.as_str().cmp(id)) {
        Ok(at) => entries[at].version.clone(),
        Err(_) => String::new(),
    };
    let changed =
        diff.changed.into_iter().map(|id| ExportItem::Record(ListingEntry { version: version_of(&id), id }));
    let deleted = diff.deleted.into_iter().map(ExportItem::Tombstone);
    let mut items: Vec<ExportItem> = changed.chain(deleted).collect();
    items.sort_unstable_by(|a, b| a.id().cmp(b.id()));
    items
}

/// Runs journal work off the async threads; a journal failure is the sidecar's 503.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, JournalError> + Send + 'static,
) -> Result<T, ApiError> {
    let result = tokio::task::spawn_blocking(work).await.map_err(|e| {
        tracing::error!(error = %e, "journal task failed");
        journal_unavailable()
    })?;
    result.map_err(|e| {
        tracing::error!(error = %e, "version journal failed");
        journal_unavailable()
    })
}

/// The answer when the journal fails: the sidecar's fault, and usually brief (a locked file).
pub fn journal_unavailable() -> ApiError {
    ApiError::new(503, "journal_unavailable", "the version journal cannot be used right now; try again later")
        .with_header("retry-after", "5")
}

/// `at=V` for the first version the sidecar knows: V itself is known, but not what it changed.
fn nothing_before() -> ApiError {
    ApiError::new(
        410,
        "version_unknown",
        "no version before this one is known to the sidecar, so what changed in it cannot be told: \
         download a full export (without after= or at=) and sync from its X-Version",
    )
}

/// Pull-sync needs a version the sidecar still keeps; without one the only safe answer is a
/// full export, or the client would keep records deleted since.
pub fn version_unknown() -> ApiError {
    ApiError::new(
        410,
        "version_unknown",
        "this version is not known to the sidecar (never handed out, or expired): download a full \
         export (without after= or at=) and sync from its X-Version",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_keeps_recordid_order() {
        let diff = Diff {
            changed: vec!["a".into(), "c".into(), "e".into()],
            deleted: vec!["b".into(), "d".into(), "f".into(), "g".into()],
        };
        let entries: Vec<ListingEntry> = ["a", "c", "e"]
            .iter()
            .map(|id| ListingEntry { id: id.to_string(), version: format!("v{id}") })
            .collect();
        let ids: Vec<String> = merge(diff, &entries)
            .iter()
            .map(|i| match i {
                ExportItem::Record(entry) => format!("+{}@{}", entry.id, entry.version),
                ExportItem::Tombstone(id) => format!("-{id}"),
            })
            .collect();
        assert_eq!(ids, ["+a@va", "-b", "+c@vc", "-d", "+e@ve", "-f", "-g"]);
    }
}
