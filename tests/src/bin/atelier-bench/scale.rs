//! Scale: N tenants reconciled from a cold start, each size on a fresh control plane without a
//! kubelet (no pod ever runs, so the pod address pool does not cap N; "reconciled" = every
//! object applied and the status written for the current generation).

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::platform::{Platform, TenantDone, TenantShape, TenantWatch, WRITE_VERBS};
use crate::procs::{CpuMark, CpuUse};
use crate::stats::Summary;

#[derive(Debug, Clone, Serialize)]
pub struct ScaleRun {
    pub tenants: usize,
    /// Creating the Tenant objects (and their model PVs), before the operator starts.
    pub create_seconds: f64,
    /// From the operator's start until each tenant was reconciled, seconds.
    pub reconciled_seconds: Summary,
    pub requests_per_tenant: std::collections::BTreeMap<String, f64>,
    pub requests: serde_json::Value,
    pub operator_cpu_seconds: f64,
    pub operator_peak_rss_mib: f64,
    pub cpu: CpuUse,
    pub reconciled: usize,
    pub completed: bool,
    pub note: Option<String>,
    /// Failed reconciles in the operator's log, by error (names and numbers blanked).
    pub operator_errors: std::collections::BTreeMap<String, usize>,
}

pub async fn run(work: &Path, tenants: usize, timeout: Duration) -> anyhow::Result<ScaleRun> {
    let work = work.join(format!("scale-{tenants}"));
    std::fs::create_dir_all(&work)?;
    let mut platform = Platform::start(&work, false).await?;
    let watch = TenantWatch::start(&platform.client).await?;
    let names: Vec<String> = (0..tenants).map(|i| format!("scale-{i:04}")).collect();
    let created = Instant::now();
    platform
        .create_tenants(
            &names,
            // Scaled to zero, the default: a cluster with 1 000 tenants keeps most of them idle,
            // and a warm replica each would need 1 000 GPUs.
            &TenantShape {
                replicas: 0,
                concurrency: 1,
                image: None,
            },
        )
        .await?;
    let create_seconds = created.elapsed().as_secs_f64();
    let requests_before = platform.request_counts().await?;
    let mark = CpuMark::now();
    let since = Instant::now();
    platform.start_operator().await?;
    let reconciled = watch
        .wait_partial(&names, TenantDone::Reconciled, since, timeout)
        .await;
    let completed = reconciled.len() == names.len();
    let cpu = mark.since();
    let operator_cpu = platform.operator().cpu_seconds();
    let operator_peak = platform.operator().peak_rss();
    let operator_log = platform.operator().log.clone();
    let requests = platform.request_counts().await?.since(&requests_before);
    let errors = operator_errors(&operator_log);
    let note = (!completed).then(|| {
        format!(
            "{} of {tenants} reconciled after {:.0} s",
            reconciled.len(),
            timeout.as_secs_f64()
        )
    });
    let n = tenants.max(1) as f64;
    let mut per_tenant = std::collections::BTreeMap::new();
    for (name, verbs, resource) in [
        ("writes: all", &WRITE_VERBS[..], None),
        ("writes: events", &WRITE_VERBS[..], Some("events")),
        ("reads: all (GET+LIST)", &["GET", "LIST"][..], None),
    ] {
        per_tenant.insert(name.to_string(), requests.sum(verbs, resource) / n);
    }
    platform.stop_operator();
    let result = ScaleRun {
        tenants,
        create_seconds,
        reconciled: reconciled.len(),
        reconciled_seconds: Summary::of(
            &reconciled
                .iter()
                .map(Duration::as_secs_f64)
                .collect::<Vec<_>>(),
        ),
        requests_per_tenant: per_tenant,
        requests: requests.to_json(),
        operator_cpu_seconds: operator_cpu,
        operator_peak_rss_mib: operator_peak as f64 / f64::from(1u32 << 20),
        cpu,
        completed,
        note,
        operator_errors: errors,
    };
    crate::say!(
        "{} of {tenants} tenants reconciled in {:.1} s (operator {:.1} CPU s, {:.0} MiB)",
        result.reconciled,
        result.reconciled_seconds.max,
        result.operator_cpu_seconds,
        result.operator_peak_rss_mib
    );
    drop(watch);
    platform.save_logs();
    drop(platform);
    Ok(result)
}

/// Counts the operator's `tenant reconcile failed` log lines by error message.
pub fn operator_errors(log: &Path) -> std::collections::BTreeMap<String, usize> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut counts = std::collections::BTreeMap::new();
    for line in text.lines() {
        let Ok(entry) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if entry["message"] != "tenant reconcile failed" {
            continue;
        }
        *counts
            .entry(error_kind(entry["error"].as_str().unwrap_or_default()))
            .or_default() += 1;
    }
    counts
}

/// The API server's message in a kube error (or the error), with names and numbers blanked.
pub fn error_kind(error: &str) -> String {
    let message = error
        .split_once("message: \"")
        .and_then(|(_, rest)| rest.split_once("\", metadata"))
        .map_or(error, |(message, _)| message);
    let mut out = String::new();
    let mut last_digit = false;
    for c in message.replace("\\\"", "").chars() {
        if c.is_ascii_digit() {
            if !last_digit {
                out.push('N');
            }
            last_digit = true;
        } else {
            out.push(c);
            last_digit = false;
        }
    }
    out.chars().take(160).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_grouped_by_the_api_servers_message() {
        let error = r#"finalizer: Kubernetes API: ApiError: x: Forbidden (Status { status: Some(Failure), code: 403, message: "persistentvolumeclaims \"outputs\" is forbidden: exceeded quota: atelier-quota, used: persistentvolumeclaims=4", metadata: Some(ListMeta { continue_: None }) })"#;
        assert_eq!(
            error_kind(error),
            "persistentvolumeclaims outputs is forbidden: exceeded quota: atelier-quota, used: persistentvolumeclaims=N"
        );
        assert_eq!(error_kind("timed out after 5s"), "timed out after Ns");
    }
}
