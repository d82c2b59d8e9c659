//! Bad peers: wrong ALPN, untrusted or expired certificates, oversized, malformed and truncated
//! frames. Each is refused or closed with a reason, and a well-behaved node keeps working.

mod common;

use std::time::Duration;

use common::*;
use transport::frame::{encode_body, Envelope, Hello};
use transport::{CloseCode, LinkEvent, Message, Route, MIN_PROTOCOL_VERSION};

/// A raw QUIC client presenting `identity`, with a rustls config the test may tamper with.
async fn raw_connect(
    cloud: &Cloud,
    identity: &transport::Identity,
    tamper: impl FnOnce(&mut rustls::ClientConfig),
) -> Result<quinn::Connection, quinn::ConnectionError> {
    let mut tls = transport::tls::client_config(cloud.ca.cert(), identity).unwrap();
    tamper(&mut tls);
    let config = transport::quinn_client_config_from(tls, &cloud.link_config).unwrap();
    let endpoint = transport::client_endpoint("127.0.0.1:0".parse().unwrap(), 0).unwrap();
    endpoint
        .connect_with(config, cloud.addr, SERVER_NAME)
        .unwrap()
        .await
}

/// Waits for the server to close `conn` and returns its close code.
async fn close_code(conn: &quinn::Connection) -> Option<CloseCode> {
    match within(Duration::from_secs(10), conn.closed()).await {
        quinn::ConnectionError::ApplicationClosed(close) => {
            CloseCode::from_code(close.error_code.into_inner())
        }
        other => panic!("expected an application close, got {other}"),
    }
}

/// A connected, well-behaved node whose link must outlive every bad peer.
async fn good_node(cloud: &mut Cloud) -> (transport::Link, transport::Link) {
    let mut edge = cloud.connect("good-node");
    let mut node = cloud.accept().await;
    expect_connected(&mut edge).await;
    expect_connected(&mut node).await;
    (edge, node)
}

async fn still_works(edge: &mut transport::Link, node: &transport::Link) {
    node.send(&Message::new(Route::default(), "\"still here\""))
        .await
        .unwrap();
    match within(Duration::from_secs(10), edge.next_event()).await {
        Some(LinkEvent::Message(d)) => {
            assert_eq!(&d.message.content()[..], b"\"still here\"");
            edge.ack(d.seq);
        }
        other => panic!("the good node stopped working: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_with_bad_credentials_fail_and_others_keep_working() {
    let mut cloud = start_cloud(fast_link_config());
    let (mut edge, node) = good_node(&mut cloud).await;

    let good = cloud.node_identity("intruder");
    let wrong_alpn = raw_connect(&cloud, &good, |tls| {
        tls.alpn_protocols = vec![b"h3".to_vec()]
    })
    .await;
    assert!(wrong_alpn.is_err(), "wrong ALPN must not connect");

    let other_ca = transport::CertificateAuthority::generate("another-ca").unwrap();
    let untrusted = other_ca.issue_node("intruder", DAY).unwrap();
    let result = raw_connect(&cloud, &untrusted, |_| {}).await;
    // TLS 1.3: the client may finish its side before the server rejects the certificate.
    if let Ok(conn) = result {
        let closed = within(Duration::from_secs(10), conn.closed()).await;
        assert!(
            matches!(closed, quinn::ConnectionError::ConnectionClosed(_)),
            "{closed}"
        );
    }

    let now = time::OffsetDateTime::now_utc();
    let expired = cloud
        .ca
        .issue_node_between(
            "expired",
            now - time::Duration::days(2),
            now - time::Duration::days(1),
        )
        .unwrap();
    // An expired (otherwise valid) certificate passes the handshake so that the server can
    // say why it refuses it (`transport::renew`): closed as unauthorized, with a reason.
    let conn = raw_connect(&cloud, &expired, |_| {}).await.unwrap();
    assert_eq!(close_code(&conn).await, Some(CloseCode::Unauthorized));

    still_works(&mut edge, &node).await;
}

/// Opens the control stream of an authenticated raw connection and writes `bytes` on it.
async fn control_stream_with(
    cloud: &Cloud,
    node: &str,
    bytes: &[u8],
    finish: bool,
) -> quinn::Connection {
    let conn = raw_connect(cloud, &cloud.node_identity(node), |_| {})
        .await
        .unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    if finish {
        send.finish().unwrap();
    }
    conn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_close_only_the_offending_connection() {
    let mut cloud = start_cloud(fast_link_config());
    let (mut edge, node) = good_node(&mut cloud).await;

    // A length prefix over the 16 MiB maximum.
    let oversized = control_stream_with(&cloud, "big", &(64u32 << 20).to_le_bytes(), false).await;
    assert_eq!(close_code(&oversized).await, Some(CloseCode::FrameTooLarge));
    let reason = match oversized.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(c)) => {
            String::from_utf8_lossy(&c.reason).into_owned()
        }
        other => panic!("{other:?}"),
    };
    assert!(reason.contains("exceeds the maximum"), "{reason}");

    // Bytes that are not an archive.
    let mut garbage = 16u32.to_le_bytes().to_vec();
    garbage.extend_from_slice(&[0xAB; 16]);
    let malformed = control_stream_with(&cloud, "garbage", &garbage, false).await;
    assert_eq!(close_code(&malformed).await, Some(CloseCode::Protocol));

    // A frame cut short by the end of the stream.
    let truncated = control_stream_with(&cloud, "truncated", &[100, 0, 0, 0, 1, 2, 3], true).await;
    assert_eq!(close_code(&truncated).await, Some(CloseCode::Protocol));

    // A valid frame of the wrong kind where the hello belongs.
    let mut ack = Vec::new();
    let body = encode_body(&Envelope::Ack(1));
    ack.extend_from_slice(&(body.len() as u32).to_le_bytes());
    ack.extend_from_slice(&body);
    let wrong_kind = control_stream_with(&cloud, "wrong-kind", &ack, false).await;
    assert_eq!(close_code(&wrong_kind).await, Some(CloseCode::Protocol));

    // A hello from a protocol version older than any this side speaks (a newer one is
    // answered with ours: see the link tests).
    let mut hello = Vec::new();
    let body = encode_body(&Envelope::Hello(Hello {
        protocol_version: MIN_PROTOCOL_VERSION - 1,
        send_epoch: 1,
        recv_epoch: 0,
        recv_acked: 0,
    }));
    hello.extend_from_slice(&(body.len() as u32).to_le_bytes());
    hello.extend_from_slice(&body);
    let ancient = control_stream_with(&cloud, "ancient", &hello, false).await;
    assert_eq!(close_code(&ancient).await, Some(CloseCode::Version));

    still_works(&mut edge, &node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_is_refused_locally_and_a_slow_hello_times_out() {
    let mut config = fast_link_config();
    config.max_frame = 64 * 1024;
    config.handshake_timeout = Duration::from_millis(500);
    let mut cloud = start_cloud(config);
    let (mut edge, node) = good_node(&mut cloud).await;
    let huge = Message::new(Route::default(), vec![b'x'; 100 * 1024]);
    assert!(matches!(
        node.send(&huge).await,
        Err(transport::LinkError::Frame(
            transport::frame::FrameError::TooLarge { .. }
        ))
    ));
    // A peer that connects and never says hello is cut off after the handshake timeout.
    let silent = raw_connect(&cloud, &cloud.node_identity("silent"), |_| {})
        .await
        .unwrap();
    let (_send, _recv) = silent.open_bi().await.unwrap();
    assert_eq!(close_code(&silent).await, Some(CloseCode::Protocol));
    still_works(&mut edge, &node).await;
}
