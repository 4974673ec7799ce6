//! systemd `Type=notify` for QuteMail's daemons: readiness (`READY=1`), `STATUS=` lines, the
//! watchdog (`WATCHDOG=1`) and `STOPPING=1`, sent as sd_notify(3) datagrams to the socket named
//! by `$NOTIFY_SOCKET` (through the `sd-notify` crate).
//!
//! Without `NOTIFY_SOCKET` (not started by systemd) every call is a no-op. A failed send is
//! logged, never fatal: a daemon serves the same with or without a service manager. The daemons
//! start no child processes, so `NOTIFY_SOCKET` is left in the environment.
//!
//! ```
//! let notifier = qutemail_service_notify::Notifier::from_env();
//! notifier.ready("serving 2 links");
//! if let Some(every) = qutemail_service_notify::watchdog_interval() {
//!     // pet the watchdog every `every` while healthy: notifier.watchdog()
//!     # let _ = every;
//! }
//! ```

use std::time::Duration;

use sd_notify::NotifyState;

/// Sends a daemon's state changes to the service manager.
#[derive(Debug, Clone)]
pub struct Notifier {
    enabled: bool,
}

impl Notifier {
    /// A notifier that talks to `$NOTIFY_SOCKET` if it is set.
    pub fn from_env() -> Self {
        Self { enabled: std::env::var_os("NOTIFY_SOCKET").is_some_and(|s| !s.is_empty()) }
    }

    /// True when started by systemd with `Type=notify` (or anything that set `NOTIFY_SOCKET`).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(states) {
            tracing::warn!(error = %e, "cannot notify the service manager (NOTIFY_SOCKET)");
        }
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) {
        let status = one_line(status);
        self.send(&[NotifyState::Ready, NotifyState::Status(&status)]);
    }

    /// A `STATUS=` line (what `systemctl status` shows).
    pub fn status(&self, status: &str) {
        let status = one_line(status);
        self.send(&[NotifyState::Status(&status)]);
    }

    /// `WATCHDOG=1`: the daemon is alive and healthy.
    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    /// `STOPPING=1` with a status line.
    pub fn stopping(&self, status: &str) {
        let status = one_line(status);
        self.send(&[NotifyState::Stopping, NotifyState::Status(&status)]);
    }
}

/// The notification protocol is line-based: a status must not contain a newline.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// How often to pet the watchdog: half of `WATCHDOG_USEC`, when the watchdog is on for this
/// process (`WATCHDOG_PID` unset or this process).
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero()).map(|d| d / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_one_line() {
        assert_eq!(one_line("a\nb\r\nc"), "a b  c");
    }

    // The one test in this binary that sets the environment (edition 2024 `set_var` is unsafe
    // because another thread could read the environment meanwhile; no other test here does).
    #[test]
    fn ready_status_watchdog_and_stopping_reach_the_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let receiver = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        // SAFETY: see above; read back in this thread only.
        unsafe { std::env::set_var("NOTIFY_SOCKET", &path) };
        let notifier = Notifier::from_env();
        assert!(notifier.enabled());
        let mut buf = [0u8; 256];
        let mut next = || {
            let n = receiver.recv(&mut buf).unwrap();
            String::from_utf8(buf[..n].to_vec()).unwrap()
        };
        notifier.ready("serving\nlink A");
        assert_eq!(next(), "READY=1\nSTATUS=serving link A\n");
        notifier.status("1 link down");
        assert_eq!(next(), "STATUS=1 link down\n");
        notifier.watchdog();
        assert_eq!(next(), "WATCHDOG=1\n");
        notifier.stopping("bye");
        assert_eq!(next(), "STOPPING=1\nSTATUS=bye\n");
        // SAFETY: as above.
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        assert!(!Notifier::from_env().enabled());
    }
}
