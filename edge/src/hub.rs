//! EdgeHub: the node's link to the cloud. Downstream sync messages are applied through
//! MetaManager in batches (one commit, one fsync per batch) and acknowledged only once durable;
//! the outbox goes upward; the link reconnects by itself with jittered backoff (transport).

use std::sync::Arc;

use replication::sync::wire::{self, Parts};
use replication::sync::EdgeError;
use tokio_util::sync::CancellationToken;
use transport::bus::{BusRequest, BusResponse};
use transport::{IncomingRequest, Link, LinkEvent, Message, Route};

use crate::edgestream::EdgeStream;
use crate::meta::MetaManager;
use crate::servicebus::ServiceBus;

/// Messages applied per commit at most (bounds the latency of the first ack in a large sync).
const MAX_BATCH: usize = 512;

/// Runs until `shutdown` or until the link closes.
pub async fn run(
    mut link: Link,
    meta: Arc<MetaManager>,
    bus: Arc<ServiceBus>,
    stream: Arc<EdgeStream>,
    shutdown: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            event = link.next_event() => match event {
                Some(event) => Some(event),
                None => return,
            },
            _ = meta.outbox_ready() => None,
            _ = shutdown.cancelled() => return,
        };
        let mut events: Vec<LinkEvent> = first.into_iter().collect();
        while events.len() < MAX_BATCH {
            match link.try_next_event() {
                Some(event) => events.push(event),
                None => break,
            }
        }
        let mut last_seq = None;
        let mut requests = Vec::new();
        {
            let mut replica = meta.replica();
            for event in events {
                match event {
                    LinkEvent::Connected { .. } => {
                        meta.set_online(true);
                        // A new sync session (hello with our watermark), or the same session
                        // going on over a resumed link: the cloud decides the same way.
                        let new_session = event.starts_new_session().unwrap_or(true);
                        if let Err(e) = replica.on_connected(new_session) {
                            tracing::error!(error = %e, "cannot commit before the hello");
                        }
                        if new_session {
                            tokio::spawn(reassert_collections(meta.clone()));
                        }
                    }
                    LinkEvent::Disconnected { .. } => {
                        meta.set_online(false);
                        replica.on_disconnected();
                    }
                    LinkEvent::Message(delivery) => {
                        match wire::decode_down(Parts::of(&delivery.message)) {
                            Ok(down) => {
                                match replica.receive(down) {
                                    Ok(()) => {}
                                    // The cloud replaying its window from before our restart:
                                    // expected, and superseded by the session our hello starts.
                                    Err(EdgeError::NoSession) => {
                                        tracing::debug!("object message from a previous session")
                                    }
                                }
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "undecodable message from the cloud")
                            }
                        }
                        last_seq = Some(delivery.seq);
                    }
                    LinkEvent::Request(request) => requests.push(request),
                    // Heartbeats go upward only; the cloud sends none.
                    LinkEvent::Heartbeat { .. } => {}
                }
            }
            match replica.flush() {
                Ok(()) => {
                    if let Some(seq) = last_seq {
                        link.ack(seq);
                    }
                }
                Err(e) => {
                    // Nothing is acked: the cloud resends after the next hello.
                    tracing::error!(error = %e, "cannot commit synced objects; will resync");
                }
            }
        }
        for request in requests {
            tokio::spawn(answer(request, bus.clone(), stream.clone()));
        }
        send_upward(&link, &meta).await;
    }
}

/// Sends what the sync state machine has for the cloud (hello, acks, digests, reports).
async fn send_upward(link: &Link, meta: &MetaManager) {
    loop {
        let up = meta.replica().poll_transmit();
        let Some(up) = up else { return };
        // Queued in the link's window, kept across reconnects until the cloud acks it; waits
        // only while the window is full.
        if link
            .handle()
            .send_encoded(wire::encode_up(&up))
            .await
            .is_err()
        {
            return; // the link is closed: edgecore is stopping
        }
    }
}

/// Answers a request from the cloud: ServiceBus calls are performed against the local
/// application; anything else is answered with an error message.
async fn answer(request: IncomingRequest, bus: Arc<ServiceBus>, stream: Arc<EdgeStream>) {
    if request.message.route().group == transport::usage::GROUP {
        stream.serve_usage(request).await;
        return;
    }
    if request.message.route().group == transport::stream::GROUP {
        match transport::stream::PodStreamRequest::from_message(&request.message) {
            Ok(call) => stream.serve(request, call).await,
            Err(e) => {
                let head = transport::stream::StreamHead::error(400, &e.to_string());
                let mut writer = request.into_stream();
                let _ = writer.send(&head.to_message()).await;
                let _ = writer.finish();
            }
        }
        return;
    }
    let header = request.message.to_message().header;
    let response = if request.message.route().group == transport::bus::GROUP {
        let response = match BusRequest::from_message(&request.message) {
            Ok(call) => bus.serve(call).await,
            Err(e) => BusResponse::error(400, e.to_string()),
        };
        response.to_message(&header)
    } else {
        Message::response_to(
            &header,
            Route::new("edgehub", "error", "response", ""),
            "this node serves no such requests",
        )
    };
    if let Err(e) = request.respond(&response).await {
        tracing::debug!(error = %e, "the cloud went away before the response");
    }
}

/// Tells the cloud again which collections this node subscribed to (MetaServer's lists), at
/// the start of a new sync session: a cloud that lost its records (a restored backup, a wiped
/// ObjectSync) routes them again. Each costs one small list call; failures are logged and left
/// to the next session.
async fn reassert_collections(meta: Arc<MetaManager>) {
    for collection in meta.collections().all() {
        let outcome = match crate::collections::Collections::reassert_call(&collection).await {
            Ok(call) => meta.call_cloud(call).await.map(|reply| reply.code),
            Err(e) => Err(e),
        };
        match outcome {
            Ok(200) => {}
            Ok(code) => tracing::warn!(?collection, code, "the cloud refused a subscription"),
            Err(e) => tracing::debug!(?collection, error = %e.message, "subscription not re-sent"),
        }
    }
}
