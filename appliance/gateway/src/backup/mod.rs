//! `qutemailctl backup` and `qutemailctl restore`: the whole mail store of a site in one
//! encrypted file, restorable on a fresh appliance with a new HSM token, without any message or
//! key ever lying on a disk in clear.
//!
//! What a backup holds:
//! - every row of the mail store ([`qutemail_store::Store::dump`], one consistent snapshot taken
//!   while the gateway runs, on SQLite or PostgreSQL alike: a logical copy through the store's
//!   own SQL), each `wrapped_key` record with its data key re-wrapped from the HSM to the
//!   archive's key-wrapping key;
//! - every blob the snapshot references, copied after it as the sealed bytes it is (blobs are
//!   write-once; one expunged in between is left out together with its row);
//! - the site key file (`[site] site_keys`) and the web token key file, if present, their
//!   `wrapped_*` secrets re-wrapped likewise, so peers' copies of the site card stay valid.
//!
//! A fresh appliance has a new HSM token, whose wrapping key cannot open the old one's blobs:
//! that is why every key is re-wrapped (see [`rewrap`]) rather than copied. The archive format is
//! in [`archive`]; the passphrase is the only secret that opens it. Not in the archive: the
//! configuration, TLS and DKIM private keys, the HSM PIN (they belong to the appliance's
//! provisioning; see `docs/operations.md`).
//!
//! Restore refuses before writing anything when the passphrase is wrong, the file is not an
//! archive, the archive is for another domain or schema version, or the store holds mail. A
//! fresh appliance's store is not quite empty (first boot creates the admin account): accounts
//! without mail are replaced by the backup's, and the restore names them.
//! It writes blobs as they are authenticated and the rows in one transaction at the end; any
//! failure on the way (a damaged chunk, a digest that does not match the manifest) deletes the
//! blobs already written, so the store stays empty.

pub mod archive;
pub mod rewrap;

use std::collections::{BTreeMap, HashSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use qutemail_envelope::at_rest::{self, AtRestParams};
use qutemail_hsm::HsmKeyWrapper;
use qutemail_store::{BlobId, DumpTable, DumpValue, Store, StoreDump};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use zeroize::Zeroizing;

use crate::config::GatewayConfig;
use crate::secret_input::{Confirm, read_secret_line};
use archive::{ArchiveKeys, Header, KdfParams, tag};
use rewrap::Direction;

/// Shortest passphrase a backup accepts: it is the only thing protecting every message key.
pub const MIN_PASSPHRASE_CHARS: usize = 12;

/// Largest record body other than a blob (store dump, key file, manifest) a restore reads
/// into memory.
const MAX_METADATA_RECORD: u64 = 1 << 32;

/// Size of the pipe between the async side and the AES-GCM thread.
const PIPE: usize = 256 * 1024;

/// What went wrong, in the operator's terms.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackupError {
    /// The backup file exists and `--force` was not given.
    #[error("{} already exists; choose another file or pass --force to replace it", .0.display())]
    OutputExists(PathBuf),
    /// The passphrase is too short, empty or unreadable.
    #[error("passphrase: {0}")]
    Passphrase(String),
    /// The passphrase does not open this archive (or its header was altered).
    #[error(
        "wrong passphrase: it does not open this backup (or the archive's header was altered); nothing was \
         restored"
    )]
    WrongPassphrase,
    /// The file is not a backup this build reads.
    #[error("not a QuteMail backup archive: {0}")]
    NotAnArchive(String),
    /// The archive failed authentication or is incomplete.
    #[error("the backup archive is damaged or was altered ({0}); nothing was restored")]
    Damaged(String),
    /// The archive is of another site.
    #[error(
        "the backup is of site {archive:?} but this configuration is for {configured:?}; restore it on a site \
         configured with the same domain"
    )]
    DomainMismatch {
        /// The archive's domain.
        archive: String,
        /// `[site] domain`.
        configured: String,
    },
    /// The archive was made by a build with another store schema.
    #[error(
        "the backup has mail store schema version {archive}, this build has {this}; restore it with the release \
         that made it, then upgrade"
    )]
    SchemaMismatch {
        /// The archive's version.
        archive: i64,
        /// This build's.
        this: i64,
    },
    /// Restore needs a store without mail.
    #[error(
        "the mail store of this site is not empty (it holds mail); restore only into a freshly installed site \
         (nothing was changed)"
    )]
    StoreNotEmpty,
    /// The configuration lacks what the command needs.
    #[error("configuration: {0}")]
    Config(String),
    /// The mail store could not be opened.
    #[error("opening the mail store: {0:#}")]
    OpenStore(anyhow::Error),
    /// The mail store failed.
    #[error("mail store: {0}")]
    Store(#[from] qutemail_store::StoreError),
    /// The HSM failed or refused.
    #[error("HSM: {0}")]
    Hsm(qutemail_hsm::HsmError),
    /// A stored key record has an unknown layout.
    #[error("a stored message key record is unusable: {0}")]
    KeyRecord(String),
    /// A key file is unusable.
    #[error("key file {name}: {reason}")]
    KeyFile {
        /// Which one.
        name: String,
        /// What is wrong.
        reason: String,
    },
    // The cause is part of these messages and deliberately not a `source()`: printed as an
    // error chain (`{:#}`), it would be said twice.
    /// A file could not be read or written.
    #[error("{what} {}: {cause}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        cause: std::io::Error,
    },
    /// The archive could not be written (e.g. the disk is full).
    #[error("writing the backup {}: {cause}", path.display())]
    WriteArchive {
        /// The file being written.
        path: PathBuf,
        /// What failed.
        cause: qutemail_envelope::EnvelopeError,
    },
    /// A bug or a failed worker.
    #[error("internal error: {0}")]
    Internal(String),
}

fn io<'p>(what: &'static str, path: &'p Path) -> impl FnOnce(std::io::Error) -> BackupError + 'p {
    move |cause| BackupError::Io { what, path: path.to_owned(), cause }
}

/// Who made the archive; the first record, so a restore refuses a wrong site before writing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveInfo {
    /// The site's mail domain.
    pub domain: String,
    /// The mail store schema version.
    pub schema_version: i64,
    /// When the snapshot was taken (unix seconds).
    pub created_at: u64,
    /// The gateway version that made it.
    pub made_by: String,
}

/// The last record: counts and a SHA-256 per part, checked by restore.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Accounts.
    pub accounts: usize,
    /// Mailboxes.
    pub mailboxes: usize,
    /// Stored messages.
    pub messages: usize,
    /// Messages in the outbound queue.
    pub queued_messages: usize,
    /// Blobs in the archive.
    pub blobs: usize,
    /// Their bytes.
    pub blob_bytes: u64,
    /// Blobs expunged between the snapshot and their copy (left out with their rows).
    pub skipped_blobs: usize,
    /// Hex SHA-256 of the store record and of each key file record, by part name.
    pub parts: BTreeMap<String, String>,
    /// Hex SHA-256 of each blob, by its id in the archive.
    pub blob_sha256: BTreeMap<String, String>,
}

/// A key file in the archive.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFileRecord {
    /// `site-keys` or `web-token-key`.
    name: String,
    /// The file's text with its secrets archive-wrapped.
    text: String,
}

/// The store dump in the archive (JSON).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DumpRecord {
    schema_version: i64,
    tables: Vec<TableRecord>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TableRecord {
    name: String,
    columns: Vec<String>,
    rows: Vec<Vec<Option<Cell>>>,
}

#[derive(Debug, Serialize, Deserialize)]
enum Cell {
    #[serde(rename = "i")]
    Integer(i64),
    #[serde(rename = "t")]
    Text(String),
    #[serde(rename = "b")]
    Bytes(String),
}

impl DumpRecord {
    fn from_dump(dump: &StoreDump) -> Self {
        let tables = dump
            .tables
            .iter()
            .map(|t| TableRecord {
                name: t.name.clone(),
                columns: t.columns.clone(),
                rows: t
                    .rows
                    .iter()
                    .map(|r| {
                        r.iter()
                            .map(|v| match v {
                                DumpValue::Null => None,
                                DumpValue::Integer(i) => Some(Cell::Integer(*i)),
                                DumpValue::Text(s) => Some(Cell::Text(s.clone())),
                                DumpValue::Bytes(b) => Some(Cell::Bytes(B64.encode(b))),
                            })
                            .collect()
                    })
                    .collect(),
            })
            .collect();
        DumpRecord { schema_version: dump.schema_version, tables }
    }

    fn into_dump(self) -> Result<StoreDump, BackupError> {
        let mut tables = Vec::with_capacity(self.tables.len());
        for t in self.tables {
            let mut rows = Vec::with_capacity(t.rows.len());
            for r in t.rows {
                let mut row = Vec::with_capacity(r.len());
                for c in r {
                    row.push(match c {
                        None => DumpValue::Null,
                        Some(Cell::Integer(i)) => DumpValue::Integer(i),
                        Some(Cell::Text(s)) => DumpValue::Text(s),
                        Some(Cell::Bytes(b)) => DumpValue::Bytes(
                            B64.decode(b).map_err(|e| BackupError::Damaged(format!("store record: {e}")))?,
                        ),
                    });
                }
                rows.push(row);
            }
            tables.push(DumpTable { name: t.name, columns: t.columns, rows });
        }
        Ok(StoreDump { schema_version: self.schema_version, tables })
    }
}

/// What `backup` wrote.
#[derive(Debug, Clone)]
pub struct BackupReport {
    /// The archive.
    pub path: PathBuf,
    /// Its size in bytes.
    pub archive_bytes: u64,
    /// Its manifest.
    pub manifest: Manifest,
}

/// What `restore` brought back.
#[derive(Debug, Clone)]
pub struct RestoreReport {
    /// The archive's origin.
    pub info: ArchiveInfo,
    /// Its manifest.
    pub manifest: Manifest,
    /// Key files written (paths).
    pub key_files: Vec<PathBuf>,
    /// Key files that were there before and were moved aside (their new names).
    pub replaced: Vec<PathBuf>,
    /// Accounts without mail the store had before (a fresh appliance's first-boot admin), now
    /// replaced by the backup's accounts.
    pub replaced_accounts: Vec<String>,
}

/// Reads a passphrase: the first line of `file`, or of standard input when `None` (typed at a
/// terminal: without echo, and with `confirm` asked twice). The line break is not part of it.
pub fn read_passphrase(file: Option<&Path>, confirm: Confirm) -> Result<Zeroizing<String>, BackupError> {
    let mut text = Zeroizing::new(String::new());
    match file {
        Some(path) => {
            let bytes = Zeroizing::new(std::fs::read(path).map_err(io("reading the passphrase file", path))?);
            let s = std::str::from_utf8(&bytes)
                .map_err(|_| BackupError::Passphrase(format!("{} is not UTF-8 text", path.display())))?;
            text.push_str(s.lines().next().unwrap_or(""));
        }
        None => {
            text = read_secret_line("Backup passphrase: ", confirm)
                .map_err(|e| BackupError::Passphrase(format!("reading standard input: {e}")))?;
        }
    }
    if text.is_empty() {
        return Err(BackupError::Passphrase(
            "empty; give it on the first line of standard input or in --passphrase-file".into(),
        ));
    }
    Ok(text)
}

/// The key files a site has: (archive name, path).
fn key_file_paths(config: &GatewayConfig) -> Vec<(&'static str, PathBuf)> {
    // The same default as the web server's wiring (`wiring::web_deps`).
    let token_key = config
        .web
        .as_ref()
        .and_then(|w| w.token_key.clone())
        .unwrap_or_else(|| config.site.site_keys.with_file_name("web-token-key.json"));
    vec![("site-keys", config.site.site_keys.clone()), ("web-token-key", token_key)]
}

async fn derive(passphrase: &Zeroizing<String>, header: &Header) -> Result<ArchiveKeys, BackupError> {
    let pass = passphrase.clone();
    let header = header.clone();
    tokio::task::spawn_blocking(move || archive::derive_keys(pass.as_bytes(), &header))
        .await
        .map_err(|e| BackupError::Internal(e.to_string()))?
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn hex_sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Writes a backup of the site configured by `config` to `out` (through `out.partial`,
/// renamed into place once complete and synced; mode 0600). The gateway may keep running.
pub async fn backup(
    config: &GatewayConfig,
    passphrase: &Zeroizing<String>,
    out: &Path,
    force: bool,
    kdf: KdfParams,
) -> Result<BackupReport, BackupError> {
    if passphrase.chars().count() < MIN_PASSPHRASE_CHARS {
        return Err(BackupError::Passphrase(format!(
            "at least {MIN_PASSPHRASE_CHARS} characters are required (it alone protects every message key)"
        )));
    }
    if !force && out.exists() {
        return Err(BackupError::OutputExists(out.to_owned()));
    }
    let hsm = HsmKeyWrapper::open_async(config.hsm.clone()).await.map_err(BackupError::Hsm)?;
    let store = crate::wiring::store(config).await.map_err(BackupError::OpenStore)?;
    let mut header = Header::generate(kdf)?;
    let keys = derive(passphrase, &header).await?;
    header.check = keys.check;

    let partial = {
        let mut name = out.as_os_str().to_owned();
        name.push(".partial");
        PathBuf::from(name)
    };
    let result = write_archive(config, &hsm, &store, &keys, &header, &partial).await;
    store.close().await;
    let manifest = match result {
        Ok(m) => m,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    std::fs::rename(&partial, out).map_err(io("renaming the finished backup to", out))?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io("syncing the folder", dir))?;
    }
    let archive_bytes = std::fs::metadata(out).map_err(io("reading", out))?.len();
    tracing::info!(path = %out.display(), bytes = archive_bytes, messages = manifest.messages, "backup written");
    Ok(BackupReport { path: out.to_owned(), archive_bytes, manifest })
}

async fn write_archive(
    config: &GatewayConfig,
    hsm: &HsmKeyWrapper,
    store: &Store,
    keys: &ArchiveKeys,
    header: &Header,
    partial: &Path,
) -> Result<Manifest, BackupError> {
    // The snapshot first; blobs are write-once, so those it references are copied after it.
    let mut dump = store.dump().await?;
    for table in &mut dump.tables {
        let Some(col) = table.column("wrapped_key") else { continue };
        for row in &mut table.rows {
            // A key that could not be re-wrapped must stop the backup, never pass through
            // still wrapped by this HSM (a restore elsewhere could not open it).
            let DumpValue::Bytes(record) = &row[col] else {
                return Err(BackupError::KeyRecord(format!("a {} row has no wrapped key bytes", table.name)));
            };
            row[col] = DumpValue::Bytes(rewrap::record_to_archive(hsm, keys, record).await?);
        }
    }
    let mut key_files = Vec::new();
    for (name, path) in key_file_paths(config) {
        match std::fs::read(&path) {
            Ok(text) => {
                let text = rewrap::key_file(hsm, keys, name, &text, Direction::ToArchive).await?;
                key_files.push(KeyFileRecord {
                    name: name.to_owned(),
                    text: String::from_utf8(text).map_err(|e| BackupError::Internal(e.to_string()))?,
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && name != "site-keys" => {}
            Err(e) => return Err(io("reading the key file", &path)(e)),
        }
    }

    let _ = std::fs::remove_file(partial);
    let file = {
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(partial)
            .map_err(io("creating", partial))?
    };
    let mut file = std::io::BufWriter::new(file);
    file.write_all(&header.to_bytes()).map_err(io("writing", partial))?;
    let (mut pipe, plaintext) = tokio::io::duplex(PIPE);
    let plaintext = tokio_util::io::SyncIoBridge::new(plaintext);
    let data_key = keys.data_key();
    let sealer = tokio::task::spawn_blocking(move || {
        let params = AtRestParams::generate()?;
        at_rest::seal_at_rest(&data_key, &params, plaintext, &mut file)?;
        Ok::<_, qutemail_envelope::EnvelopeError>(file)
    });

    let records = write_records(store, &mut dump, key_files, &mut pipe, config).await;
    drop(pipe);
    let sealed = sealer.await.map_err(|e| BackupError::Internal(e.to_string()))?;
    // The sealing thread's failure (a full disk, say) is the cause; the pipe error the record
    // writer saw then is only its consequence.
    let file = sealed.map_err(|cause| BackupError::WriteArchive { path: partial.to_owned(), cause })?;
    let manifest = records?;
    let file = file.into_inner().map_err(|e| io("writing", partial)(e.into_error()))?;
    file.sync_all().map_err(io("syncing", partial))?;
    Ok(manifest)
}

async fn put_record(
    pipe: &mut (impl tokio::io::AsyncWrite + Unpin),
    tag: u8,
    body: &[u8],
) -> Result<(), BackupError> {
    let w = |e: std::io::Error| BackupError::Internal(format!("archive pipe: {e}"));
    pipe.write_all(&archive::record_head(tag, body.len() as u64)).await.map_err(w)?;
    pipe.write_all(body).await.map_err(w)
}

async fn write_records(
    store: &Store,
    dump: &mut StoreDump,
    key_files: Vec<KeyFileRecord>,
    pipe: &mut (impl tokio::io::AsyncWrite + Unpin),
    config: &GatewayConfig,
) -> Result<Manifest, BackupError> {
    let info = ArchiveInfo {
        domain: config.site.domain.to_ascii_lowercase(),
        schema_version: dump.schema_version,
        created_at: unix_now(),
        made_by: format!("qutemail {}", env!("CARGO_PKG_VERSION")),
    };
    put_record(pipe, tag::INFO, &json(&info)?).await?;
    let mut manifest = Manifest::default();
    for k in &key_files {
        let body = json(k)?;
        manifest.parts.insert(format!("key-file {}", k.name), hex_sha256(&body));
        put_record(pipe, tag::KEY_FILE, &body).await?;
    }

    // Blobs of every table that has them (mail, queue), as the sealed bytes they are.
    let mut missing: HashSet<String> = HashSet::new();
    let mut buf = vec![0u8; 128 * 1024];
    for table in &dump.tables {
        let (Some(id_col), Some(len_col)) = (table.column("blob_id"), table.column("blob_len")) else {
            continue;
        };
        for row in &table.rows {
            let (DumpValue::Text(id), DumpValue::Integer(len)) = (&row[id_col], &row[len_col]) else {
                return Err(BackupError::Internal(format!(
                    "{} row without a blob id and length",
                    table.name
                )));
            };
            let blob_id = BlobId::parse(id).map_err(|e| BackupError::Store(e.into()))?;
            let mut reader = match store.blobs().get(&blob_id).await {
                Ok(r) => r,
                Err(qutemail_store::BlobError::NotFound(_)) => {
                    // Expunged after the snapshot: it goes, with its row, as if expunged before.
                    missing.insert(id.clone());
                    continue;
                }
                Err(e) => return Err(BackupError::Store(e.into())),
            };
            let len =
                u64::try_from(*len).map_err(|_| BackupError::Internal("negative blob length".into()))?;
            put_record_head(pipe, tag::BLOB, 32 + len).await?;
            write_all(pipe, id.as_bytes()).await?;
            let mut hasher = Sha256::new();
            let mut copied = 0u64;
            loop {
                let n = reader.read(&mut buf).await.map_err(|e| BackupError::Io {
                    what: "reading the blob",
                    path: PathBuf::from(id),
                    cause: e,
                })?;
                if n == 0 {
                    break;
                }
                copied += n as u64;
                if copied > len {
                    break;
                }
                hasher.update(&buf[..n]);
                write_all(pipe, &buf[..n]).await?;
            }
            if copied != len {
                return Err(BackupError::Store(qutemail_store::StoreError::Corrupt(format!(
                    "blob {id} has {copied} bytes but its row says {len}"
                ))));
            }
            manifest.blobs += 1;
            manifest.blob_bytes += len;
            manifest.blob_sha256.insert(id.clone(), hex::encode(hasher.finalize()));
        }
    }
    manifest.skipped_blobs = missing.len();
    if !missing.is_empty() {
        drop_rows_without_blobs(dump, &missing);
    }
    manifest.accounts = dump.count("accounts");
    manifest.mailboxes = dump.count("mailboxes");
    manifest.messages = dump.count("messages");
    manifest.queued_messages = dump.count("queue_messages");
    let body = json(&DumpRecord::from_dump(dump))?;
    manifest.parts.insert("store".into(), hex_sha256(&body));
    put_record(pipe, tag::STORE, &body).await?;
    put_record(pipe, tag::MANIFEST, &json(&manifest)?).await?;
    put_record(pipe, tag::END, &[]).await?;
    pipe.shutdown().await.map_err(|e| BackupError::Internal(format!("archive pipe: {e}")))?;
    Ok(manifest)
}

/// Leaves out the rows whose blob vanished while being copied, and the queue recipients of a
/// queued message left out.
fn drop_rows_without_blobs(dump: &mut StoreDump, missing: &HashSet<String>) {
    let mut dropped_queue_ids = HashSet::new();
    for table in &mut dump.tables {
        let Some(col) = table.column("blob_id") else { continue };
        let id_col = table.column("id");
        table.rows.retain(|r| {
            let gone = matches!(&r[col], DumpValue::Text(id) if missing.contains(id));
            if gone
                && table.name == "queue_messages"
                && let Some(DumpValue::Integer(i)) = id_col.map(|c| &r[c])
            {
                dropped_queue_ids.insert(*i);
            }
            !gone
        });
    }
    if let Some(t) = dump.table_mut("queue_recipients")
        && let Some(col) = t.column("message_id")
    {
        t.rows.retain(|r| !matches!(&r[col], DumpValue::Integer(i) if dropped_queue_ids.contains(i)));
    }
}

async fn put_record_head(
    pipe: &mut (impl tokio::io::AsyncWrite + Unpin),
    tag: u8,
    len: u64,
) -> Result<(), BackupError> {
    write_all(pipe, &archive::record_head(tag, len)).await
}

async fn write_all(pipe: &mut (impl tokio::io::AsyncWrite + Unpin), bytes: &[u8]) -> Result<(), BackupError> {
    pipe.write_all(bytes).await.map_err(|e| BackupError::Internal(format!("archive pipe: {e}")))
}

fn json<T: Serialize>(value: &T) -> Result<Vec<u8>, BackupError> {
    serde_json::to_vec(value).map_err(|e| BackupError::Internal(format!("encoding a record: {e}")))
}

/// Restores the archive `input` into the site configured by `config`, whose store must hold no
/// mail (accounts without mail are replaced). Every key is re-wrapped by this site's HSM.
pub async fn restore(
    config: &GatewayConfig,
    passphrase: &Zeroizing<String>,
    input: &Path,
) -> Result<RestoreReport, BackupError> {
    let mut file = std::fs::File::open(input).map_err(io("opening the backup", input))?;
    let mut head = [0u8; archive::HEADER_LEN];
    std::io::Read::read_exact(&mut file, &mut head).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => BackupError::NotAnArchive("the file is too short".into()),
        _ => io("reading the backup", input)(e),
    })?;
    let header = Header::parse(&head)?;
    let keys = derive(passphrase, &header).await?;
    if !header.passphrase_matches(&keys) {
        return Err(BackupError::WrongPassphrase);
    }
    let hsm = HsmKeyWrapper::open_async(config.hsm.clone()).await.map_err(BackupError::Hsm)?;
    let store = crate::wiring::store(config).await.map_err(BackupError::OpenStore)?;
    let result = restore_into(config, &hsm, &store, &keys, file).await;
    store.close().await;
    result
}

async fn restore_into(
    config: &GatewayConfig,
    hsm: &HsmKeyWrapper,
    store: &Store,
    keys: &ArchiveKeys,
    file: std::fs::File,
) -> Result<RestoreReport, BackupError> {
    if store.holds_mail().await? {
        return Err(BackupError::StoreNotEmpty);
    }
    let (plaintext, mut pipe) = tokio::io::duplex(PIPE);
    let plaintext = tokio_util::io::SyncIoBridge::new(plaintext);
    let data_key = keys.data_key();
    let opener = tokio::task::spawn_blocking(move || {
        at_rest::open_at_rest(&data_key, std::io::BufReader::new(file), plaintext)
    });
    let mut written: Vec<BlobId> = Vec::new();
    let read = read_records(config, store, &mut pipe, &mut written).await;
    drop(pipe);
    let opened = opener.await.map_err(|e| BackupError::Internal(e.to_string()))?;
    // The opener's verdict on the archive comes first: a record that reads short is most often
    // the consequence of a chunk that failed authentication.
    let outcome = match (opened, read) {
        (Err(e), _) if e.is_not_verifiable() => Err(BackupError::Damaged(e.to_string())),
        (_, Err(e)) => Err(e),
        (Err(e), Ok(_)) => Err(BackupError::Damaged(e.to_string())),
        (Ok(_), Ok(parts)) => finish_restore(config, hsm, store, keys, parts).await,
    };
    if outcome.is_err()
        && !written.is_empty()
        && let Err(e) = store.blobs().delete(&written).await
    {
        tracing::warn!(error = %e, blobs = written.len(), "removing the blobs of a failed restore failed");
    }
    outcome
}

/// What the record stream gave, once it all verified.
struct Parts {
    info: ArchiveInfo,
    key_files: Vec<KeyFileRecord>,
    dump: DumpRecord,
    manifest: Manifest,
    /// Old blob id → (new blob id, hex SHA-256 of its bytes).
    blobs: BTreeMap<String, (BlobId, String)>,
}

async fn read_exact(pipe: &mut (impl AsyncRead + Unpin), buf: &mut [u8]) -> Result<(), BackupError> {
    pipe.read_exact(buf)
        .await
        .map(|_| ())
        .map_err(|e| BackupError::Damaged(format!("archive ends early: {e}")))
}

async fn read_records(
    config: &GatewayConfig,
    store: &Store,
    pipe: &mut (impl AsyncRead + Unpin + Send),
    written: &mut Vec<BlobId>,
) -> Result<Parts, BackupError> {
    let damaged = |m: String| BackupError::Damaged(m);
    let mut info: Option<ArchiveInfo> = None;
    let mut key_files = Vec::new();
    let mut dump = None;
    let mut manifest = None;
    let mut blobs = BTreeMap::new();
    let mut part_sha = BTreeMap::new();
    loop {
        let mut head = [0u8; archive::RECORD_HEAD_LEN];
        read_exact(pipe, &mut head).await?;
        let tag = head[0];
        let len =
            u64::from_be_bytes([head[1], head[2], head[3], head[4], head[5], head[6], head[7], head[8]]);
        if tag == tag::END {
            break;
        }
        if tag != tag::INFO && info.is_none() {
            return Err(damaged("the archive does not start with its origin record".into()));
        }
        if tag == tag::BLOB {
            let mut id = [0u8; 32];
            read_exact(pipe, &mut id).await?;
            let old = String::from_utf8_lossy(&id).into_owned();
            let len = len.checked_sub(32).ok_or_else(|| damaged("blob record too short".into()))?;
            let mut body = HashingReader { inner: (&mut *pipe).take(len), hasher: Sha256::new() };
            let stored = store.blobs().put(&mut body).await.map_err(|e| BackupError::Store(e.into()))?;
            written.push(stored.id.clone());
            if stored.len != len {
                return Err(damaged(format!("blob {old} ends early")));
            }
            blobs.insert(old, (stored.id, hex::encode(body.hasher.finalize())));
            continue;
        }
        if len > MAX_METADATA_RECORD {
            return Err(damaged(format!("record of {len} bytes")));
        }
        let mut body = vec![0u8; usize::try_from(len).map_err(|_| damaged("record too large".into()))?];
        read_exact(pipe, &mut body).await?;
        let parse_err = |what: &str, e: serde_json::Error| damaged(format!("{what} record: {e}"));
        match tag {
            tag::INFO => {
                let i: ArchiveInfo = serde_json::from_slice(&body).map_err(|e| parse_err("origin", e))?;
                if !i.domain.eq_ignore_ascii_case(&config.site.domain) {
                    return Err(BackupError::DomainMismatch {
                        archive: i.domain,
                        configured: config.site.domain.clone(),
                    });
                }
                if i.schema_version != qutemail_store::SCHEMA_VERSION {
                    return Err(BackupError::SchemaMismatch {
                        archive: i.schema_version,
                        this: qutemail_store::SCHEMA_VERSION,
                    });
                }
                info = Some(i);
            }
            tag::KEY_FILE => {
                let k: KeyFileRecord = serde_json::from_slice(&body).map_err(|e| parse_err("key file", e))?;
                part_sha.insert(format!("key-file {}", k.name), hex_sha256(&body));
                key_files.push(k);
            }
            tag::STORE => {
                part_sha.insert("store".to_owned(), hex_sha256(&body));
                dump = Some(serde_json::from_slice::<DumpRecord>(&body).map_err(|e| parse_err("store", e))?);
            }
            tag::MANIFEST => {
                manifest =
                    Some(serde_json::from_slice::<Manifest>(&body).map_err(|e| parse_err("manifest", e))?);
            }
            other => return Err(damaged(format!("unknown record type {other:#04x}"))),
        }
    }
    let mut rest = [0u8; 1];
    if pipe.read(&mut rest).await.map_err(|e| damaged(e.to_string()))? != 0 {
        return Err(damaged("data after the end record".into()));
    }
    let (Some(info), Some(dump), Some(manifest)) = (info, dump, manifest) else {
        return Err(damaged("the archive lacks its store or manifest record".into()));
    };
    // The manifest must describe exactly what arrived.
    if manifest.parts != part_sha {
        return Err(damaged("a part's SHA-256 differs from the manifest".into()));
    }
    let got: BTreeMap<&String, &String> = blobs.iter().map(|(k, (_, sha))| (k, sha)).collect();
    let want: BTreeMap<&String, &String> = manifest.blob_sha256.iter().collect();
    if got != want {
        return Err(damaged("a blob's SHA-256 differs from the manifest, or a blob is missing".into()));
    }
    Ok(Parts { info, key_files, dump, manifest, blobs })
}

async fn finish_restore(
    config: &GatewayConfig,
    hsm: &HsmKeyWrapper,
    store: &Store,
    keys: &ArchiveKeys,
    parts: Parts,
) -> Result<RestoreReport, BackupError> {
    let Parts { info, key_files, dump, manifest, blobs } = parts;
    let mut dump = dump.into_dump()?;
    for table in &mut dump.tables {
        let key_col = table.column("wrapped_key");
        let blob_col = table.column("blob_id");
        for row in &mut table.rows {
            if let Some(c) = key_col {
                let DumpValue::Bytes(record) = &row[c] else {
                    return Err(BackupError::Damaged(format!(
                        "a {} row has no wrapped key bytes",
                        table.name
                    )));
                };
                row[c] = DumpValue::Bytes(rewrap::record_from_archive(hsm, keys, record).await?);
            }
            if let Some(c) = blob_col {
                let DumpValue::Text(old) = &row[c] else {
                    return Err(BackupError::Damaged(format!("{} row without a blob id", table.name)));
                };
                let (new, _) = blobs.get(old).ok_or_else(|| {
                    BackupError::Damaged(format!(
                        "{} row names blob {old}, which is not in the archive",
                        table.name
                    ))
                })?;
                row[c] = DumpValue::Text(new.as_str().to_owned());
            }
        }
    }
    // Key files are re-wrapped before the store is written, so the only step that can fail after
    // the commit is writing them.
    let paths = key_file_paths(config);
    let mut files = Vec::new();
    for k in &key_files {
        let Some((_, path)) = paths.iter().find(|(n, _)| *n == k.name) else {
            return Err(BackupError::Damaged(format!("unknown key file {:?}", k.name)));
        };
        let text = rewrap::key_file(hsm, keys, &k.name, k.text.as_bytes(), Direction::FromArchive).await?;
        files.push((path.clone(), text));
    }
    let replaced_accounts = store.load_dump(&dump).await.map_err(|e| match e {
        qutemail_store::StoreError::NotEmpty { .. } => BackupError::StoreNotEmpty,
        other => BackupError::Store(other),
    })?;
    let mut report =
        RestoreReport { info, manifest, key_files: Vec::new(), replaced: Vec::new(), replaced_accounts };
    for (path, text) in files {
        if path.exists() {
            // A fresh image may have made its own site keys at first boot: keep them aside
            // (wrapped by this HSM, harmless) rather than destroy them.
            let mut aside = path.as_os_str().to_owned();
            aside.push(format!(".replaced-by-restore-{}", unix_now()));
            let aside = PathBuf::from(aside);
            std::fs::rename(&path, &aside).map_err(io("moving aside the key file", &path))?;
            report.replaced.push(aside);
        }
        qutemail_vault::write_private_atomically(&path, &text)
            .map_err(|e| BackupError::KeyFile { name: path.display().to_string(), reason: e.to_string() })?;
        report.key_files.push(path);
    }
    tracing::info!(domain = %report.info.domain, messages = report.manifest.messages, "backup restored");
    Ok(report)
}

/// An [`AsyncRead`] that hashes what passes through.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: AsyncRead + Unpin> AsyncRead for HashingReader<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let poll = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = &poll {
            this.hasher.update(&buf.filled()[before..]);
        }
        poll
    }
}

/// `qutemailctl backup`: reads the passphrase, writes the archive, prints a summary.
pub async fn run_backup(
    config_path: &Path,
    out: &Path,
    force: bool,
    passphrase_file: Option<&Path>,
) -> anyhow::Result<std::process::ExitCode> {
    let config = GatewayConfig::load(config_path)?;
    let passphrase = read_passphrase(passphrase_file, Confirm::Twice)?;
    let r = backup(&config, &passphrase, out, force, KdfParams::DEFAULT).await?;
    let m = &r.manifest;
    println!(
        "backup of {} written to {} ({} bytes): {} accounts, {} mailboxes, {} messages, {} queued, {} blobs \
         ({} bytes){}",
        config.site.domain,
        r.path.display(),
        r.archive_bytes,
        m.accounts,
        m.mailboxes,
        m.messages,
        m.queued_messages,
        m.blobs,
        m.blob_bytes,
        if m.skipped_blobs > 0 {
            format!("; {} messages expunged during the backup were left out", m.skipped_blobs)
        } else {
            String::new()
        }
    );
    Ok(std::process::ExitCode::SUCCESS)
}

/// `qutemailctl restore`: reads the passphrase, restores, prints a summary.
pub async fn run_restore(
    config_path: &Path,
    input: &Path,
    passphrase_file: Option<&Path>,
) -> anyhow::Result<std::process::ExitCode> {
    let config = GatewayConfig::load(config_path)?;
    let passphrase = read_passphrase(passphrase_file, Confirm::Once)?;
    let r = restore(&config, &passphrase, input).await?;
    let m = &r.manifest;
    println!(
        "restored {} from a backup made by {} at {} (unix time): {} accounts, {} mailboxes, {} messages, {} \
         queued; every key is now wrapped by this site's HSM",
        r.info.domain,
        r.info.made_by,
        r.info.created_at,
        m.accounts,
        m.mailboxes,
        m.messages,
        m.queued_messages
    );
    for p in &r.key_files {
        println!("key file written: {}", p.display());
    }
    for p in &r.replaced {
        println!("the key file found there before was moved to {}", p.display());
    }
    for a in &r.replaced_accounts {
        println!("account {a} (without mail) that this site had before the restore was replaced");
    }
    Ok(std::process::ExitCode::SUCCESS)
}
