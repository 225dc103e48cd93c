//! Per-user rate limit: each user may make `--rate-limit-per-minute` authenticated requests per
//! minute, with bursts up to that number (GCRA, so the budget refills continuously). Keyed by
//! the authenticated user, not the address: users behind one NAT do not starve each other, and
//! one user cannot escape the limit by switching networks.

use std::num::NonZeroU32;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

pub struct RateLimiter {
    limiter: DefaultKeyedRateLimiter<String>,
    clock: DefaultClock,
}

impl RateLimiter {
    pub fn per_minute(requests: NonZeroU32) -> Self {
        Self {
            limiter: governor::RateLimiter::keyed(Quota::per_minute(requests)),
            clock: DefaultClock::default(),
        }
    }

    /// `Err(seconds to wait)` when the user is over the limit.
    pub fn check(&self, user: &str) -> Result<(), u64> {
        self.limiter
            .check_key(&user.to_string())
            .map_err(|not_until| {
                let wait = not_until.wait_time_from(self.clock.now());
                wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
            })
    }

    /// Forgets users whose budget is full again, bounding memory.
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_user_has_a_budget() {
        let limiter = RateLimiter::per_minute(NonZeroU32::new(3).unwrap());
        for _ in 0..3 {
            assert!(limiter.check("alice").is_ok());
        }
        let wait = limiter.check("alice").unwrap_err();
        assert!(
            (1..=20).contains(&wait),
            "one request refills in 20 s, got {wait}"
        );
        assert!(limiter.check("bob").is_ok(), "bob has his own budget");
        limiter.forget_idle();
    }
}
