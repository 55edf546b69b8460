//! The values a host publishes in gossip, and reading them back from a peer.
//!
//! Values travel in sealed datagrams ([`crate::seal`]), so only hosts with
//! the cluster secret publish them; each is parsed as its key says.
//! Whatever a peer publishes, reading it never fails loudly: a value that
//! does not parse is `None`.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};

use crate::registry::{Entry, Stamp};
use crate::seal::SealedValue;

/// A `fn:` value: what the host knows of a function, and which version it
/// serves (`None`: none yet, or the function is deleted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionState {
    pub entry: Entry,
    #[serde(default)]
    pub serving: Option<u64>,
}

/// A `secret:` value: the version of a secret the host holds (the stamp of
/// the change that made it and the node it was made on), and the value
/// sealed with [`crate::seal::Keyring::seal_value`] over [`secret_aad`];
/// `None`: removed. The later (stamp, origin) wins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretState {
    pub stamp: Stamp,
    pub origin: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<SealedText>,
}

impl SecretState {
    /// The version, to compare with another: the later wins.
    pub fn version(&self) -> (Stamp, &str) {
        (self.stamp, &self.origin)
    }
}

/// A `token:` value: the host's version of a scoped API token. It holds
/// the token's SHA-256, never the token. `revoked`: kept so an older
/// version elsewhere does not bring it back. The later (stamp, origin)
/// wins. The same record is the token's file on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenState {
    /// SHA-256 of the token, hex.
    pub hash: String,
    pub scopes: Vec<String>,
    pub created_unix_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_unix_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub revoked: bool,
    pub stamp: Stamp,
    pub origin: String,
}

impl TokenState {
    /// The version, to compare with another: the later wins.
    pub fn version(&self) -> (Stamp, &str) {
        (self.stamp, &self.origin)
    }
}

/// A [`SealedValue`] as gossip carries it: base64, the keys by key id in
/// hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedText {
    pub data: String,
    pub keys: BTreeMap<String, String>,
}

impl From<&SealedValue> for SealedText {
    fn from(sealed: &SealedValue) -> Self {
        SealedText {
            data: BASE64.encode(&sealed.data),
            keys: sealed
                .keys
                .iter()
                .map(|(id, key)| (hex::encode(id), BASE64.encode(key)))
                .collect(),
        }
    }
}

impl SealedText {
    /// The sealed value, if its fields decode.
    pub fn decode(&self) -> Option<SealedValue> {
        let keys = self
            .keys
            .iter()
            .map(|(id, key)| {
                let id: [u8; 4] = hex::decode(id).ok()?.try_into().ok()?;
                Some((id, BASE64.decode(key).ok()?))
            })
            .collect::<Option<Vec<_>>>()?;
        Some(SealedValue {
            data: BASE64.decode(&self.data).ok()?,
            keys,
        })
    }
}

/// What a secret's sealed value is bound to: its name and version, so a
/// value published for one secret, or for an older version of it, does
/// not open as another.
pub fn secret_aad(name: &str, stamp: Stamp, origin: &str) -> Vec<u8> {
    format!("lichen secret\0{name}\0{stamp}\0{origin}").into_bytes()
}

/// The host's HTTP address for peers.
pub const KEY_API: &str = "api";
/// Free invocation slots, invocations in flight and the host's wall clock
/// when it wrote them: `"<free> <load> <unix ms>"` (hosts before the clock
/// was published wrote the first two only).
pub const KEY_LOAD: &str = "load";
/// Which key-value data the host sees (`local:<node>`, `nats:<cluster>`).
pub const KEY_KV: &str = "kv";
/// `fn:<name>`: the host's registry entry of the function and the version
/// it serves, as JSON ([`FunctionState`]).
pub const PREFIX_FN: &str = "fn:";
/// `mod:<sha256>`: a module the host holds (the value is empty).
pub const PREFIX_MOD: &str = "mod:";
/// `secret:<name>`: the host's version of a secret, sealed
/// ([`SecretState`]).
pub const PREFIX_SECRET: &str = "secret:";
/// `token:<name>`: the host's version of a scoped API token
/// ([`TokenState`]).
pub const PREFIX_TOKEN: &str = "token:";

/// The gossip port a `--peer` without one gets.
pub const DEFAULT_GOSSIP_PORT: u16 = 7946;

/// A `--peer` as gossip resolves it: `HOST:PORT` or `IP:PORT`, the port
/// [`DEFAULT_GOSSIP_PORT`] when missing. Host names stay names: gossip
/// resolves them again periodically (a Kubernetes headless service's
/// addresses change as pods come and go).
pub fn seed_address(peer: &str) -> Result<String, String> {
    let peer = peer.trim();
    let bad = |why: &str| Err(format!("{peer:?}: {why}"));
    if peer.is_empty() {
        return bad("empty");
    }
    if peer.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(peer.to_string());
    }
    // An IP address alone: v4, v6 with or without brackets.
    if let Ok(ip) = peer
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
    {
        return Ok(std::net::SocketAddr::new(ip, DEFAULT_GOSSIP_PORT).to_string());
    }
    let (host, port) = match peer.rsplit_once(':') {
        Some((host, port)) => match port.parse::<u16>() {
            Ok(port) => (host, port),
            Err(_) => return bad("the port must be a number from 0 to 65535"),
        },
        None => (peer, DEFAULT_GOSSIP_PORT),
    };
    let label_ok = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    if host.len() > 253 || !host.trim_end_matches('.').split('.').all(label_ok) {
        return bad("expected HOST[:PORT] or IP[:PORT]");
    }
    Ok(format!("{host}:{port}"))
}

/// One gossip value, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value<'a> {
    Api(&'a str),
    Load {
        free: u32,
        load: u32,
        /// The peer's wall clock when it wrote the value (Unix ms).
        clock_ms: Option<u64>,
    },
    Kv(&'a str),
    /// The state of the function the key names.
    Function(FunctionState),
    /// The module the key names, by its hash.
    Module(&'a str),
    /// The secret the key names, and the host's version of it.
    Secret(&'a str, SecretState),
    /// The token the key names, and the host's version of it.
    Token(&'a str, TokenState),
}

/// The value published under `key`, if its key is known and its body what
/// that key holds.
pub fn read<'a>(key: &'a str, value: &'a str) -> Option<Value<'a>> {
    if let Some(name) = key.strip_prefix(PREFIX_FN) {
        let state: FunctionState = serde_json::from_str(value).ok()?;
        return (state.entry.name == name).then_some(Value::Function(state));
    }
    if let Some(name) = key.strip_prefix(PREFIX_SECRET) {
        return Some(Value::Secret(name, serde_json::from_str(value).ok()?));
    }
    if let Some(name) = key.strip_prefix(PREFIX_TOKEN) {
        return Some(Value::Token(name, serde_json::from_str(value).ok()?));
    }
    if let Some(sha) = key.strip_prefix(PREFIX_MOD) {
        return Some(Value::Module(sha));
    }
    match key {
        KEY_API => Some(Value::Api(value)),
        KEY_KV => Some(Value::Kv(value)),
        KEY_LOAD => {
            let mut fields = value.split(' ');
            let free = fields.next()?.parse().ok()?;
            let load = fields.next()?.parse().ok()?;
            let clock_ms = match fields.next() {
                Some(clock) => Some(clock.parse().ok()?),
                None => None,
            };
            if fields.next().is_some() {
                return None;
            }
            Some(Value::Load {
                free,
                load,
                clock_ms,
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_read_back_as_their_key_says() {
        assert_eq!(
            read(KEY_API, "http://127.0.0.1:1"),
            Some(Value::Api("http://127.0.0.1:1"))
        );
        assert_eq!(
            read(KEY_LOAD, "3 5"),
            Some(Value::Load {
                free: 3,
                load: 5,
                clock_ms: None
            })
        );
        assert_eq!(
            read(KEY_LOAD, "3 5 1700000000000"),
            Some(Value::Load {
                free: 3,
                load: 5,
                clock_ms: Some(1_700_000_000_000)
            })
        );
        assert_eq!(read(KEY_LOAD, "3"), None);
        assert_eq!(read(KEY_LOAD, "3 5 6 7"), None);
        assert_eq!(read(KEY_LOAD, "3 5 x"), None);
        assert_eq!(read(KEY_LOAD, "3 -1"), None);
        assert_eq!(read(KEY_KV, "local:n1"), Some(Value::Kv("local:n1")));
        assert_eq!(read("mod:ab12", ""), Some(Value::Module("ab12")));
        assert_eq!(read("other", "x"), None);
        let secret = SecretState {
            stamp: 9,
            origin: "n2".into(),
            sealed: Some(SealedText::from(&SealedValue {
                data: vec![1, 2, 3],
                keys: vec![([0xab; 4], vec![4, 5])],
            })),
        };
        let json = serde_json::to_string(&secret).unwrap();
        let Some(Value::Secret("pg", read_back)) = read("secret:pg", &json) else {
            panic!("{json} does not read back");
        };
        assert_eq!(
            read_back.sealed.as_ref().and_then(SealedText::decode),
            Some(SealedValue {
                data: vec![1, 2, 3],
                keys: vec![([0xab; 4], vec![4, 5])]
            })
        );
        let removed = r#"{"stamp":10,"origin":"n1"}"#;
        assert!(matches!(
            read("secret:pg", removed),
            Some(Value::Secret("pg", SecretState { sealed: None, .. }))
        ));
        assert_eq!(read("secret:pg", "{}"), None);
        let bad_key = SealedText {
            data: String::new(),
            keys: [("zz".to_string(), String::new())].into(),
        };
        assert_eq!(bad_key.decode(), None);
        let mut entry = Entry::new("hello");
        entry.deploy(crate::registry::Version {
            id: 2,
            sha256: "ab".into(),
            size: 1,
            stamp: 7,
            origin: "n1".into(),
            parent: None,
        });
        let state = FunctionState {
            entry,
            serving: Some(2),
        };
        let json = serde_json::to_string(&state).unwrap();
        assert_eq!(read("fn:hello", &json), Some(Value::Function(state)));
        // An entry under another function's key is not that function's.
        assert_eq!(read("fn:other", &json), None);
        assert_eq!(read("fn:hello", "{not json"), None);
    }

    #[test]
    fn peers_are_names_or_addresses_with_the_gossip_port_by_default() {
        let ok = |p: &str| seed_address(p).unwrap();
        assert_eq!(ok("10.0.0.7:7000"), "10.0.0.7:7000");
        assert_eq!(ok("10.0.0.7"), "10.0.0.7:7946");
        assert_eq!(ok("[::1]:7000"), "[::1]:7000");
        assert_eq!(ok("::1"), "[::1]:7946");
        assert_eq!(ok("[::1]"), "[::1]:7946");
        assert_eq!(ok("localhost:7000"), "localhost:7000");
        assert_eq!(
            ok("lichen-gossip.edge.svc.cluster.local"),
            "lichen-gossip.edge.svc.cluster.local:7946"
        );
        assert_eq!(
            ok("lichen-0.lichen-gossip."),
            "lichen-0.lichen-gossip.:7946"
        );
        for bad in [
            "",
            "host:port",
            "host:70000",
            "a b:1",
            "-x:1",
            "x..y",
            "http://x:1",
        ] {
            assert!(seed_address(bad).is_err(), "{bad:?} accepted");
        }
    }
}
