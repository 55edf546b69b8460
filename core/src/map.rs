//! The body of `POST /v1/functions/{name}/map`: a JSON array whose elements
//! each become one invocation's body.

/// Most items in one map.
pub const MAX_ITEMS: usize = 100_000;

/// Why a map body is refused.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("the body must be a JSON array: {0}")]
    NotAnArray(serde_json::Error),
    #[error("{0} items; a map takes at most {MAX_ITEMS}")]
    TooMany(usize),
}

/// The items of a map request, in order.
pub fn parse_items(body: &[u8]) -> Result<Vec<serde_json::Value>, MapError> {
    let items: Vec<serde_json::Value> =
        serde_json::from_slice(body).map_err(MapError::NotAnArray)?;
    if items.len() > MAX_ITEMS {
        return Err(MapError::TooMany(items.len()));
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrays_of_anything_are_items_and_the_rest_is_refused() {
        let items = parse_items(br#"[1, "two", {"three": 3}, null]"#).unwrap();
        assert_eq!(items.len(), 4);
        assert_eq!(items[1], "two");
        assert!(matches!(parse_items(b"{}"), Err(MapError::NotAnArray(_))));
        assert!(matches!(parse_items(b"[1,"), Err(MapError::NotAnArray(_))));
        let many = format!("[{}0]", "0,".repeat(MAX_ITEMS));
        assert!(matches!(
            parse_items(many.as_bytes()),
            Err(MapError::TooMany(n)) if n == MAX_ITEMS + 1
        ));
    }
}
