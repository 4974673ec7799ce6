//! Frame codec throughput, against CRC-32C over the same bytes measured in the same run.
//!
//! The CRC is work every decoder must do on every byte, so `decode / crc32c` is how much the
//! rest of the codec (COBS, header and body parsing, key check value) costs on top of it.
//! Run: `cargo bench -p qkd-serial-proto --bench codec`.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use qkd_serial_proto::{FrameDecoder, KeyBlock, Message, RawFrame};

fn key_block_wire(key_len: usize, frames: usize) -> Vec<u8> {
    let mut wire = Vec::new();
    for i in 0..frames {
        let key: Vec<u8> = (0..key_len).map(|j| (i * 31 + j * 7) as u8).collect();
        let msg = Message::KeyBlock(KeyBlock::new(i as u64 + 1, 1_700_000_000_000, 21_000, 64, key));
        RawFrame {
            version: qkd_serial_proto::frame::PROTOCOL_VERSION,
            msg_type: msg.msg_type() as u8,
            epoch: 0x1234_5678,
            seq: i as u32 + 1,
            body: msg.encode_body(),
        }
        .encode_into(&mut wire);
    }
    wire
}

fn bench(c: &mut Criterion) {
    for key_len in [32usize, 256, 1024] {
        let frames = 64;
        let wire = key_block_wire(key_len, frames);
        let mut g = c.benchmark_group(format!("key_block_{key_len}B"));
        g.throughput(Throughput::Bytes(wire.len() as u64));
        g.bench_function("reference_crc32c", |b| b.iter(|| crc32c::crc32c(std::hint::black_box(&wire))));
        g.bench_function("decode_frames", |b| {
            b.iter(|| {
                let mut dec = FrameDecoder::new();
                let mut n = 0;
                dec.push(std::hint::black_box(&wire), |f| {
                    if let Ok(f) = f
                        && let Ok(Message::KeyBlock(k)) = Message::decode(f.msg_type, &f.body)
                    {
                        n += usize::from(k.kcv_matches());
                    }
                });
                assert_eq!(n, frames);
            })
        });
        g.bench_function("encode_frames", |b| {
            b.iter(|| key_block_wire(std::hint::black_box(key_len), frames))
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
