//! Scoped API tokens: credentials an operator hands a team or a pipeline
//! instead of the admin token, each good for its scopes
//! ([`lichen_core::scopes`]) until it expires or is revoked.
//!
//! A token is `lch_` and 43 characters of base64url (256 random bits),
//! shown once, when it is made. What a host keeps is its SHA-256, scopes,
//! times and version ([`TokenState`]): one file per token,
//! `tokens/<name>.json`, and the same record in gossip, so every host of a
//! cluster accepts every token. A presented token is found by its hash; a
//! revoked one is kept (as a tombstone with its hash) so it is told apart
//! from a wrong one and an older version elsewhere does not bring it back.
//! The later (stamp, origin) of two versions wins, as for secrets.
//!
//! When a token was last used is this host's own knowledge: it is not
//! written down or spread.
//!
//! At most [`MAX_TOKENS`] live tokens (neither revoked nor expired) are
//! held, whoever made them: a peer's set beyond that is not taken either.
//! A dead token is kept [`DEAD_KEPT_MS`] after it died (revoked or
//! expired), long enough for every host to hear of it, then collected: a
//! host offline for longer than that should rejoin with its `tokens/`
//! directory emptied, or it spreads a revoked token's older live version
//! again.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use anyhow::{Context, Result};
use base64::Engine as _;
use ring::rand::{SecureRandom, SystemRandom};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::recent::now_unix_ms;
use crate::store::ModuleStore;
use lichen_core::gossip::TokenState;
use lichen_core::registry::Stamp;
use lichen_core::scopes::Scope;

/// Live tokens a host keeps at most (dead ones do not count).
pub const MAX_TOKENS: usize = 1024;
/// How long a revoked or expired token is kept before it is collected:
/// a week, far beyond any gossip round, as Cassandra keeps tombstones.
pub const DEAD_KEPT_MS: u64 = 7 * 24 * 3600 * 1000;

/// When `state` died (revoked or expired), if it did.
fn died_unix_ms(state: &TokenState, now: u64) -> Option<u64> {
    let revoked = state
        .revoked
        .then(|| lichen_core::registry::stamp_ms(state.stamp));
    let expired = state.expires_unix_ms.filter(|at| *at <= now);
    match (revoked, expired) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Whether `state` died longer ago than [`DEAD_KEPT_MS`].
fn collectable(state: &TokenState, now: u64) -> bool {
    died_unix_ms(state, now).is_some_and(|died| died.saturating_add(DEAD_KEPT_MS) <= now)
}
/// Scopes one token holds at most.
pub const MAX_SCOPES: usize = 32;
/// What every token starts with, so a leaked one is recognised.
pub const TOKEN_PREFIX: &str = "lch_";

/// A token's name: 1 to 64 of A-Z, a-z, 0-9, `_` and `-`.
pub fn check_name(name: &str) -> Result<(), String> {
    let valid = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a token name: 1 to 64 of A-Z, a-z, 0-9, '_' and '-'"
        ))
    }
}

/// The scopes a token was given, checked; the first bad one is the error.
pub fn parse_scopes(scopes: &[String]) -> Result<Vec<Scope>, String> {
    if scopes.is_empty() {
        return Err("a token needs at least one scope".to_string());
    }
    if scopes.len() > MAX_SCOPES {
        return Err(format!(
            "a token holds at most {MAX_SCOPES} scopes ({} given)",
            scopes.len()
        ));
    }
    scopes.iter().map(|s| Scope::parse(s)).collect()
}

/// What a listing shows of a token: never the token or its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenInfo {
    pub name: String,
    pub scopes: Vec<String>,
    pub created_unix_ms: u64,
    pub expires_unix_ms: Option<u64>,
    /// When a request presented it to this host (since it started).
    pub last_used_unix_ms: Option<u64>,
    pub expired: bool,
}

/// Who a valid token is, and what it may do.
#[derive(Debug)]
pub struct Grant {
    pub name: String,
    pub scopes: Vec<Scope>,
}

/// What a presented token turned out to be.
pub enum Verdict {
    /// No token of this host has that hash.
    Unknown,
    Revoked(String),
    Expired(String),
    Valid(Arc<Grant>),
}

struct Held {
    state: TokenState,
    grant: Arc<Grant>,
    last_used: AtomicU64,
}

#[derive(Default)]
struct Map {
    by_name: BTreeMap<String, Arc<Held>>,
    /// Hash to name, for every token held, revoked ones included.
    by_hash: HashMap<String, String>,
}

impl Map {
    /// The tokens neither revoked nor expired.
    fn live(&self) -> usize {
        let now = now_unix_ms();
        self.by_name
            .values()
            .filter(|held| died_unix_ms(&held.state, now).is_none())
            .count()
    }
}

/// Why a token could not be made.
pub enum CreateError {
    Exists,
    Full,
    Store(anyhow::Error),
}

#[derive(Default)]
pub struct Tokens {
    map: RwLock<Map>,
    /// Held across a change's file write and map update.
    changing: Mutex<()>,
}

impl Tokens {
    /// Every token `store` holds. A file that does not read is skipped
    /// with a warning: a token lost is refused, never widened.
    pub fn open(store: &ModuleStore) -> Result<Self> {
        let tokens = Tokens::default();
        for (name, bytes) in store.token_files()? {
            let state = serde_json::from_slice::<TokenState>(&bytes)
                .map_err(anyhow::Error::from)
                .and_then(|state| held(&name, state).map_err(anyhow::Error::msg));
            match state {
                Ok(held) => tokens.insert(&name, held),
                Err(error) => {
                    tracing::warn!(token = name, error = %error, "ignoring a token file that does not read");
                }
            }
        }
        Ok(tokens)
    }

    /// Makes a token `name` with `scopes`, durably; answers the token
    /// (the only time it is seen) and what a listing shows of it.
    pub fn create(
        &self,
        store: &ModuleStore,
        name: &str,
        scopes: Vec<String>,
        expires_unix_ms: Option<u64>,
        origin: &str,
        tick: impl FnOnce(Stamp) -> Stamp,
    ) -> Result<(String, TokenInfo), CreateError> {
        let _changing = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        self.collect(store).map_err(CreateError::Store)?;
        let seen = {
            let map = self.read();
            match map.by_name.get(name) {
                Some(held) if !held.state.revoked => return Err(CreateError::Exists),
                Some(held) => held.state.stamp,
                None if map.live() >= MAX_TOKENS => return Err(CreateError::Full),
                None => 0,
            }
        };
        let mut random = [0u8; 32];
        SystemRandom::new()
            .fill(&mut random)
            .map_err(|_| CreateError::Store(anyhow::anyhow!("no random bytes for a token")))?;
        let token = format!(
            "{TOKEN_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random)
        );
        let state = TokenState {
            hash: hash_of(token.as_bytes()),
            scopes,
            created_unix_ms: now_unix_ms(),
            expires_unix_ms,
            revoked: false,
            stamp: tick(seen),
            origin: origin.to_string(),
        };
        let info = self.store(store, name, state).map_err(CreateError::Store)?;
        Ok((token, info))
    }

    /// Revokes `name`, durably; `false` if there is no such live token.
    pub fn revoke(
        &self,
        store: &ModuleStore,
        name: &str,
        origin: &str,
        tick: impl FnOnce(Stamp) -> Stamp,
    ) -> Result<bool> {
        let _changing = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        let Some(mut state) = self
            .read()
            .by_name
            .get(name)
            .filter(|held| !held.state.revoked)
            .map(|held| held.state.clone())
        else {
            return Ok(false);
        };
        state.revoked = true;
        state.stamp = tick(state.stamp);
        state.origin = origin.to_string();
        self.store(store, name, state)?;
        Ok(true)
    }

    /// Takes a peer's version of `name` if it is newer than the one here,
    /// durably; whether it did. A version that does not hold together (a
    /// bad scope, a bad hash) is an error and changes nothing.
    pub fn apply(&self, store: &ModuleStore, name: &str, state: TokenState) -> Result<bool> {
        check_state(name, &state).map_err(anyhow::Error::msg)?;
        let _changing = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        self.collect(store)?;
        let now = now_unix_ms();
        let newer = {
            let map = self.read();
            match map.by_name.get(name) {
                Some(held) => {
                    (state.stamp, state.origin.as_str())
                        > (held.state.stamp, held.state.origin.as_str())
                }
                // A token long dead is not taken back once collected; a
                // new live one only while there is room.
                None if collectable(&state, now) => false,
                None if died_unix_ms(&state, now).is_none() && map.live() >= MAX_TOKENS => {
                    anyhow::bail!(
                        "token {name:?} from a peer: this host holds {MAX_TOKENS} live tokens already"
                    );
                }
                None => true,
            }
        };
        if newer {
            self.store(store, name, state)?;
        }
        Ok(newer)
    }

    /// What the presented token is. A valid one is noted as used now.
    pub fn check(&self, presented: &[u8]) -> Verdict {
        let hash = hash_of(presented);
        let map = self.read();
        let Some(held) = map.by_hash.get(&hash).and_then(|n| map.by_name.get(n)) else {
            return Verdict::Unknown;
        };
        let name = held.grant.name.clone();
        if held.state.revoked {
            return Verdict::Revoked(name);
        }
        let now = now_unix_ms();
        if held.state.expires_unix_ms.is_some_and(|at| at <= now) {
            return Verdict::Expired(name);
        }
        held.last_used.store(now, Ordering::Relaxed);
        Verdict::Valid(Arc::clone(&held.grant))
    }

    /// The name of the token presented, whatever its state; nothing is
    /// noted as used.
    pub fn name_of(&self, presented: &[u8]) -> Option<String> {
        self.read().by_hash.get(&hash_of(presented)).cloned()
    }

    /// The live tokens (revoked ones are not shown), by name.
    pub fn list(&self) -> Vec<TokenInfo> {
        self.read()
            .by_name
            .iter()
            .filter(|(_, held)| !held.state.revoked)
            .map(|(name, held)| info(name, held))
            .collect()
    }

    /// This host's version of `name`, revoked included.
    pub fn state(&self, name: &str) -> Option<TokenState> {
        self.read().by_name.get(name).map(|h| h.state.clone())
    }

    /// Every token name held, revoked ones included.
    pub fn names(&self) -> Vec<String> {
        self.read().by_name.keys().cloned().collect()
    }

    /// Drops the tokens dead longer than [`DEAD_KEPT_MS`], files first.
    /// Callers hold `changing`.
    fn collect(&self, store: &ModuleStore) -> Result<()> {
        let now = now_unix_ms();
        let dead: Vec<String> = self
            .read()
            .by_name
            .iter()
            .filter(|(_, held)| collectable(&held.state, now))
            .map(|(name, _)| name.clone())
            .collect();
        for name in dead {
            store.remove_token_file(&name)?;
            let mut map = self.write();
            if let Some(held) = map.by_name.remove(&name) {
                map.by_hash.remove(&held.state.hash);
            }
            tracing::info!(token = %name, "a token dead for a week collected");
        }
        Ok(())
    }

    /// Writes `state` to the token's file, then to the map. Callers hold
    /// `changing`.
    fn store(&self, store: &ModuleStore, name: &str, state: TokenState) -> Result<TokenInfo> {
        let held = held(name, state).map_err(anyhow::Error::msg)?;
        let bytes = serde_json::to_vec_pretty(&held.state).context("serialising a token")?;
        store.write_token_file(name, &bytes)?;
        let info = info(name, &held);
        self.insert(name, held);
        Ok(info)
    }

    fn insert(&self, name: &str, held: Held) {
        let mut map = self.write();
        if let Some(old) = map.by_name.get(name) {
            let old_hash = old.state.hash.clone();
            map.by_hash.remove(&old_hash);
        }
        map.by_hash
            .insert(held.state.hash.clone(), name.to_string());
        map.by_name.insert(name.to_string(), Arc::new(held));
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Map> {
        self.map.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Map> {
        self.map.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// Whether a peer's version of token `name` holds together: a valid name,
/// hash and scopes (a scope this host does not know makes it invalid
/// here: such a token is refused rather than widened).
pub fn check_state(name: &str, state: &TokenState) -> Result<(), String> {
    check_name(name)?;
    held(name, state.clone()).map(|_| ())
}

/// A token's record as held, its scopes parsed.
fn held(name: &str, state: TokenState) -> Result<Held, String> {
    let valid_hash = state.hash.len() == 64 && state.hash.bytes().all(|b| b.is_ascii_hexdigit());
    if !valid_hash {
        return Err(format!("token {name:?} has no valid hash"));
    }
    let scopes = parse_scopes(&state.scopes)?;
    Ok(Held {
        grant: Arc::new(Grant {
            name: name.to_string(),
            scopes,
        }),
        state,
        last_used: AtomicU64::new(0),
    })
}

fn info(name: &str, held: &Held) -> TokenInfo {
    let last_used = held.last_used.load(Ordering::Relaxed);
    TokenInfo {
        name: name.to_string(),
        scopes: held.state.scopes.clone(),
        created_unix_ms: held.state.created_unix_ms,
        expires_unix_ms: held.state.expires_unix_ms,
        last_used_unix_ms: (last_used > 0).then_some(last_used),
        expired: held
            .state
            .expires_unix_ms
            .is_some_and(|at| at <= now_unix_ms()),
    }
}

/// SHA-256 of a token, hex.
fn hash_of(token: &[u8]) -> String {
    hex::encode(Sha256::digest(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, ModuleStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = ModuleStore::open(dir.path()).unwrap();
        (dir, store)
    }

    fn scopes(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_token_is_found_by_itself_survives_a_restart_and_stays_revoked() {
        let (_dir, store) = store();
        let tokens = Tokens::open(&store).unwrap();
        let Ok((token, info)) = tokens.create(
            &store,
            "shop-ci",
            scopes(&["functions:deploy:shop-*"]),
            None,
            "a",
            |seen| seen + 1,
        ) else {
            panic!("not made");
        };
        assert!(token.starts_with(TOKEN_PREFIX) && token.len() == 47);
        assert_eq!(info.scopes, ["functions:deploy:shop-*"]);
        assert!(matches!(
            tokens.create(
                &store,
                "shop-ci",
                scopes(&["status:read"]),
                None,
                "a",
                |s| s + 1
            ),
            Err(CreateError::Exists)
        ));
        let Verdict::Valid(grant) = tokens.check(token.as_bytes()) else {
            panic!("not valid");
        };
        assert_eq!(grant.name, "shop-ci");
        assert!(matches!(tokens.check(b"lch_guess"), Verdict::Unknown));
        // Nothing on disk holds the token itself.
        let files = store.token_files().unwrap();
        assert!(!String::from_utf8_lossy(&files[0].1).contains(&token[4..]));

        let reopened = Tokens::open(&store).unwrap();
        assert!(matches!(
            reopened.check(token.as_bytes()),
            Verdict::Valid(_)
        ));
        assert!(reopened.revoke(&store, "shop-ci", "a", |s| s + 1).unwrap());
        assert!(!reopened.revoke(&store, "shop-ci", "a", |s| s + 1).unwrap());
        let reopened = Tokens::open(&store).unwrap();
        assert!(matches!(
            reopened.check(token.as_bytes()),
            Verdict::Revoked(_)
        ));
        assert!(reopened.list().is_empty());
    }

    #[test]
    fn an_expired_token_is_told_apart_and_a_later_version_wins() {
        let (_dir, store) = store();
        let tokens = Tokens::open(&store).unwrap();
        let Ok((token, _)) = tokens.create(
            &store,
            "old",
            scopes(&["status:read"]),
            Some(now_unix_ms() - 1),
            "a",
            |s| s + 1,
        ) else {
            panic!("not made");
        };
        assert!(matches!(
            tokens.check(token.as_bytes()),
            Verdict::Expired(_)
        ));
        assert!(tokens.list()[0].expired);
        // A peer's older version changes nothing; its later one is taken.
        let mut state = tokens.state("old").unwrap();
        let stamp = state.stamp;
        state.revoked = true;
        state.stamp = stamp - 1;
        assert!(!tokens.apply(&store, "old", state.clone()).unwrap());
        state.stamp = stamp + 1;
        assert!(tokens.apply(&store, "old", state.clone()).unwrap());
        assert!(matches!(
            tokens.check(token.as_bytes()),
            Verdict::Revoked(_)
        ));
        // A version that does not hold together is refused.
        state.stamp += 1;
        state.scopes = scopes(&["root"]);
        assert!(tokens.apply(&store, "old", state).is_err());
    }

    #[test]
    fn a_token_dead_for_a_week_is_collected_and_dead_ones_leave_room() {
        let (_dir, store) = store();
        let tokens = Tokens::open(&store).unwrap();
        let long_ago = now_unix_ms() - DEAD_KEPT_MS - 1000;
        let made = |name: &str, expires: Option<u64>| {
            tokens
                .create(&store, name, scopes(&["status:read"]), expires, "a", |s| {
                    s + 1
                })
                .is_ok()
        };
        assert!(made("ancient", Some(long_ago)));
        assert!(made("recent", Some(now_unix_ms() - 1)));
        assert!(made("live", None));
        // Making another collects the one dead for over a week, file and all.
        assert!(made("another", None));
        let names = tokens.names();
        assert!(!names.contains(&"ancient".to_string()), "{names:?}");
        assert!(names.contains(&"recent".to_string()), "{names:?}");
        assert!(
            !store
                .token_files()
                .unwrap()
                .iter()
                .any(|(n, _)| n == "ancient"),
            "the file went too"
        );
        // A peer's version of a token dead for over a week is not taken back.
        let mut state = tokens.state("recent").unwrap();
        state.expires_unix_ms = Some(long_ago);
        state.hash = "ab".repeat(32);
        assert!(!tokens.apply(&store, "ancient", state).unwrap());
        // Dead tokens do not count toward the cap.
        assert_eq!(tokens.read().live(), 2);
    }
}
