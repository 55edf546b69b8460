//! TLS for clients (`--tls-cert`, `--tls-key`): rustls with the ring
//! provider, HTTP/2 and HTTP/1.1 offered over ALPN. Also the settings this
//! host uses as a TLS client ([`client_config`], [`peer_client_config`]).
//!
//! Mutual TLS between peers (`--peer-mtls`): the listener asks every
//! connection for a certificate signed by the cluster's CA and checks the
//! one it gets with rustls' client verifier; clients may present none
//! (browsers, curl), and a connection that did not present one is marked
//! so that peer routes refuse it ([`PeerCertified`]). As a client of its
//! peers this host presents its own pair, the one in force after the
//! latest reload.
//!
//! The certificate and key are PEM files, read at start (a pair that does
//! not load stops the host from starting) and again on SIGHUP or when either
//! file changes on disk. A new pair that does not load, or whose key does
//! not match its certificate, is logged and the old one stays in service:
//! a bad rotation never leaves a dead listener. Each connection takes the
//! pair current at its handshake and keeps it, so a rotation never drops a
//! request in flight.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use notify::{RecursiveMode, Watcher};
use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig, SignatureScheme};
use tokio_rustls::TlsAcceptor;

/// Where the certificate chain and its key are.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The default pair: for a client that names no domain of `dir`.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// `--tls-dir`: a `NAME.crt` and `NAME.key` per domain (`NAME` may be
    /// `*.example.com`), chosen by the name the client asks for (SNI).
    pub dir: Option<PathBuf>,
    /// `--tls-strict-sni`: a client asking for a name `dir` has no pair
    /// for gets a failed handshake, not the default pair.
    pub strict_sni: bool,
    /// `--peer-mtls`: the CA certificates (`--peer-ca`) whose
    /// certificates peers must present: a CA of the cluster's own, never
    /// one that signs for others too.
    pub peers: Option<PathBuf>,
}

/// Marks a request that came over a connection whose client presented a
/// certificate the peer CA signed (checked in the handshake).
#[derive(Debug, Clone, Copy)]
pub struct PeerCertified;

impl TlsFiles {
    /// The default pair alone.
    pub fn pair(cert: PathBuf, key: PathBuf) -> TlsFiles {
        TlsFiles {
            cert,
            key,
            dir: None,
            strict_sni: false,
            peers: None,
        }
    }
}

/// The server's TLS settings in force, replaced whole on a good reload.
pub struct Tls {
    files: TlsFiles,
    current: RwLock<Current>,
    /// `lichen_tls_reloads_total`, by outcome.
    reloads: prometheus::IntCounterVec,
}

impl Tls {
    /// Loads the pair; an error here stops the host from starting. Later
    /// reloads are counted in `reloads` by outcome.
    pub fn load(files: TlsFiles, reloads: prometheus::IntCounterVec) -> Result<Arc<Tls>> {
        let current = Current::load(&files)?;
        Ok(Arc::new(Tls {
            files,
            current: RwLock::new(current),
            reloads,
        }))
    }

    /// The files this was loaded from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// Whether peers must present a certificate (`--peer-mtls`).
    pub fn mutual(&self) -> bool {
        self.files.peers.is_some()
    }

    /// An acceptor with the pair in force now.
    pub fn acceptor(&self) -> TlsAcceptor {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        TlsAcceptor::from(Arc::clone(&current.config))
    }

    /// The settings for talking to peers: their certificates checked as
    /// [`peer_client_config`] does, and this host's pair in force
    /// presented when a peer asks for one.
    pub fn peer_client_config(
        self: &Arc<Self>,
        peer_ca: Option<&Path>,
    ) -> Result<rustls::ClientConfig> {
        let roots = peer_roots(peer_ca, Some(&self.files))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Ok(rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_cert_resolver(Arc::new(OwnPair(Arc::clone(self)))))
    }

    /// Reads the files again; keeps the pair in force if the new one does
    /// not load.
    pub fn reload(&self) -> bool {
        match Current::load(&self.files) {
            Ok(current) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = current;
                self.reloads.with_label_values(&["ok"]).inc();
                tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
                true
            }
            Err(error) => {
                self.reloads.with_label_values(&["error"]).inc();
                tracing::error!(
                    cert = %self.files.cert.display(),
                    key = %self.files.key.display(),
                    error = format!("{error:#}"),
                    "the new TLS certificate or key does not load; still serving the previous one"
                );
                false
            }
        }
    }

    /// Reloads on SIGHUP and when either file changes. The returned watcher
    /// must be kept alive.
    pub fn watch(self: &Arc<Self>) -> Result<notify::RecommendedWatcher> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let files_changed = tx.clone();
        let names: Vec<PathBuf> = [&self.files.cert, &self.files.key]
            .into_iter()
            .chain(self.files.peers.as_ref())
            .filter_map(|p| p.file_name().map(PathBuf::from))
            .collect();
        let domains = self.files.dir.clone();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let Ok(event) = event else { return };
                let ours = event.paths.iter().any(|p| {
                    p.file_name().is_some_and(|n| names.iter().any(|m| m == n))
                        || domains
                            .as_ref()
                            .is_some_and(|d| p.parent() == Some(d.as_path()))
                });
                if ours && !matches!(event.kind, notify::EventKind::Access(_)) {
                    let _ = files_changed.send(());
                }
            })?;
        // Watch the directories: certificate tools replace files by
        // renaming, which a watch on the file itself would lose.
        let dirs = [parent(&self.files.cert), parent(&self.files.key)]
            .into_iter()
            .chain(self.files.peers.as_deref().map(parent))
            .chain(self.files.dir.clone());
        for dir in dirs {
            watcher
                .watch(&dir, RecursiveMode::NonRecursive)
                .with_context(|| format!("watching {}", dir.display()))?;
        }
        #[cfg(unix)]
        {
            let mut hangups =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
            tokio::spawn(async move {
                while hangups.recv().await.is_some() {
                    if tx.send(()).is_err() {
                        return;
                    }
                }
            });
        }
        let tls = Arc::downgrade(self);
        tokio::spawn(async move {
            while rx.recv().await.is_some() {
                // A rotation writes two files: let both land, then read once.
                tokio::time::sleep(Duration::from_millis(100)).await;
                while rx.try_recv().is_ok() {}
                let Some(tls) = tls.upgrade() else { return };
                tls.reload();
            }
        });
        Ok(watcher)
    }
}

fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The certificates in a PEM file; none is an error.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading {}", path.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing {}", path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no certificate", path.display());
    }
    Ok(certs)
}

/// Settings for connecting to servers over TLS (the CLI client, guests'
/// outbound HTTPS): the public roots, and the CA in `ca` (PEM) if given.
pub fn client_config(ca: Option<&Path>) -> Result<rustls::ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca {
        add_roots(&mut roots, read_certs(path)?, path)?;
    }
    client_with(roots)
}

/// Settings for talking to peers over HTTPS: their certificates are
/// checked against the CA certificates in `peer_ca`, else against the chain
/// of this host's own certificate (the certificates after its first, or the
/// first alone when it is self-signed), so hosts whose certificates one CA
/// signed trust each other without another flag. Without either, the public
/// roots (a peer that serves TLS then needs a publicly trusted certificate).
/// A host that serves TLS uses [`Tls::peer_client_config`], which also
/// presents its certificate.
pub fn peer_client_config(
    peer_ca: Option<&Path>,
    own: Option<&TlsFiles>,
) -> Result<rustls::ClientConfig> {
    if peer_ca.is_none() && own.is_none() {
        return client_config(None);
    }
    client_with(peer_roots(peer_ca, own)?)
}

/// The CA certificates peers' certificates are checked against: those in
/// `peer_ca`, else the chain of `own` (see [`peer_client_config`]); empty
/// without either.
fn peer_roots(peer_ca: Option<&Path>, own: Option<&TlsFiles>) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    let path = match (peer_ca, own) {
        (Some(ca), _) => ca,
        (None, Some(own)) => own.cert.as_path(),
        (None, None) => return Ok(roots),
    };
    let mut trusted = read_certs(path)?;
    if peer_ca.is_none() && trusted.len() > 1 {
        trusted.remove(0);
    }
    add_roots(&mut roots, trusted, path)?;
    Ok(roots)
}

/// Adds the certificates read from `path` to `roots`.
fn add_roots(
    roots: &mut RootCertStore,
    certs: Vec<CertificateDer<'static>>,
    path: &Path,
) -> Result<()> {
    for cert in certs {
        roots
            .add(cert)
            .with_context(|| format!("a certificate in {}", path.display()))?;
    }
    Ok(())
}

/// Client settings (ring, the safe protocol versions) trusting `roots`.
fn client_with(roots: RootCertStore) -> Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// What one load of the files gave: the server's settings, and the
/// default pair, which is also what this host presents to its peers.
struct Current {
    config: Arc<ServerConfig>,
    own: Arc<CertifiedKey>,
}

impl Current {
    fn load(files: &TlsFiles) -> Result<Current> {
        let own = certified_key(&files.cert, &files.key)?;
        let config = server_config(files, Arc::clone(&own))?;
        Ok(Current {
            config: Arc::new(config),
            own,
        })
    }
}

/// Presents this host's pair in force to a peer that asks for one.
#[derive(Debug)]
struct OwnPair(Arc<Tls>);

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ResolvesClientCert for OwnPair {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        schemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        let current = self.0.current.read().unwrap_or_else(|e| e.into_inner());
        current
            .own
            .key
            .choose_scheme(schemes)
            .is_some()
            .then(|| Arc::clone(&current.own))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The rustls settings for the default pair `default` and the domains'
/// pairs; under `--peer-mtls` clients are asked for a certificate of the
/// peer CA (none is accepted, a bad one fails the handshake).
fn server_config(files: &TlsFiles, default: Arc<CertifiedKey>) -> Result<ServerConfig> {
    let mut by_name = HashMap::new();
    if let Some(dir) = &files.dir {
        let entries =
            std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".crt"))
            else {
                continue;
            };
            let name = name.to_ascii_lowercase();
            let key = dir.join(format!("{name}.key"));
            let pair = certified_key(&path, &key)
                .with_context(|| format!("the pair for {name:?} in {}", dir.display()))?;
            by_name.insert(name, pair);
        }
    }
    let resolver = ByName {
        by_name,
        default: (!files.strict_sni || files.dir.is_none()).then_some(Arc::clone(&default)),
        fallback: default,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?;
    let builder = match &files.peers {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let roots = peer_roots(Some(ca), Some(files))?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .context("the peer CA for --peer-mtls")?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// A certificate chain and its key, checked to go together.
fn certified_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>> {
    let certs = read_certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading the private key in {}", key.display()))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| anyhow::anyhow!("the key in {}: {e}", cert.display()))?;
    let certified = CertifiedKey::new(certs, signing);
    certified.keys_match().map_err(|e| {
        anyhow::anyhow!(
            "the key does not go with the certificate {}: {e}",
            cert.display()
        )
    })?;
    Ok(Arc::new(certified))
}

/// Picks the pair by the name the client asks for: the name's own, then
/// its parent's wildcard (`*.example.com` for `shop.example.com`), then the
/// default (none with `--tls-strict-sni`: the handshake fails).
#[derive(Debug)]
struct ByName {
    by_name: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
    /// For a client that names nothing (an IP address, old clients).
    fallback: Arc<CertifiedKey>,
}

impl ResolvesServerCert for ByName {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = hello.server_name() else {
            return Some(Arc::clone(&self.fallback));
        };
        let name = name.to_ascii_lowercase();
        if let Some(pair) = self.by_name.get(&name) {
            return Some(Arc::clone(pair));
        }
        let wildcard = name
            .split_once('.')
            .map(|(_, parent)| format!("*.{parent}"));
        if let Some(pair) = wildcard.and_then(|w| self.by_name.get(&w)) {
            return Some(Arc::clone(pair));
        }
        self.default.clone()
    }
}

/// Makes ring the process's rustls provider, for libraries that take the
/// process default (the OCI client's reqwest). Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
