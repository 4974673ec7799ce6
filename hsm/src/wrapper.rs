//! The public key wrapper and its pool of session-owning worker threads.

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::thread::JoinHandle;

use zeroize::Zeroizing;

use crate::blob::WrappedKey;
use crate::config::HsmConfig;
use crate::error::HsmError;
use crate::module::ModuleLease;
use crate::token::{Conn, HealthReport, Shared, check_key_len, is_connection_lost};

/// Work for a worker: runs on the worker's thread with its session.
type Job = Box<dyn FnOnce(&Shared, &mut Option<Conn>) + Send + 'static>;

/// Jobs that may wait per worker before senders are held back.
const QUEUE_PER_WORKER: usize = 32;

struct Inner {
    jobs: Option<flume::Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue makes every worker finish its current job,
        // close its session and exit; the module is finalised after the
        // last worker has let go of it.
        self.jobs.take();
        for worker in self.workers.drain(..) {
            if worker.join().is_err() {
                tracing::error!("an HSM worker thread panicked while shutting down");
            }
        }
    }
}

/// Wraps and unwraps key material with a non-extractable AES-256 key held
/// in a PKCS#11 token.
///
/// Cheap to clone (all clones share one pool). Blocking methods (`wrap`,
/// `unwrap`, `health_check`) must not be called on an async runtime's
/// worker threads; use the `*_async` variants there. Each operation is
/// served by one of `pool_size` worker threads, each owning one logged-in
/// PKCS#11 session. A worker whose session breaks (token removed, session
/// closed) reports the error and reconnects on its next request.
#[derive(Clone)]
pub struct HsmKeyWrapper {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for HsmKeyWrapper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HsmKeyWrapper")
            .field("target", &self.inner.shared.target)
            .field("wrapping_key_label", &self.inner.shared.config.wrapping_key_label)
            .field("mechanism", &self.inner.shared.config.mechanism.name())
            .field("pool_size", &self.inner.workers.len())
            .finish()
    }
}

impl HsmKeyWrapper {
    /// Loads the module, finds the token, logs in `pool_size` sessions and
    /// finds the wrapping key (creating it if the token has none with the
    /// configured label). Blocks; from async code use [`Self::open_async`].
    pub fn open(config: HsmConfig) -> Result<Self, HsmError> {
        config.validate()?;
        let pin = config.read_pin()?;
        let module = ModuleLease::acquire(&config.module_path)?;
        let pool_size = config.pool_size;
        let shared = Arc::new(Shared::new(config, module, pin));

        let mut conns = Vec::with_capacity(pool_size);
        conns.push(shared.connect(true)?);
        for _ in 1..pool_size {
            conns.push(shared.connect(false)?);
        }

        let (tx, rx) = flume::bounded::<Job>(pool_size * QUEUE_PER_WORKER);
        let mut workers = Vec::with_capacity(pool_size);
        for (i, conn) in conns.into_iter().enumerate() {
            let shared = shared.clone();
            let rx = rx.clone();
            let handle = std::thread::Builder::new()
                .name(format!("qutemail-hsm-{i}"))
                .spawn(move || worker(shared, Some(conn), rx))
                .map_err(|e| HsmError::WorkerSpawn(e.to_string()))?;
            workers.push(handle);
        }
        tracing::info!(
            module = %shared.target.module.display(),
            token = %shared.target.token,
            wrapping_key_label = %shared.config.wrapping_key_label,
            mechanism = shared.config.mechanism.name(),
            pool_size,
            "HSM key wrapper ready"
        );
        Ok(HsmKeyWrapper { inner: Arc::new(Inner { jobs: Some(tx), workers, shared }) })
    }

    /// [`Self::open`] on a helper thread, for use inside an async runtime.
    pub fn open_async(config: HsmConfig) -> impl Future<Output = Result<Self, HsmError>> + Send + 'static {
        let (tx, rx) = flume::bounded(1);
        let spawned = std::thread::Builder::new().name("qutemail-hsm-open".into()).spawn(move || {
            let _ = tx.send(HsmKeyWrapper::open(config));
        });
        async move {
            spawned.map_err(|e| HsmError::WorkerSpawn(e.to_string()))?;
            rx.recv_async().await.map_err(|_| HsmError::PoolClosed)?
        }
    }

    /// The configuration this wrapper was opened with.
    pub fn config(&self) -> &HsmConfig {
        &self.inner.shared.config
    }

    /// Wraps `key` (1 to [`crate::MAX_KEY_LEN`] bytes). Blocks until a
    /// worker has done it.
    pub fn wrap(&self, key: &[u8]) -> Result<WrappedKey, HsmError> {
        let (job, reply) = wrap_job(key)?;
        self.submit_blocking(job)?;
        reply.recv().map_err(|_| HsmError::PoolClosed)?
    }

    /// Unwraps a blob made by [`Self::wrap`] with the same wrapping key.
    /// The result is wiped from memory when dropped.
    pub fn unwrap(&self, wrapped: &WrappedKey) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        let (job, reply) = unwrap_job(wrapped);
        self.submit_blocking(job)?;
        reply.recv().map_err(|_| HsmError::PoolClosed)?
    }

    /// Checks that the token is present and is still the configured one,
    /// that a session is logged in, that the wrapping key is intact and that
    /// a random test key survives a wrap/unwrap round trip. Meant to be
    /// called periodically by the daemon.
    pub fn health_check(&self) -> Result<HealthReport, HsmError> {
        let (job, reply) = job(|shared, conn| conn.health(shared));
        self.submit_blocking(job)?;
        reply.recv().map_err(|_| HsmError::PoolClosed)?
    }

    /// Async [`Self::wrap`]: the key is copied (into a wiped buffer) before
    /// this returns, so the future borrows nothing and can be spawned.
    pub fn wrap_async(
        &self,
        key: &[u8],
    ) -> impl Future<Output = Result<WrappedKey, HsmError>> + Send + 'static {
        let prepared = wrap_job(key);
        let inner = self.inner.clone();
        async move {
            let (job, reply) = prepared?;
            submit_async(&inner, job).await?;
            reply.recv_async().await.map_err(|_| HsmError::PoolClosed)?
        }
    }

    /// Async [`Self::unwrap`]. Dropping the future before it completes is
    /// safe: an unwrapped key that can no longer be delivered is wiped.
    pub fn unwrap_async(
        &self,
        wrapped: &WrappedKey,
    ) -> impl Future<Output = Result<Zeroizing<Vec<u8>>, HsmError>> + Send + 'static {
        let (job, reply) = unwrap_job(wrapped);
        let inner = self.inner.clone();
        async move {
            submit_async(&inner, job).await?;
            reply.recv_async().await.map_err(|_| HsmError::PoolClosed)?
        }
    }

    /// Async [`Self::health_check`].
    pub fn health_check_async(
        &self,
    ) -> impl Future<Output = Result<HealthReport, HsmError>> + Send + 'static {
        let (job, reply) = job(|shared, conn| conn.health(shared));
        let inner = self.inner.clone();
        async move {
            submit_async(&inner, job).await?;
            reply.recv_async().await.map_err(|_| HsmError::PoolClosed)?
        }
    }

    fn submit_blocking(&self, job: Job) -> Result<(), HsmError> {
        let jobs = self.inner.jobs.as_ref().ok_or(HsmError::PoolClosed)?;
        jobs.send(job).map_err(|_| HsmError::PoolClosed)
    }
}

async fn submit_async(inner: &Inner, job: Job) -> Result<(), HsmError> {
    let jobs = inner.jobs.as_ref().ok_or(HsmError::PoolClosed)?;
    jobs.send_async(job).await.map_err(|_| HsmError::PoolClosed)
}

type Reply<T> = flume::Receiver<Result<T, HsmError>>;

/// Packages `op` as a job and returns the channel its result arrives on.
/// If the result cannot be delivered (caller gone), it is dropped — and a
/// key in a `Zeroizing` buffer is wiped.
fn job<T, F>(op: F) -> (Job, Reply<T>)
where
    T: Send + 'static,
    F: FnOnce(&Shared, &Conn) -> Result<T, HsmError> + Send + 'static,
{
    let (tx, rx) = flume::bounded(1);
    let job: Job = Box::new(move |shared, conn| {
        let result = with_conn(shared, conn, op);
        let _ = tx.send(result);
    });
    (job, rx)
}

fn wrap_job(key: &[u8]) -> Result<(Job, Reply<WrappedKey>), HsmError> {
    check_key_len(key)?;
    let key = Zeroizing::new(key.to_vec());
    Ok(job(move |shared, conn| conn.wrap(shared, &key)))
}

fn unwrap_job(wrapped: &WrappedKey) -> (Job, Reply<Zeroizing<Vec<u8>>>) {
    let wrapped = wrapped.clone();
    job(move |shared, conn| conn.unwrap(shared, &wrapped))
}

/// Runs `op` on the worker's session, (re)connecting first if needed, and
/// forgets the session when the error says it is broken.
fn with_conn<T>(
    shared: &Shared,
    conn: &mut Option<Conn>,
    op: impl FnOnce(&Shared, &Conn) -> Result<T, HsmError>,
) -> Result<T, HsmError> {
    let current = match conn.take() {
        Some(c) => c,
        None => {
            let c = shared.connect(false)?;
            tracing::info!(token = %shared.target.token, "HSM session re-established");
            c
        }
    };
    let result = op(shared, &current);
    match &result {
        Err(e) if is_connection_lost(e) => {
            tracing::warn!(error = %e, "dropping the HSM session; the next request reconnects");
        }
        _ => *conn = Some(current),
    }
    result
}

fn worker(shared: Arc<Shared>, mut conn: Option<Conn>, jobs: flume::Receiver<Job>) {
    while let Ok(job) = jobs.recv() {
        if catch_unwind(AssertUnwindSafe(|| job(&shared, &mut conn))).is_err() {
            tracing::error!("an HSM job panicked; its session is reset");
            conn = None;
        }
    }
    // The session is closed before the module may be finalised.
    drop(conn);
    drop(shared);
}
