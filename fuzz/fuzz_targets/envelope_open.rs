#![no_main]
//! cargo-fuzz target `envelope_open`: arbitrary bytes as a sealed message (both opening phases
//! and the offline certificate check) and as an at-rest blob. A sealed message arrives over SMTP
//! from anywhere, so parsing and opening must never panic and never allocate without bound;
//! every outcome is `Ok` or a typed error. The stable counterpart, which flips every byte of
//! genuine sealed messages, is `appliance/envelope/tests/tamper.rs`
//! (`any_single_byte_change_fails_or_changes_nothing`).

use libfuzzer_sys::fuzz_target;
use qutemail_envelope::at_rest::{DataKey, open_at_rest};
use qutemail_envelope::{
    InMemorySigner, OpenKeys, QkdKey, SealedMessage, SiteKemSecretKey, verify_sealed_message,
};
use zeroize::Zeroizing;

fuzz_target!(|data: &[u8]| {
    let kem = SiteKemSecretKey::from_seed(&Zeroizing::new([0x42; 64])).expect("fixed seed");
    let sender = InMemorySigner::from_seed("fuzz", &Zeroizing::new([0x11; 32])).verifying_key();
    if let Ok(message) = SealedMessage::read_header(data) {
        // Give the opener keys under exactly the IDs the input names (a few, to stay bounded).
        let keys: Vec<QkdKey> = message
            .header()
            .key_ids
            .iter()
            .take(64)
            .map(|id| QkdKey::new(*id, Zeroizing::new(vec![0x5a; 32])))
            .collect();
        let open_keys = OpenKeys {
            qkd_keys: &keys,
            kem_secret_key: Some(&kem),
            sender_certificate_key: Some(&sender),
            ..OpenKeys::default()
        };
        let _ = message.open(&open_keys, std::io::sink());
    }
    let _ = verify_sealed_message(data, &sender);
    let key = DataKey::from_bytes(Zeroizing::new([0x77; 32]));
    let _ = open_at_rest(&key, data, std::io::sink());
});
