//! The two version numbers of a store, as types, so that one is never passed for the other.
//!
//! - [`ResourceVersion`]: an object's version, as Kubernetes' `metadata.resourceVersion`. The
//!   cloud's store assigns it; an edge store mirrors the cloud's (it is what the sync protocol
//!   carries, what a report's `base` names and what a precondition compares).
//! - [`Revision`]: a position in one store's change history, dense and increasing, one per
//!   committed change (etcd's revision). Watches resume from one; an API over the store presents
//!   it as resourceVersion, since a list's version and a watch's start must share one number
//!   space. In a store that assigns versions the two are equal; in a mirror they are not (mirrored
//!   versions arrive in routing order, not in increasing order).
//!
//! Both are `u64` on disk (big-endian) and on the wire; `0` means "none" where a field says so.
//! Kubernetes treats resourceVersion as an opaque string: [`std::fmt::Display`] and
//! [`std::str::FromStr`] give the decimal form the API serves and parses.

use std::fmt;
use std::num::ParseIntError;
use std::str::FromStr;

macro_rules! version_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Debug,
            Clone,
            Copy,
            Default,
            PartialEq,
            Eq,
            PartialOrd,
            Ord,
            Hash,
        )]
        #[repr(transparent)]
        pub struct $name(pub u64);

        impl $name {
            /// `0`: none yet (an empty store, an object the node does not hold).
            pub const ZERO: $name = $name(0);

            /// The number.
            pub const fn get(self) -> u64 {
                self.0
            }

            /// The next one (`self + 1`).
            pub const fn next(self) -> $name {
                $name(self.0 + 1)
            }

            /// Whether this is [`Self::ZERO`].
            pub const fn is_zero(self) -> bool {
                self.0 == 0
            }

            /// Big-endian bytes, as stored.
            pub const fn to_be_bytes(self) -> [u8; 8] {
                self.0.to_be_bytes()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl FromStr for $name {
            type Err = ParseIntError;

            /// The decimal form (`"42"`). Errors: anything else, as `u64::from_str`.
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                s.parse().map($name)
            }
        }

        impl From<u64> for $name {
            fn from(value: u64) -> Self {
                $name(value)
            }
        }

        impl From<$name> for u64 {
            fn from(value: $name) -> Self {
                value.0
            }
        }
    };
}

version_type!(
    /// An object's `metadata.resourceVersion` (see the [module docs](self)).
    ResourceVersion
);

version_type!(
    /// A position in one store's change history (see the [module docs](self)).
    Revision
);

impl From<Revision> for ResourceVersion {
    /// In a store that assigns versions, a change's revision is the object's resourceVersion.
    fn from(revision: Revision) -> Self {
        ResourceVersion(revision.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_round_trip_and_order() {
        let rv: ResourceVersion = "42".parse().unwrap();
        assert_eq!(rv, ResourceVersion(42));
        assert_eq!(rv.to_string(), "42");
        assert!("x".parse::<Revision>().is_err());
        assert!(Revision(1) < Revision(1).next());
        assert_eq!(ResourceVersion::from(Revision(7)), ResourceVersion(7));
    }
}
