//! A policy written by a scoped token grants nothing the token does not
//! hold.
//!
//! `lichen_core::grants` says, from the policy alone, which scope each
//! value reaching outside the sandbox needs and what no scope grants. This
//! adds what only the host knows: the directories that hold its
//! credentials and configuration (the data directory with the admin token,
//! the secrets key and the token hashes; the policies directory; the TLS
//! files), which no `[files]` value of a scoped writer may reach, inside or
//! above; and the addresses of its NATS servers and its peers, which no
//! `[outbound]` address or range of a scoped writer may name. The admin
//! token is exempt (it is root), and so are policy files on disk (the
//! operator's).
//!
//! Every write path that puts a policy in force calls [`check`] once with
//! the parsed policy; a refusal is a `403` naming the field and what was
//! missing, and the API's audit line records it with the token's name.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::StatusCode;
use lichen_core::fence;
use lichen_core::grants::{self, AdminOnly, Ceilings};
use lichen_core::policy::PolicyFile;

use super::AppState;
use super::auth::Caller;
use crate::error::ApiError;

/// What a scoped writer's policy may not reach, as this host is set up.
#[derive(Debug, Clone, Default)]
pub struct Fences {
    /// The data directory (admin token, secrets key, token hashes,
    /// modules, audit log).
    pub data_dir: PathBuf,
    /// Files and directories of credentials and settings: the TLS files
    /// and `--tls-dir`, the secrets key, the admin token's and the cluster
    /// secret's files, the registry's credentials, the config file.
    pub tls: Vec<PathBuf>,
    /// The NATS servers of the key-value backend (`nats://host:port`).
    pub nats: Vec<String>,
    /// This host's own listening and advertised addresses.
    pub own: Vec<SocketAddr>,
    /// The most a scoped writer's policy may ask for.
    pub ceilings: Ceilings,
}

/// How long resolving the NATS servers' names may take.
const RESOLVE_WAIT: Duration = Duration::from_secs(2);

/// Checks `file` against what `caller` holds: `403 missing_scope` naming
/// the field and scope, or `403 admin_only` for what no scope grants.
pub async fn check(state: &AppState, caller: &Caller, file: &PolicyFile) -> Result<(), ApiError> {
    let Caller::Token(grant) = caller else {
        return Ok(());
    };
    for needs in grants::grants(file) {
        if !caller.may(needs.needed) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "missing_scope",
                format!(
                    "{}: the token {:?} does not have the scope this needs: {}",
                    needs.field, grant.name, needs.needed
                ),
            ));
        }
    }
    let fences = &state.limits.fences;
    let refused = grants::admin_only(file)
        .or_else(|| fences.ceilings.exceeded(file))
        .or_else(|| protected_path(state, file));
    let refused = match refused {
        Some(refused) => Some(refused),
        None => host_address(state, file).await,
    };
    match refused {
        None => Ok(()),
        Some(AdminOnly { field, why }) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "admin_only",
            format!(
                "{field}: {why}; only the admin token may write this (the token {:?} is scoped)",
                grant.name
            ),
        )),
    }
}

/// A `[files]` host path that reaches, or holds, one of the host's own
/// directories.
fn protected_path(state: &AppState, file: &PolicyFile) -> Option<AdminOnly> {
    if file.files.is_empty() {
        return None;
    }
    let policies = state.functions.policies.dir();
    let base = policies.parent().unwrap_or(Path::new("."));
    let fences = &state.limits.fences;
    let protected: Vec<PathBuf> = [policies, fences.data_dir.as_path()]
        .into_iter()
        .chain(fences.tls.iter().map(PathBuf::as_path))
        .map(resolved)
        .collect();
    for (guest, host) in &file.files {
        let path = resolved(&base.join(host));
        if let Some(hit) = protected
            .iter()
            .find(|p| path.starts_with(p) || p.starts_with(&path))
        {
            return Some(AdminOnly {
                field: format!("files.{:?}", guest.0),
                why: format!(
                    "{host:?} reaches {}, which holds the host's own credentials or configuration",
                    hit.display()
                ),
            });
        }
    }
    None
}

/// `path` absolute and with symbolic links resolved as far as it exists.
fn resolved(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut existing = absolute.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = existing.canonicalize() {
            return rest.iter().rev().fold(real, |p, c| p.join(c));
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                existing = parent;
            }
            _ => return absolute,
        }
    }
}

/// An `[outbound]` address or range naming one of this host's NATS
/// servers, its peers, or itself.
async fn host_address(state: &AppState, file: &PolicyFile) -> Option<AdminOnly> {
    let named = grants::ranges(file);
    if named.is_empty() {
        return None;
    }
    let fences = &state.limits.fences;
    let mut ips: Vec<(String, IpAddr)> = fences
        .own
        .iter()
        .filter(|a| !a.ip().is_unspecified())
        .map(|a| ("this host".to_string(), a.ip()))
        .collect();
    for url in &fences.nats {
        for ip in resolve(url).await {
            ips.push((format!("the NATS server {url}"), ip));
        }
    }
    if let Some(cluster) = state.cluster() {
        for peer in cluster.peers().iter() {
            ips.push((format!("the peer {}", peer.node_id), peer.gossip.ip()));
            if let Some(ip) = url_host(&peer.api).and_then(|h| h.parse().ok()) {
                ips.push((format!("the peer {}", peer.node_id), ip));
            }
        }
    }
    for (field, range) in named {
        for (what, ip) in &ips {
            if fence::address_ranges(*ip)
                .iter()
                .any(|own| fence::overlaps(own, &range))
            {
                return Some(AdminOnly {
                    field,
                    why: format!("{range} holds {ip}, {what}"),
                });
            }
        }
    }
    None
}

/// The host of a `scheme://host:port/...` URL (IPv6 without brackets).
fn url_host(url: &str) -> Option<&str> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next();
    }
    Some(
        authority
            .rsplit_once(':')
            .map_or(authority, |(host, _)| host),
    )
}

/// The addresses of a NATS server URL's host (an address as itself, a
/// name as it resolves now).
async fn resolve(url: &str) -> Vec<IpAddr> {
    let Some(host) = url_host(url) else {
        return Vec::new();
    };
    if let Ok(ip) = host.parse::<IpAddr>() {
        return vec![ip];
    }
    match tokio::time::timeout(RESOLVE_WAIT, tokio::net::lookup_host((host, 0))).await {
        Ok(Ok(addrs)) => addrs.map(|a| a.ip()).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_hosts_come_out_of_every_form() {
        assert_eq!(url_host("nats://127.0.0.1:4222"), Some("127.0.0.1"));
        assert_eq!(
            url_host("nats://u:p@nats.example:4222"),
            Some("nats.example")
        );
        assert_eq!(url_host("http://[::1]:80/x"), Some("::1"));
        assert_eq!(url_host("10.0.0.1:4222"), Some("10.0.0.1"));
        assert_eq!(url_host("nats.example"), Some("nats.example"));
    }

    #[test]
    fn a_path_that_does_not_exist_yet_resolves_through_what_does() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().canonicalize().unwrap();
        assert_eq!(resolved(&dir.path().join("a/b")), real.join("a/b"));
    }
}
