//! Throughput of one link on loopback, for 1 KiB and 64 KiB messages:
//! - kedge: a `transport` session (mTLS QUIC, framing, sequence numbers, acks per message);
//! - raw-quinn: the same TLS and QUIC settings, one stream, the same bytes, no protocol at all;
//! - websocket-json: KubeEdge's default link, WebSocket over TLS over TCP (same certificates,
//!   mutual TLS) carrying KubeEdge's JSON message, encoded per message and decoded into a
//!   generic value as KubeEdge's Go code does. No per-message acks: an advantage to the baseline.
//!
//! Two payloads: `opaque` (a JSON string, the cheapest thing JSON can carry) and `object` (a
//! ConfigMap-shaped object, what the link really carries).

use std::sync::Arc;
use std::time::{Duration, Instant};

use benches::fixtures::{object_message, sized_message};
use benches::kubeedge::KubeEdgeMessage;
use bytes::{BufMut, Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::Mutex;
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use transport::{
    CertificateAuthority, ClientConfig, EncodedMessage, Link, LinkConfig, LinkEvent, Message,
    Server, ServerConfig,
};

const DAY: Duration = Duration::from_secs(86400);

struct Kedge {
    _server: Server,
    cloud_side: Link,
    edge_side: Mutex<Link>,
}

impl Kedge {
    async fn start() -> Kedge {
        let ca = CertificateAuthority::generate("bench-ca").unwrap();
        let server_id = ca.issue_server(&["localhost".into()], DAY).unwrap();
        let mut server = Server::bind(
            ServerConfig::new("127.0.0.1:0".parse().unwrap()),
            ca.cert(),
            &server_id,
        )
        .unwrap();
        let addr = server.local_addr().unwrap();
        let mut edge = transport::connect(
            ClientConfig::new(addr, "localhost"),
            ca.cert(),
            &ca.issue_node("bench-node", DAY).unwrap(),
        )
        .unwrap();
        let mut cloud_side = server.accept().await.unwrap();
        for link in [&mut edge, &mut cloud_side] {
            assert!(matches!(
                link.next_event().await,
                Some(LinkEvent::Connected { .. })
            ));
        }
        Kedge {
            _server: server,
            cloud_side,
            edge_side: Mutex::new(edge),
        }
    }

    async fn run(&self, message: &EncodedMessage, count: u64) -> Duration {
        let mut edge = self.edge_side.lock().await;
        let sender = self.cloud_side.handle().clone();
        let message = message.clone();
        let start = Instant::now();
        let send = tokio::spawn(async move {
            for _ in 0..count {
                sender.send_encoded(message.clone()).await.unwrap();
            }
        });
        let mut received = 0;
        while received < count {
            if let Some(LinkEvent::Message(d)) = edge.next_event().await {
                std::hint::black_box(d.message.content());
                edge.ack(d.seq);
                received += 1;
            }
        }
        let elapsed = start.elapsed();
        send.await.unwrap();
        elapsed
    }
}

struct RawQuinn {
    _endpoints: (quinn::Endpoint, quinn::Endpoint),
    _connection: quinn::Connection,
    send: Mutex<quinn::SendStream>,
    recv: Mutex<quinn::RecvStream>,
}

impl RawQuinn {
    async fn start() -> RawQuinn {
        let ca = CertificateAuthority::generate("bench-ca").unwrap();
        let server_id = ca.issue_server(&["localhost".into()], DAY).unwrap();
        let node_id = ca.issue_node("bench-node", DAY).unwrap();
        let transport_config = LinkConfig::default().quic_transport();
        let server_tls = transport::tls::server_config(ca.cert(), &server_id).unwrap();
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(
            quinn::crypto::rustls::QuicServerConfig::try_from(server_tls).unwrap(),
        ));
        server_config.transport_config(transport_config.clone());
        let server =
            quinn::Endpoint::server(server_config, "127.0.0.1:0".parse().unwrap()).unwrap();
        let client_tls = transport::tls::client_config(ca.cert(), &node_id).unwrap();
        let client_config =
            transport::quinn_client_config_from(client_tls, &LinkConfig::default()).unwrap();
        let client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let connecting = client
            .connect_with(client_config, server.local_addr().unwrap(), "localhost")
            .unwrap();
        let (client_conn, server_conn) =
            tokio::join!(connecting, async { server.accept().await.unwrap().await });
        let (client_conn, server_conn) = (client_conn.unwrap(), server_conn.unwrap());
        let mut send = server_conn.open_uni().await.unwrap();
        send.write_all(b"x").await.unwrap();
        let mut recv = client_conn.accept_uni().await.unwrap();
        let mut one = [0u8; 1];
        recv.read_exact(&mut one).await.unwrap();
        RawQuinn {
            _endpoints: (server, client),
            _connection: client_conn,
            send: Mutex::new(send),
            recv: Mutex::new(recv),
        }
    }

    async fn run(&self, frame: &Bytes, count: u64) -> Duration {
        let mut send = self.send.lock().await;
        let mut recv = self.recv.lock().await;
        let total = frame.len() as u64 * count;
        let start = Instant::now();
        let writer = async {
            let mut left = count;
            while left > 0 {
                let n = left.min(128);
                let mut chunks: Vec<Bytes> = (0..n).map(|_| frame.clone()).collect();
                send.write_all_chunks(&mut chunks).await.unwrap();
                left -= n;
            }
        };
        let reader = async {
            let mut got = 0u64;
            while got < total {
                let chunk = recv.read_chunk(usize::MAX, true).await.unwrap().unwrap();
                got += chunk.bytes.len() as u64;
            }
        };
        tokio::join!(writer, reader);
        start.elapsed()
    }
}

type ServerWs =
    tokio_tungstenite::WebSocketStream<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>;
type ClientWs =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

struct WebSocketJson {
    cloud_side: Mutex<ServerWs>,
    edge_side: Mutex<ClientWs>,
}

impl WebSocketJson {
    async fn start() -> WebSocketJson {
        let ca = CertificateAuthority::generate("bench-ca").unwrap();
        let server_id = ca.issue_server(&["localhost".into()], DAY).unwrap();
        let node_id = ca.issue_node("bench-node", DAY).unwrap();
        let mut server_tls = transport::tls::server_config(ca.cert(), &server_id).unwrap();
        server_tls.alpn_protocols.clear();
        let mut client_tls = transport::tls::client_config(ca.cert(), &node_id).unwrap();
        client_tls.alpn_protocols.clear();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_tls));
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (server, client) = tokio::join!(
            async {
                let (tcp, _) = listener.accept().await.unwrap();
                tcp.set_nodelay(true).unwrap();
                let tls = acceptor.accept(tcp).await.unwrap();
                tokio_tungstenite::accept_async(tls).await.unwrap()
            },
            async {
                let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                tcp.set_nodelay(true).unwrap();
                let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                let tls = connector.connect(name, tcp).await.unwrap();
                tokio_tungstenite::client_async(format!("wss://localhost:{}/", addr.port()), tls)
                    .await
                    .unwrap()
                    .0
            }
        );
        WebSocketJson {
            cloud_side: Mutex::new(server),
            edge_side: Mutex::new(client),
        }
    }

    async fn run(&self, message: &KubeEdgeMessage, count: u64) -> Duration {
        let mut cloud = self.cloud_side.lock().await;
        let mut edge = self.edge_side.lock().await;
        let start = Instant::now();
        let writer = async {
            for _ in 0..count {
                let json = serde_json::to_vec(message).unwrap();
                cloud
                    .feed(tokio_tungstenite::tungstenite::Message::Binary(json.into()))
                    .await
                    .unwrap();
            }
            cloud.flush().await.unwrap();
        };
        let reader = async {
            let mut got = 0;
            while got < count {
                let frame = edge.next().await.unwrap().unwrap();
                let decoded: KubeEdgeMessage = serde_json::from_slice(&frame.into_data()).unwrap();
                std::hint::black_box(decoded);
                got += 1;
            }
        };
        tokio::join!(writer, reader);
        start.elapsed()
    }
}

fn length_prefixed(message: &Message) -> Bytes {
    // Raw quinn writes exactly the bytes kedge puts on its stream for the same message.
    let body = EncodedMessage::encode(message);
    let mut out = BytesMut::with_capacity(4 + body.len());
    out.put_u32_le(body.len() as u32);
    out.extend_from_slice(body.body());
    out.freeze()
}

fn link(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let kedge = rt.block_on(Kedge::start());
    let raw = rt.block_on(RawQuinn::start());
    let ws = rt.block_on(WebSocketJson::start());
    for (payload, size) in [
        ("opaque", 1024usize),
        ("opaque", 64 * 1024),
        ("object", 1024),
        ("object", 64 * 1024),
    ] {
        let message = if payload == "opaque" {
            sized_message(size)
        } else {
            object_message(size)
        };
        let encoded = EncodedMessage::encode(&message);
        let frame = length_prefixed(&message);
        let kubeedge = KubeEdgeMessage::from_message(&message);
        let mut group = c.benchmark_group(format!("link/{payload}-{}KiB", size / 1024));
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function("kedge", |b| {
            b.iter_custom(|n| rt.block_on(kedge.run(&encoded, n)))
        });
        group.bench_function("raw-quinn", |b| {
            b.iter_custom(|n| rt.block_on(raw.run(&frame, n)))
        });
        group.bench_function("websocket-json", |b| {
            b.iter_custom(|n| rt.block_on(ws.run(&kubeedge, n)))
        });
        group.finish();
    }
}

criterion_group!(benches, link);
criterion_main!(benches);
