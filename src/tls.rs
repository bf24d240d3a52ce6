//! TLS with rustls (ring provider): the client listener's server side, and connections to
//! shards that speak TLS.
//!
//! A leaf: it names no other module of the crate (`config` embeds [`TlsConfig`] and uses
//! these loaders to validate the files before any port is bound).
//!
//! Owns loading PEM files into rustls configs. Certificates are read once at start-up; a
//! bad path or file stops start-up with a message naming the key.

use serde::Deserialize;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// `[tls]`: the client listener's certificate (see docs/configuration.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain presented to clients.
    pub cert_file: PathBuf,
    /// PEM private key of that certificate.
    pub key_file: PathBuf,
    /// When set, clients must present a certificate chaining to this CA (mutual TLS).
    pub client_ca_file: Option<PathBuf>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let file = std::fs::File::open(path)
        .map_err(|e| format!("{what}: cannot open {}: {e}", path.display()))?;
    let certs: Result<Vec<_>, _> =
        rustls_pemfile::certs(&mut std::io::BufReader::new(file)).collect();
    let certs = certs.map_err(|e| format!("{what}: {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{what}: no certificate in {}", path.display()));
    }
    Ok(certs)
}

fn key(path: &Path, what: &str) -> Result<PrivateKeyDer<'static>, String> {
    let file = std::fs::File::open(path)
        .map_err(|e| format!("{what}: cannot open {}: {e}", path.display()))?;
    rustls_pemfile::private_key(&mut std::io::BufReader::new(file))
        .map_err(|e| format!("{what}: {}: {e}", path.display()))?
        .ok_or_else(|| format!("{what}: no private key in {}", path.display()))
}

fn roots(path: &Path, what: &str) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(path, what)? {
        roots.add(c).map_err(|e| format!("{what}: {e}"))?;
    }
    Ok(roots)
}

/// The client listener's TLS: our certificate, and client certificates required when a
/// client CA is configured.
pub fn acceptor(cfg: &TlsConfig) -> Result<tokio_rustls::TlsAcceptor, String> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match &cfg.client_ca_file {
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(ca, "tls.client_ca_file")?),
                provider(),
            )
            .build()
            .map_err(|e| format!("tls.client_ca_file: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(
            certs(&cfg.cert_file, "tls.cert_file")?,
            key(&cfg.key_file, "tls.key_file")?,
        )
        .map_err(|e| format!("tls: {e}"))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// A connector for shards whose certificates chain to the CA in `ca_file`.
pub fn connector(ca_file: &Path) -> Result<tokio_rustls::TlsConnector, String> {
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots(ca_file, "backend.tls_ca_file")?)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// The name a shard's certificate must carry: as configured, else its IP address.
pub fn server_name(
    name: Option<&str>,
    addr: std::net::SocketAddr,
) -> Result<ServerName<'static>, String> {
    match name {
        Some(n) => {
            ServerName::try_from(n.to_string()).map_err(|e| format!("tls_server_name {n:?}: {e}"))
        }
        None => Ok(ServerName::IpAddress(addr.ip().into())),
    }
}
