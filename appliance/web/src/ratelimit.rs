//! Login rate limiting, per account and per client address.
//!
//! Failed logins are counted in a sliding window. Past a free allowance, each further attempt
//! must wait an exponentially growing delay after the last failure, capped at
//! [`MAX_DELAY`]: guessing becomes slow, but nobody (not even an attacker hammering a
//! victim's address) can lock an account out for longer than that cap. A successful login
//! clears the account's and the address's record.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Longest wait ever imposed.
pub const MAX_DELAY: Duration = Duration::from_secs(300);
/// Failures are forgotten this long after the last one.
const WINDOW: Duration = Duration::from_secs(900);
/// Failures per account before delays start.
const ACCOUNT_FREE: u32 = 5;
/// Failures per client address before delays start (several users may share one address).
const ADDRESS_FREE: u32 = 20;
/// Entries kept at most per table; the oldest are dropped beyond it (memory stays bounded).
const MAX_ENTRIES: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct Record {
    failures: u32,
    last: Instant,
}

/// The limiter (in memory, per gateway process).
#[derive(Debug, Default)]
pub struct LoginLimiter {
    accounts: Mutex<HashMap<String, Record>>,
    addresses: Mutex<HashMap<IpAddr, Record>>,
}

fn wait_for(record: Option<&Record>, free: u32, now: Instant) -> Option<Duration> {
    let r = record?;
    if now.duration_since(r.last) >= WINDOW || r.failures < free {
        return None;
    }
    let exp = (r.failures - free).min(16);
    let delay = Duration::from_secs(1u64 << exp).min(MAX_DELAY);
    let ready = r.last + delay;
    (ready > now).then(|| ready - now)
}

fn note<K: std::hash::Hash + Eq + Clone>(map: &mut HashMap<K, Record>, key: K, now: Instant) {
    if map.len() >= MAX_ENTRIES {
        map.retain(|_, r| now.duration_since(r.last) < WINDOW);
    }
    if map.len() >= MAX_ENTRIES {
        // Still full of live entries: forget the oldest one rather than grow without bound.
        if let Some(oldest) = map.iter().min_by_key(|(_, r)| r.last).map(|(k, _)| k.clone()) {
            map.remove(&oldest);
        }
    }
    let e = map.entry(key).or_insert(Record { failures: 0, last: now });
    if now.duration_since(e.last) >= WINDOW {
        e.failures = 0;
    }
    e.failures = e.failures.saturating_add(1);
    e.last = now;
}

impl LoginLimiter {
    /// How long `account` from `client` must still wait before an attempt is judged (`None`: go
    /// ahead).
    pub fn check(&self, account: &str, client: IpAddr) -> Option<Duration> {
        let now = Instant::now();
        let a = self.accounts.lock().ok().and_then(|m| wait_for(m.get(account), ACCOUNT_FREE, now));
        let c = self.addresses.lock().ok().and_then(|m| wait_for(m.get(&client), ADDRESS_FREE, now));
        a.max(c)
    }

    /// Records a failed attempt.
    pub fn failed(&self, account: &str, client: IpAddr) {
        let now = Instant::now();
        if let Ok(mut m) = self.accounts.lock() {
            note(&mut m, account.to_owned(), now);
        }
        if let Ok(mut m) = self.addresses.lock() {
            note(&mut m, client, now);
        }
    }

    /// Records a success: the account's and the address's failures are forgotten.
    pub fn succeeded(&self, account: &str, client: IpAddr) {
        if let Ok(mut m) = self.accounts.lock() {
            m.remove(account);
        }
        if let Ok(mut m) = self.addresses.lock() {
            m.remove(&client);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_after_the_allowance_and_stay_capped() {
        let l = LoginLimiter::default();
        let ip: IpAddr = [192, 0, 2, 1].into();
        for _ in 0..ACCOUNT_FREE {
            assert_eq!(l.check("a@x", ip), None);
            l.failed("a@x", ip);
        }
        let d = l.check("a@x", ip).unwrap();
        assert!(d <= Duration::from_secs(1) && d > Duration::ZERO, "{d:?}");
        for _ in 0..40 {
            l.failed("a@x", ip);
        }
        assert!(l.check("a@x", ip).unwrap() <= MAX_DELAY);
        // Another account from another address is not affected; success clears.
        assert_eq!(l.check("b@x", [192, 0, 2, 2].into()), None);
        l.succeeded("a@x", ip);
        assert_eq!(l.check("a@x", ip), None);
    }
}
