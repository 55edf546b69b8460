//! The cluster secret and what is derived from it.
//!
//! Everything between hosts is authenticated with keys derived from one
//! shared secret (HKDF-SHA256):
//! - the **gossip key** seals every gossip datagram (ChaCha20-Poly1305): a
//!   process without the secret can neither read a datagram nor make one a
//!   host accepts; each carries its sender's session and counter, and a host
//!   takes each (session, counter) once ([`ReplayGuard`]);
//! - the **request key** signs every internal HTTP request (HMAC-SHA256
//!   over method, path and query, a timestamp, a nonce and, when known
//!   before sending, the body's SHA-256); a host takes a signature within
//!   [`REQUEST_WINDOW`] of its clock, once ([`NonceCache`]);
//! - the **value key** wraps the one-time key each secret value published
//!   in gossip is sealed under ([`Keyring::seal_value`]), so a value is
//!   never plain in a chitchat message, even to code that sees messages
//!   after the datagram is opened (logs, dumps of the gossip state);
//! - the **key id** (4 bytes) names which secret sealed or signed, so a host
//!   holding two during a rotation ([`Keyring`]) knows which to check with.
//!
//! Gossip values themselves carry no MAC: every byte of every value travels
//! inside a sealed datagram, and a MAC keyed by the same secret would prove
//! nothing more (any holder of the secret could make it for any node).

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use ring::{aead, hkdf, hmac, rand};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The first bytes of every sealed datagram.
const MAGIC: &[u8; 4] = b"LCG1";
/// Magic, key id, session, counter, sending time.
pub const HEADER_LEN: usize = 4 + 4 + 8 + 4 + 8;
/// Header and tag: what sealing adds to a datagram.
pub const OVERHEAD: usize = HEADER_LEN + 16;

/// How far a datagram's sending time may be from the receiver's clock.
/// Wide, so hosts whose clocks disagree by minutes still gossip (the
/// (session, counter) check is what refuses a replay); it bounds how long a
/// captured datagram could be replayed into a host that restarted since.
pub const GOSSIP_WINDOW: Duration = Duration::from_secs(300);
/// How far a signed request's timestamp may be from the receiver's clock
/// (the sender writes it in the receiver's time, by the clock offset gossip
/// measures).
pub const REQUEST_WINDOW: Duration = Duration::from_secs(30);
/// Sessions a host remembers (one per sending process; only datagrams that
/// authenticate make one).
const MAX_SESSIONS: usize = 4096;
/// Counters below a session's highest that are still told apart.
const WINDOW_BITS: u32 = 128;

/// Which of a host's secrets: the one it sends under, or the one it still
/// accepts during a rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Which {
    Current,
    Previous,
}

/// One cluster secret's keys.
pub struct Secret {
    id: [u8; 4],
    gossip: aead::LessSafeKey,
    request: hmac::Key,
    values: aead::LessSafeKey,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({})", hex::encode(self.id))
    }
}

/// HKDF output lengths that are not a ring algorithm.
pub struct Len(pub usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

impl Secret {
    /// A secret shorter than 16 bytes is refused: it would be guessable.
    pub fn new(secret: &str) -> anyhow::Result<Self> {
        if secret.len() < 16 {
            anyhow::bail!("the cluster secret must be at least 16 characters");
        }
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"lichen cluster secret v2")
            .extract(secret.as_bytes());
        let expand = |info: &[u8], len: usize| -> anyhow::Result<Vec<u8>> {
            let mut out = vec![0; len];
            let info = [info];
            prk.expand(&info, Len(len))
                .and_then(|okm| okm.fill(&mut out))
                .map_err(|_| anyhow::anyhow!("deriving a cluster key"))?;
            Ok(out)
        };
        let id: [u8; 4] = expand(b"key id", 4)?
            .try_into()
            .map_err(|_| anyhow::anyhow!("deriving the key id"))?;
        let gossip = aead::UnboundKey::new(&aead::CHACHA20_POLY1305, &expand(b"gossip", 32)?)
            .map_err(|_| anyhow::anyhow!("deriving the gossip key"))?;
        let request = hmac::Key::new(hmac::HMAC_SHA256, &expand(b"peer requests", 32)?);
        let values = aead::UnboundKey::new(&aead::AES_256_GCM, &expand(b"secret values", 32)?)
            .map_err(|_| anyhow::anyhow!("deriving the value key"))?;
        Ok(Secret {
            id,
            gossip: aead::LessSafeKey::new(gossip),
            request,
            values: aead::LessSafeKey::new(values),
        })
    }

    /// The key id, as hex.
    pub fn id(&self) -> String {
        hex::encode(self.id)
    }
}

/// The secrets a host holds: it sends under the current one and accepts
/// both (`--cluster-secret` and `--cluster-secret-previous`).
#[derive(Debug)]
pub struct Keyring {
    current: Secret,
    previous: Option<Secret>,
}

impl Keyring {
    pub fn new(current: Secret, previous: Option<Secret>) -> Self {
        let previous = previous.filter(|p| p.id != current.id);
        Keyring { current, previous }
    }

    pub fn get(&self, which: Which) -> &Secret {
        match (which, &self.previous) {
            (Which::Previous, Some(previous)) => previous,
            _ => &self.current,
        }
    }

    pub fn has_previous(&self) -> bool {
        self.previous.is_some()
    }

    /// The ids (hex) of the secrets this keyring holds.
    pub fn ids(&self) -> Vec<String> {
        std::iter::once(&self.current)
            .chain(self.previous.as_ref())
            .map(Secret::id)
            .collect()
    }

    /// Seals `plaintext` for every secret this keyring holds: under a
    /// fresh random key (AES-256-GCM), itself sealed under each secret's
    /// value key, so a host holding either secret of a rotation opens it.
    /// `aad` binds it to where it belongs (a name and a version): moved
    /// anywhere else it does not open.
    pub fn seal_value(&self, aad: &[u8], plaintext: &[u8]) -> anyhow::Result<SealedValue> {
        let rng = rand::SystemRandom::new();
        let data_key: [u8; 32] = random(&rng)?;
        // The data key seals one value only, so a zero nonce is unique.
        let mut data = plaintext.to_vec();
        aead::LessSafeKey::new(
            aead::UnboundKey::new(&aead::AES_256_GCM, &data_key)
                .map_err(|_| anyhow::anyhow!("making a value key"))?,
        )
        .seal_in_place_append_tag(
            aead::Nonce::assume_unique_for_key([0; aead::NONCE_LEN]),
            aead::Aad::from(aad),
            &mut data,
        )
        .map_err(|_| anyhow::anyhow!("sealing a value"))?;
        let mut keys = Vec::new();
        for secret in std::iter::once(&self.current).chain(&self.previous) {
            let nonce: [u8; aead::NONCE_LEN] = random(&rng)?;
            let mut wrapped = data_key.to_vec();
            secret
                .values
                .seal_in_place_append_tag(
                    aead::Nonce::assume_unique_for_key(nonce),
                    aead::Aad::from(aad),
                    &mut wrapped,
                )
                .map_err(|_| anyhow::anyhow!("sealing a value key"))?;
            keys.push((secret.id, [&nonce[..], &wrapped].concat()));
        }
        Ok(SealedValue { data, keys })
    }

    /// Opens what [`Keyring::seal_value`] sealed with the same `aad`;
    /// `None` if no secret here opens it (sealed only under secrets this
    /// host does not hold, altered, or moved).
    pub fn open_value(&self, aad: &[u8], sealed: &SealedValue) -> Option<Vec<u8>> {
        let data_key = sealed.keys.iter().find_map(|(id, wrapped)| {
            let (_, secret) = self.find(id)?;
            let (nonce, wrapped) = wrapped.split_at_checked(aead::NONCE_LEN)?;
            let nonce = aead::Nonce::try_assume_unique_for_key(nonce).ok()?;
            let mut wrapped = wrapped.to_vec();
            let key = secret
                .values
                .open_in_place(nonce, aead::Aad::from(aad), &mut wrapped)
                .ok()?;
            <[u8; 32]>::try_from(&*key).ok()
        })?;
        let key = aead::UnboundKey::new(&aead::AES_256_GCM, &data_key).ok()?;
        let mut data = sealed.data.clone();
        let plain = aead::LessSafeKey::new(key)
            .open_in_place(
                aead::Nonce::assume_unique_for_key([0; aead::NONCE_LEN]),
                aead::Aad::from(aad),
                &mut data,
            )
            .ok()?;
        Some(plain.to_vec())
    }

    fn find(&self, id: &[u8]) -> Option<(Which, &Secret)> {
        if bool::from(id.ct_eq(&self.current.id)) {
            return Some((Which::Current, &self.current));
        }
        let previous = self.previous.as_ref()?;
        bool::from(id.ct_eq(&previous.id)).then_some((Which::Previous, previous))
    }
}

/// A value sealed by [`Keyring::seal_value`]: the value under a one-time
/// key, and that key sealed under each secret (by key id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedValue {
    /// Ciphertext and tag.
    pub data: Vec<u8>,
    /// Key id, and nonce, sealed one-time key and tag.
    pub keys: Vec<([u8; 4], Vec<u8>)>,
}

/// Why a datagram was dropped (the `reason` label of
/// `lichen_gossip_rejected_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// Too short, or not a sealed datagram at all.
    Malformed,
    /// Sealed under a secret this host does not hold.
    UnknownKey,
    /// Its tag does not check: altered, or made without the secret.
    Forged,
    /// Its (session, counter) was taken already.
    Replayed,
    /// Sent further from this host's clock than [`GOSSIP_WINDOW`].
    Stale,
}

impl Rejected {
    pub fn reason(self) -> &'static str {
        match self {
            Rejected::Malformed => "malformed",
            Rejected::UnknownKey => "unknown_key",
            Rejected::Forged => "forged",
            Rejected::Replayed => "replayed",
            Rejected::Stale => "stale",
        }
    }
}

/// A sending socket's session: a random id and a counter, which together
/// are each datagram's nonce (never the same twice under one key).
pub struct Session {
    id: [u8; 8],
    counter: u32,
    rng: rand::SystemRandom,
}

impl Session {
    pub fn new() -> anyhow::Result<Self> {
        let rng = rand::SystemRandom::new();
        Ok(Session {
            id: random(&rng)?,
            counter: 0,
            rng,
        })
    }

    /// The next nonce's (session, counter); a new session when the
    /// counter would wrap.
    fn next(&mut self) -> anyhow::Result<([u8; 8], u32)> {
        if self.counter == u32::MAX {
            self.id = random(&self.rng)?;
            self.counter = 0;
        }
        self.counter += 1;
        Ok((self.id, self.counter))
    }
}

fn random<const N: usize>(rng: &rand::SystemRandom) -> anyhow::Result<[u8; N]> {
    let mut out = [0; N];
    rand::SecureRandom::fill(rng, &mut out).map_err(|_| anyhow::anyhow!("no randomness"))?;
    Ok(out)
}

/// Seals `plaintext` (a chitchat message) under `secret` into `out`.
pub fn seal_datagram(
    secret: &Secret,
    session: &mut Session,
    now_ms: u64,
    plaintext: &[u8],
    out: &mut Vec<u8>,
) -> anyhow::Result<()> {
    let (id, counter) = session.next()?;
    out.clear();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&secret.id);
    out.extend_from_slice(&id);
    out.extend_from_slice(&counter.to_be_bytes());
    out.extend_from_slice(&now_ms.to_be_bytes());
    out.extend_from_slice(plaintext);
    let (header, body) = out.split_at_mut(HEADER_LEN);
    let tag = secret
        .gossip
        .seal_in_place_separate_tag(
            nonce(&id, counter),
            aead::Aad::from(&header[..]),
            &mut body[..],
        )
        .map_err(|_| anyhow::anyhow!("sealing a datagram"))?;
    out.extend_from_slice(tag.as_ref());
    Ok(())
}

fn nonce(session: &[u8; 8], counter: u32) -> aead::Nonce {
    let mut bytes = [0; 12];
    bytes[..8].copy_from_slice(session);
    bytes[8..].copy_from_slice(&counter.to_be_bytes());
    aead::Nonce::assume_unique_for_key(bytes)
}

/// An opened datagram: its message, and which secret sealed it.
pub struct Opened<'a> {
    pub plaintext: &'a [u8],
    pub which: Which,
}

/// Opens a datagram in place: authenticated, within [`GOSSIP_WINDOW`] of
/// `now_ms`, and not taken before (then it is taken).
pub fn open_datagram<'a>(
    keyring: &Keyring,
    guard: &mut ReplayGuard,
    now_ms: u64,
    datagram: &'a mut [u8],
) -> Result<Opened<'a>, Rejected> {
    if datagram.len() < OVERHEAD || &datagram[..4] != MAGIC {
        return Err(Rejected::Malformed);
    }
    let (which, secret) = keyring.find(&datagram[4..8]).ok_or(Rejected::UnknownKey)?;
    let (header, body) = datagram.split_at_mut(HEADER_LEN);
    let session: [u8; 8] = header[8..16].try_into().map_err(|_| Rejected::Malformed)?;
    let counter = u32::from_be_bytes(header[16..20].try_into().map_err(|_| Rejected::Malformed)?);
    let sent_ms = u64::from_be_bytes(header[20..28].try_into().map_err(|_| Rejected::Malformed)?);
    let plaintext = secret
        .gossip
        .open_in_place(nonce(&session, counter), aead::Aad::from(&header[..]), body)
        .map_err(|_| Rejected::Forged)?;
    if now_ms.abs_diff(sent_ms) > GOSSIP_WINDOW.as_millis() as u64 {
        return Err(Rejected::Stale);
    }
    guard.take(u64::from_be_bytes(session), counter, now_ms)?;
    Ok(Opened { plaintext, which })
}

/// Which (session, counter) pairs a host has taken: per session, the
/// highest counter and which of the [`WINDOW_BITS`] below it. A counter
/// further below is refused too (gossip is not reordered that much).
#[derive(Default)]
pub struct ReplayGuard {
    sessions: HashMap<u64, Window>,
}

struct Window {
    highest: u32,
    /// Bit `i`: counter `highest - i` taken.
    seen: u128,
    last_ms: u64,
}

impl ReplayGuard {
    fn take(&mut self, session: u64, counter: u32, now_ms: u64) -> Result<(), Rejected> {
        if !self.sessions.contains_key(&session) && self.sessions.len() >= MAX_SESSIONS {
            self.forget_idle(now_ms);
        }
        let window = self.sessions.entry(session).or_insert(Window {
            highest: 0,
            seen: 0,
            last_ms: now_ms,
        });
        window.last_ms = now_ms;
        if counter > window.highest {
            let shift = counter - window.highest;
            window.seen = if shift >= WINDOW_BITS {
                0
            } else {
                window.seen << shift
            };
            window.seen |= 1;
            window.highest = counter;
            return Ok(());
        }
        let back = window.highest - counter;
        if back >= WINDOW_BITS || window.seen & (1 << back) != 0 {
            return Err(Rejected::Replayed);
        }
        window.seen |= 1 << back;
        Ok(())
    }

    /// Drops sessions not heard from for twice the window: any datagram of
    /// theirs is stale by now. If none is that old, the longest idle goes.
    fn forget_idle(&mut self, now_ms: u64) {
        let horizon = 2 * GOSSIP_WINDOW.as_millis() as u64;
        self.sessions
            .retain(|_, w| now_ms.saturating_sub(w.last_ms) < horizon);
        if self.sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = self
                .sessions
                .iter()
                .min_by_key(|(_, w)| w.last_ms)
                .map(|(id, _)| *id)
        {
            self.sessions.remove(&oldest);
        }
    }
}

/// The header of a signed internal request.
pub const SIGNATURE_HEADER: &str = "x-lichen-peer-signature";

/// Why a peer request was refused (each is its own `401` code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// No signature header.
    Missing,
    /// Malformed, under an unknown secret, or not matching the request.
    Invalid,
    /// Its timestamp is outside [`REQUEST_WINDOW`].
    Expired,
    /// Its nonce was taken already.
    Replayed,
    /// The body is not the one signed.
    BodyMismatch,
    /// A body came under a signature that names none (`body=-`): a
    /// capture could carry any body, so none is taken.
    BodyUnsigned,
    /// More signatures within the window than the host keeps (`503`, not
    /// `401`: the request may be good).
    Busy,
    /// Under mutual TLS, the connection presented no peer certificate.
    CertificateMissing,
}

impl Refused {
    pub fn code(self) -> &'static str {
        match self {
            Refused::Missing => "peer_signature_missing",
            Refused::Invalid => "peer_signature_invalid",
            Refused::Expired => "peer_request_expired",
            Refused::Replayed => "peer_request_replayed",
            Refused::BodyMismatch => "peer_body_mismatch",
            Refused::BodyUnsigned => "peer_body_unsigned",
            Refused::Busy => "busy",
            Refused::CertificateMissing => "peer_certificate_required",
        }
    }

    pub fn message(self) -> String {
        match self {
            Refused::Missing => {
                format!("internal requests need an `{SIGNATURE_HEADER}` header")
            }
            Refused::Invalid => "the peer signature does not check out here".to_string(),
            Refused::Expired => format!(
                "the peer signature is more than {} s from this host's clock",
                REQUEST_WINDOW.as_secs()
            ),
            Refused::Replayed => "this peer request was received before".to_string(),
            Refused::BodyMismatch => "the request body is not the one signed".to_string(),
            Refused::BodyUnsigned => {
                "the request has a body but its signature names none (body=-)".to_string()
            }
            Refused::Busy => {
                "this host holds as many peer signatures as it keeps; try another".to_string()
            }
            Refused::CertificateMissing => "this host takes peer requests only over mutual TLS, \
                 from a client presenting a certificate of the cluster's CA"
                .to_string(),
        }
    }
}

/// A signature that checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    /// The SHA-256 of the body the sender signed, if it knew it.
    pub body: Option<[u8; 32]>,
    nonce: [u8; 16],
    ts_ms: u64,
}

/// The SHA-256 of a body, as signatures name it.
pub fn body_digest(body: &[u8]) -> [u8; 32] {
    Sha256::digest(body).into()
}

/// The signature header of a request: `key=<id> ts=<unix ms> nonce=<hex>
/// body=<sha256 hex, or - for no body> sig=<hex>`. `ts_ms` is the
/// receiver's time. The signature covers the method, the target, the
/// receiver's node id (a capture is no good at another host) and
/// `headers`, the request's [`canonical_headers`] (a capture is no good
/// with a header changed, added or removed).
#[allow(clippy::too_many_arguments)]
pub fn sign_request(
    secret: &Secret,
    method: &str,
    target: &str,
    receiver: &str,
    headers: &str,
    body: Option<&[u8; 32]>,
    ts_ms: u64,
) -> anyhow::Result<String> {
    let nonce: [u8; 16] = random(&rand::SystemRandom::new())?;
    let body = body.map_or_else(|| "-".to_string(), hex::encode);
    let nonce = hex::encode(nonce);
    let text = signed_text(method, target, receiver, headers, ts_ms, &nonce, &body);
    let sig = hmac::sign(&secret.request, text.as_bytes());
    Ok(format!(
        "key={} ts={ts_ms} nonce={nonce} body={body} sig={}",
        secret.id(),
        hex::encode(sig.as_ref())
    ))
}

fn signed_text(
    method: &str,
    target: &str,
    receiver: &str,
    headers: &str,
    ts_ms: u64,
    nonce: &str,
    body: &str,
) -> String {
    format!(
        "lichen peer request v2\n{receiver}\n{method}\n{target}\n{ts_ms}\n{nonce}\n{body}\n{headers}"
    )
}

/// Whether a header changes what a peer request means, so a signature
/// covers it: the host it names, the body's type, the trace context, and
/// every `x-lichen-*` header but the signature itself.
pub fn is_signed_header(name: &str) -> bool {
    matches!(name, "host" | "content-type" | "traceparent" | "tracestate")
        || (name.starts_with("x-lichen-") && name != SIGNATURE_HEADER)
}

/// The headers a signature covers, as one text: each [`is_signed_header`]
/// by name in order, `name:value` a line, several values of one name in
/// the order sent. Both ends compute it from the headers on the wire.
pub fn canonical_headers(headers: &http::HeaderMap) -> String {
    let mut names: Vec<&str> = headers
        .keys()
        .map(http::HeaderName::as_str)
        .filter(|name| is_signed_header(name))
        .collect();
    names.sort_unstable();
    names.dedup();
    let mut text = String::new();
    for name in names {
        for value in headers.get_all(name) {
            text.push_str(name);
            text.push(':');
            // Bytes that are not text are hex after `=` instead of `:`, so
            // no value can forge a line break or pass for another.
            match value.to_str() {
                Ok(value) => text.push_str(value),
                Err(_) => {
                    text.pop();
                    text.push('=');
                    text.push_str(&hex::encode(value.as_bytes()));
                }
            }
            text.push('\n');
        }
    }
    text
}

/// Checks a signature header against the request's method and target (path
/// and query), this host's node id (`receiver`), the request's
/// [`canonical_headers`] and the time. The nonce is not taken here: see
/// [`NonceCache::take`].
pub fn verify_request(
    keyring: &Keyring,
    method: &str,
    target: &str,
    (receiver, headers): (&str, &str),
    header: Option<&str>,
    now_ms: u64,
) -> Result<Signed, Refused> {
    let header = header.ok_or(Refused::Missing)?;
    let mut fields: HashMap<&str, &str> = HashMap::new();
    for field in header.split(' ') {
        let (name, value) = field.split_once('=').ok_or(Refused::Invalid)?;
        fields.insert(name, value);
    }
    let field = |name: &str| fields.get(name).copied().ok_or(Refused::Invalid);
    let id = hex::decode(field("key")?).map_err(|_| Refused::Invalid)?;
    let (_, secret) = keyring.find(&id).ok_or(Refused::Invalid)?;
    let ts_text = field("ts")?;
    let ts_ms: u64 = ts_text.parse().map_err(|_| Refused::Invalid)?;
    let nonce_text = field("nonce")?;
    let nonce: [u8; 16] = hex::decode(nonce_text)
        .ok()
        .and_then(|n| n.try_into().ok())
        .ok_or(Refused::Invalid)?;
    let body_text = field("body")?;
    let body = match body_text {
        "-" => None,
        digest => Some(
            hex::decode(digest)
                .ok()
                .and_then(|d| <[u8; 32]>::try_from(d).ok())
                .ok_or(Refused::Invalid)?,
        ),
    };
    let sig = hex::decode(field("sig")?).map_err(|_| Refused::Invalid)?;
    // The text as signed: the fields as sent, so a canonical form is not
    // needed (any change to one fails the check).
    let text = signed_text(
        method, target, receiver, headers, ts_ms, nonce_text, body_text,
    );
    if ts_text != ts_ms.to_string() {
        return Err(Refused::Invalid);
    }
    hmac::verify(&secret.request, text.as_bytes(), &sig).map_err(|_| Refused::Invalid)?;
    if now_ms.abs_diff(ts_ms) > REQUEST_WINDOW.as_millis() as u64 {
        return Err(Refused::Expired);
    }
    Ok(Signed { body, nonce, ts_ms })
}

/// Whether `body` is the one a signature names (a signature without a
/// digest names none, and any body goes).
pub fn check_body(signed: &Signed, body: &[u8]) -> Result<(), Refused> {
    match &signed.body {
        Some(digest) if !bool::from(digest.ct_eq(&body_digest(body))) => Err(Refused::BodyMismatch),
        _ => Ok(()),
    }
}

/// Nonces of signatures taken, each kept until its timestamp leaves the
/// window (then the timestamp refuses it).
pub struct NonceCache {
    seen: HashMap<[u8; 16], u64>,
    expiries: VecDeque<(u64, [u8; 16])>,
    capacity: usize,
}

/// Taking a nonce failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    Replayed,
    /// More signatures within the window than the cache holds: refused
    /// rather than forgetting one that could then be replayed.
    Full,
}

impl NonceCache {
    pub fn new(capacity: usize) -> Self {
        NonceCache {
            seen: HashMap::new(),
            expiries: VecDeque::new(),
            capacity,
        }
    }

    pub fn take(&mut self, signed: &Signed, now_ms: u64) -> Result<(), Take> {
        while let Some((expiry, nonce)) = self.expiries.front().copied() {
            if expiry > now_ms {
                break;
            }
            self.expiries.pop_front();
            if self.seen.get(&nonce) == Some(&expiry) {
                self.seen.remove(&nonce);
            }
        }
        if self.seen.contains_key(&signed.nonce) {
            return Err(Take::Replayed);
        }
        if self.seen.len() >= self.capacity {
            return Err(Take::Full);
        }
        // Kept past the latest time its timestamp is accepted; expiries
        // are pushed in arrival order, so the queue is swept by time with
        // a margin of one window.
        let expiry = signed.ts_ms.max(now_ms) + REQUEST_WINDOW.as_millis() as u64;
        self.seen.insert(signed.nonce, expiry);
        self.expiries.push_back((expiry, signed.nonce));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The receiver's node id, and the headers of a JSON request.
    const TO: &str = "b";
    const JSON: &str = "content-type:application/json\n";

    fn secret(text: &str) -> Secret {
        Secret::new(text).unwrap()
    }

    #[test]
    fn canonical_headers_cover_what_changes_meaning_in_one_order() {
        let mut headers = http::HeaderMap::new();
        headers.insert("x-lichen-module", "ab".parse().unwrap());
        headers.insert("content-type", "application/json".parse().unwrap());
        headers.insert("accept", "*/*".parse().unwrap());
        headers.insert(SIGNATURE_HEADER, "key=1".parse().unwrap());
        headers.append("traceparent", "00-a".parse().unwrap());
        headers.insert("host", "b:8080".parse().unwrap());
        assert_eq!(
            canonical_headers(&headers),
            "content-type:application/json\nhost:b:8080\ntraceparent:00-a\nx-lichen-module:ab\n"
        );
    }

    fn ring(current: &str, previous: Option<&str>) -> Keyring {
        Keyring::new(secret(current), previous.map(secret))
    }

    const NOW: u64 = 1_800_000_000_000;

    #[test]
    fn a_sealed_value_opens_with_either_secret_of_a_rotation_and_nowhere_else() {
        let rotating = ring("the next cluster secret", Some("the first cluster secret"));
        let sealed = rotating.seal_value(b"pg 7", b"hunter2").unwrap();
        assert!(!sealed.data.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(sealed.keys.len(), 2);
        for holder in [
            &rotating,
            &ring("the first cluster secret", None),
            &ring("the next cluster secret", None),
        ] {
            assert_eq!(
                holder.open_value(b"pg 7", &sealed).as_deref(),
                Some(&b"hunter2"[..])
            );
        }
        assert_eq!(
            ring("another cluster secret", None).open_value(b"pg 7", &sealed),
            None
        );
        // Moved to another name or version, or altered: it does not open.
        assert_eq!(rotating.open_value(b"pg 8", &sealed), None);
        let mut altered = sealed.clone();
        altered.data[0] ^= 1;
        assert_eq!(rotating.open_value(b"pg 7", &altered), None);
        let mut truncated = sealed.clone();
        truncated.keys[0].1.truncate(5);
        truncated.keys[1].1.clear();
        assert_eq!(rotating.open_value(b"pg 7", &truncated), None);
        // Each sealing takes a fresh key.
        assert_ne!(
            rotating.seal_value(b"pg 7", b"hunter2").unwrap().data,
            sealed.data
        );
    }

    fn sealed(secret: &Secret, session: &mut Session, message: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        seal_datagram(secret, session, NOW, message, &mut out).unwrap();
        out
    }

    #[test]
    fn a_sealed_datagram_opens_once_under_the_same_secret() {
        let keyring = ring("correct horse battery staple", None);
        let mut session = Session::new().unwrap();
        let datagram = sealed(keyring.get(Which::Current), &mut session, b"syn");
        assert_eq!(datagram.len(), 3 + OVERHEAD);
        assert!(!datagram.windows(3).any(|w| w == b"syn"), "encrypted");
        let mut guard = ReplayGuard::default();
        let mut copy = datagram.clone();
        let opened = open_datagram(&keyring, &mut guard, NOW, &mut copy).unwrap();
        assert_eq!(opened.plaintext, b"syn");
        assert_eq!(opened.which, Which::Current);
        let mut again = datagram.clone();
        assert_eq!(
            open_datagram(&keyring, &mut guard, NOW + 1, &mut again).err(),
            Some(Rejected::Replayed)
        );
        let other = ring("another secret, as long", None);
        let mut copy = datagram.clone();
        assert_eq!(
            open_datagram(&other, &mut ReplayGuard::default(), NOW, &mut copy).err(),
            Some(Rejected::UnknownKey)
        );
    }

    #[test]
    fn any_flipped_bit_or_a_stale_time_is_refused() {
        let keyring = ring("correct horse battery staple", None);
        let mut session = Session::new().unwrap();
        let datagram = sealed(keyring.get(Which::Current), &mut session, b"a message");
        for bit in 0..datagram.len() * 8 {
            let mut flipped = datagram.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            let refused = open_datagram(&keyring, &mut ReplayGuard::default(), NOW, &mut flipped);
            assert!(refused.is_err(), "bit {bit}");
        }
        let late = NOW + GOSSIP_WINDOW.as_millis() as u64 + 1;
        let mut copy = datagram.clone();
        assert_eq!(
            open_datagram(&keyring, &mut ReplayGuard::default(), late, &mut copy).err(),
            Some(Rejected::Stale)
        );
        let mut short = datagram[..OVERHEAD - 1].to_vec();
        assert_eq!(
            open_datagram(&keyring, &mut ReplayGuard::default(), NOW, &mut short).err(),
            Some(Rejected::Malformed)
        );
    }

    #[test]
    fn counters_out_of_order_are_taken_once_within_the_window() {
        let mut guard = ReplayGuard::default();
        assert_eq!(guard.take(7, 5, NOW), Ok(()));
        assert_eq!(guard.take(7, 3, NOW), Ok(()));
        assert_eq!(guard.take(7, 3, NOW), Err(Rejected::Replayed));
        assert_eq!(guard.take(7, 5, NOW), Err(Rejected::Replayed));
        assert_eq!(guard.take(7, 300, NOW), Ok(()));
        assert_eq!(
            guard.take(7, 300 - WINDOW_BITS, NOW),
            Err(Rejected::Replayed)
        );
        assert_eq!(guard.take(7, 299, NOW), Ok(()));
        assert_eq!(guard.take(8, 5, NOW), Ok(()), "another session");
    }

    #[test]
    fn a_host_accepts_its_previous_secret_and_names_which() {
        let old = ring("the old secret, long enough", None);
        let rotating = ring(
            "the new secret, long enough",
            Some("the old secret, long enough"),
        );
        let mut session = Session::new().unwrap();
        let mut datagram = sealed(old.get(Which::Current), &mut session, b"x");
        let opened =
            open_datagram(&rotating, &mut ReplayGuard::default(), NOW, &mut datagram).unwrap();
        assert_eq!(opened.which, Which::Previous);
        let header = sign_request(old.get(Which::Current), "GET", "/a", TO, "", None, NOW).unwrap();
        assert!(verify_request(&rotating, "GET", "/a", (TO, ""), Some(&header), NOW).is_ok());
        let new_only = ring("the new secret, long enough", None);
        assert_eq!(
            verify_request(&new_only, "GET", "/a", (TO, ""), Some(&header), NOW),
            Err(Refused::Invalid)
        );
    }

    #[test]
    fn a_signature_covers_method_target_time_and_body() {
        let keyring = ring("correct horse battery staple", None);
        let digest = body_digest(b"[1,2]");
        let header = sign_request(
            keyring.get(Which::Current),
            "POST",
            "/fn/f/x?y=1",
            TO,
            "content-type:application/json\n",
            Some(&digest),
            NOW,
        )
        .unwrap();
        let signed = verify_request(
            &keyring,
            "POST",
            "/fn/f/x?y=1",
            (TO, JSON),
            Some(&header),
            NOW,
        )
        .unwrap();
        assert_eq!(check_body(&signed, b"[1,2]"), Ok(()));
        assert_eq!(check_body(&signed, b"[1,3]"), Err(Refused::BodyMismatch));
        for (method, target) in [
            ("PUT", "/fn/f/x?y=1"),
            ("POST", "/fn/g/x?y=1"),
            ("POST", "/fn/f/x"),
        ] {
            assert_eq!(
                verify_request(&keyring, method, target, (TO, JSON), Some(&header), NOW),
                Err(Refused::Invalid)
            );
        }
        let window = REQUEST_WINDOW.as_millis() as u64;
        assert!(
            verify_request(
                &keyring,
                "POST",
                "/fn/f/x?y=1",
                (TO, JSON),
                Some(&header),
                NOW + window
            )
            .is_ok()
        );
        assert_eq!(
            verify_request(
                &keyring,
                "POST",
                "/fn/f/x?y=1",
                (TO, JSON),
                Some(&header),
                NOW + window + 1
            ),
            Err(Refused::Expired)
        );
        // Another receiver, or a header changed, added or removed: no good.
        for bound in [
            ("c", JSON),
            (TO, "content-type:text/plain\n"),
            (
                TO,
                "content-type:application/json\nx-lichen-host:evil.test\n",
            ),
            (TO, ""),
        ] {
            assert_eq!(
                verify_request(&keyring, "POST", "/fn/f/x?y=1", bound, Some(&header), NOW),
                Err(Refused::Invalid),
                "{bound:?}"
            );
        }
        let forged = header.replace(&format!("ts={NOW}"), &format!("ts={}", NOW + 1));
        assert_eq!(
            verify_request(
                &keyring,
                "POST",
                "/fn/f/x?y=1",
                (TO, JSON),
                Some(&forged),
                NOW
            ),
            Err(Refused::Invalid)
        );
        assert_eq!(
            verify_request(&keyring, "POST", "/fn/f/x?y=1", (TO, JSON), None, NOW),
            Err(Refused::Missing)
        );
        assert_eq!(
            verify_request(
                &keyring,
                "POST",
                "/fn/f/x?y=1",
                (TO, JSON),
                Some("junk"),
                NOW
            ),
            Err(Refused::Invalid)
        );
    }

    #[test]
    fn a_nonce_is_taken_once_and_forgotten_after_the_window() {
        let keyring = ring("correct horse battery staple", None);
        let header =
            sign_request(keyring.get(Which::Current), "GET", "/", TO, "", None, NOW).unwrap();
        let signed = verify_request(&keyring, "GET", "/", (TO, ""), Some(&header), NOW).unwrap();
        let mut cache = NonceCache::new(2);
        assert_eq!(cache.take(&signed, NOW), Ok(()));
        assert_eq!(cache.take(&signed, NOW + 1000), Err(Take::Replayed));
        let later = NOW + 2 * REQUEST_WINDOW.as_millis() as u64;
        assert_eq!(
            cache.take(&signed, later),
            Ok(()),
            "only the window refuses it now"
        );
        for _ in 0..2 {
            let header =
                sign_request(keyring.get(Which::Current), "GET", "/", TO, "", None, later).unwrap();
            let signed =
                verify_request(&keyring, "GET", "/", (TO, ""), Some(&header), later).unwrap();
            let _ = cache.take(&signed, later);
        }
        let header =
            sign_request(keyring.get(Which::Current), "GET", "/", TO, "", None, later).unwrap();
        let signed = verify_request(&keyring, "GET", "/", (TO, ""), Some(&header), later).unwrap();
        assert_eq!(cache.take(&signed, later), Err(Take::Full));
    }
}
