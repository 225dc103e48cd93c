//! Prometheus metrics of the controllers, named like controller-runtime's.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use atelier_crds::JobPhase;
use atelier_crds::conditions::{DEGRADED, PROGRESSING, READY};
use axum::Router;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    pub controller: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabel {
    pub controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantConditionLabels {
    pub tenant: String,
    pub condition: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantPhaseLabels {
    pub tenant: String,
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabel {
    pub tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabels {
    pub phase: &'static str,
    pub reason: String,
}

fn histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 16))
}

pub struct Metrics {
    registry: Registry,
    pub reconcile_total: Family<ReconcileLabels, Counter>,
    pub reconcile_duration: Family<ControllerLabel, Histogram, fn() -> Histogram>,
    pub tenant_conditions: Family<TenantConditionLabels, Gauge>,
    pub jobs: Family<TenantPhaseLabels, Gauge>,
    pub queue_depth: Family<TenantLabel, Gauge>,
    pub job_transitions: Family<TransitionLabels, Counter>,
    pub admission_wait: Histogram,
    pub run_time: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("atelier");
        let reconcile_total = Family::<ReconcileLabels, Counter>::default();
        registry.register(
            "reconcile",
            "Reconciliations by controller and result",
            reconcile_total.clone(),
        );
        let reconcile_duration =
            Family::<ControllerLabel, Histogram, fn() -> Histogram>::new_with_constructor(
                histogram,
            );
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconciliation",
            reconcile_duration.clone(),
        );
        let tenant_conditions = Family::<TenantConditionLabels, Gauge>::default();
        registry.register(
            "tenant_condition",
            "1 when the tenant's condition is True",
            tenant_conditions.clone(),
        );
        let jobs = Family::<TenantPhaseLabels, Gauge>::default();
        registry.register("jobs", "GenerationJobs by tenant and phase", jobs.clone());
        let queue_depth = Family::<TenantLabel, Gauge>::default();
        registry.register(
            "queue_depth",
            "Jobs waiting for a GPU, by tenant",
            queue_depth.clone(),
        );
        let job_transitions = Family::<TransitionLabels, Counter>::default();
        registry.register(
            "job_transitions",
            "Job phase transitions by phase and reason",
            job_transitions.clone(),
        );
        let admission_wait = histogram();
        registry.register(
            "job_wait_seconds",
            "Time from creation to Running",
            admission_wait.clone(),
        );
        let run_time = histogram();
        registry.register(
            "job_run_seconds",
            "Time from Running to finished",
            run_time.clone(),
        );
        Self {
            registry,
            reconcile_total,
            reconcile_duration,
            tenant_conditions,
            jobs,
            queue_depth,
            job_transitions,
            admission_wait,
            run_time,
        }
    }
}

impl Metrics {
    /// Drops the series of a tenant that is being deleted, so that dashboards and alerts do not
    /// see it frozen at its last values, and the registry does not grow with every tenant ever
    /// created.
    pub fn forget_tenant(&self, tenant: &str) {
        self.queue_depth.remove(&TenantLabel {
            tenant: tenant.to_string(),
        });
        for phase in JobPhase::ALL {
            self.jobs.remove(&TenantPhaseLabels {
                tenant: tenant.to_string(),
                phase: phase.as_str(),
            });
        }
        for condition in [READY, PROGRESSING, DEGRADED] {
            self.tenant_conditions.remove(&TenantConditionLabels {
                tenant: tenant.to_string(),
                condition,
            });
        }
    }

    /// Counts one reconciliation of `controller` and its duration.
    pub fn reconciled(&self, controller: &'static str, ok: bool, took: Duration) {
        let result = if ok { "success" } else { "error" };
        self.reconcile_total
            .get_or_create(&ReconcileLabels { controller, result })
            .inc();
        self.reconcile_duration
            .get_or_create(&ControllerLabel { controller })
            .observe(took.as_secs_f64());
    }

    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` until the process ends.
pub async fn serve(listen: SocketAddr, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    async fn render(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
        (
            [(
                CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            metrics.encode(),
        )
    }
    let app = Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }))
        .with_state(metrics);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    // With port 0 the log is the only place that tells where the metrics are.
    tracing::info!(address = %listener.local_addr()?, "serving metrics");
    axum::serve(listener, app).await?;
    Ok(())
}
