#![no_main]
//! cargo-fuzz target `imap_command`: arbitrary bytes as what an IMAP client sends, cut into
//! chunks whose sizes come from the input and fed to the sans-I/O framer
//! (`qutemail_imap::parse::Framer`, literal limit 4096); every complete command goes through
//! `parse_command`. Nothing may panic, a literal over the limit must be refused before its bytes
//! are taken, and no assembled command may exceed the line limit plus its literals. The same
//! bytes also go through the MIME parser as a message (ENVELOPE, BODYSTRUCTURE, every section
//! of the first parts), which IMAP runs on decrypted mail. The stable counterpart is
//! `appliance/imap/tests/parser_robustness.rs`.

use libfuzzer_sys::fuzz_target;
use qutemail_imap::mime;
use qutemail_imap::parse::{Frame, Framer, MAX_LINE, Section, SectionKind, parse_command};

const LIMIT: u64 = 4096;

fuzz_target!(|data: &[u8]| {
    let mut framer = Framer::new(LIMIT);
    let mut rest = data;
    while !rest.is_empty() {
        let take = (usize::from(rest[0]) % 61 + 1).min(rest.len());
        let (chunk, tail) = rest.split_at(take);
        rest = tail;
        framer.feed(chunk);
        while let Some(frame) = framer.next_frame() {
            match frame {
                Frame::Command(bytes) => {
                    assert!(bytes.len() <= data.len());
                    let _ = parse_command(&bytes);
                }
                Frame::TooBig { size, .. } => assert!(size > LIMIT),
                Frame::Continue | Frame::LineTooLong => {}
            }
        }
        let _ = framer.next_line();
    }
    let _ = MAX_LINE;

    let root = mime::parse(data);
    let _ = mime::structure(data, &root, true);
    let _ = mime::structure(data, &root, false);
    let _ = mime::envelope(&data[root.header.clone()]);
    for part in [vec![], vec![1], vec![2], vec![1, 1], vec![2, 1, 3]] {
        for kind in [
            SectionKind::Full,
            SectionKind::Header,
            SectionKind::Text,
            SectionKind::Mime,
            SectionKind::HeaderFields(vec!["Subject".into()]),
            SectionKind::HeaderFieldsNot(vec!["From".into()]),
        ] {
            let _ = mime::section_bytes(data, &root, &Section { part: part.clone(), kind });
        }
    }
    let mut text = String::new();
    mime::body_text(data, &root, &mut text);
});
