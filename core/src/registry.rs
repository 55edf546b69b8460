//! The function registry shared by all hosts: per function name, the versions
//! deployed anywhere (a set that only grows, within a window), which of them
//! is active (or that the function is deleted), and its policy text.
//!
//! - **Stamps are hybrid logical clocks** ([`Clock`]): a host's wall-clock
//!   milliseconds joined with the highest stamp it has seen, plus a counter.
//!   A change made after a host saw another is stamped later than it,
//!   whatever the clocks say; only changes made without seeing each other
//!   (concurrent ones) are ordered by their clocks, then by node id.
//! - **Versions are kept, not replaced.** A deploy adds a version with an id
//!   no other version of the name has (drawn at random among 2^53, so two
//!   hosts never coordinate) and points the *head* at it. Two concurrent
//!   deploys both stay in the set; the head, a last-writer-wins register,
//!   picks one, and the other is a version like any older one: listed, its
//!   module kept, ready to roll back to.
//! - **Code and policy are two registers**: a policy edit never carries a
//!   module hash and a deploy never carries a policy, so neither can put back
//!   the other's stale half.
//! - **A delete clears the history before it**: the head says deleted and
//!   `cleared` remembers the stamp, so versions stamped before it (a copy
//!   coming late from a host that missed the delete) stay gone; a later
//!   deploy brings the function back.
//!
//! [`Entry::merge`] is a join (commutative, associative, idempotent), so
//! hosts that receive the same entries in any order, any number of times,
//! end up with the same entry: the convergence gossip relies on.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

/// How many versions of a function the cluster keeps (the active one is
/// kept beyond them); older ones are forgotten and their modules collected.
pub const KEEP_VERSIONS: usize = 10;

/// The largest entry, as JSON, a host writes: it travels in one gossip
/// value, and a UDP datagram (65,507 bytes) also carries chitchat's headers,
/// the digest of every node and the value's seal. A change that would make
/// an entry larger is refused (a policy's text is most of it).
pub const MAX_ENTRY_BYTES: usize = 48 << 10;

/// Bits of a stamp below the milliseconds: the counter of changes within one
/// millisecond (or beyond the wall clock, after seeing a stamp ahead of it).
const LOGICAL_BITS: u32 = 16;

/// Version ids are below 2^53, so JavaScript reads them exactly.
const ID_SPACE: u64 = 1 << 53;

/// A hybrid logical clock reading: milliseconds since the Unix epoch in the
/// high bits, a counter in the low 16.
pub type Stamp = u64;

/// The first stamp of a millisecond.
pub fn stamp_of_ms(ms: u64) -> Stamp {
    ms << LOGICAL_BITS
}

/// The milliseconds of a stamp.
pub fn stamp_ms(stamp: Stamp) -> u64 {
    stamp >> LOGICAL_BITS
}

/// Whether `stamp` is more than `max_ahead_ms` ahead of the wall clock's
/// `now_ms`: a stamp from a clock that runs ahead (a host booted in 2099),
/// refused rather than adopted, or every later stamp of every host that
/// took it would run there with it.
pub fn is_ahead(stamp: Stamp, now_ms: u64, max_ahead_ms: u64) -> bool {
    stamp_ms(stamp) > now_ms.saturating_add(max_ahead_ms)
}

/// A host's hybrid logical clock.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    last: Stamp,
}

impl Clock {
    /// A stamp for a change made now: later than the wall clock's reading
    /// and than every stamp this clock has given or seen.
    pub fn tick(&mut self, now_ms: u64) -> Stamp {
        let physical = now_ms << LOGICAL_BITS;
        self.last = physical.max(self.last.saturating_add(1));
        self.last
    }

    /// Notes a stamp seen elsewhere: every later tick is after it.
    pub fn observe(&mut self, stamp: Stamp) {
        self.last = self.last.max(stamp);
    }

    /// Notes every stamp of an entry.
    pub fn observe_entry(&mut self, entry: &Entry) {
        self.observe(entry.max_stamp());
    }
}

/// One deployed version of a function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    /// Unique among the versions of its function, cluster-wide.
    pub id: u64,
    pub sha256: String,
    pub size: u64,
    /// When it was deployed.
    pub stamp: Stamp,
    /// The node it was deployed on.
    pub origin: String,
    /// The version that was active on the origin when it was deployed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<u64>,
}

impl Version {
    /// Stamp first; the other fields only make the order total, so that
    /// even two versions a faulty peer gave one id sort the same everywhere.
    fn order(&self, other: &Version) -> Ordering {
        let key = |v: &Version| {
            (
                v.stamp,
                v.origin.clone(),
                v.id,
                v.sha256.clone(),
                v.size,
                v.parent,
            )
        };
        key(self).cmp(&key(other))
    }
}

/// Which version is active, or that the function is deleted: a
/// last-writer-wins register.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    /// The active version's id; `None`: deleted.
    pub target: Option<u64>,
    pub stamp: Stamp,
    pub origin: String,
    /// The stamp of the head this one was written over at its origin: two
    /// heads written over the same one were written without seeing each
    /// other (a conflict).
    #[serde(default)]
    pub over: Stamp,
}

impl Head {
    /// Stamp, then origin; the rest only makes the order total.
    fn order(&self, other: &Head) -> Ordering {
        (self.stamp, &self.origin, self.target, self.over).cmp(&(
            other.stamp,
            &other.origin,
            other.target,
            other.over,
        ))
    }
}

/// The function's policy text: a last-writer-wins register.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyText {
    pub text: String,
    pub stamp: Stamp,
    pub origin: String,
}

/// What the cluster knows about one function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub name: String,
    /// Oldest first.
    pub versions: Vec<Version>,
    /// `None` only in an entry that has had neither a deploy nor a delete
    /// (a policy written before the function's first deploy).
    #[serde(default)]
    pub head: Option<Head>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyText>,
    /// The stamp of the latest delete: versions stamped before it are gone.
    #[serde(default)]
    pub cleared: Stamp,
}

/// Two changes to a function made without seeing each other; the winner is
/// the one in force everywhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub name: String,
    pub winner: Head,
    pub loser: Head,
}

/// What merging an entry into another changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Merged {
    pub changed: bool,
    pub conflicts: Vec<Conflict>,
}

impl Entry {
    /// The entry of a function nobody has changed yet.
    pub fn new(name: &str) -> Self {
        Entry {
            name: name.to_string(),
            versions: Vec::new(),
            head: None,
            policy: None,
            cleared: 0,
        }
    }

    /// The active version, if the function is not deleted.
    pub fn active(&self) -> Option<&Version> {
        let id = self.head.as_ref()?.target?;
        self.version(id)
    }

    pub fn is_deleted(&self) -> bool {
        self.head.as_ref().is_some_and(|h| h.target.is_none())
    }

    pub fn version(&self, id: u64) -> Option<&Version> {
        self.versions.iter().find(|v| v.id == id)
    }

    /// The entry's size as JSON, as gossip carries it.
    pub fn encoded_len(&self) -> usize {
        serde_json::to_vec(self).map_or(usize::MAX, |json| json.len())
    }

    /// The highest stamp anywhere in the entry.
    pub fn max_stamp(&self) -> Stamp {
        self.versions
            .iter()
            .map(|v| v.stamp)
            .chain(self.head.iter().map(|h| h.stamp))
            .chain(self.policy.iter().map(|p| p.stamp))
            .chain([self.cleared])
            .max()
            .unwrap_or(0)
    }

    /// For a version that is not active, the one that took its place: the
    /// next version deployed after it, or the active one when none was (a
    /// rollback made an older version active).
    pub fn superseded_by(&self, id: u64) -> Option<u64> {
        let active = self.head.as_ref().and_then(|h| h.target);
        if active == Some(id) {
            return None;
        }
        let at = self.versions.iter().position(|v| v.id == id)?;
        self.versions.get(at + 1).map(|v| v.id).or(active)
    }

    /// An id for a new version: `random` folded into the id space, moved on
    /// past any id a version of this function already has.
    pub fn fresh_id(&self, random: u64) -> u64 {
        let mut id = (random % (ID_SPACE - 1)) + 1;
        while self.version(id).is_some() {
            id = id % (ID_SPACE - 1) + 1;
        }
        id
    }

    /// Adds a version deployed here and makes it active.
    pub fn deploy(&mut self, version: Version) {
        let over = self.head.as_ref().map_or(0, |h| h.stamp);
        self.head = Some(Head {
            target: Some(version.id),
            stamp: version.stamp,
            origin: version.origin.clone(),
            over,
        });
        self.versions.push(version);
        self.normalize();
    }

    /// Makes a kept version active again (a rollback), or deletes the
    /// function (`None`), as a change made here at `stamp`.
    pub fn point_head(&mut self, target: Option<u64>, stamp: Stamp, origin: &str) {
        let over = self.head.as_ref().map_or(0, |h| h.stamp);
        self.head = Some(Head {
            target,
            stamp,
            origin: origin.to_string(),
            over,
        });
        if target.is_none() {
            self.cleared = self.cleared.max(stamp);
        }
        self.normalize();
    }

    /// Sets the policy text, as a change made here at `stamp`.
    pub fn set_policy(&mut self, text: String, stamp: Stamp, origin: &str) {
        self.policy = Some(PolicyText {
            text,
            stamp,
            origin: origin.to_string(),
        });
    }

    /// Joins `other` (the same function as another host knows it) into this
    /// entry.
    pub fn merge(&mut self, other: &Entry) -> Merged {
        let before = self.clone();
        let mut conflicts = Vec::new();
        match (&self.head, &other.head) {
            (_, None) => {}
            (None, Some(theirs)) => self.head = Some(theirs.clone()),
            (Some(ours), Some(theirs)) if ours != theirs => {
                let (winner, loser) = match theirs.order(ours) {
                    Ordering::Greater => (theirs.clone(), ours.clone()),
                    _ => (ours.clone(), theirs.clone()),
                };
                // The winner was written over a head older than the loser:
                // without seeing it.
                if winner.over < loser.stamp {
                    conflicts.push(Conflict {
                        name: self.name.clone(),
                        winner: winner.clone(),
                        loser,
                    });
                }
                self.head = Some(winner);
            }
            _ => {}
        }
        match (&self.policy, &other.policy) {
            (Some(ours), Some(theirs))
                if (theirs.stamp, &theirs.origin, &theirs.text)
                    <= (ours.stamp, &ours.origin, &ours.text) => {}
            (_, Some(theirs)) => self.policy = Some(theirs.clone()),
            (_, None) => {}
        }
        self.cleared = self.cleared.max(other.cleared);
        for theirs in &other.versions {
            match self.versions.iter_mut().find(|v| v.id == theirs.id) {
                // One id, two versions: only ever from 2^-53 luck or data
                // from before ids were drawn. Both sides keep the same one.
                Some(ours) if ours != theirs => {
                    if theirs.order(ours) == Ordering::Less {
                        *ours = theirs.clone();
                    }
                }
                Some(_) => {}
                None => self.versions.push(theirs.clone()),
            }
        }
        self.normalize();
        Merged {
            changed: *self != before,
            conflicts,
        }
    }

    /// Oldest first; versions cleared by a delete dropped; at most
    /// [`KEEP_VERSIONS`] besides the active one.
    fn normalize(&mut self) {
        let active = self.head.as_ref().and_then(|h| h.target);
        let cleared = self.cleared;
        self.versions
            .retain(|v| v.stamp > cleared || Some(v.id) == active);
        self.versions.sort_by(Version::order);
        let mut ids = std::collections::HashSet::new();
        self.versions.retain(|v| ids.insert(v.id));
        let first_kept = self.versions.len().saturating_sub(KEEP_VERSIONS);
        let mut at = 0;
        self.versions.retain(|v| {
            at += 1;
            at > first_kept || Some(v.id) == active
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(id: u64, stamp: Stamp, origin: &str, parent: Option<u64>) -> Version {
        Version {
            id,
            sha256: format!("sha-{id}"),
            size: 1,
            stamp,
            origin: origin.to_string(),
            parent,
        }
    }

    fn deployed(entry: &Entry, id: u64, stamp: Stamp, origin: &str) -> Entry {
        let mut next = entry.clone();
        let parent = entry.head.as_ref().and_then(|h| h.target);
        next.deploy(version(id, stamp, origin, parent));
        next
    }

    /// Every order of merging `writes` gives one entry.
    fn converge(writes: &[Entry]) -> Entry {
        let mut forward = Entry::new("f");
        let mut backward = Entry::new("f");
        let mut twice = Entry::new("f");
        for w in writes {
            forward.merge(w);
        }
        for w in writes.iter().rev() {
            backward.merge(w);
        }
        for w in writes.iter().chain(writes) {
            twice.merge(w);
        }
        // Merging merged states (associativity).
        let (left, right) = writes.split_at(writes.len() / 2);
        let mut a = Entry::new("f");
        let mut b = Entry::new("f");
        left.iter().for_each(|w| {
            a.merge(w);
        });
        right.iter().for_each(|w| {
            b.merge(w);
        });
        b.merge(&a);
        assert_eq!(forward, backward);
        assert_eq!(forward, twice);
        assert_eq!(forward, b);
        forward
    }

    #[test]
    fn a_later_tick_beats_everything_seen_whatever_the_wall_clock_says() {
        let mut clock = Clock::default();
        let first = clock.tick(1_000);
        assert_eq!(stamp_ms(first), 1_000);
        // Two changes in one millisecond: still ordered.
        assert!(clock.tick(1_000) > first);
        // A peer's clock runs an hour ahead: what this host does after
        // seeing its change is later all the same.
        let ahead = (1_000 + 3_600_000) << LOGICAL_BITS;
        clock.observe(ahead);
        assert!(clock.tick(1_001) > ahead);
        // The wall clock going backwards does not either.
        let before = clock.tick(5_000_000);
        assert!(clock.tick(10) > before);
    }

    #[test]
    fn a_stamp_past_the_bound_is_ahead_and_one_within_it_is_not() {
        let now = 1_000_000;
        let max = 60_000;
        assert!(!is_ahead(stamp_of_ms(now), now, max));
        assert!(!is_ahead(stamp_of_ms(now + max) | 0xffff, now, max));
        assert!(is_ahead(stamp_of_ms(now + max + 1), now, max));
        // A host booted in 2099.
        assert!(is_ahead(stamp_of_ms(4_070_908_800_000), now, max));
        // Behind is never ahead.
        assert!(!is_ahead(0, now, max));
    }

    #[test]
    fn concurrent_deploys_keep_both_versions_and_agree_on_one() {
        let base = deployed(&Entry::new("f"), 1, 10, "a");
        // a and b deploy without seeing each other; b's clock is behind.
        let on_a = deployed(&base, 2, 30, "a");
        let on_b = deployed(&base, 3, 20, "b");
        let merged = converge(&[base.clone(), on_a.clone(), on_b.clone()]);
        assert_eq!(merged.active().map(|v| v.id), Some(2));
        let ids: Vec<u64> = merged.versions.iter().map(|v| v.id).collect();
        assert_eq!(ids, [1, 3, 2]);
        assert_eq!(merged.superseded_by(3), Some(2));
        assert_eq!(merged.superseded_by(1), Some(3));
        // Each side sees the conflict when it meets the other.
        let mut a = on_a.clone();
        let outcome = a.merge(&on_b);
        assert!(outcome.changed);
        assert_eq!(outcome.conflicts.len(), 1);
        assert_eq!(outcome.conflicts[0].winner.target, Some(2));
        assert_eq!(outcome.conflicts[0].loser.target, Some(3));
        let mut b = on_b;
        assert_eq!(b.merge(&on_a).conflicts.len(), 1);
        // A change made after seeing another is no conflict.
        let later = deployed(&a, 4, 31, "b");
        assert!(a.merge(&later).conflicts.is_empty());
    }

    #[test]
    fn a_policy_edit_and_a_deploy_made_apart_both_hold() {
        let base = deployed(&Entry::new("f"), 1, 10, "a");
        let deploy = deployed(&base, 2, 20, "a");
        let mut edit = base.clone();
        // A later policy edit made on a host that had not seen the deploy.
        edit.set_policy("limits".into(), 30, "b");
        let merged = converge(&[base, deploy, edit]);
        assert_eq!(merged.active().map(|v| v.id), Some(2));
        assert_eq!(merged.policy.map(|p| p.text).as_deref(), Some("limits"));
    }

    #[test]
    fn a_delete_clears_older_versions_and_a_later_deploy_brings_the_function_back() {
        let v1 = deployed(&Entry::new("f"), 1, 10, "a");
        let v2 = deployed(&v1, 2, 20, "a");
        let mut deleted = v2.clone();
        deleted.point_head(None, 30, "b");
        assert!(deleted.is_deleted());
        assert!(deleted.versions.is_empty());
        // A copy of the old entry arriving late brings nothing back.
        let merged = converge(&[v1.clone(), v2.clone(), deleted.clone()]);
        assert!(merged.is_deleted());
        assert!(merged.versions.is_empty());
        // A deploy concurrent with the delete but stamped before it is
        // cleared with the rest; one after it revives the function.
        let concurrent = deployed(&v2, 3, 25, "c");
        let revived = deployed(&deleted, 4, 40, "c");
        let merged = converge(&[v2, concurrent, deleted, revived]);
        assert_eq!(merged.active().map(|v| v.id), Some(4));
        assert_eq!(merged.versions.len(), 1);
    }

    #[test]
    fn a_rollback_is_a_new_change_and_the_history_stays_bounded() {
        let mut entry = Entry::new("f");
        for i in 1..=(KEEP_VERSIONS as u64 + 5) {
            entry = deployed(&entry, i, i * 10, "a");
        }
        assert_eq!(entry.versions.len(), KEEP_VERSIONS);
        assert_eq!(entry.versions[0].id, 6);
        // Back to the oldest kept: the new head is stamped now, so a stale
        // copy of the entry (head at the newest version) cannot undo it.
        let stale = entry.clone();
        entry.point_head(Some(6), 1_000, "b");
        let merged = converge(&[stale, entry.clone()]);
        assert_eq!(merged.active().map(|v| v.id), Some(6));
        // Deploys beyond the window keep the active version, however old.
        let mut more = merged;
        for i in 100..(100 + KEEP_VERSIONS as u64) {
            let mut next = more.clone();
            next.versions.push(version(i, 2_000 + i, "c", Some(6)));
            next.normalize();
            more = next;
        }
        assert_eq!(more.active().map(|v| v.id), Some(6));
        assert_eq!(more.versions.len(), KEEP_VERSIONS + 1);
    }

    #[test]
    fn fresh_ids_avoid_the_ids_taken() {
        let entry = deployed(&Entry::new("f"), 7, 10, "a");
        assert_eq!(entry.fresh_id(6), 8);
        assert_eq!(entry.fresh_id(5), 6);
        let id = entry.fresh_id(u64::MAX);
        assert!(id > 0 && id < ID_SPACE);
    }
}
