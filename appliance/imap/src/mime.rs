//! MIME structure of a presented (decrypted) message, for ENVELOPE, BODYSTRUCTURE, section
//! fetches and content SEARCH. Works on byte offsets into the message so that sections are the
//! exact bytes the client would find in `BODY[]`. Lenient like mail clients: a missing
//! boundary or header gives a plausible structure, never an error or a panic.

use std::ops::Range;

use crate::parse::{Section, SectionKind};
use crate::response::{nstring, quoted_or_literal};

/// One MIME entity: where its header and body are, and what it contains.
#[derive(Debug, Clone)]
pub struct Part {
    /// The header, including the blank line that ends it (may be empty).
    pub header: Range<usize>,
    /// The body.
    pub body: Range<usize>,
    /// Lower-cased media type and subtype.
    pub mime_type: (String, String),
    /// Content-Type parameters (names lower-cased).
    pub params: Vec<(String, String)>,
    /// Sub-parts of a multipart.
    pub children: Vec<Part>,
    /// The encapsulated message of a `message/rfc822` part.
    pub message: Option<Box<Part>>,
}

const MAX_DEPTH: usize = 20;

/// Splits `msg[range]` into header and body.
fn split(msg: &[u8], range: Range<usize>) -> (Range<usize>, Range<usize>) {
    let s = &msg[range.clone()];
    if s.starts_with(b"\r\n") {
        return (range.start..range.start + 2, range.start + 2..range.end);
    }
    if s.starts_with(b"\n") {
        return (range.start..range.start + 1, range.start + 1..range.end);
    }
    let crlf = s.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
    let lf = s.windows(2).position(|w| w == b"\n\n").map(|p| p + 2);
    let end = match (crlf, lf) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b).unwrap_or(s.len()),
    };
    (range.start..range.start + end, range.start + end..range.end)
}

/// Header fields of a header block: (name, unfolded raw value).
pub fn fields(header: &[u8]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in header.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            if let Some(last) = out.last_mut() {
                last.1.push(' ');
                last.1.push_str(String::from_utf8_lossy(line).trim());
            }
            continue;
        }
        if let Some(colon) = line.iter().position(|&b| b == b':') {
            let name = String::from_utf8_lossy(&line[..colon]).trim().to_owned();
            let value = String::from_utf8_lossy(&line[colon + 1..]).trim().to_owned();
            out.push((name, value));
        }
    }
    out
}

/// The first field `name` (case-insensitive).
pub fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

/// `type/subtype; a=b; c="d"` → ((type, subtype), params).
fn content_type(value: Option<&str>, default: (&str, &str)) -> ((String, String), Vec<(String, String)>) {
    let Some(value) = value else {
        let params = if default.0 == "text" { vec![("charset".into(), "us-ascii".into())] } else { vec![] };
        return ((default.0.into(), default.1.into()), params);
    };
    let mut parts = split_params(value);
    let first = if parts.is_empty() { String::new() } else { parts.remove(0) };
    let mime_type = match first.split_once('/') {
        Some((t, s)) if !t.trim().is_empty() && !s.trim().is_empty() => {
            (t.trim().to_ascii_lowercase(), s.trim().to_ascii_lowercase())
        }
        _ => (default.0.into(), default.1.into()),
    };
    (mime_type, params_of(&parts))
}

/// Splits on `;` outside quotes.
fn split_params(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut escaped = false;
    for ch in value.chars() {
        if escaped {
            cur.push(ch);
            escaped = false;
            continue;
        }
        match ch {
            '\\' if quoted => {
                cur.push(ch);
                escaped = true;
            }
            '"' => {
                quoted = !quoted;
                cur.push(ch);
            }
            ';' if !quoted => out.push(std::mem::take(&mut cur)),
            _ => cur.push(ch),
        }
    }
    out.push(cur);
    out.into_iter().map(|s| s.trim().to_owned()).collect()
}

fn params_of(parts: &[String]) -> Vec<(String, String)> {
    parts
        .iter()
        .filter_map(|p| {
            let (k, v) = p.split_once('=')?;
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|x| x.strip_suffix('"'))
                .map(|x| x.replace("\\\"", "\"").replace("\\\\", "\\"))
                .unwrap_or_else(|| v.to_owned());
            Some((k.trim().to_ascii_lowercase(), v))
        })
        .collect()
}

/// Parses the entity at `range`; `default` is the type when it has no Content-Type
/// (`text/plain`, or `message/rfc822` inside `multipart/digest`).
pub fn parse_part(msg: &[u8], range: Range<usize>, default: (&str, &str), depth: usize) -> Part {
    let (header, body) = split(msg, range);
    let f = fields(&msg[header.clone()]);
    let (mime_type, params) = content_type(field(&f, "content-type"), default);
    let mut part =
        Part { header, body: body.clone(), mime_type, params, children: Vec::new(), message: None };
    if depth >= MAX_DEPTH {
        return part;
    }
    if part.mime_type.0 == "multipart" {
        let boundary = part.params.iter().find(|(k, _)| k == "boundary").map(|(_, v)| v.clone());
        if let Some(b) = boundary.filter(|b| !b.is_empty()) {
            let child_default =
                if part.mime_type.1 == "digest" { ("message", "rfc822") } else { ("text", "plain") };
            for r in multipart_bodies(msg, body, b.as_bytes()) {
                part.children.push(parse_part(msg, r, child_default, depth + 1));
            }
        }
        if part.children.is_empty() {
            // RFC 3501 needs at least one part: an empty text part stands for a broken multipart.
            let end = part.body.end;
            part.children.push(Part {
                header: end..end,
                body: end..end,
                mime_type: ("text".into(), "plain".into()),
                params: vec![("charset".into(), "us-ascii".into())],
                children: Vec::new(),
                message: None,
            });
        }
    } else if part.mime_type == ("message".into(), "rfc822".into()) {
        part.message = Some(Box::new(parse_part(msg, body, ("text", "plain"), depth + 1)));
    }
    part
}

/// The body ranges between `--boundary` lines (the CRLF before a delimiter belongs to it).
fn multipart_bodies(msg: &[u8], body: Range<usize>, boundary: &[u8]) -> Vec<Range<usize>> {
    let mut delim = b"--".to_vec();
    delim.extend_from_slice(boundary);
    let s = &msg[body.clone()];
    let mut out = Vec::new();
    let mut current: Option<usize> = None;
    let mut line_start = 0;
    while line_start <= s.len() {
        let line_end = s[line_start..].iter().position(|&b| b == b'\n').map_or(s.len(), |p| line_start + p);
        let line = &s[line_start..line_end];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.starts_with(&delim) {
            let rest = &line[delim.len()..];
            let closing = rest.starts_with(b"--");
            if closing || rest.iter().all(|b| b.is_ascii_whitespace()) {
                if let Some(start) = current.take() {
                    // The line break before the delimiter is part of the delimiter.
                    let mut end = line_start;
                    if end > start && s[end - 1] == b'\n' {
                        end -= 1;
                        if end > start && s[end - 1] == b'\r' {
                            end -= 1;
                        }
                    }
                    out.push(body.start + start..body.start + end.max(start));
                }
                if closing {
                    return out;
                }
                current = Some((line_end + 1).min(s.len()));
            }
        }
        line_start = line_end + 1;
    }
    if let Some(start) = current {
        out.push(body.start + start..body.end);
    }
    out
}

/// The whole message's structure.
pub fn parse(msg: &[u8]) -> Part {
    parse_part(msg, 0..msg.len(), ("text", "plain"), 0)
}

/// Lines of a body; a last line without line break (before a boundary) counts too.
fn count_lines(b: &[u8]) -> usize {
    b.iter().filter(|&&c| c == b'\n').count() + usize::from(!b.is_empty() && !b.ends_with(b"\n"))
}

/// RFC 3501 ENVELOPE of a header block.
pub fn envelope(header: &[u8]) -> String {
    let f = fields(header);
    let s = |name: &str| nstring(field(&f, name).map(str::as_bytes));
    let from = addresses(field(&f, "from"));
    let sender = field(&f, "sender").map(|v| addresses(Some(v))).unwrap_or_else(|| from.clone());
    let reply_to = field(&f, "reply-to").map(|v| addresses(Some(v))).unwrap_or_else(|| from.clone());
    format!(
        "({} {} {} {} {} {} {} {} {} {})",
        s("date"),
        s("subject"),
        from,
        sender,
        reply_to,
        addresses(field(&f, "to")),
        addresses(field(&f, "cc")),
        addresses(field(&f, "bcc")),
        s("in-reply-to"),
        s("message-id"),
    )
}

/// An address list as `((name adl mailbox host) …)` or NIL.
fn addresses(value: Option<&str>) -> String {
    let Some(value) = value else { return "NIL".into() };
    let mut out = String::new();
    for item in split_addresses(value) {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let (name, addr) = match (item.rfind('<'), item.rfind('>')) {
            (Some(a), Some(b)) if a < b => (Some(item[..a].trim().trim_matches('"').trim()), &item[a + 1..b]),
            _ => (None, item),
        };
        let (mailbox, host) = match addr.rsplit_once('@') {
            Some((m, h)) => (m.trim(), Some(h.trim())),
            None => (addr.trim(), None),
        };
        let name = name.filter(|n| !n.is_empty());
        out.push_str(&format!(
            "({} NIL {} {})",
            nstring(name.map(str::as_bytes)),
            quoted_or_literal(mailbox.as_bytes()),
            nstring(host.map(str::as_bytes)),
        ));
    }
    if out.is_empty() { "NIL".into() } else { format!("({out})") }
}

/// Splits an address list on commas outside quotes and angle brackets; group syntax
/// (`team: a@x, b@y;`) is flattened to its members.
fn split_addresses(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let (mut quoted, mut angle) = (false, false);
    for ch in value.chars() {
        match ch {
            '"' => {
                quoted = !quoted;
                cur.push(ch);
            }
            '<' if !quoted => {
                angle = true;
                cur.push(ch);
            }
            '>' if !quoted => {
                angle = false;
                cur.push(ch);
            }
            ':' if !quoted && !angle && !cur.contains('@') => cur.clear(),
            ';' if !quoted && !angle => out.push(std::mem::take(&mut cur)),
            ',' if !quoted && !angle => out.push(std::mem::take(&mut cur)),
            _ => cur.push(ch),
        }
    }
    out.push(cur);
    out
}

fn params_list(params: &[(String, String)]) -> String {
    if params.is_empty() {
        return "NIL".into();
    }
    let items: Vec<String> = params
        .iter()
        .map(|(k, v)| format!("{} {}", quoted_or_literal(k.as_bytes()), quoted_or_literal(v.as_bytes())))
        .collect();
    format!("({})", items.join(" "))
}

fn disposition(f: &[(String, String)]) -> String {
    match field(f, "content-disposition") {
        Some(v) => {
            let mut parts = split_params(v);
            let kind = if parts.is_empty() { String::new() } else { parts.remove(0) };
            format!("({} {})", quoted_or_literal(kind.as_bytes()), params_list(&params_of(&parts)))
        }
        None => "NIL".into(),
    }
}

/// BODYSTRUCTURE (`extended`) or BODY of a part.
pub fn structure(msg: &[u8], part: &Part, extended: bool) -> String {
    let f = fields(&msg[part.header.clone()]);
    let q = |s: &str| quoted_or_literal(s.as_bytes());
    if part.mime_type.0 == "multipart" {
        let mut s = String::from("(");
        for child in &part.children {
            s.push_str(&structure(msg, child, extended));
        }
        s.push(' ');
        s.push_str(&q(&part.mime_type.1.to_ascii_uppercase()));
        if extended {
            s.push_str(&format!(
                " {} {} {} {}",
                params_list(&part.params),
                disposition(&f),
                nstring(field(&f, "content-language").map(str::as_bytes)),
                nstring(field(&f, "content-location").map(str::as_bytes)),
            ));
        }
        s.push(')');
        return s;
    }
    let body = &msg[part.body.clone()];
    let encoding = field(&f, "content-transfer-encoding").unwrap_or("7BIT").to_ascii_uppercase();
    let mut s = format!(
        "({} {} {} {} {} {} {}",
        q(&part.mime_type.0.to_ascii_uppercase()),
        q(&part.mime_type.1.to_ascii_uppercase()),
        params_list(&part.params),
        nstring(field(&f, "content-id").map(str::as_bytes)),
        nstring(field(&f, "content-description").map(str::as_bytes)),
        q(&encoding),
        body.len(),
    );
    if let Some(inner) = &part.message {
        s.push_str(&format!(
            " {} {} {}",
            envelope(&msg[inner.header.clone()]),
            structure(msg, inner, extended),
            count_lines(body)
        ));
    } else if part.mime_type.0 == "text" {
        s.push_str(&format!(" {}", count_lines(body)));
    }
    if extended {
        s.push_str(&format!(
            " {} {} {} {}",
            nstring(field(&f, "content-md5").map(str::as_bytes)),
            disposition(&f),
            nstring(field(&f, "content-language").map(str::as_bytes)),
            nstring(field(&f, "content-location").map(str::as_bytes)),
        ));
    }
    s.push(')');
    s
}

/// The part addressed by `numbers` (RFC 3501 6.4.5): children of a multipart, the body parts of
/// an encapsulated message, and part 1 of a non-multipart being the body itself.
fn find<'a>(root: &'a Part, numbers: &[u32]) -> Option<&'a Part> {
    let mut cur = root;
    for &n in numbers {
        let idx = usize::try_from(n).ok()?.checked_sub(1)?;
        // Inside a message/rfc822 part, numbers address the encapsulated message's parts.
        let container = match &cur.message {
            Some(inner) if !std::ptr::eq(cur, root) => inner.as_ref(),
            _ => cur,
        };
        cur = if container.mime_type.0 == "multipart" {
            container.children.get(idx)?
        } else if idx == 0 {
            container
        } else {
            return None;
        };
    }
    Some(cur)
}

/// The bytes of `section` of the message (`None`: no such part, which RFC 3501 answers with an
/// empty string).
pub fn section_bytes(msg: &[u8], root: &Part, section: &Section) -> Option<Vec<u8>> {
    let part = find(root, &section.part)?;
    // HEADER/TEXT of a part mean the encapsulated message's header and text.
    let target = if section.part.is_empty() { Some(root) } else { part.message.as_deref() };
    Some(match &section.kind {
        SectionKind::Full if section.part.is_empty() => msg.to_vec(),
        SectionKind::Full => msg[part.body.clone()].to_vec(),
        SectionKind::Mime => msg[part.header.clone()].to_vec(),
        SectionKind::Header => msg[target?.header.clone()].to_vec(),
        SectionKind::Text => msg[target?.body.clone()].to_vec(),
        SectionKind::HeaderFields(names) | SectionKind::HeaderFieldsNot(names) => {
            let keep = matches!(section.kind, SectionKind::HeaderFields(_));
            let header = &msg[target?.header.clone()];
            let mut out = Vec::new();
            let mut include = false;
            for line in header.split_inclusive(|&b| b == b'\n') {
                let trimmed = line.strip_suffix(b"\n").unwrap_or(line);
                let trimmed = trimmed.strip_suffix(b"\r").unwrap_or(trimmed);
                if trimmed.is_empty() {
                    continue;
                }
                if line[0] != b' ' && line[0] != b'\t' {
                    let name = line.iter().position(|&b| b == b':').map(|p| &line[..p]).unwrap_or(b"");
                    let listed = names.iter().any(|n| n.as_bytes().eq_ignore_ascii_case(name.trim_ascii()));
                    include = listed == keep;
                }
                if include {
                    out.extend_from_slice(line);
                }
            }
            out.extend_from_slice(b"\r\n");
            out
        }
    })
}

/// Decodes RFC 2047 encoded words (`=?utf-8?q?…?=`, `=?…?b?…?=`) for searching; unknown
/// charsets are decoded as UTF-8 lossily (searching is best effort, showing is not touched).
pub fn decode_words(value: &str) -> String {
    use base64::Engine as _;
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("=?") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let decoded = (|| {
            let (charset, after) = after.split_once('?')?;
            let (enc, after) = after.split_once('?')?;
            let end = after.find("?=")?;
            let text = &after[..end];
            let bytes = match enc {
                "b" | "B" => base64::engine::general_purpose::STANDARD.decode(text).ok()?,
                "q" | "Q" => qp_decode(text.replace('_', " ").as_bytes()),
                _ => return None,
            };
            let s = if charset.eq_ignore_ascii_case("iso-8859-1") || charset.eq_ignore_ascii_case("latin1") {
                bytes.iter().map(|&b| char::from(b)).collect()
            } else {
                String::from_utf8_lossy(&bytes).into_owned()
            };
            Some((s, charset.len() + enc.len() + end + 6))
        })();
        match decoded {
            Some((s, consumed)) => {
                out.push_str(&s);
                rest = &rest[start + consumed..];
                // Whitespace between adjacent encoded words is not part of the text.
                let trimmed = rest.trim_start();
                if trimmed.starts_with("=?") {
                    rest = trimmed;
                }
            }
            None => {
                out.push_str("=?");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Quoted-printable decoding (lenient).
pub fn qp_decode(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'=' {
            if b.get(i + 1..i + 3) == Some(b"\r\n") {
                i += 3;
                continue;
            }
            if b.get(i + 1) == Some(&b'\n') {
                i += 2;
                continue;
            }
            let hex = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// The searchable text of the message body: text parts decoded (quoted-printable, base64) and
/// concatenated.
pub fn body_text(msg: &[u8], part: &Part, out: &mut String) {
    use base64::Engine as _;
    if !part.children.is_empty() {
        for c in &part.children {
            body_text(msg, c, out);
        }
        return;
    }
    if let Some(inner) = &part.message {
        out.push_str(&String::from_utf8_lossy(&msg[inner.header.clone()]));
        body_text(msg, inner, out);
        return;
    }
    if part.mime_type.0 != "text" {
        return;
    }
    let f = fields(&msg[part.header.clone()]);
    let raw = &msg[part.body.clone()];
    let enc = field(&f, "content-transfer-encoding").unwrap_or("").to_ascii_lowercase();
    let decoded = match enc.as_str() {
        "quoted-printable" => qp_decode(raw),
        "base64" => {
            let clean: Vec<u8> = raw.iter().copied().filter(|b| !b.is_ascii_whitespace()).collect();
            base64::engine::general_purpose::STANDARD.decode(clean).unwrap_or_default()
        }
        _ => raw.to_vec(),
    };
    out.push_str(&String::from_utf8_lossy(&decoded));
    out.push('\n');
}

/// A day number from an RFC 5322 Date header value (`Tue, 1 Jul 2003 10:52:37 +0200`), for
/// SENTBEFORE/SENTON/SENTSINCE; the date as written, as RFC 3501 asks (time zone ignored).
pub fn date_header_day(value: &str) -> Option<i64> {
    let words: Vec<&str> =
        value.split(|c: char| c.is_whitespace() || c == ',').filter(|w| !w.is_empty()).collect();
    let at = words.iter().position(|w| crate::parse::month_number(w).is_some())?;
    let d: u32 = words.get(at.checked_sub(1)?)?.parse().ok()?;
    let m = crate::parse::month_number(words[at])?;
    let y: i64 = words.get(at + 1)?.parse().ok()?;
    Some(crate::parse::days_from_civil(y, m, d))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MULTI: &[u8] = b"From: \"Bob B\" <bob@b.example>\r\nTo: alice@a.example, Carol <carol@a.example>\r\n\
Subject: =?utf-8?q?gr=C3=BC=C3=9Fe?= report\r\nContent-Type: multipart/mixed; boundary=\"XX\"\r\n\r\n\
preamble\r\n--XX\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nhello\r\nworld\r\n--XX\r\n\
Content-Type: application/pdf; name=\"a.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\nJVBERg==\r\n--XX--\r\n";

    #[test]
    fn multipart_structure_and_sections() {
        let root = parse(MULTI);
        assert_eq!(root.children.len(), 2);
        let bs = structure(MULTI, &root, true);
        assert!(
            bs.starts_with("((\"TEXT\" \"PLAIN\" (\"charset\" \"utf-8\") NIL NIL \"7BIT\" 12 2 "),
            "{bs}"
        );
        assert!(bs.contains("(\"APPLICATION\" \"PDF\" (\"name\" \"a.pdf\") NIL NIL \"BASE64\" 8 "), "{bs}");
        assert!(bs.contains(" \"MIXED\" (\"boundary\" \"XX\")"), "{bs}");
        let one = Section { part: vec![1], kind: SectionKind::Full };
        assert_eq!(section_bytes(MULTI, &root, &one).unwrap(), b"hello\r\nworld");
        let mime = Section { part: vec![2], kind: SectionKind::Mime };
        assert!(section_bytes(MULTI, &root, &mime).unwrap().starts_with(b"Content-Type: application/pdf"));
        let fields = Section { part: vec![], kind: SectionKind::HeaderFields(vec!["subject".into()]) };
        assert_eq!(
            section_bytes(MULTI, &root, &fields).unwrap(),
            b"Subject: =?utf-8?q?gr=C3=BC=C3=9Fe?= report\r\n\r\n"
        );
        assert!(section_bytes(MULTI, &root, &Section { part: vec![3], kind: SectionKind::Full }).is_none());
        let env = envelope(&MULTI[root.header.clone()]);
        assert!(env.contains("((\"Bob B\" NIL \"bob\" \"b.example\"))"), "{env}");
        assert!(
            env.contains("((NIL NIL \"alice\" \"a.example\")(\"Carol\" NIL \"carol\" \"a.example\"))"),
            "{env}"
        );
        assert_eq!(decode_words("=?utf-8?q?gr=C3=BC=C3=9Fe?= report"), "grüße report");
    }

    #[test]
    fn broken_input_still_gives_a_structure() {
        for m in [&b""[..], b"no header", b"Content-Type: multipart/mixed\r\n\r\n--", b"\r\n\r\n"] {
            let root = parse(m);
            let _ = structure(m, &root, true);
            let _ = envelope(&m[root.header.clone()]);
        }
    }
}
