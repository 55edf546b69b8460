//! `lichen cluster ca` and `lichen cluster cert`: a private CA for a
//! cluster and the certificates its hosts serve and present to each other
//! under mutual TLS (`--peer-mtls`), made with rcgen.
//!
//! A host's certificate names the addresses peers and clients reach it by
//! (IP addresses or DNS names), is good for both sides of a TLS connection
//! (server and client authentication), and its file holds the CA after the
//! host's own certificate, so a host given it trusts its peers without
//! `--peer-ca`. Keys are ECDSA P-256, written readable by their owner only;
//! nothing is overwritten.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// The CA's files in its directory.
pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";

/// What one command wrote.
#[derive(Debug)]
pub struct Written {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Makes a CA in `dir` (created if missing): `ca.crt` and `ca.key`, good
/// for `days` days, named `name`.
pub fn make_ca(dir: &Path, name: &str, days: u32) -> Result<Written> {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, days)?;
    let key = KeyPair::generate().context("making the CA's key")?;
    let cert = params
        .self_signed(&key)
        .context("signing the CA certificate")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let written = Written {
        cert: dir.join(CA_CERT),
        key: dir.join(CA_KEY),
    };
    absent(&written)?;
    write_pair(
        &written,
        key.serialize_pem().as_bytes(),
        cert.pem().as_bytes(),
    )?;
    Ok(written)
}

/// Makes host `name`'s certificate under the CA in `ca_dir`, for
/// `addresses` (IP addresses and DNS names), good for `days` days:
/// `NAME.crt` (the host's certificate, then the CA's) and `NAME.key` in
/// `out`.
pub fn make_cert(
    ca_dir: &Path,
    name: &str,
    addresses: &[String],
    out: &Path,
    days: u32,
) -> Result<Written> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        || name.starts_with('.')
    {
        bail!("the host's name {name:?} must be letters, digits, '-', '_' and '.'");
    }
    if addresses.is_empty() {
        bail!("give at least one --address peers reach the host by (an IP or a DNS name)");
    }
    let ca_cert = read(&ca_dir.join(CA_CERT))?;
    let ca_key = read(&ca_dir.join(CA_KEY))?;
    let ca_key = KeyPair::from_pem(&ca_key)
        .with_context(|| format!("reading the CA key in {}", ca_dir.display()))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_cert, ca_key)
        .with_context(|| format!("reading the CA certificate in {}", ca_dir.display()))?;

    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    for address in addresses {
        let bare = address.trim_start_matches('[').trim_end_matches(']');
        let san = match bare.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => {
                if rustls::pki_types::DnsName::try_from(address.as_str()).is_err() {
                    bail!(
                        "--address {address:?} is no IP address or DNS name (no port, no scheme)"
                    );
                }
                SanType::DnsName(
                    address
                        .as_str()
                        .try_into()
                        .with_context(|| format!("--address {address:?}"))?,
                )
            }
        };
        params.subject_alt_names.push(san);
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, days)?;
    let key = KeyPair::generate().context("making the host's key")?;
    let cert = params
        .signed_by(&key, &issuer)
        .context("signing the host's certificate")?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let written = Written {
        cert: out.join(format!("{name}.crt")),
        key: out.join(format!("{name}.key")),
    };
    absent(&written)?;
    let chain = format!("{}{}", cert.pem(), ca_cert);
    write_pair(&written, key.serialize_pem().as_bytes(), chain.as_bytes())?;
    Ok(written)
}

/// The longest validity, in days (a hundred years).
const MAX_DAYS: u32 = 36_500;

/// From an hour ago (clocks differ) to `days` days from now.
fn validity(params: &mut CertificateParams, days: u32) -> Result<()> {
    if days == 0 || days > MAX_DAYS {
        bail!("--days must be from 1 to {MAX_DAYS}");
    }
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
    Ok(())
}

/// Refuses before anything is written when either file exists.
fn absent(written: &Written) -> Result<()> {
    for path in [&written.cert, &written.key] {
        if path.exists() {
            bail!("{} exists already; nothing was written", path.display());
        }
    }
    Ok(())
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Writes the key, then the certificate; on a failure neither is left.
fn write_pair(written: &Written, key: &[u8], cert: &[u8]) -> Result<()> {
    write_new(&written.key, key, true)?;
    if let Err(error) = write_new(&written.cert, cert, false) {
        let _ = std::fs::remove_file(&written.key);
        return Err(error);
    }
    Ok(())
}

/// Writes a file that must not exist yet (a key readable by its owner
/// only); a file written in part is removed.
fn write_new(path: &Path, bytes: &[u8], secret: bool) -> Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            anyhow::anyhow!("{} exists already; nothing was overwritten", path.display())
        } else {
            anyhow::anyhow!("writing {}: {e}", path.display())
        }
    })?;
    let written = file.write_all(bytes).and_then(|()| file.sync_all());
    if let Err(error) = written {
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(anyhow::anyhow!("writing {}: {error}", path.display()));
    }
    Ok(())
}
