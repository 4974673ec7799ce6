//! The sans-I/O SMTP server session.
//!
//! [`ServerSession`] owns the protocol state of one connection. The driver feeds it received
//! bytes ([`ServerSession::receive`]) and drains [`Action`]s in order: replies to send, and
//! questions for the host (authenticate, check sender, check recipient, deliver). While a
//! question is open the session processes no further input (pipelined commands stay buffered),
//! and resumes when the host answers through the matching `*_outcome` method. Nothing here
//! does I/O, reads a clock for timeouts, or panics on input.

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use zeroize::{Zeroize, Zeroizing};

use crate::address::{Address, AddressError, ReversePath, parse_forward_path, parse_reverse_path};
use crate::params::{MailParams, ParamError, RcptParams, parse_mail_params, parse_rcpt_params};
use crate::reply::{EnhancedCode, Reply, codes};

/// Longest command line accepted, CRLF included. RFC 5321 § 4.5.3.1.4 requires 512; ESMTP
/// parameters (SIZE, DSN's ORCPT and ENVID) legitimately make MAIL and RCPT longer
/// (RFC 1870 § 3, RFC 3461 § 5), so we accept up to this bound and refuse beyond it.
pub const MAX_COMMAND_LINE: usize = 2048;
/// Longest AUTH command or SASL response line (RFC 4954 § 4: at least 12288).
pub const MAX_AUTH_LINE: usize = 12288;

/// What the session offers and requires; the listener mode decides it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionPolicy {
    /// Offer STARTTLS (the driver has a TLS configuration) while the connection is plain.
    pub offer_starttls: bool,
    /// Offer AUTH PLAIN and LOGIN.
    pub offer_auth: bool,
    /// AUTH only over TLS (RFC 4954 § 4 for plaintext mechanisms); before it: 538 5.7.11.
    pub auth_requires_tls: bool,
    /// MAIL only after successful AUTH (submission, RFC 6409 § 4.3); before it: 530 5.7.0.
    pub mail_requires_auth: bool,
    /// MAIL only over TLS (RFC 3207 § 4); before it: 530 5.7.0.
    pub mail_requires_tls: bool,
}

/// Limits and names of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    /// Our host name, in the greeting, EHLO reply and Received: header.
    pub hostname: String,
    /// Largest message accepted, in octets after dot-unstuffing (advertised as SIZE).
    pub max_message_size: u64,
    /// Most recipients per transaction; more get 452 4.5.3.
    pub max_recipients: usize,
    /// Most 5xx replies to commands before the session answers 421 and closes.
    pub max_errors: u32,
    /// Offer SMTPUTF8 (RFC 6531) and accept non-ASCII addresses when the client uses it.
    pub smtputf8: bool,
    /// What is offered and required.
    pub policy: SessionPolicy,
}

impl SessionConfig {
    /// Defaults: 25 MiB messages, 100 recipients, 20 errors, SMTPUTF8 on.
    pub fn new(hostname: impl Into<String>, policy: SessionPolicy) -> Self {
        Self {
            hostname: hostname.into(),
            max_message_size: 25 * 1024 * 1024,
            max_recipients: 100,
            max_errors: 20,
            smtputf8: true,
            policy,
        }
    }
}

/// The negotiated TLS parameters, for the Received: header and the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    /// e.g. `TLSv1.3`.
    pub version: String,
    /// The IANA cipher suite name, e.g. `TLS_AES_256_GCM_SHA384`.
    pub cipher: String,
}

/// What the host knows about the connection when it is asked something.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SessionInfo {
    /// The client's address, if the driver knows it.
    pub peer: Option<SocketAddr>,
    /// The name the client gave in EHLO/HELO.
    pub helo: Option<String>,
    /// True after EHLO (ESMTP), false after HELO.
    pub esmtp: bool,
    /// Set once TLS is up (STARTTLS or implicit TLS).
    pub tls: Option<TlsInfo>,
    /// The authenticated user (the SASL authentication identity), after successful AUTH.
    pub authenticated_as: Option<String>,
}

/// SASL mechanisms offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMechanism {
    /// RFC 4616.
    Plain,
    /// The de-facto LOGIN mechanism (username and password as two base64 responses).
    Login,
}

/// Credentials to check. The password is zeroized when dropped and never printed.
pub struct Credentials {
    /// The mechanism the client used.
    pub mechanism: AuthMechanism,
    /// PLAIN's authorization identity, when given and different from the username.
    pub authzid: Option<String>,
    /// The authentication identity.
    pub username: String,
    /// The password.
    pub password: Zeroizing<String>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("mechanism", &self.mechanism)
            .field("authzid", &self.authzid)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// The host's verdict on credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthOutcome {
    /// 235 2.7.0.
    Accepted,
    /// 535 5.7.8 (counts as an error).
    Rejected,
    /// 454 4.7.0: the account store is unavailable.
    TemporaryFailure,
}

/// The host refuses a sender, recipient or message with this reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// 4xx or 5xx.
    pub code: u16,
    /// The RFC 3463 code (its class must match the code's first digit).
    pub enhanced: EnhancedCode,
    /// The human-readable reason.
    pub text: String,
}

impl Refusal {
    /// A refusal.
    pub fn new(code: u16, enhanced: EnhancedCode, text: impl Into<String>) -> Self {
        Self { code, enhanced, text: text.into() }
    }

    fn reply(&self) -> Reply {
        // A host that answers a 2xx/3xx "refusal" would make the client believe it succeeded.
        let code = if (400..600).contains(&self.code) { self.code } else { 451 };
        let enhanced = if u16::from(self.enhanced.class) == code / 100 {
            self.enhanced
        } else {
            EnhancedCode::new((code / 100) as u8, 0, 0)
        };
        Reply::new(code, enhanced, self.text.clone())
    }
}

/// The host accepted a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryReceipt {
    /// The queue or store ID, shown to the client in the 250 reply.
    pub id: String,
}

/// One accepted recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    /// The mailbox.
    pub address: Address,
    /// Its DSN parameters.
    pub params: RcptParams,
}

/// A complete transaction handed to the host with the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailEnvelope {
    /// `MAIL FROM`.
    pub from: ReversePath,
    /// Its parameters (SIZE, BODY, RET, ENVID, SMTPUTF8, AUTH=).
    pub params: MailParams,
    /// Every recipient the host accepted, in order.
    pub recipients: Vec<Recipient>,
    /// The connection at the time of DATA.
    pub session: SessionInfo,
}

/// What the driver must do next, in order.
#[derive(Debug)]
pub enum Action {
    /// Send this reply (replies may be buffered until input is exhausted: RFC 2920 § 3.2).
    Reply(Reply),
    /// Flush, then run the TLS handshake as server and call [`ServerSession::tls_established`].
    StartTls,
    /// Flush and close the connection.
    Close,
    /// Ask the host; answer with [`ServerSession::auth_outcome`].
    Authenticate(Credentials),
    /// Ask the host; answer with [`ServerSession::sender_outcome`].
    CheckSender {
        /// The reverse-path.
        from: ReversePath,
        /// Its parameters.
        params: MailParams,
    },
    /// Ask the host; answer with [`ServerSession::recipient_outcome`].
    CheckRecipient {
        /// The forward-path.
        to: Address,
        /// Its parameters.
        params: RcptParams,
    },
    /// Hand the message over; answer with [`ServerSession::delivery_outcome`]. `message` starts
    /// with the session's Received: header, followed by the message as received (unstuffed).
    Deliver {
        /// The transaction.
        envelope: MailEnvelope,
        /// Received: header and message.
        message: Vec<u8>,
    },
}

/// The host answered a question the session did not ask (a bug in the driver).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the session is not waiting for {answer} (it is {state})")]
pub struct UnexpectedAnswer {
    /// The answer given.
    pub answer: &'static str,
    /// What the session is doing.
    pub state: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    LineStart,
    Dot,
    DotCr,
    Mid,
    Cr,
}

/// The body being received: dot-unstuffing and the size limit, applied as bytes arrive.
struct DataReceiver {
    scan: Scan,
    /// Received: header followed by the message; never more than the header plus the limit.
    message: Vec<u8>,
    size: u64,
    limit: u64,
    overflow: bool,
    bare_line_ending: bool,
}

impl DataReceiver {
    fn emit(&mut self, bytes: &[u8]) {
        self.size = self.size.saturating_add(bytes.len() as u64);
        if self.overflow {
            return;
        }
        if self.size > self.limit {
            // Past the limit: stop storing and free what we had; the verdict (552) comes
            // after the terminating dot, as RFC 1870 § 6.3 asks.
            self.overflow = true;
            self.message = Vec::new();
            return;
        }
        self.message.extend_from_slice(bytes);
    }

    /// Consumes `input`; returns how many bytes were used up to and including the final
    /// `CRLF.CRLF` when the data ended, or `None` when all of it was body.
    fn scan(&mut self, input: &[u8]) -> Option<usize> {
        let mut i = 0;
        while i < input.len() {
            match self.scan {
                Scan::Mid => {
                    let rest = &input[i..];
                    match rest.iter().position(|&b| b == b'\r' || b == b'\n') {
                        None => {
                            self.emit(rest);
                            i = input.len();
                        }
                        Some(p) => {
                            self.emit(&rest[..p]);
                            i += p + 1;
                            if rest[p] == b'\r' {
                                self.scan = Scan::Cr;
                            } else {
                                self.bare_line_ending = true;
                                self.emit(b"\n");
                            }
                        }
                    }
                }
                Scan::Cr => {
                    if input[i] == b'\n' {
                        self.emit(b"\r\n");
                        self.scan = Scan::LineStart;
                        i += 1;
                    } else {
                        self.bare_line_ending = true;
                        self.emit(b"\r");
                        self.scan = Scan::Mid;
                    }
                }
                Scan::LineStart => {
                    if input[i] == b'.' {
                        self.scan = Scan::Dot;
                        i += 1;
                    } else {
                        self.scan = Scan::Mid;
                    }
                }
                // A leading dot is dropped (RFC 5321 § 4.5.2) unless it starts ".\r\n".
                Scan::Dot => {
                    if input[i] == b'\r' {
                        self.scan = Scan::DotCr;
                        i += 1;
                    } else {
                        self.scan = Scan::Mid;
                    }
                }
                Scan::DotCr => {
                    // Only CRLF "." CRLF ends the data: a bare LF never does, which is what
                    // keeps SMTP smuggling (a second message hidden behind "\n.\n") out.
                    if input[i] == b'\n' {
                        return Some(i + 1);
                    }
                    self.bare_line_ending = true;
                    self.emit(b"\r");
                    self.scan = Scan::Mid;
                }
            }
        }
        None
    }
}

enum Phase {
    Command,
    AuthPlain,
    AuthLoginUser,
    AuthLoginPassword(Zeroizing<String>),
    Data(Box<DataReceiver>),
    AwaitAuth(String),
    AwaitSender(ReversePath, MailParams),
    AwaitRecipient(Recipient),
    AwaitDelivery,
    TlsHandshake,
    Closed,
}

impl Phase {
    fn name(&self) -> &'static str {
        match self {
            Self::Command => "reading commands",
            Self::AuthPlain | Self::AuthLoginUser | Self::AuthLoginPassword(_) => "in an AUTH exchange",
            Self::Data(_) => "receiving message data",
            Self::AwaitAuth(_) => "waiting for an authentication verdict",
            Self::AwaitSender(..) => "waiting for a sender verdict",
            Self::AwaitRecipient(_) => "waiting for a recipient verdict",
            Self::AwaitDelivery => "waiting for a delivery verdict",
            Self::TlsHandshake => "waiting for the TLS handshake",
            Self::Closed => "closed",
        }
    }
}

struct Transaction {
    from: ReversePath,
    params: MailParams,
    recipients: Vec<Recipient>,
}

/// Which timeout applies while the driver waits for input (RFC 5321 § 4.5.3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitingFor {
    /// The next command (server timeout: at least 5 minutes).
    Command,
    /// More message data.
    Data,
}

/// One SMTP server connection's protocol state. See the module docs.
pub struct ServerSession {
    config: SessionConfig,
    info: SessionInfo,
    input: Vec<u8>,
    /// Dropping the rest of an over-long line.
    discarding: bool,
    actions: VecDeque<Action>,
    phase: Phase,
    transaction: Option<Transaction>,
    errors: u32,
}

impl fmt::Debug for ServerSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerSession")
            .field("info", &self.info)
            .field("phase", &self.phase.name())
            .field("errors", &self.errors)
            .finish_non_exhaustive()
    }
}

/// Splits `<path> params...`, honouring quoted local parts that may contain `>` or spaces.
fn split_path(args: &str) -> (&str, &str) {
    let args = args.trim_start();
    if !args.starts_with('<') {
        return args.split_once(' ').unwrap_or((args, ""));
    }
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in args.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '>' if !quoted => return (&args[..=i], &args[i + 1..]),
            _ => {}
        }
    }
    (args, "")
}

impl ServerSession {
    /// A new session; queues the 220 greeting. `tls` is set for implicit TLS (RFC 8314).
    pub fn new(config: SessionConfig, peer: Option<SocketAddr>, tls: Option<TlsInfo>) -> Self {
        let greeting = Reply::plain(220, format!("{} ESMTP QuteMail ready", config.hostname));
        Self {
            info: SessionInfo { peer, tls, ..SessionInfo::default() },
            config,
            input: Vec::new(),
            discarding: false,
            actions: VecDeque::from([Action::Reply(greeting)]),
            phase: Phase::Command,
            transaction: None,
            errors: 0,
        }
    }

    /// What the host is told about this connection.
    pub fn info(&self) -> &SessionInfo {
        &self.info
    }

    /// The next thing to do, in order; `None` when the session needs input or an answer.
    pub fn next_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// True when the session can use more input (not waiting for the host, TLS, or closed).
    pub fn wants_input(&self) -> bool {
        matches!(
            self.phase,
            Phase::Command
                | Phase::AuthPlain
                | Phase::AuthLoginUser
                | Phase::AuthLoginPassword(_)
                | Phase::Data(_)
        )
    }

    /// True once the session has decided to close.
    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    /// Which timeout the driver should apply to its next read.
    pub fn waiting_for(&self) -> WaitingFor {
        if matches!(self.phase, Phase::Data(_)) { WaitingFor::Data } else { WaitingFor::Command }
    }

    /// Feeds received bytes and processes as much as possible.
    pub fn receive(&mut self, bytes: &[u8]) {
        if self.is_closed() {
            return;
        }
        self.input.extend_from_slice(bytes);
        self.process();
    }

    /// The driver's read timed out: 421 4.4.2 and close.
    pub fn timed_out(&mut self) {
        self.close_with(Reply::new(
            421,
            codes::TIMEOUT,
            format!("{} Timeout waiting for input, closing connection", self.config.hostname),
        ));
    }

    /// The server is shutting down: 421 4.3.2 and close.
    pub fn shutting_down(&mut self) {
        self.close_with(Reply::new(
            421,
            codes::SHUTTING_DOWN,
            format!("{} Service shutting down, closing connection", self.config.hostname),
        ));
    }

    /// The TLS handshake after STARTTLS succeeded: forget everything learnt before it
    /// (RFC 3207 § 4.2: HELO, AUTH, transaction) and read commands again.
    pub fn tls_established(&mut self, tls: TlsInfo) -> Result<(), UnexpectedAnswer> {
        if !matches!(self.phase, Phase::TlsHandshake) {
            return Err(UnexpectedAnswer { answer: "a TLS handshake", state: self.phase.name() });
        }
        self.info = SessionInfo { peer: self.info.peer, tls: Some(tls), ..SessionInfo::default() };
        self.transaction = None;
        self.input.clear();
        self.phase = Phase::Command;
        self.process();
        Ok(())
    }

    /// The host's verdict on an [`Action::Authenticate`].
    pub fn auth_outcome(&mut self, outcome: AuthOutcome) -> Result<(), UnexpectedAnswer> {
        if !matches!(self.phase, Phase::AwaitAuth(_)) {
            return self.unexpected("an authentication verdict");
        }
        let Phase::AwaitAuth(username) = std::mem::replace(&mut self.phase, Phase::Command) else {
            return self.unexpected("an authentication verdict");
        };
        match outcome {
            AuthOutcome::Accepted => {
                tracing::info!(user = %username, "authenticated");
                self.info.authenticated_as = Some(username);
                self.reply(Reply::new(235, codes::AUTH_OK, "Authentication successful"));
            }
            AuthOutcome::Rejected => {
                tracing::info!(user = %username, "authentication failed");
                self.error(Reply::new(535, codes::AUTH_FAILED, "Authentication credentials invalid"));
            }
            AuthOutcome::TemporaryFailure => self.reply(Reply::new(
                454,
                codes::TEMP_SECURITY,
                "Temporary authentication failure, try later",
            )),
        }
        self.process();
        Ok(())
    }

    /// The host's verdict on an [`Action::CheckSender`].
    pub fn sender_outcome(&mut self, outcome: Result<(), Refusal>) -> Result<(), UnexpectedAnswer> {
        if !matches!(self.phase, Phase::AwaitSender(..)) {
            return self.unexpected("a sender verdict");
        }
        let Phase::AwaitSender(from, params) = std::mem::replace(&mut self.phase, Phase::Command) else {
            return self.unexpected("a sender verdict");
        };
        match outcome {
            Ok(()) => {
                self.reply(Reply::new(250, codes::SENDER_OK, format!("Sender {from} OK")));
                self.transaction = Some(Transaction { from, params, recipients: Vec::new() });
            }
            Err(refusal) => self.refused(refusal.reply()),
        }
        self.process();
        Ok(())
    }

    /// The host's verdict on an [`Action::CheckRecipient`].
    pub fn recipient_outcome(&mut self, outcome: Result<(), Refusal>) -> Result<(), UnexpectedAnswer> {
        if !matches!(self.phase, Phase::AwaitRecipient(_)) {
            return self.unexpected("a recipient verdict");
        }
        let Phase::AwaitRecipient(recipient) = std::mem::replace(&mut self.phase, Phase::Command) else {
            return self.unexpected("a recipient verdict");
        };
        match (outcome, self.transaction.as_mut()) {
            (Ok(()), Some(transaction)) => {
                let text = format!("Recipient <{}> OK", recipient.address);
                transaction.recipients.push(recipient);
                self.reply(Reply::new(250, codes::RECIPIENT_OK, text));
            }
            (Ok(()), None) => self.reply(Reply::new(503, codes::INVALID_COMMAND, "Need MAIL before RCPT")),
            (Err(refusal), _) => self.refused(refusal.reply()),
        }
        self.process();
        Ok(())
    }

    /// The host's verdict on an [`Action::Deliver`].
    pub fn delivery_outcome(
        &mut self,
        outcome: Result<DeliveryReceipt, Refusal>,
    ) -> Result<(), UnexpectedAnswer> {
        if !matches!(self.phase, Phase::AwaitDelivery) {
            return self.unexpected("a delivery verdict");
        }
        self.phase = Phase::Command;
        match outcome {
            Ok(receipt) => {
                self.reply(Reply::new(250, codes::OK, format!("Message accepted, queued as {}", receipt.id)))
            }
            Err(refusal) => self.reply(refusal.reply()),
        }
        self.process();
        Ok(())
    }

    fn unexpected(&self, answer: &'static str) -> Result<(), UnexpectedAnswer> {
        Err(UnexpectedAnswer { answer, state: self.phase.name() })
    }

    fn reply(&mut self, reply: Reply) {
        self.actions.push_back(Action::Reply(reply));
    }

    /// A host refusal: sent as is, not counted (the host decides its own policy).
    fn refused(&mut self, reply: Reply) {
        self.reply(reply);
    }

    /// A 5xx caused by the client's command: counted towards `max_errors`.
    fn error(&mut self, reply: Reply) {
        self.errors += 1;
        self.reply(reply);
        if self.errors >= self.config.max_errors {
            tracing::info!(errors = self.errors, "too many errors, closing");
            self.close_with(Reply::new(421, codes::TEMP_SECURITY, "Too many errors, closing connection"));
        }
    }

    fn close_with(&mut self, reply: Reply) {
        if self.is_closed() {
            return;
        }
        self.reply(reply);
        self.actions.push_back(Action::Close);
        self.phase = Phase::Closed;
        self.input.clear();
    }

    fn process(&mut self) {
        loop {
            match &mut self.phase {
                Phase::Data(receiver) => {
                    let ended = receiver.scan(&self.input);
                    match ended {
                        None => {
                            self.input.clear();
                            return;
                        }
                        Some(used) => {
                            self.input.drain(..used);
                            let Phase::Data(receiver) = std::mem::replace(&mut self.phase, Phase::Command)
                            else {
                                return;
                            };
                            self.data_end(*receiver);
                        }
                    }
                }
                Phase::Command | Phase::AuthPlain | Phase::AuthLoginUser | Phase::AuthLoginPassword(_) => {
                    let Some(line) = self.take_line() else { return };
                    self.line(line);
                }
                _ => return,
            }
        }
    }

    fn line_limit(&self) -> usize {
        let auth = !matches!(self.phase, Phase::Command)
            || self.input.get(..5).is_some_and(|p| p.eq_ignore_ascii_case(b"AUTH "));
        if auth { MAX_AUTH_LINE } else { MAX_COMMAND_LINE }
    }

    /// The next complete line without its line ending, or `None` for more input. Over-long
    /// lines are answered with 500 and skipped without buffering them.
    fn take_line(&mut self) -> Option<Zeroizing<Vec<u8>>> {
        loop {
            let limit = self.line_limit();
            let Some(end) = self.input.iter().position(|&b| b == b'\n') else {
                if self.input.len() > limit {
                    self.discarding = true;
                    self.wipe_input_spare();
                    self.input.clear();
                }
                return None;
            };
            let mut line = Zeroizing::new(self.input.drain(..=end).collect::<Vec<u8>>());
            self.wipe_input_spare();
            if std::mem::take(&mut self.discarding) || line.len() > limit {
                self.phase = Phase::Command;
                self.error(Reply::new(500, codes::SYNTAX, format!("Line too long (limit {limit} octets)")));
                if self.is_closed() {
                    return None;
                }
                continue;
            }
            // Lenient: a bare LF ends a command line too.
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Some(line);
        }
    }

    /// Bytes drained from the input (AUTH lines carry passwords) stay in the vector's spare
    /// capacity; overwrite them.
    fn wipe_input_spare(&mut self) {
        for b in self.input.spare_capacity_mut() {
            b.write(0);
        }
    }

    fn line(&mut self, line: Zeroizing<Vec<u8>>) {
        match std::mem::replace(&mut self.phase, Phase::Command) {
            Phase::AuthPlain => self.auth_plain_response(&line),
            Phase::AuthLoginUser => self.auth_login_user(&line),
            Phase::AuthLoginPassword(username) => self.auth_login_password(username, &line),
            _ => self.command(&line),
        }
    }

    fn command(&mut self, line: &[u8]) {
        let Ok(text) = std::str::from_utf8(line) else {
            return self.error(Reply::new(500, codes::SYNTAX, "Command is not valid UTF-8"));
        };
        let (verb, args) = text.split_once(' ').unwrap_or((text, ""));
        let verb = verb.to_ascii_uppercase();
        let args = args.trim_start_matches(' ');
        // Only the verb is logged: arguments may carry credentials (AUTH) or addresses.
        tracing::trace!(command = %verb.chars().take(16).collect::<String>(), "command");
        match verb.as_str() {
            "EHLO" => self.helo(args, true),
            "HELO" => self.helo(args, false),
            "MAIL" => self.mail(args),
            "RCPT" => self.rcpt(args),
            "DATA" => self.data(args),
            "RSET" => {
                if !args.is_empty() {
                    return self.error(Reply::new(501, codes::BAD_ARGUMENTS, "RSET takes no arguments"));
                }
                self.transaction = None;
                self.reply(Reply::new(250, codes::OK, "Reset OK"));
            }
            "NOOP" => self.reply(Reply::new(250, codes::OK, "OK")),
            "QUIT" => self.close_with(Reply::new(
                221,
                codes::OK,
                format!("{} Service closing transmission channel", self.config.hostname),
            )),
            "VRFY" => self.reply(Reply::new(
                252,
                codes::VRFY,
                "Cannot VRFY user, but will accept message and attempt delivery",
            )),
            "EXPN" => self.error(Reply::new(502, codes::INVALID_COMMAND, "EXPN is not supported")),
            "HELP" => self.reply(Reply {
                code: 214,
                enhanced: Some(codes::OK),
                lines: vec![
                    "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP STARTTLS AUTH".into(),
                    "See RFC 5321 for their use".into(),
                ],
            }),
            "STARTTLS" => self.starttls(args),
            "AUTH" => self.auth(args),
            "" => self.error(Reply::new(500, codes::SYNTAX, "Empty command")),
            _ => self.error(Reply::new(500, codes::SYNTAX, "Command not recognized")),
        }
    }

    fn helo(&mut self, args: &str, esmtp: bool) {
        let name = args.trim();
        if name.is_empty() || name.contains(' ') {
            let verb = if esmtp { "EHLO" } else { "HELO" };
            return self.error(Reply::new(501, codes::BAD_ARGUMENTS, format!("Syntax: {verb} <hostname>")));
        }
        // RFC 5321 § 4.1.4: EHLO/HELO resets any transaction.
        self.transaction = None;
        self.info.helo = Some(name.to_owned());
        self.info.esmtp = esmtp;
        let greets = format!("{} greets {name}", self.config.hostname);
        if !esmtp {
            return self.reply(Reply::plain(250, greets));
        }
        let mut lines = vec![
            greets,
            "PIPELINING".into(),
            format!("SIZE {}", self.config.max_message_size),
            "8BITMIME".into(),
            "ENHANCEDSTATUSCODES".into(),
            "DSN".into(),
        ];
        if self.config.smtputf8 {
            lines.push("SMTPUTF8".into());
        }
        if self.config.policy.offer_starttls && self.info.tls.is_none() {
            lines.push("STARTTLS".into());
        }
        if self.auth_available() && self.info.authenticated_as.is_none() {
            lines.push("AUTH PLAIN LOGIN".into());
        }
        lines.push("HELP".into());
        self.reply(Reply { code: 250, enhanced: None, lines });
    }

    fn auth_available(&self) -> bool {
        let policy = &self.config.policy;
        policy.offer_auth && (self.info.tls.is_some() || !policy.auth_requires_tls)
    }

    fn starttls(&mut self, args: &str) {
        if !args.is_empty() {
            return self.error(Reply::new(501, codes::BAD_ARGUMENTS, "STARTTLS takes no arguments"));
        }
        if self.info.tls.is_some() {
            return self.error(Reply::new(503, codes::INVALID_COMMAND, "TLS is already active"));
        }
        if !self.config.policy.offer_starttls {
            return self.error(Reply::new(502, codes::INVALID_COMMAND, "STARTTLS is not offered here"));
        }
        if !self.input.is_empty() {
            // Whatever follows STARTTLS in the same flight would be taken as sent inside TLS
            // (CVE-2011-0411 command injection): refuse and close rather than guess.
            tracing::info!("commands pipelined after STARTTLS, closing");
            self.errors += 1;
            return self.close_with(Reply::new(
                554,
                codes::INVALID_COMMAND,
                "Commands pipelined after STARTTLS are refused, closing connection",
            ));
        }
        self.reply(Reply::new(220, codes::OK, "Ready to start TLS"));
        self.actions.push_back(Action::StartTls);
        self.phase = Phase::TlsHandshake;
    }

    fn auth(&mut self, args: &str) {
        if !self.config.policy.offer_auth {
            return self.error(Reply::new(502, codes::INVALID_COMMAND, "AUTH is not offered here"));
        }
        if self.info.helo.is_none() || !self.info.esmtp {
            return self.error(Reply::new(503, codes::INVALID_COMMAND, "Send EHLO first"));
        }
        if !self.auth_available() {
            return self.error(Reply::new(
                538,
                codes::ENCRYPTION_REQUIRED,
                "Encryption required for requested authentication mechanism, use STARTTLS",
            ));
        }
        if self.info.authenticated_as.is_some() {
            return self.error(Reply::new(503, codes::INVALID_COMMAND, "Already authenticated"));
        }
        if self.transaction.is_some() {
            return self.error(Reply::new(
                503,
                codes::INVALID_COMMAND,
                "AUTH is not allowed during a transaction",
            ));
        }
        let (mechanism, initial) = args.split_once(' ').unwrap_or((args, ""));
        let initial = initial.trim();
        match mechanism.to_ascii_uppercase().as_str() {
            "PLAIN" if initial.is_empty() => {
                self.reply(Reply::plain(334, ""));
                self.phase = Phase::AuthPlain;
            }
            "PLAIN" => self.auth_plain_response(initial.as_bytes()),
            "LOGIN" if initial.is_empty() => {
                self.reply(Reply::plain(334, "VXNlcm5hbWU6"));
                self.phase = Phase::AuthLoginUser;
            }
            "LOGIN" => self.auth_login_user(initial.as_bytes()),
            "" => self.error(Reply::new(
                501,
                codes::BAD_ARGUMENTS,
                "Syntax: AUTH <mechanism> [initial-response]",
            )),
            _ => self.error(Reply::new(504, codes::BAD_ARGUMENTS, "Unrecognized authentication mechanism")),
        }
    }

    /// Decodes one SASL response; `None` after answering the cancel or decode error.
    fn sasl_response(&mut self, line: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        if line == b"*" {
            self.error(Reply::new(501, codes::CANCELLED, "Authentication cancelled"));
            return None;
        }
        // RFC 4954 § 4: "=" is an empty initial response.
        if line == b"=" {
            return Some(Zeroizing::new(Vec::new()));
        }
        match B64.decode(line) {
            Ok(decoded) => Some(Zeroizing::new(decoded)),
            Err(_) => {
                self.error(Reply::new(501, codes::SYNTAX, "Cannot decode the base64 response"));
                None
            }
        }
    }

    fn auth_plain_response(&mut self, line: &[u8]) {
        let Some(decoded) = self.sasl_response(line) else { return };
        let mut parts = decoded.split(|&b| b == 0);
        let (Some(authzid), Some(authcid), Some(password), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return self.error(Reply::new(
                501,
                codes::SYNTAX,
                "Malformed PLAIN response (authzid NUL user NUL password)",
            ));
        };
        let (Ok(authzid), Ok(username), Ok(password)) =
            (std::str::from_utf8(authzid), std::str::from_utf8(authcid), std::str::from_utf8(password))
        else {
            return self.error(Reply::new(501, codes::SYNTAX, "PLAIN response is not valid UTF-8"));
        };
        if username.is_empty() {
            return self.error(Reply::new(501, codes::SYNTAX, "PLAIN response has an empty user name"));
        }
        let authzid = (!authzid.is_empty() && authzid != username).then(|| authzid.to_owned());
        self.ask_auth(Credentials {
            mechanism: AuthMechanism::Plain,
            authzid,
            username: username.to_owned(),
            password: Zeroizing::new(password.to_owned()),
        });
    }

    fn auth_login_user(&mut self, line: &[u8]) {
        let Some(decoded) = self.sasl_response(line) else { return };
        match String::from_utf8(decoded.to_vec()) {
            Ok(username) if !username.is_empty() => {
                self.reply(Reply::plain(334, "UGFzc3dvcmQ6"));
                self.phase = Phase::AuthLoginPassword(Zeroizing::new(username));
            }
            _ => self.error(Reply::new(501, codes::SYNTAX, "LOGIN user name is empty or not UTF-8")),
        }
    }

    fn auth_login_password(&mut self, username: Zeroizing<String>, line: &[u8]) {
        let Some(decoded) = self.sasl_response(line) else { return };
        let Ok(password) = std::str::from_utf8(&decoded) else {
            return self.error(Reply::new(501, codes::SYNTAX, "LOGIN password is not UTF-8"));
        };
        self.ask_auth(Credentials {
            mechanism: AuthMechanism::Login,
            authzid: None,
            username: username.to_string(),
            password: Zeroizing::new(password.to_owned()),
        });
    }

    fn ask_auth(&mut self, credentials: Credentials) {
        self.phase = Phase::AwaitAuth(credentials.username.clone());
        self.actions.push_back(Action::Authenticate(credentials));
    }

    /// Checks shared by MAIL: greeting done, TLS and AUTH as the policy requires.
    fn mail_allowed(&mut self) -> bool {
        if self.info.helo.is_none() {
            self.error(Reply::new(503, codes::INVALID_COMMAND, "Send EHLO or HELO first"));
            return false;
        }
        if self.config.policy.mail_requires_tls && self.info.tls.is_none() {
            self.error(Reply::new(530, codes::SECURITY, "Must issue a STARTTLS command first"));
            return false;
        }
        if self.config.policy.mail_requires_auth && self.info.authenticated_as.is_none() {
            self.error(Reply::new(530, codes::SECURITY, "Authentication required"));
            return false;
        }
        true
    }

    fn mail(&mut self, args: &str) {
        if !self.mail_allowed() {
            return;
        }
        if self.transaction.is_some() {
            return self.error(Reply::new(503, codes::INVALID_COMMAND, "Sender already specified"));
        }
        let Some(rest) = args.get(..5).filter(|p| p.eq_ignore_ascii_case("FROM:")).map(|_| &args[5..]) else {
            return self.error(Reply::new(501, codes::SYNTAX, "Syntax: MAIL FROM:<address> [parameters]"));
        };
        let (path, params) = split_path(rest);
        let params = params.split_whitespace();
        if !self.info.esmtp && params.clone().next().is_some() {
            return self.error(Reply::new(555, codes::BAD_ARGUMENTS, "Parameters require EHLO"));
        }
        let params = match parse_mail_params(params, self.config.smtputf8) {
            Ok(params) => params,
            Err(e) => return self.param_error(e),
        };
        if let Some(size) = params.size.filter(|&s| s > self.config.max_message_size) {
            return self.refused(Reply::new(
                552,
                codes::SIZE_EXCEEDED,
                format!(
                    "Message size {size} exceeds fixed maximum message size of {} octets",
                    self.config.max_message_size
                ),
            ));
        }
        let from = match parse_reverse_path(path, params.smtputf8) {
            Ok(from) => from,
            Err(e) => return self.address_error(e, codes::BAD_SENDER_SYNTAX, "sender"),
        };
        tracing::debug!(%from, "MAIL FROM");
        self.phase = Phase::AwaitSender(from.clone(), params.clone());
        self.actions.push_back(Action::CheckSender { from, params });
    }

    fn param_error(&mut self, e: ParamError) {
        let code = if matches!(e, ParamError::Unknown(_)) { 555 } else { 501 };
        self.error(Reply::new(code, codes::BAD_ARGUMENTS, e.to_string()));
    }

    fn address_error(&mut self, e: AddressError, enhanced: EnhancedCode, role: &str) {
        if e == AddressError::NonAscii {
            return self.error(Reply::new(553, codes::NON_ASCII_ADDRESS, format!("Bad {role} address: {e}")));
        }
        self.error(Reply::new(501, enhanced, format!("Bad {role} address syntax: {e}")));
    }

    fn rcpt(&mut self, args: &str) {
        let Some(transaction) = &self.transaction else {
            return self.error(Reply::new(503, codes::INVALID_COMMAND, "Need MAIL before RCPT"));
        };
        let utf8 = transaction.params.smtputf8;
        if transaction.recipients.len() >= self.config.max_recipients {
            return self.refused(Reply::new(452, codes::TOO_MANY_RECIPIENTS, "Too many recipients"));
        }
        let Some(rest) = args.get(..3).filter(|p| p.eq_ignore_ascii_case("TO:")).map(|_| &args[3..]) else {
            return self.error(Reply::new(501, codes::SYNTAX, "Syntax: RCPT TO:<address> [parameters]"));
        };
        let (path, params) = split_path(rest);
        let params = params.split_whitespace();
        if !self.info.esmtp && params.clone().next().is_some() {
            return self.error(Reply::new(555, codes::BAD_ARGUMENTS, "Parameters require EHLO"));
        }
        let params = match parse_rcpt_params(params) {
            Ok(params) => params,
            Err(e) => return self.param_error(e),
        };
        let to = match parse_forward_path(path, utf8, &self.config.hostname) {
            Ok(to) => to,
            Err(e) => return self.address_error(e, codes::BAD_DESTINATION_SYNTAX, "destination"),
        };
        tracing::debug!(%to, "RCPT TO");
        self.phase = Phase::AwaitRecipient(Recipient { address: to.clone(), params: params.clone() });
        self.actions.push_back(Action::CheckRecipient { to, params });
    }

    fn data(&mut self, args: &str) {
        if !args.is_empty() {
            return self.error(Reply::new(501, codes::BAD_ARGUMENTS, "DATA takes no arguments"));
        }
        let Some(transaction) = &self.transaction else {
            return self.error(Reply::new(503, codes::INVALID_COMMAND, "Need MAIL before DATA"));
        };
        if transaction.recipients.is_empty() {
            return self.error(Reply::new(554, codes::INVALID_COMMAND, "No valid recipients"));
        }
        let header = crate::trace::received_header(
            &self.config.hostname,
            &self.info,
            &transaction.recipients,
            std::time::SystemTime::now(),
        );
        let mut message = Vec::with_capacity(header.len() + 16 * 1024);
        message.extend_from_slice(header.as_bytes());
        self.reply(Reply::plain(354, "Start mail input; end with <CRLF>.<CRLF>"));
        self.phase = Phase::Data(Box::new(DataReceiver {
            scan: Scan::LineStart,
            message,
            size: 0,
            limit: self.config.max_message_size,
            overflow: false,
            bare_line_ending: false,
        }));
    }

    fn data_end(&mut self, receiver: DataReceiver) {
        let Some(transaction) = self.transaction.take() else {
            return self.reply(Reply::new(503, codes::INVALID_COMMAND, "Need MAIL before DATA"));
        };
        if receiver.overflow {
            tracing::info!(size = receiver.size, "message over the size limit refused");
            return self.refused(Reply::new(
                552,
                codes::SIZE_EXCEEDED,
                format!("Message size exceeds fixed maximum message size of {} octets", receiver.limit),
            ));
        }
        if receiver.bare_line_ending {
            return self.refused(Reply::new(
                554,
                codes::MEDIA,
                "Message refused: bare CR or LF line ending (RFC 5321 section 2.3.8 requires CRLF)",
            ));
        }
        tracing::debug!(size = receiver.size, recipients = transaction.recipients.len(), "message received");
        let envelope = MailEnvelope {
            from: transaction.from,
            params: transaction.params,
            recipients: transaction.recipients,
            session: self.info.clone(),
        };
        self.phase = Phase::AwaitDelivery;
        self.actions.push_back(Action::Deliver { envelope, message: receiver.message });
    }
}

impl Drop for ServerSession {
    fn drop(&mut self) {
        // Unprocessed input may hold a pipelined AUTH response.
        self.input.zeroize();
    }
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
