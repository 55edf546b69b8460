//! The shared backend, for a site of several hosts: NATS JetStream
//! key-value, one bucket per store, replicated by the NATS servers the
//! site runs (on its hosts; three of them keep every write through the loss
//! of one). Every host pointed at the same NATS cluster sees the same data.
//!
//! - **Buckets**: `lichen_<function>_<label>` (function names have no `_`,
//!   so the name reads back unambiguously), created on first use with
//!   `--kv-nats-replicas` replicas and one revision per key.
//! - **Reads see the latest write**: a bucket's reads go through the stream
//!   leader (JetStream's message get), never a direct get, which a replica
//!   may answer before it has caught up. A leader cut off from the others
//!   goes on answering reads until it notices (seconds), while the others
//!   elect a new one and take writes; so a read is confirmed through the
//!   replicated log before it is answered: a marker (`=read`) is written
//!   only if the key's last sequence is still the one read
//!   (`Nats-Expected-Last-Subject-Sequence` checked on the key's subject).
//!   A read costs a replicated write; it is never older than a write
//!   acknowledged before it began (the fault campaign checks reads and
//!   writes for linearizability). Listing keys is not confirmed.
//! - **Keys**: NATS keys are subject tokens. A key of `A-Z a-z 0-9 _ -` is
//!   stored as itself; any other (dots, spaces, unicode, empty) as `=` and
//!   its bytes in hex, which no plain key can look like.
//! - **Writes are compare-and-swap on the key's revision**, so increments,
//!   swaps and quota accounting are exact under any number of hosts: an
//!   increment is a bounded loop of read, add, write-if-unchanged.
//! - **Usage** (`=usage` in the bucket, JSON) is kept by compare-and-swap
//!   too. A write that grows the store reserves its growth before it writes
//!   (refused past the quota) and gives it back only if the write lost a
//!   race (it certainly did not happen); a write that shrinks it records
//!   that after. A host that dies between the two, or a write whose outcome
//!   is unknown (a timeout, a lost connection), leaves the usage counted
//!   high, never low: quotas err towards refusing.
//!
//! A host whose NATS servers are unreachable keeps serving: key-value
//! operations fail with the interface's error (`unavailable`), `/readyz`
//! says so, and the client reconnects on its own.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use super::{Backend, KvError, Page, Quota, Scope, Usage, add_to_counter, entry_size};

const BUCKET_PREFIX: &str = "lichen_";
const USAGE_KEY: &str = "=usage";
/// The key a read's confirmation is written to (never a store key: `=`
/// and not hex).
const READ_MARK: &str = "=read";
/// How long a write goes on with compare-and-swap rounds on a key that
/// keeps changing under it. Time, not a count of rounds: every lost round
/// is another writer's success, so a writer among many waits its turn for
/// as long as the others take, and a slow machine takes longer.
pub(crate) const CAS_PATIENCE: Duration = Duration::from_secs(10);

pub struct NatsBackend {
    client: async_nats::Client,
    js: jetstream::Context,
    replicas: usize,
    /// Open buckets, by store.
    buckets: Mutex<HashMap<Scope, kv::Store>>,
    /// Held while a bucket is looked up or created: a burst of first
    /// writes to a new store makes one stream, not one request each (which
    /// a clustered JetStream answers slowly, past the request timeout).
    opening: tokio::sync::Mutex<()>,
}

pub(crate) fn unavailable(error: impl std::fmt::Display) -> KvError {
    KvError::Unavailable(error.to_string())
}

/// The NATS key a store key is kept under.
pub fn encode_key(key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if plain {
        key.to_string()
    } else {
        format!("={}", hex::encode(key.as_bytes()))
    }
}

/// The store key of a NATS key; `None` for Lichen's own (`=usage`).
pub fn decode_key(key: &str) -> Option<String> {
    match key.strip_prefix('=') {
        None => Some(key.to_string()),
        Some(encoded) => hex::decode(encoded)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok()),
    }
}

/// How long opening a bucket waits for its stream's leader to be elected
/// (well under a second in a healthy cluster); past it the operation goes
/// ahead and fails with NATS's own error if there is still none.
const LEADER_ELECTION: Duration = Duration::from_secs(10);

fn bucket_name(scope: &Scope) -> String {
    format!("{BUCKET_PREFIX}{}_{}", scope.function, scope.label)
}

/// (function, label) of a bucket of ours.
fn parse_bucket(name: &str) -> Option<(String, String)> {
    let (function, label) = name.strip_prefix(BUCKET_PREFIX)?.split_once('_')?;
    Some((function.to_string(), label.to_string()))
}

/// The key-value bucket `name` (replicated `replicas` times), read through
/// its stream's leader; `create`: made if missing (else `None`), its
/// entries dropped `max_age` after their write unless that is zero.
pub async fn open_bucket(
    js: &jetstream::Context,
    name: &str,
    replicas: usize,
    create: bool,
    max_age: Duration,
) -> Result<Option<kv::Store>, KvError> {
    let stream = format!("KV_{name}");
    let mut stream = match js.get_stream(&stream).await {
        Ok(stream) => stream,
        Err(e) if is_not_found(&e) && !create => return Ok(None),
        Err(e) if is_not_found(&e) => {
            // The stream a key-value bucket is, as async-nats makes it,
            // except that reads go through the stream leader: a direct
            // get may be answered by a replica that has not seen the
            // latest write.
            let config = jetstream::stream::Config {
                name: stream,
                subjects: vec![format!("$KV.{name}.>")],
                max_messages_per_subject: 1,
                allow_rollup: true,
                deny_delete: true,
                allow_direct: false,
                num_replicas: replicas,
                discard: jetstream::stream::DiscardPolicy::New,
                max_age,
                ..Default::default()
            };
            js.get_or_create_stream(config).await.map_err(unavailable)?
        }
        Err(e) => return Err(unavailable(e)),
    };
    // A new replicated stream elects its leader first; until it has
    // one, operations on it fail ("stream not found") or wait out the
    // request timeout. That holds for a host that finds the stream
    // another host has just made as much as for the one that made it.
    // (Known gap: two hosts opening a new store at the same moment on
    // a loaded three-server cluster have been seen to get "stream not
    // found" once after this wait; that call fails, the next succeeds.)
    // The info that came with the stream says so first; only a stream
    // without a leader yet is asked again.
    let led =
        |info: &jetstream::stream::Info| info.cluster.as_ref().is_none_or(|c| c.leader.is_some());
    let elected = tokio::time::Instant::now() + LEADER_ELECTION;
    let mut has_leader = led(stream.cached_info());
    while !has_leader && tokio::time::Instant::now() < elected {
        tokio::time::sleep(Duration::from_millis(100)).await;
        has_leader = led(stream.info().await.map_err(unavailable)?);
    }
    js.get_key_value(name).await.map(Some).map_err(unavailable)
}

/// Whether NATS answered that the stream does not exist.
pub fn is_not_found(error: &jetstream::context::GetStreamError) -> bool {
    matches!(
        error.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(e)
            if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

/// Whether a conditional write failed because the key changed since it
/// was read. Servers since 2.12 answer that with error code 10164 as well
/// as 10071, and async-nats 0.51 only recognises the older one.
pub(crate) fn lost_race(recognised: bool, error: &impl std::fmt::Display) -> bool {
    recognised || {
        let text = error.to_string();
        text.contains("error code 10164") || text.contains("wrong last sequence")
    }
}

/// What a conditional write ([`write_once`]) came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cas {
    /// It is in the stream, at this revision.
    Applied(u64),
    /// The key changed since it was read: not written.
    Lost,
}

/// How often [`write_once`] sends its message when no answer comes.
const SENDS: usize = 3;

/// Writes `value` (a delete marker for `None`) at `key` of `store` if the
/// key's last revision is still `revision`: one logical write, sent under
/// one `Nats-Msg-Id`. A copy sent again because no answer came (or that
/// reached the stream twice) is taken once, by JetStream's duplicate
/// window; and a "wrong last sequence" answer is checked against the key's
/// last message, which carries the id when a copy did land (its answer
/// lost), so a write that happened is never taken for one that did not and
/// made again.
pub(crate) async fn write_once(
    js: &jetstream::Context,
    store: &kv::Store,
    key: &str,
    value: Option<Bytes>,
    revision: u64,
) -> Result<Cas, String> {
    let subject = subject_of(store, key);
    let id = write_id();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", id.as_str());
    headers.insert(
        "Nats-Expected-Last-Subject-Sequence",
        revision.to_string().as_str(),
    );
    if value.is_none() {
        headers.insert("KV-Operation", "DEL");
    }
    let payload = value.unwrap_or_default();
    let mut last_error = String::new();
    for _ in 0..SENDS {
        let sent = js
            .publish_with_headers(subject.clone(), headers.clone(), payload.clone())
            .await
            .map_err(|e| e.to_string())?;
        match sent.await {
            Ok(ack) => return Ok(Cas::Applied(ack.sequence)),
            Err(e)
                if lost_race(
                    e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence,
                    &e,
                ) =>
            {
                // Only a last message read, and not ours, says the write
                // did not happen; a failed read leaves it in doubt.
                return match last_write(store, &subject).await {
                    Ok(Some((last, sequence))) if last == id => Ok(Cas::Applied(sequence)),
                    Ok(_) => Ok(Cas::Lost),
                    Err(error) => Err(format!(
                        "the write met a newer revision and reading the key back failed ({error}); it may have happened"
                    )),
                };
            }
            // No answer: the same message again (a copy that landed is
            // answered as a duplicate, not applied twice). A clustered
            // server answers a copy that comes while the first is still
            // being replicated with a duplicate conflict: again, shortly.
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::TimedOut => {
                last_error = e.to_string();
            }
            Err(e) if e.to_string().to_ascii_lowercase().contains("duplicate") => {
                last_error = e.to_string();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    Err(format!(
        "no answer from NATS after {SENDS} sends of one write ({last_error}); it may have happened"
    ))
}

/// The subject `key` of `store` is written on, as async-nats writes it
/// (this host sets no JetStream domain or API prefix).
fn subject_of(store: &kv::Store, key: &str) -> String {
    format!(
        "{}{key}",
        store.put_prefix.as_ref().unwrap_or(&store.prefix)
    )
}

/// The `Nats-Msg-Id` and sequence of the last message on `subject` (read
/// from the stream's leader), if it has one; an error if it cannot be read.
async fn last_write(store: &kv::Store, subject: &str) -> Result<Option<(String, u64)>, String> {
    let message = store
        .stream
        .get_last_raw_message_by_subject(subject)
        .await
        .map_err(|e| e.to_string())?;
    Ok(message
        .headers
        .get("Nats-Msg-Id")
        .map(|id| (id.as_str().to_string(), message.sequence)))
}

/// A fresh id for one logical write: 128 random bits.
fn write_id() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    // A failed draw leaves zeros and a time-based id below: unique enough
    // for the two minutes of the duplicate window.
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        bytes = now.to_le_bytes();
    }
    format!("lichen-{}", hex::encode(bytes))
}

/// Compare-and-swap rounds of one write: the first at once, each later one
/// after a random pause growing with the round up to about 10 ms (so
/// writers that lost to each other do not collide again in step), until
/// the key has kept changing for [`CAS_PATIENCE`].
pub(crate) struct Rounds {
    round: u64,
    until: tokio::time::Instant,
}

impl Rounds {
    pub(crate) fn new() -> Self {
        Rounds {
            round: 0,
            until: tokio::time::Instant::now() + CAS_PATIENCE,
        }
    }

    /// Whether to try (again), after the pause.
    pub(crate) async fn next(&mut self) -> bool {
        self.round += 1;
        if self.round == 1 {
            return true;
        }
        if tokio::time::Instant::now() >= self.until {
            return false;
        }
        let mut byte = [0u8; 1];
        let _ = getrandom::fill(&mut byte);
        let ceiling_us = 250 * self.round.min(40);
        let pause = u64::from(byte[0]) * ceiling_us / 255;
        tokio::time::sleep(Duration::from_micros(pause)).await;
        true
    }
}

/// What a write decided, given the value it found.
enum Change<T> {
    Put(Vec<u8>, T),
    Delete(T),
    Keep(T),
}

/// How a host proves itself to NATS, and which NATS it trusts: a
/// credentials file (JWT and seed, `nsc`'s `.creds`), or an nkey seed
/// file; a CA the server's certificate must chain to (TLS required then);
/// a client certificate and key for servers that verify clients.
#[derive(Debug, Clone, Default)]
pub struct NatsAuth {
    pub creds: Option<std::path::PathBuf>,
    pub nkey: Option<std::path::PathBuf>,
    pub ca: Option<std::path::PathBuf>,
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
}

impl NatsAuth {
    /// `options` with these credentials and trust.
    async fn apply(
        &self,
        mut options: async_nats::ConnectOptions,
    ) -> anyhow::Result<async_nats::ConnectOptions> {
        // The client reads the TLS files only when it connects, and keeps
        // retrying: a wrong path is said at start, not never.
        for (flag, path) in [
            ("--kv-nats-ca", &self.ca),
            ("--kv-nats-cert", &self.cert),
            ("--kv-nats-key", &self.key),
        ] {
            if let Some(path) = path {
                std::fs::metadata(path)
                    .map_err(|e| anyhow::anyhow!("{flag} {}: {e}", path.display()))?;
            }
        }
        if let Some(creds) = &self.creds {
            options = options
                .credentials_file(creds)
                .await
                .map_err(|e| anyhow::anyhow!("--kv-nats-creds {}: {e}", creds.display()))?;
        }
        if let Some(nkey) = &self.nkey {
            let seed = std::fs::read_to_string(nkey)
                .map_err(|e| anyhow::anyhow!("--kv-nats-nkey {}: {e}", nkey.display()))?;
            options = options.nkey(seed.trim().to_string());
        }
        if let Some(ca) = &self.ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                options = options
                    .add_client_certificate(cert.clone(), key.clone())
                    .require_tls(true);
            }
            (None, None) => {}
            _ => anyhow::bail!("--kv-nats-cert and --kv-nats-key go together"),
        }
        Ok(options)
    }
}

impl NatsBackend {
    /// Connects to `urls` (one NATS cluster) as `auth` says; the host
    /// starts even if none answers yet, and the client keeps reconnecting.
    /// `timeout` bounds each JetStream request.
    pub async fn connect(
        urls: &[String],
        replicas: usize,
        timeout: Duration,
        auth: &NatsAuth,
    ) -> anyhow::Result<Self> {
        let options = async_nats::ConnectOptions::new()
            .name("lichen")
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(2))
            // A server cut off (a partition) is noticed in seconds, not the
            // client's default minutes, and the client moves to another
            // of the cluster's servers: the side that reaches NATS goes on
            // taking cron leases and writing during the cut.
            .ping_interval(Duration::from_secs(2))
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Connected => {
                        tracing::info!("key-value backend: connected to NATS")
                    }
                    async_nats::Event::Disconnected => {
                        tracing::warn!("key-value backend: NATS unreachable, reconnecting")
                    }
                    other => tracing::info!(event = %other, "key-value backend: NATS event"),
                }
            });
        let addrs: Vec<async_nats::ServerAddr> = urls
            .iter()
            .map(|url| url.parse())
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("--kv-nats-url: {e}"))?;
        let options = auth.apply(options).await?;
        let client = options.connect(addrs).await?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(timeout);
        Ok(NatsBackend {
            client,
            js,
            replicas: replicas.max(1),
            buckets: Mutex::new(HashMap::new()),
            opening: tokio::sync::Mutex::new(()),
        })
    }

    /// Whether the client is connected now.
    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Which data this host sees, for the cluster: hosts on the same NATS
    /// cluster see the same (its name, or the server's id if it has none).
    pub fn identity(&self) -> Option<String> {
        let info = self.client.server_info();
        match info.cluster {
            Some(cluster) if !cluster.is_empty() => Some(cluster),
            _ if !info.server_id.is_empty() => Some(info.server_id),
            _ => None,
        }
    }

    pub async fn close(&self) {
        let _ = self.client.drain().await;
    }

    /// The store's bucket; `create`: make it if missing (else `None`).
    async fn bucket(&self, scope: &Scope, create: bool) -> Result<Option<kv::Store>, KvError> {
        if let Some(store) = self.cached(scope) {
            return Ok(Some(store));
        }
        let _opening = self.opening.lock().await;
        if let Some(store) = self.cached(scope) {
            return Ok(Some(store));
        }
        let Some(store) = open_bucket(
            &self.js,
            &bucket_name(scope),
            self.replicas,
            create,
            Duration::ZERO,
        )
        .await?
        else {
            return Ok(None);
        };
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        buckets.insert(scope.clone(), store.clone());
        Ok(Some(store))
    }

    /// The JetStream context and the replica count of every bucket, for
    /// the cluster's registry when it lives here too.
    pub fn jetstream(&self) -> (jetstream::Context, usize) {
        (self.js.clone(), self.replicas)
    }

    fn cached(&self, scope: &Scope) -> Option<kv::Store> {
        let buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        buckets.get(scope).cloned()
    }

    fn forget(&self, scope: &Scope) {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        buckets.remove(scope);
    }

    /// The value at `key` (encoded) and its revision (0: never written).
    async fn entry(store: &kv::Store, key: &str) -> Result<(Option<Bytes>, u64), KvError> {
        match store.entry(key).await.map_err(unavailable)? {
            None => Ok((None, 0)),
            Some(entry) => match entry.operation {
                kv::Operation::Put => Ok((Some(entry.value), entry.revision)),
                _ => Ok((None, entry.revision)),
            },
        }
    }

    /// The value at `key` (encoded), as of a point the stream's log
    /// confirms: read from the leader, then a marker written only if the
    /// key's last sequence is still the one read (a leader that has lost
    /// its quorum cannot write it). Read again if the key changed between.
    async fn confirmed(&self, store: &kv::Store, key: &str) -> Result<Option<Bytes>, KvError> {
        let mut rounds = Rounds::new();
        while rounds.next().await {
            let (value, revision) = Self::entry(store, key).await?;
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(
                "Nats-Expected-Last-Subject-Sequence",
                revision.to_string().as_str(),
            );
            headers.insert(
                "Nats-Expected-Last-Subject-Sequence-Subject",
                subject_of(store, key).as_str(),
            );
            let sent = self
                .js
                .publish_with_headers(subject_of(store, READ_MARK), headers, Bytes::new())
                .await
                .map_err(unavailable)?;
            match sent.await {
                Ok(_) => return Ok(value),
                Err(e)
                    if lost_race(
                        e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence,
                        &e,
                    ) => {}
                Err(e) => return Err(unavailable(e)),
            }
        }
        Err(unavailable(format!(
            "{key:?} kept changing for {} s of attempts to read it",
            CAS_PATIENCE.as_secs()
        )))
    }

    async fn read_usage(store: &kv::Store) -> Result<(Usage, u64), KvError> {
        let (value, revision) = Self::entry(store, USAGE_KEY).await?;
        let usage = match value {
            None => Usage::default(),
            Some(bytes) => {
                let (keys, bytes): (u64, u64) = serde_json::from_slice(&bytes)
                    .map_err(|e| KvError::Invalid(format!("the store's usage record: {e}")))?;
                Usage { keys, bytes }
            }
        };
        Ok((usage, revision))
    }

    /// Applies a change of (keys, bytes) to the usage record; with a quota,
    /// refuses growth past it.
    async fn adjust_usage(
        js: &jetstream::Context,
        store: &kv::Store,
        keys: i64,
        bytes: i64,
        quota: Option<Quota>,
    ) -> Result<(), KvError> {
        let mut rounds = Rounds::new();
        while rounds.next().await {
            let (usage, revision) = Self::read_usage(store).await?;
            let next = Usage {
                keys: usage.keys.saturating_add_signed(keys),
                bytes: usage.bytes.saturating_add_signed(bytes),
            };
            if let Some(quota) = quota {
                usage.check(next, quota)?;
            }
            let record = serde_json::to_vec(&(next.keys, next.bytes))
                .map_err(|e| KvError::Invalid(e.to_string()))?;
            match write_once(js, store, USAGE_KEY, Some(record.into()), revision).await {
                Ok(Cas::Applied(_)) => return Ok(()),
                Ok(Cas::Lost) => continue,
                Err(e) => return Err(unavailable(e)),
            }
        }
        Err(unavailable("the store's usage kept changing; try again"))
    }

    /// Reads `key`, lets `decide` choose, and writes if nothing changed in
    /// between (else reads again), keeping the usage record in step.
    async fn change<T>(
        &self,
        scope: &Scope,
        key: &str,
        quota: Quota,
        creates: bool,
        mut decide: impl FnMut(Option<&[u8]>) -> Result<Change<T>, KvError>,
    ) -> Result<T, KvError> {
        let Some(store) = self.bucket(scope, creates).await? else {
            // Nothing stored, nothing to delete.
            return match decide(None)? {
                Change::Delete(answer) | Change::Keep(answer) => Ok(answer),
                Change::Put(..) => Err(unavailable("the store's bucket is missing")),
            };
        };
        let nats_key = encode_key(key);
        let mut rounds = Rounds::new();
        while rounds.next().await {
            let (old, revision) = Self::entry(&store, &nats_key).await?;
            let old_size = old.as_deref().map(|v| entry_size(key, v) as i64);
            match decide(old.as_deref())? {
                Change::Keep(answer) => return Ok(answer),
                Change::Put(value, answer) => {
                    let keys = i64::from(old.is_none());
                    let bytes = entry_size(key, &value) as i64 - old_size.unwrap_or(0);
                    let (grow_keys, grow_bytes) = (keys.max(0), bytes.max(0));
                    if grow_keys > 0 || grow_bytes > 0 {
                        Self::adjust_usage(&self.js, &store, grow_keys, grow_bytes, Some(quota))
                            .await?;
                    }
                    match write_once(&self.js, &store, &nats_key, Some(value.into()), revision)
                        .await
                    {
                        Ok(Cas::Applied(_)) => {
                            if bytes < 0 {
                                Self::adjust_usage(&self.js, &store, 0, bytes, None).await?;
                            }
                            return Ok(answer);
                        }
                        // Only a lost race (checked not to be our own write)
                        // says the write did not happen; after any other
                        // failure it may have, so the reservation stays
                        // (usage high, never low).
                        Err(e) => return Err(unavailable(e)),
                        Ok(Cas::Lost) => {
                            if grow_keys > 0 || grow_bytes > 0 {
                                Self::adjust_usage(&self.js, &store, -grow_keys, -grow_bytes, None)
                                    .await?;
                            }
                        }
                    }
                }
                Change::Delete(answer) => {
                    let Some(size) = old_size else {
                        return Ok(answer);
                    };
                    match write_once(&self.js, &store, &nats_key, None, revision).await {
                        Ok(Cas::Applied(_)) => {
                            Self::adjust_usage(&self.js, &store, -1, -size, None).await?;
                            return Ok(answer);
                        }
                        Ok(Cas::Lost) => continue,
                        Err(e) => return Err(unavailable(e)),
                    }
                }
            }
        }
        Err(unavailable(format!(
            "{key:?} kept changing for {} s of attempts to write it",
            CAS_PATIENCE.as_secs()
        )))
    }

    /// Our buckets' stores: (function, label).
    async fn our_buckets(&self) -> Result<Vec<(String, String)>, KvError> {
        let names: Vec<String> = self
            .js
            .stream_names()
            .try_collect()
            .await
            .map_err(unavailable)?;
        Ok(names
            .iter()
            .filter_map(|stream| stream.strip_prefix("KV_"))
            .filter_map(parse_bucket)
            .collect())
    }
}

impl Backend for NatsBackend {
    async fn get(&self, scope: &Scope, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        let Some(store) = self.bucket(scope, false).await? else {
            return Ok(None);
        };
        let value = self.confirmed(&store, &encode_key(key)).await?;
        Ok(value.map(|v| v.to_vec()))
    }

    async fn set(
        &self,
        scope: &Scope,
        key: &str,
        value: Vec<u8>,
        quota: Quota,
    ) -> Result<(), KvError> {
        self.change(scope, key, quota, true, |_| {
            Ok(Change::Put(value.clone(), ()))
        })
        .await
    }

    async fn delete(&self, scope: &Scope, key: &str) -> Result<(), KvError> {
        self.change(scope, key, Quota::UNLIMITED, false, |_| {
            Ok(Change::Delete(()))
        })
        .await
    }

    async fn exists(&self, scope: &Scope, key: &str) -> Result<bool, KvError> {
        Ok(self.get(scope, key).await?.is_some())
    }

    async fn list(
        &self,
        scope: &Scope,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page, KvError> {
        let Some(store) = self.bucket(scope, false).await? else {
            return Ok(Page {
                keys: Vec::new(),
                next: None,
            });
        };
        let mut keys: Vec<String> = Vec::new();
        let mut listed = store.keys().await.map_err(unavailable)?;
        while let Some(key) = listed.next().await {
            if let Some(key) = decode_key(&key.map_err(unavailable)?) {
                keys.push(key);
            }
        }
        keys.sort();
        let start = match after {
            Some(after) => keys.partition_point(|k| k.as_str() <= after),
            None => 0,
        };
        let page: Vec<String> = keys.iter().skip(start).take(limit).cloned().collect();
        let more = start + page.len() < keys.len();
        let next = if more { page.last().cloned() } else { None };
        Ok(Page { keys: page, next })
    }

    async fn increment(
        &self,
        scope: &Scope,
        key: &str,
        delta: i64,
        quota: Quota,
    ) -> Result<i64, KvError> {
        self.change(scope, key, quota, true, |old| {
            let sum = add_to_counter(key, old, delta)?;
            Ok(Change::Put(sum.to_string().into_bytes(), sum))
        })
        .await
    }

    async fn compare_and_swap(
        &self,
        scope: &Scope,
        key: &str,
        expected: Option<Vec<u8>>,
        value: Vec<u8>,
        quota: Quota,
    ) -> Result<bool, KvError> {
        self.change(scope, key, quota, true, |old| {
            if old == expected.as_deref() {
                Ok(Change::Put(value.clone(), true))
            } else {
                Ok(Change::Keep(false))
            }
        })
        .await
    }

    async fn usage(&self, scope: &Scope) -> Result<Usage, KvError> {
        match self.bucket(scope, false).await? {
            None => Ok(Usage::default()),
            Some(store) => Ok(Self::read_usage(&store).await?.0),
        }
    }

    async fn stores(&self, function: &str) -> Result<Vec<(String, Usage)>, KvError> {
        let mut stores = Vec::new();
        for (f, label) in self.our_buckets().await? {
            if f != function {
                continue;
            }
            let usage = self.usage(&Scope::new(&f, &label)).await?;
            if usage.keys > 0 {
                stores.push((label, usage));
            }
        }
        stores.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(stores)
    }

    async fn all_stores(&self) -> Result<Vec<(String, String, Usage)>, KvError> {
        let mut stores = Vec::new();
        for (function, label) in self.our_buckets().await? {
            let usage = self.usage(&Scope::new(&function, &label)).await?;
            if usage.keys > 0 {
                stores.push((function, label, usage));
            }
        }
        Ok(stores)
    }

    async fn purge(&self, scope: &Scope) -> Result<(), KvError> {
        self.forget(scope);
        match self
            .js
            .delete_stream(format!("KV_{}", bucket_name(scope)))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("stream not found") => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_plain_ones_stay_readable() {
        for key in [
            "plain-key_1",
            "",
            "a.b",
            "with space",
            "=usage",
            "\u{e9}t\u{e9}",
            "a/b*>",
        ] {
            let encoded = encode_key(key);
            assert!(
                encoded
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'='),
                "{encoded}"
            );
            assert_eq!(decode_key(&encoded).as_deref(), Some(key));
        }
        assert_eq!(encode_key("plain-key_1"), "plain-key_1");
        assert_ne!(encode_key("=usage"), USAGE_KEY);
        assert_eq!(decode_key(USAGE_KEY), None);
        assert_eq!(decode_key(READ_MARK), None);
        assert_eq!(
            parse_bucket("lichen_my-fn_sessions_v2"),
            Some(("my-fn".into(), "sessions_v2".into()))
        );
    }
}
