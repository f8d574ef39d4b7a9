//! SIGTERM: `/ready` fails at once, listeners keep accepting for the drain time while telling
//! clients to go away, in-flight requests finish, and the process exits 0.

mod support;

use std::time::{Duration, Instant};

use support::*;

#[tokio::test]
async fn sigterm_drains_lets_in_flight_requests_finish_and_exits_zero() {
    let backend = Backend::start("a").await;
    let port = free_port();
    let routes = r#"
virtual_hosts:
- { name: all, domains: ["*"], routes: [{ match: { prefix: / }, route: { cluster: web } }] }
"#;
    let mut proxy = Proxy::start(
        &bootstrap(
            &[static_cluster("web", &[backend.port()], "")],
            port,
            routes,
        ),
        &["--drain-time-s", "1"],
    );
    proxy.wait_live().await;

    let slow = tokio::spawn(async move { get(port, "x", "/slow/1800").await });
    // An HTTP/2 connection that has served a request before the drain starts.
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let (mut h2, h2_conn) =
        hyper::client::conn::http2::handshake::<_, _, http_body_util::Empty<bytes::Bytes>>(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .expect("h2 handshake");
    let h2_conn = tokio::spawn(h2_conn);
    let req = http::Request::get("http://x/")
        .body(http_body_util::Empty::new())
        .expect("request");
    assert_eq!(
        h2.send_request(req).await.expect("h2 response").status(),
        200
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let signalled = Instant::now();
    proxy.signal("TERM");

    let draining = eventually(
        Duration::from_millis(500),
        async || matches!(proxy.ready().await, Some((s, body)) if s == 503 && body == "DRAINING"),
    )
    .await;
    assert!(draining, "/ready did not report DRAINING at once");

    // Still accepting during the drain time, but telling HTTP/1 clients to go away.
    let r = get(port, "x", "/").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection").as_deref(), Some("close"));
    // HTTP/2 clients get a GOAWAY; the stream that saw it still completes.
    let replies = h2_get(port, "x", "/", 1).await;
    assert_eq!(replies[0].status, 200);
    // The existing HTTP/2 connection got its GOAWAY and closed well before the drain time.
    let closed = tokio::time::timeout(Duration::from_millis(700), h2_conn).await;
    assert!(
        closed.is_ok(),
        "the HTTP/2 connection was not told to go away"
    );

    let slow = slow.await.expect("slow request task");
    assert_eq!(slow.status, 200, "the in-flight request finished");
    assert!(signalled.elapsed() >= Duration::from_millis(1500));

    let code = proxy.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(code, Some(0), "stderr:\n{}", proxy.stderr());
    assert!(
        signalled.elapsed() >= Duration::from_secs(1),
        "exited before the drain time"
    );
    assert!(!accepts(port).await);
}

#[tokio::test]
async fn listeners_stop_accepting_after_the_drain_time() {
    let backend = Backend::start("a").await;
    let port = free_port();
    let routes = r#"
virtual_hosts:
- { name: all, domains: ["*"], routes: [{ match: { prefix: / }, route: { cluster: web } }] }
"#;
    let mut proxy = Proxy::start(
        &bootstrap(
            &[static_cluster("web", &[backend.port()], "")],
            port,
            routes,
        ),
        &["--drain-time-s", "1"],
    );
    proxy.wait_live().await;
    // A long request keeps the process alive after the listener closes.
    let slow = tokio::spawn(async move { get(port, "x", "/slow/2500").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    proxy.signal("TERM");
    tokio::time::sleep(Duration::from_millis(1400)).await;
    assert!(!accepts(port).await, "still accepting after the drain time");
    assert_eq!(slow.await.expect("slow").status, 200);
    assert_eq!(proxy.wait_exit(Duration::from_secs(5)).await, Some(0));
}
