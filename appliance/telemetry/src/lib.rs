//! `qutemail-telemetry`: the mail gateway's Prometheus metrics.
//!
//! [`GatewayMetrics`] holds every family the gateway exports; the SMTP listeners, the outbound
//! queue and the delivery paths update it through its methods (cheap clones share one
//! registry). [`serve`] answers `GET /metrics` over plain HTTP in the Prometheus text format
//! 0.0.4 (what Prometheus 2.x and `promtool check metrics` read). Queue depth and age are
//! gauges filled just before each scrape by a census the gateway passes to [`serve`], so they
//! come from the durable queue (the same rows `qutemailctl queue list` shows), not from counting
//! in memory.
//!
//! | family | type | labels | meaning |
//! | --- | --- | --- | --- |
//! | `qutemail_gateway_messages_received_total` | counter | `listener`, `mode`, `peer` | messages accepted with 250 after DATA |
//! | `qutemail_gateway_messages_sent_total` | counter | `route`, `mode` | recipients delivered to the next hop |
//! | `qutemail_gateway_messages_deferred_total` | counter | `route`, `reason` | delivery attempts that left a recipient waiting |
//! | `qutemail_gateway_messages_bounced_total` | counter | `route` | recipients given up on (a DSN goes to the sender) |
//! | `qutemail_gateway_queue_messages` | gauge | `reason` | queued messages, by why they wait |
//! | `qutemail_gateway_queue_oldest_message_age_seconds` | gauge | `reason` | age of the oldest of them |
//! | `qutemail_gateway_smtp_session_duration_seconds` | histogram | `listener` | connection to close |
//! | `qutemail_gateway_delivery_latency_seconds` | histogram | `route`, `mode` | queued (250 at submission) to delivered |
//! | `qutemail_gateway_verify_failures_total` | counter | `stage`, `kind` | sealed mail that failed to verify or open |
//! | `qutemail_gateway_mail_auth_total` | counter | `method`, `result` | SPF/DKIM/DMARC outcomes on inbound mail |

#![deny(missing_docs)]
#![warn(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::{EncodeLabelSet, prometheus_text};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// `Content-Type` of the exposition (Prometheus text 0.0.4).
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// The SMTP listener a message or session came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// Port 25: peer sites and the Internet.
    Mx,
    /// Ports 587/465: the site's authenticated users.
    Submission,
}

impl Listener {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Listener::Mx => "mx",
            Listener::Submission => "submission",
        }
    }
}

/// Why a queued message waits (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WaitReason {
    /// Not attempted yet.
    New,
    /// The peer's QKD keys ran out and the policy says wait (defer) rather than fall back.
    KeysExhausted,
    /// The next hop (peer gateway or relay) could not be reached.
    PeerUnreachable,
    /// The next hop answered with a temporary failure (4xx).
    Retry,
    /// Something on this gateway failed (store, HSM): retried.
    LocalError,
}

impl WaitReason {
    /// Every reason, in label order.
    pub const ALL: [WaitReason; 5] = [
        WaitReason::New,
        WaitReason::KeysExhausted,
        WaitReason::PeerUnreachable,
        WaitReason::Retry,
        WaitReason::LocalError,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            WaitReason::New => "new",
            WaitReason::KeysExhausted => "keys_exhausted",
            WaitReason::PeerUnreachable => "peer_unreachable",
            WaitReason::Retry => "retry",
            WaitReason::LocalError => "local_error",
        }
    }
}

impl std::fmt::Display for WaitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where sealed mail failed to verify or open (the `stage` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyStage {
    /// Accepting a sealed message from a peer over SMTP (certificate, AEAD, key fetch).
    Inbound,
    /// Opening a stored message for a reader (IMAP, POP3, web).
    Presentation,
}

impl VerifyStage {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            VerifyStage::Inbound => "inbound",
            VerifyStage::Presentation => "presentation",
        }
    }
}

/// What the queue holds for one [`WaitReason`], as the census reports it before a scrape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueCensus {
    /// Messages waiting for this reason.
    pub messages: u64,
    /// Age of the oldest of them.
    pub oldest_age: Duration,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReceivedLabels {
    listener: &'static str,
    mode: String,
    peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteModeLabels {
    route: String,
    mode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteReasonLabels {
    route: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerifyLabels {
    stage: &'static str,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MailAuthLabels {
    method: String,
    result: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;
type SecondsGauge = Gauge<f64, AtomicU64>;

/// SMTP sessions: 10 ms to about 11 min.
fn session_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 4.0, 9))
}

/// Delivery latency: 10 ms to about 3 days (a message may wait long for keys or a peer).
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 4.0, 14))
}

struct Families {
    registry: Registry,
    received: Family<ReceivedLabels, Counter>,
    sent: Family<RouteModeLabels, Counter>,
    deferred: Family<RouteReasonLabels, Counter>,
    bounced: Family<RouteLabels, Counter>,
    queue_messages: Family<ReasonLabels, Gauge>,
    queue_oldest: Family<ReasonLabels, SecondsGauge>,
    session: HistogramFamily<ListenerLabels>,
    latency: HistogramFamily<RouteModeLabels>,
    verify: Family<VerifyLabels, Counter>,
    mail_auth: Family<MailAuthLabels, Counter>,
    repeats: Family<PeerLabels, Counter>,
}

/// The gateway's metrics. Cheap to clone; clones update the same registry.
#[derive(Clone)]
pub struct GatewayMetrics {
    inner: Arc<Families>,
}

impl std::fmt::Debug for GatewayMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayMetrics").finish_non_exhaustive()
    }
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl GatewayMetrics {
    /// Every family registered, with the queue gauges at 0 for each reason.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("qutemail_gateway");
        let received = Family::<ReceivedLabels, Counter>::default();
        registry.register(
            "messages_received",
            "Messages accepted (250 after DATA), by listener, protection mode and sending peer site",
            received.clone(),
        );
        let sent = Family::<RouteModeLabels, Counter>::default();
        registry.register(
            "messages_sent",
            "Recipients delivered to the next hop, by route (peer domain or relay) and protection mode",
            sent.clone(),
        );
        let deferred = Family::<RouteReasonLabels, Counter>::default();
        registry.register(
            "messages_deferred",
            "Delivery attempts that left a recipient waiting in the queue, by route and reason",
            deferred.clone(),
        );
        let bounced = Family::<RouteLabels, Counter>::default();
        registry.register("messages_bounced", "Recipients given up on (bounced), by route", bounced.clone());
        let queue_messages = Family::<ReasonLabels, Gauge>::default();
        registry.register(
            "queue_messages",
            "Messages waiting in the outbound queue, by why they wait",
            queue_messages.clone(),
        );
        let queue_oldest = Family::<ReasonLabels, SecondsGauge>::default();
        registry.register(
            "queue_oldest_message_age_seconds",
            "Age of the oldest message waiting in the outbound queue, by why it waits",
            queue_oldest.clone(),
        );
        let session: HistogramFamily<ListenerLabels> = Family::new_with_constructor(session_histogram);
        registry.register(
            "smtp_session_duration_seconds",
            "SMTP sessions from connection to close, by listener",
            session.clone(),
        );
        let latency: HistogramFamily<RouteModeLabels> = Family::new_with_constructor(latency_histogram);
        registry.register(
            "delivery_latency_seconds",
            "Time from queueing (the 250 at submission) to delivery at the next hop, by route and mode",
            latency.clone(),
        );
        let verify = Family::<VerifyLabels, Counter>::default();
        registry.register(
            "verify_failures",
            "Sealed messages that failed to verify or open, by stage (inbound, presentation) and kind",
            verify.clone(),
        );
        let mail_auth = Family::<MailAuthLabels, Counter>::default();
        registry.register(
            "mail_auth",
            "Mail authentication outcomes on inbound mail, by method (spf, dkim, dmarc) and result",
            mail_auth.clone(),
        );
        let repeats = Family::<PeerLabels, Counter>::default();
        registry.register(
            "peer_repeated_deliveries",
            "Recipients of a sealed message a peer site delivered again (it could not record the first \
             delivery): accepted and not stored twice, by peer site",
            repeats.clone(),
        );
        for reason in WaitReason::ALL {
            queue_messages.get_or_create(&ReasonLabels { reason: reason.as_str() }).set(0);
            queue_oldest.get_or_create(&ReasonLabels { reason: reason.as_str() }).set(0.0);
        }
        Self {
            inner: Arc::new(Families {
                registry,
                received,
                sent,
                deferred,
                bounced,
                queue_messages,
                queue_oldest,
                session,
                latency,
                verify,
                mail_auth,
                repeats,
            }),
        }
    }

    /// A message accepted on `listener`, protected in transit with `mode` (`normal` for
    /// unsealed mail), from `peer` (the peer site's domain, `local` for submission, `internet`
    /// for unsealed mail on the MX).
    pub fn message_received(&self, listener: Listener, mode: &str, peer: &str) {
        self.inner
            .received
            .get_or_create(&ReceivedLabels {
                listener: listener.as_str(),
                mode: mode.into(),
                peer: peer.into(),
            })
            .inc();
    }

    /// `recipients` of a sealed message that `peer` delivered again, accepted without storing
    /// it twice.
    pub fn peer_repeated_delivery(&self, peer: &str, recipients: u64) {
        self.inner.repeats.get_or_create(&PeerLabels { peer: peer.into() }).inc_by(recipients);
    }

    /// A recipient delivered over `route` sealed with `mode`, `queued_for` after it was queued.
    pub fn message_sent(&self, route: &str, mode: &str, queued_for: Duration) {
        let labels = RouteModeLabels { route: route.into(), mode: mode.into() };
        self.inner.sent.get_or_create(&labels).inc();
        self.inner.latency.get_or_create(&labels).observe(queued_for.as_secs_f64());
    }

    /// A delivery attempt over `route` left a recipient waiting for `reason`.
    pub fn message_deferred(&self, route: &str, reason: WaitReason) {
        self.inner
            .deferred
            .get_or_create(&RouteReasonLabels { route: route.into(), reason: reason.as_str() })
            .inc();
    }

    /// A recipient over `route` bounced.
    pub fn message_bounced(&self, route: &str) {
        self.inner.bounced.get_or_create(&RouteLabels { route: route.into() }).inc();
    }

    /// An SMTP session on `listener` lasted `duration`.
    pub fn smtp_session_ended(&self, listener: Listener, duration: Duration) {
        self.inner
            .session
            .get_or_create(&ListenerLabels { listener: listener.as_str() })
            .observe(duration.as_secs_f64());
    }

    /// A sealed message failed at `stage`; `kind` is a short fixed name (e.g. `certificate`,
    /// `integrity`, `unknown_sender`), never message content.
    pub fn verify_failed(&self, stage: VerifyStage, kind: &str) {
        self.inner.verify.get_or_create(&VerifyLabels { stage: stage.as_str(), kind: kind.into() }).inc();
    }

    /// A mail authentication outcome: `method` is `spf`, `dkim` or `dmarc`; `result` the RFC 8601
    /// result word (`pass`, `fail`, `softfail`, `neutral`, `none`, `temperror`, `permerror`).
    pub fn mail_auth(&self, method: &str, result: &str) {
        self.inner
            .mail_auth
            .get_or_create(&MailAuthLabels { method: method.into(), result: result.into() })
            .inc();
    }

    /// Sets the queue gauges from a census; reasons the census leaves out read 0.
    pub fn set_queue(&self, census: &[(WaitReason, QueueCensus)]) {
        for reason in WaitReason::ALL {
            let c = census.iter().find(|(r, _)| *r == reason).map(|(_, c)| *c).unwrap_or_default();
            let labels = ReasonLabels { reason: reason.as_str() };
            self.inner
                .queue_messages
                .get_or_create(&labels)
                .set(i64::try_from(c.messages).unwrap_or(i64::MAX));
            self.inner.queue_oldest.get_or_create(&labels).set(c.oldest_age.as_secs_f64());
        }
    }

    /// The exposition, Prometheus text format 0.0.4.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8192);
        // Writing into a String cannot fail.
        let _ = prometheus_text::encode(&mut out, &self.inner.registry);
        out
    }
}

/// Serves `GET /metrics` on `listener` (plain HTTP/1.1) until `shutdown` completes. Before each
/// scrape, `census` is awaited (it refreshes the queue gauges, typically from the store).
pub async fn serve<C, F>(
    listener: tokio::net::TcpListener,
    metrics: GatewayMetrics,
    census: C,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    C: Fn() -> F + Clone + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    if let Ok(local) = listener.local_addr() {
        tracing::info!(%local, "metrics listener serving /metrics");
    }
    let router = Router::new()
        .route(
            "/metrics",
            get(move || {
                let (metrics, census) = (metrics.clone(), census.clone());
                async move {
                    census().await;
                    exposition(&metrics)
                }
            }),
        )
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found; metrics are at /metrics\n") });
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await
}

fn exposition(metrics: &GatewayMetrics) -> Response {
    ([(header::CONTENT_TYPE, CONTENT_TYPE), (header::CACHE_CONTROL, "no-store")], metrics.encode())
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_reasons_all_show_and_a_census_replaces_the_last() {
        let m = GatewayMetrics::new();
        let text = m.encode();
        for r in WaitReason::ALL {
            assert!(
                text.contains(&format!("qutemail_gateway_queue_messages{{reason=\"{r}\"}} 0\n")),
                "{text}"
            );
        }
        let census = QueueCensus { messages: 2, oldest_age: Duration::from_secs(30) };
        m.set_queue(&[(WaitReason::KeysExhausted, census)]);
        m.set_queue(&[(WaitReason::PeerUnreachable, QueueCensus { messages: 1, ..census })]);
        let text = m.encode();
        assert!(text.contains("qutemail_gateway_queue_messages{reason=\"keys_exhausted\"} 0\n"), "{text}");
        assert!(text.contains("qutemail_gateway_queue_messages{reason=\"peer_unreachable\"} 1\n"), "{text}");
        assert!(
            text.contains(
                "qutemail_gateway_queue_oldest_message_age_seconds{reason=\"peer_unreachable\"} 30.0\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn counters_carry_their_labels_and_total_suffix() {
        let m = GatewayMetrics::new();
        m.message_received(Listener::Mx, "hybrid", "a.example");
        m.message_sent("b.example", "pqc", Duration::from_millis(20));
        m.message_deferred("b.example", WaitReason::KeysExhausted);
        m.mail_auth("dkim", "pass");
        let text = m.encode();
        assert!(text.contains(
            "qutemail_gateway_messages_received_total{listener=\"mx\",mode=\"hybrid\",peer=\"a.example\"} 1\n"
        ));
        assert!(text.contains("qutemail_gateway_messages_sent_total{route=\"b.example\",mode=\"pqc\"} 1\n"));
        assert!(text.contains(
            "qutemail_gateway_messages_deferred_total{route=\"b.example\",reason=\"keys_exhausted\"} 1\n"
        ));
        assert!(text.contains(
            "qutemail_gateway_delivery_latency_seconds_count{route=\"b.example\",mode=\"pqc\"} 1\n"
        ));
        assert!(text.contains("qutemail_gateway_mail_auth_total{method=\"dkim\",result=\"pass\"} 1\n"));
        assert!(!text.contains("# EOF"), "0.0.4 text has no EOF marker");
    }
}
