//! What a scoped API token may do: its scopes, parsed from what an
//! operator writes, and the scope each admin route needs.
//!
//! A scope is one of `functions:read`, `functions:deploy:PATTERN`,
//! `functions:delete:PATTERN`, `status:read`, `tokens:admin`,
//! `secrets:PATTERN`, `hosts:PATTERN`, and the scopes a policy's grants
//! need ([`crate::grants`]): `files:PATTERN` (host paths of `[files]`),
//! `outbound:PATTERN` (hosts of `[outbound] allow`), `tcp:PATTERN` (hosts
//! of `[outbound] tcp`) and `streams:PATTERN` (NATS streams and
//! dead-letter subjects of `[[triggers.nats]]`). A pattern is a name in
//! which `*` stands for any run of characters (`shop-*`, `*`,
//! `*.shop.example.com`, `shared/shop/*`); an address range
//! (`tcp:10.1.0.0/16`) also grants every address and range inside it. The
//! admin token needs none: it is the root credential.
//!
//! A token made by a `tokens:admin` token holds only scopes its maker's
//! cover ([`Scope::covers`]): a pattern covers another when every name the
//! other matches, it matches too.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::routes::{Handler, Params};

/// The longest pattern, as the longest host names.
const MAX_PATTERN: usize = 253;

/// A name pattern: `*` matches any run of characters, anything else
/// itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern(String);

impl Pattern {
    /// A pattern of names: A-Z, a-z, 0-9, `-`, `_`, `.` and `*`.
    fn parse(text: &str) -> Result<Pattern, String> {
        Pattern::parse_with(text, b"-_*.", "name", "'-', '_', '.'")
    }

    /// A pattern of paths, hosts or ranges: names' characters, `/` and `:`.
    fn parse_path(text: &str) -> Result<Pattern, String> {
        Pattern::parse_with(text, b"-_*./:", "path or host", "'-', '_', '.', '/', ':'")
    }

    fn parse_with(text: &str, extra: &[u8], what: &str, shown: &str) -> Result<Pattern, String> {
        let valid = (1..=MAX_PATTERN).contains(&text.len())
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || extra.contains(&b));
        if valid {
            Ok(Pattern(text.to_string()))
        } else {
            Err(format!(
                "{text:?} is not a {what} pattern: 1 to {MAX_PATTERN} of A-Z, a-z, 0-9, {shown} and '*' (any run of characters)"
            ))
        }
    }

    /// Whether `name` matches, whole.
    pub fn matches(&self, name: &str) -> bool {
        let mut parts = self.0.split('*');
        let first = parts.next().unwrap_or_default();
        let Some(mut rest) = name.strip_prefix(first) else {
            return false;
        };
        let middle: Vec<&str> = parts.collect();
        let Some((last, middle)) = middle.split_last() else {
            // No `*`: the name is the pattern.
            return rest.is_empty();
        };
        for part in middle {
            match rest.find(part) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
        rest.len() >= last.len() && rest.ends_with(last)
    }

    /// Whether every name `other` matches, this matches too. `other`'s
    /// `*`s are matched as characters: a literal part of this pattern
    /// never holds a `*`, so each of `other`'s falls inside one of this
    /// pattern's, which matches whatever it stands for.
    pub fn covers(&self, other: &Pattern) -> bool {
        self.grants(&other.0)
    }

    /// Whether this pattern is an address range holding `name`, an
    /// address or a range.
    fn holds_range(&self, name: &str) -> bool {
        let Ok(range) = self.0.parse::<IpNet>() else {
            return false;
        };
        match name.parse::<IpNet>() {
            Ok(inner) => range.contains(&inner),
            Err(_) => name
                .parse::<IpAddr>()
                .is_ok_and(|ip| range.contains(&ip.to_canonical())),
        }
    }

    /// Whether `name` matches, whole; an address or a range only by lying
    /// in this pattern's range (`10.1.*` as text would match `10.1.0.0/8`,
    /// which is all of `10/8`).
    pub fn grants(&self, name: &str) -> bool {
        let address = name.parse::<IpNet>().is_ok() || name.parse::<IpAddr>().is_ok();
        if address {
            self.holds_range(name)
        } else {
            self.matches(name)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One thing a token may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// List and describe every function, read policies and store usage.
    FunctionsRead,
    /// Deploy, roll back, write the policy of, purge the stores of and run
    /// the triggers of the functions the pattern matches (and read them).
    FunctionsDeploy(Pattern),
    /// Delete the functions the pattern matches.
    FunctionsDelete(Pattern),
    /// The status, the peers, the metrics and the audit log.
    StatusRead,
    /// Create, list and revoke tokens (of any scope).
    TokensAdmin,
    /// Set, list and remove the secrets the pattern matches.
    Secrets(Pattern),
    /// Claim the host names the pattern matches in a policy's `[http]`
    /// (a wildcard name, `*.shop.example.com`, is matched as written).
    Hosts(Pattern),
    /// Map host paths the pattern matches into a guest (`[files]`).
    Files(Pattern),
    /// Let a guest send HTTP to the hosts the pattern matches
    /// (`[outbound] allow`).
    Outbound(Pattern),
    /// Let a guest open TCP connections to the hosts the pattern matches
    /// (`[outbound] tcp`).
    Tcp(Pattern),
    /// Consume the NATS streams, and publish dead letters to the subjects,
    /// the pattern matches (`[[triggers.nats]]`).
    Streams(Pattern),
}

impl Scope {
    pub fn parse(text: &str) -> Result<Scope, String> {
        let scope = match text.split_once(':') {
            Some(("functions", "read")) => Scope::FunctionsRead,
            Some(("status", "read")) => Scope::StatusRead,
            Some(("tokens", "admin")) => Scope::TokensAdmin,
            Some(("secrets", pattern)) => Scope::Secrets(Pattern::parse(pattern)?),
            Some(("hosts", pattern)) => Scope::Hosts(Pattern::parse(pattern)?),
            Some(("files", pattern)) => Scope::Files(Pattern::parse_path(pattern)?),
            Some(("outbound", pattern)) => Scope::Outbound(Pattern::parse_path(pattern)?),
            Some(("tcp", pattern)) => Scope::Tcp(Pattern::parse_path(pattern)?),
            Some(("streams", pattern)) => Scope::Streams(Pattern::parse(pattern)?),
            Some(("functions", rest)) => match rest.split_once(':') {
                Some(("deploy", pattern)) => Scope::FunctionsDeploy(Pattern::parse(pattern)?),
                Some(("delete", pattern)) => Scope::FunctionsDelete(Pattern::parse(pattern)?),
                _ => return Err(unknown(text)),
            },
            _ => return Err(unknown(text)),
        };
        Ok(scope)
    }

    /// Whether a token holding this scope may give `other` to a token it
    /// makes: the same kind, with a pattern at most as wide.
    pub fn covers(&self, other: &Scope) -> bool {
        use Scope::*;
        match (self, other) {
            (FunctionsRead, FunctionsRead)
            | (StatusRead, StatusRead)
            | (TokensAdmin, TokensAdmin) => true,
            (FunctionsDeploy(a), FunctionsDeploy(b))
            | (FunctionsDelete(a), FunctionsDelete(b))
            | (Secrets(a), Secrets(b))
            | (Hosts(a), Hosts(b))
            | (Files(a), Files(b))
            | (Outbound(a), Outbound(b))
            | (Tcp(a), Tcp(b))
            | (Streams(a), Streams(b)) => a.covers(b),
            _ => false,
        }
    }
}

fn unknown(text: &str) -> String {
    format!(
        "{text:?} is not a scope: functions:read, functions:deploy:PATTERN, functions:delete:PATTERN, status:read, tokens:admin, secrets:PATTERN, hosts:PATTERN, files:PATTERN, outbound:PATTERN, tcp:PATTERN or streams:PATTERN"
    )
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::FunctionsRead => f.write_str("functions:read"),
            Scope::FunctionsDeploy(p) => write!(f, "functions:deploy:{}", p.0),
            Scope::FunctionsDelete(p) => write!(f, "functions:delete:{}", p.0),
            Scope::StatusRead => f.write_str("status:read"),
            Scope::TokensAdmin => f.write_str("tokens:admin"),
            Scope::Secrets(p) => write!(f, "secrets:{}", p.0),
            Scope::Hosts(p) => write!(f, "hosts:{}", p.0),
            Scope::Files(p) => write!(f, "files:{}", p.0),
            Scope::Outbound(p) => write!(f, "outbound:{}", p.0),
            Scope::Tcp(p) => write!(f, "tcp:{}", p.0),
            Scope::Streams(p) => write!(f, "streams:{}", p.0),
        }
    }
}

/// What an admin route needs of a scoped token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needed<'a> {
    /// Reading every function (a listing).
    ReadAll,
    /// Reading one function: `functions:read`, or deploying it.
    Read(&'a str),
    Deploy(&'a str),
    Delete(&'a str),
    StatusRead,
    TokensAdmin,
    /// The secrets listing: any `secrets:` scope (the listing shows what
    /// the token's patterns match).
    AnySecret,
    Secret(&'a str),
    /// Claiming a host name in `[http]`.
    Host(&'a str),
    /// Mapping a host path into a guest.
    Files(&'a str),
    /// Outbound HTTP to a host (as a policy writes it).
    Outbound(&'a str),
    /// Outbound TCP to a host (as a policy writes it).
    Tcp(&'a str),
    /// Consuming a NATS stream, or publishing to a subject.
    Stream(&'a str),
    /// A path under `/v1` with no route: any valid token (the answer is
    /// `404` or `405`).
    Nothing,
    /// The admin token only.
    Root,
}

impl Needed<'_> {
    /// Whether `scopes` grant it.
    pub fn granted_by(&self, scopes: &[Scope]) -> bool {
        scopes.iter().any(|scope| match (self, scope) {
            (Needed::Nothing, _) => true,
            (Needed::ReadAll | Needed::Read(_), Scope::FunctionsRead) => true,
            (Needed::Read(name) | Needed::Deploy(name), Scope::FunctionsDeploy(p)) => {
                p.matches(name)
            }
            (Needed::Delete(name), Scope::FunctionsDelete(p)) => p.matches(name),
            (Needed::StatusRead, Scope::StatusRead) => true,
            (Needed::TokensAdmin, Scope::TokensAdmin) => true,
            (Needed::AnySecret, Scope::Secrets(_)) => true,
            (Needed::Secret(name), Scope::Secrets(p)) => p.matches(name),
            (Needed::Host(name), Scope::Hosts(p)) => p.matches(name),
            (Needed::Files(path), Scope::Files(p)) => p.matches(path),
            (Needed::Outbound(host), Scope::Outbound(p)) => p.grants(host),
            (Needed::Tcp(host), Scope::Tcp(p)) => p.grants(host),
            (Needed::Stream(name), Scope::Streams(p)) => p.matches(name),
            _ => false,
        })
    }
}

impl fmt::Display for Needed<'_> {
    /// The scope to ask for.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Needed::ReadAll => f.write_str("functions:read"),
            Needed::Read(name) => write!(f, "functions:read (or functions:deploy:{name})"),
            Needed::Deploy(name) => write!(f, "functions:deploy:{name}"),
            Needed::Delete(name) => write!(f, "functions:delete:{name}"),
            Needed::StatusRead => f.write_str("status:read"),
            Needed::TokensAdmin => f.write_str("tokens:admin"),
            Needed::AnySecret => f.write_str("secrets:PATTERN"),
            Needed::Secret(name) => write!(f, "secrets:{name}"),
            Needed::Host(name) => write!(f, "hosts:{name}"),
            Needed::Files(path) => write!(f, "files:{path}"),
            Needed::Outbound(host) => write!(f, "outbound:{host}"),
            Needed::Tcp(host) => write!(f, "tcp:{host}"),
            Needed::Stream(name) => write!(f, "streams:{name}"),
            Needed::Nothing => f.write_str("any scope"),
            Needed::Root => f.write_str("the admin token"),
        }
    }
}

/// What a scoped token needs for `handler` with its path's `params`;
/// `None` for routes that take no admin credential.
pub fn needed<'a>(handler: Handler, params: &Params<'a>) -> Option<Needed<'a>> {
    let name = params.get(0);
    let needed = match handler {
        Handler::ListFunctions | Handler::ListRoutes => Needed::ReadAll,
        Handler::Describe | Handler::GetPolicy | Handler::KvUsage => Needed::Read(name),
        Handler::Deploy
        | Handler::PutPolicy
        | Handler::Rollback
        | Handler::KvPurge
        | Handler::RunTrigger => Needed::Deploy(name),
        Handler::Delete => Needed::Delete(name),
        Handler::Peers | Handler::Status | Handler::Audit | Handler::Metrics => Needed::StatusRead,
        Handler::CreateToken | Handler::ListTokens | Handler::RevokeToken => Needed::TokensAdmin,
        Handler::ListSecrets => Needed::AnySecret,
        Handler::SetSecret | Handler::DeleteSecret => Needed::Secret(name),
        Handler::Invoke
        | Handler::Map
        | Handler::Ui
        | Handler::Module
        | Handler::CronClaim
        | Handler::OpenApi
        | Handler::Healthz
        | Handler::Readyz => return None,
    };
    Some(needed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(text: &str) -> Pattern {
        Pattern::parse(text).unwrap()
    }

    #[test]
    fn patterns_match_whole_names() {
        for (p, name) in [
            ("shop-*", "shop-cart"),
            ("shop-*", "shop-"),
            ("*", "anything"),
            ("*-api", "shop-api"),
            ("a*b*c", "abc"),
            ("a*b*c", "a-b-b-c"),
            ("blog", "blog"),
        ] {
            assert!(pattern(p).matches(name), "{p} {name}");
        }
        for (p, name) in [
            ("shop-*", "blog"),
            ("shop-*", "my-shop-cart"),
            ("*-api", "shop-apis"),
            ("a*b*c", "acb"),
            ("blog", "blogs"),
            ("a*a", "a"),
        ] {
            assert!(!pattern(p).matches(name), "{p} {name}");
        }
    }

    #[test]
    fn scopes_read_back_as_written_and_bad_ones_say_why() {
        for text in [
            "functions:read",
            "functions:deploy:shop-*",
            "functions:delete:*",
            "status:read",
            "tokens:admin",
            "secrets:shop_*",
            "hosts:*.shop.example.com",
            "files:shared/shop/*",
            "outbound:*.stripe.com",
            "tcp:10.1.0.0/16",
            "streams:shop-*",
        ] {
            assert_eq!(Scope::parse(text).unwrap().to_string(), text);
        }
        for text in [
            "",
            "functions",
            "functions:write",
            "functions:deploy:",
            "functions:deploy:shop/*",
            "admin",
            "status:write",
        ] {
            assert!(Scope::parse(text).is_err(), "{text}");
        }
    }

    #[test]
    fn every_admin_route_names_the_scope_it_needs_and_no_other_route_does() {
        use crate::routes::{Access, ROUTES};
        for route in ROUTES {
            let needed = needed(route.handler, &Params::default());
            let admin = matches!(route.access, Access::Admin | Access::Metrics);
            assert_eq!(
                needed.is_some(),
                admin,
                "{} {:?}",
                route.path,
                route.handler
            );
        }
    }

    #[test]
    fn a_deploy_scope_covers_its_functions_and_nothing_else() {
        let scopes = [Scope::parse("functions:deploy:shop-*").unwrap()];
        assert!(Needed::Deploy("shop-cart").granted_by(&scopes));
        assert!(Needed::Read("shop-cart").granted_by(&scopes));
        assert!(!Needed::Deploy("blog").granted_by(&scopes));
        assert!(!Needed::Delete("shop-cart").granted_by(&scopes));
        assert!(!Needed::ReadAll.granted_by(&scopes));
        assert!(!Needed::TokensAdmin.granted_by(&scopes));
        assert!(Needed::Nothing.granted_by(&scopes));
        assert!(!Needed::Nothing.granted_by(&[]));
        assert_eq!(Needed::Deploy("blog").to_string(), "functions:deploy:blog");
        let hosts = [Scope::parse("hosts:*.shop.example.com").unwrap()];
        assert!(Needed::Host("eu.shop.example.com").granted_by(&hosts));
        assert!(Needed::Host("*.shop.example.com").granted_by(&hosts));
        assert!(!Needed::Host("shop.example.com").granted_by(&hosts));
        assert!(!Needed::Host("blog.example.com").granted_by(&hosts));
    }

    #[test]
    fn a_scope_covers_only_narrower_or_equal_ones_of_its_kind() {
        let scope = |text: &str| Scope::parse(text).unwrap();
        for (wide, narrow) in [
            ("functions:deploy:*", "functions:deploy:shop-*"),
            ("functions:deploy:shop-*", "functions:deploy:shop-*"),
            ("functions:deploy:shop-*", "functions:deploy:shop-cart"),
            ("functions:deploy:shop-*", "functions:deploy:shop-*-api"),
            ("secrets:*", "secrets:pg"),
            ("tcp:10.0.0.0/8", "tcp:10.1.0.0/16"),
            ("tcp:10.0.0.0/8", "tcp:10.1.2.3"),
            ("status:read", "status:read"),
            ("tokens:admin", "tokens:admin"),
        ] {
            assert!(scope(wide).covers(&scope(narrow)), "{wide} covers {narrow}");
        }
        for (narrow, wide) in [
            ("functions:deploy:shop-*", "functions:deploy:*"),
            ("functions:deploy:shop-*", "functions:deploy:sho*"),
            ("functions:deploy:shop-cart", "functions:deploy:shop-*"),
            ("functions:deploy:*", "functions:delete:x"),
            ("functions:deploy:*", "tokens:admin"),
            ("functions:read", "status:read"),
            ("secrets:pg", "secrets:*"),
            ("tcp:10.1.0.0/16", "tcp:10.0.0.0/8"),
        ]
        .into_iter()
        .filter(|(n, _)| n.contains(':'))
        {
            assert!(
                !scope(narrow).covers(&scope(wide)),
                "{narrow} covers not {wide}"
            );
        }
        assert!(!pattern("a*c").covers(&pattern("*")));
        assert!(!pattern("*c").covers(&pattern("*")));
        assert!(pattern("a*").covers(&pattern("a*b*")));
    }

    #[test]
    fn address_scopes_grant_the_addresses_of_their_range() {
        let tcp = [Scope::parse("tcp:10.1.0.0/16").unwrap()];
        assert!(Needed::Tcp("10.1.2.3").granted_by(&tcp));
        assert!(Needed::Tcp("10.1.0.0/24").granted_by(&tcp));
        assert!(!Needed::Tcp("10.2.0.1").granted_by(&tcp));
        assert!(!Needed::Tcp("10.0.0.0/8").granted_by(&tcp));
        assert!(!Needed::Tcp("db.example.com").granted_by(&tcp));
        assert!(!Needed::Outbound("10.1.2.3").granted_by(&tcp));
        // A glob grants names, never ranges: `10.1.*` is not a range.
        let glob = [Scope::parse("tcp:10.1.*").unwrap()];
        assert!(!Needed::Tcp("10.1.0.0/8").granted_by(&glob));
        assert!(!Needed::Tcp("10.0.0.0/5").granted_by(&glob));
        assert!(!Needed::Tcp("10.1.2.3").granted_by(&glob));
        let any = [Scope::parse("tcp:*").unwrap()];
        assert!(!Needed::Tcp("10.1.2.3").granted_by(&any));
        assert!(Needed::Tcp("db.example.com").granted_by(&any));
        let all = [Scope::parse("tcp:0.0.0.0/0").unwrap()];
        assert!(Needed::Tcp("10.1.2.3").granted_by(&all));
    }
}
