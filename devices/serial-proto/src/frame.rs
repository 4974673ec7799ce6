//! Frames: the header, the CRC-32C trailer, COBS stuffing and the streaming decoder.

use crate::cobs;

/// Protocol version carried in every frame header.
pub const PROTOCOL_VERSION: u8 = 1;
/// Bytes in the frame header: version, type, epoch, sequence number, body length.
pub const HEADER_LEN: usize = 12;
/// Bytes in the CRC-32C trailer.
pub const CRC_LEN: usize = 4;
/// Largest body a frame may carry.
pub const MAX_BODY_LEN: usize = 4096;
/// Largest unstuffed frame: header, body and CRC.
pub const MAX_FRAME_LEN: usize = HEADER_LEN + MAX_BODY_LEN + CRC_LEN;
/// Largest stuffed frame on the line, without its delimiter.
pub const MAX_ENCODED_LEN: usize = cobs::max_encoded_len(MAX_FRAME_LEN);
/// The frame delimiter.
pub const DELIMITER: u8 = 0x00;

/// A frame as it travels: header fields and an undecoded body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    /// Protocol version of the sender.
    pub version: u8,
    /// Message type code (see [`crate::MessageType`]).
    pub msg_type: u8,
    /// Session epoch the frame belongs to (0 outside a session).
    pub epoch: u32,
    /// Sequence number of a reliable frame, 0 for an unreliable one.
    pub seq: u32,
    /// The message body.
    pub body: Vec<u8>,
}

impl RawFrame {
    /// Appends this frame to `out` exactly as it goes on the line: COBS-stuffed, then the delimiter.
    ///
    /// Bodies longer than [`MAX_BODY_LEN`] are a programming error of the sender; they are cut
    /// by the type system's callers (messages check their own sizes) and asserted here in debug.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        debug_assert!(self.body.len() <= MAX_BODY_LEN);
        let mut raw = Vec::with_capacity(HEADER_LEN + self.body.len() + CRC_LEN);
        raw.push(self.version);
        raw.push(self.msg_type);
        raw.extend_from_slice(&self.epoch.to_be_bytes());
        raw.extend_from_slice(&self.seq.to_be_bytes());
        raw.extend_from_slice(&(self.body.len() as u16).to_be_bytes());
        raw.extend_from_slice(&self.body);
        let crc = crc32c::crc32c(&raw);
        raw.extend_from_slice(&crc.to_be_bytes());
        cobs::encode_into(&raw, out);
        out.push(DELIMITER);
    }

    /// This frame as it goes on the line.
    pub fn to_wire(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// Parses an unstuffed frame (header, body, CRC) and checks its CRC and length.
    pub fn parse(raw: &[u8]) -> Result<RawFrame, FrameError> {
        if raw.len() < HEADER_LEN + CRC_LEN {
            return Err(FrameError::TooShort { len: raw.len() });
        }
        let (content, crc_bytes) = raw.split_at(raw.len() - CRC_LEN);
        let expected = u32::from_be_bytes([crc_bytes[0], crc_bytes[1], crc_bytes[2], crc_bytes[3]]);
        let actual = crc32c::crc32c(content);
        if expected != actual {
            return Err(FrameError::BadCrc { expected, actual });
        }
        let version = content[0];
        if version != PROTOCOL_VERSION {
            return Err(FrameError::UnsupportedVersion { version });
        }
        let msg_type = content[1];
        let epoch = u32::from_be_bytes([content[2], content[3], content[4], content[5]]);
        let seq = u32::from_be_bytes([content[6], content[7], content[8], content[9]]);
        let declared = u16::from_be_bytes([content[10], content[11]]) as usize;
        let body = &content[HEADER_LEN..];
        if declared != body.len() {
            return Err(FrameError::LengthMismatch { declared, actual: body.len() });
        }
        if declared > MAX_BODY_LEN {
            return Err(FrameError::BodyTooLong { len: declared });
        }
        Ok(RawFrame { version, msg_type, epoch, seq, body: body.to_vec() })
    }
}

/// Why bytes between two delimiters were not a valid frame. Every case is recoverable: the
/// decoder drops the bytes and resynchronises at the next delimiter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// More bytes arrived without a delimiter than any valid frame can hold.
    #[error("no frame delimiter within {limit} bytes; discarded until the next delimiter")]
    Oversized {
        /// The limit that was exceeded.
        limit: usize,
    },
    /// The COBS stuffing is damaged.
    #[error("byte stuffing is damaged ({0:?})")]
    Stuffing(cobs::CobsError),
    /// Too few bytes for a header and CRC.
    #[error("frame of {len} bytes is shorter than a header and CRC")]
    TooShort {
        /// Unstuffed length.
        len: usize,
    },
    /// The CRC-32C does not match: the frame was damaged on the line.
    #[error("CRC-32C mismatch (frame says {expected:#010x}, computed {actual:#010x})")]
    BadCrc {
        /// The CRC in the frame.
        expected: u32,
        /// The CRC of the received bytes.
        actual: u32,
    },
    /// A protocol version this implementation does not speak.
    #[error("unsupported protocol version {version}")]
    UnsupportedVersion {
        /// Version byte received.
        version: u8,
    },
    /// The header's length field disagrees with the bytes received.
    #[error("header declares a {declared}-byte body but {actual} bytes arrived")]
    LengthMismatch {
        /// Length in the header.
        declared: usize,
        /// Bytes present.
        actual: usize,
    },
    /// The body is longer than the protocol allows.
    #[error("body of {len} bytes exceeds the {MAX_BODY_LEN}-byte limit")]
    BodyTooLong {
        /// Declared length.
        len: usize,
    },
}

/// Splits a byte stream into frames. Feed it whatever the line delivers, in any chunking.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    stuffed: Vec<u8>,
    unstuffed: Vec<u8>,
    discarding: bool,
}

impl FrameDecoder {
    /// A decoder waiting for the first delimiter-terminated frame.
    pub fn new() -> Self {
        Self::default()
    }

    /// Consumes `bytes`, calling `on_frame` for every complete frame or framing error.
    pub fn push(&mut self, bytes: &[u8], mut on_frame: impl FnMut(Result<RawFrame, FrameError>)) {
        let mut rest = bytes;
        while !rest.is_empty() {
            match rest.iter().position(|&b| b == DELIMITER) {
                Some(pos) => {
                    self.append(&rest[..pos], &mut on_frame);
                    rest = &rest[pos + 1..];
                    if self.discarding {
                        self.discarding = false;
                    } else if !self.stuffed.is_empty() {
                        on_frame(self.finish());
                    }
                    self.stuffed.clear();
                }
                None => {
                    self.append(rest, &mut on_frame);
                    rest = &[];
                }
            }
        }
    }

    fn append(&mut self, chunk: &[u8], on_frame: &mut impl FnMut(Result<RawFrame, FrameError>)) {
        if self.discarding {
            return;
        }
        if self.stuffed.len() + chunk.len() > MAX_ENCODED_LEN {
            self.stuffed.clear();
            self.discarding = true;
            on_frame(Err(FrameError::Oversized { limit: MAX_ENCODED_LEN }));
        } else {
            self.stuffed.extend_from_slice(chunk);
        }
    }

    fn finish(&mut self) -> Result<RawFrame, FrameError> {
        cobs::decode_into(&self.stuffed, &mut self.unstuffed).map_err(FrameError::Stuffing)?;
        RawFrame::parse(&self.unstuffed)
    }

    /// Bytes held while waiting for a delimiter (for diagnostics).
    pub fn pending_len(&self) -> usize {
        self.stuffed.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(body: &[u8]) -> RawFrame {
        RawFrame { version: 1, msg_type: 0x30, epoch: 7, seq: 0, body: body.to_vec() }
    }

    fn decode_all(bytes: &[u8]) -> Vec<Result<RawFrame, FrameError>> {
        let mut dec = FrameDecoder::new();
        let mut out = Vec::new();
        dec.push(bytes, |f| out.push(f));
        out
    }

    #[test]
    fn frames_survive_any_chunking() {
        let mut wire = Vec::new();
        for i in 0..5u8 {
            frame(&[i, 0, i]).encode_into(&mut wire);
        }
        for chunk in [1, 2, 3, 7, 1000] {
            let mut dec = FrameDecoder::new();
            let mut got = Vec::new();
            for c in wire.chunks(chunk) {
                dec.push(c, |f| got.push(f.unwrap()));
            }
            assert_eq!(got.len(), 5);
            assert_eq!(got[3].body, vec![3, 0, 3]);
        }
    }

    #[test]
    fn a_flipped_bit_is_a_crc_error_and_the_next_frame_still_decodes() {
        let mut wire = frame(b"hello").to_wire();
        wire[6] ^= 0x04;
        frame(b"world").encode_into(&mut wire);
        let got = decode_all(&wire);
        assert!(matches!(got[0], Err(FrameError::BadCrc { .. }) | Err(FrameError::Stuffing(_))));
        assert_eq!(got[1].as_ref().unwrap().body, b"world");
    }

    #[test]
    fn endless_garbage_is_bounded_and_resyncs() {
        let mut wire = vec![0x55; MAX_ENCODED_LEN * 3];
        wire.push(0);
        frame(b"ok").encode_into(&mut wire);
        let got = decode_all(&wire);
        assert_eq!(got.len(), 2);
        assert!(matches!(got[0], Err(FrameError::Oversized { .. })));
        assert_eq!(got[1].as_ref().unwrap().body, b"ok");
    }

    #[test]
    fn idle_delimiters_are_ignored() {
        let mut wire = vec![0, 0, 0];
        frame(b"x").encode_into(&mut wire);
        wire.extend_from_slice(&[0, 0]);
        let got = decode_all(&wire);
        assert_eq!(got.len(), 1);
    }

    #[test]
    fn length_field_must_match() {
        let mut raw = vec![1, 0x30, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9, 1, 2];
        let crc = crc32c::crc32c(&raw);
        raw.extend_from_slice(&crc.to_be_bytes());
        assert_eq!(RawFrame::parse(&raw), Err(FrameError::LengthMismatch { declared: 9, actual: 2 }));
    }
}
