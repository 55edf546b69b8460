//! What authenticating the cluster plane costs (`lichen_core::seal`), in
//! process, against what the host did before in the same run:
//! - a gossip datagram sealed by its sender and opened (and checked against
//!   replay) by its receiver, against the per-value HMAC-SHA256 the values
//!   carried before (each of a datagram's values MACed by its publisher and
//!   checked by its reader; a value of about 120 bytes);
//! - an internal request signed by its sender and verified, its nonce taken,
//!   by its receiver, against the constant-time comparison of the static
//!   token it replaces.

use std::hint::black_box;
use std::time::{Duration, Instant};

use lichen_core::seal::{self, Keyring, NonceCache, ReplayGuard, Secret, Session, Which};
use ring::hmac;
use subtle::ConstantTimeEq;

/// Operations timed together; the figure is the batch's time over them.
const BATCH: usize = 200;
/// The bytes of one gossip value as hosts publish them: a key, a version
/// and a value (a function's record is larger, a module's smaller).
const VALUE_BYTES: usize = 120;

pub struct Row {
    pub what: String,
    pub before: Duration,
    pub now: Duration,
}

const SECRET: &str = "a benchmark cluster secret, long enough";

fn per_op(batches: usize, mut op: impl FnMut()) -> Duration {
    let mut times: Vec<Duration> = (0..batches)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..BATCH {
                op();
            }
            started.elapsed() / BATCH as u32
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

/// Gossip datagrams of these sizes, and one signed request.
pub fn measure(batches: usize) -> anyhow::Result<Vec<Row>> {
    let keyring = Keyring::new(Secret::new(SECRET)?, None);
    let mac_key = hmac::Key::new(hmac::HMAC_SHA256, SECRET.as_bytes());
    let mut rows = Vec::new();
    for size in [512usize, 1_400, 16_384, 65_000] {
        let plain = vec![0x5au8; size];
        let mut session = Session::new()?;
        let mut guard = ReplayGuard::default();
        let mut sealed = Vec::with_capacity(size + seal::OVERHEAD);
        let mut now_ms = 1_800_000_000_000;
        let now = per_op(batches, || {
            seal::seal_datagram(
                keyring.get(Which::Current),
                &mut session,
                now_ms,
                &plain,
                &mut sealed,
            )
            .unwrap_or_else(|e| panic!("sealing: {e}"));
            let opened = seal::open_datagram(&keyring, &mut guard, now_ms, &mut sealed);
            assert!(opened.is_ok(), "a sealed datagram opens");
            now_ms += 1;
        });
        let before = per_op(batches, || {
            for value in plain.chunks(VALUE_BYTES) {
                // Published once, read once: a MAC made, a MAC checked.
                let tag = hmac::sign(&mac_key, black_box(value));
                let checked = hmac::verify(&mac_key, value, tag.as_ref());
                assert!(checked.is_ok());
            }
        });
        rows.push(Row {
            what: format!("gossip datagram, {size} bytes"),
            before,
            now,
        });
    }
    let token = hex_token(&mac_key);
    let mut nonces = NonceCache::new(1_000_000);
    let mut now_ms = 1_800_000_000_000;
    let target = "/fn/square/?x=1";
    let body = seal::body_digest(b"[1, 2, 3]");
    // What a forward's signature covers besides the request line.
    let mut headers = http::HeaderMap::new();
    for (name, value) in [
        ("host", "10.0.0.2:8080"),
        ("content-type", "application/json"),
        ("x-lichen-forwarded-by", "a"),
        (
            "x-lichen-module",
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ),
    ] {
        headers.insert(name, http::HeaderValue::from_static(value));
    }
    let now = per_op(batches, || {
        let canonical = seal::canonical_headers(&headers);
        let header = seal::sign_request(
            keyring.get(Which::Current),
            "POST",
            target,
            "b",
            &canonical,
            Some(&body),
            now_ms,
        )
        .unwrap_or_else(|e| panic!("signing: {e}"));
        let canonical = seal::canonical_headers(&headers);
        let signed = seal::verify_request(
            &keyring,
            "POST",
            target,
            ("b", &canonical),
            Some(&header),
            now_ms,
        )
        .unwrap_or_else(|e| panic!("verifying: {e:?}"));
        assert!(nonces.take(&signed, now_ms).is_ok());
        now_ms += 1;
    });
    let before = per_op(batches, || {
        let presented = black_box(token.as_bytes());
        assert!(bool::from(presented.ct_eq(token.as_bytes())));
    });
    rows.push(Row {
        what: "peer request (a forward, a map item, a module fetch)".to_string(),
        before,
        now,
    });
    Ok(rows)
}

fn hex_token(key: &hmac::Key) -> String {
    hmac::sign(key, b"lichen internal http v1")
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
