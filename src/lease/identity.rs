//! The names a lease row carries, checked once where they come in (a flag, the
//! Reaper's spec), so the store, the elector and the rules take them as given.
//!
//! A holder is `<cluster>/<identity>` when a replica writes it; a row may still hold
//! any text a person wrote by hand, so what is read back stays a `String` and
//! [`cluster_of`] is the one place that finds the cluster in it.

use std::fmt;

use crate::{Error, Result};

/// The cluster part of a holder as a row stores it. A holder without `/`, or with
/// nothing before it, belongs to no cluster: it is never "this cluster", never a peer,
/// always someone else.
pub fn cluster_of(holder: &str) -> Option<&str> {
    holder
        .split_once('/')
        .map(|(cluster, _)| cluster)
        .filter(|c| !c.is_empty())
}

/// Text stored in a lease row and shown to people: non-empty, at most 253 bytes, no
/// control characters.
fn check_label(what: &str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::Config(format!("{what} must not be empty")));
    }
    if value.len() > 253 {
        return Err(Error::Config(format!(
            "{what} is {} bytes long; the limit is 253",
            value.len()
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(Error::Config(format!(
            "{what} {value:?} contains control characters"
        )));
    }
    Ok(())
}

/// A cluster name: a DNS label, so it never contains the `/` that ends it in a holder.
fn check_dns_label(name: &str) -> Result<()> {
    let is_dns_label = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !is_dns_label {
        return Err(Error::Config(format!(
            "cluster name {name:?} must be a DNS label: 1-63 characters of a-z, 0-9 and -, \
             starting and ending with a letter or digit"
        )));
    }
    Ok(())
}

/// A string type whose values all passed `$check`, and what it takes to use one as a
/// string.
macro_rules! name_type {
    ($name:ident, $check:expr) => {
        impl $name {
            /// The value, or why `$check` refuses it.
            pub fn new(value: impl Into<String>) -> Result<Self> {
                let value = value.into();
                $check(&value)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        /// As the text it is, quoted: what a person reads in a message.
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }

        impl PartialEq<$name> for String {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }
    };
}

/// The name of a lease row (the Reaper's `spec.lease.name`, or `<namespace>.<name>`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseName(String);

name_type!(LeaseName, |name| check_label("lease name", name));

/// The name of a Kubernetes cluster among those that share one lease database (see
/// [`check_dns_label`]).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClusterName(String);

name_type!(ClusterName, check_dns_label);

/// Who holds a lease: `<cluster>/<identity>` for a replica of the operator, or any
/// other text a person gives the `lease` commands.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Holder(String);

name_type!(Holder, |holder| check_label("holder", holder));

impl Holder {
    /// The holder of replica `identity` of `cluster`.
    pub fn of(cluster: &ClusterName, identity: &str) -> Result<Self> {
        check_label("identity", identity)?;
        if identity.contains('/') {
            return Err(Error::Config(format!(
                "identity {identity:?} must not contain '/'"
            )));
        }
        let holder = format!("{cluster}/{identity}");
        if holder.len() > 253 {
            return Err(Error::Config(format!(
                "identity {identity:?} makes the holder {} bytes long with its cluster name; \
                 the limit is 253",
                holder.len()
            )));
        }
        Ok(Self(holder))
    }

    /// What follows its cluster: the replica's identity (all of it if it names no
    /// cluster).
    pub fn identity(&self) -> &str {
        match self.cluster() {
            Some(cluster) => &self.0[cluster.len() + 1..],
            None => &self.0,
        }
    }

    /// Its cluster, if it names one (see [`cluster_of`]).
    pub fn cluster(&self) -> Option<&str> {
        cluster_of(&self.0)
    }

    /// Whether `other`, a holder as a row stores it, is a replica of this holder's
    /// cluster (itself included): the two share one Deployment.
    pub fn same_cluster(&self, other: &str) -> bool {
        matches!((self.cluster(), cluster_of(other)), (Some(a), Some(b)) if a == b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_printable_and_bounded() {
        assert!(LeaseName::new("prod.pay").is_ok());
        assert!(Holder::new("cluster-a/pod-1").is_ok());
        assert!(Holder::new("o'brien \\ \"x\" ünï").is_ok());
        for bad in ["", "a\nb", "a\0b", &"x".repeat(254)] {
            assert!(LeaseName::new(bad).is_err(), "{bad:?}");
            assert!(Holder::new(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            LeaseName::new("").unwrap_err().to_string(),
            "invalid configuration: lease name must not be empty"
        );
    }

    #[test]
    fn cluster_names_are_dns_labels() {
        for ok in ["east", "a", "cluster-1", &"x".repeat(63)] {
            assert!(ClusterName::new(ok).is_ok(), "{ok:?}");
        }
        for bad in ["", "East", "-a", "a-", "a/b", "a.b", &"x".repeat(64)] {
            assert!(ClusterName::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_replica_holder_names_its_cluster() {
        let east = ClusterName::new("east").unwrap();
        let holder = Holder::of(&east, "pod-1").unwrap();
        assert_eq!(holder, "east/pod-1");
        assert_eq!(holder.cluster(), Some("east"));
        assert!(Holder::of(&east, "a/b").is_err());
        assert!(Holder::of(&east, "").is_err());
        assert!(Holder::of(&east, "a\tb").is_err());
        assert!(Holder::of(&east, &"x".repeat(248)).is_ok());
        let too_long = Holder::of(&east, &"x".repeat(249)).unwrap_err().to_string();
        assert!(
            too_long.contains("makes the holder 254 bytes long"),
            "{too_long}"
        );
    }

    #[test]
    fn the_cluster_of_a_stored_holder() {
        assert_eq!(cluster_of("east/pod-1"), Some("east"));
        assert_eq!(cluster_of("east/a/b"), Some("east"));
        assert_eq!(cluster_of("plain"), None);
        assert_eq!(cluster_of("/x"), None);
        assert_eq!(cluster_of(""), None);
        let holder = |h: &str| Holder::new(h).unwrap();
        assert!(holder("east/a").same_cluster("east/b"));
        assert!(holder("east/a").same_cluster("east/a"));
        assert!(!holder("east/a").same_cluster("west/a"));
        assert!(!holder("east").same_cluster("east/a"));
        assert!(!holder("plain").same_cluster("plain"));
        assert!(!holder("/x").same_cluster("/x"));
    }
}
