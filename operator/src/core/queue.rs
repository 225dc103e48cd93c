//! The order in which a tenant's queued jobs get a GPU: priority first, then fair share between
//! users (whoever has had the fewest images recently goes next), then creation time.

use std::collections::HashMap;

use jiff::Timestamp;

/// A queued job as the queue sees it.
#[derive(Debug, Clone)]
pub struct QueuedJob<'a> {
    pub name: &'a str,
    pub user: &'a str,
    pub priority: i32,
    pub created: Timestamp,
    pub images: u32,
}

/// Returns the jobs in dispatch order. `recent_images` counts, per user, the images running now
/// or finished recently; every job placed in the order counts for its user too, so a user with
/// many queued jobs alternates with the others instead of going first for all of them.
pub fn dispatch_order<'a>(
    queued: &[QueuedJob<'a>],
    recent_images: &HashMap<&str, u32>,
) -> Vec<QueuedJob<'a>> {
    let mut waiting: Vec<QueuedJob<'a>> = queued.to_vec();
    // Oldest first within a user, so that a user's own jobs keep their order.
    waiting.sort_by(|a, b| (a.created, a.name).cmp(&(b.created, b.name)));
    let mut share: HashMap<&str, u32> = recent_images
        .iter()
        .map(|(user, images)| (*user, *images))
        .collect();
    let mut order = Vec::with_capacity(waiting.len());
    while !waiting.is_empty() {
        let next = waiting
            .iter()
            .enumerate()
            .min_by(|(_, a), (_, b)| {
                let key = |job: &QueuedJob<'_>| {
                    (
                        std::cmp::Reverse(job.priority),
                        share.get(job.user).copied().unwrap_or(0),
                        job.created,
                        job.name.to_string(),
                    )
                };
                key(a).cmp(&key(b))
            })
            .map(|(index, _)| index)
            .expect("waiting is not empty");
        let job = waiting.remove(next);
        *share.entry(job.user).or_default() += job.images;
        order.push(job);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + second).unwrap()
    }

    fn job<'a>(name: &'a str, user: &'a str, priority: i32, created: i64) -> QueuedJob<'a> {
        QueuedJob {
            name,
            user,
            priority,
            created: at(created),
            images: 1,
        }
    }

    fn names(order: &[QueuedJob<'_>]) -> Vec<String> {
        order.iter().map(|j| j.name.to_string()).collect()
    }

    #[test]
    fn a_late_user_does_not_wait_behind_a_busy_one() {
        // ann queued ten jobs and has one running; bob queued one afterwards.
        let names_a: Vec<String> = (0..10).map(|i| format!("a{i}")).collect();
        let mut queued: Vec<QueuedJob<'_>> = names_a
            .iter()
            .enumerate()
            .map(|(i, n)| job(n, "ann", 0, i as i64))
            .collect();
        queued.push(job("b0", "bob", 0, 100));
        let recent = HashMap::from([("ann", 1)]);
        let order = dispatch_order(&queued, &recent);
        assert_eq!(names(&order)[..3], ["b0", "a0", "a1"]);
    }

    #[test]
    fn users_alternate_when_both_have_many() {
        let queued = vec![
            job("a0", "ann", 0, 0),
            job("a1", "ann", 0, 1),
            job("a2", "ann", 0, 2),
            job("b0", "bob", 0, 3),
            job("b1", "bob", 0, 4),
        ];
        let order = dispatch_order(&queued, &HashMap::new());
        assert_eq!(names(&order), ["a0", "b0", "a1", "b1", "a2"]);
    }

    #[test]
    fn priority_beats_fair_share() {
        let queued = vec![job("a0", "ann", 0, 0), job("b0", "bob", 5, 10)];
        let recent = HashMap::from([("bob", 100)]);
        assert_eq!(names(&dispatch_order(&queued, &recent)), ["b0", "a0"]);
    }

    #[test]
    fn equal_share_falls_back_to_creation_time() {
        let queued = vec![job("late", "bob", 0, 50), job("early", "ann", 0, 10)];
        assert_eq!(
            names(&dispatch_order(&queued, &HashMap::new())),
            ["early", "late"]
        );
    }

    #[test]
    fn batches_weigh_by_images() {
        let mut big = job("a0", "ann", 0, 0);
        big.images = 4;
        let queued = vec![
            big,
            job("a1", "ann", 0, 1),
            job("b0", "bob", 0, 2),
            job("b1", "bob", 0, 3),
        ];
        let order = dispatch_order(&queued, &HashMap::new());
        // After ann's batch of 4, bob catches up with both of his before ann goes again.
        assert_eq!(names(&order), ["a0", "b0", "b1", "a1"]);
    }
}
