//! Test fixtures: a CA, a server on loopback, clients, and a UDP relay that can cut the link.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use transport::{
    CertificateAuthority, ClientConfig, Identity, Link, LinkConfig, LinkEvent, Server, ServerConfig,
};

pub const SERVER_NAME: &str = "localhost";
pub const DAY: Duration = Duration::from_secs(86400);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

pub struct Cloud {
    pub ca: CertificateAuthority,
    pub server: Server,
    pub addr: SocketAddr,
    pub link_config: LinkConfig,
}

pub fn fast_link_config() -> LinkConfig {
    LinkConfig {
        heartbeat: Duration::from_millis(500),
        handshake_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(10),
        ..LinkConfig::default()
    }
}

pub fn start_cloud(link_config: LinkConfig) -> Cloud {
    init_tracing();
    let ca = CertificateAuthority::generate("kedge-test-ca").unwrap();
    let server_identity = ca
        .issue_server(&[SERVER_NAME.to_owned(), "127.0.0.1".to_owned()], DAY)
        .unwrap();
    let mut config = ServerConfig::new("127.0.0.1:0".parse().unwrap());
    config.link = link_config.clone();
    config.socket_buffer_bytes = 4 * 1024 * 1024;
    let server = Server::bind(config, ca.cert(), &server_identity).unwrap();
    let addr = server.local_addr().unwrap();
    Cloud {
        ca,
        server,
        addr,
        link_config,
    }
}

impl Cloud {
    pub fn client_config(&self, addr: SocketAddr) -> ClientConfig {
        let mut config = ClientConfig::new(addr, SERVER_NAME);
        config.link = self.link_config.clone();
        config.backoff.initial = Duration::from_millis(50);
        config.backoff.max = Duration::from_millis(500);
        config.connect_timeout = Duration::from_secs(5);
        config
    }

    pub fn node_identity(&self, node: &str) -> Identity {
        self.ca.issue_node(node, DAY).unwrap()
    }

    pub fn connect(&self, node: &str) -> Link {
        self.connect_via(node, self.addr)
    }

    pub fn connect_via(&self, node: &str, addr: SocketAddr) -> Link {
        transport::connect(
            self.client_config(addr),
            self.ca.cert(),
            &self.node_identity(node),
        )
        .unwrap()
    }

    /// The next node link the server accepts.
    pub async fn accept(&mut self) -> Link {
        within(Duration::from_secs(10), self.server.accept())
            .await
            .expect("server closed")
    }
}

/// Awaits `f`, failing the test if it takes longer than `limit`.
pub async fn within<F: std::future::Future>(limit: Duration, f: F) -> F::Output {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| panic!("timed out after {limit:?}"))
}

/// Waits for the next `Connected` event, skipping nothing else.
pub async fn expect_connected(link: &mut Link) -> (bool, bool) {
    match within(Duration::from_secs(10), link.next_event()).await {
        Some(LinkEvent::Connected {
            peer_stream_new,
            peer_forgot_our_stream,
        }) => (peer_stream_new, peer_forgot_our_stream),
        other => panic!("expected Connected, got {other:?}"),
    }
}

/// A UDP relay between a client and the server that can drop all traffic on demand.
pub struct Relay {
    pub addr: SocketAddr,
    blocked: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub async fn start(server: SocketAddr) -> Relay {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        back.connect(server).await.unwrap();
        let addr = front.local_addr().unwrap();
        let blocked = Arc::new(AtomicBool::new(false));
        let flag = blocked.clone();
        let task = tokio::spawn(async move {
            let mut client: Option<SocketAddr> = None;
            let mut up = vec![0u8; 65536];
            let mut down = vec![0u8; 65536];
            loop {
                tokio::select! {
                    r = front.recv_from(&mut up) => {
                        let Ok((n, from)) = r else { return };
                        client = Some(from);
                        if !flag.load(Ordering::Relaxed) {
                            let _ = back.send(&up[..n]).await;
                        }
                    }
                    r = back.recv(&mut down) => {
                        let Ok(n) = r else { return };
                        if let (Some(to), false) = (client, flag.load(Ordering::Relaxed)) {
                            let _ = front.send_to(&down[..n], to).await;
                        }
                    }
                }
            }
        });
        Relay {
            addr,
            blocked,
            task,
        }
    }

    pub fn cut(&self) {
        self.blocked.store(true, Ordering::Relaxed);
    }

    pub fn heal(&self) {
        self.blocked.store(false, Ordering::Relaxed);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
