//! The vault over a real SoftHSM token: site keys created once and found again, refused when
//! tampered with; at-rest sealing round trips and detects damage; nothing secret on disk.

use qutemail_hsm::HsmKeyWrapper;
use qutemail_hsm::testing::{SoftHsmEnv, isolated};
use qutemail_vault::{MailVault, Protection, SiteDirectory, SiteKeys, StoredKind, VaultError, VaultSettings};

const TOKEN: &str = "gateway";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

async fn hsm(env: &SoftHsmEnv) -> HsmKeyWrapper {
    HsmKeyWrapper::open_async(env.config(TOKEN, "gateway-kek")).await.unwrap()
}

#[test]
fn site_keys_are_created_once_and_refused_when_tampered_with() {
    isolated("site_keys_are_created_once_and_refused_when_tampered_with", &[TOKEN], |env| {
        runtime().block_on(async {
            let hsm = hsm(env).await;
            let path = env.dir.join("site-keys.json");
            let first = SiteKeys::load_or_create(&path, "a.example", &hsm).await.unwrap();
            let again = SiteKeys::load_or_create(&path, "a.example", &hsm).await.unwrap();
            assert_eq!(first.card(), again.card(), "the second start finds the same keys");
            assert_eq!(first.card().domain, "a.example");
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600);
            }

            // Another site's name: refused.
            let e = SiteKeys::load_or_create(&path, "b.example", &hsm).await.unwrap_err();
            assert!(e.to_string().contains("belong to \"a.example\""), "{e}");

            // A public key swapped for another site's: refused, the wrapped secrets disagree.
            let other = env.dir.join("other.json");
            let other_card = SiteKeys::load_or_create(&other, "a.example", &hsm).await.unwrap().card();
            let mut file: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            file["kem_public_key"] = other_card.kem_public_key.clone().into();
            std::fs::write(&path, serde_json::to_vec(&file).unwrap()).unwrap();
            let e = SiteKeys::load_or_create(&path, "a.example", &hsm).await.unwrap_err();
            assert!(e.to_string().contains("do not match"), "{e}");

            // A wrapped seed damaged: the HSM refuses to unwrap it.
            let mut file: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&other).unwrap()).unwrap();
            let mut wrapped = file["wrapped_signing_seed"].as_str().unwrap().to_owned();
            let last = wrapped.pop().unwrap();
            wrapped.push(if last == 'A' { 'Q' } else { 'A' });
            file["wrapped_signing_seed"] = wrapped.into();
            std::fs::write(&other, serde_json::to_vec(&file).unwrap()).unwrap();
            assert!(SiteKeys::load_or_create(&other, "a.example", &hsm).await.is_err());
        })
    });
}

#[test]
fn at_rest_mail_round_trips_and_damage_is_not_verifiable() {
    isolated("at_rest_mail_round_trips_and_damage_is_not_verifiable", &[TOKEN], |env| {
        runtime().block_on(async {
            let hsm = hsm(env).await;
            let keys = SiteKeys::load_or_create(&env.dir.join("keys.json"), "a.example", &hsm).await.unwrap();
            let vault =
                MailVault::new(VaultSettings::new("A-mail"), None, hsm, keys, SiteDirectory::default());

            // Without kmd or peers every domain gets `normal`, and QKD modes are refused.
            assert_eq!(vault.choose("b.example", None).unwrap(), Protection::Normal);
            assert!(matches!(
                vault.choose("b.example", Some(Protection::Hybrid)),
                Err(VaultError::Policy(_))
            ));

            let canary = "CANARY-AT-REST-7f3a";
            let plain: Vec<u8> = format!("Subject: {canary}\r\n\r\n{}", canary.repeat(40_000)).into_bytes();
            let (stored, len, blob) = vault
                .seal_at_rest(Protection::Normal, std::io::Cursor::new(plain.clone()), Vec::new())
                .await
                .unwrap();
            assert_eq!(len, plain.len() as u64);
            assert_eq!(stored.kind, StoredKind::AtRest);
            for bytes in [&blob, &stored.key_record] {
                assert!(!bytes.windows(canary.len()).any(|w| w == canary.as_bytes()));
            }
            let opened =
                vault.open_stored(&stored, std::io::Cursor::new(blob.clone()), Vec::new()).await.unwrap();
            assert_eq!(opened.output, plain);
            assert!(opened.certificate.is_none());

            // One flipped byte anywhere in the blob: not verifiable.
            for at in [20, blob.len() / 2, blob.len() - 1] {
                let mut bad = blob.clone();
                bad[at] ^= 0x01;
                let e = vault.open_stored(&stored, std::io::Cursor::new(bad), Vec::new()).await.unwrap_err();
                assert!(e.is_not_verifiable(), "byte {at}: {e}");
            }
            // Truncated: not verifiable.
            let e = vault
                .open_stored(&stored, std::io::Cursor::new(blob[..blob.len() - 100].to_vec()), Vec::new())
                .await
                .unwrap_err();
            assert!(e.is_not_verifiable(), "{e}");
            // Another message's key record: the data key does not open this blob.
            let (other, _, _) = vault
                .seal_at_rest(Protection::Normal, std::io::Cursor::new(b"x".to_vec()), Vec::new())
                .await
                .unwrap();
            let e =
                vault.open_stored(&other, std::io::Cursor::new(blob.clone()), Vec::new()).await.unwrap_err();
            assert!(e.is_not_verifiable(), "{e}");
            // A damaged key record: the HSM refuses to unwrap it.
            let mut damaged = stored.clone();
            let n = damaged.key_record.len();
            damaged.key_record[n - 3] ^= 0x40;
            assert!(vault.open_stored(&damaged, std::io::Cursor::new(blob), Vec::new()).await.is_err());
        })
    });
}

#[test]
fn stored_mail_is_presented_with_its_protection_and_damage_is_explained() {
    isolated("stored_mail_is_presented_with_its_protection_and_damage_is_explained", &[TOKEN], |env| {
        runtime().block_on(async {
            use qutemail_store::testing::TestStore;
            use qutemail_store::{Backend, NewAccount, Selection};
            use qutemail_vault::{AppendRequest, presentation_headers};

            let hsm = hsm(env).await;
            let keys = SiteKeys::load_or_create(&env.dir.join("keys.json"), "a.example", &hsm).await.unwrap();
            let vault =
                MailVault::new(VaultSettings::new("A-mail"), None, hsm, keys, SiteDirectory::default());
            let t = TestStore::new(Backend::Sqlite).await;
            let account = t
                .store
                .create_account(NewAccount {
                    address: "alice@a.example",
                    display_name: "Alice",
                    password: "correct horse",
                    quota_bytes: None,
                })
                .await
                .unwrap();
            let inbox = t.store.mailbox(account.id, "INBOX").await.unwrap();

            let canary = "CANARY-MAILROOM-51c2";
            let plain =
                format!("From: bob@a.example\r\nSubject: {canary}\r\n\r\nhello {canary}\r\n").into_bytes();
            let appended = vault
                .append_plain(
                    &t.store,
                    inbox.id,
                    Protection::Normal,
                    &AppendRequest::default(),
                    zeroize::Zeroizing::new(plain.clone()),
                )
                .await
                .unwrap();
            let meta = t.store.message(inbox.id, appended.uid).await.unwrap().unwrap();
            let shown = vault.present(&t.store, &meta).await.unwrap();
            assert!(shown.verified);
            let text = String::from_utf8_lossy(&shown.message).into_owned();
            assert!(text.starts_with("X-QKD-Secure: False\r\nX-QKD-Protection: normal\r\n"), "{text}");
            assert!(shown.message.ends_with(&plain), "the exact bytes follow the gateway's headers");
            // The size the store reports (RFC822.SIZE, POP3 LIST) is the size the client gets.
            assert_eq!(meta.size, shown.message.len() as u64);
            let stored = qutemail_vault::StoredProtection::from_store(&meta.protection).unwrap();
            assert_eq!(stored.kind, StoredKind::AtRest);
            assert!(presentation_headers(&stored).contains("X-QKD-Certificate: none"));

            // Nothing the store wrote holds the canary.
            for f in walk(t.dir.path()) {
                let bytes = std::fs::read(&f).unwrap();
                assert!(!bytes.windows(canary.len()).any(|w| w == canary.as_bytes()), "{}", f.display());
            }

            // The blob damaged on disk: the client gets an explanation and the sealed original.
            let blob = walk(&t.dir.path().join("blobs"))
                .into_iter()
                .find(|p| p.file_name().and_then(|n| n.to_str()) == Some(meta.blob_id.as_str()))
                .expect("the message's blob file");
            let mut bytes = std::fs::read(&blob).unwrap();
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0x20;
            std::fs::write(&blob, &bytes).unwrap();
            let all = t.store.fetch(inbox.id, &Selection::All).await.unwrap();
            let shown = vault.present(&t.store, &all[0]).await.unwrap();
            assert!(!shown.verified);
            let text = String::from_utf8_lossy(&shown.message).into_owned();
            assert!(text.contains("Subject: [not verifiable]"), "{text}");
            assert!(text.contains("filename=\"sealed-message.eml\""), "{text}");
        })
    });
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
