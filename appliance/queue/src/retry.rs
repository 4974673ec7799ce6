//! When a message that could not be delivered is tried again, and when the queue gives up.

use std::time::Duration;

use serde::Deserialize;

/// The retry schedule: delays after each failed attempt (the last one repeats), a delay warning
/// and a give-up age, as RFC 5321 § 4.5.4.1 suggests (retry for at least 4–5 days).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Delay after the first, second, … failed attempt, seconds; the last repeats.
    #[serde(default = "default_delays")]
    pub delays_s: Vec<u64>,
    /// After this long undelivered, the sender gets a "delayed" DSN (once), seconds.
    #[serde(default = "default_warn")]
    pub warn_after_s: u64,
    /// After this long undelivered, the queue gives up and bounces, seconds.
    #[serde(default = "default_give_up")]
    pub give_up_after_s: u64,
}

fn default_delays() -> Vec<u64> {
    vec![60, 300, 900, 1800, 3600, 7200, 14_400]
}

fn default_warn() -> u64 {
    4 * 3600
}

fn default_give_up() -> u64 {
    5 * 86_400
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { delays_s: default_delays(), warn_after_s: default_warn(), give_up_after_s: default_give_up() }
    }
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextStep {
    /// Try again after this delay.
    RetryIn(Duration),
    /// Give up: bounce to the sender.
    GiveUp,
}

impl RetryPolicy {
    /// The step after `attempts` failed attempts (1 after the first), the message having been
    /// queued `age` ago.
    pub fn after_failure(&self, attempts: u32, age: Duration) -> NextStep {
        if age >= Duration::from_secs(self.give_up_after_s) {
            return NextStep::GiveUp;
        }
        let index = (attempts.max(1) - 1) as usize;
        let delay = self.delays_s.get(index).or(self.delays_s.last()).copied().unwrap_or(300);
        // Never schedule past the give-up age: the last attempt happens at it.
        let left = Duration::from_secs(self.give_up_after_s).saturating_sub(age);
        NextStep::RetryIn(Duration::from_secs(delay).min(left).max(Duration::from_secs(1)))
    }

    /// Whether a "delayed" warning is due for a message queued `age` ago.
    pub fn warning_due(&self, age: Duration) -> bool {
        age >= Duration::from_secs(self.warn_after_s)
    }

    /// Checks the schedule makes sense.
    pub fn validate(&self) -> Result<(), String> {
        if self.delays_s.is_empty() || self.delays_s.contains(&0) {
            return Err("delays_s must list at least one positive delay".into());
        }
        if self.give_up_after_s == 0 {
            return Err("give_up_after_s must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_follow_the_schedule_and_stop_at_the_give_up_age() {
        let p = RetryPolicy::default();
        assert_eq!(p.after_failure(1, Duration::ZERO), NextStep::RetryIn(Duration::from_secs(60)));
        assert_eq!(p.after_failure(2, Duration::from_secs(60)), NextStep::RetryIn(Duration::from_secs(300)));
        assert_eq!(
            p.after_failure(50, Duration::from_secs(86_400)),
            NextStep::RetryIn(Duration::from_secs(14_400))
        );
        let near_end = Duration::from_secs(5 * 86_400 - 100);
        assert_eq!(p.after_failure(50, near_end), NextStep::RetryIn(Duration::from_secs(100)));
        assert_eq!(p.after_failure(51, Duration::from_secs(5 * 86_400)), NextStep::GiveUp);
        assert!(!p.warning_due(Duration::from_secs(3600)));
        assert!(p.warning_due(Duration::from_secs(4 * 3600)));
        assert!(RetryPolicy { delays_s: vec![], ..p.clone() }.validate().is_err());
    }
}
