//! Streamed attachment downloads: the vault opens the message chunk by chunk
//! ([`qutemail_vault::MailVault::present_streamed`]) into a bounded channel, and
//! [`PartStream`] picks the attachment out of it, so a download holds a few chunks of
//! plaintext at a time rather than the whole message.
//!
//! The response status is decided once the attachment's headers have been read (404 when the
//! message has no such attachment). After that the body follows the decryption; it ends
//! normally only once the whole message verified. A failure after the headers went out (a
//! chunk or the final tag that does not verify, a truncated blob, a malformed attachment)
//! aborts the body, so the client sees a failed download, never a short file. A message that
//! does not open before the attachment was found is left to the in-memory path, which shows
//! the explanation with the sealed original attached, as reading it does.

use std::io::Write;

use axum::body::Body;
use bytes::Bytes;
use qutemail_store::MessageMeta;
use qutemail_vault::VaultError;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use zeroize::Zeroizing;

use crate::Shared;
use crate::part_stream::{PartError, PartHead, PartStream};

/// Chunks of plaintext in flight between the decryption and the download.
const CHANNEL_CHUNKS: usize = 4;
/// Largest chunk sent over the channel, bytes (the vault writes one AEAD chunk, 64 KiB, at a time).
const MAX_CHUNK: usize = 64 * 1024;

/// What a download starts as.
pub(crate) enum Download {
    /// The attachment was found: its description and the streamed body.
    Streaming {
        /// File name and content type.
        head: PartHead,
        /// The decoded attachment, following the decryption.
        body: Body,
    },
    /// The message opened and verified, and has no attachment of that index.
    NotFound,
    /// The message takes the in-memory path (it does not open, or its structure needs the
    /// whole message).
    InMemory,
}

/// Why a streamed download was aborted after its headers were sent.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DownloadFailed {
    /// The rest of the message did not open or verify.
    #[error("the message did not verify to its end: {0}")]
    NotVerified(String),
    /// The message ended inside the attachment.
    #[error("the message ended inside the attachment")]
    Incomplete,
    /// The attachment's encoding is broken.
    #[error(transparent)]
    Malformed(#[from] PartError),
}

/// Sends each plaintext write as a chunk over the bounded channel; blocks (on the vault's
/// blocking thread) while the download is behind, and fails once the download was dropped,
/// which stops the decryption.
struct ChunkSender(mpsc::Sender<Zeroizing<Vec<u8>>>);

impl Write for ChunkSender {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(MAX_CHUNK);
        self.0
            .blocking_send(Zeroizing::new(buf[..n].to_vec()))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the download was abandoned"))?;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The decryption feeding the extractor.
struct Pump {
    chunks: mpsc::Receiver<Zeroizing<Vec<u8>>>,
    /// The opening task; `None` once it was awaited and succeeded.
    opening: Option<JoinHandle<Result<(), VaultError>>>,
    extractor: PartStream,
    uid: u32,
}

impl Pump {
    /// The opening's outcome, once its channel has closed.
    async fn verified(&mut self) -> Result<(), String> {
        let Some(task) = self.opening.take() else { return Ok(()) };
        match task.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(format!("the opening task failed: {e}")),
        }
    }
}

/// Starts the download of attachment `index` of `meta`'s message.
pub(crate) async fn start(state: &Shared, meta: &MessageMeta, index: usize) -> Download {
    let (tx, chunks) = mpsc::channel(CHANNEL_CHUNKS);
    let vault = state.deps.vault.clone();
    let store = state.deps.store.clone();
    let owned = meta.clone();
    let opening =
        tokio::spawn(async move { vault.present_streamed(&store, &owned, ChunkSender(tx)).await.map(drop) });
    let mut pump = Pump { chunks, opening: Some(opening), extractor: PartStream::new(index), uid: meta.uid };
    let mut first = Zeroizing::new(Vec::new());
    loop {
        let fed = match pump.chunks.recv().await {
            Some(chunk) => pump.extractor.feed(&chunk, &mut first),
            None => {
                if let Err(e) = pump.verified().await {
                    tracing::info!(uid = pump.uid, error = %e, "the message does not open as a stream; using the in-memory path");
                    return Download::InMemory;
                }
                pump.extractor.finish(&mut first)
            }
        };
        if let Err(e) = fed {
            // Dropping the pump closes the channel, which stops the decryption.
            tracing::debug!(uid = pump.uid, reason = %e, "attachment not streamable; using the in-memory path");
            return Download::InMemory;
        }
        if let Some(head) = pump.extractor.head().cloned() {
            let first = (!first.is_empty()).then(|| Bytes::from_owner(first));
            return Download::Streaming { head, body: body(pump, first) };
        }
        if pump.extractor.is_not_found() {
            // Answer 404 only for a message that verifies to its end.
            while pump.chunks.recv().await.is_some() {}
            return match pump.verified().await {
                Ok(()) => Download::NotFound,
                Err(_) => Download::InMemory,
            };
        }
    }
}

/// The response body: the attachment's bytes as they are decoded, then (after the last) the
/// rest of the message is opened so that the body ends only when all of it verified.
fn body(pump: Pump, first: Option<Bytes>) -> Body {
    struct Flow {
        pump: Pump,
        first: Option<Bytes>,
        finished: bool,
    }
    let flow = Flow { pump, first, finished: false };
    let stream = futures_util::stream::unfold(flow, |mut f| async move {
        if f.finished {
            return None;
        }
        if let Some(b) = f.first.take() {
            return Some((Ok(b), f));
        }
        loop {
            let mut out = Zeroizing::new(Vec::new());
            let step: Result<(), DownloadFailed> = if f.pump.extractor.is_complete() {
                while f.pump.chunks.recv().await.is_some() {}
                match f.pump.verified().await {
                    Ok(()) => return None,
                    Err(e) => Err(DownloadFailed::NotVerified(e)),
                }
            } else {
                match f.pump.chunks.recv().await {
                    Some(chunk) => f.pump.extractor.feed(&chunk, &mut out).map_err(DownloadFailed::from),
                    None => match f.pump.verified().await {
                        Ok(()) => match f.pump.extractor.finish(&mut out) {
                            Ok(()) if f.pump.extractor.is_complete() => Ok(()),
                            Ok(()) => Err(DownloadFailed::Incomplete),
                            Err(e) => Err(e.into()),
                        },
                        Err(e) => Err(DownloadFailed::NotVerified(e)),
                    },
                }
            };
            match step {
                Err(e) => {
                    tracing::warn!(uid = f.pump.uid, error = %e, "attachment download aborted");
                    f.finished = true;
                    return Some((Err(e), f));
                }
                Ok(()) if !out.is_empty() => return Some((Ok(Bytes::from_owner(out)), f)),
                Ok(()) => {}
            }
        }
    });
    Body::from_stream(stream)
}
