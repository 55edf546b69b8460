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

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use anyhow::{Context, Result, bail};
use ring::{aead, hkdf, hmac};
use serde::{Deserialize, Serialize};

use crate::policy::{MAX_CONFIG_VALUE_BYTES, SecretName};
use crate::store::ModuleStore;
use lichen_core::seal::Len;

/// Where a generated secrets key is kept, in the data directory.
pub const KEY_FILE: &str = "secrets.key";

/// Secrets a host keeps at most.
pub const MAX_SECRETS: usize = 1024;

/// What a listing shows of a secret: never its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SecretInfo {
    pub name: String,
    /// HMAC-SHA256 of the value under a key derived from the secrets key,
    /// hex: equal values have equal digests.
    pub digest: String,
    pub updated_unix_ms: u64,
}

/// A secret as its file holds it.
#[derive(Serialize, Deserialize)]
struct Sealed {
    nonce: String,
    ciphertext: String,
    updated_unix_ms: u64,
}

struct Held {
    value: Arc<str>,
    info: SecretInfo,
}

pub struct Secrets {
    seal: aead::LessSafeKey,
    digest: hmac::Key,
    held: RwLock<BTreeMap<String, Held>>,
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
        self.read().get(name).map(|held| Arc::clone(&held.value))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.read().contains_key(name)
    }

    /// Every secret's name, digest and time, by name.
    pub fn list(&self) -> Vec<SecretInfo> {
        self.read().values().map(|held| held.info.clone()).collect()
    }

    /// Sets `name` to `value`, durably in `store`, then in memory.
    pub fn set(
        &self,
        store: &ModuleStore,
        name: &SecretName,
        value: &[u8],
    ) -> Result<SecretInfo, SetError> {
        let value = std::str::from_utf8(value)
            .map_err(|_| SetError::Invalid("a secret's value must be UTF-8 text".to_string()))?;
        if value.is_empty() {
            return Err(SetError::Invalid(
                "a secret's value is empty (the request had no body)".to_string(),
            ));
        }
        if value.len() > MAX_CONFIG_VALUE_BYTES {
            return Err(SetError::Invalid(format!(
                "a secret's value is at most {MAX_CONFIG_VALUE_BYTES} bytes ({} given)",
                value.len()
            )));
        }
        let _changing = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        {
            let held = self.read();
            if !held.contains_key(&name.0) && held.len() >= MAX_SECRETS {
                return Err(SetError::Full);
            }
        }
        let updated_unix_ms = now_unix_ms();
        let sealed = self
            .seal(&name.0, value, updated_unix_ms)
            .map_err(SetError::Store)?;
        store
            .write_secret_file(&name.0, &sealed)
            .map_err(SetError::Store)?;
        let info = SecretInfo {
            name: name.0.clone(),
            digest: self.digest_of(value),
            updated_unix_ms,
        };
        self.write().insert(
            name.0.clone(),
            Held {
                value: Arc::from(value),
                info: info.clone(),
            },
        );
        Ok(info)
    }

    /// Removes `name`, durably; `false` if it was not set.
    pub fn remove(&self, store: &ModuleStore, name: &SecretName) -> Result<bool> {
        let _changing = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        let removed = store.remove_secret_file(&name.0)?;
        Ok(self.write().remove(&name.0).is_some() || removed)
    }

    fn seal(&self, name: &str, value: &str, updated_unix_ms: u64) -> Result<Vec<u8>> {
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
        let sealed = Sealed {
            nonce: hex::encode(nonce),
            ciphertext: hex::encode(in_out),
            updated_unix_ms,
        };
        Ok(serde_json::to_vec(&sealed)?)
    }

    fn unseal(&self, name: &str, bytes: &[u8]) -> Result<Held> {
        SecretName::try_from(name.to_string()).map_err(anyhow::Error::msg)?;
        let sealed: Sealed = serde_json::from_slice(bytes).context("not a sealed secret")?;
        let nonce: [u8; aead::NONCE_LEN] = hex::decode(&sealed.nonce)
            .ok()
            .and_then(|nonce| nonce.try_into().ok())
            .context("a sealed secret's nonce is 12 bytes in hex")?;
        let mut in_out = hex::decode(&sealed.ciphertext).context("ciphertext is not hex")?;
        let plain = self
            .seal
            .open_in_place(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(name.as_bytes()),
                &mut in_out,
            )
            .map_err(|_| anyhow::anyhow!("it does not open"))?;
        let value = std::str::from_utf8(plain).context("its value is not UTF-8")?;
        Ok(Held {
            info: SecretInfo {
                name: name.to_string(),
                digest: self.digest_of(value),
                updated_unix_ms: sealed.updated_unix_ms,
            },
            value: Arc::from(value),
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

    #[test]
    fn a_secret_is_sealed_on_disk_and_opens_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let key = load_or_create_key(dir.path(), None).unwrap();
        let store = ModuleStore::open(dir.path()).unwrap();
        let secrets = Secrets::open(&store, &key).unwrap();
        let info = secrets
            .set(&store, &name("pg"), b"hunter2-plain-text")
            .unwrap();
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
        secrets.set(&store, &name("a"), b"value of a").unwrap();
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
        let a = secrets.set(&store, &name("a"), b"same").unwrap();
        let b = secrets.set(&store, &name("b"), b"same").unwrap();
        let c = secrets.set(&store, &name("c"), b"other").unwrap();
        assert_eq!(a.digest, b.digest);
        assert_ne!(a.digest, c.digest);
        assert!(!a.digest.contains("same"));
        assert!(matches!(
            secrets.set(&store, &name("d"), &[0xff, 0xfe]),
            Err(SetError::Invalid(_))
        ));
        assert!(secrets.remove(&store, &name("a")).unwrap());
        assert!(!secrets.remove(&store, &name("a")).unwrap());
        assert_eq!(secrets.get("a"), None);
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
