//! Socket activation for `qutemail serve` (the `sd_listen_fds` protocol: `LISTEN_PID`,
//! `LISTEN_FDS`, `LISTEN_FDNAMES`, descriptors from 3). Readiness, status and the watchdog are
//! the daemons' shared `qutemail_service_notify`.
//!
//! The appliance's `.socket` units bind the privileged ports (25, 587, 465,
//! 143, 993, 110, 995, 443) and name each socket with `FileDescriptorName=` after the listener
//! it carries ([`LISTENER_NAMES`]). `serve` takes the inherited sockets of a listener instead of
//! binding its configured address; a listener with no inherited socket binds as before. A
//! socket with a name the gateway does not know, or for a listener the configuration does not
//! enable, stops the start with an error that names it: a socket nobody serves would accept
//! connections that are never answered.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};

/// The names a listening socket can carry (`FileDescriptorName=` in its `.socket` unit), one
/// per gateway listener, as `qutemail serve` reports them in its `READY` line.
pub const LISTENER_NAMES: [&str; 8] =
    ["smtp-mx", "smtp-submission", "smtp-submissions", "imap", "imaps", "pop3", "pop3s", "web"];

/// The configuration section that enables a listener.
fn section_of(name: &str) -> &'static str {
    match name {
        "smtp-mx" => "[smtp] mx_listen",
        "smtp-submission" => "[smtp] submission_listen",
        "smtp-submissions" => "[smtp] submissions_listen",
        "imap" => "[imap] listen",
        "imaps" => "[imap] tls_listen",
        "pop3" => "[pop3] listen",
        "pop3s" => "[pop3] tls_listen",
        _ => "[web]",
    }
}

/// The sockets passed by the service manager could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SocketActivationError {
    /// `LISTEN_PID`, `LISTEN_FDS` or `LISTEN_FDNAMES` is malformed.
    #[error("the service manager's socket hand-over (LISTEN_FDS, LISTEN_FDNAMES) cannot be read: {0}")]
    Environment(#[source] std::io::Error),
    /// A socket's name is not one of [`LISTENER_NAMES`].
    #[error(
        "the service manager passed a socket named {name:?} (file descriptor {fd}), which is not a \
         gateway listener; set FileDescriptorName= in its .socket unit to one of: {}",
        LISTENER_NAMES.join(", ")
    )]
    UnknownName {
        /// The name (`unknown` when the service manager gave none).
        name: String,
        /// Its file descriptor.
        fd: RawFd,
    },
    /// The descriptor is not a listening TCP socket (e.g. `ListenDatagram=` or a FIFO).
    #[error("the socket named {name:?} (file descriptor {fd}) is not a listening TCP socket: {reason}")]
    NotTcpListener {
        /// Its name.
        name: String,
        /// Its file descriptor.
        fd: RawFd,
        /// What it is instead.
        reason: String,
    },
    /// A socket was passed for a listener that the configuration does not enable.
    #[error(
        "the service manager passed the socket {name:?}, but the configuration does not enable that \
         listener ({section}); enable it there, or disable the .socket unit that carries it"
    )]
    Unused {
        /// The socket's name.
        name: String,
        /// The configuration key that enables its listener.
        section: &'static str,
    },
}

/// Listening sockets inherited from the service manager, by listener name. A `.socket` unit
/// with several `ListenStream=` lines passes several sockets under one name; all are served.
#[derive(Debug, Default)]
pub struct InheritedListeners {
    by_name: BTreeMap<String, Vec<std::net::TcpListener>>,
}

impl InheritedListeners {
    /// Takes the sockets passed with `LISTEN_FDS` to this process (`LISTEN_PID`); none when the
    /// variables are absent or meant for another process.
    ///
    /// Call it once, before anything else opens files: it takes ownership of descriptors 3 to
    /// 3 + `LISTEN_FDS` − 1 (and marks them close-on-exec). The variables stay set; only this
    /// process matches `LISTEN_PID`, so a child process would ignore them.
    pub fn from_env() -> Result<Self, SocketActivationError> {
        let passed = sd_notify::listen_fds_with_names().map_err(SocketActivationError::Environment)?;
        let owned = passed
            .map(|(fd, name)| {
                // SAFETY: under the sd_listen_fds protocol the service manager hands this process
                // descriptors 3.. (LISTEN_FDS of them, LISTEN_PID checked by `listen_fds`); nothing
                // else in the process owns them, and `from_env` is called once, so each descriptor
                // gets exactly one owner.
                (unsafe { OwnedFd::from_raw_fd(fd) }, name)
            })
            .collect();
        Self::from_named(owned)
    }

    /// Checks and groups named descriptors: each name must be a [`LISTENER_NAMES`] entry and
    /// each descriptor a listening TCP socket (it is switched to non-blocking for tokio).
    pub fn from_named(passed: Vec<(OwnedFd, String)>) -> Result<Self, SocketActivationError> {
        let mut by_name: BTreeMap<String, Vec<std::net::TcpListener>> = BTreeMap::new();
        for (fd, name) in passed {
            let raw = fd.as_raw_fd();
            if !LISTENER_NAMES.contains(&name.as_str()) {
                return Err(SocketActivationError::UnknownName { name, fd: raw });
            }
            let not_tcp = |reason: String| SocketActivationError::NotTcpListener {
                name: name.clone(),
                fd: raw,
                reason,
            };
            use nix::sys::socket::{SockType, getsockopt, sockopt};
            match getsockopt(&fd, sockopt::SockType) {
                Ok(SockType::Stream) => {}
                Ok(other) => return Err(not_tcp(format!("a {other:?} socket, not a stream socket"))),
                Err(e) => return Err(not_tcp(format!("not a socket ({e})"))),
            }
            match getsockopt(&fd, sockopt::AcceptConn) {
                Ok(true) => {}
                Ok(false) => return Err(not_tcp("a stream socket that is not listening".into())),
                Err(e) => return Err(not_tcp(format!("cannot ask whether it listens ({e})"))),
            }
            let listener = std::net::TcpListener::from(fd);
            // An AF_UNIX stream socket has no IP address: refused here, not at the first accept.
            listener.local_addr().map_err(|e| not_tcp(format!("not an IPv4/IPv6 socket ({e})")))?;
            listener
                .set_nonblocking(true)
                .map_err(|e| not_tcp(format!("cannot make it non-blocking ({e})")))?;
            by_name.entry(name).or_default().push(listener);
        }
        Ok(Self { by_name })
    }

    /// Takes the sockets named `name` (empty when none was passed), as tokio listeners. Must
    /// be called within a tokio runtime.
    pub fn take(&mut self, name: &str) -> std::io::Result<Vec<tokio::net::TcpListener>> {
        self.by_name
            .remove(name)
            .unwrap_or_default()
            .into_iter()
            .map(tokio::net::TcpListener::from_std)
            .collect()
    }

    /// Errors when a socket was not taken: the configuration does not enable its listener.
    pub fn finish(self) -> Result<(), SocketActivationError> {
        match self.by_name.into_keys().next() {
            None => Ok(()),
            Some(name) => {
                let section = section_of(&name);
                Err(SocketActivationError::Unused { name, section })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listening(name: &str) -> (OwnedFd, String) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        (OwnedFd::from(l), name.to_owned())
    }

    #[test]
    fn sockets_are_grouped_by_listener_name() {
        let mut inherited = InheritedListeners::from_named(vec![
            listening("smtp-mx"),
            listening("imaps"),
            listening("smtp-mx"),
        ])
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().unwrap();
        let _guard = rt.enter();
        assert_eq!(inherited.take("smtp-mx").unwrap().len(), 2, "both ListenStream= sockets are served");
        assert!(inherited.take("smtp-submission").unwrap().is_empty());
        let e = inherited.finish().unwrap_err().to_string();
        assert!(e.contains("\"imaps\"") && e.contains("[imap] tls_listen"), "{e}");
    }

    #[test]
    fn every_listener_name_is_accepted_and_maps_to_its_section() {
        let passed = LISTENER_NAMES.iter().map(|n| listening(n)).collect();
        let mut inherited = InheritedListeners::from_named(passed).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().unwrap();
        let _guard = rt.enter();
        for name in LISTENER_NAMES {
            assert_eq!(inherited.take(name).unwrap().len(), 1, "{name}");
        }
        inherited.finish().unwrap();
        assert_eq!(section_of("smtp-submissions"), "[smtp] submissions_listen");
        assert_eq!(section_of("pop3"), "[pop3] listen");
        assert_eq!(section_of("web"), "[web]");
    }

    #[test]
    fn an_unknown_or_missing_name_is_refused_with_the_names_to_use() {
        let e = InheritedListeners::from_named(vec![listening("smtp")]).unwrap_err().to_string();
        assert!(e.contains("named \"smtp\""), "{e}");
        assert!(e.contains("FileDescriptorName=") && e.contains("smtp-mx, smtp-submission"), "{e}");
        // Without LISTEN_FDNAMES every socket is called "unknown".
        let e = InheritedListeners::from_named(vec![listening("unknown")]).unwrap_err().to_string();
        assert!(e.contains("named \"unknown\""), "{e}");
    }

    #[test]
    fn a_socket_that_does_not_listen_for_tcp_is_refused() {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let e = InheritedListeners::from_named(vec![(OwnedFd::from(udp), "smtp-mx".into())])
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"smtp-mx\"") && e.contains("not a listening TCP socket"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let unix = std::os::unix::net::UnixListener::bind(dir.path().join("s")).unwrap();
        let e = InheritedListeners::from_named(vec![(OwnedFd::from(unix), "imap".into())])
            .unwrap_err()
            .to_string();
        assert!(e.contains("not an IPv4/IPv6 socket"), "{e}");
        let file = std::fs::File::open("/dev/null").unwrap();
        let e = InheritedListeners::from_named(vec![(OwnedFd::from(file), "pop3".into())])
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a socket"), "{e}");
    }
}
