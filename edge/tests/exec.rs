//! `kubectl exec` end to end: real kubectl (WebSocket, v5.channel.k8s.io) against the cloud,
//! carried over the node's QUIC link to a process-runtime pod.

mod support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

const POD: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: box}
spec:
  containers:
  - name: main
    image: busybox
    command: ["sleep", "1000"]
    env:
    - {name: GREETING, value: hello from the container}
"#;

fn kubectl_exec(api: &str, args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    kubectl_exec_over(Transport::WebSocket, api, args, stdin)
}

/// Which of its two transports kubectl uses for exec.
#[derive(Clone, Copy)]
enum Transport {
    /// kubectl ≥ 1.30's default (`v5.channel.k8s.io`).
    WebSocket,
    /// An HTTP upgrade to SPDY/3.1 (`v4.channel.k8s.io`), what kubectl did before 1.30 and
    /// what kube-apiserver speaks to kubelets.
    Spdy,
}

fn kubectl_exec_over(
    transport: Transport,
    api: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> (i32, String, String) {
    let websockets = match transport {
        Transport::WebSocket => "true",
        Transport::Spdy => "false",
    };
    let mut child = Command::new("kubectl")
        .args(["--server", api, "exec"])
        .args(args)
        .env("KUBECONFIG", "/dev/null")
        .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", websockets)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Processes whose command line is exactly `cmdline` (NUL-separated in /proc).
fn processes(cmdline: &[&str]) -> usize {
    let want = cmdline.join("\0") + "\0";
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == want.as_bytes()))
        .count()
}

#[test]
fn kubectl_exec_runs_in_the_container_with_streams_exit_codes_stdin_and_a_terminal() {
    let cloud_dir = tempfile::tempdir().unwrap();
    let edge_dir = tempfile::tempdir().unwrap();
    let mut cloud = CloudProcess::start(cloud_dir.path());
    let token = token(&cloud);
    let edge = EdgeProcess::start(&cloud, "edge-1", edge_dir.path(), free_port(), Some(&token));
    assert!(cloud
        .kubectl_stdin(&["apply", "-f", "-"], POD)
        .status
        .success());
    eventually("box Running", Duration::from_secs(40), || {
        cloud.ok(&["get", "pod", "box", "-o", "jsonpath={.status.phase}"]) == "Running"
    });
    let api = cloud.api.clone();

    // stdout, stderr and the exit code.
    let (code, out, err) = kubectl_exec(
        &api,
        &["box", "--", "sh", "-c", "echo out; echo err >&2; exit 3"],
        None,
    );
    assert_eq!((code, out.as_str()), (3, "out\n"), "{err}");
    assert!(err.contains("err\n"), "{err}");
    let (code, out, err) = kubectl_exec(&api, &["box", "--", "true"], None);
    assert_eq!((code, out.as_str()), (0, ""), "{err}");

    // The container's environment and working directory.
    let (code, out, err) = kubectl_exec(&api, &["box", "--", "printenv", "GREETING"], None);
    assert_eq!(
        (code, out.as_str()),
        (0, "hello from the container\n"),
        "{err}"
    );
    let (_, out, _) = kubectl_exec(&api, &["box", "--", "pwd"], None);
    assert!(out.trim_end().ends_with("default_box/root"), "{out}");

    // stdin, to its end.
    let (code, out, err) = kubectl_exec(
        &api,
        &["-i", "box", "--", "sh", "-c", "wc -l; echo done"],
        Some("a\nb\nc\n"),
    );
    assert_eq!((code, out.as_str()), (0, "3\ndone\n"), "{err}");

    // A command that does not exist: a clear error and a non-zero code.
    let (code, _, err) = kubectl_exec(&api, &["box", "--", "no-such-command-here"], None);
    assert_eq!(code, 127, "{err}");
    assert!(err.contains("no-such-command-here"), "{err}");

    // An unknown container: the API's error, before any upgrade.
    let (code, _, err) = kubectl_exec(&api, &["box", "-c", "other", "--", "true"], None);
    assert_ne!(code, 0);
    assert!(
        err.contains("container other is not valid for pod box"),
        "{err}"
    );

    // A terminal (kubectl given one by script(1)).
    let out = Command::new("script")
        .args([
            "-qec",
            &format!("kubectl --server {api} exec -it box -- sh -c 'tty; exit 4'"),
            "/dev/null",
        ])
        .env("KUBECONFIG", "/dev/null")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("/dev/pts/"), "{text}");
    assert_eq!(out.status.code(), Some(4), "{text}");

    // kubectl interrupted mid-exec: nothing is left behind on the node.
    let mut running = Command::new("kubectl")
        .args(["--server", &api, "exec", "box", "--", "sleep", "737373"])
        .env("KUBECONFIG", "/dev/null")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    eventually("the exec'd sleep runs", Duration::from_secs(20), || {
        processes(&["sleep", "737373"]) == 1
    });
    let _ = running.kill();
    let _ = running.wait();
    let started = Instant::now();
    eventually("the exec'd sleep is gone", Duration::from_secs(20), || {
        processes(&["sleep", "737373"]) == 0
    });
    eprintln!("gone {:?} after kubectl", started.elapsed());

    // The same over SPDY/3.1 (kubectl told not to use WebSocket).
    let spdy =
        |args: &[&str], stdin: Option<&str>| kubectl_exec_over(Transport::Spdy, &api, args, stdin);
    let (code, out, err) = spdy(
        &["box", "--", "sh", "-c", "echo out; echo err >&2; exit 3"],
        None,
    );
    assert_eq!((code, out.as_str()), (3, "out\n"), "{err}");
    assert!(err.contains("err\n"), "{err}");
    let (code, out, err) = spdy(&["-v=6", "box", "--", "printenv", "GREETING"], None);
    assert_eq!(
        (code, out.as_str()),
        (0, "hello from the container\n"),
        "{err}"
    );
    // It was SPDY: a POST answered 101 (a WebSocket upgrade is a GET).
    assert!(
        err.lines()
            .any(|l| l.contains("POST ") && l.contains("/exec?") && l.contains("101")),
        "{err}"
    );
    let (code, out, err) = spdy(
        &["-i", "box", "--", "sh", "-c", "wc -l; echo done"],
        Some("a\nb\nc\n"),
    );
    assert_eq!((code, out.as_str()), (0, "3\ndone\n"), "{err}");
    let big = "x".repeat(200_000) + "\n";
    let (code, out, err) = spdy(&["-i", "box", "--", "wc", "-c"], Some(&big));
    assert_eq!((code, out.trim()), (0, "200001"), "{err}");
    let out = Command::new("script")
        .args([
            "-qec",
            &format!("kubectl --server {api} exec -it box -- sh -c 'tty; stty size; exit 6'"),
            "/dev/null",
        ])
        .env("KUBECONFIG", "/dev/null")
        .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")
        .env("COLUMNS", "91")
        .env("LINES", "33")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("/dev/pts/"), "{text}");
    assert_eq!(out.status.code(), Some(6), "{text}");
    let mut running = Command::new("kubectl")
        .args(["--server", &api, "exec", "box", "--", "sleep", "747474"])
        .env("KUBECONFIG", "/dev/null")
        .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    eventually(
        "the SPDY exec'd sleep runs",
        Duration::from_secs(20),
        || processes(&["sleep", "747474"]) == 1,
    );
    let _ = running.kill();
    let _ = running.wait();
    eventually(
        "the SPDY exec'd sleep is gone",
        Duration::from_secs(20),
        || processes(&["sleep", "747474"]) == 0,
    );

    // On the node itself, with the cloud gone: MetaServer serves exec too.
    cloud.kill9();
    let (code, out, err) = kubectl_exec(
        &edge.metaserver,
        &["box", "--", "sh", "-c", "printenv GREETING; exit 5"],
        None,
    );
    assert_eq!(
        (code, out.as_str()),
        (5, "hello from the container\n"),
        "{err}"
    );
    let (code, out, err) = kubectl_exec(
        &edge.metaserver,
        &["-i", "box", "--", "cat"],
        Some("offline\n"),
    );
    assert_eq!((code, out.as_str()), (0, "offline\n"), "{err}");
}

#[test]
fn sessions_idle_past_the_stream_idle_timeout_are_closed_busy_ones_are_not() {
    let cloud_dir = tempfile::tempdir().unwrap();
    let edge_dir = tempfile::tempdir().unwrap();
    let cloud = CloudProcess::start_with(
        cloud_dir.path(),
        free_port(),
        free_port(),
        free_port(),
        &["--stream-idle-timeout", "2s"],
    );
    let token = token(&cloud);
    let _edge = EdgeProcess::start(&cloud, "edge-1", edge_dir.path(), free_port(), Some(&token));
    assert!(cloud
        .kubectl_stdin(&["apply", "-f", "-"], POD)
        .status
        .success());
    eventually("box Running", Duration::from_secs(40), || {
        cloud.ok(&["get", "pod", "box", "-o", "jsonpath={.status.phase}"]) == "Running"
    });

    // A session that says something every second outlives the 2 s timeout.
    let (code, stdout, stderr) = kubectl_exec(
        &cloud.api,
        &[
            "box",
            "--",
            "sh",
            "-c",
            "for i in 1 2 3 4 5; do echo $i; sleep 1; done",
        ],
        None,
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout, "1\n2\n3\n4\n5\n");

    // A silent one is closed after about 2 s (not after the command's 60 s).
    let started = Instant::now();
    let (code, _, stderr) = kubectl_exec(&cloud.api, &["box", "--", "sleep", "60"], None);
    let took = started.elapsed();
    assert_ne!(code, 0, "{stderr}");
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(30),
        "closed after {took:?}"
    );

    // A port-forward session with no connection is closed too: kubectl exits.
    let local = free_port();
    let mut forward = Command::new("kubectl")
        .args(["--server", &cloud.api, "port-forward", "pod/box"])
        .arg(format!("{local}:9"))
        .env("KUBECONFIG", "/dev/null")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("kubectl port-forward");
    let started = Instant::now();
    let mut exited = None;
    while started.elapsed() < Duration::from_secs(30) {
        if let Ok(Some(status)) = forward.try_wait() {
            exited = Some(status);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = forward.kill();
    let _ = forward.wait();
    assert!(
        exited.is_some(),
        "kubectl port-forward still running 30 s after its session went idle"
    );
}
