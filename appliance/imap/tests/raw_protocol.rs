//! The protocol at the byte level over real sockets. Clients that misbehave: unknown commands,
//! commands before login, broken and oversized literals, a client vanishing in the middle of a
//! literal, repeated failed logins; the server answers each as RFC 3501 says and keeps serving
//! everyone else. And the extensions no scripted client here exercises: CONDSTORE, UID EXPUNGE,
//! NAMESPACE, ID, ENABLE, AUTHENTICATE PLAIN.

mod common;

use std::sync::Arc;

use common::{
    ALICE, ALICE_PASSWORD, BOB, BOB_PASSWORD, LOGIN_THROTTLE, MAX_MESSAGE, Site, TOKEN, message, runtime,
};
use qutemail_hsm::testing::isolated;
use qutemail_store::Backend;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};

/// A line-level IMAP client over any stream.
struct Raw<S> {
    io: BufReader<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Raw<S> {
    async fn line(&mut self) -> String {
        let mut line = String::new();
        let n = tokio::time::timeout(std::time::Duration::from_secs(20), self.io.read_line(&mut line))
            .await
            .expect("the server answers")
            .expect("read");
        assert!(n > 0, "the server closed the connection");
        line
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.io.get_mut().write_all(bytes).await.expect("write");
        self.io.get_mut().flush().await.expect("flush");
    }

    /// Sends a command; returns every line up to and including the tagged one.
    async fn cmd(&mut self, tag: &str, text: &str) -> Vec<String> {
        self.send(format!("{tag} {text}\r\n").as_bytes()).await;
        self.until(tag).await
    }

    async fn until(&mut self, tag: &str) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let l = self.line().await;
            let done = l.starts_with(&format!("{tag} "));
            lines.push(l);
            if done {
                return lines;
            }
        }
    }

    /// Whether the server has closed the connection (reads EOF, skipping a BYE).
    async fn closed(&mut self) -> bool {
        let mut line = String::new();
        loop {
            line.clear();
            match tokio::time::timeout(std::time::Duration::from_secs(20), self.io.read_line(&mut line)).await
            {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }
}

async fn plain(site: &Site) -> Raw<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(site.plain).await.expect("connect");
    let mut raw = Raw { io: BufReader::new(tcp) };
    assert!(raw.line().await.starts_with("* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED"));
    raw
}

async fn tls(site: &Site) -> Raw<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(site.tls).await.expect("connect");
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(&site.client_tls));
    let name = ServerName::try_from("127.0.0.1").expect("name");
    let stream = connector.connect(name, tcp).await.expect("TLS");
    let mut raw = Raw { io: BufReader::new(stream) };
    assert!(raw.line().await.starts_with("* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN"));
    raw
}

fn last(lines: &[String]) -> &str {
    lines.last().map(String::as_str).unwrap_or("")
}

#[test]
fn unknown_commands_commands_before_login_and_broken_literals_are_answered_not_fatal() {
    isolated(
        "unknown_commands_commands_before_login_and_broken_literals_are_answered_not_fatal",
        &[TOKEN],
        |env| {
            runtime().block_on(async {
                let site = Site::start(env, Backend::Sqlite).await;
                let mut c = plain(&site).await;
                assert!(last(&c.cmd("a1", "FROBNICATE now").await).starts_with("a1 BAD unknown command"));
                assert!(last(&c.cmd("a2", "SELECT INBOX").await).starts_with("a2 BAD Log in first"));
                assert!(last(&c.cmd("a3", "FETCH 1 BODY[]").await).starts_with("a3 BAD Log in first"));
                let before_tls = c.cmd("a4", &format!("LOGIN {ALICE} \"{ALICE_PASSWORD}\"")).await;
                assert!(last(&before_tls).starts_with("a4 NO [PRIVACYREQUIRED]"), "{before_tls:?}");
                assert!(
                    last(&c.cmd("a5", "AUTHENTICATE PLAIN AGFsaWNlAHg=").await)
                        .starts_with("a5 NO [PRIVACYREQUIRED]")
                );
                // Garbage without a tag, and a line of nothing.
                c.send(b"(((\r\n").await;
                assert!(c.line().await.starts_with("* BAD"));
                // A literal shorter than the data that follows: the rest of the line is junk.
                c.send(b"a6 LOGIN {3}\r\n").await;
                assert!(c.line().await.starts_with("+ "));
                c.send(b"abcdef x\r\n").await;
                assert!(c.line().await.starts_with("a6 BAD"));
                // Before login a literal over 8 KiB is refused before the client sends it.
                c.send(b"a0 LOGIN {9000}\r\n").await;
                assert!(c.line().await.starts_with("a0 NO [TOOBIG]"));
                let big = MAX_MESSAGE + 1;
                c.send(format!("a7 APPEND INBOX {{{big}}}\r\n").as_bytes()).await;
                let refusal = c.line().await;
                assert!(refusal.starts_with("a7 NO [TOOBIG]"), "{refusal}");
                assert!(
                    last(&c.cmd("a8", "NOOP").await).starts_with("a8 OK"),
                    "still in sync after the refusal"
                );
                assert!(last(&c.cmd("a9", "CAPABILITY").await).starts_with("a9 OK"));
                // A non-synchronising literal over the limit cannot be skipped: BYE and close.
                c.send(format!("b1 APPEND INBOX {{{big}+}}\r\n").as_bytes()).await;
                assert!(c.line().await.starts_with("* BYE [TOOBIG]"));
                assert!(c.closed().await);

                // After login: a selected-state command without a selected mailbox.
                let mut t = tls(&site).await;
                assert!(
                    last(&t.cmd("c1", &format!("LOGIN {ALICE} \"{ALICE_PASSWORD}\"")).await)
                        .starts_with("c1 OK")
                );
                assert!(last(&t.cmd("c2", "FETCH 1 FLAGS").await).starts_with("c2 BAD No mailbox selected"));
                assert!(
                    last(&t.cmd("c3", "LOGIN again please").await)
                        .starts_with("c3 BAD Already authenticated")
                );
                assert!(last(&t.cmd("c4", "SELECT Nowhere").await).starts_with("c4 NO [NONEXISTENT]"));
                assert!(last(&t.cmd("c5", "SELECT INBOX").await).starts_with("c5 OK [READ-WRITE]"));
                assert!(last(&t.cmd("c6", "FETCH 1:* (BODY[99.TEXT])").await).starts_with("c6 OK"));
                assert!(last(&t.cmd("c7", "STORE 1 +FLAGS (\\Bogus)").await).starts_with("c7 BAD"));
                assert!(last(&t.cmd("c8", "SEARCH CHARSET KOI8-R TEXT x").await).contains("BADCHARSET"));
                // After login the limit is the configured message size, not the pre-login one.
                t.send(format!("e1 APPEND INBOX {{{}}}\r\n", MAX_MESSAGE + 1).as_bytes()).await;
                assert!(t.line().await.starts_with("e1 NO [TOOBIG]"));
                t.send(b"e2 APPEND INBOX {20000}\r\n").await;
                assert!(t.line().await.starts_with("+ "), "a 20,000-byte message is fine after login");
                let msg = format!("Subject: big\r\n\r\n{}", "y".repeat(20000 - 16));
                t.send(format!("{msg}\r\n").as_bytes()).await;
                assert!(last(&t.until("e2").await).starts_with("e2 OK [APPENDUID "));
                // A command line beyond 64 KiB ends the connection.
                let long = format!("c9 NOOP {}\r\n", "x".repeat(70 * 1024));
                t.send(long.as_bytes()).await;
                assert!(t.closed().await);
                // The server still serves others.
                let mut again = tls(&site).await;
                assert!(last(&again.cmd("d1", "NOOP").await).starts_with("d1 OK"));
            })
        },
    );
}

#[test]
fn a_client_vanishing_mid_literal_stores_nothing_and_the_server_keeps_serving() {
    isolated("a_client_vanishing_mid_literal_stores_nothing_and_the_server_keeps_serving", &[TOKEN], |env| {
        runtime().block_on(async {
            let site = Site::start(env, Backend::Sqlite).await;
            for round in 0..5 {
                let mut c = tls(&site).await;
                assert!(
                    last(&c.cmd("a1", &format!("LOGIN {ALICE} \"{ALICE_PASSWORD}\"")).await)
                        .starts_with("a1 OK")
                );
                c.send(b"a2 APPEND INBOX {5000}\r\n").await;
                assert!(c.line().await.starts_with("+ "));
                c.send(format!("Subject: cut off {round}\r\n\r\npartial").as_bytes()).await;
                drop(c);
            }
            let mut c = tls(&site).await;
            assert!(
                last(&c.cmd("b1", &format!("LOGIN {ALICE} \"{ALICE_PASSWORD}\"")).await).starts_with("b1 OK")
            );
            let status = c.cmd("b2", "STATUS INBOX (MESSAGES)").await;
            assert_eq!(status[0], "* STATUS \"INBOX\" (MESSAGES 0)\r\n");
            // A complete APPEND with a non-synchronising literal works.
            let msg = "Subject: whole\r\n\r\nall of it\r\n";
            c.send(format!("b3 APPEND INBOX {{{}+}}\r\n{msg}\r\n", msg.len()).as_bytes()).await;
            assert!(last(&c.until("b3").await).starts_with("b3 OK [APPENDUID "));
            let status = c.cmd("b4", "STATUS INBOX (MESSAGES)").await;
            assert_eq!(status[0], "* STATUS \"INBOX\" (MESSAGES 1)\r\n");
        })
    });
}

/// A TLS client connecting from `source` (any 127.0.0.0/8 address: a second client address).
async fn tls_from(site: &Site, source: &str) -> Raw<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind(format!("{source}:0").parse().expect("address")).expect("bind the client address");
    let tcp = socket.connect(site.tls).await.expect("connect");
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(&site.client_tls));
    let name = ServerName::try_from("127.0.0.1").expect("name");
    let stream = connector.connect(name, tcp).await.expect("TLS");
    let mut raw = Raw { io: BufReader::new(stream) };
    assert!(raw.line().await.starts_with("* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN"));
    raw
}

#[test]
fn failed_logins_are_delayed_per_account_and_an_address_refused_only_beyond_its_cap() {
    isolated(
        "failed_logins_are_delayed_per_account_and_an_address_refused_only_beyond_its_cap",
        &[TOKEN],
        |env| {
            runtime().block_on(async {
                let site = Site::start(env, Backend::Sqlite).await;
                // An attacker at 127.0.0.1 guesses Alice's password.
                let mut attacker = tls_from(&site, "127.0.0.1").await;
                for i in 0..LOGIN_THROTTLE.free_failures {
                    let r = attacker.cmd(&format!("f{i}"), &format!("LOGIN {ALICE} wrong-password")).await;
                    assert!(last(&r).contains("NO [AUTHENTICATIONFAILED]"), "{r:?}");
                }
                // Alice herself, from another address, is slowed down but not locked out.
                let mut alice = tls_from(&site, "127.0.0.2").await;
                let started = std::time::Instant::now();
                let r = alice.cmd("a1", &format!("LOGIN {ALICE} \"{ALICE_PASSWORD}\"")).await;
                assert!(last(&r).starts_with("a1 OK"), "{r:?}");
                assert!(
                    started.elapsed() >= LOGIN_THROTTLE.first_delay,
                    "the login waited for the account's delay"
                );
                // The attacker goes on with other accounts: each failure is answered (after its
                // delay) until the address has used up its cap ...
                for i in LOGIN_THROTTLE.free_failures..LOGIN_THROTTLE.refuse_address_after {
                    let r = attacker.cmd(&format!("f{i}"), &format!("LOGIN {BOB} wrong-password")).await;
                    assert!(last(&r).contains("NO [AUTHENTICATIONFAILED]"), "{r:?}");
                }
                // ... then that address is refused without checking, even with the right password,
                let r = attacker.cmd("g1", &format!("LOGIN {ALICE} \"{ALICE_PASSWORD}\"")).await;
                assert!(
                    last(&r).starts_with("g1 NO [UNAVAILABLE] Too many failed logins from your address"),
                    "{r:?}"
                );
                // and AUTHENTICATE PLAIN is held to the same limit.
                use base64::Engine as _;
                let plain =
                    base64::engine::general_purpose::STANDARD.encode(format!("\0{ALICE}\0{ALICE_PASSWORD}"));
                let r = attacker.cmd("g2", &format!("AUTHENTICATE PLAIN {plain}")).await;
                assert!(last(&r).starts_with("g2 NO [UNAVAILABLE]"), "{r:?}");
                // The right users from another address still get in.
                let mut bob = tls_from(&site, "127.0.0.3").await;
                let r = bob.cmd("b1", &format!("LOGIN {BOB} \"{BOB_PASSWORD}\"")).await;
                assert!(last(&r).starts_with("b1 OK"), "{r:?}");
                let mut alice = tls_from(&site, "127.0.0.2").await;
                let r = alice.cmd("a2", &format!("AUTHENTICATE PLAIN {plain}")).await;
                assert!(last(&r).starts_with("a2 OK"), "{r:?}");
            })
        },
    );
}

#[test]
fn authenticate_plain_with_and_without_initial_response() {
    isolated("authenticate_plain_with_and_without_initial_response", &[TOKEN], |env| {
        runtime().block_on(async {
            use base64::Engine as _;
            let site = Site::start(env, Backend::Sqlite).await;
            let plain =
                base64::engine::general_purpose::STANDARD.encode(format!("\0{ALICE}\0{ALICE_PASSWORD}"));
            let mut c = tls(&site).await;
            c.send(b"p1 AUTHENTICATE PLAIN\r\n").await;
            assert_eq!(c.line().await, "+ \r\n");
            c.send(format!("{plain}\r\n").as_bytes()).await;
            let r = c.until("p1").await;
            assert!(last(&r).starts_with("p1 OK [CAPABILITY IMAP4rev1 LITERAL+"), "{r:?}");
            let mut d = tls(&site).await;
            let r = d.cmd("p2", &format!("AUTHENTICATE PLAIN {plain}")).await;
            assert!(last(&r).starts_with("p2 OK"), "{r:?}");
            let other =
                base64::engine::general_purpose::STANDARD.encode(format!("{BOB}\0{ALICE}\0{ALICE_PASSWORD}"));
            let mut e = tls(&site).await;
            assert!(
                last(&e.cmd("p3", &format!("AUTHENTICATE PLAIN {other}")).await)
                    .starts_with("p3 NO [AUTHORIZATIONFAILED]")
            );
            assert!(last(&e.cmd("p4", "AUTHENTICATE PLAIN ***").await).starts_with("p4 BAD"));
        })
    });
}

fn modseq_of(line: &str) -> u64 {
    let at = line.find("MODSEQ (").expect("MODSEQ") + 8;
    line[at..].split(')').next().expect("number").parse().expect("number")
}

#[test]
fn condstore_uid_expunge_namespace_id_and_enable() {
    isolated("condstore_uid_expunge_namespace_id_and_enable", &[TOKEN], |env| {
        runtime().block_on(async {
            let site = Site::start(env, Backend::Sqlite).await;
            let uid1 = site.deliver(&site.alice, "INBOX", &message("one", "1")).await;
            let uid2 = site.deliver(&site.alice, "INBOX", &message("two", "2")).await;
            let mut c = tls(&site).await;
            assert!(
                last(&c.cmd("a", &format!("LOGIN {ALICE} \"{ALICE_PASSWORD}\"")).await).starts_with("a OK")
            );
            let ns = c.cmd("b", "NAMESPACE").await;
            assert_eq!(ns[0], "* NAMESPACE ((\"\" \"/\")) NIL NIL\r\n");
            assert!(
                c.cmd("b2", "ID (\"name\" \"test\")").await[0].starts_with("* ID (\"name\" \"QuteMail\")")
            );
            assert_eq!(c.cmd("b3", "ENABLE CONDSTORE").await[0], "* ENABLED CONDSTORE\r\n");

            let select = c.cmd("c1", "SELECT INBOX (CONDSTORE)").await;
            let highest: u64 = select
                .iter()
                .find_map(|l| l.strip_prefix("* OK [HIGHESTMODSEQ "))
                .and_then(|r| r.split(']').next())
                .expect("HIGHESTMODSEQ")
                .parse()
                .expect("number");
            assert!(last(&select).starts_with("c1 OK [READ-WRITE]"));
            let fetch = c.cmd("c2", "FETCH 1:* (UID FLAGS MODSEQ)").await;
            assert_eq!(fetch.len(), 3, "{fetch:?}");
            assert!(fetch.iter().take(2).all(|l| modseq_of(l) <= highest));

            // A flag change gets a new MODSEQ, shown in the STORE answer.
            let store = c.cmd("c3", "STORE 1 +FLAGS (\\Seen)").await;
            assert!(store[0].starts_with("* 1 FETCH (FLAGS (\\Seen) MODSEQ ("), "{store:?}");
            let after = modseq_of(&store[0]);
            assert!(after > highest);
            // CHANGEDSINCE returns only what changed.
            let changed = c.cmd("c4", &format!("UID FETCH 1:* (FLAGS) (CHANGEDSINCE {highest})")).await;
            assert_eq!(changed.len(), 2, "{changed:?}");
            assert!(
                changed[0].starts_with(&format!("* 1 FETCH (UID {uid1} FLAGS (\\Seen) MODSEQ ({after}))"))
            );
            // UNCHANGEDSINCE: message 1 changed since `highest`, so it is left alone (MODIFIED).
            let cond = c.cmd("c5", &format!("STORE 1,2 (UNCHANGEDSINCE {highest}) +FLAGS (\\Flagged)")).await;
            assert!(last(&cond).starts_with("c5 OK [MODIFIED 1]"), "{cond:?}");
            assert!(cond.iter().any(|l| l.starts_with("* 2 FETCH (FLAGS (\\Flagged) MODSEQ (")), "{cond:?}");
            let status = c.cmd("c6", "STATUS INBOX (HIGHESTMODSEQ MESSAGES)").await;
            assert!(status[0].contains(&format!("HIGHESTMODSEQ {}", after + 1)), "{status:?}");
            let search = c.cmd("c7", &format!("SEARCH MODSEQ {}", after + 1)).await;
            assert_eq!(search[0], format!("* SEARCH 2 (MODSEQ {})\r\n", after + 1));

            // UID EXPUNGE removes only the named \\Deleted messages.
            c.cmd("d1", "STORE 1:2 +FLAGS.SILENT (\\Deleted)").await;
            let expunge = c.cmd("d2", &format!("UID EXPUNGE {uid2}")).await;
            assert_eq!(expunge[0], "* 2 EXPUNGE\r\n");
            assert!(last(&expunge).starts_with("d2 OK"));
            let status = c.cmd("d3", "STATUS INBOX (MESSAGES)").await;
            assert_eq!(status[0], "* STATUS \"INBOX\" (MESSAGES 1)\r\n");
            // UNSELECT leaves \\Deleted messages; CLOSE would expunge them.
            assert!(last(&c.cmd("d4", "UNSELECT").await).starts_with("d4 OK"));
            let status = c.cmd("d5", "STATUS INBOX (MESSAGES)").await;
            assert_eq!(status[0], "* STATUS \"INBOX\" (MESSAGES 1)\r\n");
            c.cmd("d6", "SELECT INBOX").await;
            assert!(last(&c.cmd("d7", "CLOSE").await).starts_with("d7 OK"));
            let status = c.cmd("d8", "STATUS INBOX (MESSAGES)").await;
            assert_eq!(status[0], "* STATUS \"INBOX\" (MESSAGES 0)\r\n");
        })
    });
}
