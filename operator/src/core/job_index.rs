//! The jobs that still need the operator, and running counts over the rest, kept current from
//! watch events. A cluster keeps finished jobs (history) for as long as their owners like; with
//! this index the dispatcher's passes and admission cost O(unfinished jobs) instead of
//! O(every job ever kept).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use atelier_crds::{GenerationJob, JobPhase};
use jiff::{SignedDuration, Timestamp};

/// Finished jobs count towards a user's fair share for this long.
pub const FAIR_SHARE_WINDOW: SignedDuration = SignedDuration::from_hours(1);

/// What the index counted for one job, so that an update or delete can take exactly that back.
#[derive(Debug, Clone)]
struct Counted {
    namespace: String,
    user: String,
    images: u32,
    phase: JobPhase,
    /// When it succeeded, while it may still be in the fair-share window.
    succeeded_at: Option<Timestamp>,
}

/// One namespace's share of the index.
#[derive(Debug, Default)]
struct NamespaceJobs {
    /// Pending, Queued and Running jobs by uid.
    unfinished: HashMap<String, Arc<GenerationJob>>,
    phases: [i64; JobPhase::ALL.len()],
    /// Succeeded jobs by completion time, oldest first, until they leave the window.
    succeeded: BTreeSet<(Timestamp, String)>,
    succeeded_images_by_user: HashMap<String, u32>,
}

#[derive(Debug, Default)]
pub struct JobIndex {
    counted: HashMap<String, Counted>,
    namespaces: HashMap<String, NamespaceJobs>,
}

impl JobIndex {
    /// Records a job's current state (it was created or changed). Only unfinished jobs are kept
    /// whole; of the others the index keeps what it counted.
    pub fn apply(&mut self, job: &GenerationJob) {
        let (Some(uid), Some(namespace)) =
            (job.metadata.uid.clone(), job.metadata.namespace.clone())
        else {
            return;
        };
        self.forget(&uid);
        let phase = job.phase();
        let succeeded_at = (phase == JobPhase::Succeeded)
            .then(|| job.status.as_ref()?.completion_time.as_ref().map(|t| t.0))
            .flatten();
        let counted = Counted {
            namespace: namespace.clone(),
            user: job.spec.user.clone(),
            images: job.spec.num_images,
            phase,
            succeeded_at,
        };
        let jobs = self.namespaces.entry(namespace).or_default();
        jobs.phases[phase_index(phase)] += 1;
        if let Some(at) = succeeded_at {
            jobs.succeeded.insert((at, uid.clone()));
            *jobs
                .succeeded_images_by_user
                .entry(counted.user.clone())
                .or_default() += counted.images;
        }
        if !phase.is_finished() {
            jobs.unfinished.insert(uid.clone(), Arc::new(job.clone()));
        }
        self.counted.insert(uid, counted);
    }

    /// Takes back everything the index counted for a job (it was deleted, or is about to be
    /// counted anew).
    pub fn forget(&mut self, uid: &str) {
        let Some(counted) = self.counted.remove(uid) else {
            return;
        };
        let Some(jobs) = self.namespaces.get_mut(&counted.namespace) else {
            return;
        };
        jobs.phases[phase_index(counted.phase)] -= 1;
        jobs.unfinished.remove(uid);
        if let Some(at) = counted.succeeded_at
            && jobs.succeeded.remove(&(at, uid.to_string()))
        {
            decrement(
                &mut jobs.succeeded_images_by_user,
                &counted.user,
                counted.images,
            );
        }
        if jobs.unfinished.is_empty() && jobs.phases.iter().all(|count| *count == 0) {
            self.namespaces.remove(&counted.namespace);
        }
    }

    /// Whether a job with this uid exists.
    pub fn contains(&self, uid: &str) -> bool {
        self.counted.contains_key(uid)
    }

    /// Whether a job with this uid exists and has not finished.
    pub fn is_unfinished(&self, uid: &str) -> bool {
        self.counted
            .get(uid)
            .is_some_and(|counted| !counted.phase.is_finished())
    }

    /// The namespace's Pending, Queued and Running jobs, in no particular order.
    pub fn unfinished(&self, namespace: &str) -> Vec<Arc<GenerationJob>> {
        self.namespaces
            .get(namespace)
            .map(|jobs| jobs.unfinished.values().cloned().collect())
            .unwrap_or_default()
    }

    /// How many jobs of the namespace are in each phase, in the order of `JobPhase::ALL`.
    pub fn phase_counts(&self, namespace: &str) -> [i64; JobPhase::ALL.len()] {
        self.namespaces
            .get(namespace)
            .map(|jobs| jobs.phases)
            .unwrap_or_default()
    }

    /// Whether a job with this uid exists and waits for a GPU (Pending or Queued).
    pub fn is_waiting(&self, uid: &str) -> bool {
        self.counted
            .get(uid)
            .is_some_and(|counted| matches!(counted.phase, JobPhase::Pending | JobPhase::Queued))
    }

    /// Per user, the images running now or succeeded within `FAIR_SHARE_WINDOW` before `now`:
    /// who has had the GPU most recently, for the queue's fair share.
    pub fn recent_images(&mut self, namespace: &str, now: Timestamp) -> HashMap<String, u32> {
        let Some(jobs) = self.namespaces.get_mut(namespace) else {
            return HashMap::new();
        };
        let window_start = now - FAIR_SHARE_WINDOW;
        while let Some(oldest) = jobs.succeeded.first()
            && oldest.0 <= window_start
        {
            let (_, uid) = jobs.succeeded.pop_first().expect("checked above");
            if let Some(counted) = self.counted.get_mut(&uid) {
                counted.succeeded_at = None;
                decrement(
                    &mut jobs.succeeded_images_by_user,
                    &counted.user,
                    counted.images,
                );
            }
        }
        let mut recent = jobs.succeeded_images_by_user.clone();
        for job in jobs.unfinished.values() {
            if job.phase() == JobPhase::Running {
                *recent.entry(job.spec.user.clone()).or_default() += job.spec.num_images;
            }
        }
        recent
    }
}

fn phase_index(phase: JobPhase) -> usize {
    JobPhase::ALL
        .iter()
        .position(|p| *p == phase)
        .expect("JobPhase::ALL lists every phase")
}

fn decrement(counts: &mut HashMap<String, u32>, key: &str, by: u32) {
    if let Some(count) = counts.get_mut(key) {
        *count = count.saturating_sub(by);
        if *count == 0 {
            counts.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use atelier_crds::{GenerationJobSpec, GenerationJobStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn at(minute: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + minute * 60).unwrap()
    }

    fn job(uid: &str, user: &str, images: u32, phase: JobPhase) -> GenerationJob {
        let spec: GenerationJobSpec = serde_json::from_value(serde_json::json!({
            "user": user, "prompt": "a lighthouse", "numImages": images,
        }))
        .unwrap();
        let mut job = GenerationJob::new(uid, spec);
        job.metadata.uid = Some(uid.into());
        job.metadata.namespace = Some("atelier-acme".into());
        job.status = Some(GenerationJobStatus {
            phase: Some(phase),
            ..Default::default()
        });
        job
    }

    fn succeeded(uid: &str, user: &str, images: u32, minute: i64) -> GenerationJob {
        let mut job = job(uid, user, images, JobPhase::Succeeded);
        job.status.as_mut().unwrap().completion_time = Some(Time(at(minute)));
        job
    }

    fn sorted_uids(jobs: Vec<Arc<GenerationJob>>) -> Vec<String> {
        let mut uids: Vec<String> = jobs
            .iter()
            .map(|j| j.metadata.uid.clone().unwrap())
            .collect();
        uids.sort();
        uids
    }

    #[test]
    fn a_job_leaves_the_unfinished_set_when_it_finishes() {
        let mut index = JobIndex::default();
        index.apply(&job("a", "ann", 1, JobPhase::Queued));
        index.apply(&job("b", "ann", 1, JobPhase::Running));
        assert_eq!(sorted_uids(index.unfinished("atelier-acme")), ["a", "b"]);
        assert!(index.is_waiting("a") && !index.is_waiting("b"));

        index.apply(&job("a", "ann", 1, JobPhase::Running));
        index.apply(&succeeded("b", "ann", 1, 0));
        assert_eq!(sorted_uids(index.unfinished("atelier-acme")), ["a"]);
        assert!(!index.is_waiting("a") && !index.is_waiting("never-seen"));
        assert!(index.contains("b") && !index.is_unfinished("b"));
        assert!(index.is_unfinished("a"));
        let counts = index.phase_counts("atelier-acme");
        assert_eq!(counts[phase_index(JobPhase::Running)], 1);
        assert_eq!(counts[phase_index(JobPhase::Succeeded)], 1);
        assert_eq!(counts.iter().sum::<i64>(), 2);
    }

    #[test]
    fn deleting_every_job_leaves_nothing_behind() {
        let mut index = JobIndex::default();
        index.apply(&job("a", "ann", 1, JobPhase::Queued));
        index.apply(&succeeded("b", "bob", 2, 0));
        index.forget("a");
        index.forget("b");
        index.forget("never-seen");
        assert!(index.counted.is_empty());
        assert!(index.namespaces.is_empty());
        assert!(index.recent_images("atelier-acme", at(1)).is_empty());
    }

    #[test]
    fn fair_share_counts_running_and_recent_images_only() {
        let mut index = JobIndex::default();
        index.apply(&job("r", "ann", 2, JobPhase::Running));
        index.apply(&job("q", "ann", 5, JobPhase::Queued));
        index.apply(&succeeded("old", "bob", 3, 0));
        index.apply(&succeeded("new", "bob", 1, 50));
        index.apply(&job("f", "cid", 4, JobPhase::Failed));

        let recent = index.recent_images("atelier-acme", at(59));
        assert_eq!(
            recent,
            HashMap::from([("ann".into(), 2), ("bob".into(), 4)])
        );
        // An hour after the first success, only the second one counts.
        let recent = index.recent_images("atelier-acme", at(61));
        assert_eq!(
            recent,
            HashMap::from([("ann".into(), 2), ("bob".into(), 1)])
        );
        // Deleting a job that already left the window takes nothing back twice.
        index.forget("old");
        index.forget("new");
        assert_eq!(
            index.recent_images("atelier-acme", at(61)),
            HashMap::from([("ann".into(), 2)])
        );
    }

    #[test]
    fn namespaces_are_counted_apart() {
        let mut index = JobIndex::default();
        index.apply(&job("a", "ann", 1, JobPhase::Queued));
        let mut other = job("b", "ann", 1, JobPhase::Queued);
        other.metadata.namespace = Some("atelier-globex".into());
        index.apply(&other);
        assert_eq!(sorted_uids(index.unfinished("atelier-acme")), ["a"]);
        assert_eq!(sorted_uids(index.unfinished("atelier-globex")), ["b"]);
    }
}
