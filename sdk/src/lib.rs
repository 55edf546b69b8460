//! Write Lichen functions in a few lines.
//!
//! A Lichen function is a standard WebAssembly component that exports
//! `wasi:http/incoming-handler` (the `wasi:http/proxy` world), so it runs on
//! Lichen, `wasmtime serve`, Spin or wasmCloud alike. This crate hides the
//! generated bindings behind a handler from [`Request`] to [`Response`]:
//!
//! ```
//! use lichen_sdk::{Request, Response, Result};
//!
//! fn handle(req: Request) -> Result<Response> {
//!     let name = req.query_param("name").unwrap_or_else(|| "world".to_string());
//!     Ok(Response::text(format!("Hello, {name}!\n")))
//! }
//!
//! lichen_sdk::export!(handle);
//! # fn main() {
//! #     let res = handle(Request::builder().uri("/?name=edge").build()).unwrap();
//! #     assert_eq!(res.body(), b"Hello, edge!\n");
//! # }
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2`; the output is
//! already a component. With the crate's feature `p3`, the same handler is
//! exported as `wasi:http/handler@0.3.0` instead (the `wasi:http/service`
//! world of WASI 0.3): switching a function between the two generations
//! changes its `Cargo.toml`, not its code. An `Err` returned by the handler becomes a JSON error
//! response (`500` unless made with [`Error::new`] and another status), and a
//! panic traps the instance, which the host answers with `500`.
//!
//! The request's headers and body are read from the host when the handler
//! first asks for them, whole (a handler that never looks at them costs
//! nothing for them), and the response is written in one piece: functions are
//! small request/response programs, and buffering keeps the handler a plain
//! function. Streaming needs the raw `wasi::http` bindings, which are
//! re-exported as [`wasi`].

use std::cell::OnceCell;
use std::fmt;
use std::rc::Rc;

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use wasi;

pub mod config;
pub mod kv;
pub mod outbound;

/// A handler's result: `Err` becomes a JSON error response.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An HTTP request as the function sees it: the path is relative to where the
/// function is mounted (`/fn/hello/a?x=1` arrives as `/a?x=1`).
///
/// Headers and body are fetched from the host on first use and kept; a clone
/// shares what its original fetched.
#[derive(Debug, Clone, Default)]
pub struct Request {
    method: String,
    uri: String,
    /// The name (and port) the client sent the request to.
    authority: Option<String>,
    rest: Rc<Rest>,
}

/// A request's headers and body: given when built by hand, fetched from the
/// host on first use when the request came in.
#[derive(Default)]
struct Rest {
    headers: OnceCell<Vec<(String, Vec<u8>)>>,
    body: OnceCell<Result<Vec<u8>>>,
    /// Where they come from; `None` for a request built by hand.
    wire: Option<__private::Wire>,
}

impl Rest {
    fn headers(&self) -> &[(String, Vec<u8>)] {
        self.headers.get_or_init(|| {
            self.wire
                .as_ref()
                .map(__private::Wire::headers)
                .unwrap_or_default()
        })
    }

    fn body(&self) -> &Result<Vec<u8>> {
        self.body.get_or_init(|| match &self.wire {
            Some(wire) => wire.body(),
            None => Ok(Vec::new()),
        })
    }

    /// What the request is answered with: the handler's answer, unless the
    /// handler asked for the body and it could not be read, whose error
    /// (a `400`) is answered instead.
    fn answer(&self, handled: Result<Response>) -> Response {
        match self.body.get() {
            Some(Err(error)) => error.clone().into_response(),
            _ => handled.unwrap_or_else(Error::into_response),
        }
    }
}

impl fmt::Debug for Rest {
    /// What has been fetched so far; printing never reads from the host.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rest")
            .field("headers", &self.headers.get())
            .field("body", &self.body.get())
            .finish_non_exhaustive()
    }
}

impl Request {
    /// Starts a request by hand, for unit tests of a handler.
    pub fn builder() -> RequestBuilder {
        RequestBuilder {
            method: "GET".to_string(),
            uri: "/".to_string(),
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// A request that came in: headers and body stay with the host until
    /// the handler asks.
    fn incoming(
        method: String,
        uri: String,
        authority: Option<String>,
        wire: __private::Wire,
    ) -> Self {
        let rest = Rest {
            wire: Some(wire),
            ..Rest::default()
        };
        Request {
            method,
            uri,
            authority,
            rest: Rc::new(rest),
        }
    }

    /// The name (and port, if sent) the client addressed: its `Host`
    /// header, e.g. `shop.example.com`. The host hands it over apart from
    /// the headers.
    pub fn authority(&self) -> Option<&str> {
        self.authority.as_deref()
    }

    /// The method, upper case (`GET`, `POST`, ...).
    pub fn method(&self) -> &str {
        &self.method
    }

    /// Path and query as sent, e.g. `/a?x=1`.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The path without the query, e.g. `/a`.
    pub fn path(&self) -> &str {
        self.uri.split_once('?').map_or(&self.uri, |(path, _)| path)
    }

    /// The raw query string without `?`, if there is one.
    pub fn query(&self) -> Option<&str> {
        self.uri.split_once('?').map(|(_, query)| query)
    }

    /// The first value of a query parameter, percent-decoded (`+` is a space).
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query()?
            .split('&')
            .filter_map(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                (percent_decode(key) == name).then(|| percent_decode(value))
            })
            .next()
    }

    /// The first value of a header (names compare case-insensitively), if it
    /// is valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.rest
            .headers()
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .and_then(|(_, value)| std::str::from_utf8(value).ok())
    }

    /// All headers in the order they arrived; a name may repeat.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.rest
            .headers()
            .iter()
            .map(|(key, value)| (key.as_str(), value.as_slice()))
    }

    /// The body bytes, read whole on the first call.
    ///
    /// If reading fails (the client stopped sending), this is empty and the
    /// handler's response is replaced by a `400` naming the failure; [`text`]
    /// and [`json`] return that error instead. With the feature `p3` the first
    /// call waits for the body without letting other requests the instance
    /// serves run meanwhile.
    ///
    /// [`text`]: Request::text
    /// [`json`]: Request::json
    pub fn body(&self) -> &[u8] {
        self.rest.body().as_deref().unwrap_or_default()
    }

    /// The body as UTF-8 text; `400` if it is not.
    pub fn text(&self) -> Result<&str> {
        let body = self.rest.body().as_deref().map_err(Error::clone)?;
        std::str::from_utf8(body)
            .map_err(|e| Error::new(400, format!("request body is not UTF-8: {e}")))
    }

    /// The body parsed as JSON; `400` with serde's message if it does not fit `T`.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T> {
        let body = self.rest.body().as_deref().map_err(Error::clone)?;
        serde_json::from_slice(body)
            .map_err(|e| Error::new(400, format!("request body is not the JSON expected: {e}")))
    }
}

/// Builds a [`Request`] by hand, for unit tests of a handler.
#[derive(Debug)]
pub struct RequestBuilder {
    method: String,
    uri: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

impl RequestBuilder {
    pub fn method(mut self, method: &str) -> Self {
        self.method = method.to_ascii_uppercase();
        self
    }

    pub fn uri(mut self, uri: &str) -> Self {
        self.uri = uri.to_string();
        self
    }

    pub fn header(mut self, name: &str, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.to_string(), value.into()));
        self
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    pub fn build(self) -> Request {
        let rest = Rest {
            headers: OnceCell::from(self.headers),
            body: OnceCell::from(Ok(self.body)),
            wire: None,
        };
        Request {
            method: self.method,
            uri: self.uri,
            authority: None,
            rest: Rc::new(rest),
        }
    }
}

/// An HTTP response: status, headers and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

impl Default for Response {
    fn default() -> Self {
        Response::new(200)
    }
}

impl Response {
    /// An empty response with this status.
    pub fn new(status: u16) -> Self {
        Response {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// `200` with a `text/plain; charset=utf-8` body.
    pub fn text(body: impl Into<String>) -> Self {
        Response::new(200)
            .with_header("content-type", "text/plain; charset=utf-8")
            .with_body(body.into())
    }

    /// `200` with `value` serialised as a JSON body.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Self> {
        let body = serde_json::to_vec(value)
            .map_err(|e| Error::new(500, format!("response does not serialise to JSON: {e}")))?;
        Ok(Response::new(200)
            .with_header("content-type", "application/json")
            .with_body(body))
    }

    /// Replaces the status code.
    pub fn with_status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }

    /// Adds a header; an existing header of the same name is kept.
    pub fn with_header(mut self, name: &str, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.to_ascii_lowercase(), value.into()));
        self
    }

    /// Replaces the body.
    pub fn with_body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    pub fn status(&self) -> u16 {
        self.status
    }

    pub fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.headers
            .iter()
            .map(|(key, value)| (key.as_str(), value.as_slice()))
    }

    pub fn body(&self) -> &[u8] {
        &self.body
    }
}

/// A handler's failure: answered as `{"error": message}` with its status.
///
/// Any error type converts with `?` into a `500`; use [`Error::new`] for a
/// client error such as `400`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    status: u16,
    message: String,
}

impl Error {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Error {
            status,
            message: message.into(),
        }
    }

    pub fn status(&self) -> u16 {
        self.status
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// The response this error is answered with.
    pub fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.message }).to_string();
        Response::new(self.status)
            .with_header("content-type", "application/json")
            .with_body(body)
    }
}

impl<E: std::error::Error> From<E> for Error {
    fn from(error: E) -> Self {
        Error::new(500, error.to_string())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

fn percent_decode(input: &str) -> String {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(byte) => {
                        out.push(byte);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Exports a handler `fn(Request) -> Result<Response>` as the component's
/// `wasi:http/incoming-handler`. Use it once per function crate.
#[cfg(not(feature = "p3"))]
#[macro_export]
macro_rules! export {
    (async $handler:path) => {
        compile_error!("an async handler needs lichen-sdk's `p3` feature (WASI 0.3)");
    };
    ($handler:path) => {
        struct __LichenIncomingHandler;

        impl $crate::wasi::exports::http::incoming_handler::Guest for __LichenIncomingHandler {
            fn handle(
                request: $crate::wasi::http::types::IncomingRequest,
                response_out: $crate::wasi::http::types::ResponseOutparam,
            ) {
                $crate::__private::serve(request, response_out, $handler)
            }
        }

        $crate::wasi::http::proxy::export!(__LichenIncomingHandler);
    };
}

/// Exports a handler `fn(Request) -> Result<Response>` as the component's
/// `wasi:http/handler@0.3.0` (the `wasi:http/service` world, WASIp3): the
/// same handler as a WASI 0.2 build, only the feature `p3` differs.
///
/// With `p3`, the handler may also be an `async fn(Request) -> Result<Response>`
/// (`export!(async handle)`), so it can wait (an outbound call, a timer)
/// without holding up the other requests its instance serves.
#[cfg(feature = "p3")]
#[macro_export]
macro_rules! export {
    (async $handler:path) => {
        $crate::export!(@service |request| $handler(request));
    };
    ($handler:path) => {
        $crate::export!(@service |request| ::core::future::ready($handler(request)));
    };
    (@service $handle:expr) => {
        struct __LichenService;

        impl $crate::__private::p3::wasip3::exports::http::handler::Guest for __LichenService {
            async fn handle(
                request: $crate::__private::p3::wasip3::http::types::Request,
            ) -> ::core::result::Result<
                $crate::__private::p3::wasip3::http::types::Response,
                $crate::__private::p3::wasip3::http::types::ErrorCode,
            > {
                $crate::__private::p3::serve(request, $handle).await
            }
        }

        $crate::__private::p3::wasip3::http::service::export!(__LichenService);
    };
}

/// WASIp3 helpers for async handlers (feature `p3`).
#[cfg(feature = "p3")]
pub mod p3 {
    pub use crate::__private::p3::wasip3;

    /// Waits `duration` without blocking the instance: other requests it
    /// serves go on meanwhile.
    pub async fn sleep(duration: std::time::Duration) {
        let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        wasip3::clocks::monotonic_clock::wait_for(nanos).await;
    }
}

#[doc(hidden)]
pub mod __private {
    #[cfg(not(feature = "p3"))]
    mod p2;
    #[cfg(feature = "p3")]
    pub mod p3;

    #[cfg(not(feature = "p3"))]
    pub(crate) use p2::Wire;
    #[cfg(not(feature = "p3"))]
    pub use p2::serve;
    #[cfg(feature = "p3")]
    pub(crate) use p3::Wire;

    use std::io::Read;

    use wasi::http::types::IncomingBody;

    use super::{Error, Result};

    /// Reads a body to its end; a failure is answered with `status`.
    pub(crate) fn read_all(incoming: IncomingBody, status: u16, what: &str) -> Result<Vec<u8>> {
        let mut body = Vec::new();
        let mut stream = incoming
            .stream()
            .map_err(|()| Error::new(500, format!("{what} body stream unavailable")))?;
        stream
            .read_to_end(&mut body)
            .map_err(|e| Error::new(status, format!("reading the {what} body: {e}")))?;
        // The stream is a child of the body resource: it must go first.
        drop(stream);
        drop(incoming);
        Ok(body)
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_and_query_split() {
        let req = Request::builder()
            .uri("/a/b?x=1&name=hello%20edge+x")
            .build();
        assert_eq!(req.path(), "/a/b");
        assert_eq!(req.query(), Some("x=1&name=hello%20edge+x"));
        assert_eq!(req.query_param("x").as_deref(), Some("1"));
        assert_eq!(req.query_param("name").as_deref(), Some("hello edge x"));
        assert_eq!(req.query_param("missing"), None);
    }

    #[test]
    fn bad_percent_escapes_are_kept() {
        let req = Request::builder().uri("/?a=%zz&b=%4").build();
        assert_eq!(req.query_param("a").as_deref(), Some("%zz"));
        assert_eq!(req.query_param("b").as_deref(), Some("%4"));
    }

    #[test]
    fn json_errors_are_client_errors() {
        let req = Request::builder().body("not json").build();
        let err = req.json::<f64>().unwrap_err();
        assert_eq!(err.status(), 400);
        let res = err.into_response();
        assert_eq!(res.status(), 400);
        let body: serde_json::Value = serde_json::from_slice(res.body()).unwrap();
        assert!(body["error"].as_str().unwrap().contains("JSON"));
    }

    #[test]
    fn headers_compare_case_insensitively() {
        let req = Request::builder().header("X-Thing", "v").build();
        assert_eq!(req.header("x-thing"), Some("v"));
    }
}
