#![no_main]
//! cargo-fuzz target `smtp_command`: arbitrary bytes as what an SMTP client sends to the
//! server session (`qutemail_smtp::proto::server`), in chunks whose sizes come from the input,
//! with a host whose answers also come from the input. The session must never panic, every
//! reply must be well-formed (a 2xx..5xx code, CRLF-terminated lines), and a message handed to
//! the host is never larger than the limit plus the Received: header. Also the reply parser
//! (the client side) and the address parser on the same bytes. The stable counterpart is
//! `appliance/smtp/src/proto/server_tests.rs` (`arbitrary_input_never_panics_and_stays_bounded`).

use libfuzzer_sys::fuzz_target;
use qutemail_smtp::proto::server::{
    Action, AuthOutcome, DeliveryReceipt, Refusal, ServerSession, SessionConfig, SessionPolicy, TlsInfo,
};
use qutemail_smtp::reply::ReplyParser;
use qutemail_smtp::{EnhancedCode, address};

const LIMIT: u64 = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&control, input)) = data.split_first() else { return };
    let policy = SessionPolicy {
        offer_starttls: control & 1 != 0,
        offer_auth: control & 2 != 0,
        auth_requires_tls: control & 4 != 0,
        mail_requires_auth: control & 8 != 0,
        mail_requires_tls: control & 16 != 0,
    };
    let mut config = SessionConfig::new("fuzz.test", policy);
    config.max_message_size = LIMIT;
    config.max_recipients = 5;
    let mut session = ServerSession::new(config, None, None);
    let mut answers = input.iter().cycle().copied();
    let mut rest = input;
    while !rest.is_empty() {
        let take = (usize::from(rest[0]) % 97 + 1).min(rest.len());
        let (chunk, tail) = rest.split_at(take);
        rest = tail;
        session.receive(chunk);
        while let Some(action) = session.next_action() {
            let yes = answers.next().unwrap_or(0) & 1 == 0;
            let refusal = || Refusal::new(550, EnhancedCode::new(5, 7, 1), "no");
            let answered = match action {
                Action::Reply(reply) => {
                    assert!((200..600).contains(&reply.code));
                    let wire = reply.to_bytes();
                    assert!(wire.ends_with(b"\r\n"));
                    assert_eq!(wire.iter().filter(|&&b| b == b'\n').count(), reply.lines.len().max(1));
                    Ok(())
                }
                Action::Close => Ok(()),
                Action::StartTls => session.tls_established(TlsInfo {
                    version: "TLSv1.3".into(),
                    cipher: "TLS_AES_128_GCM_SHA256".into(),
                }),
                Action::Authenticate(_) => {
                    session.auth_outcome(if yes { AuthOutcome::Accepted } else { AuthOutcome::Rejected })
                }
                Action::CheckSender { .. } => session.sender_outcome(if yes { Ok(()) } else { Err(refusal()) }),
                Action::CheckRecipient { .. } => {
                    session.recipient_outcome(if yes { Ok(()) } else { Err(refusal()) })
                }
                Action::Deliver { message, .. } => {
                    assert!(message.len() as u64 <= LIMIT + 1024);
                    session.delivery_outcome(Ok(DeliveryReceipt { id: "f".into() }))
                }
            };
            assert!(answered.is_ok(), "the session asked exactly what it was answered");
        }
    }

    let mut parser = ReplyParser::new();
    parser.feed(input);
    while let Ok(Some(_)) = parser.next_reply() {}
    if let Ok(text) = std::str::from_utf8(input) {
        let _ = address::parse_reverse_path(text, true);
        let _ = address::parse_forward_path(text, false, "fuzz.test");
    }
});
