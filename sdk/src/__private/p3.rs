//! The WASIp3 (`wasi:http/handler@0.3.0`) side of [`export!`](crate::export):
//! the same buffered handler as the WASI 0.2 build, over component-model
//! streams and futures.
//!
//! The request's headers and body stay on the host until the handler asks
//! (the body is then read whole, waiting on the stream with `block_on`); the
//! response body is written by a task the guest spawns after `handle` has
//! returned the response, which is how a p3 guest answers (the host keeps
//! driving the instance until that task is done).

use std::cell::{OnceCell, RefCell};
use std::rc::Rc;

pub use wasip3;

use wasip3::http::types::{
    ErrorCode, Fields, Method, Request as WasiRequest, Response as WasiResponse,
};
use wasip3::{wit_future, wit_stream};

use crate::{Error, Request, Response, Result};

/// Runs one invocation: calls the handler (a plain one is wrapped in a
/// ready future by `export!`) with the request, answers.
pub async fn serve<F>(
    request: WasiRequest,
    handler: impl FnOnce(Request) -> F,
) -> std::result::Result<WasiResponse, ErrorCode>
where
    F: std::future::Future<Output = Result<Response>>,
{
    let authority = request.get_authority();
    let req = Request::incoming(
        method(&request),
        uri(&request),
        authority,
        Wire::new(request),
    );
    let rest = Rc::clone(&req.rest);
    let response = rest.answer(handler(req).await);
    drop(rest);
    match build_response(response) {
        Ok(response) => Ok(response),
        Err(error) => build_response(error.into_response())
            .map_err(|e| ErrorCode::InternalError(Some(e.to_string()))),
    }
}

/// A WASIp3 request's headers and body, read when the handler asks.
pub(crate) struct Wire {
    /// Until the body is taken, which consumes the request.
    request: RefCell<Option<WasiRequest>>,
    /// The headers' handle, taken from the request before it goes.
    fields: OnceCell<Option<Fields>>,
}

impl Wire {
    fn new(request: WasiRequest) -> Self {
        Wire {
            request: RefCell::new(Some(request)),
            fields: OnceCell::new(),
        }
    }

    fn fields(&self) -> Option<&Fields> {
        self.fields
            .get_or_init(|| self.request.borrow().as_ref().map(WasiRequest::get_headers))
            .as_ref()
    }

    pub(crate) fn headers(&self) -> Vec<(String, Vec<u8>)> {
        self.fields().map(Fields::copy_all).unwrap_or_default()
    }

    /// Reads the body to its end, blocking this task (and the instance's
    /// others) until it has: the handler asked from plain, synchronous code.
    pub(crate) fn body(&self) -> Result<Vec<u8>> {
        // Taking the body consumes the request: keep the headers first.
        self.fields();
        let request = self
            .request
            .borrow_mut()
            .take()
            .ok_or_else(|| Error::new(500, "request body already consumed"))?;
        // Nothing goes wrong on our side of the body that the host must hear of.
        let (done_tx, done_rx) = wit_future::new(|| Ok(()));
        drop(done_tx);
        let (contents, _trailers) = WasiRequest::consume_body(request, done_rx);
        Ok(wasip3::wit_bindgen::block_on(contents.collect()))
    }
}

fn method(request: &WasiRequest) -> String {
    match request.get_method() {
        Method::Get => "GET".to_string(),
        Method::Head => "HEAD".to_string(),
        Method::Post => "POST".to_string(),
        Method::Put => "PUT".to_string(),
        Method::Delete => "DELETE".to_string(),
        Method::Connect => "CONNECT".to_string(),
        Method::Options => "OPTIONS".to_string(),
        Method::Trace => "TRACE".to_string(),
        Method::Patch => "PATCH".to_string(),
        Method::Other(other) => other,
    }
}

fn uri(request: &WasiRequest) -> String {
    request
        .get_path_with_query()
        .unwrap_or_else(|| "/".to_string())
}

fn build_response(response: Response) -> Result<WasiResponse> {
    let Response {
        status,
        headers,
        body,
    } = response;
    let fields = Fields::from_list(&headers)
        .map_err(|e| Error::new(500, format!("invalid response header: {e:?}")))?;
    let (mut contents_tx, contents_rx) = wit_stream::new();
    let (trailers_tx, trailers_rx) = wit_future::new(|| Ok(None));
    drop(trailers_tx);
    let (wasi_response, _sent) = WasiResponse::new(fields, Some(contents_rx), trailers_rx);
    wasi_response
        .set_status_code(status)
        .map_err(|()| Error::new(500, format!("invalid response status {status}")))?;
    wasip3::spawn_local(async move {
        // The client hung up if not all of it was taken; nothing is left to
        // tell.
        let _ = contents_tx.write_all(body).await;
    });
    Ok(wasi_response)
}
