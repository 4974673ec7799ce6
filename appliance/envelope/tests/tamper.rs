//! Every way of altering a sealed message (or blob) is detected and reported as not verifiable,
//! never as `Ok` with different plaintext.

mod common;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use common::*;
use qutemail_envelope::at_rest::{AtRestParams, DataKey, open_at_rest_to_vec, seal_at_rest};
use qutemail_envelope::*;
use zeroize::Zeroizing;

const CHUNK: usize = 64;
const CERT_MARKER: &str = "Content-Description: Quantum Secured certificate\r\n\r\n";

/// A sealed message taken apart at its ciphertext part, to be altered and put back together.
struct Parts {
    head: String,
    ciphertext: Vec<u8>,
    tail: String,
}

fn split(sealed: &[u8]) -> Parts {
    let text = String::from_utf8(sealed.to_vec()).expect("ASCII");
    let marker = "Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n";
    let start = text.find(marker).expect("ciphertext part") + marker.len();
    let end = start + text[start..].find("--qkd-").expect("boundary after ciphertext");
    let b64: String = text[start..end].chars().filter(|c| !c.is_whitespace()).collect();
    Parts {
        head: text[..start].to_string(),
        ciphertext: B64.decode(b64).expect("base64"),
        tail: text[end..].to_string(),
    }
}

fn join(parts: &Parts) -> Vec<u8> {
    let mut out = parts.head.clone();
    for line in B64.encode(&parts.ciphertext).as_bytes().chunks(76) {
        out.push_str(std::str::from_utf8(line).expect("ASCII"));
        out.push_str("\r\n");
    }
    out.push_str(&parts.tail);
    out.into_bytes()
}

fn sealed(mode: Mode, plaintext: &[u8]) -> (Vec<u8>, Keys) {
    let keys = keys_for(mode, plaintext.len());
    let (sealed, _) = seal_with(mode, plaintext, CHUNK, &keys);
    (sealed, keys)
}

/// Opening must fail with an error that says "not verifiable".
fn assert_not_verifiable(sealed: &[u8], keys: &Keys, what: &str) -> EnvelopeError {
    match open_with(sealed, keys) {
        Ok(_) => panic!("{what}: opened although altered"),
        Err(e) => {
            assert!(e.is_not_verifiable(), "{what}: {e:?} is not reported as not verifiable");
            assert!(e.to_string().contains("not verifiable"), "{what}: message {e}");
            e
        }
    }
}

fn replace_once(sealed: &[u8], from: &str, to: &str) -> Vec<u8> {
    let text = String::from_utf8(sealed.to_vec()).expect("ASCII");
    assert!(text.contains(from), "{from:?} not in message");
    text.replacen(from, to, 1).into_bytes()
}

#[test]
fn flipped_ciphertext_byte_is_detected_in_every_mode() {
    for mode in Mode::ALL {
        let pt = inner_message(300);
        let (sealed, keys) = sealed(mode, &pt);
        let mut parts = split(&sealed);
        for pos in [0, parts.ciphertext.len() / 2, parts.ciphertext.len() - 1] {
            let original = parts.ciphertext[pos];
            parts.ciphertext[pos] ^= 0x01;
            let e = assert_not_verifiable(&join(&parts), &keys, &format!("{mode}: byte {pos}"));
            assert!(matches!(e, EnvelopeError::AuthenticationFailed), "{mode}: {e:?}");
            parts.ciphertext[pos] = original;
        }
        assert_eq!(&open_with(&join(&parts), &keys).expect("restored").0[..], &pt[..]);
    }
}

#[test]
fn changed_bound_header_is_detected_in_every_mode() {
    for mode in Mode::ALL {
        let (sealed, keys) = sealed(mode, &inner_message(100));
        let mut changes = vec![
            ("To: Bob <bob@b.example>", "To: Eve <eve@b.example>"),
            ("Date: Wed, 25 Nov 2026 12:00:00", "Date: Thu, 26 Nov 2026 12:00:00"),
            ("Cc: dave@b.example", "Cc: mallory@b.example"),
            ("Message-ID: <2026", "Message-ID: <1999"),
        ];
        if mode.uses_qkd() {
            changes.push(("X-QKD-Link-ID: link-a-b", "X-QKD-Link-ID: link-a-c"));
            changes.push(("X-QKD-Source-KME: KME-A", "X-QKD-Source-KME: KME-X"));
        } else {
            changes.push(("X-QKD-Chunk-Size: 64", "X-QKD-Chunk-Size: 65"));
        }
        for (from, to) in changes {
            let altered = replace_once(&sealed, from, to);
            let e = assert_not_verifiable(&altered, &keys, &format!("{mode}: {from}"));
            assert!(matches!(e, EnvelopeError::AuthenticationFailed), "{mode} {from}: {e:?}");
        }
        // Dropping a bound header is a change too.
        let dropped = replace_once(&sealed, "Cc: dave@b.example\r\n", "");
        assert_not_verifiable(&dropped, &keys, &format!("{mode}: Cc removed"));
    }
}

#[test]
fn relay_changes_to_unbound_headers_and_folding_are_accepted() {
    let pt = inner_message(100);
    let (sealed, keys) = sealed(Mode::Hybrid, &pt);
    let mut relayed = b"Received: from a.example by mx.b.example; Wed, 25 Nov 2026 12:00:01 +0000\r\n\
        DKIM-Signature: v=1; a=ed25519-sha256; d=a.example; b=abc\r\nReturn-Path: <alice@a.example>\r\n"
        .to_vec();
    relayed.extend_from_slice(&sealed);
    // A relay re-folds the To header and converts CRLF to LF.
    let refolded =
        replace_once(&relayed, "To: Bob <bob@b.example>, Carol", "To: Bob <bob@b.example>,\r\n\t  Carol");
    let lf: Vec<u8> = String::from_utf8(refolded).expect("ASCII").replace("\r\n", "\n").into_bytes();
    let (opened, report) = open_with(&lf, &keys).expect("relay changes are not tampering");
    assert_eq!(&opened[..], &pt[..]);
    assert!(matches!(report.certificate, CertificateCheck::Verified(_)));
}

#[test]
fn duplicated_or_unknown_qkd_headers_are_refused() {
    let (sealed, keys) = sealed(Mode::Qaes, &inner_message(10));
    let dup =
        replace_once(&sealed, "X-QKD-Secure: True\r\n", "X-QKD-Secure: True\r\nTo: eve@evil.example\r\n");
    assert!(matches!(assert_not_verifiable(&dup, &keys, "duplicate To"), EnvelopeError::Malformed(_)));
    let unknown =
        replace_once(&sealed, "X-QKD-Secure: True\r\n", "X-QKD-Secure: True\r\nX-QKD-Priority: high\r\n");
    assert!(matches!(assert_not_verifiable(&unknown, &keys, "unknown header"), EnvelopeError::Malformed(_)));
    let not_env = replace_once(&sealed, "X-QKD-Secure: True\r\n", "");
    assert!(matches!(open_with(&not_env, &keys), Err(EnvelopeError::NotAnEnvelope(_))));
    let v2 = replace_once(&sealed, "X-QKD-Version: 1\r\n", "X-QKD-Version: 2\r\n");
    assert!(matches!(open_with(&v2, &keys), Err(EnvelopeError::UnsupportedVersion { .. })));
    let alg = replace_once(&sealed, "X-QKD-Algorithm: QKD-HKDF", "X-QKD-Algorithm: QKD-XKDF");
    assert!(matches!(open_with(&alg, &keys), Err(EnvelopeError::UnknownAlgorithm(_))));
    // Downgrade: claiming another mode with the same ciphertext fails too.
    let mode =
        replace_once(&sealed, "X-QKD-Algorithm: QKD-HKDF-SHA256", "X-QKD-Algorithm: MLKEM768-HKDF-SHA256");
    assert!(open_with(&mode, &keys).is_err());
}

#[test]
fn dropped_reordered_duplicated_and_truncated_chunks_are_detected() {
    for mode in [Mode::Qaes, Mode::Hybrid, Mode::Pqc] {
        // 5 chunks: 4 full ones of 64 bytes and a last one.
        let pt: Vec<u8> = (0..4 * CHUNK + 10).map(|i| i as u8).collect();
        let (sealed, keys) = sealed(mode, &pt);
        let parts = split(&sealed);
        let c = CHUNK + TAG_LEN;
        assert_eq!(parts.ciphertext.len(), 4 * c + 10 + TAG_LEN);
        let chunk = |i: usize| parts.ciphertext[i * c..((i + 1) * c).min(parts.ciphertext.len())].to_vec();
        let with =
            |ct: Vec<u8>| join(&Parts { head: parts.head.clone(), ciphertext: ct, tail: parts.tail.clone() });

        let dropped = [chunk(0), chunk(2), chunk(3), chunk(4)].concat();
        let e = assert_not_verifiable(&with(dropped), &keys, "dropped chunk");
        assert!(matches!(e, EnvelopeError::AuthenticationFailed), "{e:?}");

        let reordered = [chunk(1), chunk(0), chunk(2), chunk(3), chunk(4)].concat();
        assert_not_verifiable(&with(reordered), &keys, "reordered chunks");

        let duplicated = [chunk(0), chunk(0), chunk(1), chunk(2), chunk(3), chunk(4)].concat();
        assert_not_verifiable(&with(duplicated), &keys, "duplicated chunk");

        // Cut after a chunk boundary: every chunk present verifies, the final one is missing.
        for keep in 1..=4 {
            let truncated = parts.ciphertext[..keep * c].to_vec();
            let e = assert_not_verifiable(&with(truncated), &keys, "truncated at a boundary");
            assert!(matches!(e, EnvelopeError::Truncated { chunks } if chunks == keep as u64), "{e:?}");
        }
        // Cut inside a chunk.
        assert_not_verifiable(&with(parts.ciphertext[..2 * c + 20].to_vec()), &keys, "cut inside");
        // A non-final chunk passed off as final.
        let e =
            assert_not_verifiable(&with(parts.ciphertext[..2 * c - 1].to_vec()), &keys, "cut by one byte");
        assert!(matches!(e, EnvelopeError::AuthenticationFailed), "{e:?}");
        // Data after the final chunk joins it and breaks its tag.
        let extended = [parts.ciphertext.clone(), vec![0u8; 3]].concat();
        let e = assert_not_verifiable(&with(extended), &keys, "trailing data");
        assert!(matches!(e, EnvelopeError::AuthenticationFailed), "{e:?}");
        // The whole message cut off in the middle of the MIME text.
        let cut = parts.head.len() + 2 * 78; // after the second base64 line
        let e = assert_not_verifiable(&sealed[..cut], &keys, "message cut");
        assert!(matches!(e, EnvelopeError::Truncated { .. }), "{e:?}");
    }
}

#[test]
fn wrong_qkd_key_is_detected() {
    for mode in [Mode::Qaes, Mode::Hybrid, Mode::Otp] {
        let pt = inner_message(20);
        let (sealed, keys) = sealed(mode, &pt);
        // The receiver fetched another key than the envelope names.
        let mut wrong = keys_for(mode, pt.len());
        wrong.qkd[0] = qkd_key(99);
        let e = open_with(&sealed, &wrong).expect_err("another key");
        assert!(matches!(e, EnvelopeError::WrongKey { position: 0, .. }), "{mode}: {e:?}");
        // An attacker swaps the key ID in the header for another key the receiver holds.
        let id = keys.qkd[0].id().to_string();
        let other = qkd_key(99).id().to_string();
        let swapped = replace_once(&sealed, &id, &other);
        assert_not_verifiable(&swapped, &wrong, &format!("{mode}: key ID swapped"));
        // The right ID with other key bytes (a desynchronised kmd).
        let mut bad_bytes = keys_for(mode, pt.len());
        bad_bytes.qkd[0] = QkdKey::new(keys.qkd[0].id(), Zeroizing::new(vec![0xee; 32]));
        let e = assert_not_verifiable(&sealed, &bad_bytes, &format!("{mode}: key bytes"));
        assert!(matches!(e, EnvelopeError::AuthenticationFailed), "{e:?}");
        // Too few keys.
        let none = Keys { qkd: Vec::new(), kem: site_b_kem() };
        assert!(matches!(open_with(&sealed, &none), Err(EnvelopeError::KeyCountMismatch { .. })));
    }
}

#[test]
fn wrong_mlkem_secret_key_is_detected() {
    for mode in [Mode::Hybrid, Mode::Pqc] {
        let (sealed, keys) = sealed(mode, &inner_message(20));
        let wrong =
            Keys { qkd: keys.qkd.iter().map(|k| qkd_key(k.id().as_bytes()[0])).collect(), kem: other_kem() };
        let e = open_with(&sealed, &wrong).expect_err("other site key");
        assert!(matches!(e, EnvelopeError::WrongKemKey { .. }), "{mode}: {e:?}");
        // Rewriting the fingerprint to the wrong key's does not help: the secret differs and the
        // header is bound.
        let fp = hex::encode(site_b_kem().public_key().fingerprint());
        let other_fp = hex::encode(other_kem().public_key().fingerprint());
        let rewritten = replace_once(&sealed, &fp, &other_fp);
        let e = assert_not_verifiable(&rewritten, &wrong, &format!("{mode}: wrong ML-KEM key"));
        assert!(matches!(e, EnvelopeError::AuthenticationFailed), "{e:?}");
        let none = Keys { qkd: wrong.qkd, kem: other_kem() };
        let message = SealedMessage::read_header(sealed.as_slice()).expect("header");
        let e = message
            .open_to_vec(&OpenKeys { qkd_keys: &none.qkd, ..OpenKeys::default() })
            .expect_err("no key");
        assert!(matches!(e, EnvelopeError::MissingKey { .. }), "{e:?}");
    }
}

/// The certificate part of a message, decoded.
fn certificate_json(sealed: &[u8]) -> String {
    let text = String::from_utf8(sealed.to_vec()).expect("ASCII");
    let start = text.find(CERT_MARKER).expect("cert") + CERT_MARKER.len();
    let end = start + text[start..].find("--qkd-").expect("end");
    let b64: String = text[start..end].chars().filter(|c| !c.is_whitespace()).collect();
    String::from_utf8(B64.decode(b64).expect("base64")).expect("json")
}

fn with_certificate(sealed: &[u8], json: &str) -> Vec<u8> {
    let text = String::from_utf8(sealed.to_vec()).expect("ASCII");
    let start = text.find(CERT_MARKER).expect("cert") + CERT_MARKER.len();
    let end = start + text[start..].find("--qkd-").expect("end");
    let mut body = String::new();
    for line in B64.encode(json).as_bytes().chunks(76) {
        body.push_str(std::str::from_utf8(line).expect("ASCII"));
        body.push_str("\r\n");
    }
    format!("{}{}{}", &text[..start], body, &text[end..]).into_bytes()
}

fn cert_problem(sealed: &[u8], keys: &Keys) -> CertificateProblem {
    let key = signer().verifying_key();
    match verify_sealed_message(sealed, &key) {
        Err(EnvelopeError::CertificateNotVerifiable(p)) => {
            // Opening still proves the plaintext, but the certificate is reported broken.
            let (_, report) = open_with(sealed, keys).expect("plaintext itself is intact");
            assert_eq!(report.certificate, CertificateCheck::NotVerifiable(p.clone()));
            p
        }
        other => panic!("certificate accepted: {other:?}"),
    }
}

#[test]
fn forged_or_altered_certificates_are_not_verifiable() {
    let pt = inner_message(50);
    let (sealed, keys) = sealed(Mode::Hybrid, &pt);
    let key = signer().verifying_key();
    let report = verify_sealed_message(sealed.as_slice(), &key).expect("genuine certificate verifies");
    assert_eq!(report.certificate.qber_ppm, Some(21_500));
    assert_eq!(report.certificate.link_id.as_deref(), Some("link-a-b"));
    assert_eq!(report.header.mode, Mode::Hybrid);

    // Altered field: the signature breaks.
    let json = certificate_json(&sealed);
    let altered = with_certificate(&sealed, &json.replace("\"qber_ppm\":21500", "\"qber_ppm\":100"));
    assert_eq!(cert_problem(&altered, &keys), CertificateProblem::BadSignature);

    // Forged with another key claiming the same key ID.
    let mut signed = SignedCertificate::from_json(json.as_bytes()).expect("parses");
    let forger = InMemorySigner::from_seed("a.example/cert-1", &Zeroizing::new([0x99; 32]));
    signed = signed.certificate.clone().sign(&forger).expect("sign");
    let forged =
        with_certificate(&sealed, &String::from_utf8(signed.to_json().expect("json")).expect("utf8"));
    assert_eq!(cert_problem(&forged, &keys), CertificateProblem::BadSignature);

    // A genuine certificate of another message, transplanted.
    let (other, _) = sealed_other();
    let transplanted = with_certificate(&sealed, &certificate_json(&other));
    assert_eq!(cert_problem(&transplanted, &keys), CertificateProblem::CiphertextDigestMismatch);

    // Missing, or garbage.
    let garbage = with_certificate(&sealed, "{\"certificate\":1}");
    assert!(matches!(cert_problem(&garbage, &keys), CertificateProblem::Malformed(_)));

    // Offline check catches an altered ciphertext without any decryption key.
    let mut parts = split(&sealed);
    parts.ciphertext[5] ^= 0x80;
    let e = verify_sealed_message(join(&parts).as_slice(), &key).expect_err("digest");
    assert!(matches!(
        e,
        EnvelopeError::CertificateNotVerifiable(CertificateProblem::CiphertextDigestMismatch)
    ));
    // And an altered bound header.
    let e =
        verify_sealed_message(replace_once(&sealed, "KME-B", "KME-C").as_slice(), &key).expect_err("headers");
    assert!(matches!(e, EnvelopeError::CertificateNotVerifiable(CertificateProblem::HeaderDigestMismatch)));
    // The wrong sender key.
    let e = verify_sealed_message(sealed.as_slice(), &forger.verifying_key()).expect_err("other key");
    assert!(matches!(e, EnvelopeError::CertificateNotVerifiable(CertificateProblem::BadSignature)));
}

fn sealed_other() -> (Vec<u8>, Keys) {
    sealed(Mode::Hybrid, b"another message")
}

#[test]
fn any_single_byte_change_fails_or_changes_nothing() {
    // Exhaustive over a small message: flipping any bit of any byte of the sealed message either
    // makes opening fail or leaves the opened plaintext identical (bytes a relay may change
    // without harm, such as the preamble text or an unbound header). Never a panic, never other
    // plaintext.
    for mode in [Mode::Qaes, Mode::Otp] {
        let pt = inner_message(40);
        let (sealed, keys) = sealed(mode, &pt);
        for pos in 0..sealed.len() {
            let mut altered = sealed.clone();
            altered[pos] ^= 0x04;
            if let Ok((opened, _)) = open_with(&altered, &keys) {
                assert_eq!(&opened[..], &pt[..], "{mode}: byte {pos} changed the plaintext");
            }
        }
    }
}

#[test]
fn at_rest_tampering_is_detected() {
    let key = DataKey::from_bytes(Zeroizing::new([3u8; 32]));
    let params = AtRestParams { chunk_size: 16, nonce_prefix: [9; 7] };
    let pt = inner_message(30);
    let mut blob = Vec::new();
    seal_at_rest(&key, &params, pt.as_slice(), &mut blob).expect("seal");
    for pos in 0..blob.len() {
        let mut altered = blob.clone();
        altered[pos] ^= 0x01;
        let e = open_at_rest_to_vec(&key, altered.as_slice()).expect_err("altered blob");
        assert!(
            e.is_not_verifiable()
                || matches!(e, EnvelopeError::NotAnEnvelope(_) | EnvelopeError::UnsupportedVersion { .. }),
            "byte {pos}: {e:?}"
        );
    }
    let e = open_at_rest_to_vec(&key, &blob[..16 + 32]).expect_err("truncated");
    assert!(matches!(e, EnvelopeError::Truncated { chunks: 1 }), "{e:?}");
    let other = DataKey::from_bytes(Zeroizing::new([4u8; 32]));
    assert!(matches!(open_at_rest_to_vec(&other, blob.as_slice()), Err(EnvelopeError::AuthenticationFailed)));
}
