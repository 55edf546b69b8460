//! The command-line client: `lichen deploy`, `ls`, `rm` and `map` talk to
//! a host's admin API, over HTTP or HTTPS (the public roots, plus
//! `--ca-cert` for a private CA; an expired certificate or one for another
//! name is refused). Errors print the server's own message.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;

use crate::server::ADMIN_TOKEN_FILE;

/// Where and how to reach a host.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: String,
    pub token: String,
    /// A CA (PEM) trusted for `https://` beside the public roots.
    pub ca_cert: Option<PathBuf>,
}

impl Target {
    /// The token from the flag or environment if given, else from the local
    /// data directory that `lichen serve` writes it to.
    pub fn resolve(url: String, token: Option<String>, data_dir: &Path) -> Result<Self> {
        let token = match token.filter(|t| !t.is_empty()) {
            Some(token) => token,
            None => {
                let path: PathBuf = data_dir.join(ADMIN_TOKEN_FILE);
                std::fs::read_to_string(&path)
                    .with_context(|| {
                        format!(
                            "no admin token: pass --token, set LICHEN_ADMIN_TOKEN, or run next to the host's data directory ({} not readable)",
                            path.display()
                        )
                    })?
                    .trim()
                    .to_string()
            }
        };
        Ok(Target {
            url: url.trim_end_matches('/').to_string(),
            token,
            ca_cert: None,
        })
    }

    /// Sends one admin request with a body of `content_type`; returns the
    /// status and the body.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
        content_type: &'static str,
    ) -> Result<(StatusCode, Bytes)> {
        let uri: Uri = format!("{}{path}", self.url)
            .parse()
            .with_context(|| format!("{} is not a URL", self.url))?;
        let mut request = Request::builder()
            .method(method)
            .uri(uri.path_and_query().map_or("/", |p| p.as_str()))
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token))
            .header(header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .with_context(|| format!("building a request to {uri}"))?;
        if let Some(authority) = uri.authority() {
            request.headers_mut().insert(
                header::HOST,
                HeaderValue::from_str(authority.as_str()).context("the URL's host")?,
            );
        }
        let response = self
            .request(&uri, request)
            .await
            .with_context(|| format!("cannot reach the host at {}", self.url))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .context("reading the host's answer")?
            .to_bytes();
        Ok((status, body))
    }

    /// One request on a connection of its own, over TLS for `https://`.
    async fn request(
        &self,
        uri: &Uri,
        request: Request<Full<Bytes>>,
    ) -> Result<http::Response<Incoming>> {
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            other => bail!("{uri}: the scheme must be http or https, not {other:?}"),
        };
        let host = uri.host().context("the URL has no host")?;
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tcp = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port)).await?;
        if !https {
            return send_over(tcp, request).await;
        }
        let config = crate::tls::client_config(self.ca_cert.as_deref())?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let name = ServerName::try_from(host.trim_matches(['[', ']']).to_string())
            .with_context(|| format!("{host} is not a name a certificate can carry"))?;
        let tls = connector
            .connect(name, tcp)
            .await
            .context("the TLS handshake failed (is the certificate valid for this name, and trusted? see --ca-cert)")?;
        send_over(tls, request).await
    }

    /// Like [`Target::send`] with a component (or no body), but a non-2xx
    /// answer is an error carrying the server's message.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<serde_json::Value> {
        self.call_with(method, path, body, "application/wasm").await
    }

    /// [`Target::call`] with a JSON body.
    pub async fn call_json(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<serde_json::Value> {
        self.call_with(method, path, body, "application/json").await
    }

    async fn call_with(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
        content_type: &'static str,
    ) -> Result<serde_json::Value> {
        let (status, body) = self.send(method, path, body, content_type).await?;
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&body).into_owned())
        });
        if !status.is_success() {
            let message = value
                .get("error")
                .and_then(|e| e.as_str())
                .map(str::to_string)
                .unwrap_or_else(|| value.to_string());
            bail!("{status}: {message}");
        }
        Ok(value)
    }
}

/// Sends `request` on a new HTTP/1.1 connection over `io`.
async fn send_over<I>(io: I, request: Request<Full<Bytes>>) -> Result<http::Response<Incoming>>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender.send_request(request).await?)
}

pub async fn deploy(target: &Target, name: &str, file: &Path) -> Result<String> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let value = target
        .call(Method::PUT, &format!("/v1/functions/{name}"), bytes)
        .await?;
    Ok(format!(
        "deployed {} version {} (sha256 {}, {} bytes)",
        value["name"].as_str().unwrap_or(name),
        value["version"],
        value["sha256"].as_str().unwrap_or("?"),
        value["size"]
    ))
}

/// Has the host pull `reference` from a registry and deploy it as `name`.
pub async fn deploy_oci(target: &Target, name: &str, reference: &str) -> Result<String> {
    let body = serde_json::to_vec(&serde_json::json!({ "oci": reference }))?;
    let value = target
        .call_json(Method::PUT, &format!("/v1/functions/{name}"), body)
        .await?;
    Ok(format!(
        "deployed {} version {} from {} (sha256 {}, manifest {}, {} bytes)",
        value["name"].as_str().unwrap_or(name),
        value["version"],
        reference,
        value["sha256"].as_str().unwrap_or("?"),
        value["oci"]["manifest_digest"].as_str().unwrap_or("?"),
        value["size"]
    ))
}

pub async fn list(target: &Target) -> Result<String> {
    let value = target
        .call(Method::GET, "/v1/functions", Vec::new())
        .await?;
    // Version ids are up to 16 digits (below 2^53).
    let mut out = format!(
        "{:<24} {:>16} {:>10}  {}\n",
        "NAME", "VERSION", "SIZE", "SHA256"
    );
    for f in value["functions"].as_array().into_iter().flatten() {
        // serde_json's Display ignores width; format the numbers themselves.
        out.push_str(&format!(
            "{:<24} {:>16} {:>10}  {}\n",
            f["name"].as_str().unwrap_or("?"),
            f["version"].as_u64().unwrap_or(0),
            f["size"].as_u64().unwrap_or(0),
            f["sha256"].as_str().unwrap_or("?"),
        ));
    }
    Ok(out.trim_end().to_string())
}

pub async fn secret_set(target: &Target, name: &str, value: Vec<u8>) -> Result<String> {
    let info = target
        .call_with(
            Method::PUT,
            &format!("/v1/secrets/{name}"),
            value,
            "text/plain",
        )
        .await?;
    Ok(format!(
        "set secret {} (digest {})",
        info["name"].as_str().unwrap_or(name),
        info["digest"].as_str().unwrap_or("?")
    ))
}

pub async fn secret_list(target: &Target) -> Result<String> {
    let value = target.call(Method::GET, "/v1/secrets", Vec::new()).await?;
    let mut out = format!("{:<24} {:<16} {}\n", "NAME", "DIGEST", "UPDATED (UNIX MS)");
    for secret in value["secrets"].as_array().into_iter().flatten() {
        let digest = secret["digest"].as_str().unwrap_or("?");
        out.push_str(&format!(
            "{:<24} {:<16} {}\n",
            secret["name"].as_str().unwrap_or("?"),
            digest.get(..16).unwrap_or(digest),
            secret["updated_unix_ms"].as_u64().unwrap_or(0),
        ));
    }
    Ok(out.trim_end().to_string())
}

pub async fn secret_remove(target: &Target, name: &str) -> Result<String> {
    target
        .call(Method::DELETE, &format!("/v1/secrets/{name}"), Vec::new())
        .await?;
    Ok(format!("removed secret {name}"))
}

/// Makes a token and answers it (the only time it is shown), with its
/// scopes on a second line.
pub async fn token_create(
    target: &Target,
    name: &str,
    scopes: &[String],
    expires_in: Option<String>,
) -> Result<String> {
    let mut request = serde_json::json!({ "name": name, "scopes": scopes });
    if let Some(expires_in) = expires_in {
        request["expires_in"] = serde_json::Value::String(expires_in);
    }
    let body = serde_json::to_vec(&request)?;
    let made = target
        .call_with(Method::POST, "/v1/tokens", body, "application/json")
        .await?;
    let token = made["token"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("the host answered no token: {made}"))?;
    Ok(format!(
        "{token}\n# {name}: {}; shown once, keep it now",
        scopes.join(" ")
    ))
}

pub async fn token_list(target: &Target) -> Result<String> {
    let value = target.call(Method::GET, "/v1/tokens", Vec::new()).await?;
    let mut out = format!(
        "{:<24} {:<15} {:<15} {:<15} {}\n",
        "NAME", "CREATED (MS)", "EXPIRES (MS)", "LAST USED (MS)", "SCOPES"
    );
    let ms = |v: &serde_json::Value| v.as_u64().map_or("-".to_string(), |n| n.to_string());
    for token in value["tokens"].as_array().into_iter().flatten() {
        let scopes: Vec<&str> = token["scopes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str())
            .collect();
        let expires = if token["expired"] == true {
            "expired".to_string()
        } else {
            ms(&token["expires_unix_ms"])
        };
        out.push_str(&format!(
            "{:<24} {:<15} {:<15} {:<15} {}\n",
            token["name"].as_str().unwrap_or("?"),
            ms(&token["created_unix_ms"]),
            expires,
            ms(&token["last_used_unix_ms"]),
            scopes.join(" "),
        ));
    }
    Ok(out.trim_end().to_string())
}

pub async fn token_revoke(target: &Target, name: &str) -> Result<String> {
    target
        .call(Method::DELETE, &format!("/v1/tokens/{name}"), Vec::new())
        .await?;
    Ok(format!("revoked token {name}"))
}

pub async fn remove(target: &Target, name: &str, purge_kv: bool) -> Result<String> {
    let query = if purge_kv { "?purge_kv=true" } else { "" };
    target
        .call(
            Method::DELETE,
            &format!("/v1/functions/{name}{query}"),
            Vec::new(),
        )
        .await?;
    Ok(if purge_kv {
        format!("removed {name} and its key-value data")
    } else {
        format!("removed {name}")
    })
}

/// Makes an earlier version of `name` active again: `version`, or the one
/// before the active version.
pub async fn rollback(target: &Target, name: &str, version: Option<u64>) -> Result<String> {
    let body = match version {
        Some(version) => serde_json::to_vec(&serde_json::json!({ "version": version }))?,
        None => Vec::new(),
    };
    let value = target
        .call(
            Method::POST,
            &format!("/v1/functions/{name}/rollback"),
            body,
        )
        .await?;
    Ok(format!(
        "{} is at version {} (sha256 {})",
        value["name"].as_str().unwrap_or(name),
        value["version"],
        value["sha256"].as_str().unwrap_or("?"),
    ))
}

pub async fn map(target: &Target, name: &str, file: &Path, path: &str) -> Result<String> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let route = match path {
        "/" => format!("/v1/functions/{name}/map"),
        path => format!("/v1/functions/{name}/map?path={path}"),
    };
    let value = target.call_json(Method::POST, &route, bytes).await?;
    Ok(serde_json::to_string_pretty(&value)?)
}
