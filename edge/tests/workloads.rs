//! Deployments and DaemonSets end to end: the real cloudcore with its controllers, real
//! edgecores running the pods as processes (the `process` runtime runs a container's
//! `command`; the image is only a name), real kubectl.

mod support;

use std::time::Duration;

use support::*;

const CLOUD_FAST: &[&str] = &["--link-keepalive", "1s", "--node-grace", "4s"];
/// Edge nodes that beat every second, so that CLOUD_FAST's grace judges them (the cloud
/// never judges a node sooner than its Lease, four of its heartbeats).
const EDGE_FAST: [&str; 4] = ["--mqtt-listen", "127.0.0.1:0", "--lease-period", "1s"];

fn start_edge(
    cloud: &CloudProcess,
    node: &str,
    dir: &std::path::Path,
    port: u16,
    token: Option<&str>,
) -> EdgeProcess {
    EdgeProcess::start_with(cloud, node, dir, port, token, &EDGE_FAST.map(String::from))
}

const DEPLOYMENT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  strategy: {rollingUpdate: {maxSurge: 1, maxUnavailable: 0}}
  template:
    metadata: {labels: {app: web}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - {name: main, image: "busybox:1", command: [sleep, "1000"]}
"#;

const DAEMONSET: &str = r#"
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: agent}
spec:
  selector: {matchLabels: {app: agent}}
  template:
    metadata: {labels: {app: agent}}
    spec:
      nodeSelector: {kedge.io/agent: "yes"}
      terminationGracePeriodSeconds: 1
      containers:
      - {name: main, image: busybox, command: [sleep, "1000"]}
"#;

fn ok(cloud: &CloudProcess, args: &[&str]) -> String {
    cloud.ok(args)
}

/// `kubectl rollout status` to completion (bounded by its own timeout).
fn rollout_status(cloud: &CloudProcess, what: &str) {
    let out = cloud.kubectl(&["rollout", "status", what, "--timeout=90s"]);
    assert!(
        out.status.success(),
        "rollout status {what}: {}{}",
        stdout(&out),
        stderr_of(&out)
    );
    // A StatefulSet with the default `partition: 0` reads "partitioned roll out complete" in
    // kubectl, as against kube-apiserver.
    assert!(
        stdout(&out).contains("successfully rolled out")
            || stdout(&out).contains("partitioned roll out complete:"),
        "{}",
        stdout(&out)
    );
}

/// `(name, node, phase, image)` of the pods with `selector`, sorted.
fn pods(cloud: &CloudProcess, selector: &str) -> Vec<(String, String, String, String)> {
    let out = ok(
        cloud,
        &[
            "get",
            "pods",
            "-l",
            selector,
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.spec.nodeName} {.status.phase} \
             {.spec.containers[0].image}{\"\\n\"}{end}",
        ],
    );
    let mut list: Vec<_> = out
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 4).then(|| (f[0].into(), f[1].into(), f[2].into(), f[3].into()))
        })
        .collect();
    list.sort();
    list
}

/// `kubectl set image WHAT main=busybox:2`, then waits until the rollout is done and the three
/// pods with `selector` all run `busybox:2`.
fn roll_to_busybox2(cloud: &CloudProcess, what: &str, selector: &str) {
    ok(cloud, &["set", "image", what, "main=busybox:2"]);
    rollout_status(cloud, what);
    eventually(
        &format!("{what}: only busybox:2 pods"),
        Duration::from_secs(30),
        || {
            let p = pods(cloud, selector);
            p.len() == 3 && p.iter().all(|p| p.3 == "busybox:2" && p.2 == "Running")
        },
    );
}

/// The nodes running the DaemonSet's pods, sorted.
fn agent_nodes(cloud: &CloudProcess) -> Vec<String> {
    let mut nodes: Vec<String> = pods(cloud, "app=agent").into_iter().map(|p| p.1).collect();
    nodes.sort();
    nodes
}

fn wait_ready(cloud: &CloudProcess, node: &str) {
    eventually(&format!("{node} Ready"), Duration::from_secs(30), || {
        ok(
            cloud,
            &[
                "get",
                "node",
                node,
                "-o",
                "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
            ],
        ) == "True"
    });
}

#[test]
fn deployments_and_daemonsets_run_on_edge_nodes() {
    let cloud_dir = tempfile::tempdir().unwrap();
    let cloud = CloudProcess::start_with(
        cloud_dir.path(),
        free_port(),
        free_port(),
        free_port(),
        CLOUD_FAST,
    );
    let token = token(&cloud);
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let _edge1 = start_edge(&cloud, "edge-1", dirs[0].path(), free_port(), Some(&token));
    let mut edge2 = start_edge(&cloud, "edge-2", dirs[1].path(), free_port(), Some(&token));
    wait_ready(&cloud, "edge-1");
    wait_ready(&cloud, "edge-2");
    for node in ["edge-1", "edge-2"] {
        ok(&cloud, &["label", "node", node, "kedge.io/agent=yes"]);
    }

    // A Deployment rolls out to Running, Ready pods.
    assert!(cloud
        .kubectl_stdin(&["apply", "-f", "-"], DEPLOYMENT)
        .status
        .success());
    rollout_status(&cloud, "deployment/web");
    ok(&cloud, &["scale", "deployment", "web", "--replicas=3"]);
    rollout_status(&cloud, "deployment/web");
    let running = pods(&cloud, "app=web");
    assert_eq!(running.len(), 3, "{running:?}");
    assert!(running.iter().all(|p| p.2 == "Running"), "{running:?}");
    let table = ok(&cloud, &["get", "deployment", "web"]);
    assert!(table.contains("3/3"), "{table}");

    // A new image rolls (one surge pod at a time, none unavailable), then back.
    roll_to_busybox2(&cloud, "deployment/web", "app=web");
    let history = ok(&cloud, &["rollout", "history", "deployment/web"]);
    assert!(history.contains("2 "), "{history}");
    ok(&cloud, &["rollout", "undo", "deployment/web"]);
    rollout_status(&cloud, "deployment/web");
    eventually("busybox:1 pods again", Duration::from_secs(30), || {
        let p = pods(&cloud, "app=web");
        p.len() == 3 && p.iter().all(|p| p.3 == "busybox:1")
    });
    assert_eq!(
        ok(
            &cloud,
            &[
                "get",
                "deployment",
                "web",
                "-o",
                "jsonpath={.metadata.annotations.deployment\\.kubernetes\\.io/revision}"
            ]
        ),
        "3"
    );

    // A DaemonSet: one pod per labelled node; a node joining later gets its own.
    assert!(cloud
        .kubectl_stdin(&["apply", "-f", "-"], DAEMONSET)
        .status
        .success());
    rollout_status(&cloud, "daemonset/agent");
    assert_eq!(agent_nodes(&cloud), ["edge-1", "edge-2"]);
    let _edge3 = start_edge(&cloud, "edge-3", dirs[2].path(), free_port(), Some(&token));
    wait_ready(&cloud, "edge-3");
    ok(&cloud, &["label", "node", "edge-3", "kedge.io/agent=yes"]);
    eventually("edge-3 runs its agent", Duration::from_secs(30), || {
        pods(&cloud, "app=agent")
            .iter()
            .any(|p| p.1 == "edge-3" && p.2 == "Running")
    });
    rollout_status(&cloud, "daemonset/agent");
    assert_eq!(
        ok(
            &cloud,
            &[
                "get",
                "ds",
                "agent",
                "-o",
                "jsonpath={.status.desiredNumberScheduled}"
            ]
        ),
        "3"
    );
    // A new template replaces the agents node by node (maxUnavailable 1).
    roll_to_busybox2(&cloud, "daemonset/agent", "app=agent");
    // Its history is kept in ControllerRevisions: rollout history lists both templates, and
    // undo goes back to the first (renumbered 3), node by node.
    eventually("two DaemonSet revisions", Duration::from_secs(20), || {
        let history = ok(&cloud, &["rollout", "history", "daemonset/agent"]);
        history.lines().any(|l| l.starts_with("1 ")) && history.lines().any(|l| l.starts_with("2 "))
    });
    let revision2 = ok(
        &cloud,
        &["rollout", "history", "daemonset/agent", "--revision=2"],
    );
    assert!(revision2.contains("busybox:2"), "{revision2}");
    ok(&cloud, &["rollout", "undo", "daemonset/agent"]);
    rollout_status(&cloud, "daemonset/agent");
    eventually("busybox agents again", Duration::from_secs(30), || {
        let p = pods(&cloud, "app=agent");
        p.len() == 3 && p.iter().all(|p| p.3 == "busybox" && p.2 == "Running")
    });
    eventually("revision 1 renumbered 3", Duration::from_secs(20), || {
        let history = ok(&cloud, &["rollout", "history", "daemonset/agent"]);
        let numbers: Vec<&str> = history
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.parse::<u32>().is_ok())
            .collect();
        numbers == ["2", "3"]
    });
    roll_to_busybox2(&cloud, "daemonset/agent", "app=agent");
    // A node losing the label loses its pod.
    ok(&cloud, &["label", "node", "edge-3", "kedge.io/agent-"]);
    eventually("edge-3's agent removed", Duration::from_secs(30), || {
        agent_nodes(&cloud) == ["edge-1", "edge-2"]
    });

    // kubectl drain: edge-3 is cordoned and its Deployment pods move to the other nodes (drain
    // deletes them with protobuf DeleteOptions); none comes back while it is cordoned.
    let out = cloud.kubectl(&["drain", "edge-3", "--ignore-daemonsets", "--timeout=60s"]);
    assert!(out.status.success(), "drain: {}", stderr_of(&out));
    assert!(ok(&cloud, &["get", "node", "edge-3"]).contains("SchedulingDisabled"));
    eventually(
        "web away from edge-3, all Running",
        Duration::from_secs(40),
        || {
            let web = pods(&cloud, "app=web");
            !web.is_empty() && web.iter().all(|p| p.1 != "edge-3" && p.2 == "Running")
        },
    );
    ok(&cloud, &["uncordon", "edge-3"]);

    // Edge autonomy: edge-2 goes offline; its pods are not replaced elsewhere.
    let before = pods(&cloud, "app=web");
    edge2.kill9();
    eventually("edge-2 NotReady", Duration::from_secs(30), || {
        ok(
            &cloud,
            &[
                "get",
                "node",
                "edge-2",
                "-o",
                "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
            ],
        ) != "True"
    });
    std::thread::sleep(Duration::from_secs(3));
    let after = pods(&cloud, "app=web");
    let names = |p: &[(String, String, String, String)]| -> Vec<String> {
        p.iter().map(|p| p.0.clone()).collect()
    };
    assert_eq!(
        names(&after),
        names(&before),
        "pods on the offline node were replaced"
    );

    // Deleting cascades: background for the Deployment, orphan for the DaemonSet.
    ok(
        &cloud,
        &["delete", "daemonset", "agent", "--cascade=orphan"],
    );
    assert_eq!(pods(&cloud, "app=agent").len(), 2);
    ok(&cloud, &["delete", "deployment", "web", "--wait=false"]);
    eventually(
        "the ReplicaSets are collected",
        Duration::from_secs(30),
        || ok(&cloud, &["get", "rs", "-l", "app=web", "-o", "name"]).is_empty(),
    );
    // Those on connected nodes after their node stopped them; the offline node's at once (it
    // learns of the deletion when it reconnects).
    eventually("the web pods are gone", Duration::from_secs(30), || {
        pods(&cloud, "app=web").is_empty()
    });
    assert_eq!(pods(&cloud, "app=agent").len(), 2, "orphaned pods stay");
}

const FAILING_JOB: &str = r#"
apiVersion: batch/v1
kind: Job
metadata: {name: fails}
spec:
  backoffLimit: 1
  template:
    spec:
      restartPolicy: Never
      terminationGracePeriodSeconds: 1
      containers:
      - {name: main, image: busybox, command: [sh, -c, "exit 3"]}
"#;

/// `kubectl wait --for=condition=<condition>` on `what`, bounded by its own timeout.
fn wait_for(cloud: &CloudProcess, condition: &str, what: &str) {
    let out = cloud.kubectl(&[
        "wait",
        &format!("--for=condition={condition}"),
        what,
        "--timeout=60s",
    ]);
    assert!(
        out.status.success(),
        "wait {condition} {what}: {}{}",
        stdout(&out),
        stderr_of(&out)
    );
}

#[test]
fn jobs_and_cronjobs_run_to_completion_on_an_edge_node() {
    let OneNode {
        _edge,
        cloud,
        _dirs,
    } = one_node();

    // kubectl's own Job: runs once, completes, its output is in `kubectl logs job/…`.
    ok(
        &cloud,
        &[
            "create",
            "job",
            "hello",
            "--image=busybox",
            "--",
            "sh",
            "-c",
            "echo hello from a job",
        ],
    );
    wait_for(&cloud, "complete", "job/hello");
    let logs = ok(&cloud, &["logs", "job/hello"]);
    assert!(logs.contains("hello from a job"), "{logs}");
    let table = ok(&cloud, &["get", "job", "hello"]);
    assert!(
        table.contains("Complete") && table.contains("1/1"),
        "{table}"
    );
    let described = ok(&cloud, &["describe", "job", "hello"]);
    assert!(described.contains("SuccessfulCreate"), "{described}");

    // A Job whose pods fail: one retry (backoffLimit 1), then Failed.
    assert!(cloud
        .kubectl_stdin(&["apply", "-f", "-"], FAILING_JOB)
        .status
        .success());
    wait_for(&cloud, "failed", "job/fails");
    assert_eq!(
        ok(
            &cloud,
            &[
                "get",
                "job",
                "fails",
                "-o",
                "jsonpath={.status.failed} {.status.conditions[0].reason}"
            ]
        ),
        "2 BackoffLimitExceeded"
    );
    // Restart policy Always is refused for a Job, as kube-apiserver refuses it.
    let refused = cloud.kubectl_stdin(
        &["apply", "-f", "-"],
        &FAILING_JOB
            .replace("name: fails", "name: always")
            .replace("Never", "Always"),
    );
    assert!(!refused.status.success());
    assert!(
        stderr_of(&refused).contains("restartPolicy"),
        "{}",
        stderr_of(&refused)
    );

    // A CronJob, and a Job made from it by hand (`--from=cronjob/…`), as operators test one.
    ok(
        &cloud,
        &[
            "create",
            "cronjob",
            "tick",
            "--image=busybox",
            "--schedule=*/30 * * * *",
            "--",
            "sh",
            "-c",
            "echo tick",
        ],
    );
    let table = ok(&cloud, &["get", "cronjob", "tick"]);
    assert!(table.contains("*/30 * * * *"), "{table}");
    ok(
        &cloud,
        &["create", "job", "tick-now", "--from=cronjob/tick"],
    );
    wait_for(&cloud, "complete", "job/tick-now");
    assert!(ok(&cloud, &["logs", "job/tick-now"]).contains("tick"));

    // Deleting a Job takes its pods with it.
    let selector = "batch.kubernetes.io/job-name=hello";
    assert_eq!(pods(&cloud, selector).len(), 1);
    ok(&cloud, &["delete", "job", "hello"]);
    eventually(
        "the Job's pod is collected",
        Duration::from_secs(30),
        || pods(&cloud, selector).is_empty(),
    );
}

const STATEFULSET: &str = r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db}
spec:
  replicas: 3
  serviceName: db
  selector: {matchLabels: {app: db}}
  volumeClaimTemplates:
  - metadata: {name: data}
    spec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Gi}}}
  template:
    metadata: {labels: {app: db}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - {name: main, image: "busybox:1", command: [sleep, "1000"]}
"#;

/// A cloudcore (fast node grace) with one Ready edge node, edge-1, and their data dirs; all
/// go when dropped (the edge first).
struct OneNode {
    _edge: EdgeProcess,
    cloud: CloudProcess,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

fn one_node() -> OneNode {
    let cloud_dir = tempfile::tempdir().unwrap();
    let cloud = CloudProcess::start_with(
        cloud_dir.path(),
        free_port(),
        free_port(),
        free_port(),
        CLOUD_FAST,
    );
    let token = token(&cloud);
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(&cloud, "edge-1", dir.path(), free_port(), Some(&token));
    wait_ready(&cloud, "edge-1");
    OneNode {
        _edge: edge,
        cloud,
        _dirs: (cloud_dir, dir),
    }
}

fn created_at(cloud: &CloudProcess, pod: &str) -> String {
    ok(
        cloud,
        &[
            "get",
            "pod",
            pod,
            "-o",
            "jsonpath={.metadata.creationTimestamp}",
        ],
    )
}

#[test]
fn a_statefulset_keeps_names_claims_and_order_on_an_edge_node() {
    let OneNode {
        _edge,
        cloud,
        _dirs,
    } = one_node();

    let out = cloud.kubectl_stdin(&["apply", "-f", "-"], STATEFULSET);
    assert!(out.status.success(), "{}", stderr_of(&out));
    rollout_status(&cloud, "statefulset/db");
    let pods = ok(&cloud, &["get", "pods", "-l", "app=db", "-o", "name"]);
    assert_eq!(
        pods.split_whitespace().collect::<Vec<_>>(),
        ["pod/db-0", "pod/db-1", "pod/db-2"]
    );
    // OrderedReady: each pod was made after the one before it (RFC 3339 sorts as text).
    assert!(created_at(&cloud, "db-0") <= created_at(&cloud, "db-1"));
    assert!(created_at(&cloud, "db-1") <= created_at(&cloud, "db-2"));
    let hostname = ok(
        &cloud,
        &[
            "get",
            "pod",
            "db-1",
            "-o",
            "jsonpath={.spec.hostname}.{.spec.subdomain}",
        ],
    );
    assert_eq!(hostname, "db-1.db");
    let claims = ok(&cloud, &["get", "pvc", "-o", "name"]);
    for i in 0..3 {
        assert!(
            claims.contains(&format!("persistentvolumeclaim/data-db-{i}")),
            "{claims}"
        );
    }
    let table = ok(&cloud, &["get", "sts", "db"]);
    assert!(
        table.lines().nth(1).is_some_and(|l| l.contains("3/3")),
        "{table}"
    );

    // A new template rolls out, highest ordinal first, to completion.
    ok(
        &cloud,
        &["set", "image", "statefulset/db", "main=busybox:2"],
    );
    rollout_status(&cloud, "statefulset/db");
    for i in 0..3 {
        let image = ok(
            &cloud,
            &[
                "get",
                "pod",
                &format!("db-{i}"),
                "-o",
                "jsonpath={.spec.containers[0].image}",
            ],
        );
        assert_eq!(image, "busybox:2", "db-{i}");
    }
    // Undo through its ControllerRevisions: back to the first template, revision 3.
    let history = ok(&cloud, &["rollout", "history", "statefulset/db"]);
    assert!(history.lines().any(|l| l.starts_with("2 ")), "{history}");
    ok(&cloud, &["rollout", "undo", "statefulset/db"]);
    rollout_status(&cloud, "statefulset/db");
    eventually(
        "db back on its first image",
        Duration::from_secs(60),
        || {
            (0..3).all(|i| {
                ok(
                    &cloud,
                    &[
                        "get",
                        "pod",
                        &format!("db-{i}"),
                        "-o",
                        "jsonpath={.spec.containers[0].image}",
                    ],
                ) != "busybox:2"
            })
        },
    );
    assert!(ok(&cloud, &["rollout", "history", "statefulset/db"])
        .lines()
        .any(|l| l.starts_with("3 ")));

    // Scale down removes the highest ordinals and keeps their claims.
    ok(&cloud, &["scale", "statefulset/db", "--replicas=1"]);
    eventually("db scaled to one pod", Duration::from_secs(60), || {
        ok(&cloud, &["get", "pods", "-l", "app=db", "-o", "name"]).trim() == "pod/db-0"
    });
    let claims = ok(&cloud, &["get", "pvc", "-o", "name"]);
    assert!(
        claims.contains("persistentvolumeclaim/data-db-2"),
        "{claims}"
    );

    // Deleting the set collects its pods; the claims stay (Retain).
    ok(&cloud, &["delete", "statefulset", "db"]);
    eventually("db's pods collected", Duration::from_secs(60), || {
        ok(&cloud, &["get", "pods", "-l", "app=db", "-o", "name"])
            .trim()
            .is_empty()
    });
    assert!(ok(&cloud, &["get", "pvc", "-o", "name"]).contains("data-db-0"));

    // With persistentVolumeClaimRetentionPolicy Delete, claims go on scale-down and with the set.
    let cache = STATEFULSET
        .replace("name: db", "name: cache")
        .replace("app: db", "app: cache")
        .replace("serviceName: db", "serviceName: cache")
        .replace("replicas: 3", "replicas: 2\n  persistentVolumeClaimRetentionPolicy: {whenDeleted: Delete, whenScaled: Delete}");
    assert!(cloud
        .kubectl_stdin(&["apply", "-f", "-"], &cache)
        .status
        .success());
    rollout_status(&cloud, "statefulset/cache");
    let owner = ok(
        &cloud,
        &[
            "get",
            "pvc",
            "data-cache-0",
            "-o",
            "jsonpath={.metadata.ownerReferences[0].kind}",
        ],
    );
    assert_eq!(owner, "StatefulSet");
    ok(&cloud, &["scale", "statefulset/cache", "--replicas=1"]);
    eventually(
        "data-cache-1 deleted on scale-down",
        Duration::from_secs(60),
        || {
            let claims = ok(&cloud, &["get", "pvc", "-o", "name"]);
            claims.contains("data-cache-0") && !claims.contains("data-cache-1")
        },
    );
    ok(&cloud, &["delete", "statefulset", "cache"]);
    eventually(
        "data-cache-0 deleted with the set",
        Duration::from_secs(60),
        || !ok(&cloud, &["get", "pvc", "-o", "name"]).contains("data-cache"),
    );
    assert!(ok(&cloud, &["get", "pvc", "-o", "name"]).contains("data-db-0"));
}

const LIFE: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: web}
spec:
  terminationGracePeriodSeconds: 2
  containers:
  - {name: main, image: busybox, command: ["sleep", "3600"]}
---
apiVersion: v1
kind: Pod
metadata: {name: crash}
spec:
  containers:
  - {name: main, image: busybox, command: ["sh", "-c", "exit 1"]}
"#;

/// `reason/type/count/source.component: message` of the events about `pod`.
fn events_of(cloud: &CloudProcess, pod: &str) -> String {
    ok(
        cloud,
        &[
            "get",
            "events",
            "--field-selector",
            &format!("involvedObject.name={pod}"),
            "-o",
            "jsonpath={range .items[*]}{.reason}/{.type}/{.count}/{.source.component}: {.message}{\"\\n\"}{end}",
        ],
    )
}

#[test]
fn the_node_records_kubelets_events_for_describe() {
    let OneNode {
        _edge,
        cloud,
        _dirs,
    } = one_node();
    assert!(cloud
        .kubectl_stdin(&["apply", "-f", "-"], LIFE)
        .status
        .success());

    // Started once (not again on every status pass), from kubelet on edge-1.
    eventually("web's Started event", Duration::from_secs(40), || {
        events_of(&cloud, "web").contains("Started/Normal/1/kubelet: Started container main")
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        events_of(&cloud, "web").contains("Started/Normal/1/kubelet"),
        "{}",
        events_of(&cloud, "web")
    );
    let described = ok(&cloud, &["describe", "pod", "web"]);
    assert!(
        described.contains("Scheduled") && described.contains("Started container main"),
        "{described}"
    );

    // A container that keeps failing: back-off, as a Warning.
    eventually("crash's BackOff event", Duration::from_secs(60), || {
        events_of(&cloud, "crash").contains(
            "BackOff/Warning/1/kubelet: Back-off restarting failed container main in pod crash",
        )
    });

    // Deleting: the node says it stops the container.
    ok(&cloud, &["delete", "pod", "web", "--wait=false"]);
    eventually("web's Killing event", Duration::from_secs(30), || {
        events_of(&cloud, "web").contains("Killing/Normal/1/kubelet: Stopping container main")
    });

    // `kubectl taint`: a pod that does not tolerate it waits; untainted, it runs.
    ok(
        &cloud,
        &["taint", "node", "edge-1", "dedicated=gpu:NoSchedule"],
    );
    ok(
        &cloud,
        &["run", "later", "--image=busybox", "--", "sleep", "3600"],
    );
    eventually("later unschedulable", Duration::from_secs(20), || {
        events_of(&cloud, "later").contains("FailedScheduling/Warning")
    });
    assert_eq!(
        ok(
            &cloud,
            &["get", "pod", "later", "-o", "jsonpath={.spec.nodeName}"]
        ),
        ""
    );
    ok(&cloud, &["taint", "node", "edge-1", "dedicated-"]);
    eventually(
        "later bound once untainted",
        Duration::from_secs(30),
        || {
            ok(
                &cloud,
                &["get", "pod", "later", "-o", "jsonpath={.spec.nodeName}"],
            ) == "edge-1"
        },
    );
}

fn container_field(cloud: &CloudProcess, pod: &str, field: &str) -> String {
    ok(
        cloud,
        &[
            "get",
            "pod",
            pod,
            "-o",
            &format!("jsonpath={{.status.containerStatuses[0].{field}}}"),
        ],
    )
}

#[test]
fn probes_decide_readiness_and_restart_what_fails_liveness() {
    let OneNode {
        _edge,
        cloud,
        _dirs,
    } = one_node();
    let files = tempfile::tempdir().unwrap();
    let files_dir = files.path().display().to_string();
    std::fs::write(files.path().join("index.html"), "ok").unwrap();
    let (dead_port, web_port) = (free_port(), free_port());
    let pods = format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: ready-later}}
spec:
  containers:
  - name: main
    image: busybox
    command: ["sleep", "3600"]
    readinessProbe:
      exec: {{command: ["test", "-f", "{files_dir}/ready"]}}
      periodSeconds: 1
      failureThreshold: 1
---
apiVersion: v1
kind: Pod
metadata: {{name: dies}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: busybox
    command: ["sleep", "3600"]
    livenessProbe:
      tcpSocket: {{port: {dead_port}}}
      periodSeconds: 1
      failureThreshold: 2
---
apiVersion: v1
kind: Pod
metadata: {{name: web}}
spec:
  containers:
  - name: main
    image: busybox
    command: ["busybox", "httpd", "-f", "-p", "127.0.0.1:{web_port}", "-h", "{files_dir}"]
    ports: [{{name: http, containerPort: {web_port}}}]
    readinessProbe:
      httpGet: {{path: /index.html, port: http}}
      periodSeconds: 1
"#
    );
    assert!(cloud
        .kubectl_stdin(&["apply", "-f", "-"], &pods)
        .status
        .success());

    // exec readiness: running but not ready until the file exists, then ready, then not.
    eventually("ready-later running", Duration::from_secs(40), || {
        container_field(&cloud, "ready-later", "started") == "true"
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(container_field(&cloud, "ready-later", "ready"), "false");
    std::fs::write(files.path().join("ready"), "").unwrap();
    eventually("ready-later Ready", Duration::from_secs(20), || {
        ok(&cloud, &["get", "pod", "ready-later", "-o",
            "jsonpath={.status.containerStatuses[0].ready} {.status.conditions[?(@.type==\"Ready\")].status}"])
            == "true True"
    });
    std::fs::remove_file(files.path().join("ready")).unwrap();
    eventually(
        "ready-later not Ready again",
        Duration::from_secs(20),
        || container_field(&cloud, "ready-later", "ready") == "false",
    );

    // httpGet readiness on a named port.
    eventually("web Ready", Duration::from_secs(40), || {
        container_field(&cloud, "web", "ready") == "true"
    });

    // tcpSocket liveness failing: restarted, with kubelet's events.
    eventually(
        "dies restarted by its liveness probe",
        Duration::from_secs(60),
        || {
            container_field(&cloud, "dies", "restartCount")
                .parse::<u32>()
                .is_ok_and(|n| n >= 1)
        },
    );
    eventually("the probe's events", Duration::from_secs(30), || {
        let events = events_of(&cloud, "dies");
        events.contains("Unhealthy/Warning")
            && events.contains("Liveness probe failed")
            && events.contains("Container main failed liveness probe, will be restarted")
    });
}

/// Eviction from unreachable nodes, turned on (`--evict-pods-from-unreachable-nodes-after`):
/// the node is tainted, its Deployment pod is evicted (Terminating, `DisruptionTarget`, a
/// `TaintManagerEviction` event) and replaced on the node that is still there; the DaemonSet's
/// pod stays. Back online, the taints go and the evicted pod's deletion completes.
#[test]
fn with_eviction_on_pods_leave_an_unreachable_node_for_another() {
    let cloud_dir = tempfile::tempdir().unwrap();
    let mut args = CLOUD_FAST.to_vec();
    args.extend(["--evict-pods-from-unreachable-nodes-after", "2s"]);
    let cloud = CloudProcess::start_with(
        cloud_dir.path(),
        free_port(),
        free_port(),
        free_port(),
        &args,
    );
    let token = token(&cloud);
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let _edge1 = start_edge(&cloud, "edge-1", dirs[0].path(), free_port(), Some(&token));
    let edge2_port = free_port();
    let mut edge2 = start_edge(&cloud, "edge-2", dirs[1].path(), edge2_port, Some(&token));
    wait_ready(&cloud, "edge-1");
    wait_ready(&cloud, "edge-2");
    for node in ["edge-1", "edge-2"] {
        ok(&cloud, &["label", "node", node, "kedge.io/agent=yes"]);
    }
    for manifest in [DEPLOYMENT, DAEMONSET] {
        assert!(cloud
            .kubectl_stdin(&["apply", "-f", "-"], manifest)
            .status
            .success());
    }
    rollout_status(&cloud, "deployment/web");
    eventually("one web pod per node", Duration::from_secs(30), || {
        let mut nodes: Vec<String> = pods(&cloud, "app=web").into_iter().map(|p| p.1).collect();
        nodes.sort();
        nodes == ["edge-1", "edge-2"]
    });
    eventually("an agent per node", Duration::from_secs(30), || {
        agent_nodes(&cloud) == ["edge-1", "edge-2"]
    });
    let on_edge2 = pods(&cloud, "app=web")
        .into_iter()
        .find(|p| p.1 == "edge-2")
        .expect("a web pod on edge-2")
        .0;

    edge2.kill9();
    eventually(
        "edge-2 tainted unreachable",
        Duration::from_secs(30),
        || {
            ok(
                &cloud,
                &[
                    "get",
                    "node",
                    "edge-2",
                    "-o",
                    "jsonpath={.spec.taints[*].key}",
                ],
            )
            .contains("node.kubernetes.io/unreachable")
        },
    );
    eventually("edge-2's web pod evicted", Duration::from_secs(30), || {
        !ok(
            &cloud,
            &[
                "get",
                "pod",
                &on_edge2,
                "-o",
                "jsonpath={.metadata.deletionTimestamp}",
            ],
        )
        .is_empty()
    });
    assert_eq!(
        ok(
            &cloud,
            &[
                "get",
                "pod",
                &on_edge2,
                "-o",
                "jsonpath={.status.conditions[?(@.type=='DisruptionTarget')].reason}"
            ]
        ),
        "DeletionByTaintManager"
    );
    eventually(
        "a replacement Running on edge-1",
        Duration::from_secs(30),
        || {
            pods(&cloud, "app=web")
                .iter()
                .filter(|p| p.1 == "edge-1" && p.2 == "Running")
                .count()
                == 2
        },
    );
    let events = ok(&cloud, &["get", "events"]);
    assert!(
        events
            .lines()
            .any(|l| l.contains("TaintManagerEviction") && l.contains(&on_edge2)),
        "{events}"
    );
    // The DaemonSet's pod tolerates the taint: still there, not Terminating.
    let agent = ok(
        &cloud,
        &[
            "get",
            "pods",
            "-l",
            "app=agent",
            "--field-selector",
            "spec.nodeName=edge-2",
            "-o",
            "jsonpath={.items[*].metadata.deletionTimestamp}",
        ],
    );
    assert!(agent.is_empty(), "the agent was evicted: {agent}");

    // Back online: Ready, untainted, and the evicted pod's deletion completes on the node.
    let _edge2 = start_edge(&cloud, "edge-2", dirs[1].path(), edge2_port, Some(&token));
    wait_ready(&cloud, "edge-2");
    eventually("edge-2 untainted", Duration::from_secs(30), || {
        !ok(
            &cloud,
            &[
                "get",
                "node",
                "edge-2",
                "-o",
                "jsonpath={.spec.taints[*].key}",
            ],
        )
        .contains("unreachable")
    });
    eventually("the evicted pod is gone", Duration::from_secs(30), || {
        !pods(&cloud, "app=web").iter().any(|p| p.0 == on_edge2)
    });
}
