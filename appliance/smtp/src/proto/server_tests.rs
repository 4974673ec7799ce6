//! State machine tests: every command, pipelining, each error reply, dot-unstuffing, size
//! limits, AUTH flows and the STARTTLS reset. A small host answers the session's questions
//! the way the gateway's policy would (local domain `local.test`, user alice/secret).

use super::*;
use crate::params::DsnReturn;

const MX: SessionPolicy = SessionPolicy {
    offer_starttls: true,
    offer_auth: false,
    auth_requires_tls: true,
    mail_requires_auth: false,
    mail_requires_tls: false,
};
const SUBMISSION: SessionPolicy = SessionPolicy {
    offer_starttls: true,
    offer_auth: true,
    auth_requires_tls: true,
    mail_requires_auth: true,
    mail_requires_tls: true,
};

fn tls() -> TlsInfo {
    TlsInfo { version: "TLSv1.3".into(), cipher: "TLS_AES_128_GCM_SHA256".into() }
}

#[derive(Default)]
struct Host {
    deliveries: Vec<(MailEnvelope, Vec<u8>)>,
    closed: bool,
    starttls: bool,
    auth_attempts: Vec<(AuthMechanism, Option<String>, String)>,
}

struct Conn {
    session: ServerSession,
    host: Host,
}

impl Conn {
    fn new(policy: SessionPolicy, tls_info: Option<TlsInfo>) -> (Self, String) {
        let mut config = SessionConfig::new("mx.local.test", policy);
        config.max_message_size = 1000;
        config.max_recipients = 3;
        config.max_errors = 10;
        let mut conn = Self { session: ServerSession::new(config, None, tls_info), host: Host::default() };
        let greeting = conn.run();
        (conn, greeting)
    }

    fn mx() -> Self {
        Self::new(MX, None).0
    }

    fn run(&mut self) -> String {
        let mut out = Vec::new();
        while let Some(action) = self.session.next_action() {
            match action {
                Action::Reply(r) => r.write_to(&mut out),
                Action::Close => self.host.closed = true,
                Action::StartTls => self.host.starttls = true,
                Action::Authenticate(c) => {
                    self.host.auth_attempts.push((c.mechanism, c.authzid.clone(), c.username.clone()));
                    let outcome = match (c.username.as_str(), c.password.as_str()) {
                        ("alice", "secret") => AuthOutcome::Accepted,
                        ("dbdown", _) => AuthOutcome::TemporaryFailure,
                        _ => AuthOutcome::Rejected,
                    };
                    self.session.auth_outcome(outcome).unwrap();
                }
                Action::CheckSender { from, .. } => {
                    let outcome = match from.address().map(Address::local_part) {
                        Some("blocked") => {
                            Err(Refusal::new(550, EnhancedCode::new(5, 7, 1), "Sender blocked"))
                        }
                        _ => Ok(()),
                    };
                    self.session.sender_outcome(outcome).unwrap();
                }
                Action::CheckRecipient { to, .. } => {
                    let outcome = match (to.local_part(), to.domain()) {
                        (_, d) if d != "local.test" => {
                            Err(Refusal::new(550, EnhancedCode::new(5, 7, 1), "Relaying denied"))
                        }
                        ("busy", _) => Err(Refusal::new(450, EnhancedCode::new(4, 2, 1), "Mailbox busy")),
                        ("nobody", _) => Err(Refusal::new(550, EnhancedCode::new(5, 1, 1), "No such user")),
                        _ => Ok(()),
                    };
                    self.session.recipient_outcome(outcome).unwrap();
                }
                Action::Deliver { envelope, message } => {
                    self.host.deliveries.push((envelope, message));
                    let id = format!("Q{}", self.host.deliveries.len());
                    self.session.delivery_outcome(Ok(DeliveryReceipt { id })).unwrap();
                }
            }
        }
        String::from_utf8(out).unwrap()
    }

    fn send(&mut self, input: &str) -> String {
        self.session.receive(input.as_bytes());
        self.run()
    }

    fn codes(&mut self, input: &str) -> Vec<String> {
        // The code and enhanced code: the line up to its second space.
        self.send(input)
            .lines()
            .map(|l| match l.find(' ').map(|first| (first, l[first + 1..].find(' '))) {
                Some((first, Some(second))) => l[..first + 1 + second].to_owned(),
                _ => l.to_owned(),
            })
            .collect()
    }

    /// The message body as delivered, without the Received: header.
    fn body(&self, i: usize) -> String {
        let message = String::from_utf8(self.host.deliveries[i].1.clone()).unwrap();
        let start = message.find("+0000\r\n").map(|p| p + 7).unwrap();
        message[start..].to_owned()
    }
}

#[test]
fn greeting_and_ehlo_advertise_the_extensions_of_the_mode() {
    let (mut mx, greeting) = Conn::new(MX, None);
    assert_eq!(greeting, "220 mx.local.test ESMTP QuteMail ready\r\n");
    let ehlo = mx.send("EHLO client.example\r\n");
    assert_eq!(
        ehlo,
        "250-mx.local.test greets client.example\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n\
         250-ENHANCEDSTATUSCODES\r\n250-DSN\r\n250-SMTPUTF8\r\n250-STARTTLS\r\n250 HELP\r\n"
    );
    // Submission before TLS: STARTTLS, but no AUTH (plaintext passwords never invited).
    let (mut sub, _) = Conn::new(SUBMISSION, None);
    let ehlo = sub.send("EHLO c\r\n");
    assert!(ehlo.contains("STARTTLS") && !ehlo.contains("AUTH"), "{ehlo}");
    // Implicit TLS: AUTH, no STARTTLS.
    let (mut sub, _) = Conn::new(SessionPolicy { offer_starttls: false, ..SUBMISSION }, Some(tls()));
    let ehlo = sub.send("EHLO c\r\n");
    assert!(!ehlo.contains("STARTTLS") && ehlo.contains("250-AUTH PLAIN LOGIN"), "{ehlo}");
    // HELO: one line, no extensions.
    assert_eq!(mx.send("HELO c\r\n"), "250 mx.local.test greets c\r\n");
    assert_eq!(mx.codes("EHLO\r\n"), ["501 5.5.4"]);
}

#[test]
fn a_transaction_delivers_unstuffed_data_with_a_received_header() {
    let mut c = Conn::mx();
    c.send("EHLO client.example\r\n");
    assert_eq!(
        c.send("MAIL FROM:<alice@remote.example>\r\n"),
        "250 2.1.0 Sender <alice@remote.example> OK\r\n"
    );
    assert_eq!(c.send("RCPT TO:<bob@local.test>\r\n"), "250 2.1.5 Recipient <bob@local.test> OK\r\n");
    assert_eq!(c.send("DATA\r\n"), "354 Start mail input; end with <CRLF>.<CRLF>\r\n");
    assert_eq!(
        c.send("Subject: hi\r\n\r\n..leading dot\r\n.\r\n"),
        "250 2.0.0 Message accepted, queued as Q1\r\n"
    );
    let (envelope, message) = &c.host.deliveries[0];
    assert_eq!(envelope.from.to_string(), "<alice@remote.example>");
    assert_eq!(envelope.recipients[0].address.to_string(), "bob@local.test");
    assert_eq!(envelope.session.helo.as_deref(), Some("client.example"));
    let message = String::from_utf8_lossy(message);
    assert!(message.starts_with("Received: from client.example\r\n\tby mx.local.test (QuteMail)\r\n\twith ESMTP\r\n\tfor <bob@local.test>;"), "{message}");
    assert_eq!(c.body(0), "Subject: hi\r\n\r\n.leading dot\r\n");
    // The transaction is over: a new MAIL is allowed, RCPT without it is not.
    assert_eq!(c.codes("RCPT TO:<bob@local.test>\r\n"), ["503 5.5.1"]);
}

#[test]
fn pipelined_commands_are_answered_in_order_in_one_flight() {
    let mut c = Conn::mx();
    let replies = c.codes(
        "EHLO c\r\nMAIL FROM:<> RET=HDRS ENVID=env+2B1\r\nRCPT TO:<a@local.test> NOTIFY=FAILURE,DELAY \
         ORCPT=rfc822;a+40old.example\r\nRCPT TO:<x@elsewhere.example>\r\nRCPT TO:<busy@local.test>\r\n\
         RCPT TO:<nobody@local.test>\r\nDATA\r\nbody\r\n.\r\nQUIT\r\n",
    );
    let tail: Vec<&str> = replies.iter().skip(9).map(String::as_str).collect();
    assert_eq!(
        tail,
        [
            "250 2.1.0",
            "250 2.1.5",
            "550 5.7.1",
            "450 4.2.1",
            "550 5.1.1",
            "354 Start",
            "250 2.0.0",
            "221 2.0.0"
        ]
    );
    assert!(c.host.closed);
    let (envelope, _) = &c.host.deliveries[0];
    assert_eq!(envelope.from, ReversePath::Null);
    assert_eq!(envelope.params.ret, Some(DsnReturn::Headers));
    assert_eq!(envelope.params.envid.as_deref(), Some("env+1"));
    assert_eq!(envelope.recipients.len(), 1);
    let params = &envelope.recipients[0].params;
    assert!(params.notify.is_some_and(|n| n.failure && n.delay && !n.success));
    assert_eq!(params.orcpt.as_ref().map(|o| o.address.as_str()), Some("a@old.example"));
}

#[test]
fn data_split_at_any_byte_boundary_gives_the_same_message() {
    let body = ".first\r\n\r\n.\r\n..\r\n...x\r\n.y\r\nend.\r\n";
    // Stuffed as a client would: every line starting with "." gets one more.
    let wire = format!(".{}.\r\n", body.replace("\r\n.", "\r\n.."));
    let mut expected = None;
    for split in 0..wire.len() {
        let mut c = Conn::mx();
        c.send("EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<r@local.test>\r\nDATA\r\n");
        c.send(&wire[..split]);
        assert!(c.host.deliveries.is_empty());
        assert_eq!(c.codes(&wire[split..]), ["250 2.0.0"], "split at {split}");
        let got = c.body(0);
        assert_eq!(expected.get_or_insert_with(|| got.clone()), &got);
    }
    assert_eq!(expected.unwrap(), body);
}

#[test]
fn only_crlf_dot_crlf_ends_data_and_bare_line_endings_are_refused() {
    let mut c = Conn::mx();
    c.send("EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<r@local.test>\r\nDATA\r\n");
    // SMTP smuggling: "\n.\n" and "\n.\r\n" must not end the message.
    assert_eq!(c.send("one\n.\nMAIL FROM:<evil@x.example>\r\ntwo\n.\r\nthree\r\n"), "");
    assert_eq!(c.codes(".\r\n"), ["554 5.6.0"]);
    assert!(c.host.deliveries.is_empty());
    // The session goes on normally.
    assert_eq!(c.codes("MAIL FROM:<a@b.example>\r\n"), ["250 2.1.0"]);
}

#[test]
fn size_limits_are_enforced_at_mail_and_while_data_arrives() {
    let mut c = Conn::mx();
    c.send("EHLO c\r\n");
    let reply = c.send("MAIL FROM:<a@b.example> SIZE=1001\r\n");
    assert_eq!(reply, "552 5.3.4 Message size 1001 exceeds fixed maximum message size of 1000 octets\r\n");
    assert_eq!(
        c.codes("MAIL FROM:<a@b.example> SIZE=1000\r\nRCPT TO:<r@local.test>\r\nDATA\r\n")[2],
        "354 Start"
    );
    let line = format!("{}\r\n", "x".repeat(98));
    for _ in 0..30 {
        assert_eq!(c.send(&line), "");
        // Never more stored than the limit (plus the Received: header).
        if let Phase::Data(receiver) = &c.session.phase {
            assert!(receiver.message.len() < 1000 + 400);
        }
    }
    assert_eq!(
        c.send(".\r\n"),
        "552 5.3.4 Message size exceeds fixed maximum message size of 1000 octets\r\n"
    );
    assert!(c.host.deliveries.is_empty());
    // Exactly at the limit is accepted.
    c.send("MAIL FROM:<a@b.example>\r\nRCPT TO:<r@local.test>\r\nDATA\r\n");
    assert_eq!(c.codes(&format!("{}.\r\n", line.repeat(10))), ["250 2.0.0"]);
}

#[test]
fn recipient_limit_answers_452_and_keeps_the_accepted_ones() {
    let mut c = Conn::mx();
    c.send("EHLO c\r\nMAIL FROM:<a@b.example>\r\n");
    let replies = c.codes(
        "RCPT TO:<r1@local.test>\r\nRCPT TO:<r2@local.test>\r\nRCPT TO:<r3@local.test>\r\nRCPT TO:<r4@local.test>\r\n",
    );
    assert_eq!(replies, ["250 2.1.5", "250 2.1.5", "250 2.1.5", "452 4.5.3"]);
    c.send("DATA\r\nx\r\n.\r\n");
    assert_eq!(c.host.deliveries[0].0.recipients.len(), 3);
}

#[test]
fn every_sequence_and_syntax_error_has_its_code() {
    let mut c = Conn::mx();
    let cases = [
        ("MAIL FROM:<a@b.example>\r\n", "503 5.5.1"),
        ("EHLO c\r\n", "250-mx.local.test greets"),
        ("RCPT TO:<r@local.test>\r\n", "503 5.5.1"),
        ("DATA\r\n", "503 5.5.1"),
        ("FOO\r\n", "500 5.5.2"),
        ("MAIL TO:<a@b.example>\r\n", "501 5.5.2"),
    ];
    for (input, code) in cases {
        assert_eq!(c.codes(input)[0], code, "{input}");
    }
    let mut c = Conn::mx();
    c.send("EHLO c\r\n");
    let cases = [
        ("MAIL FROM:a@b.example\r\n", "501 5.1.7"),
        ("MAIL FROM:<a@b.example> XFOO=1\r\n", "555 5.5.4"),
        ("MAIL FROM:<a@b.example> BODY=BINARYMIME\r\n", "501 5.5.4"),
        ("MAIL FROM:<jörg@b.example>\r\n", "553 5.6.7"),
        ("MAIL FROM:<blocked@b.example>\r\n", "550 5.7.1"),
        ("MAIL FROM:<a@b.example> BODY=8BITMIME\r\n", "250 2.1.0"),
        ("MAIL FROM:<c@b.example>\r\n", "503 5.5.1"),
        ("RCPT TO:<>\r\n", "501 5.1.3"),
        ("RCPT TO:<r@local.test> NOTIFY=SOMETIMES\r\n", "501 5.5.4"),
        ("DATA\r\n", "554 5.5.1"),
        ("DATA now\r\n", "501 5.5.4"),
    ];
    let mut c = Conn {
        session: ServerSession::new(SessionConfig::new("mx.local.test", MX), None, None),
        host: Host::default(),
    };
    c.run();
    c.send("EHLO c\r\n");
    for (input, code) in cases {
        assert_eq!(c.codes(input)[0], code, "{input}");
    }
    // Non-ASCII is fine with SMTPUTF8.
    c.send("RSET\r\n");
    assert_eq!(c.codes("MAIL FROM:<jörg@b.example> SMTPUTF8\r\n"), ["250 2.1.0"]);
    assert_eq!(c.codes("RCPT TO:<jörg@local.test>\r\n"), ["250 2.1.5"]);
    // Parameters need EHLO.
    c.send("HELO c\r\n");
    assert_eq!(c.codes("MAIL FROM:<a@b.example> SIZE=10\r\n"), ["555 5.5.4"]);
    assert_eq!(c.codes("RCPT TO:<Postmaster>\r\n"), ["503 5.5.1"]);
    c.send("MAIL FROM:<a@b.example>\r\n");
    assert_eq!(c.send("RCPT TO:<Postmaster>\r\n"), "550 5.7.1 Relaying denied\r\n");
}

#[test]
fn simple_commands_answer_as_rfc_5321_says() {
    let mut c = Conn::mx();
    c.send("EHLO c\r\nMAIL FROM:<a@b.example>\r\n");
    assert_eq!(c.send("RSET\r\n"), "250 2.0.0 Reset OK\r\n");
    assert_eq!(c.codes("RCPT TO:<r@local.test>\r\n"), ["503 5.5.1"]);
    assert_eq!(c.send("noop\r\n"), "250 2.0.0 OK\r\n");
    assert_eq!(c.codes("VRFY bob\r\n"), ["252 2.5.0"]);
    assert_eq!(c.codes("EXPN list\r\n"), ["502 5.5.1"]);
    assert_eq!(c.codes("HELP\r\n"), ["214-2.0.0 Commands:", "214 2.0.0"]);
    assert!(!c.host.closed);
    assert_eq!(c.send("QUIT\r\n"), "221 2.0.0 mx.local.test Service closing transmission channel\r\n");
    assert!(c.host.closed && c.session.is_closed());
    // Nothing is processed after QUIT.
    assert_eq!(c.send("NOOP\r\n"), "");
}

#[test]
fn too_many_errors_close_the_connection_with_421() {
    let mut c = Conn::mx();
    let replies = c.codes(&"BAD\r\n".repeat(10));
    assert_eq!(replies.len(), 11);
    assert!(replies[..10].iter().all(|r| r == "500 5.5.2"));
    assert_eq!(replies[10], "421 4.7.0");
    assert_eq!(c.send("NOOP\r\n"), "");
    assert!(c.host.closed);
}

#[test]
fn over_long_lines_are_refused_without_buffering_them() {
    let mut c = Conn::mx();
    let long = "x".repeat(MAX_COMMAND_LINE + 10);
    for chunk in long.as_bytes().chunks(500) {
        c.session.receive(chunk);
        assert!(c.session.input.len() <= MAX_COMMAND_LINE + 500);
    }
    assert_eq!(c.codes("\r\nNOOP\r\n"), ["500 5.5.2", "250 2.0.0"]);
    // A long but legal MAIL line (ORCPT/ENVID) is accepted up to the bound.
    c.send("EHLO c\r\n");
    let envid = "e".repeat(100);
    assert_eq!(
        c.codes(&format!("MAIL FROM:<a@b.example> ENVID={envid} SIZE=10 RET=FULL\r\n")),
        ["250 2.1.0"]
    );
}

#[test]
fn submission_requires_tls_then_auth_before_mail() {
    let (mut c, _) = Conn::new(SUBMISSION, None);
    c.send("EHLO c\r\n");
    assert_eq!(c.codes("AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n"), ["538 5.7.11"]);
    assert!(c.host.auth_attempts.is_empty());
    assert_eq!(
        c.send("MAIL FROM:<alice@local.test>\r\n"),
        "530 5.7.0 Must issue a STARTTLS command first\r\n"
    );
    assert_eq!(c.send("STARTTLS\r\n"), "220 2.0.0 Ready to start TLS\r\n");
    assert!(c.host.starttls && !c.session.wants_input());
    c.session.tls_established(tls()).unwrap();
    // Everything learnt before TLS is forgotten: EHLO again.
    assert_eq!(c.codes("MAIL FROM:<alice@local.test>\r\n"), ["503 5.5.1"]);
    let ehlo = c.send("EHLO c\r\n");
    assert!(ehlo.contains("250-AUTH PLAIN LOGIN") && !ehlo.contains("STARTTLS"), "{ehlo}");
    assert_eq!(c.send("MAIL FROM:<alice@local.test>\r\n"), "530 5.7.0 Authentication required\r\n");
    assert_eq!(c.codes("STARTTLS\r\n"), ["503 5.5.1"]);
    // alice\0alice\0secret with an authzid equal to the user: no authzid passed on.
    assert_eq!(c.send("AUTH PLAIN YWxpY2UAYWxpY2UAc2VjcmV0\r\n"), "235 2.7.0 Authentication successful\r\n");
    assert_eq!(c.host.auth_attempts, [(AuthMechanism::Plain, None, "alice".to_owned())]);
    assert_eq!(c.session.info().authenticated_as.as_deref(), Some("alice"));
    assert!(!c.send("EHLO c\r\n").contains("AUTH"));
    assert_eq!(c.codes("AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n"), ["503 5.5.1"]);
    c.send("MAIL FROM:<alice@local.test>\r\nRCPT TO:<bob@local.test>\r\nDATA\r\nhi\r\n.\r\n");
    let message = String::from_utf8_lossy(&c.host.deliveries[0].1).into_owned();
    assert!(message.contains("with ESMTPSA (TLSv1.3 cipher TLS_AES_128_GCM_SHA256)"), "{message}");
    assert!(message.contains("(authenticated user alice)"), "{message}");
}

fn authed_ready() -> Conn {
    let (mut c, _) = Conn::new(SessionPolicy { offer_starttls: false, ..SUBMISSION }, Some(tls()));
    c.send("EHLO c\r\n");
    c
}

#[test]
fn auth_plain_and_login_in_all_their_forms() {
    let mut c = authed_ready();
    // PLAIN without initial response: empty 334 challenge.
    assert_eq!(c.send("AUTH PLAIN\r\n"), "334 \r\n");
    assert_eq!(c.codes("AGFsaWNlAHNlY3JldA==\r\n"), ["235 2.7.0"]);

    let mut c = authed_ready();
    assert_eq!(c.send("AUTH LOGIN\r\n"), "334 VXNlcm5hbWU6\r\n");
    assert_eq!(c.send("YWxpY2U=\r\n"), "334 UGFzc3dvcmQ6\r\n");
    assert_eq!(c.codes("c2VjcmV0\r\n"), ["235 2.7.0"]);
    assert_eq!(c.host.auth_attempts[0].0, AuthMechanism::Login);

    // LOGIN with the user name as initial response.
    let mut c = authed_ready();
    assert_eq!(c.send("AUTH LOGIN YWxpY2U=\r\n"), "334 UGFzc3dvcmQ6\r\n");
    assert_eq!(c.codes("d3Jvbmc=\r\n"), ["535 5.7.8"]);
    assert_eq!(c.session.info().authenticated_as, None);

    // Cancel, bad base64, malformed PLAIN, unknown mechanism, temporary failure, authzid.
    let mut c = authed_ready();
    assert_eq!(c.codes("AUTH PLAIN\r\n*\r\n"), ["334 ", "501 5.0.0"]);
    assert_eq!(c.codes("AUTH LOGIN\r\n*\r\n"), ["334 VXNlcm5hbWU6", "501 5.0.0"]);
    assert_eq!(c.codes("AUTH PLAIN !!!\r\n"), ["501 5.5.2"]);
    let mut c = authed_ready();
    assert_eq!(c.codes("AUTH PLAIN YWxpY2U=\r\n"), ["501 5.5.2"]);
    assert_eq!(c.codes("AUTH CRAM-MD5\r\n"), ["504 5.5.4"]);
    let mut c = authed_ready();
    assert_eq!(c.codes("AUTH PLAIN AGRiZG93bgB4\r\n"), ["454 4.7.0"]);
    assert_eq!(c.codes("AUTH PLAIN Ym9zcwBhbGljZQBzZWNyZXQ=\r\n"), ["235 2.7.0"]);
    assert_eq!(c.host.auth_attempts[1].1.as_deref(), Some("boss"));
}

#[test]
fn credentials_never_show_the_password() {
    let credentials = Credentials {
        mechanism: AuthMechanism::Plain,
        authzid: None,
        username: "alice".into(),
        password: Zeroizing::new("hunter2".into()),
    };
    let printed = format!("{credentials:?}");
    assert!(printed.contains("alice") && !printed.contains("hunter2"), "{printed}");
}

#[test]
fn mx_refuses_auth_and_commands_pipelined_after_starttls() {
    let mut c = Conn::mx();
    c.send("EHLO c\r\n");
    assert_eq!(c.codes("AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n"), ["502 5.5.1"]);
    assert_eq!(c.codes("STARTTLS now\r\n"), ["501 5.5.4"]);
    let reply = c.send("STARTTLS\r\nMAIL FROM:<injected@evil.example>\r\n");
    assert_eq!(reply, "554 5.5.1 Commands pipelined after STARTTLS are refused, closing connection\r\n");
    assert!(c.host.closed && !c.host.starttls);
}

#[test]
fn timeouts_and_shutdown_close_with_421() {
    let mut c = Conn::mx();
    c.session.timed_out();
    assert_eq!(c.codes(""), ["421 4.4.2"]);
    assert!(c.host.closed);
    let mut c = Conn::mx();
    c.session.shutting_down();
    assert_eq!(c.codes(""), ["421 4.3.2"]);
}

#[test]
fn host_answers_are_checked() {
    let (mut c, _) = Conn::new(MX, None);
    assert_eq!(
        c.session.sender_outcome(Ok(())),
        Err(UnexpectedAnswer { answer: "a sender verdict", state: "reading commands" })
    );
    assert!(c.session.tls_established(tls()).is_err());
    // A "refusal" with a success code must not tell the client it succeeded.
    c.session.receive(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n");
    while let Some(action) = c.session.next_action() {
        if let Action::CheckSender { .. } = action {
            assert!(c.session.auth_outcome(AuthOutcome::Accepted).is_err());
            c.session.sender_outcome(Err(Refusal::new(250, EnhancedCode::new(2, 0, 0), "fine?"))).unwrap();
        }
    }
    assert_eq!(c.codes(""), Vec::<String>::new());
    let mut out = Vec::new();
    // The refusal reply was queued before we drained: check what the session stored.
    c.session.receive(b"RCPT TO:<a@local.test>\r\n");
    while let Some(Action::Reply(r)) = c.session.next_action() {
        r.write_to(&mut out);
    }
    assert_eq!(String::from_utf8(out).unwrap(), "503 5.5.1 Need MAIL before RCPT\r\n");
}

#[test]
fn arbitrary_input_never_panics_and_stays_bounded() {
    // A deterministic xorshift generator: splices of real commands and random bytes.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let pieces: [&[u8]; 14] = [
        b"EHLO x\r\n",
        b"MAIL FROM:<a@b.c>\r\n",
        b"RCPT TO:<r@local.test>\r\n",
        b"DATA\r\n",
        b".\r\n",
        b"\r\n.\r\n",
        b"AUTH PLAIN\r\n",
        b"AUTH LOGIN\r\n",
        b"STARTTLS\r\n",
        b"RSET\r\n",
        b"\n",
        b"\r",
        b"..",
        b"\x00\xff\xfe",
    ];
    for _ in 0..400 {
        let (mut c, _) = Conn::new(if next() % 2 == 0 { MX } else { SUBMISSION }, None);
        for _ in 0..200 {
            let mut input = Vec::new();
            if next() % 3 == 0 {
                input.extend((0..next() % 64).map(|_| next() as u8));
            } else {
                input.extend_from_slice(pieces[(next() % pieces.len() as u64) as usize]);
            }
            c.session.receive(&input);
            let _ = c.run();
            if c.host.starttls {
                c.host.starttls = false;
                c.session.tls_established(tls()).unwrap();
            }
            assert!(c.session.input.len() <= MAX_AUTH_LINE + 64);
        }
    }
}
