//! Consistent Overhead Byte Stuffing (Cheshire & Baker, 1999).
//!
//! COBS removes every zero byte from a frame so that a single `0x00` can delimit frames on the
//! line. A receiver that loses sync (dropped or flipped bytes) resynchronises at the next zero.

/// Largest number of bytes COBS can add to `len` input bytes (one code byte per 254 bytes, plus one).
pub const fn max_encoded_len(len: usize) -> usize {
    len + len / 254 + 1
}

/// Appends the COBS encoding of `input` to `out` (no delimiter).
pub fn encode_into(input: &[u8], out: &mut Vec<u8>) {
    out.reserve(max_encoded_len(input.len()));
    let mut code_pos = out.len();
    out.push(0); // placeholder for the first code byte
    let mut code: u8 = 1;
    for &byte in input {
        if byte == 0 {
            out[code_pos] = code;
            code_pos = out.len();
            out.push(0);
            code = 1;
        } else {
            out.push(byte);
            code += 1;
            if code == 0xFF {
                out[code_pos] = code;
                code_pos = out.len();
                out.push(0);
                code = 1;
            }
        }
    }
    out[code_pos] = code;
}

/// Why a COBS block could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CobsError {
    /// A zero byte inside the block (only the delimiter may be zero).
    ZeroInBlock,
    /// A code byte points past the end of the block.
    Truncated,
}

/// Decodes one COBS block (without its delimiter) into `out`, which is cleared first.
pub fn decode_into(input: &[u8], out: &mut Vec<u8>) -> Result<(), CobsError> {
    out.clear();
    let mut i = 0;
    while i < input.len() {
        let code = input[i];
        if code == 0 {
            return Err(CobsError::ZeroInBlock);
        }
        let run = code as usize - 1;
        let start = i + 1;
        let end = start + run;
        if end > input.len() {
            return Err(CobsError::Truncated);
        }
        let data = &input[start..end];
        if data.contains(&0) {
            return Err(CobsError::ZeroInBlock);
        }
        out.extend_from_slice(data);
        i = end;
        // A code below 0xFF means a zero followed the run, except at the very end of the block.
        if code != 0xFF && i < input.len() {
            out.push(0);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(data: &[u8]) {
        let mut enc = Vec::new();
        encode_into(data, &mut enc);
        assert!(!enc.contains(&0), "encoding of {data:?} contains a zero");
        assert!(enc.len() <= max_encoded_len(data.len()));
        let mut dec = Vec::new();
        decode_into(&enc, &mut dec).unwrap();
        assert_eq!(dec, data);
    }

    #[test]
    fn known_vectors_from_the_cobs_paper() {
        let cases: &[(&[u8], &[u8])] = &[
            (&[], &[0x01]),
            (&[0x00], &[0x01, 0x01]),
            (&[0x00, 0x00], &[0x01, 0x01, 0x01]),
            (&[0x11, 0x22, 0x00, 0x33], &[0x03, 0x11, 0x22, 0x02, 0x33]),
            (&[0x11, 0x22, 0x33, 0x44], &[0x05, 0x11, 0x22, 0x33, 0x44]),
            (&[0x11, 0x00, 0x00, 0x00], &[0x02, 0x11, 0x01, 0x01, 0x01]),
        ];
        for (raw, encoded) in cases {
            let mut enc = Vec::new();
            encode_into(raw, &mut enc);
            assert_eq!(&enc, encoded, "encoding {raw:02x?}");
            let mut dec = Vec::new();
            decode_into(encoded, &mut dec).unwrap();
            assert_eq!(&dec, raw);
        }
    }

    #[test]
    fn long_runs_round_trip() {
        for len in [253, 254, 255, 256, 508, 509, 1000, 4200] {
            let data: Vec<u8> = (0..len).map(|i| (i % 255 + 1) as u8).collect();
            round_trip(&data);
            let mut with_zeros = data.clone();
            with_zeros[len / 2] = 0;
            round_trip(&with_zeros);
        }
    }

    #[test]
    fn damaged_blocks_are_errors_not_panics() {
        let mut out = Vec::new();
        assert_eq!(decode_into(&[0x05, 0x11], &mut out), Err(CobsError::Truncated));
        assert_eq!(decode_into(&[0x03, 0x00, 0x11], &mut out), Err(CobsError::ZeroInBlock));
    }
}
