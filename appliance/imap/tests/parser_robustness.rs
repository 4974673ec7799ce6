//! The stable counterpart of the fuzz target `fuzz/fuzz_targets/imap_command.rs`: real command
//! lines, mutated deterministically (byte flips, cuts, splices, chunked delivery), through the
//! framer, the command parser and the MIME parser. Nothing may panic; oversized literals are
//! refused before their bytes are taken; well-formed commands still parse after any chunking.

use qutemail_imap::mime;
use qutemail_imap::parse::{Command, Frame, Framer, Section, SectionKind, parse_command};

const SEEDS: &[&[u8]] = &[
    b"a1 LOGIN alice \"pass word\"\r\n",
    b"a2 SELECT INBOX (CONDSTORE)\r\n",
    b"a3 UID FETCH 1:*,7 (FLAGS BODY.PEEK[1.2.HEADER.FIELDS (Subject From)]<0.100> MODSEQ) (CHANGEDSINCE 4)\r\n",
    b"a4 SEARCH CHARSET UTF-8 OR (SUBJECT hi FROM bob) NOT UID 3:5 SINCE 1-Feb-2024 LARGER 10\r\n",
    b"a5 STORE 1:3 (UNCHANGEDSINCE 9) +FLAGS.SILENT (\\Seen $Junk)\r\n",
    b"a6 APPEND Drafts (\\Draft) \"17-Jul-1996 02:44:25 -0700\" {12}\r\nSubject: x\r\n\r\n",
    b"a7 APPEND INBOX {5+}\r\nhello\r\n",
    b"a8 LIST \"\" \"%\"\r\na9 STATUS INBOX (MESSAGES UIDNEXT HIGHESTMODSEQ)\r\n",
    b"b1 UID MOVE 4:6 Trash\r\nb2 UID EXPUNGE 1:*\r\nb3 IDLE\r\n",
    b"b4 AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\nb5 ENABLE CONDSTORE\r\nb6 ID NIL\r\n",
];

const MESSAGE: &[u8] = b"From: \"B\" <b@x>\r\nTo: a@y, C <c@y>\r\nSubject: =?utf-8?b?aGk=?=\r\n\
Content-Type: multipart/mixed; boundary=\"q\"\r\n\r\n--q\r\nContent-Type: message/rfc822\r\n\r\n\
Subject: inner\r\nContent-Type: multipart/alternative; boundary=r\r\n\r\n--r\r\n\r\nplain\r\n--r\r\n\
Content-Type: text/html\r\n\r\n<p>x</p>\r\n--r--\r\n--q\r\nContent-Type: text/plain\r\n\
Content-Transfer-Encoding: quoted-printable\r\n\r\nq=3Dp=\r\n\r\n--q--\r\n";

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n.max(1) as u64).unwrap_or(0)
    }
}

fn drive(input: &[u8], rng: &mut Rng, limit: u64) -> Vec<Frame> {
    let mut framer = Framer::new(limit);
    let mut frames = Vec::new();
    let mut rest = input;
    while !rest.is_empty() {
        let take = (rng.below(40) + 1).min(rest.len());
        framer.feed(&rest[..take]);
        rest = &rest[take..];
        while let Some(f) = framer.next_frame() {
            if let Frame::Command(bytes) = &f {
                let _ = parse_command(bytes);
            }
            if let Frame::TooBig { size, .. } = &f {
                assert!(*size > limit);
            }
            frames.push(f);
        }
    }
    frames
}

fn everything_of(msg: &[u8]) {
    let root = mime::parse(msg);
    let _ = mime::structure(msg, &root, true);
    let _ = mime::envelope(&msg[root.header.clone()]);
    for part in [vec![], vec![1], vec![1, 1], vec![1, 2], vec![2], vec![3, 1]] {
        for kind in [SectionKind::Full, SectionKind::Header, SectionKind::Text, SectionKind::Mime] {
            let _ = mime::section_bytes(msg, &root, &Section { part: part.clone(), kind });
        }
    }
    let mut s = String::new();
    mime::body_text(msg, &root, &mut s);
}

#[test]
fn well_formed_commands_parse_whatever_the_chunking() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for seed in SEEDS {
        for _ in 0..50 {
            let frames = drive(seed, &mut rng, 1 << 20);
            for f in &frames {
                if let Frame::Command(bytes) = f {
                    let parsed = parse_command(bytes);
                    assert!(parsed.is_ok(), "{:?}: {:?}", String::from_utf8_lossy(bytes), parsed);
                }
            }
        }
    }
    let frames = drive(SEEDS[5], &mut rng, 1 << 20);
    let Some(Frame::Command(bytes)) = frames.iter().find(|f| matches!(f, Frame::Command(_))) else {
        panic!("no command")
    };
    let Command::Append { message, date, .. } = parse_command(bytes).unwrap().command else { panic!() };
    assert_eq!(&message[..], b"Subject: x\r\n");
    assert_eq!(date, Some(837_596_665));
}

#[test]
fn mutated_commands_and_messages_never_panic() {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for round in 0..20_000 {
        let seed = SEEDS[rng.below(SEEDS.len())];
        let mut input = seed.to_vec();
        for _ in 0..=rng.below(4) {
            match rng.below(5) {
                0 if !input.is_empty() => {
                    let i = rng.below(input.len());
                    input[i] = (rng.next() & 0xff) as u8;
                }
                1 if !input.is_empty() => input.truncate(rng.below(input.len())),
                2 => {
                    let other = SEEDS[rng.below(SEEDS.len())];
                    let at = rng.below(input.len() + 1);
                    let from = rng.below(other.len());
                    input.splice(at..at, other[from..].iter().copied());
                }
                3 => {
                    let at = rng.below(input.len() + 1);
                    let digits = format!("{{{}}}\r\n", rng.next() % 100_000);
                    input.splice(at..at, digits.bytes());
                }
                _ => input.extend_from_slice(b"\r\n"),
            }
        }
        drive(&input, &mut rng, 4096);
        if round % 4 == 0 {
            let mut msg = MESSAGE.to_vec();
            let i = rng.below(msg.len());
            msg[i] = (rng.next() & 0xff) as u8;
            msg.truncate(msg.len() - rng.below(msg.len() / 2));
            everything_of(&msg);
            everything_of(&input);
        }
    }
}

#[test]
fn nested_message_parts_are_addressed_like_rfc_3501() {
    let root = mime::parse(MESSAGE);
    let sec = |part: Vec<u32>, kind| mime::section_bytes(MESSAGE, &root, &Section { part, kind }).unwrap();
    assert!(sec(vec![1], SectionKind::Header).starts_with(b"Subject: inner\r\n"));
    assert_eq!(sec(vec![1, 1], SectionKind::Full), b"plain");
    assert_eq!(sec(vec![1, 2], SectionKind::Full), b"<p>x</p>");
    assert_eq!(sec(vec![2], SectionKind::Full), b"q=3Dp=\r\n");
    let bs = mime::structure(MESSAGE, &root, false);
    assert!(bs.starts_with("((\"MESSAGE\" \"RFC822\" NIL NIL NIL \"7BIT\" "), "{bs}");
    assert!(bs.contains("\"ALTERNATIVE\")"), "{bs}");
}
