//! kube-rs (an unmodified Kubernetes client library) against the real cloudcore binary:
//! `watcher` with its initial list, live events, resume from a resourceVersion, and the
//! in-stream 410 that makes it re-list.

mod common;

use std::time::Duration;

use common::CloudProcess;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams, WatchEvent, WatchParams};
use kube::runtime::watcher::{self, Event};
use kube::Client;

fn client(cloud: &CloudProcess) -> Client {
    let config = kube::Config::new(cloud.api.parse().expect("url"));
    Client::try_from(config).expect("client")
}

fn configmap(name: &str, value: &str) -> ConfigMap {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name}, "data": {"v": value},
    }))
    .unwrap()
}

/// The next watcher event, failing the test after 20 s.
async fn next<S>(stream: &mut S) -> Event<ConfigMap>
where
    S: futures_util::Stream<Item = Result<Event<ConfigMap>, watcher::Error>> + Unpin,
{
    loop {
        let item = tokio::time::timeout(Duration::from_secs(20), stream.next())
            .await
            .expect("a watcher event within 20 s")
            .expect("the watcher stream does not end");
        match item {
            Ok(event) => return event,
            // Connection errors while cloudcore restarts: the watcher retries on the next poll.
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn name(cm: &ConfigMap) -> String {
    cm.metadata.name.clone().unwrap_or_default()
}

#[tokio::test]
async fn kube_rs_watcher_lists_watches_resumes_and_relists_on_410() {
    let dir = tempfile::tempdir().unwrap();
    let mut cloud = CloudProcess::start(dir.path());
    let api: Api<ConfigMap> = Api::namespaced(client(&cloud), "default");
    for i in 0..3 {
        api.create(&PostParams::default(), &configmap(&format!("pre-{i}"), "0"))
            .await
            .unwrap();
    }

    // Initial list (paged by the watcher), then live events.
    let mut stream = watcher::watcher(api.clone(), watcher::Config::default()).boxed();
    assert!(matches!(next(&mut stream).await, Event::Init));
    let mut initial = Vec::new();
    loop {
        match next(&mut stream).await {
            Event::InitApply(cm) => initial.push(name(&cm)),
            Event::InitDone => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(initial, ["pre-0", "pre-1", "pre-2"]);
    let created = api
        .create(&PostParams::default(), &configmap("live", "1"))
        .await
        .unwrap();
    match next(&mut stream).await {
        Event::Apply(cm) => assert_eq!(name(&cm), "live"),
        other => panic!("unexpected {other:?}"),
    }
    api.delete("pre-0", &Default::default()).await.unwrap();
    match next(&mut stream).await {
        Event::Delete(cm) => assert_eq!(name(&cm), "pre-0"),
        other => panic!("unexpected {other:?}"),
    }

    // Resume: a watch from the resourceVersion of "live" sees only what came after it.
    api.create(&PostParams::default(), &configmap("after", "2"))
        .await
        .unwrap();
    let rv = created.metadata.resource_version.clone().unwrap();
    let mut resumed = api
        .watch(&WatchParams::default().timeout(5), &rv)
        .await
        .unwrap()
        .boxed();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(10), resumed.next()).await {
            Ok(Some(Ok(WatchEvent::Added(cm)))) | Ok(Some(Ok(WatchEvent::Modified(cm)))) => {
                seen.push(format!("+{}", name(&cm)))
            }
            Ok(Some(Ok(WatchEvent::Deleted(cm)))) => seen.push(format!("-{}", name(&cm))),
            Ok(Some(Ok(WatchEvent::Bookmark(_)))) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, ["-pre-0", "+after"]);

    // 410: cloudcore restarts with a watch history of 20 changes and 25 changes are made before
    // the watcher (its connection cut by the kill) comes back: resuming from its old version is
    // answered with an in-stream ERROR 410, and the watcher re-lists.
    cloud.restart_after_kill9(&["--watch-history", "20"]);
    let api: Api<ConfigMap> = Api::namespaced(client(&cloud), "default");
    for i in 0..25 {
        api.create(
            &PostParams::default(),
            &configmap(&format!("bulk-{i:02}"), "3"),
        )
        .await
        .unwrap();
    }
    let mut stale = api
        .watch(&WatchParams::default().timeout(5), &rv)
        .await
        .unwrap()
        .boxed();
    match tokio::time::timeout(Duration::from_secs(10), stale.next()).await {
        Ok(Some(Ok(WatchEvent::Error(e)))) => assert_eq!(e.code, 410, "{e:?}"),
        other => panic!("expected an in-stream 410, got {other:?}"),
    }
    let mut relisted = Vec::new();
    let mut relists = 0;
    loop {
        match next(&mut stream).await {
            Event::Init => {
                relists += 1;
                relisted.clear();
            }
            Event::InitApply(cm) => relisted.push(name(&cm)),
            Event::InitDone if relists > 0 => break,
            Event::InitDone => {}
            Event::Apply(cm) => assert_eq!(
                name(&cm),
                "after",
                "only the event before the kill arrives live"
            ),
            Event::Delete(cm) => panic!("unexpected delete of {}", name(&cm)),
        }
    }
    assert_eq!(relisted.len(), 29, "{relisted:?}");
    assert!(relisted.contains(&"bulk-24".to_owned()) && !relisted.contains(&"pre-0".to_owned()));
}
