//! The durable version journal: every listing the sidecar reads is recorded as a version of its
//! collection in an SQLite file, so `after=V` / `at=V` can be answered with the records changed since V.
//!
//! # Storage
//! A record is stored once per *record version*, as a row valid over a range of seqs
//! `[since_seq, until_seq)`; recording a listing touches only the rows whose record changed.
//! Storage therefore grows with the number of changes, not with collection size × versions, and a
//! diff between two seqs is two index range queries over the rows that began or ended between them.
//!
//! # Concurrency
//! SQLite in WAL mode lets readers work beside the one writer. Writes (`record`, `prune`) share one
//! connection behind a mutex; reads (`seq_of`, `diff`, …) take a connection from a small pool, each
//! read in its own transaction so it sees one consistent snapshot even while a prune runs.

use crate::collection::Collection;
use crate::upstream::{Listing, ListingEntry};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A version's position in the journal: global over all collections, increasing, never reused
/// (`AUTOINCREMENT`), so a seq orders versions and names one version of one collection.
pub type Seq = i64;

/// The schema this build writes, kept in SQLite's `user_version` header field.
const SCHEMA_VERSION: i64 = 1;

/// How long a connection waits for another process's lock before giving up with `SQLITE_BUSY`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the writability probe waits for the write lock: a readiness check must answer
/// quickly, and a lock held this long by another process already delays every export.
const PROBE_WAIT: Duration = Duration::from_millis(250);

/// Rows deleted per transaction while pruning: small enough that a `record` waits milliseconds.
const PRUNE_BATCH: i64 = 10_000;

/// Returns up to 2,000 free pages to the file system: one lock hold's worth after a prune.
/// (A pragma takes no bound parameters, hence the literal.)
const VACUUM_SQL: &str = "PRAGMA incremental_vacuum(2000)";

/// Idle read connections kept open; more are opened when reads overlap and closed afterwards.
const IDLE_READERS: usize = 4;

/// Idempotent: `IF NOT EXISTS` everywhere, so opening an existing journal changes nothing.
///
/// - `versions.seq` is `AUTOINCREMENT` so a pruned seq is never handed out again: a client that
///   holds an old version must get "not kept", never another version's diff.
/// - `records_live` is UNIQUE over the live rows: at most one live row per record, enforced by
///   SQLite itself, and it hands `record` the live rows in recordID order for its merge-join.
/// - `records_by_since` / `records_by_until` serve the two range queries of `diff`;
///   `records_by_until` leaves out live rows (partial index), which are most rows and never
///   match a range on `until_seq`. It also finds the rows `prune` deletes.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS collections (
    id    INTEGER PRIMARY KEY,
    realm TEXT NOT NULL,
    user  TEXT NOT NULL,
    name  TEXT NOT NULL,
    UNIQUE (realm, user, name)
);
CREATE TABLE IF NOT EXISTS versions (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    collection  INTEGER NOT NULL REFERENCES collections (id),
    version     TEXT NOT NULL,
    recorded_at INTEGER NOT NULL,
    UNIQUE (collection, version)
);
CREATE INDEX IF NOT EXISTS versions_by_collection ON versions (collection, seq);
CREATE TABLE IF NOT EXISTS records (
    collection INTEGER NOT NULL REFERENCES collections (id),
    record_id  TEXT NOT NULL,
    version    TEXT NOT NULL,
    since_seq  INTEGER NOT NULL,
    until_seq  INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS records_live
    ON records (collection, record_id) WHERE until_seq IS NULL;
CREATE INDEX IF NOT EXISTS records_by_since ON records (collection, since_seq);
CREATE INDEX IF NOT EXISTS records_by_until
    ON records (collection, until_seq) WHERE until_seq IS NOT NULL;
";

/// The live rows of a collection in recordID byte order (SQLite's BINARY collation is `memcmp`,
/// the same order as Rust's `str`), read through `records_live`.
const LIVE_SQL: &str = "SELECT rowid, record_id, version FROM records
    WHERE collection = ?1 AND until_seq IS NULL ORDER BY record_id";

/// Rows that began in `(?2, ?3]` and are still live at `?3`: the changed records.
const CHANGED_SQL: &str = "SELECT record_id FROM records
    WHERE collection = ?1 AND since_seq > ?2 AND since_seq <= ?3
      AND (until_seq IS NULL OR until_seq > ?3)";

/// Rows live at `?2` that ended in `(?2, ?3]`: candidates for deletion. The unary `+` keeps the
/// planner off `records_by_since`, whose range `since_seq <= ?2` would be the whole history.
const ENDED_SQL: &str = "SELECT record_id FROM records
    WHERE collection = ?1 AND until_seq > ?2 AND until_seq <= ?3 AND +since_seq <= ?2";

/// One batch of versions outside the retention (`?3` = oldest seq kept by count, `?4` = oldest
/// `recorded_at` kept by age; NULL means no limit), never the newest (`?2`).
const PRUNE_VERSIONS_SQL: &str = "DELETE FROM versions WHERE seq IN (
    SELECT seq FROM versions
    WHERE collection = ?1 AND seq < ?2 AND (seq < ?3 OR recorded_at < ?4) LIMIT ?5)";

/// One batch of record rows that ended at or before the oldest kept seq `?2`: live at no kept version.
const PRUNE_RECORDS_SQL: &str = "DELETE FROM records WHERE rowid IN (
    SELECT rowid FROM records WHERE collection = ?1 AND until_seq <= ?2 LIMIT ?3)";

/// Why a journal operation failed. SQLite errors carry what the journal was doing.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("version journal: {context}: {source}")]
    Sqlite {
        context: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "the version journal {path} has schema version {found}, newer than {supported} which this \
         build knows: run a newer export-sidecar or point it at another journal file"
    )]
    NewerSchema { path: PathBuf, found: i64, supported: i64 },
    #[error("the listing of {collection} is not sorted by unique recordID (at {id:?})")]
    UnsortedListing { collection: String, id: String },
    #[error("seq {seq} is not a kept version of {collection}")]
    NotKept { collection: String, seq: Seq },
    #[error("a diff of {collection} from seq {from} back to seq {to}: from must not be after to")]
    Backwards { collection: String, from: Seq, to: Seq },
    #[error("the version journal's worker task failed: {0}")]
    Task(String),
    #[error("cannot read the size of the version journal {path}: {source}")]
    Size {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the version journal {path} is no longer the file the sidecar opened ({detail}); what it writes would be lost on restart")]
    Replaced { path: PathBuf, detail: String },
}

/// Attaches what the journal was doing to a SQLite error.
trait Context<T> {
    fn context(self, context: &'static str) -> Result<T, JournalError>;
}

impl<T> Context<T> for rusqlite::Result<T> {
    fn context(self, context: &'static str) -> Result<T, JournalError> {
        self.map_err(|source| JournalError::Sqlite { context, source })
    }
}

/// Changes between two recorded versions, each list sorted by recordID byte order (Rust String
/// order), which is the order exports stream records in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diff {
    /// Records live at the later version whose row began after the earlier one: new or changed.
    pub changed: Vec<String>,
    /// Records live at the earlier version and gone at the later one: they become tombstones.
    pub deleted: Vec<String>,
}

/// How much history `prune` keeps; `None` means no limit. Each collection's newest version is
/// always kept whatever the limits, so a client that just synced can always sync again.
#[derive(Debug, Clone, Default)]
pub struct Retention {
    /// Versions recorded longer ago than this are dropped.
    pub max_age: Option<Duration>,
    /// Only this many newest versions of each collection are kept.
    pub max_versions: Option<usize>,
}

/// What a prune deleted, for logs and metrics.
#[derive(Debug, Default)]
pub struct PruneStats {
    /// Versions dropped: clients holding them get 410 and re-sync.
    pub versions: u64,
    /// Record rows dropped because no kept version can see them.
    pub records: u64,
}

/// The version journal. `Send + Sync`; every method blocks, so async callers use `spawn_blocking`.
pub struct VersionJournal {
    /// The database file, for opening read connections and reporting its size.
    path: PathBuf,
    /// The one connection that writes: SQLite allows one writer at a time anyway, and a
    /// `std::sync::Mutex` suits blocking callers that hold it only for one short transaction.
    writer: Mutex<Connection>,
    /// Idle read connections. WAL readers never wait for the writer, so an export's diff does not
    /// queue behind a large `record` or a prune batch of another collection.
    readers: Mutex<Vec<Connection>>,
    /// Device and inode of the file as opened: a file deleted or replaced underneath (a temp
    /// directory cleaner, an operator) keeps taking writes that no restart will see.
    identity: (u64, u64),
}

impl VersionJournal {
    /// Opens the journal at `path`, creating the file and its schema if needed, in WAL mode.
    /// Fails with [`JournalError::NewerSchema`] rather than touching a journal from a newer build.
    pub fn open(path: &Path) -> Result<VersionJournal, JournalError> {
        let mut conn = connect(path)?;
        // Only takes effect on a new, empty file; lets `prune` give space back to the file system.
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL").context("setting auto_vacuum")?;
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get::<_, String>(0))
            .context("switching to WAL mode")?;
        conn.pragma_update(None, "synchronous", "NORMAL").context("setting synchronous")?;
        ensure_schema(&mut conn, path)?;
        let identity =
            file_identity(path).map_err(|detail| JournalError::Replaced { path: path.to_owned(), detail })?;
        Ok(VersionJournal {
            path: path.to_owned(),
            writer: Mutex::new(conn),
            readers: Mutex::new(Vec::new()),
            identity,
        })
    }

    /// Whether a write could be made now: the file at `path` is still the one opened, and the
    /// write lock can be taken within `PROBE_WAIT` (another process holding it, or a file
    /// SQLite can only read, fails). Writes nothing. Blocks; async callers use `spawn_blocking`.
    pub fn check_writable(&self) -> Result<(), JournalError> {
        let replaced = |detail| JournalError::Replaced { path: self.path.clone(), detail };
        if file_identity(&self.path).map_err(replaced)? != self.identity {
            return Err(replaced("another file is at its path".into()));
        }
        let conn = match self.writer.try_lock() {
            Ok(conn) => conn,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            // Held by a write in progress: the journal is being written right now.
            Err(TryLockError::WouldBlock) => return Ok(()),
        };
        conn.busy_timeout(PROBE_WAIT).context("shortening busy_timeout")?;
        let probe = conn.execute_batch("BEGIN IMMEDIATE; ROLLBACK").context("taking the write lock");
        conn.busy_timeout(BUSY_TIMEOUT).context("restoring busy_timeout")?;
        probe
    }

    /// Records `entries` (sorted by id, unique ids) as `version` of `collection` and returns its seq.
    /// If (collection, version) is already recorded, returns the existing seq and changes nothing.
    /// Otherwise, in one transaction: a new version row; a closed old row and a new row for each
    /// record that is new or whose version differs; a closed row for each record absent (deleted).
    /// The live rows are compared with one ordered query, merge-joined with `entries`.
    pub fn record(
        &self,
        collection: &Collection,
        version: &str,
        entries: &[ListingEntry],
    ) -> Result<Seq, JournalError> {
        check_sorted(collection, entries)?;
        // Most listings repeat a known version: answer those from a reader, without the write lock.
        if let Some(seq) = self.seq_of(collection, version)? {
            return Ok(seq);
        }
        let recorded_at = unix_seconds(SystemTime::now());
        let mut conn = self.writer();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .context("starting to record a version")?;
        let coll = ensure_collection(&tx, collection)?;
        if let Some(seq) = find_seq(&tx, coll, version)? {
            return Ok(seq);
        }
        tx.prepare_cached("INSERT INTO versions (collection, version, recorded_at) VALUES (?1, ?2, ?3)")
            .and_then(|mut insert| insert.execute(params![coll, version, recorded_at]))
            .context("adding a version")?;
        let seq = tx.last_insert_rowid();
        let plan = compare_live(&tx, coll, entries)?;
        apply(&tx, coll, seq, &plan)?;
        tx.commit().context("committing a recorded version")?;
        Ok(seq)
    }

    /// The seq of `version` of `collection`, if it was recorded and is still kept.
    pub fn seq_of(&self, collection: &Collection, version: &str) -> Result<Option<Seq>, JournalError> {
        self.read(|conn| match collection_id(conn, collection)? {
            Some(coll) => find_seq(conn, coll, version),
            None => Ok(None),
        })
    }

    /// The seq of the version recorded just before `seq` for this collection (for `at=V`), if kept.
    /// `None` when `seq` is the oldest kept version (or not a version of this collection).
    pub fn previous_seq(&self, collection: &Collection, seq: Seq) -> Result<Option<Seq>, JournalError> {
        self.read(|conn| {
            let Some(coll) = kept_collection(conn, collection, seq)? else {
                return Ok(None);
            };
            conn.prepare_cached("SELECT MAX(seq) FROM versions WHERE collection = ?1 AND seq < ?2")
                .and_then(|mut stmt| stmt.query_row(params![coll, seq], |row| row.get(0)))
                .context("finding the previous version")
        })
    }

    /// The version string at `seq` (for event ids), if kept.
    pub fn version_at(&self, collection: &Collection, seq: Seq) -> Result<Option<String>, JournalError> {
        self.read(|conn| {
            let Some(coll) = collection_id(conn, collection)? else {
                return Ok(None);
            };
            conn.prepare_cached("SELECT version FROM versions WHERE collection = ?1 AND seq = ?2")
                .and_then(|mut stmt| stmt.query_row(params![coll, seq], |row| row.get(0)).optional())
                .context("reading a version string")
        })
    }

    /// Diff from `from` (None = the empty collection) to `to`, both kept seqs of this collection,
    /// `from <= to` (equal gives an empty diff). `changed` = records live at `to` whose row began
    /// after `from`; `deleted` = records live at `from` and not at `to`; a record created and
    /// deleted in between is in neither. Only rows that began or ended in `(from, to]` are read,
    /// so versions recorded after `to` do not matter. A seq that is not a kept version of this
    /// collection (pruned meanwhile, or another collection's) is [`JournalError::NotKept`].
    pub fn diff(&self, collection: &Collection, from: Option<Seq>, to: Seq) -> Result<Diff, JournalError> {
        self.read(|conn| {
            let coll = kept_collection(conn, collection, to)?.ok_or_else(|| not_kept(collection, to))?;
            let Some(from) = from else {
                return Ok(Diff {
                    changed: sorted_ids(conn, CHANGED_SQL, coll, 0, to)?,
                    deleted: Vec::new(),
                });
            };
            kept_collection(conn, collection, from)?.ok_or_else(|| not_kept(collection, from))?;
            if from > to {
                let collection = collection.to_string();
                return Err(JournalError::Backwards { collection, from, to });
            }
            let changed = sorted_ids(conn, CHANGED_SQL, coll, from, to)?;
            let mut deleted = sorted_ids(conn, ENDED_SQL, coll, from, to)?;
            // A record live at `from` whose row ended but which lives again at `to` was changed.
            deleted.retain(|id| changed.binary_search(id).is_err());
            Ok(Diff { changed, deleted })
        })
    }

    /// Deletes versions older than `max_age` (measured from `now`) and beyond the newest
    /// `max_versions` per collection, always keeping each collection's newest version; then the
    /// record rows live at no kept version (`until_seq <=` the oldest kept seq). Rows live at a
    /// kept version survive however old they are, so diffs from kept versions stay right.
    /// Works in batches of [`PRUNE_BATCH`] rows, taking the write lock per batch.
    pub fn prune(&self, retention: &Retention, now: SystemTime) -> Result<PruneStats, JournalError> {
        let min_recorded_at =
            retention.max_age.map(|age| now.checked_sub(age).map_or(i64::MIN, unix_seconds));
        let keep = retention.max_versions.map(|n| n.max(1));
        let mut stats = PruneStats::default();
        for coll in self.collection_ids()? {
            stats.versions += self.prune_versions(coll, keep, min_recorded_at)?;
            if let Some(oldest_kept) = self.oldest_seq(coll)? {
                stats.records += self.prune_records(coll, oldest_kept)?;
            }
        }
        if stats.versions > 0 {
            self.reclaim_space()?;
        }
        Ok(stats)
    }

    /// Bytes on disk: the database file plus its write-ahead log.
    pub fn size_bytes(&self) -> Result<u64, JournalError> {
        let mut wal = self.path.clone().into_os_string();
        wal.push("-wal");
        let main = file_len(&self.path)?;
        let wal = file_len(Path::new(&wal))?;
        Ok(main + wal)
    }

    /// The write connection. A panic while holding it leaves nothing half-done (an open
    /// transaction rolls back when dropped), so a poisoned lock is safe to take over.
    fn writer(&self) -> MutexGuard<'_, Connection> {
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` in one read transaction on a pooled read connection: one snapshot throughout.
    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T, JournalError>) -> Result<T, JournalError> {
        let idle = self.readers.lock().unwrap_or_else(PoisonError::into_inner).pop();
        let mut conn = match idle {
            Some(conn) => conn,
            None => connect_reader(&self.path)?,
        };
        let result = read_in_transaction(&mut conn, f);
        let mut idle = self.readers.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < IDLE_READERS {
            idle.push(conn);
        }
        result
    }

    fn collection_ids(&self) -> Result<Vec<i64>, JournalError> {
        let conn = self.writer();
        let mut stmt = conn.prepare("SELECT id FROM collections").context("listing collections")?;
        let ids = stmt.query_map([], |row| row.get(0)).context("listing collections")?;
        ids.collect::<rusqlite::Result<_>>().context("listing collections")
    }

    /// Deletes the versions of one collection outside the retention, a batch per lock hold.
    fn prune_versions(
        &self,
        coll: i64,
        keep: Option<usize>,
        min_recorded_at: Option<i64>,
    ) -> Result<u64, JournalError> {
        let (newest, oldest_by_count) = {
            let conn = self.writer();
            let newest: Option<Seq> = conn
                .query_row("SELECT MAX(seq) FROM versions WHERE collection = ?1", [coll], |row| row.get(0))
                .context("finding the newest version")?;
            (newest, keep.map(|n| nth_newest(&conn, coll, n)).transpose()?.flatten())
        };
        let Some(newest) = newest else { return Ok(0) };
        self.delete_in_batches("pruning versions", PRUNE_VERSIONS_SQL, |stmt| {
            stmt.execute(params![coll, newest, oldest_by_count, min_recorded_at, PRUNE_BATCH])
        })
    }

    fn oldest_seq(&self, coll: i64) -> Result<Option<Seq>, JournalError> {
        self.writer()
            .query_row("SELECT MIN(seq) FROM versions WHERE collection = ?1", [coll], |row| row.get(0))
            .context("finding the oldest kept version")
    }

    /// Deletes the record rows of one collection that ended at or before `oldest_kept`.
    fn prune_records(&self, coll: i64, oldest_kept: Seq) -> Result<u64, JournalError> {
        self.delete_in_batches("pruning records", PRUNE_RECORDS_SQL, |stmt| {
            stmt.execute(params![coll, oldest_kept, PRUNE_BATCH])
        })
    }

    /// Runs one batch-deleting statement until a batch comes back short, releasing the write lock
    /// between batches (each batch is its own transaction) so writers and readers get their turn.
    fn delete_in_batches(
        &self,
        context: &'static str,
        sql: &str,
        mut batch: impl FnMut(&mut rusqlite::CachedStatement<'_>) -> rusqlite::Result<usize>,
    ) -> Result<u64, JournalError> {
        let mut total = 0;
        loop {
            let deleted = {
                let conn = self.writer();
                let mut stmt = conn.prepare_cached(sql).context(context)?;
                batch(&mut stmt).context(context)?
            };
            total += deleted as u64;
            if (deleted as u64) < PRUNE_BATCH as u64 {
                return Ok(total);
            }
        }
    }

    /// Gives the pages a prune freed back to the file system, a bounded number per lock hold.
    fn reclaim_space(&self) -> Result<(), JournalError> {
        loop {
            let conn = self.writer();
            let free: i64 = conn
                .query_row("PRAGMA freelist_count", [], |row| row.get(0))
                .context("counting free pages")?;
            if free == 0 {
                return Ok(());
            }
            // The pragma frees one page per result row, so every row must be stepped through.
            let mut stmt = conn.prepare(VACUUM_SQL).context("vacuuming")?;
            let mut rows = stmt.query([]).context("vacuuming")?;
            while rows.next().context("vacuuming")?.is_some() {}
        }
    }
}

/// Opens a connection to the journal file with the settings every connection needs.
fn connect(path: &Path) -> Result<Connection, JournalError> {
    let conn = Connection::open(path).context("opening the journal file")?;
    conn.busy_timeout(BUSY_TIMEOUT).context("setting busy_timeout")?;
    Ok(conn)
}

/// A read connection: `query_only`, so a bug cannot write around the writer's lock.
fn connect_reader(path: &Path) -> Result<Connection, JournalError> {
    let conn = connect(path)?;
    conn.pragma_update(None, "query_only", true).context("making a read connection read-only")?;
    Ok(conn)
}

fn read_in_transaction<T>(
    conn: &mut Connection,
    f: impl FnOnce(&Connection) -> Result<T, JournalError>,
) -> Result<T, JournalError> {
    let tx = conn.transaction().context("starting a read")?;
    let value = f(&tx)?;
    tx.finish().context("ending a read")?;
    Ok(value)
}

/// Creates the schema if missing and refuses a journal written by a newer schema.
fn ensure_schema(conn: &mut Connection, path: &Path) -> Result<(), JournalError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .context("starting to create the schema")?;
    let found: i64 = tx
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .context("reading the schema version")?;
    if found > SCHEMA_VERSION {
        let path = path.to_owned();
        return Err(JournalError::NewerSchema { path, found, supported: SCHEMA_VERSION });
    }
    tx.execute_batch(SCHEMA).context("creating the schema")?;
    tx.pragma_update(None, "user_version", SCHEMA_VERSION).context("writing the schema version")?;
    tx.commit().context("committing the schema")
}

/// The merge-join needs the listing in recordID byte order without repeats; say so if it is not.
fn check_sorted(collection: &Collection, entries: &[ListingEntry]) -> Result<(), JournalError> {
    match entries.windows(2).find(|pair| pair[0].id >= pair[1].id) {
        Some(pair) => {
            Err(JournalError::UnsortedListing { collection: collection.to_string(), id: pair[1].id.clone() })
        }
        None => Ok(()),
    }
}

fn collection_id(conn: &Connection, collection: &Collection) -> Result<Option<i64>, JournalError> {
    conn.prepare_cached("SELECT id FROM collections WHERE realm = ?1 AND user = ?2 AND name = ?3")
        .and_then(|mut stmt| {
            stmt.query_row(params![collection.realm.as_str(), collection.user, collection.name], |row| {
                row.get(0)
            })
            .optional()
        })
        .context("looking up a collection")
}

fn ensure_collection(conn: &Connection, collection: &Collection) -> Result<i64, JournalError> {
    if let Some(id) = collection_id(conn, collection)? {
        return Ok(id);
    }
    conn.prepare_cached("INSERT INTO collections (realm, user, name) VALUES (?1, ?2, ?3)")
        .and_then(|mut stmt| {
            stmt.execute(params![collection.realm.as_str(), collection.user, collection.name])
        })
        .context("adding a collection")?;
    Ok(conn.last_insert_rowid())
}

fn find_seq(conn: &Connection, coll: i64, version: &str) -> Result<Option<Seq>, JournalError> {
    conn.prepare_cached("SELECT seq FROM versions WHERE collection = ?1 AND version = ?2")
        .and_then(|mut stmt| stmt.query_row(params![coll, version], |row| row.get(0)).optional())
        .context("looking up a version")
}

/// The collection's id if `seq` is a kept version of it.
fn kept_collection(
    conn: &Connection,
    collection: &Collection,
    seq: Seq,
) -> Result<Option<i64>, JournalError> {
    let Some(coll) = collection_id(conn, collection)? else {
        return Ok(None);
    };
    let kept = conn
        .prepare_cached("SELECT 1 FROM versions WHERE collection = ?1 AND seq = ?2")
        .and_then(|mut stmt| stmt.exists(params![coll, seq]))
        .context("checking a version is kept")?;
    Ok(kept.then_some(coll))
}

fn not_kept(collection: &Collection, seq: Seq) -> JournalError {
    JournalError::NotKept { collection: collection.to_string(), seq }
}

/// The seq of the `n`th newest version (n ≥ 1), if there are that many.
fn nth_newest(conn: &Connection, coll: i64, n: usize) -> Result<Option<Seq>, JournalError> {
    conn.query_row(
        "SELECT seq FROM versions WHERE collection = ?1 ORDER BY seq DESC LIMIT 1 OFFSET ?2",
        params![coll, i64::try_from(n - 1).unwrap_or(i64::MAX)],
        |row| row.get(0),
    )
    .optional()
    .context("finding the oldest version kept by count")
}

/// What recording a listing changes: live rows to close, listing entries to insert.
struct Plan<'a> {
    close: Vec<i64>,
    insert: Vec<&'a ListingEntry>,
}

/// Merge-joins the live rows (in recordID order) with the sorted listing. Memory grows with the
/// changes only: live row ids are borrowed from SQLite, not copied.
fn compare_live<'a>(
    conn: &Connection,
    coll: i64,
    entries: &'a [ListingEntry],
) -> Result<Plan<'a>, JournalError> {
    const CONTEXT: &str = "comparing the listing with the live records";
    let mut plan = Plan { close: Vec::new(), insert: Vec::new() };
    let mut listing = entries.iter().peekable();
    let mut stmt = conn.prepare_cached(LIVE_SQL).context(CONTEXT)?;
    let mut rows = stmt.query([coll]).context(CONTEXT)?;
    while let Some(row) = rows.next().context(CONTEXT)? {
        let rowid: i64 = row.get(0).context(CONTEXT)?;
        let id = text(row, 1).context(CONTEXT)?;
        while let Some(new) = listing.next_if(|entry| entry.id.as_str() < id) {
            plan.insert.push(new);
        }
        match listing.next_if(|entry| entry.id == id) {
            Some(entry) if entry.version == text(row, 2).context(CONTEXT)? => {}
            Some(entry) => {
                plan.close.push(rowid);
                plan.insert.push(entry);
            }
            None => plan.close.push(rowid),
        }
    }
    plan.insert.extend(listing);
    Ok(plan)
}

fn text<'r>(row: &'r rusqlite::Row<'_>, index: usize) -> rusqlite::Result<&'r str> {
    row.get_ref(index)?.as_str().map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(index, rusqlite::types::Type::Text, Box::new(e))
    })
}

/// Closes the superseded rows at `seq`, then inserts the new ones (in this order, so the unique
/// live index never sees two live rows for one record).
fn apply(conn: &Connection, coll: i64, seq: Seq, plan: &Plan<'_>) -> Result<(), JournalError> {
    let mut close = conn
        .prepare_cached("UPDATE records SET until_seq = ?1 WHERE rowid = ?2")
        .context("closing superseded records")?;
    for rowid in &plan.close {
        close.execute(params![seq, rowid]).context("closing a superseded record")?;
    }
    let mut insert = conn
        .prepare_cached(
            "INSERT INTO records (collection, record_id, version, since_seq) VALUES (?1, ?2, ?3, ?4)",
        )
        .context("adding records")?;
    for entry in &plan.insert {
        insert.execute(params![coll, entry.id, entry.version, seq]).context("adding a record")?;
    }
    Ok(())
}

/// Runs CHANGED_SQL or ENDED_SQL over `(from, to]` and returns the ids in byte order.
fn sorted_ids(
    conn: &Connection,
    sql: &str,
    coll: i64,
    from: Seq,
    to: Seq,
) -> Result<Vec<String>, JournalError> {
    const CONTEXT: &str = "reading the records changed between two versions";
    let mut stmt = conn.prepare_cached(sql).context(CONTEXT)?;
    let ids = stmt.query_map(params![coll, from, to], |row| row.get(0)).context(CONTEXT)?;
    let mut ids: Vec<String> = ids.collect::<rusqlite::Result<_>>().context(CONTEXT)?;
    ids.sort_unstable();
    Ok(ids)
}

fn unix_seconds(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_secs()).map_or(i64::MIN, |s| -s),
    }
}

/// A file's length, 0 if it does not exist (the WAL is removed when the last connection closes).
/// Device and inode of the file at `path`, or why it cannot be read.
fn file_identity(path: &Path) -> Result<(u64, u64), String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    Ok((meta.dev(), meta.ino()))
}

fn file_len(path: &Path) -> Result<u64, JournalError> {
    match std::fs::metadata(path) {
        Ok(meta) => Ok(meta.len()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(source) => Err(JournalError::Size { path: path.to_owned(), source }),
    }
}

/// Records a listing from async code: the SQLite work runs on the blocking pool, and the
/// listing comes back with its sequence for the caller to go on with.
pub async fn record_listing(
    journal: &Arc<VersionJournal>,
    collection: &Collection,
    listing: Listing,
) -> Result<(Seq, Listing), JournalError> {
    let (journal, collection) = (Arc::clone(journal), collection.clone());
    tokio::task::spawn_blocking(move || {
        let seq = journal.record(&collection, &listing.version, &listing.entries)?;
        Ok((seq, listing))
    })
    .await
    .map_err(|e| JournalError::Task(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collection::Realm;
    use std::collections::BTreeMap;

    fn collection(name: &str) -> Collection {
        Collection { realm: Realm::Datasets, user: "u".into(), name: name.into() }
    }

    fn listing(pairs: &[(&str, &str)]) -> Vec<ListingEntry> {
        let mut entries: Vec<ListingEntry> = pairs
            .iter()
            .map(|(id, version)| ListingEntry { id: (*id).into(), version: (*version).into() })
            .collect();
        entries.sort_by(|a, b| a.id.cmp(&b.id));
        entries
    }

    fn diff(changed: &[&str], deleted: &[&str]) -> Diff {
        let owned = |ids: &[&str]| ids.iter().map(|id| id.to_string()).collect();
        Diff { changed: owned(changed), deleted: owned(deleted) }
    }

    fn open(dir: &tempfile::TempDir) -> VersionJournal {
        VersionJournal::open(&dir.path().join("journal.sqlite")).expect("open journal")
    }

    fn count(journal: &VersionJournal, sql: &str) -> i64 {
        journal.writer().query_row(sql, [], |row| row.get(0)).expect("count")
    }

    #[test]
    fn record_and_diff_basics() {
        let dir = tempfile::tempdir().expect("tempdir");
        let j = open(&dir);
        let c = collection("c");
        let s1 = j.record(&c, "v1", &listing(&[("a", "1"), ("b", "1"), ("c", "1"), ("d", "1")])).expect("v1");
        let s2 = j.record(&c, "v2", &listing(&[("a", "1"), ("b", "2"), ("e", "1"), ("x", "1")])).expect("v2");
        let s3 = j.record(&c, "v3", &listing(&[("a", "1"), ("b", "2"), ("c", "5"), ("e", "1")])).expect("v3");
        let s4 = j.record(&c, "v4", &listing(&[("z", "1")])).expect("v4");
        assert!(s1 < s2 && s2 < s3 && s3 < s4);
        assert_eq!(j.record(&c, "v2", &listing(&[("other", "9")])).expect("re-record"), s2);
        assert_eq!(j.diff(&c, Some(s1), s2).expect("d12"), diff(&["b", "e", "x"], &["c", "d"]));
        // x created and deleted between s1 and s3; c deleted then recreated: changed, not deleted.
        assert_eq!(j.diff(&c, Some(s1), s3).expect("d13"), diff(&["b", "c", "e"], &["d"]));
        assert_eq!(j.diff(&c, Some(s2), s3).expect("d23"), diff(&["c"], &["x"]));
        assert_eq!(j.diff(&c, Some(s3), s3).expect("d33"), Diff::default());
        assert_eq!(j.diff(&c, None, s2).expect("d02"), diff(&["a", "b", "e", "x"], &[]));
        assert_eq!(j.diff(&c, None, s4).expect("d04"), diff(&["z"], &[]));
        assert_eq!(j.diff(&c, Some(s3), s4).expect("d34"), diff(&["z"], &["a", "b", "c", "e"]));
        assert!(matches!(j.diff(&c, Some(s3), s2), Err(JournalError::Backwards { .. })));
        assert!(matches!(j.diff(&c, Some(s1), s4 + 100), Err(JournalError::NotKept { .. })));
    }

    #[test]
    fn is_send_and_sync() {
        fn shared<T: Send + Sync>() {}
        shared::<VersionJournal>();
    }

    #[test]
    fn unsorted_listing_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let j = open(&dir);
        let entries = vec![
            ListingEntry { id: "b".into(), version: "1".into() },
            ListingEntry { id: "a".into(), version: "1".into() },
        ];
        assert!(matches!(
            j.record(&collection("c"), "v", &entries),
            Err(JournalError::UnsortedListing { .. })
        ));
        assert_eq!(j.seq_of(&collection("c"), "v").expect("seq_of"), None);
    }

    #[test]
    fn lookups_are_per_collection() {
        let dir = tempfile::tempdir().expect("tempdir");
        let j = open(&dir);
        let (a, b) = (collection("a"), Collection { realm: Realm::Lenses, ..collection("a") });
        let a1 = j.record(&a, "v1", &listing(&[("r1", "1"), ("r2", "1")])).expect("a1");
        let b1 = j.record(&b, "v1", &listing(&[("r1", "1"), ("q", "1")])).expect("b1");
        let a2 = j.record(&a, "v2", &listing(&[("r1", "2")])).expect("a2");
        let b2 = j.record(&b, "v2", &listing(&[("q", "1"), ("r1", "1"), ("s", "1")])).expect("b2");
        assert_eq!(j.seq_of(&a, "v1").expect("seq"), Some(a1));
        assert_eq!(j.seq_of(&b, "v1").expect("seq"), Some(b1));
        assert_eq!(j.seq_of(&a, "v3").expect("seq"), None);
        assert_eq!(j.seq_of(&collection("none"), "v1").expect("seq"), None);
        assert_eq!(j.previous_seq(&a, a2).expect("prev"), Some(a1));
        assert_eq!(j.previous_seq(&b, b2).expect("prev"), Some(b1));
        assert_eq!(j.previous_seq(&a, a1).expect("prev"), None);
        assert_eq!(j.previous_seq(&a, b2).expect("prev"), None);
        assert_eq!(j.version_at(&a, a2).expect("version"), Some("v2".into()));
        assert_eq!(j.version_at(&a, b2).expect("version"), None);
        assert_eq!(j.diff(&a, Some(a1), a2).expect("da"), diff(&["r1"], &["r2"]));
        assert_eq!(j.diff(&b, Some(b1), b2).expect("db"), diff(&["s"], &[]));
        assert!(matches!(j.diff(&a, Some(b1), a2), Err(JournalError::NotKept { .. })));
    }

    #[test]
    fn survives_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = collection("c");
        let (s1, s2) = {
            let j = open(&dir);
            let s1 = j.record(&c, "v1", &listing(&[("a", "1"), ("b", "1")])).expect("v1");
            (s1, j.record(&c, "v2", &listing(&[("b", "2")])).expect("v2"))
        };
        let j = open(&dir);
        assert_eq!(j.seq_of(&c, "v1").expect("seq"), Some(s1));
        assert_eq!(j.diff(&c, Some(s1), s2).expect("diff"), diff(&["b"], &["a"]));
        let s3 = j.record(&c, "v3", &listing(&[("b", "2")])).expect("v3");
        assert!(s3 > s2);
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("journal.sqlite");
        drop(VersionJournal::open(&path).expect("open"));
        Connection::open(&path)
            .and_then(|conn| conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1))
            .expect("bump schema");
        assert!(matches!(VersionJournal::open(&path), Err(JournalError::NewerSchema { .. })));
    }

    #[test]
    fn writability_probe_sees_a_foreign_lock_and_a_moved_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let j = open(&dir);
        j.check_writable().expect("a fresh journal is writable");
        let other = Connection::open(dir.path().join("journal.sqlite")).expect("second connection");
        other.execute_batch("BEGIN IMMEDIATE").expect("lock");
        let err = j.check_writable().expect_err("another process holds the write lock");
        assert!(err.to_string().contains("write lock"), "{err}");
        other.execute_batch("ROLLBACK").expect("unlock");
        j.check_writable().expect("writable again");
        let moved = dir.path().join("moved.sqlite");
        std::fs::rename(dir.path().join("journal.sqlite"), &moved).expect("move");
        assert!(matches!(j.check_writable(), Err(JournalError::Replaced { .. })));
        std::fs::rename(&moved, dir.path().join("journal.sqlite")).expect("move back");
        j.check_writable().expect("the same file is back");
    }

    #[test]
    fn opens_in_wal_mode_with_incremental_vacuum() {
        let dir = tempfile::tempdir().expect("tempdir");
        let j = open(&dir);
        let mode: String = j.writer().query_row("PRAGMA journal_mode", [], |row| row.get(0)).expect("mode");
        assert_eq!(mode, "wal");
        assert_eq!(count(&j, "PRAGMA auto_vacuum"), 2);
        assert_eq!(count(&j, "PRAGMA user_version"), SCHEMA_VERSION);
        drop(j);
        assert_eq!(count(&open(&dir), "PRAGMA user_version"), SCHEMA_VERSION, "reopening is idempotent");
    }

    #[test]
    fn storage_grows_with_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let j = open(&dir);
        let c = collection("big");
        let mut entries: Vec<ListingEntry> =
            (0..10_000).map(|i| ListingEntry { id: format!("r{i:05}"), version: "0".into() }).collect();
        for v in 0..50 {
            entries[(v * 197) % 10_000].version = format!("{v}");
            j.record(&c, &format!("v{v}"), &entries).expect("record");
        }
        assert!(count(&j, "SELECT COUNT(*) FROM records") <= 10_100);
        let retention = Retention { max_age: None, max_versions: Some(1) };
        let stats = j.prune(&retention, SystemTime::now()).expect("prune");
        assert_eq!((stats.versions, stats.records), (49, 49));
        assert_eq!(count(&j, "SELECT COUNT(*) FROM records"), 10_000);
        assert_eq!(count(&j, "PRAGMA freelist_count"), 0, "prune gives free pages back");
    }

    #[test]
    fn prune_by_age_keeps_each_newest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let j = open(&dir);
        let (a, b) = (collection("a"), collection("b"));
        for v in 0..4 {
            j.record(&a, &format!("a{v}"), &listing(&[("x", &format!("{v}")), ("y", "1")])).expect("a");
            j.record(&b, &format!("b{v}"), &listing(&[("z", &format!("{v}"))])).expect("b");
        }
        let retention = Retention { max_age: Some(Duration::from_secs(86_400)), max_versions: None };
        let later = SystemTime::now() + Duration::from_secs(10 * 365 * 86_400);
        let stats = j.prune(&retention, later).expect("prune");
        assert_eq!((stats.versions, stats.records), (6, 6));
        assert_eq!(j.seq_of(&a, "a2").expect("seq"), None);
        let a3 = j.seq_of(&a, "a3").expect("seq").expect("newest of a kept");
        assert!(j.seq_of(&b, "b3").expect("seq").is_some());
        assert_eq!(j.diff(&a, None, a3).expect("diff"), diff(&["x", "y"], &[]));
        assert_eq!(j.previous_seq(&a, a3).expect("prev"), None);
        assert!(j.size_bytes().expect("size") > 0);
    }

    #[test]
    fn queries_use_their_indexes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let j = open(&dir);
        let plans = [
            (LIVE_SQL, "records_live (collection=?)", 1),
            (CHANGED_SQL, "records_by_since (collection=? AND since_seq>? AND since_seq<?)", 3),
            (ENDED_SQL, "records_by_until (collection=? AND until_seq>? AND until_seq<?)", 3),
            (
                "SELECT rowid FROM records WHERE collection = ?1 AND until_seq <= ?2 LIMIT ?3",
                "records_by_until (collection=? AND until_seq<?)",
                3,
            ),
        ];
        for (sql, index, params) in plans {
            let conn = j.writer();
            let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).expect("explain");
            let args: Vec<i64> = vec![1; params];
            let details: Vec<String> = stmt
                .query_map(rusqlite::params_from_iter(args), |row| row.get(3))
                .expect("plan")
                .collect::<rusqlite::Result<_>>()
                .expect("plan rows");
            let plan = details.join("; ");
            assert!(plan.contains(&format!("INDEX {index}")), "{sql}: {plan}");
            assert!(!plan.contains("TEMP B-TREE"), "{sql}: {plan}");
        }
    }

    /// xorshift64: deterministic, so a failure replays the same way.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
    }

    type Model = BTreeMap<String, String>;

    fn model_diff(from: &Model, to: &Model) -> Diff {
        Diff {
            changed: to
                .iter()
                .filter(|(id, v)| from.get(*id) != Some(*v))
                .map(|(id, _)| id.clone())
                .collect(),
            deleted: from.keys().filter(|id| !to.contains_key(*id)).cloned().collect(),
        }
    }

    fn entries_of(model: &Model) -> Vec<ListingEntry> {
        model.iter().map(|(id, version)| ListingEntry { id: id.clone(), version: version.clone() }).collect()
    }

    /// Ids whose byte order differs from naive orders: digits, upper case, non-ASCII, U+2028.
    fn id_pool() -> Vec<String> {
        (0..50)
            .map(|i| match i % 5 {
                0 => format!("r{i}"),
                1 => format!("R{i}"),
                2 => format!("é{i}"),
                3 => format!("{i}"),
                _ => format!("r{i}\u{2028}x"),
            })
            .collect()
    }

    /// Random writes and deletes; returns each recorded (seq, listing).
    fn random_history(
        j: &VersionJournal,
        c: &Collection,
        rng: &mut Rng,
        record_versions: &mut u64,
    ) -> Vec<(Seq, Model)> {
        let ids = id_pool();
        let mut model = Model::new();
        let mut history = Vec::new();
        for step in 0..40 {
            for _ in 0..rng.below(6) {
                let id = ids[rng.below(ids.len())].clone();
                if rng.below(3) == 0 {
                    model.remove(&id);
                } else {
                    *record_versions += 1;
                    model.insert(id, record_versions.to_string());
                }
            }
            let version = format!("{step}-{}", rng.below(1_000_000));
            let seq = j.record(c, &version, &entries_of(&model)).expect("record");
            history.push((seq, model.clone()));
        }
        history
    }

    fn check_pairs(j: &VersionJournal, c: &Collection, history: &[(Seq, Model)]) {
        let empty = Model::new();
        for (i, (from, from_model)) in history.iter().enumerate() {
            assert_eq!(j.diff(c, None, *from).expect("diff"), model_diff(&empty, from_model));
            for (to, to_model) in &history[i..] {
                let got = j.diff(c, Some(*from), *to).expect("diff");
                assert_eq!(got, model_diff(from_model, to_model), "{c} {from}..{to}");
            }
        }
    }

    #[test]
    fn diffs_match_a_model() {
        let dir = tempfile::tempdir().expect("tempdir");
        let j = open(&dir);
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut record_versions = 0;
        let histories: Vec<(Collection, Vec<(Seq, Model)>)> = (0..30)
            .map(|n| {
                let c = collection(&format!("c{n}"));
                let history = random_history(&j, &c, &mut rng, &mut record_versions);
                (c, history)
            })
            .collect();
        for (c, history) in &histories {
            check_pairs(&j, c, history);
        }
        let retention = Retention { max_age: None, max_versions: Some(5) };
        j.prune(&retention, SystemTime::now()).expect("prune");
        for (c, history) in &histories {
            let (pruned, kept) = history.split_at(history.len() - 5);
            for (seq, _) in pruned {
                assert_eq!(j.version_at(c, *seq).expect("version_at"), None);
                assert!(matches!(j.diff(c, Some(*seq), kept[0].0), Err(JournalError::NotKept { .. })));
            }
            check_pairs(&j, c, kept);
        }
    }

    /// `cargo test --lib journal::tests::timing -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn timing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let j = open(&dir);
        let c = collection("huge");
        let mut entries: Vec<ListingEntry> = (0..100_000)
            .map(|i| ListingEntry { id: format!("record-{i:06}"), version: "1".into() })
            .collect();
        let start = std::time::Instant::now();
        let first = j.record(&c, "v1", &entries).expect("first");
        println!("record 100,000 records, first time: {:?}", start.elapsed());
        for i in 0..10 {
            entries[i * 9_000].version = "2".into();
        }
        let start = std::time::Instant::now();
        let second = j.record(&c, "v2", &entries).expect("second");
        println!("record 100,000 records, 10 changed: {:?}", start.elapsed());
        let start = std::time::Instant::now();
        let d = j.diff(&c, Some(first), second).expect("diff");
        println!("diff with 10 changes: {:?}", start.elapsed());
        assert_eq!(d.changed.len(), 10);
        let start = std::time::Instant::now();
        j.diff(&c, None, second).expect("full diff");
        println!("diff from nothing (100,000): {:?}", start.elapsed());
        println!("size: {} bytes", j.size_bytes().expect("size"));
    }
}
