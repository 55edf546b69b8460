//! Modules on disk: content-addressed by SHA-256, with per-name versions and
//! an active pointer, plus the cache of compiled code.
//!
//! Layout under the data directory:
//!
//! ```text
//! modules/<sha256>.wasm                 uploaded components, as uploaded
//! compiled/<engine-key>/<sha256>.cwasm  wasmtime's serialised code for them
//! functions/<name>.json                 one function's registry entry and the version served here
//! secrets/<name>.json                   one secret, encrypted (`secrets.rs` seals and opens it)
//! tmp/                                  writes in progress
//! ```
//!
//! Every write goes to `tmp/`, is fsynced, then renamed over its target, and
//! the directory is fsynced: a crash or a full disk leaves either the old file
//! or the new one, never a torn one. A deploy writes the module first and the
//! function record last, so the record never serves a module that is not on
//! disk, and a failed deploy leaves the previous version active. (The
//! registry entry in a record may list versions whose modules are still
//! being fetched from peers.)
//!
//! The data directory is opened once as a cap-std `Dir`; every file is reached
//! through it, so no name or hash can address a path outside it (names and
//! hashes are validated too; this is the second wall).
//!
//! Compiled code is keyed by the engine's compatibility hash: another wasmtime
//! or other engine settings look in another directory and recompile. Only the
//! host writes this cache; compiled code from anywhere else is never loaded,
//! since deserialising it amounts to running it.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use cap_std::ambient_authority;
use cap_std::fs::Dir;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::names::FunctionName;
use lichen_core::registry::{Entry, Version, stamp_ms, stamp_of_ms};

const MODULES: &str = "modules";
const COMPILED: &str = "compiled";
const FUNCTIONS: &str = "functions";
const SECRETS: &str = "secrets";
const TOKENS: &str = "tokens";
/// Where hosts kept deletes before records kept them; read once to migrate.
const DELETED: &str = "deleted";
const TMP: &str = "tmp";

pub use lichen_core::registry::KEEP_VERSIONS;

/// Which generation of `wasi:http` a component serves: detected by the
/// engine when the version is deployed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Abi {
    /// `wasi:http/proxy@0.2`: exports `wasi:http/incoming-handler@0.2.x`.
    /// Records written before WASIp3 was served have no `abi`: they are p2.
    #[default]
    P2,
    /// `wasi:http/service@0.3`: exports `wasi:http/handler@0.3.x`.
    P3,
}

/// One version as this host serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// The version's id in the registry (unique among the function's
    /// versions, cluster-wide).
    pub version: u64,
    pub sha256: String,
    pub size: u64,
    pub created_unix: u64,
    #[serde(default)]
    pub abi: Abi,
    /// The registry reference it was pulled from, with the digests pulled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oci: Option<crate::oci::OciSource>,
}

/// Everything this host keeps about one function name, in
/// `functions/<name>.json`: the registry entry (its versions, which one is
/// active or that it is deleted, its policy) and the version served here.
/// A deleted function keeps its record (the tombstone), so no host can
/// bring it back with an older copy, even after every host restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionRecord {
    pub name: FunctionName,
    pub entry: Entry,
    /// What this host serves: the registry's active version once applied
    /// here; `None` while deleted or not yet applied.
    #[serde(default)]
    pub serving: Option<VersionInfo>,
    /// Where versions pulled from an OCI registry on this host came from.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub oci: BTreeMap<u64, crate::oci::OciSource>,
}

impl FunctionRecord {
    /// The record of a function with no version yet.
    pub fn new(name: FunctionName) -> Self {
        FunctionRecord {
            entry: Entry::new(name.as_str()),
            name,
            serving: None,
            oci: BTreeMap::new(),
        }
    }

    /// The version to serve for the registry's active version.
    pub fn info(&self, version: &Version) -> VersionInfo {
        VersionInfo {
            version: version.id,
            sha256: version.sha256.clone(),
            size: version.size,
            created_unix: stamp_ms(version.stamp) / 1000,
            // Set from the component when it is prepared.
            abi: Abi::P2,
            oci: self.oci.get(&version.id).cloned(),
        }
    }

    /// What the gossip round must act on, hashed: which version is active
    /// (or deleted), the versions kept, and the version served here. Any
    /// change to these changes it; stamps alone do not say, since a merge
    /// can bring in a head stamped below the entry's latest stamp.
    pub fn fingerprint(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        if let Some(head) = &self.entry.head {
            (head.target, head.stamp, &head.origin).hash(&mut hasher);
        }
        for version in &self.entry.versions {
            (version.id, &version.sha256).hash(&mut hasher);
        }
        self.serving.as_ref().map(|s| s.version).hash(&mut hasher);
        hasher.finish()
    }

    /// Every module the record refers to.
    pub fn modules(&self) -> impl Iterator<Item = &str> {
        self.entry
            .versions
            .iter()
            .map(|v| v.sha256.as_str())
            .chain(self.serving.iter().map(|v| v.sha256.as_str()))
    }
}

/// A record as hosts wrote it before the registry kept versions by id: the
/// numbered versions, the active one. Read once and written in the new form.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LegacyRecord {
    name: FunctionName,
    active: u64,
    versions: Vec<LegacyVersion>,
}

#[derive(Deserialize)]
struct LegacyVersion {
    version: u64,
    sha256: String,
    size: u64,
    created_unix: u64,
    #[serde(default)]
    timestamp_ms: Option<u64>,
    #[serde(default)]
    abi: Abi,
    #[serde(default)]
    oci: Option<crate::oci::OciSource>,
}

/// A remembered delete as hosts wrote it under `deleted/`.
#[derive(Deserialize)]
struct LegacyDelete {
    name: String,
    timestamp_ms: u64,
    origin: String,
}

impl LegacyRecord {
    fn upgrade(self) -> FunctionRecord {
        let mut record = FunctionRecord::new(self.name);
        let mut parent = None;
        for old in self.versions {
            let ms = old
                .timestamp_ms
                .unwrap_or(old.created_unix.saturating_mul(1000));
            let version = Version {
                id: old.version,
                sha256: old.sha256.clone(),
                size: old.size,
                stamp: stamp_of_ms(ms),
                origin: String::new(),
                parent,
            };
            parent = Some(old.version);
            if old.version == self.active {
                record.serving = Some(VersionInfo {
                    version: old.version,
                    sha256: old.sha256,
                    size: old.size,
                    created_unix: old.created_unix,
                    abi: old.abi,
                    oci: old.oci.clone(),
                });
            }
            if let Some(oci) = old.oci {
                record.oci.insert(old.version, oci);
            }
            record.entry.versions.push(version);
        }
        let head = record
            .entry
            .version(self.active)
            .map(|v| (v.stamp, v.origin.clone()));
        if let Some((stamp, origin)) = head {
            record.entry.point_head(Some(self.active), stamp, &origin);
        }
        record
    }
}

/// The SHA-256 of `bytes`, lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The data directory.
pub struct ModuleStore {
    dir: Dir,
    path: PathBuf,
}

impl ModuleStore {
    /// Opens (creating if needed) the data directory at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        std::fs::create_dir_all(path)
            .with_context(|| format!("creating data directory {}", path.display()))?;
        let dir = Dir::open_ambient_dir(path, ambient_authority())
            .with_context(|| format!("opening data directory {}", path.display()))?;
        for sub in [MODULES, COMPILED, FUNCTIONS, SECRETS, TOKENS, TMP] {
            dir.create_dir_all(sub)
                .with_context(|| format!("creating {}/{sub}", path.display()))?;
        }
        // Leftovers of writes interrupted by a crash: never renamed, never used.
        if let Ok(tmp) = dir.open_dir(TMP) {
            for entry in tmp.entries()?.flatten() {
                let _ = tmp.remove_file(entry.file_name());
            }
        }
        let store = ModuleStore {
            dir,
            path: path.to_path_buf(),
        };
        store.migrate_deletes()?;
        Ok(store)
    }

    /// Turns deletes remembered the old way (`deleted/<name>.json`) into
    /// tombstone records, unless the name has a record already.
    fn migrate_deletes(&self) -> Result<()> {
        let Ok(entries) = self.dir.read_dir(DELETED) else {
            return Ok(());
        };
        for entry in entries.flatten() {
            let file = format!("{DELETED}/{}", entry.file_name().to_string_lossy());
            let old: Option<LegacyDelete> = self
                .dir
                .read(&file)
                .ok()
                .and_then(|bytes| serde_json::from_slice(&bytes).ok());
            if let Some(old) = old
                && let Ok(name) = FunctionName::new(&old.name)
            {
                let mut record = self
                    .read_record(&name)?
                    .unwrap_or_else(|| FunctionRecord::new(name));
                let mut tombstone = Entry::new(record.name.as_str());
                tombstone.point_head(None, stamp_of_ms(old.timestamp_ms), &old.origin);
                record.entry.merge(&tombstone);
                if record.entry.is_deleted() {
                    record.serving = None;
                }
                self.write_record(&record)?;
            }
            self.dir
                .remove_file(&file)
                .with_context(|| format!("removing {file} (migrated)"))?;
        }
        self.dir.remove_dir(DELETED).ok();
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens (creating if needed) a database file directly in the data
    /// directory, for reading and writing.
    pub fn open_database(&self, name: &str) -> Result<std::fs::File> {
        let mut options = cap_std::fs::OpenOptions::new();
        options.read(true).write(true).create(true);
        let file = self
            .dir
            .open_with(name, &options)
            .with_context(|| format!("opening {}/{name}", self.path.display()))?;
        Ok(file.into_std())
    }

    pub fn has_module(&self, sha256: &str) -> bool {
        self.dir.exists(module_file(sha256))
    }

    /// Stores a module under its hash; a module already there is left alone.
    pub fn write_module(&self, sha256: &str, bytes: &[u8]) -> Result<()> {
        if self.has_module(sha256) {
            return Ok(());
        }
        self.write_atomic(&module_file(sha256), bytes)
            .with_context(|| format!("storing module {sha256}"))
    }

    pub fn read_module(&self, sha256: &str) -> Result<Vec<u8>> {
        check_hash(sha256)?;
        let bytes = self
            .dir
            .read(module_file(sha256))
            .with_context(|| format!("reading module {sha256}"))?;
        // A module whose bytes no longer match its name was damaged on disk.
        if sha256_hex(&bytes) != sha256 {
            bail!("module {sha256} on disk does not match its hash");
        }
        Ok(bytes)
    }

    /// Where the compiled code for `sha256` lives (for wasmtime's mmap loader).
    pub fn compiled_path(&self, engine_key: &str, sha256: &str) -> PathBuf {
        self.path.join(compiled_file(engine_key, sha256))
    }

    pub fn has_compiled(&self, engine_key: &str, sha256: &str) -> bool {
        self.dir.exists(compiled_file(engine_key, sha256))
    }

    pub fn write_compiled(&self, engine_key: &str, sha256: &str, bytes: &[u8]) -> Result<()> {
        self.dir
            .create_dir_all(format!("{COMPILED}/{engine_key}"))
            .context("creating the compiled-code cache directory")?;
        self.write_atomic(&compiled_file(engine_key, sha256), bytes)
            .with_context(|| format!("caching compiled code for {sha256}"))
    }

    /// Every function record on disk. A record that cannot be read is logged
    /// and skipped, so one damaged file does not keep the others down.
    pub fn load_records(&self) -> Result<Vec<FunctionRecord>> {
        let mut records = Vec::new();
        for entry in self.dir.read_dir(FUNCTIONS)? {
            let entry = entry?;
            let file_name = entry.file_name();
            let Some(file_name) = file_name.to_str() else {
                continue;
            };
            let Some(stem) = file_name.strip_suffix(".json") else {
                continue;
            };
            match self.read_record_file(stem) {
                Ok(Some(record)) => records.push(record),
                Ok(None) => {}
                Err(error) => {
                    tracing::error!(
                        file = file_name,
                        error = format!("{error:#}"),
                        "skipping function record"
                    )
                }
            }
        }
        records.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(records)
    }

    pub fn read_record(&self, name: &FunctionName) -> Result<Option<FunctionRecord>> {
        self.read_record_file(name.as_str())
    }

    fn read_record_file(&self, stem: &str) -> Result<Option<FunctionRecord>> {
        let name = FunctionName::new(stem)?;
        let file = record_file(&name);
        if !self.dir.exists(&file) {
            return Ok(None);
        }
        let bytes = self
            .dir
            .read(&file)
            .with_context(|| format!("reading {file}"))?;
        let record = match serde_json::from_slice::<FunctionRecord>(&bytes) {
            Ok(record) => record,
            Err(error) => match serde_json::from_slice::<LegacyRecord>(&bytes) {
                Ok(legacy) => {
                    let record = legacy.upgrade();
                    self.write_record(&record)?;
                    tracing::info!(function = %record.name, "record migrated to the registry's form");
                    record
                }
                Err(_) => return Err(error).with_context(|| format!("parsing {file}")),
            },
        };
        if record.name != name {
            bail!("{file} names another function, {}", record.name);
        }
        if record.entry.name != record.name.as_str() {
            bail!(
                "{file} holds the entry of another function, {}",
                record.entry.name
            );
        }
        Ok(Some(record))
    }

    pub fn write_record(&self, record: &FunctionRecord) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(record)?;
        self.write_atomic(&record_file(&record.name), &bytes)
            .with_context(|| format!("writing the record of {}", record.name))
    }

    /// Removes modules and compiled code that no record refers to any more.
    pub fn collect_garbage(&self) -> Result<()> {
        let referenced: HashSet<String> = self
            .load_records()?
            .iter()
            .flat_map(|r| r.modules().map(str::to_string).collect::<Vec<_>>())
            .collect();
        self.collect_garbage_except(&referenced)
    }

    /// Removes every module, and its compiled code, not in `referenced`
    /// (SHA-256s): for a caller that holds every record in memory.
    pub fn collect_garbage_except(&self, referenced: &HashSet<String>) -> Result<()> {
        let unreferenced = |file_name: &str, suffix: &str| {
            file_name
                .strip_suffix(suffix)
                .is_some_and(|sha| !referenced.contains(sha))
        };
        for entry in self.dir.read_dir(MODULES)?.flatten() {
            let file_name = entry.file_name().to_string_lossy().into_owned();
            if unreferenced(&file_name, ".wasm") {
                self.dir.remove_file(format!("{MODULES}/{file_name}"))?;
            }
        }
        for key_dir in self.dir.read_dir(COMPILED)?.flatten() {
            let key = key_dir.file_name().to_string_lossy().into_owned();
            let Ok(dir) = key_dir.open_dir() else {
                continue;
            };
            for entry in dir.entries()?.flatten() {
                let file_name = entry.file_name().to_string_lossy().into_owned();
                if unreferenced(&file_name, ".cwasm") {
                    dir.remove_file(&file_name)
                        .with_context(|| format!("removing {COMPILED}/{key}/{file_name}"))?;
                }
            }
        }
        Ok(())
    }

    /// Every sealed secret file, by name (the name as the file has it; the
    /// caller checks it).
    pub fn secret_files(&self) -> Result<Vec<(String, Vec<u8>)>> {
        self.named_files(SECRETS)
    }

    /// Writes one sealed secret, durably. `name` is a checked secret name.
    pub fn write_secret_file(&self, name: &str, sealed: &[u8]) -> Result<()> {
        self.write_atomic(&format!("{SECRETS}/{name}.json"), sealed)
            .with_context(|| format!("storing secret {name:?}"))
    }

    /// Removes one sealed secret, durably; `false` if there was none.
    pub fn remove_secret_file(&self, name: &str) -> Result<bool> {
        self.remove_named_file(SECRETS, name)
            .with_context(|| format!("removing secret {name:?}"))
    }

    /// Every API token's file (hashes, never tokens), by name.
    pub fn token_files(&self) -> Result<Vec<(String, Vec<u8>)>> {
        self.named_files(TOKENS)
    }

    /// Writes one token's file, durably. `name` is a checked token name.
    pub fn write_token_file(&self, name: &str, bytes: &[u8]) -> Result<()> {
        self.write_atomic(&format!("{TOKENS}/{name}.json"), bytes)
            .with_context(|| format!("storing token {name:?}"))
    }

    /// Removes one token's file, durably; `false` if there was none.
    pub fn remove_token_file(&self, name: &str) -> Result<bool> {
        self.remove_named_file(TOKENS, name)
            .with_context(|| format!("removing token {name:?}"))
    }

    /// The `NAME.json` files of the directory `sub`, by name.
    fn named_files(&self, sub: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let mut files = Vec::new();
        for entry in self.dir.read_dir(sub)?.flatten() {
            let file_name = entry.file_name().to_string_lossy().into_owned();
            if let Some(name) = file_name.strip_suffix(".json") {
                let bytes = self
                    .dir
                    .read(format!("{sub}/{file_name}"))
                    .with_context(|| format!("reading {sub}/{file_name}"))?;
                files.push((name.to_string(), bytes));
            }
        }
        Ok(files)
    }

    /// Removes `sub/NAME.json`, durably; `false` if there was none.
    fn remove_named_file(&self, sub: &str, name: &str) -> Result<bool> {
        match self.dir.remove_file(format!("{sub}/{name}.json")) {
            Ok(()) => {
                self.sync_dir(sub)?;
                Ok(true)
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(error) => Err(error.into()),
        }
    }

    /// Writes `bytes` to `target` (relative to the data directory) so that
    /// readers see the old content or the new, never a mix.
    fn write_atomic(&self, target: &str, bytes: &[u8]) -> Result<()> {
        let mut nonce = [0u8; 8];
        getrandom::fill(&mut nonce).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
        let tmp_name = format!("{TMP}/{}", hex::encode(nonce));
        let result = (|| -> Result<()> {
            let mut file = self.dir.create(&tmp_name)?;
            file.write_all(bytes)?;
            file.sync_all()?;
            drop(file);
            self.dir.rename(&tmp_name, &self.dir, target)?;
            let parent = Path::new(target)
                .parent()
                .and_then(Path::to_str)
                .unwrap_or(".");
            self.sync_dir(parent)
        })();
        if result.is_err() {
            let _ = self.dir.remove_file(&tmp_name);
        }
        result
    }

    /// Makes a rename in `sub` durable.
    fn sync_dir(&self, sub: &str) -> Result<()> {
        // Opened read-only as a file: `open_dir` gives an O_PATH handle,
        // which cannot be fsynced.
        self.dir
            .open(sub)
            .and_then(|dir| dir.sync_all())
            .with_context(|| format!("syncing {sub}"))
    }
}

fn check_hash(sha256: &str) -> Result<()> {
    if sha256.len() == 64
        && sha256
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        Ok(())
    } else {
        bail!("{sha256:?} is not a SHA-256 in lower-case hex")
    }
}

fn module_file(sha256: &str) -> String {
    format!("{MODULES}/{sha256}.wasm")
}

fn compiled_file(engine_key: &str, sha256: &str) -> String {
    format!("{COMPILED}/{engine_key}/{sha256}.cwasm")
}

fn record_file(name: &FunctionName) -> String {
    format!("{FUNCTIONS}/{name}.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> FunctionName {
        FunctionName::new(s).unwrap()
    }

    fn deploy(record: &mut FunctionRecord, store: &ModuleStore, i: u64) {
        let sha = sha256_hex(&[i as u8]);
        store.write_module(&sha, &[i as u8]).unwrap();
        let version = Version {
            id: i,
            sha256: sha,
            size: 1,
            stamp: i,
            origin: "a".into(),
            parent: None,
        };
        record.serving = Some(record.info(&version));
        record.entry.deploy(version);
    }

    #[test]
    fn records_round_trip_and_keep_a_bounded_history() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModuleStore::open(dir.path()).unwrap();
        let mut record = FunctionRecord::new(name("hello"));
        for i in 1..=(KEEP_VERSIONS as u64 + 3) {
            deploy(&mut record, &store, i);
        }
        store.write_record(&record).unwrap();
        assert_eq!(record.entry.versions.len(), KEEP_VERSIONS);
        let reopened = ModuleStore::open(dir.path()).unwrap();
        assert_eq!(reopened.load_records().unwrap(), vec![record.clone()]);

        // Modules of forgotten versions go; the ones still listed stay.
        reopened.collect_garbage().unwrap();
        assert!(!reopened.has_module(&sha256_hex(&[1])));
        let active = record.entry.active().unwrap();
        assert_eq!(reopened.read_module(&active.sha256).unwrap().len(), 1);
    }

    #[test]
    fn records_and_deletes_of_earlier_hosts_are_migrated() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("functions")).unwrap();
        std::fs::create_dir_all(dir.path().join("deleted")).unwrap();
        let sha = |b: u8| sha256_hex(&[b]);
        std::fs::write(
            dir.path().join("functions/hello.json"),
            serde_json::json!({
                "name": "hello", "active": 2,
                "versions": [
                    {"version": 1, "sha256": sha(1), "size": 1, "created_unix": 10},
                    {"version": 2, "sha256": sha(2), "size": 1, "created_unix": 20,
                     "timestamp_ms": 20_500, "abi": "p3"},
                ],
            })
            .to_string(),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("deleted/gone.json"),
            r#"{"name":"gone","sha256":null,"version":3,"policy":null,"timestamp_ms":99,"origin":"b"}"#,
        )
        .unwrap();
        let store = ModuleStore::open(dir.path()).unwrap();
        let records = store.load_records().unwrap();
        assert_eq!(records.len(), 2);
        let gone = &records[0];
        assert!(gone.entry.is_deleted() && gone.serving.is_none());
        assert_eq!(stamp_ms(gone.entry.cleared), 99);
        let hello = &records[1];
        let serving = hello.serving.as_ref().unwrap();
        assert_eq!((serving.version, serving.abi), (2, Abi::P3));
        assert_eq!(hello.entry.active().map(|v| v.id), Some(2));
        assert_eq!(stamp_ms(hello.entry.active().unwrap().stamp), 20_500);
        assert_eq!(hello.entry.superseded_by(1), Some(2));
        // Written back in the new form.
        let text = std::fs::read_to_string(dir.path().join("functions/hello.json")).unwrap();
        assert!(text.contains("\"entry\""), "{text}");
        assert!(!dir.path().join("deleted").exists());
    }

    #[test]
    fn a_damaged_record_is_skipped_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModuleStore::open(dir.path()).unwrap();
        std::fs::write(dir.path().join("functions/broken.json"), b"{not json").unwrap();
        std::fs::write(dir.path().join("functions/Bad_Name.json"), b"{}").unwrap();
        assert!(store.load_records().unwrap().is_empty());
    }

    #[test]
    fn a_module_damaged_on_disk_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModuleStore::open(dir.path()).unwrap();
        let sha = sha256_hex(b"original");
        store.write_module(&sha, b"original").unwrap();
        std::fs::write(dir.path().join(format!("modules/{sha}.wasm")), b"tampered").unwrap();
        assert!(store.read_module(&sha).is_err());
        assert!(store.read_module("../../etc/passwd").is_err());
    }
}
