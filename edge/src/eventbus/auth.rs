//! Who may use the embedded MQTT broker, and which topics each user reaches.
//!
//! **Password file** (`edgecore --mqtt-password-file FILE`): one `USERNAME:HASH` a line, like
//! mosquitto's `mosquitto_passwd` files, where HASH is an Argon2id PHC string
//! (`$argon2id$v=19$m=19456,t=2,p=1$SALT$HASH`, RFC 9106 with the `argon2` crate's
//! defaults). Blank lines and lines starting with `#` are ignored. Entries are made with
//! `edgecore mqtt-passwd FILE USERNAME` (the password on standard input), see
//! [`hash_password`] and [`set_password`].
//!
//! **ACL file** (`edgecore --mqtt-acl-file FILE`): one rule a line, `USER ACCESS PATTERN`:
//! USER is a username or `*` (every authenticated user), ACCESS is `read` (subscribe),
//! `write` (publish) or `readwrite`, PATTERN an MQTT topic filter (MQTT 3.1.1 §4.7: `+` one
//! level, `#` the rest) in which `%u` stands for the connecting user's name. With an ACL file,
//! what no rule allows is refused: a SUBSCRIBE to a filter that is not wholly within a read
//! rule gets the failure return code 0x80 in its SUBACK (§3.9.3), a PUBLISH to a topic no
//! write rule matches is dropped (acknowledged as the protocol requires, logged and counted),
//! and a CONNECT whose last will no write rule allows is refused as not authorized. Without
//! an ACL file, every authenticated user may use every topic.
//!
//! edgecore's own client (EventBus and DeviceTwin) is not in these files: it signs in with a
//! secret made at each start and has every right ([`BrokerAuth::internal`]).

use std::collections::HashMap;
use std::path::Path;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use subtle::ConstantTimeEq;

use super::topics;

/// The username of edgecore's own MQTT client; a password file may not use it.
pub const INTERNAL_USER: &str = "kedge-edgecore";

/// Hashes `password` into an Argon2id PHC string with a random salt.
///
/// # Errors
/// Only if the hasher refuses its own defaults (it does not); the message says why.
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt_bytes: [u8; 16] = rand::random();
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| e.to_string())?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| e.to_string())
}

/// Adds or replaces `username`'s entry in the password file at `path` (created if missing,
/// mode 0600), keeping the other lines; written to a temporary file and renamed over the old
/// one.
///
/// # Errors
/// A username that cannot be used ([`valid_username`]), an unreadable or unwritable file.
pub fn set_password(path: &Path, username: &str, password: &str) -> Result<(), String> {
    valid_username(username)?;
    if password.is_empty() {
        return Err("the password is empty".into());
    }
    let old = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let hash = hash_password(password)?;
    let mut lines: Vec<String> = old
        .lines()
        .filter(|line| line.split_once(':').map(|(user, _)| user) != Some(username))
        .map(str::to_owned)
        .collect();
    lines.push(format!("{username}:{hash}"));
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        // Readable by its owner only, like mosquitto_passwd's files.
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all((lines.join("\n") + "\n").as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| format!("{}: {e}", path.display()))
}

/// A username usable in the files: not empty, no `:` (the password file's separator), no
/// whitespace (the ACL file's), no `+`, `#` or `/` (it may stand in a topic filter through
/// `%u`), not [`INTERNAL_USER`].
///
/// # Errors
/// Says what is wrong with it.
pub fn valid_username(username: &str) -> Result<(), String> {
    if username.is_empty() {
        return Err("an empty username".into());
    }
    if username == INTERNAL_USER {
        return Err(format!("{INTERNAL_USER:?} is edgecore's own user"));
    }
    if username
        .chars()
        .any(|c| c == ':' || c == '+' || c == '#' || c == '/' || c.is_whitespace())
    {
        return Err(format!(
            "username {username:?}: no ':', '+', '#', '/' or whitespace allowed"
        ));
    }
    Ok(())
}

/// What a rule allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    ReadWrite,
}

impl Access {
    fn reads(self) -> bool {
        matches!(self, Access::Read | Access::ReadWrite)
    }

    fn writes(self) -> bool {
        matches!(self, Access::Write | Access::ReadWrite)
    }
}

/// One line of the ACL file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclRule {
    /// A username, or `None` for `*`.
    pub user: Option<String>,
    pub access: Access,
    /// A topic filter, `%u` not yet replaced.
    pub pattern: String,
}

/// The ACL file's rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    pub rules: Vec<AclRule>,
}

impl Acl {
    /// Parses the ACL file's text (format in the module's documentation).
    ///
    /// # Errors
    /// The first bad line, with its number.
    pub fn parse(text: &str) -> Result<Acl, String> {
        let mut rules = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |why: &str| format!("line {}: {why}: {line:?}", number + 1);
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [user, access, pattern] = fields[..] else {
                return Err(bad("expected USER ACCESS PATTERN"));
            };
            let access = match access {
                "read" => Access::Read,
                "write" => Access::Write,
                "readwrite" => Access::ReadWrite,
                _ => return Err(bad("ACCESS is read, write or readwrite")),
            };
            if !topics::valid_filter(&pattern.replace("%u", "u")) {
                return Err(bad("PATTERN is not an MQTT topic filter"));
            }
            rules.push(AclRule {
                user: (user != "*").then(|| user.to_owned()),
                access,
                pattern: pattern.to_owned(),
            });
        }
        Ok(Acl { rules })
    }

    /// The patterns that apply to `user`, `%u` replaced.
    fn patterns<'a>(
        &'a self,
        user: &'a str,
        wanted: fn(Access) -> bool,
    ) -> impl Iterator<Item = String> + 'a {
        self.rules
            .iter()
            .filter(move |rule| wanted(rule.access))
            .filter(move |rule| rule.user.as_deref().is_none_or(|u| u == user))
            .map(move |rule| rule.pattern.replace("%u", user))
    }

    /// Whether `user` may publish to `topic`.
    pub fn may_publish(&self, user: &str, topic: &str) -> bool {
        self.patterns(user, Access::writes)
            .any(|pattern| topics::matches(&pattern, topic))
    }

    /// Whether `user` may subscribe to `filter`: every topic it matches is one a read rule
    /// matches.
    pub fn may_subscribe(&self, user: &str, filter: &str) -> bool {
        self.patterns(user, Access::reads)
            .any(|pattern| filter_within(filter, &pattern))
    }
}

/// Whether every topic that `filter` matches also matches `pattern` (both MQTT topic
/// filters). `$` topics follow §4.7.2: a pattern starting with a wildcard covers no filter
/// whose first level starts with `$`.
pub fn filter_within(filter: &str, pattern: &str) -> bool {
    let filter_levels: Vec<&str> = filter.split('/').collect();
    let pattern_levels: Vec<&str> = pattern.split('/').collect();
    if matches!(pattern_levels.first(), Some(&"+") | Some(&"#"))
        && filter_levels.first().is_some_and(|l| l.starts_with('$'))
    {
        return false;
    }
    for (i, p) in pattern_levels.iter().enumerate() {
        if *p == "#" {
            return true;
        }
        let Some(f) = filter_levels.get(i) else {
            return false;
        };
        match (*p, *f) {
            (_, "#") => return false,
            ("+", _) => {}
            (_, "+") => return false,
            (p, f) if p == f => {}
            _ => return false,
        }
    }
    filter_levels.len() == pattern_levels.len()
}

/// The broker's view of who may connect and what they may do.
pub struct BrokerAuth {
    /// Username to Argon2 PHC string; `None`: users are named by their certificates.
    users: Option<HashMap<String, String>>,
    /// A verified client certificate is required (the broker speaks TLS and checks them).
    client_certs: bool,
    acl: Option<Acl>,
    /// edgecore's own client's password (random, made at start).
    internal_secret: String,
}

impl std::fmt::Debug for BrokerAuth {
    // No hashes, no secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerAuth")
            .field("users", &self.users.as_ref().map(HashMap::len))
            .field("client_certs", &self.client_certs)
            .field("acl_rules", &self.acl.as_ref().map(|a| a.rules.len()))
            .finish_non_exhaustive()
    }
}

/// Why a CONNECT is refused (MQTT 3.1.1 §3.2.2.3's return codes 4 and 5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Return code 4: no such user, wrong password, or none given.
    BadCredentials,
    /// Return code 5: a last will on a topic the user may not publish to.
    NotAuthorized,
    /// Return code 5 too: no verified client certificate where one is required.
    NoCertificate,
}

/// Who a connection is, once its CONNECT was accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// edgecore itself: everything allowed.
    Internal,
    /// A user of the password file, or named by its client certificate.
    User(String),
    /// Nobody signed in, on an open broker (no password file): everything allowed.
    Anonymous,
}

impl BrokerAuth {
    /// Reads the password file and, if given, the ACL file. `client_certs`: the broker
    /// requires a verified client certificate; without a password file, its common name is
    /// then the user's name (as mosquitto's `use_identity_as_username`).
    ///
    /// # Errors
    /// Neither a password file nor client certificates, an unreadable file, a bad line (with
    /// its number), an unusable username.
    pub fn load(
        password_file: Option<&Path>,
        acl_file: Option<&Path>,
        client_certs: bool,
    ) -> Result<BrokerAuth, String> {
        let users = match password_file {
            Some(file) => Some(read_password_file(file)?),
            None if client_certs => None,
            None => return Err("neither a password file nor client certificates".into()),
        };
        let acl = match acl_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                Some(Acl::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?)
            }
            None => None,
        };
        let secret: [u8; 32] = rand::random();
        Ok(BrokerAuth {
            users,
            client_certs,
            acl,
            internal_secret: secret.iter().map(|b| format!("{b:02x}")).collect(),
        })
    }

    /// The credentials of edgecore's own client.
    pub fn internal(&self) -> (String, String) {
        (INTERNAL_USER.to_owned(), self.internal_secret.clone())
    }

    /// Users in the password file (0 without one).
    pub fn users(&self) -> usize {
        self.users.as_ref().map_or(0, HashMap::len)
    }

    /// Checks a CONNECT's credentials, client certificate and will topic. `identity`: the
    /// common name of the client's verified certificate, if it showed one. Argon2 takes tens
    /// of milliseconds on purpose: call it off the async threads.
    ///
    /// # Errors
    /// [`Refusal`] with the return code to send.
    pub fn authenticate(
        &self,
        username: Option<&str>,
        password: Option<&str>,
        will_topic: Option<&str>,
        identity: Option<&str>,
    ) -> Result<Principal, Refusal> {
        if let (Some(INTERNAL_USER), Some(password)) = (username, password) {
            let ok: bool = password
                .as_bytes()
                .ct_eq(self.internal_secret.as_bytes())
                .into();
            return if ok {
                Ok(Principal::Internal)
            } else {
                Err(Refusal::BadCredentials)
            };
        }
        if self.client_certs && identity.is_none() {
            return Err(Refusal::NoCertificate);
        }
        let Some(users) = &self.users else {
            // Named by the certificate; a username, if given, must be the same.
            let identity = identity.ok_or(Refusal::NoCertificate)?;
            if username.is_some_and(|u| u != identity) {
                return Err(Refusal::BadCredentials);
            }
            return self.with_will(identity, will_topic);
        };
        let (Some(username), Some(password)) = (username, password) else {
            return Err(Refusal::BadCredentials);
        };
        let Some(hash) = users.get(username) else {
            // The same work as for a known user: no telling usernames apart by timing.
            let _ = Argon2::default().verify_password(password.as_bytes(), &dummy_hash());
            return Err(Refusal::BadCredentials);
        };
        let hash = PasswordHash::new(hash).map_err(|_| Refusal::BadCredentials)?;
        Argon2::default()
            .verify_password(password.as_bytes(), &hash)
            .map_err(|_| Refusal::BadCredentials)?;
        self.with_will(username, will_topic)
    }

    /// `user`, unless its last will's topic is not one it may publish to.
    fn with_will(&self, user: &str, will_topic: Option<&str>) -> Result<Principal, Refusal> {
        let principal = Principal::User(user.to_owned());
        match will_topic {
            Some(topic) if !self.may_publish(&principal, topic) => Err(Refusal::NotAuthorized),
            _ => Ok(principal),
        }
    }

    /// Whether `who` may publish to `topic`.
    pub fn may_publish(&self, who: &Principal, topic: &str) -> bool {
        match (who, &self.acl) {
            (Principal::User(user), Some(acl)) => acl.may_publish(user, topic),
            _ => true,
        }
    }

    /// Whether `who` may subscribe to `filter`.
    pub fn may_subscribe(&self, who: &Principal, filter: &str) -> bool {
        match (who, &self.acl) {
            (Principal::User(user), Some(acl)) => acl.may_subscribe(user, filter),
            _ => true,
        }
    }
}

/// Reads a password file (`USERNAME:PHC-HASH` lines).
fn read_password_file(password_file: &Path) -> Result<HashMap<String, String>, String> {
    let text = std::fs::read_to_string(password_file)
        .map_err(|e| format!("{}: {e}", password_file.display()))?;
    let mut users = HashMap::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |why: String| format!("{} line {}: {why}", password_file.display(), number + 1);
        let Some((user, hash)) = line.split_once(':') else {
            return Err(bad("expected USERNAME:HASH".into()));
        };
        valid_username(user).map_err(bad)?;
        PasswordHash::new(hash).map_err(|e| {
            bad(format!(
                "not a PHC password hash ({e}); make entries with edgecore mqtt-passwd"
            ))
        })?;
        users.insert(user.to_owned(), hash.to_owned());
    }
    Ok(users)
}

fn dummy_hash() -> PasswordHash<'static> {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let text = DUMMY.get_or_init(|| hash_password("kedge-dummy").unwrap_or_default());
    PasswordHash::new(text).unwrap_or_else(|_| {
        PasswordHash::new("$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$aGFzaA")
            .expect("a valid PHC string")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_within_patterns() {
        let cases = [
            (
                "$hw/events/device/d1/twin/update",
                "$hw/events/device/d1/#",
                true,
            ),
            ("$hw/events/device/d1/#", "$hw/events/device/d1/#", true),
            ("$hw/events/device/d1", "$hw/events/device/d1/#", true),
            ("$hw/events/device/+/twin", "$hw/events/device/d1/#", false),
            ("$hw/events/device/#", "$hw/events/device/d1/#", false),
            ("$hw/events/device/d2/twin", "$hw/events/device/d1/#", false),
            (
                "$hw/events/device/d1/twin/+",
                "$hw/events/device/+/twin/+",
                true,
            ),
            (
                "$hw/events/device/d1/twin/#",
                "$hw/events/device/+/twin/+",
                false,
            ),
            ("$hw/x", "#", false),
            ("$hw/x", "+/x", false),
            ("a/b", "#", true),
            ("a/b", "+/b", true),
            ("a/b/c", "+/b", false),
            ("a", "a/b", false),
        ];
        for (filter, pattern, want) in cases {
            assert_eq!(
                filter_within(filter, pattern),
                want,
                "{filter} in {pattern}"
            );
        }
    }

    /// A filter or topic of up to five levels from a small alphabet, so that random ones
    /// overlap (`wildcards`: `+` anywhere, `#` last).
    fn levels(wildcards: bool) -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let level = if wildcards {
            prop_oneof![Just("a"), Just("b"), Just("$s"), Just(""), Just("+")].boxed()
        } else {
            prop_oneof![Just("a"), Just("b"), Just("$s"), Just("")].boxed()
        };
        (
            proptest::collection::vec(level, 1..5),
            any::<bool>().prop_map(move |hash| hash && wildcards),
        )
            .prop_map(|(mut parts, hash)| {
                if hash {
                    parts.push("#");
                }
                parts.join("/")
            })
    }

    proptest::proptest! {
        /// The ACL's subscribe check is sound: a filter it lets through never delivers a
        /// topic the rule's pattern does not match (what the broker routes is decided by
        /// `topics::matches`).
        #[test]
        fn a_filter_within_a_pattern_matches_nothing_outside_it(
            filter in levels(true),
            pattern in levels(true),
            topic in levels(false),
        ) {
            proptest::prop_assume!(topics::valid_filter(&filter) && topics::valid_filter(&pattern));
            if filter_within(&filter, &pattern) && topics::matches(&filter, &topic) {
                proptest::prop_assert!(
                    topics::matches(&pattern, &topic),
                    "{filter} within {pattern} delivers {topic}"
                );
            }
            // A filter is within itself.
            proptest::prop_assert!(filter_within(&filter, &filter), "{filter}");
        }

        /// Arbitrary ACL text never panics the parser.
        #[test]
        fn acl_text_never_panics(text in "[a-z*%/+#$ \n]{0,80}") {
            let _ = Acl::parse(&text);
        }
    }

    #[test]
    fn the_example_acl_parses() {
        let text = include_str!("../../../examples/mqtt-acl.txt");
        let acl = Acl::parse(text).expect("examples/mqtt-acl.txt");
        assert!(acl.may_publish("thermo-1", "$hw/events/device/thermo-1/twin/update"));
        assert!(acl.may_subscribe("modbus-mapper", "$hw/events/node/edge-1/membership/updated"));
        assert!(!acl.may_subscribe("thermo-1", "$hw/events/node/edge-1/membership/updated"));
    }

    #[test]
    fn acl_rules_with_user_substitution() {
        let acl = Acl::parse(
            "# mappers\n\
             * readwrite $hw/events/device/%u/#\n\
             mapper-a read $hw/events/node/+/membership/#\n\
             mapper-a write $hw/events/upload/%u\n",
        )
        .expect("parses");
        assert!(acl.may_publish("thermo-1", "$hw/events/device/thermo-1/twin/update"));
        assert!(!acl.may_publish("thermo-1", "$hw/events/device/thermo-2/twin/update"));
        assert!(acl.may_subscribe("thermo-1", "$hw/events/device/thermo-1/twin/+/result"));
        assert!(!acl.may_subscribe("thermo-1", "$hw/events/device/+/twin/update/result"));
        assert!(!acl.may_subscribe("thermo-1", "#"));
        assert!(acl.may_subscribe("mapper-a", "$hw/events/node/edge-1/membership/updated"));
        assert!(!acl.may_subscribe("thermo-1", "$hw/events/node/edge-1/membership/updated"));
        assert!(acl.may_publish("mapper-a", "$hw/events/upload/mapper-a"));
        assert!(!acl.may_subscribe("mapper-a", "$hw/events/upload/mapper-a"));
        assert!(Acl::parse("u rw a/b").is_err());
        assert!(Acl::parse("u read a/#/b").is_err());
        assert!(Acl::parse("u read").is_err());
    }

    #[test]
    fn certificates_name_users() {
        let dir = tempfile::tempdir().expect("tempdir");
        let acl = dir.path().join("acl");
        std::fs::write(&acl, "* readwrite $hw/events/device/%u/#\n").expect("write");
        assert!(BrokerAuth::load(None, Some(&acl), false).is_err());
        let auth = BrokerAuth::load(None, Some(&acl), true).expect("load");
        let thermo = Principal::User("thermo-1".into());
        assert_eq!(
            auth.authenticate(None, None, None, Some("thermo-1")),
            Ok(thermo.clone())
        );
        assert_eq!(
            auth.authenticate(Some("thermo-1"), Some("ignored"), None, Some("thermo-1")),
            Ok(thermo.clone())
        );
        assert_eq!(
            auth.authenticate(Some("thermo-2"), None, None, Some("thermo-1")),
            Err(Refusal::BadCredentials)
        );
        assert_eq!(
            auth.authenticate(Some("thermo-1"), Some("x"), None, None),
            Err(Refusal::NoCertificate),
            "no certificate"
        );
        assert_eq!(
            auth.authenticate(
                None,
                None,
                Some("$hw/events/device/thermo-2/gone"),
                Some("thermo-1")
            ),
            Err(Refusal::NotAuthorized),
            "a will on another device's topic"
        );
        assert!(auth.may_publish(&thermo, "$hw/events/device/thermo-1/twin/update"));
        assert!(!auth.may_publish(&thermo, "$hw/events/device/thermo-2/twin/update"));
        let (user, secret) = auth.internal();
        assert_eq!(
            auth.authenticate(Some(&user), Some(&secret), None, None),
            Ok(Principal::Internal),
            "edgecore's own client needs no certificate"
        );
    }

    #[test]
    fn passwords_are_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("passwd");
        set_password(&file, "mapper", "s3cret").expect("set");
        set_password(&file, "other", "x").expect("set");
        set_password(&file, "mapper", "n3w").expect("replace");
        assert!(set_password(&file, "a:b", "x").is_err());
        assert!(set_password(&file, INTERNAL_USER, "x").is_err());
        let text = std::fs::read_to_string(&file).expect("read");
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(text.contains("mapper:$argon2id$"), "{text}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file)
            .expect("metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let auth = BrokerAuth::load(Some(&file), None, false).expect("load");
        assert_eq!(
            auth.authenticate(Some("mapper"), Some("n3w"), None, None),
            Ok(Principal::User("mapper".into()))
        );
        for (user, password) in [
            (Some("mapper"), Some("s3cret")),
            (Some("mapper"), None),
            (None, None),
            (Some("nobody"), Some("n3w")),
            (Some(INTERNAL_USER), Some("guess")),
        ] {
            assert_eq!(
                auth.authenticate(user, password, None, None),
                Err(Refusal::BadCredentials),
                "{user:?}"
            );
        }
        let (user, secret) = auth.internal();
        assert_eq!(
            auth.authenticate(Some(&user), Some(&secret), None, None),
            Ok(Principal::Internal)
        );
        std::fs::write(&file, "mapper:plaintext\n").expect("write");
        assert!(BrokerAuth::load(Some(&file), None, false)
            .expect_err("not a hash")
            .contains("line 1"));
    }
}
