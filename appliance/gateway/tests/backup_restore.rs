//! `qutemailctl backup` and `qutemailctl restore` as an operator uses them after losing an
//! appliance: site 1 (SQLite store, its own SoftHSM token) takes real mail over SMTP submission
//! and MX from Python's smtplib, and folders and flags over IMAP; the backup is made while
//! `qutemail serve` runs. A fresh site 2 (new state directory, a NEW SoftHSM token in another
//! token directory that cannot open site 1's keys, same domain, a first-boot admin account)
//! refuses a wrong passphrase, a
//! bit-flipped archive and (later) a second restore, each with nothing written; the restore
//! proper brings back every message, flag and folder byte for byte over real IMAP, each user
//! seeing only their own, with every key re-wrapped by the new token and the same site card.
//! No byte on either site's disk nor in the archive holds the messages' plaintext canary.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{LOOPBACK_SMTP, Running, listener, smarthost_queue, write_tls};
use qutemail_e2e::files_under;
use qutemail_hsm::testing::init_tokens;
use qutemail_store::{DumpValue, Store, StoreConfig, StoreDump};

const TOKEN: &str = "gateway-backup";
const PASSPHRASE: &str = "correct horse battery staple 2026";

/// One site: its state directory and its own SoftHSM configuration (token directory).
struct Site {
    dir: PathBuf,
    softhsm_conf: PathBuf,
    config: PathBuf,
}

impl Site {
    /// A site on SQLite, or on the PostgreSQL database `postgres_url`.
    fn new(dir: &Path, relay: &str, postgres_url: Option<&str>) -> Site {
        std::fs::create_dir_all(dir).unwrap();
        let softhsm_conf = init_tokens(dir, &[TOKEN]);
        write_tls(dir, "backup test CA", &["localhost", "127.0.0.1"]);
        let config = dir.join("qutemail.toml");
        let mut text = common::site_config(dir, &dir.join("user.pin"), TOKEN);
        if let Some(url) = postgres_url {
            std::fs::write(dir.join("database-url"), url).unwrap();
            let sqlite = format!("sqlite = \"{}/mail.sqlite\"", dir.display());
            assert!(text.contains(&sqlite));
            text = text.replace(&sqlite, &format!("database_url_file = \"{}/database-url\"", dir.display()));
        }
        let text = text
            + LOOPBACK_SMTP
            + &smarthost_queue(relay)
            + r#"
[imap]
listen = "127.0.0.1:0"
"#;
        std::fs::write(&config, text).unwrap();
        Site { dir: dir.to_owned(), softhsm_conf, config }
    }

    /// Runs a binary of this crate against this site's token.
    fn run(&self, exe: &str, args: &[&str], stdin: Option<&str>) -> Output {
        use std::io::Write as _;
        let mut child = Command::new(exe)
            .args(args)
            .env("SOFTHSM2_CONF", &self.softhsm_conf)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).unwrap();
        }
        drop(input);
        child.wait_with_output().unwrap()
    }

    /// `qutemailctl --config CONFIG ARGS…`.
    fn ctl(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let config = self.config.to_str().unwrap();
        let mut all = vec!["--config", config];
        all.extend_from_slice(args);
        self.run(env!("CARGO_BIN_EXE_qutemailctl"), &all, stdin)
    }

    /// `qutemail site-card`: the public card peers keep.
    fn site_card(&self, config: &Path) -> Output {
        self.run(env!("CARGO_BIN_EXE_qutemail"), &["site-card", "--config", config.to_str().unwrap()], None)
    }

    fn add_user(&self, address: &str, password: &str) {
        let out = self.ctl(&["users", "add", address], Some(&format!("{password}\n")));
        assert!(out.status.success(), "users add {address}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Starts `qutemail serve` and waits for its READY line.
    fn serve(&self) -> (Running, String) {
        use std::io::BufRead as _;
        let mut child = Command::new(env!("CARGO_BIN_EXE_qutemail"))
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("SOFTHSM2_CONF", &self.softhsm_conf)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let running = Running(child, None);
        let mut ready = String::new();
        std::io::BufReader::new(stdout).read_line(&mut ready).unwrap();
        assert!(ready.starts_with("READY "), "{ready:?}");
        (running, ready)
    }

    /// The site's store, opened directly (as `qutemailctl` does).
    fn dump(&self) -> StoreDump {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let store =
                Store::open(StoreConfig::sqlite(self.dir.join("mail.sqlite"), self.dir.join("blobs")))
                    .await
                    .unwrap();
            let dump = store.dump().await.unwrap();
            store.close().await;
            dump
        })
    }

    /// Starts `qutemail serve`, reads both users' mailboxes over its IMAP, stops it.
    fn served_mailboxes(&self) -> [serde_json::Value; 2] {
        let (serving, ready) = self.serve();
        let mailboxes = both_mailboxes(&listener(&ready, "imap"), &self.dir.join("ca.pem"));
        drop(serving);
        mailboxes
    }

    fn blob_files(&self) -> usize {
        files_under(&self.dir.join("blobs/blobs")).len()
    }
}

fn python(args: &[&str]) -> String {
    let python = std::env::var("QUTEMAIL_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/backup_mail.py"))
        .args(args)
        .output()
        .expect("python3 (apt-get install -y python3)");
    assert!(out.status.success(), "backup_mail.py {}: {}", args[0], String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn snapshot(imap: &str, ca: &Path, user: &str, password: &str) -> serde_json::Value {
    serde_json::from_str(&python(&["snapshot", imap, ca.to_str().unwrap(), user, password])).unwrap()
}

/// Alice's and Bob's mailboxes (folders, flags, message bytes) read over IMAP at `imap`.
fn both_mailboxes(imap: &str, ca: &Path) -> [serde_json::Value; 2] {
    [snapshot(imap, ca, "alice@a.test", "alice-pass-1"), snapshot(imap, ca, "bob@a.test", "bob-pass-1")]
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Every message in a snapshot: (folder, entry).
fn messages(snap: &serde_json::Value) -> Vec<(String, serde_json::Value)> {
    snap.as_object()
        .unwrap()
        .iter()
        .flat_map(|(f, list)| list.as_array().unwrap().iter().map(move |m| (f.clone(), m.clone())))
        .collect()
}

/// The cells of `column` in every table that has it.
fn cells(dump: &StoreDump, column: &str) -> Vec<DumpValue> {
    dump.tables
        .iter()
        .filter_map(|t| t.column(column).map(|c| t.rows.iter().map(move |r| r[c].clone())))
        .flatten()
        .collect()
}

/// A dump with the cells that a restore legitimately changes (re-wrapped keys, re-issued blob
/// ids) blanked.
fn without_keys_and_blob_ids(dump: &StoreDump) -> StoreDump {
    let mut d = dump.clone();
    for t in &mut d.tables {
        for name in ["wrapped_key", "blob_id"] {
            if let Some(c) = t.column(name) {
                for r in &mut t.rows {
                    r[c] = DumpValue::Null;
                }
            }
        }
    }
    d
}

/// A loopback address nobody listens on: the smarthost, so mail for other domains waits in the
/// queue (and is backed up with it).
fn unused_address() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

#[test]
fn a_backup_taken_while_serving_restores_on_a_fresh_site_with_a_new_hsm_token() {
    let scratch = tempfile::tempdir().unwrap();
    let relay = unused_address();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    let canary = format!("CANARY-{}-{nanos}", std::process::id());

    // ---- Site 1: mail over real SMTP and IMAP, then a backup while it serves.
    let one = Site::new(&scratch.path().join("site1"), &relay, None);
    one.add_user("alice@a.test", "alice-pass-1");
    one.add_user("bob@a.test", "bob-pass-1");
    let (serving, ready) = one.serve();
    let addr = |name: &str| listener(&ready, name);
    let ca1 = one.dir.join("ca.pem");
    let populated = python(&[
        "populate",
        &addr("smtp-mx"),
        &addr("smtp-submission"),
        &addr("imap"),
        ca1.to_str().unwrap(),
        &canary,
    ]);
    assert_eq!(populated.trim(), "ok");
    let [alice_before, bob_before] = both_mailboxes(&addr("imap"), &ca1);
    let alice_messages = messages(&alice_before);
    assert!(alice_messages.iter().any(|(f, _)| f.contains("Projects/Z&APw-rich")), "{alice_before}");
    assert!(alice_messages.iter().any(|(_, m)| m["size"].as_u64().unwrap() > 3_000_000), "{alice_before}");
    assert!(alice_messages.iter().any(|(_, m)| m["flags"].to_string().contains("$Work")), "{alice_before}");
    assert_eq!(messages(&bob_before).len(), 2, "bob has exactly his own two messages: {bob_before}");

    let archive = scratch.path().join("a.test.qmbackup");
    let out = one.ctl(&["backup", "--out", archive.to_str().unwrap()], Some(&format!("{PASSPHRASE}\n")));
    assert!(out.status.success(), "backup: {}", stderr(&out));
    let summary = String::from_utf8_lossy(&out.stdout);
    eprintln!("{summary}");
    assert!(summary.contains("2 accounts"), "{summary}");
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&archive).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the archive is readable by its owner only");
    }
    assert!(!Path::new(&format!("{}.partial", archive.display())).exists());
    // An existing archive is not replaced without --force.
    let out = one.ctl(&["backup", "--out", archive.to_str().unwrap()], Some(&format!("{PASSPHRASE}\n")));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));
    let site1_dump = one.dump();
    let site1_card = one.site_card(&one.config);
    assert!(site1_card.status.success(), "site-card: {}", stderr(&site1_card));
    drop(serving);

    // ---- Site 2: fresh state, a NEW token (own token directory), the same domain.
    let two = Site::new(&scratch.path().join("site2"), &relay, None);
    assert_ne!(
        std::fs::read_to_string(&one.softhsm_conf).unwrap(),
        std::fs::read_to_string(&two.softhsm_conf).unwrap(),
        "the two sites' SoftHSM configurations name different token directories"
    );
    // The new token cannot open site 1's HSM-wrapped keys: site 1's key file under site 2's HSM.
    let probe_dir = scratch.path().join("probe");
    std::fs::create_dir_all(&probe_dir).unwrap();
    std::fs::copy(one.dir.join("site-keys.json"), probe_dir.join("site-keys.json")).unwrap();
    let probe_config = probe_dir.join("qutemail.toml");
    std::fs::write(
        &probe_config,
        std::fs::read_to_string(&two.config).unwrap().replace(
            &format!("{}/site-keys.json", two.dir.display()),
            &format!("{}/site-keys.json", probe_dir.display()),
        ),
    )
    .unwrap();
    let probe = two.site_card(&probe_config);
    assert!(!probe.status.success(), "the new token unwrapped the old token's key");
    assert!(stderr(&probe).contains("HSM"), "refused by the HSM: {}", stderr(&probe));

    // As on a fresh appliance, first boot made an admin account (without mail).
    two.add_user("postmaster@a.test", "first-boot-pass");
    let fresh = two.dump();
    assert_eq!(fresh.count("accounts"), 1);

    // Wrong passphrase: refused, nothing written.
    let restore = |passphrase: &str, file: &Path| {
        two.ctl(&["restore", "--in", file.to_str().unwrap()], Some(&format!("{passphrase}\n")))
    };
    let out = restore("not the passphrase at all", &archive);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("wrong passphrase"), "{}", stderr(&out));
    assert_eq!(two.dump(), fresh, "the store is unchanged");
    assert_eq!(two.blob_files(), 0);
    assert!(!two.dir.join("site-keys.json").exists());

    // One flipped bit in the middle of the archive: refused, nothing left behind.
    let mut bytes = std::fs::read(&archive).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    let flipped = scratch.path().join("flipped.qmbackup");
    std::fs::write(&flipped, &bytes).unwrap();
    let out = restore(PASSPHRASE, &flipped);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("damaged or was altered"), "{}", stderr(&out));
    assert_eq!(two.dump(), fresh, "the store is unchanged");
    assert_eq!(two.blob_files(), 0, "blobs written before the damage was found are removed");
    assert!(!two.dir.join("site-keys.json").exists());

    // The restore proper.
    let out = restore(PASSPHRASE, &archive);
    assert!(out.status.success(), "restore: {}", stderr(&out));
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("account postmaster@a.test (without mail)"), "{summary}");
    let site2_dump = two.dump();
    assert_eq!(
        without_keys_and_blob_ids(&site2_dump),
        without_keys_and_blob_ids(&site1_dump),
        "every row (accounts, folders, flags, UIDs, queue) comes back"
    );
    let (keys1, keys2) = (cells(&site1_dump, "wrapped_key"), cells(&site2_dump, "wrapped_key"));
    assert_eq!(keys1.len(), keys2.len());
    assert!(
        keys1.len() >= 8,
        "messages, Sent copies and the queued message each have a key: {}",
        keys1.len()
    );
    assert!(
        keys1.iter().zip(&keys2).all(|(a, b)| a != b),
        "every message key is re-wrapped by the new token"
    );
    assert_eq!(site2_dump.count("queue_messages"), 1, "the message waiting for carol is still queued");

    // Restoring again onto the now non-empty store is refused and changes nothing.
    let out = restore(PASSPHRASE, &archive);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not empty"), "{}", stderr(&out));
    assert_eq!(two.dump(), site2_dump);

    // The same site card (peers' copies stay valid), from keys the new token wraps.
    let site2_card = two.site_card(&two.config);
    assert!(site2_card.status.success(), "site-card: {}", stderr(&site2_card));
    assert_eq!(site2_card.stdout, site1_card.stdout);
    assert_ne!(
        std::fs::read(one.dir.join("site-keys.json")).unwrap(),
        std::fs::read(two.dir.join("site-keys.json")).unwrap(),
        "the site key file is re-wrapped, not copied"
    );

    // Site 2 serves: each user reads exactly their mail, byte for byte, with flags and folders.
    let [alice_after, bob_after] = two.served_mailboxes();
    assert_eq!(alice_after, alice_before);
    assert_eq!(bob_after, bob_before);

    // No plaintext anywhere on disk: both sites' every file, and the archive.
    let mut scanned = 0u64;
    for path in files_under(&one.dir).into_iter().chain(files_under(&two.dir)).chain([archive.clone()]) {
        let bytes = std::fs::read(&path).unwrap();
        scanned += bytes.len() as u64;
        assert!(!contains(&bytes, canary.as_bytes()), "plaintext canary found in {}", path.display());
    }
    assert!(scanned > 6_000_000, "the scan covered the blobs and the archive ({scanned} bytes)");
}

/// The backup is a logical copy through the store's own SQL: a site on PostgreSQL backs up while
/// serving, and the archive restores onto a fresh SQLite site with a new token, every message
/// readable by its owner as before.
#[test]
fn a_postgresql_site_backs_up_while_serving_and_restores_onto_sqlite() {
    let scratch = tempfile::tempdir().unwrap();
    let relay = unused_address();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let database = runtime.block_on(qutemail_store::testing::postgres().create_database());
    let one = Site::new(&scratch.path().join("pg-site"), &relay, Some(&database.url));
    one.add_user("alice@a.test", "alice-pass-1");
    one.add_user("bob@a.test", "bob-pass-1");
    let (serving, ready) = one.serve();
    let addr = |name: &str| listener(&ready, name);
    let ca1 = one.dir.join("ca.pem");
    let args = [
        "populate",
        &addr("smtp-mx"),
        &addr("smtp-submission"),
        &addr("imap"),
        ca1.to_str().unwrap(),
        "CANARY-pg",
    ];
    assert_eq!(python(&args).trim(), "ok");
    let [alice_before, bob_before] = both_mailboxes(&addr("imap"), &ca1);
    let archive = scratch.path().join("pg.qmbackup");
    let out = one.ctl(&["backup", "--out", archive.to_str().unwrap()], Some(&format!("{PASSPHRASE}\n")));
    assert!(out.status.success(), "backup: {}", stderr(&out));
    drop(serving);

    let two = Site::new(&scratch.path().join("sqlite-site"), &relay, None);
    let out = two.ctl(&["restore", "--in", archive.to_str().unwrap()], Some(&format!("{PASSPHRASE}\n")));
    assert!(out.status.success(), "restore: {}", stderr(&out));
    let [alice_after, bob_after] = two.served_mailboxes();
    assert_eq!(alice_after, alice_before);
    assert_eq!(bob_after, bob_before);
    drop(database);
}
