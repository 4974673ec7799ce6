//! A 25 MB message goes through seal and open with memory bounded by the chunk size.
//!
//! Memory is measured honestly: this test binary installs a counting global allocator and
//! records the peak of live heap bytes while sealing and while opening. The message is
//! generated on the fly by a `Read` source, the sealed message goes to a temporary file, and
//! the opened plaintext goes to a `Write` sink that only hashes it, so nothing in the test holds
//! the message either: any buffer proportional to the message size would show in the peak.
//! (One test function only, so no other test allocates concurrently.)

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{self, Read, Seek, Write};
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use qutemail_envelope::at_rest::{AtRestParams, DataKey, open_at_rest, seal_at_rest};
use qutemail_envelope::*;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: delegates every call to the system allocator; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = LIVE.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
        PEAK.fetch_max(now, Ordering::SeqCst);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns how many heap bytes above the starting level were live at the peak.
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let out = f();
    (out, PEAK.load(Ordering::SeqCst) - base)
}

const MESSAGE_LEN: u64 = 25 * 1000 * 1000;
/// The bound: one 64 KiB chunk and its tag, the 64 KiB output buffer, the 16 KiB input buffer,
/// headers and certificate, with room to spare, yet far below the 25 MB message.
const MEMORY_BOUND: usize = 512 * 1024;

/// Generates `len` bytes (an inner message header, then a cheap pseudo-random body) and
/// hashes what it produced.
struct Source {
    remaining: u64,
    state: u64,
    header: Vec<u8>,
    hasher: Sha256,
}

impl Source {
    fn new(len: u64) -> Self {
        let header = format!("Subject: {SUBJECT_CANARY}\r\n\r\n{BODY_CANARY}\r\n").into_bytes();
        Self { remaining: len, state: 0x9e37_79b9_7f4a_7c15, header, hasher: Sha256::new() }
    }
}

impl Read for Source {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (buf.len() as u64).min(self.remaining) as usize;
        for b in &mut buf[..n] {
            *b = if self.header.is_empty() {
                self.state ^= self.state << 13;
                self.state ^= self.state >> 7;
                self.state ^= self.state << 17;
                self.state as u8
            } else {
                self.header.remove(0)
            };
        }
        self.hasher.update(&buf[..n]);
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// Hashes what is written and records the largest single write.
#[derive(Default)]
struct Sink {
    hasher: Sha256,
    len: u64,
    largest_write: usize,
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.hasher.update(buf);
        self.len += buf.len() as u64;
        self.largest_write = self.largest_write.max(buf.len());
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_25_mb_message_is_sealed_and_opened_in_bounded_memory() {
    let routing = routing();
    let link = link();
    let kem = site_b_kem();
    let qkd = vec![qkd_key(1)];
    let verifying = signer().verifying_key();
    for mode in [Mode::Qaes, Mode::Hybrid] {
        let mut file = tempfile::tempfile().expect("temp file");
        let mut request = SealRequest::new(mode, &routing, "a.example", 0);
        request.link = Some(&link);
        request.qkd_keys = &qkd;
        request.recipient_kem_key = Some(kem.public_key());
        let mut source = Source::new(MESSAGE_LEN);
        let (summary, sealed_peak) =
            peak_during(|| seal(&request, &signer(), &randomness(), &mut source, &mut file).expect("seal"));
        assert_eq!(summary.plaintext_len, MESSAGE_LEN);
        let sealed_len = file.stream_position().expect("position");
        assert!(sealed_len > MESSAGE_LEN * 4 / 3, "the sealed file holds the whole base64 ciphertext");
        assert!(sealed_peak < MEMORY_BOUND, "{mode}: sealing used {sealed_peak} bytes of heap at peak");

        file.rewind().expect("rewind");
        let mut sink = Sink::default();
        let (report, open_peak) = peak_during(|| {
            let message = SealedMessage::read_header(&mut file).expect("header");
            let keys = OpenKeys {
                qkd_keys: &qkd,
                kem_secret_key: Some(&kem),
                sender_certificate_key: Some(&verifying),
                ..OpenKeys::default()
            };
            message.open(&keys, &mut sink).expect("open")
        });
        assert!(open_peak < MEMORY_BOUND, "{mode}: opening used {open_peak} bytes of heap at peak");
        assert_eq!(sink.len, MESSAGE_LEN);
        assert_eq!(sink.hasher.finalize(), source.hasher.clone().finalize(), "{mode}: exact bytes back");
        assert!(sink.largest_write <= DEFAULT_CHUNK_SIZE, "plaintext is released a chunk at a time");
        assert!(matches!(report.certificate, CertificateCheck::Verified(_)));
        println!("{mode}: 25 MB sealed with {sealed_peak} B and opened with {open_peak} B of heap at peak");
    }

    // The at-rest blob, likewise.
    let key = DataKey::from_bytes(Zeroizing::new([5; 32]));
    let params = AtRestParams { chunk_size: DEFAULT_CHUNK_SIZE, nonce_prefix: [1; 7] };
    let mut file = tempfile::tempfile().expect("temp file");
    let mut source = Source::new(MESSAGE_LEN);
    let (_, seal_peak) = peak_during(|| seal_at_rest(&key, &params, &mut source, &mut file).expect("seal"));
    file.rewind().expect("rewind");
    let mut sink = Sink::default();
    let (_, open_peak) =
        peak_during(|| open_at_rest(&key, io::BufReader::new(&mut file), &mut sink).expect("open"));
    assert!(seal_peak < MEMORY_BOUND && open_peak < MEMORY_BOUND, "at rest: {seal_peak} / {open_peak} bytes");
    assert_eq!(sink.hasher.finalize(), source.hasher.finalize());
}
