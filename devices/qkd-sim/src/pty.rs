//! A pseudo-terminal pair: the simulator keeps the master side, hosts open the slave path as
//! if it were a UART.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::pty::openpty;
use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
use tokio::io::unix::AsyncFd;

/// An open pseudo-terminal.
pub struct Pty {
    master: AsyncFd<OwnedFd>,
    /// Kept open so the master does not see EIO while no host has the slave open, and so a
    /// host can close and reopen the path (as kmd does after a failure).
    _slave: OwnedFd,
    path: PathBuf,
}

/// Why a pseudo-terminal could not be set up or used.
#[derive(Debug, thiserror::Error)]
pub enum PtyError {
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// The operation.
        what: &'static str,
        /// The errno.
        #[source]
        source: nix::Error,
    },
    /// Registering with the tokio reactor failed.
    #[error("cannot watch the pseudo-terminal: {0}")]
    Reactor(#[source] std::io::Error),
}

fn sys(what: &'static str) -> impl FnOnce(nix::Error) -> PtyError {
    move |source| PtyError::Sys { what, source }
}

impl Pty {
    /// Opens a pseudo-terminal in raw mode (no echo, no line discipline), master non-blocking.
    pub fn open() -> Result<Self, PtyError> {
        let pair = openpty(None, None).map_err(sys("openpty"))?;
        // Raw mode on the slave: without it the line discipline echoes the device's own frames
        // back to it and mangles bytes such as 0x0d.
        let mut termios = tcgetattr(&pair.slave).map_err(sys("tcgetattr"))?;
        cfmakeraw(&mut termios);
        tcsetattr(&pair.slave, SetArg::TCSANOW, &termios).map_err(sys("tcsetattr"))?;
        let flags = fcntl(pair.master.as_fd(), FcntlArg::F_GETFL).map_err(sys("fcntl(F_GETFL)"))?;
        let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
        fcntl(pair.master.as_fd(), FcntlArg::F_SETFL(flags)).map_err(sys("fcntl(F_SETFL)"))?;
        let path = std::fs::read_link(format!("/proc/self/fd/{}", pair.slave.as_raw_fd()))
            .map_err(|e| PtyError::Sys { what: "resolving the pty path", source: io_to_nix(&e) })?;
        // SAFETY: `OwnedFd` owns a valid open descriptor and always returns that same descriptor;
        // the `AsyncFd` takes ownership, so it stays open for the `AsyncFd`'s whole lifetime.
        let master = unsafe { AsyncFd::register(pair.master) }.map_err(|e| PtyError::Reactor(e.into()))?;
        Ok(Self { master, _slave: pair.slave, path })
    }

    /// The slave path a host opens, e.g. `/dev/pts/7`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads what the host wrote. Returns 0 bytes never; waits until data arrives.
    pub async fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let mut guard = self.master.readable().await?;
            match guard.try_io(|fd| nix::unistd::read(fd.get_ref(), buf).map_err(std::io::Error::from)) {
                Ok(Ok(n)) => return Ok(n),
                // EIO: no host has the slave open right now (only our kept fd); wait and retry.
                Ok(Err(e)) if e.raw_os_error() == Some(libc_eio()) => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes all of `bytes` to the host.
    pub async fn write_all(&self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            let mut guard = self.master.writable().await?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), bytes).map_err(std::io::Error::from)) {
                Ok(Ok(n)) => bytes = &bytes[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    /// Discards whatever the host wrote and is still queued (as a rebooting device would).
    pub fn discard_input(&self) {
        let mut buf = [0u8; 4096];
        while let Ok(n) = nix::unistd::read(self.master.get_ref(), &mut buf) {
            if n == 0 {
                break;
            }
        }
    }
}

fn libc_eio() -> i32 {
    nix::errno::Errno::EIO as i32
}

fn io_to_nix(e: &std::io::Error) -> nix::Error {
    e.raw_os_error().map_or(nix::Error::EIO, nix::Error::from_raw)
}
