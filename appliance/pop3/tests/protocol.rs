//! What no well-behaved client sends, and what the server must do on its own: malformed and
//! overlong input, commands in the wrong state, data pipelined behind STLS, idle clients,
//! shutdown, and a stored message that is not in CRLF form. Same real server, store, vault
//! and TLS as the client tests.

mod common;

use std::time::Duration;

use common::*;
use qutemail_hsm::testing::isolated;
use qutemail_store::Backend;

#[test]
fn bad_input_is_refused_and_never_ends_the_server() {
    isolated("bad_input_is_refused_and_never_ends_the_server", &[TOKEN], |env| {
        runtime().block_on(async {
            let site = Site::start(env, Backend::Sqlite).await;
            let mut c = site.plain_client().await;
            assert_eq!(c.cmd("XYZZY").await, "-ERR unknown command");
            assert_eq!(
                c.cmd("STAT").await,
                "-ERR authenticate first",
                "TRANSACTION command in AUTHORIZATION"
            );
            assert_eq!(c.cmd("RETR 1").await, "-ERR authenticate first");
            assert_eq!(c.cmd("NOOP").await, "-ERR authenticate first");
            assert_eq!(c.cmd(&"A".repeat(300)).await, "-ERR command line too long (at most 255 octets)");
            assert_eq!(c.cmd(&"B".repeat(100_000)).await, "-ERR command line too long (at most 255 octets)");
            c.send(b"\xff\xfe\x00\r\n").await;
            assert_eq!(c.line().await.unwrap(), "-ERR command line is not text");
            assert!(c.cmd("RETR x").await.starts_with("-ERR RETR: expected a message number"));
            // A good command in between resets the count of consecutive errors.
            assert!(c.cmd("CAPA").await.starts_with("+OK"));
            c.body().await;
            assert!(c.cmd("USER alice@a.example").await.starts_with("-ERR [AUTH]"));
            assert!(c.cmd("AUTH PLAIN AGFsaWNlAHB3").await.starts_with("-ERR [AUTH]"));
            assert!(c.cmd("APOP alice@a.example 0123456789abcdef").await.starts_with("-ERR"));
            // Still serving: CAPA answers.
            assert!(c.cmd("CAPA").await.starts_with("+OK"));
            assert!(c.body().await.windows(4).any(|w| w == b"STLS"));
            // Ten refusals in a row: the server hangs up.
            for _ in 0..9 {
                assert_eq!(c.cmd("XYZZY").await, "-ERR unknown command");
            }
            assert_eq!(c.cmd("XYZZY").await, "-ERR too many errors; closing the connection");
            assert_eq!(c.line().await, None, "the connection is closed");

            // The server still serves others.
            let mut again = site.plain_client().await;
            assert!(again.cmd("QUIT").await.starts_with("+OK"));
        })
    });
}

#[test]
fn commands_pipelined_behind_stls_are_not_executed() {
    isolated("commands_pipelined_behind_stls_are_not_executed", &[TOKEN], |env| {
        runtime().block_on(async {
            let site = Site::start(env, Backend::Sqlite).await;
            let mut c = site.plain_client().await;
            // RFC 2595 / CVE-2011-0411: plaintext sent after STLS must not run inside TLS.
            c.send(b"STLS\r\nUSER alice@a.example\r\n").await;
            assert_eq!(c.line().await.unwrap(), "+OK Begin TLS negotiation");
            assert_eq!(c.line().await, None, "the server hangs up instead of starting TLS");
        })
    });
}

#[test]
fn logged_in_errors_and_wrong_state_commands() {
    isolated("logged_in_errors_and_wrong_state_commands", &[TOKEN], |env| {
        runtime().block_on(async {
            let site = Site::start(env, Backend::Sqlite).await;
            let mut c = site.tls_client().await;
            assert_eq!(c.cmd("STAT").await.split(' ').nth(1), Some("3"));
            assert_eq!(c.cmd("RETR 4").await, "-ERR no such message: 4");
            assert_eq!(c.cmd("TOP 4 0").await, "-ERR no such message: 4");
            assert_eq!(c.cmd("LIST 99999").await, "-ERR no such message: 99999");
            assert_eq!(c.cmd("USER alice@a.example").await, "-ERR already logged in");
            assert_eq!(c.cmd("STLS").await, "-ERR already logged in");
            assert_eq!(c.cmd("NOOP").await, "+OK");
            // PIPELINING: three commands in one write, three replies in order.
            c.send(b"LIST 2\r\nUIDL 2\r\nDELE 2\r\n").await;
            assert!(c.line().await.unwrap().starts_with("+OK 2 "));
            assert!(c.line().await.unwrap().starts_with("+OK 2 "));
            assert_eq!(c.line().await.unwrap(), "+OK message 2 deleted");
            let total = total_size(&site).await;
            assert_eq!(c.cmd("RSET").await, format!("+OK maildrop has 3 messages ({total} octets)"));
            // A second message delivered during the session is not in its snapshot.
            site.deliver(b"Subject: late\r\n\r\nlate\r\n".to_vec()).await;
            assert_eq!(c.cmd("STAT").await.split(' ').nth(1), Some("3"), "numbers are a snapshot at login");
            assert!(c.cmd("QUIT").await.starts_with("+OK"));
            assert_eq!(c.line().await, None);
        })
    });
}

async fn total_size(site: &Site) -> usize {
    site.presented().await.iter().map(Vec::len).sum()
}

#[test]
fn idle_clients_are_logged_out_without_update() {
    isolated("idle_clients_are_logged_out_without_update", &[TOKEN], |env| {
        runtime().block_on(async {
            let site =
                Site::start_with(env, Backend::Sqlite, |c| c.idle_timeout = Duration::from_millis(700)).await;
            let mut c = site.tls_client().await;
            assert!(c.cmd("DELE 1").await.starts_with("+OK"));
            // Say nothing: the autologout timer fires (RFC 1939 § 3) and UPDATE is not entered.
            assert_eq!(c.line().await.unwrap(), "-ERR autologout: idle for too long");
            assert_eq!(c.line().await, None);
            assert_eq!(site.count().await, 3, "the DELE of a timed-out session is not applied");
            // The lock went with the connection.
            let mut again = site.tls_client().await;
            assert!(again.cmd("QUIT").await.starts_with("+OK"));
        })
    });
}

#[test]
fn shutdown_tells_clients_and_stops_the_listeners() {
    isolated("shutdown_tells_clients_and_stops_the_listeners", &[TOKEN], |env| {
        runtime().block_on(async {
            let mut site = Site::start(env, Backend::Sqlite).await;
            let mut plain = site.plain_client().await;
            let mut logged_in = site.tls_client().await;
            assert!(logged_in.cmd("DELE 1").await.starts_with("+OK"));
            site.server.shutdown();
            assert_eq!(plain.line().await.unwrap(), "-ERR [SYS/TEMP] server shutting down");
            assert_eq!(logged_in.line().await.unwrap(), "-ERR [SYS/TEMP] server shutting down");
            for task in site.tasks.drain(..) {
                // A hang guard, not a timing assertion.
                tokio::time::timeout(Duration::from_secs(30), task).await.unwrap().unwrap();
            }
            assert_eq!(site.count().await, 3, "a session ended by shutdown applies nothing");
            assert!(tokio::net::TcpStream::connect(("127.0.0.1", site.plain_port)).await.is_err());
        })
    });
}

#[test]
fn a_message_stored_with_bare_line_feeds_is_sent_in_crlf_form_and_relisted() {
    isolated("a_message_stored_with_bare_line_feeds_is_sent_in_crlf_form_and_relisted", &[TOKEN], |env| {
        runtime().block_on(async {
            let site = Site::start(env, Backend::Sqlite).await;
            site.deliver(b"Subject: bare\n\nline one\n.dot line\nlast, no ending".to_vec()).await;
            let presented = site.presented().await.pop().unwrap();
            let canonical =
                String::from_utf8(presented.clone()).unwrap().replace("\r\n", "\n").replace('\n', "\r\n")
                    + "\r\n";
            let mut c = site.tls_client().await;
            assert_eq!(c.cmd("LIST 4").await, format!("+OK 4 {}", presented.len()), "listed as stored");
            assert_eq!(c.cmd("RETR 4").await, format!("+OK {} octets", canonical.len()));
            assert_eq!(c.body().await, canonical.as_bytes(), "every line ends in CRLF, dots stuffed");
            assert_eq!(c.cmd("LIST 4").await, format!("+OK 4 {}", canonical.len()), "relisted as sent");
            // The well-formed messages keep their sizes: listed = sent.
            assert!(c.cmd("RETR 1").await.ends_with(&format!(" {} octets", site.presented().await[0].len())));
        })
    });
}
