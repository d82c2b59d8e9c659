//! Request bodies in Kubernetes' protobuf encoding, for the kinds kubectl's generators create
//! (`kubectl create namespace|configmap|secret|service`): client-go sends those as protobuf and
//! does not fall back to JSON. Answers are always JSON (clients accept it).
//!
//! A small schema-driven decoder: the envelope (`k8s\0` + `runtime.Unknown`), then the object's
//! fields by number, per Kubernetes' `generated.proto`. Only the kinds and fields listed here are
//! understood; any other non-empty field is refused (415) rather than dropped.

use serde_json::{json, Map, Value};

use super::status::ApiError;

/// The media type of Kubernetes' protobuf encoding.
pub const CONTENT_TYPE: &str = "application/vnd.kubernetes.protobuf";
const MAGIC: &[u8] = b"k8s\x00";

#[derive(Clone, Copy)]
enum Ty {
    Str,
    Int,
    /// A Go pointer (`*int32`): present means set, zero included.
    PtrInt,
    Bool,
    Msg(&'static [Field]),
    StrMap,
    BytesMap,
    RepStr,
    RepMsg(&'static [Field]),
    Time,
    IntOrStr,
}

struct Field(u64, &'static str, Ty);

const OBJECT_META: &[Field] = &[
    Field(1, "name", Ty::Str),
    Field(2, "generateName", Ty::Str),
    Field(3, "namespace", Ty::Str),
    Field(5, "uid", Ty::Str),
    Field(6, "resourceVersion", Ty::Str),
    Field(7, "generation", Ty::Int),
    Field(8, "creationTimestamp", Ty::Time),
    Field(11, "labels", Ty::StrMap),
    Field(12, "annotations", Ty::StrMap),
    Field(13, "ownerReferences", Ty::RepMsg(OWNER_REFERENCE)),
    Field(14, "finalizers", Ty::RepStr),
];

/// meta/v1 OwnerReference (`kubectl create job --from=cronjob/…` sets one).
const OWNER_REFERENCE: &[Field] = &[
    Field(1, "kind", Ty::Str),
    Field(3, "name", Ty::Str),
    Field(4, "uid", Ty::Str),
    Field(5, "apiVersion", Ty::Str),
    Field(6, "controller", Ty::Bool),
    Field(7, "blockOwnerDeletion", Ty::Bool),
];

const NAMESPACE: &[Field] = &[
    Field(1, "metadata", Ty::Msg(OBJECT_META)),
    Field(2, "spec", Ty::Msg(&[Field(1, "finalizers", Ty::RepStr)])),
    Field(3, "status", Ty::Msg(&[Field(1, "phase", Ty::Str)])),
];

const CONFIG_MAP: &[Field] = &[
    Field(1, "metadata", Ty::Msg(OBJECT_META)),
    Field(2, "data", Ty::StrMap),
    Field(3, "binaryData", Ty::BytesMap),
    Field(4, "immutable", Ty::Bool),
];

const SECRET: &[Field] = &[
    Field(1, "metadata", Ty::Msg(OBJECT_META)),
    Field(2, "data", Ty::BytesMap),
    Field(3, "type", Ty::Str),
    Field(4, "stringData", Ty::StrMap),
    Field(5, "immutable", Ty::Bool),
];

const SERVICE_PORT: &[Field] = &[
    Field(1, "name", Ty::Str),
    Field(2, "protocol", Ty::Str),
    Field(3, "port", Ty::Int),
    Field(4, "targetPort", Ty::IntOrStr),
    Field(5, "nodePort", Ty::Int),
    Field(6, "appProtocol", Ty::Str),
];

const SERVICE: &[Field] = &[
    Field(1, "metadata", Ty::Msg(OBJECT_META)),
    Field(
        2,
        "spec",
        Ty::Msg(&[
            Field(1, "ports", Ty::RepMsg(SERVICE_PORT)),
            Field(2, "selector", Ty::StrMap),
            Field(3, "clusterIP", Ty::Str),
            Field(4, "type", Ty::Str),
            Field(5, "externalIPs", Ty::RepStr),
            Field(7, "sessionAffinity", Ty::Str),
            Field(10, "externalName", Ty::Str),
            Field(18, "clusterIPs", Ty::RepStr),
        ]),
    ),
    Field(3, "status", Ty::Msg(&[])),
];

const LABEL_SELECTOR: &[Field] = &[
    Field(1, "matchLabels", Ty::StrMap),
    Field(
        2,
        "matchExpressions",
        Ty::RepMsg(&[
            Field(1, "key", Ty::Str),
            Field(2, "operator", Ty::Str),
            Field(3, "values", Ty::RepStr),
        ]),
    ),
];

const CONTAINER: &[Field] = &[
    Field(1, "name", Ty::Str),
    Field(2, "image", Ty::Str),
    Field(3, "command", Ty::RepStr),
    Field(4, "args", Ty::RepStr),
    Field(5, "workingDir", Ty::Str),
    Field(
        6,
        "ports",
        Ty::RepMsg(&[
            Field(1, "name", Ty::Str),
            Field(2, "hostPort", Ty::Int),
            Field(3, "containerPort", Ty::Int),
            Field(4, "protocol", Ty::Str),
            Field(5, "hostIP", Ty::Str),
        ]),
    ),
    Field(
        7,
        "env",
        Ty::RepMsg(&[Field(1, "name", Ty::Str), Field(2, "value", Ty::Str)]),
    ),
    Field(13, "terminationMessagePath", Ty::Str),
    Field(14, "imagePullPolicy", Ty::Str),
    Field(16, "stdin", Ty::Bool),
    Field(17, "stdinOnce", Ty::Bool),
    Field(18, "tty", Ty::Bool),
    Field(20, "terminationMessagePolicy", Ty::Str),
];

const POD_TEMPLATE_SPEC: &[Field] = &[
    Field(1, "metadata", Ty::Msg(OBJECT_META)),
    Field(
        2,
        "spec",
        Ty::Msg(&[
            Field(2, "containers", Ty::RepMsg(CONTAINER)),
            Field(3, "restartPolicy", Ty::Str),
            Field(4, "terminationGracePeriodSeconds", Ty::Int),
            Field(6, "dnsPolicy", Ty::Str),
            Field(7, "nodeSelector", Ty::StrMap),
            Field(8, "serviceAccountName", Ty::Str),
            Field(10, "nodeName", Ty::Str),
            Field(11, "hostNetwork", Ty::Bool),
            Field(19, "schedulerName", Ty::Str),
            Field(20, "initContainers", Ty::RepMsg(CONTAINER)),
        ]),
    ),
];

/// apps/v1 Deployment, as `kubectl create deployment` builds it.
const DEPLOYMENT: &[Field] = &[
    Field(1, "metadata", Ty::Msg(OBJECT_META)),
    Field(
        2,
        "spec",
        Ty::Msg(&[
            Field(1, "replicas", Ty::PtrInt),
            Field(2, "selector", Ty::Msg(LABEL_SELECTOR)),
            Field(3, "template", Ty::Msg(POD_TEMPLATE_SPEC)),
            Field(
                4,
                "strategy",
                Ty::Msg(&[
                    Field(1, "type", Ty::Str),
                    Field(
                        2,
                        "rollingUpdate",
                        Ty::Msg(&[
                            Field(1, "maxUnavailable", Ty::IntOrStr),
                            Field(2, "maxSurge", Ty::IntOrStr),
                        ]),
                    ),
                ]),
            ),
            Field(5, "minReadySeconds", Ty::Int),
            Field(6, "revisionHistoryLimit", Ty::Int),
            Field(7, "paused", Ty::Bool),
            Field(9, "progressDeadlineSeconds", Ty::Int),
        ]),
    ),
    Field(3, "status", Ty::Msg(&[])),
];

/// batch/v1 JobSpec.
const JOB_SPEC: &[Field] = &[
    Field(1, "parallelism", Ty::PtrInt),
    Field(2, "completions", Ty::PtrInt),
    Field(3, "activeDeadlineSeconds", Ty::PtrInt),
    Field(4, "selector", Ty::Msg(LABEL_SELECTOR)),
    Field(5, "manualSelector", Ty::Bool),
    Field(6, "template", Ty::Msg(POD_TEMPLATE_SPEC)),
    Field(7, "backoffLimit", Ty::PtrInt),
    Field(8, "ttlSecondsAfterFinished", Ty::PtrInt),
    Field(9, "completionMode", Ty::Str),
    Field(10, "suspend", Ty::Bool),
];

/// batch/v1 Job, as `kubectl create job` builds it (also `--from=cronjob/…`).
const JOB: &[Field] = &[
    Field(1, "metadata", Ty::Msg(OBJECT_META)),
    Field(2, "spec", Ty::Msg(JOB_SPEC)),
    Field(3, "status", Ty::Msg(&[])),
];

/// batch/v1 CronJob, as `kubectl create cronjob` builds it.
const CRON_JOB: &[Field] = &[
    Field(1, "metadata", Ty::Msg(OBJECT_META)),
    Field(
        2,
        "spec",
        Ty::Msg(&[
            Field(1, "schedule", Ty::Str),
            Field(2, "startingDeadlineSeconds", Ty::PtrInt),
            Field(3, "concurrencyPolicy", Ty::Str),
            Field(4, "suspend", Ty::Bool),
            Field(
                5,
                "jobTemplate",
                Ty::Msg(&[
                    Field(1, "metadata", Ty::Msg(OBJECT_META)),
                    Field(2, "spec", Ty::Msg(JOB_SPEC)),
                ]),
            ),
            Field(6, "successfulJobsHistoryLimit", Ty::PtrInt),
            Field(7, "failedJobsHistoryLimit", Ty::PtrInt),
            Field(8, "timeZone", Ty::Str),
        ]),
    ),
    Field(3, "status", Ty::Msg(&[])),
];

/// authorization.k8s.io/v1 SelfSubjectAccessReview (`kubectl auth can-i`).
const SELF_SUBJECT_ACCESS_REVIEW: &[Field] = &[
    Field(1, "metadata", Ty::Msg(OBJECT_META)),
    Field(
        2,
        "spec",
        Ty::Msg(&[
            Field(
                1,
                "resourceAttributes",
                Ty::Msg(&[
                    Field(1, "namespace", Ty::Str),
                    Field(2, "verb", Ty::Str),
                    Field(3, "group", Ty::Str),
                    Field(4, "version", Ty::Str),
                    Field(5, "resource", Ty::Str),
                    Field(6, "subresource", Ty::Str),
                    Field(7, "name", Ty::Str),
                ]),
            ),
            Field(
                2,
                "nonResourceAttributes",
                Ty::Msg(&[Field(1, "path", Ty::Str), Field(2, "verb", Ty::Str)]),
            ),
        ]),
    ),
    Field(3, "status", Ty::Msg(&[])),
];

/// authorization.k8s.io/v1 SelfSubjectRulesReview (`kubectl auth can-i --list`).
const SELF_SUBJECT_RULES_REVIEW: &[Field] = &[
    Field(1, "metadata", Ty::Msg(OBJECT_META)),
    Field(2, "spec", Ty::Msg(&[Field(1, "namespace", Ty::Str)])),
    Field(3, "status", Ty::Msg(&[])),
];

/// meta/v1 DeleteOptions, as `kubectl drain` sends it.
const DELETE_OPTIONS: &[Field] = &[
    Field(1, "gracePeriodSeconds", Ty::PtrInt),
    Field(
        2,
        "preconditions",
        Ty::Msg(&[
            Field(1, "uid", Ty::Str),
            Field(2, "resourceVersion", Ty::Str),
        ]),
    ),
    Field(3, "orphanDependents", Ty::Bool),
    Field(4, "propagationPolicy", Ty::Str),
    Field(5, "dryRun", Ty::RepStr),
];

/// `rbac/v1` `PolicyRule`.
const POLICY_RULE: &[Field] = &[
    Field(1, "verbs", Ty::RepStr),
    Field(2, "apiGroups", Ty::RepStr),
    Field(3, "resources", Ty::RepStr),
    Field(4, "resourceNames", Ty::RepStr),
    Field(5, "nonResourceURLs", Ty::RepStr),
];

/// `rbac/v1` `ClusterRole` (`kubectl create clusterrole`).
const CLUSTER_ROLE: &[Field] = &[
    Field(1, "metadata", Ty::Msg(OBJECT_META)),
    Field(2, "rules", Ty::RepMsg(POLICY_RULE)),
];

/// `rbac/v1` `ClusterRoleBinding` (`kubectl create clusterrolebinding`).
const CLUSTER_ROLE_BINDING: &[Field] = &[
    Field(1, "metadata", Ty::Msg(OBJECT_META)),
    Field(
        2,
        "subjects",
        Ty::RepMsg(&[
            Field(1, "kind", Ty::Str),
            Field(2, "apiGroup", Ty::Str),
            Field(3, "name", Ty::Str),
            Field(4, "namespace", Ty::Str),
        ]),
    ),
    Field(
        3,
        "roleRef",
        Ty::Msg(&[
            Field(1, "apiGroup", Ty::Str),
            Field(2, "kind", Ty::Str),
            Field(3, "name", Ty::Str),
        ]),
    ),
];

fn schema(kind: &str) -> Option<&'static [Field]> {
    Some(match kind {
        "DeleteOptions" => DELETE_OPTIONS,
        "Namespace" => NAMESPACE,
        "ConfigMap" => CONFIG_MAP,
        "Secret" => SECRET,
        "Service" => SERVICE,
        "Deployment" => DEPLOYMENT,
        "Job" => JOB,
        "SelfSubjectAccessReview" => SELF_SUBJECT_ACCESS_REVIEW,
        "SelfSubjectRulesReview" => SELF_SUBJECT_RULES_REVIEW,
        "SelfSubjectReview" => &[
            Field(1, "metadata", Ty::Msg(OBJECT_META)),
            Field(2, "status", Ty::Msg(&[Field(1, "userInfo", Ty::Msg(&[]))])),
        ],
        "CronJob" => CRON_JOB,
        "ClusterRole" => CLUSTER_ROLE,
        "ClusterRoleBinding" => CLUSTER_ROLE_BINDING,
        _ => return None,
    })
}

fn unsupported(message: String) -> ApiError {
    ApiError::unsupported_media_type(format!("{message}; send this object as JSON"))
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

enum Wire<'a> {
    Varint(u64),
    Fixed,
    Len(&'a [u8]),
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, at: 0 }
    }

    fn varint(&mut self) -> Result<u64, ApiError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self
                .bytes
                .get(self.at)
                .ok_or_else(|| ApiError::bad_request("truncated protobuf body"))?;
            self.at += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(ApiError::bad_request("malformed protobuf varint"))
    }

    fn next(&mut self) -> Result<Option<(u64, Wire<'a>)>, ApiError> {
        if self.at >= self.bytes.len() {
            return Ok(None);
        }
        let tag = self.varint()?;
        let wire = match tag & 7 {
            0 => Wire::Varint(self.varint()?),
            1 | 5 => {
                let width = if tag & 7 == 1 { 8 } else { 4 };
                if self.at + width > self.bytes.len() {
                    return Err(ApiError::bad_request("truncated protobuf body"));
                }
                self.at += width;
                Wire::Fixed
            }
            2 => {
                let len = usize::try_from(self.varint()?)
                    .map_err(|_| ApiError::bad_request("protobuf length overflows"))?;
                let end = self
                    .at
                    .checked_add(len)
                    .filter(|end| *end <= self.bytes.len())
                    .ok_or_else(|| ApiError::bad_request("truncated protobuf body"))?;
                let slice = &self.bytes[self.at..end];
                self.at = end;
                Wire::Len(slice)
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "protobuf wire type {other} is not supported"
                )))
            }
        };
        Ok(Some((tag >> 3, wire)))
    }
}

fn text(bytes: &[u8]) -> Result<String, ApiError> {
    String::from_utf8(bytes.to_vec())
        .map_err(|_| ApiError::bad_request("protobuf string is not UTF-8"))
}

fn base64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A map entry message: field 1 key, field 2 value.
fn map_entry(bytes: &[u8]) -> Result<(String, &[u8]), ApiError> {
    let mut reader = Reader::new(bytes);
    let (mut key, mut value) = (String::new(), &[][..]);
    while let Some((field, wire)) = reader.next()? {
        match (field, wire) {
            (1, Wire::Len(b)) => key = text(b)?,
            (2, Wire::Len(b)) => value = b,
            _ => return Err(ApiError::bad_request("malformed protobuf map entry")),
        }
    }
    Ok((key, value))
}

fn decode_message(
    bytes: &[u8],
    fields: &'static [Field],
    path: &str,
) -> Result<Map<String, Value>, ApiError> {
    let mut out = Map::new();
    let mut reader = Reader::new(bytes);
    while let Some((number, wire)) = reader.next()? {
        let Some(Field(_, name, ty)) = fields.iter().find(|f| f.0 == number) else {
            // A default value (empty string or message, zero) carries nothing to lose: Go
            // encodes every non-pointer field, so unknown fields at their default are common.
            if matches!(wire, Wire::Len(b) if b.is_empty()) || matches!(wire, Wire::Varint(0)) {
                continue;
            }
            return Err(unsupported(format!(
                "protobuf field {number} of {path} is not supported"
            )));
        };
        let field_path = format!("{path}.{name}");
        match (ty, wire) {
            // Defaults are omitted, as the JSON encoding omits them.
            (Ty::Str, Wire::Len([])) | (Ty::Int | Ty::Bool, Wire::Varint(0)) => {}
            (Ty::Str, Wire::Len(b)) => {
                out.insert((*name).into(), json!(text(b)?));
            }
            (Ty::Int | Ty::PtrInt, Wire::Varint(v)) => {
                out.insert((*name).into(), json!(v as i64));
            }
            (Ty::Bool, Wire::Varint(v)) => {
                out.insert((*name).into(), json!(v != 0));
            }
            (Ty::Msg(inner), Wire::Len(b)) => {
                out.insert(
                    (*name).into(),
                    Value::Object(decode_message(b, inner, &field_path)?),
                );
            }
            (Ty::RepMsg(inner), Wire::Len(b)) => {
                let item = Value::Object(decode_message(b, inner, &field_path)?);
                let list = out.entry(*name).or_insert_with(|| json!([]));
                if let Some(list) = list.as_array_mut() {
                    list.push(item);
                }
            }
            (Ty::RepStr, Wire::Len(b)) => {
                let item = json!(text(b)?);
                let list = out.entry(*name).or_insert_with(|| json!([]));
                if let Some(list) = list.as_array_mut() {
                    list.push(item);
                }
            }
            (Ty::StrMap | Ty::BytesMap, Wire::Len(b)) => {
                let (key, value) = map_entry(b)?;
                let value = match ty {
                    Ty::StrMap => json!(text(value)?),
                    _ => json!(base64(value)),
                };
                let map = out.entry(*name).or_insert_with(|| json!({}));
                if let Some(map) = map.as_object_mut() {
                    map.insert(key, value);
                }
            }
            (Ty::Time, Wire::Len(b)) => {
                // Time{seconds=1, nanos=2}; the zero time (empty) is JSON null.
                let mut reader = Reader::new(b);
                let mut seconds = None;
                while let Some((field, wire)) = reader.next()? {
                    if let (1, Wire::Varint(s)) = (field, wire) {
                        seconds = Some(s as i64);
                    }
                }
                if let Some(s) = seconds {
                    let t = time::OffsetDateTime::from_unix_timestamp(s)
                        .map_err(|_| ApiError::bad_request("protobuf time out of range"))?;
                    out.insert((*name).into(), json!(super::object::rfc3339(t)));
                }
            }
            (Ty::IntOrStr, Wire::Len(b)) => {
                // IntOrString{type=1 (0 int, 1 string), intVal=2, strVal=3}.
                let mut reader = Reader::new(b);
                let (mut kind, mut int, mut string) = (0, 0i64, String::new());
                while let Some((field, wire)) = reader.next()? {
                    match (field, wire) {
                        (1, Wire::Varint(v)) => kind = v,
                        (2, Wire::Varint(v)) => int = v as i32 as i64,
                        (3, Wire::Len(s)) => string = text(s)?,
                        _ => {}
                    }
                }
                out.insert(
                    (*name).into(),
                    if kind == 1 { json!(string) } else { json!(int) },
                );
            }
            _ => {
                return Err(ApiError::bad_request(format!(
                    "protobuf field {field_path} has an unexpected wire type"
                )));
            }
        }
    }
    Ok(out)
}

/// Decodes a protobuf request body into the JSON object it stands for.
///
/// # Errors
/// 400 `BadRequest` for a body without the `k8s\0` envelope, or that is not well-formed
/// protobuf (truncated, a bad varint or wire type, a string that is not UTF-8); 415
/// `UnsupportedMediaType` for a kind, or a non-empty field, the decoder does not know.
pub fn decode(body: &[u8]) -> Result<Value, ApiError> {
    let unknown = body
        .strip_prefix(MAGIC)
        .ok_or_else(|| ApiError::bad_request("protobuf body without the k8s envelope"))?;
    let (mut api_version, mut kind, mut raw) = (String::new(), String::new(), &[][..]);
    let mut reader = Reader::new(unknown);
    while let Some((field, wire)) = reader.next()? {
        match (field, wire) {
            (1, Wire::Len(type_meta)) => {
                let mut r = Reader::new(type_meta);
                while let Some((f, w)) = r.next()? {
                    match (f, w) {
                        (1, Wire::Len(b)) => api_version = text(b)?,
                        (2, Wire::Len(b)) => kind = text(b)?,
                        _ => {}
                    }
                }
            }
            (2, Wire::Len(b)) => raw = b,
            _ => {}
        }
    }
    let fields = schema(&kind).ok_or_else(|| {
        unsupported(format!(
            "protobuf bodies of kind {kind:?} are not supported"
        ))
    })?;
    let mut object = decode_message(raw, fields, &kind)?;
    object.insert("apiVersion".into(), json!(api_version));
    object.insert("kind".into(), json!(kind));
    Ok(Value::Object(object))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn len_field(number: u64, bytes: &[u8]) -> Vec<u8> {
        let mut out = vec![(number << 3 | 2) as u8, bytes.len() as u8];
        out.extend_from_slice(bytes);
        out
    }

    #[test]
    fn decodes_the_delete_options_kubectl_drain_sends() {
        // gracePeriodSeconds 0 (a pointer: present even when zero), propagationPolicy.
        let raw = [vec![1 << 3, 0], len_field(4, b"Background")].concat();
        let type_meta = [
            len_field(1, b"meta.k8s.io/v1"),
            len_field(2, b"DeleteOptions"),
        ]
        .concat();
        let body = [MAGIC.to_vec(), len_field(1, &type_meta), len_field(2, &raw)].concat();
        let v = decode(&body).unwrap();
        assert_eq!(v["gracePeriodSeconds"], 0);
        assert_eq!(v["propagationPolicy"], "Background");
        assert_eq!(v["kind"], "DeleteOptions");
    }

    #[test]
    fn decodes_a_configmap_envelope() {
        let meta = [
            len_field(1, b"cm1"),
            len_field(11, &[len_field(1, b"app"), len_field(2, b"web")].concat()),
        ]
        .concat();
        let data = len_field(2, &[len_field(1, b"k"), len_field(2, b"v")].concat());
        let raw = [len_field(1, &meta), data].concat();
        let type_meta = [len_field(1, b"v1"), len_field(2, b"ConfigMap")].concat();
        let body = [MAGIC.to_vec(), len_field(1, &type_meta), len_field(2, &raw)].concat();
        let v = decode(&body).unwrap();
        assert_eq!(
            v,
            json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "cm1", "labels": {"app": "web"}}, "data": {"k": "v"}})
        );
        assert_eq!(base64(b"hello"), "aGVsbG8=");
        assert!(decode(b"k8s\x00\x0a\xff").is_err());
        assert!(decode(b"nope").is_err());
    }
}
