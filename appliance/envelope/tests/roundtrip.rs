//! Every mode returns the exact bytes it sealed, carries a verified certificate, and leaks
//! neither the inner message nor key bytes into the sealed output.

mod common;

use common::*;
use qutemail_envelope::at_rest::{AtRestParams, DataKey, open_at_rest_to_vec, seal_at_rest};
use qutemail_envelope::*;
use zeroize::Zeroizing;

#[test]
fn every_mode_round_trips_exact_bytes_across_chunk_boundaries() {
    // Lengths around the chunk size of 64: empty, shorter, exact multiple, one more.
    for mode in Mode::ALL {
        for extra in [0usize, 1, 63, 64, 65, 200] {
            let plaintext: Vec<u8> =
                inner_message(0).into_iter().chain((0..extra).map(|i| i as u8)).collect();
            for len in [0, plaintext.len()] {
                let pt = &plaintext[..len];
                let keys = keys_for(mode, pt.len());
                let (sealed, summary) = seal_with(mode, pt, 64, &keys);
                assert_eq!(summary.plaintext_len, len as u64);
                let (opened, report) = open_with(&sealed, &keys).expect("opens");
                assert_eq!(&opened[..], pt, "mode {mode}, {len} bytes");
                match report.certificate {
                    CertificateCheck::Verified(cert) => {
                        assert_eq!(cert.mode, mode.name());
                        assert_eq!(cert.ciphertext_len, summary.ciphertext_len);
                    }
                    other => panic!("mode {mode}: certificate {other:?}"),
                }
            }
        }
    }
}

#[test]
fn header_phase_names_what_the_receiver_must_fetch() {
    let pt = inner_message(10);
    let keys = Keys { qkd: vec![qkd_key(1), qkd_key(2)], kem: site_b_kem() };
    let (sealed, _) = seal_with(Mode::Hybrid, &pt, DEFAULT_CHUNK_SIZE, &keys);
    let message = SealedMessage::read_header(sealed.as_slice()).expect("header");
    let h = message.header();
    assert_eq!(h.mode, Mode::Hybrid);
    assert_eq!(h.key_ids, vec![qkd_key(1).id(), qkd_key(2).id()]);
    assert_eq!(h.link_id.as_deref(), Some("link-a-b"));
    assert_eq!(h.source_kme_id.as_deref(), Some("KME-A"));
    assert_eq!(h.target_kme_id.as_deref(), Some("KME-B"));
    assert_eq!(h.kem_key_fingerprint, Some(site_b_kem().public_key().fingerprint()));
    assert_eq!(h.kem_ciphertext.as_ref().map(Vec::len), Some(KEM_CIPHERTEXT_LEN));
    assert_eq!(h.salt, Some(randomness().salt));
    assert_eq!(h.chunk_size, Some(DEFAULT_CHUNK_SIZE));
    assert_eq!(h.to.as_deref(), Some("Bob <bob@b.example>, Carol <carol@b.example>"));
}

#[test]
fn sealed_output_contains_no_canary_and_no_key_bytes() {
    for mode in Mode::ALL {
        let pt = inner_message(300);
        let keys = keys_for(mode, pt.len());
        let (sealed, _) = seal_with(mode, &pt, 128, &keys);
        let text = String::from_utf8(sealed.clone()).expect("ASCII");
        for canary in [SUBJECT_CANARY, BODY_CANARY, ATTACHMENT_CANARY] {
            assert!(!text.contains(canary), "mode {mode} leaks {canary}");
        }
        assert!(text.contains("Subject: Quantum-secured message\r\n"));
        assert!(text.contains("X-QKD-Secure: True\r\n"));
        // No key in raw, hex or base64 form anywhere in the output.
        let mut secrets: Vec<Vec<u8>> = keys.qkd.iter().map(|k| k.bytes().to_vec()).collect();
        secrets.push(keys.kem.to_seed().expect("seed").to_vec());
        secrets.push(signer().to_seed().to_vec());
        for secret in secrets {
            for (i, window) in secret.chunks(16).enumerate() {
                assert!(!contains(&sealed, window), "mode {mode}: key bytes {i} in output");
                assert!(!text.contains(&hex::encode(window)), "mode {mode}: hex key bytes in output");
            }
            use base64::Engine as _;
            let b64 = base64::engine::general_purpose::STANDARD.encode(&secret);
            assert!(!text.contains(&b64[..20]), "mode {mode}: base64 key in output");
        }
    }
}

#[test]
fn otp_consumes_keys_in_order_and_reports_them() {
    let pt = vec![0x55u8; 100];
    assert_eq!(otp_key_bytes_needed(100), 132);
    assert_eq!(otp_keys_needed(100, 32), 5);
    // Seven keys supplied, five needed: the last two stay untouched and unlisted.
    let keys = Keys { qkd: (0..7).map(|i| qkd_key(50 + i)).collect(), kem: site_b_kem() };
    let (sealed, summary) = seal_with(Mode::Otp, &pt, DEFAULT_CHUNK_SIZE, &keys);
    let expected: Vec<_> = keys.qkd[..5].iter().map(QkdKey::id).collect();
    assert_eq!(summary.key_ids_used, expected);
    let header = SealedMessage::read_header(sealed.as_slice()).expect("header");
    assert_eq!(header.header().key_ids, expected);
    let opener = Keys { qkd: (0..5).map(|i| qkd_key(50 + i)).collect(), kem: site_b_kem() };
    assert_eq!(&open_with(&sealed, &opener).expect("opens").0[..], &pt[..]);
}

#[test]
fn otp_refuses_messages_above_its_maximum_with_their_size() {
    let routing = routing();
    let link = link();
    let keys = otp_keys(DEFAULT_OTP_MAX_SIZE + 1);
    let mut request = SealRequest::new(Mode::Otp, &routing, "a.example", 0);
    request.link = Some(&link);
    request.qkd_keys = &keys;
    let big = vec![1u8; DEFAULT_OTP_MAX_SIZE + 1];
    let mut out = Vec::new();
    let err = seal(&request, &signer(), &randomness(), big.as_slice(), &mut out).expect_err("refused");
    assert!(
        matches!(err, EnvelopeError::OtpTooLarge { size, max } if size == big.len() as u64 && max == DEFAULT_OTP_MAX_SIZE as u64),
        "{err:?}"
    );
    assert!(out.is_empty(), "nothing is written for a refused message");
    // Exactly the maximum is accepted.
    let ok = vec![1u8; DEFAULT_OTP_MAX_SIZE];
    seal(&request, &signer(), &randomness(), ok.as_slice(), &mut out).expect("maximum size seals");
    // A receiver with a lower limit refuses it too.
    let sealed = out;
    let message = SealedMessage::read_header(sealed.as_slice()).expect("header");
    let opener_keys = otp_keys(DEFAULT_OTP_MAX_SIZE);
    let err = message
        .open_to_vec(&OpenKeys { qkd_keys: &opener_keys, otp_max_size: 1024, ..OpenKeys::default() })
        .expect_err("receiver limit");
    assert!(matches!(err, EnvelopeError::OtpTooLarge { max: 1024, .. }), "{err:?}");
}

#[test]
fn not_enough_key_material_is_reported() {
    let pt = vec![7u8; 100];
    let keys = Keys { qkd: vec![qkd_key(1)], kem: site_b_kem() };
    let routing = routing();
    let link = link();
    let mut request = SealRequest::new(Mode::Otp, &routing, "a.example", 0);
    request.link = Some(&link);
    request.qkd_keys = &keys.qkd;
    let err = seal(&request, &signer(), &randomness(), pt.as_slice(), Vec::new()).expect_err("short pad");
    assert!(matches!(err, EnvelopeError::NotEnoughKeyMaterial { needed: 132, available: 32 }), "{err:?}");
    let short = vec![QkdKey::new(uuid::Uuid::nil(), Zeroizing::new(vec![1; 16]))];
    request.mode = Mode::Qaes;
    request.qkd_keys = &short;
    let err = seal(&request, &signer(), &randomness(), pt.as_slice(), Vec::new()).expect_err("short key");
    assert!(matches!(err, EnvelopeError::NotEnoughKeyMaterial { needed: 32, available: 16 }), "{err:?}");
}

#[test]
fn header_values_with_line_breaks_are_refused() {
    let mut routing = routing();
    routing.to = "bob@b.example\r\nBcc: eve@evil.example".into();
    let keys = keys_for(Mode::Pqc, 0);
    let mut request = SealRequest::new(Mode::Pqc, &routing, "a.example", 0);
    request.recipient_kem_key = Some(keys.kem.public_key());
    let err = seal(&request, &signer(), &randomness(), &b"x"[..], Vec::new()).expect_err("injection");
    assert!(matches!(err, EnvelopeError::InvalidParameter(_)), "{err:?}");
}

#[test]
fn link_ids_are_checked_up_front_and_carried_canonically() {
    let routing = routing();
    let keys = keys_for(Mode::Qaes, 0);
    let mut link = link();
    link.link_id = "link \"a\"".into();
    let mut request = SealRequest::new(Mode::Qaes, &routing, "a.example", 0);
    request.qkd_keys = &keys.qkd;
    request.link = Some(&link);
    let mut out = Vec::new();
    let err = seal(&request, &signer(), &randomness(), &b"x"[..], &mut out).expect_err("quote");
    assert!(matches!(err, EnvelopeError::InvalidParameter(_)), "{err:?}");
    assert!(out.is_empty(), "refused before writing");
    // Runs of spaces are canonicalised identically in the header and the certificate.
    let mut spaced = self::link();
    spaced.link_id = "link  a   b".into();
    request.link = Some(&spaced);
    seal(&request, &signer(), &randomness(), &b"x"[..], &mut out).expect("seal");
    let verified = verify_sealed_message(out.as_slice(), &signer().verifying_key()).expect("certificate");
    assert_eq!(verified.certificate.link_id.as_deref(), Some("link a b"));
    assert_eq!(verified.header.link_id.as_deref(), Some("link a b"));
}

#[test]
fn at_rest_blob_round_trips_and_hides_the_plaintext() {
    let key = DataKey::from_bytes(Zeroizing::new([9u8; 32]));
    for len in [0usize, 1, 15, 16, 17, 100] {
        let pt = inner_message(len);
        let params = AtRestParams { chunk_size: 16, nonce_prefix: [1, 2, 3, 4, 5, 6, 7] };
        let mut blob = Vec::new();
        assert_eq!(seal_at_rest(&key, &params, pt.as_slice(), &mut blob).expect("seal"), pt.len() as u64);
        assert_eq!(blob.len() as u64, 16 + stream_ciphertext_len(pt.len() as u64, 16));
        assert!(!contains(&blob, BODY_CANARY.as_bytes()));
        assert_eq!(&open_at_rest_to_vec(&key, blob.as_slice()).expect("open")[..], &pt[..]);
    }
}

#[test]
fn site_keys_export_and_reimport() {
    let site = SiteKeySet::generate("b.example/cert-1").expect("keys");
    let seed = site.kem.to_seed().expect("seed");
    let again = SiteKemSecretKey::from_seed(&seed).expect("from seed");
    assert_eq!(again.public_key().to_bytes(), site.kem.public_key().to_bytes());
    let pem = site.kem.public_key().to_pem();
    assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----\n"));
    assert_eq!(KemPublicKey::from_pem(&pem).expect("pem").to_bytes(), site.kem.public_key().to_bytes());
    let b64 = site.kem.public_key().to_base64();
    assert_eq!(
        KemPublicKey::from_base64(&b64).expect("b64").fingerprint(),
        site.kem.public_key().fingerprint()
    );
    let vk = site.signer.verifying_key();
    assert_eq!(CertificateVerifyingKey::from_pem(&vk.to_pem()).expect("pem"), vk);
    assert_eq!(CertificateVerifyingKey::from_base64(&vk.to_base64()).expect("b64"), vk);
    let signer_again = InMemorySigner::from_seed("b.example/cert-1", &site.signer.to_seed());
    assert_eq!(signer_again.verifying_key(), vk);
    // A key of one kind is not accepted as the other.
    assert!(KemPublicKey::from_pem(&vk.to_pem()).is_err());
    assert!(CertificateVerifyingKey::from_pem(&pem).is_err());
    assert!(KemPublicKey::from_bytes(&[0u8; 10]).is_err());
}
