//! Request bodies: reading one whole under a cap (uploads, policies, maps),
//! and the body type an invocation carries to the guest or to a peer.
//!
//! A body is refused with `413` as soon as it is known to pass its cap, by
//! its declared length or while it streams, so a client can never make the
//! host buffer more than the cap. A body that stalls longer than the idle
//! timeout is a `408`.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{StatusCode, header};
use http_body::{Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use crate::error::ApiError;
use crate::sandbox::drain_in_background;

/// Reads a request body, refusing it with `413` as soon as it passes `limit`
/// (by its declared length, or while it streams), never buffering more.
pub async fn read_capped<B>(
    req: hyper::Request<B>,
    limit: u64,
    idle: Duration,
) -> Result<Bytes, ApiError>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: std::fmt::Display,
{
    let too_large = || {
        ApiError::too_large(format!(
            "the body is larger than the limit of {limit} bytes"
        ))
    };
    let declared = declared_length(req.headers());
    let mut body = req.into_body();
    if declared.is_some_and(|len| len > limit) {
        drain_in_background(body);
        return Err(too_large());
    }
    let mut buffer = BytesMut::new();
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "body_timeout",
                    format!("no request body data for {idle:?}"),
                ));
            }
        };
        let frame = frame.map_err(|e| {
            ApiError::bad_request("bad_body", format!("reading the request body: {e}"))
        })?;
        if let Ok(data) = frame.into_data() {
            if buffer.len() as u64 + data.len() as u64 > limit {
                drain_in_background(body);
                return Err(too_large());
            }
            buffer.extend_from_slice(&data);
        }
    }
    Ok(buffer.freeze())
}

/// The `Content-Length` a request or response declares, if any and valid.
pub fn declared_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// The body of an invocation: streamed from a client or a peer, or whole
/// (a map item).
pub enum RequestBody {
    Streamed(Incoming),
    Whole(Full<Bytes>),
}

impl From<Bytes> for RequestBody {
    fn from(bytes: Bytes) -> Self {
        RequestBody::Whole(Full::new(bytes))
    }
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Streamed(body) => Pin::new(body).poll_frame(cx),
            RequestBody::Whole(body) => Pin::new(body)
                .poll_frame(cx)
                .map_err(|never| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Streamed(body) => body.is_end_stream(),
            RequestBody::Whole(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Streamed(body) => body.size_hint(),
            RequestBody::Whole(body) => body.size_hint(),
        }
    }
}
