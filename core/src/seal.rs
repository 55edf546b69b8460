//! The cluster secret and what is derived from it.
//!
//! One shared secret authenticates everything between hosts:
//! - the gossip cluster id is derived from it, so a host with another secret
//!   is answered `BadCluster` and never receives the cluster's state;
//! - every value a host publishes in gossip carries a MAC over (node id, key,
//!   value), so a process that learned the cluster id by listening still
//!   cannot forge registry entries or advertise an API address;
//! - internal HTTP (module fetches, forwarded invocations) carries a token
//!   derived from it.
//!
//! Gossip itself is not encrypted: it expects a private network (see the
//! README's trust model).

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// Hex characters of a value's MAC (128 bits).
const MAC_HEX: usize = 32;

#[derive(Clone)]
pub struct Secret {
    key: Vec<u8>,
    token: String,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// A secret shorter than 16 bytes is refused: it would be guessable.
    pub fn new(secret: &str) -> anyhow::Result<Self> {
        if secret.len() < 16 {
            anyhow::bail!("the cluster secret must be at least 16 characters");
        }
        let key = secret.as_bytes().to_vec();
        let token = hex::encode(mac(&key, &[b"lichen internal http v1"]));
        Ok(Secret { key, token })
    }

    /// The gossip cluster id: hosts with different secrets are different
    /// clusters to chitchat.
    pub fn cluster_id(&self) -> String {
        let tag = mac(&self.key, &[b"lichen cluster id v1"]);
        format!("lichen-{}", hex::encode(&tag[..8]))
    }

    /// The bearer token of internal HTTP requests.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Whether `presented` is this cluster's token (constant time).
    pub fn accepts(&self, presented: &[u8]) -> bool {
        bool::from(presented.ct_eq(self.token.as_bytes()))
    }

    /// `value` as published by `node` under `key`: `<mac>.<value>`.
    pub fn seal(&self, node: &str, key: &str, value: &str) -> String {
        let tag = mac(
            &self.key,
            &[
                node.as_bytes(),
                b"\0",
                key.as_bytes(),
                b"\0",
                value.as_bytes(),
            ],
        );
        format!("{}.{value}", &hex::encode(tag)[..MAC_HEX])
    }

    /// The value sealed by `node` under `key`, if its MAC is right.
    pub fn open<'a>(&self, node: &str, key: &str, sealed: &'a str) -> Option<&'a str> {
        let (tag, value) = sealed.split_at_checked(MAC_HEX)?;
        let value = value.strip_prefix('.')?;
        let expected = self.seal(node, key, value);
        bool::from(expected.as_bytes()[..MAC_HEX].ct_eq(tag.as_bytes())).then_some(value)
    }
}

fn mac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_the_same_secret_node_and_key() {
        let a = Secret::new("correct horse battery staple").unwrap();
        let b = Secret::new("another secret, as long").unwrap();
        let sealed = a.seal("node-1", "api", "http://127.0.0.1:1");
        assert_eq!(a.open("node-1", "api", &sealed), Some("http://127.0.0.1:1"));
        assert_eq!(b.open("node-1", "api", &sealed), None);
        assert_eq!(a.open("node-2", "api", &sealed), None);
        assert_eq!(a.open("node-1", "load", &sealed), None);
        let tampered = sealed.replace("127.0.0.1", "127.0.0.2");
        assert_eq!(a.open("node-1", "api", &tampered), None);
        assert_eq!(a.open("node-1", "api", "short"), None);
        assert_ne!(a.cluster_id(), b.cluster_id());
        assert!(a.accepts(a.token().as_bytes()));
        assert!(!a.accepts(b.token().as_bytes()));
        assert!(Secret::new("short").is_err());
    }
}
