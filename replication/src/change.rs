//! A committed change to one object: what the watch hands to watchers and what node feeds send.
//!
//! One `Arc<Change>` per committed write is shared by the watch history, every watcher and every
//! node feed that must send it; the object bytes are a `Bytes` that nobody copies. A transport
//! adapter can cache its wire encoding in the change ([`Change::shared_encoding`]), so the
//! message is encoded once however many nodes receive it.

use std::any::Any;
use std::fmt;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use crate::key::ObjectKey;
use crate::version::{ResourceVersion, Revision};

/// Watch event types, as Kubernetes names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// The object was created (`ADDED`).
    Added,
    /// The object was replaced or updated (`MODIFIED`).
    Modified,
    /// The object was deleted (`DELETED`).
    Deleted,
}

/// One committed change to one object; shared as a [`SharedChange`].
pub struct Change {
    /// Position in this store's change history: strictly increasing, one per change. Equal to
    /// `rv` in a store that assigns versions; a local counter in a store that mirrors them.
    pub revision: Revision,
    /// The object changed.
    pub key: ObjectKey,
    /// The object's resourceVersion after the change (for a delete: the version of the delete).
    pub rv: ResourceVersion,
    /// Created, modified or deleted.
    pub kind: ChangeKind,
    /// The object's JSON bytes after the change; for a delete, its last state.
    pub object: Bytes,
    /// The object's JSON bytes before the change (`None` when it did not exist; for a delete,
    /// the same bytes as `object`). The store fills it at commit from the value it reads for
    /// preconditions anyway, sharing the bytes (no copy). A filtered watch needs it to tell an
    /// object entering its selector (`ADDED`) or leaving it (`DELETED`) from a plain update,
    /// as kube-apiserver's watch cache does with its `PrevObject`.
    pub prev: Option<Bytes>,
    encoded: OnceLock<Box<dyn Any + Send + Sync>>,
}

impl Change {
    /// A change without its previous state (`prev` is `None`) and no cached encoding.
    pub fn new(
        revision: Revision,
        key: ObjectKey,
        rv: ResourceVersion,
        kind: ChangeKind,
        object: Bytes,
    ) -> Self {
        Change {
            revision,
            key,
            rv,
            kind,
            object,
            prev: None,
            encoded: OnceLock::new(),
        }
    }

    /// This change with the object's state before it (see [`Change::prev`]).
    pub fn with_prev(mut self, prev: Option<Bytes>) -> Self {
        self.prev = prev;
        self
    }

    /// Whether this is a delete.
    pub fn is_delete(&self) -> bool {
        self.kind == ChangeKind::Deleted
    }

    /// The wire encoding of this change, made by `encode` the first time any caller asks and
    /// shared afterwards. All callers must ask for the same type `T` (the transport adapter's
    /// encoded message); a different type is encoded afresh and not cached.
    pub fn shared_encoding<T>(&self, encode: impl Fn(&Change) -> T) -> T
    where
        T: Clone + Send + Sync + 'static,
    {
        let cached = self.encoded.get_or_init(|| Box::new(encode(self)));
        match cached.downcast_ref::<T>() {
            Some(value) => value.clone(),
            None => encode(self),
        }
    }
}

impl fmt::Debug for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Change")
            .field("revision", &self.revision)
            .field("key", &self.key)
            .field("rv", &self.rv)
            .field("kind", &self.kind)
            .field("object_len", &self.object.len())
            .field("prev_len", &self.prev.as_ref().map(Bytes::len))
            .finish()
    }
}

/// A change shared by the watch history, every watcher and every node feed.
pub type SharedChange = Arc<Change>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn encoding_is_made_once_and_shared() {
        let change = Change::new(
            Revision(1),
            ObjectKey::parse("pods/a/b").unwrap(),
            ResourceVersion(1),
            ChangeKind::Added,
            Bytes::from_static(b"{}"),
        );
        let calls = AtomicUsize::new(0);
        let encode = |c: &Change| {
            calls.fetch_add(1, Ordering::Relaxed);
            Bytes::from(format!("{}@{}", c.key, c.rv))
        };
        let first = change.shared_encoding(encode);
        let second = change.shared_encoding(encode);
        assert_eq!(first, second);
        assert_eq!(
            first.as_ptr(),
            second.as_ptr(),
            "the same bytes, not a copy"
        );
        assert_eq!(calls.load(Ordering::Relaxed), 1);
    }
}
