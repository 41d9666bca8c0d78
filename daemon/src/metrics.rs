//! What egpud counts, for Prometheus (`GET /metrics` on the HTTP front end).
//!
//! Counters and the time-to-first-token histogram are recorded where things happen (the
//! runners, residency, the worker supervisor); gauges (queue depth, busy slots, bytes) are
//! sampled from the live state when scraped, so they never drift from what Status shows.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::error::DaemonError;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub model: String,
    /// `generate`, `score` or `translate`.
    pub kind: String,
    /// `ok`, `cancelled` (the client left), or the error's code (see [`outcome`]).
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LoadLabels {
    pub model: String,
    /// `ok` or the error's code.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub backend: String,
}

type Seconds = Counter<f64, AtomicU64>;
type HistogramFamily = Family<ModelLabels, Histogram, fn() -> Histogram>;

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub prompt_tokens: Family<ModelLabels, Counter>,
    pub generated_tokens: Family<ModelLabels, Counter>,
    pub prefix_cache_lookups: Family<ModelLabels, Counter>,
    pub prefix_cache_hits: Family<ModelLabels, Counter>,
    pub prefix_cache_reused_tokens: Family<ModelLabels, Counter>,
    pub prefix_cache_copies: Family<ModelLabels, Counter>,
    pub prefix_cache_copied_tokens: Family<ModelLabels, Counter>,
    pub prefill_seconds: Family<ModelLabels, Seconds>,
    pub decode_seconds: Family<ModelLabels, Seconds>,
    pub time_to_first_token: HistogramFamily,
    pub loads: Family<LoadLabels, Counter>,
    pub evictions: Family<ModelLabels, Counter>,
    pub worker_restarts: Counter,
    pub device_lost: Counter,
    pub queue_depth: Family<ModelLabels, Gauge>,
    pub busy_slots: Family<ModelLabels, Gauge>,
    pub resident_bytes: Family<ModelLabels, Gauge>,
    pub budget_bytes: Family<BackendLabels, Gauge>,
    pub used_bytes: Family<BackendLabels, Gauge>,
}

fn ttft_histogram() -> Histogram {
    // 5 ms to ~40 s.
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("egpu");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests by model, kind and outcome",
            requests.clone(),
        );
        let prompt_tokens = Family::<ModelLabels, Counter>::default();
        registry.register(
            "prompt_tokens",
            "Prompt tokens fed (prefilled)",
            prompt_tokens.clone(),
        );
        let prefix_cache_lookups = Family::<ModelLabels, Counter>::default();
        registry.register(
            "prefix_cache_lookups",
            "Generations that looked for their prompt's prefix in a slot cache",
            prefix_cache_lookups.clone(),
        );
        let prefix_cache_hits = Family::<ModelLabels, Counter>::default();
        registry.register(
            "prefix_cache_hits",
            "Generations that reused part of their prompt from a slot cache",
            prefix_cache_hits.clone(),
        );
        let prefix_cache_reused_tokens = Family::<ModelLabels, Counter>::default();
        registry.register(
            "prefix_cache_reused_tokens",
            "Prompt tokens reused from slot caches instead of prefilled",
            prefix_cache_reused_tokens.clone(),
        );
        let prefix_cache_copies = Family::<ModelLabels, Counter>::default();
        registry.register(
            "prefix_cache_copies",
            "Generations whose reused prefix was copied from another slot's cache",
            prefix_cache_copies.clone(),
        );
        let prefix_cache_copied_tokens = Family::<ModelLabels, Counter>::default();
        registry.register(
            "prefix_cache_copied_tokens",
            "Prompt tokens copied from another slot's cache (part of the reused tokens)",
            prefix_cache_copied_tokens.clone(),
        );
        let generated_tokens = Family::<ModelLabels, Counter>::default();
        registry.register(
            "generated_tokens",
            "Tokens generated",
            generated_tokens.clone(),
        );
        let prefill_seconds = Family::<ModelLabels, Seconds>::default();
        registry.register_with_unit(
            "prefill",
            "Time from admission to the first token, summed over requests",
            Unit::Seconds,
            prefill_seconds.clone(),
        );
        let decode_seconds = Family::<ModelLabels, Seconds>::default();
        registry.register_with_unit(
            "decode",
            "Time from the first to the last token, summed over requests",
            Unit::Seconds,
            decode_seconds.clone(),
        );
        let time_to_first_token: HistogramFamily = Family::new_with_constructor(ttft_histogram);
        registry.register_with_unit(
            "time_to_first_token",
            "Time from a request's arrival to its first token",
            Unit::Seconds,
            time_to_first_token.clone(),
        );
        let loads = Family::<LoadLabels, Counter>::default();
        registry.register("model_loads", "Model loads by outcome", loads.clone());
        let evictions = Family::<ModelLabels, Counter>::default();
        registry.register(
            "evictions",
            "Idle models evicted to make room for a load",
            evictions.clone(),
        );
        let worker_restarts = Counter::default();
        registry.register(
            "worker_restarts",
            "Starts of the tinygrad worker after a failure",
            worker_restarts.clone(),
        );
        let device_lost = Counter::default();
        registry.register(
            "device_lost",
            "Times the tinygrad device was lost",
            device_lost.clone(),
        );
        let queue_depth = Family::<ModelLabels, Gauge>::default();
        registry.register(
            "queue_depth",
            "Requests waiting for a slot",
            queue_depth.clone(),
        );
        let busy_slots = Family::<ModelLabels, Gauge>::default();
        registry.register("busy_slots", "Requests holding a slot", busy_slots.clone());
        let resident_bytes = Family::<ModelLabels, Gauge>::default();
        registry.register_with_unit(
            "resident",
            "Memory a resident model holds (measured)",
            Unit::Bytes,
            resident_bytes.clone(),
        );
        let budget_bytes = Family::<BackendLabels, Gauge>::default();
        registry.register_with_unit(
            "budget",
            "Memory budget of a backend",
            Unit::Bytes,
            budget_bytes.clone(),
        );
        let used_bytes = Family::<BackendLabels, Gauge>::default();
        registry.register_with_unit(
            "used",
            "Memory held by a backend's models",
            Unit::Bytes,
            used_bytes.clone(),
        );
        Metrics {
            registry,
            requests,
            prompt_tokens,
            generated_tokens,
            prefix_cache_lookups,
            prefix_cache_hits,
            prefix_cache_reused_tokens,
            prefix_cache_copies,
            prefix_cache_copied_tokens,
            prefill_seconds,
            decode_seconds,
            time_to_first_token,
            loads,
            evictions,
            worker_restarts,
            device_lost,
            queue_depth,
            busy_slots,
            resident_bytes,
            budget_bytes,
            used_bytes,
        }
    }

    /// Counts one request of `kind` on `model` that ended with `outcome`.
    pub fn request(&self, model: &str, kind: &str, outcome: &str) {
        self.requests
            .get_or_create(&RequestLabels {
                model: model.to_owned(),
                kind: kind.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// The Prometheus text exposition of everything.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

pub fn model(name: &str) -> ModelLabels {
    ModelLabels {
        model: name.to_owned(),
    }
}

/// The `outcome` label of a failed request or load.
pub fn outcome(err: &DaemonError) -> &'static str {
    match err {
        DaemonError::UnknownModel { .. }
        | DaemonError::MissingFile(_)
        | DaemonError::UnknownSource { .. }
        | DaemonError::NotInHfCache(_) => "not_found",
        DaemonError::BadModelFile { .. } => "bad_model_file",
        DaemonError::InvalidArgument(_) | DaemonError::UnsupportedBackend { .. } => {
            "invalid_argument"
        }
        DaemonError::NameTaken { .. } => "name_taken",
        DaemonError::OverBudget { .. }
        | DaemonError::TranslationTooLarge { .. }
        | DaemonError::DeviceOutOfMemory(_) => "over_budget",
        DaemonError::QueueFull { .. } => "queue_full",
        DaemonError::Busy { .. } => "busy",
        DaemonError::Unloaded(_) | DaemonError::ModelFileChanged(_) => "unloaded",
        DaemonError::ShuttingDown => "shutting_down",
        DaemonError::DeviceLost(_) | DaemonError::DeviceUnavailable(_) => "device_lost",
        DaemonError::PinWaiting { .. } | DaemonError::StillLoading(_) => "unavailable",
        DaemonError::DeadlineExceeded { .. } => "deadline_exceeded",
        DaemonError::Internal(_) => "internal",
    }
}
