//! The order in which a tenant's queued jobs get a GPU: priority first, then fair share between
//! users (whoever has had the fewest images recently goes next), then creation time.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

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
///
/// O(n log n): within one user the share is the same for every job, so each user's next job is
/// the head of their own sorted list, and only those heads compete.
pub fn dispatch_order<'a>(
    queued: &[QueuedJob<'a>],
    recent_images: &HashMap<String, u32>,
) -> Vec<QueuedJob<'a>> {
    let mut by_user: HashMap<&str, Vec<QueuedJob<'a>>> = HashMap::new();
    for job in queued {
        by_user.entry(job.user).or_default().push(job.clone());
    }
    let mut heads = BinaryHeap::new();
    let mut lines: Vec<(u32, std::vec::IntoIter<QueuedJob<'a>>)> = Vec::new();
    for (user, mut jobs) in by_user {
        jobs.sort_by(|a, b| within_user(a).cmp(&within_user(b)));
        let share = recent_images.get(user).copied().unwrap_or(0);
        let mut line = jobs.into_iter();
        if let Some(head) = line.next() {
            heads.push(Reverse(Head::new(head, share, lines.len())));
            lines.push((share, line));
        }
    }
    let mut order = Vec::with_capacity(queued.len());
    while let Some(Reverse(head)) = heads.pop() {
        let (share, line) = &mut lines[head.line];
        *share += head.job.images;
        if let Some(next) = line.next() {
            heads.push(Reverse(Head::new(next, *share, head.line)));
        }
        order.push(head.job);
    }
    order
}

/// The order of one user's own jobs: priority, then age, then name.
fn within_user<'a>(job: &QueuedJob<'a>) -> (Reverse<i32>, Timestamp, &'a str) {
    (Reverse(job.priority), job.created, job.name)
}

/// A user's next job, ranked against the other users' next jobs by priority, then the user's
/// share, then age and name.
struct Head<'a> {
    job: QueuedJob<'a>,
    share: u32,
    line: usize,
}

impl<'a> Head<'a> {
    fn new(job: QueuedJob<'a>, share: u32, line: usize) -> Self {
        Self { job, share, line }
    }

    fn key(&self) -> (Reverse<i32>, u32, Timestamp, &'a str) {
        let (priority, created, name) = within_user(&self.job);
        (priority, self.share, created, name)
    }
}

impl PartialEq for Head<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Head<'_> {}

impl PartialOrd for Head<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Head<'_> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(&other.key())
    }
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
        let recent = HashMap::from([("ann".to_string(), 1)]);
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
        let recent = HashMap::from([("bob".to_string(), 100)]);
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

    /// The definition the heap implements: every time, the job with the least
    /// (priority descending, user's share, creation, name) among all still waiting.
    fn reference_order<'a>(queued: &[QueuedJob<'a>], recent: &HashMap<String, u32>) -> Vec<String> {
        let mut waiting = queued.to_vec();
        let mut share = recent.clone();
        let mut order = Vec::new();
        while !waiting.is_empty() {
            let key = |job: &QueuedJob<'_>| {
                (
                    Reverse(job.priority),
                    share.get(job.user).copied().unwrap_or(0),
                    job.created,
                    job.name.to_string(),
                )
            };
            let next = (0..waiting.len())
                .min_by_key(|i| key(&waiting[*i]))
                .unwrap();
            let job = waiting.remove(next);
            *share.entry(job.user.to_string()).or_default() += job.images;
            order.push(job.name.to_string());
        }
        order
    }

    #[test]
    fn matches_the_definition_on_mixed_queues() {
        let users = ["ann", "bob", "cid", "dee"];
        let job_names: Vec<String> = (0..200).map(|i| format!("job-{i:03}")).collect();
        // A fixed linear congruential sequence: varied, and the same on every run.
        let mut state = 7u64;
        let mut next = |modulo: u64| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) % modulo
        };
        let queued: Vec<QueuedJob<'_>> = job_names
            .iter()
            .map(|name| QueuedJob {
                name,
                user: users[next(4) as usize],
                priority: next(3) as i32 - 1,
                created: at(next(50) as i64),
                images: 1 + next(4) as u32,
            })
            .collect();
        let recent = HashMap::from([("bob".to_string(), 7), ("dee".to_string(), 2)]);
        assert_eq!(
            names(&dispatch_order(&queued, &recent)),
            reference_order(&queued, &recent)
        );
    }
}
