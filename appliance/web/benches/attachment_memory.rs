//! Peak heap of downloading a 25 MB attachment, streamed against in memory, measured in the
//! same run with a counting global allocator (run: `cargo bench -p qutemail-web --bench
//! attachment_memory`).
//!
//! - In memory (the path before streaming, still used for messages that do not open): the
//!   sealed blob read whole (`read_to_end`, then cloned for the opening as `present` does), the
//!   message decrypted whole, copied behind the presentation headers, parsed with
//!   `mail-parser`, and the part's decoded bytes copied out (`message::attachment`).
//! - Streamed: the at-rest blob opened chunk by chunk on a second thread into a bounded
//!   channel of 4 chunks (as the download's `ChunkSender`), the chunks fed to
//!   [`qutemail_web::part_stream::PartStream`] and its output consumed as it comes.
//!
//! The sealed blob itself (the store's file) is outside both measurements. Both outputs are
//! checked against the attachment's SHA-256.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use mail_parser::MessageParser;
use qutemail_envelope::at_rest::{self, AtRestParams, DataKey};
use qutemail_web::part_stream::PartStream;
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = CURRENT.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to the system allocator unchanged; only counters are kept.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's pointer and layout.
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's pointer, layout and size.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                CURRENT.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f`; returns its result and the heap it used at its peak above what was live before.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = f();
    (out, PEAK.load(Ordering::Relaxed).saturating_sub(base))
}

fn pseudo_random(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The in-memory path, as `present` + `message::attachment` do it.
fn in_memory(key: &DataKey, blob: &[u8], headers: &[u8]) -> [u8; 32] {
    let read: Vec<u8> = blob.to_vec(); // read_to_end
    let for_opening = read.clone(); // `present` opens a clone (it keeps the original for errors)
    let opened = at_rest::open_at_rest_to_vec(key, &for_opening[..]).expect("opens");
    let mut presented = Zeroizing::new(Vec::with_capacity(headers.len() + opened.len()));
    presented.extend_from_slice(headers);
    presented.extend_from_slice(&opened);
    drop(opened);
    drop(for_opening);
    let parsed = MessageParser::default().parse(&presented[..]).expect("parses");
    let part = parsed.attachments().next().expect("has the attachment");
    let bytes = part.contents().to_vec();
    let digest = Sha256::digest(&bytes).into();
    drop(read);
    digest
}

/// The streamed path, as `present_streamed` + the download do it.
fn streamed(key: &DataKey, blob: &[u8], headers: &[u8]) -> ([u8; 32], usize) {
    struct Sender(std::sync::mpsc::SyncSender<Zeroizing<Vec<u8>>>);
    impl Write for Sender {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = buf.len().min(64 * 1024);
            self.0.send(Zeroizing::new(buf[..n].to_vec())).map_err(std::io::Error::other)?;
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(4);
    std::thread::scope(|scope| {
        let opening = scope.spawn(move || {
            let mut out = Sender(tx);
            out.write_all(headers).expect("channel open");
            at_rest::open_at_rest(key, blob, &mut out).expect("opens");
        });
        let mut extractor = PartStream::new(0);
        let mut hasher = Sha256::new();
        let mut out = Zeroizing::new(Vec::new());
        for chunk in rx {
            extractor.feed(&chunk, &mut out).expect("streams");
            hasher.update(&out[..]);
            out.clear();
        }
        extractor.finish(&mut out).expect("streams");
        hasher.update(&out[..]);
        assert!(extractor.is_complete());
        opening.join().expect("opening thread");
        (hasher.finalize().into(), extractor.high_water())
    })
}

fn main() {
    let attachment = pseudo_random(25 * 1024 * 1024);
    let expected: [u8; 32] = Sha256::digest(&attachment).into();
    let message = mail_builder::MessageBuilder::new()
        .from(("Alice", "alice@a.test"))
        .to("bob@a.test")
        .subject("25 MB")
        .text_body("see attached")
        .attachment("application/octet-stream", "big.bin", attachment)
        .write_to_vec()
        .expect("builds");
    let key = DataKey::generate().expect("key");
    let params = AtRestParams::generate().expect("params");
    let mut blob = Vec::new();
    at_rest::seal_at_rest(&key, &params, &message[..], &mut blob).expect("seals");
    drop(message);
    let headers = b"X-QKD-Secure: False\r\nX-QKD-Protection: normal\r\n".to_vec();

    let started = Instant::now();
    let (old_digest, old_peak) = peak_of(|| in_memory(&key, &blob, &headers));
    let old_time = started.elapsed();
    let started = Instant::now();
    let ((new_digest, high_water), new_peak) = peak_of(|| streamed(&key, &blob, &headers));
    let new_time = started.elapsed();
    assert_eq!(old_digest, expected, "the in-memory path returns the attachment");
    assert_eq!(new_digest, expected, "the streamed path returns the attachment");

    let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
    println!("attachment download, 25 MiB attachment ({:.1} MiB sealed message)", mib(blob.len()));
    println!("  in memory: peak heap {:>9.2} MiB  ({:.2?})", mib(old_peak), old_time);
    println!(
        "  streamed:  peak heap {:>9.2} MiB  ({:.2?}; extractor kept at most {high_water} B)",
        mib(new_peak),
        new_time
    );
    println!("  ratio in memory / streamed: {:.0}x", old_peak as f64 / new_peak.max(1) as f64);
}
