//! ServiceBus on the node: the cloud sends an HTTP request for an application by name; the node
//! performs it against the local address configured for that name
//! (`--service-bus-app NAME=ADDR`), with a timeout and a size limit on the response, and
//! sends the response back. An unknown name is a 404, an unreachable application a 502, a slow
//! one a 504: the cloud's caller sees which.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use hyper::Request;
use hyper_util::rt::TokioIo;
use transport::bus::{is_end_to_end, BusRequest, BusResponse};

/// The largest response body carried back to the cloud.
pub const MAX_RESPONSE_BYTES: usize = 4 << 20;

#[derive(Debug, Clone)]
pub struct ServiceBus {
    apps: HashMap<String, SocketAddr>,
    timeout: Duration,
}

/// Parses `NAME=ADDR` (the `--service-bus-app` flag).
pub fn parse_app(text: &str) -> Result<(String, SocketAddr), String> {
    let (name, addr) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not NAME=HOST:PORT"))?;
    let addr = addr
        .parse()
        .map_err(|e| format!("{addr:?} is not HOST:PORT: {e}"))?;
    if name.is_empty() || name.contains('/') || name.contains('?') {
        return Err(format!("{name:?} is not an application name"));
    }
    Ok((name.to_owned(), addr))
}

impl ServiceBus {
    pub fn new(apps: impl IntoIterator<Item = (String, SocketAddr)>, timeout: Duration) -> Self {
        ServiceBus {
            apps: apps.into_iter().collect(),
            timeout,
        }
    }

    /// Performs the request against the named application.
    pub async fn serve(&self, request: BusRequest) -> BusResponse {
        let Some(&addr) = self.apps.get(&request.app) else {
            return BusResponse::error(
                404,
                format!("no application {:?} on this node", request.app),
            );
        };
        match tokio::time::timeout(self.timeout, forward(addr, request)).await {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => BusResponse::error(502, format!("the application at {addr}: {e}")),
            Err(_) => BusResponse::error(
                504,
                format!(
                    "the application at {addr} did not answer within {:?}",
                    self.timeout
                ),
            ),
        }
    }
}

async fn forward(addr: SocketAddr, request: BusRequest) -> Result<BusResponse, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let mut builder = Request::builder()
        .method(request.method.as_str())
        .uri(request.path.as_str())
        .header("host", addr.to_string());
    for (name, value) in &request.headers {
        if is_end_to_end(name) {
            builder = builder.header(name.as_str(), value.as_str());
        }
    }
    let http_request = builder
        .body(Body::from(request.body))
        .map_err(|e| format!("bad request: {e}"))?;
    let response = sender
        .send_request(http_request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .filter(|(name, _)| is_end_to_end(name.as_str()))
        .filter_map(|(name, value)| Some((name.to_string(), value.to_str().ok()?.to_owned())))
        .collect();
    let body = axum::body::to_bytes(Body::new(response.into_body()), MAX_RESPONSE_BYTES)
        .await
        .map_err(|_| format!("the response is larger than {MAX_RESPONSE_BYTES} bytes"))?;
    Ok(BusResponse {
        status,
        headers,
        body,
    })
}
