//! Delivery to internet domains by MX lookup (RFC 5321 § 5.1), in `normal` mode: the domain's
//! mail exchangers in preference order (its address when it has no MX; RFC 7505 null MX: a
//! permanent failure), each over opportunistic STARTTLS (RFC 3207, RFC 7435: encrypted when the
//! server offers it, the certificate not authenticated: MTA-STS and DANE are not implemented,
//! and without them a public MX's name cannot be checked against anything the recipient
//! domain vouched for).

use std::net::SocketAddr;
use std::sync::Arc;

use qutemail_smtp::client::TlsMode;
use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::{Attempted, OutboundQueue, Route, Tried, UNREACHABLE_PREFIX};
use crate::dns::{MailDns, MxError};

/// How mail for domains that are neither peer sites nor sent through a smarthost leaves the
/// site.
#[derive(Debug, Clone)]
pub struct MxRouting {
    /// The resolver (shared with inbound authentication).
    pub dns: MailDns,
    /// The SMTP port of mail exchangers (25; tests point it at their own sink).
    pub port: u16,
    /// TLS for STARTTLS to mail exchangers: encryption without certificate authentication.
    pub tls: Arc<rustls::ClientConfig>,
}

impl MxRouting {
    /// MX routing over `dns` to `port`, with opportunistic, unauthenticated STARTTLS.
    pub fn new(dns: MailDns, port: u16) -> Result<Self, rustls::Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider)))
            .with_no_client_auth();
        Ok(Self { dns, port, tls: Arc::new(tls) })
    }
}

/// Accepts any server certificate but still checks the handshake signatures, so the session
/// is encrypted to whoever holds the presented key (RFC 7435 opportunistic security).
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

impl OutboundQueue {
    /// Tries the domain's mail exchangers in order until one completes the transaction; a
    /// host that cannot be reached or resolved makes way for the next.
    pub(super) async fn send_by_mx(
        &self,
        mx: &MxRouting,
        d: &qutemail_store::QueuedDelivery,
        bytes: &[u8],
    ) -> Vec<Attempted> {
        let all = |tried: &dyn Fn() -> Tried| -> Vec<Attempted> {
            d.recipients.iter().map(|r| Attempted { recipient: r.clone(), result: tried() }).collect()
        };
        let hosts = match mx.dns.mail_exchangers(&d.domain).await {
            Ok(h) => h,
            Err(e) => {
                let status = e.status();
                // A DNS failure leaves the next hop unknown: for the queue census, unreachable.
                let reply =
                    if e.is_temporary() { format!("{UNREACHABLE_PREFIX}: {e}") } else { e.to_string() };
                tracing::info!(queue_id = %d.message.queue_id, domain = %d.domain, %reply,
                    "no mail exchanger");
                return if e.is_temporary() {
                    all(&|| Tried::Transient(status.into(), reply.clone(), None))
                } else {
                    all(&|| Tried::Permanent(status.into(), reply.clone(), None))
                };
            }
        };
        let mut last = format!("no mail exchanger of {} could be reached", d.domain);
        for host in &hosts {
            let addresses = match mx.dns.addresses(&host.host).await {
                Ok(a) if !a.is_empty() => a,
                Ok(_) | Err(MxError::NoSuchDomain(_)) => {
                    last = format!("mail exchanger {} has no address", host.host);
                    continue;
                }
                Err(e) => {
                    last = e.to_string();
                    continue;
                }
            };
            for ip in addresses {
                let route = Route {
                    target: SocketAddr::new(ip, mx.port).to_string(),
                    server_name: host.host.clone(),
                    tls: TlsMode::Opportunistic,
                    tls_config: Some(mx.tls.clone()),
                };
                match self.send(d, &route, bytes).await {
                    Ok(results) => return results,
                    Err(e) => {
                        tracing::info!(queue_id = %d.message.queue_id, mx = %host.host, %ip, error = %e,
                            "mail exchanger failed; trying the next");
                        last = format!("{} ({ip}): {e}", host.host);
                    }
                }
            }
        }
        let reply = format!("{UNREACHABLE_PREFIX}: {last}");
        all(&|| Tried::Transient("4.4.1".into(), reply.clone(), None))
    }
}
