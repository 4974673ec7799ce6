//! PEM loading and the rustls pieces shared by the client and the server.
//!
//! Every TLS object here uses rustls' *ring* provider explicitly (never a process-wide default),
//! with TLS 1.2 and 1.3 (ETSI GS QKD 014 clause 4.2 asks for TLS 1.2 or later).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use zeroize::Zeroizing;

/// The certificates and key a TLS endpoint presents, and the CA it trusts for its peer.
///
/// All three are PEM text. For a client (an SAE), `ca_pem` is the CA of the KME's server
/// certificate; for a server (a KME), it is the CA that issues SAE client certificates.
#[derive(Clone)]
pub struct TlsPem {
    /// Trusted CA certificate(s) for the peer, PEM (one or more `CERTIFICATE` blocks).
    pub ca_pem: Vec<u8>,
    /// Our certificate chain, PEM, leaf first.
    pub cert_pem: Vec<u8>,
    /// Our private key, PEM (PKCS#8, PKCS#1 or SEC1). Zeroized when dropped.
    pub key_pem: Zeroizing<Vec<u8>>,
}

impl TlsPem {
    /// Takes the three PEM texts.
    pub fn new(
        ca_pem: impl Into<Vec<u8>>,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        Self { ca_pem: ca_pem.into(), cert_pem: cert_pem.into(), key_pem: Zeroizing::new(key_pem.into()) }
    }

    /// Reads the three PEM files.
    pub fn from_files(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsConfigError> {
        Ok(Self { ca_pem: read(ca)?, cert_pem: read(cert)?, key_pem: Zeroizing::new(read(key)?) })
    }
}

impl fmt::Debug for TlsPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsPem")
            .field("ca_pem_len", &self.ca_pem.len())
            .field("cert_pem_len", &self.cert_pem.len())
            .finish_non_exhaustive()
    }
}

/// A TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsConfigError {
    /// A PEM file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// PEM text held no usable certificate.
    #[error("{what}: no certificate found in the PEM text")]
    NoCertificate {
        /// Which input (CA, certificate chain).
        what: &'static str,
    },
    /// PEM text could not be parsed.
    #[error("{what}: invalid PEM: {reason}")]
    Pem {
        /// Which input.
        what: &'static str,
        /// What the parser said.
        reason: String,
    },
    /// rustls refused the certificates, the key or the settings.
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client-certificate verifier could not be built from the CA.
    #[error("client CA rejected: {0}")]
    ClientVerifier(String),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsConfigError> {
    std::fs::read(path).map_err(|source| TlsConfigError::Read { path: path.to_owned(), source })
}

/// The crypto provider every configuration here is built with: rustls on *ring*.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates in a PEM text, in order.
pub fn parse_certs(pem: &[u8], what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsConfigError::Pem { what, reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsConfigError::NoCertificate { what });
    }
    Ok(certs)
}

/// The first private key in a PEM text.
pub fn parse_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsConfigError> {
    // The parser's errors describe the PEM structure, not the key's contents.
    PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| TlsConfigError::Pem { what: "private key", reason: e.to_string() })
}

/// A root store holding the CA certificate(s) of a PEM text.
pub fn root_store(ca_pem: &[u8]) -> Result<RootCertStore, TlsConfigError> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certs(ca_pem, "CA")? {
        roots.add(cert)?;
    }
    Ok(roots)
}
