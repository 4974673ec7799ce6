//! Test support (cargo feature `testing`): a throw-away PostgreSQL cluster per test process,
//! a fresh database per test, and ready-made stores on either backend. For this crate's tests
//! and for later crates' (SMTP, IMAP, web) tests.
//!
//! PostgreSQL: if `QUTEMAIL_PG_URL` is set, that server is used (each test gets a database
//! created on it and dropped afterwards). Otherwise the newest `/usr/lib/postgresql/*/bin`
//! (Debian's `postgresql` package) is used: `initdb` into a temporary directory, `postgres`
//! listening only on a unix socket in that directory (`listen_addresses=''`), on a free port
//! number. As root (CI), the directory is given to the `postgres` system user and both run
//! under that user (`Command::uid` for initdb, `setpriv` for the server; not `runuser`, which
//! stays the server's parent and delays a shutdown by its own two-second kill timer).
//!
//! The server is started by a small `sh` watchdog whose standard input is a pipe from the
//! test process. When the test process exits, however it exits (also `SIGKILL`), the pipe
//! closes; the watchdog then stops the server (fast shutdown) and deletes the directory. No
//! postmaster outlives the tests.
//!
//! When PostgreSQL cannot be started, [`postgres`] panics with what to install: tests fail,
//! they never skip.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use sqlx::Connection;

use crate::{Backend, PasswordParams, Store, StoreConfig};

const INSTALL_HINT: &str = "install PostgreSQL (Debian: `apt-get install -y postgresql`) or set \
                            QUTEMAIL_PG_URL=postgres://user:password@host/db to a server where the user may \
                            create databases";

/// The PostgreSQL server the tests of this process use.
#[derive(Debug)]
pub struct TestPostgres {
    admin_url: String,
    data_dir: Option<PathBuf>,
    external: bool,
    _watchdog: Option<Mutex<Child>>,
}

static CLUSTER: OnceLock<Result<TestPostgres, String>> = OnceLock::new();

/// The process-wide test server, started on first use. Panics (failing the test) with what
/// to install if PostgreSQL cannot be started.
pub fn postgres() -> &'static TestPostgres {
    match CLUSTER.get_or_init(start) {
        Ok(pg) => pg,
        Err(e) => panic!("PostgreSQL for the tests could not be started: {e}\nTo fix: {INSTALL_HINT}"),
    }
}

fn start() -> Result<TestPostgres, String> {
    if let Ok(url) = std::env::var("QUTEMAIL_PG_URL") {
        return Ok(TestPostgres { admin_url: url, data_dir: None, external: true, _watchdog: None });
    }
    let bin = find_bin_dir().ok_or("no /usr/lib/postgresql/*/bin/initdb found")?;
    let dir = tempfile::Builder::new()
        .prefix("qutemail-pg-")
        .tempdir()
        .map_err(|e| format!("creating a temporary directory: {e}"))?
        .keep();
    let owner = if nix::unistd::geteuid().is_root() {
        let user = nix::unistd::User::from_name("postgres")
            .map_err(|e| format!("looking up the postgres user: {e}"))?
            .ok_or("running as root but there is no `postgres` system user")?;
        std::os::unix::fs::chown(&dir, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
            .map_err(|e| format!("chown {} to postgres: {e}", dir.display()))?;
        Some((user.uid.as_raw(), user.gid.as_raw()))
    } else {
        None
    };
    let data = dir.join("data");
    let mut initdb = Command::new(bin.join("initdb"));
    initdb.args(["-D"]).arg(&data).args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"]);
    if let Some((uid, gid)) = owner {
        initdb.uid(uid).gid(gid);
    }
    let out = initdb.output().map_err(|e| format!("running initdb: {e}"))?;
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(format!(
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("finding a free port: {e}"))?;
    // $1 dir, $2 postgres binary, $3 port, $4 uid, $5 gid (empty when not root).
    const WATCHDOG: &str = r#"
dir=$1; bin=$2; port=$3
if [ -n "$4" ]; then set -- setpriv --reuid="$4" --regid="$5" --clear-groups -- "$bin"; else set -- "$bin"; fi
"$@" -D "$dir/data" -k "$dir" -p "$port" -c listen_addresses= -c max_connections=300 \
    -c shared_buffers=32MB >"$dir/server.log" 2>&1 </dev/null &
pg=$!
read -r _ignored || true
kill -INT "$pg" 2>/dev/null
wait "$pg"
rm -rf "$dir"
"#;
    let (uid, gid) = owner.map(|(u, g)| (u.to_string(), g.to_string())).unwrap_or_default();
    let mut watchdog = Command::new("sh")
        .arg("-c")
        .arg(WATCHDOG)
        .arg("qutemail-pg-watchdog")
        .arg(&dir)
        .arg(bin.join("postgres"))
        .arg(port.to_string())
        .arg(uid)
        .arg(gid)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting the server: {e}"))?;
    let socket = dir.join(format!(".s.PGSQL.{port}"));
    let deadline = Instant::now() + Duration::from_secs(60);
    // The socket appears before the server accepts connections; pg_isready says when it does.
    let ready = || {
        socket.exists()
            && Command::new(bin.join("pg_isready"))
                .arg("-q")
                .arg("-h")
                .arg(&dir)
                .args(["-p", &port.to_string()])
                .status()
                .is_ok_and(|s| s.success())
    };
    while !ready() {
        let log = || std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
        if matches!(watchdog.try_wait(), Ok(Some(_))) {
            return Err(format!("postgres exited at start:\n{}", log()));
        }
        if Instant::now() > deadline {
            let _ = watchdog.kill();
            return Err(format!("postgres did not accept connections within 60 s:\n{}", log()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let admin_url = format!("postgres://postgres@localhost/postgres?host={}&port={port}", encode(&dir));
    Ok(TestPostgres {
        admin_url,
        data_dir: Some(data),
        external: false,
        _watchdog: Some(Mutex::new(watchdog)),
    })
}

fn find_bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, b)| b)
}

fn encode(path: &Path) -> String {
    let mut s = String::new();
    for b in path.as_os_str().as_encoded_bytes() {
        if b.is_ascii_alphanumeric() || b"._-".contains(b) {
            s.push(char::from(*b));
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

/// `url` with its database name replaced.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let after_scheme = base.find("://").map(|i| i + 3).unwrap_or(0);
    let host_end = base[after_scheme..].find('/').map(|i| i + after_scheme).unwrap_or(base.len());
    let mut out = format!("{}/{db}", &base[..host_end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

impl TestPostgres {
    /// The PostgreSQL data directory, when this process started the server (for tests that
    /// scan what reached the disk).
    pub fn data_dir(&self) -> Option<&Path> {
        self.data_dir.as_deref()
    }

    /// Creates a fresh, empty database.
    pub async fn create_database(&self) -> TestDatabase {
        sqlx::any::install_default_drivers();
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes).expect("random generator");
        let name = format!("qutemail_test_{}", hex::encode(bytes));
        let mut conn = sqlx::AnyConnection::connect(&self.admin_url)
            .await
            .unwrap_or_else(|e| panic!("connecting to the test PostgreSQL: {e}\nTo fix: {INSTALL_HINT}"));
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE on the test PostgreSQL: {e}"));
        let _ = conn.close().await;
        TestDatabase {
            url: with_database(&self.admin_url, &name),
            name,
            admin_url: self.admin_url.clone(),
            drop_on_exit: self.external,
        }
    }
}

/// A database of the test server; on an external server (`QUTEMAIL_PG_URL`) it is dropped
/// when this value is (a throw-away server is discarded whole).
#[derive(Debug)]
pub struct TestDatabase {
    /// Connection URL of the database.
    pub url: String,
    name: String,
    admin_url: String,
    drop_on_exit: bool,
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if !self.drop_on_exit {
            return;
        }
        let (admin, name) = (self.admin_url.clone(), self.name.clone());
        // Drop runs inside the test's runtime; a thread with its own runtime can block.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            rt.block_on(async {
                let mut conn = sqlx::AnyConnection::connect(&admin).await.ok()?;
                let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut conn).await.ok()
            })
        })
        .join();
    }
}

/// Cheap argon2id parameters for tests (the defaults cost ~30 ms per hash).
pub fn test_password_params() -> PasswordParams {
    PasswordParams { memory_kib: 1024, iterations: 1, parallelism: 1 }
}

/// A store on a fresh database and blob directory.
#[derive(Debug)]
pub struct TestStore {
    /// The open store.
    pub store: Store,
    /// Its configuration (to reopen it, or to hand to a child process).
    pub config: StoreConfig,
    /// Scratch directory holding the blob directory (`blobs/`) and the SQLite file
    /// (`store.sqlite`).
    pub dir: tempfile::TempDir,
    /// The PostgreSQL database, for the PostgreSQL backend.
    pub database: Option<TestDatabase>,
}

impl TestStore {
    /// A fresh store on `backend` with [`test_password_params`].
    pub async fn new(backend: Backend) -> TestStore {
        let dir = tempfile::tempdir().expect("temporary directory");
        let blob_dir = dir.path().join("blobs");
        let (config, database) = match backend {
            Backend::Sqlite => (StoreConfig::sqlite(dir.path().join("store.sqlite"), blob_dir), None),
            Backend::Postgres => {
                let db = postgres().create_database().await;
                (StoreConfig::new(db.url.clone(), blob_dir), Some(db))
            }
        };
        let config = StoreConfig { password: test_password_params(), ..config };
        let store = Store::open(config.clone()).await.unwrap_or_else(|e| panic!("opening the store: {e}"));
        TestStore { store, config, dir, database }
    }

    /// Opens the same database and blob directory again (as after a restart).
    pub async fn reopen(&self) -> Store {
        Store::open(self.config.clone()).await.unwrap_or_else(|e| panic!("reopening the store: {e}"))
    }
}

/// The data directory of the throw-away PostgreSQL server when `backend` is PostgreSQL and
/// this process started it (`None` for SQLite or an external server).
pub fn postgres_data_dir_if(backend: Backend) -> Option<PathBuf> {
    match backend {
        Backend::Postgres => postgres().data_dir().map(Path::to_path_buf),
        Backend::Sqlite => None,
    }
}
