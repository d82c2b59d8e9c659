//! The embedded MQTT broker with a password file and topic ACLs, against real cloudcore and
//! edgecore processes, with Debian's `mosquitto_pub`/`mosquitto_sub` as the mappers (a client
//! nobody here wrote): no or wrong credentials are refused, a mapper reaches only its own
//! device's topics, edgecore's own client keeps answering, an oversized packet closes only
//! its own connection.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use support::*;

const DEVICES: &str = r#"
apiVersion: devices.kubeedge.io/v1beta1
kind: DeviceModel
metadata: {name: thermometer}
spec:
  properties:
  - {name: temperature, type: FLOAT, accessMode: ReadOnly}
---
apiVersion: devices.kubeedge.io/v1beta1
kind: Device
metadata: {name: thermo-1}
spec:
  nodeName: edge-1
  deviceModelRef: {name: thermometer}
---
apiVersion: devices.kubeedge.io/v1beta1
kind: Device
metadata: {name: thermo-2}
spec:
  nodeName: edge-1
  deviceModelRef: {name: thermometer}
"#;

/// `-u USER -P PASSWORD`, or nothing.
fn login(user: Option<(&str, &str)>) -> Vec<String> {
    match user {
        Some((user, password)) => vec!["-u".into(), user.into(), "-P".into(), password.into()],
        None => Vec::new(),
    }
}

/// One `mosquitto_pub` at QoS 1 (it waits for the PUBACK: the broker has routed the message
/// when it returns).
fn publish(port: u16, user: Option<(&str, &str)>, topic: &str, payload: &str) -> Output {
    Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
        .args(login(user))
        .args(["-t", topic, "-m", payload])
        .output()
        .expect("mosquitto_pub (apt-get install mosquitto-clients)")
}

fn twin_update(value: &str, event: &str) -> String {
    format!(
        r#"{{"event_id":"{event}","timestamp":0,"twin":{{"temperature":{{"actual":{{"value":"{value}"}},"metadata":{{"type":"Updated"}}}}}}}}"#
    )
}

/// A `mosquitto_sub` writing `topic payload` lines to a file, stopped on drop.
struct Subscriber {
    child: Child,
    out: PathBuf,
}

impl Subscriber {
    /// Subscribes as `user` to `filter` and waits until its own device's probe topic
    /// delivers (so that nothing published afterwards is missed).
    fn start(port: u16, user: (&str, &str), filter: &str, dir: &Path) -> Subscriber {
        let out = dir.join(format!("sub-{}.txt", user.0));
        let probe = format!("$hw/events/device/{}/probe", user.0);
        let child = Command::new("mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-v",
                "-W",
                "300",
            ])
            .args(login(Some(user)))
            .args(["-t", &probe, "-t", filter])
            .stdout(std::fs::File::create(&out).expect("create"))
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto_sub (apt-get install mosquitto-clients)");
        let subscriber = Subscriber { child, out };
        eventually(
            "mosquitto_sub is subscribed",
            Duration::from_secs(20),
            || {
                publish(port, Some(user), &probe, "probe");
                subscriber.text().contains("probe")
            },
        );
        subscriber
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

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

fn passwd(file: &Path, user: &str, password: &str) {
    let mut child = Command::new(binary("edgecore"))
        .arg("mqtt-passwd")
        .arg(file)
        .arg(user)
        .stdin(Stdio::piped())
        .spawn()
        .expect("edgecore mqtt-passwd");
    use std::io::Write;
    writeln!(child.stdin.take().expect("stdin"), "{password}").expect("write");
    assert!(child.wait().expect("wait").success(), "mqtt-passwd {user}");
}

fn reported(cloud: &CloudProcess, device: &str) -> String {
    let out = cloud.kubectl(&[
        "get",
        "devicestatus",
        device,
        "-o",
        "jsonpath={.status.twins[?(@.propertyName==\"temperature\")].reported.value}",
    ]);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn mappers_need_credentials_and_reach_only_their_own_devices() {
    let dir = tempfile::tempdir().unwrap();
    let cloud_dir = tempfile::tempdir().unwrap();
    let edge_dir = tempfile::tempdir().unwrap();
    let passwords = dir.path().join("passwd");
    passwd(&passwords, "thermo-1", "pw-one");
    passwd(&passwords, "thermo-2", "pw-two");
    let acl = dir.path().join("acl");
    std::fs::write(
        &acl,
        "# each mapper is named after its device\n* readwrite $hw/events/device/%u/#\n",
    )
    .unwrap();

    let cloud = CloudProcess::start(cloud_dir.path());
    let token = token(&cloud);
    let mqtt = free_port();
    let edge = EdgeProcess::start_with(
        &cloud,
        "edge-1",
        edge_dir.path(),
        free_port(),
        Some(&token),
        &[
            "--mqtt-listen".into(),
            format!("127.0.0.1:{mqtt}"),
            "--mqtt-password-file".into(),
            passwords.display().to_string(),
            "--mqtt-acl-file".into(),
            acl.display().to_string(),
        ],
    );
    let out = cloud.kubectl_stdin(&["apply", "-f", "-"], DEVICES);
    assert!(out.status.success(), "{}", stderr_of(&out));
    eventually("the devices on edge-1", Duration::from_secs(30), || {
        let out = edge.kubectl(&["get", "devices", "-o", "name"]);
        let names = String::from_utf8_lossy(&out.stdout).into_owned();
        names.contains("thermo-1") && names.contains("thermo-2")
    });

    // No credentials, a wrong password, an unknown user: refused (CONNACK return code 4).
    let one = ("thermo-1", "pw-one");
    let two = ("thermo-2", "pw-two");
    let topic_one = "$hw/events/device/thermo-1/twin/update";
    for user in [
        None,
        Some(("thermo-1", "pw-two")),
        Some(("nobody", "pw-one")),
    ] {
        let out = publish(mqtt, user, topic_one, &twin_update("1", "refused"));
        assert!(!out.status.success(), "{user:?} was let in");
        let said = format!("{}{}", stderr_of(&out), stdout(&out));
        assert!(
            said.to_lowercase().contains("bad user name or password"),
            "{user:?}: {said}"
        );
    }

    // With its credentials, a mapper reports its own device, and edgecore's own client
    // (which subscribes to every device's topics) answers it.
    let sub_one = Subscriber::start(
        mqtt,
        one,
        "$hw/events/device/thermo-1/twin/+/result",
        dir.path(),
    );
    let sub_two = Subscriber::start(
        mqtt,
        two,
        "$hw/events/device/thermo-2/twin/+/result",
        dir.path(),
    );
    let out = publish(mqtt, Some(one), topic_one, &twin_update("21", "e1"));
    assert!(out.status.success(), "{}", stderr_of(&out));
    eventually(
        "thermo-1's report in the cloud",
        Duration::from_secs(30),
        || reported(&cloud, "thermo-1") == "21",
    );
    assert!(sub_one
        .messages("$hw/events/device/thermo-1/twin/update/result")
        .iter()
        .any(|m| m["event_id"] == "e1"));

    // thermo-1's mapper writes to thermo-2's topic: acknowledged (MQTT 3.1.1 has no negative
    // PUBACK) but dropped. thermo-2's own get, published after it, is answered without it:
    // edgecore takes the messages of its subscription in order.
    let out = publish(
        mqtt,
        Some(one),
        "$hw/events/device/thermo-2/twin/update",
        &twin_update("99", "forged"),
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
    let out = publish(
        mqtt,
        Some(two),
        "$hw/events/device/thermo-2/twin/get",
        r#"{"event_id":"g2"}"#,
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
    eventually("thermo-2's get answered", Duration::from_secs(20), || {
        !sub_two
            .messages("$hw/events/device/thermo-2/twin/get/result")
            .is_empty()
    });
    let got = sub_two.messages("$hw/events/device/thermo-2/twin/get/result");
    assert!(
        got.iter()
            .all(|m| m["twin"]["temperature"]["actual"]["value"] != "99"),
        "the forged update reached the twin: {got:?}"
    );
    assert!(
        !sub_two.text().contains("forged"),
        "the forged update was answered: {}",
        sub_two.text()
    );
    // thermo-2's own report works, and the cloud never saw 99.
    let out = publish(
        mqtt,
        Some(two),
        "$hw/events/device/thermo-2/twin/update",
        &twin_update("5", "e2"),
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
    eventually(
        "thermo-2's report in the cloud",
        Duration::from_secs(30),
        || reported(&cloud, "thermo-2") == "5",
    );

    // thermo-1's mapper subscribes to thermo-2's topics: SUBACK 0x80, which mosquitto_sub
    // reports (and -E makes it exit after the SUBACK).
    for filter in [
        "$hw/events/device/thermo-2/twin/update/result",
        "$hw/events/device/+/twin/update/result",
        "#",
    ] {
        let out = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &mqtt.to_string(), "-E", "-W", "20"])
            .args(login(Some(one)))
            .args(["-t", filter])
            .output()
            .expect("mosquitto_sub");
        let said = format!("{}{}", stderr_of(&out), stdout(&out));
        assert!(said.contains("denied"), "subscribing to {filter}: {said}");
    }
    // Its own filters are granted.
    let out = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &mqtt.to_string(), "-E", "-W", "20"])
        .args(login(Some(one)))
        .args(["-t", "$hw/events/device/thermo-1/#"])
        .output()
        .expect("mosquitto_sub");
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(!stderr_of(&out).contains("denied"), "{}", stderr_of(&out));

    // A packet over the broker's limit (1 MiB) ends that connection only; the broker and
    // edgecore keep serving.
    let big = dir.path().join("big");
    std::fs::write(&big, vec![b'x'; 2 << 20]).unwrap();
    // (`timeout`: mosquitto_pub may retry on a lost connection rather than exit.)
    let out = Command::new("timeout")
        .args([
            "20",
            "mosquitto_pub",
            "-h",
            "127.0.0.1",
            "-p",
            &mqtt.to_string(),
            "-q",
            "1",
        ])
        .args(login(Some(one)))
        .args(["-t", topic_one, "-f"])
        .arg(&big)
        .output()
        .expect("mosquitto_pub");
    assert!(!out.status.success(), "a 2 MiB packet was taken");
    let out = publish(mqtt, Some(one), topic_one, &twin_update("23", "e3"));
    assert!(out.status.success(), "{}", stderr_of(&out));
    eventually(
        "thermo-1's report after the big packet",
        Duration::from_secs(30),
        || reported(&cloud, "thermo-1") == "23",
    );
    drop(edge);
}

/// A test CA, a server certificate for 127.0.0.1 and client certificates (`client`,
/// `thermo-1`, `thermo-2`: their common names).
fn certificates(dir: &Path) {
    test_certificates(
        dir,
        &[
            (
                "server",
                "/CN=server",
                "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
            ),
            ("client", "/CN=client", "extendedKeyUsage=clientAuth\n"),
            ("thermo-1", "/CN=thermo-1", "extendedKeyUsage=clientAuth\n"),
            ("thermo-2", "/CN=thermo-2", "extendedKeyUsage=clientAuth\n"),
        ],
    );
}

/// mosquitto with a TLS listener that requires a client certificate and a password.
struct TlsMosquitto {
    child: Child,
}

impl TlsMosquitto {
    fn start(port: u16, dir: &Path) -> TlsMosquitto {
        let passwd = dir.join("mosquitto.passwd");
        for (user, password) in [("edgecore", "edge-secret"), ("mapper", "mapper-secret")] {
            let mut command = Command::new("mosquitto_passwd");
            if !passwd.exists() {
                command.arg("-c");
            }
            let out = command
                .arg("-b")
                .arg(&passwd)
                .args([user, password])
                .output()
                .expect("mosquitto_passwd (apt-get install mosquitto)");
            assert!(out.status.success(), "{}", stderr_of(&out));
        }
        let d = dir.display();
        let config = dir.join("mosquitto-tls.conf");
        std::fs::write(
            &config,
            format!(
                "user root\nlistener {port} 127.0.0.1\ncafile {d}/ca.crt\ncertfile {d}/server.crt\n\
                 keyfile {d}/server.key\nrequire_certificate true\npassword_file {d}/mosquitto.passwd\n\
                 allow_anonymous false\n"
            ),
        )
        .unwrap();
        let program = if Path::new("/usr/sbin/mosquitto").exists() {
            "/usr/sbin/mosquitto"
        } else {
            "mosquitto"
        };
        let child = Command::new(program)
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("mosquitto (apt-get install mosquitto)");
        eventually("mosquitto listens", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        TlsMosquitto { child }
    }
}

impl Drop for TlsMosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn edgecore_uses_an_external_broker_over_tls_with_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let cloud_dir = tempfile::tempdir().unwrap();
    let edge_dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let port = free_port();
    let _broker = TlsMosquitto::start(port, dir.path());
    let password = dir.path().join("edge-password");
    std::fs::write(&password, "edge-secret\n").unwrap();
    let d = dir.path().display();
    let cloud = CloudProcess::start(cloud_dir.path());
    let token = token(&cloud);
    let edge = EdgeProcess::start_with(
        &cloud,
        "edge-1",
        edge_dir.path(),
        free_port(),
        Some(&token),
        &[
            "--mqtt-url".into(),
            format!("mqtts://127.0.0.1:{port}"),
            "--mqtt-ca".into(),
            format!("{d}/ca.crt"),
            "--mqtt-client-cert".into(),
            format!("{d}/client.crt"),
            "--mqtt-client-key".into(),
            format!("{d}/client.key"),
            "--mqtt-username".into(),
            "edgecore".into(),
            "--mqtt-client-password-file".into(),
            password.display().to_string(),
        ],
    );
    let out = cloud.kubectl_stdin(&["apply", "-f", "-"], DEVICES);
    assert!(out.status.success(), "{}", stderr_of(&out));
    eventually("the devices on edge-1", Duration::from_secs(30), || {
        let out = edge.kubectl(&["get", "devices", "-o", "name"]);
        String::from_utf8_lossy(&out.stdout).contains("thermo-1")
    });
    // The mapper, over TLS with its own certificate and password. edgecore may still be
    // subscribing: retry until the report lands.
    let mapper_tls = |command: &mut Command| {
        command
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["--cafile", &format!("{d}/ca.crt")])
            .args(["--cert", &format!("{d}/client.crt")])
            .args(["--key", &format!("{d}/client.key")])
            .args(["-u", "mapper", "-P", "mapper-secret"]);
    };
    let mut attempts = 0;
    eventually(
        "a report through mosquitto over TLS",
        Duration::from_secs(60),
        || {
            attempts += 1;
            let mut command = Command::new("mosquitto_pub");
            mapper_tls(&mut command);
            let out = command
                .args(["-q", "1", "-t", "$hw/events/device/thermo-1/twin/update"])
                .args(["-m", &twin_update(&attempts.to_string(), "t1")])
                .output()
                .expect("mosquitto_pub");
            assert!(
                out.status.success(),
                "the mapper's TLS publish: {}",
                stderr_of(&out)
            );
            std::thread::sleep(Duration::from_millis(500));
            reported(&cloud, "thermo-1") == attempts.to_string()
        },
    );
}

#[test]
fn the_embedded_broker_over_tls_names_mappers_by_their_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let cloud_dir = tempfile::tempdir().unwrap();
    let edge_dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let d = dir.path().display().to_string();
    let acl = dir.path().join("acl");
    std::fs::write(&acl, "* readwrite $hw/events/device/%u/#\n").unwrap();
    let cloud = CloudProcess::start(cloud_dir.path());
    let token = token(&cloud);
    let mqtt = free_port();
    let edge = EdgeProcess::start_with(
        &cloud,
        "edge-1",
        edge_dir.path(),
        free_port(),
        Some(&token),
        &[
            "--mqtt-listen".into(),
            format!("127.0.0.1:{mqtt}"),
            "--mqtt-tls-cert".into(),
            format!("{d}/server.crt"),
            "--mqtt-tls-key".into(),
            format!("{d}/server.key"),
            "--mqtt-tls-client-ca".into(),
            format!("{d}/ca.crt"),
            "--mqtt-acl-file".into(),
            acl.display().to_string(),
        ],
    );
    let out = cloud.kubectl_stdin(&["apply", "-f", "-"], DEVICES);
    assert!(out.status.success(), "{}", stderr_of(&out));
    eventually("the devices on edge-1", Duration::from_secs(30), || {
        let out = edge.kubectl(&["get", "devices", "-o", "name"]);
        String::from_utf8_lossy(&out.stdout).contains("thermo-1")
    });
    // `mosquitto_pub` over TLS, with `cert`'s certificate and key if any (`timeout`: a client
    // whose connection fails may retry rather than exit).
    let tls_pub = |cert: Option<&str>, topic: &str, payload: &str| {
        let mut command = Command::new("timeout");
        command
            .args([
                "20",
                "mosquitto_pub",
                "-h",
                "127.0.0.1",
                "-p",
                &mqtt.to_string(),
            ])
            .args(["--cafile", &format!("{d}/ca.crt"), "-q", "1"]);
        if let Some(name) = cert {
            command
                .args(["--cert", &format!("{d}/{name}.crt")])
                .args(["--key", &format!("{d}/{name}.key")]);
        }
        command
            .args(["-t", topic, "-m", payload])
            .output()
            .expect("mosquitto_pub")
    };
    let topic_one = "$hw/events/device/thermo-1/twin/update";

    // Plain MQTT on the TLS port: no session.
    let out = Command::new("timeout")
        .args([
            "20",
            "mosquitto_pub",
            "-h",
            "127.0.0.1",
            "-p",
            &mqtt.to_string(),
        ])
        .args(["-t", topic_one, "-m", "plain"])
        .output()
        .expect("mosquitto_pub");
    assert!(
        !out.status.success(),
        "plain MQTT was accepted on the TLS listener"
    );
    // TLS without a client certificate: CONNACK 5, not authorized.
    let out = tls_pub(None, topic_one, &twin_update("1", "nocert"));
    assert!(!out.status.success(), "no client certificate, yet accepted");
    let said = format!("{}{}", stderr_of(&out), stdout(&out)).to_lowercase();
    assert!(said.contains("not authori"), "{said}");

    // thermo-1's certificate: its reports reach the cloud, through edgecore's own client,
    // which talks TLS to its broker too. (It may still be subscribing: retry.)
    let mut attempt = 0;
    eventually(
        "thermo-1's report over TLS",
        Duration::from_secs(60),
        || {
            attempt += 1;
            let out = tls_pub(
                Some("thermo-1"),
                topic_one,
                &twin_update(&attempt.to_string(), "t"),
            );
            assert!(
                out.status.success(),
                "thermo-1 over TLS: {}",
                stderr_of(&out)
            );
            std::thread::sleep(Duration::from_millis(300));
            reported(&cloud, "thermo-1") == attempt.to_string()
        },
    );
    // ... and it may not subscribe to thermo-2's topics.
    let out = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &mqtt.to_string(), "-E", "-W", "20"])
        .args(["--cafile", &format!("{d}/ca.crt")])
        .args(["--cert", &format!("{d}/thermo-1.crt")])
        .args(["--key", &format!("{d}/thermo-1.key")])
        .args(["-t", "$hw/events/device/thermo-2/twin/update/result"])
        .output()
        .expect("mosquitto_sub");
    let said = format!("{}{}", stderr_of(&out), stdout(&out));
    assert!(
        said.contains("denied"),
        "thermo-1 subscribing to thermo-2: {said}"
    );
}
