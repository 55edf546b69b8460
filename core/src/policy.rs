//! What a function may do: its policy, read from `POLICIES_DIR/<name>.toml`.
//!
//! Deny by default: a function without a file gets the defaults below, which
//! grant nothing (no environment, no files, no outbound hosts) and bound
//! everything (memory, time, concurrency, bodies). A file grants one thing per
//! key. Parsing is strict: unknown keys are errors (a misspelled limit must
//! not silently become the default), and values are validated as they are
//! deserialised, by newtypes, so an error names the file, the key and the
//! problem.
//!
//! Host paths of `[files]` are resolved at load time, relative to the policies
//! directory's parent unless absolute, and refused if they climb out with `..`
//! or pass through a symbolic link: what the guest can see is decided by the
//! file, not by what the disk looks like later.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The limits a function gets unless its policy says otherwise.
pub mod defaults {
    use std::time::Duration;

    /// Fastly gives 128 MB of heap; half of that is plenty for a function and
    /// lets more of them run at once on a small edge machine.
    pub const MEMORY: u64 = 64 << 20;
    pub const TIMEOUT: Duration = Duration::from_secs(10);
    pub const CONCURRENCY: u32 = 16;
    pub const QUEUE: u32 = 64;
    pub const REQUEST_BODY: u64 = 1 << 20;
    pub const RESPONSE_BODY: u64 = 8 << 20;
}

/// The largest memory limit a policy may set: the pooling allocator sizes its
/// memory slots for it.
pub const MAX_MEMORY: u64 = 1 << 30;
/// The longest deadline a policy may set.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// A policy file as written.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    #[serde(default)]
    pub limits: Limits,
    /// The only environment variables the guest sees.
    #[serde(default)]
    pub env: BTreeMap<EnvName, String>,
    /// Read-only directories: guest path = host path.
    #[serde(default)]
    pub files: BTreeMap<GuestPath, String>,
    #[serde(default)]
    pub outbound: Outbound,
    #[serde(default)]
    pub access: Access,
    #[serde(default)]
    pub instances: Instances,
    #[serde(default)]
    pub keyvalue: KeyValue,
    /// What the guest reads through `wasi:config/store`: a key's text, or
    /// `{ secret = "NAME" }` for a secret the host keeps encrypted.
    #[serde(default)]
    pub config: BTreeMap<ConfigKey, ConfigValue>,
    /// What invokes the function besides HTTP requests.
    #[serde(default, skip_serializing_if = "crate::triggers::Triggers::is_empty")]
    pub triggers: crate::triggers::Triggers,
    /// The names (and path) it is reached at without `/fn/NAME`.
    #[serde(default, skip_serializing_if = "Http::is_empty")]
    pub http: Http,
}

/// How `[access] tokens` holds a token: `sha256:` and the hex of its
/// SHA-256, like API tokens, so reading a policy (or gossip, or the
/// policies directory) never gives one away. A plain token in a policy is
/// hashed when the policy is written through the API or loaded from disk.
pub const TOKEN_HASH_PREFIX: &str = "sha256:";

/// The hex SHA-256 an `[access] tokens` entry stands for: the hash it
/// holds, or the hash of the plain token it is.
pub fn access_token_hash(entry: &str) -> String {
    match entry.strip_prefix(TOKEN_HASH_PREFIX) {
        Some(hex) if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
            hex.to_ascii_lowercase()
        }
        _ => {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(entry.as_bytes()))
        }
    }
}

/// `text` with every plain `[access] tokens` entry replaced by its hash
/// (comments and layout kept); `None` when there is none to replace or
/// the text is not TOML (its parse says why elsewhere).
pub fn hash_access_tokens(text: &str) -> Option<String> {
    let mut doc = text.parse::<toml_edit::DocumentMut>().ok()?;
    let tokens = doc
        .get_mut("access")?
        .as_table_like_mut()?
        .get_mut("tokens")?
        .as_array_mut()?;
    let mut changed = false;
    for value in tokens.iter_mut() {
        let Some(entry) = value.as_str() else {
            continue;
        };
        let hashed = format!("{TOKEN_HASH_PREFIX}{}", access_token_hash(entry));
        if hashed != entry {
            let decor = value.decor().clone();
            *value = toml_edit::Value::from(hashed);
            *value.decor_mut() = decor;
            changed = true;
        }
    }
    changed.then(|| doc.to_string())
}

/// What a reader who is not the admin sees in place of a value that may
/// be a credential.
pub const REDACTED: &str = "<redacted>";

impl PolicyFile {
    /// Whether a value [`PolicyFile::redacted`] hides holds [`REDACTED`].
    pub fn redacted_anywhere(&self) -> bool {
        self.env.values().any(|v| v == REDACTED)
            || self
                .config
                .values()
                .any(|v| matches!(v, ConfigValue::Text(t) if t == REDACTED))
            || self.access.tokens.iter().any(|t| t == REDACTED)
    }

    /// The policy with every value that may be a credential replaced by
    /// [`REDACTED`]: `[env]` values, `[config]` texts (a secret's name
    /// stays: it is not the secret) and `[access] tokens`.
    pub fn redacted(&self) -> PolicyFile {
        let mut file = self.clone();
        for value in file.env.values_mut() {
            *value = REDACTED.to_string();
        }
        for value in file.config.values_mut() {
            if let ConfigValue::Text(text) = value {
                *text = REDACTED.to_string();
            }
        }
        for token in &mut file.access.tokens {
            *token = REDACTED.to_string();
        }
        file
    }
}

/// The most names one `[http] hosts` claims.
pub const MAX_ROUTE_HOSTS: usize = 32;

/// `[http]`: requests whose `Host` is one of `hosts` (and whose path is
/// under `path_prefix`, if given) invoke the function at their own path.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Http {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<RouteHost>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<PathPrefix>,
}

impl Http {
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty() && self.path_prefix.is_none()
    }

    /// The prefix paths are matched against: `""` for every path.
    pub fn prefix(&self) -> &str {
        self.path_prefix.as_ref().map_or("", |p| p.0.as_str())
    }

    fn check(&self) -> Result<(), String> {
        if self.hosts.len() > MAX_ROUTE_HOSTS {
            return Err(format!(
                "http.hosts names {} hosts, above the maximum of {MAX_ROUTE_HOSTS}",
                self.hosts.len()
            ));
        }
        if self.hosts.is_empty() && self.path_prefix.is_some() {
            return Err("http.path_prefix needs http.hosts: the names it applies to".to_string());
        }
        let mut seen = std::collections::BTreeSet::new();
        for host in &self.hosts {
            if !seen.insert(host.0.as_str()) {
                return Err(format!("http.hosts names {:?} twice", host.0));
            }
        }
        Ok(())
    }
}

/// A host name a function claims: DNS labels, lower case, or `*.` and a
/// name for its subdomains (one label deep).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct RouteHost(pub String);

impl RouteHost {
    /// The name under `*.`, for a wildcard.
    pub fn wildcard_of(&self) -> Option<&str> {
        self.0.strip_prefix("*.")
    }
}

impl TryFrom<String> for RouteHost {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        let name = text.strip_prefix("*.").unwrap_or(&text);
        let label_ok = |label: &str| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        };
        // The host's own names: an address literal (its last label all
        // digits, as no top-level domain is) or localhost answers the host
        // on every machine; no function takes them.
        let last = name.rsplit('.').next().unwrap_or_default();
        if last.bytes().all(|b| b.is_ascii_digit()) || last == "localhost" {
            return Err(format!(
                "{text:?} cannot be claimed: address literals and localhost are the host's own names"
            ));
        }
        if text.len() <= 253 && name.split('.').all(label_ok) {
            Ok(RouteHost(text))
        } else {
            Err(format!(
                "{text:?} is not a host name: lower-case DNS labels (a-z, 0-9, '-') separated by dots, optionally after `*.`, without a port"
            ))
        }
    }
}

impl From<RouteHost> for String {
    fn from(host: RouteHost) -> String {
        host.0
    }
}

/// A path prefix: `/` and segments, no trailing `/`, no `.` or `..`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct PathPrefix(pub String);

impl TryFrom<String> for PathPrefix {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        let valid = text.len() <= 256
            && text.starts_with('/')
            && text.len() > 1
            && text[1..].split('/').all(|segment| {
                !segment.is_empty()
                    && segment != "."
                    && segment != ".."
                    && segment
                        .bytes()
                        .all(|b| b.is_ascii_graphic() && !matches!(b, b'?' | b'#' | b'%'))
            });
        if valid {
            Ok(PathPrefix(text))
        } else {
            Err(format!(
                "{text:?} is not a path prefix: `/` and segments (`/shop`, `/api/v2`), without a trailing `/`, `?`, `#` or `%`"
            ))
        }
    }
}

impl From<PathPrefix> for String {
    fn from(prefix: PathPrefix) -> String {
        prefix.0
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    #[serde(default = "default_memory")]
    pub memory: ByteSize,
    #[serde(default = "default_timeout")]
    pub timeout: Timeout,
    #[serde(default = "default_concurrency")]
    pub concurrency: Concurrency,
    #[serde(default = "default_queue")]
    pub queue: u32,
    #[serde(default = "default_request_body")]
    pub request_body: ByteSize,
    #[serde(default = "default_response_body")]
    pub response_body: ByteSize,
}

fn default_memory() -> ByteSize {
    ByteSize(defaults::MEMORY)
}
fn default_timeout() -> Timeout {
    Timeout(defaults::TIMEOUT)
}
fn default_concurrency() -> Concurrency {
    Concurrency(defaults::CONCURRENCY)
}
fn default_queue() -> u32 {
    defaults::QUEUE
}
fn default_request_body() -> ByteSize {
    ByteSize(defaults::REQUEST_BODY)
}
fn default_response_body() -> ByteSize {
    ByteSize(defaults::RESPONSE_BODY)
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory: default_memory(),
            timeout: default_timeout(),
            concurrency: default_concurrency(),
            queue: default_queue(),
            request_body: default_request_body(),
            response_body: default_response_body(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Outbound {
    /// `scheme://host[:port]` patterns; `*` stands for any host label(s) or
    /// any port, `ADDRESS/PREFIX` for an address range. Everything else is
    /// denied, and an internal address (loopback, private, link-local...)
    /// only when a pattern names it.
    #[serde(default)]
    pub allow: Vec<HostPattern>,
    /// Connections open at once (pooled, per function).
    #[serde(default = "default_max_connections")]
    pub max_connections: Concurrency,
    /// Bounds connecting and waiting for the response head.
    #[serde(default = "default_outbound_timeout")]
    pub timeout: Timeout,
    /// `HOST:PORT` destinations of outbound TCP (`wasi:sockets`): a name
    /// (looked up by the guest, the addresses checked like outbound
    /// HTTP's), an address, or a range `ADDRESS/PREFIX`; the port exact.
    #[serde(default)]
    pub tcp: Vec<TcpGrant>,
    /// TCP connections one instance may open in its life (per invocation
    /// with a fresh instance per request, the default).
    #[serde(default = "default_max_tcp_connections")]
    pub max_tcp_connections: Concurrency,
    /// Bytes one instance may send and receive over TCP, together.
    #[serde(default = "default_max_tcp_bytes")]
    pub max_tcp_bytes: ByteSize,
}

fn default_max_tcp_connections() -> Concurrency {
    Concurrency(16)
}

fn default_max_tcp_bytes() -> ByteSize {
    ByteSize(64 << 20)
}

fn default_max_connections() -> Concurrency {
    Concurrency(32)
}

fn default_outbound_timeout() -> Timeout {
    Timeout(Duration::from_secs(10))
}

impl Default for Outbound {
    fn default() -> Self {
        Outbound {
            allow: Vec::new(),
            max_connections: default_max_connections(),
            timeout: default_outbound_timeout(),
            tcp: Vec::new(),
            max_tcp_connections: default_max_tcp_connections(),
            max_tcp_bytes: default_max_tcp_bytes(),
        }
    }
}

/// Instance reuse, off by default: a fresh instance per request is the
/// isolation promise. Reuse trades it for speed, since whatever a guest
/// keeps in memory (globals, caches, a previous caller's data) is there
/// for the next request its instance serves.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Instances {
    /// Requests one instance may serve before it is retired (1: a fresh
    /// instance every time).
    #[serde(default = "one")]
    pub reuse: Reuse,
    /// Requests one WASIp3 instance may serve at once (a WASIp2 instance
    /// serves one at a time whatever this says).
    #[serde(default = "one")]
    pub concurrency: Reuse,
    /// An instance idle this long is dropped.
    #[serde(default = "default_idle")]
    pub idle: Timeout,
    /// Instances alive at once (default: enough for `[limits] concurrency`
    /// requests, `concurrency` to an instance). Requests beyond what they
    /// take wait for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<Reuse>,
}

fn one() -> Reuse {
    Reuse(1)
}

fn default_idle() -> Timeout {
    Timeout(Duration::from_secs(1))
}

impl Default for Instances {
    fn default() -> Self {
        Instances {
            reuse: one(),
            concurrency: one(),
            idle: default_idle(),
            max: None,
        }
    }
}

/// A count of requests per instance: 1 to 10,000.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "u32")]
pub struct Reuse(pub u32);

/// Beyond this an instance would hold a guest's state for as long as
/// restarting the host: retire it and start afresh.
const MAX_REUSE: u32 = 10_000;

impl TryFrom<u32> for Reuse {
    type Error = String;

    fn try_from(n: u32) -> Result<Self, Self::Error> {
        if (1..=MAX_REUSE).contains(&n) {
            Ok(Reuse(n))
        } else {
            Err(format!("must be from 1 to {MAX_REUSE}, not {n}"))
        }
    }
}

/// Key-value stores the function may open, by label, and how much it may
/// keep. Nothing is granted by default: with no `stores`, every `open` is
/// `access-denied`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeyValue {
    #[serde(default)]
    pub stores: Vec<StoreLabel>,
    #[serde(default = "default_max_key_bytes")]
    pub max_key_bytes: ByteSize,
    #[serde(default = "default_max_value_bytes")]
    pub max_value_bytes: ByteSize,
    /// Keys per store.
    #[serde(default = "default_max_keys")]
    pub max_keys: u64,
    /// Bytes of keys and values per store.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: ByteSize,
    /// Operations per invocation (each key of a batch counts).
    #[serde(default = "default_max_ops")]
    pub max_ops: u64,
}

fn default_max_key_bytes() -> ByteSize {
    ByteSize(512)
}
fn default_max_value_bytes() -> ByteSize {
    ByteSize(1 << 20)
}
fn default_max_keys() -> u64 {
    10_000
}
fn default_max_bytes() -> ByteSize {
    ByteSize(64 << 20)
}
fn default_max_ops() -> u64 {
    1000
}

impl Default for KeyValue {
    fn default() -> Self {
        KeyValue {
            stores: Vec::new(),
            max_key_bytes: default_max_key_bytes(),
            max_value_bytes: default_max_value_bytes(),
            max_keys: default_max_keys(),
            max_bytes: default_max_bytes(),
            max_ops: default_max_ops(),
        }
    }
}

/// The largest key and value a policy may allow: a value crosses from the
/// guest in one call, and the replicated backend carries it in one message.
pub const MAX_KEY_BYTES: u64 = 1024;
pub const MAX_VALUE_BYTES: u64 = 16 << 20;

/// A store's label: 1 to 64 of `A-Z a-z 0-9 _ -`, so it names a store the
/// same way on every backend.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String")]
pub struct StoreLabel(pub String);

impl TryFrom<String> for StoreLabel {
    type Error = String;

    fn try_from(label: String) -> Result<Self, Self::Error> {
        let ok = (1..=64).contains(&label.len())
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok {
            Ok(StoreLabel(label))
        } else {
            Err(format!(
                "{label:?} is not a store label: 1 to 64 of A-Z, a-z, 0-9, '_' and '-'"
            ))
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Access {
    /// Anyone may invoke a public function; a private one needs the admin
    /// token or one of `tokens`.
    #[serde(default = "yes")]
    pub public: bool,
    /// Bearer tokens that may invoke this function: `sha256:` and the hex
    /// of a token's SHA-256 (a plain token is hashed when the policy is
    /// written through the API or loaded from its file).
    #[serde(default)]
    pub tokens: Vec<String>,
    /// Whether the guest sees the request's `Authorization` header. Off by
    /// default: a header meant for the host (the admin token sent to a name
    /// a function claims, a private function's token) is not the guest's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pass_authorization: bool,
}

fn yes() -> bool {
    true
}

impl Default for Access {
    fn default() -> Self {
        Access {
            public: true,
            tokens: Vec::new(),
            pass_authorization: false,
        }
    }
}

/// A size: a whole number of bytes, or with `KiB`, `MiB`, `GiB` (or `B`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "SizeOrNumber", into = "String")]
pub struct ByteSize(pub u64);

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeOrNumber {
    Number(u64),
    Text(String),
}

impl TryFrom<SizeOrNumber> for ByteSize {
    type Error = String;

    fn try_from(value: SizeOrNumber) -> Result<Self, Self::Error> {
        match value {
            SizeOrNumber::Number(n) => Ok(ByteSize(n)),
            SizeOrNumber::Text(text) => parse_size(&text).map(ByteSize),
        }
    }
}

fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let unit_size: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => {
            return Err(format!(
                "invalid size {text:?}: unknown unit {other:?} (use B, KiB, MiB or GiB)"
            ));
        }
    };
    let n: u64 = digits.parse().map_err(|_| {
        format!("invalid size {text:?}: expected a whole number and a unit, like \"64MiB\"")
    })?;
    n.checked_mul(unit_size)
        .ok_or_else(|| format!("invalid size {text:?}: too large"))
}

impl From<ByteSize> for String {
    fn from(size: ByteSize) -> String {
        size.to_string()
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if n >= size && n.is_multiple_of(size) {
                return write!(f, "{}{unit}", n / size);
            }
        }
        write!(f, "{n}B")
    }
}

/// A wall-clock deadline: `ms`, `s` or `m`, above zero and at most 15 minutes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct Timeout(pub Duration);

impl TryFrom<String> for Timeout {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        let duration = parse_duration(&text)?;
        if duration.is_zero() || duration > MAX_TIMEOUT {
            return Err(format!(
                "invalid duration {text:?}: must be above zero and at most 15m"
            ));
        }
        Ok(Timeout(duration))
    }
}

impl From<Timeout> for String {
    fn from(timeout: Timeout) -> String {
        let ms = timeout.0.as_millis();
        if ms.is_multiple_of(60_000) {
            format!("{}m", ms / 60_000)
        } else if ms.is_multiple_of(1000) {
            format!("{}s", ms / 1000)
        } else {
            format!("{ms}ms")
        }
    }
}

/// A duration as policies and the host's settings write it: a whole number
/// and `ms`, `s` or `m` (`"250ms"`, `"10s"`, `"2m"`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(split);
    let n: u64 = digits.parse().map_err(|_| {
        format!("invalid duration {text:?}: expected a whole number and a unit, like \"2s\"")
    })?;
    match unit.trim() {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
        other => Err(format!(
            "invalid duration {text:?}: unknown unit {other:?} (use ms, s or m)"
        )),
    }
}

/// Invocations in flight at once: at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "u32")]
pub struct Concurrency(pub u32);

impl TryFrom<u32> for Concurrency {
    type Error = String;

    fn try_from(n: u32) -> Result<Self, Self::Error> {
        if n == 0 {
            Err("concurrency must be at least 1".to_string())
        } else {
            Ok(Concurrency(n))
        }
    }
}

/// An environment variable name: letters, digits and `_`, not starting with
/// a digit.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(try_from = "String")]
pub struct EnvName(pub String);

impl TryFrom<String> for EnvName {
    type Error = String;

    fn try_from(name: String) -> Result<Self, Self::Error> {
        let valid = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if valid {
            Ok(EnvName(name))
        } else {
            Err(format!(
                "invalid environment variable name {name:?}: use letters, digits and '_'"
            ))
        }
    }
}

/// A `wasi:config` key: 1 to 128 of `A-Z a-z 0-9 _ . -`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(try_from = "String")]
pub struct ConfigKey(pub String);

impl TryFrom<String> for ConfigKey {
    type Error = String;

    fn try_from(key: String) -> Result<Self, Self::Error> {
        let valid = (1..=128).contains(&key.len())
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if valid {
            Ok(ConfigKey(key))
        } else {
            Err(format!(
                "{key:?} is not a config key: 1 to 128 of A-Z, a-z, 0-9, '_', '.' and '-'"
            ))
        }
    }
}

/// A `[config]` value: text the policy holds, or the name of a secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ConfigValue {
    Text(String),
    Secret { secret: SecretName },
}

/// The largest `[config]` text value, and the most keys a policy may set.
pub const MAX_CONFIG_VALUE_BYTES: usize = 64 << 10;
pub const MAX_CONFIG_KEYS: usize = 256;

impl<'de> Deserialize<'de> for ConfigValue {
    /// A string, or a table holding only `secret`; anything else is refused
    /// with what was expected (serde's untagged enums say only "did not
    /// match any variant").
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Expected;
        impl<'de> serde::de::Visitor<'de> for Expected {
            type Value = ConfigValue;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or { secret = \"NAME\" }")
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<ConfigValue, E> {
                if text.len() > MAX_CONFIG_VALUE_BYTES {
                    return Err(E::custom(format!(
                        "a config value is at most {} ({} given)",
                        ByteSize(MAX_CONFIG_VALUE_BYTES as u64),
                        ByteSize(text.len() as u64)
                    )));
                }
                Ok(ConfigValue::Text(text.to_string()))
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<ConfigValue, A::Error> {
                let mut secret = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key != "secret" || secret.is_some() {
                        return Err(serde::de::Error::custom(format!(
                            "unexpected {key:?}: a config table is {{ secret = \"NAME\" }}"
                        )));
                    }
                    secret = Some(map.next_value::<SecretName>()?);
                }
                secret
                    .map(|secret| ConfigValue::Secret { secret })
                    .ok_or_else(|| serde::de::Error::missing_field("secret"))
            }
        }
        deserializer.deserialize_any(Expected)
    }
}

/// A secret's name: 1 to 64 of `A-Z a-z 0-9 _ -` (it is a path segment of
/// the secrets API and a file name in the data directory).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(try_from = "String")]
pub struct SecretName(pub String);

impl TryFrom<String> for SecretName {
    type Error = String;

    fn try_from(name: String) -> Result<Self, Self::Error> {
        let valid = (1..=64).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if valid {
            Ok(SecretName(name))
        } else {
            Err(format!(
                "{name:?} is not a secret name: 1 to 64 of A-Z, a-z, 0-9, '_' and '-'"
            ))
        }
    }
}

/// Where a directory appears in the guest: absolute, without `..`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(try_from = "String")]
pub struct GuestPath(pub String);

impl TryFrom<String> for GuestPath {
    type Error = String;

    fn try_from(path: String) -> Result<Self, Self::Error> {
        let p = Path::new(&path);
        if !p.is_absolute() || p.components().any(|c| c == Component::ParentDir) {
            return Err(format!(
                "invalid guest path {path:?}: use an absolute path without '..', like \"/data\""
            ));
        }
        Ok(GuestPath(path))
    }
}

/// An allowed outbound destination: `scheme://host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostPattern {
    scheme: String,
    /// Lower case; `*` alone is any host, `*.example.com` any subdomain,
    /// `10.0.0.0/8` an address range.
    host: String,
    /// `None` is any port.
    port: Option<u16>,
    /// The range when `host` is one (`ADDRESS/PREFIX`).
    cidr: Option<(std::net::IpAddr, u8)>,
}

impl TryFrom<String> for HostPattern {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        let bad = |why: &str| {
            format!(
                "invalid outbound pattern {text:?}: {why} (like \"https://api.example.com\" or \"http://127.0.0.1:*\")"
            )
        };
        let (scheme, rest) = text.split_once("://").ok_or_else(|| bad("no scheme"))?;
        let scheme = scheme.to_ascii_lowercase();
        if scheme != "http" && scheme != "https" {
            return Err(bad("the scheme must be http or https"));
        }
        if rest.contains('@') || rest.contains('?') {
            return Err(bad("only scheme, host and port are allowed"));
        }
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, "*")) => (host, None),
            Some((host, port)) => (
                host,
                Some(
                    port.parse::<u16>()
                        .map_err(|_| bad("the port must be a number or *"))?,
                ),
            ),
            None => (rest, Some(if scheme == "https" { 443 } else { 80 })),
        };
        let host = host.to_ascii_lowercase();
        let cidr = match host.split_once('/') {
            None => None,
            Some((address, prefix)) => Some(parse_range(address, prefix).map_err(bad)?),
        };
        let wildcard_ok = host == "*"
            || !host.contains('*')
            || (host.starts_with("*.") && !host[2..].contains('*'));
        if host.is_empty() || !wildcard_ok {
            return Err(bad("'*' may only be the whole host or its first label"));
        }
        Ok(HostPattern {
            scheme,
            host,
            port,
            cidr,
        })
    }
}

impl From<HostPattern> for String {
    fn from(p: HostPattern) -> String {
        p.to_string()
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(port) => write!(f, "{}://{}:{port}", self.scheme, self.host),
            None => write!(f, "{}://{}:*", self.scheme, self.host),
        }
    }
}

/// An address literal (IPv6 in brackets or not) or a range as a range.
fn literal_range(host: &str) -> Option<ipnet::IpNet> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.parse::<ipnet::IpNet>()
        .ok()
        .map(|net| net.trunc())
        .or_else(|| {
            host.parse::<std::net::IpAddr>()
                .ok()
                .map(ipnet::IpNet::from)
        })
}

impl HostPattern {
    /// The host as written: a name, `*`, `*.domain`, an address or a range.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The addresses it names, when its host is an address or a range.
    pub fn range(&self) -> Option<ipnet::IpNet> {
        literal_range(&self.host)
    }

    /// Whether a request to `scheme://host:port` is allowed by this pattern.
    pub fn allows(&self, scheme: &str, host: &str, port: u16) -> bool {
        if !self.scheme.eq_ignore_ascii_case(scheme) || self.port.is_some_and(|p| p != port) {
            return false;
        }
        if self.cidr.is_some() {
            let literal = host.trim_start_matches('[').trim_end_matches(']');
            return literal
                .parse()
                .is_ok_and(|ip| self.allows_address(scheme, ip, port));
        }
        let host = host.to_ascii_lowercase();
        if self.host == "*" {
            return true;
        }
        match self.host.strip_prefix("*.") {
            Some(domain) => host
                .strip_suffix(domain)
                .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
            None => self.host == host,
        }
    }
}

impl HostPattern {
    /// Whether this pattern names `ip` itself: an address literal equal to
    /// it, or a range holding it. (A name, or `*`, names no address: an
    /// internal address is reached only when the policy says so.)
    pub fn allows_address(&self, scheme: &str, ip: std::net::IpAddr, port: u16) -> bool {
        if !self.scheme.eq_ignore_ascii_case(scheme) || self.port.is_some_and(|p| p != port) {
            return false;
        }
        match self.cidr {
            Some((range, prefix)) => in_range(ip, range, prefix),
            None => self
                .host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|literal| literal == ip),
        }
    }
}

/// An address range `ADDRESS/PREFIX` (IPv6 brackets allowed), or why not.
fn parse_range(address: &str, prefix: &str) -> Result<(std::net::IpAddr, u8), &'static str> {
    let address: std::net::IpAddr = address
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|_| "a range is ADDRESS/PREFIX, like 10.0.0.0/8")?;
    let max = if address.is_ipv4() { 32 } else { 128 };
    let prefix = prefix
        .parse::<u8>()
        .ok()
        .filter(|p| *p <= max)
        .ok_or("the prefix length of a range is 0 to 32 (IPv6: 128)")?;
    Ok((address, prefix))
}

fn in_range(ip: std::net::IpAddr, range: std::net::IpAddr, prefix: u8) -> bool {
    use std::net::IpAddr;
    match (ip, range) {
        (IpAddr::V4(ip), IpAddr::V4(range)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(ip) & mask == u32::from(range) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(range)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(ip) & mask == u128::from(range) & mask
        }
        _ => false,
    }
}

/// A destination of outbound TCP: `HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct TcpGrant {
    /// Lower case, without a trailing dot or IPv6 brackets.
    host: String,
    port: u16,
    /// An address, or a range, when the host is one.
    range: Option<(std::net::IpAddr, u8)>,
}

impl TryFrom<String> for TcpGrant {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        let bad = |why: &str| {
            format!(
                "invalid tcp destination {text:?}: {why} (like \"db.example.com:5432\", \"10.1.2.3:6379\" or \"10.0.0.0/8:5432\")"
            )
        };
        let (host, port) = text.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad("the port must be a number from 1 to 65535"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let range = match host.split_once('/') {
            Some((address, prefix)) => Some(parse_range(address, prefix).map_err(bad)?),
            None => match host.parse::<std::net::IpAddr>() {
                Ok(address) => Some((address, if address.is_ipv4() { 32 } else { 128 })),
                Err(_) => {
                    let label_ok = |label: &str| {
                        !label.is_empty()
                            && label.len() <= 63
                            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    };
                    if host.len() > 253 || !host.split('.').all(label_ok) {
                        return Err(bad(
                            "the host must be a name, an address or a range (no scheme, no wildcard)",
                        ));
                    }
                    None
                }
            },
        };
        Ok(TcpGrant { host, port, range })
    }
}

impl From<TcpGrant> for String {
    fn from(grant: TcpGrant) -> String {
        grant.to_string()
    }
}

impl fmt::Display for TcpGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl TcpGrant {
    /// The host as written: a name, an address or a range.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The addresses it names, when its host is an address or a range.
    pub fn range(&self) -> Option<ipnet::IpNet> {
        literal_range(&self.host)
    }

    /// The name it grants, if it grants a name (not an address).
    pub fn name(&self) -> Option<&str> {
        self.range.is_none().then_some(self.host.as_str())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether it names this address itself (an address or a range holding
    /// it) at this port. A name names no address: an internal address is
    /// reached only when the policy names it.
    pub fn names_address(&self, addr: std::net::SocketAddr) -> bool {
        self.port == addr.port()
            && self
                .range
                .is_some_and(|(range, prefix)| in_range(addr.ip().to_canonical(), range, prefix))
    }
}

/// A policy ready to enforce: values resolved, paths checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub memory: u64,
    pub timeout: Duration,
    pub concurrency: u32,
    pub queue: u32,
    pub request_body: u64,
    pub response_body: u64,
    pub env: Vec<(String, String)>,
    pub files: Vec<Preopen>,
    pub outbound: Vec<HostPattern>,
    /// Outbound connections a function's pool may hold open.
    pub outbound_connections: u32,
    /// Bounds connecting and the response head of an outbound request.
    pub outbound_timeout: Duration,
    /// Outbound TCP destinations.
    pub tcp: Vec<TcpGrant>,
    /// TCP connections one instance may open.
    pub tcp_connections: u32,
    /// TCP bytes (sent and received) one instance may move.
    pub tcp_bytes: u64,
    pub public: bool,
    /// The SHA-256 (hex) of each token that may invoke it.
    pub tokens: Vec<String>,
    /// Whether the guest sees `Authorization` (`[access] pass_authorization`).
    pub pass_authorization: bool,
    /// Requests one instance may serve in its life (1: no reuse).
    pub reuse: u32,
    /// Requests one p3 instance may serve at once.
    pub instance_concurrency: u32,
    /// How long an idle reused instance is kept.
    pub idle: Duration,
    /// Instances alive at once, if the policy caps them.
    pub max_instances: Option<u32>,
    /// Key-value stores granted, with their limits in bytes.
    pub keyvalue: KeyValueGrant,
    /// `[config]`: what `wasi:config/store` answers, by key.
    pub config: BTreeMap<String, ConfigValue>,
    /// `[[triggers.cron]]`, in the file's order (a trigger's index is its
    /// place here).
    pub cron: Vec<crate::triggers::CronTrigger>,
    /// `[[triggers.nats]]`, in the file's order.
    pub nats: Vec<crate::triggers::NatsTrigger>,
    /// `[http]`: the names it is reached at.
    pub http: Http,
    /// The file as parsed, shown by the admin API.
    pub source: PolicyFile,
    /// The file's text, as the cluster registry carries it.
    pub text: String,
}

/// `[keyvalue]`, resolved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyValueGrant {
    pub stores: Vec<String>,
    pub max_key_bytes: u64,
    pub max_value_bytes: u64,
    pub max_keys: u64,
    pub max_bytes: u64,
    pub max_ops: u64,
}

impl KeyValueGrant {
    /// Whether the function may open any store.
    pub fn grants_any(&self) -> bool {
        !self.stores.is_empty()
    }
}

/// A read-only directory granted to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preopen {
    pub guest: String,
    pub host: PathBuf,
}

impl Default for Policy {
    fn default() -> Self {
        Policy::resolve(PolicyFile::default(), Path::new("."))
            .unwrap_or_else(|_| unreachable!("the default policy grants no files to resolve"))
    }
}

impl Policy {
    /// Parses and checks a policy. `file` names it in errors; `base` is what
    /// relative host paths are relative to.
    pub fn parse(text: &str, file: &str, base: &Path) -> Result<Policy, PolicyError> {
        let parsed: PolicyFile = toml::from_str(text).map_err(|e| PolicyError {
            file: file.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let mut policy = Policy::resolve(parsed, base).map_err(|message| PolicyError {
            file: file.to_string(),
            message,
        })?;
        policy.text = text.to_string();
        Ok(policy)
    }

    fn resolve(source: PolicyFile, base: &Path) -> Result<Policy, String> {
        let limits = &source.limits;
        if limits.memory.0 > MAX_MEMORY {
            return Err(format!(
                "limits.memory = {} is above the host's maximum of {}",
                limits.memory,
                ByteSize(MAX_MEMORY)
            ));
        }
        let kv = &source.keyvalue;
        if kv.max_key_bytes.0 > MAX_KEY_BYTES {
            return Err(format!(
                "keyvalue.max_key_bytes = {} is above the host's maximum of {MAX_KEY_BYTES}",
                kv.max_key_bytes
            ));
        }
        if kv.max_value_bytes.0 > MAX_VALUE_BYTES {
            return Err(format!(
                "keyvalue.max_value_bytes = {} is above the host's maximum of {}",
                kv.max_value_bytes,
                ByteSize(MAX_VALUE_BYTES)
            ));
        }
        if source.config.len() > MAX_CONFIG_KEYS {
            return Err(format!(
                "[config] sets {} keys, above the host's maximum of {MAX_CONFIG_KEYS}",
                source.config.len()
            ));
        }
        crate::triggers::check(&source.triggers)?;
        source.http.check()?;
        let mut files = Vec::new();
        for (guest, host) in &source.files {
            let resolved = resolve_host_dir(base, host)
                .map_err(|why| format!("files.{:?} = {host:?}: {why}", guest.0))?;
            files.push(Preopen {
                guest: guest.0.clone(),
                host: resolved,
            });
        }
        Ok(Policy {
            memory: limits.memory.0,
            timeout: limits.timeout.0,
            concurrency: limits.concurrency.0,
            queue: limits.queue,
            request_body: limits.request_body.0,
            response_body: limits.response_body.0,
            env: source
                .env
                .iter()
                .map(|(k, v)| (k.0.clone(), v.clone()))
                .collect(),
            files,
            outbound: source.outbound.allow.clone(),
            outbound_connections: source.outbound.max_connections.0,
            outbound_timeout: source.outbound.timeout.0,
            tcp: source.outbound.tcp.clone(),
            tcp_connections: source.outbound.max_tcp_connections.0,
            tcp_bytes: source.outbound.max_tcp_bytes.0,
            public: source.access.public,
            tokens: source
                .access
                .tokens
                .iter()
                .map(|entry| access_token_hash(entry))
                .collect(),
            pass_authorization: source.access.pass_authorization,
            reuse: source.instances.reuse.0,
            instance_concurrency: source.instances.concurrency.0,
            idle: source.instances.idle.0,
            max_instances: source.instances.max.map(|max| max.0),
            keyvalue: KeyValueGrant {
                stores: kv.stores.iter().map(|s| s.0.clone()).collect(),
                max_key_bytes: kv.max_key_bytes.0,
                max_value_bytes: kv.max_value_bytes.0,
                max_keys: kv.max_keys,
                max_bytes: kv.max_bytes.0,
                max_ops: kv.max_ops,
            },
            config: source
                .config
                .iter()
                .map(|(key, value)| (key.0.clone(), value.clone()))
                .collect(),
            cron: source.triggers.cron.clone(),
            nats: source.triggers.nats.clone(),
            http: source.http.clone(),
            source,
            text: String::new(),
        })
    }

    /// Whether `[config]` names the secret `name`.
    pub fn names_secret(&self, name: &str) -> bool {
        self.config
            .values()
            .any(|value| matches!(value, ConfigValue::Secret { secret } if secret.0 == name))
    }

    /// Whether this policy opts in to reusing instances.
    pub fn reuses_instances(&self) -> bool {
        self.reuse > 1 || self.instance_concurrency > 1
    }

    /// Instances a reusing function keeps alive at once, each taking
    /// `per_instance` requests: the policy's `max`, or as many as its
    /// concurrency needs.
    pub fn max_instances(&self, per_instance: u32) -> u32 {
        self.max_instances
            .unwrap_or_else(|| self.concurrency.div_ceil(per_instance.max(1)))
            .max(1)
    }

    /// Whether the guest may send a request to this destination.
    pub fn allows_outbound(&self, scheme: &str, host: &str, port: u16) -> bool {
        self.outbound.iter().any(|p| p.allows(scheme, host, port))
    }

    /// Whether the guest may look up `name` (a TCP grant names it).
    pub fn grants_tcp_name(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.');
        self.tcp
            .iter()
            .any(|grant| grant.name().is_some_and(|n| n.eq_ignore_ascii_case(name)))
    }

    /// Whether a pattern names this internal address (see
    /// [`HostPattern::allows_address`]).
    pub fn allows_address(&self, scheme: &str, ip: std::net::IpAddr, port: u16) -> bool {
        self.outbound
            .iter()
            .any(|p| p.allows_address(scheme, ip, port))
    }
}

/// Resolves a `[files]` host path and refuses one that escapes: `..`
/// anywhere, or a symbolic link on the way.
fn resolve_host_dir(base: &Path, host: &str) -> Result<PathBuf, String> {
    let path = Path::new(host);
    if path.components().any(|c| c == Component::ParentDir) {
        return Err("'..' is not allowed in host paths".to_string());
    }
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    };
    let lexical: PathBuf = joined
        .components()
        .filter(|c| *c != Component::CurDir)
        .collect();
    let lexical = if lexical.is_absolute() {
        lexical
    } else {
        std::env::current_dir()
            .map_err(|e| format!("cannot resolve: {e}"))?
            .join(lexical)
    };
    let canonical = lexical
        .canonicalize()
        .map_err(|e| format!("cannot open {}: {e}", lexical.display()))?;
    if canonical != lexical {
        return Err(format!(
            "{} passes through a symbolic link (to {}); name the real directory",
            lexical.display(),
            canonical.display()
        ));
    }
    if !canonical.is_dir() {
        return Err(format!("{} is not a directory", canonical.display()));
    }
    Ok(canonical)
}

/// A policy file that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {message}")]
pub struct PolicyError {
    pub file: String,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_parse_with_units() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1 KiB"), Ok(1024));
        assert_eq!(parse_size("12"), Ok(12));
        assert!(parse_size("64MB").is_err());
        assert!(parse_size("MiB").is_err());
        assert_eq!(
            Timeout::try_from("250ms".to_string()),
            Ok(Timeout(Duration::from_millis(250)))
        );
        assert_eq!(
            Timeout::try_from("2m".to_string()),
            Ok(Timeout(Duration::from_secs(120)))
        );
        assert!(Timeout::try_from("0s".to_string()).is_err());
        assert!(Timeout::try_from("1h".to_string()).is_err());
        assert_eq!(ByteSize(64 << 20).to_string(), "64MiB");
        assert_eq!(String::from(Timeout(Duration::from_millis(1500))), "1500ms");
    }

    #[test]
    fn host_patterns_match_scheme_host_and_port() {
        let p = |s: &str| HostPattern::try_from(s.to_string()).unwrap();
        assert!(p("http://127.0.0.1:*").allows("http", "127.0.0.1", 9000));
        assert!(!p("http://127.0.0.1:*").allows("https", "127.0.0.1", 9000));
        assert!(p("https://api.example.com").allows("https", "API.example.com", 443));
        assert!(!p("https://api.example.com").allows("https", "api.example.com", 8443));
        assert!(p("https://*.example.com").allows("https", "a.b.example.com", 443));
        assert!(!p("https://*.example.com").allows("https", "example.com", 443));
        assert!(!p("https://*.example.com").allows("https", "evilexample.com", 443));
        assert!(p("http://*:8080").allows("http", "anything", 8080));
        for bad in [
            "api.example.com",
            "ftp://x",
            "http://a/b",
            "http://a*b.com",
            "http://x:port",
            "http://u@x",
        ] {
            assert!(HostPattern::try_from(bad.to_string()).is_err(), "{bad}");
        }
    }

    #[test]
    fn internal_addresses_are_named_by_literals_and_ranges_only() {
        let p = |s: &str| HostPattern::try_from(s.to_string()).unwrap();
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert!(p("http://127.0.0.1:*").allows_address("http", ip("127.0.0.1"), 80));
        assert!(!p("http://127.0.0.1:*").allows_address("http", ip("127.0.0.2"), 80));
        assert!(p("http://10.0.0.0/8:*").allows_address("http", ip("10.9.8.7"), 1));
        assert!(!p("http://10.0.0.0/8:*").allows_address("http", ip("11.0.0.1"), 1));
        assert!(!p("http://10.0.0.0/8:443").allows_address("http", ip("10.0.0.1"), 80));
        assert!(p("http://10.0.0.0/8:*").allows("http", "10.1.1.1", 80));
        assert!(!p("http://10.0.0.0/8:*").allows("http", "internal.example", 80));
        assert!(p("http://[fd00::]/8:*").allows_address("http", ip("fd12::1"), 80));
        assert!(p("http://[::1]:*").allows_address("http", ip("::1"), 80));
        assert!(p("http://0.0.0.0/0:*").allows_address("http", ip("169.254.169.254"), 80));
        // A name, or `*`, names no address.
        assert!(!p("http://*:*").allows_address("http", ip("127.0.0.1"), 80));
        assert!(!p("http://localhost:*").allows_address("http", ip("127.0.0.1"), 80));
        for bad in [
            "http://10.0.0.0/33:*",
            "http://10.0.0.0/x:*",
            "http://foo/8:*",
        ] {
            assert!(HostPattern::try_from(bad.to_string()).is_err(), "{bad}");
        }
    }

    #[test]
    fn tcp_grants_name_a_host_or_addresses_and_one_port() {
        let policy = Policy::parse(
            "[outbound]\ntcp = [\"DB.example.com.:5432\", \"127.0.0.1:6379\", \"10.0.0.0/8:5432\", \"[::1]:7000\"]\n",
            "t.toml",
            Path::new("."),
        )
        .unwrap();
        assert_eq!(policy.tcp_connections, 16);
        assert_eq!(policy.tcp_bytes, 64 << 20);
        let grants: Vec<String> = policy.tcp.iter().map(ToString::to_string).collect();
        assert_eq!(
            grants,
            [
                "db.example.com:5432",
                "127.0.0.1:6379",
                "10.0.0.0/8:5432",
                "[::1]:7000"
            ]
        );
        assert!(policy.grants_tcp_name("db.example.com"));
        assert!(policy.grants_tcp_name("Db.Example.Com."));
        assert!(!policy.grants_tcp_name("example.com"));
        assert!(!policy.grants_tcp_name("127.0.0.1"));
        let addr = |text: &str| text.parse::<std::net::SocketAddr>().unwrap();
        let names = |a: &str| policy.tcp.iter().any(|g| g.names_address(addr(a)));
        assert!(names("127.0.0.1:6379"));
        assert!(!names("127.0.0.1:6380"));
        assert!(names("10.9.8.7:5432"));
        assert!(!names("11.0.0.1:5432"));
        assert!(names("[::1]:7000"));
        assert!(names("[::ffff:127.0.0.1]:6379"));
        // A name grant names no address, not even the one it resolves to.
        assert!(!policy.tcp[0].names_address(addr("93.184.216.34:5432")));
        for bad in [
            "db.example.com",
            "db.example.com:0",
            "db.example.com:x",
            "tcp://db.example.com:5432",
            "*.example.com:5432",
            "10.0.0.0/40:5432",
            ":5432",
        ] {
            assert!(TcpGrant::try_from(bad.to_string()).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_empty_file_is_the_default_policy() {
        let policy = Policy::parse("", "x.toml", Path::new(".")).unwrap();
        assert_eq!(policy, Policy::default());
        assert_eq!(policy.memory, defaults::MEMORY);
        assert!(policy.env.is_empty() && policy.files.is_empty() && policy.outbound.is_empty());
        assert!(policy.public);
    }

    #[test]
    fn a_misspelled_key_is_rejected_rather_than_ignored() {
        let err =
            Policy::parse("[limits]\nmemroy = \"1MiB\"\n", "f.toml", Path::new(".")).unwrap_err();
        assert!(err.to_string().starts_with("f.toml: "), "{err}");
        assert!(err.message.contains("memroy"), "{err}");
    }

    #[test]
    fn host_paths_cannot_escape() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(base.join("data/ok")).unwrap();
        std::os::unix::fs::symlink("/etc", base.join("data/link")).unwrap();
        let policy =
            |host: &str| Policy::parse(&format!("[files]\n\"/d\" = {host:?}\n"), "p.toml", &base);
        assert_eq!(
            policy("data/ok").unwrap().files[0].host,
            base.join("data/ok")
        );
        assert!(
            policy("data/ok/../ok")
                .unwrap_err()
                .message
                .contains("'..'")
        );
        assert!(
            policy("data/link")
                .unwrap_err()
                .message
                .contains("symbolic link")
        );
        assert!(
            policy("data/missing")
                .unwrap_err()
                .message
                .contains("cannot open")
        );
    }

    #[test]
    fn access_tokens_are_kept_as_hashes_with_the_file_as_written() {
        let text = "# team a\n[access]\npublic = false # private\ntokens = [\"s3cret\", # the CI\n  \"sha256:ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef0123456789\"]\n";
        let hashed = hash_access_tokens(text).unwrap();
        assert!(!hashed.contains("s3cret"), "{hashed}");
        assert!(
            hashed.contains("# team a") && hashed.contains("# the CI"),
            "{hashed}"
        );
        assert!(hashed.contains(&format!("sha256:{}", access_token_hash("s3cret"))));
        // Once hashed, nothing is left to hash.
        assert_eq!(hash_access_tokens(&hashed), None);
        let inline = "access = { public = false, tokens = [\"t\"] }\n";
        assert!(!hash_access_tokens(inline).unwrap().contains("\"t\""));
        assert_eq!(hash_access_tokens("[limits]\nqueue = 1\n"), None);
        let policy = Policy::parse(&hashed, "t.toml", Path::new("/")).unwrap();
        assert_eq!(policy.tokens[0], access_token_hash("s3cret"));
        assert_eq!(
            policy.tokens[1],
            "abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789"
        );
    }

    #[test]
    fn a_redacted_policy_shows_no_credential() {
        let file: PolicyFile = toml::from_str(
            "[env]\nKEY = \"v1\"\n[config]\na = \"v2\"\nb = { secret = \"pg\" }\n[access]\ntokens = [\"v3\"]\n",
        )
        .unwrap();
        let shown = toml::to_string(&file.redacted()).unwrap();
        for value in ["v1", "v2", "v3"] {
            assert!(!shown.contains(value), "{shown}");
        }
        assert!(shown.contains("pg"), "{shown}");
    }
}
