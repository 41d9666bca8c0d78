//! Pinned models across restarts: what the state file records of a resident model, and
//! bringing the records back as loads when egpud (or the tinygrad worker) starts.
//!
//! A pin whose load fails at start is not dropped: the failure may be temporary (a disk not
//! mounted yet, the budget full for a moment while other pins load, a file being replaced).
//! It stays in the state file and shows in Status as waiting, with the error as its detail,
//! and egpud tries again after 1 s, then 2 s, 4 s, ... up to every 5 minutes, until it loads
//! or a client unloads it (the only way to give a pin up).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::{KeepAlive, LoadOptions, LoadTicket, ModelInfo, ModelState, Residency, Resident};
use crate::backend::BackendKind;
use crate::error::DaemonError;
use crate::scheduler::PrefixStats;
use crate::state::{PinnedModel, StateStore};

/// The record of a pinned resident model.
pub fn record(r: &Resident) -> PinnedModel {
    PinnedModel {
        name: r.name.clone(),
        source: r.source.display().to_string(),
        context_length: r.context as u32,
        slots: r.slots as u32,
        keep_alive_ms: Some(match r.keep_alive() {
            KeepAlive::Forever => -1,
            KeepAlive::For(d) => d.as_millis().min(i64::MAX as u128) as i64,
        }),
        backend: r.backend.as_str().into(),
    }
}

/// The first wait before a failed pin is tried again; it doubles after each failure.
pub const FIRST_RETRY: Duration = Duration::from_secs(1);
/// The longest wait between tries.
pub const MAX_RETRY: Duration = Duration::from_secs(300);

/// A pinned model that failed to load again, as Status shows it.
#[derive(Debug, Clone)]
pub struct WaitingPin {
    pub record: PinnedModel,
    /// The last attempt's error.
    pub reason: String,
    pub backend: BackendKind,
    pub since: SystemTime,
}

impl WaitingPin {
    pub fn info(&self, name: &str) -> ModelInfo {
        ModelInfo {
            name: name.to_owned(),
            source: PathBuf::from(&self.record.source),
            architecture: String::new(),
            kind: egpu_engine::models::ModelKind::Decoder,
            quant_mix: Vec::new(),
            bytes: 0,
            bytes_estimated: 0,
            context_length: self.record.context_length as usize,
            slots: self.record.slots as usize,
            pinned: true,
            keep_alive_expires: None,
            active: 0,
            queued: 0,
            requests_served: 0,
            last_used: self.since,
            backend: self.backend,
            state: ModelState::Waiting,
            parameters: 0,
            vocab_size: 0,
            trained_context_length: None,
            detail: self.reason.clone(),
            prefix_cache: PrefixStats::default(),
        }
    }
}

/// The load that brings a record back.
fn load_options(model: &PinnedModel) -> LoadOptions {
    LoadOptions {
        source: model.source.clone(),
        name: Some(model.name.clone()),
        context: Some(model.context_length as usize).filter(|&c| c > 0),
        slots: Some(model.slots as usize).filter(|&s| s > 0),
        pin: true,
        keep_alive: model.keep_alive_ms.map(KeepAlive::from_millis),
        backend: Some(model.backend.clone()).filter(|b| !b.is_empty()),
        // The source is the converted GGUF itself, whatever its weights' format.
        quantize: None,
    }
}

/// The backend a record names; records from before backends existed are cpu.
fn backend_of(model: &PinnedModel) -> Option<BackendKind> {
    if model.backend.is_empty() {
        Some(BackendKind::Cpu)
    } else {
        BackendKind::parse(&model.backend)
    }
}

/// Starts loading every persisted pinned model of `backend`, then watches the loads: the
/// models show as "loading" in Status at once, and a model that cannot be loaded again (its
/// file is gone, it no longer fits) is logged and dropped from the state. Run it in the
/// background. Tinygrad models are loaded when the worker is ready; records naming an
/// unknown backend are loaded as they are, and their load reports why it cannot be.
pub async fn reload_pinned(
    residency: Arc<Residency>,
    store: Arc<StateStore>,
    backend: BackendKind,
) {
    let models: Vec<PinnedModel> = store
        .pinned()
        .into_iter()
        .filter(|m| match backend_of(m) {
            Some(b) => b == backend,
            None => backend == BackendKind::Cpu,
        })
        .collect();
    if models.is_empty() {
        return;
    }
    tracing::info!(
        count = models.len(),
        state_file = %store.path().display(),
        "reloading pinned models"
    );
    let mut pending = Vec::new();
    for model in models {
        match residency.start_load(load_options(&model)).await {
            Ok(LoadTicket::Resident(_)) => {}
            Ok(ticket @ LoadTicket::Pending { .. }) => pending.push((model, ticket)),
            Err(err) => wait_and_retry(&residency, model, backend, &err),
        }
    }
    for (model, ticket) in pending {
        match ticket.wait().await {
            Ok(_) => tracing::info!(model = %model.name, "pinned model resident again"),
            Err(err) => wait_and_retry(&residency, model, backend, &err),
        }
    }
}

/// A pin's load failed: unless egpud or its device is going away (the next start of either
/// tries again anyway), it waits and is retried.
pub fn wait_and_retry(
    residency: &Arc<Residency>,
    model: PinnedModel,
    backend: BackendKind,
    err: &DaemonError,
) {
    if matches!(
        err,
        DaemonError::ShuttingDown | DaemonError::DeviceLost(_) | DaemonError::DeviceUnavailable(_)
    ) {
        return;
    }
    tracing::warn!(
        model = %model.name,
        source = %model.source,
        cause = %err,
        retry_in = ?FIRST_RETRY,
        "cannot reload a pinned model; it stays pinned and egpud retries it"
    );
    let name = model.name.clone();
    let fresh = {
        let mut waiting = residency.waiting.lock();
        let fresh = !waiting.contains_key(&name);
        waiting.insert(
            name.clone(),
            WaitingPin {
                record: model,
                reason: err.to_string(),
                backend,
                since: SystemTime::now(),
            },
        );
        fresh
    };
    // One retry loop per waiting name (a worker restart may report the same pin again).
    if fresh {
        tokio::spawn(retry(residency.clone(), name));
    }
}

/// Tries a waiting pin again with backoff until it loads, is unloaded, or egpud stops.
async fn retry(residency: Arc<Residency>, name: String) {
    let mut wait = FIRST_RETRY;
    loop {
        tokio::time::sleep(wait).await;
        let Some(pin) = residency.waiting.lock().get(&name).cloned() else {
            return; // unloaded: given up
        };
        let result = match residency.start_load(load_options(&pin.record)).await {
            Ok(LoadTicket::Resident(_)) => Ok(()),
            Ok(ticket @ LoadTicket::Pending { .. }) => ticket.wait().await.map(|_| ()),
            Err(err) => Err(err),
        };
        match result {
            Ok(()) => {
                residency.waiting.lock().remove(&name);
                tracing::info!(model = %name, "waiting pinned model resident again");
                return;
            }
            Err(DaemonError::ShuttingDown) => return,
            Err(err) => {
                wait = (wait * 2).min(MAX_RETRY);
                tracing::warn!(model = %name, cause = %err, retry_in = ?wait, "pinned model still cannot load");
                let mut waiting = residency.waiting.lock();
                match waiting.get_mut(&name) {
                    Some(pin) => pin.reason = err.to_string(),
                    None => return,
                }
            }
        }
    }
}
