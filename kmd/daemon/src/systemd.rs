//! systemd integration: `Type=notify` readiness, `STATUS=` lines, the watchdog and `STOPPING=1`
//! (through the `sd-notify` crate, which sends datagrams to `$NOTIFY_SOCKET`).
//!
//! Without `NOTIFY_SOCKET` (not started by systemd) every call is a no-op. `NOTIFY_SOCKET` is
//! left in the environment: kmd starts no child processes that could inherit it.
//!
//! The watchdog is petted by the main loop at half of `WATCHDOG_USEC` (when `WATCHDOG_PID` is
//! unset or names this process), and only while the daemon is healthy: see `app`.

use std::time::Duration;

use sd_notify::NotifyState;

/// Sends state changes to the service manager.
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

    /// A `STATUS=` line.
    pub fn status(&self, status: &str) {
        let status = one_line(status);
        self.send(&[NotifyState::Status(&status)]);
    }

    /// `WATCHDOG=1`.
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

/// How often to pet the watchdog: half of `WATCHDOG_USEC`, if the watchdog is enabled for this
/// process.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero()).map(|d| d / 2)
}

#[cfg(test)]
mod tests {
    #[test]
    fn status_is_one_line() {
        assert_eq!(super::one_line("a\nb\r\nc"), "a b  c");
    }
}
