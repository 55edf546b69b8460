//! Counts visits per path in the function's `default` key-value store: each
//! request adds one to its path's counter and answers the new count.
//! Its policy (`policies/counter.toml`) grants the store.
use lichen_sdk::kv::Store;
use lichen_sdk::{Request, Response, Result};

fn handle(req: Request) -> Result<Response> {
    let store = Store::open("default")?;
    let visits = store.increment(&format!("visits:{}", req.path()), 1)?;
    Response::json(&serde_json::json!({ "path": req.path(), "visits": visits }))
}

lichen_sdk::export!(handle);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_each_path_apart() {
        let visit = |uri| handle(Request::builder().uri(uri).build()).expect("handled");
        visit("/a");
        visit("/b");
        let res = visit("/a?x=1");
        assert_eq!(res.body(), br#"{"path":"/a","visits":2}"#);
    }
}
