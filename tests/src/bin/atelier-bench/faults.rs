//! Faults while loaded: with hundreds of jobs submitted to slow simulated pods, kill an
//! inference process, restart the operator and cut the API server off for 10 s; afterwards every
//! job must have ended once (Succeeded with exactly one image on the volume, or Failed with a
//! reason), and no image may be missing or duplicated.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use atelier_crds::JobPhase;
use atelier_crds::names::{INFERENCE, LABEL_COMPONENT};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use serde::Serialize;

use crate::jobs::{self, JobTrack, Load, Target, Tracker};
use crate::platform::Platform;
use crate::procs::{CpuMark, CpuUse};
use crate::stats::Summary;

#[derive(Debug, Clone, Serialize)]
pub struct FaultRun {
    pub tenants: usize,
    pub jobs: usize,
    pub steps_per_job: u32,
    pub step_delay: String,
    /// What was done when, in seconds after the first create.
    pub faults: Vec<(f64, String)>,
    pub wall_seconds: f64,
    pub outcome: BTreeMap<String, usize>,
    /// Failed jobs by reason.
    pub failed_reasons: BTreeMap<String, usize>,
    pub retried: usize,
    /// Mean writes per job after the create, by what they changed.
    pub writes_by_kind: BTreeMap<String, f64>,
    /// Jobs seen entering Succeeded more than once.
    pub succeeded_twice: usize,
    /// Jobs not finished when the run gave up.
    pub unfinished: usize,
    pub files: FileCheck,
    pub create_to_finished_ms: Summary,
    pub job_object_writes: Summary,
    pub cpu: CpuUse,
    /// API server requests during the run (`apiserver_request_total` differences).
    pub requests: serde_json::Value,
    /// Per job: all writes, tenant status writes, and conflicting tenant status writes.
    pub requests_per_job: BTreeMap<String, f64>,
    pub passed: bool,
}

/// Images on the tenants' volumes against the jobs.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct FileCheck {
    pub png_files: usize,
    /// Succeeded jobs with exactly one PNG of their own, the one their status names.
    pub succeeded_with_one_image: usize,
    /// Succeeded jobs whose image is not on the volume.
    pub missing: usize,
    /// Jobs with more than one PNG.
    pub duplicated: usize,
    /// PNGs of jobs that did not succeed, or of no job at all.
    pub orphans: usize,
    /// The jobs with more than one PNG, or with an image while not Succeeded:
    /// `namespace/name (phase, attempts N, files F)`.
    pub suspects: Vec<String>,
}

/// The `job8` part of an output file name (`<stamp>_<seed>_<job8>[_<n>].png`).
pub fn job8_of_file(name: &str) -> Option<&str> {
    let stem = name.strip_suffix(".png")?;
    let mut parts = stem.split('_');
    let (_date, _time, _seed, job8) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    Some(job8)
}

/// The `job8` of a job id: its first 8 ASCII letters and digits.
pub fn job8_of_id(id: &str) -> String {
    id.chars()
        .filter(char::is_ascii_alphanumeric)
        .take(8)
        .collect()
}

/// Compares the PNG files found (by name) with the jobs (uid → track) (pure).
pub fn check_files(files: &[String], jobs: &HashMap<String, JobTrack>) -> FileCheck {
    let mut by_job8: HashMap<String, Vec<&String>> = HashMap::new();
    for file in files {
        if let Some(job8) = job8_of_file(file) {
            by_job8.entry(job8.to_string()).or_default().push(file);
        }
    }
    let mut check = FileCheck {
        png_files: files.len(),
        ..FileCheck::default()
    };
    let mut claimed = 0;
    for (uid, track) in jobs {
        let found = by_job8.get(&job8_of_id(uid)).map_or(&[][..], Vec::as_slice);
        claimed += found.len();
        if found.len() > 1 {
            check.duplicated += 1;
        }
        if found.len() > 1 || (!found.is_empty() && track.phase != Some(JobPhase::Succeeded)) {
            check.suspects.push(format!(
                "{}/{} ({}, attempts {}, {} images)",
                track.namespace,
                track.name,
                track.phase.map_or("unseen", JobPhase::as_str),
                track.attempts,
                found.len()
            ));
        }
        if track.phase == Some(JobPhase::Succeeded) {
            let named = track
                .outputs
                .first()
                .and_then(|path| path.rsplit('/').next())
                .map(str::to_string);
            if found.is_empty() || named.is_none_or(|n| !found.iter().any(|f| **f == n)) {
                check.missing += 1;
            } else if found.len() == 1 {
                check.succeeded_with_one_image += 1;
            }
        } else {
            check.orphans += found.len();
        }
    }
    check.orphans += files.len() - claimed.min(files.len());
    check
}

pub fn png_files(dir: &Path) -> Vec<String> {
    let mut files = Vec::new();
    for user in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        for file in std::fs::read_dir(user.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = file.file_name().to_string_lossy().into_owned();
            if name.ends_with(".png") && !name.starts_with('.') {
                files.push(name);
            }
        }
    }
    files
}

/// Runs the fault scenario on `namespaces` (tenants with slow simulated pods).
pub async fn run(
    platform: &mut Platform,
    tracker: &Arc<Tracker>,
    namespaces: &[String],
    count: usize,
    steps: u32,
    step_delay: &str,
) -> anyhow::Result<FaultRun> {
    let target = Target {
        namespaces: namespaces.to_vec(),
        slots: 0,
        users_per_tenant: 3,
        steps,
    };
    let requests_before = platform.request_counts().await?;
    let mark = CpuMark::now();
    let started = Instant::now();
    // Everything at once: the run below only creates; the faults come while they run.
    let client = platform.client.clone();
    let creating = {
        let tracker = Arc::clone(tracker);
        let target = target.clone();
        tokio::spawn(async move {
            jobs::run(
                &client,
                &tracker,
                &target,
                count,
                Load::Burst { parallel: 16 },
                Duration::ZERO,
            )
            .await
        })
    };
    let uids = creating.await??;
    // The faults start once the first tenant's pod runs jobs, so that the kill loses work.
    let deadline = Instant::now() + Duration::from_secs(120);
    while tracker.running_in(&namespaces[0]) == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let created = Instant::now();
    let at = |seconds: u64| created + Duration::from_secs(seconds);
    let mut faults = Vec::new();
    let offset = |faults: &mut Vec<(f64, String)>, what: String| {
        crate::say!("fault: {what}");
        faults.push((started.elapsed().as_secs_f64(), what));
    };
    offset(
        &mut faults,
        format!(
            "{} jobs created, the first running on {}",
            uids.len(),
            namespaces[0]
        ),
    );

    let pods = Api::<Pod>::namespaced(platform.client.clone(), &namespaces[0])
        .list(&ListParams::default().labels(&format!("{LABEL_COMPONENT}={INFERENCE}")))
        .await?;
    if let Some(pod) = pods.items.first().and_then(|p| p.metadata.name.clone()) {
        match platform.cluster.kill_pod_process(&namespaces[0], &pod) {
            Ok(()) => offset(
                &mut faults,
                format!("SIGKILL inference pod {}/{pod}", namespaces[0]),
            ),
            Err(error) => offset(&mut faults, format!("could not kill {pod}: {error}")),
        }
    }

    tokio::time::sleep_until(at(10).into()).await;
    platform.start_operator().await?;
    offset(
        &mut faults,
        "operator SIGKILLed and started again".to_string(),
    );

    tokio::time::sleep_until(at(20).into()).await;
    platform.cluster.pause_api_server();
    offset(&mut faults, "API server port closed".to_string());
    tokio::time::sleep(Duration::from_secs(10)).await;
    platform.cluster.resume_api_server();
    offset(&mut faults, "API server port open again".to_string());

    let unfinished = tracker.wait_all(&uids, Duration::from_secs(600)).await;
    let wall = started.elapsed().as_secs_f64();
    let cpu = mark.since();
    let requests = platform.request_counts().await?.since(&requests_before);
    // Let the watch catch up on the last writes before reading the tracks.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let tracks: HashMap<String, JobTrack> =
        uids.iter().cloned().zip(tracker.tracks(&uids)).collect();
    let mut files = Vec::new();
    for namespace in namespaces {
        files.extend(png_files(&platform.outputs_dir(namespace).await?));
    }
    let check = check_files(&files, &tracks);
    let mut outcome = BTreeMap::new();
    let mut failed_reasons = BTreeMap::new();
    for track in tracks.values() {
        let phase = track.phase.map_or("unseen", JobPhase::as_str);
        *outcome.entry(phase.to_string()).or_default() += 1;
        if track.phase == Some(JobPhase::Failed) {
            *failed_reasons
                .entry(track.reason.clone().unwrap_or_else(|| "(none)".into()))
                .or_default() += 1;
        }
    }
    let all: Vec<JobTrack> = tracks.values().cloned().collect();
    let summary = crate::dispatch::summarize(&all);
    let succeeded_twice = all.iter().filter(|t| t.entered_succeeded > 1).count();
    let failed_without_reason = failed_reasons.get("(none)").copied().unwrap_or(0);
    let succeeded = outcome.get("Succeeded").copied().unwrap_or(0);
    let failed = outcome.get("Failed").copied().unwrap_or(0);
    let passed = unfinished == 0
        && succeeded + failed == all.len()
        && failed_without_reason == 0
        && succeeded_twice == 0
        && check.missing == 0
        && check.duplicated == 0
        && check.orphans == 0
        && check.succeeded_with_one_image == succeeded;
    Ok(FaultRun {
        tenants: namespaces.len(),
        jobs: all.len(),
        steps_per_job: steps,
        step_delay: step_delay.to_string(),
        faults,
        wall_seconds: wall,
        outcome,
        failed_reasons,
        retried: summary.retried,
        writes_by_kind: summary.writes_by_kind,
        succeeded_twice,
        unfinished,
        files: check,
        create_to_finished_ms: summary.create_to_finished,
        job_object_writes: summary.writes,
        cpu,
        requests_per_job: {
            use crate::platform::WRITE_VERBS;
            let n = uids.len().max(1) as f64;
            BTreeMap::from([
                (
                    "writes: all".to_string(),
                    requests.sum(&WRITE_VERBS, None) / n,
                ),
                (
                    "writes: tenants".to_string(),
                    requests.sum(&WRITE_VERBS, Some("tenants")) / n,
                ),
                (
                    "conflicts (409): tenants".to_string(),
                    requests.sum(&["PUT 409", "PATCH 409"], Some("tenants")) / n,
                ),
            ])
        },
        requests: requests.to_json(),
        passed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn track(phase: JobPhase, output: Option<&str>) -> JobTrack {
        JobTrack {
            phase: Some(phase),
            outputs: output.map(|o| vec![o.to_string()]).unwrap_or_default(),
            ..JobTrack::default()
        }
    }

    #[test]
    fn job8_from_file_names_and_ids() {
        assert_eq!(
            job8_of_file("20261129_223501_42_1a2b3c4d.png"),
            Some("1a2b3c4d")
        );
        assert_eq!(
            job8_of_file("20261129_223501_42_1a2b3c4d_1.png"),
            Some("1a2b3c4d")
        );
        assert_eq!(job8_of_file("x.json"), None);
        assert_eq!(job8_of_id("1a2b-3c4d-5e6f"), "1a2b3c4d");
    }

    #[test]
    fn files_are_matched_against_jobs() {
        let jobs: HashMap<String, JobTrack> = [
            (
                "aaaaaaaa-1".to_string(),
                track(
                    JobPhase::Succeeded,
                    Some("/outputs/u/20260101_000000_1_aaaaaaaa.png"),
                ),
            ),
            (
                "bbbbbbbb-1".to_string(),
                track(
                    JobPhase::Succeeded,
                    Some("/outputs/u/20260101_000000_2_bbbbbbbb.png"),
                ),
            ),
            (
                "cccccccc-1".to_string(),
                track(
                    JobPhase::Succeeded,
                    Some("/outputs/u/20260101_000000_3_cccccccc.png"),
                ),
            ),
            ("dddddddd-1".to_string(), track(JobPhase::Failed, None)),
        ]
        .into();
        let files: Vec<String> = [
            "20260101_000000_1_aaaaaaaa.png",
            "20260101_000000_2_bbbbbbbb.png",
            "20260101_000001_2_bbbbbbbb.png",
            "20260101_000000_4_dddddddd.png",
            "20260101_000000_5_eeeeeeee.png",
        ]
        .map(String::from)
        .to_vec();
        let mut check = check_files(&files, &jobs);
        check.suspects.sort();
        assert_eq!(
            check,
            FileCheck {
                png_files: 5,
                succeeded_with_one_image: 1,
                missing: 1,
                duplicated: 1,
                orphans: 2,
                suspects: vec![
                    "/ (Failed, attempts 0, 1 images)".to_string(),
                    "/ (Succeeded, attempts 0, 2 images)".to_string(),
                ],
            }
        );
    }
}
