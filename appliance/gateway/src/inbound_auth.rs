//! Sender authentication of mail arriving on the MX listener: SPF for the HELO and MAIL FROM
//! identities (RFC 7208), DKIM signatures (RFC 6376, RFC 8463), and DMARC with identifier
//! alignment (RFC 7489), through `mail-auth` over the site's resolver. The outcome is an
//! `Authentication-Results:` header field (RFC 8601, authserv-id = the site's host name) for the
//! stored copy, and a disposition: deliver, deliver to Junk (DMARC quarantine), or refuse (DMARC
//! reject, when enforced). A temporary DNS failure never becomes a verdict: the sender is told
//! to try again (451 4.7.0), so no mail is lost to a resolver hiccup.

use std::net::IpAddr;

use qutemail_queue::dns::MailDns;
use qutemail_queue::mail_auth::common::headers::HeaderWriter as _;
use qutemail_queue::mail_auth::dmarc::Policy;
use qutemail_queue::mail_auth::dmarc::verify::DmarcParameters;
use qutemail_queue::mail_auth::spf::verify::SpfParameters;
use qutemail_queue::mail_auth::{
    AuthenticatedMessage, AuthenticationResults, DkimResult, DmarcResult, SpfOutput, SpfResult,
};
use qutemail_smtp::{EnhancedCode, Refusal};
use serde::Deserialize;

/// What happens to mail whose DMARC check fails under a sender's `reject` policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DmarcEnforcement {
    /// Refuse it (550 5.7.1); `quarantine` goes to the recipient's Junk folder.
    #[default]
    Enforce,
    /// Deliver it to the INBOX anyway; the verdict is only recorded in Authentication-Results.
    ReportOnly,
}

/// Where an evaluated message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// The recipients' INBOX.
    Inbox,
    /// The recipients' Junk folder (DMARC quarantine).
    Junk,
    /// Refused with this reply.
    Refuse(Refusal),
}

/// The evaluation of one message.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// The `Authentication-Results:` field, CRLF-terminated, to prepend.
    pub header: String,
    /// Where the message goes.
    pub disposition: Disposition,
}

/// The SMTP facts the checks need.
#[derive(Debug, Clone, Copy)]
pub struct Connection<'a> {
    /// The client's address.
    pub ip: IpAddr,
    /// The EHLO/HELO name.
    pub helo: &'a str,
    /// The MAIL FROM address (empty: the null reverse path).
    pub mail_from: &'a str,
}

/// The evaluator: the site's resolver, host name and DMARC enforcement.
#[derive(Clone)]
pub struct InboundAuth {
    dns: MailDns,
    hostname: String,
    enforcement: DmarcEnforcement,
}

impl std::fmt::Debug for InboundAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundAuth")
            .field("hostname", &self.hostname)
            .field("enforcement", &self.enforcement)
            .finish_non_exhaustive()
    }
}

fn try_later(what: &str) -> Refusal {
    Refusal::new(
        451,
        EnhancedCode::new(4, 7, 0),
        format!("temporary DNS failure while checking {what}; try again later"),
    )
}

impl InboundAuth {
    /// An evaluator answering as `hostname` (the authserv-id).
    pub fn new(dns: MailDns, hostname: &str, enforcement: DmarcEnforcement) -> Self {
        Self { dns, hostname: hostname.to_owned(), enforcement }
    }

    /// The authserv-id.
    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    /// Evaluates SPF, DKIM and DMARC for `message` (as received, without our Received: field)
    /// arriving over `conn`. `Err` is a temporary failure to answer with (451).
    pub async fn evaluate(&self, conn: Connection<'_>, message: &[u8]) -> Result<Verdict, Refusal> {
        let resolver = self.dns.authenticator();
        let helo = if conn.helo.is_empty() { "unknown" } else { conn.helo };
        let spf_helo: SpfOutput =
            resolver.verify_spf(SpfParameters::verify_ehlo(conn.ip, helo, &self.hostname)).await;
        let spf_mail_from = if conn.mail_from.is_empty() {
            // RFC 7208 § 2.4: with a null reverse path, the HELO identity stands for MAIL FROM.
            spf_helo.clone()
        } else {
            resolver
                .verify_spf(SpfParameters::verify_mail_from(conn.ip, helo, &self.hostname, conn.mail_from))
                .await
        };
        if spf_mail_from.result() == SpfResult::TempError {
            return Err(try_later("SPF"));
        }
        let mail_from_domain = match conn.mail_from.rsplit_once('@') {
            Some((_, d)) => d,
            None => helo,
        };
        let mut results = AuthenticationResults::new(&self.hostname);
        let Some(parsed) = AuthenticatedMessage::parse(message) else {
            // No header block to check signatures or a From: domain in.
            let header = results
                .with_spf_ehlo_result(&spf_helo, conn.ip, helo)
                .with_spf_mailfrom_result(&spf_mail_from, conn.ip, conn.mail_from, helo)
                .to_header();
            return Ok(Verdict { header, disposition: Disposition::Inbox });
        };
        let dkim = resolver.verify_dkim(&parsed).await;
        let dkim_passed = dkim.iter().any(|d| d.result() == &DkimResult::Pass);
        if !dkim_passed && dkim.iter().any(|d| matches!(d.result(), DkimResult::TempError(_))) {
            return Err(try_later("DKIM signatures"));
        }
        let dmarc = resolver
            .verify_dmarc(DmarcParameters::new(&parsed, &dkim, mail_from_domain, &spf_mail_from))
            .await;
        let header_from = parsed.from.first().map(String::as_str).unwrap_or_default();
        let passed = dmarc.dkim_result() == &DmarcResult::Pass || dmarc.spf_result() == &DmarcResult::Pass;
        let temporary = |r: &DmarcResult| matches!(r, DmarcResult::TempError(_));
        if !passed && (temporary(dmarc.dkim_result()) || temporary(dmarc.spf_result())) {
            return Err(try_later("the DMARC policy"));
        }
        let failed = !passed && dmarc.dmarc_record().is_some();
        results = results
            .with_dkim_results(&dkim, header_from)
            .with_spf_ehlo_result(&spf_helo, conn.ip, helo)
            .with_spf_mailfrom_result(&spf_mail_from, conn.ip, conn.mail_from, helo)
            .with_dmarc_result(&dmarc);
        let header = results.to_header();
        let disposition = match (failed, dmarc.policy(), self.enforcement) {
            (true, Policy::Reject, DmarcEnforcement::Enforce) => Disposition::Refuse(Refusal::new(
                550,
                EnhancedCode::new(5, 7, 1),
                format!(
                    "message rejected: it fails the DMARC check of {} (not authenticated by an aligned \
                     SPF or DKIM result) and that domain's policy is reject",
                    dmarc.domain()
                ),
            )),
            (true, Policy::Quarantine | Policy::Reject, _) => Disposition::Junk,
            _ => Disposition::Inbox,
        };
        tracing::info!(
            spf = %spf_mail_from.result(),
            dkim = dkim_passed,
            dmarc_domain = %dmarc.domain(),
            dmarc_pass = passed,
            disposition = match &disposition {
                Disposition::Inbox => "inbox",
                Disposition::Junk => "junk",
                Disposition::Refuse(_) => "refused",
            },
            "sender authentication"
        );
        Ok(Verdict { header, disposition })
    }

    /// The `Authentication-Results:` field for a sealed envelope from a peer site, whose
    /// sender was authenticated by its site certificate rather than by DNS.
    pub fn peer_site_results(&self, peer_domain: &str) -> String {
        format!(
            "Authentication-Results: {};\r\n\tx-qutemail-envelope=pass (sealed envelope verified with the \
             peer site's certificate) header.d={}\r\n",
            self.hostname, peer_domain
        )
    }
}

/// `message` without `Authentication-Results:` fields that claim to come from `authserv_id`:
/// only this host may say what it checked (RFC 8601 § 5), so such fields from outside are
/// forgeries. Fields of other authserv-ids are kept.
pub fn strip_forged_results(message: &[u8], authserv_id: &str) -> Vec<u8> {
    let head_len = qutemail_queue::dsn::header_block(message).len();
    let (head, body) = message.split_at(head_len.min(message.len()));
    let mut out = Vec::with_capacity(message.len());
    let mut fields: Vec<&[u8]> = Vec::new();
    let mut start = 0;
    // Split the header block into fields (a line starting with space or tab continues one).
    for (i, line) in head.split_inclusive(|b| *b == b'\n').scan(0, |pos, l| {
        let at = *pos;
        *pos += l.len();
        Some((at, l))
    }) {
        if i > 0 && !matches!(line.first(), Some(b' ' | b'\t')) {
            fields.push(&head[start..i]);
            start = i;
        }
    }
    fields.push(&head[start..]);
    for field in fields {
        if !is_results_of(field, authserv_id) {
            out.extend_from_slice(field);
        }
    }
    out.extend_from_slice(body);
    out
}

fn is_results_of(field: &[u8], authserv_id: &str) -> bool {
    let text = String::from_utf8_lossy(field);
    let Some((name, value)) = text.split_once(':') else { return false };
    if !name.trim().eq_ignore_ascii_case("authentication-results") {
        return false;
    }
    // authserv-id is the first token, up to ';' (an optional version number follows it).
    let id = value.trim_start().split([';', ' ', '\t', '\r', '\n']).next().unwrap_or_default();
    id.eq_ignore_ascii_case(authserv_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_results_claiming_our_name_are_removed() {
        let message = b"Received: from x\r\n\tby y\r\nAuthentication-Results: mx.a.test;\r\n\tdmarc=pass\r\n\
            Authentication-Results: other.example; spf=fail\r\n\
            authentication-results:MX.A.TEST 1; dkim=pass\r\n\
            Subject: hi\r\n\r\nAuthentication-Results: mx.a.test; body line stays\r\n";
        let out = String::from_utf8(strip_forged_results(message, "mx.a.test")).unwrap();
        assert_eq!(
            out,
            "Received: from x\r\n\tby y\r\nAuthentication-Results: other.example; spf=fail\r\n\
             Subject: hi\r\n\r\nAuthentication-Results: mx.a.test; body line stays\r\n"
        );
    }
}
