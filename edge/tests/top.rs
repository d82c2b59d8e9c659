//! `kubectl top node` and `kubectl top pod` end to end: real kubectl finds the Metrics API
//! (`metrics.k8s.io/v1beta1`) on the cloud's embedded API, which asks the node for its usage
//! over the link; and on the node's MetaServer, with the cloud gone.

mod support;

use std::time::Duration;

use support::*;

const POD: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: spinner, labels: {app: spinner}}
spec:
  containers:
  - name: main
    image: busybox
    command: ["sh", "-c", "while :; do :; done"]
"#;

/// The first row of `kubectl top …` whose first column is `name`: its columns.
fn row(out: &str, name: &str) -> Option<Vec<String>> {
    out.lines()
        .skip(1)
        .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .find(|cols| cols.first().map(String::as_str) == Some(name))
}

/// `250m` → 250; `2` → 2000 (cores).
fn millicores(text: &str) -> u64 {
    match text.strip_suffix('m') {
        Some(m) => m.parse().unwrap_or(0),
        None => text.parse::<u64>().map_or(0, |c| c * 1000),
    }
}

/// `12Mi` → 12.
fn mebibytes(text: &str) -> u64 {
    text.trim_end_matches("Mi").parse().unwrap_or(0)
}

fn top(server: &str, args: &[&str]) -> String {
    let out = kubectl(server, &[&["top"], args].concat(), None);
    assert!(
        out.status.success(),
        "kubectl top {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn kubectl_top_shows_the_usage_the_node_measures() {
    let cloud_dir = tempfile::tempdir().unwrap();
    let edge_dir = tempfile::tempdir().unwrap();
    let mut cloud = CloudProcess::start(cloud_dir.path());
    let token = token(&cloud);
    let edge = EdgeProcess::start(&cloud, "edge-1", edge_dir.path(), free_port(), Some(&token));
    assert!(cloud
        .kubectl_stdin(&["apply", "-f", "-"], POD)
        .status
        .success());
    eventually("spinner Running", Duration::from_secs(40), || {
        cloud.ok(&["get", "pod", "spinner", "-o", "jsonpath={.status.phase}"]) == "Running"
    });
    let api = cloud.api.clone();

    // The node: non-zero CPU and memory (the spinner alone keeps a core busy).
    let node = row(&top(&api, &["node"]), "edge-1").expect("edge-1 in kubectl top node");
    assert!(millicores(&node[1]) > 0, "{node:?}");
    assert!(mebibytes(&node[3]) > 0, "{node:?}");

    // The pod, by name, by label and per container: the spinner's CPU shows (a loaded CI
    // machine may give it less than a core; answers are kept 10 s, hence the retries).
    eventually(
        "the spinner's CPU in kubectl top pod",
        Duration::from_secs(30),
        || {
            let pod = row(&top(&api, &["pod"]), "spinner");
            pod.is_some_and(|p| millicores(&p[1]) >= 10 && mebibytes(&p[2]) > 0)
        },
    );
    let by_label = top(&api, &["pod", "-l", "app=spinner", "--containers"]);
    let container = row(&by_label, "spinner").expect("the spinner by label");
    assert_eq!(container[1], "main", "{by_label}");
    assert!(row(&top(&api, &["pod", "-l", "app=other"]), "spinner").is_none());
    let all = top(&api, &["pod", "-A"]);
    assert!(row(&all, "default").is_some(), "{all}");

    // On the node itself, with the cloud gone.
    cloud.kill9();
    let meta = edge.metaserver.clone();
    let node = row(&top(&meta, &["node"]), "edge-1").expect("edge-1 from MetaServer");
    assert!(millicores(&node[1]) > 0, "{node:?}");
    let pod = row(&top(&meta, &["pod"]), "spinner").expect("the spinner from MetaServer");
    assert!(millicores(&pod[1]) >= 10, "{pod:?}");
}
