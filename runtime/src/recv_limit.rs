//! The gRPC receive limit, enforced the way grpc-go (and so etcd) enforces it.
//!
//! etcd's server refuses a gRPC message whose length prefix is above
//! `--max-request-bytes` + 512 KiB with grpc-go's `ResourceExhausted "grpc: received
//! message larger than max (N vs. M)"`. tonic's own decode limit answers `OutOfRange` with
//! different text, so this layer reads the 5-byte length prefix of every request message
//! as the body streams past and fails the body as soon as a prefix is over the limit:
//! before the message is buffered, so an oversized request costs no memory.
//!
//! This module owns only framing arithmetic over the request body. It must never buffer
//! or alter the body (chunks pass through untouched), and it renders its error only
//! through [`crate::status`].

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tonic::codegen::http;

use crate::error::Error;

/// gRPC's length-prefixed message header: 1 compression flag byte, 4 length bytes.
const PREFIX_LEN: usize = 5;

/// A tower layer that applies [`RecvLimit`] to every request body.
#[derive(Debug, Clone, Copy)]
pub struct RecvLimitLayer {
    max: usize,
}

impl RecvLimitLayer {
    /// `max` is the largest message length accepted, in bytes (grpc-go's
    /// `MaxRecvMsgSize`).
    pub fn new(max: usize) -> Self {
        RecvLimitLayer { max }
    }
}

impl<S> tower_layer::Layer<S> for RecvLimitLayer {
    type Service = RecvLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RecvLimit {
            inner,
            max: self.max,
        }
    }
}

/// The service [`RecvLimitLayer`] builds: wraps the request body in a [`LimitedBody`].
#[derive(Debug, Clone)]
pub struct RecvLimit<S> {
    inner: S,
    max: usize,
}

impl<S> tower_service::Service<http::Request<tonic::body::Body>> for RecvLimit<S>
where
    S: tower_service::Service<http::Request<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let max = self.max;
        let req = req.map(|body| tonic::body::Body::new(LimitedBody::new(body, max)));
        self.inner.call(req)
    }
}

/// Where the parser stands in the stream of length-prefixed messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// Collecting a prefix; `filled` of its 5 bytes are in `prefix`.
    Prefix {
        prefix: [u8; PREFIX_LEN],
        filled: usize,
    },
    /// Inside a message body with this many bytes still to come.
    Message { remaining: usize },
    /// An oversized prefix was seen and reported; the body is finished.
    Refused,
}

/// Tracks message boundaries across arbitrary chunking; pure, so it is unit-tested alone.
#[derive(Debug, Clone)]
struct FrameScanner {
    max: usize,
    state: Framing,
}

impl FrameScanner {
    fn new(max: usize) -> Self {
        FrameScanner {
            max,
            state: Framing::Prefix {
                prefix: [0; PREFIX_LEN],
                filled: 0,
            },
        }
    }

    /// Advances over `chunk`; returns the first message length above the limit.
    fn scan(&mut self, mut chunk: &[u8]) -> Result<(), Error> {
        while !chunk.is_empty() {
            match &mut self.state {
                Framing::Refused => return Ok(()),
                Framing::Message { remaining } => {
                    let n = (*remaining).min(chunk.len());
                    *remaining -= n;
                    chunk = &chunk[n..];
                    if *remaining == 0 {
                        self.state = Framing::Prefix {
                            prefix: [0; PREFIX_LEN],
                            filled: 0,
                        };
                    }
                }
                Framing::Prefix { prefix, filled } => {
                    let n = (PREFIX_LEN - *filled).min(chunk.len());
                    prefix[*filled..*filled + n].copy_from_slice(&chunk[..n]);
                    *filled += n;
                    chunk = &chunk[n..];
                    if *filled == PREFIX_LEN {
                        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]])
                            as usize;
                        if len > self.max {
                            self.state = Framing::Refused;
                            return Err(Error::MessageTooLarge { len, max: self.max });
                        }
                        self.state = if len == 0 {
                            Framing::Prefix {
                                prefix: [0; PREFIX_LEN],
                                filled: 0,
                            }
                        } else {
                            Framing::Message { remaining: len }
                        };
                    }
                }
            }
        }
        Ok(())
    }
}

/// A request body that fails with grpc-go's error at the first oversized message prefix.
pub struct LimitedBody<B> {
    inner: B,
    scanner: FrameScanner,
}

impl<B> LimitedBody<B> {
    pub fn new(inner: B, max: usize) -> Self {
        LimitedBody {
            inner,
            scanner: FrameScanner::new(max),
        }
    }
}

impl<B> Body for LimitedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Data = Bytes;
    type Error = tonic::codegen::StdError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if this.scanner.state == Framing::Refused {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if let Err(e) = this.scanner.scan(data) {
                        let status = crate::status::to_status(&e);
                        return Poll::Ready(Some(Err(Box::new(status))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.scanner.state == Framing::Refused || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: u32, body_len: usize) -> Vec<u8> {
        let mut v = vec![0u8];
        v.extend_from_slice(&len.to_be_bytes());
        v.extend(std::iter::repeat_n(7u8, body_len));
        v
    }

    #[test]
    fn accepts_messages_up_to_the_limit_in_any_chunking() {
        let mut wire = frame(10, 10);
        wire.extend(frame(0, 0));
        wire.extend(frame(3, 3));
        for chunk in 1..wire.len() {
            let mut s = FrameScanner::new(10);
            for c in wire.chunks(chunk) {
                assert_eq!(s.scan(c), Ok(()), "chunk size {chunk}");
            }
            assert_eq!(
                s.state,
                Framing::Prefix {
                    prefix: [0; 5],
                    filled: 0
                }
            );
        }
    }

    #[test]
    fn refuses_the_first_oversized_prefix_even_split_across_chunks() {
        let mut wire = frame(4, 4);
        wire.extend(frame(11, 0));
        for chunk in 1..wire.len() {
            let mut s = FrameScanner::new(10);
            let mut refused = None;
            for c in wire.chunks(chunk) {
                if let Err(e) = s.scan(c) {
                    refused = Some(e);
                    break;
                }
            }
            assert_eq!(
                refused,
                Some(Error::MessageTooLarge { len: 11, max: 10 }),
                "chunk size {chunk}"
            );
            // After refusing, nothing more is examined.
            assert_eq!(s.scan(&frame(u32::MAX, 0)), Ok(()));
        }
    }

    #[test]
    fn huge_prefix_is_refused_with_grpc_go_text() {
        let mut s = FrameScanner::new(2_097_152);
        let e = s.scan(&frame(u32::MAX, 0)).unwrap_err();
        let st = crate::status::to_status(&e);
        assert_eq!(st.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            st.message(),
            "grpc: received message larger than max (4294967295 vs. 2097152)"
        );
    }
}
