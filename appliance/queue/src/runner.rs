//! The outbound queue: accepts messages for other domains (sealed at rest, durable before the
//! SMTP server answers 250), delivers them — sealed with QKD keys to peer sites, over
//! STARTTLS — retries with back-off, and reports failures and delays to local senders.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use qutemail_smtp::client::{ClientConfig, SmtpClient, TlsMode};
use qutemail_smtp::{Address, DsnReturn, MailParams, RcptParams, Recipient, ReversePath};
use qutemail_store::{
    DeliveryProtection, NewQueueRecipient, NewQueuedMessage, QueueOutcome, QueuedDelivery, QueuedRecipient,
    Store,
};
use qutemail_telemetry::{GatewayMetrics, WaitReason};
use qutemail_vault::{AppendRequest, MailVault, Protection, SealOrder, StoredProtection, VaultError};
use tokio::io::AsyncReadExt as _;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use zeroize::Zeroizing;

use crate::dkim::DkimSigning;
use crate::dsn::{self, DsnAction, DsnRequest, RecipientReport};
use crate::retry::{NextStep, RetryPolicy};

mod mx;
pub use mx::MxRouting;

/// The status of a message waiting for QKD keys.
const KEY_WAIT_STATUS: &str = "4.7.0";

/// How the last reply of a recipient waiting for QKD keys starts (the queue listing shows it;
/// [`wait_reason`] reads it back).
const KEY_WAIT_PREFIX: &str = "waiting for QKD keys";
/// How the last reply starts when the next hop did not answer.
const UNREACHABLE_PREFIX: &str = "next hop unreachable";
/// How the last reply starts when this gateway failed.
const LOCAL_ERROR_PREFIX: &str = "local error";

/// Why a queued recipient waits, from its last reply as stored (`None`: not tried yet). The
/// queue writes these replies, so the census of waiting mail (metrics) and `qutemailctl queue
/// list` tell the same story.
pub fn wait_reason(last_reply: Option<&str>) -> WaitReason {
    match last_reply {
        None => WaitReason::New,
        Some(r) if r.starts_with(KEY_WAIT_PREFIX) => WaitReason::KeysExhausted,
        Some(r) if r.starts_with(UNREACHABLE_PREFIX) => WaitReason::PeerUnreachable,
        Some(r) if r.starts_with(LOCAL_ERROR_PREFIX) => WaitReason::LocalError,
        Some(_) => WaitReason::Retry,
    }
}

/// Where mail for a domain goes: a peer site's gateway, or the site's relay (smarthost).
#[derive(Debug, Clone)]
pub struct Route {
    /// `host:port` to connect to.
    pub target: String,
    /// The name the server certificate must carry.
    pub server_name: String,
    /// STARTTLS policy (peer sites: required).
    pub tls: TlsMode,
    /// Roots that verify the server.
    pub tls_config: Option<Arc<rustls::ClientConfig>>,
}

/// The queue's settings.
#[derive(Debug, Clone)]
pub struct QueueSettings {
    /// This site's host name (EHLO) and mail domain (reports come from it).
    pub hostname: String,
    /// This site's mail domain.
    pub domain: String,
    /// Routes of the peer sites, by mail domain.
    pub peer_routes: HashMap<String, Route>,
    /// The relay for every other domain (it overrides MX routing).
    pub smarthost: Option<Route>,
    /// MX routing for other domains when there is no smarthost; without either, such mail
    /// bounces (5.4.4).
    pub mx: Option<MxRouting>,
    /// DKIM keys that sign every message as it goes on the wire (none: unsigned).
    pub dkim: Option<Arc<DkimSigning>>,
    /// Retry schedule.
    pub retry: RetryPolicy,
    /// Most recipients claimed per round.
    pub batch: u32,
    /// How long a claim keeps other runners off (longer than any delivery attempt).
    pub lease: Duration,
    /// How often the queue looks for due work when nothing wakes it.
    pub poll: Duration,
    /// Longest wait before trying again a message that waits for QKD keys (keys come back
    /// within seconds once a link recovers; the retry schedule is for remote failures).
    pub key_wait_retry: Duration,
}

/// How many delivery attempts a queue round runs at once: at most `per_destination` to one next
/// hop (a peer site's gateway, the smarthost, or one domain's mail exchangers) and at most
/// `total` in all. One slow or unreachable next hop then holds up only its own mail, and a busy
/// peer link is served over several SMTP sessions at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parallelism {
    /// Most attempts in flight to one next hop (default 4).
    pub per_destination: NonZeroUsize,
    /// Most attempts in flight in all (default 16).
    pub total: NonZeroUsize,
}

impl Parallelism {
    /// One attempt after another: how the queue worked before attempts ran concurrently.
    pub const SEQUENTIAL: Self = Self { per_destination: NonZeroUsize::MIN, total: NonZeroUsize::MIN };
}

impl Default for Parallelism {
    fn default() -> Self {
        Self {
            per_destination: NonZeroUsize::new(4).unwrap_or(NonZeroUsize::MIN),
            total: NonZeroUsize::new(16).unwrap_or(NonZeroUsize::MIN),
        }
    }
}

/// The queue could not take or handle a message.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The mail store failed.
    #[error(transparent)]
    Store(#[from] qutemail_store::StoreError),
    /// Sealing or opening failed.
    #[error(transparent)]
    Vault(#[from] VaultError),
    /// Reading a queued blob failed.
    #[error("reading a queued message: {0}")]
    Io(#[from] std::io::Error),
}

/// The outbound queue. Cheap to clone.
#[derive(Clone)]
pub struct OutboundQueue {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    vault: MailVault,
    settings: QueueSettings,
    wake: Notify,
    metrics: GatewayMetrics,
    parallelism: Parallelism,
}

impl std::fmt::Debug for OutboundQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboundQueue").field("domain", &self.inner.settings.domain).finish_non_exhaustive()
    }
}

/// A recipient's DSN request as stored (`NOTIFY`), read back.
fn notify_text(p: &RcptParams) -> String {
    match &p.notify {
        None => String::new(),
        Some(n) if n.never => "NEVER".into(),
        Some(n) => {
            let mut v = Vec::new();
            if n.success {
                v.push("SUCCESS");
            }
            if n.failure {
                v.push("FAILURE");
            }
            if n.delay {
                v.push("DELAY");
            }
            v.join(",")
        }
    }
}

fn wants(notify: &str, what: &str) -> bool {
    if notify.is_empty() {
        // RFC 3461 § 4.1: without NOTIFY, FAILURE (and DELAY at the MTA's discretion).
        return what != "SUCCESS";
    }
    notify.split(',').any(|n| n.eq_ignore_ascii_case(what))
}

impl OutboundQueue {
    /// A queue over the site's store and vault.
    pub fn new(store: Store, vault: MailVault, settings: QueueSettings) -> Self {
        let metrics = GatewayMetrics::new();
        let parallelism = Parallelism::default();
        Self { inner: Arc::new(Inner { store, vault, settings, wake: Notify::new(), metrics, parallelism }) }
    }

    /// This queue (same store, vault, settings and metrics) running at most `parallelism`
    /// delivery attempts at once (default: [`Parallelism::default`]). Call it at start-up,
    /// before the queue runs.
    pub fn with_parallelism(self, parallelism: Parallelism) -> Self {
        let metrics = self.inner.metrics.clone();
        self.rebuilt(metrics, parallelism)
    }

    /// This queue (same store, vault and settings), counting sent, deferred and bounced mail
    /// and delivery latency in `metrics`. Call it at start-up, before the queue runs: clones
    /// made earlier keep counting where they did.
    pub fn with_metrics(self, metrics: GatewayMetrics) -> Self {
        let parallelism = self.inner.parallelism;
        self.rebuilt(metrics, parallelism)
    }

    /// A new queue over the same store, vault and settings, with these metrics and bounds.
    fn rebuilt(self, metrics: GatewayMetrics, parallelism: Parallelism) -> Self {
        let i = &self.inner;
        let inner = Inner {
            store: i.store.clone(),
            vault: i.vault.clone(),
            settings: i.settings.clone(),
            wake: Notify::new(),
            metrics,
            parallelism,
        };
        Self { inner: Arc::new(inner) }
    }

    /// Queues `message` (plaintext, as submitted) from `sender` to `recipients`, sealed at rest;
    /// returns the queue ID once it is durable. `requested` is the protection the sender asked
    /// for (`None`: the policy's choice per destination).
    pub async fn submit(
        &self,
        sender: &ReversePath,
        params: &MailParams,
        recipients: &[Recipient],
        requested: Option<Protection>,
        message: Zeroizing<Vec<u8>>,
    ) -> Result<String, QueueError> {
        let size = message.len() as u64;
        let (stored, _, sealed) = self
            .inner
            .vault
            .seal_at_rest(Protection::Normal, std::io::Cursor::new(message), Vec::new())
            .await?;
        let new = NewQueuedMessage {
            sender: match sender {
                ReversePath::Null => String::new(),
                ReversePath::Mailbox(a) => a.to_string(),
            },
            envid: params.envid.clone(),
            ret_full: params.ret == Some(DsnReturn::Full),
            requested: requested.map(|p| p.as_str().to_owned()),
            size,
            protection: stored.to_store(),
            recipients: recipients
                .iter()
                .map(|r| NewQueueRecipient {
                    address: r.address.to_string(),
                    notify: notify_text(&r.params),
                    orcpt: r.params.orcpt.as_ref().map(|o| format!("{};{}", o.addr_type, o.address)),
                })
                .collect(),
        };
        let id = self.inner.store.enqueue(&new, &mut sealed.as_slice()).await?;
        tracing::info!(queue_id = %id, recipients = recipients.len(), size, "message queued");
        self.inner.wake.notify_one();
        Ok(id)
    }

    /// Sets the queue gauges of the metrics (messages waiting and the oldest one's age, by
    /// [`WaitReason`]) from the durable queue: called before each scrape.
    pub async fn update_queue_metrics(&self) -> Result<(), QueueError> {
        let listing = self.inner.store.queue_listing().await?;
        let now = SystemTime::now();
        let mut census: Vec<(WaitReason, qutemail_telemetry::QueueCensus)> = Vec::new();
        for m in &listing {
            let age = now.duration_since(m.created_at).unwrap_or_default();
            let mut reasons: Vec<WaitReason> = m
                .recipients
                .iter()
                .filter(|(_, state, ..)| state == "queued")
                .map(|(.., reply)| wait_reason(reply.as_deref()))
                .collect();
            // A message counts once per reason, however many of its recipients wait for it.
            reasons.sort_by_key(|r| r.as_str());
            reasons.dedup();
            for reason in reasons {
                match census.iter_mut().find(|(r, _)| *r == reason) {
                    Some((_, c)) => {
                        c.messages += 1;
                        c.oldest_age = c.oldest_age.max(age);
                    }
                    None => census
                        .push((reason, qutemail_telemetry::QueueCensus { messages: 1, oldest_age: age })),
                }
            }
        }
        self.inner.metrics.set_queue(&census);
        Ok(())
    }

    /// Wakes the runner (new mail, keys arrived, an operator's flush).
    pub fn wake(&self) {
        self.inner.wake.notify_one();
    }

    /// Delivers what is due until `shutdown` completes.
    pub async fn run(&self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let worked = match self.run_once().await {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!(error = %e, "queue round failed");
                    0
                }
            };
            if worked > 0 {
                continue;
            }
            tokio::select! {
                () = &mut shutdown => return,
                () = self.inner.wake.notified() => {}
                () = tokio::time::sleep(self.inner.settings.poll) => {}
            }
        }
    }

    /// One round: claims due recipients and attempts them concurrently, at most
    /// [`Parallelism::per_destination`] to one next hop and [`Parallelism::total`] in all; each
    /// attempt records its outcome as soon as it ends. Returns how many groups were tried once
    /// every attempt of the round has ended; an outcome that could not be recorded (logged)
    /// makes the round fail with the first such error.
    pub async fn run_once(&self) -> Result<usize, QueueError> {
        let s = &self.inner.settings;
        let due = self.inner.store.claim_due(SystemTime::now(), s.lease, s.batch).await?;
        let n = due.len();
        // The lease. A claimed delivery should be finished before its lease ends, or another
        // runner may claim and send it again. Its claim-to-outcome time is its wait for a slot
        // plus its own attempt (at worst T, bounded by the SMTP client's timeouts): with k
        // deliveries of this batch bound for its next hop, at most ceil(k / per_destination)
        // attempts in a row, each ≤ T (and ceil(batch / total) for the overall bound). One after
        // another it was up to `batch` × T, so running concurrently never makes a claim outlive
        // its lease where it did not before; it shortens the round. The bound itself is unchanged
        // by this: a next hop that stalls at every step until the client's RFC 5321 timeouts can
        // hold one attempt longer than a short lease. On SQLite that cannot matter, since this
        // runner is the only claimer and claims nothing new until its round is over (its claims
        // never overlap); with several nodes another one could then try the same recipients
        // (at-least-once; a peer site drops repeats). After a crash the recipients in flight are
        // claimed again once their lease ends.
        let p = self.inner.parallelism;
        let overall = Arc::new(Semaphore::new(p.total.get()));
        let mut per_hop: HashMap<String, Arc<Semaphore>> = HashMap::new();
        let mut attempts = JoinSet::new();
        for delivery in due {
            let hop = per_hop
                .entry(self.next_hop(&delivery.domain))
                .or_insert_with(|| Arc::new(Semaphore::new(p.per_destination.get())))
                .clone();
            let overall = overall.clone();
            let queue = self.clone();
            attempts.spawn(async move {
                // The next hop's slot first: a delivery waiting for its busy next hop holds no
                // overall slot that mail to another destination could use. The semaphores are
                // never closed, so acquiring cannot fail.
                let _hop = hop.acquire_owned().await.ok();
                let _slot = overall.acquire_owned().await.ok();
                queue.deliver(&delivery).await
            });
        }
        let mut unrecorded = None;
        while let Some(ended) = attempts.join_next().await {
            match ended {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    unrecorded.get_or_insert(e);
                }
                // Its recipients stay claimed until the lease ends, then are tried again.
                Err(e) => tracing::error!(error = %e, "a delivery attempt ended abnormally"),
            }
        }
        unrecorded.map_or(Ok(n), Err)
    }

    /// The next hop mail for `domain` goes to, as [`Self::attempt`] routes it: the peer site's
    /// gateway or the smarthost (`host:port`: two peer domains served by one gateway share it),
    /// else the domain itself, whose mail exchangers are looked up at each attempt. The
    /// per-destination bound counts attempts by this key.
    fn next_hop(&self, domain: &str) -> String {
        match self.route(domain) {
            Some((route, _)) => format!("smtp:{}", route.target.to_ascii_lowercase()),
            None => format!("mx:{}", domain.to_ascii_lowercase()),
        }
    }

    /// Attempts `d` and records its outcome. The sent, bounced and deferred counters and the
    /// "delivered" log follow the record: a recipient whose outcome could not be recorded is
    /// not reported delivered (it stays claimed until the lease ends and is tried again).
    async fn deliver(&self, d: &QueuedDelivery) -> Result<(), QueueError> {
        let attempt = self.attempt(d).await;
        if let Err(e) =
            self.inner.store.record_delivery_outcomes(&attempt.outcomes, attempt.sent_as.as_ref()).await
        {
            tracing::error!(queue_id = %d.message.queue_id, recipients = d.recipients.len(), error = %e,
                "cannot record the outcome of a delivery attempt; it will be tried again when its claim ends");
            return Err(e.into());
        }
        let metrics = &self.inner.metrics;
        for tally in attempt.tallies {
            match tally {
                Tally::Sent { rcpt, remote, queued_for } => {
                    tracing::info!(queue_id = %d.message.queue_id, %rcpt, %remote,
                        protection = %attempt.mode, "delivered");
                    metrics.message_sent(&attempt.route_label, attempt.mode.as_str(), queued_for);
                }
                Tally::Bounced => metrics.message_bounced(&attempt.route_label),
                Tally::Deferred(reason) => metrics.message_deferred(&attempt.route_label, reason),
            }
        }
        Ok(())
    }

    /// One delivery attempt of `d`: the recipients' outcomes, how the message went out when it
    /// reached the next hop (for the delivery records), and what to count once recorded.
    async fn attempt(&self, d: &QueuedDelivery) -> Attempt {
        let s = &self.inner.settings;
        let age = SystemTime::now().duration_since(d.message.created_at).unwrap_or_default();
        let transient = |status: &str, reply: String, remote: Option<String>| -> Vec<Attempted> {
            d.recipients
                .iter()
                .map(|r| Attempted {
                    recipient: r.clone(),
                    result: Tried::Transient(status.into(), reply.clone(), remote.clone()),
                })
                .collect()
        };
        let permanent = |status: &str, reply: String, remote: Option<String>| -> Vec<Attempted> {
            d.recipients
                .iter()
                .map(|r| Attempted {
                    recipient: r.clone(),
                    result: Tried::Permanent(status.into(), reply.clone(), remote.clone()),
                })
                .collect()
        };
        // The metrics' route: the peer's domain, or `other` for mail to non-peer domains.
        let route_label = match self.route(&d.domain) {
            Some((_, true)) => d.domain.to_ascii_lowercase(),
            _ => "other".to_owned(),
        };
        // The protection the message went out with (set by `prepare`), and whether the next hop
        // answered the transaction (only then is it recorded with the outcomes).
        let mut mode = Protection::Normal;
        let mut sealed = None;
        let mut answered = false;
        let results = match self.load(d).await {
            Err(e) => {
                tracing::error!(queue_id = %d.message.queue_id, error = %e, "cannot open a queued message");
                transient("4.3.0", format!("{LOCAL_ERROR_PREFIX}: {e}"), None)
            }
            Ok(plain) => match (self.route(&d.domain), &s.mx) {
                (None, None) => permanent(
                    "5.4.4",
                    format!("no route to {} (no peer site, relay or MX routing configured)", d.domain),
                    None,
                ),
                (route, mx) => {
                    let peer = route.as_ref().is_some_and(|(_, peer)| *peer);
                    let prepared = self.prepare(d, peer, &plain, &mut mode, &mut sealed).await;
                    match prepared.and_then(|b| self.dkim_sign(d, b)) {
                        Err(Prepared::Wait(reply)) => transient(KEY_WAIT_STATUS, reply, None),
                        Err(Prepared::Refuse(reply)) => permanent("5.7.1", reply, None),
                        Err(Prepared::Local(reply)) => transient("4.3.0", reply, None),
                        Ok(bytes) => match (route, mx) {
                            (Some((route, _)), _) => match self.send(d, &route, &bytes).await {
                                Ok(results) => {
                                    answered = true;
                                    results
                                }
                                Err(e) => {
                                    let reply = format!("{UNREACHABLE_PREFIX}: {e}");
                                    transient("4.4.1", reply, Some(route.target.clone()))
                                }
                            },
                            (None, Some(mx)) => {
                                answered = true;
                                self.send_by_mx(mx, d, &bytes).await
                            }
                            (None, None) => permanent("5.4.4", format!("no route to {}", d.domain), None),
                        },
                    }
                }
            },
        };
        let mut outcomes = Vec::new();
        let mut tallies = Vec::new();
        let mut failed = Vec::new();
        let mut delayed = Vec::new();
        for a in results {
            let id = a.recipient.id;
            match a.result {
                Tried::Delivered(remote, reply) => {
                    let queued_for =
                        SystemTime::now().duration_since(d.message.created_at).unwrap_or_default();
                    tallies.push(Tally::Sent {
                        rcpt: a.recipient.address.clone(),
                        remote: remote.clone(),
                        queued_for,
                    });
                    outcomes.push((id, QueueOutcome::Delivered { remote, reply }));
                }
                Tried::Permanent(status, reply, remote) => {
                    tracing::warn!(queue_id = %d.message.queue_id, rcpt = %a.recipient.address, %status, %reply, "bounced");
                    failed.push(report(&a.recipient, DsnAction::Failed, &status, &reply, &remote));
                    tallies.push(Tally::Bounced);
                    outcomes.push((id, QueueOutcome::Failed { status, reply, remote }));
                }
                Tried::Transient(status, reply, remote) => match s
                    .retry
                    .after_failure(a.recipient.attempts + 1, age)
                {
                    NextStep::GiveUp => {
                        let reply = format!("gave up after {} attempts: {reply}", a.recipient.attempts + 1);
                        let status = format!("5{}", &status[1..]);
                        tracing::warn!(queue_id = %d.message.queue_id, rcpt = %a.recipient.address, %status,
                            "bounced: gave up");
                        failed.push(report(&a.recipient, DsnAction::Failed, &status, &reply, &remote));
                        tallies.push(Tally::Bounced);
                        outcomes.push((id, QueueOutcome::Failed { status, reply, remote }));
                    }
                    NextStep::RetryIn(delay) => {
                        let delay =
                            if status == KEY_WAIT_STATUS { delay.min(s.key_wait_retry) } else { delay };
                        let warn = !a.recipient.warned
                            && s.retry.warning_due(age)
                            && wants(&a.recipient.notify, "DELAY");
                        if warn {
                            delayed.push(report(&a.recipient, DsnAction::Delayed, &status, &reply, &remote));
                        }
                        let reason = wait_reason(Some(&reply));
                        tracing::info!(queue_id = %d.message.queue_id, rcpt = %a.recipient.address, %reason,
                            %reply, retry_in_s = delay.as_secs(), "delivery deferred");
                        tallies.push(Tally::Deferred(reason));
                        outcomes.push((
                            id,
                            QueueOutcome::Retry {
                                at: SystemTime::now() + delay,
                                status,
                                reply,
                                remote,
                                warned: a.recipient.warned || warn,
                            },
                        ));
                    }
                },
            }
        }
        let failed: Vec<RecipientReport> =
            failed.into_iter().filter(|(n, _)| wants(n, "FAILURE")).map(|(_, r)| r).collect();
        let delayed: Vec<RecipientReport> = delayed.into_iter().map(|(_, r)| r).collect();
        for reports in [failed, delayed] {
            if !reports.is_empty()
                && let Err(e) = self.report(d, &reports).await
            {
                tracing::error!(queue_id = %d.message.queue_id, error = %e, "cannot deliver a delivery status notification");
            }
        }
        let sent_as = answered.then(|| {
            sealed.unwrap_or_else(|| DeliveryProtection {
                mode: mode.as_str().to_owned(),
                ..Default::default()
            })
        });
        Attempt { outcomes, sent_as, tallies, route_label, mode }
    }

    async fn load(&self, d: &QueuedDelivery) -> Result<Zeroizing<Vec<u8>>, QueueError> {
        let mut blob = self.inner.store.read_queued_blob(&d.message).await?;
        let mut sealed = Vec::new();
        blob.read_to_end(&mut sealed).await?;
        let stored = StoredProtection::from_store(&d.message.protection)?;
        let opened = self.inner.vault.open_stored(&stored, std::io::Cursor::new(sealed), Vec::new()).await?;
        Ok(Zeroizing::new(opened.output))
    }

    fn route(&self, domain: &str) -> Option<(Route, bool)> {
        let s = &self.inner.settings;
        if let Some(r) = s.peer_routes.get(&domain.to_ascii_lowercase()) {
            return Some((r.clone(), true));
        }
        s.smarthost.clone().map(|r| (r, false))
    }

    /// The bytes to send: for a peer site, the message sealed with fresh QKD keys (taken now,
    /// at the attempt, so a message waits in the queue while kmd has none). `mode` and `sealed`
    /// say how: the protection applied, and for an envelope its keys, link and certificate.
    async fn prepare(
        &self,
        d: &QueuedDelivery,
        peer: bool,
        plain: &[u8],
        mode: &mut Protection,
        sealed: &mut Option<DeliveryProtection>,
    ) -> Result<Vec<u8>, Prepared> {
        let vault = &self.inner.vault;
        let requested = d.message.requested.as_deref().and_then(parse_protection);
        let protection = vault.choose(&d.domain, requested).map_err(|e| Prepared::Refuse(e.to_string()))?;
        if !peer || protection == Protection::Normal {
            return Ok(plain.to_vec());
        }
        let routing = qutemail_vault::routing_headers(plain).map_err(|e| Prepared::Refuse(e.to_string()))?;
        let order = SealOrder {
            recipient_domain: d.domain.clone(),
            protection,
            may_fall_back: requested.is_none(),
            routing,
            inner_len: plain.len() as u64,
        };
        match vault.seal_outbound(order, std::io::Cursor::new(plain.to_vec()), Vec::new()).await {
            Ok(out) => {
                *mode = out.protection;
                *sealed = Some(sealed_as(d, &out));
                Ok(out.output)
            }
            Err(e @ (VaultError::KeysUnavailable { .. } | VaultError::Kmd { .. } | VaultError::Hsm(_))) => {
                Err(Prepared::Wait(format!("{KEY_WAIT_PREFIX}: {e}")))
            }
            // The policy's `refuse` rule: bounced now (5.7.1 below), never sent weaker.
            Err(e) => Err(Prepared::Refuse(e.to_string())),
        }
    }

    /// The bytes with DKIM signatures over exactly them prepended (when the site signs).
    fn dkim_sign(&self, d: &QueuedDelivery, bytes: Vec<u8>) -> Result<Vec<u8>, Prepared> {
        let Some(dkim) = &self.inner.settings.dkim else { return Ok(bytes) };
        dkim.signed(&bytes).map_err(|e| {
            tracing::error!(queue_id = %d.message.queue_id, error = %e, "DKIM signing failed");
            Prepared::Local(format!("{LOCAL_ERROR_PREFIX}: {e}"))
        })
    }

    async fn send(&self, d: &QueuedDelivery, route: &Route, bytes: &[u8]) -> Result<Vec<Attempted>, String> {
        let s = &self.inner.settings;
        let mut config = ClientConfig {
            helo_name: s.hostname.clone(),
            tls: route.tls,
            tls_config: route.tls_config.clone(),
            auth: None,
            timeouts: Default::default(),
        };
        if route.tls_config.is_none() {
            config.tls = TlsMode::Disabled;
        }
        let from = if d.message.sender.is_empty() {
            ReversePath::Null
        } else {
            ReversePath::Mailbox(Address::parse(&d.message.sender, true).map_err(|e| format!("sender: {e}"))?)
        };
        let params = MailParams {
            envid: d.message.envid.clone(),
            ret: d.message.ret_full.then_some(DsnReturn::Full),
            ..MailParams::default()
        };
        let mut recipients = Vec::new();
        for r in &d.recipients {
            let address =
                Address::parse(&r.address, true).map_err(|e| format!("recipient {}: {e}", r.address))?;
            recipients.push(Recipient { address, params: RcptParams::default() });
        }
        let mut client = SmtpClient::connect(route.target.as_str(), &route.server_name, &config)
            .await
            .map_err(|e| e.to_string())?;
        let report =
            client.send_with_dsn(&from, &params, &recipients, bytes).await.map_err(|e| e.to_string())?;
        // QUIT runs on its own: the outcome is recorded without waiting for its round trip, so a
        // crash after the peer's 250 is less likely to leave the message looking undelivered.
        tokio::spawn(async move {
            let _ = client.quit().await;
        });
        let remote = route.target.clone();
        Ok(d.recipients
            .iter()
            .zip(report.recipients)
            .map(|(r, result)| {
                let reply = result.reply.to_string();
                let status = result.reply.enhanced.map(|e| e.to_string());
                let tried = match result.outcome() {
                    qutemail_smtp::client::RecipientOutcome::Delivered => {
                        Tried::Delivered(remote.clone(), reply)
                    }
                    qutemail_smtp::client::RecipientOutcome::Retry => Tried::Transient(
                        status.unwrap_or_else(|| "4.0.0".into()),
                        reply,
                        Some(remote.clone()),
                    ),
                    qutemail_smtp::client::RecipientOutcome::Bounce => Tried::Permanent(
                        status.unwrap_or_else(|| "5.0.0".into()),
                        reply,
                        Some(remote.clone()),
                    ),
                };
                Attempted { recipient: r.clone(), result: tried }
            })
            .collect())
    }

    /// Delivers a report to the (local) sender's INBOX; a remote or null sender gets none.
    async fn report(&self, d: &QueuedDelivery, reports: &[RecipientReport]) -> Result<(), QueueError> {
        let s = &self.inner.settings;
        let sender = &d.message.sender;
        let local = sender.rsplit_once('@').is_some_and(|(_, dom)| dom.eq_ignore_ascii_case(&s.domain));
        if sender.is_empty() || !local {
            tracing::info!(queue_id = %d.message.queue_id, "no report: the sender is not a local account");
            return Ok(());
        }
        let plain = self.load(d).await?;
        let original: &[u8] = if d.message.ret_full { &plain } else { dsn::header_block(&plain) };
        let now = dsn::unix_now();
        let created = d.message.created_at.duration_since(std::time::UNIX_EPOCH).map_or(now, |t| t.as_secs());
        let token = format!("{}-{}", d.message.queue_id, now);
        let retry_until = created + s.retry.give_up_after_s;
        let message = dsn::build_dsn(&DsnRequest {
            reporting_domain: &s.domain,
            sender,
            envelope_id: d.message.envid.as_deref(),
            arrival_unix: created,
            last_attempt_unix: now,
            retry_until_unix: Some(retry_until),
            recipients: reports,
            original,
            full: d.message.ret_full,
            token: &token,
        });
        let account = self.inner.store.account(sender).await?;
        let inbox = self.inner.store.mailbox(account.id, "INBOX").await?;
        self.inner
            .vault
            .append_plain(
                &self.inner.store,
                inbox.id,
                Protection::Normal,
                &AppendRequest::default(),
                Zeroizing::new(message),
            )
            .await?;
        tracing::info!(queue_id = %d.message.queue_id, recipients = reports.len(), "delivery status notification sent to the sender");
        Ok(())
    }
}

/// What a sealed envelope carried, for its delivery records: the mode, and from its signed
/// certificate the algorithm, key IDs, link, KMEs and the certificate's JSON exactly as it is
/// in the envelope. The certificate holds IDs, hashes and a signature, never key bytes.
fn sealed_as(d: &QueuedDelivery, out: &qutemail_vault::Outbound<Vec<u8>>) -> DeliveryProtection {
    let signed = &out.summary.certificate;
    let c = &signed.certificate;
    let certificate = signed
        .to_json()
        .inspect_err(|e| {
            // Not reachable for a certificate that was just written into the envelope; the
            // delivery goes on, its record lacks the certificate.
            tracing::error!(queue_id = %d.message.queue_id, error = %e, "cannot encode the sealed certificate");
        })
        .ok();
    DeliveryProtection {
        mode: out.protection.as_str().to_owned(),
        algorithm: Some(c.algorithm.clone()),
        key_ids: c.key_ids.clone(),
        link_id: c.link_id.clone(),
        source_kme_id: c.source_kme_id.clone(),
        target_kme_id: c.target_kme_id.clone(),
        certificate,
    }
}

fn parse_protection(text: &str) -> Option<Protection> {
    match text {
        "hybrid" => Some(Protection::Hybrid),
        "qaes" => Some(Protection::Qaes),
        "otp" => Some(Protection::Otp),
        "pqc" => Some(Protection::Pqc),
        "normal" => Some(Protection::Normal),
        _ => None,
    }
}

fn report(
    r: &QueuedRecipient,
    action: DsnAction,
    status: &str,
    reply: &str,
    remote: &Option<String>,
) -> (String, RecipientReport) {
    (
        r.notify.clone(),
        RecipientReport {
            recipient: r.address.clone(),
            original_recipient: r.orcpt.clone(),
            action,
            status: status.to_owned(),
            remote_mta: remote.clone(),
            diagnostic: reply.to_owned(),
        },
    )
}

enum Prepared {
    /// Not now (no keys): retry.
    Wait(String),
    /// Never (policy refuses, message unusable): bounce.
    Refuse(String),
    /// A local problem (signing): retry once the operator fixed it.
    Local(String),
}

/// What one delivery attempt came to.
struct Attempt {
    /// Each recipient's outcome, for the store.
    outcomes: Vec<(i64, QueueOutcome)>,
    /// How the message went out, when the next hop answered.
    sent_as: Option<DeliveryProtection>,
    /// What the metrics count once the outcomes are recorded.
    tallies: Vec<Tally>,
    /// The metrics' route label.
    route_label: String,
    /// The protection applied.
    mode: Protection,
}

/// One recipient's count in the metrics.
enum Tally {
    Sent { rcpt: String, remote: String, queued_for: Duration },
    Bounced,
    Deferred(WaitReason),
}

struct Attempted {
    recipient: QueuedRecipient,
    result: Tried,
}

enum Tried {
    Delivered(String, String),
    Transient(String, String, Option<String>),
    Permanent(String, String, Option<String>),
}
