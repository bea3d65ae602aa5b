//! Prometheus series. The names are a contract with dashboards and alerts: change none.

use prometheus::{
    GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub queue_duration: HistogramVec,
    pub inference_duration: HistogramVec,
    pub batch_size: HistogramVec,
    pub queue_depth: IntGaugeVec,
    pub expected_wait: GaugeVec,
    pub images: IntCounterVec,
    pub model_info: IntGaugeVec,
    pub open_connections: IntGauge,
}

/// Seconds, from 1 ms to 2 min: CPU detector batches take seconds, GPU ones milliseconds.
const LATENCY_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
const BATCH_BUCKETS: [f64; 8] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

fn histogram(name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
    HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("valid histogram")
}

/// The labels of every per-model series: the model's name and its version, so a swap shows as
/// a new series beside the old one's.
pub const MODEL_LABELS: [&str; 2] = ["model", "version"];

impl Metrics {
    pub fn new() -> Self {
        let m = Self {
            registry: Registry::new(),
            requests: IntCounterVec::new(
                Opts::new(
                    "detectd_requests_total",
                    "Requests by endpoint (HTTP route or gRPC method) and status (HTTP status or gRPC code name)",
                ),
                &["endpoint", "status"],
            )
            .expect("valid counter"),
            request_duration: histogram(
                "detectd_request_duration_seconds",
                "HTTP request latency",
                &["endpoint"],
                &LATENCY_BUCKETS,
            ),
            queue_duration: histogram(
                "detectd_queue_duration_seconds",
                "Time a request waited for its batch",
                &MODEL_LABELS,
                &LATENCY_BUCKETS,
            ),
            inference_duration: histogram(
                "detectd_inference_duration_seconds",
                "Model time per batch",
                &MODEL_LABELS,
                &LATENCY_BUCKETS,
            ),
            batch_size: histogram(
                "detectd_batch_size",
                "Images per batch",
                &MODEL_LABELS,
                &BATCH_BUCKETS,
            ),
            queue_depth: IntGaugeVec::new(
                Opts::new("detectd_queue_depth", "Images waiting for a batch"),
                &MODEL_LABELS,
            )
            .expect("valid gauge"),
            expected_wait: GaugeVec::new(
                Opts::new(
                    "detectd_expected_wait_seconds",
                    "How long a one-image request sent now would wait for its answer, from the model's measured pace (what admission compares with the deadline)",
                ),
                &MODEL_LABELS,
            )
            .expect("valid gauge"),
            images: IntCounterVec::new(
                Opts::new("detectd_images_total", "Images run through the model"),
                &MODEL_LABELS,
            )
            .expect("valid counter"),
            model_info: IntGaugeVec::new(
                Opts::new(
                    "detectd_model_info",
                    "Loaded model versions (value 1; a replaced version's series goes when it is freed)",
                ),
                &["model", "version", "arch", "device", "precision"],
            )
            .expect("valid gauge"),
            open_connections: IntGauge::new(
                "detectd_open_connections",
                "HTTP connections open now (at --max-connections the server stops accepting)",
            )
            .expect("valid gauge"),
        };
        for c in [
            Box::new(m.requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.request_duration.clone()),
            Box::new(m.queue_duration.clone()),
            Box::new(m.inference_duration.clone()),
            Box::new(m.batch_size.clone()),
            Box::new(m.queue_depth.clone()),
            Box::new(m.expected_wait.clone()),
            Box::new(m.images.clone()),
            Box::new(m.model_info.clone()),
            Box::new(m.open_connections.clone()),
        ] {
            m.registry.register(c).expect("unique metric names");
        }
        m
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
