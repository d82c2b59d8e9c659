//! DMI end to end: real cloudcore and edgecore, kubectl, and a mapper written in Python with
//! grpcio from kedge's `edge/proto` (generated in the test), playing an unmodified
//! mapper-framework mapper (`edge/tests/clients/dmi_mapper.py`).

mod support;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use support::*;

const DEVICES: &str = r#"
apiVersion: devices.kubeedge.io/v1beta1
kind: DeviceModel
metadata: {name: thermometer}
spec:
  properties:
  - {name: temperature, type: INT, accessMode: ReadOnly, minimum: "0", maximum: "100"}
  - {name: humidity, type: FLOAT, accessMode: ReadOnly}
  - {name: setpoint, type: INT, accessMode: ReadWrite}
---
apiVersion: devices.kubeedge.io/v1beta1
kind: Device
metadata: {name: thermo-1}
spec:
  nodeName: edge-1
  deviceModelRef: {name: thermometer}
  protocol:
    protocolName: modbus-sim
    configData: {data: {host: "10.0.0.5", port: 502, tcp: true}}
  properties:
  - {name: temperature, reportToCloud: true, reportCycle: 3000, collectCycle: 1000}
  - {name: setpoint, reportToCloud: true, desired: {value: "20"}}
  - {name: humidity}
"#;

/// A device of `protocol` on edge-1 using the thermometer model.
fn device(name: &str, protocol: &str) -> String {
    format!(
        "apiVersion: devices.kubeedge.io/v1beta1\nkind: Device\nmetadata: {{name: {name}}}\n\
         spec:\n  nodeName: edge-1\n  deviceModelRef: {{name: thermometer}}\n  \
         protocol: {{protocolName: {protocol}}}\n  properties:\n  - {{name: temperature}}\n"
    )
}

/// The Python mapper, driven over its stdin/stdout.
struct Mapper {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    log: PathBuf,
}

impl Mapper {
    fn start(dmi: &Path, dir: &Path, name: &str, protocol: &str, hang: bool) -> Mapper {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/dmi_mapper.py");
        let own = dir.join(format!("{name}.sock"));
        let log = dir.join(format!("{name}.log"));
        let mut command = Command::new("python3");
        command
            .arg(script)
            .arg(dmi)
            .arg(&own)
            .arg(name)
            .arg(protocol)
            .arg(&log);
        if hang {
            command.arg("--hang");
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 (scripts/setup.sh installs grpcio and grpcio-tools)");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut mapper = Mapper {
            child,
            stdin,
            stdout,
            log,
        };
        let ready = mapper.read();
        assert_eq!(ready["ready"], true, "{ready}");
        mapper
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("the mapper's answer");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))
    }

    fn call(&mut self, command: Value) -> Value {
        writeln!(self.stdin, "{command}").expect("to the mapper");
        self.read()
    }

    fn register(&mut self) -> Value {
        let answer = self.call(json!({"op": "register", "with_data": true}));
        assert_eq!(answer["ok"], true, "{answer}");
        answer["reply"].clone()
    }

    fn report(&mut self, device: &str, twins: Value) -> Value {
        self.call(json!({"op": "status", "device": device, "twins": twins}))
    }

    /// The calls edgecore made to this mapper so far.
    fn calls(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn called(&self, method: &str, device: &str) -> bool {
        self.calls()
            .iter()
            .any(|c| c["method"] == method && c["device"] == device)
    }
}

impl Drop for Mapper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn refused(answer: &Value, code: &str, reason: &str) {
    assert_eq!(answer["ok"], false, "{answer}");
    assert_eq!(answer["code"], code, "{answer}");
    assert!(
        answer["details"]
            .as_str()
            .unwrap_or_default()
            .contains(reason),
        "{answer} should say {reason:?}"
    );
}

fn twin(cloud: &CloudProcess, device: &str, property: &str) -> String {
    let path =
        format!("jsonpath={{.status.twins[?(@.propertyName==\"{property}\")].reported.value}}");
    let out = cloud.kubectl(&["get", "devicestatus", device, "-o", &path]);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// edgecore with DMI on `dmi`, MQTT on `mqtt` beside it, and the DMI flags in `extra`.
fn start_edge(
    cloud: &CloudProcess,
    dir: &Path,
    port: u16,
    dmi: &Path,
    mqtt: u16,
    extra: &[&str],
) -> EdgeProcess {
    let mut flags = vec![
        "--mqtt-listen".to_owned(),
        format!("127.0.0.1:{mqtt}"),
        "--dmi-socket".to_owned(),
        dmi.display().to_string(),
        "--dmi-call-timeout".to_owned(),
        "1s".to_owned(),
    ];
    flags.extend(extra.iter().map(|f| f.to_string()));
    EdgeProcess::start_with(cloud, "edge-1", dir, port, Some(&token(cloud)), &flags)
}

#[test]
fn a_mapper_registers_reports_and_follows_the_nodes_devices() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = CloudProcess::start(&dir.path().join("cloud"));
    let dmi = dir.path().join("run/dmi.sock");
    let port = free_port();
    let mqtt = free_port();
    let mut edge = start_edge(&cloud, &dir.path().join("edge"), port, &dmi, mqtt, &[]);
    let out = cloud.kubectl_stdin(&["apply", "-f", "-"], DEVICES);
    assert!(out.status.success(), "{}", stderr_of(&out));
    eventually("thermo-1 on edge-1", Duration::from_secs(30), || {
        let out = edge.kubectl(&["get", "devices", "-o", "name"]);
        String::from_utf8_lossy(&out.stdout).contains("thermo-1")
    });
    // DeviceController gives every Device its DeviceStatus, owned by it.
    eventually("thermo-1's DeviceStatus", Duration::from_secs(20), || {
        let out = cloud.kubectl(&[
            "get",
            "devicestatus",
            "thermo-1",
            "-o",
            "jsonpath={.metadata.ownerReferences[0].kind}",
        ]);
        String::from_utf8_lossy(&out.stdout) == "Device"
    });

    // Register: the mapper gets the node's devices of its protocol and their models.
    let mut mapper = Mapper::start(&dmi, dir.path(), "modbus-mapper", "modbus-sim", false);
    let registered = mapper.register();
    assert_eq!(registered["devices"], json!(["thermo-1"]), "{registered}");
    assert_eq!(registered["models"], json!(["thermometer"]), "{registered}");

    // Twins and states reach the DeviceStatus in the cloud.
    let answer = mapper.report("thermo-1", json!({"temperature": "21", "humidity": "40.5"}));
    assert_eq!(answer["ok"], true, "{answer}");
    let answer = mapper.call(json!({"op": "state", "device": "thermo-1", "state": "ok"}));
    assert_eq!(answer["ok"], true, "{answer}");
    eventually(
        "the report in the DeviceStatus",
        Duration::from_secs(30),
        || twin(&cloud, "thermo-1", "temperature") == "21",
    );
    eventually(
        "the state in the DeviceStatus",
        Duration::from_secs(30),
        || {
            let out = cloud.kubectl(&[
                "get",
                "devicestatus",
                "thermo-1",
                "-o",
                "jsonpath={.status.state}",
            ]);
            String::from_utf8_lossy(&out.stdout) == "ok"
        },
    );
    // humidity has no reportToCloud where others do: it stays on the node.
    assert_eq!(twin(&cloud, "thermo-1", "humidity"), "");

    // Bad reports get gRPC errors with reasons, and change nothing.
    refused(
        &mapper.report("thermo-1", json!({"temperature": "warm"})),
        "INVALID_ARGUMENT",
        "not an int",
    );
    refused(
        &mapper.report("thermo-1", json!({"temperature": "101"})),
        "INVALID_ARGUMENT",
        "above the maximum 100",
    );
    refused(
        &mapper.report("thermo-1", json!({"pressure": "1"})),
        "NOT_FOUND",
        "no property \"pressure\"",
    );
    refused(
        &mapper.report("ghost", json!({"temperature": "1"})),
        "NOT_FOUND",
        "not bound to node edge-1",
    );
    refused(
        &mapper.call(json!({"op": "status_raw"})),
        "INVALID_ARGUMENT",
        "reportedDevice is required",
    );
    refused(
        &mapper.call(json!({"op": "state", "device": "thermo-1", "state": "sleepy"})),
        "INVALID_ARGUMENT",
        "is not one of",
    );
    assert_eq!(twin(&cloud, "thermo-1", "temperature"), "21");

    // reportCycle (3 s on temperature): a burst of reports reaches the cloud as few updates,
    // the last value included.
    let mut watch = Command::new("kubectl")
        .args(["--server", &cloud.api, "get", "devicestatus", "thermo-1"])
        .args(["-w", "-o", "name"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kubectl");
    let watch_out = watch.stdout.take().expect("stdout");
    let events = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = events.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(watch_out).lines().map_while(Result::ok) {
            if line.contains("thermo-1") {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    let before = events.load(std::sync::atomic::Ordering::SeqCst);
    for value in 30..40 {
        let answer = mapper.report("thermo-1", json!({"temperature": value.to_string()}));
        assert_eq!(answer["ok"], true, "{answer}");
    }
    eventually("the burst's last value", Duration::from_secs(30), || {
        twin(&cloud, "thermo-1", "temperature") == "39"
    });
    std::thread::sleep(Duration::from_millis(500));
    let updates = events.load(std::sync::atomic::Ordering::SeqCst) - before;
    let _ = watch.kill();
    let _ = watch.wait();
    eprintln!("reportCycle: 10 reports made {updates} DeviceStatus updates in the cloud");
    assert!(
        (1..=4).contains(&updates),
        "10 reports within a 3 s reportCycle made {updates} updates in the cloud"
    );

    // A desired value set in the cloud reaches the mapper as UpdateDevice.
    cloud.ok(&[
        "patch",
        "device",
        "thermo-1",
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/spec/properties/1/desired/value","value":"23"}]"#,
    ]);
    eventually(
        "UpdateDevice with the new desired value",
        Duration::from_secs(30),
        || {
            mapper
                .calls()
                .iter()
                .any(|c| c["method"] == "UpdateDevice" && c["desired"]["setpoint"] == "23")
        },
    );
    let update = mapper
        .calls()
        .into_iter()
        .find(|c| c["method"] == "UpdateDevice")
        .unwrap();
    // Protocol configuration as KubeEdge packs it: wrapper types in Any.
    assert_eq!(
        update["config_types"]["host"],
        "type.googleapis.com/google.protobuf.StringValue"
    );
    assert_eq!(
        update["config_types"]["tcp"],
        "type.googleapis.com/google.protobuf.BoolValue"
    );
    assert_eq!(update["report_cycle"]["temperature"], 3000);

    // New and deleted devices of its protocol; a mapper that hangs blocks nobody else.
    let mut stuck = Mapper::start(&dmi, dir.path(), "stuck-mapper", "stuck-sim", true);
    // Registering without data answers at once; the calls that follow hang in the mapper.
    let answer = stuck.call(json!({"op": "register", "with_data": false}));
    assert_eq!(answer["ok"], true, "{answer}");
    for (name, protocol) in [("stuck-1", "stuck-sim"), ("thermo-2", "modbus-sim")] {
        let out = cloud.kubectl_stdin(&["apply", "-f", "-"], &device(name, protocol));
        assert!(out.status.success(), "{}", stderr_of(&out));
    }
    eventually("RegisterDevice thermo-2", Duration::from_secs(30), || {
        mapper.called("RegisterDevice", "thermo-2")
    });
    cloud.ok(&["delete", "device", "thermo-2"]);
    eventually("RemoveDevice thermo-2", Duration::from_secs(30), || {
        mapper.called("RemoveDevice", "thermo-2")
    });
    eventually(
        "thermo-2's DeviceStatus goes with it",
        Duration::from_secs(30),
        || {
            let out = cloud.kubectl(&["get", "devicestatus", "-o", "name"]);
            !String::from_utf8_lossy(&out.stdout).contains("thermo-2")
        },
    );
    assert!(stuck.calls().is_empty(), "the hung mapper answered nothing");

    // The mapper restarts: it registers again and gets the current set, thermo-3 included
    // (created while it was down).
    drop(mapper);
    let out = cloud.kubectl_stdin(&["apply", "-f", "-"], &device("thermo-3", "modbus-sim"));
    assert!(out.status.success(), "{}", stderr_of(&out));
    eventually("thermo-3 on edge-1", Duration::from_secs(30), || {
        let out = edge.kubectl(&["get", "devices", "-o", "name"]);
        String::from_utf8_lossy(&out.stdout).contains("thermo-3")
    });
    let mut mapper = Mapper::start(&dmi, dir.path(), "modbus-mapper", "modbus-sim", false);
    let registered = mapper.register();
    assert_eq!(
        registered["devices"],
        json!(["thermo-1", "thermo-3"]),
        "{registered}"
    );
    // What it got in the answer is not sent again, and a change a mapper does not see (a
    // label) sends nothing (thermo-1 has several configData keys: the digest of what a mapper
    // was told must not depend on map order).
    let calls = mapper.calls().len();
    cloud.ok(&["label", "device", "thermo-1", "touched=yes"]);
    eventually("the label on edge-1", Duration::from_secs(30), || {
        let out = edge.kubectl(&["get", "device", "thermo-1", "--show-labels"]);
        String::from_utf8_lossy(&out.stdout).contains("touched=yes")
    });
    std::thread::sleep(Duration::from_millis(1000));
    let after: Vec<Value> = mapper.calls().into_iter().skip(calls).collect();
    assert!(
        after.is_empty(),
        "nothing changed for the mapper: {after:?}"
    );

    // edgecore restarts (killed): the registration survives; thermo-4, created while the
    // node was down, reaches the mapper without it registering again, and reports work.
    edge.kill9();
    let out = cloud.kubectl_stdin(&["apply", "-f", "-"], &device("thermo-4", "modbus-sim"));
    assert!(out.status.success(), "{}", stderr_of(&out));
    // (Restarted with a report limit of 5 a second, burst 5, for the check below.)
    let _edge = start_edge(
        &cloud,
        &dir.path().join("edge"),
        port,
        &dmi,
        mqtt,
        &["--dmi-rate-limit", "5"],
    );
    eventually(
        "RegisterDevice thermo-4 after the restart",
        Duration::from_secs(45),
        || mapper.called("RegisterDevice", "thermo-4"),
    );
    assert!(
        !mapper.called("RegisterDevice", "thermo-1"),
        "what the mapper was told survives the restart: {:?}",
        mapper.calls()
    );
    let answer = mapper.report("thermo-4", json!({"temperature": "7"}));
    assert_eq!(answer["ok"], true, "{answer}");
    eventually("thermo-4's report", Duration::from_secs(30), || {
        twin(&cloud, "thermo-4", "temperature") == "7"
    });

    // Past its rate limit a mapper is told to slow down; nothing it sent before is lost.
    let answers: Vec<Value> = (0..12)
        .map(|i| mapper.report("thermo-4", json!({"temperature": (10 + i).to_string()})))
        .collect();
    let limited = answers
        .iter()
        .filter(|a| a["code"] == "RESOURCE_EXHAUSTED")
        .count();
    assert!(limited >= 3, "12 reports at once, 5/s allowed: {answers:?}");
    assert!(
        answers[0]["ok"] == true || answers[1]["ok"] == true,
        "{answers:?}"
    );

    // The MQTT path works beside DMI, into the same DeviceStatus.
    let payload = r#"{"event_id":"m1","twin":{"temperature":{"actual":{"value":"42"}}}}"#;
    eventually("an MQTT report beside DMI", Duration::from_secs(30), || {
        let status = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &mqtt.to_string(), "-q", "1"])
            .args([
                "-t",
                "$hw/events/device/thermo-3/twin/update",
                "-m",
                payload,
            ])
            .status()
            .expect("mosquitto_pub (apt-get install mosquitto-clients)");
        assert!(status.success());
        std::thread::sleep(Duration::from_millis(200));
        twin(&cloud, "thermo-3", "temperature") == "42"
    });
}
