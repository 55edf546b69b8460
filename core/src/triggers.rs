//! `[triggers]` of a policy: what invokes a function besides an HTTP
//! request. A cron trigger's schedule is parsed by `croner` (five fields, or
//! six with seconds first, or an alias such as `@hourly`) in its time zone
//! (`jiff`'s database: the system's, or the one built in), so a bad schedule
//! or zone is a policy error naming the trigger.

use std::str::FromStr as _;

use serde::{Deserialize, Serialize};

/// The most cron triggers a policy may hold.
pub const MAX_CRON_TRIGGERS: usize = 16;
/// The most NATS triggers a policy may hold.
pub const MAX_NATS_TRIGGERS: usize = 8;
/// The largest JSON body a trigger may send, written out.
pub const MAX_TRIGGER_BODY_BYTES: usize = 64 << 10;

/// `[triggers]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Triggers {
    /// `[[triggers.cron]]`: invocations on a schedule, once per tick across
    /// the cluster.
    #[serde(default)]
    pub cron: Vec<CronTrigger>,
    /// `[[triggers.nats]]`: an invocation per message of a JetStream
    /// stream, each message to one host.
    #[serde(default)]
    pub nats: Vec<NatsTrigger>,
}

impl Triggers {
    pub fn is_empty(&self) -> bool {
        self.cron.is_empty() && self.nats.is_empty()
    }
}

/// One `[[triggers.nats]]`: a durable pull consumer of `stream`, shared by
/// the hosts that serve the function.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NatsTrigger {
    pub stream: NatsName,
    /// Only messages whose subject matches (NATS wildcards `*` and `>`);
    /// every message of the stream unless given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Subject>,
    /// The consumer's durable name; `lichen-FUNCTION-INDEX` unless given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub durable: Option<NatsName>,
    /// Messages one host works on at once.
    #[serde(default = "default_inflight")]
    pub max_inflight: u32,
    /// How long a message may go unanswered before NATS delivers it again.
    #[serde(default = "default_ack_wait")]
    pub ack_wait: crate::policy::Timeout,
    /// Deliveries of one message before it goes to `dead_letter` (or is
    /// dropped without one).
    #[serde(default = "default_max_deliver")]
    pub max_deliver: u32,
    /// Where a message that failed `max_deliver` times is published, with
    /// its last error, before it is terminated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<Subject>,
    #[serde(default)]
    pub path: TriggerPath,
    #[serde(default)]
    pub method: TriggerMethod,
}

fn default_inflight() -> u32 {
    16
}

fn default_ack_wait() -> crate::policy::Timeout {
    crate::policy::Timeout(std::time::Duration::from_secs(30))
}

fn default_max_deliver() -> u32 {
    5
}

impl NatsTrigger {
    /// The durable consumer's name for trigger `index` of `function`.
    pub fn durable_name(&self, function: &str, index: usize) -> String {
        match &self.durable {
            Some(name) => name.0.clone(),
            None => format!("lichen-{function}-{index}"),
        }
    }
}

/// A stream or consumer name: 1 to 64 of `A-Z a-z 0-9 _ -`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct NatsName(pub String);

impl TryFrom<String> for NatsName {
    type Error = String;

    fn try_from(name: String) -> Result<Self, Self::Error> {
        let valid = (1..=64).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
        if valid {
            Ok(NatsName(name))
        } else {
            Err(format!(
                "{name:?} is not a stream or consumer name: 1 to 64 of A-Z, a-z, 0-9, '_' and '-'"
            ))
        }
    }
}

impl From<NatsName> for String {
    fn from(name: NatsName) -> String {
        name.0
    }
}

/// A NATS subject, dot-separated tokens; `*` (one token) and `>` (the
/// rest, last) are wildcards where a filter is meant.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct Subject(pub String);

impl Subject {
    /// Whether it names one subject (no wildcard), as a publish needs.
    pub fn is_literal(&self) -> bool {
        self.0.split('.').all(|token| token != "*" && token != ">")
    }

    /// Whether some subject matches both this and `other` (both may hold
    /// wildcards): a filter that overlaps none of a stream's subjects
    /// matches nothing in it.
    pub fn overlaps(&self, other: &str) -> bool {
        fn overlap(a: &[&str], b: &[&str]) -> bool {
            match (a.split_first(), b.split_first()) {
                (None, None) => true,
                (Some((&">", _)), Some(_)) | (Some(_), Some((&">", _))) => true,
                (Some((x, a)), Some((y, b))) => (x == y || *x == "*" || *y == "*") && overlap(a, b),
                _ => false,
            }
        }
        let ours: Vec<&str> = self.0.split('.').collect();
        let theirs: Vec<&str> = other.split('.').collect();
        overlap(&ours, &theirs)
    }
}

impl TryFrom<String> for Subject {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        let tokens: Vec<&str> = text.split('.').collect();
        let valid = text.len() <= 256
            && tokens.iter().enumerate().all(|(i, token)| {
                !token.is_empty()
                    && (*token == "*"
                        || (*token == ">" && i == tokens.len() - 1)
                        || token
                            .bytes()
                            .all(|b| b.is_ascii_graphic() && !matches!(b, b'*' | b'>' | b'.')))
            });
        if valid {
            Ok(Subject(text))
        } else {
            Err(format!(
                "{text:?} is not a NATS subject: dot-separated tokens of printable characters, `*` for one token, `>` last for the rest"
            ))
        }
    }
}

impl From<Subject> for String {
    fn from(subject: Subject) -> String {
        subject.0
    }
}

/// One `[[triggers.cron]]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CronTrigger {
    pub schedule: Schedule,
    /// An IANA time zone name; UTC unless given.
    #[serde(default)]
    pub timezone: Zone,
    /// The path (and query) the function is invoked at.
    #[serde(default)]
    pub path: TriggerPath,
    #[serde(default)]
    pub method: TriggerMethod,
    /// Sent as the request body, as JSON, with `content-type:
    /// application/json`; no body unless given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<serde_json::Value>,
}

impl CronTrigger {
    /// The first tick strictly after `after`, if the schedule has one.
    pub fn next_after(&self, after: jiff::Timestamp) -> Option<jiff::Timestamp> {
        let cron = parse_schedule(&self.schedule.0).ok()?;
        let zoned = after.to_zoned(self.timezone.zone().ok()?);
        cron.find_next_occurrence(&zoned, false)
            .ok()
            .map(|next| next.timestamp())
    }

    /// The body as sent, if any.
    pub fn body_bytes(&self) -> Option<Vec<u8>> {
        self.body.as_ref().map(|body| body.to_string().into_bytes())
    }
}

/// A cron schedule as written, checked by `croner`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct Schedule(pub String);

fn parse_schedule(text: &str) -> Result<croner::Cron, croner::errors::CronError> {
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .build()
        .parse(text)
}

impl TryFrom<String> for Schedule {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        if text.len() > 256 {
            return Err("a schedule is at most 256 bytes".to_string());
        }
        let cron = parse_schedule(&text).map_err(|e| {
            format!("{text:?} is not a cron schedule ({e}); expected five fields (minute hour day-of-month month day-of-week), six with seconds first, or an alias such as @hourly")
        })?;
        // A schedule that never fires (31 February) is a mistake too.
        let from = jiff::Timestamp::UNIX_EPOCH.to_zoned(jiff::tz::TimeZone::UTC);
        if cron.find_next_occurrence(&from, false).is_err() {
            return Err(format!("{text:?} never fires"));
        }
        Ok(Schedule(text))
    }
}

impl From<Schedule> for String {
    fn from(schedule: Schedule) -> String {
        schedule.0
    }
}

/// An IANA time zone name (`Europe/Paris`), `UTC` by default.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct Zone(pub String);

impl Default for Zone {
    fn default() -> Self {
        Zone("UTC".to_string())
    }
}

impl Zone {
    fn zone(&self) -> Result<jiff::tz::TimeZone, jiff::Error> {
        jiff::tz::TimeZone::get(&self.0)
    }
}

impl TryFrom<String> for Zone {
    type Error = String;

    fn try_from(name: String) -> Result<Self, Self::Error> {
        let zone = Zone(name);
        match zone.zone() {
            Ok(_) => Ok(zone),
            Err(_) => Err(format!(
                "{:?} is not a time zone: expected an IANA name such as \"UTC\" or \"Europe/Paris\"",
                zone.0
            )),
        }
    }
}

impl From<Zone> for String {
    fn from(zone: Zone) -> String {
        zone.0
    }
}

/// The path and query a trigger invokes: `/` unless given.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct TriggerPath(pub String);

impl Default for TriggerPath {
    fn default() -> Self {
        TriggerPath("/".to_string())
    }
}

impl TryFrom<String> for TriggerPath {
    type Error = String;

    fn try_from(path: String) -> Result<Self, Self::Error> {
        let valid = path.starts_with('/')
            && path.len() <= 1024
            && path.parse::<http::uri::PathAndQuery>().is_ok();
        if valid {
            Ok(TriggerPath(path))
        } else {
            Err(format!(
                "{path:?} is not a path: expected /PATH[?QUERY], at most 1024 bytes"
            ))
        }
    }
}

impl From<TriggerPath> for String {
    fn from(path: TriggerPath) -> String {
        path.0
    }
}

/// The method a trigger invokes with: `POST` unless given.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct TriggerMethod(pub http::Method);

impl Default for TriggerMethod {
    fn default() -> Self {
        TriggerMethod(http::Method::POST)
    }
}

impl TryFrom<String> for TriggerMethod {
    type Error = String;

    fn try_from(name: String) -> Result<Self, Self::Error> {
        match http::Method::from_str(&name) {
            Ok(method)
                if matches!(
                    method,
                    http::Method::GET
                        | http::Method::POST
                        | http::Method::PUT
                        | http::Method::PATCH
                        | http::Method::DELETE
                ) =>
            {
                Ok(TriggerMethod(method))
            }
            _ => Err(format!(
                "{name:?} is not a trigger method: expected GET, POST, PUT, PATCH or DELETE"
            )),
        }
    }
}

impl From<TriggerMethod> for String {
    fn from(method: TriggerMethod) -> String {
        method.0.to_string()
    }
}

/// Checks what serde cannot: counts and body sizes.
pub fn check(triggers: &Triggers) -> Result<(), String> {
    if triggers.cron.len() > MAX_CRON_TRIGGERS {
        return Err(format!(
            "{} cron triggers, above the maximum of {MAX_CRON_TRIGGERS}",
            triggers.cron.len()
        ));
    }
    if triggers.nats.len() > MAX_NATS_TRIGGERS {
        return Err(format!(
            "{} NATS triggers, above the maximum of {MAX_NATS_TRIGGERS}",
            triggers.nats.len()
        ));
    }
    for (index, trigger) in triggers.nats.iter().enumerate() {
        let at = format!("triggers.nats[{index}]");
        if !(1..=1024).contains(&trigger.max_inflight) {
            return Err(format!(
                "{at}.max_inflight = {} is not from 1 to 1024",
                trigger.max_inflight
            ));
        }
        if !(1..=100).contains(&trigger.max_deliver) {
            return Err(format!(
                "{at}.max_deliver = {} is not from 1 to 100",
                trigger.max_deliver
            ));
        }
        if let Some(dead) = &trigger.dead_letter
            && !dead.is_literal()
        {
            return Err(format!(
                "{at}.dead_letter = {:?} has a wildcard: messages are published there",
                dead.0
            ));
        }
        let mut durables = triggers.nats[..index].iter().enumerate();
        if let Some((other, _)) = durables.find(|(i, other)| {
            other.stream == trigger.stream
                && other.durable_name("", *i) == trigger.durable_name("", index)
        }) {
            return Err(format!(
                "{at} and triggers.nats[{other}] are one consumer of {:?}: give them different durable names",
                trigger.stream.0
            ));
        }
    }
    for (index, trigger) in triggers.cron.iter().enumerate() {
        let len = trigger.body_bytes().map_or(0, |body| body.len());
        if len > MAX_TRIGGER_BODY_BYTES {
            return Err(format!(
                "triggers.cron[{index}].body is {len} bytes as JSON, above the maximum of {MAX_TRIGGER_BODY_BYTES}"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trigger(schedule: &str, timezone: &str) -> CronTrigger {
        CronTrigger {
            schedule: Schedule::try_from(schedule.to_string()).unwrap(),
            timezone: Zone::try_from(timezone.to_string()).unwrap(),
            path: TriggerPath::default(),
            method: TriggerMethod::default(),
            body: None,
        }
    }

    fn at(text: &str) -> jiff::Timestamp {
        text.parse().unwrap()
    }

    #[test]
    fn five_and_six_field_schedules_tick_in_their_zone() {
        let every_second = trigger("* * * * * *", "UTC");
        assert_eq!(
            every_second.next_after(at("2026-01-01T00:00:00.5Z")),
            Some(at("2026-01-01T00:00:01Z"))
        );
        assert_eq!(
            every_second.next_after(at("2026-01-01T00:00:01Z")),
            Some(at("2026-01-01T00:00:02Z"))
        );
        let nine_in_paris = trigger("0 9 * * *", "Europe/Paris");
        // Winter: Paris is UTC+1.
        assert_eq!(
            nine_in_paris.next_after(at("2026-01-10T12:00:00Z")),
            Some(at("2026-01-11T08:00:00Z"))
        );
        assert_eq!(
            trigger("@hourly", "UTC").next_after(at("2026-01-01T00:30:00Z")),
            Some(at("2026-01-01T01:00:00Z"))
        );
    }

    #[test]
    fn bad_schedules_zones_paths_and_methods_are_refused() {
        for bad in ["", "* * *", "61 * * * *", "* * * * * * * *", "0 0 31 2 *"] {
            assert!(Schedule::try_from(bad.to_string()).is_err(), "{bad:?}");
        }
        assert!(Zone::try_from("Mars/Olympus".to_string()).is_err());
        assert!(TriggerPath::try_from("run".to_string()).is_err());
        assert!(TriggerPath::try_from("/a b".to_string()).is_err());
        assert!(TriggerMethod::try_from("CONNECT".to_string()).is_err());
        assert_eq!(
            TriggerMethod::try_from("GET".to_string()),
            Ok(TriggerMethod(http::Method::GET))
        );
    }

    #[test]
    fn a_filter_overlaps_the_subjects_it_can_share_a_message_with() {
        let filter = |text: &str| Subject::try_from(text.to_string()).unwrap();
        for (a, b) in [
            ("orders.new", "orders.new"),
            ("orders.new", "orders.*"),
            ("orders.*", "orders.>"),
            ("orders.eu.>", "orders.>"),
            ("*.new", "orders.>"),
            (">", "orders"),
            ("orders.*.x", "*.eu.*"),
        ] {
            assert!(filter(a).overlaps(b), "{a} and {b}");
            assert!(filter(b).overlaps(a), "{b} and {a}");
        }
        for (a, b) in [
            ("invoices.>", "orders.>"),
            ("orders", "orders.>"),
            ("orders.new", "orders"),
            ("orders.*", "orders.new.x"),
            ("orders.*.x", "orders.eu.y"),
        ] {
            assert!(!filter(a).overlaps(b), "{a} and {b}");
            assert!(!filter(b).overlaps(a), "{b} and {a}");
        }
    }
}
