//! Repair of a URL sent as HTTP/2 `:authority`, so that etcdctl's `--cluster` works.
//!
//! etcd 3.4's clientv3 dials one member directly (`Maintenance.Status`/`HashKV` of an
//! endpoint, which `etcdctl endpoint status|hashkv --cluster` uses) with the gRPC target
//! `passthrough:///http://127.0.0.1:2379`, so grpc-go sends `http://127.0.0.1:2379` as
//! `:authority`. Go's server ignores the authority; h2 parses it, finds a malformed
//! authority and resets every stream of that connection before tonic sees a request.
//!
//! [`RepairAuthority`] wraps an accepted connection's read side. It reads the client's
//! preface and frames up to the end of the first header block and decodes it (HPACK).
//! - If that block's `:authority` is well formed (every client but the one above), it
//!   hands on the original bytes and from then on only forwards reads: no parsing, no
//!   copy.
//! - Otherwise it rewrites the connection: every header block is decoded, its
//!   `:authority` replaced by the URL's `host:port`, and encoded again with its own HPACK
//!   encoder, whose dynamic table h2's decoder mirrors from then on. Other frames pass
//!   through unchanged.
//!
//! It must never change the bytes of a connection whose first authority is well formed,
//! never touch the write side, and never buffer more than one header block
//! ([`MAX_HEADER_BLOCK`]). Input it cannot parse before it has changed anything is handed
//! on unchanged, so h2 answers it as it would have without this module.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::codegen::http;

/// The client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// h2's default SETTINGS_MAX_FRAME_SIZE, which the server advertises: re-encoded blocks
/// are split into frames no larger.
const MAX_FRAME: usize = 16_384;
/// The largest header block gathered (all its HEADERS and CONTINUATION frames). etcd
/// requests carry a few hundred bytes of headers.
pub const MAX_HEADER_BLOCK: usize = 1 << 20;

/// Where the connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Waiting for the client preface.
    Preface,
    /// Before the end of the first header block.
    Inspect,
    /// The first `:authority` was a URL: every header block is re-encoded.
    Rewrite,
    /// Nothing more to look at: reads are forwarded.
    Passthrough,
}

/// A header block being gathered.
#[derive(Default)]
struct Block {
    stream_id: u32,
    end_stream: bool,
    /// The frames as received, handed on unchanged if nothing needs repair.
    raw: Vec<u8>,
    /// The HPACK fragments, concatenated.
    fragment: Vec<u8>,
}

/// What [`Repair::process`] needs next.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Go on with the input there is.
    Continue,
    /// More input.
    NeedInput,
    /// Nothing: hand on the rest of the input and forward from now on.
    Done,
}

/// The byte-stream transformation, without I/O: input from the client in, input for h2
/// out.
pub struct Repair {
    mode: Mode,
    /// Bytes of the current non-header frame still to forward.
    forward: usize,
    block: Option<Block>,
    decoder: loona_hpack::Decoder<'static>,
    encoder: loona_hpack::Encoder<'static>,
}

impl Default for Repair {
    fn default() -> Self {
        Repair {
            mode: Mode::Preface,
            forward: 0,
            block: None,
            decoder: loona_hpack::Decoder::new(),
            encoder: loona_hpack::Encoder::new(),
        }
    }
}

fn malformed(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("HTTP/2 from client: {what}"),
    )
}

impl Repair {
    /// True once every further byte is forwarded unchanged.
    pub fn passthrough(&self) -> bool {
        self.mode == Mode::Passthrough
    }

    /// Moves what can be processed from `input` to `out`. In passthrough mode the rest of
    /// `input` is the caller's to forward. An error means the connection must end: its
    /// header blocks were being rewritten and one could not be decoded.
    pub fn process(&mut self, input: &mut BytesMut, out: &mut BytesMut) -> io::Result<()> {
        loop {
            match self.step(input, out)? {
                Step::Continue => {}
                Step::NeedInput => return Ok(()),
                Step::Done => {
                    self.mode = Mode::Passthrough;
                    self.block = None;
                    out.extend_from_slice(&input.split());
                    return Ok(());
                }
            }
        }
    }

    /// Called at the end of input: what was gathered is handed on as it came.
    pub fn finish(&mut self, input: &mut BytesMut, out: &mut BytesMut) {
        if let Some(block) = self.block.take() {
            out.extend_from_slice(&block.raw);
        }
        out.extend_from_slice(&input.split());
        self.mode = Mode::Passthrough;
    }

    /// Gives up on looking: hands on the gathered bytes as they came.
    fn give_up(&mut self, out: &mut BytesMut) -> io::Result<Step> {
        if self.mode == Mode::Rewrite {
            return Err(malformed("a header block that cannot be rewritten"));
        }
        if let Some(block) = self.block.take() {
            out.extend_from_slice(&block.raw);
        }
        Ok(Step::Done)
    }

    fn step(&mut self, input: &mut BytesMut, out: &mut BytesMut) -> io::Result<Step> {
        if self.mode == Mode::Passthrough {
            return Ok(Step::Done);
        }
        if self.forward > 0 {
            let n = self.forward.min(input.len());
            out.extend_from_slice(&input.split_to(n));
            self.forward -= n;
            return Ok(if input.is_empty() {
                Step::NeedInput
            } else {
                Step::Continue
            });
        }
        if self.mode == Mode::Preface {
            let n = input.len().min(PREFACE.len());
            if input[..n] != PREFACE[..n] {
                return Ok(Step::Done);
            }
            if n < PREFACE.len() {
                return Ok(Step::NeedInput);
            }
            out.extend_from_slice(&input.split_to(PREFACE.len()));
            self.mode = Mode::Inspect;
        }
        if input.len() < FRAME_HEADER {
            return Ok(Step::NeedInput);
        }
        let len = u32::from_be_bytes([0, input[0], input[1], input[2]]) as usize;
        let kind = input[3];
        let flags = input[4];
        let stream_id = u32::from_be_bytes([input[5], input[6], input[7], input[8]]) & !(1 << 31);
        if kind != HEADERS && kind != CONTINUATION {
            if self.block.is_some() {
                // A header block must not be interrupted (RFC 9113 §6.10).
                return self.give_up(out);
            }
            out.extend_from_slice(&input.split_to(FRAME_HEADER));
            self.forward = len;
            return Ok(Step::Continue);
        }
        let gathered = self.block.as_ref().map_or(0, |b| b.raw.len());
        if gathered + FRAME_HEADER + len > MAX_HEADER_BLOCK {
            return self.give_up(out);
        }
        if input.len() < FRAME_HEADER + len {
            input.reserve(FRAME_HEADER + len - input.len());
            return Ok(Step::NeedInput);
        }
        let frame = input.split_to(FRAME_HEADER + len);
        let payload = &frame[FRAME_HEADER..];
        let fragment = if kind == HEADERS {
            if self.block.is_some() {
                return self.give_up_with(frame, out);
            }
            match headers_fragment(flags, payload) {
                Some(f) => f,
                None => return self.give_up_with(frame, out),
            }
        } else {
            match &self.block {
                Some(b) if b.stream_id == stream_id => payload,
                _ => return self.give_up_with(frame, out),
            }
        };
        let block = self.block.get_or_insert_with(|| Block {
            stream_id,
            end_stream: flags & END_STREAM != 0,
            ..Block::default()
        });
        block.raw.extend_from_slice(&frame);
        block.fragment.extend_from_slice(fragment);
        if flags & END_HEADERS == 0 {
            return Ok(Step::Continue);
        }
        let block = self.block.take().expect("gathered above");
        self.end_of_block(block, out)
    }

    /// Gives up with a frame already taken from the input: it is handed on after the
    /// block gathered before it.
    fn give_up_with(&mut self, frame: BytesMut, out: &mut BytesMut) -> io::Result<Step> {
        let step = self.give_up(out)?;
        out.extend_from_slice(&frame);
        Ok(step)
    }

    fn end_of_block(&mut self, block: Block, out: &mut BytesMut) -> io::Result<Step> {
        let headers = match self.decoder.decode(&block.fragment) {
            Ok(h) => h,
            Err(_) => {
                self.block = Some(block);
                return self.give_up(out);
            }
        };
        if self.mode == Mode::Inspect {
            let url = headers.iter().any(|(n, v)| {
                n == b":authority" && http::uri::Authority::try_from(&v[..]).is_err()
            });
            if !url {
                out.extend_from_slice(&block.raw);
                return Ok(Step::Done);
            }
            tracing::debug!("client sends a URL as :authority: rewriting its header blocks");
            self.mode = Mode::Rewrite;
        }
        let repaired = headers.iter().map(|(n, v)| {
            if n == b":authority" {
                (&n[..], repair(v))
            } else {
                (&n[..], &v[..])
            }
        });
        let encoded = self.encoder.encode(repaired);
        write_block(block.stream_id, block.end_stream, &encoded, out);
        Ok(Step::Continue)
    }
}

/// The HPACK fragment of a HEADERS frame's payload, without padding and priority.
fn headers_fragment(flags: u8, payload: &[u8]) -> Option<&[u8]> {
    let mut start = 0;
    let mut pad = 0;
    if flags & PADDED != 0 {
        pad = *payload.first()? as usize;
        start = 1;
    }
    if flags & PRIORITY != 0 {
        start += 5;
    }
    let end = payload.len().checked_sub(pad)?;
    payload.get(start..end)
}

/// The `host:port` of a URL given as authority; anything else unchanged.
fn repair(value: &[u8]) -> &[u8] {
    let rest = match value.windows(3).position(|w| w == b"://") {
        Some(i) => &value[i + 3..],
        None => value,
    };
    let end = rest.iter().position(|&c| c == b'/').unwrap_or(rest.len());
    &rest[..end]
}

/// One header block as a HEADERS frame and as many CONTINUATION frames as
/// [`MAX_FRAME`] needs.
fn write_block(stream_id: u32, end_stream: bool, block: &[u8], out: &mut BytesMut) {
    let mut chunks = block.chunks(MAX_FRAME).peekable();
    let mut kind = HEADERS;
    let mut flags = if end_stream { END_STREAM } else { 0 };
    if chunks.peek().is_none() {
        frame_header(0, kind, flags | END_HEADERS, stream_id, out);
        return;
    }
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        frame_header(
            chunk.len(),
            kind,
            flags | if last { END_HEADERS } else { 0 },
            stream_id,
            out,
        );
        out.extend_from_slice(chunk);
        kind = CONTINUATION;
        flags = 0;
    }
}

fn frame_header(len: usize, kind: u8, flags: u8, stream_id: u32, out: &mut BytesMut) {
    out.put_slice(&(len as u32).to_be_bytes()[1..]);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream_id);
}

/// An accepted connection whose client-to-server bytes pass through [`Repair`].
pub struct RepairAuthority<IO> {
    inner: IO,
    repair: Repair,
    /// Read from the client, not yet processed.
    input: BytesMut,
    /// Processed, not yet read by h2.
    out: BytesMut,
    eof: bool,
}

impl<IO> RepairAuthority<IO> {
    pub fn new(inner: IO) -> Self {
        RepairAuthority {
            inner,
            repair: Repair::default(),
            input: BytesMut::new(),
            out: BytesMut::new(),
            eof: false,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for RepairAuthority<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.out.is_empty() {
                let n = this.out.len().min(buf.remaining());
                buf.put_slice(&this.out[..n]);
                this.out.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            if this.repair.passthrough() {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            this.repair.process(&mut this.input, &mut this.out)?;
            if !this.out.is_empty() || this.repair.passthrough() {
                continue;
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if read.filled().is_empty() => {
                    this.repair.finish(&mut this.input, &mut this.out);
                    this.eof = true;
                }
                Poll::Ready(Ok(())) => this.input.extend_from_slice(read.filled()),
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for RepairAuthority<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<IO: tonic::transport::server::Connected> tonic::transport::server::Connected
    for RepairAuthority<IO>
{
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client's side of the connection: the preface and an HPACK encoder whose dynamic
    /// table carries over from block to block, as grpc-go's does.
    struct Client {
        encoder: loona_hpack::Encoder<'static>,
        bytes: Vec<u8>,
    }

    impl Client {
        fn new() -> Self {
            Client {
                encoder: loona_hpack::Encoder::new(),
                bytes: PREFACE.to_vec(),
            }
        }

        fn frame(&mut self, kind: u8, flags: u8, stream_id: u32, payload: &[u8]) -> &mut Self {
            let mut out = BytesMut::new();
            frame_header(payload.len(), kind, flags, stream_id, &mut out);
            self.bytes.extend_from_slice(&out);
            self.bytes.extend_from_slice(payload);
            self
        }

        fn settings(&mut self) -> &mut Self {
            self.frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100])
        }

        fn request(&mut self, stream_id: u32, authority: &str) -> &mut Self {
            let block = self.encoder.encode(request_headers(authority));
            self.frame(HEADERS, END_HEADERS, stream_id, &block)
        }

        fn data(&mut self, stream_id: u32, payload: &[u8]) -> &mut Self {
            self.frame(0x0, END_STREAM, stream_id, payload)
        }
    }

    fn request_headers(authority: &str) -> Vec<(&'static [u8], &[u8])> {
        vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/etcdserverpb.Maintenance/Status"),
            (b":authority", authority.as_bytes()),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        ]
    }

    /// Runs `input` through a [`Repair`] in chunks of `chunk` bytes, as reads arrive.
    fn run(input: &[u8], chunk: usize) -> io::Result<(Vec<u8>, bool)> {
        let mut repair = Repair::default();
        let mut pending = BytesMut::new();
        let mut out = BytesMut::new();
        for piece in input.chunks(chunk) {
            if repair.passthrough() {
                out.extend_from_slice(piece);
                continue;
            }
            pending.extend_from_slice(piece);
            repair.process(&mut pending, &mut out)?;
        }
        let passthrough = repair.passthrough();
        repair.finish(&mut pending, &mut out);
        Ok((out.to_vec(), passthrough))
    }

    /// What h2 sees: the frames after the preface, header blocks gathered and decoded
    /// with one decoder for the connection.
    #[derive(Debug, PartialEq)]
    enum Seen {
        Headers {
            stream_id: u32,
            end_stream: bool,
            headers: Vec<(Vec<u8>, Vec<u8>)>,
        },
        Other {
            kind: u8,
            stream_id: u32,
            payload: Vec<u8>,
        },
    }

    fn frames(bytes: &[u8]) -> Vec<Seen> {
        assert_eq!(&bytes[..PREFACE.len()], PREFACE);
        let mut rest = &bytes[PREFACE.len()..];
        let mut decoder = loona_hpack::Decoder::new();
        let mut seen = Vec::new();
        let mut block: Option<(u32, bool, Vec<u8>)> = None;
        while !rest.is_empty() {
            let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            let (kind, flags) = (rest[3], rest[4]);
            let stream_id = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]);
            let payload = &rest[FRAME_HEADER..FRAME_HEADER + len];
            rest = &rest[FRAME_HEADER + len..];
            match kind {
                HEADERS => {
                    assert!(block.is_none());
                    let fragment = headers_fragment(flags, payload).unwrap().to_vec();
                    block = Some((stream_id, flags & END_STREAM != 0, fragment));
                }
                CONTINUATION => block.as_mut().unwrap().2.extend_from_slice(payload),
                _ => {
                    assert!(block.is_none());
                    seen.push(Seen::Other {
                        kind,
                        stream_id,
                        payload: payload.to_vec(),
                    });
                    continue;
                }
            }
            if flags & END_HEADERS != 0 {
                let (stream_id, end_stream, fragment) = block.take().unwrap();
                let headers = decoder.decode(&fragment).unwrap();
                seen.push(Seen::Headers {
                    stream_id,
                    end_stream,
                    headers,
                });
            }
        }
        assert!(block.is_none(), "a header block left open");
        seen
    }

    fn authorities(seen: &[Seen]) -> Vec<String> {
        seen.iter()
            .filter_map(|s| match s {
                Seen::Headers { headers, .. } => headers
                    .iter()
                    .find(|(n, _)| n == b":authority")
                    .map(|(_, v)| String::from_utf8(v.clone()).unwrap()),
                Seen::Other { .. } => None,
            })
            .collect()
    }

    #[test]
    fn a_well_formed_authority_leaves_the_connection_untouched() {
        let mut client = Client::new();
        client
            .settings()
            .request(1, "127.0.0.1:2379")
            .data(1, b"abc");
        client.request(3, "127.0.0.1:2379").data(3, b"def");
        for chunk in [1, 7, 100, usize::MAX] {
            let (out, passthrough) = run(&client.bytes, chunk).unwrap();
            assert_eq!(out, client.bytes, "chunk {chunk}");
            assert!(passthrough, "chunk {chunk}");
        }
    }

    #[test]
    fn a_url_authority_is_rewritten_on_every_request_of_the_connection() {
        let mut client = Client::new();
        client
            .settings()
            .request(1, "http://127.0.0.1:2379")
            .data(1, b"abc");
        client
            .request(3, "http://127.0.0.1:2379")
            .data(3, &[7; 40_000]);
        client
            .request(5, "https://[::1]:2379/some/path")
            .data(5, b"");
        let expected = frames(&client.bytes);
        for chunk in [1, 9, 1000, usize::MAX] {
            let (out, passthrough) = run(&client.bytes, chunk).unwrap();
            assert!(!passthrough);
            let seen = frames(&out);
            assert_eq!(
                authorities(&seen),
                ["127.0.0.1:2379", "127.0.0.1:2379", "[::1]:2379"]
            );
            // Apart from the authority, h2 sees what the client sent.
            assert_eq!(seen.len(), expected.len());
            for (got, sent) in seen.iter().zip(&expected) {
                match (got, sent) {
                    (
                        Seen::Headers {
                            stream_id: a,
                            end_stream: x,
                            headers: got,
                        },
                        Seen::Headers {
                            stream_id: b,
                            end_stream: y,
                            headers: sent,
                        },
                    ) => {
                        assert_eq!((a, x), (b, y));
                        let strip = |h: &Vec<(Vec<u8>, Vec<u8>)>| {
                            h.iter()
                                .filter(|(n, _)| n != b":authority")
                                .cloned()
                                .collect::<Vec<_>>()
                        };
                        assert_eq!(strip(got), strip(sent));
                    }
                    _ => assert_eq!(got, sent),
                }
            }
        }
    }

    #[test]
    fn an_authority_taken_from_the_dynamic_table_is_rewritten_too() {
        // As Go's HPACK encoder does: the first request adds :path and :authority to the
        // dynamic table (literal with incremental indexing), the second refers to them.
        let literal = |prefix: u8, value: &[u8]| {
            let mut v = vec![prefix, value.len() as u8];
            v.extend_from_slice(value);
            v
        };
        let path: &[u8] = b"/etcdserverpb.Maintenance/Status";
        let url: &[u8] = b"http://127.0.0.1:2379";
        let mut first = vec![0x83, 0x86];
        first.extend(literal(0x44, path));
        first.extend(literal(0x41, url));
        let second = [0x83, 0x86, 0x80 | 63, 0x80 | 62];
        let mut client = Client::new();
        client.settings().frame(HEADERS, END_HEADERS, 1, &first);
        client.frame(HEADERS, END_HEADERS | END_STREAM, 3, &second);
        // Unchanged, h2 would read the URL twice.
        assert_eq!(
            authorities(&frames(&client.bytes)),
            [url, url].map(|u| String::from_utf8(u.to_vec()).unwrap())
        );
        let (out, _) = run(&client.bytes, 5).unwrap();
        let seen = frames(&out);
        assert_eq!(authorities(&seen), ["127.0.0.1:2379", "127.0.0.1:2379"]);
        let Seen::Headers { headers, .. } = &seen[1] else {
            panic!("{seen:?}")
        };
        assert!(headers.contains(&(b":path".to_vec(), path.to_vec())));
    }

    #[test]
    fn padding_priority_and_continuation_frames_are_understood() {
        let mut client = Client::new();
        let block = client
            .encoder
            .encode(request_headers("http://127.0.0.1:2379"));
        let (first, second) = block.split_at(block.len() / 2);
        // HEADERS with 3 bytes of padding and a priority, the rest in a CONTINUATION.
        let mut payload = vec![3];
        payload.extend_from_slice(&[0, 0, 0, 0, 16]);
        payload.extend_from_slice(first);
        payload.extend_from_slice(&[0; 3]);
        client.frame(HEADERS, PADDED | PRIORITY | END_STREAM, 1, &payload);
        client.frame(CONTINUATION, END_HEADERS, 1, second);
        let (out, _) = run(&client.bytes, usize::MAX).unwrap();
        let seen = frames(&out);
        assert_eq!(authorities(&seen), ["127.0.0.1:2379"]);
        assert!(matches!(
            seen[0],
            Seen::Headers {
                stream_id: 1,
                end_stream: true,
                ..
            }
        ));
    }

    #[test]
    fn a_rewritten_block_larger_than_a_frame_is_split() {
        let mut client = Client::new();
        let big = "x".repeat(40_000);
        let mut headers = request_headers("http://127.0.0.1:2379");
        headers.push((b"x-big", big.as_bytes()));
        let block = client.encoder.encode(headers);
        for (i, chunk) in block.chunks(MAX_FRAME).enumerate() {
            let kind = if i == 0 { HEADERS } else { CONTINUATION };
            let last = (i + 1) * MAX_FRAME >= block.len();
            client.frame(kind, if last { END_HEADERS } else { 0 }, 1, chunk);
        }
        let (out, _) = run(&client.bytes, 4096).unwrap();
        let seen = frames(&out);
        assert_eq!(authorities(&seen), ["127.0.0.1:2379"]);
        let Seen::Headers { headers, .. } = &seen[0] else {
            panic!("{seen:?}")
        };
        assert!(headers
            .iter()
            .any(|(n, v)| n == b"x-big" && v == big.as_bytes()));
    }

    #[test]
    fn what_cannot_be_parsed_before_a_rewrite_is_handed_on_unchanged() {
        let garbage = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".to_vec();
        let mut bad_hpack = Client::new();
        bad_hpack
            .settings()
            .frame(HEADERS, END_HEADERS, 1, &[0xff, 0xff, 0xff, 0xff, 0xff]);
        let mut continuation_first = Client::new();
        continuation_first.frame(CONTINUATION, END_HEADERS, 1, &[0x82]);
        let mut interrupted = Client::new();
        interrupted.frame(HEADERS, 0, 1, &[0x82]).data(1, b"x");
        let mut oversized = Client::new();
        oversized.frame(HEADERS, END_HEADERS, 1, &vec![0; MAX_HEADER_BLOCK]);
        let mut bad_padding = Client::new();
        bad_padding.frame(HEADERS, PADDED | END_HEADERS, 1, &[200, 0x82]);
        for input in [
            garbage,
            PREFACE[..10].to_vec(),
            bad_hpack.bytes,
            continuation_first.bytes,
            interrupted.bytes,
            oversized.bytes,
            bad_padding.bytes,
        ] {
            for chunk in [1, 13, usize::MAX] {
                let (out, _) = run(&input, chunk).unwrap();
                assert_eq!(out, input, "chunk {chunk}");
            }
        }
    }

    #[test]
    fn a_block_that_cannot_be_decoded_after_a_rewrite_ends_the_connection() {
        let mut client = Client::new();
        client.request(1, "http://127.0.0.1:2379");
        client.frame(HEADERS, END_HEADERS, 3, &[0xff, 0xff, 0xff, 0xff, 0xff]);
        let err = run(&client.bytes, usize::MAX).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn repair_takes_the_host_and_port_of_a_url() {
        assert_eq!(repair(b"http://127.0.0.1:2379"), b"127.0.0.1:2379");
        assert_eq!(repair(b"https://a.example:1/x/y"), b"a.example:1");
        assert_eq!(repair(b"127.0.0.1:2379"), b"127.0.0.1:2379");
        assert_eq!(repair(b"unix://"), b"");
    }

    #[tokio::test]
    async fn the_wrapper_reads_through_the_repair() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut client = Client::new();
        client
            .settings()
            .request(1, "http://127.0.0.1:2379")
            .data(1, b"abc");
        let (mut near, far) = tokio::io::duplex(64);
        let mut conn = RepairAuthority::new(far);
        let sent = client.bytes.clone();
        let writer = tokio::spawn(async move {
            near.write_all(&sent).await.unwrap();
            near.shutdown().await.unwrap();
            near
        });
        let mut got = Vec::new();
        conn.read_to_end(&mut got).await.unwrap();
        let mut near = writer.await.unwrap();
        assert_eq!(authorities(&frames(&got)), ["127.0.0.1:2379"]);
        // The write side is the connection's own.
        conn.write_all(b"reply").await.unwrap();
        let mut reply = [0u8; 5];
        near.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"reply");
    }
}
