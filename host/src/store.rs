//! Modules on disk: content-addressed by SHA-256, with per-name versions and
//! an active pointer, plus the cache of compiled code.
//!
//! Layout under the data directory:
//!
//! ```text
//! modules/<sha256>.wasm                 uploaded components, as uploaded
//! compiled/<engine-key>/<sha256>.cwasm  wasmtime's serialised code for them
//! functions/<name>.json                 versions of one function and which is active
//! tmp/                                  writes in progress
//! ```
//!
//! Every write goes to `tmp/`, is fsynced, then renamed over its target, and
//! the directory is fsynced: a crash or a full disk leaves either the old file
//! or the new one, never a torn one. A deploy writes the module first and the
//! function record last, so the record never points at a module that is not
//! on disk, and a failed deploy leaves the previous version active.
//!
//! The data directory is opened once as a cap-std `Dir`; every file is reached
//! through it, so no name or hash can address a path outside it (names and
//! hashes are validated too; this is the second wall).
//!
//! Compiled code is keyed by the engine's compatibility hash: another wasmtime
//! or other engine settings look in another directory and recompile. Only the
//! host writes this cache; compiled code from anywhere else is never loaded,
//! since deserialising it amounts to running it.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use cap_std::ambient_authority;
use cap_std::fs::Dir;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::names::FunctionName;

const MODULES: &str = "modules";
const COMPILED: &str = "compiled";
const FUNCTIONS: &str = "functions";
/// Deletes this host took part in, as the cluster's registry entries
/// (tombstones), so a restart of every host cannot bring a function back.
const DELETED: &str = "deleted";
const TMP: &str = "tmp";

/// How many versions of a function are remembered; older ones are forgotten
/// and their modules collected when nothing else refers to them.
pub const KEEP_VERSIONS: usize = 10;

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

/// One uploaded version of a function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    pub version: u64,
    pub sha256: String,
    pub size: u64,
    pub created_unix: u64,
    /// When the cluster registry entry of this version was written
    /// (milliseconds since the epoch), if it came through one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp_ms: Option<u64>,
    #[serde(default)]
    pub abi: Abi,
    /// The registry reference it was pulled from, with the digests pulled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oci: Option<crate::oci::OciSource>,
}

/// Everything the store knows about one function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionRecord {
    pub name: FunctionName,
    pub active: u64,
    pub versions: Vec<VersionInfo>,
}

impl FunctionRecord {
    /// The record of a function with no version yet.
    pub fn new(name: FunctionName) -> Self {
        FunctionRecord {
            name,
            active: 0,
            versions: Vec::new(),
        }
    }

    pub fn active_version(&self) -> Option<&VersionInfo> {
        self.versions.iter().find(|v| v.version == self.active)
    }

    /// A new version for `sha256`, numbered after every version known.
    pub fn next_version(&self, sha256: &str, size: u64) -> VersionInfo {
        VersionInfo {
            version: self.versions.iter().map(|v| v.version).max().unwrap_or(0) + 1,
            sha256: sha256.to_string(),
            size,
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            timestamp_ms: None,
            // Set from the component when it is prepared.
            abi: Abi::P2,
            oci: None,
        }
    }

    /// Adds a version for `sha256` and makes it active. Returns it.
    pub fn push_version(&mut self, sha256: &str, size: u64) -> VersionInfo {
        let info = self.next_version(sha256, size);
        self.install(info.clone());
        info
    }

    /// Makes `info` the active version, replacing a version of the same
    /// number (a cluster's registry decides numbers across hosts), and
    /// forgets the oldest beyond what is kept.
    pub fn install(&mut self, info: VersionInfo) {
        self.versions.retain(|v| v.version != info.version);
        self.active = info.version;
        self.versions.push(info);
        self.versions.sort_by_key(|v| v.version);
        if self.versions.len() > KEEP_VERSIONS {
            let excess = self.versions.len() - KEEP_VERSIONS;
            self.versions.drain(..excess);
        }
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
        for sub in [MODULES, COMPILED, FUNCTIONS, DELETED, TMP] {
            dir.create_dir_all(sub)
                .with_context(|| format!("creating {}/{sub}", path.display()))?;
        }
        // Leftovers of writes interrupted by a crash: never renamed, never used.
        if let Ok(tmp) = dir.open_dir(TMP) {
            for entry in tmp.entries()?.flatten() {
                let _ = tmp.remove_file(entry.file_name());
            }
        }
        Ok(ModuleStore {
            dir,
            path: path.to_path_buf(),
        })
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
        let record: FunctionRecord =
            serde_json::from_slice(&bytes).with_context(|| format!("parsing {file}"))?;
        if record.name != name {
            bail!("{file} names another function, {}", record.name);
        }
        if record.active_version().is_none() {
            bail!("{file} has no version {}", record.active);
        }
        Ok(Some(record))
    }

    pub fn write_record(&self, record: &FunctionRecord) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(record)?;
        self.write_atomic(&record_file(&record.name), &bytes)
            .with_context(|| format!("writing the record of {}", record.name))
    }

    pub fn remove_record(&self, name: &FunctionName) -> Result<()> {
        self.dir
            .remove_file(record_file(name))
            .with_context(|| format!("removing the record of {name}"))?;
        self.sync_dir(FUNCTIONS)
    }

    /// Remembers that `name` was deleted: `entry` is the cluster's tombstone,
    /// opaque to the store.
    pub fn write_deletion(&self, name: &FunctionName, entry: &[u8]) -> Result<()> {
        self.write_atomic(&deletion_file(name), entry)
            .with_context(|| format!("writing the deletion of {name}"))
    }

    /// Forgets the deletion of `name` (it was deployed again), if any.
    pub fn remove_deletion(&self, name: &FunctionName) -> Result<()> {
        let file = deletion_file(name);
        if !self.dir.exists(&file) {
            return Ok(());
        }
        self.dir
            .remove_file(&file)
            .with_context(|| format!("removing {file}"))?;
        self.sync_dir(DELETED)
    }

    /// Every remembered deletion, as written. A file that cannot be read is
    /// logged and skipped.
    pub fn load_deletions(&self) -> Result<Vec<Vec<u8>>> {
        let mut deletions = Vec::new();
        for entry in self.dir.read_dir(DELETED)? {
            let file_name = entry?.file_name().to_string_lossy().into_owned();
            if !file_name.ends_with(".json") {
                continue;
            }
            let file = format!("{DELETED}/{file_name}");
            match self.dir.read(&file) {
                Ok(bytes) => deletions.push(bytes),
                Err(error) => tracing::error!(%file, %error, "skipping a remembered delete"),
            }
        }
        Ok(deletions)
    }

    /// Removes modules and compiled code that no record refers to any more.
    pub fn collect_garbage(&self) -> Result<()> {
        let referenced: HashSet<String> = self
            .load_records()?
            .into_iter()
            .flat_map(|r| r.versions.into_iter().map(|v| v.sha256))
            .collect();
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

fn deletion_file(name: &FunctionName) -> String {
    format!("{DELETED}/{name}.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> FunctionName {
        FunctionName::new(s).unwrap()
    }

    #[test]
    fn records_round_trip_and_keep_a_bounded_history() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModuleStore::open(dir.path()).unwrap();
        let mut record = FunctionRecord {
            name: name("hello"),
            active: 0,
            versions: Vec::new(),
        };
        for i in 0..(KEEP_VERSIONS + 3) {
            let sha = sha256_hex(&[i as u8]);
            store.write_module(&sha, &[i as u8]).unwrap();
            record.push_version(&sha, 1);
        }
        store.write_record(&record).unwrap();
        assert_eq!(record.versions.len(), KEEP_VERSIONS);
        assert_eq!(record.active, (KEEP_VERSIONS + 3) as u64);
        let reopened = ModuleStore::open(dir.path()).unwrap();
        assert_eq!(reopened.load_records().unwrap(), vec![record.clone()]);

        // Modules of forgotten versions go; the ones still listed stay.
        reopened.collect_garbage().unwrap();
        assert!(!reopened.has_module(&sha256_hex(&[0])));
        let active = record.active_version().unwrap();
        assert_eq!(reopened.read_module(&active.sha256).unwrap().len(), 1);
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
