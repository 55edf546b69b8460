//! Outbound HTTP from a function, through `wasi:http/outgoing-handler`.
//!
//! The host decides which destinations a function may reach (its policy's
//! `[outbound] allow` list); anything else fails with the host's wasi:http
//! error, which [`send`] returns as an [`Error`](crate::Error) with status 502.
//!
//! ```no_run
//! use lichen_sdk::outbound;
//!
//! # fn main() -> lichen_sdk::Result<()> {
//! let res = outbound::get("http://127.0.0.1:9000/status")?;
//! assert_eq!(res.status(), 200);
//! # Ok(())
//! # }
//! ```

use std::io::Write;

use wasi::http::outgoing_handler;
use wasi::http::types::{Fields, Method, OutgoingBody, OutgoingRequest, Scheme};

use crate::{Error, Response, Result};

/// A request to send: build it with [`OutboundRequest::new`] and the `with_`
/// methods, then [`send`] it.
#[derive(Debug, Clone)]
pub struct OutboundRequest {
    method: String,
    url: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

impl OutboundRequest {
    pub fn new(method: &str, url: &str) -> Self {
        OutboundRequest {
            method: method.to_ascii_uppercase(),
            url: url.to_string(),
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn with_header(mut self, name: &str, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.to_ascii_lowercase(), value.into()));
        self
    }

    pub fn with_body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }
}

/// `GET url`.
pub fn get(url: &str) -> Result<Response> {
    send(OutboundRequest::new("GET", url))
}

/// Sends a request and waits for the whole response.
pub fn send(request: OutboundRequest) -> Result<Response> {
    let (scheme, authority, path) = split_url(&request.url)?;
    let headers = Fields::new();
    for (name, value) in &request.headers {
        headers
            .append(name, value)
            .map_err(|e| Error::new(400, format!("header {name:?} refused: {e:?}")))?;
    }
    let outgoing = OutgoingRequest::new(headers);
    let method = match request.method.as_str() {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "POST" => Method::Post,
        "PUT" => Method::Put,
        "DELETE" => Method::Delete,
        "PATCH" => Method::Patch,
        "OPTIONS" => Method::Options,
        other => Method::Other(other.to_string()),
    };
    let invalid = |what: &str| Error::new(400, format!("invalid {what} in {:?}", request.url));
    outgoing
        .set_method(&method)
        .map_err(|()| invalid("method"))?;
    outgoing
        .set_scheme(Some(&scheme))
        .map_err(|()| invalid("scheme"))?;
    outgoing
        .set_authority(Some(authority))
        .map_err(|()| invalid("authority"))?;
    outgoing
        .set_path_with_query(Some(path))
        .map_err(|()| invalid("path"))?;

    let body = outgoing
        .body()
        .map_err(|()| Error::new(500, "request body unavailable"))?;
    let future = outgoing_handler::handle(outgoing, None)
        .map_err(|code| Error::new(502, format!("outbound request refused: {code:?}")))?;
    if !request.body.is_empty() {
        let mut stream = body
            .write()
            .map_err(|()| Error::new(500, "request body stream unavailable"))?;
        stream
            .write_all(&request.body)
            .and_then(|()| Write::flush(&mut stream))
            .map_err(|e| Error::new(502, format!("sending the request body: {e}")))?;
    }
    OutgoingBody::finish(body, None)
        .map_err(|code| Error::new(502, format!("finishing the request body: {code:?}")))?;

    future.subscribe().block();
    let incoming = match future.get() {
        Some(Ok(Ok(response))) => response,
        Some(Ok(Err(code))) => {
            return Err(Error::new(
                502,
                format!("outbound request failed: {code:?}"),
            ));
        }
        Some(Err(())) | None => return Err(Error::new(502, "outbound response unavailable")),
    };
    let status = incoming.status();
    let headers = incoming.headers().entries();
    let body_resource = incoming
        .consume()
        .map_err(|()| Error::new(502, "response body unavailable"))?;
    let bytes = crate::__private::read_all(body_resource, 502, "response")?;
    let mut response = Response::new(status).with_body(bytes);
    for (name, value) in headers {
        response = response.with_header(&name, value);
    }
    Ok(response)
}

/// Splits `scheme://authority/path?query`.
fn split_url(url: &str) -> Result<(Scheme, &str, &str)> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| Error::new(400, format!("not an absolute URL: {url:?}")))?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        other => Scheme::Other(other.to_string()),
    };
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(split);
    let path = if path.is_empty() { "/" } else { path };
    Ok((scheme, authority, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_scheme_authority_and_path() {
        let (scheme, authority, path) = split_url("http://127.0.0.1:9000/a?b=1").unwrap();
        assert!(matches!(scheme, Scheme::Http));
        assert_eq!(authority, "127.0.0.1:9000");
        assert_eq!(path, "/a?b=1");
        assert_eq!(split_url("https://x.com").unwrap().2, "/");
        assert_eq!(split_url("https://x.com?q").unwrap().2, "?q");
        assert!(split_url("x.com/a").is_err());
    }
}
