//! The upload validator, fuzzed: component bytes in, a verdict out (a
//! function ready to serve, or an `UploadError` the API answers `422` with),
//! never a panic or an abort.
//!
//! The validator is wasmtime's parser and compiler plus this host's checks
//! (`Runtime::compile`, `Runtime::prepare`), so it is fuzzed here, in the
//! test build that already has the engine, rather than by cargo-fuzz in
//! `fuzz/`, which would build wasmtime a second time with coverage
//! instrumentation (minutes on two cores, for coverage of code wasmtime's own
//! fuzzers cover). Mutations are random but reproducible: the seed is
//! printed, and `UPLOAD_FUZZ_SEED` replays a run; `UPLOAD_FUZZ_SECONDS`
//! (default 20) bounds it. An input that fails is written to
//! `target/upload-fuzz/` for a regression test.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use lichen::engine::{EngineSettings, Runtime, UploadError};
use lichen::names::FunctionName;
use lichen::store::VersionInfo;

/// The real components the fuzzer starts from: both ABIs, with and without
/// key-value imports.
const SEEDS: &[&str] = &[
    "hello",
    "hello-p3",
    "raw-wasi",
    "kv-draft",
    "kv-draft-p3",
    "cancel-p3",
];

/// xorshift64*: small, and the same sequence for the same seed everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One mutation of `bytes`, of the kinds that reach different parts of a
/// parser: bit flips, boundary bytes (LEB128 lengths and counts), cuts,
/// inserted junk, a chunk repeated elsewhere.
fn mutate(rng: &mut Rng, bytes: &mut Vec<u8>) {
    let len = bytes.len();
    match rng.below(6) {
        0 => {
            let i = rng.below(len);
            bytes[i] ^= 1 << rng.below(8);
        }
        1 => {
            let i = rng.below(len);
            bytes[i] = [0x00, 0x01, 0x7f, 0x80, 0xff][rng.below(5)];
        }
        2 => bytes.truncate(8 + rng.below(len.saturating_sub(8))),
        3 => {
            let i = rng.below(len);
            let junk: Vec<u8> = (0..1 + rng.below(16)).map(|_| rng.next() as u8).collect();
            bytes.splice(i..i, junk);
        }
        4 => {
            let from = rng.below(len);
            let to = (from + 1 + rng.below(64)).min(len);
            let chunk = bytes[from..to].to_vec();
            let at = rng.below(len);
            bytes.splice(at..at, chunk);
        }
        _ => {
            // A run of bytes set to one value: wipes a section header.
            let i = rng.below(len);
            let end = (i + 1 + rng.below(8)).min(len);
            let value = rng.next() as u8;
            bytes[i..end].fill(value);
        }
    }
}

fn version() -> VersionInfo {
    VersionInfo {
        version: 1,
        sha256: String::new(),
        size: 0,
        created_unix: 0,
        abi: Default::default(),
        oci: None,
    }
}

/// The validator's verdict on `bytes`: what deploy runs before it stores
/// anything.
fn verdict(runtime: &Runtime, bytes: &[u8]) -> Result<(), UploadError> {
    let component = runtime.compile(bytes)?;
    let name = FunctionName::new("fuzzed").unwrap();
    runtime.prepare(name, version(), &component).map(|_| ())
}

#[test]
fn mutated_components_get_a_verdict_never_a_panic() {
    let seconds: u64 = std::env::var("UPLOAD_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("UPLOAD_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("upload fuzz: seed {seed} (UPLOAD_FUZZ_SEED={seed} replays), {seconds}s");
    let runtime = Runtime::new(EngineSettings { pooling: false }).unwrap();
    let seeds: Vec<Vec<u8>> = SEEDS.iter().map(|name| common::component(name)).collect();
    for (name, bytes) in SEEDS.iter().zip(&seeds) {
        assert!(verdict(&runtime, bytes).is_ok(), "seed {name} is refused");
    }

    let mut rng = Rng(seed);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let (mut inputs, mut accepted) = (0u64, 0u64);
    while Instant::now() < deadline {
        let mut bytes = seeds[rng.below(seeds.len())].clone();
        for _ in 0..1 + rng.below(4) {
            mutate(&mut rng, &mut bytes);
        }
        inputs += 1;
        match std::panic::catch_unwind(AssertUnwindSafe(|| verdict(&runtime, &bytes))) {
            Ok(Ok(())) => accepted += 1,
            Ok(Err(error)) => {
                // Every refusal says why, as the API will.
                assert!(!error.to_string().is_empty());
            }
            Err(_) => {
                let dir = common::repo_root().join("target/upload-fuzz");
                std::fs::create_dir_all(&dir).unwrap();
                let path = dir.join(format!("panic-{seed}-{inputs}.wasm"));
                std::fs::write(&path, &bytes).unwrap();
                panic!("the validator panicked on {}", path.display());
            }
        }
    }
    eprintln!("upload fuzz: {inputs} inputs, {accepted} accepted, no panic");
    assert!(inputs > 0);
}

/// WebAssembly whose runtime support this build leaves out (the `gc` and
/// `threads` cargo features; wasmtime 48.0.8's GHSA-rc4p-x33f-vpr2 and
/// GHSA-2674-w29h-wqvj are aborts in exactly such builds) is refused by
/// validation at upload, before any of its code is compiled or run.
#[test]
fn features_this_build_leaves_out_are_refused_at_upload() {
    let runtime = Runtime::new(EngineSettings { pooling: false }).unwrap();
    let cases = [
        ("gc types", "(type (struct (field i32)))"),
        (
            "a gc instruction",
            "(func (result i31ref) i32.const 1 ref.i31)",
        ),
        ("exceptions", "(tag)"),
        ("a shared memory", "(memory 1 1 shared)"),
        (
            "an atomic wait",
            "(memory 1) (func (result i32) i32.const 0 i32.const 0 i64.const 0 memory.atomic.wait32)",
        ),
    ];
    for (what, fields) in cases {
        let component = format!("(component (core module {fields}))");
        let bytes = wat::parse_str(&component).unwrap();
        match verdict(&runtime, &bytes) {
            Err(UploadError::Invalid(why)) => eprintln!("{what}: {why}"),
            other => panic!("{what}: expected a refusal at validation, got {other:?}"),
        }
    }
}
