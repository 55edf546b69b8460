//! The policies in force, kept in step with the policies directory.
//!
//! Files are the single source of truth: the table is loaded from them at
//! start, a `notify` watcher reloads a file when it is created, changed or
//! removed, and the admin API writes files (atomically) rather than the
//! table. A file that fails to parse or validate is logged, its error kept
//! for the admin API, and the last good policy stays in force. A function
//! whose file has never been good is not run at all (never fail open); a
//! function without a file runs under the defaults.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use notify::{RecursiveMode, Watcher};

use super::{ConfigValue, Policy, PolicyError};
use crate::names::FunctionName;

/// Events arriving this close together are handled as one reload: editors
/// write a file in several steps.
const DEBOUNCE: Duration = Duration::from_millis(50);

/// What the table knows about one function's policy file.
#[derive(Debug, Clone, Default)]
pub struct PolicyStatus {
    /// The policy in force; `None` if the file has never been valid.
    pub policy: Option<Arc<Policy>>,
    /// The error of the latest load, if it failed.
    pub error: Option<PolicyError>,
    /// When the policy in force was loaded (Unix seconds).
    pub loaded_unix: u64,
}

pub struct PolicyTable {
    /// Which function a request's host reaches, from the policies in force.
    routes: RwLock<Arc<Routes>>,
    /// Whether `routes` has any: what every request looks at first.
    has_routes: AtomicBool,
    dir: PathBuf,
    /// What relative `[files]` paths are relative to: the directory's parent.
    base: PathBuf,
    entries: RwLock<HashMap<FunctionName, PolicyStatus>>,
    default: Arc<Policy>,
    on_error: Box<dyn Fn() + Send + Sync>,
    /// Whether a secret of this name is set: a policy naming one that is
    /// not is invalid.
    secret_is_set: SecretCheck,
    /// Told of each file edited on disk (its text not the one in force),
    /// once the host is up: the audit log's line.
    edited: std::sync::OnceLock<OnEdit>,
    /// The text of each file as this host last read or wrote it: a file
    /// whose text differs was edited by someone else.
    last_text: std::sync::Mutex<HashMap<FunctionName, String>>,
}

/// Told of a policy file edited on disk.
pub type OnEdit = Box<dyn Fn(&FunctionName) + Send + Sync>;

/// Answers whether a secret is set.
pub type SecretCheck = Box<dyn Fn(&str) -> bool + Send + Sync>;

impl PolicyTable {
    /// Loads every `*.toml` in `dir` (creating `dir` if needed).
    pub fn load(
        dir: &Path,
        on_error: Box<dyn Fn() + Send + Sync>,
        secret_is_set: SecretCheck,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the policies directory {}", dir.display()))?;
        let dir = dir
            .canonicalize()
            .with_context(|| format!("resolving {}", dir.display()))?;
        let base = dir.parent().unwrap_or(&dir).to_path_buf();
        let table = PolicyTable {
            routes: RwLock::new(Arc::new(Routes::default())),
            has_routes: AtomicBool::new(false),
            dir,
            base,
            entries: RwLock::new(HashMap::new()),
            default: Arc::new(Policy::default()),
            on_error,
            secret_is_set,
            edited: std::sync::OnceLock::new(),
            last_text: std::sync::Mutex::new(HashMap::new()),
        };
        let entries = std::fs::read_dir(&table.dir)
            .with_context(|| format!("reading {}", table.dir.display()))?;
        for entry in entries.flatten() {
            table.reload(&entry.path());
        }
        Ok(table)
    }

    /// From now on, `edited` is told of each policy file edited on disk.
    pub fn on_edit(&self, edited: OnEdit) {
        let _ = self.edited.set(edited);
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The policy to run `name` under, or why it must not run.
    pub fn get(&self, name: &FunctionName) -> Result<Arc<Policy>, PolicyError> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        match entries.get(name) {
            None => Ok(Arc::clone(&self.default)),
            Some(PolicyStatus {
                policy: Some(policy),
                ..
            }) => Ok(Arc::clone(policy)),
            Some(PolicyStatus { error, .. }) => Err(error.clone().unwrap_or_else(|| PolicyError {
                file: format!("{name}.toml"),
                message: "no valid policy loaded".to_string(),
            })),
        }
    }

    /// The policy in force and the last load error, for the admin API.
    /// The text of `name`'s policy file as loaded, if it has a file that
    /// loaded (not the defaults).
    pub fn file_text(&self, name: &FunctionName) -> Option<String> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        entries.get(name)?.policy.as_ref().map(|p| p.text.clone())
    }

    pub fn status(&self, name: &FunctionName) -> PolicyStatus {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        entries.get(name).cloned().unwrap_or_else(|| PolicyStatus {
            policy: Some(Arc::clone(&self.default)),
            error: None,
            loaded_unix: 0,
        })
    }

    /// Re-reads one file of the directory (or notes that it is gone).
    /// Files that are not `<function-name>.toml` are ignored.
    pub fn reload(&self, path: &Path) {
        let Some(name) = function_of(path) else {
            return;
        };
        let file = format!("{name}.toml");
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let removed = {
                    let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
                    let removed = entries.remove(&name);
                    self.set_routes(&entries);
                    removed
                };
                if removed.is_some() {
                    tracing::info!(function = %name, "policy file removed; defaults apply");
                }
                let known = self.note_text(&name, None);
                if known && let Some(edited) = self.edited.get() {
                    edited(&name);
                }
                return;
            }
            Err(error) => {
                self.record_error(
                    &name,
                    PolicyError {
                        file,
                        message: format!("cannot read: {error}"),
                    },
                );
                return;
            }
        };
        // Plain function tokens (a file from before hashes, or written by
        // hand) are replaced by their hashes in the file itself, so no
        // reader, peer or backup sees them again.
        let text = match lichen_core::policy::hash_access_tokens(&text) {
            Some(hashed) => match self.write_file(&file, &hashed) {
                Ok(()) => {
                    tracing::info!(function = %name, "policy file's [access] tokens replaced by their hashes");
                    hashed
                }
                Err(error) => {
                    // In force hashed all the same (the file is read-only,
                    // say): the plain text is never what this host shows
                    // or publishes.
                    tracing::warn!(function = %name, error = format!("{error:#}"), "cannot replace the policy file's [access] tokens by their hashes");
                    hashed
                }
            },
            None => text,
        };
        let changed = self.note_text(&name, Some(&text));
        if changed && let Some(edited) = self.edited.get() {
            edited(&name);
        }
        match self.parse(&name, &text, &file) {
            Ok(policy) => self.install(&name, policy),
            Err(error) => self.record_error(&name, error),
        }
    }

    /// Parses the policy of `name` and checks what only the host knows:
    /// that every secret its `[config]` names is set, and that no other
    /// function's policy in force claims a name (and path prefix) of its
    /// `[http]`.
    fn parse(&self, name: &FunctionName, text: &str, file: &str) -> Result<Policy, PolicyError> {
        let policy = Policy::parse(text, file, &self.base)?;
        if let Some((host, holder)) = self.routes().claimed(&policy.http, name) {
            return Err(PolicyError {
                file: file.to_string(),
                message: format!(
                    "http.hosts: {host:?} (path prefix {:?}) is the function {holder}'s; change that policy first",
                    if policy.http.prefix().is_empty() {
                        "/"
                    } else {
                        policy.http.prefix()
                    }
                ),
            });
        }
        for (key, value) in &policy.config {
            if let ConfigValue::Secret { secret } = value
                && !(self.secret_is_set)(&secret.0)
            {
                return Err(PolicyError {
                    file: file.to_string(),
                    message: format!(
                        "config.{key} names the secret {:?}, which is not set \
                         (set it with `lichen secret set {}` or PUT /v1/secrets/{})",
                        secret.0, secret.0, secret.0
                    ),
                });
            }
        }
        Ok(policy)
    }

    /// The functions whose policy in force names the secret `name`.
    pub fn users_of_secret(&self, name: &str) -> Vec<FunctionName> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let mut users: Vec<FunctionName> = entries
            .iter()
            .filter(|(_, status)| status.policy.as_ref().is_some_and(|p| p.names_secret(name)))
            .map(|(function, _)| function.clone())
            .collect();
        users.sort();
        users
    }

    /// Loads again every file whose last load failed: after a secret is set,
    /// a policy that named it before it existed can come into force.
    pub fn reload_failed(&self) {
        let failed: Vec<FunctionName> = {
            let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
            entries
                .iter()
                .filter(|(_, status)| status.error.is_some())
                .map(|(name, _)| name.clone())
                .collect()
        };
        for name in failed {
            self.reload(&self.dir.join(format!("{name}.toml")));
        }
    }

    /// Validates `text` as the policy of `name`, writes it to the directory
    /// atomically and puts it in force. Nothing is written if it is invalid.
    pub fn write(&self, name: &FunctionName, text: &str) -> Result<Arc<Policy>, WriteError> {
        let file = format!("{name}.toml");
        // Function tokens are written as their hashes, whoever hands the
        // text over (the API hashed already; a peer's older text may not).
        let hashed = lichen_core::policy::hash_access_tokens(text);
        let text = hashed.as_deref().unwrap_or(text);
        let policy = self.parse(name, text, &file).map_err(WriteError::Invalid)?;
        // Noted before the file changes, so the watcher's reload of it is
        // known as this host's own write.
        self.note_text(name, Some(text));
        self.write_file(&file, text).map_err(WriteError::Io)?;
        self.install(name, policy);
        self.get(name).map_err(WriteError::Invalid)
    }

    /// Notes `text` (`None`: no file) as what `name`'s file now says;
    /// whether that differs from what this host last read or wrote (for a
    /// removal: whether there was a file).
    fn note_text(&self, name: &FunctionName, text: Option<&str>) -> bool {
        let mut last = self.last_text.lock().unwrap_or_else(|e| e.into_inner());
        match text {
            Some(text) => last.insert(name.clone(), text.to_string()).as_deref() != Some(text),
            None => last.remove(name).is_some(),
        }
    }

    /// Writes `file` of the directory atomically and durably.
    fn write_file(&self, file: &str, text: &str) -> Result<()> {
        let target = self.dir.join(file);
        let tmp = self.dir.join(format!(".{file}.tmp"));
        let written = (|| -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &target)?;
            std::fs::File::open(&self.dir)?.sync_all()
        })();
        if let Err(error) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(anyhow::Error::from(error).context(format!("writing {}", target.display())));
        }
        Ok(())
    }

    fn install(&self, name: &FunctionName, policy: Policy) {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        let unchanged = entries
            .get(name)
            .and_then(|s| s.policy.as_deref())
            .is_some_and(|p| *p == policy);
        let status = entries.entry(name.clone()).or_default();
        status.error = None;
        if !unchanged {
            status.policy = Some(Arc::new(policy));
            status.loaded_unix = now_unix();
            tracing::info!(function = %name, "policy loaded");
            self.set_routes(&entries);
        }
    }

    /// Whether any policy in force claims a name in `[http]`: read on
    /// every request, without the lock.
    pub fn has_routes(&self) -> bool {
        self.has_routes.load(Ordering::Relaxed)
    }

    /// The routes of the policies in force.
    pub fn routes(&self) -> Arc<Routes> {
        Arc::clone(&self.routes.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Rebuilds the routes from `entries` (the table, locked by the caller).
    fn set_routes(&self, entries: &HashMap<FunctionName, PolicyStatus>) {
        let routes = Routes::build(entries);
        let any = !routes.is_empty();
        *self.routes.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(routes);
        self.has_routes.store(any, Ordering::Relaxed);
    }

    fn record_error(&self, name: &FunctionName, error: PolicyError) {
        tracing::error!(
            function = %name,
            error = %error,
            "policy file rejected; the last good policy stays in force"
        );
        (self.on_error)();
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        entries.entry(name.clone()).or_default().error = Some(error);
    }

    /// Watches the directory and reloads changed files until the returned
    /// watcher is dropped.
    pub fn watch(self: &Arc<Self>) -> Result<notify::RecommendedWatcher> {
        let (tx, rx) = mpsc::channel::<PathBuf>();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
                Ok(event) if settles_a_file(&event.kind) => {
                    for path in event.paths {
                        let _ = tx.send(path);
                    }
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "policy watcher error"),
            })
            .context("starting the policy watcher")?;
        watcher
            .watch(&self.dir, RecursiveMode::NonRecursive)
            .with_context(|| format!("watching {}", self.dir.display()))?;
        let table = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("lichen-policies".into())
            .spawn(move || {
                // Ends when the watcher (the sender's owner) is dropped.
                while let Ok(first) = rx.recv() {
                    let mut paths = vec![first];
                    while let Ok(more) = rx.recv_timeout(DEBOUNCE) {
                        paths.push(more);
                    }
                    paths.sort();
                    paths.dedup();
                    let Some(table) = table.upgrade() else { return };
                    for path in paths {
                        table.reload(&path);
                    }
                }
            })
            .context("starting the policy reload thread")?;
        Ok(watcher)
    }
}

/// Why the admin API could not write a policy.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Invalid(PolicyError),
    #[error(transparent)]
    Io(anyhow::Error),
}

/// `dir/hello.toml` -> `hello`; anything else (editor backups, temp files,
/// names that are not function names) -> `None`.
fn function_of(path: &Path) -> Option<FunctionName> {
    let stem = path.file_name()?.to_str()?.strip_suffix(".toml")?;
    FunctionName::new(stem).ok()
}

/// Whether an event may leave a file in a state worth reading. A write in
/// place is read when the writer closes the file, not at each write: right
/// after the truncation that starts it, the file is empty, and an empty
/// policy is a valid one, the defaults (a private function must not turn
/// public for that moment). Renames, creations and removals are read at once.
fn settles_a_file(kind: &notify::EventKind) -> bool {
    use notify::EventKind;
    use notify::event::{AccessKind, AccessMode, ModifyKind};
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Metadata(_)) => false,
        EventKind::Modify(_) | EventKind::Create(_) | EventKind::Remove(_) => true,
        EventKind::Any | EventKind::Other => true,
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Which function a request reaches by its `Host` and path: every
/// function's `[http]` in force.
#[derive(Debug, Default)]
pub struct Routes {
    /// By exact name, then by the name under a wildcard's `*.`: the path
    /// prefixes claimed there (`""`: every path), longest first.
    exact: HashMap<String, Vec<(String, FunctionName)>>,
    wildcard: HashMap<String, Vec<(String, FunctionName)>>,
}

impl Routes {
    fn build(entries: &HashMap<FunctionName, PolicyStatus>) -> Routes {
        let mut routes = Routes::default();
        for (name, status) in entries {
            let Some(policy) = &status.policy else {
                continue;
            };
            let prefix = policy.http.prefix().to_string();
            for host in &policy.http.hosts {
                let table = match host.wildcard_of() {
                    Some(under) => routes.wildcard.entry(under.to_string()).or_default(),
                    None => routes.exact.entry(host.0.clone()).or_default(),
                };
                table.push((prefix.clone(), name.clone()));
            }
        }
        for claims in routes
            .exact
            .values_mut()
            .chain(routes.wildcard.values_mut())
        {
            claims.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.1.cmp(&b.1)));
        }
        routes
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcard.is_empty()
    }

    /// Every claim: the name as written, the path prefix (`""`: every
    /// path) and the function, by name.
    pub fn list(&self) -> Vec<(String, String, FunctionName)> {
        let exact = self
            .exact
            .iter()
            .map(|(host, claims)| (host.clone(), claims));
        let wildcard = self
            .wildcard
            .iter()
            .map(|(under, claims)| (format!("*.{under}"), claims));
        let mut list: Vec<(String, String, FunctionName)> = exact
            .chain(wildcard)
            .flat_map(|(host, claims)| {
                claims
                    .iter()
                    .map(move |(prefix, name)| (host.clone(), prefix.clone(), name.clone()))
            })
            .collect();
        list.sort();
        list
    }

    /// The function `host` (a `Host` header: any case, maybe a port) and
    /// `path` reach, if one claims them: an exact name before a wildcard,
    /// the longest path prefix first.
    pub fn find(&self, host: &str, path: &str) -> Option<&FunctionName> {
        let host = host.rsplit_once(':').map_or(host, |(name, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                name
            } else {
                host
            }
        });
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let under = host.split_once('.').map(|(_, rest)| rest);
        self.exact
            .get(&host)
            .and_then(|claims| by_prefix(claims, path))
            .or_else(|| by_prefix(self.wildcard.get(under?)?, path))
    }

    /// A name (with the same path prefix) of `http` another function than
    /// `name` claims, and that function.
    fn claimed(
        &self,
        http: &lichen_core::policy::Http,
        name: &FunctionName,
    ) -> Option<(String, FunctionName)> {
        for host in &http.hosts {
            let claims = match host.wildcard_of() {
                Some(under) => self.wildcard.get(under),
                None => self.exact.get(&host.0),
            };
            let holder = claims
                .into_iter()
                .flatten()
                .find(|(prefix, holder)| prefix == http.prefix() && holder != name);
            if let Some((_, holder)) = holder {
                return Some((host.0.clone(), holder.clone()));
            }
        }
        None
    }
}

/// The function of the longest prefix in `claims` that `path` is under.
fn by_prefix<'r>(claims: &'r [(String, FunctionName)], path: &str) -> Option<&'r FunctionName> {
    claims
        .iter()
        .find(|(prefix, _)| {
            prefix.is_empty()
                || path == prefix
                || path
                    .strip_prefix(prefix.as_str())
                    .is_some_and(|rest| rest.starts_with('/'))
        })
        .map(|(_, name)| name)
}
