//! HTTP helpers shared by the registry transport and the token client: a header
//! value holding a secret, and a body read with a size bound.

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use reqwest::Response;
use reqwest::header::HeaderValue;

use crate::error::OciError;

/// A header value for credentials (`Basic ...`, `Bearer ...`), marked sensitive so
/// that it is never shown.
pub(crate) fn header_secret(value: &str) -> Result<HeaderValue, OciError> {
    let mut v = HeaderValue::from_str(value).map_err(|_| {
        br2k_core::ValidationError::malformed(
            "credentials",
            "contain characters not allowed in a header",
        )
    })?;
    v.set_sensitive(true);
    Ok(v)
}

/// Why [`read_limited`] failed.
pub(crate) enum ReadError {
    TooLarge,
    Http(reqwest::Error),
}

/// Reads the body of `resp`, at most `limit` bytes ([`ReadError::TooLarge`] beyond).
pub(crate) async fn read_limited(resp: Response, limit: usize) -> Result<Bytes, ReadError> {
    let mut buf = BytesMut::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(ReadError::Http)?;
        if buf.len() + chunk.len() > limit {
            return Err(ReadError::TooLarge);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}
