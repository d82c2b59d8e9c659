//! KubeEdge's message as its Go code handles it: JSON with the content decoded into a generic
//! value (`interface{}` in Go, `serde_json::Value` here). The baseline for kedge's framing.

use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
pub struct KubeEdgeMessage {
    pub header: KubeEdgeHeader,
    pub route: KubeEdgeRoute,
    pub content: serde_json::Value,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct KubeEdgeHeader {
    pub msg_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub parent_msg_id: String,
    pub timestamp: i64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub resourceversion: String,
    #[serde(default)]
    pub sync: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct KubeEdgeRoute {
    pub source: String,
    pub group: String,
    pub operation: String,
    pub resource: String,
}

impl KubeEdgeMessage {
    /// The same message as KubeEdge would hold it in memory.
    pub fn from_message(m: &transport::Message) -> Self {
        KubeEdgeMessage {
            header: KubeEdgeHeader {
                msg_id: m.header.id.clone(),
                parent_msg_id: m.header.parent_id.clone(),
                timestamp: m.header.timestamp,
                resourceversion: m.header.resource_version.clone(),
                sync: m.header.sync,
            },
            route: KubeEdgeRoute {
                source: m.route.source.clone(),
                group: m.route.group.clone(),
                operation: m.route.operation.clone(),
                resource: m.route.resource.clone(),
            },
            content: serde_json::from_slice(&m.content).unwrap_or(serde_json::Value::Null),
        }
    }
}
