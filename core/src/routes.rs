//! The host's routes: which handler answers a method and path, who may call
//! it, and the path's parameters. The table is the API's contract, held to
//! `host/openapi.json` by the host's tests; matching is pure string work, so
//! it is fuzzed here without a server.

use http::Method;

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone.
    Public,
    /// The admin token, or a token with the scope the route needs
    /// ([`crate::scopes::needed`]).
    Admin,
    /// The cluster token: peers only.
    Peer,
    /// What the function's policy says: anyone for a public function, its
    /// tokens or the admin token for a private one (checked by the handler,
    /// which knows the function).
    Function,
    /// Anyone, or the admin token with `--metrics-require-token`.
    Metrics,
}

/// What answers a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handler {
    Invoke,
    ListFunctions,
    Deploy,
    Describe,
    Delete,
    GetPolicy,
    PutPolicy,
    KvUsage,
    KvPurge,
    Rollback,
    ListSecrets,
    SetSecret,
    DeleteSecret,
    CreateToken,
    ListTokens,
    RevokeToken,
    Map,
    Peers,
    Status,
    /// The audit log.
    Audit,
    /// The names functions claim in `[http]`.
    ListRoutes,
    /// The status page and its assets.
    Ui,
    Module,
    /// A peer's claim of a cron tick.
    CronClaim,
    /// Fires a function's trigger now.
    RunTrigger,
    OpenApi,
    Metrics,
    Healthz,
    Readyz,
}

/// One route: `method` (`None`: any method), a path whose `{x}` segments
/// match one segment each and whose last `{x...}` matches the rest of the
/// path, slashes included.
#[derive(Debug, PartialEq, Eq)]
pub struct Route {
    pub method: Option<Method>,
    pub path: &'static str,
    pub access: Access,
    pub handler: Handler,
}

const fn route(
    method: Option<Method>,
    path: &'static str,
    access: Access,
    handler: Handler,
) -> Route {
    Route {
        method,
        path,
        access,
        handler,
    }
}

const ANY: Option<Method> = None;
const GET: Option<Method> = Some(Method::GET);
const PUT: Option<Method> = Some(Method::PUT);
const POST: Option<Method> = Some(Method::POST);
const DELETE: Option<Method> = Some(Method::DELETE);

/// Every route of the host, invocations first (they are most requests).
pub static ROUTES: &[Route] = &[
    route(ANY, "/fn/{name}", Access::Function, Handler::Invoke),
    route(
        ANY,
        "/fn/{name}/{path...}",
        Access::Function,
        Handler::Invoke,
    ),
    route(GET, "/v1/functions", Access::Admin, Handler::ListFunctions),
    route(GET, "/v1/routes", Access::Admin, Handler::ListRoutes),
    route(PUT, "/v1/functions/{name}", Access::Admin, Handler::Deploy),
    route(
        GET,
        "/v1/functions/{name}",
        Access::Admin,
        Handler::Describe,
    ),
    route(
        DELETE,
        "/v1/functions/{name}",
        Access::Admin,
        Handler::Delete,
    ),
    route(
        GET,
        "/v1/functions/{name}/policy",
        Access::Admin,
        Handler::GetPolicy,
    ),
    route(
        PUT,
        "/v1/functions/{name}/policy",
        Access::Admin,
        Handler::PutPolicy,
    ),
    route(
        GET,
        "/v1/functions/{name}/kv",
        Access::Admin,
        Handler::KvUsage,
    ),
    route(
        DELETE,
        "/v1/functions/{name}/kv/{label}",
        Access::Admin,
        Handler::KvPurge,
    ),
    route(
        POST,
        "/v1/functions/{name}/rollback",
        Access::Admin,
        Handler::Rollback,
    ),
    route(
        POST,
        "/v1/functions/{name}/map",
        Access::Function,
        Handler::Map,
    ),
    route(
        POST,
        "/v1/functions/{name}/triggers/{index}/run",
        Access::Admin,
        Handler::RunTrigger,
    ),
    route(GET, "/v1/secrets", Access::Admin, Handler::ListSecrets),
    route(PUT, "/v1/secrets/{name}", Access::Admin, Handler::SetSecret),
    route(
        DELETE,
        "/v1/secrets/{name}",
        Access::Admin,
        Handler::DeleteSecret,
    ),
    route(POST, "/v1/tokens", Access::Admin, Handler::CreateToken),
    route(GET, "/v1/tokens", Access::Admin, Handler::ListTokens),
    route(
        DELETE,
        "/v1/tokens/{name}",
        Access::Admin,
        Handler::RevokeToken,
    ),
    route(GET, "/v1/peers", Access::Admin, Handler::Peers),
    route(GET, "/v1/status", Access::Admin, Handler::Status),
    route(GET, "/v1/audit", Access::Admin, Handler::Audit),
    route(GET, "/ui", Access::Public, Handler::Ui),
    route(GET, "/ui/{file}", Access::Public, Handler::Ui),
    route(
        GET,
        "/v1/internal/modules/{sha256}",
        Access::Peer,
        Handler::Module,
    ),
    route(
        POST,
        "/v1/internal/cron-claims",
        Access::Peer,
        Handler::CronClaim,
    ),
    route(GET, "/v1/openapi.json", Access::Public, Handler::OpenApi),
    route(GET, "/metrics", Access::Metrics, Handler::Metrics),
    route(GET, "/healthz", Access::Public, Handler::Healthz),
    route(GET, "/readyz", Access::Public, Handler::Readyz),
];

/// The values of a route's `{x}` segments, in order.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Params<'p> {
    values: [&'p str; 2],
    len: usize,
}

impl<'p> Params<'p> {
    fn push(&mut self, value: &'p str) -> Option<()> {
        *self.values.get_mut(self.len)? = value;
        self.len += 1;
        Some(())
    }

    /// The `i`th value (the table's patterns fix how many there are).
    pub fn get(&self, i: usize) -> &'p str {
        self.values[..self.len].get(i).copied().unwrap_or_default()
    }
}

impl Route {
    /// The path's parameters if `path` has this route's shape.
    pub fn matches<'p>(&self, path: &'p str) -> Option<Params<'p>> {
        let mut rest = path.strip_prefix('/')?;
        let mut params = Params::default();
        let mut pattern = self.path.strip_prefix('/')?.split('/').peekable();
        while let Some(segment) = pattern.next() {
            if segment.starts_with('{') && segment.ends_with("...}") {
                params.push(rest)?;
                return Some(params);
            }
            let (head, tail) = match rest.split_once('/') {
                Some((head, tail)) => (head, Some(tail)),
                None => (rest, None),
            };
            if segment.starts_with('{') {
                params.push(head)?;
            } else if segment != head {
                return None;
            }
            match (tail, pattern.peek()) {
                (Some(tail), Some(_)) => rest = tail,
                (None, None) => return Some(params),
                _ => return None,
            }
        }
        None
    }
}

/// What the table says of a request's method and path.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup<'p> {
    /// The first route with the path's shape and the request's method.
    Found(&'static Route, Params<'p>),
    /// Routes have the path's shape, none the method: these methods do.
    MethodNotAllowed(Vec<&'static Method>),
    NotFound,
}

/// Finds the route of `method` and `path`.
pub fn lookup<'p>(method: &Method, path: &'p str) -> Lookup<'p> {
    let mut allowed: Vec<&'static Method> = Vec::new();
    for route in ROUTES {
        let Some(params) = route.matches(path) else {
            continue;
        };
        match &route.method {
            Some(other) if other != method => allowed.push(other),
            _ => return Lookup::Found(route, params),
        }
    }
    if allowed.is_empty() {
        Lookup::NotFound
    } else {
        Lookup::MethodNotAllowed(allowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find(method: Method, path: &str) -> Option<(Handler, Vec<&str>)> {
        match lookup(&method, path) {
            Lookup::Found(route, params) => {
                let values = (0..params.len).map(|i| params.get(i)).collect();
                Some((route.handler, values))
            }
            Lookup::MethodNotAllowed(_) | Lookup::NotFound => None,
        }
    }

    #[test]
    fn paths_find_their_handler_and_parameters() {
        type Case<'a> = (Method, &'a str, Option<(Handler, &'a [&'a str])>);
        let cases: &[Case] = &[
            (
                Method::GET,
                "/fn/hello",
                Some((Handler::Invoke, &["hello"])),
            ),
            (
                Method::POST,
                "/fn/hello/",
                Some((Handler::Invoke, &["hello", ""])),
            ),
            (
                Method::PATCH,
                "/fn/hello/a/b/",
                Some((Handler::Invoke, &["hello", "a/b/"])),
            ),
            (Method::GET, "/fn/", Some((Handler::Invoke, &[""]))),
            (Method::GET, "/fn", None),
            (
                Method::GET,
                "/v1/functions",
                Some((Handler::ListFunctions, &[])),
            ),
            (
                Method::GET,
                "/v1/functions/",
                Some((Handler::Describe, &[""])),
            ),
            (
                Method::PUT,
                "/v1/functions/a",
                Some((Handler::Deploy, &["a"])),
            ),
            (
                Method::PUT,
                "/v1/functions/a/policy",
                Some((Handler::PutPolicy, &["a"])),
            ),
            (
                Method::POST,
                "/v1/functions/a/map",
                Some((Handler::Map, &["a"])),
            ),
            (Method::GET, "/v1/functions/a/map", None),
            (Method::GET, "/v1/functions/a/policy/x", None),
            (
                Method::GET,
                "/v1/internal/modules/ab",
                Some((Handler::Module, &["ab"])),
            ),
            (Method::GET, "/ui", Some((Handler::Ui, &[]))),
            (Method::GET, "/ui/app.js", Some((Handler::Ui, &["app.js"]))),
            (Method::GET, "/ui/", Some((Handler::Ui, &[""]))),
            (Method::GET, "/ui/a/b", None),
            (Method::GET, "/healthz", Some((Handler::Healthz, &[]))),
            (Method::GET, "/healthz/", None),
            (Method::GET, "//healthz", None),
            (Method::GET, "", None),
        ];
        for (method, path, expected) in cases {
            let found = find(method.clone(), path);
            let expected = expected.map(|(h, p)| (h, p.to_vec()));
            assert_eq!(found, expected, "{method} {path}");
        }
    }
}
