//! Settings and secrets: what the function's policy sets in `[config]`.
//!
//! ```toml
//! [config]
//! greeting = "hello"
//! api_key = { secret = "motd-api-key" }   # set with `lichen secret set`
//! ```
//!
//! Read through the standard `wasi:config/store` interface (`0.2.0-rc.1`,
//! which `wasmtime serve -S config` and wasmCloud offer too), so the
//! component runs unmodified on those hosts. A key the policy does not set
//! is `None`; a secret's value is its current one, so a changed secret is
//! seen by the next request.
//!
//! ```
//! use lichen_sdk::{Request, Response, Result, config};
//!
//! fn handle(_req: Request) -> Result<Response> {
//!     let greeting = config::get("greeting")?.unwrap_or_else(|| "hi".to_string());
//!     Ok(Response::text(greeting))
//! }
//! # fn main() {
//! #     config::set_for_test("greeting", "hello");
//! #     let res = handle(Request::builder().build()).unwrap();
//! #     assert_eq!(res.body(), b"hello");
//! # }
//! ```
//!
//! Built for a native target (the unit tests of a function), the values
//! are a map per thread that [`set_for_test`] fills.

use std::fmt;

/// The host could not give a value (a secret it does not hold, say).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(pub String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "config: {}", self.0)
    }
}

impl std::error::Error for Error {}

/// The value of `key`, if the policy sets it.
pub fn get(key: &str) -> Result<Option<String>, Error> {
    imp::get(key)
}

/// Every key the policy sets, with its value.
pub fn get_all() -> Result<Vec<(String, String)>, Error> {
    imp::get_all()
}

/// The value of `key`, or a `500` saying the policy does not set it.
pub fn require(key: &str) -> crate::Result<String> {
    get(key)?.ok_or_else(|| {
        crate::Error::new(
            500,
            format!("config key {key:?} is not set (add it to the policy's [config])"),
        )
    })
}

#[cfg(target_arch = "wasm32")]
mod imp {
    use super::Error;

    mod bindings {
        wit_bindgen::generate!({
            path: "../host/wit/config-0.2.0-rc.1",
            world: "imports",
        });
    }

    use bindings::wasi::config::store;

    impl From<store::Error> for Error {
        fn from(error: store::Error) -> Self {
            match error {
                store::Error::Upstream(message) | store::Error::Io(message) => Error(message),
            }
        }
    }

    pub fn get(key: &str) -> Result<Option<String>, Error> {
        Ok(store::get(key)?)
    }

    pub fn get_all() -> Result<Vec<(String, String)>, Error> {
        Ok(store::get_all()?)
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod imp {
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    use super::Error;

    thread_local! {
        pub static VALUES: RefCell<BTreeMap<String, String>> = const { RefCell::new(BTreeMap::new()) };
    }

    pub fn get(key: &str) -> Result<Option<String>, Error> {
        Ok(VALUES.with(|values| values.borrow().get(key).cloned()))
    }

    pub fn get_all() -> Result<Vec<(String, String)>, Error> {
        Ok(VALUES.with(|values| {
            let values = values.borrow();
            values.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        }))
    }
}

/// Sets `key` for this thread's [`get`]s, in a native build (a function's
/// unit tests).
#[cfg(not(target_arch = "wasm32"))]
pub fn set_for_test(key: &str, value: &str) {
    imp::VALUES.with(|values| {
        values
            .borrow_mut()
            .insert(key.to_string(), value.to_string());
    });
}
