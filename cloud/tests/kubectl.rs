//! kubectl against the real cloudcore binary's embedded API.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::CloudProcess;

const APP: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata:
  name: web-config
  labels: {app: web}
data:
  greeting: hello
---
apiVersion: v1
kind: Pod
metadata:
  name: web-1
  labels: {app: web, tier: front}
spec:
  containers:
  - name: main
    image: busybox
    command: ["sleep", "3600"]
    env:
    - name: GREETING
      valueFrom: {configMapKeyRef: {name: web-config, key: greeting}}
    ports:
    - containerPort: 8080
---
apiVersion: v1
kind: Pod
metadata:
  name: db-1
  labels: {app: db}
spec:
  containers:
  - name: main
    image: postgres
"#;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn apply_get_select_patch_delete() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = CloudProcess::start(dir.path());

    let out = cloud.kubectl_stdin(&["apply", "-f", "-"], APP);
    assert!(out.status.success(), "apply: {}", stderr(&out));
    let applied = String::from_utf8_lossy(&out.stdout);
    assert!(applied.contains("pod/web-1 created"), "{applied}");

    // Default namespaces exist; discovery works.
    let namespaces = cloud.ok(&["get", "namespaces", "-o", "name"]);
    for ns in ["default", "kube-system", "kube-node-lease", "kube-public"] {
        assert!(
            namespaces.contains(&format!("namespace/{ns}")),
            "{namespaces}"
        );
    }
    let resources = cloud.ok(&["api-resources", "-o", "name"]);
    assert!(
        resources.contains("devices.devices.kubeedge.io"),
        "{resources}"
    );

    // Label and field selectors.
    assert_eq!(
        cloud
            .ok(&["get", "pods", "-l", "app=web", "-o", "name"])
            .trim(),
        "pod/web-1"
    );
    assert_eq!(
        cloud
            .ok(&[
                "get",
                "pods",
                "-l",
                "app in (web,db),tier!=front",
                "-o",
                "name"
            ])
            .trim(),
        "pod/db-1"
    );
    assert_eq!(
        cloud
            .ok(&[
                "get",
                "pods",
                "--field-selector",
                "metadata.name=db-1",
                "-o",
                "name"
            ])
            .trim(),
        "pod/db-1"
    );
    assert_eq!(
        cloud
            .ok(&[
                "get",
                "pods",
                "-A",
                "--field-selector",
                "status.phase=Pending,metadata.namespace=default",
                "-o",
                "name"
            ])
            .lines()
            .count(),
        2
    );
    // Paged list (kubectl pages with --chunk-size).
    assert_eq!(
        cloud
            .ok(&["get", "pods", "--chunk-size=1", "-o", "name"])
            .lines()
            .count(),
        2
    );

    // Second apply: a three-way strategic merge patch.
    let changed = APP
        .replace("greeting: hello", "greeting: bonjour")
        .replace("tier: front", "tier: back");
    let out = cloud.kubectl_stdin(&["apply", "-f", "-"], &changed);
    assert!(out.status.success(), "re-apply: {}", stderr(&out));
    assert_eq!(
        cloud.ok(&["get", "cm", "web-config", "-o", "jsonpath={.data.greeting}"]),
        "bonjour"
    );
    assert_eq!(
        cloud.ok(&[
            "get",
            "pod",
            "web-1",
            "-o",
            "jsonpath={.metadata.labels.tier}"
        ]),
        "back"
    );

    // Patches of every kind, label, annotate.
    cloud.ok(&["label", "pod", "web-1", "extra=yes"]);
    cloud.ok(&["annotate", "pod", "web-1", "note=hi"]);
    cloud.ok(&[
        "patch",
        "pod",
        "web-1",
        "--type=json",
        "-p",
        r#"[{"op":"add","path":"/metadata/labels/j","value":"1"}]"#,
    ]);
    cloud.ok(&[
        "patch",
        "pod",
        "web-1",
        "--type=merge",
        "-p",
        r#"{"metadata":{"labels":{"m":"2"}}}"#,
    ]);
    cloud.ok(&[
        "patch",
        "pod",
        "web-1",
        "-p",
        r#"{"spec":{"containers":[{"name":"main","image":"busybox:2"}]}}"#,
    ]);
    let labels = cloud.ok(&["get", "pod", "web-1", "-o", "jsonpath={.metadata.labels}"]);
    for l in ["extra", "\"j\"", "\"m\"", "tier"] {
        assert!(labels.contains(l), "{labels}");
    }
    assert_eq!(
        cloud.ok(&[
            "get",
            "pod",
            "web-1",
            "-o",
            "jsonpath={.spec.containers[0].image}"
        ]),
        "busybox:2"
    );
    assert_eq!(
        cloud.ok(&[
            "get",
            "pod",
            "web-1",
            "-o",
            "jsonpath={.metadata.annotations.note}"
        ]),
        "hi"
    );

    // The table kubectl prints.
    let table = cloud.ok(&["get", "pods"]);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table.contains("READY") && table.contains("Pending"),
        "{table}"
    );

    // Delete; the object is gone.
    cloud.ok(&["delete", "pod", "db-1"]);
    let out = cloud.kubectl(&["get", "pod", "db-1"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("NotFound"), "{}", stderr(&out));

    // Namespaces: create, use, delete with everything in them.
    let ns = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: team-a\n";
    assert!(cloud
        .kubectl_stdin(&["apply", "-f", "-"], ns)
        .status
        .success());
    let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c1\n  namespace: team-a\ndata: {a: b}\n";
    assert!(cloud
        .kubectl_stdin(&["apply", "-f", "-"], cm)
        .status
        .success());
    assert_eq!(
        cloud.ok(&["get", "cm", "-A", "-o", "name"]).lines().count(),
        2
    );
    cloud.ok(&["delete", "namespace", "team-a"]);
    assert_eq!(
        cloud.ok(&["get", "cm", "-A", "-o", "name"]).trim(),
        "configmap/web-config"
    );
    let out = cloud.kubectl_stdin(&["apply", "-f", "-"], cm);
    assert!(
        stderr(&out).contains("namespaces \"team-a\" not found"),
        "{}",
        stderr(&out)
    );

    // Metrics count the requests.
    let metrics = common::http_get(&cloud.metrics, "/metrics").expect("metrics");
    assert!(
        metrics
            .contains("kedge_api_requests_total{verb=\"create\",resource=\"pods\",code=\"201\"}"),
        "{metrics}"
    );
}

#[test]
fn invalid_input_gets_kubernetes_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = CloudProcess::start(dir.path());

    // 422 with field causes.
    let bad = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"Bad_Name"},"spec":{"containers":[{"name":"c"}]}}"#;
    let out = cloud.kubectl_stdin(&["create", "-f", "-"], bad);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("is invalid")
            && err.contains("metadata.name")
            && err.contains("spec.containers[0].image: Required value"),
        "{err}"
    );

    // 400 on a body that is not JSON (sent raw, past kubectl's own parsing).
    let garbage = dir.path().join("garbage.json");
    std::fs::write(&garbage, "{not json").unwrap();
    let out = cloud.kubectl(&[
        "create",
        "--raw",
        "/api/v1/namespaces/default/configmaps",
        "-f",
        garbage.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not valid JSON"), "{}", stderr(&out));

    // 409 on a stale resourceVersion.
    let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\ndata: {a: \"1\"}\n";
    assert!(cloud
        .kubectl_stdin(&["create", "-f", "-"], cm)
        .status
        .success());
    let current = cloud.ok(&["get", "cm", "c", "-o", "json"]);
    let mut stale: serde_json::Value = serde_json::from_str(&current).unwrap();
    cloud.ok(&["label", "cm", "c", "bump=1"]);
    stale["data"]["a"] = "2".into();
    let out = cloud.kubectl_stdin(&["replace", "-f", "-"], &stale.to_string());
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("the object has been modified"),
        "{}",
        stderr(&out)
    );

    // 409 AlreadyExists, 404 for a missing object and an unknown resource.
    let out = cloud.kubectl_stdin(&["create", "-f", "-"], cm);
    assert!(stderr(&out).contains("AlreadyExists"), "{}", stderr(&out));
    let out = cloud.kubectl(&["get", "--raw", "/api/v1/namespaces/default/nothings"]);
    assert!(!out.status.success());
    let out = cloud.kubectl(&["delete", "namespace", "kube-system"]);
    assert!(
        stderr(&out).contains("may not be deleted"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn watch_streams_changes() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = CloudProcess::start(dir.path());
    let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: w\ndata: {a: \"1\"}\n";
    assert!(cloud
        .kubectl_stdin(&["create", "-f", "-"], cm)
        .status
        .success());

    let watcher = Command::new("kubectl")
        .args([
            "--server",
            &cloud.api,
            "get",
            "cm",
            "-w",
            "-o",
            "jsonpath={.metadata.name}={.data.a}{\"\\n\"}",
            "--request-timeout=15s",
        ])
        .env("KUBECONFIG", "/dev/null")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Changes made while the watch runs; wait until it is established (first line seen).
    std::thread::sleep(Duration::from_millis(700));
    cloud.ok(&[
        "patch",
        "cm",
        "w",
        "--type=merge",
        "-p",
        r#"{"data":{"a":"2"}}"#,
    ]);
    cloud.ok(&[
        "patch",
        "cm",
        "w",
        "--type=merge",
        "-p",
        r#"{"data":{"a":"3"}}"#,
    ]);
    cloud.ok(&["delete", "cm", "w"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let pid = watcher.id() as i32;
    // kubectl -w runs until its request timeout; stop it once the deletes could have arrived.
    std::thread::sleep(Duration::from_secs(2));
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let out = watcher.wait_with_output().unwrap();
    assert!(Instant::now() < deadline);
    let lines = String::from_utf8_lossy(&out.stdout);
    let seen: Vec<&str> = lines.lines().collect();
    assert!(
        seen.starts_with(&["w=1", "w=2", "w=3"]),
        "{seen:?} / {}",
        stderr(&out)
    );
}

#[test]
fn survives_kill_9_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut cloud = CloudProcess::start(dir.path());
    for i in 0..20 {
        let cm = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c{i}\ndata: {{i: \"{i}\"}}\n"
        );
        assert!(cloud
            .kubectl_stdin(&["create", "-f", "-"], &cm)
            .status
            .success());
    }
    let rv_before: u64 = cloud
        .ok(&[
            "get",
            "cm",
            "c19",
            "-o",
            "jsonpath={.metadata.resourceVersion}",
        ])
        .parse()
        .unwrap();
    cloud.kill9();

    let cloud = CloudProcess::start(dir.path());
    assert_eq!(cloud.ok(&["get", "cm", "-o", "name"]).lines().count(), 20);
    assert_eq!(
        cloud.ok(&["get", "cm", "c7", "-o", "jsonpath={.data.i}"]),
        "7"
    );
    cloud.ok(&["label", "cm", "c19", "after=restart"]);
    let rv_after: u64 = cloud
        .ok(&[
            "get",
            "cm",
            "c19",
            "-o",
            "jsonpath={.metadata.resourceVersion}",
        ])
        .parse()
        .unwrap();
    assert!(
        rv_after > rv_before,
        "resourceVersions keep increasing across restarts"
    );

    // SIGTERM: a clean exit with status 0.
    let mut cloud = cloud;
    unsafe { libc::kill(cloud.child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = cloud.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "no exit within 20 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
}

#[test]
fn clear_errors_for_bad_flags_busy_ports_and_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_cloudcore");

    let out = Command::new(bin).arg("--no-such-flag").output().unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--no-such-flag"), "{}", stderr(&out));

    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let out = Command::new(bin)
        .args([
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--api-listen",
            &format!("127.0.0.1:{port}"),
        ])
        .args([
            "--metrics-listen",
            &format!("127.0.0.1:{}", common::free_port()),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{}",
        stderr(&out)
    );

    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let out = Command::new(bin)
        .args([
            "--data-dir",
            file.to_str().unwrap(),
            "--api-listen",
            &format!("127.0.0.1:{}", common::free_port()),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("data dir"), "{}", stderr(&out));

    let out = Command::new(bin)
        .args([
            "token",
            "create",
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--ttl",
            "2h",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let token = stdout.lines().last().unwrap();
    let parsed = cloud::pki::Token::parse(token).expect("the last line is a token");
    cloud::pki::verify_token(dir.path(), &parsed).unwrap();
}

#[test]
fn imperative_create_commands_send_protobuf_and_work() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = CloudProcess::start(dir.path());
    cloud.ok(&["create", "namespace", "team-b"]);
    cloud.ok(&[
        "-n",
        "team-b",
        "create",
        "configmap",
        "c1",
        "--from-literal=a=b",
        "--from-literal=x=y",
    ]);
    cloud.ok(&[
        "-n",
        "team-b",
        "create",
        "secret",
        "generic",
        "s1",
        "--from-literal=pw=hunter2",
    ]);
    cloud.ok(&[
        "-n",
        "team-b",
        "create",
        "service",
        "clusterip",
        "web",
        "--tcp=80:8080",
    ]);
    cloud.ok(&[
        "-n",
        "team-b",
        "run",
        "p1",
        "--image=busybox",
        "--",
        "sleep",
        "60",
    ]);
    assert_eq!(
        cloud.ok(&[
            "-n",
            "team-b",
            "get",
            "cm",
            "c1",
            "-o",
            "jsonpath={.data.x}"
        ]),
        "y"
    );
    // "hunter2", base64-encoded as Secret data is.
    assert_eq!(
        cloud.ok(&[
            "-n",
            "team-b",
            "get",
            "secret",
            "s1",
            "-o",
            "jsonpath={.data.pw}"
        ]),
        "aHVudGVyMg=="
    );
    assert_eq!(
        cloud.ok(&[
            "-n",
            "team-b",
            "get",
            "svc",
            "web",
            "-o",
            "jsonpath={.spec.ports[0].port}/{.spec.ports[0].targetPort}"
        ]),
        "80/8080"
    );
    assert_eq!(
        cloud.ok(&[
            "-n",
            "team-b",
            "get",
            "pod",
            "p1",
            "-o",
            "jsonpath={.spec.containers[0].args}"
        ]),
        r#"["sleep","60"]"#
    );
}

/// Polls `check` every 100 ms for at most `within`; panics naming `what` on timeout.
fn eventually(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < within,
            "timed out after {within:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn names(cloud: &CloudProcess, args: &[&str]) -> Vec<String> {
    let mut all = vec!["get"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["-o", "jsonpath={.items[*].metadata.name}"]);
    cloud
        .ok(&all)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// The embedded API serves apps/v1 workloads: `kubectl create deployment` (protobuf), the
/// defaults, `kubectl scale` through the scale subresource, ReplicaSets and pods made by the
/// controllers, `kubectl rollout history|undo`, a selector that does not match the template
/// refused with 422, and deletion cascading in the background or orphaning. No edge node runs
/// here, so pods stay Pending (readiness is covered by edge/tests/workloads.rs).
#[test]
fn auth_reviews_service_accounts_and_the_kubernetes_service() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = CloudProcess::start(dir.path());
    // kubectl auth: the one identity may do what the embedded API serves.
    assert_eq!(
        cloud.ok(&["auth", "can-i", "create", "deployments"]).trim(),
        "yes"
    );
    assert_eq!(
        cloud
            .ok(&["auth", "can-i", "delete", "pods", "-n", "kube-system"])
            .trim(),
        "yes"
    );
    let unknown = cloud.kubectl(&["auth", "can-i", "get", "widgets.example.com"]);
    assert_eq!(
        String::from_utf8_lossy(&unknown.stdout).trim(),
        "no - the server does not serve widgets.example.com",
        "{}",
        stderr(&unknown)
    );
    let list = cloud.ok(&["auth", "can-i", "--list"]);
    assert!(
        list.contains("pods") && list.contains("deployments.apps"),
        "{list}"
    );
    let me = cloud.ok(&["auth", "whoami"]);
    assert!(me.contains("kedge-admin"), "{me}");

    // Every namespace has its default ServiceAccount, new ones too.
    eventually("default/default", Duration::from_secs(20), || {
        cloud.kubectl(&["get", "sa", "default"]).status.success()
    });
    cloud.ok(&["create", "namespace", "team-a"]);
    eventually("team-a/default", Duration::from_secs(20), || {
        cloud
            .kubectl(&["get", "sa", "default", "-n", "team-a"])
            .status
            .success()
    });

    // The kubernetes Service names the API.
    let ip = cloud.ok(&[
        "get",
        "svc",
        "kubernetes",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ]);
    assert_eq!(ip, "10.96.0.1");
    let port = cloud.ok(&[
        "get",
        "endpoints",
        "kubernetes",
        "-o",
        "jsonpath={.subsets[0].ports[0].port}",
    ]);
    assert!(
        cloud.api.ends_with(&format!(":{port}")),
        "{port} vs {}",
        cloud.api
    );
}

#[test]
fn deployments_scale_roll_back_and_cascade() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = CloudProcess::start(dir.path());
    let resources = cloud.ok(&["api-resources", "--api-group=apps"]);
    for short in ["deploy", "rs", "ds"] {
        assert!(resources.contains(short), "{resources}");
    }
    // The `all` category includes the workloads.
    cloud.ok(&["get", "all"]);

    cloud.ok(&["create", "deployment", "web", "--image=nginx"]);
    assert_eq!(
        cloud.ok(&[
            "get",
            "deploy",
            "web",
            "-o",
            "jsonpath={.spec.replicas} {.spec.strategy.rollingUpdate.maxSurge} \
             {.spec.revisionHistoryLimit} {.metadata.generation}"
        ]),
        "1 25% 10 1"
    );
    eventually(
        "one ReplicaSet and its pod",
        Duration::from_secs(20),
        || {
            names(&cloud, &["rs", "-l", "app=web"]).len() == 1
                && names(&cloud, &["pods", "-l", "app=web"]).len() == 1
        },
    );
    let rs = names(&cloud, &["rs", "-l", "app=web"]).remove(0);
    let hash = cloud.ok(&[
        "get",
        "rs",
        &rs,
        "-o",
        "jsonpath={.metadata.labels.pod-template-hash}",
    ]);
    assert_eq!(rs, format!("web-{hash}"));
    let pod = names(&cloud, &["pods", "-l", "app=web"]).remove(0);
    assert!(
        pod.starts_with(&format!("{rs}-")) && pod.len() == rs.len() + 6,
        "{pod}"
    );
    assert_eq!(
        cloud.ok(&[
            "get",
            "pod",
            &pod,
            "-o",
            "jsonpath={.metadata.ownerReferences[0].kind}/{.metadata.ownerReferences[0].name}"
        ]),
        format!("ReplicaSet/{rs}")
    );

    // kubectl scale goes through /scale.
    let out = cloud.ok(&["scale", "deployment", "web", "--replicas=3"]);
    assert!(out.contains("scaled"), "{out}");
    assert_eq!(
        cloud.ok(&[
            "get",
            "deploy",
            "web",
            "-o",
            "jsonpath={.metadata.generation}"
        ]),
        "2"
    );
    eventually("three pods", Duration::from_secs(20), || {
        names(&cloud, &["pods", "-l", "app=web"]).len() == 3
    });
    let table = cloud.ok(&["get", "deploy", "web"]);
    assert!(
        table.contains("READY") && table.contains("UP-TO-DATE") && table.contains("0/3"),
        "{table}"
    );
    // What happened, as `kubectl describe` shows it: the controllers' and the scheduler's
    // Events on each object (no edge node here, so the pods cannot be scheduled).
    let scaled = format!("Scaled up replica set {rs} from 1 to 3");
    eventually("the Deployment's events", Duration::from_secs(20), || {
        let described = cloud.ok(&["describe", "deployment", "web"]);
        described.contains("ScalingReplicaSet") && described.contains(&scaled)
    });
    eventually("the ReplicaSet's events", Duration::from_secs(20), || {
        let described = cloud.ok(&["describe", "rs", &rs]);
        described.contains("SuccessfulCreate") && described.contains(&format!("Created pod: {pod}"))
    });
    eventually("the pod's events", Duration::from_secs(20), || {
        cloud
            .ok(&["describe", "pod", &pod])
            .contains("FailedScheduling")
    });
    let events = cloud.ok(&[
        "get",
        "events",
        "--field-selector",
        "reason=ScalingReplicaSet",
    ]);
    assert!(events.contains("ScalingReplicaSet"), "{events}");

    // A new template: a second ReplicaSet at revision 2; undo goes back to the first one.
    cloud.ok(&["set", "image", "deployment/web", "nginx=nginx:2"]);
    eventually("two ReplicaSets", Duration::from_secs(20), || {
        names(&cloud, &["rs", "-l", "app=web"]).len() == 2
    });
    let history = cloud.ok(&["rollout", "history", "deployment/web"]);
    assert!(
        history.contains("1 ") && history.contains("2 "),
        "{history}"
    );
    cloud.ok(&["rollout", "undo", "deployment/web"]);
    eventually(
        "the first ReplicaSet is revision 3",
        Duration::from_secs(20),
        || {
            cloud.ok(&[
                "get",
                "rs",
                &rs,
                "-o",
                "jsonpath={.metadata.annotations.deployment\\.kubernetes\\.io/revision}",
            ]) == "3"
        },
    );
    assert_eq!(names(&cloud, &["rs", "-l", "app=web"]).len(), 2);
    assert_eq!(
        cloud.ok(&[
            "get",
            "deploy",
            "web",
            "-o",
            "jsonpath={.spec.template.spec.containers[0].image}"
        ]),
        "nginx"
    );

    // Paused, a template change makes no ReplicaSet; resumed, it does; a restart makes another.
    cloud.ok(&["rollout", "pause", "deployment/web"]);
    cloud.ok(&["set", "env", "deployment/web", "MODE=paused"]);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(names(&cloud, &["rs", "-l", "app=web"]).len(), 2);
    assert_eq!(
        cloud.ok(&[
            "get",
            "deploy",
            "web",
            "-o",
            "jsonpath={.status.conditions[?(@.type=='Progressing')].reason}"
        ]),
        "DeploymentPaused"
    );
    cloud.ok(&["rollout", "resume", "deployment/web"]);
    eventually("a third ReplicaSet", Duration::from_secs(20), || {
        names(&cloud, &["rs", "-l", "app=web"]).len() == 3
    });
    cloud.ok(&["rollout", "restart", "deployment/web"]);
    eventually("a fourth ReplicaSet", Duration::from_secs(20), || {
        names(&cloud, &["rs", "-l", "app=web"]).len() == 4
    });
    // `--current-replicas` makes kubectl GET and PUT the Scale (a precondition).
    let out = cloud.kubectl(&[
        "scale",
        "deployment/web",
        "--current-replicas=2",
        "--replicas=4",
    ]);
    assert!(!out.status.success(), "3 replicas, not 2");
    cloud.ok(&[
        "scale",
        "deployment/web",
        "--current-replicas=3",
        "--replicas=4",
    ]);
    assert_eq!(
        cloud.ok(&["get", "deploy", "web", "-o", "jsonpath={.spec.replicas}"]),
        "4"
    );
    let described = cloud.ok(&["describe", "deployment", "web"]);
    assert!(
        described.contains("RollingUpdateStrategy:  25% max unavailable, 25% max surge"),
        "{described}"
    );

    // The selector must select the template's labels.
    let bad = r#"{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "bad"},
        "spec": {"selector": {"matchLabels": {"app": "x"}},
                 "template": {"metadata": {"labels": {"app": "other"}},
                              "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}}"#;
    let out = cloud.kubectl_stdin(&["create", "-f", "-"], bad);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("`selector` does not match template `labels`"),
        "{}",
        stderr(&out)
    );

    // Background cascade: the ReplicaSets and their pods go with the Deployment.
    cloud.ok(&["delete", "deployment", "web"]);
    eventually(
        "ReplicaSets and pods collected",
        Duration::from_secs(20),
        || {
            names(&cloud, &["rs", "-l", "app=web"]).is_empty()
                && names(&cloud, &["pods", "-l", "app=web"]).is_empty()
        },
    );

    // Orphan: the ReplicaSet stays, without its owner; its pods stay with theirs.
    cloud.ok(&[
        "create",
        "deployment",
        "keep",
        "--image=busybox",
        "--replicas=2",
    ]);
    eventually("keep's pods", Duration::from_secs(20), || {
        names(&cloud, &["pods", "-l", "app=keep"]).len() == 2
    });
    cloud.ok(&["delete", "deployment", "keep", "--cascade=orphan"]);
    let out = cloud.kubectl(&["get", "deployment", "keep"]);
    assert!(!out.status.success(), "the Deployment is gone");
    let orphans = names(&cloud, &["rs", "-l", "app=keep"]);
    assert_eq!(orphans.len(), 1);
    assert_eq!(
        cloud.ok(&[
            "get",
            "rs",
            &orphans[0],
            "-o",
            "jsonpath={.metadata.ownerReferences}"
        ]),
        "",
        "no owner left: no ownerReferences field (not `[]`)"
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(names(&cloud, &["pods", "-l", "app=keep"]).len(), 2);
    // The orphaned ReplicaSet still works (scale through /scale).
    cloud.ok(&["scale", "rs", &orphans[0], "--replicas=1"]);
    eventually("the orphan scaled down", Duration::from_secs(20), || {
        names(&cloud, &["pods", "-l", "app=keep"]).len() == 1
    });
    // The same Deployment applied again adopts its ReplicaSet rather than making another.
    cloud.ok(&[
        "create",
        "deployment",
        "keep",
        "--image=busybox",
        "--replicas=1",
    ]);
    eventually("the ReplicaSet adopted", Duration::from_secs(20), || {
        // Not `ok`: until the adoption, the list is empty and the jsonpath index fails.
        String::from_utf8_lossy(
            &cloud
                .kubectl(&[
                    "get",
                    "rs",
                    &orphans[0],
                    "-o",
                    "jsonpath={.metadata.ownerReferences[*].kind}",
                ])
                .stdout,
        ) == "Deployment"
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(names(&cloud, &["rs", "-l", "app=keep"]), orphans);
    assert_eq!(names(&cloud, &["pods", "-l", "app=keep"]).len(), 1);

    // Foreground: the ReplicaSet is deleted before the Deployment is (kubectl waits for it).
    cloud.ok(&["create", "deployment", "fg", "--image=busybox"]);
    eventually("fg's pod", Duration::from_secs(20), || {
        names(&cloud, &["pods", "-l", "app=fg"]).len() == 1
    });
    cloud.ok(&[
        "delete",
        "deployment",
        "fg",
        "--cascade=foreground",
        "--timeout=20s",
    ]);
    assert!(names(&cloud, &["rs", "-l", "app=fg"]).is_empty());
    eventually("fg's pod collected", Duration::from_secs(20), || {
        names(&cloud, &["pods", "-l", "app=fg"]).is_empty()
    });
}

/// Pods of namespace `zz` bound to a node that never connects, so that no controller writes
/// them (the scheduler leaves bound pods alone; deletes are immediate).
fn parked_pods(names: &[&str], tier: &str) -> String {
    names
        .iter()
        .map(|name| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: zz, labels: \
                 {{tier: {tier}}}}}\nspec:\n  nodeName: parked\n  containers:\n  - {{name: c, \
                 image: busybox, command: [sleep, \"3600\"]}}\n---\n"
            )
        })
        .collect()
}

#[test]
fn watch_list_sends_every_current_object_then_the_end_bookmark_and_checks_its_options() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = CloudProcess::start(dir.path());
    let addr = cloud.api.replace("http://", "");
    cloud.ok(&["create", "namespace", "zz"]);
    assert!(cloud
        .kubectl_stdin(&["apply", "-f", "-"], &parked_pods(&["a", "b", "c"], "a"))
        .status
        .success());
    // (kubectl's `-o jsonpath` on a list does not show the list's own metadata.)
    let (_, list) = common::http_call(&addr, "GET", "/api/v1/namespaces/zz/pods", "");
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    let list_rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(list_rv.parse::<u64>().unwrap() > 1);
    cloud.ok(&["label", "pod", "c", "-n", "zz", "x=y"]);
    // The report's input: a list's version (and an older one, and none) with NotOlderThan.
    for rv in [list_rv.as_str(), "1", ""] {
        let mut watch = common::RawWatch::open(
            &addr,
            &format!(
                "/api/v1/namespaces/zz/pods?watch=1&sendInitialEvents=true\
                 &resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true&resourceVersion={rv}"
            ),
        );
        assert_eq!(watch.status, 200);
        let events = watch.until("BOOKMARK", "", Duration::from_secs(10));
        assert_eq!(
            common::event_summary(&events),
            [
                ("ADDED", "a"),
                ("ADDED", "b"),
                ("ADDED", "c"),
                ("BOOKMARK", "")
            ]
            .map(|(t, n)| (t.to_owned(), n.to_owned())),
            "resourceVersion={rv:?}"
        );
        assert_eq!(
            events[3]["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
            "true"
        );
        assert_eq!(events[2]["object"]["metadata"]["labels"]["x"], "y");
    }

    // Invalid combinations: 422 Status objects, worded as kube-apiserver's.
    for (query, message) in [
        (
            "watch=1&sendInitialEvents=true",
            "resourceVersionMatch: Forbidden: sendInitialEvents requires setting \
             resourceVersionMatch to NotOlderThan",
        ),
        (
            "watch=1&resourceVersionMatch=NotOlderThan&resourceVersion=1",
            "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden for watch \
             unless sendInitialEvents is provided",
        ),
        (
            "sendInitialEvents=true",
            "sendInitialEvents: Forbidden: sendInitialEvents is forbidden for list",
        ),
    ] {
        let (status, body) = common::http_call(
            &addr,
            "GET",
            &format!("/api/v1/namespaces/zz/pods?{query}"),
            "",
        );
        assert_eq!(status, 422, "{query}: {body}");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["kind"], "Status");
        assert_eq!(body["reason"], "Invalid");
        assert_eq!(
            body["message"],
            format!("ListOptions.meta.k8s.io \"\" is invalid: {message}")
        );
    }
    // kubectl shows the apiserver's message for a list with sendInitialEvents.
    let out = cloud.kubectl(&[
        "get",
        "--raw",
        "/api/v1/namespaces/zz/pods?sendInitialEvents=true",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("sendInitialEvents is forbidden for list"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn filtered_watches_see_pods_enter_and_leave_their_selector() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = CloudProcess::start(dir.path());
    let addr = cloud.api.replace("http://", "");
    cloud.ok(&["create", "namespace", "zz"]);
    assert!(cloud
        .kubectl_stdin(&["apply", "-f", "-"], &parked_pods(&["p"], "a"))
        .status
        .success());
    let mut watch = common::RawWatch::open(
        &addr,
        "/api/v1/namespaces/zz/pods?watch=1&labelSelector=tier%3Da",
    );
    assert_eq!(
        common::event_summary(&watch.until("ADDED", "p", Duration::from_secs(10))),
        [("ADDED".to_owned(), "p".to_owned())]
    );
    cloud.ok(&["label", "pod", "p", "-n", "zz", "tier=b", "--overwrite"]);
    let to_b = cloud.ok(&[
        "get",
        "pod",
        "p",
        "-n",
        "zz",
        "-o",
        "jsonpath={.metadata.resourceVersion}",
    ]);
    let deleted = watch.until("DELETED", "p", Duration::from_secs(10));
    assert_eq!(
        common::event_summary(&deleted),
        [("DELETED".to_owned(), "p".to_owned())]
    );
    // kube-apiserver's shape: the object as it last matched, at the change's version.
    assert_eq!(deleted[0]["object"]["metadata"]["labels"]["tier"], "a");
    assert_eq!(deleted[0]["object"]["metadata"]["resourceVersion"], to_b);
    cloud.ok(&["label", "pod", "p", "-n", "zz", "tier=a", "--overwrite"]);
    let added = watch.until("ADDED", "p", Duration::from_secs(10));
    assert_eq!(
        common::event_summary(&added),
        [("ADDED".to_owned(), "p".to_owned())]
    );
    assert_eq!(added[0]["object"]["metadata"]["labels"]["tier"], "a");

    // kubectl's own filtered watch sees the same.
    let watcher = Command::new("kubectl")
        .args([
            "--server",
            &cloud.api,
            "get",
            "pods",
            "-n",
            "zz",
            "-l",
            "tier=a",
            "-w",
            "--output-watch-events",
            "--request-timeout=15s",
        ])
        .env("KUBECONFIG", "/dev/null")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    cloud.ok(&["label", "pod", "p", "-n", "zz", "tier=b", "--overwrite"]);
    cloud.ok(&["label", "pod", "p", "-n", "zz", "tier=a", "--overwrite"]);
    std::thread::sleep(Duration::from_secs(2));
    unsafe { libc::kill(watcher.id() as i32, libc::SIGTERM) };
    let out = watcher.wait_with_output().unwrap();
    // Rows are `EVENT NAME READY STATUS ...`, after a header.
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with("EVENT"))
        .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(
        lines,
        ["ADDED p", "DELETED p", "ADDED p"],
        "{}",
        stderr(&out)
    );
}

/// `kubectl get -o yaml > f; kubectl create -f f`: the file is a `kind: List`, which kubectl
/// validates on the client against `/openapi/v2` (protobuf) before sending its items.
#[test]
fn a_list_exported_with_get_is_created_again() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = CloudProcess::start(dir.path());
    cloud.ok(&["create", "configmap", "one", "--from-literal=a=1"]);
    cloud.ok(&["create", "configmap", "two", "--from-literal=b=2"]);
    let exported = cloud.ok(&["get", "configmaps", "one", "two", "-o", "yaml"]);
    assert!(exported.contains("kind: List"), "{exported}");
    cloud.ok(&["delete", "configmap", "one", "two"]);
    let out = cloud.kubectl_stdin(&["create", "-f", "-"], &exported);
    assert!(out.status.success(), "{}", stderr(&out));
    let names = cloud.ok(&["get", "configmaps", "-o", "name"]);
    assert!(
        names.contains("configmap/one") && names.contains("configmap/two"),
        "{names}"
    );
}
