//! Every HTTP entry of a real cloudcore bounded (oversized bodies get 413 and the process
//! keeps serving; slow clients are cut off), and its audit log of API writes, rotated.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use common::*;

fn still_serving(cloud: &mut CloudProcess, after: &str) {
    let api = cloud.api.replace("http://", "");
    assert_eq!(
        http_get(&api, "/healthz").as_deref(),
        Some("ok"),
        "cloudcore stopped answering after {after}"
    );
    assert!(
        matches!(cloud.child.try_wait(), Ok(None)),
        "cloudcore exited after {after}"
    );
}

#[test]
fn oversized_bodies_get_413_at_every_entry_and_slow_clients_are_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let mut cloud = CloudProcess::start_with(
        dir.path(),
        free_port(),
        free_port(),
        free_port(),
        &["--http-header-timeout", "1s", "--http-body-timeout", "1s"],
    );
    let api = cloud.api.replace("http://", "");
    let entries = [
        (
            "the API",
            "POST /api/v1/namespaces/default/configmaps HTTP/1.1",
        ),
        (
            "the API (update)",
            "PUT /api/v1/namespaces/default/configmaps/x HTTP/1.1",
        ),
        ("ServiceBus", "POST /servicebus/edge-1/app/x HTTP/1.1"),
        (
            "pod exec (a stream)",
            "POST /api/v1/namespaces/default/pods/p/exec?command=ls HTTP/1.1",
        ),
        (
            "a token review",
            "POST /apis/authentication.k8s.io/v1/selfsubjectreviews HTTP/1.1",
        ),
    ];
    for (entry, head) in entries {
        // Announced by its length: refused before it is read.
        let (status, body) = send_body(&api, head, 5 << 20, false);
        assert_eq!(status, 413, "{entry}, 5 MiB by Content-Length: {body}");
        assert!(body.contains("RequestEntityTooLarge"), "{entry}: {body}");
        still_serving(&mut cloud, entry);
    }
    // Chunked, no length: the handlers that read bodies stop at their limit.
    for (entry, head, size) in [
        ("the API", entries[0].1, 3_500_000),
        ("ServiceBus", entries[2].1, 4_500_000),
    ] {
        let (status, body) = send_body(&api, head, size, true);
        assert_eq!(status, 413, "{entry}, {size} bytes chunked: {body}");
        still_serving(&mut cloud, entry);
    }
    // The API still writes.
    let (status, body) = http_call(
        &api,
        "POST",
        "/api/v1/namespaces/default/configmaps",
        r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"after"}}"#,
    );
    assert_eq!(status, 201, "{body}");

    // A client that never finishes its headers is disconnected (hyper's header timeout).
    let mut slow = TcpStream::connect(&api).expect("connect");
    slow.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .expect("write");
    let mut buf = [0u8; 256];
    match slow.read(&mut buf) {
        Ok(n) => assert!(
            n == 0 || String::from_utf8_lossy(&buf[..n]).contains(" 408 "),
            "a slow client got {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e) => assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "a client sending half its headers was not disconnected within 20 s"
        ),
    }
    // A body that stops halfway fails the request (408) instead of holding it.
    let mut stalled = TcpStream::connect(&api).expect("connect");
    stalled
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    write!(
        stalled,
        "POST /api/v1/namespaces/default/configmaps HTTP/1.1\r\nHost: x\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"apiVersion\":"
    )
    .expect("write");
    let (status, body) = read_response(&mut stalled);
    assert_eq!(status, 408, "a stalled body: {body}");
    assert!(body.contains("\"reason\":\"Timeout\""), "{body}");
    still_serving(&mut cloud, "the slow clients");
    cloud.kill9();
}

fn audit_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("an audit line is JSON"))
        .collect()
}

#[test]
fn api_writes_are_audited_and_the_log_rotates() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.log");
    let data = dir.path().join("data");
    let mut cloud = CloudProcess::start_with(
        &data,
        free_port(),
        free_port(),
        free_port(),
        &[
            "--audit-log",
            log.to_str().expect("utf-8"),
            "--audit-log-max-size",
            "8K",
        ],
    );
    cloud.ok(&["create", "configmap", "audited", "--from-literal=k=v"]);
    cloud.ok(&["get", "configmap", "audited"]);
    cloud.ok(&["label", "configmap", "audited", "x=y"]);
    let out = cloud.kubectl(&["create", "configmap", "Not_A_Name"]);
    assert!(!out.status.success());
    cloud.ok(&["delete", "configmap", "audited"]);

    let lines = audit_lines(&log);
    let summary: Vec<(String, String, String, u64)> = lines
        .iter()
        .map(|l| {
            (
                l["verb"].as_str().unwrap_or_default().to_owned(),
                l["objectRef"]["resource"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                l["objectRef"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                l["responseStatus"]["code"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    let expected = [
        ("create", "configmaps", "audited", 201),
        ("patch", "configmaps", "audited", 200),
        ("create", "configmaps", "", 422),
        ("delete", "configmaps", "audited", 200),
    ];
    assert_eq!(
        summary,
        expected
            .iter()
            .map(|(v, r, n, c)| (v.to_string(), r.to_string(), n.to_string(), *c))
            .collect::<Vec<_>>(),
        "the reads are not recorded, each write once: {lines:#?}"
    );
    let first = &lines[0];
    assert_eq!(first["apiVersion"], "audit.k8s.io/v1");
    assert_eq!(first["kind"], "Event");
    assert_eq!(first["user"]["username"], "kedge-admin");
    assert_eq!(first["objectRef"]["namespace"], "default");
    assert_eq!(first["sourceIPs"][0], "127.0.0.1");
    assert!(first["userAgent"]
        .as_str()
        .is_some_and(|a| a.contains("kubectl")));
    assert!(first["requestReceivedTimestamp"].is_string());

    // 8 KiB hold some twenty lines: forty more writes rotate the log into audit.log.1.
    let api = cloud.api.replace("http://", "");
    for i in 0..40 {
        let (status, body) = http_call(
            &api,
            "POST",
            "/api/v1/namespaces/default/configmaps",
            &format!(r#"{{"apiVersion":"v1","kind":"ConfigMap","metadata":{{"name":"cm-{i}"}}}}"#),
        );
        assert_eq!(status, 201, "{body}");
    }
    let rotated = dir.path().join("audit.log.1");
    let (current, previous) = (audit_lines(&log), audit_lines(&rotated));
    assert!(!previous.is_empty(), "audit.log.1 exists after 8 KiB");
    for file in [&log, &rotated] {
        let size = std::fs::metadata(file).expect("metadata").len();
        assert!(size <= 8 << 10, "{} is {size} bytes", file.display());
    }
    assert_eq!(
        current.last().expect("a line")["objectRef"]["name"],
        "cm-39",
        "the newest write is in the current file"
    );
    cloud.kill9();
}
