//! `kmd enrol-sae`: issues an SAE client certificate from the site CA's certificate and key.
//!
//! `etsi014::pki::Ca` can only create a new, in-memory CA (`Ca::new`); it cannot load an
//! existing one from files. Until it can (a `Ca::from_pem(cert_pem, key_pem)` built on rcgen's
//! `Issuer::from_ca_cert_pem`, feature `x509-parser`), this module does the same with rcgen
//! directly, with the same certificate profile as `Ca::client`: subject CN = SAE ID, extended key
//! usage clientAuth, key usage digitalSignature, a fresh ECDSA P-256 key. The new certificate is
//! verified against the CA certificate (rustls' WebPKI client verifier) before anything is
//! written, so a CA key that does not belong to the CA certificate is refused.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, UnixTime};
use zeroize::Zeroizing;

/// What to issue.
#[derive(Debug, Clone)]
pub struct EnrolRequest {
    /// The CA certificate, PEM.
    pub ca_cert: PathBuf,
    /// The CA private key, PEM.
    pub ca_key: PathBuf,
    /// The SAE ID (the certificate's subject CN).
    pub sae_id: String,
    /// Where `<sae_id>.pem` and `<sae_id>.key` are written.
    pub out: PathBuf,
    /// Validity in days from today.
    pub days: u32,
    /// Overwrite existing files.
    pub force: bool,
}

/// What was issued.
#[derive(Debug, Clone)]
pub struct Enrolled {
    /// The certificate file.
    pub cert_path: PathBuf,
    /// The key file (mode 0600).
    pub key_path: PathBuf,
    /// SHA-256 of the DER certificate, lower-case hex (for `[[sae]] certificate_sha256`).
    pub fingerprint: String,
    /// Last day of validity, `YYYY-MM-DD`.
    pub not_after: String,
}

/// Enrolment failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrolError {
    /// A file could not be read or written.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The SAE ID cannot be a certificate CN and a file name.
    #[error("invalid SAE ID {0:?}: use letters, digits and - _ . : @ (not starting with a dot)")]
    SaeId(String),
    /// rcgen refused the CA material or the parameters.
    #[error("{what}: {source}")]
    Certificate {
        /// What was being done.
        what: &'static str,
        /// The cause.
        #[source]
        source: rcgen::Error,
    },
    /// The issued certificate does not verify against the CA certificate.
    #[error("the CA key does not belong to the CA certificate {}: the issued certificate does not verify ({reason})", ca.display())]
    Verify {
        /// The CA certificate.
        ca: PathBuf,
        /// What rustls said.
        reason: String,
    },
    /// A file exists and `--force` was not given.
    #[error("{} exists; pass --force to replace it", .0.display())]
    Exists(PathBuf),
    /// Invalid validity.
    #[error("--days must be between 1 and 36500")]
    Days,
}

fn valid_sae_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '@'))
}

/// Issues the certificate and writes `<out>/<sae_id>.pem` and `<out>/<sae_id>.key`.
pub fn enrol_sae(req: &EnrolRequest) -> Result<Enrolled, EnrolError> {
    if !valid_sae_id(&req.sae_id) {
        return Err(EnrolError::SaeId(req.sae_id.clone()));
    }
    if req.days == 0 || req.days > 36_500 {
        return Err(EnrolError::Days);
    }
    let read = |what, path: &Path| {
        std::fs::read_to_string(path).map_err(|source| EnrolError::Io { what, path: path.into(), source })
    };
    let ca_pem = read("cannot read the CA certificate", &req.ca_cert)?;
    let ca_key_pem = Zeroizing::new(read("cannot read the CA key", &req.ca_key)?);
    let cert_err = |what| move |source| EnrolError::Certificate { what, source };
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(cert_err("cannot parse the CA key"))?;
    let issuer =
        Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(cert_err("cannot parse the CA certificate"))?;

    let today = days_since_epoch();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, req.sae_id.as_str());
    params.distinguished_name = dn;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let (y, m, d) = civil_from_days(today - 1);
    params.not_before = rcgen::date_time_ymd(y, m, d);
    let (y, m, d) = civil_from_days(today + i64::from(req.days));
    params.not_after = rcgen::date_time_ymd(y, m, d);
    let not_after = format!("{y:04}-{m:02}-{d:02}");
    let key = KeyPair::generate().map_err(cert_err("cannot generate a key"))?;
    let cert = params.signed_by(&key, &issuer).map_err(cert_err("cannot issue the certificate"))?;

    verify(&req.ca_cert, &ca_pem, cert.der())?;

    let cert_path = req.out.join(format!("{}.pem", req.sae_id));
    let key_path = req.out.join(format!("{}.key", req.sae_id));
    if !req.force {
        for path in [&cert_path, &key_path] {
            if path.exists() {
                return Err(EnrolError::Exists(path.clone()));
            }
        }
    }
    write(&key_path, Zeroizing::new(key.serialize_pem()).as_bytes(), true)?;
    write(&cert_path, cert.pem().as_bytes(), false)?;
    let digest = ring::digest::digest(&ring::digest::SHA256, cert.der());
    let fingerprint = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    Ok(Enrolled { cert_path, key_path, fingerprint, not_after })
}

fn verify(ca_path: &Path, ca_pem: &str, cert: &CertificateDer<'_>) -> Result<(), EnrolError> {
    let fail = |reason: String| EnrolError::Verify { ca: ca_path.into(), reason };
    let roots = etsi014::tls::root_store(ca_pem.as_bytes()).map_err(|e| fail(e.to_string()))?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        etsi014::tls::provider(),
    )
    .build()
    .map_err(|e| fail(e.to_string()))?;
    verifier.verify_client_cert(cert, &[], UnixTime::now()).map(drop).map_err(|e| fail(e.to_string()))
}

fn write(path: &Path, contents: &[u8], private: bool) -> Result<(), EnrolError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let err = |source| EnrolError::Io { what: "cannot write", path: path.into(), source };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true).mode(if private { 0o600 } else { 0o644 });
    let mut file = options.open(path).map_err(err)?;
    file.write_all(contents).map_err(err)?;
    file.sync_all().map_err(err)
}

fn days_since_epoch() -> i64 {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    i64::try_from(secs / 86_400).unwrap_or(0)
}

/// (year, month, day) of a day number since 1970-01-01 (H. Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i32, u8, u8) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y as i32, m as u8, d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(59), (1970, 3, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_000), (2024, 10, 4));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }

    #[test]
    fn sae_ids() {
        assert!(valid_sae_id("A-mail"));
        assert!(valid_sae_id("sae@site.example"));
        assert!(!valid_sae_id("../x"));
        assert!(!valid_sae_id(".hidden"));
        assert!(!valid_sae_id("a b"));
        assert!(!valid_sae_id(""));
    }
}
