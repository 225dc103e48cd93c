//! The dispatch pipeline: jobs created → admitted → dispatched to a simulated inference pod →
//! Succeeded, at 1, 10 and 100 tenants, and the floor beside it (one status patch).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use atelier_crds::{GenerationJob, JobPhase};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde::Serialize;
use serde_json::json;

use crate::jobs::{self, JobTrack, Load, Target, Tracker};
use crate::platform::{Platform, WRITE_VERBS};
use crate::procs::{CpuMark, CpuUse};
use crate::stats::{Summary, ratio};

/// One measured run of jobs.
#[derive(Debug, Clone, Serialize)]
pub struct JobRun {
    pub label: String,
    pub tenants: usize,
    pub slots: usize,
    pub load: String,
    pub jobs: usize,
    pub wall_seconds: f64,
    pub admitted_per_second: f64,
    pub dispatched_per_second: f64,
    pub completed_per_second: f64,
    pub create_to_queued_ms: Summary,
    pub create_to_running_ms: Summary,
    pub queued_to_running_ms: Summary,
    pub create_to_finished_ms: Summary,
    /// Final phase → jobs.
    pub outcome: BTreeMap<String, usize>,
    /// Failed jobs by reason.
    pub failed_reasons: BTreeMap<String, usize>,
    /// Jobs that needed more than one attempt.
    pub retried: usize,
    /// Writes of each job object seen by the watch (distinct resourceVersions, create included).
    pub job_object_writes: Summary,
    /// Writes after the create that were not progress or queue-position updates (the goal
    /// counts these: ≤ 3).
    pub writes_besides_progress: Summary,
    /// Jobs with at most 3 writes besides progress and queue-position updates after their create.
    pub jobs_within_write_goal: usize,
    /// Mean writes per job after the create, by what they changed.
    pub writes_by_kind: BTreeMap<String, f64>,
    /// API server requests in the run per job, by kind (from `apiserver_request_total`).
    pub requests_per_job: BTreeMap<String, f64>,
    pub requests: serde_json::Value,
    pub operator_cpu_seconds: f64,
    pub operator_cpu_seconds_per_1000_jobs: f64,
    pub operator_peak_rss_mib: f64,
    pub cpu: CpuUse,
    pub watch_relists: u32,
    /// The run's images on the tenants' volumes against its jobs.
    pub files: crate::faults::FileCheck,
}

/// Measures one run: the load, then what every job went through.
pub async fn measure(
    platform: &Platform,
    tracker: &Arc<Tracker>,
    label: &str,
    target: &Target,
    count: usize,
    load: Load,
    timeout: Duration,
) -> anyhow::Result<JobRun> {
    let requests_before = platform.request_counts().await?;
    let operator_before = platform.operator().cpu_seconds();
    let relists_before = tracker.relists();
    let mark = CpuMark::now();
    let started = Instant::now();
    let uids = jobs::run(&platform.client, tracker, target, count, load, timeout).await?;
    let wall = started.elapsed().as_secs_f64();
    let cpu = mark.since();
    let operator_cpu = platform.operator().cpu_seconds() - operator_before;
    let requests = platform.request_counts().await?.since(&requests_before);
    let tracks = tracker.tracks(&uids);
    let summary = summarize(&tracks);
    let n = tracks.len().max(1) as f64;
    let mut requests_per_job = BTreeMap::new();
    for (name, verbs, resource) in [
        ("writes: all", &WRITE_VERBS[..], None),
        (
            "writes: generationjobs",
            &WRITE_VERBS[..],
            Some("generationjobs"),
        ),
        ("writes: tenants", &WRITE_VERBS[..], Some("tenants")),
        ("writes: events", &WRITE_VERBS[..], Some("events")),
        ("reads: all (GET+LIST)", &["GET", "LIST"][..], None),
        (
            "conflicts (409): tenants",
            &["PUT 409", "PATCH 409"][..],
            Some("tenants"),
        ),
    ] {
        requests_per_job.insert(name.to_string(), requests.sum(verbs, resource) / n);
    }
    let files = platform
        .check_files(&target.namespaces, &uids, &tracks)
        .await?;
    let operator = platform.operator();
    crate::say!(
        "{label}: {} jobs in {wall:.1} s, create→Running p50 {:.0} ms p99 {:.0} ms",
        tracks.len(),
        summary.create_to_running.p50,
        summary.create_to_running.p99
    );
    Ok(JobRun {
        label: label.to_string(),
        tenants: target.namespaces.len(),
        slots: target.slots,
        load: load.describe(),
        jobs: tracks.len(),
        wall_seconds: wall,
        admitted_per_second: summary.admitted_per_second,
        dispatched_per_second: summary.dispatched_per_second,
        completed_per_second: summary.completed_per_second,
        create_to_queued_ms: summary.create_to_queued,
        create_to_running_ms: summary.create_to_running,
        queued_to_running_ms: summary.queued_to_running,
        create_to_finished_ms: summary.create_to_finished,
        outcome: summary.outcome,
        failed_reasons: summary.failed_reasons,
        retried: summary.retried,
        job_object_writes: summary.writes,
        writes_besides_progress: summary.writes_besides_progress,
        jobs_within_write_goal: summary.jobs_within_write_goal,
        writes_by_kind: summary.writes_by_kind,
        requests_per_job,
        requests: requests.to_json(),
        operator_cpu_seconds: operator_cpu,
        operator_cpu_seconds_per_1000_jobs: ratio(operator_cpu * 1000.0, n),
        operator_peak_rss_mib: operator.peak_rss() as f64 / f64::from(1u32 << 20),
        cpu,
        watch_relists: tracker.relists() - relists_before,
        files,
    })
}

/// Latencies and rates of a set of jobs (pure).
#[derive(Debug, Default)]
pub struct TrackSummary {
    pub create_to_queued: Summary,
    pub create_to_running: Summary,
    pub queued_to_running: Summary,
    pub create_to_finished: Summary,
    pub admitted_per_second: f64,
    pub dispatched_per_second: f64,
    pub completed_per_second: f64,
    pub outcome: BTreeMap<String, usize>,
    pub failed_reasons: BTreeMap<String, usize>,
    pub retried: usize,
    pub writes: Summary,
    pub writes_besides_progress: Summary,
    pub jobs_within_write_goal: usize,
    pub writes_by_kind: BTreeMap<String, f64>,
}

pub fn summarize(tracks: &[JobTrack]) -> TrackSummary {
    let between = |from: fn(&JobTrack) -> Option<Instant>, to: fn(&JobTrack) -> Option<Instant>| {
        let durations: Vec<Duration> = tracks
            .iter()
            .filter_map(|t| Some(to(t)?.saturating_duration_since(from(t)?)))
            .collect();
        Summary::of_durations(&durations)
    };
    let first_create = tracks.iter().filter_map(|t| t.created).min();
    let rate = |at: fn(&JobTrack) -> Option<Instant>| {
        let times: Vec<Instant> = tracks.iter().filter_map(at).collect();
        match (first_create, times.iter().max()) {
            (Some(first), Some(last)) => {
                ratio(times.len() as f64, last.duration_since(first).as_secs_f64())
            }
            _ => 0.0,
        }
    };
    let mut outcome = BTreeMap::new();
    for track in tracks {
        let phase = track.phase.map_or("unseen", JobPhase::as_str);
        *outcome.entry(phase.to_string()).or_default() += 1;
    }
    let mut failed_reasons = BTreeMap::new();
    for track in tracks.iter().filter(|t| t.phase == Some(JobPhase::Failed)) {
        *failed_reasons
            .entry(track.reason.clone().unwrap_or_else(|| "(none)".into()))
            .or_default() += 1;
    }
    let writes: Vec<f64> = tracks.iter().map(|t| t.versions.len() as f64).collect();
    let besides: Vec<f64> = tracks
        .iter()
        // A waiting job's queue position is its progress (shown to its user, written at most
        // every 5 s): the goal's "one per progress update" covers it as it covers steps.
        .map(|t| f64::from(t.phase_writes + t.redispatch_writes + t.other_writes))
        .collect();
    let n = tracks.len().max(1) as f64;
    let mean = |f: fn(&JobTrack) -> u32| tracks.iter().map(|t| f64::from(f(t))).sum::<f64>() / n;
    let writes_by_kind = BTreeMap::from([
        ("phase".to_string(), mean(|t| t.phase_writes)),
        ("second dispatch".to_string(), mean(|t| t.redispatch_writes)),
        ("progress".to_string(), mean(|t| t.progress_writes)),
        ("queue position".to_string(), mean(|t| t.position_writes)),
        ("other".to_string(), mean(|t| t.other_writes)),
    ]);
    TrackSummary {
        create_to_queued: between(|t| t.created, |t| t.queued),
        create_to_running: between(|t| t.created, |t| t.running),
        queued_to_running: between(|t| t.queued, |t| t.running),
        create_to_finished: between(|t| t.created, |t| t.finished),
        admitted_per_second: rate(|t| t.queued),
        dispatched_per_second: rate(|t| t.running),
        completed_per_second: rate(|t| t.finished),
        outcome,
        failed_reasons,
        retried: tracks.iter().filter(|t| t.attempts > 1).count(),
        writes: Summary::of(&writes),
        jobs_within_write_goal: besides
            .iter()
            .filter(|w| **w <= crate::report::JOB_WRITES_GOAL)
            .count(),
        writes_besides_progress: Summary::of(&besides),
        writes_by_kind,
    }
}

/// The operator at rest: nothing changes, so (by design) nothing should be written.
#[derive(Debug, Clone, Serialize)]
pub struct AtRest {
    pub tenants: usize,
    pub seconds: f64,
    pub operator_cpu_per_second: f64,
    /// Writes that only the operator makes: server-side applies, tenants, jobs.
    pub operator_kind_writes: f64,
    /// Event writes (of every component).
    pub event_writes: f64,
    pub writes: serde_json::Value,
}

pub async fn at_rest(platform: &Platform, tenants: usize, seconds: u64) -> anyhow::Result<AtRest> {
    // The last jobs' status, demand and events settle first.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu_before = platform.operator().cpu_seconds();
    let before = platform.request_counts().await?;
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let cpu = platform.operator().cpu_seconds() - cpu_before;
    let delta = platform.request_counts().await?.since(&before);
    let mut writes = crate::platform::RequestCounts::default();
    for (key, value) in &delta.0 {
        if WRITE_VERBS.contains(&key.0.as_str()) {
            writes.0.insert(key.clone(), *value);
        }
    }
    // Server-side applies are the operator's (the tenant controller's); tenants and jobs are
    // written only by the operator here. Events come from every controller.
    let operator_kind_writes = writes.sum(&["APPLY"], None)
        + writes.sum(&WRITE_VERBS, Some("tenants"))
        + writes.sum(&WRITE_VERBS, Some("generationjobs"));
    let event_writes = writes.sum(&WRITE_VERBS, Some("events"));
    Ok(AtRest {
        tenants,
        seconds: seconds as f64,
        operator_cpu_per_second: cpu / seconds as f64,
        operator_kind_writes,
        event_writes,
        writes: writes.to_json(),
    })
}

/// The floor: round trips of the API server itself, through the same proxy the operator uses.
#[derive(Debug, Clone, Serialize)]
pub struct Floor {
    pub status_patch_ms: Summary,
    pub get_ms: Summary,
}

/// Patches the status of one job `count` times in a row (merge patch of `status.message`, as
/// the operator's status writes are), and reads it as often.
pub async fn floor(platform: &Platform, count: usize) -> anyhow::Result<Floor> {
    let namespace = platform.cluster.create_namespace("bench-floor").await?;
    let jobs = Api::<GenerationJob>::namespaced(platform.client.clone(), &namespace);
    let job = jobs
        .create(
            &PostParams::default(),
            &crate::platform::job_manifest("floor@example.com", 1, 1),
        )
        .await?;
    let name = job.metadata.name.clone().unwrap_or_default();
    // Outside any tenant namespace the operator rejects it once and leaves it alone.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut patches = Vec::with_capacity(count);
    for i in 0..count {
        let patch = json!({ "status": { "message": format!("floor {i}") } });
        let sent = Instant::now();
        jobs.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        patches.push(sent.elapsed());
    }
    let mut gets = Vec::with_capacity(count);
    for _ in 0..count {
        let sent = Instant::now();
        jobs.get(&name).await?;
        gets.push(sent.elapsed());
    }
    Ok(Floor {
        status_patch_ms: Summary::of_durations(&patches),
        get_ms: Summary::of_durations(&gets),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_and_rates_from_tracks() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let track = |created, queued, running, finished, writes: &[&str]| JobTrack {
            created: Some(ms(created)),
            queued: Some(ms(queued)),
            running: Some(ms(running)),
            finished: Some(ms(finished)),
            phase: Some(JobPhase::Succeeded),
            attempts: 1,
            versions: writes.iter().map(|s| s.to_string()).collect(),
            phase_writes: 3,
            progress_writes: writes.len() as u32 - 4,
            ..JobTrack::default()
        };
        let tracks = vec![
            track(0, 50, 200, 400, &["1", "2", "3", "4"]),
            track(500, 520, 800, 1000, &["5", "6", "7", "8", "9"]),
        ];
        let summary = summarize(&tracks);
        assert_eq!(summary.create_to_running.p50, 200.0);
        assert_eq!(summary.create_to_running.max, 300.0);
        assert_eq!(summary.queued_to_running.p99, 280.0);
        assert_eq!(summary.completed_per_second, 2.0);
        assert_eq!(summary.dispatched_per_second, 2.5);
        assert_eq!(summary.outcome["Succeeded"], 2);
        assert_eq!(summary.writes.max, 5.0);
        assert_eq!(summary.writes_besides_progress.max, 3.0);
        assert_eq!(summary.jobs_within_write_goal, 2);
        assert_eq!(summary.writes_by_kind["progress"], 0.5);
        assert_eq!(summary.retried, 0);
    }
}
