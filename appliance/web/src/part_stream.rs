//! A sans-I/O, streaming extractor of one attachment of a MIME message.
//!
//! [`PartStream`] is fed the presented message (the gateway's `X-QKD-*` lines, then the
//! message) in chunks of any size and emits the decoded bytes of the attachment with a given
//! index, keeping only a bounded buffer: a part's header block (at most
//! [`MAX_HEADER_BYTES`]), a boundary's worth of look-ahead, and a few held-back bytes that may
//! still turn out to be the line break before a delimiter.
//!
//! "Index" means exactly what the message JSON's attachment list and the in-memory
//! [`crate::message::attachment`] mean: the position in `mail-parser`'s
//! `Message::attachments()`. The walk therefore follows `mail-parser`'s own algorithm (its
//! part classification, its delimiter recognition, which is "`--` then the boundary" anywhere
//! in the text, and its three body decoders), and parses each header block with
//! `mail-parser`'s header parser, so RFC 2047/2231 file names and folded headers read the same.
//!
//! Where the in-memory parse would take a path that cannot be followed without the whole
//! message (an embedded `message/rfc822`, a multipart whose boundary never appears, a part
//! before the wanted one whose encoding is broken, a text attachment in a multi-byte legacy
//! charset), the extractor says [`PartError::NotStreamable`] before it has emitted anything,
//! and the caller uses the in-memory path. A wanted part whose own encoding turns out broken
//! after bytes were emitted is [`PartError::Malformed`]: the download fails rather than
//! delivering something other than what the message view describes.

use mail_parser::decoders::charsets::map::charset_decoder;
use mail_parser::parsers::MessageStream;
use mail_parser::{
    ContentType, Encoding, GetHeader as _, HeaderName, HeaderValue, MessageParser, MessagePart,
};
use mail_parser::{MimeHeaders as _, PartType};
use zeroize::Zeroizing;

/// Longest header block of one part, bytes.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Longest boundary parameter, bytes (RFC 2046 allows 70).
pub const MAX_BOUNDARY_BYTES: usize = 200;
/// Longest run of trailing white space on a quoted-printable line, bytes.
pub const MAX_QP_WHITESPACE: usize = 16 * 1024;

/// Why an attachment cannot be streamed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PartError {
    /// A part's header block does not end within [`MAX_HEADER_BYTES`].
    #[error("a part's header block is longer than {MAX_HEADER_BYTES} bytes")]
    HeaderTooLong,
    /// A quoted-printable line carries more trailing white space than [`MAX_QP_WHITESPACE`].
    #[error("a quoted-printable line has more than {MAX_QP_WHITESPACE} bytes of trailing white space")]
    LineTooLong,
    /// The message takes a path only the in-memory parser follows; nothing was emitted.
    #[error("this message needs the in-memory parser: {0}")]
    NotStreamable(&'static str),
    /// The wanted attachment's encoding is broken (after some of it was emitted).
    #[error("the attachment is malformed: {0}")]
    Malformed(&'static str),
}

/// The wanted attachment's description, known before its first byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartHead {
    /// File name (`attachment` when the part names none).
    pub filename: String,
    /// `type/subtype`.
    pub content_type: String,
}

/// Where the walk is.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Progress {
    /// The wanted part ended: nothing more to emit.
    Complete,
    /// The message ended without an attachment of that index.
    NotFound,
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum MimeType {
    MultipartMixed,
    MultipartAlternative,
    MultipartRelated,
    MultipartDigest,
    TextPlain,
    TextHtml,
    TextOther,
    Inline,
    Message,
    Other,
}

/// One multipart level, as `mail-parser`'s `MessageParserState`.
#[derive(Debug, Clone)]
struct Level {
    mime_type: MimeType,
    boundary: Option<Vec<u8>>,
    in_alternative: bool,
    parts: usize,
    need_html_body: bool,
    need_text_body: bool,
}

/// How the wanted text attachment's bytes become the text `mail-parser` would show.
#[derive(Debug)]
enum TextMode {
    /// Bytes as they are.
    Binary,
    /// UTF-8 with invalid sequences replaced (held: an incomplete sequence at a chunk edge).
    Utf8(Zeroizing<Vec<u8>>),
    /// A single-byte charset decoded byte by byte (so chunk edges do not matter).
    SingleByte(fn(&[u8]) -> String),
}

/// A body decoder's state, one per leaf part.
#[derive(Debug)]
enum Decoder {
    Raw { last: u8, before_last: u8, end_pos: usize, since_nl: usize, count: usize },
    Base64 { chunk: u32, byte_count: u8, last: u8 },
    Qp { state: QpState, hex1: u8, last: u8, before_last: u8, ws_count: usize, crlf: bool },
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum QpState {
    None,
    Eq,
    Hex1,
}

#[derive(Debug)]
enum Phase {
    /// Reading a part's header block.
    Headers,
    /// Looking for a multipart's first delimiter (`seek_next_part`); then the child level.
    Preamble(Level),
    /// Decoding a leaf part's body.
    Body { decoder: Decoder, wanted: bool },
    /// Just after a delimiter: `--` ends the multipart (`is_multipart_end`).
    AfterDelimiter,
    /// White space after a delimiter, up to a line end (`skip_crlf`), then headers.
    SkipCrlf,
    /// Looking for an ancestor's next delimiter after a nested multipart ended.
    SeekAncestor,
    /// Finished.
    Done(Progress),
}

/// The streaming extractor (see the module docs).
pub struct PartStream {
    wanted: usize,
    /// Input not yet consumed (wiped when dropped: it is plaintext).
    input: Zeroizing<Vec<u8>>,
    pos: usize,
    eof: bool,
    phase: Phase,
    level: Level,
    stack: Vec<Level>,
    attachments_seen: usize,
    head: Option<PartHead>,
    text: TextMode,
    /// Decoded bytes of the wanted part held back: they may still be cut (line break before a
    /// delimiter, trailing white space of a quoted-printable line).
    held: Zeroizing<Vec<u8>>,
    /// Where a seek last looked (so a long preamble is not rescanned).
    seek_last: u8,
    /// How many of the held bytes a later cut could still reach.
    keep: usize,
    high_water: usize,
}

impl PartStream {
    /// An extractor of attachment `index`.
    pub fn new(index: usize) -> Self {
        PartStream {
            wanted: index,
            input: Zeroizing::new(Vec::new()),
            pos: 0,
            eof: false,
            phase: Phase::Headers,
            level: Level {
                mime_type: MimeType::Message,
                boundary: None,
                in_alternative: false,
                parts: 0,
                need_html_body: true,
                need_text_body: true,
            },
            stack: Vec::new(),
            attachments_seen: 0,
            head: None,
            text: TextMode::Binary,
            held: Zeroizing::new(Vec::new()),
            seek_last: 0,
            keep: 0,
            high_water: 0,
        }
    }

    /// The wanted attachment's description, once its header block has been read.
    pub fn head(&self) -> Option<&PartHead> {
        self.head.as_ref()
    }

    /// Whether the wanted attachment has been emitted completely.
    pub fn is_complete(&self) -> bool {
        matches!(self.phase, Phase::Done(Progress::Complete))
    }

    /// Whether the message ended without an attachment of that index.
    pub fn is_not_found(&self) -> bool {
        matches!(self.phase, Phase::Done(Progress::NotFound))
    }

    /// The most bytes kept between two calls (input not yet consumed plus held-back output).
    pub fn high_water(&self) -> usize {
        self.high_water
    }

    /// Feeds the next chunk of the message; decoded bytes of the wanted part go to `out`.
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), PartError> {
        if matches!(self.phase, Phase::Done(_)) {
            return Ok(());
        }
        self.input.extend_from_slice(chunk);
        self.run(out)
    }

    /// The message has ended: finishes the walk (see [`Self::is_complete`]).
    pub fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), PartError> {
        self.eof = true;
        if matches!(self.phase, Phase::Done(_)) {
            return Ok(());
        }
        self.run(out)
    }

    fn run(&mut self, out: &mut Vec<u8>) -> Result<(), PartError> {
        let result = self.walk(out);
        // Drop what was consumed; the rest waits for more input.
        self.input.drain(..self.pos);
        self.pos = 0;
        if let Phase::Done(_) = self.phase {
            self.input.clear();
        }
        self.high_water = self.high_water.max(self.input.len() + self.held.len());
        if result.is_err() {
            self.input.clear();
            self.held.clear();
            self.phase = Phase::Done(Progress::NotFound);
        }
        result
    }

    fn avail(&self) -> &[u8] {
        &self.input[self.pos..]
    }

    /// Runs until more input is needed or the walk ends.
    fn walk(&mut self, out: &mut Vec<u8>) -> Result<(), PartError> {
        loop {
            let phase = std::mem::replace(&mut self.phase, Phase::Done(Progress::NotFound));
            let (next, more) = match phase {
                Phase::Headers => self.headers()?,
                Phase::Preamble(child) => self.preamble(child)?,
                Phase::Body { decoder, wanted } => self.body(decoder, wanted, out)?,
                Phase::AfterDelimiter => self.after_delimiter()?,
                Phase::SkipCrlf => self.skip_crlf(),
                Phase::SeekAncestor => self.seek_ancestor()?,
                Phase::Done(p) => (Phase::Done(p), false),
            };
            self.phase = next;
            if more || matches!(self.phase, Phase::Done(_)) {
                return Ok(());
            }
        }
    }

    /// A part's header block, parsed by `mail-parser`; then what the part is.
    fn headers(&mut self) -> Result<(Phase, bool), PartError> {
        let avail = self.avail();
        // `parse_headers` ends at a line holding only white space; until such a line (or the
        // end of the message) is here, the block may continue.
        let candidate = self.eof || has_blank_line(avail);
        if !candidate {
            if avail.len() > MAX_HEADER_BYTES {
                return Err(PartError::HeaderTooLong);
            }
            return Ok((Phase::Headers, true));
        }
        let parser = MessageParser::default();
        let mut stream = MessageStream::new(avail);
        let mut headers = Vec::new();
        if !stream.parse_headers(&parser, &mut headers) {
            if self.eof {
                // No further part: the message ended.
                return Ok((Phase::Done(self.ended()), false));
            }
            if avail.len() > MAX_HEADER_BYTES {
                return Err(PartError::HeaderTooLong);
            }
            // The blank line was a folded header's continuation: wait for the real end.
            return Ok((Phase::Headers, true));
        }
        let consumed = stream.offset();
        let part = MessagePart {
            headers,
            is_encoding_problem: false,
            body: PartType::default(),
            encoding: Encoding::None,
            offset_header: 0,
            offset_body: 0,
            offset_end: 0,
        };
        let info = PartInfo::of(&part);
        drop(part);
        self.pos += consumed;
        self.part(info)
    }

    /// What `mail-parser` does with a part once its headers are read.
    fn part(&mut self, info: PartInfo) -> Result<(Phase, bool), PartError> {
        self.level.parts += 1;
        let (is_multipart, is_inline, is_text, mime_type) =
            mime_type(info.ctype.as_ref(), self.level.mime_type);
        if is_multipart && let Some(boundary) = info.boundary.clone() {
            if boundary.len() > MAX_BOUNDARY_BYTES {
                return Err(PartError::HeaderTooLong);
            }
            let child = Level {
                in_alternative: self.level.in_alternative || mime_type == MimeType::MultipartAlternative,
                mime_type,
                boundary: Some(boundary),
                parts: 0,
                need_html_body: self.level.need_html_body,
                need_text_body: self.level.need_text_body,
            };
            self.seek_last = 0;
            return Ok((Phase::Preamble(child), false));
        }
        let encoding = info.encoding;
        if mime_type == MimeType::Message && encoding == Encoding::None {
            return Err(PartError::NotStreamable("an embedded message"));
        }
        let is_attachment = if mime_type == MimeType::Message {
            true
        } else {
            let level = &mut self.level;
            let is_inline = is_inline
                && !info.disposition_attachment
                && (level.parts == 1
                    || level.mime_type != MimeType::MultipartRelated
                        && (mime_type == MimeType::Inline || !info.has_name));
            let (add_to_html, add_to_text) = if level.mime_type == MimeType::MultipartAlternative {
                match mime_type {
                    MimeType::TextHtml => (true, false),
                    MimeType::TextPlain => (false, true),
                    _ => (false, false),
                }
            } else if is_inline {
                if level.in_alternative && (level.need_text_body || level.need_html_body) {
                    match mime_type {
                        MimeType::TextHtml => level.need_text_body = false,
                        MimeType::TextPlain => level.need_html_body = false,
                        _ => (),
                    }
                }
                (level.need_html_body, level.need_text_body)
            } else {
                (false, false)
            };
            if is_text {
                let is_html = mime_type == MimeType::TextHtml;
                !add_to_html && is_html || !add_to_text && !is_html
            } else {
                true
            }
        };
        let mut wanted = false;
        if is_attachment {
            if self.attachments_seen == self.wanted {
                if mime_type == MimeType::Message {
                    return Err(PartError::NotStreamable("the attachment is an embedded message"));
                }
                self.text = if is_text {
                    match info.charset.as_deref() {
                        None => TextMode::Utf8(Zeroizing::default()),
                        Some(c) => match charset_decoder(c.as_bytes()) {
                            None => TextMode::Utf8(Zeroizing::default()),
                            Some(decode) if is_single_byte(c) => TextMode::SingleByte(decode),
                            Some(_) => {
                                return Err(PartError::NotStreamable(
                                    "a text attachment in a multi-byte charset",
                                ));
                            }
                        },
                    }
                } else {
                    TextMode::Binary
                };
                self.head = Some(PartHead { filename: info.filename, content_type: info.content_type });
                wanted = true;
            }
            self.attachments_seen += 1;
        }
        let decoder = match encoding {
            Encoding::Base64 => Decoder::Base64 { chunk: 0, byte_count: 0, last: b'\n' },
            Encoding::QuotedPrintable => Decoder::Qp {
                state: QpState::None,
                hex1: 0,
                last: 0,
                before_last: 0,
                ws_count: 0,
                crlf: false,
            },
            Encoding::None => Decoder::Raw { last: b'\n', before_last: 0, end_pos: 0, since_nl: 0, count: 0 },
        };
        self.held.clear();
        Ok((Phase::Body { decoder, wanted }, false))
    }

    /// How the walk ends when the message ends.
    fn ended(&self) -> Progress {
        if self.head.is_some() { Progress::Complete } else { Progress::NotFound }
    }

    /// Whether "`--` then `boundary`" at the second dash can be decided: `Some(matched)`, or
    /// `None` when more input is needed.
    fn delimiter_at(&self, at: usize, boundary: &[u8]) -> Option<bool> {
        let rest = &self.input[at..];
        if rest.len() >= boundary.len() {
            Some(rest.starts_with(boundary))
        } else if self.eof || !boundary.starts_with(rest) {
            Some(false)
        } else {
            None
        }
    }

    /// `seek_next_part`: the multipart's first delimiter; the preamble is skipped.
    fn preamble(&mut self, child: Level) -> Result<(Phase, bool), PartError> {
        let boundary = child.boundary.clone().unwrap_or_default();
        match self.seek(&boundary) {
            Some(true) => {
                let parent = std::mem::replace(&mut self.level, child);
                self.stack.push(parent);
                Ok((Phase::SkipCrlf, false))
            }
            Some(false) => Err(PartError::NotStreamable("a multipart whose boundary never appears")),
            None => Ok((Phase::Preamble(child), true)),
        }
    }

    /// Scans for "`--` then `boundary`" and consumes it: `Some(true)` found, `Some(false)` the
    /// message ended, `None` more input needed.
    fn seek(&mut self, boundary: &[u8]) -> Option<bool> {
        while let Some(&ch) = self.input.get(self.pos) {
            if ch == b'-' && self.seek_last == b'-' && !boundary.is_empty() {
                match self.delimiter_at(self.pos + 1, boundary) {
                    None => return None,
                    Some(true) => {
                        self.pos += 1 + boundary.len();
                        self.seek_last = 0;
                        return Some(true);
                    }
                    Some(false) => {}
                }
            }
            self.seek_last = ch;
            self.pos += 1;
        }
        if self.eof { Some(false) } else { None }
    }

    /// `seek_next_part_offset` for the level now current, after a nested multipart ended.
    fn seek_ancestor(&mut self) -> Result<(Phase, bool), PartError> {
        let boundary = self.level.boundary.clone().unwrap_or_default();
        match self.seek(&boundary) {
            Some(true) => Ok((Phase::AfterDelimiter, false)),
            Some(false) => Ok((Phase::Done(self.ended()), false)),
            None => Ok((Phase::SeekAncestor, true)),
        }
    }

    /// `is_multipart_end` after a delimiter.
    fn after_delimiter(&mut self) -> Result<(Phase, bool), PartError> {
        let avail = self.avail();
        if avail.len() < 2 && !self.eof {
            return Ok((Phase::AfterDelimiter, true));
        }
        match (avail.first().copied(), avail.get(1).copied()) {
            (Some(b'\r'), Some(b'\n')) => {
                self.pos += 2;
                Ok((Phase::Headers, false))
            }
            (Some(b'-'), Some(b'-')) => {
                self.pos += 2;
                self.multipart_ended()
            }
            (Some(b'\n'), _) => {
                self.pos += 1;
                Ok((Phase::Headers, false))
            }
            (Some(a), _) if a.is_ascii_whitespace() => {
                self.pos += 1;
                Ok((Phase::SkipCrlf, false))
            }
            _ => Ok((Phase::Headers, false)),
        }
    }

    /// The current multipart ended: back to its parent, which looks for its next delimiter.
    fn multipart_ended(&mut self) -> Result<(Phase, bool), PartError> {
        let Some(parent) = self.stack.pop() else {
            return Ok((Phase::Done(self.ended()), false));
        };
        self.level = parent;
        if self.level.boundary.is_some() {
            self.seek_last = b'\n';
            Ok((Phase::SeekAncestor, false))
        } else {
            Ok((Phase::Done(self.ended()), false))
        }
    }

    /// `skip_crlf`.
    fn skip_crlf(&mut self) -> (Phase, bool) {
        while let Some(&ch) = self.input.get(self.pos) {
            match ch {
                b'\r' | b' ' | b'\t' => self.pos += 1,
                b'\n' => {
                    self.pos += 1;
                    return (Phase::Headers, false);
                }
                _ => return (Phase::Headers, false),
            }
        }
        if self.eof { (Phase::Headers, false) } else { (Phase::SkipCrlf, true) }
    }

    /// Decodes a leaf's body up to its delimiter (or the end of a single-part message).
    fn body(
        &mut self,
        mut decoder: Decoder,
        wanted: bool,
        out: &mut Vec<u8>,
    ) -> Result<(Phase, bool), PartError> {
        let boundary = self.level.boundary.clone().unwrap_or_default();
        let outcome = if matches!(decoder, Decoder::Raw { .. }) {
            self.raw(&mut decoder, &boundary, wanted)
        } else if matches!(decoder, Decoder::Base64 { .. }) {
            self.base64(&mut decoder, &boundary, wanted)
        } else {
            self.qp(&mut decoder, &boundary, wanted)
        };
        match outcome {
            Step::More => {
                if wanted {
                    self.release(out, false);
                }
                Ok((Phase::Body { decoder, wanted }, true))
            }
            Step::Problem(what) => {
                if wanted {
                    Err(PartError::Malformed(what))
                } else {
                    Err(PartError::NotStreamable("a part before the attachment is malformed"))
                }
            }
            Step::Ended => {
                if wanted {
                    self.release(out, true);
                    return Ok((Phase::Done(Progress::Complete), false));
                }
                if boundary.is_empty() {
                    // A single-part message: nothing follows.
                    Ok((Phase::Done(self.ended()), false))
                } else {
                    Ok((Phase::AfterDelimiter, false))
                }
            }
        }
    }

    /// Moves decoded bytes that can no longer be cut to `out`, as text if the part is text.
    fn release(&mut self, out: &mut Vec<u8>, all: bool) {
        let n = if all { self.held.len() } else { self.held.len().saturating_sub(self.keep) };
        if n == 0 && !all {
            return;
        }
        let ready: Zeroizing<Vec<u8>> = Zeroizing::new(self.held.drain(..n).collect());
        match &mut self.text {
            TextMode::Binary => out.extend_from_slice(&ready),
            TextMode::SingleByte(decode) => {
                let text = Zeroizing::new(decode(&ready));
                out.extend_from_slice(text.as_bytes());
            }
            TextMode::Utf8(carry) => {
                let mut data = std::mem::take(carry);
                data.extend_from_slice(&ready);
                let mut rest: &[u8] = &data;
                loop {
                    match std::str::from_utf8(rest) {
                        Ok(s) => {
                            out.extend_from_slice(s.as_bytes());
                            break;
                        }
                        Err(e) => {
                            let (valid, tail) = rest.split_at(e.valid_up_to());
                            out.extend_from_slice(valid);
                            match e.error_len() {
                                Some(bad) => {
                                    out.extend_from_slice("\u{FFFD}".as_bytes());
                                    rest = &tail[bad..];
                                }
                                None if all => {
                                    out.extend_from_slice("\u{FFFD}".as_bytes());
                                    break;
                                }
                                None => {
                                    *carry = Zeroizing::new(tail.to_vec());
                                    break;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// What a decoder step reached.
enum Step {
    More,
    Ended,
    Problem(&'static str),
}

impl PartStream {
    /// `mime_part`: the bytes as they are, without the line break before the delimiter.
    fn raw(&mut self, decoder: &mut Decoder, boundary: &[u8], wanted: bool) -> Step {
        let Decoder::Raw { last, before_last, end_pos, since_nl, count } = decoder else { return Step::More };
        while let Some(&ch) = self.input.get(self.pos) {
            if ch == b'-' && !boundary.is_empty() && *last == b'-' {
                match self.delimiter_at(self.pos + 1, boundary) {
                    None => break,
                    Some(true) => {
                        self.pos += 1 + boundary.len();
                        let end = if *before_last != b'\n' { *count - 1 } else { *end_pos };
                        if wanted {
                            let emitted = *count - self.held.len();
                            self.held.truncate(end.saturating_sub(emitted));
                        }
                        return Step::Ended;
                    }
                    Some(false) => {}
                }
            }
            if ch == b'\n' {
                *end_pos = if *last == b'\r' { *count - 1 } else { *count };
                *since_nl = 0;
            } else {
                *since_nl += 1;
            }
            if wanted {
                self.held.push(ch);
            }
            *count += 1;
            *before_last = *last;
            *last = ch;
            self.pos += 1;
        }
        if self.eof && self.pos == self.input.len() {
            return if boundary.is_empty() {
                Step::Ended
            } else {
                Step::Problem("the message ends inside it")
            };
        }
        // Bytes before the last line break, or before the last two bytes of a line that has
        // gone on past where a delimiter could cut it, are the body's.
        let safe =
            if *since_nl >= 2 { count.saturating_sub(1) } else { (*end_pos).min(count.saturating_sub(1)) };
        let emitted = *count - self.held.len();
        self.keep = count.saturating_sub(safe.max(emitted));
        Step::More
    }

    /// `decode_base64_mime`: white space anywhere, `=` flushes, a delimiter ends it.
    fn base64(&mut self, decoder: &mut Decoder, boundary: &[u8], wanted: bool) -> Step {
        let Decoder::Base64 { chunk, byte_count, last } = decoder else { return Step::More };
        self.keep = 0;
        while let Some(&ch) = self.input.get(self.pos) {
            let val = b64_value(ch);
            if let Some(v) = val {
                let v = u32::from(v);
                *byte_count = (*byte_count + 1) & 3;
                *chunk = (*chunk << 6) | v;
                if *byte_count == 0 {
                    if wanted {
                        self.held.extend_from_slice(&chunk.to_be_bytes()[1..]);
                    }
                    *chunk = 0;
                }
            } else {
                match ch {
                    b'=' => {
                        if wanted {
                            match *byte_count {
                                // One sextet: mail-parser emits its six bits as a byte.
                                1 => self.held.push((*chunk << 2) as u8),
                                2 => self.held.push((*chunk >> 4) as u8),
                                3 => {
                                    self.held.extend_from_slice(&[(*chunk >> 10) as u8, (*chunk >> 2) as u8])
                                }
                                _ => {}
                            }
                        }
                        *byte_count = 0;
                        *chunk = 0;
                    }
                    b'\n' | b' ' | b'\t' | b'\r' => {}
                    b'-' => {
                        if *last == b'-' {
                            if boundary.is_empty() {
                                return Step::Problem("a stray \"--\" in base64");
                            }
                            return match self.delimiter_at(self.pos + 1, boundary) {
                                None => Step::More,
                                Some(true) => {
                                    self.pos += 1 + boundary.len();
                                    Step::Ended
                                }
                                Some(false) => Step::Problem("a stray \"--\" in base64"),
                            };
                        }
                    }
                    _ => return Step::Problem("a character that is not base64"),
                }
            }
            *last = ch;
            self.pos += 1;
        }
        if self.eof {
            return if boundary.is_empty() {
                Step::Ended
            } else {
                Step::Problem("the message ends inside it")
            };
        }
        Step::More
    }

    /// `decode_quoted_printable_mime`: `=XX`, soft line breaks, trailing white space dropped.
    fn qp(&mut self, decoder: &mut Decoder, boundary: &[u8], wanted: bool) -> Step {
        let Decoder::Qp { state, hex1, last, before_last, ws_count, crlf } = decoder else {
            return Step::More;
        };
        let result = loop {
            let Some(&ch) = self.input.get(self.pos) else {
                break if self.eof {
                    if boundary.is_empty() {
                        Step::Ended
                    } else {
                        Step::Problem("the message ends inside it")
                    }
                } else {
                    Step::More
                };
            };
            match ch {
                b'=' => {
                    if *state == QpState::None {
                        *state = QpState::Eq;
                    } else {
                        break Step::Problem("\"=\" after \"=\" in quoted-printable");
                    }
                }
                b'\n' => {
                    if *state == QpState::Eq {
                        *state = QpState::None;
                    } else {
                        let len = self.held.len().saturating_sub(*ws_count);
                        self.held.truncate(len);
                        self.held.extend_from_slice(if *crlf { b"\r\n" } else { b"\n" });
                    }
                    *ws_count = 0;
                }
                b'\r' => *crlf = true,
                b'-' if !boundary.is_empty()
                    && *last == b'-'
                    && self.delimiter_at(self.pos + 1, boundary) != Some(false) =>
                {
                    if self.delimiter_at(self.pos + 1, boundary).is_none() {
                        break Step::More;
                    }
                    self.pos += 1 + boundary.len();
                    let cut = if *before_last == b'\n' { if *crlf { 3 } else { 2 } } else { 1 };
                    let len = self.held.len().saturating_sub(cut);
                    self.held.truncate(len);
                    break Step::Ended;
                }
                _ => match *state {
                    QpState::None => {
                        if ch.is_ascii_whitespace() {
                            *ws_count += 1;
                        } else {
                            *ws_count = 0;
                        }
                        self.held.push(ch);
                    }
                    QpState::Eq => {
                        if let Some(h) = hex_value(ch) {
                            *hex1 = h;
                            *state = QpState::Hex1;
                        } else if !ch.is_ascii_whitespace() {
                            *state = QpState::None;
                            self.held.extend_from_slice(&[b'=', ch]);
                            *ws_count = 0;
                        }
                    }
                    QpState::Hex1 => {
                        *state = QpState::None;
                        match hex_value(ch) {
                            Some(h2) => self.held.push((*hex1 << 4) | h2),
                            None => self.held.extend_from_slice(&[b'=', *last, ch]),
                        }
                        *ws_count = 0;
                    }
                },
            }
            *before_last = *last;
            *last = ch;
            self.pos += 1;
        };
        // The cuts reach back at most the trailing white space plus a line break and a dash.
        self.keep = *ws_count + 3;
        if !wanted {
            // Another part's bytes: decoded only to follow the structure.
            self.held.clear();
        }
        if *ws_count > MAX_QP_WHITESPACE {
            return Step::Problem("too much trailing white space");
        }
        result
    }
}

/// What the walk needs of a part's headers (owned: the header block is dropped at once).
struct PartInfo {
    ctype: Option<(String, Option<String>)>,
    boundary: Option<Vec<u8>>,
    has_name: bool,
    charset: Option<String>,
    disposition_attachment: bool,
    encoding: Encoding,
    filename: String,
    content_type: String,
}

impl PartInfo {
    fn of(part: &MessagePart<'_>) -> PartInfo {
        let ct: Option<&ContentType<'_>> = part.content_type();
        let encoding = match part.headers.header_value(&HeaderName::ContentTransferEncoding) {
            Some(HeaderValue::Text(e)) if e.eq_ignore_ascii_case("base64") => Encoding::Base64,
            Some(HeaderValue::Text(e)) if e.eq_ignore_ascii_case("quoted-printable") => {
                Encoding::QuotedPrintable
            }
            _ => Encoding::None,
        };
        PartInfo {
            ctype: ct.map(|c| (c.ctype().to_owned(), c.subtype().map(str::to_owned))),
            boundary: ct.and_then(|c| c.attribute("boundary")).map(|b| b.as_bytes().to_vec()),
            has_name: ct.is_some_and(|c| c.has_attribute("name")),
            charset: ct.and_then(|c| c.attribute("charset")).map(str::to_owned),
            disposition_attachment: part
                .headers
                .header_value(&HeaderName::ContentDisposition)
                .is_some_and(|d| d.as_content_type().is_some_and(|ct| ct.is_attachment())),
            encoding,
            filename: part.attachment_name().unwrap_or("attachment").to_owned(),
            content_type: content_type_text(ct),
        }
    }
}

/// `type/subtype` as the API shows it (`application/octet-stream` when absent).
pub(crate) fn content_type_text(ct: Option<&ContentType<'_>>) -> String {
    ct.map(|c| match c.subtype() {
        Some(s) => format!("{}/{}", c.ctype(), s),
        None => c.ctype().to_owned(),
    })
    .unwrap_or_else(|| "application/octet-stream".into())
}

/// `mail-parser`'s `mime_type`: (is multipart, is inline, is text, type).
fn mime_type(ct: Option<&(String, Option<String>)>, parent: MimeType) -> (bool, bool, bool, MimeType) {
    let Some((ctype, subtype)) = ct else {
        return if parent == MimeType::MultipartDigest {
            (false, false, false, MimeType::Message)
        } else {
            (false, true, true, MimeType::TextPlain)
        };
    };
    let sub = subtype.as_deref();
    match ctype.as_str() {
        "multipart" => (
            true,
            false,
            false,
            match sub {
                Some("mixed") => MimeType::MultipartMixed,
                Some("alternative") => MimeType::MultipartAlternative,
                Some("related") => MimeType::MultipartRelated,
                Some("digest") => MimeType::MultipartDigest,
                _ => MimeType::Other,
            },
        ),
        "text" => match sub {
            Some("plain") => (false, true, true, MimeType::TextPlain),
            Some("html") => (false, true, true, MimeType::TextHtml),
            _ => (false, false, true, MimeType::TextOther),
        },
        "image" | "audio" | "video" => (false, true, false, MimeType::Inline),
        "message" if matches!(sub, Some("rfc822") | Some("global")) => {
            (false, false, false, MimeType::Message)
        }
        _ => (false, false, false, MimeType::Other),
    }
}

/// Charsets whose `mail-parser` decoder maps each byte alone (so chunk edges do not matter).
fn is_single_byte(charset: &str) -> bool {
    let c = charset.to_ascii_lowercase().replace('-', "_");
    matches!(
        c.as_str(),
        "us_ascii" | "ascii" | "ansi_x3.4_1968" | "iso_8859_1" | "latin1" | "cp1252" | "windows_1252"
    )
}

/// Whether `bytes` holds a line of only white space after a line break (a header block end).
fn has_blank_line(bytes: &[u8]) -> bool {
    // A header block starts at a line start.
    let mut blank = true;
    for &b in bytes {
        match b {
            b'\n' if blank => return true,
            b'\n' => blank = true,
            b' ' | b'\t' | b'\r' => {}
            _ => blank = false,
        }
    }
    false
}

fn b64_value(ch: u8) -> Option<u8> {
    match ch {
        b'A'..=b'Z' => Some(ch - b'A'),
        b'a'..=b'z' => Some(ch - b'a' + 26),
        b'0'..=b'9' => Some(ch - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    }
}

fn hex_value(ch: u8) -> Option<u8> {
    match ch {
        b'0'..=b'9' => Some(ch - b'0'),
        b'A'..=b'F' => Some(ch - b'A' + 10),
        b'a'..=b'f' => Some(ch - b'a' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as B64;
    use qutemail_vault::Presented;

    use super::*;

    /// What the in-memory path answers for attachment `index`.
    fn reference(message: &[u8], index: usize) -> Option<(String, String, Vec<u8>)> {
        let presented = Presented { message: Zeroizing::new(message.to_vec()), verified: true };
        crate::message::attachment(&presented, index)
    }

    /// The extractor fed `message` in `chunk`-byte pieces.
    fn streamed(
        message: &[u8],
        index: usize,
        chunk: usize,
    ) -> Result<Option<(String, String, Vec<u8>)>, PartError> {
        let mut s = PartStream::new(index);
        let mut out = Vec::new();
        for piece in message.chunks(chunk) {
            s.feed(piece, &mut out)?;
            assert!(out.is_empty() || s.head().is_some(), "bytes before the part's headers were known");
        }
        s.finish(&mut out)?;
        if s.is_not_found() {
            return Ok(None);
        }
        assert!(s.is_complete(), "neither complete nor not found");
        let head = s.head().cloned().expect("a complete part has a head");
        Ok(Some((head.filename, head.content_type, out)))
    }

    fn b64_lines(data: &[u8], width: usize) -> String {
        let e = B64.encode(data);
        e.as_bytes().chunks(width).map(|l| format!("{}\r\n", String::from_utf8_lossy(l))).collect()
    }

    fn binary(len: usize, seed: u32) -> Vec<u8> {
        let mut x = seed.wrapping_mul(2_654_435_761).max(1);
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    /// Messages covering the shapes the extractor must follow.
    fn corpus() -> Vec<(&'static str, Vec<u8>)> {
        let pdf = binary(5000, 1);
        let png = binary(777, 2);
        let tail = binary(301, 3);
        let nested = format!(
            "X-QKD-Secure: False\r\nX-QKD-Protection: normal\r\nFrom: Alice <alice@a.test>\r\nTo: bob@a.test\r\n\
             Subject: nested\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed;\r\n boundary=\"outer\"\r\n\r\n\
             This is the preamble.\r\n--outer\r\nContent-Type: multipart/alternative; boundary=\"alt\"\r\n\r\n\
             --alt\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n\
             Caf=C3=A9 soft=\r\nbreak and trailing space   \r\nend\r\n\
             --alt\r\nContent-Type: multipart/mixed; boundary=\"inner\"\r\n\r\n\
             --inner\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>hello</p>\r\n\
             --inner\r\nContent-Type: application/pdf; name=\"report.pdf\"\r\nContent-Disposition: attachment;\r\n\
             \tfilename=\"report.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\n{pdf}--inner--\r\n\r\n--alt--\r\n\
             --outer\r\nContent-Type: image/png; name=\"=?UTF-8?B?w6lsw6luLnBuZw==?=\"\r\nContent-Transfer-Encoding: base64\r\n\r\n\
             {png}\r\n--outer\r\nContent-Type: text/plain; charset=iso-8859-1\r\nContent-Disposition: attachment;\r\n\
             \x20filename*=UTF-8''na%C3%AFve%20notes.txt\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n\
             Ol=E9 =\r\nsoft, hard\r\nline=20\r\n\r\n--outer\r\nContent-Type: application/octet-stream; name=tail.bin\r\n\
             Content-Transfer-Encoding: base64\r\n\r\n{tail}--outer--",
            pdf = b64_lines(&pdf, 76),
            png = b64_lines(&png, 64).trim_end(),
            tail = b64_lines(&tail, 72),
        );
        let prefix = format!(
            "Subject: prefix boundaries\r\nContent-Type: multipart/mixed; boundary=\"frontier\"\r\n\r\n\
             --frontier\r\nContent-Type: multipart/mixed; boundary=\"frontier-2\"\r\n\r\n\
             --frontier-2\r\nContent-Type: text/plain\r\n\r\nbody text\r\n\
             --frontier-2\r\nContent-Type: application/zip; name=\"a.zip\"\r\nContent-Transfer-Encoding: base64\r\n\r\n\
             {a}--frontier-2--\r\n--frontier\r\nContent-Type: text/csv; name=\"b.csv\"\r\n\r\nx,y\r\n1,2 #BAD# bad\r\n\
             --frontier\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=c.bin\r\n\
             Content-Transfer-Encoding: 8bit\r\n\r\nraw -- bytes - end\r\n\r\n--frontier--\r\nepilogue\r\n",
            a = b64_lines(&binary(2048, 4), 76),
        );
        let single = format!(
            "From: a@a.test\r\nContent-Type: application/pdf; name=whole.pdf\r\nContent-Disposition: attachment\r\n\
             Content-Transfer-Encoding: base64\r\n\r\n{}",
            b64_lines(&binary(1000, 5), 76)
        );
        let text_only = "From: a@a.test\r\nSubject: plain\r\n\r\nJust text.\r\n".to_owned();
        let built = mail_builder::MessageBuilder::new()
            .from(("Alice", "alice@a.test"))
            .to("bob@a.test")
            .subject("built")
            .text_body("hello")
            .html_body("<b>hello</b>")
            .attachment("application/octet-stream", "data.bin", binary(9000, 6))
            .attachment("text/plain", "notes.txt", "line one\nline two\n".as_bytes())
            .write_to_vec()
            .expect("build");
        let mut corpus = vec![
            ("nested", nested.clone().into_bytes()),
            ("nested, bare LF", nested.replace("\r\n", "\n").into_bytes()),
            ("prefix boundaries", prefix.clone().into_bytes()),
            ("prefix boundaries, bare LF", prefix.replace("\r\n", "\n").into_bytes()),
            ("single part", single.into_bytes()),
            ("text only", text_only.into_bytes()),
            ("mail-builder", built),
        ];
        // The csv part holds a byte that is not UTF-8 (the in-memory path shows U+FFFD).
        for (_, m) in &mut corpus {
            if let Some(p) = m.windows(5).position(|w| w == b"#BAD#") {
                m.splice(p..p + 5, [0xff]);
            }
        }
        corpus
    }

    #[test]
    fn every_attachment_matches_the_in_memory_parse_at_every_chunk_size() {
        for (name, message) in corpus() {
            let count = (0..).take_while(|&i| reference(&message, i).is_some()).count();
            for index in 0..=count + 1 {
                let expected = reference(&message, index);
                for chunk in [1, 7, 4096, message.len()] {
                    let got = streamed(&message, index, chunk)
                        .unwrap_or_else(|e| panic!("{name}: index {index}, chunk {chunk}: {e}"));
                    assert_eq!(got, expected, "{name}: index {index}, chunk {chunk}");
                }
            }
        }
    }

    #[test]
    fn the_corpus_has_the_shapes_it_claims() {
        let corpus = corpus();
        let count = |m: &[u8]| (0..).take_while(|&i| reference(m, i).is_some()).count();
        let nested = &corpus[0].1;
        assert_eq!(count(nested), 4, "pdf, png, notes, tail");
        assert_eq!(reference(nested, 1).map(|a| a.0), Some("élén.png".to_owned()));
        assert_eq!(reference(nested, 2).map(|a| a.0), Some("naïve notes.txt".to_owned()));
        assert_eq!(reference(nested, 3).map(|a| a.2), Some(binary(301, 3)));
        assert!(!nested.ends_with(b"\n"), "the last attachment ends the message without a line break");
        assert_eq!(count(&corpus[2].1), 3);
        assert_eq!(count(&corpus[4].1), 1);
        assert_eq!(count(&corpus[5].1), 0);
        assert_eq!(count(&corpus[6].1), 2);
    }

    #[test]
    fn a_25_mb_attachment_passes_with_a_small_buffer() {
        let data = binary(25 * 1024 * 1024, 7);
        let message = format!(
            "Subject: big\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n\
             see attached\r\n--b\r\nContent-Type: application/octet-stream; name=big.bin\r\n\
             Content-Transfer-Encoding: base64\r\n\r\n{}--b--\r\n",
            b64_lines(&data, 76)
        );
        let mut s = PartStream::new(0);
        let mut got = Vec::with_capacity(data.len());
        for piece in message.as_bytes().chunks(64 * 1024) {
            s.feed(piece, &mut got).unwrap();
        }
        s.finish(&mut got).unwrap();
        assert!(s.is_complete());
        assert!(got == data, "the 25 MB attachment comes out intact");
        assert!(s.high_water() < 1024, "kept {} bytes between chunks", s.high_water());
    }

    #[test]
    fn pathological_input_is_refused_not_buffered() {
        let mut s = PartStream::new(0);
        let mut out = Vec::new();
        let mut result = Ok(());
        let line = format!("X-Long: {}\r\n", "a".repeat(1000));
        for _ in 0..200 {
            result = s.feed(line.as_bytes(), &mut out);
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(PartError::HeaderTooLong));
        assert!(s.high_water() <= MAX_HEADER_BYTES + line.len());

        let qp = format!(
            "Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain; name=x.txt\r\n\
             Content-Disposition: attachment\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nx{}",
            " ".repeat(MAX_QP_WHITESPACE + 10)
        );
        let mut s = PartStream::new(0);
        assert_eq!(
            s.feed(qp.as_bytes(), &mut out),
            Err(PartError::Malformed("too much trailing white space"))
        );
    }

    #[test]
    fn broken_or_unusual_parts_are_reported() {
        // Broken base64 in the wanted part: the download must fail, not deliver something else.
        let bad = "Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: application/pdf\r\n\
                   Content-Transfer-Encoding: base64\r\n\r\nQUJD\r\n!!!!\r\n--b--\r\n";
        assert_eq!(
            streamed(bad.as_bytes(), 0, 4096),
            Err(PartError::Malformed("a character that is not base64"))
        );
        // Broken before the wanted part, or an embedded message: the in-memory path decides.
        assert!(matches!(streamed(bad.as_bytes(), 1, 4096), Err(PartError::NotStreamable(_))));
        let embedded = "Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: message/rfc822\r\n\r\n\
                        Subject: inner\r\n\r\nhi\r\n--b\r\nContent-Type: application/pdf\r\n\r\nx\r\n--b--\r\n";
        assert!(matches!(streamed(embedded.as_bytes(), 1, 7), Err(PartError::NotStreamable(_))));
        // The message ends inside the wanted part.
        let cut = "Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: application/pdf\r\n\
                   Content-Transfer-Encoding: base64\r\n\r\nQUJD\r\n";
        assert_eq!(streamed(cut.as_bytes(), 0, 3), Err(PartError::Malformed("the message ends inside it")));
    }
}
