//! DMI, KubeEdge's device management interface (v1beta1) for mapper-framework mappers: gRPC
//! on unix sockets, generated with tonic from kedge's copy of KubeEdge's interface
//! (`edge/proto/dmi/v1beta1/api.proto`).
//!
//! - edgecore serves `DeviceManagerService` on `--dmi-socket` ([`server`]): `MapperRegister`,
//!   `ReportDeviceStatus`, `ReportDeviceStates`;
//! - edgecore calls each registered mapper's `DeviceMapperService` ([`mappers`]) when the
//!   node's Devices and DeviceModels of the mapper's protocol change, with the calls
//!   [`plan`] decides from what the mapper was told;
//! - Devices and DeviceModels become DMI messages in [`convert`].
//!
//! Reports land where MQTT's do: DeviceTwin's records, and the Device's DeviceStatus in the
//! cloud.

pub mod convert;
pub mod mappers;
pub mod plan;
pub mod server;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use replication::watcher::{Event, ResumableWatcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::meta::MetaManager;

/// The messages and services of `v1beta1/api.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod api {
    tonic::include_proto!("v1beta1");
}

/// KubeEdge's default socket for DMI.
pub const DEFAULT_SOCKET: &str = "/etc/kubeedge/dmi.sock";

/// `edgecore --dmi-socket` and its limits.
#[derive(Debug, Clone)]
pub struct DmiConfig {
    pub socket: PathBuf,
    pub limits: mappers::MapperLimits,
}

/// Serves DMI on `config.socket` and starts the registered mappers' workers. Reports arrive
/// on the returned queue, for DeviceTwin.
///
/// # Errors
/// The socket cannot be made (its directory missing and not creatable, the path taken by
/// something that is not a socket).
pub async fn start(
    meta: Arc<MetaManager>,
    config: DmiConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<mpsc::Receiver<server::Pending>> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let socket = &config.socket;
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot make {} for the DMI socket", dir.display()))?;
    }
    match std::fs::symlink_metadata(socket) {
        // A socket left by an edgecore that stopped: ours to replace.
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(socket)
            .with_context(|| format!("cannot replace {}", socket.display()))?,
        Ok(_) => anyhow::bail!(
            "--dmi-socket {}: the path exists and is not a socket",
            socket.display()
        ),
        Err(_) => {}
    }
    let listener = tokio::net::UnixListener::bind(socket)
        .with_context(|| format!("cannot listen on the DMI socket {}", socket.display()))?;
    // Mappers run beside edgecore as the same user or root; nobody else may report.
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("cannot set the mode of {}", socket.display()))?;
    let mappers = mappers::Mappers::load(meta.clone(), config.limits.clone(), shutdown.clone());
    let (reports_tx, reports_rx) = mpsc::channel(4096);
    let manager = server::Manager {
        mappers: mappers.clone(),
        reports: reports_tx,
    };
    tokio::spawn(follow_devices(meta, mappers, shutdown.clone()));
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let path = socket.clone();
    tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_service(
                api::device_manager_service_server::DeviceManagerServiceServer::new(manager),
            )
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "DMI server stopped");
        }
        let _ = std::fs::remove_file(&path);
    });
    tracing::info!(socket = %socket.display(), "DMI: serving DeviceManagerService");
    Ok(reports_rx)
}

/// Wakes the mappers' workers when the node's Devices or DeviceModels change.
async fn follow_devices(
    meta: Arc<MetaManager>,
    mappers: Arc<mappers::Mappers>,
    shutdown: CancellationToken,
) {
    let mut watcher = ResumableWatcher::all(meta.store().clone());
    loop {
        let event = tokio::select! {
            event = watcher.next() => event,
            _ = shutdown.cancelled() => return,
        };
        match event {
            Ok(Event::Change(change))
                if matches!(change.key.kind(), "devices" | "devicemodels") =>
            {
                mappers.changed()
            }
            Ok(Event::Change(_)) => {}
            Ok(Event::Restart { .. }) => mappers.changed(),
            Err(e) => {
                tracing::warn!(error = %e, "DMI: the cache's watch closed; mappers are told of changes no more");
                return;
            }
        }
    }
}
