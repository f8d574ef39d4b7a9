//! The upstream HTTP/1.1 client: a small request/response codec run by the task that forwards
//! the request, instead of hyper's client connection.
//!
//! Why: hyper's HTTP/1.1 client gives every connection a task of its own, a dispatch channel
//! (an unbounded mpsc whose blocks hold 32 request envelopes), an eagerly allocated write buffer
//! and a read buffer, all kept while the connection idles in the pool. With hundreds of pooled
//! upstream connections that was most of the proxy's heap. Here an idle pooled connection is a
//! [`Conn`]: the socket (plain or TLS, [`super::stream`]) and its stats guard, nothing else.
//!
//! Design: [`send`] writes the request head (serialized once per request into one buffer),
//! streams the request body with backpressure and, concurrently in the same poll, reads the
//! response head; `1xx` heads other than `101` are skipped. The response body is a [`Body`]
//! that owns the connection while it is read on demand; it keeps writing the request body when
//! polled (an upstream may answer before the request is complete, or echo it). Framing follows
//! RFC 9112 §6.3: no body for `HEAD`, `1xx`, `204` and `304`; `Transfer-Encoding: chunked`
//! (trailers become a trailers frame); `Content-Length`; otherwise until the connection closes.
//! When the body ends cleanly, the request was sent completely, nothing unread remains and both
//! sides allow keep-alive, the connection goes back to the pool and the read buffer is freed;
//! in every other case (a body dropped early, an error, a response that completed before the
//! request) the connection closes.
//!
//! Request framing mirrors hyper's client, which this replaces: an empty body sends no framing
//! header of its own, a body of known length gets `Content-Length`, one of unknown length
//! `Transfer-Encoding: chunked` (except `GET`, `HEAD` and `CONNECT`, sent without a body), and
//! request trailers are sent only when the `Trailer` header announces them.
//!
//! Limits: a response head (or trailer section) may take [`MAX_HEAD_SIZE`] bytes and
//! [`MAX_HEADERS`] fields; chunk-size lines must be valid hex. Violations are errors, never
//! panics.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf as _, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Response, StatusCode, Version};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::AsyncWrite;
#[cfg(test)]
use tokio::net::TcpStream;

use super::pool::{ConnectionGuard, Pool};
use super::stream::UpstreamStream;
use crate::http::body::{BoxError, RequestBody};

/// The largest response head (and trailer section) accepted, as Envoy's default
/// `max_request_headers_kb`.
pub const MAX_HEAD_SIZE: usize = 60 * 1024;
/// The most header fields in a response head (hyper's default).
pub const MAX_HEADERS: usize = 100;
/// How much the read buffer grows per read; it exists only while a response is read.
const READ_CHUNK: usize = 4096;
/// The longest chunk-size line (size and extensions).
const MAX_CHUNK_LINE: usize = 4096;

/// An idle upstream connection: the socket and its `upstream_cx_active` guard.
pub struct Conn {
    stream: UpstreamStream,
    _guard: ConnectionGuard,
}

impl Conn {
    pub fn new(stream: impl Into<UpstreamStream>, guard: ConnectionGuard) -> Self {
        Self {
            stream: stream.into(),
            _guard: guard,
        }
    }

    pub(super) fn guard(&self) -> &ConnectionGuard {
        &self._guard
    }

    pub(super) fn guard_mut(&mut self) -> &mut ConnectionGuard {
        &mut self._guard
    }

    /// Whether an idle connection may carry a request: still open and with nothing
    /// unsolicited to read (a read of 0 bytes is a close, data is a protocol error).
    pub fn is_usable(&self) -> bool {
        self.stream.is_usable()
    }
}

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connection closed before the response completed")]
    Closed,
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    #[error("invalid response head: {0}")]
    Parse(httparse::Error),
    #[error("response head larger than {MAX_HEAD_SIZE} bytes")]
    HeadTooLarge,
    #[error("invalid response: {0}")]
    Invalid(&'static str),
    #[error("invalid chunked encoding")]
    Chunk,
    #[error("request body failed: {0}")]
    RequestBody(BoxError),
    #[error("request body does not match its content-length")]
    RequestLength,
}

/// A failed exchange, with what the pool needs to decide whether to try again.
pub struct Failure {
    pub error: Error,
    /// Some byte of the request was written.
    pub wrote: bool,
    /// Some byte of the response was read.
    pub received: bool,
    /// The request body, if no frame of it was taken.
    pub body: Option<RequestBody>,
}

/// How the request body is framed on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Framing {
    /// No body is sent.
    Empty,
    Length(u64),
    /// Chunked; trailers named here (the `Trailer` header) are sent.
    Chunked(Vec<HeaderName>),
}

/// A request head serialized for the wire, reusable for a second try.
#[derive(Debug, Clone)]
pub struct Prepared {
    head: Bytes,
    framing: Framing,
    is_head: bool,
    close: bool,
}

impl Prepared {
    /// Whether the request goes without a body (whatever its body would yield).
    pub fn sends_no_body(&self) -> bool {
        self.framing == Framing::Empty
    }
}

/// Sets the framing headers as hyper's client does and serializes the head.
pub fn prepare(parts: &mut Parts, end_stream: bool, hint: &SizeHint) -> Prepared {
    let framing = set_framing(parts, end_stream, hint);
    let close = connection_has(&parts.headers, "close");
    let target = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut size = parts.method.as_str().len() + target.len() + 16;
    for (name, value) in &parts.headers {
        size += name.as_str().len() + value.len() + 4;
    }
    let mut head = Vec::with_capacity(size);
    head.extend_from_slice(parts.method.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(target.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    write_fields(&parts.headers, &mut head);
    head.extend_from_slice(b"\r\n");
    Prepared {
        head: Bytes::from(head),
        framing,
        is_head: parts.method == Method::HEAD,
        close,
    }
}

fn set_framing(parts: &mut Parts, end_stream: bool, hint: &SizeHint) -> Framing {
    let headers = &mut parts.headers;
    if end_stream {
        headers.remove(header::TRANSFER_ENCODING);
        return Framing::Empty;
    }
    let existing_len = content_length(headers).ok().flatten();
    let chunked = if let Some(te) = headers.get(header::TRANSFER_ENCODING) {
        if !is_chunked(headers) {
            let mut v = te.as_bytes().to_vec();
            v.extend_from_slice(b", chunked");
            if let Ok(v) = HeaderValue::from_bytes(&v) {
                headers.insert(header::TRANSFER_ENCODING, v);
            }
        }
        true
    } else if let Some(len) = existing_len {
        return Framing::Length(len);
    } else if let Some(len) = hint.exact() {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        return Framing::Length(len);
    } else if matches!(parts.method, Method::GET | Method::HEAD | Method::CONNECT) {
        return Framing::Empty;
    } else {
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        true
    };
    debug_assert!(chunked);
    headers.remove(header::CONTENT_LENGTH);
    let allowed = headers
        .get_all(header::TRAILER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|s| HeaderName::from_bytes(s.trim().as_bytes()).ok())
        .filter(is_valid_trailer)
        .collect();
    Framing::Chunked(allowed)
}

fn is_valid_trailer(name: &HeaderName) -> bool {
    !matches!(
        *name,
        header::AUTHORIZATION
            | header::CACHE_CONTROL
            | header::CONTENT_ENCODING
            | header::CONTENT_LENGTH
            | header::CONTENT_RANGE
            | header::CONTENT_TYPE
            | header::HOST
            | header::MAX_FORWARDS
            | header::SET_COOKIE
            | header::TRAILER
            | header::TRANSFER_ENCODING
            | header::TE
    )
}

fn write_fields(headers: &HeaderMap, out: &mut Vec<u8>) {
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// Whether a `Connection` header lists `token`.
fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Whether the last transfer coding is `chunked`.
fn is_chunked(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .next_back()
        .and_then(|v| v.as_bytes().split(|b| *b == b',').next_back())
        .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// All `Content-Length` values, which must agree; `Ok(None)` when there is none.
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, Error> {
    let mut found: Option<u64> = None;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        for part in v.as_bytes().split(|b| *b == b',') {
            let part = part.trim_ascii();
            if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
                return Err(Error::Invalid("content-length"));
            }
            let n = part.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
            if found.is_some_and(|f| f != n) {
                return Err(Error::Invalid("conflicting content-length"));
            }
            found = Some(n);
        }
    }
    Ok(found)
}

/// Sends a request on `conn` and waits for the final response head. The returned body owns
/// the connection and returns it to `pool` when it ends cleanly.
pub async fn send(
    pool: Arc<Pool>,
    conn: Conn,
    prepared: &Prepared,
    body: RequestBody,
) -> Result<Response<Body>, Failure> {
    let mut ex = Box::new(Exchange::new(pool, conn, prepared, body));
    match poll_fn(|cx| ex.poll_response(cx)).await {
        Ok(head) => {
            let done = matches!(ex.read, Read::Done);
            let mut body = Body { ex: Some(ex) };
            if done {
                body.finish();
            }
            Ok(head.map(|()| body))
        }
        Err(error) => Err(Failure {
            error,
            wrote: ex.wrote,
            received: ex.received,
            body: if ex.write.polled {
                None
            } else {
                ex.write.body.take()
            },
        }),
    }
}

struct Exchange {
    stream: UpstreamStream,
    guard: ConnectionGuard,
    pool: Arc<Pool>,
    buf: BytesMut,
    write: Write,
    read: Read,
    is_head: bool,
    keep_alive: bool,
    wrote: bool,
    received: bool,
}

struct Write {
    queue: VecDeque<Bytes>,
    body: Option<RequestBody>,
    framing: Framing,
    /// A frame of the body was taken: it cannot be sent again.
    polled: bool,
    state: WriteState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteState {
    /// Writing the queue, then the body.
    Active,
    /// The body ended; writing what is queued.
    Ending,
    Done,
    /// Writing stopped (the upstream closed or the body failed); the connection cannot be
    /// reused.
    Failed,
}

enum Read {
    Head,
    Body(Decode),
    Done,
}

enum Decode {
    Length(u64),
    Chunked(Chunk),
    Eof,
}

enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

impl Exchange {
    fn new(pool: Arc<Pool>, conn: Conn, prepared: &Prepared, body: RequestBody) -> Self {
        let mut queue = VecDeque::with_capacity(4);
        queue.push_back(prepared.head.clone());
        let body = (prepared.framing != Framing::Empty).then_some(body);
        Self {
            stream: conn.stream,
            guard: conn._guard,
            pool,
            buf: BytesMut::new(),
            write: Write {
                queue,
                body,
                framing: prepared.framing.clone(),
                polled: false,
                state: WriteState::Active,
            },
            read: Read::Head,
            is_head: prepared.is_head,
            keep_alive: !prepared.close,
            wrote: false,
            received: false,
        }
    }

    fn poll_response(&mut self, cx: &mut Context<'_>) -> Poll<Result<Response<()>, Error>> {
        if let Poll::Ready(Err(e)) = self.poll_write(cx) {
            return Poll::Ready(Err(e));
        }
        self.poll_head(cx)
    }

    /// Writes as much of the request as the socket and the body allow. Ready when writing is
    /// over; an error only when the request body failed. A failed write stops writing but is
    /// not an error here: the response (an early one) may still be read.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        loop {
            while let Some(front) = self.write.queue.front_mut() {
                match Pin::new(&mut self.stream).poll_write(cx, front) {
                    Poll::Ready(Ok(n)) if n > 0 => {
                        self.wrote = true;
                        front.advance(n);
                        if front.is_empty() {
                            self.write.queue.pop_front();
                        }
                    }
                    Poll::Ready(Ok(_)) | Poll::Ready(Err(_)) => {
                        self.stop_writing();
                        return Poll::Ready(Ok(()));
                    }
                    Poll::Pending => return Poll::Pending,
                }
            }
            match self.write.state {
                WriteState::Active => {}
                WriteState::Ending => {
                    self.write.state = WriteState::Done;
                    return Poll::Ready(Ok(()));
                }
                WriteState::Done | WriteState::Failed => return Poll::Ready(Ok(())),
            }
            let Some(body) = self.write.body.as_mut() else {
                self.write.state = WriteState::Ending;
                continue;
            };
            let frame = match Pin::new(body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(f) => f,
            };
            self.write.polled = true;
            match frame {
                None => {
                    self.write.body = None;
                    match &self.write.framing {
                        Framing::Length(0) | Framing::Empty => {}
                        Framing::Length(_) => {
                            self.stop_writing();
                            return Poll::Ready(Err(Error::RequestLength));
                        }
                        Framing::Chunked(_) => {
                            self.write.queue.push_back(Bytes::from_static(b"0\r\n\r\n"))
                        }
                    }
                    self.write.state = WriteState::Ending;
                }
                Some(Err(e)) => {
                    self.stop_writing();
                    return Poll::Ready(Err(Error::RequestBody(e)));
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        if data.is_empty() {
                            continue;
                        }
                        let len = data.len() as u64;
                        match &mut self.write.framing {
                            Framing::Length(remaining) => {
                                if len > *remaining {
                                    self.stop_writing();
                                    return Poll::Ready(Err(Error::RequestLength));
                                }
                                *remaining -= len;
                                self.write.queue.push_back(data);
                            }
                            Framing::Chunked(_) => {
                                self.write
                                    .queue
                                    .push_back(Bytes::from(format!("{len:X}\r\n")));
                                self.write.queue.push_back(data);
                                self.write.queue.push_back(Bytes::from_static(b"\r\n"));
                            }
                            Framing::Empty => {}
                        }
                    }
                    Err(frame) => {
                        let Ok(trailers) = frame.into_trailers() else {
                            continue;
                        };
                        if let Framing::Chunked(allowed) = &self.write.framing {
                            let mut out = b"0\r\n".to_vec();
                            for name in allowed {
                                for value in trailers.get_all(name) {
                                    out.extend_from_slice(name.as_str().as_bytes());
                                    out.extend_from_slice(b": ");
                                    out.extend_from_slice(value.as_bytes());
                                    out.extend_from_slice(b"\r\n");
                                }
                            }
                            out.extend_from_slice(b"\r\n");
                            self.write.queue.push_back(Bytes::from(out));
                            self.write.body = None;
                            self.write.state = WriteState::Ending;
                        }
                    }
                },
            }
        }
    }

    fn stop_writing(&mut self) {
        self.write.queue.clear();
        self.write.body = None;
        self.write.state = WriteState::Failed;
    }

    /// Reads more bytes into the buffer; `Ok(0)` at end of stream. The buffer grows only once
    /// the socket is readable: a request waiting for its response holds none.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<Result<usize, Error>> {
        let n = ready!(self.stream.poll_read_buf(cx, &mut self.buf, READ_CHUNK))?;
        if n > 0 {
            self.received = true;
        }
        Poll::Ready(Ok(n))
    }

    fn poll_head(&mut self, cx: &mut Context<'_>) -> Poll<Result<Response<()>, Error>> {
        loop {
            if !self.buf.is_empty() {
                match parse_head(&mut self.buf, self.is_head)? {
                    Parsed::Partial => {
                        if self.buf.len() >= MAX_HEAD_SIZE {
                            return Poll::Ready(Err(Error::HeadTooLarge));
                        }
                    }
                    Parsed::Informational => continue,
                    Parsed::Final {
                        response,
                        read,
                        keep_alive,
                    } => {
                        self.read = read;
                        self.keep_alive &= keep_alive;
                        return Poll::Ready(Ok(response));
                    }
                }
            }
            if ready!(self.poll_fill(cx))? == 0 {
                return Poll::Ready(Err(Error::Closed));
            }
        }
    }

    /// The next frame of the response body; `Ok(None)` at its end.
    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Frame<Bytes>>, Error>> {
        loop {
            let decode = match &mut self.read {
                Read::Head | Read::Done => return Poll::Ready(Ok(None)),
                Read::Body(d) => d,
            };
            match decode {
                Decode::Length(remaining) | Decode::Chunked(Chunk::Data(remaining)) => {
                    if self.buf.is_empty() {
                        if ready!(self.poll_fill(cx))? == 0 {
                            return Poll::Ready(Err(Error::Closed));
                        }
                        continue;
                    }
                    let take = usize::try_from(*remaining)
                        .unwrap_or(usize::MAX)
                        .min(self.buf.len());
                    let data = self.buf.split_to(take).freeze();
                    *remaining -= take as u64;
                    if *remaining == 0 {
                        self.read = match decode {
                            Decode::Chunked(_) => Read::Body(Decode::Chunked(Chunk::DataEnd)),
                            _ => Read::Done,
                        };
                    }
                    return Poll::Ready(Ok(Some(Frame::data(data))));
                }
                Decode::Eof => {
                    if !self.buf.is_empty() {
                        let data = self.buf.split().freeze();
                        return Poll::Ready(Ok(Some(Frame::data(data))));
                    }
                    if ready!(self.poll_fill(cx))? == 0 {
                        self.read = Read::Done;
                        return Poll::Ready(Ok(None));
                    }
                }
                Decode::Chunked(Chunk::Size) => {
                    let Some(end) = self.buf.iter().position(|b| *b == b'\n') else {
                        if self.buf.len() > MAX_CHUNK_LINE {
                            return Poll::Ready(Err(Error::Chunk));
                        }
                        if ready!(self.poll_fill(cx))? == 0 {
                            return Poll::Ready(Err(Error::Closed));
                        }
                        continue;
                    };
                    let size = chunk_size(&self.buf[..end])?;
                    self.buf.advance(end + 1);
                    *decode = Decode::Chunked(if size == 0 {
                        Chunk::Trailers
                    } else {
                        Chunk::Data(size)
                    });
                }
                Decode::Chunked(Chunk::DataEnd) => {
                    if self.buf.starts_with(b"\r\n") {
                        self.buf.advance(2);
                    } else if self.buf.starts_with(b"\n") {
                        self.buf.advance(1);
                    } else if self.buf.is_empty() || self.buf[..] == b"\r"[..] {
                        if ready!(self.poll_fill(cx))? == 0 {
                            return Poll::Ready(Err(Error::Closed));
                        }
                        continue;
                    } else {
                        return Poll::Ready(Err(Error::Chunk));
                    }
                    *decode = Decode::Chunked(Chunk::Size);
                }
                Decode::Chunked(Chunk::Trailers) => {
                    match parse_trailers(&self.buf)? {
                        Some((n, trailers)) => {
                            self.buf.advance(n);
                            self.read = Read::Done;
                            return Poll::Ready(Ok(
                                (!trailers.is_empty()).then(|| Frame::trailers(trailers))
                            ));
                        }
                        None => {
                            if self.buf.len() >= MAX_HEAD_SIZE {
                                return Poll::Ready(Err(Error::HeadTooLarge));
                            }
                        }
                    }
                    if ready!(self.poll_fill(cx))? == 0 {
                        return Poll::Ready(Err(Error::Closed));
                    }
                }
            }
        }
    }

    /// After the response ended: back to the pool if the exchange left the connection clean.
    fn release(self: Box<Self>) {
        let reusable = self.keep_alive
            && matches!(self.read, Read::Done)
            && self.write.state == WriteState::Done
            && self.buf.is_empty();
        if reusable {
            let Exchange {
                stream,
                guard,
                pool,
                ..
            } = *self;
            pool.release_http1(Conn::new(stream, guard));
        }
    }
}

enum Parsed {
    Partial,
    Informational,
    Final {
        response: Response<()>,
        read: Read,
        keep_alive: bool,
    },
}

/// Parses a response head at the start of `buf`, removing it when complete.
fn parse_head(buf: &mut BytesMut, is_head: bool) -> Result<Parsed, Error> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut fields);
    let len = match res.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(e) => return Err(Error::Parse(e)),
    };
    let code = res.code.ok_or(Error::Invalid("status"))?;
    let status = StatusCode::from_u16(code).map_err(|_| Error::Invalid("status"))?;
    let version = match res.version {
        Some(1) => Version::HTTP_11,
        Some(0) => Version::HTTP_10,
        _ => return Err(Error::Invalid("version")),
    };
    // Field positions, so that values can share the head's bytes once it is split off.
    let base = buf.as_ptr() as usize;
    let mut spans = Vec::with_capacity(res.headers.len());
    for h in res.headers.iter() {
        let start = h.value.as_ptr() as usize - base;
        let name =
            HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| Error::Invalid("header name"))?;
        spans.push((name, start, start + h.value.len()));
    }
    let head = buf.split_to(len).freeze();
    if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(Parsed::Informational);
    }
    let mut headers = HeaderMap::with_capacity(spans.len());
    for (name, start, end) in spans {
        let value = HeaderValue::from_maybe_shared(head.slice(start..end))
            .map_err(|_| Error::Invalid("header value"))?;
        headers.append(name, value);
    }
    let mut keep_alive = match version {
        Version::HTTP_11 => !connection_has(&headers, "close"),
        _ => connection_has(&headers, "keep-alive"),
    };
    let read = if is_head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        if status == StatusCode::SWITCHING_PROTOCOLS {
            keep_alive = false;
        }
        Read::Done
    } else if headers.contains_key(header::TRANSFER_ENCODING) {
        if version == Version::HTTP_10 {
            return Err(Error::Invalid("transfer-encoding in HTTP/1.0"));
        }
        if is_chunked(&headers) {
            Read::Body(Decode::Chunked(Chunk::Size))
        } else {
            keep_alive = false;
            Read::Body(Decode::Eof)
        }
    } else {
        match content_length(&headers)? {
            Some(0) => Read::Done,
            Some(n) => Read::Body(Decode::Length(n)),
            None => {
                keep_alive = false;
                Read::Body(Decode::Eof)
            }
        }
    };
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.version_mut() = version;
    *response.headers_mut() = headers;
    Ok(Parsed::Final {
        response,
        read,
        keep_alive,
    })
}

/// The size on a chunk-size line (`\n` excluded): hex digits, then optional extensions.
fn chunk_size(line: &[u8]) -> Result<u64, Error> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let digits = line
        .split(|b| *b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    if digits.is_empty() || digits.len() > 16 {
        return Err(Error::Chunk);
    }
    let mut size: u64 = 0;
    for d in digits {
        let v = (*d as char).to_digit(16).ok_or(Error::Chunk)?;
        size = (size << 4) | u64::from(v);
    }
    Ok(size)
}

/// The trailer section after the last chunk: its length and fields, or `None` if incomplete.
fn parse_trailers(buf: &[u8]) -> Result<Option<(usize, HeaderMap)>, Error> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    match httparse::parse_headers(buf, &mut fields) {
        Ok(httparse::Status::Complete((n, fields))) => {
            let mut map = HeaderMap::new();
            for f in fields {
                let name = HeaderName::from_bytes(f.name.as_bytes())
                    .map_err(|_| Error::Invalid("trailer name"))?;
                let value = HeaderValue::from_bytes(f.value)
                    .map_err(|_| Error::Invalid("trailer value"))?;
                map.append(name, value);
            }
            Ok(Some((n, map)))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(Error::Parse(e)),
    }
}

/// An upstream HTTP/1.1 response body, read from the connection on demand.
pub struct Body {
    ex: Option<Box<Exchange>>,
}

impl Body {
    fn finish(&mut self) {
        if let Some(ex) = self.ex.take() {
            ex.release();
        }
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        // A body known to be complete may be dropped unpolled; anything else closes.
        if self
            .ex
            .as_ref()
            .is_some_and(|ex| matches!(ex.read, Read::Done))
        {
            self.finish();
        }
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Some(ex) = this.ex.as_mut() else {
            return Poll::Ready(None);
        };
        // Keep sending the request while the response streams; a failing request body only
        // means the connection cannot be reused.
        let _ = ex.poll_write(cx);
        match ex.poll_body(cx) {
            Poll::Ready(Ok(frame)) => {
                if matches!(ex.read, Read::Done) {
                    this.finish();
                }
                Poll::Ready(frame.map(Ok))
            }
            Poll::Ready(Err(e)) => {
                this.ex = None;
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ex
            .as_ref()
            .is_none_or(|ex| matches!(ex.read, Read::Done))
    }

    fn size_hint(&self) -> SizeHint {
        match self.ex.as_ref().map(|ex| &ex.read) {
            None | Some(Read::Done) => SizeHint::with_exact(0),
            Some(Read::Body(Decode::Length(n))) => SizeHint::with_exact(*n),
            Some(_) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use http::Request;
    use http_body_util::BodyExt as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    use super::*;
    use crate::cluster::ClusterStats;
    use crate::cluster::host::HostStats;
    use crate::cluster::pool::PoolSettings;
    use crate::config::cluster::UpstreamProtocol;

    fn pool(address: SocketAddr) -> Arc<Pool> {
        Arc::new(Pool::new(
            address,
            PoolSettings {
                protocol: UpstreamProtocol::Http1,
                connect_timeout: Duration::from_secs(1),
                tls: None,
            },
            Arc::new(HostStats::default()),
            Arc::new(ClusterStats::default()),
        ))
    }

    /// Reads one request head (and nothing after it) from `s`.
    async fn read_head(s: &mut TcpStream) -> Vec<u8> {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match s.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => break,
            }
        }
        head
    }

    /// An upstream that answers one request with `response` written in pieces of `piece`
    /// bytes, then closes if `close`, else waits for the client to close.
    async fn upstream(response: Vec<u8>, piece: usize, close: bool) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            read_head(&mut s).await;
            for p in response.chunks(piece.max(1)) {
                if s.write_all(p).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            if !close {
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest).await;
            }
        });
        address
    }

    async fn exchange(
        method: Method,
        response: &[u8],
        piece: usize,
        close: bool,
    ) -> (Arc<Pool>, Result<Response<Body>, Error>) {
        let address = upstream(response.to_vec(), piece, close).await;
        let p = pool(address);
        let stream = TcpStream::connect(address).await.expect("connect");
        let conn = Conn::new(stream, p.connection_guard(p.force_connection()));
        let (mut parts, ()) = Request::builder()
            .method(method)
            .uri("/x")
            .header("host", "example")
            .body(())
            .expect("request")
            .into_parts();
        let prepared = prepare(&mut parts, true, &SizeHint::with_exact(0));
        let r = send(
            p.clone(),
            conn,
            &prepared,
            RequestBody::buffered(Bytes::new(), None),
        )
        .await;
        (p, r.map_err(|f| f.error))
    }

    async fn collect(r: Response<Body>) -> (http::response::Parts, Result<Bytes, BoxError>) {
        let (parts, body) = r.into_parts();
        let body = body.collect().await.map(|c| c.to_bytes());
        (parts, body)
    }

    #[tokio::test]
    async fn content_length_read_from_single_bytes_and_pooled() {
        let (p, r) = exchange(
            Method::GET,
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello",
            1,
            false,
        )
        .await;
        let (parts, body) = collect(r.expect("response")).await;
        assert_eq!(parts.status, 200);
        assert_eq!(parts.headers["x-a"], "b");
        assert_eq!(body.expect("body"), "hello");
        assert_eq!(p.idle_len(), 1);
    }

    #[tokio::test]
    async fn chunked_with_extensions_and_trailers() {
        let (p, r) = exchange(
            Method::GET,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: abc\r\n\r\n",
            3,
            false,
        )
        .await;
        let collected = r
            .expect("response")
            .into_body()
            .collect()
            .await
            .expect("body");
        assert_eq!(collected.trailers().expect("trailers")["x-checksum"], "abc");
        assert_eq!(collected.to_bytes(), "hello world");
        assert_eq!(p.idle_len(), 1);
    }

    #[tokio::test]
    async fn chunked_without_trailers_has_no_trailers_frame() {
        let (p, r) = exchange(
            Method::GET,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            1,
            false,
        )
        .await;
        let collected = r
            .expect("response")
            .into_body()
            .collect()
            .await
            .expect("body");
        assert!(collected.trailers().is_none());
        assert_eq!(collected.to_bytes(), "ok");
        assert_eq!(p.idle_len(), 1);
    }

    #[tokio::test]
    async fn close_delimited_body_reads_to_eof_and_is_not_pooled() {
        let (p, r) = exchange(
            Method::GET,
            b"HTTP/1.1 200 OK\r\n\r\nuntil the end",
            4,
            true,
        )
        .await;
        let (_, body) = collect(r.expect("response")).await;
        assert_eq!(body.expect("body"), "until the end");
        assert_eq!(p.idle_len(), 0);
    }

    #[tokio::test]
    async fn head_204_and_304_have_no_body() {
        let (p, r) = exchange(
            Method::HEAD,
            b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n",
            7,
            false,
        )
        .await;
        let r = r.expect("response");
        assert!(r.body().is_end_stream());
        assert_eq!(r.headers()["content-length"], "1234");
        assert_eq!(p.idle_len(), 1);
        for head in [
            &b"HTTP/1.1 204 No Content\r\n\r\n"[..],
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
        ] {
            let (p, r) = exchange(Method::GET, head, 5, false).await;
            let (_, body) = collect(r.expect("response")).await;
            assert!(body.expect("body").is_empty());
            assert_eq!(p.idle_len(), 1);
        }
    }

    #[tokio::test]
    async fn informational_heads_are_skipped() {
        let (_, r) = exchange(
            Method::GET,
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
            2,
            false,
        )
        .await;
        let (parts, body) = collect(r.expect("response")).await;
        assert_eq!(parts.status, 201);
        assert!(!parts.headers.contains_key("link"));
        assert_eq!(body.expect("body"), "ok");
    }

    #[tokio::test]
    async fn connection_close_and_http10_are_not_pooled() {
        for head in [
            &b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"[..],
            b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        ] {
            let (p, r) = exchange(Method::GET, head, 64, false).await;
            let (_, body) = collect(r.expect("response")).await;
            assert_eq!(body.expect("body"), "ok");
            assert_eq!(p.idle_len(), 0);
        }
        let (p, r) = exchange(
            Method::GET,
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
            64,
            false,
        )
        .await;
        let (_, body) = collect(r.expect("response")).await;
        assert_eq!(body.expect("body"), "ok");
        assert_eq!(p.idle_len(), 1);
    }

    #[tokio::test]
    async fn malformed_and_truncated_heads_are_errors() {
        let (_, r) = exchange(Method::GET, b"HTTP/1.1 2x0 OK\r\n\r\n", 64, true).await;
        assert!(matches!(r, Err(Error::Parse(_))), "{:?}", r.err());
        let (_, r) = exchange(Method::GET, b"HTTP/1.1 200 OK\r\nContent-", 64, true).await;
        assert!(matches!(r, Err(Error::Closed)), "{:?}", r.err());
        let (_, r) = exchange(Method::GET, b"", 64, true).await;
        assert!(matches!(r, Err(Error::Closed)), "{:?}", r.err());
        let (_, r) = exchange(
            Method::GET,
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
            64,
            true,
        )
        .await;
        assert!(matches!(r, Err(Error::Invalid(_))), "{:?}", r.err());
        let mut big = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..700 {
            big.extend_from_slice(format!("x-{i}: {}\r\n", "v".repeat(90)).as_bytes());
        }
        let (_, r) = exchange(Method::GET, &big, 8192, false).await;
        assert!(
            matches!(r, Err(Error::HeadTooLarge) | Err(Error::Parse(_))),
            "{:?}",
            r.err()
        );
        let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        let (_, r) = exchange(Method::GET, &many, 8192, false).await;
        assert!(
            matches!(r, Err(Error::Parse(httparse::Error::TooManyHeaders))),
            "{:?}",
            r.err()
        );
    }

    #[tokio::test]
    async fn invalid_chunks_and_short_bodies_fail_the_body() {
        for response in [
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokXX0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n11111111111111111\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
        ] {
            let (p, r) = exchange(Method::GET, response, 16, true).await;
            let (_, body) = collect(r.expect("response")).await;
            assert!(body.is_err());
            assert_eq!(p.idle_len(), 0);
        }
    }

    #[tokio::test]
    async fn a_body_dropped_early_closes_the_connection() {
        let (p, r) = exchange(
            Method::GET,
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello",
            64,
            false,
        )
        .await;
        let mut body = r.expect("response").into_body();
        let frame = body.frame().await.expect("frame").expect("data");
        assert_eq!(frame.into_data().expect("data"), "hello");
        drop(body);
        assert_eq!(p.idle_len(), 0);
    }

    fn prepared(method: Method, end_stream: bool, hint: SizeHint) -> (String, Framing) {
        let (mut parts, ()) = Request::builder()
            .method(method)
            .uri("/p?q=1")
            .header("host", "example")
            .header("trailer", "x-sum, content-type")
            .body(())
            .expect("request")
            .into_parts();
        let p = prepare(&mut parts, end_stream, &hint);
        (String::from_utf8_lossy(&p.head).into_owned(), p.framing)
    }

    #[test]
    fn request_framing_follows_the_body() {
        let (head, framing) = prepared(Method::POST, false, SizeHint::with_exact(3));
        assert!(
            head.starts_with("POST /p?q=1 HTTP/1.1\r\nhost: example\r\n"),
            "{head}"
        );
        assert!(head.contains("content-length: 3\r\n"), "{head}");
        assert!(head.ends_with("\r\n\r\n"));
        assert_eq!(framing, Framing::Length(3));
        let (head, framing) = prepared(Method::POST, false, SizeHint::new());
        assert!(head.contains("transfer-encoding: chunked\r\n"), "{head}");
        assert_eq!(
            framing,
            Framing::Chunked(vec![HeaderName::from_static("x-sum")])
        );
        let (head, framing) = prepared(Method::GET, false, SizeHint::new());
        assert!(!head.contains("transfer-encoding"), "{head}");
        assert_eq!(framing, Framing::Empty);
        let (head, framing) = prepared(Method::POST, true, SizeHint::with_exact(0));
        assert!(
            !head.contains("content-length") && !head.contains("transfer-encoding"),
            "{head}"
        );
        assert_eq!(framing, Framing::Empty);
    }

    #[test]
    fn chunk_sizes() {
        assert_eq!(chunk_size(b"1aF\r").ok(), Some(0x1af));
        assert_eq!(chunk_size(b"10 ; name=value").ok(), Some(16));
        assert_eq!(chunk_size(b"ffffffffffffffff").ok(), Some(u64::MAX));
        for bad in [&b""[..], b"\r", b"g", b"-1", b"0x10", b"11111111111111111"] {
            assert!(chunk_size(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn an_early_response_does_not_wait_for_the_request_body() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            read_head(&mut s).await;
            let _ = s
                .write_all(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n")
                .await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let p = pool(address);
        let stream = TcpStream::connect(address).await.expect("connect");
        let conn = Conn::new(stream, p.connection_guard(p.force_connection()));
        let (mut parts, ()) = Request::post("/upload")
            .header("host", "example")
            .body(())
            .expect("request")
            .into_parts();
        let body = Bytes::from(vec![b'x'; 16 * 1024 * 1024]);
        let prepared = prepare(&mut parts, false, &SizeHint::with_exact(body.len() as u64));
        let r = tokio::time::timeout(
            Duration::from_secs(3),
            send(
                p.clone(),
                conn,
                &prepared,
                RequestBody::buffered(body, None),
            ),
        )
        .await
        .expect("no deadlock");
        let r = r.map_err(|f| f.error).expect("response");
        assert_eq!(r.status(), 413);
        drop(r);
        assert_eq!(p.idle_len(), 0, "the request was not sent completely");
    }

    #[tokio::test]
    async fn requests_bodies_are_sent_with_their_framing() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let head = read_head(&mut s).await;
            let mut body = [0u8; 5];
            s.read_exact(&mut body).await.expect("body");
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                .await
                .expect("write");
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
            (head, body, rest)
        });
        let p = pool(address);
        let r = p
            .send(
                Request::post("/upload")
                    .header("host", "example")
                    .body(RequestBody::buffered(Bytes::from_static(b"hello"), None))
                    .expect("request"),
            )
            .await;
        let r = r.expect("response").response;
        assert_eq!(r.status(), 200);
        drop(r);
        assert_eq!(p.idle_len(), 1);
        drop(p);
        let (head, body, rest) = server.await.expect("server");
        let head = String::from_utf8_lossy(&head).into_owned();
        assert!(head.starts_with("POST /upload HTTP/1.1\r\n"), "{head}");
        assert!(head.contains("content-length: 5\r\n"), "{head}");
        assert_eq!(&body, b"hello");
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn a_pooled_connection_closed_under_a_request_is_retried_on_a_fresh_one() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move {
            // First connection: one response, then it takes the next request and closes
            // without answering.
            let (mut s, _) = listener.accept().await.expect("accept");
            read_head(&mut s).await;
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
                .await
                .expect("write");
            read_head(&mut s).await;
            drop(s);
            let (mut s, _) = listener.accept().await.expect("accept");
            read_head(&mut s).await;
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")
                .await
                .expect("write");
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
        });
        let p = pool(address);
        let get = || {
            Request::get("/")
                .header("host", "example")
                .body(RequestBody::buffered(Bytes::new(), None))
                .expect("request")
        };
        for expected in ["first", "second"] {
            let r = p.send(get()).await.expect("response").response;
            let body = r.into_body().collect().await.expect("body").to_bytes();
            assert_eq!(body, expected);
        }
        assert_eq!(p.idle_len(), 1);
    }

    #[tokio::test]
    async fn a_post_is_not_sent_twice_when_a_pooled_connection_dies_after_taking_it() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            read_head(&mut s).await;
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await
                .expect("write");
            // The POST arrives, then the connection dies without an answer.
            let _ = seen_tx.send(read_head(&mut s).await);
            drop(s);
            // A second connection would be a replay.
            if let Ok((mut s, _)) = listener.accept().await {
                let _ = seen_tx.send(read_head(&mut s).await);
            }
        });
        let p = pool(address);
        let r = p
            .send(
                Request::get("/")
                    .header("host", "example")
                    .body(RequestBody::buffered(Bytes::new(), None))
                    .expect("request"),
            )
            .await
            .expect("response")
            .response;
        r.into_body().collect().await.expect("body");
        let post = Request::post("/orders")
            .header("host", "example")
            .body(RequestBody::buffered(Bytes::from_static(b"{}"), None))
            .expect("request");
        match p.send(post).await {
            Err(crate::cluster::pool::UpstreamError::Reset(_)) => {}
            Err(e) => panic!("expected a reset, got {e}"),
            Ok(_) => panic!("no answer, no replay: expected an error"),
        }
        let first = seen
            .recv()
            .await
            .expect("the POST reached the upstream once");
        assert!(
            first.starts_with(b"POST /orders"),
            "{}",
            String::from_utf8_lossy(&first)
        );
        let again = tokio::time::timeout(Duration::from_millis(300), seen.recv()).await;
        assert!(again.is_err(), "the POST was sent a second time");
    }
}
