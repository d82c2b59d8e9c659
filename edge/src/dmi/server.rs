//! edgecore's DeviceManagerService: mappers register here and report their devices' twins and
//! states. Reports go to DeviceTwin (which owns the twin records and commits them with the
//! DeviceStatus reports they cause); each is answered once it is durable on the node, or
//! refused with a gRPC status whose message says why.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};

use super::api;
use super::api::device_manager_service_server::DeviceManagerService;
use super::mappers::{MapperRecord, Mappers};
use crate::devicetwin::{DmiCode, DmiRefusal, DmiReport, DmiReportBody};

/// A report on its way to DeviceTwin, with where its result goes.
pub type Pending = (DmiReport, oneshot::Sender<Result<(), DmiRefusal>>);

/// How long a report may wait for DeviceTwin (a node whose disk stalls answers UNAVAILABLE).
const REPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// The service, over the node's mappers and DeviceTwin's report queue.
pub struct Manager {
    pub(crate) mappers: Arc<Mappers>,
    pub(crate) reports: mpsc::Sender<Pending>,
}

fn status_of(refusal: DmiRefusal) -> Status {
    match refusal.code {
        DmiCode::InvalidArgument => Status::invalid_argument(refusal.reason),
        DmiCode::NotFound => Status::not_found(refusal.reason),
        DmiCode::Unavailable => Status::unavailable(refusal.reason),
    }
}

impl Manager {
    async fn report(&self, report: DmiReport) -> Result<(), Status> {
        if report.name.is_empty() {
            return Err(Status::invalid_argument("deviceName is required"));
        }
        let protocol = self
            .mappers
            .protocol_of(&report.namespace, &report.name)
            .unwrap_or_default();
        if !self.mappers.admit_report(&protocol) {
            return Err(Status::resource_exhausted(format!(
                "too many reports from the mapper of protocol {protocol:?}; slow down"
            )));
        }
        let (tx, rx) = oneshot::channel();
        self.reports
            .send((report, tx))
            .await
            .map_err(|_| Status::unavailable("DeviceTwin is stopping"))?;
        match tokio::time::timeout(REPORT_TIMEOUT, rx).await {
            Ok(Ok(result)) => result.map_err(status_of),
            Ok(Err(_)) => Err(Status::unavailable("DeviceTwin is stopping")),
            Err(_) => Err(Status::unavailable(format!(
                "the report was not stored within {REPORT_TIMEOUT:?}"
            ))),
        }
    }
}

#[tonic::async_trait]
impl DeviceManagerService for Manager {
    async fn mapper_register(
        &self,
        request: Request<api::MapperRegisterRequest>,
    ) -> Result<Response<api::MapperRegisterResponse>, Status> {
        let request = request.into_inner();
        let mapper = request
            .mapper
            .ok_or_else(|| Status::invalid_argument("mapper is required"))?;
        let address = String::from_utf8(mapper.address)
            .map_err(|_| Status::invalid_argument("mapper.address is not UTF-8"))?;
        for (field, value) in [
            ("mapper.name", &mapper.name),
            ("mapper.protocol", &mapper.protocol),
            ("mapper.address", &address),
        ] {
            if value.trim().is_empty() {
                return Err(Status::invalid_argument(format!("{field} is required")));
            }
        }
        let record = MapperRecord {
            name: mapper.name,
            version: mapper.version,
            api_version: mapper.api_version,
            protocol: mapper.protocol,
            address,
        };
        tracing::info!(mapper = %record.name, protocol = %record.protocol, address = %record.address, with_data = request.with_data, "DMI: mapper registered");
        let desired = self
            .mappers
            .register(record, request.with_data)
            .map_err(Status::unavailable)?;
        Ok(Response::new(api::MapperRegisterResponse {
            model_list: desired.models.into_values().collect(),
            device_list: desired.devices.into_values().collect(),
        }))
    }

    async fn report_device_status(
        &self,
        request: Request<api::ReportDeviceStatusRequest>,
    ) -> Result<Response<api::ReportDeviceStatusResponse>, Status> {
        let request = request.into_inner();
        let status = request
            .reported_device
            .ok_or_else(|| Status::invalid_argument("reportedDevice is required"))?;
        let mut twins = Vec::with_capacity(status.twins.len());
        for twin in status.twins {
            if twin.property_name.is_empty() {
                return Err(Status::invalid_argument("a twin without a propertyName"));
            }
            // Only the reported side is the mapper's to say; the desired side is the cloud's.
            if let Some(reported) = twin.reported {
                let metadata: BTreeMap<String, String> = reported.metadata.into_iter().collect();
                twins.push((twin.property_name, reported.value, metadata));
            }
        }
        self.report(DmiReport {
            namespace: request.device_namespace,
            name: request.device_name,
            body: DmiReportBody::Twins(twins),
        })
        .await?;
        Ok(Response::new(api::ReportDeviceStatusResponse {}))
    }

    async fn report_device_states(
        &self,
        request: Request<api::ReportDeviceStatesRequest>,
    ) -> Result<Response<api::ReportDeviceStatesResponse>, Status> {
        let request = request.into_inner();
        self.report(DmiReport {
            namespace: request.device_namespace,
            name: request.device_name,
            body: DmiReportBody::State(request.state.to_ascii_lowercase()),
        })
        .await?;
        Ok(Response::new(api::ReportDeviceStatesResponse {}))
    }
}
