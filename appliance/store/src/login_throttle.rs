//! The failed-login throttle that every login front end (IMAP, POP3) shares, so that one
//! guessing run is slowed the same way whichever protocol it uses.
//!
//! It delays rather than locks out: each failed login for an account, and each failed login
//! from a client address, makes the next attempt for that account (or from that address) wait
//! longer, doubling up to [`LoginThrottleSettings::max_delay`]. An attacker who guesses
//! alice's password from many addresses therefore slows alice's own login by at most
//! `max_delay`; he cannot lock her out. Only an address that keeps failing beyond
//! [`LoginThrottleSettings::refuse_address_after`] is refused outright, until its failures
//! are forgotten; the same user from another address still gets in.
//!
//! IPv6 clients are counted per /64 (one customer's network), so that an attacker cannot
//! escape the address limit by rotating through the addresses of his own prefix.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How failed logins are throttled. [`Default`] gives the production values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginThrottleSettings {
    /// Failed logins (per account, per address) that cost nothing: typos.
    pub free_failures: u32,
    /// The wait after the first failure beyond the free ones; doubles with each further one.
    pub first_delay: Duration,
    /// The longest wait before a login attempt is checked.
    pub max_delay: Duration,
    /// Failed logins from one client address after which its logins are refused (also with the
    /// right password) until its failures are forgotten.
    pub refuse_address_after: u32,
    /// A count is forgotten this long after its last failure.
    pub forget_after: Duration,
}

impl Default for LoginThrottleSettings {
    /// 3 free failures, then 1 s doubling up to 30 s; an address is refused after 50 failures;
    /// counts are forgotten 15 minutes after the last failure.
    fn default() -> Self {
        Self {
            free_failures: 3,
            first_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(30),
            refuse_address_after: 50,
            forget_after: Duration::from_secs(15 * 60),
        }
    }
}

/// What the throttle says about a login attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginGate {
    /// Check the credentials after waiting this long (zero: at once).
    Proceed {
        /// The wait, at most [`LoginThrottleSettings::max_delay`].
        delay: Duration,
    },
    /// The client address failed too often: refuse without checking the credentials.
    AddressRefused {
        /// When its failures are forgotten.
        retry_after: Duration,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Account(String),
    Address(IpAddr),
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
}

/// Counts kept at most; beyond it the stale ones, then the older half, are dropped (bounds
/// memory under a spray of addresses or account names).
const MAX_ENTRIES: usize = 100_000;

/// Failed-login counts per account and per client address, in this process. Share one
/// (`Arc`) between all login front ends of a gateway.
#[derive(Debug, Default)]
pub struct LoginThrottle {
    settings: LoginThrottleSettings,
    failures: Mutex<HashMap<Key, Failures>>,
}

impl LoginThrottle {
    /// A throttle with `settings`.
    pub fn new(settings: LoginThrottleSettings) -> Self {
        Self { settings, failures: Mutex::default() }
    }

    /// The settings it applies.
    pub fn settings(&self) -> &LoginThrottleSettings {
        &self.settings
    }

    fn failures(&self) -> MutexGuard<'_, HashMap<Key, Failures>> {
        // Every update is one insert or remove, so the map is consistent even after a panic.
        self.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn keys(account: &str, address: IpAddr) -> [Key; 2] {
        let account =
            crate::normalize_address(account).unwrap_or_else(|_| account.trim().to_ascii_lowercase());
        let address = match address {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => {
                    let mut octets = v6.octets();
                    octets[8..].fill(0);
                    IpAddr::V6(octets.into())
                }
            },
            v4 => v4,
        };
        [Key::Account(account), Key::Address(address)]
    }

    /// The wait that `count` failures impose.
    fn delay_after(&self, count: u32) -> Duration {
        let s = &self.settings;
        if count < s.free_failures {
            return Duration::ZERO;
        }
        let doublings = (count - s.free_failures).min(30);
        s.first_delay.saturating_mul(1 << doublings).min(s.max_delay)
    }

    fn live(&self, f: &Failures, now: Instant) -> bool {
        now.saturating_duration_since(f.last) < self.settings.forget_after
    }

    /// Whether and when a login for `account` from `address` may be checked.
    pub fn gate(&self, account: &str, address: IpAddr, now: Instant) -> LoginGate {
        let [account_key, address_key] = Self::keys(account, address);
        let failures = self.failures();
        let live = |k: &Key| failures.get(k).filter(|f| self.live(f, now)).copied();
        let by_address = live(&address_key);
        if let Some(f) = by_address
            && f.count >= self.settings.refuse_address_after
        {
            let retry_after =
                self.settings.forget_after.saturating_sub(now.saturating_duration_since(f.last));
            return LoginGate::AddressRefused { retry_after };
        }
        let delay = [live(&account_key), by_address]
            .into_iter()
            .flatten()
            .map(|f| self.delay_after(f.count).saturating_sub(now.saturating_duration_since(f.last)))
            .max()
            .unwrap_or_default();
        LoginGate::Proceed { delay: delay.min(self.settings.max_delay) }
    }

    /// Counts a failed login for `account` from `address`.
    pub fn failed(&self, account: &str, address: IpAddr, now: Instant) {
        let mut failures = self.failures();
        if failures.len() >= MAX_ENTRIES {
            failures.retain(|_, f| self.live(f, now));
        }
        if failures.len() >= MAX_ENTRIES {
            let mut ages: Vec<Instant> = failures.values().map(|f| f.last).collect();
            let middle = ages.len() / 2;
            let (_, median, _) = ages.select_nth_unstable(middle);
            let median = *median;
            failures.retain(|_, f| f.last > median);
        }
        for key in Self::keys(account, address) {
            let f = failures.entry(key).or_insert(Failures { count: 0, last: now });
            if !self.live(f, now) {
                f.count = 0;
            }
            f.count = f.count.saturating_add(1);
            f.last = now;
        }
    }

    /// A successful login clears the account's count. The address keeps its count: one right
    /// password must not reset a guessing run against other accounts from there.
    pub fn succeeded(&self, account: &str, address: IpAddr) {
        let [account_key, _] = Self::keys(account, address);
        self.failures().remove(&account_key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> LoginThrottleSettings {
        LoginThrottleSettings {
            free_failures: 2,
            first_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(8),
            refuse_address_after: 10,
            forget_after: Duration::from_secs(600),
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn delay(gate: LoginGate) -> Duration {
        match gate {
            LoginGate::Proceed { delay } => delay,
            refused => panic!("expected a delay, got {refused:?}"),
        }
    }

    #[test]
    fn failures_of_an_account_delay_its_next_login_progressively_up_to_the_cap() {
        let t = LoginThrottle::new(settings());
        let t0 = Instant::now();
        let (attacker, user) = (ip("192.0.2.66"), ip("198.51.100.7"));
        t.failed("alice@a.example", attacker, t0);
        t.failed("alice@a.example", attacker, t0);
        assert_eq!(delay(t.gate("alice@a.example", user, t0)), Duration::from_secs(1));
        t.failed("Alice@A.example", attacker, t0);
        assert_eq!(delay(t.gate("alice@a.example", user, t0)), Duration::from_secs(2), "case-insensitive");
        for _ in 0..6 {
            t.failed("alice@a.example", attacker, t0);
        }
        assert_eq!(delay(t.gate("alice@a.example", user, t0)), Duration::from_secs(8), "capped");
        // The delay counts from the last failure, so it runs out.
        assert_eq!(
            delay(t.gate("alice@a.example", user, t0 + Duration::from_secs(5))),
            Duration::from_secs(3)
        );
        assert_eq!(delay(t.gate("alice@a.example", user, t0 + Duration::from_secs(9))), Duration::ZERO);
        // Another account from the user's address is not slowed.
        assert_eq!(delay(t.gate("bob@a.example", user, t0)), Duration::ZERO);
        t.succeeded("alice@a.example", user);
        assert_eq!(delay(t.gate("alice@a.example", user, t0)), Duration::ZERO);
    }

    #[test]
    fn an_address_is_delayed_then_refused_while_the_account_stays_open_elsewhere() {
        let t = LoginThrottle::new(settings());
        let t0 = Instant::now();
        let (attacker, user) = (ip("192.0.2.66"), ip("198.51.100.7"));
        for n in 0..10 {
            t.failed(&format!("user{n}@a.example"), attacker, t0);
        }
        assert_eq!(
            t.gate("alice@a.example", attacker, t0),
            LoginGate::AddressRefused { retry_after: Duration::from_secs(600) }
        );
        assert_eq!(
            delay(t.gate("alice@a.example", user, t0)),
            Duration::ZERO,
            "alice elsewhere is not slowed"
        );
        assert_eq!(delay(t.gate("user1@a.example", user, t0)), Duration::ZERO);
        let later = t0 + Duration::from_secs(600);
        assert_eq!(delay(t.gate("alice@a.example", attacker, later)), Duration::ZERO, "forgotten");
        t.failed("carol@a.example", attacker, later);
        assert_eq!(delay(t.gate("dave@a.example", attacker, later)), Duration::ZERO, "the count starts over");
    }

    #[test]
    fn ipv6_clients_are_counted_per_64_prefix() {
        let t = LoginThrottle::new(settings());
        let t0 = Instant::now();
        for n in 0..10 {
            t.failed("alice@a.example", ip(&format!("2001:db8:1:2::{n:x}")), t0);
        }
        assert!(matches!(
            t.gate("bob@a.example", ip("2001:db8:1:2:ffff::1"), t0),
            LoginGate::AddressRefused { .. }
        ));
        assert!(matches!(t.gate("bob@a.example", ip("2001:db8:1:3::1"), t0), LoginGate::Proceed { .. }));
    }

    #[test]
    fn memory_stays_bounded_under_a_spray_of_addresses() {
        let t = LoginThrottle::new(settings());
        let t0 = Instant::now();
        for n in 0..(MAX_ENTRIES as u32 + 10) {
            t.failed("alice@a.example", IpAddr::V4(n.into()), t0 + Duration::from_millis(u64::from(n)));
        }
        assert!(t.failures().len() <= MAX_ENTRIES);
        assert!(
            matches!(t.gate("alice@a.example", ip("127.0.0.1"), t0), LoginGate::Proceed { delay } if delay > Duration::ZERO),
            "the account's count survives"
        );
    }
}
