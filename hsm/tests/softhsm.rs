//! Integration tests against a real SoftHSM2 token (see `common` for how
//! each test gets its own token directory and process).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use common::{TestEnv, contains, isolated, kwp, mechanisms, read_tree, test_key};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use qutemail_hsm::{
    BlobMechanism, HsmConfig, HsmError, HsmKeyWrapper, PinSource, TokenSelector, WrapMechanism, WrappedKey,
};

const ODD_LENGTHS: [usize; 10] = [1, 7, 8, 9, 15, 16, 17, 31, 32, 4096];

fn open(env: &TestEnv, label: &str, mechanism: WrapMechanism, pool: usize) -> HsmKeyWrapper {
    HsmKeyWrapper::open(env.config(label, mechanism, pool)).unwrap_or_else(|e| panic!("open failed: {e}"))
}

fn assert_round_trip(hsm: &HsmKeyWrapper, key: &[u8]) -> WrappedKey {
    let blob = hsm.wrap(key).unwrap_or_else(|e| panic!("wrap of {} bytes failed: {e}", key.len()));
    let bytes = blob.to_bytes();
    assert_ne!(&bytes[..], key);
    if key.len() >= 8 {
        // (Shorter keys occur in any random blob by chance.)
        assert!(!contains(&bytes, key), "the blob contains the key");
    }
    let parsed = WrappedKey::from_bytes(&bytes).unwrap();
    let back = hsm.unwrap(&parsed).unwrap_or_else(|e| panic!("unwrap of {} bytes failed: {e}", key.len()));
    assert_eq!(&back[..], key, "round trip changed a {}-byte key", key.len());
    blob
}

/// Opens a separate `cryptoki` context on the test token (for set-up and
/// sabotage the wrapper must not know about).
fn side_channel() -> (Pkcs11, cryptoki::slot::Slot) {
    let ctx = Pkcs11::new(common::SOFTHSM_MODULE).unwrap();
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(())
        | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => panic!("C_Initialize: {e}"),
    }
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).map(|i| i.label() == common::TOKEN_LABEL).unwrap_or(false))
        .expect("test token");
    (ctx, slot)
}

#[test]
fn round_trip_both_mechanisms_odd_lengths() {
    isolated("round_trip_both_mechanisms_odd_lengths", |env| {
        for mechanism in mechanisms() {
            let hsm = open(env, &format!("kek-{}", mechanism.name()), mechanism, 2);
            for len in ODD_LENGTHS {
                let key = test_key(len as u64, len);
                let blob = assert_round_trip(&hsm, &key);
                let expected = match mechanism {
                    WrapMechanism::AesGcm => BlobMechanism::AesGcm,
                    _ => BlobMechanism::AesKeyWrapPad,
                };
                assert_eq!(blob.mechanism(), expected);
            }
            // A maximum-size key and a key of zero bytes.
            let big = test_key(99, qutemail_hsm::MAX_KEY_LEN);
            assert_round_trip(&hsm, &big);
            assert!(matches!(hsm.wrap(&[]), Err(HsmError::InvalidKey(_))));
            let too_big = vec![1u8; qutemail_hsm::MAX_KEY_LEN + 1];
            assert!(matches!(hsm.wrap(&too_big), Err(HsmError::InvalidKey(_))));
        }
    });
}

#[test]
fn gcm_blobs_are_randomised_and_key_wrap_blobs_deterministic() {
    isolated("gcm_blobs_are_randomised_and_key_wrap_blobs_deterministic", |env| {
        let key = test_key(1, 32);
        let gcm = open(env, "kek-gcm", WrapMechanism::AesGcm, 1);
        let (a, b) = (gcm.wrap(&key).unwrap(), gcm.wrap(&key).unwrap());
        assert_ne!(a, b, "AES-GCM must use a fresh IV per blob");
        assert_eq!(a.as_bytes().len(), 4 + 12 + 32 + 16);
        let kw = open(env, "kek-kw", kwp(), 1);
        let (c, d) = (kw.wrap(&key).unwrap(), kw.wrap(&key).unwrap());
        assert_eq!(c, d, "RFC 5649 is deterministic");
        assert_eq!(c.as_bytes().len(), 4 + 40 + 8);
    });
}

#[test]
fn wrapping_key_persists_across_reopen() {
    isolated("wrapping_key_persists_across_reopen", |env| {
        let mut blobs = Vec::new();
        for mechanism in mechanisms() {
            let hsm = open(env, &format!("persist-{}", mechanism.name()), mechanism, 2);
            for n in 0..20u64 {
                let key = test_key(n, 17 + n as usize);
                blobs.push((mechanism, key.clone(), hsm.wrap(&key).unwrap().to_bytes()));
            }
        }
        // Every wrapper is gone: the module has been finalised and unloaded.
        for round in 0..2 {
            for mechanism in mechanisms() {
                let hsm = open(env, &format!("persist-{}", mechanism.name()), mechanism, 1);
                for (m, key, bytes) in &blobs {
                    if *m == mechanism {
                        let back = hsm.unwrap(&WrappedKey::from_bytes(bytes).unwrap()).unwrap();
                        assert_eq!(&back[..], &key[..], "round {round}");
                    }
                }
            }
        }
        // Re-opening did not create a second key with the label.
        let (ctx, slot) = side_channel();
        let session = ctx.open_ro_session(slot).unwrap();
        session.login(UserType::User, Some(&AuthPin::new(common::USER_PIN.into()))).unwrap();
        for mechanism in mechanisms() {
            let label = format!("persist-{}", mechanism.name());
            let found = session
                .find_objects(&[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::Label(label.into_bytes()),
                ])
                .unwrap();
            assert_eq!(found.len(), 1);
            let attrs = session
                .get_attributes(
                    found[0],
                    &[
                        AttributeType::Token,
                        AttributeType::Sensitive,
                        AttributeType::Extractable,
                        AttributeType::Value,
                    ],
                )
                .unwrap();
            assert!(attrs.contains(&Attribute::Token(true)));
            assert!(attrs.contains(&Attribute::Sensitive(true)));
            assert!(attrs.contains(&Attribute::Extractable(false)));
            assert!(!attrs.iter().any(|a| matches!(a, Attribute::Value(_))), "wrapping key value readable");
        }
    });
}

#[test]
fn tampering_is_detected() {
    isolated("tampering_is_detected", |env| {
        for mechanism in mechanisms() {
            let hsm = open(env, &format!("tamper-{}", mechanism.name()), mechanism, 1);
            let other = open(env, &format!("tamper-other-{}", mechanism.name()), mechanism, 1);
            let key = test_key(7, 32);
            let blob = hsm.wrap(&key).unwrap();
            let bytes = blob.to_bytes();
            for pos in 0..bytes.len() {
                for flip in [0x01u8, 0x80] {
                    let mut t = bytes.clone();
                    t[pos] ^= flip;
                    let result = WrappedKey::from_bytes(&t).and_then(|w| hsm.unwrap(&w));
                    match result {
                        Err(
                            HsmError::UnwrapRejected { .. }
                            | HsmError::MalformedBlob(_)
                            | HsmError::MechanismMismatch { .. },
                        ) => {}
                        Ok(_) => panic!(
                            "{}: flipping bit {flip:#x} of byte {pos} went unnoticed",
                            mechanism.name()
                        ),
                        Err(e) => panic!("unexpected error for byte {pos}: {e}"),
                    }
                }
            }
            // Truncated / extended.
            for t in [&bytes[..bytes.len() - 8], &[&bytes[..], &[0u8; 8][..]].concat()[..]] {
                let result = WrappedKey::from_bytes(t).and_then(|w| hsm.unwrap(&w));
                assert!(
                    matches!(result, Err(HsmError::UnwrapRejected { .. } | HsmError::MalformedBlob(_))),
                    "{result:?}"
                );
            }
            // Wrapped under another key.
            let foreign = other.wrap(&key).unwrap();
            let err = hsm.unwrap(&foreign).unwrap_err();
            assert!(matches!(err, HsmError::UnwrapRejected { .. }), "{err}");
            assert!(err.to_string().contains(common::TOKEN_LABEL), "{err}");
            // The wrapper still works after all that.
            assert_round_trip(&hsm, &key);
        }
        // A blob of one mechanism given to a wrapper of the other.
        let gcm = open(env, "tamper-aes-gcm", WrapMechanism::AesGcm, 1);
        let kw = open(env, "tamper-aes-key-wrap-pad", kwp(), 1);
        let blob = gcm.wrap(&[5u8; 32]).unwrap();
        assert!(matches!(kw.unwrap(&blob), Err(HsmError::MechanismMismatch { .. })));
    });
}

#[test]
fn wrong_pin_is_reported() {
    isolated("wrong_pin_is_reported", |env| {
        let mut cfg = env.config("kek", kwp(), 1);
        cfg.pin = PinSource::File(env.write_pin_file("wrong.pin", "not-the-pin"));
        let err = HsmKeyWrapper::open(cfg).unwrap_err();
        assert!(matches!(err, HsmError::PinIncorrect { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("wrong PIN") && msg.contains(common::TOKEN_LABEL), "{msg}");
        assert!(msg.contains(common::SOFTHSM_MODULE), "{msg}");
        assert!(!msg.contains("not-the-pin"), "the PIN leaked into the message");

        // The right PIN afterwards works; so does the PIN from the environment.
        open(env, "kek", kwp(), 1);
        let mut cfg = env.config("kek", kwp(), 1);
        cfg.pin = PinSource::Env(common::PIN_ENV.into());
        assert_round_trip(&HsmKeyWrapper::open(cfg).unwrap(), b"via env");

        // Missing PIN sources.
        let mut cfg = env.config("kek", kwp(), 1);
        cfg.pin = PinSource::Env("QUTEMAIL_HSM_TEST_UNSET_VARIABLE".into());
        let err = HsmKeyWrapper::open(cfg).unwrap_err();
        assert!(matches!(err, HsmError::PinUnavailable { .. }), "{err:?}");
        assert!(err.to_string().contains("QUTEMAIL_HSM_TEST_UNSET_VARIABLE"));
        let mut cfg = env.config("kek", kwp(), 1);
        cfg.pin = PinSource::File(env.dir.join("no-such.pin"));
        assert!(matches!(HsmKeyWrapper::open(cfg), Err(HsmError::PinUnavailable { .. })));
    });
}

#[test]
fn missing_token_is_reported() {
    isolated("missing_token_is_reported", |env| {
        let mut cfg = env.config("kek", kwp(), 1);
        cfg.token = TokenSelector::Label("no-such-token".into());
        let err = HsmKeyWrapper::open(cfg).unwrap_err();
        assert!(matches!(err, HsmError::TokenNotFound { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("no-such-token") && msg.contains(common::SOFTHSM_MODULE), "{msg}");
        assert!(msg.contains(common::TOKEN_LABEL) && msg.contains(common::OTHER_TOKEN_LABEL), "{msg}");

        let mut cfg = env.config("kek", kwp(), 1);
        cfg.token = TokenSelector::Serial("0000000000000000".into());
        assert!(matches!(HsmKeyWrapper::open(cfg), Err(HsmError::TokenNotFound { .. })));

        // Selecting by serial works, and picks the right token.
        let (ctx, slot) = side_channel();
        let serial = ctx.get_token_info(slot).unwrap().serial_number().to_string();
        ctx.finalize().unwrap();
        let mut cfg = env.config("kek", kwp(), 1);
        cfg.token = TokenSelector::Serial(serial.clone());
        let hsm = HsmKeyWrapper::open(cfg).unwrap();
        let report = hsm.health_check().unwrap();
        assert_eq!(report.token_label, common::TOKEN_LABEL);
        assert_eq!(report.token_serial, serial);
    });
}

#[test]
fn missing_module_is_reported() {
    isolated("missing_module_is_reported", |env| {
        let mut cfg = env.config("kek", kwp(), 1);
        cfg.module_path = PathBuf::from("/usr/lib/no-such-pkcs11-module.so");
        let err = HsmKeyWrapper::open(cfg).unwrap_err();
        assert!(matches!(err, HsmError::ModuleLoad { .. }), "{err:?}");
        assert!(err.to_string().contains("/usr/lib/no-such-pkcs11-module.so"), "{err}");

        // A file that is not a PKCS#11 module.
        let fake = env.dir.join("not-a-module.so");
        std::fs::write(&fake, b"definitely not ELF").unwrap();
        let mut cfg = env.config("kek", kwp(), 1);
        cfg.module_path = fake;
        assert!(matches!(HsmKeyWrapper::open(cfg), Err(HsmError::ModuleLoad { .. })));
    });
}

#[test]
fn mechanism_id_not_offered_is_reported() {
    isolated("mechanism_id_not_offered_is_reported", |env| {
        // SoftHSM 2.6.1 knows RFC 5649 only under the pre-v3.0 id.
        let cfg = env.config(
            "kek",
            WrapMechanism::AesKeyWrapPad { mechanism_id: qutemail_hsm::CKM_AES_KEY_WRAP_KWP_V3 },
            1,
        );
        let err = HsmKeyWrapper::open(cfg).unwrap_err();
        assert!(matches!(err, HsmError::MechanismUnsupported { .. }), "{err:?}");
        assert!(err.to_string().contains("0x210b"), "{err}");
    });
}

#[test]
fn unsuitable_or_duplicate_wrapping_keys_are_refused() {
    isolated("unsuitable_or_duplicate_wrapping_keys_are_refused", |env| {
        // A key made for one mechanism is not used for the other.
        drop(open(env, "made-for-gcm", WrapMechanism::AesGcm, 1));
        let err = HsmKeyWrapper::open(env.config("made-for-gcm", kwp(), 1)).unwrap_err();
        assert!(matches!(err, HsmError::WrappingKeyUnsuitable { .. }), "{err:?}");

        // An extractable key and a duplicate label, planted behind the wrapper's back.
        drop(open(env, "dup", kwp(), 1));
        {
            let (ctx, slot) = side_channel();
            let session = ctx.open_rw_session(slot).unwrap();
            session.login(UserType::User, Some(&AuthPin::new(common::USER_PIN.into()))).unwrap();
            for (label, extractable) in [("dup", false), ("leaky", true)] {
                session
                    .generate_key(
                        &Mechanism::AesKeyGen,
                        &[
                            Attribute::Token(true),
                            Attribute::Private(true),
                            Attribute::Sensitive(true),
                            Attribute::Extractable(extractable),
                            Attribute::ValueLen(32.into()),
                            Attribute::Wrap(true),
                            Attribute::Unwrap(true),
                            Attribute::Label(label.as_bytes().to_vec()),
                        ],
                    )
                    .unwrap();
            }
            drop(session);
            ctx.finalize().unwrap();
        }
        let err = HsmKeyWrapper::open(env.config("dup", kwp(), 1)).unwrap_err();
        assert!(matches!(err, HsmError::WrappingKeyAmbiguous { count: 2, .. }), "{err:?}");
        assert!(err.to_string().contains("\"dup\""), "{err}");
        let err = HsmKeyWrapper::open(env.config("leaky", kwp(), 1)).unwrap_err();
        assert!(matches!(err, HsmError::WrappingKeyUnsuitable { .. }), "{err:?}");
    });
}

#[test]
fn softhsm_reports_sensitive_values_as_an_empty_list() {
    // Pins down the SoftHSM 2.6.1 behaviour the unwrap path guards against:
    // reading CKA_VALUE of a sensitive key is not an error, the attribute is
    // just missing. The wrapper reads the value itself and treats both an
    // unavailable and an empty value as a failure.
    isolated("softhsm_reports_sensitive_values_as_an_empty_list", |_env| {
        let (ctx, slot) = side_channel();
        let session = ctx.open_rw_session(slot).unwrap();
        session.login(UserType::User, Some(&AuthPin::new(common::USER_PIN.into()))).unwrap();
        let key = session
            .generate_key(
                &Mechanism::AesKeyGen,
                &[Attribute::Token(false), Attribute::Sensitive(true), Attribute::ValueLen(32.into())],
            )
            .unwrap();
        let attrs = session.get_attributes(key, &[AttributeType::Value]).unwrap();
        assert!(attrs.is_empty(), "{attrs:?}");
    });
}

#[test]
fn token_removed_mid_run_fails_closed() {
    isolated("token_removed_mid_run_fails_closed", |env| {
        let wrappers: Vec<_> =
            mechanisms().into_iter().map(|m| open(env, &format!("removed-{}", m.name()), m, 2)).collect();
        let key = test_key(3, 32);
        let blobs: Vec<_> = wrappers.iter().map(|h| assert_round_trip(h, &key)).collect();
        for h in &wrappers {
            h.health_check().unwrap();
        }

        // Operations running while the token's storage disappears: each
        // either completes correctly or fails; none returns wrong data.
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        runtime.block_on(async {
            let mut tasks = Vec::new();
            for (i, h) in wrappers.iter().enumerate() {
                for t in 0..4u64 {
                    let h = h.clone();
                    tasks.push(tokio::spawn(async move {
                        let mut outcomes = (0usize, 0usize);
                        for n in 0..200u64 {
                            let key = test_key(1000 * t + n + (i as u64) * 100_000, 32);
                            match h.wrap_async(&key).await {
                                Ok(blob) => match h.unwrap_async(&blob).await {
                                    Ok(back) => {
                                        assert_eq!(&back[..], &key[..]);
                                        outcomes.0 += 1;
                                    }
                                    Err(_) => outcomes.1 += 1,
                                },
                                Err(_) => outcomes.1 += 1,
                            }
                        }
                        outcomes
                    }));
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            // The token's storage disappears at once (a rename is atomic;
            // deleting file by file races with SoftHSM recreating its lock
            // file), then is deleted for good.
            let gone = env.dir.join("tokens-gone");
            std::fs::rename(&env.token_dir, &gone).unwrap();
            remove_dir_with_retries(&gone);
            let (mut successes, mut failures) = (0, 0);
            for t in tasks {
                let (ok, failed) = t.await.unwrap();
                successes += ok;
                failures += failed;
            }
            eprintln!("while the token vanished: {successes} correct round trips, {failures} failures");
            assert!(failures > 0, "no operation noticed the token going away");
        });

        for (h, blob) in wrappers.iter().zip(&blobs) {
            for _ in 0..4 {
                let err = h.wrap(&key).unwrap_err();
                assert!(
                    matches!(
                        err,
                        HsmError::TokenUnavailable { .. }
                            | HsmError::TokenNotFound { .. }
                            | HsmError::WrappingKeyMissing { .. }
                    ),
                    "{err:?}"
                );
                let err = h.unwrap(blob).unwrap_err();
                assert!(
                    matches!(
                        err,
                        HsmError::TokenUnavailable { .. }
                            | HsmError::TokenNotFound { .. }
                            | HsmError::WrappingKeyMissing { .. }
                    ),
                    "{err:?}"
                );
            }
            let err = h.health_check().unwrap_err();
            assert!(err.to_string().contains(common::TOKEN_LABEL), "{err}");
        }
    });
}

#[test]
fn closed_sessions_fail_once_then_reconnect() {
    isolated("closed_sessions_fail_once_then_reconnect", |env| {
        let hsm = open(env, "reconnect", kwp(), 2);
        let key = test_key(11, 32);
        let blob = assert_round_trip(&hsm, &key);
        // Another part of the process closes every session on the slot:
        // the wrapper's sessions now get CKR_SESSION_HANDLE_INVALID.
        let (ctx, slot) = side_channel();
        close_all_sessions(slot);
        drop(ctx);
        let mut failures = 0;
        let mut successes = 0;
        for _ in 0..10 {
            match hsm.unwrap(&blob) {
                Ok(back) => {
                    assert_eq!(&back[..], &key[..]);
                    successes += 1;
                }
                Err(e) => {
                    assert!(matches!(e, HsmError::TokenUnavailable { .. }), "{e:?}");
                    assert!(e.to_string().contains("session"), "{e}");
                    failures += 1;
                }
            }
        }
        assert!((1..=2).contains(&failures), "each of the 2 sessions fails once: {failures}");
        assert_eq!(successes, 10 - failures);
        hsm.health_check().unwrap();
    });
}

fn remove_dir_with_retries(dir: &std::path::Path) {
    for attempt in 0.. {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => return,
            Err(e) if attempt < 20 => {
                eprintln!("retrying removal of {}: {e}", dir.display());
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => panic!("cannot remove {}: {e}", dir.display()),
        }
    }
}

/// Closes every PKCS#11 session of this process on the test token.
fn close_all_sessions(slot: cryptoki::slot::Slot) {
    // cryptoki has no safe wrapper for C_CloseAllSessions.
    // SAFETY: plain call into the already-initialised module with a valid slot id.
    let rv = unsafe {
        let lib = cryptoki_sys::Pkcs11::new(common::SOFTHSM_MODULE).unwrap();
        lib.C_CloseAllSessions(slot.id())
    };
    assert_eq!(rv, cryptoki_sys::CKR_OK);
}

#[test]
fn pin_changed_while_running_is_not_retried() {
    isolated("pin_changed_while_running_is_not_retried", |env| {
        let hsm = open(env, "pin-change", kwp(), 2);
        let blob = hsm.wrap(&[9u8; 32]).unwrap();
        let (ctx, slot) = side_channel();
        let change = |old: &str, new: &str| {
            let session = ctx.open_rw_session(slot).unwrap();
            session.set_pin(&AuthPin::new(old.into()), &AuthPin::new(new.into())).unwrap();
        };
        change(common::USER_PIN, "a-new-pin");
        close_all_sessions(slot);
        let mut pin_errors = 0;
        for _ in 0..6 {
            match hsm.unwrap(&blob) {
                Err(HsmError::PinIncorrect { .. }) => pin_errors += 1,
                Err(HsmError::TokenUnavailable { .. }) => {}
                other => panic!("expected a failure, got {other:?}"),
            }
        }
        assert!(pin_errors >= 4, "{pin_errors}");
        // Even with the old PIN back, the wrapper does not try again by
        // itself (a stream of wrong-PIN log-ins could lock the user PIN)...
        let session = ctx.open_rw_session(slot).unwrap();
        session.login(UserType::User, Some(&AuthPin::new("a-new-pin".into()))).unwrap();
        drop(session);
        change("a-new-pin", common::USER_PIN);
        close_all_sessions(slot);
        assert!(matches!(
            hsm.unwrap(&blob),
            Err(HsmError::PinIncorrect { .. } | HsmError::TokenUnavailable { .. })
        ));
        assert!(matches!(
            hsm.unwrap(&blob),
            Err(HsmError::PinIncorrect { .. } | HsmError::TokenUnavailable { .. })
        ));
        assert!(matches!(hsm.unwrap(&blob), Err(HsmError::PinIncorrect { .. })));
        // ...until it is re-opened.
        drop(hsm);
        drop(ctx);
        let hsm = open(env, "pin-change", kwp(), 2);
        assert_eq!(&hsm.unwrap(&blob).unwrap()[..], &[9u8; 32]);
    });
}

#[test]
fn concurrent_tasks_all_round_trip() {
    isolated("concurrent_tasks_all_round_trip", |env| {
        const TASKS: u64 = 8;
        const OPS: u64 = 500;
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap();
        for mechanism in mechanisms() {
            let cfg = env.config(&format!("conc-{}", mechanism.name()), mechanism, 4);
            let hsm = runtime.block_on(HsmKeyWrapper::open_async(cfg)).unwrap();
            let seen = runtime.block_on(async {
                let mut tasks = Vec::new();
                for t in 0..TASKS {
                    let hsm = hsm.clone();
                    tasks.push(tokio::spawn(async move {
                        let mut blobs = Vec::with_capacity(OPS as usize);
                        for n in 0..OPS {
                            let key = test_key(t * OPS + n, 16 + (n % 33) as usize);
                            let blob = hsm.wrap_async(&key).await.unwrap();
                            let back = hsm.unwrap_async(&blob).await.unwrap();
                            assert_eq!(&back[..], &key[..]);
                            blobs.push(blob.into_bytes());
                        }
                        blobs
                    }));
                }
                let mut all = HashSet::new();
                for t in tasks {
                    all.extend(t.await.unwrap());
                }
                all
            });
            assert_eq!(seen.len() as u64, TASKS * OPS, "distinct keys gave identical blobs");
            runtime.block_on(hsm.health_check_async()).unwrap();
        }
        // Blocking callers on plain threads share the same pool.
        let hsm = Arc::new(open(env, "conc-threads", kwp(), 4));
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let hsm = hsm.clone();
                s.spawn(move || {
                    for n in 0..100 {
                        assert_round_trip(&hsm, &test_key(t * 1000 + n, 32));
                    }
                });
            }
        });
    });
}

#[test]
fn token_files_never_contain_raw_keys() {
    isolated("token_files_never_contain_raw_keys", |env| {
        let mut keys = Vec::new();
        for mechanism in mechanisms() {
            let hsm = open(env, &format!("scan-{}", mechanism.name()), mechanism, 2);
            for n in 0..100u64 {
                for len in [1usize, 17, 32, 4096] {
                    let key = test_key(n * 10_000 + len as u64, len);
                    let blob = hsm.wrap(&key).unwrap();
                    assert_eq!(&hsm.unwrap(&blob).unwrap()[..], &key[..]);
                    keys.push(key);
                }
            }
            hsm.health_check().unwrap();
        }
        // After the wrappers are gone (module finalised, everything flushed).
        let files = read_tree(&env.token_dir);
        assert!(files.len() >= 3, "token directory unexpectedly empty: {files:?}");
        for (path, bytes) in &files {
            for key in &keys {
                // Whole short keys, and 16-byte windows of long ones.
                let probe = &key[..key.len().min(16)];
                if probe.len() >= 8 {
                    assert!(!contains(bytes, probe), "{} contains raw key bytes", path.display());
                }
            }
        }
    });
}

#[test]
fn config_from_toml_opens() {
    isolated("config_from_toml_opens", |env| {
        let text = format!(
            "module_path = {module:?}\n\
             token = {{ label = {label:?} }}\n\
             pin = {{ file = {pin:?} }}\n\
             wrapping_key_label = \"from-toml\"\n\
             mechanism = {{ kind = \"aes-key-wrap-pad\", mechanism_id = 0x210A }}\n\
             pool_size = 3\n",
            module = common::SOFTHSM_MODULE,
            label = common::TOKEN_LABEL,
            pin = env.pin_file.display().to_string(),
        );
        let cfg: HsmConfig = toml::from_str(&text).unwrap();
        let hsm = HsmKeyWrapper::open(cfg).unwrap();
        assert_round_trip(&hsm, b"0123456789abcdef0123456789abcdef");
        let report = hsm.health_check().unwrap();
        assert_eq!(report.wrapping_key_label, "from-toml");
        assert_eq!(report.mechanism, "aes-key-wrap-pad");
        assert!(!format!("{hsm:?}").contains(common::USER_PIN));
    });
}
