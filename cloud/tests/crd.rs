//! CustomResourceDefinitions on the real cloudcore binary, driven with the real kubectl.

mod common;

use common::CloudProcess;

const CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.example.com
spec:
  group: example.com
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, shortNames: [wd]}
  versions:
  - name: v1
    served: true
    storage: true
    subresources:
      status: {}
      scale: {specReplicasPath: .spec.replicas, statusReplicasPath: .status.replicas}
    additionalPrinterColumns:
    - {name: Replicas, type: integer, jsonPath: .spec.replicas}
    - {name: Color, type: string, jsonPath: .spec.color}
    - {name: Ready, type: string, jsonPath: '.status.conditions[?(@.type=="Ready")].status'}
    - {name: Owner, type: string, jsonPath: .spec.owner, priority: 1}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            description: What the widget should be.
            required: [replicas]
            properties:
              replicas: {type: integer, minimum: 0, description: How many widgets to keep.}
              color: {type: string, enum: [red, blue], default: red}
              owner: {type: string}
          status:
            type: object
            properties:
              replicas: {type: integer}
              conditions:
                type: array
                items:
                  type: object
                  properties:
                    type: {type: string}
                    status: {type: string}
  - name: v1beta1
    served: true
    storage: false
    schema:
      openAPIV3Schema:
        type: object
        x-kubernetes-preserve-unknown-fields: true
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: gateways.net.example.com
spec:
  group: net.example.com
  scope: Cluster
  names: {plural: gateways, kind: Gateway}
  versions:
  - name: v1alpha1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec: {type: object, x-kubernetes-preserve-unknown-fields: true}
"#;

const WIDGET: &str = r#"
apiVersion: example.com/v1
kind: Widget
metadata: {name: w1}
spec: {replicas: 2, owner: ops, unknownField: dropped}
"#;

#[test]
fn custom_resources_through_kubectl() {
    let dir = tempfile::tempdir().unwrap();
    let mut cloud = CloudProcess::start(dir.path());

    let out = cloud.kubectl_stdin(&["apply", "-f", "-"], CRD);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    cloud.ok(&[
        "wait",
        "--for=condition=established",
        "crd/widgets.example.com",
        "--timeout=10s",
    ]);
    let resources = cloud.ok(&["api-resources", "--api-group=example.com"]);
    assert!(
        resources.contains("widgets") && resources.contains("wd"),
        "{resources}"
    );

    // kubectl's default (fieldValidation=Strict) refuses the undeclared field, as
    // kube-apiserver does; with warnings only it is pruned, and the default applied.
    let out = cloud.kubectl_stdin(&["apply", "-f", "-"], WIDGET);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("strict decoding error: unknown field \"spec.unknownField\""),
        "{err}"
    );
    let out = cloud.kubectl_stdin(&["apply", "--validate=warn", "-f", "-"], WIDGET);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("unknown field \"spec.unknownField\""),
        "no warning: {err}"
    );
    let spec = cloud.ok(&["get", "wd", "w1", "-o", "jsonpath={.spec}"]);
    let spec: serde_json::Value = serde_json::from_str(&spec).unwrap();
    assert_eq!(
        spec,
        serde_json::json!({"replicas": 2, "owner": "ops", "color": "red"})
    );

    // Schema violations are 422 with one cause per field.
    let out = cloud.kubectl_stdin(
        &["apply", "-f", "-"],
        "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: bad}\n\
         spec: {replicas: two, color: green}\n",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("Widget.example.com \"bad\" is invalid"),
        "{err}"
    );
    assert!(
        err.contains("spec.replicas: Invalid value: \"two\": spec.replicas in body must be of type integer: \"string\""),
        "{err}"
    );
    assert!(
        err.contains("spec.color: Unsupported value: \"green\""),
        "{err}"
    );
    let out = cloud.kubectl_stdin(
        &["create", "-f", "-"],
        "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: bad}\nspec: {}\n",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("spec.replicas: Required value"), "{err}");

    // The status subresource: only /status writes status, and a spec write keeps it.
    cloud.ok(&[
        "patch",
        "widget",
        "w1",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"replicas":2,"conditions":[{"type":"Ready","status":"True"}]},"spec":{"replicas":9}}"#,
    ]);
    cloud.ok(&[
        "patch",
        "widget",
        "w1",
        "--type=merge",
        "-p",
        r#"{"spec":{"color":"blue"},"status":{"replicas":7}}"#,
    ]);
    let got = cloud.ok(&[
        "get",
        "widget",
        "w1",
        "-o",
        "jsonpath={.spec.replicas} {.spec.color} {.status.replicas}",
    ]);
    assert_eq!(got, "2 blue 2");

    // The scale subresource over the CRD's paths.
    cloud.ok(&["scale", "widget", "w1", "--replicas=4"]);
    let replicas = cloud.ok(&["get", "widget", "w1", "-o", "jsonpath={.spec.replicas}"]);
    assert_eq!(replicas, "4");

    // Printer columns (priority 1 only with -o wide).
    let table = cloud.ok(&["get", "widgets"]);
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "REPLICAS", "COLOR", "READY"], "{table}");
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(row, ["w1", "4", "blue", "True"], "{table}");
    let wide = cloud.ok(&["get", "widgets", "-o", "wide"]);
    assert!(wide.lines().next().unwrap().contains("OWNER"), "{wide}");
    assert!(wide.contains("ops"), "{wide}");

    // Another served version: the same object, at that apiVersion (conversion None).
    let version = cloud.ok(&[
        "get",
        "widgets.v1beta1.example.com",
        "w1",
        "-o",
        "jsonpath={.apiVersion}",
    ]);
    assert_eq!(version, "example.com/v1beta1");

    // explain reads the CRD's schema from OpenAPI v3.
    let explained = cloud.ok(&["explain", "widget.spec.replicas"]);
    assert!(
        explained.contains("How many widgets to keep."),
        "{explained}"
    );

    // ...and the built-in kinds' schemas (k8s-openapi's, with the upstream descriptions).
    let explained = cloud.ok(&["explain", "pod.spec.containers.image"]);
    assert!(explained.contains("Container image name"), "{explained}");
    let explained = cloud.ok(&["explain", "statefulset.spec.podManagementPolicy"]);
    assert!(explained.contains("OrderedReady"), "{explained}");

    // A cluster-scoped custom resource.
    cloud.ok(&[
        "wait",
        "--for=condition=established",
        "crd/gateways.net.example.com",
        "--timeout=10s",
    ]);
    let out = cloud.kubectl_stdin(
        &["apply", "-f", "-"],
        "apiVersion: net.example.com/v1alpha1\nkind: Gateway\nmetadata: {name: edge}\n\
         spec: {anything: {goes: 1}}\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let goes = cloud.ok(&[
        "get",
        "gateway",
        "edge",
        "-o",
        "jsonpath={.spec.anything.goes}",
    ]);
    assert_eq!(goes, "1");
    let header = cloud.ok(&["get", "gateways"]);
    assert!(
        header.starts_with("NAME") && header.contains("AGE"),
        "{header}"
    );

    // Definitions and objects survive a kill -9.
    cloud.restart_after_kill9(&[]);
    let names = cloud.ok(&["get", "widgets", "-o", "name"]);
    assert_eq!(names.trim(), "widget.example.com/w1");

    // Deleting the CRD deletes its objects; re-creating it serves an empty collection.
    cloud.ok(&["delete", "crd", "widgets.example.com"]);
    let out = cloud.kubectl(&["get", "widgets"]);
    assert!(!out.status.success());
    let out = cloud.kubectl_stdin(&["apply", "-f", "-"], CRD);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let left = cloud.ok(&["get", "widgets", "-A", "-o", "name"]);
    assert_eq!(left.trim(), "", "objects outlived their CRD");

    // An invalid definition is refused with its causes.
    let out = cloud.kubectl_stdin(
        &["apply", "-f", "-"],
        "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\n\
         metadata: {name: things.apps}\n\
         spec: {group: apps, scope: Namespaced, names: {plural: things, kind: Thing}, \
         versions: []}\n",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("spec.group"), "{err}");
}
