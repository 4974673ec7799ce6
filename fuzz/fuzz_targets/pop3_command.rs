#![no_main]
//! cargo-fuzz target `pop3_command`: arbitrary bytes as the lines a POP3 client sends to the
//! session state machine (`qutemail_pop3::session`), before or after TLS, with logins that
//! succeed or fail as the input says; and the same bytes as a message rendered for RETR/TOP
//! (`qutemail_pop3::message::render`). Nothing may panic, every reply must be one `+OK`/`-ERR`
//! line (plus stuffed lines and `.` for a multi-line reply), and a rendered message must be
//! CRLF lines whose only lone `.` line is the last, with its count of the canonical message.

use libfuzzer_sys::fuzz_target;
use qutemail_pop3::message::render;
use qutemail_pop3::session::{Action, LoginRefusal, Maildrop, Reply, Session};

fn check_lines(wire: &[u8]) -> Vec<&[u8]> {
    assert!(wire.ends_with(b"\r\n"), "not CRLF-terminated: {wire:?}");
    let lines: Vec<&[u8]> = wire[..wire.len() - 2].split(|b| *b == b'\n').collect();
    for (i, l) in lines.iter().enumerate() {
        let body = if i + 1 < lines.len() { l.strip_suffix(b"\r").expect("bare LF") } else { l };
        assert!(!body.contains(&b'\r'), "bare CR in {wire:?}");
    }
    lines
}

fn check_reply(r: &Reply) {
    let wire = r.to_wire();
    let lines = check_lines(&wire);
    assert!(lines[0].starts_with(b"+OK") || lines[0].starts_with(b"-ERR"), "{wire:?}");
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, input)) = data.split_first() else { return };
    let mut session = Session::new(control & 1 != 0, "fuzz");
    for line in input.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        match session.handle_line(line) {
            Action::Reply(r) | Action::StartTls(r) => check_reply(&r),
            Action::Close(r) => {
                check_reply(&r);
                break;
            }
            Action::Continue => {}
            Action::Login(_) => {
                if control & 2 != 0 {
                    check_reply(&session.login_succeeded(Maildrop::default()));
                } else if let Action::Reply(r) | Action::Close(r) =
                    session.login_refused(LoginRefusal::BadCredentials)
                {
                    check_reply(&r);
                }
            }
            Action::Retrieve { .. } => panic!("RETR/TOP of a message an empty maildrop does not have"),
            Action::Update { delete } => {
                assert!(delete.is_empty());
                break;
            }
        }
    }
    let top = (control >> 2 != 0).then(|| u32::from(control >> 2) - 1);
    let rendered = render(input, top);
    let lines = check_lines(&rendered.wire);
    assert_eq!(lines.last().copied(), Some(&b"."[..]));
    assert!(lines[..lines.len() - 1].iter().all(|l| *l != b".\r"), "a lone dot inside the message");
    if top.is_none() {
        let unstuffed: usize = lines[..lines.len() - 1]
            .iter()
            .map(|l| l.len() + 1 - usize::from(l.starts_with(b".")))
            .sum();
        assert_eq!(unstuffed as u64, rendered.canonical_size);
    }
});
