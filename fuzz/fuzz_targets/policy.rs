//! Policy files: any text in, a policy or an error naming the file out.
//! A policy that parses also survives being written back: the admin API
//! shows `source`, and what it shows must mean the same policy.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use lichen_core::policy::{Policy, PolicyFile};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Relative `[files]` paths resolve under a directory that does not
    // exist, so the target never depends on what this machine's disk holds
    // beyond absolute paths.
    let Ok(policy) = Policy::parse(text, "fuzz.toml", Path::new("/nonexistent/lichen-fuzz")) else {
        return;
    };
    let written = toml::to_string(&policy.source).expect("a parsed policy serialises");
    let reread: PolicyFile = toml::from_str(&written)
        .unwrap_or_else(|e| panic!("the policy written back does not parse: {e}\n{written}"));
    assert_eq!(reread, policy.source, "written back as:\n{written}");
});
