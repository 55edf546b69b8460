//! The command-line client: `lichen deploy`, `ls`, `rm` and `map` talk to
//! a host's admin API. Errors print the server's own message.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::server::ADMIN_TOKEN_FILE;

/// Where and how to reach a host.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: String,
    pub token: String,
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
        })
    }

    /// Sends one admin request; returns the status and the body.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes)> {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let uri = format!("{}{path}", self.url);
        let request = Request::builder()
            .method(method)
            .uri(&uri)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token))
            .header(header::CONTENT_TYPE, "application/wasm")
            .body(Full::new(Bytes::from(body)))
            .with_context(|| format!("building a request to {uri}"))?;
        let response = client
            .request(request)
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

    /// Like [`Target::send`], but a non-2xx answer is an error carrying the
    /// server's message.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<serde_json::Value> {
        let (status, body) = self.send(method, path, body).await?;
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

pub async fn list(target: &Target) -> Result<String> {
    let value = target
        .call(Method::GET, "/v1/functions", Vec::new())
        .await?;
    let mut out = format!(
        "{:<24} {:>7} {:>10}  {}\n",
        "NAME", "VERSION", "SIZE", "SHA256"
    );
    for f in value["functions"].as_array().into_iter().flatten() {
        // serde_json's Display ignores width; format the numbers themselves.
        out.push_str(&format!(
            "{:<24} {:>7} {:>10}  {}\n",
            f["name"].as_str().unwrap_or("?"),
            f["version"].as_u64().unwrap_or(0),
            f["size"].as_u64().unwrap_or(0),
            f["sha256"].as_str().unwrap_or("?"),
        ));
    }
    Ok(out.trim_end().to_string())
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

pub async fn map(target: &Target, name: &str, file: &Path) -> Result<String> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let value = target
        .call(Method::POST, &format!("/v1/functions/{name}/map"), bytes)
        .await?;
    Ok(serde_json::to_string_pretty(&value)?)
}
