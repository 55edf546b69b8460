//! Gossip values from peers: a node id, a key and a sealed value in, a
//! value read or nothing. The input is read twice: as it came (what anyone
//! who can reach the gossip port sends; its seal is almost never right), and
//! sealed with the cluster's secret first (what a peer with the secret may
//! publish), so the parsing behind the seal is fuzzed too.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use lichen_core::gossip::{self, PREFIX_FN, PREFIX_MOD, Value};
use lichen_core::registry::{Entry, Version};
use lichen_core::seal::Secret;

static SECRET: LazyLock<Secret> =
    LazyLock::new(|| Secret::new("lichen fuzzing secret, 32 chars").expect("a long secret"));

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = text.splitn(3, '\n');
    let (Some(node), Some(key), Some(value)) = (parts.next(), parts.next(), parts.next()) else {
        return;
    };
    let _ = gossip::read(&SECRET, node, key, value);
    // A `--peer` as an operator (or a config file) writes it.
    if let Ok(seed) = gossip::seed_address(node) {
        assert!(
            seed.rsplit_once(':')
                .is_some_and(|(_, port)| port.parse::<u16>().is_ok())
        );
    }
    let sealed = SECRET.seal(node, key, value);
    match gossip::read(&SECRET, node, key, &sealed) {
        Some(Value::Function(state)) => {
            let entry = &state.entry;
            assert_eq!(key.strip_prefix(PREFIX_FN), Some(entry.name.as_str()));
            // Merging is a join: idempotent, and commutative with an entry
            // of the same function made here.
            let mut twice = entry.clone();
            twice.merge(entry);
            assert!(!twice.merge(entry).changed);
            let mut local = Entry::new(&entry.name);
            local.deploy(Version {
                id: 1,
                sha256: "00".into(),
                size: 1,
                stamp: 1 << 40,
                origin: "here".into(),
                parent: None,
            });
            let (mut left, mut right) = (local.clone(), entry.clone());
            left.merge(entry);
            right.merge(&local);
            let (mut left2, mut right2) = (left.clone(), right.clone());
            left2.merge(&right);
            right2.merge(&left);
            assert_eq!(left2, right2);
        }
        Some(Value::Module(sha)) => assert_eq!(key.strip_prefix(PREFIX_MOD), Some(sha)),
        Some(Value::Api(v) | Value::Kv(v)) => assert_eq!(v, value),
        Some(Value::Load { .. }) | None => {}
    }
    // Sealed by one node, it is not another's.
    let other = format!("{node}x");
    assert_eq!(gossip::read(&SECRET, &other, key, &sealed), None);
});
