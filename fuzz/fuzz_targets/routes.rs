//! The route table and function names: any method and path in, one route
//! (with its parameters), a 405 with the methods that would do, or a 404.
#![no_main]

use http::Method;
use libfuzzer_sys::fuzz_target;
use lichen_core::names::FunctionName;
use lichen_core::routes::{Lookup, lookup};

const METHODS: [Method; 6] = [
    Method::GET,
    Method::PUT,
    Method::POST,
    Method::DELETE,
    Method::PATCH,
    Method::HEAD,
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, path)) = data.split_first() else {
        return;
    };
    let Ok(path) = std::str::from_utf8(path) else {
        return;
    };
    let method = &METHODS[usize::from(pick) % METHODS.len()];
    match lookup(method, path) {
        Lookup::Found(route, params) => {
            assert!(route.method.as_ref().is_none_or(|m| m == method));
            assert_eq!(route.matches(path), Some(params));
            // Every handler names its function by the first parameter.
            if let Ok(name) = FunctionName::new(params.get(0)) {
                assert_eq!(name.as_str(), params.get(0));
                assert!(name.as_str().len() <= 63);
            }
        }
        Lookup::MethodNotAllowed(allowed) => {
            assert!(!allowed.is_empty());
            assert!(!allowed.contains(&method));
        }
        Lookup::NotFound => {}
    }
});
