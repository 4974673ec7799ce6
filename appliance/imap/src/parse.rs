//! The sans-I/O protocol core, input side: the [`Framer`] cuts the client's byte stream into
//! complete commands (a line plus the literals it announces), and [`parse_command`] turns one
//! complete command into a [`Command`]. Neither does I/O; neither panics on any input.

use std::collections::VecDeque;

use qutemail_store::{Flags, NumberSet};
use zeroize::Zeroizing;

/// Longest command line (outside literals) accepted; RFC 7162 asks servers to take at least
/// 8192 octets.
pub const MAX_LINE: usize = 64 * 1024;

/// What the framer has for the driver.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A complete command: its line(s) with literals inline as `{n}\r\n<n bytes>`.
    Command(Vec<u8>),
    /// A synchronising literal was announced: the driver sends `+ ` so the client sends it.
    Continue,
    /// A literal larger than allowed was announced. For a synchronising literal the client
    /// waits for `+`, so the command is refused and nothing more is read for it; for a
    /// non-synchronising one (`{n+}`) the bytes are coming anyway and the connection must end.
    TooBig {
        /// The tag of the refused command (may be empty if unparseable).
        tag: String,
        /// The announced size.
        size: u64,
        /// Whether the literal was non-synchronising.
        non_sync: bool,
    },
    /// A line longer than [`MAX_LINE`]: the stream cannot be resynchronised.
    LineTooLong,
}

#[derive(Debug)]
enum State {
    Line,
    Literal { remaining: usize },
}

/// Cuts the input into commands. `max_literal` bounds each literal; commands with literals are
/// assembled in memory (APPEND hands the whole message to the vault anyway).
#[derive(Debug)]
pub struct Framer {
    input: Vec<u8>,
    command: Vec<u8>,
    state: State,
    max_literal: u64,
    out: VecDeque<Frame>,
    failed: bool,
}

impl Framer {
    /// A framer refusing literals above `max_literal` bytes.
    pub fn new(max_literal: u64) -> Self {
        Self {
            input: Vec::new(),
            command: Vec::new(),
            state: State::Line,
            max_literal,
            out: VecDeque::new(),
            failed: false,
        }
    }

    /// Bytes received and not yet used (after STARTTLS they must be dropped: RFC 3501 11.1).
    pub fn buffered(&self) -> usize {
        self.input.len() + self.command.len()
    }

    /// Forgets everything buffered.
    pub fn clear(&mut self) {
        self.input.clear();
        self.command.clear();
        self.state = State::Line;
        self.out.clear();
    }

    /// Whether the framer is inside a literal or a partial command (a client leaving now
    /// vanished mid-command).
    pub fn mid_command(&self) -> bool {
        !self.command.is_empty() || matches!(self.state, State::Literal { .. })
    }

    /// Changes the literal limit (e.g. raised after login).
    pub fn set_max_literal(&mut self, max_literal: u64) {
        self.max_literal = max_literal;
    }

    /// Gives back buffer memory held since a large command (called between commands).
    pub fn release_memory(&mut self) {
        if self.input.is_empty() && self.input.capacity() > 64 * 1024 {
            self.input = Vec::new();
        }
        if self.command.is_empty() && self.command.capacity() > 64 * 1024 {
            self.command = Vec::new();
        }
    }

    /// Adds received bytes.
    pub fn feed(&mut self, data: &[u8]) {
        if !self.failed {
            self.input.extend_from_slice(data);
        }
    }

    /// Takes one raw line (without CRLF) when the driver reads something that is not a command:
    /// the IDLE `DONE`, an AUTHENTICATE response. `None` until a full line is there.
    pub fn next_line(&mut self) -> Option<Result<Vec<u8>, Frame>> {
        let end = self.input.windows(2).position(|w| w == b"\r\n");
        match end {
            Some(end) => {
                let line = self.input[..end].to_vec();
                self.input.drain(..end + 2);
                Some(Ok(line))
            }
            None if self.input.len() > MAX_LINE => Some(Err(Frame::LineTooLong)),
            None => None,
        }
    }

    /// The next frame, if the input holds one.
    pub fn next_frame(&mut self) -> Option<Frame> {
        loop {
            if let Some(f) = self.out.pop_front() {
                return Some(f);
            }
            if self.failed {
                return None;
            }
            match self.state {
                State::Literal { remaining } => {
                    if self.input.is_empty() {
                        return None;
                    }
                    let take = remaining.min(self.input.len());
                    self.command.extend(self.input.drain(..take));
                    let remaining = remaining - take;
                    self.state = if remaining == 0 { State::Line } else { State::Literal { remaining } };
                    if remaining > 0 {
                        return None;
                    }
                }
                State::Line => {
                    let Some(end) = self.input.windows(2).position(|w| w == b"\r\n") else {
                        if self.input.len() + self.command.len() > MAX_LINE + self.literal_bytes() {
                            self.failed = true;
                            return Some(Frame::LineTooLong);
                        }
                        return None;
                    };
                    if end > MAX_LINE {
                        self.failed = true;
                        return Some(Frame::LineTooLong);
                    }
                    let line: Vec<u8> = self.input.drain(..end + 2).collect();
                    let body = &line[..end];
                    match literal_announcement(body) {
                        Some((size, non_sync)) => {
                            // One literal, and the whole command with all its literals, are
                            // bounded (many literals each under the limit add up).
                            let total = (self.command.len() as u64).saturating_add(size);
                            if size > self.max_literal
                                || total > self.max_literal.saturating_add(MAX_LINE as u64)
                            {
                                let mut whole = std::mem::take(&mut self.command);
                                whole.extend_from_slice(body);
                                let tag = tag_of(&whole);
                                if non_sync {
                                    self.failed = true;
                                    self.input.clear();
                                }
                                return Some(Frame::TooBig { tag, size, non_sync });
                            }
                            self.command.extend_from_slice(&line);
                            // Checked above: size <= max_literal, which fits memory by configuration.
                            let remaining = usize::try_from(size).unwrap_or(usize::MAX);
                            if remaining > 0 {
                                self.state = State::Literal { remaining };
                            }
                            if !non_sync {
                                self.out.push_back(Frame::Continue);
                            }
                        }
                        None => {
                            self.command.extend_from_slice(body);
                            return Some(Frame::Command(std::mem::take(&mut self.command)));
                        }
                    }
                }
            }
        }
    }

    fn literal_bytes(&self) -> usize {
        // Lines of a command assembled so far may carry literals; only the pending line counts
        // against MAX_LINE, so allow the command buffer in full.
        self.command.len()
    }
}

/// `{123}` or `{123+}` at the end of a line.
fn literal_announcement(line: &[u8]) -> Option<(u64, bool)> {
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|&b| b == b'{')?;
    let mut digits = &inner[open + 1..];
    let non_sync = digits.ends_with(b"+");
    if non_sync {
        digits = &digits[..digits.len() - 1];
    }
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok().map(|n| (n, non_sync))
}

fn tag_of(line: &[u8]) -> String {
    let end = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
    let tag = &line[..end];
    if !tag.is_empty() && tag.iter().all(|&b| is_tag_char(b)) {
        String::from_utf8_lossy(tag).into_owned()
    } else {
        String::new()
    }
}

fn is_atom_char(b: u8) -> bool {
    b > 0x20 && b < 0x7f && !matches!(b, b'(' | b')' | b'{' | b'%' | b'*' | b'"' | b'\\' | b']')
}

fn is_tag_char(b: u8) -> bool {
    is_atom_char(b) && b != b'+'
}

/// A tagged command that did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ParseError {
    /// The tag, if one could be read (else the answer is untagged `* BAD`).
    pub tag: Option<String>,
    /// What was wrong, for the client.
    pub message: String,
}

/// A message section (RFC 3501 `section`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Section {
    /// Part numbers (`1.2`); empty for the whole message.
    pub part: Vec<u32>,
    /// What of that part.
    pub kind: SectionKind,
}

/// The text part of a section.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SectionKind {
    /// The whole part (`BODY[]`, `BODY[1]`).
    #[default]
    Full,
    /// `HEADER`.
    Header,
    /// `HEADER.FIELDS (…)`.
    HeaderFields(Vec<String>),
    /// `HEADER.FIELDS.NOT (…)`.
    HeaderFieldsNot(Vec<String>),
    /// `TEXT`.
    Text,
    /// `MIME`.
    Mime,
}

/// One FETCH data item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchAttr {
    /// `FLAGS`.
    Flags,
    /// `INTERNALDATE`.
    InternalDate,
    /// `RFC822.SIZE`.
    Rfc822Size,
    /// `ENVELOPE`.
    Envelope,
    /// `BODYSTRUCTURE`.
    BodyStructure,
    /// `BODY` (structure without extensions).
    Body,
    /// `BODY[section]<partial>` / `BODY.PEEK[…]`.
    Section {
        /// `.PEEK`: do not set `\Seen`.
        peek: bool,
        /// Which section.
        section: Section,
        /// `<origin.count>`.
        partial: Option<(u32, u32)>,
    },
    /// `RFC822` (= `BODY[]`, sets `\Seen`).
    Rfc822,
    /// `RFC822.HEADER`.
    Rfc822Header,
    /// `RFC822.TEXT`.
    Rfc822Text,
    /// `UID`.
    Uid,
    /// `MODSEQ` (RFC 7162).
    ModSeq,
}

/// A date as days since 1970-01-01.
pub type Day = i64;

/// A SEARCH criterion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SearchKey {
    /// `ALL`.
    All,
    /// A system flag that must be set.
    Flag(Flags),
    /// A system flag that must be clear.
    NotFlag(Flags),
    /// `KEYWORD`.
    Keyword(String),
    /// `UNKEYWORD`.
    Unkeyword(String),
    /// `NEW` (recent and unseen: no message is recent here, so none).
    New,
    /// `RECENT` (none: \Recent is not kept).
    Recent,
    /// `OLD`.
    Old,
    /// INTERNALDATE before the day.
    Before(Day),
    /// INTERNALDATE on the day.
    On(Day),
    /// INTERNALDATE on or after the day.
    Since(Day),
    /// Date header before the day.
    SentBefore(Day),
    /// Date header on the day.
    SentOn(Day),
    /// Date header on or after the day.
    SentSince(Day),
    /// Size larger than.
    Larger(u64),
    /// Size smaller than.
    Smaller(u64),
    /// `UID set`.
    Uid(NumberSet),
    /// A sequence set.
    Sequence(NumberSet),
    /// `HEADER name value` (also FROM, TO, CC, BCC, SUBJECT).
    Header(String, String),
    /// `BODY text`.
    Body(String),
    /// `TEXT text`.
    Text(String),
    /// `MODSEQ n`.
    ModSeq(u64),
    /// `NOT key`.
    Not(Box<SearchKey>),
    /// `OR a b`.
    Or(Box<SearchKey>, Box<SearchKey>),
    /// A parenthesised list: all must hold.
    And(Vec<SearchKey>),
}

impl SearchKey {
    /// Whether evaluating this needs the decrypted message.
    pub fn needs_content(&self) -> bool {
        match self {
            SearchKey::Header(..)
            | SearchKey::Body(_)
            | SearchKey::Text(_)
            | SearchKey::SentBefore(_)
            | SearchKey::SentOn(_)
            | SearchKey::SentSince(_) => true,
            SearchKey::Not(k) => k.needs_content(),
            SearchKey::Or(a, b) => a.needs_content() || b.needs_content(),
            SearchKey::And(v) => v.iter().any(SearchKey::needs_content),
            _ => false,
        }
    }
}

/// STORE's operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOp {
    /// `FLAGS`.
    Replace,
    /// `+FLAGS`.
    Add,
    /// `-FLAGS`.
    Remove,
}

/// STATUS items.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusItem {
    /// `MESSAGES`.
    Messages,
    /// `RECENT`.
    Recent,
    /// `UIDNEXT`.
    UidNext,
    /// `UIDVALIDITY`.
    UidValidity,
    /// `UNSEEN`.
    Unseen,
    /// `HIGHESTMODSEQ`.
    HighestModSeq,
    /// `SIZE` (RFC 8438).
    Size,
}

/// A parsed command.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    /// `CAPABILITY`.
    Capability,
    /// `NOOP`.
    Noop,
    /// `LOGOUT`.
    Logout,
    /// `STARTTLS`.
    StartTls,
    /// `LOGIN user password`.
    Login {
        /// User name.
        user: String,
        /// Password (wiped when dropped).
        password: Zeroizing<String>,
    },
    /// `AUTHENTICATE mechanism [initial-response]`.
    Authenticate {
        /// Mechanism, upper-cased.
        mechanism: String,
        /// SASL-IR initial response (base64), if given.
        initial: Option<Zeroizing<String>>,
    },
    /// `SELECT` / `EXAMINE`.
    Select {
        /// Mailbox name.
        mailbox: String,
        /// `EXAMINE`.
        read_only: bool,
        /// `(CONDSTORE)` parameter.
        condstore: bool,
    },
    /// `CREATE`.
    Create(String),
    /// `DELETE`.
    Delete(String),
    /// `RENAME from to`.
    Rename(String, String),
    /// `SUBSCRIBE`.
    Subscribe(String),
    /// `UNSUBSCRIBE`.
    Unsubscribe(String),
    /// `LIST reference pattern` / `LSUB`.
    List {
        /// Reference name.
        reference: String,
        /// Pattern with `*` and `%`.
        pattern: String,
        /// `LSUB`.
        subscribed_only: bool,
    },
    /// `STATUS mailbox (items)`.
    Status {
        /// Mailbox name.
        mailbox: String,
        /// Requested items.
        items: Vec<StatusItem>,
    },
    /// `APPEND mailbox [flags] [date] literal`.
    Append {
        /// Target mailbox.
        mailbox: String,
        /// Initial flags.
        flags: Vec<String>,
        /// INTERNALDATE as seconds since the epoch.
        date: Option<i64>,
        /// The message (wiped when dropped).
        message: Zeroizing<Vec<u8>>,
    },
    /// `CHECK`.
    Check,
    /// `CLOSE`.
    Close,
    /// `UNSELECT`.
    Unselect,
    /// `EXPUNGE` or `UID EXPUNGE set`.
    Expunge(Option<NumberSet>),
    /// `SEARCH` / `UID SEARCH`.
    Search {
        /// UID variant.
        uid: bool,
        /// Criteria (all must hold).
        key: SearchKey,
    },
    /// `FETCH` / `UID FETCH`.
    Fetch {
        /// UID variant.
        uid: bool,
        /// Messages.
        set: NumberSet,
        /// Items.
        attrs: Vec<FetchAttr>,
        /// `(CHANGEDSINCE n)`.
        changed_since: Option<u64>,
    },
    /// `STORE` / `UID STORE`.
    Store {
        /// UID variant.
        uid: bool,
        /// Messages.
        set: NumberSet,
        /// Add, remove or replace.
        op: StoreOp,
        /// `.SILENT`.
        silent: bool,
        /// Flags and keywords.
        flags: Vec<String>,
        /// `(UNCHANGEDSINCE n)`.
        unchanged_since: Option<u64>,
    },
    /// `COPY` / `MOVE` (and UID variants).
    Copy {
        /// UID variant.
        uid: bool,
        /// Messages.
        set: NumberSet,
        /// Target.
        mailbox: String,
        /// MOVE rather than COPY.
        is_move: bool,
    },
    /// `IDLE`.
    Idle,
    /// `NAMESPACE`.
    Namespace,
    /// `ID (…)` or `ID NIL`.
    Id,
    /// `ENABLE caps…`.
    Enable(Vec<String>),
}

/// A command with its tag.
#[derive(Debug, PartialEq, Eq)]
pub struct Tagged {
    /// The client's tag.
    pub tag: String,
    /// The command.
    pub command: Command,
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

type R<T> = Result<T, String>;

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.pos).copied()
    }

    fn at_end(&self) -> bool {
        self.pos >= self.b.len()
    }

    fn sp(&mut self) -> R<()> {
        if self.peek() == Some(b' ') {
            self.pos += 1;
            Ok(())
        } else {
            Err("expected a space".into())
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: u8) -> R<()> {
        if self.eat(c) { Ok(()) } else { Err(format!("expected '{}'", c as char)) }
    }

    fn end(&self) -> R<()> {
        if self.at_end() { Ok(()) } else { Err("unexpected characters at the end of the command".into()) }
    }

    /// Atom characters, also allowing `]` when `bracket` (for `BODY[...]`-like atoms).
    fn atom_with(&mut self, extra: &[u8]) -> R<&'a str> {
        let start = self.pos;
        while let Some(b) = self.peek() {
            if is_atom_char(b) || extra.contains(&b) {
                self.pos += 1;
            } else {
                break;
            }
        }
        if start == self.pos {
            return Err("expected an atom".into());
        }
        std::str::from_utf8(&self.b[start..self.pos]).map_err(|_| "invalid characters".into())
    }

    fn atom(&mut self) -> R<&'a str> {
        self.atom_with(&[])
    }

    fn number(&mut self) -> R<u64> {
        let start = self.pos;
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.pos += 1;
        }
        std::str::from_utf8(&self.b[start..self.pos])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| "expected a number".into())
    }

    fn number32(&mut self) -> R<u32> {
        u32::try_from(self.number()?).map_err(|_| "number out of range".into())
    }

    fn quoted(&mut self) -> R<Vec<u8>> {
        self.expect(b'"')?;
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None | Some(b'\r') | Some(b'\n') => return Err("unterminated quoted string".into()),
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    self.pos += 1;
                    match self.peek() {
                        Some(c @ (b'"' | b'\\')) => {
                            out.push(c);
                            self.pos += 1;
                        }
                        _ => return Err("bad escape in quoted string".into()),
                    }
                }
                Some(c) => {
                    out.push(c);
                    self.pos += 1;
                }
            }
        }
    }

    fn literal(&mut self) -> R<&'a [u8]> {
        self.expect(b'{')?;
        let n = self.number()?;
        self.eat(b'+');
        self.expect(b'}')?;
        if !self.b[self.pos..].starts_with(b"\r\n") {
            return Err("literal not followed by CRLF".into());
        }
        self.pos += 2;
        let n = usize::try_from(n).map_err(|_| "literal too large")?;
        let end = self.pos.checked_add(n).filter(|&e| e <= self.b.len()).ok_or("literal is truncated")?;
        let data = &self.b[self.pos..end];
        self.pos = end;
        Ok(data)
    }

    fn string(&mut self) -> R<Vec<u8>> {
        match self.peek() {
            Some(b'"') => self.quoted(),
            Some(b'{') => Ok(self.literal()?.to_vec()),
            _ => Err("expected a string".into()),
        }
    }

    fn astring(&mut self) -> R<Vec<u8>> {
        match self.peek() {
            Some(b'"' | b'{') => self.string(),
            _ => Ok(self.atom_with(b"]")?.as_bytes().to_vec()),
        }
    }

    fn astring_utf8(&mut self) -> R<String> {
        String::from_utf8(self.astring()?).map_err(|_| "string is not UTF-8".into())
    }

    /// A mailbox name or list pattern (`*`/`%` allowed).
    fn list_mailbox(&mut self) -> R<String> {
        match self.peek() {
            Some(b'"' | b'{') => String::from_utf8(self.string()?).map_err(|_| "name is not UTF-8".into()),
            _ => Ok(self.atom_with(b"]%*")?.to_owned()),
        }
    }

    fn sequence_set(&mut self) -> R<NumberSet> {
        let start = self.pos;
        while self.peek().is_some_and(|b| b.is_ascii_digit() || matches!(b, b':' | b',' | b'*' | b'$')) {
            self.pos += 1;
        }
        let text = std::str::from_utf8(&self.b[start..self.pos]).map_err(|_| "bad sequence set")?;
        NumberSet::parse_imap(text).map_err(|_| format!("bad sequence set {text:?}"))
    }

    fn flag_list(&mut self) -> R<Vec<String>> {
        let mut out = Vec::new();
        let paren = self.eat(b'(');
        loop {
            if paren && self.eat(b')') {
                break;
            }
            if !out.is_empty() {
                self.sp()?;
            }
            let backslash = self.eat(b'\\');
            let name = self.atom()?;
            out.push(if backslash { format!("\\{name}") } else { name.to_owned() });
            if !paren {
                if self.peek() == Some(b' ') && self.b.get(self.pos + 1).is_some_and(|&b| b != b'(') {
                    continue;
                }
                break;
            }
        }
        Ok(out)
    }
}

/// Parses one complete command (as the [`Framer`] assembles it).
pub fn parse_command(input: &[u8]) -> Result<Tagged, ParseError> {
    let mut c = Cursor { b: input, pos: 0 };
    let tag = match c.atom() {
        Ok(t) if t.bytes().all(is_tag_char) => t.to_owned(),
        _ => return Err(ParseError { tag: None, message: "missing or invalid tag".into() }),
    };
    let fail = |message: String| ParseError { tag: Some(tag.clone()), message };
    if c.sp().is_err() {
        return Err(fail("missing command".into()));
    }
    let command = parse_body(&mut c).map_err(fail)?;
    Ok(Tagged { tag, command })
}

fn parse_body(c: &mut Cursor<'_>) -> R<Command> {
    let name = c.atom()?.to_ascii_uppercase();
    let cmd = match name.as_str() {
        "CAPABILITY" => Command::Capability,
        "NOOP" => Command::Noop,
        "LOGOUT" => Command::Logout,
        "STARTTLS" => Command::StartTls,
        "CHECK" => Command::Check,
        "CLOSE" => Command::Close,
        "UNSELECT" => Command::Unselect,
        "EXPUNGE" => Command::Expunge(None),
        "IDLE" => Command::Idle,
        "NAMESPACE" => Command::Namespace,
        "LOGIN" => {
            c.sp()?;
            let user = c.astring_utf8()?;
            c.sp()?;
            let password = Zeroizing::new(c.astring_utf8()?);
            Command::Login { user, password }
        }
        "AUTHENTICATE" => {
            c.sp()?;
            let mechanism = c.atom()?.to_ascii_uppercase();
            let initial = if c.eat(b' ') {
                let start = c.pos;
                c.pos = c.b.len();
                Some(Zeroizing::new(String::from_utf8_lossy(&c.b[start..]).into_owned()))
            } else {
                None
            };
            Command::Authenticate { mechanism, initial }
        }
        "SELECT" | "EXAMINE" => {
            c.sp()?;
            let mailbox = c.astring_utf8()?;
            let mut condstore = false;
            if c.eat(b' ') {
                c.expect(b'(')?;
                while !c.eat(b')') {
                    c.eat(b' ');
                    let p = c.atom()?;
                    if p.eq_ignore_ascii_case("CONDSTORE") {
                        condstore = true;
                    } else {
                        return Err(format!("unknown SELECT parameter {p}"));
                    }
                }
            }
            Command::Select { mailbox, read_only: name == "EXAMINE", condstore }
        }
        "CREATE" | "DELETE" | "SUBSCRIBE" | "UNSUBSCRIBE" => {
            c.sp()?;
            let mailbox = c.astring_utf8()?;
            match name.as_str() {
                "CREATE" => Command::Create(mailbox),
                "DELETE" => Command::Delete(mailbox),
                "SUBSCRIBE" => Command::Subscribe(mailbox),
                _ => Command::Unsubscribe(mailbox),
            }
        }
        "RENAME" => {
            c.sp()?;
            let from = c.astring_utf8()?;
            c.sp()?;
            Command::Rename(from, c.astring_utf8()?)
        }
        "LIST" | "LSUB" => {
            c.sp()?;
            let reference = c.list_mailbox()?;
            c.sp()?;
            let pattern = c.list_mailbox()?;
            Command::List { reference, pattern, subscribed_only: name == "LSUB" }
        }
        "STATUS" => {
            c.sp()?;
            let mailbox = c.astring_utf8()?;
            c.sp()?;
            c.expect(b'(')?;
            let mut items = Vec::new();
            while !c.eat(b')') {
                if !items.is_empty() {
                    c.sp()?;
                }
                items.push(match c.atom()?.to_ascii_uppercase().as_str() {
                    "MESSAGES" => StatusItem::Messages,
                    "RECENT" => StatusItem::Recent,
                    "UIDNEXT" => StatusItem::UidNext,
                    "UIDVALIDITY" => StatusItem::UidValidity,
                    "UNSEEN" => StatusItem::Unseen,
                    "HIGHESTMODSEQ" => StatusItem::HighestModSeq,
                    "SIZE" => StatusItem::Size,
                    other => return Err(format!("unknown STATUS item {other}")),
                });
            }
            Command::Status { mailbox, items }
        }
        "APPEND" => {
            c.sp()?;
            let mailbox = c.astring_utf8()?;
            c.sp()?;
            let mut flags = Vec::new();
            if c.peek() == Some(b'(') {
                flags = c.flag_list()?;
                c.sp()?;
            }
            let mut date = None;
            if c.peek() == Some(b'"') {
                let text = c.quoted()?;
                date = Some(parse_date_time(&String::from_utf8_lossy(&text)).ok_or("bad APPEND date-time")?);
                c.sp()?;
            }
            let message = Zeroizing::new(c.literal()?.to_vec());
            Command::Append { mailbox, flags, date, message }
        }
        "SEARCH" => parse_search(c, false)?,
        "FETCH" => parse_fetch(c, false)?,
        "STORE" => parse_store(c, false)?,
        "COPY" | "MOVE" => parse_copy(c, false, name == "MOVE")?,
        "UID" => {
            c.sp()?;
            let sub = c.atom()?.to_ascii_uppercase();
            match sub.as_str() {
                "SEARCH" => parse_search(c, true)?,
                "FETCH" => parse_fetch(c, true)?,
                "STORE" => parse_store(c, true)?,
                "COPY" | "MOVE" => parse_copy(c, true, sub == "MOVE")?,
                "EXPUNGE" => {
                    c.sp()?;
                    Command::Expunge(Some(c.sequence_set()?))
                }
                other => return Err(format!("unknown UID command {other}")),
            }
        }
        "ID" => {
            // The client's identification is only logged by field count; skip its content.
            c.pos = c.b.len();
            Command::Id
        }
        "ENABLE" => {
            let mut caps = Vec::new();
            while c.eat(b' ') {
                caps.push(c.atom()?.to_ascii_uppercase());
            }
            if caps.is_empty() {
                return Err("ENABLE needs at least one capability".into());
            }
            Command::Enable(caps)
        }
        other => return Err(format!("unknown command {}", other.chars().take(40).collect::<String>())),
    };
    c.end()?;
    Ok(cmd)
}

fn parse_copy(c: &mut Cursor<'_>, uid: bool, is_move: bool) -> R<Command> {
    c.sp()?;
    let set = c.sequence_set()?;
    c.sp()?;
    let mailbox = c.astring_utf8()?;
    Ok(Command::Copy { uid, set, mailbox, is_move })
}

fn parse_store(c: &mut Cursor<'_>, uid: bool) -> R<Command> {
    c.sp()?;
    let set = c.sequence_set()?;
    c.sp()?;
    let mut unchanged_since = None;
    if c.eat(b'(') {
        let p = c.atom()?;
        if !p.eq_ignore_ascii_case("UNCHANGEDSINCE") {
            return Err(format!("unknown STORE modifier {p}"));
        }
        c.sp()?;
        unchanged_since = Some(c.number()?);
        c.expect(b')')?;
        c.sp()?;
    }
    let item = c.atom()?.to_ascii_uppercase();
    let (op, rest) = match item.as_bytes().first() {
        Some(b'+') => (StoreOp::Add, &item[1..]),
        Some(b'-') => (StoreOp::Remove, &item[1..]),
        _ => (StoreOp::Replace, item.as_str()),
    };
    let silent = match rest {
        "FLAGS" => false,
        "FLAGS.SILENT" => true,
        other => return Err(format!("unknown STORE item {other}")),
    };
    c.sp()?;
    let flags = c.flag_list()?;
    Ok(Command::Store { uid, set, op, silent, flags, unchanged_since })
}

fn parse_fetch(c: &mut Cursor<'_>, uid: bool) -> R<Command> {
    c.sp()?;
    let set = c.sequence_set()?;
    c.sp()?;
    let mut attrs = Vec::new();
    if c.eat(b'(') {
        loop {
            attrs.push(fetch_attr(c)?);
            if c.eat(b')') {
                break;
            }
            c.sp()?;
        }
    } else {
        let start = c.pos;
        let word = c.atom()?.to_ascii_uppercase();
        match word.as_str() {
            "ALL" => attrs.extend([
                FetchAttr::Flags,
                FetchAttr::InternalDate,
                FetchAttr::Rfc822Size,
                FetchAttr::Envelope,
            ]),
            "FAST" => attrs.extend([FetchAttr::Flags, FetchAttr::InternalDate, FetchAttr::Rfc822Size]),
            "FULL" => attrs.extend([
                FetchAttr::Flags,
                FetchAttr::InternalDate,
                FetchAttr::Rfc822Size,
                FetchAttr::Envelope,
                FetchAttr::Body,
            ]),
            _ => {
                c.pos = start;
                attrs.push(fetch_attr(c)?);
            }
        }
    }
    let mut changed_since = None;
    if c.eat(b' ') {
        c.expect(b'(')?;
        let p = c.atom()?;
        if !p.eq_ignore_ascii_case("CHANGEDSINCE") {
            return Err(format!("unknown FETCH modifier {p}"));
        }
        c.sp()?;
        changed_since = Some(c.number()?);
        c.expect(b')')?;
    }
    Ok(Command::Fetch { uid, set, attrs, changed_since })
}

fn fetch_attr(c: &mut Cursor<'_>) -> R<FetchAttr> {
    let start = c.pos;
    while c.peek().is_some_and(|b| b.is_ascii_alphanumeric() || b == b'.') {
        c.pos += 1;
    }
    let word = std::str::from_utf8(&c.b[start..c.pos]).map_err(|_| "bad item")?.to_ascii_uppercase();
    Ok(match word.as_str() {
        "FLAGS" => FetchAttr::Flags,
        "INTERNALDATE" => FetchAttr::InternalDate,
        "RFC822.SIZE" => FetchAttr::Rfc822Size,
        "ENVELOPE" => FetchAttr::Envelope,
        "BODYSTRUCTURE" => FetchAttr::BodyStructure,
        "RFC822" => FetchAttr::Rfc822,
        "RFC822.HEADER" => FetchAttr::Rfc822Header,
        "RFC822.TEXT" => FetchAttr::Rfc822Text,
        "UID" => FetchAttr::Uid,
        "MODSEQ" => FetchAttr::ModSeq,
        "BODY" | "BODY.PEEK" if c.peek() == Some(b'[') => {
            c.pos += 1;
            let section = parse_section(c)?;
            c.expect(b']')?;
            let mut partial = None;
            if c.eat(b'<') {
                let origin = c.number32()?;
                c.expect(b'.')?;
                let count = c.number32()?;
                if count == 0 {
                    return Err("partial fetch of zero octets".into());
                }
                c.expect(b'>')?;
                partial = Some((origin, count));
            }
            FetchAttr::Section { peek: word == "BODY.PEEK", section, partial }
        }
        "BODY" => FetchAttr::Body,
        other => return Err(format!("unknown FETCH item {other}")),
    })
}

fn parse_section(c: &mut Cursor<'_>) -> R<Section> {
    let mut section = Section::default();
    loop {
        if c.peek().is_some_and(|b| b.is_ascii_digit()) {
            let n = c.number32()?;
            if n == 0 {
                return Err("section part numbers start at 1".into());
            }
            section.part.push(n);
            if !c.eat(b'.') {
                return Ok(section);
            }
        } else {
            break;
        }
    }
    if c.peek() == Some(b']') {
        if !section.part.is_empty() {
            return Err("section ends with a dot".into());
        }
        return Ok(section);
    }
    let start = c.pos;
    while c.peek().is_some_and(|b| b.is_ascii_alphabetic() || b == b'.') {
        c.pos += 1;
    }
    let word = std::str::from_utf8(&c.b[start..c.pos]).map_err(|_| "bad section")?.to_ascii_uppercase();
    section.kind = match word.as_str() {
        "HEADER" => SectionKind::Header,
        "TEXT" => SectionKind::Text,
        "MIME" if !section.part.is_empty() => SectionKind::Mime,
        "HEADER.FIELDS" | "HEADER.FIELDS.NOT" => {
            c.sp()?;
            c.expect(b'(')?;
            let mut names = Vec::new();
            loop {
                names.push(String::from_utf8(c.astring()?).map_err(|_| "header name is not UTF-8")?);
                if c.eat(b')') {
                    break;
                }
                c.sp()?;
            }
            if word == "HEADER.FIELDS" {
                SectionKind::HeaderFields(names)
            } else {
                SectionKind::HeaderFieldsNot(names)
            }
        }
        other => return Err(format!("unknown section {other}")),
    };
    Ok(section)
}

fn parse_search(c: &mut Cursor<'_>, uid: bool) -> R<Command> {
    let mut keys = Vec::new();
    while c.eat(b' ') {
        keys.push(search_key(c, 0)?);
        if let Some(SearchKey::Header(name, _)) = keys.last()
            && name == "\0CHARSET"
        {
            keys.pop();
        }
    }
    if keys.is_empty() {
        return Err("SEARCH needs criteria".into());
    }
    Ok(Command::Search { uid, key: SearchKey::And(keys) })
}

fn text_arg(c: &mut Cursor<'_>) -> R<String> {
    c.sp()?;
    Ok(String::from_utf8_lossy(&c.astring()?).into_owned())
}

fn search_key(c: &mut Cursor<'_>, depth: usize) -> R<SearchKey> {
    if depth > 32 {
        return Err("search criteria nested too deeply".into());
    }
    if c.eat(b'(') {
        let mut keys = vec![search_key(c, depth + 1)?];
        while !c.eat(b')') {
            c.sp()?;
            keys.push(search_key(c, depth + 1)?);
        }
        return Ok(SearchKey::And(keys));
    }
    if c.peek().is_some_and(|b| b.is_ascii_digit() || b == b'*') {
        return Ok(SearchKey::Sequence(c.sequence_set()?));
    }
    let word = c.atom()?.to_ascii_uppercase();
    let date = |c: &mut Cursor<'_>| -> R<Day> {
        c.sp()?;
        let text = String::from_utf8_lossy(&c.astring()?).into_owned();
        parse_date(&text).ok_or_else(|| format!("bad date {text:?}"))
    };
    Ok(match word.as_str() {
        "ALL" => SearchKey::All,
        "ANSWERED" => SearchKey::Flag(Flags::ANSWERED),
        "DELETED" => SearchKey::Flag(Flags::DELETED),
        "DRAFT" => SearchKey::Flag(Flags::DRAFT),
        "FLAGGED" => SearchKey::Flag(Flags::FLAGGED),
        "SEEN" => SearchKey::Flag(Flags::SEEN),
        "UNANSWERED" => SearchKey::NotFlag(Flags::ANSWERED),
        "UNDELETED" => SearchKey::NotFlag(Flags::DELETED),
        "UNDRAFT" => SearchKey::NotFlag(Flags::DRAFT),
        "UNFLAGGED" => SearchKey::NotFlag(Flags::FLAGGED),
        "UNSEEN" => SearchKey::NotFlag(Flags::SEEN),
        "NEW" => SearchKey::New,
        "RECENT" => SearchKey::Recent,
        "OLD" => SearchKey::Old,
        "KEYWORD" => SearchKey::Keyword(text_arg(c)?),
        "UNKEYWORD" => SearchKey::Unkeyword(text_arg(c)?),
        "BEFORE" => SearchKey::Before(date(c)?),
        "ON" => SearchKey::On(date(c)?),
        "SINCE" => SearchKey::Since(date(c)?),
        "SENTBEFORE" => SearchKey::SentBefore(date(c)?),
        "SENTON" => SearchKey::SentOn(date(c)?),
        "SENTSINCE" => SearchKey::SentSince(date(c)?),
        "LARGER" => {
            c.sp()?;
            SearchKey::Larger(c.number()?)
        }
        "SMALLER" => {
            c.sp()?;
            SearchKey::Smaller(c.number()?)
        }
        "UID" => {
            c.sp()?;
            SearchKey::Uid(c.sequence_set()?)
        }
        "MODSEQ" => {
            c.sp()?;
            SearchKey::ModSeq(c.number()?)
        }
        "FROM" | "TO" | "CC" | "BCC" | "SUBJECT" => SearchKey::Header(word.clone(), text_arg(c)?),
        "HEADER" => {
            let name = text_arg(c)?;
            SearchKey::Header(name.to_ascii_uppercase(), text_arg(c)?)
        }
        "BODY" => SearchKey::Body(text_arg(c)?),
        "TEXT" => SearchKey::Text(text_arg(c)?),
        "NOT" => {
            c.sp()?;
            SearchKey::Not(Box::new(search_key(c, depth + 1)?))
        }
        "OR" => {
            c.sp()?;
            let a = search_key(c, depth + 1)?;
            c.sp()?;
            SearchKey::Or(Box::new(a), Box::new(search_key(c, depth + 1)?))
        }
        "CHARSET" => {
            let charset = text_arg(c)?.to_ascii_uppercase();
            if charset != "UTF-8" && charset != "US-ASCII" {
                return Err(format!("[BADCHARSET (UTF-8 US-ASCII)] charset {charset} is not supported"));
            }
            // A marker the caller drops: CHARSET is not a criterion.
            SearchKey::Header("\0CHARSET".into(), String::new())
        }
        other => return Err(format!("unknown search key {other}")),
    })
}

const MONTHS: [&str; 12] =
    ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"];

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    // Client-supplied years are clamped so that no arithmetic below can overflow.
    let y = y.clamp(-100_000, 100_000);
    let (m, d) = (m.clamp(1, 12), d.clamp(1, 31));
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day number: (year, month 1-12, day 1-31).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Month name to 1..=12.
pub fn month_number(name: &str) -> Option<u32> {
    let upper = name.to_ascii_uppercase();
    MONTHS.iter().position(|m| *m == upper).and_then(|i| u32::try_from(i + 1).ok())
}

/// The three-letter English month name of 1..=12.
pub fn month_name(m: u32) -> &'static str {
    const NAMES: [&str; 12] =
        ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    NAMES[usize::try_from(m.clamp(1, 12) - 1).unwrap_or(0)]
}

/// `1-Feb-1994` (SEARCH date) to a day number.
pub fn parse_date(text: &str) -> Option<Day> {
    let mut parts = text.trim().split('-');
    let d: u32 = parts.next()?.trim().parse().ok()?;
    let m = month_number(parts.next()?)?;
    let y: i64 = parts.next()?.parse().ok()?;
    if parts.next().is_some() || !(1..=31).contains(&d) {
        return None;
    }
    Some(days_from_civil(y, m, d))
}

/// `17-Jul-1996 02:44:25 -0700` (APPEND date-time) to seconds since the epoch.
pub fn parse_date_time(text: &str) -> Option<i64> {
    let mut it = text.trim().split(' ');
    let day = parse_date(it.next()?)?;
    let time = it.next()?;
    let zone = it.next()?;
    let hms: Vec<i64> = time.split(':').map(|p| p.parse().ok()).collect::<Option<_>>()?;
    let [h, mi, s] = hms[..] else { return None };
    if !(0..24).contains(&h) || !(0..60).contains(&mi) || !(0..61).contains(&s) {
        return None;
    }
    let sign = match zone.as_bytes().first()? {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let digits = zone.get(1..)?;
    if digits.len() != 4 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let z: i64 = digits.parse().ok()?;
    let offset = sign * ((z / 100) * 3600 + (z % 100) * 60);
    Some(day * 86_400 + h * 3600 + mi * 60 + s - offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(f: &mut Framer) -> Vec<Frame> {
        std::iter::from_fn(|| f.next_frame()).collect()
    }

    #[test]
    fn literals_are_assembled_and_synchronised() {
        let mut f = Framer::new(100);
        f.feed(b"a1 LOGIN {5}\r\n");
        assert_eq!(frames(&mut f), vec![Frame::Continue]);
        f.feed(b"alice {6+}\r\nsecret\r\n");
        let got = frames(&mut f);
        assert_eq!(got, vec![Frame::Command(b"a1 LOGIN {5}\r\nalice {6+}\r\nsecret".to_vec())]);
        let Frame::Command(bytes) = &got[0] else { unreachable!() };
        let t = parse_command(bytes).unwrap();
        assert_eq!(t.tag, "a1");
        let Command::Login { user, password } = t.command else { panic!() };
        assert_eq!((user.as_str(), password.as_str()), ("alice", "secret"));
    }

    #[test]
    fn huge_literals_are_refused_before_they_are_read() {
        let mut f = Framer::new(100);
        f.feed(b"a2 APPEND INBOX {101}\r\n");
        assert_eq!(frames(&mut f), vec![Frame::TooBig { tag: "a2".into(), size: 101, non_sync: false }]);
        f.feed(b"a3 NOOP\r\n");
        assert_eq!(frames(&mut f), vec![Frame::Command(b"a3 NOOP".to_vec())]);
        f.feed(b"a4 APPEND INBOX {99999999999999999999}\r\n");
        assert!(matches!(frames(&mut f)[..], [Frame::Command(_)]), "a 20-digit size is no literal");
    }

    #[test]
    fn many_literals_cannot_add_up_beyond_the_limit() {
        let mut f = Framer::new(100);
        let mut refused = false;
        for _ in 0..2000 {
            f.feed(b"x {90+}\r\n");
            f.feed(&[b'a'; 90]);
            while let Some(frame) = f.next_frame() {
                refused |= matches!(frame, Frame::TooBig { .. });
            }
        }
        assert!(refused);
        assert!(f.buffered() < 100 + MAX_LINE + 200);
    }

    #[test]
    fn fetch_items_parse() {
        let t = parse_command(
            b"7 UID FETCH 1:* (FLAGS BODY.PEEK[1.2.HEADER.FIELDS (Subject From)]<0.100> BODY[] MODSEQ) (CHANGEDSINCE 5)",
        )
        .unwrap();
        let Command::Fetch { uid: true, attrs, changed_since: Some(5), .. } = t.command else { panic!() };
        assert_eq!(attrs.len(), 4);
        assert_eq!(
            attrs[1],
            FetchAttr::Section {
                peek: true,
                section: Section {
                    part: vec![1, 2],
                    kind: SectionKind::HeaderFields(vec!["Subject".into(), "From".into()])
                },
                partial: Some((0, 100)),
            }
        );
    }

    #[test]
    fn search_and_store_parse() {
        let t =
            parse_command(b"s SEARCH CHARSET UTF-8 OR SUBJECT hello (FROM \"bob\" UNSEEN) NOT 2:4").unwrap();
        let Command::Search { key: SearchKey::And(keys), .. } = t.command else { panic!() };
        assert_eq!(keys.len(), 2);
        let t = parse_command(b"s UID STORE 1,3 (UNCHANGEDSINCE 9) +FLAGS.SILENT (\\Seen $Work)").unwrap();
        assert_eq!(
            t.command,
            Command::Store {
                uid: true,
                set: NumberSet::parse_imap("1,3").unwrap(),
                op: StoreOp::Add,
                silent: true,
                flags: vec!["\\Seen".into(), "$Work".into()],
                unchanged_since: Some(9),
            }
        );
        assert!(parse_command(b"x FROBNICATE").unwrap_err().message.contains("unknown command"));
        assert_eq!(parse_command(b"(bad").unwrap_err().tag, None);
    }

    #[test]
    fn dates_round_trip() {
        assert_eq!(parse_date("1-Jan-1970"), Some(0));
        let d = parse_date("29-Feb-2024").unwrap();
        assert_eq!(civil_from_days(d), (2024, 2, 29));
        assert_eq!(parse_date_time("01-Jan-1970 01:00:00 +0100"), Some(0));
        // Absurd values are refused or clamped, never overflow.
        assert_eq!(parse_date_time("01-Jan-1970 99999999999999:00:00 +0100"), None);
        assert_eq!(parse_date_time("01-Jan-1970 01:00:00 +99999999999999999"), None);
        let _ = parse_date("1-Jan-999999999999999999");
        let _ = crate::mime::date_header_day("1 Jan 999999999999999999");
    }
}
