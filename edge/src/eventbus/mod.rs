//! EventBus: the node's MQTT side. It connects (rumqttc) to the embedded broker
//! ([`broker`]) or to an external one (`--mqtt-url`, e.g. mosquitto), subscribes to KubeEdge's
//! topics ([`topics`]), hands requests to DeviceTwin in batches (one commit per batch) and
//! publishes the answers; it also publishes what DeviceTwin derives from cache changes
//! (membership updates, deltas). Who may use the embedded broker is [`auth`]'s (passwords,
//! client certificates, topic ACLs) and [`tls`]'s; an external broker is reached with the
//! credentials and TLS of [`ExternalClient`].

pub mod auth;
pub mod broker;
pub mod tls;
pub mod topics;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use replication::watcher::{Event as CacheEvent, ResumableWatcher};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, SubscribeFilter};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::devicetwin::{DeviceTwin, Outgoing};
use crate::meta::MetaManager;

/// Requests handled per commit at most.
const MAX_BATCH: usize = 256;
/// The largest MQTT packet the embedded broker and edgecore's client accept.
const MAX_PACKET: usize = 1 << 20;

/// Which broker mappers use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MqttMode {
    /// edgecore runs a broker on this address.
    Embedded(SocketAddr),
    /// An external broker.
    External(BrokerUrl),
    /// No EventBus.
    Off,
}

/// An external broker's address, from `--mqtt-url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
    /// `mqtts://` or `ssl://`: MQTT over TLS.
    pub tls: bool,
}

/// Parses `mqtt://HOST[:PORT]` or `tcp://HOST[:PORT]` (port 1883 by default), or
/// `mqtts://HOST[:PORT]` or `ssl://HOST[:PORT]` for TLS (port 8883 by default, the IANA
/// ports of MQTT).
///
/// # Errors
/// Another scheme, no host, a port that is not a number.
pub fn parse_mqtt_url(url: &str) -> Result<BrokerUrl, String> {
    let (rest, tls) = if let Some(rest) = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
    {
        (rest, false)
    } else if let Some(rest) = url
        .strip_prefix("mqtts://")
        .or_else(|| url.strip_prefix("ssl://"))
    {
        (rest, true)
    } else {
        return Err(format!(
            "{url:?}: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]"
        ));
    };
    let default_port = if tls { 8883 } else { 1883 };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || host.starts_with('[') => {
            let port = port
                .parse()
                .map_err(|_| format!("{url:?}: {port:?} is not a port"))?;
            (host.trim_start_matches('[').trim_end_matches(']'), port)
        }
        _ => (rest, default_port),
    };
    if host.is_empty() {
        return Err(format!("{url:?}: no host"));
    }
    Ok(BrokerUrl {
        host: host.to_owned(),
        port,
        tls,
    })
}

/// How edgecore's client signs in to an external broker.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExternalClient {
    /// MQTT username (`--mqtt-username`).
    pub username: Option<String>,
    /// A file whose first line is the password (`--mqtt-client-password-file`).
    pub password_file: Option<PathBuf>,
    /// PEM CA certificates that sign the broker's certificate (`--mqtt-ca`); needed for
    /// `mqtts://`.
    pub ca: Option<PathBuf>,
    /// PEM certificate and key of edgecore's client for brokers that require client
    /// certificates (`--mqtt-client-cert`, `--mqtt-client-key`).
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl ExternalClient {
    /// Sets credentials and TLS on `options` for `url`.
    ///
    /// # Errors
    /// An unreadable file, PEM without a certificate or key, `mqtts://` without `--mqtt-ca`,
    /// TLS files for a plain `mqtt://` broker.
    pub fn apply(&self, url: &BrokerUrl, options: &mut MqttOptions) -> anyhow::Result<()> {
        use anyhow::Context;
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        if let Some(user) = &self.username {
            let password = match &self.password_file {
                Some(path) => std::fs::read_to_string(path)
                    .with_context(|| format!("reading the MQTT password from {}", path.display()))?
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
                None => String::new(),
            };
            options.set_credentials(user.clone(), password);
        } else if self.password_file.is_some() {
            anyhow::bail!("an MQTT client password without --mqtt-username");
        }
        if !url.tls {
            if self.ca.is_some() || self.client_cert.is_some() {
                anyhow::bail!("--mqtt-ca and client certificates need an mqtts:// broker URL");
            }
            return Ok(());
        }
        let Some(ca) = &self.ca else {
            anyhow::bail!("mqtts://{}: --mqtt-ca FILE (the CA certificates that sign the broker's certificate) is required", url.host);
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca)
            .with_context(|| format!("reading {}", ca.display()))?
        {
            let cert = cert.with_context(|| format!("a certificate in {}", ca.display()))?;
            roots
                .add(cert)
                .with_context(|| format!("a CA certificate in {}", ca.display()))?;
        }
        if roots.is_empty() {
            anyhow::bail!("{}: no certificate", ca.display());
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let config = match &self.client_cert {
            Some((cert, key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .with_context(|| format!("reading {}", cert.display()))?
                    .collect::<Result<Vec<_>, _>>()
                    .with_context(|| format!("a certificate in {}", cert.display()))?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .with_context(|| format!("a private key in {}", key.display()))?;
                builder.with_client_auth_cert(chain, key)?
            }
            None => builder.with_no_client_auth(),
        };
        options.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(std::sync::Arc::new(config)),
        ));
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct EventBusConfig {
    pub mode: MqttMode,
    /// Larger request payloads are answered with an error (413) on their result topic.
    pub max_payload: usize,
    /// The embedded broker's password file ([`auth`]); `None`: the broker is open.
    pub password_file: Option<PathBuf>,
    /// The embedded broker's ACL file ([`auth`]); needs a password file or client
    /// certificates.
    pub acl_file: Option<PathBuf>,
    /// TLS on the embedded broker ([`tls`]).
    pub tls: Option<tls::BrokerTls>,
    /// Credentials and TLS towards an external broker.
    pub external: ExternalClient,
}

impl Default for EventBusConfig {
    fn default() -> Self {
        EventBusConfig {
            mode: MqttMode::Embedded("127.0.0.1:1883".parse().expect("address")),
            max_payload: 64 << 10,
            password_file: None,
            acl_file: None,
            tls: None,
            external: ExternalClient::default(),
        }
    }
}

/// Starts the broker (when embedded) and the EventBus, with DeviceTwin answering MQTT
/// requests and, when DMI is on, the reports of DMI mappers (`dmi`); returns the broker's
/// address, if any.
pub async fn start(
    meta: Arc<MetaManager>,
    config: EventBusConfig,
    dmi: Option<mpsc::Receiver<crate::dmi::server::Pending>>,
    shutdown: CancellationToken,
) -> anyhow::Result<Option<SocketAddr>> {
    let mut login = None;
    let mut client_tls = None;
    let (host, port, embedded) = match &config.mode {
        MqttMode::Off => {
            if dmi.is_some() {
                let twin = DeviceTwin::new(meta.clone(), config.max_payload);
                tokio::spawn(serve(twin, meta, None, None, dmi, shutdown));
            }
            return Ok(None);
        }
        MqttMode::Embedded(listen) => {
            let server_tls = match &config.tls {
                Some(files) => {
                    Some(tls::server_config(files).context("TLS for the embedded MQTT broker")?)
                }
                None => None,
            };
            let client_certs = config.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
            let auth = if config.password_file.is_some() || client_certs {
                let auth = auth::BrokerAuth::load(
                    config.password_file.as_deref(),
                    config.acl_file.as_deref(),
                    client_certs,
                )
                .map_err(|e| anyhow::anyhow!("the MQTT broker's credentials: {e}"))?;
                tracing::info!(
                    users = auth.users(),
                    client_certs,
                    acl = config.acl_file.is_some(),
                    "the embedded MQTT broker authenticates its clients"
                );
                login = Some(auth.internal());
                Some(Arc::new(auth))
            } else if config.acl_file.is_some() {
                anyhow::bail!("an MQTT ACL file needs a password file (--mqtt-password-file) or client certificates (--mqtt-tls-client-ca): without one no user is known")
            } else if listen.ip().is_loopback() {
                tracing::warn!(%listen, "the embedded MQTT broker has no authentication: every local process may read and write every device's topics (--mqtt-password-file to require credentials)");
                None
            } else {
                tracing::warn!(%listen, "the embedded MQTT broker listens beyond loopback and has no authentication (--mqtt-password-file to require credentials)");
                None
            };
            if let Some((_, own)) = &server_tls {
                client_tls = Some(tls::pinned_client(own.clone())?);
            }
            let broker_config = broker::BrokerConfig {
                max_packet_bytes: MAX_PACKET,
                auth,
                tls: server_tls.map(|(config, _)| config),
                ..Default::default()
            };
            let broker = broker::Broker::start(*listen, broker_config, shutdown.clone())
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {listen} for MQTT: {e}"))?;
            let addr = broker.local_addr;
            let host = if addr.ip().is_unspecified() {
                "127.0.0.1".to_owned()
            } else {
                addr.ip().to_string()
            };
            (host, addr.port(), Some(addr))
        }
        MqttMode::External(url) => (url.host.clone(), url.port, None),
    };
    let node = meta.node().to_owned();
    let mut options = MqttOptions::new(format!("kedge-edgecore-{node}"), host, port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true)
        .set_max_packet_size(MAX_PACKET + 1024, MAX_PACKET + 1024)
        .set_request_channel_capacity(4096)
        .set_inflight(1024);
    if let Some((user, password)) = login {
        options.set_credentials(user, password);
    }
    if let MqttMode::External(url) = &config.mode {
        config.external.apply(url, &mut options)?;
    }
    if let Some(tls) = client_tls {
        options.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls),
        ));
    }
    let (client, mut eventloop) = AsyncClient::new(options, 4096);
    // Answers go out at once (rumqttc leaves Nagle's algorithm on by default).
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    let (requests_tx, requests_rx) = mpsc::channel(8192);
    tokio::spawn(poll_broker(
        eventloop,
        client.clone(),
        node,
        requests_tx,
        shutdown.clone(),
    ));
    let twin = DeviceTwin::new(meta.clone(), config.max_payload);
    tokio::spawn(serve(
        twin,
        meta,
        Some(client),
        Some(requests_rx),
        dmi,
        shutdown,
    ));
    Ok(embedded)
}

/// Drives the MQTT connection: (re)subscribes after each connect and passes publishes on.
async fn poll_broker(
    mut eventloop: rumqttc::EventLoop,
    client: AsyncClient,
    node: String,
    requests: mpsc::Sender<(String, Bytes)>,
    shutdown: CancellationToken,
) {
    let mut connected = None;
    // When the broker was lost, and whether that was said: a blip (the node was paused, the
    // broker restarted) heals within a retry or two and is not worth a warning.
    let mut lost: Option<(std::time::Instant, bool)> = None;
    loop {
        let event = tokio::select! {
            event = eventloop.poll() => event,
            _ = shutdown.cancelled() => {
                let _ = client.try_disconnect();
                return;
            }
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                match lost.take() {
                    Some((_, true)) => tracing::info!("EventBus reconnected to the MQTT broker"),
                    Some((_, false)) => tracing::debug!("EventBus reconnected to the MQTT broker"),
                    None if connected.is_none() => {
                        tracing::info!("EventBus connected to the MQTT broker")
                    }
                    None => {}
                }
                connected = Some(true);
                let filters = topics::subscriptions(&node)
                    .into_iter()
                    .map(|f| SubscribeFilter::new(f, QoS::AtLeastOnce));
                if let Err(e) = client.try_subscribe_many(filters) {
                    tracing::error!(error = %e, "cannot subscribe to KubeEdge's topics");
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                if requests
                    .send((publish.topic, publish.payload))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                // A warning once per outage that lasts, not on every retry or blip.
                let (since, warned) = lost.get_or_insert((std::time::Instant::now(), false));
                if !*warned && since.elapsed() >= BROKER_LOST_WARNING {
                    tracing::warn!(error = %e, "EventBus cannot reach the MQTT broker for {BROKER_LOST_WARNING:?}; retrying every second");
                    *warned = true;
                } else if !*warned {
                    tracing::debug!(error = %e, "EventBus lost the MQTT broker; retrying");
                }
                connected = Some(false);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
        }
    }
}

/// How long the MQTT broker may be unreachable before EventBus warns about it.
const BROKER_LOST_WARNING: Duration = Duration::from_secs(10);

/// Messages waiting for the MQTT client beyond this are dropped, oldest first (a broker that
/// takes nothing for this long is gone; mappers re-read with twin/get and membership/get).
const MAX_BACKLOG: usize = 65_536;

/// Answers requests in batches and publishes what cache changes mean for devices. It never
/// waits on the MQTT client: the client's loop may itself be waiting for this task to take
/// requests, so answers queue here when the client's queue is full. Without MQTT (`client`
/// none), it serves DMI's reports only; held-back reports (`reportCycle`) go up when due.
async fn serve(
    mut twin: DeviceTwin,
    meta: Arc<MetaManager>,
    client: Option<AsyncClient>,
    mut requests: Option<mpsc::Receiver<(String, Bytes)>>,
    mut dmi: Option<mpsc::Receiver<crate::dmi::server::Pending>>,
    shutdown: CancellationToken,
) {
    let mut watcher = ResumableWatcher::all(meta.store().clone());
    let mut watching = true;
    let mut started = false;
    let mut backlog: VecDeque<Outgoing> = VecDeque::new();
    loop {
        // Cache changes first, all of them: our own commits add one per device reported,
        // and a watcher left behind is cut off.
        let mut outgoing = Vec::new();
        while watching {
            match watcher.try_next() {
                Ok(Some(event)) => outgoing.extend(twin_event(&mut twin, event, &mut started)),
                Ok(None) => break,
                Err(_) => watching = false,
            }
        }
        queue(&mut backlog, outgoing);
        if let Some(client) = &client {
            flush(client, &mut backlog);
        } else {
            backlog.clear();
        }
        let due = twin.next_due();
        let outgoing = tokio::select! {
            first = recv(&mut requests) => {
                let Some(first) = first else { return };
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match requests.as_mut().map(|r| r.try_recv()) {
                        Some(Ok(next)) => batch.push(next),
                        _ => break,
                    }
                }
                twin.handle(batch)
            }
            first = recv(&mut dmi) => {
                let Some(first) = first else { return };
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match dmi.as_mut().map(|r| r.try_recv()) {
                        Some(Ok(next)) => batch.push(next),
                        _ => break,
                    }
                }
                let (reports, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
                for (reply, result) in replies.into_iter().zip(twin.dmi_reports(reports)) {
                    let _ = reply.send(result);
                }
                Vec::new()
            }
            event = watcher.next(), if watching => match event {
                Ok(event) => twin_event(&mut twin, event, &mut started),
                Err(_) => {
                    tracing::warn!("the cache's watch closed; DeviceTwin follows requests only");
                    watching = false;
                    Vec::new()
                }
            },
            _ = tokio::time::sleep_until(due.unwrap_or_else(std::time::Instant::now).into()), if due.is_some() => {
                twin.flush_due(std::time::Instant::now());
                Vec::new()
            }
            _ = tokio::time::sleep(Duration::from_millis(5)), if !backlog.is_empty() && client.is_some() => Vec::new(),
            _ = shutdown.cancelled() => return,
        };
        queue(&mut backlog, outgoing);
        if let Some(client) = &client {
            flush(client, &mut backlog);
        }
    }
}

/// The next item of an optional queue; never, without one.
async fn recv<T>(queue: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match queue {
        Some(queue) => queue.recv().await,
        None => std::future::pending().await,
    }
}

/// One event of the cache's watch for DeviceTwin. The first restart is the watch starting
/// (the twin was just built from the cache); a later one means changes were lost: the
/// devices are read again.
fn twin_event(twin: &mut DeviceTwin, event: CacheEvent, started: &mut bool) -> Vec<Outgoing> {
    match event {
        CacheEvent::Change(change) => twin.on_change(&change),
        CacheEvent::Restart { .. } if !*started => {
            *started = true;
            Vec::new()
        }
        CacheEvent::Restart { .. } => {
            tracing::warn!("DeviceTwin fell behind the cache; re-reading the devices");
            twin.resync()
        }
    }
}

fn queue(backlog: &mut VecDeque<Outgoing>, outgoing: Vec<Outgoing>) {
    backlog.extend(outgoing);
    if backlog.len() > MAX_BACKLOG {
        let dropped = backlog.len() - MAX_BACKLOG;
        backlog.drain(..dropped);
        tracing::warn!(
            dropped,
            "the MQTT broker takes nothing: oldest answers dropped"
        );
    }
}

/// Hands the backlog to the MQTT client until its queue is full.
fn flush(client: &AsyncClient, backlog: &mut VecDeque<Outgoing>) {
    while let Some(message) = backlog.pop_front() {
        let qos = if message.notification {
            QoS::AtLeastOnce
        } else {
            QoS::AtMostOnce
        };
        let notification = message.notification;
        match client.try_publish(message.topic, qos, false, message.payload) {
            Ok(()) => {}
            // The client's queue is full: the message comes back, to go first next time.
            Err(rumqttc::ClientError::TryRequest(rumqttc::Request::Publish(publish))) => {
                backlog.push_front(Outgoing {
                    topic: publish.topic,
                    payload: publish.payload.to_vec(),
                    notification,
                });
                return;
            }
            Err(e) => tracing::warn!(error = %e, "cannot publish on MQTT"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_parse() {
        let url = |host: &str, port, tls| {
            Ok(BrokerUrl {
                host: host.into(),
                port,
                tls,
            })
        };
        assert_eq!(
            parse_mqtt_url("mqtt://127.0.0.1:1884"),
            url("127.0.0.1", 1884, false)
        );
        assert_eq!(parse_mqtt_url("tcp://broker"), url("broker", 1883, false));
        assert_eq!(parse_mqtt_url("mqtt://[::1]:1885"), url("::1", 1885, false));
        assert_eq!(parse_mqtt_url("mqtts://x:1"), url("x", 1, true));
        assert_eq!(parse_mqtt_url("ssl://x"), url("x", 8883, true));
        assert!(parse_mqtt_url("http://x:1").is_err());
        assert!(parse_mqtt_url("mqtt://x:port").is_err());
        assert!(parse_mqtt_url("mqtt://:1").is_err());
    }
}
