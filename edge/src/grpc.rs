//! gRPC over unix sockets (CRI to the container runtime, DMI to mappers): tonic channels whose
//! connector dials a socket path. The URI tonic is given is a placeholder; the path is what
//! is dialled.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

type Dialed = Pin<Box<dyn Future<Output = std::io::Result<TokioIo<UnixStream>>> + Send>>;

fn dial(path: PathBuf) -> impl FnMut(Uri) -> Dialed + Clone + Send + 'static {
    let path = Arc::new(path);
    move |_: Uri| {
        let path = path.clone();
        Box::pin(async move { Ok(TokioIo::new(UnixStream::connect(&*path).await?)) })
    }
}

fn endpoint(connect_timeout: Duration) -> Endpoint {
    Endpoint::from_static("http://[::]:50051").connect_timeout(connect_timeout)
}

/// A channel to the gRPC server on `path`, connected now.
///
/// # Errors
/// The socket missing or refusing within `connect_timeout`.
pub async fn unix_channel(
    path: PathBuf,
    connect_timeout: Duration,
) -> Result<Channel, tonic::transport::Error> {
    endpoint(connect_timeout)
        .connect_with_connector(tower::service_fn(dial(path)))
        .await
}

/// A channel to the gRPC server on `path` that dials on first use, and again after failures.
pub fn unix_channel_lazy(path: PathBuf, connect_timeout: Duration) -> Channel {
    endpoint(connect_timeout).connect_with_connector_lazy(tower::service_fn(dial(path)))
}
