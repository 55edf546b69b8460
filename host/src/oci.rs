//! Components from OCI registries: `PUT /v1/functions/{name}` with
//! `{"oci": "registry/repo:tag@sha256:..."}` pulls the component, which then
//! goes through the same validation, compile and store as an upload.
//!
//! What is accepted is a WebAssembly artifact: the CNCF layout (config
//! `application/vnd.wasm.config.v0+json`, exactly one `application/wasm`
//! layer, as `wkg` and `wash` push) or the older single
//! `application/vnd.wasm.content.layer.v1+wasm` layer. A container image, a
//! multi-layer Spin application or an image index is refused saying what it
//! is. Only registries the operator allows are contacted (`--allow-registry`;
//! none by default), so the admin API cannot be made to fetch arbitrary
//! URLs. The layer's size is checked against the upload cap before it is
//! pulled, and its digest (and the manifest's, when the reference pins one)
//! is verified: the layer's SHA-256 is the module's hash, what peers share it
//! by.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use futures::StreamExt;
use http::StatusCode;
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::{OciDescriptor, OciManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::{Deserialize, Serialize};

use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// The config of a CNCF wasm artifact.
pub const WASM_CONFIG: &str = "application/vnd.wasm.config.v0+json";
/// Its one layer.
pub const WASM_LAYER: &str = "application/wasm";
/// The single layer of the older wasm-to-oci layout.
pub const WASM_LAYER_V1: &str = "application/vnd.wasm.content.layer.v1+wasm";

/// How this host may use registries.
#[derive(Debug, Clone, Default)]
pub struct RegistryConfig {
    /// `HOST[:PORT]` of each registry deploys may pull from; empty: none.
    pub allowed: Vec<String>,
    /// `HOST:PORT` of registries spoken to over plain HTTP.
    pub insecure: Vec<String>,
    /// Refuse references without a digest.
    pub require_digest: bool,
    /// A Docker `config.json` with credentials per registry.
    pub auth_file: Option<PathBuf>,
    /// A CA certificate (PEM) to trust for registries beside the public
    /// roots.
    pub ca_cert: Option<PathBuf>,
}

/// Where a version came from, when it came from a registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OciSource {
    /// The reference as given.
    pub reference: String,
    /// The digest of the manifest pulled.
    pub manifest_digest: String,
    /// The digest of the component layer: `sha256:` and the module's hash.
    pub layer_digest: String,
}

/// A component pulled from a registry.
pub struct Pulled {
    pub bytes: Vec<u8>,
    pub source: OciSource,
}

/// The registry client of a host.
pub struct Registries {
    config: RegistryConfig,
    client: Client,
    /// Credentials by registry (`HOST[:PORT]`), from the auth file.
    credentials: HashMap<String, (String, String)>,
}

impl Registries {
    pub fn new(config: RegistryConfig) -> anyhow::Result<Registries> {
        crate::tls::install_crypto_provider();
        let mut extra_root_certificates = Vec::new();
        if let Some(ca) = &config.ca_cert {
            let pem = std::fs::read(ca)
                .map_err(|e| anyhow::anyhow!("reading the registry CA {}: {e}", ca.display()))?;
            extra_root_certificates.push(Certificate {
                encoding: CertificateEncoding::Pem,
                data: pem,
            });
        }
        let protocol = if config.insecure.is_empty() {
            ClientProtocol::Https
        } else {
            ClientProtocol::HttpsExcept(config.insecure.clone())
        };
        // `Client::new` would fall back to a default client (no CA, HTTPS
        // only) on an error; the error is what an operator needs instead.
        let client = Client::try_from(ClientConfig {
            protocol,
            extra_root_certificates,
            // An index is refused, not resolved to this machine's platform:
            // a component is one artifact for every platform.
            platform_resolver: None,
            connect_timeout: Some(std::time::Duration::from_secs(10)),
            read_timeout: Some(std::time::Duration::from_secs(30)),
            ..ClientConfig::default()
        })
        .map_err(|e| anyhow::anyhow!("the registry client: {e}"))?;
        let credentials = match &config.auth_file {
            Some(file) => read_docker_config(file)?,
            None => HashMap::new(),
        };
        Ok(Registries {
            config,
            client,
            credentials,
        })
    }

    /// Pulls the component `reference` names, at most `max_bytes` of it.
    pub async fn pull(&self, reference: &str, max_bytes: u64) -> Result<Pulled, ApiError> {
        let parsed: Reference = reference.parse().map_err(|e| {
            ApiError::bad_request(
                "invalid_reference",
                format!("{reference:?} is not an OCI reference: {e}"),
            )
        })?;
        let registry = parsed.registry().to_string();
        if !self.config.allowed.contains(&registry) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "registry_not_allowed",
                if self.config.allowed.is_empty() {
                    format!(
                        "deploys from OCI registries are off on this host; start it with --allow-registry {registry} to pull from {registry}"
                    )
                } else {
                    format!(
                        "{registry} is not an allowed registry (this host pulls from: {})",
                        self.config.allowed.join(", ")
                    )
                },
            ));
        }
        if self.config.require_digest && parsed.digest().is_none() {
            return Err(ApiError::bad_request(
                "digest_required",
                format!(
                    "{reference} has no digest, and this host deploys only pinned references (REF@sha256:...)"
                ),
            ));
        }
        let auth = match self.credentials.get(&registry) {
            Some((user, password)) => RegistryAuth::Basic(user.clone(), password.clone()),
            None => RegistryAuth::Anonymous,
        };
        let (manifest, manifest_digest) = self
            .client
            .pull_manifest(&parsed, &auth)
            .await
            .map_err(|e| registry_error(reference, e))?;
        if let Some(pinned) = parsed.digest()
            && pinned != manifest_digest
        {
            return Err(ApiError::unprocessable(
                "digest_mismatch",
                format!(
                    "{reference}: the registry served a manifest with digest {manifest_digest}"
                ),
            ));
        }
        let layer = wasm_layer(&manifest).map_err(|what| {
            ApiError::unprocessable(
                "not_a_component_artifact",
                format!("{reference} is {what}, not a WebAssembly component artifact (config {WASM_CONFIG} with one {WASM_LAYER} layer, or one {WASM_LAYER_V1} layer)"),
            )
        })?;
        let size = u64::try_from(layer.size).unwrap_or(u64::MAX);
        if size > max_bytes {
            return Err(ApiError::too_large(format!(
                "{reference}: the component layer is {size} bytes; this host takes at most {max_bytes}"
            )));
        }
        let Some(expected) = layer.digest.strip_prefix("sha256:") else {
            return Err(ApiError::unprocessable(
                "digest_mismatch",
                format!(
                    "{reference}: the layer's digest {} is not SHA-256",
                    layer.digest
                ),
            ));
        };
        let mut stream = self
            .client
            .pull_blob_stream(&parsed, &layer)
            .await
            .map_err(|e| registry_error(reference, e))?;
        let mut bytes = Vec::with_capacity(size as usize);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "registry_error",
                    format!("{reference}: pulling the layer failed: {e}"),
                )
            })?;
            bytes.extend_from_slice(&chunk);
            if bytes.len() as u64 > size.min(max_bytes) {
                return Err(ApiError::unprocessable(
                    "digest_mismatch",
                    format!("{reference}: the registry sent more than the layer's {size} bytes"),
                ));
            }
        }
        // The store hashes modules the same way; computed here so the
        // store (which records where a version came from) need not know us.
        let actual = hex::encode(Sha256::digest(&bytes));
        if actual != expected {
            return Err(ApiError::unprocessable(
                "digest_mismatch",
                format!(
                    "{reference}: the layer's bytes hash to sha256:{actual}, not {}",
                    layer.digest
                ),
            ));
        }
        Ok(Pulled {
            bytes,
            source: OciSource {
                reference: reference.to_string(),
                manifest_digest,
                layer_digest: layer.digest.clone(),
            },
        })
    }
}

/// The component layer of an artifact manifest, or what the manifest is
/// instead.
fn wasm_layer(manifest: &OciManifest) -> Result<OciDescriptor, String> {
    let image = match manifest {
        OciManifest::Image(image) => image,
        OciManifest::ImageIndex(index) => {
            return Err(format!(
                "an image index ({} manifests, one per platform)",
                index.manifests.len()
            ));
        }
    };
    let types: Vec<&str> = image.layers.iter().map(|l| l.media_type.as_str()).collect();
    match types.as_slice() {
        [WASM_LAYER] if image.config.media_type == WASM_CONFIG => Ok(image.layers[0].clone()),
        [WASM_LAYER_V1] => Ok(image.layers[0].clone()),
        [WASM_LAYER] => Err(format!(
            "an artifact with a {WASM_LAYER} layer but config {}",
            image.config.media_type
        )),
        layers
            if layers.iter().any(|t| t.contains("spin"))
                || image.config.media_type.contains("spin") =>
        {
            Err(format!(
                "a Spin application ({} layers: {})",
                layers.len(),
                layers.join(", ")
            ))
        }
        layers
            if layers
                .iter()
                .any(|t| t.contains("image.layer") || t.contains("rootfs")) =>
        {
            Err(format!(
                "a container image ({} layers: {})",
                layers.len(),
                layers.join(", ")
            ))
        }
        layers => Err(format!(
            "an artifact with config {} and {} layers ({})",
            image.config.media_type,
            layers.len(),
            layers.join(", ")
        )),
    }
}

/// What a registry's refusal means for the deploy.
fn registry_error(reference: &str, error: OciDistributionError) -> ApiError {
    let message = format!("{reference}: {error}");
    match error {
        OciDistributionError::ImageManifestNotFoundError(_) => {
            ApiError::new(StatusCode::NOT_FOUND, "oci_not_found", message)
        }
        OciDistributionError::AuthenticationFailure(_)
        | OciDistributionError::UnauthorizedError { .. } => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "registry_unauthorized",
            format!("{message} (credentials come from --registry-auth)"),
        ),
        OciDistributionError::RegistryError { ref envelope, .. }
            if envelope.errors.iter().any(|e| {
                matches!(
                    e.code,
                    oci_client::errors::OciErrorCode::ManifestUnknown
                        | oci_client::errors::OciErrorCode::NameUnknown
                )
            }) =>
        {
            ApiError::new(StatusCode::NOT_FOUND, "oci_not_found", message)
        }
        _ => ApiError::new(StatusCode::BAD_GATEWAY, "registry_error", message),
    }
}

/// Credentials per registry from a Docker `config.json`: `auths` entries
/// with `auth` (base64 of `user:password`) or `username` and `password`.
fn read_docker_config(file: &Path) -> anyhow::Result<HashMap<String, (String, String)>> {
    #[derive(Deserialize)]
    struct DockerConfig {
        #[serde(default)]
        auths: HashMap<String, AuthEntry>,
    }
    #[derive(Deserialize)]
    struct AuthEntry {
        auth: Option<String>,
        username: Option<String>,
        password: Option<String>,
    }
    let shown = file.display();
    let text =
        std::fs::read_to_string(file).map_err(|e| anyhow::anyhow!("reading {shown}: {e}"))?;
    let config: DockerConfig =
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{shown}: {e}"))?;
    let mut credentials = HashMap::new();
    for (registry, entry) in config.auths {
        // Docker writes `https://index.docker.io/v1/` style keys too.
        let host = registry
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let pair = match (entry.auth, entry.username, entry.password) {
            (Some(auth), _, _) => {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(auth.trim())
                    .map_err(|e| anyhow::anyhow!("{shown}: auths.{registry}.auth: {e}"))?;
                let decoded = String::from_utf8(decoded)
                    .map_err(|_| anyhow::anyhow!("{shown}: auths.{registry}.auth is not UTF-8"))?;
                let (user, password) = decoded.split_once(':').ok_or_else(|| {
                    anyhow::anyhow!("{shown}: auths.{registry}.auth is not base64 of user:password")
                })?;
                (user.to_string(), password.to_string())
            }
            (None, Some(user), Some(password)) => (user, password),
            _ => anyhow::bail!(
                "{shown}: auths.{registry} has neither auth nor username and password"
            ),
        };
        credentials.insert(host, pair);
    }
    Ok(credentials)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_config_credentials_are_read_per_registry() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
        std::fs::write(
            &file,
            format!(
                r#"{{"auths": {{"127.0.0.1:5000": {{"auth": "{auth}"}}, "https://reg.example/v1/": {{"username": "bob", "password": "pw"}}}}}}"#
            ),
        )
        .unwrap();
        let credentials = read_docker_config(&file).unwrap();
        assert_eq!(
            credentials["127.0.0.1:5000"],
            ("alice".to_string(), "s3cret".to_string())
        );
        assert_eq!(
            credentials["reg.example"],
            ("bob".to_string(), "pw".to_string())
        );
        std::fs::write(&file, r#"{"auths": {"x": {}}}"#).unwrap();
        assert!(read_docker_config(&file).is_err());
    }
}
