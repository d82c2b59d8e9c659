//! Devices end to end: real cloudcore and edgecore, kubectl for Devices, Debian's
//! `mosquitto_pub`/`mosquitto_sub` playing the mapper, against edgecore's embedded broker and
//! against a real mosquitto broker.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::*;

const DEVICE: &str = r#"
apiVersion: devices.kubeedge.io/v1beta1
kind: DeviceModel
metadata: {name: thermometer}
spec:
  properties:
  - {name: temperature, type: FLOAT, accessMode: ReadOnly}
  - {name: setpoint, type: FLOAT, accessMode: ReadWrite}
---
apiVersion: devices.kubeedge.io/v1beta1
kind: Device
metadata: {name: thermo-1}
spec:
  nodeName: edge-1
  deviceModelRef: {name: thermometer}
  properties:
  - name: setpoint
    desired: {value: "20"}
"#;

/// A `mosquitto_sub` writing `topic payload` lines to a file, stopped on drop.
struct Subscriber {
    child: Child,
    out: PathBuf,
}

impl Subscriber {
    /// Subscribes to `filters` and waits until a probe message comes through (so that nothing
    /// published afterwards is missed).
    fn start(port: u16, filters: &[&str], dir: &Path) -> Subscriber {
        let out = dir.join(format!("sub-{port}.txt"));
        let file = std::fs::File::create(&out).expect("create");
        let mut command = Command::new("mosquitto_sub");
        command
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-v",
                "-W",
                "300",
            ])
            .args(["-t", "kedge-test/probe"]);
        for filter in filters {
            command.args(["-t", filter]);
        }
        let child = command
            .stdout(file)
            .stderr(Stdio::inherit())
            .spawn()
            .expect("mosquitto_sub (apt-get install mosquitto-clients)");
        let subscriber = Subscriber { child, out };
        eventually(
            "mosquitto_sub is subscribed",
            Duration::from_secs(20),
            || {
                publish(port, "kedge-test/probe", "probe");
                subscriber.text().contains("kedge-test/probe probe")
            },
        );
        subscriber
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// The payloads received on `topic`, parsed.
    fn messages(&self, topic: &str) -> Vec<serde_json::Value> {
        let prefix = format!("{topic} ");
        self.text()
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .filter_map(|p| serde_json::from_str(p).ok())
            .collect()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn publish(port: u16, topic: &str, payload: &str) {
    let status = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
        .args(["-t", topic, "-m", payload])
        .status()
        .expect("mosquitto_pub (apt-get install mosquitto-clients)");
    assert!(status.success(), "mosquitto_pub to {port} failed");
}

/// The mapper reports `property` = `value` of thermo-1 (event id `event`).
fn report(port: u16, property: &str, value: &str, event: &str) {
    publish(
        port,
        "$hw/events/device/thermo-1/twin/update",
        &twin_update(property, value, event),
    );
}

fn twin_update(property: &str, value: &str, event: &str) -> String {
    format!(
        r#"{{"event_id":"{event}","timestamp":0,"twin":{{"{property}":{{"actual":{{"value":"{value}"}},"metadata":{{"type":"Updated"}}}}}}}}"#
    )
}

/// The value the cloud's DeviceStatus of thermo-1 reports for `property`.
fn reported(cloud: &CloudProcess, property: &str) -> String {
    twin_field(cloud, property, "reported")
}

/// The desired value of `property` the node observed, in the DeviceStatus (KubeEdge's
/// `status.twins[].observedDesired`).
fn observed_desired(cloud: &CloudProcess, property: &str) -> String {
    twin_field(cloud, property, "observedDesired")
}

fn twin_field(cloud: &CloudProcess, property: &str, field: &str) -> String {
    let path =
        format!("jsonpath={{.status.twins[?(@.propertyName==\"{property}\")].{field}.value}}");
    let out = cloud.kubectl(&["get", "devicestatus", "thermo-1", "-o", &path]);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Creates the Device and its model in the cloud and waits until edge-1 holds the Device.
fn bind_device(cloud: &CloudProcess, edge: &EdgeProcess) {
    let out = cloud.kubectl_stdin(&["apply", "-f", "-"], DEVICE);
    assert!(out.status.success(), "{}", stderr_of(&out));
    eventually("the device on edge-1", Duration::from_secs(30), || {
        let out = edge.kubectl(&["get", "devices", "-o", "name"]);
        String::from_utf8_lossy(&out.stdout).contains("thermo-1")
    });
}

/// Sets the desired setpoint in the cloud and waits for the delta a mapper acts on.
fn desired_value_arrives_as_delta(cloud: &CloudProcess, sub: &Subscriber, value: &str) {
    let patch = format!(
        r#"[{{"op":"replace","path":"/spec/properties/0/desired/value","value":"{value}"}}]"#
    );
    cloud.ok(&["patch", "device", "thermo-1", "--type=json", "-p", &patch]);
    eventually("the delta on MQTT", Duration::from_secs(30), || {
        sub.messages("$hw/events/device/thermo-1/twin/update/delta")
            .iter()
            .any(|m| m["delta"]["setpoint"] == value)
    });
}

#[test]
fn a_mapper_on_the_embedded_broker_reports_twins_and_gets_desired_values() {
    let dir = tempfile::tempdir().unwrap();
    let cloud_dir = tempfile::tempdir().unwrap();
    let edge_dir = tempfile::tempdir().unwrap();
    let mut cloud = CloudProcess::start(cloud_dir.path());
    let token = token(&cloud);
    let mqtt = free_port();
    let mqtt_flags = ["--mqtt-listen".to_owned(), format!("127.0.0.1:{mqtt}")];
    let metaserver = free_port();
    let mut first_edge = EdgeProcess::start_with(
        &cloud,
        "edge-1",
        edge_dir.path(),
        metaserver,
        Some(&token),
        &mqtt_flags,
    );
    let sub = Subscriber::start(
        mqtt,
        &[
            "$hw/events/device/+/twin/update/+",
            "$hw/events/device/+/twin/get/result",
            "$hw/events/device/+/state/update/result",
            "$hw/events/node/edge-1/membership/#",
        ],
        dir.path(),
    );
    bind_device(&cloud, &first_edge);

    // The device reports; the value lands in the Device's status in the cloud.
    report(mqtt, "temperature", "21.5", "e1");
    eventually(
        "the reported temperature in the cloud",
        Duration::from_secs(30),
        || reported(&cloud, "temperature") == "21.5",
    );
    eventually(
        "the result and document of e1",
        Duration::from_secs(20),
        || {
            let result = sub
                .messages("$hw/events/device/thermo-1/twin/update/result")
                .into_iter()
                .any(|m| {
                    m["event_id"] == "e1"
                        && m["twin"]["temperature"]["actual"]["value"] == "21.5"
                        && m["twin"]["temperature"]["actual_version"]["edge"] == 1
                });
            let document = sub
                .messages("$hw/events/device/thermo-1/twin/update/document")
                .into_iter()
                .any(|m| {
                    m["event_id"] == "e1"
                        && m["twin"]["temperature"]["last"].is_null()
                        && m["twin"]["temperature"]["current"]["actual"]["value"] == "21.5"
                });
            result && document
        },
    );

    // A desired value set in the cloud reaches the mapper as a delta; get shows both sides.
    desired_value_arrives_as_delta(&cloud, &sub, "25");
    publish(
        mqtt,
        "$hw/events/device/thermo-1/twin/get",
        r#"{"event_id":"g1"}"#,
    );
    eventually("the twin/get result", Duration::from_secs(20), || {
        sub.messages("$hw/events/device/thermo-1/twin/get/result")
            .iter()
            .any(|m| {
                m["event_id"] == "g1"
                    && m["twin"]["setpoint"]["expected"]["value"] == "25"
                    && m["twin"]["temperature"]["actual"]["value"] == "21.5"
                    && m["twin"]["temperature"]["metadata"]["type"] == "float"
            })
    });

    // The node reports the desired value it observed at once (field report 11), before the
    // mapper has acted on it.
    eventually(
        "the observed desired setpoint in the cloud",
        Duration::from_secs(30),
        || observed_desired(&cloud, "setpoint") == "25",
    );

    // The mapper applies it and reports back: both sides in the status.
    report(mqtt, "setpoint", "25", "e2");
    eventually(
        "the setpoint reported in the cloud",
        Duration::from_secs(30),
        || reported(&cloud, "setpoint") == "25",
    );
    assert_eq!(observed_desired(&cloud, "setpoint"), "25");
    assert_eq!(reported(&cloud, "temperature"), "21.5");
    // Reports land in the DeviceStatus only: the Device (its spec the cloud's) is not rewritten.
    assert_eq!(device_status_twin(&cloud, "temperature"), "");
    // The expected side's version counts the cloud's desired values: "20" at binding, then "25".
    eventually(
        "the result of e2 with versions",
        Duration::from_secs(20),
        || {
            sub.messages("$hw/events/device/thermo-1/twin/update/result")
                .iter()
                .any(|m| {
                    m["event_id"] == "e2"
                        && m["twin"]["setpoint"]["expected_version"]["cloud"] == 2
                        && m["twin"]["setpoint"]["actual_version"]["edge"] == 1
                })
        },
    );

    // State and membership.
    publish(
        mqtt,
        "$hw/events/device/thermo-1/state/update",
        r#"{"event_id":"s1","state":"online"}"#,
    );
    eventually(
        "the device online in the cloud",
        Duration::from_secs(30),
        || {
            let out = cloud.kubectl(&[
                "get",
                "devicestatus",
                "thermo-1",
                "-o",
                "jsonpath={.status.state}",
            ]);
            String::from_utf8_lossy(&out.stdout) == "online"
        },
    );
    publish(
        mqtt,
        "$hw/events/node/edge-1/membership/get",
        r#"{"event_id":"m1"}"#,
    );
    eventually("the membership/get result", Duration::from_secs(20), || {
        sub.messages("$hw/events/node/edge-1/membership/get/result")
            .iter()
            .any(|m| {
                m["event_id"] == "m1"
                    && m["devices"][0]["id"] == "thermo-1"
                    && m["devices"][0]["state"] == "online"
            })
    });
    assert!(
        sub.messages("$hw/events/node/edge-1/membership/updated")
            .iter()
            .any(|m| m["added_devices"][0]["id"] == "thermo-1"),
        "membership/updated when the device was bound: {}",
        sub.text()
    );

    // Bad input: an error on the matching result topic, and nothing else is affected.
    publish(mqtt, "$hw/events/device/thermo-1/twin/update", "not json");
    publish(
        mqtt,
        "$hw/events/device/ghost/twin/update",
        &twin_update("temperature", "1", "e3"),
    );
    report(mqtt, "pressure", "1", "e4");
    report(mqtt, "temperature", &"9".repeat(70 << 10), "e5");
    publish(
        mqtt,
        "$hw/events/device/thermo-1/state/update",
        r#"{"event_id":"s2","state":"dancing"}"#,
    );
    report(mqtt, "temperature", "22", "e6");
    eventually(
        "errors for the bad messages",
        Duration::from_secs(20),
        || {
            let results = sub.messages("$hw/events/device/thermo-1/twin/update/result");
            let code = |id: &str| {
                results
                    .iter()
                    .find(|m| m["event_id"] == id)
                    .map(|m| m["code"].clone())
            };
            results.iter().any(|m| {
                m["code"] == 400
                    && m["reason"]
                        .as_str()
                        .is_some_and(|r| r.contains("malformed"))
            }) && code("e4") == Some(404.into())
                && code("e5") == Some(413.into())
                && sub
                    .messages("$hw/events/device/ghost/twin/update/result")
                    .iter()
                    .any(|m| m["event_id"] == "e3" && m["code"] == 404)
                && sub
                    .messages("$hw/events/device/thermo-1/state/update/result")
                    .iter()
                    .any(|m| m["event_id"] == "s2" && m["code"] == 400)
        },
    );
    eventually(
        "the good update after the bad ones",
        Duration::from_secs(30),
        || reported(&cloud, "temperature") == "22",
    );

    // Offline: updates made while the cloud is down arrive after it returns, the latest of
    // each property.
    cloud.kill9();
    for (i, value) in ["30", "31", "32"].iter().enumerate() {
        report(mqtt, "temperature", value, &format!("o{i}"));
    }
    report(mqtt, "setpoint", "26", "o9");
    eventually(
        "offline updates answered by the edge",
        Duration::from_secs(20),
        || {
            sub.messages("$hw/events/device/thermo-1/twin/update/result")
                .iter()
                .any(|m| m["event_id"] == "o9" && m["twin"]["setpoint"]["actual"]["value"] == "26")
        },
    );
    cloud.restart_after_kill9(&[]);
    eventually(
        "offline updates in the cloud",
        Duration::from_secs(60),
        || reported(&cloud, "temperature") == "32" && reported(&cloud, "setpoint") == "26",
    );

    // Device data on an upload topic becomes an Event about the node in the cloud.
    publish(mqtt, "$hw/events/upload/thermo-1", "door opened");
    eventually(
        "the upload as an Event in the cloud",
        Duration::from_secs(30),
        || {
            let out = cloud.kubectl(&["get", "events", "-o",
            "jsonpath={range .items[*]}{.reason}/{.involvedObject.name}: {.message}{\"\\n\"}{end}"]);
            String::from_utf8_lossy(&out.stdout).contains("DeviceDataUpload/edge-1: door opened")
        },
    );

    // The twin records survive edgecore being killed: the twin is the same after a restart.
    first_edge.kill9();
    drop(sub); // its broker went with edgecore
    let edge = EdgeProcess::start_with(
        &cloud,
        "edge-1",
        edge_dir.path(),
        metaserver,
        None,
        &mqtt_flags,
    );
    let sub = Subscriber::start(
        mqtt,
        &[
            "$hw/events/device/+/twin/+/+",
            "$hw/events/node/edge-1/membership/#",
        ],
        dir.path(),
    );
    let out = edge.kubectl(&["get", "device", "thermo-1", "-o", "name"]);
    assert!(
        out.status.success(),
        "MetaServer serves the device after the restart"
    );
    publish(
        mqtt,
        "$hw/events/device/thermo-1/twin/get",
        r#"{"event_id":"g2"}"#,
    );
    eventually(
        "the twin after the restart",
        Duration::from_secs(20),
        || {
            sub.messages("$hw/events/device/thermo-1/twin/get/result")
                .iter()
                .any(|m| {
                    m["event_id"] == "g2"
                        && m["twin"]["temperature"]["actual"]["value"] == "32"
                        && m["twin"]["setpoint"]["actual"]["value"] == "26"
                })
        },
    );

    // Unbinding the device tells the mapper.
    cloud.ok(&["delete", "device", "thermo-1"]);
    eventually(
        "membership/updated with the device removed",
        Duration::from_secs(30),
        || {
            sub.messages("$hw/events/node/edge-1/membership/updated")
                .iter()
                .any(|m| m["removed_devices"][0]["id"] == "thermo-1")
        },
    );
}

/// A mosquitto broker on a port of its own, loopback only.
struct Mosquitto {
    child: Child,
}

impl Mosquitto {
    fn start(port: u16, dir: &Path) -> Mosquitto {
        let config = dir.join("mosquitto.conf");
        let mut file = std::fs::File::create(&config).expect("config");
        writeln!(file, "listener {port} 127.0.0.1\nallow_anonymous true").expect("write");
        // Debian installs the broker in /usr/sbin, which a user's PATH may lack.
        let program = if Path::new("/usr/sbin/mosquitto").exists() {
            "/usr/sbin/mosquitto"
        } else {
            "mosquitto"
        };
        let child = Command::new(program)
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto (apt-get install mosquitto)");
        eventually("mosquitto listens", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Mosquitto { child }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_mapper_on_an_external_mosquitto_broker_works_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let cloud_dir = tempfile::tempdir().unwrap();
    let edge_dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _broker = Mosquitto::start(port, dir.path());
    // Clients of Device.status (before KubeEdge v1.23) get the reports there too.
    let cloud = CloudProcess::start_with(
        cloud_dir.path(),
        free_port(),
        free_port(),
        free_port(),
        &["--device-status-in-device"],
    );
    let token = token(&cloud);
    let edge = EdgeProcess::start_with(
        &cloud,
        "edge-1",
        edge_dir.path(),
        free_port(),
        Some(&token),
        &["--mqtt-url".into(), format!("mqtt://127.0.0.1:{port}")],
    );
    let sub = Subscriber::start(port, &["$hw/events/device/+/twin/update/+"], dir.path());
    bind_device(&cloud, &edge);
    // edgecore's client may still be subscribing: retry until the update is answered.
    eventually(
        "a twin update answered through mosquitto",
        Duration::from_secs(30),
        || {
            publish(
                port,
                "$hw/events/device/thermo-1/twin/update",
                &twin_update("temperature", "18", "x1"),
            );
            std::thread::sleep(Duration::from_millis(300));
            sub.messages("$hw/events/device/thermo-1/twin/update/result")
                .iter()
                .any(|m| m["event_id"] == "x1")
        },
    );
    eventually(
        "the reported temperature in the cloud",
        Duration::from_secs(30),
        || reported(&cloud, "temperature") == "18",
    );
    eventually(
        "the report copied into the Device's status",
        Duration::from_secs(30),
        || device_status_twin(&cloud, "temperature") == "18",
    );
    desired_value_arrives_as_delta(&cloud, &sub, "23");
}

/// `property`'s reported value in the Device's own status (only with
/// `--device-status-in-device`).
fn device_status_twin(cloud: &CloudProcess, property: &str) -> String {
    let path =
        format!("jsonpath={{.status.twins[?(@.propertyName==\"{property}\")].reported.value}}");
    let out = cloud.kubectl(&["get", "device", "thermo-1", "-o", &path]);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
