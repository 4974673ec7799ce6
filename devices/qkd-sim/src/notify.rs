//! systemd `Type=notify` for `qkd-sim run` (`image/systemd/qkd-sim.service`): `READY=1` once
//! the simulated devices are up, `WATCHDOG=1` at half of `WATCHDOG_USEC`, `STOPPING=1`.
//!
//! The protocol is one datagram of `KEY=value` lines to the socket named by `$NOTIFY_SOCKET`
//! (a path, or `@name` for the abstract namespace); sd_notify(3). It is written out here, a
//! few lines, so that the simulator, which vendors take as a reference, needs no systemd
//! library. Without `NOTIFY_SOCKET` (not started by systemd) nothing is sent.

use std::os::linux::net::SocketAddrExt as _;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Sends `state` (newline-separated `KEY=value` lines) to the service manager; failures are
/// logged, never fatal: the simulator runs the same with or without systemd.
pub fn send(state: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty()) else { return };
    let result = (|| {
        let socket = UnixDatagram::unbound()?;
        let bytes = target.as_encoded_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => SocketAddr::from_abstract_name(name)?,
            None => SocketAddr::from_pathname(&target)?,
        };
        socket.send_to_addr(state.as_bytes(), &addr).map(|_| ())
    })();
    if let Err(e) = result {
        tracing::warn!(error = %e, "cannot notify the service manager (NOTIFY_SOCKET)");
    }
}

/// Half of `WATCHDOG_USEC` when the watchdog is on for this process (`WATCHDOG_PID` unset or
/// this process).
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec) / 2)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_ready_message_reaches_a_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let receiver = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        // SAFETY (edition 2024 set_var): this test sets the variable and reads it back in the same
        // thread; no other test in this binary reads NOTIFY_SOCKET.
        unsafe { std::env::set_var("NOTIFY_SOCKET", &path) };
        super::send("READY=1\nSTATUS=up");
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=up");
    }
}
