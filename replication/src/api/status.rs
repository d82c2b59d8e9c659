//! API errors as Kubernetes `Status` objects.

use serde_json::{json, Value};

use crate::store::StoreError;

/// One cause of an error: a `StatusCause` (`reason`, `message`, `field`) in the `Status`'s
/// `details.causes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cause {
    /// The cause type, e.g. `FieldValueInvalid`, `FieldValueForbidden`,
    /// `ResourceVersionTooLarge`.
    pub reason: &'static str,
    /// The field's path (`spec.nodeName`); empty when the cause is not about a field.
    pub field: String,
    /// What is wrong, as apimachinery's `field.Error` words it.
    pub message: String,
}

impl Cause {
    /// A field cause worded as apimachinery's `field.Error` body (`"Forbidden: ..."`,
    /// `"Required value: ..."`, `"Unsupported value: ..."`, `"Invalid value: ..."`); the cause
    /// type follows from that wording, as the apiserver's does from the error type.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        let message = message.into();
        let reason = [
            ("Forbidden", "FieldValueForbidden"),
            ("Required value", "FieldValueRequired"),
            ("Unsupported value", "FieldValueNotSupported"),
            ("Duplicate value", "FieldValueDuplicate"),
            ("Too long", "FieldValueTooLong"),
            ("Too many", "FieldValueTooMany"),
        ]
        .into_iter()
        .find(|(prefix, _)| message.starts_with(prefix))
        .map_or("FieldValueInvalid", |(_, reason)| reason);
        Cause {
            reason,
            field: field.into(),
            message,
        }
    }
}

/// Why a request failed: a `metav1.StatusReason`, the `Status`'s `reason` (clients branch on
/// it: kubectl retries a `Conflict`, client-go's `IsNotFound` reads `NotFound`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatusReason {
    /// 400.
    BadRequest,
    /// 401: no or a wrong bearer token.
    Unauthorized,
    /// 403.
    Forbidden,
    /// 404.
    NotFound,
    /// 409: the object exists.
    AlreadyExists,
    /// 409: a stale resourceVersion or a field manager's conflict.
    Conflict,
    /// 410: a resourceVersion older than the watch history (re-list).
    Expired,
    /// 422: field causes in `details`.
    Invalid,
    /// 504: the request could not be served in time (a watch from the future, a node that
    /// does not answer).
    Timeout,
    /// 429.
    TooManyRequests,
    /// 405.
    MethodNotAllowed,
    /// 413.
    RequestEntityTooLarge,
    /// 415.
    UnsupportedMediaType,
    /// 500.
    InternalError,
    /// 503.
    ServiceUnavailable,
    /// 502: what the request was passed on to (the cloud, a node) answered nothing usable.
    /// Not one of apimachinery's constants; the code says as much to clients.
    BadGateway,
    /// Any other reason (apimachinery's `StatusReasonUnknown`, the empty string), as when a
    /// remote `Status` names one this list lacks.
    Unknown,
}

impl StatusReason {
    const ALL: [StatusReason; 17] = [
        StatusReason::BadRequest,
        StatusReason::Unauthorized,
        StatusReason::Forbidden,
        StatusReason::NotFound,
        StatusReason::AlreadyExists,
        StatusReason::Conflict,
        StatusReason::Expired,
        StatusReason::Invalid,
        StatusReason::Timeout,
        StatusReason::TooManyRequests,
        StatusReason::MethodNotAllowed,
        StatusReason::RequestEntityTooLarge,
        StatusReason::UnsupportedMediaType,
        StatusReason::InternalError,
        StatusReason::ServiceUnavailable,
        StatusReason::BadGateway,
        StatusReason::Unknown,
    ];

    /// The name on the wire (`NotFound`, ...; `Unknown` is the empty string).
    pub const fn as_str(self) -> &'static str {
        match self {
            StatusReason::BadRequest => "BadRequest",
            StatusReason::Unauthorized => "Unauthorized",
            StatusReason::Forbidden => "Forbidden",
            StatusReason::NotFound => "NotFound",
            StatusReason::AlreadyExists => "AlreadyExists",
            StatusReason::Conflict => "Conflict",
            StatusReason::Expired => "Expired",
            StatusReason::Invalid => "Invalid",
            StatusReason::Timeout => "Timeout",
            StatusReason::TooManyRequests => "TooManyRequests",
            StatusReason::MethodNotAllowed => "MethodNotAllowed",
            StatusReason::RequestEntityTooLarge => "RequestEntityTooLarge",
            StatusReason::UnsupportedMediaType => "UnsupportedMediaType",
            StatusReason::InternalError => "InternalError",
            StatusReason::ServiceUnavailable => "ServiceUnavailable",
            StatusReason::BadGateway => "BadGateway",
            StatusReason::Unknown => "",
        }
    }

    /// The reason a remote `Status` names; [`StatusReason::Unknown`] for one not listed here.
    pub fn parse(text: &str) -> StatusReason {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == text)
            .unwrap_or(StatusReason::Unknown)
    }
}

impl std::fmt::Display for StatusReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error the API answers with: HTTP code, `reason`, message and (for 422) field causes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code} {reason}: {message}")]
pub struct ApiError {
    /// The HTTP status code, also the `Status`'s `code`.
    pub code: u16,
    /// The `Status`'s `reason`.
    pub reason: StatusReason,
    /// The `Status`'s human-readable `message`.
    pub message: String,
    /// `details.causes`: the fields a 422 rejects.
    pub causes: Vec<Cause>,
    /// `details.kind`/`details.name` for clients that read them (boxed, as `more`: errors
    /// travel in `Result`s everywhere and stay small).
    pub details: Option<Box<(String, String)>>,
    /// The rarer `details` fields.
    pub more: Option<Box<MoreDetails>>,
}

/// `details` fields few errors have.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MoreDetails {
    /// `details.group`, when the kind is not in the core group.
    pub group: Option<&'static str>,
    /// `details.retryAfterSeconds`: when the client may try again.
    pub retry_after_seconds: Option<u64>,
}

impl ApiError {
    /// An error with this code, `reason` and message, without details.
    pub fn new(code: u16, reason: StatusReason, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
            causes: Vec::new(),
            details: None,
            more: None,
        }
    }

    /// 400 `BadRequest`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, StatusReason::BadRequest, message)
    }

    /// 404 `NotFound`: `{resource} "{name}" not found`, with `details` naming it.
    pub fn not_found(resource: &str, name: &str) -> Self {
        let mut e = Self::new(
            404,
            StatusReason::NotFound,
            format!("{resource} \"{name}\" not found"),
        );
        e.details = Some(Box::new((resource.to_owned(), name.to_owned())));
        e
    }

    /// 409 `AlreadyExists`, with `details` naming the object.
    pub fn already_exists(resource: &str, name: &str) -> Self {
        let mut e = Self::new(
            409,
            StatusReason::AlreadyExists,
            format!("{resource} \"{name}\" already exists"),
        );
        e.details = Some(Box::new((resource.to_owned(), name.to_owned())));
        e
    }

    /// 409 `Conflict`: a stale resourceVersion, worded as the apiserver's (clients retry on it).
    pub fn conflict(resource: &str, name: &str) -> Self {
        let mut e = Self::new(
            409,
            StatusReason::Conflict,
            format!(
                "Operation cannot be fulfilled on {resource} \"{name}\": the object has been \
                 modified; please apply your changes to the latest version and try again"
            ),
        );
        e.details = Some(Box::new((resource.to_owned(), name.to_owned())));
        e
    }

    /// 422 with field causes, worded like the apiserver's.
    pub fn invalid(kind: &str, name: &str, causes: Vec<Cause>) -> Self {
        let list: Vec<String> = causes
            .iter()
            .map(|c| format!("{}: {}", c.field, c.message))
            .collect();
        let mut e = Self::new(
            422,
            StatusReason::Invalid,
            format!("{kind} \"{name}\" is invalid: {}", list.join(", ")),
        );
        e.causes = causes;
        e.details = Some(Box::new((kind.to_owned(), name.to_owned())));
        e
    }

    /// 405 `MethodNotAllowed`.
    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(405, StatusReason::MethodNotAllowed, message)
    }

    /// 415 `UnsupportedMediaType`.
    pub fn unsupported_media_type(message: impl Into<String>) -> Self {
        Self::new(415, StatusReason::UnsupportedMediaType, message)
    }

    /// 410 with reason `Expired`: a resourceVersion older than the watch history (re-list).
    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(410, StatusReason::Expired, message)
    }

    /// 503 `ServiceUnavailable`.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(503, StatusReason::ServiceUnavailable, message)
    }

    /// 403 `Forbidden`.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(403, StatusReason::Forbidden, message)
    }

    /// 401 `Unauthorized` (no or a wrong bearer token).
    pub fn unauthorized() -> Self {
        Self::new(401, StatusReason::Unauthorized, "Unauthorized")
    }

    /// 500 `InternalError`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, StatusReason::InternalError, message)
    }

    /// 413 `RequestEntityTooLarge`.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(413, StatusReason::RequestEntityTooLarge, message)
    }

    /// A store error seen while serving `resource`/`name`.
    pub fn from_store(err: StoreError, resource: &str, name: &str) -> Self {
        match err {
            StoreError::NotFound(_) => Self::not_found(resource, name),
            StoreError::AlreadyExists(_) => Self::already_exists(resource, name),
            StoreError::Conflict { .. } => Self::conflict(resource, name),
            StoreError::Key(e) => Self::bad_request(e.to_string()),
            StoreError::Unavailable(e) => Self::unavailable(format!("storage: {e}")),
            other => Self::internal(other.to_string()),
        }
    }

    /// The `Status` object.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason.as_str(),
            "code": self.code,
        });
        let more = self.more.as_deref().cloned().unwrap_or_default();
        // kube-apiserver's NotFound always has `details` (empty for an unknown resource);
        // kubectl debug dereferences it.
        if self.details.is_some()
            || !self.causes.is_empty()
            || more.retry_after_seconds.is_some()
            || self.code == 404
        {
            let mut details = json!({});
            if let Some((kind, name)) = self.details.as_deref() {
                details["name"] = json!(name);
                if let Some(group) = more.group {
                    details["group"] = json!(group);
                }
                details["kind"] = json!(kind);
            }
            if !self.causes.is_empty() {
                details["causes"] = self
                    .causes
                    .iter()
                    .map(|c| {
                        let mut cause = json!({"reason": c.reason, "message": c.message});
                        if !c.field.is_empty() {
                            cause["field"] = json!(c.field);
                        }
                        cause
                    })
                    .collect();
            }
            if let Some(seconds) = more.retry_after_seconds {
                details["retryAfterSeconds"] = json!(seconds);
            }
            status["details"] = details;
        }
        status
    }
}

/// A success `Status` (answers to some deletes).
pub fn success_status(kind: &str, name: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": {"name": name, "kind": kind},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_read_back_from_their_names() {
        for reason in StatusReason::ALL {
            assert_eq!(StatusReason::parse(reason.as_str()), reason);
        }
        assert_eq!(StatusReason::parse("SomethingNew"), StatusReason::Unknown);
        assert_eq!(
            ApiError::conflict("pods", "p").to_status()["reason"],
            "Conflict"
        );
    }

    #[test]
    fn a_not_found_always_has_details() {
        // kubectl debug reads `details` of a 404 for an unknown subresource and panics without.
        let unknown = ApiError::new(
            404,
            StatusReason::NotFound,
            "the server could not find the requested resource",
        );
        assert_eq!(unknown.to_status()["details"], json!({}));
        let named = ApiError::not_found("pods", "p");
        assert_eq!(named.to_status()["details"]["name"], "p");
        assert!(ApiError::bad_request("x")
            .to_status()
            .get("details")
            .is_none());
    }
}
