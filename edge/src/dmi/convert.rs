//! Devices and DeviceModels (`devices.kubeedge.io/v1beta1`, as JSON in the node's cache) into
//! DMI's messages, field by field as KubeEdge's edgecore fills them (`dtcommon.ConvertDevice`):
//! the JSON names are the proto's, `deviceModelRef.name` becomes `deviceModelReference`,
//! `hostName`/`requestPath` of an HTTP push become `hostname`/`requestpath`, and free-form
//! `configData` values become google.protobuf wrapper types packed in `Any` (strings as
//! `StringValue`, numbers as `FloatValue` or `Int64Value` for integers, booleans as `BoolValue`).

use std::collections::BTreeMap;

use prost::Name;
use prost_types::Any;
use replication::api::object::{self, Object};
use serde_json::Value;

use super::api;

fn text(value: Option<&Value>) -> String {
    match value {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Bool(b)) => b.to_string(),
        _ => String::new(),
    }
}

fn int(value: Option<&Value>) -> i64 {
    match value {
        Some(Value::Number(n)) => n.as_i64().unwrap_or_default(),
        Some(Value::String(s)) => s.parse().unwrap_or_default(),
        _ => 0,
    }
}

fn strings(value: Option<&Value>) -> Vec<String> {
    value
        .and_then(Value::as_array)
        .map(|items| items.iter().map(|v| text(Some(v))).collect())
        .unwrap_or_default()
}

fn pack<M: Name>(message: &M) -> Option<Any> {
    Any::from_msg(message).ok()
}

/// A free-form value as KubeEdge packs it; objects and arrays (which KubeEdge refuses) go as
/// their JSON text in a `StringValue`.
fn any_of(value: &Value) -> Option<Any> {
    match value {
        Value::String(s) => pack(&s.clone()),
        Value::Bool(b) => pack(b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => pack(&i),
            None => pack(&(n.as_f64().unwrap_or_default() as f32)),
        },
        Value::Null => None,
        other => pack(&other.to_string()),
    }
}

fn customized(value: Option<&Value>) -> Option<api::CustomizedValue> {
    let data = value?.get("data")?.as_object()?;
    Some(api::CustomizedValue {
        data: data
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), any_of(v)?)))
            .collect::<BTreeMap<_, _>>(),
    })
}

fn twin_property(value: Option<&Value>) -> Option<api::TwinProperty> {
    let value = value?;
    Some(api::TwinProperty {
        value: text(value.get("value")),
        metadata: value
            .get("metadata")
            .and_then(Value::as_object)
            .map(|m| m.iter().map(|(k, v)| (k.clone(), text(Some(v)))).collect())
            .unwrap_or_default(),
    })
}

fn push_method(value: Option<&Value>) -> Option<api::PushMethod> {
    let value = value?;
    let http = value.get("http").map(|h| api::PushMethodHttp {
        hostname: text(h.get("hostName").or(h.get("hostname"))),
        port: int(h.get("port")),
        requestpath: text(h.get("requestPath").or(h.get("requestpath"))),
        timeout: int(h.get("timeout")),
    });
    let mqtt = value.get("mqtt").map(|m| api::PushMethodMqtt {
        address: text(m.get("address")),
        topic: text(m.get("topic")),
        qos: int(m.get("qos")) as i32,
        retained: m.get("retained").and_then(Value::as_bool).unwrap_or(false),
    });
    let otel = value.get("otel").map(|o| api::PushMethodOtel {
        endpoint_url: text(o.get("endpointURL")),
    });
    let anomaly_detection = value
        .get("anomalyDetection")
        .and_then(|a| {
            customized(Some(
                &serde_json::json!({ "data": a.get("data").or(Some(a)) }),
            ))
        })
        .map(|c| api::AnomalyDetection { data: c.data });
    let db_method = value.get("dbMethod").map(db_method);
    Some(api::PushMethod {
        http,
        mqtt,
        db_method,
        otel,
        anomaly_detection,
    })
}

/// A property's database push (`pushMethod.dbMethod`), with KubeEdge's JSON names (note
/// `TDEngine` and `TDEngineClientConfig`, capitalised there).
fn db_method(db: &Value) -> api::DbMethod {
    let influx = db.get("influxdb2").map(|i| api::DbMethodInfluxdb2 {
        influxdb2_client_config: i.get("influxdb2ClientConfig").map(|c| {
            api::Influxdb2ClientConfig {
                url: text(c.get("url")),
                org: text(c.get("org")),
                bucket: text(c.get("bucket")),
            }
        }),
        influxdb2_data_config: i
            .get("influxdb2DataConfig")
            .map(|c| api::Influxdb2DataConfig {
                measurement: text(c.get("measurement")),
                tag: c
                    .get("tag")
                    .and_then(Value::as_object)
                    .map(|t| t.iter().map(|(k, v)| (k.clone(), text(Some(v)))).collect())
                    .unwrap_or_default(),
                field_key: text(c.get("fieldKey")),
            }),
    });
    let redis = db.get("redis").map(|r| api::DbMethodRedis {
        redis_client_config: r.get("redisClientConfig").map(|c| api::RedisClientConfig {
            addr: text(c.get("addr")),
            db: int(c.get("db")) as i32,
            poolsize: int(c.get("poolsize")) as i32,
            min_idle_conns: int(c.get("minIdleConns")) as i32,
        }),
    });
    let tdengine = db
        .get("TDEngine")
        .or(db.get("tdengine"))
        .map(|t| api::DbMethodTdEngine {
            td_engine_client_config: t
                .get("TDEngineClientConfig")
                .or(t.get("tdEngineClientConfig"))
                .map(|c| api::TdEngineClientConfig {
                    addr: text(c.get("addr")),
                    dbname: text(c.get("dbName").or(c.get("dbname"))),
                }),
        });
    let mysql = db.get("mysql").map(|m| api::DbMethodMySql {
        mysql_client_config: m.get("mysqlClientConfig").map(|c| api::MySqlClientConfig {
            addr: text(c.get("addr")),
            database: text(c.get("database")),
            user_name: text(c.get("userName")),
        }),
    });
    api::DbMethod {
        influxdb2: influx,
        redis,
        tdengine,
        mysql,
    }
}

fn device_property(p: &Value) -> api::DeviceProperty {
    api::DeviceProperty {
        name: text(p.get("name")),
        desired: twin_property(p.get("desired")),
        visitors: p.get("visitors").map(|v| api::VisitorConfig {
            protocol_name: text(v.get("protocolName")),
            config_data: customized(v.get("configData")),
        }),
        report_cycle: int(p.get("reportCycle")),
        collect_cycle: int(p.get("collectCycle")),
        report_to_cloud: p
            .get("reportToCloud")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        push_method: push_method(p.get("pushMethod")),
    }
}

/// A Device as DMI's `Device`.
pub fn device(device: &Object) -> api::Device {
    let spec = device.get("spec");
    let field = |name: &str| spec.and_then(|s| s.get(name));
    let state_report = field("stateReport");
    api::Device {
        name: object::name(device).to_owned(),
        namespace: object::namespace(device).to_owned(),
        spec: Some(api::DeviceSpec {
            device_model_reference: text(field("deviceModelRef").and_then(|r| r.get("name"))),
            protocol: field("protocol").map(|p| api::ProtocolConfig {
                protocol_name: text(p.get("protocolName")),
                config_data: customized(p.get("configData")),
            }),
            properties: field("properties")
                .and_then(Value::as_array)
                .map(|ps| ps.iter().map(device_property).collect())
                .unwrap_or_default(),
            methods: field("methods")
                .and_then(Value::as_array)
                .map(|ms| {
                    ms.iter()
                        .map(|m| api::DeviceMethod {
                            name: text(m.get("name")),
                            description: text(m.get("description")),
                            property_names: strings(m.get("propertyNames")),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }),
        // Where a device's state is reported and how often (KubeEdge moved these from the
        // status to `spec.stateReport` with the DeviceStatus split).
        status: state_report.map(|r| api::DeviceStatus {
            twins: Vec::new(),
            report_to_cloud: r
                .get("reportToCloud")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            report_cycle: int(r.get("reportCycle")),
        }),
    }
}

/// A DeviceModel as DMI's `DeviceModel`.
pub fn device_model(model: &Object) -> api::DeviceModel {
    let spec = model.get("spec");
    api::DeviceModel {
        name: object::name(model).to_owned(),
        namespace: object::namespace(model).to_owned(),
        spec: Some(api::DeviceModelSpec {
            properties: spec
                .and_then(|s| s.get("properties"))
                .and_then(Value::as_array)
                .map(|ps| {
                    ps.iter()
                        .map(|p| api::ModelProperty {
                            name: text(p.get("name")),
                            description: text(p.get("description")),
                            r#type: text(p.get("type")),
                            access_mode: text(p.get("accessMode")),
                            minimum: text(p.get("minimum")),
                            maximum: text(p.get("maximum")),
                            unit: text(p.get("unit")),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            commands: Vec::new(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn a_device_becomes_dmis_device_as_kubeedge_fills_it() {
        let device = json!({
            "metadata": {"name": "thermo-1", "namespace": "plant"},
            "spec": {
                "deviceModelRef": {"name": "thermo"},
                "nodeName": "edge-1",
                "protocol": {"protocolName": "modbus", "configData": {"data": {"port": 502, "host": "10.0.0.5", "ratio": 0.5, "tcp": true}}},
                "properties": [{
                    "name": "temperature",
                    "desired": {"value": "21", "metadata": {"timestamp": "1700000000000"}},
                    "visitors": {"protocolName": "modbus", "configData": {"data": {"register": "HoldingRegister", "offset": 2}}},
                    "reportCycle": 1000, "collectCycle": 500, "reportToCloud": true,
                    "pushMethod": {"http": {"hostName": "collector", "port": 8080, "requestPath": "/t", "timeout": 3},
                                   "dbMethod": {"redis": {"redisClientConfig": {"addr": "127.0.0.1:6379", "db": 2}}}}
                }],
                "stateReport": {"reportCycle": 5000, "reportToCloud": true}
            }
        });
        let converted = super::device(device.as_object().unwrap());
        assert_eq!(converted.name, "thermo-1");
        assert_eq!(converted.namespace, "plant");
        let spec = converted.spec.unwrap();
        assert_eq!(spec.device_model_reference, "thermo");
        let protocol = spec.protocol.unwrap();
        assert_eq!(protocol.protocol_name, "modbus");
        let data = protocol.config_data.unwrap().data;
        assert_eq!(data["host"].to_msg::<String>().unwrap(), "10.0.0.5");
        assert_eq!(data["port"].to_msg::<i64>().unwrap(), 502);
        assert_eq!(data["ratio"].to_msg::<f32>().unwrap(), 0.5);
        assert!(data["tcp"].to_msg::<bool>().unwrap());
        let property = &spec.properties[0];
        assert_eq!(property.desired.as_ref().unwrap().value, "21");
        assert_eq!(
            (
                property.report_cycle,
                property.collect_cycle,
                property.report_to_cloud
            ),
            (1000, 500, true)
        );
        let http = property
            .push_method
            .as_ref()
            .unwrap()
            .http
            .as_ref()
            .unwrap();
        assert_eq!(
            (http.hostname.as_str(), http.port, http.requestpath.as_str()),
            ("collector", 8080, "/t")
        );
        let redis = property
            .push_method
            .as_ref()
            .unwrap()
            .db_method
            .as_ref()
            .unwrap();
        let redis = redis
            .redis
            .as_ref()
            .unwrap()
            .redis_client_config
            .as_ref()
            .unwrap();
        assert_eq!((redis.addr.as_str(), redis.db), ("127.0.0.1:6379", 2));
        assert_eq!(converted.status.unwrap().report_cycle, 5000);

        // Converted again, the same bytes (the digest of what a mapper was told relies on it).
        let again = super::device(device.as_object().unwrap());
        let first = super::device(device.as_object().unwrap());
        assert_eq!(
            super::super::plan::digest(&again),
            super::super::plan::digest(&first)
        );

        let model = json!({"metadata": {"name": "thermo", "namespace": "plant"},
            "spec": {"properties": [{"name": "temperature", "type": "INT", "accessMode": "ReadWrite", "minimum": "0", "maximum": "100", "unit": "C"}]}});
        let model = super::device_model(model.as_object().unwrap());
        let p = &model.spec.unwrap().properties[0];
        assert_eq!(
            (p.r#type.as_str(), p.maximum.as_str(), p.unit.as_str()),
            ("INT", "100", "C")
        );
    }
}
