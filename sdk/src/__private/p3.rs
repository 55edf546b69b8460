//! The WASIp3 (`wasi:http/handler@0.3.0`) side of [`export!`](crate::export):
//! the same buffered handler as the WASI 0.2 build, over component-model
//! streams and futures.
//!
//! The request body is read to its end before the handler runs; the response
//! body is written by a task the guest spawns after `handle` has returned the
//! response, which is how a p3 guest answers (the host keeps driving the
//! instance until that task is done).

pub use wasip3;

use wasip3::http::types::{
    ErrorCode, Fields, Method, Request as WasiRequest, Response as WasiResponse,
};
use wasip3::{wit_future, wit_stream};

use crate::{Error, Request, Response, Result};

/// Runs one invocation: reads the request, calls the handler (a plain one
/// is wrapped in a ready future by `export!`), answers.
pub async fn serve<F>(
    request: WasiRequest,
    handler: impl FnOnce(Request) -> F,
) -> std::result::Result<WasiResponse, ErrorCode>
where
    F: std::future::Future<Output = Result<Response>>,
{
    let response = match read_request(request).await {
        Ok(req) => handler(req).await.unwrap_or_else(Error::into_response),
        Err(error) => error.into_response(),
    };
    match build_response(response) {
        Ok(response) => Ok(response),
        Err(error) => build_response(error.into_response())
            .map_err(|e| ErrorCode::InternalError(Some(e.to_string()))),
    }
}

async fn read_request(request: WasiRequest) -> Result<Request> {
    let method = match request.get_method() {
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
    };
    let uri = request
        .get_path_with_query()
        .unwrap_or_else(|| "/".to_string());
    let headers = request.get_headers().copy_all();
    // Nothing goes wrong on our side of the body that the host must hear of.
    let (done_tx, done_rx) = wit_future::new(|| Ok(()));
    drop(done_tx);
    let (contents, _trailers) = WasiRequest::consume_body(request, done_rx);
    let body = contents.collect().await;
    Ok(Request {
        method,
        uri,
        headers,
        body,
    })
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
