"""A watch-list (sendInitialEvents) with the official Kubernetes Python client.

Usage: watch_list.py SERVER NAMESPACE [invalid]

Prints one JSON line: the names the initial events ADDED, whether the initial-events-end
BOOKMARK arrived, and its resourceVersion. With `invalid`, sends sendInitialEvents without
resourceVersionMatch and prints the API's status code instead (kube-apiserver answers 422).
"""
import json
import sys

from kubernetes import client, watch
from kubernetes.client.rest import ApiException

server, namespace = sys.argv[1], sys.argv[2]
configuration = client.Configuration()
configuration.host = server
api = client.CoreV1Api(client.ApiClient(configuration))

if len(sys.argv) > 3 and sys.argv[3] == "invalid":
    try:
        api.list_namespaced_config_map(namespace, watch=True, send_initial_events=True,
                                       timeout_seconds=5, _preload_content=False)
        print(json.dumps({"code": 200}))
    except ApiException as e:
        print(json.dumps({"code": e.status, "body": json.loads(e.body)}))
    sys.exit(0)

added, ended, rv = [], False, None
stream = watch.Watch().stream(
    api.list_namespaced_config_map,
    namespace,
    send_initial_events=True,
    resource_version_match="NotOlderThan",
    allow_watch_bookmarks=True,
    timeout_seconds=20,
)
for event in stream:
    if event["type"] == "ADDED":
        added.append(event["object"].metadata.name)
    elif event["type"] == "BOOKMARK":
        metadata = event["raw_object"].get("metadata", {})
        if metadata.get("annotations", {}).get("k8s.io/initial-events-end") == "true":
            ended, rv = True, metadata.get("resourceVersion")
            break
print(json.dumps({"added": sorted(added), "initial_events_end": ended, "resourceVersion": rv}))
