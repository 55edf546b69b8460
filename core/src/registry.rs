//! The function registry shared by all hosts: one entry per function name,
//! merged last-writer-wins by (timestamp, origin node id), with deletes kept
//! as tombstones so a late copy of an old entry cannot bring a function back.
//!
//! The merge is a join: commutative, associative and idempotent, so hosts that
//! receive the same entries in any order, any number of times, end up with the
//! same active version (the convergence the gossip layer relies on). The
//! node id breaks ties between writes in the same millisecond.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What the cluster knows about one function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub name: String,
    /// `None` for a tombstone.
    pub sha256: Option<String>,
    pub version: u64,
    /// The policy file's text, if the function has one.
    pub policy: Option<String>,
    /// Milliseconds since the Unix epoch at the writing host.
    pub timestamp_ms: u64,
    /// The node that wrote this entry.
    pub origin: String,
}

impl Entry {
    pub fn is_tombstone(&self) -> bool {
        self.sha256.is_none()
    }

    /// Whether this entry wins over `other` (a later write).
    pub fn newer_than(&self, other: &Entry) -> bool {
        self.stamp_cmp(other) == Ordering::Greater
    }

    /// The order of writes: later timestamp wins, then the larger node id.
    fn stamp_cmp(&self, other: &Entry) -> Ordering {
        self.timestamp_ms
            .cmp(&other.timestamp_ms)
            .then_with(|| self.origin.cmp(&other.origin))
    }
}

/// All entries a host has seen, by function name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registry {
    entries: BTreeMap<String, Entry>,
}

/// What merging an entry changed here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The entry was older than (or the same as) what is known.
    None,
    /// A function is now active at this entry's version.
    Activated(Entry),
    /// A function is now deleted.
    Deleted(String),
}

impl Registry {
    /// Merges one entry; returns what that changed.
    pub fn merge(&mut self, entry: Entry) -> Change {
        if let Some(known) = self.entries.get(&entry.name)
            && entry.stamp_cmp(known) != Ordering::Greater
        {
            return Change::None;
        }
        let change = if entry.is_tombstone() {
            Change::Deleted(entry.name.clone())
        } else {
            Change::Activated(entry.clone())
        };
        self.entries.insert(entry.name.clone(), entry);
        change
    }

    /// The entry of a function, tombstone or not.
    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.entries.get(name)
    }

    /// The active entry of a function (not a tombstone).
    pub fn active(&self, name: &str) -> Option<&Entry> {
        self.entries.get(name).filter(|e| !e.is_tombstone())
    }

    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, sha: Option<&str>, ts: u64, origin: &str) -> Entry {
        Entry {
            name: name.to_string(),
            sha256: sha.map(str::to_string),
            version: ts,
            policy: None,
            timestamp_ms: ts,
            origin: origin.to_string(),
        }
    }

    #[test]
    fn hosts_converge_whatever_the_order_of_arrival() {
        let writes = vec![
            entry("hello", Some("v1"), 10, "a"),
            entry("hello", Some("v2"), 20, "b"),
            entry("hello", Some("v2-c"), 20, "c"),
            entry("square", Some("s1"), 5, "a"),
            entry("square", None, 7, "c"),
            entry("fib", Some("f1"), 1, "b"),
        ];
        let mut forward = Registry::default();
        let mut backward = Registry::default();
        let mut twice = Registry::default();
        for w in &writes {
            forward.merge(w.clone());
        }
        for w in writes.iter().rev() {
            backward.merge(w.clone());
        }
        for w in writes.iter().chain(writes.iter()) {
            twice.merge(w.clone());
        }
        assert_eq!(forward, backward);
        assert_eq!(forward, twice);
        // Same millisecond: the larger node id wins, everywhere.
        assert_eq!(
            forward.active("hello").unwrap().sha256.as_deref(),
            Some("v2-c")
        );
        assert!(forward.active("square").is_none());
        assert!(forward.active("fib").is_some());
    }

    #[test]
    fn a_tombstone_keeps_an_older_write_from_reviving_a_function() {
        let mut registry = Registry::default();
        assert!(matches!(
            registry.merge(entry("hello", Some("v1"), 10, "a")),
            Change::Activated(_)
        ));
        assert_eq!(
            registry.merge(entry("hello", None, 20, "b")),
            Change::Deleted("hello".to_string())
        );
        assert_eq!(
            registry.merge(entry("hello", Some("v1"), 10, "a")),
            Change::None
        );
        assert!(registry.active("hello").is_none());
        // A newer deploy does bring it back.
        assert!(matches!(
            registry.merge(entry("hello", Some("v3"), 30, "c")),
            Change::Activated(_)
        ));
    }
}
