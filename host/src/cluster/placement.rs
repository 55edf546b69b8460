//! Where an invocation goes when this host is full: among the function's
//! rendezvous-hash owners, the less loaded of two (power of two choices).
//!
//! Rendezvous (highest random weight) hashing gives every host the same
//! ordered list of owners for a function from the member list alone, without
//! asking anyone: a one-hop distributed hash table. When a member joins or
//! leaves, only the functions it owned move. Choosing the less loaded of two
//! owners by advertised load avoids both herding onto one host and the cost
//! of polling them all.

use sha2::{Digest, Sha256};

/// A live peer as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub node_id: String,
    /// Invocation slots the peer advertised as free.
    pub free_slots: u32,
    /// The peer's advertised load (in-flight invocations).
    pub load: u32,
}

/// The weight of `node_id` for `function`: a stable hash of both.
fn weight(function: &str, node_id: &str) -> u64 {
    let digest = Sha256::new()
        .chain_update(function.as_bytes())
        .chain_update([0u8])
        .chain_update(node_id.as_bytes())
        .finalize();
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(bytes)
}

/// The weight of `node_id` for one tick of a function's cron trigger: the
/// hosts serving the function take their turns at the tick in this order.
pub fn tick_weight(function: &str, trigger: u32, at_ms: i64, node_id: &str) -> u64 {
    let digest = Sha256::new()
        .chain_update(b"cron\0")
        .chain_update(function.as_bytes())
        .chain_update([0u8])
        .chain_update(trigger.to_be_bytes())
        .chain_update(at_ms.to_be_bytes())
        .chain_update(node_id.as_bytes())
        .finalize();
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(bytes)
}

/// The `k` owners of `function` among `members`, highest weight first. Every
/// host computes the same list from the same members.
pub fn owners<'a>(function: &str, members: &'a [Candidate], k: usize) -> Vec<&'a Candidate> {
    let mut ranked: Vec<(u64, &Candidate)> = members
        .iter()
        .map(|m| (weight(function, &m.node_id), m))
        .collect();
    ranked.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.node_id.cmp(&b.1.node_id)));
    ranked.into_iter().take(k).map(|(_, m)| m).collect()
}

/// Picks a peer with free slots for `function`: the two highest-ranked owners
/// that have room, and of those the less loaded. `None` if no owner has room;
/// the caller may then try any member with room, or answer 503.
pub fn choose<'a>(
    function: &str,
    members: &'a [Candidate],
    owners_k: usize,
) -> Option<&'a Candidate> {
    let mut with_room = owners(function, members, owners_k)
        .into_iter()
        .filter(|m| m.free_slots > 0);
    let first = with_room.next()?;
    match with_room.next() {
        Some(second) if second.load < first.load => Some(second),
        _ => Some(first),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str, free: u32, load: u32) -> Candidate {
        Candidate {
            node_id: id.to_string(),
            free_slots: free,
            load,
        }
    }

    #[test]
    fn every_host_computes_the_same_owners_whatever_the_order() {
        let a = [member("a", 1, 0), member("b", 1, 0), member("c", 1, 0)];
        let b = [member("c", 1, 0), member("a", 1, 0), member("b", 1, 0)];
        for function in ["hello", "square", "fib"] {
            let ids = |m: &[Candidate]| {
                owners(function, m, 2)
                    .iter()
                    .map(|c| c.node_id.clone())
                    .collect::<Vec<_>>()
            };
            assert_eq!(ids(&a), ids(&b));
        }
    }

    #[test]
    fn a_leaving_member_only_moves_what_it_owned() {
        let all: Vec<Candidate> = (0..5).map(|i| member(&format!("n{i}"), 1, 0)).collect();
        let without: Vec<Candidate> = all.iter().filter(|m| m.node_id != "n2").cloned().collect();
        let mut moved = 0;
        for f in 0..200 {
            let function = format!("f{f}");
            let before = owners(&function, &all, 1)[0].node_id.clone();
            let after = owners(&function, &without, 1)[0].node_id.clone();
            if before != after {
                assert_eq!(before, "n2", "{function} moved though its owner stayed");
                moved += 1;
            }
        }
        assert!(moved > 0 && moved < 100, "{moved} of 200 moved");
    }

    #[test]
    fn the_less_loaded_of_two_owners_with_room_is_chosen() {
        let members = [member("a", 4, 9), member("b", 4, 1), member("c", 0, 0)];
        let ranked = owners("hello", &members, 3);
        let with_room: Vec<&&Candidate> = ranked.iter().filter(|m| m.free_slots > 0).collect();
        let chosen = choose("hello", &members, 3).unwrap();
        let expected = if with_room[1].load < with_room[0].load {
            with_room[1]
        } else {
            with_room[0]
        };
        assert_eq!(chosen.node_id, expected.node_id);
        assert_ne!(chosen.node_id, "c", "a member without room is never chosen");
        assert!(choose("hello", &[member("x", 0, 0)], 3).is_none());
    }
}
