//! The site's DNS resolver, shared by MX routing (outbound) and SPF/DKIM/DMARC evaluation
//! (inbound): one `hickory-resolver` (through `mail-auth`, so there is one version of it), either
//! the system's (`/etc/resolv.conf`) or the servers named in `[dns]` (tests, air-gapped sites).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use mail_auth::hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ProtocolConfig, ResolverConfig, ResolverOpts,
};
use mail_auth::hickory_resolver::proto::op::ResponseCode;
use mail_auth::{IpLookupStrategy, MessageAuthenticator};

/// Which DNS servers to ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSettings {
    /// Recursive resolvers to ask; empty: the system's (`/etc/resolv.conf`).
    pub servers: Vec<IpAddr>,
    /// Their port (53 unless a test or an air-gapped site runs its own elsewhere).
    pub port: u16,
    /// How long to wait for one answer.
    pub timeout: Duration,
}

impl Default for DnsSettings {
    fn default() -> Self {
        Self { servers: Vec::new(), port: 53, timeout: Duration::from_secs(5) }
    }
}

/// The resolver could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DnsSetupError {
    /// `/etc/resolv.conf` (or the system's equivalent) could not be read.
    #[error("cannot read the system's DNS configuration (/etc/resolv.conf): {0}")]
    SystemConfig(String),
    /// The resolver refused the configuration.
    #[error("cannot start the DNS resolver: {0}")]
    Resolver(String),
}

/// Why mail for a domain has no place to go (yet).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MxError {
    /// The domain publishes a null MX (RFC 7505): it accepts no mail.
    #[error("{0} does not accept mail (null MX, RFC 7505)")]
    NullMx(String),
    /// The domain does not exist (NXDOMAIN).
    #[error("the domain {0} does not exist")]
    NoSuchDomain(String),
    /// Neither MX nor A/AAAA records: nowhere to deliver.
    #[error("{0} has no mail server (no MX, A or AAAA records)")]
    NoMailServer(String),
    /// The lookup failed for now (server failure, timeout): try again later.
    #[error("DNS lookup for {domain} failed for now: {reason}")]
    Temporary {
        /// The name looked up.
        domain: String,
        /// The resolver's words.
        reason: String,
    },
}

impl MxError {
    /// Whether retrying later may help.
    pub fn is_temporary(&self) -> bool {
        matches!(self, Self::Temporary { .. })
    }

    /// The enhanced status code for a DSN (RFC 3463).
    pub fn status(&self) -> &'static str {
        match self {
            Self::NullMx(_) => "5.1.10",
            Self::NoSuchDomain(_) => "5.1.2",
            Self::NoMailServer(_) => "5.4.4",
            Self::Temporary { .. } => "4.4.3",
        }
    }
}

/// One host to try for a domain, in preference order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailExchanger {
    /// The host name (the certificate name for STARTTLS).
    pub host: String,
    /// MX preference (lower first); 0 for the implicit MX of RFC 5321 § 5.1.
    pub preference: u16,
}

/// The site's resolver. Cheap to clone.
#[derive(Clone)]
pub struct MailDns {
    authenticator: Arc<MessageAuthenticator>,
}

impl std::fmt::Debug for MailDns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MailDns").finish_non_exhaustive()
    }
}

impl MailDns {
    /// A resolver asking `settings.servers` (or the system's) over UDP, then TCP.
    pub fn new(settings: &DnsSettings) -> Result<Self, DnsSetupError> {
        let (config, mut options) = if settings.servers.is_empty() {
            let (config, options) = mail_auth::hickory_resolver::system_conf::read_system_conf()
                .map_err(|e| DnsSetupError::SystemConfig(e.to_string()))?;
            let servers = config
                .name_servers()
                .iter()
                .map(|s| {
                    let mut s = s.clone();
                    for c in &mut s.connections {
                        if matches!(c.protocol, ProtocolConfig::Udp | ProtocolConfig::Tcp) {
                            c.port = settings.port;
                        }
                    }
                    s
                })
                .collect();
            (ResolverConfig::from_parts(config.domain().cloned(), config.search().to_vec(), servers), options)
        } else {
            let servers = settings
                .servers
                .iter()
                .map(|ip| {
                    let connection = |protocol| {
                        let mut c = ConnectionConfig::new(protocol);
                        c.port = settings.port;
                        c
                    };
                    NameServerConfig::new(
                        *ip,
                        true,
                        vec![connection(ProtocolConfig::Udp), connection(ProtocolConfig::Tcp)],
                    )
                })
                .collect();
            (ResolverConfig::from_parts(None, Vec::new(), servers), ResolverOpts::default())
        };
        options.timeout = settings.timeout;
        // Mail domains are absolute: never try them under the host's search domains.
        options.ndots = 0;
        let authenticator =
            MessageAuthenticator::new(config, options).map_err(|e| DnsSetupError::Resolver(e.to_string()))?;
        Ok(Self { authenticator: Arc::new(authenticator) })
    }

    /// The SPF/DKIM/DMARC evaluator over this resolver.
    pub fn authenticator(&self) -> &MessageAuthenticator {
        &self.authenticator
    }

    /// The hosts to try for mail to `domain`, best first (RFC 5321 § 5.1): its MX records by
    /// preference (equal preferences in the order served), or the domain itself when it has
    /// no MX but has an address.
    pub async fn mail_exchangers(&self, domain: &str) -> Result<Vec<MailExchanger>, MxError> {
        let cache: Option<&mail_auth::common::cache::NoCache<_, _>> = None;
        match self.authenticator.mx_lookup(domain, cache).await {
            Ok(records) => {
                let mut hosts = Vec::new();
                for mx in records.rrset.iter() {
                    for exchange in mx.exchanges.iter() {
                        let host = exchange.trim_end_matches('.');
                        if host.is_empty() {
                            // RFC 7505 § 3: a lone "MX 0 ." says no mail; mixed with others it is
                            // ignored.
                            continue;
                        }
                        hosts.push(MailExchanger { host: host.to_owned(), preference: mx.preference });
                    }
                }
                if hosts.is_empty() {
                    if records.rrset.is_empty() {
                        return self.implicit_mx(domain).await;
                    }
                    return Err(MxError::NullMx(domain.to_owned()));
                }
                Ok(hosts)
            }
            Err(e) => match classify(&e) {
                Lookup::NoSuchName => Err(MxError::NoSuchDomain(domain.to_owned())),
                Lookup::NoRecords => self.implicit_mx(domain).await,
                Lookup::Failed(reason) => Err(MxError::Temporary { domain: domain.to_owned(), reason }),
            },
        }
    }

    /// RFC 5321 § 5.1: without MX records, the domain's own address is the implicit MX.
    async fn implicit_mx(&self, domain: &str) -> Result<Vec<MailExchanger>, MxError> {
        match self.addresses(domain).await {
            Ok(a) if !a.is_empty() => Ok(vec![MailExchanger { host: domain.to_owned(), preference: 0 }]),
            Ok(_) => Err(MxError::NoMailServer(domain.to_owned())),
            Err(MxError::NoSuchDomain(_)) => Err(MxError::NoMailServer(domain.to_owned())),
            Err(e) => Err(e),
        }
    }

    /// The addresses of `host` (A, then AAAA).
    pub async fn addresses(&self, host: &str) -> Result<Vec<IpAddr>, MxError> {
        let none4: Option<&mail_auth::common::cache::NoCache<_, _>> = None;
        let none6: Option<&mail_auth::common::cache::NoCache<_, _>> = None;
        match self.authenticator.ip_lookup(host, IpLookupStrategy::Ipv4thenIpv6, 16, none4, none6).await {
            Ok(a) => Ok(a),
            Err(e) => match classify(&e) {
                Lookup::NoSuchName => Err(MxError::NoSuchDomain(host.to_owned())),
                Lookup::NoRecords => Ok(Vec::new()),
                Lookup::Failed(reason) => Err(MxError::Temporary { domain: host.to_owned(), reason }),
            },
        }
    }
}

enum Lookup {
    NoSuchName,
    NoRecords,
    Failed(String),
}

fn classify(e: &mail_auth::Error) -> Lookup {
    match e {
        mail_auth::Error::Dns(mail_auth::DnsError::RecordNotFound(code)) => {
            if *code == ResponseCode::NXDomain {
                Lookup::NoSuchName
            } else if *code == ResponseCode::NoError {
                Lookup::NoRecords
            } else {
                Lookup::Failed(format!("server answered {code}"))
            }
        }
        other => Lookup::Failed(other.to_string()),
    }
}
