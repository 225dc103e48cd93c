//! How many inference replicas a tenant should run.

use std::time::Duration;

use jiff::Timestamp;

pub struct ScalingInput {
    pub min_replicas: u32,
    /// `maxReplicas` bounded by the GPU budget.
    pub ceiling: u32,
    /// Jobs one replica runs at once.
    pub concurrency: u32,
    /// Jobs queued or running now.
    pub demand: u32,
    pub current: u32,
    /// Last moment a job was queued or running.
    pub last_active: Option<Timestamp>,
    pub scale_down_after: Duration,
    pub now: Timestamp,
}

/// Enough replicas for the demand, within `[minReplicas, ceiling]`. Without demand, replicas stay
/// as they are until the tenant has been idle for `scaleDownAfter`, so a user who generates an
/// image every few minutes does not pay a cold start each time.
pub fn desired_replicas(input: &ScalingInput) -> u32 {
    let floor = input.min_replicas.min(input.ceiling);
    if let Some(needed) = replicas_for_demand(
        input.demand,
        input.concurrency,
        input.min_replicas,
        input.ceiling,
    ) {
        return needed;
    }
    let idle_long_enough = match input.last_active {
        None => true,
        Some(last) => input.now.duration_since(last).unsigned_abs() >= input.scale_down_after,
    };
    if idle_long_enough {
        floor
    } else {
        input.current.clamp(floor, input.ceiling.max(floor))
    }
}

/// The replicas that `demand` jobs ask for, within `[minReplicas, ceiling]`; `None` without
/// demand, when idle time decides instead.
pub fn replicas_for_demand(
    demand: u32,
    concurrency: u32,
    min_replicas: u32,
    ceiling: u32,
) -> Option<u32> {
    let floor = min_replicas.min(ceiling);
    (demand > 0).then(|| {
        demand
            .div_ceil(concurrency.max(1))
            .clamp(floor, ceiling.max(floor))
    })
}

/// When the next scale-down decision is due, so the controller can requeue exactly then.
pub fn scale_down_due_in(input: &ScalingInput) -> Option<Duration> {
    if input.demand > 0 || input.current <= input.min_replicas {
        return None;
    }
    let last = input.last_active?;
    let idle = input.now.duration_since(last).unsigned_abs();
    input
        .scale_down_after
        .checked_sub(idle)
        .filter(|d| !d.is_zero())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(demand: u32, current: u32, idle_secs: i64) -> ScalingInput {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        ScalingInput {
            min_replicas: 0,
            ceiling: 2,
            concurrency: 1,
            demand,
            current,
            last_active: Some(now - jiff::SignedDuration::from_secs(idle_secs)),
            scale_down_after: Duration::from_secs(600),
            now,
        }
    }

    #[test]
    fn scales_from_zero_when_a_job_arrives() {
        assert_eq!(desired_replicas(&input(1, 0, 0)), 1);
    }

    #[test]
    fn demand_is_capped_by_the_gpu_budget() {
        assert_eq!(desired_replicas(&input(7, 1, 0)), 2);
    }

    #[test]
    fn concurrency_divides_the_demand() {
        let mut i = input(3, 0, 0);
        i.concurrency = 2;
        assert_eq!(desired_replicas(&i), 2);
        i.demand = 2;
        assert_eq!(desired_replicas(&i), 1);
    }

    #[test]
    fn keeps_replicas_while_recently_active_then_scales_to_zero() {
        assert_eq!(desired_replicas(&input(0, 2, 60)), 2);
        assert_eq!(
            scale_down_due_in(&input(0, 2, 60)),
            Some(Duration::from_secs(540))
        );
        assert_eq!(desired_replicas(&input(0, 2, 600)), 0);
        assert_eq!(scale_down_due_in(&input(0, 2, 600)), None);
    }

    #[test]
    fn min_replicas_is_a_floor() {
        let mut i = input(0, 0, 10_000);
        i.min_replicas = 1;
        assert_eq!(desired_replicas(&i), 1);
    }

    #[test]
    fn never_active_means_idle() {
        let mut i = input(0, 1, 0);
        i.last_active = None;
        assert_eq!(desired_replicas(&i), 0);
    }
}
