//! `kubetune-serve`'s Prometheus metrics, in one registry served at `/metrics`.
//!
//! Labels are bounded: the route (one of the server's paths, or `other`) and the
//! status code, never model or adapter names.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of an answered request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route, e.g. `/v1/completions`, or `other`.
    pub endpoint: &'static str,
    /// The HTTP status code.
    pub status: u16,
}

/// Labels of a request duration.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    /// The route.
    pub endpoint: &'static str,
}

/// Every metric the server exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Requests answered, by route and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Request duration in seconds, by route.
    pub duration: Family<EndpointLabels, Histogram>,
    /// Adapters loaded now.
    pub loaded_adapters: Gauge,
    /// Tokens generated.
    pub generated_tokens: Counter,
    /// Prompt tokens processed.
    pub prompt_tokens: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates the metrics in a fresh registry.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let duration = Family::<EndpointLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 16))
        });
        let loaded_adapters = Gauge::default();
        let generated_tokens = Counter::default();
        let prompt_tokens = Counter::default();
        {
            let r = registry.sub_registry_with_prefix("kubetune_serve");
            r.register(
                "requests",
                "HTTP requests answered, by route and status code",
                requests.clone(),
            );
            r.register(
                "request_duration_seconds",
                "Time to answer a request, by route",
                duration.clone(),
            );
            r.register(
                "loaded_adapters",
                "LoRA adapters loaded now",
                loaded_adapters.clone(),
            );
            r.register(
                "generated_tokens",
                "Completion tokens generated",
                generated_tokens.clone(),
            );
            r.register(
                "prompt_tokens",
                "Prompt tokens processed",
                prompt_tokens.clone(),
            );
        }
        Self {
            registry,
            requests,
            duration,
            loaded_adapters,
            generated_tokens,
            prompt_tokens,
        }
    }

    /// Counts one answered request.
    pub fn observe(&self, endpoint: &'static str, status: u16, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels { endpoint, status })
            .inc();
        self.duration
            .get_or_create(&EndpointLabels { endpoint })
            .observe(seconds);
    }

    /// The exposition in Prometheus' (OpenMetrics) text format.
    pub fn text(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_by_route_and_status() {
        let metrics = Metrics::new();
        metrics.observe("/v1/completions", 200, 0.01);
        metrics.observe("/v1/completions", 200, 0.02);
        metrics.observe("/v1/completions", 404, 0.001);
        metrics.loaded_adapters.set(2);
        metrics.generated_tokens.inc_by(7);
        let text = metrics.text();
        assert!(
            text.contains(
                "kubetune_serve_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 2"
            ),
            "{text}"
        );
        assert!(text.contains(
            "kubetune_serve_requests_total{endpoint=\"/v1/completions\",status=\"404\"} 1"
        ));
        assert!(text.contains("kubetune_serve_loaded_adapters 2"));
        assert!(text.contains("kubetune_serve_generated_tokens_total 7"));
    }
}
