//! Map request bodies: any bytes in, the items of a JSON array (at most
//! `MAX_ITEMS`) or an error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lichen_core::map::{MAX_ITEMS, parse_items};

fuzz_target!(|data: &[u8]| {
    if let Ok(items) = parse_items(data) {
        assert!(items.len() <= MAX_ITEMS);
        // Each item is sent on as an invocation's body: it serialises.
        for item in &items {
            serde_json::to_vec(item).expect("a parsed item serialises");
        }
    }
});
