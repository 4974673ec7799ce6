//! The small piece of RFC 5322 / RFC 2045 the envelope needs: bounded line reading, header
//! folding and unfolding, canonical header values, and streaming base64 bodies.
//!
//! The parser is deliberately strict about the layout QuteMail writes (see
//! `docs/envelope-format.md` § 3) and tolerant only of what relays legitimately change: line
//! endings (CRLF or LF), re-folding of header lines, and added unbound headers.

use std::io::{self, BufRead, Read, Write};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use sha2::{Digest, Sha256};

use crate::error::{EnvelopeError, Result};

/// Longest line the parser accepts (RFC 5322 allows 998 characters plus CRLF).
pub(crate) const MAX_LINE: usize = 1000;
/// Largest outer header block the parser accepts (relays add Received and DKIM lines).
pub(crate) const MAX_HEADER_BLOCK: usize = 256 * 1024;
/// Where header lines are folded when written.
const FOLD_AT: usize = 76;
/// Bytes per base64 body line (57 bytes give the customary 76 characters).
const B64_LINE_BYTES: usize = 57;

/// Reads one line without its line ending; `None` at end of input. Fails on lines longer than
/// [`MAX_LINE`] so that no input can make us buffer without bound.
pub(crate) fn read_line(input: &mut impl BufRead, line: &mut Vec<u8>) -> Result<Option<()>> {
    line.clear();
    let mut seen_any = false;
    loop {
        let available = input.fill_buf().map_err(EnvelopeError::io("reading the sealed message"))?;
        if available.is_empty() {
            return Ok(seen_any.then_some(()));
        }
        seen_any = true;
        let (take, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (available.len(), false),
        };
        if line.len() + take > MAX_LINE + 2 {
            return Err(EnvelopeError::Malformed(format!("a line is longer than {MAX_LINE} characters")));
        }
        line.extend_from_slice(&available[..take]);
        input.consume(take);
        if done {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(Some(()));
        }
    }
}

/// One unfolded header field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HeaderField {
    pub name: String,
    /// The canonical value (see [`canonical_value`]).
    pub value: String,
}

/// The canonical form of a header value: line breaks of folding removed, every run of spaces
/// and tabs replaced by one space, leading and trailing whitespace removed. Relays may re-fold
/// a header; its canonical value does not change.
pub(crate) fn canonical_value(raw: &str) -> String {
    raw.split([' ', '\t', '\r', '\n']).filter(|w| !w.is_empty()).collect::<Vec<_>>().join(" ")
}

/// Reads a header block up to and including the empty line that ends it.
pub(crate) fn read_header_block(input: &mut impl BufRead, what: &str) -> Result<Vec<HeaderField>> {
    let mut fields: Vec<(String, String)> = Vec::new();
    let mut line = Vec::new();
    let mut total = 0usize;
    loop {
        if read_line(input, &mut line)?.is_none() {
            return Err(EnvelopeError::Malformed(format!("the {what} headers end without an empty line")));
        }
        total += line.len() + 2;
        if total > MAX_HEADER_BLOCK {
            return Err(EnvelopeError::Malformed(format!(
                "the {what} headers exceed {MAX_HEADER_BLOCK} bytes"
            )));
        }
        if line.is_empty() {
            break;
        }
        let text = std::str::from_utf8(&line)
            .map_err(|_| EnvelopeError::Malformed(format!("a {what} header line is not UTF-8")))?;
        if text.starts_with([' ', '\t']) {
            let Some(last) = fields.last_mut() else {
                return Err(EnvelopeError::Malformed(format!(
                    "the {what} headers start with a continuation"
                )));
            };
            last.1.push(' ');
            last.1.push_str(text);
            continue;
        }
        let Some((name, value)) = text.split_once(':') else {
            return Err(EnvelopeError::Malformed(format!("{what} header line without a colon: {text:?}")));
        };
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(EnvelopeError::Malformed(format!("invalid {what} header name {name:?}")));
        }
        fields.push((name.to_string(), value.to_string()));
    }
    Ok(fields.into_iter().map(|(name, value)| HeaderField { name, value: canonical_value(&value) }).collect())
}

/// Checks that a caller-supplied header value can be written as one header (no line breaks, no
/// control characters), and returns its canonical form.
pub(crate) fn checked_value(name: &str, value: &str) -> Result<String> {
    if value.chars().any(|c| c.is_control() && c != '\t') {
        return Err(EnvelopeError::InvalidParameter(format!(
            "header {name} contains a line break or control character"
        )));
    }
    let canonical = canonical_value(value);
    if canonical.split(' ').any(|word| word.len() + 1 > MAX_LINE - 2) {
        return Err(EnvelopeError::InvalidParameter(format!("header {name} has a word too long to fold")));
    }
    Ok(canonical)
}

/// Writes `Name: value` folded at spaces so that lines stay near 76 characters.
pub(crate) fn write_header(out: &mut impl Write, name: &str, canonical: &str) -> io::Result<()> {
    let mut line_len = name.len() + 1;
    out.write_all(name.as_bytes())?;
    out.write_all(b":")?;
    for word in canonical.split(' ').filter(|w| !w.is_empty()) {
        if line_len + 1 + word.len() > FOLD_AT && line_len > name.len() + 1 {
            out.write_all(b"\r\n")?;
            line_len = 0;
        }
        out.write_all(b" ")?;
        out.write_all(word.as_bytes())?;
        line_len += 1 + word.len();
    }
    out.write_all(b"\r\n")
}

/// A writer that feeds everything through SHA-256 on its way to `inner`.
pub(crate) struct HashingWriter<W> {
    pub inner: W,
    pub hasher: Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that feeds everything it returns through SHA-256.
pub(crate) struct HashingReader<R> {
    pub inner: R,
    pub hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Lines encoded per batch (64 lines of 57 bytes: about 3.6 KiB in, 5 KiB out).
const B64_BATCH_LINES: usize = 64;

/// Encodes a byte stream as base64 lines of 76 characters with CRLF, holding at most one batch
/// of lines (a few KiB) and writing each batch with one call.
pub(crate) struct Base64LineWriter<W: Write> {
    inner: W,
    pending: Vec<u8>,
    encoded: Vec<u8>,
}

impl<W: Write> Base64LineWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        Self {
            inner,
            pending: Vec::with_capacity(B64_LINE_BYTES * B64_BATCH_LINES),
            encoded: Vec::with_capacity((B64_LINE_BYTES / 3 * 4 + 2) * B64_BATCH_LINES),
        }
    }

    /// Encodes and writes `pending` as lines (the last one may be short) and empties it.
    fn emit(&mut self) -> io::Result<()> {
        self.encoded.clear();
        for line in self.pending.chunks(B64_LINE_BYTES) {
            let start = self.encoded.len();
            self.encoded.resize(start + line.len().div_ceil(3) * 4, 0);
            let written = B64
                .encode_slice(line, &mut self.encoded[start..])
                .map_err(|e| io::Error::other(format!("base64 encoding: {e}")))?;
            self.encoded.truncate(start + written);
            self.encoded.extend_from_slice(b"\r\n");
        }
        self.inner.write_all(&self.encoded)?;
        self.pending.clear();
        Ok(())
    }

    /// Writes the last partial line and returns the inner writer.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        if !self.pending.is_empty() {
            self.emit()?;
        }
        Ok(self.inner)
    }
}

impl<W: Write> Write for Base64LineWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let batch = B64_LINE_BYTES * B64_BATCH_LINES;
        let mut rest = buf;
        while !rest.is_empty() {
            let take = (batch - self.pending.len()).min(rest.len());
            self.pending.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.pending.len() == batch {
                self.emit()?;
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// How a base64 MIME body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyEnd {
    /// `--boundary`: another part follows.
    NextPart,
    /// `--boundary--`: the multipart ends.
    Close,
}

/// Decodes a base64 MIME body until the boundary line, holding at most one batch of lines.
pub(crate) struct Base64BodyReader<'a, R: BufRead> {
    input: &'a mut R,
    boundary: &'a str,
    line: Vec<u8>,
    text: Vec<u8>,
    decoded: Vec<u8>,
    pos: usize,
    end: Option<BodyEnd>,
}

impl<'a, R: BufRead> Base64BodyReader<'a, R> {
    pub(crate) fn new(input: &'a mut R, boundary: &'a str) -> Self {
        Self { input, boundary, line: Vec::new(), text: Vec::new(), decoded: Vec::new(), pos: 0, end: None }
    }

    /// How the body ended, once it has been read to the end.
    pub(crate) fn end(&self) -> Option<BodyEnd> {
        self.end
    }

    /// Decodes up to [`B64_BATCH_LINES`] lines into `decoded`, stopping at the boundary.
    fn next_batch(&mut self) -> io::Result<()> {
        self.decoded.clear();
        self.pos = 0;
        for _ in 0..B64_BATCH_LINES {
            let found = read_line(self.input, &mut self.line).map_err(to_io)?;
            if found.is_none() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the sealed message ends inside a MIME part (closing boundary missing)",
                ));
            }
            if let Some(end) = boundary_line(&self.line, self.boundary) {
                self.end = Some(end);
                return Ok(());
            }
            self.text.clear();
            self.text.extend(self.line.iter().copied().filter(|b| !b.is_ascii_whitespace()));
            B64.decode_vec(&self.text, &mut self.decoded)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad base64 line: {e}")))?;
        }
        Ok(())
    }
}

fn to_io(e: EnvelopeError) -> io::Error {
    match e {
        EnvelopeError::Io { source, .. } => source,
        other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
    }
}

/// Maps an I/O error raised while reading a MIME body back to the envelope error it means.
pub(crate) fn body_error(e: io::Error) -> EnvelopeError {
    match e.kind() {
        io::ErrorKind::InvalidData => EnvelopeError::Malformed(e.to_string()),
        io::ErrorKind::UnexpectedEof => EnvelopeError::Truncated { chunks: 0 },
        _ => EnvelopeError::Io { context: "reading the sealed message", source: e },
    }
}

impl<R: BufRead> Read for Base64BodyReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.decoded.len() {
            if self.end.is_some() {
                return Ok(0);
            }
            self.next_batch()?;
        }
        let n = buf.len().min(self.decoded.len() - self.pos);
        buf[..n].copy_from_slice(&self.decoded[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Whether `line` is a delimiter of `boundary` (transport padding after it is allowed).
pub(crate) fn boundary_line(line: &[u8], boundary: &str) -> Option<BodyEnd> {
    let rest = line.strip_prefix(b"--")?.strip_prefix(boundary.as_bytes())?;
    let (close, rest) = match rest.strip_prefix(b"--") {
        Some(r) => (true, r),
        None => (false, rest),
    };
    rest.iter().all(|&b| b == b' ' || b == b'\t').then_some(if close {
        BodyEnd::Close
    } else {
        BodyEnd::NextPart
    })
}

/// Skips lines until the delimiter of `boundary` (a preamble or a non-base64 part body);
/// returns the lines skipped, which must be short.
pub(crate) fn read_until_boundary(
    input: &mut impl BufRead,
    boundary: &str,
    max_lines: usize,
) -> Result<(BodyEnd, Vec<String>)> {
    let mut line = Vec::new();
    let mut lines = Vec::new();
    loop {
        if read_line(input, &mut line)?.is_none() {
            return Err(EnvelopeError::Malformed(format!("MIME boundary {boundary:?} not found")));
        }
        if let Some(end) = boundary_line(&line, boundary) {
            return Ok((end, lines));
        }
        if lines.len() == max_lines {
            return Err(EnvelopeError::Malformed("unexpected text between MIME parts".into()));
        }
        lines.push(String::from_utf8_lossy(&line).into_owned());
    }
}

/// Extracts a parameter (`boundary`, `protocol`) from a canonical Content-Type value.
pub(crate) fn content_type_param(value: &str, param: &str) -> Option<String> {
    value.split(';').skip(1).find_map(|p| {
        let (name, v) = p.trim().split_once('=')?;
        if !name.trim().eq_ignore_ascii_case(param) {
            return None;
        }
        let v = v.trim();
        Some(v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v).to_string())
    })
}

/// The media type (lowercase, without parameters) of a Content-Type value.
pub(crate) fn media_type(value: &str) -> String {
    value.split(';').next().unwrap_or("").trim().to_ascii_lowercase()
}

/// Standard base64 of `bytes`.
pub(crate) fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

/// Decodes standard base64, ignoring whitespace (folded header values).
pub(crate) fn unb64(text: &str) -> Option<Vec<u8>> {
    let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    B64.decode(compact).ok()
}

/// Splits long base64 into space-separated groups of 64 characters, so the header can fold.
pub(crate) fn spaced_b64(bytes: &[u8]) -> String {
    let text = B64.encode(bytes);
    text.as_bytes().chunks(64).map(|c| String::from_utf8_lossy(c).into_owned()).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folded_headers_read_back_to_the_same_canonical_value() {
        let value = canonical_value(&(0..40).map(|i| format!("word{i},")).collect::<Vec<_>>().join("  \t"));
        let mut out = Vec::new();
        write_header(&mut out, "X-QKD-Key-ID", &value).expect("write");
        out.extend_from_slice(b"\r\n");
        let text = String::from_utf8(out.clone()).expect("ASCII");
        assert!(text.lines().count() > 3, "a long value is folded");
        assert!(text.lines().all(|l| l.len() <= 78), "{text}");
        let fields = read_header_block(&mut out.as_slice(), "test").expect("parse");
        assert_eq!(fields, vec![HeaderField { name: "X-QKD-Key-ID".into(), value }]);
    }

    #[test]
    fn overlong_lines_and_unterminated_headers_are_refused() {
        let long = vec![b'a'; MAX_LINE + 10];
        assert!(matches!(read_line(&mut long.as_slice(), &mut Vec::new()), Err(EnvelopeError::Malformed(_))));
        let unterminated = b"From: a@b\r\nTo: c@d\r\n";
        assert!(read_header_block(&mut &unterminated[..], "outer").is_err());
    }

    #[test]
    fn boundary_lines_allow_transport_padding_only() {
        assert_eq!(boundary_line(b"--qkd-1", "qkd-1"), Some(BodyEnd::NextPart));
        assert_eq!(boundary_line(b"--qkd-1-- \t", "qkd-1"), Some(BodyEnd::Close));
        assert_eq!(boundary_line(b"--qkd-12", "qkd-1"), None);
        assert_eq!(boundary_line(b"qkd-1", "qkd-1"), None);
    }

    #[test]
    fn base64_body_round_trips_through_the_line_writer_and_reader() {
        for len in [0usize, 1, 56, 57, 58, 57 * 64, 57 * 64 + 1, 10_000] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let mut w = Base64LineWriter::new(Vec::new());
            w.write_all(&data).expect("write");
            let mut body = w.finish().expect("finish");
            assert!(body.split(|&b| b == b'\n').all(|l| l.len() <= 77));
            body.extend_from_slice(b"--b--\r\n");
            let mut input = body.as_slice();
            let mut reader = Base64BodyReader::new(&mut input, "b");
            let mut back = Vec::new();
            reader.read_to_end(&mut back).expect("read");
            assert_eq!(back, data, "{len} bytes");
            assert_eq!(reader.end(), Some(BodyEnd::Close));
        }
    }
}
