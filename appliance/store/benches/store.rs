//! Throughput of storing and fetching 10 KiB messages, on SQLite and on PostgreSQL, each with
//! references measured in the same run on the same disk:
//!
//! * `store`: [`Store::append`] of N messages of 10 KiB (blob written and fsynced, row
//!   committed durably), from `C` concurrent tasks (a gateway serves many sessions at once).
//! * `ref file write+fsync`: the same bytes written to N plain files, each `fsync`ed, from `C`
//!   tasks: the floor of durable per-message storage on this disk.
//! * `ref db commit`: N single-row `INSERT` + `COMMIT` transactions of a 200-byte row through
//!   sqlx on the same database, from `C` tasks (one at a time for SQLite, as the store does):
//!   the floor of durable per-message metadata.
//! * `fetch`: metadata of all N messages (one [`Store::fetch`]) plus every blob read to its end,
//!   from `C` tasks; `ref file read`: reading the N plain files.
//!
//! Ratios `store / ref file write+fsync` and `fetch / ref file read` are what to compare
//! across machines. `cargo bench -p qutemail-store --bench store`; `QUTEMAIL_BENCH_MESSAGES`
//! (default 10000) and `QUTEMAIL_BENCH_TASKS` (default 32) change N and C. PostgreSQL is
//! started as in the tests (`qutemail_store::testing`), or `QUTEMAIL_PG_URL` is used.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use qutemail_store::testing::TestStore;
use qutemail_store::{Backend, Flags, MailboxId, NewAccount, NewMessage, Protection, Selection, Store};
use tokio::io::AsyncReadExt;

const SIZE: usize = 10 * 1024;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn message() -> NewMessage {
    NewMessage {
        flags: Flags::NONE,
        keywords: vec![],
        internal_date: SystemTime::now(),
        size: SIZE as u64,
        protection: Protection {
            kind: "qkd-envelope".into(),
            wrapped_key: vec![7u8; 40],
            key_ids: vec!["8b1a9953-c461-4ed5-a94a-0ac4e6b2e5a1".into()],
            certificate: Some(vec![9u8; 96]),
        },
        summary: Some(vec![3u8; 64]),
    }
}

/// Runs `job(i)` for i in 0..n on `tasks` concurrent tasks; returns the elapsed time.
async fn run<F, Fut>(n: usize, tasks: usize, job: F) -> Duration
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let job = Arc::new(job);
    let start = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let (next, job) = (next.clone(), job.clone());
        handles.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                job(i).await;
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    start.elapsed()
}

struct Figures {
    backend: Backend,
    store: f64,
    fetch: f64,
    ref_write: f64,
    ref_read: f64,
    ref_commit: f64,
}

async fn bench(backend: Backend, n: usize, tasks: usize) -> Figures {
    let t = TestStore::new(backend).await;
    let store: Store = t.store.clone();
    let account = store
        .create_account(NewAccount {
            address: "bench@site.example",
            display_name: "",
            password: "pw",
            quota_bytes: None,
        })
        .await
        .unwrap();
    let inbox: MailboxId = store.mailbox(account.id, "INBOX").await.unwrap().id;
    let body: Arc<Vec<u8>> = Arc::new((0..SIZE).map(|i| (i * 31 % 251) as u8).collect());

    // Reference: plain files, write + fsync each.
    let ref_dir = Arc::new(tempfile::tempdir_in(t.dir.path()).unwrap());
    let (d, b) = (ref_dir.clone(), body.clone());
    let ref_write = run(n, tasks, move |i| {
        let (d, b) = (d.clone(), b.clone());
        async move {
            tokio::task::spawn_blocking(move || {
                use std::io::Write;
                let mut f = std::fs::File::create(d.path().join(i.to_string())).unwrap();
                f.write_all(&b).unwrap();
                f.sync_all().unwrap();
            })
            .await
            .unwrap();
        }
    })
    .await;

    // Reference: single-row durable commits through sqlx on the same database.
    let ref_commit = {
        use sqlx::Connection;
        sqlx::any::install_default_drivers();
        let mut c = sqlx::AnyConnection::connect(&t.config.database_url).await.unwrap();
        sqlx::raw_sql("CREATE TABLE bench_ref (id BIGINT PRIMARY KEY, data TEXT NOT NULL)")
            .execute(&mut c)
            .await
            .unwrap();
        c.close().await.unwrap();
        let pool = sqlx::pool::PoolOptions::<sqlx::Any>::new()
            .max_connections(if backend == Backend::Sqlite { 1 } else { tasks as u32 })
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        sqlx::raw_sql("PRAGMA synchronous = FULL; PRAGMA busy_timeout = 10000")
                            .execute(conn)
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect(&t.config.database_url)
            .await
            .unwrap();
        let row = "x".repeat(200);
        run(n, tasks, move |i| {
            let (pool, row) = (pool.clone(), row.clone());
            async move {
                let mut tx = pool.begin().await.unwrap();
                sqlx::query("INSERT INTO bench_ref (id, data) VALUES ($1, $2)")
                    .bind(i as i64)
                    .bind(row)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
            }
        })
        .await
    };

    // The store.
    let (s, b) = (store.clone(), body.clone());
    let store_time = run(n, tasks, move |_| {
        let (s, b) = (s.clone(), b.clone());
        async move {
            let mut src: &[u8] = &b;
            s.append(inbox, &message(), &mut src).await.unwrap();
        }
    })
    .await;

    // Fetch: metadata of all, then every blob read to its end.
    let start = Instant::now();
    let all = Arc::new(store.fetch(inbox, &Selection::All).await.unwrap());
    assert_eq!(all.len(), n);
    let (s, a) = (store.clone(), all.clone());
    run(n, tasks, move |i| {
        let (s, a) = (s.clone(), a.clone());
        async move {
            let mut out = Vec::with_capacity(SIZE);
            s.read_blob(&a[i]).await.unwrap().read_to_end(&mut out).await.unwrap();
            assert_eq!(out.len(), SIZE);
        }
    })
    .await;
    let fetch_time = start.elapsed();

    let d = ref_dir.clone();
    let ref_read = run(n, tasks, move |i| {
        let d = d.clone();
        async move {
            let out = tokio::fs::read(d.path().join(i.to_string())).await.unwrap();
            assert_eq!(out.len(), SIZE);
        }
    })
    .await;
    store.close().await;

    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    Figures {
        backend,
        store: rate(store_time),
        fetch: rate(fetch_time),
        ref_write: rate(ref_write),
        ref_read: rate(ref_read),
        ref_commit: rate(ref_commit),
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing: run a tiny round
    // then so that the bench is at least exercised.
    let is_bench = std::env::args().any(|a| a == "--bench");
    let n = if is_bench { env("QUTEMAIL_BENCH_MESSAGES", 10_000) } else { 50 };
    let tasks = env("QUTEMAIL_BENCH_TASKS", 32);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let mut rows = Vec::new();
    for backend in [Backend::Sqlite, Backend::Postgres] {
        rows.push(rt.block_on(bench(backend, n, tasks)));
    }
    println!("\n{n} messages of 10 KiB, {tasks} concurrent tasks (messages per second)");
    println!(
        "{:<9} {:>9} {:>13} {:>7} {:>11} {:>9} {:>10} {:>7}",
        "backend", "store", "ref write+fs", "ratio", "ref commit", "fetch", "ref read", "ratio"
    );
    for f in rows {
        println!(
            "{:<9} {:>9.0} {:>13.0} {:>7.2} {:>11.0} {:>9.0} {:>10.0} {:>7.2}",
            f.backend.name(),
            f.store,
            f.ref_write,
            f.store / f.ref_write,
            f.ref_commit,
            f.fetch,
            f.ref_read,
            f.fetch / f.ref_read
        );
    }
}
