//! The TLS inspector listener filter (`envoy.filters.listener.tls_inspector`): peeks at a new
//! connection, without consuming anything, for a TLS ClientHello and reports its SNI and ALPN
//! list for filter chain matching (`server_names`, `transport_protocol: tls`,
//! `application_protocols`).
//!
//! A connection whose first bytes are not a TLS handshake record is `raw_buffer`, as in Envoy.
//! The ClientHello is parsed by rustls' `Acceptor` on a copy of the peeked bytes. Peeking does
//! not wait for *more* bytes, so a ClientHello split over several segments (rare) is polled
//! with a short pause; the listener bounds the whole inspection with Envoy's
//! `listener_filters_timeout` default ([`TIMEOUT`]). This module must not choose chains.

use std::io;
use std::time::Duration;

use tokio::net::TcpStream;

/// Envoy's default `listener_filters_timeout`: a connection whose ClientHello has not arrived
/// by then is closed.
pub const TIMEOUT: Duration = Duration::from_secs(15);
/// The largest ClientHello read (Envoy's TLS inspector limit).
const MAX_CLIENT_HELLO: usize = 16 * 1024;

/// What the inspector found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inspected {
    /// `tls` or `raw_buffer`.
    pub transport_protocol: &'static str,
    /// SNI, lower-case.
    pub server_name: Option<String>,
    /// The client's ALPN list.
    pub application_protocols: Vec<String>,
}

impl Inspected {
    pub fn raw() -> Self {
        Self {
            transport_protocol: crate::config::listener::RAW_BUFFER,
            ..Default::default()
        }
    }
}

/// Peeks at `stream` until a ClientHello is complete, or the bytes are not TLS.
pub async fn inspect(stream: &TcpStream) -> io::Result<Inspected> {
    let mut buf = vec![0u8; 1024];
    let mut last = 0;
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        // A TLS record: handshake (22), version 3.x.
        if buf[0] != 0x16 || (n > 1 && buf[1] != 0x03) {
            return Ok(Inspected::raw());
        }
        match parse(&buf[..n]) {
            Parsed::Hello(h) => return Ok(h),
            Parsed::NotTls => return Ok(Inspected::raw()),
            Parsed::Partial if n == buf.len() && buf.len() < MAX_CLIENT_HELLO + 5 => {
                buf.resize((buf.len() * 4).min(MAX_CLIENT_HELLO + 5), 0);
                continue;
            }
            Parsed::Partial if n == buf.len() => return Ok(Inspected::raw()),
            Parsed::Partial => {}
        }
        if n == last {
            // Nothing new yet: peeking again would return at once.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        last = n;
    }
}

enum Parsed {
    Hello(Inspected),
    Partial,
    NotTls,
}

fn parse(bytes: &[u8]) -> Parsed {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rd = bytes;
    if acceptor.read_tls(&mut rd).is_err() {
        return Parsed::NotTls;
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => {
            let hello = accepted.client_hello();
            Parsed::Hello(Inspected {
                transport_protocol: crate::config::listener::TLS,
                server_name: hello.server_name().map(str::to_ascii_lowercase),
                application_protocols: hello
                    .alpn()
                    .map(|protocols| {
                        protocols
                            .map(|p| String::from_utf8_lossy(p).into_owned())
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        }
        Ok(None) => Parsed::Partial,
        Err(_) => Parsed::NotTls,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::AsyncWriteExt;

    /// The bytes of a real ClientHello (rustls client) with `sni` and `alpn`.
    fn client_hello(sni: &str, alpn: &[&str]) -> Vec<u8> {
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        let name = rustls::pki_types::ServerName::try_from(sni.to_string()).expect("name");
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
        let mut out = Vec::new();
        conn.write_tls(&mut out).expect("hello");
        out
    }

    async fn inspect_bytes(chunks: Vec<Vec<u8>>) -> Inspected {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let writer = tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(address)
                .await
                .expect("connect");
            for c in chunks {
                s.write_all(&c).await.expect("write");
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            s
        });
        let (server, _) = listener.accept().await.expect("accept");
        let inspected = tokio::time::timeout(Duration::from_secs(10), inspect(&server))
            .await
            .expect("in time")
            .expect("inspected");
        drop(writer.await);
        inspected
    }

    #[tokio::test]
    async fn a_client_hello_gives_sni_and_alpn_even_in_pieces() {
        let hello = client_hello("Api.Example.com", &["h2", "http/1.1"]);
        let expected = Inspected {
            transport_protocol: crate::config::listener::TLS,
            server_name: Some("api.example.com".into()),
            application_protocols: vec!["h2".into(), "http/1.1".into()],
        };
        assert_eq!(inspect_bytes(vec![hello.clone()]).await, expected);
        let (a, b) = hello.split_at(40);
        assert_eq!(inspect_bytes(vec![a.to_vec(), b.to_vec()]).await, expected);
    }

    #[tokio::test]
    async fn anything_else_is_raw_buffer() {
        assert_eq!(
            inspect_bytes(vec![b"GET / HTTP/1.1\r\n\r\n".to_vec()]).await,
            Inspected::raw()
        );
        assert_eq!(
            inspect_bytes(vec![vec![0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5]]).await,
            Inspected::raw()
        );
    }
}
