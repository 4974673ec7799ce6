//! One client connection: the session state machine (not authenticated → authenticated →
//! selected → logout, RFC 3501 3) executing parsed commands against the store and the vault,
//! driven over any `AsyncRead + AsyncWrite` stream.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use qutemail_store::{
    Account, AuthError, ExpungeScope, FlagChange, FlagOp, Flags, LoginGate, Mailbox, MessageMeta, NumberSet,
    Selection, StoreError,
};
use qutemail_vault::{AppendRequest, Protection, VaultError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use zeroize::Zeroizing;

use crate::mime;
use crate::parse::{
    Command, FetchAttr, Frame, Framer, SearchKey, Section, SectionKind, StatusItem, StoreOp, Tagged,
    parse_command,
};
use crate::response::{
    epoch_secs, flag_list, internal_date, mailbox_name, message_flags, one_line, quoted_or_literal,
};
use crate::server::Shared;

/// How a session's run over one stream ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Exit {
    /// LOGOUT, timeout, shutdown, or the client left.
    Closed,
    /// STARTTLS accepted: the caller wraps the stream and runs the session again.
    StartTls,
}

/// A command could not be completed: the tagged answer to give.
enum Fail {
    No(String),
    Bad(String),
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Self {
        Fail::No(store_refusal(&e))
    }
}

impl From<std::io::Error> for Fail {
    fn from(e: std::io::Error) -> Self {
        Fail::No(format!("[UNAVAILABLE] connection failure: {e}"))
    }
}

fn store_refusal(e: &StoreError) -> String {
    match e {
        StoreError::NoSuchMailbox(_) => "[NONEXISTENT] No such mailbox".into(),
        StoreError::MailboxExists(_) => "[ALREADYEXISTS] Mailbox already exists".into(),
        StoreError::InboxProtected(what) => format!("[CANNOT] INBOX cannot be {what}"),
        StoreError::Invalid { what, reason } => format!("[CANNOT] Invalid {what}: {}", one_line(reason)),
        StoreError::QuotaExceeded { .. } => "[OVERQUOTA] Quota exceeded".into(),
        other => {
            tracing::error!(error = %other, "mail store failure");
            "[SERVERBUG] The mail store failed; try again later".into()
        }
    }
}

type Done = Result<String, Fail>;

/// What the session knows of its selected mailbox: the sequence-number map and the flags the
/// client has been told, so that only real changes are pushed.
struct Selected {
    mailbox: Mailbox,
    read_only: bool,
    uids: Vec<u32>,
    flags: HashMap<u32, (Flags, BTreeSet<String>)>,
    modseq: u64,
    /// Expunged by others, not yet announced (EXPUNGE is not allowed during FETCH, STORE
    /// and SEARCH: RFC 3501 7.4.1).
    pending_expunge: BTreeSet<u32>,
}

impl Selected {
    fn seq_of(&self, uid: u32) -> Option<u32> {
        self.uids.binary_search(&uid).ok().and_then(|i| u32::try_from(i + 1).ok())
    }

    /// The UIDs a client's set addresses, against what the client knows.
    fn resolve(&self, set: &NumberSet, uid: bool) -> NumberSet {
        let last = self.uids.last().copied().unwrap_or(0);
        let count = u32::try_from(self.uids.len()).unwrap_or(u32::MAX);
        let mut out = Vec::new();
        for r in set.ranges() {
            if uid {
                let star = |n: u32| if n == u32::MAX { last } else { n };
                let (a, b) = (star(*r.start()), star(*r.end()));
                let (lo, hi) = (a.min(b), a.max(b));
                let from = self.uids.partition_point(|&u| u < lo);
                out.extend(self.uids[from..].iter().take_while(|&&u| u <= hi).copied());
            } else {
                let star = |n: u32| if n == u32::MAX { count } else { n };
                let (a, b) = (star(*r.start()), star(*r.end()));
                let (lo, hi) = (a.min(b).max(1), a.max(b).min(count));
                for seq in lo..=hi {
                    if let Some(&u) = usize::try_from(seq - 1).ok().and_then(|i| self.uids.get(i)) {
                        out.push(u);
                    }
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        NumberSet::from_numbers(out)
    }
}

pub(crate) struct Session {
    shared: Arc<Shared>,
    peer: IpAddr,
    tls: bool,
    account: Option<Account>,
    selected: Option<Selected>,
    condstore: bool,
    out: Vec<u8>,
    logout: bool,
}

const FLUSH_AT: usize = 256 * 1024;
/// Largest literal accepted before login.
const PREAUTH_LITERAL: u64 = 8 * 1024;

impl Session {
    pub(crate) fn new(shared: Arc<Shared>, peer: IpAddr, tls: bool) -> Self {
        Self {
            shared,
            peer,
            tls,
            account: None,
            selected: None,
            condstore: false,
            out: Vec::new(),
            logout: false,
        }
    }

    /// Before login only small literals (a user name, a password) are accepted, so that an
    /// anonymous client cannot make the server hold a message-sized buffer.
    fn literal_limit(&self) -> u64 {
        if self.account.is_some() { self.shared.config.max_message_bytes } else { PREAUTH_LITERAL }
    }

    pub(crate) fn set_tls(&mut self) {
        self.tls = true;
    }

    pub(crate) fn capabilities(&self) -> String {
        let mut c = String::from("IMAP4rev1");
        if self.account.is_none() {
            if self.tls {
                c.push_str(" AUTH=PLAIN SASL-IR");
            } else {
                c.push_str(" STARTTLS LOGINDISABLED");
            }
        }
        c.push_str(" LITERAL+ ID ENABLE IDLE UIDPLUS MOVE SPECIAL-USE NAMESPACE UNSELECT CHILDREN CONDSTORE");
        c
    }

    pub(crate) fn greeting(&self) -> String {
        format!("* OK [CAPABILITY {}] QuteMail IMAP server ready\r\n", self.capabilities())
    }

    fn untagged(&mut self, line: &str) {
        self.out.extend_from_slice(b"* ");
        self.out.extend_from_slice(line.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    async fn flush<S: AsyncWrite + Unpin>(&mut self, io: &mut S) -> std::io::Result<()> {
        if !self.out.is_empty() {
            io.write_all(&self.out).await?;
            self.out.clear();
            // An idle session should not keep the buffer of its largest FETCH.
            if self.out.capacity() > FLUSH_AT {
                self.out = Vec::new();
            }
        }
        io.flush().await
    }

    /// Runs the session over `io` until it ends or asks for TLS.
    pub(crate) async fn run<S>(&mut self, io: &mut S) -> std::io::Result<Exit>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let mut framer = Framer::new(self.literal_limit());
        let mut shutdown = self.shared.shutdown.subscribe();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            while let Some(frame) = framer.next_frame() {
                match frame {
                    Frame::Continue => {
                        self.out.extend_from_slice(b"+ Ready for literal data\r\n");
                    }
                    Frame::TooBig { tag, size, non_sync } => {
                        tracing::info!(peer = %self.peer, size, "literal larger than allowed refused");
                        let max = self.literal_limit();
                        if non_sync || tag.is_empty() {
                            self.untagged(&format!("BYE [TOOBIG] Literal of {size} octets exceeds {max}"));
                            self.flush(io).await?;
                            return Ok(Exit::Closed);
                        }
                        self.out.extend_from_slice(
                            format!(
                                "{tag} NO [TOOBIG] Literal of {size} octets exceeds the limit of {max}\r\n"
                            )
                            .as_bytes(),
                        );
                    }
                    Frame::LineTooLong => {
                        self.untagged("BYE Command line too long");
                        self.flush(io).await?;
                        return Ok(Exit::Closed);
                    }
                    Frame::Command(bytes) => {
                        match parse_command(&bytes) {
                            Ok(tagged) => {
                                if let Some(exit) = self.execute(tagged, io, &mut framer, &mut buf).await? {
                                    self.flush(io).await?;
                                    return Ok(exit);
                                }
                                framer.set_max_literal(self.literal_limit());
                            }
                            Err(e) => {
                                let line = match e.tag {
                                    Some(tag) => format!("{tag} BAD {}\r\n", one_line(&e.message)),
                                    None => format!("* BAD {}\r\n", one_line(&e.message)),
                                };
                                self.out.extend_from_slice(line.as_bytes());
                            }
                        }
                        if self.logout {
                            self.flush(io).await?;
                            return Ok(Exit::Closed);
                        }
                    }
                }
            }
            self.flush(io).await?;
            framer.release_memory();
            framer.set_max_literal(self.literal_limit());
            let timeout = if self.account.is_some() {
                self.shared.config.idle_timeout
            } else {
                self.shared.config.preauth_timeout
            };
            let n = tokio::select! {
                r = tokio::time::timeout(timeout, io.read(&mut buf)) => match r {
                    Ok(r) => r?,
                    Err(_) => {
                        tracing::info!(peer = %self.peer, "session timed out");
                        self.untagged("BYE Autologout; idle for too long");
                        self.flush(io).await?;
                        return Ok(Exit::Closed);
                    }
                },
                _ = shutdown.changed() => {
                    self.untagged("BYE Server shutting down");
                    self.flush(io).await?;
                    return Ok(Exit::Closed);
                }
            };
            if n == 0 {
                if framer.mid_command() {
                    tracing::info!(peer = %self.peer, "client vanished in the middle of a command");
                }
                return Ok(Exit::Closed);
            }
            framer.feed(&buf[..n]);
        }
    }

    /// Runs one command. `Some(exit)` ends this run.
    async fn execute<S>(
        &mut self,
        tagged: Tagged,
        io: &mut S,
        framer: &mut Framer,
        buf: &mut [u8],
    ) -> std::io::Result<Option<Exit>>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let Tagged { tag, command } = tagged;
        let name = command_name(&command);
        tracing::debug!(peer = %self.peer, command = name, "command");
        let authenticated = self.account.is_some();
        let selected = self.selected.is_some();
        let state_error = match &command {
            Command::Capability | Command::Noop | Command::Logout | Command::Id => None,
            Command::StartTls | Command::Login { .. } | Command::Authenticate { .. } if authenticated => {
                Some("Already authenticated")
            }
            Command::StartTls | Command::Login { .. } | Command::Authenticate { .. } => None,
            _ if !authenticated => Some("Log in first"),
            Command::Check
            | Command::Close
            | Command::Unselect
            | Command::Expunge(_)
            | Command::Search { .. }
            | Command::Fetch { .. }
            | Command::Store { .. }
            | Command::Copy { .. }
                if !selected =>
            {
                Some("No mailbox selected")
            }
            _ => None,
        };
        if let Some(why) = state_error {
            self.out.extend_from_slice(format!("{tag} BAD {why}\r\n").as_bytes());
            return Ok(None);
        }
        // EXPUNGE responses are not allowed while a non-UID FETCH, STORE or SEARCH is running.
        let expunge_ok = !matches!(
            command,
            Command::Fetch { uid: false, .. }
                | Command::Store { uid: false, .. }
                | Command::Search { uid: false, .. }
        );
        let result = match command {
            Command::Capability => {
                let caps = self.capabilities();
                self.untagged(&format!("CAPABILITY {caps}"));
                Ok("CAPABILITY completed".into())
            }
            Command::Noop | Command::Check => Ok(format!("{name} completed")),
            Command::Logout => {
                self.untagged("BYE QuteMail IMAP server logging out");
                self.logout = true;
                Ok("LOGOUT completed".into())
            }
            Command::Id => {
                self.untagged("ID (\"name\" \"QuteMail\")");
                Ok("ID completed".into())
            }
            Command::Namespace => {
                self.untagged("NAMESPACE ((\"\" \"/\")) NIL NIL");
                Ok("NAMESPACE completed".into())
            }
            Command::Enable(caps) => {
                let mut enabled = Vec::new();
                for c in caps {
                    if c == "CONDSTORE" {
                        self.condstore = true;
                        enabled.push(c);
                    }
                }
                self.untagged(format!("ENABLED {}", enabled.join(" ")).trim_end());
                Ok("ENABLE completed".into())
            }
            Command::StartTls => {
                if self.tls {
                    Err(Fail::Bad("TLS is already active".into()))
                } else {
                    self.out.extend_from_slice(format!("{tag} OK Begin TLS negotiation now\r\n").as_bytes());
                    // Anything the client pipelined after STARTTLS was sent in the clear: drop it.
                    framer.clear();
                    return Ok(Some(Exit::StartTls));
                }
            }
            Command::Login { user, password } => self.login(&user, &password).await,
            Command::Authenticate { mechanism, initial } => {
                self.authenticate(&mechanism, initial, io, framer, buf).await?
            }
            Command::Select { mailbox, read_only, condstore } => {
                self.select(&mailbox, read_only, condstore).await
            }
            Command::Create(name) => self.create(&name).await,
            Command::Delete(name) => self.delete(&name).await,
            Command::Rename(from, to) => self.rename(&from, &to).await,
            Command::Subscribe(name) => self.subscribe(&name, true).await,
            Command::Unsubscribe(name) => self.subscribe(&name, false).await,
            Command::List { reference, pattern, subscribed_only } => {
                self.list(&reference, &pattern, subscribed_only).await
            }
            Command::Status { mailbox, items } => self.status(&mailbox, &items).await,
            Command::Append { mailbox, flags, date, message } => {
                self.append(&mailbox, &flags, date, message).await
            }
            Command::Close => self.close(true).await,
            Command::Unselect => self.close(false).await,
            Command::Expunge(set) => self.expunge(set).await,
            Command::Search { uid, key } => self.search(uid, &key).await,
            Command::Fetch { uid, set, attrs, changed_since } => {
                self.fetch(uid, &set, &attrs, changed_since, io).await
            }
            Command::Store { uid, set, op, silent, flags, unchanged_since } => {
                self.store(uid, &set, op, silent, &flags, unchanged_since).await
            }
            Command::Copy { uid, set, mailbox, is_move } => self.copy(uid, &set, &mailbox, is_move).await,
            Command::Idle => self.idle(io, framer, buf).await?,
        };
        if let Err(e) = self.sync(expunge_ok).await {
            tracing::warn!(error = %e, "could not refresh the selected mailbox");
        }
        let line = match result {
            Ok(text) => format!("{tag} OK {text}\r\n"),
            Err(Fail::No(text)) => format!("{tag} NO {text}\r\n"),
            Err(Fail::Bad(text)) => format!("{tag} BAD {text}\r\n"),
        };
        self.out.extend_from_slice(line.as_bytes());
        Ok(None)
    }

    fn account(&self) -> Result<&Account, Fail> {
        self.account.as_ref().ok_or_else(|| Fail::Bad("Log in first".into()))
    }

    fn sel(&self) -> Result<&Selected, Fail> {
        self.selected.as_ref().ok_or_else(|| Fail::Bad("No mailbox selected".into()))
    }

    // ---------------------------------------------------------------------------------------
    // Authentication
    // ---------------------------------------------------------------------------------------

    async fn login(&mut self, user: &str, password: &str) -> Done {
        if !self.tls {
            return Err(Fail::No("[PRIVACYREQUIRED] LOGIN is disabled until STARTTLS".into()));
        }
        self.check_credentials(user, password).await
    }

    async fn check_credentials(&mut self, user: &str, password: &str) -> Done {
        let throttle = &self.shared.config.login_throttle;
        match throttle.gate(user, self.peer, Instant::now()) {
            LoginGate::AddressRefused { retry_after } => {
                tracing::warn!(peer = %self.peer, "login refused: too many failed logins from this address");
                return Err(Fail::No(format!(
                    "[UNAVAILABLE] Too many failed logins from your address; try again in {} s",
                    retry_after.as_secs().max(1)
                )));
            }
            // Slows guessing without locking the account's owner out (see LoginThrottle).
            LoginGate::Proceed { delay } => tokio::time::sleep(delay).await,
        }
        match self.shared.store.authenticate(user, password).await {
            Ok(account) => {
                throttle.succeeded(user, self.peer);
                tracing::info!(peer = %self.peer, account = %account.address, "logged in");
                self.account = Some(account);
                Ok(format!("[CAPABILITY {}] Logged in", self.capabilities()))
            }
            Err(AuthError::Rejected) => {
                throttle.failed(user, self.peer, Instant::now());
                tracing::warn!(peer = %self.peer, "login failed");
                Err(Fail::No("[AUTHENTICATIONFAILED] Invalid credentials".into()))
            }
            Err(AuthError::Store(e)) => Err(Fail::No(store_refusal(&e))),
            Err(other) => {
                tracing::error!(error = %other, "authentication failed unexpectedly");
                Err(Fail::No("[UNAVAILABLE] Authentication is unavailable; try again later".into()))
            }
        }
    }

    async fn authenticate<S>(
        &mut self,
        mechanism: &str,
        initial: Option<Zeroizing<String>>,
        io: &mut S,
        framer: &mut Framer,
        buf: &mut [u8],
    ) -> std::io::Result<Done>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        if mechanism != "PLAIN" {
            return Ok(Err(Fail::No("[CANNOT] Only AUTHENTICATE PLAIN is supported".into())));
        }
        if !self.tls {
            return Ok(Err(Fail::No("[PRIVACYREQUIRED] Authentication is disabled until STARTTLS".into())));
        }
        let response = match initial {
            Some(r) => r,
            None => {
                self.out.extend_from_slice(b"+ \r\n");
                self.flush(io).await?;
                match self.read_line(io, framer, buf).await? {
                    Some(line) => Zeroizing::new(String::from_utf8_lossy(&line).into_owned()),
                    None => return Ok(Err(Fail::Bad("Connection closed during authentication".into()))),
                }
            }
        };
        if response.trim() == "*" {
            return Ok(Err(Fail::Bad("Authentication cancelled".into())));
        }
        let decoded = match base64::engine::general_purpose::STANDARD.decode(response.trim()) {
            Ok(d) => Zeroizing::new(d),
            Err(_) => return Ok(Err(Fail::Bad("The PLAIN response is not valid base64".into()))),
        };
        let fields: Vec<&[u8]> = decoded.split(|&b| b == 0).collect();
        let [authzid, authcid, password] = fields[..] else {
            return Ok(Err(Fail::Bad("The PLAIN response needs authzid, authcid and password".into())));
        };
        if !authzid.is_empty() && authzid != authcid {
            return Ok(Err(Fail::No("[AUTHORIZATIONFAILED] Acting as another user is not allowed".into())));
        }
        let (Ok(user), Ok(password)) = (std::str::from_utf8(authcid), std::str::from_utf8(password)) else {
            return Ok(Err(Fail::Bad("The PLAIN response is not UTF-8".into())));
        };
        let password = Zeroizing::new(password.to_owned());
        Ok(self.check_credentials(user, &password).await)
    }

    /// Reads one raw line (AUTHENTICATE response, IDLE's DONE); `None` when the client left.
    async fn read_line<S>(
        &mut self,
        io: &mut S,
        framer: &mut Framer,
        buf: &mut [u8],
    ) -> std::io::Result<Option<Vec<u8>>>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        loop {
            match framer.next_line() {
                Some(Ok(line)) => return Ok(Some(line)),
                Some(Err(_)) => return Ok(None),
                None => {}
            }
            let n = match tokio::time::timeout(self.shared.config.preauth_timeout, io.read(buf)).await {
                Ok(r) => r?,
                Err(_) => return Ok(None),
            };
            if n == 0 {
                return Ok(None);
            }
            framer.feed(&buf[..n]);
        }
    }

    // ---------------------------------------------------------------------------------------
    // Mailboxes
    // ---------------------------------------------------------------------------------------

    async fn mailbox(&self, name: &str) -> Result<Mailbox, Fail> {
        let account = self.account()?;
        Ok(self.shared.store.mailbox(account.id, name).await?)
    }

    async fn select(&mut self, name: &str, read_only: bool, condstore: bool) -> Done {
        if self.selected.take().is_some() {
            self.untagged("OK [CLOSED] Previous mailbox closed");
        }
        if condstore {
            self.condstore = true;
        }
        let mailbox = self.mailbox(name).await?;
        let store = &self.shared.store;
        // HIGHESTMODSEQ first: changes after it are picked up again by the next refresh.
        let status = store.status(mailbox.id).await?;
        let metas = store.fetch(mailbox.id, &Selection::All).await?;
        let uids: Vec<u32> = metas.iter().map(|m| m.uid).collect();
        let first_unseen = metas.iter().position(|m| !m.flags.contains(Flags::SEEN));
        let flags = metas.into_iter().map(|m| (m.uid, (m.flags, m.keywords))).collect();
        self.untagged("FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)");
        if read_only {
            self.untagged("OK [PERMANENTFLAGS ()] Read-only mailbox");
        } else {
            self.untagged(
                "OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)] Flags permitted",
            );
        }
        self.untagged(&format!("{} EXISTS", uids.len()));
        self.untagged("0 RECENT");
        if let Some(i) = first_unseen {
            self.untagged(&format!("OK [UNSEEN {}] First unseen message", i + 1));
        }
        self.untagged(&format!("OK [UIDVALIDITY {}] UIDs valid", status.uidvalidity));
        self.untagged(&format!("OK [UIDNEXT {}] Predicted next UID", status.uidnext));
        self.untagged(&format!("OK [HIGHESTMODSEQ {}] Highest", status.highestmodseq));
        tracing::debug!(mailbox = %mailbox.name, messages = uids.len(), "selected");
        self.selected = Some(Selected {
            mailbox,
            read_only,
            uids,
            flags,
            modseq: status.highestmodseq,
            pending_expunge: BTreeSet::new(),
        });
        Ok(if read_only {
            "[READ-ONLY] EXAMINE completed".into()
        } else {
            "[READ-WRITE] SELECT completed".into()
        })
    }

    async fn create(&mut self, name: &str) -> Done {
        let account = self.account()?.id;
        let name = name.strip_suffix('/').unwrap_or(name);
        self.shared.store.create_mailbox(account, name).await?;
        Ok("CREATE completed".into())
    }

    async fn delete(&mut self, name: &str) -> Done {
        let account = self.account()?.id;
        let target = self.mailbox(name).await?;
        if self.selected.as_ref().is_some_and(|s| s.mailbox.id == target.id) {
            self.selected = None;
        }
        self.shared.store.delete_mailbox(account, name).await?;
        self.shared.events.mailbox_changed();
        Ok("DELETE completed".into())
    }

    async fn rename(&mut self, from: &str, to: &str) -> Done {
        let account = self.account()?.id;
        self.shared.store.rename_mailbox(account, from, to).await?;
        Ok("RENAME completed".into())
    }

    async fn subscribe(&mut self, name: &str, on: bool) -> Done {
        let mailbox = self.mailbox(name).await?;
        self.shared.store.set_subscribed(mailbox.id, on).await?;
        Ok(if on { "SUBSCRIBE completed".into() } else { "UNSUBSCRIBE completed".into() })
    }

    async fn list(&mut self, reference: &str, pattern: &str, subscribed_only: bool) -> Done {
        let verb = if subscribed_only { "LSUB" } else { "LIST" };
        if pattern.is_empty() {
            self.untagged(&format!("{verb} (\\Noselect) \"/\" \"\""));
            return Ok(format!("{verb} completed"));
        }
        let account = self.account()?.id;
        let mailboxes = self.shared.store.list_mailboxes(account).await?;
        let full = format!("{reference}{pattern}");
        let existing: HashMap<&str, &Mailbox> = mailboxes.iter().map(|m| (m.name.as_str(), m)).collect();
        // Every existing name and every parent of one (a parent that does not exist is listed
        // \Noselect so that clients can show the tree).
        let mut names: BTreeSet<String> = BTreeSet::new();
        for m in &mailboxes {
            let mut prefix = String::new();
            for (i, part) in m.name.split('/').enumerate() {
                if i > 0 {
                    prefix.push('/');
                }
                prefix.push_str(part);
                names.insert(prefix.clone());
            }
        }
        let mut lines = Vec::new();
        for name in &names {
            if !list_matches(&full, name) {
                continue;
            }
            let child_prefix = format!("{name}/");
            let has_children = names.iter().any(|n| n.starts_with(&child_prefix));
            let mut attrs: Vec<&str> = Vec::new();
            match existing.get(name.as_str()) {
                Some(m) => {
                    if subscribed_only && !m.subscribed {
                        continue;
                    }
                    if let Some(u) = m.special_use {
                        attrs.push(u.as_imap());
                    }
                }
                None => {
                    if subscribed_only {
                        continue;
                    }
                    attrs.push("\\Noselect");
                }
            }
            attrs.push(if has_children { "\\HasChildren" } else { "\\HasNoChildren" });
            lines.push(format!("{verb} ({}) \"/\" {}", attrs.join(" "), mailbox_name(name)));
        }
        for line in lines {
            self.untagged(&line);
        }
        Ok(format!("{verb} completed"))
    }

    async fn status(&mut self, name: &str, items: &[StatusItem]) -> Done {
        let mailbox = self.mailbox(name).await?;
        let s = self.shared.store.status(mailbox.id).await?;
        let parts: Vec<String> = items
            .iter()
            .map(|i| match i {
                StatusItem::Messages => format!("MESSAGES {}", s.messages),
                StatusItem::Recent => "RECENT 0".into(),
                StatusItem::UidNext => format!("UIDNEXT {}", s.uidnext),
                StatusItem::UidValidity => format!("UIDVALIDITY {}", s.uidvalidity),
                StatusItem::Unseen => format!("UNSEEN {}", s.unseen),
                StatusItem::HighestModSeq => format!("HIGHESTMODSEQ {}", s.highestmodseq),
                StatusItem::Size => format!("SIZE {}", s.total_size),
            })
            .collect();
        self.untagged(&format!("STATUS {} ({})", mailbox_name(&mailbox.name), parts.join(" ")));
        Ok("STATUS completed".into())
    }

    async fn append(
        &mut self,
        name: &str,
        flags: &[String],
        date: Option<i64>,
        message: Zeroizing<Vec<u8>>,
    ) -> Done {
        let mailbox = match self.mailbox(name).await {
            Ok(m) => m,
            Err(Fail::No(_)) => return Err(Fail::No("[TRYCREATE] No such mailbox".into())),
            Err(e) => return Err(e),
        };
        if message.len() as u64 > self.shared.config.max_message_bytes {
            return Err(Fail::No("[TOOBIG] Message too large".into()));
        }
        if message.is_empty() {
            return Err(Fail::No("[CANNOT] Empty message".into()));
        }
        let (flags, keywords) = parse_flags(flags)?;
        let internal_date = match date {
            Some(secs) if secs >= 0 => UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs()),
            Some(secs) => UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()),
            None => SystemTime::now(),
        };
        let request = AppendRequest { flags, keywords, internal_date };
        let size = message.len();
        let appended = self
            .shared
            .vault
            .append_plain(&self.shared.store, mailbox.id, Protection::Normal, &request, message)
            .await
            .map_err(|e| match e {
                VaultError::Store(e) => Fail::from(e),
                other => {
                    tracing::error!(error = %other, "sealing an appended message failed");
                    Fail::No("[SERVERBUG] The message could not be sealed".into())
                }
            })?;
        tracing::info!(mailbox = %mailbox.name, uid = appended.uid, size, "message appended");
        self.shared.events.mailbox_changed();
        Ok(format!("[APPENDUID {} {}] APPEND completed", appended.uidvalidity, appended.uid))
    }

    async fn close(&mut self, expunge: bool) -> Done {
        let Some(sel) = self.selected.take() else {
            return Err(Fail::Bad("No mailbox selected".into()));
        };
        if expunge && !sel.read_only {
            let gone = self.shared.store.expunge(sel.mailbox.id, &ExpungeScope::Deleted).await?;
            if !gone.is_empty() {
                self.shared.events.mailbox_changed();
            }
        }
        Ok(if expunge { "CLOSE completed".into() } else { "UNSELECT completed".into() })
    }

    fn announce_expunged(&mut self, uids: &[u32]) {
        let mut lines = Vec::new();
        if let Some(sel) = self.selected.as_mut() {
            for uid in uids {
                if let Ok(i) = sel.uids.binary_search(uid) {
                    sel.uids.remove(i);
                    sel.flags.remove(uid);
                    lines.push(format!("{} EXPUNGE", i + 1));
                }
                sel.pending_expunge.remove(uid);
            }
        }
        for l in lines {
            self.untagged(&l);
        }
    }

    async fn expunge(&mut self, set: Option<NumberSet>) -> Done {
        let sel = self.sel()?;
        if sel.read_only {
            return Err(Fail::No("[READ-ONLY] Mailbox is read-only".into()));
        }
        let scope = match set {
            Some(set) => ExpungeScope::DeletedIn(sel.resolve(&set, true)),
            None => ExpungeScope::Deleted,
        };
        if matches!(&scope, ExpungeScope::DeletedIn(s) if s.is_empty()) {
            return Ok("EXPUNGE completed".into());
        }
        let gone = self.shared.store.expunge(sel.mailbox.id, &scope).await?;
        self.announce_expunged(&gone);
        if !gone.is_empty() {
            self.shared.events.mailbox_changed();
        }
        Ok("EXPUNGE completed".into())
    }

    // ---------------------------------------------------------------------------------------
    // Messages
    // ---------------------------------------------------------------------------------------

    /// Announces what changed in the selected mailbox since the client was last told: new
    /// messages (EXISTS), flag changes (FETCH), expunges (EXPUNGE, when allowed).
    async fn sync(&mut self, expunge_ok: bool) -> Result<(), StoreError> {
        let Some(sel) = self.selected.as_ref() else { return Ok(()) };
        let changes = self.shared.store.changes_since(sel.mailbox.id, sel.modseq).await?;
        let condstore = self.condstore;
        let mut lines = Vec::new();
        let Some(sel) = self.selected.as_mut() else { return Ok(()) };
        for uid in &changes.vanished {
            if sel.uids.binary_search(uid).is_ok() {
                sel.pending_expunge.insert(*uid);
            }
        }
        let mut expunged = Vec::new();
        if expunge_ok {
            expunged = std::mem::take(&mut sel.pending_expunge).into_iter().collect();
        }
        let mut added = false;
        for m in changes.changed {
            let last = sel.uids.last().copied().unwrap_or(0);
            match sel.flags.get_mut(&m.uid) {
                Some(known) if known.0 != m.flags || known.1 != m.keywords => {
                    *known = (m.flags, m.keywords.clone());
                    if let Some(seq) = sel.seq_of(m.uid) {
                        let modseq =
                            if condstore { format!(" MODSEQ ({})", m.modseq) } else { String::new() };
                        lines.push(format!(
                            "{seq} FETCH (UID {} FLAGS {}{modseq})",
                            m.uid,
                            message_flags(&m)
                        ));
                    }
                }
                Some(_) => {}
                None if m.uid > last => {
                    sel.uids.push(m.uid);
                    sel.flags.insert(m.uid, (m.flags, m.keywords.clone()));
                    added = true;
                }
                None => {}
            }
        }
        sel.modseq = sel.modseq.max(changes.highestmodseq);
        let exists = sel.uids.len();
        self.announce_expunged(&expunged);
        let exists = exists - expunged.len().min(exists);
        if added {
            self.untagged(&format!("{exists} EXISTS"));
        }
        for l in lines {
            self.untagged(&l);
        }
        Ok(())
    }

    async fn search(&mut self, uid: bool, key: &SearchKey) -> Done {
        let sel = self.sel()?;
        let mailbox = sel.mailbox.id;
        let metas = self.shared.store.fetch(mailbox, &Selection::All).await?;
        let content = key.needs_content();
        let last_uid = sel.uids.last().copied().unwrap_or(0);
        let mut hits = Vec::new();
        let mut highest = 0;
        for meta in &metas {
            let Some(seq) = sel.seq_of(meta.uid) else { continue };
            let message = if content { Some(self.present(meta).await?) } else { None };
            let ctx = SearchContext::new(meta, seq, last_uid, message.as_deref().map(|m| &m[..]));
            if ctx.matches(key) {
                hits.push(if uid { meta.uid } else { seq });
                highest = highest.max(meta.modseq);
            }
        }
        let mut line = String::from("SEARCH");
        for h in &hits {
            line.push_str(&format!(" {h}"));
        }
        if uses_modseq(key) && !hits.is_empty() {
            line.push_str(&format!(" (MODSEQ {highest})"));
        }
        self.untagged(&line);
        Ok("SEARCH completed".into())
    }

    async fn present(&self, meta: &MessageMeta) -> Result<Zeroizing<Vec<u8>>, Fail> {
        match self.shared.vault.present(&self.shared.store, meta).await {
            Ok(p) => Ok(p.message),
            Err(e) => {
                tracing::error!(uid = meta.uid, error = %e, "a message could not be presented");
                Err(Fail::No("[SERVERBUG] A message could not be opened; try again later".into()))
            }
        }
    }

    async fn fetch<S>(
        &mut self,
        uid: bool,
        set: &NumberSet,
        attrs: &[FetchAttr],
        changed_since: Option<u64>,
        io: &mut S,
    ) -> Done
    where
        S: AsyncWrite + Unpin,
    {
        if changed_since.is_some() || attrs.contains(&FetchAttr::ModSeq) {
            self.condstore = true;
        }
        let sel = self.sel()?;
        let mailbox = sel.mailbox.id;
        let read_only = sel.read_only;
        let uids = sel.resolve(set, uid);
        if uids.is_empty() {
            return Ok("FETCH completed".into());
        }
        let mut metas = self.shared.store.fetch(mailbox, &Selection::Uids(uids)).await?;
        if let Some(since) = changed_since {
            metas.retain(|m| m.modseq > since);
        }
        let needs_content = attrs.iter().any(|a| {
            matches!(
                a,
                FetchAttr::Envelope
                    | FetchAttr::BodyStructure
                    | FetchAttr::Body
                    | FetchAttr::Section { .. }
                    | FetchAttr::Rfc822
                    | FetchAttr::Rfc822Header
                    | FetchAttr::Rfc822Text
            )
        });
        let sets_seen = !read_only
            && attrs.iter().any(|a| {
                matches!(
                    a,
                    FetchAttr::Section { peek: false, .. } | FetchAttr::Rfc822 | FetchAttr::Rfc822Text
                )
            });
        // Reading a body sets \Seen: one store call for the whole batch, before the answers,
        // so that each FETCH response can carry the new flags.
        let mut seen_now: BTreeSet<u32> = BTreeSet::new();
        if sets_seen {
            let unseen: Vec<u32> =
                metas.iter().filter(|m| !m.flags.contains(Flags::SEEN)).map(|m| m.uid).collect();
            if !unseen.is_empty() {
                let change = FlagChange { op: FlagOp::Add, flags: Flags::SEEN, keywords: Vec::new() };
                let updated = self
                    .shared
                    .store
                    .store_flags(mailbox, &Selection::Uids(NumberSet::from_numbers(unseen)), &change, None)
                    .await?;
                for st in updated.changed {
                    if let Some(m) = metas.iter_mut().find(|m| m.uid == st.uid) {
                        m.flags = st.flags;
                        m.modseq = st.modseq;
                    }
                    if let Some(sel) = self.selected.as_mut() {
                        sel.flags.insert(st.uid, (st.flags, st.keywords));
                    }
                    seen_now.insert(st.uid);
                }
                self.shared.events.mailbox_changed();
            }
        }
        for meta in &metas {
            let Some(seq) = self.selected.as_ref().and_then(|s| s.seq_of(meta.uid)) else { continue };
            let message = if needs_content { Some(self.present(meta).await?) } else { None };
            let root = message.as_ref().map(|m| mime::parse(m));
            let mut items: Vec<Vec<u8>> = Vec::new();
            let mut has_uid = false;
            let mut has_flags = false;
            let mut has_modseq = false;
            for a in attrs {
                let text: Vec<u8> = match a {
                    FetchAttr::Uid => {
                        has_uid = true;
                        format!("UID {}", meta.uid).into_bytes()
                    }
                    FetchAttr::Flags => {
                        has_flags = true;
                        format!("FLAGS {}", message_flags(meta)).into_bytes()
                    }
                    FetchAttr::ModSeq => {
                        has_modseq = true;
                        format!("MODSEQ ({})", meta.modseq).into_bytes()
                    }
                    FetchAttr::InternalDate => {
                        format!("INTERNALDATE {}", internal_date(meta.internal_date)).into_bytes()
                    }
                    FetchAttr::Rfc822Size => format!("RFC822.SIZE {}", meta.size).into_bytes(),
                    _ => {
                        let (Some(msg), Some(root)) = (message.as_deref(), root.as_ref()) else { continue };
                        content_item(a, msg, root)
                    }
                };
                items.push(text);
            }
            if uid && !has_uid {
                items.insert(0, format!("UID {}", meta.uid).into_bytes());
            }
            if seen_now.contains(&meta.uid) && !has_flags {
                items.push(format!("FLAGS {}", message_flags(meta)).into_bytes());
            }
            if changed_since.is_some() && !has_modseq {
                items.push(format!("MODSEQ ({})", meta.modseq).into_bytes());
            }
            self.out.extend_from_slice(format!("* {seq} FETCH (").as_bytes());
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    self.out.push(b' ');
                }
                self.out.extend_from_slice(item);
            }
            self.out.extend_from_slice(b")\r\n");
            if self.out.len() >= FLUSH_AT {
                self.flush(io).await?;
            }
        }
        Ok("FETCH completed".into())
    }

    async fn store(
        &mut self,
        uid: bool,
        set: &NumberSet,
        op: StoreOp,
        silent: bool,
        flags: &[String],
        unchanged_since: Option<u64>,
    ) -> Done {
        if unchanged_since.is_some() {
            self.condstore = true;
        }
        let sel = self.sel()?;
        if sel.read_only {
            return Err(Fail::No("[READ-ONLY] Mailbox is read-only".into()));
        }
        let mailbox = sel.mailbox.id;
        let uids = sel.resolve(set, uid);
        let (flags, keywords) = parse_flags(flags)?;
        let op = match op {
            StoreOp::Add => FlagOp::Add,
            StoreOp::Remove => FlagOp::Remove,
            StoreOp::Replace => FlagOp::Replace,
        };
        if uids.is_empty() {
            return Ok("STORE completed".into());
        }
        let change = FlagChange { op, flags, keywords };
        let updated = self
            .shared
            .store
            .store_flags(mailbox, &Selection::Uids(uids.clone()), &change, unchanged_since)
            .await?;
        if !updated.changed.is_empty() {
            self.shared.events.mailbox_changed();
        }
        let condstore = self.condstore;
        let mut lines = Vec::new();
        let changed_uids: BTreeSet<u32> = updated.changed.iter().map(|s| s.uid).collect();
        if let Some(sel) = self.selected.as_mut() {
            for st in &updated.changed {
                sel.flags.insert(st.uid, (st.flags, st.keywords.clone()));
                if let Some(seq) = sel.seq_of(st.uid) {
                    if silent && unchanged_since.is_none() {
                        continue;
                    }
                    let uid_part = if uid { format!("UID {} ", st.uid) } else { String::new() };
                    let modseq = if condstore { format!(" MODSEQ ({})", st.modseq) } else { String::new() };
                    lines.push(if silent {
                        format!("{seq} FETCH ({uid_part}MODSEQ ({}))", st.modseq)
                    } else {
                        format!("{seq} FETCH ({uid_part}FLAGS {}{modseq})", flag_list(st.flags, &st.keywords))
                    });
                }
            }
            // Unchanged messages still get their flags (RFC 3501: the updated value is returned).
            if !silent {
                for u in uids.ranges().iter().flat_map(|r| r.clone()) {
                    if !changed_uids.contains(&u)
                        && !updated.modified.contains(&u)
                        && let (Some(seq), Some((f, k))) = (sel.seq_of(u), sel.flags.get(&u))
                    {
                        let uid_part = if uid { format!("UID {u} ") } else { String::new() };
                        lines.push(format!("{seq} FETCH ({uid_part}FLAGS {})", flag_list(*f, k)));
                    }
                }
            }
        }
        for l in lines {
            self.untagged(&l);
        }
        if !updated.modified.is_empty() {
            let set: Vec<String> = updated
                .modified
                .iter()
                .filter_map(
                    |u| if uid { Some(*u) } else { self.selected.as_ref().and_then(|s| s.seq_of(*u)) },
                )
                .map(|n| n.to_string())
                .collect();
            return Ok(format!("[MODIFIED {}] Conditional STORE failed for some messages", set.join(",")));
        }
        Ok("STORE completed".into())
    }

    async fn copy(&mut self, uid: bool, set: &NumberSet, target: &str, is_move: bool) -> Done {
        let verb = if is_move { "MOVE" } else { "COPY" };
        let sel = self.sel()?;
        if is_move && sel.read_only {
            return Err(Fail::No("[READ-ONLY] Mailbox is read-only".into()));
        }
        let source = sel.mailbox.id;
        let uids = sel.resolve(set, uid);
        let target = match self.mailbox(target).await {
            Ok(m) => m,
            Err(Fail::No(_)) => return Err(Fail::No("[TRYCREATE] No such mailbox".into())),
            Err(e) => return Err(e),
        };
        if uids.is_empty() {
            return Ok(format!("{verb} completed"));
        }
        if target.id == source {
            return Err(Fail::No("[CANNOT] Source and target are the same mailbox".into()));
        }
        let copied = if is_move {
            self.shared.store.move_messages(source, &uids, target.id).await?
        } else {
            self.shared.store.copy_messages(source, &uids, target.id).await?
        };
        self.shared.events.mailbox_changed();
        if copied.uids.is_empty() {
            return Ok(format!("{verb} completed"));
        }
        let src: Vec<String> = copied.uids.iter().map(|(s, _)| s.to_string()).collect();
        let dst: Vec<String> = copied.uids.iter().map(|(_, d)| d.to_string()).collect();
        let code = format!("COPYUID {} {} {}", copied.uidvalidity, src.join(","), dst.join(","));
        if is_move {
            self.untagged(&format!("OK [{code}] Moved"));
            let moved: Vec<u32> = copied.uids.iter().map(|(s, _)| *s).collect();
            self.announce_expunged(&moved);
            return Ok("MOVE completed".into());
        }
        Ok(format!("[{code}] COPY completed"))
    }

    async fn idle<S>(&mut self, io: &mut S, framer: &mut Framer, buf: &mut [u8]) -> std::io::Result<Done>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        self.out.extend_from_slice(b"+ idling\r\n");
        self.flush(io).await?;
        let mut events = self.shared.events.subscribe();
        let mut shutdown = self.shared.shutdown.subscribe();
        let poll = self.shared.config.idle_poll;
        let deadline = tokio::time::Instant::now() + self.shared.config.idle_timeout;
        loop {
            match framer.next_line() {
                Some(Ok(line)) if line.eq_ignore_ascii_case(b"DONE") => {
                    return Ok(Ok("IDLE terminated".into()));
                }
                Some(Ok(_)) => return Ok(Err(Fail::Bad("Expected DONE".into()))),
                Some(Err(_)) => return Ok(Err(Fail::Bad("Line too long".into()))),
                None => {}
            }
            let read = tokio::select! {
                r = io.read(buf) => Some(r?),
                _ = tokio::time::sleep(poll) => None,
                _ = events.changed() => None,
                _ = tokio::time::sleep_until(deadline) => {
                    self.untagged("BYE Autologout; idle for too long");
                    self.flush(io).await?;
                    self.logout = true;
                    return Ok(Err(Fail::No("IDLE timed out".into())));
                }
                _ = shutdown.changed() => {
                    self.untagged("BYE Server shutting down");
                    self.flush(io).await?;
                    self.logout = true;
                    return Ok(Err(Fail::No("IDLE ended by shutdown".into())));
                }
            };
            match read {
                Some(0) => {
                    self.logout = true;
                    return Ok(Err(Fail::No("Client left".into())));
                }
                Some(n) => framer.feed(&buf[..n]),
                None => {
                    if let Err(e) = self.sync(true).await {
                        tracing::warn!(error = %e, "could not refresh the mailbox while idling");
                    }
                    self.flush(io).await?;
                }
            }
        }
    }
}

/// LIST pattern matching: `*` matches anything, `%` anything but the delimiter `/`. The
/// `INBOX` prefix matches case-insensitively (the store spells it `INBOX`).
fn list_matches(pattern: &str, name: &str) -> bool {
    let pattern = match pattern.get(..5) {
        Some(p) if p.eq_ignore_ascii_case("inbox") && name.starts_with("INBOX") => {
            format!("INBOX{}", &pattern[5..])
        }
        _ => pattern.to_owned(),
    };
    fn go(p: &[u8], n: &[u8]) -> bool {
        match p.split_first() {
            None => n.is_empty(),
            Some((b'*', rest)) => (0..=n.len()).any(|i| go(rest, &n[i..])),
            Some((b'%', rest)) => {
                let stop = n.iter().position(|&b| b == b'/').unwrap_or(n.len());
                (0..=stop).any(|i| go(rest, &n[i..]))
            }
            Some((c, rest)) => n.first() == Some(c) && go(rest, &n[1..]),
        }
    }
    // Patterns are short; bound the backtracking anyway.
    pattern.matches(['*', '%']).count() <= 8 && go(pattern.as_bytes(), name.as_bytes())
}

fn command_name(c: &Command) -> &'static str {
    match c {
        Command::Capability => "CAPABILITY",
        Command::Noop => "NOOP",
        Command::Logout => "LOGOUT",
        Command::StartTls => "STARTTLS",
        Command::Login { .. } => "LOGIN",
        Command::Authenticate { .. } => "AUTHENTICATE",
        Command::Select { read_only: false, .. } => "SELECT",
        Command::Select { .. } => "EXAMINE",
        Command::Create(_) => "CREATE",
        Command::Delete(_) => "DELETE",
        Command::Rename(..) => "RENAME",
        Command::Subscribe(_) => "SUBSCRIBE",
        Command::Unsubscribe(_) => "UNSUBSCRIBE",
        Command::List { subscribed_only: false, .. } => "LIST",
        Command::List { .. } => "LSUB",
        Command::Status { .. } => "STATUS",
        Command::Append { .. } => "APPEND",
        Command::Check => "CHECK",
        Command::Close => "CLOSE",
        Command::Unselect => "UNSELECT",
        Command::Expunge(_) => "EXPUNGE",
        Command::Search { .. } => "SEARCH",
        Command::Fetch { .. } => "FETCH",
        Command::Store { .. } => "STORE",
        Command::Copy { is_move: false, .. } => "COPY",
        Command::Copy { .. } => "MOVE",
        Command::Idle => "IDLE",
        Command::Namespace => "NAMESPACE",
        Command::Id => "ID",
        Command::Enable(_) => "ENABLE",
    }
}

/// System flags and keywords of a flag list; `\Recent` is ignored, other unknown system flags
/// are refused.
fn parse_flags(names: &[String]) -> Result<(Flags, Vec<String>), Fail> {
    let mut flags = Flags::NONE;
    let mut keywords = Vec::new();
    for n in names {
        if let Some(f) = Flags::from_name(n) {
            flags = flags | f;
        } else if n.eq_ignore_ascii_case("\\Recent") {
        } else if n.starts_with('\\') {
            return Err(Fail::Bad(format!("Unknown system flag {}", one_line(n))));
        } else {
            keywords.push(n.clone());
        }
    }
    Ok((flags, keywords))
}

fn section_name(section: &Section) -> String {
    let mut s: String = section.part.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(".");
    let kind = match &section.kind {
        SectionKind::Full => String::new(),
        SectionKind::Header => "HEADER".into(),
        SectionKind::Text => "TEXT".into(),
        SectionKind::Mime => "MIME".into(),
        SectionKind::HeaderFields(names) | SectionKind::HeaderFieldsNot(names) => {
            let list: Vec<String> = names
                .iter()
                .map(|n| {
                    let atom = !n.is_empty()
                        && n.bytes().all(|b| b.is_ascii_graphic() && !b"()\\\"{]%*".contains(&b));
                    if atom { n.to_ascii_uppercase() } else { quoted_or_literal(n.as_bytes()) }
                })
                .collect();
            let not = if matches!(section.kind, SectionKind::HeaderFieldsNot(_)) { ".NOT" } else { "" };
            format!("HEADER.FIELDS{not} ({})", list.join(" "))
        }
    };
    if !s.is_empty() && !kind.is_empty() {
        s.push('.');
    }
    s.push_str(&kind);
    s
}

fn literal(name: &str, data: &[u8]) -> Vec<u8> {
    let mut out = format!("{name} {{{}}}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out
}

fn content_item(a: &FetchAttr, msg: &[u8], root: &mime::Part) -> Vec<u8> {
    match a {
        FetchAttr::Envelope => format!("ENVELOPE {}", mime::envelope(&msg[root.header.clone()])).into_bytes(),
        FetchAttr::BodyStructure => {
            format!("BODYSTRUCTURE {}", mime::structure(msg, root, true)).into_bytes()
        }
        FetchAttr::Body => format!("BODY {}", mime::structure(msg, root, false)).into_bytes(),
        FetchAttr::Rfc822 => literal("RFC822", msg),
        FetchAttr::Rfc822Header => literal("RFC822.HEADER", &msg[root.header.clone()]),
        FetchAttr::Rfc822Text => literal("RFC822.TEXT", &msg[root.body.clone()]),
        FetchAttr::Section { section, partial, .. } => {
            let data = mime::section_bytes(msg, root, section).unwrap_or_default();
            let name = section_name(section);
            match partial {
                Some((origin, count)) => {
                    let start = usize::try_from(*origin).unwrap_or(usize::MAX).min(data.len());
                    let end =
                        start.saturating_add(usize::try_from(*count).unwrap_or(usize::MAX)).min(data.len());
                    literal(&format!("BODY[{name}]<{origin}>"), &data[start..end])
                }
                None => literal(&format!("BODY[{name}]"), &data),
            }
        }
        _ => Vec::new(),
    }
}

fn uses_modseq(key: &SearchKey) -> bool {
    match key {
        SearchKey::ModSeq(_) => true,
        SearchKey::Not(k) => uses_modseq(k),
        SearchKey::Or(a, b) => uses_modseq(a) || uses_modseq(b),
        SearchKey::And(v) => v.iter().any(uses_modseq),
        _ => false,
    }
}

/// A presented message's MIME structure and top-level header fields.
type Parsed = (mime::Part, Vec<(String, String)>);

/// One message being matched against SEARCH criteria; header and text are computed on the
/// presented (decrypted) message only when a criterion needs them.
struct SearchContext<'a> {
    meta: &'a MessageMeta,
    seq: u32,
    last_uid: u32,
    message: Option<&'a [u8]>,
    parsed: std::cell::OnceCell<Option<Parsed>>,
    body: std::cell::OnceCell<String>,
}

impl<'a> SearchContext<'a> {
    fn new(meta: &'a MessageMeta, seq: u32, last_uid: u32, message: Option<&'a [u8]>) -> Self {
        Self {
            meta,
            seq,
            last_uid,
            message,
            parsed: std::cell::OnceCell::new(),
            body: std::cell::OnceCell::new(),
        }
    }

    fn parsed(&self) -> Option<&Parsed> {
        self.parsed
            .get_or_init(|| {
                let msg = self.message?;
                let root = mime::parse(msg);
                let fields = mime::fields(&msg[root.header.clone()]);
                Some((root, fields))
            })
            .as_ref()
    }

    fn body(&self) -> &str {
        self.body.get_or_init(|| {
            let mut s = String::new();
            if let (Some(msg), Some((root, _))) = (self.message, self.parsed()) {
                mime::body_text(msg, root, &mut s);
            }
            s
        })
    }

    fn header_contains(&self, name: &str, needle: &str) -> bool {
        let Some((_, fields)) = self.parsed() else { return false };
        let needle = needle.to_lowercase();
        fields
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .any(|(_, v)| needle.is_empty() || mime::decode_words(v).to_lowercase().contains(&needle))
    }

    fn sent_day(&self) -> Option<i64> {
        let (_, fields) = self.parsed()?;
        mime::date_header_day(mime::field(fields, "date")?)
    }

    fn internal_day(&self) -> i64 {
        epoch_secs(self.meta.internal_date).div_euclid(86_400)
    }

    fn matches(&self, key: &SearchKey) -> bool {
        let m = self.meta;
        match key {
            SearchKey::All => true,
            SearchKey::Flag(f) => m.flags.contains(*f),
            SearchKey::NotFlag(f) => !m.flags.contains(*f),
            SearchKey::Keyword(k) => m.keywords.contains(k),
            SearchKey::Unkeyword(k) => !m.keywords.contains(k),
            SearchKey::New | SearchKey::Recent => false,
            SearchKey::Old => true,
            SearchKey::Before(d) => self.internal_day() < *d,
            SearchKey::On(d) => self.internal_day() == *d,
            SearchKey::Since(d) => self.internal_day() >= *d,
            SearchKey::SentBefore(d) => self.sent_day().is_some_and(|s| s < *d),
            SearchKey::SentOn(d) => self.sent_day() == Some(*d),
            SearchKey::SentSince(d) => self.sent_day().is_some_and(|s| s >= *d),
            SearchKey::Larger(n) => m.size > *n,
            SearchKey::Smaller(n) => m.size < *n,
            // `*` is the highest UID, so `n:*` holds the last message even when n is above it.
            SearchKey::Uid(set) => set.contains(m.uid) || (set_has_star(set) && m.uid == self.last_uid),
            SearchKey::Sequence(set) => set.contains(self.seq),
            SearchKey::ModSeq(n) => m.modseq >= *n,
            SearchKey::Header(name, value) => self.header_contains(name, value),
            SearchKey::Body(text) => self.body().to_lowercase().contains(&text.to_lowercase()),
            SearchKey::Text(text) => {
                let t = text.to_lowercase();
                let header = self
                    .message
                    .zip(self.parsed())
                    .map(|(msg, (root, _))| String::from_utf8_lossy(&msg[root.header.clone()]).to_lowercase())
                    .unwrap_or_default();
                header.contains(&t) || self.body().to_lowercase().contains(&t)
            }
            SearchKey::Not(k) => !self.matches(k),
            SearchKey::Or(a, b) => self.matches(a) || self.matches(b),
            SearchKey::And(keys) => keys.iter().all(|k| self.matches(k)),
        }
    }
}

fn set_has_star(set: &NumberSet) -> bool {
    set.ranges().iter().any(|r| *r.end() == u32::MAX)
}

/// Exposed for the stable fuzz-style unit test: the wire form of a STORE flag list.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_split_into_system_flags_and_keywords() {
        let (f, k) = parse_flags(&["\\Seen".into(), "$Work".into(), "\\Recent".into()]).ok().unwrap();
        assert_eq!(f, Flags::SEEN);
        assert_eq!(k, vec!["$Work".to_owned()]);
        assert!(parse_flags(&["\\Bogus".into()]).is_err());
    }

    #[test]
    fn list_patterns_match_like_rfc_3501() {
        assert!(list_matches("*", "Work/Projects"));
        assert!(!list_matches("%", "Work/Projects"));
        assert!(list_matches("Work/%", "Work/Projects"));
        assert!(list_matches("inbox", "INBOX"));
        assert!(!list_matches("Sent", "Sent/2024"));
    }

    #[test]
    fn section_names_echo_the_request() {
        let s = Section { part: vec![1, 2], kind: SectionKind::HeaderFields(vec!["Subject".into()]) };
        assert_eq!(section_name(&s), "1.2.HEADER.FIELDS (SUBJECT)");
        assert_eq!(section_name(&Section::default()), "");
    }
}
