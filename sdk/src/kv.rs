//! Key-value stores: state that outlives a request.
//!
//! A function opens a store by the label its policy grants
//! (`[keyvalue] stores = ["default"]`); its data is its own, never shared
//! with another function. Built on the standard `wasi:keyvalue` interface
//! (`0.2.0-draft2`), so the component also runs on other hosts that offer it.
//!
//! ```
//! use lichen_sdk::kv::Store;
//! use lichen_sdk::{Request, Response, Result};
//!
//! fn handle(req: Request) -> Result<Response> {
//!     let store = Store::open("default")?;
//!     let visits = store.increment(&format!("visits:{}", req.path()), 1)?;
//!     Ok(Response::json(&serde_json::json!({ "visits": visits }))?)
//! }
//! # fn main() {
//! #     let res = handle(Request::builder().uri("/a").build()).unwrap();
//! #     assert_eq!(res.body(), br#"{"visits":1}"#);
//! #     let res = handle(Request::builder().uri("/a").build()).unwrap();
//! #     assert_eq!(res.body(), br#"{"visits":2}"#);
//! # }
//! ```
//!
//! Every call can fail: the store may not be granted (`AccessDenied`), a
//! policy limit may refuse it (the message names the limit), or the host's
//! shared store may be unreachable. With `?` in a handler such a failure
//! becomes a `500` with the message.
//!
//! Built for a native target (the unit tests of a function), a store is a
//! map in memory, one per thread, which every label opens: handlers can be
//! tested without a host, as above.

use std::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// How many times [`Store::update`] tries before giving up on a key that
/// keeps changing under it.
pub const UPDATE_ATTEMPTS: usize = 16;

/// Why a store operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The host has no store by that name.
    NoSuchStore,
    /// The function's policy does not grant the store.
    AccessDenied,
    /// Anything else, said by the host: a limit, an unreachable store...
    Other(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NoSuchStore => f.write_str("no such key-value store"),
            Error::AccessDenied => f.write_str(
                "access to the key-value store denied (is it in the policy's [keyvalue] stores?)",
            ),
            Error::Other(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for Error {}

/// An open store.
pub struct Store {
    bucket: imp::Bucket,
}

impl Store {
    /// Opens the store the policy grants under `label`.
    pub fn open(label: &str) -> Result<Store, Error> {
        Ok(Store {
            bucket: imp::open(label)?,
        })
    }

    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        self.bucket.get(key)
    }

    pub fn set(&self, key: &str, value: impl AsRef<[u8]>) -> Result<(), Error> {
        self.bucket.set(key, value.as_ref())
    }

    /// Deleting a key that is not there is not an error.
    pub fn delete(&self, key: &str) -> Result<(), Error> {
        self.bucket.delete(key)
    }

    pub fn exists(&self, key: &str) -> Result<bool, Error> {
        self.bucket.exists(key)
    }

    /// The value at `key` read as JSON; a value that is not `T` is an error.
    pub fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, Error> {
        match self.get(key)? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                Error::Other(format!(
                    "the value of {key:?} is not the JSON expected: {e}"
                ))
            }),
        }
    }

    pub fn set_json<T: Serialize + ?Sized>(&self, key: &str, value: &T) -> Result<(), Error> {
        let bytes = serde_json::to_vec(value).map_err(|e| Error::Other(e.to_string()))?;
        self.set(key, bytes)
    }

    /// Every key, in order, following the store's pages.
    pub fn keys(&self) -> Result<Vec<String>, Error> {
        let mut keys = Vec::new();
        let mut cursor = None;
        loop {
            let (page, next) = self.bucket.list(cursor)?;
            keys.extend(page);
            match next {
                Some(next) => cursor = Some(next),
                None => return Ok(keys),
            }
        }
    }

    /// Adds `delta` to the counter at `key` (absent: 0) atomically and
    /// returns the new value. Counters are stored as decimal text.
    pub fn increment(&self, key: &str, delta: i64) -> Result<i64, Error> {
        self.bucket.increment(key, delta)
    }

    /// Replaces the value at `key` with `change(current)` atomically: if
    /// another request changed it in between, `change` runs again on the
    /// newer value (up to [`UPDATE_ATTEMPTS`] times). Returns what was
    /// stored.
    pub fn update(
        &self,
        key: &str,
        mut change: impl FnMut(Option<&[u8]>) -> Vec<u8>,
    ) -> Result<Vec<u8>, Error> {
        self.bucket.update(key, &mut change)
    }
}

#[cfg(target_arch = "wasm32")]
mod imp {
    use super::{Error, UPDATE_ATTEMPTS};

    mod bindings {
        wit_bindgen::generate!({
            path: "../host/wit/keyvalue-0.2.0-draft2",
            world: "imports",
        });
    }

    use bindings::wasi::keyvalue::{atomics, store};

    impl From<store::Error> for Error {
        fn from(error: store::Error) -> Self {
            match error {
                store::Error::NoSuchStore => Error::NoSuchStore,
                store::Error::AccessDenied => Error::AccessDenied,
                store::Error::Other(message) => Error::Other(message),
            }
        }
    }

    pub struct Bucket(store::Bucket);

    pub fn open(label: &str) -> Result<Bucket, Error> {
        Ok(Bucket(store::open(label)?))
    }

    impl Bucket {
        pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
            Ok(self.0.get(key)?)
        }

        pub fn set(&self, key: &str, value: &[u8]) -> Result<(), Error> {
            Ok(self.0.set(key, value)?)
        }

        pub fn delete(&self, key: &str) -> Result<(), Error> {
            Ok(self.0.delete(key)?)
        }

        pub fn exists(&self, key: &str) -> Result<bool, Error> {
            Ok(self.0.exists(key)?)
        }

        pub fn list(&self, cursor: Option<String>) -> Result<(Vec<String>, Option<String>), Error> {
            let page = self.0.list_keys(cursor.as_deref())?;
            Ok((page.keys, page.cursor))
        }

        pub fn increment(&self, key: &str, delta: i64) -> Result<i64, Error> {
            Ok(atomics::increment(&self.0, key, delta)?)
        }

        pub fn update(
            &self,
            key: &str,
            change: &mut dyn FnMut(Option<&[u8]>) -> Vec<u8>,
        ) -> Result<Vec<u8>, Error> {
            let mut cas = atomics::Cas::new(&self.0, key)?;
            for _ in 0..UPDATE_ATTEMPTS {
                let value = change(cas.current()?.as_deref());
                match atomics::swap(cas, &value) {
                    Ok(()) => return Ok(value),
                    Err(atomics::CasError::CasFailed(fresh)) => cas = fresh,
                    Err(atomics::CasError::StoreError(error)) => return Err(error.into()),
                }
            }
            Err(Error::Other(format!(
                "{key:?} changed under each of {UPDATE_ATTEMPTS} attempts to update it"
            )))
        }
    }
}

/// Natively (a function's unit tests), a map in memory per thread.
#[cfg(not(target_arch = "wasm32"))]
mod imp {
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    use super::Error;

    thread_local! {
        static DATA: RefCell<BTreeMap<(String, String), Vec<u8>>> = const { RefCell::new(BTreeMap::new()) };
    }

    pub struct Bucket(String);

    pub fn open(label: &str) -> Result<Bucket, Error> {
        Ok(Bucket(label.to_string()))
    }

    impl Bucket {
        fn at(&self, key: &str) -> (String, String) {
            (self.0.clone(), key.to_string())
        }

        pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
            Ok(DATA.with(|d| d.borrow().get(&self.at(key)).cloned()))
        }

        pub fn set(&self, key: &str, value: &[u8]) -> Result<(), Error> {
            DATA.with(|d| d.borrow_mut().insert(self.at(key), value.to_vec()));
            Ok(())
        }

        pub fn delete(&self, key: &str) -> Result<(), Error> {
            DATA.with(|d| d.borrow_mut().remove(&self.at(key)));
            Ok(())
        }

        pub fn exists(&self, key: &str) -> Result<bool, Error> {
            Ok(DATA.with(|d| d.borrow().contains_key(&self.at(key))))
        }

        pub fn list(
            &self,
            _cursor: Option<String>,
        ) -> Result<(Vec<String>, Option<String>), Error> {
            let keys = DATA.with(|d| {
                d.borrow()
                    .keys()
                    .filter(|(label, _)| *label == self.0)
                    .map(|(_, key)| key.clone())
                    .collect()
            });
            Ok((keys, None))
        }

        pub fn increment(&self, key: &str, delta: i64) -> Result<i64, Error> {
            let current = match self.get(key)? {
                None => 0,
                Some(bytes) => String::from_utf8_lossy(&bytes)
                    .parse::<i64>()
                    .map_err(|_| Error::Other(format!("the value of {key:?} is not a number")))?,
            };
            let sum = current
                .checked_add(delta)
                .ok_or_else(|| Error::Other(format!("incrementing {key:?} overflows")))?;
            self.set(key, sum.to_string().as_bytes())?;
            Ok(sum)
        }

        pub fn update(
            &self,
            key: &str,
            change: &mut dyn FnMut(Option<&[u8]>) -> Vec<u8>,
        ) -> Result<Vec<u8>, Error> {
            let value = change(self.get(key)?.as_deref());
            self.set(key, &value)?;
            Ok(value)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_counters_and_updates_natively() {
        let store = Store::open("test").expect("open");
        store
            .set_json("doc", &serde_json::json!({"a": 1}))
            .expect("set");
        let doc: Option<serde_json::Value> = store.get_json("doc").expect("get");
        assert_eq!(doc, Some(serde_json::json!({"a": 1})));
        assert_eq!(store.increment("n", 2).expect("increment"), 2);
        assert_eq!(store.increment("n", -5).expect("increment"), -3);
        let appended = store
            .update("log", |old| [old.unwrap_or_default(), b"x"].concat())
            .expect("update");
        assert_eq!(appended, b"x");
        assert_eq!(store.keys().expect("keys"), vec!["doc", "log", "n"]);
        store.delete("doc").expect("delete");
        assert!(!store.exists("doc").expect("exists"));
        store.set("word", "hi").expect("set");
        assert!(matches!(
            store.get_json::<u32>("word"),
            Err(Error::Other(_))
        ));
    }
}
