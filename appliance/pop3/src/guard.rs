//! The per-account maildrop lock (RFC 1939 § 4: exclusive access while a session is in
//! TRANSACTION). Failed logins are throttled by the gateway's shared
//! [`qutemail_store::LoginThrottle`].

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};

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
}
