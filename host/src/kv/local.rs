//! The embedded backend, the default: redb, one file (`kv.redb`) in the data
//! directory, opened through the data directory's cap-std `Dir`.
//!
//! redb is ACID with one fsync per commit, which is what a write costs. So
//! writes go through one writer thread that commits them in groups: it
//! takes every write queued while the previous commit was syncing, applies
//! them in one transaction, commits once, and only then acknowledges each
//! (group commit, as databases do with their log). A busy host pays one
//! fsync per group, not per write; an idle one answers a lone write after
//! its own commit. A write refused by a quota changes nothing and does not
//! spoil its group; a failed commit fails every write of its group, none of
//! which is then stored.
//!
//! Reads run on tokio's blocking pool in their own read transaction, which
//! sees every commit acknowledged before it began.
//!
//! Two tables: `entries` maps (function, label, key) to the value, and
//! `usage` maps (function, label) to (keys, bytes). Both change in the same
//! transaction, so the usage the quota is checked against is exact.

use std::fs::File;
use std::ops::Bound;
use std::sync::{Arc, RwLock};

use redb::{Database, ReadableDatabase, ReadableTable, Table, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use super::{Backend, KvError, Page, Quota, Scope, Usage, add_to_counter, entry_size};

const ENTRIES: TableDefinition<(&str, &str, &str), &[u8]> = TableDefinition::new("entries");
const USAGE: TableDefinition<(&str, &str), (u64, u64)> = TableDefinition::new("usage");

/// Writes waiting for the writer thread; beyond it, writers wait to queue.
const QUEUE: usize = 4096;
/// The most writes one transaction carries.
const MAX_GROUP: usize = 512;

pub struct LocalBackend {
    /// `None` once closed.
    db: RwLock<Option<Arc<Database>>>,
    writes: mpsc::Sender<Command>,
}

enum Command {
    Write(Write),
    /// Commit what came before, then let go of the database.
    Close(oneshot::Sender<()>),
}

struct Write {
    scope: Scope,
    key: String,
    op: WriteOp,
    reply: oneshot::Sender<Result<Applied, KvError>>,
}

enum WriteOp {
    Set(Vec<u8>, Quota),
    Delete,
    Increment(i64, Quota),
    CompareAndSwap(Option<Vec<u8>>, Vec<u8>, Quota),
    Purge,
}

enum Applied {
    Done,
    Counter(i64),
    Swapped(bool),
}

fn unavailable(error: impl std::fmt::Display) -> KvError {
    KvError::Unavailable(error.to_string())
}

impl LocalBackend {
    /// Opens (or creates) the database in `file`, which the caller opened
    /// read-write; a database another process has open is refused.
    pub fn open(file: File) -> anyhow::Result<Self> {
        let backend = redb::backends::FileBackend::new(file)?;
        let db = redb::Builder::new().create_with_backend(backend)?;
        let setup = db.begin_write()?;
        setup.open_table(ENTRIES)?;
        setup.open_table(USAGE)?;
        setup.commit()?;
        let db = Arc::new(db);
        let (writes, queue) = mpsc::channel(QUEUE);
        let writer_db = Arc::clone(&db);
        std::thread::Builder::new()
            .name("lichen-kv-writer".into())
            .spawn(move || run_writer(writer_db, queue))?;
        Ok(LocalBackend {
            db: RwLock::new(Some(db)),
            writes,
        })
    }

    /// Commits the writes queued so far and lets go of the file (its lock
    /// with it), so the data directory can be opened again in this
    /// process; later operations fail as unavailable.
    pub async fn close(&self) {
        self.db.write().unwrap_or_else(|e| e.into_inner()).take();
        let (done, closed) = oneshot::channel();
        if self.writes.send(Command::Close(done)).await.is_ok() {
            let _ = closed.await;
        }
    }

    async fn write(&self, scope: &Scope, key: &str, op: WriteOp) -> Result<Applied, KvError> {
        let (reply, answer) = oneshot::channel();
        let write = Write {
            scope: scope.clone(),
            key: key.to_string(),
            op,
            reply,
        };
        self.writes
            .send(Command::Write(write))
            .await
            .map_err(|_| unavailable("the store's writer has stopped"))?;
        answer
            .await
            .map_err(|_| unavailable("the store's writer has stopped"))?
    }

    /// Runs `read` in a read transaction on the blocking pool.
    async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(
            &redb::ReadOnlyTable<(&str, &str, &str), &[u8]>,
            &redb::ReadOnlyTable<(&str, &str), (u64, u64)>,
        ) -> Result<T, redb::Error>
        + Send
        + 'static,
    ) -> Result<T, KvError> {
        let db = self
            .db
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| unavailable("the store is closed"))?;
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read()?;
            let entries = txn.open_table(ENTRIES)?;
            let usage = txn.open_table(USAGE)?;
            read(&entries, &usage)
        })
        .await
        .map_err(unavailable)?
        .map_err(unavailable)
    }
}

impl Backend for LocalBackend {
    async fn get(&self, scope: &Scope, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        let (f, l, k) = owned(scope, key);
        self.read(move |entries, _| {
            Ok(entries
                .get((&*f, &*l, k.as_str()))?
                .map(|value| value.value().to_vec()))
        })
        .await
    }

    async fn set(
        &self,
        scope: &Scope,
        key: &str,
        value: Vec<u8>,
        quota: Quota,
    ) -> Result<(), KvError> {
        self.write(scope, key, WriteOp::Set(value, quota))
            .await
            .map(|_| ())
    }

    async fn delete(&self, scope: &Scope, key: &str) -> Result<(), KvError> {
        self.write(scope, key, WriteOp::Delete).await.map(|_| ())
    }

    async fn exists(&self, scope: &Scope, key: &str) -> Result<bool, KvError> {
        let (f, l, k) = owned(scope, key);
        self.read(move |entries, _| Ok(entries.get((&*f, &*l, k.as_str()))?.is_some()))
            .await
    }

    async fn list(
        &self,
        scope: &Scope,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page, KvError> {
        let (f, l, after) = owned(scope, after.unwrap_or(""));
        let start_after = !after.is_empty();
        self.read(move |entries, _| {
            let start = if start_after {
                Bound::Excluded((&*f, &*l, after.as_str()))
            } else {
                Bound::Included((&*f, &*l, ""))
            };
            let mut keys = Vec::new();
            let mut more = false;
            for entry in entries.range::<(&str, &str, &str)>((start, Bound::Unbounded))? {
                let (key, _) = entry?;
                let (function, label, key) = key.value();
                if function != &*f || label != &*l {
                    break;
                }
                if keys.len() == limit {
                    more = true;
                    break;
                }
                keys.push(key.to_string());
            }
            let next = if more { keys.last().cloned() } else { None };
            Ok(Page { keys, next })
        })
        .await
    }

    async fn increment(
        &self,
        scope: &Scope,
        key: &str,
        delta: i64,
        quota: Quota,
    ) -> Result<i64, KvError> {
        match self
            .write(scope, key, WriteOp::Increment(delta, quota))
            .await?
        {
            Applied::Counter(value) => Ok(value),
            _ => Err(unavailable("the store's writer answered out of turn")),
        }
    }

    async fn compare_and_swap(
        &self,
        scope: &Scope,
        key: &str,
        expected: Option<Vec<u8>>,
        value: Vec<u8>,
        quota: Quota,
    ) -> Result<bool, KvError> {
        match self
            .write(scope, key, WriteOp::CompareAndSwap(expected, value, quota))
            .await?
        {
            Applied::Swapped(swapped) => Ok(swapped),
            _ => Err(unavailable("the store's writer answered out of turn")),
        }
    }

    async fn usage(&self, scope: &Scope) -> Result<Usage, KvError> {
        let (f, l, _) = owned(scope, "");
        self.read(move |_, usage| read_usage(usage, &f, &l)).await
    }

    async fn stores(&self, function: &str) -> Result<Vec<(String, Usage)>, KvError> {
        let function = function.to_string();
        self.read(move |_, usage| {
            let mut stores = Vec::new();
            let start = Bound::Included((function.as_str(), ""));
            for row in usage.range::<(&str, &str)>((start, Bound::Unbounded))? {
                let (key, value) = row?;
                let (f, label) = key.value();
                if f != function {
                    break;
                }
                let (keys, bytes) = value.value();
                stores.push((label.to_string(), Usage { keys, bytes }));
            }
            Ok(stores)
        })
        .await
    }

    async fn all_stores(&self) -> Result<Vec<(String, String, Usage)>, KvError> {
        self.read(|_, usage| {
            let mut stores = Vec::new();
            for row in usage.iter()? {
                let (key, value) = row?;
                let (function, label) = key.value();
                let (keys, bytes) = value.value();
                stores.push((
                    function.to_string(),
                    label.to_string(),
                    Usage { keys, bytes },
                ));
            }
            Ok(stores)
        })
        .await
    }

    async fn purge(&self, scope: &Scope) -> Result<(), KvError> {
        self.write(scope, "", WriteOp::Purge).await.map(|_| ())
    }
}

fn owned(scope: &Scope, key: &str) -> (Arc<str>, Arc<str>, String) {
    (
        Arc::clone(&scope.function),
        Arc::clone(&scope.label),
        key.to_string(),
    )
}

fn read_usage(
    usage: &impl ReadableTable<(&'static str, &'static str), (u64, u64)>,
    function: &str,
    label: &str,
) -> Result<Usage, redb::Error> {
    Ok(usage
        .get((function, label))?
        .map(|row| {
            let (keys, bytes) = row.value();
            Usage { keys, bytes }
        })
        .unwrap_or_default())
}

/// Takes queued writes in groups, one transaction and one commit each,
/// until every sender is gone or the store is closed.
fn run_writer(db: Arc<Database>, mut queue: mpsc::Receiver<Command>) {
    let mut closing = None;
    while closing.is_none() {
        let Some(first) = queue.blocking_recv() else {
            break;
        };
        let mut group = Vec::new();
        let mut next = Some(first);
        while let Some(command) = next.take() {
            match command {
                Command::Write(write) => group.push(write),
                Command::Close(done) => {
                    closing = Some(done);
                    break;
                }
            }
            if group.len() < MAX_GROUP {
                next = queue.try_recv().ok();
            }
        }
        if group.is_empty() {
            continue;
        }
        match commit_group(&db, &group) {
            Ok(results) => {
                for (write, result) in group.into_iter().zip(results) {
                    let _ = write.reply.send(result);
                }
            }
            Err(error) => {
                tracing::error!(error = %error, writes = group.len(), "key-value commit failed");
                for write in group {
                    let _ = write.reply.send(Err(unavailable(&error)));
                }
            }
        }
    }
    drop(db);
    if let Some(done) = closing {
        let _ = done.send(());
    }
}

type EntriesTable<'t> = Table<'t, (&'static str, &'static str, &'static str), &'static [u8]>;
type UsageTable<'t> = Table<'t, (&'static str, &'static str), (u64, u64)>;

/// Applies a group in one transaction. The outer error (storage) fails the
/// whole group; each write's own result is inside.
fn commit_group(
    db: &Database,
    group: &[Write],
) -> Result<Vec<Result<Applied, KvError>>, redb::Error> {
    let txn = db.begin_write()?;
    let mut results = Vec::with_capacity(group.len());
    {
        let mut entries = txn.open_table(ENTRIES)?;
        let mut usage = txn.open_table(USAGE)?;
        for write in group {
            results.push(apply(&mut entries, &mut usage, write)?);
        }
    }
    txn.commit()?;
    Ok(results)
}

fn apply(
    entries: &mut EntriesTable<'_>,
    usage: &mut UsageTable<'_>,
    write: &Write,
) -> Result<Result<Applied, KvError>, redb::Error> {
    let (f, l, key) = (
        &*write.scope.function,
        &*write.scope.label,
        write.key.as_str(),
    );
    let current = read_usage(usage, f, l)?;
    let stored = entries.get((f, l, key))?.map(|v| v.value().to_vec());
    let old_size = stored.as_deref().map(|v| entry_size(key, v));
    let mut put = |value: &[u8], quota: Quota, answer: Applied| {
        let next = current.after_write(old_size, entry_size(key, value));
        if let Err(error) = current.check(next, quota) {
            return Ok(Err(error));
        }
        entries.insert((f, l, key), value)?;
        write_usage(usage, f, l, next)?;
        Ok(Ok(answer))
    };
    match &write.op {
        WriteOp::Set(value, quota) => put(value, *quota, Applied::Done),
        WriteOp::Increment(delta, quota) => match add_to_counter(key, stored.as_deref(), *delta) {
            Ok(sum) => put(sum.to_string().as_bytes(), *quota, Applied::Counter(sum)),
            Err(error) => Ok(Err(error)),
        },
        WriteOp::CompareAndSwap(expected, value, quota) => {
            if *expected == stored {
                put(value, *quota, Applied::Swapped(true))
            } else {
                Ok(Ok(Applied::Swapped(false)))
            }
        }
        WriteOp::Delete => {
            if let Some(old) = old_size {
                entries.remove((f, l, key))?;
                write_usage(usage, f, l, current.after_delete(old))?;
            }
            Ok(Ok(Applied::Done))
        }
        WriteOp::Purge => {
            let mut keys = Vec::new();
            let start = Bound::Included((f, l, ""));
            for entry in entries.range::<(&str, &str, &str)>((start, Bound::Unbounded))? {
                let (k, _) = entry?;
                let (kf, kl, kk) = k.value();
                if kf != f || kl != l {
                    break;
                }
                keys.push(kk.to_string());
            }
            for k in &keys {
                entries.remove((f, l, k.as_str()))?;
            }
            write_usage(usage, f, l, Usage::default())?;
            Ok(Ok(Applied::Done))
        }
    }
}

/// Records a store's usage; an empty store leaves no row.
fn write_usage(
    usage: &mut UsageTable<'_>,
    function: &str,
    label: &str,
    now: Usage,
) -> Result<(), redb::Error> {
    if now.keys == 0 {
        usage.remove((function, label))?;
    } else {
        usage.insert((function, label), (now.keys, now.bytes))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &std::path::Path) -> LocalBackend {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("kv.redb"))
            .expect("database file");
        LocalBackend::open(file).expect("database")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conforms() {
        let dir = tempfile::tempdir().expect("temp dir");
        let backend = Arc::new(open(dir.path()));
        if let Err(failure) = super::super::conformance::check(&backend, "local").await {
            panic!("{failure}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn acknowledged_writes_are_there_after_reopening() {
        let dir = tempfile::tempdir().expect("temp dir");
        let scope = Scope::new("f", "default");
        let quota = Quota {
            max_keys: 100,
            max_bytes: 1 << 20,
        };
        let backend = open(dir.path());
        for i in 0..20 {
            backend
                .set(&scope, &format!("k{i}"), vec![i; 100], quota)
                .await
                .expect("set");
        }
        backend.close().await;
        assert!(matches!(
            backend.get(&scope, "k1").await,
            Err(KvError::Unavailable(_))
        ));
        let backend = open(dir.path());
        assert_eq!(
            backend.usage(&scope).await.expect("usage"),
            Usage {
                keys: 20,
                // keys "k0".."k9" and "k10".."k19", 100-byte values
                bytes: 10 * 102 + 10 * 103
            }
        );
        assert_eq!(
            backend.get(&scope, "k7").await.expect("get"),
            Some(vec![7; 100])
        );
    }
}
