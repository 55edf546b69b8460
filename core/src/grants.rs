//! What a policy grants outside its sandbox, and what a scoped token must
//! hold to write it.
//!
//! A policy is code's capability list: whoever writes `[files]` decides
//! which host directories a guest reads, whoever writes `[outbound]` which
//! hosts it talks to. So a policy written with a scoped token may grant
//! only what the token itself holds, and [`FIELDS`] is the one table that
//! says, for every field reaching outside the sandbox, which scope each of
//! its values needs. Every write path of the API checks the whole parsed
//! policy against it once ([`grants`]), plus two things no scope grants
//! ([`admin_only`]): naming the host itself (absolute or climbing host
//! paths, loopback, link-local and unspecified addresses, NATS system
//! subjects), and resources beyond the operator's [`Ceilings`]. The host
//! adds the directories and addresses only it knows (its data, policies
//! and TLS directories; its NATS servers and peers).
//!
//! Policy files on disk are the operator's and are not checked: whoever
//! can write the policies directory is already root of the host.

use std::path::{Component, Path};
use std::time::Duration;

use crate::fence;
use crate::policy::{ByteSize, ConfigValue, PolicyFile};
use crate::scopes::Needed;

/// One value of a policy that needs a scope: where it is, and the scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant<'a> {
    /// The field and value, as an error names them (`files."/data"`).
    pub field: String,
    pub needed: Needed<'a>,
}

/// A field of a policy that reaches outside the sandbox.
pub struct Field {
    /// Its key in a policy file.
    pub name: &'static str,
    /// The scope its values need, as a token names it.
    pub scope: &'static str,
    /// Its values in `file`, each with the scope it needs.
    pub grants: for<'a> fn(&'a PolicyFile) -> Vec<Grant<'a>>,
}

/// Every policy field that reaches outside the sandbox, and its scope.
pub const FIELDS: &[Field] = &[
    Field {
        name: "files",
        scope: "files:PATTERN (the host path as written)",
        grants: files,
    },
    Field {
        name: "outbound.allow",
        scope: "outbound:PATTERN (the host as written, or a range holding it)",
        grants: outbound,
    },
    Field {
        name: "outbound.tcp",
        scope: "tcp:PATTERN (the host as written, or a range holding it)",
        grants: tcp,
    },
    Field {
        name: "config",
        scope: "secrets:PATTERN (the name of the secret a value takes)",
        grants: config,
    },
    Field {
        name: "triggers.nats.stream",
        scope: "streams:PATTERN (the stream's name)",
        grants: streams,
    },
    Field {
        name: "triggers.nats.dead_letter",
        scope: "streams:PATTERN (the subject)",
        grants: dead_letters,
    },
    Field {
        name: "http.hosts",
        scope: "hosts:PATTERN (the name as written)",
        grants: hosts,
    },
];

fn files(file: &PolicyFile) -> Vec<Grant<'_>> {
    file.files
        .iter()
        .map(|(guest, host)| Grant {
            field: format!("files.{:?}", guest.0),
            needed: Needed::Files(host),
        })
        .collect()
}

fn outbound(file: &PolicyFile) -> Vec<Grant<'_>> {
    file.outbound
        .allow
        .iter()
        .map(|pattern| Grant {
            field: format!("outbound.allow {:?}", pattern.to_string()),
            needed: Needed::Outbound(pattern.host()),
        })
        .collect()
}

fn tcp(file: &PolicyFile) -> Vec<Grant<'_>> {
    file.outbound
        .tcp
        .iter()
        .map(|grant| Grant {
            field: format!("outbound.tcp {:?}", grant.to_string()),
            needed: Needed::Tcp(grant.host()),
        })
        .collect()
}

fn config(file: &PolicyFile) -> Vec<Grant<'_>> {
    file.config
        .iter()
        .filter_map(|(key, value)| match value {
            ConfigValue::Secret { secret } => Some(Grant {
                field: format!("config.{}", key.0),
                needed: Needed::Secret(&secret.0),
            }),
            ConfigValue::Text(_) => None,
        })
        .collect()
}

fn streams(file: &PolicyFile) -> Vec<Grant<'_>> {
    file.triggers
        .nats
        .iter()
        .enumerate()
        .map(|(index, trigger)| Grant {
            field: format!("triggers.nats[{index}].stream"),
            needed: Needed::Stream(&trigger.stream.0),
        })
        .collect()
}

fn dead_letters(file: &PolicyFile) -> Vec<Grant<'_>> {
    file.triggers
        .nats
        .iter()
        .enumerate()
        .filter_map(|(index, trigger)| {
            trigger.dead_letter.as_ref().map(|subject| Grant {
                field: format!("triggers.nats[{index}].dead_letter"),
                needed: Needed::Stream(&subject.0),
            })
        })
        .collect()
}

fn hosts(file: &PolicyFile) -> Vec<Grant<'_>> {
    file.http
        .hosts
        .iter()
        .map(|host| Grant {
            field: "http.hosts".to_string(),
            needed: Needed::Host(&host.0),
        })
        .collect()
}

/// Every value of `file` that needs a scope, in [`FIELDS`]' order.
pub fn grants(file: &PolicyFile) -> Vec<Grant<'_>> {
    FIELDS
        .iter()
        .flat_map(|field| (field.grants)(file))
        .collect()
}

/// Something in a policy that only the admin token may write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminOnly {
    pub field: String,
    pub why: String,
}

/// Every address or range `file` names, with its field.
pub fn ranges(file: &PolicyFile) -> Vec<(String, ipnet::IpNet)> {
    let allow = file.outbound.allow.iter().filter_map(|p| {
        p.range()
            .map(|r| (format!("outbound.allow {:?}", p.to_string()), r))
    });
    let tcp = file.outbound.tcp.iter().filter_map(|g| {
        g.range()
            .map(|r| (format!("outbound.tcp {:?}", g.to_string()), r))
    });
    allow.chain(tcp).collect()
}

/// What no scope lets a token write: host paths that are absolute or
/// climb (`..`), addresses of the host itself (loopback, link-local,
/// unspecified, in any form), and NATS subjects of the server itself
/// (`$JS`, `$KV`, `$SYS`, inboxes), where a dead letter would land in
/// another bucket or the server's API.
pub fn admin_only(file: &PolicyFile) -> Option<AdminOnly> {
    if file.access.pass_authorization {
        // The admin token invokes every private function, and reaches a
        // guest only through this: a team cannot turn it on.
        return Some(AdminOnly {
            field: "access.pass_authorization".to_string(),
            why: "it hands the guest whatever Authorization a caller sends, the admin token's included".to_string(),
        });
    }
    for (guest, host) in &file.files {
        let path = Path::new(host);
        let climbs = path
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::Prefix(_)));
        if path.is_absolute() || climbs || host.trim().is_empty() {
            return Some(AdminOnly {
                field: format!("files.{:?}", guest.0),
                why: format!(
                    "the host path {host:?} is absolute, empty or climbs with '..': a scoped token maps only paths inside the policies directory's parent"
                ),
            });
        }
    }
    let never = fence::never_for_scoped();
    for (field, range) in ranges(file) {
        if never.iter().any(|n| fence::overlaps(n, &range)) {
            return Some(AdminOnly {
                field,
                why: format!(
                    "{range} holds loopback, link-local or unspecified addresses (the host itself)"
                ),
            });
        }
    }
    for (index, trigger) in file.triggers.nats.iter().enumerate() {
        let stream = &trigger.stream.0;
        if stream.starts_with("KV_") || stream.starts_with("OBJ_") {
            return Some(AdminOnly {
                field: format!("triggers.nats[{index}].stream"),
                why: format!(
                    "{stream:?} is a key-value or object store's stream (the registry's, or another function's data)"
                ),
            });
        }
        if let Some(subject) = &trigger.dead_letter
            && is_system_subject(&subject.0)
        {
            return Some(AdminOnly {
                field: format!("triggers.nats[{index}].dead_letter"),
                why: format!(
                    "{:?} is a subject of the NATS server itself ($JS, $KV, $SYS, _INBOX)",
                    subject.0
                ),
            });
        }
    }
    None
}

/// Subjects NATS keeps for itself: its APIs and key-value buckets (`$`),
/// and request inboxes.
fn is_system_subject(subject: &str) -> bool {
    subject.starts_with('$')
        || subject.starts_with("_INBOX")
        || subject.starts_with('*')
        || subject.starts_with('>')
}

/// The most a policy written by a scoped token may ask for: the operator's
/// `--scoped-max-*` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ceilings {
    pub memory: u64,
    pub timeout: Duration,
    /// `[limits] concurrency`, and `[instances] concurrency`.
    pub concurrency: u32,
    /// `[limits] queue`.
    pub queue: u32,
    /// `[instances] max`.
    pub instances: u32,
    /// `[limits] request_body` and `response_body`.
    pub body: u64,
}

impl Default for Ceilings {
    /// Four times the defaults a policy gets, a quarter of the most any
    /// policy may set: room for a team's real functions, not for one
    /// function to take the host.
    fn default() -> Self {
        use crate::policy::defaults;
        Ceilings {
            memory: 256 << 20,
            timeout: Duration::from_secs(60),
            concurrency: defaults::CONCURRENCY * 4,
            queue: defaults::QUEUE * 4,
            instances: defaults::CONCURRENCY * 4,
            body: 16 << 20,
        }
    }
}

impl Ceilings {
    /// The first resource `file` asks for beyond these.
    pub fn exceeded(&self, file: &PolicyFile) -> Option<AdminOnly> {
        let limits = &file.limits;
        let over = |field: &str, asked: String, most: String| {
            Some(AdminOnly {
                field: field.to_string(),
                why: format!(
                    "{asked} is over the {most} a scoped token may set (the operator's --scoped-max-* settings)"
                ),
            })
        };
        let size = |n: u64| ByteSize(n).to_string();
        if limits.memory.0 > self.memory {
            return over("limits.memory", size(limits.memory.0), size(self.memory));
        }
        if limits.timeout.0 > self.timeout {
            return over(
                "limits.timeout",
                format!("{:?}", limits.timeout.0),
                format!("{:?}", self.timeout),
            );
        }
        for (field, asked) in [
            ("limits.concurrency", limits.concurrency.0),
            ("instances.concurrency", file.instances.concurrency.0),
        ] {
            if asked > self.concurrency {
                return over(field, asked.to_string(), self.concurrency.to_string());
            }
        }
        if limits.queue > self.queue {
            return over(
                "limits.queue",
                limits.queue.to_string(),
                self.queue.to_string(),
            );
        }
        if let Some(max) = file.instances.max
            && max.0 > self.instances
        {
            return over(
                "instances.max",
                max.0.to_string(),
                self.instances.to_string(),
            );
        }
        for (field, asked) in [
            ("limits.request_body", limits.request_body.0),
            ("limits.response_body", limits.response_body.0),
        ] {
            if asked > self.body {
                return over(field, size(asked), size(self.body));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scopes::Scope;

    fn parse(text: &str) -> PolicyFile {
        toml::from_str(text).unwrap()
    }

    /// The policy fields that reach outside the sandbox, written with and
    /// without the scope each needs.
    const CASES: &[(&str, &str, &str)] = &[
        (
            "files",
            "[files]\n\"/data\" = \"shared/shop\"\n",
            "files:shared/shop*",
        ),
        (
            "outbound.allow",
            "[outbound]\nallow = [\"https://api.stripe.com\"]\n",
            "outbound:*.stripe.com",
        ),
        (
            "outbound.tcp",
            "[outbound]\ntcp = [\"10.1.2.3:5432\"]\n",
            "tcp:10.1.0.0/16",
        ),
        (
            "config",
            "[config]\npg = { secret = \"shop_pg\" }\n",
            "secrets:shop_*",
        ),
        (
            "triggers.nats.stream",
            "[[triggers.nats]]\nstream = \"shop-orders\"\n",
            "streams:shop-*",
        ),
        (
            "triggers.nats.dead_letter",
            "[[triggers.nats]]\nstream = \"shop-orders\"\ndead_letter = \"shop-dead\"\n",
            "streams:shop-*",
        ),
        (
            "http.hosts",
            "[http]\nhosts = [\"shop.example.com\"]\n",
            "hosts:*.example.com",
        ),
    ];

    #[test]
    fn every_field_of_the_table_needs_its_scope_and_is_granted_by_it() {
        for field in FIELDS {
            assert!(
                CASES.iter().any(|(name, ..)| *name == field.name),
                "{} has no case",
                field.name
            );
        }
        for (name, policy, scope) in CASES {
            let file = parse(policy);
            let grants = grants(&file);
            assert!(!grants.is_empty(), "{name}");
            let holds = [Scope::parse(scope).unwrap()];
            let missing: Vec<_> = grants
                .iter()
                .filter(|g| !g.needed.granted_by(&holds))
                .collect();
            // dead_letter's case also names a stream, which the same scope
            // grants.
            assert!(missing.is_empty(), "{name}: {missing:?}");
            let others = [Scope::parse("functions:deploy:*").unwrap()];
            assert!(
                grants.iter().all(|g| !g.needed.granted_by(&others)),
                "{name}"
            );
        }
    }

    #[test]
    fn the_host_itself_is_admin_only_whatever_the_scopes() {
        for policy in [
            "[files]\n\"/d\" = \"/etc\"\n",
            "[files]\n\"/d\" = \"../data\"\n",
            "[files]\n\"/d\" = \"shared/../../data\"\n",
            "[outbound]\ntcp = [\"127.0.0.1:4222\"]\n",
            "[outbound]\ntcp = [\"0.0.0.0/0:4222\"]\n",
            "[outbound]\ntcp = [\"[::ffff:127.0.0.1]:4222\"]\n",
            "[outbound]\nallow = [\"http://127.0.0.1:*\"]\n",
            "[outbound]\nallow = [\"http://[::1]:8080\"]\n",
            "[outbound]\nallow = [\"http://169.254.169.254\"]\n",
            "[outbound]\nallow = [\"http://0.0.0.0/0:*\"]\n",
            "[[triggers.nats]]\nstream = \"s\"\ndead_letter = \"$KV.lichen-registry.x\"\n",
            "[[triggers.nats]]\nstream = \"s\"\ndead_letter = \"$JS.API.STREAM.DELETE.s\"\n",
            "[[triggers.nats]]\nstream = \"KV_lichen-registry\"\n",
            "[access]\npublic = false\npass_authorization = true\n",
            "[outbound]\nallow = [\"http://100.100.100.200\"]\n",
            "[outbound]\ntcp = [\"[fd00:ec2::254]:80\"]\n",
        ] {
            assert!(admin_only(&parse(policy)).is_some(), "{policy}");
        }
        for policy in [
            "[files]\n\"/d\" = \"shared/shop\"\n",
            "[outbound]\ntcp = [\"10.1.2.3:5432\", \"db.example.com:5432\"]\n",
            "[outbound]\nallow = [\"https://*\", \"http://localhost:8080\"]\n",
            "[[triggers.nats]]\nstream = \"s\"\ndead_letter = \"shop.dead\"\n",
        ] {
            assert_eq!(admin_only(&parse(policy)), None, "{policy}");
        }
    }

    #[test]
    fn resources_over_the_ceilings_are_admin_only() {
        let ceilings = Ceilings::default();
        assert_eq!(ceilings.exceeded(&parse("")), None);
        for (policy, field) in [
            ("[limits]\nmemory = \"512MiB\"\n", "limits.memory"),
            ("[limits]\ntimeout = \"5m\"\n", "limits.timeout"),
            ("[limits]\nconcurrency = 1000\n", "limits.concurrency"),
            ("[limits]\nqueue = 100000\n", "limits.queue"),
            ("[instances]\nconcurrency = 1000\n", "instances.concurrency"),
            ("[instances]\nmax = 1000\n", "instances.max"),
            ("[limits]\nrequest_body = \"1GiB\"\n", "limits.request_body"),
            (
                "[limits]\nresponse_body = \"1GiB\"\n",
                "limits.response_body",
            ),
        ] {
            let refused = ceilings.exceeded(&parse(policy));
            assert_eq!(
                refused.map(|r| r.field),
                Some(field.to_string()),
                "{policy}"
            );
        }
        let within = "[limits]\nmemory = \"256MiB\"\ntimeout = \"60s\"\nconcurrency = 64\n";
        assert_eq!(ceilings.exceeded(&parse(within)), None);
    }
}
