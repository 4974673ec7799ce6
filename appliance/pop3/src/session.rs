//! The POP3 session as a state machine without I/O (RFC 1939 § 3–§ 6): AUTHORIZATION, then
//! TRANSACTION over a snapshot of the maildrop taken at login, then UPDATE at `QUIT`.
//!
//! The driver feeds it lines ([`Session::handle_line`]) and carries out the [`Action`]s it
//! asks for: checking credentials against the store, reading a message through the vault,
//! applying deletions. It reports the outcome back ([`Session::login_succeeded`],
//! [`Session::retrieved`], [`Session::updated`] ...), which yields the reply to send. So every
//! protocol decision is here and testable without a socket, a database or an HSM.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use qutemail_store::MessageMeta;
use zeroize::Zeroizing;

use crate::command::{Command, CommandError};
use crate::message::Rendered;

/// Consecutive refused commands after which the server hangs up (a client this confused, or
/// a scanner, gets nothing from going on).
pub const MAX_CONSECUTIVE_ERRORS: u32 = 10;

/// Failed logins on one connection after which the server hangs up (RFC 1939 § 7 allows it;
/// the per-account and per-address limits across connections are the driver's).
pub const MAX_FAILED_LOGINS_PER_CONNECTION: u32 = 3;

/// One reply: a status line, and for a multi-line reply its lines (byte-stuffed on the wire).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    ok: bool,
    text: String,
    lines: Option<Vec<String>>,
}

impl Reply {
    /// `+OK text`.
    pub fn ok(text: impl Into<String>) -> Reply {
        Reply { ok: true, text: text.into(), lines: None }
    }

    /// `-ERR text`; `text` starts with a response code such as `[AUTH]` where one applies.
    pub fn err(text: impl Into<String>) -> Reply {
        Reply { ok: false, text: text.into(), lines: None }
    }

    fn multi(text: impl Into<String>, lines: Vec<String>) -> Reply {
        Reply { ok: true, text: text.into(), lines: Some(lines) }
    }

    /// Whether it is `+OK`.
    pub fn is_ok(&self) -> bool {
        self.ok
    }

    /// The status line's text after `+OK ` / `-ERR `.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The reply as sent: status line, then any lines byte-stuffed and the final `.`.
    pub fn to_wire(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(if self.ok { b"+OK" } else { b"-ERR" });
        if !self.text.is_empty() {
            out.push(b' ');
            out.extend_from_slice(self.text.as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        if let Some(lines) = &self.lines {
            for line in lines {
                if line.starts_with('.') {
                    out.push(b'.');
                }
                out.extend_from_slice(line.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b".\r\n");
        }
        out
    }
}

/// Credentials to check, from `USER`/`PASS` or `AUTH PLAIN`.
pub struct Login {
    /// The mailbox (account address) as the client gave it.
    pub user: String,
    /// The password. Wiped when dropped, never logged.
    pub password: Zeroizing<String>,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login").field("user", &self.user).finish_non_exhaustive()
    }
}

/// Why the driver did not let a login through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginRefusal {
    /// Wrong address or password, or a disabled account (one answer for all three).
    BadCredentials,
    /// Too many failed logins lately for this account or from this address.
    RateLimited,
    /// Another session holds the maildrop.
    InUse,
    /// The store could not be asked; the credentials were not judged.
    Unavailable,
}

/// What the driver must do next.
#[derive(Debug)]
pub enum Action {
    /// Send this reply and read the next line.
    Reply(Reply),
    /// Send this reply (`+OK`), then run the TLS handshake, then call
    /// [`Session::tls_established`].
    StartTls(Reply),
    /// Send the empty SASL continuation `+ ` CRLF; the next line is the client's response.
    Continue,
    /// Check these credentials, lock and snapshot the maildrop, then call
    /// [`Session::login_succeeded`] or [`Session::login_refused`].
    Login(Login),
    /// Read message `number` ([`Session::message`]) through the vault, render it with
    /// [`crate::message::render`] (`top` lines of body for TOP, all for RETR), then call
    /// [`Session::retrieved`] or [`Session::retrieve_failed`].
    Retrieve {
        /// The message number.
        number: u32,
        /// `Some(n)` for `TOP number n`.
        top: Option<u32>,
    },
    /// UPDATE state: remove these messages (UIDs), then call [`Session::updated`], send its
    /// reply and close.
    Update {
        /// UIDs of the messages marked deleted; may be empty.
        delete: Vec<u32>,
    },
    /// Send this reply and close the connection.
    Close(Reply),
}

/// One message of the maildrop as listed at login.
#[derive(Debug, Clone)]
struct Entry {
    meta: MessageMeta,
    size: u64,
    deleted: bool,
}

/// The maildrop as it was at login: POP3 numbers messages 1..n for the whole session.
#[derive(Debug, Clone, Default)]
pub struct Maildrop {
    entries: Vec<Entry>,
}

impl Maildrop {
    /// The snapshot of `messages` (the store's metadata in UID order).
    pub fn new(messages: Vec<MessageMeta>) -> Maildrop {
        Maildrop {
            entries: messages
                .into_iter()
                .map(|meta| Entry { size: meta.size, meta, deleted: false })
                .collect(),
        }
    }

    fn live(&self) -> impl Iterator<Item = (u32, &Entry)> {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| !e.deleted)
            .map(|(i, e)| (u32::try_from(i + 1).unwrap_or(u32::MAX), e))
    }

    fn totals(&self) -> (usize, u64) {
        self.live().fold((0, 0), |(n, s), (_, e)| (n + 1, s + e.size))
    }

    fn get(&self, number: u32) -> Option<&Entry> {
        let i = usize::try_from(number).ok()?.checked_sub(1)?;
        self.entries.get(i).filter(|e| !e.deleted)
    }

    fn get_mut(&mut self, number: u32) -> Option<&mut Entry> {
        let i = usize::try_from(number).ok()?.checked_sub(1)?;
        self.entries.get_mut(i)
    }
}

enum State {
    Authorization {
        user: Option<String>,
    },
    /// `AUTH PLAIN` sent without an initial response: the next line is the response.
    SaslPlain,
    Transaction(Maildrop),
    /// QUIT seen: nothing more is read.
    Done,
}

/// One POP3 session.
pub struct Session {
    state: State,
    tls: bool,
    implementation: String,
    failed_logins: u32,
    consecutive_errors: u32,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Authorization { .. } => "AUTHORIZATION",
            State::SaslPlain => "AUTHORIZATION (SASL)",
            State::Transaction(_) => "TRANSACTION",
            State::Done => "UPDATE",
        };
        f.debug_struct("Session").field("state", &state).field("tls", &self.tls).finish_non_exhaustive()
    }
}

impl Session {
    /// A session in the AUTHORIZATION state; `tls` says whether the connection is already
    /// encrypted (port 995). `implementation` is CAPA's IMPLEMENTATION argument.
    pub fn new(tls: bool, implementation: impl Into<String>) -> Session {
        Session {
            state: State::Authorization { user: None },
            tls,
            implementation: implementation.into(),
            failed_logins: 0,
            consecutive_errors: 0,
        }
    }

    /// The greeting to send first.
    pub fn greeting(&self) -> Reply {
        Reply::ok("QuteMail POP3 server ready")
    }

    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// Whether the session is in the TRANSACTION state (logged in).
    pub fn is_logged_in(&self) -> bool {
        matches!(self.state, State::Transaction(_))
    }

    /// Whether the next line is a SASL response rather than a command (it may be longer than
    /// a command line).
    pub fn expects_sasl_response(&self) -> bool {
        matches!(self.state, State::SaslPlain)
    }

    /// The TLS handshake after STLS succeeded: the session starts over in AUTHORIZATION
    /// (RFC 2595 § 4: nothing learned before TLS is kept).
    pub fn tls_established(&mut self) {
        self.tls = true;
        self.state = State::Authorization { user: None };
    }

    /// What to do with one line the client sent (without its line ending).
    pub fn handle_line(&mut self, line: &[u8]) -> Action {
        if matches!(self.state, State::SaslPlain) {
            self.state = State::Authorization { user: None };
            return self.sasl_plain_response(line);
        }
        let action = match Command::parse(line) {
            Ok(command) => {
                tracing::debug!(command = command.keyword(), "pop3 command");
                self.handle(command)
            }
            Err(e) => {
                tracing::debug!(error = %e, "pop3 command refused");
                Action::Reply(Reply::err(e.to_string()))
            }
        };
        self.count_errors(action)
    }

    /// A line longer than the driver accepts was received (and discarded).
    pub fn line_too_long(&mut self) -> Action {
        if matches!(self.state, State::SaslPlain) {
            self.state = State::Authorization { user: None };
        }
        self.count_errors(Action::Reply(Reply::err(CommandError::TooLong.to_string())))
    }

    fn count_errors(&mut self, action: Action) -> Action {
        match &action {
            Action::Reply(r) if !r.is_ok() => {
                self.consecutive_errors += 1;
                if self.consecutive_errors >= MAX_CONSECUTIVE_ERRORS {
                    self.state = State::Done;
                    return Action::Close(Reply::err("too many errors; closing the connection"));
                }
            }
            _ => self.consecutive_errors = 0,
        }
        action
    }

    fn handle(&mut self, command: Command) -> Action {
        let reply = |r: Reply| Action::Reply(r);
        if command == Command::Capa {
            return reply(self.capabilities());
        }
        if command == Command::Quit {
            let state = std::mem::replace(&mut self.state, State::Done);
            return match state {
                // QUIT in TRANSACTION enters UPDATE: only now are deletions applied.
                State::Transaction(drop) => Action::Update {
                    delete: drop.entries.iter().filter(|e| e.deleted).map(|e| e.meta.uid).collect(),
                },
                _ => Action::Close(Reply::ok("QuteMail POP3 server signing off")),
            };
        }
        match (&mut self.state, command) {
            (State::Authorization { .. }, Command::Stls) if !self.tls => {
                Action::StartTls(Reply::ok("Begin TLS negotiation"))
            }
            (State::Authorization { .. }, Command::Stls) => reply(Reply::err("TLS is already active")),
            (State::Authorization { .. }, Command::User(_) | Command::Pass(_) | Command::Auth { .. })
                if !self.tls =>
            {
                reply(Reply::err("[AUTH] logins are only accepted over TLS: use STLS first"))
            }
            (State::Authorization { user }, Command::User(name)) => {
                *user = Some(name);
                reply(Reply::ok("send PASS"))
            }
            (State::Authorization { user }, Command::Pass(password)) => match user.take() {
                Some(user) => Action::Login(Login { user, password }),
                None => reply(Reply::err("PASS must follow USER")),
            },
            (State::Authorization { .. }, Command::Auth { mechanism: None, .. }) => {
                reply(Reply::multi("SASL mechanisms follow", vec!["PLAIN".into()]))
            }
            (State::Authorization { .. }, Command::Auth { mechanism: Some(m), initial }) => {
                if m != "PLAIN" {
                    return reply(Reply::err("unsupported SASL mechanism; PLAIN is offered"));
                }
                match initial {
                    Some(response) => self.sasl_plain_response(response.as_bytes()),
                    None => {
                        self.state = State::SaslPlain;
                        Action::Continue
                    }
                }
            }
            (State::Authorization { .. }, Command::Apop) => {
                reply(Reply::err("[AUTH] APOP is not supported: use USER/PASS or AUTH PLAIN over TLS"))
            }
            (State::Authorization { .. }, _) => reply(Reply::err("authenticate first")),
            (State::Transaction(drop), command) => reply_in_transaction(drop, command),
            (State::SaslPlain | State::Done, _) => reply(Reply::err("the session is over")),
        }
    }

    fn capabilities(&self) -> Reply {
        let mut caps: Vec<String> =
            ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "EXPIRE NEVER"]
                .into_iter()
                .map(String::from)
                .collect();
        if self.tls {
            caps.push("USER".into());
            caps.push("SASL PLAIN".into());
        } else if matches!(self.state, State::Authorization { .. }) {
            caps.push("STLS".into());
        }
        caps.push(format!("IMPLEMENTATION {}", self.implementation));
        Reply::multi("capability list follows", caps)
    }

    /// RFC 4616: `[authzid] NUL authcid NUL passwd`, base64; `*` cancels (RFC 5034 § 4).
    fn sasl_plain_response(&mut self, response: &[u8]) -> Action {
        if response == b"*" {
            return Action::Reply(Reply::err("authentication cancelled"));
        }
        let malformed = || Action::Reply(Reply::err("[AUTH] malformed SASL PLAIN response"));
        let decoded = if response == b"=" {
            Zeroizing::new(Vec::new())
        } else {
            match B64.decode(response) {
                Ok(d) => Zeroizing::new(d),
                Err(_) => return malformed(),
            }
        };
        let mut parts = decoded.split(|b| *b == 0);
        let (Some(authz), Some(authc), Some(password), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return malformed();
        };
        let (Ok(authz), Ok(authc), Ok(password)) =
            (std::str::from_utf8(authz), std::str::from_utf8(authc), std::str::from_utf8(password))
        else {
            return malformed();
        };
        // Acting for another user is not offered.
        if !authz.is_empty() && !authz.eq_ignore_ascii_case(authc) {
            return Action::Reply(Reply::err("[AUTH] authorization identity must be the user's own"));
        }
        if authc.is_empty() || password.is_empty() {
            return malformed();
        }
        Action::Login(Login { user: authc.to_owned(), password: Zeroizing::new(password.to_owned()) })
    }

    /// The login succeeded and the maildrop is locked: the session enters TRANSACTION.
    pub fn login_succeeded(&mut self, maildrop: Maildrop) -> Reply {
        let (n, size) = maildrop.totals();
        self.state = State::Transaction(maildrop);
        self.consecutive_errors = 0;
        Reply::ok(format!("maildrop locked and ready, {n} messages ({size} octets)"))
    }

    /// The login was refused; the session stays in AUTHORIZATION, or hangs up after too many
    /// failures on this connection.
    pub fn login_refused(&mut self, why: LoginRefusal) -> Action {
        let reply = match why {
            LoginRefusal::BadCredentials => Reply::err("[AUTH] invalid user name or password"),
            LoginRefusal::RateLimited => Reply::err("[SYS/TEMP] too many failed logins; try again later"),
            LoginRefusal::InUse => Reply::err("[IN-USE] the maildrop is in use by another session"),
            LoginRefusal::Unavailable => {
                Reply::err("[SYS/TEMP] the mail store is unavailable; try again later")
            }
        };
        if matches!(why, LoginRefusal::BadCredentials | LoginRefusal::RateLimited) {
            self.failed_logins += 1;
            if self.failed_logins >= MAX_FAILED_LOGINS_PER_CONNECTION {
                self.state = State::Done;
                return Action::Close(reply);
            }
        }
        Action::Reply(reply)
    }

    /// The store metadata of message `number` (not deleted), for the driver to present.
    pub fn message(&self, number: u32) -> Option<&MessageMeta> {
        match &self.state {
            State::Transaction(drop) => drop.get(number).map(|e| &e.meta),
            _ => None,
        }
    }

    /// Message `number` was rendered: the status line to send before `rendered.wire`. If the
    /// message's canonical size differs from what was listed (it was not stored in CRLF form,
    /// or could not be opened and is shown as an explanation), the listing is corrected for the
    /// rest of the session.
    pub fn retrieved(&mut self, number: u32, top: Option<u32>, rendered: &Rendered) -> Reply {
        if let State::Transaction(drop) = &mut self.state
            && let Some(entry) = drop.get_mut(number)
            && entry.size != rendered.canonical_size
        {
            tracing::warn!(
                uid = entry.meta.uid,
                listed = entry.size,
                sent = rendered.canonical_size,
                "message size differs from the stored size; listing corrected for this session"
            );
            entry.size = rendered.canonical_size;
        }
        match top {
            Some(_) => Reply::ok("top of message follows"),
            None => Reply::ok(format!("{} octets", rendered.canonical_size)),
        }
    }

    /// Message `number` could not be read (store or vault failure).
    pub fn retrieve_failed(&mut self) -> Reply {
        Reply::err("[SYS/TEMP] the message cannot be read now; try again later")
    }

    /// The UPDATE state's outcome: `Ok(n)` messages removed, or the store failed (nothing is
    /// removed then: the store's expunge is one transaction).
    pub fn updated(&mut self, outcome: Result<usize, ()>) -> Reply {
        match outcome {
            Ok(0) => Reply::ok("QuteMail POP3 server signing off"),
            Ok(n) => Reply::ok(format!("QuteMail POP3 server signing off ({n} messages deleted)")),
            Err(()) => {
                Reply::err("[SYS/TEMP] deleted messages could not be removed; they remain in the maildrop")
            }
        }
    }
}

fn reply_in_transaction(drop: &mut Maildrop, command: Command) -> Action {
    let no_such = |n: u32| Reply::err(format!("no such message: {n}"));
    let reply = match command {
        Command::Stat => {
            let (n, size) = drop.totals();
            Reply::ok(format!("{n} {size}"))
        }
        Command::List(None) => {
            let (n, size) = drop.totals();
            let lines = drop.live().map(|(i, e)| format!("{i} {}", e.size)).collect();
            Reply::multi(format!("{n} messages ({size} octets)"), lines)
        }
        Command::List(Some(n)) => match drop.get(n) {
            Some(e) => Reply::ok(format!("{n} {}", e.size)),
            None => no_such(n),
        },
        Command::Uidl(None) => {
            let lines = drop.live().map(|(i, e)| format!("{i} {}", e.meta.unique_id)).collect();
            Reply::multi("unique-id listing follows", lines)
        }
        Command::Uidl(Some(n)) => match drop.get(n) {
            Some(e) => Reply::ok(format!("{n} {}", e.meta.unique_id)),
            None => no_such(n),
        },
        Command::Retr(n) => match drop.get(n) {
            Some(_) => return Action::Retrieve { number: n, top: None },
            None => no_such(n),
        },
        Command::Top(n, lines) => match drop.get(n) {
            Some(_) => return Action::Retrieve { number: n, top: Some(lines) },
            None => no_such(n),
        },
        Command::Dele(n) => match drop.get_mut(n) {
            Some(e) if !e.deleted => {
                e.deleted = true;
                Reply::ok(format!("message {n} deleted"))
            }
            Some(_) => Reply::err(format!("message {n} already deleted")),
            None => no_such(n),
        },
        Command::Rset => {
            for e in &mut drop.entries {
                e.deleted = false;
            }
            let (n, size) = drop.totals();
            Reply::ok(format!("maildrop has {n} messages ({size} octets)"))
        }
        Command::Noop => Reply::ok(""),
        Command::User(_) | Command::Pass(_) | Command::Auth { .. } | Command::Apop | Command::Stls => {
            Reply::err("already logged in")
        }
        Command::Capa | Command::Quit => Reply::err("internal: handled elsewhere"),
    };
    Action::Reply(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(a: Action) -> Reply {
        match a {
            Action::Reply(r) => r,
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    fn wire(a: Action) -> String {
        String::from_utf8(reply(a).to_wire()).unwrap()
    }

    #[test]
    fn before_tls_capa_offers_stls_and_no_login_and_logins_are_refused() {
        let mut s = Session::new(false, "test");
        let capa = wire(s.handle_line(b"CAPA"));
        assert!(capa.contains("\r\nSTLS\r\n") && !capa.contains("USER") && !capa.contains("SASL"), "{capa}");
        assert!(capa.ends_with("IMPLEMENTATION test\r\n.\r\n"));
        assert!(wire(s.handle_line(b"USER a")).starts_with("-ERR [AUTH]"));
        assert!(wire(s.handle_line(b"PASS b")).starts_with("-ERR [AUTH]"));
        assert!(wire(s.handle_line(b"AUTH PLAIN AGEAYg==")).starts_with("-ERR [AUTH]"));
        assert!(matches!(s.handle_line(b"STLS"), Action::StartTls(_)));
        s.tls_established();
        let capa = wire(s.handle_line(b"CAPA"));
        assert!(
            capa.contains("\r\nUSER\r\n") && capa.contains("SASL PLAIN") && !capa.contains("STLS"),
            "{capa}"
        );
        assert!(wire(s.handle_line(b"STLS")).starts_with("-ERR"));
    }

    #[test]
    fn user_pass_and_auth_plain_ask_for_a_login_over_tls() {
        let mut s = Session::new(true, "test");
        assert!(wire(s.handle_line(b"PASS x")).starts_with("-ERR PASS must follow USER"));
        assert!(reply(s.handle_line(b"USER alice@a.example")).is_ok());
        match s.handle_line(b"PASS two words") {
            Action::Login(l) => {
                assert_eq!((l.user.as_str(), l.password.as_str()), ("alice@a.example", "two words"))
            }
            other => panic!("{other:?}"),
        }
        // AUTH PLAIN with the response on the next line; authzid empty or the user's own.
        assert!(matches!(s.handle_line(b"AUTH PLAIN"), Action::Continue));
        assert!(s.expects_sasl_response());
        match s.handle_line(B64.encode(b"alice\0alice\0pw").as_bytes()) {
            Action::Login(l) => assert_eq!((l.user.as_str(), l.password.as_str()), ("alice", "pw")),
            other => panic!("{other:?}"),
        }
        let other_user = format!("AUTH PLAIN {}", B64.encode(b"bob\0alice\0pw"));
        assert!(wire(s.handle_line(other_user.as_bytes())).starts_with("-ERR [AUTH]"));
        assert!(wire(s.handle_line(b"AUTH PLAIN !!!")).starts_with("-ERR [AUTH] malformed"));
        assert!(matches!(s.handle_line(b"AUTH PLAIN"), Action::Continue));
        assert!(wire(s.handle_line(b"*")).starts_with("-ERR authentication cancelled"));
        assert!(wire(s.handle_line(b"AUTH CRAM-MD5")).starts_with("-ERR unsupported"));
    }

    #[test]
    fn refused_logins_carry_response_codes_and_three_failures_hang_up() {
        let mut s = Session::new(true, "test");
        assert!(wire(s.login_refused(LoginRefusal::InUse)).starts_with("-ERR [IN-USE]"));
        assert!(wire(s.login_refused(LoginRefusal::Unavailable)).starts_with("-ERR [SYS/TEMP]"));
        assert!(wire(s.login_refused(LoginRefusal::BadCredentials)).starts_with("-ERR [AUTH]"));
        assert!(wire(s.login_refused(LoginRefusal::RateLimited)).starts_with("-ERR [SYS/TEMP]"));
        assert!(matches!(s.login_refused(LoginRefusal::BadCredentials), Action::Close(_)));
    }

    #[test]
    fn an_empty_maildrop_lists_nothing_and_quit_enters_update_with_no_deletions() {
        let mut s = Session::new(true, "test");
        assert!(s.login_succeeded(Maildrop::default()).text().contains("0 messages (0 octets)"));
        assert_eq!(wire(s.handle_line(b"STAT")), "+OK 0 0\r\n");
        assert_eq!(wire(s.handle_line(b"LIST")), "+OK 0 messages (0 octets)\r\n.\r\n");
        assert_eq!(wire(s.handle_line(b"UIDL")), "+OK unique-id listing follows\r\n.\r\n");
        assert!(wire(s.handle_line(b"RETR 1")).starts_with("-ERR no such message"));
        assert!(wire(s.handle_line(b"DELE 1")).starts_with("-ERR no such message"));
        assert!(s.message(1).is_none());
        match s.handle_line(b"QUIT") {
            Action::Update { delete } => assert!(delete.is_empty()),
            other => panic!("{other:?}"),
        }
        assert!(wire(s.handle_line(b"NOOP")).starts_with("-ERR the session is over"));
    }

    #[test]
    fn quit_in_authorization_closes_without_update() {
        let mut s = Session::new(false, "test");
        assert!(matches!(s.handle_line(b"quit"), Action::Close(r) if r.is_ok()));
    }
}

/// The stable counterpart of the fuzz target `fuzz/fuzz_targets/pop3_command.rs`: pseudo-random
/// lines built from command fragments, before and after TLS, never panic and always get a
/// well-formed reply.
#[cfg(test)]
mod arbitrary_input {
    use super::*;

    #[test]
    fn arbitrary_lines_never_panic_and_replies_stay_well_formed() {
        const PIECES: [&[u8]; 16] = [
            b"USER",
            b"PASS",
            b"AUTH",
            b"PLAIN",
            b"STLS",
            b"CAPA",
            b"LIST",
            b"RETR",
            b" ",
            b"0",
            b"1",
            b"4294967296",
            b"\xff",
            b"\0",
            b"=",
            b"*",
        ];
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..2_000 {
            let mut s = Session::new(round % 2 == 0, "t");
            for _ in 0..(next() % 12) {
                let mut line = Vec::new();
                for _ in 0..(next() % 6) {
                    line.extend_from_slice(PIECES[(next() % 16) as usize]);
                }
                let reply = match s.handle_line(&line) {
                    Action::Reply(r) | Action::StartTls(r) | Action::Close(r) => r,
                    Action::Login(_) => s.login_succeeded(Maildrop::default()),
                    Action::Continue => continue,
                    other => panic!("{other:?} with an empty maildrop"),
                };
                let wire = reply.to_wire();
                assert!(wire.starts_with(b"+OK") || wire.starts_with(b"-ERR"));
                assert!(wire.ends_with(b"\r\n"));
                assert_eq!(
                    wire.iter().filter(|b| **b == b'\n').count(),
                    wire.windows(2).filter(|w| w == b"\r\n").count()
                );
            }
        }
    }
}
