//! The audit log: one JSON line per admin change (deploy, rollback,
//! delete, policy, key-value purge, secret, token), refused ones included
//! (a scoped token's refusal for its scope, expiry or revocation too),
//! with who made it (the token's name, `admin` for the admin token), from
//! where, what it answered and, where there is one, the version and module
//! it made; and one line per change a peer made that this host applied.
//!
//! `DATA_DIR/audit.log`, appended and fsynced before the change's answer
//! goes out, so a change a client was told of is in the log even if the
//! host is killed at once. Past [`MAX_FILE_BYTES`] the file is rotated to
//! `audit.log.1` (and `.1` to `.2`, and so on, [`KEEP_FILES`] in all).
//!
//! Tamper-evident: each line carries `prev`, the SHA-256 of the line
//! before it (across rotations), so a line changed, removed or inserted
//! breaks the chain at that point; [`verify`] (`lichen audit verify`)
//! walks it. (Whoever can write the data directory can rewrite the whole
//! chain: ship the log off the host to make that evident too.) Reading
//! never waits for an append's fsync: it holds only the rotation lock.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use sha2::{Digest, Sha256};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// The log's file in the data directory.
pub const FILE: &str = "audit.log";
/// A file this large is rotated before the next line.
pub const MAX_FILE_BYTES: u64 = 8 << 20;
/// Files kept: the current one and the rotated ones.
pub const KEEP_FILES: usize = 4;
/// The most entries one read answers (the latest).
pub const MAX_READ: usize = 1000;

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// When, RFC 3339 (UTC).
    pub time: String,
    pub unix_ms: u64,
    /// The token's name: `admin` for the admin token; for a change a peer
    /// made, the name its host recorded.
    pub token: String,
    /// The client's address; none for a change applied from a peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// The method and route (`PUT /v1/functions/{name}`), or what a peer's
    /// change was (`deploy`, `rollback`, `delete`, `policy`, `secret`,
    /// `token`).
    pub route: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<String>,
    /// The secret's or token's name, for a change of one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The answer's status; for a change from a peer, 200.
    pub result: u16,
    /// The error code of a refused change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// The node a change was made on, when this host applied it from a
    /// peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_from_peer: Option<String>,
    /// The SHA-256 (hex) of the line before this one: the chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev: Option<String>,
}

impl Entry {
    /// An entry stamped now.
    pub fn now(token: &str, route: &str) -> Entry {
        let now = jiff::Timestamp::now();
        Entry {
            time: now.to_string(),
            unix_ms: u64::try_from(now.as_millisecond()).unwrap_or(0),
            token: token.to_string(),
            client: None,
            route: route.to_string(),
            function: None,
            name: None,
            result: 200,
            code: None,
            version: None,
            sha256: None,
            applied_from_peer: None,
            prev: None,
        }
    }
}

pub struct Audit {
    dir: PathBuf,
    /// The file appended to, and the hash of its last line.
    file: Mutex<(File, String)>,
    /// Taken to write while files are renamed, to read while they are read.
    rotation: RwLock<()>,
    max_file_bytes: u64,
}

/// The `prev` of the first line of a new log.
const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fn line_hash(line: &[u8]) -> String {
    hex::encode(Sha256::digest(line))
}

impl Audit {
    /// Opens (creating) the log in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self> {
        Audit::open_with(data_dir, MAX_FILE_BYTES)
    }

    /// [`Audit::open`], rotating past `max_file_bytes`. A line a crash cut
    /// short (never acknowledged) is ended, so the next one reads.
    fn open_with(data_dir: &Path, max_file_bytes: u64) -> Result<Self> {
        let dir = data_dir.to_path_buf();
        let path = dir.join(FILE);
        let mut file = open_append(&path)?;
        let torn = last_byte(&path).is_some_and(|b| b != b'\n');
        if torn {
            file.write_all(b"\n")
                .and_then(|()| file.sync_data())
                .context("ending a torn line of the audit log")?;
        }
        let audit = Audit {
            dir,
            file: Mutex::new((file, GENESIS.to_string())),
            rotation: RwLock::new(()),
            max_file_bytes,
        };
        let last = audit.last_line_hash()?;
        audit.file.lock().unwrap_or_else(|e| e.into_inner()).1 = last;
        Ok(audit)
    }

    /// The hash of the newest whole line of the log (the newest file that
    /// has one), or [`GENESIS`].
    fn last_line_hash(&self) -> Result<String> {
        for index in 0..KEEP_FILES {
            let path = self.path(index);
            let text = match std::fs::read(&path) {
                Ok(text) => text,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(error) => {
                    return Err(error).with_context(|| format!("reading {}", path.display()));
                }
            };
            let last = text
                .split(|b| *b == b'\n')
                .rfind(|line| serde_json::from_slice::<Entry>(line).is_ok());
            if let Some(line) = last {
                return Ok(line_hash(line));
            }
        }
        Ok(GENESIS.to_string())
    }

    /// Appends `entry` and waits for it to be on disk.
    pub fn append(&self, entry: &Entry) -> Result<()> {
        let mut guard = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let (file, last) = &mut *guard;
        let mut entry = entry.clone();
        entry.prev = Some(last.clone());
        let mut line = serde_json::to_vec(&entry).context("serialising an audit entry")?;
        let hash = line_hash(&line);
        line.push(b'\n');
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        if size > 0 && size + line.len() as u64 > self.max_file_bytes {
            let _renaming = self.rotation.write().unwrap_or_else(|e| e.into_inner());
            *file = self.rotate()?;
        }
        let before = file.metadata().map(|m| m.len()).unwrap_or(size);
        if let Err(error) = file.write_all(&line).and_then(|()| file.sync_data()) {
            // Whatever part of the line got in is cut back off, so the
            // next line follows the last whole one and the chain holds.
            let _ = file.set_len(before).and_then(|()| file.sync_data());
            return Err(error).context("appending to the audit log");
        }
        *last = hash;
        Ok(())
    }

    /// [`Audit::append`] off the async threads; a failure is logged (the
    /// change it records has been made and stays made).
    pub async fn record(self: &Arc<Self>, entry: Entry) {
        let audit = Arc::clone(self);
        let route = entry.route.clone();
        let appended = tokio::task::spawn_blocking(move || audit.append(&entry)).await;
        let error = match appended {
            Ok(Ok(())) => return,
            Ok(Err(error)) => format!("{error:#}"),
            Err(error) => error.to_string(),
        };
        tracing::error!(
            route,
            error,
            "a change could not be written to the audit log"
        );
    }

    /// The entries since `since_unix_ms`, of `function` if given, oldest
    /// first: the latest [`MAX_READ`].
    pub fn read(&self, since_unix_ms: u64, function: Option<&str>) -> Result<Vec<Entry>> {
        // Held so a rotation does not move a file from under the read; an
        // append (and its fsync) does not wait for it, nor it for one.
        let _reading = self.rotation.read().unwrap_or_else(|e| e.into_inner());
        let mut entries = std::collections::VecDeque::new();
        for index in (0..KEEP_FILES).rev() {
            let path = self.path(index);
            let file = match File::open(&path) {
                Ok(file) => file,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(error) => {
                    return Err(error).with_context(|| format!("reading {}", path.display()));
                }
            };
            for line in BufReader::new(file).lines() {
                let line = line.with_context(|| format!("reading {}", path.display()))?;
                // A line cut short by a crash (never acknowledged) is skipped.
                let Ok(entry) = serde_json::from_str::<Entry>(&line) else {
                    continue;
                };
                if entry.unix_ms < since_unix_ms
                    || function.is_some_and(|f| entry.function.as_deref() != Some(f))
                {
                    continue;
                }
                if entries.len() == MAX_READ {
                    entries.pop_front();
                }
                entries.push_back(entry);
            }
        }
        Ok(entries.into())
    }

    /// `audit.log` (0) or a rotated file (1 and up).
    fn path(&self, index: usize) -> PathBuf {
        match index {
            0 => self.dir.join(FILE),
            n => self.dir.join(format!("{FILE}.{n}")),
        }
    }

    /// Shifts the files one up (dropping the oldest) and opens a new one.
    fn rotate(&self) -> Result<File> {
        for index in (0..KEEP_FILES - 1).rev() {
            let from = self.path(index);
            if from.exists() {
                std::fs::rename(&from, self.path(index + 1))
                    .with_context(|| format!("rotating {}", from.display()))?;
            }
        }
        let file = open_append(&self.path(0))?;
        File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .context("syncing the data directory after rotating the audit log")?;
        Ok(file)
    }
}

/// What [`verify`] found: the lines it checked, in how many files, the
/// lines from before the chain (written by an older host), and the hash of
/// the newest line: kept elsewhere, it shows lines cut off the end too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub lines: usize,
    pub files: usize,
    pub unchained: usize,
    pub head: Option<String>,
}

/// Walks the chain of the log in `data_dir`, oldest file first: every
/// line's `prev` must be the hash of the whole line before it (the first
/// line kept is taken as it is: what it follows was rotated away). A line
/// a crash cut short is skipped. The error names the file and line where
/// the chain breaks.
pub fn verify(data_dir: &Path) -> Result<Verified> {
    let mut last: Option<String> = None;
    let mut verified = Verified {
        lines: 0,
        files: 0,
        unchained: 0,
        head: None,
    };
    for index in (0..KEEP_FILES).rev() {
        let path = match index {
            0 => data_dir.join(FILE),
            n => data_dir.join(format!("{FILE}.{n}")),
        };
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => return Err(error).with_context(|| format!("reading {}", path.display())),
        };
        verified.files += 1;
        for (number, line) in text.split(|b| *b == b'\n').enumerate() {
            let Ok(entry) = serde_json::from_slice::<Entry>(line) else {
                continue;
            };
            let Some(prev) = &entry.prev else {
                // Lines from before the chain, only before its first line.
                if last.is_none() {
                    verified.unchained += 1;
                    continue;
                }
                anyhow::bail!(
                    "{}:{}: the line carries no chain (`prev`)",
                    path.display(),
                    number + 1
                );
            };
            if let Some(expected) = &last
                && prev != expected
            {
                anyhow::bail!(
                    "{}:{}: the chain breaks here: the line before it was changed, removed or inserted",
                    path.display(),
                    number + 1
                );
            }
            last = Some(line_hash(line));
            verified.lines += 1;
        }
    }
    verified.head = last;
    Ok(verified)
}

/// The file's last byte, if it has one.
fn last_byte(path: &Path) -> Option<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = File::open(path).ok()?;
    file.seek(SeekFrom::End(-1)).ok()?;
    let mut byte = [0u8; 1];
    file.read_exact(&mut byte).ok()?;
    Some(byte[0])
}

fn open_append(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_read_back_in_order_filtered_and_across_rotations() {
        let dir = tempfile::tempdir().unwrap();
        let max = 1 << 20;
        let audit = Audit::open_with(dir.path(), max).unwrap();
        let mut entry = Entry::now("admin", "PUT /v1/functions/{name}");
        // Lines of about 1 KiB: three rotations' worth, and some.
        entry.sha256 = Some("ab".repeat(512));
        let lines = (3 * max / 1100) as usize + 100;
        for i in 0..lines {
            entry.function = Some(if i % 2 == 0 { "shop" } else { "blog" }.to_string());
            entry.version = Some(i as u64);
            audit.append(&entry).unwrap();
        }
        assert!(dir.path().join("audit.log.3").exists());
        let shop = audit.read(0, Some("shop")).unwrap();
        assert_eq!(shop.len(), MAX_READ);
        let versions: Vec<u64> = shop.iter().filter_map(|e| e.version).collect();
        assert!(versions.windows(2).all(|w| w[0] + 2 == w[1]), "in order");
        assert_eq!(
            *versions.last().unwrap(),
            (lines - 1 - (lines - 1) % 2) as u64
        );
        // A torn last line is skipped, and the next line after a restart
        // reads.
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join(FILE))
            .unwrap()
            .write_all(b"{\"time\":")
            .unwrap();
        assert_eq!(audit.read(0, Some("shop")).unwrap().len(), MAX_READ);
        drop(audit);
        let audit = Audit::open_with(dir.path(), max).unwrap();
        entry.version = Some(1 << 40);
        audit.append(&entry).unwrap();
        let last = audit.read(0, None).unwrap().pop().unwrap();
        assert_eq!(last.version, Some(1 << 40));
        let later = audit.read(u64::MAX, None).unwrap();
        assert!(later.is_empty());
    }

    #[test]
    fn the_chain_holds_across_rotations_and_breaks_where_a_line_was_touched() {
        let dir = tempfile::tempdir().unwrap();
        let max = 64 << 10;
        let audit = Audit::open_with(dir.path(), max).unwrap();
        let mut entry = Entry::now("admin", "PUT /v1/functions/{name}");
        entry.sha256 = Some("cd".repeat(256));
        for i in 0..200u64 {
            entry.version = Some(i);
            audit.append(&entry).unwrap();
        }
        drop(audit);
        // Reopened, it goes on from the last line.
        let audit = Audit::open_with(dir.path(), max).unwrap();
        entry.version = Some(200);
        audit.append(&entry).unwrap();
        assert!(dir.path().join("audit.log.1").exists());
        let whole = verify(dir.path()).unwrap();
        assert!(whole.files >= 2 && whole.lines > 100, "{whole:?}");
        let path = dir.path().join(FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines.len() > 4);
        for tampered in [
            // A field changed.
            text.replacen("\"result\":200", "\"result\":403", 2),
            // A line removed.
            lines
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != 2)
                .map(|(_, l)| format!("{l}\n"))
                .collect(),
            // A line inserted (an old one, copied).
            format!("{}\n{text}", lines[1]),
        ] {
            std::fs::write(&path, &tampered).unwrap();
            assert!(verify(dir.path()).is_err(), "{}", &tampered[..200]);
        }
        // A torn last line (a crash) is not tampering.
        std::fs::write(&path, format!("{text}{{\"time\":")).unwrap();
        assert!(verify(dir.path()).is_ok());
    }
}
