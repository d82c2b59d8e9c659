//! transport-demo: a cloud endpoint and a few edge nodes on loopback exchanging messages over
//! kedge's QUIC link (mutual TLS, ordered acked streams, requests), printing throughput.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use transport::{
    CertificateAuthority, ClientConfig, EncodedMessage, Link, LinkEvent, Message, Route, Server,
    ServerConfig,
};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    about = "kedge transport demo: one cloud endpoint, N edge nodes, acked messages over QUIC"
)]
struct Args {
    /// Edge nodes to start.
    #[arg(long, default_value_t = 4)]
    nodes: usize,
    /// Messages the cloud sends to each node.
    #[arg(long, default_value_t = 20_000)]
    messages: u64,
    /// Content size of each message, in bytes.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Address the cloud endpoint listens on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
}

const DAY: Duration = Duration::from_secs(86400);

#[tokio::main]
async fn main() -> Result<()> {
    transport::logging::init(transport::logging::LogFormat::Text, "warn");
    let args = Args::parse();
    if args.nodes == 0 || args.messages == 0 {
        bail!("--nodes and --messages must be at least 1");
    }

    let ca = CertificateAuthority::generate("kedge-demo-ca")?;
    let server_identity = ca.issue_server(&["localhost".into()], DAY)?;
    let mut server = Server::bind(ServerConfig::new(args.listen), ca.cert(), &server_identity)?;
    let addr = server.local_addr()?;
    println!(
        "kedge transport demo: cloud on {addr}, {} edge nodes, {} messages of {} B to each",
        args.nodes, args.messages, args.size
    );

    // The edge nodes: ack every message once "durable", then report a status upward.
    let mut edges = Vec::new();
    for i in 0..args.nodes {
        let node = format!("edge-{i}");
        let identity = ca.issue_node(&node, DAY)?;
        let link = transport::connect(ClientConfig::new(addr, "localhost"), ca.cert(), &identity)?;
        edges.push(tokio::spawn(run_edge(link, node, args.messages)));
    }

    // The cloud: one shared encoding of the message for every node (encode once, share bytes).
    let content = format!("\"{}\"", "x".repeat(args.size.saturating_sub(2)));
    let update = Message::new(
        Route::new(
            "edgecontroller",
            "resource",
            "update",
            "default/configmap/demo",
        ),
        content,
    );
    let encoded = EncodedMessage::encode(&update);
    let started = Instant::now();
    let mut clouds = Vec::new();
    for _ in 0..args.nodes {
        let link = tokio::time::timeout(Duration::from_secs(30), server.accept())
            .await
            .context("edge nodes did not connect within 30 s")?
            .context("server stopped")?;
        clouds.push(tokio::spawn(run_cloud_side(
            link,
            encoded.clone(),
            args.messages,
        )));
    }
    let mut wire_bytes = 0;
    for cloud in clouds {
        wire_bytes += cloud.await??;
    }
    let elapsed = started.elapsed();
    for edge in edges {
        let report = edge.await??;
        println!("  {report}");
    }
    let total = args.messages * args.nodes as u64;
    let payload = total as f64 * args.size as f64;
    let secs = elapsed.as_secs_f64();
    println!(
        "total: {total} messages ({:.1} MB of content) in {secs:.2} s: {:.0} msg/s, {:.2} Gbit/s; {:.1} MB sent on the wire by the cloud",
        payload / 1e6,
        total as f64 / secs,
        payload * 8.0 / secs / 1e9,
        wire_bytes as f64 / 1e6
    );
    server.shutdown().await;
    Ok(())
}

/// Cloud side of one node: send, wait until everything is acked and the node's status arrives,
/// answer its query. Returns the UDP bytes this connection sent.
async fn run_cloud_side(mut link: Link, message: EncodedMessage, count: u64) -> Result<u64> {
    let sender = link.handle().clone();
    let send = tokio::spawn(async move {
        for _ in 0..count {
            sender.send_encoded(message.clone()).await?;
        }
        anyhow::Ok(())
    });
    let mut status_seen = false;
    while !status_seen {
        match tokio::time::timeout(Duration::from_secs(60), link.next_event()).await {
            Ok(Some(LinkEvent::Message(d))) => {
                status_seen = d.message.route().operation == "update";
                link.ack(d.seq);
            }
            Ok(Some(LinkEvent::Request(request))) => {
                let query = request.message.to_message();
                let reply = Message::response_to(
                    &query.header,
                    Route::new("cloudhub", "meta", "response", "demo"),
                    "\"pong\"",
                );
                request.respond(&reply).await?;
            }
            Ok(Some(_)) => {}
            Ok(None) => bail!("link to {} closed", link.peer()),
            Err(_) => bail!("no status from {} within 60 s", link.peer()),
        }
    }
    send.await??;
    let deadline = Instant::now() + Duration::from_secs(10);
    while link.unacked() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if link.unacked() > 0 {
        bail!(
            "{} messages to {} still unacked",
            link.unacked(),
            link.peer()
        );
    }
    Ok(link.connection_stats().map(|s| s.udp_tx.bytes).unwrap_or(0))
}

/// Edge side: receive in order and ack, make one request, report status when done.
async fn run_edge(mut link: Link, node: String, count: u64) -> Result<String> {
    let mut received = 0;
    let mut rtt = None;
    while received < count {
        match tokio::time::timeout(Duration::from_secs(60), link.next_event()).await {
            Ok(Some(LinkEvent::Connected { .. })) if rtt.is_none() => {
                let started = Instant::now();
                let query = Message::new(
                    Route::new("metaManager", "meta", "query", "default/configmap/demo"),
                    "{}",
                );
                let reply = link.request(&query).await?;
                if reply.header().parent_id != query.header.id {
                    bail!("{node}: response does not answer the query");
                }
                rtt = Some(started.elapsed());
            }
            Ok(Some(LinkEvent::Message(d))) => {
                received += 1;
                if d.seq != received {
                    bail!("{node}: message {} arrived as number {received}", d.seq);
                }
                link.ack(d.seq);
            }
            Ok(Some(_)) => {}
            Ok(None) => bail!("{node}: link closed"),
            Err(_) => bail!("{node}: stalled at {received} of {count} messages"),
        }
    }
    let status = Message::new(
        Route::new(
            "edged",
            "resource",
            "update",
            &format!("default/podstatus/{node}"),
        ),
        "{\"phase\":\"Running\"}",
    );
    link.send(&status).await?;
    // Stay connected until the cloud acked the status.
    let deadline = Instant::now() + Duration::from_secs(10);
    while link.unacked() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rtt_ms = rtt
        .map(|d| format!("{:.2} ms", d.as_secs_f64() * 1e3))
        .unwrap_or_else(|| "-".into());
    Ok(format!("{node}: {received} messages received in order and acked; status reported and acked; query round trip {rtt_ms}"))
}
