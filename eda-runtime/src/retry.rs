//! How transient failures are retried.

use std::time::Duration;

/// Exponential backoff with jitter, up to a number of attempts, after which the event is
/// dead-lettered.
///
/// ```
/// use eda::RetryPolicy;
/// use std::time::Duration;
///
/// let policy = RetryPolicy { max_attempts: 4, initial_backoff: Duration::from_millis(100), ..RetryPolicy::default() };
/// let third = policy.backoff(3); // before the third attempt: about 200 ms, jittered
/// assert!(third >= Duration::from_millis(100) && third <= Duration::from_millis(200));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; at least 1.
    pub max_attempts: u32,
    /// The wait before the second attempt.
    pub initial_backoff: Duration,
    /// The longest wait between attempts.
    pub max_backoff: Duration,
    /// How much each wait grows.
    pub multiplier: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            multiplier: 2.0,
        }
    }
}

impl RetryPolicy {
    /// The wait before attempt `attempt` (2 for the first retry): exponential, capped, and
    /// jittered to between half and all of it so that retries of many events spread out.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(2).min(64) as i32;
        let full = self.initial_backoff.as_secs_f64() * self.multiplier.max(1.0).powi(exponent);
        let capped = full.min(self.max_backoff.as_secs_f64());
        Duration::from_secs_f64(capped * (0.5 + fastrand::f64() * 0.5))
    }

    /// True when a failed attempt `attempt` may be followed by another.
    pub fn may_retry(&self, attempt: u32) -> bool {
        attempt < self.max_attempts.max(1)
    }
}
