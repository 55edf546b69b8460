//! Secrets: values a policy's `[config]` names (`db_password = { secret =
//! "pg" }`) instead of holding them, set and removed through the admin API.
//!
//! At rest each secret is one file, `secrets/<name>.json`, sealed with
//! AES-256-GCM under a key derived (HKDF-SHA256) from the host's secrets key,
//! with the name as associated data, so a file renamed to another secret's
//! name does not open. The secrets key is `--secrets-key-file` (64 hex
//! digits), or one generated into `DATA_DIR/secrets.key` (mode 0600) on
//! first start; a file the key cannot open stops the host at start rather
//! than leaving functions without their secrets unnoticed.
//!
//! In memory the host holds the opened values, read by `wasi:config` when a
//! guest asks, so a changed secret reaches the next invocation without a
//! redeploy. Nothing else shows a value: listings carry a digest (an HMAC
//! keyed by another key derived from the secrets key, so equal values on
//! hosts sharing the key have equal digests, and the digest says nothing
//! of the value to whoever lacks the key) and the time it was set.
//!
//! In a cluster each change carries a version, the hybrid-clock stamp of the
//! change and the node it was made on, and peers keep the later
//! ([`Secrets::apply`]); a removed secret is kept as a tombstone with its
//! version, on disk too, so an older value a peer still publishes does not
//! come back (`crate::cluster` spreads them, sealed under the cluster
//! secret).

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use anyhow::{Context, Result, bail};
use ring::{aead, hkdf, hmac};
use serde::{Deserialize, Serialize};

use crate::policy::SecretName;
use crate::store::ModuleStore;
use lichen_core::registry::{Stamp, stamp_of_ms};
use lichen_core::seal::Len;

/// Where a generated secrets key is kept, in the data directory.
pub const KEY_FILE: &str = "secrets.key";

/// Secrets a host keeps at most; as many removed ones are remembered.
pub const MAX_SECRETS: usize = 1024;

/// The largest value: it travels to peers in one gossip datagram, sealed
/// and in base64.
pub const MAX_SECRET_BYTES: usize = 32 << 10;

/// What a listing shows of a secret: never its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SecretInfo {
    pub name: String,
    /// HMAC-SHA256 of the value under a key derived from the secrets key,
    /// hex: equal values have equal digests.
    pub digest: String,
    pub updated_unix_ms: u64,
}

/// A version of a secret: its value (`None`: removed), the stamp of the
/// change that made it and the node it was made on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub stamp: Stamp,
    pub origin: String,
    pub value: Option<Arc<str>>,
}

impl Versioned {
    fn newer_than(&self, held: &Held) -> bool {
        (self.stamp, self.origin.as_str()) > (held.stamp, held.origin.as_str())
    }
}

/// A secret as its file holds it; no nonce and ciphertext: removed.
#[derive(Serialize, Deserialize)]
struct OnDisk {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nonce: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ciphertext: Option<String>,
    updated_unix_ms: u64,
    /// Absent in files written before secrets had versions: the time.
    #[serde(default)]
    stamp: Stamp,
    #[serde(default)]
    origin: String,
}

struct Held {
    /// `None`: removed.
    value: Option<Arc<str>>,
    digest: String,
    updated_unix_ms: u64,
    stamp: Stamp,
    origin: String,
}

impl Held {
    fn info(&self, name: &str) -> SecretInfo {
        SecretInfo {
            name: name.to_string(),
            digest: self.digest.clone(),
            updated_unix_ms: self.updated_unix_ms,
        }
    }

    fn versioned(&self) -> Versioned {
        Versioned {
            stamp: self.stamp,
            origin: self.origin.clone(),
            value: self.value.clone(),
        }
    }
}

pub struct Secrets {
    seal: aead::LessSafeKey,
    digest: hmac::Key,
    held: RwLock<BTreeMap<String, Held>>,
    /// Removed secrets remembered at most ([`MAX_SECRETS`]).
    max_removed: usize,
    /// Held by a change from its check to its last write, so the files and
    /// the map agree; readers (guests, listings) wait only for the map.
    changing: Mutex<()>,
}

/// Why a secret could not be set.
#[derive(Debug)]
pub enum SetError {
    /// The value is not something a guest can be given (`400`).
    Invalid(String),
    /// The host holds as many secrets as it may (`409`).
    Full,
    /// Storing it failed; nothing changed (`500`).
    Store(anyhow::Error),
}

/// What [`Secrets::apply`] did with a peer's version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Not newer than the one here: nothing.
    Older,
    /// The secret has this value now.
    Set,
    /// The secret is removed now.
    Removed,
}

/// A value a guest can be given: UTF-8 text, not empty, at most
/// [`MAX_SECRET_BYTES`].
fn check_value(value: &[u8]) -> Result<&str, String> {
    let value = std::str::from_utf8(value)
        .map_err(|_| "a secret's value must be UTF-8 text".to_string())?;
    if value.is_empty() {
        return Err("a secret's value is empty (the request had no body)".to_string());
    }
    if value.len() > MAX_SECRET_BYTES {
        return Err(format!(
            "a secret's value is at most {MAX_SECRET_BYTES} bytes ({} given)",
            value.len()
        ));
    }
    Ok(value)
}

impl Secrets {
    /// Opens every secret `store` holds with `key` (32 bytes).
    pub fn open(store: &ModuleStore, key: &[u8; 32]) -> Result<Self> {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"lichen secrets v1").extract(key);
        let expand = |info: &[u8]| -> Result<[u8; 32]> {
            let mut out = [0u8; 32];
            prk.expand(&[info], Len(32))
                .and_then(|okm| okm.fill(&mut out))
                .map_err(|_| anyhow::anyhow!("deriving a secrets key"))?;
            Ok(out)
        };
        let seal = aead::UnboundKey::new(&aead::AES_256_GCM, &expand(b"seal")?)
            .map_err(|_| anyhow::anyhow!("deriving the sealing key"))?;
        let secrets = Secrets {
            seal: aead::LessSafeKey::new(seal),
            digest: hmac::Key::new(hmac::HMAC_SHA256, &expand(b"digest")?),
            held: RwLock::new(BTreeMap::new()),
            max_removed: MAX_SECRETS,
            changing: Mutex::new(()),
        };
        let mut held = BTreeMap::new();
        for (name, bytes) in store.secret_files()? {
            let value = secrets.unseal(&name, &bytes).with_context(|| {
                format!(
                    "secret {name:?} does not open with this host's secrets key \
                     (was --secrets-key-file changed?)"
                )
            })?;
            held.insert(name, value);
        }
        *secrets.write() = held;
        Ok(secrets)
    }

    /// The value of `name`, if it is set.
    pub fn get(&self, name: &str) -> Option<Arc<str>> {
        self.read().get(name).and_then(|held| held.value.clone())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Every set secret's name, digest and time, by name.
    pub fn list(&self) -> Vec<SecretInfo> {
        self.read()
            .iter()
            .filter(|(_, held)| held.value.is_some())
            .map(|(name, held)| held.info(name))
            .collect()
    }

    /// The version of `name` this host holds, removed ones included.
    pub fn version(&self, name: &str) -> Option<Versioned> {
        self.read().get(name).map(Held::versioned)
    }

    /// Every version this host holds, removed ones included, by name.
    pub fn versions(&self) -> Vec<(String, Versioned)> {
        self.read()
            .iter()
            .map(|(name, held)| (name.clone(), held.versioned()))
            .collect()
    }

    /// Sets `name` to `value`, durably in `store`, then in memory, as a
    /// change made on `origin` at the stamp `tick` gives (it is handed the
    /// stamp of the version held, and must give a later one).
    pub fn set(
        &self,
        store: &ModuleStore,
        name: &SecretName,
        value: &[u8],
        origin: &str,
        tick: impl FnOnce(Stamp) -> Stamp,
    ) -> Result<SecretInfo, SetError> {
        let value = check_value(value).map_err(SetError::Invalid)?;
        let _changing = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        let held_stamp = {
            let held = self.read();
            let live = held.values().filter(|h| h.value.is_some()).count();
            let this = held.get(&name.0);
            if this.is_none_or(|h| h.value.is_none()) && live >= MAX_SECRETS {
                return Err(SetError::Full);
            }
            this.map_or(0, |h| h.stamp)
        };
        let version = Versioned {
            stamp: tick(held_stamp),
            origin: origin.to_string(),
            value: Some(Arc::from(value)),
        };
        self.store(store, &name.0, version).map_err(SetError::Store)
    }

    /// Removes `name`, durably, as a change made on `origin` at the stamp
    /// `tick` gives; `false` if it was not set.
    pub fn remove(
        &self,
        store: &ModuleStore,
        name: &SecretName,
        origin: &str,
        tick: impl FnOnce(Stamp) -> Stamp,
    ) -> Result<bool> {
        let _changing = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        let Some(held_stamp) = self
            .read()
            .get(&name.0)
            .filter(|h| h.value.is_some())
            .map(|h| h.stamp)
        else {
            return Ok(false);
        };
        let version = Versioned {
            stamp: tick(held_stamp),
            origin: origin.to_string(),
            value: None,
        };
        self.store(store, &name.0, version)?;
        Ok(true)
    }

    /// Takes a peer's version of `name` if it is newer than the one here,
    /// durably. A value that is not something a guest can be given is an
    /// error, and nothing changes.
    pub fn apply(
        &self,
        store: &ModuleStore,
        name: &SecretName,
        version: Versioned,
    ) -> Result<Applied> {
        if let Some(value) = &version.value {
            check_value(value.as_bytes()).map_err(anyhow::Error::msg)?;
        }
        let _changing = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        if self
            .read()
            .get(&name.0)
            .is_some_and(|held| !version.newer_than(held))
        {
            return Ok(Applied::Older);
        }
        let applied = if version.value.is_some() {
            Applied::Set
        } else {
            Applied::Removed
        };
        self.store(store, &name.0, version)?;
        Ok(applied)
    }

    /// Writes `version` of `name` to its file, then to the map; past
    /// `max_removed` removed ones, forgets the oldest. Callers hold
    /// `changing`.
    fn store(&self, store: &ModuleStore, name: &str, version: Versioned) -> Result<SecretInfo> {
        let updated_unix_ms = now_unix_ms();
        let on_disk = self.seal(name, &version, updated_unix_ms)?;
        store.write_secret_file(name, &on_disk)?;
        let held = Held {
            digest: version
                .value
                .as_deref()
                .map(|value| self.digest_of(value))
                .unwrap_or_default(),
            value: version.value,
            updated_unix_ms,
            stamp: version.stamp,
            origin: version.origin,
        };
        let info = held.info(name);
        let forget = {
            let mut map = self.write();
            map.insert(name.to_string(), held);
            let mut removed: Vec<(Stamp, String)> = map
                .iter()
                .filter(|(_, held)| held.value.is_none())
                .map(|(name, held)| (held.stamp, name.clone()))
                .collect();
            removed.sort();
            let excess = removed.len().saturating_sub(self.max_removed);
            removed.truncate(excess);
            removed
        };
        for (_, name) in forget {
            // The file first: forgotten in memory only once gone on disk.
            store.remove_secret_file(&name)?;
            self.write().remove(&name);
            tracing::info!(secret = %name, "forgot the oldest removed secret (too many removed)");
        }
        Ok(info)
    }

    fn seal(&self, name: &str, version: &Versioned, updated_unix_ms: u64) -> Result<Vec<u8>> {
        let (nonce, ciphertext) = match &version.value {
            Some(value) => {
                let mut nonce = [0u8; aead::NONCE_LEN];
                getrandom::fill(&mut nonce).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
                let mut in_out = value.as_bytes().to_vec();
                self.seal
                    .seal_in_place_append_tag(
                        aead::Nonce::assume_unique_for_key(nonce),
                        aead::Aad::from(name.as_bytes()),
                        &mut in_out,
                    )
                    .map_err(|_| anyhow::anyhow!("sealing secret {name:?}"))?;
                (Some(hex::encode(nonce)), Some(hex::encode(in_out)))
            }
            None => (None, None),
        };
        let on_disk = OnDisk {
            nonce,
            ciphertext,
            updated_unix_ms,
            stamp: version.stamp,
            origin: version.origin.clone(),
        };
        Ok(serde_json::to_vec(&on_disk)?)
    }

    fn unseal(&self, name: &str, bytes: &[u8]) -> Result<Held> {
        SecretName::try_from(name.to_string()).map_err(anyhow::Error::msg)?;
        let on_disk: OnDisk = serde_json::from_slice(bytes).context("not a sealed secret")?;
        let stamp = match on_disk.stamp {
            0 => stamp_of_ms(on_disk.updated_unix_ms),
            stamp => stamp,
        };
        let value = match (&on_disk.nonce, &on_disk.ciphertext) {
            (Some(nonce), Some(ciphertext)) => {
                let nonce: [u8; aead::NONCE_LEN] = hex::decode(nonce)
                    .ok()
                    .and_then(|nonce| nonce.try_into().ok())
                    .context("a sealed secret's nonce is 12 bytes in hex")?;
                let mut in_out = hex::decode(ciphertext).context("ciphertext is not hex")?;
                let plain = self
                    .seal
                    .open_in_place(
                        aead::Nonce::assume_unique_for_key(nonce),
                        aead::Aad::from(name.as_bytes()),
                        &mut in_out,
                    )
                    .map_err(|_| anyhow::anyhow!("it does not open"))?;
                Some(Arc::from(
                    std::str::from_utf8(plain).context("its value is not UTF-8")?,
                ))
            }
            (None, None) => None,
            _ => bail!("a sealed secret has both a nonce and a ciphertext, or neither"),
        };
        Ok(Held {
            digest: value
                .as_deref()
                .map(|value| self.digest_of(value))
                .unwrap_or_default(),
            value,
            updated_unix_ms: on_disk.updated_unix_ms,
            stamp,
            origin: on_disk.origin,
        })
    }

    fn digest_of(&self, value: &str) -> String {
        hex::encode(hmac::sign(&self.digest, value.as_bytes()))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Held>> {
        self.held
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Held>> {
        self.held
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The secrets key: read from `key_file` if given (it must exist), else
/// from `DATA_DIR/secrets.key`, generated there (mode 0600) the first time.
pub fn load_or_create_key(data_dir: &Path, key_file: Option<&Path>) -> Result<[u8; 32]> {
    let path = match key_file {
        Some(path) => path.to_path_buf(),
        None => data_dir.join(KEY_FILE),
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => parse_key(&text).with_context(|| format!("reading {}", path.display())),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound && key_file.is_none() => {
            let mut key = [0u8; 32];
            getrandom::fill(&mut key)
                .map_err(|e| anyhow::anyhow!("no randomness for the secrets key: {e}"))?;
            // Written whole under another name, then renamed: a crash
            // leaves no key or the whole key, never an empty file.
            let tmp = data_dir.join(format!(".{KEY_FILE}.tmp"));
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .with_context(|| format!("writing {}", tmp.display()))?;
            file.write_all(format!("{}\n", hex::encode(key)).as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)
                .and_then(|()| std::fs::File::open(data_dir)?.sync_all())
                .with_context(|| format!("writing {}", path.display()))?;
            tracing::info!(path = %path.display(), "generated a secrets key");
            Ok(key)
        }
        Err(error) => Err(error).with_context(|| format!("reading {}", path.display())),
    }
}

fn parse_key(text: &str) -> Result<[u8; 32]> {
    let Some(key) = hex::decode(text.trim())
        .ok()
        .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
    else {
        bail!("a secrets key is 64 hex digits (32 bytes), e.g. from `openssl rand -hex 32`");
    };
    Ok(key)
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn name(text: &str) -> SecretName {
        SecretName::try_from(text.to_string()).unwrap()
    }

    fn next(seen: Stamp) -> Stamp {
        seen + 1
    }

    fn set(secrets: &Secrets, store: &ModuleStore, secret: &str, value: &[u8]) -> SecretInfo {
        secrets
            .set(store, &name(secret), value, "n1", next)
            .unwrap()
    }

    fn remove(secrets: &Secrets, store: &ModuleStore, secret: &str) -> bool {
        secrets.remove(store, &name(secret), "n1", next).unwrap()
    }

    #[test]
    fn a_secret_is_sealed_on_disk_and_opens_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let key = load_or_create_key(dir.path(), None).unwrap();
        let store = ModuleStore::open(dir.path()).unwrap();
        let secrets = Secrets::open(&store, &key).unwrap();
        let info = set(&secrets, &store, "pg", b"hunter2-plain-text");
        assert_eq!(secrets.get("pg").as_deref(), Some("hunter2-plain-text"));
        let on_disk = std::fs::read(dir.path().join("secrets/pg.json")).unwrap();
        assert!(!String::from_utf8_lossy(&on_disk).contains("hunter2"));

        let again = Secrets::open(&store, &load_or_create_key(dir.path(), None).unwrap()).unwrap();
        assert_eq!(again.get("pg").as_deref(), Some("hunter2-plain-text"));
        assert_eq!(again.list(), vec![info]);
    }

    #[test]
    fn another_key_or_another_name_does_not_open_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModuleStore::open(dir.path()).unwrap();
        let secrets = Secrets::open(&store, &[1; 32]).unwrap();
        set(&secrets, &store, "a", b"value of a");
        let error = Secrets::open(&store, &[2; 32]).err().unwrap();
        assert!(format!("{error:#}").contains("secrets key"), "{error:#}");

        std::fs::rename(
            dir.path().join("secrets/a.json"),
            dir.path().join("secrets/b.json"),
        )
        .unwrap();
        assert!(Secrets::open(&store, &[1; 32]).is_err());
    }

    #[test]
    fn digests_match_for_equal_values_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModuleStore::open(dir.path()).unwrap();
        let secrets = Secrets::open(&store, &[7; 32]).unwrap();
        let a = set(&secrets, &store, "a", b"same");
        let b = set(&secrets, &store, "b", b"same");
        let c = set(&secrets, &store, "c", b"other");
        assert_eq!(a.digest, b.digest);
        assert_ne!(a.digest, c.digest);
        assert!(!a.digest.contains("same"));
        assert!(matches!(
            secrets.set(&store, &name("d"), &[0xff, 0xfe], "n1", next),
            Err(SetError::Invalid(_))
        ));
        assert!(remove(&secrets, &store, "a"));
        assert!(!remove(&secrets, &store, "a"));
        assert_eq!(secrets.get("a"), None);
    }

    fn version(stamp: Stamp, origin: &str, value: Option<&str>) -> Versioned {
        Versioned {
            stamp,
            origin: origin.to_string(),
            value: value.map(Arc::from),
        }
    }

    #[test]
    fn a_peers_version_is_taken_when_later_and_a_removal_outlives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModuleStore::open(dir.path()).unwrap();
        let secrets = Secrets::open(&store, &[3; 32]).unwrap();
        let pg = name("pg");
        let apply = |v| secrets.apply(&store, &pg, v).unwrap();
        assert_eq!(apply(version(10, "n2", Some("ten"))), Applied::Set);
        assert_eq!(apply(version(9, "n3", Some("nine"))), Applied::Older);
        assert_eq!(apply(version(10, "n2", Some("again"))), Applied::Older);
        // The same stamp: the origin orders them.
        assert_eq!(apply(version(10, "n3", Some("ten at n3"))), Applied::Set);
        assert_eq!(secrets.get("pg").as_deref(), Some("ten at n3"));
        // A change here is later than what it replaces.
        set(&secrets, &store, "pg", b"eleven");
        assert_eq!(secrets.version("pg").unwrap().stamp, 11);
        assert_eq!(apply(version(12, "n2", None)), Applied::Removed);
        assert_eq!(secrets.get("pg"), None);
        assert!(secrets.list().is_empty());
        assert!(!remove(&secrets, &store, "pg"));

        // After a restart the removal still wins over the older value.
        let again = Secrets::open(&store, &[3; 32]).unwrap();
        assert_eq!(again.version("pg"), Some(version(12, "n2", None)));
        assert_eq!(
            again
                .apply(&store, &pg, version(11, "n1", Some("eleven")))
                .unwrap(),
            Applied::Older
        );
        assert_eq!(again.get("pg"), None);
        // What a guest could not be given is refused.
        assert!(
            again
                .apply(&store, &pg, version(20, "n2", Some("")))
                .is_err()
        );
        let long = "x".repeat(MAX_SECRET_BYTES + 1);
        assert!(
            again
                .apply(&store, &pg, version(20, "n2", Some(&long)))
                .is_err()
        );
        assert_eq!(again.version("pg").unwrap().stamp, 12);
    }

    #[test]
    fn the_oldest_removals_are_forgotten_past_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModuleStore::open(dir.path()).unwrap();
        let mut secrets = Secrets::open(&store, &[4; 32]).unwrap();
        secrets.max_removed = 3;
        set(&secrets, &store, "kept", b"a value");
        for i in 0..5 {
            let removed = version(100 + i, "n2", None);
            secrets
                .apply(&store, &name(&format!("s{i}")), removed)
                .unwrap();
        }
        let names: Vec<String> = secrets.versions().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["kept", "s2", "s3", "s4"]);
        assert_eq!(store.secret_files().unwrap().len(), 4);
    }

    #[test]
    fn a_key_file_must_hold_64_hex_digits() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, "short").unwrap();
        assert!(load_or_create_key(dir.path(), Some(&file)).is_err());
        let missing = dir.path().join("missing");
        assert!(load_or_create_key(dir.path(), Some(&missing)).is_err());
        std::fs::write(&file, format!("{}\n", "ab".repeat(32))).unwrap();
        assert_eq!(
            load_or_create_key(dir.path(), Some(&file)).unwrap(),
            [0xab; 32]
        );
    }
}
