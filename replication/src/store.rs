//! The RocksDB-backed versioned object store.
//!
//! Column families:
//! - `objects`: `kind/namespace/name` → resourceVersion (u64 big-endian) ‖ the store revision of
//!   the object's last change (u64 big-endian) ‖ the object's JSON bytes exactly as received;
//! - `meta`: the store's own counters (revision) and callers' watermarks;
//! - `outbox`: the edge's upward reports;
//! - `objectsync`: the cloud's per-node record of acknowledged versions.
//!
//! Every [`WriteSet`] — object changes together with whatever bookkeeping must change with them —
//! is one RocksDB `WriteBatch`: after a crash either all of it is there or none of it.
//! Writes are serialized by one writer lock, which is what makes revisions dense and makes watch
//! events come out in revision order; reads never take it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DBCompressionType, Direction,
    IteratorMode, Options, ReadOptions, WriteBatch, WriteOptions, DB,
};

use crate::change::{Change, ChangeKind, SharedChange};
use crate::key::{KeyError, KeyRange, ObjectKey};
use crate::version::{ResourceVersion, Revision};
use crate::watch::{WatchConfig, WatchHub};

const CF_OBJECTS: &str = "objects";
const CF_META: &str = "meta";
const META_REVISION: &[u8] = b"store/revision";

/// Who decides resourceVersions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Versioning {
    /// The store assigns one global, increasing resourceVersion per change (the cloud's
    /// embedded API server).
    Assign,
    /// Versions are assigned elsewhere and mirrored (the edge mirrors the cloud's).
    Mirror,
}

/// How a [`Store`] is opened: versioning, durability, memory and column families.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Who assigns resourceVersions.
    pub versioning: Versioning,
    /// fsync the WAL on every commit. Off, a killed process still loses nothing (the WAL is in
    /// the OS page cache); only a power loss can take the last commits.
    pub sync_writes: bool,
    /// One LRU block cache shared by all column families.
    pub block_cache_bytes: usize,
    /// Memtable size per column family; all memtables together are capped at 4× this.
    pub write_buffer_bytes: usize,
    /// History and lag limits of the store's [`WatchHub`].
    pub watch: WatchConfig,
    /// The auxiliary column families the store's users write (see [`Aux`]); created on open
    /// if missing. Column families found on disk are opened whether listed or not.
    pub aux: Vec<Aux>,
}

impl StoreConfig {
    /// The cloud: assigns versions, larger caches.
    pub fn cloud() -> Self {
        StoreConfig {
            versioning: Versioning::Assign,
            sync_writes: true,
            block_cache_bytes: 64 << 20,
            write_buffer_bytes: 16 << 20,
            // A fleet's steady writes (a Lease per node every 10 s: 1,000/s at 10,000 nodes)
            // must not cut CloudHub's watch off during a burst; a lagging change costs a
            // broadcast slot and keeps its (shared) bytes alive until read.
            watch: WatchConfig {
                lag_limit: 65_536,
                ..WatchConfig::default()
            },
            aux: vec![Aux::META, Aux::OBJECTSYNC],
        }
    }

    /// An edge node: mirrors versions, small memory footprint.
    pub fn edge() -> Self {
        StoreConfig {
            versioning: Versioning::Mirror,
            sync_writes: true,
            block_cache_bytes: 4 << 20,
            write_buffer_bytes: 2 << 20,
            watch: WatchConfig {
                history: 2_000,
                lag_limit: 1_024,
            },
            aux: vec![Aux::META, Aux::OUTBOX, Aux::OBJECTSYNC],
        }
    }

    /// With `aux` registered too (an owner's own column family).
    pub fn with_aux(mut self, aux: Aux) -> Self {
        if !self.aux.contains(&aux) {
            self.aux.push(aux);
        }
        self
    }
}

/// Why a store operation failed. A failed commit wrote nothing.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// RocksDB failed (IO error, corruption it detected, a lock held by another process).
    #[error("rocksdb: {0}")]
    Db(#[from] rocksdb::Error),
    /// A [`Precondition::Version`] that does not match the object's resourceVersion (HTTP 409).
    #[error("{key}: resourceVersion conflict: expected {expected}, found {actual:?}")]
    Conflict {
        /// The object.
        key: ObjectKey,
        /// The resourceVersion the write expected.
        expected: ResourceVersion,
        /// The object's resourceVersion (`None`: absent).
        actual: Option<ResourceVersion>,
    },
    /// [`Precondition::Absent`] and the object exists (HTTP 409 `AlreadyExists`).
    #[error("{0} already exists")]
    AlreadyExists(ObjectKey),
    /// The object must exist and does not (HTTP 404).
    #[error("{0} not found")]
    NotFound(ObjectKey),
    /// An assigning operation on a mirroring store, or the other way round (a programming error).
    #[error("{op} is not allowed in a store with {versioning:?} versioning")]
    WrongVersioning {
        /// The [`WriteSet`] operation (`put`, `delete`, `mirror_put`, ...).
        op: &'static str,
        /// The store's versioning.
        versioning: Versioning,
    },
    /// A stored record that does not decode (a value shorter than its 16-byte header, a counter
    /// that is not 8 bytes); what was wrong.
    #[error("corrupt store record: {0}")]
    Corrupt(String),
    /// A stored or given key that is not a valid [`ObjectKey`].
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The shared store of a replicated cloud ([`SharedBackend`], etcd) cannot be reached or did
    /// not confirm the write in time; what happened. Nothing was written, or (for a write that
    /// timed out after being sent) the write's outcome is unknown (HTTP 503).
    #[error("shared store unavailable: {0}")]
    Unavailable(String),
}

/// An object's version and bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    /// The object's resourceVersion (assigned here, or mirrored from the cloud).
    pub rv: ResourceVersion,
    /// The store revision of the object's last change. Equal to `rv` in a store that assigns
    /// versions; in a mirror it is the local position an API over this store presents (so that
    /// object versions, list versions and watch positions share one increasing number space,
    /// which mirrored versions, arriving in routing order, do not).
    pub revision: Revision,
    /// The object's JSON, exactly as written.
    pub object: Bytes,
}

/// What must hold for a write in a version-assigning store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    /// No condition: create or replace.
    None,
    /// Create: the object must not exist.
    Absent,
    /// The object must exist.
    Exists,
    /// The object must exist at exactly this version (optimistic concurrency → 409).
    Version(ResourceVersion),
}

/// A bookkeeping column family that a caller writes beside objects, in the same atomic
/// commit. Each owner names its own and registers it in [`StoreConfig::aux`] (or with
/// [`StoreConfig::with_aux`]); the store knows only its own [`Aux::META`]. Using one that was
/// not registered when the store was opened is a programming error (a panic naming it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Aux(&'static str);

impl Aux {
    /// The store's own bookkeeping (the revision), also open to callers' small records.
    pub const META: Aux = Aux(CF_META);
    /// The sync layer's edge outbox (reports not yet acknowledged by the cloud).
    pub const OUTBOX: Aux = Aux("outbox");
    /// The sync layer's ObjectSync records (what each node acknowledged; interests).
    pub const OBJECTSYNC: Aux = Aux("objectsync");

    /// A column family named `name` (RocksDB's name for it on disk).
    pub const fn named(name: &'static str) -> Aux {
        Aux(name)
    }

    /// Its name on disk.
    pub fn name(self) -> &'static str {
        self.0
    }

    fn cf_name(self) -> &'static str {
        self.0
    }
}

#[derive(Debug, Clone)]
enum ObjectOp {
    Put {
        key: ObjectKey,
        object: Bytes,
        expect: Precondition,
    },
    Delete {
        key: ObjectKey,
        expect: Precondition,
    },
    MirrorPut {
        key: ObjectKey,
        rv: ResourceVersion,
        object: Bytes,
    },
    MirrorDelete {
        key: ObjectKey,
        rv: ResourceVersion,
    },
    SetVersion {
        key: ObjectKey,
        rv: ResourceVersion,
    },
    LocalWrite {
        key: ObjectKey,
        object: Bytes,
    },
}

#[derive(Debug, Clone)]
enum AuxOp {
    Put(Aux, Vec<u8>, Vec<u8>),
    Delete(Aux, Vec<u8>),
    DeleteRange(Aux, Vec<u8>, Vec<u8>),
}

/// Object changes and bookkeeping that commit together or not at all.
#[derive(Debug, Clone, Default)]
pub struct WriteSet {
    objects: Vec<ObjectOp>,
    aux: Vec<AuxOp>,
}

impl WriteSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// The set's only operation, if it is one `put` and nothing else: what an API write that
    /// is not committed here (an edge forwarding it) needs to know.
    pub fn into_single_put(self) -> Option<(ObjectKey, Bytes, Precondition)> {
        if !self.aux.is_empty() || self.objects.len() != 1 {
            return None;
        }
        match self.objects.into_iter().next()? {
            ObjectOp::Put {
                key,
                object,
                expect,
            } => Some((key, object, expect)),
            _ => None,
        }
    }

    /// Appends `other`'s writes after this set's (applied in order, as one commit).
    pub fn append(&mut self, other: WriteSet) {
        self.objects.extend(other.objects);
        self.aux.extend(other.aux);
    }

    /// Whether the set has no operation at all.
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty() && self.aux.is_empty()
    }

    /// Assigning store: create or replace, under a precondition; gets the next version.
    pub fn put(&mut self, key: ObjectKey, object: Bytes, expect: Precondition) -> &mut Self {
        self.objects.push(ObjectOp::Put {
            key,
            object,
            expect,
        });
        self
    }

    /// Assigning store: delete under a precondition; the delete gets the next version.
    pub fn delete(&mut self, key: ObjectKey, expect: Precondition) -> &mut Self {
        self.objects.push(ObjectOp::Delete { key, expect });
        self
    }

    /// Mirroring store: the object is now `object` at version `rv`.
    pub fn mirror_put(&mut self, key: ObjectKey, rv: ResourceVersion, object: Bytes) -> &mut Self {
        self.objects.push(ObjectOp::MirrorPut { key, rv, object });
        self
    }

    /// Mirroring store: the object was deleted at version `rv` (no-op if absent).
    pub fn mirror_delete(&mut self, key: ObjectKey, rv: ResourceVersion) -> &mut Self {
        self.objects.push(ObjectOp::MirrorDelete { key, rv });
        self
    }

    /// Mirroring store: the object's bytes are current, only its version moved (no echo).
    pub fn set_version(&mut self, key: ObjectKey, rv: ResourceVersion) -> &mut Self {
        self.objects.push(ObjectOp::SetVersion { key, rv });
        self
    }

    /// Mirroring store: new bytes written locally (the node's own status), version kept until
    /// the cloud assigns one.
    pub fn local_write(&mut self, key: ObjectKey, object: Bytes) -> &mut Self {
        self.objects.push(ObjectOp::LocalWrite { key, object });
        self
    }

    /// Sets `key` to `value` in `aux`.
    pub fn put_aux(&mut self, aux: Aux, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.aux.push(AuxOp::Put(aux, key.into(), value.into()));
    }

    /// Deletes `key` from `aux` (nothing if absent).
    pub fn delete_aux(&mut self, aux: Aux, key: impl Into<Vec<u8>>) {
        self.aux.push(AuxOp::Delete(aux, key.into()));
    }

    /// Deletes every key in `[from, to)`.
    pub fn delete_aux_range(&mut self, aux: Aux, from: impl Into<Vec<u8>>, to: impl Into<Vec<u8>>) {
        self.aux
            .push(AuxOp::DeleteRange(aux, from.into(), to.into()));
    }
}

/// A bookkeeping entry: key and value bytes.
pub type AuxEntry = (Box<[u8]>, Box<[u8]>);

/// One page of a list.
#[derive(Debug, Clone)]
pub struct ListPage {
    /// The objects of this page, in key order.
    pub items: Vec<(ObjectKey, Versioned)>,
    /// The store's revision when the list was read.
    pub revision: Revision,
    /// Where the next page starts, if there is more.
    pub next: Option<ObjectKey>,
}

struct Writer {
    revision: Revision,
}

/// A versioned object store over one RocksDB database; share it behind an `Arc`. Every write
/// is a [`WriteSet`] committed with [`commit`](Store::commit); committed changes are
/// published to [`watch`](Store::watch) in revision order.
pub struct Store {
    db: DB,
    config: StoreConfig,
    /// Every open column family.
    families: Vec<String>,
    writer: Mutex<Writer>,
    /// Signalled whenever the revision advances ([`Store::wait_for_revision`]).
    advanced: Condvar,
    watch: Arc<WatchHub>,
    /// Where object writes are decided when this store is a replica's cache of a shared store.
    backend: OnceLock<Arc<dyn SharedBackend>>,
}

/// One object write of a [`WriteSet`], as a [`SharedBackend`] receives it.
#[derive(Debug, Clone)]
pub struct SharedOp {
    /// The object.
    pub key: ObjectKey,
    /// Its new JSON; `None` deletes it.
    pub object: Option<Bytes>,
    /// What must hold for the write (a delete with [`Precondition::None`] arrives as
    /// [`Precondition::Exists`]).
    pub expect: Precondition,
}

/// One change applied by [`Store::apply_replicated`]: a write decided by the shared store.
#[derive(Debug, Clone)]
pub struct ReplicatedChange {
    /// Its revision (and resourceVersion), as the shared store's replicas all compute it.
    pub revision: Revision,
    /// The object.
    pub key: ObjectKey,
    /// Its JSON after the change; `None`: deleted.
    pub object: Option<Bytes>,
}

/// The shared store behind a replicated cloud (high availability: several cloudcores on one
/// etcd). A [`Store`] with a backend is that replica's cache and watch cache: reads and
/// watches are served from it, and [`Store::commit`] hands the object writes of each
/// [`WriteSet`] to the backend, which decides them atomically (preconditions included) and
/// returns once this store has applied them through [`Store::apply_replicated`], so a reader
/// after a write sees it. Bookkeeping ([`Aux`]) stays local to the replica.
pub trait SharedBackend: Send + Sync {
    /// Commits `ops` atomically in the shared store, in order; returns the changes as this
    /// store applied them.
    ///
    /// # Errors
    /// [`StoreError::AlreadyExists`], [`StoreError::NotFound`] or [`StoreError::Conflict`] for a
    /// failed precondition (nothing written); [`StoreError::Unavailable`] when the shared store
    /// cannot be reached or this replica did not see the write in time.
    fn commit(&self, ops: Vec<SharedOp>) -> Result<Vec<SharedChange>, StoreError>;

    /// Whether the shared store answered lately. A replica cut off from it serves stale state:
    /// it should give its nodes up so that they move to a replica that can serve them.
    fn available(&self) -> bool {
        true
    }
}

fn encode_value(rv: ResourceVersion, revision: Revision, object: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(16 + object.len());
    value.extend_from_slice(&rv.to_be_bytes());
    value.extend_from_slice(&revision.to_be_bytes());
    value.extend_from_slice(object);
    value
}

fn decode_value(value: Vec<u8>) -> Result<Versioned, StoreError> {
    if value.len() < 16 {
        return Err(StoreError::Corrupt(format!(
            "object value of {} bytes",
            value.len()
        )));
    }
    let rv = ResourceVersion(decode_u64(&value[..8])?);
    let revision = Revision(decode_u64(&value[8..16])?);
    Ok(Versioned {
        rv,
        revision,
        object: Bytes::from(value).slice(16..),
    })
}

/// Reads a big-endian u64 stored by [`u64::to_be_bytes`].
///
/// # Errors
/// [`StoreError::Corrupt`] when `bytes` is not 8 bytes long.
pub fn decode_u64(bytes: &[u8]) -> Result<u64, StoreError> {
    let array: [u8; 8] = bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt(format!("expected 8 bytes, found {}", bytes.len())))?;
    Ok(u64::from_be_bytes(array))
}

impl Store {
    /// Opens (or creates) the database in directory `path` with the `objects` and `meta` column
    /// families, those in `config.aux`, and any others on disk; reads the revision back. One
    /// process at a time: RocksDB locks the directory.
    ///
    /// # Errors
    /// [`StoreError::Db`] when RocksDB cannot open or read the database (another process holds
    /// it, IO error, corruption); [`StoreError::Corrupt`] when the stored revision is not 8 bytes.
    pub fn open(path: impl AsRef<Path>, config: StoreConfig) -> Result<Store, StoreError> {
        let cache = Cache::new_lru_cache(config.block_cache_bytes);
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&cache);
        table.set_block_size(16 << 10);
        // Point gets dominate (one key per object); a 10-bit bloom filter skips ~99% of
        // needless SST reads. Filters and indexes live in the bounded cache, not beside it.
        table.set_bloom_filter(10.0, false);
        table.set_cache_index_and_filter_blocks(true);
        table.set_pin_l0_filter_and_index_blocks_in_cache(true);

        let cf_options = || {
            let mut cf = Options::default();
            cf.set_block_based_table_factory(&table);
            // JSON compresses well: LZ4 is cheap on the hot levels, ZSTD where data settles.
            cf.set_compression_type(DBCompressionType::Lz4);
            cf.set_bottommost_compression_type(DBCompressionType::Zstd);
            cf.set_write_buffer_size(config.write_buffer_bytes);
            cf.set_max_write_buffer_number(2);
            cf
        };
        let mut db_options = Options::default();
        db_options.create_if_missing(true);
        db_options.create_missing_column_families(true);
        db_options.increase_parallelism(2);
        db_options.set_max_background_jobs(2);
        db_options.set_db_write_buffer_size(config.write_buffer_bytes * 4);
        // Bound the WAL so small column families do not pin old log files forever.
        db_options.set_max_total_wal_size((config.write_buffer_bytes * 8) as u64);
        db_options.set_keep_log_file_num(2);
        db_options.set_max_open_files(512);

        // The registered families, and any others already on disk (RocksDB opens a store
        // only with all of its column families).
        let mut names: Vec<String> = vec![CF_OBJECTS.to_owned(), CF_META.to_owned()];
        for aux in &config.aux {
            names.push(aux.name().to_owned());
        }
        if let Ok(existing) = DB::list_cf(&Options::default(), path.as_ref()) {
            names.extend(existing);
        }
        names.retain(|n| n != "default");
        names.sort();
        names.dedup();
        let families = names
            .iter()
            .map(|name| ColumnFamilyDescriptor::new(name, cf_options()));
        let db = DB::open_cf_descriptors(&db_options, path.as_ref(), families)?;
        let revision = match db.get_cf(db.cf_handle(CF_META).expect("created"), META_REVISION)? {
            Some(bytes) => Revision(decode_u64(&bytes)?),
            None => Revision::ZERO,
        };
        let watch = Arc::new(WatchHub::new(config.watch, revision));
        Ok(Store {
            db,
            config,
            families: names,
            writer: Mutex::new(Writer { revision }),
            advanced: Condvar::new(),
            watch,
            backend: OnceLock::new(),
        })
    }

    fn cf(&self, name: &str) -> &ColumnFamily {
        self.db.cf_handle(name).unwrap_or_else(|| {
            panic!("column family {name:?} was not registered in StoreConfig::aux")
        })
    }

    fn lock_writer(&self) -> MutexGuard<'_, Writer> {
        // The writer's state is only updated after a successful write; poison is harmless.
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes this store a replica's cache of `backend`: from now on object writes go there
    /// (see [`SharedBackend`]). Set once, before the store is shared.
    ///
    /// # Errors
    /// [`StoreError::WrongVersioning`] for a mirroring store or one that has a backend already.
    pub fn set_backend(&self, backend: Arc<dyn SharedBackend>) -> Result<(), StoreError> {
        let refuse = StoreError::WrongVersioning {
            op: "set_backend",
            versioning: self.config.versioning,
        };
        if self.config.versioning != Versioning::Assign {
            return Err(refuse);
        }
        self.backend.set(backend).map_err(|_| refuse)
    }

    /// Whether the store can be written: always for a store of its own; for a replica, whether
    /// its [`SharedBackend`] answered lately.
    pub fn is_available(&self) -> bool {
        self.backend.get().is_none_or(|b| b.available())
    }

    /// Whether object writes are decided by a [`SharedBackend`].
    pub fn is_replicated(&self) -> bool {
        self.backend.get().is_some()
    }

    /// Waits until the store's revision reaches `revision`; whether it did within `timeout`.
    pub fn wait_for_revision(&self, revision: Revision, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut writer = self.lock_writer();
        while writer.revision < revision {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            writer = self
                .advanced
                .wait_timeout(writer, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Applies writes decided by the shared store (a replica's watch of it), each at its given
    /// revision (resourceVersion == revision), in one atomic batch, and publishes them to
    /// watchers. Revisions must increase and be above the store's.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] for a revision not above the one before it,
    /// [`StoreError::Db`] when RocksDB fails (nothing applied).
    pub fn apply_replicated(
        &self,
        changes: Vec<ReplicatedChange>,
    ) -> Result<Vec<SharedChange>, StoreError> {
        let mut writer = self.lock_writer();
        let mut batch = WriteBatch::default();
        let objects = self.cf(CF_OBJECTS);
        let mut overlay: HashMap<ObjectKey, Option<Bytes>> = HashMap::new();
        let mut last = writer.revision;
        let mut out = Vec::with_capacity(changes.len());
        for change in changes {
            if change.revision <= last {
                return Err(StoreError::Corrupt(format!(
                    "replicated revision {} is not above {last}",
                    change.revision
                )));
            }
            last = change.revision;
            let prev = match overlay.get(&change.key) {
                Some(state) => state.clone(),
                None => self.get(&change.key)?.map(|v| v.object),
            };
            let rv: ResourceVersion = change.revision.into();
            let (kind, object) = match change.object {
                Some(object) => {
                    batch.put_cf(
                        objects,
                        change.key.as_bytes(),
                        encode_value(rv, change.revision, &object),
                    );
                    let kind = if prev.is_some() {
                        ChangeKind::Modified
                    } else {
                        ChangeKind::Added
                    };
                    (kind, object)
                }
                // A delete of an object this replica never saw changes nothing here.
                None => match prev.clone() {
                    Some(last) => {
                        batch.delete_cf(objects, change.key.as_bytes());
                        (ChangeKind::Deleted, last)
                    }
                    None => continue,
                },
            };
            overlay.insert(
                change.key.clone(),
                (kind != ChangeKind::Deleted).then(|| object.clone()),
            );
            out.push(Arc::new(
                Change::new(change.revision, change.key, rv, kind, object).with_prev(prev),
            ));
        }
        if last == writer.revision {
            return Ok(out);
        }
        batch.put_cf(self.cf(CF_META), META_REVISION, last.to_be_bytes());
        let mut options = WriteOptions::default();
        // The shared store holds the truth; the cache is rebuilt from it after a crash.
        options.set_sync(false);
        self.db.write_opt(batch, &options)?;
        writer.revision = last;
        self.watch.publish(&out);
        self.advanced.notify_all();
        Ok(out)
    }

    /// Replaces every object with `objects` (a replica's initial list of the shared store, at
    /// `revision`) and restarts the watch history at `revision`. For a cache nobody watches
    /// yet: watchers already subscribed see none of it.
    ///
    /// # Errors
    /// [`StoreError::Db`] when RocksDB fails.
    pub fn reset_replicated(
        &self,
        objects: Vec<(ObjectKey, Revision, Bytes)>,
        revision: Revision,
    ) -> Result<(), StoreError> {
        let mut writer = self.lock_writer();
        let cf = self.cf(CF_OBJECTS);
        let mut batch = WriteBatch::default();
        let stale: Vec<Box<[u8]>> = self
            .db
            .iterator_cf(cf, IteratorMode::Start)
            .map(|item| item.map(|(key, _)| key))
            .collect::<Result<_, _>>()?;
        for key in stale {
            batch.delete_cf(cf, key);
        }
        for (key, rev, object) in objects {
            batch.put_cf(cf, key.as_bytes(), encode_value(rev.into(), rev, &object));
        }
        batch.put_cf(self.cf(CF_META), META_REVISION, revision.to_be_bytes());
        self.db.write(batch)?;
        writer.revision = revision;
        self.watch.restart_at(revision);
        self.advanced.notify_all();
        Ok(())
    }

    /// Who assigns versions in this store (as opened).
    pub fn versioning(&self) -> Versioning {
        self.config.versioning
    }

    /// The revision of the latest committed change.
    pub fn revision(&self) -> Revision {
        self.lock_writer().revision
    }

    /// The hub that fans committed changes out to watchers.
    pub fn watch(&self) -> &Arc<WatchHub> {
        &self.watch
    }

    /// The object at `key`, or `None` when there is none.
    ///
    /// # Errors
    /// [`StoreError::Db`] when RocksDB cannot read, [`StoreError::Corrupt`] when the stored value
    /// does not decode.
    pub fn get(&self, key: &ObjectKey) -> Result<Option<Versioned>, StoreError> {
        match self.db.get_cf(self.cf(CF_OBJECTS), key.as_bytes())? {
            Some(value) => Ok(Some(decode_value(value)?)),
            None => Ok(None),
        }
    }

    /// Iterates over the objects in `range` in key order, reading as it goes.
    ///
    /// Each item fails on its own: [`StoreError::Db`] for a read error, [`StoreError::Corrupt`] or
    /// [`StoreError::Key`] for a record that does not decode.
    pub fn scan(
        &self,
        range: &KeyRange,
    ) -> impl Iterator<Item = Result<(ObjectKey, Versioned), StoreError>> + '_ {
        self.scan_from(range, range.prefix())
    }

    /// Iterates over the objects in `range` after `after` (from the start when `None`).
    pub fn scan_after(
        &self,
        range: &KeyRange,
        after: Option<&ObjectKey>,
    ) -> impl Iterator<Item = Result<(ObjectKey, Versioned), StoreError>> + '_ {
        let start = match after {
            // The smallest key greater than `after`.
            Some(key) => {
                let mut start = key.as_bytes().to_vec();
                start.push(0);
                start
            }
            None => range.prefix().to_vec(),
        };
        self.scan_from(range, &start)
    }

    fn scan_from(
        &self,
        range: &KeyRange,
        start: &[u8],
    ) -> impl Iterator<Item = Result<(ObjectKey, Versioned), StoreError>> + '_ {
        let mut read = ReadOptions::default();
        if let Some(upper) = range.upper_bound() {
            read.set_iterate_upper_bound(upper);
        }
        self.db
            .iterator_cf_opt(
                self.cf(CF_OBJECTS),
                read,
                IteratorMode::From(start, Direction::Forward),
            )
            .map(|item| {
                let (key, value) = item?;
                Ok((
                    ObjectKey::from_stored(&key)?,
                    decode_value(value.into_vec())?,
                ))
            })
    }

    /// One page of at most `limit` objects in `range`, starting after `after`.
    ///
    /// A `limit` of 0 counts as 1. The page's `revision` is read before the scan: objects in the page
    /// may be newer than it.
    ///
    /// # Errors
    /// As [`get`](Self::get), for any object read, and [`StoreError::Key`] for a stored key that
    /// is not a valid object key.
    pub fn list(
        &self,
        range: &KeyRange,
        after: Option<&ObjectKey>,
        limit: usize,
    ) -> Result<ListPage, StoreError> {
        let revision = self.revision();
        let mut items = Vec::new();
        let mut next = None;
        for item in self.scan_after(range, after) {
            let (key, value) = item?;
            if items.len() == limit.max(1) {
                next = items
                    .last()
                    .map(|(k, _): &(ObjectKey, Versioned)| k.clone());
                break;
            }
            items.push((key, value));
        }
        Ok(ListPage {
            items,
            revision,
            next,
        })
    }

    /// The value at `key` in `aux`, or `None`. Panics if `aux` was not registered when the store
    /// was opened.
    ///
    /// # Errors
    /// [`StoreError::Db`] when RocksDB cannot read.
    pub fn get_aux(&self, aux: Aux, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get_cf(self.cf(aux.cf_name()), key)?)
    }

    /// Every bookkeeping entry whose key starts with `prefix`, in key order.
    ///
    /// Panics if `aux` was not registered. Each item fails on its own with [`StoreError::Db`] for
    /// a read error.
    pub fn scan_aux(
        &self,
        aux: Aux,
        prefix: &[u8],
    ) -> impl Iterator<Item = Result<AuxEntry, StoreError>> + '_ {
        let prefix = prefix.to_vec();
        self.db
            .iterator_cf(
                self.cf(aux.cf_name()),
                IteratorMode::From(&prefix, Direction::Forward),
            )
            .map(|item| item.map_err(StoreError::from))
            .take_while(move |item| match item {
                Ok((key, _)) => key.starts_with(&prefix),
                Err(_) => true,
            })
    }

    fn check(
        &self,
        versioning: Versioning,
        op: &'static str,
        key: &ObjectKey,
        current: Option<&Versioned>,
        expect: Precondition,
    ) -> Result<(), StoreError> {
        if self.config.versioning != versioning {
            return Err(StoreError::WrongVersioning {
                op,
                versioning: self.config.versioning,
            });
        }
        match (expect, current) {
            (Precondition::None, _) => Ok(()),
            (Precondition::Absent, None) => Ok(()),
            (Precondition::Absent, Some(_)) => Err(StoreError::AlreadyExists(key.clone())),
            (Precondition::Exists, Some(_)) => Ok(()),
            (Precondition::Exists, None) => Err(StoreError::NotFound(key.clone())),
            (Precondition::Version(expected), Some(v)) if v.rv == expected => Ok(()),
            (Precondition::Version(expected), Some(v)) => Err(StoreError::Conflict {
                key: key.clone(),
                expected,
                actual: Some(v.rv),
            }),
            (Precondition::Version(_), None) => Err(StoreError::NotFound(key.clone())),
        }
    }

    /// Commits `set` atomically and returns the changes it made, in revision order. On error
    /// nothing is written.
    ///
    /// Operations apply in order, each seeing the ones before it; each object change takes the
    /// next revision, and an assigning store uses it as the resourceVersion. A `delete` without
    /// precondition needs the object to exist; a `mirror_delete` of an absent object is no change.
    /// The WAL is fsynced when [`StoreConfig::sync_writes`] is on.
    ///
    /// # Errors
    /// [`StoreError::AlreadyExists`], [`StoreError::NotFound`] or [`StoreError::Conflict`] when a
    /// precondition fails (a `set_version` or `local_write` also needs the object to exist),
    /// [`StoreError::WrongVersioning`] for an operation of the other versioning,
    /// [`StoreError::Db`] or [`StoreError::Corrupt`] when reading or writing fails.
    pub fn commit(&self, set: WriteSet) -> Result<Vec<SharedChange>, StoreError> {
        if let Some(backend) = self.backend.get() {
            return self.commit_shared(backend.as_ref(), set);
        }
        let mut writer = self.lock_writer();
        let mut revision = writer.revision;
        let mut batch = WriteBatch::default();
        // Objects touched earlier in this set, as they will be after it.
        let mut overlay: HashMap<ObjectKey, Option<Versioned>> = HashMap::new();
        let mut changes = Vec::with_capacity(set.objects.len());
        let objects = self.cf(CF_OBJECTS);

        for op in set.objects {
            let key = match &op {
                ObjectOp::Put { key, .. }
                | ObjectOp::Delete { key, .. }
                | ObjectOp::MirrorPut { key, .. }
                | ObjectOp::MirrorDelete { key, .. }
                | ObjectOp::SetVersion { key, .. }
                | ObjectOp::LocalWrite { key, .. } => key.clone(),
            };
            let current = match overlay.get(&key) {
                Some(state) => state.clone(),
                None => self.get(&key)?,
            };
            // The state before this change, for filtered watches (shared bytes, no copy).
            let prev = current.as_ref().map(|v| v.object.clone());
            let (kind, rv, object) = match op {
                ObjectOp::Put { object, expect, .. } => {
                    self.check(Versioning::Assign, "put", &key, current.as_ref(), expect)?;
                    let kind = if current.is_some() {
                        ChangeKind::Modified
                    } else {
                        ChangeKind::Added
                    };
                    (kind, revision.next().into(), object)
                }
                ObjectOp::Delete { expect, .. } => {
                    if current.is_none() && self.config.versioning == Versioning::Assign {
                        return Err(StoreError::NotFound(key));
                    }
                    let expect = match expect {
                        Precondition::None => Precondition::Exists,
                        other => other,
                    };
                    self.check(Versioning::Assign, "delete", &key, current.as_ref(), expect)?;
                    let last = current.map(|v| v.object).unwrap_or_default();
                    (ChangeKind::Deleted, revision.next().into(), last)
                }
                ObjectOp::MirrorPut { rv, object, .. } => {
                    let none = Precondition::None;
                    self.check(Versioning::Mirror, "mirror_put", &key, None, none)?;
                    let kind = if current.is_some() {
                        ChangeKind::Modified
                    } else {
                        ChangeKind::Added
                    };
                    (kind, rv, object)
                }
                ObjectOp::MirrorDelete { rv, .. } => {
                    let none = Precondition::None;
                    self.check(Versioning::Mirror, "mirror_delete", &key, None, none)?;
                    match current {
                        Some(last) => (ChangeKind::Deleted, rv, last.object),
                        None => continue,
                    }
                }
                ObjectOp::SetVersion { rv, .. } => {
                    let exists = Precondition::Exists;
                    self.check(
                        Versioning::Mirror,
                        "set_version",
                        &key,
                        current.as_ref(),
                        exists,
                    )?;
                    let object = current.map(|v| v.object).unwrap_or_default();
                    (ChangeKind::Modified, rv, object)
                }
                ObjectOp::LocalWrite { object, .. } => {
                    let exists = Precondition::Exists;
                    self.check(
                        Versioning::Mirror,
                        "local_write",
                        &key,
                        current.as_ref(),
                        exists,
                    )?;
                    let rv = current.map(|v| v.rv).unwrap_or_default();
                    (ChangeKind::Modified, rv, object)
                }
            };
            revision = revision.next();
            if kind == ChangeKind::Deleted {
                batch.delete_cf(objects, key.as_bytes());
                overlay.insert(key.clone(), None);
            } else {
                batch.put_cf(objects, key.as_bytes(), encode_value(rv, revision, &object));
                overlay.insert(
                    key.clone(),
                    Some(Versioned {
                        rv,
                        revision,
                        object: object.clone(),
                    }),
                );
            }
            changes.push(Arc::new(
                Change::new(revision, key, rv, kind, object).with_prev(prev),
            ));
        }

        self.add_aux(&mut batch, set.aux);
        if revision != writer.revision {
            batch.put_cf(self.cf(CF_META), META_REVISION, revision.to_be_bytes());
        }
        if batch.is_empty() {
            return Ok(changes);
        }
        let mut options = WriteOptions::default();
        options.set_sync(self.config.sync_writes);
        self.db.write_opt(batch, &options)?;
        writer.revision = revision;
        self.watch.publish(&changes);
        self.advanced.notify_all();
        Ok(changes)
    }

    /// [`commit`](Self::commit) in a replica: the object writes go to the shared store (an
    /// object written twice in one set becomes one write, with the first precondition and the
    /// last content), then the bookkeeping is written here.
    fn commit_shared(
        &self,
        backend: &dyn SharedBackend,
        set: WriteSet,
    ) -> Result<Vec<SharedChange>, StoreError> {
        let mut ops: Vec<SharedOp> = Vec::with_capacity(set.objects.len());
        let mut index: HashMap<ObjectKey, usize> = HashMap::new();
        for op in set.objects {
            let (key, object, expect) = match op {
                ObjectOp::Put {
                    key,
                    object,
                    expect,
                } => (key, Some(object), expect),
                ObjectOp::Delete { key, expect } => {
                    let expect = match expect {
                        Precondition::None => Precondition::Exists,
                        other => other,
                    };
                    (key, None, expect)
                }
                ObjectOp::MirrorPut { .. } => return Err(self.wrong("mirror_put")),
                ObjectOp::MirrorDelete { .. } => return Err(self.wrong("mirror_delete")),
                ObjectOp::SetVersion { .. } => return Err(self.wrong("set_version")),
                ObjectOp::LocalWrite { .. } => return Err(self.wrong("local_write")),
            };
            match index.get(&key) {
                Some(&at) => ops[at].object = object,
                None => {
                    index.insert(key.clone(), ops.len());
                    ops.push(SharedOp {
                        key,
                        object,
                        expect,
                    });
                }
            }
        }
        let changes = if ops.is_empty() {
            Vec::new()
        } else {
            // A round trip to the shared store: on a multi-threaded runtime the worker hands
            // its other tasks on while it waits, so writes from many requests overlap.
            match tokio::runtime::Handle::try_current() {
                Ok(handle)
                    if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread =>
                {
                    tokio::task::block_in_place(|| backend.commit(ops))?
                }
                _ => backend.commit(ops)?,
            }
        };
        if !set.aux.is_empty() {
            let _writer = self.lock_writer();
            let mut batch = WriteBatch::default();
            self.add_aux(&mut batch, set.aux);
            self.db.write(batch)?;
        }
        Ok(changes)
    }

    /// The bookkeeping writes of a set, into `batch`.
    fn add_aux(&self, batch: &mut WriteBatch, ops: Vec<AuxOp>) {
        for op in ops {
            match op {
                AuxOp::Put(aux, key, value) => batch.put_cf(self.cf(aux.cf_name()), key, value),
                AuxOp::Delete(aux, key) => batch.delete_cf(self.cf(aux.cf_name()), key),
                AuxOp::DeleteRange(aux, from, to) => {
                    batch.delete_range_cf(self.cf(aux.cf_name()), from, to)
                }
            }
        }
    }

    fn wrong(&self, op: &'static str) -> StoreError {
        StoreError::WrongVersioning {
            op,
            versioning: self.config.versioning,
        }
    }

    /// Flushes memtables (tests and benchmarks use this to measure steady state).
    ///
    /// # Errors
    /// [`StoreError::Db`] when RocksDB cannot flush.
    pub fn flush(&self) -> Result<(), StoreError> {
        for name in &self.families {
            self.db.flush_cf(self.cf(name))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> ObjectKey {
        ObjectKey::parse(s).unwrap()
    }

    fn open(dir: &Path, versioning: Versioning) -> Store {
        let mut config = StoreConfig::edge();
        config.versioning = versioning;
        config.sync_writes = false;
        Store::open(dir, config).unwrap()
    }

    #[test]
    fn an_owners_column_family_is_kept_by_a_store_opened_without_it() {
        let dir = tempfile::tempdir().unwrap();
        let mine = Aux::named("owner-records");
        let config = StoreConfig::edge().with_aux(mine);
        let store = Store::open(dir.path(), config).unwrap();
        let mut set = WriteSet::new();
        set.put_aux(mine, b"k".to_vec(), b"v".to_vec());
        store.commit(set).unwrap();
        drop(store);
        // Opened by a program that does not know the family: it opens, and the records stay.
        let store = Store::open(dir.path(), StoreConfig::edge()).unwrap();
        store.flush().unwrap();
        assert_eq!(
            store.get_aux(mine, b"k").unwrap().as_deref(),
            Some(&b"v"[..])
        );
    }

    #[test]
    fn assigned_versions_preconditions_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path(), Versioning::Assign);
            let mut set = WriteSet::new();
            set.put(
                key("pods/a/x"),
                Bytes::from_static(b"1"),
                Precondition::Absent,
            );
            set.put(
                key("pods/a/y"),
                Bytes::from_static(b"2"),
                Precondition::Absent,
            );
            let changes = store.commit(set).unwrap();
            assert_eq!(
                changes.iter().map(|c| c.rv.get()).collect::<Vec<_>>(),
                vec![1, 2]
            );
            let mut set = WriteSet::new();
            set.put(
                key("pods/a/x"),
                Bytes::from_static(b"3"),
                Precondition::Version(ResourceVersion(7)),
            );
            assert!(matches!(
                store.commit(set),
                Err(StoreError::Conflict {
                    actual: Some(ResourceVersion(1)),
                    ..
                })
            ));
            let mut set = WriteSet::new();
            set.put(
                key("pods/a/y"),
                Bytes::from_static(b"x"),
                Precondition::Absent,
            );
            assert!(matches!(
                store.commit(set),
                Err(StoreError::AlreadyExists(_))
            ));
            let mut set = WriteSet::new();
            set.delete(key("pods/a/x"), Precondition::Version(ResourceVersion(1)));
            let deleted = store.commit(set).unwrap();
            assert_eq!(deleted[0].kind, ChangeKind::Deleted);
            assert_eq!(deleted[0].object, Bytes::from_static(b"1"));
            let mut set = WriteSet::new();
            set.mirror_put(key("pods/a/z"), ResourceVersion(5), Bytes::new());
            assert!(matches!(
                store.commit(set),
                Err(StoreError::WrongVersioning { .. })
            ));
        }
        let store = open(dir.path(), Versioning::Assign);
        assert_eq!(store.revision(), Revision(3));
        assert_eq!(store.get(&key("pods/a/x")).unwrap(), None);
        assert_eq!(
            store.get(&key("pods/a/y")).unwrap().unwrap().rv,
            ResourceVersion(2)
        );
    }

    #[test]
    fn failed_precondition_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), Versioning::Assign);
        let mut set = WriteSet::new();
        set.put(
            key("pods/a/x"),
            Bytes::from_static(b"1"),
            Precondition::Absent,
        );
        set.put_aux(Aux::META, b"m".to_vec(), b"v".to_vec());
        set.delete(key("pods/a/missing"), Precondition::None);
        assert!(matches!(store.commit(set), Err(StoreError::NotFound(_))));
        assert_eq!(store.get(&key("pods/a/x")).unwrap(), None);
        assert_eq!(store.get_aux(Aux::META, b"m").unwrap(), None);
        assert_eq!(store.revision(), Revision(0));
    }

    #[test]
    fn mirrored_versions_local_writes_and_bumps() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), Versioning::Mirror);
        let k = key("pods/a/x");
        let mut set = WriteSet::new();
        set.mirror_put(k.clone(), ResourceVersion(40), Bytes::from_static(b"spec"));
        store.commit(set).unwrap();
        let mut set = WriteSet::new();
        set.local_write(k.clone(), Bytes::from_static(b"spec+status"));
        store.commit(set).unwrap();
        assert_eq!(store.get(&k).unwrap().unwrap().rv, ResourceVersion(40));
        let mut set = WriteSet::new();
        set.set_version(k.clone(), ResourceVersion(42));
        store.commit(set).unwrap();
        let now = store.get(&k).unwrap().unwrap();
        assert_eq!(
            (now.rv, now.object),
            (ResourceVersion(42), Bytes::from_static(b"spec+status"))
        );
        assert_eq!(
            store.revision(),
            Revision(3),
            "local revisions count changes"
        );
        let mut set = WriteSet::new();
        set.mirror_delete(key("pods/a/never"), ResourceVersion(50));
        assert!(store.commit(set).unwrap().is_empty());
    }

    /// A shared store of one replica: decides writes by the cache's own state, then applies
    /// them at revisions `1000 × n + i` as a replica's watch would.
    struct Loopback {
        store: std::sync::Weak<Store>,
        next: Mutex<u64>,
        seen: Mutex<Vec<Vec<SharedOp>>>,
    }

    impl SharedBackend for Loopback {
        fn commit(&self, ops: Vec<SharedOp>) -> Result<Vec<SharedChange>, StoreError> {
            let store = self.store.upgrade().unwrap();
            for op in &ops {
                let current = store.get(&op.key)?;
                match (op.expect, &current) {
                    (Precondition::Absent, Some(_)) => {
                        return Err(StoreError::AlreadyExists(op.key.clone()))
                    }
                    (Precondition::Exists | Precondition::Version(_), None) => {
                        return Err(StoreError::NotFound(op.key.clone()))
                    }
                    (Precondition::Version(rv), Some(v)) if v.rv != rv => {
                        return Err(StoreError::Conflict {
                            key: op.key.clone(),
                            expected: rv,
                            actual: Some(v.rv),
                        })
                    }
                    _ => {}
                }
            }
            self.seen.lock().unwrap().push(ops.clone());
            let mut next = self.next.lock().unwrap();
            *next += 1;
            let changes = ops
                .into_iter()
                .enumerate()
                .map(|(i, op)| ReplicatedChange {
                    revision: Revision(*next * 1000 + i as u64),
                    key: op.key,
                    object: op.object,
                })
                .collect();
            store.apply_replicated(changes)
        }
    }

    fn replica(dir: &Path) -> (Arc<Store>, Arc<Loopback>) {
        let mut config = StoreConfig::cloud();
        config.sync_writes = false;
        let store = Arc::new(Store::open(dir, config).unwrap());
        let backend = Arc::new(Loopback {
            store: Arc::downgrade(&store),
            next: Mutex::new(0),
            seen: Mutex::new(Vec::new()),
        });
        store.set_backend(backend.clone()).unwrap();
        (store, backend)
    }

    #[test]
    fn a_replica_hands_object_writes_to_its_backend_and_keeps_bookkeeping_local() {
        let dir = tempfile::tempdir().unwrap();
        let (store, backend) = replica(dir.path());
        assert!(store.is_replicated());
        let mut watcher = store
            .watch()
            .subscribe(KeyRange::kind("pods").unwrap(), None)
            .unwrap();
        let mut set = WriteSet::new();
        set.put(
            key("pods/a/x"),
            Bytes::from_static(b"1"),
            Precondition::Absent,
        );
        set.put(
            key("pods/a/y"),
            Bytes::from_static(b"2"),
            Precondition::Absent,
        );
        // Written twice in one set: one write, the first precondition, the last content.
        set.put(
            key("pods/a/x"),
            Bytes::from_static(b"1b"),
            Precondition::None,
        );
        set.put_aux(Aux::META, b"mark".to_vec(), b"v".to_vec());
        let changes = store.commit(set).unwrap();
        assert_eq!(
            changes.iter().map(|c| c.revision.get()).collect::<Vec<_>>(),
            vec![1000, 1001]
        );
        let sent = backend.seen.lock().unwrap()[0].clone();
        assert_eq!(sent.len(), 2);
        assert_eq!(sent[0].expect, Precondition::Absent);
        assert_eq!(sent[0].object.as_deref(), Some(&b"1b"[..]));
        assert_eq!(store.get_aux(Aux::META, b"mark").unwrap().unwrap(), b"v");
        let x = store.get(&key("pods/a/x")).unwrap().unwrap();
        assert_eq!((x.rv, x.revision), (ResourceVersion(1000), Revision(1000)));
        assert_eq!(store.revision(), Revision(1001));
        assert_eq!(watcher.try_next().unwrap().unwrap().key, key("pods/a/x"));
        assert_eq!(watcher.try_next().unwrap().unwrap().key, key("pods/a/y"));

        // A delete without precondition must find the object; a mirror write is refused.
        let mut set = WriteSet::new();
        set.delete(key("pods/a/y"), Precondition::None);
        let deleted = store.commit(set).unwrap();
        assert_eq!(deleted[0].kind, ChangeKind::Deleted);
        assert_eq!(deleted[0].object, Bytes::from_static(b"2"));
        assert_eq!(
            backend.seen.lock().unwrap()[1][0].expect,
            Precondition::Exists
        );
        let mut set = WriteSet::new();
        set.mirror_put(key("pods/a/z"), ResourceVersion(1), Bytes::new());
        assert!(matches!(
            store.commit(set),
            Err(StoreError::WrongVersioning { .. })
        ));
        // The backend's verdict comes back as is.
        let mut set = WriteSet::new();
        set.put(
            key("pods/a/x"),
            Bytes::new(),
            Precondition::Version(ResourceVersion(7)),
        );
        assert!(matches!(
            store.commit(set),
            Err(StoreError::Conflict { .. })
        ));
    }

    #[test]
    fn replicated_changes_apply_in_revision_order_and_a_reset_reloads_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = replica(dir.path());
        let change = |rev: u64, k: &str, object: Option<&'static [u8]>| ReplicatedChange {
            revision: Revision(rev),
            key: key(k),
            object: object.map(Bytes::from_static),
        };
        store
            .apply_replicated(vec![
                change(5000, "pods/a/x", Some(b"1")),
                change(5001, "pods/a/x", Some(b"2")),
                // Deleted before this replica saw it: nothing to do.
                change(5002, "pods/a/never", None),
            ])
            .unwrap();
        assert_eq!(
            store.get(&key("pods/a/x")).unwrap().unwrap().object,
            Bytes::from_static(b"2")
        );
        assert_eq!(store.revision(), Revision(5002));
        assert!(matches!(
            store.apply_replicated(vec![change(5002, "pods/a/y", Some(b"3"))]),
            Err(StoreError::Corrupt(_))
        ));
        assert!(store.wait_for_revision(Revision(5002), Duration::from_millis(1)));
        assert!(!store.wait_for_revision(Revision(6000), Duration::from_millis(20)));

        store
            .reset_replicated(
                vec![(key("pods/b/q"), Revision(7000), Bytes::from_static(b"q"))],
                Revision(7999),
            )
            .unwrap();
        assert_eq!(store.get(&key("pods/a/x")).unwrap(), None);
        assert_eq!(
            store.get(&key("pods/b/q")).unwrap().unwrap().rv,
            ResourceVersion(7000)
        );
        assert_eq!(store.revision(), Revision(7999));
        assert_eq!(store.watch().oldest_resumable(), Revision(7999));
    }

    #[test]
    fn list_pages_through_one_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), Versioning::Assign);
        let mut set = WriteSet::new();
        for ns in ["a", "b"] {
            for i in 0..5 {
                let k = ObjectKey::new("pods", ns, &format!("p{i}")).unwrap();
                set.put(k, Bytes::from_static(b"{}"), Precondition::Absent);
            }
        }
        set.put(key("pods2/a/q"), Bytes::new(), Precondition::Absent);
        store.commit(set).unwrap();
        let range = KeyRange::namespace("pods", "a").unwrap();
        let first = store.list(&range, None, 2).unwrap();
        assert_eq!(first.items.len(), 2);
        let second = store.list(&range, first.next.as_ref(), 10).unwrap();
        assert_eq!(second.items.len(), 3);
        assert!(second.next.is_none());
        assert_eq!(
            store.scan(&KeyRange::kind("pods").unwrap()).count(),
            10,
            "pods2 is another kind"
        );
    }
}
