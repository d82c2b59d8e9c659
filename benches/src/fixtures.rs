//! A realistic pod and the messages that carry it.

use bytes::Bytes;
use transport::{Message, Route};

/// A pod JSON of about `target` bytes, shaped like what the API server stores: metadata with
/// labels, annotations and managed fields, two containers with env, ports, mounts and probes,
/// and a status with conditions and container statuses.
pub fn pod_json(name: &str, target: usize) -> Bytes {
    let mut env = String::new();
    let mut i = 0;
    let mut pod = render(name, &env);
    while pod.len() < target {
        if !env.is_empty() {
            env.push(',');
        }
        env.push_str(&format!(
            r#"{{"name":"SETTING_{i}","value":"value-of-setting-number-{i}"}}"#
        ));
        i += 1;
        pod = render(name, &env);
    }
    Bytes::from(pod)
}

fn render(name: &str, extra_env: &str) -> String {
    let comma = if extra_env.is_empty() { "" } else { "," };
    format!(
        r#"{{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"{name}","namespace":"default","uid":"6c1b0f0e-3f52-4c1e-9a3e-2f2f5e0c8d11","resourceVersion":"184467","creationTimestamp":"2026-11-20T10:00:00Z","labels":{{"app":"sensor-gateway","tier":"edge","version":"v1.4.2"}},"annotations":{{"kubectl.kubernetes.io/last-applied-configuration":"{{\"apiVersion\":\"v1\",\"kind\":\"Pod\"}}"}},"ownerReferences":[{{"apiVersion":"apps/v1","kind":"ReplicaSet","name":"sensor-gateway-7d9f8","uid":"0b7c4d3e-1a2b-4c5d-8e9f-a0b1c2d3e4f5","controller":true,"blockOwnerDeletion":true}}]}},"spec":{{"nodeName":"edge-node-0001","restartPolicy":"Always","terminationGracePeriodSeconds":30,"dnsPolicy":"ClusterFirst","serviceAccountName":"default","containers":[{{"name":"gateway","image":"registry.example.com/sensor-gateway:v1.4.2","args":["--listen=:8080","--mqtt=tcp://127.0.0.1:1883"],"ports":[{{"name":"http","containerPort":8080,"protocol":"TCP"}}],"env":[{{"name":"NODE_NAME","valueFrom":{{"fieldRef":{{"fieldPath":"spec.nodeName"}}}}}},{{"name":"LOG_LEVEL","value":"info"}}{comma}{extra_env}],"resources":{{"requests":{{"cpu":"100m","memory":"64Mi"}},"limits":{{"cpu":"500m","memory":"128Mi"}}}},"volumeMounts":[{{"name":"config","mountPath":"/etc/gateway"}},{{"name":"kube-api-access","mountPath":"/var/run/secrets/kubernetes.io/serviceaccount","readOnly":true}}],"livenessProbe":{{"httpGet":{{"path":"/healthz","port":8080}},"initialDelaySeconds":5,"periodSeconds":10}}}},{{"name":"log-shipper","image":"registry.example.com/log-shipper:2.1","ports":[],"env":[{{"name":"TARGET","value":"cloud"}}],"volumeMounts":[{{"name":"logs","mountPath":"/var/log/app"}}]}}],"volumes":[{{"name":"config","configMap":{{"name":"gateway-config"}}}},{{"name":"logs","emptyDir":{{}}}},{{"name":"kube-api-access","projected":{{"sources":[{{"serviceAccountToken":{{"path":"token","expirationSeconds":3607}}}}]}}}}]}},"status":{{"phase":"Running","hostIP":"10.0.0.17","podIP":"10.88.0.23","startTime":"2026-11-20T10:00:02Z","conditions":[{{"type":"Initialized","status":"True","lastTransitionTime":"2026-11-20T10:00:02Z"}},{{"type":"Ready","status":"True","lastTransitionTime":"2026-11-20T10:00:05Z"}},{{"type":"ContainersReady","status":"True","lastTransitionTime":"2026-11-20T10:00:05Z"}},{{"type":"PodScheduled","status":"True","lastTransitionTime":"2026-11-20T10:00:00Z"}}],"containerStatuses":[{{"name":"gateway","ready":true,"restartCount":0,"image":"registry.example.com/sensor-gateway:v1.4.2","imageID":"sha256:4f5e6d7c8b9a","containerID":"process://1234","state":{{"running":{{"startedAt":"2026-11-20T10:00:04Z"}}}}}}]}}}}"#
    )
}

/// The KubeEdge message an EdgeController sends when a pod changes.
pub fn pod_update_message(pod: Bytes) -> Message {
    let mut message = Message::new(
        Route::new(
            "edgecontroller",
            "resource",
            "update",
            "default/pod/sensor-gateway-7d9f8-abcde",
        ),
        pod,
    );
    message.header.resource_version = "184467".into();
    message
}

/// A message whose content is `size` bytes of JSON (a string), for throughput runs.
pub fn sized_message(size: usize) -> Message {
    let mut content = Vec::with_capacity(size);
    content.push(b'"');
    content.resize(size.saturating_sub(1).max(1), b'x');
    content.push(b'"');
    Message::new(
        Route::new(
            "edgecontroller",
            "resource",
            "update",
            "default/configmap/bulk",
        ),
        content,
    )
}

/// A ConfigMap-shaped JSON object of about `size` bytes: metadata plus `data` entries. The
/// structured payload a real link carries, unlike the opaque string of [`sized_message`].
pub fn object_message(size: usize) -> Message {
    let mut object = String::from(
        r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"gateway-config","namespace":"default","uid":"6c1b0f0e-3f52-4c1e-9a3e-2f2f5e0c8d11","resourceVersion":"184467","labels":{"app":"sensor-gateway","tier":"edge"}},"data":{"#,
    );
    let mut i = 0;
    while object.len() + 3 < size {
        if i > 0 {
            object.push(',');
        }
        object.push_str(&format!(
            r#""setting.{i}":"value-{i}","limit.{i}":"{}""#,
            i * 7
        ));
        i += 1;
    }
    object.push_str("}}");
    Message::new(
        Route::new(
            "edgecontroller",
            "resource",
            "update",
            "default/configmap/gateway-config",
        ),
        object,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_is_valid_json_of_the_requested_size() {
        for target in [3000, 4500, 6000] {
            let pod = pod_json("p", target);
            assert!(
                pod.len() >= target && pod.len() < target + 100,
                "{}",
                pod.len()
            );
            let value: serde_json::Value = serde_json::from_slice(&pod).unwrap();
            assert_eq!(value["kind"], "Pod");
        }
        for size in [1024, 65536] {
            let m = object_message(size);
            assert!(
                m.content.len() >= size - 100 && m.content.len() < size + 100,
                "{}",
                m.content.len()
            );
            let value: serde_json::Value = serde_json::from_slice(&m.content).unwrap();
            assert_eq!(value["kind"], "ConfigMap");
        }
        let m = sized_message(1024);
        assert_eq!(m.content.len(), 1024);
        assert!(m.to_kubeedge_json().is_ok());
    }
}
