//! The operator's Prometheus metrics, in one registry served at `/metrics`.
//!
//! Labels are bounded: controller names, error categories and phases, never object
//! names or error strings.

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use kubetune_crds::Phase;

/// Labels of a reconcile.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    /// `finetunejob` or `adapterdeployment`.
    pub controller: &'static str,
}

/// Labels of a failed reconcile.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// The controller.
    pub controller: &'static str,
    /// The error's category.
    pub category: &'static str,
}

/// Labels of a request to the Kubernetes API.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The HTTP method: GET (get, list, watch), POST, PUT, PATCH, DELETE.
    pub method: String,
}

/// Labels of the jobs-by-phase gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    /// The phase, as in `status.phase`.
    pub phase: &'static str,
}

/// Every phase, so that a phase with no jobs reads 0 rather than vanishing.
const PHASES: [Phase; 6] = [
    Phase::Pending,
    Phase::Admitted,
    Phase::Running,
    Phase::Succeeded,
    Phase::Failed,
    Phase::Suspended,
];

/// A tower layer for kube's client that counts every request it sends in
/// `kubetune_api_requests_total`.
pub fn counting_layer(
    requests: Family<RequestLabels, Counter>,
) -> tower::util::MapRequestLayer<
    impl Fn(http::Request<kube::client::Body>) -> http::Request<kube::client::Body> + Clone,
> {
    tower::util::MapRequestLayer::new(move |request: http::Request<kube::client::Body>| {
        requests
            .get_or_create(&RequestLabels {
                method: request.method().as_str().to_owned(),
            })
            .inc();
        request
    })
}

/// Every metric the operator exports.
#[derive(Debug)]
pub struct Metrics {
    /// Reconciles run.
    pub reconciles: Family<ControllerLabels, Counter>,
    /// Requests the operator sent to the Kubernetes API, by method (a watch counts once
    /// when it starts).
    pub api_requests: Family<RequestLabels, Counter>,
    /// Reconciles that failed, by category.
    pub failures: Family<FailureLabels, Counter>,
    /// Reconcile duration in seconds.
    pub duration: Family<ControllerLabels, Histogram>,
    /// FineTuneJobs by phase.
    pub jobs: Family<PhaseLabels, Gauge>,
    /// Reads of trainer progress that failed (the trainer did not answer).
    pub progress_read_failures: Counter,
    /// 1 while the last price table read is valid, 0 after an invalid one.
    pub price_table_valid: Gauge,
    /// Price tables refused as invalid.
    pub price_table_errors: Counter,
    /// GPU-hours consumed by jobs with GPUs, by job.
    pub gpu_hours: Family<JobLabels, Counter<f64, AtomicU64>>,
    /// CPU core-hours consumed by jobs without GPUs, by job.
    pub cpu_core_hours: Family<JobLabels, Counter<f64, AtomicU64>>,
    /// Compute cost accrued in the price table's currency, by job.
    pub cost: Family<JobLabels, Counter<f64, AtomicU64>>,
    /// Calls to serving pods' adapter API, by operation and result.
    pub adapter_operations: Family<OperationLabels, Counter>,
}

/// Labels of calls to serving pods' adapter API.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    /// load, unload or smoke.
    pub operation: &'static str,
    /// ok or error.
    pub result: &'static str,
}

/// Labels of the per-job cost counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    /// The job's namespace.
    pub namespace: String,
    /// The FineTuneJob's name.
    pub job: String,
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            reconciles: Family::default(),
            api_requests: Family::default(),
            failures: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 14))
            }),
            jobs: Family::default(),
            progress_read_failures: Counter::default(),
            price_table_valid: Gauge::default(),
            price_table_errors: Counter::default(),
            gpu_hours: Family::default(),
            cpu_core_hours: Family::default(),
            cost: Family::default(),
            adapter_operations: Family::default(),
        };
        let registry = registry.sub_registry_with_prefix("kubetune");
        registry.register("reconciles", "Reconciles run", metrics.reconciles.clone());
        registry.register(
            "api_requests",
            "Requests sent to the Kubernetes API, by HTTP method",
            metrics.api_requests.clone(),
        );
        registry.register(
            "reconcile_failures",
            "Reconciles that failed, by error category",
            metrics.failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconcile took",
            metrics.duration.clone(),
        );
        registry.register(
            "finetunejobs",
            "FineTuneJobs by phase",
            metrics.jobs.clone(),
        );
        registry.register(
            "progress_read_failures",
            "Reads of trainer progress that failed",
            metrics.progress_read_failures.clone(),
        );
        registry.register(
            "price_table_valid",
            "1 while the last price table read is valid",
            metrics.price_table_valid.clone(),
        );
        registry.register(
            "price_table_errors",
            "Price tables refused as invalid",
            metrics.price_table_errors.clone(),
        );
        registry.register(
            "gpu_hours",
            "GPU-hours consumed by FineTuneJobs with GPUs",
            metrics.gpu_hours.clone(),
        );
        registry.register(
            "cpu_core_hours",
            "CPU core-hours consumed by FineTuneJobs without GPUs",
            metrics.cpu_core_hours.clone(),
        );
        registry.register(
            "cost",
            "Compute cost accrued by FineTuneJobs, in the price table's currency",
            metrics.cost.clone(),
        );
        registry.register(
            "adapter_operations",
            "Calls to serving pods' adapter API (load, unload, smoke) by result",
            metrics.adapter_operations.clone(),
        );
        metrics
    }

    /// Counts one call to a serving pod's adapter API.
    pub fn adapter_operation(&self, operation: &'static str, ok: bool) {
        self.adapter_operations
            .get_or_create(&OperationLabels {
                operation,
                result: if ok { "ok" } else { "error" },
            })
            .inc();
    }

    /// Sets the jobs-by-phase gauge from the phases of every job.
    pub fn set_jobs_by_phase(&self, phases: impl IntoIterator<Item = Phase>) {
        let mut counts = [0i64; PHASES.len()];
        for phase in phases {
            if let Some(i) = PHASES.iter().position(|p| *p == phase) {
                counts[i] += 1;
            }
        }
        for (phase, count) in PHASES.iter().zip(counts) {
            self.jobs
                .get_or_create(&PhaseLabels {
                    phase: phase.as_str(),
                })
                .set(count);
        }
    }

    /// Counts one reconcile of `controller` that started at `started`.
    pub fn observe(
        &self,
        controller: &'static str,
        started: Instant,
        failure: Option<&'static str>,
    ) {
        let labels = ControllerLabels { controller };
        self.reconciles.get_or_create(&labels).inc();
        self.duration
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        if let Some(category) = failure {
            self.failures
                .get_or_create(&FailureLabels {
                    controller,
                    category,
                })
                .inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    #[tokio::test]
    async fn the_counting_layer_counts_each_request_by_method() {
        use tower::{Layer, Service, ServiceExt};
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        let inner = tower::service_fn(|_: http::Request<kube::client::Body>| async {
            Ok::<_, std::convert::Infallible>(())
        });
        let mut service = counting_layer(metrics.api_requests.clone()).layer(inner);
        for method in [http::Method::GET, http::Method::GET, http::Method::PATCH] {
            let request = http::Request::builder()
                .method(method)
                .uri("/api/v1/pods")
                .body(kube::client::Body::empty())
                .expect("a request");
            service.ready().await.expect("ready");
            service.call(request).await.expect("answered");
        }
        let count = |method: &str| {
            metrics
                .api_requests
                .get_or_create(&RequestLabels {
                    method: method.into(),
                })
                .get()
        };
        assert_eq!((count("GET"), count("PATCH"), count("PUT")), (2, 1, 0));
    }

    #[test]
    fn reconciles_and_failures_are_counted_with_bounded_labels() {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        metrics.observe("finetunejob", Instant::now(), None);
        metrics.observe("finetunejob", Instant::now(), Some("write"));
        let mut text = String::new();
        encode(&mut text, &registry).expect("metrics encode");
        assert!(
            text.contains("kubetune_reconciles_total{controller=\"finetunejob\"} 2"),
            "{text}"
        );
        assert!(
            text.contains(
                "kubetune_reconcile_failures_total{controller=\"finetunejob\",category=\"write\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "kubetune_reconcile_duration_seconds_count{controller=\"finetunejob\"} 2"
            )
        );
    }

    #[test]
    fn jobs_are_counted_by_phase_and_empty_phases_read_zero() {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        metrics.set_jobs_by_phase([Phase::Running, Phase::Running, Phase::Failed]);
        metrics.set_jobs_by_phase([Phase::Running, Phase::Succeeded]);
        let mut text = String::new();
        encode(&mut text, &registry).expect("metrics encode");
        for line in [
            "kubetune_finetunejobs{phase=\"Running\"} 1",
            "kubetune_finetunejobs{phase=\"Succeeded\"} 1",
            "kubetune_finetunejobs{phase=\"Failed\"} 0",
            "kubetune_finetunejobs{phase=\"Pending\"} 0",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }
}
