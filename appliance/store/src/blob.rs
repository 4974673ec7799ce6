//! Message blobs: the sealed bytes of each message, kept outside the database.
//!
//! The store keeps only opaque bytes here (the caller seals them); a blob belongs to exactly
//! one message row. COPY gives the copy a blob of its own ([`BlobStore::copy`]: a hard link on
//! the file system, a server-side copy on an object store), so deleting one message never
//! touches another's blob and no reference counts are needed.

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::error::BlobError;

/// The future every [`BlobStore`] method returns (boxed so that the trait is object safe and
/// a store can hold `Arc<dyn BlobStore>`).
pub type BlobFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BlobError>> + Send + 'a>>;

/// A streaming reader over one blob's bytes.
pub type BlobReader = Pin<Box<dyn AsyncRead + Send>>;

/// The id of a blob: 128 random bits as 32 lowercase hex digits. Random (never derived from
/// the content), so an id reveals nothing about the message.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobId(String);

impl BlobId {
    /// A fresh random id from the operating system's generator.
    pub fn random() -> Result<BlobId, BlobError> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes)
            .map_err(|e| BlobError::Internal(format!("random generator failed: {e}")))?;
        Ok(BlobId(hex::encode(bytes)))
    }

    /// Checks that `s` has the form of an id this crate hands out (so it is a safe file name).
    pub fn parse(s: &str) -> Result<BlobId, BlobError> {
        if s.len() == 32 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            Ok(BlobId(s.to_owned()))
        } else {
            Err(BlobError::BadId(s.to_owned()))
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobId({})", self.0)
    }
}

/// A blob that is durable in the blob store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBlob {
    /// Its id.
    pub id: BlobId,
    /// Its length in bytes.
    pub len: u64,
}

/// Where message blobs live. [`FsBlobStore`] is the implementation for one appliance; the
/// S3-compatible object store (`s3.rs`, feature `s3`) serves several gateway nodes (multipart
/// upload for `put`, `GetObject` for `get`, `CopyObject` for `copy`, `ListObjectsV2` with
/// `LastModified` for `list_older_than`).
///
/// Contract relied on by [`crate::Store`]: when `put` or `copy` returns `Ok`, the blob survives
/// a crash or power loss; `delete` of a missing blob succeeds; `list_older_than` never lists a
/// blob younger than the given age (a message whose row is not committed yet).
pub trait BlobStore: Send + Sync + fmt::Debug {
    /// Streams `data` to its end into a new blob and returns once it is durable. Never buffers
    /// the whole blob in memory. On error nothing visible is left behind.
    fn put<'a>(&'a self, data: &'a mut (dyn AsyncRead + Send + Unpin)) -> BlobFuture<'a, StoredBlob>;

    /// Opens a blob for streaming reading.
    fn get<'a>(&'a self, id: &'a BlobId) -> BlobFuture<'a, BlobReader>;

    /// A new, durable blob with the same bytes as `id`, under a new id.
    fn copy<'a>(&'a self, id: &'a BlobId) -> BlobFuture<'a, StoredBlob>;

    /// Deletes blobs; ids that do not exist are skipped.
    fn delete<'a>(&'a self, ids: &'a [BlobId]) -> BlobFuture<'a, ()>;

    /// Every blob last written more than `age` ago (candidates for the orphan sweep). May also
    /// drop leftovers of interrupted writes older than `age`.
    fn list_older_than(&self, age: Duration) -> BlobFuture<'_, Vec<BlobId>>;
}

/// Blobs as files in one directory: `blobs/<2 hex>/<id>` (256 fan-out directories) and
/// `tmp/` for writes in progress.
///
/// `put` writes to `tmp/<id>`, `fsync`s the file, renames it into `blobs/xx/`, then `fsync`s
/// that directory: after a crash a blob is either complete under its final name or absent
/// there (a leftover in `tmp/` is removed by the next sweep). Files are created mode 0600.
#[derive(Debug, Clone)]
pub struct FsBlobStore {
    root: PathBuf,
}

/// Size of the copy buffer: large enough that a 25 MB blob takes a few hundred writes, small
/// enough that many concurrent appends stay cheap in memory.
const CHUNK: usize = 128 * 1024;

fn io_err<'p>(op: &'static str, path: &'p Path) -> impl FnOnce(std::io::Error) -> BlobError + 'p {
    move |source| BlobError::Io { op, path: path.to_path_buf(), source }
}

impl FsBlobStore {
    /// Opens (creating it, mode 0700, with its fan-out directories) the blob directory.
    pub async fn open(root: impl Into<PathBuf>) -> Result<FsBlobStore, BlobError> {
        let root = root.into();
        let r = root.clone();
        tokio::task::spawn_blocking(move || create_layout(&r))
            .await
            .map_err(|e| BlobError::Internal(e.to_string()))??;
        Ok(FsBlobStore { root })
    }

    /// The directory this store writes to.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path_of(&self, id: &BlobId) -> PathBuf {
        self.root.join("blobs").join(&id.0[..2]).join(&id.0)
    }

    async fn commit_tmp(&self, tmp: &Path, id: &BlobId) -> Result<(), BlobError> {
        let dest = self.path_of(id);
        tokio::fs::rename(tmp, &dest).await.map_err(io_err("rename into", &dest))?;
        let dir = dest.parent().map(Path::to_path_buf).unwrap_or_else(|| self.root.clone());
        sync_dir(dir).await
    }
}

fn create_layout(root: &Path) -> Result<(), BlobError> {
    use std::os::unix::fs::DirBuilderExt;
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true).mode(0o700);
    builder.create(root.join("tmp")).map_err(io_err("create directory", root))?;
    for i in 0..=255u8 {
        let dir = root.join("blobs").join(hex::encode([i]));
        builder.create(&dir).map_err(io_err("create directory", &dir))?;
    }
    // The fan-out directories must survive a power loss before the first blob relies on them.
    for dir in [root.join("blobs"), root.to_path_buf()] {
        std::fs::File::open(&dir).and_then(|d| d.sync_all()).map_err(io_err("fsync directory", &dir))?;
    }
    Ok(())
}

async fn sync_dir(dir: PathBuf) -> Result<(), BlobError> {
    tokio::task::spawn_blocking(move || {
        std::fs::File::open(&dir).and_then(|d| d.sync_all()).map_err(io_err("fsync directory", &dir))
    })
    .await
    .map_err(|e| BlobError::Internal(e.to_string()))?
}

async fn write_tmp(tmp: &Path, data: &mut (dyn AsyncRead + Send + Unpin)) -> Result<u64, BlobError> {
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)
        .await
        .map_err(io_err("create", tmp))?;
    let mut buf = vec![0u8; CHUNK];
    let mut len = 0u64;
    loop {
        let n = data.read(&mut buf).await.map_err(BlobError::Source)?;
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n]).await.map_err(io_err("write", tmp))?;
        len += n as u64;
    }
    file.flush().await.map_err(io_err("write", tmp))?;
    file.sync_all().await.map_err(io_err("fsync", tmp))?;
    Ok(len)
}

impl BlobStore for FsBlobStore {
    fn put<'a>(&'a self, data: &'a mut (dyn AsyncRead + Send + Unpin)) -> BlobFuture<'a, StoredBlob> {
        Box::pin(async move {
            let id = BlobId::random()?;
            let tmp = self.root.join("tmp").join(&id.0);
            let result = async {
                let len = write_tmp(&tmp, data).await?;
                self.commit_tmp(&tmp, &id).await?;
                Ok(len)
            }
            .await;
            match result {
                Ok(len) => Ok(StoredBlob { id, len }),
                Err(e) => {
                    // Best effort: a leftover is removed by the next sweep anyway.
                    let _ = tokio::fs::remove_file(&tmp).await;
                    Err(e)
                }
            }
        })
    }

    fn get<'a>(&'a self, id: &'a BlobId) -> BlobFuture<'a, BlobReader> {
        Box::pin(async move {
            let path = self.path_of(id);
            match tokio::fs::File::open(&path).await {
                Ok(f) => Ok(Box::pin(f) as BlobReader),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(BlobError::NotFound(id.0.clone())),
                Err(e) => Err(io_err("open", &path)(e)),
            }
        })
    }

    fn copy<'a>(&'a self, id: &'a BlobId) -> BlobFuture<'a, StoredBlob> {
        Box::pin(async move {
            let src = self.path_of(id);
            let len = match tokio::fs::metadata(&src).await {
                Ok(m) => m.len(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(BlobError::NotFound(id.0.clone()));
                }
                Err(e) => return Err(io_err("stat", &src)(e)),
            };
            let new = BlobId::random()?;
            // A hard link through tmp/ keeps the "complete or absent" rule: the final name only
            // ever appears by rename. The bytes are immutable, so sharing the inode is safe, and
            // deleting either name leaves the other intact.
            let tmp = self.root.join("tmp").join(&new.0);
            match tokio::fs::hard_link(&src, &tmp).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(BlobError::NotFound(id.0.clone()));
                }
                Err(e) => return Err(io_err("link", &tmp)(e)),
            }
            // The link shares the original's modification time; make it young so that an orphan
            // sweep does not take it for an old orphan before its row is committed.
            let touch = tmp.clone();
            let touched = tokio::task::spawn_blocking(move || {
                std::fs::File::open(&touch)
                    .and_then(|f| f.set_modified(SystemTime::now()))
                    .map_err(io_err("touch", &touch))
            })
            .await
            .map_err(|e| BlobError::Internal(e.to_string()))
            .and_then(|r| r);
            if let Err(e) = touched {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(e);
            }
            if let Err(e) = self.commit_tmp(&tmp, &new).await {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(e);
            }
            Ok(StoredBlob { id: new, len })
        })
    }

    fn delete<'a>(&'a self, ids: &'a [BlobId]) -> BlobFuture<'a, ()> {
        Box::pin(async move {
            for id in ids {
                let path = self.path_of(id);
                match tokio::fs::remove_file(&path).await {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err("delete", &path)(e)),
                }
            }
            Ok(())
        })
    }

    fn list_older_than(&self, age: Duration) -> BlobFuture<'_, Vec<BlobId>> {
        let root = self.root.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || scan_old(&root, age))
                .await
                .map_err(|e| BlobError::Internal(e.to_string()))?
        })
    }
}

fn is_old(meta: &std::fs::Metadata, cutoff: SystemTime) -> bool {
    meta.modified().map(|m| m < cutoff).unwrap_or(false)
}

fn scan_old(root: &Path, age: Duration) -> Result<Vec<BlobId>, BlobError> {
    let cutoff = SystemTime::now().checked_sub(age).unwrap_or(SystemTime::UNIX_EPOCH);
    let tmp = root.join("tmp");
    for entry in std::fs::read_dir(&tmp).map_err(io_err("list", &tmp))? {
        let entry = entry.map_err(io_err("list", &tmp))?;
        if entry.metadata().map(|m| is_old(&m, cutoff)).unwrap_or(false) {
            tracing::info!(file = %entry.path().display(), "removing leftover of an interrupted blob write");
            let _ = std::fs::remove_file(entry.path());
        }
    }
    let mut old = Vec::new();
    for i in 0..=255u8 {
        let dir = root.join("blobs").join(hex::encode([i]));
        for entry in std::fs::read_dir(&dir).map_err(io_err("list", &dir))? {
            let entry = entry.map_err(io_err("list", &dir))?;
            let Ok(id) = BlobId::parse(&entry.file_name().to_string_lossy()) else {
                tracing::warn!(file = %entry.path().display(), "foreign file in the blob directory left alone");
                continue;
            };
            if entry.metadata().map(|m| is_old(&m, cutoff)).unwrap_or(false) {
                old.push(id);
            }
        }
    }
    Ok(old)
}
