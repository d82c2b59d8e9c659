//! Node credentials end to end, with the real cloudcore and edgecore binaries on loopback:
//! certificate rotation over the link, expiry while offline (recovery within the grace window,
//! refusal beyond it and re-join), revocation when a Node is deleted, two processes with one
//! certificate, one-use tokens, token list/delete and the join rate limit.
//!
//! Certificates live seconds here (`--node-cert-lifetime`); every wait is bounded.

mod support;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use support::common;
use support::*;
use transport::tls::NodeCertInfo;

/// A cloudcore with `extra` flags on fresh ports.
fn cloud_with(dir: &Path, extra: &[&str]) -> CloudProcess {
    CloudProcess::start_with(dir, free_port(), free_port(), free_port(), extra)
}

/// An edgecore whose log (RUST_LOG=info) goes to a file, killed when dropped.
struct Edge {
    child: Child,
    log: PathBuf,
}

impl Edge {
    fn spawn(cloud: &CloudProcess, node: &str, dir: &Path, extra: &[&str]) -> Edge {
        let log = dir.with_extension(format!("{}.log", free_port()));
        let mut command = edge_command_with_mqtt(cloud, node, dir, free_port(), &[]);
        let child = command
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("start edgecore");
        Edge { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Runs an edgecore that is expected to exit (a refused join) and returns its stderr.
fn edge_exits(cloud: &CloudProcess, node: &str, dir: &Path, extra: &[&str]) -> String {
    let out = edge_command_with_mqtt(cloud, node, dir, free_port(), &[])
        .args(extra)
        .stdout(Stdio::null())
        .output()
        .expect("run edgecore");
    assert!(!out.status.success(), "edgecore should have failed");
    stderr_of(&out)
}

/// A counter or gauge of the cloud's `/metrics`: the exact series (name and labels); 0 when
/// absent.
fn metric(cloud: &CloudProcess, series: &str) -> u64 {
    common::http_get(&cloud.metrics, "/metrics")
        .unwrap_or_default()
        .lines()
        .find_map(|line| {
            line.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn cert_event(cloud: &CloudProcess, event: &str) -> u64 {
    metric(
        cloud,
        &format!("kedge_node_certificates_total{{event=\"{event}\"}}"),
    )
}

fn connected(cloud: &CloudProcess) -> u64 {
    metric(cloud, "kedge_connected_nodes")
}

/// The node certificate stored in an edge data dir.
fn cert_info(dir: &Path) -> NodeCertInfo {
    let pem = std::fs::read_to_string(dir.join("pki/node.crt")).expect("node.crt");
    let cert = transport::tls::cert_from_pem(&pem).unwrap();
    transport::tls::node_cert_info(&cert).unwrap()
}

fn token_with(cloud: &CloudProcess, extra: &[&str]) -> String {
    let out = Command::new(binary("cloudcore"))
        .args(["token", "create"])
        .args(extra)
        .arg("--data-dir")
        .arg(&cloud.data_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    stdout(&out).lines().last().unwrap().to_owned()
}

fn token_cli(cloud: &CloudProcess, args: &[&str]) -> Output {
    Command::new(binary("cloudcore"))
        .arg("token")
        .args(args)
        .arg("--data-dir")
        .arg(&cloud.data_dir)
        .output()
        .unwrap()
}

fn wait_until(what: &str, when: SystemTime) {
    eventually(what, Duration::from_secs(60), || SystemTime::now() >= when);
}

#[test]
fn the_certificate_rotates_over_the_link_and_the_new_one_connects_after_a_restart() {
    let cloud_dir = tempfile::tempdir().unwrap();
    let edge_dir = tempfile::tempdir().unwrap();
    // No grace: once the first certificate expires, only a renewed one can connect.
    let flags = [
        "--node-cert-lifetime",
        "15s",
        "--node-cert-grace",
        "0s",
        "--link-keepalive",
        "1s",
    ];
    let cloud = cloud_with(cloud_dir.path(), &flags);
    let token = token(&cloud);
    let edge_flags = ["--link-keepalive", "1s"];
    let mut edge = Edge::spawn(
        &cloud,
        "edge-rot",
        edge_dir.path(),
        &[&edge_flags[..], &["--token", &token]].concat(),
    );
    eventually("the node connected", Duration::from_secs(30), || {
        connected(&cloud) == 1
    });
    let first = cert_info(edge_dir.path());
    let lifetime = first.not_after.duration_since(first.not_before).unwrap();
    assert!(lifetime <= Duration::from_secs(17), "{lifetime:?}");

    eventually(
        "the certificate renewed over the link",
        Duration::from_secs(30),
        || {
            edge_dir.path().join("pki/node.crt").exists()
                && cert_info(edge_dir.path()).fingerprint != first.fingerprint
        },
    );
    assert!(cert_event(&cloud, "renewed") >= 1);
    assert_eq!(cert_event(&cloud, "expired_in_grace"), 0);
    assert_eq!(connected(&cloud), 1, "renewing does not drop the link");
    assert!(
        edge.log().contains("node certificate renewed"),
        "{}",
        edge.log()
    );

    edge.kill();
    let renewed = cert_info(edge_dir.path());
    assert_ne!(renewed.fingerprint, first.fingerprint);
    assert!(renewed.not_after > first.not_after);
    eventually("the cloud saw the node go", Duration::from_secs(20), || {
        connected(&cloud) == 0
    });
    wait_until(
        "the first certificate expired",
        first.not_after + Duration::from_secs(1),
    );

    let edge = Edge::spawn(&cloud, "edge-rot", edge_dir.path(), &edge_flags);
    eventually(
        "the restarted node connected with the renewed certificate",
        Duration::from_secs(30),
        || connected(&cloud) == 1,
    );
    assert_eq!(cert_event(&cloud, "refused_expired"), 0, "{}", edge.log());
    assert_eq!(cert_event(&cloud, "expired_in_grace"), 0, "{}", edge.log());
}

/// Joins a node, stops the cloud at once, and waits (cloud down) until the node's
/// certificate has been expired for `past_expiry`. Returns the expired certificate.
fn expire_while_the_cloud_is_down(
    cloud: &mut CloudProcess,
    edge_dir: &Path,
    node: &str,
    past_expiry: Duration,
) -> (Edge, NodeCertInfo) {
    let token = token(cloud);
    let edge = Edge::spawn(
        cloud,
        node,
        edge_dir,
        &["--token", &token, "--link-keepalive", "1s"],
    );
    eventually("the node joined", Duration::from_secs(30), || {
        edge_dir.join("pki/node.crt").exists()
    });
    cloud.kill9();
    let cert = cert_info(edge_dir);
    wait_until("the certificate expired", cert.not_after + past_expiry);
    (edge, cert)
}

#[test]
fn a_certificate_that_expired_offline_is_renewed_within_the_grace_window() {
    let cloud_dir = tempfile::tempdir().unwrap();
    let edge_dir = tempfile::tempdir().unwrap();
    let flags = [
        "--node-cert-lifetime",
        "15s",
        "--node-cert-grace",
        "1h",
        "--link-keepalive",
        "1s",
    ];
    let mut cloud = cloud_with(cloud_dir.path(), &flags);
    let (edge, expired) = expire_while_the_cloud_is_down(
        &mut cloud,
        edge_dir.path(),
        "edge-grace",
        Duration::from_secs(1),
    );
    cloud.restart_after_kill9(&flags);
    eventually(
        "the node renewed its expired certificate and reconnected",
        Duration::from_secs(60),
        || connected(&cloud) == 1,
    );
    let renewed = cert_info(edge_dir.path());
    assert_ne!(renewed.fingerprint, expired.fingerprint);
    assert!(renewed.not_after > SystemTime::now());
    assert!(cert_event(&cloud, "renewed") >= 1);
    // The expired certificate was let in only to renew.
    assert!(cert_event(&cloud, "expired_in_grace") >= 1);
    assert_eq!(cert_event(&cloud, "refused_expired"), 0);
    assert!(edge.log().contains("expired=true"), "{}", edge.log());
}

#[test]
fn beyond_the_grace_window_the_node_is_refused_clearly_and_rejoins_with_a_new_token() {
    let cloud_dir = tempfile::tempdir().unwrap();
    let edge_dir = tempfile::tempdir().unwrap();
    let flags = [
        "--node-cert-lifetime",
        "15s",
        "--node-cert-grace",
        "2s",
        "--link-keepalive",
        "1s",
    ];
    let mut cloud = cloud_with(cloud_dir.path(), &flags);
    let (mut edge, expired) = expire_while_the_cloud_is_down(
        &mut cloud,
        edge_dir.path(),
        "edge-late",
        Duration::from_secs(3),
    );
    cloud.restart_after_kill9(&flags);
    eventually(
        "the node told to re-join with a new token",
        Duration::from_secs(60),
        || {
            let log = edge.log();
            log.contains("beyond the grace window") && log.contains("--rejoin --token")
        },
    );
    assert!(cert_event(&cloud, "refused_expired") >= 1);
    assert_eq!(connected(&cloud), 0);
    assert_eq!(cert_info(edge_dir.path()).fingerprint, expired.fingerprint);
    let uid = cloud.ok(&["get", "node", "edge-late", "-o", "jsonpath={.metadata.uid}"]);

    // The documented recovery: a new token and --rejoin; the Node object is kept.
    edge.kill();
    let token = token(&cloud);
    let edge = Edge::spawn(
        &cloud,
        "edge-late",
        edge_dir.path(),
        &["--rejoin", "--token", &token, "--link-keepalive", "1s"],
    );
    eventually(
        "the re-joined node connected",
        Duration::from_secs(30),
        || connected(&cloud) == 1,
    );
    assert_ne!(
        cert_info(edge_dir.path()).fingerprint,
        expired.fingerprint,
        "{}",
        edge.log()
    );
    assert_eq!(
        cloud.ok(&["get", "node", "edge-late", "-o", "jsonpath={.metadata.uid}"]),
        uid
    );
}

/// Copies a node's identity (name and credentials, not its cache) to another data dir.
fn copy_identity(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.join("pki")).unwrap();
    std::fs::copy(from.join("node-name"), to.join("node-name")).unwrap();
    for file in ["ca.crt", "node.crt", "node.key"] {
        std::fs::copy(from.join("pki").join(file), to.join("pki").join(file)).unwrap();
    }
}

#[test]
fn deleting_a_node_revokes_its_certificate_and_the_name_can_join_again() {
    let cloud_dir = tempfile::tempdir().unwrap();
    let edge_dir = tempfile::tempdir().unwrap();
    let old_dir = tempfile::tempdir().unwrap();
    let cloud = cloud_with(cloud_dir.path(), &["--link-keepalive", "1s"]);
    let token = token(&cloud);
    let mut edge = Edge::spawn(
        &cloud,
        "edge-del",
        edge_dir.path(),
        &["--token", &token, "--link-keepalive", "1s"],
    );
    eventually("the node connected", Duration::from_secs(30), || {
        connected(&cloud) == 1
    });
    copy_identity(edge_dir.path(), old_dir.path());
    drop(token);

    cloud.ok(&["delete", "node", "edge-del"]);
    eventually("the node's link closed", Duration::from_secs(20), || {
        connected(&cloud) == 0
    });
    assert!(cert_event(&cloud, "revoked") >= 1);
    eventually(
        "the node's reconnects refused as revoked",
        Duration::from_secs(30),
        || cert_event(&cloud, "refused_revoked") >= 1 && edge.log().contains("certificate revoked"),
    );
    assert_eq!(connected(&cloud), 0);

    // The same name joins again with a fresh token.
    edge.kill();
    let fresh = support::token(&cloud);
    let edge = Edge::spawn(
        &cloud,
        "edge-del",
        edge_dir.path(),
        &["--rejoin", "--token", &fresh, "--link-keepalive", "1s"],
    );
    eventually(
        "the re-joined node connected",
        Duration::from_secs(30),
        || connected(&cloud) == 1,
    );
    assert!(cloud.kubectl(&["get", "node", "edge-del"]).status.success());

    // The certificate from before the deletion stays refused, now that the name exists again.
    let refused_before = cert_event(&cloud, "refused_revoked");
    let old = Edge::spawn(
        &cloud,
        "edge-del",
        old_dir.path(),
        &["--link-keepalive", "1s"],
    );
    eventually(
        "the old certificate refused",
        Duration::from_secs(30),
        || cert_event(&cloud, "refused_revoked") > refused_before,
    );
    eventually("the old process told why", Duration::from_secs(10), || {
        old.log().contains("certificate is revoked")
    });
    drop(old);
    assert_eq!(connected(&cloud), 1, "{}", edge.log());
}

#[test]
fn two_processes_with_one_certificate_the_newer_wins_without_flapping() {
    let cloud_dir = tempfile::tempdir().unwrap();
    let first_dir = tempfile::tempdir().unwrap();
    let second_dir = tempfile::tempdir().unwrap();
    let cloud = CloudProcess::start(cloud_dir.path());
    let token = token(&cloud);
    let first = Edge::spawn(&cloud, "edge-twin", first_dir.path(), &["--token", &token]);
    eventually(
        "the first process connected",
        Duration::from_secs(30),
        || connected(&cloud) == 1,
    );
    copy_identity(first_dir.path(), second_dir.path());
    let second = Edge::spawn(&cloud, "edge-twin", second_dir.path(), &[]);
    let replaced = || cert_event(&cloud, "connection_replaced");
    eventually(
        "the second process replaced the first",
        Duration::from_secs(30),
        || replaced() >= 1,
    );
    eventually(
        "the first process held off",
        Duration::from_secs(10),
        || {
            first
                .log()
                .contains("another process connected to the cloud with this node's certificate")
        },
    );
    // Without the hold-off the first would be back within its reconnect backoff (under 5 s)
    // and the two would replace each other for as long as both run. Watched for 8 s.
    let watch = std::time::Instant::now();
    while watch.elapsed() < Duration::from_secs(8) {
        assert_eq!(replaced(), 1, "{}\n---\n{}", first.log(), second.log());
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(connected(&cloud), 1);
    assert!(!second.log().contains("another process connected"));
}

#[test]
fn one_use_tokens_join_once_tokens_are_listed_and_deleted_and_joins_are_rate_limited() {
    let cloud_dir = tempfile::tempdir().unwrap();
    let cloud = cloud_with(cloud_dir.path(), &["--join-rate-limit", "5"]);
    let dirs: Vec<_> = (0..5).map(|_| tempfile::tempdir().unwrap()).collect();

    let once = token_with(&cloud, &["--once"]);
    let once_id = once.split('.').nth(2).unwrap().to_owned();
    let _edge = Edge::spawn(&cloud, "edge-once", dirs[0].path(), &["--token", &once]);
    eventually("the first join", Duration::from_secs(30), || {
        connected(&cloud) == 1
    });
    // attempt 2: the one-use token again.
    let err = edge_exits(&cloud, "edge-twice", dirs[1].path(), &["--token", &once]);
    assert!(err.contains("has been used"), "{err}");

    let other = token_with(&cloud, &["--ttl", "1h"]);
    let other_id = other.split('.').nth(2).unwrap().to_owned();
    let list = stdout(&token_cli(&cloud, &["list"]));
    let line = |id: &str| {
        list.lines()
            .find(|l| l.starts_with(id))
            .unwrap_or_else(|| panic!("{id} not listed: {list}"))
            .to_owned()
    };
    assert!(
        line(&once_id).contains("once") && line(&once_id).ends_with("used"),
        "{list}"
    );
    assert!(
        line(&other_id).contains("unlimited") && line(&other_id).ends_with("valid"),
        "{list}"
    );
    assert!(
        !list.contains(other.split('.').nth(3).unwrap()),
        "secrets are never listed"
    );

    assert!(token_cli(&cloud, &["delete", &other_id]).status.success());
    assert!(!stdout(&token_cli(&cloud, &["list"])).contains(&other_id));
    assert!(!token_cli(&cloud, &["delete", &other_id]).status.success());
    // attempt 3: a deleted token.
    let err = edge_exits(&cloud, "edge-deleted", dirs[2].path(), &["--token", &other]);
    assert!(err.contains("unknown token"), "{err}");

    // Attempts 4 and 5 use up the limit (5 a minute per address); the 6th is refused.
    let guess = format!("{}.zzzzzz.guess", once.rsplitn(3, '.').nth(2).unwrap());
    for _ in 0..2 {
        let err = edge_exits(&cloud, "edge-guess", dirs[3].path(), &["--token", &guess]);
        assert!(err.contains("unknown token"), "{err}");
    }
    let err = edge_exits(&cloud, "edge-guess", dirs[4].path(), &["--token", &guess]);
    assert!(err.contains("429 Too Many Requests"), "{err}");
    assert_eq!(
        metric(&cloud, "kedge_joins_total{event=\"rate_limited\"}"),
        1
    );
    assert_eq!(metric(&cloud, "kedge_joins_total{event=\"joined\"}"), 1);
}

/// The CAs an edge data dir trusts.
fn trusted_cas(dir: &Path) -> usize {
    transport::tls::certs_from_pem(&std::fs::read_to_string(dir.join("pki/ca.crt")).unwrap())
        .unwrap()
        .len()
}

fn ca_cli(cloud: &CloudProcess, step: &str) {
    let out = Command::new(binary("cloudcore"))
        .args(["ca", step, "--data-dir"])
        .arg(&cloud.data_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "ca {step}: {}", stderr_of(&out));
}

#[test]
fn a_ca_rollover_reaches_the_node_over_its_link_without_losing_it() {
    let cloud_dir = tempfile::tempdir().unwrap();
    let edge_dir = tempfile::tempdir().unwrap();
    let flags = ["--node-cert-lifetime", "20s", "--link-keepalive", "1s"];
    let mut cloud = cloud_with(cloud_dir.path(), &flags);
    let token = token(&cloud);
    let edge_flags = ["--link-keepalive", "1s"];
    let mut edge = Edge::spawn(
        &cloud,
        "edge-ca",
        edge_dir.path(),
        &[&edge_flags[..], &["--token", &token]].concat(),
    );
    eventually("the node connected", Duration::from_secs(30), || {
        connected(&cloud) == 1
    });
    let old_ca = cert_info(edge_dir.path()).issuer;
    assert_eq!(trusted_cas(edge_dir.path()), 1);

    // 1. The next CA: trusted, sent to the node, not signing yet.
    ca_cli(&cloud, "add");
    cloud.restart_after_kill9(&flags);
    eventually(
        "the node learned the next CA over its link",
        Duration::from_secs(30),
        || trusted_cas(edge_dir.path()) == 2,
    );

    // 2. The switch: the cloud's certificate and new node certificates come from the new CA;
    // the node's certificate from the old one still connects.
    ca_cli(&cloud, "switch");
    cloud.restart_after_kill9(&flags);
    eventually(
        "the node trusts the cloud's new certificate",
        Duration::from_secs(30),
        || connected(&cloud) == 1,
    );
    eventually(
        "the node renewed its certificate from the new CA",
        Duration::from_secs(40),
        || cert_info(edge_dir.path()).issuer != old_ca,
    );
    assert!(cert_info(edge_dir.path()).issuer.starts_with("kedge-ca-"));

    // 3. The old CA is dropped; the node follows and still connects after its own restart.
    ca_cli(&cloud, "finish");
    cloud.restart_after_kill9(&flags);
    eventually("the node reconnected", Duration::from_secs(30), || {
        connected(&cloud) == 1
    });
    eventually(
        "the node dropped the old CA",
        Duration::from_secs(30),
        || trusted_cas(edge_dir.path()) == 1,
    );
    edge.kill();
    eventually("the cloud saw the node go", Duration::from_secs(20), || {
        connected(&cloud) == 0
    });
    let edge = Edge::spawn(&cloud, "edge-ca", edge_dir.path(), &edge_flags);
    eventually(
        "the restarted node connected on the new CA alone",
        Duration::from_secs(30),
        || connected(&cloud) == 1,
    );
    assert_eq!(cert_event(&cloud, "refused_revoked"), 0, "{}", edge.log());
}
