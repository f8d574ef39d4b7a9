//! An upstream connection: plain TCP or TLS (a cluster's `transport_socket`).
//!
//! The HTTP/1.1 client ([`super::h1`]) reads without holding a buffer while it waits
//! (`poll_read_ready` then `try_read_buf`); [`UpstreamStream::poll_read_buf`] keeps that for
//! plain sockets and, for TLS, reads through rustls into a small stack buffer so the
//! connection's buffer still grows only when data arrived. Because h1 never flushes, the TLS
//! variant flushes rustls' pending records whenever it is read: a request's last bytes are
//! sent while its response is awaited. The I/O forwarding itself is [`MaybeTls`]'s. This
//! module must not know HTTP.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::tls::stream::MaybeTls;
use tokio::net::TcpStream;

/// A connected upstream socket, plain or TLS.
pub type UpstreamStream = MaybeTls<tokio_rustls::client::TlsStream<TcpStream>>;

impl UpstreamStream {
    /// Connects to `address` and, for a TLS cluster, runs the handshake (whose error names
    /// the cause, e.g. an unknown CA).
    pub async fn connect(
        address: std::net::SocketAddr,
        tls: Option<&crate::config::tls::UpstreamTls>,
    ) -> io::Result<Self> {
        let tcp = TcpStream::connect(address).await?;
        // Latency matters more than packet count for proxied requests.
        let _ = tcp.set_nodelay(true);
        match tls {
            None => Ok(UpstreamStream::Plain(tcp)),
            Some(tls) => Ok(UpstreamStream::Tls(Box::new(
                crate::tls::connect(tls, tcp, address).await?,
            ))),
        }
    }

    /// The ALPN protocol the TLS handshake negotiated (`None` for plain connections).
    pub fn alpn(&self) -> Option<&[u8]> {
        match self {
            UpstreamStream::Plain(_) => None,
            UpstreamStream::Tls(s) => s.get_ref().1.alpn_protocol(),
        }
    }

    /// Whether an idle connection may carry a request: still open and with nothing
    /// unsolicited to read (a read of 0 bytes is a close, data is a protocol error — for TLS
    /// any record, e.g. the peer's close_notify: rustls consumed the session tickets that
    /// came before the last response).
    pub fn is_usable(&self) -> bool {
        let mut probe = [0u8; 1];
        match self {
            UpstreamStream::Plain(s) => {
                matches!(s.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            UpstreamStream::Tls(s) => {
                let mut buf = ReadBuf::new(&mut probe);
                let mut cx = Context::from_waker(std::task::Waker::noop());
                s.get_ref().0.poll_peek(&mut cx, &mut buf).is_pending()
            }
        }
    }

    /// Reads into `buf` (growing it by up to `chunk` bytes only once data is available);
    /// `Ok(0)` at end of stream.
    pub fn poll_read_buf(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        chunk: usize,
    ) -> Poll<io::Result<usize>> {
        match self {
            UpstreamStream::Plain(s) => loop {
                ready!(s.poll_read_ready(cx))?;
                if buf.capacity() - buf.len() < chunk / 4 {
                    buf.reserve(chunk);
                }
                match s.try_read_buf(buf) {
                    Ok(n) => return Poll::Ready(Ok(n)),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            },
            UpstreamStream::Tls(s) => {
                // Pending means "flush later": the socket's waker is registered.
                if let Poll::Ready(Err(e)) = Pin::new(s.as_mut()).poll_flush(cx) {
                    return Poll::Ready(Err(e));
                }
                let mut stack = [0u8; 4096];
                let mut rb = ReadBuf::new(&mut stack);
                ready!(Pin::new(s.as_mut()).poll_read(cx, &mut rb))?;
                buf.extend_from_slice(rb.filled());
                Poll::Ready(Ok(rb.filled().len()))
            }
        }
    }
}
