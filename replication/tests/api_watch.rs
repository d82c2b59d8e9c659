//! The watch surface of the Kubernetes-compatible API over HTTP, on a cloud store (versions
//! assigned) and on an edge cache (versions mirrored, written by the sync protocol as edgecore
//! writes it): watch-list (`sendInitialEvents`), objects entering and leaving a selector, and
//! deletes reaching a node's cache.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use replication::api::{ApiServer, OpenPolicy};
use replication::sync::{Down, EdgeReplica, SessionId};
use replication::{
    Change, ChangeKind, ObjectKey, ResourceVersion, Revision, Store, StoreConfig, Versioning,
};
use serde_json::{json, Value};

/// An API server over `store` on a loopback port, on a runtime of its own.
struct Api {
    addr: SocketAddr,
    _runtime: tokio::runtime::Runtime,
}

impl Api {
    fn serve(store: Arc<Store>) -> Api {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let router = ApiServer::new(store, Arc::new(OpenPolicy)).router();
        runtime.spawn(async move { axum::serve(listener, router).await });
        Api {
            addr,
            _runtime: runtime,
        }
    }

    /// One HTTP/1.0 request (the answer ends when the connection closes): status and body.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let mut stream = TcpStream::connect(self.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let content_type = match method {
            "PATCH" => "application/merge-patch+json",
            _ => "application/json",
        };
        write!(
            stream,
            "{method} {path} HTTP/1.0\r\nHost: test\r\nContent-Type: {content_type}\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP answer");
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        (status, serde_json::from_str(body).unwrap_or(Value::Null))
    }

    fn ok(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let (status, body) = self.call(method, path, body);
        assert!(
            (200..300).contains(&status),
            "{method} {path}: {status} {body}"
        );
        body
    }

    fn watch(&self, path: &str) -> WatchStream {
        let mut stream = TcpStream::connect(self.addr).unwrap();
        write!(stream, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut reader = BufReader::new(stream);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut status = 0;
        let mut head = Vec::new();
        // Bounded in time: the head of a watch comes at once.
        while Instant::now() < deadline {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) => break,
                Ok(_) if line == "\r\n" => break,
                Ok(_) => {
                    if status == 0 {
                        status = line.split(' ').nth(1).unwrap().parse().unwrap();
                    }
                    head.push(line);
                }
                Err(_) => {}
            }
        }
        WatchStream { status, reader }
    }
}

struct WatchStream {
    status: u16,
    reader: BufReader<TcpStream>,
}

impl WatchStream {
    /// The next event, or `None` if none comes within `within`.
    fn next(&mut self, within: Duration) -> Option<Value> {
        let deadline = Instant::now() + within;
        let mut line = String::new();
        while Instant::now() < deadline {
            match self.reader.read_line(&mut line) {
                Ok(0) => return None,
                Ok(_) if line.ends_with('\n') => {
                    return Some(serde_json::from_str(&line).expect("one JSON event per line"))
                }
                Ok(_) | Err(_) => {}
            }
        }
        None
    }

    /// Events until none comes for `quiet` (at most 50).
    fn drain(&mut self, quiet: Duration) -> Vec<Value> {
        let mut events = Vec::new();
        while events.len() < 50 {
            match self.next(quiet) {
                Some(event) => events.push(event),
                None => break,
            }
        }
        events
    }

    /// The rest of the body (an error answer).
    fn body(&mut self) -> Value {
        let mut body = String::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let mut chunk = String::new();
            match self.reader.read_line(&mut chunk) {
                Ok(0) => break,
                Ok(_) => body.push_str(&chunk),
                Err(_) => {}
            }
        }
        serde_json::from_str(&body).unwrap_or(Value::Null)
    }
}

fn summary(events: &[Value]) -> Vec<(String, String)> {
    events
        .iter()
        .map(|e| {
            let name = e["object"]["metadata"]["name"].as_str().unwrap_or("");
            (e["type"].as_str().unwrap().to_owned(), name.to_owned())
        })
        .collect()
}

fn cloud() -> (tempfile::TempDir, Arc<Store>, Api) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = StoreConfig::cloud();
    config.sync_writes = false;
    let store = Arc::new(Store::open(dir.path(), config).unwrap());
    let api = Api::serve(store.clone());
    api.ok(
        "POST",
        "/api/v1/namespaces",
        Some(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "zz"}})),
    );
    (dir, store, api)
}

fn pod(name: &str, tier: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "zz", "labels": {"tier": tier}},
        "spec": {"nodeName": "edge-1", "containers": [{"name": "c", "image": "busybox"}]},
    })
}

const PODS: &str = "/api/v1/namespaces/zz/pods";

#[test]
fn watch_list_with_a_resource_version_sends_every_current_object_then_the_end_bookmark() {
    let (_dir, _store, api) = cloud();
    for name in ["a", "b", "c"] {
        api.ok("POST", PODS, Some(&pod(name, "a")));
    }
    let listed = api.ok("GET", PODS, None);
    let list_rv: u64 = listed["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    // A change after the list: an older version must not limit the initial state to it.
    api.ok(
        "PATCH",
        &format!("{PODS}/c"),
        Some(&json!({"metadata": {"labels": {"x": "y"}}})),
    );
    for rv in [
        list_rv.to_string(),
        "1".to_owned(),
        String::new(),
        "0".to_owned(),
    ] {
        let mut watch = api.watch(&format!(
            "{PODS}?watch=1&sendInitialEvents=true&resourceVersionMatch=NotOlderThan\
             &allowWatchBookmarks=true&resourceVersion={rv}"
        ));
        assert_eq!(watch.status, 200);
        let events = watch.drain(Duration::from_millis(500));
        let kinds = summary(&events);
        assert_eq!(
            kinds,
            vec![
                ("ADDED".into(), "a".into()),
                ("ADDED".into(), "b".into()),
                ("ADDED".into(), "c".into()),
                ("BOOKMARK".into(), "".into()),
            ],
            "resourceVersion={rv:?}: {events:?}"
        );
        let bookmark = &events[3]["object"]["metadata"];
        assert_eq!(bookmark["annotations"]["k8s.io/initial-events-end"], "true");
        let bookmark_rv: u64 = bookmark["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(bookmark_rv > list_rv, "the state listed is the current one");
        assert_eq!(events[2]["object"]["metadata"]["labels"]["x"], "y");
    }

    // Without sendInitialEvents a version is where a plain watch resumes from (unchanged).
    let mut resume = api.watch(&format!("{PODS}?watch=1&resourceVersion={list_rv}"));
    assert_eq!(
        summary(&resume.drain(Duration::from_millis(500))),
        vec![("MODIFIED".into(), "c".into())]
    );
    // sendInitialEvents=false with no version: changes from now on only.
    let mut quiet = api.watch(&format!(
        "{PODS}?watch=1&sendInitialEvents=false&resourceVersionMatch=NotOlderThan"
    ));
    assert!(quiet.drain(Duration::from_millis(300)).is_empty());
}

#[test]
fn watch_list_with_a_version_ahead_of_the_store_waits_then_answers_504() {
    let (_dir, store, api) = cloud();
    api.ok("POST", PODS, Some(&pod("a", "a")));
    let ahead = store.revision().get() + 1;
    // Reached while the request waits: served.
    let path = format!(
        "{PODS}?watch=1&sendInitialEvents=true&resourceVersionMatch=NotOlderThan\
         &allowWatchBookmarks=true&resourceVersion={ahead}"
    );
    let addr = api.addr;
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let mut stream = TcpStream::connect(addr).unwrap();
        let body = pod("b", "a").to_string();
        write!(
            stream,
            "POST {PODS} HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
    });
    let mut watch = api.watch(&path);
    writer.join().unwrap();
    assert_eq!(watch.status, 200);
    assert_eq!(
        summary(&watch.drain(Duration::from_millis(500))),
        vec![
            ("ADDED".into(), "a".into()),
            ("ADDED".into(), "b".into()),
            ("BOOKMARK".into(), "".into()),
        ]
    );

    // Never reached: kube-apiserver's "Too large resource version" 504, after its 3 s wait.
    let far = store.revision().get() + 100;
    let mut watch = api.watch(&format!(
        "{PODS}?watch=1&sendInitialEvents=true&resourceVersionMatch=NotOlderThan\
         &resourceVersion={far}"
    ));
    assert_eq!(watch.status, 504);
    let status = watch.body();
    assert_eq!(status["reason"], "Timeout");
    assert_eq!(
        status["message"],
        format!(
            "Too large resource version: {far}, current: {}",
            store.revision()
        )
    );
    assert_eq!(
        status["details"]["causes"][0]["reason"],
        "ResourceVersionTooLarge"
    );
    assert_eq!(status["details"]["retryAfterSeconds"], 1);
}

#[test]
fn invalid_watch_list_options_are_422_on_watch_and_list() {
    let (_dir, _store, api) = cloud();
    let cases = [
        (
            "?watch=1&sendInitialEvents=true",
            "resourceVersionMatch: Forbidden: sendInitialEvents requires setting \
             resourceVersionMatch to NotOlderThan",
        ),
        (
            "?watch=1&resourceVersionMatch=NotOlderThan&resourceVersion=1",
            "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden for watch \
             unless sendInitialEvents is provided",
        ),
        (
            "?sendInitialEvents=true",
            "sendInitialEvents: Forbidden: sendInitialEvents is forbidden for list",
        ),
    ];
    for (query, message) in cases {
        let (status, body) = api.call("GET", &format!("{PODS}{query}"), None);
        assert_eq!(status, 422, "{query}: {body}");
        assert_eq!(body["kind"], "Status");
        assert_eq!(body["reason"], "Invalid");
        assert_eq!(
            body["message"],
            format!("ListOptions.meta.k8s.io \"\" is invalid: {message}")
        );
        assert_eq!(body["details"]["group"], "meta.k8s.io");
        assert_eq!(body["details"]["kind"], "ListOptions");
        assert_eq!(
            body["details"]["causes"][0]["reason"],
            "FieldValueForbidden"
        );
    }
}

#[test]
fn filtered_watches_see_objects_enter_and_leave_their_selector() {
    let (_dir, _store, api) = cloud();
    api.ok("POST", PODS, Some(&pod("p", "a")));
    api.ok("POST", PODS, Some(&pod("other", "b")));
    let mut labelled = api.watch(&format!("{PODS}?watch=1&labelSelector=tier%3Da"));
    assert_eq!(
        summary(&labelled.drain(Duration::from_millis(300))),
        vec![("ADDED".into(), "p".into())]
    );
    let mut running = api.watch(&format!(
        "{PODS}?watch=1&fieldSelector=status.phase%3DRunning"
    ));
    let phase = |phase: &str| {
        api.ok(
            "PATCH",
            &format!("{PODS}/p/status"),
            Some(&json!({"status": {"phase": phase}})),
        )
    };
    phase("Running");
    let failed = phase("Failed");
    phase("Running");
    let events = running.drain(Duration::from_millis(500));
    assert_eq!(
        summary(&events),
        vec![
            ("ADDED".into(), "p".into()),
            ("DELETED".into(), "p".into()),
            ("ADDED".into(), "p".into()),
        ],
        "{events:?}"
    );
    assert_eq!(events[1]["object"]["status"]["phase"], "Running");
    assert_eq!(
        events[1]["object"]["metadata"]["resourceVersion"],
        failed["metadata"]["resourceVersion"]
    );
    assert_eq!(
        summary(&labelled.drain(Duration::from_millis(300))),
        vec![("MODIFIED".into(), "p".into()); 3]
    );
    let relabel = |tier: &str| {
        api.ok(
            "PATCH",
            &format!("{PODS}/p"),
            Some(&json!({"metadata": {"labels": {"tier": tier}}})),
        )
    };
    let to_b = relabel("b");
    let to_b_rv = to_b["metadata"]["resourceVersion"].clone();
    relabel("a");
    api.ok(
        "PATCH",
        &format!("{PODS}/p"),
        Some(&json!({"metadata": {"annotations": {"n": "1"}}})),
    );
    api.ok("DELETE", &format!("{PODS}/p"), None);
    let events = labelled.drain(Duration::from_millis(500));
    assert_eq!(
        summary(&events),
        vec![
            ("DELETED".into(), "p".into()),
            ("ADDED".into(), "p".into()),
            ("MODIFIED".into(), "p".into()),
            ("DELETED".into(), "p".into()),
        ],
        "{events:?}"
    );
    // As kube-apiserver: the object as it was (still matching), at the change's version.
    assert_eq!(events[0]["object"]["metadata"]["labels"]["tier"], "a");
    assert_eq!(events[0]["object"]["metadata"]["resourceVersion"], to_b_rv);
    assert_eq!(events[1]["object"]["metadata"]["labels"]["tier"], "a");
}

/// An edge cache written by the sync protocol, as edgecore's EdgeHub writes it.
struct Edge {
    replica: EdgeReplica,
    rv: u64,
}

impl Edge {
    fn upsert(&mut self, object: &Value) {
        self.rv += 10;
        let meta = &object["metadata"];
        let key = ObjectKey::new(
            "pods",
            meta["namespace"].as_str().unwrap(),
            meta["name"].as_str().unwrap(),
        )
        .unwrap();
        let change = Change::new(
            Revision(self.rv),
            key,
            ResourceVersion(self.rv),
            ChangeKind::Modified,
            Bytes::from(object.to_string()),
        );
        self.replica
            .receive(Down::Upsert(Arc::new(change)))
            .unwrap();
        self.replica.flush().unwrap();
    }

    fn delete(&mut self, name: &str) {
        self.rv += 10;
        let key = ObjectKey::new("pods", "zz", name).unwrap();
        self.replica
            .receive(Down::Delete {
                key,
                rv: ResourceVersion(self.rv),
            })
            .unwrap();
        self.replica.flush().unwrap();
    }
}

fn edge() -> (tempfile::TempDir, Edge, Api) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = StoreConfig::edge();
    config.sync_writes = false;
    assert_eq!(config.versioning, Versioning::Mirror);
    let store = Arc::new(Store::open(dir.path(), config).unwrap());
    let mut replica = EdgeReplica::from_shared(store.clone()).unwrap();
    replica.link_up().unwrap();
    replica
        .receive(Down::Session(SessionId {
            epoch: 1,
            number: 1,
        }))
        .unwrap();
    let api = Api::serve(store);
    (dir, Edge { replica, rv: 100 }, api)
}

#[test]
fn a_pod_deleted_from_a_node_cache_is_deleted_on_its_watches() {
    let (_dir, mut edge, api) = edge();
    // From a list's version (not "0": something is cached), so that the watches are in place
    // before the changes below.
    let mut elsewhere = pod("seed", "a");
    elsewhere["metadata"]["namespace"] = json!("elsewhere");
    edge.upsert(&elsewhere);
    let listed = api.ok("GET", PODS, None);
    let rv = listed["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut all = api.watch(&format!("{PODS}?watch=1&resourceVersion={rv}"));
    let mut on_node = api.watch(&format!(
        "{PODS}?watch=1&resourceVersion={rv}&fieldSelector=spec.nodeName%3Dedge-1"
    ));
    let mut p = pod("p", "a");
    edge.upsert(&p);
    // The cloud marks it for deletion; the node stops it and confirms (an empty report, which
    // is not a new state of the pod); the cloud's delete removes it from the cache.
    p["metadata"]["deletionTimestamp"] = json!("2024-01-01T00:00:00Z");
    edge.upsert(&p);
    let key = ObjectKey::new("pods", "zz", "p").unwrap();
    edge.replica.report(key.clone(), Bytes::new()).unwrap();
    let held = edge.replica.store().get(&key).unwrap().unwrap();
    assert!(
        serde_json::from_slice::<Value>(&held.object).is_ok(),
        "the cache holds the pod, not the confirmation"
    );
    let (status, _) = api.call("GET", &format!("{PODS}/p"), None);
    assert_eq!(status, 200);
    edge.delete("p");
    for watch in [&mut all, &mut on_node] {
        let events = watch.drain(Duration::from_millis(500));
        assert_eq!(
            summary(&events),
            vec![
                ("ADDED".into(), "p".into()),
                ("MODIFIED".into(), "p".into()),
                ("DELETED".into(), "p".into()),
            ],
            "{events:?}"
        );
        assert!(events[2]["object"]["metadata"]["deletionTimestamp"].is_string());
    }
    let (status, _) = api.call("GET", &format!("{PODS}/p"), None);
    assert_eq!(status, 404);

    // Any kind, and a selector that stops matching on the edge too.
    let listed = api.ok("GET", PODS, None);
    let rv = listed["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut tier_a = api.watch(&format!(
        "{PODS}?watch=1&resourceVersion={rv}&labelSelector=tier%3Da"
    ));
    edge.upsert(&pod("q", "a"));
    edge.upsert(&pod("q", "b"));
    edge.upsert(&pod("q", "a"));
    edge.delete("q");
    assert_eq!(
        summary(&tier_a.drain(Duration::from_millis(500))),
        vec![
            ("ADDED".into(), "q".into()),
            ("DELETED".into(), "q".into()),
            ("ADDED".into(), "q".into()),
            ("DELETED".into(), "q".into()),
        ]
    );
}

#[test]
fn watch_list_options_are_checked_on_an_edge_cache_too() {
    let (_dir, mut edge, api) = edge();
    edge.upsert(&pod("p", "a"));
    let (status, body) = api.call(
        "GET",
        &format!("{PODS}?watch=1&sendInitialEvents=true"),
        None,
    );
    assert_eq!(status, 422, "{body}");
    let listed = api.ok("GET", PODS, None);
    let rv = listed["metadata"]["resourceVersion"].as_str().unwrap();
    let mut watch = api.watch(&format!(
        "{PODS}?watch=1&sendInitialEvents=true&resourceVersionMatch=NotOlderThan\
         &allowWatchBookmarks=true&resourceVersion={rv}"
    ));
    assert_eq!(
        summary(&watch.drain(Duration::from_millis(500))),
        vec![("ADDED".into(), "p".into()), ("BOOKMARK".into(), "".into())]
    );
}

#[test]
fn an_update_that_changes_nothing_keeps_the_version_and_sends_no_event() {
    let (_dir, _store, api) = cloud();
    api.ok("POST", PODS, Some(&pod("p", "a")));
    let label = json!({"metadata": {"labels": {"x": "y"}}});
    let first = api.ok("PATCH", &format!("{PODS}/p"), Some(&label));
    let rv = first["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut watch = api.watch(&format!("{PODS}?watch=1&resourceVersion={rv}"));
    // The same patch again, and a PUT of the object as it is: nothing to write.
    let again = api.ok("PATCH", &format!("{PODS}/p"), Some(&label));
    assert_eq!(again["metadata"]["resourceVersion"], rv.as_str());
    let same = api.ok("PUT", &format!("{PODS}/p"), Some(&again));
    assert_eq!(same["metadata"]["resourceVersion"], rv.as_str());
    // A real change still goes out, and is the only event.
    api.ok(
        "PATCH",
        &format!("{PODS}/p"),
        Some(&json!({"metadata": {"labels": {"x": "z"}}})),
    );
    let events = watch.drain(Duration::from_millis(500));
    assert_eq!(summary(&events), vec![("MODIFIED".into(), "p".into())]);
    assert_eq!(events[0]["object"]["metadata"]["labels"]["x"], "z");
}
