//! Real QUIC on loopback: delivery, acks, replay across disconnects, restarts, requests,
//! replacement, backpressure, many nodes.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use transport::{EncodedMessage, LinkConfig, LinkEvent, LinkHandle, Message, Route};

fn numbered(n: u64) -> Message {
    let mut m = Message::new(
        Route::new(
            "edgecontroller",
            "resource",
            "update",
            &format!("default/pod/p{n}"),
        ),
        format!("{{\"n\":{n}}}"),
    );
    m.header.resource_version = n.to_string();
    m
}

fn number_of(message: &transport::ReceivedMessage) -> u64 {
    message.header().resource_version.parse().unwrap()
}

/// Sends `count` numbered messages from a task; returns when all are queued.
fn spawn_sender(handle: LinkHandle, from: u64, count: u64) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for n in from..from + count {
            handle.send(&numbered(n)).await.unwrap();
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_arrive_in_order_and_are_acked() {
    let mut cloud = start_cloud(fast_link_config());
    let mut edge = cloud.connect("edge-1");
    let mut node = cloud.accept().await;
    assert_eq!(
        node.peer(),
        "edge-1",
        "the node is named by its certificate"
    );
    assert_eq!(expect_connected(&mut edge).await, (true, true));
    assert_eq!(expect_connected(&mut node).await, (true, true));

    const N: u64 = 10_000;
    let down = spawn_sender(node.handle().clone(), 1, N);
    let up = spawn_sender(edge.handle().clone(), 1, N);
    let drain = |mut link: transport::Link| async move {
        let mut next = 1;
        while next <= N {
            match link.next_event().await.unwrap() {
                LinkEvent::Message(d) => {
                    assert_eq!(d.seq, next);
                    assert_eq!(number_of(&d.message), next);
                    assert_eq!(
                        &d.message.content()[..],
                        format!("{{\"n\":{next}}}").as_bytes()
                    );
                    link.ack(d.seq);
                    next += 1;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        link
    };
    let (edge, node) = within(Duration::from_secs(60), async {
        tokio::join!(drain(edge), drain(node))
    })
    .await;
    down.await.unwrap();
    up.await.unwrap();
    // Every message was acked back, so both windows drain to empty.
    within(Duration::from_secs(10), async {
        while edge.unacked() > 0 || node.unacked() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(node.counters().messages_delivered, N);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_link_is_detected_and_resumes_without_loss_or_duplicates() {
    let mut cloud = start_cloud(fast_link_config());
    let relay = Relay::start(cloud.addr).await;
    let mut edge = cloud.connect_via("edge-cut", relay.addr);
    let mut node = cloud.accept().await;
    expect_connected(&mut edge).await;
    expect_connected(&mut node).await;

    const N: u64 = 3_000;
    const CUT_AT: u64 = 1_000;
    // The second half is sent only after the cut, so that the link must be found dead and
    // resumed before it can arrive (otherwise it may all be buffered before the cut).
    let first_half = spawn_sender(node.handle().clone(), 1, CUT_AT);
    let mut second_half = None;
    let mut seen = Vec::new();
    let mut disconnects = 0;
    let mut cut_at = None;
    within(Duration::from_secs(60), async {
        while (seen.len() as u64) < N {
            match edge.next_event().await.unwrap() {
                LinkEvent::Message(d) => {
                    seen.push(number_of(&d.message));
                    // Ack lazily, so that a cut leaves delivered-but-unacked messages that the
                    // cloud replays and the edge must drop.
                    if d.seq % 50 == 0 && cut_at.is_none() && d.seq < CUT_AT {
                        edge.ack(d.seq);
                    }
                    if seen.len() as u64 == CUT_AT {
                        relay.cut();
                        cut_at = Some(Instant::now());
                        second_half =
                            Some(spawn_sender(node.handle().clone(), CUT_AT + 1, N - CUT_AT));
                    }
                }
                LinkEvent::Disconnected { .. } => {
                    let detected = cut_at.unwrap().elapsed();
                    // Idle timeout is two heartbeats (1 s); allow scheduling slack.
                    assert!(
                        detected < Duration::from_secs(3),
                        "dead peer detected after {detected:?}"
                    );
                    disconnects += 1;
                    relay.heal();
                }
                LinkEvent::Connected {
                    peer_stream_new,
                    peer_forgot_our_stream,
                } => {
                    assert!(
                        !peer_stream_new && !peer_forgot_our_stream,
                        "same processes: streams survive"
                    );
                }
                LinkEvent::Request(_) => panic!("no requests here"),
                LinkEvent::Heartbeat { .. } => panic!("no heartbeats here"),
            }
        }
    })
    .await;
    first_half.await.unwrap();
    second_half.expect("cut happened").await.unwrap();
    assert_eq!(disconnects, 1);
    assert_eq!(
        seen,
        (1..=N).collect::<Vec<_>>(),
        "in order, none lost, none twice"
    );
    assert!(edge.counters().connections >= 2);
    assert!(
        edge.counters().replays_dropped > 0,
        "the unacked tail was replayed and dropped as duplicates"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_gets_the_whole_unacked_window_again() {
    let mut cloud = start_cloud(fast_link_config());
    let mut edge = cloud.connect("edge-restart");
    let mut node = cloud.accept().await;
    expect_connected(&mut edge).await;
    expect_connected(&mut node).await;
    for n in 1..=20 {
        node.send(&numbered(n)).await.unwrap();
    }
    // The edge makes 1..=10 durable, then "crashes" (its link state is gone).
    let mut got = 0;
    while got < 10 {
        if let Some(LinkEvent::Message(d)) =
            within(Duration::from_secs(10), edge.next_event()).await
        {
            got += 1;
            edge.ack(d.seq);
        }
    }
    within(Duration::from_secs(10), async {
        while node.unacked() > 10 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    drop(edge);
    assert!(matches!(
        within(Duration::from_secs(10), node.next_event()).await,
        Some(LinkEvent::Disconnected { .. })
    ));
    // A new process: new link state, same certificate.
    let mut edge = cloud.connect("edge-restart");
    assert_eq!(expect_connected(&mut edge).await, (true, true));
    assert_eq!(
        expect_connected(&mut node).await,
        (true, true),
        "the cloud learns the node restarted"
    );
    let mut numbers = Vec::new();
    while numbers.len() < 10 {
        if let Some(LinkEvent::Message(d)) =
            within(Duration::from_secs(10), edge.next_event()).await
        {
            numbers.push(number_of(&d.message));
        }
    }
    assert_eq!(
        numbers,
        (11..=20).collect::<Vec<_>>(),
        "exactly the unacked ones"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_go_both_ways() {
    let mut cloud = start_cloud(fast_link_config());
    let mut edge = cloud.connect("edge-req");
    let mut node = cloud.accept().await;
    expect_connected(&mut edge).await;
    expect_connected(&mut node).await;
    ask_and_answer(&mut edge, &mut node).await;
    ask_and_answer(&mut node, &mut edge).await;
}

async fn ask_and_answer(asker: &mut transport::Link, answerer: &mut transport::Link) {
    let query = Message::new(
        Route::new("metaManager", "meta", "query", "default/configmap/c"),
        "{}",
    );
    let handle = asker.handle().clone();
    let q = query.clone();
    let pending = tokio::spawn(async move { handle.request(&q).await });
    let Some(LinkEvent::Request(request)) =
        within(Duration::from_secs(10), answerer.next_event()).await
    else {
        panic!("expected a request");
    };
    assert_eq!(request.message.to_message(), query);
    let reply = Message::response_to(
        &query.header,
        Route::new("x", "meta", "response", "r"),
        "{\"data\":1}",
    );
    request.respond(&reply).await.unwrap();
    let got = within(Duration::from_secs(10), pending)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.header().parent_id, query.header.id);
    assert_eq!(&got.content()[..], b"{\"data\":1}");
}

/// Heartbeats go as 5-byte QUIC datagrams (one small packet, no stream frame) to a cloud that
/// accepts them, and as control-stream frames to one that does not (an older kedge): both reach
/// the application with the node's period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_reaches_the_peer_in_one_small_packet() {
    for (datagrams, max_bytes) in [(true, 48), (false, 64)] {
        // Default keepalives (15 s): nothing else is sent while the heartbeat is measured.
        let config = LinkConfig {
            datagram_heartbeats: datagrams,
            ..LinkConfig::default()
        };
        let mut cloud = start_cloud(config);
        let mut edge = cloud.connect("edge-beat");
        let mut node = cloud.accept().await;
        expect_connected(&mut edge).await;
        expect_connected(&mut node).await;
        // Let the handshake's last packets and acks settle.
        tokio::time::sleep(Duration::from_millis(200)).await;
        for round in 0..3 {
            let before = edge.connection_stats().unwrap();
            edge.heartbeat(Duration::from_secs(10)).unwrap();
            let event = within(Duration::from_secs(10), node.next_event()).await;
            assert!(
                matches!(event, Some(LinkEvent::Heartbeat { period: Some(p) }) if p == Duration::from_secs(10)),
                "round {round}: expected a heartbeat, got {event:?}"
            );
            // The cloud's ACK follows within its ack delay (25 ms).
            tokio::time::sleep(Duration::from_millis(150)).await;
            let after = edge.connection_stats().unwrap();
            let (sent, bytes) = (
                after.udp_tx.datagrams - before.udp_tx.datagrams,
                after.udp_tx.bytes - before.udp_tx.bytes,
            );
            let (acks, ack_bytes) = (
                after.udp_rx.datagrams - before.udp_rx.datagrams,
                after.udp_rx.bytes - before.udp_rx.bytes,
            );
            eprintln!(
                "heartbeat {round} (datagrams {datagrams}): {sent} UDP datagram(s), {bytes} bytes; \
                 back: {acks} datagram(s), {ack_bytes} bytes"
            );
            assert_eq!(sent, 1, "one UDP datagram per heartbeat");
            assert!(
                bytes <= max_bytes,
                "a heartbeat took {bytes} bytes of UDP payload (datagrams {datagrams})"
            );
            // One ACK back, addressed to the node's 4-byte connection id.
            if round > 0 {
                assert_eq!(acks, 1, "one ACK per heartbeat");
                assert!(ack_bytes <= 32, "the ACK took {ack_bytes} bytes");
            }
        }
        // Heartbeats asked for at once all arrive (datagrams) or go as one (frames); none is
        // replayed later.
        for _ in 0..5 {
            edge.heartbeat(Duration::from_secs(10)).unwrap();
        }
        let first = within(Duration::from_secs(10), node.next_event()).await;
        assert!(matches!(first, Some(LinkEvent::Heartbeat { .. })));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_connection_of_the_same_node_replaces_the_older() {
    let mut cloud = start_cloud(fast_link_config());
    let mut first = cloud.connect("edge-dup");
    let mut node = cloud.accept().await;
    expect_connected(&mut first).await;
    expect_connected(&mut node).await;
    // Stop the first client's reconnect loop from fighting back, then connect again.
    let mut second = cloud.connect("edge-dup");
    expect_connected(&mut second).await;
    match within(Duration::from_secs(10), first.next_event()).await {
        Some(LinkEvent::Disconnected { reason }) => {
            assert!(reason.contains("replaced"), "{reason}")
        }
        other => panic!("expected the older connection to be replaced, got {other:?}"),
    }
    first.close();
    // The cloud keeps one link for the node and sees the new connection on it.
    assert!(matches!(
        within(Duration::from_secs(10), node.next_event()).await,
        Some(LinkEvent::Disconnected { .. })
    ));
    expect_connected(&mut node).await;
    node.send(&numbered(1)).await.unwrap();
    match within(Duration::from_secs(10), second.next_event()).await {
        Some(LinkEvent::Message(d)) => assert_eq!(number_of(&d.message), 1),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_window_is_backpressure() {
    let mut config = fast_link_config();
    config.max_unacked_messages = 8;
    let mut cloud = start_cloud(config);
    let mut edge = cloud.connect("edge-bp");
    let mut node = cloud.accept().await;
    expect_connected(&mut edge).await;
    expect_connected(&mut node).await;
    let one = EncodedMessage::encode(&numbered(1));
    for _ in 0..8 {
        node.try_send_encoded(one.clone()).unwrap().unwrap();
    }
    assert!(
        node.try_send_encoded(one.clone()).unwrap().is_err(),
        "window full"
    );
    let handle = node.handle().clone();
    let blocked = tokio::spawn(async move { handle.send(&numbered(9)).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !blocked.is_finished(),
        "send waits while the window is full"
    );
    let mut last = 0;
    while last < 8 {
        if let Some(LinkEvent::Message(d)) =
            within(Duration::from_secs(10), edge.next_event()).await
        {
            last = d.seq;
        }
    }
    edge.ack(last);
    let seq = within(Duration::from_secs(10), blocked)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seq, 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_nodes_connect_and_exchange_concurrently() {
    let mut cloud = start_cloud(fast_link_config());
    const NODES: usize = 200;
    let endpoint = transport::client_endpoint("127.0.0.1:0".parse().unwrap(), 8 << 20).unwrap();
    let mut edges = Vec::new();
    for i in 0..NODES {
        let link = transport::connect_on(
            &endpoint,
            cloud.client_config(cloud.addr),
            cloud.ca.cert(),
            &cloud.node_identity(&format!("edge-{i}")),
        )
        .unwrap();
        edges.push(link);
    }
    // Each edge sends one message up with its own name.
    let tasks: Vec<_> = edges
        .into_iter()
        .enumerate()
        .map(|(i, mut edge)| {
            tokio::spawn(async move {
                expect_connected(&mut edge).await;
                edge.send(&Message::new(Route::default(), format!("\"edge-{i}\"")))
                    .await
                    .unwrap();
                edge
            })
        })
        .collect();
    let mut names = HashSet::new();
    let mut nodes = Vec::new();
    within(Duration::from_secs(60), async {
        while names.len() < NODES {
            let mut node = cloud.accept().await;
            loop {
                match node.next_event().await.unwrap() {
                    LinkEvent::Message(d) => {
                        let said = String::from_utf8(d.message.content().to_vec()).unwrap();
                        assert_eq!(
                            said,
                            format!("\"{}\"", node.peer()),
                            "a node speaks only for itself"
                        );
                        names.insert(node.peer().to_owned());
                        break;
                    }
                    LinkEvent::Connected { .. } => {}
                    other => panic!("{other:?}"),
                }
            }
            nodes.push(node); // dropping a node's link would close it
        }
    })
    .await;
    assert_eq!(cloud.server.connection_count(), NODES);
    for t in tasks {
        t.await.unwrap();
    }
}

/// Waits for the next message on `link`, acking it; any reconnection on the way must resume
/// the link (no new session for the application). Returns the message's number.
async fn next_message_resuming(link: &mut transport::Link) -> u64 {
    loop {
        match within(Duration::from_secs(20), link.next_event()).await {
            Some(LinkEvent::Message(d)) => {
                link.ack(d.seq);
                return number_of(&d.message);
            }
            Some(event @ LinkEvent::Connected { .. }) => assert_eq!(
                event.starts_new_session(),
                Some(false),
                "neither side restarted: the link resumes"
            ),
            Some(LinkEvent::Disconnected { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Field report 1 at the link's level: outages shorter than the keepalive, between keepalive
/// and idle timeout, and past the idle timeout. Each time, messages sent during the outage and
/// after it arrive both ways, and every reconnection tells both ends their session goes on
/// (`starts_new_session() == Some(false)`): that is what the layers above must act on alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outages_around_each_timeout_resume_the_link_both_ways() {
    // Keepalive 500 ms, idle timeout 1 s.
    let mut cloud = start_cloud(fast_link_config());
    let relay = Relay::start(cloud.addr).await;
    let mut edge = cloud.connect_via("edge-outages", relay.addr);
    let mut node = cloud.accept().await;
    // First contact: a new session on both ends.
    assert!(expect_connected(&mut edge).await.0);
    assert!(expect_connected(&mut node).await.0);
    let mut n = 0;
    for outage in [200u64, 700, 2_500] {
        relay.cut();
        n += 1;
        // Sent while the path is dead: kept in the window and replayed.
        node.send(&numbered(n)).await.unwrap();
        edge.send(&numbered(n)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(outage)).await;
        relay.heal();
        assert_eq!(
            next_message_resuming(&mut edge).await,
            n,
            "after {outage} ms"
        );
        assert_eq!(
            next_message_resuming(&mut node).await,
            n,
            "after {outage} ms"
        );
        n += 1;
        node.send(&numbered(n)).await.unwrap();
        edge.send(&numbered(n)).await.unwrap();
        assert_eq!(next_message_resuming(&mut edge).await, n);
        assert_eq!(next_message_resuming(&mut node).await, n);
    }
    assert!(
        edge.counters().connections >= 2,
        "the 2.5 s outage outlived the idle timeout: a new connection"
    );
}

/// A sync message: a route in the compact table, no id or timestamp.
fn sync_upsert(n: u64) -> Message {
    Message {
        header: transport::Header {
            resource_version: n.to_string(),
            ..Default::default()
        },
        route: Route::new("cloudcore", "sync", "upsert", &format!("pods/default/p{n}")),
        content: format!("{{\"n\":{n}}}").into(),
    }
}

/// Sends `count` compact-encodable messages each way and returns whether each side received
/// them compact (`edge_got`, `cloud_got`), checking that every one arrived intact.
async fn exchange_sync(
    edge: &mut transport::Link,
    node: &mut transport::Link,
    count: u64,
) -> (bool, bool) {
    for n in 1..=count {
        let m = EncodedMessage::encode_compact(&sync_upsert(n));
        assert!(m.is_compact());
        edge.send_encoded(m.clone()).await.unwrap();
        node.send_encoded(m).await.unwrap();
    }
    let mut compact = [true, true];
    for (i, link) in [edge, node].into_iter().enumerate() {
        for n in 1..=count {
            let d = match within(Duration::from_secs(10), link.next_event()).await {
                Some(LinkEvent::Message(d)) => d,
                other => panic!("expected a message, got {other:?}"),
            };
            assert_eq!(d.message.to_message(), sync_upsert(n));
            compact[i] &= d.message.is_compact();
            link.ack(d.seq);
        }
    }
    (compact[0], compact[1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_messages_go_compact_unless_a_peer_speaks_an_older_protocol() {
    // The same message in both forms: the compact one is ~90 bytes smaller.
    let full = EncodedMessage::encode(&sync_upsert(123_456)).len();
    let compact = EncodedMessage::encode_compact(&sync_upsert(123_456)).len();
    eprintln!("an upsert of 9 content bytes: {full} B in full form, {compact} B compact");
    assert!(compact + 80 <= full, "{compact} vs {full}");

    for (cloud_version, edge_version, compact_expected) in [
        (
            transport::PROTOCOL_VERSION,
            transport::PROTOCOL_VERSION,
            true,
        ),
        // A node speaking as version 2 gets full messages, and its own go full too.
        (transport::PROTOCOL_VERSION, 2, false),
        // So does a node whose cloud speaks version 2.
        (2, transport::PROTOCOL_VERSION, false),
    ] {
        let cloud_config = LinkConfig {
            protocol_version: cloud_version,
            ..fast_link_config()
        };
        let mut cloud = start_cloud(cloud_config);
        let mut client = cloud.client_config(cloud.addr);
        client.link.protocol_version = edge_version;
        let mut edge =
            transport::connect(client, cloud.ca.cert(), &cloud.node_identity("edge-v")).unwrap();
        let mut node = cloud.accept().await;
        expect_connected(&mut edge).await;
        expect_connected(&mut node).await;
        let got = exchange_sync(&mut edge, &mut node, 20).await;
        assert_eq!(
            got,
            (compact_expected, compact_expected),
            "cloud {cloud_version}, edge {edge_version}"
        );
    }
}
