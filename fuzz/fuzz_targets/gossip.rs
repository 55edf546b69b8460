//! What reaches the cluster plane. The input is read as a sealed gossip
//! datagram and as a peer request's signature header (what anyone who can
//! reach the gossip port or the API sends: neither may ever be accepted),
//! then as a node, a key and a value (what a peer with the secret may
//! publish inside a sealed datagram), so the parsing behind the seal is
//! fuzzed too.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use lichen_core::gossip::{self, PREFIX_FN, PREFIX_MOD, PREFIX_SECRET, PREFIX_TOKEN, Value};
use lichen_core::registry::{Entry, Version};
use lichen_core::seal::{self, Keyring, ReplayGuard, Secret};

static KEYRING: LazyLock<Keyring> = LazyLock::new(|| {
    let secret = |s| Secret::new(s).expect("a long secret");
    Keyring::new(
        secret("lichen fuzzing secret, 32 chars"),
        Some(secret("the fuzzing secret before that")),
    )
});

fuzz_target!(|data: &[u8]| {
    let mut datagram = data.to_vec();
    let now = 1_800_000_000_000;
    assert!(seal::open_datagram(&KEYRING, &mut ReplayGuard::default(), now, &mut datagram).is_err());
    if let Ok(header) = std::str::from_utf8(data) {
        assert!(seal::verify_request(&KEYRING, "GET", "/", ("a", ""), Some(header), now).is_err());
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = text.splitn(3, '\n');
    let (Some(node), Some(key), Some(value)) = (parts.next(), parts.next(), parts.next()) else {
        return;
    };
    // A `--peer` as an operator (or a config file) writes it.
    if let Ok(seed) = gossip::seed_address(node) {
        assert!(
            seed.rsplit_once(':')
                .is_some_and(|(_, port)| port.parse::<u16>().is_ok())
        );
    }
    match gossip::read(key, value) {
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
        Some(Value::Secret(name, state)) => {
            assert_eq!(key.strip_prefix(PREFIX_SECRET), Some(name));
            // Nothing a peer makes up opens: only a value sealed under the
            // cluster secret does.
            if let Some(sealed) = state.sealed.as_ref().and_then(|s| s.decode()) {
                let aad = gossip::secret_aad(name, state.stamp, &state.origin);
                assert!(KEYRING.open_value(&aad, &sealed).is_none());
            }
        }
        Some(Value::Token(name, state)) => {
            assert_eq!(key.strip_prefix(PREFIX_TOKEN), Some(name));
            // What a host keeps of it reads back the same.
            let json = serde_json::to_string(&state).unwrap();
            assert_eq!(serde_json::from_str::<gossip::TokenState>(&json).ok(), Some(state));
        }
        Some(Value::Api(v) | Value::Kv(v)) => assert_eq!(v, value),
        Some(Value::Load { .. }) | None => {}
    }
});
