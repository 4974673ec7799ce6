//! The crate's client against its tokio server over 127.0.0.1: STARTTLS required and verified,
//! AUTH PLAIN, pipelining on the wire, per-recipient 2xx/4xx/5xx outcomes, and the typed
//! connection errors. Also the listener's connection limit and idle timeout.

mod common;

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use common::{RecordingHost, pki, site, start};
use qutemail_smtp::client::{
    ClientConfig, ClientCredentials, ClientError, RecipientOutcome, SmtpClient, TlsMode,
};
use qutemail_smtp::server::{ListenerConfig, ListenerMode, ServerTimeouts, SmtpServer};
use qutemail_smtp::{Address, ReversePath};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use zeroize::Zeroizing;

fn addr(s: &str) -> Address {
    Address::parse(s, false).expect("test address")
}

fn alice(config: &mut ClientConfig) {
    config.auth =
        Some(ClientCredentials { username: "alice".into(), password: Zeroizing::new("secret".into()) });
}

#[tokio::test(flavor = "multi_thread")]
async fn client_submits_over_required_starttls_with_per_recipient_outcomes() {
    let site = site().await;
    let mut config = ClientConfig::new("client.test", site.pki.client_tls.clone());
    alice(&mut config);
    let mut client = SmtpClient::connect(site.submission, "localhost", &config).await.expect("connect");
    let tls = client.tls().expect("TLS is up").clone();
    assert_eq!(tls.version, "TLSv1.3");
    assert!(client.extensions().pipelining && client.extensions().dsn);

    let from = ReversePath::Mailbox(addr("alice@local.test"));
    let recipients = [addr("bob@local.test"), addr("busy@local.test"), addr("nobody@local.test")];
    let message = b"Subject: test\r\n\r\n.starts with a dot\r\nbody\r\n";
    let report = client.send(&from, &recipients, message).await.expect("transaction");
    let outcomes: Vec<_> = report.recipients.iter().map(|r| (r.outcome(), r.reply.code)).collect();
    assert_eq!(
        outcomes,
        [(RecipientOutcome::Delivered, 250), (RecipientOutcome::Retry, 450), (RecipientOutcome::Bounce, 550)]
    );
    assert_eq!(report.recipients[1].reply.enhanced.map(|e| e.to_string()).as_deref(), Some("4.2.1"));
    assert_eq!(report.with_outcome(RecipientOutcome::Delivered).count(), 1);

    // The connection is reusable: a refused sender gives every recipient the MAIL reply.
    let stranger = ReversePath::Mailbox(addr("bob@local.test"));
    let report = client.send(&stranger, &recipients[..1], message).await.expect("second transaction");
    assert_eq!(report.recipients[0].reply.code, 553);
    assert_eq!(report.recipients[0].outcome(), RecipientOutcome::Bounce);
    // All recipients refused: nothing delivered, connection still usable.
    let report = client.send(&from, &recipients[1..], message).await.expect("third transaction");
    assert!(report.recipients.iter().all(|r| r.outcome() != RecipientOutcome::Delivered));
    client.quit().await.expect("quit");

    let delivered = site.host.delivered();
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].body(), message);
    assert_eq!(delivered[0].envelope.recipients.len(), 1);
}

/// A TCP stream adapter that records every write, to see what went out in one flight.
struct RecordingStream {
    inner: TcpStream,
    writes: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl AsyncRead for RecordingStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for RecordingStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &poll
            && let Ok(mut writes) = self.writes.lock()
        {
            writes.push(buf[..*n].to_vec());
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn client_pipelines_mail_rcpt_and_data_in_one_write() {
    let site = site().await;
    let writes = Arc::new(Mutex::new(Vec::new()));
    let stream = RecordingStream {
        inner: TcpStream::connect(site.mx).await.expect("connect"),
        writes: writes.clone(),
    };
    let mut config = ClientConfig::new("client.test", site.pki.client_tls.clone());
    config.tls = TlsMode::Disabled; // plain, so the recorded writes are readable
    let mut client = SmtpClient::handshake(stream, "localhost", &config).await.expect("handshake");
    let recipients = [addr("a@local.test"), addr("b@local.test"), addr("c@elsewhere.example")];
    let report =
        client.send(&ReversePath::Null, &recipients, b"Subject: x\r\n\r\ny\r\n").await.expect("send");
    let codes: Vec<u16> = report.recipients.iter().map(|r| r.reply.code).collect();
    assert_eq!(codes, [250, 250, 550]);
    let writes = writes.lock().expect("writes").clone();
    let flight =
        writes.iter().map(|w| String::from_utf8_lossy(w).into_owned()).find(|w| w.starts_with("MAIL FROM"));
    assert_eq!(
        flight.as_deref(),
        Some(
            "MAIL FROM:<> SIZE=17\r\nRCPT TO:<a@local.test>\r\nRCPT TO:<b@local.test>\r\n\
             RCPT TO:<c@elsewhere.example>\r\nDATA\r\n"
        )
    );
    assert_eq!(site.host.delivered()[0].envelope.params.size, Some(17));
}

#[tokio::test(flavor = "multi_thread")]
async fn client_errors_are_typed() {
    let site = site().await;
    let config = ClientConfig::new("client.test", site.pki.client_tls.clone());

    // Nothing listening.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port");
    let err = SmtpClient::connect(closed, "localhost", &config).await.expect_err("refused");
    assert!(
        matches!(&err, ClientError::Connect { source, .. } if source.kind() == std::io::ErrorKind::ConnectionRefused),
        "{err}"
    );

    // A certificate from another CA fails verification.
    let other = pki();
    let untrusting = ClientConfig::new("client.test", other.client_tls.clone());
    let err = SmtpClient::connect(site.mx, "localhost", &untrusting).await.expect_err("untrusted");
    assert!(matches!(err, ClientError::Tls { .. }), "{err}");
    // The certificate does not name this host.
    let err = SmtpClient::connect(site.mx, "mx.other.example", &config).await.expect_err("wrong name");
    assert!(matches!(err, ClientError::Tls { .. }), "{err}");

    // TLS required but the server has no certificate (an MX without STARTTLS).
    let plain_mx = start(
        ListenerConfig::new(ListenerMode::Mx, "plain.local.test", None).expect("config"),
        Arc::new(RecordingHost::default()),
    )
    .await;
    let err = SmtpClient::connect(plain_mx, "localhost", &config).await.expect_err("no STARTTLS");
    assert!(matches!(err, ClientError::TlsUnavailable { .. }), "{err}");
    // Opportunistic TLS goes on in plain text there.
    let mut opportunistic = config.clone();
    opportunistic.tls = TlsMode::Opportunistic;
    let client = SmtpClient::connect(plain_mx, "localhost", &opportunistic).await.expect("plain");
    assert!(client.tls().is_none());

    // Wrong password.
    let mut wrong = config.clone();
    wrong.auth =
        Some(ClientCredentials { username: "alice".into(), password: Zeroizing::new("nope".into()) });
    let err = SmtpClient::connect(site.submission, "localhost", &wrong).await.expect_err("bad password");
    assert!(matches!(&err, ClientError::AuthFailed { reply } if reply.code == 535), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn listener_enforces_connection_limit_and_idle_timeout() {
    let config = ListenerConfig::new(ListenerMode::Mx, "mx.local.test", None)
        .and_then(|c| c.max_connections(1))
        .expect("config")
        .timeouts(ServerTimeouts { command: Duration::from_millis(300), ..ServerTimeouts::default() });
    let server = start(config, Arc::new(RecordingHost::default())).await;
    let read_all = |mut s: TcpStream| async move {
        let mut text = String::new();
        s.read_to_string(&mut text).await.expect("read");
        text
    };
    let mut first = TcpStream::connect(server).await.expect("first");
    let mut greeting = [0u8; 64];
    let n = first.read(&mut greeting).await.expect("greeting");
    assert!(greeting[..n].starts_with(b"220 "));
    let second = TcpStream::connect(server).await.expect("second");
    assert_eq!(read_all(second).await, "421 4.3.2 Too many connections, try again later\r\n");
    // The idle first connection is closed with 421 4.4.2.
    assert_eq!(
        read_all(first).await,
        "421 4.4.2 mx.local.test Timeout waiting for input, closing connection\r\n"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_stops_idle_sessions_and_lets_a_message_in_progress_finish() {
    let host = Arc::new(RecordingHost::default());
    let config = ListenerConfig::new(ListenerMode::Mx, "mx.local.test", None).expect("config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let server = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let runner = tokio::spawn(SmtpServer::new(config, host.clone()).run(listener, async {
        let _ = stopped.await;
    }));

    /// Reads until `n` CRLF-terminated lines have arrived.
    async fn lines(s: &mut TcpStream, n: usize) -> String {
        let mut text = Vec::new();
        let mut buf = [0u8; 1024];
        while text.iter().filter(|&&b| b == b'\n').count() < n {
            let got = s.read(&mut buf).await.expect("read");
            assert!(got > 0, "closed early after {:?}", String::from_utf8_lossy(&text));
            text.extend_from_slice(&buf[..got]);
        }
        String::from_utf8_lossy(&text).into_owned()
    }
    let mut idle = TcpStream::connect(server).await.expect("idle client");
    lines(&mut idle, 1).await;
    let mut busy = TcpStream::connect(server).await.expect("busy client");
    lines(&mut busy, 1).await;
    busy.write_all(
        b"HELO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@local.test>\r\nDATA\r\nSubject: s\r\n\r\nhalf",
    )
    .await
    .expect("write");
    assert!(lines(&mut busy, 4).await.ends_with("354 Start mail input; end with <CRLF>.<CRLF>\r\n"));

    stop.send(()).expect("stop");
    runner.await.expect("runner").expect("run");
    let mut rest = String::new();
    idle.read_to_string(&mut rest).await.expect("read");
    assert_eq!(rest, "421 4.3.2 mx.local.test Service shutting down, closing connection\r\n");
    busy.write_all(b" a message\r\n.\r\n").await.expect("finish");
    let mut rest = String::new();
    busy.read_to_string(&mut rest).await.expect("read");
    assert_eq!(
        rest,
        "250 2.0.0 Message accepted, queued as Q1\r\n421 4.3.2 mx.local.test Service shutting down, closing connection\r\n"
    );
    assert_eq!(host.delivered()[0].body(), b"Subject: s\r\n\r\nhalf a message\r\n");
    assert!(TcpStream::connect(server).await.is_err(), "the listener is closed");
}

#[tokio::test(flavor = "multi_thread")]
async fn client_passes_dsn_requests_through_to_the_host() {
    use qutemail_smtp::{DsnNotify, DsnReturn, MailParams, OriginalRecipient, RcptParams, Recipient};
    let site = site().await;
    let config = ClientConfig::new("relay.test", site.pki.client_tls.clone());
    let mut client = SmtpClient::connect(site.mx, "localhost", &config).await.expect("connect");
    let dsn =
        MailParams { ret: Some(DsnReturn::Headers), envid: Some("Q42 +x".into()), ..MailParams::default() };
    let notify = DsnNotify { failure: true, ..DsnNotify::default() };
    let orcpt = OriginalRecipient { addr_type: "rfc822".into(), address: "old=bob@local.test".into() };
    let recipients = [Recipient {
        address: addr("bob@local.test"),
        params: RcptParams { notify: Some(notify), orcpt: Some(orcpt.clone()) },
    }];
    let report = client.send_with_dsn(&ReversePath::Null, &dsn, &recipients, b"x\r\n").await.expect("send");
    assert_eq!(report.recipients[0].outcome(), RecipientOutcome::Delivered);
    let envelope = site.host.delivered()[0].envelope.clone();
    assert_eq!(
        (envelope.params.ret, envelope.params.envid.as_deref()),
        (Some(DsnReturn::Headers), Some("Q42 +x"))
    );
    assert_eq!(envelope.recipients[0].params, RcptParams { notify: Some(notify), orcpt: Some(orcpt) });
    assert_eq!(envelope.session.tls.map(|t| t.version).as_deref(), Some("TLSv1.3"));
}
