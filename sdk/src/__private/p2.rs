//! The WASI 0.2 (`wasi:http/incoming-handler`) side of [`export!`](crate::export):
//! the handler gets the request with its headers and body still on the host,
//! and its response is written in one piece.

use std::io::Write;
use std::rc::Rc;

use wasi::http::types::{
    Fields, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

use super::read_all;
use crate::{Error, Request, Response, Result};

/// Runs one invocation: calls the handler with the request, writes the
/// response. Failures of the plumbing itself are answered with a 500 too,
/// so the caller always gets a response it can read.
pub fn serve(
    request: IncomingRequest,
    response_out: ResponseOutparam,
    handler: impl FnOnce(Request) -> Result<Response>,
) {
    let authority = request.authority();
    let req = Request::incoming(method(&request), uri(&request), authority, Wire(request));
    let rest = Rc::clone(&req.rest);
    let response = rest.answer(handler(req));
    // The request (and its body, if read) goes before the response is set.
    drop(rest);
    write_response(response, response_out);
}

/// A WASI 0.2 request's headers and body, read when the handler asks.
pub(crate) struct Wire(IncomingRequest);

impl Wire {
    pub(crate) fn headers(&self) -> Vec<(String, Vec<u8>)> {
        self.0.headers().entries()
    }

    pub(crate) fn body(&self) -> Result<Vec<u8>> {
        let incoming = self
            .0
            .consume()
            .map_err(|()| Error::new(500, "request body already consumed"))?;
        read_all(incoming, 400, "request")
    }
}

fn method(request: &IncomingRequest) -> String {
    match request.method() {
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

fn uri(request: &IncomingRequest) -> String {
    request.path_with_query().unwrap_or_else(|| "/".to_string())
}

fn write_response(response: Response, response_out: ResponseOutparam) {
    let response = match build_response(response) {
        Ok(parts) => parts,
        Err(error) => match build_response(error.into_response()) {
            Ok(parts) => parts,
            // An error response has only our own valid headers; if even
            // that fails the host will report that no response was set.
            Err(_) => return,
        },
    };
    let (outgoing, body) = response;
    let Ok(out_body) = outgoing.body() else {
        return;
    };
    ResponseOutparam::set(response_out, Ok(outgoing));
    if let Ok(mut stream) = out_body.write() {
        // The client hung up if this fails; nothing is left to tell.
        let _ = stream
            .write_all(&body)
            .and_then(|()| Write::flush(&mut stream));
    }
    let _ = OutgoingBody::finish(out_body, None);
}

fn build_response(response: Response) -> Result<(OutgoingResponse, Vec<u8>)> {
    let Response {
        status,
        headers,
        body,
    } = response;
    let fields = Fields::from_list(&headers)
        .map_err(|e| Error::new(500, format!("invalid response header: {e:?}")))?;
    let outgoing = OutgoingResponse::new(fields);
    outgoing
        .set_status_code(status)
        .map_err(|()| Error::new(500, format!("invalid response status {status}")))?;
    Ok((outgoing, body))
}
