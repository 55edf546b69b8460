//! JSON documents by key, kept in the function's `notes` key-value store:
//! `PUT /{key}` stores the body (it must be JSON), `GET /{key}` reads it,
//! `DELETE /{key}` removes it, `GET /` lists the keys.
//! Its policy (`policies/notes.toml`) grants the store.
use lichen_sdk::kv::Store;
use lichen_sdk::{Error, Request, Response, Result};
use serde_json::{Value, json};

fn handle(req: Request) -> Result<Response> {
    let store = Store::open("notes")?;
    let key = req.path().trim_start_matches('/');
    match (req.method(), key) {
        ("GET", "") => Response::json(&json!({ "keys": store.keys()? })),
        (_, "") => Err(Error::new(405, "only GET on /; use /{key} for a note")),
        ("GET", key) => match store.get_json::<Value>(key)? {
            Some(note) => Response::json(&note),
            None => Err(Error::new(404, format!("no note {key:?}"))),
        },
        ("PUT", key) => {
            let note: Value = req.json()?;
            store.set_json(key, &note)?;
            Response::json(&json!({ "key": key, "stored": true }))
        }
        ("DELETE", key) => {
            store.delete(key)?;
            Response::json(&json!({ "key": key, "deleted": true }))
        }
        (method, _) => Err(Error::new(405, format!("{method} is not one of GET, PUT, DELETE"))),
    }
}

lichen_sdk::export!(handle);

#[cfg(test)]
mod tests {
    use super::*;

    fn call(method: &str, uri: &str, body: &str) -> Result<Response> {
        handle(Request::builder().method(method).uri(uri).body(body).build())
    }

    #[test]
    fn put_get_list_delete() {
        call("PUT", "/a", r#"{"text":"hi"}"#).expect("put");
        assert_eq!(call("GET", "/a", "").expect("get").body(), br#"{"text":"hi"}"#);
        assert_eq!(call("GET", "/", "").expect("list").body(), br#"{"keys":["a"]}"#);
        call("DELETE", "/a", "").expect("delete");
        assert_eq!(call("GET", "/a", "").err().map(|e| e.status()), Some(404));
        assert_eq!(call("PUT", "/b", "not json").err().map(|e| e.status()), Some(400));
    }
}
