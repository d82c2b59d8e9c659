//! The embedded MQTT broker (MQTT 3.1.1, clean sessions) that mappers talk to when no external
//! broker is configured. Packets are encoded and decoded by rumqttc's codec; this module is
//! only the routing: connections, subscriptions, QoS 0/1/2 handshakes towards publishers,
//! retained messages and last wills; and the checks of [`super::auth`] (CONNECT credentials
//! and client certificates, topic ACLs on SUBSCRIBE and PUBLISH) over plain TCP or TLS
//! ([`super::tls`]).
//!
//! Why not rumqttd: it refuses every filter and topic that starts with `$`, and KubeEdge's
//! topics all start with `$hw/`. Sessions are not persisted (a mapper reconnecting gets a new
//! session), and messages go to subscribers at QoS 0 or 1 without redelivery, which is what a
//! loopback broker for local mappers needs.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use rumqttc::mqttbytes::v4::{
    Codec, ConnAck, ConnectReturnCode, Packet, PubAck, PubComp, PubRec, Publish, SubAck,
    SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::QoS;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

use super::auth::{BrokerAuth, Principal, Refusal};
use super::topics;

/// Packets queued for one subscriber before newer ones are dropped (a stuck client must not
/// hold the broker's memory).
const SUBSCRIBER_QUEUE: usize = 4096;

#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Largest packet accepted; a client sending a larger one is disconnected.
    pub max_packet_bytes: usize,
    /// Time a new connection has to send CONNECT.
    pub connect_timeout: Duration,
    /// Who may connect and what they may do ([`super::auth`]); `None`: anyone, everything.
    pub auth: Option<Arc<BrokerAuth>>,
    /// MQTT over TLS (the listener speaks TLS only): the server's certificate and, when
    /// client certificates are checked, their verifier (see [`super::tls`]).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Connections served at once; one more is closed at once (logged, at most once a
    /// minute) so that a mapper retries rather than waits.
    pub max_connections: usize,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            max_packet_bytes: 1 << 20,
            connect_timeout: Duration::from_secs(10),
            auth: None,
            tls: None,
            max_connections: 1024,
        }
    }
}

struct Subscriber {
    /// Which connection of this client id holds the slot (a newer one takes it over).
    connection: u64,
    /// Who signed in on it: only the same principal may take the slot over.
    owner: Principal,
    tx: mpsc::Sender<Publish>,
    filters: Vec<(String, QoS)>,
}

#[derive(Default)]
struct Router {
    clients: HashMap<String, Subscriber>,
    retained: BTreeMap<String, Publish>,
}

impl Router {
    /// Who gets `publish`, at which QoS. Retained messages are updated here.
    fn route(&mut self, publish: &Publish) -> Vec<(String, mpsc::Sender<Publish>, Publish)> {
        if publish.retain {
            if publish.payload.is_empty() {
                self.retained.remove(&publish.topic);
            } else {
                self.retained.insert(publish.topic.clone(), publish.clone());
            }
        }
        let mut deliveries = Vec::new();
        for (id, client) in &self.clients {
            let granted = client
                .filters
                .iter()
                .filter(|(filter, _)| topics::matches(filter, &publish.topic))
                .map(|(_, qos)| *qos)
                .max_by_key(|q| *q as u8);
            if let Some(qos) = granted {
                let mut copy = publish.clone();
                copy.qos = min_qos(publish.qos, qos);
                copy.retain = false;
                copy.dup = false;
                deliveries.push((id.clone(), client.tx.clone(), copy));
            }
        }
        deliveries
    }
}

/// Hands messages to subscribers' queues. A full queue drops a QoS 0 message (MQTT allows
/// it) and makes a QoS 1 message wait, which holds back its publisher: nothing acknowledged
/// is lost. Each connection writes from its queue in a task of its own, so a publisher held
/// back never stops its own deliveries (no two clients can wait on each other).
async fn deliver(deliveries: Vec<(String, mpsc::Sender<Publish>, Publish)>) {
    for (client, tx, publish) in deliveries {
        match tx.try_send(publish) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(publish)) if publish.qos != QoS::AtMostOnce => {
                let _ = tx.send(publish).await;
            }
            Err(mpsc::error::TrySendError::Full(publish)) => {
                tracing::debug!(%client, topic = %publish.topic, "MQTT subscriber too slow: QoS 0 message dropped");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

fn min_qos(a: QoS, b: QoS) -> QoS {
    // At most QoS 1 towards subscribers: no session state survives a connection anyway.
    let level = (a as u8).min(b as u8).min(1);
    if level == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

/// What the broker refused since it started (each refusal is logged too).
#[derive(Debug, Default)]
pub struct BrokerStats {
    /// Connections refused: bad or missing credentials or client certificate, a will topic
    /// not allowed, or over the connection limit.
    pub refused_connects: AtomicU64,
    /// PUBLISHes dropped because the ACL does not allow their topic.
    pub denied_publishes: AtomicU64,
    /// Subscription filters refused (SUBACK return code 0x80) by the ACL.
    pub denied_subscribes: AtomicU64,
}

/// A running broker.
pub struct Broker {
    pub local_addr: SocketAddr,
    pub stats: Arc<BrokerStats>,
}

impl Broker {
    /// Listens on `listen` and serves until `shutdown`.
    pub async fn start(
        listen: SocketAddr,
        config: BrokerConfig,
        shutdown: CancellationToken,
    ) -> std::io::Result<Broker> {
        let listener = TcpListener::bind(listen).await?;
        let local_addr = listener.local_addr()?;
        let router = Arc::new(Mutex::new(Router::default()));
        let ids = Arc::new(AtomicU64::new(0));
        let stats = Arc::new(BrokerStats::default());
        let broker = Broker {
            local_addr,
            stats: stats.clone(),
        };
        let permits = Arc::new(tokio::sync::Semaphore::new(config.max_connections.max(1)));
        tokio::spawn(async move {
            let mut warned: Option<std::time::Instant> = None;
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = shutdown.cancelled() => return,
                };
                match accepted {
                    Ok((stream, peer)) => {
                        let Ok(permit) = permits.clone().try_acquire_owned() else {
                            stats.refused_connects.fetch_add(1, Ordering::Relaxed);
                            if warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                                tracing::warn!(%peer, max = config.max_connections, "MQTT connection limit reached: new connections are closed");
                                warned = Some(std::time::Instant::now());
                            }
                            continue;
                        };
                        let _ = stream.set_nodelay(true);
                        let connection = ids.fetch_add(1, Ordering::Relaxed);
                        let session = Session {
                            router: router.clone(),
                            config: config.clone(),
                            connection,
                            stats: stats.clone(),
                            peer,
                        };
                        let stop = shutdown.clone();
                        tokio::spawn(async move {
                            let _permit = permit;
                            tokio::select! {
                                outcome = session.accept(stream) => match outcome {
                                    // A packet over the size limit, or not MQTT: worth a warning.
                                    Err(reason) if reason.starts_with("bad ") => {
                                        tracing::warn!(%peer, %reason, "MQTT connection closed");
                                    }
                                    Err(reason) => tracing::info!(%peer, %reason, "MQTT connection closed"),
                                    Ok(()) => {}
                                },
                                _ = stop.cancelled() => {}
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "MQTT accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Ok(broker)
    }
}

struct Session {
    router: Arc<Mutex<Router>>,
    config: BrokerConfig,
    connection: u64,
    stats: Arc<BrokerStats>,
    peer: SocketAddr,
}

impl Session {
    fn router(&self) -> std::sync::MutexGuard<'_, Router> {
        self.router.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves one accepted connection: the TLS handshake first when the broker has TLS
    /// (within the CONNECT timeout), then the MQTT session.
    async fn accept(self, stream: tokio::net::TcpStream) -> Result<(), String> {
        let Some(tls) = self.config.tls.clone() else {
            return self.run(stream, None).await;
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let stream = tokio::time::timeout(self.config.connect_timeout, acceptor.accept(stream))
            .await
            .map_err(|_| "no TLS handshake in time".to_owned())?
            .map_err(|e| format!("bad TLS handshake: {e}"))?;
        // The client certificate was verified by the handshake (when one is asked for).
        let identity = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|cert| transport::tls::node_name_from_cert(cert).ok());
        self.run(stream, identity).await
    }

    /// The MQTT session; `identity`: the common name of the client's verified certificate.
    async fn run<S>(self, stream: S, identity: Option<String>) -> Result<(), String>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let codec = Codec {
            max_incoming_size: self.config.max_packet_bytes,
            max_outgoing_size: self.config.max_packet_bytes,
        };
        let mut framed = Framed::new(stream, codec);
        let first = tokio::time::timeout(self.config.connect_timeout, framed.next())
            .await
            .map_err(|_| "no CONNECT in time".to_owned())?;
        let connect = match first {
            Some(Ok(Packet::Connect(connect))) => connect,
            Some(Ok(other)) => return Err(format!("expected CONNECT, got {other:?}")),
            Some(Err(e)) => return Err(format!("bad CONNECT: {e}")),
            None => return Ok(()),
        };
        let identity_seen = identity.clone();
        let principal = match self.authenticate(&connect, identity).await {
            Ok(principal) => principal,
            Err(refusal) => {
                self.stats.refused_connects.fetch_add(1, Ordering::Relaxed);
                let (code, why) = match refusal {
                    Refusal::BadCredentials => (
                        ConnectReturnCode::BadUserNamePassword,
                        "bad user name or password",
                    ),
                    Refusal::NotAuthorized => (
                        ConnectReturnCode::NotAuthorized,
                        "not authorized (last will topic)",
                    ),
                    Refusal::NoCertificate => (
                        ConnectReturnCode::NotAuthorized,
                        "not authorized (no client certificate)",
                    ),
                };
                let user = connect
                    .login
                    .as_ref()
                    .map(|l| l.username.clone())
                    .or(identity_seen);
                tracing::warn!(peer = %self.peer, client_id = %connect.client_id, ?user, "MQTT CONNECT refused: {why}");
                // §3.2.2.3: a refusing CONNACK, then the server closes the connection.
                let _ = framed
                    .send(Packet::ConnAck(ConnAck::new(code, false)))
                    .await;
                return Err(format!("CONNECT refused: {why}"));
            }
        };
        let client_id = if connect.client_id.is_empty() {
            format!("kedge-anon-{}", self.connection)
        } else {
            connect.client_id.clone()
        };
        let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
        // A second connection with the same id takes over (MQTT 3.1.1 §3.1.4), but with
        // authentication only one of the same user: no mapper may cut off another's session,
        // or edgecore's own, by using its client id.
        let taken = {
            let mut router = self.router();
            let taken = router
                .clients
                .get(&client_id)
                .is_some_and(|held| self.config.auth.is_some() && held.owner != principal);
            if !taken {
                router.clients.insert(
                    client_id.clone(),
                    Subscriber {
                        connection: self.connection,
                        owner: principal.clone(),
                        tx,
                        filters: Vec::new(),
                    },
                );
            }
            taken
        };
        if taken {
            self.stats.refused_connects.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(peer = %self.peer, %client_id, user = ?principal, "MQTT CONNECT refused: the client id is in use by another user (identifier rejected)");
            let _ = framed
                .send(Packet::ConnAck(ConnAck::new(
                    ConnectReturnCode::BadClientId,
                    false,
                )))
                .await;
            return Err("CONNECT refused: client id in use by another user".into());
        }
        let (mut sink, mut stream) = framed.split();
        sink.send(Packet::ConnAck(ConnAck::new(
            ConnectReturnCode::Success,
            false,
        )))
        .await
        .map_err(|e| format!("write failed: {e}"))?;
        let (control_tx, control_rx) = mpsc::channel(64);
        let mut writer = tokio::spawn(write_loop(sink, rx, control_rx));
        // One and a half keep-alive periods of silence end the session (MQTT 3.1.1 §3.1.2.10);
        // a keep-alive of 0 turns the mechanism off.
        let keep_alive = match connect.keep_alive {
            0 => Duration::from_secs(365 * 24 * 3600),
            seconds => Duration::from_millis(u64::from(seconds) * 1500),
        };
        let outcome = loop {
            tokio::select! {
                incoming = tokio::time::timeout(keep_alive, stream.next()) => {
                    let packet = match incoming {
                        Err(_) => break Err("keep-alive expired".to_owned()),
                        Ok(None) => break Err("connection closed without DISCONNECT".to_owned()),
                        Ok(Some(Err(e))) => break Err(format!("bad packet: {e}")),
                        Ok(Some(Ok(packet))) => packet,
                    };
                    match self.handle(&client_id, &principal, packet, &control_tx).await {
                        Ok(true) => {}
                        Ok(false) => break Ok(()),
                        Err(e) => break Err(e),
                    }
                }
                written = &mut writer => {
                    break match written {
                        Ok(result) => result,
                        Err(e) => Err(format!("writer failed: {e}")),
                    };
                }
            }
        };
        writer.abort();
        let will = {
            let mut router = self.router();
            if router.clients.get(&client_id).map(|c| c.connection) == Some(self.connection) {
                router.clients.remove(&client_id);
            }
            // The last will goes out unless the client said goodbye.
            match (&outcome, &connect.last_will) {
                (Err(_), Some(will)) => {
                    let mut publish =
                        Publish::from_bytes(will.topic.clone(), will.qos, will.message.clone());
                    publish.retain = will.retain;
                    router.route(&publish)
                }
                _ => Vec::new(),
            }
        };
        deliver(will).await;
        outcome
    }

    /// Checks the CONNECT's credentials when the broker has a password file (Argon2 on a
    /// blocking thread: it is slow on purpose).
    async fn authenticate(
        &self,
        connect: &rumqttc::mqttbytes::v4::Connect,
        identity: Option<String>,
    ) -> Result<Principal, Refusal> {
        let Some(auth) = self.config.auth.clone() else {
            return Ok(Principal::Anonymous);
        };
        let login = connect
            .login
            .as_ref()
            .map(|l| (l.username.clone(), l.password.clone()));
        let will = connect.last_will.as_ref().map(|w| w.topic.clone());
        tokio::task::spawn_blocking(move || {
            let (user, password) = match &login {
                Some((user, password)) => (Some(user.as_str()), Some(password.as_str())),
                None => (None, None),
            };
            auth.authenticate(user, password, will.as_deref(), identity.as_deref())
        })
        .await
        .unwrap_or(Err(Refusal::BadCredentials))
    }

    fn may_publish(&self, who: &Principal, topic: &str) -> bool {
        self.config
            .auth
            .as_ref()
            .is_none_or(|auth| auth.may_publish(who, topic))
    }

    fn may_subscribe(&self, who: &Principal, filter: &str) -> bool {
        self.config
            .auth
            .as_ref()
            .is_none_or(|auth| auth.may_subscribe(who, filter))
    }

    /// Handles one packet; `Ok(false)` when the client disconnected.
    async fn handle(
        &self,
        client_id: &str,
        principal: &Principal,
        packet: Packet,
        control: &mpsc::Sender<Packet>,
    ) -> Result<bool, String> {
        let send = |packet: Packet| async move {
            control
                .send(packet)
                .await
                .map_err(|_| "the connection's writer stopped".to_owned())
        };
        match packet {
            Packet::Publish(publish) => {
                if !topics::valid_topic(&publish.topic) {
                    return Err(format!("invalid topic {:?}", publish.topic));
                }
                let (qos, pkid) = (publish.qos, publish.pkid);
                let deliveries = if self.may_publish(principal, &publish.topic) {
                    self.router().route(&publish)
                } else {
                    // MQTT 3.1.1 has no negative acknowledgement: the message is acknowledged
                    // as the QoS requires and dropped (as mosquitto does).
                    self.stats.denied_publishes.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(peer = %self.peer, %client_id, user = ?principal, topic = %publish.topic, "MQTT PUBLISH refused by the ACL: dropped");
                    Vec::new()
                };
                // Acknowledged once every subscriber's queue took it.
                deliver(deliveries).await;
                match qos {
                    QoS::AtMostOnce => {}
                    QoS::AtLeastOnce => send(Packet::PubAck(PubAck::new(pkid))).await?,
                    QoS::ExactlyOnce => send(Packet::PubRec(PubRec::new(pkid))).await?,
                }
            }
            Packet::PubRel(rel) => send(Packet::PubComp(PubComp::new(rel.pkid))).await?,
            Packet::Subscribe(subscribe) => {
                let mut codes = Vec::with_capacity(subscribe.filters.len());
                let mut retained = Vec::new();
                {
                    let mut router = self.router();
                    let matching: Vec<Publish> = router.retained.values().cloned().collect();
                    let Some(client) = router.clients.get_mut(client_id) else {
                        return Err("session taken over".into());
                    };
                    for filter in subscribe.filters {
                        if !topics::valid_filter(&filter.path) {
                            codes.push(SubscribeReasonCode::Failure);
                            continue;
                        }
                        if !self.may_subscribe(principal, &filter.path) {
                            self.stats.denied_subscribes.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(peer = %self.peer, %client_id, user = ?principal, filter = %filter.path, "MQTT SUBSCRIBE refused by the ACL (return code 0x80)");
                            codes.push(SubscribeReasonCode::Failure);
                            continue;
                        }
                        let granted = min_qos(filter.qos, QoS::AtLeastOnce);
                        for publish in &matching {
                            if topics::matches(&filter.path, &publish.topic) {
                                let mut copy = publish.clone();
                                copy.qos = min_qos(publish.qos, granted);
                                retained.push(copy);
                            }
                        }
                        client.filters.retain(|(f, _)| *f != filter.path);
                        client.filters.push((filter.path, granted));
                        codes.push(SubscribeReasonCode::Success(granted));
                    }
                    for publish in retained.drain(..) {
                        let _ = client.tx.try_send(publish);
                    }
                }
                send(Packet::SubAck(SubAck::new(subscribe.pkid, codes))).await?;
            }
            Packet::Unsubscribe(unsubscribe) => {
                if let Some(client) = self.router().clients.get_mut(client_id) {
                    client
                        .filters
                        .retain(|(f, _)| !unsubscribe.topics.contains(f));
                }
                send(Packet::UnsubAck(UnsubAck::new(unsubscribe.pkid))).await?;
            }
            Packet::PingReq => send(Packet::PingResp).await?,
            Packet::Disconnect => return Ok(false),
            // Acknowledgements of what we sent: nothing to redeliver in a clean session.
            Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubComp(_) => {}
            other => return Err(format!("unexpected packet {other:?}")),
        }
        Ok(true)
    }
}

/// Writes one connection's packets: acknowledgements from its reader first, then messages
/// for its subscriptions. Ends when the client's slot is taken over or the socket fails.
async fn write_loop<S: AsyncRead + AsyncWrite + Unpin>(
    mut sink: SplitSink<Framed<S, Codec>, Packet>,
    mut deliveries: mpsc::Receiver<Publish>,
    mut control: mpsc::Receiver<Packet>,
) -> Result<(), String> {
    let mut next_pkid: u16 = 0;
    loop {
        let packet = tokio::select! {
            biased;
            packet = control.recv() => match packet {
                Some(packet) => packet,
                None => return Ok(()),
            },
            publish = deliveries.recv() => match publish {
                Some(mut publish) => {
                    if publish.qos != QoS::AtMostOnce {
                        next_pkid = next_pkid.checked_add(1).unwrap_or(1);
                        publish.pkid = next_pkid;
                    }
                    Packet::Publish(publish)
                }
                None => {
                    return Err("taken over by a newer connection with the same client id".into())
                }
            },
        };
        sink.send(packet)
            .await
            .map_err(|e| format!("write failed: {e}"))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions};

    async fn broker() -> (SocketAddr, CancellationToken) {
        let stop = CancellationToken::new();
        let broker = Broker::start(
            "127.0.0.1:0".parse().expect("address"),
            BrokerConfig::default(),
            stop.clone(),
        )
        .await
        .expect("broker");
        (broker.local_addr, stop)
    }

    fn client(addr: SocketAddr, id: &str, will: Option<LastWill>) -> (AsyncClient, EventLoop) {
        let mut options = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        options.set_keep_alive(Duration::from_secs(5));
        if let Some(will) = will {
            options.set_last_will(will);
        }
        AsyncClient::new(options, 64)
    }

    /// Polls until `n` publishes arrived (or 5 s passed); returns their topics and payloads.
    async fn receive(eventloop: &mut EventLoop, n: usize) -> Vec<(String, Vec<u8>)> {
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while got.len() < n {
            match tokio::time::timeout_at(deadline, eventloop.poll()).await {
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                    got.push((p.topic, p.payload.to_vec()))
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("client error: {e}"),
                Err(_) => break,
            }
        }
        got
    }

    /// Polls until the SUBACK, so that later publishes are routed to this client.
    async fn subscribed(eventloop: &mut EventLoop) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match tokio::time::timeout_at(deadline, eventloop.poll()).await {
                Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => return,
                Ok(Ok(_)) => {}
                other => panic!("no SUBACK: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn dollar_topics_retained_messages_and_wills() {
        let (addr, stop) = broker().await;

        // A retained message, published before anyone subscribes.
        let (publisher, mut publisher_loop) = client(addr, "publisher", None);
        publisher
            .publish("$hw/events/device/d1/state", QoS::AtLeastOnce, true, "kept")
            .await
            .expect("publish");
        let publisher_task =
            tokio::spawn(async move { while publisher_loop.poll().await.is_ok() {} });

        // `#` does not match `$` topics; `$hw/#` does, and gets the retained message.
        let (all, mut all_loop) = client(addr, "all", None);
        all.subscribe("#", QoS::AtMostOnce)
            .await
            .expect("subscribe");
        subscribed(&mut all_loop).await;
        let (hw, mut hw_loop) = client(addr, "hw", None);
        hw.subscribe("$hw/#", QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        subscribed(&mut hw_loop).await;
        let got = receive(&mut hw_loop, 1).await;
        assert_eq!(
            got,
            vec![("$hw/events/device/d1/state".to_owned(), b"kept".to_vec())]
        );

        // A client that vanishes without DISCONNECT: its will goes out.
        let will = LastWill::new("$hw/events/mapper/gone", "bye", QoS::AtMostOnce, false);
        let (_mortal, mut mortal_loop) = client(addr, "mortal", Some(will));
        let mortal_task = tokio::spawn(async move { while mortal_loop.poll().await.is_ok() {} });
        tokio::time::sleep(Duration::from_millis(200)).await;
        mortal_task.abort(); // drops the TCP connection
        let got = receive(&mut hw_loop, 1).await;
        assert_eq!(
            got,
            vec![("$hw/events/mapper/gone".to_owned(), b"bye".to_vec())]
        );

        // Nothing of it reached the `#` subscriber; a plain topic does.
        publisher
            .publish("plain/topic", QoS::AtMostOnce, false, "x")
            .await
            .expect("publish");
        let got = receive(&mut all_loop, 1).await;
        assert_eq!(got, vec![("plain/topic".to_owned(), b"x".to_vec())]);

        publisher_task.abort();
        stop.cancel();
    }

    #[tokio::test]
    async fn refusals_are_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let passwd = dir.path().join("passwd");
        let acl = dir.path().join("acl");
        super::super::auth::set_password(&passwd, "d1", "pw").expect("passwd");
        std::fs::write(&acl, "* readwrite $hw/events/device/%u/#\n").expect("acl");
        let auth = BrokerAuth::load(Some(&passwd), Some(&acl), false).expect("auth");
        let stop = CancellationToken::new();
        let broker = Broker::start(
            "127.0.0.1:0".parse().expect("address"),
            BrokerConfig {
                auth: Some(Arc::new(auth)),
                ..BrokerConfig::default()
            },
            stop.clone(),
        )
        .await
        .expect("broker");
        let addr = broker.local_addr;

        let mut options = MqttOptions::new("d1", addr.ip().to_string(), addr.port());
        options.set_keep_alive(Duration::from_secs(5));
        options.set_credentials("d1", "pw");
        let (d1, mut d1_loop) = AsyncClient::new(options, 64);
        d1.subscribe("$hw/events/device/d2/#", QoS::AtMostOnce)
            .await
            .expect("subscribe");
        d1.subscribe("$hw/events/device/d1/#", QoS::AtMostOnce)
            .await
            .expect("subscribe");
        d1.publish(
            "$hw/events/device/d2/twin/update",
            QoS::AtLeastOnce,
            false,
            "x",
        )
        .await
        .expect("publish");
        d1.publish(
            "$hw/events/device/d1/twin/update",
            QoS::AtLeastOnce,
            false,
            "mine",
        )
        .await
        .expect("publish");
        let mut codes = Vec::new();
        let mut got = Vec::new();
        let mut acks = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while acks < 2 || codes.len() < 2 || got.is_empty() {
            match tokio::time::timeout_at(deadline, d1_loop.poll()).await {
                Ok(Ok(Event::Incoming(Packet::SubAck(ack)))) => codes.extend(ack.return_codes),
                Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acks += 1,
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => got.push(p.topic),
                Ok(Ok(_)) => {}
                other => panic!("d1: {other:?} (sub codes {codes:?}, acks {acks}, got {got:?})"),
            }
        }
        assert_eq!(
            codes,
            vec![
                SubscribeReasonCode::Failure,
                SubscribeReasonCode::Success(QoS::AtMostOnce)
            ]
        );
        assert_eq!(got, vec!["$hw/events/device/d1/twin/update".to_owned()]);
        assert_eq!(broker.stats.denied_publishes.load(Ordering::Relaxed), 1);
        assert_eq!(broker.stats.denied_subscribes.load(Ordering::Relaxed), 1);

        // A wrong password: CONNACK 4, counted.
        let mut options = MqttOptions::new("d1-bad", addr.ip().to_string(), addr.port());
        options.set_credentials("d1", "wrong");
        let (_bad, mut bad_loop) = AsyncClient::new(options, 8);
        match tokio::time::timeout(Duration::from_secs(5), bad_loop.poll()).await {
            Ok(Err(rumqttc::ConnectionError::ConnectionRefused(code))) => {
                assert_eq!(code, ConnectReturnCode::BadUserNamePassword)
            }
            other => panic!("a wrong password: {other:?}"),
        }
        assert_eq!(broker.stats.refused_connects.load(Ordering::Relaxed), 1);
        stop.cancel();
    }

    /// Polls until the CONNACK (or an error, or 5 s).
    async fn connack(eventloop: &mut EventLoop) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match tokio::time::timeout_at(deadline, eventloop.poll()).await {
                Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => return Ok(()),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => return Err("no answer in 5 s".to_owned()),
            }
        }
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_are_closed() {
        let stop = CancellationToken::new();
        let broker = Broker::start(
            "127.0.0.1:0".parse().expect("address"),
            BrokerConfig {
                max_connections: 1,
                ..BrokerConfig::default()
            },
            stop.clone(),
        )
        .await
        .expect("broker");
        let addr = broker.local_addr;
        let (_first, mut first_loop) = client(addr, "first", None);
        connack(&mut first_loop).await.expect("the first connects");
        let (_second, mut second_loop) = client(addr, "second", None);
        assert!(connack(&mut second_loop).await.is_err(), "over the limit");
        assert_eq!(broker.stats.refused_connects.load(Ordering::Relaxed), 1);
        // The first one's slot freed, a new connection gets it.
        drop(first_loop);
        let mut third_loop = client(addr, "third", None).1;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while connack(&mut third_loop).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the slot was not freed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop.cancel();
    }
}
