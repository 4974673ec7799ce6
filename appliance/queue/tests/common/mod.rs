//! A site's outbound queue for the parallel-delivery tests and bench: a real mail store (SQLite),
//! a real SoftHSM token behind the vault, peer routes to SMTP sinks on 127.0.0.1:0 (plain TCP,
//! `normal` mode: no kmd, so no QKD sealing), and the sinks themselves: small SMTP servers
//! over tokio that can hold their greeting, delay replies like a WAN round trip, count the
//! sessions open at once and record each message they accept.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use qutemail_hsm::HsmKeyWrapper;
use qutemail_hsm::testing::SoftHsmEnv;
use qutemail_queue::{OutboundQueue, Parallelism, QueueSettings, RetryPolicy, Route};
use qutemail_smtp::client::TlsMode;
use qutemail_smtp::{Address, MailParams, RcptParams, Recipient, ReversePath};
use qutemail_store::Backend;
use qutemail_store::testing::TestStore;
use qutemail_vault::{MailVault, SiteDirectory, SiteKeys, VaultSettings};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpListener;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::watch;
use zeroize::Zeroizing;

pub const TOKEN: &str = "queue";
pub const DOMAIN: &str = "a.test";

/// How many sessions are open at once, and the most there ever were.
#[derive(Debug, Default)]
pub struct Gauge {
    active: AtomicUsize,
    max: AtomicUsize,
}

impl Gauge {
    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    pub fn max(&self) -> usize {
        self.max.load(Ordering::SeqCst)
    }

    fn enter(self: &Arc<Self>) -> Entered {
        let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(now, Ordering::SeqCst);
        Entered(self.clone())
    }
}

/// One session counted in a gauge until dropped.
struct Entered(Arc<Gauge>);

impl Drop for Entered {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How a sink behaves.
#[derive(Debug, Clone, Default)]
pub struct SinkOptions {
    /// Hold each session's 220 greeting until [`Sink::release`] (a next hop that accepts the
    /// connection and then says nothing).
    pub hold_greeting: bool,
    /// Before answering a flight of commands (nothing more buffered from the client), wait
    /// this long: a WAN round trip.
    pub reply_delay: Duration,
    /// Hold each greeting until this many sessions are open (at most 2 s), so that sessions
    /// a sender runs concurrently do overlap even on a loaded machine.
    pub gather: usize,
    /// Also count this sink's sessions here (several sinks share one to see the overall
    /// number of attempts in flight).
    pub overall: Option<Arc<Gauge>>,
}

struct SinkState {
    options: SinkOptions,
    gauge: Arc<Gauge>,
    greeting: watch::Receiver<bool>,
    /// The Message-ID of each message accepted, in order.
    received: Mutex<Vec<String>>,
}

/// An SMTP server on 127.0.0.1:0 that accepts every message.
pub struct Sink {
    pub addr: SocketAddr,
    state: Arc<SinkState>,
    release: watch::Sender<bool>,
}

impl Sink {
    pub async fn start(options: SinkOptions) -> Sink {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (release, greeting) = watch::channel(!options.hold_greeting);
        let state = Arc::new(SinkState {
            options,
            gauge: Arc::new(Gauge::default()),
            greeting,
            received: Mutex::new(Vec::new()),
        });
        let s = state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move {
                    let _ = session(&s, stream).await;
                });
            }
        });
        Sink { addr, state, release }
    }

    /// Lets held greetings go out.
    pub fn release(&self) {
        self.release.send_replace(true);
    }

    /// Message-IDs accepted so far.
    pub fn received(&self) -> Vec<String> {
        self.state.received.lock().unwrap().clone()
    }

    /// Sessions between their connection and the end of their message transaction.
    pub fn gauge(&self) -> &Gauge {
        &self.state.gauge
    }
}

/// One SMTP session. It counts as open from the connection until the reply to the message's
/// final dot: the sender's attempt ends with that reply; its QUIT follows on its own.
async fn session(s: &SinkState, stream: tokio::net::TcpStream) -> std::io::Result<()> {
    let mut entered = Some((s.gauge.enter(), s.options.overall.as_ref().map(|o| o.enter())));
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut greeting = s.greeting.clone();
    let _ = greeting.wait_for(|open| *open).await;
    let gathered_by = Instant::now() + Duration::from_secs(2);
    while s.gauge.active() < s.options.gather && Instant::now() < gathered_by {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A reply waits a round trip only when the client waits for it (nothing more buffered):
    // pipelined commands cost one round trip per flight, as over a WAN.
    let rtt = |read: &BufReader<OwnedReadHalf>| {
        if read.buffer().is_empty() { s.options.reply_delay } else { Duration::ZERO }
    };
    answer(&mut write, rtt(&read), "220 sink.test ESMTP\r\n").await?;
    let mut line = String::new();
    loop {
        line.clear();
        if read.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
        match verb.as_str() {
            "EHLO" => {
                answer(&mut write, rtt(&read), "250-sink.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n").await?
            }
            "MAIL" | "RCPT" | "RSET" | "NOOP" | "HELO" => {
                answer(&mut write, rtt(&read), "250 OK\r\n").await?
            }
            "DATA" => {
                answer(&mut write, rtt(&read), "354 go on\r\n").await?;
                let mut message_id = String::new();
                loop {
                    line.clear();
                    if read.read_line(&mut line).await? == 0 {
                        return Ok(());
                    }
                    if line == ".\r\n" {
                        break;
                    }
                    if message_id.is_empty()
                        && let Some(v) = line.strip_prefix("Message-ID:")
                    {
                        message_id = v.trim().to_owned();
                    }
                }
                s.received.lock().unwrap().push(message_id);
                // Uncounted before the sender can read the reply and start its next attempt.
                entered = None;
                answer(&mut write, rtt(&read), "250 2.0.0 accepted\r\n").await?;
            }
            "QUIT" => {
                write.write_all(b"221 bye\r\n").await?;
                drop(entered);
                return Ok(());
            }
            _ => answer(&mut write, rtt(&read), "500 what?\r\n").await?,
        }
    }
}

async fn answer(write: &mut OwnedWriteHalf, delay: Duration, text: &str) -> std::io::Result<()> {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    write.write_all(text.as_bytes()).await
}

/// A site's queue with a peer route per `(domain, sink address)`, no smarthost, no MX routing.
pub async fn site(
    env: &SoftHsmEnv,
    routes: &[(&str, SocketAddr)],
    parallelism: Parallelism,
) -> (TestStore, OutboundQueue) {
    let t = TestStore::new(Backend::Sqlite).await;
    let hsm = HsmKeyWrapper::open_async(env.config(TOKEN, "gateway-kek")).await.unwrap();
    let keys = SiteKeys::load_or_create(&env.dir.join("a-keys.json"), DOMAIN, &hsm).await.unwrap();
    // No kmd: every destination gets `normal` protection, so nothing here waits for QKD keys.
    let vault =
        MailVault::new(VaultSettings::new("A-mail"), None, hsm, keys, SiteDirectory::new(vec![]).unwrap());
    let peer_routes: HashMap<String, Route> = routes
        .iter()
        .map(|(domain, addr)| {
            let route = Route {
                target: addr.to_string(),
                server_name: (*domain).to_owned(),
                tls: TlsMode::Disabled,
                tls_config: None,
            };
            ((*domain).to_owned(), route)
        })
        .collect();
    let settings = QueueSettings {
        hostname: "mail.a.test".into(),
        domain: DOMAIN.into(),
        peer_routes,
        smarthost: None,
        mx: None,
        dkim: None,
        retry: RetryPolicy::default(),
        batch: 50,
        lease: Duration::from_secs(600),
        poll: Duration::from_secs(5),
        key_wait_retry: Duration::from_secs(5),
    };
    let queue = OutboundQueue::new(t.store.clone(), vault, settings).with_parallelism(parallelism);
    (t, queue)
}

/// Queues a message from alice to `recipients` whose Message-ID is `<id@a.test>`, padded with
/// `body_len` bytes of text.
pub async fn submit(queue: &OutboundQueue, id: &str, recipients: &[&str], body_len: usize) {
    let mut message = format!(
        "From: alice@a.test\r\nTo: {}\r\nSubject: parallel delivery\r\nMessage-ID: <{id}@a.test>\r\n\r\n",
        recipients.join(", ")
    );
    let line = "The quick brown fox jumps over the lazy dog, again and again and again.\r\n";
    while message.len() < body_len {
        message.push_str(line);
    }
    let sender = ReversePath::Mailbox(Address::parse("alice@a.test", true).unwrap());
    let recipients: Vec<Recipient> = recipients
        .iter()
        .map(|r| Recipient { address: Address::parse(r, true).unwrap(), params: RcptParams::default() })
        .collect();
    queue
        .submit(&sender, &MailParams::default(), &recipients, None, Zeroizing::new(message.into_bytes()))
        .await
        .unwrap();
}

/// Recipients still waiting in the queue.
pub async fn still_queued(t: &TestStore) -> usize {
    let listing = t.store.queue_listing().await.unwrap();
    listing.iter().flat_map(|m| &m.recipients).filter(|(_, state, ..)| state == "queued").count()
}

/// Polls `check` every 20 ms until it holds or `deadline` passes; returns whether it held.
pub async fn eventually(deadline: Duration, mut check: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + deadline;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
