//! Where the sync protocol's state lives in the store, and how it is read back.
//!
//! Edge (`meta` and `outbox` column families):
//! - `edge/store_id` → u64: random, made when the store is first opened;
//! - `edge/applied` → epoch ‖ session number ‖ count (3 × u64): the watermark;
//! - `edge/next_report` → u64: the last report id used;
//! - outbox: report id (u64) → base ‖ key length (u32) ‖ key ‖ object bytes.
//!
//! Cloud (`objectsync` column family), per node (names never contain NUL):
//! - `a\0<node>\0<object key>` → u64: the version the node acknowledged;
//! - `r\0<node>` → store id ‖ last applied report id;
//! - `q\0<node>\0<object key>` → empty: the node asked for the object (a cache miss at its
//!   MetaServer), so it is routed to the node from then on.
//!
//! All integers are big-endian.

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::key::ObjectKey;
use crate::store::{decode_u64, Aux, Store, StoreError, WriteSet};
use crate::sync::edge::EdgeRecovered;
use crate::sync::feed::{FeedRecord, ObjectSyncWrite, ReportRecord};
use crate::sync::messages::{Report, SessionId, Watermark};
use crate::version::ResourceVersion;

pub(crate) const EDGE_STORE_ID: &[u8] = b"edge/store_id";
pub(crate) const EDGE_APPLIED: &[u8] = b"edge/applied";
pub(crate) const EDGE_NEXT_REPORT: &[u8] = b"edge/next_report";

pub(crate) fn outbox_key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

pub(crate) fn encode_watermark(mark: Watermark) -> Vec<u8> {
    let mut out = Vec::with_capacity(24);
    out.extend_from_slice(&mark.session.epoch.to_be_bytes());
    out.extend_from_slice(&mark.session.number.to_be_bytes());
    out.extend_from_slice(&mark.count.to_be_bytes());
    out
}

fn decode_watermark(bytes: &[u8]) -> Result<Watermark, StoreError> {
    if bytes.len() != 24 {
        return Err(StoreError::Corrupt(format!(
            "watermark of {} bytes",
            bytes.len()
        )));
    }
    Ok(Watermark {
        session: SessionId {
            epoch: decode_u64(&bytes[0..8])?,
            number: decode_u64(&bytes[8..16])?,
        },
        count: decode_u64(&bytes[16..24])?,
    })
}

pub(crate) fn encode_report(report: &Report) -> Vec<u8> {
    let key = report.key.as_bytes();
    let mut out = Vec::with_capacity(12 + key.len() + report.object.len());
    out.extend_from_slice(&report.base.to_be_bytes());
    out.extend_from_slice(&(key.len() as u32).to_be_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(&report.object);
    out
}

fn decode_report(id: &[u8], value: &[u8]) -> Result<Report, StoreError> {
    let corrupt = || StoreError::Corrupt("outbox entry".into());
    let id = decode_u64(id)?;
    if value.len() < 12 {
        return Err(corrupt());
    }
    let base = decode_u64(&value[0..8])?;
    let key_len = u32::from_be_bytes(value[8..12].try_into().map_err(|_| corrupt())?) as usize;
    let key_end = 12usize.checked_add(key_len).ok_or_else(corrupt)?;
    let key = value.get(12..key_end).ok_or_else(corrupt)?;
    Ok(Report {
        id,
        key: ObjectKey::from_stored(key)?,
        base: ResourceVersion(base),
        object: Bytes::copy_from_slice(&value[key_end..]),
        patch: None,
    })
}

fn meta_u64(store: &Store, name: &[u8]) -> Result<Option<u64>, StoreError> {
    store
        .get_aux(Aux::META, name)?
        .map(|bytes| decode_u64(&bytes))
        .transpose()
}

/// Reads the edge's sync state; a new store gets a fresh random store id (committed here).
///
/// # Errors
/// [`StoreError::Db`] when the store cannot be read or the new store id cannot be committed;
/// [`StoreError::Corrupt`] or [`StoreError::Key`] for a watermark, counter, outbox entry or
/// object key that does not decode.
pub fn load_edge(store: &Store) -> Result<EdgeRecovered, StoreError> {
    let store_id = match meta_u64(store, EDGE_STORE_ID)? {
        Some(id) => id,
        None => {
            let id = rand::random::<u64>() | 1;
            let mut set = WriteSet::new();
            set.put_aux(Aux::META, EDGE_STORE_ID, id.to_be_bytes());
            store.commit(set)?;
            id
        }
    };
    let applied = store
        .get_aux(Aux::META, EDGE_APPLIED)?
        .map(|bytes| decode_watermark(&bytes))
        .transpose()?;
    let next_report = meta_u64(store, EDGE_NEXT_REPORT)?.unwrap_or(0);
    let mut held = BTreeMap::new();
    for item in store.scan(&crate::key::KeyRange::all()) {
        let (key, value) = item?;
        held.insert(key, value.rv);
    }
    let mut outbox = Vec::new();
    for item in store.scan_aux(Aux::OUTBOX, b"") {
        let (id, value) = item?;
        outbox.push(decode_report(&id, &value)?);
    }
    Ok(EdgeRecovered {
        store_id,
        applied,
        held,
        outbox,
        next_report,
    })
}

fn acked_prefix(node: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(3 + node.len());
    key.extend_from_slice(b"a\0");
    key.extend_from_slice(node.as_bytes());
    key.push(0);
    key
}

fn acked_key(node: &str, object: &ObjectKey) -> Vec<u8> {
    let mut key = acked_prefix(node);
    key.extend_from_slice(object.as_bytes());
    key
}

fn reports_key(node: &str) -> Vec<u8> {
    let mut key = b"r\0".to_vec();
    key.extend_from_slice(node.as_bytes());
    key
}

/// Reads one node's ObjectSync record from the cloud's store.
///
/// # Errors
/// [`StoreError::Db`] when the store cannot be read; [`StoreError::Corrupt`] or
/// [`StoreError::Key`] for a record that does not decode.
pub fn load_feed_record(store: &Store, node: &str) -> Result<FeedRecord, StoreError> {
    let prefix = acked_prefix(node);
    let mut acked = BTreeMap::new();
    for item in store.scan_aux(Aux::OBJECTSYNC, &prefix) {
        let (key, value) = item?;
        acked.insert(
            ObjectKey::from_stored(&key[prefix.len()..])?,
            ResourceVersion(decode_u64(&value)?),
        );
    }
    let reports = match store.get_aux(Aux::OBJECTSYNC, &reports_key(node))? {
        Some(value) if value.len() == 16 => Some(ReportRecord {
            store_id: decode_u64(&value[0..8])?,
            through: decode_u64(&value[8..16])?,
        }),
        Some(_) => return Err(StoreError::Corrupt("report record".into())),
        None => None,
    };
    Ok(FeedRecord { acked, reports })
}

/// Adds a node's ObjectSync writes to `set`.
pub fn add_objectsync_writes(
    set: &mut WriteSet,
    node: &str,
    writes: impl IntoIterator<Item = ObjectSyncWrite>,
) {
    for write in writes {
        match write {
            ObjectSyncWrite::Acked { key, rv } => {
                set.put_aux(Aux::OBJECTSYNC, acked_key(node, &key), rv.to_be_bytes())
            }
            ObjectSyncWrite::Forgotten { key } => {
                set.delete_aux(Aux::OBJECTSYNC, acked_key(node, &key))
            }
            ObjectSyncWrite::Reset { acked } => {
                let from = acked_prefix(node);
                let mut to = from.clone();
                // The prefix ends in NUL: the next byte string after all its keys ends in 1.
                if let Some(last) = to.last_mut() {
                    *last = 1;
                }
                set.delete_aux_range(Aux::OBJECTSYNC, from, to);
                for (key, rv) in acked {
                    set.put_aux(Aux::OBJECTSYNC, acked_key(node, &key), rv.to_be_bytes());
                }
            }
        }
    }
}

/// Adds a node's report record to `set` (commit it with the report's effect).
pub fn add_report_record(set: &mut WriteSet, node: &str, record: ReportRecord) {
    let mut value = Vec::with_capacity(16);
    value.extend_from_slice(&record.store_id.to_be_bytes());
    value.extend_from_slice(&record.through.to_be_bytes());
    set.put_aux(Aux::OBJECTSYNC, reports_key(node), value);
}

fn interest_key(node: &str, object: &ObjectKey) -> Vec<u8> {
    let mut key = Vec::with_capacity(4 + node.len() + object.as_bytes().len());
    key.extend_from_slice(b"q\0");
    key.extend_from_slice(node.as_bytes());
    key.push(0);
    key.extend_from_slice(object.as_bytes());
    key
}

/// Records that `node` asked for `object`.
pub fn add_interest(set: &mut WriteSet, node: &str, object: &ObjectKey) {
    set.put_aux(Aux::OBJECTSYNC, interest_key(node, object), Vec::new());
}

fn collection_key(node: &str, kind: &str, namespace: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(5 + node.len() + kind.len() + namespace.len());
    key.extend_from_slice(b"c\0");
    for part in [node, kind, namespace] {
        key.extend_from_slice(part.as_bytes());
        key.push(0);
    }
    key
}

/// Records that `node` listed the collection of `kind` in `namespace` (`""`: all namespaces).
pub fn add_collection(set: &mut WriteSet, node: &str, kind: &str, namespace: &str) {
    set.put_aux(
        Aux::OBJECTSYNC,
        collection_key(node, kind, namespace),
        Vec::new(),
    );
}

/// Every recorded collection interest, as (node, kind, namespace).
///
/// # Errors
/// [`StoreError::Db`] when the store cannot be read; [`StoreError::Corrupt`] for a record that
/// does not decode.
pub fn load_collections(store: &Store) -> Result<Vec<(String, String, String)>, StoreError> {
    let mut out = Vec::new();
    for item in store.scan_aux(Aux::OBJECTSYNC, b"c\0") {
        let (key, _) = item?;
        let parts: Vec<&[u8]> = key[2..].split(|b| *b == 0).collect();
        let (node, kind, namespace) = match parts.as_slice() {
            [node, kind, namespace, []] => (*node, *kind, *namespace),
            _ => {
                return Err(StoreError::Corrupt(
                    "collection record is not node/kind/namespace".into(),
                ))
            }
        };
        let text = |b: &[u8]| {
            std::str::from_utf8(b)
                .map(str::to_owned)
                .map_err(|_| StoreError::Corrupt("collection record is not UTF-8".into()))
        };
        out.push((text(node)?, text(kind)?, text(namespace)?));
    }
    Ok(out)
}

/// Every recorded interest, as (node, object).
///
/// # Errors
/// [`StoreError::Db`] when the store cannot be read; [`StoreError::Corrupt`] or
/// [`StoreError::Key`] for a record that does not decode.
pub fn load_interests(store: &Store) -> Result<Vec<(String, ObjectKey)>, StoreError> {
    let mut out = Vec::new();
    for item in store.scan_aux(Aux::OBJECTSYNC, b"q\0") {
        let (key, _) = item?;
        let rest = &key[2..];
        let split = rest
            .iter()
            .position(|b| *b == 0)
            .ok_or_else(|| StoreError::Corrupt("interest record without a node".into()))?;
        let node = std::str::from_utf8(&rest[..split])
            .map_err(|_| StoreError::Corrupt("interest record's node is not UTF-8".into()))?;
        out.push((node.to_owned(), ObjectKey::from_stored(&rest[split + 1..])?));
    }
    Ok(out)
}
