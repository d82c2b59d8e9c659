//! Object keys: `kind/namespace/name`, with an empty namespace for cluster-scoped objects.
//!
//! A key is an `Arc<str>`: the store, the watch history and every node feed that holds the same
//! key share one allocation.

use std::fmt;
use std::sync::Arc;

/// Why a string is not a valid object key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not three `/`-separated parts (or, read back from the store, not UTF-8).
    #[error("object key {0:?} is not of the form kind/namespace/name")]
    Shape(String),
    /// An empty kind or name.
    #[error("object key {0:?}: kind and name must not be empty")]
    Empty(String),
    /// A part containing `/` or a control character.
    #[error("object key part {0:?} contains '/' or a control character")]
    BadPart(String),
}

/// `kind/namespace/name`. Ordered bytewise, so all objects of one kind, and of one kind in one
/// namespace, are contiguous in the store.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey(Arc<str>);

fn check_part(part: &str) -> Result<(), KeyError> {
    if part.contains('/') || part.chars().any(char::is_control) {
        return Err(KeyError::BadPart(part.to_owned()));
    }
    Ok(())
}

impl ObjectKey {
    /// The key of an object: `kind` is the resource's plural (`pods`), `namespace` is empty for a
    /// cluster-scoped object.
    ///
    /// # Errors
    /// [`KeyError::BadPart`] when a part contains `/` or a control character,
    /// [`KeyError::Empty`] when `kind` or `name` is empty.
    pub fn new(kind: &str, namespace: &str, name: &str) -> Result<Self, KeyError> {
        for part in [kind, namespace, name] {
            check_part(part)?;
        }
        if kind.is_empty() || name.is_empty() {
            return Err(KeyError::Empty(format!("{kind}/{namespace}/{name}")));
        }
        Ok(ObjectKey(format!("{kind}/{namespace}/{name}").into()))
    }

    /// Parses `kind/namespace/name` (`nodes//edge-1` for a cluster-scoped object).
    ///
    /// # Errors
    /// [`KeyError::Shape`] when `key` is not three `/`-separated parts, else as
    /// [`new`](Self::new).
    pub fn parse(key: &str) -> Result<Self, KeyError> {
        let mut parts = key.split('/');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(kind), Some(namespace), Some(name), None) => Self::new(kind, namespace, name),
            _ => Err(KeyError::Shape(key.to_owned())),
        }
    }

    /// Parses a key read back from the store, where it was validated on the way in.
    pub(crate) fn from_stored(bytes: &[u8]) -> Result<Self, KeyError> {
        let text = std::str::from_utf8(bytes)
            .map_err(|_| KeyError::Shape(String::from_utf8_lossy(bytes).into_owned()))?;
        Self::parse(text)
    }

    fn parts(&self) -> (&str, &str, &str) {
        let mut parts = self.0.splitn(3, '/');
        let kind = parts.next().unwrap_or_default();
        let namespace = parts.next().unwrap_or_default();
        let name = parts.next().unwrap_or_default();
        (kind, namespace, name)
    }

    /// The resource's plural (`pods`, `configmaps`, ...).
    pub fn kind(&self) -> &str {
        self.parts().0
    }

    /// Empty for cluster-scoped objects.
    pub fn namespace(&self) -> &str {
        self.parts().1
    }

    /// The object's name.
    pub fn name(&self) -> &str {
        self.parts().2
    }

    /// The key as text, `kind/namespace/name`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key as stored (the UTF-8 of [`as_str`](Self::as_str)).
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A range of keys to list: one kind, optionally narrowed to one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRange {
    prefix: String,
}

impl KeyRange {
    /// Every object of `kind`.
    ///
    /// # Errors
    /// [`KeyError::BadPart`] when `kind` contains `/` or a control character.
    pub fn kind(kind: &str) -> Result<Self, KeyError> {
        check_part(kind)?;
        Ok(KeyRange {
            prefix: format!("{kind}/"),
        })
    }

    /// Every object of `kind` in `namespace` (the empty namespace: cluster-scoped objects).
    ///
    /// # Errors
    /// [`KeyError::BadPart`] when `kind` or `namespace` contains `/` or a control character.
    pub fn namespace(kind: &str, namespace: &str) -> Result<Self, KeyError> {
        check_part(kind)?;
        check_part(namespace)?;
        Ok(KeyRange {
            prefix: format!("{kind}/{namespace}/"),
        })
    }

    /// Every key.
    pub fn all() -> Self {
        KeyRange {
            prefix: String::new(),
        }
    }

    /// The bytes every key in the range starts with (`kind/`, `kind/namespace/`, or empty).
    pub fn prefix(&self) -> &[u8] {
        self.prefix.as_bytes()
    }

    /// Whether `key` is in the range.
    pub fn contains(&self, key: &ObjectKey) -> bool {
        key.as_bytes().starts_with(self.prefix())
    }

    /// The smallest byte string greater than every key in the range (None: unbounded).
    pub fn upper_bound(&self) -> Option<Vec<u8>> {
        let mut bound = self.prefix.as_bytes().to_vec();
        // Prefixes end in '/', which is never 0xff, so incrementing the last byte suffices.
        let last = bound.pop()?;
        bound.push(last + 1);
        Some(bound)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_round_trip() {
        let key = ObjectKey::new("pods", "default", "nginx").unwrap();
        assert_eq!(key.as_str(), "pods/default/nginx");
        assert_eq!(
            (key.kind(), key.namespace(), key.name()),
            ("pods", "default", "nginx")
        );
        assert_eq!(ObjectKey::parse("pods/default/nginx").unwrap(), key);
        let node = ObjectKey::parse("nodes//edge-1").unwrap();
        assert_eq!(node.namespace(), "");
    }

    #[test]
    fn bad_keys_are_refused() {
        assert!(matches!(
            ObjectKey::parse("pods/default"),
            Err(KeyError::Shape(_))
        ));
        assert!(matches!(
            ObjectKey::parse("pods/a/b/c"),
            Err(KeyError::Shape(_))
        ));
        assert!(matches!(
            ObjectKey::parse("/default/x"),
            Err(KeyError::Empty(_))
        ));
        assert!(matches!(
            ObjectKey::new("pods", "a\nb", "x"),
            Err(KeyError::BadPart(_))
        ));
    }

    #[test]
    fn ranges_cover_exactly_their_keys() {
        let range = KeyRange::namespace("pods", "default").unwrap();
        assert!(range.contains(&ObjectKey::parse("pods/default/a").unwrap()));
        assert!(!range.contains(&ObjectKey::parse("pods/default2/a").unwrap()));
        assert_eq!(range.upper_bound().unwrap(), b"pods/default0".to_vec());
        assert_eq!(KeyRange::all().upper_bound(), None);
    }
}
