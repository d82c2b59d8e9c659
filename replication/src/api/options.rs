//! The consistency options of a list or watch (`resourceVersion`, `resourceVersionMatch`,
//! `sendInitialEvents`), checked as kube-apiserver checks its `ListOptions`
//! (`k8s.io/apimachinery/pkg/apis/meta/internalversion/validation.ValidateListOptions`, with the
//! WatchList feature on): an invalid combination is a `422 Invalid` `Status` about the kind
//! `ListOptions.meta.k8s.io`, one cause per problem, before anything is served.

use super::status::StatusReason;
use super::status::{ApiError, Cause};
use super::Query;

/// `resourceVersionMatch=NotOlderThan`.
pub(crate) const NOT_OLDER_THAN: &str = "NotOlderThan";
/// `resourceVersionMatch=Exact`.
pub(crate) const EXACT: &str = "Exact";

/// `sendInitialEvents` as given: `None` when absent (Go's `*bool` left nil). Values are read
/// as Go's `strconv.ParseBool` reads them; anything else is a 400.
pub(crate) fn send_initial_events(query: &Query) -> Result<Option<bool>, ApiError> {
    let Some(value) = query.get("sendInitialEvents") else {
        return Ok(None);
    };
    match value.as_str() {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(Some(true)),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(Some(false)),
        other => Err(ApiError::bad_request(format!(
            "sendInitialEvents: invalid value {other:?}: expected true or false"
        ))),
    }
}

fn forbidden(message: &str) -> Cause {
    Cause::new("resourceVersionMatch", format!("Forbidden: {message}"))
}

fn not_supported(value: &str, supported: &[&str]) -> Cause {
    let supported: Vec<String> = supported.iter().map(|s| format!("{s:?}")).collect();
    Cause::new(
        "resourceVersionMatch",
        format!(
            "Unsupported value: {value:?}: supported values: {}",
            supported.join(", ")
        ),
    )
}

/// Checks the options of a list (`watch` false) or a watch, with kube-apiserver's rules and
/// messages:
/// - a watch: `sendInitialEvents` requires `resourceVersionMatch=NotOlderThan`;
///   `resourceVersionMatch` requires `sendInitialEvents`, must be `NotOlderThan` and is
///   forbidden with `continue`;
/// - a list: `resourceVersionMatch` requires `resourceVersion`, is forbidden with `continue`,
///   must be `Exact` or `NotOlderThan`, and `Exact` is forbidden for `resourceVersion=0`;
///   `sendInitialEvents` is forbidden.
pub(crate) fn validate(query: &Query, watch: bool) -> Result<(), ApiError> {
    let send_initial = send_initial_events(query)?;
    let matching = query
        .get("resourceVersionMatch")
        .map(String::as_str)
        .unwrap_or_default();
    let resource_version = query
        .get("resourceVersion")
        .map(String::as_str)
        .unwrap_or_default();
    let continued = query.get("continue").is_some_and(|c| !c.is_empty());
    let mut causes = Vec::new();
    if watch {
        if send_initial.is_some() && matching != NOT_OLDER_THAN {
            causes.push(forbidden(&format!(
                "sendInitialEvents requires setting resourceVersionMatch to {NOT_OLDER_THAN}"
            )));
        }
        if !matching.is_empty() {
            if send_initial.is_none() {
                causes.push(forbidden(
                    "resourceVersionMatch is forbidden for watch unless sendInitialEvents is \
                     provided",
                ));
            }
            if matching != NOT_OLDER_THAN {
                causes.push(not_supported(matching, &[NOT_OLDER_THAN]));
            }
            if continued {
                causes.push(forbidden(
                    "resourceVersionMatch is forbidden when continue is provided",
                ));
            }
        }
    } else {
        if !matching.is_empty() {
            if resource_version.is_empty() {
                causes.push(forbidden(
                    "resourceVersionMatch is forbidden unless resourceVersion is provided",
                ));
            }
            if continued {
                causes.push(forbidden(
                    "resourceVersionMatch is forbidden when continue is provided",
                ));
            }
            if matching != EXACT && matching != NOT_OLDER_THAN {
                causes.push(not_supported(matching, &[EXACT, NOT_OLDER_THAN, ""]));
            }
            if matching == EXACT && resource_version == "0" {
                causes.push(forbidden(
                    "resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
                ));
            }
        }
        if send_initial.is_some() {
            causes.push(Cause::new(
                "sendInitialEvents",
                "Forbidden: sendInitialEvents is forbidden for list",
            ));
        }
    }
    if causes.is_empty() {
        return Ok(());
    }
    Err(invalid_list_options(causes))
}

/// `422 Invalid` about `ListOptions.meta.k8s.io ""`, worded as `errors.NewInvalid` words it:
/// one problem as `field: body`, several as `[a, b]`.
fn invalid_list_options(causes: Vec<Cause>) -> ApiError {
    let mut messages: Vec<String> = Vec::new();
    for cause in &causes {
        let message = format!("{}: {}", cause.field, cause.message);
        // Like apimachinery's aggregate, the same message is said once.
        if !messages.contains(&message) {
            messages.push(message);
        }
    }
    let aggregate = match messages.as_slice() {
        [one] => one.clone(),
        many => format!("[{}]", many.join(", ")),
    };
    let mut error = ApiError::new(
        422,
        StatusReason::Invalid,
        format!("ListOptions.meta.k8s.io \"\" is invalid: {aggregate}"),
    );
    error.causes = causes;
    error.details = Some(Box::new(("ListOptions".to_owned(), String::new())));
    error.more = Some(Box::new(super::status::MoreDetails {
        group: Some("meta.k8s.io"),
        ..Default::default()
    }));
    error
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(pairs: &[(&str, &str)]) -> Query {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn watch_list_combinations_are_checked_as_kube_apiserver_does() {
        let ok = query(&[
            ("sendInitialEvents", "true"),
            ("resourceVersionMatch", "NotOlderThan"),
            ("resourceVersion", "7"),
        ]);
        assert!(validate(&ok, true).is_ok());
        assert!(validate(&query(&[("resourceVersion", "7")]), true).is_ok());

        let e = validate(&query(&[("sendInitialEvents", "true")]), true).unwrap_err();
        assert_eq!(e.code, 422);
        assert_eq!(e.reason, StatusReason::Invalid);
        assert_eq!(
            e.message,
            "ListOptions.meta.k8s.io \"\" is invalid: resourceVersionMatch: Forbidden: \
             sendInitialEvents requires setting resourceVersionMatch to NotOlderThan"
        );
        let status = e.to_status();
        assert_eq!(status["details"]["group"], "meta.k8s.io");
        assert_eq!(status["details"]["kind"], "ListOptions");
        assert_eq!(
            status["details"]["causes"][0]["reason"],
            "FieldValueForbidden"
        );
        assert_eq!(
            status["details"]["causes"][0]["field"],
            "resourceVersionMatch"
        );

        let e = validate(&query(&[("resourceVersionMatch", "NotOlderThan")]), true).unwrap_err();
        assert!(e.message.ends_with(
            "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden for watch \
             unless sendInitialEvents is provided"
        ));

        let e = validate(
            &query(&[
                ("sendInitialEvents", "true"),
                ("resourceVersionMatch", "Exact"),
            ]),
            true,
        )
        .unwrap_err();
        assert_eq!(
            e.message,
            "ListOptions.meta.k8s.io \"\" is invalid: [resourceVersionMatch: Forbidden: \
             sendInitialEvents requires setting resourceVersionMatch to NotOlderThan, \
             resourceVersionMatch: Unsupported value: \"Exact\": supported values: \
             \"NotOlderThan\"]"
        );
        assert_eq!(e.causes[1].reason, "FieldValueNotSupported");
    }

    #[test]
    fn list_combinations_are_checked_as_kube_apiserver_does() {
        assert!(validate(&query(&[]), false).is_ok());
        let e = validate(&query(&[("sendInitialEvents", "true")]), false).unwrap_err();
        assert_eq!(
            e.message,
            "ListOptions.meta.k8s.io \"\" is invalid: sendInitialEvents: Forbidden: \
             sendInitialEvents is forbidden for list"
        );
        let e = validate(&query(&[("resourceVersionMatch", "NotOlderThan")]), false).unwrap_err();
        assert!(e
            .message
            .ends_with("resourceVersionMatch is forbidden unless resourceVersion is provided"));
        assert!(validate(
            &query(&[("resourceVersionMatch", "Exact"), ("resourceVersion", "3")]),
            false
        )
        .is_ok());
        assert!(validate(&query(&[("sendInitialEvents", "maybe")]), false).is_err());
    }
}
