//! Helpers of edgecore's end-to-end tests: real cloudcore and edgecore processes on loopback.
#![allow(dead_code)] // each test file uses some of them

#[path = "../../../cloud/tests/common/mod.rs"]
pub mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use common::{binary, free_port, kubectl, CloudProcess};
pub use std::process::Output;

pub struct EdgeProcess {
    pub child: Child,
    pub metaserver: String,
}

pub fn edge_command(cloud: &CloudProcess, node: &str, dir: &Path, port: u16) -> Command {
    let mut command = Command::new(binary("edgecore"));
    command
        .arg("--node-name")
        .arg(node)
        .arg("--cloud")
        .arg(format!("127.0.0.1:{}", cloud.quic_port))
        .arg("--data-dir")
        .arg(dir)
        .arg("--metaserver-listen")
        .arg(format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "warn");
    command
}

/// [`edge_command`] with the embedded MQTT broker on a port of the test's own (no two
/// edgecores in parallel tests may share the default 1883).
pub fn edge_command_with_mqtt(
    cloud: &CloudProcess,
    node: &str,
    dir: &Path,
    port: u16,
    mqtt: &[String],
) -> Command {
    let mut command = edge_command(cloud, node, dir, port);
    if mqtt.is_empty() {
        command.arg("--mqtt-listen").arg("127.0.0.1:0");
    } else {
        command.args(mqtt);
    }
    command
}

impl EdgeProcess {
    /// Starts edgecore and waits until its MetaServer answers.
    pub fn start(
        cloud: &CloudProcess,
        node: &str,
        dir: &Path,
        port: u16,
        token: Option<&str>,
    ) -> Self {
        Self::start_with(cloud, node, dir, port, token, &[])
    }

    /// [`EdgeProcess::start`] with MQTT flags of the caller's (the embedded broker on a free
    /// port when empty).
    pub fn start_with(
        cloud: &CloudProcess,
        node: &str,
        dir: &Path,
        port: u16,
        token: Option<&str>,
        mqtt: &[String],
    ) -> Self {
        let mut command = edge_command_with_mqtt(cloud, node, dir, port, mqtt);
        if let Some(token) = token {
            command.arg("--token").arg(token);
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start edgecore");
        let edge = EdgeProcess {
            child,
            metaserver: format!("http://127.0.0.1:{port}"),
        };
        // A join (TLS, CSR signed) and the RocksDB open: seconds on a loaded 2-core machine.
        eventually("MetaServer answers", Duration::from_secs(30), || {
            common::http_get(&format!("127.0.0.1:{port}"), "/healthz").is_some_and(|b| b == "ok")
        });
        edge
    }

    pub fn kubectl(&self, args: &[&str]) -> Output {
        kubectl(&self.metaserver, args, None)
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for EdgeProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn eventually(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < within,
            "timed out after {within:?} waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("{what}: {:?}", start.elapsed());
}

pub fn token(cloud: &CloudProcess) -> String {
    let out = Command::new(binary("cloudcore"))
        .args(["token", "create", "--data-dir"])
        .arg(&cloud.data_dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .to_owned()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn pid_alive(pid_file: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pid_file)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // A zombie is not running.
    (!stat.split(") ").nth(1).is_some_and(|s| s.starts_with('Z'))).then_some(pid)
}

pub fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `openssl` with `args`, in `dir`; panics on failure.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        stderr_of(&out)
    );
}

/// A test CA (`dir/ca.crt`, `dir/ca.key`) and, for each `(name, subject, extensions)`,
/// `dir/NAME.crt` and `dir/NAME.key` signed by it (`subject` as `/CN=…/O=…`, `extensions` in
/// openssl's extfile syntax), made by the `openssl` command line with P-256 keys, valid 2 days.
pub fn test_certificates(dir: &Path, certs: &[(&str, &str, &str)]) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-subj",
        "/CN=kedge-test-ca",
        "-days",
        "2",
    ]);
    openssl(dir, &ca);
    for (name, subject, ext) in certs {
        let (key, csr, crt, extfile) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("{name}.ext"),
        );
        std::fs::write(dir.join(&extfile), ext).unwrap();
        let mut req = vec!["req"];
        req.extend(ec);
        req.extend(["-keyout", &key, "-out", &csr, "-subj", subject]);
        openssl(dir, &req);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                "2",
                "-extfile",
                &extfile,
            ],
        );
    }
}
