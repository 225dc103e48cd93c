//! How long to wait before retrying a failed reconcile or a conflicting write.
//!
//! Retries double up to a ceiling, and each is spread by a jitter derived from the object's name:
//! when the API server is overloaded, a thousand tenants that failed together must not all come
//! back at the same instant and overload it again.

use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::time::Duration;

/// `first` after the first failure, doubling per further failure up to `ceiling`, then scaled
/// by a factor in [0.75, 1.25) that is fixed for a given `key` and `failures`.
pub fn retry_delay(key: &str, failures: u32, first: Duration, ceiling: Duration) -> Duration {
    let doubled = first.saturating_mul(1 << failures.saturating_sub(1).min(20));
    let base = doubled.min(ceiling);
    // A fixed hasher, so the spread is reproducible (and testable) across processes.
    let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one((key, failures));
    let jitter = 0.75 + (hash % 1000) as f64 / 2000.0;
    base.mul_f64(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIRST: Duration = Duration::from_secs(1);
    const CEILING: Duration = Duration::from_secs(60);

    #[test]
    fn doubles_up_to_the_ceiling_within_the_jitter() {
        for (failures, base) in [
            (1, 1.0),
            (2, 2.0),
            (3, 4.0),
            (6, 32.0),
            (7, 60.0),
            (40, 60.0),
        ] {
            let delay = retry_delay("tenant-a", failures, FIRST, CEILING).as_secs_f64();
            assert!(
                (0.75 * base..1.25 * base).contains(&delay),
                "{failures} failures: {delay} s, base {base} s"
            );
        }
    }

    #[test]
    fn spreads_objects_that_failed_together() {
        let delays: std::collections::HashSet<Duration> = (0..100)
            .map(|i| retry_delay(&format!("tenant-{i}"), 3, FIRST, CEILING))
            .collect();
        assert!(delays.len() > 50, "only {} distinct delays", delays.len());
        assert_eq!(
            retry_delay("tenant-a", 3, FIRST, CEILING),
            retry_delay("tenant-a", 3, FIRST, CEILING)
        );
    }
}
