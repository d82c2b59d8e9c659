//! KubeEdge's MQTT topics (sans-IO): what a topic asks for, and where answers go.
//!
//! | mapper publishes | edgecore answers on |
//! |---|---|
//! | `$hw/events/device/{id}/twin/update` | `…/twin/update/result`, `…/twin/update/document`, `…/twin/update/delta` |
//! | `$hw/events/device/{id}/twin/get` | `…/twin/get/result` |
//! | `$hw/events/device/{id}/state/update` | `…/state/update/result` |
//! | `$hw/events/node/{node}/membership/get` | `…/membership/get/result` |
//! | `$hw/events/upload/#`, `SYS/dis/upload_records` | (forwarded to the cloud as Events) |
//!
//! and edgecore publishes `$hw/events/node/{node}/membership/updated` and
//! `…/twin/update/delta` when the cloud changes the node's devices or their desired values.

/// A message edgecore acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    TwinUpdate {
        device: String,
    },
    TwinGet {
        device: String,
    },
    StateUpdate {
        device: String,
    },
    MembershipGet,
    /// Device data to forward upward as an Event.
    Upload,
}

/// The filters edgecore subscribes to for `node`.
pub fn subscriptions(node: &str) -> Vec<String> {
    vec![
        "$hw/events/device/+/twin/update".into(),
        "$hw/events/device/+/twin/get".into(),
        "$hw/events/device/+/state/update".into(),
        format!("$hw/events/node/{node}/membership/get"),
        "$hw/events/upload/#".into(),
        "SYS/dis/upload_records".into(),
    ]
}

/// What `topic` asks of `node`'s edgecore, if anything (results it published itself and other
/// nodes' topics are not requests).
pub fn parse(node: &str, topic: &str) -> Option<Request> {
    if topic == "SYS/dis/upload_records" || topic.starts_with("$hw/events/upload/") {
        return Some(Request::Upload);
    }
    if let Some(rest) = topic.strip_prefix("$hw/events/device/") {
        let (device, action) = rest.split_once('/')?;
        if device.is_empty() {
            return None;
        }
        let device = device.to_owned();
        return match action {
            "twin/update" => Some(Request::TwinUpdate { device }),
            "twin/get" => Some(Request::TwinGet { device }),
            "state/update" => Some(Request::StateUpdate { device }),
            _ => None,
        };
    }
    let rest = topic.strip_prefix("$hw/events/node/")?;
    (rest.strip_suffix("/membership/get")? == node).then_some(Request::MembershipGet)
}

/// Where the answer to `request` (or its error) goes; `None` for uploads.
pub fn result_topic(node: &str, request: &Request) -> Option<String> {
    Some(match request {
        Request::TwinUpdate { device } => format!("$hw/events/device/{device}/twin/update/result"),
        Request::TwinGet { device } => format!("$hw/events/device/{device}/twin/get/result"),
        Request::StateUpdate { device } => {
            format!("$hw/events/device/{device}/state/update/result")
        }
        Request::MembershipGet => format!("$hw/events/node/{node}/membership/get/result"),
        Request::Upload => return None,
    })
}

pub fn twin_document(device: &str) -> String {
    format!("$hw/events/device/{device}/twin/update/document")
}

pub fn twin_delta(device: &str) -> String {
    format!("$hw/events/device/{device}/twin/update/delta")
}

pub fn membership_updated(node: &str) -> String {
    format!("$hw/events/node/{node}/membership/updated")
}

/// MQTT topic filter matching (MQTT 3.1.1 §4.7), including that wildcards at the first level
/// do not match topics starting with `$` while a filter naming `$hw/…` does.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut levels = topic.split('/');
    for part in filter.split('/') {
        match part {
            "#" => return true,
            "+" => {
                if levels.next().is_none() {
                    return false;
                }
            }
            literal => {
                if levels.next() != Some(literal) {
                    return false;
                }
            }
        }
    }
    levels.next().is_none()
}

/// A valid filter: `#` only last and alone in its level, `+` alone in its level.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() {
        return false;
    }
    let parts: Vec<&str> = filter.split('/').collect();
    parts.iter().enumerate().all(|(i, p)| match *p {
        "#" => i == parts.len() - 1,
        "+" => true,
        p => !p.contains('#') && !p.contains('+'),
    })
}

/// A valid topic name to publish to: not empty, no wildcards.
pub fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains('#') && !topic.contains('+')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_recognised_and_answers_routed() {
        let update = parse("n1", "$hw/events/device/dev-1/twin/update");
        assert_eq!(
            update,
            Some(Request::TwinUpdate {
                device: "dev-1".into()
            })
        );
        assert_eq!(
            result_topic("n1", &update.expect("request")).as_deref(),
            Some("$hw/events/device/dev-1/twin/update/result")
        );
        assert_eq!(
            parse("n1", "$hw/events/device/dev-1/twin/update/result"),
            None
        );
        assert_eq!(
            parse("n1", "$hw/events/device/dev-1/twin/update/delta"),
            None
        );
        assert_eq!(
            parse("n1", "$hw/events/node/n1/membership/get"),
            Some(Request::MembershipGet)
        );
        assert_eq!(parse("n1", "$hw/events/node/n2/membership/get"), None);
        assert_eq!(parse("n1", "$hw/events/upload/a/b"), Some(Request::Upload));
        assert_eq!(parse("n1", "SYS/dis/upload_records"), Some(Request::Upload));
        assert_eq!(parse("n1", "$hw/events/device//twin/get"), None);
    }

    #[test]
    fn filters_match_like_mqtt_brokers() {
        assert!(matches(
            "$hw/events/device/+/twin/update",
            "$hw/events/device/d/twin/update"
        ));
        assert!(!matches(
            "$hw/events/device/+/twin/update",
            "$hw/events/device/d/twin/update/result"
        ));
        assert!(matches("$hw/events/upload/#", "$hw/events/upload/x/y"));
        assert!(matches("a/#", "a"));
        assert!(!matches("#", "$hw/events/upload/x"));
        assert!(!matches("+/events/upload/x", "$hw/events/upload/x"));
        assert!(matches("#", "a/b"));
        assert!(!matches("a/+", "a/b/c"));
        assert!(valid_filter("a/+/#"));
        assert!(!valid_filter("a/#/b"));
        assert!(!valid_filter("a/b+"));
        assert!(!valid_topic("a/+"));
    }
}
