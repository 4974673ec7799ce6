//! DKIM signing of outbound mail (RFC 6376, relaxed/relaxed; rsa-sha256 and RFC 8463
//! ed25519-sha256), done by the queue at delivery time over exactly the bytes that go on the
//! wire: the sealed envelope for a peer site, the message itself for an internet domain.
//!
//! The private keys are read once from PEM files (PKCS#1 or PKCS#8) into `Zeroizing` buffers
//! and live only inside the signers; nothing here logs or prints them. [`DkimSigning::dns_records`]
//! gives the TXT records to publish.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use mail_auth::common::crypto::{DkimKey, Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter as _;
use mail_auth::dkim::{Canonicalization, DkimSigner, Done};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer};
use zeroize::Zeroizing;

/// Header fields signed when present. The X-QKD-* fields bind a sealed envelope's routing
/// headers too; Received and other trace fields are left out as relays add them.
const SIGNED_HEADERS: &[&str] = &[
    "From",
    "Sender",
    "Reply-To",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "X-QKD-Key-ID",
    "X-QKD-Algorithm",
    "X-QKD-Secure",
];

/// One signing key: where it is and under which selector it is published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DkimKeyFile {
    /// The selector (`<selector>._domainkey.<domain>`).
    pub selector: String,
    /// The PEM private key (RSA of 2048 bits or more, or Ed25519).
    pub private_key: PathBuf,
}

/// A DKIM key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DkimKeyError {
    /// The key file could not be read.
    #[error("cannot read the DKIM private key {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file holds no PEM private key we can use.
    #[error("the DKIM private key {} is not usable: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong (never the key material).
        reason: String,
    },
    /// A selector that is not a DNS label sequence.
    #[error("the DKIM selector {0:?} is not a valid DNS name")]
    Selector(String),
}

/// Signing a message failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot DKIM-sign the message with selector {selector}: {reason}")]
pub struct DkimSignError {
    /// The selector whose key failed.
    pub selector: String,
    /// Why (e.g. the message has no header block).
    pub reason: String,
}

/// The algorithm of a signing key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DkimAlgorithm {
    /// rsa-sha256.
    RsaSha256,
    /// ed25519-sha256 (RFC 8463).
    Ed25519Sha256,
}

impl DkimAlgorithm {
    /// The `k=` tag of the DNS record.
    pub fn key_type(self) -> &'static str {
        match self {
            Self::RsaSha256 => "rsa",
            Self::Ed25519Sha256 => "ed25519",
        }
    }
}

/// A TXT record to publish in DNS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsTxtRecord {
    /// The owner name (`<selector>._domainkey.<domain>`).
    pub name: String,
    /// The record's text.
    pub value: String,
}

struct Key {
    selector: String,
    algorithm: DkimAlgorithm,
    public_key: Vec<u8>,
    signer: DkimSigner<DkimKey, Done>,
}

/// The site's DKIM signing keys (one or more, e.g. RSA and Ed25519 side by side).
pub struct DkimSigning {
    domain: String,
    keys: Vec<Key>,
}

impl std::fmt::Debug for DkimSigning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DkimSigning")
            .field("domain", &self.domain)
            .field("selectors", &self.keys.iter().map(|k| k.selector.as_str()).collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl DkimSigning {
    /// Loads every key for signing as `domain` (the `d=` tag).
    pub fn load(domain: &str, files: &[DkimKeyFile]) -> Result<Self, DkimKeyError> {
        let mut keys = Vec::with_capacity(files.len());
        for f in files {
            if f.selector.is_empty()
                || !f.selector.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                })
            {
                return Err(DkimKeyError::Selector(f.selector.clone()));
            }
            let (key, algorithm, public_key) = read_key(&f.private_key)?;
            let signer = DkimSigner::from_key(key)
                .domain(domain)
                .selector(f.selector.clone())
                .headers(SIGNED_HEADERS.iter().copied())
                .header_canonicalization(Canonicalization::Relaxed)
                .body_canonicalization(Canonicalization::Relaxed);
            keys.push(Key { selector: f.selector.clone(), algorithm, public_key, signer });
        }
        Ok(Self { domain: domain.to_owned(), keys })
    }

    /// The signing domain.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The `DKIM-Signature:` header fields (CRLF-terminated, one per key) to prepend to
    /// `message`.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, DkimSignError> {
        let mut headers = Vec::new();
        for k in &self.keys {
            let signature = k
                .signer
                .sign(message)
                .map_err(|e| DkimSignError { selector: k.selector.clone(), reason: e.to_string() })?;
            headers.extend_from_slice(signature.to_header().as_bytes());
        }
        Ok(headers)
    }

    /// `message` with its DKIM signatures prepended.
    pub fn signed(&self, message: &[u8]) -> Result<Vec<u8>, DkimSignError> {
        let mut out = self.sign(message)?;
        out.extend_from_slice(message);
        Ok(out)
    }

    /// The DNS TXT records that publish the public keys (RFC 6376 § 3.6.1).
    pub fn dns_records(&self) -> Vec<DnsTxtRecord> {
        self.keys
            .iter()
            .map(|k| DnsTxtRecord {
                name: format!("{}._domainkey.{}", k.selector, self.domain),
                value: format!("v=DKIM1; k={}; p={}", k.algorithm.key_type(), B64.encode(&k.public_key)),
            })
            .collect()
    }
}

/// Reads a PEM private key: `RSA PRIVATE KEY` (PKCS#1) or `PRIVATE KEY` (PKCS#8, RSA or
/// Ed25519). The DER stays in a zeroized buffer; ring copies what it needs into the key pair.
fn read_key(path: &Path) -> Result<(DkimKey, DkimAlgorithm, Vec<u8>), DkimKeyError> {
    let invalid = |reason: &str| DkimKeyError::Invalid { path: path.to_owned(), reason: reason.to_owned() };
    let pem = Zeroizing::new(
        std::fs::read(path).map_err(|source| DkimKeyError::Read { path: path.to_owned(), source })?,
    );
    let text = std::str::from_utf8(&pem).map_err(|_| invalid("not a PEM text file"))?;
    let (label, der) = pem_block(text).ok_or_else(|| invalid("no PEM private key block found"))?;
    match label {
        "RSA PRIVATE KEY" => {
            let key =
                RsaKey::<Sha256>::from_key_der(PrivateKeyDer::Pkcs1(PrivatePkcs1KeyDer::from(&der[..])))
                    .map_err(|_| invalid("not an RSA private key of 2048 to 8192 bits"))?;
            let public = rsa_spki(&key.public_key());
            Ok((DkimKey::Rsa(key), DkimAlgorithm::RsaSha256, public))
        }
        "PRIVATE KEY" => {
            if let Ok(key) =
                RsaKey::<Sha256>::from_key_der(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(&der[..])))
            {
                let public = rsa_spki(&key.public_key());
                return Ok((DkimKey::Rsa(key), DkimAlgorithm::RsaSha256, public));
            }
            let key = Ed25519Key::from_pkcs8_maybe_unchecked_der(&der)
                .map_err(|_| invalid("neither an RSA (2048 to 8192 bits) nor an Ed25519 PKCS#8 key"))?;
            let public = key.public_key();
            Ok((DkimKey::Ed25519(key), DkimAlgorithm::Ed25519Sha256, public))
        }
        other => Err(invalid(&format!(
            "a {other:?} PEM block; DKIM needs an RSA or Ed25519 private key (RSA PRIVATE KEY or PRIVATE KEY)"
        ))),
    }
}

/// The first `-----BEGIN <label>-----` block ending in `PRIVATE KEY`, decoded.
fn pem_block(text: &str) -> Option<(&str, Zeroizing<Vec<u8>>)> {
    let mut lines = text.lines().map(str::trim);
    let label = loop {
        let line = lines.next()?;
        if let Some(label) = line.strip_prefix("-----BEGIN ").and_then(|l| l.strip_suffix("-----"))
            && label.ends_with("PRIVATE KEY")
        {
            break label;
        }
    };
    let end = format!("-----END {label}-----");
    let mut body = Zeroizing::new(String::new());
    for line in lines.by_ref() {
        if line == end {
            let der = Zeroizing::new(B64.decode(body.as_bytes()).ok()?);
            return Some((label, der));
        }
        body.push_str(line);
    }
    None
}

/// Wraps a PKCS#1 RSAPublicKey into the SubjectPublicKeyInfo that DKIM's `p=` carries
/// (RFC 6376 § 3.6.1; what `openssl rsa -pubout` prints and every verifier accepts).
fn rsa_spki(pkcs1: &[u8]) -> Vec<u8> {
    // AlgorithmIdentifier { rsaEncryption, NULL }.
    const ALGORITHM: &[u8] =
        &[0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00];
    let mut bit_string = vec![0x00];
    bit_string.extend_from_slice(pkcs1);
    let mut inner = ALGORITHM.to_vec();
    inner.extend(der_tlv(0x03, &bit_string));
    der_tlv(0x30, &inner)
}

fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len.to_be_bytes().into_iter().skip_while(|b| *b == 0).collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(content);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_lengths_use_the_long_form_past_127_bytes() {
        assert_eq!(der_tlv(0x04, &[1, 2]), vec![0x04, 2, 1, 2]);
        let long = der_tlv(0x04, &[0; 300]);
        assert_eq!(&long[..4], &[0x04, 0x82, 0x01, 0x2c]);
        assert_eq!(long.len(), 304);
    }

    #[test]
    fn a_missing_or_foreign_key_file_is_named_without_its_content() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("dkim.pem");
        let e =
            DkimSigning::load("a.test", &[DkimKeyFile { selector: "s1".into(), private_key: file.clone() }])
                .unwrap_err()
                .to_string();
        assert!(e.contains("cannot read the DKIM private key") && e.contains("dkim.pem"), "{e}");
        std::fs::write(&file, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
        let e =
            DkimSigning::load("a.test", &[DkimKeyFile { selector: "s1".into(), private_key: file.clone() }])
                .unwrap_err()
                .to_string();
        assert!(e.contains("no PEM private key block"), "{e}");
        let e = DkimSigning::load(
            "a.test",
            &[DkimKeyFile { selector: "bad selector".into(), private_key: file }],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("selector"), "{e}");
    }

    #[test]
    fn an_ed25519_key_signs_and_publishes_its_raw_public_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ed.pem");
        let pkcs8 = Ed25519Key::generate_pkcs8().unwrap();
        let pem = format!("-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n", B64.encode(&pkcs8));
        std::fs::write(&file, pem).unwrap();
        let signing =
            DkimSigning::load("a.test", &[DkimKeyFile { selector: "ed1".into(), private_key: file }])
                .unwrap();
        let records = signing.dns_records();
        assert_eq!(records[0].name, "ed1._domainkey.a.test");
        let p = records[0].value.strip_prefix("v=DKIM1; k=ed25519; p=").unwrap();
        assert_eq!(B64.decode(p).unwrap().len(), 32);
        let header = String::from_utf8(
            signing.sign(b"From: a@a.test\r\nTo: b@b.test\r\nSubject: hi\r\n\r\nbody\r\n").unwrap(),
        )
        .unwrap();
        assert!(header.starts_with("DKIM-Signature: "), "{header}");
        for tag in ["a=ed25519-sha256", "d=a.test", "s=ed1", "c=relaxed/relaxed"] {
            assert!(header.contains(tag), "{tag} in {header}");
        }
    }
}
