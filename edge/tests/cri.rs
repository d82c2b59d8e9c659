//! `edgecore --runtime cri` end to end: real cloudcore, edgecore, kubectl, containerd, runc,
//! CNI and a local registry (see `support/cri_env.rs`). Pods are written as a user writes
//! them; their image is pulled from the loopback registry through CRI.

#[path = "support/cri_env.rs"]
mod cri_env;
mod support;

use std::process::Stdio;
use std::time::Duration;

use cri_env::CriEnv;
use support::*;

fn start_edge(
    cloud: &CloudProcess,
    node: &str,
    dir: &std::path::Path,
    port: u16,
    token: Option<&str>,
    env: &CriEnv,
) -> EdgeProcess {
    start_edge_with(cloud, node, dir, port, token, env, &[])
}

fn start_edge_with(
    cloud: &CloudProcess,
    node: &str,
    dir: &std::path::Path,
    port: u16,
    token: Option<&str>,
    env: &CriEnv,
    extra: &[&str],
) -> EdgeProcess {
    let mut command = edge_command_with_mqtt(cloud, node, dir, port, &[]);
    command
        .args(["--runtime", "cri", "--cri-endpoint", &env.endpoint])
        .args(extra)
        .env("RUST_LOG", "warn,edge::edged=info");
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
    eventually("MetaServer answers", Duration::from_secs(20), || {
        common::http_get(&format!("127.0.0.1:{port}"), "/healthz").is_some_and(|b| b == "ok")
    });
    edge
}

fn get(cloud: &CloudProcess, pod: &str, path: &str) -> String {
    let out = cloud.kubectl(&["get", "pod", pod, "-o", &format!("jsonpath={{{path}}}")]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn pods(image: &str, registry: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: ConfigMap
metadata: {{name: settings}}
data: {{greeting: from-configmap}}
---
apiVersion: v1
kind: Pod
metadata: {{name: hello}}
spec:
  terminationGracePeriodSeconds: 5
  containers:
  - name: main
    image: {image}
    workingDir: /tmp
    env:
    - {{name: WHO, value: world}}
    command: ["sh", "-c", "echo hello $WHO in $(pwd) $(cat /etc/settings/greeting); trap 'exit 0' TERM; sleep 3600 & wait"]
    volumeMounts:
    - {{name: settings, mountPath: /etc/settings}}
  volumes:
  - name: settings
    configMap: {{name: settings}}
---
apiVersion: v1
kind: Pod
metadata: {{name: crasher}}
spec:
  restartPolicy: OnFailure
  containers:
  - name: main
    image: {image}
    command: ["sh", "-c", "echo attempt; exit 1"]
---
apiVersion: v1
kind: Pod
metadata: {{name: never}}
spec:
  containers:
  - name: main
    image: {registry}/kedge/missing:1
    imagePullPolicy: Never
    command: ["sh", "-c", "sleep 3600"]
---
apiVersion: v1
kind: Pod
metadata: {{name: hostnet}}
spec:
  hostNetwork: true
  terminationGracePeriodSeconds: 5
  containers:
  - name: main
    image: {image}
    args: ["sh", "-c", "echo on the host network; trap 'exit 0' TERM; sleep 3600 & wait"]
---
apiVersion: v1
kind: Pod
metadata: {{name: listener}}
spec:
  restartPolicy: Never
  containers:
  - name: main
    image: {image}
    stdin: true
    stdinOnce: true
    command: ["sh", "-c", "while read line; do echo got:$line; done; echo bye"]
"#
    )
}

#[test]
fn pods_run_as_containers_pulled_through_cri() {
    let env = CriEnv::up();
    let cloud_dir = tempfile::tempdir().unwrap();
    let edge_dir = tempfile::tempdir().unwrap();
    let cloud = CloudProcess::start(cloud_dir.path());
    let token = token(&cloud);

    // A dead socket: edgecore says which and exits.
    let bad_dir = tempfile::tempdir().unwrap();
    let out = edge_command_with_mqtt(&cloud, "edge-bad", bad_dir.path(), free_port(), &[])
        .args(["--runtime", "cri", "--cri-endpoint"])
        .arg(format!("unix://{}/nothing.sock", bad_dir.path().display()))
        .arg("--token")
        .arg(&token)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("edgecore");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "edgecore ran without its CRI runtime"
    );
    assert!(
        said.contains("nothing.sock") && said.contains("CRI"),
        "the error names the socket: {said}"
    );

    let port = free_port();
    let mut edge = start_edge(&cloud, "edge-1", edge_dir.path(), port, Some(&token), &env);
    eventually("edge-1 Ready", Duration::from_secs(30), || {
        cloud
            .kubectl(&[
                "get",
                "node",
                "edge-1",
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ])
            .stdout
            .starts_with(b"True")
    });
    let runtime = cloud.ok(&[
        "get",
        "node",
        "edge-1",
        "-o",
        "jsonpath={.status.nodeInfo.containerRuntimeVersion}",
    ]);
    assert!(runtime.starts_with("containerd://"), "{runtime}");

    let applied = cloud.kubectl_stdin(&["apply", "-f", "-"], &pods(&env.busybox, &env.registry));
    assert!(applied.status.success(), "{}", stderr_of(&applied));

    // Running, with an IP of the CNI network, and its output in `kubectl logs`.
    eventually("hello Running", Duration::from_secs(60), || {
        get(&cloud, "hello", ".status.phase") == "Running"
    });
    let ip = get(&cloud, "hello", ".status.podIP");
    let prefix = env.subnet.split('.').take(2).collect::<Vec<_>>().join(".") + ".";
    assert!(ip.starts_with(&prefix), "pod IP {ip:?} in {}", env.subnet);
    let container_id = get(&cloud, "hello", ".status.containerStatuses[0].containerID");
    assert!(container_id.starts_with("containerd://"), "{container_id}");
    let image_id = get(&cloud, "hello", ".status.containerStatuses[0].imageID");
    assert!(image_id.contains("@sha256:"), "{image_id}");
    eventually("kubectl logs hello", Duration::from_secs(20), || {
        stdout(&cloud.kubectl(&["logs", "hello"])).contains("hello world in /tmp from-configmap")
    });

    // kubectl exec (non-interactive, CRI ExecSync): output and exit code.
    let out = cloud.kubectl(&[
        "exec",
        "hello",
        "--",
        "sh",
        "-c",
        "echo $WHO; echo oops >&2; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr_of(&out));
    assert_eq!(stdout(&out), "world\n");
    assert!(stderr_of(&out).contains("oops"), "{}", stderr_of(&out));

    // kubectl exec -i (CRI streaming Exec over SPDY): the input reaches the command, its end
    // too (cat returns), output streams back and the exit code is kubectl's.
    let out = cloud.kubectl_stdin(
        &[
            "exec",
            "-i",
            "hello",
            "--",
            "sh",
            "-c",
            "cat; echo done >&2; exit 4",
        ],
        "line one\nline two\n",
    );
    assert_eq!(out.status.code(), Some(4), "{}", stderr_of(&out));
    assert_eq!(stdout(&out), "line one\nline two\n");
    assert!(stderr_of(&out).contains("done"), "{}", stderr_of(&out));
    // With a terminal: kubectl runs on one (util-linux `script` gives it a pty), asks the
    // runtime for one, and the command sees it.
    let command = format!(
        "KUBECONFIG=/dev/null kubectl --server {} exec -it hello -- sh -c 'test -t 0 && echo on-a-tty; exit 5'",
        cloud.api
    );
    let out = std::process::Command::new("timeout")
        .args(["30", "script", "-q", "-e", "-c", &command, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("script (util-linux)");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("on-a-tty"), "{said}{}", stderr_of(&out));
    assert_eq!(out.status.code(), Some(5), "{said}");

    // kubectl top: the runtime's own figures for a CRI container (CRI ListContainerStats).
    eventually("hello's usage", Duration::from_secs(30), || {
        let out = cloud.kubectl(&[
            "get",
            "--raw",
            "/apis/metrics.k8s.io/v1beta1/namespaces/default/pods/hello",
        ]);
        let usage: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        let memory = usage["containers"][0]["usage"]["memory"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        usage["containers"][0]["name"] == "main" && !memory.is_empty() && memory != "0"
    });

    // kubectl attach -i (CRI streaming Attach): the container's own stdin and output; with
    // stdinOnce its input ends with the session and so does the container.
    eventually("listener Running", Duration::from_secs(60), || {
        get(&cloud, "listener", ".status.phase") == "Running"
    });
    let out = cloud.kubectl_stdin(&["attach", "-i", "listener"], "a\nb\n");
    assert!(out.status.success(), "{}", stderr_of(&out));
    let said = stdout(&out);
    assert!(said.contains("got:a") && said.contains("got:b"), "{said}");
    eventually(
        "listener done after its input",
        Duration::from_secs(30),
        || get(&cloud, "listener", ".status.phase") == "Succeeded",
    );
    assert!(stdout(&cloud.kubectl(&["logs", "listener"])).contains("bye"));

    // hostNetwork: the node's network, no sandbox IP of its own.
    eventually("hostnet Running", Duration::from_secs(60), || {
        get(&cloud, "hostnet", ".status.phase") == "Running"
    });
    assert_eq!(get(&cloud, "hostnet", ".status.podIP"), "127.0.0.1");
    eventually("kubectl logs hostnet", Duration::from_secs(20), || {
        stdout(&cloud.kubectl(&["logs", "hostnet"])).contains("on the host network")
    });

    // OnFailure: the failing container comes back, and its restarts are counted.
    eventually("crasher restarted twice", Duration::from_secs(60), || {
        get(
            &cloud,
            "crasher",
            ".status.containerStatuses[0].restartCount",
        )
        .parse::<u32>()
        .is_ok_and(|n| n >= 2)
    });
    let last = get(
        &cloud,
        "crasher",
        ".status.containerStatuses[0].lastState.terminated.exitCode",
    );
    assert_eq!(last, "1");
    assert!(stdout(&cloud.kubectl(&["logs", "crasher", "--previous"])).contains("attempt"));

    // imagePullPolicy Never and no such image: a reason, not a pull.
    eventually("never: ErrImageNeverPull", Duration::from_secs(30), || {
        get(
            &cloud,
            "never",
            ".status.containerStatuses[0].state.waiting.reason",
        ) == "ErrImageNeverPull"
    });
    let message = get(
        &cloud,
        "never",
        ".status.containerStatuses[0].state.waiting.message",
    );
    assert!(message.contains("missing:1"), "{message}");

    // edgecore killed: the containers keep running; the next one adopts them, no duplicate.
    let hello_uid = get(&cloud, "hello", ".metadata.uid");
    let host_uid = get(&cloud, "hostnet", ".metadata.uid");
    edge.kill9();
    let running = |uid: &str| {
        env.containers_of(uid)
            .into_iter()
            .filter(|c| c.state == k8s_cri::v1::ContainerState::ContainerRunning as i32)
            .map(|c| c.id)
            .collect::<Vec<_>>()
    };
    let before = running(&host_uid);
    assert_eq!(before.len(), 1, "hostnet runs on without edgecore");
    let mut edge = start_edge(&cloud, "edge-1", edge_dir.path(), port, None, &env);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(running(&host_uid), before, "the same container, adopted");
    assert_eq!(env.sandboxes_of(&host_uid).len(), 1);
    assert_eq!(get(&cloud, "hostnet", ".status.phase"), "Running");
    assert_eq!(
        get(&cloud, "hello", ".status.containerStatuses[0].containerID"),
        container_id,
        "hello adopted, not started again"
    );

    // Delete: the container stops within its grace period and the sandbox is removed.
    assert_eq!(env.sandboxes_of(&hello_uid).len(), 1);
    let deleted = std::time::Instant::now();
    let out = cloud.kubectl(&["delete", "pod", "hello", "--wait=false"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    eventually("hello's sandbox removed", Duration::from_secs(30), || {
        env.sandboxes_of(&hello_uid).is_empty()
    });
    assert!(
        deleted.elapsed() < Duration::from_secs(5 + 10),
        "stopped within the grace period"
    );
    eventually("hello gone from the API", Duration::from_secs(30), || {
        !cloud.kubectl(&["get", "pod", "hello"]).status.success()
    });
    edge.kill9();
}

fn more_pods(image: &str, registry: &str, host_port: u16, env: &CriEnv) -> String {
    let (user, password) = cri_env::PRIVATE_AUTH;
    let private = &env.private_image;
    let config = format!(
        r#"{{"auths":{{"{}":{{"username":"{user}","password":"{password}"}}}}}}"#,
        env.private_registry
    );
    format!(
        r#"
apiVersion: v1
kind: Secret
metadata: {{name: pull}}
type: kubernetes.io/dockerconfigjson
stringData:
  .dockerconfigjson: '{config}'
---
apiVersion: v1
kind: Pod
metadata: {{name: private}}
spec:
  terminationGracePeriodSeconds: 1
  imagePullSecrets: [{{name: pull}}]
  containers:
  - name: main
    image: {private}
    command: ["sh", "-c", "cat /private-marker; trap 'exit 0' TERM; sleep 3600 & wait"]
---
apiVersion: v1
kind: Pod
metadata: {{name: private-without-secret}}
spec:
  containers:
  - name: main
    image: {private}
    # Always: a pull (refused) even once the other pod brought the image to the node.
    imagePullPolicy: Always
    command: ["sh", "-c", "sleep 3600"]
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: live}}
data: {{value: first}}
---
apiVersion: v1
kind: Pod
metadata: {{name: wrong-image}}
spec:
  containers:
  - name: main
    image: {registry}/kedge/nosuch:1
    command: ["sh", "-c", "sleep 3600"]
---
apiVersion: v1
kind: Pod
metadata: {{name: stubborn}}
spec:
  terminationGracePeriodSeconds: 3
  containers:
  - name: main
    image: {image}
    command: ["sleep", "3600"]
---
apiVersion: v1
kind: Pod
metadata: {{name: shared}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: writer
    image: {image}
    command: ["sh", "-c", "echo from-writer > /data/note; trap 'exit 0' TERM; sleep 3600 & wait"]
    volumeMounts: [{{name: scratch, mountPath: /data}}]
  - name: reader
    image: {image}
    command: ["sh", "-c", "trap 'exit 0' TERM; while true; do cat /data/note /etc/live/value 2>/dev/null; sleep 0.3; done"]
    volumeMounts:
    - {{name: scratch, mountPath: /data, readOnly: true}}
    - {{name: live, mountPath: /etc/live}}
  volumes:
  - {{name: scratch, emptyDir: {{}}}}
  - {{name: live, configMap: {{name: live}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: limited}}
spec:
  securityContext: {{runAsUser: 65534}}
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: {image}
    securityContext: {{runAsGroup: 65534, readOnlyRootFilesystem: true}}
    resources:
      limits: {{memory: 64Mi, cpu: 250m}}
    command: ["sh", "-c", "echo uid=$(id -u) gid=$(id -g) mem=$(cat /sys/fs/cgroup/memory/memory.limit_in_bytes) quota=$(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us); touch /x || echo read-only; trap 'exit 0' TERM; sleep 3600 & wait"]
---
apiVersion: v1
kind: Pod
metadata: {{name: web}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: {image}
    command: ["sh", "-c", "echo hi-from-web > /tmp/index.html; exec httpd -f -p 8080 -h /tmp"]
    readinessProbe:
      httpGet: {{path: /index.html, port: 8080}}
      periodSeconds: 1
    livenessProbe:
      exec: {{command: ["test", "-f", "/tmp/index.html"]}}
      periodSeconds: 1
    ports:
    - {{containerPort: 8080, hostPort: {host_port}, hostIP: 127.0.0.1}}
---
apiVersion: v1
kind: Pod
metadata: {{name: initialized}}
spec:
  terminationGracePeriodSeconds: 1
  initContainers:
  - name: prepare
    image: {image}
    command: ["sh", "-c", "echo prepared > /work/ready"]
    volumeMounts: [{{name: work, mountPath: /work}}]
  containers:
  - name: main
    image: {image}
    command: ["sh", "-c", "cat /work/ready; trap 'exit 0' TERM; sleep 3600 & wait"]
    volumeMounts: [{{name: work, mountPath: /work}}]
  volumes: [{{name: work, emptyDir: {{}}}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: init-fails}}
spec:
  restartPolicy: Never
  initContainers:
  - name: check
    image: {image}
    command: ["sh", "-c", "exit 2"]
  containers:
  - name: main
    image: {image}
    command: ["sh", "-c", "echo should-not-run"]
---
apiVersion: v1
kind: Pod
metadata: {{name: gone-while-down}}
spec:
  hostNetwork: true
  containers:
  - name: main
    image: {image}
    command: ["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]
"#
    )
}

#[test]
fn pull_errors_grace_periods_volumes_and_pods_deleted_while_edgecore_was_down() {
    let env = CriEnv::up();
    let cloud_dir = tempfile::tempdir().unwrap();
    let edge_dir = tempfile::tempdir().unwrap();
    let cloud = CloudProcess::start(cloud_dir.path());
    let token = token(&cloud);
    let port = free_port();
    let mut edge = start_edge(&cloud, "edge-2", edge_dir.path(), port, Some(&token), &env);
    eventually("edge-2 Ready", Duration::from_secs(30), || {
        cloud
            .kubectl(&[
                "get",
                "node",
                "edge-2",
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ])
            .stdout
            .starts_with(b"True")
    });
    let host_port = free_port();
    let applied = cloud.kubectl_stdin(
        &["apply", "-f", "-"],
        &more_pods(&env.busybox, &env.registry, host_port, &env),
    );
    assert!(applied.status.success(), "{}", stderr_of(&applied));

    // A tag the registry does not have: ErrImagePull, then ImagePullBackOff.
    let reason = |pod: &str| {
        get(
            &cloud,
            pod,
            ".status.containerStatuses[0].state.waiting.reason",
        )
    };
    eventually("wrong-image: ErrImagePull", Duration::from_secs(60), || {
        reason("wrong-image") == "ErrImagePull"
    });
    eventually(
        "wrong-image: ImagePullBackOff",
        Duration::from_secs(30),
        || reason("wrong-image") == "ImagePullBackOff",
    );
    let message = get(
        &cloud,
        "wrong-image",
        ".status.containerStatuses[0].state.waiting.message",
    );
    assert!(message.contains("nosuch:1"), "{message}");

    // A private registry: pulled with the pod's imagePullSecret, refused without one.
    eventually(
        "private: pulled with its imagePullSecret",
        Duration::from_secs(60),
        || {
            let pulled = stdout(&cloud.kubectl(&["logs", "private"])).contains("private");
            if !pulled {
                eprintln!(
                    "private: {}",
                    get(&cloud, "private", ".status.containerStatuses[0].state")
                );
            }
            pulled
        },
    );
    eventually(
        "private-without-secret: ErrImagePull",
        Duration::from_secs(60),
        || {
            matches!(
                reason("private-without-secret").as_str(),
                "ErrImagePull" | "ImagePullBackOff"
            )
        },
    );
    let message = get(
        &cloud,
        "private-without-secret",
        ".status.containerStatuses[0].state.waiting.message",
    );
    assert!(
        message.contains("401") || message.contains("nauthorized"),
        "{message}"
    );

    // emptyDir shared by two containers, and a configMap volume kept current.
    eventually(
        "shared: reader sees the writer's file",
        Duration::from_secs(60),
        || {
            stdout(&cloud.kubectl(&["logs", "shared", "-c", "reader", "--tail", "4"]))
                .contains("from-writer")
        },
    );
    assert!(
        stdout(&cloud.kubectl(&["logs", "shared", "-c", "reader", "--tail", "4"]))
            .contains("first")
    );
    let patched = cloud.kubectl(&[
        "patch",
        "configmap",
        "live",
        "-p",
        r#"{"data":{"value":"second"}}"#,
    ]);
    assert!(patched.status.success(), "{}", stderr_of(&patched));
    eventually(
        "shared: the configMap's new value in the container",
        Duration::from_secs(30),
        || {
            stdout(&cloud.kubectl(&["logs", "shared", "-c", "reader", "--tail", "2"]))
                .contains("second")
        },
    );

    // Init containers: run to completion first; one failing under Never fails the pod.
    eventually(
        "initialized: the main container sees what the init container wrote",
        Duration::from_secs(60),
        || stdout(&cloud.kubectl(&["logs", "initialized"])).contains("prepared"),
    );
    assert_eq!(
        get(
            &cloud,
            "initialized",
            ".status.initContainerStatuses[0].state.terminated.reason"
        ),
        "Completed"
    );
    assert_eq!(get(&cloud, "initialized", ".status.phase"), "Running");
    eventually("init-fails: Failed", Duration::from_secs(60), || {
        get(&cloud, "init-fails", ".status.phase") == "Failed"
    });
    assert_eq!(
        get(
            &cloud,
            "init-fails",
            ".status.initContainerStatuses[0].state.terminated.exitCode"
        ),
        "2"
    );
    assert_eq!(
        get(
            &cloud,
            "init-fails",
            ".status.containerStatuses[0].state.waiting.reason"
        ),
        "PodInitializing"
    );
    assert!(
        !stdout(&cloud.kubectl(&["logs", "init-fails", "-c", "main"])).contains("should-not-run")
    );

    // securityContext and resources as the container sees them.
    eventually(
        "limited: its user, group and limits",
        Duration::from_secs(60),
        || {
            stdout(&cloud.kubectl(&["logs", "limited"]))
                .contains("uid=65534 gid=65534 mem=67108864 quota=25000")
        },
    );
    assert!(stdout(&cloud.kubectl(&["logs", "limited"])).contains("read-only"));

    // A hostPort on the node's loopback reaches the pod (CNI portmap).
    let answers = || {
        common::http_get(&format!("127.0.0.1:{host_port}"), "/index.html")
            .is_some_and(|body| body.contains("hi-from-web"))
    };
    let start = std::time::Instant::now();
    while !answers() && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(200));
    }
    if !answers() {
        // What a reader of a CI log needs to tell a pod not running from a NAT rule missing.
        let pod = stdout(&cloud.kubectl(&["get", "pod", "web", "-o", "wide"]));
        let status = get(&cloud, "web", ".status");
        let nat = std::process::Command::new("iptables-save")
            .args(["-t", "nat"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let rules: Vec<&str> = nat
            .lines()
            .filter(|l| l.contains(&host_port.to_string()) || l.contains("HOSTPORT"))
            .collect();
        panic!(
            "web: its hostPort 127.0.0.1:{host_port} did not answer within 60 s\n{pod}\n\
             status: {status}\nNAT rules:\n{}",
            rules.join("\n")
        );
    }
    eprintln!("web: its hostPort answers: {:?}", start.elapsed());

    // Probes in a CRI container: httpGet at the pod's IP makes it ready; exec (CRI ExecSync)
    // keeps it alive.
    eventually(
        "web ready by its httpGet probe",
        Duration::from_secs(30),
        || get(&cloud, "web", ".status.containerStatuses[0].ready") == "true",
    );
    assert_eq!(
        get(&cloud, "web", ".status.containerStatuses[0].restartCount"),
        "0"
    );

    // kubectl port-forward to a CNI pod reaches its own IP (not the node's loopback).
    let local = free_port();
    let mut forward = std::process::Command::new("kubectl")
        .args(["--server", &cloud.api, "port-forward", "pod/web"])
        .arg(format!("{local}:8080"))
        .env("KUBECONFIG", "/dev/null")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("kubectl port-forward");
    eventually("web through port-forward", Duration::from_secs(30), || {
        common::http_get(&format!("127.0.0.1:{local}"), "/index.html")
            .is_some_and(|body| body.contains("hi-from-web"))
    });
    let _ = forward.kill();
    let _ = forward.wait();

    // PID 1 that ignores SIGTERM: killed when its grace period (3 s) is over.
    eventually("stubborn Running", Duration::from_secs(60), || {
        get(&cloud, "stubborn", ".status.phase") == "Running"
    });
    let stubborn_uid = get(&cloud, "stubborn", ".metadata.uid");
    let deleted = std::time::Instant::now();
    let out = cloud.kubectl(&["delete", "pod", "stubborn", "--wait=false"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    eventually(
        "stubborn's sandbox removed",
        Duration::from_secs(30),
        || env.sandboxes_of(&stubborn_uid).is_empty(),
    );
    let took = deleted.elapsed();
    assert!(
        took >= Duration::from_millis(2500) && took < Duration::from_secs(15),
        "stopped after its grace period: {took:?}"
    );

    // Deleted (forced) while edgecore is down: the next edgecore removes its sandbox.
    eventually("gone-while-down Running", Duration::from_secs(60), || {
        get(&cloud, "gone-while-down", ".status.phase") == "Running"
    });
    let gone_uid = get(&cloud, "gone-while-down", ".metadata.uid");
    edge.kill9();
    let out = cloud.kubectl(&[
        "delete",
        "pod",
        "gone-while-down",
        "--force",
        "--grace-period=0",
    ]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(
        env.sandboxes_of(&gone_uid).len(),
        1,
        "kept while edgecore is down"
    );
    let _edge = start_edge(&cloud, "edge-2", edge_dir.path(), port, None, &env);
    eventually(
        "gone-while-down's sandbox removed",
        Duration::from_secs(60),
        || env.sandboxes_of(&gone_uid).is_empty(),
    );
    // The others were adopted, not doubled.
    let shared_uid = get(&cloud, "shared", ".metadata.uid");
    assert_eq!(env.sandboxes_of(&shared_uid).len(), 1);
    let running = env
        .containers_of(&shared_uid)
        .into_iter()
        .filter(|c| c.state == k8s_cri::v1::ContainerState::ContainerRunning as i32)
        .count();
    assert_eq!(running, 2);
}

#[test]
fn containerd_going_away_is_reported_and_survived() {
    let env = CriEnv::up();
    let cloud_dir = tempfile::tempdir().unwrap();
    let edge_dir = tempfile::tempdir().unwrap();
    let cloud = CloudProcess::start(cloud_dir.path());
    let token = token(&cloud);
    let _edge = start_edge(
        &cloud,
        "edge-3",
        edge_dir.path(),
        free_port(),
        Some(&token),
        &env,
    );
    let pod = |name: &str| {
        format!(
            r#"
apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: {}
    command: ["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]
"#,
            env.busybox
        )
    };
    let applied = cloud.kubectl_stdin(&["apply", "-f", "-"], &pod("before"));
    assert!(applied.status.success(), "{}", stderr_of(&applied));
    eventually("before Running", Duration::from_secs(60), || {
        get(&cloud, "before", ".status.phase") == "Running"
    });
    let before_id = get(&cloud, "before", ".status.containerStatuses[0].containerID");

    // containerd gone: a new pod waits with the reason; the running one runs on.
    env.kill_containerd();
    let applied = cloud.kubectl_stdin(&["apply", "-f", "-"], &pod("during"));
    assert!(applied.status.success(), "{}", stderr_of(&applied));
    eventually(
        "during: waiting with the runtime's error",
        Duration::from_secs(30),
        || {
            get(
                &cloud,
                "during",
                ".status.containerStatuses[0].state.waiting.message",
            )
            .contains("failed to create the pod sandbox")
        },
    );
    assert_eq!(get(&cloud, "before", ".status.phase"), "Running");

    // Back: the waiting pod starts (its retry back-off), the running one is the same container.
    env.start_containerd();
    eventually(
        "during Running once containerd is back",
        Duration::from_secs(60),
        || get(&cloud, "during", ".status.phase") == "Running",
    );
    assert_eq!(get(&cloud, "before", ".status.phase"), "Running");
    assert_eq!(
        get(&cloud, "before", ".status.containerStatuses[0].containerID"),
        before_id
    );
    let before_uid = get(&cloud, "before", ".metadata.uid");
    assert_eq!(env.sandboxes_of(&before_uid).len(), 1);

    // edgecore stopped with SIGTERM: it exits promptly and leaves the containers running.
    let mut edge = _edge;
    let stopping = std::time::Instant::now();
    // SAFETY: a plain kill(2) of the edgecore this test started.
    unsafe { libc::kill(edge.child.id() as i32, libc::SIGTERM) };
    let mut exited = None;
    while stopping.elapsed() < Duration::from_secs(10) {
        if let Some(status) = edge.child.try_wait().unwrap() {
            exited = Some(status);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = exited.expect("edgecore exits within 10 s of SIGTERM");
    assert!(status.success(), "{status:?}");
    let running = env
        .containers_of(&before_uid)
        .into_iter()
        .filter(|c| c.state == k8s_cri::v1::ContainerState::ContainerRunning as i32)
        .count();
    assert_eq!(running, 1, "the pod's container outlives edgecore");
}

#[test]
fn after_a_reboot_with_the_cloud_away_pods_run_again_from_local_images() {
    let env = CriEnv::up();
    let cloud_dir = tempfile::tempdir().unwrap();
    let edge_dir = tempfile::tempdir().unwrap();
    let mut cloud = CloudProcess::start(cloud_dir.path());
    let token = token(&cloud);
    let port = free_port();
    let mut edge = start_edge(&cloud, "edge-4", edge_dir.path(), port, Some(&token), &env);
    let manifest = format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: survivor}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: {}
    command: ["sh", "-c", "echo started; trap 'exit 0' TERM; sleep 3600 & wait"]
"#,
        env.busybox
    );
    let applied = cloud.kubectl_stdin(&["apply", "-f", "-"], &manifest);
    assert!(applied.status.success(), "{}", stderr_of(&applied));
    eventually("survivor Running", Duration::from_secs(60), || {
        get(&cloud, "survivor", ".status.phase") == "Running"
    });
    let uid = get(&cloud, "survivor", ".metadata.uid");

    // The cloud goes away, then the node "reboots": edgecore dies and the pod's sandbox and
    // containers are stopped under it (what a power cycle leaves in containerd's state).
    cloud.kill9();
    edge.kill9();
    let old = env.sandboxes_of(&uid);
    assert_eq!(old.len(), 1);
    env.rt
        .block_on(async {
            let mut runtime = env.client.runtime_service();
            runtime
                .stop_pod_sandbox(k8s_cri::v1::StopPodSandboxRequest {
                    pod_sandbox_id: old[0].id.clone(),
                })
                .await
        })
        .expect("StopPodSandbox");

    // edgecore again, offline: the pod runs again from the cache and the local image.
    let edge = start_edge(&cloud, "edge-4", edge_dir.path(), port, None, &env);
    eventually(
        "survivor running again, offline",
        Duration::from_secs(60),
        || {
            env.containers_of(&uid)
                .iter()
                .any(|c| c.state == k8s_cri::v1::ContainerState::ContainerRunning as i32)
        },
    );
    let sandboxes = env.sandboxes_of(&uid);
    assert_eq!(
        sandboxes.len(),
        1,
        "the stopped sandbox replaced, not kept beside"
    );
    assert_ne!(sandboxes[0].id, old[0].id);
    eventually("MetaServer says Running", Duration::from_secs(30), || {
        stdout(&edge.kubectl(&["get", "pod", "survivor", "-o", "jsonpath={.status.phase}"]))
            == "Running"
    });
    assert!(stdout(&edge.kubectl(&["logs", "survivor"])).contains("started"));
}

/// The runtime's images: (id, names).
fn images(env: &CriEnv) -> Vec<(String, Vec<String>)> {
    env.rt
        .block_on(async {
            env.client
                .image_service()
                .list_images(k8s_cri::v1::ListImagesRequest { filter: None })
                .await
        })
        .expect("ListImages")
        .into_inner()
        .images
        .into_iter()
        .map(|i| (i.id, i.repo_tags))
        .collect()
}

fn has_image(env: &CriEnv, name: &str) -> bool {
    images(env)
        .iter()
        .any(|(_, tags)| tags.iter().any(|t| t == name))
}

#[test]
fn unused_images_are_collected_and_the_node_lists_its_images() {
    let env = CriEnv::up();
    let extra = env.push("kedge/extra:1", "EXTRA=1");
    let cloud_dir = tempfile::tempdir().unwrap();
    let edge_dir = tempfile::tempdir().unwrap();
    let cloud = CloudProcess::start(cloud_dir.path());
    let token = token(&cloud);
    let port = free_port();
    // Collect whenever anything is used (thresholds 0 %), images older than 2 s, every second.
    let _edge = start_edge_with(
        &cloud,
        "edge-gc",
        edge_dir.path(),
        port,
        Some(&token),
        &env,
        &[
            "--image-gc-high-threshold",
            "0",
            "--image-gc-low-threshold",
            "0",
            "--image-minimum-gc-age",
            "2s",
            "--image-gc-period",
            "1s",
            "--container-log-max-size",
            "2Ki",
            "--container-log-max-files",
            "2",
        ],
    );
    let manifest = format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: keeper, labels: {{tier: edge}}}}
spec:
  terminationGracePeriodSeconds: 1
  volumes:
  - name: podinfo
    downwardAPI:
      items:
      - {{path: name, fieldRef: {{fieldPath: metadata.name}}}}
      - {{path: labels, fieldRef: {{fieldPath: metadata.labels}}}}
  - name: both
    projected:
      sources:
      - downwardAPI: {{items: [{{path: namespace, fieldRef: {{fieldPath: metadata.namespace}}}}]}}
  containers:
  - name: main
    image: {busybox}
    command: ["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]
    volumeMounts:
    - {{name: podinfo, mountPath: /etc/podinfo}}
    - {{name: both, mountPath: /etc/both}}
---
apiVersion: v1
kind: Pod
metadata: {{name: chatty}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - {{name: main, image: {busybox}, command: ["sh", "-c", "i=0; while true; do i=$((i+1)); echo line-$i; sleep 0.05; done"]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: passing}}
spec:
  restartPolicy: Never
  containers:
  - {{name: main, image: {extra}, command: ["sh", "-c", "echo $EXTRA"]}}
"#,
        busybox = env.busybox
    );
    let applied = cloud.kubectl_stdin(&["apply", "-f", "-"], &manifest);
    assert!(applied.status.success(), "{}", stderr_of(&applied));
    eventually("keeper Running", Duration::from_secs(60), || {
        get(&cloud, "keeper", ".status.phase") == "Running"
    });
    eventually("passing Succeeded", Duration::from_secs(60), || {
        get(&cloud, "passing", ".status.phase") == "Succeeded"
    });

    // kubelet's events from the runtime (pull, create) beside those from the status (start).
    eventually("keeper's events", Duration::from_secs(60), || {
        let reasons = stdout(&cloud.kubectl(&[
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=keeper",
            "-o",
            "jsonpath={.items[*].reason}",
        ]));
        let all = ["Pulling", "Pulled", "Created", "Started"]
            .iter()
            .all(|r| reasons.split_whitespace().any(|x| x == *r));
        if !all {
            eprintln!("keeper's event reasons so far: {reasons:?}");
        }
        all
    });

    // downwardAPI and projected volumes are files in the container.
    let info = cloud.kubectl(&[
        "exec",
        "keeper",
        "--",
        "cat",
        "/etc/podinfo/name",
        "/etc/podinfo/labels",
        "/etc/both/namespace",
    ]);
    assert_eq!(
        stdout(&info),
        "keepertier=\"edge\"default",
        "{}",
        stderr_of(&info)
    );

    // The node's status lists what the runtime holds, with sizes; and its disk.
    let node_images = || {
        stdout(&cloud.kubectl(&[
            "get",
            "node",
            "edge-gc",
            "-o",
            "jsonpath={.status.images[*].names}",
        ]))
    };
    eventually(
        "the Node lists both images",
        Duration::from_secs(30),
        || {
            let names = node_images();
            names.contains(&env.busybox) && names.contains(&extra)
        },
    );
    let sizes = stdout(&cloud.kubectl(&[
        "get",
        "node",
        "edge-gc",
        "-o",
        "jsonpath={.status.images[*].sizeBytes}",
    ]));
    assert!(
        sizes
            .split_whitespace()
            .all(|s| s.parse::<u64>().unwrap() > 0),
        "{sizes}"
    );
    let storage = stdout(&cloud.kubectl(&[
        "get",
        "node",
        "edge-gc",
        "-o",
        "jsonpath={.status.capacity.ephemeral-storage}",
    ]));
    assert!(storage.ends_with("Ki") && storage.len() > 3, "{storage}");

    // The finished pod's exited container still uses its image: it stays (well past 2 s).
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        has_image(&env, &extra),
        "an exited container's image is kept"
    );

    // Deleted, the image is nobody's: collected. The running pod's image and the sandbox
    // image stay whatever the thresholds say.
    let deleted = cloud.kubectl(&["delete", "pod", "passing", "--wait=true"]);
    assert!(deleted.status.success(), "{}", stderr_of(&deleted));
    eventually("the unused image removed", Duration::from_secs(30), || {
        !has_image(&env, &extra)
    });
    assert!(
        has_image(&env, &env.busybox),
        "the running pod's image is kept"
    );
    assert!(
        has_image(&env, "kedge.local/pause:1"),
        "the sandbox image is kept"
    );
    eventually(
        "the Node no longer lists it",
        Duration::from_secs(30),
        || {
            let names = node_images();
            names.contains(&env.busybox) && !names.contains(&extra)
        },
    );
    assert_eq!(get(&cloud, "keeper", ".status.phase"), "Running");

    // containerd's log of a chatty container is rotated by size and reopened
    // (ReopenContainerLog): a new current file grows, one rotated file is kept.
    let pod_dir = edge_dir.path().join("pods/default_chatty");
    let rotated = || {
        std::fs::read_dir(&pod_dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|n| n.starts_with("main.log."))
                    .count()
            })
            .unwrap_or(0)
    };
    eventually("chatty's log rotated", Duration::from_secs(40), || {
        rotated() == 1
    });
    let current = pod_dir.join("main.log");
    eventually(
        "containerd writes the new file",
        Duration::from_secs(10),
        || std::fs::metadata(&current).is_ok_and(|m| m.len() > 0),
    );
    let tail = stdout(&cloud.kubectl(&["logs", "chatty", "--tail=1"]));
    assert!(tail.starts_with("line-"), "{tail}");
}
