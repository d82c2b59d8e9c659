//! The embedded API over HTTPS with a bearer token (what listening off loopback requires),
//! driven by an unmodified kubectl that trusts the cluster CA.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{binary, free_port, kubectl};

const TOKEN: &str = "k3dge-api-token-0123456789abcdef";

fn secure(server: &str, ca: &str, token: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let mut all = vec!["--certificate-authority", ca, "--token", token];
    all.extend_from_slice(args);
    kubectl(server, &all, stdin)
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_api_over_https_needs_the_token_and_serves_kubectl() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("api-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let data = dir.path().join("cloud");
    let port = free_port();
    let mut cloud = Command::new(binary("cloudcore"))
        .arg("--data-dir")
        .arg(&data)
        .args(["--api-listen", &format!("127.0.0.1:{port}"), "--api-tls"])
        .arg("--api-token-file")
        .arg(&token_file)
        .args(["--metrics-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--quic-listen", &format!("127.0.0.1:{}", free_port())])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let server = format!("https://127.0.0.1:{port}");
    let ca = data.join("pki/ca.crt");
    let ca = ca.to_str().unwrap();

    let start = Instant::now();
    let listed = loop {
        let out = secure(
            &server,
            ca,
            TOKEN,
            &["get", "namespaces", "-o", "name"],
            None,
        );
        if out.status.success() || start.elapsed() > Duration::from_secs(30) {
            break out;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        text(&listed).contains("namespace/default"),
        "{}",
        text(&listed)
    );
    let applied = secure(
        &server,
        ca,
        TOKEN,
        &["apply", "-f", "-"],
        Some("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: over-tls}\ndata: {a: b}\n"),
    );
    assert!(applied.status.success(), "{}", text(&applied));

    // `kubectl auth can-i` with the token: a SelfSubjectAccessReview for its identity; without
    // it (or with a wrong one): Unauthorized, not an answer.
    let can = secure(
        &server,
        ca,
        TOKEN,
        &["auth", "can-i", "create", "pods"],
        None,
    );
    assert!(can.status.success(), "{}", text(&can));
    assert_eq!(String::from_utf8_lossy(&can.stdout).trim(), "yes");
    let anonymous = kubectl(
        &server,
        &[
            "--certificate-authority",
            ca,
            "auth",
            "can-i",
            "create",
            "pods",
        ],
        None,
    );
    // (kubectl, answered 401, asks for credentials on a terminal; here it has none.)
    assert!(!anonymous.status.success(), "{}", text(&anonymous));
    assert!(!String::from_utf8_lossy(&anonymous.stdout).contains("yes"));

    let wrong = secure(&server, ca, "not-the-token-at-all", &["get", "pods"], None);
    assert!(!wrong.status.success());
    assert!(text(&wrong).contains("Unauthorized"), "{}", text(&wrong));
    let plain = kubectl(&format!("http://127.0.0.1:{port}"), &["get", "pods"], None);
    assert!(!plain.status.success(), "plain HTTP is not served");
    let untrusted = kubectl(&server, &["--token", TOKEN, "get", "pods"], None);
    assert!(
        text(&untrusted).contains("certificate"),
        "{}",
        text(&untrusted)
    );
    let _ = cloud.kill();
    let _ = cloud.wait();

    // Off loopback without a token: refused at start, before listening anywhere.
    let out = Command::new(binary("cloudcore"))
        .arg("--data-dir")
        .arg(dir.path().join("other"))
        .args(["--api-listen", "0.0.0.0:6443"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out).contains("requires a bearer token"),
        "{}",
        text(&out)
    );
    let short = dir.path().join("short");
    std::fs::write(&short, "abc").unwrap();
    let out = Command::new(binary("cloudcore"))
        .arg("--data-dir")
        .arg(dir.path().join("other"))
        .args([
            "--api-listen",
            &format!("127.0.0.1:{}", free_port()),
            "--api-tls",
        ])
        .arg("--api-token-file")
        .arg(&short)
        .output()
        .unwrap();
    assert!(text(&out).contains("shorter than 16"), "{}", text(&out));
}
