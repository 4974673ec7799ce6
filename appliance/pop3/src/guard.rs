//! What protects accounts across sessions: the per-account maildrop lock (RFC 1939 § 4:
//! exclusive access while a session is in TRANSACTION) and the failed-login limits.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The locked maildrops of this process. In-process only: gateway nodes sharing one
/// PostgreSQL store do not see each other's locks (see the README).
#[derive(Debug, Clone, Default)]
pub(crate) struct MaildropLocks {
    held: Arc<Mutex<HashSet<String>>>,
}

/// One held maildrop lock, released when dropped (QUIT, disconnect, timeout, panic).
#[derive(Debug)]
pub(crate) struct MaildropLock {
    held: Arc<Mutex<HashSet<String>>>,
    account: String,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The sets stay consistent even if a holder panicked: every update is one insert/remove.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl MaildropLocks {
    /// Locks the maildrop of `account` (its address as the store spells it, lower-cased), or
    /// `None` if another session holds it.
    pub(crate) fn try_lock(&self, account: &str) -> Option<MaildropLock> {
        lock(&self.held)
            .insert(account.to_owned())
            .then(|| MaildropLock { held: self.held.clone(), account: account.to_owned() })
    }
}

impl Drop for MaildropLock {
    fn drop(&mut self) {
        lock(&self.held).remove(&self.account);
    }
}

/// Limits on failed logins, per account and per client address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginLimits {
    /// Failed logins for one account within `window` after which its logins are refused with
    /// `[SYS/TEMP]` until the window has passed (also with the right password).
    pub per_account: u32,
    /// Failed logins from one address within `window` after which its logins are refused.
    pub per_address: u32,
    /// The window.
    pub window: Duration,
}

impl Default for LoginLimits {
    fn default() -> Self {
        LoginLimits { per_account: 5, per_address: 20, window: Duration::from_secs(15 * 60) }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Account(String),
    Address(IpAddr),
}

#[derive(Debug, Clone, Copy)]
struct Window {
    since: Instant,
    failures: u32,
}

/// Failed-login counters; entries older than the window are forgotten.
#[derive(Debug, Default)]
pub(crate) struct LoginLimiter {
    limits: LoginLimits,
    windows: Mutex<HashMap<Key, Window>>,
}

/// Entries kept before expired ones are swept (bounds memory under a spray of addresses).
const SWEEP_ABOVE: usize = 10_000;

impl LoginLimiter {
    pub(crate) fn new(limits: LoginLimits) -> Self {
        LoginLimiter { limits, windows: Mutex::default() }
    }

    fn keys(account: &str, address: IpAddr) -> [(Key, u32); 2] {
        [(Key::Account(account.to_ascii_lowercase()), 0), (Key::Address(address), 1)]
    }

    fn limit(&self, which: u32) -> u32 {
        if which == 0 { self.limits.per_account } else { self.limits.per_address }
    }

    /// Whether logins for `account` from `address` are refused right now.
    pub(crate) fn is_limited(&self, account: &str, address: IpAddr, now: Instant) -> bool {
        let windows = lock(&self.windows);
        Self::keys(account, address).into_iter().any(|(key, which)| {
            windows.get(&key).is_some_and(|w| {
                now.duration_since(w.since) < self.limits.window && w.failures >= self.limit(which)
            })
        })
    }

    /// Counts a failed login.
    pub(crate) fn failed(&self, account: &str, address: IpAddr, now: Instant) {
        let mut windows = lock(&self.windows);
        if windows.len() > SWEEP_ABOVE {
            let window = self.limits.window;
            windows.retain(|_, w| now.duration_since(w.since) < window);
        }
        for (key, _) in Self::keys(account, address) {
            let w = windows.entry(key).or_insert(Window { since: now, failures: 0 });
            if now.duration_since(w.since) >= self.limits.window {
                *w = Window { since: now, failures: 0 };
            }
            w.failures = w.failures.saturating_add(1);
        }
    }

    /// A successful login clears the account's count (not the address's: one right password
    /// must not reset a guessing run against other accounts).
    pub(crate) fn succeeded(&self, account: &str) {
        lock(&self.windows).remove(&Key::Account(account.to_ascii_lowercase()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_maildrop_is_locked_once_and_released_when_the_lock_is_dropped() {
        let locks = MaildropLocks::default();
        let first = locks.try_lock("alice@a.example").unwrap();
        assert!(locks.try_lock("alice@a.example").is_none());
        assert!(locks.try_lock("bob@a.example").is_some());
        drop(first);
        assert!(locks.try_lock("alice@a.example").is_some());
    }

    #[test]
    fn failed_logins_are_limited_per_account_and_per_address_within_the_window() {
        let limits = LoginLimits { per_account: 2, per_address: 3, window: Duration::from_secs(60) };
        let l = LoginLimiter::new(limits);
        let t0 = Instant::now();
        let (ip1, ip2): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        l.failed("Alice@A.example", ip1, t0);
        assert!(!l.is_limited("alice@a.example", ip1, t0));
        l.failed("alice@a.example", ip2, t0);
        assert!(l.is_limited("ALICE@a.example", ip1, t0), "per account, whatever the address");
        assert!(!l.is_limited("bob@a.example", ip2, t0));
        l.failed("carol@a.example", ip2, t0);
        l.failed("dave@a.example", ip2, t0);
        assert!(l.is_limited("bob@a.example", ip2, t0), "per address, whatever the account");
        assert!(!l.is_limited("bob@a.example", ip1, t0));
        let later = t0 + Duration::from_secs(61);
        assert!(!l.is_limited("alice@a.example", ip1, later), "the window passes");
        l.succeeded("alice@a.example");
        assert!(!l.is_limited("alice@a.example", ip1, t0));
    }
}
