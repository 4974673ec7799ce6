//! rustls configurations for the SMTP server and client, always with the *ring* provider
//! (never a process-wide default provider), TLS 1.2 and 1.3.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::proto::server::TlsInfo;

/// A TLS configuration could not be built from the given PEM.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// The certificate chain PEM held no certificate or did not parse.
    #[error("the certificate chain PEM is unusable: {0}")]
    Certificates(String),
    /// The private key PEM held no key or did not parse.
    #[error("the private key PEM is unusable: {0}")]
    PrivateKey(String),
    /// The trusted root PEM held no certificate, or one was rejected.
    #[error("the trusted CA PEM is unusable: {0}")]
    Roots(String),
    /// rustls refused the combination (e.g. the key does not match the certificate).
    #[error("TLS configuration refused: {0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs =
        CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>().map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("no CERTIFICATE block found".into());
    }
    Ok(certs)
}

/// A server configuration presenting `cert_chain_pem` (leaf first) with `key_pem`.
pub fn server_config(cert_chain_pem: &[u8], key_pem: &[u8]) -> Result<Arc<ServerConfig>, TlsSetupError> {
    let certs = certificates(cert_chain_pem).map_err(TlsSetupError::Certificates)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsSetupError::PrivateKey(e.to_string()))?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(Arc::new(config))
}

/// A client configuration trusting the CA certificates in `roots_pem`.
pub fn client_config(roots_pem: &[u8]) -> Result<Arc<ClientConfig>, TlsSetupError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(roots_pem).map_err(TlsSetupError::Roots)? {
        roots.add(cert).map_err(|e| TlsSetupError::Roots(e.to_string()))?;
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The negotiated version and cipher suite of a connection, with IANA names.
pub(crate) fn tls_info(conn: &rustls::CommonState) -> TlsInfo {
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_owned(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_owned(),
        Some(other) => format!("{other:?}"),
        None => "unknown".to_owned(),
    };
    let cipher = conn
        .negotiated_cipher_suite()
        .map(|s| {
            let name = format!("{:?}", s.suite());
            // rustls spells TLS 1.3 suites TLS13_*; the IANA registry name is TLS_*.
            name.strip_prefix("TLS13_").map(|rest| format!("TLS_{rest}")).unwrap_or(name)
        })
        .unwrap_or_else(|| "unknown".to_owned());
    TlsInfo { version, cipher }
}
